//! Benchmark for kyuu-signal, and a standalone server for tests.
//!
//! ```text
//! kyuu-signal-bench                      # both benchmarks with defaults
//! kyuu-signal-bench relay  [clients] [seconds]
//! kyuu-signal-bench memory [connections]
//! kyuu-signal-bench serve  [listen-addr] # prints "LISTENING <addr>", serves until killed
//! ```
//!
//! The server always runs as a separate process (this binary re-executed with `serve`), so
//! its resident memory can be read from `/proc/<pid>/status` and client work does not share
//! its runtime. Connections go to 127.0.0.1 only; idle clients bind source addresses
//! 127.0.0.2.. so ephemeral ports never run out. RLIMIT_NOFILE is raised to the hard limit
//! (run `ulimit -n 65536` first if the hard limit is lower than ~2 × connections + 100).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures_util::{SinkExt, StreamExt};
use kyuu_signal::{IceProvider, SignalConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mode = args.first().map(String::as_str).unwrap_or("all");
    let num = |i: usize, d: u64| -> u64 { args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d) };
    match mode {
        "serve" => {
            let listen = args.get(1).map_or("127.0.0.1:0", String::as_str).to_owned();
            serve(&listen)
        }
        "relay" => run_client(|| relay_phases(num(1, 1000) as usize, num(2, 10))),
        "memory" => run_client(|| memory_bench(num(1, 10_000) as usize)),
        "all" => {
            run_client(|| relay_phases(1000, 10))?;
            run_client(|| memory_bench(10_000))
        }
        other => bail!("unknown mode {other:?}; use relay, memory, serve or all"),
    }
}

fn raise_nofile() -> u64 {
    rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024)
}

/// The server process: a config suited to load tests (no rate limit, caps off).
fn serve(listen: &str) -> anyhow::Result<()> {
    raise_nofile();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(
            std::env::var("KYUU_BENCH_SERVER_THREADS")
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(1),
        )
        .enable_all()
        .build()?;
    rt.block_on(async {
        let cfg = SignalConfig {
            rate_limit_per_sec: 1_000_000,
            rate_limit_burst: 1_000_000,
            max_connections: 1_000_000,
            max_connections_per_ip: 1_000_000,
            send_queue: 1024,
            ..SignalConfig::default()
        };
        let ice = ice_from_env();
        let listener = tokio::net::TcpListener::bind(listen).await?;
        println!("LISTENING {}", listener.local_addr()?);
        kyuu_signal::serve_listener(listener, cfg, ice).await
    })
}

/// STUN/TURN for the standalone server from env (used by the browser test in a netns).
fn ice_from_env() -> IceProvider {
    let list = |k: &str| -> Vec<String> {
        std::env::var(k)
            .map(|v| {
                v.split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default()
    };
    IceProvider {
        stun_urls: list("KYUU_STUN_URLS"),
        turn_urls: list("KYUU_TURN_URLS"),
        rest_secret: std::env::var("KYUU_TURN_SECRET").ok(),
        ttl: Duration::from_secs(3600),
    }
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn spawn() -> anyhow::Result<Server> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("serve")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().context("no stdout")?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("LISTENING ")
            .context("server did not start")?
            .parse()?;
        Ok(Server { child, addr })
    }

    fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .context("no VmRSS")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run_client<F, Fut>(f: F) -> anyhow::Result<()>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    rt.block_on(f())
}

/// Latency at a moderate load, then throughput at saturation.
async fn relay_phases(clients: usize, seconds: u64) -> anyhow::Result<()> {
    // 1,000 clients x 10 msg/s: a busy signaling server, far from saturation.
    relay_bench(clients, seconds, 100).await?;
    // 1,000 clients x 100 msg/s offered: more than 2 shared cores can relay; measures the cap.
    relay_bench(clients, seconds, 10).await
}

/// N clients in pairs; every client sends to its partner every `interval_ms`: throughput is
/// messages delivered per second, latency is send→receive (client and server on one host).
async fn relay_bench(clients: usize, seconds: u64, interval_ms: u64) -> anyhow::Result<()> {
    let server = Server::spawn()?;
    let addr = server.addr;
    let clients = clients.max(2) & !1;
    println!(
        "relay: {clients} clients on {addr}, {seconds} s, each sending every {interval_ms} ms \
         ({} msg/s offered), messages of ~150 bytes",
        clients as u64 * 1000 / interval_ms.max(1)
    );
    let mut sockets = Vec::with_capacity(clients);
    for i in 0..clients {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/c{i}")).await?;
        sockets.push(ws);
    }
    let rss_connected = server.rss_kib()?;
    let delivered = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    let origin = Instant::now();
    for (i, ws) in sockets.into_iter().enumerate() {
        let partner = i ^ 1;
        let delivered = delivered.clone();
        tasks.push(tokio::spawn(async move {
            let (mut tx, mut rx) = ws.split();
            let sender = async move {
                // A steady rate per client rather than bursts.
                let mut tick = tokio::time::interval(Duration::from_millis(interval_ms.max(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                while Instant::now() < deadline {
                    tick.tick().await;
                    let t = origin.elapsed().as_micros();
                    let msg = format!(
                        r#"{{"id":"c{partner}","type":"candidate","candidate":"candidate:1 1 UDP 2122317823 10.5.0.6 53578 typ host","t":{t}}}"#
                    );
                    if tx.send(Message::Text(msg.into())).await.is_err() {
                        break;
                    }
                }
                tx
            };
            let receiver = async move {
                let mut lat = Vec::with_capacity(1024);
                let end = deadline + Duration::from_secs(2);
                while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end.into(), rx.next()).await {
                    let Message::Text(t) = m else { continue };
                    if let Some(sent) = sent_at(t.as_str()) {
                        let now = origin.elapsed().as_micros() as u64;
                        lat.push(now.saturating_sub(sent));
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                lat
            };
            let (_tx, lat) = tokio::join!(sender, receiver);
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = start
        .elapsed()
        .min(Duration::from_secs(seconds))
        .as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| -> f64 {
        if all.is_empty() {
            return f64::NAN;
        }
        let i = ((all.len() as f64 - 1.0) * p).round() as usize;
        all.get(i).copied().unwrap_or(0) as f64 / 1000.0
    };
    let n = delivered.load(Ordering::Relaxed);
    println!(
        "relay: {n} messages relayed in {elapsed:.1} s = {:.0} msg/s; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        n as f64 / elapsed,
        pct(0.50),
        pct(0.99),
        pct(1.0)
    );
    println!(
        "relay: server RSS with {clients} clients connected: {} KiB",
        rss_connected
    );
    Ok(())
}

/// Opens `n` idle legacy connections (raw handshake, no client-side WebSocket state) and
/// reports the server's resident memory growth per connection.
async fn memory_bench(n: usize) -> anyhow::Result<()> {
    let server = Server::spawn()?;
    let addr = server.addr;
    // Warm up allocator and runtime with a few connections first, then measure from there.
    let mut conns = Vec::with_capacity(n + 100);
    for i in 0..100 {
        conns.push(handshake(addr, i, &format!("warm{i}")).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = server.rss_kib()?;
    let t0 = Instant::now();
    for i in 0..n {
        conns.push(handshake(addr, i, &format!("idle{i}")).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = server.rss_kib()?;
    let per = (after.saturating_sub(before)) as f64 * 1024.0 / n as f64;
    println!(
        "memory: {n} idle connections opened in {:.1} s; server VmRSS {before} KiB -> {after} KiB: {:.0} bytes ({:.2} KiB) per idle connection (goal < 10 KiB)",
        t0.elapsed().as_secs_f64(),
        per,
        per / 1024.0
    );
    // Everything still works with them connected.
    let (mut a, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/probe-a")).await?;
    let (mut b, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/probe-b")).await?;
    a.send(Message::Text(r#"{"id":"probe-b","ok":1}"#.into()))
        .await?;
    match tokio::time::timeout(Duration::from_secs(5), b.next()).await {
        Ok(Some(Ok(Message::Text(t)))) if t.as_str() == r#"{"id":"probe-a","ok":1}"# => {
            println!("memory: relay still works with {} connections", n + 102)
        }
        other => bail!("probe failed: {other:?}"),
    }
    drop(conns);
    Ok(())
}

/// A WebSocket handshake on a raw socket from 127.0.0.(2 + i / 20000).
async fn handshake(addr: SocketAddr, i: usize, id: &str) -> anyhow::Result<tokio::net::TcpStream> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    let src = std::net::Ipv4Addr::new(127, 0, 0, 2 + (i / 20_000) as u8);
    sock.bind(SocketAddr::new(src.into(), 0))?;
    let mut s = sock.connect(addr).await?;
    let req = format!(
        "GET /{id} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let k = s.read(&mut buf).await?;
        if k == 0 {
            bail!("server closed during handshake");
        }
        got.extend_from_slice(buf.get(..k).unwrap_or_default());
    }
    if !got.starts_with(b"HTTP/1.1 101") {
        bail!("handshake refused: {}", String::from_utf8_lossy(&got));
    }
    Ok(s)
}

/// The `"t"` member the sender put last, without a full JSON parse (keeps the client cheap).
fn sent_at(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(r#""t":"#)?;
    rest.trim_end_matches('}').parse().ok()
}
