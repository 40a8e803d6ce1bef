//! Where the editor's real peers are: Node-RED (`tests/nodered/install.sh`),
//! playwright-core and chromium (`tests/browser/install.sh`), each
//! overridable by an environment variable. Shared by the browser test and
//! the editor benchmark.

use std::path::{Path, PathBuf};

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `$TETHER_CACHE`, or `~/.cache/tether` (`/var/cache/tether` as root, so
/// that a Node-RED started as its own user can run what is there), where
/// the install scripts put things.
pub fn cache() -> PathBuf {
    std::env::var_os("TETHER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            if tether_agent::node_red::user::effective_uid() == Some(0) {
                PathBuf::from("/var/cache/tether")
            } else {
                Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/tether")
            }
        })
}

/// The unprivileged user tests and benchmarks run Node-RED as when they run
/// as root (where the agent refuses to run it as root): `tether-nodered`,
/// created (`useradd --system`) if missing. `None` when not root.
pub fn node_red_user() -> Option<String> {
    if tether_agent::node_red::user::effective_uid() != Some(0) {
        return None;
    }
    let name = "tether-nodered";
    if tether_agent::node_red::user::lookup_in(Path::new("/etc/passwd"), name).is_none() {
        let status = std::process::Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ])
            .status()
            .expect("useradd runs");
        // Another test may have created it at the same moment.
        assert!(
            status.success()
                || tether_agent::node_red::user::lookup_in(Path::new("/etc/passwd"), name)
                    .is_some(),
            "useradd {name} failed"
        );
    }
    Some(name.to_string())
}

/// Lets other users pass through `dir` (mode 0711): a Node-RED running as
/// its own user must reach its user directory inside a test's temporary
/// directory. Nothing in `dir` becomes readable by it.
pub fn traversable(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .expect("chmod the temporary directory");
}

/// A tool: its path, and how to install it when the path does not exist.
#[derive(Clone, Debug)]
pub struct Tool {
    pub path: PathBuf,
    pub install: &'static str,
}

impl Tool {
    fn at(var: &str, default: PathBuf, install: &'static str) -> Tool {
        let path = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
        Tool { path, install }
    }

    /// The path if it exists, else why not ("... is missing (run ...)").
    pub fn find(&self) -> Result<PathBuf, String> {
        if self.path.exists() {
            Ok(self.path.clone())
        } else {
            Err(format!(
                "{} is missing (run `{}`)",
                self.path.display(),
                self.install
            ))
        }
    }
}

/// What a test needs, or `None` after a loud `SKIPPED` line; with `CI` set
/// a missing peer fails the test instead, so CI never passes by skipping.
pub fn required<T>(found: Result<T, String>) -> Option<T> {
    match found {
        Ok(found) => Some(found),
        Err(why) if std::env::var_os("CI").is_some() => {
            panic!("{why} (CI is set: this test may not be skipped)")
        }
        Err(why) => {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "\n!!!!!!!! SKIPPED: {why} !!!!!!!!\n");
            None
        }
    }
}

/// Node-RED's launcher: `$TETHER_NODE_RED` or the install script's cache.
pub fn node_red() -> Tool {
    Tool::at(
        "TETHER_NODE_RED",
        cache().join("node-red/node_modules/.bin/node-red"),
        "bash tests/nodered/install.sh",
    )
}

/// The playwright-core package: `$PLAYWRIGHT_CORE` or the install script's cache.
pub fn playwright_core() -> Tool {
    Tool::at(
        "PLAYWRIGHT_CORE",
        cache().join("browser/node_modules/playwright-core"),
        "bash tests/browser/install.sh",
    )
}

/// The browser: `$CHROMIUM` or Debian's `/usr/bin/chromium`.
pub fn chromium() -> Tool {
    Tool::at(
        "CHROMIUM",
        PathBuf::from("/usr/bin/chromium"),
        "bash tests/browser/install.sh",
    )
}
