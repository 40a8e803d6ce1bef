//! The tunnel endpoint and the control stream over real mutual TLS:
//! authentication by certificate, revocation of a live tunnel, renewal,
//! heartbeats, and streams the platform opens or refuses.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http::StatusCode;
use rcgen::KeyPair;
use tether_platform::{ConnectError, Platform, PlatformEvent};
use tether_proto::api::ErrorCode;
use tether_proto::control::{ControlDecoder, ControlMessage, Heartbeat, encode};
use tether_proto::tokio_io::TunnelStream;
use tether_proto::{CloseCode, ConnectionError, ResetCode, Service, ServiceHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn the_issued_certificate_opens_a_tunnel_and_the_platform_sees_it() {
    let (platform, _dir) = start().await;
    let mut events = platform.events();
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .expect("tunnel");
    let (id, fingerprint) = next_event(&mut events, |e| match e {
        PlatformEvent::TunnelUp {
            device_id,
            fingerprint,
        } => Some((device_id.clone(), fingerprint.clone())),
        _ => None,
    })
    .await;
    assert_eq!(id, device.id);
    assert_eq!(fingerprint.len(), 64);
    assert!(platform.tunnel(&device.id).is_some());
    let listed = platform.devices().await.unwrap();
    assert!(listed[0].online && listed[0].connected_since.is_some());

    tunnel.tunnel.close(CloseCode::NO_ERROR, "bye");
    let (id, _) = next_event(&mut events, |e| match e {
        PlatformEvent::TunnelDown { device_id, reason } => {
            Some((device_id.clone(), reason.clone()))
        }
        _ => None,
    })
    .await;
    assert_eq!(id, device.id);
    assert!(platform.tunnel(&device.id).is_none());
    platform.shutdown().await;
}

#[tokio::test]
async fn no_certificate_is_401_and_another_cas_certificate_fails_the_handshake() {
    let (platform, _dir) = start().await;
    match open_tunnel(&platform, None).await {
        Err(TunnelRefused::Http(status, error)) => {
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_eq!(error.error, ErrorCode::DeviceUnknown);
        }
        other => panic!("expected 401, got {:?}", other.map(|_| ())),
    }

    // A certificate from a CA the platform never saw.
    let key = new_key();
    let mut params = rcgen::CertificateParams::new(vec!["device".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let foreign = params.self_signed(&key).unwrap().pem();
    match open_tunnel(&platform, Some((&foreign, &key))).await {
        Err(TunnelRefused::Transport(reason)) => {
            assert!(!reason.is_empty());
        }
        other => panic!("expected a TLS failure, got {:?}", other.map(|_| ())),
    }
    // Nor does it get any HTTP answer on other endpoints.
    let answer = send(
        &platform,
        http::Method::GET,
        "/v1/admin/devices",
        &[],
        Vec::new(),
        Some((&foreign, &key)),
    )
    .await;
    assert!(answer.is_err(), "the handshake must fail: {answer:?}");
    platform.shutdown().await;
}

#[tokio::test]
async fn revoking_a_live_device_closes_its_tunnel_with_revoked_and_refuses_it_after() {
    let (platform, _dir) = start().await;
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .expect("tunnel");
    // Wait until the platform has registered it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while platform.tunnel(&device.id).is_none() {
        assert!(Instant::now() < deadline, "tunnel registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let token = platform.admin_token();
    let started = Instant::now();
    let path = format!("/v1/admin/devices/{}/revoke", device.id);
    let answer = admin(
        &platform,
        http::Method::POST,
        &path,
        token.expose(),
        Vec::new(),
    )
    .await;
    assert_eq!(answer.status, StatusCode::OK);
    let closed = tokio::time::timeout(Duration::from_secs(2), tunnel.tunnel.closed())
        .await
        .expect("the tunnel closes within 2 s of the revocation");
    assert!(started.elapsed() < Duration::from_secs(2));
    match closed {
        ConnectionError::PeerClosed { code, .. } => assert_eq!(code, CloseCode::REVOKED),
        other => panic!("expected a REVOKED close, got {other:?}"),
    }

    match open_tunnel(&platform, Some((&device.certificate, &device.key))).await {
        Err(TunnelRefused::Http(status, error)) => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(error.error, ErrorCode::DeviceRevoked);
        }
        other => panic!("expected 403 device_revoked, got {:?}", other.map(|_| ())),
    }
    assert!(platform.devices().await.unwrap()[0].revoked);
    platform.shutdown().await;
}

#[tokio::test]
async fn a_new_tunnel_replaces_the_old_one() {
    let (platform, _dir) = start().await;
    let device = enroll_new(&platform).await;
    let identity = Some((device.certificate.as_str(), &device.key));
    let first = open_tunnel(&platform, identity)
        .await
        .expect("first tunnel");
    let _second = open_tunnel(&platform, identity)
        .await
        .expect("second tunnel");
    let closed = tokio::time::timeout(Duration::from_secs(2), first.tunnel.closed())
        .await
        .expect("the old tunnel closes");
    assert!(
        matches!(closed, ConnectionError::PeerClosed { .. }),
        "{closed:?}"
    );
    platform.shutdown().await;
}

/// Opens the control stream and sends `message`.
async fn control(tunnel: &DeviceTunnel) -> TunnelStream {
    let stream = tunnel
        .tunnel
        .open(ServiceHeader::new(Service::Control))
        .unwrap();
    stream
        .accepted()
        .await
        .expect("the platform accepts the control stream");
    stream
}

/// The next control message that answers a request: the platform's own
/// protection mode pushes (tested in `web.rs`) are skipped.
async fn read_message(stream: &mut TunnelStream) -> ControlMessage {
    let mut decoder = ControlDecoder::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some(message) = decoder.next_message().unwrap() {
            if !matches!(message, ControlMessage::Protection { .. }) {
                return message;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("an answer within 5 s")
            .unwrap();
        assert!(n > 0, "the control stream ended");
        decoder.push(&buf[..n]);
    }
}

/// Sends a renewal request with a fresh key; returns the key and the
/// answer.
async fn renew(stream: &mut TunnelStream, id: u64) -> (KeyPair, ControlMessage) {
    let key = new_key();
    let request = ControlMessage::RenewRequest { id, csr: csr(&key) };
    stream.write_all(&encode(&request).unwrap()).await.unwrap();
    (key, read_message(stream).await)
}

/// The SHA-256 fingerprint (hex) of a PEM certificate, as the platform
/// names certificates.
fn fingerprint_of(pem: &str) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).unwrap();
    tether_platform::keys::sha256_hex(der.as_ref())
}

fn refused(answer: &ControlMessage) -> Option<&str> {
    match answer {
        ControlMessage::Error { code, message, .. } if code == "renewal_refused" => {
            Some(message.as_str())
        }
        _ => None,
    }
}

#[tokio::test]
async fn renewal_happens_in_its_window_or_on_request_and_retires_the_old_certificate() {
    let (platform, _dir) = start().await;
    let mut events = platform.events();
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    let mut stream = control(&tunnel).await;

    let beat = ControlMessage::Heartbeat(Heartbeat {
        seq: 1,
        uptime_secs: 3,
        agent_version: "0.1.0".into(),
        ..Heartbeat::default()
    });
    stream.write_all(&encode(&beat).unwrap()).await.unwrap();
    let seq = next_event(&mut events, |e| match e {
        PlatformEvent::Heartbeat { device_id, seq } if *device_id == device.id => Some(*seq),
        _ => None,
    })
    .await;
    assert_eq!(seq, 1);
    assert!(
        platform.devices().await.unwrap()[0]
            .last_heartbeat
            .is_some()
    );

    // Thirty days left, the window is fifteen: too early, and nothing is
    // signed for it.
    let (_, early) = renew(&mut stream, 6).await;
    let message = refused(&early).unwrap_or_else(|| panic!("refused: {early:?}"));
    assert!(message.contains("renewal window"), "{message}");

    // The operator asks; the device is told at once.
    assert!(platform.request_renewal(&device.id).await.unwrap());
    assert_eq!(read_message(&mut stream).await, ControlMessage::RenewNow);
    // A bad CSR gets an Error answer, and the stream goes on.
    let bad = ControlMessage::RenewRequest {
        id: 5,
        csr: "junk".into(),
    };
    stream.write_all(&encode(&bad).unwrap()).await.unwrap();
    match read_message(&mut stream).await {
        ControlMessage::Error { id, code, .. } => {
            assert_eq!(id, Some(5));
            assert_eq!(code, "bad_csr");
        }
        other => panic!("expected an Error, got {other:?}"),
    }

    let (new_key, answer) = renew(&mut stream, 7).await;
    let (certificate, not_after) = match answer {
        ControlMessage::RenewResponse {
            id,
            certificate,
            not_after,
        } => {
            assert_eq!(id, 7);
            (certificate, not_after)
        }
        other => panic!("expected a RenewResponse, got {other:?}"),
    };
    assert_ne!(certificate, device.certificate);
    let renewed = next_event(&mut events, |e| match e {
        PlatformEvent::Renewed {
            device_id,
            not_after,
        } if *device_id == device.id => Some(*not_after),
        _ => None,
    })
    .await;
    assert_eq!(renewed, not_after);

    // Until the device uses the new certificate, the old one still opens a
    // tunnel (a renewal answer may have been lost on the way) ...
    let old = open_tunnel(&platform, Some((&device.certificate, &device.key))).await;
    assert!(old.is_ok(), "{:?}", old.err());
    // ... the new one, with the new key, does (TLS proves the key) ...
    let fingerprint = fingerprint_of(&certificate);
    let mut events = platform.events();
    let renewed_tunnel = open_tunnel(&platform, Some((&certificate, &new_key))).await;
    assert!(renewed_tunnel.is_ok(), "{:?}", renewed_tunnel.err());
    next_event(&mut events, |e| match e {
        PlatformEvent::TunnelUp {
            device_id,
            fingerprint: fp,
        } if *device_id == device.id && *fp == fingerprint => Some(()),
        _ => None,
    })
    .await;
    let listed = platform.devices().await.unwrap();
    assert_eq!(
        listed[0].current_certificate.as_deref(),
        Some(fingerprint.as_str())
    );
    // ... and from then on the old one is a superseded copy: refused, and
    // reported.
    let old = open_tunnel(&platform, Some((&device.certificate, &device.key))).await;
    match old.err().expect("the old certificate is refused") {
        TunnelRefused::Http(status, error) => {
            assert_eq!(status, StatusCode::FORBIDDEN);
            assert_eq!(error.error, ErrorCode::CertificateSuperseded);
            assert!(error.message.contains("superseded"), "{}", error.message);
        }
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
    let reported = next_event(&mut events, |e| match e {
        PlatformEvent::IdentityConflict { device_id, .. } => Some(device_id.clone()),
        _ => None,
    })
    .await;
    assert_eq!(reported, device.id);
    assert!(
        platform.devices().await.unwrap()[0]
            .superseded_seen_at
            .is_some()
    );

    // One certificate can be revoked without the device: its tunnel closes
    // and it opens no other; the device is not revoked.
    assert!(
        platform
            .revoke_certificate(&device.id, &fingerprint)
            .await
            .unwrap()
    );
    let again = open_tunnel(&platform, Some((&certificate, &new_key))).await;
    match again.err().expect("the revoked certificate is refused") {
        TunnelRefused::Http(_, error) => assert_eq!(error.error, ErrorCode::CertificateRevoked),
        other => panic!("expected an HTTP refusal, got {other:?}"),
    }
    assert!(!platform.devices().await.unwrap()[0].revoked);
    platform.shutdown().await;
}

#[tokio::test]
async fn a_thousand_renewals_in_a_loop_get_three_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    // Always inside the window: only the hourly limit stops a loop.
    config.renewal_window = config.cert_validity;
    let platform = Platform::start(config).await.unwrap();
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    let mut stream = control(&tunnel).await;
    let mut issued = 0;
    let mut refusals = 0;
    for id in 0..1000 {
        let request = ControlMessage::RenewRequest {
            id,
            csr: csr(&device.key),
        };
        stream.write_all(&encode(&request).unwrap()).await.unwrap();
        match read_message(&mut stream).await {
            ControlMessage::RenewResponse { .. } => issued += 1,
            answer => {
                let message = refused(&answer).unwrap_or_else(|| panic!("{answer:?}"));
                assert!(message.contains("times in the last hour"), "{message}");
                refusals += 1;
            }
        }
    }
    assert_eq!((issued, refusals), (3, 997));
    platform.shutdown().await;
}

#[tokio::test]
async fn the_platform_refuses_streams_a_device_opens_other_than_control() {
    let (platform, _dir) = start().await;
    let device = enroll_new(&platform).await;
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    let stream = tunnel
        .tunnel
        .open(ServiceHeader::new(Service::Tcp("ssh".into())))
        .unwrap();
    let refused = stream.accepted().await.unwrap_err();
    assert!(refused.to_string().contains("refused"), "{refused}");
    platform.shutdown().await;
}

#[tokio::test]
async fn open_tcp_reaches_a_device_service_or_says_why_not() {
    let (platform, _dir) = start().await;
    let device = enroll_new(&platform).await;
    assert!(matches!(
        platform.open_tcp(&device.id, "echo").await,
        Err(ConnectError::DeviceOffline(_))
    ));
    assert!(matches!(
        platform.open_tcp("dev_00000000000000000000", "echo").await,
        Err(ConnectError::UnknownDevice(_))
    ));
    let tunnel = open_tunnel(&platform, Some((&device.certificate, &device.key)))
        .await
        .unwrap();
    let device_side = tunnel.tunnel.clone();
    tokio::spawn(async move {
        let allow_echo = |header: &ServiceHeader| match &header.service {
            Service::Tcp(name) if name == "echo" => Ok(()),
            other => Err((
                ResetCode::REFUSED,
                format!("service '{other}' is not allow-listed on this device"),
            )),
        };
        while let Some((stream, _)) = device_side.accept_filtered(allow_echo).await {
            tokio::spawn(async move {
                let (mut rd, mut wr) = tokio::io::split(stream);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
                let _ = wr.shutdown().await;
            });
        }
    });
    let mut stream = platform
        .open_tcp(&device.id, "echo")
        .await
        .expect("echo accepted");
    stream.write_all(b"ping through the tunnel").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed, b"ping through the tunnel");

    match platform.open_tcp(&device.id, "ssh").await {
        Err(ConnectError::Refused(reason)) => assert!(reason.contains("refused"), "{reason}"),
        other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
    }
    platform.shutdown().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_handshake_timeout_and_connections_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.handshake_timeout = Duration::from_millis(300);
    config.max_connections = 1;
    let platform = tether_platform::Platform::start(config).await.unwrap();

    // The first connection takes the only slot and says nothing.
    let mut silent = tokio::net::TcpStream::connect(platform.local_addr())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A second one is dropped at once: the platform is at its limit.
    let mut extra = tokio::net::TcpStream::connect(platform.local_addr())
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let dropped = tokio::time::timeout(Duration::from_millis(250), extra.read(&mut buf)).await;
    assert!(
        matches!(dropped, Ok(Ok(0)) | Ok(Err(_))),
        "the extra connection is closed: {dropped:?}"
    );

    // The silent one is closed by the handshake timeout...
    let started = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(2), silent.read(&mut buf)).await;
    assert!(matches!(ended, Ok(Ok(0)) | Ok(Err(_))), "{ended:?}");
    assert!(started.elapsed() < Duration::from_secs(1));
    // ...which frees the slot for a real request.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let answer = send(
        &platform,
        http::Method::GET,
        "/nowhere",
        &[],
        Vec::new(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(answer.status, StatusCode::NOT_FOUND);
    platform.shutdown().await;
}
