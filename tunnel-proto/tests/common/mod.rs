//! Real loopback tunnels for integration tests and benchmarks: TCP on
//! 127.0.0.1 port 0, rustls (ring provider) with a fresh self-signed
//! certificate, tokio-tungstenite with the protocol's WebSocket limits.
#![allow(dead_code, unreachable_pub)]

use std::net::SocketAddr;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tether_proto::tokio_io::{DriverError, Tunnel, websocket_config};
use tether_proto::{Config, ResetCode, Role, Service, ServiceHeader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A server and a client TLS configuration that trust each other.
#[derive(Clone)]
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub connector: TlsConnector,
}

pub fn tls() -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified =
        rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("generate cert");
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(certified.signing_key.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .expect("server config");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).expect("trust anchor");
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Tls {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        connector: TlsConnector::from(Arc::new(client)),
    }
}

pub type Drivers = (
    JoinHandle<Result<(), DriverError>>,
    JoinHandle<Result<(), DriverError>>,
);

/// A connected device/platform tunnel pair over TLS WebSocket on loopback.
/// Both drivers run on the current runtime.
pub async fn tunnel_pair(device: Config, platform: Config) -> (Tunnel, Tunnel, Drivers) {
    let tls = tls();
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let acceptor = tls.acceptor.clone();
    let server = tokio::spawn(async move { accept_platform(&listener, &acceptor, platform).await });
    let (device_tunnel, device_task) = connect_device(addr, &tls.connector, device).await;
    let (platform_tunnel, platform_task) = server.await.expect("server task");
    platform_tunnel
        .connected()
        .await
        .expect("platform handshake");
    (device_tunnel, platform_tunnel, (device_task, platform_task))
}

/// Accepts one tunnel on `listener` and spawns its driver.
pub async fn accept_platform(
    listener: &TcpListener,
    acceptor: &TlsAcceptor,
    config: Config,
) -> (Tunnel, JoinHandle<Result<(), DriverError>>) {
    let (tcp, _) = listener.accept().await.expect("accept");
    tcp.set_nodelay(true).expect("nodelay");
    let tls = acceptor.accept(tcp).await.expect("tls accept");
    let ws =
        tokio_tungstenite::accept_async_with_config(tls, Some(websocket_config(&config.settings)))
            .await
            .expect("websocket accept");
    let (tunnel, driver) = Tunnel::new(ws, config).expect("platform config");
    (tunnel, tokio::spawn(driver))
}

/// Connects a device tunnel to `addr`, spawns its driver and waits for the
/// handshake.
pub async fn connect_device(
    addr: SocketAddr,
    connector: &TlsConnector,
    config: Config,
) -> (Tunnel, JoinHandle<Result<(), DriverError>>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("localhost").expect("server name");
    let tls = connector.connect(name, tcp).await.expect("tls connect");
    let url = format!("wss://localhost:{}/v1/tunnel", addr.port());
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        url,
        tls,
        Some(websocket_config(&config.settings)),
    )
    .await
    .expect("websocket connect");
    let (tunnel, driver) = Tunnel::new(ws, config).expect("device config");
    let task = tokio::spawn(driver);
    tunnel.connected().await.expect("device handshake");
    (tunnel, task)
}

/// Default configurations for both ends.
pub fn configs() -> (Config, Config) {
    (Config::new(Role::Device), Config::new(Role::Platform))
}

/// A deterministic byte pattern, different per stream.
pub fn pattern(seed: u32, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect()
}

/// Accepts streams until the tunnel closes: echoes `tcp:echo` streams back,
/// refuses every other service with `REFUSED`. Returns how many it echoed;
/// an echo that fails panics the task, so awaiting it catches the failure.
pub async fn serve_echo(tunnel: Tunnel) -> usize {
    let allow_echo = |header: &ServiceHeader| match &header.service {
        Service::Tcp(name) if name == "echo" => Ok(()),
        other => Err((
            ResetCode::REFUSED,
            format!("service {other} is not allowed"),
        )),
    };
    let mut served = 0;
    let mut tasks = tokio::task::JoinSet::new();
    while let Some((stream, _)) = tunnel.accept_filtered(allow_echo).await {
        served += 1;
        tasks.spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(stream);
            tokio::io::copy(&mut rd, &mut wr).await.expect("echo copy");
            tokio::io::AsyncWriteExt::shutdown(&mut wr)
                .await
                .expect("echo shutdown");
        });
    }
    while let Some(echo) = tasks.join_next().await {
        echo.expect("echo task");
    }
    served
}
