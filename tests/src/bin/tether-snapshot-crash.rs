//! Applies snapshots to a snapshot folder the way the agent does, for the
//! crash-consistency test, which kills it with SIGKILL at random moments.
//!
//! - `tether-snapshot-crash apply ROOT VERSION`: opens the folder
//!   (recovering what a kill left; an apply that was being probed is taken
//!   as healthy and committed), stages VERSION (2 MiB in 33 files), switches
//!   to it and commits it.
//! - `tether-snapshot-crash check ROOT`: opens the folder (recovering), and
//!   checks that `current` is whole: every component of its manifest is
//!   there with its length and SHA-256, and no staging folder is left.
//!   Prints `current N` (or `current none`).

use std::process::ExitCode;

use tether_agent::snapshot::{Folder, Recovered, SNAPSHOT_MANIFEST};
use tether_proto::snapshot::{Component, Envelope, FLOWS, MANIFEST_CONTEXT, Manifest, seal};

fn parts(version: u64) -> Vec<(String, Vec<u8>)> {
    let mut parts = vec![(
        FLOWS.to_owned(),
        format!("[{{\"v\":{version}}}]").into_bytes(),
    )];
    for i in 0..32u64 {
        parts.push((
            format!("node_modules/m{i}/index.js"),
            vec![(version + i) as u8; 64 * 1024],
        ));
    }
    parts
}

fn apply(root: &std::path::Path, version: u64) -> Result<(), String> {
    let (mut folder, recovered) = Folder::open(root).map_err(|e| e.to_string())?;
    if let Recovered::Resume { .. } = recovered {
        folder.commit().map_err(|e| e.to_string())?;
    }
    let parts = parts(version);
    let manifest = Manifest {
        format: 1,
        device: "dev_crash".into(),
        version,
        created_at: 0,
        expires_at: u64::MAX,
        components: parts
            .iter()
            .map(|(path, bytes)| Component {
                path: path.clone(),
                length: bytes.len() as u64,
                sha256: tether_proto::audit::to_hex(
                    ring::digest::digest(&ring::digest::SHA256, bytes).as_ref(),
                ),
            })
            .collect(),
    };
    let rng = ring::rand::SystemRandom::new();
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(
        ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|e| e.to_string())?
            .as_ref(),
    )
    .map_err(|e| e.to_string())?;
    let document = serde_json::to_vec(&manifest).map_err(|e| e.to_string())?;
    let envelope = serde_json::to_vec(&seal(MANIFEST_CONTEXT, &document, &[&key]))
        .map_err(|e| e.to_string())?;
    folder
        .stage(&envelope, &manifest, |c| {
            let bytes = parts
                .iter()
                .find(|(p, _)| *p == c.path)
                .map(|p| p.1.clone());
            Ok(std::io::Cursor::new(bytes.unwrap_or_default()))
        })
        .map_err(|e| e.to_string())?;
    folder.switch(version).map_err(|e| e.to_string())?;
    folder.commit().map_err(|e| e.to_string())?;
    println!("committed {version}");
    Ok(())
}

fn check(root: &std::path::Path) -> Result<Option<u64>, String> {
    let (folder, _) = Folder::open(root).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(root).map_err(|e| e.to_string())? {
        let name = entry.map_err(|e| e.to_string())?.file_name();
        if name.to_string_lossy().starts_with("staging-") {
            return Err(format!("{name:?} left after recovery"));
        }
    }
    let Some(version) = folder.current() else {
        return Ok(None);
    };
    let dir = folder.current_dir();
    let wire = std::fs::read(dir.join(SNAPSHOT_MANIFEST)).map_err(|e| format!("manifest: {e}"))?;
    let envelope = Envelope::parse(&wire).map_err(|e| e.to_string())?;
    let manifest: Manifest =
        serde_json::from_slice(&envelope.document().map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    if manifest.version != version {
        return Err(format!(
            "current is {version} but holds the manifest of {}",
            manifest.version
        ));
    }
    for c in &manifest.components {
        let bytes = std::fs::read(dir.join(&c.path)).map_err(|e| format!("{}: {e}", c.path))?;
        tether_proto::snapshot::check_component(c, &bytes).map_err(|e| e.to_string())?;
    }
    Ok(Some(version))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["apply", root, version] => match version.parse() {
            Ok(v) => apply(std::path::Path::new(root), v),
            Err(_) => Err("VERSION is a number".into()),
        },
        ["check", root] => check(std::path::Path::new(root)).map(|v| match v {
            Some(v) => println!("current {v}"),
            None => println!("current none"),
        }),
        _ => Err("usage: tether-snapshot-crash apply ROOT VERSION | check ROOT".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}
