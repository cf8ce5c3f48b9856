//! The server core in virtual time: no sockets, every error path.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_client::turn::{AllocateOptions, Client, Event};
use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};
use kyuu_turn::*;

const UNIX0: u64 = 1_700_000_000;

struct Pair {
    now: Instant,
    server: Server,
    client: Client,
    sock: ClientSocket,
    /// Relay instructions the server produced (client -> peer).
    to_peer: Vec<(ToPeer, Vec<u8>)>,
    /// Outputs other than transmits to this client.
    other: Vec<Output>,
    bind_fail: u32,
    next_relay_port: u16,
}

fn cfg() -> TurnConfig {
    TurnConfig {
        users: vec![UserConfig {
            name: "alice".into(),
            password: Some("secret".into()),
            key: None,
            key_sha256: None,
        }],
        static_auth_secrets: vec!["rest-secret".into()],
        relay_ipv4: Some("198.51.100.1".parse().unwrap()),
        allow_peers: vec![],
        ..Default::default()
    }
}

fn server(cfg: TurnConfig, t0: Instant) -> Server {
    let ports = cfg.relay_ports;
    Server::new(
        cfg,
        ServerOptions {
            rfc5780: None,
            shared: Shared::new([9; 32], t0, UNIX0),
            ports,
            extension: true,
            seed: 42,
            shard: 0,
        },
    )
    .unwrap()
}

impl Pair {
    fn new(cfg: TurnConfig) -> Self {
        Self::with(cfg, Client::new("alice", "secret", false), Transport::Udp)
    }

    fn with(cfg: TurnConfig, client: Client, transport: Transport) -> Self {
        let now = Instant::now();
        Pair {
            now,
            server: server(cfg, now),
            client,
            sock: ClientSocket {
                transport,
                local: "198.51.100.1:3478".parse().unwrap(),
                remote: "203.0.113.5:40000".parse().unwrap(),
            },
            to_peer: Vec::new(),
            other: Vec::new(),
            bind_fail: 0,
            next_relay_port: 0,
        }
    }

    fn raw_to_server(&mut self, bytes: &[u8]) {
        if let Some(tp) = self.server.handle_client(self.now, self.sock, bytes) {
            self.to_peer.push((tp.clone(), bytes[tp.data].to_vec()));
        }
        self.pump_server();
    }

    fn pump_server(&mut self) {
        while let Some(o) = self.server.poll_output() {
            match o {
                Output::Transmit(t) if t.client == self.sock => {
                    self.client.handle_input(self.now, &t.data);
                }
                Output::BindRelay { key, addr, .. } => {
                    if self.bind_fail > 0 {
                        self.bind_fail -= 1;
                        self.server.relay_bound(self.now, key, Err(()));
                    } else {
                        self.next_relay_port = addr.port();
                        self.server.relay_bound(self.now, key, Ok(addr));
                    }
                }
                o => self.other.push(o),
            }
        }
    }

    /// Runs client transmissions through the server until quiet; returns the client's events.
    fn run(&mut self) -> Vec<Event> {
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

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.server.handle_timeout(self.now);
        self.pump_server();
    }

    fn allocate(&mut self) -> SocketAddr {
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

    fn expect_error(&mut self, code: u16) {
        let ev = self.run();
        assert!(
            matches!(ev.as_slice(), [Event::Error { code: c, .. }] if *c == code),
            "expected {code}, got {ev:?}"
        );
    }

    /// A peer datagram arriving on the relay; returns what the client got.
    fn peer_sends(&mut self, peer: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; PEER_HEADROOM + data.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + data.len()].copy_from_slice(data);
        let relay = RelayKey {
            alloc: AllocId {
                slot: 0,
                generation: 0,
            },
            family: Family::of(&peer),
        };
        let tc = self.server.handle_peer(
            self.now,
            relay,
            PeerAddr(peer),
            &mut buf,
            PEER_HEADROOM..PEER_HEADROOM + data.len(),
        )?;
        assert_eq!(tc.client, self.sock);
        Some(buf[tc.data].to_vec())
    }
}

fn peer() -> SocketAddr {
    "8.8.8.8:5000".parse().unwrap()
}

#[test]
fn allocate_permission_send_data_channel() {
    let mut p = Pair::new(cfg());
    let relayed = p.allocate();
    assert_eq!(relayed.ip().to_string(), "198.51.100.1");
    assert_eq!(p.server.allocation_count(), 1);

    // No permission yet: Send indication dropped, peer data dropped.
    p.client.send_indication(peer(), b"hello");
    p.run();
    assert!(p.to_peer.is_empty());
    assert!(p.peer_sends(peer(), b"x").is_none());

    p.client.create_permission(p.now, &[peer()]);
    assert_eq!(p.run(), vec![Event::PermissionCreated]);
    p.client.send_indication(peer(), b"hello");
    p.run();
    let (tp, data) = p.to_peer.pop().unwrap();
    assert_eq!(tp.peer.0, peer());
    assert_eq!(data, b"hello");

    // Peer -> client as a Data indication.
    let out = p.peer_sends(peer(), b"world").unwrap();
    p.client.handle_input(p.now, &out);
    assert_eq!(
        p.client.poll_event(),
        Some(Event::Data {
            peer: peer(),
            data: b"world".to_vec()
        })
    );
    // Other port of a permitted IP is fine too (permissions are per IP).
    let other: SocketAddr = "8.8.8.8:6000".parse().unwrap();
    assert!(p.peer_sends(other, b"w").is_some());

    // Channel.
    p.client.channel_bind(p.now, 0x4001, peer());
    assert_eq!(
        p.run(),
        vec![Event::ChannelBound {
            channel: 0x4001,
            peer: peer()
        }]
    );
    let mut buf = [0u8; 64];
    let n = p.client.channel_data(0x4001, b"abc", &mut buf).unwrap();
    p.raw_to_server(&buf[..n]);
    let (tp, data) = p.to_peer.pop().unwrap();
    assert_eq!((tp.peer.0, data.as_slice()), (peer(), &b"abc"[..]));
    let out = p.peer_sends(peer(), b"defg").unwrap();
    assert_eq!(out, [0x40, 0x01, 0, 4, b'd', b'e', b'f', b'g']);

    // Unbound channel: dropped.
    let n = p.client.channel_data(0x4002, b"abc", &mut buf).unwrap();
    p.raw_to_server(&buf[..n]);
    assert!(p.to_peer.is_empty());

    // Channel binding conflicts: same number other peer, same peer other number -> 400.
    p.client.channel_bind(p.now, 0x4001, other);
    p.expect_error(400);
    p.client.channel_bind(p.now, 0x4003, peer());
    p.expect_error(400);
    // Out-of-range channel number.
    p.client.channel_bind(p.now, 0x3FFF, peer());
    p.expect_error(400);
    p.client.channel_bind(p.now, 0x8000, peer());
    p.expect_error(400);

    // Permission expiry: after 300 s without refresh, peer data is dropped; the channel (600 s)
    // alone does not keep it alive.
    p.advance(Duration::from_secs(301));
    assert!(p.peer_sends(other, b"late").is_none());
}

#[test]
fn forbidden_peers_get_403_on_every_path() {
    let mut p = Pair::new(cfg());
    p.allocate();
    for bad in [
        "127.0.0.1:9",
        "10.0.0.1:9",
        "192.168.1.1:9",
        "100.64.0.1:9",
        "198.18.0.1:9",
        "0.0.0.0:9",
        "224.0.0.1:9",
        "255.255.255.255:9",
    ] {
        let a: SocketAddr = bad.parse().unwrap();
        p.client.create_permission(p.now, &[a]);
        p.expect_error(403);
        p.client.channel_bind(p.now, 0x4000, a);
        p.expect_error(403);
        p.client.send_indication(a, b"x");
        p.run();
        assert!(p.to_peer.is_empty());
    }
    // IPv6 peers on an IPv4-only allocation: 443.
    p.client
        .create_permission(p.now, &["[2606:4700::1]:9".parse().unwrap()]);
    p.expect_error(443);
    // With an allow-list entry loopback works.
    let mut c = cfg();
    c.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    let mut p = Pair::new(c);
    p.allocate();
    p.client
        .create_permission(p.now, &["127.0.0.1:9".parse().unwrap()]);
    assert_eq!(p.run(), vec![Event::PermissionCreated]);
    p.client
        .create_permission(p.now, &["10.0.0.1:9".parse().unwrap()]);
    p.expect_error(403);
}

#[test]
fn auth_failures_stale_nonce_and_rest() {
    // Wrong password: 401 twice -> error.
    let mut p = Pair::with(cfg(), Client::new("alice", "wrong", false), Transport::Udp);
    p.client.allocate(p.now);
    p.expect_error(401);
    let mut p = Pair::with(cfg(), Client::new("mallory", "x", false), Transport::Udp);
    p.client.allocate(p.now);
    p.expect_error(401);

    // Stale nonce: 438, then the retry with the new nonce works.
    let mut c = cfg();
    c.default_lifetime = 1200;
    let mut p = Pair::new(c);
    p.allocate();
    p.advance(Duration::from_secs(601));
    p.client.refresh(p.now, 1200);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 1200 }]);

    // REST credentials, including rotation (two secrets) and expiry.
    let mut c = cfg();
    c.static_auth_secrets = vec!["old".into(), "new".into()];
    for secret in ["old", "new"] {
        let (u, pw) = rest_credentials(secret, "bob", UNIX0, 3600);
        let mut p = Pair::with(c.clone(), Client::new(&u, &pw, false), Transport::Udp);
        p.allocate();
    }
    let (u, pw) = rest_credentials("new", "bob", UNIX0 - 7200, 3600);
    let mut p = Pair::with(c.clone(), Client::new(&u, &pw, false), Transport::Udp);
    p.client.allocate(p.now);
    p.expect_error(401);
    let (u, pw) = rest_credentials("unknown", "bob", UNIX0, 3600);
    let mut p = Pair::with(c, Client::new(&u, &pw, false), Transport::Udp);
    p.client.allocate(p.now);
    p.expect_error(401);

    // SHA-256 password algorithm and USERHASH.
    let mut p = Pair::with(
        cfg(),
        Client::new("alice", "secret", false).with_sha256(),
        Transport::Udp,
    );
    p.allocate();
    let mut p = Pair::with(
        cfg(),
        Client::new("alice", "secret", false).with_userhash(),
        Transport::Udp,
    );
    p.allocate();
}

fn raw_request(m: u16, f: impl FnOnce(&mut MessageBuilder<'_>)) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, m, Class::Request, TransactionId([7; 12])).unwrap();
    f(&mut b);
    let n = b.finish();
    buf.truncate(n);
    buf
}

#[test]
fn unauthenticated_gets_challenge_forged_nonce_gets_438() {
    let mut p = Pair::new(cfg());
    let req = raw_request(method::ALLOCATE, |b| b.add_requested_transport(17).unwrap());
    assert!(p.server.handle_client(p.now, p.sock, &req).is_none());
    let Some(Output::Transmit(t)) = p.server.poll_output() else {
        panic!()
    };
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 401);
    assert!(m.nonce().is_some() && m.realm().is_some());
    assert!(m.has(attr::PASSWORD_ALGORITHMS));
    // MESSAGE-INTEGRITY with a forged nonce: 438.
    let key = kyuu_stun::integrity::Key::long_term_md5("alice", "kyuu", "secret");
    let req = raw_request(method::ALLOCATE, |b| {
        b.add_requested_transport(17).unwrap();
        b.add(attr::USERNAME, b"alice").unwrap();
        b.add(attr::REALM, b"kyuu").unwrap();
        b.add(attr::NONCE, b"obMatJos2AAAAforgedforgedforgedforged")
            .unwrap();
        b.add_integrity(&key).unwrap();
    });
    p.server.handle_client(p.now, p.sock, &req);
    let Some(Output::Transmit(t)) = p.server.poll_output() else {
        panic!()
    };
    assert_eq!(
        Message::parse(&t.data)
            .unwrap()
            .error_code()
            .unwrap()
            .unwrap()
            .code,
        438
    );
    // Integrity without USERNAME/REALM: 400.
    let req = raw_request(method::ALLOCATE, |b| {
        b.add_requested_transport(17).unwrap();
        b.add_integrity(&key).unwrap();
    });
    p.server.handle_client(p.now, p.sock, &req);
    let Some(Output::Transmit(t)) = p.server.poll_output() else {
        panic!()
    };
    assert_eq!(
        Message::parse(&t.data)
            .unwrap()
            .error_code()
            .unwrap()
            .unwrap()
            .code,
        400
    );
    // Unknown method: 400. Extension method: handed to the shell.
    let req = raw_request(0x0FF, |_| {});
    p.server.handle_client(p.now, p.sock, &req);
    let Some(Output::Transmit(t)) = p.server.poll_output() else {
        panic!()
    };
    assert_eq!(
        Message::parse(&t.data)
            .unwrap()
            .error_code()
            .unwrap()
            .unwrap()
            .code,
        400
    );
    let req = raw_request(0xC01, |_| {});
    p.server.handle_client(p.now, p.sock, &req);
    assert!(matches!(
        p.server.poll_output(),
        Some(Output::Extension { .. })
    ));
}

#[test]
fn unauthenticated_answers_are_rate_limited() {
    let mut c = cfg();
    c.unauth_rate = 5;
    c.unauth_burst = 5;
    let mut p = Pair::new(c);
    let req = raw_request(method::BINDING, |_| {});
    let mut answered = 0;
    for _ in 0..50 {
        p.server.handle_client(p.now, p.sock, &req);
        while p.server.poll_output().is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 5);
    p.advance(Duration::from_secs(1));
    p.server.handle_client(p.now, p.sock, &req);
    assert!(p.server.poll_output().is_some());
}

#[test]
fn allocation_errors() {
    // 437: second Allocate on the same 5-tuple; Refresh without allocation.
    let mut p = Pair::new(cfg());
    p.client.refresh(p.now, 600);
    p.expect_error(437);
    p.allocate();
    p.client.allocate(p.now);
    p.expect_error(437);
    // 442: unknown transport; TCP over UDP.
    let mut p = Pair::new(cfg());
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            transport: Some(99),
            ..Default::default()
        },
    );
    p.expect_error(442);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            transport: Some(6),
            ..Default::default()
        },
    );
    p.expect_error(442);
    // 440: IPv6 without a v6 relay address; unknown family.
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            family: Some(2),
            ..Default::default()
        },
    );
    p.expect_error(440);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            family: Some(9),
            ..Default::default()
        },
    );
    p.expect_error(440);
    // 400: EVEN-PORT with RESERVATION-TOKEN; unknown RESERVATION-TOKEN: 508.
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            even_port: Some(false),
            reservation_token: Some(1),
            ..Default::default()
        },
    );
    p.expect_error(400);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            reservation_token: Some(1),
            ..Default::default()
        },
    );
    p.expect_error(508);
    // 420 with UNKNOWN-ATTRIBUTES for an unknown comprehension-required attribute.
    let mut p = Pair::new(cfg());
    p.allocate();
    // 486: quotas.
    let mut c = cfg();
    c.user_quota = 1;
    let t0 = Instant::now();
    let mut s = server(c, t0);
    let mut codes = Vec::new();
    for port in [1000u16, 1001] {
        let sock = ClientSocket {
            transport: Transport::Udp,
            local: "198.51.100.1:3478".parse().unwrap(),
            remote: SocketAddr::from(([203, 0, 113, 5], port)),
        };
        let mut cl = Client::new("alice", "secret", false);
        cl.allocate(t0);
        let mut last = None;
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
        while let Some(e) = cl.poll_event() {
            last = Some(e);
        }
        codes.push(last);
    }
    assert!(matches!(codes[0], Some(Event::Allocated { .. })));
    assert!(
        matches!(codes[1], Some(Event::Error { code: 486, .. })),
        "{codes:?}"
    );
    // 508: no relay port can be bound.
    let mut p = Pair::new(cfg());
    p.bind_fail = 100;
    p.client.allocate(p.now);
    p.expect_error(508);
    assert_eq!(p.server.allocation_count(), 0);
    // A failed bind is retried on another port.
    let mut p = Pair::new(cfg());
    p.bind_fail = 2;
    p.allocate();
    // 300: alternate server.
    let mut c = cfg();
    c.alternate_server = Some("192.0.2.9:3478".parse().unwrap());
    let mut p = Pair::new(c);
    p.client.allocate(p.now);
    p.expect_error(300);
}

#[test]
fn even_port_reservation_dual_stack() {
    let mut c = cfg();
    c.relay_ipv6 = Some("2001:db8::1".parse().unwrap());
    let mut p = Pair::new(c.clone());
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            even_port: Some(true),
            ..Default::default()
        },
    );
    let ev = p.run();
    let [Event::Allocated {
        relayed,
        reservation_token: Some(token),
        ..
    }] = ev.as_slice()
    else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed[0].port() % 2, 0);
    let even = relayed[0].port();
    // Another client uses the token and gets port + 1.
    let mut q = Pair::with(
        c.clone(),
        Client::new("alice", "secret", false),
        Transport::Udp,
    );
    q.server = std::mem::replace(&mut p.server, server(c.clone(), p.now));
    q.sock.remote = "203.0.113.6:1".parse().unwrap();
    q.client.allocate_with(
        q.now,
        &AllocateOptions {
            reservation_token: Some(*token),
            ..Default::default()
        },
    );
    let ev = q.run();
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed[0].port(), even + 1);
    // Dual allocation: IPv4 + IPv6.
    let mut p = Pair::new(c);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            additional_ipv6: true,
            ..Default::default()
        },
    );
    let ev = p.run();
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
    // ADDITIONAL-ADDRESS-FAMILY with REQUESTED-ADDRESS-FAMILY: 400.
    p.sock.remote = "203.0.113.7:1".parse().unwrap();
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            additional_ipv6: true,
            family: Some(1),
            ..Default::default()
        },
    );
    p.expect_error(400);
    // Dual without IPv6 relay: IPv4 only plus ADDRESS-ERROR-CODE.
    let mut p = Pair::new(cfg());
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            additional_ipv6: true,
            ..Default::default()
        },
    );
    let ev = p.run();
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed.len(), 1);
}

#[test]
fn lifetimes_refresh_expiry_and_retransmits() {
    let mut p = Pair::new(cfg());
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            lifetime: Some(99_999),
            ..Default::default()
        },
    );
    let ev = p.run();
    assert!(
        matches!(ev.as_slice(), [Event::Allocated { lifetime: 3600, .. }]),
        "{ev:?}"
    );
    p.client.refresh(p.now, 10);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 600 }]);
    // Retransmission of the same request: the cached answer, no second allocation.
    p.client.refresh(p.now, 700);
    let req = p.client.poll_transmit().unwrap();
    p.raw_to_server(&req);
    p.raw_to_server(&req);
    let ev = p.run();
    assert_eq!(ev.len(), 1, "{ev:?}");
    // Expiry frees the allocation and its relay.
    p.advance(Duration::from_secs(701));
    assert_eq!(p.server.allocation_count(), 0);
    assert!(p
        .other
        .iter()
        .any(|o| matches!(o, Output::CloseRelay { .. })));
    // Refresh to zero deletes at once.
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.refresh(p.now, 0);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 0 }]);
    assert_eq!(p.server.allocation_count(), 0);
    // 441: a different user on an existing allocation.
    let mut p = Pair::new(cfg());
    p.allocate();
    let mut c = cfg();
    c.users.push(UserConfig {
        name: "bob".into(),
        password: Some("pw".into()),
        key: None,
        key_sha256: None,
    });
    let mut q = Pair::with(c.clone(), Client::new("bob", "pw", false), Transport::Udp);
    q.allocate();
    q.client = Client::new("alice", "secret", false);
    q.client.refresh(q.now, 600);
    q.expect_error(441);
}

#[test]
fn rfc6062_connect_and_connection_bind() {
    let mut p = Pair::with(cfg(), Client::new("alice", "secret", true), Transport::Tcp);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            transport: Some(6),
            ..Default::default()
        },
    );
    assert!(matches!(p.run().as_slice(), [Event::Allocated { .. }]));
    p.client.channel_bind(p.now, 0x4000, peer());
    p.expect_error(400);
    p.client.connect(p.now, "127.0.0.1:80".parse().unwrap());
    p.expect_error(403);
    p.client.connect(p.now, peer());
    p.run();
    let Some(Output::ConnectPeer { connection_id, .. }) = p.other.pop() else {
        panic!("{:?}", p.other)
    };
    p.server.peer_connected(p.now, connection_id, true);
    p.pump_server();
    assert_eq!(p.run(), vec![Event::Connected { connection_id }]);
    p.client.connect(p.now, peer());
    p.expect_error(446);
    // ConnectionBind on a new connection.
    let data_sock = ClientSocket {
        remote: "203.0.113.5:40001".parse().unwrap(),
        ..p.sock
    };
    let mut dc = Client::new("alice", "secret", true);
    dc.share_credentials(&p.client);
    dc.connection_bind(p.now, connection_id);
    let b = dc.poll_transmit().unwrap();
    p.server.handle_client(p.now, data_sock, &b);
    let mut spliced = false;
    while let Some(o) = p.server.poll_output() {
        match o {
            Output::Transmit(t) => dc.handle_input(p.now, &t.data),
            Output::SpliceConnection {
                connection_id: c,
                client,
            } => {
                spliced = c == connection_id && client == data_sock;
            }
            _ => {}
        }
    }
    assert!(spliced);
    assert_eq!(dc.poll_event(), Some(Event::ConnectionBound));
    // Failed connect: 447.
    p.client.connect(p.now, "8.8.4.4:80".parse().unwrap());
    p.run();
    let Some(Output::ConnectPeer { connection_id, .. }) = p.other.pop() else {
        panic!()
    };
    p.server.peer_connected(p.now, connection_id, false);
    p.pump_server();
    assert!(matches!(
        p.run().as_slice(),
        [Event::Error { code: 447, .. }]
    ));
    // Peer-initiated: ConnectionAttempt for a permitted peer, refused otherwise.
    let relay = RelayKey {
        alloc: AllocId {
            slot: 0,
            generation: 0,
        },
        family: Family::V4,
    };
    assert!(p
        .server
        .peer_connection_accepted(p.now, relay, PeerAddr("1.1.1.1:5".parse().unwrap()))
        .is_none());
    let id = p
        .server
        .peer_connection_accepted(p.now, relay, PeerAddr("8.8.8.8:7".parse().unwrap()))
        .unwrap();
    p.pump_server();
    assert_eq!(
        p.client.poll_event(),
        Some(Event::ConnectionAttempt {
            connection_id: id,
            peer: "8.8.8.8:7".parse().unwrap()
        })
    );
    // Closing the control connection ends the allocation.
    p.server.client_closed(p.now, p.sock);
    assert_eq!(p.server.allocation_count(), 0);
}

#[test]
fn stream_channel_data_is_padded() {
    let mut p = Pair::with(cfg(), Client::new("alice", "secret", true), Transport::Tcp);
    p.allocate();
    p.client.channel_bind(p.now, 0x4000, peer());
    p.run();
    let out = p.peer_sends(peer(), b"abcde").unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(&out[..4], &[0x40, 0, 0, 5]);
}

#[test]
fn turn_request_with_unknown_required_attribute_gets_420() {
    let mut p = Pair::new(cfg());
    p.allocate();
    // Build an authenticated CreatePermission by hand with an unknown attribute.
    p.client.create_permission(p.now, &[peer()]);
    let good = p.client.poll_transmit().unwrap();
    let m = Message::parse(&good).unwrap();
    let nonce = m.nonce().unwrap().to_vec();
    let key = kyuu_stun::integrity::Key::long_term_md5("alice", "kyuu", "secret");
    let req = raw_request(method::CREATE_PERMISSION, |b| {
        b.add_xor_address(attr::XOR_PEER_ADDRESS, peer()).unwrap();
        b.add(0x7ABC, &[0; 4]).unwrap();
        b.add(attr::USERNAME, b"alice").unwrap();
        b.add(attr::REALM, b"kyuu").unwrap();
        b.add(attr::NONCE, &nonce).unwrap();
        b.add_integrity(&key).unwrap();
    });
    p.server.handle_client(p.now, p.sock, &req);
    let Some(Output::Transmit(t)) = p.server.poll_output() else {
        panic!()
    };
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 420);
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x7A, 0xBC]);
    assert!(m.verify_integrity(&key).is_ok());
}

#[test]
fn bandwidth_cap_drops_excess() {
    let mut c = cfg();
    c.max_bps = 1000;
    let mut p = Pair::new(c);
    p.allocate();
    p.client.channel_bind(p.now, 0x4000, peer());
    p.run();
    let mut buf = [0u8; 600];
    let n = p
        .client
        .channel_data(0x4000, &[7u8; 400], &mut buf)
        .unwrap();
    for _ in 0..5 {
        p.raw_to_server(&buf[..n]);
    }
    // 1000 bytes of budget: two 400-byte payloads pass, the rest is dropped.
    assert_eq!(p.to_peer.len(), 2);
    p.advance(Duration::from_secs(1));
    p.raw_to_server(&buf[..n]);
    assert_eq!(p.to_peer.len(), 3);
    // The other direction has its own budget.
    assert!(p.peer_sends(peer(), &[1u8; 400]).is_some());
}

#[test]
fn total_and_per_client_quotas() {
    for (total, client) in [(1, 0), (0, 1)] {
        let mut c = cfg();
        c.total_quota = total;
        c.client_quota = client;
        let t0 = Instant::now();
        let mut s = server(c, t0);
        let mut results = Vec::new();
        for port in [1000u16, 1001] {
            let sock = ClientSocket {
                transport: Transport::Udp,
                local: "198.51.100.1:3478".parse().unwrap(),
                remote: SocketAddr::from(([203, 0, 113, 5], port)),
            };
            let mut cl = Client::new("alice", "secret", false);
            cl.allocate(t0);
            while let Some(b) = cl.poll_transmit() {
                s.handle_client(t0, sock, &b);
                while let Some(o) = s.poll_output() {
                    match o {
                        Output::Transmit(t) => cl.handle_input(t0, &t.data),
                        Output::BindRelay { key, addr, .. } => s.relay_bound(t0, key, Ok(addr)),
                        _ => {}
                    }
                }
            }
            results.push(cl.poll_event());
        }
        assert!(matches!(results[0], Some(Event::Allocated { .. })));
        assert!(
            matches!(results[1], Some(Event::Error { code: 486, .. })),
            "{results:?}"
        );
    }
}

#[test]
fn expired_channel_number_is_reserved_for_five_minutes() {
    let mut c = cfg();
    c.default_lifetime = 3600;
    let mut p = Pair::new(c);
    p.allocate();
    p.client.channel_bind(p.now, 0x4000, peer());
    p.run();
    p.advance(Duration::from_secs(601));
    // Expired: nothing relayed on it.
    let mut buf = [0u8; 64];
    let n = p.client.channel_data(0x4000, b"x", &mut buf).unwrap();
    p.raw_to_server(&buf[..n]);
    assert!(p.to_peer.is_empty());
    // The number cannot go to another peer yet, but can be bound again to the same one.
    p.client
        .channel_bind(p.now, 0x4000, "8.8.4.4:1".parse().unwrap());
    p.expect_error(400);
    p.advance(Duration::from_secs(300));
    p.client
        .channel_bind(p.now, 0x4000, "8.8.4.4:1".parse().unwrap());
    assert!(matches!(p.run().as_slice(), [Event::ChannelBound { .. }]));
}
