//! The sans-IO RAWR node: Exchange, Register, Connect and Cancel as specified in `docs/rawr.md` §4.
//!
//! Contract (as in str0m): after every input ([`Node::handle_input`], [`Node::handle_timeout`],
//! [`Node::set_neighbours`]) drain [`Node::poll_output`] until it returns `None`, then sleep until
//! [`Node::poll_timeout`]. The node never reads a clock or a socket: time comes in as `now`, the
//! neighbour table comes in through [`Node::set_neighbours`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use kyuu_stun::integrity::Key;
use kyuu_stun::{Class, Message, TransactionId};
use rand::{Rng, SeedableRng};

use crate::config::{Limits, RawrConfig};
use crate::cred;
use crate::txn::{Txn, TxnPoll};
use crate::wire::{self, code, method, Auth, ConnectReq, Mac, Relay, Request};

/// How long a final answer is kept to re-send on a retransmitted request.
const ANSWER_CACHE: Duration = Duration::from_secs(10);
const ANSWER_CACHE_MAX: usize = 4096;
/// Holders of one direction (the same peer reached through different routes, e.g. after a fallback).
const MAX_HOLDERS: usize = 4;

/// What the node asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `data` to `to`. `upstream` is set for the node's own requests (Connect and Cancel
    /// toward its gateway or a root), which a shell sharing the STUN port may send from a socket
    /// of its own; answers and pending indications go back the way the request came.
    Transmit {
        to: SocketAddr,
        data: Vec<u8>,
        upstream: bool,
    },
    /// A session paired here: the TURN server MAY install permissions between the allocations
    /// made with these two usernames and forward between them in-process, and enforces the
    /// session's limits (`max_bytes` per side, 0 unlimited; `max_secs`, 0 unlimited), telling
    /// the node through [`Node::session_exhausted`] when one is reached.
    Paired {
        tag: String,
        usernames: [String; 2],
        max_bytes: u64,
        max_secs: u64,
    },
}

/// What a fleet shell does with a request before the node sees it (`docs/rawr.md` §4.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FleetRoute {
    /// A request the session's root holds (Exchange, or Connect naming this node as ROOT):
    /// claim the session for this node unless another fleet node holds it.
    Claim(Vec<u8>),
    /// A Cancel: only follow an existing claim.
    Lookup(Vec<u8>),
}

/// Counters and gauges, for tests ("no state left behind") and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub pending: usize,
    pub upstream: usize,
    pub exchanges: usize,
    pub registrations: usize,
    pub paired: u64,
    pub forwarded: u64,
    /// Pairings remembered to answer a late Connect of the same side (§4.3, re-pair).
    pub recent: usize,
}

/// (session, MAC, TARGET-MAC); `None` is the wildcard target.
type DirKey = (Vec<u8>, Mac, Option<Mac>);

#[derive(Debug, Clone)]
struct Holder {
    src: SocketAddr,
    tid: TransactionId,
    /// The linked child this came from, whose key protects the answer.
    link: Option<String>,
}

#[derive(Debug, Clone)]
enum Stage {
    /// At the root: wait for the partner.
    Held,
    /// Rule 2: the target is local; wait for its Connect until `until`.
    Local { until: Instant },
    /// Forwarded upstream on transaction `tid`.
    Forwarded { tid: TransactionId },
}

#[derive(Debug, Clone)]
struct Pending {
    holders: Vec<Holder>,
    req: ConnectReq,
    expires: Instant,
    stage: Stage,
}

#[derive(Debug, Clone)]
enum UpKind {
    Connect(DirKey),
    Cancel,
}

#[derive(Debug, Clone)]
struct Upstream {
    txn: Txn,
    kind: UpKind,
    key: Option<Key>,
}

/// A session relayed here (§4.6).
#[derive(Debug, Clone)]
struct Reservation {
    /// Per-peer (source IP) and per-link (child name) keys it counts against.
    peers: Vec<IpAddr>,
    links: Vec<String>,
    expires: Instant,
    session: Vec<u8>,
    macs: [Mac; 2],
    /// Where the requests would have gone above (gateway, or the root named), for withdrawing
    /// the re-pair records there when the session is used up here.
    up: Option<(SocketAddr, Option<Key>)>,
}

/// A side that paired (§4.3 re-pair).
#[derive(Debug, Clone)]
struct Recent {
    /// The other side's MAC, when known.
    partner: Option<Mac>,
    kind: RecentKind,
    expires: Instant,
}

#[derive(Debug, Clone)]
enum RecentKind {
    /// Paired at this node: mint fresh credentials.
    Here { at_root: bool },
    /// Paired at a node below, which told us in its Cancel: hand out that relay. `up` is where
    /// this node had forwarded the request (to pass a withdrawal on).
    Below {
        relay: Relay,
        up: Option<(SocketAddr, Option<Key>)>,
    },
}

#[derive(Debug, Clone)]
struct Side {
    mac: Mac,
    hosts: Vec<SocketAddr>,
    src_ip: IpAddr,
    held: Option<(SocketAddr, TransactionId, Instant)>,
}

#[derive(Debug, Clone)]
struct ExchangeState {
    sides: Vec<Side>,
    expires: Instant,
}

/// A RAWR node.
pub struct Node {
    name: String,
    self_addrs: Vec<SocketAddr>,
    relay: Vec<String>,
    secret: String,
    gateway: Option<(SocketAddr, Option<Key>)>,
    children: HashMap<String, Key>,
    require_links: bool,
    limits: Limits,
    base: Instant,
    base_unix: u64,
    rng: rand::rngs::StdRng,

    neighbours: HashSet<Mac>,
    pending: HashMap<DirKey, Pending>,
    upstream: HashMap<TransactionId, Upstream>,
    exchanges: HashMap<Vec<u8>, ExchangeState>,
    registrations: HashMap<Mac, (IpAddr, Instant)>,
    answered: HashMap<(SocketAddr, TransactionId), (Vec<u8>, Instant)>,
    /// Sides paired here or below, by `(session, MAC)`: a Connect from that side arriving
    /// later (its first answer was lost with a dead node below, or it fell back by another
    /// route) is answered at once (§4.3, re-pair).
    recent: HashMap<(Vec<u8>, Mac), Recent>,
    /// Sessions relayed here: tag → (per-peer key, per-link key, expiry) (§4.6).
    reservations: HashMap<String, Reservation>,
    /// Sessions whose limit was reached here: tag → expiry. Their Connects get 470.
    exhausted: HashMap<String, Instant>,
    out: VecDeque<Output>,
    paired: u64,
    forwarded: u64,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("name", &self.name)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// A node from its config. `now`/`unix_now` anchor the monotonic clock to wall time for
    /// credential expiry; `seed` feeds transaction ids.
    pub fn new(cfg: &RawrConfig, now: Instant, unix_now: u64, seed: u64) -> Node {
        Node {
            name: cfg.name.clone(),
            self_addrs: cfg.self_addresses(),
            relay: cfg.relay.clone(),
            secret: cfg.secret.clone(),
            gateway: cfg
                .gateway
                .as_ref()
                .map(|g| (g.addr, g.key.as_deref().map(Key::short_term))),
            children: cfg
                .children
                .iter()
                .map(|c| (c.name.clone(), Key::short_term(&c.key)))
                .collect(),
            require_links: cfg.require_links,
            limits: cfg.limits.clone(),
            base: now,
            base_unix: unix_now,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            neighbours: HashSet::new(),
            pending: HashMap::new(),
            upstream: HashMap::new(),
            exchanges: HashMap::new(),
            registrations: HashMap::new(),
            answered: HashMap::new(),
            recent: HashMap::new(),
            reservations: HashMap::new(),
            exhausted: HashMap::new(),
            out: VecDeque::new(),
            paired: 0,
            forwarded: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the neighbour-table snapshot (MACs on the node's served networks).
    pub fn set_neighbours(&mut self, macs: impl IntoIterator<Item = Mac>) {
        self.neighbours = macs.into_iter().collect();
    }

    pub fn stats(&self) -> Stats {
        Stats {
            pending: self.pending.len(),
            upstream: self.upstream.len(),
            exchanges: self.exchanges.len(),
            registrations: self.registrations.len(),
            paired: self.paired,
            forwarded: self.forwarded,
            recent: self.recent.len(),
        }
    }

    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Whether `data` is something this node handles (a RAWR message, or a response to one of
    /// its own requests). The STUN shell uses the method range instead.
    pub fn wants(data: &[u8]) -> bool {
        Message::parse(data).is_ok_and(|m| method::is_rawr(m.method()))
    }

    /// Whether handling `data` will consult the neighbour table (rule 2): a Connect request that
    /// neither pairs nor repeats a pending one, for a target not already known to be local. The
    /// shell refreshes its snapshot only then, keeping the pairing path fast.
    pub fn needs_neighbours(&self, data: &[u8]) -> bool {
        let Ok(m) = Message::parse(data) else {
            return false;
        };
        if m.class() != Class::Request || m.method() != method::CONNECT {
            return false;
        }
        let Ok(Request::Connect(c)) = Request::decode(&m) else {
            return false;
        };
        let Some(target) = c.target else {
            // A wildcard never takes rule 2.
            return false;
        };
        let key: DirKey = (c.session.clone(), c.mac, c.target);
        !(self.pending.contains_key(&key)
            || self.find_partner(&c).is_some()
            || self.is_local(target))
    }

    /// Whether `data` is a request the session's root handles, and so belongs to the fleet node
    /// that holds the session (`docs/rawr.md` §4.7). `None` for everything else (answers,
    /// Register, Connects this node forwards, malformed requests: the node handles them).
    pub fn fleet_route(&self, data: &[u8]) -> Option<FleetRoute> {
        let m = Message::parse(data).ok()?;
        if m.class() != Class::Request || !method::is_rawr(m.method()) {
            return None;
        }
        match Request::decode(&m).ok()? {
            Request::Exchange { session, .. } => Some(FleetRoute::Claim(session)),
            Request::Connect(c) if self.is_self(c.root) => Some(FleetRoute::Claim(c.session)),
            Request::Cancel { session, .. } => Some(FleetRoute::Lookup(session)),
            _ => None,
        }
    }

    /// The request `data` as the fleet node `owner` (one of its own addresses) must receive it
    /// to hold it as the session's root: a Connect is re-encoded with ROOT = `owner` (and, from
    /// a linked child, signed again with that child's key, which fleet nodes share); other
    /// requests go unchanged. `None` when a linked request fails its integrity check (the node
    /// answers it 401 itself).
    pub fn fleet_forward(&self, data: &[u8], owner: SocketAddr) -> Option<Vec<u8>> {
        let m = Message::parse(data).ok()?;
        if m.method() != method::CONNECT {
            return Some(data.to_vec());
        }
        let Request::Connect(mut c) = Request::decode(&m).ok()? else {
            return None;
        };
        c.root = owner;
        let user = match m.username() {
            None if m.integrity_kind().is_some() => return None,
            None => None,
            Some(u) => Some(u.ok()?),
        };
        let key = match user {
            Some(u) => {
                let key = self.children.get(u)?;
                m.verify_integrity(key).ok()?;
                Some(key)
            }
            None => None,
        };
        let auth = key.map(|key| Auth {
            username: user,
            key,
        });
        Some(wire::encode_connect(*m.transaction_id(), &c, auth.as_ref()))
    }

    /// The pending direction that pairs with `c` (rule 1): same session, the other MAC, and
    /// each side's TARGET-MAC either absent (wildcard) or naming the other.
    fn find_partner(&self, c: &ConnectReq) -> Option<DirKey> {
        if let Some(t) = c.target {
            let exact: DirKey = (c.session.clone(), t, Some(c.mac));
            if self.pending.contains_key(&exact) {
                return Some(exact);
            }
        }
        self.pending
            .keys()
            .find(|(s, m, t)| {
                *s == c.session
                    && *m != c.mac
                    && c.target.is_none_or(|ct| ct == *m)
                    && t.is_none_or(|pt| pt == c.mac)
            })
            .cloned()
    }

    /// The earliest time [`Node::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t: Option<Instant> = None;
        let mut at = |i: Instant| t = Some(t.map_or(i, |x| x.min(i)));
        for p in self.pending.values() {
            at(p.expires);
            if let Stage::Local { until } = p.stage {
                at(until);
            }
        }
        for u in self.upstream.values() {
            at(u.txn.deadline());
        }
        for e in self.exchanges.values() {
            at(e.expires);
            for s in &e.sides {
                if let Some((_, _, until)) = s.held {
                    at(until);
                }
            }
        }
        for (_, exp) in self.registrations.values() {
            at(*exp);
        }
        for (_, exp) in self.answered.values() {
            at(*exp);
        }
        for r in self.recent.values() {
            at(r.expires);
        }
        for r in self.reservations.values() {
            at(r.expires);
        }
        for exp in self.exhausted.values() {
            at(*exp);
        }
        t
    }

    fn unix(&self, now: Instant) -> u64 {
        self.base_unix + now.saturating_duration_since(self.base).as_secs()
    }

    fn new_tid(&mut self) -> TransactionId {
        TransactionId(self.rng.gen())
    }

    fn is_self(&self, addr: SocketAddr) -> bool {
        self.self_addrs.contains(&addr)
    }

    fn key_for(&self, link: Option<&str>) -> Option<Key> {
        link.and_then(|l| self.children.get(l)).cloned()
    }

    fn send(&mut self, to: SocketAddr, data: Vec<u8>) {
        if !data.is_empty() {
            self.out.push_back(Output::Transmit {
                to,
                data,
                upstream: false,
            });
        }
    }

    fn send_up(&mut self, to: SocketAddr, data: Vec<u8>) {
        if !data.is_empty() {
            self.out.push_back(Output::Transmit {
                to,
                data,
                upstream: true,
            });
        }
    }

    /// Sends a final answer and remembers it for retransmissions.
    fn answer(&mut self, now: Instant, to: SocketAddr, tid: TransactionId, data: Vec<u8>) {
        if self.answered.len() < ANSWER_CACHE_MAX {
            self.answered
                .insert((to, tid), (data.clone(), now + ANSWER_CACHE));
        }
        self.send(to, data);
    }

    #[allow(clippy::too_many_arguments)]
    fn answer_error(
        &mut self,
        now: Instant,
        to: SocketAddr,
        m: u16,
        tid: TransactionId,
        link: Option<&str>,
        err: u16,
        reason: &str,
    ) {
        let key = self.key_for(link);
        let auth = key.as_ref().map(|key| Auth {
            username: None,
            key,
        });
        let data = wire::encode_error(m, tid, err, reason, &[], auth.as_ref());
        self.answer(now, to, tid, data);
    }

    /// Feeds one datagram received on the node's port from `from`.
    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Ok(m) = Message::parse(data) else {
            return;
        };
        match m.class() {
            Class::Request => self.handle_request(now, from, &m),
            Class::Success | Class::Error => self.handle_answer(now, &m),
            Class::Indication => {
                if let Some(u) = self.upstream.get_mut(m.transaction_id()) {
                    if u.txn.to == from {
                        u.txn.heard(now);
                    }
                }
            }
        }
    }

    fn handle_request(&mut self, now: Instant, from: SocketAddr, m: &Message<'_>) {
        let tid = *m.transaction_id();
        if m.method() == kyuu_stun::method::BINDING {
            let data = wire::encode_binding_answer(tid, from);
            self.send(from, data);
            return;
        }
        if !method::is_rawr(m.method()) {
            let data = wire::encode_error(m.method(), tid, code::BAD_REQUEST, "", &[], None);
            self.send(from, data);
            return;
        }
        if let Some((data, _)) = self.answered.get(&(from, tid)) {
            let data = data.clone();
            self.send(from, data);
            return;
        }
        // Link authentication (§7).
        let link = match m.username() {
            None if m.integrity_kind().is_some() => {
                self.answer_error(now, from, m.method(), tid, None, code::UNAUTHENTICATED, "");
                return;
            }
            None => None,
            Some(user) => {
                let Ok(user) = user else {
                    self.answer_error(now, from, m.method(), tid, None, code::BAD_REQUEST, "");
                    return;
                };
                let Some(key) = self.children.get(user) else {
                    self.answer_error(
                        now,
                        from,
                        m.method(),
                        tid,
                        None,
                        code::UNAUTHENTICATED,
                        "unknown child",
                    );
                    return;
                };
                if m.verify_integrity(key).is_err() {
                    self.answer_error(now, from, m.method(), tid, None, code::UNAUTHENTICATED, "");
                    return;
                }
                Some(user.to_owned())
            }
        };
        let req = match Request::decode(m) {
            Ok(r) => r,
            Err(e) => {
                let unknown = match &e {
                    wire::WireError::Unknown(u) => u.clone(),
                    _ => Vec::new(),
                };
                let key = self.key_for(link.as_deref());
                let auth = key.as_ref().map(|key| Auth {
                    username: None,
                    key,
                });
                let data = wire::encode_error(
                    m.method(),
                    tid,
                    e.code(),
                    &e.to_string(),
                    &unknown,
                    auth.as_ref(),
                );
                self.answer(now, from, tid, data);
                return;
            }
        };
        match req {
            Request::Exchange {
                session,
                mac,
                hosts,
            } => self.on_exchange(now, from, tid, session, mac, hosts),
            Request::Register { mac, lifetime } => self.on_register(now, from, tid, mac, lifetime),
            Request::Connect(c) => {
                if self.require_links && link.is_none() && !c.path.is_empty() {
                    self.answer_error(now, from, method::CONNECT, tid, None, code::FORBIDDEN, "");
                    return;
                }
                self.on_connect(now, from, tid, c, link);
            }
            Request::Cancel {
                session,
                mac,
                target,
                relay,
            } => {
                if self.require_links && link.is_none() {
                    self.answer_error(now, from, method::CANCEL, tid, None, code::FORBIDDEN, "");
                    return;
                }
                self.on_cancel(now, from, tid, (session, mac, target), relay, link);
            }
        }
    }

    // ---- Exchange (§4.1) ----

    fn on_exchange(
        &mut self,
        now: Instant,
        from: SocketAddr,
        tid: TransactionId,
        session: Vec<u8>,
        mac: Mac,
        hosts: Vec<SocketAddr>,
    ) {
        let hold = now + self.limits.exchange_hold();
        let expires = now + self.limits.exchange_linger();
        if !self.exchanges.contains_key(&session) {
            let from_src = self
                .exchanges
                .values()
                .filter(|e| e.sides.iter().any(|s| s.src_ip == from.ip()))
                .count();
            if self.exchanges.len() >= self.limits.max_exchange {
                self.answer_error(now, from, method::EXCHANGE, tid, None, code::CAPACITY, "");
                return;
            }
            if from_src >= self.limits.max_exchange_per_source {
                self.answer_error(now, from, method::EXCHANGE, tid, None, code::QUOTA, "");
                return;
            }
            self.exchanges.insert(
                session.clone(),
                ExchangeState {
                    sides: Vec::new(),
                    expires,
                },
            );
        }
        let Some(st) = self.exchanges.get_mut(&session) else {
            return;
        };
        st.expires = expires;
        let mut sends = Vec::new();
        let mut full = false;
        if let Some(i) = st.sides.iter().position(|s| s.mac == mac) {
            let other = st.sides.iter().find(|s| s.mac != mac).cloned();
            if let Some(side) = st.sides.get_mut(i) {
                side.hosts = hosts;
                side.src_ip = from.ip();
                match other {
                    Some(o) => {
                        side.held = None;
                        sends.push((from, tid, o.mac, o.hosts, true));
                    }
                    None => {
                        side.held = Some((from, tid, hold));
                        sends.push((from, tid, mac, Vec::new(), false));
                    }
                }
            }
        } else if st.sides.len() >= 2 {
            full = true;
        } else if let Some(first) = st.sides.first_mut() {
            // The second MAC: answer both.
            if let Some((to, t, _)) = first.held.take() {
                sends.push((to, t, mac, hosts.clone(), true));
            }
            sends.push((from, tid, first.mac, first.hosts.clone(), true));
            st.sides.push(Side {
                mac,
                hosts,
                src_ip: from.ip(),
                held: None,
            });
        } else {
            st.sides.push(Side {
                mac,
                hosts,
                src_ip: from.ip(),
                held: Some((from, tid, hold)),
            });
            sends.push((from, tid, mac, Vec::new(), false));
        }
        if full {
            self.answer_error(
                now,
                from,
                method::EXCHANGE,
                tid,
                None,
                code::SESSION_FULL,
                "",
            );
            return;
        }
        for (to, t, other, hosts, done) in sends {
            if done {
                let data = wire::encode_exchange_answer(t, other, &hosts);
                self.answer(now, to, t, data);
            } else {
                let data = wire::encode_pending(method::EXCHANGE, t);
                self.send(to, data);
            }
        }
    }

    // ---- Register (§4.2) ----

    fn on_register(
        &mut self,
        now: Instant,
        from: SocketAddr,
        tid: TransactionId,
        mac: Mac,
        lifetime: Option<u32>,
    ) {
        let lifetime = lifetime
            .unwrap_or(self.limits.register_lifetime_s)
            .min(self.limits.register_max_lifetime_s);
        if lifetime == 0 {
            self.registrations.remove(&mac);
        } else {
            if !self.registrations.contains_key(&mac) {
                if self.registrations.len() >= self.limits.max_register {
                    self.answer_error(now, from, method::REGISTER, tid, None, code::CAPACITY, "");
                    return;
                }
                let n = self
                    .registrations
                    .values()
                    .filter(|(ip, _)| *ip == from.ip())
                    .count();
                if n >= self.limits.max_register_per_source {
                    self.answer_error(now, from, method::REGISTER, tid, None, code::QUOTA, "");
                    return;
                }
            }
            self.registrations.insert(
                mac,
                (from.ip(), now + Duration::from_secs(u64::from(lifetime))),
            );
        }
        let data = wire::encode_register_answer(tid, lifetime);
        self.answer(now, from, tid, data);
    }

    fn is_local(&self, mac: Mac) -> bool {
        self.neighbours.contains(&mac) || self.registrations.contains_key(&mac)
    }

    // ---- Connect (§4.3) ----

    fn on_connect(
        &mut self,
        now: Instant,
        from: SocketAddr,
        tid: TransactionId,
        c: ConnectReq,
        link: Option<String>,
    ) {
        if c.path.contains(&self.name) {
            let mut reason = if c.path.last() == Some(&self.name) {
                // It forwarded to itself: the named ROOT is this node under an address that
                // `rawr.self` does not list.
                format!(
                    "ROOT {} is this node ({}): list it in rawr.self",
                    c.root, self.name
                )
            } else {
                format!("loop: {} -> {}", c.path.join(" -> "), self.name)
            };
            reason.truncate(120);
            self.answer_error(
                now,
                from,
                method::CONNECT,
                tid,
                link.as_deref(),
                code::LOOP_DETECTED,
                &reason,
            );
            return;
        }
        let tag = cred::session_tag(&c.session);
        if self.exhausted.contains_key(&tag) {
            // §4.6: the session used up its reservation here; the peer asks above.
            let reason = format!("session limit reached at {}", self.name);
            self.answer_error(
                now,
                from,
                method::CONNECT,
                tid,
                link.as_deref(),
                code::RELAY_LIMIT,
                &reason,
            );
            return;
        }
        let key: DirKey = (c.session.clone(), c.mac, c.target);
        let holder = Holder {
            src: from,
            tid,
            link,
        };

        // Duplicate: a retransmission, a retry, or the same peer by another route.
        if let Some(p) = self.pending.get_mut(&key) {
            if let Some(h) = p.holders.iter_mut().find(|h| h.src == from) {
                *h = holder;
            } else {
                if p.holders.len() >= MAX_HOLDERS {
                    p.holders.remove(0);
                }
                p.holders.push(holder);
            }
            let data = wire::encode_pending(method::CONNECT, tid);
            self.send(from, data);
            return;
        }

        // Re-pair: this side already paired here.
        if let Some(r) = self.recent.get(&(c.session.clone(), c.mac)) {
            if c.target.is_none_or(|t| r.partner.is_none_or(|p| p == t)) {
                let relay = match &r.kind {
                    RecentKind::Here { at_root } => {
                        let at_root = *at_root;
                        self.mint_relay(now, &c, c.mac, at_root)
                    }
                    RecentKind::Below { relay, .. } => relay.clone(),
                };
                self.answer_relay(now, &holder, &relay);
                return;
            }
        }

        // Rule 1: pair.
        if let Some(other) = self.find_partner(&c).and_then(|k| self.pending.remove(&k)) {
            self.pair(now, c, holder, other);
            return;
        }

        // Caps.
        if self.pending.len() >= self.limits.max_pending {
            self.answer_error(
                now,
                from,
                method::CONNECT,
                tid,
                holder.link.as_deref(),
                code::CAPACITY,
                "",
            );
            return;
        }
        let from_src = self
            .pending
            .values()
            .filter(|p| p.holders.iter().any(|h| h.src.ip() == from.ip()))
            .count();
        if from_src >= self.limits.max_pending_per_source {
            self.answer_error(
                now,
                from,
                method::CONNECT,
                tid,
                holder.link.as_deref(),
                code::QUOTA,
                "",
            );
            return;
        }

        let expires = now + self.limits.pending_timeout();
        let local = c.target.is_some_and(|t| self.is_local(t));
        self.pending.insert(
            key.clone(),
            Pending {
                holders: vec![holder],
                req: c,
                expires,
                stage: Stage::Held,
            },
        );
        let data = wire::encode_pending(method::CONNECT, tid);
        self.send(from, data);
        if local {
            // Rule 2.
            if let Some(p) = self.pending.get_mut(&key) {
                p.stage = Stage::Local {
                    until: now + self.limits.local_wait(),
                };
            }
        } else {
            self.advance(now, &key);
        }
    }

    /// Root hold, rule 3 or rule 4 for a pending entry.
    fn advance(&mut self, now: Instant, key: &DirKey) {
        let Some(p) = self.pending.get(key) else {
            return;
        };
        let req = p.req.clone();
        if self.is_self(req.root) {
            if let Some(p) = self.pending.get_mut(key) {
                p.stage = Stage::Held;
            }
            return;
        }
        if req.hops == 0 {
            if let Some(p) = self.pending.remove(key) {
                self.fail_holders(now, &p, code::TOO_MANY_HOPS, "");
            }
            return;
        }
        let (to, auth_key) = match &self.gateway {
            Some((addr, key)) => (*addr, key.clone()),
            None => (req.root, None),
        };
        let mut up = req;
        up.hops -= 1;
        up.path.push(self.name.clone());
        let tid = self.new_tid();
        let auth = auth_key.as_ref().map(|key| Auth {
            username: Some(&self.name),
            key,
        });
        let data = wire::encode_connect(tid, &up, auth.as_ref());
        self.send_up(to, data.clone());
        self.upstream.insert(
            tid,
            Upstream {
                txn: Txn::new(now, tid, to, data),
                kind: UpKind::Connect(key.clone()),
                key: auth_key,
            },
        );
        self.forwarded += 1;
        if let Some(p) = self.pending.get_mut(key) {
            p.stage = Stage::Forwarded { tid };
        }
    }

    /// This node's relay and fresh credentials for `mac`, answering request `req`.
    fn mint_relay(&self, now: Instant, req: &ConnectReq, mac: Mac, at_root: bool) -> Relay {
        let expiry = self.unix(now) + u64::from(self.limits.credential_lifetime_s);
        let (username, password) = cred::mint(&self.secret, expiry, &req.session, mac);
        let mut path = req.path.clone();
        path.push(self.name.clone());
        Relay {
            uris: self.relay.clone(),
            username,
            password,
            lifetime: self.limits.credential_lifetime_s,
            path,
            at_root,
        }
    }

    /// The per-peer and per-link keys of a holder (§4.6): a linked child counts per link, a
    /// direct peer per source IP.
    fn reservation_keys(h: &Holder) -> (Option<IpAddr>, Option<String>) {
        match &h.link {
            Some(l) => (None, Some(l.clone())),
            None => (Some(h.src.ip()), None),
        }
    }

    /// Whether a new session with these holders fits the per-peer and per-link caps.
    fn reservation_fits(&self, holders: &[&Holder]) -> Result<(Vec<IpAddr>, Vec<String>), String> {
        let (mut peers, mut links) = (Vec::new(), Vec::new());
        for h in holders {
            match Self::reservation_keys(h) {
                (Some(ip), _) => peers.push(ip),
                (_, Some(l)) => links.push(l),
                _ => {}
            }
        }
        let lim = &self.limits;
        for ip in &peers {
            let n = self
                .reservations
                .values()
                .filter(|r| r.peers.contains(ip))
                .count();
            if lim.sessions_per_peer > 0 && n >= lim.sessions_per_peer {
                return Err(format!("{}: {n} sessions for peer {ip}", self.name));
            }
        }
        for l in &links {
            let n = self
                .reservations
                .values()
                .filter(|r| r.links.contains(l))
                .count();
            if lim.sessions_per_link > 0 && n >= lim.sessions_per_link {
                return Err(format!("{}: {n} sessions over link {l}", self.name));
            }
        }
        Ok((peers, links))
    }

    /// The TURN server reports that a session relayed here reached its byte or duration limit
    /// (`username` is one of the two it was given in [`Output::Paired`]). Its Connects are
    /// answered 470 from now on, so the peers meet above this node.
    pub fn session_exhausted(&mut self, now: Instant, username: &str) {
        let Some(tag) = cred::tag_of_username(username) else {
            return;
        };
        if let Some(r) = self.reservations.remove(tag) {
            // Withdraw the re-pair records above (they would send a fallback straight back here).
            if let Some((to, key)) = r.up {
                for mac in r.macs {
                    self.send_cancel(now, to, key.clone(), &r.session, mac, None, None);
                }
            }
        }
        if self.exhausted.len() < self.limits.max_pending || self.exhausted.contains_key(tag) {
            let until = now + Duration::from_secs(u64::from(self.limits.credential_lifetime_s));
            self.exhausted.insert(tag.to_owned(), until);
        }
        // No re-pair here for this session.
        self.recent.retain(|(s, _), _| cred::session_tag(s) != tag);
    }

    fn pair(&mut self, now: Instant, c: ConnectReq, holder: Holder, other: Pending) {
        let tag = cred::session_tag(&c.session);
        let mut holders: Vec<&Holder> = vec![&holder];
        holders.extend(other.holders.iter());
        let keys = match self.reservation_fits(&holders) {
            Ok(k) => k,
            Err(why) => {
                // §4.6: reservation refused; both sides ask above.
                let reason = format!("reservation refused: {why}");
                self.answer_error(
                    now,
                    holder.src,
                    method::CONNECT,
                    holder.tid,
                    holder.link.as_deref(),
                    code::RELAY_LIMIT,
                    &reason,
                );
                self.fail_holders(now, &other, code::RELAY_LIMIT, &reason);
                if let Stage::Forwarded { tid } = other.stage {
                    self.cancel_upstream(now, tid, &other.req, None);
                }
                return;
            }
        };
        if self.reservations.len() < self.limits.max_pending {
            let up = match &self.gateway {
                Some((addr, key)) => Some((*addr, key.clone())),
                None if !self.is_self(c.root) => Some((c.root, None)),
                None => None,
            };
            let r = Reservation {
                peers: keys.0,
                links: keys.1,
                expires: now + self.limits.reservation(),
                session: c.session.clone(),
                macs: [c.mac, other.req.mac],
                up,
            };
            self.reservations.insert(tag.clone(), r);
        }
        let at_root = self.is_self(c.root) || self.is_self(other.req.root);
        let relay_a = self.mint_relay(now, &c, c.mac, at_root);
        let relay_b = self.mint_relay(now, &other.req, other.req.mac, at_root);
        let (user_a, user_b) = (relay_a.username.clone(), relay_b.username.clone());
        let expires = now + self.limits.pending_timeout();
        for (mac, partner) in [(c.mac, other.req.mac), (other.req.mac, c.mac)] {
            self.remember(
                (c.session.clone(), mac),
                Recent {
                    partner: Some(partner),
                    kind: RecentKind::Here { at_root },
                    expires,
                },
            );
        }
        self.answer_relay(now, &holder, &relay_a);
        for h in &other.holders {
            self.answer_relay(now, h, &relay_b);
        }
        if let Stage::Forwarded { tid } = other.stage {
            self.cancel_upstream(now, tid, &other.req, Some(&relay_b));
        }
        self.paired += 1;
        self.out.push_back(Output::Paired {
            tag,
            usernames: [user_a, user_b],
            max_bytes: self.limits.session_max_bytes,
            max_secs: self.limits.session_max_secs,
        });
    }

    /// Records a paired side, within the pending cap.
    fn remember(&mut self, key: (Vec<u8>, Mac), r: Recent) {
        if self.recent.len() < self.limits.max_pending || self.recent.contains_key(&key) {
            self.recent.insert(key, r);
        }
    }

    fn answer_relay(&mut self, now: Instant, h: &Holder, r: &Relay) {
        let key = self.key_for(h.link.as_deref());
        let auth = key.as_ref().map(|key| Auth {
            username: None,
            key,
        });
        let data = wire::encode_connect_answer(h.tid, r, auth.as_ref());
        self.answer(now, h.src, h.tid, data);
    }

    fn fail_holders(&mut self, now: Instant, p: &Pending, err: u16, reason: &str) {
        for h in &p.holders {
            self.answer_error(
                now,
                h.src,
                method::CONNECT,
                h.tid,
                h.link.as_deref(),
                err,
                reason,
            );
        }
    }

    /// Stops the upstream transaction `tid` and sends Cancel where it went.
    fn cancel_upstream(
        &mut self,
        now: Instant,
        tid: TransactionId,
        req: &ConnectReq,
        relay: Option<&Relay>,
    ) {
        let Some(u) = self.upstream.remove(&tid) else {
            return;
        };
        let session = req.session.clone();
        self.send_cancel(now, u.txn.to, u.key, &session, req.mac, req.target, relay);
    }

    /// Sends a Cancel upstream as a transaction of its own.
    #[allow(clippy::too_many_arguments)]
    fn send_cancel(
        &mut self,
        now: Instant,
        to: SocketAddr,
        key: Option<Key>,
        session: &[u8],
        mac: Mac,
        target: Option<Mac>,
        relay: Option<&Relay>,
    ) {
        let ctid = self.new_tid();
        let auth = key.as_ref().map(|key| Auth {
            username: Some(&self.name),
            key,
        });
        let data = wire::encode_cancel(ctid, session, mac, target, relay, auth.as_ref());
        self.send_up(to, data.clone());
        self.upstream.insert(
            ctid,
            Upstream {
                txn: Txn::new(now, ctid, to, data),
                kind: UpKind::Cancel,
                key,
            },
        );
    }

    // ---- Cancel (§4.4) ----

    fn on_cancel(
        &mut self,
        now: Instant,
        from: SocketAddr,
        tid: TransactionId,
        key: DirKey,
        relay: Option<Relay>,
        link: Option<String>,
    ) {
        let mut emptied = None;
        if let Some(p) = self.pending.get_mut(&key) {
            p.holders.retain(|h| h.src != from);
            if p.holders.is_empty() {
                emptied = self.pending.remove(&key);
            }
        }
        if relay.is_none() {
            // A withdrawal (the session was used up where it paired, §4.6): forget the re-pair
            // record and pass the withdrawal on to where this node had forwarded.
            let rk = (key.0.clone(), key.1);
            let below = matches!(
                self.recent.get(&rk),
                Some(Recent {
                    kind: RecentKind::Below { .. },
                    ..
                })
            );
            if below {
                if let Some(Recent {
                    kind:
                        RecentKind::Below {
                            up: Some((to, k)), ..
                        },
                    ..
                }) = self.recent.remove(&rk)
                {
                    self.send_cancel(now, to, k, &key.0, key.1, None, None);
                }
            }
        }
        if let Some(p) = emptied {
            if let Some(r) = &relay {
                // Paired below: remember where, for this side's possible return by another
                // route (only for a direction that was really held here from `from`).
                let up = match p.stage {
                    Stage::Forwarded { tid } => {
                        self.upstream.get(&tid).map(|u| (u.txn.to, u.key.clone()))
                    }
                    _ => None,
                };
                self.remember(
                    (key.0.clone(), key.1),
                    Recent {
                        partner: key.2,
                        kind: RecentKind::Below {
                            relay: r.clone(),
                            up,
                        },
                        expires: now + self.limits.pending_timeout(),
                    },
                );
            }
            if let Stage::Forwarded { tid } = p.stage {
                self.cancel_upstream(now, tid, &p.req, relay.as_ref());
            }
        }
        let k = self.key_for(link.as_deref());
        let auth = k.as_ref().map(|key| Auth {
            username: None,
            key,
        });
        let data = wire::encode_ok(method::CANCEL, tid, auth.as_ref());
        self.answer(now, from, tid, data);
    }

    // ---- Answers from upstream ----

    fn handle_answer(&mut self, now: Instant, m: &Message<'_>) {
        let tid = *m.transaction_id();
        let Some(u) = self.upstream.get(&tid) else {
            return;
        };
        if let Some(key) = &u.key {
            if m.verify_integrity(key).is_err() {
                // A spoofed or corrupted answer must not redirect anyone.
                return;
            }
        }
        let Some(u) = self.upstream.remove(&tid) else {
            return;
        };
        let UpKind::Connect(key) = u.kind else {
            return;
        };
        let Some(p) = self.pending.get(&key) else {
            return;
        };
        if !matches!(p.stage, Stage::Forwarded { tid: t } if t == tid) {
            return;
        }
        let Some(p) = self.pending.remove(&key) else {
            return;
        };
        match m.class() {
            Class::Success => match Relay::decode(m) {
                Ok(r) => {
                    for h in &p.holders {
                        self.answer_relay(now, h, &r);
                    }
                }
                Err(e) => self.fail_holders(
                    now,
                    &p,
                    code::UPSTREAM_UNREACHABLE,
                    &format!("bad answer from upstream: {e}"),
                ),
            },
            _ => {
                let (err, reason) = match m.error_code() {
                    Some(Ok(ec)) => (ec.code, ec.reason.to_owned()),
                    _ => (code::UPSTREAM_UNREACHABLE, "upstream error".to_owned()),
                };
                self.fail_holders(now, &p, err, &reason);
            }
        }
    }

    // ---- Timers ----

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        // Upstream transactions.
        let mut resend = Vec::new();
        let mut dead = Vec::new();
        for (tid, u) in self.upstream.iter_mut() {
            match u.txn.poll(now) {
                TxnPoll::Idle => {}
                TxnPoll::Retransmit => resend.push((u.txn.to, u.txn.bytes.clone())),
                TxnPoll::Dead => dead.push(*tid),
            }
        }
        for (to, data) in resend {
            self.send_up(to, data);
        }
        for tid in dead {
            let Some(u) = self.upstream.remove(&tid) else {
                continue;
            };
            if let UpKind::Connect(key) = u.kind {
                let to = u.txn.to;
                let forwarded_here = matches!(self.pending.get(&key), Some(p) if matches!(p.stage, Stage::Forwarded { tid: t } if t == tid));
                if forwarded_here {
                    if let Some(p) = self.pending.remove(&key) {
                        self.fail_holders(
                            now,
                            &p,
                            code::UPSTREAM_UNREACHABLE,
                            &format!("{to} did not answer"),
                        );
                    }
                }
            }
        }

        // Pending Connects.
        let mut expired = Vec::new();
        let mut advance = Vec::new();
        for (k, p) in &self.pending {
            if now >= p.expires {
                expired.push(k.clone());
            } else if let Stage::Local { until } = p.stage {
                if now >= until {
                    advance.push(k.clone());
                }
            }
        }
        for k in expired {
            if let Some(p) = self.pending.remove(&k) {
                self.fail_holders(now, &p, code::TIMEOUT, "no partner");
                if let Stage::Forwarded { tid } = p.stage {
                    self.cancel_upstream(now, tid, &p.req, None);
                }
            }
        }
        for k in advance {
            self.advance(now, &k);
        }

        // Exchanges.
        let mut timeouts = Vec::new();
        self.exchanges.retain(|_, e| {
            for s in &mut e.sides {
                if let Some((to, tid, until)) = s.held {
                    if now >= until {
                        s.held = None;
                        timeouts.push((to, tid));
                    }
                }
            }
            now < e.expires
        });
        for (to, tid) in timeouts {
            self.answer_error(
                now,
                to,
                method::EXCHANGE,
                tid,
                None,
                code::TIMEOUT,
                "peer absent",
            );
        }

        self.registrations.retain(|_, (_, exp)| now < *exp);
        self.answered.retain(|_, (_, exp)| now < *exp);
        self.recent.retain(|_, r| now < r.expires);
        self.reservations.retain(|_, r| now < r.expires);
        self.exhausted.retain(|_, exp| now < *exp);
    }
}
