//! The editor asset cache: Node-RED's editor files, kept once per
//! (Node-RED version, SHA-256) and served to every later editor load without
//! crossing the device link (`docs/protocol.md` §16.7).
//!
//! A device announces, on request (`GET /__tether/assets` on an editor
//! stream), its editor client's version and the hash and size of each file
//! under `/red/`, `/vendor/`, `/types/` and `/favicon.ico`: the
//! [`Manifest`], kept per tunnel (device and tunnel generation). A `GET` of
//! an announced path is served from the cache when the entry is there.
//! Otherwise the file is fetched from the device once (gzip accepted),
//! decoded, and its SHA-256 and size checked against the announcement: a
//! match is stored (the identity bytes and, when the device sent gzip, those
//! too); a mismatch is never stored, and the browser gets the device's
//! answer as the proxy would have passed it on.
//!
//! Answers from the cache carry `ETag: "<sha256>"` and `Cache-Control:
//! no-cache` (the browser revalidates; a matching `If-None-Match` gets 304
//! from the platform without touching the device), `Vary: Accept-Encoding`
//! and the gzip form to a browser that accepts it.
//!
//! Trust: the cache is a boundary between devices. It serves bytes to a
//! device's origin only under that device's own announcement, and only
//! bytes whose SHA-256 is the announced one, so no device can put content
//! into another device's editor, and a device's engineers get exactly what
//! their device said it has. It is consulted only after every check the
//! proxy makes (editor cookie, session, team, revocation, live tunnel), and
//! only for paths every role may read (`docs/protocol.md` §16.3). It never
//! stores an answer to anything but a `GET` of an announced path, never an
//! answer other than a `200`, with `Set-Cookie`, or with a body that does
//! not hash to the announcement; never `/settings`, `/flows`, `/nodes`,
//! `/credentials`, `/comms`, `/locales` or anything user-specific (none is
//! under the announced folders, and an announcement of any other path is
//! refused whole).
//!
//! Bounds: [`MAX_BYTES`] (or the configured limit) of stored bodies, least
//! recently used evicted first; a manifest of at most [`MAX_FILES`] files
//! and [`MAX_MANIFEST`] bytes; at most [`MAX_FILLS`] files fetched to fill
//! at once (another waits up to [`FILL_WAIT`] for its turn, then is proxied
//! as usual, uncached), each read up to its
//! announced size (at most [`MAX_FILE`]); manifests of at most
//! [`MAX_TUNNELS`] tunnels. In memory only: a restarted platform starts
//! empty.

use std::collections::HashMap;
use std::io::Read as _;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::Deserialize;
use tokio::sync::{OnceCell, Semaphore};

/// The path a device answers with its manifest.
pub const MANIFEST_PATH: &str = "/__tether/assets";
/// Default bound of stored bodies (identity and gzip forms together).
pub const MAX_BYTES: usize = 256 * 1024 * 1024;
/// Files in one manifest, at most.
pub const MAX_FILES: usize = 4096;
/// A manifest's JSON, at most.
pub const MAX_MANIFEST: usize = 1024 * 1024;
/// Largest file cached.
pub const MAX_FILE: u64 = 16 * 1024 * 1024;
/// Files fetched from devices to fill the cache at once.
pub const MAX_FILLS: usize = 8;
/// How long a file waits for a fill's turn before it is proxied uncached.
/// A browser asks for at most six files at once per origin, and the device
/// link is the bottleneck anyway: waiting costs little, and a file proxied
/// uncached would cross the link again on the next load.
pub const FILL_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Tunnels whose manifests are kept.
pub const MAX_TUNNELS: usize = 1024;

/// What a device announces.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub version: String,
    pub files: HashMap<String, Announced>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Announced {
    pub sha256: String,
    pub size: u64,
}

/// Why a manifest is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("the manifest is not JSON of the expected shape")]
    Shape,
    #[error("the manifest's version is not 1 to 64 characters of [A-Za-z0-9.+-]")]
    Version,
    #[error("the manifest lists more than {MAX_FILES} files")]
    TooMany,
    #[error("the manifest lists a path outside the editor's static folders")]
    Path,
    #[error("the manifest has a hash that is not 64 lower-case hex digits")]
    Hash,
    #[error("the manifest lists a file larger than {MAX_FILE} bytes")]
    Size,
}

impl Manifest {
    /// Parses and checks a device's manifest.
    pub fn parse(json: &[u8]) -> Result<Manifest, ManifestError> {
        let manifest: Manifest = serde_json::from_slice(json).map_err(|_| ManifestError::Shape)?;
        let version_ok = (1..=64).contains(&manifest.version.len())
            && manifest
                .version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".+-".contains(&b));
        if !version_ok {
            return Err(ManifestError::Version);
        }
        if manifest.files.len() > MAX_FILES {
            return Err(ManifestError::TooMany);
        }
        for (path, file) in &manifest.files {
            if !cacheable_path(path) {
                return Err(ManifestError::Path);
            }
            let hex = file.sha256.len() == 64
                && file
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex {
                return Err(ManifestError::Hash);
            }
            if file.size > MAX_FILE {
                return Err(ManifestError::Size);
            }
        }
        Ok(manifest)
    }
}

/// True for a path the cache may hold: under `/red/`, `/vendor/` or
/// `/types/`, or `/favicon.ico`, with no empty, `.` or `..` segment and no
/// character a URL would encode. Every such `GET` is a read route of every
/// role (`docs/protocol.md` §16.3).
pub fn cacheable_path(path: &str) -> bool {
    if path == "/favicon.ico" {
        return true;
    }
    let Some(rest) = ["/red/", "/vendor/", "/types/"]
        .iter()
        .find_map(|top| path.strip_prefix(top))
    else {
        return false;
    };
    rest.split('/').all(|segment| {
        !segment.is_empty()
            && !segment.starts_with('.')
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._~+@!$&'(),;=".contains(&b))
    })
}

/// One stored file.
#[derive(Debug)]
pub struct Asset {
    pub sha256: String,
    pub content_type: Option<HeaderValue>,
    pub identity: Bytes,
    pub gzip: Option<Bytes>,
}

impl Asset {
    fn cost(&self) -> usize {
        self.identity.len() + self.gzip.as_ref().map_or(0, Bytes::len)
    }

    /// `"<sha256>"`.
    pub fn etag(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("\"{}\"", self.sha256))
            .unwrap_or_else(|_| HeaderValue::from_static("\"\""))
    }

    /// True when `If-None-Match` in `headers` matches this file.
    pub fn not_modified(&self, headers: &HeaderMap) -> bool {
        let etag = format!("\"{}\"", self.sha256);
        headers
            .get_all(header::IF_NONE_MATCH)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|tag| tag.trim().trim_start_matches("W/"))
            .any(|tag| tag == "*" || tag == etag)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    version: String,
    sha256: String,
}

#[derive(Debug)]
struct Stored {
    asset: Arc<Asset>,
    last_used: u64,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<Key, Stored>,
    bytes: usize,
    tick: u64,
}

/// A tunnel's manifest, fetched once: `None` inside when the device
/// announces none.
type ManifestCell = Arc<OnceCell<Option<Arc<Manifest>>>>;

/// The platform's editor asset cache.
#[derive(Debug)]
pub struct AssetCache {
    limit: usize,
    entries: Mutex<Entries>,
    manifests: Mutex<HashMap<(String, u64), ManifestCell>>,
    fills: Arc<Semaphore>,
}

impl AssetCache {
    /// A cache that holds at most `limit` bytes of bodies.
    pub fn new(limit: usize) -> AssetCache {
        AssetCache {
            limit,
            entries: Mutex::default(),
            manifests: Mutex::default(),
            fills: Arc::new(Semaphore::new(MAX_FILLS)),
        }
    }

    /// Drops every stored file and manifest.
    pub fn clear(&self) {
        *self.entries.lock().unwrap_or_else(PoisonError::into_inner) = Entries::default();
        self.manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Bytes stored and files stored.
    pub fn usage(&self) -> (usize, usize) {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        (entries.bytes, entries.map.len())
    }

    /// The cell of the manifest of `device`'s tunnel `generation`.
    pub fn manifest_cell(&self, device: &str, generation: u64) -> ManifestCell {
        let mut manifests = self
            .manifests
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let key = (device.to_owned(), generation);
        if !manifests.contains_key(&key) {
            // Older generations of this device are of no more use.
            manifests.retain(|(d, _), _| d != device);
            if manifests.len() >= MAX_TUNNELS {
                manifests.clear();
            }
        }
        manifests.entry(key).or_default().clone()
    }

    /// The stored file for `version` and `sha256`, marked as used.
    pub fn get(&self, version: &str, sha256: &str) -> Option<Arc<Asset>> {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.tick += 1;
        let tick = entries.tick;
        let key = Key {
            version: version.to_owned(),
            sha256: sha256.to_owned(),
        };
        let stored = entries.map.get_mut(&key)?;
        stored.last_used = tick;
        Some(stored.asset.clone())
    }

    /// Stores `asset` (already checked against the announcement), evicting
    /// the least recently used files beyond the limit.
    pub fn insert(&self, version: &str, asset: Asset) -> Arc<Asset> {
        let asset = Arc::new(asset);
        let cost = asset.cost();
        if cost > self.limit {
            return asset;
        }
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.tick += 1;
        let key = Key {
            version: version.to_owned(),
            sha256: asset.sha256.clone(),
        };
        let stored = Stored {
            asset: asset.clone(),
            last_used: entries.tick,
        };
        if let Some(old) = entries.map.insert(key, stored) {
            entries.bytes -= old.asset.cost();
        }
        entries.bytes += cost;
        while entries.bytes > self.limit {
            let Some(oldest) = entries
                .map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(gone) = entries.map.remove(&oldest) {
                entries.bytes -= gone.asset.cost();
            }
        }
        asset
    }

    /// A permit to fetch one file to fill the cache, once one is free,
    /// waiting at most [`FILL_WAIT`].
    pub async fn fill_permit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        tokio::time::timeout(FILL_WAIT, self.fills.clone().acquire_owned())
            .await
            .ok()?
            .ok()
    }
}

/// A body as the device sent it, read whole: at most `limit` bytes, else
/// `None` (with what was read and the rest, to pass on as it is).
#[derive(Debug)]
pub enum ReadBody {
    Whole(Bytes),
    Over(Vec<Bytes>, Incoming),
}

/// Reads `body` up to `limit` bytes.
pub async fn read_body(mut body: Incoming, limit: usize) -> Result<ReadBody, hyper::Error> {
    let mut chunks = Vec::new();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        total += data.len();
        chunks.push(data);
        if total > limit {
            return Ok(ReadBody::Over(chunks, body));
        }
    }
    Ok(ReadBody::Whole(chunks.concat().into()))
}

/// The largest gzip form of a file of `size` bytes worth reading (stored
/// blocks cost about 5 bytes per 64 KiB, plus header and trailer).
pub fn gzip_limit(size: u64) -> usize {
    usize::try_from(size + size / 1024 + 1024).unwrap_or(usize::MAX)
}

/// Decodes `body` (gzip when `gzip`) and checks it is `announced`: the
/// decoded bytes if so. Blocking (decoding and hashing up to
/// [`MAX_FILE`]): call it on the blocking pool.
pub fn verify(body: &[u8], gzip: bool, announced: &Announced) -> Option<Bytes> {
    let identity: Bytes = if gzip {
        let mut decoded = Vec::new();
        let decoder = flate2::read::GzDecoder::new(body);
        decoder
            .take(announced.size + 1)
            .read_to_end(&mut decoded)
            .ok()?;
        decoded.into()
    } else {
        Bytes::copy_from_slice(body)
    };
    if identity.len() as u64 != announced.size {
        return None;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &identity);
    (tether_proto::hex::encode(digest.as_ref()) == announced.sha256).then_some(identity)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asset(sha: char, len: usize) -> Asset {
        Asset {
            sha256: sha.to_string().repeat(64),
            content_type: None,
            identity: Bytes::from(vec![0; len]),
            gzip: None,
        }
    }

    #[test]
    fn only_static_editor_paths_are_cacheable() {
        for (path, ok) in [
            ("/red/red.min.js", true),
            ("/vendor/monaco/dist/editor.js", true),
            ("/types/node/globals.d.ts", true),
            ("/favicon.ico", true),
            ("/settings", false),
            ("/flows", false),
            ("/nodes", false),
            ("/locales/editor", false),
            ("/comms", false),
            ("/credentials/x/y", false),
            ("/red/", false),
            ("/red//x.js", false),
            ("/red/../settings", false),
            ("/red/./x.js", false),
            ("/red/.hidden", false),
            ("/red/a%2e.js", false),
            ("/RED/red.min.js", false),
        ] {
            assert_eq!(cacheable_path(path), ok, "{path}");
        }
    }

    #[test]
    fn a_manifest_with_anything_but_static_files_is_refused_whole() {
        let hash = "a".repeat(64);
        let good = format!(
            r#"{{"version":"4.1.15","files":{{"/red/a.js":{{"sha256":"{hash}","size":3}}}}}}"#
        );
        assert_eq!(Manifest::parse(good.as_bytes()).unwrap().files.len(), 1);
        for (json, error) in [
            (good.replace("/red/a.js", "/settings"), ManifestError::Path),
            (good.replace("/red/a.js", "/flows"), ManifestError::Path),
            (good.replace(&hash, "ABC"), ManifestError::Hash),
            (good.replace(&hash, &"A".repeat(64)), ManifestError::Hash),
            (good.replace("4.1.15", "4 1"), ManifestError::Version),
            (
                good.replace("\"size\":3", "\"size\":99999999999"),
                ManifestError::Size,
            ),
            ("[]".to_string(), ManifestError::Shape),
        ] {
            assert_eq!(
                Manifest::parse(json.as_bytes()).unwrap_err(),
                error,
                "{json}"
            );
        }
    }

    #[test]
    fn the_least_recently_used_files_go_beyond_the_limit() {
        let cache = AssetCache::new(250);
        cache.insert("4", asset('a', 100));
        cache.insert("4", asset('b', 100));
        assert!(cache.get("4", &"a".repeat(64)).is_some());
        cache.insert("4", asset('c', 100));
        assert!(cache.get("4", &"a".repeat(64)).is_some());
        assert!(
            cache.get("4", &"b".repeat(64)).is_none(),
            "b was the oldest"
        );
        assert!(cache.get("4", &"c".repeat(64)).is_some());
        assert_eq!(cache.usage(), (200, 2));
        // Another version's file of the same hash is another entry.
        assert!(cache.get("3", &"a".repeat(64)).is_none());
        // Larger than the whole cache: served, not stored.
        cache.insert("4", asset('d', 300));
        assert_eq!(cache.usage(), (200, 2));
    }

    #[test]
    fn only_the_announced_bytes_pass() {
        let body = b"abc";
        let announced = Announced {
            sha256: "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad".into(),
            size: 3,
        };
        assert_eq!(verify(body, false, &announced).unwrap(), &body[..]);
        assert!(verify(b"abd", false, &announced).is_none());
        assert!(verify(b"abcd", false, &announced).is_none());
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        std::io::Write::write_all(&mut gz, body).unwrap();
        let gz = gz.finish().unwrap();
        assert_eq!(verify(&gz, true, &announced).unwrap(), &body[..]);
        assert!(verify(body, true, &announced).is_none(), "not gzip");
    }

    #[test]
    fn if_none_match_matches_the_hash() {
        let a = asset('a', 1);
        let mut headers = HeaderMap::new();
        assert!(!a.not_modified(&headers));
        headers.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"x\", W/\"{}\"", "a".repeat(64))).unwrap(),
        );
        assert!(a.not_modified(&headers));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"x\""));
        assert!(!a.not_modified(&headers));
    }
}
