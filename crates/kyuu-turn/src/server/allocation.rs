//! The allocation table ([RFC 8656 §5]): one [`Allocation`] per client 5-tuple, with its relay
//! sockets, permissions (§9) and channels (§12), in generation-checked slots so a stale
//! [`AllocId`] held by the shell (a relay socket still draining) never reaches a newer allocation.
//!
//! [RFC 8656 §5]: https://www.rfc-editor.org/rfc/rfc8656#section-5

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kyuu_stun::integrity::{IntegrityKind, Key};
use kyuu_stun::{ChannelNumber, TransactionId};

use crate::fxhash::FxHashMap;
use crate::ratelimit::TokenBucket;
use crate::server::metrics::Stats;
use crate::types::{AllocId, ClientSocket, Family, PeerAddr, RelayProto};

/// A permission lasts five minutes unless refreshed (RFC 8656 §9).
pub(crate) const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// A channel binding lasts ten minutes unless refreshed (RFC 8656 §12).
pub(crate) const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a binding expires, its number and peer stay reserved for five minutes (RFC 8656 §12).
pub(crate) const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Channel {
    pub number: ChannelNumber,
    pub peer: SocketAddr,
    pub expires: Instant,
}

/// One relayed address of an allocation: the port asked for and, once the shell bound it, the
/// address.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RelaySlot {
    pub port: u16,
    pub bound: Option<SocketAddr>,
    pub attempts: u8,
}

/// An Allocate waiting for the shell to bind its relay sockets; answered when `waiting` is 0.
#[derive(Debug)]
pub(crate) struct PendingAllocate {
    pub tid: TransactionId,
    pub kind: IntegrityKind,
    pub key: Key,
    pub lifetime: u32,
    pub token: Option<u64>,
    pub address_error: Option<(Family, kyuu_stun::ErrorCode)>,
    pub waiting: u8,
}

/// Which way a relayed packet goes, for the per-direction `max_bps` budget.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Direction {
    ToClient = 0,
    ToPeer = 1,
}

#[derive(Debug)]
pub(crate) struct Allocation {
    pub id: AllocId,
    pub client: ClientSocket,
    pub username: String,
    pub proto: RelayProto,
    /// Allocated with DONT-FRAGMENT (RFC 8656 §7.2): its relay sockets send with DF.
    pub dont_fragment: bool,
    pub relays: [Option<RelaySlot>; 2],
    pub created: Instant,
    pub expires: Instant,
    pub perms: Vec<(IpAddr, Instant)>,
    pub channels: Vec<Channel>,
    pub pending: Option<PendingAllocate>,
    pub stats: Stats,
    pub flushed: Stats,
    /// Byte budget for `max_bps`, per [`Direction`].
    pub buckets: [TokenBucket; 2],
    /// The allocation this one is paired with in-process (`pairing.rs`).
    pub paired: Option<crate::server::pairing::PairLink>,
    /// A RAWR session's limits on this side (`pairing.rs`): bytes relayed, end time.
    pub limit: Option<(u64, Option<Instant>)>,
}

impl Allocation {
    /// Whether this side of a RAWR session has used up its bytes or its time.
    pub fn over_limit(&self, now: Instant) -> bool {
        self.limit.is_some_and(|(max_bytes, ends)| {
            (max_bytes > 0 && self.stats.to_peer_bytes + self.stats.to_client_bytes >= max_bytes)
                || ends.is_some_and(|e| now >= e)
        })
    }

    pub fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }

    pub fn has_family(&self, f: Family) -> bool {
        self.relays[f.index()].is_some_and(|r| r.bound.is_some())
    }

    pub fn relayed(&self, f: Family) -> Option<SocketAddr> {
        self.relays[f.index()].and_then(|r| r.bound)
    }

    pub fn add_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.perms.iter_mut().find(|(p, _)| *p == ip) {
            Some(entry) => entry.1 = expires,
            None => self.perms.push((ip, expires)),
        }
    }

    /// The live channel bound to `peer`.
    pub fn channel_to(&self, peer: PeerAddr, now: Instant) -> Option<ChannelNumber> {
        self.channels
            .iter()
            .find(|c| c.peer == peer.addr() && c.expires > now)
            .map(|c| c.number)
    }

    /// The peer of live channel `number`.
    pub fn channel_peer(&self, number: ChannelNumber, now: Instant) -> Option<SocketAddr> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
            .map(|c| c.peer)
    }

    /// Whether binding `number` to `peer` clashes with another binding, live or cooling down
    /// (RFC 8656 §12.2: a number names one peer and a peer has one number).
    pub fn channel_conflict(&self, number: ChannelNumber, peer: SocketAddr, now: Instant) -> bool {
        self.channels.iter().any(|c| {
            c.expires + CHANNEL_COOLDOWN > now && ((c.number == number) != (c.peer == peer))
        })
    }

    pub fn bind_channel(&mut self, number: ChannelNumber, peer: SocketAddr, now: Instant) {
        let expires = now + CHANNEL_LIFETIME;
        match self.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => {
                c.peer = peer;
                c.expires = expires;
            }
            None => self.channels.push(Channel {
                number,
                peer,
                expires,
            }),
        }
        self.add_permission(peer.ip(), now + PERMISSION_LIFETIME);
    }

    /// Drops expired permissions and channels past their cool-down; returns the live
    /// (permissions, channels) counts.
    pub fn expire(&mut self, now: Instant) -> (usize, usize) {
        self.perms.retain(|(_, exp)| *exp > now);
        self.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
        let live = self.channels.iter().filter(|c| c.expires > now).count();
        (self.perms.len(), live)
    }

    /// When the permission for `ip` ends, if it is live.
    pub fn permission_expiry(&self, ip: IpAddr, now: Instant) -> Option<Instant> {
        self.perms
            .iter()
            .find(|(p, exp)| *p == ip && *exp > now)
            .map(|(_, exp)| *exp)
    }

    /// Whether `dir` has `max_bps` budget left (always, without a limit).
    pub fn has_budget(&self, dir: Direction, max_bps: u64, now: Instant) -> bool {
        if max_bps == 0 {
            return true;
        }
        let rate = max_bps as f64;
        self.buckets[dir as usize].level(rate, rate, now) > 0.0
    }

    /// Charges bytes the kernel already relayed to the `max_bps` budget of `dir`; the budget may
    /// go below zero.
    pub fn charge_bytes(&mut self, dir: Direction, bytes: u64, max_bps: u64, now: Instant) {
        if max_bps == 0 || bytes == 0 {
            return;
        }
        let rate = max_bps as f64;
        self.buckets[dir as usize].charge(bytes as f64, rate, rate, now);
    }

    /// Takes `bytes` from the `max_bps` budget of `dir` (0 = unlimited).
    pub fn take_bytes(&mut self, dir: Direction, bytes: usize, max_bps: u64, now: Instant) -> bool {
        if max_bps == 0 {
            return true;
        }
        let rate = max_bps as f64;
        self.buckets[dir as usize].take(bytes as f64, rate, rate, now)
    }
}

/// Allocations by [`AllocId`] and by client 5-tuple.
#[derive(Debug, Default)]
pub(crate) struct Allocations {
    slots: Vec<(u32, Option<Allocation>)>,
    free: Vec<u32>,
    by_client: FxHashMap<ClientSocket, AllocId>,
}

impl Allocations {
    pub fn get(&self, id: AllocId) -> Option<&Allocation> {
        match self.slots.get(id.slot as usize) {
            Some((generation, Some(a))) if *generation == id.generation => Some(a),
            _ => None,
        }
    }

    pub fn get_mut(&mut self, id: AllocId) -> Option<&mut Allocation> {
        match self.slots.get_mut(id.slot as usize) {
            Some((generation, Some(a))) if *generation == id.generation => Some(a),
            _ => None,
        }
    }

    /// The allocation of `client`'s 5-tuple.
    pub fn id_of(&self, client: &ClientSocket) -> Option<AllocId> {
        self.by_client.get(client).copied()
    }

    pub fn len(&self) -> usize {
        self.by_client.len()
    }

    /// Stores the allocation `make` builds for the id it is given.
    pub fn insert(&mut self, make: impl FnOnce(AllocId) -> Allocation) -> AllocId {
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.slots.get(slot as usize).map_or(0, |s| s.0);
        let id = AllocId { slot, generation };
        let alloc = make(id);
        self.by_client.insert(alloc.client, id);
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.1 = Some(alloc);
        }
        id
    }

    /// Takes the allocation out; its slot gets a new generation, so `id` is dead from now on.
    pub fn remove(&mut self, id: AllocId) -> Option<Allocation> {
        let (generation, slot) = self.slots.get_mut(id.slot as usize)?;
        if *generation != id.generation {
            return None;
        }
        let a = slot.take()?;
        *generation = generation.wrapping_add(1);
        self.free.push(id.slot);
        self.by_client.remove(&a.client);
        Some(a)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Allocation> {
        self.slots.iter().filter_map(|(_, a)| a.as_ref())
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Allocation> {
        self.slots.iter_mut().filter_map(|(_, a)| a.as_mut())
    }

    /// The allocations whose slot is `slice` modulo `slices` (`slices` of them cover the table).
    pub fn slice_mut(
        &mut self,
        slice: usize,
        slices: usize,
    ) -> impl Iterator<Item = &mut Allocation> {
        self.slots
            .iter_mut()
            .skip(slice)
            .step_by(slices.max(1))
            .filter_map(|(_, a)| a.as_mut())
    }
}
