//! `kyuu-fastpath-bench`: the kernel fast path (XDP) against userspace relaying and coturn, with
//! traffic crossing a veth link in the network lab (so the XDP program sees it; loopback would
//! not be the real path), and with load-generator ends cheap enough that the figures are the
//! relay's.
//!
//! Topology (kyuu-lab, 198.18.0.0/15): one veth pair, no bridge, no router. The server namespace
//! holds 198.18.0.10/16; the "world" namespace holds both the client 198.18.1.10/16 and the echo
//! peer 198.18.2.10/16 on its end. On the world end an XDP program (`src/bpf/bench_peer.bpf.c`,
//! `bench_world`) reflects every datagram sent to the peer (the echo costs one XDP run: no socket,
//! no thread) and counts and drops every ChannelData sent to the client, taking the round trip
//! time from a CLOCK_MONOTONIC stamp in the payload into a histogram (so receiving costs one XDP
//! run too). The generator sends from the allocations' own connected client sockets, `sendmmsg`
//! batches, open loop.
//!
//! Targets: `null` (no relay: `bench_mirror` on the server's veth reflects each datagram at once;
//! this is the harness cost: generator, veth crossings, the XDP ends), kyuu with
//! `turn.fast_path = "required"`, kyuu with `"off"`, coturn. Per target: `--allocations`
//! allocations with a permission and a channel to the peer, one packet through each (the fast
//! path learns next-hop MACs from it), then two phases:
//! 1. fixed offered rate (`--rate` round trips/s, `--duration` s): CPU per round trip and RTT;
//! 2. unpaced (the generator sends as fast as it can for `--duration` s): delivered round trips/s.
//!
//! CPU accounting: the fast path runs in softirq, outside any process. This kernel has no IRQ
//! time accounting, so softirq work is charged to the task in whose context it runs: veth
//! delivery (and with it the XDP programs and the receiving stack) runs at the end of the
//! sender's `sendmmsg`/`sendmsg`, in the generator thread or the server's threads. The CPU of a
//! round trip is therefore the schedstat time of the generator thread + the server process + the
//! ksoftirqd threads (softirq work the kernel deferred), per delivered round trip; the relay's is
//! that minus the `null` run's at the same offered rate (which takes out the generator, the
//! harness's veth crossings and the XDP ends). Other work on the shared machine is not in it;
//! /proc/stat machine busy time is printed alongside for that.
//!
//! Needs root. A benchmark, not a test: it asserts nothing about time.
//! `cargo build --release -p kyuu -p kyuu-bench && target/release/kyuu-fastpath-bench`

#[allow(dead_code)]
#[path = "../batch.rs"]
mod batch;
#[allow(dead_code)]
#[path = "../echo.rs"]
mod echo;
#[allow(dead_code)]
#[path = "../load.rs"]
mod load;
#[allow(dead_code)]
#[path = "../proto.rs"]
mod proto;
#[allow(dead_code)]
#[path = "../servers.rs"]
mod servers;

use std::io::IoSlice;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use kyuu_lab::{Lab, LabChild, Node};
use load::{Fleet, Via};
use proto::{Credentials, Plan};
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags};

const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 10);
const PEER_PORT: u16 = 7000;
const PORT: u16 = 3478;

#[derive(Parser, Debug, Clone)]
#[command(about = "kernel fast path vs userspace vs coturn, through veth in the network lab")]
struct Args {
    #[arg(long, default_value = "target/release/kyuu")]
    kyuu_bin: PathBuf,
    #[arg(long, default_value = "turnserver")]
    coturn_bin: String,
    #[arg(long, default_value_t = 1000)]
    allocations: usize,
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Offered round trips/s of the fixed-rate phase (CPU per round trip, RTT).
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Datagrams per `sendmmsg` (all on one allocation's socket).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Server worker threads (kyuu `listen.threads`, coturn `--relay-threads`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Busy-looping threads (nice 0) started during the fixed-rate phase, to load the machine as
    /// other work would (the loaded-machine p99 question); 0: none.
    #[arg(long, default_value_t = 0)]
    hog: usize,
    #[arg(long, default_value = "null,kyuu-fastpath,kyuu-off,coturn")]
    targets: String,
    /// Run issue 11's matrix (1, 100, 1,000 and 10,000 allocations at 100 B and 1200 B; the
    /// `--allocations` and `--payload` given are ignored) and print its goal-1 table.
    #[arg(long)]
    sweep: bool,
    /// `relay` (ChannelData round trips through allocations) or `binding` (STUN Binding requests
    /// without attributes from `--allocations` client ports, at most 1024; issue 11's goal 3).
    #[arg(long, default_value = "relay")]
    workload: String,
    /// XDP attach mode of the harness's ends and of kyuu's fast path (`turn.fast_path_xdp`):
    /// `generic` or `native` (the veth driver's hook). With `native` only the `null` and
    /// `kyuu-fastpath` targets can run: a native XDP_TX on a veth leaves only towards an end with
    /// an XDP program of its own, which userspace kyuu and coturn do not attach.
    #[arg(long, default_value = "generic")]
    xdp: String,
}

impl Args {
    fn native(&self) -> bool {
        self.xdp == "native"
    }
}

/// The XDP ends of the benchmark, loaded from the object `build.rs` compiled.
mod ends {
    use aya::maps::{MapData, PerCpuArray};
    use aya::programs::{Xdp, XdpFlags};
    use std::net::Ipv4Addr;

    pub const REFLECTED: usize = 0;
    pub const RECEIVED: usize = 1;
    pub const LATE: usize = 3;
    pub const GSO: usize = 4;
    pub const HIST_US: usize = 1024;
    pub const HIST: usize = 1024 + 2048;

    pub struct Ends {
        _ebpf: aya::Ebpf,
        counters: PerCpuArray<MapData, u64>,
        hist: PerCpuArray<MapData, u64>,
    }

    #[cfg(kyuu_bench_bpf)]
    fn object() -> anyhow::Result<&'static [u8]> {
        Ok(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/bench_peer.o"
        )))
    }

    #[cfg(not(kyuu_bench_bpf))]
    fn object() -> anyhow::Result<&'static [u8]> {
        anyhow::bail!(
            "built without the XDP bench ends: {}",
            option_env!("KYUU_BENCH_BPF_UNAVAILABLE").unwrap_or("no clang")
        )
    }

    fn be(ip: Ipv4Addr) -> u32 {
        u32::from_ne_bytes(ip.octets())
    }

    impl Ends {
        /// Loads `program` (`bench_world` or `bench_mirror`) and attaches it in generic mode
        /// (native with `native`) to `interface` of the calling thread's namespace; dropping
        /// detaches it.
        #[allow(clippy::too_many_arguments)]
        pub fn attach(
            program: &str,
            interface: &str,
            client: Ipv4Addr,
            peer: Ipv4Addr,
            server: Ipv4Addr,
            peer_seg: u32,
            binding: bool,
            native: bool,
        ) -> anyhow::Result<Ends> {
            let (c, p, s) = (be(client), be(peer), be(server));
            let binding = u32::from(binding);
            let mut ebpf = aya::EbpfLoader::new()
                .set_global("CLIENT_IP", &c, true)
                .set_global("PEER_IP", &p, true)
                .set_global("SERVER_IP", &s, true)
                .set_global("PEER_SEG", &peer_seg, true)
                .set_global("BINDING", &binding, true)
                .load(object()?)?;
            let prog: &mut Xdp = ebpf
                .program_mut(program)
                .ok_or_else(|| anyhow::anyhow!("no program {program}"))?
                .try_into()?;
            prog.load()?;
            let flags = if native {
                XdpFlags::DRV_MODE
            } else {
                XdpFlags::SKB_MODE
            };
            prog.attach(interface, flags)?;
            let take = |ebpf: &mut aya::Ebpf, name: &str| {
                ebpf.take_map(name)
                    .ok_or_else(|| anyhow::anyhow!("no map {name}"))
            };
            let counters = PerCpuArray::try_from(take(&mut ebpf, "BENCH_COUNTERS")?)?;
            let hist = PerCpuArray::try_from(take(&mut ebpf, "BENCH_HIST")?)?;
            Ok(Ends {
                _ebpf: ebpf,
                counters,
                hist,
            })
        }

        fn sum(map: &PerCpuArray<MapData, u64>, i: u32) -> u64 {
            map.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0)
        }

        pub fn counters(&self) -> [u64; 5] {
            let mut out = [0; 5];
            for (i, o) in out.iter_mut().enumerate() {
                *o = Self::sum(&self.counters, i as u32);
            }
            out
        }

        pub fn hist(&self) -> Vec<u64> {
            (0..HIST as u32).map(|i| Self::sum(&self.hist, i)).collect()
        }
    }

    /// The round trip time (µs) a histogram bucket stands for (its middle).
    pub fn bucket_us(i: usize) -> f64 {
        if i < HIST_US {
            i as f64 + 0.5
        } else {
            ((i - HIST_US) as f64 + 0.5) * 1000.0
        }
    }
}

/// CPU jiffies over all CPUs from /proc/stat: (busy, softirq, total).
fn machine_cpu() -> (u64, u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, v.get(6).copied().unwrap_or(0), total)
}

/// Jiffies per second in /proc/stat (USER_HZ).
const USER_HZ: f64 = 100.0;

/// CPU nanoseconds the `ksoftirqd` threads ran (softirq work the kernel deferred to a thread,
/// which waits for the scheduler like any other).
fn ksoftirqd_ns() -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read_to_string(e.path().join("comm"))
                .map(|c| c.starts_with("ksoftirqd/"))
                .unwrap_or(false)
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU nanoseconds the calling thread ran, softirq work done in its context included (this
/// kernel has no IRQ time accounting, so softirq processing that runs at the end of the thread's
/// `sendmmsg` is charged to the thread).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// Sends ChannelData with `payload` bytes (a CLOCK_MONOTONIC stamp first) round robin over
/// `socks`, `batch` datagrams per `sendmmsg`, at `rate` datagrams/s (0: as fast as it can) for
/// `dur`.
fn generate<S: AsFd>(
    socks: &[S],
    payload: usize,
    rate: u64,
    batch: usize,
    dur: Duration,
) -> Generated {
    let batch = batch.clamp(1, 64);
    let payload = payload.max(8);
    let mut pkts: Vec<Vec<u8>> = (0..batch)
        .map(|_| {
            let mut p = vec![0u8; 4 + payload];
            p[..2].copy_from_slice(&proto::CHANNEL.to_be_bytes());
            p[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
            p
        })
        .collect();
    send_loop(socks, &mut pkts, 4, rate, dur)
}

/// Sends the `pkts` batch round robin over `socks`, one `sendmmsg` per batch, at `rate`
/// datagrams/s (0: as fast as it can) for `dur`, each batch stamped with CLOCK_MONOTONIC at
/// bytes `stamp_at..stamp_at + 8` just before it leaves.
fn send_loop<S: AsFd, P: AsMut<[u8]> + AsRef<[u8]>>(
    socks: &[S],
    pkts: &mut [P],
    stamp_at: usize,
    rate: u64,
    dur: Duration,
) -> Generated {
    let batch = pkts.len().max(1);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut next = 0usize;
    let mut delayed = 0u64;
    let mut max_delay_ns = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= dur || socks.is_empty() {
            break;
        }
        if rate > 0 {
            let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
            if due < sent + batch as u64 {
                let wait = (sent + batch as u64) as f64 / rate as f64 - elapsed.as_secs_f64();
                std::thread::sleep(Duration::from_secs_f64(wait.clamp(0.0, 0.002)));
                continue;
            }
        }
        let stamp = monotonic_ns().to_le_bytes();
        for p in pkts.iter_mut() {
            if let Some(at) = p.as_mut().get_mut(stamp_at..stamp_at + 8) {
                at.copy_from_slice(&stamp);
            }
        }
        let iovs: Vec<[IoSlice<'_>; 1]> = pkts.iter().map(|p| [IoSlice::new(p.as_ref())]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..batch).map(|_| SendAncillaryBuffer::default()).collect();
        let mut msgs: Vec<MMsgHdr<'_>> = iovs
            .iter()
            .zip(controls.iter_mut())
            .map(|(iov, c)| MMsgHdr::new(iov, c))
            .collect();
        let sock = &socks[next % socks.len()];
        next = next.wrapping_add(1);
        let result = sendmmsg(sock, &mut msgs, SendFlags::DONTWAIT);
        // Time from the stamp to the end of the call: the generator's own share of the round
        // trip (preemption of this thread included; the relay's softirq work for these datagrams
        // may run inside the call too).
        let took = monotonic_ns().saturating_sub(u64::from_le_bytes(stamp));
        if took > 1_000_000 {
            delayed += batch as u64;
        }
        max_delay_ns = max_delay_ns.max(took);
        if let Ok(n) = result {
            sent += n as u64;
        } else if rate > 0 {
            // Counted as offered all the same: the pacing does not try to catch up.
            sent += batch as u64;
        }
    }
    Generated {
        sent,
        delayed,
        max_delay_ns,
    }
}

/// What [`generate`] did.
struct Generated {
    /// Datagrams the kernel took.
    sent: u64,
    /// Datagrams whose `sendmmsg` returned more than 1 ms after their stamp.
    delayed: u64,
    max_delay_ns: u64,
}

struct World {
    _lab: Lab,
    server: Node,
    world: Node,
    server_if: String,
    world_if: String,
}

fn build() -> anyhow::Result<World> {
    let lab = Lab::new()?;
    let server = lab.host("srv")?;
    let world = lab.host("world")?;
    let (si, wi) = lab.connect(
        &server,
        &format!("{SERVER}/16"),
        &world,
        &format!("{CLIENT}/16"),
        None,
    )?;
    world.add_addr(&wi, &format!("{PEER}/16"))?;
    // veth would carry a UDP GSO packet (kyuu's userspace path sends with UDP_SEGMENT) whole to
    // the other namespace; a NIC puts separate datagrams on the wire. Without the feature on the
    // server's end the stack segments such packets before the veth, as for a NIC without UDP
    // segmentation offload, so every relay puts the same packets on the link.
    let mut cmd = server.command("ethtool");
    cmd.args(["-K", &si.name, "tx-udp-segmentation", "off"]);
    let out = server.run(cmd, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!("ethtool: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(World {
        _lab: lab,
        server,
        world,
        server_if: si.name,
        world_if: wi.name,
    })
}

fn start(w: &World, args: &Args, target: &str, dir: &std::path::Path) -> anyhow::Result<LabChild> {
    let mut cmd = match target {
        "coturn" => {
            let mut c = w.server.command(&args.coturn_bin);
            c.args([
                "-n",
                &format!("--listening-ip={SERVER}"),
                &format!("--listening-port={PORT}"),
                &format!("--relay-ip={SERVER}"),
                "--min-port=10000",
                "--max-port=20000",
                "--lt-cred-mech",
                "--realm=kyuu-bench",
                "--user=bench:bench-pass",
                "--no-tls",
                "--no-dtls",
                "--no-tcp",
                "--no-tcp-relay",
                "--no-cli",
                "--no-rfc5780",
                &format!("--relay-threads={}", args.threads),
                "--total-quota=1000000",
                "--user-quota=1000000",
                &format!("--pidfile={}", dir.join("turnserver.pid").display()),
                &format!("--userdb={}", dir.join("turndb").display()),
                "--no-stdout-log",
                &format!("--log-file={}", dir.join("coturn.log").display()),
            ]);
            c
        }
        _ => {
            let fast = if target == "kyuu-fastpath" {
                "required"
            } else {
                "off"
            };
            let conf = dir.join(format!("{target}.toml"));
            std::fs::write(
                &conf,
                format!(
                    "[listen]\nudp = [\"{SERVER}:{PORT}\"]\ntcp = []\ntls = []\nthreads = {}\n\n\
                     [http]\nenabled = false\n\n\
                     [turn]\nrealm = \"kyuu-bench\"\nrelay_ports = {{ min = 21500, max = 32767 }}\n\
                     allow_peers = [\"198.18.2.0/24\"]\nunauth_rate = 0\nuser_quota = 0\n\
                     client_quota = 0\ntotal_quota = 0\nmax_bps = 0\nfast_path = \"{fast}\"\n\
                     fast_path_xdp = \"{xdp}\"\n\n\
                     [[turn.users]]\nname = \"bench\"\npassword = \"bench-pass\"\n\n\
                     [log]\nlevel = \"warn\"\n",
                    args.threads,
                    xdp = if args.native() { "native" } else { "generic" },
                ),
            )?;
            let mut c = w.server.command(&args.kyuu_bin);
            c.arg("serve").arg("--config").arg(&conf);
            c
        }
    };
    let log = std::fs::File::create(dir.join("stderr.log"))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
    Ok(w.server.spawn(cmd)?)
}

/// One measured phase.
#[derive(Debug, Default, Clone)]
struct Phase {
    secs: f64,
    sent: u64,
    /// Datagrams more than 1 ms between stamp and the return of their `sendmmsg`, and the
    /// longest such time.
    gen_delayed: u64,
    gen_max_delay_ms: f64,
    received: u64,
    /// Busy and softirq CPU seconds over all CPUs (/proc/stat; other work on the machine too).
    busy_s: f64,
    softirq_s: f64,
    /// CPU seconds of the generator thread, the server process and the ksoftirqd threads.
    gen_s: f64,
    server_s: f64,
    ksoftirqd_s: f64,
    late: u64,
    /// Packets that carried more than one datagram (UDP GSO).
    gso: u64,
    /// Datagrams the XDP echo peer reflected.
    reflected: u64,
    hist: Vec<u64>,
}

impl Phase {
    fn pct(&self, q: f64) -> f64 {
        let total: u64 = self.hist.iter().sum();
        if total == 0 {
            return f64::NAN;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut acc = 0;
        for (i, c) in self.hist.iter().enumerate() {
            acc += c;
            if acc >= want {
                return ends::bucket_us(i);
            }
        }
        f64::NAN
    }

    /// Round trips over 1 ms.
    fn over_1ms(&self) -> u64 {
        self.hist.iter().skip(ends::HIST_US).sum()
    }

    fn max(&self) -> f64 {
        self.hist
            .iter()
            .rposition(|c| *c > 0)
            .map_or(f64::NAN, ends::bucket_us)
    }

    /// CPU µs per delivered round trip of the tasks that move the packets: the generator thread
    /// (with the softirq work run in its context), the server process (likewise) and ksoftirqd.
    fn cpu_us_per_rt(&self) -> f64 {
        (self.gen_s + self.server_s + self.ksoftirqd_s) * 1e6 / (self.received.max(1) as f64)
    }
}

fn phase<S: AsFd>(
    e: &ends::Ends,
    socks: &[S],
    args: &Args,
    rate: u64,
    hog: usize,
    server: Option<u32>,
) -> anyhow::Result<Phase> {
    let server_ns = || server.map_or(0, servers::cpu_ns);
    let c0 = e.counters();
    let h0 = e.hist();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hogs: Vec<_> = (0..hog)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
                }
            })
        })
        .collect();
    let m0 = machine_cpu();
    let k0 = ksoftirqd_ns();
    let g0 = thread_cpu_ns();
    let s0 = server_ns();
    let t0 = Instant::now();
    let g = if args.workload == "binding" {
        binding::generate(socks, rate, args.batch, Duration::from_secs(args.duration))
    } else {
        generate(
            socks,
            args.payload,
            rate,
            args.batch,
            Duration::from_secs(args.duration),
        )
    };
    let secs = t0.elapsed().as_secs_f64();
    let m1 = machine_cpu();
    let k1 = ksoftirqd_ns();
    let g1 = thread_cpu_ns();
    let s1 = server_ns();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for h in hogs {
        let _ = h.join();
    }
    // Let the round trips in flight come back.
    std::thread::sleep(Duration::from_millis(500));
    let c1 = e.counters();
    let h1 = e.hist();
    Ok(Phase {
        secs,
        sent: g.sent,
        gen_delayed: g.delayed,
        gen_max_delay_ms: g.max_delay_ns as f64 / 1e6,
        received: c1[ends::RECEIVED] - c0[ends::RECEIVED],
        busy_s: (m1.0 - m0.0) as f64 / USER_HZ,
        softirq_s: (m1.1 - m0.1) as f64 / USER_HZ,
        ksoftirqd_s: (k1 - k0) as f64 / 1e9,
        gen_s: (g1 - g0) as f64 / 1e9,
        server_s: (s1 - s0) as f64 / 1e9,
        late: c1[ends::LATE] - c0[ends::LATE],
        gso: c1[ends::GSO] - c0[ends::GSO],
        reflected: c1[ends::REFLECTED] - c0[ends::REFLECTED],
        hist: h1.iter().zip(h0.iter()).map(|(a, b)| a - b).collect(),
    })
}

struct Row {
    target: String,
    fixed: Phase,
    max: Phase,
    note: String,
}

/// A target in place: its server process (kept until dropped) or, for `null`, the mirror on the
/// server's veth; its scratch directory is `kyuu-fastpath-bench-{workload}-{pid}-{target}`.
struct Target {
    server: Option<LabChild>,
    _mirror: Option<ends::Ends>,
    dir: PathBuf,
}

impl Target {
    fn start(w: &World, args: &Args, target: &str, workload: &str) -> anyhow::Result<Target> {
        let dir = std::env::temp_dir().join(format!(
            "kyuu-fastpath-bench-{workload}-{}-{target}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir)?;
        if target == "null" {
            let iface = w.server_if.clone();
            let native = args.native();
            let m = w.server.in_ns(move || {
                ends::Ends::attach(
                    "bench_mirror",
                    &iface,
                    CLIENT,
                    PEER,
                    SERVER,
                    0,
                    false,
                    native,
                )
            })??;
            return Ok(Target {
                server: None,
                _mirror: Some(m),
                dir,
            });
        }
        Ok(Target {
            server: Some(start(w, args, target, &dir)?),
            _mirror: None,
            dir,
        })
    }

    fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(|s| s.pid())
    }
}

fn run_target(w: &World, args: &Args, target: &str, e: &ends::Ends) -> anyhow::Result<Row> {
    let server_addr = SocketAddr::from((SERVER, PORT));
    let peer_addr = SocketAddr::from((PEER, PEER_PORT));
    // The target: a relay process, or the mirror in its place.
    let t = Target::start(w, args, target, "relay")?;
    let (dir, pid) = (t.dir.clone(), t.pid());
    let creds = Credentials {
        username: "bench".into(),
        password: "bench-pass".into(),
    };
    let n = args.allocations;
    let out = w.world.in_ns(|| -> anyhow::Result<(Phase, Phase, u64)> {
        let source = IpAddr::V4(CLIENT);
        let mut fleet = if target == "null" {
            Fleet::open_from(n, Via::Direct, server_addr, &creds, source)?
        } else {
            // The server may take a moment to listen: retry the setup a few times.
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let mut fleet =
                    Fleet::open_from(n, Via::Turn(server_addr), peer_addr, &creds, source)?;
                let rep = fleet.setup(
                    Plan {
                        permission: true,
                        channel: true,
                    },
                    64,
                    Duration::from_secs(60),
                )?;
                if rep.ok == n {
                    break fleet;
                }
                if Instant::now() > deadline {
                    let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                    let tail: String = log.lines().rev().take(3).collect::<Vec<_>>().join(" / ");
                    bail!(
                        "only {} of {n} allocations: {:?}; server stderr: {tail}",
                        rep.ok,
                        rep.first_error
                    );
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        };
        // One datagram per allocation, twice: the fast path learns the next hops from the first
        // (userspace relays it), the second shows whether every allocation relays.
        let socks = fleet.sockets();
        let warm = || -> u64 {
            let c0 = e.counters()[ends::RECEIVED];
            let payload = args.payload.max(8);
            let mut pkt = vec![0u8; 4 + payload];
            pkt[..2].copy_from_slice(&proto::CHANNEL.to_be_bytes());
            pkt[2..4].copy_from_slice(&(payload as u16).to_be_bytes());
            for (i, s) in socks.iter().enumerate() {
                pkt[4..12].copy_from_slice(&monotonic_ns().to_le_bytes());
                let _ = rustix::net::send(s, &pkt, SendFlags::DONTWAIT);
                // Pace so no queue overflows on the way.
                if i % 128 == 127 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            std::thread::sleep(Duration::from_millis(600));
            e.counters()[ends::RECEIVED] - c0
        };
        let _ = warm();
        let relaying = warm();
        let fixed = phase(e, socks, args, args.rate, args.hog, pid)?;
        std::thread::sleep(Duration::from_millis(500));
        let max = phase(e, socks, args, 0, 0, pid)?;
        if target != "null" {
            let _ = fleet.deallocate(64, Duration::from_secs(30));
        }
        Ok((fixed, max, relaying))
    })??;
    drop(t);
    let (fixed, max, relaying) = out;
    Ok(Row {
        target: target.into(),
        note: format!(
            "{relaying}/{n} relaying; unpaced phase: {} sent, {} echoed, {} back; fixed phase: {} sent, {} echoed, {:.1}% back, {} late stamps, {} GSO packets; {} RTTs > 1 ms, {} datagrams > 1 ms from stamp to send return (max {:.1} ms); CPU s: generator {:.2}, server {:.2}, ksoftirqd {:.2}; machine busy {:.0}% (softirq {:.1}%)",
            max.sent,
            max.reflected,
            max.received,
            fixed.sent,
            fixed.reflected,
            100.0 * fixed.received as f64 / fixed.sent.max(1) as f64,
            fixed.late,
            fixed.gso,
            fixed.over_1ms(),
            fixed.gen_delayed,
            fixed.gen_max_delay_ms,
            fixed.gen_s,
            fixed.server_s,
            fixed.ksoftirqd_s,
            100.0 * fixed.busy_s / (fixed.secs.max(1e-9) * cpus() as f64),
            100.0 * fixed.softirq_s / (fixed.secs.max(1e-9) * cpus() as f64),
        ),
        fixed,
        max,
    })
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "MET"
    } else {
        "NOT MET"
    }
}

/// One configuration (allocations, payload): every target, its table and its goal lines.
struct Config {
    allocations: usize,
    payload: usize,
    rows: Vec<Row>,
}

impl Config {
    fn find(&self, t: &str) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.target == t && r.fixed.received > 0)
    }

    fn null_us(&self) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.target == "null")
            .map(|r| r.fixed.cpu_us_per_rt())
    }

    /// Relay CPU µs per round trip: the target's minus the harness's (`null`).
    fn relay_us(&self, r: &Row) -> f64 {
        match (r.target.as_str(), self.null_us()) {
            ("null", _) => 0.0,
            (_, Some(n)) => r.fixed.cpu_us_per_rt() - n,
            (_, None) => f64::NAN,
        }
    }

    /// (pkt/s ratio, relay CPU ratio, p99 ratio) of `target` against coturn.
    fn vs_coturn(&self, target: &str) -> Option<(f64, f64, f64)> {
        let (t, ct) = (self.find(target)?, self.find("coturn")?);
        Some((
            pps(t) / pps(ct),
            self.relay_us(t) / self.relay_us(ct),
            t.fixed.pct(0.99) / ct.fixed.pct(0.99),
        ))
    }
}

fn pps(r: &Row) -> f64 {
    r.max.received as f64 / r.max.secs.max(1e-9)
}

/// What a workload measures one target with (the world end attached).
type RunTarget = fn(&World, &Args, &str, &ends::Ends) -> anyhow::Result<Row>;

/// Attaches `bench_world` to the world end (`seg`: the peer's segment size; `binding`: counting
/// Binding answers instead of ChannelData) and runs each of `args.targets` in turn with `run`
/// (`what` in the progress line); a target that fails gets a row with its error in the note.
/// Returns the rows and the load average before and after.
fn run_targets(
    w: &World,
    args: &Args,
    seg: u32,
    binding: bool,
    what: &str,
    run: RunTarget,
) -> anyhow::Result<(Vec<Row>, String, String)> {
    let world_if = w.world_if.clone();
    let native = args.native();
    let e = w
        .world
        .in_ns(move || {
            ends::Ends::attach(
                "bench_world",
                &world_if,
                CLIENT,
                PEER,
                SERVER,
                seg,
                binding,
                native,
            )
        })?
        .context(if binding {
            "attaching the XDP Binding answer receiver"
        } else {
            "attaching the XDP echo peer and receiver"
        })?;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut rows = Vec::new();
    for target in args.targets.split(',') {
        eprintln!("running {target} ({what}) ...");
        match run(w, args, target, &e) {
            Ok(r) => rows.push(r),
            Err(err) => rows.push(Row {
                target: target.into(),
                fixed: Phase::default(),
                max: Phase::default(),
                note: format!("n/a: {err:#}"),
            }),
        }
    }
    drop(e);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    Ok((rows, load, load_after))
}

fn run_config(w: &World, args: &Args) -> anyhow::Result<Config> {
    let what = format!("{} allocations, {} B", args.allocations, args.payload);
    let seg = args.payload.max(8) as u32;
    let (rows, load, load_after) = run_targets(w, args, seg, false, &what, run_target)?;
    let c = Config {
        allocations: args.allocations,
        payload: args.payload,
        rows,
    };
    println!(
        "\n{} allocations, {} B payload, {} s per phase, sendmmsg batch {}, {} CPUs; fixed phase at {} round trips/s offered{}",
        args.allocations,
        args.payload,
        args.duration,
        args.batch,
        cpus(),
        args.rate,
        if args.hog > 0 {
            format!(", {} busy-loop threads running", args.hog)
        } else {
            String::new()
        }
    );
    println!("load average before: {}after: {}", load, load_after);
    println!("CPU method (fixed-rate phase): CPU time (schedstat) of the generator thread + the server process + the ksoftirqd threads, per delivered round trip. This kernel has no IRQ time accounting, so softirq work (the XDP fast path, veth delivery, the stack) is charged to the task in whose context it runs: the sender's. Relay CPU = that minus the null run's (harness: generator, veth, XDP echo and receiver), so it holds the server's process and kernel work, both directions. Other load on the machine is not in it (machine busy is in the note).\n");
    println!("| target | max round trips/s (unpaced) | CPU µs/rt at fixed rate (generator+server+ksoftirqd) | relay CPU µs/rt (minus null) | RTT p50 µs | RTT p99 µs | RTT max µs | note |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in &c.rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {} |",
            r.target,
            pps(r),
            r.fixed.cpu_us_per_rt(),
            c.relay_us(r),
            r.fixed.pct(0.5),
            r.fixed.pct(0.99),
            r.fixed.max(),
            r.note
        );
    }
    if let Some((ratio, cpu, p99)) = c.vs_coturn("kyuu-fastpath") {
        println!();
        println!(
            "pkt/s: fast path {ratio:.2}x coturn (goal >= 3x): {}",
            verdict(ratio >= 3.0)
        );
        println!(
            "relay CPU per packet: fast path {cpu:.2}x coturn (goal <= 0.33x): {}",
            verdict(cpu <= 1.0 / 3.0)
        );
        println!(
            "RTT p99: fast path {p99:.2}x coturn (goal <= 1x): {}",
            verdict(p99 <= 1.0)
        );
    }
    if let Some((ratio, cpu, p99)) = c.vs_coturn("kyuu-off") {
        println!(
            "fast path off: pkt/s {ratio:.2}x coturn, relay CPU {cpu:.2}x coturn, p99 {p99:.2}x coturn"
        );
    }
    Ok(c)
}

/// Issue 11's first goal over the whole matrix: at least 1.5x coturn's relayed packets/s and at
/// most 0.6x its relay CPU per packet, with 1, 100, 1,000 and 10,000 allocations, at 100 B and
/// 1200 B; marked for kyuu with the fast path and for kyuu in userspace only.
fn print_sweep(configs: &[Config]) {
    println!("\n## Issue 11 goal 1: relayed packets/s >= 1.5x coturn's and relay CPU per packet <= 0.6x coturn's\n");
    println!("| allocations | payload | fast path pkt/s vs coturn | fast path relay CPU vs coturn | kyuu userspace pkt/s vs coturn | kyuu userspace relay CPU vs coturn |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    let cell = |v: Option<f64>, ok: fn(f64) -> bool| match v {
        Some(x) if x.is_finite() => format!("{x:.2}x {}", verdict(ok(x))),
        _ => "n/a".to_owned(),
    };
    let pps_ok: fn(f64) -> bool = |x| x >= 1.5;
    let cpu_ok: fn(f64) -> bool = |x| x <= 0.6;
    let mut all = [true, true];
    for c in configs {
        let fp = c.vs_coturn("kyuu-fastpath");
        let off = c.vs_coturn("kyuu-off");
        for (i, v) in [fp, off].iter().enumerate() {
            all[i] &= v.is_some_and(|(p, cpu, _)| pps_ok(p) && cpu_ok(cpu));
        }
        println!(
            "| {} | {} B | {} | {} | {} | {} |",
            c.allocations,
            c.payload,
            cell(fp.map(|v| v.0), pps_ok),
            cell(fp.map(|v| v.1), cpu_ok),
            cell(off.map(|v| v.0), pps_ok),
            cell(off.map(|v| v.1), cpu_ok),
        );
    }
    println!();
    println!(
        "goal 1 with the kernel fast path (turn.fast_path = \"auto\"), every case: {}",
        verdict(all[0])
    );
    println!(
        "goal 1 in userspace only (turn.fast_path = \"off\"), every case: {}",
        verdict(all[1])
    );
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    match args.xdp.as_str() {
        "generic" => {}
        "native" => {
            if let Some(t) = args
                .targets
                .split(',')
                .find(|t| !matches!(*t, "null" | "kyuu-fastpath"))
            {
                bail!("--xdp native: target {t} cannot run (only null and kyuu-fastpath: a native XDP_TX on a veth leaves only towards an end with an XDP program)");
            }
        }
        other => bail!("--xdp {other}: give generic or native"),
    }
    let _ = rlimit::increase_nofile_limit(65_536);
    let w = build().context("building the lab (root, ip)")?;
    if args.workload == "binding" {
        return binding::run(&w, &args);
    }
    if !args.sweep {
        run_config(&w, &args)?;
        return Ok(());
    }
    let mut configs = Vec::new();
    for payload in [100, 1200] {
        for allocations in [1, 100, 1000, 10_000] {
            let a = Args {
                allocations,
                payload,
                ..args.clone()
            };
            configs.push(run_config(&w, &a)?);
        }
    }
    print_sweep(&configs);
    Ok(())
}

/// The `binding` workload (issue 11's goal 3): STUN Binding requests without attributes (the
/// common WebRTC case) from the world namespace's client address to the server's listener, the
/// send time in the transaction id's first 8 bytes; `bench_world` (with `BINDING` set) counts and
/// drops the Binding success responses and takes their round trip time. Same topology, phases
/// and CPU method as the relay workload: requests/s unpaced, CPU per request at the fixed rate
/// (generator + server process + ksoftirqd, minus the `null` run, where `bench_mirror` reflects
/// each request).
mod binding {
    use super::*;

    /// Sends Binding requests round robin over `socks`, `batch` per `sendmmsg`, at `rate`
    /// requests/s (0: as fast as it can) for `dur`.
    pub fn generate<S: AsFd>(socks: &[S], rate: u64, batch: usize, dur: Duration) -> Generated {
        let batch = batch.clamp(1, 64);
        let mut pkts: Vec<[u8; 20]> = (0..batch)
            .map(|i| {
                let mut p = [0u8; 20];
                p[1] = 0x01;
                p[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
                p[16..20].copy_from_slice(&(i as u32).to_be_bytes());
                p
            })
            .collect();
        send_loop(socks, &mut pkts, 8, rate, dur)
    }

    fn run_target(w: &World, args: &Args, target: &str, e: &ends::Ends) -> anyhow::Result<Row> {
        let server_addr = SocketAddr::from((SERVER, PORT));
        let t = Target::start(w, args, target, "binding")?;
        let pid = t.pid();
        let n = args.allocations.clamp(1, 1024);
        let (fixed, max) = w.world.in_ns(|| -> anyhow::Result<(Phase, Phase)> {
            let mut socks = Vec::with_capacity(n);
            for _ in 0..n {
                let s = std::net::UdpSocket::bind(SocketAddr::from((CLIENT, 0)))?;
                s.connect(server_addr)?;
                socks.push(s);
            }
            // Wait until the server answers (it may take a moment to listen).
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let c0 = e.counters()[ends::RECEIVED];
                for s in &socks {
                    let mut p = [0u8; 20];
                    p[1] = 1;
                    p[4..8].copy_from_slice(&[0x21, 0x12, 0xa4, 0x42]);
                    p[8..16].copy_from_slice(&monotonic_ns().to_le_bytes());
                    let _ = s.send(&p);
                }
                std::thread::sleep(Duration::from_millis(500));
                let got = e.counters()[ends::RECEIVED] - c0;
                if got as usize >= n * 9 / 10 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the server answered {got} of {n} Binding requests");
                }
            }
            let fixed = phase(e, &socks, args, args.rate, args.hog, pid)?;
            std::thread::sleep(Duration::from_millis(500));
            let max = phase(e, &socks, args, 0, 0, pid)?;
            Ok((fixed, max))
        })??;
        drop(t);
        Ok(Row {
            target: target.into(),
            note: format!(
                "{n} client ports; unpaced: {} sent, {} answered; fixed: {} sent, {:.1}% answered, {} late stamps; {} RTTs > 1 ms; CPU s: generator {:.2}, server {:.2}, ksoftirqd {:.2}; machine busy {:.0}%",
                max.sent,
                max.received,
                fixed.sent,
                100.0 * fixed.received as f64 / fixed.sent.max(1) as f64,
                fixed.late,
                fixed.over_1ms(),
                fixed.gen_s,
                fixed.server_s,
                fixed.ksoftirqd_s,
                100.0 * fixed.busy_s / (fixed.secs.max(1e-9) * cpus() as f64),
            ),
            fixed,
            max,
        })
    }

    pub fn run(w: &World, args: &Args) -> anyhow::Result<()> {
        let (rows, load, load_after) = run_targets(w, args, 0, true, "binding", run_target)?;
        let c = Config {
            allocations: 0,
            payload: 20,
            rows,
        };
        println!(
            "\nSTUN Binding (20-byte requests, no attributes), {} s per phase, sendmmsg batch {}, {} CPUs; fixed phase at {} requests/s offered",
            args.duration,
            args.batch,
            cpus(),
            args.rate
        );
        println!("load average before: {}after: {}", load, load_after);
        println!("CPU method: as the relay workload (generator thread + server process + ksoftirqd per answered request at the fixed rate; server CPU = that minus the null run's).\n");
        println!("| target | max requests/s (unpaced) | CPU µs/req at fixed rate (generator+server+ksoftirqd) | server CPU µs/req (minus null) | RTT p50 µs | RTT p99 µs | note |");
        println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
        for r in &c.rows {
            println!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {} |",
                r.target,
                pps(r),
                r.fixed.cpu_us_per_rt(),
                c.relay_us(r),
                r.fixed.pct(0.5),
                r.fixed.pct(0.99),
                r.note
            );
        }
        println!("\n## Issue 11 goal 3: Binding requests/s >= 2x coturn's, server CPU per request <= 0.5x coturn's\n");
        for (target, name) in [
            ("kyuu-fastpath", "kyuu fast path (XDP)"),
            ("kyuu-off", "kyuu userspace"),
        ] {
            match c.vs_coturn(target) {
                Some((ratio, cpu, _)) => {
                    println!(
                        "{name}: requests/s {ratio:.2}x coturn (goal >= 2x): {}",
                        verdict(ratio >= 2.0)
                    );
                    println!(
                        "{name}: CPU per request {cpu:.2}x coturn (goal <= 0.5x): {}",
                        verdict(cpu <= 0.5)
                    );
                }
                None => println!("{name}: n/a (no {target} or coturn figures)"),
            }
        }
        Ok(())
    }
}
