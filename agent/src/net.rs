//! Endpoints and dialing: parse `https://` and `wss://` URLs into a host and
//! a port, resolve and connect over TCP within a deadline, and say in plain
//! words why a connection could not be made.
//!
//! This module owns only the TCP layer; TLS and HTTP are elsewhere. It never
//! retries: callers decide.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;

/// Deadline for resolving and connecting.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A parsed `scheme://host[:port][/path]` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or IP address, without brackets.
    pub host: String,
    pub port: u16,
    /// The path, `/` if none was given.
    pub path: String,
}

/// Why a URL was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("'{url}' is not a valid {scheme}:// URL: {reason}")]
pub struct UrlError {
    pub url: String,
    pub scheme: &'static str,
    pub reason: &'static str,
}

impl Endpoint {
    /// Parses a URL of the given scheme (`https` or `wss`); the port defaults
    /// to 443. No user info, query or fragment.
    pub fn parse(url: &str, scheme: &'static str) -> Result<Endpoint, UrlError> {
        let err = |reason| UrlError {
            url: url.to_owned(),
            scheme,
            reason,
        };
        let rest = url
            .strip_prefix(scheme)
            .and_then(|r| r.strip_prefix("://"))
            .ok_or_else(|| err("it must start with the scheme"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        if path.contains(['?', '#']) || authority.contains('@') {
            return Err(err("no user, query or fragment allowed"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| err("unclosed '[' in the host"))?;
            let host = &v6[..end];
            let port = match &v6[end + 1..] {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| err("junk after the host"))?,
                ),
            };
            (host, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("the host is missing or has spaces"));
        }
        let port = match port {
            None => 443,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| err("the port is not a number from 1 to 65535"))?,
        };
        Ok(Endpoint {
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }

    /// The `Host` header value.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

/// Why no TCP connection could be made.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve '{host}': {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("'{host}' resolves to no address")]
    NoAddress { host: String },
    #[error("connection to {addr} refused (nothing listens there?)")]
    Refused { addr: SocketAddr },
    #[error("no answer from {target} within {}s", .after.as_secs())]
    Timeout { target: String, after: Duration },
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Resolves `endpoint` and connects to the first address that answers,
/// within [`CONNECT_TIMEOUT`] in all.
pub async fn dial(endpoint: &Endpoint) -> Result<TcpStream, DialError> {
    let target = endpoint.authority();
    tokio::time::timeout(CONNECT_TIMEOUT, dial_inner(endpoint))
        .await
        .unwrap_or(Err(DialError::Timeout {
            target,
            after: CONNECT_TIMEOUT,
        }))
}

async fn dial_inner(endpoint: &Endpoint) -> Result<TcpStream, DialError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((endpoint.host.as_str(), endpoint.port))
        .await
        .map_err(|source| DialError::Resolve {
            host: endpoint.host.clone(),
            source,
        })?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(tcp) => {
                tether_proto::tokio_io::tune_socket(&tcp);
                return Ok(tcp);
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                last = Some(DialError::Refused { addr });
            }
            Err(source) => last = Some(DialError::Connect { addr, source }),
        }
    }
    Err(last.unwrap_or(DialError::NoAddress {
        host: endpoint.host.clone(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_host_port_and_path() {
        let cases = [
            ("https://platform.example", "platform.example", 443, "/"),
            ("https://127.0.0.1:8443/", "127.0.0.1", 8443, "/"),
            ("https://[::1]:9000", "::1", 9000, "/"),
        ];
        for (url, host, port, path) in cases {
            let e = Endpoint::parse(url, "https").unwrap();
            assert_eq!(
                (e.host.as_str(), e.port, e.path.as_str()),
                (host, port, path),
                "{url}"
            );
        }
        let e = Endpoint::parse("wss://localhost:1/v1/tunnel", "wss").unwrap();
        assert_eq!(e.path, "/v1/tunnel");
        assert_eq!(
            Endpoint::parse("https://[::1]:9000", "https")
                .unwrap()
                .authority(),
            "[::1]:9000"
        );
    }

    #[test]
    fn bad_urls_are_refused() {
        for url in [
            "http://x",
            "x:443",
            "https://",
            "https://:443",
            "https://host:0",
            "https://host:99999",
            "https://host:port",
            "https://u@host",
            "https://host/?q",
            "https://[::1",
        ] {
            assert!(Endpoint::parse(url, "https").is_err(), "{url}");
        }
    }

    #[tokio::test]
    async fn a_closed_port_is_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let e = Endpoint::parse(&format!("https://127.0.0.1:{port}"), "https").unwrap();
        assert!(matches!(dial(&e).await, Err(DialError::Refused { .. })));
    }

    #[tokio::test]
    async fn a_dialed_socket_has_nodelay_and_the_tunnel_notsent_low_water_mark() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endpoint =
            Endpoint::parse(&format!("wss://127.0.0.1:{port}/v1/tunnel"), "wss").unwrap();
        let tcp = dial(&endpoint).await.unwrap();
        assert!(tcp.nodelay().unwrap());
        assert_eq!(
            socket2::SockRef::from(&tcp).tcp_notsent_lowat().unwrap(),
            tether_proto::tokio_io::TUNNEL_NOTSENT_LOWAT
        );
    }
}
