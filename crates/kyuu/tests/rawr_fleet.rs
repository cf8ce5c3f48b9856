//! RAWR across a fleet (`docs/rawr.md` §4.7): two real `kyuu serve` root nodes sharing a real
//! `redis-server` (free ports, killed by PID). Peer A names node 1 as its root and peer B node
//! 2, with no gateways: their Exchange and Connect still pair (at the node that claimed the
//! session) and data flows between their allocations there. Then Redis is killed: the relay
//! keeps working, a session whose peers share a node still pairs (per-node behaviour), a split
//! session ends in an error within the peer's deadline (no hang), and neither node crashed.
//!
//! SKIPs when `redis-server` is missing, unless `KYUU_INTEROP_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

mod support;
use support::{free_udp_tcp_port, serve_until_ready, start_redis, Proc};

use std::io::Read;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use kyuu_client::turn_udp::Allocation;
use kyuu_rawr::config::parse_turn_uri;
use kyuu_rawr::peer::{Outcome, PeerConfig, PeerError, Route};
use kyuu_rawr::wire::Mac;
use kyuu_server::rawr::runtime::{run_peer, PeerEnv};
use tokio::net::UdpSocket;

const SECRET: &str = "rawr-fleet-rest-secret";

fn required() -> bool {
    std::env::var("KYUU_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

struct Node {
    proc: Proc,
    turn: SocketAddr,
    http: SocketAddr,
}

fn start_node(name: &str, redis_port: u16) -> Node {
    let fleet = format!(
        "[fleet]\nredis_url = \"redis://127.0.0.1:{redis_port}/\"\nnode = \"{name}\"\n\
         peer_ttl_secs = 4\nheartbeat_secs = 1\n"
    );
    start_kyuu(name, "", &fleet)
}

fn start_kyuu(name: &str, extra_turn: &str, tail: &str) -> Node {
    let dir = std::env::temp_dir().join(format!("kyuu-rawr-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    let turn = free_udp_tcp_port();
    let http = free_udp_tcp_port();
    let threads = if extra_turn.is_empty() { 0 } else { 2 };
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nudp = [\"127.0.0.1:{turn}\"]\ntcp = []\ntls = []\nthreads = {threads}\n\
             [turn]\nstatic_auth_secrets = [\"{SECRET}\"]\nallow_peers = [\"127.0.0.0/8\"]\n\
             unauth_rate = 0\n{extra_turn}\
             [http]\nlisten = \"127.0.0.1:{http}\"\nmetrics = true\n\
             [rawr]\nenabled = true\nname = \"{name}\"\n{tail}"
        ),
    )
    .unwrap();
    let proc = serve_until_ready(&cfg);
    Node {
        proc,
        turn: SocketAddr::from(([127, 0, 0, 1], turn)),
        http: SocketAddr::from(([127, 0, 0, 1], http)),
    }
}

fn peer(session: &[u8], mac: u8, root: SocketAddr, deadline: Duration) -> PeerConfig {
    let mut c = PeerConfig::new(session.to_vec(), Mac([2, 0, 0, 0, 0, mac]), root);
    c.deadline = deadline;
    c
}

async fn bind() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").await.unwrap()
}

async fn pair(
    s: &[u8],
    ra: SocketAddr,
    rb: SocketAddr,
    deadline: Duration,
) -> (Result<Outcome, PeerError>, Result<Outcome, PeerError>) {
    let (sa, sb) = (bind().await, bind().await);
    let env = PeerEnv::default();
    tokio::join!(
        run_peer(peer(s, 0xa, ra, deadline), &sa, &env),
        run_peer(peer(s, 0xb, rb, deadline), &sb, &env),
    )
}

/// Both sides allocate where RAWR sent them; data goes both ways.
async fn relay_both_ways(a: &Outcome, b: &Outcome) -> (Allocation, Allocation) {
    let (ra, rb) = (a.relay.clone().unwrap(), b.relay.clone().unwrap());
    let at = parse_turn_uri(&ra.uris[0]).unwrap();
    assert_eq!(at, parse_turn_uri(&rb.uris[0]).unwrap(), "one meeting node");
    let mut xa = Allocation::new(bind().await, at, &ra.username, &ra.password)
        .await
        .unwrap();
    let mut xb = Allocation::new(bind().await, at, &rb.username, &rb.password)
        .await
        .unwrap();
    // Standard ICE creates the permissions; the meeting node may also link the pair.
    xa.permit(xb.relayed.ip()).await.unwrap();
    xb.permit(xa.relayed.ip()).await.unwrap();
    check_flow(&mut xa, &mut xb).await;
    (xa, xb)
}

async fn check_flow(xa: &mut Allocation, xb: &mut Allocation) {
    one_way(xa, xb, b"a to b").await;
    one_way(xb, xa, b"b to a").await;
}

async fn one_way(from: &mut Allocation, to: &mut Allocation, msg: &[u8]) {
    from.send_to(msg, to.relayed).await.unwrap();
    let (src, data) = tokio::time::timeout(Duration::from_secs(3), to.recv_from())
        .await
        .expect("relayed data")
        .unwrap();
    assert_eq!((src, data.as_slice()), (from.relayed, msg));
}

fn metric(http: SocketAddr, name: &str) -> f64 {
    use std::io::Write;
    let Ok(mut s) = std::net::TcpStream::connect(http) else {
        return 0.0;
    };
    let _ = s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_split_across_two_root_nodes_still_pairs() {
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!required(), "redis-server missing");
        eprintln!("SKIP rawr_fleet: redis-server missing");
        return;
    }
    let rport = free_udp_tcp_port();
    let mut redis = start_redis(rport);
    let n1 = start_node("root1", rport);
    let n2 = start_node("root2", rport);

    // A names node 1, B node 2: without the fleet, neither Exchange would ever see the other.
    let s: [u8; 16] = rand::random();
    let (a, b) = pair(&s, n1.turn, n2.turn, Duration::from_secs(10)).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(
        matches!((&a.route, &b.route), (Route::Root { name: x }, Route::Root { name: y }) if x == y),
        "{a:?} {b:?}"
    );
    let (mut xa, mut xb) = relay_both_ways(&a, &b).await;
    let forwarded = metric(n1.http, "kyuu_rawr_fleet_forwarded_total")
        + metric(n2.http, "kyuu_rawr_fleet_forwarded_total");
    assert!(forwarded >= 2.0, "requests crossed the fleet: {forwarded}");

    // Again with the roles swapped, so the other node may own the session.
    let s2: [u8; 16] = rand::random();
    let (a2, b2) = pair(&s2, n2.turn, n1.turn, Duration::from_secs(10)).await;
    relay_both_ways(&a2.unwrap(), &b2.unwrap()).await;

    // Redis dies (by PID).
    let _ = redis.0.kill();
    let _ = redis.0.wait();

    // State already held in the processes is not lost: the pair keeps relaying.
    check_flow(&mut xa, &mut xb).await;

    // Per-node behaviour: a session whose peers share a node pairs there at once...
    let t0 = Instant::now();
    let s3: [u8; 16] = rand::random();
    let (a3, b3) = pair(&s3, n2.turn, n2.turn, Duration::from_secs(10)).await;
    relay_both_ways(&a3.unwrap(), &b3.unwrap()).await;
    assert!(t0.elapsed() < Duration::from_secs(8), "no hang on Redis");

    // ...and a split session cannot meet: each side ends in an error by its deadline, no hang.
    let s4: [u8; 16] = rand::random();
    let t0 = Instant::now();
    let (a4, b4) = tokio::time::timeout(
        Duration::from_secs(20),
        pair(&s4, n1.turn, n2.turn, Duration::from_secs(5)),
    )
    .await
    .expect("peers end by their deadline");
    assert!(a4.is_err() && b4.is_err(), "{a4:?} {b4:?}");
    assert!(t0.elapsed() < Duration::from_secs(15));

    // Both nodes are alive and answer.
    let (mut p1, mut p2) = (n1.proc, n2.proc);
    assert!(p1.0.try_wait().unwrap().is_none(), "node 1 exited");
    assert!(p2.0.try_wait().unwrap().is_none(), "node 2 exited");
    let s5: [u8; 16] = rand::random();
    let (a5, b5) = pair(&s5, n1.turn, n1.turn, Duration::from_secs(10)).await;
    assert!(a5.is_ok() && b5.is_ok(), "{a5:?} {b5:?}");
    drop((p1, p2, redis));
}

/// In-process pairing across relay shards (`docs/rawr.md` §6.1): a node with two shards, the
/// two allocations of a RAWR pair on different shards (the shard shows in the relayed port:
/// each shard owns one half of `turn.relay_ports`), no CreatePermission for each other, and
/// data flows both ways while the node's relay sockets read nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairs_on_different_shards_relay_in_process() {
    let lo: u16 = 40_000 + 2 * (rand::random::<u16>() % 4_000);
    let hi = lo + 999;
    let half = lo + 500;
    let n = start_kyuu(
        "meet",
        &format!("relay_ports = {{ min = {lo}, max = {hi} }}\n"),
        "",
    );
    let s: [u8; 16] = rand::random();
    let (a, b) = pair(&s, n.turn, n.turn, Duration::from_secs(10)).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let (ra, rb) = (a.relay.unwrap(), b.relay.unwrap());
    let shard = |x: &Allocation| x.relayed.port() >= half;
    let mut xa = Allocation::new(bind().await, n.turn, &ra.username, &ra.password)
        .await
        .unwrap();
    // B allocates from new sockets until the kernel spreads it to the other shard.
    let mut xb = None;
    for _ in 0..64 {
        let x = Allocation::new(bind().await, n.turn, &rb.username, &rb.password)
            .await
            .unwrap();
        if shard(&x) != shard(&xa) {
            xb = Some(x);
            break;
        }
        let mut x = x;
        x.delete().await.unwrap();
    }
    let mut xb = xb.expect("an allocation on the other shard");
    // Metrics are flushed once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sock0 = metric(n.http, "kyuu_relay_socket_datagrams_total");
    let paired0 = metric(n.http, "kyuu_relay_paired_packets_total");
    for _ in 0..10 {
        check_flow(&mut xa, &mut xb).await;
    }
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let sock1 = metric(n.http, "kyuu_relay_socket_datagrams_total");
    let paired1 = metric(n.http, "kyuu_relay_paired_packets_total");
    assert_eq!(
        sock1 - sock0,
        0.0,
        "datagrams went through the relay sockets"
    );
    assert!(paired1 - paired0 >= 20.0, "{paired0} -> {paired1}");
    drop(n.proc);
}
