//! The server core: one [`Server`] per shard, its state split by owner.
//!
//! | file | owns |
//! | --- | --- |
//! | `relay.rs` | the per-packet path: ChannelData, Send, peer datagrams (no state of its own) |
//! | `icmp.rs` | ICMP errors for relayed datagrams, to the client (RFC 8656 §11.5) |
//! | `allocation.rs` | the allocation table: relays, permissions, channels per 5-tuple |
//! | `ports.rs`, `reservation.rs`, `quota.rs` | relay ports, EVEN-PORT tokens, quotas |
//! | `request.rs` | TURN requests decoded into typed structs or the error to answer |
//! | `authenticate.rs` | the long-term credential check, returning a verdict |
//! | `allocate.rs` | Allocate, relay binding, Refresh, deletion (RFC 8656 §7) |
//! | `permission.rs` | CreatePermission and ChannelBind (RFC 8656 §9, §12) |
//! | `tcp.rs` | RFC 6062 connections |
//! | `binding.rs` | Binding and RFC 5780 |
//! | `cache.rs` | answers kept for retransmitted requests |
//! | `fastpath.rs` | which channels the kernel fast path may relay, and its traffic counted back |
//! | `metrics.rs` | counters, flushed once per tick |
//! | `reply.rs` | writing answers |
//!
//! This file holds the [`Server`] itself, the inputs that are not per packet and the request
//! dispatch.

// Operator views and commands (listing, killing, reconfiguring, draining).
pub(crate) mod admin;
mod allocate;
mod allocation;
mod authenticate;
mod binding;
mod cache;
mod fastpath;
mod icmp;
mod metrics;
mod pairing;
mod permission;
mod ports;
mod quota;
mod relay;
mod reply;
mod request;
mod reservation;
mod rng;
mod tcp;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kyuu_stun::{attr, method, Class, ErrorCode, Message};

use crate::auth::{Credentials, Nonces};
use crate::config::{PortRange, TurnConfig};
use crate::policy::PeerPolicy;
use crate::ratelimit::RateLimiter;
use crate::types::{ClientSocket, Output, ToPeer};

pub use binding::Rfc5780;
pub use icmp::{PeerIcmp, ICMP_INDICATION_MAX};
pub use pairing::SessionLimits;

use allocation::Allocations;
use authenticate::{authenticate, Answer, AuthContext, Authed, Verdict};
use cache::ResponseCache;
use metrics::{Counters, Dropped};
use pairing::Pairings;
use ports::PortPool;
use quota::Quotas;
use reservation::{Reservations, SharedReservations};
use rng::Rng;
use tcp::Connections;

/// How often every allocation is checked for expiry (and metrics are flushed).
const TICK: Duration = Duration::from_secs(1);
/// The allocation walk is spread over this many sub-ticks of `TICK / SLICES`: each walks the
/// allocations whose slot is its slice, so no single turn of the shard's loop walks them all
/// (at 5,000 allocations a whole walk took 0.5-1 ms here, which delayed every packet queued
/// behind it).
const SLICES: usize = 10;
const SUB_TICK: Duration = Duration::from_millis(TICK.as_millis() as u64 / SLICES as u64);

/// State shared by every shard of one server: the nonce key, the clock origin, the quota
/// counters (touched only when allocations come and go) and EVEN-PORT reservations.
#[derive(Debug)]
pub struct Shared {
    nonce_key: [u8; 32],
    start: Instant,
    unix_at_start: u64,
    quotas: Quotas,
    /// The allocation that uses a token may land on another shard (clients' second sockets
    /// hash elsewhere).
    reservations: SharedReservations,
}

impl Shared {
    /// `unix_at_start` is the wall-clock seconds at `start`, read once by the shell: nonce
    /// timestamps and TURN REST API expiry times are wall-clock seconds derived from it, so a
    /// nonce issued by one node of a fleet (same `nonce_key`) is accepted by another.
    pub fn new(nonce_key: [u8; 32], start: Instant, unix_at_start: u64) -> Arc<Self> {
        Arc::new(Shared {
            nonce_key,
            start,
            unix_at_start,
            quotas: Quotas::default(),
            reservations: SharedReservations::default(),
        })
    }

    /// Total allocations across shards.
    pub fn allocations(&self) -> u32 {
        self.quotas.total()
    }

    /// Fleet quotas: each user's live allocations on this node and the generation of these
    /// counts (it changes whenever they do), for the shell to publish.
    pub fn user_allocations(&self) -> (u64, Vec<(String, u32)>) {
        self.quotas.users()
    }

    /// The generation [`Shared::user_allocations`] would report, without copying the counts.
    pub fn user_allocations_generation(&self) -> u64 {
        self.quotas.generation()
    }

    /// Fleet quotas: each user's allocations on the other nodes, read by the shell; Allocate
    /// counts them against `turn.user_quota` together with this node's. Empty (the default,
    /// and what the shell sets when Redis is unreachable): the quota is per node.
    pub fn set_remote_user_allocations(&self, remote: std::collections::HashMap<String, u32>) {
        self.quotas.set_remote_users(remote);
    }

    /// Seconds since `start`.
    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.start).as_secs()
    }

    /// Wall-clock seconds at `now`, derived without reading the clock (the nonce clock).
    fn unix_now(&self, now: Instant) -> u64 {
        self.unix_at_start + self.secs(now)
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

/// Why a [`Server`] could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServerError {
    /// The `[turn]` config is invalid; the message names the key.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    allocs: Allocations,
    ports: PortPool,
    reservations: Reservations,
    conns: Connections,
    cache: ResponseCache,
    counters: Counters,
    rng: Rng,
    out: VecDeque<Output>,
    next_tick: Option<Instant>,
    /// The slice of the allocation table the next sub-tick walks, and the live permissions and
    /// channels each slice had when last walked (for the gauges).
    slice: usize,
    slice_counts: [(usize, usize); SLICES],
    /// Set by [`Server::drain`]: new allocations are refused (486, or 300 with an alternate).
    draining: bool,
    /// The shell attached the kernel fast path ([`Server::enable_fast_path`]).
    fast_path: bool,
    /// Channels the kernel may relay, as last announced to the shell.
    fp_installed: crate::fxhash::FxHashMap<crate::types::FastPathId, crate::types::FastPathChannel>,
    /// Whether the shell can send with and without DF per allocation; see
    /// [`Server::set_dont_fragment_supported`].
    dont_fragment: bool,
    /// In-process pairs (`pairing.rs`).
    pairings: Pairings,
    /// Where a draining server sends clients (IPv4, IPv6), when `turn.alternate_server` is
    /// unset: other fleet nodes chosen by the shell ([`Server::drain_to`]).
    drain_alternates: [Option<std::net::SocketAddr>; 2],
}

impl Server {
    pub fn new(cfg: TurnConfig, opts: ServerOptions) -> Result<Self, ServerError> {
        cfg.validate()?;
        Ok(Server {
            creds: Credentials::new(&cfg),
            nonces: Nonces::new(opts.shared.nonce_key, u64::from(cfg.nonce_lifetime)),
            policy: PeerPolicy::new(&cfg.allow_peers, &cfg.deny_peers),
            limiter: RateLimiter::new(cfg.unauth_rate, cfg.unauth_burst, cfg.rate_table_size),
            allocs: Allocations::default(),
            ports: PortPool::new(opts.ports),
            reservations: Reservations::default(),
            conns: Connections::default(),
            cache: ResponseCache::default(),
            counters: Counters::default(),
            rng: Rng::new(opts.seed),
            out: VecDeque::new(),
            next_tick: None,
            slice: 0,
            slice_counts: [(0, 0); SLICES],
            draining: false,
            fast_path: false,
            fp_installed: Default::default(),
            dont_fragment: true,
            pairings: Pairings::default(),
            drain_alternates: [None, None],
            cfg,
            opts,
        })
    }

    /// Tells the core whether its shell can honour DONT-FRAGMENT (RFC 8656 §7.2): send an
    /// allocation's datagrams with DF, and the others without. On by default (kyuu's Linux shell
    /// can); when off, an Allocate with DONT-FRAGMENT gets 420 with UNKNOWN-ATTRIBUTES naming it.
    pub fn set_dont_fragment_supported(&mut self, supported: bool) {
        self.dont_fragment = supported;
    }

    pub fn config(&self) -> &TurnConfig {
        &self.cfg
    }

    /// Whether `client`'s five-tuple holds an allocation.
    pub fn has_allocation(&self, client: &ClientSocket) -> bool {
        self.allocs.id_of(client).is_some()
    }

    /// Number of live allocations in this shard.
    pub fn allocation_count(&self) -> usize {
        self.allocs.len()
    }

    /// A datagram or stream frame from a client. Returns the relay instruction for ChannelData
    /// and Send indications (the fast path, `relay.rs`); queues everything else.
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: ClientSocket,
        packet: &[u8],
    ) -> Option<ToPeer> {
        if self.next_tick.is_none() {
            self.next_tick = Some(now + SUB_TICK);
        }
        let first = *packet.first()?;
        // RFC 7983 demultiplexing: 0x40..=0x7F starts ChannelData, 0x00..=0x03 STUN.
        if first & 0xC0 == 0x40 {
            return self.channel_data(now, client, packet);
        }
        let Ok(msg) = Message::parse(packet) else {
            // RFC 8489 §11: a Binding request without the magic cookie is an RFC 3489 client.
            match kyuu_stun::ClassicRequest::parse(packet) {
                Ok(classic) => self.classic_binding(now, client, &classic),
                Err(_) => self.counters.drop(Dropped::Malformed),
            }
            return None;
        };
        if msg.verify_fingerprint().is_err() {
            self.counters.drop(Dropped::Malformed);
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

    /// A client's stream connection closed: its allocation (if any) goes with it (RFC 6062 §5.1).
    pub fn client_closed(&mut self, now: Instant, client: ClientSocket) {
        if let Some(id) = self.allocs.id_of(&client) {
            self.delete_allocation(now, id, "connection closed");
        }
    }

    /// When [`Server::handle_timeout`] wants to run next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// The next queued output.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// Expires allocations (RFC 8656 §7), permissions (§9), channels (§12), reservations, peer
    /// connections and cached answers; flushes counters to metrics.
    ///
    /// Runs every [`SUB_TICK`]: each run walks one slice of the allocation table (so each
    /// allocation is checked once per [`TICK`]); a run that comes late walks as many slices as
    /// sub-ticks have passed (all of them after a whole tick), and the rest of the work is done
    /// once per tick, when the walk comes round to the first slice again.
    pub fn handle_timeout(&mut self, now: Instant) {
        let due = match self.next_tick {
            Some(t) if t <= now => t,
            _ => return,
        };
        self.next_tick = Some(now + SUB_TICK);
        let late = now.saturating_duration_since(due).as_nanos() / SUB_TICK.as_nanos();
        let slices = usize::try_from(late).map_or(SLICES, |l| (l + 1).min(SLICES));
        let (mut expired, mut over) = (Vec::new(), Vec::new());
        let mut relayed = metrics::Relayed::default();
        let mut round = false;
        for _ in 0..slices {
            let (mut perms, mut channels) = (0, 0);
            for a in self.allocs.slice_mut(self.slice, SLICES) {
                if a.expires <= now {
                    expired.push(a.id);
                    continue;
                }
                if a.over_limit(now) {
                    over.push((a.id, a.username.clone()));
                }
                let (p, c) = a.expire(now);
                perms += p;
                channels += c;
                relayed.add(a);
            }
            if let Some(n) = self.slice_counts.get_mut(self.slice) {
                *n = (perms, channels);
            }
            self.slice = (self.slice + 1) % SLICES;
            round |= self.slice == 0;
        }
        relayed.flush();
        for id in expired {
            self.delete_allocation(now, id, "expired");
        }
        self.end_over_limit(now, over);
        if !round {
            return;
        }
        for (f, p) in self
            .reservations
            .expire(&self.opts.shared.reservations, now)
        {
            self.ports.release(f, p);
        }
        for connection_id in self.conns.expire(now) {
            self.out
                .push_back(Output::ClosePeerConnection { connection_id });
        }
        self.fast_path_sync(now, None);
        self.cache.expire(now);
        self.limiter.expire(now);
        self.pairings.expire(now);
        let (perms, channels) = self
            .slice_counts
            .iter()
            .fold((0, 0), |(p, c), (sp, sc)| (p + sp, c + sc));
        metrics::gauges(self.opts.shard, self.allocs.len(), perms, channels);
        self.counters.flush();
    }

    /// Routes a request: Binding and extension methods first, then the TURN methods, which are
    /// answered from the cache when retransmitted (RFC 8489 §6.3.1), authenticated (§9.2.4),
    /// checked for unknown attributes (§7.3.1) and for the allocation they act on (RFC 8656 §5:
    /// same 5-tuple, same user).
    fn request(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        let m = msg.method();
        if m == method::BINDING {
            return self.binding(now, client, msg);
        }
        if crate::EXTENSION_METHODS.contains(&m) && self.opts.extension {
            let data = msg.as_bytes().to_vec();
            self.out.push_back(Output::Extension { client, data });
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
                self.error(client, msg, ErrorCode::BAD_REQUEST, None);
            } else {
                self.counters.drop(Dropped::RateLimited);
            }
            return;
        }
        if let Some(resp) = self.cache.get(client, *msg.transaction_id()) {
            let data = resp.to_vec();
            return self.send(client, Some(data));
        }
        if msg.integrity_kind().is_none() {
            // Without credentials only an Allocate that could succeed is challenged (the 401 is
            // several times the size of a bare request); anything else gets a small error,
            // never more bytes than a Binding answer per request byte (amplification).
            let code = match m {
                method::ALLOCATE if !msg.has(attr::REQUESTED_TRANSPORT) => {
                    Some(ErrorCode::BAD_REQUEST)
                }
                method::ALLOCATE => None,
                method::CONNECTION_BIND if client.transport.is_stream() => None,
                method::CONNECTION_BIND => Some(ErrorCode::BAD_REQUEST),
                _ if self.allocs.id_of(&client).is_some() => None,
                _ => Some(ErrorCode::ALLOCATION_MISMATCH),
            };
            if let Some(code) = code {
                if self.limiter.allow(client.remote.ip(), now) {
                    self.error(client, msg, code, None);
                } else {
                    self.counters.drop(Dropped::RateLimited);
                }
                return;
            }
        }
        let Some(auth) = self.authenticate(now, client, msg) else {
            return;
        };
        let mut unknown = request::unknown_required(msg, request::known_turn);
        // RFC 8656 §7.2: a server that cannot honour DONT-FRAGMENT treats it as unknown (420).
        if m == method::ALLOCATE && !self.dont_fragment && msg.has(attr::DONT_FRAGMENT) {
            unknown.push(attr::DONT_FRAGMENT);
        }
        if !unknown.is_empty() {
            return self.unknown_attributes(client, msg, &unknown, Some(&auth));
        }
        ::metrics::counter!("kyuu_turn_requests_total", "method" => method::name(m)).increment(1);
        match m {
            method::ALLOCATE => return self.allocate(now, client, msg, auth),
            method::CONNECTION_BIND => return self.connection_bind(client, msg, auth),
            _ => {}
        }
        let Some(id) = self.allocs.id_of(&client) else {
            return self.error(client, msg, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
        };
        let owner = self.allocs.get(id).map(|a| a.username.as_str());
        if owner != Some(auth.username.as_str()) {
            self.counters
                .auth_failure(crate::auth::AuthFailure::UnknownUser);
            return self.error(client, msg, ErrorCode::WRONG_CREDENTIALS, Some(&auth));
        }
        match m {
            method::REFRESH => self.refresh(now, msg, auth, id, client),
            method::CREATE_PERMISSION => self.create_permission(now, msg, auth, id, client),
            method::CHANNEL_BIND => self.channel_bind(now, msg, auth, id, client),
            _ => self.connect(now, msg, auth, id, client),
        }
    }

    /// Runs the credential check and, on refusal, answers (rate limited where a spoofed source
    /// could trigger it) and counts.
    fn authenticate(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
    ) -> Option<Authed> {
        let shared = &self.opts.shared;
        let live_user = if msg.method() == method::ALLOCATE {
            None
        } else {
            self.allocs
                .id_of(&client)
                .and_then(|id| self.allocs.get(id))
                .map(|a| a.username.as_str())
        };
        let cx = AuthContext {
            creds: &self.creds,
            nonces: &self.nonces,
            client: client.remote,
            secs: shared.unix_now(now),
            unix_now: shared.unix_now(now),
            live_user,
        };
        let refusal = match authenticate(&cx, msg) {
            Verdict::Authed(a) => return Some(a),
            Verdict::Refused(r) => r,
        };
        if let Some(f) = refusal.failure {
            self.counters.auth_failure(f);
        }
        if refusal.rate_limited && !self.limiter.allow(client.remote.ip(), now) {
            self.counters.drop(Dropped::RateLimited);
            return None;
        }
        match refusal.answer {
            Answer::Challenge(code) => self.challenge(now, client, msg, code),
            Answer::Error(code) => self.error(client, msg, code, None),
        }
        None
    }
}
