//! In-process pairing (`docs/rawr.md` §6.1): a RAWR meeting node knows which two allocations
//! belong to one session (by their TURN usernames). Once both exist on this shard, each counts
//! the other's relayed address as permitted (no CreatePermission needed), and a packet one of
//! them relays to the other's relayed address is handed to the other allocation inside the
//! process ([`crate::PairedTarget`]) instead of leaving through a relay socket and coming back.
//!
//! Allocations on the same shard are linked here. When only one side is on this shard the core
//! says so ([`crate::Output::PairHalf`]); the shell finds the partner on another shard and links
//! both with [`Server::link_remote`]. A packet for a partner on another shard carries that
//! shard in its [`crate::PairedTarget`] and the shell hands it over (a bounded channel).
//! Standard clients see nothing different: the peer address of a paired packet is the other
//! allocation's relayed address, as it would be through the kernel.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::server::allocation::PERMISSION_LIFETIME;
use crate::server::Server;
use crate::types::{AllocId, Family, RelayProto};

/// Usernames remembered while waiting for the allocations (both directions count).
const MAX_PAIRINGS: usize = 8192;

/// The other allocation of a linked pair, with both sides' advertised relayed addresses.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PairLink {
    pub other: AllocId,
    /// The other allocation's advertised relayed address per family.
    pub other_addr: [Option<SocketAddr>; 2],
    /// This allocation's advertised relayed address per family (the peer address the other
    /// side sees).
    pub own_addr: [Option<SocketAddr>; 2],
    /// The shard holding `other` when it is not this one.
    pub shard: Option<u16>,
}

impl PairLink {
    /// `(family, own address)` when `peer` is the other allocation's relayed address.
    pub fn target(&self, peer: SocketAddr) -> Option<(Family, SocketAddr)> {
        let f = Family::of(&peer);
        if self.other_addr[f.index()] == Some(peer) {
            self.own_addr[f.index()].map(|own| (f, own))
        } else {
            None
        }
    }

    /// Whether `peer` is the other allocation's relayed address.
    pub fn is_other(&self, peer: SocketAddr) -> bool {
        self.other_addr[Family::of(&peer).index()] == Some(peer)
    }
}

/// Limits a RAWR meeting node puts on each side of a session it relays (`docs/rawr.md` §4.6):
/// bytes relayed (both directions, 0 unlimited) and time from when the limit applies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionLimits {
    pub max_bytes: u64,
    pub max_duration: Option<Duration>,
}

/// Username → (partner username, expiry, limits, link in-process).
#[derive(Debug, Default)]
pub(crate) struct Pairings {
    by_user: HashMap<String, (String, Instant, SessionLimits, bool)>,
}

impl Pairings {
    pub fn expire(&mut self, now: Instant) {
        self.by_user.retain(|_, (_, exp, _, _)| *exp > now);
    }
}

impl Server {
    /// Records that the allocations made with usernames `a` and `b` (TURN REST usernames a RAWR
    /// meeting node minted for one session) belong together for `lifetime`, and links them if
    /// both already exist on this shard. Returns whether they are linked now.
    pub fn pair_usernames(
        &mut self,
        now: Instant,
        a: &str,
        b: &str,
        lifetime: Duration,
        limits: SessionLimits,
    ) -> bool {
        self.record_pair(now, a, b, lifetime, limits, true)
    }

    /// Like [`Server::pair_usernames`] but only holds the two sides to `limits`, without linking
    /// them (`rawr.pair_in_process = false`).
    pub fn limit_usernames(
        &mut self,
        now: Instant,
        a: &str,
        b: &str,
        lifetime: Duration,
        limits: SessionLimits,
    ) {
        self.record_pair(now, a, b, lifetime, limits, false);
    }

    fn record_pair(
        &mut self,
        now: Instant,
        a: &str,
        b: &str,
        lifetime: Duration,
        limits: SessionLimits,
        link: bool,
    ) -> bool {
        if a == b {
            return false;
        }
        let p = &mut self.pairings.by_user;
        if p.len() + 2 > MAX_PAIRINGS {
            p.retain(|_, (_, exp, _, _)| *exp > now);
            if p.len() + 2 > MAX_PAIRINGS {
                return false;
            }
        }
        let exp = now + lifetime;
        p.insert(a.to_owned(), (b.to_owned(), exp, limits, link));
        p.insert(b.to_owned(), (a.to_owned(), exp, limits, link));
        self.apply_limits(now, b);
        self.try_link(now, a)
    }

    /// Number of linked allocations on this shard (each pair counts twice).
    pub fn paired_allocations(&self) -> usize {
        self.allocs.iter().filter(|a| a.paired.is_some()).count()
    }

    /// Links `user`'s allocation with its partner's when both are here (called when a pairing
    /// is learnt and when an allocation completes).
    pub(super) fn try_link(&mut self, now: Instant, user: &str) -> bool {
        self.apply_limits(now, user);
        let Some((other_user, exp, _, link)) = self.pairings.by_user.get(user) else {
            return false;
        };
        if *exp <= now || !*link {
            return false;
        }
        let other_user = other_user.clone();
        let find = |u: &str| {
            self.allocs
                .iter()
                .find(|a| a.username == u && a.pending.is_none() && a.proto == RelayProto::Udp)
                .map(|a| {
                    let addrs = Family::BOTH.map(|f| a.relayed(f).map(|x| self.cfg.advertised(x)));
                    (a.id, addrs)
                })
        };
        let (ia, ib) = (find(user), find(&other_user));
        let (Some((ia, aa)), Some((ib, ab))) = (ia, ib) else {
            // One side here (the other on another shard, or not allocated yet): the shell
            // looks for the partner elsewhere.
            for (u, p, x) in [(user, other_user.as_str(), ia), (&other_user, user, ib)] {
                if let Some((alloc, addrs)) = x {
                    self.out.push_back(crate::types::Output::PairHalf {
                        username: u.to_owned(),
                        partner: p.to_owned(),
                        alloc,
                        addrs,
                    });
                }
            }
            return false;
        };
        let perm = now + PERMISSION_LIFETIME;
        for (me, other, own_addr, other_addr) in [(ia, ib, aa, ab), (ib, ia, ab, aa)] {
            if let Some(a) = self.allocs.get_mut(me) {
                a.paired = Some(PairLink {
                    other,
                    other_addr,
                    own_addr,
                    shard: None,
                });
                // The permissions a client would have asked for, for the kernel path (streams).
                for x in other_addr.iter().flatten() {
                    a.add_permission(x.ip(), perm);
                }
            }
        }
        tracing::debug!(target: "kyuu::turn", a = user, b = %other_user, "allocations paired in-process");
        true
    }

    /// Puts the session limits of `user`'s pairing on its allocation here, if any (once: the
    /// time limit runs from then). Both sides are limited even when they are on different
    /// shards.
    fn apply_limits(&mut self, now: Instant, user: &str) {
        let Some((_, _, l, _)) = self.pairings.by_user.get(user) else {
            return;
        };
        if l.max_bytes == 0 && l.max_duration.is_none() {
            return;
        }
        let limit = (l.max_bytes, l.max_duration.map(|d| now + d));
        for a in self.allocs.iter_mut() {
            if a.username == user && a.limit.is_none() {
                a.limit = Some(limit);
            }
        }
    }

    /// Deletes the allocations `over` their session limit (found by the tick's walk) and
    /// reports them.
    pub(super) fn end_over_limit(&mut self, now: Instant, over: Vec<(AllocId, String)>) {
        for (id, username) in over {
            self.delete_allocation(now, id, "rawr session limit");
            self.out
                .push_back(crate::types::Output::SessionLimit { username });
        }
    }

    /// Links allocation `alloc` here with `other` on shard `shard` (whose advertised relayed
    /// addresses are `other_addr`), after a [`crate::Output::PairHalf`] found the partner
    /// there. Returns whether `alloc` exists here (and is now linked).
    pub fn link_remote(
        &mut self,
        now: Instant,
        alloc: AllocId,
        shard: u16,
        other: AllocId,
        other_addr: [Option<SocketAddr>; 2],
    ) -> bool {
        let own_addr = match self.allocs.get(alloc) {
            Some(a) if a.pending.is_none() && a.proto == RelayProto::Udp => {
                Family::BOTH.map(|f| a.relayed(f).map(|x| self.cfg.advertised(x)))
            }
            _ => return false,
        };
        let perm = now + PERMISSION_LIFETIME;
        let Some(a) = self.allocs.get_mut(alloc) else {
            return false;
        };
        a.paired = Some(PairLink {
            other,
            other_addr,
            own_addr,
            shard: Some(shard),
        });
        for x in other_addr.iter().flatten() {
            a.add_permission(x.ip(), perm);
        }
        tracing::debug!(target: "kyuu::turn", shard, "allocations paired in-process across shards");
        true
    }

    /// The partner (`other` on another shard) of allocation `alloc` went away: unlink it.
    pub fn unlink_remote(&mut self, alloc: AllocId, other: AllocId) {
        if let Some(a) = self.allocs.get_mut(alloc) {
            if a.paired
                .is_some_and(|l| l.shard.is_some() && l.other == other)
            {
                a.paired = None;
            }
        }
    }

    /// Unlinks the partner of a deleted allocation `id`.
    pub(super) fn unlink(&mut self, id: AllocId, link: Option<PairLink>) {
        if let Some(l) = link {
            if let Some(shard) = l.shard {
                self.out.push_back(crate::types::Output::Unpair {
                    shard,
                    alloc: l.other,
                    gone: id,
                });
                return;
            }
            if let Some(o) = self.allocs.get_mut(l.other) {
                o.paired = None;
            }
        }
    }
}
