//! An MQTT 5 broker (rumqttd, as the platform embeds it) on
//! `127.0.0.1:PORT`, in a process of its own so that a test can stop it and
//! start it again on the same port: a device's local broker restarting.
//!
//!     tether-test-broker PORT

use std::net::{Ipv4Addr, SocketAddr};

fn main() -> anyhow::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("usage: tether-test-broker PORT"))?;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let config = tether_platform::mqtt::embedded_config(addr, None, 2 * 1024 * 1024);
    rumqttd::Broker::new(config)
        .start()
        .map_err(|e| anyhow::anyhow!("the broker stopped: {e}"))
}
