//! The agent's MQTT 5 client of the device's local broker (rumqttc).
//!
//! This module owns the connection to the local broker: it subscribes to
//! the `publish` filters on every ConnAck (rumqttc does not resubscribe by
//! itself), turns each message into a `tether_proto::mqtt::Message`,
//! appends QoS 1 and 2 messages to the outbox in batches and acknowledges
//! them to the broker only after the batch is on disk, hands QoS 0 ones to
//! the live stream, publishes what the platform sends, and tells the
//! stream when the local broker acknowledged each of those. It never talks
//! to the tunnel and never logs the broker password.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use rumqttc::{Outgoing, TlsConfiguration, Transport};
use tether_proto::mqtt::{Message, Properties};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Bridge, MqttError};
use crate::audit::{Audit, AuditEvent};
use crate::config::MqttConfig;

/// Messages from the local broker waiting for the outbox, at most.
const INTAKE_QUEUE: usize = 4096;
/// Messages appended to the outbox in one transaction, at most.
const BATCH: usize = 1024;
/// Messages the local broker may hold unacknowledged from the agent.
const INFLIGHT: u16 = 1024;
/// Longest pause between attempts to reach the local broker.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// While the outbox stays full, its drops are logged and audited at most
/// this often, each report with the count since the last one.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long the local broker keeps the agent's session (and queues the
/// messages for its subscriptions) while the agent restarts.
const SESSION_EXPIRY_SECS: u32 = 3600;

/// Platform messages handed to the client, waiting for their packet id
/// and then for the local broker's acknowledgement: `(epoch, seq)`.
#[derive(Debug, Default)]
struct Tracker {
    handed: VecDeque<(u64, u64)>,
    by_pkid: HashMap<u16, (u64, u64)>,
}

/// The client and what the stream needs from it.
pub struct Local {
    client: AsyncClient,
    /// What the agent subscribes to, with the QoS it asks for.
    filters: Vec<(String, QoS)>,
    tracker: Mutex<Tracker>,
    /// Where acknowledgements of platform messages go: the live stream's.
    acks: Mutex<Option<mpsc::UnboundedSender<(u64, u64)>>>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

impl Local {
    /// The client for `device` and its event loop (not yet polled).
    pub(super) fn new(config: &MqttConfig, device: &str) -> Result<(Local, EventLoop), MqttError> {
        let endpoint = config
            .endpoint()
            .ok_or_else(|| MqttError::Broker(config.broker.clone()))?;
        let tls = super::broker_tls(config)?;
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("tetherd-{device}"));
        let mut options = MqttOptions::new(client_id, endpoint.host, endpoint.port);
        if let Some(tls) = tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(tls)));
        }
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_start(false)
            .set_session_expiry_interval(Some(SESSION_EXPIRY_SECS))
            .set_manual_acks(true)
            .set_max_packet_size(Some((config.max_payload + 64 * 1024) as u32))
            .set_outgoing_inflight_upper_limit(INFLIGHT)
            .set_receive_maximum(Some(INFLIGHT))
            .set_request_channel_capacity(usize::from(INFLIGHT));
        // Each message is its own small write: without this, Nagle's
        // algorithm holds it for the broker's delayed acknowledgement.
        let mut network = rumqttc::NetworkOptions::new();
        network.set_tcp_nodelay(true);
        options.set_network_options(network);
        if let Some(user) = &config.username {
            options.set_credentials(user, config.password.clone().unwrap_or_default());
        }
        let mut filters: Vec<(String, QoS)> = if config.publish.is_empty() {
            vec![format!("{}/+/{device}/out/#", tether_proto::mqtt::ROOT)]
        } else {
            config.publish.clone()
        }
        .into_iter()
        .map(|f| (f, QoS::ExactlyOnce))
        .collect();
        filters
            .extend(super::topics::local_filters(&config.topics).map(|(f, qos)| (f, qos_of(qos))));
        let (client, events) = AsyncClient::new(options, usize::from(INFLIGHT));
        Ok((
            Local {
                client,
                filters,
                tracker: Mutex::default(),
                acks: Mutex::new(None),
            },
            events,
        ))
    }

    fn tracker(&self) -> std::sync::MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes acknowledgements of platform messages to `tx` (the stream
    /// now up), forgetting what was handed before.
    pub(super) fn ack_to(&self, tx: Option<mpsc::UnboundedSender<(u64, u64)>>) {
        *self.acks.lock().unwrap_or_else(PoisonError::into_inner) = tx;
    }

    /// Publishes a platform message on the local broker; its
    /// acknowledgement comes back on the channel of [`Local::ack_to`] as
    /// `(epoch, seq)` (QoS 0: never). Waits while the client's queue is
    /// full (the local broker is slow or away).
    pub(super) async fn publish(&self, epoch: u64, seq: u64, message: Message) -> bool {
        let Message {
            topic,
            qos,
            retain,
            properties: p,
            payload,
        } = message;
        let properties = PublishProperties {
            payload_format_indicator: p.payload_format,
            message_expiry_interval: p.message_expiry,
            topic_alias: None,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user_properties: p.user,
            subscription_identifiers: Vec::new(),
            content_type: p.content_type,
        };
        self.tracker().handed.push_back((epoch, seq));
        let sent = self
            .client
            .publish_with_properties(topic, qos_of(qos), retain, payload, properties)
            .await;
        if let Err(e) = sent {
            self.tracker().handed.pop_back();
            debug!(cause = %e, "the local MQTT client is gone");
            return false;
        }
        true
    }

    fn outgoing(&self, pkid: u16) {
        let mut tracker = self.tracker();
        // A packet id already known is a retransmission after a reconnect.
        if pkid != 0 && tracker.by_pkid.contains_key(&pkid) {
            return;
        }
        if let Some(handed) = tracker.handed.pop_front()
            && pkid != 0
        {
            tracker.by_pkid.insert(pkid, handed);
        }
    }

    fn acked(&self, pkid: u16) {
        let Some(handed) = self.tracker().by_pkid.remove(&pkid) else {
            return;
        };
        if let Some(tx) = &*self.acks.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = tx.send(handed);
        }
    }
}

fn qos_of(qos: u8) -> QoS {
    match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

/// A message from the local broker as the bridge carries it; `None` if
/// its topic is not UTF-8 (MQTT requires it; rumqttc does not check).
fn message_of(publish: &Publish) -> Option<Message> {
    let topic = std::str::from_utf8(&publish.topic).ok()?.to_owned();
    let p = publish.properties.clone().unwrap_or_default();
    Some(Message {
        topic,
        qos: publish.qos as u8,
        retain: publish.retain,
        properties: Properties {
            payload_format: p.payload_format_indicator,
            message_expiry: p.message_expiry_interval,
            content_type: p.content_type,
            response_topic: p.response_topic,
            correlation_data: p.correlation_data,
            user: p.user_properties,
        },
        payload: publish.payload.clone(),
    })
}

/// Starts polling the client and the outbox intake.
pub(super) fn spawn(bridge: Arc<Bridge>, events: EventLoop) {
    let (intake_tx, intake_rx) = mpsc::channel(INTAKE_QUEUE);
    tokio::spawn(poll(bridge.clone(), events, intake_tx));
    tokio::spawn(intake(bridge, intake_rx));
}

async fn poll(bridge: Arc<Bridge>, mut events: EventLoop, intake: mpsc::Sender<Publish>) {
    let local = &bridge.local;
    let mut retry = Duration::from_secs(1);
    let mut reported = false;
    loop {
        match events.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %bridge.config.broker, "connected to the local MQTT broker");
                retry = Duration::from_secs(1);
                reported = false;
                let filters = local.filters.iter().map(|(f, qos)| Filter {
                    nolocal: true,
                    ..Filter::new(f.clone(), *qos)
                });
                if let Err(e) = local.client.try_subscribe_many(filters) {
                    warn!(cause = %e, "cannot subscribe on the local MQTT broker");
                }
            }
            Ok(Event::Incoming(Packet::Publish(publish))) => {
                if publish.qos == QoS::AtMostOnce {
                    match message_of(&publish) {
                        Some(m) if m.check(bridge.config.max_payload).is_ok() => {
                            bridge.send_live(m)
                        }
                        _ => refuse(&bridge, &publish),
                    }
                } else if intake.send(publish).await.is_err() {
                    return;
                }
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let failed = ack
                    .return_codes
                    .iter()
                    .filter(|c| !matches!(c, SubscribeReasonCode::Success(_)))
                    .count();
                if failed > 0 {
                    warn!(failed, filters = ?local.filters, "the local MQTT broker refused some of the agent's subscriptions");
                }
            }
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => local.outgoing(pkid),
            Ok(Event::Incoming(Packet::PubAck(ack))) => local.acked(ack.pkid),
            Ok(Event::Incoming(Packet::PubComp(comp))) => local.acked(comp.pkid),
            Ok(_) => {}
            Err(e) => {
                if reported {
                    debug!(cause = %e, "local MQTT broker still unreachable");
                } else {
                    warn!(broker = %bridge.config.broker, cause = %e, retry_in = ?retry, "cannot reach the local MQTT broker; retrying");
                    reported = true;
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// A message from the local broker the bridge cannot carry: refused,
/// audited, and acknowledged so the broker does not send it again.
fn refuse(bridge: &Bridge, publish: &Publish) {
    let topic = String::from_utf8_lossy(&publish.topic);
    let reason = match message_of(publish).map(|m| m.check(bridge.config.max_payload)) {
        Some(Err(e)) => e.to_string(),
        Some(Ok(())) => return,
        None => "the topic is not UTF-8".to_owned(),
    };
    bridge.refused(&topic, &reason, "agent");
}

/// Drops of a full outbox, reported (logged and audited) as they start,
/// then at most every [`DROP_REPORT_EVERY`] while they go on, and once more
/// when they stop (the next append that drops nothing, or
/// [`DROP_REPORT_EVERY`] after the last report if nothing comes in): a full outbox under steady traffic drops some messages
/// with every batch, and one record per batch would flood the log and the
/// audit trail. Every dropped message is in exactly one report's count.
#[derive(Debug, Default)]
struct DropReport {
    /// Dropped and not reported yet.
    pending: u64,
    /// When the last report was made, while drops go on.
    last: Option<std::time::Instant>,
}

fn report_drops(bridge: &Bridge, dropped: Option<u64>) {
    if let Some(dropped) = dropped {
        warn!(
            dropped,
            "the MQTT outbox is full: its oldest messages were dropped"
        );
        bridge
            .audit
            .record(AuditEvent::MqttOutboxDropped { count: dropped });
    }
}

impl DropReport {
    /// When the drops not reported yet are due, if there are any.
    fn due(&self) -> Option<std::time::Instant> {
        let last = self.last?;
        (self.pending > 0).then(|| last + DROP_REPORT_EVERY)
    }

    /// Adds one append's drops (`0` when it dropped nothing); returns the
    /// count to report now, if any.
    fn add(&mut self, dropped: u64, now: std::time::Instant) -> Option<u64> {
        self.pending += dropped;
        let due = match self.last {
            None => dropped > 0,
            Some(_) if dropped == 0 => true,
            Some(last) => now.saturating_duration_since(last) >= DROP_REPORT_EVERY,
        };
        if !due || self.pending == 0 {
            if dropped == 0 {
                self.last = None;
            }
            return None;
        }
        self.last = (dropped > 0).then_some(now);
        Some(std::mem::take(&mut self.pending))
    }
}

async fn intake(bridge: Arc<Bridge>, mut rx: mpsc::Receiver<Publish>) {
    let mut drops = DropReport::default();
    loop {
        let received = match drops.due() {
            Some(due) => match tokio::time::timeout_at(due.into(), rx.recv()).await {
                Ok(received) => received,
                Err(_) => {
                    // Nothing came in for a while: report what is left.
                    report_drops(
                        &bridge,
                        drops.add(0, tokio::time::Instant::now().into_std()),
                    );
                    continue;
                }
            },
            None => rx.recv().await,
        };
        let Some(first) = received else { break };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let mut messages = Vec::with_capacity(batch.len());
        for publish in &batch {
            match message_of(publish) {
                Some(m) if m.check(bridge.config.max_payload).is_ok() => messages.push(m),
                _ => refuse(&bridge, publish),
            }
        }
        let messages = Arc::new(messages);
        let mut retry = Duration::from_millis(100);
        loop {
            let batch = messages.clone();
            match bridge.with_outbox(move |o| o.append(&batch)).await {
                Ok(dropped) => {
                    let now = tokio::time::Instant::now().into_std();
                    report_drops(&bridge, drops.add(dropped, now));
                    let next = bridge
                        .stats
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .next;
                    bridge.appended.send_replace(next);
                    break;
                }
                Err(e) => {
                    // The local broker is not acknowledged: it keeps the
                    // messages and sends no more than its window.
                    warn!(cause = %e, retry_in = ?retry, "cannot append to the MQTT outbox");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(MAX_RETRY);
                }
            }
        }
        for publish in &batch {
            if let Err(e) = bridge.local.client.ack(publish).await {
                debug!(cause = %e, "cannot acknowledge on the local MQTT broker");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_drops_are_reported_as_they_start_then_every_ten_seconds_then_when_they_stop() {
        let t0 = std::time::Instant::now();
        let mut drops = DropReport::default();
        let (mut dropped, mut reported) = (0, 0);
        let mut add = |n: u64, secs: u64| {
            dropped += n;
            let report = drops.add(n, t0 + Duration::from_secs(secs));
            reported += report.unwrap_or(0);
            (report, dropped, reported)
        };
        assert_eq!(add(0, 0).0, None, "nothing dropped, nothing said");
        assert_eq!(add(5, 1).0, Some(5), "the first drop at once");
        assert_eq!(add(7, 2).0, None);
        assert_eq!(add(8, 10).0, None);
        assert_eq!(add(1, 11).0, Some(16), "ten seconds after the first report");
        assert_eq!(add(4, 12).0, None);
        assert_eq!(add(0, 13).0, Some(4), "what is left once drops stop");
        assert_eq!(add(0, 14).0, None);
        let (report, dropped, reported) = add(3, 15);
        assert_eq!(report, Some(3), "a new run of drops starts over");
        assert_eq!(reported, dropped, "every drop is in exactly one report");
    }
}
