//! Three real `kyuu serve` nodes sharing one real `redis-server` (started here on a free port,
//! killed by PID): libdatachannel-format clients on different nodes reach each other by id, the
//! order of 200 messages between two nodes is kept, a killed node's client is reported unknown
//! fleet-wide within the registry TTL, and a Redis outage degrades to local-only service
//! (`/healthz` says so) and recovers when Redis is back.
//!
//! SKIPs when `redis-server` is missing, unless `KYUU_INTEROP_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

mod support;
use support::{start_redis, Proc};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");

fn required() -> bool {
    std::env::var("KYUU_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Node {
    _proc: Proc,
    http: SocketAddr,
}

fn start_node(name: &str, redis_port: u16) -> Node {
    let dir = std::env::temp_dir().join(format!("kyuu-fleet-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join(format!("{name}.toml"));
    let turn = free_port();
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nudp = [\"127.0.0.1:{turn}\"]\ntcp = [\"127.0.0.1:{turn}\"]\ntls = []\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [fleet]\nredis_url = \"redis://127.0.0.1:{redis_port}/\"\nnode = \"{name}\"\n\
             region = \"test\"\npeer_ttl_secs = 4\nheartbeat_secs = 1\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(KYUU)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .env_remove("KYUU_CONFIG")
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("KYUU_FLEET_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut summary = String::new();
    let mut http = None;
    while http.is_none() {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "kyuu serve exited early:\n{summary}");
        summary.push_str(&line);
        if line.trim_start().starts_with("HTTP") {
            let a = line.split("http://").nth(1).unwrap();
            http = Some(a.split_whitespace().next().unwrap().parse().unwrap());
        }
        assert!(Instant::now() < deadline, "no summary: {summary}");
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    Node {
        _proc: Proc(child),
        http: http.unwrap(),
    }
}

fn healthz(addr: SocketAddr) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = write!(s, "GET /healthz HTTP/1.0\r\nHost: x\r\n\r\n");
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body
}

fn wait_health(addr: SocketAddr, want: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let h = healthz(addr);
        if h.contains(want) {
            return;
        }
        assert!(Instant::now() < deadline, "/healthz never had {want}: {h}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn client(node: &Node, path: &str) -> Ws {
    let url = format!("ws://{}/{path}", node.http);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Next JSON text frame, skipping control frames of v2 clients other than errors.
async fn recv(ws: &mut Ws, limit: Duration) -> Option<Value> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next()).await.ok()??;
        if let Ok(Message::Text(t)) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if matches!(v["type"].as_str(), Some("welcome" | "pong")) {
                continue;
            }
            return Some(v);
        }
    }
}

/// Sends from `a` to `to` until `b` receives it (registrations are asynchronous).
async fn until_delivered(a: &mut Ws, to: &str, b: &mut Ws, limit: Duration) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        send(a, json!({"id": to, "type": "probe"})).await;
        if let Some(v) = recv(b, Duration::from_millis(300)).await {
            if v["type"] == "probe" {
                return v;
            }
        }
        assert!(Instant::now() < deadline, "never delivered to {to}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_redis() {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        assert!(!required(), "redis-server required but not installed");
        println!("SKIP three_nodes_one_redis: redis-server not installed");
        return;
    }
    let rport = free_port();
    let mut redis = start_redis(rport);
    let a = start_node("node-a", rport);
    let b = start_node("node-b", rport);
    let c = start_node("node-c", rport);
    for n in [&a, &b, &c] {
        wait_health(n.http, "\"fleet\":\"ok\"", Duration::from_secs(10));
    }

    // libdatachannel format across nodes: offer, answer, candidates.
    let mut alice = client(&a, "alice").await;
    let mut bob = client(&b, "bob").await;
    let first = until_delivered(&mut alice, "bob", &mut bob, Duration::from_secs(10)).await;
    assert_eq!(first["id"], "alice");
    while recv(&mut bob, Duration::from_millis(300)).await.is_some() {}
    send(
        &mut alice,
        json!({"id": "bob", "type": "offer", "description": "v=0 offer"}),
    )
    .await;
    let m = recv(&mut bob, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        m,
        json!({"id": "alice", "type": "offer", "description": "v=0 offer"})
    );
    send(
        &mut bob,
        json!({"id": "alice", "type": "answer", "description": "v=0 answer"}),
    )
    .await;
    let m = recv(&mut alice, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        m,
        json!({"id": "bob", "type": "answer", "description": "v=0 answer"})
    );
    send(
        &mut bob,
        json!({"id": "alice", "type": "candidate", "candidate": "a=candidate:1", "mid": "0"}),
    )
    .await;
    let m = recv(&mut alice, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["candidate"], "a=candidate:1");
    assert_eq!(m["id"], "bob");

    // Order of 200 messages between two nodes.
    for i in 0..200 {
        send(&mut alice, json!({"id": "bob", "type": "seq", "n": i})).await;
    }
    for i in 0..200 {
        let m = recv(&mut bob, Duration::from_secs(5)).await.unwrap();
        assert_eq!(m["n"], i, "message {i} out of order: {m}");
    }

    // Id ownership and resume across nodes: frank (v2, owns his id with a resume token) on
    // node A; his id cannot be taken on node B without the token; with it, B takes over, A
    // closes the old connection (4000) and frames for frank reach him on B.
    let mut frank = client(&a, "frank?v=2").await;
    let welcome = loop {
        let m = frank.next().await.unwrap().unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "welcome" {
                break v;
            }
        }
    };
    let token = welcome["resume"].as_str().unwrap().to_owned();
    until_delivered(&mut bob, "frank", &mut frank, Duration::from_secs(10)).await;
    let url = format!("ws://{}/frank?v=2", b.http);
    let err = tokio_tungstenite::connect_async(url).await.unwrap_err();
    assert!(err.to_string().contains("409"), "{err}");
    let url = format!("ws://{}/frank?v=2&resume={token}", b.http);
    let (mut frank2, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match frank.next().await {
                Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
                Some(Ok(_)) => continue,
                _ => break 0,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, 4000);
    let v = until_delivered(&mut alice, "frank", &mut frank2, Duration::from_secs(10)).await;
    assert_eq!(v["id"], "alice");

    // Directory across nodes: a name published on node C is found and watched from node A,
    // and a second client cannot take it on node B.
    let mut carol = client(&c, "carol").await;
    let mut dave = client(&a, "dave?v=2").await;
    until_delivered(&mut dave, "carol", &mut carol, Duration::from_secs(10)).await;
    let mut gina = client(&c, "gina?v=2").await;
    send(&mut gina, json!({"type": "publish", "name": "arm-7"})).await;
    let m = recv(&mut gina, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["type"], "published", "{m}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send(&mut dave, json!({"type": "lookup", "name": "arm-7"})).await;
        let m = recv(&mut dave, Duration::from_secs(5)).await.unwrap();
        assert_eq!(m["type"], "lookup", "{m}");
        if m["peers"] == json!(["gina"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "name never visible on node A: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut hank = client(&b, "hank?v=2").await;
    send(&mut hank, json!({"type": "publish", "name": "arm-7"})).await;
    let m = recv(&mut hank, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["code"], "name-taken", "{m}");
    send(&mut dave, json!({"type": "watch", "name": "arm-7"})).await;
    let m = recv(&mut dave, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["peers"], json!(["gina"]), "{m}");
    // Found by name, reached by id across nodes.
    send(
        &mut dave,
        json!({"id": "gina", "type": "offer", "description": "x"}),
    )
    .await;
    let m = recv(&mut gina, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["id"], "dave");

    // Rooms and presence across nodes.
    let mut ivan = client(&a, "ivan?v=2").await;
    send(&mut ivan, json!({"type": "join", "room": "lobby"})).await;
    let m = recv(&mut ivan, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["members"], json!(["ivan"]), "{m}");
    let mut judy = client(&b, "judy?v=2").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Joining again is harmless and answers the members list.
        send(&mut judy, json!({"type": "join", "room": "lobby"})).await;
        let m = recv(&mut judy, Duration::from_secs(5)).await.unwrap();
        assert_eq!(m["type"], "members", "{m}");
        let mut got: Vec<String> = serde_json::from_value(m["members"].clone()).unwrap();
        got.sort();
        if got == ["ivan", "judy"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ivan never listed on node B: {m}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let m = recv(&mut ivan, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        m,
        json!({"type": "joined", "room": "lobby", "peer": "judy"})
    );
    send(&mut judy, json!({"type": "leave", "room": "lobby"})).await;
    let m = recv(&mut ivan, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m, json!({"type": "left", "room": "lobby", "peer": "judy"}));

    // A killed node: its client becomes unknown fleet-wide within the registry TTL, and its
    // directory name vanishes (watchers are told).
    drop(c);
    let killed = Instant::now();
    let (mut carol_gone, mut name_gone) = (false, false);
    while !(carol_gone && name_gone) {
        if !carol_gone {
            send(&mut dave, json!({"id": "carol", "type": "probe"})).await;
        }
        if let Some(v) = recv(&mut dave, Duration::from_millis(500)).await {
            carol_gone |= v["type"] == "error" && v["code"] == "unknown-peer";
            name_gone |= v["type"] == "unpublished" && v["peer"] == "gina";
        }
        assert!(
            killed.elapsed() < Duration::from_secs(12),
            "after her node died: carol unknown {carol_gone}, gina's name withdrawn {name_gone}"
        );
    }
    send(&mut dave, json!({"type": "lookup", "name": "arm-7"})).await;
    let m = loop {
        let m = recv(&mut dave, Duration::from_secs(5)).await.unwrap();
        if m["type"] == "lookup" {
            break m;
        }
    };
    assert_eq!(m["peers"], json!([]), "{m}");

    // Redis killed: local delivery keeps working, /healthz says degraded.
    drop(redis);
    wait_health(a.http, "\"fleet\":\"degraded\"", Duration::from_secs(10));
    let mut erin = client(&a, "erin").await;
    send(&mut erin, json!({"id": "alice", "type": "local"})).await;
    let m = recv(&mut alice, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m, json!({"id": "erin", "type": "local"}));
    // Published during the outage: other nodes learn it at the resync after the restart.
    send(&mut hank, json!({"type": "publish", "name": "arm-9"})).await;
    let m = recv(&mut hank, Duration::from_secs(5)).await.unwrap();
    assert_eq!(m["type"], "published", "{m}");

    // Redis back (empty, like a restart without persistence): nodes reconnect and
    // re-register, cross-node delivery resumes.
    redis = start_redis(rport);
    wait_health(a.http, "\"fleet\":\"ok\"", Duration::from_secs(15));
    wait_health(b.http, "\"fleet\":\"ok\"", Duration::from_secs(15));
    let v = until_delivered(&mut bob, "alice", &mut alice, Duration::from_secs(15)).await;
    assert_eq!(v["id"], "bob");
    let v = until_delivered(&mut alice, "bob", &mut bob, Duration::from_secs(15)).await;
    assert_eq!(v["id"], "alice");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        send(&mut dave, json!({"type": "lookup", "name": "arm-9"})).await;
        let m = loop {
            let m = recv(&mut dave, Duration::from_secs(5)).await.unwrap();
            if m["type"] == "lookup" {
                break m;
            }
        };
        if m["peers"] == json!(["hank"]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "arm-9 never resynced to node A: {m}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop((a, b, redis));
}

/// Two clients on two nodes publish the same name at the same moment, five times over: each
/// time exactly one holds it afterwards, on both nodes' directories (the claim is a Redis
/// `SET NX`; the later claim is revoked with `name-taken`). Without the atomic claim both
/// local hubs accept before the other's announcement arrives and lookups list two holders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_claims_are_atomic_across_nodes() {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        assert!(!required(), "redis-server required but not installed");
        println!("SKIP name_claims_are_atomic_across_nodes: redis-server not installed");
        return;
    }
    let rport = free_port();
    let _redis = start_redis(rport);
    let a = start_node("claim-a", rport);
    let b = start_node("claim-b", rport);
    for n in [&a, &b] {
        wait_health(n.http, "\"fleet\":\"ok\"", Duration::from_secs(10));
    }
    for round in 0..5 {
        let mut x = client(&a, &format!("x{round}?v=2")).await;
        let mut y = client(&b, &format!("y{round}?v=2")).await;
        let name = format!("race-{round}");
        let p = json!({"type": "publish", "name": name});
        tokio::join!(send(&mut x, p.clone()), send(&mut y, p));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut holders = Vec::new();
        for ws in [&mut x, &mut y] {
            while recv(ws, Duration::from_millis(100)).await.is_some() {}
            send(ws, json!({"type": "lookup", "name": name})).await;
            let m = recv(ws, Duration::from_secs(3)).await.unwrap();
            assert_eq!(m["type"], "lookup", "{m}");
            holders.push(m["peers"].clone());
        }
        assert_eq!(
            holders[0], holders[1],
            "nodes disagree on {name}: {holders:?}"
        );
        assert_eq!(
            holders[0].as_array().map(Vec::len),
            Some(1),
            "{name} held by {holders:?}"
        );
    }
}

/// A message sent to a client while it is disconnected is held by its node; when the client
/// resumes (with its token) on another node, the held message follows it there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_messages_follow_a_client_that_resumes_on_another_node() {
    if Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        assert!(!required(), "redis-server required but not installed");
        println!("SKIP held_messages_follow: redis-server not installed");
        return;
    }
    let rport = free_port();
    let _redis = start_redis(rport);
    let a = start_node("held-a", rport);
    let b = start_node("held-b", rport);
    for n in [&a, &b] {
        wait_health(n.http, "\"fleet\":\"ok\"", Duration::from_secs(10));
    }
    let mut xena = client(&a, "xena?v=2").await;
    let welcome = loop {
        let m = xena.next().await.unwrap().unwrap();
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).unwrap();
            if v["type"] == "welcome" {
                break v;
            }
        }
    };
    let token = welcome["resume"].as_str().unwrap().to_owned();
    let mut yuri = client(&a, "yuri").await;
    until_delivered(&mut yuri, "xena", &mut xena, Duration::from_secs(10)).await;
    xena.close(None).await.unwrap();
    drop(xena);
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&mut yuri, json!({"id": "xena", "type": "held-1"})).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let url = format!("ws://{}/xena?v=2&resume={token}", b.http);
    let (mut xena2, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut got = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        match recv(&mut xena2, Duration::from_millis(500)).await {
            Some(v) if v["type"] == "held-1" => {
                got = Some(v);
                break;
            }
            _ => {}
        }
    }
    let v = got.expect("the message held on node A did not follow xena to node B");
    assert_eq!(v["id"], "yuri");
}
