//! The MQTT bridge's promise across a crash, with `tetherd` as a process
//! of its own: a message the local broker has handed to the agent is
//! acknowledged there only once it is in the outbox file or the
//! platform's broker has it (decision 26: while the platform keeps up, it
//! is held in memory and not written at all). So killing `tetherd` with
//! SIGKILL in the middle of bursts loses nothing: the local broker (Debian's
//! mosquitto) delivers again what the agent had not acknowledged, and the
//! agent sends what its outbox holds. A burst held longer than a second
//! (a real wait) is in the outbox file, so even the local broker restarting
//! without persistence then loses nothing of it.

mod common;

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use common::mqtt::*;
use common::*;
use tether_e2e::bench::Tetherd;
use tether_e2e::mqtt::Broker;
use tether_platform::Platform;

const BIN: &str = env!("CARGO_BIN_EXE_tether-tetherd");
/// Bursts, each followed by a SIGKILL and a restart.
const KILLS: u32 = 3;
/// Messages per burst.
const BURST: u32 = 1500;

/// SIGKILL, and waits for the process to end.
async fn kill(agent: &mut Tetherd) {
    agent.child.start_kill().unwrap();
    agent.child.wait().await.unwrap();
}

/// Debian's mosquitto started again as `name` (its config in `dir`) on
/// `port`, with none of what it held before.
async fn again(dir: &std::path::Path, name: &str, port: u16) -> Broker {
    let mut command = std::process::Command::new("mosquitto");
    command.arg("-c").arg(dir.join(format!("{name}.conf")));
    Broker::spawn(command, port).await.unwrap()
}

/// The number a test message carries.
fn number(p: &rumqttc::v5::mqttbytes::v5::Publish) -> u32 {
    std::str::from_utf8(&p.payload).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_loses_no_message_the_local_broker_handed_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let central = Broker::mosquitto(d, "central", "").await.unwrap();
    let mut config = platform_with(d, Some(&central));
    let platform = Platform::start(config.clone()).await.unwrap();
    // The test brokers queue up to 200,000 messages for a session while
    // its client is away (mosquitto's default drops past 1,000: that would
    // be the broker's loss, not the agent's).
    let local = Broker::mosquitto(d, "local", "").await.unwrap();
    let agent_dir = d.join("device");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let bin = PathBuf::from(BIN);
    let mut agent = Tetherd::start(
        &bin,
        &platform,
        &agent_dir,
        &format!("[mqtt]\nbroker = \"{}\"\n", local.addr()),
    )
    .await
    .unwrap();
    let device = agent.device.clone();
    bridged(&platform, &device).await;
    let team = platform
        .devices()
        .await
        .unwrap()
        .into_iter()
        .find(|x| x.id == device)
        .unwrap()
        .team;
    let data = format!("tether/{team}/{device}/out/line/count");
    let mut on_platform = client(&central.addr(), "historian", std::slice::from_ref(&data)).await;
    let flows = client(&local.addr(), "flows", &[]).await;

    let total = (KILLS + 1) * BURST;
    for burst in 0..=KILLS {
        for i in burst * BURST..(burst + 1) * BURST {
            flows.send(&data, i.to_string()).await;
        }
        if burst < KILLS {
            // In the middle of the burst's way through the agent: some of
            // it held in memory, some in flight, some still at the broker.
            kill(&mut agent).await;
            agent = Tetherd::run(&bin, &platform, &agent_dir).await.unwrap();
        }
    }

    // Every message arrives; a few may come twice (sent again after a
    // kill), and their first arrivals keep the order they were published
    // in.
    let mut seen = HashSet::new();
    let mut firsts = Vec::new();
    while seen.len() < total as usize {
        let p = on_platform.next_on(&data).await;
        let n = number(&p);
        if seen.insert(n) {
            firsts.push(n);
        }
    }
    assert_eq!(firsts, (0..total).collect::<Vec<_>>());
    // Then with the platform's broker away, so that the platform does not
    // acknowledge and the agent holds a burst in memory without
    // acknowledging it to the local broker; the agent is killed, and the
    // platform restarts too (what it kept for its broker is gone with it).
    // - Killed within the second the agent holds a burst: the local
    //   broker delivers it again to the agent that comes back.
    // - Killed after a real wait past that second: the burst went to the
    //   outbox file and the local broker has had it acknowledged, so the
    //   local broker restarting without persistence loses nothing.
    let mut central = central;
    let mut local = local;
    let mut platform = platform;
    let phases = [
        (Duration::from_millis(300), false),
        (Duration::from_millis(2500), true),
    ];
    for (phase, (wait, restart_local)) in phases.into_iter().enumerate() {
        central.stop();
        let from = total + phase as u32 * 200;
        let burst = from..from + 200;
        for i in burst.clone() {
            flows.send(&data, i.to_string()).await;
        }
        tokio::time::sleep(wait).await;
        kill(&mut agent).await;
        if restart_local {
            local.stop();
            local = again(d, "local", local.port).await;
        }
        config.listen = platform.local_addr();
        platform.shutdown().await;
        central = again(d, "central", central.port).await;
        platform = start_retrying_bind(config.clone()).await;
        agent = Tetherd::run(&bin, &platform, &agent_dir).await.unwrap();
        let mut got = HashSet::new();
        while got.len() < burst.len() {
            let n = number(&on_platform.next_on(&data).await);
            if burst.contains(&n) {
                got.insert(n);
            }
        }
    }

    let figures = eventually("the agent reports its outbox empty", || {
        let figures = platform.mqtt_stats(&device).and_then(|s| s.figures);
        async move { figures.filter(|f| f.outbox_messages == 0) }
    })
    .await;
    assert_eq!(figures.outbox_dropped, 0, "{figures:?}");
    agent.stop(Duration::from_secs(5)).await.unwrap();
}
