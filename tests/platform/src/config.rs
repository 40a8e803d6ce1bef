//! Everything a [`crate::Platform`] can be told, with defaults sized for a
//! fleet of thousands of devices on one small server.
//!
//! This module owns the knobs and their defaults; it never opens a file or a
//! socket.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use tether_proto::tokio_io::websocket_config;
use tether_proto::{Config, Role};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::rate_limit::RateLimit;
use crate::users::PasswordCost;

/// The platform's configuration. Build it with [`PlatformConfig::new`], then
/// change any public field.
#[derive(Clone, Debug)]
pub struct PlatformConfig {
    /// Where the CA, the keys, the admin token and `platform.redb` live.
    pub data_dir: PathBuf,
    /// The HTTPS listener's address. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Names in the server certificate (DNS names or IP addresses). The first
    /// is the public host: `url()` and the tunnel URL use it.
    pub names: Vec<String>,
    /// How long device certificates are valid (enrollment and renewal).
    pub cert_validity: Duration,
    /// A device may renew when its certificate has at most this long left
    /// (or whenever the platform asked it to).
    pub renewal_window: Duration,
    /// Renewals per device in any hour.
    pub max_renewals_per_hour: usize,
    /// How long a device's previous certificate stays accepted after a
    /// renewal, at most: it ends sooner, when the device first connects
    /// with the new one.
    pub cert_grace: Duration,
    /// Enrollment attempts per source address.
    pub enroll_rate: RateLimit,
    /// Failed admin authentications per source address.
    pub admin_failure_rate: RateLimit,
    /// Bound on the TLS handshake and on reading a request's headers.
    pub handshake_timeout: Duration,
    /// Connections (tunnels included) held at once; more are dropped.
    pub max_connections: usize,
    /// How long a device has to accept a stream the platform opens.
    pub open_timeout: Duration,
    /// How long shutdown waits for tunnels to close gracefully.
    pub shutdown_grace: Duration,
    /// The tunnel protocol's configuration (role: platform).
    pub tunnel: Config,
    /// tungstenite's read buffer per tunnel. It is allocated, and zeroed, in
    /// full for every tunnel, idle or not: it dominates an idle tunnel's
    /// memory, so the platform keeps it much smaller than the device does.
    /// Larger messages still arrive: the buffer grows to fit them.
    pub ws_read_buffer: usize,
    /// tungstenite's write buffer target per tunnel (grown only when used).
    /// Messages are written to TLS once this much is buffered, or when there
    /// is nothing more to send: below one DATA frame (16 KiB) every message
    /// became its own TLS write, a full record and a tiny one, and its own
    /// system call, which made the platform's send path cost a third more
    /// CPU per byte (`docs/benchmarks.md`).
    pub ws_write_buffer: usize,
    /// Whether platform-side listeners (the admin listen endpoint) may bind
    /// addresses other than loopback.
    pub allow_remote_listen: bool,
    /// Platform-side listeners held at once.
    pub max_listeners: usize,
    /// Connections one platform-side listener carries at once.
    pub max_listener_connections: usize,
    /// Login attempts per source address (`POST /login`).
    pub login_rate: RateLimit,
    /// Failed logins per (user name, source prefix: /32 for IPv4, /64 for
    /// IPv6). A correct password from another source is not refused.
    pub login_failure_rate: RateLimit,
    /// Recent failed logins per user name from anywhere, for the per-user
    /// slow-down: the bucket remembers up to `burst` failures and forgets
    /// one every `refill`; every login to that name waits
    /// `login_slowdown_step` for each failure remembered, at most
    /// `login_slowdown_max`. It delays, never refuses.
    pub login_slowdown_rate: RateLimit,
    /// Delay per recent failure remembered.
    pub login_slowdown_step: Duration,
    /// Longest per-user login delay.
    pub login_slowdown_max: Duration,
    /// Keys (addresses, user names, user and prefix pairs) each rate
    /// limiter tracks at once. A limiting bucket is never forgotten; when a
    /// table holds nothing else, unknown keys are refused until buckets
    /// refill.
    pub rate_limit_max_sources: usize,
    /// A web session ends after this long unused; each use extends it.
    pub session_idle: Duration,
    /// ... but never beyond this long after login.
    pub session_max: Duration,
    /// Argon2id cost of new password hashes (and of the dummy hash unknown
    /// user names are checked against).
    pub password_cost: PasswordCost,
    /// How long the editor proxy waits for a device's response headers
    /// after sending a request; then the browser gets 504.
    pub editor_timeout: Duration,
    /// Bytes of Node-RED editor files the asset cache holds
    /// (`crate::editor_cache`); 0 caches nothing.
    pub editor_cache_bytes: usize,
    /// The DNS domain under which each device's editor has an origin of its
    /// own, `https://dev-<hex>.DOMAIN:PORT` (`crate::origin`). `None`: the
    /// default, `devices.` and the public host, when that is a DNS name.
    /// The server certificate covers `*.DOMAIN`; `DOMAIN` must resolve (a
    /// wildcard DNS record; browsers resolve every `*.localhost` name to
    /// loopback on their own).
    pub editor_domain: Option<String>,
    /// Lifetime of the editor access grants the platform signs; at most
    /// `tether_proto::grant::MAX_LIFETIME_SECS` (five minutes, the
    /// default). Shorter in tests of what outlives a grant.
    pub grant_lifetime: Duration,
    /// The MQTT bridge (`crate::mqtt`): off by default here, so tests and
    /// embedders start no broker they do not use; `tether-platform serve`
    /// starts an embedded one unless told otherwise.
    pub mqtt: crate::mqtt::MqttConfig,
}

impl PlatformConfig {
    /// Defaults for everything but the data directory and the address.
    pub fn new(data_dir: impl Into<PathBuf>, listen: SocketAddr) -> PlatformConfig {
        PlatformConfig {
            data_dir: data_dir.into(),
            listen,
            names: vec!["localhost".to_string(), "127.0.0.1".to_string()],
            cert_validity: Duration::from_secs(30 * 24 * 3600),
            renewal_window: Duration::from_secs(15 * 24 * 3600),
            max_renewals_per_hour: 3,
            cert_grace: Duration::from_secs(24 * 3600),
            enroll_rate: RateLimit::ENROLL,
            admin_failure_rate: RateLimit::ADMIN_FAILURES,
            handshake_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            open_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(2),
            tunnel: Config::new(Role::Platform),
            ws_read_buffer: 8 * 1024,
            ws_write_buffer: 128 * 1024,
            allow_remote_listen: false,
            max_listeners: 64,
            max_listener_connections: 256,
            login_rate: RateLimit::LOGIN,
            login_failure_rate: RateLimit::LOGIN_FAILURES,
            login_slowdown_rate: RateLimit::LOGIN_SLOWDOWN,
            login_slowdown_step: Duration::from_millis(150),
            login_slowdown_max: Duration::from_secs(3),
            rate_limit_max_sources: crate::rate_limit::DEFAULT_MAX_SOURCES,
            session_idle: Duration::from_secs(14 * 24 * 3600),
            session_max: Duration::from_secs(30 * 24 * 3600),
            password_cost: PasswordCost::DEFAULT,
            editor_timeout: Duration::from_secs(30),
            editor_cache_bytes: crate::editor_cache::MAX_BYTES,
            editor_domain: None,
            grant_lifetime: Duration::from_secs(tether_proto::grant::MAX_LIFETIME_SECS),
            mqtt: crate::mqtt::MqttConfig::default(),
        }
    }

    /// The WebSocket limits of a tunnel: the protocol's (one frame per
    /// message, bounded write buffer) with the platform's buffer sizes.
    pub fn websocket(&self) -> WebSocketConfig {
        let base = websocket_config(&self.tunnel.settings);
        let max_write = base.max_write_buffer_size.max(self.ws_write_buffer + 1);
        base.read_buffer_size(self.ws_read_buffer)
            .write_buffer_size(self.ws_write_buffer)
            .max_write_buffer_size(max_write)
    }

    /// The public host: the first name.
    pub fn public_host(&self) -> &str {
        self.names.first().map_or("localhost", String::as_str)
    }

    /// The certificate rules of [`crate::certs`].
    pub fn cert_policy(&self) -> crate::certs::CertPolicy {
        crate::certs::CertPolicy {
            window: self.renewal_window.as_secs(),
            max_per_hour: self.max_renewals_per_hour,
            grace: self.cert_grace.as_secs(),
        }
    }

    /// The domain of the device editor origins, if there is one (see
    /// [`PlatformConfig::editor_domain`]).
    pub fn editor_domain(&self) -> Option<String> {
        match &self.editor_domain {
            Some(domain) => Some(domain.trim_matches('.').to_ascii_lowercase()),
            None => {
                let host = self.public_host();
                (host.parse::<std::net::IpAddr>().is_err())
                    .then(|| format!("devices.{}", host.to_ascii_lowercase()))
            }
        }
    }

    /// Names in the server certificate: the configured ones and
    /// `*.EDITOR_DOMAIN`.
    pub fn certificate_names(&self) -> Vec<String> {
        let mut names = self.names.clone();
        if let Some(domain) = self.editor_domain() {
            names.push(format!("*.{domain}"));
        }
        names
    }

    /// Checks what would otherwise fail later, with a message that says what
    /// to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.names.is_empty() {
            return Err("at least one --name is needed for the server certificate".into());
        }
        if let Some(bad) = self
            .names
            .iter()
            .find(|n| n.is_empty() || n.contains(char::is_whitespace))
        {
            return Err(format!(
                "'{bad}' is not a valid --name (a DNS name or an IP address)"
            ));
        }
        if let Some(domain) = &self.editor_domain {
            let d = domain.trim_matches('.');
            let valid = !d.is_empty()
                && d.parse::<std::net::IpAddr>().is_err()
                && d.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                });
            if !valid {
                return Err(format!(
                    "'{domain}' is not a valid editor domain: give a DNS name such as devices.example.com, under which dev-<id>.DOMAIN resolves to the platform"
                ));
            }
        }
        if self.tunnel.role != Role::Platform {
            return Err("the tunnel configuration's role must be Role::Platform".into());
        }
        self.tunnel.validate().map_err(|e| e.to_string())?;
        if self.max_connections == 0 {
            return Err("max_connections must be at least 1".into());
        }
        if self.max_listeners == 0 || self.max_listener_connections == 0 {
            return Err("max_listeners and max_listener_connections must be at least 1".into());
        }
        if self.ws_read_buffer < 1024 || self.ws_write_buffer < 1024 {
            return Err("WebSocket buffers must be at least 1024 bytes".into());
        }
        if self.grant_lifetime < Duration::from_secs(1)
            || self.grant_lifetime.as_secs() > tether_proto::grant::MAX_LIFETIME_SECS
        {
            return Err(format!(
                "grant_lifetime must be 1 s to {} s",
                tether_proto::grant::MAX_LIFETIME_SECS
            ));
        }
        if self.max_renewals_per_hour == 0 {
            return Err("max_renewals_per_hour must be at least 1".into());
        }
        if self.cert_validity < Duration::from_secs(60) {
            return Err("cert_validity must be at least 60 s".into());
        }
        self.password_cost
            .validate()
            .map_err(|e| format!("password_cost: {e}"))?;
        if self.rate_limit_max_sources == 0 {
            return Err("rate_limit_max_sources must be at least 1".into());
        }
        if self.session_idle < Duration::from_secs(2) || self.session_max < self.session_idle {
            return Err(
                "session_idle must be at least 2 s and session_max at least session_idle".into(),
            );
        }
        if self.editor_timeout.is_zero() {
            return Err("editor_timeout must be more than 0".into());
        }
        self.mqtt.validate()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> PlatformConfig {
        PlatformConfig::new("/tmp/unused", "127.0.0.1:0".parse().unwrap())
    }

    #[test]
    fn the_editor_domain_follows_the_public_host_and_the_certificate_covers_it() {
        let c = config();
        assert_eq!(c.editor_domain().as_deref(), Some("devices.localhost"));
        assert!(
            c.certificate_names()
                .contains(&"*.devices.localhost".to_string())
        );
        // An IP address as the public host has no editor domain of its own.
        let mut ip = config();
        ip.names = vec!["127.0.0.1".into()];
        assert_eq!(ip.editor_domain(), None);
        assert!(!ip.certificate_names().iter().any(|n| n.starts_with('*')));
        let mut set = config();
        set.editor_domain = Some("Editors.Example.COM.".into());
        assert_eq!(set.editor_domain().as_deref(), Some("editors.example.com"));
        assert_eq!(set.validate(), Ok(()));
    }

    #[test]
    fn bad_editor_domains_and_grant_lifetimes_are_refused() {
        for bad in [
            "",
            "10.0.0.1",
            "a..b",
            "under_score.example",
            "sp ace.example",
        ] {
            let mut c = config();
            c.editor_domain = Some(bad.into());
            assert!(c.validate().is_err(), "{bad:?}");
        }
        for (secs, ok) in [(0, false), (1, true), (300, true), (301, false)] {
            let mut c = config();
            c.grant_lifetime = Duration::from_secs(secs);
            assert_eq!(c.validate().is_ok(), ok, "{secs} s");
        }
        let mut c = config();
        c.max_renewals_per_hour = 0;
        assert!(c.validate().is_err());
    }
}
