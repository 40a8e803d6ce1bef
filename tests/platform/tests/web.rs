//! The pages people use, over real TLS with users and sessions in redb:
//! login (cookie attributes, one answer for every bad credential, rate
//! limits per address and per user and source address that cannot lock a
//! user out from elsewhere or be reset by spraying names, where it may send
//! the browser next), sessions that slide with use up to a maximum, a
//! password change and logout ending sessions on the server, the device list, and protection mode set by an owner and
//! pushed to the device on its control stream.

mod common;

use std::time::Duration;

use common::Answer;
use common::web::*;
use http::{Method, StatusCode};
use tether_platform::{Platform, RateLimit};
use tether_proto::api::Secret;
use tether_proto::grant::Role;

async fn start_with(
    change: impl FnOnce(&mut tether_platform::PlatformConfig),
) -> (Platform, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = web_config(dir.path());
    change(&mut config);
    let platform = Platform::start(config).await.expect("platform starts");
    (platform, dir)
}

#[tokio::test]
async fn login_sets_a_host_only_session_cookie_and_the_index_shows_the_teams_devices() {
    let (platform, _dir) = start_web().await;
    let ours = enroll_in(&platform, "line-3").await;
    let theirs = enroll_in(&platform, "line-4").await;
    platform
        .add_user(
            "alice",
            "line-3",
            Role::Owner,
            &Secret::new("correct horse"),
        )
        .await
        .unwrap();

    let login = post_login(&platform, "alice", "correct horse", None).await;
    assert_eq!(login.status, StatusCode::SEE_OTHER);
    assert_eq!(login.location(), Some("/"));
    assert_eq!(login.headers.get_all("set-cookie").iter().count(), 1);
    let set_cookie = login.headers["set-cookie"].to_str().unwrap();
    let (pair, attributes) = set_cookie.split_once(';').unwrap();
    let value = pair.strip_prefix("__Host-tether_session=").unwrap();
    assert_eq!(value.len(), 64, "256 random bits, hex");
    assert!(value.bytes().all(|b| b.is_ascii_hexdigit()));
    let attributes: Vec<&str> = attributes.split(';').map(str::trim).collect();
    assert!(
        !attributes.iter().any(|a| a.starts_with("Domain")),
        "host-only: never sent to a device's editor origin"
    );
    for wanted in [
        "HttpOnly",
        "Secure",
        "SameSite=Lax",
        "Path=/",
        "Max-Age=1209600",
    ] {
        assert!(attributes.contains(&wanted), "{wanted} in {set_cookie}");
    }

    let mut browser = Browser::connect(&platform, Some(pair)).await;
    let index = browser.get("/").await;
    assert_eq!(index.status, StatusCode::OK);
    assert_eq!(index.headers["content-type"], "text/html; charset=utf-8");
    let csp = index.headers["content-security-policy"].to_str().unwrap();
    for directive in [
        "default-src 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    ] {
        assert!(csp.contains(directive), "{directive} in {csp}");
    }
    assert!(
        !csp.contains("script-src"),
        "no script on the platform's pages"
    );
    assert_eq!(index.headers["cross-origin-opener-policy"], "same-origin");
    assert_eq!(index.headers["x-frame-options"], "DENY");
    let page = index.text();
    assert!(page.contains("alice") && page.contains("line-3"), "{page}");
    assert!(
        page.contains(&format!("/devices/{}/editor/", ours.id)),
        "{page}"
    );
    assert!(
        !page.contains(&theirs.id),
        "another team's device is not listed"
    );

    // The login page itself is a plain form without external assets.
    let form = Browser::connect(&platform, None).await.get("/login").await;
    assert_eq!(form.status, StatusCode::OK);
    let form = form.text();
    assert!(
        form.contains("<form method=\"post\" action=\"/login\">"),
        "{form}"
    );
    assert!(!form.contains("http://") && !form.contains("https://") && !form.contains("<script"));
    // Without a session, the index sends the browser to the login page.
    let anonymous = Browser::connect(&platform, None).await.get("/").await;
    assert_eq!(anonymous.status, StatusCode::SEE_OTHER);
    assert_eq!(anonymous.location(), Some("/login"));
    platform.shutdown().await;
}

#[tokio::test]
async fn a_wrong_password_and_an_unknown_user_get_the_same_answer() {
    let (platform, _dir) = start_web().await;
    platform
        .add_user(
            "alice",
            "line-3",
            Role::Viewer,
            &Secret::new("correct horse"),
        )
        .await
        .unwrap();
    let wrong = post_login(&platform, "alice", "wrong horse", None).await;
    let unknown = post_login(&platform, "mallory", "wrong horse", None).await;
    let invalid = post_login(&platform, "not a valid name!", "x", None).await;
    // The pages differ only in the new form's CSRF token.
    let page = |answer: &Answer| answer.text().replace(&csrf_of(&answer.text()), "TOKEN");
    for answer in [&wrong, &unknown, &invalid] {
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
        assert!(answer.text().contains("wrong user name or password"));
        assert_eq!(set_cookie_pair(answer, "__Host-tether_session"), None);
    }
    assert_eq!(page(&wrong), page(&unknown), "nothing tells the two apart");
    assert_eq!(page(&wrong), page(&invalid));
    platform.shutdown().await;
}

#[tokio::test]
async fn logins_are_rate_limited_per_address() {
    let (platform, _dir) = start_with(|c| {
        c.login_rate = RateLimit {
            burst: 3,
            refill: Duration::from_secs(60),
        }
    })
    .await;
    for _ in 0..3 {
        let answer = post_login(&platform, "nobody", "x", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    let limited = post_login(&platform, "nobody", "x", None).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));
    assert!(limited.text().contains("Too many login attempts"));
    platform.shutdown().await;
}

fn ip(text: &str) -> Option<std::net::IpAddr> {
    Some(text.parse().unwrap())
}

#[tokio::test]
async fn failed_logins_limit_one_source_and_only_slow_the_user_elsewhere() {
    let (platform, _dir) = start_with(|c| {
        c.login_failure_rate = RateLimit {
            burst: 2,
            refill: Duration::from_secs(60),
        };
        c.login_slowdown_rate = RateLimit {
            burst: 10,
            refill: Duration::from_secs(60),
        };
        c.login_slowdown_step = Duration::from_millis(300);
        c.login_slowdown_max = Duration::from_millis(500);
    })
    .await;
    for name in ["alice", "bob"] {
        platform
            .add_user(name, "t", Role::Member, &Secret::new(password_of(name)))
            .await
            .unwrap();
    }
    let attacker = ip("127.0.0.1");
    for _ in 0..2 {
        let answer = post_login_from(&platform, attacker, "alice", "guess", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    // From the attacking address, even the right password is refused.
    let limited = post_login_from(&platform, attacker, "alice", &password_of("alice"), None).await;
    assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(limited.headers.contains_key("retry-after"));
    assert!(limited.text().contains("from this address"));
    // From another address, alice logs in: slowed down (two recent
    // failures at 300 ms, bounded at 500 ms), not refused.
    let started = std::time::Instant::now();
    let alice = post_login_from(
        &platform,
        ip("127.0.0.2"),
        "alice",
        &password_of("alice"),
        None,
    )
    .await;
    assert_eq!(alice.status, StatusCode::SEE_OTHER, "{}", alice.text());
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "slowed down: {:?}",
        started.elapsed()
    );
    // Bob is neither limited nor slowed from the attacking address.
    let started = std::time::Instant::now();
    let bob = post_login_from(&platform, attacker, "bob", &password_of("bob"), None).await;
    assert_eq!(bob.status, StatusCode::SEE_OTHER);
    assert!(started.elapsed() < Duration::from_millis(300));
    platform.shutdown().await;
}

#[tokio::test]
async fn spraying_user_names_does_not_reset_the_targets_limit() {
    let (platform, _dir) = start_with(|c| {
        c.login_failure_rate = RateLimit {
            burst: 2,
            refill: Duration::from_secs(600),
        };
        c.rate_limit_max_sources = 16;
    })
    .await;
    platform
        .add_user(
            "alice",
            "t",
            Role::Member,
            &Secret::new(password_of("alice")),
        )
        .await
        .unwrap();
    for _ in 0..2 {
        let answer = post_login(&platform, "alice", "guess", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    // Three times the table's size in sprayed names, one failure each.
    for i in 0..48 {
        let answer = post_login(&platform, &format!("spray{i}"), "guess", None).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    }
    let limited = post_login(&platform, "alice", &password_of("alice"), None).await;
    assert_eq!(
        limited.status,
        StatusCode::TOO_MANY_REQUESTS,
        "alice's bucket for this address survived the spray"
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn a_session_slides_with_use_up_to_its_maximum_and_the_cookie_follows() {
    let (platform, _dir) = start_with(|c| {
        c.session_idle = Duration::from_secs(6);
        c.session_max = Duration::from_secs(10);
    })
    .await;
    let login = {
        platform
            .add_user(
                "alice",
                "t",
                Role::Member,
                &Secret::new(password_of("alice")),
            )
            .await
            .unwrap();
        post_login(&platform, "alice", &password_of("alice"), None).await
    };
    let started = std::time::Instant::now();
    let set = login.headers["set-cookie"].to_str().unwrap().to_string();
    assert!(set.contains("Max-Age=6"), "{set}");
    let cookie = session_cookie(&login);
    let at = |secs: f64| started + Duration::from_secs_f64(secs);
    let mut browser = Browser::connect(&platform, Some(&cookie)).await;
    let fresh = browser.get("/").await;
    assert_eq!(fresh.status, StatusCode::OK);
    assert!(
        set_cookie_pair(&fresh, "__Host-tether_session").is_none(),
        "no extension (and no write) while more than half the idle time is left"
    );
    tokio::time::sleep_until(at(4.5).into()).await;
    let used = browser.get("/").await;
    assert_eq!(used.status, StatusCode::OK);
    let refreshed = used
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .find(|v| v.starts_with("__Host-tether_session="))
        .expect("the extended session's cookie is sent again");
    assert!(refreshed.starts_with(&cookie), "{refreshed}");
    assert!(!refreshed.contains("Max-Age=0"), "{refreshed}");
    // Past the first idle expiry (6 s), the used session still works...
    tokio::time::sleep_until(at(7.2).into()).await;
    assert_eq!(browser.get("/").await.status, StatusCode::OK);
    // ... but not past the maximum (10 s from login), however it is used.
    tokio::time::sleep_until(at(10.6).into()).await;
    let ended = browser.get("/").await;
    assert_eq!(ended.status, StatusCode::SEE_OTHER);
    assert_eq!(ended.location(), Some("/login"));
    platform.shutdown().await;
}

#[tokio::test]
async fn a_password_change_ends_every_session_of_the_user() {
    let (platform, _dir) = start_web().await;
    let first = login_as(&platform, "alice", "t", Role::Member).await;
    let second = post_login(&platform, "alice", &password_of("alice"), None).await;
    let second = session_cookie(&second);
    let bob = login_as(&platform, "bob", "t", Role::Member).await;
    let ended = platform
        .set_password("alice", &Secret::new("new secret"))
        .await
        .unwrap();
    assert_eq!(ended, 2);
    for cookie in [&first, &second] {
        let mut browser = Browser::connect(&platform, Some(cookie)).await;
        assert_eq!(browser.get("/").await.status, StatusCode::SEE_OTHER);
    }
    let mut browser = Browser::connect(&platform, Some(&bob)).await;
    assert_eq!(
        browser.get("/").await.status,
        StatusCode::OK,
        "bob untouched"
    );
    let old = post_login(&platform, "alice", &password_of("alice"), None).await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let new = post_login(&platform, "alice", "new secret", None).await;
    assert_eq!(new.status, StatusCode::SEE_OTHER);
    assert!(
        platform
            .set_password("alice", &Secret::new(""))
            .await
            .is_err()
    );
    assert!(
        platform
            .set_password("nobody", &Secret::new("x"))
            .await
            .is_err()
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn logout_revokes_the_session_on_the_server() {
    let (platform, _dir) = start_web().await;
    let cookie = login_as(&platform, "alice", "t", Role::Owner).await;
    let mut browser = Browser::connect(&platform, Some(&cookie)).await;
    assert_eq!(browser.get("/").await.status, StatusCode::OK);

    // Without the page's CSRF token, nothing happens.
    let forged = browser.post_form("/logout", &[]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN, "{}", forged.text());
    assert!(forged.text().contains("Form expired"));
    assert_eq!(browser.get("/").await.status, StatusCode::OK);

    let csrf = session_csrf(&platform, &cookie).await;
    let logout = browser.post_form("/logout", &[("csrf", &csrf)]).await;
    assert_eq!(logout.status, StatusCode::SEE_OTHER);
    assert_eq!(logout.location(), Some("/login"));
    let cleared = logout.headers["set-cookie"].to_str().unwrap();
    assert!(
        cleared.starts_with("__Host-tether_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );

    // A browser that kept the cookie gets nothing for it.
    let mut kept = Browser::connect(&platform, Some(&cookie)).await;
    let after = kept.get("/").await;
    assert_eq!(after.status, StatusCode::SEE_OTHER);
    assert_eq!(after.location(), Some("/login"));
    // Logging out by GET is not a thing (no state change on GET).
    let get = kept.get("/logout").await;
    assert_eq!(get.status, StatusCode::METHOD_NOT_ALLOWED);
    platform.shutdown().await;
}

#[tokio::test]
async fn after_login_the_browser_goes_only_to_a_local_device_path() {
    let (platform, _dir) = start_web().await;
    platform
        .add_user("alice", "t", Role::Owner, &Secret::new("pw"))
        .await
        .unwrap();
    let cases = [
        (
            "/devices/dev_00000000000000000001/editor/?a=1",
            "/devices/dev_00000000000000000001/editor/?a=1",
        ),
        ("//evil.example/devices/", "/"),
        ("https://evil.example/devices/x", "/"),
        ("/login", "/"),
        ("/devices/x\r\nSet-Cookie: a=b", "/"),
    ];
    for (next, expected) in cases {
        let answer = post_login(&platform, "alice", "pw", Some(next)).await;
        assert_eq!(answer.status, StatusCode::SEE_OTHER, "{next:?}");
        assert_eq!(answer.location(), Some(expected), "{next:?}");
    }
    // The login page keeps a valid `next` in its form, escaped.
    let page = Browser::connect(&platform, None)
        .await
        .get("/login?next=%2Fdevices%2Fd%2Feditor%2F%3Fa%3D%22x%22")
        .await
        .text();
    assert!(
        page.contains("value=\"/devices/d/editor/?a=&quot;x&quot;\""),
        "{page}"
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn a_login_form_from_another_origin_or_without_its_token_is_refused() {
    let (platform, _dir) = start_web().await;
    platform
        .add_user("alice", "t", Role::Owner, &Secret::new("pw"))
        .await
        .unwrap();
    let form = encode_form(&[("user", "alice"), ("password", "pw")]);
    let mut browser = Browser::connect(&platform, None).await;
    let response = browser
        .send(
            Method::POST,
            "/login",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", "https://evil.example"),
            ],
            bytes(form.into_bytes()),
        )
        .await;
    let answer = collect(response).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert!(!answer.headers.contains_key("set-cookie"));
    // Nor from a device's editor origin (the same site as the platform),
    // even with a login page's token and cookie.
    let mut page = Browser::connect(&platform, None).await;
    let form_page = page.get("/login").await;
    let login_cookie = set_cookie_pair(&form_page, "__Host-tether_login").unwrap();
    let csrf = csrf_of(&form_page.text());
    let device_origin = format!("https://{}", device_host("dev_00000000000000000001"));
    let form = encode_form(&[("user", "alice"), ("password", "pw"), ("csrf", &csrf)]);
    let mut browser = Browser::connect(&platform, Some(&login_cookie)).await;
    let response = browser
        .send(
            Method::POST,
            "/login",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &device_origin),
                ("sec-fetch-site", "same-site"),
                ("sec-fetch-mode", "navigate"),
            ],
            bytes(form.into_bytes()),
        )
        .await;
    let answer = collect(response).await;
    assert_eq!(answer.status, StatusCode::FORBIDDEN);
    assert_eq!(set_cookie_pair(&answer, "__Host-tether_session"), None);
    // From the platform's origin without the token, or with a token that
    // is not this browser's, it is refused too.
    let mut own = Browser::connect(&platform, Some(&login_cookie)).await;
    let missing = own
        .post_form("/login", &[("user", "alice"), ("password", "pw")])
        .await;
    assert_eq!(missing.status, StatusCode::FORBIDDEN);
    assert!(missing.text().contains("Form expired"));
    let mut stranger = Browser::connect(&platform, None).await;
    let borrowed = stranger
        .post_form(
            "/login",
            &[("user", "alice"), ("password", "pw"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(
        borrowed.status,
        StatusCode::FORBIDDEN,
        "a token needs its cookie"
    );
    // With both, the same form logs in.
    let good = own
        .post_form(
            "/login",
            &[("user", "alice"), ("password", "pw"), ("csrf", &csrf)],
        )
        .await;
    assert_eq!(good.status, StatusCode::SEE_OTHER, "{}", good.text());
    // An oversized form is refused before any password check.
    let big = "a".repeat(9 * 1024);
    let answer = browser.post_form("/login", &[("user", &big)]).await;
    assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    platform.shutdown().await;
}

#[tokio::test]
async fn protection_mode_is_pushed_on_connect_and_on_every_change_and_only_owners_set_it() {
    let (platform, _dir) = start_web().await;
    let mut device = fake_device(&platform, "line-3").await;
    assert!(
        !device.next_protection().await,
        "pushed off as soon as control is up"
    );

    let owner = login_as(&platform, "olga", "line-3", Role::Owner).await;
    let path = format!("/devices/{}/protection", device.id());
    let mut browser = Browser::connect(&platform, Some(&owner)).await;
    let csrf = session_csrf(&platform, &owner).await;
    // A form without the page's token, or posted from a device's editor
    // origin, changes nothing.
    let forged = browser.post_form(&path, &[("enabled", "on")]).await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    let mut from_device = Browser::connect(&platform, Some(&owner)).await;
    let form = encode_form(&[("enabled", "on"), ("csrf", &csrf)]);
    let device_origin = format!("https://{}", device_host(device.id()));
    let response = from_device
        .send(
            Method::POST,
            &path,
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("origin", &device_origin),
            ],
            bytes(form.into_bytes()),
        )
        .await;
    assert_eq!(collect(response).await.status, StatusCode::FORBIDDEN);
    assert!(!platform.devices().await.unwrap()[0].protected);
    let set = browser
        .post_form(&path, &[("enabled", "on"), ("csrf", &csrf)])
        .await;
    assert_eq!(set.status, StatusCode::SEE_OTHER, "{}", set.text());
    assert!(device.next_protection().await, "pushed on at once");
    let listed = platform.devices().await.unwrap();
    assert!(listed[0].protected);
    let page = browser.get("/").await.text();
    assert!(page.contains("turn off"), "{page}");

    // A member of the team, and an owner of another team, may not.
    for (name, team, role) in [
        ("mia", "line-3", Role::Member),
        ("otto", "line-4", Role::Owner),
    ] {
        let cookie = login_as(&platform, name, team, role).await;
        let csrf = session_csrf(&platform, &cookie).await;
        let mut other = Browser::connect(&platform, Some(&cookie)).await;
        let refused = other
            .post_form(&path, &[("enabled", "off"), ("csrf", &csrf)])
            .await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{name}");
        assert!(refused.text().contains("Only an owner"), "{name}");
    }
    // Nor may anyone without a session, or with a bad value.
    let mut anonymous = Browser::connect(&platform, None).await;
    let refused = anonymous.post_form(&path, &[("enabled", "off")]).await;
    assert_eq!(refused.status, StatusCode::SEE_OTHER);
    let bad = browser
        .post_form(&path, &[("enabled", "maybe"), ("csrf", &csrf)])
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(platform.devices().await.unwrap()[0].protected);

    // The library (and the admin API) turn it off; the device hears it.
    assert!(platform.set_protection(device.id(), false).await.unwrap());
    assert!(!device.next_protection().await);

    // Changed while offline, it arrives when the device connects again.
    device
        .tunnel
        .tunnel
        .close(tether_proto::CloseCode::NO_ERROR, "bye");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while platform.tunnel(device.id()).is_some() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !platform.set_protection(device.id(), true).await.unwrap(),
        "offline: not pushed"
    );
    let mut again = connect_fake(&platform, device.device).await;
    assert!(again.next_protection().await);
    platform.shutdown().await;
}
