//! The MQTT bridge between the device's local broker and the platform's,
//! over the tunnel's `mqtt` stream (`docs/mqtt.md`, `docs/protocol.md`
//! §19).
//!
//! This module owns the agent's connection to the local broker (the loop
//! of `tether_mqtt_client`) and what the bridge does with it ([`local`]), the durable
//! outbox of QoS 1 and 2 messages ([`outbox`]) and its write-behind tail
//! in memory ([`tail`]), and one `mqtt` stream per tunnel session
//! ([`stream`]). A QoS 1 or 2 message from the local broker is
//! acknowledged there only once it is in the outbox file or the platform's
//! broker has it (QoS 0: once handed to a live stream); it leaves the
//! outbox only once the platform acknowledged it. The namespace
//! (`tether_proto::mqtt::Namespace`) is applied before anything leaves the
//! device, and each refusal is audited.
//!
//! It never holds broker credentials of the platform (there are none: the
//! tunnel's certificate is the device's identity), never logs the local
//! broker's password, and never publishes on the local broker what the
//! platform did not route to this device.

pub mod local;
pub mod outbox;
pub mod stream;
pub mod tail;
pub mod topics;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use tether_proto::mqtt::{Figures, Message};
use tokio::sync::{Notify, mpsc, watch};

use crate::audit::{Audit, AuditEvent, AuditQueue};
use crate::config::MqttConfig;
use outbox::{Outbox, OutboxError};

/// QoS 0 messages waiting for the live stream, at most.
const LIVE_QUEUE: usize = 1024;

/// Why the bridge could not start.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    #[error(
        "[mqtt] broker '{0}' is not HOST:PORT or mqtt(s)://HOST[:PORT]; help: set it to the local broker's address, for example \"127.0.0.1:1883\""
    )]
    Broker(String),
    #[error(
        "[mqtt] TLS to the local broker cannot be set up: {0}; help: check ca_file (the CA that signed the broker's certificate), cert_file and key_file (PEM)"
    )]
    Tls(String),
}

/// The TLS settings for the local broker: `None` for a plain `mqtt://` or
/// `HOST:PORT` broker, else a rustls config (ring provider) trusting
/// `ca_file`, with `cert_file` and `key_file` for mutual TLS. Read once,
/// when the bridge (or `tetherd doctor`) starts.
pub fn broker_tls(config: &MqttConfig) -> Result<Option<Arc<rustls::ClientConfig>>, MqttError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    /// PEM files larger than this are not a CA, a certificate or a key.
    const MAX_PEM: u64 = 256 * 1024;
    if !config.endpoint().is_some_and(|b| b.tls) {
        return Ok(None);
    }
    let read = |path: &std::path::Path| {
        crate::files::read_bounded(path, MAX_PEM).map_err(|e| MqttError::Tls(e.to_string()))
    };
    let certs = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, MqttError> {
        CertificateDer::pem_slice_iter(&read(path)?)
            .collect::<Result<_, _>>()
            .map_err(|e| MqttError::Tls(format!("'{}': {e}", path.display())))
    };
    let ca = match &config.ca_file {
        Some(path) => certs(path)?,
        None => return Err(MqttError::Tls("no ca_file".into())),
    };
    let client = match (&config.cert_file, &config.key_file) {
        (Some(cert), Some(key)) => {
            let der = PrivateKeyDer::from_pem_slice(&read(key)?)
                .map_err(|e| MqttError::Tls(format!("'{}': {e}", key.display())))?;
            Some((certs(cert)?, der))
        }
        _ => None,
    };
    crate::tls::broker_config(&ca, client)
        .map(|c| Some(Arc::new(c)))
        .map_err(|e| MqttError::Tls(e.to_string()))
}

/// Counters shown in `tetherd status` and sent to the platform.
#[derive(Debug, Default)]
struct Counters {
    qos0_dropped: AtomicU64,
    refused: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
}

/// The bridge's shared state: the outbox, the local client, the counters.
pub struct Bridge {
    config: MqttConfig,
    device: String,
    outbox: Mutex<Outbox>,
    /// The outbox's figures after its last change (read without waiting
    /// for a write in progress).
    stats: Mutex<outbox::OutboxStats>,
    /// Messages held in memory on their way to the platform, and the
    /// numbering (`tail`).
    tail: Mutex<tail::Tail>,
    /// Bumped when there are new messages to send (held or stored).
    appended: watch::Sender<()>,
    /// Tells the intake to write what is held to disk now (the stream
    /// ended).
    flush_now: Notify,
    /// Tells the intake that held messages were released (room in the
    /// tail).
    room: Notify,
    /// The live stream's QoS 0 queue, while a stream is up.
    live: Mutex<Option<mpsc::Sender<Message>>>,
    counters: Counters,
    audit: Arc<AuditQueue>,
    local: local::Local,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge")
            .field("broker", &self.config.broker)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl Bridge {
    /// Opens the outbox in `state_dir` and starts the local broker's
    /// client for `device`.
    pub fn start(
        config: &MqttConfig,
        state_dir: &std::path::Path,
        device: &str,
        audit: Arc<AuditQueue>,
        now_ms: u64,
    ) -> Result<Arc<Bridge>, MqttError> {
        let outbox = Outbox::open(
            state_dir,
            config.outbox_max_bytes,
            config.outbox_max_messages,
            now_ms,
        )?;
        let (local, client) = local::Local::new(config, device)?;
        let stats = outbox.stats();
        let bridge = Arc::new(Bridge {
            config: config.clone(),
            device: device.to_owned(),
            stats: Mutex::new(stats),
            outbox: Mutex::new(outbox),
            tail: Mutex::new(tail::Tail::new(stats.next, stats.last)),
            appended: watch::channel(()).0,
            flush_now: Notify::new(),
            room: Notify::new(),
            live: Mutex::new(None),
            counters: Counters::default(),
            audit,
            local,
        });
        local::spawn(bridge.clone(), client);
        Ok(bridge)
    }

    fn outbox(&self) -> std::sync::MutexGuard<'_, Outbox> {
        // Nothing panics while holding it; a poisoned outbox is still the
        // file's last committed state.
        self.outbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, tail::Tail> {
        self.tail.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The platform has every message up to `seq`: those held in memory
    /// are acknowledged to the local broker.
    fn tail_acked(&self, seq: u64) {
        let mut tail = self.tail();
        let receipts = tail.acked(seq);
        // Under the tail's lock: acknowledgements leave in order.
        self.local.ack(&receipts);
        if !receipts.is_empty() {
            self.room.notify_one();
        }
    }

    /// Messages in the outbox file after its last change.
    fn stored_messages(&self) -> u64 {
        self.stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .messages
    }

    /// Runs `f` on the outbox on a blocking thread.
    async fn with_outbox<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&mut Outbox) -> Result<T, OutboxError> + Send + 'static,
    ) -> Result<T, OutboxError> {
        let bridge = self.clone();
        let work = move || {
            let mut outbox = bridge.outbox();
            let result = f(&mut outbox);
            *bridge.stats.lock().unwrap_or_else(PoisonError::into_inner) = outbox.stats();
            result
        };
        match tokio::task::spawn_blocking(work).await {
            Ok(result) => result,
            Err(e) => Err(OutboxError::Store {
                path: outbox::FILE.into(),
                why: e.to_string(),
            }),
        }
    }

    /// The bridge's figures now.
    pub fn figures(&self) -> Figures {
        let stats = *self.stats.lock().unwrap_or_else(PoisonError::into_inner);
        let (held, held_bytes) = self.tail().len();
        let c = &self.counters;
        Figures {
            outbox_messages: stats.messages + held as u64,
            outbox_bytes: stats.bytes + held_bytes as u64,
            outbox_dropped: stats.dropped,
            qos0_dropped: c.qos0_dropped.load(Ordering::Relaxed),
            refused: c.refused.load(Ordering::Relaxed),
            sent: c.sent.load(Ordering::Relaxed),
            received: c.received.load(Ordering::Relaxed),
        }
    }

    /// Records a refusal: counted, audited, logged without the payload.
    fn refused(&self, topic: &str, reason: &str, by: &str) {
        self.counters.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(topic, reason, by, "MQTT message refused");
        self.audit.record(AuditEvent::MqttRefused {
            topic: topic.to_owned(),
            reason: reason.to_owned(),
            by: by.to_owned(),
        });
    }

    /// Hands a QoS 0 message to the live stream, or counts it dropped.
    fn send_live(&self, message: Message) {
        let live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        let sent = live.as_ref().is_some_and(|tx| tx.try_send(message).is_ok());
        if !sent {
            self.counters.qos0_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}
