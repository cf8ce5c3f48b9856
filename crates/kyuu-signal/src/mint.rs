//! Rate limit on minting TURN credentials without an access token (sans-IO).
//!
//! Without `signal.auth_secret`, anyone who reaches the HTTP port can ask for TURN credentials
//! (`GET /v1/ice-servers`, the signaling welcome). Each source may mint `mint_rate_per_min`
//! credentials a minute after a burst of `mint_burst`; sources are IPv4 addresses and IPv6
//! /64 prefixes (one host usually owns a whole /64, so per-address limits would be no limit).
//! The table is bounded: full buckets carry no information and are forgotten first; when every
//! tracked source is still limited, new sources are refused until one refills (fail closed,
//! so a flood of addresses cannot reset the limit).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Instant;

use kyuu_stun::bucket::TokenBucket;

/// Token buckets per source prefix.
#[derive(Debug)]
pub struct MintLimiter {
    per_sec: f64,
    burst: f64,
    max_entries: usize,
    buckets: HashMap<IpAddr, TokenBucket>,
}

/// The source a mint counts against: the IPv4 address, or the IPv6 /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl MintLimiter {
    /// `per_min` credentials a minute after a burst of `burst`; `per_min == 0` disables the limit.
    pub fn new(per_min: u32, burst: u32, max_entries: usize) -> Self {
        MintLimiter {
            per_sec: f64::from(per_min) / 60.0,
            burst: f64::from(burst.max(1)),
            max_entries: max_entries.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Whether `ip` may mint one credential now (and takes it).
    pub fn allow(&mut self, ip: IpAddr, now: Instant) -> bool {
        if self.per_sec <= 0.0 {
            return true;
        }
        let key = source_key(ip);
        if !self.buckets.contains_key(&key) && self.buckets.len() >= self.max_entries {
            let (per_sec, burst) = (self.per_sec, self.burst);
            self.buckets
                .retain(|_, b| b.level(per_sec, burst, now) < burst);
            if self.buckets.len() >= self.max_entries {
                return false;
            }
        }
        let (per_sec, burst) = (self.per_sec, self.burst);
        self.buckets
            .entry(key)
            .or_insert(TokenBucket::full(burst, now))
            .take(1.0, per_sec, burst, now)
    }

    /// Sources tracked (bounded by `max_entries`).
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_rate_per_ip_and_per_64() {
        let t = Instant::now();
        let mut l = MintLimiter::new(6, 3, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!((0..3).all(|_| l.allow(a, t)));
        assert!(!l.allow(a, t));
        assert!(l.allow(b, t), "another address has its own bucket");
        // 6 a minute: one more after 10 s.
        assert!(l.allow(a, t + Duration::from_secs(10)));
        assert!(!l.allow(a, t + Duration::from_secs(10)));

        // Every address of one /64 shares a bucket; the next /64 does not.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(l.allow(v6("2001:db8:1:2::1"), t));
        assert!(l.allow(v6("2001:db8:1:2::2"), t));
        assert!(l.allow(v6("2001:db8:1:2:ffff::3"), t));
        assert!(!l.allow(v6("2001:db8:1:2:abcd::9"), t));
        assert!(l.allow(v6("2001:db8:1:3::1"), t));
        // IPv4-mapped IPv6 is the IPv4 address.
        assert!(!l.allow(v6("::ffff:192.0.2.1"), t));
    }

    #[test]
    fn table_is_bounded_and_fails_closed() {
        let t = Instant::now();
        let mut l = MintLimiter::new(60, 1, 2);
        let ip = |i: u8| IpAddr::from([198, 51, 100, i]);
        assert!(l.allow(ip(1), t));
        assert!(l.allow(ip(2), t));
        // Both tracked sources are still limited: a third is refused rather than evicting them.
        assert!(!l.allow(ip(3), t));
        assert_eq!(l.tracked(), 2);
        // Once they refilled, they are forgotten and make room.
        assert!(l.allow(ip(3), t + Duration::from_secs(2)));
        assert!(l.tracked() <= 2);
        // Zero disables the limit.
        let mut off = MintLimiter::new(0, 1, 1);
        assert!((0..100).all(|i| off.allow(ip(i), t)));
    }
}
