//! An MQTT 5 client of a broker, as a flow would be, for the bridge's tests
//! and `tether-mqtt-bench`: subscribes to its filters on every ConnAck and
//! hands over what arrives.

use std::time::Duration;

use anyhow::{Context, Result};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use tokio::sync::mpsc;

/// A connected client; what arrives on its subscriptions comes out of `rx`.
#[derive(Debug)]
pub struct Client {
    pub client: AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Publish>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client `id` of the broker on 127.0.0.1:`port`, connected and with
/// every filter acknowledged (within 10 s).
pub async fn client(port: u16, id: &str, filters: &[String]) -> Result<Client> {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_outgoing_inflight_upper_limit(1000)
        .set_receive_maximum(Some(1000));
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    options.set_network_options(network);
    let (client, mut events) = AsyncClient::new(options, 10_000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, mut ready) = mpsc::unbounded_channel();
    let sub = client.clone();
    let filters = filters.to_vec();
    let want = filters.len().max(1);
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    for f in &filters {
                        let _ = sub.subscribe(f.clone(), QoS::AtLeastOnce).await;
                    }
                    if filters.is_empty() {
                        let _ = ready_tx.send(());
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    let _ = ready_tx.send(());
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p);
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    for _ in 0..want {
        tokio::time::timeout(Duration::from_secs(10), ready.recv())
            .await
            .context("an MQTT client did not connect and subscribe within 10 s")?;
    }
    Ok(Client { client, rx, task })
}
