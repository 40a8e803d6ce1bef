//! Origins: the platform's own, and one per device for its editor.
//!
//! The platform's pages (login, the device list, protection mode) live on
//! the platform's origin, `https://HOST:PORT`. Each device's Node-RED editor
//! is served from an origin of its own,
//! `https://dev-<hex>.EDITOR_DOMAIN:PORT` (`EDITOR_DOMAIN` defaults to
//! `devices.HOST`), so that whatever a device serves (a compromised agent, a
//! flow's page, a leaked enrollment) runs in the browser with that device's
//! origin: it cannot read the platform's pages, register a service worker
//! over them, or send the platform's forms with the engineer's cookies. The
//! device id's `_` becomes `-` in the host name (`dev_0a1b...` is served at
//! `dev-0a1b...`), since `_` is not valid in a host name.
//!
//! This module also owns the fetch-metadata rules both origins apply to
//! every request from a browser ([`check_request`]): a request another
//! site or another origin makes is refused unless it is a top-level
//! navigation by `GET`, and a request that changes state (any method but
//! `GET`, `HEAD`) or opens a WebSocket must come from the origin it is sent
//! to. Requests without fetch metadata (command-line clients) are judged by
//! `Origin` alone. Device origins may share a site with the platform and
//! with each other, so `SameSite` cookies alone protect nothing here.
//!
//! It never decides who is logged in or what a user may reach.

use http::{HeaderMap, Method, header};

/// The host-name prefix of a device origin, in place of the id's `dev_`.
const LABEL_PREFIX: &str = "dev-";

/// The host of a request (`Host` without the port), lower case, and its
/// port if one was given.
pub fn request_host(headers: &HeaderMap) -> Option<(String, Option<u16>)> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let authority: http::uri::Authority = host.parse().ok()?;
    Some((authority.host().to_ascii_lowercase(), authority.port_u16()))
}

/// The host-name label of device `id`: `dev_0a1b` -> `dev-0a1b`.
pub fn device_label(id: &str) -> String {
    match id.strip_prefix(tether_proto::api::DEVICE_ID_PREFIX) {
        Some(rest) => format!("{LABEL_PREFIX}{rest}"),
        None => id.to_string(),
    }
}

/// The device whose editor origin `host` is, under `domain`: `Some(id)`
/// for `dev-<hex>.<domain>` with a well-formed id, `None` for anything
/// else (the platform's own host included).
pub fn device_of_host(host: &str, domain: &str) -> Option<String> {
    let label = host
        .strip_suffix(domain)?
        .strip_suffix('.')
        .filter(|label| !label.contains('.'))?;
    let id = format!(
        "{}{}",
        tether_proto::api::DEVICE_ID_PREFIX,
        label.strip_prefix(LABEL_PREFIX)?
    );
    tether_proto::api::is_device_id(&id).then_some(id)
}

/// `https://HOST[:PORT]`.
pub fn https_origin(host: &str, port: Option<u16>) -> String {
    match port {
        Some(port) => format!("https://{host}:{port}"),
        None => format!("https://{host}"),
    }
}

/// The editor origin of device `id`.
pub fn device_origin(domain: &str, id: &str, port: Option<u16>) -> String {
    https_origin(&format!("{}.{domain}", device_label(id)), port)
}

/// Why a browser's request was refused before anything else looked at it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Another site or origin made the request, and it is not a top-level
    /// navigation.
    CrossOrigin,
    /// A state-changing request or a WebSocket whose `Origin` is not this
    /// origin.
    ForeignOrigin,
}

impl Refused {
    /// One sentence for the person whose browser sent it.
    pub fn message(self) -> &'static str {
        match self {
            Refused::CrossOrigin => {
                "This address may only be used by pages of its own origin; another site or device page asked for it."
            }
            Refused::ForeignOrigin => {
                "This request may only be sent from pages of its own origin; it came from another site or device."
            }
        }
    }
}

/// The fetch-metadata and `Origin` rules for a request to `expected`
/// (`https://host[:port]`), see the module docs.
pub fn check_request(
    headers: &HeaderMap,
    method: &Method,
    websocket: bool,
    expected: &str,
) -> Result<(), Refused> {
    let site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let mode = headers
        .get("sec-fetch-mode")
        .and_then(|v| v.to_str().ok())
        .map(str::to_ascii_lowercase);
    let safe = *method == Method::GET || *method == Method::HEAD;
    // "none": typed in the address bar, a bookmark. "same-origin": ours.
    let foreign = matches!(site.as_deref(), Some("cross-site" | "same-site"));
    let navigation = mode.as_deref() == Some("navigate") && safe;
    if foreign && !navigation && !websocket {
        return Err(Refused::CrossOrigin);
    }
    if websocket || !safe {
        // Browsers send Origin with every such request; a client without
        // one is not a browser riding on someone's cookies.
        if let Some(origin) = headers.get(header::ORIGIN) {
            let same = origin
                .to_str()
                .is_ok_and(|o| o.eq_ignore_ascii_case(expected));
            if !same {
                return Err(Refused::ForeignOrigin);
            }
        } else if foreign {
            return Err(Refused::ForeignOrigin);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const ID: &str = "dev_0123456789abcdef0123";

    #[test]
    fn device_hosts_map_to_ids_and_nothing_else_does() {
        let domain = "devices.localhost";
        assert_eq!(device_label(ID), "dev-0123456789abcdef0123");
        let host = format!("{}.{domain}", device_label(ID));
        assert_eq!(device_of_host(&host, domain).as_deref(), Some(ID));
        for bad in [
            "localhost",
            "devices.localhost",
            "x.devices.localhost",
            "dev-0123.devices.localhost",
            "a.dev-0123456789abcdef0123.devices.localhost",
            "dev-0123456789ABCDEF0123.devices.localhost",
            "dev_0123456789abcdef0123.devices.localhost",
            "dev-0123456789abcdef0123.devices.localhost.evil",
            "dev-0123456789abcdef0123xdevices.localhost",
        ] {
            assert_eq!(device_of_host(bad, domain), None, "{bad}");
        }
        assert_eq!(
            device_origin(domain, ID, Some(8443)),
            "https://dev-0123456789abcdef0123.devices.localhost:8443"
        );
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn fetch_metadata_keeps_other_origins_to_navigations() {
        let me = "https://localhost:8443";
        let ok = |h: &[(&'static str, &'static str)], m: Method, ws: bool| {
            check_request(&headers(h), &m, ws, me)
        };
        // Own pages, address bar, command-line clients.
        assert_eq!(
            ok(&[("sec-fetch-site", "same-origin")], Method::GET, false),
            Ok(())
        );
        assert_eq!(
            ok(&[("sec-fetch-site", "none")], Method::GET, false),
            Ok(())
        );
        assert_eq!(ok(&[], Method::POST, false), Ok(()));
        // A device page linking here: a navigation, fine.
        let nav = [
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "navigate"),
        ];
        assert_eq!(ok(&nav, Method::GET, false), Ok(()));
        // A device page fetching or embedding this origin: refused.
        let fetch = [("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors")];
        assert_eq!(ok(&fetch, Method::GET, false), Err(Refused::CrossOrigin));
        let script = [
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "no-cors"),
        ];
        assert_eq!(ok(&script, Method::GET, false), Err(Refused::CrossOrigin));
        // A form posted from a device page, even as a navigation.
        let form = [
            ("sec-fetch-site", "same-site"),
            ("sec-fetch-mode", "navigate"),
            ("origin", "https://dev-1.devices.localhost:8443"),
        ];
        assert_eq!(ok(&form, Method::POST, false), Err(Refused::CrossOrigin));
        // Origin alone, as old browsers send it.
        let foreign = [("origin", "https://dev-1.devices.localhost:8443")];
        assert_eq!(
            ok(&foreign, Method::POST, false),
            Err(Refused::ForeignOrigin)
        );
        assert_eq!(
            ok(&[("origin", "https://localhost:8443")], Method::POST, false),
            Ok(())
        );
        // WebSockets: Origin decides.
        let ws_foreign = [
            ("sec-fetch-site", "same-site"),
            ("origin", "https://dev-2.devices.localhost:8443"),
        ];
        assert_eq!(
            ok(&ws_foreign, Method::GET, true),
            Err(Refused::ForeignOrigin)
        );
        let ws_own = [
            ("sec-fetch-site", "same-origin"),
            ("origin", "https://localhost:8443"),
        ];
        assert_eq!(ok(&ws_own, Method::GET, true), Ok(()));
        assert_eq!(
            ok(&[("sec-fetch-site", "same-site")], Method::GET, true),
            Err(Refused::ForeignOrigin)
        );
    }
}
