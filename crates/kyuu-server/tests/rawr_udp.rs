//! RAWR nodes and peers over real UDP on 127.0.0.1, with coturn as the meeting node's TURN data
//! plane (skipped when `turnserver` is missing unless `KYUU_INTEROP_REQUIRED=1`).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kyuu_client::turn_udp::Allocation;
use kyuu_rawr::config::parse_turn_uri;
use kyuu_rawr::config::{ChildConfig, GatewayConfig, RawrConfig};
use kyuu_rawr::peer::{PeerConfig, Route};
use kyuu_rawr::wire::Mac;
use kyuu_server::rawr::runtime::{run_peer, spawn_node, NodeHandle, PeerEnv};
use tokio::net::UdpSocket;

async fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn node(
    name: &str,
    turn: SocketAddr,
    gw: Option<(SocketAddr, &str)>,
    children: &[&str],
) -> NodeHandle {
    let sock = bind().await;
    let me = sock.local_addr().unwrap();
    let cfg = RawrConfig {
        enabled: true,
        name: name.into(),
        self_addrs: vec![me],
        relay: vec![format!("turn:{turn}?transport=udp")],
        secret: format!("secret-{name}"),
        gateway: gw.map(|(addr, key)| GatewayConfig {
            addr,
            key: Some(key.into()),
        }),
        children: children
            .iter()
            .map(|c| ChildConfig {
                name: (*c).into(),
                key: format!("k-{c}"),
            })
            .collect(),
        ..RawrConfig::default()
    };
    spawn_node(cfg, sock).unwrap()
}

struct Coturn {
    _child: tokio::process::Child,
    addr: SocketAddr,
}

async fn coturn(secret: &str) -> Option<Coturn> {
    if std::process::Command::new("turnserver")
        .arg("--version")
        .output()
        .is_err()
    {
        if std::env::var("KYUU_INTEROP_REQUIRED").as_deref() == Ok("1") {
            panic!("turnserver (coturn) is required");
        }
        println!("SKIP data plane: turnserver (coturn) not installed");
        return None;
    }
    let port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let min = 20000 + (std::process::id() % 20000) as u16;
    let child = tokio::process::Command::new("turnserver")
        .args([
            "-n",
            "--listening-ip=127.0.0.1",
            &format!("--listening-port={port}"),
            "--relay-ip=127.0.0.1",
            "--use-auth-secret",
            &format!("--static-auth-secret={secret}"),
            "--realm=kyuu",
            "--no-tls",
            "--no-dtls",
            "--no-tcp",
            "--no-cli",
            "--allow-loopback-peers",
            &format!("--min-port={min}"),
            &format!("--max-port={}", min + 100),
            "--log-file=/dev/null",
            "--no-stdout-log",
        ])
        .kill_on_drop(true)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    // Wait (bounded) until it answers STUN.
    let probe = bind().await;
    let mut buf = [0u8; 512];
    for _ in 0..50 {
        let req = kyuu_rawr::wire::encode_binding_request(kyuu_stun::TransactionId([1; 12]));
        probe.send_to(&req, addr).await.unwrap();
        if tokio::time::timeout(Duration::from_millis(100), probe.recv_from(&mut buf))
            .await
            .is_ok()
        {
            return Some(Coturn {
                _child: child,
                addr,
            });
        }
    }
    panic!("coturn did not start");
}

fn peer_cfg(session: &[u8], mac: u8, root: SocketAddr, gw: Option<SocketAddr>) -> PeerConfig {
    let mut c = PeerConfig::new(session.to_vec(), Mac([2, 0, 0, 0, 0, mac]), root);
    c.gateway = gw;
    c.deadline = Duration::from_secs(10);
    c
}

#[tokio::test]
async fn meet_at_isp_over_udp_and_relay_through_coturn() {
    let turn = coturn("secret-isp").await;
    let turn_addr = turn
        .as_ref()
        .map(|t| t.addr)
        .unwrap_or("127.0.0.1:9".parse().unwrap());
    let root = node("root", "127.0.0.1:9".parse().unwrap(), None, &[]).await;
    let isp = node("isp", turn_addr, None, &["home-a", "home-b"]).await;
    let ha = node(
        "home-a",
        "127.0.0.1:9".parse().unwrap(),
        Some((isp.local_addr(), "k-home-a")),
        &[],
    )
    .await;
    let hb = node(
        "home-b",
        "127.0.0.1:9".parse().unwrap(),
        Some((isp.local_addr(), "k-home-b")),
        &[],
    )
    .await;

    let session: [u8; 16] = rand::random();
    let (sa, sb) = (bind().await, bind().await);
    let env = PeerEnv::default();
    let ca = peer_cfg(&session, 0xa, root.local_addr(), Some(ha.local_addr()));
    let cb = peer_cfg(&session, 0xb, root.local_addr(), Some(hb.local_addr()));
    let (a, b) = tokio::join!(run_peer(ca, &sa, &env), run_peer(cb, &sb, &env));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.route, Route::Node { name: "isp".into() });
    assert_eq!(b.route, Route::Node { name: "isp".into() });
    println!("setup: a {} ms, b {} ms", a.total_ms, b.total_ms);

    tokio::time::sleep(Duration::from_millis(300)).await;
    for (n, h) in [
        ("root", &root),
        ("isp", &isp),
        ("home-a", &ha),
        ("home-b", &hb),
    ] {
        let s = h.stats().await.unwrap();
        assert_eq!((s.pending, s.upstream), (0, 0), "{n}: {s:?}");
    }
    assert_eq!(root.stats().await.unwrap().paired, 0);

    let Some(_turn) = turn else { return };
    let (ra, rb) = (a.relay.unwrap(), b.relay.unwrap());
    let server = parse_turn_uri(&ra.uris[0]).unwrap();
    let mut xa = Allocation::new(bind().await, server, &ra.username, &ra.password)
        .await
        .unwrap();
    let mut xb = Allocation::new(bind().await, server, &rb.username, &rb.password)
        .await
        .unwrap();
    xa.permit(xb.relayed.ip()).await.unwrap();
    xb.permit(xa.relayed.ip()).await.unwrap();
    xa.send_to(b"hello through rawr", xb.relayed).await.unwrap();
    let (from, data) = tokio::time::timeout(Duration::from_secs(3), xb.recv_from())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(from, xa.relayed);
    assert_eq!(data, b"hello through rawr");
    // Wrong credentials are refused by the TURN server (secret mismatch).
    let bad = Allocation::new(bind().await, server, &ra.username, "wrong").await;
    assert!(bad.is_err());
}

#[tokio::test]
async fn root_down_is_a_clear_error() {
    let dead = bind().await.local_addr().unwrap();
    let s = bind().await;
    let r = run_peer(peer_cfg(&[1; 16], 1, dead, None), &s, &PeerEnv::default()).await;
    let e = r.unwrap_err();
    assert!(e.to_string().contains("unreachable"), "{e}");
}
