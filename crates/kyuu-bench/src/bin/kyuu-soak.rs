//! `kyuu-soak`: a bounded soak of `kyuu serve` with TURN churn.
//!
//! Holds `--allocations` (10,000) allocations, each with a permission and a channel, and for
//! `--duration` (10 min) repeats a cycle: a fresh cohort of `--churn` allocations is opened;
//! one packet is relayed through every allocation (client -> kyuu -> echo peer -> kyuu ->
//! client, at a moderate, paced rate) and every echo is counted; the held allocations are
//! refreshed; the cohort is then released (Refresh 0) or, every other cycle, abandoned to
//! expire on the server (`turn.default_lifetime = --lifetime`). The server's resident memory
//! is sampled every cycle.
//!
//! At the end every held allocation is released, the abandoned ones are left to expire, and
//! the program checks, exiting non-zero otherwise: no relayed packet lost, resident memory flat
//! after warm-up (the first quarter of the run, at least one lifetime and two cycles) within
//! `--rss-tolerance-pct`, and every gauge in `/metrics` back to zero (allocations,
//! permissions, channels, open connections).
//!
//! A benchmark-style program, not a test: `cargo build --release -p kyuu -p kyuu-bench`, then
//! `target/release/kyuu-soak --duration 10m`.

// The load generator's modules, shared with kyuu-turn-bench.
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

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;

use load::{Fleet, Via};
use proto::{Credentials, Plan};
use servers::Common;

#[derive(Debug, Parser)]
#[command(about = "Soak kyuu serve: held TURN allocations plus churn, for a bounded time")]
struct Args {
    /// The kyuu binary (default target/release/kyuu, then $CARGO_TARGET_DIR/release/kyuu).
    #[arg(long)]
    kyuu_bin: Option<PathBuf>,
    /// How long to churn: 90s, 3m, 1h.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    duration: Duration,
    /// Allocations held for the whole run.
    #[arg(long, default_value_t = 10_000)]
    allocations: usize,
    /// Allocations opened and released (or abandoned) per cycle.
    #[arg(long, default_value_t = 1_000)]
    churn: usize,
    /// Length of one cycle.
    #[arg(long, default_value = "20s", value_parser = parse_duration)]
    cycle: Duration,
    /// turn.default_lifetime of the server: how long an abandoned allocation lives, seconds.
    #[arg(long, default_value_t = 60)]
    lifetime: u32,
    /// Server threads (listen.threads).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Allowed growth of resident memory after warm-up, percent.
    #[arg(long, default_value_t = 10.0)]
    rss_tolerance_pct: f64,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected e.g. 90s, 10m, 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: unit must be s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

fn default_kyuu_bin() -> PathBuf {
    let local = PathBuf::from("target/release/kyuu");
    if local.exists() {
        return local;
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let p = PathBuf::from(dir).join("release/kyuu");
        if p.exists() {
            return p;
        }
    }
    local
}

/// `GET /metrics` from the server.
fn metrics(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Every gauge sample: (name with labels, value).
fn gauges(text: &str) -> Vec<(String, f64)> {
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" gauge"))
        .collect();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            names.iter().any(|n| {
                l.strip_prefix(n)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
        })
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn gauge(text: &str, name: &str) -> f64 {
    gauges(text)
        .into_iter()
        .filter(|(k, _)| k == name || k.starts_with(&format!("{name}{{")))
        .map(|(_, v)| v)
        .sum()
}

struct Sample {
    at: Duration,
    rss_kib: u64,
    allocations: f64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let limit = rlimit::increase_nofile_limit(65_536).unwrap_or(0);
    let need = (a.allocations + 2 * a.churn + 1_000) as u64;
    if limit < need {
        bail!("RLIMIT_NOFILE is {limit}, need about {need}: run `ulimit -n 65536` first");
    }
    let bin = a.kyuu_bin.clone().unwrap_or_else(default_kyuu_bin);
    if !bin.exists() {
        bail!(
            "{} not found: cargo build --release -p kyuu (or --kyuu-bin)",
            bin.display()
        );
    }
    let dir = std::env::temp_dir().join(format!("kyuu-soak-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let echo = echo::Echo::start()?;
    let port = servers::free_port(&[])?;
    let http_port = servers::free_port(&[port])?;
    let relay = (10_000, 32_767);
    let busy = servers::range_busy(relay.0, relay.1);
    if busy > 100 {
        bail!("{busy} ports of the relay range {relay:?} are busy");
    }
    let common = Common {
        username: "soak".into(),
        password: "soak-pw".into(),
        realm: "kyuu.soak".into(),
        threads: a.threads,
        secret: None,
        relay_steering: "off".into(),
    };
    let mut config = servers::kyuu_config(port, relay, &common, "warn");
    config = config.replacen(
        "[turn]\n",
        &format!(
            "[turn]\ndefault_lifetime = {}\nmax_lifetime = {}\n",
            a.lifetime,
            proto::REFRESH_LIFETIME.max(a.lifetime)
        ),
        1,
    );
    config = config.replacen(
        "[http]\nenabled = false\n",
        &format!("[http]\nenabled = true\nlisten = \"127.0.0.1:{http_port}\"\nmetrics = true\n"),
        1,
    );
    let mut server = servers::start_kyuu_config(&bin.display().to_string(), &dir, port, &config)?;
    let http = SocketAddr::from(([127, 0, 0, 1], http_port));
    let creds = Credentials {
        username: common.username.clone(),
        password: common.password,
    };
    let plan = Plan {
        permission: true,
        channel: true,
    };
    let via = Via::Turn(server.addr);
    let t0 = Instant::now();
    println!(
        "kyuu-soak: {} held allocations, {} churned per {:?} cycle, lifetime {} s, for {:?}",
        a.allocations, a.churn, a.cycle, a.lifetime, a.duration
    );
    let rss0 = server.vm_rss_kib()?;

    // The held allocations, in fleets of 1,000 (each fleet from its own 127.1.x.y address).
    let mut held = Vec::new();
    let mut left = a.allocations;
    while left > 0 {
        let n = left.min(1_000);
        let mut f = Fleet::open(n, via, echo.addr, &creds)?;
        let rep = f.setup(plan, 64, Duration::from_secs(120))?;
        if rep.failed > 0 {
            bail!("setting up held allocations: {rep:?}");
        }
        held.push(f);
        left -= n;
    }
    println!(
        "  {} allocations held after {:.1} s, server RSS {} -> {} KiB",
        a.allocations,
        t0.elapsed().as_secs_f64(),
        rss0,
        server.vm_rss_kib()?
    );

    let (mut sent, mut echoed) = (0u64, 0u64);
    let (mut opened, mut released, mut abandoned) = (0usize, 0usize, 0usize);
    let mut refreshes = 0usize;
    let mut samples: Vec<Sample> = Vec::new();
    let mut cycle = 0usize;
    let churn_start = Instant::now();
    while churn_start.elapsed() < a.duration {
        let cycle_start = Instant::now();
        server.check_alive()?;
        let mut cohort = Fleet::open(a.churn, via, echo.addr, &creds)?;
        let rep = cohort.setup(plan, 64, Duration::from_secs(60))?;
        if rep.failed > 0 {
            bail!("cycle {cycle}: churn setup: {rep:?}");
        }
        opened += a.churn;
        for f in held.iter_mut().chain(std::iter::once(&mut cohort)) {
            let n = f.ready();
            let got = f.probe_all(1)?;
            sent += n as u64;
            echoed += got as u64;
        }
        for f in &mut held {
            let rep = f.refresh(64, Duration::from_secs(60))?;
            if rep.failed > 0 {
                bail!("cycle {cycle}: refresh: {rep:?}");
            }
            refreshes += rep.ok;
        }
        if cycle.is_multiple_of(2) {
            let rep = cohort.deallocate(64, Duration::from_secs(60))?;
            if rep.failed > 0 {
                bail!("cycle {cycle}: release: {rep:?}");
            }
            released += a.churn;
        } else {
            // Abandoned: the sockets close, the server expires the allocations.
            abandoned += a.churn;
        }
        drop(cohort);
        let m = metrics(http)?;
        let s = Sample {
            at: t0.elapsed(),
            rss_kib: server.vm_rss_kib()?,
            allocations: gauge(&m, "kyuu_turn_allocations"),
        };
        println!(
            "  cycle {cycle:>3} at {:>5.0} s: RSS {:>7} KiB, {:>6} allocations, relayed {echoed}/{sent}",
            s.at.as_secs_f64(),
            s.rss_kib,
            s.allocations
        );
        samples.push(s);
        cycle += 1;
        let rest = a.cycle.saturating_sub(cycle_start.elapsed());
        std::thread::sleep(rest.min(a.duration.saturating_sub(churn_start.elapsed())));
    }

    // Release everything held; wait for the abandoned ones to expire.
    for f in &mut held {
        let rep = f.deallocate(64, Duration::from_secs(60))?;
        if rep.failed > 0 {
            bail!("releasing held allocations: {rep:?}");
        }
    }
    drop(held);
    let settle = Instant::now() + Duration::from_secs(u64::from(a.lifetime) + 30);
    let m = loop {
        let m = metrics(http)?;
        if gauge(&m, "kyuu_turn_allocations") == 0.0 || Instant::now() > settle {
            break m;
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    let rss_end = server.vm_rss_kib()?;
    server.check_alive()?;

    // Verdicts.
    let mut failures = Vec::new();
    let lost = sent - echoed;
    if lost > 0 {
        failures.push(format!("{lost} of {sent} relayed packets lost"));
    }
    // Warm-up: a quarter of the run, and at least until abandoned cohorts start expiring (the
    // allocation count only reaches its steady state after one lifetime).
    let warm = (a.duration / 4).max(Duration::from_secs(u64::from(a.lifetime)) + 2 * a.cycle);
    let warm_rss = samples
        .iter()
        .filter(|s| s.at.saturating_sub(samples[0].at) <= warm)
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(0);
    let after_max = samples
        .iter()
        .filter(|s| s.at.saturating_sub(samples[0].at) > warm)
        .map(|s| s.rss_kib)
        .max()
        .unwrap_or(warm_rss);
    let growth = (after_max as f64 / warm_rss.max(1) as f64 - 1.0) * 100.0;
    if growth > a.rss_tolerance_pct {
        failures.push(format!(
            "RSS grew {growth:.1}% after warm-up ({warm_rss} -> {after_max} KiB)"
        ));
    }
    let mut nonzero = Vec::new();
    for (k, v) in gauges(&m) {
        let expected = if k.starts_with("kyuu_up") {
            1.0
        } else if k.starts_with("kyuu_start_time_seconds") {
            v
        } else if k.starts_with("kyuu_conns_open") && k.contains("listener=\"http\"") {
            // The /metrics request itself.
            1.0
        } else {
            0.0
        };
        if v != expected {
            nonzero.push(format!("{k} = {v}"));
        }
    }
    if !nonzero.is_empty() {
        failures.push(format!("gauges not back to zero: {nonzero:?}"));
    }
    println!(
        "\nkyuu-soak summary ({:.0} s, {cycle} cycles)\n\
         | what | value |\n| --- | ---: |\n\
         | held allocations | {} |\n\
         | churned allocations (released / abandoned to expire) | {opened} ({released} / {abandoned}) |\n\
         | refreshes | {refreshes} |\n\
         | relayed packets echoed / sent | {echoed} / {sent} (lost {lost}) |\n\
         | server RSS at start / warm-up max / max after warm-up / end | {rss0} / {warm_rss} / {after_max} / {rss_end} KiB |\n\
         | RSS growth after warm-up | {growth:.2}% (tolerance {}%) |\n\
         | gauges after release | {} |",
        t0.elapsed().as_secs_f64(),
        a.allocations,
        a.rss_tolerance_pct,
        if nonzero.is_empty() {
            "all zero".to_owned()
        } else {
            nonzero.join(", ")
        }
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
    if !failures.is_empty() {
        bail!("soak failed: {}", failures.join("; "));
    }
    println!("soak passed");
    Ok(())
}
