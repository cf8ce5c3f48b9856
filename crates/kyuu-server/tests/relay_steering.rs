//! Relay steering (`turn.relay_steering`, `BPF_PROG_TYPE_SK_LOOKUP`) over real sockets: with
//! steering required, every UDP relay path still works (Send and Data indications, ChannelData
//! both ways, IPv4 and IPv6, many allocations over two relay threads, deletion, a port reused by
//! a later allocation), and the steered ports really are in the kernel's map while allocations
//! live and leave it when they go.
//!
//! Loading sk_lookup needs CAP_BPF and CAP_NET_ADMIN: run as root (CI is) these tests require it;
//! run unprivileged they say so and check nothing else.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

mod common;
use common::{peer_recv, relay_both_ways, Udp};

use kyuu_client::turn::Event;
use kyuu_server::relay::Transport;
use kyuu_server::relay::{self, ListenConfig, RelayHandle};
use kyuu_turn::{FastPathMode, PortRange, TurnConfig, UserConfig};
use tokio::net::UdpSocket;

fn root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

fn turn() -> TurnConfig {
    TurnConfig {
        users: vec![UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        allow_peers: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        unauth_rate: 0,
        user_quota: 0,
        client_quota: 0,
        max_bps: 0,
        relay_steering: FastPathMode::Required,
        ..Default::default()
    }
}

/// A steered server, or `None` (with a note) when this process may not load BPF.
async fn server(threads: usize, turn: TurnConfig) -> Option<RelayHandle> {
    let l = ListenConfig {
        threads,
        ..ListenConfig::on(
            &["127.0.0.1:0".parse().unwrap(), "[::1]:0".parse().unwrap()],
            &[],
        )
    };
    match relay::start(&l, turn, None).await {
        Ok(h) => {
            assert_eq!(h.steered_ports(), Some(0));
            Some(h)
        }
        Err(e) if !root() => {
            eprintln!("relay steering not tested: not root ({e:#})");
            None
        }
        Err(e) => panic!("turn.relay_steering = \"required\" failed as root: {e:#}"),
    }
}

async fn wait_steered(h: &RelayHandle, want: usize) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while h.steered_ports() != Some(want) {
        assert!(
            Instant::now() < deadline,
            "steered ports {:?}, want {want}",
            h.steered_ports()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn steered_udp_relay_v4_and_v6_indications_and_channels() {
    let Some(h) = server(2, turn()).await else {
        return;
    };
    let udp: Vec<SocketAddr> = h
        .listeners()
        .iter()
        .filter(|(p, _)| *p == Transport::Udp)
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(udp.len(), 2);
    for server_addr in udp {
        let v4 = server_addr.is_ipv4();
        let mut u = Udp::new(server_addr).await;
        let relayed = u.allocate_same_family().await.0;
        assert_eq!(relayed.is_ipv4(), v4);
        assert_eq!(h.steered_ports(), Some(1), "the relay port is steered");
        // Peer to client arrives through the steering socket.
        relay_both_ways(&mut u, relayed).await;
        u.delete().await;
        wait_steered(&h, 0).await;
    }
    assert_eq!(h.allocations(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn steered_many_allocations_then_deleted() {
    const N: usize = 200;
    let Some(h) = server(2, turn()).await else {
        return;
    };
    let server_addr = h.addr(Transport::Udp).unwrap();
    assert!(server_addr.is_ipv4());
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut clients = Vec::new();
    let mut relays = Vec::new();
    for _ in 0..N {
        let mut u = Udp::new(server_addr).await;
        relays.push(u.allocate_same_family().await.0);
        u.bind(0x4000, peer_addr).await;
        clients.push(u);
    }
    assert_eq!(h.steered_ports(), Some(N));
    // Client to peer on every allocation: each arrives from its own relayed address.
    for (i, u) in clients.iter_mut().enumerate() {
        u.channel_send(0x4000, format!("up {i}").as_bytes()).await;
        let (d, from) = peer_recv(&peer).await;
        assert_eq!(from, relays[i]);
        assert_eq!(d, format!("up {i}").as_bytes());
    }
    // Peer to every relay port at once (they queue on the two steering sockets), then each
    // client reads its own.
    for (i, r) in relays.iter().enumerate() {
        peer.send_to(format!("down {i}").as_bytes(), r)
            .await
            .unwrap();
    }
    for (i, u) in clients.iter_mut().enumerate() {
        assert_eq!(
            u.event().await,
            Event::ChannelData {
                channel: 0x4000,
                data: format!("down {i}").into_bytes()
            }
        );
    }
    for u in clients.iter_mut() {
        u.delete().await;
    }
    wait_steered(&h, 0).await;
    assert_eq!(h.allocations(), 0);
    h.shutdown().await;
}

#[tokio::test]
async fn steered_port_reused_by_next_allocation() {
    // One relay thread and one relay port: the second allocation must get the first one's port.
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let t = TurnConfig {
        relay_ports: PortRange {
            min: port,
            max: port,
        },
        ..turn()
    };
    let Some(h) = server(1, t).await else {
        return;
    };
    let server_addr = h.addr(Transport::Udp).unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    for round in 0..3u8 {
        let mut u = Udp::new(server_addr).await;
        let relayed = u.allocate_same_family().await.0;
        assert_eq!(relayed.port(), port);
        assert_eq!(h.steered_ports(), Some(1));
        u.bind(0x4002, peer_addr).await;
        peer.send_to(&[round; 10], relayed).await.unwrap();
        assert_eq!(
            u.event().await,
            Event::ChannelData {
                channel: 0x4002,
                data: vec![round; 10]
            }
        );
        u.channel_send(0x4002, &[round; 5]).await;
        let (d, from) = peer_recv(&peer).await;
        assert_eq!((d, from), (vec![round; 5], relayed));
        u.delete().await;
        wait_steered(&h, 0).await;
        // With the allocation gone its port takes the normal lookup again: nothing is relayed,
        // and the old client hears nothing.
        peer.send_to(b"late", relayed).await.unwrap();
        let mut b = [0u8; 100];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), u.s.recv_from(&mut b))
                .await
                .is_err()
        );
    }
    h.shutdown().await;
}

/// Without CAP_BPF: `"auto"` starts and reads relay sockets one by one, `"required"` refuses to
/// start naming the key. As root the test runs itself again with every capability dropped
/// (`setpriv`), so it checks the fallback wherever it runs.
#[test]
fn without_cap_bpf_auto_falls_back_and_required_refuses() {
    const NAME: &str = "without_cap_bpf_auto_falls_back_and_required_refuses";
    if std::env::var_os("KYUU_STEER_NOCAP").is_some() || !root() {
        return fallback();
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("setpriv")
        .args(["--bounding-set=-all", "--inh-caps=-all"])
        .arg(exe)
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env("KYUU_STEER_NOCAP", "1")
        .output()
        .expect("setpriv (util-linux) runs the test without capabilities");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

fn fallback() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let l = ListenConfig {
            threads: 1,
            ..ListenConfig::on(&["127.0.0.1:0".parse().unwrap()], &[])
        };
        let auto = TurnConfig {
            relay_steering: FastPathMode::Auto,
            ..turn()
        };
        let h = relay::start(&l, auto, None).await.unwrap();
        assert_eq!(h.steered_ports(), None, "no steering without CAP_BPF");
        // Relaying still works, one socket per allocation.
        let server_addr = h.addr(Transport::Udp).unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut u = Udp::new(server_addr).await;
        let relayed = u.allocate_same_family().await.0;
        u.bind(0x4003, peer.local_addr().unwrap()).await;
        peer.send_to(b"unsteered", relayed).await.unwrap();
        assert_eq!(
            u.event().await,
            Event::ChannelData {
                channel: 0x4003,
                data: b"unsteered".to_vec()
            }
        );
        h.shutdown().await;
        let err = relay::start(&l, turn(), None).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("turn.relay_steering = \"required\""), "{msg}");
    });
}

#[test]
fn the_key_parses_and_a_bad_value_names_it() {
    let cfg =
        kyuu_server::config::Config::from_toml("[turn]\nrelay_steering = \"auto\"\n", "t.toml")
            .unwrap();
    assert_eq!(cfg.turn.relay_steering, FastPathMode::Auto);
    assert_eq!(TurnConfig::default().relay_steering, FastPathMode::Off);
    let err = kyuu_server::config::Config::from_toml("[turn]\nrelay_steering = \"on\"\n", "t.toml")
        .unwrap_err();
    assert!(format!("{err:#}").contains("relay_steering"), "{err:#}");
}
