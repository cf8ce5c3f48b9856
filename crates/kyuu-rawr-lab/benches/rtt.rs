//! The headline measurement (`docs/rawr.md`): RTT between two peers through the RAWR relay vs
//! through the root, and session setup time, in the delayed lab (LAN 1 ms, ISP 10 ms, root 40 ms
//! one way). Needs root; prints SKIP otherwise. Run: `cargo bench -p kyuu-rawr-lab --bench rtt`.
//! `KYUU_RAWR_BENCH_ROUNDS` sets the number of sessions (default 5); `KYUU_BIN=/path/to/kyuu`
//! runs `kyuu serve` on every node instead of in-process nodes beside coturn.

fn main() {
    let rounds = std::env::var("KYUU_RAWR_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
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
    let server = match std::env::var_os("KYUU_BIN") {
        Some(p) => kyuu_rawr_lab::LabServer::Kyuu(p.into()),
        None => kyuu_rawr_lab::LabServer::Coturn,
    };
    match rt.block_on(kyuu_rawr_lab::run_demo(rounds, true, server)) {
        Ok(Some(r)) => {
            r.print();
            if let Ok(j) = serde_json::to_string(&r) {
                println!("RESULT {j}");
            }
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("rawr bench failed: {e}");
            std::process::exit(1);
        }
    }
}
