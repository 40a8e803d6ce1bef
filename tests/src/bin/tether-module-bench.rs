//! `tether-module-bench`: what installing a snapshot's modules costs, from
//! the registry and from tarballs carried in the snapshot
//! (`docs/benchmarks.md`, "Snapshot modules").
//!
//! ```sh
//! cargo build --release -p tether-e2e --bins
//! target/release/tether-module-bench            # --module node-red-contrib-moment@4.0.0 --rounds 3
//! ```
//!
//! Needs npm and a route to the npm registry (registry.npmjs.org, or
//! `--registry`). Each round installs the module with the agent's own npm
//! runner (`tether_agent::snapshot::modules::Installer`, as a device does
//! for a staged version) into a fresh staging folder:
//! - from the registry with an empty npm cache (a device's first install);
//! - from the registry with a warm cache (the next version pinning the same
//!   modules);
//! - from tarballs (`npm pack` of every package of the installed tree, as
//!   the platform packs them for an air-gapped factory), offline, with an
//!   empty cache and the registry unreachable.
//!
//! It prints each install's time and the medians, the tarballs' total
//! size, and the ratio of the tarball install to the registry install.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use tether_agent::snapshot::modules::{Installer, LIB};

#[derive(Debug, Parser)]
#[command(name = "tether-module-bench")]
struct Args {
    /// The module, `name@exact-version`.
    #[arg(long, default_value = "node-red-contrib-moment@4.0.0")]
    module: String,
    /// Rounds of each install.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The registry.
    #[arg(long, default_value = "https://registry.npmjs.org/")]
    registry: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let (name, version) = args
        .module
        .rsplit_once('@')
        .filter(|(n, _)| !n.is_empty())
        .context("--module must be name@version")?;
    let npm = tether_e2e::npm::npm().map_err(anyhow::Error::msg)?;
    let work = tempfile::tempdir()?;
    let list = serde_json::to_vec(&serde_json::json!({ name: version }))?;
    let installer = |cache: &Path, registry: &str| Installer {
        npm: npm.display().to_string(),
        registry: Some(registry.to_owned()),
        timeout: Duration::from_secs(600),
        cache: cache.to_owned(),
        run_as: None,
    };
    let staging = |label: &str, round: usize, tarballs: &[(String, Vec<u8>)]| -> Result<PathBuf> {
        let dir = work.path().join(format!("{label}-{round}"));
        std::fs::create_dir_all(dir.join("modules"))?;
        std::fs::write(dir.join("modules.json"), &list)?;
        for (file, bytes) in tarballs {
            std::fs::write(dir.join("modules").join(file), bytes)?;
        }
        Ok(dir)
    };
    let time = |installer: &Installer, dir: &Path| -> Result<Duration> {
        let started = Instant::now();
        installer
            .install(dir)
            .map_err(anyhow::Error::msg)?
            .context("nothing was installed")?;
        Ok(started.elapsed())
    };

    println!("module {name}@{version}, {} rounds", args.rounds);
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    let mut offline = Vec::new();
    let mut tarballs = Vec::new();
    for round in 0..args.rounds {
        let cache = work.path().join(format!("cache-{round}"));
        let reg = installer(&cache, &args.registry);
        let dir = staging("cold", round, &[])?;
        cold.push(time(&reg, &dir)?);
        if tarballs.is_empty() {
            tarballs = pack_tree(&npm, &dir.join(LIB).join("node_modules"), work.path())?;
        }
        warm.push(time(&reg, &staging("warm", round, &[])?)?);
        let empty = work.path().join(format!("offline-cache-{round}"));
        std::fs::create_dir_all(&empty)?;
        std::fs::write(empty.join("npmrc"), "fetch-retries=0\n")?;
        let air_gapped = installer(&empty, "http://127.0.0.1:9/");
        offline.push(time(&air_gapped, &staging("offline", round, &tarballs)?)?);
        println!(
            "round {round}: registry, empty cache {:>7.0} ms; registry, warm cache {:>7.0} ms; tarballs, offline {:>7.0} ms",
            ms(cold[round]),
            ms(warm[round]),
            ms(offline[round])
        );
    }
    let bytes: usize = tarballs.iter().map(|(_, b)| b.len()).sum();
    let (cold, warm, offline) = (median(cold), median(warm), median(offline));
    println!(
        "tarballs: {} packages, {:.1} KiB in the snapshot",
        tarballs.len(),
        bytes as f64 / 1024.0
    );
    println!("median: registry, empty cache {:.0} ms", ms(cold));
    println!("median: registry, warm cache  {:.0} ms", ms(warm));
    println!(
        "median: tarballs, offline     {:.0} ms ({:.2}x the empty-cache registry install, {:.2}x the warm one)",
        ms(offline),
        ms(offline) / ms(cold),
        ms(offline) / ms(warm)
    );
    Ok(())
}

/// `npm pack` of every package under `node_modules` (scoped ones too):
/// each tarball's file name and bytes.
fn pack_tree(npm: &Path, node_modules: &Path, work: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let out = work.join("packed");
    std::fs::create_dir_all(&out)?;
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(node_modules)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') {
            continue;
        }
        if name.starts_with('@') {
            for scoped in std::fs::read_dir(&path)? {
                dirs.push(scoped?.path());
            }
        } else {
            dirs.push(path);
        }
    }
    for dir in &dirs {
        // The published tarball of exactly the installed version (`npm
        // pack NAME@VERSION`, as docs/snapshots.md tells operators).
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("package.json"))?)?;
        let spec = format!(
            "{}@{}",
            manifest["name"]
                .as_str()
                .context("a package without a name")?,
            manifest["version"]
                .as_str()
                .context("a package without a version")?
        );
        let status = std::process::Command::new(npm)
            .args([
                "pack",
                "--silent",
                "--ignore-scripts",
                &spec,
                "--pack-destination",
            ])
            .arg(&out)
            .current_dir(&out)
            .env("npm_config_cache", work.join("pack-cache"))
            .env("npm_config_update_notifier", "false")
            .stdout(std::process::Stdio::null())
            .status()?;
        ensure!(status.success(), "npm pack {spec}");
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(&out)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        files.push((name, std::fs::read(&path)?));
    }
    files.sort();
    ensure!(!files.is_empty(), "nothing was packed");
    Ok(files)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}
