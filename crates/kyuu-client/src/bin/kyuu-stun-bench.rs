//! STUN Binding throughput and latency, kyuu against coturn in the same run.
//!
//! Starts `kyuu serve` and coturn's `turnserver` on free ports on 127.0.0.1 (checking that
//! nothing else holds the port: coturn sets SO_REUSEPORT and would silently share one), then for
//! each server:
//!
//! 1. a low-load phase (one socket, one request in flight) for unloaded latency;
//! 2. a saturation phase: `--sockets` UDP sockets spread over `--threads` client threads, each
//!    keeping `--window` requests in flight, for `--duration`.
//!
//! Prints requests per second, p50/p99 latency and the kyuu/coturn ratio. The load generator
//! shares the machine with the server, so the achieved rate is bounded by the client as much as
//! by the server; the server's CPU time per request (from `/proc/<pid>/task/*/schedstat`) is
//! reported too, as requests per server CPU-second: the rate the server would reach with those
//! cores to itself. Children are stopped
//! by PID (and killed when the bench exits early). The transaction id carries the send time, so
//! no per-request state is kept.

use std::io::{self, ErrorKind};
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use clap::Parser;
use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};

/// STUN Binding requests per second and latency: kyuu against coturn.
#[derive(Debug, Parser)]
#[command(after_help = "Examples:
  kyuu-stun-bench                                   both servers, defaults
  kyuu-stun-bench --duration 20s --sockets 16 --window 16
  kyuu-stun-bench --target 127.0.0.1:3478           an already running server only

The kyuu binary defaults to the one next to this program (same cargo target dir): build it with
`cargo build --release -p kyuu -p kyuu-client`.")]
struct Args {
    /// Saturation phase length per server.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Low-load latency phase length per server.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    idle_duration: Duration,
    /// Warm-up before measuring, per server.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Client UDP sockets (distinct source ports spread load over the servers' SO_REUSEPORT
    /// sockets).
    #[arg(long, default_value_t = 8)]
    sockets: usize,
    /// Client threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Requests in flight per socket.
    #[arg(long, default_value_t = 16)]
    window: usize,
    /// Datagrams per `recvmmsg`/`sendmmsg` in the load generator (1: one recv and one send
    /// syscall per request, as older versions of this bench did).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Server threads (kyuu listen.threads, coturn --relay-threads).
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    /// Pin each server to these CPUs with taskset (e.g. "0-1"); empty: no pinning.
    #[arg(long, default_value = "")]
    cpus: String,
    /// The kyuu binary.
    #[arg(long)]
    kyuu: Option<PathBuf>,
    /// coturn's turnserver binary.
    #[arg(long, default_value = "turnserver")]
    turnserver: PathBuf,
    /// Skip coturn.
    #[arg(long)]
    no_coturn: bool,
    /// Skip kyuu.
    #[arg(long)]
    no_kyuu: bool,
    /// Benchmark only this already running server.
    #[arg(long)]
    target: Option<SocketAddr>,
    /// Rounds, interleaved kyuu, coturn, kyuu, ...; the medians are reported (the machine may
    /// be shared, so one round can be disturbed).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 10s, 500ms)");
    let (n, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = n.parse().map_err(|_| bad())?;
    if !(0.0..=3600.0).contains(&(v * scale)) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// A child process stopped by PID when dropped.
struct Server {
    name: &'static str,
    addr: SocketAddr,
    child: Option<Child>,
}

impl Server {
    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGTERM first so servers clean up, then SIGKILL.
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time (ns) used so far by every thread of process `pid`, from
/// `/proc/<pid>/task/*/schedstat` (threads that already exited are not counted, so servers are
/// measured while they run).
fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = t.ok()?.path().join("schedstat");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        total += text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Some(total)
}

/// A port free for both UDP and TCP on 127.0.0.1, and `port + 1` too (bound without
/// SO_REUSEPORT, so a coturn holding it would make the bind fail).
fn free_port() -> io::Result<u16> {
    for _ in 0..50 {
        let u = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = u.local_addr()?.port();
        if port == u16::MAX {
            continue;
        }
        let ok = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            && UdpSocket::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok()
            && std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, port + 1)).is_ok();
        drop(u);
        if ok {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free port pair found"))
}

fn ensure_free(port: u16) -> io::Result<()> {
    UdpSocket::bind((Ipv4Addr::LOCALHOST, port))
        .map(drop)
        .map_err(|e| io::Error::other(format!("127.0.0.1:{port} (udp) is in use: {e}")))
}

fn taskset(cpus: &str, program: &std::path::Path) -> Command {
    if cpus.is_empty() {
        Command::new(program)
    } else {
        let mut c = Command::new("taskset");
        c.arg("-c").arg(cpus).arg(program);
        c
    }
}

fn start_kyuu(args: &Args) -> io::Result<Server> {
    let bin = match &args.kyuu {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("kyuu"))
            .ok_or_else(|| io::Error::other("cannot locate the kyuu binary; pass --kyuu"))?,
    };
    let port = free_port()?;
    ensure_free(port)?;
    // All load comes from one IP: lift the per-source limit on unauthenticated requests
    // (coturn has none), or kyuu would rightly answer only `unauth_rate` requests per second.
    let dir = std::env::temp_dir().join(format!("kyuu-bench-kyuu-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("kyuu.toml");
    std::fs::write(&config, "[turn]\nunauth_rate = 0\n")?;
    let mut cmd = taskset(&args.cpus, &bin);
    cmd.args(["serve", "--config"])
        .arg(&config)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--tls",
            "off",
            "--http",
            "off",
            "--log",
            "warn",
            "--threads",
            &args.server_threads.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::other(format!("cannot run {}: {e}", bin.display())))?;
    let server = Server {
        name: "kyuu",
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        child: Some(child),
    };
    wait_ready(&server)?;
    Ok(server)
}

fn start_coturn(args: &Args) -> io::Result<Server> {
    let port = free_port()?;
    ensure_free(port)?;
    let dir = std::env::temp_dir().join(format!("kyuu-bench-coturn-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut cmd = taskset(&args.cpus, &args.turnserver);
    cmd.args([
        "-n",
        "--no-cli",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "-L",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-m",
        &args.server_threads.to_string(),
        "--use-auth-secret",
        "--static-auth-secret",
        "kyuu-bench",
        "--realm",
        "kyuu",
        "--no-stdout-log",
        "--simple-log",
    ])
    .arg("--log-file")
    .arg(dir.join("turn.log"))
    .arg("--pidfile")
    .arg(dir.join("turn.pid"))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let child = cmd.spawn().map_err(|e| {
        io::Error::other(format!(
            "cannot run {}: {e} (apt install coturn, or --no-coturn)",
            args.turnserver.display()
        ))
    })?;
    let server = Server {
        name: "coturn",
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        child: Some(child),
    };
    wait_ready(&server)?;
    Ok(server)
}

/// Waits until the server answers a Binding request (10 s at most).
fn wait_ready(server: &Server) -> io::Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    let mut req = [0u8; 64];
    while t0.elapsed() < Duration::from_secs(10) {
        let n = write_request(&mut req, 0, 0)?;
        let _ = sock.send_to(req.get(..n).unwrap_or_default(), server.addr);
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if check_response(buf.get(..n).unwrap_or_default()).is_some() {
                return Ok(());
            }
        }
    }
    Err(io::Error::other(format!(
        "{} on {} did not answer within 10 s",
        server.name, server.addr
    )))
}

/// The transaction id: 8 bytes of send time (ns since the phase start) and 4 of tag.
fn write_request(buf: &mut [u8], sent_ns: u64, tag: u32) -> io::Result<usize> {
    let mut tid = [0u8; 12];
    tid[..8].copy_from_slice(&sent_ns.to_be_bytes());
    tid[8..].copy_from_slice(&tag.to_be_bytes());
    let b = MessageBuilder::new(buf, method::BINDING, Class::Request, TransactionId(tid))
        .map_err(io::Error::other)?;
    Ok(b.finish())
}

/// The send time of a valid Binding success response with a mapped address.
fn check_response(data: &[u8]) -> Option<u64> {
    let msg = Message::parse(data).ok()?;
    if msg.method() != method::BINDING || msg.class() != Class::Success {
        return None;
    }
    msg.xor_address(attr::XOR_MAPPED_ADDRESS)?.ok()?;
    let tid = msg.transaction_id().as_bytes();
    let mut t = [0u8; 8];
    t.copy_from_slice(tid.get(..8)?);
    Some(u64::from_be_bytes(t))
}

/// Slot size of the generator's batches (a Binding answer is under 100 bytes).
const SLOT: usize = 256;

/// `recvmmsg`/`sendmmsg` buffers of one load thread: received answers, then the new requests
/// written over them, on a connected socket.
struct Mmsg {
    bufs: Vec<[u8; SLOT]>,
    lens: Vec<usize>,
}

/// One `mmsghdr` for each of `iovs`, pointing at it: the iovecs must outlive the headers' use.
fn mmsg_headers(iovs: &mut [libc::iovec]) -> Vec<libc::mmsghdr> {
    iovs.iter_mut()
        .map(|iov| {
            #[allow(unsafe_code)]
            // SAFETY: an all-zero mmsghdr is a valid empty header.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect()
}

impl Mmsg {
    fn new(batch: usize) -> Self {
        let batch = batch.clamp(1, 1024);
        Mmsg {
            bufs: vec![[0u8; SLOT]; batch],
            lens: vec![0; batch],
        }
    }

    fn received(&self, k: usize) -> &[u8] {
        let len = self.lens.get(k).copied().unwrap_or(0);
        self.bufs
            .get(k)
            .and_then(|b| b.get(..len))
            .unwrap_or_default()
    }

    fn set_request(&mut self, k: usize, sent_ns: u64) -> io::Result<()> {
        if let (Some(b), Some(l)) = (self.bufs.get_mut(k), self.lens.get_mut(k)) {
            *l = write_request(b, sent_ns, 0)?;
        }
        Ok(())
    }

    /// One `recvmmsg` (non-blocking) into the slots; the number of datagrams.
    fn recv(&mut self, s: &UdpSocket) -> io::Result<usize> {
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: SLOT,
            })
            .collect();
        #[allow(unsafe_code)]
        // SAFETY: each header points at one iovec of `iovs`, which outlives the call, and each
        // iovec at one slot of `self.bufs`.
        let n = unsafe {
            let mut hdrs = mmsg_headers(&mut iovs);
            let n = libc::recvmmsg(
                s.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            );
            if n > 0 {
                for (l, h) in self.lens.iter_mut().zip(hdrs.iter()) {
                    *l = h.msg_len as usize;
                }
            }
            n
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// One `sendmmsg` of the first `n` slots on the connected socket (what the kernel refuses
    /// is lost, and the 200 ms refill covers it).
    fn send(&mut self, s: &UdpSocket, n: usize) {
        let n = n.min(self.bufs.len());
        let mut iovs: Vec<libc::iovec> = self
            .bufs
            .iter_mut()
            .zip(self.lens.iter())
            .take(n)
            .map(|(b, l)| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: *l,
            })
            .collect();
        #[allow(unsafe_code)]
        // SAFETY: as in `recv`: each header points at one live iovec, each iovec at one slot.
        unsafe {
            let mut hdrs = mmsg_headers(&mut iovs);
            libc::sendmmsg(
                s.as_raw_fd(),
                hdrs.as_mut_ptr(),
                hdrs.len() as libc::c_uint,
                0,
            );
        }
    }
}

#[derive(Debug, Default)]
struct Tally {
    ok: u64,
    bad: u64,
    resent: u64,
    /// Latencies in microseconds (a sample of every response).
    lat_us: Vec<u32>,
}

impl Tally {
    /// Counts a response received at `now` (ns since the epoch): its latency when its request
    /// left after `measure_ns` (not in the warm-up), or a bad one when it is no Binding success.
    fn record(&mut self, response: &[u8], now: u64, measure_ns: u64) {
        match check_response(response) {
            Some(sent) if sent >= measure_ns => {
                self.ok += 1;
                let us = now.saturating_sub(sent) / 1000;
                self.lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
            Some(_) => {}
            None => self.bad += 1,
        }
    }

    fn merge(&mut self, o: Tally) {
        self.ok += o.ok;
        self.bad += o.bad;
        self.resent += o.resent;
        self.lat_us.extend(o.lat_us);
    }
}

/// One client thread: `sockets` non-blocking sockets, `window` requests in flight on each.
fn load_thread(
    target: SocketAddr,
    sockets: usize,
    window: usize,
    batch: usize,
    epoch: Instant,
    measure_from: Instant,
    stop: Arc<AtomicBool>,
) -> io::Result<Tally> {
    let socks: Vec<UdpSocket> = (0..sockets)
        .map(|_| {
            let s = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
            s.set_nonblocking(true)?;
            s.connect(target)?;
            Ok(s)
        })
        .collect::<io::Result<_>>()?;
    let mut tally = Tally::default();
    let mut req = [0u8; 64];
    let mut buf = [0u8; 1500];
    let now_ns = || u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let mut last_rx: Vec<Instant> = vec![Instant::now(); sockets];
    for s in &socks {
        for _ in 0..window {
            let n = write_request(&mut req, now_ns(), 0)?;
            let _ = s.send(req.get(..n).unwrap_or_default());
        }
    }
    let mut pfds: Vec<libc::pollfd> = socks
        .iter()
        .map(|s| libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let measure_ns = u64::try_from((measure_from - epoch).as_nanos()).unwrap_or(0);
    // Batched: up to 4 recvmmsg batches a socket and turn, each batch's new requests leaving in
    // one sendmmsg; unbatched: up to 64 recv, each answered by a send.
    let mut mm = (batch > 1).then(|| Mmsg::new(batch));
    let rounds = if mm.is_some() { 4 } else { 64 };
    while !stop.load(Ordering::Relaxed) {
        let mut got_any = false;
        for (i, s) in socks.iter().enumerate() {
            // Drain what is there, answering each response with a new request.
            for _ in 0..rounds {
                let got = match &mut mm {
                    Some(mm) => mm.recv(s),
                    None => s.recv(&mut buf),
                };
                let n = match got {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => break,
                    Err(e) => return Err(e),
                };
                got_any = true;
                if let Some(slot) = last_rx.get_mut(i) {
                    *slot = Instant::now();
                }
                let now = now_ns();
                let Some(mm) = &mut mm else {
                    tally.record(buf.get(..n).unwrap_or_default(), now, measure_ns);
                    let n = write_request(&mut req, now_ns(), 0)?;
                    let _ = s.send(req.get(..n).unwrap_or_default());
                    continue;
                };
                for k in 0..n {
                    tally.record(mm.received(k), now, measure_ns);
                }
                let t = now_ns();
                for k in 0..n {
                    mm.set_request(k, t)?;
                }
                mm.send(s, n);
                if n < batch {
                    break;
                }
            }
        }
        if !got_any {
            // Lost requests shrink the window; refill a socket idle for 200 ms.
            for (i, s) in socks.iter().enumerate() {
                if last_rx
                    .get(i)
                    .is_some_and(|t| t.elapsed() > Duration::from_millis(200))
                {
                    for _ in 0..window {
                        let n = write_request(&mut req, now_ns(), 0)?;
                        let _ = s.send(req.get(..n).unwrap_or_default());
                        tally.resent += 1;
                    }
                    if let Some(slot) = last_rx.get_mut(i) {
                        *slot = Instant::now();
                    }
                }
            }
            #[allow(unsafe_code)]
            // SAFETY: `pfds` is a valid, exclusively borrowed array of `pfds.len()` pollfds.
            unsafe {
                libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 10);
            }
        }
    }
    Ok(tally)
}

#[derive(Debug)]
struct Figures {
    rate: f64,
    p50_us: u32,
    p99_us: u32,
    idle_p50_us: u32,
    idle_p99_us: u32,
    bad: u64,
    resent: u64,
    /// Server CPU seconds per second of the saturation phase (all its threads).
    cpu_load: Option<f64>,
    /// Requests answered per server CPU-second.
    per_cpu_s: Option<f64>,
    /// Load generator (this process) CPU seconds per second of the saturation phase: near the
    /// client threads' count, the generator is the bound.
    gen_load: Option<f64>,
}

fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted.get(idx).copied().unwrap_or(0)
}

#[allow(clippy::too_many_arguments)]
fn run_phase(
    target: SocketAddr,
    threads: usize,
    sockets: usize,
    window: usize,
    batch: usize,
    warmup: Duration,
    duration: Duration,
    server_pid: Option<u32>,
) -> io::Result<(Tally, Duration, Option<u64>, Option<u64>)> {
    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let measure_from = epoch + warmup;
    let threads = threads.max(1);
    let mut handles = Vec::new();
    for t in 0..threads {
        let per = sockets / threads + usize::from(t < sockets % threads);
        if per == 0 {
            continue;
        }
        let stop = stop.clone();
        handles.push(thread::spawn(move || {
            load_thread(target, per, window, batch, epoch, measure_from, stop)
        }));
    }
    thread::sleep(warmup);
    let cpu0 = server_pid.and_then(cpu_ns);
    let gen0 = cpu_ns(std::process::id());
    thread::sleep(duration);
    let cpu1 = server_pid.and_then(cpu_ns);
    let gen1 = cpu_ns(std::process::id());
    stop.store(true, Ordering::Relaxed);
    let mut total = Tally::default();
    for h in handles {
        let t = h
            .join()
            .map_err(|_| io::Error::other("load thread panicked"))??;
        total.merge(t);
    }
    let cpu = cpu0.zip(cpu1).map(|(a, b)| b.saturating_sub(a));
    let gen = gen0.zip(gen1).map(|(a, b)| b.saturating_sub(a));
    Ok((total, duration, cpu, gen))
}

fn bench(args: &Args, target: SocketAddr, pid: Option<u32>) -> io::Result<Figures> {
    let (mut idle, _, _, _) = run_phase(
        target,
        1,
        1,
        1,
        1,
        args.warmup / 2,
        args.idle_duration,
        None,
    )?;
    idle.lat_us.sort_unstable();
    let (mut load, d, cpu, gen) = run_phase(
        target,
        args.threads,
        args.sockets,
        args.window,
        args.batch,
        args.warmup,
        args.duration,
        pid,
    )?;
    let cpu_s = cpu.map(|ns| ns as f64 / 1e9);
    load.lat_us.sort_unstable();
    Ok(Figures {
        rate: load.ok as f64 / d.as_secs_f64(),
        p50_us: percentile(&load.lat_us, 0.50),
        p99_us: percentile(&load.lat_us, 0.99),
        idle_p50_us: percentile(&idle.lat_us, 0.50),
        idle_p99_us: percentile(&idle.lat_us, 0.99),
        bad: load.bad + idle.bad,
        resent: load.resent,
        cpu_load: cpu_s.map(|c| c / d.as_secs_f64()),
        per_cpu_s: cpu_s.filter(|c| *c > 0.0).map(|c| load.ok as f64 / c),
        gen_load: gen.map(|ns| ns as f64 / 1e9 / d.as_secs_f64()),
    })
}

/// Per-column medians.
fn median(rounds: &[Figures]) -> Option<Figures> {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
        v.get(v.len() / 2).copied()
    }
    Some(Figures {
        rate: mid(rounds.iter().map(|f| f.rate).collect())?,
        p50_us: mid(rounds.iter().map(|f| f.p50_us).collect())?,
        p99_us: mid(rounds.iter().map(|f| f.p99_us).collect())?,
        idle_p50_us: mid(rounds.iter().map(|f| f.idle_p50_us).collect())?,
        idle_p99_us: mid(rounds.iter().map(|f| f.idle_p99_us).collect())?,
        bad: rounds.iter().map(|f| f.bad).sum(),
        resent: rounds.iter().map(|f| f.resent).sum(),
        cpu_load: mid(rounds.iter().filter_map(|f| f.cpu_load).collect()),
        per_cpu_s: mid(rounds.iter().filter_map(|f| f.per_cpu_s).collect()),
        gen_load: mid(rounds.iter().filter_map(|f| f.gen_load).collect()),
    })
}

fn ms(us: u32) -> String {
    format!("{:.3}ms", f64::from(us) / 1000.0)
}

fn print_row(name: &str, f: &Figures) {
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
    println!(
        "{name:<10} {:>10.0} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>6} {:>8}",
        f.rate,
        opt(f.per_cpu_s, 0),
        opt(f.cpu_load, 2),
        opt(f.gen_load, 2),
        ms(f.p50_us),
        ms(f.p99_us),
        ms(f.idle_p50_us),
        ms(f.idle_p99_us),
        f.bad,
        f.resent
    );
}

fn main() -> ExitCode {
    let args = Args::parse();
    match real_main(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(args: &Args) -> io::Result<()> {
    println!(
        "STUN Binding over UDP on 127.0.0.1: {} client sockets x {} in flight on {} threads \
         (batches of {}), {}s per server and round (after {}s warm-up); server threads {}{}; {} CPUs",
        args.sockets,
        args.window,
        args.threads,
        args.batch,
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.server_threads,
        if args.cpus.is_empty() {
            String::new()
        } else {
            format!(", servers pinned to CPUs {}", args.cpus)
        },
        thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<10} {:>10} {:>10} {:>10} {:>8} {:>10} {:>10} {:>10} {:>10} {:>6} {:>8}",
        "server",
        "req/s",
        "req/cpu-s",
        "cpu",
        "gen cpu",
        "p50",
        "p99",
        "idle p50",
        "idle p99",
        "bad",
        "resent"
    );
    if let Some(t) = args.target {
        let f = bench(args, t, None)?;
        print_row("target", &f);
        return Ok(());
    }
    // Both servers run for the whole bench but only one is loaded at a time; rounds alternate
    // so a disturbance on a shared machine hits both alike.
    let kyuu_server = if args.no_kyuu {
        None
    } else {
        Some(start_kyuu(args)?)
    };
    let coturn_server = if args.no_coturn {
        None
    } else {
        Some(start_coturn(args)?)
    };
    let mut kyuu_rounds = Vec::new();
    let mut coturn_rounds = Vec::new();
    for round in 1..=args.rounds.max(1) {
        if let Some(s) = &kyuu_server {
            let f = bench(args, s.addr, s.pid())?;
            print_row(&format!("kyuu #{round}"), &f);
            kyuu_rounds.push(f);
        }
        if let Some(s) = &coturn_server {
            let f = bench(args, s.addr, s.pid())?;
            print_row(&format!("coturn #{round}"), &f);
            coturn_rounds.push(f);
        }
    }
    drop(kyuu_server);
    drop(coturn_server);
    let kyuu = median(&kyuu_rounds);
    let coturn = median(&coturn_rounds);
    println!("medians of {} round(s):", args.rounds.max(1));
    if let Some(k) = &kyuu {
        print_row("kyuu", k);
    }
    if let Some(c) = &coturn {
        print_row("coturn", c);
    }
    if let (Some(k), Some(c)) = (&kyuu, &coturn) {
        let ratio = if c.rate > 0.0 {
            k.rate / c.rate
        } else {
            f64::INFINITY
        };
        if let (Some(kc), Some(cc)) = (k.per_cpu_s, c.per_cpu_s) {
            println!(
                "ratio kyuu/coturn: {:.2}x requests per server CPU-second (the rate each would reach \
                 with the same cores to itself)",
                kc / cc
            );
        }
        println!(
            "ratio kyuu/coturn: {ratio:.2}x requests per second under this load generator; p50 latency {:.2}x, p99 {:.2}x (lower is better)",
            f64::from(k.p50_us) / f64::from(c.p50_us.max(1)),
            f64::from(k.p99_us) / f64::from(c.p99_us.max(1)),
        );
        let mark = |ok: bool| if ok { "MET" } else { "NOT MET" };
        println!(
            "goal: >= 2x coturn's Binding requests/s: {ratio:.2}x, {}",
            mark(ratio >= 2.0)
        );
        match (k.per_cpu_s, c.per_cpu_s) {
            (Some(kc), Some(cc)) if kc > 0.0 => {
                // CPU per request is the inverse of requests per CPU-second.
                let cpu = cc / kc;
                println!(
                    "goal: server CPU per request <= 0.5x coturn's: {cpu:.2}x, {}",
                    mark(cpu <= 0.5)
                );
            }
            _ => println!("goal: server CPU per request <= 0.5x coturn's: n/a (no CPU figures)"),
        }
        println!(
            "(this is kyuu's userspace path over loopback; with the kernel fast path answering \
             Binding in XDP, see `kyuu-fastpath-bench --workload binding`, crates/kyuu-bench/README.md)"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn request_carries_send_time() {
        let mut buf = [0u8; 64];
        let n = write_request(&mut buf, 123_456_789, 7).unwrap();
        let msg = Message::parse(&buf[..n]).unwrap();
        assert_eq!(msg.class(), Class::Request);
        let mut resp = [0u8; 64];
        let mut b = MessageBuilder::new(
            &mut resp,
            method::BINDING,
            Class::Success,
            *msg.transaction_id(),
        )
        .unwrap();
        b.add_xor_address(attr::XOR_MAPPED_ADDRESS, "127.0.0.1:5".parse().unwrap())
            .unwrap();
        let n = b.finish();
        assert_eq!(check_response(&resp[..n]), Some(123_456_789));
    }

    #[test]
    fn percentiles() {
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), 51);
        assert_eq!(percentile(&v, 0.99), 99);
        assert_eq!(percentile(&[], 0.5), 0);
    }
}
