//! Which headers cross the proxy (`docs/protocol.md` §16.1, §16.4).
//!
//! Towards Node-RED the proxy removes every credential the browser or the
//! platform might carry (`Authorization`, `Cookie`, `Proxy-Authorization`),
//! every `X-Tether-*` header (only the agent sets those), the hop-by-hop
//! headers of RFC 9110 §7.6.1 with any header `Connection` names, `Host`
//! and `Expect` (the rules both ends share: `tether_proto::editor_headers`);
//! then it sets `Host` and the agent's own token header. A
//! WebSocket upgrade keeps its `Upgrade: websocket` and gets a fresh
//! `Connection: upgrade`. Answers lose their hop-by-hop headers, except a
//! `101`, which needs them. This module only edits header maps; it never
//! logs a header value.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use tether_proto::editor_headers::{strip_hop_by_hop, strip_request, strip_tether_headers};

pub use crate::node_red::TOKEN_HEADER;
pub use tether_proto::editor_headers::is_websocket_upgrade;

/// Prepares a request's headers for Node-RED at `host`, with `token` (if the
/// local Node-RED is locked down) in [`TOKEN_HEADER`].
pub fn to_node_red(headers: &mut HeaderMap, host: &str, token: Option<HeaderValue>) {
    let websocket = is_websocket_upgrade(headers);
    strip_request(headers);
    headers.remove(header::HOST);
    if let Ok(host) = HeaderValue::from_str(host) {
        headers.insert(header::HOST, host);
    }
    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if let Some(mut token) = token {
        token.set_sensitive(true);
        headers.insert(HeaderName::from_static(TOKEN_HEADER), token);
    }
}

/// Prepares an answer's headers for the platform. A `101` keeps them all.
pub fn from_node_red(headers: &mut HeaderMap, switching_protocols: bool) {
    if !switching_protocols {
        strip_hop_by_hop(headers);
    }
    strip_tether_headers(headers);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in pairs {
            headers.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        headers
    }

    fn names(headers: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = headers.keys().map(|k| k.to_string()).collect();
        names.sort();
        names
    }

    #[test]
    fn credentials_tether_and_hop_by_hop_headers_never_reach_node_red() {
        let mut headers = map(&[
            ("authorization", "Bearer browser"),
            ("cookie", "sid=1"),
            ("proxy-authorization", "Basic x"),
            ("x-tether-token", "forged"),
            ("X-Tether-User", "admin"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("host", "platform.example"),
            ("expect", "100-continue"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("node-red-deployment-type", "full"),
        ]);
        let token = HeaderValue::from_static("v1.local.token");
        to_node_red(&mut headers, "127.0.0.1:1880", Some(token));
        assert_eq!(
            names(&headers),
            [
                "accept",
                "content-type",
                "host",
                "node-red-deployment-type",
                "x-tether-token"
            ]
        );
        assert_eq!(headers["host"], "127.0.0.1:1880");
        assert_eq!(headers[TOKEN_HEADER], "v1.local.token");
        assert!(headers[TOKEN_HEADER].is_sensitive());
    }

    #[test]
    fn a_websocket_upgrade_keeps_its_upgrade() {
        let mut headers = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
            ("cookie", "sid=1"),
        ]);
        assert!(is_websocket_upgrade(&headers));
        to_node_red(&mut headers, "127.0.0.1:1880", None);
        assert_eq!(headers["connection"], "upgrade");
        assert_eq!(headers["upgrade"], "websocket");
        assert_eq!(headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
        assert!(!headers.contains_key("cookie"));
        assert!(!headers.contains_key(TOKEN_HEADER));
    }

    #[test]
    fn other_upgrades_are_plain_requests() {
        let mut headers = map(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert!(!is_websocket_upgrade(&headers));
        to_node_red(&mut headers, "127.0.0.1:1880", None);
        assert_eq!(names(&headers), ["host"]);
    }

    #[test]
    fn answers_lose_hop_by_hop_headers_unless_switching_protocols() {
        let pairs = [
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            ("x-tether-debug", "1"),
        ];
        let mut ok = map(&pairs);
        from_node_red(&mut ok, false);
        assert_eq!(names(&ok), ["sec-websocket-accept"]);
        let mut switching = map(&pairs);
        from_node_red(&mut switching, true);
        assert_eq!(
            names(&switching),
            ["connection", "sec-websocket-accept", "upgrade"]
        );
    }
}
