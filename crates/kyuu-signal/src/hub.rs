//! The signaling hub: a sans-IO state machine for connections, ids, rooms and the directory.
//!
//! # Contract
//!
//! The hub owns no sockets and reads no clock. Every input carries `now`:
//! [`Hub::connect`], [`Hub::disconnect`], [`Hub::text`], [`Hub::binary`] and
//! [`Hub::handle_timeout`]. After each input the caller drains [`Hub::poll_output`] until it
//! returns `None`, delivering each [`Output`] to the connection it names, then arms a timer for
//! [`Hub::poll_timeout`] and calls [`Hub::handle_timeout`] when it fires.
//!
//! # Generations
//!
//! Each accepted connection gets a fresh [`ConnId`] (a generation number that never repeats).
//! The id table maps a client id to the `ConnId` currently holding it, and every removal compares
//! the `ConnId` first: a stale connection's disconnect can never remove a newer connection's
//! entry (the bug of libdatachannel's example servers when a client reconnects with its id).
//!
//! # Legacy and opt-in clients
//!
//! A connection is *legacy* until it opts in (`?v=2`, no id in the path, or any control
//! message). Legacy connections only ever receive relayed `{"id":..}` frames; errors for them are
//! logged and the offending frame dropped. Opt-in connections also receive control messages
//! (welcome, errors, room and directory events). See `PROTOCOL.md`.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

use kyuu_stun::bucket::TokenBucket;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tracing::{debug, info};

use crate::config::SignalConfig;
use crate::frame::{self, Control, DirKeyWire, FrameError, Inbound};
use crate::token::Claims;

/// A connection handle, unique for the hub's lifetime (doubles as a generation number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(u64);

impl ConnId {
    /// The raw number, for logs.
    pub fn get(self) -> u64 {
        self.0
    }
}

/// What the shell learned from the WebSocket handshake.
#[derive(Debug, Clone)]
pub struct ConnectRequest {
    /// Id from the first path segment; `None` or empty asks the server to assign one.
    pub id: Option<String>,
    /// Resume token presented with `?resume=`.
    pub resume: Option<String>,
    /// `?v=2` was given.
    pub v2: bool,
    /// Remote address, for the per-address cap.
    pub ip: IpAddr,
    /// Claims of a verified access token, when authentication is on.
    pub claims: Option<Claims>,
    /// `RTCIceServer[]` to put into the welcome message of opt-in clients.
    pub ice_servers: Option<Value>,
}

/// A successful connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// Handle for all later inputs about this connection.
    pub conn: ConnId,
    /// The client id in use (given or assigned).
    pub id: String,
}

/// Why a connection was refused at the handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// `max_connections` reached.
    #[error("server is at its connection limit")]
    TooManyConnections,
    /// `max_connections_per_ip` reached for this address.
    #[error("too many connections from this address")]
    TooManyFromAddress,
    /// The id is malformed.
    #[error("invalid id: {0}")]
    InvalidId(&'static str),
    /// The id is held (or reserved) by a client that claimed it with a resume token.
    #[error("id {0:?} is in use; reconnect with its resume token")]
    IdTaken(String),
    /// The access token is not valid for this id.
    #[error("token does not grant id {0:?}")]
    Forbidden(String),
}

impl Refusal {
    /// The HTTP status the handshake is refused with.
    pub fn http_status(&self) -> u16 {
        match self {
            Refusal::TooManyConnections => 503,
            Refusal::TooManyFromAddress => 429,
            Refusal::InvalidId(_) => 400,
            Refusal::IdTaken(_) => 409,
            Refusal::Forbidden(_) => 403,
        }
    }
}

/// Something the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a text frame to a connection.
    Send {
        /// Destination connection.
        conn: ConnId,
        /// Frame text.
        text: String,
    },
    /// Close a connection (it was replaced by a newer one with the same id).
    Close {
        /// Connection to close.
        conn: ConnId,
        /// WebSocket close code.
        code: u16,
        /// Close reason.
        reason: &'static str,
    },
    /// Fleet mode only: `to` is not known on this node; the shell looks it up in the fleet
    /// registry and forwards `text`, or calls [`Hub::remote_unknown`] when no node has it.
    /// Routes are emitted in input order; the shell keeps that order per sender.
    Route {
        /// Sending connection (for an error if the peer is unknown fleet-wide).
        from_conn: ConnId,
        /// Sender id.
        from: String,
        /// Destination id.
        to: String,
        /// The rewritten frame, ready for the destination.
        text: String,
    },
    /// Fleet mode only: a local client joined (`on`) or left `room`; the shell tells the other
    /// nodes, which mirror it with [`Hub::remote_room`].
    Room {
        /// Room name.
        room: String,
        /// Member client id.
        peer: String,
        /// Joined (true) or left.
        on: bool,
    },
    /// Fleet mode only: a local client published (`on`) or withdrew `key`; the shell tells
    /// the other nodes, which mirror it with [`Hub::remote_dir`].
    Dir {
        /// The name or topic.
        key: DirKey,
        /// Publishing client id.
        peer: String,
        /// Published (true) or withdrawn.
        on: bool,
    },
}

/// Error codes sent to opt-in clients in `{"type":"error","code":..}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Frame is not valid JSON.
    InvalidJson,
    /// Frame is JSON but not a usable message.
    InvalidMessage,
    /// Binary frames are not part of the protocol.
    BinaryUnsupported,
    /// Frame larger than `max_message_size`.
    TooLarge,
    /// Over the per-connection rate limit; the frame was dropped.
    RateLimited,
    /// No client with that id, nor one expected.
    UnknownPeer,
    /// The peer did not (re)connect before held messages expired, or the hold buffer is full.
    PeerUnavailable,
    /// The access token does not allow this.
    Forbidden,
    /// The name is published by another client.
    NameTaken,
    /// A per-client or per-room limit was reached.
    LimitReached,
}

impl ErrorCode {
    /// Wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid-json",
            ErrorCode::InvalidMessage => "invalid-message",
            ErrorCode::BinaryUnsupported => "binary-unsupported",
            ErrorCode::TooLarge => "too-large",
            ErrorCode::RateLimited => "rate-limited",
            ErrorCode::UnknownPeer => "unknown-peer",
            ErrorCode::PeerUnavailable => "peer-unavailable",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NameTaken => "name-taken",
            ErrorCode::LimitReached => "limit-reached",
        }
    }
}

/// A directory key: a unique name or a shared topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirKey {
    /// A unique name (one publisher).
    Name(String),
    /// A shared topic (any number of publishers).
    Topic(String),
}

impl DirKey {
    fn from_wire(w: DirKeyWire, max_len: usize) -> Option<DirKey> {
        let k = match (w.name, w.topic) {
            (Some(n), None) => DirKey::Name(n),
            (None, Some(t)) => DirKey::Topic(t),
            (Some(_), Some(_)) | (None, None) => return None,
        };
        let s = match &k {
            DirKey::Name(s) | DirKey::Topic(s) => s,
        };
        (!s.is_empty() && s.len() <= max_len).then_some(k)
    }

    /// Adds `"name": ..` or `"topic": ..` to a JSON object.
    fn put(&self, v: &mut Value) {
        if let Value::Object(m) = v {
            match self {
                DirKey::Name(n) => m.insert("name".into(), Value::String(n.clone())),
                DirKey::Topic(t) => m.insert("topic".into(), Value::String(t.clone())),
            };
        }
    }
}

#[derive(Debug, Default)]
struct DirEntry {
    /// Publishing client ids (at most one for a name).
    publishers: Vec<String>,
    /// Watching connections.
    watchers: Vec<ConnId>,
}

#[derive(Debug)]
struct Conn {
    id: String,
    ip: IpAddr,
    v2: bool,
    claims: Option<Claims>,
    bucket: TokenBucket,
    rooms: Vec<String>,
    pubs: Vec<DirKey>,
    watches: Vec<DirKey>,
}

#[derive(Debug)]
enum IdState {
    Live(ConnId),
    /// Disconnected at some point; kept until `until` for resume and for holding messages.
    Gone {
        until: Instant,
    },
}

#[derive(Debug)]
struct IdEntry {
    state: IdState,
    /// Set when an opt-in client was welcomed with this resume token: the id is owned.
    resume: Option<String>,
}

#[derive(Debug)]
struct Held {
    from_conn: ConnId,
    from_id: String,
    text: String,
    expires: Instant,
}

/// The signaling state machine. See the module docs for the contract.
#[derive(Debug)]
pub struct Hub {
    cfg: SignalConfig,
    rng: StdRng,
    next_conn: u64,
    conns: HashMap<ConnId, Conn>,
    ids: HashMap<String, IdEntry>,
    per_ip: HashMap<IpAddr, usize>,
    rooms: HashMap<String, Vec<String>>,
    dir: HashMap<DirKey, DirEntry>,
    held: HashMap<String, VecDeque<Held>>,
    held_total: usize,
    /// (expiry, destination) in expiry order (the TTL is constant, so insertion order).
    held_order: VecDeque<(Instant, String)>,
    /// (until, id) for `Gone` entries, in order.
    gone_order: VecDeque<(Instant, String)>,
    out: VecDeque<Output>,
    /// Unknown destinations go out as [`Output::Route`] instead of being held or refused.
    fleet: bool,
    /// Fleet mode: publications mirrored from other nodes, by node.
    remote_pubs: HashMap<String, Vec<(DirKey, String)>>,
    /// Fleet mode: room memberships mirrored from other nodes, by node.
    remote_rooms: HashMap<String, Vec<(String, String)>>,
}

impl Hub {
    /// A hub with `cfg`; `seed` seeds id and resume-token generation.
    pub fn new(cfg: SignalConfig, seed: u64) -> Hub {
        Hub {
            cfg,
            rng: StdRng::seed_from_u64(seed),
            next_conn: 1,
            conns: HashMap::new(),
            ids: HashMap::new(),
            per_ip: HashMap::new(),
            rooms: HashMap::new(),
            dir: HashMap::new(),
            held: HashMap::new(),
            held_total: 0,
            held_order: VecDeque::new(),
            gone_order: VecDeque::new(),
            out: VecDeque::new(),
            fleet: false,
            remote_pubs: HashMap::new(),
            remote_rooms: HashMap::new(),
        }
    }

    /// Fleet mode: the local publications, to announce to the fleet (resync).
    pub fn local_publications(&self) -> Vec<(DirKey, String)> {
        self.conns
            .values()
            .flat_map(|c| c.pubs.iter().map(|k| (k.clone(), c.id.clone())))
            .collect()
    }

    /// Fleet mode: the local room memberships (room, id), to announce to the fleet.
    pub fn local_memberships(&self) -> Vec<(String, String)> {
        self.conns
            .values()
            .flat_map(|c| c.rooms.iter().map(|r| (r.clone(), c.id.clone())))
            .collect()
    }

    /// Fleet mode: nodes whose publications or room members are mirrored here.
    pub fn remote_nodes(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .remote_pubs
            .keys()
            .chain(self.remote_rooms.keys())
            .cloned()
            .collect();
        v.sort();
        v.dedup();
        v
    }

    /// Fleet mode: client `peer` on `node` joined (`on`) or left `room`. Mirrored into the
    /// local room, so members lists include it and local members get `joined`/`left`.
    pub fn remote_room(&mut self, node: &str, room: &str, peer: &str, on: bool) {
        let list = self.remote_rooms.entry(node.to_owned()).or_default();
        let had = list.iter().any(|(r, p)| r == room && p == peer);
        if on == had {
            return;
        }
        if on {
            list.push((room.to_owned(), peer.to_owned()));
        } else {
            list.retain(|(r, p)| !(r == room && p == peer));
        }
        if list.is_empty() {
            self.remote_rooms.remove(node);
        }
        let kind = if on { "joined" } else { "left" };
        let event = json!({"type": kind, "room": room, "peer": peer}).to_string();
        if on {
            self.broadcast_room(room, None, &event);
            self.rooms
                .entry(room.to_owned())
                .or_default()
                .push(peer.to_owned());
        } else {
            if let Some(m) = self.rooms.get_mut(room) {
                m.retain(|x| x != peer);
                if m.is_empty() {
                    self.rooms.remove(room);
                }
            }
            self.broadcast_room(room, None, &event);
        }
    }

    /// Fleet mode: local client `peer`'s publication of `key` lost the fleet-wide claim (another
    /// node's client published the same name first, `SET NX` in Redis): it is withdrawn
    /// (watchers and the client get `unpublished`) and the client gets a `name-taken` error.
    pub fn revoke_publication(&mut self, peer: &str, key: &DirKey) {
        let Some(conn) = self.conn_of(peer) else {
            return;
        };
        if self.unpublish(conn, peer, key) {
            self.error(
                conn,
                ErrorCode::NameTaken,
                "name published by a client on another node",
                None,
            );
        }
    }

    /// Fleet mode: client `peer` on `node` published (`on`) or withdrew `key`. Mirrored into
    /// the local directory, so lookups answer and watchers are told as for a local client.
    pub fn remote_dir(&mut self, node: &str, key: DirKey, peer: &str, on: bool) {
        let list = self.remote_pubs.entry(node.to_owned()).or_default();
        let had = list.iter().any(|(k, p)| *k == key && p == peer);
        if on == had {
            return;
        }
        if on {
            list.push((key.clone(), peer.to_owned()));
        } else {
            list.retain(|(k, p)| !(*k == key && p == peer));
        }
        if list.is_empty() {
            self.remote_pubs.remove(node);
        }
        let entry = self.dir.entry(key.clone()).or_default();
        if on {
            entry.publishers.push(peer.to_owned());
        } else {
            entry.publishers.retain(|p| p != peer);
        }
        let watchers = entry.watchers.clone();
        if entry.publishers.is_empty() && entry.watchers.is_empty() {
            self.dir.remove(&key);
        }
        let kind = if on { "published" } else { "unpublished" };
        let mut ev = json!({"type": kind, "peer": peer});
        key.put(&mut ev);
        let ev = ev.to_string();
        for w in watchers {
            self.send_text(w, ev.clone());
        }
    }

    fn node_gone_dir(&mut self, node: &str) {
        let Some(list) = self.remote_pubs.get(node).cloned() else {
            return;
        };
        info!(
            "fleet: node {node} is gone, withdrawing its {} publications",
            list.len()
        );
        for (k, p) in list {
            self.remote_dir(node, k, &p, false);
        }
    }

    /// Fleet mode: `node` died; everything mirrored from it is withdrawn (others told).
    pub fn node_gone(&mut self, node: &str) {
        self.node_gone_dir(node);
        let rooms = self.remote_rooms.get(node).cloned().unwrap_or_default();
        for (r, p) in rooms {
            self.remote_room(node, &r, &p, false);
        }
    }

    /// Fleet mode: destinations unknown here are routed to other nodes ([`Output::Route`]).
    pub fn set_fleet(&mut self, on: bool) {
        self.fleet = on;
    }

    /// Ids of live (connected) clients, for the fleet registry heartbeat.
    pub fn live_ids(&self) -> impl Iterator<Item = &str> {
        self.conns.values().map(|c| c.id.as_str())
    }

    /// The resume token of a live or reserved id (fleet mode registers its hash).
    pub fn resume_token(&self, id: &str) -> Option<&str> {
        self.ids.get(id).and_then(|e| e.resume.as_deref())
    }

    /// Fleet mode: `id` was taken over on another node (with its resume token, or by legacy
    /// takeover). Closes the local connection holding it and forgets the id here, so frames
    /// for it are routed to its new node.
    pub fn evict(&mut self, now: Instant, id: &str) {
        let Some(entry) = self.ids.remove(id) else {
            return;
        };
        if let IdState::Live(conn) = entry.state {
            info!("Client {id} resumed on another node");
            self.drop_conn(now, conn);
            metrics::gauge!("kyuu_signal_connections").set(self.conns.len() as f64);
            self.out.push_back(Output::Close {
                conn,
                code: 4000,
                reason: "replaced by a newer connection on another node",
            });
        }
    }

    /// Fleet mode: takes the messages held for `id` (after [`Hub::evict`]: its client resumed
    /// on another node, where the shell forwards them), oldest first.
    pub fn take_held(&mut self, id: &str) -> Vec<String> {
        let Some(q) = self.held.remove(id) else {
            return Vec::new();
        };
        self.held_total = self.held_total.saturating_sub(q.len());
        q.into_iter().map(|h| h.text).collect()
    }

    /// Fleet mode: no node has `to`. Holds the message like a local unknown destination
    /// (`buffer_unknown`) or answers the sender with `unknown-peer`.
    pub fn remote_unknown(
        &mut self,
        now: Instant,
        from_conn: ConnId,
        from: &str,
        to: &str,
        text: String,
    ) {
        if !self.is_current(from_conn) {
            return;
        }
        let here = self.ids.get(to).map(|e| &e.state);
        if let Some(IdState::Live(dst)) = here {
            // It connected here after the route was emitted.
            let dst = *dst;
            self.out.push_back(Output::Send { conn: dst, text });
            return;
        }
        let gone_here = matches!(here, Some(IdState::Gone { .. }));
        if gone_here || self.cfg.buffer_unknown {
            self.hold_text(now, from_conn, from, to, text);
        } else {
            info!("Client {to} not found in the fleet");
            metrics::counter!("kyuu_signal_dropped_total", "reason" => "unknown").increment(1);
            self.error(from_conn, ErrorCode::UnknownPeer, "no such peer", Some(to));
        }
    }

    /// Fleet mode: a frame routed here by another node for local client `to`. Returns `false`
    /// when `to` is neither live nor recently gone here (the frame is dropped).
    pub fn from_remote(&mut self, now: Instant, to: &str, text: String) -> bool {
        match self.ids.get(to).map(|e| &e.state) {
            Some(IdState::Live(dst)) => {
                let dst = *dst;
                debug!("Client {to} >> {text} (from fleet)");
                metrics::counter!("kyuu_signal_messages_relayed_total").increment(1);
                self.out.push_back(Output::Send { conn: dst, text });
                true
            }
            Some(IdState::Gone { .. }) => self.hold_remote(now, to, text),
            None => false,
        }
    }

    /// Fleet mode: a message that was held for `to` on another node, forwarded because `to`
    /// resumed here. Delivered like [`Hub::from_remote`], and also held when `to` is not
    /// connected yet (its handshake here may finish after the old node forwarded).
    pub fn held_from_remote(&mut self, now: Instant, to: &str, text: String) -> bool {
        if self.ids.contains_key(to) {
            return self.from_remote(now, to, text);
        }
        self.hold_remote(now, to, text)
    }

    fn hold_remote(&mut self, now: Instant, to: &str, text: String) -> bool {
        let ttl = self.cfg.pending_ttl();
        let per_peer = self.held.get(to).map_or(0, VecDeque::len);
        if ttl.is_zero()
            || per_peer >= self.cfg.pending_max_per_peer
            || self.held_total >= self.cfg.pending_max_total
        {
            return false;
        }
        let expires = now + ttl;
        // No local sender to tell when it expires: ConnId(0) is never a live connection.
        self.held.entry(to.to_owned()).or_default().push_back(Held {
            from_conn: ConnId(0),
            from_id: String::new(),
            text,
            expires,
        });
        self.held_total += 1;
        self.held_order.push_back((expires, to.to_owned()));
        true
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    /// The client id of a live connection.
    pub fn id_of(&self, conn: ConnId) -> Option<&str> {
        self.conns.get(&conn).map(|c| c.id.as_str())
    }

    /// The next output for the shell, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// When [`Hub::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let a = self.held_order.front().map(|(t, _)| *t);
        let b = self.gone_order.front().map(|(t, _)| *t);
        match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A WebSocket handshake arrived. On success the connection is live at once: messages for
    /// it may be output before the shell has finished the upgrade (the shell queues them).
    pub fn connect(&mut self, now: Instant, req: ConnectRequest) -> Result<Accepted, Refusal> {
        if self.conns.len() >= self.cfg.max_connections {
            return Err(Refusal::TooManyConnections);
        }
        if self.per_ip.get(&req.ip).copied().unwrap_or(0) >= self.cfg.max_connections_per_ip {
            return Err(Refusal::TooManyFromAddress);
        }
        let requested = req.id.filter(|s| !s.is_empty()).or_else(|| {
            // A token bound to one id names the id when the path does not.
            req.claims
                .as_ref()
                .filter(|c| c.sub != "*")
                .map(|c| c.sub.clone())
        });
        let assigned = requested.is_none();
        let id = match requested {
            Some(id) => {
                validate_id(&id, self.cfg.max_id_len)?;
                id
            }
            None => self.fresh_id(),
        };
        if let Some(c) = &req.claims {
            if !c.allows_id(&id) {
                return Err(Refusal::Forbidden(id));
            }
        }
        let v2 = req.v2 || assigned;

        // Ownership: who holds or reserved the id, and may this request take it?
        let mut replaced = None;
        if let Some(entry) = self.ids.get(&id) {
            let token_ok = match (&entry.resume, &req.resume) {
                (Some(have), Some(given)) => ct_eq(have.as_bytes(), given.as_bytes()),
                _ => false,
            };
            let owned = entry.resume.is_some();
            match entry.state {
                IdState::Live(old) if token_ok || (!owned && self.cfg.legacy_takeover) => {
                    replaced = Some(old)
                }
                IdState::Live(_) => return Err(Refusal::IdTaken(id)),
                IdState::Gone { .. } if owned && !token_ok => return Err(Refusal::IdTaken(id)),
                IdState::Gone { .. } => {}
            }
        }
        if let Some(old) = replaced {
            info!("Client {id} replaced by a new connection");
            self.drop_conn(now, old);
            self.out.push_back(Output::Close {
                conn: old,
                code: 4000,
                reason: "replaced by a newer connection with this id",
            });
        }

        let conn = ConnId(self.next_conn);
        self.next_conn = self.next_conn.saturating_add(1);
        let resume = v2.then(|| self.fresh_token());
        self.ids.insert(
            id.clone(),
            IdEntry {
                state: IdState::Live(conn),
                resume: resume.clone(),
            },
        );
        *self.per_ip.entry(req.ip).or_insert(0) += 1;
        self.conns.insert(
            conn,
            Conn {
                id: id.clone(),
                ip: req.ip,
                v2,
                claims: req.claims,
                bucket: TokenBucket::full(f64::from(self.cfg.rate_limit_burst), now),
                rooms: Vec::new(),
                pubs: Vec::new(),
                watches: Vec::new(),
            },
        );
        info!("Client {id} connected");
        metrics::counter!("kyuu_signal_connections_total").increment(1);
        metrics::gauge!("kyuu_signal_connections").set(self.conns.len() as f64);

        if v2 {
            let mut w = json!({
                "type": "welcome",
                "you": id,
                "resume": resume,
                "protocol": 2,
            });
            if let (Some(ice), Value::Object(m)) = (req.ice_servers, &mut w) {
                m.insert("iceServers".into(), ice);
            }
            self.send_json(conn, &w);
        }
        // Deliver what was held for this id while it was (re)connecting.
        if let Some(q) = self.held.remove(&id) {
            self.held_total = self.held_total.saturating_sub(q.len());
            for h in q {
                debug!("Client {id} >> {}", h.text);
                self.out.push_back(Output::Send { conn, text: h.text });
            }
        }
        Ok(Accepted { conn, id })
    }

    /// A connection ended (closed, failed, or cut off by the shell). Unknown or already
    /// replaced connections are ignored.
    pub fn disconnect(&mut self, now: Instant, conn: ConnId) {
        let Some(id) = self.drop_conn(now, conn) else {
            return;
        };
        info!("Client {id} disconnected");
        metrics::gauge!("kyuu_signal_connections").set(self.conns.len() as f64);
        // Generation check: only the connection that holds the id releases it.
        if let Some(entry) = self.ids.get_mut(&id) {
            if matches!(entry.state, IdState::Live(c) if c == conn) {
                let until = now + self.cfg.resume_grace().max(self.cfg.pending_ttl());
                entry.state = IdState::Gone { until };
                self.gone_order.push_back((until, id));
            }
        }
    }

    /// A binary frame arrived (not part of the protocol).
    pub fn binary(&mut self, _now: Instant, conn: ConnId, len: usize) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        debug!(
            "Client {} sent a binary frame of {len} bytes, dropped",
            c.id
        );
        metrics::counter!("kyuu_signal_dropped_total", "reason" => "binary").increment(1);
        self.error(
            conn,
            ErrorCode::BinaryUnsupported,
            "binary frames are not supported",
            None,
        );
    }

    /// A text frame arrived from `conn`.
    pub fn text(&mut self, now: Instant, conn: ConnId, text: &str) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !take_token(&mut c.bucket, now, &self.cfg) {
            metrics::counter!("kyuu_signal_dropped_total", "reason" => "rate").increment(1);
            debug!("Client {} over rate limit, frame dropped", c.id);
            self.error(conn, ErrorCode::RateLimited, "rate limit exceeded", None);
            return;
        }
        if text.len() > self.cfg.max_message_size {
            metrics::counter!("kyuu_signal_dropped_total", "reason" => "size").increment(1);
            debug!("Client {} sent {} bytes, over the limit", c.id, text.len());
            let msg = format!("message larger than {} bytes", self.cfg.max_message_size);
            self.error(conn, ErrorCode::TooLarge, &msg, None);
            return;
        }
        debug!("Client {} << {text}", c.id);
        let parsed = frame::parse(text);
        // The hot path, a relay to a live local client: no copy of the sender's id.
        if let (Ok(Inbound::Relay(r)), Some(c)) = (&parsed, self.conns.get(&conn)) {
            if let Some(IdEntry {
                state: IdState::Live(dst),
                ..
            }) = self.ids.get(&*r.to)
            {
                let text = r.rewrite(&c.id);
                debug!("Client {} >> {text}", r.to);
                metrics::counter!("kyuu_signal_messages_relayed_total").increment(1);
                self.out.push_back(Output::Send { conn: *dst, text });
                return;
            }
        }
        let from = self
            .conns
            .get(&conn)
            .map(|c| c.id.clone())
            .unwrap_or_default();
        match parsed {
            Ok(Inbound::Relay(r)) => self.relay(now, conn, &from, &r),
            Ok(Inbound::Control(ctl)) => {
                if let Some(c) = self.conns.get_mut(&conn) {
                    c.v2 = true;
                }
                self.control(conn, &from, ctl);
            }
            Err(e) => {
                metrics::counter!("kyuu_signal_dropped_total", "reason" => "invalid").increment(1);
                debug!("Client {from}: {e}, frame dropped");
                let code = match e {
                    FrameError::InvalidJson(_) => ErrorCode::InvalidJson,
                    FrameError::NotAnObject
                    | FrameError::IdNotString
                    | FrameError::NoIdNoType
                    | FrameError::BadControl(_) => ErrorCode::InvalidMessage,
                };
                self.error(conn, code, &e.to_string(), None);
            }
        }
    }

    /// Time passed: expire held messages and id reservations.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some((t, dst)) = self.held_order.front() {
            if *t > now {
                break;
            }
            let dst = dst.clone();
            self.held_order.pop_front();
            let mut expired = Vec::new();
            if let Some(q) = self.held.get_mut(&dst) {
                while q.front().is_some_and(|h| h.expires <= now) {
                    if let Some(h) = q.pop_front() {
                        expired.push(h);
                    }
                }
                if q.is_empty() {
                    self.held.remove(&dst);
                }
            }
            self.held_total = self.held_total.saturating_sub(expired.len());
            for h in expired {
                info!("Client {dst} not found, message from {} expired", h.from_id);
                metrics::counter!("kyuu_signal_dropped_total", "reason" => "expired").increment(1);
                if self.is_current(h.from_conn) {
                    self.error(
                        h.from_conn,
                        ErrorCode::PeerUnavailable,
                        "peer did not connect in time",
                        Some(&dst),
                    );
                }
            }
        }
        while let Some((t, id)) = self.gone_order.front() {
            if *t > now {
                break;
            }
            let id = id.clone();
            self.gone_order.pop_front();
            if matches!(self.ids.get(&id), Some(IdEntry { state: IdState::Gone { until }, .. }) if *until <= now)
            {
                self.ids.remove(&id);
            }
        }
    }

    fn is_current(&self, conn: ConnId) -> bool {
        self.conns.contains_key(&conn)
    }

    fn relay(&mut self, now: Instant, conn: ConnId, from: &str, r: &frame::RelayFrame<'_>) {
        let to: &str = &r.to;
        let target = self.ids.get(to).map(|e| &e.state);
        match target {
            Some(IdState::Live(dst)) => {
                let dst = *dst;
                let text = r.rewrite(from);
                debug!("Client {to} >> {text}");
                metrics::counter!("kyuu_signal_messages_relayed_total").increment(1);
                self.out.push_back(Output::Send { conn: dst, text });
            }
            // In a fleet a client gone from here may have reconnected to another node.
            Some(IdState::Gone { .. }) | None if self.fleet => {
                self.out.push_back(Output::Route {
                    from_conn: conn,
                    from: from.to_owned(),
                    to: to.to_owned(),
                    text: r.rewrite(from),
                });
            }
            Some(IdState::Gone { .. }) => self.hold(now, conn, from, to, r),
            None if self.cfg.buffer_unknown => self.hold(now, conn, from, to, r),
            None => {
                info!("Client {to} not found");
                metrics::counter!("kyuu_signal_dropped_total", "reason" => "unknown").increment(1);
                self.error(conn, ErrorCode::UnknownPeer, "no such peer", Some(to));
            }
        }
    }

    fn hold(
        &mut self,
        now: Instant,
        conn: ConnId,
        from: &str,
        to: &str,
        r: &frame::RelayFrame<'_>,
    ) {
        self.hold_text(now, conn, from, to, r.rewrite(from));
    }

    fn hold_text(&mut self, now: Instant, conn: ConnId, from: &str, to: &str, text: String) {
        let per_peer = self.held.get(to).map_or(0, VecDeque::len);
        let ttl = self.cfg.pending_ttl();
        if ttl.is_zero()
            || per_peer >= self.cfg.pending_max_per_peer
            || self.held_total >= self.cfg.pending_max_total
        {
            info!("Client {to} not connected, hold buffer full, message dropped");
            metrics::counter!("kyuu_signal_dropped_total", "reason" => "held-full").increment(1);
            self.error(
                conn,
                ErrorCode::PeerUnavailable,
                "peer not connected",
                Some(to),
            );
            return;
        }
        let expires = now + ttl;
        self.held.entry(to.to_owned()).or_default().push_back(Held {
            from_conn: conn,
            from_id: from.to_owned(),
            text,
            expires,
        });
        self.held_total += 1;
        self.held_order.push_back((expires, to.to_owned()));
        debug!("Client {to} not connected, message held");
    }

    fn control(&mut self, conn: ConnId, me: &str, ctl: Control) {
        match ctl {
            Control::Ping { ts } => {
                let mut v = json!({"type": "pong"});
                if let (Some(ts), Value::Object(m)) = (ts, &mut v) {
                    m.insert("ts".into(), Value::Number(ts));
                }
                self.send_json(conn, &v);
            }
            Control::Join { room } => self.join(conn, me, room),
            Control::Leave { room } => {
                if self.leave(conn, me, &room).is_none() {
                    self.error(conn, ErrorCode::InvalidMessage, "not in that room", None);
                }
            }
            Control::Members { room } => {
                let members = self.rooms.get(&room).cloned().unwrap_or_default();
                self.send_json(
                    conn,
                    &json!({"type": "members", "room": room, "members": members}),
                );
            }
            Control::Publish { key } => {
                if let Some(k) = self.dir_key(conn, key) {
                    self.publish(conn, me, k);
                }
            }
            Control::Unpublish { key } => {
                if let Some(k) = self.dir_key(conn, key) {
                    if !self.unpublish(conn, me, &k) {
                        self.error(conn, ErrorCode::InvalidMessage, "not published", None);
                    }
                }
            }
            Control::Lookup { key } => {
                if let Some(k) = self.dir_key(conn, key) {
                    self.lookup_reply(conn, &k);
                }
            }
            Control::Watch { key } => {
                if let Some(k) = self.dir_key(conn, key) {
                    self.watch(conn, k);
                }
            }
            Control::Unwatch { key } => {
                if let Some(k) = self.dir_key(conn, key) {
                    if let Some(c) = self.conns.get_mut(&conn) {
                        c.watches.retain(|w| *w != k);
                    }
                    self.remove_watcher(conn, &k);
                }
            }
        }
    }

    fn dir_key(&mut self, conn: ConnId, w: DirKeyWire) -> Option<DirKey> {
        let k = DirKey::from_wire(w, self.cfg.max_name_len);
        if k.is_none() {
            let msg = format!(
                "give exactly one of \"name\" or \"topic\", 1..={} bytes",
                self.cfg.max_name_len
            );
            self.error(conn, ErrorCode::InvalidMessage, &msg, None);
        }
        k
    }

    fn join(&mut self, conn: ConnId, me: &str, room: String) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if room.is_empty() || room.len() > self.cfg.max_name_len {
            self.error(conn, ErrorCode::InvalidMessage, "bad room name", None);
            return;
        }
        if c.claims.as_ref().is_some_and(|cl| !cl.allows_room(&room)) {
            self.error(
                conn,
                ErrorCode::Forbidden,
                "token does not grant this room",
                None,
            );
            return;
        }
        let already = c.rooms.contains(&room);
        if !already {
            if c.rooms.len() >= self.cfg.max_subscriptions {
                self.error(conn, ErrorCode::LimitReached, "too many rooms", None);
                return;
            }
            let members = self.rooms.get(&room).map_or(0, Vec::len);
            if members >= self.cfg.max_room_members {
                self.error(conn, ErrorCode::LimitReached, "room is full", None);
                return;
            }
            let event = json!({"type": "joined", "room": room, "peer": me}).to_string();
            self.broadcast_room(&room, None, &event);
            if self.fleet {
                self.out.push_back(Output::Room {
                    room: room.clone(),
                    peer: me.to_owned(),
                    on: true,
                });
            }
            self.rooms
                .entry(room.clone())
                .or_default()
                .push(me.to_owned());
            if let Some(c) = self.conns.get_mut(&conn) {
                c.rooms.push(room.clone());
            }
        }
        let members = self.rooms.get(&room).cloned().unwrap_or_default();
        self.send_json(
            conn,
            &json!({"type": "members", "room": room, "members": members}),
        );
    }

    /// Removes `me` from `room`, telling the remaining members and `me`. `None` if not a member.
    fn leave(&mut self, conn: ConnId, me: &str, room: &str) -> Option<()> {
        let c = self.conns.get_mut(&conn)?;
        let pos = c.rooms.iter().position(|r| r == room)?;
        c.rooms.swap_remove(pos);
        if let Some(m) = self.rooms.get_mut(room) {
            m.retain(|x| x != me);
            if m.is_empty() {
                self.rooms.remove(room);
            }
        }
        let event = json!({"type": "left", "room": room, "peer": me}).to_string();
        self.broadcast_room(room, None, &event);
        self.send_text(conn, event);
        if self.fleet {
            self.out.push_back(Output::Room {
                room: room.to_owned(),
                peer: me.to_owned(),
                on: false,
            });
        }
        Some(())
    }

    fn broadcast_room(&mut self, room: &str, except: Option<&str>, text: &str) {
        let Some(members) = self.rooms.get(room) else {
            return;
        };
        let targets: Vec<ConnId> = members
            .iter()
            .filter(|m| Some(m.as_str()) != except)
            .filter_map(|m| match self.ids.get(m).map(|e| &e.state) {
                Some(IdState::Live(c)) => Some(*c),
                Some(IdState::Gone { .. }) | None => None,
            })
            .collect();
        for t in targets {
            self.out.push_back(Output::Send {
                conn: t,
                text: text.to_owned(),
            });
        }
    }

    fn publish(&mut self, conn: ConnId, me: &str, k: DirKey) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let already = c.pubs.contains(&k);
        if !already && c.pubs.len() >= self.cfg.max_subscriptions {
            self.error(conn, ErrorCode::LimitReached, "too many publications", None);
            return;
        }
        let entry = self.dir.entry(k.clone()).or_default();
        if let DirKey::Name(_) = k {
            if entry.publishers.iter().any(|p| p != me) {
                self.error(
                    conn,
                    ErrorCode::NameTaken,
                    "name published by another client",
                    None,
                );
                return;
            }
        }
        let mut ack = json!({"type": "published", "peer": me});
        k.put(&mut ack);
        let ack = ack.to_string();
        if !already {
            entry.publishers.push(me.to_owned());
            let watchers = entry.watchers.clone();
            if self.fleet {
                self.out.push_back(Output::Dir {
                    key: k.clone(),
                    peer: me.to_owned(),
                    on: true,
                });
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.pubs.push(k);
            }
            for w in watchers.into_iter().filter(|w| *w != conn) {
                self.send_text(w, ack.clone());
            }
        }
        self.send_text(conn, ack);
    }

    /// Withdraws `me`'s publication `k`, telling watchers. False if it was not published.
    fn unpublish(&mut self, conn: ConnId, me: &str, k: &DirKey) -> bool {
        let Some(c) = self.conns.get_mut(&conn) else {
            return false;
        };
        let Some(pos) = c.pubs.iter().position(|p| p == k) else {
            return false;
        };
        c.pubs.swap_remove(pos);
        if self.fleet {
            self.out.push_back(Output::Dir {
                key: k.clone(),
                peer: me.to_owned(),
                on: false,
            });
        }
        let mut ev = json!({"type": "unpublished", "peer": me});
        k.put(&mut ev);
        let ev = ev.to_string();
        let mut notify = Vec::new();
        if let Some(e) = self.dir.get_mut(k) {
            e.publishers.retain(|p| p != me);
            notify.clone_from(&e.watchers);
            if e.publishers.is_empty() && e.watchers.is_empty() {
                self.dir.remove(k);
            }
        }
        for w in notify {
            self.send_text(w, ev.clone());
        }
        if self.is_current(conn) {
            self.send_text(conn, ev);
        }
        true
    }

    fn lookup_reply(&mut self, conn: ConnId, k: &DirKey) {
        let peers = self
            .dir
            .get(k)
            .map(|e| e.publishers.clone())
            .unwrap_or_default();
        let mut v = json!({"type": "lookup", "peers": peers});
        k.put(&mut v);
        self.send_json(conn, &v);
    }

    fn watch(&mut self, conn: ConnId, k: DirKey) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if !c.watches.contains(&k) {
            if c.watches.len() >= self.cfg.max_subscriptions {
                self.error(conn, ErrorCode::LimitReached, "too many watches", None);
                return;
            }
            c.watches.push(k.clone());
            self.dir.entry(k.clone()).or_default().watchers.push(conn);
        }
        self.lookup_reply(conn, &k);
    }

    fn remove_watcher(&mut self, conn: ConnId, k: &DirKey) {
        if let Some(e) = self.dir.get_mut(k) {
            e.watchers.retain(|w| *w != conn);
            if e.publishers.is_empty() && e.watchers.is_empty() {
                self.dir.remove(k);
            }
        }
    }

    /// Removes a connection and everything it held (rooms, publications, watches), notifying
    /// others. Leaves the id table alone. Returns the client id, `None` if not live.
    fn drop_conn(&mut self, _now: Instant, conn: ConnId) -> Option<String> {
        let c = self.conns.get(&conn)?;
        let id = c.id.clone();
        let rooms = c.rooms.clone();
        let pubs = c.pubs.clone();
        for r in rooms {
            let _ = self.leave(conn, &id, &r);
        }
        for p in pubs {
            self.unpublish(conn, &id, &p);
        }
        let c = self.conns.remove(&conn)?;
        for w in &c.watches {
            self.remove_watcher(conn, w);
        }
        if let Some(n) = self.per_ip.get_mut(&c.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_ip.remove(&c.ip);
            }
        }
        // Anything already queued for it is moot.
        self.out.retain(|o| match o {
            Output::Send { conn: c, .. } => *c != conn,
            Output::Close { .. }
            | Output::Route { .. }
            | Output::Dir { .. }
            | Output::Room { .. } => true,
        });
        Some(id)
    }

    fn error(&mut self, conn: ConnId, code: ErrorCode, message: &str, peer: Option<&str>) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if !c.v2 {
            // Legacy clients never receive anything but relayed frames.
            return;
        }
        let mut v = json!({"type": "error", "code": code.as_str(), "message": message});
        if let (Some(p), Value::Object(m)) = (peer, &mut v) {
            m.insert("peer".into(), Value::String(p.to_owned()));
        }
        self.send_json(conn, &v);
    }

    fn send_json(&mut self, conn: ConnId, v: &Value) {
        self.send_text(conn, v.to_string());
    }

    fn send_text(&mut self, conn: ConnId, text: String) {
        self.out.push_back(Output::Send { conn, text });
    }

    fn fresh_id(&mut self) -> String {
        let len = self.cfg.assigned_id_len.clamp(4, 32);
        loop {
            let id: String = (0..len)
                .map(|_| char::from(b"0123456789abcdef"[self.rng.gen_range(0..16)]))
                .collect();
            if !self.ids.contains_key(&id) {
                return id;
            }
        }
    }

    fn fresh_token(&mut self) -> String {
        let bytes: [u8; 16] = self.rng.gen();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn validate_id(id: &str, max_len: usize) -> Result<(), Refusal> {
    if id.len() > max_len {
        return Err(Refusal::InvalidId("too long"));
    }
    if !id
        .bytes()
        .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'?' | b'#' | b'"' | b'\\'))
    {
        return Err(Refusal::InvalidId(
            "only printable ASCII without / ? # \" \\",
        ));
    }
    Ok(())
}

/// One message's worth from the connection's bucket (`rate_limit_per_sec`, `rate_limit_burst`).
fn take_token(b: &mut TokenBucket, now: Instant, cfg: &SignalConfig) -> bool {
    let burst = f64::from(cfg.rate_limit_burst.max(1));
    b.take(1.0, f64::from(cfg.rate_limit_per_sec), burst, now)
}

/// Constant-time equality for resume tokens.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests;

// Operator views (listing connections and rooms) for the admin API.
mod admin;
pub use admin::{ConnInfo, RoomInfo};
