//! Per-source token buckets for unauthenticated answers, in a bounded table, so the server cannot
//! be used to reflect traffic at a spoofed victim.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: f64,
    burst: f64,
    cap: usize,
    table: HashMap<IpAddr, (f64, Instant)>,
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
        let entry = self.table.entry(ip).or_insert((burst, now));
        let elapsed = now.saturating_duration_since(entry.1).as_secs_f64();
        entry.0 = (entry.0 + elapsed * rate).min(burst);
        entry.1 = now;
        if entry.0 >= 1.0 {
            entry.0 -= 1.0;
            true
        } else {
            false
        }
    }

    /// Forgets sources whose bucket has refilled.
    pub fn expire(&mut self, now: Instant) {
        let full_after = Duration::from_secs_f64((self.burst / self.rate.max(1e-9)).min(3600.0));
        self.table
            .retain(|_, (_, last)| now.saturating_duration_since(*last) < full_after);
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.table.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
