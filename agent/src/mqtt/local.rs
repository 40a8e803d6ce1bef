//! The bridge's side of the local broker: what the agent subscribes to,
//! what it does with each message from the broker, and where the
//! acknowledgements of the platform's messages go.
//!
//! This module turns each message from the local broker into a
//! `tether_proto::mqtt::Message` and takes QoS 1 and 2 ones in batches:
//! held in memory ([`super::tail`]) while a stream keeps up, acknowledged
//! to the broker when the platform has them; else appended to the outbox
//! with everything held and acknowledged (all of a batch at once) once on
//! disk. It writes what is held to disk when it has waited too long or the
//! stream ended, hands QoS 0 messages to the live stream, publishes what
//! the platform sends, and tells the stream when the local broker
//! acknowledged each of those. The connection itself is
//! `tether_mqtt_client`'s loop. It never talks to the tunnel and never
//! logs the broker password.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tether_mqtt_client::{
    self as client, Deliveries, LinkError, Login, Outbound, Publish, QoS, Session, Tag,
};
use tether_proto::mqtt::Message;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::tail::{Receipt, Route};
use super::{Bridge, MqttError};
use crate::audit::{Audit, AuditEvent};
use crate::config::MqttConfig;

/// Messages from the local broker waiting for the outbox, at most.
const INTAKE_QUEUE: usize = 4096;
/// Messages appended to the outbox in one transaction, at most.
const BATCH: usize = 1024;
/// Messages the local broker may hold unacknowledged from the agent, and
/// the agent from it: what the tail holds, so that under sustained load
/// the broker waits for the platform's acknowledgements rather than the
/// tail overflowing to disk (a tail that does not move goes there after
/// [`super::tail::MAX_AGE`]).
const INFLIGHT: u16 = super::tail::MAX_MESSAGES as u16;
/// Longest pause between attempts to append to the outbox.
const MAX_RETRY: Duration = Duration::from_secs(30);
/// While the outbox stays full, its drops are logged and audited at most
/// this often, each report with the count since the last one.
const DROP_REPORT_EVERY: Duration = Duration::from_secs(10);
/// How long the local broker keeps the agent's session (and queues the
/// messages for its subscriptions) while the agent restarts.
const SESSION_EXPIRY_SECS: u32 = 3600;
/// How often the agent and the local broker show each other they are
/// there.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long connecting, TLS and the ConnAck may take together.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pauses between attempts to reach the local broker: the first, doubled
/// up to the longest.
const RECONNECT: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(30));

/// The client's handle and what the stream needs from it.
pub struct Local {
    client: client::Handle,
    /// Where acknowledgements of platform messages go: the live stream's.
    acks: Mutex<Option<mpsc::UnboundedSender<Tag>>>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").finish_non_exhaustive()
    }
}

/// A message from the local broker and the connection that delivered it
/// (its acknowledgement goes on that connection or not at all).
#[derive(Debug)]
pub(super) struct Inbound {
    connection: u64,
    publish: Publish,
}

impl Local {
    /// The client for `device`, not yet running.
    pub(super) fn new(
        config: &MqttConfig,
        device: &str,
    ) -> Result<(Local, client::Client), MqttError> {
        let endpoint = config
            .endpoint()
            .ok_or_else(|| MqttError::Broker(config.broker.clone()))?;
        let tls = super::broker_tls(config)?;
        let client_id = config
            .client_id
            .clone()
            .unwrap_or_else(|| format!("tetherd-{device}"));
        let mut filters: Vec<(String, QoS)> = if config.publish.is_empty() {
            vec![format!("{}/+/{device}/out/#", tether_proto::mqtt::ROOT)]
        } else {
            config.publish.clone()
        }
        .into_iter()
        .map(|f| (f, QoS::ExactlyOnce))
        .collect();
        filters.extend(
            super::topics::local_filters(&config.topics).map(|(f, qos)| (f, client::qos(qos))),
        );
        let settings = client::Settings {
            host: endpoint.host,
            port: endpoint.port,
            tls,
            client_id,
            keep_alive: KEEP_ALIVE,
            session: Session::Kept {
                expiry_secs: SESSION_EXPIRY_SECS,
            },
            inflight: INFLIGHT,
            max_packet: u32::try_from(config.max_payload + 64 * 1024).unwrap_or(u32::MAX),
            login: config
                .username
                .as_ref()
                .map(|user| Login::new(user.clone(), config.password.clone().unwrap_or_default())),
            filters,
            manual_acks: true,
            connect_timeout: CONNECT_TIMEOUT,
            retry: RECONNECT,
        };
        let (handle, client) = client::new(settings, usize::from(INFLIGHT));
        Ok((
            Local {
                client: handle,
                acks: Mutex::new(None),
            },
            client,
        ))
    }

    /// Routes acknowledgements of platform messages to `tx` (the stream
    /// now up).
    pub(super) fn ack_to(&self, tx: Option<mpsc::UnboundedSender<Tag>>) {
        *self.acks.lock().unwrap_or_else(PoisonError::into_inner) = tx;
    }

    /// Acknowledges messages of the local broker, in the order given, a
    /// run per connection.
    pub(super) fn ack(&self, receipts: &[Receipt]) {
        for run in receipts.chunk_by(|a, b| a.connection == b.connection) {
            let packets = run.iter().map(|r| (r.pkid, r.qos)).collect();
            self.client.ack(run[0].connection, packets);
        }
    }

    fn acked(&self, tag: Tag) {
        if let Some(tx) = &*self.acks.lock().unwrap_or_else(PoisonError::into_inner) {
            let _ = tx.send(tag);
        }
    }

    /// Publishes a platform message on the local broker; its
    /// acknowledgement comes back on the channel of [`Local::ack_to`] as
    /// `(epoch, seq)`. Waits while the client's queue is full (the local
    /// broker is slow or away).
    pub(super) async fn publish(&self, epoch: u64, seq: u64, message: Message) -> bool {
        let sent = self
            .client
            .publish(Outbound {
                tag: (epoch, seq),
                publish: client::publish_of(message),
            })
            .await;
        if !sent {
            debug!("the local MQTT client is gone");
        }
        sent
    }
}

/// What the client reports, handled for the bridge.
struct Intake {
    bridge: Arc<Bridge>,
    tx: mpsc::Sender<Inbound>,
}

impl Deliveries for Intake {
    async fn received(&self, connection: u64, publish: Publish) -> bool {
        if publish.qos != QoS::AtMostOnce {
            return self
                .tx
                .send(Inbound {
                    connection,
                    publish,
                })
                .await
                .is_ok();
        }
        match client::message_of(&publish) {
            Some(m) if m.check(self.bridge.config.max_payload).is_ok() => self.bridge.send_live(m),
            _ => refuse(&self.bridge, &publish),
        }
        true
    }

    fn delivered(&self, tag: Tag) {
        self.bridge.local.acked(tag);
    }

    fn rejected(&self, tag: Tag, topic: &str, reason: &str) {
        self.bridge.refused(topic, reason, "local broker");
        // Handled: the platform must not send it again.
        self.bridge.local.acked(tag);
    }

    fn connected(&self, _: u64) {
        info!(
            broker = %self.bridge.config.broker,
            "connected to the local MQTT broker"
        );
    }

    fn disconnected(&self, error: &LinkError, retry_in: Duration, repeated: bool) {
        let broker = &self.bridge.config.broker;
        if repeated {
            debug!(%broker, cause = %error, "local MQTT broker still unreachable");
        } else if let LinkError::Refused(_) = error {
            warn!(%broker, cause = %error, ?retry_in, "the local MQTT broker refused the agent ([mqtt] username, password and client_id); retrying");
        } else {
            warn!(%broker, cause = %error, ?retry_in, "cannot reach the local MQTT broker; retrying");
        }
    }

    fn subscribed(&self, refused: Vec<(String, String)>) {
        if !refused.is_empty() {
            warn!(
                ?refused,
                "the local MQTT broker refused some of the agent's subscriptions"
            );
        }
    }
}

/// Starts the client and the outbox intake.
pub(super) fn spawn(bridge: Arc<Bridge>, client: client::Client) {
    let (tx, rx) = mpsc::channel(INTAKE_QUEUE);
    let deliveries = Arc::new(Intake {
        bridge: bridge.clone(),
        tx,
    });
    tokio::spawn(client::run(client, deliveries));
    tokio::spawn(intake(bridge, rx));
}

/// A message from the local broker the bridge cannot carry: refused,
/// audited, and acknowledged so the broker does not send it again.
fn refuse(bridge: &Bridge, publish: &Publish) {
    let topic = String::from_utf8_lossy(&publish.topic);
    let reason = match client::message_of(publish).map(|m| m.check(bridge.config.max_payload)) {
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

async fn intake(bridge: Arc<Bridge>, mut rx: mpsc::Receiver<Inbound>) {
    let mut drops = DropReport::default();
    loop {
        let deadline = [drops.due(), bridge.tail().due()]
            .into_iter()
            .flatten()
            .min();
        let wait = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let first = tokio::select! {
            received = rx.recv() => match received {
                Some(first) => Some(first),
                None => break,
            },
            () = bridge.flush_now.notified() => None,
            () = wait => None,
        };
        let now = tokio::time::Instant::now().into_std();
        let Some(first) = first else {
            if bridge.tail().due().is_some_and(|at| at <= now) {
                store(&bridge, Vec::new(), &mut drops).await;
            }
            if drops.due().is_some_and(|at| at <= now) {
                // Nothing came in for a while: report what is left.
                report_drops(&bridge, drops.add(0, now));
            }
            continue;
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        take(&bridge, batch, now, &mut drops).await;
    }
}

/// Holds a batch from the local broker, or stores it with everything held.
async fn take(
    bridge: &Arc<Bridge>,
    batch: Vec<Inbound>,
    now: std::time::Instant,
    drops: &mut DropReport,
) {
    let mut eligible = true;
    let mut bytes = 0;
    let mut messages = Vec::with_capacity(batch.len());
    for Inbound {
        connection,
        publish,
    } in &batch
    {
        let receipt = Receipt {
            connection: *connection,
            pkid: publish.pkid,
            qos: publish.qos,
        };
        match client::message_of(publish) {
            Some(m) if m.check(bridge.config.max_payload).is_ok() => {
                eligible &= m.qos == 1;
                bytes += m.size();
                messages.push((Some(m), receipt));
            }
            _ => {
                refuse(bridge, publish);
                eligible = false;
                messages.push((None, receipt));
            }
        }
    }
    let mut full_since = None;
    loop {
        let route = {
            let mut tail = bridge.tail();
            let route = tail.route(messages.len(), bytes, eligible);
            if route == Route::Hold {
                // Eligible: every message is there.
                let held = std::mem::take(&mut messages)
                    .into_iter()
                    .filter_map(|(m, r)| m.map(|m| (m, r)));
                tail.hold(held.collect(), now);
            }
            route
        };
        match route {
            Route::Hold => {
                bridge.appended.send_replace(());
                return;
            }
            Route::Reserve(upto) => match bridge.with_outbox(move |o| o.reserve(upto)).await {
                Ok(()) => bridge.tail().reserved(upto),
                Err(e) => {
                    warn!(cause = %e, "cannot reserve numbers in the MQTT outbox; writing to it");
                    break;
                }
            },
            Route::Full => {
                // The platform acknowledges a window at a time: wait for
                // room a moment before writing everything to disk.
                let deadline = *full_since
                    .get_or_insert_with(|| tokio::time::Instant::now() + super::tail::FULL_WAIT);
                if tokio::time::timeout_at(deadline, bridge.room.notified())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            Route::Store => break,
        }
    }
    store(bridge, messages, drops).await;
}

/// Appends everything held and `batch` to the outbox (retrying until it
/// can: the local broker is not acknowledged meanwhile, keeps the messages
/// and sends no more than its window), then acknowledges them to the
/// local broker. A refused message of `batch` (`None`) is not stored but
/// acknowledged in its place.
async fn store(
    bridge: &Arc<Bridge>,
    batch: Vec<(Option<Message>, Receipt)>,
    drops: &mut DropReport,
) {
    let receipts: Vec<Receipt> = batch.iter().map(|(_, r)| *r).collect();
    let messages: Vec<Message> = batch.into_iter().filter_map(|(m, _)| m).collect();
    let plan = Arc::new(bridge.tail().plan(messages));
    let mut retry = Duration::from_millis(100);
    loop {
        let append = plan.clone();
        match bridge.with_outbox(move |o| o.append(&append.records)).await {
            Ok(dropped) => {
                report_drops(
                    bridge,
                    drops.add(dropped, tokio::time::Instant::now().into_std()),
                );
                break;
            }
            Err(e) => {
                warn!(cause = %e, retry_in = ?retry, "cannot append to the MQTT outbox");
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
    let delete_through = {
        let mut tail = bridge.tail();
        let stored = tail.stored(&plan);
        // Under the tail's lock: what was held first, then the batch.
        bridge.local.ack(&stored.receipts);
        bridge.local.ack(&receipts);
        stored.delete_through
    };
    if let Some(upto) = delete_through
        && let Err(e) = bridge.with_outbox(move |o| o.ack(upto)).await
    {
        debug!(cause = %e, "cannot delete acknowledged messages from the MQTT outbox yet");
    }
    bridge.appended.send_replace(());
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
