//! The attack table: each crafted snapshot or root rotation is refused
//! with its own reason.

use ring::signature::{Ed25519KeyPair, KeyPair};

use super::*;

const DEVICE: &str = "dev_0123456789abcdef0123456789abcdef";
const NOW: u64 = 1_800_000_000;

fn key() -> Ed25519KeyPair {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn public(k: &Ed25519KeyPair) -> String {
    hex(k.public_key().as_ref())
}

fn sha(bytes: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn component(path: &str, bytes: &[u8]) -> Component {
    Component::describe(path, bytes)
}

fn manifest(version: u64) -> Manifest {
    Manifest {
        format: 1,
        device: DEVICE.into(),
        version,
        created_at: NOW - 10,
        expires_at: NOW + 3600,
        components: vec![
            component(FLOWS, b"[]"),
            component("settings.json", b"{}"),
            component("modules/node-red-contrib-x-1.2.3.tgz", b"tar"),
        ],
    }
}

fn signed(m: &Manifest, k: &Ed25519KeyPair) -> Envelope {
    seal(MANIFEST_CONTEXT, &serde_json::to_vec(m).unwrap(), &[k])
}

fn root_doc(
    version: u64,
    root: &Ed25519KeyPair,
    snapshot: &[&Ed25519KeyPair],
    revoked: &[String],
) -> Vec<u8> {
    serde_json::to_vec(&Root {
        version,
        root_key: public(root),
        snapshot_keys: snapshot.iter().map(|k| public(k)).collect(),
        revoked: revoked.to_vec(),
        expires_at: NOW + 86_400,
    })
    .unwrap()
}

#[test]
fn a_snapshot_signed_by_the_pinned_key_verifies_and_its_components_check() {
    let pinned = key();
    let trust = Trust::pinned(&public(&pinned));
    let m = manifest(1);
    let got = trust
        .verify_manifest(&signed(&m, &pinned), DEVICE, 0, NOW)
        .unwrap();
    assert_eq!(got, m);
    check_component(&m.components[0], b"[]").unwrap();
    // Streamed in pieces, too.
    let mut check = ComponentCheck::new(&m.components[1]);
    check.update(b"{").unwrap();
    check.update(b"}").unwrap();
    check.finish().unwrap();
    // And it survives the trip through its wire form.
    let wire = serde_json::to_vec(&signed(&m, &pinned)).unwrap();
    let envelope = Envelope::parse(&wire).unwrap();
    assert!(trust.verify_manifest(&envelope, DEVICE, 0, NOW).is_ok());
}

#[test]
fn attack_table_each_crafted_snapshot_is_refused_with_its_reason() {
    let pinned = key();
    let stranger = key();
    let trust = Trust::pinned(&public(&pinned));
    let verify = |e: &Envelope, installed: u64| trust.verify_manifest(e, DEVICE, installed, NOW);

    // Signature: one byte of the document changed after signing.
    let mut tampered = signed(&manifest(2), &pinned);
    let mut doc = URL_SAFE_NO_PAD.decode(&tampered.signed).unwrap();
    let at = doc.iter().position(|b| *b == b'2').unwrap();
    doc[at] = b'9';
    tampered.signed = URL_SAFE_NO_PAD.encode(&doc);
    assert_eq!(
        verify(&tampered, 0),
        Err(Refusal::BadSignature("no signature verifies"))
    );

    // Signed by a key the device never trusted.
    assert!(matches!(
        verify(&signed(&manifest(2), &stranger), 0),
        Err(Refusal::BadSignature(_))
    ));
    // A stranger's signature listed under the trusted key's name.
    let mut forged = signed(&manifest(2), &stranger);
    forged.signatures[0].key = public(&pinned);
    assert!(matches!(verify(&forged, 0), Err(Refusal::BadSignature(_))));

    // Another device's snapshot.
    let mut other = manifest(2);
    other.device = "dev_ffffffffffffffffffffffffffffffff".into();
    assert!(matches!(
        verify(&signed(&other, &pinned), 0),
        Err(Refusal::WrongDevice { .. })
    ));

    // Replay of the installed version, and a rollback to an older one.
    assert_eq!(
        verify(&signed(&manifest(5), &pinned), 5),
        Err(Refusal::NotNewer {
            installed: 5,
            offered: 5
        })
    );
    assert_eq!(
        verify(&signed(&manifest(4), &pinned), 5),
        Err(Refusal::NotNewer {
            installed: 5,
            offered: 4
        })
    );

    // Stale.
    let mut stale = manifest(2);
    stale.expires_at = NOW;
    assert_eq!(
        verify(&signed(&stale, &pinned), 0),
        Err(Refusal::Expired { expires_at: NOW })
    );

    // Paths that leave the snapshot folder, or are not plain.
    for path in [
        "../flows.json",
        "/etc/passwd",
        "a//b",
        "a/./b",
        "a/../../b",
        "",
        "a\\b",
        "flows.json/",
        "x y",
    ] {
        let mut m = manifest(2);
        m.components.push(component(path, b"x"));
        assert_eq!(
            verify(&signed(&m, &pinned), 0),
            Err(Refusal::BadPath(path.into())),
            "{path:?}"
        );
    }

    // A component listed twice (which copy would win?).
    let mut twice = manifest(2);
    twice.components.push(component(FLOWS, b"[1]"));
    assert_eq!(
        verify(&signed(&twice, &pinned), 0),
        Err(Refusal::Duplicate(FLOWS.into()))
    );

    // Without flows.
    let mut empty = manifest(2);
    empty.components.retain(|c| c.path != FLOWS);
    assert_eq!(verify(&signed(&empty, &pinned), 0), Err(Refusal::NoFlows));

    // Endless data: a component larger than the limit, or all of them.
    let mut huge = manifest(2);
    huge.components[0].length = MAX_COMPONENT + 1;
    assert!(matches!(
        verify(&signed(&huge, &pinned), 0),
        Err(Refusal::Limits(_))
    ));
    let mut many = manifest(2);
    for i in 0..5 {
        many.components.push(Component {
            path: format!("big-{i}"),
            length: MAX_COMPONENT,
            sha256: sha(b""),
        });
    }
    assert!(matches!(
        verify(&signed(&many, &pinned), 0),
        Err(Refusal::Limits(_))
    ));

    // A format this device does not read.
    let mut future = manifest(2);
    future.format = 2;
    assert_eq!(
        verify(&signed(&future, &pinned), 0),
        Err(Refusal::Format(2))
    );

    // An envelope beyond the size limit is refused before it is decoded.
    let big = vec![b' '; MAX_ENVELOPE + 1];
    assert!(matches!(
        Envelope::parse(&big),
        Err(Refusal::TooLarge { .. })
    ));
    assert!(matches!(
        Envelope::parse(b"{\"signed\":1}"),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn components_are_checked_by_length_first_then_hash_and_cannot_be_mixed_between_snapshots() {
    let m = manifest(2);
    let flows = &m.components[0];
    // Longer than announced: refused at the first byte too many.
    let mut check = ComponentCheck::new(flows);
    check.update(b"[]").unwrap();
    assert!(matches!(check.update(b" "), Err(Refusal::Component { .. })));
    // Shorter.
    assert!(check_component(flows, b"[").is_err());
    // Same length, other bytes: another signed snapshot's flows.
    let err = check_component(flows, b"{}").unwrap_err();
    assert!(err.to_string().contains("another snapshot"), "{err}");
}

#[test]
fn root_rotations_walk_one_version_at_a_time_signed_by_old_and_new() {
    let k1 = key();
    let (k2, k3) = (key(), key());
    let (s2, s3) = (key(), key());
    let trust = Trust::pinned(&public(&k1));
    let v2 = seal(ROOT_CONTEXT, &root_doc(2, &k2, &[&s2], &[]), &[&k1, &k2]);
    let v3 = seal(
        ROOT_CONTEXT,
        &root_doc(3, &k3, &[&s3], &[public(&s2)]),
        &[&k2, &k3],
    );
    // 1 -> 2 -> 3.
    let now = trust.update(&[v2.clone(), v3.clone()], NOW).unwrap();
    assert_eq!(now.root.version, 3);
    assert_eq!(now.root.snapshot_keys, [public(&s3)]);
    // The new snapshot key signs; the pinned one and the revoked one no
    // longer do.
    assert!(
        now.verify_manifest(&signed(&manifest(2), &s3), DEVICE, 0, NOW)
            .is_ok()
    );
    assert!(matches!(
        now.verify_manifest(&signed(&manifest(2), &k1), DEVICE, 0, NOW),
        Err(Refusal::BadSignature(_))
    ));
    assert_eq!(
        now.verify_manifest(&signed(&manifest(2), &s2), DEVICE, 0, NOW),
        Err(Refusal::RevokedKey(public(&s2)))
    );
    // Skipping a version: 1 -> 3.
    assert_eq!(
        trust.update(std::slice::from_ref(&v3), NOW),
        Err(Refusal::BadSignature(
            "a root rotation not signed by the trusted root key"
        ))
    );
    let skipped = seal(ROOT_CONTEXT, &root_doc(3, &k3, &[&s3], &[]), &[&k1, &k3]);
    assert_eq!(
        trust.update(&[skipped], NOW),
        Err(Refusal::RootNotSuccessor {
            trusted: 1,
            offered: 3
        })
    );
    // Signed by the old root only, or by the new one only.
    let old_only = seal(ROOT_CONTEXT, &root_doc(2, &k2, &[&s2], &[]), &[&k1]);
    assert!(matches!(
        trust.update(&[old_only], NOW),
        Err(Refusal::BadSignature(_))
    ));
    let new_only = seal(ROOT_CONTEXT, &root_doc(2, &k2, &[&s2], &[]), &[&k2]);
    assert!(matches!(
        trust.update(&[new_only], NOW),
        Err(Refusal::BadSignature(_))
    ));
    // A rotation back to a key revoked before.
    let back = seal(ROOT_CONTEXT, &root_doc(4, &k3, &[&s2], &[]), &[&k3]);
    assert_eq!(
        now.update(&[back], NOW),
        Err(Refusal::RevokedKey(public(&s2)))
    );
    // The newest root expired: refused, and the old trust stays as it was.
    let mut expired: Root = serde_json::from_slice(&root_doc(2, &k2, &[&s2], &[])).unwrap();
    expired.expires_at = NOW;
    let expired = seal(
        ROOT_CONTEXT,
        &serde_json::to_vec(&expired).unwrap(),
        &[&k1, &k2],
    );
    assert_eq!(
        trust.update(std::slice::from_ref(&expired), NOW),
        Err(Refusal::RootExpired { expires_at: NOW })
    );
    // An expired root in the middle of the walk does not matter.
    let v3_after_expired = seal(ROOT_CONTEXT, &root_doc(3, &k3, &[&s3], &[]), &[&k2, &k3]);
    assert_eq!(
        trust
            .update(&[expired, v3_after_expired], NOW)
            .unwrap()
            .root
            .version,
        3
    );
    // A root signed as a manifest (the contexts differ) is not a root.
    let wrong_context = seal(
        MANIFEST_CONTEXT,
        &root_doc(2, &k2, &[&s2], &[]),
        &[&k1, &k2],
    );
    assert!(matches!(
        trust.update(&[wrong_context], NOW),
        Err(Refusal::BadSignature(_))
    ));
    // And a manifest signed with the root context is not a manifest.
    let as_root = seal(
        ROOT_CONTEXT,
        &serde_json::to_vec(&manifest(2)).unwrap(),
        &[&k1],
    );
    assert!(matches!(
        trust.verify_manifest(&as_root, DEVICE, 0, NOW),
        Err(Refusal::BadSignature(_))
    ));
}

#[test]
fn paths_are_plain_relative_paths() {
    for good in ["flows.json", "modules/a-1.0.0.tgz", "a/b/c.d", "_x", ".env"] {
        assert!(is_plain_path(good), "{good}");
    }
    let long = "a".repeat(MAX_PATH + 1);
    for bad in ["..", ".", "a/..", "/a", "a/", "a\0b", "é", long.as_str()] {
        assert!(!is_plain_path(bad), "{bad:?}");
    }
}

#[test]
fn pull_frames_round_trip_and_oversized_ones_are_refused_before_reading() {
    use super::pull::{self, Answer, Request};
    let request = Request {
        version: 7,
        root_version: 2,
    };
    let wire = pull::encode(&request);
    let len = pull::body_len(wire[..4].try_into().unwrap(), pull::MAX_REQUEST).unwrap();
    assert_eq!(len, wire.len() - 4);
    assert_eq!(pull::decode::<Request>(&wire[4..]).unwrap(), request);
    let refused = Answer::Refused {
        message: "no such version".into(),
    };
    let wire = pull::encode(&refused);
    assert_eq!(pull::decode::<Answer>(&wire[4..]).unwrap(), refused);
    // A length beyond the limit is refused from the header alone.
    let huge = ((pull::MAX_ANSWER + 1) as u32).to_be_bytes();
    assert!(matches!(
        pull::body_len(huge, pull::MAX_ANSWER),
        Err(pull::PullError::TooLarge { .. })
    ));
    assert!(pull::decode::<Request>(br#"{"version": 1, "extra": 2}"#).is_err());
    assert!(pull::decode::<Answer>(b"not json").is_err());
}

/// A chain of `n` rotations from `pinned`: roots 2..=n+1, each signed by the
/// root key before it and its own, with their snapshot keys.
fn chain(pinned: &Ed25519KeyPair, n: usize) -> (Vec<Envelope>, Vec<Ed25519KeyPair>) {
    let mut roots = Vec::new();
    let mut snapshot_keys = Vec::new();
    let mut previous: Option<Ed25519KeyPair> = None;
    for i in 0..n {
        let (root, snap) = (key(), key());
        let by = previous.as_ref().unwrap_or(pinned);
        roots.push(seal(
            ROOT_CONTEXT,
            &root_doc(i as u64 + 2, &root, &[&snap], &[]),
            &[by, &root],
        ));
        previous = Some(root);
        snapshot_keys.push(snap);
    }
    (roots, snapshot_keys)
}

#[test]
fn requests_name_the_trusted_root_and_read_like_before_at_the_pinned_one() {
    use super::pull::{self, PINNED_ROOT, Request};
    // At the pinned root the field is left out: a platform that predates
    // rotation reads the request as before.
    let pinned = Request {
        version: 7,
        root_version: PINNED_ROOT,
    };
    assert_eq!(serde_json::to_string(&pinned).unwrap(), r#"{"version":7}"#);
    // A request without it (an agent that predates rotation) means the
    // pinned root.
    assert_eq!(
        pull::decode::<Request>(br#"{"version": 7}"#).unwrap(),
        pinned
    );
    let rotated = Request {
        version: 7,
        root_version: 3,
    };
    let wire = pull::encode(&rotated);
    assert_eq!(
        std::str::from_utf8(&wire[4..]).unwrap(),
        r#"{"version":7,"root_version":3}"#
    );
    assert_eq!(pull::decode::<Request>(&wire[4..]).unwrap(), rotated);
    assert!(wire.len() - 4 <= pull::MAX_REQUEST);
    for bad in [
        &br#"{"version": 7, "root_version": -1}"#[..],
        br#"{"version": 7, "root_version": "3"}"#,
        br#"{"root_version": 3}"#,
    ] {
        assert!(
            matches!(
                pull::decode::<Request>(bad),
                Err(pull::PullError::Malformed(_))
            ),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn root_frames_come_before_the_snapshot_and_the_device_walks_them() {
    use super::pull::{self, Answer, Answers, Pulled};
    let pinned = key();
    let (roots, snapshot_keys) = chain(&pinned, 2);
    let envelope = signed(&manifest(1), &snapshot_keys[1]);

    // What the platform writes: each newer root, oldest first, then the
    // snapshot; each frame within the answer limit.
    let mut wire = Vec::new();
    for version in pull::root_versions_after(1, 3) {
        wire.extend(pull::encode(&Answer::Root {
            envelope: roots[version as usize - 2].clone(),
        }));
    }
    wire.extend(pull::encode(&Answer::Snapshot {
        envelope: envelope.clone(),
    }));

    // What the device reads.
    let mut answers = Answers::new();
    let mut rest = &wire[..];
    let pulled = loop {
        let len = pull::body_len(rest[..4].try_into().unwrap(), pull::MAX_ANSWER).unwrap();
        let (body, after) = rest[4..].split_at(len);
        rest = after;
        if let Some(pulled) = answers.take(body).unwrap() {
            break pulled;
        }
    };
    assert!(rest.is_empty());
    let Pulled::Snapshot {
        roots: walked,
        envelope: got,
    } = pulled
    else {
        panic!("a snapshot")
    };
    assert_eq!(walked, roots);
    assert_eq!(got, envelope);
    let trust = Trust::pinned(&public(&pinned))
        .update(&walked, NOW)
        .unwrap();
    assert_eq!(trust.root.version, 3);
    assert!(trust.verify_manifest(&got, DEVICE, 0, NOW).is_ok());
    // Without the roots, the pinned trust refuses the new key's manifest.
    assert!(matches!(
        Trust::pinned(&public(&pinned)).verify_manifest(&got, DEVICE, 0, NOW),
        Err(Refusal::BadSignature(_))
    ));

    // A refusal ends the answers too, roots or not.
    let mut answers = Answers::new();
    let refused = serde_json::to_vec(&Answer::Refused {
        message: "no such version".into(),
    })
    .unwrap();
    assert_eq!(
        answers.take(&refused).unwrap(),
        Some(Pulled::Refused {
            message: "no such version".into()
        })
    );
}

#[test]
fn root_frames_are_bounded_in_number_size_and_signatures_and_malformed_ones_are_refused() {
    use super::pull::{self, Answer, Answers, PullError};
    let pinned = key();
    let (roots, _) = chain(&pinned, 1);
    let root = serde_json::to_vec(&Answer::Root {
        envelope: roots[0].clone(),
    })
    .unwrap();

    // At most MAX_ROOT_STEPS roots before the snapshot.
    let mut answers = Answers::new();
    for _ in 0..MAX_ROOT_STEPS {
        assert_eq!(answers.take(&root), Ok(None));
    }
    assert_eq!(answers.take(&root), Err(PullError::TooManyRoots));

    // A frame larger than an answer may be is refused from its header.
    let huge = ((pull::MAX_ANSWER + 1) as u32).to_be_bytes();
    assert!(matches!(
        pull::body_len(huge, pull::MAX_ANSWER),
        Err(PullError::TooLarge { .. })
    ));
    // A root that fills an envelope to its limit still fits a frame.
    let mut padded = roots[0].clone();
    padded
        .signed
        .push_str(&"A".repeat(MAX_ENVELOPE - padded.signed.len() - 2048));
    let frame = pull::encode(&Answer::Root { envelope: padded });
    assert!(frame.len() - 4 <= pull::MAX_ANSWER);

    // More signatures than any root may carry.
    let mut crowded = roots[0].clone();
    crowded.signatures = vec![crowded.signatures[0].clone(); MAX_KEYS + 1];
    let crowded = serde_json::to_vec(&Answer::Root { envelope: crowded }).unwrap();
    assert!(matches!(
        Answers::new().take(&crowded),
        Err(PullError::Malformed(_))
    ));

    // Malformed frames: not JSON, an unknown type, a root without its
    // envelope, an envelope with a field too many.
    for bad in [
        &b"not json"[..],
        br#"{"type": "roots", "envelopes": []}"#,
        br#"{"type": "root"}"#,
        br#"{"type": "root", "envelope": {"signed": "", "signatures": [], "x": 1}}"#,
        br#"{"type": "root", "envelope": {"signed": 1, "signatures": []}}"#,
    ] {
        assert!(
            matches!(Answers::new().take(bad), Err(PullError::Malformed(_))),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }

    // Well-formed frames whose roots are not a rotation the device can
    // walk are refused by the walk, with its reason.
    let junk = serde_json::to_vec(&Answer::Root {
        envelope: Envelope {
            signed: "not base64!".into(),
            signatures: Vec::new(),
        },
    })
    .unwrap();
    let mut answers = Answers::new();
    assert_eq!(answers.take(&junk), Ok(None));
    let snapshot = serde_json::to_vec(&Answer::Snapshot {
        envelope: signed(&manifest(1), &pinned),
    })
    .unwrap();
    let Ok(Some(pull::Pulled::Snapshot { roots: got, .. })) = answers.take(&snapshot) else {
        panic!("a snapshot");
    };
    assert!(matches!(
        Trust::pinned(&public(&pinned)).update(&got, NOW),
        Err(Refusal::Malformed(_))
    ));
}

#[test]
fn the_platform_sends_the_roots_after_the_trusted_version_at_most_max_steps() {
    use super::pull::root_versions_after;
    let after = |trusted, newest| root_versions_after(trusted, newest).collect::<Vec<u64>>();
    let range = |r: std::ops::RangeInclusive<u64>| r.collect::<Vec<u64>>();
    // Newest root 4: a device at the pinned root (or one that did not say)
    // gets 2, 3, 4; one at 3 gets 4; one at 4, or ahead, nothing.
    assert_eq!(after(0, 4), [2, 3, 4]);
    assert_eq!(after(1, 4), [2, 3, 4]);
    assert_eq!(after(3, 4), [4]);
    assert!(after(4, 4).is_empty());
    assert!(after(9, 4).is_empty());
    assert!(after(u64::MAX, u64::MAX).is_empty());
    assert_eq!(after(u64::MAX - 1, u64::MAX), [u64::MAX]);
    // A platform that never rotated sends nothing.
    assert!(after(1, 1).is_empty());
    // A device far behind gets the oldest MAX_ROOT_STEPS; it walks the rest
    // at its next pull.
    let steps = MAX_ROOT_STEPS as u64;
    assert_eq!(after(1, 100), range(2..=steps + 1));
    assert_eq!(after(steps + 1, 100), range(steps + 2..=100));
    assert_eq!(after(steps + 1, 1000), range(steps + 2..=2 * steps + 1));
    assert_eq!(after(7, steps + 7).len(), MAX_ROOT_STEPS);
}

#[test]
fn a_signature_counts_only_when_it_verifies_under_its_context() {
    let (k, other) = (key(), key());
    let envelope = signed(&manifest(1), &k);
    assert!(envelope.is_signed_by(MANIFEST_CONTEXT, &public(&k)));
    assert!(!envelope.is_signed_by(ROOT_CONTEXT, &public(&k)));
    assert!(!envelope.is_signed_by(MANIFEST_CONTEXT, &public(&other)));
    // Listed under another key's name: not that key's signature.
    let mut renamed = envelope.clone();
    renamed.signatures[0].key = public(&other);
    assert!(!renamed.is_signed_by(MANIFEST_CONTEXT, &public(&other)));
    assert!(!renamed.is_signed_by(MANIFEST_CONTEXT, "not hex"));
}
