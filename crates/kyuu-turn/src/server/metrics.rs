//! Counters. The relay path only bumps plain integers (per allocation, or per shard for drops);
//! they reach the `metrics` registry once per tick, so a packet costs no registry lookup.

use std::collections::HashMap;

use crate::auth::AuthFailure;
use crate::server::allocation::Allocation;
use crate::types::Transport;

const TRANSPORTS: [Transport; 4] = [
    Transport::Udp,
    Transport::Tcp,
    Transport::Tls,
    Transport::Dtls,
];

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Udp => 0,
        Transport::Tcp => 1,
        Transport::Tls => 2,
        Transport::Dtls => 3,
    }
}

/// Relayed traffic of one allocation.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Stats {
    pub to_peer_pkts: u64,
    pub to_peer_bytes: u64,
    pub to_client_pkts: u64,
    pub to_client_bytes: u64,
}

/// Why input was dropped without an answer.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Dropped {
    Malformed,
    NoAllocation,
    NoPermission,
    RateLimited,
    Bandwidth,
    ForbiddenPeer,
    SessionLimit,
}

const DROPS: [(Dropped, &str); 7] = [
    (Dropped::Malformed, "malformed"),
    (Dropped::NoAllocation, "no_allocation"),
    (Dropped::NoPermission, "no_permission"),
    (Dropped::RateLimited, "rate_limited"),
    (Dropped::Bandwidth, "bandwidth"),
    (Dropped::ForbiddenPeer, "forbidden_peer"),
    (Dropped::SessionLimit, "session_limit"),
];

/// Per-shard counters not tied to one allocation.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    drops: [u64; DROPS.len()],
    flushed: [u64; DROPS.len()],
    auth_failures: HashMap<&'static str, u64>,
    /// Kernel fast path (packets, bytes) to peers and to clients, since the last flush.
    fast_path: [(u64, u64); 2],
    /// ICMP errors passed on to clients (RFC 8656 §11.5).
    pub icmp_forwarded: u64,
    icmp_flushed: u64,
    /// Binding requests answered or refused, per transport (`Transport as usize`), since the
    /// last flush: a Binding costs no registry lookup.
    bindings: [u64; 4],
    /// Of those, answered by the kernel fast path, since the last flush.
    fast_path_bindings: u64,
}

impl Counters {
    pub fn drop(&mut self, why: Dropped) {
        self.drops[why as usize] += 1;
    }

    pub fn fast_path(&mut self, to_peer: (u64, u64), to_client: (u64, u64)) {
        for (acc, add) in self.fast_path.iter_mut().zip([to_peer, to_client]) {
            acc.0 += add.0;
            acc.1 += add.1;
        }
    }

    /// `answered` Binding requests over UDP the kernel answered and `rate_limited` it dropped.
    pub fn fast_path_bindings(&mut self, answered: u64, rate_limited: u64) {
        if let Some(n) = self.bindings.get_mut(transport_index(Transport::Udp)) {
            *n += answered;
        }
        self.fast_path_bindings += answered;
        self.drops[Dropped::RateLimited as usize] += rate_limited;
    }

    pub fn binding(&mut self, t: Transport) {
        if let Some(n) = self.bindings.get_mut(transport_index(t)) {
            *n += 1;
        }
    }

    pub fn auth_failure(&mut self, f: AuthFailure) {
        *self.auth_failures.entry(f.label()).or_insert(0) += 1;
    }

    /// Hands what changed since the last flush to the registry.
    pub fn flush(&mut self) {
        for ((_, name), (cur, old)) in DROPS
            .iter()
            .zip(self.drops.iter().zip(self.flushed.iter_mut()))
        {
            if *cur > *old {
                metrics::counter!("kyuu_turn_dropped_total", "reason" => *name)
                    .increment(cur - *old);
                *old = *cur;
            }
        }
        for ((pkts, bytes), dir) in self.fast_path.iter_mut().zip(["to_peer", "to_client"]) {
            if *pkts > 0 {
                metrics::counter!("kyuu_turn_fast_path_packets_total", "direction" => dir)
                    .increment(*pkts);
                metrics::counter!("kyuu_turn_fast_path_bytes_total", "direction" => dir)
                    .increment(*bytes);
            }
            (*pkts, *bytes) = (0, 0);
        }
        if self.icmp_forwarded > self.icmp_flushed {
            metrics::counter!("kyuu_turn_icmp_forwarded_total")
                .increment(self.icmp_forwarded - self.icmp_flushed);
            self.icmp_flushed = self.icmp_forwarded;
        }
        for (t, n) in TRANSPORTS.iter().zip(self.bindings.iter_mut()) {
            if *n > 0 {
                metrics::counter!("kyuu_stun_binding_requests_total", "transport" => t.label())
                    .increment(*n);
                *n = 0;
            }
        }
        if self.fast_path_bindings > 0 {
            metrics::counter!("kyuu_turn_fast_path_bindings_total")
                .increment(self.fast_path_bindings);
            self.fast_path_bindings = 0;
        }
        for (reason, n) in self.auth_failures.drain() {
            metrics::counter!("kyuu_turn_auth_failures_total", "reason" => reason).increment(n);
        }
    }
}

/// Per-shard gauges, set once per tick.
pub(crate) fn gauges(shard: u16, allocations: usize, permissions: usize, channels: usize) {
    let shard = shard.to_string();
    metrics::gauge!("kyuu_turn_allocations", "shard" => shard.clone()).set(allocations as f64);
    metrics::gauge!("kyuu_turn_permissions", "shard" => shard.clone()).set(permissions as f64);
    metrics::gauge!("kyuu_turn_channels", "shard" => shard).set(channels as f64);
}

/// Relayed traffic of many allocations, summed per transport and direction so the registry is
/// looked up once per tick, not four times per allocation (a label lookup hashes the key; with
/// 10,000 allocations that was 40,000 lookups a second per server).
#[derive(Debug, Default)]
pub(crate) struct Relayed {
    /// Per transport (`Transport as usize`): to-peer packets, bytes; to-client packets, bytes.
    sums: [[u64; 4]; TRANSPORTS.len()],
}

impl Relayed {
    /// Adds an allocation's traffic since its last flush and marks it flushed.
    pub fn add(&mut self, a: &mut Allocation) {
        let (s, f) = (a.stats, &mut a.flushed);
        if let Some(sum) = self.sums.get_mut(a.client.transport as usize) {
            sum[0] += s.to_peer_pkts.saturating_sub(f.to_peer_pkts);
            sum[1] += s.to_peer_bytes.saturating_sub(f.to_peer_bytes);
            sum[2] += s.to_client_pkts.saturating_sub(f.to_client_pkts);
            sum[3] += s.to_client_bytes.saturating_sub(f.to_client_bytes);
        }
        *f = s;
    }

    /// Hands the sums to the registry.
    pub fn flush(self) {
        for (t, sum) in TRANSPORTS.iter().zip(self.sums) {
            let t = t.label();
            if sum[0] > 0 {
                metrics::counter!("kyuu_turn_relayed_packets_total", "direction" => "to_peer", "transport" => t)
                    .increment(sum[0]);
                metrics::counter!("kyuu_turn_relayed_bytes_total", "direction" => "to_peer", "transport" => t)
                    .increment(sum[1]);
            }
            if sum[2] > 0 {
                metrics::counter!("kyuu_turn_relayed_packets_total", "direction" => "to_client", "transport" => t)
                    .increment(sum[2]);
                metrics::counter!("kyuu_turn_relayed_bytes_total", "direction" => "to_client", "transport" => t)
                    .increment(sum[3]);
            }
        }
    }
}

/// Hands one allocation's relayed traffic since the last flush to the registry.
pub(crate) fn flush_stats(a: &mut Allocation) {
    let mut r = Relayed::default();
    r.add(a);
    r.flush();
}
