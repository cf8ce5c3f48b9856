#![allow(clippy::unwrap_used)]
//! End-to-end in a real browser: the system Chromium, driven by playwright-core from
//! `tests/browser/e2e.mjs`, loads the call page in two separate profiles; they find each other
//! by name through the directory and open a data channel through kyuu's signaling.
//!
//! * Chromium missing: SKIP, or a failure when `KYUU_BROWSER_REQUIRED=1` (CI sets it).
//! * `KYUU_TEST_TURN_URL` (+ `KYUU_TEST_TURN_SECRET`) set: ICE is relay-only through that TURN
//!   server, with credentials from kyuu's IceProvider; otherwise host candidates.
//! * No non-loopback interface with an address (Chromium gathers no candidates then), or
//!   `KYUU_TEST_FORCE_NETNS=1`: the server and Chromium run in a fresh network namespace with a
//!   dummy interface on 198.18.5.1/24, torn down afterwards.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kyuu_signal::{IceProvider, SignalConfig};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn required() -> bool {
    std::env::var("KYUU_BROWSER_REQUIRED").is_ok_and(|v| v == "1")
}

/// Prints SKIP, or panics if the browser test is required.
fn skip(why: &str) {
    assert!(!required(), "browser test required but cannot run: {why}");
    println!("SKIP browser_e2e: {why}");
}

fn command_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn ensure_node_modules() -> Result<(), String> {
    let dir = browser_dir();
    if dir.join("node_modules/playwright-core").exists() {
        return Ok(());
    }
    let verb = if dir.join("package-lock.json").exists() {
        "ci"
    } else {
        "install"
    };
    let status = Command::new("npm")
        .arg(verb)
        .args(["--no-audit", "--no-fund"])
        .current_dir(&dir)
        // playwright-core downloads nothing, but make sure no browser is ever fetched.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .status()
        .map_err(|e| format!("npm: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("npm {verb} failed: {status}"))
    }
}

/// Whether some interface other than loopback is up with a global address.
fn has_routable_interface() -> bool {
    let Ok(out) = Command::new("ip")
        .args(["-o", "addr", "show", "up"])
        .output()
    else {
        return true; // cannot tell; let Chromium try
    };
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        let mut f = l.split_whitespace();
        let ifname = f.nth(1).unwrap_or("");
        ifname != "lo" && l.contains("scope global")
    })
}

fn turn_from_env() -> Option<(String, String)> {
    let url = std::env::var("KYUU_TEST_TURN_URL").ok()?;
    let secret = std::env::var("KYUU_TEST_TURN_SECRET").unwrap_or_default();
    Some((url, secret))
}

fn run_node(prefix: &[&str], url: &str, relay: bool) -> serde_json::Value {
    let mut cmd = if let Some((first, rest)) = prefix.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg("node");
        c
    } else {
        Command::new("node")
    };
    cmd.arg("e2e.mjs")
        .arg(url)
        .current_dir(browser_dir())
        .env("KYUU_E2E_RELAY", if relay { "1" } else { "0" })
        .stderr(Stdio::inherit());
    let out = cmd.output().expect("running node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("e2e.mjs printed no RESULT (exit {})", out.status));
    serde_json::from_str(line).unwrap()
}

fn check(result: &serde_json::Value, relay: bool) {
    assert_eq!(result["ok"], true, "browser e2e failed: {result}");
    let path = &result["bob"]["path"];
    println!(
        "browser e2e: data channel open, path {} <-> {}, ICE RTT {} s, data channel RTT {} ms",
        path["local"], path["remote"], path["rtt"], result["bob"]["appRttMs"]
    );
    if relay {
        for who in ["alice", "bob"] {
            let p = &result[who]["path"];
            assert!(
                p["local"] == "relay" && p["remote"] == "relay",
                "{who}: relay-only run must select a relay/relay pair: {result}"
            );
        }
    }
}

#[test]
fn browser_e2e() {
    let chromium = std::env::var("KYUU_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !Path::new(&chromium).exists() {
        return skip(&format!("{chromium} not found (apt-get install chromium)"));
    }
    if !command_ok("node", &["--version"]) {
        return skip("node not found");
    }
    if let Err(e) = ensure_node_modules() {
        return skip(&e);
    }
    let turn = turn_from_env();
    let relay = turn.is_some();
    let force_netns = std::env::var("KYUU_TEST_FORCE_NETNS").is_ok_and(|v| v == "1");
    if has_routable_interface() && !force_netns {
        in_process(turn, relay);
    } else {
        in_netns(turn, relay);
    }
}

fn in_process(turn: Option<(String, String)>, relay: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ice = match turn {
        Some((url, secret)) => IceProvider {
            turn_urls: vec![url],
            rest_secret: Some(secret),
            ttl: Duration::from_secs(600),
            ..IceProvider::default()
        },
        None => IceProvider::default(),
    };
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(kyuu_signal::serve_listener(
        listener,
        SignalConfig::default(),
        ice,
    ));
    let result = run_node(&[], &format!("http://{addr}/"), relay);
    check(&result, relay);
}

/// A network namespace with a dummy interface; removed (with its processes) on drop.
struct Netns {
    name: String,
    server: Option<Child>,
}

impl Netns {
    fn create() -> Result<Netns, String> {
        let name = format!("kyuu-sig-{}", std::process::id());
        let ns = Netns { name, server: None };
        let n = ns.name.as_str();
        let run = |steps: &[&[&str]]| -> Result<(), String> {
            for args in steps {
                if !command_ok("ip", args) {
                    return Err(format!("ip {} failed (needs root)", args.join(" ")));
                }
            }
            Ok(())
        };
        run(&[&["netns", "add", n], &["-n", n, "link", "set", "lo", "up"]])?;
        // A dummy interface where the kernel has the module, else a veth pair kept inside.
        if command_ok("ip", &["-n", n, "link", "add", "d0", "type", "dummy"]) {
            run(&[
                &["-n", n, "addr", "add", "198.18.5.1/24", "dev", "d0"],
                &["-n", n, "link", "set", "d0", "up"],
            ])?;
        } else {
            run(&[
                &[
                    "-n", n, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
                ],
                &["-n", n, "addr", "add", "198.18.5.1/24", "dev", "d0"],
                &["-n", n, "addr", "add", "198.18.5.2/24", "dev", "d1"],
                &["-n", n, "link", "set", "d0", "up"],
                &["-n", n, "link", "set", "d1", "up"],
            ])?;
        }
        Ok(ns)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill(); // by PID: `ip netns exec` execs the server in place
            let _ = c.wait();
        }
        let _ = command_ok("ip", &["netns", "del", &self.name]);
    }
}

fn in_netns(turn: Option<(String, String)>, relay: bool) {
    let mut ns = match Netns::create() {
        Ok(ns) => ns,
        Err(e) => return skip(&format!("no routable interface and no netns: {e}")),
    };
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &ns.name,
        env!("CARGO_BIN_EXE_kyuu-signal-bench"),
    ])
    .args(["serve", "127.0.0.1:0"])
    .stdout(Stdio::piped())
    .stderr(Stdio::inherit());
    if let Some((url, secret)) = &turn {
        cmd.env("KYUU_TURN_URLS", url)
            .env("KYUU_TURN_SECRET", secret);
    }
    let mut child = cmd.spawn().expect("spawning server in netns");
    let stdout = child.stdout.take().unwrap();
    ns.server = Some(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("LISTENING ")
        .expect("server address")
        .to_owned();
    let name = ns.name.clone();
    let result = run_node(
        &["ip", "netns", "exec", &name],
        &format!("http://{addr}/"),
        relay,
    );
    println!("browser e2e ran in network namespace {name} (198.18.5.0/24)");
    check(&result, relay);
}
