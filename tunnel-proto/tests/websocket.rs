//! The tokio adapter over a real WebSocket: TLS on 127.0.0.1, many streams
//! at once, refusal, and orderly shutdown.

mod common;

use std::time::Duration;

use tether_proto::tokio_io::Tunnel;
use tether_proto::{CloseCode, ConnectionError, Service, ServiceHeader};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

/// Serves `common::serve_echo` on `tunnel` in its own task.
fn spawn_echo_server(tunnel: Tunnel) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(common::serve_echo(tunnel))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_streams_at_once_each_echo_their_bytes_intact() {
    let (device, platform) = common::configs();
    let (device, platform, drivers) = common::tunnel_pair(device, platform).await;
    let server = spawn_echo_server(platform.clone());

    let mut clients = JoinSet::new();
    for i in 0..100u32 {
        let stream = device
            .open(ServiceHeader::new(Service::Tcp("echo".into())).with("n", i.to_string()))
            .expect("open");
        clients.spawn(async move {
            let payload = common::pattern(i, 64 * 1024 + i as usize * 1024);
            let (mut rd, mut wr) = tokio::io::split(stream);
            let expected = payload.clone();
            let writer = tokio::spawn(async move {
                wr.write_all(&payload).await.expect("write");
                wr.shutdown().await.expect("shutdown");
            });
            let mut echoed = Vec::new();
            rd.read_to_end(&mut echoed).await.expect("read back");
            writer.await.expect("writer");
            assert_eq!(echoed.len(), expected.len(), "stream {i} length");
            assert!(echoed == expected, "stream {i} bytes differ");
        });
    }
    while let Some(result) = clients.join_next().await {
        result.expect("client task");
    }
    device.shutdown(CloseCode::NO_ERROR, "done");
    let served = tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("server ends");
    assert_eq!(served.expect("server task"), 100);
    let (device_driver, platform_driver) = drivers;
    device_driver
        .await
        .expect("device driver task")
        .expect("device closes cleanly");
    platform_driver
        .await
        .expect("platform driver task")
        .expect("platform closes cleanly");
}

#[tokio::test]
async fn a_refused_service_surfaces_as_a_reset_with_its_reason_and_the_tunnel_lives_on() {
    let (device, platform) = common::configs();
    let (device, platform, _drivers) = common::tunnel_pair(device, platform).await;
    let _server = spawn_echo_server(platform);

    let refused = device
        .open(ServiceHeader::new(Service::Tcp("ssh".into())))
        .expect("open");
    let error = refused.accepted().await.expect_err("refused");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);
    assert!(error.to_string().contains("refused"), "{error}");
    assert!(
        error.to_string().contains("service tcp:ssh is not allowed"),
        "the peer's reason reaches the opener: {error}"
    );
    let mut refused = refused;
    let error = refused.write_all(b"x").await.expect_err("writes fail too");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset);

    let mut echo = device
        .open(ServiceHeader::new(Service::Tcp("echo".into())))
        .expect("open");
    echo.accepted().await.expect("accepted");
    echo.write_all(b"still here").await.expect("write");
    echo.shutdown().await.expect("shutdown");
    let mut back = Vec::new();
    echo.read_to_end(&mut back).await.expect("read");
    assert_eq!(back, b"still here");
}

#[tokio::test]
async fn closing_one_side_fails_the_other_sides_streams_with_the_reason() {
    let (device, platform) = common::configs();
    let (device, platform, drivers) = common::tunnel_pair(device, platform).await;
    let _server = spawn_echo_server(platform.clone());
    let mut stream = device
        .open(ServiceHeader::new(Service::Tcp("echo".into())))
        .expect("open");
    stream.accepted().await.expect("accepted");

    platform.close(CloseCode::INTERNAL_ERROR, "maintenance");
    let reason = tokio::time::timeout(Duration::from_secs(5), device.closed())
        .await
        .expect("closed");
    assert_eq!(
        reason,
        ConnectionError::PeerClosed {
            code: CloseCode::INTERNAL_ERROR,
            reason: "maintenance".into()
        }
    );
    let mut buf = [0u8; 8];
    let error = stream.read(&mut buf).await.expect_err("stream fails");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionAborted);
    assert!(error.to_string().contains("maintenance"), "{error}");
    let device_result = drivers.0.await.expect("device driver task");
    assert!(
        device_result.is_err(),
        "an internal error close is not a clean end"
    );
}

#[tokio::test]
async fn aborting_the_driver_fails_streams_instead_of_leaving_them_waiting() {
    let (device, platform) = common::configs();
    let (device, platform, drivers) = common::tunnel_pair(device, platform).await;
    let _server = spawn_echo_server(platform);
    let mut stream = device
        .open(ServiceHeader::new(Service::Tcp("echo".into())))
        .expect("open");
    stream.accepted().await.expect("accepted");

    drivers.0.abort();
    let reason = tokio::time::timeout(Duration::from_secs(5), device.closed())
        .await
        .expect("closed");
    assert_eq!(reason, ConnectionError::TransportClosed);
    let mut buf = [0u8; 8];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
    let error = read.expect("the read ends").expect_err("the read fails");
    assert_eq!(error.kind(), std::io::ErrorKind::ConnectionAborted);
}

type RawPeer =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A platform tunnel and, at its other end, a bare WebSocket client that
/// speaks no tether-proto: the test plays the device by hand.
async fn platform_with_raw_peer(
    config: tether_proto::Config,
) -> (
    Tunnel,
    tokio::task::JoinHandle<Result<(), tether_proto::tokio_io::DriverError>>,
    RawPeer,
) {
    let tls = common::tls();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tls.acceptor.clone();
    let platform =
        tokio::spawn(async move { common::accept_platform(&listener, &acceptor, config).await });
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls_stream = tls.connector.connect(name, tcp).await.expect("tls");
    let url = format!("wss://localhost:{}/v1/tunnel", addr.port());
    let (raw, _) = tokio_tungstenite::client_async(url, tls_stream)
        .await
        .expect("ws");
    let (tunnel, driver) = platform.await.expect("platform");
    (tunnel, driver, raw)
}

#[tokio::test]
async fn an_oversized_websocket_message_is_answered_with_a_frame_size_close() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let (tunnel, _driver, mut raw) = platform_with_raw_peer(platform_config()).await;
    raw.send(Message::Binary(vec![0u8; 200 * 1024].into()))
        .await
        .expect("send oversized");
    let reason = tokio::time::timeout(Duration::from_secs(5), tunnel.closed())
        .await
        .expect("closed");
    match reason {
        ConnectionError::ProtocolViolation { code, .. } => {
            assert_eq!(code, CloseCode::FRAME_SIZE_ERROR)
        }
        other => panic!("expected a frame size violation, got {other:?}"),
    }
    // The peer receives the platform's HELLO and PING, then a CLOSE frame
    // with FRAME_SIZE_ERROR (0x04).
    assert_eq!(
        close_code_seen_by(&mut raw).await,
        Some(CloseCode::FRAME_SIZE_ERROR)
    );
}

#[tokio::test]
async fn a_socket_that_ends_without_a_websocket_close_is_a_transport_loss() {
    let (tunnel, driver, raw) = platform_with_raw_peer(platform_config()).await;
    // Shut the TLS stream down cleanly under the WebSocket, then drop it.
    let mut tls_stream = raw.into_inner();
    tls_stream.shutdown().await.expect("tls shutdown");
    drop(tls_stream);

    let reason = tokio::time::timeout(Duration::from_secs(5), tunnel.closed())
        .await
        .expect("closed");
    assert_eq!(reason, ConnectionError::TransportClosed);
    let ended = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("driver ends");
    assert!(
        ended.expect("driver task").is_err(),
        "a lost transport is not a clean end"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_bridges_to_a_real_tcp_service_with_the_tunnels_own_copy() {
    bridge_to_tcp_echo(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_bridges_to_a_real_tcp_service_with_tokios_copy_bidirectional() {
    bridge_to_tcp_echo(false).await;
}

/// 4 MiB through a tunnel stream to a TCP echo service and back, the
/// platform side half-closing first; the device side bridges with
/// `tether_proto::tokio_io::copy_bidirectional` (`own`) or tokio's.
async fn bridge_to_tcp_echo(own: bool) {
    // A local TCP echo service on 127.0.0.1, as a device's allow-listed
    // service would be.
    let service = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind service");
    let service_addr = service.local_addr().expect("service addr");
    tokio::spawn(async move {
        let (mut socket, _) = service.accept().await.expect("accept");
        let (mut rd, mut wr) = socket.split();
        tokio::io::copy(&mut rd, &mut wr).await.expect("echo");
    });

    let (device, platform) = common::configs();
    let (device, platform, _drivers) = common::tunnel_pair(device, platform).await;
    // The device side bridges each accepted stream to the local service.
    let bridge = tokio::spawn(async move {
        let (mut stream, _) = device.accept().await.expect("incoming stream");
        let mut socket = tokio::net::TcpStream::connect(service_addr)
            .await
            .expect("connect");
        let (to_service, from_service) = if own {
            tether_proto::tokio_io::copy_bidirectional(&mut stream, &mut socket).await
        } else {
            tokio::io::copy_bidirectional(&mut stream, &mut socket).await
        }
        .expect("bridge");
        assert_eq!((to_service, from_service), (4 << 20, 4 << 20));
    });

    let stream = platform
        .open(ServiceHeader::new(Service::Tcp("echo".into())))
        .expect("open");
    let payload = common::pattern(7, 4 * 1024 * 1024);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.expect("write");
        wr.shutdown().await.expect("shutdown");
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), rd.read_to_end(&mut echoed))
        .await
        .expect("echo in time")
        .expect("read");
    writer.await.expect("writer");
    assert!(echoed == payload, "bytes through the TCP bridge differ");
    tokio::time::timeout(Duration::from_secs(5), bridge)
        .await
        .expect("the bridge ends once both directions have")
        .expect("bridge task");
}

fn platform_config() -> tether_proto::Config {
    tether_proto::Config::new(tether_proto::Role::Platform)
}

/// Reads the raw peer's messages until a CLOSE frame arrives; returns its code.
async fn close_code_seen_by(raw: &mut RawPeer) -> Option<CloseCode> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    while let Ok(Some(Ok(message))) = tokio::time::timeout(Duration::from_secs(5), raw.next()).await
    {
        if let Message::Binary(bytes) = message
            && let Ok(tether_proto::Frame::Close { code, .. }) = tether_proto::Frame::decode(&bytes)
        {
            return Some(code);
        }
    }
    None
}

#[tokio::test]
async fn a_text_websocket_message_closes_with_a_protocol_error() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;

    let (tunnel, _driver, mut raw) = platform_with_raw_peer(platform_config()).await;
    raw.send(Message::Text("hello".into()))
        .await
        .expect("send text");
    let reason = tokio::time::timeout(Duration::from_secs(5), tunnel.closed())
        .await
        .expect("closed");
    assert_eq!(
        reason,
        ConnectionError::LocallyClosed {
            code: CloseCode::PROTOCOL_ERROR,
            reason: "text WebSocket message".into()
        }
    );
    assert_eq!(
        close_code_seen_by(&mut raw).await,
        Some(CloseCode::PROTOCOL_ERROR)
    );
}

#[tokio::test]
async fn a_peer_that_never_says_hello_is_closed_at_the_handshake_deadline() {
    let mut config = platform_config();
    config.handshake_timeout = Duration::from_millis(200);
    let (tunnel, driver, mut raw) = platform_with_raw_peer(config).await;
    let reason = tokio::time::timeout(Duration::from_secs(5), tunnel.closed())
        .await
        .expect("closed");
    assert_eq!(
        reason,
        ConnectionError::HandshakeTimeout(Duration::from_millis(200))
    );
    assert_eq!(
        close_code_seen_by(&mut raw).await,
        Some(CloseCode::HANDSHAKE_FAILED)
    );
    let ended = tokio::time::timeout(Duration::from_secs(5), driver)
        .await
        .expect("driver ends");
    assert!(ended.expect("driver task").is_err());
}

#[tokio::test]
async fn tune_socket_sets_nodelay_and_the_notsent_low_water_mark() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (dialed, accepted) = tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
    let (dialed, (accepted, _)) = (dialed.expect("connect"), accepted.expect("accept"));
    for tcp in [&dialed, &accepted] {
        tether_proto::tokio_io::tune_socket(tcp);
        assert!(tcp.nodelay().expect("nodelay"));
        assert_eq!(
            socket2::SockRef::from(tcp)
                .tcp_notsent_lowat()
                .expect("lowat"),
            tether_proto::tokio_io::TUNNEL_NOTSENT_LOWAT
        );
    }
}

/// The first stream after an idle tunnel: in real time, with nothing sent
/// either way for longer than the open timeout (the keepalive interval is
/// longer still), the platform opens a stream and the device accepts it.
/// Before `open` took the time of the call, the stream was already past its
/// deadline at the driver's next turn and was reset at once.
#[tokio::test]
async fn a_stream_opened_after_an_idle_gap_longer_than_the_open_timeout_is_accepted() {
    let (mut device, mut platform) = common::configs();
    for config in [&mut device, &mut platform] {
        config.open_timeout = Duration::from_millis(300);
        config.keepalive_interval = Duration::from_secs(30);
        config.idle_timeout = Duration::from_secs(90);
    }
    let (device, platform, _drivers) = common::tunnel_pair(device, platform).await;
    let _server = spawn_echo_server(device.clone());
    for gap in [900, 1200] {
        tokio::time::sleep(Duration::from_millis(gap)).await;
        let mut stream = platform
            .open(ServiceHeader::new(Service::Tcp("echo".into())))
            .expect("open");
        stream
            .accepted()
            .await
            .unwrap_or_else(|e| panic!("not accepted after {gap} ms idle: {e}"));
        stream.write_all(b"after the gap").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"after the gap");
    }
}
