//! TURN over DTLS (RFC 7350) interop: coturn's `turnutils_uclient -S` over UDP (OpenSSL DTLS)
//! relays through the real `kyuu serve` binary to coturn's `turnutils_peer` with no loss, both
//! with Send indications and with channels, and `/metrics` counts the allocations under
//! `transport="dtls"`. Skips with a SKIP line when coturn is not installed, unless
//! KYUU_INTEROP_REQUIRED=1.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

mod support;
use support::{free_udp_tcp_port, Proc};

fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !found {
        if std::env::var("KYUU_INTEROP_REQUIRED").as_deref() == Ok("1") {
            panic!("{tool} is required (KYUU_INTEROP_REQUIRED=1) but not installed");
        }
        println!("SKIP: {tool} not installed");
    }
    found
}

/// `kyuu serve` with only a DTLS listener; returns it and its HTTP address.
fn serve(dir: &std::path::Path, dtls_port: u16) -> (Proc, SocketAddr) {
    let config = dir.join("kyuu.toml");
    // strict_channel_numbers = false: RFC 5766 compatibility, since coturn 4.6.1's uclient binds
    // channel numbers above 0x4FFF (RFC 8656 §12).
    std::fs::write(
        &config,
        format!(
            "[listen]\nudp = []\ntcp = []\ntls = []\ndtls = [\"127.0.0.1:{dtls_port}\"]\nthreads = 2\n\
             [turn]\nrealm = \"kyuu.test\"\nrelay_ipv4 = \"127.0.0.1\"\n\
             strict_channel_numbers = false\n\
             allow_peers = [\"127.0.0.0/8\"]\nuser_quota = 0\nclient_quota = 0\n\
             users = [{{ name = \"u\", password = \"p\" }}]\n\
             [http]\nlisten = \"127.0.0.1:0\"\n"
        ),
    )
    .unwrap();
    // The listeners come before the HTTP line in the start-up summary.
    let (proc, summary) = support::serve_until(&["--config".as_ref(), config.as_os_str()], |l| {
        l.trim_start().starts_with("HTTP")
    });
    assert!(
        summary.contains(&format!("dtls 127.0.0.1:{dtls_port}")),
        "no DTLS listener in the summary:\n{summary}"
    );
    let http = summary
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("HTTP"))
        .map(|rest| rest.trim_start().trim_start_matches("http://"))
        .and_then(|a| a.split([' ', '/']).next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP address in the summary:\n{summary}"));
    (proc, http)
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

/// "Total lost packets N" and "tot_send_msgs=S, tot_recv_msgs=R" from uclient's summary.
fn totals(out: &str) -> Option<(u64, u64, u64)> {
    let lost_line = out
        .lines()
        .rev()
        .find(|l| l.contains("Total lost packets"))?;
    let lost = lost_line
        .split("Total lost packets")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let tot = out.lines().rev().find(|l| l.contains("tot_send_msgs"))?;
    let num = |key: &str| -> Option<u64> {
        tot.split(key)
            .nth(1)?
            .trim_start_matches([' ', '=', ':'])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((lost, num("tot_send_msgs")?, num("tot_recv_msgs")?))
}

#[test]
fn uclient_over_dtls_zero_loss() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("kyuu-dtls-interop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let peer_port = free_udp_tcp_port();
    let _peer = Proc(
        Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let dtls_port = free_udp_tcp_port();
    let (_kyuu, http) = serve(&dir, dtls_port);
    std::thread::sleep(Duration::from_millis(300));

    let mut failures = Vec::new();
    // Default (channels), Send indications, and client-to-client through two allocations.
    for case in [&[][..], &["-s"][..], &["-y"][..]] {
        let mut args: Vec<String> = vec!["-S".into()];
        args.extend(case.iter().map(|s| s.to_string()));
        args.extend(
            [
                "-u",
                "u",
                "-w",
                "p",
                "-p",
                &dtls_port.to_string(),
                "-e",
                "127.0.0.1",
                "-r",
                &peer_port.to_string(),
                "-n",
                "50",
                "-m",
                "4",
                "-l",
                "120",
                "-z",
                "5",
                "127.0.0.1",
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        let child = Command::new("timeout")
            .arg("60")
            .arg("turnutils_uclient")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let o = child.wait_with_output().unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        let t = totals(&out);
        println!("uclient -S {case:?} over DTLS: (lost, sent, received) = {t:?}");
        let ok =
            out.contains("method=DTLS") && t.is_some_and(|(l, s, r)| l == 0 && s > 0 && s == r);
        if !ok {
            failures.push(format!(
                "{case:?}:\n{}",
                out.lines().rev().take(25).collect::<Vec<_>>().join("\n")
            ));
        }
    }
    let metrics = http_get(http, "/metrics");
    let allocs: u64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("kyuu_turn_allocations_total") && l.contains("transport=\"dtls\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    // Three runs of at least four allocations each.
    println!("kyuu_turn_allocations_total{{transport=\"dtls\"}} = {allocs}");
    assert!(
        allocs >= 12,
        "kyuu_turn_allocations_total{{transport=\"dtls\"}} = {allocs}"
    );
}
