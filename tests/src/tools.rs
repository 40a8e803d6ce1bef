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

/// `$TETHER_CACHE`, or `~/.cache/tether`, where the install scripts put things.
pub fn cache() -> PathBuf {
    std::env::var_os("TETHER_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var_os("HOME").unwrap_or_default()).join(".cache/tether")
        })
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
