//! `tether-cross-smoke`: an ARM `tetherd` under qemu against the x86
//! reference platform on 127.0.0.1 (`cross/README.md`). The binary, run
//! through `--runner` (`qemu-aarch64`, say), enrolls with a fresh token,
//! brings its tunnel up, and carries a `tcp` stream to a local echo service
//! byte for byte (4 MiB each way, SHA-256 compared). Prints its resident
//! memory after a few idle seconds (qemu's, so emulator included: a figure,
//! not a budget) and exits 1 on any failure.
//!
//! ```sh
//! bash cross/build.sh aarch64-unknown-linux-musl
//! cargo run --release -p tether-e2e --bin tether-cross-smoke -- \
//!     --tetherd target/aarch64-unknown-linux-musl/release/tetherd --runner qemu-aarch64
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use ring::digest::{Context as Sha, SHA256};
use tether_e2e::bench::{Tetherd, memory, mib};
use tether_platform::{Platform, PlatformConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes sent each way.
const BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, Parser)]
#[command(name = "tether-cross-smoke")]
struct Args {
    /// The tetherd binary to run.
    #[arg(long)]
    tetherd: PathBuf,
    /// What runs it (`qemu-aarch64`, `qemu-arm -L /usr/arm-linux-gnueabihf`);
    /// none: run it directly.
    #[arg(long)]
    runner: Option<String>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let binary = wrapped(&args, dir.path())?;
    let version = tokio::process::Command::new(&binary)
        .arg("--version")
        .output()
        .await?;
    ensure!(version.status.success(), "tetherd --version failed");
    println!(
        "tetherd: {} ({})",
        String::from_utf8_lossy(&version.stdout).trim(),
        args.runner.as_deref().unwrap_or("native")
    );

    let platform = Platform::start(PlatformConfig::new(
        dir.path().join("platform"),
        "127.0.0.1:0".parse()?,
    ))
    .await?;
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let echo_addr = echo.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.into_split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });

    let started = Instant::now();
    let agent = Tetherd::start(
        &binary,
        &platform,
        dir.path(),
        &format!("[[service]]\nname = \"echo\"\ntarget = \"{echo_addr}\"\n"),
    )
    .await
    .context("enroll and connect")?;
    println!(
        "enrolled and connected as {} in {:.1} s",
        agent.device,
        started.elapsed().as_secs_f64()
    );

    let stream = platform.open_tcp(&agent.device, "echo").await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let payload: Vec<u8> = (0..BYTES).map(|i| (i * 7 + i / 4093) as u8).collect();
    let sent = digest(&payload);
    let started = Instant::now();
    let writer = tokio::spawn(async move {
        wr.write_all(&payload).await?;
        wr.shutdown().await?;
        Ok::<_, std::io::Error>(())
    });
    let mut back = Vec::with_capacity(BYTES);
    tokio::time::timeout(Duration::from_secs(120), rd.read_to_end(&mut back))
        .await
        .context("the echo did not finish within 120 s")??;
    writer.await??;
    ensure!(
        back.len() == BYTES,
        "{} bytes came back, not {BYTES}",
        back.len()
    );
    ensure!(digest(&back) == sent, "the bytes that came back differ");
    println!(
        "tcp stream: {} MiB each way byte for byte in {:.2} s",
        BYTES / (1024 * 1024),
        started.elapsed().as_secs_f64()
    );

    tokio::time::sleep(Duration::from_secs(5)).await;
    let m = memory(agent.pid)?;
    println!(
        "idle resident memory {} (peak {}), under the runner",
        mib(m.rss),
        mib(m.hwm)
    );
    agent.stop(Duration::from_secs(10)).await?;
    platform.shutdown().await;
    println!("PASS cross smoke");
    Ok(())
}

/// The binary as one executable path: a script that starts it through the
/// runner, if there is one.
fn wrapped(args: &Args, dir: &Path) -> Result<PathBuf> {
    let binary = std::fs::canonicalize(&args.tetherd)
        .with_context(|| format!("{} is missing", args.tetherd.display()))?;
    let Some(runner) = &args.runner else {
        return Ok(binary);
    };
    let script = dir.join("tetherd");
    std::fs::write(
        &script,
        format!("#!/bin/sh\nexec {runner} {} \"$@\"\n", binary.display()),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(script)
}

fn digest(bytes: &[u8]) -> Vec<u8> {
    let mut sha = Sha::new(&SHA256);
    sha.update(bytes);
    sha.finish().as_ref().to_vec()
}
