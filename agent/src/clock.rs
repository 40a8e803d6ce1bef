//! The agent's wall clock: the system clock, optionally shifted by a fixed
//! offset so that tests can play a device whose clock is far off.
//!
//! Everything that compares wall-clock times (certificate validity in TLS,
//! the clock-skew check at enrollment, renewal timing) reads this clock and
//! nothing else. Monotonic timing (timeouts, backoff) uses tokio's clock.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::UnixTime;
use rustls::time_provider::TimeProvider;

/// A wall clock. `Clock::system()` in production.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Clock {
    /// Seconds added to the system clock (negative: the device is behind).
    offset_secs: i64,
}

impl Clock {
    /// The system clock as it is.
    pub fn system() -> Clock {
        Clock { offset_secs: 0 }
    }

    /// The system clock shifted by `offset_secs` (negative: behind).
    pub fn with_offset(offset_secs: i64) -> Clock {
        Clock { offset_secs }
    }

    /// The current time, seconds since the Unix epoch (0 before the epoch).
    pub fn now_unix(&self) -> u64 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        real.saturating_add_signed(self.offset_secs)
    }

    /// The current time as a `SystemTime`.
    pub fn now(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.now_unix())
    }

    /// This clock as rustls's time source, for certificate validity checks.
    pub fn time_provider(self) -> Arc<dyn TimeProvider> {
        Arc::new(self)
    }
}

impl TimeProvider for Clock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(UnixTime::since_unix_epoch(Duration::from_secs(
            self.now_unix(),
        )))
    }
}

/// Formats seconds since the Unix epoch as RFC 3339 UTC, or the number if it
/// is out of range.
pub fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_clock_is_that_far_from_the_system_clock() {
        let real = Clock::system().now_unix();
        let ahead = Clock::with_offset(86_400).now_unix();
        assert!((ahead - real).abs_diff(86_400) <= 1);
        assert_eq!(Clock::with_offset(-(real as i64) - 10).now_unix(), 0);
    }

    #[test]
    fn times_are_shown_in_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
