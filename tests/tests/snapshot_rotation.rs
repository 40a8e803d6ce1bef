//! Snapshot key rotation pushed by the platform, with a real platform, a
//! real agent and a real Node-RED: the platform rotates its snapshot keys
//! twice through the admin API (as `tether-platform keys rotate-snapshot`
//! does), the second time revoking the old keys; the device, which pinned
//! root version 1 at enrollment, walks 1 → 2 → 3 in the pull of the next
//! snapshot, applies it and keeps root 3 across a restart. A manifest
//! signed with the revoked (leaked) key is refused, naming it. Forged
//! rotations (signed only by the new key, or skipping a version) are
//! refused and the device keeps its trust; the genuine rotation that
//! follows is walked.
//!
//! Needs Node-RED (`tests/nodered/install.sh`, which `.ci/run` runs).
//! Missing, the test fails when `CI` is set and otherwise skips, saying so.

mod common;

use std::path::Path;
use std::time::Duration;

use common::snapshot::*;
use common::*;
use ring::signature::{Ed25519KeyPair, KeyPair};
use tether_agent::Agent;
use tether_platform::client::AdminClient;
use tether_proto::snapshot::{Envelope, MANIFEST_CONTEXT, ROOT_CONTEXT, Root, seal};

/// Each wait for an outcome: a Node-RED restart and its health probe.
const READY: Duration = Duration::from_secs(60);

/// The root the agent in `state` keeps: version, snapshot keys, revoked.
fn kept_root(state: &Path) -> Root {
    let path = state.join(tether_agent::snapshot::trust::TRUST_FILE);
    let bytes = std::fs::read(&path).expect("the agent keeps its trust");
    let stored: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    serde_json::from_value(stored["root"].clone()).unwrap()
}

fn key(path: &Path) -> Ed25519KeyPair {
    Ed25519KeyPair::from_pkcs8(&std::fs::read(path).unwrap()).unwrap()
}

fn hex(key: &Ed25519KeyPair) -> String {
    tether_proto::hex::encode(key.public_key().as_ref())
}

fn new_key() -> Ed25519KeyPair {
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

/// A root document for `version` naming `root` as both keys.
fn root_doc(version: u64, root: &Ed25519KeyPair) -> Vec<u8> {
    serde_json::to_vec(&Root {
        version,
        root_key: hex(root),
        snapshot_keys: vec![hex(root)],
        revoked: Vec::new(),
        expires_at: u64::MAX,
    })
    .unwrap()
}

/// Replaces the stored signature of `device`'s snapshot `version` with
/// one by `key`: what a platform signing with that key would serve.
fn sign_stored_with(data: &Path, device: &str, version: u64, key: &Ed25519KeyPair) {
    let path = data
        .join("snapshots")
        .join(device)
        .join(version.to_string())
        .join("manifest.json");
    let stored = Envelope::parse(&std::fs::read(&path).unwrap()).unwrap();
    let resigned = seal(MANIFEST_CONTEXT, &stored.document().unwrap(), &[key]);
    std::fs::write(&path, serde_json::to_vec(&resigned).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_snapshot_keys_are_walked_kept_and_revoked_and_forged_rotations_are_refused() {
    let Some(Bench {
        dir,
        platform,
        state,
        node_red,
        port,
    }) = bench().await
    else {
        return;
    };
    let data = dir.path().join("platform");
    let roots = data.join(tether_platform::keys::SNAPSHOT_ROOTS_DIR);
    let agent = Agent::start(config(&state, &node_red, port))
        .await
        .expect("agent starts");
    let device = agent.device_id();
    connected_with_node_red(&agent, port).await;
    let pinned = platform.pinned_keys().snapshot;

    // Two rotations through the admin API: 1 -> 2, then 2 -> 3 revoking
    // version 2's keys. Version 2's snapshot key is copied first: a leak.
    let admin = AdminClient::from_data_dir(&data).expect("admin client");
    let two = admin.rotate_snapshot_keys(false).await.expect("rotated");
    assert_eq!(two.root_version, 2);
    assert!(two.revoked.is_empty());
    let leaked = key(&roots.join("snapshot-key-2.pk8"));
    assert_eq!(hex(&leaked), two.snapshot_key);
    let three = admin.rotate_snapshot_keys(true).await.expect("rotated");
    assert_eq!(three.root_version, 3);
    assert_eq!(
        three.revoked,
        [two.snapshot_key.clone(), two.root_key.clone()]
    );
    assert_eq!(
        platform.pinned_keys().snapshot,
        pinned,
        "devices enrolling now still pin root 1 and walk from it"
    );

    // Signed with version 3's key: the device walks both rotations in one
    // pull, applies the snapshot and keeps root 3.
    let v1 = create_and_push(&platform, &device, files("signed under root 3", false)).await;
    outcome(&agent, &format!("applied {v1}"), READY).await;
    assert_eq!(hello(port).await.as_deref(), Some("signed under root 3"));
    let kept = kept_root(&state);
    assert_eq!(kept.version, 3);
    assert_eq!(
        kept.snapshot_keys,
        std::slice::from_ref(&three.snapshot_key)
    );
    assert!(kept.revoked.contains(&two.snapshot_key) && kept.revoked.contains(&two.root_key));
    let file = state.join(tether_agent::snapshot::trust::TRUST_FILE);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);

    // A restarted agent still trusts root 3 (it asks for nothing older and
    // the platform sends no roots) and applies the next snapshot.
    agent.shutdown().await;
    let agent = Agent::start(config(&state, &node_red, port))
        .await
        .expect("agent starts again");
    connected_with_node_red(&agent, port).await;
    let v2 = create_and_push(&platform, &device, files("after a restart", false)).await;
    outcome(&agent, &format!("applied {v2}"), READY).await;
    assert_eq!(hello(port).await.as_deref(), Some("after a restart"));
    assert_eq!(kept_root(&state).version, 3);

    // A platform signing with the leaked, revoked key: refused, the key
    // named, the running flows untouched.
    let info = platform
        .create_snapshot(&device, files("signed with a leaked key", false), None)
        .await
        .expect("created");
    sign_stored_with(&data, &device, info.version, &leaked);
    platform
        .push_snapshot(&device, info.version)
        .await
        .expect("pushed");
    let reason = outcome(&agent, &format!("rejected {}", info.version), READY).await;
    assert!(
        reason.contains(&two.snapshot_key) && reason.contains("revoked"),
        "{reason}"
    );
    assert_eq!(hello(port).await.as_deref(), Some("after a restart"));

    // A third rotation; root 3's key is copied first, to forge with.
    let root_three = key(&roots.join("root-key-3.pk8"));
    let four = platform.rotate_snapshot_keys(false).await.expect("rotated");
    assert_eq!(four.version, 4);
    let genuine = std::fs::read(roots.join("4.json")).unwrap();

    // Forged: version 4 signed only by its own new key. Refused; the device
    // keeps root 3.
    let stranger = new_key();
    let forged = seal(ROOT_CONTEXT, &root_doc(4, &stranger), &[&stranger]);
    std::fs::write(roots.join("4.json"), serde_json::to_vec(&forged).unwrap()).unwrap();
    let v = create_and_push(&platform, &device, files("under a forged root", false)).await;
    let reason = outcome(&agent, &format!("rejected {v}"), READY).await;
    assert!(
        reason.contains("key rotation was refused")
            && reason.contains("not signed by the trusted root key")
            && reason.contains("keeps trusting root version 3"),
        "{reason}"
    );
    assert_eq!(kept_root(&state).version, 3);

    // Forged: a rotation that skips version 4, though root 3's key signed
    // it. Refused; the device keeps root 3.
    let skipping = seal(
        ROOT_CONTEXT,
        &root_doc(5, &stranger),
        &[&root_three, &stranger],
    );
    std::fs::write(roots.join("4.json"), serde_json::to_vec(&skipping).unwrap()).unwrap();
    let v = create_and_push(&platform, &device, files("skipping a version", false)).await;
    let reason = outcome(&agent, &format!("rejected {v}"), READY).await;
    assert!(
        reason.contains("root version 5 does not follow version 3"),
        "{reason}"
    );
    assert_eq!(kept_root(&state).version, 3);
    assert_eq!(hello(port).await.as_deref(), Some("after a restart"));

    // The genuine version 4 again: walked from root 3, and the snapshot
    // signed with its key applied.
    std::fs::write(roots.join("4.json"), &genuine).unwrap();
    let v = create_and_push(&platform, &device, files("under root 4", false)).await;
    outcome(&agent, &format!("applied {v}"), READY).await;
    assert_eq!(hello(port).await.as_deref(), Some("under root 4"));
    let kept = kept_root(&state);
    assert_eq!(kept.version, 4);
    assert_eq!(kept.snapshot_keys, four.snapshot_keys);

    // The platform saw every refusal.
    eventually("the refusals in the platform's audit trail", || async {
        let types = audit_types(&platform, &device).await;
        (types
            .iter()
            .filter(|(k, _)| k == "snapshot_rejected")
            .count()
            >= 3)
            .then_some(())
    })
    .await;
    agent.shutdown().await;
}
