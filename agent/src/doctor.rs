//! `tetherd doctor`: what a fleet manager or field engineer runs when a
//! device misbehaves. One line per check, each with what to do when it
//! fails: the config, the state directory's ownership and modes, the
//! identity and its certificate, the platform's reachability step by step
//! (DNS, TCP, TLS with the device's own certificate), the clock against the
//! platform's `Date`, the local Node-RED's lock-down, free disk for the
//! stores.
//!
//! Read-only: it never changes a file, never enrolls and never renews; it
//! opens one TLS connection to the platform and one HTTP request to the
//! local Node-RED. Time comes in as a [`Clock`].

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::clock::Clock;
use crate::config::{Config, NodeRedMode};
use crate::identity::StateDir;
use crate::net::Endpoint;

/// How long each network step may take.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
/// A clock further off than this is a warning.
pub const SKEW_WARN: Duration = Duration::from_secs(30);
/// A clock further off than this fails: certificates and tokens check time.
pub const SKEW_FAIL: Duration = Duration::from_secs(300);
/// Certificates expiring sooner than this are a warning.
const EXPIRY_WARN: Duration = Duration::from_secs(7 * 86_400);
/// Largest HTTP answer head read.
const MAX_HEAD: usize = 16 * 1024;

/// How a check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Ok,
    Warn,
    Fail,
    /// Not run: nothing to check, or an earlier check failed.
    Skip,
}

/// One check's line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to do, when it is not ok.
    pub help: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Ok,
            detail: detail.into(),
            help: None,
        }
    }
    fn bad(
        name: &'static str,
        verdict: Verdict,
        detail: impl Into<String>,
        help: impl Into<String>,
    ) -> Check {
        Check {
            name,
            verdict,
            detail: detail.into(),
            help: Some(help.into()),
        }
    }
    fn skip(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            name,
            verdict: Verdict::Skip,
            detail: detail.into(),
            help: None,
        }
    }
}

/// What the doctor is told besides the config.
#[derive(Clone, Debug)]
pub struct Options {
    pub clock: Clock,
    /// Free space below this fails the disk check.
    pub min_free: u64,
    /// Free space below this is a warning.
    pub warn_free: u64,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            clock: Clock::system(),
            min_free: 32 * 1024 * 1024,
            warn_free: 256 * 1024 * 1024,
        }
    }
}

/// Runs every check for `config` (or the config's load error).
pub async fn run(config: Result<&Config, String>, options: &Options) -> Vec<Check> {
    let config = match config {
        Ok(config) => config,
        Err(why) => {
            return vec![Check::bad(
                "config",
                Verdict::Fail,
                why,
                "fix the config file; every problem is listed above",
            )];
        }
    };
    let mut out = vec![Check::ok("config", "loaded and valid")];
    out.push(state_dir(&config.state_dir));
    let state = StateDir::new(&config.state_dir);
    let identity = match state.load() {
        Ok(Some(identity)) => {
            out.push(Check::ok(
                "identity",
                format!("enrolled as {} ({})", identity.device_id, identity.name),
            ));
            Some(identity)
        }
        Ok(None) => {
            out.push(Check::bad(
                "identity",
                Verdict::Fail,
                "not enrolled",
                "enroll with a provisioning token: tetherd enroll --platform URL --token-file FILE",
            ));
            None
        }
        Err(e) => {
            out.push(Check::bad(
                "identity",
                Verdict::Fail,
                e.to_string(),
                "restore the state directory from a backup, or enroll again with --force",
            ));
            None
        }
    };
    let creds = identity
        .as_ref()
        .and_then(|identity| match state.credentials(identity) {
            Ok(creds) => Some(creds),
            Err(e) => {
                out.push(Check::bad(
                    "certificate",
                    Verdict::Fail,
                    e.to_string(),
                    "enroll again with --force (the key or certificate is unreadable)",
                ));
                None
            }
        });
    if let Some(creds) = &creds {
        out.push(certificate(creds.cert.not_after, options.clock.now_unix()));
    }
    match (&identity, &creds) {
        (Some(identity), Some(creds)) => {
            out.extend(platform(&identity.tunnel_url, creds, options.clock).await)
        }
        _ => {
            out.push(Check::skip("platform", "no identity to reach it with"));
            out.push(Check::skip(
                "clock",
                "no identity to reach the platform with",
            ));
        }
    }
    out.push(node_red(config).await);
    out.push(mqtt_broker(config).await);
    out.push(disk(&config.state_dir, options));
    out
}

/// The state directory: there, a directory, the agent's own, `0700`.
fn state_dir(dir: &Path) -> Check {
    const NAME: &str = "state directory";
    let meta = match std::fs::metadata(dir) {
        Ok(meta) => meta,
        Err(e) => {
            return Check::bad(
                NAME,
                Verdict::Fail,
                format!("{}: {e}", dir.display()),
                "enroll first (it creates the directory), or fix state_dir in the config",
            );
        }
    };
    if !meta.is_dir() {
        return Check::bad(
            NAME,
            Verdict::Fail,
            format!("{} is not a directory", dir.display()),
            "point state_dir at a directory",
        );
    }
    let me = rustix::process::geteuid().as_raw();
    // Root checks the packaged service's directory, which is its user's.
    let whose = if meta.uid() == me {
        format!("uid {me}")
    } else {
        format!("uid {}, the agent's user; checked as root", meta.uid())
    };
    if meta.uid() != me && me != 0 {
        return Check::bad(
            NAME,
            Verdict::Fail,
            format!(
                "{} belongs to uid {}, not to this user (uid {me})",
                dir.display(),
                meta.uid()
            ),
            format!(
                "run tetherd as its owner or as root, or chown -R {me} {}",
                dir.display()
            ),
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Check::bad(
            NAME,
            Verdict::Fail,
            format!(
                "{} has mode {mode:o}: other users can reach the device's key",
                dir.display()
            ),
            format!("chmod 700 {}", dir.display()),
        );
    }
    Check::ok(NAME, format!("{} (mode 700, {whose})", dir.display()))
}

/// The certificate is valid now and not about to expire.
fn certificate(not_after: u64, now: u64) -> Check {
    const NAME: &str = "certificate";
    let when = crate::clock::rfc3339(not_after);
    if now >= not_after {
        return Check::bad(
            NAME,
            Verdict::Fail,
            format!("expired at {when}"),
            "check the clock (below); if it is right, ask the platform for a new token and enroll again with --force",
        );
    }
    let left = Duration::from_secs(not_after - now);
    let detail = format!("valid until {when} ({} left)", crate::duration::Human(left));
    if left < EXPIRY_WARN {
        return Check::bad(
            NAME,
            Verdict::Warn,
            detail,
            "the agent renews it over the tunnel; if it does not, check the tunnel (tetherd status)",
        );
    }
    Check::ok(NAME, detail)
}

/// DNS, TCP and TLS to the tunnel's host, then the clock against the
/// platform's `Date`.
async fn platform(url: &str, creds: &crate::identity::Credentials, clock: Clock) -> Vec<Check> {
    const NAME: &str = "platform";
    let endpoint = match Endpoint::parse(url, "wss") {
        Ok(endpoint) => endpoint,
        Err(e) => {
            return vec![Check::bad(
                NAME,
                Verdict::Fail,
                e.to_string(),
                "enroll again: the stored tunnel URL is not valid",
            )];
        }
    };
    let target = endpoint.authority();
    let lookup = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port)),
    )
    .await;
    let addrs: Vec<std::net::SocketAddr> = match lookup {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => {
            return fail_platform(
                format!("DNS: cannot resolve {}: {e}", endpoint.host),
                "check the device's DNS (/etc/resolv.conf) and the platform's host name",
            );
        }
        Err(_) => {
            return fail_platform(
                format!(
                    "DNS: no answer for {} within {}s",
                    endpoint.host,
                    STEP_TIMEOUT.as_secs()
                ),
                "check the device's DNS servers",
            );
        }
    };
    let Some(&addr) = addrs.first() else {
        return fail_platform(
            format!("DNS: {} has no address", endpoint.host),
            "check the platform's DNS records",
        );
    };
    let tcp = match tokio::time::timeout(STEP_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return fail_platform(
                format!("TCP: cannot connect to {target} ({addr}): {e}"),
                "is the platform up? does a firewall allow outbound connections to this port?",
            );
        }
        Err(_) => {
            return fail_platform(
                format!(
                    "TCP: {target} ({addr}) did not answer within {}s",
                    STEP_TIMEOUT.as_secs()
                ),
                "a firewall may drop outbound connections to this port",
            );
        }
    };
    let tls_config = match crate::tls::tunnel_config(creds, clock) {
        Ok(config) => Arc::new(config),
        Err(e) => {
            return fail_platform(format!("TLS: {e}"), "enroll again with --force");
        }
    };
    let Ok(server_name) = rustls::pki_types::ServerName::try_from(endpoint.host.clone()) else {
        return fail_platform(
            format!("'{}' is not a valid host name", endpoint.host),
            "enroll again with --force",
        );
    };
    let handshake = tokio::time::timeout(
        STEP_TIMEOUT,
        tokio_rustls::TlsConnector::from(tls_config).connect(server_name, tcp),
    )
    .await;
    let mut tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            let why = crate::tls::classify(&e)
                .and_then(|f| f.clock_detail())
                .unwrap_or_else(|| e.to_string());
            return fail_platform(
                format!("TLS with {target}: {why}"),
                "a proxy or another server answers in the platform's place, the clock is wrong, or the device was revoked; tetherd status shows the tunnel's last error",
            );
        }
        Err(_) => {
            return fail_platform(
                format!(
                    "TLS: {target} did not finish the handshake within {}s",
                    STEP_TIMEOUT.as_secs()
                ),
                "something between the device and the platform holds the connection",
            );
        }
    };
    let mut out = vec![Check::ok(
        NAME,
        format!("{target} ({addr}): DNS, TCP and mutual TLS with the pinned CA"),
    )];
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        endpoint.path,
        endpoint.authority()
    );
    let head = async {
        tls.write_all(request.as_bytes()).await?;
        read_head(&mut tls).await
    };
    let date = match tokio::time::timeout(STEP_TIMEOUT, head).await {
        Ok(Ok(head)) => header(&head, "date").and_then(parse_http_date),
        _ => None,
    };
    out.push(match date {
        Some(theirs) => skew(clock.now_unix(), theirs),
        None => Check::bad(
            "clock",
            Verdict::Warn,
            "the platform's answer had no Date to compare with",
            "compare the clock with a trusted one by hand (date -u)",
        ),
    });
    out
}

fn fail_platform(detail: String, help: &str) -> Vec<Check> {
    vec![
        Check::bad("platform", Verdict::Fail, detail, help),
        Check::skip("clock", "the platform was not reached"),
    ]
}

/// The clock against the platform's.
fn skew(ours: u64, theirs: u64) -> Check {
    let off = Duration::from_secs(ours.abs_diff(theirs));
    let side = if ours > theirs { "ahead of" } else { "behind" };
    let detail = format!("{} {side} the platform's", crate::duration::Human(off));
    if off > SKEW_FAIL {
        Check::bad(
            "clock",
            Verdict::Fail,
            detail,
            "set the clock (timedatectl set-ntp true, or date -s): certificates and editor grants check it",
        )
    } else if off > SKEW_WARN {
        Check::bad(
            "clock",
            Verdict::Warn,
            detail,
            "enable time synchronisation (timedatectl set-ntp true)",
        )
    } else {
        Check::ok(
            "clock",
            format!("within {}s of the platform's", SKEW_WARN.as_secs()),
        )
    }
}

/// The local Node-RED answers, and refuses a request without a token.
async fn node_red(config: &Config) -> Check {
    const NAME: &str = "node-red";
    if config.node_red.mode == NodeRedMode::Off {
        return Check::skip(NAME, "[node_red] mode is off");
    }
    let addr = config.node_red.addr();
    let answer = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let request = "GET /settings HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
        tcp.write_all(request.as_bytes()).await?;
        read_head(&mut tcp).await
    };
    match tokio::time::timeout(STEP_TIMEOUT, answer).await {
        Ok(Ok(head)) => {
            let status = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            match status.as_str() {
                "401" => Check::ok(
                    NAME,
                    format!("{addr} answers, and refuses its admin API without the agent's token"),
                ),
                other => Check::bad(
                    NAME,
                    Verdict::Fail,
                    format!(
                        "{addr} answers {other} to its admin API without a token: it is not locked down"
                    ),
                    "start Node-RED with the agent's settings (tether-settings.js in its user directory), or set [node_red] mode = \"launch\"",
                ),
            }
        }
        Ok(Err(e)) => Check::bad(
            NAME,
            Verdict::Fail,
            format!("nothing answers on {addr}: {e}"),
            match config.node_red.mode {
                NodeRedMode::Launch => {
                    "the agent launches it: see tetherd status and the log (node-red: lines)"
                }
                _ => "start Node-RED (mode = \"external\": the operator starts it)",
            },
        ),
        Err(_) => Check::bad(
            NAME,
            Verdict::Fail,
            format!("{addr} did not answer within {}s", STEP_TIMEOUT.as_secs()),
            "Node-RED may be hung; the agent restarts a hung Node-RED it launched",
        ),
    }
}

/// The local MQTT broker: an MQTT 5 CONNECT with the agent's login (and a
/// client id of its own, so the running agent's session is untouched),
/// answered by a CONNACK.
async fn mqtt_broker(config: &Config) -> Check {
    const NAME: &str = "mqtt broker";
    let Some(mqtt) = &config.mqtt else {
        return Check::skip(NAME, "no [mqtt] section: the bridge is off");
    };
    let connect = mqtt_connect(
        &format!("tetherd-doctor-{}", std::process::id()),
        mqtt.username.as_deref(),
        mqtt.password.as_deref(),
    );
    let broker = &mqtt.broker;
    let Some(endpoint) = mqtt.endpoint() else {
        return Check::bad(
            NAME,
            Verdict::Fail,
            format!("'{broker}' is not a broker address"),
            "fix [mqtt] broker",
        );
    };
    let tls = match crate::mqtt::broker_tls(mqtt) {
        Ok(tls) => tls,
        Err(e) => {
            return Check::bad(
                NAME,
                Verdict::Fail,
                e.to_string(),
                "fix [mqtt] ca_file, cert_file and key_file",
            );
        }
    };
    let answer = async {
        let tcp = tokio::net::TcpStream::connect((endpoint.host.as_str(), endpoint.port)).await?;
        match tls {
            // The same TLS as the bridge's: the broker's certificate must
            // chain to ca_file and name the host.
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(endpoint.host.clone())
                    .map_err(std::io::Error::other)?;
                let stream = tokio_rustls::TlsConnector::from(config)
                    .connect(name, tcp)
                    .await?;
                connack_head(stream, &connect).await
            }
            None => connack_head(tcp, &connect).await,
        }
    };
    match tokio::time::timeout(STEP_TIMEOUT, answer).await {
        Ok(Ok([0x20, _, _, 0])) => {
            Check::ok(NAME, format!("{broker} accepts the agent's MQTT 5 login"))
        }
        Ok(Ok([0x20, _, _, code @ (0x86 | 0x87)])) => Check::bad(
            NAME,
            Verdict::Fail,
            format!("{broker} refuses the agent's login (reason 0x{code:02x})"),
            "set [mqtt] username and password to a login the broker accepts",
        ),
        Ok(Ok([0x20, _, _, 0x84])) => Check::bad(
            NAME,
            Verdict::Fail,
            format!("{broker} does not speak MQTT 5"),
            "use a broker with MQTT 5 (mosquitto 1.6 or later, EMQX, HiveMQ, rumqttd)",
        ),
        Ok(Ok(head)) => Check::bad(
            NAME,
            Verdict::Fail,
            format!(
                "{broker} answered the CONNECT with {head:02x?}, not a CONNACK that accepts it"
            ),
            "check that [mqtt] broker is an MQTT broker and its log for why it refused",
        ),
        Ok(Err(e)) => Check::bad(
            NAME,
            Verdict::Fail,
            format!("nothing answers MQTT on {broker}: {e}"),
            if endpoint.tls {
                "start the local broker, or fix [mqtt] broker; with mqtts://, check that its certificate chains to ca_file and names the host"
            } else {
                "start the local broker, or fix [mqtt] broker"
            },
        ),
        Err(_) => Check::bad(
            NAME,
            Verdict::Fail,
            format!("{broker} did not answer within {}s", STEP_TIMEOUT.as_secs()),
            "check the local broker",
        ),
    }
}

/// Sends `connect` on `stream` and reads the first 4 bytes of the answer.
async fn connack_head<S>(mut stream: S, connect: &[u8]) -> std::io::Result<[u8; 4]>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(connect).await?;
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    Ok(head)
}

/// An MQTT 5 CONNECT packet (clean start, 30 s keep-alive).
fn mqtt_connect(client_id: &str, user: Option<&str>, password: Option<&str>) -> Vec<u8> {
    let field = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    let mut flags = 0x02u8;
    let mut body = Vec::new();
    field(&mut body, "MQTT");
    body.push(5);
    let flags_at = body.len();
    body.push(0);
    body.extend_from_slice(&30u16.to_be_bytes());
    body.push(0); // no properties
    field(&mut body, client_id);
    if let Some(user) = user {
        flags |= 0x80;
        field(&mut body, user);
    }
    if let Some(password) = password {
        flags |= 0x40;
        field(&mut body, password);
    }
    body[flags_at] = flags;
    let mut packet = vec![0x10];
    let mut len = body.len();
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        packet.push(byte);
        if len == 0 {
            break;
        }
    }
    packet.extend_from_slice(&body);
    packet
}

/// Free space where the stores are.
fn disk(dir: &Path, options: &Options) -> Check {
    const NAME: &str = "disk";
    let at = if dir.exists() {
        dir
    } else {
        dir.parent().unwrap_or(dir)
    };
    let stat = match rustix::fs::statvfs(at) {
        Ok(stat) => stat,
        Err(e) => {
            return Check::bad(
                NAME,
                Verdict::Fail,
                format!("{}: {e}", at.display()),
                "check the file system",
            );
        }
    };
    let free = stat.f_bavail.saturating_mul(stat.f_frsize);
    let mib = |b: u64| b / (1024 * 1024);
    let detail = format!("{} MiB free for {}", mib(free), at.display());
    if free < options.min_free {
        Check::bad(
            NAME,
            Verdict::Fail,
            detail,
            format!(
                "free at least {} MiB: the audit queue and snapshots are written there",
                mib(options.min_free)
            ),
        )
    } else if free < options.warn_free {
        Check::bad(NAME, Verdict::Warn, detail, "free some space soon")
    } else {
        Check::ok(NAME, detail)
    }
}

/// Reads an HTTP answer's head (through the blank line), bounded.
async fn read_head<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// An HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`) as Unix seconds.
fn parse_http_date(text: &str) -> Option<u64> {
    let parsed: jiff::fmt::rfc2822::DateTimeParser = jiff::fmt::rfc2822::DateTimeParser::new();
    let ts = parsed.parse_timestamp(text).ok()?;
    u64::try_from(ts.as_second()).ok()
}

/// The report as text, one line per check.
pub fn render(checks: &[Check]) -> String {
    let mut out = String::new();
    for check in checks {
        let mark = match check.verdict {
            Verdict::Ok => "ok  ",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
            Verdict::Skip => "--  ",
        };
        out.push_str(&format!("{mark} {:<16} {}\n", check.name, check.detail));
        if let Some(help) = &check.help {
            out.push_str(&format!("     {:<16} help: {help}\n", ""));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates_parse_and_skew_is_judged() {
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
        assert_eq!(parse_http_date("yesterday"), None);
        assert_eq!(skew(1000, 1010).verdict, Verdict::Ok);
        assert_eq!(skew(1000, 1100).verdict, Verdict::Warn);
        let far = skew(10_000, 1000);
        assert_eq!(far.verdict, Verdict::Fail);
        assert!(far.detail.contains("ahead of"), "{}", far.detail);
    }

    #[test]
    fn certificates_near_or_past_expiry_are_named() {
        assert_eq!(certificate(100, 200).verdict, Verdict::Fail);
        assert_eq!(certificate(100 + 3 * 86_400, 100).verdict, Verdict::Warn);
        assert_eq!(certificate(100 + 30 * 86_400, 100).verdict, Verdict::Ok);
    }

    #[test]
    fn a_state_directory_others_can_read_fails() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let check = state_dir(dir.path());
        assert_eq!(check.verdict, Verdict::Fail);
        assert!(check.help.unwrap().starts_with("chmod 700"));
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        assert_eq!(state_dir(dir.path()).verdict, Verdict::Ok);
        assert_eq!(
            state_dir(&dir.path().join("missing")).verdict,
            Verdict::Fail
        );
    }

    #[test]
    fn too_little_disk_fails_and_little_warns() {
        let dir = tempfile::tempdir().unwrap();
        let all = Options {
            min_free: u64::MAX,
            ..Options::default()
        };
        assert_eq!(disk(dir.path(), &all).verdict, Verdict::Fail);
        let warn = Options {
            min_free: 0,
            warn_free: u64::MAX,
            ..Options::default()
        };
        assert_eq!(disk(dir.path(), &warn).verdict, Verdict::Warn);
        let fine = Options {
            min_free: 0,
            warn_free: 0,
            ..Options::default()
        };
        assert_eq!(disk(dir.path(), &fine).verdict, Verdict::Ok);
    }
}
