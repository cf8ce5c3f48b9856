//! RFC 8656 over real sockets: ICMP errors for relayed datagrams reach the client (§11.5,
//! §18.13), DF on the wire follows DONT-FRAGMENT (§7.2, §11.2, §14), channel numbers outside
//! 0x4000-0x4FFF get 400 (§12), and OpaqueString-prepared credentials (RFC 8489 §9.2.2,
//! RFC 8265) authenticate.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_client::turn::{AllocateOptions, Client, Event};
use kyuu_server::relay::{self, ListenConfig, RelayHandle, Transport};
use kyuu_stun::attr::{self, Icmp};
use kyuu_turn::{TurnConfig, UserConfig};
use tokio::net::UdpSocket;

fn turn(users: Vec<UserConfig>) -> TurnConfig {
    TurnConfig {
        users,
        allow_peers: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        unauth_rate: 0,
        ..Default::default()
    }
}

fn user(name: &str, password: &str) -> UserConfig {
    UserConfig {
        name: name.into(),
        password: Some(password.into()),
        key: None,
        key_sha256: None,
    }
}

async fn server(listen: &[&str], users: Vec<UserConfig>) -> RelayHandle {
    let addrs: Vec<SocketAddr> = listen.iter().map(|a| a.parse().unwrap()).collect();
    let l = ListenConfig {
        threads: 1,
        ..ListenConfig::on(&addrs, &[])
    };
    relay::start(&l, turn(users), None).await.unwrap()
}

/// A TURN client over UDP.
struct Udp {
    c: Client,
    s: UdpSocket,
    server: SocketAddr,
}

impl Udp {
    async fn new(server: SocketAddr, user: &str, password: &str) -> Self {
        let bind = if server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        Udp {
            c: Client::new(user, password, false),
            s: UdpSocket::bind(bind).await.unwrap(),
            server,
        }
    }

    async fn flush(&mut self) {
        while let Some(b) = self.c.poll_transmit() {
            self.s.send_to(&b, self.server).await.unwrap();
        }
    }

    async fn event(&mut self) -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 4096];
        loop {
            self.flush().await;
            if let Some(e) = self.c.poll_event() {
                return e;
            }
            assert!(Instant::now() < deadline, "no event");
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(100), self.s.recv_from(&mut buf)).await
            {
                self.c.handle_input(Instant::now(), &buf[..n]);
            }
            self.c.handle_timeout(Instant::now());
        }
    }

    async fn allocate(&mut self, o: AllocateOptions) -> SocketAddr {
        self.c.allocate_with(Instant::now(), &o);
        match self.event().await {
            Event::Allocated { relayed, .. } => relayed[0],
            e => panic!("allocate: {e:?}"),
        }
    }

    async fn channel_data(&mut self, channel: u16, data: &[u8]) {
        let mut buf = vec![0u8; data.len() + 8];
        let n = self.c.channel_data(channel, data, &mut buf).unwrap();
        self.s.send_to(&buf[..n], self.server).await.unwrap();
    }
}

/// A UDP port on `ip` that nothing listens on.
fn closed_port(ip: &str) -> SocketAddr {
    let s = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
    s.local_addr().unwrap()
}

/// RFC 8656 §11.5: a datagram relayed to a closed port draws ICMP port unreachable, which
/// reaches the client as a Data indication with XOR-PEER-ADDRESS and ICMP (type 3 code 3 on
/// IPv4, type 1 code 4 on IPv6), and is counted.
#[tokio::test]
async fn icmp_port_unreachable_reaches_the_client_v4_and_v6() {
    let prom = kyuu_server::metrics::install().expect("recorder");
    let h = server(&["127.0.0.1:0", "[::1]:0"], vec![user("u", "p")]).await;
    let cases = [
        ("127.0.0.1", attr::FAMILY_IPV4, 3u8, 3u8),
        ("::1", attr::FAMILY_IPV6, 1, 4),
    ];
    for (ip, family, icmp_type, code) in cases {
        let server_addr = h
            .listeners()
            .iter()
            .find(|(p, a)| *p == Transport::Udp && a.is_ipv4() == (family == attr::FAMILY_IPV4))
            .map(|(_, a)| *a)
            .unwrap();
        let mut u = Udp::new(server_addr, "u", "p").await;
        u.allocate(AllocateOptions {
            family: Some(family),
            ..Default::default()
        })
        .await;
        let ip = if ip == "::1" { "[::1]" } else { ip };
        let closed = closed_port(ip);
        u.c.create_permission(Instant::now(), &[closed]);
        assert_eq!(u.event().await, Event::PermissionCreated);
        // Send indication and ChannelData both draw it.
        u.c.send_indication(closed, b"anyone there?");
        assert_eq!(
            u.event().await,
            Event::Icmp {
                peer: closed,
                icmp: Icmp {
                    icmp_type,
                    code,
                    error_data: 0
                }
            },
            "{ip}"
        );
        u.c.channel_bind(Instant::now(), 0x4000, closed);
        assert!(matches!(u.event().await, Event::ChannelBound { .. }));
        u.channel_data(0x4000, b"hello?").await;
        assert!(matches!(u.event().await, Event::Icmp { peer, .. } if peer == closed));
    }
    // Counters reach the registry once per tick: four ICMP errors were passed on.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = prom.render();
        let n = text
            .lines()
            .find_map(|l| l.strip_prefix("kyuu_turn_icmp_forwarded_total "))
            .and_then(|v| v.trim().parse::<u64>().ok());
        if n == Some(4) {
            break;
        }
        assert!(Instant::now() < deadline, "icmp counter {n:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.shutdown().await;
}

/// §11.5: the Data indication goes on the 5-tuple of the allocation whose relay socket sent the
/// datagram, and to no other client. (The permission check of §11.5 is covered by the core tests
/// in `kyuu-turn/tests/icmp.rs`: over sockets a relay never sends to an unpermitted peer.)
#[tokio::test]
async fn icmp_goes_only_to_the_allocation_that_sent() {
    let h = server(&["127.0.0.1:0"], vec![user("u", "p")]).await;
    let a = h.addr(Transport::Udp).unwrap();
    let mut quiet = Udp::new(a, "u", "p").await;
    quiet.allocate(AllocateOptions::default()).await;
    let mut u = Udp::new(a, "u", "p").await;
    u.allocate(AllocateOptions::default()).await;
    let closed = closed_port("127.0.0.1");
    u.c.create_permission(Instant::now(), &[closed]);
    assert_eq!(u.event().await, Event::PermissionCreated);
    u.c.send_indication(closed, b"x");
    assert!(matches!(u.event().await, Event::Icmp { .. }));
    let mut b = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), quiet.s.recv_from(&mut b))
            .await
            .is_err()
    );
    h.shutdown().await;
}

/// RFC 8656 §12.2: a ChannelBind outside 0x4000-0x4FFF gets 400 over a real socket by default.
#[tokio::test]
async fn channel_numbers_above_0x4fff_get_400() {
    let h = server(&["127.0.0.1:0"], vec![user("u", "p")]).await;
    let mut u = Udp::new(h.addr(Transport::Udp).unwrap(), "u", "p").await;
    u.allocate(AllocateOptions::default()).await;
    let peer = closed_port("127.0.0.1");
    u.c.channel_bind(Instant::now(), 0x5000, peer);
    assert!(matches!(u.event().await, Event::Error { code: 400, .. }));
    u.c.channel_bind(Instant::now(), 0x4FFF, peer);
    assert!(matches!(u.event().await, Event::ChannelBound { channel: 0x4FFF, .. }));
    h.shutdown().await;
}

/// RFC 8489 §9.2.2 / RFC 8265: a server configured with a decomposed non-ASCII name and a
/// no-break space in the password accepts a client using the NFC name and an ASCII space (what a
/// client following RFC 8489 computes); a fullwidth variant (no width mapping) gets 401, and an
/// ASCII password is used byte for byte.
#[tokio::test]
async fn opaque_string_prepared_credentials_authenticate() {
    let h = server(
        &["127.0.0.1:0"],
        vec![user("ju\u{0308}rgen", "p\u{00A0}ss"), user("ascii", "Pa ss")],
    )
    .await;
    let a = h.addr(Transport::Udp).unwrap();
    let cases = [
        ("j\u{00FC}rgen", "p ss", None),
        ("j\u{00FC}rgen", "\u{FF50} ss", Some(401)),
        ("ascii", "Pa ss", None),
        ("ascii", "pa ss", Some(401)),
        ("asc\u{0007}ii", "Pa ss", Some(401)),
    ];
    for (name, password, want) in cases {
        let mut u = Udp::new(a, name, password).await;
        u.c.allocate(Instant::now());
        let e = u.event().await;
        match want {
            None => assert!(matches!(e, Event::Allocated { .. }), "{name:?}: {e:?}"),
            Some(code) => assert!(
                matches!(e, Event::Error { code: c, .. } if c == code),
                "{name:?}/{password:?}: {e:?}"
            ),
        }
    }
    h.shutdown().await;
}
