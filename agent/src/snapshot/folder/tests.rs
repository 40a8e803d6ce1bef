use super::*;
use tether_proto::snapshot::{FLOWS, MANIFEST_CONTEXT, seal};

/// Components by path, with their bytes.
type Parts = Vec<(String, Vec<u8>)>;

/// A snapshot of `version`: its manifest, envelope bytes and contents.
fn snapshot(version: u64) -> (Manifest, Vec<u8>, Parts) {
    let parts = vec![
        (FLOWS.to_owned(), format!("[{version}]").into_bytes()),
        (
            "lib/deep/module.js".to_owned(),
            vec![version as u8; 100_000],
        ),
    ];
    let manifest = Manifest {
        format: 1,
        device: "dev_x".into(),
        version,
        created_at: 0,
        expires_at: u64::MAX,
        components: parts
            .iter()
            .map(|(path, bytes)| Component::describe(path, bytes))
            .collect(),
    };
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .unwrap()
            .as_ref(),
    )
    .unwrap();
    let envelope = seal(
        MANIFEST_CONTEXT,
        &serde_json::to_vec(&manifest).unwrap(),
        &[&key],
    );
    (manifest, serde_json::to_vec(&envelope).unwrap(), parts)
}

fn stage(folder: &mut Folder, version: u64) {
    let (manifest, envelope, parts) = snapshot(version);
    folder
        .stage(&envelope, &manifest, |c| {
            let bytes = parts.iter().find(|(p, _)| *p == c.path).unwrap().1.clone();
            Ok(std::io::Cursor::new(bytes))
        })
        .unwrap();
}

fn flows(folder: &Folder) -> String {
    std::fs::read_to_string(folder.current_dir().join(FLOWS)).unwrap()
}

#[test]
fn staged_switched_and_committed_then_the_next_rolled_back() {
    let dir = tempfile::tempdir().unwrap();
    let (mut folder, recovered) = Folder::open(dir.path()).unwrap();
    assert_eq!(recovered, Recovered::Clean);
    stage(&mut folder, 1);
    folder.switch(1).unwrap();
    assert_eq!(folder.commit().unwrap(), 1);
    assert_eq!(flows(&folder), "[1]");
    stage(&mut folder, 2);
    // Staged, not switched: Node-RED still runs 1.
    assert_eq!(flows(&folder), "[1]");
    folder.switch(2).unwrap();
    assert_eq!(flows(&folder), "[2]");
    assert_eq!(folder.roll_back("did not answer").unwrap(), Some(1));
    assert_eq!(flows(&folder), "[1]");
    let journal = folder.journal();
    assert_eq!(journal.committed, Some(1));
    assert_eq!(
        journal.highest, 2,
        "a rolled-back version is not taken again"
    );
    assert!(
        journal
            .last_outcome
            .as_deref()
            .unwrap()
            .contains("rolled back 2")
    );
    assert!(!dir.path().join("versions/2").exists());
    // 2 again is refused; 3 is taken.
    let (manifest, envelope, _) = snapshot(2);
    let again = folder.stage(&envelope, &manifest, |_| Ok(std::io::empty()));
    assert!(matches!(
        again,
        Err(FolderError::Refused(Refusal::NotNewer { .. }))
    ));
    stage(&mut folder, 3);
    folder.switch(3).unwrap();
    folder.commit().unwrap();
    assert_eq!(flows(&folder), "[3]");
    assert!(
        dir.path().join("versions/1").exists(),
        "the previous one is kept"
    );
}

#[test]
fn a_component_that_does_not_match_leaves_nothing_and_the_current_one_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (mut folder, _) = Folder::open(dir.path()).unwrap();
    stage(&mut folder, 1);
    folder.switch(1).unwrap();
    folder.commit().unwrap();
    let (manifest, envelope, _) = snapshot(2);
    // Bytes of another snapshot, and endless data.
    let mixed = folder.stage(&envelope, &manifest, |_| {
        Ok(std::io::Cursor::new(b"[9]".to_vec()))
    });
    assert!(
        matches!(mixed, Err(FolderError::Refused(Refusal::Component { .. }))),
        "{mixed:?}"
    );
    let endless = folder.stage(&envelope, &manifest, |_| Ok(std::io::repeat(b'x')));
    assert!(matches!(
        endless,
        Err(FolderError::Refused(Refusal::Component { .. }))
    ));
    assert!(!dir.path().join("versions/2").exists());
    assert_eq!(flows(&folder), "[1]");
    // The staging folder left behind is removed at the next open.
    drop(folder);
    let (folder, _) = Folder::open(dir.path()).unwrap();
    assert!(!dir.path().join("staging-2").exists());
    assert_eq!(folder.current(), Some(1));
}

#[test]
fn an_apply_that_keeps_crashing_is_rolled_back_after_max_attempts() {
    let dir = tempfile::tempdir().unwrap();
    let (mut folder, _) = Folder::open(dir.path()).unwrap();
    stage(&mut folder, 1);
    folder.switch(1).unwrap();
    folder.commit().unwrap();
    stage(&mut folder, 2);
    folder.switch(2).unwrap();
    drop(folder); // the agent dies while probing 2
    for attempt in 1..=MAX_ATTEMPTS {
        let (folder, recovered) = Folder::open(dir.path()).unwrap();
        assert_eq!(
            recovered,
            Recovered::Resume {
                to: 2,
                attempts: attempt
            }
        );
        assert_eq!(folder.current(), Some(2));
    }
    let (folder, recovered) = Folder::open(dir.path()).unwrap();
    assert_eq!(
        recovered,
        Recovered::RolledBack {
            from: 2,
            to: Some(1)
        }
    );
    assert_eq!(folder.current(), Some(1));
    assert_eq!(flows(&folder), "[1]");
    assert_eq!(folder.journal().phase, Phase::Idle);
    // The first snapshot ever, crashing: no previous one to go back to.
    let dir = tempfile::tempdir().unwrap();
    let (mut folder, _) = Folder::open(dir.path()).unwrap();
    stage(&mut folder, 1);
    folder.switch(1).unwrap();
    drop(folder);
    for _ in 0..MAX_ATTEMPTS {
        Folder::open(dir.path()).unwrap();
    }
    let (folder, recovered) = Folder::open(dir.path()).unwrap();
    assert_eq!(recovered, Recovered::RolledBack { from: 1, to: None });
    assert_eq!(folder.current(), None);
}

#[test]
fn roots_apply_now_request_is_the_agent_users_to_read() {
    use std::os::unix::fs::MetadataExt;
    if rustix::process::geteuid().as_raw() != 0 {
        return; // Only root writes a file for another user.
    }
    let dir = tempfile::tempdir().unwrap();
    let (folder, _) = Folder::open(dir.path()).unwrap();
    let request = ApplyNow {
        version: 3,
        by: "alice (sudo)".into(),
    };
    request_apply_now(dir.path(), &request, Some((1, 1))).unwrap();
    let meta = std::fs::metadata(dir.path().join(APPLY_NOW)).unwrap();
    assert_eq!((meta.uid(), meta.gid(), meta.mode() & 0o777), (1, 1, 0o600));
    assert_eq!(folder.take_apply_now().unwrap(), Some(request));
}
