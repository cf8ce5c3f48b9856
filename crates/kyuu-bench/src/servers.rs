//! Starting and stopping the servers under test (coturn's `turnserver`, `kyuu serve`) with
//! equivalent settings, on ports checked to be free, stopped by PID on every exit path.

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::proto;

/// Settings both servers get.
#[derive(Debug, Clone)]
pub struct Common {
    pub username: String,
    pub password: String,
    pub realm: String,
    /// Worker/relay threads.
    pub threads: usize,
    /// TURN REST API shared secret: when set, both servers take REST credentials instead of
    /// the static user.
    pub secret: Option<String>,
    /// kyuu's `turn.relay_steering` ("off", "auto", "required").
    pub relay_steering: String,
}

/// A server process; killed (by PID) and reaped when dropped.
#[derive(Debug)]
pub struct ServerProc {
    pub name: &'static str,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Child,
}

impl ServerProc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process, KiB.
    pub fn vm_rss_kib(&self) -> anyhow::Result<u64> {
        vm_rss_kib(self.pid())
    }

    /// Fails when the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log: {}\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The last `n` lines of a log file.
pub fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// CPU time the process's live threads have run, ns (sum of `/proc/<pid>/task/*/schedstat`).
/// Precise to the nanosecond, unlike the tick-based `utime`/`stime`.
pub fn cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.filter_map(Result::ok)
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kib = line
        .split_whitespace()
        .nth(1)
        .context("VmRSS without a value")?
        .parse()?;
    Ok(kib)
}

/// Local ports with a socket bound on any address (UDP and TCP, v4 and v6).
fn ports_in_use() -> std::collections::HashSet<u16> {
    let mut used = std::collections::HashSet::new();
    for f in ["udp", "udp6", "tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/net/{f}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let Some(local) = line.split_whitespace().nth(1) else {
                continue;
            };
            let Some((_, port)) = local.rsplit_once(':') else {
                continue;
            };
            if let Ok(p) = u16::from_str_radix(port, 16) {
                used.insert(p);
            }
        }
    }
    used
}

/// A port nothing listens on, and whose successor is free too (coturn may take port + 1 for
/// RFC 5780). Checked against every address, because coturn sets SO_REUSEPORT and would
/// silently share a port with another server.
pub fn free_port(avoid: &[u16]) -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = UdpSocket::bind("127.0.0.1:0")?.local_addr()?.port();
        let used = ports_in_use();
        if port < u16::MAX
            && !used.contains(&port)
            && !used.contains(&(port + 1))
            && !avoid.contains(&port)
            && !avoid.contains(&(port + 1))
        {
            return Ok(port);
        }
    }
    bail!("no free port found in 100 tries")
}

/// Whether any socket is bound in `lo..=hi` (a relay range must be ours alone).
pub fn range_busy(lo: u16, hi: u16) -> usize {
    ports_in_use()
        .into_iter()
        .filter(|p| (lo..=hi).contains(p))
        .count()
}

/// Spawns `cmd` so that it dies with us even if we are killed (`setpriv --pdeathsig`).
fn spawn(program: &str, args: &[String], log: &Path) -> anyhow::Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
        let mut c = Command::new("/usr/bin/setpriv");
        c.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
    cmd.spawn()
        .with_context(|| format!("cannot start {program}"))
}

/// Waits until a STUN Binding request to `addr` is answered.
fn wait_ready(proc_: &mut ServerProc, timeout: Duration) -> anyhow::Result<()> {
    let sock = UdpSocket::bind("127.0.0.1:0")?;
    sock.connect(proc_.addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let deadline = Instant::now() + timeout;
    let mut req = [0u8; 64];
    let mut buf = [0u8; 1500];
    while Instant::now() < deadline {
        proc_.check_alive()?;
        let len = proto::binding_request(&mut req)?;
        let _ = sock.send(&req[..len]);
        if let Ok(n) = sock.recv(&mut buf) {
            if proto::is_binding_success(&buf[..n]) {
                return Ok(());
            }
        }
    }
    bail!(
        "{} did not answer STUN at {} within {timeout:?}; log {}:\n{}",
        proc_.name,
        proc_.addr,
        proc_.log.display(),
        tail(&proc_.log, 20)
    )
}

/// Starts coturn on 127.0.0.1:`port`, relaying from 127.0.0.1 ports `relay`.
pub fn start_coturn(
    bin: &str,
    dir: &Path,
    port: u16,
    relay: (u16, u16),
    c: &Common,
) -> anyhow::Result<ServerProc> {
    let log = dir.join("coturn.log");
    let mut args: Vec<String> = vec![
        "-n".into(),
        "--listening-ip=127.0.0.1".into(),
        format!("--listening-port={port}"),
        "--relay-ip=127.0.0.1".into(),
        format!("--min-port={}", relay.0),
        format!("--max-port={}", relay.1),
        "--lt-cred-mech".into(),
        format!("--realm={}", c.realm),
        "--no-tls".into(),
        "--no-dtls".into(),
        "--no-tcp".into(),
        "--no-tcp-relay".into(),
        "--no-cli".into(),
        "--no-rfc5780".into(),
        "--allow-loopback-peers".into(),
        format!("--relay-threads={}", c.threads),
        "--total-quota=1000000".into(),
        "--user-quota=1000000".into(),
        format!("--pidfile={}", dir.join("turnserver.pid").display()),
        format!("--userdb={}", dir.join("turndb").display()),
        format!("--log-file={}", dir.join("coturn-file.log").display()),
        "--simple-log".into(),
        "--no-stdout-log".into(),
    ];
    match &c.secret {
        Some(secret) => {
            args.push("--use-auth-secret".into());
            args.push(format!("--static-auth-secret={secret}"));
        }
        None => args.push(format!("--user={}:{}", c.username, c.password)),
    }
    let child = spawn(bin, &args, &log)?;
    let mut p = ServerProc {
        name: "coturn",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
        child,
    };
    wait_ready(&mut p, Duration::from_secs(10))?;
    Ok(p)
}

/// The `kyuu serve` configuration equivalent to the coturn command line above.
pub fn kyuu_config(port: u16, relay: (u16, u16), c: &Common, log_level: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# written by kyuu-turn-bench: settings equivalent to its coturn command line\n\
         [listen]\n\
         udp = [\"127.0.0.1:{port}\"]\n\
         tcp = []\n\
         tls = []\n\
         threads = {threads}\n\
         \n\
         [turn]\n\
         realm = \"{realm}\"\n\
         relay_ipv4 = \"127.0.0.1\"\n\
         relay_ports = {{ min = {lo}, max = {hi} }}\n\
         allow_peers = [\"127.0.0.0/8\"]\n\
         # coturn has no per-source limit on 401 challenges; the bench opens every allocation\n\
         # from 127.0.0.1, so the limiter would measure itself.\n\
         unauth_rate = 0\n\
         # coturn runs with generous quotas and no bandwidth cap; lift kyuu's defaults to match.\n\
         user_quota = 0\n\
         client_quota = 0\n\
         total_quota = 0\n\
         max_bps = 0\n\
         relay_steering = \"{steering}\"\n\
         {auth}\n\
         \n\
         [http]\n\
         enabled = false\n\
         \n\
         [log]\n\
         level = \"{log_level}\"\n\
         ansi = false",
        threads = c.threads,
        realm = c.realm,
        lo = relay.0,
        hi = relay.1,
        steering = c.relay_steering,
        auth = match &c.secret {
            Some(secret) => format!("static_auth_secrets = [\"{secret}\"]"),
            None => format!(
                "\n[[turn.users]]\nname = \"{}\"\npassword = \"{}\"",
                c.username, c.password
            ),
        },
    );
    s
}

/// Starts `kyuu serve` with [`kyuu_config`] written into `dir`.
pub fn start_kyuu(
    bin: &str,
    dir: &Path,
    port: u16,
    relay: (u16, u16),
    c: &Common,
    log_level: &str,
) -> anyhow::Result<ServerProc> {
    start_kyuu_config(bin, dir, port, &kyuu_config(port, relay, c, log_level))
}

/// Starts `kyuu serve` with the configuration `text` (UDP STUN/TURN on 127.0.0.1:`port`).
pub fn start_kyuu_config(
    bin: &str,
    dir: &Path,
    port: u16,
    text: &str,
) -> anyhow::Result<ServerProc> {
    let config = dir.join("kyuu.toml");
    std::fs::write(&config, text)?;
    let log = dir.join("kyuu.log");
    let args = vec![
        "serve".into(),
        "--config".into(),
        config.display().to_string(),
    ];
    let child = spawn(bin, &args, &log)?;
    let mut p = ServerProc {
        name: "kyuu",
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        log,
        child,
    };
    wait_ready(&mut p, Duration::from_secs(10))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kyuu_config_is_accepted_by_kyuu_server() -> anyhow::Result<()> {
        let c = Common {
            username: "bench".into(),
            password: "bench-pass".into(),
            realm: "kyuu-bench".into(),
            threads: 2,
            secret: None,
            relay_steering: "auto".into(),
        };
        let text = kyuu_config(40000, (21500, 32767), &c, "info");
        let cfg = kyuu_server::config::Config::from_toml(&text, "bench.toml")?;
        cfg.validate()?;
        assert_eq!(cfg.turn.unauth_rate, 0);
        assert_eq!(cfg.turn.allow_peers.len(), 1);
        assert_eq!(cfg.turn.users.len(), 1);
        assert!(!cfg.http.enabled);
        let rest = Common {
            secret: Some("s3cret".into()),
            ..c
        };
        let cfg = kyuu_server::config::Config::from_toml(
            &kyuu_config(40000, (21500, 32767), &rest, "info"),
            "bench.toml",
        )?;
        cfg.validate()?;
        assert_eq!(cfg.turn.static_auth_secrets, vec!["s3cret".to_owned()]);
        assert!(cfg.turn.users.is_empty());
        Ok(())
    }
}
