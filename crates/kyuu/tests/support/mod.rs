//! Shared harness for the tests that run the real `kyuu serve` binary in a network namespace with
//! headless Chromium (browser_relay.rs, browser_check.rs): prerequisites and SKIP handling, the
//! namespace (a veth pair, both ends inside, 198.18.77.1/24 and .2/24) with its Drop guard that
//! kills every process in it by PID, bounded command runs, HTTP from inside the namespace, and
//! Prometheus metric reading.
// Each test binary uses a different subset.
#![allow(dead_code, clippy::unwrap_used)]

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");

pub const SERVER_IP: &str = "198.18.77.1";

pub const OTHER_IP: &str = "198.18.77.2";

/// Fixed ports are free: each namespace is new. Chromium refuses TURN ports below 1024.
pub const TURN_PORT: u16 = 3478;

pub const HTTP_PORT: u16 = 8080;

pub const RELAY_PORTS: (u16, u16) = (50000, 50999);

pub fn required() -> bool {
    std::env::var("KYUU_BROWSER_REQUIRED").is_ok_and(|v| v == "1")
}

/// Prints SKIP, or panics if the browser test is required.
pub fn skip(test: &str, why: &str) {
    assert!(!required(), "browser test required but cannot run: {why}");
    println!("SKIP {test}: {why}");
}

pub fn driver_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../kyuu-signal/tests/browser")
}

pub fn chromium() -> String {
    std::env::var("KYUU_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

pub fn quiet_ok(cmd: &str, args: &[&str]) -> bool {
    Command::new(cmd)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn prerequisites(script: &str) -> Result<(), String> {
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
    if !dir.join(script).exists() {
        return Err(format!("{} missing", dir.join(script).display()));
    }
    // Tests of one file run in parallel: one `npm ci` at a time.
    static NPM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _npm = NPM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
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
pub fn kill_pid(pid: u32) {
    let _ = quiet_ok("kill", &["-KILL", &pid.to_string()]);
}

/// A network namespace with a veth pair inside, a temp dir, and the kyuu server running in it.
/// Drop kills the server and every other process left in the namespace (by PID), deletes the
/// namespace and removes the temp dir.
pub struct Netns {
    pub name: String,
    pub dir: PathBuf,
    pub server: Option<Child>,
}

impl Netns {
    pub fn create(kind: &str, tag: &str) -> Result<Netns, String> {
        let name = format!("kyuu-{kind}-{}-{tag}", std::process::id());
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
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    pub fn server_log(&self) -> String {
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
        remove_netns(&self.name);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The PIDs of the processes in network namespace `name`.
pub fn netns_pids(name: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", name])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills every process left in network namespace `name` (by PID, a few rounds for children
/// started meanwhile) and deletes the namespace.
pub fn remove_netns(name: &str) {
    for _ in 0..5 {
        let pids = netns_pids(name);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            kill_pid(pid);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = quiet_ok("ip", &["netns", "del", name]);
}

/// Runs `cmd` with stdout and stderr in files, killing it (by PID) after `limit`.
/// Returns (exit status, or None on timeout; stdout; stderr).
pub fn run_bounded(
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
pub fn http_get(ns: &Netns, url: &str) -> Result<String, String> {
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
pub fn start_kyuu(ns: &mut Netns, config: &Path) {
    let cmd = ns.command(KYUU);
    let http = format!("http://{SERVER_IP}:{HTTP_PORT}");
    start_kyuu_in(cmd, config, &ns.dir, &mut ns.server, &http);
}

/// Starts `kyuu serve --config <config>` with `cmd` (`kyuu` in a namespace), its log in
/// `dir/kyuu.log` and the child in `server` (the namespace guard's slot, so the server is
/// killed on every path); returns once it printed its summary, which must name `http`.
pub fn start_kyuu_in(
    mut cmd: Command,
    config: &Path,
    dir: &Path,
    server: &mut Option<Child>,
    http: &str,
) {
    let log = dir.join("kyuu.log");
    cmd.arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(File::create(&log).unwrap());
    let mut child = cmd.spawn().expect("spawning kyuu serve");
    let stdout = child.stdout.take().unwrap();
    *server = Some(child);
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
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
        }
    }
    println!("{}", summary.join("\n"));
    assert!(
        summary.iter().any(|l| l.contains(http)),
        "kyuu serve is not on {http}"
    );
}

/// Checks `/v1/ice-servers` as kyuu serves it (`body`): its entry with a username lists
/// `turn_url`, the username is `<unix-expiry>:<user>` with the expiry within `ttl` seconds from
/// now, and the credential is the REST password for `secret`. Returns the list, and that entry's
/// URLs and username.
pub fn check_rest_ice_servers(
    body: &str,
    turn_url: &str,
    secret: &str,
    ttl: u64,
) -> (serde_json::Value, Vec<String>, String) {
    use serde_json::Value;
    let servers: Value = serde_json::from_str(body).unwrap();
    let turn = servers
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {body}"))
        .iter()
        .find(|s| s["username"].is_string())
        .unwrap_or_else(|| panic!("no TURN entry with credentials: {body}"));
    let urls: Vec<String> = turn["urls"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .or_else(|| turn["urls"].as_str().map(|u| vec![u.to_owned()]))
        .unwrap_or_default();
    assert!(
        urls.iter().any(|u| u == turn_url),
        "{turn_url} not in {urls:?}"
    );
    let username = turn["username"].as_str().unwrap().to_owned();
    let expiry: u64 = username
        .split(':')
        .next()
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("username {username:?} is not <unix-expiry>:<user>"));
    let now = unix_now();
    assert!(
        expiry > now && expiry <= now + ttl + 5,
        "expiry {expiry} not within {ttl} s of {now}"
    );
    assert_eq!(
        turn["credential"].as_str().unwrap(),
        kyuu_turn::rest_password(secret.as_bytes(), &username),
        "credential is not base64(HMAC-SHA1(secret, username))"
    );
    (servers, urls, username)
}

/// Sum of every sample of `name` whose labels contain all of `labels` (`key="value"`).
pub fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

pub fn metrics(ns: &Netns) -> String {
    http_get(ns, &format!("http://{SERVER_IP}:{HTTP_PORT}/metrics")).unwrap()
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Polls /metrics (bounded) until `done` holds; returns the last text.
pub fn wait_metrics(ns: &Netns, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = metrics(ns);
        if done(&text) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A child process killed (by PID, through its handle) on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A private `redis-server` on `port` (no persistence), for the fleet tests; waits until it
/// accepts connections.
pub fn start_redis(port: u16) -> Proc {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc(child)
}

/// A port free for both UDP and TCP on 127.0.0.1.
pub fn free_udp_tcp_port() -> u16 {
    free_udp_tcp_ports(&["127.0.0.1"], 1)
}

/// The first of `count` consecutive ports free for both UDP and TCP on each of `ips` (say a
/// listener's port and its RFC 5780 alternate, on the primary and the alternate address).
pub fn free_udp_tcp_ports(ips: &[&str], count: u16) -> u16 {
    for _ in 0..100 {
        let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let p = t.local_addr().unwrap().port();
        drop(t);
        let Some(end) = p.checked_add(count) else {
            continue;
        };
        let free = ips.iter().all(|ip| {
            (p..end).all(|port| {
                std::net::UdpSocket::bind((*ip, port)).is_ok()
                    && std::net::TcpListener::bind((*ip, port)).is_ok()
            })
        });
        if free {
            return p;
        }
    }
    panic!("no {count} free ports on {ips:?}");
}

/// Runs an Allocate with `user`/`pass` from `sock` against `server` and returns the first
/// event (at most 10 s).
pub fn allocate(
    sock: &std::net::UdpSocket,
    server: std::net::SocketAddr,
    user: &str,
    pass: &str,
) -> kyuu_client::turn::Event {
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut c = kyuu_client::turn::Client::new(user, pass, false);
    let mut now = Instant::now();
    c.allocate(now);
    let deadline = now + Duration::from_secs(10);
    let mut buf = [0u8; 2048];
    while now < deadline {
        while let Some(t) = c.poll_transmit() {
            sock.send_to(&t, server).unwrap();
        }
        if let Some(e) = c.poll_event() {
            return e;
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            c.handle_input(Instant::now(), &buf[..n]);
        }
        now = Instant::now();
        c.handle_timeout(now);
    }
    panic!("no answer to Allocate");
}

/// Starts `kyuu serve --config <config>` (no `RUST_LOG`, no `KYUU_CONFIG`) and returns once its
/// start-up summary has printed the HTTP line (at most 20 s); the rest of its stdout is drained
/// by a thread so the server never blocks on it.
pub fn serve_until_ready(config: &Path) -> Proc {
    let config = config.as_os_str();
    serve_until(&["--config".as_ref(), config], |l| {
        l.trim_start().starts_with("HTTP")
    })
    .0
}

/// Starts `kyuu serve <args>` and reads its start-up summary until `last(line)` (at most 20 s);
/// returns the process and the summary so far. The rest of its stdout is drained by a thread so
/// the server never blocks on it.
pub fn serve_until(args: &[&std::ffi::OsStr], last: impl Fn(&str) -> bool) -> (Proc, String) {
    serve_until_with(&[], args, last)
}

/// [`serve_until`] with the environment variables `envs` set for the server.
pub fn serve_until_with(
    envs: &[(&str, &std::ffi::OsStr)],
    args: &[&std::ffi::OsStr],
    last: impl Fn(&str) -> bool,
) -> (Proc, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kyuu"))
        .arg("serve")
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("KYUU_CONFIG")
        .envs(envs.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let proc = Proc(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut summary = String::new();
    loop {
        let mut line = String::new();
        let n = out.read_line(&mut line).unwrap();
        assert!(n > 0, "kyuu serve exited early:\n{summary}");
        summary.push_str(&line);
        if last(&line) {
            break;
        }
        assert!(Instant::now() < deadline, "no summary: {summary}");
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut sink);
    });
    (proc, summary)
}
