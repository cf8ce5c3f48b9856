//! The meeting node's cost per relayed packet with and without in-process pairing
//! (`docs/rawr.md` §6.1): two lab sessions through a `kyuu serve` ISP node, A sending datagrams
//! to B, the ISP process's CPU time divided by the packets B received. Needs root and a kyuu
//! binary (`KYUU_BIN`, a release build for meaningful figures); prints SKIP otherwise.
//! Run: `KYUU_BIN=target/release/kyuu cargo bench -p kyuu-rawr-lab --bench pairing`
//! (`KYUU_PAIRING_BENCH_PACKETS`, default 20000).

use kyuu_rawr_lab::{relay_cost, LabServer, LabSpec, RawrLab};

async fn run(bin: std::path::PathBuf, paired: bool, n: usize) -> Option<kyuu_rawr_lab::RelayCost> {
    let spec = LabSpec {
        server: LabServer::Kyuu(bin),
        pair_in_process: paired,
        ..LabSpec::default()
    };
    let lab = match RawrLab::build_or_skip("rawr pairing bench", spec).await {
        Ok(Some(l)) => l,
        Ok(None) => return None,
        Err(e) => {
            eprintln!("lab: {e}");
            std::process::exit(1);
        }
    };
    match relay_cost(&lab, n).await {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("relay_cost: {e}");
            std::process::exit(1);
        }
    }
}

fn main() {
    let Some(bin) = std::env::var_os("KYUU_BIN").map(std::path::PathBuf::from) else {
        println!("SKIP rawr pairing bench: set KYUU_BIN to a kyuu binary");
        return;
    };
    let n = std::env::var("KYUU_PAIRING_BENCH_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(1);
        }
    };
    let Some(off) = rt.block_on(run(bin.clone(), false, n)) else {
        return;
    };
    let Some(on) = rt.block_on(run(bin, true, n)) else {
        return;
    };
    for (name, c) in [
        ("kernel path (pairing off)", &off),
        ("in-process pairing", &on),
    ] {
        println!(
            "{name:<26} {:>6.2} us CPU per packet at the meeting node; {}/{} delivered; {} relay-socket datagrams",
            c.cpu_us_per_packet, c.received, c.sent, c.relay_socket_datagrams
        );
    }
    if on.cpu_us_per_packet > 0.0 {
        println!(
            "ratio in-process / kernel path: {:.2}",
            on.cpu_us_per_packet / off.cpu_us_per_packet
        );
    }
    if let Ok(j) = serde_json::to_string(&serde_json::json!({"off": off, "on": on})) {
        println!("RESULT {j}");
    }
}
