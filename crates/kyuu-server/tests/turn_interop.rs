//! Interop with coturn's client tools (turnutils_stunclient, turnutils_uclient, turnutils_peer)
//! against a kyuu server. Skips with a SKIP line when coturn is not installed, unless
//! KYUU_INTEROP_REQUIRED=1.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

mod common;
use common::{free_port_pair, have};

use kyuu_server::relay::Transport;
use kyuu_server::relay::{self, ListenConfig};
use kyuu_turn::TurnConfig;

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

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Peer(tokio::process::Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

/// Starts coturn's echo peer on 127.0.0.1.
async fn start_peer() -> (Peer, u16) {
    let port = free_udp_port();
    let child = tokio::process::Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    (Peer(child), port)
}

fn turn_config(allow_loopback: bool) -> TurnConfig {
    TurnConfig {
        users: vec![kyuu_turn::UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        static_auth_secrets: vec!["rest-secret".into()],
        realm: "kyuu.test".into(),
        relay_ipv4: Some("127.0.0.1".parse().unwrap()),
        allow_peers: if allow_loopback {
            vec!["127.0.0.0/8".parse().unwrap()]
        } else {
            vec![]
        },
        unauth_rate: 0,
        // Every uclient run comes from 127.0.0.1 as user "u" and leaves its allocations to
        // expire; the quotas (tested in kyuu-turn) would count them all.
        user_quota: 0,
        client_quota: 0,
        // RFC 5766 compatibility: coturn 4.6.1's uclient binds channel numbers above 0x4FFF.
        strict_channel_numbers: false,
        ..Default::default()
    }
}

async fn kyuu(allow_loopback: bool) -> relay::RelayHandle {
    let l = ListenConfig {
        threads: 2,
        ..ListenConfig::on(
            &["127.0.0.1:0".parse().unwrap()],
            &["127.0.0.1:0".parse().unwrap()],
        )
    };
    relay::start(&l, turn_config(allow_loopback), None)
        .await
        .unwrap()
}

/// "Total lost packets N (x%)" from uclient's summary.
fn lost(out: &str) -> Option<u64> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("Total lost packets"))?;
    let after = line.split("Total lost packets").nth(1)?;
    after.split_whitespace().next()?.parse().ok()
}

fn sent_and_received(out: &str) -> Option<(u64, u64)> {
    let line = out
        .lines()
        .rev()
        .find(|l| l.contains("Total transmit time"))?;
    let _ = line;
    let tot = out.lines().rev().find(|l| l.contains("tot_send_msgs"))?;
    let num = |key: &str| -> Option<u64> {
        let rest = tot.split(key).nth(1)?;
        rest.trim_start_matches([' ', '=', ':'])
            .split(|c: char| !c.is_ascii_digit())
            .next()?
            .parse()
            .ok()
    };
    Some((num("tot_send_msgs")?, num("tot_recv_msgs")?))
}

async fn uclient(h: &relay::RelayHandle, peer_port: u16, extra: &[&str]) -> String {
    let secure = extra.contains(&"-S");
    let tcp = extra.contains(&"-t") || extra.contains(&"-T");
    let port = if secure {
        h.addr(Transport::Tls).unwrap().port()
    } else if tcp {
        h.addr(Transport::Tcp).unwrap().port()
    } else {
        h.addr(Transport::Udp).unwrap().port()
    };
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if !extra.contains(&"-W") {
        args.extend(["-u".into(), "u".into(), "-w".into(), "p".into()]);
    }
    args.extend([
        "-p".into(),
        port.to_string(),
        "-e".into(),
        "127.0.0.1".into(),
        "-r".into(),
        peer_port.to_string(),
        "-n".into(),
        "50".into(),
        "-m".into(),
        "4".into(),
        "-l".into(),
        "120".into(),
        "-z".into(),
        "5".into(),
        "127.0.0.1".into(),
    ]);
    let (_, out) = run("turnutils_uclient", &args, Duration::from_secs(60)).await;
    out
}

#[tokio::test]
async fn uclient_matrix_zero_loss() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        return;
    }
    let (_peer, peer_port) = start_peer().await;
    let h = kyuu(true).await;
    let only = std::env::var("KYUU_UCLIENT_CASE").ok();
    let cases: &[&[&str]] = &[
        &[],
        &["-s"],
        &["-y"],
        &["-t"],
        &["-t", "-s"],
        &["-t", "-y"],
        &["-S", "-t"],
        &["-S", "-t", "-y"],
        &["-W", "rest-secret"],
        &["-T"],
    ];
    let mut failures = Vec::new();
    for case in cases {
        if only.as_deref().is_some_and(|o| o != case.join(" ")) {
            continue;
        }
        let out = uclient(&h, peer_port, case).await;
        let l = lost(&out);
        let sr = sent_and_received(&out);
        println!("uclient {case:?}: lost={l:?} sent/recv={sr:?}");
        if std::env::var("KYUU_DEBUG_UCLIENT").is_ok() {
            println!("{out}");
        }
        let ok = l == Some(0) && sr.is_some_and(|(s, r)| s > 0 && s == r);
        if !ok {
            failures.push(format!(
                "{case:?}:\n{}",
                out.lines().rev().take(25).collect::<Vec<_>>().join("\n")
            ));
        }
    }
    h.shutdown().await;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test]
async fn uclient_loopback_peer_refused_without_allow_list() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        return;
    }
    let (_peer, peer_port) = start_peer().await;
    let h = kyuu(false).await;
    let out = uclient(&h, peer_port, &[]).await;
    h.shutdown().await;
    assert!(
        out.contains("403"),
        "expected 403 Forbidden for a loopback peer:\n{out}"
    );
    assert_ne!(
        lost(&out),
        Some(0),
        "nothing may be relayed to a loopback peer:\n{out}"
    );
}
