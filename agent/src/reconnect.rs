//! The reconnect loop: connect, run a session, and after a failure wait
//! before the next attempt.
//!
//! Delays grow exponentially (backon's `ExponentialBuilder` gives the cap
//! for each attempt, from `min_delay` doubling up to `max_delay`) and the
//! actual sleep is drawn uniformly from `[0, cap]` ("full jitter"), so a
//! fleet that lost the platform at once does not come back at once. backon's
//! own `with_jitter` adds up to one more delay on top of the cap (a sleep in
//! `[cap, 2 cap)`), which is not full jitter, so the draw is done here. The
//! backoff resets after a session that stayed up `stable_after`. Failures
//! only an operator can fix (revoked, untrusted platform, expired
//! certificate, clock) wait `slow_delay` instead, logged as errors that say
//! what to do. This module owns the timing and the classification of
//! failures; it never touches the tunnel's streams.

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::agent::Shared;
use crate::audit::{Audit, AuditEvent};
use crate::config::ReconnectConfig;
use crate::duration::Human;
use crate::net::Endpoint;
use crate::session::{self, SessionEnd};
use crate::status::TunnelState;
use crate::tunnel::{self, ConnectError, Retry};

/// Exponential caps with full jitter.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    caps: ExponentialBackoff,
    max: Duration,
    rng: ring::rand::SystemRandom,
}

impl Backoff {
    /// Caps from `min` doubling to `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let builder = ExponentialBuilder::new()
            .with_min_delay(min)
            .with_max_delay(max)
            .with_factor(2.0)
            .without_max_times();
        Backoff {
            caps: builder.build(),
            builder,
            max,
            rng: ring::rand::SystemRandom::new(),
        }
    }

    /// The cap for the next attempt.
    pub fn next_cap(&mut self) -> Duration {
        self.caps.next().unwrap_or(self.max).min(self.max)
    }

    /// The next delay: uniform in `[0, cap]`.
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.next_cap();
        full_jitter(cap, unit_random(&self.rng))
    }

    /// Starts again from the smallest cap.
    pub fn reset(&mut self) {
        self.caps = self.builder.build();
    }
}

/// Full jitter: `unit` (in `[0, 1]`) of the way from zero to `cap`.
pub fn full_jitter(cap: Duration, unit: f64) -> Duration {
    cap.mul_f64(unit.clamp(0.0, 1.0))
}

/// A uniform draw from `[0, 1)`; 0.5 if the system has no randomness.
fn unit_random(rng: &ring::rand::SystemRandom) -> f64 {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if rng.fill(&mut bytes).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// Runs until `shutdown` turns true.
pub(crate) async fn run(shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    let ReconnectConfig {
        min_delay,
        max_delay,
        stable_after,
        slow_delay,
    } = shared.config.reconnect.clone();
    let mut backoff = Backoff::new(min_delay, max_delay);
    loop {
        if *shutdown.borrow() {
            break;
        }
        shared.update(|s, now| {
            s.enter(TunnelState::Connecting, now);
            s.attempts += 1;
        });
        let attempt = tokio::select! {
            result = attempt(&shared) => result,
            _ = crate::agent::stopped(&mut shutdown) => break,
        };
        let delay = match attempt {
            Ok(connected) => {
                let started = tokio::time::Instant::now();
                shared.update(|s, now| {
                    s.enter(TunnelState::Connected, now);
                    s.connects += 1;
                });
                info!(device = %shared.device_id(), "tunnel up");
                let url = shared.current().identity.tunnel_url.clone();
                shared.audit.record(AuditEvent::TunnelUp { url });
                let end = session::run(&shared, connected, &mut shutdown).await;
                let reason = match &end {
                    SessionEnd::Shutdown => "the agent is stopping".to_owned(),
                    SessionEnd::Revoked(m) | SessionEnd::Lost(m) => m.clone(),
                };
                shared.audit.record(AuditEvent::TunnelDown { reason });
                let lasted = started.elapsed();
                if lasted >= stable_after {
                    backoff.reset();
                }
                match end {
                    SessionEnd::Shutdown => break,
                    SessionEnd::Revoked(message) => {
                        error!(cause = %message, retry_in = %Human(slow_delay), "tunnel closed");
                        shared.set_error(message);
                        slow_delay
                    }
                    SessionEnd::Lost(message) => {
                        let delay = backoff.next_delay();
                        warn!(cause = %message, lasted = %Human(round(lasted)), retry_in = %Human(round(delay)), "tunnel lost");
                        shared.set_error(message);
                        delay
                    }
                }
            }
            Err(err) => {
                let message = err.to_string();
                let delay = match err.retry() {
                    Retry::Slowly => {
                        error!(cause = %message, retry_in = %Human(slow_delay), "cannot connect to the platform");
                        slow_delay
                    }
                    Retry::Soon => {
                        let delay = backoff.next_delay();
                        warn!(cause = %message, retry_in = %Human(round(delay)), "cannot connect to the platform");
                        delay
                    }
                };
                shared.set_error(message);
                delay
            }
        };
        shared.update(|s, now| {
            s.enter(TunnelState::Backoff, now);
            s.next_attempt_at = Some(now + delay.as_secs());
        });
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = crate::agent::stopped(&mut shutdown) => break,
        }
    }
    shared.update(|s, now| s.enter(TunnelState::Stopped, now));
}

/// Durations in logs, to the millisecond.
fn round(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}

/// One attempt with the current credentials.
async fn attempt(shared: &Shared) -> Result<tunnel::Connected, ConnectError> {
    let (endpoint, tls, not_after) = {
        let current = shared.current();
        let endpoint = Endpoint::parse(&current.identity.tunnel_url, "wss")
            .map_err(|e| ConnectError::Setup(format!("the enrolled tunnel URL: {e}")))?;
        let tls = crate::tls::tunnel_config(&current.creds, shared.config.clock)
            .map_err(|e| ConnectError::Setup(e.to_string()))?;
        (endpoint, tls, current.creds.cert.not_after)
    };
    if shared.config.clock.now_unix() >= not_after {
        return Err(ConnectError::CertificateExpired { not_after });
    }
    tunnel::connect(
        &endpoint,
        Arc::new(tls),
        shared.proto_config(),
        shared.config.clock,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_double_from_min_to_max_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(4));
        let caps: Vec<_> = (0..6).map(|_| b.next_cap().as_millis()).collect();
        assert_eq!(caps, vec![500, 1000, 2000, 4000, 4000, 4000]);
        b.reset();
        assert_eq!(b.next_cap(), Duration::from_millis(500));
    }

    #[test]
    fn full_jitter_stays_within_zero_and_the_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let mut seen_low = false;
        let mut seen_high = false;
        for _ in 0..2000 {
            b.reset();
            let _ = b.next_cap();
            let _ = b.next_cap();
            // Third cap: 4 s.
            let d = b.next_delay();
            assert!(d <= Duration::from_secs(4), "{d:?}");
            seen_low |= d < Duration::from_millis(400);
            seen_high |= d > Duration::from_millis(3600);
        }
        assert!(seen_low && seen_high, "the draw does not cover [0, cap]");
        assert_eq!(full_jitter(Duration::from_secs(2), 0.0), Duration::ZERO);
        assert_eq!(
            full_jitter(Duration::from_secs(2), 1.0),
            Duration::from_secs(2)
        );
        assert_eq!(
            full_jitter(Duration::from_secs(2), 7.0),
            Duration::from_secs(2)
        );
    }
}
