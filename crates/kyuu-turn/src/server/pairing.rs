//! In-process pairing (`docs/rawr.md` §6.1): a RAWR meeting node knows which two allocations
//! belong to one session (by their TURN usernames). Once both exist on this shard, each counts
//! the other's relayed address as permitted (no CreatePermission needed), and a packet one of
//! them relays to the other's relayed address is handed to the other allocation inside the
//! process ([`crate::PairedTarget`]) instead of leaving through a relay socket and coming back.
//!
//! Only allocations on the same shard are linked: a shard owns its allocations and its relay
//! sockets, and moving a packet to another shard's thread would cost a channel hop per packet.
//! Pairs split across shards keep working through the kernel, exactly like unpaired TURN.
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

/// Username → (partner username, expiry).
#[derive(Debug, Default)]
pub(crate) struct Pairings {
    by_user: HashMap<String, (String, Instant)>,
}

impl Pairings {
    pub fn expire(&mut self, now: Instant) {
        self.by_user.retain(|_, (_, exp)| *exp > now);
    }
}

impl Server {
    /// Records that the allocations made with usernames `a` and `b` (TURN REST usernames a RAWR
    /// meeting node minted for one session) belong together for `lifetime`, and links them if
    /// both already exist on this shard. Returns whether they are linked now.
    pub fn pair_usernames(&mut self, now: Instant, a: &str, b: &str, lifetime: Duration) -> bool {
        if a == b {
            return false;
        }
        let p = &mut self.pairings.by_user;
        if p.len() + 2 > MAX_PAIRINGS {
            p.retain(|_, (_, exp)| *exp > now);
            if p.len() + 2 > MAX_PAIRINGS {
                return false;
            }
        }
        let exp = now + lifetime;
        p.insert(a.to_owned(), (b.to_owned(), exp));
        p.insert(b.to_owned(), (a.to_owned(), exp));
        self.try_link(now, a)
    }

    /// Number of linked allocations on this shard (each pair counts twice).
    pub fn paired_allocations(&self) -> usize {
        self.allocs.iter().filter(|a| a.paired.is_some()).count()
    }

    /// Links `user`'s allocation with its partner's when both are here (called when a pairing
    /// is learnt and when an allocation completes).
    pub(super) fn try_link(&mut self, now: Instant, user: &str) -> bool {
        let Some((other_user, exp)) = self.pairings.by_user.get(user) else {
            return false;
        };
        if *exp <= now {
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
        let (Some((ia, aa)), Some((ib, ab))) = (find(user), find(&other_user)) else {
            return false;
        };
        let perm = now + PERMISSION_LIFETIME;
        for (me, other, own_addr, other_addr) in [(ia, ib, aa, ab), (ib, ia, ab, aa)] {
            if let Some(a) = self.allocs.get_mut(me) {
                a.paired = Some(PairLink {
                    other,
                    other_addr,
                    own_addr,
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

    /// Unlinks the partner of a deleted allocation.
    pub(super) fn unlink(&mut self, link: Option<PairLink>) {
        if let Some(l) = link {
            if let Some(o) = self.allocs.get_mut(l.other) {
                o.paired = None;
            }
        }
    }
}
