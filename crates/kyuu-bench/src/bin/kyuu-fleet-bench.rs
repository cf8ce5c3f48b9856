//! Signaling across a fleet: cross-node vs same-node relay, and three nodes vs one.
//!
//! ```text
//! kyuu-fleet-bench [--kyuu PATH] [--clients 1000] [--rate 10000] [--seconds 5]
//! ```
//!
//! Starts a `redis-server` and three `kyuu serve` nodes (`--kyuu`, default: `kyuu` next to this
//! binary) on free loopback ports, each with `listen.threads = 1`, and connects `--clients`
//! libdatachannel-format WebSocket clients in pairs. Every process is killed by PID at the end.
//! Nothing is pinned: redis, the nodes and this client share the machine's cores (print with
//! `nproc`). Phases:
//!
//! 1. **offered load** (`--rate` msg/s in total, open loop, one-way, for `--seconds`): all
//!    clients on one node (same-node relay) vs spread over three nodes with every pair split
//!    across two nodes (cross-node relay through Redis). Prints delivered msg/s and p50/p99
//!    one-way latency, and the cross/same ratios.
//! 2. **capacity** (closed loop: every pair keeps 8 messages in flight, echoing): one node vs
//!    three nodes with same-node pairs vs three nodes with cross-node pairs. Prints msg/s and
//!    ratios against one node.
//!
//! A benchmark, not a test: it asserts nothing and prints ratios.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let t = std::net::TcpListener::bind("127.0.0.1:0")?;
        let p = t.local_addr()?.port();
        if std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok() {
            return Ok(p);
        }
    }
    bail!("no free port")
}

fn start_redis(port: u16) -> anyhow::Result<Proc> {
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("redis-server")?;
    let p = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("redis-server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(p)
}

fn start_node(
    kyuu: &PathBuf,
    dir: &std::path::Path,
    name: &str,
    redis: u16,
) -> anyhow::Result<(Proc, SocketAddr)> {
    let turn = free_port()?;
    let http = free_port()?;
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nudp = [\"127.0.0.1:{turn}\"]\ntcp = []\ntls = []\nthreads = 1\n\
             [http]\nlisten = \"127.0.0.1:{http}\"\nmax_conns_per_ip = 0\n\
             [signal]\nrate_limit_per_sec = 1000000\nrate_limit_burst = 1000000\n\
             max_connections = 1000000\nmax_connections_per_ip = 1000000\nsend_queue = 1024\n\
             [log]\nlevel = \"warn\"\n\
             [fleet]\nredis_url = \"redis://127.0.0.1:{redis}/\"\nnode = \"{name}\"\n\
             peer_ttl_secs = 10\nheartbeat_secs = 3\n"
        ),
    )?;
    let mut child = Command::new(kyuu)
        .args(["serve", "--config"])
        .arg(&cfg)
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", kyuu.display()))?;
    let out = child.stdout.take().context("stdout")?;
    let p = Proc(child);
    let mut lines = BufReader::new(out).lines();
    let addr = SocketAddr::from(([127, 0, 0, 1], http));
    loop {
        let Some(Ok(l)) = lines.next() else {
            bail!("kyuu serve {name} exited; config {}", cfg.display());
        };
        if l.trim_start().starts_with("HTTP") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    Ok((p, addr))
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Latency samples (µs) and a delivered counter shared by the receivers.
#[derive(Default)]
struct Stats {
    delivered: AtomicU64,
    lat_us: Mutex<Vec<u32>>,
}

fn pct(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    f64::from(v[i.min(v.len() - 1)]) / 1000.0
}

async fn connect(node: SocketAddr, id: &str) -> anyhow::Result<Ws> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{node}/{id}")).await?;
    Ok(ws)
}

/// Pairs (a, b) with their nodes: `spread` puts clients over all nodes; `cross` puts the two
/// ends of a pair on different nodes.
fn layout(
    clients: usize,
    nodes: &[SocketAddr],
    spread: bool,
    cross: bool,
) -> Vec<(SocketAddr, SocketAddr)> {
    let n = if spread { nodes.len() } else { 1 };
    (0..clients / 2)
        .map(|i| {
            let a = i % n;
            let b = if cross && n > 1 { (a + 1) % n } else { a };
            (nodes[a], nodes[b])
        })
        .collect()
}

/// Open loop: `rate` msg/s in total from the first end of each pair to the second, one way.
async fn offered(
    pairs: &[(SocketAddr, SocketAddr)],
    rate: u64,
    secs: u64,
    tag: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let stats = Arc::new(Stats::default());
    let t0 = Instant::now();
    let per_pair = (rate as f64 / pairs.len() as f64).max(0.001);
    let gap = Duration::from_secs_f64(1.0 / per_pair);
    let mut conns = Vec::new();
    for (i, (na, nb)) in pairs.iter().enumerate() {
        let a = connect(*na, &format!("{tag}a{i}")).await?;
        let b = connect(*nb, &format!("{tag}b{i}")).await?;
        conns.push((i, a, b));
    }
    // Registrations reach Redis asynchronously.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let end = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (i, mut a, mut b) in conns {
        let st = stats.clone();
        let to = format!("{tag}b{i}");
        tasks.push(tokio::spawn(async move {
            let phase = gap.mul_f64((i % 97) as f64 / 97.0);
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, gap);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < end {
                tick.tick().await;
                let us = t0.elapsed().as_micros() as u64;
                let m = format!("{{\"id\":\"{to}\",\"t\":{us}}}");
                if a.send(Message::Text(m.into())).await.is_err() {
                    break;
                }
            }
            let _ = a.close(None).await;
        }));
        let st2 = st.clone();
        tasks.push(tokio::spawn(async move {
            let mut local = Vec::new();
            let stop = end + Duration::from_secs(2);
            while let Ok(Some(Ok(m))) = tokio::time::timeout_at(stop.into(), b.next()).await {
                if let Message::Text(t) = m {
                    if let Some(us) = t
                        .split("\"t\":")
                        .nth(1)
                        .and_then(|r| r.trim_end_matches('}').parse::<u64>().ok())
                    {
                        let now = t0.elapsed().as_micros() as u64;
                        local.push(now.saturating_sub(us) as u32);
                        st2.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            if let Ok(mut v) = st2.lat_us.lock() {
                v.extend(local);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let delivered = stats.delivered.load(Ordering::Relaxed) as f64 / secs as f64;
    let mut lat = stats.lat_us.lock().map(|v| v.clone()).unwrap_or_default();
    Ok((delivered, pct(&mut lat, 0.5), pct(&mut lat, 0.99)))
}

/// Closed loop: each pair keeps `window` messages in flight, b echoing to a. Messages/s
/// delivered (both directions).
async fn capacity(
    pairs: &[(SocketAddr, SocketAddr)],
    window: usize,
    secs: u64,
    tag: &str,
) -> anyhow::Result<f64> {
    let total = Arc::new(AtomicU64::new(0));
    let mut conns = Vec::new();
    for (i, (na, nb)) in pairs.iter().enumerate() {
        let a = connect(*na, &format!("{tag}a{i}")).await?;
        let b = connect(*nb, &format!("{tag}b{i}")).await?;
        conns.push((i, a, b));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for (i, mut a, mut b) in conns {
        let (to_b, to_a) = (format!("{tag}b{i}"), format!("{tag}a{i}"));
        let ta = total.clone();
        tasks.push(tokio::spawn(async move {
            let m = format!("{{\"id\":\"{to_b}\",\"x\":1}}");
            for _ in 0..window {
                if a.send(Message::Text(m.clone().into())).await.is_err() {
                    return;
                }
            }
            while let Ok(Some(Ok(_))) = tokio::time::timeout_at(end.into(), a.next()).await {
                ta.fetch_add(1, Ordering::Relaxed);
                if a.send(Message::Text(m.clone().into())).await.is_err() {
                    return;
                }
            }
        }));
        let tb = total.clone();
        tasks.push(tokio::spawn(async move {
            let m = format!("{{\"id\":\"{to_a}\",\"x\":1}}");
            while let Ok(Some(Ok(_))) = tokio::time::timeout_at(end.into(), b.next()).await {
                tb.fetch_add(1, Ordering::Relaxed);
                if b.send(Message::Text(m.clone().into())).await.is_err() {
                    return;
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64().max(0.001))
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |n: &str, d: u64| arg(&args, n).and_then(|v| v.parse().ok()).unwrap_or(d);
    let clients = num("--clients", 1000) as usize;
    let rate = num("--rate", 10_000);
    let secs = num("--seconds", 5).max(1);
    let kyuu = arg(&args, "--kyuu").map(PathBuf::from).unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("kyuu")))
            .unwrap_or_else(|| PathBuf::from("kyuu"))
    });
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let dir = std::env::temp_dir().join(format!("kyuu-fleet-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let redis_port = free_port()?;
    let _redis = start_redis(redis_port)?;
    let mut procs = Vec::new();
    let mut nodes = Vec::new();
    for name in ["n1", "n2", "n3"] {
        let (p, a) = start_node(&kyuu, &dir, name, redis_port)?;
        procs.push(p);
        nodes.push(a);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(async {
        println!(
            "kyuu-fleet-bench: {clients} clients, {rate} msg/s offered, {secs} s per phase; \
             redis + 3 nodes (listen.threads = 1) + this client share {cores} cores, unpinned"
        );
        let same = layout(clients, &nodes, false, false);
        let cross = layout(clients, &nodes, true, true);
        let (sd, s50, s99) = offered(&same, rate, secs, "os").await?;
        let (cd, c50, c99) = offered(&cross, rate, secs, "oc").await?;
        println!("\n| offered {rate} msg/s | delivered msg/s | p50 ms | p99 ms |");
        println!("|---|---|---|---|");
        println!("| same node (1 node) | {sd:.0} | {s50:.2} | {s99:.2} |");
        println!("| cross node (3 nodes, Redis) | {cd:.0} | {c50:.2} | {c99:.2} |");
        println!(
            "| ratio cross/same | {:.2} | {:.2} | {:.2} |",
            cd / sd,
            c50 / s50,
            c99 / s99
        );
        let one = capacity(&layout(clients, &nodes, false, false), 8, secs, "c1").await?;
        let three_local = capacity(&layout(clients, &nodes, true, false), 8, secs, "c3").await?;
        let three_cross = capacity(&layout(clients, &nodes, true, true), 8, secs, "cx").await?;
        println!("\n| capacity (closed loop, 8 in flight per pair) | msg/s | vs one node |");
        println!("|---|---|---|");
        println!("| one node | {one:.0} | 1.00 |");
        println!(
            "| three nodes, same-node pairs | {three_local:.0} | {:.2} |",
            three_local / one
        );
        println!(
            "| three nodes, cross-node pairs | {three_cross:.0} | {:.2} |",
            three_cross / one
        );
        anyhow::Ok(())
    });
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    r
}
