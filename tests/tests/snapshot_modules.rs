//! A snapshot's modules, installed by the agent's npm runner into a staged
//! version's folder, with the real npm and packages packed on the spot: a
//! node module and its dependency carried as tarballs install with the
//! registry unreachable; without tarballs the unreachable registry is the
//! reason given; a tarball of another version than the pinned one, an npm
//! that hangs past the time limit and a missing npm each fail with their
//! own reason; a snapshot without modules needs no npm.
//!
//! Needs npm (it comes with Node.js, which `.ci/run` installs); missing,
//! the test fails when `CI` is set and otherwise skips, saying so.

use std::path::Path;
use std::time::{Duration, Instant};

use tether_agent::snapshot::modules::{Installed, Installer, LIB};
use tether_e2e::npm::{self, DEP_MODULE, NODE_MODULE};
use tether_e2e::tools;

/// Nothing listens here: a registry that cannot be reached.
const NO_REGISTRY: &str = "http://127.0.0.1:9/";

fn installer(cache: &Path, npm: &Path) -> Installer {
    // npm's own retries would wait about a minute for the dead registry.
    std::fs::create_dir_all(cache).unwrap();
    std::fs::write(cache.join("npmrc"), "fetch-retries=0\n").unwrap();
    Installer {
        npm: npm.display().to_string(),
        registry: Some(NO_REGISTRY.into()),
        timeout: Duration::from_secs(120),
        cache: cache.to_owned(),
        run_as: None,
    }
}

fn staging(dir: &Path, files: &[(String, Vec<u8>)]) -> std::path::PathBuf {
    let staging = dir.join("staging");
    for (path, bytes) in files {
        let file = staging.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, bytes).unwrap();
    }
    staging
}

fn installed_version(staging: &Path, module: &str) -> Option<String> {
    let bytes = std::fs::read(
        staging
            .join(LIB)
            .join("node_modules")
            .join(module)
            .join("package.json"),
    )
    .ok()?;
    let json: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    json["version"].as_str().map(str::to_owned)
}

#[test]
fn modules_install_from_tarballs_offline_and_fail_with_their_own_reason() {
    let Some(npm) = tools::required(npm::npm()) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let packed = npm::packed_modules(&npm, &dir.path().join("pack"), "1.0.0", "from a tarball");
    let cache = dir.path().join("npm");

    // Tarballs: installed with the registry unreachable, dependency too.
    let work = dir.path().join("offline");
    let mut files = packed.clone();
    files.push(npm::modules_json("1.0.0"));
    let staged = staging(&work, &files);
    let done = installer(&cache, &npm)
        .install(&staged)
        .expect("installs offline");
    assert_eq!(
        done,
        Some(Installed {
            modules: 1,
            from_tarballs: true
        })
    );
    assert_eq!(
        installed_version(&staged, NODE_MODULE).as_deref(),
        Some("1.0.0")
    );
    assert_eq!(
        installed_version(&staged, DEP_MODULE).as_deref(),
        Some("1.0.0")
    );

    // No tarballs: the registry is needed, and the reason says so.
    let work = dir.path().join("registry");
    let staged = staging(&work, &[npm::modules_json("1.0.0")]);
    let err = installer(&cache, &npm).install(&staged).unwrap_err();
    assert!(err.contains("from the registry"), "{err}");
    assert_eq!(installed_version(&staged, NODE_MODULE), None);

    // The tarball is 1.0.0, the list pins 2.0.0.
    let work = dir.path().join("mismatch");
    let mut files = packed.clone();
    files.push(npm::modules_json("2.0.0"));
    let staged = staging(&work, &files);
    let err = installer(&cache, &npm).install(&staged).unwrap_err();
    assert!(
        err.contains("installed tether-test-node 1.0.0, not the pinned 2.0.0"),
        "{err}"
    );

    // A dependency missing from the tarballs: npm offline cannot find it.
    let work = dir.path().join("missing-dep");
    let mut files: Vec<_> = packed
        .iter()
        .filter(|(p, _)| !p.contains(DEP_MODULE))
        .cloned()
        .collect();
    files.push(npm::modules_json("1.0.0"));
    let staged = staging(&work, &files);
    let err = installer(&cache, &npm).install(&staged).unwrap_err();
    assert!(err.contains("offline"), "{err}");
}

#[test]
fn an_npm_that_hangs_is_killed_at_the_time_limit_and_a_missing_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    // A child in npm's process group that would leave a mark later.
    let late = dir.path().join("late");
    let fake = dir.path().join("npm");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\n(sleep 3; touch {}) &\nsleep 30\n",
            late.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let staged = staging(dir.path(), &[npm::modules_json("1.0.0")]);
    let mut installer = installer(&dir.path().join("cache"), &fake);
    installer.timeout = Duration::from_secs(1);
    let started = Instant::now();
    let err = installer.install(&staged).unwrap_err();
    assert!(
        err.contains("did not install the modules within 1s"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    std::thread::sleep(
        Duration::from_secs(4).saturating_sub(started.elapsed()) + Duration::from_millis(800),
    );
    assert!(!late.exists(), "npm's whole process group was killed");

    installer.npm = dir.path().join("no-npm-here").display().to_string();
    let err = installer.install(&staged).unwrap_err();
    assert!(
        err.contains("npm") && err.contains("is not installed"),
        "{err}"
    );

    // Without modules.json there is nothing to install, and no npm needed.
    let bare = staging(
        &dir.path().join("bare"),
        &[("flows.json".into(), b"[]".to_vec())],
    );
    assert_eq!(installer.install(&bare), Ok(None));
}
