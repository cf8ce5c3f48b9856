//! TURN across a fleet: two real `kyuu serve` nodes and a real `redis-server` (free ports,
//! killed by PID). A nonce issued by node A is accepted by node B and an expired one gets 438
//! there; REST credentials verify on both; `/v1/ice-servers` hands out the less loaded node
//! and falls back to itself while Redis is down; `turn.user_quota` counts allocations on both
//! nodes; draining A sends coturn's `turnutils_uclient` and kyuu's own client to B with 300
//! ALTERNATE-SERVER, tells A's signaling client to reconnect to B, keeps relaying an allocation
//! A already held, and A exits once that allocation ends.
//!
//! SKIPs when `redis-server` or `turnutils_uclient` is missing, unless
//! `KYUU_INTEROP_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

mod support;
use support::{free_udp_tcp_port, serve_until_ready, start_redis, Proc};

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use kyuu_client::turn::Client;
use kyuu_client::turn_udp::{Allocation, TurnError};
use kyuu_stun::{Class, ErrorCode, Message};
use serde_json::Value;
use tokio::net::UdpSocket;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "fleet-rest-secret";
const TOKEN: &str = "fleet-admin-token-0123";

fn required() -> bool {
    std::env::var("KYUU_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

struct Node {
    proc: Proc,
    http: SocketAddr,
    turn: SocketAddr,
}

fn start_node(name: &str, redis_port: u16) -> Node {
    let dir = std::env::temp_dir().join(format!("kyuu-fleet-turn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    let turn = free_udp_tcp_port();
    let http = free_udp_tcp_port();
    // strict_channel_numbers = false: RFC 5766 compatibility for coturn 4.6.1's uclient, which
    // binds channel numbers above 0x4FFF (RFC 8656 §12).
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nudp = [\"127.0.0.1:{turn}\"]\ntcp = [\"127.0.0.1:{turn}\"]\ntls = []\n\
             [turn]\nstatic_auth_secrets = [\"{SECRET}\"]\nuser_quota = 1\nclient_quota = 0\n\
             strict_channel_numbers = false\n\
             nonce_lifetime = 3\nallow_peers = [\"127.0.0.0/8\"]\nunauth_rate = 0\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\n\
             [signal]\nmint_rate_per_min = 0\n[admin]\ntoken = \"{TOKEN}\"\n\
             [fleet]\nredis_url = \"redis://127.0.0.1:{redis_port}/\"\nnode = \"{name}\"\n\
             region = \"test\"\npeer_ttl_secs = 4\nheartbeat_secs = 1\n\
             public_http = \"http://127.0.0.1:{http}\"\n"
        ),
    )
    .unwrap();
    let proc = serve_until_ready(&cfg);
    Node {
        proc,
        http: SocketAddr::from(([127, 0, 0, 1], http)),
        turn: SocketAddr::from(([127, 0, 0, 1], turn)),
    }
}

/// One HTTP/1.0 request; the body of the answer (empty when the node is unreachable).
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

/// The TURN URLs `/v1/ice-servers` of `node` hands out.
fn turn_urls(node: SocketAddr) -> String {
    let body = http(node, "GET", "/v1/ice-servers?user=probe", "");
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["username"].is_string())
        .flat_map(|s| s["urls"].as_array().cloned().unwrap_or_default())
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect::<Vec<_>>()
        .join(" ")
}

fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// REST credentials for `user`, the same username every time (the quota counts usernames).
fn rest(user: &str) -> (String, String) {
    static NOW: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let now = *NOW.get_or_init(kyuu_stun::rest::unix_now);
    kyuu_turn::rest_credentials(SECRET, user, now, 600)
}

async fn allocate(server: SocketAddr, user: &str) -> Result<Allocation, TurnError> {
    let (u, p) = rest(user);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    Allocation::new(sock, server, &u, &p).await
}

/// Sends the client's next transmit to `to` and returns the answer.
async fn exchange(sock: &UdpSocket, c: &mut Client, to: SocketAddr) -> Vec<u8> {
    let t = c.poll_transmit().unwrap();
    sock.send_to(&t, to).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    buf.truncate(n);
    buf
}

/// The authenticated Allocate a client builds from node `a`'s 401 challenge (so with `a`'s
/// nonce), sent to node `b`: the error code of `b`'s answer, `None` for a success.
async fn nonce_from_a_at_b(
    a: SocketAddr,
    b: SocketAddr,
    user: &str,
    wait: Duration,
) -> Option<u16> {
    let (u, p) = rest(user);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut c = Client::new(&u, &p, false);
    c.allocate(Instant::now());
    let challenge = exchange(&sock, &mut c, a).await;
    assert_eq!(Message::parse(&challenge).unwrap().class(), Class::Error);
    c.handle_input(Instant::now(), &challenge);
    tokio::time::sleep(wait).await;
    let answer = exchange(&sock, &mut c, b).await;
    let m = Message::parse(&answer).unwrap();
    match m.class() {
        Class::Success => {
            // End it, so that it does not count as B's load.
            c.handle_input(Instant::now(), &answer);
            c.refresh(Instant::now(), 0);
            let _ = exchange(&sock, &mut c, b).await;
            None
        }
        _ => Some(m.error_code().unwrap().unwrap().code),
    }
}

fn uclient(server: SocketAddr, peer_port: u16) -> String {
    let (u, p) = rest("uclient");
    let out = Command::new("timeout")
        .args(["60", "turnutils_uclient"])
        .args(["-u", &u, "-w", &p, "-p", &server.port().to_string()])
        .args(["-e", "127.0.0.1", "-r", &peer_port.to_string()])
        .args(["-n", "20", "-m", "1", "-l", "120", "-z", "5", "127.0.0.1"])
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn metric(node: SocketAddr, name: &str) -> u64 {
    http(node, "GET", "/metrics", "")
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_across_two_nodes() {
    for tool in ["redis-server", "turnutils_uclient", "turnutils_peer"] {
        if !have(tool) {
            assert!(!required(), "{tool} is required (KYUU_INTEROP_REQUIRED=1)");
            println!("SKIP: {tool} not installed");
            return;
        }
    }
    let redis_port = free_udp_tcp_port();
    let mut redis = Some(start_redis(redis_port));
    let mut a = start_node("a", redis_port);
    let b = start_node("b", redis_port);
    let (a_port, b_port) = (a.turn.port(), b.turn.port());
    wait_until("both nodes in the view", Duration::from_secs(15), || {
        metric(a.http, "kyuu_fleet_nodes") == 2 && metric(b.http, "kyuu_fleet_nodes") == 2
    });

    // 1. Nonces: A's nonce works at B; an expired one gets 438 there.
    assert_eq!(
        nonce_from_a_at_b(a.turn, b.turn, "nonce1", Duration::ZERO).await,
        None,
        "B refused A's fresh nonce"
    );
    assert_eq!(
        nonce_from_a_at_b(a.turn, b.turn, "nonce2", Duration::from_millis(4500)).await,
        Some(ErrorCode::STALE_NONCE.code()),
        "B accepted A's expired nonce"
    );
    // REST credentials verify on both nodes.
    let on_a = allocate(a.turn, "rest").await.unwrap();
    assert_eq!(on_a.server, a.turn);

    // 3. The per-user quota (1) counts the allocation on A when the same user asks B.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    match allocate(b.turn, "rest").await {
        Err(TurnError::Rejected { code: 486, .. }) => {}
        other => panic!("user quota not fleet-wide: {other:?}"),
    }
    let mut on_b = allocate(b.turn, "other").await.unwrap();
    assert_eq!(on_b.server, b.turn);
    on_b.delete().await.unwrap();

    // 2. Provisioning: A (1 allocation) hands out B (0); B hands out itself.
    wait_until("A hands out B", Duration::from_secs(10), || {
        let u = turn_urls(a.http);
        u.contains(&format!(":{b_port}?")) && !u.contains(&format!(":{a_port}?"))
    });
    assert!(turn_urls(b.http).contains(&format!(":{b_port}?")));
    // Redis down: A falls back to itself (and to its local quota); back when Redis is.
    drop(redis.take());
    wait_until(
        "A hands out itself without Redis",
        Duration::from_secs(15),
        || turn_urls(a.http).contains(&format!(":{a_port}?")),
    );
    assert_eq!(metric(a.http, "kyuu_fleet_turn_degraded"), 1);
    redis = Some(start_redis(redis_port));
    wait_until("A hands out B again", Duration::from_secs(15), || {
        turn_urls(a.http).contains(&format!(":{b_port}?"))
    });

    // 4. Drain A. A signaling client of A is told to go to B; A's allocation keeps relaying.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut held = on_a;
    held.permit(peer.local_addr().unwrap().ip()).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/?v=2", a.http))
        .await
        .unwrap();
    let drained = http(a.http, "POST", "/admin/v1/drain", "{\"deadline_secs\":120}");
    assert!(drained.contains("\"draining\":true"), "{drained}");
    let mut told = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while let Ok(Some(Ok(m))) = tokio::time::timeout_at(deadline, ws.next()).await {
        if let WsMessage::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "reconnect" {
                told = v["url"].as_str().map(str::to_owned);
            }
        }
    }
    assert_eq!(
        told,
        Some(format!("ws://{}/", b.http)),
        "signaling not sent to B"
    );

    // kyuu's client follows the 300 to B.
    let moved = allocate(a.turn, "moved").await.unwrap();
    assert_eq!(
        moved.server, b.turn,
        "kyuu's client did not follow 300 to B"
    );
    let extra = allocate(b.turn, "extra").await.unwrap();

    // Provisioning never hands out the draining node, though it is now the less loaded (1
    // allocation against B's 2).
    std::thread::sleep(Duration::from_millis(1500));
    for node in [a.http, b.http] {
        let u = turn_urls(node);
        assert!(
            !u.contains(&format!(":{a_port}?")) && u.contains(&format!(":{b_port}?")),
            "{u}"
        );
    }

    // coturn's uclient follows it too: its allocations land on B.
    let peer_port = free_udp_tcp_port();
    let peer_proc = Proc(
        Command::new("turnutils_peer")
            .args(["-p", &peer_port.to_string(), "-L", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    std::thread::sleep(Duration::from_millis(300));
    let b_before = metric(b.http, "kyuu_turn_allocations_total");
    let a_before = metric(a.http, "kyuu_turn_allocations_total");
    let out = uclient(a.turn, peer_port);
    let b_after = metric(b.http, "kyuu_turn_allocations_total");
    assert!(
        b_after > b_before,
        "no uclient allocation on B ({b_before} -> {b_after}):\n{out}"
    );
    assert_eq!(metric(a.http, "kyuu_turn_allocations_total"), a_before);
    drop(peer_proc);
    drop((moved, extra));

    // The allocation A held before the drain still relays.
    held.send_to(b"still here", peer.local_addr().unwrap())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"still here");

    // A exits once its last allocation ends.
    held.delete().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if a.proc.0.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A did not exit after its last allocation"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(redis);
}
