//! Shared setup for the end-to-end tests: a reference platform in a
//! temporary directory on 127.0.0.1 (and its restart on the same directory
//! and port), devices enrolled through the agent library, agent configs,
//! waiting on the agent's status and the platform's events, and a TCP
//! service that hashes what it receives while it sends a stream of its own.
#![allow(dead_code, unreachable_pub)]

pub mod mqtt;
pub mod snapshot;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use ring::digest::{Context, Digest, SHA256};
use tether_agent::config::{Config, ServiceConfig};
use tether_agent::enroll::{EnrollOptions, Enrolled, enroll};
use tether_agent::identity::StateDir;
use tether_agent::{Agent, Status, TunnelState};
use tether_platform::{
    Platform, PlatformConfig, PlatformError, PlatformEvent, RateLimit, TokenSpec,
};
use tether_proto::api::ProvisioningToken;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, oneshot, watch};

/// How long a wait for something that should happen soon may take before
/// the test fails; `TETHER_TEST_PATIENCE` (seconds) overrides.
pub fn patience() -> Duration {
    std::env::var("TETHER_TEST_PATIENCE")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(20))
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after
/// `patience()`.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + patience();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {:?} waiting for {what}", patience());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A platform's configuration: data in `data_dir`, listening on `listen`,
/// with an enrollment rate limit that does not get in the way.
pub fn platform_config(data_dir: &Path, listen: SocketAddr) -> PlatformConfig {
    let mut config = PlatformConfig::new(data_dir, listen);
    config.enroll_rate = RateLimit {
        burst: 1000,
        refill: Duration::from_millis(1),
    };
    config
}

/// A platform in `dir/platform` on 127.0.0.1, port chosen by the OS.
/// The editor tests' engineers: an owner and a viewer, as (name, password).
pub const OWNER: (&str, &str) = ("olga", "owner-password-for-the-test");
pub const VIEWER: (&str, &str) = ("vic", "viewer-password-for-the-test");

/// Adds [`OWNER`] and [`VIEWER`] to `platform`'s team `default` with their
/// roles.
pub async fn add_engineers(platform: &Platform) {
    use tether_proto::api::Secret;
    use tether_proto::grant::Role;
    for ((name, password), role) in [(OWNER, Role::Owner), (VIEWER, Role::Viewer)] {
        platform
            .add_user(name, "default", role, &Secret::new(password))
            .await
            .expect("user added");
    }
}

pub async fn platform(dir: &Path) -> Platform {
    Platform::start(platform_config(
        &dir.join("platform"),
        "127.0.0.1:0".parse().unwrap(),
    ))
    .await
    .expect("platform starts")
}

/// Starts `config`, retrying for a few seconds while its address is still
/// taken (a platform restarted on the port its predecessor had).
pub async fn start_retrying_bind(config: PlatformConfig) -> Platform {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match Platform::start(config.clone()).await {
            Ok(platform) => return platform,
            Err(PlatformError::Bind { addr, cause }) if tokio::time::Instant::now() < deadline => {
                eprintln!("{addr} not free yet ({cause}); retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("platform restarts: {e}"),
        }
    }
}

/// A new platform on the data directory and address of `old`, which is
/// shut down first (that releases the database file and the port).
pub async fn restart(old: Platform, config: PlatformConfig) -> Platform {
    old.shutdown().await;
    drop(old);
    start_retrying_bind(config).await
}

/// A single-use provisioning token.
pub async fn token(platform: &Platform) -> ProvisioningToken {
    platform
        .create_token(TokenSpec::default())
        .await
        .expect("token")
}

/// Enrollment options: the token names the platform's CA.
pub fn enroll_options(
    platform: &Platform,
    token: ProvisioningToken,
    state_dir: &Path,
) -> EnrollOptions {
    let mut options = EnrollOptions::new(platform.url(), token, state_dir);
    options.name = Some("press-7".into());
    options
}

/// Enrolls a device in `state_dir` with a fresh token, through the agent
/// library.
pub async fn enrolled(platform: &Platform, state_dir: &Path) -> Enrolled {
    let token = token(platform).await;
    enroll(&enroll_options(platform, token, state_dir))
        .await
        .expect("enrollment")
}

/// The SHA-256 fingerprint (hex) of the certificate the identity in
/// `state_dir` uses now.
pub fn current_fingerprint(state_dir: &Path) -> String {
    let store = StateDir::new(state_dir);
    let identity = store.load().unwrap().expect("an identity");
    store.credentials(&identity).unwrap().cert.fingerprint
}

/// An agent config for `state_dir`: heartbeats every second, quick
/// reconnects, no services.
pub fn agent_config(state_dir: &Path) -> Config {
    let mut config = Config::for_state_dir(state_dir);
    config.heartbeat_interval = Duration::from_secs(1);
    config.reconnect.min_delay = Duration::from_millis(50);
    config.reconnect.max_delay = Duration::from_millis(500);
    config
}

/// `config` with one more allow-listed service.
pub fn with_service(mut config: Config, name: &str, target: SocketAddr) -> Config {
    config.services.push(ServiceConfig {
        name: name.into(),
        target,
    });
    config
}

/// Waits until the agent's status satisfies `pred`; returns that status.
pub async fn wait_status(agent: &Agent, what: &str, pred: impl FnMut(&Status) -> bool) -> Status {
    let mut status = agent.status();
    tokio::time::timeout(patience(), status.wait_for(pred))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "timed out waiting for the agent: {what}; status {:?}",
                agent.status().borrow()
            )
        })
        .expect("status channel open")
        .clone()
}

/// Waits until the agent is connected.
pub async fn connected(agent: &Agent) -> Status {
    wait_status(agent, "connected", |s| s.state == TunnelState::Connected).await
}

/// Waits until the platform lists `id` online.
pub async fn online(platform: &Platform, id: &str) {
    eventually("the platform to list the device online", || async {
        platform
            .devices()
            .await
            .unwrap()
            .into_iter()
            .find(|d| d.id == id && d.online)
    })
    .await;
}

/// The next event `pick` accepts, within `patience()`.
pub async fn next_event<T>(
    events: &mut broadcast::Receiver<PlatformEvent>,
    what: &str,
    mut pick: impl FnMut(&PlatformEvent) -> Option<T>,
) -> T {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(e) => panic!("event channel closed: {e}"),
            }
        }
    };
    tokio::time::timeout(patience(), wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for the event: {what}"))
}

/// The fingerprint of the next `TunnelUp` of `device`.
pub async fn tunnel_up(events: &mut broadcast::Receiver<PlatformEvent>, device: &str) -> String {
    next_event(events, "TunnelUp", |e| match e {
        PlatformEvent::TunnelUp {
            device_id,
            fingerprint,
        } if device_id == device => Some(fingerprint.clone()),
        _ => None,
    })
    .await
}

/// Every status the agent publishes from now on, with when it was seen.
/// The channel keeps only the newest value, so a change overwritten before
/// the recorder ran is missed; counters (`attempts`, `connects`) still show
/// that it happened.
#[derive(Debug)]
pub struct Recorder {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<(tokio::time::Instant, Status)>>,
}

impl Recorder {
    pub fn start(mut status: watch::Receiver<Status>) -> Recorder {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = vec![(
                tokio::time::Instant::now(),
                status.borrow_and_update().clone(),
            )];
            loop {
                tokio::select! {
                    changed = status.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let s = status.borrow_and_update().clone();
                        seen.push((tokio::time::Instant::now(), s));
                    }
                    _ = &mut stopped => break,
                }
            }
            // A change not yet taken when told to stop.
            let last = status.borrow().clone();
            if seen.last().is_none_or(|(_, s)| *s != last) {
                seen.push((tokio::time::Instant::now(), last));
            }
            seen
        });
        Recorder { stop, task }
    }

    /// Stops recording and returns what was seen, oldest first.
    pub async fn finish(self) -> Vec<(tokio::time::Instant, Status)> {
        let _ = self.stop.send(());
        self.task.await.expect("recorder")
    }
}

/// A deterministic pseudo-random byte stream (xorshift64*), eight bytes per
/// step.
#[derive(Clone, Debug)]
pub struct Bytes {
    state: u64,
}

impl Bytes {
    pub fn new(seed: u64) -> Bytes {
        Bytes { state: seed | 1 }
    }

    /// Fills `buf` (a multiple of 8 bytes long) with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for word in buf.chunks_exact_mut(8) {
            self.state ^= self.state >> 12;
            self.state ^= self.state << 25;
            self.state ^= self.state >> 27;
            let v = self.state.wrapping_mul(0x2545_f491_4f6c_dd1d);
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
}

const CHUNK: usize = 64 * 1024;

/// Writes `total` bytes (a multiple of 64 KiB) of `Bytes::new(seed)`, then
/// shuts the writer down; returns their SHA-256.
pub async fn send_stream<W: AsyncWrite + Unpin>(mut wr: W, seed: u64, total: usize) -> Digest {
    assert_eq!(total % CHUNK, 0);
    let mut source = Bytes::new(seed);
    let mut ctx = Context::new(&SHA256);
    let mut chunk = vec![0u8; CHUNK];
    for _ in 0..total / CHUNK {
        source.fill(&mut chunk);
        ctx.update(&chunk);
        wr.write_all(&chunk).await.expect("write");
    }
    wr.shutdown().await.expect("shutdown");
    ctx.finish()
}

/// Reads to the end; returns the byte count and their SHA-256.
pub async fn hash_stream<R: AsyncRead + Unpin>(mut rd: R) -> (usize, Digest) {
    let mut ctx = Context::new(&SHA256);
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0usize;
    loop {
        let n = rd.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
        total += n;
    }
    (total, ctx.finish())
}

/// What the hash server saw on one connection.
#[derive(Debug)]
pub struct Served {
    pub received: usize,
    pub received_sha256: Digest,
    pub sent_sha256: Digest,
}

/// A TCP service on 127.0.0.1 that, on each connection, hashes everything
/// it receives until EOF while it sends `send` bytes of `Bytes::new(seed)`
/// at the same time, then reports on the returned channel.
pub async fn hash_server(
    seed: u64,
    send: usize,
) -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Served>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (rd, wr) = tcp.into_split();
                let sender = tokio::spawn(send_stream(wr, seed, send));
                let (received, received_sha256) = hash_stream(rd).await;
                let sent_sha256 = sender.await.expect("server sender");
                let _ = tx.send(Served {
                    received,
                    received_sha256,
                    sent_sha256,
                });
            });
        }
    });
    (addr, rx)
}

/// The SHA-256 of `total` bytes of `Bytes::new(seed)`, computed apart from
/// any stream.
pub fn expected_sha256(seed: u64, total: usize) -> Digest {
    let mut source = Bytes::new(seed);
    let mut ctx = Context::new(&SHA256);
    let mut chunk = vec![0u8; CHUNK];
    for _ in 0..total / CHUNK {
        source.fill(&mut chunk);
        ctx.update(&chunk);
    }
    ctx.finish()
}

/// What [`http_stand_in`] answers: status (`"200 OK"`), header lines
/// (each ending in `\r\n`) and body.
pub type StandInAnswer = (&'static str, String, String);

/// A small HTTP/1.1 server on 127.0.0.1 standing in for a device's
/// Node-RED: each connection's one request, read to the end of its head, is
/// answered with `answer(path)` and closed.
pub async fn http_stand_in(
    answer: impl Fn(&str) -> StandInAnswer + Send + Sync + 'static,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answer = std::sync::Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let (status, headers, body) = answer(head.split(' ').nth(1).unwrap_or("/"));
                let reply = format!(
                    "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

/// Starts `tetherd` (in-process) with `config` launching the Node-RED of
/// `command` on a free port, and waits until the tunnel is up and Node-RED
/// answers locked down. The agent and Node-RED's port.
pub async fn agent_with_node_red(mut config: Config, command: &Path) -> (Agent, u16) {
    let port = tether_e2e::bench::free_port().expect("a free port");
    config.node_red = tether_agent::config::NodeRedConfig {
        mode: tether_agent::config::NodeRedMode::Launch,
        command: command.display().to_string(),
        user_dir: None,
        port,
        user: tether_e2e::tools::node_red_user(),
        ..tether_agent::config::NodeRedConfig::default()
    };
    let agent = Agent::start(config).await.expect("agent starts");
    wait_status(&agent, "connected", |s| {
        s.state == tether_agent::TunnelState::Connected
    })
    .await;
    tether_agent::node_red::wait_ready(([127, 0, 0, 1], port).into(), Duration::from_secs(60))
        .await
        .expect("Node-RED came up locked down");
    (agent, port)
}
