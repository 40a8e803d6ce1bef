//! The HTTP headers that never cross an editor stream (`docs/protocol.md`
//! §16.1), in one place for both of its ends: the platform strips them from
//! the browser's requests before they enter the stream, and the device
//! strips them again before anything reaches Node-RED, so neither end
//! relies on the other.
//!
//! This module only edits header maps. It never logs a header value and
//! never decides anything beyond which names go.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Every header whose name starts with this is the agent's own (the local
/// token to Node-RED); from anyone else it is a forgery.
pub const TETHER_PREFIX: &str = "x-tether-";

/// Hop-by-hop headers (RFC 9110 §7.6.1, with the older `Keep-Alive` and
/// `Proxy-Connection`). `Upgrade` is among them: the end that carries a
/// WebSocket sets it again.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes the hop-by-hop headers, and those `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(&HOP_BY_HOP) {
        headers.remove(name);
    }
}

/// Removes every `X-Tether-*` header.
pub fn strip_tether_headers(headers: &mut HeaderMap) {
    let tether: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with(TETHER_PREFIX))
        .cloned()
        .collect();
    for name in tether {
        headers.remove(name);
    }
}

/// What a request towards the device (and on the device, towards Node-RED)
/// loses: hop-by-hop headers, credentials (`Authorization`, `Cookie`,
/// `Proxy-Authorization`), `Expect` (each end sends whole bodies; an interim
/// `100 Continue` is each hop's own business) and `X-Tether-*`.
pub fn strip_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    for name in [header::AUTHORIZATION, header::COOKIE, header::EXPECT] {
        headers.remove(name);
    }
    strip_tether_headers(headers);
}

/// True if the request asks for a WebSocket upgrade: `Upgrade` names
/// `websocket` and `Connection` names `upgrade` (any case).
pub fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    let has = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|value| has_token(value, token))
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// True when the request's `Accept-Encoding` lists gzip (or `*`) with a
/// non-zero weight: the device may compress its answer, and the platform
/// may serve the gzip form of a cached file.
pub fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim();
            let refused = parts.any(|p| {
                let p = p.trim();
                p.strip_prefix("q=")
                    .or_else(|| p.strip_prefix("Q="))
                    .is_some_and(|q| q.trim().parse::<f32>().map_or(true, |q| q <= 0.0))
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

/// True if the comma-separated header value holds `token` (any case).
fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
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
    fn credentials_tether_and_hop_by_hop_headers_never_cross() {
        let mut headers = map(&[
            ("cookie", "tether_session=abc"),
            ("authorization", "Basic x"),
            ("proxy-authorization", "Basic y"),
            ("proxy-authenticate", "Basic"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("expect", "100-continue"),
            ("x-tether-token", "forged"),
            ("X-Tether-User", "root"),
            ("upgrade", "h2c"),
            ("accept", "text/html"),
            ("host", "platform:8443"),
        ]);
        strip_request(&mut headers);
        assert_eq!(names(&headers), ["accept", "host"]);
    }

    #[test]
    fn an_answer_keeps_its_end_to_end_headers() {
        let mut headers = map(&[
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("set-cookie", "a=b"),
            ("content-type", "text/html"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(names(&headers), ["content-type", "set-cookie"]);
    }

    #[test]
    fn only_a_websocket_upgrade_is_one() {
        let ws = map(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert!(is_websocket_upgrade(&ws));
        assert!(!is_websocket_upgrade(&map(&[
            ("connection", "upgrade"),
            ("upgrade", "h2c")
        ])));
        assert!(!is_websocket_upgrade(&map(&[("upgrade", "websocket")])));
        assert!(!is_websocket_upgrade(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn gzip_is_accepted_only_when_listed_with_a_weight() {
        for (value, want) in [
            ("gzip, deflate, br", true),
            ("br;q=1.0, gzip;q=0.5", true),
            ("GZIP", true),
            ("*", true),
            ("gzip;q=0", false),
            ("gzip; q=0.0", false),
            ("identity", false),
            ("br, deflate", false),
            ("", false),
        ] {
            assert_eq!(
                accepts_gzip(&map(&[("accept-encoding", value)])),
                want,
                "{value}"
            );
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
