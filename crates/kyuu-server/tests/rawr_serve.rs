//! RAWR nodes that are full kyuu STUN/TURN servers: RAWR requests arrive on the TURN port through
//! `kyuu_server::relay::Extension`, peers allocate at the meeting node's kyuu TURN with the REST
//! credentials the node minted, and a TURN server without RAWR makes peers fall back to the root.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use kyuu_client::turn_udp::Allocation;
use kyuu_rawr::config::parse_turn_uri;
use kyuu_rawr::config::{ChildConfig, GatewayConfig, RawrConfig};
use kyuu_rawr::peer::{PeerConfig, Route};
use kyuu_rawr::wire::Mac;
use kyuu_server::rawr::runtime::{run_peer, start, NodeHandle, PeerEnv, ReplyBook};
use kyuu_server::relay::{self, Extension, ListenConfig, RelayHandle};
use kyuu_turn::TurnConfig;
use tokio::net::UdpSocket;

struct Server {
    relay: RelayHandle,
    _node: Option<NodeHandle>,
    addr: SocketAddr,
}

fn turn_config(secret: &str) -> TurnConfig {
    TurnConfig {
        enabled: true,
        static_auth_secrets: vec![secret.into()],
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        ..TurnConfig::default()
    }
}

/// A kyuu STUN/TURN server on 127.0.0.1; with `rawr`, a RAWR node behind its extension hook.
async fn server(rawr: Option<(&str, Option<SocketAddr>, &[&str])>) -> Server {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listen = ListenConfig {
        udp: vec![addr],
        tcp: vec![],
        tls: vec![],
        ..ListenConfig::default()
    };
    let Some((name, gw, children)) = rawr else {
        let relay = relay::start(&listen, turn_config("plain"), None)
            .await
            .unwrap();
        return Server {
            relay,
            _node: None,
            addr,
        };
    };
    let secret = format!("secret-{name}");
    // The glue `kyuu serve` needs: extension requests -> the node; answers -> the right client.
    let (ext_tx, mut ext_rx) = tokio::sync::mpsc::channel::<relay::ExtensionRequest>(256);
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let book = ReplyBook::new(4096);
    let b = book.clone();
    tokio::spawn(async move {
        while let Some(r) = ext_rx.recv().await {
            let (client, reply) = (r.client, r.reply);
            b.remember(client.remote, Box::new(move |d| reply.send(client, d)));
            if tx.send((client.remote, r.data)).await.is_err() {
                break;
            }
        }
    });
    let cfg = RawrConfig {
        enabled: true,
        name: name.into(),
        self_addrs: vec![addr],
        relay: vec![format!("turn:{addr}?transport=udp")],
        secret: secret.clone(),
        gateway: gw.map(|addr| GatewayConfig {
            addr,
            key: Some(format!("k-{name}")),
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
    let node = start(cfg, Some((rx, book.reply_fn()))).await.unwrap();
    let relay = relay::start(
        &listen,
        turn_config(&secret),
        Some(Extension { requests: ext_tx }),
    )
    .await
    .unwrap();
    Server {
        relay,
        _node: Some(node),
        addr,
    }
}

fn peer(session: &[u8], mac: u8, root: SocketAddr, gw: Option<SocketAddr>) -> PeerConfig {
    let mut c = PeerConfig::new(session.to_vec(), Mac([2, 0, 0, 0, 0, mac]), root);
    c.gateway = gw;
    c.deadline = Duration::from_secs(10);
    c
}

async fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_the_turn_port_meet_and_relay_through_kyuu_turn() {
    let root = server(Some(("root", None, &[]))).await;
    let isp = server(Some(("isp", None, &["homea", "homeb"]))).await;
    let ha = server(Some(("homea", Some(isp.addr), &[]))).await;
    let hb = server(Some(("homeb", Some(isp.addr), &[]))).await;
    let s: [u8; 16] = rand::random();
    let (sa, sb) = (bind().await, bind().await);
    let env = PeerEnv::default();
    let (a, b) = tokio::join!(
        run_peer(peer(&s, 0xa, root.addr, Some(ha.addr)), &sa, &env),
        run_peer(peer(&s, 0xb, root.addr, Some(hb.addr)), &sb, &env),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.route, Route::Node { name: "isp".into() });
    assert_eq!(b.route, Route::Node { name: "isp".into() });
    let (ra, rb) = (a.relay.unwrap(), b.relay.unwrap());
    let server_addr = parse_turn_uri(&ra.uris[0]).unwrap();
    assert_eq!(server_addr, isp.addr);
    let mut xa = Allocation::new(bind().await, server_addr, &ra.username, &ra.password)
        .await
        .unwrap();
    let mut xb = Allocation::new(bind().await, server_addr, &rb.username, &rb.password)
        .await
        .unwrap();
    xa.permit(xb.relayed.ip()).await.unwrap();
    xb.permit(xa.relayed.ip()).await.unwrap();
    xa.send_to(b"via kyuu turn", xb.relayed).await.unwrap();
    let (from, data) = tokio::time::timeout(Duration::from_secs(3), xb.recv_from())
        .await
        .unwrap()
        .unwrap();
    assert_eq!((from, data.as_slice()), (xa.relayed, &b"via kyuu turn"[..]));
    drop((ha, hb, root));
    isp.relay.stop_blocking();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kyuu_turn_server_without_rawr_makes_peers_fall_back_to_the_root() {
    let root = server(Some(("root", None, &[]))).await;
    let plain = server(None).await;
    let s: [u8; 16] = rand::random();
    let (sa, sb) = (bind().await, bind().await);
    let env = PeerEnv::default();
    let (a, b) = tokio::join!(
        run_peer(peer(&s, 0xa, root.addr, Some(plain.addr)), &sa, &env),
        run_peer(peer(&s, 0xb, root.addr, None), &sb, &env),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.route,
        Route::Root {
            name: "root".into()
        }
    );
    assert_eq!(
        b.route,
        Route::Root {
            name: "root".into()
        }
    );
    let why = a.gateway_error.unwrap();
    assert!(
        why.contains("does not speak RAWR") && why.contains("400"),
        "{why}"
    );
    // The answer came from the root's TURN port: it is a full TURN server too.
    let ra = a.relay.unwrap();
    let x = Allocation::new(bind().await, root.addr, &ra.username, &ra.password).await;
    assert!(x.is_ok(), "{x:?}");
    drop(plain);
}
