//! What each role may do in the editor: the table of `docs/protocol.md`
//! §16.3 as one pure function, [`decide`], and the Node-RED permissions a
//! role is presented with, [`permissions`].
//!
//! This module owns the mapping from (role, protection mode, method, path)
//! to allow or deny. It never sees headers or bodies and never does I/O; the
//! proxy asks it once per request, before anything reaches Node-RED.
//!
//! Paths are matched the way Node-RED's router (Express) matches them:
//! case-insensitively and with one trailing slash ignored. Everything that
//! is not a `GET` or `HEAD` and not named in the table is denied, so an odd
//! spelling of a write route fails closed. Paths with `.` or `..` segments
//! are denied for every method.

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
    /// `GET` or `HEAD` of anything, the `/comms` WebSocket included.
    Read,
    /// `POST /flows`, `POST /flow`, `PUT`/`DELETE /flow/:id`.
    Deploy,
    /// Library writes, inject buttons, debug toggles, context deletes, user
    /// settings.
    Edit,
    /// `POST /nodes`, `PUT`/`DELETE /nodes/...`, `POST /flows/state`.
    Palette,
    /// Anything else: denied to every role.
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

/// Decides whether `role` may send `method path` now.
pub fn decide(role: Role, protection: bool, method: &Method, path: &str) -> Access {
    let route = classify(method, path);
    if protection && matches!(route, Route::Deploy | Route::Palette) {
        return Access::Deny(PROTECTED_MESSAGE.into());
    }
    let allowed = match route {
        Route::Read => true,
        Route::Deploy | Route::Edit => role != Role::Viewer,
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
        Route::Read | Route::Other => {
            format!("{method} {path} is not allowed through remote editor access")
        }
    }
}

/// The row of the table a request falls in.
pub fn classify(method: &Method, path: &str) -> Route {
    let Some(lower) = canonical(path) else {
        return Route::Other;
    };
    let segments: Vec<&str> = lower.split('/').skip(1).collect();
    if *method == Method::GET || *method == Method::HEAD {
        return Route::Read;
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
        decide(role, protection, &method, path) == Access::Allow
    }

    /// (method, path, viewer, member, owner) without protection mode.
    const TABLE: &[(&str, &str, bool, bool, bool)] = &[
        ("GET", "/", true, true, true),
        ("GET", "/flows", true, true, true),
        ("HEAD", "/settings", true, true, true),
        ("GET", "/comms", true, true, true),
        ("GET", "/nodes", true, true, true),
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
            role, protection, &method, path,
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
        assert_eq!(
            deny(O, false, Method::PUT, "/flows"),
            "PUT /flows is not allowed through remote editor access"
        );
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
