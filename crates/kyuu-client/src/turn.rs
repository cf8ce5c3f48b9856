//! kyuu's one TURN client, sans-IO ([RFC 8656](https://www.rfc-editor.org/rfc/rfc8656):
//! Allocate with long-term credentials, Refresh, CreatePermission, ChannelBind, Send and Data
//! indications, ChannelData; RFC 6062 Connect/ConnectionBind; a STUN Binding), used by the TURN
//! core's tests, the fuzz target, the RAWR lab and tests, and the benchmark's setup.
//!
//! The contract: feed every datagram or frame from the server to [`Client::handle_input`], then
//! drain [`Client::poll_transmit`] and [`Client::poll_event`]; call [`Client::handle_timeout`]
//! at [`Client::poll_timeout`]. Time is always passed in; the client owns no socket or clock.
//! Requests are retransmitted on the one schedule of [`crate::transaction`] (RFC 8489 §6.2.1
//! over UDP: RTO 500 ms doubling, Rc 7, Rm 16; one 39.5 s timeout over TCP/TLS, §6.2.2). A 401
//! or 438 answer is handled inside: the request is sent again with the realm and nonce the
//! server gave. [`crate::turn_udp`] wraps it over a tokio UDP socket.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::Instant;

use kyuu_stun::integrity::{userhash, Key};
use kyuu_stun::{attr, method, ChannelData, Class, Message, MessageBuilder, TransactionId};

use crate::transaction::{RetransmitConfig, Timer, TimerAction};

/// What the client learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Allocated {
        relayed: Vec<SocketAddr>,
        mapped: Option<SocketAddr>,
        lifetime: u32,
        reservation_token: Option<u64>,
    },
    Refreshed {
        lifetime: u32,
    },
    PermissionCreated,
    ChannelBound {
        channel: u16,
        peer: SocketAddr,
    },
    /// RFC 6062: the server connected to the peer; bind a data connection with this id.
    Connected {
        connection_id: u32,
    },
    /// RFC 6062: a peer connected to the relayed address.
    ConnectionAttempt {
        connection_id: u32,
        peer: SocketAddr,
    },
    ConnectionBound,
    /// An error answer that was not a credential challenge (or a second challenge in a row).
    Error {
        method: u16,
        code: u16,
        reason: String,
    },
    /// 300 Try Alternate with ALTERNATE-SERVER (RFC 8489 §10): the server (a draining node of
    /// a fleet, say) asks for the request to be sent to `alternate` instead.
    TryAlternate {
        method: u16,
        alternate: SocketAddr,
    },
    /// A request got no answer.
    Timeout {
        method: u16,
    },
    Data {
        peer: SocketAddr,
        data: Vec<u8>,
    },
    ChannelData {
        channel: u16,
        data: Vec<u8>,
    },
    /// A Data indication carrying an ICMP attribute (RFC 8656 §11.5, §18.13): the relay got an
    /// ICMP error for a datagram it sent to `peer` (the port is 0 when the server cannot tell).
    Icmp {
        peer: SocketAddr,
        icmp: attr::Icmp,
    },
    /// A STUN Binding answer.
    Mapped {
        mapped: SocketAddr,
    },
}

/// Options of an Allocate request.
#[derive(Debug, Clone, Default)]
pub struct AllocateOptions {
    /// REQUESTED-TRANSPORT: `attr::TRANSPORT_UDP` (default) or `attr::TRANSPORT_TCP` (RFC 6062).
    pub transport: Option<u8>,
    /// REQUESTED-ADDRESS-FAMILY.
    pub family: Option<u8>,
    /// ADDITIONAL-ADDRESS-FAMILY IPv6 (dual allocation).
    pub additional_ipv6: bool,
    /// EVEN-PORT with the R bit as given.
    pub even_port: Option<bool>,
    pub reservation_token: Option<u64>,
    pub lifetime: Option<u32>,
    pub dont_fragment: bool,
}

#[derive(Debug, Clone)]
enum A {
    Raw(u16, Vec<u8>),
    XorPeer(SocketAddr),
}

#[derive(Debug, Clone)]
struct Pending {
    method: u16,
    attrs: Vec<A>,
    timer: Timer,
    bytes: Vec<u8>,
    challenged: bool,
}

/// The client state machine.
#[derive(Debug)]
pub struct Client {
    username: String,
    password: String,
    realm: Option<String>,
    nonce: Option<Vec<u8>>,
    key: Option<Key>,
    sha256: bool,
    use_userhash: bool,
    server_algs: Option<Vec<u8>>,
    stream: bool,
    retransmit: RetransmitConfig,
    pending: HashMap<TransactionId, Pending>,
    out: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    relayed: Vec<SocketAddr>,
    channels: Vec<(u16, SocketAddr)>,
    rng: u64,
}

impl Client {
    /// A client with long-term credentials. `stream`: the transport is TCP/TLS (no
    /// retransmissions; ChannelData padded). The username is sent in its OpaqueString form
    /// (RFC 8489 §14.3; a name without one is sent as given, and the server refuses it); the
    /// password is prepared when the key is made (§9.2.2).
    pub fn new(username: &str, password: &str, stream: bool) -> Self {
        let username =
            kyuu_stun::opaque_string(username).map_or_else(|_| username.into(), |u| u.into_owned());
        Client {
            username,
            password: password.into(),
            realm: None,
            nonce: None,
            key: None,
            sha256: false,
            use_userhash: false,
            server_algs: None,
            stream,
            retransmit: if stream {
                RetransmitConfig::reliable()
            } else {
                RetransmitConfig::udp()
            },
            pending: HashMap::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            relayed: Vec::new(),
            channels: Vec::new(),
            rng: rand::random::<u64>() | 1,
        }
    }

    /// Use PASSWORD-ALGORITHM SHA-256 when the server offers it.
    pub fn with_sha256(mut self) -> Self {
        self.sha256 = true;
        self
    }

    /// Replaces the retransmission schedule (for example a shorter overall bound for a tool
    /// that expects some requests to go unanswered).
    pub fn with_retransmit(mut self, cfg: RetransmitConfig) -> Self {
        self.retransmit = cfg;
        self
    }

    /// Send USERHASH instead of USERNAME.
    pub fn with_userhash(mut self) -> Self {
        self.use_userhash = true;
        self
    }

    pub fn relayed(&self) -> &[SocketAddr] {
        &self.relayed
    }

    fn tid(&mut self) -> TransactionId {
        let mut t = [0u8; 12];
        for chunk in t.chunks_mut(4) {
            let mut x = self.rng;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng = x;
            chunk.copy_from_slice(&x.to_le_bytes()[..4]);
        }
        TransactionId(t)
    }

    fn build(&self, m: u16, class: Class, tid: TransactionId, attrs: &[A]) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut buf, m, class, tid).ok()?;
        for a in attrs {
            match a {
                A::Raw(t, v) => b.add(*t, v).ok()?,
                A::XorPeer(p) => b.add_xor_address(attr::XOR_PEER_ADDRESS, *p).ok()?,
            }
        }
        if class == Class::Request && m != method::BINDING {
            if let (Some(realm), Some(nonce), Some(key)) = (&self.realm, &self.nonce, &self.key) {
                if self.use_userhash {
                    b.add(attr::USERHASH, &userhash(&self.username, realm))
                        .ok()?;
                } else {
                    b.add(attr::USERNAME, self.username.as_bytes()).ok()?;
                }
                b.add(attr::REALM, realm.as_bytes()).ok()?;
                b.add(attr::NONCE, nonce).ok()?;
                if let (true, Some(algs)) = (self.sha256, &self.server_algs) {
                    b.add_password_algorithm(attr::PASSWORD_ALGORITHM_SHA256)
                        .ok()?;
                    b.add(attr::PASSWORD_ALGORITHMS, algs).ok()?;
                }
                b.add_integrity(key).ok()?;
            }
        }
        b.add_fingerprint().ok()?;
        let n = b.finish();
        buf.truncate(n);
        Some(buf)
    }

    fn request(&mut self, now: Instant, m: u16, attrs: Vec<A>) -> TransactionId {
        let tid = self.tid();
        let bytes = self
            .build(m, Class::Request, tid, &attrs)
            .unwrap_or_default();
        let mut timer = Timer::new(self.retransmit, now);
        // The first poll is the first transmission, due now.
        if timer.poll(now) == TimerAction::Send {
            self.out.push_back(bytes.clone());
        }
        self.pending.insert(
            tid,
            Pending {
                method: m,
                attrs,
                timer,
                bytes,
                challenged: false,
            },
        );
        tid
    }

    /// A STUN Binding request.
    pub fn binding(&mut self, now: Instant) -> TransactionId {
        self.request(now, method::BINDING, Vec::new())
    }

    /// Allocate a UDP relay.
    pub fn allocate(&mut self, now: Instant) -> TransactionId {
        self.allocate_with(now, &AllocateOptions::default())
    }

    pub fn allocate_with(&mut self, now: Instant, o: &AllocateOptions) -> TransactionId {
        let mut a = vec![A::Raw(
            attr::REQUESTED_TRANSPORT,
            vec![o.transport.unwrap_or(attr::TRANSPORT_UDP), 0, 0, 0],
        )];
        if let Some(f) = o.family {
            a.push(A::Raw(attr::REQUESTED_ADDRESS_FAMILY, vec![f, 0, 0, 0]));
        }
        if o.additional_ipv6 {
            a.push(A::Raw(
                attr::ADDITIONAL_ADDRESS_FAMILY,
                vec![attr::FAMILY_IPV6, 0, 0, 0],
            ));
        }
        if let Some(r) = o.even_port {
            a.push(A::Raw(attr::EVEN_PORT, vec![if r { 0x80 } else { 0 }]));
        }
        if let Some(t) = o.reservation_token {
            a.push(A::Raw(attr::RESERVATION_TOKEN, t.to_be_bytes().to_vec()));
        }
        if let Some(l) = o.lifetime {
            a.push(A::Raw(attr::LIFETIME, l.to_be_bytes().to_vec()));
        }
        if o.dont_fragment {
            a.push(A::Raw(attr::DONT_FRAGMENT, Vec::new()));
        }
        self.request(now, method::ALLOCATE, a)
    }

    pub fn refresh(&mut self, now: Instant, lifetime: u32) -> TransactionId {
        self.request(
            now,
            method::REFRESH,
            vec![A::Raw(attr::LIFETIME, lifetime.to_be_bytes().to_vec())],
        )
    }

    pub fn create_permission(&mut self, now: Instant, peers: &[SocketAddr]) -> TransactionId {
        let a = peers.iter().map(|p| A::XorPeer(*p)).collect();
        self.request(now, method::CREATE_PERMISSION, a)
    }

    pub fn channel_bind(&mut self, now: Instant, channel: u16, peer: SocketAddr) -> TransactionId {
        let c = channel.to_be_bytes();
        self.request(
            now,
            method::CHANNEL_BIND,
            vec![
                A::Raw(attr::CHANNEL_NUMBER, vec![c[0], c[1], 0, 0]),
                A::XorPeer(peer),
            ],
        )
    }

    /// RFC 6062 Connect.
    pub fn connect(&mut self, now: Instant, peer: SocketAddr) -> TransactionId {
        self.request(now, method::CONNECT, vec![A::XorPeer(peer)])
    }

    /// RFC 6062 ConnectionBind, to be sent on a new data connection (use a separate `Client`
    /// with the same credentials for that connection).
    pub fn connection_bind(&mut self, now: Instant, connection_id: u32) -> TransactionId {
        self.request(
            now,
            method::CONNECTION_BIND,
            vec![A::Raw(
                attr::CONNECTION_ID,
                connection_id.to_be_bytes().to_vec(),
            )],
        )
    }

    /// Copies realm, nonce and key from another client (a data connection reusing a control
    /// connection's credentials).
    pub fn share_credentials(&mut self, other: &Client) {
        self.realm.clone_from(&other.realm);
        self.nonce.clone_from(&other.nonce);
        self.key.clone_from(&other.key);
        self.server_algs.clone_from(&other.server_algs);
    }

    /// A Send indication carrying `data` to `peer` (queued for transmission).
    pub fn send_indication(&mut self, peer: SocketAddr, data: &[u8]) {
        self.send_indication_with(peer, data, false);
    }

    /// A Send indication; `dont_fragment` adds DONT-FRAGMENT (RFC 8656 §11.2, §18.9): the
    /// server sends this datagram with DF.
    pub fn send_indication_with(&mut self, peer: SocketAddr, data: &[u8], dont_fragment: bool) {
        let tid = self.tid();
        let mut a = vec![A::XorPeer(peer), A::Raw(attr::DATA, data.to_vec())];
        if dont_fragment {
            a.push(A::Raw(attr::DONT_FRAGMENT, Vec::new()));
        }
        if let Some(b) = self.build(method::SEND, Class::Indication, tid, &a) {
            self.out.push_back(b);
        }
    }

    /// A ChannelData message into `out`; returns its length.
    pub fn channel_data(&self, channel: u16, data: &[u8], out: &mut [u8]) -> Option<usize> {
        ChannelData::encode(channel, data, self.stream, out).ok()
    }

    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Retransmits unanswered requests and fails those whose time is up
    /// ([`Event::Timeout`]), on the schedule of [`crate::transaction::Timer`].
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut dead = Vec::new();
        for (tid, p) in self.pending.iter_mut() {
            // Bounded: a timer sends at most once per poll.
            match p.timer.poll(now) {
                TimerAction::Wait(_) => {}
                TimerAction::Send => self.out.push_back(p.bytes.clone()),
                TimerAction::Expired => dead.push(*tid),
            }
        }
        dead.sort_unstable_by_key(|t| t.0);
        for tid in dead {
            if let Some(p) = self.pending.remove(&tid) {
                self.events.push_back(Event::Timeout { method: p.method });
            }
        }
    }

    /// When [`Client::handle_timeout`] next has something to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.timer.next_wakeup()).min()
    }

    /// A datagram or frame from the server.
    pub fn handle_input(&mut self, now: Instant, data: &[u8]) {
        if data.first().is_some_and(|b| b & 0xC0 == 0x40) {
            if let Ok(cd) = ChannelData::parse(data) {
                self.events.push_back(Event::ChannelData {
                    channel: cd.channel.get(),
                    data: cd.data.to_vec(),
                });
            }
            return;
        }
        let Ok(msg) = Message::parse(data) else {
            return;
        };
        match msg.class() {
            Class::Indication => self.indication(&msg),
            Class::Success | Class::Error => self.response(now, &msg),
            Class::Request => {}
        }
    }

    fn indication(&mut self, msg: &Message<'_>) {
        match msg.method() {
            method::DATA => {
                let Some(Ok(peer)) = msg.xor_address(attr::XOR_PEER_ADDRESS) else {
                    return;
                };
                if let Some(d) = msg.get(attr::DATA) {
                    self.events.push_back(Event::Data {
                        peer,
                        data: d.to_vec(),
                    });
                } else if let Some(Ok(icmp)) = msg.get(attr::ICMP).map(attr::decode_icmp) {
                    self.events.push_back(Event::Icmp { peer, icmp });
                }
            }
            method::CONNECTION_ATTEMPT => {
                if let (Some(Ok(peer)), Some(Ok(id))) = (
                    msg.xor_address(attr::XOR_PEER_ADDRESS),
                    msg.u32_attr(attr::CONNECTION_ID),
                ) {
                    self.events.push_back(Event::ConnectionAttempt {
                        connection_id: id,
                        peer,
                    });
                }
            }
            _ => {}
        }
    }

    fn response(&mut self, now: Instant, msg: &Message<'_>) {
        let Some(p) = self.pending.remove(msg.transaction_id()) else {
            return;
        };
        if msg.class() == Class::Error {
            let (code, reason) = match msg.error_code() {
                Some(Ok(e)) => (e.code, e.reason.to_owned()),
                _ => (0, String::new()),
            };
            if (code == 401 || code == 438) && !(p.challenged && code == 401) {
                let (Some(Ok(realm)), Some(nonce)) = (msg.realm(), msg.nonce()) else {
                    self.events.push_back(Event::Error {
                        method: p.method,
                        code,
                        reason,
                    });
                    return;
                };
                self.realm = Some(realm.to_owned());
                self.nonce = Some(nonce.to_vec());
                self.server_algs = msg.get(attr::PASSWORD_ALGORITHMS).map(<[u8]>::to_vec);
                let sha = self.sha256 && self.server_algs.is_some();
                let key = if sha {
                    Key::long_term_sha256(&self.username, realm, &self.password)
                } else {
                    Key::long_term_md5(&self.username, realm, &self.password)
                };
                let Ok(key) = key else {
                    // RFC 8489 §9.2.2: no key from a password (or realm) OpaqueString refuses.
                    self.events.push_back(Event::Error {
                        method: p.method,
                        code,
                        reason: "credential is not a valid OpaqueString (RFC 8265)".into(),
                    });
                    return;
                };
                self.key = Some(key);
                let tid = self.request(now, p.method, p.attrs);
                if let Some(np) = self.pending.get_mut(&tid) {
                    np.challenged = code == 401;
                }
                return;
            }
            if code == 300 {
                if let Some(Ok(alternate)) = msg.address(attr::ALTERNATE_SERVER) {
                    self.events.push_back(Event::TryAlternate {
                        method: p.method,
                        alternate,
                    });
                    return;
                }
            }
            self.events.push_back(Event::Error {
                method: p.method,
                code,
                reason,
            });
            return;
        }
        if let Some(key) = &self.key {
            if p.method != method::BINDING && msg.verify_integrity(key).is_err() {
                self.events.push_back(Event::Error {
                    method: p.method,
                    code: 0,
                    reason: "response integrity check failed".into(),
                });
                return;
            }
        }
        let ev = match p.method {
            method::BINDING => match msg.xor_address(attr::XOR_MAPPED_ADDRESS) {
                Some(Ok(mapped)) => Event::Mapped { mapped },
                _ => return,
            },
            method::ALLOCATE => {
                let relayed: Vec<SocketAddr> = msg
                    .effective_attrs()
                    .filter(|a| a.attr_type == attr::XOR_RELAYED_ADDRESS)
                    .filter_map(|a| {
                        attr::decode_xor_address(a.attr_type, a.value, msg.transaction_id()).ok()
                    })
                    .collect();
                self.relayed.clone_from(&relayed);
                Event::Allocated {
                    relayed,
                    mapped: msg
                        .xor_address(attr::XOR_MAPPED_ADDRESS)
                        .and_then(Result::ok),
                    lifetime: msg
                        .u32_attr(attr::LIFETIME)
                        .and_then(Result::ok)
                        .unwrap_or(0),
                    reservation_token: msg
                        .get(attr::RESERVATION_TOKEN)
                        .and_then(|v| attr::decode_u64(attr::RESERVATION_TOKEN, v).ok()),
                }
            }
            method::REFRESH => Event::Refreshed {
                lifetime: msg
                    .u32_attr(attr::LIFETIME)
                    .and_then(Result::ok)
                    .unwrap_or(0),
            },
            method::CREATE_PERMISSION => Event::PermissionCreated,
            method::CHANNEL_BIND => {
                let mut channel = 0;
                let mut peer = None;
                for a in &p.attrs {
                    match a {
                        A::Raw(attr::CHANNEL_NUMBER, v) => {
                            channel = attr::decode_channel_number(v).unwrap_or(0);
                        }
                        A::XorPeer(pa) => peer = Some(*pa),
                        A::Raw(..) => {}
                    }
                }
                let Some(peer) = peer else { return };
                self.channels.retain(|(c, _)| *c != channel);
                self.channels.push((channel, peer));
                Event::ChannelBound { channel, peer }
            }
            method::CONNECT => match msg.u32_attr(attr::CONNECTION_ID) {
                Some(Ok(connection_id)) => Event::Connected { connection_id },
                _ => return,
            },
            method::CONNECTION_BIND => Event::ConnectionBound,
            _ => return,
        };
        self.events.push_back(ev);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sends times (ms after the first) and when the Timeout event came, with no server answering.
    fn unanswered(stream: bool) -> (Vec<u64>, Option<u64>) {
        let t0 = Instant::now();
        let mut c = Client::new("u", "p", stream);
        c.allocate(t0);
        let mut sends = Vec::new();
        let mut now = t0;
        for _ in 0..100 {
            while c.poll_transmit().is_some() {
                sends.push((now - t0).as_millis() as u64);
            }
            if let Some(Event::Timeout { method }) = c.poll_event() {
                assert_eq!(method, method::ALLOCATE);
                return (sends, Some((now - t0).as_millis() as u64));
            }
            let Some(at) = c.poll_timeout() else { break };
            now = at;
            c.handle_timeout(now);
        }
        (sends, None)
    }

    #[test]
    fn udp_requests_follow_rfc_8489_retransmission() {
        let (sends, timeout) = unanswered(false);
        assert_eq!(sends, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(timeout, Some(39_500));
    }

    #[test]
    fn stream_requests_are_sent_once_and_time_out_after_ti() {
        let (sends, timeout) = unanswered(true);
        assert_eq!(sends, vec![0]);
        assert_eq!(timeout, Some(39_500));
    }
}
