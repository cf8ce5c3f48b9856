//! `kyuu-turn-bench`: kyuu's TURN relay against coturn, side by side in one run, with the same
//! load against each, reported as ratios (kyuu/coturn) next to a no-server bound (the same
//! traffic sent straight to the echo peer).
//!
//! Measured: relayed packets/s, Mbit/s and server CPU per packet (100 and 1200 byte payloads,
//! 1/100/1,000/10,000 allocations), round-trip latency p50/p99 at fixed moderate rates (5,000
//! pkt/s over 10 allocations; 50 pkt/s each over 1,000), authenticated allocations per second,
//! and resident memory per allocation with 10,000 allocations held. The goals (issue 11) are
//! printed under the table, each marked met or not.
//!
//! Traffic per allocation: client → server (ChannelData) → relay → echo peer → relay → client,
//! all on 127.0.0.1. Run with `--quick` for a short CI-sized pass.

mod batch;
mod echo;
mod load;
mod proto;
mod servers;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use serde::Serialize;

use load::{Fleet, Via};
use proto::{Credentials, Plan};
use servers::{Common, ServerProc};

#[derive(Debug, Parser)]
#[command(
    name = "kyuu-turn-bench",
    about = "TURN relay benchmark: kyuu against coturn"
)]
struct Args {
    /// A short run (CI-sized): fewer allocations held, shorter measurements.
    #[arg(long)]
    quick: bool,
    /// Seconds each throughput configuration is measured (after a warm-up).
    #[arg(long)]
    duration: Option<f64>,
    /// The kyuu binary (default: target/release/kyuu, or $CARGO_TARGET_DIR/release/kyuu).
    #[arg(long)]
    kyuu_bin: Option<PathBuf>,
    /// coturn's server binary.
    #[arg(long, default_value = "turnserver")]
    coturn_bin: String,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Servers to run: any of coturn, kyuu, direct (the no-server bound).
    #[arg(long, value_delimiter = ',', default_value = "coturn,kyuu,direct")]
    targets: Vec<String>,
    /// Allocation counts for the throughput table.
    #[arg(long, value_delimiter = ',')]
    allocations: Option<Vec<usize>>,
    /// Payload sizes for the throughput table.
    #[arg(long, value_delimiter = ',', default_value = "100,1200")]
    payloads: Vec<usize>,
    /// Rounds each measurement is split into, alternating the servers (median reported).
    #[arg(long)]
    rounds: Option<usize>,
    /// Packets in flight in total (split over the allocations, at least one each).
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Worker threads for each server (kyuu `listen.threads`, coturn `--relay-threads`).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Latency tests: `RATExALLOCATIONS` each, the total packets per second spread over that
    /// many allocations (default: 5,000 pkt/s over 10, and 50 pkt/s each over 1,000).
    #[arg(long, value_delimiter = ',', default_value = "5000x10,50000x1000")]
    latency: Vec<String>,
    /// Allocation-rate test: allocations made (default 2000; 300 with --quick).
    #[arg(long)]
    alloc_count: Option<usize>,
    /// Allocations held for the memory test (default 10000; 1000 with --quick).
    #[arg(long)]
    hold: Option<usize>,
    /// Credentials: `static` (one long-term user) or `rest` (TURN REST API shared secret,
    /// username `<expiry>:bench`).
    #[arg(long, default_value = "static", value_parser = ["static", "rest"])]
    auth: String,
    /// kyuu's `[log] level`.
    #[arg(long, default_value = "info")]
    kyuu_log_level: String,
    /// kyuu's `turn.relay_steering`: one socket per relay thread for all relay ports
    /// (sk_lookup; needs root), or one socket read per allocation ("off", the server's default,
    /// so the figures are what a default install gets).
    #[arg(long, default_value = "off", value_parser = ["off", "auto", "required"])]
    kyuu_relay_steering: String,
    /// Skip phases: any of memory, rate, throughput, latency.
    #[arg(long, value_delimiter = ',')]
    skip: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Target {
    Coturn,
    Kyuu,
    Direct,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Coturn => "coturn",
            Target::Kyuu => "kyuu",
            Target::Direct => "direct",
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "lowercase")]
enum Better {
    Higher,
    Lower,
}

/// One line of the table.
#[derive(Debug, Clone, Serialize)]
struct Row {
    metric: String,
    better: Better,
    coturn: Option<f64>,
    kyuu: Option<f64>,
    /// The no-server bound, where it means something.
    direct: Option<f64>,
    /// Why a cell is empty.
    notes: Vec<String>,
}

impl Row {
    fn new(metric: String, better: Better) -> Row {
        Row {
            metric,
            better,
            coturn: None,
            kyuu: None,
            direct: None,
            notes: Vec::new(),
        }
    }

    fn set(&mut self, t: Target, v: f64) {
        match t {
            Target::Coturn => self.coturn = Some(v),
            Target::Kyuu => self.kyuu = Some(v),
            Target::Direct => self.direct = Some(v),
        }
    }

    fn ratio(&self) -> Option<f64> {
        match (self.kyuu, self.coturn) {
            (Some(k), Some(c)) if c > 0.0 => Some(k / c),
            _ => None,
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct Results {
    settings: serde_json::Value,
    rows: Vec<Row>,
    goals: Vec<(String, Option<bool>, String)>,
    notes: Vec<String>,
    raw: Vec<serde_json::Value>,
}

/// The servers of a run; `None` with the reason when one could not be started.
struct Servers {
    dir: PathBuf,
    common: Common,
    coturn_bin: String,
    kyuu_bin: PathBuf,
    kyuu_log_level: String,
    used_ports: Vec<u16>,
}

const COTURN_RELAY: (u16, u16) = (10000, 21499);
const KYUU_RELAY: (u16, u16) = (21500, 32767);

impl Servers {
    fn start(&mut self, t: Target) -> anyhow::Result<ServerProc> {
        let port = servers::free_port(&self.used_ports)?;
        self.used_ports.push(port);
        match t {
            Target::Coturn => {
                let dir = self.dir.join(format!("coturn-{port}"));
                std::fs::create_dir_all(&dir)?;
                servers::start_coturn(&self.coturn_bin, &dir, port, COTURN_RELAY, &self.common)
            }
            Target::Kyuu => {
                if !self.kyuu_bin.exists() {
                    anyhow::bail!("no kyuu binary at {}", self.kyuu_bin.display());
                }
                let dir = self.dir.join(format!("kyuu-{port}"));
                std::fs::create_dir_all(&dir)?;
                servers::start_kyuu(
                    &self.kyuu_bin.display().to_string(),
                    &dir,
                    port,
                    KYUU_RELAY,
                    &self.common,
                    &self.kyuu_log_level,
                )
            }
            Target::Direct => anyhow::bail!("the no-server bound has no server"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let quick = args.quick;
    let duration = Duration::from_secs_f64(args.duration.unwrap_or(if quick { 0.8 } else { 3.0 }));
    let warmup = Duration::from_millis(if quick { 150 } else { 300 });
    let rounds = args.rounds.unwrap_or(if quick { 2 } else { 3 }).max(1);
    let allocs = args.allocations.clone().unwrap_or_else(|| {
        if quick {
            vec![1, 10, 100]
        } else {
            vec![1, 100, 1000, 10_000]
        }
    });
    let alloc_count = args.alloc_count.unwrap_or(if quick { 300 } else { 2000 });
    let hold = args.hold.unwrap_or(if quick { 1000 } else { 10_000 });
    let targets: Vec<Target> = args
        .targets
        .iter()
        .map(|t| match t.as_str() {
            "coturn" => Ok(Target::Coturn),
            "kyuu" => Ok(Target::Kyuu),
            "direct" => Ok(Target::Direct),
            other => Err(anyhow::anyhow!("unknown target {other}")),
        })
        .collect::<anyhow::Result<_>>()?;
    let servers_wanted: Vec<Target> = targets
        .iter()
        .copied()
        .filter(|t| *t != Target::Direct)
        .collect();

    // Client sockets, relay sockets: one descriptor per allocation each, inherited by servers.
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)?;
    let want = (hold as u64 * 2 + 4096).min(hard);
    if soft < want {
        rlimit::setrlimit(rlimit::Resource::NOFILE, want, hard)?;
    }
    if want < hold as u64 + 1024 {
        eprintln!("warning: RLIMIT_NOFILE hard limit {hard} is low for {hold} allocations");
    }

    let kyuu_bin = args.kyuu_bin.clone().unwrap_or_else(default_kyuu_bin);
    let dir = std::env::temp_dir().join(format!("kyuu-turn-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let common = Common {
        username: "bench".into(),
        password: "bench-pass".into(),
        realm: "kyuu-bench".into(),
        threads: args.threads,
        secret: (args.auth == "rest").then(|| "kyuu-bench-rest-secret".to_owned()),
        relay_steering: args.kyuu_relay_steering.clone(),
    };
    let creds = match &common.secret {
        Some(secret) => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_secs();
            let (username, password) = kyuu_stun::rest::credentials(secret, "bench", now, 86_400);
            Credentials { username, password }
        }
        None => Credentials {
            username: common.username.clone(),
            password: common.password.clone(),
        },
    };
    let mut srv = Servers {
        dir: dir.clone(),
        common,
        coturn_bin: args.coturn_bin.clone(),
        kyuu_bin: kyuu_bin.clone(),
        kyuu_log_level: args.kyuu_log_level.clone(),
        used_ports: Vec::new(),
    };
    for (name, range) in [("coturn", COTURN_RELAY), ("kyuu", KYUU_RELAY)] {
        let busy = servers::range_busy(range.0, range.1);
        if busy > 0 {
            eprintln!(
                "warning: {busy} sockets already bound in {name}'s relay range {}-{}",
                range.0, range.1
            );
        }
    }
    let echo = echo::Echo::start()?;
    let mut res = Results {
        settings: serde_json::json!({
            "quick": quick,
            "duration_secs": duration.as_secs_f64(),
            "warmup_secs": warmup.as_secs_f64(),
            "rounds": rounds,
            "allocations": allocs,
            "payloads": args.payloads,
            "window": args.window,
            "threads": args.threads,
            "auth": args.auth,
            "latency": args.latency,
            "alloc_count": alloc_count,
            "hold": hold,
            "kyuu_bin": kyuu_bin.display().to_string(),
            "coturn_bin": args.coturn_bin,
            "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            "loadavg_start": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        }),
        ..Default::default()
    };
    eprintln!("work dir {} (server logs)", dir.display());
    let skip = |p: &str| args.skip.iter().any(|s| s == p);

    // 1. Memory: a fresh server each, before anything else touched it.
    if !skip("memory") {
        let mut rss = Row::new(
            format!("RSS per allocation, {hold} held (bytes)"),
            Better::Lower,
        );
        let mut held = Row::new(
            format!("allocations relaying, of {hold} held"),
            Better::Higher,
        );
        for &t in &servers_wanted {
            match memory(&mut srv, t, hold, &creds, echo.addr) {
                Ok((per, ok, raw)) => {
                    rss.set(t, per);
                    held.set(t, ok as f64);
                    res.raw.push(raw);
                }
                Err(e) => {
                    let note = format!("{}: {e:#}", t.name());
                    eprintln!("memory: {note}");
                    rss.notes.push(note.clone());
                    held.notes.push(note);
                }
            }
        }
        res.rows.push(rss);
        res.rows.push(held);
    }

    // The servers for the rest, started side by side.
    let mut running: Vec<(Target, Result<ServerProc, String>)> = servers_wanted
        .iter()
        .map(|&t| (t, srv.start(t).map_err(|e| format!("{e:#}"))))
        .collect();
    for (t, r) in &running {
        if let Err(e) = r {
            eprintln!("{}: not started: {e}", t.name());
            res.notes
                .push(format!("{} could not be started: {e}", t.name()));
        }
    }

    // 2. Authenticated allocations per second: rounds alternate the servers; median rate.
    if !skip("rate") {
        let per_round = alloc_count.div_ceil(rounds);
        let mut row = Row::new(
            format!(
                "authenticated allocations/s ({alloc_count} made, 64 in flight, {} credentials)",
                args.auth
            ),
            Better::Higher,
        );
        let mut cpu_row = Row::new(
            "server CPU µs per authenticated allocation".to_owned(),
            Better::Lower,
        );
        let mut rates: Vec<(Target, Vec<f64>, Vec<f64>)> = servers_wanted
            .iter()
            .map(|&t| (t, Vec::new(), Vec::new()))
            .collect();
        for r in 0..rounds {
            for k in 0..servers_wanted.len() {
                let t = servers_wanted[(k + r) % servers_wanted.len()];
                let pid = server_pid(t, &mut running).ok().flatten();
                let res_r = via_for(t, &mut running).and_then(|via| {
                    let mut fleet = Fleet::open(per_round, via, echo.addr, &creds)?;
                    let plan = Plan {
                        permission: false,
                        channel: false,
                    };
                    let cpu0 = pid.map_or(0, servers::cpu_ns);
                    let rep = fleet.setup(plan, 64, Duration::from_secs(60))?;
                    let cpu = pid.map_or(0, servers::cpu_ns).saturating_sub(cpu0);
                    dealloc(&mut fleet, t);
                    Ok((rep, cpu))
                });
                match res_r {
                    Ok((rep, cpu)) => {
                        if rep.ok > 0 {
                            if let Some((_, _, c)) = rates.iter_mut().find(|(rt, _, _)| *rt == t) {
                                c.push(cpu as f64 / 1000.0 / rep.ok as f64);
                            }
                        }
                        res.raw.push(
                            serde_json::json!({"phase": "alloc_rate", "target": t, "round": r, "report": rep}),
                        );
                        if rep.failed == 0 {
                            if let Some((_, v, _)) = rates.iter_mut().find(|(rt, _, _)| *rt == t) {
                                v.push(rep.per_sec);
                            }
                        } else {
                            row.notes.push(format!(
                                "{}: {} of {per_round} allocations failed: {}",
                                t.name(),
                                rep.failed,
                                rep.first_error.unwrap_or_default()
                            ));
                        }
                    }
                    Err(e) => row.notes.push(format!("{}: {e:#}", t.name())),
                }
            }
        }
        for (t, v, c) in rates {
            if let Some(m) = median(&v) {
                eprintln!("alloc rate {}: {m:.0}/s (rounds {v:.0?})", t.name());
                row.set(t, m);
            }
            if let Some(m) = median(&c) {
                cpu_row.set(t, m);
            }
        }
        row.notes.dedup();
        cpu_row.notes.clone_from(&row.notes);
        res.rows.push(row);
        res.rows.push(cpu_row);
    }

    // 3. Throughput: per allocation count, one fleet per target; rounds alternate the targets
    // so load noise from other processes hits all alike; the median round counts. When the
    // fleets of all targets together would not fit the descriptor limit (10,000 allocations
    // are 10,000 client sockets each), the targets take turns instead, one fleet at a time.
    if !skip("throughput") {
        let slice = duration.div_f64(rounds as f64);
        let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(s, _)| s);
        for &n in &allocs {
            let together = (n * targets.len() + 1024) as u64 <= nofile;
            let groups: Vec<Vec<Target>> = if together {
                vec![targets.clone()]
            } else {
                eprintln!(
                    "throughput n={n}: {} fleets of {n} sockets exceed RLIMIT_NOFILE {nofile}; the targets take turns",
                    targets.len()
                );
                targets.iter().map(|&t| vec![t]).collect()
            };
            // (payload, target) -> reports; notes per payload.
            let mut reps: Vec<(usize, Target, Vec<load::ThroughputReport>)> = Vec::new();
            let mut notes: Vec<(usize, String)> = Vec::new();
            for group in &groups {
                let mut fleets: Vec<(Target, anyhow::Result<Fleet>)> = Vec::new();
                for &t in group {
                    let f = via_for(t, &mut running).and_then(|via| {
                        let mut fleet = Fleet::open(n, via, echo.addr, &creds)?;
                        let rep = fleet.setup(
                            Plan {
                                permission: true,
                                channel: true,
                            },
                            64,
                            Duration::from_secs(120),
                        )?;
                        if rep.failed > 0 {
                            anyhow::bail!(
                                "{} of {n} allocations failed: {}",
                                rep.failed,
                                rep.first_error.unwrap_or_default()
                            );
                        }
                        Ok(fleet)
                    });
                    fleets.push((t, f));
                }
                for &p in &args.payloads {
                    for r in 0..rounds {
                        for k in 0..fleets.len() {
                            let idx = (k + r) % fleets.len();
                            let (t, f) = &mut fleets[idx];
                            let t = *t;
                            let Ok(fleet) = f else {
                                continue;
                            };
                            let pid = server_pid(t, &mut running);
                            let out = pid.and_then(|pid| {
                                let probe = || (echo.received(), pid.map_or(0, servers::cpu_ns));
                                fleet.throughput(p, args.window, warmup, slice, &probe)
                            });
                            match out {
                                Ok(tr) => {
                                    eprintln!(
                                        "throughput {} n={n} {p}B round {r}: sent {:.0}/s, peer {:.0}/s, back {:.0}/s, lost {}, server {:.2} µs/pkt on {:.2} cores",
                                        t.name(),
                                        tr.sent_pps,
                                        tr.peer_pps,
                                        tr.delivered_pps,
                                        tr.lost,
                                        tr.server_cpu_us_per_pkt,
                                        tr.server_cores
                                    );
                                    res.raw.push(serde_json::json!({"phase": "throughput", "target": t, "round": r, "report": tr}));
                                    match reps.iter_mut().find(|(rp, rt, _)| *rp == p && *rt == t) {
                                        Some((_, _, v)) => v.push(tr),
                                        None => reps.push((p, t, vec![tr])),
                                    }
                                }
                                Err(e) => notes.push((p, format!("{}: {e:#}", t.name()))),
                            }
                        }
                    }
                }
                for (t, f) in &mut fleets {
                    match f {
                        Ok(fleet) => dealloc(fleet, *t),
                        Err(e) => {
                            for &p in &args.payloads {
                                notes.push((p, format!("{}: {e:#}", t.name())));
                            }
                        }
                    }
                }
            }
            for &p in &args.payloads {
                let mut pps = Row::new(format!("relayed pkt/s, {p} B, {n} alloc"), Better::Higher);
                let mut mbps = Row::new(format!("Mbit/s, {p} B, {n} alloc"), Better::Higher);
                let mut cpu = Row::new(
                    format!("server CPU µs per relayed round trip, {p} B, {n} alloc"),
                    Better::Lower,
                );
                for (_, t, v) in reps.iter().filter(|(rp, _, _)| *rp == p) {
                    let d: Vec<f64> = v.iter().map(|r| r.delivered_pps).collect();
                    if let Some(m) = median(&d) {
                        pps.set(*t, m);
                        mbps.set(*t, m * p as f64 * 8.0 / 1e6);
                    }
                    if *t != Target::Direct {
                        let c: Vec<f64> = v.iter().map(|r| r.server_cpu_us_per_pkt).collect();
                        if let Some(m) = median(&c) {
                            cpu.set(*t, m);
                        }
                    }
                }
                pps.notes = notes
                    .iter()
                    .filter(|(np, _)| *np == p)
                    .map(|(_, s)| s.clone())
                    .collect();
                if !together {
                    pps.notes
                        .push("targets measured one after another (descriptor limit)".to_owned());
                }
                pps.notes.dedup();
                mbps.notes.clone_from(&pps.notes);
                cpu.notes.clone_from(&pps.notes);
                res.rows.push(pps);
                res.rows.push(mbps);
                res.rows.push(cpu);
            }
        }
    }

    // 4. Latency at a fixed moderate rate; rounds alternate the targets, samples pooled.
    let latency_cases: Vec<(u64, usize)> = args
        .latency
        .iter()
        .map(|c| {
            c.split_once('x')
                .and_then(|(r, n)| Some((r.parse().ok()?, n.parse().ok()?)))
                .filter(|&(r, n): &(u64, usize)| r > 0 && n > 0)
                .with_context(|| {
                    format!("--latency {c:?}: expected RATExALLOCATIONS, e.g. 5000x10")
                })
        })
        .collect::<anyhow::Result<_>>()?;
    for &(rate, na) in latency_cases.iter().filter(|_| !skip("latency")) {
        let mut p50 = Row::new(
            format!("RTT p50 (µs, median of rounds), {rate} pkt/s over {na} alloc, 100 B"),
            Better::Lower,
        );
        let mut p99 = Row::new(
            format!("RTT p99 (µs, median of rounds), {rate} pkt/s over {na} alloc, 100 B"),
            Better::Lower,
        );
        let mut fleets: Vec<(Target, anyhow::Result<Fleet>)> = Vec::new();
        for &t in &targets {
            let f = via_for(t, &mut running).and_then(|via| {
                let mut fleet = Fleet::open(na, via, echo.addr, &creds)?;
                let rep = fleet.setup(
                    Plan {
                        permission: true,
                        channel: true,
                    },
                    64,
                    Duration::from_secs(30),
                )?;
                if rep.failed > 0 {
                    anyhow::bail!("{} allocations failed", rep.failed);
                }
                Ok(fleet)
            });
            fleets.push((t, f));
        }
        let mut per_round: Vec<(Target, Vec<(f64, f64)>)> =
            targets.iter().map(|&t| (t, Vec::new())).collect();
        let mut samples: Vec<(Target, load::LatencyRun)> = targets
            .iter()
            .map(|&t| (t, load::LatencyRun::default()))
            .collect();
        // More, shorter rounds than for throughput: a tail percentile is what bursts from other
        // processes distort most, and the median over many rounds shrugs off a few bad ones.
        let lat_rounds = rounds * 4;
        let slice = duration
            .max(Duration::from_secs(1))
            .div_f64(lat_rounds as f64);
        let nf = fleets.len();
        for r in 0..lat_rounds {
            for k in 0..nf {
                let (t, f) = &mut fleets[(k + r) % nf];
                let Ok(fleet) = f else {
                    continue;
                };
                // The fleet is warm already; 100 ms lets the previous round's target go quiet.
                match fleet.latency(100, rate, Duration::from_millis(100), slice) {
                    Ok(run) => {
                        let one = load::LatencyReport::from_run(na, rate, run.clone());
                        if let Some((_, v)) = per_round.iter_mut().find(|(st, _)| st == t) {
                            v.push((one.p50_us, one.p99_us));
                        }
                        if let Some((_, acc)) = samples.iter_mut().find(|(st, _)| st == t) {
                            acc.rtts.extend(run.rtts);
                            acc.sent += run.sent;
                            acc.send_errors += run.send_errors;
                            if acc.first_error.is_none() {
                                acc.first_error = run.first_error;
                            }
                        }
                    }
                    Err(e) => p50.notes.push(format!("{}: {e:#}", t.name())),
                }
            }
        }
        for (t, f) in &mut fleets {
            match f {
                Ok(fleet) => {
                    dealloc(fleet, *t);
                }
                Err(e) => p50.notes.push(format!("{}: {e:#}", t.name())),
            }
        }
        for (t, run) in samples {
            if run.rtts.is_empty() {
                continue;
            }
            let l = load::LatencyReport::from_run(na, rate, run);
            eprintln!(
                "latency {}: p50 {:.1} µs p99 {:.1} µs max {:.1} µs ({} samples, {} lost, {} send errors {})",
                t.name(),
                l.p50_us,
                l.p99_us,
                l.max_us,
                l.samples,
                l.lost,
                l.send_errors,
                l.first_send_error.as_deref().unwrap_or("")
            );
            if l.send_errors > 0 {
                p99.notes.push(format!(
                    "{}: {} sends refused ({})",
                    t.name(),
                    l.send_errors,
                    l.first_send_error.as_deref().unwrap_or("")
                ));
            }
            // The median over rounds: one round hit by another process's burst does not
            // decide the tail; the pooled figures are in the JSON.
            let rounds_of = per_round
                .iter()
                .find(|(st, _)| *st == t)
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let m50 = median(&rounds_of.iter().map(|r| r.0).collect::<Vec<_>>());
            let m99 = median(&rounds_of.iter().map(|r| r.1).collect::<Vec<_>>());
            eprintln!(
                "latency {}: median over {} rounds p50 {:.1} µs p99 {:.1} µs",
                t.name(),
                rounds_of.len(),
                m50.unwrap_or(f64::NAN),
                m99.unwrap_or(f64::NAN)
            );
            if let (Some(a), Some(b)) = (m50, m99) {
                p50.set(t, a);
                p99.set(t, b);
            }
            res.raw.push(serde_json::json!({
                "phase": "latency", "target": t, "pooled": l,
                "rounds_p50_p99_us": rounds_of,
            }));
        }
        p99.notes.extend(p50.notes.iter().cloned());
        res.rows.push(p50);
        res.rows.push(p99);
    }

    // Servers still alive at the end? (A crash mid-run would otherwise hide as n/a.)
    for (t, s) in &mut running {
        if let Ok(p) = s {
            if let Err(e) = p.check_alive() {
                res.notes
                    .push(format!("{} died during the run: {e:#}", t.name()));
            }
        }
    }
    drop(running);
    drop(echo);

    goals(&mut res, hold);
    let table = render(&res, &targets);
    println!("{table}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&res)?)
            .with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn default_kyuu_bin() -> PathBuf {
    let local = PathBuf::from("target/release/kyuu");
    if local.exists() {
        return local;
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let p = Path::new(&dir).join("release/kyuu");
        if p.exists() {
            return p;
        }
    }
    local
}

/// Deallocates a fleet's allocations, saying so when some were not released.
fn dealloc(fleet: &mut Fleet, t: Target) {
    match fleet.deallocate(64, Duration::from_secs(30)) {
        Ok(rep) if rep.failed == 0 => {}
        Ok(rep) => eprintln!(
            "{}: {} deallocations failed: {}",
            t.name(),
            rep.failed,
            rep.first_error.unwrap_or_default()
        ),
        Err(e) => eprintln!("{}: deallocation: {e:#}", t.name()),
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn via_for(t: Target, running: &mut [(Target, Result<ServerProc, String>)]) -> anyhow::Result<Via> {
    match t {
        Target::Direct => Ok(Via::Direct),
        Target::Coturn | Target::Kyuu => running
            .iter_mut()
            .find(|(rt, _)| *rt == t)
            .map(|(_, s)| server_addr(s).map(Via::Turn))
            .unwrap_or_else(|| Err(anyhow::anyhow!("not requested"))),
    }
}

/// The PID of a target's server (`None` for the no-server bound); fails when it has died.
fn server_pid(
    t: Target,
    running: &mut [(Target, Result<ServerProc, String>)],
) -> anyhow::Result<Option<u32>> {
    if t == Target::Direct {
        return Ok(None);
    }
    let Some((_, s)) = running.iter_mut().find(|(rt, _)| *rt == t) else {
        anyhow::bail!("not requested");
    };
    server_addr(s)?;
    Ok(s.as_ref().ok().map(ServerProc::pid))
}

fn server_addr(s: &mut Result<ServerProc, String>) -> anyhow::Result<std::net::SocketAddr> {
    match s {
        Ok(p) => {
            p.check_alive()?;
            Ok(p.addr)
        }
        Err(_) => Err(anyhow::anyhow!("not started (see the notes)")),
    }
}

/// Starts a fresh server, holds `hold` allocations (each with a permission and a channel),
/// checks each still relays, and divides the VmRSS growth by the allocations held.
fn memory(
    srv: &mut Servers,
    t: Target,
    hold: usize,
    creds: &Credentials,
    echo: std::net::SocketAddr,
) -> anyhow::Result<(f64, usize, serde_json::Value)> {
    let mut p = srv.start(t)?;
    std::thread::sleep(Duration::from_millis(300));
    let before = p.vm_rss_kib()?;
    let mut fleet = Fleet::open(hold, Via::Turn(p.addr), echo, creds)?;
    let rep = fleet.setup(
        Plan {
            permission: true,
            channel: true,
        },
        128,
        Duration::from_secs(180),
    )?;
    p.check_alive()?;
    let relaying = fleet.probe_all(3)?;
    std::thread::sleep(Duration::from_millis(500));
    let after = p.vm_rss_kib()?;
    p.check_alive()?;
    let ready = fleet.ready();
    let per = (after.saturating_sub(before) as f64 * 1024.0) / ready.max(1) as f64;
    eprintln!(
        "memory {}: {} of {hold} allocated in {:.1}s ({}), {relaying} relaying, VmRSS {before} -> {after} KiB, {per:.0} B/allocation",
        t.name(),
        ready,
        rep.secs,
        rep.first_error.as_deref().unwrap_or("no errors"),
    );
    let dealloc = fleet.deallocate(128, Duration::from_secs(60))?;
    let raw = serde_json::json!({
        "phase": "memory", "target": t, "hold": hold, "allocated": ready,
        "relaying": relaying, "rss_before_kib": before, "rss_after_kib": after,
        "bytes_per_allocation": per, "setup": rep, "deallocate": dealloc,
    });
    if ready < hold {
        anyhow::bail!(
            "only {ready} of {hold} allocations made: {}",
            rep.first_error.unwrap_or_default()
        );
    }
    Ok((per, relaying, raw))
}

/// The goals of issue 11 (and the memory ones before it), each marked met, not met or n/a.
fn goals(res: &mut Results, hold: usize) {
    let find = |prefix: &str| res.rows.iter().find(|r| r.metric.starts_with(prefix));
    let mut g = Vec::new();
    for p in [100, 1200] {
        let prefix = format!("relayed pkt/s, {p} B,");
        let ratios: Vec<(String, f64)> = res
            .rows
            .iter()
            .filter(|r| r.metric.starts_with(&prefix))
            .filter_map(|r| Some((r.metric.clone(), r.ratio()?)))
            .collect();
        let worst = ratios.iter().min_by(|a, b| a.1.total_cmp(&b.1));
        g.push((
            format!("≥1.5x coturn's relayed packets/s at {p} B, every allocation count"),
            worst.map(|w| w.1 >= 1.5),
            worst.map_or("n/a".to_owned(), |(m, r)| {
                format!(
                    "lowest kyuu/coturn {r:.2}x ({}); all: {}",
                    m.trim_start_matches(&prefix).trim(),
                    ratios
                        .iter()
                        .map(|(m, r)| format!("{} {r:.2}x", m.trim_start_matches(&prefix).trim()))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }),
        ));
    }
    let cpu: Vec<(String, f64)> = res
        .rows
        .iter()
        .filter(|r| r.metric.starts_with("server CPU µs per relayed round trip"))
        .filter_map(|r| Some((r.metric.clone(), r.ratio()?)))
        .collect();
    let worst = cpu.iter().max_by(|a, b| a.1.total_cmp(&b.1));
    g.push((
        "server CPU per relayed packet ≤0.6x coturn's, every case".to_owned(),
        worst.map(|w| w.1 <= 0.6),
        worst.map_or("n/a".to_owned(), |(m, r)| {
            format!(
                "highest kyuu/coturn {r:.2}x ({})",
                m.trim_start_matches("server CPU µs per relayed round trip,")
                    .trim()
            )
        }),
    ));
    for r in res.rows.iter().filter(|r| r.metric.starts_with("RTT p99")) {
        let ratio = r.ratio();
        let case = r
            .metric
            .split_once("rounds),")
            .map_or(r.metric.as_str(), |(_, c)| c.trim());
        g.push((
            format!("RTT p99 no worse than coturn's, {case}"),
            ratio.map(|x| x <= 1.0),
            ratio.map_or("n/a".to_owned(), |x| format!("kyuu/coturn {x:.2}")),
        ));
    }
    let mem = find("RSS per allocation").and_then(Row::ratio);
    g.push((
        "memory per allocation below coturn's".to_owned(),
        mem.map(|r| r < 1.0),
        mem.map_or("n/a".to_owned(), |r| format!("kyuu/coturn {r:.2}")),
    ));
    let held = find("allocations relaying").and_then(|r| r.kyuu);
    g.push((
        format!("{hold} allocations held without loss"),
        held.map(|h| h as usize == hold),
        held.map_or("n/a".to_owned(), |h| {
            format!("kyuu: {h:.0} of {hold} relaying")
        }),
    ));
    res.goals = g;
}

fn fmt_val(v: Option<f64>) -> String {
    match v {
        None => "n/a".into(),
        Some(v) if v.is_nan() => "n/a".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn render(res: &Results, targets: &[Target]) -> String {
    let direct = targets.contains(&Target::Direct);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| metric | better | coturn | kyuu | kyuu/coturn |{}",
        if direct {
            " no-server bound | coturn/bound | kyuu/bound |"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "| --- | --- | ---: | ---: | ---: |{}",
        if direct { " ---: | ---: | ---: |" } else { "" }
    );
    for r in &res.rows {
        let ratio = r.ratio().map_or("n/a".into(), |x| format!("{x:.2}x"));
        let better = match r.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
        };
        let _ = write!(
            s,
            "| {} | {better} | {} | {} | {ratio} |",
            r.metric,
            fmt_val(r.coturn),
            fmt_val(r.kyuu)
        );
        if direct {
            let of_bound = |v: Option<f64>| match (v, r.direct) {
                (Some(k), Some(d)) if d > 0.0 => format!("{:.2}", k / d),
                _ => "n/a".into(),
            };
            let _ = write!(
                s,
                " {} | {} | {} |",
                fmt_val(r.direct),
                of_bound(r.coturn),
                of_bound(r.kyuu)
            );
        }
        s.push('\n');
    }
    let _ = writeln!(s, "\nGoals:");
    for (goal, ok, detail) in &res.goals {
        let mark = match ok {
            Some(true) => "MET",
            Some(false) => "NOT MET",
            None => "n/a",
        };
        let _ = writeln!(s, "- {goal}: **{mark}** ({detail})");
    }
    let _ = writeln!(
        s,
        "\nThese are kyuu's userspace relay over loopback. The packets/s and CPU goals with the kernel \
         fast path (turn.fast_path, XDP on a real link) are measured by `kyuu-fastpath-bench --sweep` \
         (veth in the network lab, 1 to 10,000 allocations at 100 B and 1200 B, coturn in the same run)."
    );
    let mut notes: Vec<String> = Vec::new();
    for n in res
        .rows
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("{}: {n}", r.metric)))
        .chain(res.notes.iter().cloned())
    {
        if !notes.contains(&n) {
            notes.push(n);
        }
    }
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes (why a cell is n/a):");
        for n in notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}
