//! TURN over real sockets: allocations over UDP, TCP and TLS, IPv4 and IPv6, relaying through a
//! peer socket, the safe-default refusal of loopback peers, and state freed when clients leave.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

mod common;
use common::{peer_recv, relay_both_ways, Udp};

use kyuu_client::turn::{Client, Event};
use kyuu_server::relay::Transport;
use kyuu_server::relay::{self, ListenConfig, RelayHandle};
use kyuu_turn::{TurnConfig, UserConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn turn(allow_loopback: bool) -> TurnConfig {
    TurnConfig {
        users: vec![UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        allow_peers: if allow_loopback {
            vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()]
        } else {
            vec![]
        },
        unauth_rate: 0,
        ..Default::default()
    }
}

async fn server(allow_loopback: bool) -> RelayHandle {
    let l = ListenConfig {
        threads: 2,
        ..ListenConfig::on(
            &["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()],
            &[],
        )
    };
    relay::start(&l, turn(allow_loopback), None).await.unwrap()
}

/// A client talking over a byte stream (TCP or TLS).
struct Stream<S> {
    c: Client,
    s: S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Stream<S> {
    async fn event(&mut self) -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            while let Some(b) = self.c.poll_transmit() {
                self.s.write_all(&b).await.unwrap();
            }
            if let Some(e) = self.c.poll_event() {
                return e;
            }
            assert!(Instant::now() < deadline, "no event");
            let mut head = [0u8; 4];
            if let Ok(r) =
                tokio::time::timeout(Duration::from_millis(200), self.s.read_exact(&mut head)).await
            {
                r.unwrap();
                let n = kyuu_stun::frame_len(&head).unwrap().unwrap();
                let mut rest = vec![0u8; n - 4];
                self.s.read_exact(&mut rest).await.unwrap();
                self.c
                    .handle_input(Instant::now(), &[head.to_vec(), rest].concat());
            }
        }
    }
}

#[tokio::test]
async fn udp_relay_v4_and_v6_with_send_and_channels() {
    let h = server(true).await;
    for server_addr in h
        .listeners()
        .iter()
        .filter(|(p, _)| *p == Transport::Udp)
        .map(|(_, a)| *a)
    {
        let v4 = server_addr.is_ipv4();
        let mut u = Udp::new(server_addr).await;
        let (relayed, mapped) = u.allocate_same_family().await;
        assert_eq!(mapped, Some(u.s.local_addr().unwrap()));
        assert_eq!(relayed.is_ipv4(), v4);

        relay_both_ways(&mut u, relayed).await;
        u.delete().await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.allocations(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn loopback_peer_refused_by_default() {
    let h = server(false).await;
    let mut u = Udp::new(h.addr(Transport::Udp).unwrap()).await;
    u.c.allocate(Instant::now());
    assert!(matches!(u.event().await, Event::Allocated { .. }));
    for p in ["127.0.0.1:9", "127.1.2.3:9"] {
        u.c.create_permission(Instant::now(), &[p.parse().unwrap()]);
        assert!(matches!(u.event().await, Event::Error { code: 403, .. }));
        u.c.channel_bind(Instant::now(), 0x4000, p.parse().unwrap());
        assert!(matches!(u.event().await, Event::Error { code: 403, .. }));
    }
    h.shutdown().await;
}

#[tokio::test]
async fn tcp_relay_and_state_freed_on_disconnect() {
    let h = server(true).await;
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let tcp = TcpStream::connect(h.addr(Transport::Tcp).unwrap())
        .await
        .unwrap();
    let mut c = Stream {
        c: Client::new("u", "p", true),
        s: tcp,
    };
    c.c.allocate(Instant::now());
    let Event::Allocated { relayed, .. } = c.event().await else {
        panic!()
    };
    c.c.channel_bind(Instant::now(), 0x4002, peer_addr);
    assert!(matches!(c.event().await, Event::ChannelBound { .. }));
    let mut buf = [0u8; 64];
    let n = c.c.channel_data(0x4002, b"odd", &mut buf).unwrap();
    assert_eq!(n, 8);
    c.s.write_all(&buf[..n]).await.unwrap();
    assert_eq!(peer_recv(&peer).await.0, b"odd");
    peer.send_to(b"12345", relayed[0]).await.unwrap();
    assert_eq!(
        c.event().await,
        Event::ChannelData {
            channel: 0x4002,
            data: b"12345".to_vec()
        }
    );
    assert_eq!(h.allocations(), 1);
    drop(c);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.allocations(),
        0,
        "allocation freed when its TCP connection closed"
    );
    // Garbage on a stream closes it without harming the server.
    let mut t = TcpStream::connect(h.addr(Transport::Tcp).unwrap())
        .await
        .unwrap();
    t.write_all(&[0xFF; 64]).await.unwrap();
    let mut b = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(2), t.read(&mut b))
        .await
        .unwrap();
    assert!(matches!(r, Ok(0) | Err(_)));
    h.shutdown().await;
}

#[tokio::test]
async fn start_local_with_rest_secret() {
    let h = relay::start_local("test-secret").await.unwrap();
    assert!(
        h.addr(Transport::Udp).is_some()
            && h.addr(Transport::Tcp).is_some()
            && h.addr(Transport::Tls).is_some()
    );
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (user, pass) = kyuu_turn::rest_credentials("test-secret", "browser", unix, 600);
    let mut u = Udp::new(h.addr(Transport::Udp).unwrap()).await;
    u.c = Client::new(&user, &pass, false);
    u.c.allocate(Instant::now());
    assert!(matches!(u.event().await, Event::Allocated { .. }));
    u.c.create_permission(Instant::now(), &["127.0.0.1:9".parse().unwrap()]);
    assert_eq!(u.event().await, Event::PermissionCreated);
    h.shutdown().await;
}
