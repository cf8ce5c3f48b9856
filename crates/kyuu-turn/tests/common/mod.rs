//! The harness the core tests share: a [`Pair`] of the sans-IO server and the sans-IO client in
//! virtual time, with the shell's part (binding relay sockets, relaying) played by the test.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_stun::{attr, Class, ErrorCode, Message, MessageBuilder, TransactionId};
use kyuu_turn::*;

/// The wall clock at the test's start (for TURN REST expiry times).
pub const UNIX0: u64 = 1_700_000_000;
/// The server's listening address in every test.
pub const SERVER: &str = "198.51.100.1:3478";

/// alice/secret, a REST secret, an IPv4 relay address, the default (safe) peer policy.
pub fn cfg() -> TurnConfig {
    TurnConfig {
        users: vec![user("alice", "secret")],
        static_auth_secrets: vec!["rest-secret".into()],
        relay_ipv4: Some("198.51.100.1".parse().unwrap()),
        allow_peers: vec![],
        ..Default::default()
    }
}

pub fn user(name: &str, password: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: Some(password.into()),
        key: None,
        key_sha256: None,
    }
}

pub fn server(cfg: TurnConfig, t0: Instant) -> Server {
    server_with(cfg, t0, None)
}

pub fn server_with(cfg: TurnConfig, t0: Instant, rfc5780: Option<Rfc5780>) -> Server {
    let ports = cfg.relay_ports;
    Server::new(
        cfg,
        ServerOptions {
            rfc5780,
            shared: Shared::new([9; 32], t0, UNIX0),
            ports,
            extension: true,
            seed: 42,
            shard: 0,
        },
    )
    .unwrap()
}

/// A public peer the default policy allows.
pub fn peer() -> SocketAddr {
    "8.8.8.8:5000".parse().unwrap()
}

pub fn client_socket(transport: Transport, remote: &str) -> ClientSocket {
    ClientSocket {
        transport,
        local: SERVER.parse().unwrap(),
        remote: remote.parse().unwrap(),
    }
}

/// The server and one client in virtual time.
pub struct Pair {
    pub now: Instant,
    pub server: Server,
    pub client: Client,
    pub sock: ClientSocket,
    /// Relay instructions the server produced (client -> peer), with the payload.
    pub to_peer: Vec<(ToPeer, Vec<u8>)>,
    /// Outputs other than transmits to this client and relay binds.
    pub other: Vec<Output>,
    /// How many of the next relay binds the "shell" fails.
    pub bind_fail: u32,
}

impl Pair {
    /// alice over UDP.
    pub fn new(cfg: TurnConfig) -> Self {
        Self::with(cfg, Client::new("alice", "secret", false), Transport::Udp)
    }

    pub fn with(cfg: TurnConfig, client: Client, transport: Transport) -> Self {
        let now = Instant::now();
        Pair {
            now,
            server: server(cfg, now),
            client,
            sock: client_socket(transport, "203.0.113.5:40000"),
            to_peer: Vec::new(),
            other: Vec::new(),
            bind_fail: 0,
        }
    }

    /// alice over TCP (RFC 6062 needs a stream).
    pub fn tcp(cfg: TurnConfig) -> Self {
        Self::with(cfg, Client::new("alice", "secret", true), Transport::Tcp)
    }

    pub fn raw_to_server(&mut self, bytes: &[u8]) {
        if let Some(tp) = self.server.handle_client(self.now, self.sock, bytes) {
            self.to_peer.push((tp.clone(), bytes[tp.data].to_vec()));
        }
        self.pump_server();
    }

    /// Plays the shell: transmits to this client go to the client, relay binds succeed (unless
    /// `bind_fail`), the rest is kept in `other`.
    pub fn pump_server(&mut self) {
        while let Some(o) = self.server.poll_output() {
            match o {
                Output::Transmit(t) if t.client == self.sock => {
                    self.client.handle_input(self.now, &t.data);
                }
                Output::BindRelay { key, addr, .. } => {
                    if self.bind_fail > 0 {
                        self.bind_fail -= 1;
                        let e = BindFailed(std::io::ErrorKind::AddrInUse);
                        self.server.relay_bound(self.now, key, Err(e));
                    } else {
                        self.server.relay_bound(self.now, key, Ok(addr));
                    }
                }
                o => self.other.push(o),
            }
        }
    }

    /// Runs client transmissions through the server until quiet; returns the client's events.
    pub fn run(&mut self) -> Vec<Event> {
        for _ in 0..20 {
            let mut any = false;
            while let Some(b) = self.client.poll_transmit() {
                any = true;
                self.raw_to_server(&b);
            }
            if !any {
                break;
            }
        }
        let mut ev = Vec::new();
        while let Some(e) = self.client.poll_event() {
            ev.push(e);
        }
        ev
    }

    pub fn advance(&mut self, d: Duration) {
        self.now += d;
        self.server.handle_timeout(self.now);
        self.pump_server();
    }

    /// Allocates and returns the (first) relayed address.
    pub fn allocate(&mut self) -> SocketAddr {
        self.client.allocate(self.now);
        let ev = self.run();
        match ev.as_slice() {
            [Event::Allocated {
                relayed, mapped, ..
            }] => {
                assert_eq!(*mapped, Some(self.sock.remote));
                relayed[0]
            }
            other => panic!("allocate: {other:?}"),
        }
    }

    /// Runs the client's pending request and asserts it failed with `code`.
    pub fn expect_error(&mut self, code: ErrorCode) {
        let ev = self.run();
        assert!(
            matches!(ev.as_slice(), [Event::Error { code: c, .. }] if *c == code.code()),
            "expected {code}, got {ev:?}"
        );
    }

    pub fn permit(&mut self, peer: SocketAddr) {
        self.client.create_permission(self.now, &[peer]);
        assert_eq!(self.run(), vec![Event::PermissionCreated]);
    }

    pub fn bind_channel(&mut self, number: u16, peer: SocketAddr) {
        self.client.channel_bind(self.now, number, peer);
        assert_eq!(
            self.run(),
            vec![Event::ChannelBound {
                channel: number,
                peer
            }]
        );
    }

    /// The client sends ChannelData on `number`; returns the payload relayed to a peer, if any.
    pub fn channel_data(&mut self, number: u16, data: &[u8]) -> Option<(SocketAddr, Vec<u8>)> {
        let mut buf = vec![0u8; data.len() + 8];
        let n = self.client.channel_data(number, data, &mut buf).unwrap();
        self.raw_to_server(&buf[..n]);
        self.to_peer.pop().map(|(tp, d)| (tp.peer.addr(), d))
    }

    /// The client sends a Send indication; returns the payload relayed to a peer, if any.
    pub fn send_indication(
        &mut self,
        peer: SocketAddr,
        data: &[u8],
    ) -> Option<(SocketAddr, Vec<u8>)> {
        self.client.send_indication(peer, data);
        self.run();
        self.to_peer.pop().map(|(tp, d)| (tp.peer.addr(), d))
    }

    /// The first allocation's relay socket of `family`.
    pub fn relay(&self, family: Family) -> RelayKey {
        RelayKey {
            alloc: AllocId {
                slot: 0,
                generation: 0,
            },
            family,
        }
    }

    /// A peer datagram arriving on the relay; returns what the client got.
    pub fn peer_sends(&mut self, peer: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        let relay = self.relay(Family::of(&peer));
        self.peer_sends_on(relay, peer, data)
    }

    pub fn peer_sends_on(
        &mut self,
        relay: RelayKey,
        peer: SocketAddr,
        data: &[u8],
    ) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; PEER_HEADROOM + data.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + data.len()].copy_from_slice(data);
        let payload = PEER_HEADROOM..PEER_HEADROOM + data.len();
        let tc =
            self.server
                .handle_peer(self.now, relay, PeerAddr::new(peer), &mut buf, payload)?;
        assert_eq!(tc.client, self.sock);
        Some(buf[tc.data].to_vec())
    }

    /// A request the client builds with its current credentials (nonce, key), with `extra`
    /// attributes before them; for requests the client API cannot express.
    pub fn authed_request(
        &mut self,
        m: u16,
        extra: impl FnOnce(&mut MessageBuilder<'_>),
    ) -> Vec<u8> {
        // Let the client fetch a nonce if it has none yet.
        self.client.create_permission(self.now, &[peer()]);
        let probe = self.client.poll_transmit().unwrap();
        let nonce = Message::parse(&probe).unwrap().nonce().unwrap().to_vec();
        let key = alice_key();
        raw_request(m, |b| {
            extra(b);
            b.add(attr::USERNAME, b"alice").unwrap();
            b.add(attr::REALM, b"kyuu").unwrap();
            b.add(attr::NONCE, &nonce).unwrap();
            b.add_integrity(&key).unwrap();
        })
    }

    /// Sends raw bytes and returns the server's answer to this client, if any.
    pub fn exchange(&mut self, bytes: &[u8]) -> Option<Transmit> {
        assert!(self
            .server
            .handle_client(self.now, self.sock, bytes)
            .is_none());
        next_transmit(&mut self.server)
    }
}

pub fn alice_key() -> kyuu_stun::integrity::Key {
    kyuu_stun::integrity::Key::long_term_md5("alice", "kyuu", "secret").unwrap()
}

/// An unauthenticated request with transaction id 7,7,...
pub fn raw_request(m: u16, f: impl FnOnce(&mut MessageBuilder<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, m, Class::Request, TransactionId([7; 12])).unwrap();
    f(&mut b);
    let n = b.finish();
    buf.truncate(n);
    buf
}

/// The next Transmit the server queued (other outputs skipped).
pub fn next_transmit(server: &mut Server) -> Option<Transmit> {
    while let Some(o) = server.poll_output() {
        if let Output::Transmit(t) = o {
            return Some(t);
        }
    }
    None
}

/// The ERROR-CODE number of an answer.
pub fn error_code(answer: &[u8]) -> Option<u16> {
    Some(Message::parse(answer).ok()?.error_code()?.ok()?.code)
}

/// Allocates for alice from `remote` against a server shared by several clients; returns the
/// client's last event.
pub fn allocate_from(s: &mut Server, t0: Instant, remote: &str) -> Option<Event> {
    let sock = client_socket(Transport::Udp, remote);
    let mut cl = Client::new("alice", "secret", false);
    cl.allocate(t0);
    for _ in 0..4 {
        let Some(b) = cl.poll_transmit() else { break };
        s.handle_client(t0, sock, &b);
        while let Some(o) = s.poll_output() {
            match o {
                Output::Transmit(t) => cl.handle_input(t0, &t.data),
                Output::BindRelay { key, addr, .. } => s.relay_bound(t0, key, Ok(addr)),
                _ => {}
            }
        }
    }
    let mut last = None;
    while let Some(e) = cl.poll_event() {
        last = Some(e);
    }
    last
}
