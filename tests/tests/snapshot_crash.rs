//! Crash consistency of applying a snapshot: 50 applies, each killed with
//! SIGKILL after a random delay (some finish). After every kill the folder,
//! opened again as the agent opens it, has `current` at the old version or
//! the new one, whole (every file of its manifest there with its hash), and
//! no staging folder.

use std::process::Command;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_tether-snapshot-crash");
const RUNS: u64 = 50;

fn check(root: &std::path::Path) -> Option<u64> {
    let out = Command::new(BIN).arg("check").arg(root).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the folder is not whole after a kill: {}{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim().strip_prefix("current ").unwrap().parse().ok()
}

#[test]
fn a_snapshot_apply_killed_at_any_moment_leaves_the_old_or_the_new_version_whole() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("snapshots");
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let (mut finished, mut killed) = (0, 0);
    for version in 1..=RUNS {
        let before = check(&root);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // 0 to 60 ms: an apply takes about 20-40 ms here, so kills land
        // in every step and some applies finish.
        let delay = Duration::from_micros(seed % 60_000);
        let mut child = Command::new(BIN)
            .arg("apply")
            .arg(&root)
            .arg(version.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "apply {version} failed on its own");
                finished += 1;
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                killed += 1;
            }
        }
        let after = check(&root);
        assert!(
            after == before || after == Some(version),
            "after killing apply {version}: current {after:?}, before {before:?}"
        );
    }
    println!("{RUNS} applies: {killed} killed with SIGKILL, {finished} finished");
    assert!(killed >= 10, "too few kills to mean anything ({killed})");
    // And the folder still takes a snapshot.
    let status = Command::new(BIN)
        .arg("apply")
        .arg(&root)
        .arg((RUNS + 1).to_string())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(check(&root), Some(RUNS + 1));
}
