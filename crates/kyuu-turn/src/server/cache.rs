//! Answers to authenticated requests, kept for 40 s so a retransmitted request gets the same
//! answer instead of being executed twice (RFC 8489 §6.3.1: "the server SHOULD ... cache
//! responses"; 40 s is Rc × RTO for the default values, §6.2.1).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use kyuu_stun::TransactionId;

use crate::types::ClientSocket;

const CACHE_LIFETIME: Duration = Duration::from_secs(40);
const CACHE_MAX: usize = 4096;

type CacheKey = (ClientSocket, TransactionId);

/// Bounded, oldest evicted first.
#[derive(Debug, Default)]
pub(crate) struct ResponseCache {
    map: HashMap<CacheKey, (Vec<u8>, Instant)>,
    order: VecDeque<CacheKey>,
}

impl ResponseCache {
    pub fn get(&self, client: ClientSocket, tid: TransactionId) -> Option<&[u8]> {
        self.map.get(&(client, tid)).map(|(d, _)| d.as_slice())
    }

    pub fn put(&mut self, client: ClientSocket, tid: TransactionId, data: Vec<u8>, at: Instant) {
        if self.map.len() >= CACHE_MAX {
            if let Some(k) = self.order.pop_front() {
                self.map.remove(&k);
            }
        }
        if self.map.insert((client, tid), (data, at)).is_none() {
            self.order.push_back((client, tid));
        }
    }

    pub fn expire(&mut self, now: Instant) {
        while let Some(k) = self.order.front().copied() {
            match self.map.get(&k) {
                Some((_, t)) if now.saturating_duration_since(*t) < CACHE_LIFETIME => break,
                _ => {
                    self.map.remove(&k);
                    self.order.pop_front();
                }
            }
        }
    }
}
