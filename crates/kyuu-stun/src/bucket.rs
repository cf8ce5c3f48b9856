//! The one token bucket of kyuu, in plain numbers with time passed in (sans-IO). Used by the
//! TURN core (per-source limit on unauthenticated answers, each allocation's `max_bps` byte
//! budget) and by signaling (per-connection message rate, credential minting per source).

use std::time::Instant;

/// A bucket refilled at `rate` tokens per second up to `burst`. No heap: the relay path takes
/// from one per packet.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn full(burst: f64, now: Instant) -> Self {
        TokenBucket {
            tokens: burst,
            last: now,
        }
    }

    /// The tokens there would be at `now` (refilled, not taken).
    pub fn level(&self, rate: f64, burst: f64, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        (self.tokens + elapsed * rate).min(burst)
    }

    /// Refills for the time since the last call, then takes `amount` whether or not that many
    /// are there (for use that already happened, e.g. bytes the kernel relayed): the level may go
    /// below zero, and [`TokenBucket::take`] refuses until it is repaid.
    pub fn charge(&mut self, amount: f64, rate: f64, burst: f64, now: Instant) {
        self.tokens = self.level(rate, burst, now) - amount;
        self.last = now;
    }

    /// Refills for the time since the last call, then takes `amount` if that many are there.
    pub fn take(&mut self, amount: f64, rate: f64, burst: f64, now: Instant) -> bool {
        self.tokens = self.level(rate, burst, now);
        self.last = now;
        if self.tokens >= amount {
            self.tokens -= amount;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_refuses_past_its_burst_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(2.0, t0);
        assert!(b.take(1.0, 1.0, 2.0, t0));
        assert!(b.take(1.0, 1.0, 2.0, t0));
        assert!(!b.take(1.0, 1.0, 2.0, t0));
        let t1 = t0 + Duration::from_millis(1100);
        assert!(b.take(1.0, 1.0, 2.0, t1));
        assert!(!b.take(1.0, 1.0, 2.0, t1));
        // Never above the burst, however long it waited.
        let t2 = t1 + Duration::from_secs(3600);
        assert!((b.level(1.0, 2.0, t2) - 2.0).abs() < f64::EPSILON);
    }
}
