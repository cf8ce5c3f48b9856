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

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");
const SERVER_IP: &str = "198.18.77.1";
const OTHER_IP: &str = "198.18.77.2";
const TURN_PORT: u16 = 3478;
const HTTP_PORT: u16 = 8080;
const HTTPS_PORT: u16 = 8443;
const RELAY_PORTS: (u16, u16) = (50000, 50999);

fn required() -> bool {
    std::env::var("KYUU_BROWSER_REQUIRED").is_ok_and(|v| v == "1")
}

/// Prints SKIP, or panics if the browser test is required.
fn skip(test: &str, why: &str) {
    assert!(!required(), "browser test required but cannot run: {why}");
    println!("SKIP {test}: {why}");
}

fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kyuu-signal/tests/browser")
}

fn chromium() -> String {
    std::env::var("KYUU_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn quiet_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn prerequisites() -> Result<(), String> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .map_err(|e| format!("id -u: {e}"))?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Err("not root (network namespaces need it)".into());
    }
    if !quiet_ok("ip", &["-V"]) {
        return Err("no `ip` (iproute2)".into());
    }
    let chromium = chromium();
    if !Path::new(&chromium).exists() {
        return Err(format!("{chromium} not found (apt-get install chromium)"));
    }
    if !quiet_ok("node", &["--version"]) {
        return Err("node not found".into());
    }
    let dir = driver_dir();
    if !dir.join("check.mjs").exists() {
        return Err(format!("{} missing", dir.join("check.mjs").display()));
    }
    if dir.join("node_modules/playwright-core").exists() {
        return Ok(());
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        // playwright-core downloads nothing, but make sure no browser is ever fetched.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .status()
        .map_err(|e| format!("npm: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("npm ci in {} failed: {status}", dir.display()))
    }
}

/// Kills one process by PID.
fn kill_pid(pid: u32) {
    let _ = quiet_ok("kill", &["-KILL", &pid.to_string()]);
}

/// A network namespace with a veth pair inside, a temp dir, and the kyuu server running in it.
/// Drop kills the server and every other process left in the namespace (by PID), deletes the
/// namespace and removes the temp dir.
struct Netns {
    name: String,
    dir: PathBuf,
    server: Option<Child>,
}

impl Netns {
    fn create(tag: &str) -> Result<Netns, String> {
        let name = format!("kyuu-check-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Left over from an earlier run with the same PID: start clean.
        let _ = quiet_ok("ip", &["netns", "del", &name]);
        if !quiet_ok("ip", &["netns", "add", &name]) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("ip netns add {name} failed"));
        }
        let ns = Netns {
            name,
            dir,
            server: None,
        };
        let n = ns.name.as_str();
        let server = format!("{SERVER_IP}/24");
        let other = format!("{OTHER_IP}/24");
        let steps: [&[&str]; 6] = [
            &["-n", n, "link", "set", "lo", "up"],
            &[
                "-n", n, "link", "add", "v0", "type", "veth", "peer", "name", "v1",
            ],
            &["-n", n, "addr", "add", &server, "dev", "v0"],
            &["-n", n, "addr", "add", &other, "dev", "v1"],
            &["-n", n, "link", "set", "v0", "up"],
            &["-n", n, "link", "set", "v1", "up"],
        ];
        for args in steps {
            if !quiet_ok("ip", args) {
                return Err(format!("ip {} failed", args.join(" ")));
            }
        }
        Ok(ns)
    }

    /// `ip netns exec <ns> <program>`: `ip` execs the program in place, so the child's PID is
    /// the program's.
    fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    fn pids(&self) -> Vec<u32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("kyuu.log")).unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut c) = self.server.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Chromium helpers or a node that outlived its parent: every process in the namespace.
        for _ in 0..5 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                kill_pid(pid);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = quiet_ok("ip", &["netns", "del", &self.name]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `cmd` with stdout and stderr in files, killing it (by PID) after `limit`.
/// Returns (exit status, or None on timeout; stdout; stderr).
fn run_bounded(
    mut cmd: Command,
    dir: &Path,
    label: &str,
    limit: Duration,
) -> (Option<ExitStatus>, String, String) {
    let out = dir.join(format!("{label}.out"));
    let err = dir.join(format!("{label}.err"));
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out).unwrap())
        .stderr(File::create(&err).unwrap());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {label}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out), read(&err))
}

/// GET `url` from inside the namespace (node's fetch; node is needed anyway).
fn http_get(ns: &Netns, url: &str) -> Result<String, String> {
    const SCRIPT: &str = "fetch(process.argv[1], { signal: AbortSignal.timeout(5000) })\
        .then(async (r) => { process.stdout.write(await r.text()); process.exit(r.ok ? 0 : 1); })\
        .catch((e) => { console.error(String(e)); process.exit(1); });";
    let mut cmd = ns.command("node");
    cmd.args(["-e", SCRIPT, url]);
    match run_bounded(cmd, &ns.dir, "fetch", Duration::from_secs(15)) {
        (Some(s), body, _) if s.success() => Ok(body),
        (Some(s), body, err) => Err(format!("GET {url}: {s}: {body}{err}")),
        (None, _, _) => Err(format!("GET {url}: timed out")),
    }
}

/// Starts `kyuu serve --config` in the namespace; returns once it printed its summary.
fn start_kyuu(ns: &mut Netns, config: &Path) {
    let mut cmd = ns.command(KYUU);
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(ns.dir.join("kyuu.log")).unwrap());
    let mut child = cmd.spawn().expect("spawning kyuu serve");
    let stdout = child.stdout.take().unwrap();
    ns.server = Some(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut summary = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let http = line.trim_start().starts_with("HTTP");
                summary.push(line);
                if http {
                    break;
                }
            }
            Err(e) => panic!(
                "kyuu serve did not print its HTTP address ({e}); stdout:\n{}\nlog:\n{}",
                summary.join("\n"),
                ns.server_log()
            ),
        }
    }
    println!("{}", summary.join("\n"));
    let want = format!("http://{SERVER_IP}:{HTTP_PORT}");
    assert!(
        summary.iter().any(|l| l.contains(&want)),
        "kyuu serve is not on {want}"
    );
}

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
    if let Err(e) = prerequisites() {
        skip(TEST, &e);
        return;
    }
    if !quiet_ok("nft", &["--version"]) {
        skip(TEST, "no `nft` (nftables)");
        return;
    }
    let mut ns = match Netns::create("page") {
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
    if let Err(e) = prerequisites() {
        skip(TEST, &e);
        return;
    }
    let mut ns = match Netns::create("wss") {
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
