//! The load generator: one thread, many non-blocking UDP sockets (one per allocation, since a
//! TURN allocation is keyed by the client's 5-tuple) multiplexed with epoll (mio).
//!
//! Every loop is bounded by a deadline.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};
use serde::Serialize;

use crate::proto::{self, Action, Credentials, Plan, Session, Step};
use crate::{batch, echo};

/// Where a fleet's traffic goes.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    /// Through a TURN server's allocations to the echo peer (ChannelData).
    Turn(SocketAddr),
    /// Straight to the echo peer: the no-server bound.
    Direct,
}

/// What [`Fleet::drive`] does to each session.
#[derive(Debug, Clone, Copy)]
enum Drive {
    Setup(Plan),
    #[allow(dead_code)] // kyuu-soak
    Refresh,
    Deallocate,
}

/// N client sockets with their sessions.
pub struct Fleet {
    poll: Poll,
    events: Events,
    socks: Vec<UdpSocket>,
    sessions: Vec<Session>,
    via: Via,
    peer: SocketAddr,
    creds: Credentials,
    buf: Vec<u8>,
    /// Time origin of latency stamps, fixed for the fleet so a late packet from an earlier
    /// round is recognised as such.
    epoch: Instant,
}

#[derive(Debug, Clone, Serialize)]
pub struct SetupReport {
    pub ok: usize,
    pub failed: usize,
    pub secs: f64,
    pub per_sec: f64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThroughputReport {
    pub allocations: usize,
    pub payload: usize,
    pub secs: f64,
    /// Datagrams the clients sent per second.
    pub sent_pps: f64,
    /// Datagrams that came back to the clients per second (each crossed the relay twice).
    pub delivered_pps: f64,
    /// Payload Mbit/s delivered back to the clients.
    pub delivered_mbps: f64,
    /// Datagrams the echo peer received per second (one way through the relay).
    pub peer_pps: f64,
    /// Datagrams given up on as lost (window refills).
    pub lost: u64,
    /// Server CPU time per delivered round trip (two relay operations), µs.
    pub server_cpu_us_per_pkt: f64,
    /// Cores the server kept busy on average.
    pub server_cores: f64,
}

/// One latency round's raw results.
#[derive(Debug, Clone, Default)]
pub struct LatencyRun {
    /// Round-trip times, ns.
    pub rtts: Vec<u64>,
    /// Packets sent in the measured window.
    pub sent: u64,
    /// Sends the kernel refused (e.g. ECONNREFUSED after an ICMP port unreachable).
    pub send_errors: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LatencyReport {
    pub allocations: usize,
    pub rate_pps: u64,
    pub samples: usize,
    pub lost: u64,
    pub send_errors: u64,
    pub first_send_error: Option<String>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

const DATA_HEADER: usize = 4;

/// Fleets so far: each binds its sockets to its own loopback source address (127.1.x.y), so a
/// new fleet never reuses the 5-tuple of an earlier allocation the server may still hold.
static FLEETS: AtomicU32 = AtomicU32::new(0);

fn next_source_ip() -> Ipv4Addr {
    let k = FLEETS.fetch_add(1, Ordering::Relaxed) % 65_000 + 1;
    Ipv4Addr::new(127, 1, (k >> 8) as u8, (k & 0xff) as u8)
}

impl Fleet {
    /// Opens `n` sockets on 127.0.0.1, connected to the server (or the echo peer).
    pub fn open(
        n: usize,
        via: Via,
        echo: SocketAddr,
        creds: &Credentials,
    ) -> anyhow::Result<Fleet> {
        Self::open_from(n, via, echo, creds, IpAddr::V4(next_source_ip()))
    }

    /// [`Fleet::open`] with the sockets bound to `source` (the lab benchmark: a client host's
    /// address inside its network namespace).
    pub fn open_from(
        n: usize,
        via: Via,
        echo: SocketAddr,
        creds: &Credentials,
        source: IpAddr,
    ) -> anyhow::Result<Fleet> {
        let poll = Poll::new()?;
        let target = match via {
            Via::Turn(server) => server,
            Via::Direct => echo,
        };
        let now = Instant::now();
        let src = SocketAddr::new(source, 0);
        let mut socks = Vec::with_capacity(n);
        let mut sessions = Vec::with_capacity(n);
        for i in 0..n {
            let std_sock = if n <= 100 {
                echo::udp_socket(src)?
            } else {
                std::net::UdpSocket::bind(src)
                    .with_context(|| format!("binding client socket {i} (RLIMIT_NOFILE?)"))?
            };
            std_sock.set_nonblocking(true)?;
            std_sock.connect(target)?;
            let mut s = UdpSocket::from_std(std_sock);
            poll.registry()
                .register(&mut s, Token(i), Interest::READABLE)?;
            socks.push(s);
            sessions.push(Session::new(
                Plan {
                    permission: true,
                    channel: true,
                },
                echo,
                now,
            ));
        }
        Ok(Fleet {
            poll,
            events: Events::with_capacity(1024),
            socks,
            sessions,
            via,
            peer: echo,
            creds: creds.clone(),
            buf: vec![0; 2048],
            epoch: Instant::now(),
        })
    }

    /// Runs every session to Ready with `plan` (at most `concurrency` in flight), or to Closed
    /// when `dealloc`. Direct fleets need no setup.
    fn drive(
        &mut self,
        mode: Drive,
        concurrency: usize,
        limit: Duration,
    ) -> anyhow::Result<SetupReport> {
        let start = Instant::now();
        let deadline = start + limit;
        let n = self.sessions.len();
        if matches!(self.via, Via::Direct) {
            return Ok(SetupReport {
                ok: n,
                failed: 0,
                secs: 0.0,
                per_sec: 0.0,
                first_error: None,
            });
        }
        let mut next = 0usize;
        let mut active: Vec<usize> = Vec::with_capacity(concurrency);
        let (mut ok, mut failed) = (0usize, 0usize);
        let mut first_error = None;
        let mut finished = vec![false; n];
        loop {
            // Start more.
            while active.len() < concurrency && next < n {
                let i = next;
                next += 1;
                let now = Instant::now();
                let s = &mut self.sessions[i];
                let act = match mode {
                    Drive::Setup(p) => {
                        *s = Session::new(p, self.peer, now);
                        s.start(&self.creds, now)
                    }
                    Drive::Refresh => s.refresh(&self.creds, now),
                    Drive::Deallocate => s.deallocate(&self.creds, now),
                };
                match act {
                    Action::Send => {
                        let _ = self.socks[i].send(s.request());
                        active.push(i);
                    }
                    Action::Done => {
                        ok += 1;
                        finished[i] = true;
                    }
                    Action::Failed => {
                        failed += 1;
                        finished[i] = true;
                        first_error = first_error.or(s.error().map(str::to_owned));
                    }
                    Action::Ignore => {}
                }
            }
            if active.is_empty() && next >= n {
                break;
            }
            let now = Instant::now();
            if now >= deadline {
                failed += active.len() + (n - next);
                first_error = first_error.or(Some(format!(
                    "{} sessions unfinished after {limit:?}",
                    active.len() + (n - next)
                )));
                break;
            }
            let wake = active
                .iter()
                .filter_map(|&i| self.sessions[i].timeout())
                .min()
                .unwrap_or(deadline)
                .min(deadline);
            self.poll
                .poll(&mut self.events, Some(wake.saturating_duration_since(now)))?;
            let now = Instant::now();
            for ev in self.events.iter() {
                let i = ev.token().0;
                let Some(sock) = self.socks.get(i) else {
                    continue;
                };
                let s = &mut self.sessions[i];
                for _ in 0..64 {
                    let len = match sock.recv(&mut self.buf) {
                        Ok(len) => len,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => continue,
                    };
                    match s.handle(&self.creds, &self.buf[..len], now) {
                        Action::Send => {
                            let _ = sock.send(s.request());
                        }
                        Action::Done => {
                            if !finished[i] {
                                finished[i] = true;
                                ok += 1;
                            }
                        }
                        Action::Failed => {
                            if !finished[i] {
                                finished[i] = true;
                                failed += 1;
                                first_error = first_error.or(s.error().map(str::to_owned));
                            }
                        }
                        Action::Ignore => {}
                    }
                }
            }
            // Timeouts and retire the finished.
            let now = Instant::now();
            active.retain(|&i| {
                if finished[i] {
                    return false;
                }
                let s = &mut self.sessions[i];
                match s.handle_timeout(now) {
                    Action::Send => {
                        let _ = self.socks[i].send(s.request());
                        true
                    }
                    Action::Failed => {
                        finished[i] = true;
                        failed += 1;
                        if first_error.is_none() {
                            first_error = s.error().map(str::to_owned);
                        }
                        false
                    }
                    Action::Done | Action::Ignore => true,
                }
            });
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(SetupReport {
            ok,
            failed,
            secs,
            per_sec: ok as f64 / secs.max(1e-9),
            first_error,
        })
    }

    /// Allocates every session per `plan`.
    pub fn setup(
        &mut self,
        plan: Plan,
        concurrency: usize,
        limit: Duration,
    ) -> anyhow::Result<SetupReport> {
        self.drive(Drive::Setup(plan), concurrency, limit)
    }

    /// Refreshes every ready session (Refresh LIFETIME [`proto::REFRESH_LIFETIME`]).
    #[allow(dead_code)] // kyuu-soak
    pub fn refresh(&mut self, concurrency: usize, limit: Duration) -> anyhow::Result<SetupReport> {
        self.drive(Drive::Refresh, concurrency, limit)
    }

    /// Deallocates every ready session (Refresh LIFETIME 0).
    pub fn deallocate(
        &mut self,
        concurrency: usize,
        limit: Duration,
    ) -> anyhow::Result<SetupReport> {
        self.drive(Drive::Deallocate, concurrency, limit)
    }

    /// Sessions in Ready.
    pub fn ready(&self) -> usize {
        match self.via {
            Via::Direct => self.sessions.len(),
            Via::Turn(_) => self
                .sessions
                .iter()
                .filter(|s| s.step() == Step::Ready)
                .count(),
        }
    }

    /// The client sockets, connected to the server (or the echo peer), one per allocation (the
    /// fast path benchmark sends its own load through them).
    #[allow(dead_code)] // kyuu-fastpath-bench only
    pub fn sockets(&self) -> &[UdpSocket] {
        &self.socks
    }

    /// A data packet of `payload` bytes (ChannelData through TURN, the same bytes direct).
    fn packet(&self, payload: usize) -> Vec<u8> {
        let mut p = vec![0u8; DATA_HEADER + payload];
        p[..2].copy_from_slice(&proto::CHANNEL.to_be_bytes());
        p[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
        p
    }

    /// Drains every pending datagram (between phases).
    fn drain(&mut self, quiet: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + Duration::from_secs(2);
        while Instant::now() < end {
            self.poll.poll(&mut self.events, Some(quiet))?;
            if self.events.is_empty() {
                break;
            }
            for ev in self.events.iter() {
                if let Some(s) = self.socks.get(ev.token().0) {
                    for _ in 0..4096 {
                        if s.recv(&mut self.buf).is_err() {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Sends one packet per allocation and counts those that echo back, retrying the missing
    /// ones `rounds` times. Returns how many allocations relayed.
    pub fn probe_all(&mut self, rounds: usize) -> anyhow::Result<usize> {
        let n = self.socks.len();
        let pkt = self.packet(100);
        let mut seen = vec![false; n];
        let mut count = 0;
        for _ in 0..rounds.max(1) {
            let mut burst = 0;
            for (i, s) in self.socks.iter().enumerate() {
                if !seen[i] {
                    let _ = s.send(&pkt);
                    burst += 1;
                    // Pace so no socket buffer overflows.
                    if burst % 256 == 0 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            }
            let end = Instant::now() + Duration::from_millis(1500);
            while count < n && Instant::now() < end {
                self.poll
                    .poll(&mut self.events, Some(Duration::from_millis(50)))?;
                for ev in self.events.iter() {
                    let i = ev.token().0;
                    let Some(s) = self.socks.get(i) else {
                        continue;
                    };
                    for _ in 0..64 {
                        match s.recv(&mut self.buf) {
                            Ok(len) if len >= DATA_HEADER => {
                                if !seen[i] {
                                    seen[i] = true;
                                    count += 1;
                                }
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                }
            }
            if count == n {
                break;
            }
        }
        Ok(count)
    }

    /// Closed-loop throughput: `window` packets in flight per allocation; each echo triggers
    /// the next send. An allocation that hears nothing for 200 ms has its window counted lost
    /// and refilled.
    pub fn throughput(
        &mut self,
        payload: usize,
        total_window: usize,
        warmup: Duration,
        duration: Duration,
        probe: &dyn Fn() -> (u64, u64),
    ) -> anyhow::Result<ThroughputReport> {
        let n = self.socks.len();
        if n == 0 {
            bail!("no allocations");
        }
        let window = total_window.div_ceil(n).max(1) as u32;
        let pkt = self.packet(payload);
        let start = Instant::now();
        let measure_from = start + warmup;
        let end = measure_from + duration;
        let stall = Duration::from_millis(200);
        let mut outstanding = vec![0u32; n];
        let mut last_rx = vec![start; n];
        let (mut sent, mut delivered, mut lost) = (0u64, 0u64, 0u64);
        let mut measuring = false;
        let (mut sent0, mut delivered0, mut peer0, mut lost0, mut cpu0) = (0, 0, 0, 0, 0);
        let mut rx = batch::Receiver::new(&std::net::UdpSocket::bind("127.0.0.1:0")?)?;
        for (i, s) in self.socks.iter().enumerate() {
            let k = batch::send_copies(s, &pkt, window as usize);
            sent += k as u64;
            outstanding[i] += k as u32;
        }
        let mut next_check = start + Duration::from_millis(50);
        loop {
            let now = Instant::now();
            if !measuring && now >= measure_from {
                measuring = true;
                sent0 = sent;
                delivered0 = delivered;
                lost0 = lost;
                (peer0, cpu0) = probe();
            }
            if now >= end {
                break;
            }
            self.poll
                .poll(&mut self.events, Some(Duration::from_millis(10)))?;
            let now = Instant::now();
            for ev in self.events.iter() {
                let i = ev.token().0;
                let Some(s) = self.socks.get(i) else {
                    continue;
                };
                let mut got = 0u32;
                for _ in 0..64 {
                    match rx.recv(s) {
                        Ok(k) => {
                            got += (0..k)
                                .filter(|&j| rx.datagram(j).0.len() >= DATA_HEADER)
                                .map(|j| rx.segments(j) as u32)
                                .sum::<u32>();
                        }
                        Err(_) => break,
                    }
                }
                if got == 0 {
                    continue;
                }
                delivered += u64::from(got);
                last_rx[i] = now;
                outstanding[i] = outstanding[i].saturating_sub(got);
                let k = batch::send_copies(s, &pkt, (window - outstanding[i].min(window)) as usize);
                sent += k as u64;
                outstanding[i] += k as u32;
            }
            if now >= next_check {
                next_check = now + Duration::from_millis(50);
                for (i, s) in self.socks.iter().enumerate() {
                    if now.duration_since(last_rx[i]) < stall {
                        continue;
                    }
                    lost += u64::from(outstanding[i]);
                    last_rx[i] = now;
                    let k = batch::send_copies(s, &pkt, window as usize);
                    sent += k as u64;
                    outstanding[i] = k as u32;
                }
            }
        }
        let secs = Instant::now().duration_since(measure_from).as_secs_f64();
        let (peer1, cpu1) = probe();
        let peer = peer1.saturating_sub(peer0);
        let cpu = cpu1.saturating_sub(cpu0) as f64;
        let delivered_pps = (delivered - delivered0) as f64 / secs;
        self.drain(Duration::from_millis(100))?;
        Ok(ThroughputReport {
            allocations: n,
            payload,
            secs,
            sent_pps: (sent - sent0) as f64 / secs,
            delivered_pps,
            delivered_mbps: delivered_pps * payload as f64 * 8.0 / 1e6,
            peer_pps: peer as f64 / secs,
            lost: lost - lost0,
            server_cpu_us_per_pkt: cpu / 1000.0 / ((delivered - delivered0) as f64).max(1.0),
            server_cores: cpu / 1e9 / secs,
        })
    }

    /// Open-loop latency: `rate` packets/s in total, spread round-robin over the allocations,
    /// each stamped with its send time. Returns the round-trip times (ns) of the packets sent
    /// after the warm-up, and how many of those were sent.
    pub fn latency(
        &mut self,
        payload: usize,
        rate: u64,
        warmup: Duration,
        duration: Duration,
    ) -> anyhow::Result<LatencyRun> {
        let n = self.socks.len();
        if n == 0 || rate == 0 {
            bail!("no allocations or zero rate");
        }
        let mut pkt = self.packet(payload.max(8));
        let epoch = self.epoch;
        let base_ns = epoch.elapsed().as_nanos() as u64;
        let interval_ns = 1_000_000_000 / rate;
        let mut next_send_ns: u64 = base_ns;
        let mut rr = 0usize;
        let mut rtts: Vec<u64> =
            Vec::with_capacity((rate as f64 * duration.as_secs_f64()) as usize + 16);
        let mut sent = 0u64;
        let mut send_errors = 0u64;
        let mut first_error: Option<String> = None;
        let from_ns = base_ns + warmup.as_nanos() as u64;
        let end_ns = from_ns + duration.as_nanos() as u64;
        let drain_until = end_ns + 300_000_000;
        loop {
            let now_ns = epoch.elapsed().as_nanos() as u64;
            if now_ns >= drain_until {
                break;
            }
            // Send whatever is due (bounded burst so a stall cannot flood).
            let mut burst = 0;
            while next_send_ns <= now_ns && next_send_ns < end_ns && burst < 1000 {
                // Stamp with the actual send time so timer slack is not counted.
                let t = epoch.elapsed().as_nanos() as u64;
                pkt[DATA_HEADER..DATA_HEADER + 8].copy_from_slice(&t.to_be_bytes());
                let in_window = t >= from_ns && t < end_ns;
                match self.socks[rr].send(&pkt) {
                    Ok(_) if in_window => sent += 1,
                    Ok(_) => {}
                    Err(e) => {
                        send_errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
                rr = (rr + 1) % n;
                next_send_ns += interval_ns;
                burst += 1;
            }
            let wait_ns = if next_send_ns < end_ns {
                next_send_ns.saturating_sub(epoch.elapsed().as_nanos() as u64)
            } else {
                50_000_000
            };
            self.poll
                .poll(&mut self.events, Some(Duration::from_nanos(wait_ns)))?;
            for ev in self.events.iter() {
                let Some(s) = self.socks.get(ev.token().0) else {
                    continue;
                };
                for _ in 0..256 {
                    match s.recv(&mut self.buf) {
                        Ok(len) if len >= DATA_HEADER + 8 => {
                            let now = epoch.elapsed().as_nanos() as u64;
                            let mut ts = [0u8; 8];
                            ts.copy_from_slice(&self.buf[DATA_HEADER..DATA_HEADER + 8]);
                            let t = u64::from_be_bytes(ts);
                            if t >= from_ns && t < end_ns {
                                rtts.push(now.saturating_sub(t));
                            }
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
        }
        Ok(LatencyRun {
            rtts,
            sent,
            send_errors,
            first_error,
        })
    }
}

impl LatencyReport {
    /// Percentiles of round-trip times in ns.
    pub fn from_run(allocations: usize, rate_pps: u64, run: LatencyRun) -> Self {
        let LatencyRun {
            mut rtts,
            sent,
            send_errors,
            first_error,
        } = run;
        rtts.sort_unstable();
        let pct = |p: f64| -> f64 {
            if rtts.is_empty() {
                return f64::NAN;
            }
            let idx = ((rtts.len() as f64 * p).ceil() as usize).clamp(1, rtts.len()) - 1;
            rtts[idx] as f64 / 1000.0
        };
        LatencyReport {
            allocations,
            rate_pps,
            samples: rtts.len(),
            lost: sent.saturating_sub(rtts.len() as u64),
            send_errors,
            first_send_error: first_error,
            p50_us: pct(0.50),
            p99_us: pct(0.99),
            max_us: rtts.last().map_or(f64::NAN, |&v| v as f64 / 1000.0),
        }
    }
}
