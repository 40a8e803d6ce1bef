//! `tether-mqtt-bench`: the MQTT bridge against a mosquitto bridge, same
//! machine, same brokers, same run (`docs/benchmarks.md`, "MQTT bridge").
//!
//! ```sh
//! cargo build --release -p tether-e2e -p tether-agent --bins
//! target/release/tether-mqtt-bench            # --round-trips 2000 --messages 100000 --pairs 5
//! ```
//!
//! Brokers: mosquitto as the platform's broker (plain for the platform and
//! the measuring clients, mutual TLS for the bridge), and one mosquitto per
//! device side. The anchor is what a user would pick instead: the device's
//! mosquitto bridged to the platform's (`topic tether/other/bridge/# both
//! 1`: its own namespace, as the tether device's, so that neither path's
//! messages reach the other's broker; MQTT 5, mutual TLS). Tether: a release `tetherd` with `[mqtt]` on its own
//! mosquitto, tunnelled to an in-process platform whose broker is the same
//! central mosquitto.
//!
//! Figures: the round trip of a 100-byte QoS 1 message from a device-side
//! client, through the platform's broker (where a client echoes it to the
//! device's inbound topic), back to the device-side client: p50 and p99;
//! the same round trips while a bulk transfer fills the same tunnel (the
//! platform writes as fast as it can to a `tcp:sink` service of the device,
//! a local socket that discards what it reads); and sustained QoS 1
//! throughput from a device-side publisher to a platform-side subscriber,
//! in pairs of runs alternating the two paths (the verdict is on the
//! median of the pairs' ratios), with the CPU of every process per
//! 100,000 messages and `tetherd`'s peak memory; and what
//! `tetherd` writes to storage for a trickle of QoS 1 messages (100 a
//! second), what a gateway's flash sees most of the time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use rumqttc::v5::mqttbytes::QoS;
use tether_e2e::bench::{
    Tetherd, clock_ticks, cpu_secs, free_port, memory, mib, storage_written, verdict,
};
use tether_e2e::mqtt::{Broker, Client, client, tls_files};
use tether_platform::mqtt::{BrokerUrl, MqttBroker, MqttConfig};
use tether_platform::{Platform, PlatformConfig};
use tokio::sync::mpsc;

/// The anchor's device topics: another team than the tether device's
/// (`default`), so that nothing of the anchor's traffic reaches it.
const ANCHOR: &str = "tether/other/bridge";
const BUDGET_P99_MS: f64 = 10.0;
/// Round trip p99 while a bulk transfer fills the same tunnel.
const BUDGET_P99_BULK_MS: f64 = 25.0;
const BUDGET_P50_RATIO: f64 = 1.2;
const BUDGET_RATE: f64 = 20_000.0;
/// A pause before each throughput run: what the last run left to finish
/// (acknowledgements, deletes) does not fall into the next one.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(name = "tether-mqtt-bench")]
struct Args {
    /// Round trips measured per path (after 100 to warm up).
    #[arg(long, default_value_t = 2000)]
    round_trips: usize,
    /// Messages in the throughput run per path.
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    /// Messages in the trickle run (100 a second; 0 skips it).
    #[arg(long, default_value_t = 500)]
    trickle: usize,
    /// Throughput runs of both paths, alternating (the verdict is on the
    /// median ratio).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=50))]
    pairs: u64,
    /// The `tetherd` measured (default: the one beside this program; the
    /// package's static build is `target/x86_64-unknown-linux-musl/release/tetherd`).
    #[arg(long)]
    tetherd: Option<std::path::PathBuf>,
}

/// On the platform's broker: echoes every `.../out/rt` to `.../in/rt` of
/// the same device.
async fn echo(port: u16) -> Result<Client> {
    let mut echo = client(port, "echo", &["tether/+/+/out/rt".into()]).await?;
    let publisher = echo.client.clone();
    let mut rx = std::mem::replace(&mut echo.rx, mpsc::unbounded_channel().1);
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            let topic = String::from_utf8_lossy(&p.topic).replace("/out/rt", "/in/rt");
            let _ = publisher
                .publish(topic, QoS::AtLeastOnce, false, p.payload)
                .await;
        }
    });
    Ok(echo)
}

struct RoundTrips {
    p50: f64,
    p99: f64,
}

async fn round_trips(device_port: u16, prefix: &str, n: usize) -> Result<RoundTrips> {
    let mut c = client(device_port, "rt-client", &[format!("{prefix}/in/rt")]).await?;
    let out = format!("{prefix}/out/rt");
    let payload = Bytes::from(vec![b'x'; 100]);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n + 100 {
        let start = Instant::now();
        c.client
            .publish(&out, QoS::AtLeastOnce, false, payload.clone())
            .await?;
        tokio::time::timeout(Duration::from_secs(10), c.rx.recv())
            .await
            .context("a round trip did not come back within 10 s")?
            .context("the client stopped")?;
        if i >= 100 {
            samples.push(start.elapsed().as_secs_f64() * 1000.0);
        }
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Ok(RoundTrips {
        p50: at(0.50),
        p99: at(0.99),
    })
}

/// Messages a second from a device-side publisher to a platform-side
/// subscriber, `n` QoS 1 messages of 100 bytes.
async fn throughput(device_port: u16, central_port: u16, prefix: &str, n: usize) -> Result<f64> {
    let topic = format!("{prefix}/out/tp");
    let mut sink = client(central_port, "tp-sink", std::slice::from_ref(&topic)).await?;
    let source = client(device_port, "tp-source", &[]).await?;
    let payload = Bytes::from(vec![b'y'; 100]);
    let start = Instant::now();
    let publisher = source.client.clone();
    let send = tokio::spawn(async move {
        for _ in 0..n {
            if publisher
                .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
                .await
                .is_err()
            {
                break;
            }
        }
    });
    for got in 0..n {
        tokio::time::timeout(Duration::from_secs(30), sink.rx.recv())
            .await
            .with_context(|| format!("only {got} of {n} messages arrived"))?
            .context("the sink stopped")?;
    }
    let secs = start.elapsed().as_secs_f64();
    send.await?;
    Ok(n as f64 / secs)
}

/// A trickle, as a gateway's flows publish most of the time: `n` QoS 1
/// messages of 100 bytes, 100 a second, from a device-side publisher to a
/// platform-side subscriber; returns once all arrived.
async fn trickle(device_port: u16, central_port: u16, prefix: &str, n: usize) -> Result<()> {
    let topic = format!("{prefix}/out/trickle");
    let mut sink = client(central_port, "trickle-sink", std::slice::from_ref(&topic)).await?;
    let source = client(device_port, "trickle-source", &[]).await?;
    let payload = Bytes::from(vec![b't'; 100]);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for _ in 0..n {
        tick.tick().await;
        source
            .client
            .publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            .await?;
    }
    for got in 0..n {
        tokio::time::timeout(Duration::from_secs(30), sink.rx.recv())
            .await
            .with_context(|| format!("only {got} of {n} trickled messages arrived"))?
            .context("the sink stopped")?;
    }
    Ok(())
}

/// A throughput run ([`throughput`]) after a pause ([`SETTLE`]), with the
/// CPU of each of `pids` per 100,000 messages over it.
async fn measured(
    ticks: f64,
    pids: &[u32],
    device_port: u16,
    central_port: u16,
    prefix: &str,
    n: usize,
) -> Result<(f64, Vec<f64>)> {
    tokio::time::sleep(SETTLE).await;
    let cpu = Cpu::start(ticks, pids)?;
    let rate = throughput(device_port, central_port, prefix, n).await?;
    Ok((rate, cpu.per_100k(n)?))
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[mid],
        _ => (v[mid - 1] + v[mid]) / 2.0,
    }
}

/// CPU seconds of a set of processes from a start.
struct Cpu {
    ticks: f64,
    pids: Vec<u32>,
    start: Vec<f64>,
}

impl Cpu {
    fn start(ticks: f64, pids: &[u32]) -> Result<Cpu> {
        let start = pids
            .iter()
            .map(|&pid| cpu_secs(pid, ticks))
            .collect::<Result<_>>()?;
        Ok(Cpu {
            ticks,
            pids: pids.to_vec(),
            start,
        })
    }

    /// Each process's CPU seconds since the start, per 100,000 of `messages`.
    fn per_100k(&self, messages: usize) -> Result<Vec<f64>> {
        self.pids
            .iter()
            .zip(&self.start)
            .map(|(&pid, start)| {
                Ok((cpu_secs(pid, self.ticks)? - start) * 100_000.0 / messages as f64)
            })
            .collect()
    }
}

/// A local service that reads and discards everything: the bulk
/// transfer's far end on the device side. Returns its port.
async fn discard_service() -> Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut socket, &mut tokio::io::sink()).await;
            });
        }
    });
    Ok(port)
}

/// The platform writes to the device's `tcp:sink` as fast as the tunnel
/// takes it until `stop`; returns the bytes written and the seconds.
async fn bulk(
    platform: &Platform,
    device: &str,
    stop: tokio::sync::oneshot::Receiver<()>,
) -> Result<tokio::task::JoinHandle<(u64, f64)>> {
    use tokio::io::AsyncWriteExt;
    let mut stream = platform.open_tcp(device, "sink").await?;
    Ok(tokio::spawn(async move {
        let chunk = vec![0u8; 256 * 1024];
        let start = Instant::now();
        let mut written = 0u64;
        let mut stop = stop;
        loop {
            tokio::select! {
                _ = &mut stop => break,
                w = stream.write(&chunk) => match w {
                    Ok(n) => written += n as u64,
                    Err(_) => break,
                },
            }
        }
        (written, start.elapsed().as_secs_f64())
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut args = Args::parse();
    let tetherd = tether_e2e::bench::tetherd(args.tetherd.take())?;
    let ticks = clock_ticks().await;
    // Kept (brokers' configurations and logs) for a look after a run.
    let dir = tempfile::tempdir()?.keep();
    let d = dir.as_path();
    println!("work directory: {}", d.display());
    tls_files(d)?;

    // The platform's broker: plain, and mutual TLS for the bridge.
    let tls_port = free_port()?;
    let central = Broker::mosquitto(
        d,
        "central",
        &format!(
            "listener {tls_port} 127.0.0.1\ncafile {0}/ca.pem\ncertfile {0}/server.pem\nkeyfile {0}/server.key\nrequire_certificate true\n",
            d.display()
        ),
    )
    .await?;
    let _echo = echo(central.port).await?;

    // The anchor: a device mosquitto bridged to it.
    let bridged = Broker::mosquitto(
        d,
        "bridged",
        &format!(
            "connection platform\naddress 127.0.0.1:{tls_port}\nbridge_protocol_version mqttv50\ntopic {ANCHOR}/# both 1\nbridge_cafile {0}/ca.pem\nbridge_certfile {0}/client.pem\nbridge_keyfile {0}/client.key\ncleansession true\n",
            d.display()
        ),
    )
    .await?;

    // Tether: a device mosquitto, tetherd, an in-process platform.
    let local = Broker::mosquitto(d, "local", "").await?;
    let mut config = PlatformConfig::new(d.join("platform"), "127.0.0.1:0".parse()?);
    config.mqtt = MqttConfig {
        broker: MqttBroker::External(BrokerUrl::parse(&format!(
            "mqtt://127.0.0.1:{}",
            central.port
        ))?),
        ..MqttConfig::embedded()
    };
    let platform = Platform::start(config).await?;
    let agent_dir = d.join("device");
    std::fs::create_dir_all(&agent_dir)?;
    let sink = discard_service().await?;
    let agent = Tetherd::start(
        &tetherd,
        &platform,
        &agent_dir,
        &format!(
            "[mqtt]\nbroker = \"127.0.0.1:{}\"\n[[service]]\nname = \"sink\"\ntarget = \"127.0.0.1:{sink}\"\n",
            local.port
        ),
    )
    .await?;
    let team = platform
        .devices()
        .await?
        .into_iter()
        .find(|d| d.id == agent.device)
        .map(|d| d.team)
        .context("the device is not on the platform")?;
    let prefix = format!("tether/{team}/{}", agent.device);
    for _ in 0..200 {
        if platform
            .mqtt_stats(&agent.device)
            .is_some_and(|s| s.stream && s.subscribed)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Give the bridge a moment to connect.
    tokio::time::sleep(Duration::from_secs(1)).await;

    println!("round trip, 100-byte QoS 1, {} each:", args.round_trips);
    let anchor = round_trips(bridged.port, ANCHOR, args.round_trips).await?;
    println!(
        "  mosquitto bridge  p50 {:.3} ms  p99 {:.3} ms",
        anchor.p50, anchor.p99
    );
    let ours = round_trips(local.port, &prefix, args.round_trips).await?;
    println!(
        "  tether            p50 {:.3} ms  p99 {:.3} ms  (p50 {:.2}x the bridge's)",
        ours.p50,
        ours.p99,
        ours.p50 / anchor.p50
    );

    let (stop, stopped) = tokio::sync::oneshot::channel();
    let filler = bulk(&platform, &agent.device, stopped).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let loaded = round_trips(local.port, &prefix, args.round_trips).await?;
    let _ = stop.send(());
    let (bytes, secs) = filler.await?;
    println!(
        "  tether, bulk      p50 {:.3} ms  p99 {:.3} ms  while the platform sent {:.2} Gbit/s to tcp:sink on the same tunnel",
        loaded.p50,
        loaded.p99,
        bytes as f64 * 8.0 / secs / 1e9
    );

    println!(
        "sustained QoS 1, device to platform, {} messages of 100 bytes:",
        args.messages
    );
    let me = std::process::id();
    // Pairs alternate the two paths: the machine's pace drifts between
    // runs (the bridge alone ranges over a quarter), so each pair's ratio
    // compares runs taken side by side, and the verdict is on the median.
    let (mut ratios, mut rates, mut anchor_rates, mut agent_cpu) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let n = args.messages;
    for pair in 1..=args.pairs {
        // Each with the other path's processes too: they should be idle.
        let anchor_pids = [central.pid(), bridged.pid(), me, local.pid(), agent.pid];
        let anchor_run = measured(ticks, &anchor_pids, bridged.port, central.port, ANCHOR, n);
        let ours_pids = [central.pid(), local.pid(), me, agent.pid, bridged.pid()];
        let ours_run = measured(ticks, &ours_pids, local.port, central.port, &prefix, n);
        // Each path goes first in every other pair.
        let ((anchor_rate, anchor_cpu), (rate, ours_cpu)) = if pair % 2 == 1 {
            let anchor = anchor_run.await?;
            (anchor, ours_run.await?)
        } else {
            let ours = ours_run.await?;
            (anchor_run.await?, ours)
        };
        println!(
            "  pair {pair}: mosquitto bridge {anchor_rate:.0} messages/s; CPU-s per 100,000 messages: platform broker {:.2}, device broker {:.2}, clients {:.2}; total {:.2} (meanwhile tether's device broker and tetherd {:.2})",
            anchor_cpu[0],
            anchor_cpu[1],
            anchor_cpu[2],
            anchor_cpu[..3].iter().sum::<f64>(),
            anchor_cpu[3] + anchor_cpu[4],
        );
        println!(
            "  pair {pair}: tether           {rate:.0} messages/s ({:.2}x the bridge's); CPU-s per 100,000 messages: platform broker {:.2}, device broker {:.2}, clients and platform {:.2}, tetherd {:.2}; total {:.2} (meanwhile the bridge's device broker {:.2})",
            rate / anchor_rate,
            ours_cpu[0],
            ours_cpu[1],
            ours_cpu[2],
            ours_cpu[3],
            ours_cpu[..4].iter().sum::<f64>(),
            ours_cpu[4],
        );
        ratios.push(rate / anchor_rate);
        rates.push(rate);
        anchor_rates.push(anchor_rate);
        agent_cpu.push(ours_cpu[3]);
    }
    let mem = memory(agent.pid)?;
    let (ratio, rate, anchor_rate) = (median(&ratios), median(&rates), median(&anchor_rates));
    println!(
        "  median of {} pairs: bridge {anchor_rate:.0} messages/s, tether {rate:.0} messages/s, ratio {ratio:.2}x (from {:.2}x to {:.2}x); tetherd {:.2} CPU-s per 100,000 messages; tetherd peak resident {}",
        args.pairs,
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
        median(&agent_cpu),
        mib(mem.hwm)
    );

    if args.trickle > 0 {
        // What a gateway's flash sees from the bridge most of the time.
        let before = storage_written(agent.pid)?;
        trickle(local.port, central.port, &prefix, args.trickle).await?;
        let written = storage_written(agent.pid)? - before;
        println!(
            "trickle of {} QoS 1 messages at 100/s: tetherd wrote {written} bytes to storage ({:.0} per message)",
            args.trickle,
            written as f64 / args.trickle as f64
        );
    }

    verdict(
        ours.p99 < BUDGET_P99_MS,
        format!(
            "round trip p99 {:.3} ms (budget {BUDGET_P99_MS} ms)",
            ours.p99
        ),
    );
    verdict(
        loaded.p99 < BUDGET_P99_BULK_MS,
        format!(
            "round trip p99 with a bulk transfer on the tunnel {:.3} ms (budget {BUDGET_P99_BULK_MS} ms)",
            loaded.p99
        ),
    );
    verdict(
        ours.p50 <= anchor.p50 * BUDGET_P50_RATIO,
        format!(
            "round trip p50 {:.2}x the mosquitto bridge's (budget {BUDGET_P50_RATIO}x)",
            ours.p50 / anchor.p50
        ),
    );
    verdict(
        ratio >= 1.0 && rate >= BUDGET_RATE,
        format!(
            "QoS 1 throughput {rate:.0}/s, {ratio:.2}x the bridge's (medians of {} pairs; budget: at least the bridge's and {BUDGET_RATE:.0}/s)",
            args.pairs
        ),
    );
    agent.stop(Duration::from_secs(5)).await?;
    Ok(())
}
