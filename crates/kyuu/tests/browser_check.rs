//! The STUN/TURN check page (`/check`, like Trickle ICE) in headless Chromium against the real
//! `kyuu serve`: the page fetches `/v1/ice-servers` (kyuu's STUN URL and its TURN URLs with REST
//! credentials), gathers candidates against each server, and must report a `srflx` candidate
//! from kyuu's STUN server, a `relay` candidate on kyuu's relay address from its TURN server,
//! and a verdict saying the servers work.
//!
//! Chromium drops a server-reflexive candidate equal to its host candidate, so a srflx only
//! appears behind a NAT: everything runs in a fresh network namespace with a veth pair
//! (198.18.77.1/24 for kyuu, 198.18.77.2/24) and an nftables rule that source-NATs every UDP
//! packet to kyuu's STUN/TURN port to 198.18.77.2 ports 40000-40999, so the mapped address
//! differs from every host candidate.
//!
//! The browser driver is kyuu-signal's `tests/browser/check.mjs` (playwright-core). It leaves a
//! full-page screenshot in the temp dir (`kyuu-check.png`) for a person to look at.
//!
//! `call_page_over_https_and_wss`: the call page loaded from kyuu's HTTPS listener
//! (`http.tls_listen`, self-signed certificate accepted by the browser), so signaling runs over
//! `wss://`; two browser profiles find each other by name and open a data channel.
//!
//! Needs root, `ip`, `nft`, node and /usr/bin/chromium (or `KYUU_CHROMIUM`): SKIP otherwise, a
//! failure with `KYUU_BROWSER_REQUIRED=1`. The namespace (with its nftables table), its
//! processes and the temp dir are removed on every path (Drop guard; processes killed by PID).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

mod support;
use support::*;

const HTTPS_PORT: u16 = 8443;

/// Source-NAT for the STUN/TURN port (see the module docs).
fn add_nat(ns: &Netns) -> Result<(), String> {
    let rules = format!(
        "table ip kyuu_check {{\n\
         \tchain post {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip daddr {SERVER_IP} udp dport {TURN_PORT} snat to {OTHER_IP}:40000-40999\n\
         \t}}\n\
         }}\n"
    );
    let path = ns.dir.join("nat.nft");
    std::fs::write(&path, rules).map_err(|e| e.to_string())?;
    let mut cmd = ns.command("nft");
    cmd.arg("-f").arg(&path);
    match run_bounded(cmd, &ns.dir, "nft", Duration::from_secs(10)) {
        (Some(s), _, _) if s.success() => Ok(()),
        (s, out, err) => Err(format!("nft -f: {s:?} {out}{err}")),
    }
}

fn write_config(ns: &Netns, https: bool) -> PathBuf {
    let (min, max) = RELAY_PORTS;
    let tls_listen = if https {
        format!("tls_listen = \"{SERVER_IP}:{HTTPS_PORT}\"\n")
    } else {
        String::new()
    };
    let text = format!(
        "[listen]\n\
         udp = [\"{SERVER_IP}:{TURN_PORT}\"]\n\
         tcp = [\"{SERVER_IP}:{TURN_PORT}\"]\n\
         tls = []\n\
         threads = 1\n\
         \n\
         [turn]\n\
         realm = \"kyuu-check\"\n\
         relay_ipv4 = \"{SERVER_IP}\"\n\
         relay_ports = {{ min = {min}, max = {max} }}\n\
         \n\
         [http]\n\
         listen = \"{SERVER_IP}:{HTTP_PORT}\"\n\
         {tls_listen}\
         \n\
         [log]\n\
         ansi = false\n"
    );
    let path = ns.dir.join("kyuu.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn check_page_reports_srflx_and_relay_from_kyuu() {
    const TEST: &str = "check_page_reports_srflx_and_relay_from_kyuu";
    if let Err(e) = prerequisites("check.mjs") {
        skip(TEST, &e);
        return;
    }
    if !quiet_ok("nft", &["--version"]) {
        skip(TEST, "no `nft` (nftables)");
        return;
    }
    let mut ns = match Netns::create("check", "page") {
        Ok(ns) => ns,
        Err(e) => {
            skip(TEST, &format!("cannot build the network namespace: {e}"));
            return;
        }
    };
    if let Err(e) = add_nat(&ns) {
        skip(TEST, &format!("cannot add the NAT rule: {e}"));
        return;
    }
    // No secret configured: kyuu generates one, and the page gets credentials from
    // /v1/ice-servers like any browser.
    let config = write_config(&ns, false);
    start_kyuu(&mut ns, &config);
    let ice = http_get(
        &ns,
        &format!("http://{SERVER_IP}:{HTTP_PORT}/v1/ice-servers"),
    )
    .unwrap();
    println!("/v1/ice-servers: {ice}");

    let shot = std::env::temp_dir().join("kyuu-check.png");
    let _ = std::fs::remove_file(&shot);
    let mut cmd = ns.command("node");
    cmd.arg("check.mjs")
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/check"))
        .arg(&shot)
        .current_dir(driver_dir())
        .env("KYUU_CHECK_TIMEOUT_MS", "40000")
        .env("KYUU_CHROMIUM", chromium());
    let (status, out, err) = run_bounded(cmd, &ns.dir, "check", Duration::from_secs(70));
    let Some(line) = out.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!(
            "check.mjs printed no RESULT (status {status:?}):\n{out}\n{err}\nkyuu log:\n{}",
            ns.server_log()
        );
    };
    let result: Value = serde_json::from_str(line).unwrap();
    println!("screenshot: {}", shot.display());
    let servers = result["servers"].as_array().cloned().unwrap_or_default();
    for s in &servers {
        let cands: Vec<String> = s["candidates"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        format!(
                            "{} {}:{} {}",
                            c["type"], c["address"], c["port"], c["protocol"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{}: ok {} candidates {cands:?} errors {}",
            s["urls"], s["ok"], s["errors"]
        );
    }
    println!("verdict: {}", result["verdict"]);
    let diag = || format!("{result}\nstderr:\n{err}\nkyuu log:\n{}", ns.server_log());

    let has = |turn: bool, typ: &str, check: &dyn Fn(&Value) -> bool| {
        servers.iter().filter(|s| s["isTurn"] == turn).any(|s| {
            s["candidates"]
                .as_array()
                .is_some_and(|a| a.iter().any(|c| c["type"] == typ && check(c)))
        })
    };
    // srflx from kyuu's STUN: the NATed address, which no host candidate has.
    assert!(
        has(false, "srflx", &|c| c["address"] == OTHER_IP
            && c["port"]
                .as_str()
                .and_then(|p| p.parse::<u16>().ok())
                .is_some_and(|p| (40000..=40999).contains(&p))),
        "no srflx candidate from kyuu's STUN server: {}",
        diag()
    );
    // relay from kyuu's TURN: an address in kyuu's relay range.
    assert!(
        has(true, "relay", &|c| c["address"] == SERVER_IP
            && c["port"]
                .as_str()
                .and_then(|p| p.parse::<u16>().ok())
                .is_some_and(
                    |p| (RELAY_PORTS.0..=RELAY_PORTS.1).contains(&p)
                )),
        "no relay candidate from kyuu's TURN server: {}",
        diag()
    );
    assert_eq!(
        result["ok"],
        true,
        "the page's verdict is not ok: {}",
        diag()
    );
    let verdict = result["verdict"].as_str().unwrap_or_default();
    assert!(
        verdict.contains("All servers work"),
        "verdict {verdict:?}: {}",
        diag()
    );
    assert!(
        verdict.contains("STUN works") && verdict.contains("TURN works"),
        "verdict {verdict:?}"
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "check.mjs exited {status:?}"
    );
}

#[test]
fn call_page_over_https_and_wss() {
    const TEST: &str = "call_page_over_https_and_wss";
    if let Err(e) = prerequisites("check.mjs") {
        skip(TEST, &e);
        return;
    }
    let mut ns = match Netns::create("check", "wss") {
        Ok(ns) => ns,
        Err(e) => {
            skip(TEST, &format!("cannot build the network namespace: {e}"));
            return;
        }
    };
    let config = write_config(&ns, true);
    start_kyuu(&mut ns, &config);
    let mut cmd = ns.command("node");
    cmd.arg("e2e.mjs")
        .arg(format!("https://{SERVER_IP}:{HTTPS_PORT}/"))
        .current_dir(driver_dir())
        .env("KYUU_E2E_INSECURE", "1")
        .env("KYUU_E2E_TIMEOUT_MS", "30000")
        .env("KYUU_CHROMIUM", chromium());
    let (status, out, err) = run_bounded(cmd, &ns.dir, "e2e", Duration::from_secs(100));
    let Some(line) = out.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
        panic!(
            "e2e.mjs printed no RESULT (status {status:?}):\n{out}\n{err}\nkyuu log:\n{}",
            ns.server_log()
        );
    };
    let result: Value = serde_json::from_str(line).unwrap();
    println!("over https/wss: {result}");
    assert_eq!(
        result["ok"],
        true,
        "call over https/wss failed: {result}\n{err}\nkyuu log:\n{}",
        ns.server_log()
    );
}
