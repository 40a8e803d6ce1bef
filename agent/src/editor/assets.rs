//! The editor's static files as the platform's asset cache knows them: the
//! manifest of `@node-red/editor-client/public` (`docs/protocol.md` §16.7).
//!
//! Node-RED serves its editor's scripts, styles, fonts and images from that
//! folder at the editor's root (`/red/...`, `/vendor/...`, `/types/...`,
//! `/favicon.ico`). They are the same on every device with the same
//! Node-RED version, so the platform keeps one copy per content hash and
//! serves later loads from it. It asks for the manifest with
//! `GET /__tether/assets` on an admitted editor stream ([`MANIFEST_PATH`]);
//! the agent answers that itself, never Node-RED:
//!
//! ```json
//! {"version": "4.1.15", "files": {"/red/red.min.js": {"sha256": "…", "size": 1234}}}
//! ```
//!
//! Only regular files under `red/`, `vendor/` and `types/` (every one a read
//! route of every role, `policy`) and `favicon.ico` are listed; not dot
//! files (Node-RED does not serve them), not symbolic links, not names with
//! characters a URL path would encode. Bounds: at most [`MAX_FILES`] files,
//! none over [`MAX_FILE`], [`MAX_TOTAL`] bytes hashed in all, [`MAX_DEPTH`]
//! folders deep; the walk and the hashing run once, on the blocking pool,
//! and the result is kept for the agent's life. This module only reads
//! files under the folder it is given; it never writes, and never lists a
//! file outside the editor's public folder.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;

/// The path on an editor stream that the agent answers with the manifest.
pub const MANIFEST_PATH: &str = "/__tether/assets";
/// Files listed at most.
pub const MAX_FILES: usize = 4096;
/// Larger files are left out.
pub const MAX_FILE: u64 = 16 * 1024 * 1024;
/// Bytes hashed in all, at most; the walk stops there.
pub const MAX_TOTAL: u64 = 128 * 1024 * 1024;
/// Folders deeper than this are not entered.
pub const MAX_DEPTH: usize = 12;
/// The top-level folders of the public folder that are listed.
const LISTED: &[&str] = &["red", "vendor", "types"];

/// The manifest the agent sends.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Manifest {
    /// The editor client's version (`@node-red/editor-client`'s
    /// `package.json`).
    pub version: String,
    /// URL path (from the editor's root) to the file's hash and size.
    pub files: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Entry {
    /// SHA-256 of the file, lower-case hex.
    pub sha256: String,
    pub size: u64,
}

/// Why no manifest could be made.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("cannot read '{path}': {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("'{0}' has no version")]
    NoVersion(PathBuf),
}

/// The editor client's public folder of the Node-RED that `command` starts
/// (a name in `PATH` or a path, as in `[node_red] command`), if found: the
/// command's real path is `…/node_modules/node-red/red.js`, and the folder
/// is `@node-red/editor-client/public` beside `node-red` or under its own
/// `node_modules`.
pub fn public_dir_of(command: &str) -> Option<PathBuf> {
    let program = crate::node_red::launcher::find_program(command)?;
    let real = std::fs::canonicalize(program).ok()?;
    let package = real.parent()?;
    [
        package.join("node_modules/@node-red/editor-client/public"),
        package.parent()?.join("@node-red/editor-client/public"),
    ]
    .into_iter()
    .find(|dir| dir.join("../package.json").is_file() && dir.is_dir())
}

/// Walks `public` and hashes what it lists. Blocking: call it on the
/// blocking pool.
pub fn manifest(public: &Path) -> Result<Manifest, AssetError> {
    let package = public.join("../package.json");
    let text = read_small(&package, 64 * 1024)?;
    let version = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("version")?.as_str().map(str::to_owned))
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .ok_or_else(|| AssetError::NoVersion(package.clone()))?;
    let mut walk = Walk {
        files: BTreeMap::new(),
        total: 0,
    };
    let favicon = public.join("favicon.ico");
    walk.file(&favicon, "/favicon.ico")?;
    for top in LISTED {
        walk.dir(&public.join(top), &format!("/{top}"), 1)?;
    }
    Ok(Manifest {
        version,
        files: walk.files,
    })
}

struct Walk {
    files: BTreeMap<String, Entry>,
    total: u64,
}

impl Walk {
    fn full(&self) -> bool {
        self.files.len() >= MAX_FILES || self.total >= MAX_TOTAL
    }

    fn dir(&mut self, dir: &Path, url: &str, depth: usize) -> Result<(), AssetError> {
        if depth > MAX_DEPTH || self.full() {
            return Ok(());
        }
        let Ok(meta) = std::fs::symlink_metadata(dir) else {
            return Ok(());
        };
        if !meta.is_dir() {
            return Ok(());
        }
        let read = |source| AssetError::Read {
            path: dir.to_owned(),
            source,
        };
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(read)?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| url_safe(name))
            .collect();
        names.sort();
        for name in names {
            let path = dir.join(&name);
            let url = format!("{url}/{name}");
            let Ok(meta) = std::fs::symlink_metadata(&path) else {
                continue;
            };
            if meta.is_dir() {
                self.dir(&path, &url, depth + 1)?;
            } else {
                self.file(&path, &url)?;
            }
            if self.full() {
                break;
            }
        }
        Ok(())
    }

    fn file(&mut self, path: &Path, url: &str) -> Result<(), AssetError> {
        let Ok(meta) = std::fs::symlink_metadata(path) else {
            return Ok(());
        };
        if !meta.is_file() || meta.len() > MAX_FILE || self.full() {
            return Ok(());
        }
        let read = |source| AssetError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = std::fs::File::open(path).map_err(read)?;
        let mut context = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(read)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            if size > MAX_FILE {
                return Ok(()); // grew while read
            }
            context.update(&buf[..n]);
        }
        self.total += size;
        self.files.insert(
            url.to_owned(),
            Entry {
                sha256: crate::identity::hex(context.finish().as_ref()),
                size,
            },
        );
        Ok(())
    }
}

/// A name that a URL path carries as it is, and that Node-RED serves (no
/// dot files).
fn url_safe(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+@!$&'(),;=".contains(&b))
}

fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>, AssetError> {
    let mut text = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(limit).read_to_end(&mut text))
        .map_err(|source| AssetError::Read {
            path: path.to_owned(),
            source,
        })?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    #[test]
    fn the_manifest_lists_the_served_static_files_with_their_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let client = dir.path().join("editor-client");
        let public = client.join("public");
        write(&client.join("package.json"), br#"{"version":"4.1.15"}"#);
        write(&public.join("favicon.ico"), b"icon");
        write(&public.join("red/red.min.js"), b"abc");
        write(&public.join("vendor/monaco/dist/editor.js"), b"");
        write(&public.join("red/.hidden"), b"x");
        write(&public.join("red/with space.js"), b"x");
        write(&public.join("index.html"), b"not listed");
        write(&public.join("other/file.js"), b"not listed");
        std::os::unix::fs::symlink("/etc/passwd", public.join("red/link.js")).unwrap();
        let manifest = manifest(&public).unwrap();
        assert_eq!(manifest.version, "4.1.15");
        let paths: Vec<&str> = manifest.files.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            [
                "/favicon.ico",
                "/red/red.min.js",
                "/vendor/monaco/dist/editor.js"
            ]
        );
        assert_eq!(
            manifest.files["/red/red.min.js"],
            Entry {
                sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
                size: 3
            }
        );
    }

    #[test]
    fn a_folder_without_a_version_gives_no_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let public = dir.path().join("editor-client/public");
        write(&dir.path().join("editor-client/package.json"), b"{}");
        write(&public.join("red/red.min.js"), b"abc");
        assert!(matches!(manifest(&public), Err(AssetError::NoVersion(_))));
    }
}
