//! Interop with coturn's client tools (turnutils_stunclient, turnutils_uclient, turnutils_peer)
//! against a kyuu server. Skips with a SKIP line when coturn is not installed, unless
//! KYUU_INTEROP_REQUIRED=1.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use kyuu_server::relay::{self, ListenConfig};
use kyuu_turn::TurnConfig;

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

/// Runs a command with a time limit, returning (success, stdout+stderr).
async fn run(cmd: &str, args: &[String], limit: Duration) -> (bool, String) {
    let child = tokio::process::Command::new(cmd)
        .args(args)
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, child).await {
        Ok(Ok(o)) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Ok(Err(e)) => (false, format!("spawn failed: {e}")),
        Err(_) => (false, "timed out".into()),
    }
}

fn free_port_pair() -> (u16, u16) {
    for _ in 0..50 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        drop(s);
        if p > 65000 {
            continue;
        }
        let q = p + 1;
        let ok = ["127.0.0.1", "127.0.0.2"].iter().all(|ip| {
            [p, q].iter().all(|port| {
                std::net::UdpSocket::bind((*ip, *port)).is_ok()
                    && std::net::TcpListener::bind((*ip, *port)).is_ok()
            })
        });
        if ok {
            return (p, q);
        }
    }
    panic!("no free port pair");
}

#[tokio::test]
async fn stunclient_basic_and_rfc5780() {
    if !have("turnutils_stunclient") {
        return;
    }
    let (p, q) = free_port_pair();
    let cfg = ListenConfig {
        udp: vec![SocketAddr::from(([127, 0, 0, 1], p))],
        tcp: vec![],
        tls: vec![],
        alt_ip: Some("127.0.0.2".parse().unwrap()),
        alt_port: Some(q),
        threads: 1,
        ..Default::default()
    };
    let h = relay::start(&cfg, TurnConfig::default(), None)
        .await
        .unwrap();
    let (ok, out) = run(
        "turnutils_stunclient",
        &["-p".into(), p.to_string(), "127.0.0.1".into()],
        Duration::from_secs(10),
    )
    .await;
    println!("{out}");
    assert!(ok, "stunclient failed: {out}");
    assert!(out.contains("UDP reflexive addr: 127.0.0.1:"), "{out}");
    let (ok, out) = run(
        "turnutils_stunclient",
        &["-f".into(), "-p".into(), p.to_string(), "127.0.0.1".into()],
        Duration::from_secs(20),
    )
    .await;
    println!("{out}");
    assert!(ok, "stunclient -f failed: {out}");
    assert!(
        out.contains("127.0.0.2"),
        "OTHER-ADDRESS not reported: {out}"
    );
    h.shutdown().await;
}
