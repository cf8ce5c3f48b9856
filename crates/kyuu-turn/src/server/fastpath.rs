//! The kernel fast path's view from the core: which channels the kernel may relay
//! ([`Output::FastPathInstall`] / [`Output::FastPathRemove`]), and the traffic it relayed, counted
//! back into the allocation (metrics, per-user accounting, the `max_bps` budget).
//!
//! The core stays the authority. An entry goes in when a channel is bound (its peer then has a
//! permission) and is checked again every tick: it comes out when the binding or the permission
//! expires, the peer becomes forbidden (reconfigure), the allocation ends, or a direction's
//! `max_bps` budget is spent (the kernel's bytes are charged to the budget once per tick, so the
//! budget may go into debt; the direction stays in userspace until it is repaid, which keeps the
//! average under the cap). Allocations with a RAWR session byte limit stay in userspace (that
//! limit is enforced per packet). The entry also carries its expiry, so the kernel stops on time even
//! between ticks.

use std::time::Instant;

use crate::server::allocation::{Allocation, Direction};
use crate::server::Server;
use crate::types::{AllocId, Family, FastPathChannel, FastPathId, Output, RelayProto, Transport};

impl Server {
    /// From now on the core emits [`Output::FastPathInstall`] and [`Output::FastPathRemove`] (the
    /// shell attached the kernel program).
    pub fn enable_fast_path(&mut self) {
        self.fast_path = true;
    }

    /// Binding requests the kernel answered and dropped over the per-source limit since the last
    /// report: counted like the ones userspace answers (`kyuu_stun_binding_requests_total{transport="udp"}`,
    /// also `kyuu_turn_fast_path_bindings_total`) and drops (`reason="rate_limited"`).
    /// Starts the tick if none is due (the kernel may answer everything, so no packet reaches
    /// the core to start it), so the counts reach the registry within a tick.
    pub fn fast_path_bindings(&mut self, now: Instant, answered: u64, rate_limited: u64) {
        self.counters.fast_path_bindings(answered, rate_limited);
        if self.next_tick.is_none() {
            self.next_tick = Some(now + super::SUB_TICK);
        }
    }

    /// Kernel-relayed traffic of one channel since the last report: (packets, payload bytes) to
    /// the peer and to the client. Counted like userspace-relayed traffic and charged to the
    /// allocation's `max_bps` budget.
    pub fn fast_path_traffic(
        &mut self,
        now: Instant,
        id: FastPathId,
        to_peer: (u64, u64),
        to_client: (u64, u64),
    ) {
        let max_bps = self.cfg.max_bps;
        self.counters.fast_path(to_peer, to_client);
        let Some(a) = self.allocs.get_mut(id.alloc) else {
            return;
        };
        a.stats.to_peer_pkts += to_peer.0;
        a.stats.to_peer_bytes += to_peer.1;
        a.stats.to_client_pkts += to_client.0;
        a.stats.to_client_bytes += to_client.1;
        a.charge_bytes(Direction::ToPeer, to_peer.1, max_bps, now);
        a.charge_bytes(Direction::ToClient, to_client.1, max_bps, now);
    }

    /// What the kernel may relay for allocation `a` now.
    fn fast_path_wanted(&self, a: &Allocation, now: Instant) -> Vec<FastPathChannel> {
        let mut out = Vec::new();
        if !self.fast_path || a.proto != RelayProto::Udp || a.client.transport != Transport::Udp {
            return out;
        }
        // A RAWR session byte limit is enforced per packet; the kernel could only be stopped a
        // tick late, so those allocations stay in userspace.
        if a.limit.is_some_and(|(max_bytes, _)| max_bytes > 0) {
            return out;
        }
        let max_bps = self.cfg.max_bps;
        let to_peer = a.has_budget(Direction::ToPeer, max_bps, now);
        let to_client = a.has_budget(Direction::ToClient, max_bps, now);
        if !to_peer && !to_client {
            return out;
        }
        for c in &a.channels {
            if c.expires <= now || !self.policy.permits(c.peer.ip()) {
                continue;
            }
            let Some(perm) = a.permission_expiry(c.peer.ip(), now) else {
                continue;
            };
            let Some(relay) = a.relayed(Family::of(&c.peer)) else {
                continue;
            };
            out.push(FastPathChannel {
                id: FastPathId {
                    alloc: a.id,
                    channel: c.number.get(),
                },
                client: a.client,
                relay,
                peer: c.peer,
                expires: c.expires.min(perm),
                to_peer,
                to_client,
            });
        }
        out
    }

    /// Brings the installed entries of allocation `id` (all allocations when `None`) in line with
    /// what the kernel may relay now.
    pub(super) fn fast_path_sync(&mut self, now: Instant, id: Option<AllocId>) {
        if !self.fast_path {
            return;
        }
        let mut wanted = Vec::new();
        match id {
            Some(id) => {
                if let Some(a) = self.allocs.get(id) {
                    wanted = self.fast_path_wanted(a, now);
                }
            }
            None => {
                for a in self.allocs.iter() {
                    wanted.extend(self.fast_path_wanted(a, now));
                }
            }
        }
        let stale: Vec<FastPathId> = self
            .fp_installed
            .keys()
            .filter(|k| id.is_none_or(|id| k.alloc == id))
            .filter(|k| !wanted.iter().any(|w| w.id == **k))
            .copied()
            .collect();
        for k in stale {
            self.fp_installed.remove(&k);
            self.out.push_back(Output::FastPathRemove(k));
        }
        for w in wanted {
            if self.fp_installed.get(&w.id) != Some(&w) {
                self.fp_installed.insert(w.id, w);
                self.out.push_back(Output::FastPathInstall(w));
            }
        }
    }

    /// Entries installed now (for tests and the shell's bookkeeping).
    pub fn fast_path_entries(&self) -> usize {
        self.fp_installed.len()
    }
}
