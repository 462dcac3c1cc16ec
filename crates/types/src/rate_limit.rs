//! Token buckets per caller: how often one caller (a node, a source
//! address) may do something that costs the receiver, such as making the
//! leader write to Raft or opening a connection through a node's ingress.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Most callers tracked at once; idle full buckets are dropped first, and
/// past this a new caller is refused until some go idle.
const MAX_KEYS: usize = 100_000;

/// A rate and a burst.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Sustained events per second.
    pub per_s: u32,
    /// Events allowed at once after a quiet period.
    pub burst: u32,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by caller.
#[derive(Debug)]
pub struct RateLimiter {
    rate: Rate,
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter giving every caller `rate`.
    pub fn new(rate: Rate) -> Self {
        Self {
            rate,
            buckets: Mutex::default(),
        }
    }

    /// The rate each caller gets.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Whether `key`'s bucket holds a token at `now` (none is taken).
    pub fn has_token(&self, key: &str, now: Instant) -> bool {
        let per_s = f64::from(self.rate.per_s.max(1));
        let burst = f64::from(self.rate.burst.max(1));
        let buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        buckets.get(key).is_none_or(|b| {
            let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
            (b.tokens + elapsed * per_s).min(burst) >= 1.0
        })
    }

    /// Takes one token from `key`'s bucket at `now`; `false` when it is empty.
    pub fn try_take(&self, key: &str, now: Instant) -> bool {
        self.with_bucket(key, now, |tokens| {
            if *tokens >= 1.0 {
                *tokens -= 1.0;
                true
            } else {
                false
            }
        })
    }

    /// Takes `amount` from `key`'s bucket at `now`, into debt if it holds
    /// less (at most one burst deep): for a cost known only once the work is
    /// done, such as the size of a request. The caller has no token again
    /// until the debt is paid off at the rate.
    pub fn charge(&self, key: &str, amount: u64, now: Instant) {
        let burst = f64::from(self.rate.burst.max(1));
        #[allow(clippy::cast_precision_loss)] // sizes far below 2^52
        let amount = amount as f64;
        self.with_bucket(key, now, |tokens| {
            *tokens = (*tokens - amount).max(-burst);
            true
        });
    }

    /// Runs `f` on `key`'s bucket refilled to `now`; `false` without running
    /// it when no more callers can be tracked.
    fn with_bucket(&self, key: &str, now: Instant, f: impl FnOnce(&mut f64) -> bool) -> bool {
        let per_s = f64::from(self.rate.per_s.max(1));
        let burst = f64::from(self.rate.burst.max(1));
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !buckets.contains_key(key) && buckets.len() >= MAX_KEYS {
            // Forget callers whose bucket has refilled: they lose nothing.
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * per_s < burst
            });
            if buckets.len() >= MAX_KEYS {
                return false;
            }
        }
        let b = buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * per_s).min(burst);
        b.last = now;
        f(&mut b.tokens)
    }
}

/// The key an address is limited under: the address itself, or its /64 for
/// IPv6 (one host usually holds a whole /64).
pub fn address_key(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_caller_gets_its_burst_then_its_rate() {
        let l = RateLimiter::new(Rate {
            per_s: 10,
            burst: 5,
        });
        let t0 = Instant::now();
        assert_eq!((0..20).filter(|_| l.try_take("node:a", t0)).count(), 5);
        // 100 ms at 10/s refills one token.
        assert!(l.try_take("node:a", t0 + Duration::from_millis(100)));
        assert!(!l.try_take("node:a", t0 + Duration::from_millis(100)));
        // Another caller is not affected.
        assert!(l.try_take("node:b", t0));
        assert!(!l.has_token("node:a", t0 + Duration::from_millis(100)));
        assert!(l.has_token("node:a", t0 + Duration::from_millis(200)));
        assert!(l.has_token("node:never-seen", t0));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| l.try_take("node:a", later)).count(), 5);
    }

    #[test]
    fn a_charge_past_empty_is_debt_paid_off_at_the_rate() {
        // Bytes: 1,000 per second, 4,000 at once.
        let l = RateLimiter::new(Rate {
            per_s: 1000,
            burst: 4000,
        });
        let t0 = Instant::now();
        l.charge("node:a", 10_000, t0);
        // Debt is at most one burst deep: 4 s to credit again, not 6.
        assert!(!l.has_token("node:a", t0 + Duration::from_millis(3990)));
        assert!(l.has_token("node:a", t0 + Duration::from_millis(4010)));
        assert!(l.has_token("node:b", t0));
        // A charge within the credit leaves some.
        l.charge("node:b", 3000, t0);
        assert!(l.has_token("node:b", t0));
        l.charge("node:b", 1000, t0);
        assert!(!l.has_token("node:b", t0));
    }

    #[test]
    fn ipv6_callers_are_limited_per_64() {
        let a: IpAddr = "2001:db8:1:2::1".parse().expect("ip");
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().expect("ip");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("ip");
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        assert_eq!(address_key(mapped), "10.0.0.1");
    }
}
