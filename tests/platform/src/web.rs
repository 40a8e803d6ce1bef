//! The pages a person uses in a browser: `GET /login`, `POST /login`,
//! `POST /logout`, `GET /` (who is logged in, the team's devices with
//! editor links) and `POST /devices/{id}/protection` (an owner turns
//! protection mode on or off).
//!
//! This module owns the login policy: cheapest checks first (same-origin,
//! the per-address rate limit, the form's size and shape, the failure limit
//! per user name and source prefix, the per-user slow-down), then one password check that costs the same whether the
//! user exists or not, and one answer for every bad credential ("wrong user
//! name or password"). It owns where a login may send the browser next (a
//! local `/devices/...` path, nothing else) and who may change protection
//! mode (an owner of the device's team).
//!
//! It never logs a password, a cookie or a session value, nor the name
//! typed into a failed login (people type passwords there), and never
//! changes state on a GET. Every request passes the fetch-metadata and
//! `Origin` rules of [`crate::origin`] first (other origins, device editor
//! origins included, may only navigate here), and every form carries a
//! CSRF token ([`crate::csrf`]) that is checked before the form is acted on.
//! `GET /devices/{id}/editor/...` goes to [`crate::editor::start`], which
//! hands the browser over to the device's editor origin.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tether_proto::api::Secret;
use tether_proto::grant::Role;
use tracing::{info, warn};

use crate::csrf;
use crate::html::{self, escape};
use crate::http::Body;
use crate::platform::{PlatformError, State};
use crate::rate_limit::{retry_after_secs, source_prefix};
use crate::server::ConnInfo;
use crate::sessions::{self, Session};
use crate::users::{MAX_PASSWORD_LEN, MAX_USER_NAME, is_user_name};

/// Largest form body (`POST /login`, `POST /logout`, protection).
pub const MAX_FORM_BODY: usize = 8 * 1024;
/// The one answer to every bad credential.
pub const BAD_CREDENTIALS: &str = "wrong user name or password";

/// Routes `/`, `/login`, `/logout`, `/audit` and
/// `/devices/{id}/protection`.
pub async fn handle(
    state: Arc<State>,
    conn: Arc<ConnInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    let own = match crate::origin::request_host(req.headers()) {
        Some((host, port)) => crate::origin::https_origin(&host, port),
        None => String::new(),
    };
    if let Err(refused) = crate::origin::check_request(req.headers(), req.method(), false, &own) {
        return html::message(StatusCode::FORBIDDEN, "Forbidden", refused.message());
    }
    if crate::editor::split_path(&path).is_some() {
        return crate::editor::start(state, req).await;
    }
    let protection = path
        .strip_prefix("/devices/")
        .and_then(|rest| rest.strip_suffix("/protection"))
        .filter(|id| !id.contains('/'))
        .map(str::to_string);
    match (req.method(), path.as_str(), protection) {
        (&Method::GET | &Method::HEAD, "/", _) => index(&state, req.headers()).await,
        (&Method::GET | &Method::HEAD, "/audit", _) => {
            audit_page(&state, req.headers(), req.uri().query()).await
        }
        (&Method::GET | &Method::HEAD, "/login", _) => {
            let next = query_param(req.uri().query(), "next").and_then(|n| local_next(&n));
            login_page(&state, StatusCode::OK, next.as_deref(), None)
        }
        (&Method::POST, "/login", _) => login(&state, &conn, req).await,
        (&Method::POST, "/logout", _) => logout(&state, req).await,
        (&Method::POST, _, Some(id)) => set_protection(&state, req, &id).await,
        (_, "/" | "/login" | "/logout" | "/audit", _) => method_not_allowed(),
        (_, _, Some(_)) => method_not_allowed(),
        _ => html::message(StatusCode::NOT_FOUND, "Not found", "There is no such page."),
    }
}

fn method_not_allowed() -> Response<Body> {
    html::message(
        StatusCode::METHOD_NOT_ALLOWED,
        "Method not allowed",
        "This page does not take that method.",
    )
}

/// `next` if it is a path on this platform under `/devices/`: never another
/// host (`//evil`, `https://...`), never a header-breaking character.
pub fn local_next(next: &str) -> Option<String> {
    crate::handoff::local_path(next).filter(|path| path.starts_with("/devices/"))
}

/// The first value of `name` in a query string, decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

fn form_expired() -> Response<Body> {
    html::message(
        StatusCode::FORBIDDEN,
        "Form expired",
        "This form expired or did not come from the platform's own page: go back, reload the page and send it again.",
    )
}

/// Reads an `application/x-www-form-urlencoded` body of at most
/// [`MAX_FORM_BODY`] bytes.
async fn read_form(body: Incoming) -> Result<Vec<(String, String)>, Response<Body>> {
    let bytes: Bytes = match Limited::new(body, MAX_FORM_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => {
            return Err(html::message(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The form could not be read or is too large.",
            ));
        }
    };
    Ok(form_urlencoded::parse(&bytes).into_owned().collect())
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.as_str())
}

/// The login form, with a fresh login cookie and its CSRF token.
fn login_page(
    state: &State,
    status: StatusCode,
    next: Option<&str>,
    error: Option<&str>,
) -> Response<Body> {
    let Ok((cookie, token)) = state.csrf.login_pair() else {
        return html::internal();
    };
    let error = error.map_or(String::new(), |e| {
        format!("<p class=\"error\" role=\"alert\">{}</p>\n", escape(e))
    });
    let next = next.map_or(String::new(), |n| {
        format!(
            "<input type=\"hidden\" name=\"next\" value=\"{}\">\n",
            escape(n)
        )
    });
    let body = format!(
        "<h1>Log in to Tether</h1>\n{error}<form method=\"post\" action=\"/login\">\n{next}\
<input type=\"hidden\" name=\"{}\" value=\"{token}\">\n\
<label>User name <input name=\"user\" autocomplete=\"username\" maxlength=\"{MAX_USER_NAME}\" required autofocus></label>\n\
<label>Password <input name=\"password\" type=\"password\" autocomplete=\"current-password\" maxlength=\"{MAX_PASSWORD_LEN}\" required></label>\n\
<button type=\"submit\">Log in</button>\n</form>",
        csrf::FIELD
    );
    let mut response = html::page(status, "Log in", &body);
    // A login on the way to an editor ends on the device's editor origin,
    // and a form's redirects are held to its form-action too.
    if let Some(domain) = state.config.editor_domain() {
        let csp = html::CSP.replace(
            "form-action 'self'",
            &format!("form-action 'self' https://*.{domain}:*"),
        );
        if let Ok(value) = http::HeaderValue::from_str(&csp) {
            response
                .headers_mut()
                .insert(header::CONTENT_SECURITY_POLICY, value);
        }
    }
    match csrf::set_login_cookie(&cookie) {
        Some(value) => {
            response.headers_mut().insert(header::SET_COOKIE, value);
            response
        }
        None => html::internal(),
    }
}

async fn login(state: &State, conn: &ConnInfo, req: Request<Incoming>) -> Response<Body> {
    let now = Instant::now();
    if let Err(wait) = state.login_limiter.take(conn.peer.ip(), now) {
        warn!(peer = %conn.peer, "login attempts from this address are rate limited");
        return html::rate_limited(
            retry_after_secs(wait),
            "Too many login attempts from this address. Wait a little, then try again.",
        );
    }
    let (parts, body) = req.into_parts();
    let form = match read_form(body).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    if !state
        .csrf
        .check_login(&parts.headers, field(&form, csrf::FIELD))
    {
        warn!(peer = %conn.peer, "login form without a valid CSRF token");
        return form_expired();
    }
    let next = field(&form, "next").and_then(local_next);
    let name = field(&form, "user").unwrap_or_default();
    let password = Secret::new(field(&form, "password").unwrap_or_default());
    // The failure buckets' keys: bounded, whatever was typed. Failures
    // count per (name, source prefix), so nobody elsewhere can use them to
    // lock the name's owner out.
    let name_key: String = name.chars().take(MAX_USER_NAME).collect();
    let source_key = (name_key.clone(), source_prefix(conn.peer.ip()));
    if let Err(wait) = state.login_failures.check(&source_key, now) {
        warn!(peer = %conn.peer, "failed logins to one user name from this address are rate limited");
        return html::rate_limited(
            retry_after_secs(wait),
            "Too many failed logins for this user name from this address. Wait a little, then try again.",
        );
    }
    // The per-user slow-down: recent failures from anywhere delay every
    // login to this name, boundedly, and never refuse one.
    let delay = slowdown(state, &name_key, now);
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let user = if is_user_name(name) {
        let key = name.to_string();
        match state.store.blocking(move |s| s.user(&key)).await {
            Ok(user) => user,
            Err(e) => {
                warn!(cause = %e, "cannot read users");
                return html::internal();
            }
        }
    } else {
        None
    };
    let password_ok = password.expose().len() <= MAX_PASSWORD_LEN;
    let stored = user.as_ref().map(|u| u.password_hash.as_str());
    // The same work for a known and an unknown name, and for an overlong
    // password (checked against the dummy hash, then refused).
    let verified = if password_ok {
        state.passwords.verify(&password, stored).await
    } else {
        let _ = state.passwords.verify(&password, None).await;
        false
    };
    let Some(user) = user.filter(|_| verified) else {
        let now = Instant::now();
        let _ = state.login_failures.take(source_key, now);
        let _ = state.login_slowdown.take(name_key, now);
        warn!(peer = %conn.peer, "failed login");
        return login_page(
            state,
            StatusCode::UNAUTHORIZED,
            next.as_deref(),
            Some(BAD_CREDENTIALS),
        );
    };
    let cookie = match sessions::start(state, &user.name).await {
        Ok(cookie) => cookie,
        Err(e) => {
            warn!(cause = %e, "cannot start a session");
            return html::internal();
        }
    };
    info!(user = %user.name, team = %user.team, role = %user.role, peer = %conn.peer, "login");
    let mut response = html::see_other(next.as_deref().unwrap_or("/"));
    response.headers_mut().insert(header::SET_COOKIE, cookie);
    response
}

/// How long a login to `name` waits: `login_slowdown_step` for each
/// recent failed login to that name (from anywhere) the slow-down bucket
/// remembers, at most `login_slowdown_max`.
fn slowdown(state: &State, name: &str, now: Instant) -> Duration {
    let config = &state.config;
    let recent = state.login_slowdown.used(&name.to_string(), now).round();
    if recent < 1.0 {
        return Duration::ZERO;
    }
    config
        .login_slowdown_step
        .mul_f64(recent.min(1e6))
        .min(config.login_slowdown_max)
}

async fn logout(state: &State, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let form = match read_form(body).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    match sessions::current(state, &parts.headers).await {
        Ok(Some(session)) => {
            if !state
                .csrf
                .check_session(&session.hash, field(&form, csrf::FIELD))
            {
                return form_expired();
            }
            if let Err(e) = sessions::end(state, &session.hash).await {
                warn!(cause = %e, "cannot end a session");
                return html::internal();
            }
            info!(user = %session.user.name, "logout");
        }
        Ok(None) => {}
        Err(e) => {
            warn!(cause = %e, "cannot read sessions");
            return html::internal();
        }
    }
    let mut response = html::see_other("/login");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, sessions::clear_cookie());
    response
}

/// The session of a page request, or the answer to send instead (303 to
/// the login page, or 500).
async fn require_session(state: &State, headers: &HeaderMap) -> Result<Session, Response<Body>> {
    match sessions::current(state, headers).await {
        Ok(Some(session)) => Ok(session),
        Ok(None) => Err(html::see_other("/login")),
        Err(e) => {
            warn!(cause = %e, "cannot read sessions");
            Err(html::internal())
        }
    }
}

async fn index(state: &State, headers: &HeaderMap) -> Response<Body> {
    let session = match require_session(state, headers).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let user = &session.user;
    let devices = match state.devices().await {
        Ok(devices) => devices,
        Err(e) => {
            warn!(cause = %e, "cannot list devices");
            return html::internal();
        }
    };
    let owner = user.role == Role::Owner;
    let token = format!(
        "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
        csrf::FIELD,
        state.csrf.for_session(&session.hash)
    );
    let mut rows = String::new();
    for d in devices.iter().filter(|d| d.team == user.team) {
        let id = escape(&d.id);
        let status = match (d.revoked, d.online) {
            (true, _) => "revoked",
            (false, true) => "online",
            (false, false) => "offline",
        };
        let editor = if d.revoked {
            String::new()
        } else {
            format!("<a href=\"/devices/{id}/editor/\">editor</a>")
        };
        let protection = if d.protected { "on" } else { "off" };
        let toggle = if owner {
            let (value, label) = if d.protected {
                ("off", "turn off")
            } else {
                ("on", "turn on")
            };
            format!(
                " <form class=\"inline\" method=\"post\" action=\"/devices/{id}/protection\">\
{token}<input type=\"hidden\" name=\"enabled\" value=\"{value}\"><button type=\"submit\">{label}</button></form>"
            )
        } else {
            String::new()
        };
        let chart = crate::health::chart(&d.history, crate::platform::unix_now());
        rows.push_str(&format!(
            "<tr><td>{}</td><td><code>{id}</code></td><td>{status}</td><td>{protection}{toggle}</td><td>{chart}</td><td>{editor}</td></tr>\n",
            escape(&d.name)
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"6\">No devices in this team yet.</td></tr>\n");
    }
    let body = format!(
        "<h1>Tether</h1>\n<p>Logged in as <strong>{}</strong>, {} of team <strong>{}</strong>. \
<form class=\"inline\" method=\"post\" action=\"/logout\">{token}<button type=\"submit\">Log out</button></form> \
<a href=\"/audit\">Audit trail</a></p>\n\
<table>\n<tr><th>Name</th><th>Device</th><th>Status</th><th>Protection</th><th>Last hour: CPU (red), memory (blue)</th><th></th></tr>\n{rows}</table>",
        escape(&user.name),
        user.role,
        escape(&user.team)
    );
    let mut response = html::page(StatusCode::OK, "Devices", &body);
    if let Some(cookie) = sessions::refresh_cookie(headers, &session) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

/// Entries the audit page shows at most.
const AUDIT_PAGE_ENTRIES: usize = 500;

/// `GET /audit?device=ID&user=NAME&type=TYPE`: the team's audit trail,
/// newest first, with each device's chain state at the top.
async fn audit_page(state: &State, headers: &HeaderMap, query: Option<&str>) -> Response<Body> {
    let session = match require_session(state, headers).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let team = session.user.team.clone();
    let filter = |name| query_param(query, name).filter(|v| !v.is_empty());
    let device = filter("device");
    let audit_query = crate::audit::AuditQuery {
        device: None,
        team: Some(team.clone()),
        since: 0,
        kind: filter("type"),
        user: filter("user"),
        limit: Some(AUDIT_PAGE_ENTRIES),
    };
    let report = match state.audit(audit_query).await {
        Ok(report) => report,
        Err(e) => {
            warn!(cause = %e, "cannot read the audit trail");
            return html::internal();
        }
    };
    let mut summary = String::new();
    for v in &report.devices {
        let class = match v.state {
            crate::audit::ChainState::Broken => "broken",
            crate::audit::ChainState::Verified | crate::audit::ChainState::Empty => "ok",
            crate::audit::ChainState::Unsigned => "pending",
        };
        let problems: String = v
            .problems
            .iter()
            .take(5)
            .map(|p| format!("<br>event {}: {}", p.seq, escape(&p.what)))
            .collect();
        summary.push_str(&format!(
            "<tr><td><a href=\"/audit?device={id}\"><code>{id}</code></a></td><td class=\"{class}\">{state}{problems}</td><td>{records}</td><td>{through}</td><td>{dropped}</td></tr>\n",
            id = escape(&v.device_id),
            state = v.state,
            records = v.records,
            through = v.verified_through,
            dropped = v.dropped,
        ));
    }
    let mut rows = String::new();
    for e in report
        .entries
        .iter()
        .filter(|e| device.as_ref().is_none_or(|d| *d == e.device_id))
    {
        rows.push_str(&format!(
            "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td></tr>\n",
            crate::cli::rfc3339(e.time / 1000),
            escape(&e.device_id),
            e.seq,
            escape(&e.kind),
            escape(e.user.as_deref().unwrap_or(&format!("{:?}", e.actor).to_lowercase())),
            escape(&e.subject),
            escape(&e.details.to_string()),
        ));
    }
    if rows.is_empty() {
        rows.push_str("<tr><td colspan=\"7\">No events match.</td></tr>\n");
    }
    let value = |v: &Option<String>| escape(v.as_deref().unwrap_or(""));
    let body = format!(
        "<h1>Audit trail</h1>\n<p>Team <strong>{team}</strong>. <a href=\"/\">Devices</a></p>\n\
<table>\n<tr><th>Device</th><th>Chain</th><th>Events</th><th>Signed through</th><th>Dropped</th></tr>\n{summary}</table>\n\
<form method=\"get\" action=\"/audit\"><label>Device <input name=\"device\" value=\"{device}\"></label> \
<label>User <input name=\"user\" value=\"{user}\"></label> <label>Type <input name=\"type\" value=\"{kind}\"></label> \
<button type=\"submit\">Filter</button></form>\n\
<table>\n<tr><th>Time (UTC)</th><th>Device</th><th>Seq</th><th>Type</th><th>Who</th><th>Subject</th><th>Details</th></tr>\n{rows}</table>",
        team = escape(&team),
        device = value(&device),
        user = value(&filter("user")),
        kind = value(&filter("type")),
    );
    let mut response = html::page(StatusCode::OK, "Audit trail", &body);
    if let Some(cookie) = sessions::refresh_cookie(headers, &session) {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn set_protection(state: &State, req: Request<Incoming>, device_id: &str) -> Response<Body> {
    let session = match require_session(state, req.headers()).await {
        Ok(session) => session,
        Err(response) => return response,
    };
    let refresh = sessions::refresh_cookie(req.headers(), &session);
    let mut response = change_protection(state, req, device_id, session).await;
    if let Some(cookie) = refresh {
        response.headers_mut().insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn change_protection(
    state: &State,
    req: Request<Incoming>,
    device_id: &str,
    session: Session,
) -> Response<Body> {
    let form = match read_form(req.into_body()).await {
        Ok(form) => form,
        Err(response) => return response,
    };
    if !state
        .csrf
        .check_session(&session.hash, field(&form, csrf::FIELD))
    {
        warn!(user = %session.user.name, %device_id, "protection form without a valid CSRF token");
        return form_expired();
    }
    let enabled = match field(&form, "enabled") {
        Some("on") => true,
        Some("off") => false,
        _ => {
            return html::message(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "Send enabled=on or enabled=off.",
            );
        }
    };
    let id = device_id.to_string();
    let device = match state.store.blocking(move |s| s.device(&id)).await {
        Ok(Some(device)) => device,
        Ok(None) => return no_device(device_id),
        Err(e) => {
            warn!(cause = %e, "cannot read devices");
            return html::internal();
        }
    };
    let user = &session.user;
    if user.team != device.team || user.role != Role::Owner {
        warn!(user = %user.name, %device_id, "protection change refused: not an owner of the device's team");
        return html::message(
            StatusCode::FORBIDDEN,
            "Forbidden",
            &format!(
                "Only an owner of the team of device {device_id} may change its protection mode."
            ),
        );
    }
    match state.set_protection(device_id, enabled).await {
        Ok(_) => {
            info!(user = %user.name, %device_id, enabled, "protection mode changed on the web");
            html::see_other("/")
        }
        Err(PlatformError::NoDevice(_)) => no_device(device_id),
        Err(e) => {
            warn!(cause = %e, "cannot set the protection mode");
            html::internal()
        }
    }
}

/// 404 for a device that does not exist.
pub fn no_device(device_id: &str) -> Response<Body> {
    html::message(
        StatusCode::NOT_FOUND,
        "Unknown device",
        &format!("There is no device {device_id}."),
    )
}

/// `Location` of the login page that comes back to `path_and_query`.
pub fn login_location(path_and_query: &str) -> String {
    match local_next(path_and_query) {
        Some(next) => {
            let encoded: String = form_urlencoded::byte_serialize(next.as_bytes()).collect();
            format!("/login?next={encoded}")
        }
        None => "/login".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_device_paths_are_followed_after_login() {
        for good in ["/devices/dev_1/editor/", "/devices/dev_1/editor/?a=b"] {
            assert_eq!(local_next(good).as_deref(), Some(good));
        }
        for bad in [
            "//evil.example/devices/",
            "https://evil.example/devices/",
            "/login",
            "/",
            "/devices/\\evil",
            "/devices/a\r\nSet-Cookie: x",
            "devices/x",
            "/devices/ x",
        ] {
            assert_eq!(local_next(bad), None, "{bad:?}");
        }
        assert_eq!(
            login_location("/devices/dev_1/editor/?x=1&y=2"),
            "/login?next=%2Fdevices%2Fdev_1%2Feditor%2F%3Fx%3D1%26y%3D2"
        );
        assert_eq!(login_location("//evil"), "/login");
    }
}
