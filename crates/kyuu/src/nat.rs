//! `kyuu nat`: RFC 5780 NAT behaviour discovery against a STUN server.

use std::fmt::Write as _;
use std::process::ExitCode;

use kyuu_client::nat::{NatReport, NO_RFC5780};
use kyuu_client::{resolve_server, DiscoverError, ProbeConfig, RetransmitConfig};

use crate::cli::NatArgs;

/// Exit status when only part of the tests could be answered.
const PARTIAL: u8 = 3;

pub fn run(args: NatArgs) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(max) = args.lifetime {
        return rt.block_on(lifetime(&args, max));
    }
    match rt.block_on(probe(&args)) {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", render(&report));
            }
            if !report.rfc5780 {
                eprintln!("error: {NO_RFC5780}");
                ExitCode::from(PARTIAL)
            } else if !report.problems.is_empty() {
                ExitCode::from(PARTIAL)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            if args.json {
                let v = serde_json::json!({ "server": args.server, "error": e.to_string() });
                println!("{v}");
            }
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `kyuu nat --lifetime MAX`: the RFC 5780 §4.6 binding-lifetime test.
async fn lifetime(args: &NatArgs, max: std::time::Duration) -> ExitCode {
    let server = match resolve_server(&args.server, args.local) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let bind = args.local.unwrap_or_else(|| {
        if server.is_ipv6() {
            "[::]:0".parse().unwrap_or(server)
        } else {
            "0.0.0.0:0".parse().unwrap_or(server)
        }
    });
    let bind = std::net::SocketAddr::new(bind.ip(), 0);
    let report = match kyuu_client::binding_lifetime(server, bind, max).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        let ms = |v: Option<u64>| {
            v.map_or_else(|| "-".to_owned(), |v| format!("{} s", v as f64 / 1000.0))
        };
        println!("Server          {server}");
        println!("Alive after     {}", ms(report.alive_after_ms));
        println!("Expired after   {}", ms(report.expired_after_ms));
        for p in &report.problems {
            println!("note: {p}");
        }
    }
    if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(PARTIAL)
    }
}

async fn probe(args: &NatArgs) -> Result<NatReport, DiscoverError> {
    let server = resolve_server(&args.server, args.local)?;
    let cfg = ProbeConfig {
        retransmit: RetransmitConfig {
            rto: args.rto,
            ..RetransmitConfig::with_timeout(args.timeout)
        },
        hairpin: !args.no_hairpin,
    };
    kyuu_client::discover(server, args.local, cfg).await
}

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// The report for people.
pub fn render(r: &NatReport) -> String {
    let mut s = String::new();
    let software = r
        .software
        .as_deref()
        .map(|sw| format!(" ({sw})"))
        .unwrap_or_default();
    let _ = writeln!(s, "Server          {}{software}", r.server);
    if let Some(o) = r.other_address {
        let _ = writeln!(s, "Alternate       {o}");
    }
    let _ = writeln!(s, "Local address   {}", r.local);
    let _ = writeln!(s, "Public address  {}", r.public);
    let _ = writeln!(s, "Behind NAT      {}", yes_no(r.behind_nat));
    let unknown = "unknown".to_owned();
    let _ = writeln!(
        s,
        "Mapping         {}",
        r.mapping.map_or_else(|| unknown.clone(), |m| m.to_string())
    );
    let _ = writeln!(
        s,
        "Filtering       {}",
        r.filtering
            .map_or_else(|| unknown.clone(), |f| f.to_string())
    );
    let hairpin = match (r.hairpinning, r.behind_nat) {
        (Some(h), _) => yes_no(h),
        (None, false) => "n/a (no NAT)",
        (None, true) => "not tested",
    };
    let _ = writeln!(s, "Hairpinning     {hairpin}");
    let _ = writeln!(s, "NAT type        {}", r.nat_type);
    for w in &r.wrong_source {
        let _ = writeln!(
            s,
            "Wrong source    {}: answered from {}, expected {}",
            w.test, w.from, w.expected
        );
    }
    for p in &r.problems {
        let _ = writeln!(s, "note: {p}");
    }
    s
}
