//! Enrollment over real TLS: tokens (single, multi-use, reused, expired,
//! unknown, malformed), CSRs, the double-spend race, rate limiting and a
//! restart on the same data directory.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use tether_platform::{Platform, PlatformEvent, RateLimit, TokenSpec};
use tether_proto::api::{EnrollResponse, ErrorCode};

fn refusal(answer: &Answer) -> (StatusCode, ErrorCode) {
    (answer.status, answer.api_error().error)
}

#[tokio::test]
async fn a_device_enrolls_and_its_certificate_chains_to_the_ca() {
    let (platform, _dir) = start().await;
    let mut events = platform.events();
    let token = platform.create_token(TokenSpec::default()).await.unwrap();
    let key = new_key();
    let answer = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&key)),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let response: EnrollResponse = serde_json::from_slice(&answer.body).unwrap();

    assert!(tether_proto::api::is_device_id(&response.device_id));
    assert_ne!(
        response.device_id, "dev_ffffffffffffffffffff",
        "the CSR's subject is ignored"
    );
    assert_eq!(response.ca, platform.ca_pem());
    let port = platform.local_addr().port();
    assert_eq!(
        response.tunnel_url,
        format!("wss://localhost:{port}/v1/tunnel")
    );
    assert!(tether_proto::api::is_ed25519_public_key(
        &response.keys.snapshot
    ));
    assert!(tether_proto::api::is_ed25519_public_key(
        &response.keys.grant
    ));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(response.platform_time.abs_diff(now) < 5);

    // The certificate verifies against the CA as a client certificate (the
    // same check the tunnel endpoint's TLS makes) and names the device.
    let cert = CertificateDer::from_pem_slice(response.certificate.as_bytes()).unwrap();
    let ca = CertificateDer::from_pem_slice(response.ca.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
            .build()
            .unwrap();
    verifier
        .verify_client_cert(&cert, &[], rustls::pki_types::UnixTime::now())
        .expect("the device certificate chains to the platform CA");
    let text = String::from_utf8_lossy(cert.as_ref()).to_string();
    assert!(text.contains(&response.device_id), "CN = device id");
    assert!(text.contains(&format!("urn:tether:device:{}", response.device_id)));

    // The fingerprint is recorded: the certificate opens a tunnel.
    let id = next_event(&mut events, |e| match e {
        PlatformEvent::Enrolled { device_id } => Some(device_id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(id, response.device_id);
    let tunnel = open_tunnel(&platform, Some((&response.certificate, &key))).await;
    assert!(tunnel.is_ok(), "{:?}", tunnel.err());
    let devices = platform.devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].name, "press-7");
    assert_eq!(devices[0].team, "default");
    platform.shutdown().await;
}

#[tokio::test]
async fn each_bad_token_gets_its_own_error_code() {
    let (platform, _dir) = start().await;
    let token = platform.create_token(TokenSpec::default()).await.unwrap();
    let ok = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);

    let reused = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(
        refusal(&reused),
        (StatusCode::FORBIDDEN, ErrorCode::TokenUsed)
    );
    assert!(
        reused
            .api_error()
            .message
            .contains("tether-platform token create")
    );

    // Valid syntax, one hex digit changed: never issued.
    let fresh = platform.create_token(TokenSpec::default()).await.unwrap();
    let mut forged = fresh.secret().expose().to_string();
    let last = forged.pop().unwrap();
    forged.push(if last == '0' { '1' } else { '0' });
    let unknown = post_enroll(&platform, &enroll_request(&forged, csr(&new_key()))).await;
    assert_eq!(
        refusal(&unknown),
        (StatusCode::FORBIDDEN, ErrorCode::TokenUnknown)
    );

    let upper = fresh.secret().expose().to_uppercase();
    let whole = fresh.expose();
    for malformed in ["", "tpt_123", "TPT_", &upper, &whole] {
        let answer = post_enroll(&platform, &enroll_request(malformed, csr(&new_key()))).await;
        assert_eq!(
            refusal(&answer),
            (StatusCode::BAD_REQUEST, ErrorCode::TokenMalformed),
            "{malformed:?}"
        );
    }
    // The refused attempts did not spend the fresh token.
    let answer = post_enroll(
        &platform,
        &enroll_request(fresh.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    platform.shutdown().await;
}

#[tokio::test]
async fn an_expired_token_is_refused() {
    let (platform, _dir) = start().await;
    let spec = TokenSpec {
        ttl: Some(Duration::from_secs(1)),
        ..TokenSpec::default()
    };
    let token = platform.create_token(spec).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let answer = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(
        refusal(&answer),
        (StatusCode::FORBIDDEN, ErrorCode::TokenExpired)
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn a_single_use_token_enrolls_exactly_one_of_sixteen_racing_devices() {
    let (platform, _dir) = start().await;
    let platform = std::sync::Arc::new(platform);
    let token = platform.create_token(TokenSpec::default()).await.unwrap();
    let mut racers = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (platform, token) = (platform.clone(), token.clone());
        racers.spawn(async move {
            let request = enroll_request(token.secret().expose(), csr(&new_key()));
            post_enroll(&platform, &request).await
        });
    }
    let mut won = 0;
    while let Some(answer) = racers.join_next().await {
        let answer = answer.unwrap();
        if answer.status == StatusCode::OK {
            won += 1;
        } else {
            assert_eq!(
                refusal(&answer),
                (StatusCode::FORBIDDEN, ErrorCode::TokenUsed)
            );
        }
    }
    assert_eq!(won, 1);
    assert_eq!(platform.devices().await.unwrap().len(), 1);
    platform.shutdown().await;
}

#[tokio::test]
async fn a_three_use_token_enrolls_exactly_three_devices() {
    let (platform, _dir) = start().await;
    let spec = TokenSpec {
        uses: 3,
        ttl: Some(Duration::from_secs(600)),
        team: "line-3".into(),
    };
    let token = platform.create_token(spec).await.unwrap();
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let answer = post_enroll(
            &platform,
            &enroll_request(token.secret().expose(), csr(&new_key())),
        )
        .await;
        statuses.push(answer.status);
    }
    assert_eq!(
        statuses,
        [
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::OK,
            StatusCode::FORBIDDEN
        ]
    );
    let devices = platform.devices().await.unwrap();
    assert_eq!(devices.len(), 3);
    assert!(devices.iter().all(|d| d.team == "line-3"));
    platform.shutdown().await;
}

#[tokio::test]
async fn bad_csrs_and_bad_bodies_are_refused_without_spending_the_token() {
    let (platform, _dir) = start().await;
    let token = platform.create_token(TokenSpec::default()).await.unwrap();
    let garbage = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), "not a csr".into()),
    )
    .await;
    assert_eq!(
        refusal(&garbage),
        (StatusCode::BAD_REQUEST, ErrorCode::BadCsr)
    );

    // A CSR whose signature does not match: a byte of the signature flipped.
    let good = csr(&new_key());
    let der =
        rustls::pki_types::CertificateSigningRequestDer::from_pem_slice(good.as_bytes()).unwrap();
    let mut bytes = der.as_ref().to_vec();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let pem = pem_wrap(&bytes);
    let forged = post_enroll(&platform, &enroll_request(token.secret().expose(), pem)).await;
    assert_eq!(
        refusal(&forged),
        (StatusCode::BAD_REQUEST, ErrorCode::BadCsr)
    );

    let mut bad_name = enroll_request(token.secret().expose(), csr(&new_key()));
    bad_name.name = "a\nb".into();
    let answer = post_enroll(&platform, &bad_name).await;
    assert_eq!(
        refusal(&answer),
        (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
    );

    let huge = vec![b' '; 70 * 1024];
    let answer = send(&platform, http::Method::POST, "/v1/enroll", &[], huge, None)
        .await
        .unwrap();
    assert_eq!(
        refusal(&answer),
        (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
    );

    let answer = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK, "the token was never spent");
    platform.shutdown().await;
}

fn pem_wrap(der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n =
            chunk.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
        }
    }
    while !b64.len().is_multiple_of(4) {
        b64.push('=');
    }
    format!("-----BEGIN CERTIFICATE REQUEST-----\n{b64}\n-----END CERTIFICATE REQUEST-----\n")
}

#[tokio::test]
async fn enrollment_is_rate_limited_per_source_with_retry_after() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.enroll_rate = RateLimit {
        burst: 3,
        refill: Duration::from_secs(3),
    };
    let platform = Platform::start(config).await.unwrap();
    let request = enroll_request("tpt_nope", csr(&new_key()));
    for _ in 0..3 {
        let answer = post_enroll(&platform, &request).await;
        assert_eq!(answer.status, StatusCode::BAD_REQUEST);
    }
    let limited = post_enroll(&platform, &request).await;
    assert_eq!(
        refusal(&limited),
        (StatusCode::TOO_MANY_REQUESTS, ErrorCode::RateLimited)
    );
    let retry: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry), "Retry-After {retry}");
    platform.shutdown().await;
}

#[tokio::test]
async fn a_restart_on_the_same_directory_keeps_the_ca_devices_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let platform = Platform::start(config(dir.path())).await.unwrap();
    let ca = platform.ca_pem();
    let admin_token = platform.admin_token();
    let spec = TokenSpec {
        uses: 2,
        ttl: Some(Duration::from_secs(600)),
        ..TokenSpec::default()
    };
    let token = platform.create_token(spec).await.unwrap();
    let key = new_key();
    let first = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&key)),
    )
    .await;
    assert_eq!(first.status, StatusCode::OK);
    let device: EnrollResponse = serde_json::from_slice(&first.body).unwrap();
    platform.shutdown().await;
    drop(platform);

    let platform = Platform::start(config(dir.path()))
        .await
        .expect("restart on the same directory");
    assert_eq!(platform.ca_pem(), ca);
    assert_eq!(platform.admin_token(), admin_token);
    let devices = platform.devices().await.unwrap();
    assert_eq!(devices.len(), 1);
    assert_eq!(devices[0].id, device.device_id);
    // The old certificate still opens a tunnel: fingerprints survived.
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &key))).await;
    assert!(tunnel.is_ok(), "{:?}", tunnel.err());
    // The 2-use token has exactly one use left.
    let second = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(second.status, StatusCode::OK);
    let third = post_enroll(
        &platform,
        &enroll_request(token.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(
        refusal(&third),
        (StatusCode::FORBIDDEN, ErrorCode::TokenUsed)
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn secrets_are_files_of_mode_0600() {
    use std::os::unix::fs::PermissionsExt;
    let (platform, dir) = start().await;
    for name in [
        "ca.key",
        "server.key",
        "snapshot-key.pk8",
        "grant-key.pk8",
        "admin-token",
    ] {
        let mode = std::fs::metadata(dir.path().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("platform.json")).unwrap()).unwrap();
    assert_eq!(json["url"], platform.url());
    // The store holds the admin token's hash, never the token.
    let db = std::fs::read(dir.path().join("platform.redb")).unwrap();
    let token = platform.admin_token();
    assert!(
        !db.windows(token.expose().len())
            .any(|w| w == token.expose().as_bytes())
    );
    platform.shutdown().await;
}

#[tokio::test]
async fn a_bad_token_is_refused_before_any_signature_or_csr_parsing() {
    let (platform, _dir) = start().await;
    let spent = platform.create_token(TokenSpec::default()).await.unwrap();
    let ok = post_enroll(
        &platform,
        &enroll_request(spent.secret().expose(), csr(&new_key())),
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(platform.certificates_issued(), 1);
    let revoked = platform.create_token(TokenSpec::default()).await.unwrap();
    let id = platform
        .tokens()
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.uses_left == 1)
        .unwrap()
        .id;
    platform.revoke_token(&id).await.unwrap();
    let unknown = format!("tpt_{}", "5".repeat(64));
    let refusals = [
        (unknown.as_str(), ErrorCode::TokenUnknown),
        (spent.secret().expose(), ErrorCode::TokenUsed),
        (revoked.secret().expose(), ErrorCode::TokenRevoked),
    ];
    for (token, code) in refusals {
        // A valid CSR: today's order would sign a certificate, then refuse.
        let answer = post_enroll(&platform, &enroll_request(token, csr(&new_key()))).await;
        assert_eq!(refusal(&answer), (StatusCode::FORBIDDEN, code));
        // Not even parsed: a CSR that is garbage is refused for the token.
        let answer = post_enroll(&platform, &enroll_request(token, "not a csr".into())).await;
        assert_eq!(refusal(&answer), (StatusCode::FORBIDDEN, code));
    }
    assert_eq!(
        platform.certificates_issued(),
        1,
        "no signature for a bad token"
    );
    assert_eq!(platform.devices().await.unwrap().len(), 1);
    platform.shutdown().await;
}

#[tokio::test]
async fn a_multi_use_token_needs_an_explicit_expiry() {
    let (platform, _dir) = start().await;
    let open_ended = TokenSpec {
        uses: 50,
        ..TokenSpec::default()
    };
    let err = platform.create_token(open_ended).await.unwrap_err();
    assert!(err.to_string().contains("explicit expiry"), "{err}");
    assert!(platform.tokens().await.unwrap().is_empty());
    // Over the admin API as well.
    let answer = admin(
        &platform,
        http::Method::POST,
        "/v1/admin/tokens",
        platform.admin_token().expose(),
        br#"{"uses":50,"team":"t"}"#.to_vec(),
    )
    .await;
    assert_eq!(
        refusal(&answer),
        (StatusCode::BAD_REQUEST, ErrorCode::BadRequest)
    );
    // A single-use token may leave its expiry to the default (one hour).
    let answer = admin(
        &platform,
        http::Method::POST,
        "/v1/admin/tokens",
        platform.admin_token().expose(),
        br#"{"uses":1,"team":"t"}"#.to_vec(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let listed = platform.tokens().await.unwrap();
    assert_eq!(listed.len(), 1);
    let ttl = listed[0].expires_at - listed[0].created;
    assert_eq!(ttl, 3600);
    platform.shutdown().await;
}
