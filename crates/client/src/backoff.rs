//! Exponential backoff with jitter between retries.

use std::time::Duration;

/// Backoff settings: the pause before retry `n` (from 0) is drawn from
/// `[d/2, d]` with `d = min(base * 2^n, cap)`, so concurrent clients spread
/// out while the pause still grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackoffPolicy {
    /// The first pause's upper bound. Default 100 ms.
    pub base: Duration,
    /// No pause is longer than this. Default 2 s.
    pub cap: Duration,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(2),
        }
    }
}

impl BackoffPolicy {
    /// The upper bound of pause `attempt` (from 0): `min(base * 2^attempt, cap)`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// Pause `attempt` for a uniform draw `unit` in `[0, 1]`: between half
    /// the ceiling and the ceiling.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        half + (ceiling - half).mul_f64(unit.clamp(0.0, 1.0))
    }
}

/// The pauses of one retry sequence.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: BackoffPolicy,
    attempt: u32,
}

impl Backoff {
    /// A new sequence under `policy`.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self { policy, attempt: 0 }
    }

    /// The next pause (randomly jittered).
    pub fn next_delay(&mut self) -> Duration {
        let d = self
            .policy
            .delay(self.attempt, rand::Rng::random::<f64>(&mut rand::rng()));
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Sleeps the next pause.
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn ceilings_double_from_the_base_up_to_the_cap() {
        let p = BackoffPolicy {
            base: 100 * MS,
            cap: 1000 * MS,
        };
        let ceilings: Vec<_> = (0..6).map(|n| p.ceiling(n)).collect();
        assert_eq!(
            ceilings,
            vec![100 * MS, 200 * MS, 400 * MS, 800 * MS, 1000 * MS, 1000 * MS]
        );
        assert_eq!(p.ceiling(u32::MAX), 1000 * MS);
    }

    #[test]
    fn jitter_stays_between_half_the_ceiling_and_the_ceiling() {
        let p = BackoffPolicy::default();
        for n in 0..10 {
            let c = p.ceiling(n);
            assert_eq!(p.delay(n, 0.0), c / 2);
            assert_eq!(p.delay(n, 1.0), c);
            assert_eq!(p.delay(n, -3.0), c / 2);
            assert_eq!(p.delay(n, 7.0), c);
        }
    }

    #[test]
    fn drawn_pauses_stay_in_range_and_vary() {
        let p = BackoffPolicy {
            base: 100 * MS,
            cap: 400 * MS,
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut b = Backoff::new(p);
            for n in 0..5 {
                let d = b.next_delay();
                let c = p.ceiling(n);
                assert!(
                    d >= c / 2 && d <= c,
                    "pause {n}: {d:?} outside [{:?}, {c:?}]",
                    c / 2
                );
                seen.insert(d);
            }
        }
        assert!(seen.len() > 10, "jitter draws vary: {seen:?}");
    }
}
