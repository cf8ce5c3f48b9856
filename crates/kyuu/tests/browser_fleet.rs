//! Chromium across a fleet: two real `kyuu serve` nodes sharing a real `redis-server`, all in one
//! network namespace (198.18.77.1, as in browser_relay.rs). Alice's headless Chromium loads the
//! demo page from node A, Bob's from node B; they find each other by name through the fleet's
//! directory and open a relay-only (`iceTransportPolicy: 'relay'`) data channel. Node A is made
//! the busier one first (coturn's `turnutils_uclient` leaves allocations on it), so provisioning
//! hands out node B's TURN URLs on both nodes: both relay candidates must be node B's.
//!
//! Needs root, `ip`, node, /usr/bin/chromium, `redis-server` and `turnutils_uclient`: SKIP
//! otherwise, a failure with `KYUU_BROWSER_REQUIRED=1`. Everything started is killed by PID
//! (the namespace guard kills whatever is left in it).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::*;

const SECRET: &str = "browser-fleet-secret";
const REDIS_PORT: u16 = 6390;
const B_TURN: u16 = 3480;
const B_HTTP: u16 = 8081;
const B_RELAY: (u16, u16) = (50500, 50999);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn config(ns: &Netns, name: &str, turn: u16, http: u16, relay: (u16, u16)) -> PathBuf {
    // strict_channel_numbers = false: RFC 5766 compatibility for coturn 4.6.1's uclient, which
    // binds channel numbers above 0x4FFF (RFC 8656 §12).
    let text = format!(
        "[listen]\nudp = [\"{SERVER_IP}:{turn}\"]\ntcp = [\"{SERVER_IP}:{turn}\"]\ntls = []\n\
         threads = 1\n\
         [turn]\nrealm = \"kyuu-fleet\"\nstatic_auth_secrets = [\"{SECRET}\"]\n\
         strict_channel_numbers = false\n\
         relay_ipv4 = \"{SERVER_IP}\"\nrelay_ports = {{ min = {}, max = {} }}\n\
         allow_peers = [\"198.18.0.0/15\"]\nuser_quota = 0\nclient_quota = 0\n\
         [http]\nlisten = \"{SERVER_IP}:{http}\"\n\
         [signal]\nmint_rate_per_min = 0\n\
         [fleet]\nredis_url = \"redis://127.0.0.1:{REDIS_PORT}/\"\nnode = \"{name}\"\n\
         region = \"lab\"\npeer_ttl_secs = 4\nheartbeat_secs = 1\n\
         public_http = \"http://{SERVER_IP}:{http}\"\n\
         [log]\nlevel = \"info\"\nansi = false\n",
        relay.0, relay.1
    );
    let path = ns.dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// The TURN URLs `/v1/ice-servers` of the node on `http` hands out.
fn turn_urls(ns: &Netns, http: u16) -> String {
    let body =
        http_get(ns, &format!("http://{SERVER_IP}:{http}/v1/ice-servers")).unwrap_or_default();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    v.as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["username"].is_string())
        .flat_map(|s| s["urls"].as_array().cloned().unwrap_or_default())
        .filter_map(|u| u.as_str().map(str::to_owned))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn call_across_two_nodes_relayed_by_the_provisioned_node() {
    let test = "call_across_two_nodes_relayed_by_the_provisioned_node";
    if let Err(e) = prerequisites("e2e.mjs") {
        skip(test, &e);
        return;
    }
    for tool in ["redis-server", "turnutils_uclient"] {
        if !quiet_ok("sh", &["-c", &format!("command -v {tool}")]) {
            skip(test, &format!("{tool} not installed"));
            return;
        }
    }
    let mut ns = match Netns::create("fleet", "call") {
        Ok(ns) => ns,
        Err(e) => {
            skip(test, &format!("cannot build the network namespace: {e}"));
            return;
        }
    };
    let redis = Killed(
        ns.command("redis-server")
            .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let a_cfg = config(&ns, "a", TURN_PORT, HTTP_PORT, (50000, 50499));
    let b_cfg = config(&ns, "b", B_TURN, B_HTTP, B_RELAY);
    start_kyuu(&mut ns, &a_cfg);
    let b = Killed(
        ns.command(KYUU)
            .arg("serve")
            .arg("--config")
            .arg(&b_cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(ns.dir.join("b.log")).unwrap())
            .spawn()
            .unwrap(),
    );

    // Make A the busier node: uclient's allocations stay until they expire.
    let (user, pass) = kyuu_turn::rest_credentials(SECRET, "load", unix_now(), 600);
    let mut uc = ns.command("turnutils_uclient");
    uc.args(["-u", &user, "-w", &pass, "-p", &TURN_PORT.to_string()])
        .args([
            "-e", OTHER_IP, "-r", "3999", "-n", "1", "-m", "2", "-z", "5", SERVER_IP,
        ]);
    let _ = run_bounded(uc, &ns.dir, "uclient", Duration::from_secs(60));

    let b_port = format!(":{B_TURN}?");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (ua, ub) = (turn_urls(&ns, HTTP_PORT), turn_urls(&ns, B_HTTP));
        if ua.contains(&b_port) && ub.contains(&b_port) {
            println!("provisioning: A hands out {ua}; B hands out {ub}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "provisioning never chose B (A: {ua}; B: {ub})\nA log:\n{}",
            ns.server_log()
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    let mut cmd = ns.command("node");
    cmd.arg("e2e.mjs")
        .arg(format!("http://{SERVER_IP}:{HTTP_PORT}/"))
        .current_dir(driver_dir())
        .env("KYUU_E2E_RELAY", "1")
        .env("KYUU_E2E_BASE_BOB", format!("http://{SERVER_IP}:{B_HTTP}/"))
        .env("KYUU_E2E_TIMEOUT_MS", "30000")
        .env("KYUU_CHROMIUM", chromium());
    let (status, out, err) = run_bounded(cmd, &ns.dir, "e2e", Duration::from_secs(100));
    let line = out.lines().find_map(|l| l.strip_prefix("RESULT "));
    let result: Value = line
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    assert_eq!(
        result["ok"], true,
        "cross-node relay-only call failed (status {status:?}): {out}\n{err}\nA log:\n{}\nB log:\n{}",
        ns.server_log(),
        std::fs::read_to_string(ns.dir.join("b.log")).unwrap_or_default()
    );
    for who in ["alice", "bob"] {
        let path = &result[who]["path"];
        println!("{who}: {path}");
        for side in ["localAddress", "remoteAddress"] {
            let addr = path[side].as_str().unwrap_or_default();
            let port: u16 = addr
                .strip_prefix(&format!("{SERVER_IP}:"))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{who} {side} {addr} is not a kyuu relay address"));
            assert!(
                (B_RELAY.0..=B_RELAY.1).contains(&port),
                "{who} {side} {addr} is not node B's relay (provisioning chose B)"
            );
        }
    }
    let text = http_get(&ns, &format!("http://{SERVER_IP}:{B_HTTP}/metrics")).unwrap();
    let relayed = metric(&text, "kyuu_turn_relayed_bytes_total", &[]);
    println!("node B kyuu_turn_relayed_bytes_total {relayed}");
    assert!(relayed > 0.0, "node B relayed nothing");
    drop(b);
    drop(redis);
}
