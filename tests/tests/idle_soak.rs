//! Idle gaps longer than every timer of both ends, in real time: the
//! tunnel's keepalive and idle deadline, the heartbeat, the open timeout and
//! the editor grant's lifetime are all shortened, and each gap is longer than
//! all of them. After each gap an engineer's editor request (through the
//! platform's editor origin, the tunnel and `tetherd`), a `connect` stream
//! to a device service and an audit event recorded on the device (shipped
//! on the audit stream that sat idle through the gap) must succeed at once,
//! on the same tunnel: no stream
//! expired before it was sent, no stale grant reused, no reconnect. Before
//! the state machine took the time of each call, the first stream after such
//! a gap failed with "open timed out".

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::{Method, StatusCode};
use tether_agent::editor::EditorTarget;
use tether_agent::{Agent, AgentOptions};
use tether_e2e::web::{Client, editor_host};
use tether_platform::Platform;
use tether_proto::api::Secret;
use tether_proto::grant::Role;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Shorter than the gap: every timer of both ends.
const OPEN_TIMEOUT: Duration = Duration::from_millis(300);
const KEEPALIVE: Duration = Duration::from_millis(400);
const HEARTBEAT: Duration = Duration::from_millis(500);
const IDLE_TIMEOUT: Duration = Duration::from_secs(2);
const GRANT_LIFETIME: Duration = Duration::from_secs(2);
/// The idle gap between rounds.
const GAP: Duration = Duration::from_millis(2600);
const ROUNDS: usize = 4;

/// A TCP echo service on 127.0.0.1.
async fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tcp.split();
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
        }
    });
    addr
}

/// Stands in for the device's Node-RED: answers every request with the
/// path it was asked for.
async fn editor_stand_in() -> SocketAddr {
    http_stand_in(|path| {
        let body = format!("{{\"path\":\"{path}\"}}");
        ("200 OK", "Content-Type: application/json\r\n".into(), body)
    })
    .await
}

async fn platform_with_short_timers(dir: &std::path::Path) -> Platform {
    let mut config = platform_config(&dir.join("platform"), "127.0.0.1:0".parse().unwrap());
    config.tunnel.open_timeout = OPEN_TIMEOUT;
    config.tunnel.keepalive_interval = KEEPALIVE;
    config.tunnel.idle_timeout = IDLE_TIMEOUT;
    config.grant_lifetime = GRANT_LIFETIME;
    Platform::start(config).await.expect("platform starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editor_requests_and_connect_streams_work_after_every_idle_gap() {
    let dir = tempfile::tempdir().unwrap();
    let platform = platform_with_short_timers(dir.path()).await;
    platform
        .add_user("olga", "default", Role::Owner, &Secret::new("pw of olga"))
        .await
        .unwrap();
    let state = dir.path().join("device");
    enrolled(&platform, &state).await;
    let mut config = with_service(agent_config(&state), "echo", echo_service().await);
    config.heartbeat_interval = HEARTBEAT;
    config.tunnel.keepalive_interval = Some(KEEPALIVE);
    config.tunnel.idle_timeout = Some(IDLE_TIMEOUT);
    let options = AgentOptions {
        editor: Some(EditorTarget {
            addr: editor_stand_in().await,
            ..EditorTarget::default()
        }),
    };
    let agent = Agent::start_with(config, options).await.unwrap();
    let device = agent.device_id();
    connected(&agent).await;
    online(&platform, &device).await;

    let client = Client::new(&platform).unwrap();
    let session = client.login("olga", "pw of olga").await.unwrap();
    let editor_cookie = client.editor_cookie(&session, &device).await.unwrap();
    let host = editor_host(&device, platform.local_addr().port());
    // One browser connection kept across the gaps, as a browser keeps one.
    let mut conn = client.connect().await.unwrap();
    let connects = agent.status().borrow().connects;

    for round in 0..ROUNDS {
        if round > 0 {
            tokio::time::sleep(GAP).await;
        }
        let path = format!("/settings?round={round}");
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            client.send(
                &mut conn,
                &host,
                Method::GET,
                &path,
                &[("cookie", &editor_cookie)],
                Default::default(),
            ),
        )
        .await
        .expect("the editor answers within 5 s")
        .unwrap_or_else(|e| panic!("round {round}: the editor connection failed: {e}"));
        assert_eq!(
            answer.status,
            StatusCode::OK,
            "round {round}: {}",
            answer.text
        );
        assert!(
            answer.text.contains(&format!("round={round}")),
            "{}",
            answer.text
        );

        let mut stream =
            tokio::time::timeout(Duration::from_secs(5), platform.open_tcp(&device, "echo"))
                .await
                .expect("the stream opens within 5 s")
                .unwrap_or_else(|e| panic!("round {round}: connect failed: {e}"));
        let message = format!("round {round}");
        stream.write_all(message.as_bytes()).await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = String::new();
        stream.read_to_string(&mut back).await.unwrap();
        assert_eq!(back, message);
        // And the audit stream, idle through the gap, ships again.
        let note = tether_agent::audit::AuditEvent::Other {
            kind: "x_idle".into(),
            actor: tether_proto::audit::Actor {
                kind: tether_proto::audit::ActorKind::Agent,
                name: None,
            },
            subject: format!("round {round}"),
            details: Default::default(),
        };
        let seq = agent.audit().record_durable(note).await.unwrap();
        let query = tether_platform::audit::AuditQuery {
            device: Some(device.clone()),
            kind: Some("x_idle".into()),
            ..Default::default()
        };
        let shipped = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let report = platform.audit(query.clone()).await.unwrap();
                if report.entries.first().is_some_and(|e| e.seq == seq) {
                    break report;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: the audit event was not shipped within 5 s"));
        assert!(
            shipped.devices[0].problems.is_empty(),
            "{:?}",
            shipped.devices[0].problems
        );
    }
    let status = agent.status().borrow().clone();
    assert_eq!(status.connects, connects, "the tunnel never reconnected");
    assert_eq!(status.state, tether_agent::TunnelState::Connected);
    agent.shutdown().await;
    platform.shutdown().await;
}
