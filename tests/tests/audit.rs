//! The durable audit trail end to end: events recorded on the device reach
//! the platform in order and exactly once across reconnects, platform
//! restarts, a proxy that cuts the tunnel every ~200 ms and agent processes
//! killed with SIGKILL; the stored chain and its checkpoints verify; and a
//! record altered or removed on the platform's disk is flagged.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tether_agent::Agent;
use tether_agent::audit::AuditEvent;
use tether_platform::audit::{AuditQuery, AuditReport, ChainState};
use tether_platform::client::AdminClient;
use tether_platform::{Platform, PlatformConfig};
use tether_proto::audit::{Actor, ActorKind, Record};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

fn note(subject: String) -> AuditEvent {
    AuditEvent::Other {
        kind: "x_test".into(),
        actor: Actor {
            kind: ActorKind::Agent,
            name: None,
        },
        subject,
        details: serde_json::json!({}),
    }
}

async fn report(platform: &Platform, device: &str) -> AuditReport {
    platform
        .audit(AuditQuery {
            device: Some(device.into()),
            ..Default::default()
        })
        .await
        .unwrap()
}

/// Waits until the platform holds the device's records up to `seq` and a
/// checkpoint covers them.
async fn verified_through(platform: &Platform, device: &str, seq: u64) -> AuditReport {
    eventually(
        "the platform stores and verifies the audit trail",
        || async {
            let report = report(platform, device).await;
            let v = &report.devices[0];
            assert!(v.problems.is_empty(), "{:?}", v.problems);
            (v.state == ChainState::Verified && v.verified_through >= seq).then_some(report)
        },
    )
    .await
}

/// Every stored record of the device, by sequence number.
fn stored(platform: &Platform, device: &str) -> BTreeMap<u64, Record> {
    platform
        .store()
        .audit_records(device, 0)
        .unwrap()
        .into_iter()
        .map(|(seq, body)| (seq, Record::parse(&body).unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_arrive_in_order_and_once_across_platform_restarts_and_the_admin_api_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = platform_config(&dir.path().join("platform"), "127.0.0.1:0".parse().unwrap());
    let mut platform = Platform::start(config.clone()).await.unwrap();
    let config = PlatformConfig {
        listen: platform.local_addr(),
        ..config
    };
    let state = dir.path().join("state");
    let device = enrolled(&platform, &state).await.identity.device_id;
    let agent = Agent::start(agent_config(&state)).await.unwrap();
    connected(&agent).await;
    let audit = agent.audit();
    let mut seqs = Vec::new();
    for round in 0..3 {
        for n in 0..200 {
            let seq = audit
                .record_durable(note(format!("round-{round}/event-{n}")))
                .await
                .unwrap();
            seqs.push(seq);
            if n == 100 && round < 2 {
                // The platform goes away mid-stream and comes back: what
                // was in flight is sent again.
                platform = restart(platform, config.clone()).await;
            }
        }
    }
    let last = *seqs.last().unwrap();
    let report = verified_through(&platform, &device, last).await;
    assert!(report.devices[0].checkpoints >= 1);
    let records = stored(&platform, &device);
    // Exactly once: each subject is stored under the number it was given.
    let mut by_subject: HashMap<String, Vec<u64>> = HashMap::new();
    for (seq, r) in &records {
        by_subject.entry(r.subject.clone()).or_default().push(*seq);
    }
    let mut i = 0;
    for round in 0..3 {
        for n in 0..200 {
            let subject = format!("round-{round}/event-{n}");
            assert_eq!(by_subject[&subject], [seqs[i]], "{subject}");
            i += 1;
        }
    }
    // The chain starts at enrollment and the tunnel's ups and downs are in it.
    assert_eq!(records[&1].kind, "enrolled");
    let kinds: Vec<&str> = records.values().map(|r| r.kind.as_str()).collect();
    assert!(
        kinds.contains(&"tunnel_up") && kinds.contains(&"tunnel_down"),
        "{kinds:?}"
    );
    // The admin API (what `tether-platform audit` prints) gives the same,
    // newest first, filtered.
    let client = AdminClient::from_data_dir(&dir.path().join("platform")).unwrap();
    let query = AuditQuery {
        device: Some(device.clone()),
        kind: Some("x_test".into()),
        limit: Some(10),
        ..Default::default()
    };
    let answer = client.audit(&query).await.unwrap();
    assert_eq!(answer.entries.len(), 10);
    assert_eq!(answer.entries[0].subject, "round-2/event-199");
    assert_eq!(answer.entries[0].seq, last);
    assert_eq!(answer.devices[0].state, ChainState::Verified);
    let text = tether_platform::cli::audit_text(&answer);
    assert!(text.contains("chain verified"), "{text}");
    assert!(text.contains("round-2/event-199"), "{text}");
    // A device that does not exist is a clear error.
    let missing = client
        .audit(&AuditQuery {
            device: Some("dev_00000000000000000000000000000000".into()),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(missing.to_string().contains("no device"), "{missing}");
    // The device's heartbeats carry its queue's figures to the device list.
    let reported = eventually("the device's audit figures in its heartbeat", || async {
        let devices = platform.devices().await.unwrap();
        let audit = devices.into_iter().find(|d| d.id == device)?.audit?;
        (audit.last_seq >= last).then_some(audit)
    })
    .await;
    assert_eq!(reported.error, None);
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_altered_or_removed_on_the_platform_is_flagged() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let device = enrolled(&platform, &state).await.identity.device_id;
    let agent = Agent::start(agent_config(&state)).await.unwrap();
    connected(&agent).await;
    let mut last = 0;
    for n in 0..20 {
        last = agent
            .audit()
            .record_durable(note(format!("event-{n}")))
            .await
            .unwrap();
    }
    verified_through(&platform, &device, last).await;
    agent.shutdown().await;
    let store = platform.store();
    let records = store.audit_records(&device, 0).unwrap();
    let original: HashMap<u64, Vec<u8>> = records.into_iter().collect();
    let problems = |report: AuditReport| {
        let v = report.devices.into_iter().next().unwrap();
        assert_eq!(v.state, ChainState::Broken);
        v.problems
    };
    // Altered: the subject of one event rewritten, its JSON still valid.
    let target = last - 10;
    let text = String::from_utf8(original[&target].clone()).unwrap();
    let forged = text.replace("event-9", "event-X");
    assert_ne!(forged, text);
    store
        .tamper_audit_record(&device, target, Some(forged.as_bytes()))
        .unwrap();
    let found = problems(report(&platform, &device).await);
    assert!(
        found
            .iter()
            .any(|p| p.seq == target + 1 && p.what.contains("prev does not match")),
        "{found:?}"
    );
    store
        .tamper_audit_record(&device, target, Some(&original[&target]))
        .unwrap();
    assert!(
        report(&platform, &device).await.devices[0]
            .problems
            .is_empty()
    );
    // Removed from the middle: a gap no drop marker covers.
    store.tamper_audit_record(&device, target, None).unwrap();
    let found = problems(report(&platform, &device).await);
    assert!(
        found.iter().any(|p| p.what.contains("missing")),
        "{found:?}"
    );
    store
        .tamper_audit_record(&device, target, Some(&original[&target]))
        .unwrap();
    // Removed at the end, where no later record links to it: the
    // device's checkpoint still names it.
    let newest = *original.keys().max().unwrap();
    store.tamper_audit_record(&device, newest, None).unwrap();
    let found = problems(report(&platform, &device).await);
    assert!(
        found
            .iter()
            .any(|p| p.seq == newest && p.what.contains("checkpoint")),
        "{found:?}"
    );
    platform.shutdown().await;
}

/// A TCP proxy on 127.0.0.1 that cuts every connection through it every
/// 150 to 250 ms.
struct CuttingProxy {
    addr: SocketAddr,
    cuts: Arc<Mutex<u64>>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    async fn start(target: SocketAddr) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let live: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let cuts = Arc::new(Mutex::new(0));
        let (accept_live, cut_live, cut_count) = (live.clone(), live, cuts.clone());
        let task = tokio::spawn(async move {
            let accept = async move {
                loop {
                    let Ok((mut inbound, _)) = listener.accept().await else {
                        continue;
                    };
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = TcpStream::connect(target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    accept_live.lock().unwrap().push(task.abort_handle());
                }
            };
            let cut = async move {
                let mut jitter = 0u64;
                loop {
                    jitter = (jitter * 7 + 3) % 101;
                    tokio::time::sleep(Duration::from_millis(150 + jitter)).await;
                    for task in cut_live.lock().unwrap().drain(..) {
                        task.abort();
                    }
                    *cut_count.lock().unwrap() += 1;
                }
            };
            tokio::join!(accept, cut);
        });
        CuttingProxy { addr, cuts, task }
    }
}

/// Points the enrolled identity's tunnel at `proxy` (same host name, so
/// TLS still checks the platform's certificate).
fn tunnel_through(state: &Path, proxy: SocketAddr) {
    let path = state.join("identity.json");
    let mut identity: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let url = identity["tunnel_url"].as_str().unwrap().to_owned();
    let (scheme_host, rest) = url.rsplit_once(':').unwrap();
    let path_part = &rest[rest.find('/').unwrap()..];
    identity["tunnel_url"] = format!("{scheme_host}:{}{path_part}", proxy.port()).into();
    std::fs::write(&path, serde_json::to_vec(&identity).unwrap()).unwrap();
}

/// One run of the producer process: what it confirmed, `(n, seq)`.
async fn produce(
    state: &Path,
    run: u32,
    from: u64,
    count: u64,
    kill_after: Option<u64>,
) -> Vec<(u64, u64)> {
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tether-audit-producer"))
        .arg(state)
        .args([run.to_string(), from.to_string(), count.to_string()])
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut confirmed = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Ok(Some(line)) = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .expect("the producer makes progress")
    {
        if line == "done" {
            break;
        }
        let (n, seq) = line.split_once(' ').unwrap();
        confirmed.push((n.parse().unwrap(), seq.parse().unwrap()));
        if kill_after.is_some_and(|k| confirmed.len() as u64 >= k) {
            break;
        }
    }
    if kill_after.is_some() {
        // SIGKILL: no shutdown, no flush beyond what each commit did.
        child.start_kill().unwrap();
        let _ = child.wait().await;
        // Lines it printed before dying still count.
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some((n, seq)) = line.split_once(' ') {
                confirmed.push((n.parse().unwrap(), seq.parse().unwrap()));
            }
        }
    } else {
        assert_eq!(
            confirmed.len() as u64,
            count,
            "the last run records everything"
        );
        // It keeps running (shipping) until the test is done with it.
        std::mem::forget(lines);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(600)).await;
            drop(child);
        });
    }
    confirmed
}

/// 10,000 events recorded while the tunnel is cut every ~200 ms and the
/// agent process is killed with SIGKILL and started again five times: the
/// platform ends up with every event whose recording returned, exactly
/// once, in order, and the chain and its checkpoints verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_cut_tunnels_and_killed_agents_lose_no_recorded_event() {
    const TOTAL: u64 = 10_000;
    const KILLS: u32 = 5;
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let device = enrolled(&platform, &state).await.identity.device_id;
    let proxy = CuttingProxy::start(platform.local_addr()).await;
    tunnel_through(&state, proxy.addr);
    let started = std::time::Instant::now();
    let mut confirmed: Vec<(u32, u64, u64)> = Vec::new();
    let mut next = 0u64;
    let per_run = TOTAL / u64::from(KILLS + 1);
    for run in 0..=KILLS {
        let (count, kill_after) = if run < KILLS {
            (TOTAL - next, Some(per_run))
        } else {
            (TOTAL - next, None)
        };
        let got = produce(&state, run, next, count, kill_after).await;
        eprintln!(
            "run {run}: {} events confirmed before {}",
            got.len(),
            if run < KILLS { "SIGKILL" } else { "the end" }
        );
        next = got.last().map_or(next, |(n, _)| n + 1);
        confirmed.extend(got.into_iter().map(|(n, seq)| (run, n, seq)));
    }
    assert_eq!(next, TOTAL);
    let last_seq = confirmed.last().unwrap().2;
    let report = verified_through(&platform, &device, last_seq).await;
    let cuts = *proxy.cuts.lock().unwrap();
    eprintln!(
        "chaos: {} events in {:.1} s, {cuts} tunnel cuts, {KILLS} SIGKILLs; platform holds {} records, {} checkpoints",
        confirmed.len(),
        started.elapsed().as_secs_f64(),
        report.devices[0].records,
        report.devices[0].checkpoints,
    );
    assert!(cuts >= 10, "the proxy cut the tunnel {cuts} times");
    // In order: sequence numbers grow with the order of recording, across
    // runs.
    assert!(
        confirmed.windows(2).all(|w| w[0].2 < w[1].2),
        "sequence numbers only grow"
    );
    // Exactly once, under the number the producer was told.
    let records = stored(&platform, &device);
    let mut by_subject: HashMap<&str, Vec<u64>> = HashMap::new();
    for (seq, r) in &records {
        by_subject.entry(r.subject.as_str()).or_default().push(*seq);
    }
    for (run, n, seq) in &confirmed {
        let subject = format!("run-{run}/event-{n}");
        assert_eq!(
            by_subject.get(subject.as_str()).map(Vec::as_slice),
            Some(&[*seq][..]),
            "{subject}"
        );
    }
    // Nothing was dropped: the queue never came near its bound.
    assert_eq!(report.devices[0].dropped, 0);
    proxy.task.abort();
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_page_shows_the_teams_events_escaped_filtered_and_the_chain_state() {
    use tether_e2e::web::Client;
    use tether_proto::api::Secret;
    use tether_proto::grant::Role;
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    for (user, team) in [("vic", "default"), ("eve", "other")] {
        platform
            .add_user(
                user,
                team,
                Role::Viewer,
                &Secret::new(format!("pw of {user}")),
            )
            .await
            .unwrap();
    }
    let state = dir.path().join("state");
    let device = enrolled(&platform, &state).await.identity.device_id;
    let agent = Agent::start(agent_config(&state)).await.unwrap();
    connected(&agent).await;
    let last = agent
        .audit()
        .record_durable(note("<script>alert(1)</script>".into()))
        .await
        .unwrap();
    verified_through(&platform, &device, last).await;
    let client = Client::new(&platform).unwrap();
    let page = |user: &'static str, path: &'static str| {
        let client = client.clone();
        async move {
            let session = client.login(user, &format!("pw of {user}")).await.unwrap();
            let mut conn = client.connect().await.unwrap();
            let host = client.host.clone();
            client
                .send(
                    &mut conn,
                    &host,
                    http::Method::GET,
                    path,
                    &[("cookie", &session)],
                    bytes::Bytes::new(),
                )
                .await
                .unwrap()
        }
    };
    let answer = page("vic", "/audit").await;
    assert_eq!(answer.status, http::StatusCode::OK);
    assert!(answer.text.contains(&device), "{}", answer.text);
    assert!(answer.text.contains("verified"), "{}", answer.text);
    assert!(
        answer
            .text
            .contains("&lt;script&gt;alert(1)&lt;/script&gt;")
    );
    assert!(!answer.text.contains("<script>alert"));
    assert!(answer.text.contains("enrolled"));
    let filtered = page("vic", "/audit?type=enrolled").await;
    assert!(filtered.text.contains("enrolled"));
    assert!(
        !filtered.text.contains("alert(1)"),
        "the filter keeps only that type"
    );
    // Another team's user sees none of it.
    let other = page("eve", "/audit").await;
    assert_eq!(other.status, http::StatusCode::OK);
    assert!(!other.text.contains(&device));
    // Without a session: to the login page.
    let mut conn = client.connect().await.unwrap();
    let host = client.host.clone();
    let anonymous = client
        .send(
            &mut conn,
            &host,
            http::Method::GET,
            "/audit",
            &[],
            bytes::Bytes::new(),
        )
        .await
        .unwrap();
    assert_eq!(anonymous.status, http::StatusCode::SEE_OTHER);
    agent.shutdown().await;
    platform.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_enrolled_again_starts_its_own_trail_and_sets_the_old_one_aside() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let first = enrolled(&platform, &state).await.identity.device_id;
    let agent = Agent::start(agent_config(&state)).await.unwrap();
    connected(&agent).await;
    let last = agent
        .audit()
        .record_durable(note("first identity".into()))
        .await
        .unwrap();
    verified_through(&platform, &first, last).await;
    agent.shutdown().await;
    // Enrolled again, over the old identity.
    let mut options = enroll_options(&platform, token(&platform).await, &state);
    options.force = true;
    let second = tether_agent::enroll::enroll(&options)
        .await
        .unwrap()
        .identity
        .device_id;
    assert_ne!(first, second);
    let agent = Agent::start(agent_config(&state)).await.unwrap();
    connected(&agent).await;
    let last = agent
        .audit()
        .record_durable(note("second identity".into()))
        .await
        .unwrap();
    let report = verified_through(&platform, &second, last).await;
    let records = stored(&platform, &second);
    assert_eq!(records[&1].kind, "enrolled", "a new chain from 1");
    assert_eq!(records[&1].subject, second);
    assert!(
        records.values().all(|r| r.subject != "first identity"),
        "{report:?}"
    );
    assert!(state.join(format!("audit.redb.{first}")).exists());
    agent.shutdown().await;
    platform.shutdown().await;
}
