//! RFC 6062 relayed bytes appear in `kyuu_turn_relayed_*` like UDP relaying: coturn's
//! `turnutils_uclient -T` relays over TCP through kyuu, and the Prometheus rendering then holds
//! the spliced bytes. Its own test binary, so no UDP-relay run in the same process (whose client
//! may also be TCP) can account for them. Skips with a SKIP line when coturn is not installed,
//! unless KYUU_INTEROP_REQUIRED=1.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kyuu_server::relay::Transport;
use kyuu_server::relay::{self, ListenConfig};
use kyuu_turn::TurnConfig;

mod common;
use common::have;

/// The value of a counter line `name{labels} value` whose labels contain every `want`.
fn counter(text: &str, name: &str, want: &[&str]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && want.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

#[tokio::test]
async fn rfc6062_relayed_bytes_are_counted() {
    if !have("turnutils_uclient") || !have("turnutils_peer") {
        return;
    }
    let prom = kyuu_server::metrics::install().expect("recorder");
    let peer_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _peer = tokio::process::Command::new("turnutils_peer")
        .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cfg = TurnConfig {
        users: vec![kyuu_turn::UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        realm: "kyuu.test".into(),
        relay_ipv4: Some("127.0.0.1".parse().unwrap()),
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        // RFC 5766 compatibility for coturn 4.6.1's uclient (channel numbers above 0x4FFF).
        strict_channel_numbers: false,
        ..Default::default()
    };
    let l = ListenConfig {
        threads: 1,
        ..ListenConfig::on(&["127.0.0.1:0".parse().unwrap()], &[])
    };
    let h = relay::start(&l, cfg, None).await.unwrap();
    let port = h.addr(Transport::Tcp).unwrap().port().to_string();
    let peer = peer_port.to_string();
    let args = [
        "-T",
        "-u",
        "u",
        "-w",
        "p",
        "-p",
        &port,
        "-e",
        "127.0.0.1",
        "-r",
        &peer,
        "-n",
        "20",
        "-m",
        "1",
        "-l",
        "120",
        "-z",
        "5",
        "127.0.0.1",
    ];
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new("turnutils_uclient")
            .args(args)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    h.shutdown().await;
    let m = prom.render();
    let to_peer = counter(
        &m,
        "kyuu_turn_relayed_bytes_total",
        &["direction=\"to_peer\"", "transport=\"tcp\""],
    );
    let to_client = counter(
        &m,
        "kyuu_turn_relayed_bytes_total",
        &["direction=\"to_client\"", "transport=\"tcp\""],
    );
    println!("to_peer={to_peer} to_client={to_client}");
    // 20 messages of 120 bytes each way, at least.
    assert!(to_peer >= 20 * 120, "to_peer={to_peer}\n{m}\n{text}");
    assert!(to_client >= 20 * 120, "to_client={to_client}\n{m}\n{text}");
}
