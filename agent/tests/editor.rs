//! Editor streams end to end: the real platform and agent over TLS on
//! 127.0.0.1. The test plays the platform's editor proxy: it opens `editor`
//! streams on the platform's end of the device's tunnel, with grants signed
//! by the platform's grant key (read from its data directory), and speaks
//! HTTP/1.1 through them with a hyper client. A local hyper server stands
//! in for Node-RED and records what reaches it; a tokio-tungstenite server
//! stands in for its `/comms` WebSocket.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use ring::signature::Ed25519KeyPair;
use tether_agent::audit::AuditEvent;
use tether_agent::config::Config;
use tether_agent::editor::{EditorTarget, TokenSource};
use tether_agent::{Agent, AgentOptions, TunnelState};
use tether_platform::Platform;
use tether_proto::grant::{GRANT_METADATA_KEY, Grant, GrantError, Role};
use tether_proto::tokio_io::TunnelStream;
use tether_proto::{Service, ServiceHeader};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// One request as the stand-in Node-RED saw it.
#[derive(Clone, Debug)]
struct Seen {
    method: Method,
    /// Path and query.
    uri: String,
    headers: HeaderMap,
}

/// The stand-in Node-RED: records every request; `POST .../flows` answers
/// `{"rev":"rev-42"}` (or, for the body `big`, 80 KiB of JSON),
/// `.../slow` never answers, `.../big` sends 4 MiB, any other request gets
/// its body's length back.
struct NodeRed {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    server: tokio::task::JoinHandle<()>,
}

impl NodeRed {
    async fn start() -> NodeRed {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let server = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let record = record.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let record = record.clone();
                        async move { Ok::<_, std::convert::Infallible>(answer(record, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        NodeRed { addr, seen, server }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Stops listening: new connections are refused.
    async fn stop(self) {
        self.server.abort();
        let _ = self.server.await;
    }
}

async fn answer(record: Arc<Mutex<Vec<Seen>>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    record.lock().unwrap().push(Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
    });
    let path = req.uri().path().to_owned();
    let last = path.rsplit('/').next().unwrap_or_default();
    let body = match (req.method().as_str(), last) {
        ("POST", "flows") => deploy_answer(req.into_body().collect().await.unwrap().to_bytes()),
        (_, "slow") => std::future::pending().await,
        (_, "big") => Bytes::from(vec![7u8; 4 * 1024 * 1024]),
        _ => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Bytes::from(format!("got {} bytes", body.len()))
        }
    };
    Response::new(Full::new(body))
}

fn deploy_answer(request: Bytes) -> Bytes {
    if request == "big" {
        let pad = "x".repeat(80 * 1024);
        return Bytes::from(format!(r#"{{"rev":"rev-big","pad":"{pad}"}}"#));
    }
    Bytes::from_static(br#"{"rev":"rev-42"}"#)
}

/// A platform, an enrolled agent whose editor proxies to `target`, and the
/// platform's grant key.
struct Rig {
    dir: tempfile::TempDir,
    platform: Platform,
    agent: Agent,
    device: String,
    key: Ed25519KeyPair,
}

/// The token the test's token source mints: user and permissions, readable.
fn test_token(user: &str, permissions: &[&str]) -> String {
    format!("{user}|{}", permissions.join(","))
}

fn target(addr: SocketAddr) -> EditorTarget {
    let auth: Arc<dyn TokenSource> = Arc::new(test_token);
    EditorTarget {
        addr,
        auth: Some(auth),
        ..EditorTarget::default()
    }
}

/// Starts the rig; `prepare` may change the config and the state directory
/// (already enrolled) before the agent starts.
async fn rig_with(target: EditorTarget, prepare: impl FnOnce(&mut Config, &Path)) -> Rig {
    logs();
    let dir = tempfile::tempdir().unwrap();
    let platform = platform(dir.path()).await;
    let state = dir.path().join("state");
    let device = enrolled(&platform, &state).await.identity.device_id;
    let mut config = Config::for_state_dir(&state);
    config.reconnect.min_delay = Duration::from_millis(50);
    prepare(&mut config, &state);
    let options = AgentOptions {
        editor: Some(target),
    };
    let agent = Agent::start_with(config, options).await.unwrap();
    let mut status = agent.status();
    tokio::time::timeout(
        patience(),
        status.wait_for(|s| s.state == TunnelState::Connected),
    )
    .await
    .expect("the agent connects")
    .unwrap();
    let pk8 = std::fs::read(grant_key_path(dir.path())).unwrap();
    let key = Ed25519KeyPair::from_pkcs8(&pk8).unwrap();
    Rig {
        dir,
        platform,
        agent,
        device,
        key,
    }
}

async fn rig(target: EditorTarget) -> Rig {
    rig_with(target, |_, _| {}).await
}

fn grant_key_path(dir: &Path) -> PathBuf {
    dir.join("platform")
        .join(tether_platform::keys::GRANT_KEY_FILE)
}

fn unix_now() -> u64 {
    tether_agent::Clock::system().now_unix()
}

fn nonce() -> String {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    tether_agent::identity::hex(&bytes)
}

impl Rig {
    /// A fresh grant for this device, valid two minutes.
    fn grant(&self, user: &str, role: Role) -> Grant {
        let now = unix_now();
        Grant {
            user: user.into(),
            role,
            team: "line-3".into(),
            device: self.device.clone(),
            issued_at: now - 5,
            expires_at: now + 120,
            nonce: nonce(),
            protected: false,
        }
    }

    fn signed(&self, user: &str, role: Role) -> String {
        self.grant(user, role).sign(&self.key)
    }

    /// Opens an editor stream carrying `wire` (no grant if `None`).
    async fn open(&self, wire: Option<&str>) -> TunnelStream {
        let tunnel = eventually("the device's live tunnel", || async {
            self.platform.tunnel(&self.device)
        })
        .await;
        tunnel.connected().await.expect("the tunnel's handshake");
        let mut header = ServiceHeader::new(Service::Editor);
        if let Some(wire) = wire {
            header = header.with(GRANT_METADATA_KEY, wire);
        }
        let stream = tunnel.open(header).expect("open an editor stream");
        stream
            .accepted()
            .await
            .expect("the device accepts editor streams");
        stream
    }

    /// An HTTP/1.1 client on a new editor stream with `wire`.
    async fn client(&self, wire: Option<&str>) -> Client {
        client(self.open(wire).await).await
    }

    /// The device's audit events as the platform stored them, oldest
    /// first: everything recorded before this call (a durable event
    /// recorded now comes after it in the queue, and the platform has it).
    /// The stored chain must hold.
    async fn audit(&self) -> Vec<AuditEvent> {
        let sync = AuditEvent::Other {
            kind: "x_test_sync".into(),
            actor: tether_proto::audit::Actor {
                kind: tether_proto::audit::ActorKind::Agent,
                name: None,
            },
            subject: String::new(),
            details: serde_json::json!({}),
        };
        let seq = self.agent.audit().record_durable(sync).await.unwrap();
        let report = eventually("the platform stores the device's audit records", || async {
            let query = tether_platform::audit::AuditQuery {
                device: Some(self.device.clone()),
                ..Default::default()
            };
            let report = self.platform.audit(query).await.ok()?;
            (report.devices[0].last_seq >= Some(seq)).then_some(report)
        })
        .await;
        assert_ne!(
            report.devices[0].state,
            tether_platform::audit::ChainState::Broken,
            "{:?}",
            report.devices[0].problems
        );
        report
            .entries
            .into_iter()
            .rev()
            .map(|e| {
                AuditEvent::from_record(&tether_proto::audit::Record {
                    v: 1,
                    seq: e.seq,
                    time: e.time,
                    prev: String::new(),
                    actor: tether_proto::audit::Actor {
                        kind: e.actor,
                        name: e.user,
                    },
                    kind: e.kind,
                    subject: e.subject,
                    details: e.details,
                })
            })
            .collect()
    }

    async fn stop(self) {
        self.agent.shutdown().await;
        self.platform.shutdown().await;
        drop(self.dir);
    }
}

type Client = SendRequest<Full<Bytes>>;

async fn client(stream: TunnelStream) -> Client {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    sender
}

/// What came back: status, headers, body as text.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| panic!("not JSON: {}", self.body))
    }
}

/// The browser credentials and headers the device must never pass on.
const FORWARDED_BY_MISTAKE: &[(&str, &str)] = &[
    ("authorization", "Bearer browser-session"),
    ("cookie", "platform-session=secret"),
    ("proxy-authorization", "Basic c2VjcmV0"),
    ("x-tether-token", "forged"),
    ("x-tether-user", "root"),
    ("connection", "x-hop"),
    ("x-hop", "1"),
];

async fn send(client: &mut Client, method: Method, path: &str, body: Bytes) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "device")
        .header("accept", "application/json");
    for (k, v) in FORWARDED_BY_MISTAKE {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).unwrap();
    client.ready().await.expect("the stream takes a request");
    let response = client.send_request(req).await.expect("an answer");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the whole body").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn get(client: &mut Client, path: &str) -> Answer {
    send(client, Method::GET, path, Bytes::new()).await
}

/// Checks that Node-RED got exactly the agent's headers: no credentials, no
/// forged or hop-by-hop header, the token minted for `user` and `role`.
fn assert_clean(seen: &Seen, token: &str) {
    for (name, _) in FORWARDED_BY_MISTAKE {
        if *name != "x-tether-token" {
            assert!(!seen.headers.contains_key(*name), "{name} reached Node-RED");
        }
    }
    assert_eq!(seen.headers["x-tether-token"], token);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grants_are_answered_with_403_and_the_reason() {
    let node_red = NodeRed::start().await;
    let rig = rig(target(node_red.addr)).await;
    let now = unix_now();
    let other_key = {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap()
    };
    let expired = Grant {
        issued_at: now - 400,
        expires_at: now - 340,
        ..rig.grant("eve", Role::Owner)
    };
    let wrong_device = Grant {
        device: "dev_00000000000000000000".into(),
        ..rig.grant("eve", Role::Owner)
    };
    // The payload of an owner's grant under the signature of a viewer's.
    let viewer = rig.signed("eve", Role::Viewer);
    let owner = rig.signed("eve", Role::Owner);
    let tampered = format!(
        "{}.{}",
        owner.split_once('.').unwrap().0,
        viewer.split_once('.').unwrap().1
    );
    let replayed = rig.signed("eve", Role::Viewer);
    let mut first = rig.client(Some(&replayed)).await;
    assert_eq!(get(&mut first, "/settings").await.status, StatusCode::OK);

    let cases: Vec<(&str, Option<String>, String)> = vec![
        ("missing", None, GrantError::Missing.to_string()),
        (
            "expired",
            Some(expired.sign(&rig.key)),
            "the access grant expired at".into(),
        ),
        (
            "wrong device",
            Some(wrong_device.sign(&rig.key)),
            GrantError::WrongDevice(wrong_device.device.clone()).to_string(),
        ),
        (
            "wrong key",
            Some(rig.grant("eve", Role::Owner).sign(&other_key)),
            GrantError::BadSignature.to_string(),
        ),
        (
            "tampered",
            Some(tampered),
            GrantError::BadSignature.to_string(),
        ),
        (
            "replayed",
            Some(replayed.clone()),
            GrantError::Replayed.to_string(),
        ),
    ];
    for (name, wire, reason) in &cases {
        let mut client = rig.client(wire.as_deref()).await;
        let answer = get(&mut client, "/settings").await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{name}");
        assert_eq!(
            answer.headers["content-type"], "text/html; charset=utf-8",
            "{name}"
        );
        let escaped = reason.replace('\'', "&#39;");
        assert!(answer.body.contains(&escaped), "{name}: {}", answer.body);
        if let Some(wire) = wire {
            let payload = wire.split_once('.').unwrap().0;
            assert!(
                !answer.body.contains(payload),
                "{name}: the grant is echoed"
            );
        }
        // One answer, then the device closes the stream.
        client
            .ready()
            .await
            .expect_err("the refused stream is closed");
    }
    // Only the good grant's request reached Node-RED.
    assert_eq!(node_red.seen().len(), 1);
    let refused: Vec<_> = rig
        .audit()
        .await
        .into_iter()
        .filter_map(|e| match e {
            AuditEvent::Refused {
                user,
                reason,
                method,
                path,
            } => Some((user, reason, method, path)),
            _ => None,
        })
        .collect();
    assert_eq!(refused.len(), cases.len(), "{refused:?}");
    for ((user, reason, method, path), (name, _, want)) in refused.iter().zip(&cases) {
        assert!(reason.contains(want.as_str()), "{name}: {reason}");
        assert_eq!(
            (method.as_str(), path.as_str()),
            ("GET", "/settings"),
            "{name}"
        );
        let want_user = (*name == "replayed").then(|| "eve".to_owned());
        assert_eq!(user, &want_user, "{name}");
    }
    rig.stop().await;
    node_red.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_reaches_exactly_its_routes_with_its_own_token() {
    let node_red = NodeRed::start().await;
    let rig = rig(target(node_red.addr)).await;
    let member_perms =
        "read,flows.write,library.write,inject.write,debug.write,context.write,settings.write";
    // (user, role, method, path, allowed)
    let table: &[(&str, Role, Method, &str, bool)] = &[
        ("vic", Role::Viewer, Method::GET, "/flows", true),
        ("vic", Role::Viewer, Method::POST, "/flows", false),
        ("vic", Role::Viewer, Method::POST, "/inject/n1", false),
        ("vic", Role::Viewer, Method::DELETE, "/flow/f1", false),
        (
            "vic",
            Role::Viewer,
            Method::GET,
            "/credentials/mqtt-broker/b1",
            false,
        ),
        ("vic", Role::Viewer, Method::GET, "/diagnostics", false),
        (
            "mia",
            Role::Member,
            Method::GET,
            "/credentials/mqtt-broker/b1",
            true,
        ),
        // A flow's own endpoint is not part of the editor, for anyone.
        ("olga", Role::Owner, Method::GET, "/hello", false),
        ("olga", Role::Owner, Method::POST, "/hello", false),
        ("mia", Role::Member, Method::POST, "/flows", true),
        ("mia", Role::Member, Method::POST, "/inject/n1", true),
        ("mia", Role::Member, Method::POST, "/nodes", false),
        (
            "mia",
            Role::Member,
            Method::DELETE,
            "/nodes/node-red-contrib-x",
            false,
        ),
        ("olga", Role::Owner, Method::POST, "/nodes", true),
        ("olga", Role::Owner, Method::POST, "/flows", true),
        ("olga", Role::Owner, Method::PUT, "/flows", false),
        ("olga", Role::Owner, Method::POST, "/auth/token", false),
    ];
    for (user, role, method, path, allowed) in table {
        let mut client = rig.client(Some(&rig.signed(user, *role))).await;
        let before = node_red.seen().len();
        let answer = send(&mut client, method.clone(), path, Bytes::from_static(b"{}")).await;
        let what = format!("{role} {method} {path}");
        if !allowed {
            assert_eq!(answer.status, StatusCode::FORBIDDEN, "{what}");
            assert_eq!(answer.json()["error"], "forbidden", "{what}");
            assert!(answer.json()["message"].as_str().is_some(), "{what}");
            assert_eq!(node_red.seen().len(), before, "{what} reached Node-RED");
            continue;
        }
        assert_eq!(answer.status, StatusCode::OK, "{what}: {}", answer.body);
        let seen = node_red.seen().last().cloned().unwrap();
        assert_eq!((&seen.method, seen.uri.as_str()), (method, *path), "{what}");
        let permissions = match role {
            Role::Viewer => "read",
            Role::Member => member_perms,
            Role::Owner => "*",
        };
        assert_clean(&seen, &format!("{user}|{permissions}"));
    }
    let audit = rig.audit().await;
    assert!(
        audit.contains(&AuditEvent::Deploy {
            user: "mia".into(),
            rev: Some("rev-42".into())
        }),
        "{audit:?}"
    );
    assert!(
        audit.contains(&AuditEvent::Deploy {
            user: "olga".into(),
            rev: Some("rev-42".into())
        }),
        "{audit:?}"
    );
    assert!(audit.iter().any(|e| matches!(e, AuditEvent::Refused { user: Some(u), method, path, .. } if u == "vic" && method == "POST" && path == "/flows")));
    rig.stop().await;
    node_red.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_carries_many_requests_and_bodies_stream_both_ways() {
    let node_red = NodeRed::start().await;
    let mut target = target(node_red.addr);
    target.admin_root = "/red/".into();
    let rig = rig(target).await;
    let mut client = rig.client(Some(&rig.signed("mia", Role::Member))).await;
    let answer = get(&mut client, "/settings?x=1").await;
    assert_eq!(answer.status, StatusCode::OK);
    let big = get(&mut client, "/vendor/big").await;
    assert_eq!(big.body.len(), 4 * 1024 * 1024);
    let upload = Bytes::from(vec![1u8; 3 * 1024 * 1024]);
    let answer = send(
        &mut client,
        Method::POST,
        "/library/local/flows/upload",
        upload,
    )
    .await;
    assert_eq!(answer.body, format!("got {} bytes", 3 * 1024 * 1024));
    // A deploy answer too large to look into still arrives whole; the
    // deploy is recorded without a revision.
    let answer = send(
        &mut client,
        Method::POST,
        "/flows",
        Bytes::from_static(b"big"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.json()["pad"].as_str().unwrap().len(), 80 * 1024);
    assert!(rig.audit().await.contains(&AuditEvent::Deploy {
        user: "mia".into(),
        rev: None
    }));
    let uris: Vec<String> = node_red.seen().into_iter().map(|s| s.uri).collect();
    assert_eq!(
        uris,
        [
            "/red/settings?x=1",
            "/red/vendor/big",
            "/red/library/local/flows/upload",
            "/red/flows"
        ]
    );
    rig.stop().await;
    node_red.stop().await;
}

/// A WebSocket echo server standing in for Node-RED's `/comms`; it records
/// the upgrade request's headers.
// tungstenite's handshake callback returns its error response by value.
#[allow(clippy::result_large_err)]
async fn comms_echo() -> (SocketAddr, Arc<Mutex<Option<HeaderMap>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(None));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let callback =
                    |req: &tokio_tungstenite::tungstenite::handshake::server::Request, res| {
                        *record.lock().unwrap() = Some(req.headers().clone());
                        Ok(res)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() || message.is_binary() {
                        let _ = ws.send(message).await;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_comms_websocket_echoes_through_the_editor_path() {
    let (echo, seen) = comms_echo().await;
    let rig = rig(target(echo)).await;
    let stream = rig.open(Some(&rig.signed("vic", Role::Viewer))).await;
    let mut request = "ws://device/comms".into_client_request().unwrap();
    request
        .headers_mut()
        .insert("cookie", "platform-session=secret".parse().unwrap());
    request
        .headers_mut()
        .insert("authorization", "Bearer browser".parse().unwrap());
    let (mut ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("the WebSocket handshake through the tunnel");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    for message in [
        Message::text("hello comms"),
        Message::binary(vec![0u8, 1, 2, 255]),
    ] {
        ws.send(message.clone()).await.unwrap();
        let echoed = tokio::time::timeout(patience(), ws.next())
            .await
            .expect("an echo")
            .unwrap()
            .unwrap();
        assert_eq!(echoed, message);
    }
    let headers = seen
        .lock()
        .unwrap()
        .clone()
        .expect("the upgrade reached the echo server");
    assert!(!headers.contains_key("cookie"));
    assert!(!headers.contains_key("authorization"));
    assert_eq!(headers["x-tether-token"], "vic|read");
    ws.close(None).await.unwrap();
    // The platform closes its end once the WebSocket is done.
    drop(ws);
    eventually("the session's end in the audit", || async {
        rig.audit().await.into_iter().find(|e| {
            matches!(e, AuditEvent::EditorSessionClosed { user, role: Role::Viewer, .. } if user == "vic")
        })
    })
    .await;
    assert!(rig.audit().await.iter().any(|e| matches!(e, AuditEvent::EditorSessionOpened { user, role: Role::Viewer, .. } if user == "vic")));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_node_red_is_504_and_a_stopped_one_502() {
    let node_red = NodeRed::start().await;
    let mut target = target(node_red.addr);
    target.request_timeout = Duration::from_millis(500);
    let rig = rig(target).await;
    let mut client = rig.client(Some(&rig.signed("mia", Role::Member))).await;
    let started = std::time::Instant::now();
    let answer = get(&mut client, "/red/slow").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(
        answer.body.contains("did not answer within 0 s") || answer.body.contains("did not answer"),
        "{}",
        answer.body
    );
    // The stream serves the next request after a timeout.
    assert_eq!(get(&mut client, "/settings").await.status, StatusCode::OK);
    let addr = node_red.addr;
    node_red.stop().await;
    let answer = get(&mut client, "/settings").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(
        answer.body.contains(&format!("not reachable at {addr}")),
        "{}",
        answer.body
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protection_mode_from_the_platform_refuses_a_deploy_even_for_the_owner() {
    let node_red = NodeRed::start().await;
    let rig = rig(target(node_red.addr)).await;
    assert!(!rig.agent.protection(), "off by default");
    // The platform pushes the change over the control stream.
    rig.platform
        .set_protection(&rig.device, true)
        .await
        .unwrap();
    eventually("protection mode on the device", || async {
        rig.agent.protection().then_some(())
    })
    .await;
    let mut client = rig.client(Some(&rig.signed("olga", Role::Owner))).await;
    for (method, path) in [
        (Method::POST, "/flows"),
        (Method::POST, "/nodes"),
        (Method::DELETE, "/flow/f1"),
    ] {
        let answer = send(&mut client, method.clone(), path, Bytes::from_static(b"{}")).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {path}");
        let message = answer.json()["message"].as_str().unwrap().to_owned();
        assert!(message.contains("read-only"), "{message}");
        assert!(message.contains("signed snapshots"), "{message}");
    }
    assert!(node_red.seen().is_empty());
    // What is still allowed carries the member's permissions without
    // flows.write.
    let answer = send(&mut client, Method::POST, "/inject/n1", Bytes::new()).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_clean(
        &node_red.seen()[0],
        "olga|read,library.write,inject.write,debug.write,context.write,settings.write",
    );
    let report = tether_agent::status::report(
        &tether_agent::identity::StateDir::new(rig.dir.path().join("state")),
        tether_agent::Clock::system(),
    );
    assert_eq!(report.protection, Some(true), "stored for the next start");
    assert!(rig.audit().await.iter().any(|e| matches!(e, AuditEvent::Refused { user: Some(u), path, .. } if u == "olga" && path == "/flows")));
    // Switched off again, the owner deploys.
    rig.platform
        .set_protection(&rig.device, false)
        .await
        .unwrap();
    eventually("protection mode off on the device", || async {
        (!rig.agent.protection()).then_some(())
    })
    .await;
    let answer = send(
        &mut client,
        Method::POST,
        "/flows",
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    rig.stop().await;
    node_red.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stops_serving_when_its_grant_runs_out() {
    let node_red = NodeRed::start().await;
    // The device clock runs 28 s ahead: a grant that expires in 1 s (platform
    // time) is still accepted within the 30 s skew, and runs out 3 s later.
    let rig = rig_with(target(node_red.addr), |config, _| {
        config.clock = tether_agent::Clock::with_offset(28);
    })
    .await;
    let now = unix_now();
    let grant = Grant {
        issued_at: now - 299,
        expires_at: now + 1,
        ..rig.grant("mia", Role::Member)
    };
    let mut client = rig.client(Some(&grant.sign(&rig.key))).await;
    assert_eq!(get(&mut client, "/settings").await.status, StatusCode::OK);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        while !client.is_closed() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(closed.is_ok(), "the stream outlived its grant");
    let closed = eventually("the session's end in the audit", || async {
        rig.audit().await.into_iter().find_map(|e| match e {
            AuditEvent::EditorSessionClosed { user, duration, .. } if user == "mia" => {
                Some(duration)
            }
            _ => None,
        })
    })
    .await;
    assert!(closed >= Duration::from_secs(2), "{closed:?}");
    rig.stop().await;
    node_red.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stricter_of_the_grants_and_the_stored_protection_mode_applies() {
    let node_red = NodeRed::start().await;
    let rig = rig(target(node_red.addr)).await;
    assert!(!rig.agent.protection(), "off on the device");
    // The platform signed "protected" (its control message may be late or
    // lost): the owner's deploy is refused.
    let protected = Grant {
        protected: true,
        ..rig.grant("olga", Role::Owner)
    };
    let mut client = rig.client(Some(&protected.sign(&rig.key))).await;
    let answer = send(
        &mut client,
        Method::POST,
        "/flows",
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(
        answer.json()["message"]
            .as_str()
            .unwrap()
            .contains("read-only")
    );
    assert!(node_red.seen().is_empty());
    // And the other way round: stored on, a grant that says off changes
    // nothing.
    rig.platform
        .set_protection(&rig.device, true)
        .await
        .unwrap();
    eventually("protection mode on the device", || async {
        rig.agent.protection().then_some(())
    })
    .await;
    let unprotected = Grant {
        protected: false,
        ..rig.grant("olga", Role::Owner)
    };
    let mut client = rig.client(Some(&unprotected.sign(&rig.key))).await;
    let answer = send(
        &mut client,
        Method::POST,
        "/flows",
        Bytes::from_static(b"{}"),
    )
    .await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(node_red.seen().is_empty());
    rig.stop().await;
    node_red.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_ends_when_its_grant_does() {
    let (echo, _) = comms_echo().await;
    // The device clock runs 28 s ahead: a grant that expires in 1 s is
    // accepted within the 30 s skew and runs out about 3 s later.
    let rig = rig_with(target(echo), |config, _| {
        config.clock = tether_agent::Clock::with_offset(28);
    })
    .await;
    let now = unix_now();
    let grant = Grant {
        issued_at: now - 299,
        expires_at: now + 1,
        ..rig.grant("vic", Role::Viewer)
    };
    let stream = rig.open(Some(&grant.sign(&rig.key))).await;
    let request = "ws://device/comms".into_client_request().unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("the WebSocket handshake through the tunnel");
    ws.send(Message::text("before")).await.unwrap();
    let echoed = tokio::time::timeout(patience(), ws.next()).await.unwrap();
    assert!(matches!(echoed, Some(Ok(Message::Text(_)))), "{echoed:?}");
    let started = std::time::Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(_) | Message::Binary(_))) => continue,
                other => return other.map(|r| r.is_ok()),
            }
        }
    })
    .await
    .expect("the WebSocket ends within 10 s, with its grant");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let _ = ended;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_grant_key_reaches_the_device_without_enrolling_again() {
    let node_red = NodeRed::start().await;
    let rig = rig(target(node_red.addr)).await;
    let old_grant = rig.grant("mia", Role::Member).sign(&rig.key);
    let new_public = rig.platform.rotate_grant_key().await.unwrap();
    let pk8 = std::fs::read(grant_key_path(rig.dir.path())).unwrap();
    let new_key = Ed25519KeyPair::from_pkcs8(&pk8).unwrap();
    // The device learns the new key over its control stream and stores it.
    let stored = rig.dir.path().join("state").join("grant-keys.json");
    eventually("the rotated key on the device", || async {
        let text = std::fs::read_to_string(&stored).ok()?;
        text.contains(&new_public).then_some(())
    })
    .await;
    let fresh = Grant {
        nonce: "1".repeat(32),
        ..rig.grant("mia", Role::Member)
    };
    let mut client = rig.client(Some(&fresh.sign(&new_key))).await;
    assert_eq!(get(&mut client, "/settings").await.status, StatusCode::OK);
    // A grant the old key signed just before the rotation still works for
    // the few minutes such grants live ...
    let mut client = rig.client(Some(&old_grant)).await;
    assert_eq!(get(&mut client, "/settings").await.status, StatusCode::OK);
    // ... a key nobody rotated to never does.
    let stranger = {
        let pk8 = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
        Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap()
    };
    let forged = Grant {
        nonce: "2".repeat(32),
        ..rig.grant("mia", Role::Owner)
    };
    let mut client = rig.client(Some(&forged.sign(&stranger))).await;
    let answer = get(&mut client, "/settings").await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(answer.body.contains("signature"), "{}", answer.body);
    rig.stop().await;
    node_red.stop().await;
}
