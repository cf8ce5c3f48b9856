//! Interop with a WebRTC stack nobody here wrote: libdatachannel, through its Node binding
//! `node-datachannel` (the native library ships in the npm package
//! `@node-datachannel/linux-x64-gnu`), against the real `kyuu serve` binary.
//!
//! The client, `tests/libdatachannel/client.mjs`, is libdatachannel's `examples/client` ported
//! line for line: libdatachannel's own WebSocket client connects to `ws://host:port/<localId>`
//! and sends `{"id","type":"offer"|"answer","description"}` and
//! `{"id","type":"candidate","candidate","mid"}`; on receipt `"id"` names the sender. Two such
//! clients (two processes) find each other through kyuu's signaling:
//!
//! * `example_clients_connect_through_kyuu_signaling`: the example's wire format; the offerer
//!   opens the data channel "test" to the other's id, messages go both ways (greetings, numbered
//!   messages and their echoes). kyuu's STUN is the ICE server, as the example's is.
//! * `seed004_payload_shape_through_kyuu_signaling`: the same with seed 004's shape
//!   (`{"id","payload":{"sdp","type"}}`, `{"id","payload":{"candidate","sdpMid"}}`).
//! * `relay_only_with_rest_credentials_over_udp`: `iceTransportPolicy: 'relay'` with kyuu's
//!   `GET /v1/ice-servers` handed to libdatachannel as is (REST credentials): the selected
//!   candidate pair is relay/relay on both sides, on kyuu's relay address, and `/metrics`
//!   counts relayed bytes (UDP) in both directions.
//! * `relay_only_with_static_user_url`: the same with a static `[[turn.users]]` user in
//!   libdatachannel's URL form `turn:user:pass@host:port`. Not over TCP: libdatachannel built
//!   with libjuice (node-datachannel is) skips TURN/TCP and TURN/TLS servers with a warning.
//!
//! Every test also checks that each side received exactly the descriptions the other sent
//! (SHA-256 logged by both clients). A client pair is run again (at most 3 tries) only on
//! libdatachannel's own fingerprint race, recognised by its signature (see `fingerprint_race`).
//!
//! libjuice (libdatachannel's ICE) gathers no candidates on loopback, so each test builds two
//! fresh network namespaces joined by a veth pair: kyuu in one (198.18.88.1/24), both clients
//! in the other (198.18.88.2/24; see `Netns` for why not the same one). kyuu listens on and
//! relays from 198.18.88.1, with `turn.allow_peers = ["198.18.0.0/15"]` (that range is denied
//! by default).
//!
//! Needs root, `ip`, node and npm (`npm ci` in `tests/libdatachannel` when `node_modules` is
//! missing): SKIP otherwise, a failure with `KYUU_INTEROP_REQUIRED=1`. The namespace, its
//! processes (killed by PID) and the temp dir are removed on every path (Drop guard).
#![allow(clippy::unwrap_used)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;

mod support;
use support::{metric, quiet_ok, unix_now};

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");
const SERVER_IP: &str = "198.18.88.1";
const OTHER_IP: &str = "198.18.88.2";
/// Fixed ports are free: each namespace is new.
const TURN_PORT: u16 = 3478;
const HTTP_PORT: u16 = 8080;
const RELAY_PORTS: (u16, u16) = (51000, 51999);
const CREDENTIAL_TTL: u64 = 600;
const STATIC_USER: &str = "ldc";
const STATIC_PASSWORD: &str = "ldc-static-pw";
/// Each client's own limit; the harness kills it (by PID) a little later.
const CLIENT_TIMEOUT_MS: u64 = 30_000;
const MESSAGES: usize = 5;

/// Two libdatachannel processes and a server per test on a shared machine: one test at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn required() -> bool {
    std::env::var("KYUU_INTEROP_REQUIRED").is_ok_and(|v| v == "1")
}

/// Prints SKIP, or panics if interop tests are required.
fn skip(test: &str, why: &str) {
    assert!(
        !required(),
        "libdatachannel interop required but cannot run: {why}"
    );
    println!("SKIP {test}: {why}");
}

fn js_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/libdatachannel")
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
    if !quiet_ok("node", &["--version"]) {
        return Err("node not found".into());
    }
    let dir = js_dir();
    if !dir.join("node_modules/node-datachannel").exists() {
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("npm: {e}"))?;
        if !status.success() {
            return Err(format!("npm ci in {} failed: {status}", dir.display()));
        }
    }
    // The native binding loads (the platform package matched this machine).
    let loads = Command::new("node")
        .args([
            "-e",
            "import('node-datachannel').then((m) => { console.log(m.default.getLibraryVersion()); \
             m.default.cleanup(); })",
        ])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("node: {e}"))?;
    if !loads.status.success() {
        return Err(format!(
            "node-datachannel does not load: {}",
            String::from_utf8_lossy(&loads.stderr)
        ));
    }
    println!(
        "libdatachannel {} (node-datachannel)",
        String::from_utf8_lossy(&loads.stdout).trim()
    );
    Ok(())
}

/// Two network namespaces joined by a veth pair, a temp dir, and the kyuu server running in
/// the first. The server namespace holds kyuu (v0, 198.18.88.1); the clients namespace holds
/// both libdatachannel clients (v1, 198.18.88.2). Drop kills the server and every other process
/// left in either namespace (by PID), deletes both namespaces and removes the temp dir.
///
/// Why two: TURN permissions are per IP address (RFC 8656 §9). With the clients on the relay's
/// own address, a permission for the other client's relay candidate also admits that client's
/// host socket, and libjuice (which keeps checking from its host socket even with
/// `iceTransportPolicy: 'relay'`; libdatachannel only filters the candidates it signals) then
/// finds a direct host/prflx path around the relay. Real clients never share kyuu's address.
struct Netns {
    server_ns: String,
    client_ns: String,
    dir: PathBuf,
    server: Option<Child>,
}

impl Netns {
    fn create(tag: &str) -> Result<Netns, String> {
        let base = format!("kyuu-ldc-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&base);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let ns = Netns {
            server_ns: format!("{base}-s"),
            client_ns: format!("{base}-c"),
            dir,
            server: None,
        };
        // Left over from an earlier run with the same PID: start clean. From here on Drop
        // cleans up whatever was made.
        for name in [&ns.server_ns, &ns.client_ns] {
            let _ = quiet_ok("ip", &["netns", "del", name]);
            if !quiet_ok("ip", &["netns", "add", name]) {
                return Err(format!("ip netns add {name} failed"));
            }
        }
        let (s, c) = (ns.server_ns.as_str(), ns.client_ns.as_str());
        let server = format!("{SERVER_IP}/24");
        let other = format!("{OTHER_IP}/24");
        let steps: [&[&str]; 7] = [
            &["-n", s, "link", "set", "lo", "up"],
            &["-n", c, "link", "set", "lo", "up"],
            &[
                "-n", s, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", c,
            ],
            &["-n", s, "addr", "add", &server, "dev", "v0"],
            &["-n", c, "addr", "add", &other, "dev", "v1"],
            &["-n", s, "link", "set", "v0", "up"],
            &["-n", c, "link", "set", "v1", "up"],
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
    fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// A command in the server's namespace.
    fn server_command(&self, program: &str) -> Command {
        Self::exec(&self.server_ns, program)
    }

    /// A command in the clients' namespace.
    fn client_command(&self, program: &str) -> Command {
        Self::exec(&self.client_ns, program)
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
        // A client that outlived its harness: every process left in either namespace.
        for name in [&self.client_ns, &self.server_ns] {
            support::remove_netns(name);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A spawned process with stdout and stderr in files, killed (by PID) on drop.
struct Proc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, dir: &Path, label: &str) -> Proc {
        let out = dir.join(format!("{label}.out"));
        let err = dir.join(format!("{label}.err"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&out).unwrap())
            .stderr(File::create(&err).unwrap());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {label}: {e}"));
        Proc { child, out, err }
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Waits until stdout contains `needle` or the process exits, at most `limit`.
    fn wait_for_line(&mut self, needle: &str, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if self.stdout().contains(needle) {
                return true;
            }
            if self.child.try_wait().unwrap().is_some() || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the exit, killing the process after `limit` (None then).
    fn wait(&mut self, limit: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The client's `RESULT {json}` line, or a description of what went wrong.
    fn result(&self, label: &str, status: Option<ExitStatus>) -> Value {
        let out = self.stdout();
        match out.lines().rev().find_map(|l| l.strip_prefix("RESULT ")) {
            Some(json) => serde_json::from_str(json).unwrap(),
            None => serde_json::json!({
                "ok": false,
                "why": format!("{label}: no RESULT (exit {status:?})\nstdout:\n{out}\nstderr:\n{}",
                    self.stderr()),
            }),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// GET `url` from the clients' namespace (node's fetch; node is needed anyway).
fn http_get(ns: &Netns, url: &str) -> Result<String, String> {
    const SCRIPT: &str = "fetch(process.argv[1], { signal: AbortSignal.timeout(5000) })\
        .then(async (r) => { process.stdout.write(await r.text()); process.exit(r.ok ? 0 : 1); })\
        .catch((e) => { console.error(String(e)); process.exit(1); });";
    let mut cmd = ns.client_command("node");
    cmd.args(["-e", SCRIPT, url]);
    let mut p = Proc::spawn(cmd, &ns.dir, "fetch");
    match p.wait(Duration::from_secs(15)) {
        Some(s) if s.success() => Ok(p.stdout()),
        Some(s) => Err(format!("GET {url}: {s}: {}{}", p.stdout(), p.stderr())),
        None => Err(format!("GET {url}: timed out")),
    }
}

fn write_config(ns: &Netns, secret: &str) -> PathBuf {
    let (min, max) = RELAY_PORTS;
    let text = format!(
        "[listen]\n\
         udp = [\"{SERVER_IP}:{TURN_PORT}\"]\n\
         tcp = [\"{SERVER_IP}:{TURN_PORT}\"]\n\
         tls = []\n\
         threads = 1\n\
         \n\
         [turn]\n\
         realm = \"kyuu-ldc\"\n\
         static_auth_secrets = [\"{secret}\"]\n\
         relay_ipv4 = \"{SERVER_IP}\"\n\
         relay_ports = {{ min = {min}, max = {max} }}\n\
         allow_peers = [\"198.18.0.0/15\"]\n\
         \n\
         [[turn.users]]\n\
         name = \"{STATIC_USER}\"\n\
         password = \"{STATIC_PASSWORD}\"\n\
         \n\
         [http]\n\
         listen = \"{SERVER_IP}:{HTTP_PORT}\"\n\
         credential_ttl_secs = {CREDENTIAL_TTL}\n\
         \n\
         [log]\n\
         level = \"info,kyuu_signal=debug,kyuu::turn=debug,kyuu::relay=debug\"\n\
         ansi = false\n"
    );
    let path = ns.dir.join("kyuu.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts `kyuu serve --config` in the server's namespace; returns once it printed its summary.
fn start_kyuu(ns: &mut Netns, config: &Path) {
    let cmd = ns.server_command(KYUU);
    let http = format!("http://{SERVER_IP}:{HTTP_PORT}");
    support::start_kyuu_in(cmd, config, &ns.dir, &mut ns.server, &http);
}

fn metrics(ns: &Netns) -> String {
    http_get(ns, &format!("http://{SERVER_IP}:{HTTP_PORT}/metrics")).unwrap()
}

/// Polls `/metrics` until `done` holds or `limit` passes; returns the last text.
fn wait_metrics(ns: &Netns, limit: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let text = metrics(ns);
        if done(&text) || Instant::now() >= deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn setup(test: &str, tag: &str) -> Option<(Netns, String)> {
    if let Err(e) = prerequisites() {
        skip(test, &e);
        return None;
    }
    let mut ns = match Netns::create(tag) {
        Ok(ns) => ns,
        Err(e) => {
            skip(test, &format!("cannot build the network namespace: {e}"));
            return None;
        }
    };
    let secret = format!("ldc-{}-{}", std::process::id(), unix_now());
    let config = write_config(&ns, &secret);
    start_kyuu(&mut ns, &config);
    Some((ns, secret))
}

/// How the two clients are run.
struct Run<'a> {
    format: &'a str,
    ice_servers: Value,
    relay: bool,
}

/// Attempts per client pair: see `fingerprint_race`.
const ATTEMPTS: usize = 3;

/// The SHA-256s of the descriptions a client logged as `local description` (sent) or
/// `remote description` (received).
fn description_hashes(stdout: &str, which: &str) -> Vec<String> {
    stdout
        .lines()
        .filter(|l| l.contains(&format!("] {which} description (")))
        .filter_map(|l| l.rsplit(' ').next().map(str::to_owned))
        .collect()
}

/// libdatachannel's own race, not kyuu's doing: `PeerConnection::setRemoteDescription` hands the
/// description to ICE before it stores it for `checkFingerprint`. On a link of microseconds
/// (two processes on one veth) the answerer's ICE checks reach the offerer before the answer
/// does, so once the answer is set ICE and DTLS can complete inside that window when the
/// thread is descheduled (a loaded 2-core machine), and the DTLS server rejects the right
/// certificate ("certificate verify failed", no remote fingerprint yet). It is that race when
/// a client logged that rejection and each side received exactly the descriptions the other
/// sent (so kyuu relayed them intact).
fn fingerprint_race(offerer_out: &str, answerer_out: &str) -> bool {
    let rejected = [offerer_out, answerer_out]
        .iter()
        .any(|o| o.contains("certificate verify failed"));
    let o_sent = description_hashes(offerer_out, "local");
    let a_sent = description_hashes(answerer_out, "local");
    rejected
        && !o_sent.is_empty()
        && !a_sent.is_empty()
        && o_sent == description_hashes(answerer_out, "remote")
        && a_sent == description_hashes(offerer_out, "remote")
}

/// Runs the two example clients (see `attempt`); again, with new ids, only when a try failed
/// on libdatachannel's fingerprint race and nothing else.
fn run_clients(ns: &Netns, tag: &str, run: &Run) -> (Value, Value) {
    for n in 1..=ATTEMPTS {
        match attempt(ns, &format!("{tag}{n}"), run) {
            Ok(results) => return results,
            Err((e, true)) if n < ATTEMPTS => println!(
                "try {n}: libdatachannel's fingerprint race (DTLS finished before its remote \
                 description was stored; both descriptions arrived intact): trying again\n{e}"
            ),
            Err((e, _)) => {
                // What kyuu saw of the session, for a failure that is not the race: requests
                // by method and outcome, relayed bytes, refusals (flushed on the 1 s tick).
                std::thread::sleep(Duration::from_millis(1_200));
                let turn: Vec<String> = metrics(ns)
                    .lines()
                    .filter(|l| l.starts_with("kyuu_turn_"))
                    .map(str::to_owned)
                    .collect();
                panic!("{e}\nkyuu /metrics (kyuu_turn_*):\n{}", turn.join("\n"))
            }
        }
    }
    unreachable!()
}

/// Runs the two example clients in the clients' namespace: the answerer first, the offerer
/// (which offers to the answerer's id) once the answerer's signaling is up. Returns both
/// RESULTs (offerer, answerer), or everything that was printed and whether it was
/// libdatachannel's fingerprint race.
fn attempt(ns: &Netns, tag: &str, run: &Run) -> Result<(Value, Value), (String, bool)> {
    // Ids as the example makes them: short random alphanumerics (here pid-derived, distinct).
    let offerer_id = format!("o{}{tag}", std::process::id() % 10_000);
    let answerer_id = format!("a{}{tag}", std::process::id() % 10_000);
    let url = format!("ws://{SERVER_IP}:{HTTP_PORT}");
    let ice = run.ice_servers.to_string();
    let client = |id: &str, offer: Option<&str>| {
        let mut cmd = ns.client_command("node");
        cmd.current_dir(js_dir()).args([
            "client.mjs",
            "--url",
            &url,
            "--id",
            id,
            "--format",
            run.format,
            "--ice-servers",
            &ice,
            "--messages",
            &MESSAGES.to_string(),
            "--timeout-ms",
            &CLIENT_TIMEOUT_MS.to_string(),
        ]);
        if run.relay {
            cmd.arg("--relay");
        }
        if let Some(remote) = offer {
            cmd.args(["--offer", remote]);
        }
        cmd
    };
    let mut answerer = Proc::spawn(
        client(&answerer_id, None),
        &ns.dir,
        &format!("{tag}-answerer"),
    );
    if !answerer.wait_for_line("signaling ready", Duration::from_secs(15)) {
        return Err((
            format!(
                "answerer's signaling did not come up\nstdout:\n{}\nstderr:\n{}\nkyuu log:\n{}",
                answerer.stdout(),
                answerer.stderr(),
                ns.server_log()
            ),
            false,
        ));
    }
    let mut offerer = Proc::spawn(
        client(&offerer_id, Some(&answerer_id)),
        &ns.dir,
        &format!("{tag}-offerer"),
    );
    let limit = Duration::from_millis(CLIENT_TIMEOUT_MS + 10_000);
    let offerer_status = offerer.wait(limit);
    let answerer_status = answerer.wait(Duration::from_secs(10));
    let o = offerer.result("offerer", offerer_status);
    let a = answerer.result("answerer", answerer_status);
    let exited_ok = |s: Option<ExitStatus>| s.is_some_and(|s| s.success());
    if o["ok"] != true
        || a["ok"] != true
        || !exited_ok(offerer_status)
        || !exited_ok(answerer_status)
    {
        let race = fingerprint_race(&offerer.stdout(), &answerer.stdout());
        return Err((
            format!(
                "libdatachannel clients failed (exit {offerer_status:?} / {answerer_status:?})\n\
                 offerer RESULT {o}\nanswerer RESULT {a}\n\
                 offerer stdout:\n{}\nofferer stderr:\n{}\n\
                 answerer stdout:\n{}\nanswerer stderr:\n{}\nkyuu log:\n{}",
                offerer.stdout(),
                offerer.stderr(),
                answerer.stdout(),
                answerer.stderr(),
                ns.server_log()
            ),
            race,
        ));
    }
    Ok((o, a))
}

/// Both clients exchanged the example's greetings and the numbered messages and echoes; the
/// signaling they received was what libdatachannel sends (offer/answer and candidates).
fn check_exchange(o: &Value, a: &Value) {
    let o_id = o["id"].as_str().unwrap();
    let a_id = a["id"].as_str().unwrap();
    let has = |v: &Value, s: &str| {
        v["received"]
            .as_array()
            .is_some_and(|r| r.iter().any(|m| m == s))
    };
    assert!(has(o, &format!("Hello from {a_id}")), "offerer: {o}");
    assert!(has(a, &format!("Hello from {o_id}")), "answerer: {a}");
    for i in 0..MESSAGES {
        assert!(has(a, &format!("{i}:{o_id}")), "answerer missed {i}: {a}");
        assert!(
            has(o, &format!("echo:{i}:{o_id}")),
            "offerer missed {i}: {o}"
        );
    }
    // What one sent is what the other got (kyuu relays every member byte for byte).
    let sig = |v: &Value, k: &str| v["signaling"][k].clone();
    assert_eq!(
        sig(o, "descriptionsSent"),
        sig(a, "descriptionsReceived"),
        "the offer changed on the way"
    );
    assert_eq!(
        sig(a, "descriptionsSent"),
        sig(o, "descriptionsReceived"),
        "the answer changed on the way"
    );
    assert_eq!(o["signaling"]["types"]["answer"], 1, "offerer: {o}");
    assert_eq!(a["signaling"]["types"]["offer"], 1, "answerer: {a}");
    assert!(
        o["signaling"]["types"]["candidate"].as_u64() >= Some(1),
        "offerer got no candidates: {o}"
    );
    assert!(
        a["signaling"]["types"]["candidate"].as_u64() >= Some(1),
        "answerer got no candidates: {a}"
    );
    for v in [o, a] {
        println!(
            "{}: received {} messages, signaling sent {} received {} {}, pair {}",
            v["id"],
            v["received"].as_array().map_or(0, Vec::len),
            v["signaling"]["sent"],
            v["signaling"]["received"],
            v["signaling"]["types"],
            v["pair"]
        );
    }
}

/// The candidates the client signaled (libdatachannel's `a=candidate:...` lines).
fn local_candidates(v: &Value) -> Vec<&str> {
    v["localCandidates"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// libjuice learned its server-reflexive address from kyuu's STUN (Binding over UDP): a srflx
/// candidate on the clients' address.
fn check_srflx(who: &str, v: &Value) {
    let cands = local_candidates(v);
    assert!(
        cands
            .iter()
            .any(|c| c.contains(&format!(" {OTHER_IP} ")) && c.contains(" typ srflx")),
        "{who} gathered no srflx candidate through kyuu's STUN: {cands:?}"
    );
}

/// With `iceTransportPolicy: 'relay'` only relay candidates on kyuu's address are signaled.
fn check_relay_candidates(who: &str, v: &Value) {
    let cands = local_candidates(v);
    assert!(!cands.is_empty(), "{who} signaled no candidate: {v}");
    for c in &cands {
        assert!(
            c.contains(" typ relay") && c.contains(&format!(" {SERVER_IP} ")),
            "{who} signaled a candidate that is not a kyuu relay candidate: {c}"
        );
    }
}

/// The selected pair is relay/relay, through kyuu's relay addresses.
fn check_relay_pair(who: &str, v: &Value) {
    let pair = &v["pair"];
    for side in ["local", "remote"] {
        let c = &pair[side];
        assert_eq!(
            c["type"], "relay",
            "{who} {side} candidate is not relay: {v}"
        );
        assert_eq!(
            c["address"], SERVER_IP,
            "{who} {side} candidate is not on kyuu's relay address: {v}"
        );
        let port = c["port"].as_u64().unwrap_or_default();
        assert!(
            (u64::from(RELAY_PORTS.0)..=u64::from(RELAY_PORTS.1)).contains(&port),
            "{who} {side} port {port} outside turn.relay_ports: {v}"
        );
    }
}

/// Signaling and the exchange worked without kyuu dropping anything.
fn check_signal_metrics(ns: &Netns) {
    let text = metrics(ns);
    let connections = metric(&text, "kyuu_signal_connections_total", &[]);
    let dropped = metric(&text, "kyuu_signal_dropped_total", &[]);
    println!(
        "kyuu /metrics: kyuu_signal_connections_total {connections}, \
         kyuu_signal_dropped_total {dropped}"
    );
    assert!(connections >= 2.0, "fewer than two connections:\n{text}");
    assert!(dropped == 0.0, "kyuu dropped signaling frames:\n{text}");
}

fn signaling_test(test: &str, tag: &str, format: &str) {
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((ns, _secret)) = setup(test, tag) else {
        return;
    };
    // As the example: one STUN server (kyuu's).
    let run = Run {
        format,
        ice_servers: serde_json::json!([format!("stun:{SERVER_IP}:{TURN_PORT}")]),
        relay: false,
    };
    let (o, a) = run_clients(&ns, tag, &run);
    check_exchange(&o, &a);
    check_srflx("offerer", &o);
    check_srflx("answerer", &a);
    check_signal_metrics(&ns);
}

#[test]
fn example_clients_connect_through_kyuu_signaling() {
    signaling_test(
        "example_clients_connect_through_kyuu_signaling",
        "ex",
        "libdatachannel",
    );
}

#[test]
fn seed004_payload_shape_through_kyuu_signaling() {
    signaling_test(
        "seed004_payload_shape_through_kyuu_signaling",
        "s4",
        "seed004",
    );
}

/// Relayed bytes in both directions on `transport`, and at least two allocations on it.
fn check_relay_metrics(ns: &Netns, transport: &str) {
    let t = format!("transport=\"{transport}\"");
    let relayed = |text: &str, dir: &str| {
        metric(
            text,
            "kyuu_turn_relayed_bytes_total",
            &[&format!("direction=\"{dir}\""), &t],
        )
    };
    // Counters are flushed on the TURN server's 1 s tick.
    let text = wait_metrics(ns, Duration::from_secs(10), |text| {
        relayed(text, "to_peer") > 0.0 && relayed(text, "to_client") > 0.0
    });
    let (to_peer, to_client) = (relayed(&text, "to_peer"), relayed(&text, "to_client"));
    let allocations = metric(&text, "kyuu_turn_allocations_total", &[&t]);
    println!(
        "kyuu /metrics: kyuu_turn_relayed_bytes_total{{{t}}} to_peer {to_peer} \
         to_client {to_client}, kyuu_turn_allocations_total{{{t}}} {allocations}"
    );
    assert!(
        to_peer > 0.0 && to_client > 0.0,
        "no relayed bytes over {transport} in /metrics:\n{text}"
    );
    assert!(
        allocations >= 2.0,
        "fewer than two {transport} allocations:\n{text}"
    );
}

/// `/v1/ice-servers` as kyuu serves it, after checking its TURN entry: kyuu's TURN over UDP and
/// TCP with REST credentials that verify against the configured secret.
fn ice_servers(ns: &Netns, secret: &str) -> Value {
    let body = http_get(
        ns,
        &format!("http://{SERVER_IP}:{HTTP_PORT}/v1/ice-servers"),
    )
    .unwrap();
    let want = format!("turn:{SERVER_IP}:{TURN_PORT}?transport=udp");
    let (servers, _, _) = support::check_rest_ice_servers(&body, &want, secret, CREDENTIAL_TTL);
    println!("/v1/ice-servers (handed to both clients as is): {body}");
    servers
}

#[test]
fn relay_only_with_rest_credentials_over_udp() {
    let test = "relay_only_with_rest_credentials_over_udp";
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((ns, secret)) = setup(test, "ru") else {
        return;
    };
    // What an application does: kyuu's list straight into libdatachannel's configuration
    // (client.mjs turns each RTCIceServer URL into a libdatachannel IceServer; libdatachannel
    // skips the TURN/TCP one, see relay_only_with_static_user_url).
    let run = Run {
        format: "libdatachannel",
        ice_servers: ice_servers(&ns, &secret),
        relay: true,
    };
    let (o, a) = run_clients(&ns, "ru", &run);
    check_exchange(&o, &a);
    check_relay_candidates("offerer", &o);
    check_relay_candidates("answerer", &a);
    check_relay_pair("offerer", &o);
    check_relay_pair("answerer", &a);
    check_relay_metrics(&ns, "udp");
}

#[test]
fn relay_only_with_static_user_url() {
    let test = "relay_only_with_static_user_url";
    let _serial = SERIAL.lock().unwrap_or_else(PoisonError::into_inner);
    let Some((ns, _secret)) = setup(test, "st") else {
        return;
    };
    // libdatachannel's own URL form, parsed by libdatachannel. UDP: libdatachannel built with
    // libjuice (as node-datachannel is) ignores TURN over TCP and TLS ("TURN transports TCP and
    // TLS are not supported with libjuice"), so TURN/TCP cannot be exercised with it.
    let url = format!("turn:{STATIC_USER}:{STATIC_PASSWORD}@{SERVER_IP}:{TURN_PORT}");
    println!("ICE server {url}");
    let run = Run {
        format: "libdatachannel",
        ice_servers: serde_json::json!([url]),
        relay: true,
    };
    let (o, a) = run_clients(&ns, "st", &run);
    check_exchange(&o, &a);
    check_relay_candidates("offerer", &o);
    check_relay_candidates("answerer", &a);
    check_relay_pair("offerer", &o);
    check_relay_pair("answerer", &a);
    check_relay_metrics(&ns, "udp");
}
