//! `tether-platform connect --remote`: a local TCP proxy to a service on a
//! device, for engineers not on the platform's host (the default mode has the
//! platform listen itself, see [`crate::listen`]).
//!
//! This module owns the proxy loop: each TCP connection accepted on the
//! local address becomes one connect session (an HTTPS upgrade to the admin
//! API's connect endpoint), and bytes are copied both ways until either
//! side ends. A session that cannot be opened closes its local connection
//! and is reported; the proxy keeps listening. It never listens anywhere
//! but the address it is given.

use std::net::SocketAddr;

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, info_span, warn};

use crate::client::AdminClient;

/// A bound local proxy.
#[derive(Debug)]
pub struct Proxy {
    listener: TcpListener,
    client: AdminClient,
    device_id: String,
    service: String,
}

impl Proxy {
    /// Binds `listen`.
    pub async fn bind(
        client: AdminClient,
        listen: SocketAddr,
        device_id: &str,
        service: &str,
    ) -> std::io::Result<Proxy> {
        Ok(Proxy {
            listener: TcpListener::bind(listen).await?,
            client,
            device_id: device_id.to_string(),
            service: service.to_string(),
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until the task is dropped.
    pub async fn run(self) -> std::io::Result<()> {
        loop {
            let (tcp, peer) = self.listener.accept().await?;
            let client = self.client.clone();
            let (device_id, service) = (self.device_id.clone(), self.service.clone());
            let span = info_span!("session", %peer);
            tokio::spawn(
                async move { session(client, tcp, &device_id, &service).await }.instrument(span),
            );
        }
    }
}

async fn session(client: AdminClient, mut tcp: TcpStream, device_id: &str, service: &str) {
    let _ = tcp.set_nodelay(true);
    let mut remote = match client.connect(device_id, service).await {
        Ok(remote) => remote,
        Err(e) => return warn!("cannot open the session: {e}"),
    };
    crate::bridge::bridge_io(&mut tcp, &mut remote).await;
}
