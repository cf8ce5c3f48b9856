//! `kyuu-fastpath-bench`: the kernel fast path (XDP) against userspace relaying and coturn, with
//! traffic crossing veth links in the network lab (so the XDP program sees it; loopback would
//! not be the real path).
//!
//! Topology (kyuu-lab, 198.18.0.0/15): client host 198.18.1.10 and echo peer 198.18.2.10 behind
//! a plain router, server 198.18.0.10 on the router's WAN switch. For each target (kyuu with
//! `turn.fast_path = "off"`, kyuu with `"required"`, coturn) a fresh server is started in the
//! server namespace; `--allocations` allocations (each with a permission and a channel to the
//! echo peer) are opened from the client namespace; one packet goes through every allocation
//! (the fast path learns next hops from it); then the closed-loop throughput of kyuu-turn-bench
//! (`--window` packets in flight, 100-byte payloads) and an open-loop latency run.
//!
//! Figures: relayed round trips per second; server process CPU per round trip (schedstat of the
//! server's threads — kernel work done in softirq on behalf of the fast path is *not* in it);
//! whole-machine CPU per round trip (/proc/stat busy time over all CPUs, generator, echo and
//! router included) which is the fair figure for the fast path; RTT p50/p99.
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

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use kyuu_lab::{Lab, LabChild, NatKind, Node};
use load::{Fleet, LatencyReport, Via};
use proto::{Credentials, Plan};

const SERVER: &str = "198.18.0.10";
const CLIENT: &str = "198.18.1.10";
const PEER: &str = "198.18.2.10";
const PORT: u16 = 3478;

#[derive(Parser, Debug)]
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
    /// Packets in flight over all allocations.
    #[arg(long, default_value_t = 2000)]
    window: usize,
    /// Seconds of throughput measurement per target.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Open-loop packets/s for the latency run.
    #[arg(long, default_value_t = 5000)]
    latency_rate: u64,
    /// Server worker threads (kyuu `listen.threads`, coturn `--relay-threads`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value = "kyuu-off,kyuu-fastpath,coturn")]
    targets: String,
}

struct World {
    _lab: Lab,
    server: Node,
    client: Node,
    peer: Node,
}

fn build() -> anyhow::Result<World> {
    let lab = Lab::new()?;
    let wan = lab.switch("wan")?;
    let lan1 = lab.switch("lan1")?;
    let lan2 = lab.switch("lan2")?;
    let rt = lab.router("rt", NatKind::None)?;
    rt.wan(&wan, "198.18.0.1/24")?;
    rt.lan(&lan1, "198.18.1.1/24")?;
    rt.lan(&lan2, "198.18.2.1/24")?;
    let server = lab.host("srv")?;
    server.attach(&wan, &format!("{SERVER}/24"))?;
    server.route_default("198.18.0.1")?;
    let client = lab.host("cli")?;
    client.attach(&lan1, &format!("{CLIENT}/24"))?;
    client.route_default("198.18.1.1")?;
    let peer = lab.host("peer")?;
    peer.attach(&lan2, &format!("{PEER}/24"))?;
    peer.route_default("198.18.2.1")?;
    Ok(World {
        _lab: lab,
        server,
        client,
        peer,
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
                     client_quota = 0\ntotal_quota = 0\nmax_bps = 0\nfast_path = \"{fast}\"\n\n\
                     [[turn.users]]\nname = \"bench\"\npassword = \"bench-pass\"\n\n\
                     [log]\nlevel = \"warn\"\n",
                    args.threads
                ),
            )?;
            let mut c = w.server.command(&args.kyuu_bin);
            c.arg("serve").arg("--config").arg(&conf);
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Ok(w.server.spawn(cmd)?)
}

/// Busy and total jiffies over all CPUs.
fn machine_cpu() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else {
        return (0, 0);
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

struct Row {
    target: String,
    pps: f64,
    server_us: f64,
    machine_us: f64,
    p50: f64,
    p99: f64,
    note: String,
}

fn run_target(w: &World, args: &Args, target: &str, echo: SocketAddr) -> anyhow::Result<Row> {
    let dir = std::env::temp_dir().join(format!(
        "kyuu-fastpath-bench-{}-{target}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    let server = start(w, args, target, &dir)?;
    let pid = server.pid();
    let creds = Credentials {
        username: "bench".into(),
        password: "bench-pass".into(),
    };
    let server_addr = SocketAddr::from(([198, 18, 0, 10], PORT));
    let n = args.allocations;
    let payload = args.payload;
    let window = args.window;
    let duration = Duration::from_secs(args.duration);
    let rate = args.latency_rate;
    let out = w.client.in_ns(
        move || -> anyhow::Result<(load::ThroughputReport, LatencyReport, f64, usize)> {
            let source: IpAddr = CLIENT.parse()?;
            // The server may take a moment to listen: retry the setup a few times.
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut fleet = loop {
                let mut fleet = Fleet::open_from(n, Via::Turn(server_addr), echo, &creds, source)?;
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
                    bail!("only {} of {n} allocations: {:?}", rep.ok, rep.first_error);
                }
                std::thread::sleep(Duration::from_millis(500));
            };
            // One packet through every allocation: both sides have sent once (next hops learned).
            let relaying = fleet.probe_all(3)?;
            let m0 = machine_cpu();
            let probe = move || (0u64, servers::cpu_ns(pid));
            let tr = fleet.throughput(payload, window, Duration::from_secs(1), duration, &probe)?;
            let m1 = machine_cpu();
            let lat = fleet.latency(
                payload,
                rate,
                Duration::from_millis(300),
                Duration::from_secs(3),
            )?;
            let lat = LatencyReport::from_run(n, rate, lat);
            let _ = fleet.deallocate(64, Duration::from_secs(30));
            // Jiffies (USER_HZ 100) of busy time over the measured window (+ warm-up share).
            let busy_s = (m1.0 - m0.0) as f64 / 100.0;
            let trips = tr.delivered_pps * (duration.as_secs_f64() + 1.0);
            let machine_us = busy_s * 1e6 / trips.max(1.0);
            Ok((tr, lat, machine_us, relaying))
        },
    )??;
    drop(server);
    let (tr, lat, machine_us, relaying) = out;
    Ok(Row {
        target: target.into(),
        pps: tr.delivered_pps,
        server_us: tr.server_cpu_us_per_pkt,
        machine_us,
        p50: lat.p50_us,
        p99: lat.p99_us,
        note: format!("{relaying}/{n} relaying, lost {}", tr.lost),
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _ = rlimit::increase_nofile_limit(65_536);
    let w = build().context("building the lab (root, ip)")?;
    let echo_addr = SocketAddr::from(([198, 18, 2, 10], 7000));
    let echo = w.peer.in_ns(move || echo::Echo::start_at(echo_addr))??;
    let mut rows = Vec::new();
    for target in args.targets.split(',') {
        eprintln!("running {target} ...");
        match run_target(&w, &args, target, echo.addr) {
            Ok(r) => rows.push(r),
            Err(e) => rows.push(Row {
                target: target.into(),
                pps: f64::NAN,
                server_us: f64::NAN,
                machine_us: f64::NAN,
                p50: f64::NAN,
                p99: f64::NAN,
                note: format!("n/a: {e:#}"),
            }),
        }
    }
    println!(
        "\n{} allocations, {} B payload, window {}, {} s; RTT at {} pkt/s\n",
        args.allocations, args.payload, args.window, args.duration, args.latency_rate
    );
    println!("| target | relayed round trips/s | server process CPU µs/round trip | machine CPU µs/round trip | RTT p50 µs | RTT p99 µs | note |");
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- |");
    for r in &rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {} |",
            r.target, r.pps, r.server_us, r.machine_us, r.p50, r.p99, r.note
        );
    }
    drop(echo);
    Ok(())
}
