//! What each role may do in the editor: the table of `docs/protocol.md`
//! §16.3 as one pure function, [`decide`], and the Node-RED permissions a
//! role is presented with, [`permissions`].
//!
//! This module owns the mapping from (role, protection mode, method, path,
//! WebSocket or not) to allow or deny. It never sees headers or bodies and
//! never does I/O; the proxy asks it once per request, before anything
//! reaches Node-RED, and mints the local token only for what it allowed.
//!
//! Remote editor access carries **Node-RED's editor and admin API only**:
//! every route is on an explicit allow-list of Node-RED 4's own routes (the
//! editor's static files, its read routes, and the write routes of the role
//! table). Anything else is refused for every role, `GET` included, so
//! flows' own `http in` and `websocket in` endpoints are not reachable
//! through it (a device service engineers should reach is a `[[service]]`).
//! The only WebSocket is the editor's `/comms`. A viewer gets the read
//! routes but `/credentials/...` and `/diagnostics`.
//!
//! Paths are matched the way Node-RED's router (Express) matches them:
//! case-insensitively and with one trailing slash ignored; an odd spelling
//! fails closed. Paths with empty, `.` or `..` segments are denied for every
//! method.

use http::Method;
use tether_proto::grant::Role;

/// The answer for one request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Allow,
    /// Refused; the reason is one sentence for the engineer.
    Deny(String),
}

/// The rows of the table in `docs/protocol.md` §16.3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// `GET` or `HEAD` of the editor's own read routes, and the `/comms`
    /// WebSocket.
    Read,
    /// `GET` of `/credentials/...` and `/diagnostics`: member and owner.
    SensitiveRead,
    /// `POST /flows`, `POST /flow`, `PUT`/`DELETE /flow/:id`.
    Deploy,
    /// Library writes, inject buttons, debug toggles, context deletes, user
    /// settings.
    Edit,
    /// `POST /nodes`, `PUT`/`DELETE /nodes/...`, `POST /flows/state`.
    Palette,
    /// Anything else: not part of the editor, denied to every role.
    Other,
}

/// Node-RED permissions of a member (`docs/protocol.md` §16.3).
const MEMBER: &[&str] = &[
    "read",
    "flows.write",
    "library.write",
    "inject.write",
    "debug.write",
    "context.write",
    "settings.write",
];
/// A member's or owner's permissions while protection mode is on: the member
/// list without `flows.write` (and never `nodes.write`).
const PROTECTED: &[&str] = &[
    "read",
    "library.write",
    "inject.write",
    "debug.write",
    "context.write",
    "settings.write",
];

/// The Node-RED permissions presented for `role`: viewer `read`, member the
/// member list, owner `*`; with protection mode on, member and owner get the
/// member list without `flows.write`.
pub fn permissions(role: Role, protection: bool) -> &'static [&'static str] {
    match (role, protection) {
        (Role::Viewer, _) => &["read"],
        (Role::Member, false) => MEMBER,
        (Role::Owner, false) => &["*"],
        (Role::Member | Role::Owner, true) => PROTECTED,
    }
}

/// Decides whether `role` may send `method path` now (`websocket`: as a
/// WebSocket upgrade).
pub fn decide(
    role: Role,
    protection: bool,
    method: &Method,
    path: &str,
    websocket: bool,
) -> Access {
    let route = if websocket {
        classify_websocket(method, path)
    } else {
        classify(method, path)
    };
    if protection && matches!(route, Route::Deploy | Route::Palette) {
        return Access::Deny(PROTECTED_MESSAGE.into());
    }
    let allowed = match route {
        Route::Read => true,
        Route::SensitiveRead | Route::Deploy | Route::Edit => role != Role::Viewer,
        Route::Palette => role == Role::Owner,
        Route::Other => false,
    };
    if allowed {
        Access::Allow
    } else {
        Access::Deny(denial(route, role, method, path))
    }
}

/// What a protection-mode denial says.
pub const PROTECTED_MESSAGE: &str = "instance protection mode is on: the flows on this device are \
     read-only in the editor for every role, and changes arrive only as signed snapshots from the \
     platform";

fn denial(route: Route, role: Role, method: &Method, path: &str) -> String {
    match route {
        Route::Deploy => format!("your role ({role}) may not deploy flows on this device"),
        Route::Edit => format!(
            "your role ({role}) is read-only on this device: library writes, inject buttons, \
             debug toggles, context deletes and user settings need member or owner"
        ),
        Route::Palette => format!(
            "your role ({role}) may not change the palette or start and stop flows on this \
             device; that needs owner"
        ),
        Route::SensitiveRead => format!(
            "your role ({role}) may not read credentials or diagnostics on this device; that \
             needs member or owner"
        ),
        Route::Read | Route::Other => format!(
            "{method} {path} is not part of the Node-RED editor, so remote editor access does \
             not carry it (flows' own HTTP and WebSocket endpoints are not reachable this way; \
             a device service engineers should reach is a [[service]] in tetherd.toml)"
        ),
    }
}

/// The row of a WebSocket upgrade: only the editor's `/comms` is one.
pub fn classify_websocket(method: &Method, path: &str) -> Route {
    match canonical(path).as_deref() {
        Some("/comms") if *method == Method::GET => Route::Read,
        _ => Route::Other,
    }
}

/// The row of the table a (non-WebSocket) request falls in.
pub fn classify(method: &Method, path: &str) -> Route {
    let Some(lower) = canonical(path) else {
        return Route::Other;
    };
    let segments: Vec<&str> = if lower == "/" {
        Vec::new()
    } else {
        lower.split('/').skip(1).collect()
    };
    if *method == Method::GET || *method == Method::HEAD {
        return read_route(&segments);
    }
    let m = method.as_str();
    match (m, segments.as_slice()) {
        ("POST", ["flows"] | ["flow"]) | ("PUT" | "DELETE", ["flow", _]) => Route::Deploy,
        ("POST", ["nodes"] | ["flows", "state"]) | ("PUT" | "DELETE", ["nodes", _, ..]) => {
            Route::Palette
        }
        ("POST", ["library", _, _, ..])
        | ("POST", ["inject", _])
        | ("POST", ["debug", _] | ["debug", _, _])
        | ("POST", ["settings", "user"])
        | ("DELETE", ["context", "global", _, ..])
        | ("DELETE", ["context", "node" | "flow", _, _, ..]) => Route::Edit,
        _ => Route::Other,
    }
}

/// The row of a `GET` or `HEAD`: Node-RED 4's editor and admin read routes
/// (`@node-red/editor-api`: `admin/index.js`, `editor/index.js`, the
/// editor client's static folders, and the core nodes' admin routes).
fn read_route(segments: &[&str]) -> Route {
    match segments {
        // The editor page and its static files.
        [] | ["favicon.ico"] => Route::Read,
        ["red" | "vendor" | "types", _, ..] => Route::Read,
        ["icons"] | ["icons", _, _] | ["icons", _, _, _] => Route::Read,
        ["resources", _, _, ..] => Route::Read,
        ["locales", _, ..] => Route::Read,
        ["theme", ..] => Route::Read,
        // The admin API's reads.
        ["settings"] | ["settings", "user"] => Route::Read,
        ["flows"] | ["flows", "state"] | ["flow", _] => Route::Read,
        ["nodes", ..] | ["plugins", ..] => Route::Read,
        ["context", "global", ..] | ["context", "node" | "flow", _, ..] => Route::Read,
        ["library", _, _, ..] => Route::Read,
        ["auth", "login"] => Route::Read,
        // Core nodes: the debug sidebar's pop-out, the UDP node's ports.
        ["debug", "view", _, ..] | ["udp-ports", _] => Route::Read,
        ["credentials", _, _] | ["diagnostics"] => Route::SensitiveRead,
        _ => Route::Other,
    }
}

/// The path as Node-RED's router compares it: lower case, one trailing
/// slash dropped. `None` if it is not absolute or has an empty, `.` or `..`
/// segment.
fn canonical(path: &str) -> Option<String> {
    if !path.starts_with('/') {
        return None;
    }
    let lower = path.to_ascii_lowercase();
    let trimmed = match lower.strip_suffix('/') {
        Some(t) if !t.is_empty() => t.to_owned(),
        _ => lower,
    };
    if trimmed == "/" {
        return Some(trimmed);
    }
    let bad = trimmed
        .split('/')
        .skip(1)
        .any(|s| s.is_empty() || matches!(s.replace("%2e", ".").as_str(), "." | ".."));
    (!bad).then_some(trimmed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: Role = Role::Viewer;
    const M: Role = Role::Member;
    const O: Role = Role::Owner;

    fn allowed(role: Role, protection: bool, method: &str, path: &str) -> bool {
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        decide(role, protection, &method, path, false) == Access::Allow
    }

    /// (method, path, viewer, member, owner) without protection mode.
    const TABLE: &[(&str, &str, bool, bool, bool)] = &[
        ("GET", "/", true, true, true),
        ("GET", "/flows", true, true, true),
        ("HEAD", "/settings", true, true, true),
        ("GET", "/nodes", true, true, true),
        ("GET", "/red/main.min.js", true, true, true),
        ("GET", "/vendor/monaco/dist/editor.js", true, true, true),
        ("GET", "/locales/editor?lng=en-US", true, true, true),
        ("GET", "/icons/node-red/inject.svg", true, true, true),
        ("GET", "/theme", true, true, true),
        ("GET", "/settings/user", true, true, true),
        ("GET", "/flow/f1", true, true, true),
        ("GET", "/context/global", true, true, true),
        ("GET", "/context/flow/f1/counter", true, true, true),
        ("GET", "/library/local/flows/", true, true, true),
        ("GET", "/debug/view/view.html", true, true, true),
        // Reads a viewer does not get.
        ("GET", "/credentials/mqtt-broker/b1", false, true, true),
        ("GET", "/diagnostics", false, true, true),
        // Not part of the editor: flows' own endpoints, odd paths.
        ("GET", "/hello", false, false, false),
        ("GET", "/api/data", false, false, false),
        ("GET", "/comms", false, false, false),
        ("GET", "/red", false, false, false),
        ("GET", "/projects", false, false, false),
        ("GET", "/settings/user/keys", false, false, false),
        // Deploy.
        ("POST", "/flows", false, true, true),
        ("POST", "/flow", false, true, true),
        ("PUT", "/flow/abc", false, true, true),
        ("DELETE", "/flow/abc", false, true, true),
        ("POST", "/FLOWS/", false, true, true),
        // Library, inject, debug, context, user settings.
        ("POST", "/library/local/flows/my/flow", false, true, true),
        ("POST", "/inject/n1", false, true, true),
        ("POST", "/debug/n1/enable", false, true, true),
        ("POST", "/debug/disable", false, true, true),
        ("DELETE", "/context/global/counter", false, true, true),
        ("DELETE", "/context/flow/f1/counter", false, true, true),
        ("DELETE", "/context/node/n1/counter", false, true, true),
        ("POST", "/settings/user", false, true, true),
        // Palette.
        ("POST", "/nodes", false, false, true),
        ("PUT", "/nodes/node-red-contrib-x", false, false, true),
        ("PUT", "/nodes/@scope/module/set", false, false, true),
        ("DELETE", "/nodes/node-red-contrib-x", false, false, true),
        ("POST", "/flows/state", false, false, true),
        // Anything else that is not GET or HEAD.
        ("POST", "/auth/token", false, false, false),
        ("POST", "/auth/revoke", false, false, false),
        ("POST", "/projects", false, false, false),
        ("POST", "/settings/user/keys", false, false, false),
        ("PUT", "/flows", false, false, false),
        ("PATCH", "/flow/abc", false, false, false),
        ("OPTIONS", "/flows", false, false, false),
        ("DELETE", "/context/global", false, false, false),
        ("POST", "/flow/abc", false, false, false),
        ("POST", "/%66lows", false, false, false),
        ("POST", "//flows", false, false, false),
        ("POST", "/inject/../flows", false, false, false),
        ("GET", "/../settings", false, false, false),
        ("GET", "/x/%2E%2e/settings", false, false, false),
        ("POST", "flows", false, false, false),
    ];

    #[test]
    fn the_role_table_without_protection() {
        for &(method, path, viewer, member, owner) in TABLE {
            for (role, want) in [(V, viewer), (M, member), (O, owner)] {
                assert_eq!(
                    allowed(role, false, method, path),
                    want,
                    "{role} {method} {path}"
                );
            }
        }
    }

    #[test]
    fn only_the_comms_websocket_is_carried() {
        for role in [V, M, O] {
            let ws = |path| decide(role, false, &Method::GET, path, true);
            assert_eq!(ws("/comms"), Access::Allow);
            assert_eq!(ws("/COMMS/"), Access::Allow);
            for other in ["/ws/commands", "/flows", "/", "/comms/x"] {
                assert!(matches!(ws(other), Access::Deny(_)), "{role} {other}");
            }
        }
    }

    #[test]
    fn protection_mode_removes_deploy_and_palette_from_every_role() {
        for &(method, path, viewer, member, owner) in TABLE {
            let route = classify(&Method::from_bytes(method.as_bytes()).unwrap(), path);
            let kept = !matches!(route, Route::Deploy | Route::Palette);
            for (role, want) in [(V, viewer), (M, member), (O, owner)] {
                assert_eq!(
                    allowed(role, true, method, path),
                    want && kept,
                    "{role} {method} {path} with protection"
                );
            }
        }
    }

    #[test]
    fn denials_say_why() {
        let deny = |role, protection, method: Method, path| match decide(
            role, protection, &method, path, false,
        ) {
            Access::Deny(reason) => reason,
            Access::Allow => panic!("allowed: {role} {method} {path}"),
        };
        assert_eq!(
            deny(V, false, Method::POST, "/flows"),
            "your role (viewer) may not deploy flows on this device"
        );
        assert!(deny(M, false, Method::POST, "/nodes").contains("needs owner"));
        let protected = deny(O, true, Method::POST, "/flows");
        assert!(protected.contains("read-only"), "{protected}");
        assert!(protected.contains("signed snapshots"), "{protected}");
        let other = deny(O, false, Method::PUT, "/flows");
        assert!(
            other.starts_with("PUT /flows is not part of the Node-RED editor"),
            "{other}"
        );
        assert!(deny(O, false, Method::GET, "/hello").contains("[[service]]"));
        assert!(deny(V, false, Method::GET, "/credentials/t/i").contains("needs member"));
    }

    #[test]
    fn the_permissions_presented_follow_role_and_protection() {
        assert_eq!(permissions(V, false), ["read"]);
        assert_eq!(permissions(V, true), ["read"]);
        assert_eq!(permissions(O, false), ["*"]);
        assert_eq!(permissions(M, false), MEMBER);
        for role in [M, O] {
            let p = permissions(role, true);
            assert!(!p.contains(&"flows.write") && !p.contains(&"nodes.write"));
            assert!(p.contains(&"library.write"));
        }
    }
}
