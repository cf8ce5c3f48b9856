//! The server state machine: STUN Binding (RFC 8489 §6.3, RFC 5780 §6), TURN allocations,
//! permissions and channels (RFC 8656), TCP relaying (RFC 6062).

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kyuu_stun::integrity::{IntegrityKind, Key};
use kyuu_stun::{attr, method, ChannelData, Class, Message, MessageBuilder, TransactionId};

use crate::auth::{AuthFailure, Credentials, Nonces, UserKeys};
use crate::config::{PortRange, TurnConfig};
use crate::fxhash::FxHashMap;
use crate::policy::PeerPolicy;
use crate::ratelimit::RateLimiter;
use crate::types::*;

const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
const CONNECTION_BIND_TIMEOUT: Duration = Duration::from_secs(30);
const CACHE_LIFETIME: Duration = Duration::from_secs(40);
const CACHE_MAX: usize = 4096;
const TICK: Duration = Duration::from_secs(1);
const MAX_BIND_ATTEMPTS: u8 = 16;
/// RFC 5766 allowed channels up to 0x7FFF and coturn's clients still use them; RFC 8656 narrowed
/// the range to 0x4FFF. Both are accepted.
const CHANNEL_MAX_COMPAT: u16 = 0x7FFF;
const PASSWORD_ALGORITHMS: [u16; 2] = [
    attr::PASSWORD_ALGORITHM_MD5,
    attr::PASSWORD_ALGORITHM_SHA256,
];

/// RFC 5780 addresses: with both an alternate IP and an alternate port the server answers
/// CHANGE-REQUEST and includes OTHER-ADDRESS and RESPONSE-ORIGIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc5780 {
    pub primary_ip: IpAddr,
    pub alternate_ip: IpAddr,
    pub primary_port: u16,
    pub alternate_port: u16,
}

impl Rfc5780 {
    fn swap_ip(&self, ip: IpAddr) -> IpAddr {
        if ip == self.primary_ip {
            self.alternate_ip
        } else {
            self.primary_ip
        }
    }

    fn swap_port(&self, port: u16) -> u16 {
        if port == self.primary_port {
            self.alternate_port
        } else {
            self.primary_port
        }
    }

    fn other(&self, local: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.swap_ip(local.ip()), self.swap_port(local.port()))
    }
}

#[derive(Debug, Default)]
struct Quotas {
    total: u32,
    per_user: HashMap<String, u32>,
    per_ip: HashMap<IpAddr, u32>,
}

/// State shared by every shard of one server: the nonce key, the clock origin and the quota
/// counters (touched only when allocations come and go).
#[derive(Debug)]
pub struct Shared {
    nonce_key: [u8; 32],
    start: Instant,
    unix_at_start: u64,
    quotas: Mutex<Quotas>,
    /// EVEN-PORT reservations by token: the allocation that uses a token may land on another
    /// shard (clients' second sockets hash elsewhere).
    reservations: Mutex<HashMap<u64, Reservation>>,
}

impl Shared {
    /// `start` is the origin of nonce timestamps; `unix_at_start` the wall-clock seconds at
    /// `start` (for TURN REST API expiry times).
    pub fn new(nonce_key: [u8; 32], start: Instant, unix_at_start: u64) -> Arc<Self> {
        Arc::new(Shared {
            nonce_key,
            start,
            unix_at_start,
            quotas: Mutex::new(Quotas::default()),
            reservations: Mutex::new(HashMap::new()),
        })
    }

    /// Total allocations across shards.
    pub fn allocations(&self) -> u32 {
        self.quotas.lock().map(|q| q.total).unwrap_or(0)
    }
}

/// Per-shard options.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    pub rfc5780: Option<Rfc5780>,
    pub shared: Arc<Shared>,
    /// The slice of `turn.relay_ports` this shard hands out (shards must not overlap).
    pub ports: PortRange,
    /// Hand requests in [`crate::EXTENSION_METHODS`] to the shell instead of answering 400.
    pub extension: bool,
    /// Seed for transaction ids, ports, tokens and connection ids.
    pub seed: u64,
    /// Shard number, for metrics labels and connection ids.
    pub shard: u16,
}

#[derive(Debug, Clone, Copy)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Debug, Clone, Copy)]
struct RelaySlot {
    port: u16,
    bound: Option<SocketAddr>,
    attempts: u8,
}

#[derive(Debug)]
struct PendingAllocate {
    tid: TransactionId,
    kind: IntegrityKind,
    key: Key,
    lifetime: u32,
    token: Option<u64>,
    address_error: Option<(u8, u16)>,
    waiting: u8,
}

#[derive(Debug, Default, Clone, Copy)]
struct Stats {
    to_peer_pkts: u64,
    to_peer_bytes: u64,
    to_client_pkts: u64,
    to_client_bytes: u64,
}

#[derive(Debug)]
struct Allocation {
    id: AllocId,
    client: ClientSocket,
    username: String,
    proto: RelayProto,
    relays: [Option<RelaySlot>; 2],
    created: Instant,
    expires: Instant,
    perms: Vec<(IpAddr, Instant)>,
    channels: Vec<Channel>,
    pending: Option<PendingAllocate>,
    stats: Stats,
    flushed: Stats,
    /// Byte bucket for `max_bps`, per direction: (tokens, last refill).
    buckets: [(f64, Instant); 2],
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|(p, exp)| *p == ip && *exp > now)
    }

    fn has_family(&self, f: Family) -> bool {
        self.relays[f.index()].is_some_and(|r| r.bound.is_some())
    }

    fn relayed(&self, f: Family) -> Option<SocketAddr> {
        self.relays[f.index()].and_then(|r| r.bound)
    }

    fn add_permission(&mut self, ip: IpAddr, expires: Instant) {
        match self.perms.iter_mut().find(|(p, _)| *p == ip) {
            Some(entry) => entry.1 = expires,
            None => self.perms.push((ip, expires)),
        }
    }

    fn take_tokens(&mut self, dir: usize, bytes: usize, rate: u64, now: Instant) -> bool {
        if rate == 0 {
            return true;
        }
        let rate = rate as f64;
        let Some((tokens, last)) = self.buckets.get_mut(dir) else {
            return true;
        };
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * rate).min(rate);
        *last = now;
        if *tokens >= bytes as f64 {
            *tokens -= bytes as f64;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Reservation {
    family: Family,
    port: u16,
    expires: Instant,
}

#[derive(Debug, PartialEq, Eq)]
enum PeerConnState {
    /// Connect sent to the shell; answer the client's Connect when it completes.
    Connecting {
        tid: TransactionId,
        kind: IntegrityKind,
        key: Key,
    },
    /// Waiting for the client's ConnectionBind.
    Ready,
}

#[derive(Debug)]
struct PeerConn {
    alloc: AllocId,
    peer: SocketAddr,
    state: PeerConnState,
    expires: Instant,
}

/// Counters of dropped input, flushed to metrics on each tick.
#[derive(Debug, Default)]
struct Drops {
    malformed: u64,
    no_allocation: u64,
    no_permission: u64,
    rate_limited: u64,
    bandwidth: u64,
    forbidden_peer: u64,
}

/// An authenticated request's identity and the key that verified it.
struct Authed {
    username: String,
    key: Key,
    kind: IntegrityKind,
}

/// The sans-IO server. See the crate docs for the contract.
#[derive(Debug)]
pub struct Server {
    cfg: TurnConfig,
    opts: ServerOptions,
    creds: Credentials,
    nonces: Nonces,
    policy: PeerPolicy,
    limiter: RateLimiter,
    slots: Vec<(u32, Option<Allocation>)>,
    free: Vec<u32>,
    by_client: FxHashMap<ClientSocket, AllocId>,
    used_ports: [Vec<u64>; 2],
    reservations: HashMap<u64, Reservation>,
    conns: HashMap<u32, PeerConn>,
    cache: HashMap<(ClientSocket, TransactionId), (Vec<u8>, Instant)>,
    cache_order: VecDeque<(ClientSocket, TransactionId)>,
    out: VecDeque<Output>,
    next_tick: Option<Instant>,
    rng: u64,
    drops: Drops,
    flushed_drops: Drops,
    auth_failures: HashMap<&'static str, u64>,
}

fn known_binding(rfc5780: bool, t: u16) -> bool {
    matches!(
        t,
        attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::USERHASH
            | attr::REALM
            | attr::NONCE
            | attr::PRIORITY
            | attr::USE_CANDIDATE
            | attr::RESPONSE_PORT
            | attr::PADDING
            | attr::PASSWORD_ALGORITHM
            | attr::XOR_MAPPED_ADDRESS
            | attr::MAPPED_ADDRESS
    ) || (rfc5780 && t == attr::CHANGE_REQUEST)
}

fn known_turn(t: u16) -> bool {
    matches!(
        t,
        attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::USERHASH
            | attr::REALM
            | attr::NONCE
            | attr::PASSWORD_ALGORITHM
            | attr::CHANNEL_NUMBER
            | attr::LIFETIME
            | attr::XOR_PEER_ADDRESS
            | attr::DATA
            | attr::REQUESTED_ADDRESS_FAMILY
            | attr::EVEN_PORT
            | attr::REQUESTED_TRANSPORT
            | attr::DONT_FRAGMENT
            | attr::RESERVATION_TOKEN
            | attr::CONNECTION_ID
            | attr::ERROR_CODE
            | attr::PADDING
    )
}

fn family_of_code(code: u8) -> Option<Family> {
    match code {
        attr::FAMILY_IPV4 => Some(Family::V4),
        attr::FAMILY_IPV6 => Some(Family::V6),
        _ => None,
    }
}

fn family_code(f: Family) -> u8 {
    match f {
        Family::V4 => attr::FAMILY_IPV4,
        Family::V6 => attr::FAMILY_IPV6,
    }
}

/// A ToPeer/ToClient payload range, checked to fit the buffer.
fn range_in(start: usize, len: usize, buf_len: usize) -> Option<Range<usize>> {
    let end = start.checked_add(len)?;
    (end <= buf_len).then_some(start..end)
}

impl Server {
    pub fn new(cfg: TurnConfig, opts: ServerOptions) -> Result<Self, String> {
        cfg.validate()?;
        let creds = Credentials::new(&cfg);
        let nonces = Nonces::new(opts.shared.nonce_key, u64::from(cfg.nonce_lifetime));
        let policy = PeerPolicy::new(&cfg.allow_peers, &cfg.deny_peers);
        let limiter = RateLimiter::new(cfg.unauth_rate, cfg.unauth_burst, cfg.rate_table_size);
        let rng = opts.seed | 1;
        Ok(Server {
            cfg,
            opts,
            creds,
            nonces,
            policy,
            limiter,
            slots: Vec::new(),
            free: Vec::new(),
            by_client: FxHashMap::default(),
            used_ports: [vec![0u64; 1024], vec![0u64; 1024]],
            reservations: HashMap::new(),
            conns: HashMap::new(),
            cache: HashMap::new(),
            cache_order: VecDeque::new(),
            out: VecDeque::new(),
            next_tick: None,
            rng,
            drops: Drops::default(),
            flushed_drops: Drops::default(),
            auth_failures: HashMap::new(),
        })
    }

    pub fn config(&self) -> &TurnConfig {
        &self.cfg
    }

    /// Whether `client`'s five-tuple holds an allocation.
    pub fn has_allocation(&self, client: &ClientSocket) -> bool {
        self.by_client.contains_key(client)
    }

    /// Number of live allocations in this shard.
    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*: cheap, and only used where unpredictability against an off-path attacker
        // is enough (transaction ids of Data indications, port choice). Tokens mix in the seed.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.opts.shared.start)
            .as_secs()
    }

    fn unix_now(&self, now: Instant) -> u64 {
        self.opts.shared.unix_at_start + self.secs(now)
    }

    // ----- public inputs -------------------------------------------------------------------

    /// A datagram or stream frame from a client. Returns the relay instruction for ChannelData
    /// and Send indications (the fast path); queues everything else.
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: ClientSocket,
        packet: &[u8],
    ) -> Option<ToPeer> {
        self.arm_tick(now);
        let first = *packet.first()?;
        if first & 0xC0 == 0x40 {
            return self.channel_data(now, client, packet);
        }
        let Ok(msg) = Message::parse(packet) else {
            self.drops.malformed += 1;
            return None;
        };
        if msg.verify_fingerprint().is_err() {
            self.drops.malformed += 1;
            return None;
        }
        match msg.class() {
            Class::Request => {
                self.request(now, client, &msg);
                None
            }
            Class::Indication if msg.method() == method::SEND => {
                self.send_indication(now, client, &msg)
            }
            _ => None,
        }
    }

    /// A datagram from `peer` on relay socket `relay`. The payload is `buf[payload]`, with at least
    /// [`PEER_HEADROOM`] bytes before it and [`PEER_TAILROOM`] after it.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayKey,
        peer: PeerAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> Option<ToClient> {
        let max_bps = self.cfg.max_bps;
        let Some(alloc) = self.alloc_mut(relay.alloc) else {
            self.drops.no_allocation += 1;
            return None;
        };
        let len = payload.len();
        if !alloc.permitted(peer.0.ip(), now) {
            self.drops.no_permission += 1;
            return None;
        }
        if !alloc.take_tokens(0, len, max_bps, now) {
            self.drops.bandwidth += 1;
            return None;
        }
        let client = alloc.client;
        let stream = client.transport.is_stream();
        let channel = alloc
            .channels
            .iter()
            .find(|c| c.peer == peer.0 && c.expires > now)
            .map(|c| c.number);
        alloc.stats.to_client_pkts += 1;
        alloc.stats.to_client_bytes += len as u64;
        if let Some(number) = channel {
            let start = payload.start.checked_sub(4)?;
            let len16 = u16::try_from(len).ok()?;
            ChannelData::write_header(number, len16, buf.get_mut(start..)?).ok()?;
            let mut end = payload.end;
            if stream {
                let padded = (len + 3) & !3;
                let new_end = start + 4 + padded;
                buf.get_mut(end..new_end)?.fill(0);
                end = new_end;
            }
            return Some(ToClient {
                client,
                data: start..end,
            });
        }
        // Data indication (RFC 8656 §11.6), built in place around the payload.
        let addr_len = if peer.0.is_ipv4() { 8 } else { 20 };
        let head = 20 + 4 + addr_len + 4;
        let start = payload.start.checked_sub(head)?;
        let r = self.next_rand().to_le_bytes();
        let r2 = self.rng.to_le_bytes();
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&r);
        tid[8..].copy_from_slice(&r2[..4]);
        let end = payload.end.checked_add(3)?;
        let slot = buf.get_mut(start..end)?;
        let mut b =
            MessageBuilder::new(slot, method::DATA, Class::Indication, TransactionId(tid)).ok()?;
        b.add_xor_address(attr::XOR_PEER_ADDRESS, peer.0).ok()?;
        // The payload already sits where DATA's value goes: reserve writes only the header
        // and padding.
        b.reserve(attr::DATA, len).ok()?;
        let total = b.finish();
        Some(ToClient {
            client,
            data: start..start + total,
        })
    }

    /// The shell's answer to [`Output::BindRelay`]: the bound address, or an error (the core
    /// then tries another port or fails the allocation with 508).
    pub fn relay_bound(&mut self, now: Instant, key: RelayKey, result: Result<SocketAddr, ()>) {
        let Some(alloc) = self.alloc_mut(key.alloc) else {
            if result.is_ok() {
                self.out.push_back(Output::CloseRelay { key });
            }
            return;
        };
        let idx = key.family.index();
        let Some(slot) = alloc.relays.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        match result {
            Ok(addr) => {
                slot.bound = Some(addr);
                if let Some(p) = alloc.pending.as_mut() {
                    p.waiting = p.waiting.saturating_sub(1);
                }
            }
            Err(()) => {
                let attempts = slot.attempts;
                let has_token = alloc.pending.as_ref().is_some_and(|p| p.token.is_some());
                if attempts < MAX_BIND_ATTEMPTS && !has_token {
                    // Leave the failed port marked used: someone else holds it.
                    if let Some(port) = self.pick_port(key.family, false) {
                        if let Some(Some(slot)) = self
                            .alloc_mut(key.alloc)
                            .and_then(|a| a.relays.get_mut(idx))
                        {
                            slot.port = port;
                            slot.attempts = attempts + 1;
                        }
                        if let Some(ip) = self.cfg.relay_ip(key.family == Family::V6) {
                            let proto = self
                                .alloc_mut(key.alloc)
                                .map_or(RelayProto::Udp, |a| a.proto);
                            self.out.push_back(Output::BindRelay {
                                key,
                                addr: SocketAddr::new(ip, port),
                                proto,
                            });
                            return;
                        }
                    }
                }
                // Give up on this family.
                let Some(alloc) = self.alloc_mut(key.alloc) else {
                    return;
                };
                alloc.relays[idx] = None;
                let other_live = alloc.relays.iter().flatten().next().is_some();
                if let Some(p) = alloc.pending.as_mut() {
                    p.waiting = p.waiting.saturating_sub(1);
                    if other_live {
                        p.address_error = Some((family_code(key.family), 508));
                    }
                }
                if !other_live {
                    self.fail_pending(now, key.alloc, 508);
                    return;
                }
            }
        }
        self.maybe_finish_allocate(now, key.alloc);
    }

    /// A client's stream connection closed: its allocation (if any) goes with it.
    pub fn client_closed(&mut self, now: Instant, client: ClientSocket) {
        if let Some(id) = self.by_client.get(&client).copied() {
            self.delete_allocation(now, id, "connection closed");
        }
    }

    /// Result of [`Output::ConnectPeer`].
    pub fn peer_connected(&mut self, now: Instant, connection_id: u32, ok: bool) {
        let Some(conn) = self.conns.get_mut(&connection_id) else {
            if ok {
                self.out
                    .push_back(Output::ClosePeerConnection { connection_id });
            }
            return;
        };
        let PeerConnState::Connecting { tid, kind, key } =
            std::mem::replace(&mut conn.state, PeerConnState::Ready)
        else {
            return;
        };
        conn.expires = now + CONNECTION_BIND_TIMEOUT;
        let alloc_id = conn.alloc;
        let Some(client) = self.alloc_mut(alloc_id).map(|a| a.client) else {
            self.conns.remove(&connection_id);
            return;
        };
        let auth = Some((&key, kind));
        if ok {
            let resp = self.build(method::CONNECT, Class::Success, tid, auth, |b| {
                b.add_u32(attr::CONNECTION_ID, connection_id)
            });
            self.send_cached(client, tid, resp);
        } else {
            self.conns.remove(&connection_id);
            let resp = self.build(method::CONNECT, Class::Error, tid, auth, |b| {
                b.add_error(447, "")
            });
            self.send_cached(client, tid, resp);
        }
    }

    /// RFC 6062: a peer connected to a TCP allocation's relayed address. Returns the connection
    /// id the shell keeps the connection under, or `None` to refuse it (no permission).
    pub fn peer_connection_accepted(
        &mut self,
        now: Instant,
        relay: RelayKey,
        peer: PeerAddr,
    ) -> Option<u32> {
        let alloc = self.alloc_mut(relay.alloc)?;
        if !alloc.permitted(peer.0.ip(), now) {
            self.drops.no_permission += 1;
            return None;
        }
        let client = alloc.client;
        let id = self.new_connection_id();
        self.conns.insert(
            id,
            PeerConn {
                alloc: relay.alloc,
                peer: peer.0,
                state: PeerConnState::Ready,
                expires: now + CONNECTION_BIND_TIMEOUT,
            },
        );
        let tid = self.random_tid();
        let msg = self.build(
            method::CONNECTION_ATTEMPT,
            Class::Indication,
            tid,
            None,
            |b| {
                b.add_xor_address(attr::XOR_PEER_ADDRESS, peer.0)?;
                b.add_u32(attr::CONNECTION_ID, id)
            },
        );
        if let Some(data) = msg {
            self.out
                .push_back(Output::Transmit(Transmit { client, data }));
        }
        Some(id)
    }

    /// A peer connection of RFC 6062 closed.
    pub fn peer_connection_closed(&mut self, connection_id: u32) {
        self.conns.remove(&connection_id);
    }

    /// When [`Server::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Expires allocations, permissions, channels, reservations and cached responses; flushes
    /// per-allocation counters to metrics.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.next_tick {
            Some(t) if t <= now => {}
            _ => return,
        }
        self.next_tick = Some(now + TICK);
        let mut expired = Vec::new();
        let mut perms = 0usize;
        let mut channels = 0usize;
        let shard = self.opts.shard.to_string();
        for (_, slot) in &mut self.slots {
            let Some(a) = slot.as_mut() else { continue };
            if a.expires <= now {
                expired.push(a.id);
                continue;
            }
            a.perms.retain(|(_, exp)| *exp > now);
            // An expired channel keeps its number and peer reserved for five more minutes
            // (RFC 8656 §12) but relays nothing.
            a.channels.retain(|c| c.expires + CHANNEL_COOLDOWN > now);
            perms += a.perms.len();
            channels += a.channels.iter().filter(|c| c.expires > now).count();
            flush_stats(a);
        }
        for id in expired {
            self.delete_allocation(now, id, "expired");
        }
        // Reservations this shard made: free the port when it expired, or when another shard
        // consumed the token (that shard binds the port; a clash would fail the bind and be
        // retried).
        let mut ports_to_free = Vec::new();
        if let Ok(mut shared) = self.opts.shared.reservations.lock() {
            self.reservations.retain(|t, r| {
                let keep = r.expires > now && shared.contains_key(t);
                if !keep {
                    shared.remove(t);
                    ports_to_free.push((r.family, r.port));
                }
                keep
            });
        }
        for (f, p) in ports_to_free {
            self.release_port(f, p);
        }
        let stale: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            self.conns.remove(&id);
            self.out
                .push_back(Output::ClosePeerConnection { connection_id: id });
        }
        while let Some(k) = self.cache_order.front().copied() {
            match self.cache.get(&k) {
                Some((_, t)) if now.saturating_duration_since(*t) < CACHE_LIFETIME => break,
                _ => {
                    self.cache.remove(&k);
                    self.cache_order.pop_front();
                }
            }
        }
        self.limiter.expire(now);
        metrics::gauge!("kyuu_turn_allocations", "shard" => shard.clone())
            .set(self.by_client.len() as f64);
        metrics::gauge!("kyuu_turn_permissions", "shard" => shard.clone()).set(perms as f64);
        metrics::gauge!("kyuu_turn_channels", "shard" => shard).set(channels as f64);
        self.flush_drops();
    }

    // ----- internals ---------------------------------------------------------------------

    fn arm_tick(&mut self, now: Instant) {
        if self.next_tick.is_none() {
            self.next_tick = Some(now + TICK);
        }
    }

    fn flush_drops(&mut self) {
        let d = &self.drops;
        let f = &mut self.flushed_drops;
        for (name, cur, old) in [
            ("malformed", d.malformed, &mut f.malformed),
            ("no_allocation", d.no_allocation, &mut f.no_allocation),
            ("no_permission", d.no_permission, &mut f.no_permission),
            ("rate_limited", d.rate_limited, &mut f.rate_limited),
            ("bandwidth", d.bandwidth, &mut f.bandwidth),
            ("forbidden_peer", d.forbidden_peer, &mut f.forbidden_peer),
        ] {
            if cur > *old {
                metrics::counter!("kyuu_turn_dropped_total", "reason" => name)
                    .increment(cur - *old);
                *old = cur;
            }
        }
        for (reason, n) in self.auth_failures.drain() {
            metrics::counter!("kyuu_turn_auth_failures_total", "reason" => reason).increment(n);
        }
    }

    fn alloc_mut(&mut self, id: AllocId) -> Option<&mut Allocation> {
        match self.slots.get_mut(id.slot as usize) {
            Some((generation, Some(a))) if *generation == id.generation => Some(a),
            _ => None,
        }
    }

    fn alloc(&self, id: AllocId) -> Option<&Allocation> {
        match self.slots.get(id.slot as usize) {
            Some((generation, Some(a))) if *generation == id.generation => Some(a),
            _ => None,
        }
    }

    fn channel_data(
        &mut self,
        now: Instant,
        client: ClientSocket,
        packet: &[u8],
    ) -> Option<ToPeer> {
        let Some(cd) = parse_channel_data(packet) else {
            self.drops.malformed += 1;
            return None;
        };
        let Some(id) = self.by_client.get(&client).copied() else {
            self.drops.no_allocation += 1;
            return None;
        };
        let max_bps = self.cfg.max_bps;
        let alloc = self.alloc_mut(id)?;
        let Some(ch) = alloc
            .channels
            .iter()
            .find(|c| c.number == cd.channel && c.expires > now)
            .copied()
        else {
            self.drops.no_permission += 1;
            return None;
        };
        if !alloc.permitted(ch.peer.ip(), now) {
            self.drops.no_permission += 1;
            return None;
        }
        let len = cd.data.len();
        if !alloc.take_tokens(1, len, max_bps, now) {
            self.drops.bandwidth += 1;
            return None;
        }
        alloc.stats.to_peer_pkts += 1;
        alloc.stats.to_peer_bytes += len as u64;
        Some(ToPeer {
            relay: RelayKey {
                alloc: id,
                family: Family::of(&ch.peer),
            },
            peer: PeerAddr(ch.peer),
            data: range_in(4, len, packet.len())?,
            dont_fragment: false,
        })
    }

    fn send_indication(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
    ) -> Option<ToPeer> {
        let Some(id) = self.by_client.get(&client).copied() else {
            self.drops.no_allocation += 1;
            return None;
        };
        // Indications with unknown comprehension-required attributes are discarded
        // (RFC 8489 §6.3.3).
        if msg
            .effective_attrs()
            .any(|a| attr::is_comprehension_required(a.attr_type) && !known_turn(a.attr_type))
        {
            self.drops.malformed += 1;
            return None;
        }
        let Some(Ok(peer)) = msg.xor_address(attr::XOR_PEER_ADDRESS) else {
            self.drops.malformed += 1;
            return None;
        };
        let Some(data) = msg.effective_attrs().find(|a| a.attr_type == attr::DATA) else {
            self.drops.malformed += 1;
            return None;
        };
        if !self.policy.permits(peer.ip()) {
            self.drops.forbidden_peer += 1;
            return None;
        }
        let dont_fragment = msg.has(attr::DONT_FRAGMENT);
        let max_bps = self.cfg.max_bps;
        let alloc = self.alloc_mut(id)?;
        if alloc.proto != RelayProto::Udp || !alloc.has_family(Family::of(&peer)) {
            self.drops.no_permission += 1;
            return None;
        }
        if !alloc.permitted(peer.ip(), now) {
            self.drops.no_permission += 1;
            return None;
        }
        let len = data.value.len();
        if !alloc.take_tokens(1, len, max_bps, now) {
            self.drops.bandwidth += 1;
            return None;
        }
        alloc.stats.to_peer_pkts += 1;
        alloc.stats.to_peer_bytes += len as u64;
        Some(ToPeer {
            relay: RelayKey {
                alloc: id,
                family: Family::of(&peer),
            },
            peer: PeerAddr(peer),
            data: range_in(data.offset + 4, len, msg.as_bytes().len())?,
            dont_fragment,
        })
    }

    fn random_tid(&mut self) -> TransactionId {
        let a = self.next_rand().to_le_bytes();
        let b = self.next_rand().to_le_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        TransactionId(t)
    }

    fn new_connection_id(&mut self) -> u32 {
        loop {
            let id = self.next_rand() as u32;
            if id != 0 && !self.conns.contains_key(&id) {
                return id;
            }
        }
    }

    /// Builds a message: `f` adds the method's attributes, then SOFTWARE, integrity and
    /// FINGERPRINT follow.
    fn build(
        &self,
        m: u16,
        class: Class,
        tid: TransactionId,
        auth: Option<(&Key, IntegrityKind)>,
        f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
    ) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 1400];
        let mut b = MessageBuilder::new(&mut buf, m, class, tid).ok()?;
        f(&mut b).ok()?;
        // Not in errors to unauthenticated requests: they go to unverified addresses, and
        // must stay no larger than a Binding answer relative to the request (amplification).
        let unverified_error = class == Class::Error && auth.is_none();
        if !self.cfg.software.is_empty() && class != Class::Indication && !unverified_error {
            b.add(attr::SOFTWARE, self.cfg.software.as_bytes()).ok()?;
        }
        match auth {
            Some((key, IntegrityKind::Sha1)) => b.add_integrity(key).ok()?,
            Some((key, IntegrityKind::Sha256)) => b.add_integrity_sha256(key).ok()?,
            None => {}
        }
        b.add_fingerprint().ok()?;
        let n = b.finish();
        buf.truncate(n);
        Some(buf)
    }

    fn send(&mut self, client: ClientSocket, data: Option<Vec<u8>>) {
        if let Some(data) = data {
            self.out
                .push_back(Output::Transmit(Transmit { client, data }));
        }
    }

    /// An empty authenticated success answer, remembered for retransmissions.
    fn reply_ok(&mut self, client: ClientSocket, msg: &Message<'_>, m: u16, auth: &Authed) {
        let tid = *msg.transaction_id();
        let resp = self.build(m, Class::Success, tid, Some((&auth.key, auth.kind)), |_| {
            Ok(())
        });
        self.send_cached(client, tid, resp);
    }

    fn send_cached(&mut self, client: ClientSocket, tid: TransactionId, data: Option<Vec<u8>>) {
        let Some(data) = data else { return };
        self.cache_put(client, tid, data.clone());
        self.out
            .push_back(Output::Transmit(Transmit { client, data }));
    }

    fn cache_put(&mut self, client: ClientSocket, tid: TransactionId, data: Vec<u8>) {
        if self.cache.len() >= CACHE_MAX {
            if let Some(k) = self.cache_order.pop_front() {
                self.cache.remove(&k);
            }
        }
        // The stored time is refreshed per entry; order is insertion order.
        if self
            .cache
            .insert((client, tid), (data, self.now_hint()))
            .is_none()
        {
            self.cache_order.push_back((client, tid));
        }
    }

    /// The time of the current tick, good enough for cache ageing.
    fn now_hint(&self) -> Instant {
        self.next_tick
            .map(|t| t.checked_sub(TICK).unwrap_or(t))
            .unwrap_or(self.opts.shared.start)
    }

    #[track_caller]
    fn error(&mut self, client: ClientSocket, msg: &Message<'_>, code: u16, auth: Option<&Authed>) {
        tracing::debug!(target: "kyuu::turn", method = method::name(msg.method()), code, at = %std::panic::Location::caller(), "error response");
        let resp = self.build(
            msg.method(),
            Class::Error,
            *msg.transaction_id(),
            auth.map(|a| (&a.key, a.kind)),
            |b| match auth {
                Some(_) => b.add_error(code, ""),
                None => b.add_error_bare(code),
            },
        );
        if auth.is_some() {
            self.send_cached(client, *msg.transaction_id(), resp);
        } else {
            self.send(client, resp);
        }
    }

    fn count_auth_failure(&mut self, f: AuthFailure) {
        *self.auth_failures.entry(f.label()).or_insert(0) += 1;
    }

    fn request(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let m = msg.method();
        if m == method::BINDING {
            self.binding(now, client, msg);
            return;
        }
        if crate::EXTENSION_METHODS.contains(&m) && self.opts.extension {
            self.out.push_back(Output::Extension {
                client,
                data: msg.as_bytes().to_vec(),
            });
            return;
        }
        let turn_method = matches!(
            m,
            method::ALLOCATE
                | method::REFRESH
                | method::CREATE_PERMISSION
                | method::CHANNEL_BIND
                | method::CONNECT
                | method::CONNECTION_BIND
        );
        if !turn_method || !self.cfg.enabled {
            if self.limiter.allow(client.remote.ip(), now) {
                self.error(client, msg, 400, None);
            } else {
                self.drops.rate_limited += 1;
            }
            return;
        }
        // Retransmission of a request already answered: the same answer (RFC 8489 §6.3.1).
        if let Some((resp, _)) = self.cache.get(&(client, *msg.transaction_id())) {
            let data = resp.clone();
            self.out
                .push_back(Output::Transmit(Transmit { client, data }));
            return;
        }
        if msg.integrity_kind().is_none() {
            // Without credentials only an Allocate that could succeed is challenged (the 401 is
            // several times the size of a bare request); anything else gets a small error,
            // never more bytes than a Binding answer per request byte (amplification).
            let code = match m {
                method::ALLOCATE if !msg.has(attr::REQUESTED_TRANSPORT) => Some(400),
                method::ALLOCATE => None,
                method::CONNECTION_BIND if client.transport.is_stream() => None,
                method::CONNECTION_BIND => Some(400),
                _ if self.by_client.contains_key(&client) => None,
                _ => Some(437),
            };
            if let Some(code) = code {
                if self.limiter.allow(client.remote.ip(), now) {
                    self.error(client, msg, code, None);
                } else {
                    self.drops.rate_limited += 1;
                }
                return;
            }
        }
        let Some(auth) = self.authenticate(now, client, msg) else {
            return;
        };
        let unknown: Vec<u16> = msg
            .effective_attrs()
            .map(|a| a.attr_type)
            .filter(|t| attr::is_comprehension_required(*t) && !known_turn(*t))
            .take(16)
            .collect();
        if !unknown.is_empty() {
            let resp = self.build(
                m,
                Class::Error,
                *msg.transaction_id(),
                Some((&auth.key, auth.kind)),
                |b| {
                    b.add_error(420, "")?;
                    b.add_unknown_attributes(&unknown)
                },
            );
            self.send_cached(client, *msg.transaction_id(), resp);
            return;
        }
        metrics::counter!("kyuu_turn_requests_total", "method" => method::name(m)).increment(1);
        match m {
            method::ALLOCATE => self.allocate(now, client, msg, auth),
            method::CONNECTION_BIND => self.connection_bind(now, client, msg, auth),
            _ => {
                let Some(id) = self.by_client.get(&client).copied() else {
                    self.error(client, msg, 437, Some(&auth));
                    return;
                };
                let same_user = self.alloc(id).is_some_and(|a| a.username == auth.username);
                if !same_user {
                    self.count_auth_failure(AuthFailure::UnknownUser);
                    self.error(client, msg, 441, Some(&auth));
                    return;
                }
                match m {
                    method::REFRESH => self.refresh(now, client, msg, auth, id),
                    method::CREATE_PERMISSION => self.create_permission(now, client, msg, auth, id),
                    method::CHANNEL_BIND => self.channel_bind(now, client, msg, auth, id),
                    _ => self.connect(now, client, msg, auth, id),
                }
            }
        }
    }

    fn challenge(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>, code: u16) {
        let nonce = self.nonces.issue(self.secs(now), client.remote);
        let realm = self.creds.realm().to_owned();
        let resp = self.build(
            msg.method(),
            Class::Error,
            *msg.transaction_id(),
            None,
            |b| {
                b.add_error_bare(code)?;
                b.add(attr::REALM, realm.as_bytes())?;
                b.add(attr::NONCE, &nonce)?;
                b.add_password_algorithms(&PASSWORD_ALGORITHMS)
            },
        );
        self.send(client, resp);
    }

    /// Long-term credential check (RFC 8489 §9.2.4). Answers and returns `None` on failure.
    fn authenticate(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
    ) -> Option<Authed> {
        let ip = client.remote.ip();
        let Some(kind) = msg.integrity_kind() else {
            if self.limiter.allow(ip, now) {
                self.challenge(now, client, msg, 401);
            } else {
                self.drops.rate_limited += 1;
            }
            return None;
        };
        let username = match (msg.username(), msg.get(attr::USERHASH)) {
            (Some(Ok(u)), _) => Some(u.to_owned()),
            (None, Some(h)) => self.creds.user_for_hash(h).map(str::to_owned),
            _ => None,
        };
        let realm = msg.realm();
        let nonce = msg.nonce();
        let (Some(Ok(realm)), Some(nonce)) = (realm, nonce) else {
            self.count_auth_failure(AuthFailure::Malformed);
            if self.limiter.allow(ip, now) {
                self.error(client, msg, 400, None);
            } else {
                self.drops.rate_limited += 1;
            }
            return None;
        };
        if let Err(f) = self.nonces.check(nonce, self.secs(now), client.remote) {
            self.count_auth_failure(f);
            if self.limiter.allow(ip, now) {
                self.challenge(now, client, msg, 438);
            } else {
                self.drops.rate_limited += 1;
            }
            return None;
        }
        if realm != self.creds.realm() {
            self.count_auth_failure(AuthFailure::WrongRealm);
            self.challenge(now, client, msg, 401);
            return None;
        }
        let Some(username) = username else {
            if msg.has(attr::USERHASH) {
                self.count_auth_failure(AuthFailure::UnknownUser);
                self.challenge(now, client, msg, 401);
            } else {
                self.count_auth_failure(AuthFailure::Malformed);
                self.error(client, msg, 400, None);
            }
            return None;
        };
        // PASSWORD-ALGORITHM negotiation (RFC 8489 §9.2.4 steps on PASSWORD-ALGORITHMS).
        let sha256 = match msg.get(attr::PASSWORD_ALGORITHM) {
            None => {
                if msg.has(attr::PASSWORD_ALGORITHMS) {
                    self.error(client, msg, 400, None);
                    return None;
                }
                false
            }
            Some(v) => {
                let algs_ok = msg.get(attr::PASSWORD_ALGORITHMS).is_some_and(|list| {
                    attr::decode_password_algorithms(list).is_ok_and(|l| {
                        l.iter()
                            .map(|(a, _)| *a)
                            .eq(PASSWORD_ALGORITHMS.iter().copied())
                    })
                });
                match attr::decode_password_algorithm(v) {
                    Ok((attr::PASSWORD_ALGORITHM_MD5, _)) if algs_ok => false,
                    Ok((attr::PASSWORD_ALGORITHM_SHA256, _)) if algs_ok => true,
                    _ => {
                        self.count_auth_failure(AuthFailure::Malformed);
                        self.error(client, msg, 400, None);
                        return None;
                    }
                }
            }
        };
        // Requests on an allocation this username holds keep working after a REST credential
        // expires (auth.rs `Credentials::keys`).
        let live = msg.method() != method::ALLOCATE
            && self
                .by_client
                .get(&client)
                .and_then(|id| self.alloc(*id))
                .is_some_and(|a| a.username == username);
        let keys = match self.creds.keys(&username, self.unix_now(now), live) {
            Ok(k) => k,
            Err(f) => {
                self.count_auth_failure(f);
                self.challenge(now, client, msg, 401);
                return None;
            }
        };
        let pick = |k: &UserKeys| {
            if sha256 {
                k.sha256.clone()
            } else {
                k.md5.clone()
            }
        };
        let key = keys
            .iter()
            .filter_map(pick)
            .find(|k| msg.verify_integrity(k).is_ok());
        let Some(key) = key else {
            self.count_auth_failure(AuthFailure::BadIntegrity);
            self.challenge(now, client, msg, 401);
            return None;
        };
        Some(Authed {
            username,
            key,
            kind,
        })
    }

    fn binding(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        if !self.limiter.allow(client.remote.ip(), now) {
            self.drops.rate_limited += 1;
            return;
        }
        metrics::counter!("kyuu_stun_binding_requests_total", "transport" => client.transport.label())
            .increment(1);
        let rfc5780 = self.opts.rfc5780;
        let unknown: Vec<u16> = msg
            .effective_attrs()
            .map(|a| a.attr_type)
            .filter(|t| {
                attr::is_comprehension_required(*t) && !known_binding(rfc5780.is_some(), *t)
            })
            .take(16)
            .collect();
        if !unknown.is_empty() {
            let resp = self.build(
                method::BINDING,
                Class::Error,
                *msg.transaction_id(),
                None,
                |b| {
                    b.add_error(420, "")?;
                    b.add_unknown_attributes(&unknown)
                },
            );
            self.send(client, resp);
            return;
        }
        let change = match msg.u32_attr(attr::CHANGE_REQUEST) {
            None => 0,
            Some(Ok(v)) => v,
            Some(Err(_)) => {
                self.error(client, msg, 400, None);
                return;
            }
        };
        let response_port = match msg.get(attr::RESPONSE_PORT).map(attr::decode_response_port) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                self.error(client, msg, 400, None);
                return;
            }
        };
        // CHANGE-REQUEST and RESPONSE-PORT only make sense over UDP (RFC 5780 §7.2, §7.5).
        if client.transport.is_stream()
            && (change & (attr::CHANGE_IP | attr::CHANGE_PORT) != 0 || response_port.is_some())
        {
            self.error(client, msg, 400, None);
            return;
        }
        let mut from = client.local;
        if let Some(r) = rfc5780 {
            if change & attr::CHANGE_IP != 0 {
                from.set_ip(r.swap_ip(from.ip()));
            }
            if change & attr::CHANGE_PORT != 0 {
                from.set_port(r.swap_port(from.port()));
            }
        }
        let mut to = client.remote;
        if let Some(p) = response_port {
            to.set_port(p);
        }
        let mapped = client.remote;
        let resp = self.build(
            method::BINDING,
            Class::Success,
            *msg.transaction_id(),
            None,
            |b| {
                b.add_xor_address(attr::XOR_MAPPED_ADDRESS, mapped)?;
                if let Some(r) = rfc5780 {
                    b.add_address(attr::RESPONSE_ORIGIN, from)?;
                    b.add_address(attr::OTHER_ADDRESS, r.other(client.local))?;
                }
                Ok(())
            },
        );
        self.send(
            ClientSocket {
                transport: client.transport,
                local: from,
                remote: to,
            },
            resp,
        );
    }

    // ----- TURN methods --------------------------------------------------------------------

    fn lifetime(&self, requested: Option<u32>) -> u32 {
        let d = self.cfg.default_lifetime;
        match requested {
            Some(r) => r.clamp(d, self.cfg.max_lifetime),
            None => d,
        }
    }

    fn port_used(&self, f: Family, port: u16) -> bool {
        let (w, b) = (usize::from(port) / 64, usize::from(port) % 64);
        self.used_ports[f.index()]
            .get(w)
            .is_none_or(|word| word & (1 << b) != 0)
    }

    fn mark_port(&mut self, f: Family, port: u16, used: bool) {
        let (w, b) = (usize::from(port) / 64, usize::from(port) % 64);
        if let Some(word) = self.used_ports[f.index()].get_mut(w) {
            if used {
                *word |= 1 << b;
            } else {
                *word &= !(1 << b);
            }
        }
    }

    fn release_port(&mut self, f: Family, port: u16) {
        self.mark_port(f, port, false);
    }

    /// Picks a free port in this shard's range (even with the next one free too when `even`)
    /// and marks it used.
    fn pick_port(&mut self, f: Family, even: bool) -> Option<u16> {
        let PortRange { min, max } = self.opts.ports;
        let span = u32::from(max) - u32::from(min) + 1;
        let start = (self.next_rand() % u64::from(span)) as u32;
        for i in 0..span {
            let port = (u32::from(min) + (start + i) % span) as u16;
            if even && (!port.is_multiple_of(2) || port == u16::MAX || port >= max) {
                continue;
            }
            if self.port_used(f, port) || (even && self.port_used(f, port + 1)) {
                continue;
            }
            self.mark_port(f, port, true);
            return Some(port);
        }
        None
    }

    fn quota_check_and_take(&self, username: &str, ip: IpAddr) -> Result<(), &'static str> {
        let Ok(mut q) = self.opts.shared.quotas.lock() else {
            return Err("internal");
        };
        let c = &self.cfg;
        if c.total_quota > 0 && q.total >= c.total_quota {
            return Err("total");
        }
        if c.user_quota > 0 && q.per_user.get(username).copied().unwrap_or(0) >= c.user_quota {
            return Err("user");
        }
        if c.client_quota > 0 && q.per_ip.get(&ip).copied().unwrap_or(0) >= c.client_quota {
            return Err("client");
        }
        q.total += 1;
        *q.per_user.entry(username.to_owned()).or_insert(0) += 1;
        *q.per_ip.entry(ip).or_insert(0) += 1;
        Ok(())
    }

    fn quota_release(&self, username: &str, ip: IpAddr) {
        let Ok(mut q) = self.opts.shared.quotas.lock() else {
            return;
        };
        q.total = q.total.saturating_sub(1);
        if let Some(n) = q.per_user.get_mut(username) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.per_user.remove(username);
            }
        }
        if let Some(n) = q.per_ip.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                q.per_ip.remove(&ip);
            }
        }
    }

    fn allocate(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>, auth: Authed) {
        if self.by_client.contains_key(&client) {
            self.error(client, msg, 437, Some(&auth));
            return;
        }
        let proto = match msg
            .get(attr::REQUESTED_TRANSPORT)
            .map(attr::decode_requested_transport)
        {
            Some(Ok(attr::TRANSPORT_UDP)) => RelayProto::Udp,
            Some(Ok(attr::TRANSPORT_TCP)) if client.transport.is_stream() => RelayProto::Tcp,
            Some(Ok(_)) => {
                self.error(client, msg, 442, Some(&auth));
                return;
            }
            _ => {
                self.error(client, msg, 400, Some(&auth));
                return;
            }
        };
        let token = match msg
            .get(attr::RESERVATION_TOKEN)
            .map(|v| attr::decode_u64(attr::RESERVATION_TOKEN, v))
        {
            None => None,
            Some(Ok(t)) => Some(t),
            Some(Err(_)) => {
                self.error(client, msg, 400, Some(&auth));
                return;
            }
        };
        let even = match msg.get(attr::EVEN_PORT).map(attr::decode_even_port) {
            None => None,
            Some(Ok(r)) => Some(r),
            Some(Err(_)) => {
                self.error(client, msg, 400, Some(&auth));
                return;
            }
        };
        let requested = msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|v| attr::decode_family(attr::REQUESTED_ADDRESS_FAMILY, v));
        let additional = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .map(|v| attr::decode_family(attr::ADDITIONAL_ADDRESS_FAMILY, v));
        if token.is_some() && (even.is_some() || requested.is_some()) {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        if requested.is_some() && additional.is_some() {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        let primary = match requested {
            None => Family::V4,
            Some(Ok(code)) => match family_of_code(code) {
                Some(f) => f,
                None => {
                    self.error(client, msg, 440, Some(&auth));
                    return;
                }
            },
            Some(Err(_)) => {
                self.error(client, msg, 400, Some(&auth));
                return;
            }
        };
        let want_v6_too = match additional {
            None => false,
            Some(Ok(attr::FAMILY_IPV6)) => true,
            Some(_) => {
                self.error(client, msg, 400, Some(&auth));
                return;
            }
        };
        if (want_v6_too || token.is_some()) && proto == RelayProto::Tcp {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        // Reservation token: the family and port come from the reservation.
        let (primary, reserved_port) = match token {
            Some(t) => match self
                .opts
                .shared
                .reservations
                .lock()
                .ok()
                .and_then(|mut m| m.remove(&t))
            {
                Some(r) if r.expires > now => {
                    self.reservations.remove(&t);
                    self.mark_port(r.family, r.port, true);
                    (r.family, Some(r.port))
                }
                Some(r) => {
                    if self.reservations.remove(&t).is_some() {
                        self.release_port(r.family, r.port);
                    }
                    self.error(client, msg, 508, Some(&auth));
                    return;
                }
                None => {
                    self.error(client, msg, 508, Some(&auth));
                    return;
                }
            },
            None => (primary, None),
        };
        if self.cfg.relay_ip(primary == Family::V6).is_none() {
            if let Some(p) = reserved_port {
                self.release_port(primary, p);
            }
            self.error(client, msg, 440, Some(&auth));
            return;
        }
        if let Some(alt) = self.cfg.alternate_server {
            let resp = self.build(
                method::ALLOCATE,
                Class::Error,
                *msg.transaction_id(),
                Some((&auth.key, auth.kind)),
                |b| {
                    b.add_error(300, "")?;
                    b.add_address(attr::ALTERNATE_SERVER, alt)
                },
            );
            self.send_cached(client, *msg.transaction_id(), resp);
            return;
        }
        if let Err(which) = self.quota_check_and_take(&auth.username, client.remote.ip()) {
            metrics::counter!("kyuu_turn_quota_refusals_total", "quota" => which).increment(1);
            if let Some(p) = reserved_port {
                self.release_port(primary, p);
            }
            self.error(client, msg, 486, Some(&auth));
            return;
        }
        let lifetime = self.lifetime(match msg.u32_attr(attr::LIFETIME) {
            Some(Ok(l)) => Some(l),
            _ => None,
        });
        // Ports.
        let mut new_token = None;
        let port = match reserved_port {
            Some(p) => Some(p),
            None => {
                let p = self.pick_port(primary, even.is_some());
                if let (Some(p), Some(true)) = (p, even) {
                    self.mark_port(primary, p + 1, true);
                    let t = self.next_rand() ^ self.opts.seed.rotate_left(17);
                    let r = Reservation {
                        family: primary,
                        port: p + 1,
                        expires: now + RESERVATION_LIFETIME,
                    };
                    self.reservations.insert(t, r);
                    if let Ok(mut m) = self.opts.shared.reservations.lock() {
                        m.insert(t, r);
                    }
                    new_token = Some(t);
                }
                p
            }
        };
        let Some(port) = port else {
            self.quota_release(&auth.username, client.remote.ip());
            self.error(client, msg, 508, Some(&auth));
            return;
        };
        let mut relays = [None, None];
        relays[primary.index()] = Some(RelaySlot {
            port,
            bound: None,
            attempts: 0,
        });
        let mut address_error = None;
        if want_v6_too && primary == Family::V4 {
            if self.cfg.relay_ipv6.is_some() {
                if let Some(p6) = self.pick_port(Family::V6, false) {
                    relays[1] = Some(RelaySlot {
                        port: p6,
                        bound: None,
                        attempts: 0,
                    });
                } else {
                    address_error = Some((attr::FAMILY_IPV6, 508));
                }
            } else {
                address_error = Some((attr::FAMILY_IPV6, 440));
            }
        }
        let waiting = relays.iter().flatten().count() as u8;
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.slots.push((0, None));
                (self.slots.len() - 1) as u32
            }
        };
        let generation = self.slots.get(slot as usize).map_or(0, |s| s.0);
        let id = AllocId { slot, generation };
        let alloc = Allocation {
            id,
            client,
            username: auth.username,
            proto,
            relays,
            created: now,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            perms: Vec::new(),
            channels: Vec::new(),
            pending: Some(PendingAllocate {
                tid: *msg.transaction_id(),
                kind: auth.kind,
                key: auth.key,
                lifetime,
                token: new_token,
                address_error,
                waiting,
            }),
            stats: Stats::default(),
            flushed: Stats::default(),
            buckets: [(self.cfg.max_bps as f64, now); 2],
        };
        if let Some(s) = self.slots.get_mut(slot as usize) {
            s.1 = Some(alloc);
        }
        self.by_client.insert(client, id);
        for f in [Family::V4, Family::V6] {
            let Some(r) = relays[f.index()] else { continue };
            let Some(ip) = self.cfg.relay_ip(f == Family::V6) else {
                continue;
            };
            self.out.push_back(Output::BindRelay {
                key: RelayKey {
                    alloc: id,
                    family: f,
                },
                addr: SocketAddr::new(ip, r.port),
                proto,
            });
        }
        metrics::counter!("kyuu_turn_allocations_total", "transport" => client.transport.label())
            .increment(1);
    }

    fn maybe_finish_allocate(&mut self, now: Instant, id: AllocId) {
        let cfg_adv = |cfg: &TurnConfig, a: SocketAddr| cfg.advertised(a);
        let Some(alloc) = self.alloc_mut(id) else {
            return;
        };
        if alloc.pending.as_ref().is_none_or(|p| p.waiting > 0) {
            return;
        }
        let Some(p) = alloc.pending.take() else {
            return;
        };
        let client = alloc.client;
        let relayed: Vec<SocketAddr> = [Family::V4, Family::V6]
            .iter()
            .filter_map(|f| alloc.relayed(*f))
            .collect();
        alloc.expires = now + Duration::from_secs(u64::from(p.lifetime));
        let relayed: Vec<SocketAddr> = relayed.into_iter().map(|a| cfg_adv(&self.cfg, a)).collect();
        let resp = self.build(
            method::ALLOCATE,
            Class::Success,
            p.tid,
            Some((&p.key, p.kind)),
            |b| {
                for a in &relayed {
                    b.add_xor_address(attr::XOR_RELAYED_ADDRESS, *a)?;
                }
                if let Some((fam, code)) = p.address_error {
                    b.add_address_error(fam, code, "")?;
                }
                b.add_u32(attr::LIFETIME, p.lifetime)?;
                if let Some(t) = p.token {
                    b.add_u64(attr::RESERVATION_TOKEN, t)?;
                }
                b.add_xor_address(attr::XOR_MAPPED_ADDRESS, client.remote)
            },
        );
        self.send_cached(client, p.tid, resp);
    }

    fn fail_pending(&mut self, now: Instant, id: AllocId, code: u16) {
        let Some(alloc) = self.alloc_mut(id) else {
            return;
        };
        let Some(p) = alloc.pending.take() else {
            return;
        };
        let client = alloc.client;
        let resp = self.build(
            method::ALLOCATE,
            Class::Error,
            p.tid,
            Some((&p.key, p.kind)),
            |b| b.add_error(code, ""),
        );
        self.send_cached(client, p.tid, resp);
        self.delete_allocation(now, id, "relay bind failed");
    }

    fn delete_allocation(&mut self, now: Instant, id: AllocId, why: &str) {
        let Some((generation, slot)) = self.slots.get_mut(id.slot as usize) else {
            return;
        };
        if *generation != id.generation {
            return;
        }
        let Some(mut a) = slot.take() else { return };
        *generation = generation.wrapping_add(1);
        self.free.push(id.slot);
        self.by_client.remove(&a.client);
        for f in [Family::V4, Family::V6] {
            if let Some(r) = a.relays[f.index()] {
                self.release_port(f, r.port);
                if r.bound.is_some() {
                    self.out.push_back(Output::CloseRelay {
                        key: RelayKey {
                            alloc: id,
                            family: f,
                        },
                    });
                }
            }
        }
        let conns: Vec<u32> = self
            .conns
            .iter()
            .filter(|(_, c)| c.alloc == id)
            .map(|(k, _)| *k)
            .collect();
        for c in conns {
            self.conns.remove(&c);
            self.out
                .push_back(Output::ClosePeerConnection { connection_id: c });
        }
        self.quota_release(&a.username, a.client.remote.ip());
        flush_stats(&mut a);
        let s = a.stats;
        tracing::info!(
            target: "kyuu::turn",
            client = %a.client.remote,
            transport = a.client.transport.label(),
            user = %a.username,
            relayed_v4 = ?a.relayed(Family::V4),
            relayed_v6 = ?a.relayed(Family::V6),
            duration_s = now.saturating_duration_since(a.created).as_secs_f64(),
            to_peer_packets = s.to_peer_pkts,
            to_peer_bytes = s.to_peer_bytes,
            to_client_packets = s.to_client_pkts,
            to_client_bytes = s.to_client_bytes,
            reason = why,
            "allocation ended"
        );
    }

    fn refresh(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
    ) {
        if let Some(v) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let fam = attr::decode_family(attr::REQUESTED_ADDRESS_FAMILY, v)
                .ok()
                .and_then(family_of_code);
            let ok = fam.is_some_and(|f| self.alloc(id).is_some_and(|a| a.has_family(f)));
            if !ok {
                self.error(client, msg, 443, Some(&auth));
                return;
            }
        }
        let requested = match msg.u32_attr(attr::LIFETIME) {
            Some(Ok(l)) => Some(l),
            Some(Err(_)) => {
                self.error(client, msg, 400, Some(&auth));
                return;
            }
            None => None,
        };
        let lifetime = if requested == Some(0) {
            0
        } else {
            self.lifetime(requested)
        };
        let resp = self.build(
            method::REFRESH,
            Class::Success,
            *msg.transaction_id(),
            Some((&auth.key, auth.kind)),
            |b| b.add_u32(attr::LIFETIME, lifetime),
        );
        if lifetime == 0 {
            self.delete_allocation(now, id, "refreshed to zero");
        } else if let Some(a) = self.alloc_mut(id) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
        }
        self.send_cached(client, *msg.transaction_id(), resp);
    }

    /// Checks a peer address against the allocation's families (443) and the policy (403).
    fn check_peer(&mut self, id: AllocId, peer: SocketAddr) -> Result<(), u16> {
        let Some(a) = self.alloc(id) else {
            return Err(437);
        };
        if !a.has_family(Family::of(&peer)) {
            return Err(443);
        }
        if !self.policy.permits(peer.ip()) {
            self.drops.forbidden_peer += 1;
            metrics::counter!("kyuu_turn_forbidden_peers_total").increment(1);
            return Err(403);
        }
        Ok(())
    }

    fn create_permission(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
    ) {
        let mut peers = Vec::new();
        for p in msg.xor_peer_addresses() {
            match p {
                Ok(p) => peers.push(p),
                Err(_) => {
                    self.error(client, msg, 400, Some(&auth));
                    return;
                }
            }
        }
        if peers.is_empty() {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        for p in &peers {
            if let Err(code) = self.check_peer(id, *p) {
                self.error(client, msg, code, Some(&auth));
                return;
            }
        }
        let max = self.cfg.max_permissions as usize;
        let Some(a) = self.alloc_mut(id) else { return };
        let new = peers
            .iter()
            .filter(|p| !a.perms.iter().any(|(ip, _)| *ip == p.ip()))
            .count();
        if a.perms.len() + new > max {
            self.error(client, msg, 508, Some(&auth));
            return;
        }
        for p in &peers {
            a.add_permission(p.ip(), now + PERMISSION_LIFETIME);
        }
        self.reply_ok(client, msg, method::CREATE_PERMISSION, &auth);
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
    ) {
        let number = msg
            .get(attr::CHANNEL_NUMBER)
            .and_then(|v| attr::decode_channel_number(v).ok())
            .filter(|n| (kyuu_stun::CHANNEL_MIN..=CHANNEL_MAX_COMPAT).contains(n));
        let peer = msg.xor_address(attr::XOR_PEER_ADDRESS);
        let (Some(number), Some(Ok(peer))) = (number, peer) else {
            self.error(client, msg, 400, Some(&auth));
            return;
        };
        if self.alloc(id).is_some_and(|a| a.proto != RelayProto::Udp) {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        if let Err(code) = self.check_peer(id, peer) {
            self.error(client, msg, code, Some(&auth));
            return;
        }
        let max = self.cfg.max_permissions as usize;
        let Some(a) = self.alloc_mut(id) else { return };
        let conflict = a.channels.iter().any(|c| {
            c.expires + CHANNEL_COOLDOWN > now && ((c.number == number) != (c.peer == peer))
        });
        let new_perm = !a.perms.iter().any(|(ip, _)| *ip == peer.ip());
        if conflict || (new_perm && a.perms.len() >= max) {
            let code = if conflict { 400 } else { 508 };
            self.error(client, msg, code, Some(&auth));
            return;
        }
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => {
                c.peer = peer;
                c.expires = now + CHANNEL_LIFETIME;
            }
            None => a.channels.push(Channel {
                number,
                peer,
                expires: now + CHANNEL_LIFETIME,
            }),
        }
        a.add_permission(peer.ip(), now + PERMISSION_LIFETIME);
        self.reply_ok(client, msg, method::CHANNEL_BIND, &auth);
    }

    fn connect(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
    ) {
        let Some(Ok(peer)) = msg.xor_address(attr::XOR_PEER_ADDRESS) else {
            self.error(client, msg, 400, Some(&auth));
            return;
        };
        if self.alloc(id).is_some_and(|a| a.proto != RelayProto::Tcp) {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        if let Err(code) = self.check_peer(id, peer) {
            self.error(client, msg, code, Some(&auth));
            return;
        }
        if self.conns.values().any(|c| c.alloc == id && c.peer == peer) {
            self.error(client, msg, 446, Some(&auth));
            return;
        }
        let connection_id = self.new_connection_id();
        if let Some(a) = self.alloc_mut(id) {
            // A Connect implies a permission for the peer (RFC 6062 §5.2).
            a.add_permission(peer.ip(), now + PERMISSION_LIFETIME);
        }
        self.conns.insert(
            connection_id,
            PeerConn {
                alloc: id,
                peer,
                state: PeerConnState::Connecting {
                    tid: *msg.transaction_id(),
                    kind: auth.kind,
                    key: auth.key,
                },
                expires: now + CONNECTION_BIND_TIMEOUT,
            },
        );
        self.out.push_back(Output::ConnectPeer {
            key: RelayKey {
                alloc: id,
                family: Family::of(&peer),
            },
            connection_id,
            peer: PeerAddr(peer),
        });
    }

    fn connection_bind(
        &mut self,
        _now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
    ) {
        if !client.transport.is_stream() || self.by_client.contains_key(&client) {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        let Some(Ok(connection_id)) = msg.u32_attr(attr::CONNECTION_ID) else {
            self.error(client, msg, 400, Some(&auth));
            return;
        };
        let Some(conn) = self.conns.get(&connection_id) else {
            self.error(client, msg, 400, Some(&auth));
            return;
        };
        if conn.state != PeerConnState::Ready {
            self.error(client, msg, 400, Some(&auth));
            return;
        }
        let owner = self.alloc(conn.alloc).map(|a| a.username.clone());
        if owner.as_deref() != Some(auth.username.as_str()) {
            self.error(client, msg, 441, Some(&auth));
            return;
        }
        self.conns.remove(&connection_id);
        let resp = self.build(
            method::CONNECTION_BIND,
            Class::Success,
            *msg.transaction_id(),
            Some((&auth.key, auth.kind)),
            |_| Ok(()),
        );
        self.send(client, resp);
        self.out.push_back(Output::SpliceConnection {
            client,
            connection_id,
        });
    }
}

/// ChannelData with the RFC 5766 channel range (see [`CHANNEL_MAX_COMPAT`]); trailing bytes
/// (UDP or stream padding) are ignored.
fn parse_channel_data(buf: &[u8]) -> Option<ChannelData<'_>> {
    let head = buf.get(..4)?;
    let channel = u16::from_be_bytes([head[0], head[1]]);
    if !(kyuu_stun::CHANNEL_MIN..=CHANNEL_MAX_COMPAT).contains(&channel) {
        return None;
    }
    let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
    let data = buf.get(4..4 + len)?;
    Some(ChannelData { channel, data })
}

fn flush_stats(a: &mut Allocation) {
    let t = a.client.transport.label();
    let (s, f) = (a.stats, &mut a.flushed);
    if s.to_peer_pkts > f.to_peer_pkts {
        metrics::counter!("kyuu_turn_relayed_packets_total", "direction" => "to_peer", "transport" => t)
            .increment(s.to_peer_pkts - f.to_peer_pkts);
        metrics::counter!("kyuu_turn_relayed_bytes_total", "direction" => "to_peer", "transport" => t)
            .increment(s.to_peer_bytes - f.to_peer_bytes);
    }
    if s.to_client_pkts > f.to_client_pkts {
        metrics::counter!("kyuu_turn_relayed_packets_total", "direction" => "to_client", "transport" => t)
            .increment(s.to_client_pkts - f.to_client_pkts);
        metrics::counter!("kyuu_turn_relayed_bytes_total", "direction" => "to_client", "transport" => t)
            .increment(s.to_client_bytes - f.to_client_bytes);
    }
    *f = s;
}
