//! Token buckets: one type, used for the per-source limit on unauthenticated answers (so the
//! server cannot be used to reflect traffic at a spoofed victim) and for each allocation's
//! `max_bps` byte budget.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Instant;

pub(crate) use kyuu_stun::bucket::TokenBucket;

/// Per-source buckets for unauthenticated answers, in a bounded table.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    cap: usize,
    table: HashMap<IpAddr, TokenBucket>,
}

impl RateLimiter {
    pub fn new(rate: u32, burst: u32, cap: u32) -> Self {
        RateLimiter {
            rate: f64::from(rate),
            burst: f64::from(burst),
            cap: cap as usize,
            table: HashMap::new(),
        }
    }

    /// Takes a token for `ip`; false when it has none left (the request is dropped).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if !self.table.contains_key(&ip) && self.table.len() >= self.cap {
            self.expire(now);
            if self.table.len() >= self.cap {
                // Full of active sources: refuse newcomers rather than grow.
                return false;
            }
        }
        let (rate, burst) = (self.rate, self.burst);
        self.table
            .entry(ip)
            .or_insert(TokenBucket::full(burst, now))
            .take(1.0, rate, burst, now)
    }

    /// Forgets sources whose bucket has refilled.
    pub fn expire(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.table.retain(|_, b| b.level(rate, burst, now) < burst);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_refills_and_table_is_bounded() {
        let t0 = Instant::now();
        let mut r = RateLimiter::new(10, 5, 2);
        let a: IpAddr = [192, 0, 2, 1].into();
        for _ in 0..5 {
            assert!(r.allow(a, t0));
        }
        assert!(!r.allow(a, t0));
        assert!(r.allow(a, t0 + Duration::from_millis(100)));
        assert!(r.allow([192, 0, 2, 2].into(), t0));
        assert!(!r.allow([192, 0, 2, 3].into(), t0));
        assert!(r.allow([192, 0, 2, 3].into(), t0 + Duration::from_secs(5)));
        assert!(r.len() <= 2);
    }

    #[test]
    fn byte_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::full(1000.0, t0);
        assert!(b.take(1000.0, 1000.0, 1000.0, t0));
        assert!(!b.take(1.0, 1000.0, 1000.0, t0));
        assert!(b.take(100.0, 1000.0, 1000.0, t0 + Duration::from_millis(100)));
    }
}
