//! Per-source token buckets: how often one IP address may try to enroll,
//! fail to authenticate as admin or try to log in, and how often logins to
//! one user name may fail.
//!
//! This module owns the arithmetic and a bounded table of buckets. It never
//! sleeps and never reads the clock: callers pass `now`, so tests are exact.
//! A full bucket carries no information, so the table forgets full buckets
//! when it grows past its bound; a flood from many addresses costs at most
//! that bound in memory.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most sources (addresses, user names) tracked at once.
const MAX_SOURCES: usize = 100_000;

/// A token bucket's shape: `burst` attempts at once, then one more every
/// `refill`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: u32,
    pub refill: Duration,
}

impl RateLimit {
    /// Enrollment: a burst of 10, then one every 3 s per address.
    pub const ENROLL: RateLimit = RateLimit {
        burst: 10,
        refill: Duration::from_secs(3),
    };
    /// Failed admin authentication: 5, then one every 10 s per address.
    pub const ADMIN_FAILURES: RateLimit = RateLimit {
        burst: 5,
        refill: Duration::from_secs(10),
    };
    /// Login attempts: 10, then one every 6 s per address.
    pub const LOGIN: RateLimit = RateLimit {
        burst: 10,
        refill: Duration::from_secs(6),
    };
    /// Failed logins to one user name: 5, then one every 30 s, whatever the
    /// address.
    pub const LOGIN_FAILURES: RateLimit = RateLimit {
        burst: 5,
        refill: Duration::from_secs(30),
    };
}

/// Buckets by source: an address by default, or any other key (a user
/// name).
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    limit: RateLimit,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens in the bucket at `at`, as a fraction of whole tokens.
    tokens: f64,
    at: Instant,
}

impl<K: Eq + Hash> RateLimiter<K> {
    pub fn new(limit: RateLimit) -> RateLimiter<K> {
        RateLimiter {
            limit,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `source`. `Err(wait)` says how long until one is
    /// available: the `Retry-After` to send.
    pub fn take(&self, source: K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= MAX_SOURCES && !buckets.contains_key(&source) {
            self.forget_full(&mut buckets, now);
        }
        let burst = f64::from(self.limit.burst.max(1));
        let bucket = buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens = self.level(bucket, now);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        let missing = 1.0 - bucket.tokens;
        Err(self.limit.refill.mul_f64(missing))
    }

    /// Tests whether `source` would be limited, without taking a token.
    pub fn is_limited(&self, source: &K, now: Instant) -> bool {
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets
            .get(source)
            .is_some_and(|bucket| self.level(bucket, now) < 1.0)
    }

    fn level(&self, bucket: &Bucket, now: Instant) -> f64 {
        let burst = f64::from(self.limit.burst.max(1));
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        let rate = 1.0 / self.limit.refill.as_secs_f64().max(1e-9);
        (bucket.tokens + elapsed * rate).min(burst)
    }

    fn forget_full(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let burst = f64::from(self.limit.burst.max(1));
        buckets.retain(|_, bucket| self.level(bucket, now) < burst);
        if buckets.len() >= MAX_SOURCES {
            // Everyone is mid-burst: forgetting is safer than growing.
            buckets.clear();
        }
    }
}

/// Seconds for a `Retry-After` header: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_one_per_refill() {
        let limiter = RateLimiter::new(RateLimit {
            burst: 3,
            refill: Duration::from_secs(3),
        });
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take(ip, t0).is_ok());
        }
        let wait = limiter.take(ip, t0).unwrap_err();
        assert_eq!(retry_after_secs(wait), 3);
        assert!(limiter.take(other, t0).is_ok(), "addresses are separate");
        assert!(limiter.take(ip, t0 + Duration::from_secs(3)).is_ok());
        assert!(limiter.take(ip, t0 + Duration::from_secs(3)).is_err());
        assert!(limiter.is_limited(&ip, t0 + Duration::from_secs(3)));
    }

    #[test]
    fn any_key_works_such_as_a_user_name() {
        let limiter = RateLimiter::<String>::new(RateLimit {
            burst: 1,
            refill: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert!(limiter.take("alice".into(), t0).is_ok());
        assert!(limiter.is_limited(&"alice".to_string(), t0));
        assert!(!limiter.is_limited(&"bob".to_string(), t0));
    }
}
