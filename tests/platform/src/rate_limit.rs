//! Per-source token buckets: how often one IP address may try to enroll,
//! fail to authenticate as admin or try to log in, how often logins to one
//! user name may fail from one source prefix, and how much recent failures
//! slow down every login to one user name.
//!
//! This module owns the arithmetic and a bounded table of buckets. It never
//! sleeps and never reads the clock: callers pass `now`, so tests are exact.
//! A bucket that is not currently limiting can be rebuilt from nothing
//! without letting anyone through who would have been stopped, so when the
//! table reaches its bound it forgets full buckets first, then partly used
//! ones that still allow an attempt. It never forgets a bucket that is
//! limiting: spraying many keys cannot reset a target's limit. When the
//! table holds nothing but limiting buckets, a key it does not know is
//! refused ([`RateLimiter::take`] answers `Err`) and not added, until
//! buckets refill; memory stays bounded by the table's size.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Most sources (addresses, user names) tracked at once by default.
pub const DEFAULT_MAX_SOURCES: usize = 100_000;

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
    /// Failed logins to one user name from one source prefix (/32 for
    /// IPv4, /64 for IPv6): 5, then one every 30 s.
    pub const LOGIN_FAILURES: RateLimit = RateLimit {
        burst: 5,
        refill: Duration::from_secs(30),
    };
    /// Recent failed logins to one user name from anywhere, for the
    /// per-user slow-down: up to 20 remembered, one forgiven every 10 s.
    pub const LOGIN_SLOWDOWN: RateLimit = RateLimit {
        burst: 20,
        refill: Duration::from_secs(10),
    };
}

/// The key of a failed-login bucket: a user name and the source's prefix.
pub type UserSource = (String, IpAddr);

/// The prefix failures from `ip` are counted under: the address itself for
/// IPv4, its /64 for IPv6 (one host often holds a whole /64).
pub fn source_prefix(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Buckets by source: an address by default, or any other key (a user
/// name).
#[derive(Debug)]
pub struct RateLimiter<K = IpAddr> {
    limit: RateLimit,
    max_sources: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens in the bucket at `at`, as a fraction of whole tokens.
    tokens: f64,
    at: Instant,
}

impl<K: Eq + Hash> RateLimiter<K> {
    /// A limiter tracking at most [`DEFAULT_MAX_SOURCES`] keys.
    pub fn new(limit: RateLimit) -> RateLimiter<K> {
        RateLimiter::with_max_sources(limit, DEFAULT_MAX_SOURCES)
    }

    /// A limiter tracking at most `max_sources` keys (at least 1).
    pub fn with_max_sources(limit: RateLimit, max_sources: usize) -> RateLimiter<K> {
        RateLimiter {
            limit,
            max_sources: max_sources.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `source`. `Err(wait)` says how long until one is
    /// available: the `Retry-After` to send. A key the table does not know
    /// while the table is full of limiting buckets is refused the same way
    /// (and not added).
    pub fn take(&self, source: K, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.len() >= self.max_sources && !buckets.contains_key(&source) {
            self.forget_unlimited(&mut buckets, now);
            if buckets.len() >= self.max_sources {
                return Err(self.limit.refill);
            }
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

    /// `Err(wait)` if `source` is limited now: the `Retry-After` to send.
    /// Takes no token.
    pub fn check(&self, source: &K, now: Instant) -> Result<(), Duration> {
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        match buckets.get(source) {
            Some(bucket) => {
                let level = self.level(bucket, now);
                if level >= 1.0 {
                    Ok(())
                } else {
                    Err(self.limit.refill.mul_f64(1.0 - level))
                }
            }
            None => Ok(()),
        }
    }

    /// Tokens `source` has used and not yet got back (0 for an unknown
    /// key): the number of recent attempts, as a fraction.
    pub fn used(&self, source: &K, now: Instant) -> f64 {
        let burst = f64::from(self.limit.burst.max(1));
        let buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        buckets
            .get(source)
            .map_or(0.0, |bucket| burst - self.level(bucket, now))
    }

    /// Keys tracked now.
    pub fn len(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// True if no key is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn level(&self, bucket: &Bucket, now: Instant) -> f64 {
        let burst = f64::from(self.limit.burst.max(1));
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        let rate = 1.0 / self.limit.refill.as_secs_f64().max(1e-9);
        (bucket.tokens + elapsed * rate).min(burst)
    }

    /// Makes room: forgets full buckets, then, if that was not enough,
    /// every bucket that still allows an attempt (forgetting one refills
    /// it, which lets through nobody it would have stopped right now).
    /// Never forgets a limiting bucket.
    fn forget_unlimited(&self, buckets: &mut HashMap<K, Bucket>, now: Instant) {
        let burst = f64::from(self.limit.burst.max(1));
        buckets.retain(|_, bucket| self.level(bucket, now) < burst);
        if buckets.len() >= self.max_sources {
            buckets.retain(|_, bucket| self.level(bucket, now) < 1.0);
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
    fn spraying_many_keys_never_resets_a_limiting_bucket() {
        let limit = RateLimit {
            burst: 5,
            refill: Duration::from_secs(30),
        };
        let limiter = RateLimiter::<String>::new(limit);
        let t0 = Instant::now();
        for _ in 0..5 {
            assert!(limiter.take("target".into(), t0).is_ok());
        }
        assert!(limiter.is_limited(&"target".to_string(), t0));
        for i in 0..=DEFAULT_MAX_SOURCES {
            let _ = limiter.take(format!("spray{i}"), t0);
        }
        assert!(
            limiter.is_limited(&"target".to_string(), t0),
            "the target's bucket survived the spray"
        );
        assert!(limiter.len() <= DEFAULT_MAX_SOURCES);
    }

    #[test]
    fn a_table_full_of_limiting_buckets_refuses_new_keys() {
        let limiter = RateLimiter::<u32>::with_max_sources(
            RateLimit {
                burst: 1,
                refill: Duration::from_secs(10),
            },
            3,
        );
        let t0 = Instant::now();
        for key in 0..3 {
            assert!(limiter.take(key, t0).is_ok());
        }
        assert!(limiter.take(7, t0).is_err(), "no room: refused, not added");
        assert_eq!(limiter.len(), 3);
        for key in 0..3 {
            assert!(limiter.is_limited(&key, t0), "{key} still limited");
        }
        let later = t0 + Duration::from_secs(10);
        assert!(limiter.take(7, later).is_ok(), "room once buckets refill");
    }

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_prefix(a), source_prefix(b));
        assert_ne!(source_prefix(a), source_prefix(c));
        let v4: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(source_prefix(v4), v4);
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert_eq!(source_prefix(mapped), v4);
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
