//! End to end through the real `kyuu serve` binary: headless Chromium (the system one, never a
//! downloaded one) loads kyuu's demo page in two separate browser profiles; they find each other
//! by name through kyuu's signaling and open an RTCDataChannel with `iceTransportPolicy: 'relay'`,
//! so every byte has to go through kyuu's TURN server.
//!
//! * `relay_only_data_channel_through_kyuu`: with `turn.allow_peers = ["198.18.0.0/15"]` the
//!   channel opens, both sides exchange messages, getStats' selected candidate pair is
//!   relay/relay on both sides, `/v1/ice-servers` hands out valid TURN REST credentials, and
//!   `/metrics` shows relayed bytes in both directions.
//! * `relay_only_refused_without_allow_list`: the negative control. Without the allow-list the
//!   TURN server refuses the peers (198.18.0.0/15 is the benchmarking range, denied by default),
//!   so the same relay-only call must fail within a bounded time, with forbidden peers counted.
//!
//! Chromium gathers no candidates without a non-loopback interface, so each test runs kyuu,
//! node and Chromium inside a fresh network namespace with a veth pair (198.18.77.1/24 and
//! 198.18.77.2/24, both ends inside). kyuu listens on and relays from 198.18.77.1.
//!
//! The browser driver is kyuu-signal's `tests/browser/e2e.mjs` (playwright-core), run from its
//! directory (`npm ci` there when `node_modules` is missing).
//!
//! Needs root, `ip`, node and /usr/bin/chromium (or `KYUU_CHROMIUM`): SKIP otherwise, a failure
//! with `KYUU_BROWSER_REQUIRED=1`. The namespace, its processes and the temp dir are removed on
//! every path (Drop guard; processes are killed by PID).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::*;

const CREDENTIAL_TTL: u64 = 600;

/// Two Chromiums per test on a shared machine: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn write_config(ns: &Netns, secret: &str, allow_benchmarking: bool) -> PathBuf {
    let allow = if allow_benchmarking {
        "allow_peers = [\"198.18.0.0/15\"]\n"
    } else {
        "# allow_peers left out: the benchmarking range is denied by default\n"
    };
    let (min, max) = RELAY_PORTS;
    let text = format!(
        "[listen]\n\
         udp = [\"{SERVER_IP}:{TURN_PORT}\"]\n\
         tcp = [\"{SERVER_IP}:{TURN_PORT}\"]\n\
         tls = []\n\
         threads = 1\n\
         \n\
         [turn]\n\
         realm = \"kyuu-e2e\"\n\
         static_auth_secrets = [\"{secret}\"]\n\
         relay_ipv4 = \"{SERVER_IP}\"\n\
         relay_ports = {{ min = {min}, max = {max} }}\n\
         {allow}\
         \n\
         [http]\n\
         listen = \"{SERVER_IP}:{HTTP_PORT}\"\n\
         credential_ttl_secs = {CREDENTIAL_TTL}\n\
         \n\
         [log]\n\
         level = \"info,kyuu::turn=debug\"\n\
         ansi = false\n"
    );
    let path = ns.dir.join("kyuu.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `/v1/ice-servers` hands out kyuu's TURN URLs with REST credentials that verify against the
/// configured secret.
fn check_ice_servers(ns: &Netns, secret: &str) {
    let body = http_get(
        ns,
        &format!("http://{SERVER_IP}:{HTTP_PORT}/v1/ice-servers"),
    )
    .unwrap();
    let want = format!("turn:{SERVER_IP}:{TURN_PORT}?transport=udp");
    let (_, urls, username) = support::check_rest_ice_servers(&body, &want, secret, CREDENTIAL_TTL);
    println!("/v1/ice-servers: {urls:?} username {username} (REST credential verified)");
}

/// Runs e2e.mjs (relay-only) in the namespace against kyuu's page; returns its RESULT.
fn run_browsers(ns: &Netns, timeout_ms: u64) -> Value {
    let mut cmd = ns.command("node");
    cmd.arg("e2e.mjs")
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/"))
        .current_dir(driver_dir())
        .env("KYUU_E2E_RELAY", "1")
        .env("KYUU_E2E_TIMEOUT_MS", timeout_ms.to_string())
        .env("KYUU_CHROMIUM", chromium());
    // e2e.mjs waits twice at most timeout_ms plus a 10 s round trip; Chromium start-up on top.
    let limit = Duration::from_millis(2 * timeout_ms) + Duration::from_secs(40);
    let started = Instant::now();
    let (status, out, err) = run_bounded(cmd, &ns.dir, "e2e", limit);
    println!(
        "e2e.mjs exited {status:?} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let Some(line) = out.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!(
            "e2e.mjs printed no RESULT (status {status:?}):\n{out}\n{err}\nkyuu log:\n{}",
            ns.server_log()
        );
    };
    let result: Value = serde_json::from_str(line).unwrap();
    if result["ok"] != true {
        // Browser consoles, for the record (the negative control expects this).
        let tail: Vec<&str> = err.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        println!("e2e.mjs stderr (last lines):\n{}", tail.join("\n"));
    }
    result
}

fn secret() -> String {
    format!("e2e-{}-{}", std::process::id(), unix_now())
}

fn setup(test: &str, tag: &str, allow: bool) -> Option<(Netns, String)> {
    if let Err(e) = prerequisites("e2e.mjs") {
        skip(test, &e);
        return None;
    }
    let mut ns = match Netns::create("e2e", tag) {
        Ok(ns) => ns,
        Err(e) => {
            skip(test, &format!("cannot build the network namespace: {e}"));
            return None;
        }
    };
    let secret = secret();
    let config = write_config(&ns, &secret, allow);
    start_kyuu(&mut ns, &config);
    Some((ns, secret))
}

#[test]
fn relay_only_data_channel_through_kyuu() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((ns, secret)) = setup("relay_only_data_channel_through_kyuu", "relay", true) else {
        return;
    };
    check_ice_servers(&ns, &secret);

    let result = run_browsers(&ns, 30_000);
    assert_eq!(
        result["ok"],
        true,
        "relay-only call through kyuu failed: {result}\nkyuu log:\n{}",
        ns.server_log()
    );
    for who in ["alice", "bob"] {
        let p = &result[who];
        let path = &p["path"];
        println!(
            "{who}: received {} over {} <-> {} ({}) {} <-> {}",
            p["received"],
            path["local"],
            path["remote"],
            path["protocol"],
            path["localAddress"],
            path["remoteAddress"]
        );
        assert_eq!(path["local"], "relay", "{who}: local candidate: {result}");
        assert_eq!(path["remote"], "relay", "{who}: remote candidate: {result}");
        for side in ["localAddress", "remoteAddress"] {
            let addr = path[side].as_str().unwrap_or_default();
            let port: u16 = addr
                .strip_prefix(&format!("{SERVER_IP}:"))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{who} {side} {addr} is not a kyuu relay address"));
            assert!(
                (RELAY_PORTS.0..=RELAY_PORTS.1).contains(&port),
                "{who} {side} {addr} outside turn.relay_ports"
            );
        }
        assert!(
            p["received"].as_array().is_some_and(|r| !r.is_empty()),
            "{who} received nothing: {result}"
        );
    }
    println!("data channel RTT {} ms", result["bob"]["appRttMs"]);

    // The relay really carried the data: relayed bytes in both directions. Counters are
    // flushed on the TURN server's 1 s tick.
    let relayed = |t: &str, dir: &str| {
        metric(
            t,
            "kyuu_turn_relayed_bytes_total",
            &[&format!("direction=\"{dir}\"")],
        )
    };
    let text = wait_metrics(&ns, Duration::from_secs(10), |t| {
        relayed(t, "to_peer") > 0.0 && relayed(t, "to_client") > 0.0
    });
    let (to_peer, to_client) = (relayed(&text, "to_peer"), relayed(&text, "to_client"));
    let allocations = metric(&text, "kyuu_turn_allocations_total", &[]);
    println!(
        "kyuu /metrics: kyuu_turn_relayed_bytes_total to_peer {to_peer} to_client {to_client}, \
         kyuu_turn_allocations_total {allocations}"
    );
    assert!(
        to_peer > 0.0 && to_client > 0.0,
        "no relayed bytes in /metrics:\n{text}"
    );
    assert!(allocations >= 2.0, "fewer than two allocations:\n{text}");
}

#[test]
fn relay_only_refused_without_allow_list() {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((ns, _secret)) = setup("relay_only_refused_without_allow_list", "deny", false) else {
        return;
    };
    let started = Instant::now();
    let result = run_browsers(&ns, 20_000);
    println!(
        "negative control: e2e.mjs RESULT {result} after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        result["ok"], false,
        "relay-only call to peers in 198.18.0.0/15 succeeded without turn.allow_peers: {result}"
    );
    // It failed for the right reason: TURN itself worked (allocations made with the page's
    // credentials) but refused the peers, and relayed nothing.
    let text = wait_metrics(&ns, Duration::from_secs(5), |t| {
        metric(t, "kyuu_turn_forbidden_peers_total", &[]) > 0.0
    });
    let forbidden = metric(&text, "kyuu_turn_forbidden_peers_total", &[]);
    let allocations = metric(&text, "kyuu_turn_allocations_total", &[]);
    let relayed = metric(&text, "kyuu_turn_relayed_bytes_total", &[]);
    println!(
        "kyuu /metrics: kyuu_turn_forbidden_peers_total {forbidden}, \
         kyuu_turn_allocations_total {allocations}, kyuu_turn_relayed_bytes_total {relayed}"
    );
    assert!(
        allocations >= 2.0,
        "TURN allocations did not happen:\n{text}"
    );
    assert!(forbidden > 0.0, "no forbidden peers counted:\n{text}");
    assert!(
        relayed == 0.0,
        "bytes were relayed to a denied peer:\n{text}"
    );
}
