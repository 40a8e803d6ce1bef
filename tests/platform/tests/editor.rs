//! The editor proxy over real TLS with a device played by the test
//! (`common::web::FakeDevice`): the handoff from the platform's
//! `/devices/{id}/editor/...` to the device's own editor origin, who gets
//! through, the grant each stream carries, what crosses to the device and
//! back, streaming bodies, the WebSocket, timeouts, an offline device, and
//! logout, a user's removal, demotion or password change closing live
//! streams and editor cookies.

mod common;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::web::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, StatusCode};
use http_body_util::BodyExt;
use tether_platform::Platform;
use tether_proto::grant::{MAX_LIFETIME_SECS, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

fn editor(device: &FakeDevice, rest: &str) -> String {
    format!("/devices/{}/editor{rest}", device.id())
}

/// A connection to `device`'s editor origin for the session `cookie`.
async fn editor_browser(platform: &Platform, cookie: &str, device: &FakeDevice) -> Browser {
    open_editor(platform, cookie, device.id(), "/").await.0
}

#[tokio::test]
async fn requests_reach_the_device_with_a_fresh_grant_and_without_credentials() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "line-3").await;
    let cookie = login_as(&platform, "alice", "line-3", Role::Member).await;

    let (mut browser, next) =
        open_editor(&platform, &cookie, device.id(), "/red/settings?x=1&y=%2F").await;
    assert_eq!(
        next, "/red/settings?x=1&y=%2F",
        "the handoff keeps the path"
    );
    assert!(
        device.seen().is_empty(),
        "the handoff itself reaches no device"
    );
    let before = unix_now();
    let response = browser
        .send(
            Method::GET,
            &next,
            &[
                ("authorization", "Basic YWxpY2U6cHc="),
                ("proxy-authorization", "Basic eA=="),
                ("x-tether-token", "forged"),
                ("x-tether-user", "root"),
                ("x-custom", "kept"),
                ("connection", "keep-alive, x-hop"),
                ("x-hop", "dropped"),
            ],
            empty(),
        )
        .await;
    let answer = collect(response).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.text(), "editor says: /red/settings?x=1&y=%2F");

    let seen = device.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, Method::GET);
    assert_eq!(
        request.uri, "/red/settings?x=1&y=%2F",
        "path and query as sent"
    );
    for name in [
        "cookie",
        "authorization",
        "proxy-authorization",
        "x-tether-token",
        "x-tether-user",
        "x-hop",
    ] {
        assert!(
            !request.headers.contains_key(name),
            "{name} must not reach the device"
        );
    }
    assert_eq!(request.headers["x-custom"], "kept");
    let grant = &request.grant;
    assert_eq!(grant.user, "alice");
    assert_eq!(grant.role, Role::Member);
    assert_eq!(grant.team, "line-3");
    assert_eq!(grant.device, device.id());
    assert!(grant.issued_at >= before && grant.issued_at <= unix_now());
    assert!(grant.expires_at > grant.issued_at);
    assert!(grant.expires_at - grant.issued_at <= MAX_LIFETIME_SECS);
    assert_eq!(grant.nonce.len(), 32);
    assert!(
        device.refused.lock().unwrap().is_empty(),
        "every grant verified"
    );

    // The same browser connection reuses its stream (one grant) ...
    let again = browser.get("/again").await;
    assert_eq!(again.status, StatusCode::OK);
    // ... another connection gets a stream and a grant of its own.
    let mut second = Browser::connect_to(&platform, &browser.host, browser.cookie.as_deref()).await;
    assert_eq!(second.get("/other").await.status, StatusCode::OK);
    let seen = device.seen();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[1].grant.nonce, seen[0].grant.nonce);
    assert_ne!(seen[2].grant.nonce, seen[0].grant.nonce);
    platform.shutdown().await;
}

#[tokio::test]
async fn the_grant_carries_the_users_role() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    for (name, role) in [("vic", Role::Viewer), ("olga", Role::Owner)] {
        let cookie = login_as(&platform, name, "t", role).await;
        let mut browser = editor_browser(&platform, &cookie, &device).await;
        assert_eq!(browser.get("/").await.status, StatusCode::OK);
    }
    let roles: Vec<(String, Role)> = device
        .seen()
        .into_iter()
        .map(|s| (s.grant.user, s.grant.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("vic".to_string(), Role::Viewer),
            ("olga".to_string(), Role::Owner)
        ]
    );
    assert!(device.seen().iter().all(|s| !s.grant.protected));
    // The grant also carries the device's protection mode.
    platform.set_protection(device.id(), true).await.unwrap();
    let cookie = login_as(&platform, "otto", "t", Role::Owner).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;
    assert_eq!(browser.get("/").await.status, StatusCode::OK);
    assert!(device.seen().last().unwrap().grant.protected);
    platform.shutdown().await;
}

#[tokio::test]
async fn without_a_session_the_browser_is_sent_to_log_in_and_back() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let mut browser = Browser::connect(&platform, None).await;
    let answer = browser.get(&editor(&device, "/flows?a=b")).await;
    assert_eq!(answer.status, StatusCode::SEE_OTHER);
    let location = answer.location().unwrap().to_string();
    let expected = format!(
        "/login?next=%2Fdevices%2F{}%2Feditor%2Fflows%3Fa%3Db",
        device.id()
    );
    assert_eq!(location, expected);

    // A stale or forged cookie is no better.
    let mut forged = Browser::connect(
        &platform,
        Some(&format!("__Host-tether_session={}", "ab".repeat(32))),
    )
    .await;
    assert_eq!(
        forged.get(&editor(&device, "/")).await.status,
        StatusCode::SEE_OTHER
    );

    // Logging in with that `next` comes back to the editor.
    platform
        .add_user(
            "alice",
            "t",
            Role::Viewer,
            &tether_proto::api::Secret::new("pw"),
        )
        .await
        .unwrap();
    let next = format!("/devices/{}/editor/flows?a=b", device.id());
    let login = post_login(&platform, "alice", "pw", Some(&next)).await;
    assert_eq!(login.location(), Some(next.as_str()));

    // `/editor` without the slash leads to the editor's `/`, query kept.
    let cookie = session_cookie(&login);
    let (_, next) = open_editor(&platform, &cookie, device.id(), "?q=1").await;
    assert_eq!(next, "/?q=1");
    assert!(device.seen().is_empty(), "nothing reached the device");

    // On the device's origin, a navigation without an editor cookie goes
    // back to the platform for a handoff; anything else gets 401.
    let mut bare = Browser::connect_to(&platform, &device_host(device.id()), None).await;
    let back = bare.get("/flows?a=b").await;
    assert_eq!(back.status, StatusCode::SEE_OTHER);
    let expected = format!("https://localhost/devices/{}/editor/flows?a=b", device.id());
    assert_eq!(back.location(), Some(expected.as_str()));
    let post = bare.post_form("/flows", &[]).await;
    assert_eq!(post.status, StatusCode::UNAUTHORIZED);
    // The platform's session cookie is worth nothing there.
    let mut with_session =
        Browser::connect_to(&platform, &device_host(device.id()), Some(&cookie)).await;
    assert_eq!(with_session.get("/").await.status, StatusCode::SEE_OTHER);
    assert!(device.seen().is_empty(), "nothing reached the device");
    platform.shutdown().await;
}

#[tokio::test]
async fn a_handoff_code_is_spent_once_and_only_on_its_own_devices_origin() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let other = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let handoff = |answer: &Answer| {
        let location = answer.location().unwrap().to_string();
        location[location.find("/__tether/").unwrap()..].to_string()
    };
    let mut platform_page = Browser::connect(&platform, Some(&cookie)).await;
    let first = platform_page.get(&editor(&device, "/")).await;
    let path = handoff(&first);
    // On another device's origin the code is refused, and so spent.
    let mut elsewhere = Browser::connect_to(&platform, &device_host(other.id()), None).await;
    let refused = elsewhere.get(&path).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(set_cookie_pair(&refused, "__Host-tether_editor"), None);
    let mut own = Browser::connect_to(&platform, &device_host(device.id()), None).await;
    assert_eq!(own.get(&path).await.status, StatusCode::FORBIDDEN, "spent");
    // A fresh one works once.
    let path = handoff(&platform_page.get(&editor(&device, "/")).await);
    let taken = own.get(&path).await;
    assert_eq!(taken.status, StatusCode::SEE_OTHER);
    let set = taken.headers["set-cookie"].to_str().unwrap();
    assert!(set.starts_with("__Host-tether_editor="), "{set}");
    for attribute in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/"] {
        assert!(set.contains(attribute), "{attribute} in {set}");
    }
    assert!(!set.contains("Domain"), "host-only: {set}");
    assert_eq!(own.get(&path).await.status, StatusCode::FORBIDDEN, "spent");
    // The editor cookie opens this device's origin and no other.
    let editor_cookie = set_cookie_pair(&taken, "__Host-tether_editor").unwrap();
    let mut on_other =
        Browser::connect_to(&platform, &device_host(other.id()), Some(&editor_cookie)).await;
    assert_eq!(on_other.get("/").await.status, StatusCode::SEE_OTHER);
    assert!(other.seen().is_empty());
    let mut on_own =
        Browser::connect_to(&platform, &device_host(device.id()), Some(&editor_cookie)).await;
    assert_eq!(on_own.get("/").await.status, StatusCode::OK);
    platform.shutdown().await;
}

#[tokio::test]
async fn other_origins_may_only_navigate_to_a_devices_editor() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let other = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;
    let other_origin = format!("https://{}", device_host(other.id()));
    // Another device's page (same site) fetching, posting, opening a
    // WebSocket, or asking for a service worker script: refused, and
    // nothing reaches the device.
    type Case<'a> = (Method, &'a str, Vec<(&'a str, &'a str)>);
    let cases: [Case; 4] = [
        (
            Method::GET,
            "/flows",
            vec![("sec-fetch-site", "same-site"), ("sec-fetch-mode", "cors")],
        ),
        (
            Method::POST,
            "/inject/n1",
            vec![
                ("origin", other_origin.as_str()),
                ("sec-fetch-site", "same-site"),
            ],
        ),
        (
            Method::GET,
            "/comms",
            vec![
                ("origin", other_origin.as_str()),
                ("connection", "upgrade"),
                ("upgrade", "websocket"),
                ("sec-websocket-version", "13"),
                ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ],
        ),
        (
            Method::GET,
            "/sw.js",
            vec![
                ("service-worker", "script"),
                ("sec-fetch-site", "same-origin"),
            ],
        ),
    ];
    for (method, path, headers) in cases {
        let answer = collect(browser.send(method.clone(), path, &headers, empty()).await).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    assert!(device.seen().is_empty(), "{:?}", device.seen().len());
    // A navigation from elsewhere, and the editor's own requests, pass.
    let nav = [
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-mode", "navigate"),
    ];
    let answer = collect(browser.send(Method::GET, "/", &nav, empty()).await).await;
    assert_eq!(answer.status, StatusCode::OK);
    let own = browser.origin();
    let post = [("origin", own.as_str()), ("sec-fetch-site", "same-origin")];
    let answer = collect(
        browser
            .send(Method::POST, "/inject/n1", &post, empty())
            .await,
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(device.seen().len(), 2);
    platform.shutdown().await;
}

#[tokio::test]
async fn every_role_of_another_team_is_refused_with_403() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "line-3").await;
    for (name, role) in [
        ("vic", Role::Viewer),
        ("mia", Role::Member),
        ("olga", Role::Owner),
    ] {
        let cookie = login_as(&platform, name, "line-4", role).await;
        let mut browser = Browser::connect(&platform, Some(&cookie)).await;
        let answer = browser.get(&editor(&device, "/")).await;
        assert_eq!(answer.status, StatusCode::FORBIDDEN, "{name}");
        assert!(answer.text().contains("another team"), "{}", answer.text());
        // A code made for a device of their own team does not open this one.
        let ws = browser
            .send(
                Method::GET,
                &editor(&device, "/comms"),
                &[
                    ("connection", "upgrade"),
                    ("upgrade", "websocket"),
                    ("sec-websocket-version", "13"),
                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                ],
                empty(),
            )
            .await;
        assert_eq!(ws.status(), StatusCode::FORBIDDEN, "{name}, WebSocket");
    }
    assert!(device.seen().is_empty(), "no stream was opened");
    platform.shutdown().await;
}

#[tokio::test]
async fn an_offline_device_gets_a_503_page_at_once_and_an_unknown_one_404() {
    let (platform, _dir) = start_web().await;
    let device = enroll_in(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let (mut browser, _) = open_editor(&platform, &cookie, &device.id, "/").await;
    let started = Instant::now();
    let answer = browser.get("/").await;
    assert!(started.elapsed() < Duration::from_secs(2), "no hang");
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        answer.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(
        answer
            .text()
            .contains(&format!("device {} is offline", device.id)),
        "{}",
        answer.text()
    );

    let mut platform_page = Browser::connect(&platform, Some(&cookie)).await;
    let unknown = platform_page
        .get("/devices/dev_00000000000000000000/editor/")
        .await;
    assert_eq!(unknown.status, StatusCode::NOT_FOUND);
    platform.shutdown().await;
}

#[tokio::test]
async fn bodies_stream_both_ways_without_waiting_for_the_whole_body() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;

    // The device echoes the upload as it arrives. Each piece must come back
    // before the next is sent: a proxy that buffered a whole body, either
    // way, would stall here.
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, Infallible>::new(1);
    tx.send_data(Bytes::from_static(b"piece 0;")).await.unwrap();
    let response = browser
        .send(Method::POST, "/upload", &[], body.boxed())
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut echoed = Vec::new();
    for i in 1..=5 {
        let expected = format!("piece {};", i - 1);
        while echoed.len() < expected.len() {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("the echo arrives while the upload is still open")
                .expect("a frame")
                .expect("no error");
            if let Ok(data) = frame.into_data() {
                echoed.extend_from_slice(&data);
            }
        }
        assert_eq!(String::from_utf8_lossy(&echoed), expected);
        echoed.clear();
        if i < 5 {
            tx.send_data(Bytes::from(format!("piece {i};")))
                .await
                .unwrap();
        }
    }
    drop(tx);
    let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert!(rest.is_empty());

    // And a large body round-trips intact.
    let big: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let response = browser
        .send(Method::POST, "/upload", &[], bytes(big.clone()))
        .await;
    let answer = collect(response).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert!(answer.body == big, "4 MiB echoed intact");
    platform.shutdown().await;
}

#[tokio::test]
async fn a_devices_answer_is_data_it_sets_nothing_in_the_browser_and_cannot_leave_its_origin() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;
    let answer = browser.get("/redirect").await;
    assert_eq!(answer.status, StatusCode::FOUND);
    assert!(!answer.headers.contains_key("set-cookie"));
    assert_eq!(answer.location(), Some("/target"));

    let hostile = browser.get("/hostile").await;
    assert_eq!(hostile.status, StatusCode::FOUND);
    assert_eq!(hostile.text(), "hostile", "the body is passed on as data");
    for dropped in [
        "location",
        "set-cookie",
        "service-worker-allowed",
        "clear-site-data",
        "refresh",
        "access-control-allow-origin",
        "access-control-allow-credentials",
    ] {
        assert!(!hostile.headers.contains_key(dropped), "{dropped}");
    }
    let csp = hostile.headers["content-security-policy"].to_str().unwrap();
    assert_eq!(csp, tether_platform::editor::DEVICE_CSP);
    assert!(csp.contains("connect-src 'self'") && csp.contains("form-action 'self'"));
    assert_eq!(hostile.headers["x-content-type-options"], "nosniff");
    platform.shutdown().await;
}

/// Opens the editor's WebSocket on the device's editor origin for the
/// session `cookie`, as the editor's page does.
async fn open_comms(
    platform: &Platform,
    device: &FakeDevice,
    cookie: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let browser = editor_browser(platform, cookie, device).await;
    let tls = tls(platform, None).await.unwrap();
    let url = format!("wss://{}/comms", browser.host);
    let mut request = url.into_client_request().unwrap();
    let headers = request.headers_mut();
    headers.insert("cookie", browser.cookie.clone().unwrap().parse().unwrap());
    headers.insert("origin", browser.origin().parse().unwrap());
    let (ws, response) = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::client_async(request, tls),
    )
    .await
    .expect("the upgrade within 5 s")
    .expect("the WebSocket upgrade succeeds");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

#[tokio::test]
async fn a_websocket_echoes_through_the_proxy_on_a_stream_of_its_own() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "vic", "t", Role::Viewer).await;
    let mut ws = open_comms(&platform, &device, &cookie).await;
    for i in 0..3 {
        let text = format!("hello {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = tokio::time::timeout(Duration::from_secs(5), ws.next())
            .await
            .expect("an echo within 5 s")
            .unwrap()
            .unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    let big = vec![7u8; 256 * 1024];
    ws.send(Message::binary(big.clone())).await.unwrap();
    let echoed = ws.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_data().as_ref(), big.as_slice());

    let seen = device.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].uri, "/comms");
    assert_eq!(seen[0].headers["upgrade"], "websocket");
    assert!(!seen[0].headers.contains_key("cookie"));
    assert_eq!(seen[0].grant.role, Role::Viewer);
    assert_eq!(platform.live_editor_streams(), 1);
    ws.close(None).await.unwrap();
    platform.shutdown().await;
}

#[tokio::test]
async fn a_device_that_does_not_answer_in_time_gets_a_504_page() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = web_config(dir.path());
    config.editor_timeout = Duration::from_millis(500);
    let platform = Platform::start(config).await.unwrap();
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;
    let started = Instant::now();
    let answer = browser.get("/slow").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        answer.text().contains("did not answer"),
        "{}",
        answer.text()
    );
    // The connection goes on, on a new stream.
    let after = browser.get("/fine").await;
    assert_eq!(after.status, StatusCode::OK);
    let seen = device.seen();
    assert_ne!(seen[0].grant.nonce, seen[1].grant.nonce);
    platform.shutdown().await;
}

#[tokio::test]
async fn logout_closes_the_sessions_live_editor_streams() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let other = login_as(&platform, "bob", "t", Role::Owner).await;
    let mut ws = open_comms(&platform, &device, &cookie).await;
    let mut bobs = open_comms(&platform, &device, &other).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;
    assert_eq!(browser.get("/").await.status, StatusCode::OK);
    assert_eq!(platform.live_editor_streams(), 3);

    let csrf = session_csrf(&platform, &cookie).await;
    let mut session = Browser::connect(&platform, Some(&cookie)).await;
    assert_eq!(
        session
            .post_form("/logout", &[("csrf", &csrf)])
            .await
            .status,
        StatusCode::SEE_OTHER
    );
    let ended = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("the WebSocket ends within 2 s of the logout");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while platform.live_editor_streams() > 1 {
        assert!(Instant::now() < deadline, "alice's streams close");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The editor cookie is worthless now: the device's origin sends the
    // browser back to the platform, which wants a login.
    let back = browser.get("/").await;
    assert_eq!(back.status, StatusCode::SEE_OTHER);
    assert!(
        back.location()
            .unwrap()
            .starts_with("https://localhost/devices/")
    );
    let mut platform_page = Browser::connect(&platform, Some(&cookie)).await;
    let login = platform_page.get(&editor(&device, "/")).await;
    assert!(login.location().unwrap().starts_with("/login"));
    // Bob's session is untouched.
    bobs.send(Message::text("still here")).await.unwrap();
    let echoed = bobs.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "still here");
    platform.shutdown().await;
}

#[tokio::test]
async fn removing_a_user_ends_their_sessions() {
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let mut ws = open_comms(&platform, &device, &cookie).await;
    assert_eq!(platform.remove_user("alice").await.unwrap(), 1);
    let ended = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("the WebSocket ends");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))));
    let mut browser = Browser::connect(&platform, Some(&cookie)).await;
    assert_eq!(browser.get("/").await.status, StatusCode::SEE_OTHER);
    platform.shutdown().await;
}

/// A user's WebSocket, editor cookie and platform session all end when
/// `change` runs.
async fn a_change_ends_sessions_and_editor_streams<F, Fut>(change: F)
where
    F: FnOnce(Platform) -> Fut,
    Fut: std::future::Future<Output = Platform>,
{
    let (platform, _dir) = start_web().await;
    let device = fake_device(&platform, "t").await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let bob = login_as(&platform, "bob", "t", Role::Owner).await;
    let mut ws = open_comms(&platform, &device, &cookie).await;
    let mut bobs = open_comms(&platform, &device, &bob).await;
    let mut browser = editor_browser(&platform, &cookie, &device).await;
    assert_eq!(browser.get("/").await.status, StatusCode::OK);
    let platform = change(platform).await;
    let ended = tokio::time::timeout(Duration::from_secs(2), ws.next())
        .await
        .expect("the WebSocket ends at once");
    assert!(!matches!(ended, Some(Ok(Message::Text(_)))), "{ended:?}");
    let back = browser.get("/").await;
    assert_eq!(
        back.status,
        StatusCode::SEE_OTHER,
        "the editor cookie ended"
    );
    let mut page = Browser::connect(&platform, Some(&cookie)).await;
    assert_eq!(page.get("/").await.status, StatusCode::SEE_OTHER);
    bobs.send(Message::text("still here")).await.unwrap();
    let echoed = bobs.next().await.unwrap().unwrap();
    assert_eq!(echoed.into_text().unwrap().as_str(), "still here");
    platform.shutdown().await;
}

#[tokio::test]
async fn demoting_a_user_ends_their_sessions_and_editor_streams() {
    a_change_ends_sessions_and_editor_streams(|platform| async move {
        assert_eq!(platform.set_role("alice", Role::Viewer).await.unwrap(), 1);
        let users = platform.users().await.unwrap();
        let alice = users.iter().find(|u| u.name == "alice").unwrap();
        assert_eq!(alice.role, Role::Viewer);
        platform
    })
    .await;
}

#[tokio::test]
async fn a_password_change_ends_the_users_editor_streams() {
    a_change_ends_sessions_and_editor_streams(|platform| async move {
        let new = tether_proto::api::Secret::new("another password");
        assert_eq!(platform.set_password("alice", &new).await.unwrap(), 1);
        platform
    })
    .await;
}
