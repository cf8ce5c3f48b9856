//! The `kyuu` binary as a user runs it: help, configuration errors, `serve` + `nat` on loopback,
//! HTTP endpoints. No root needed (127.0.0.2 is loopback on Linux).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

mod support;
use support::free_udp_tcp_ports;

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");

fn kyuu(args: &[&str]) -> Output {
    Command::new(KYUU)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("KYUU_CONFIG")
        .env_remove("KYUU_TURN_SECRET")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn temp_file(name: &str, contents: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("kyuu-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, contents).unwrap();
    p
}

/// A running `kyuu serve` (killed on drop) and its start-up summary.
struct Serve {
    _proc: support::Proc,
    summary: String,
}

impl Serve {
    fn start(args: &[&str]) -> Serve {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        // "try it" is the summary's last line.
        let (proc, summary) = support::serve_until(&args, |l| l.contains("try it"));
        Serve {
            _proc: proc,
            summary,
        }
    }

    fn http(&self) -> SocketAddr {
        let l = self
            .summary
            .lines()
            .find(|l| l.trim_start().starts_with("HTTP"))
            .unwrap();
        let a = l.split("http://").nth(1).unwrap();
        a.split_whitespace().next().unwrap().parse().unwrap()
    }
}

/// A UDP+TCP port pair (p, p+1) free on 127.0.0.1 and 127.0.0.2.
fn free_pair() -> u16 {
    free_udp_tcp_ports(&["127.0.0.1", "127.0.0.2"], 2)
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

#[test]
fn help_is_complete() {
    let o = kyuu(&["--help"]);
    assert!(o.status.success());
    let h = text(&o.stdout);
    assert!(
        h.contains("serve") && h.contains("nat") && h.contains("Examples"),
        "{h}"
    );
    let o = kyuu(&["serve", "--help"]);
    let h = text(&o.stdout);
    for flag in [
        "--config",
        "--listen",
        "--http",
        "--https",
        "--realm",
        "--external-ip",
        "--alt-ip",
        "--alt-port",
        "--log",
        "--print-config",
        "Examples",
    ] {
        assert!(h.contains(flag), "serve --help lacks {flag}:\n{h}");
    }
    let o = kyuu(&["nat", "--help"]);
    let h = text(&o.stdout);
    for flag in [
        "--json",
        "--timeout",
        "--local",
        "--lifetime",
        "Exit status",
        "Examples",
    ] {
        assert!(h.contains(flag), "nat --help lacks {flag}:\n{h}");
    }
}

#[test]
fn print_config_round_trips_and_checks() {
    let o = kyuu(&["serve", "--print-config", "--realm", "example.org"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let printed = text(&o.stdout);
    assert!(
        printed.contains("[listen]") && printed.contains("[turn]") && printed.contains("[http]")
    );
    assert!(printed.contains("realm = \"example.org\""), "{printed}");
    // [signal] is printed with every default, not only the keys a file set.
    assert!(printed.contains("[signal]"), "{printed}");
    assert!(printed.contains("max_message_size = 65536"), "{printed}");
    assert!(printed.contains("legacy_takeover = true"), "{printed}");
    let p = temp_file("printed.toml", &printed);
    let o = kyuu(&["serve", "--config", p.to_str().unwrap(), "--check"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // A [signal] key and the HTTPS keys set in a file survive a print and a re-read.
    let p = temp_file(
        "signal.toml",
        "[http]\ntls_listen = \"127.0.0.1:8443\"\n[signal]\nmax_connections = 7\nallowed_origins = [\"https://a.example\"]\n",
    );
    let o = kyuu(&["serve", "--config", p.to_str().unwrap(), "--print-config"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let printed = text(&o.stdout);
    assert!(printed.contains("max_connections = 7"), "{printed}");
    assert!(
        printed.contains("tls_listen = \"127.0.0.1:8443\""),
        "{printed}"
    );
    let p2 = temp_file("signal-printed.toml", &printed);
    let o = kyuu(&["serve", "--config", p2.to_str().unwrap(), "--print-config"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout), printed, "printing is a fixed point");
    let o = kyuu(&["serve", "--config", p2.to_str().unwrap(), "--check"]);
    assert!(o.status.success(), "{}", text(&o.stderr));

    // --https sets http.tls_listen; a lone certificate is refused with the key named.
    let o = kyuu(&["serve", "--https", "127.0.0.1", "--print-config"]);
    assert!(
        text(&o.stdout).contains("tls_listen = \"127.0.0.1:8443\""),
        "{}",
        text(&o.stdout)
    );
    let p = temp_file("lonecert.toml", "[http]\ntls_cert = \"/nonexistent.pem\"\n");
    let o = kyuu(&["serve", "--config", p.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("http.tls_cert"),
        "{}",
        text(&o.stderr)
    );
}

/// The safe defaults are visible in --print-config and liftable; --check warns about open
/// credential minting on a public address; the production profile refuses it.
#[test]
fn safe_defaults_warnings_and_production_profile() {
    let o = kyuu(&["serve", "--print-config"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let printed = text(&o.stdout);
    for line in [
        "profile = \"default\"",
        "user_quota = 10",
        "client_quota = 10",
        "total_quota = 10000",
        "max_bps = 625000",
        "credential_ttl_secs = 1200",
        "mint_rate_per_min = 10",
        "mint_burst = 20",
        "max_conns_per_ip = 64",
        "first_message_timeout_secs = 10",
        "tls_handshake_timeout_secs = 10",
        "max_conns_per_ip = 1024",
        "header_timeout_secs = 10",
    ] {
        assert!(
            printed.contains(line),
            "--print-config lacks {line}:\n{printed}"
        );
    }
    // 0 lifts a limit, and the printed file says so.
    let p = temp_file(
        "unlimited.toml",
        "[turn]\nuser_quota = 0\nclient_quota = 0\ntotal_quota = 0\nmax_bps = 0\n\
         [signal]\nmint_rate_per_min = 0\n",
    );
    let o = kyuu(&["serve", "--config", p.to_str().unwrap(), "--print-config"]);
    let printed = text(&o.stdout);
    assert!(printed.contains("user_quota = 0") && printed.contains("max_bps = 0"));
    assert!(printed.contains("mint_rate_per_min = 0"), "{printed}");

    // Open minting on a public HTTP address: --check passes with a warning.
    let public = temp_file("public.toml", "[http]\nlisten = \"8.8.8.8:8080\"\n");
    let o = kyuu(&["serve", "--config", public.to_str().unwrap(), "--check"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let err = text(&o.stderr);
    assert!(
        err.contains("warning: open credential minting on a public address (8.8.8.8:8080)"),
        "{err}"
    );
    // On loopback, or with tokens, no warning.
    let lo = temp_file("lo.toml", "[http]\nlisten = \"127.0.0.1:8080\"\n");
    let o = kyuu(&["serve", "--config", lo.to_str().unwrap(), "--check"]);
    assert!(!text(&o.stderr).contains("warning"), "{}", text(&o.stderr));
    let tokens = temp_file(
        "tokens.toml",
        "[http]\nlisten = \"8.8.8.8:8080\"\n[signal]\nauth_secret = \"s\"\n",
    );
    let o = kyuu(&["serve", "--config", tokens.to_str().unwrap(), "--check"]);
    assert!(o.status.success());
    assert!(!text(&o.stderr).contains("warning"), "{}", text(&o.stderr));

    // The production profile refuses open minting, by flag or by key, and names the fix.
    for args in [
        vec!["serve", "--production", "--check"],
        vec![
            "serve",
            "--config",
            public.to_str().unwrap(),
            "--production",
        ],
    ] {
        let o = kyuu(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let err = text(&o.stderr);
        assert!(
            err.contains("server.profile: \"production\" refuses to start")
                && err.contains("signal.auth_secret"),
            "{err}"
        );
    }
    let prod = temp_file("prod.toml", "[server]\nprofile = \"production\"\n");
    let o = kyuu(&["serve", "--config", prod.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(2));
    let o = kyuu(&[
        "serve",
        "--config",
        tokens.to_str().unwrap(),
        "--production",
        "--check",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
}

#[test]
fn config_errors_name_the_key_and_exit_2() {
    let p = temp_file("typo.toml", "[turn]\nrealm = \"x\"\nrelay_port = 5\n");
    let o = kyuu(&["serve", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = text(&o.stderr);
    assert!(e.starts_with("config error: "), "{e}");
    assert!(
        e.contains("typo.toml:3:1: turn.relay_port: unknown field `relay_port`"),
        "{e}"
    );

    let p = temp_file(
        "range.toml",
        "[turn.relay_ports]\nmin = 60000\nmax = 50000\n",
    );
    let o = kyuu(&["serve", "--config", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = text(&o.stderr);
    assert!(e.starts_with("config error: turn.relay_ports: "), "{e}");

    let o = kyuu(&["serve", "--alt-ip", "127.0.0.2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("listen.alt_ip"),
        "{}",
        text(&o.stderr)
    );

    let o = kyuu(&["serve", "--log", "info,=x=y"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).starts_with("config error: log.level"));

    let o = kyuu(&["serve", "--config", "/nonexistent/kyuu.toml"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("cannot read /nonexistent/kyuu.toml"));

    let o = kyuu(&["serve", "--listen", "nope"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--listen"));
}

#[test]
fn serve_and_nat_on_loopback() {
    let port = free_pair();
    let listen = format!("127.0.0.1:{port}");
    let server = Serve::start(&[
        "--listen",
        &listen,
        "--alt-ip",
        "127.0.0.2",
        "--tls",
        "off",
        "--http",
        "127.0.0.1:0",
    ]);
    let s = &server.summary;
    assert!(s.contains(&format!("udp  {listen}")), "{s}");
    assert!(
        s.contains(&format!("alternate address 127.0.0.2:{}", port + 1)),
        "{s}"
    );
    assert!(s.contains("TURN auth   on"), "{s}");
    assert!(s.contains("/v1/ice-servers"), "{s}");

    // Not behind a NAT: every test answers, open internet.
    let o = kyuu(&["nat", &listen, "--local", "127.0.0.1", "--json"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["behind_nat"], false);
    assert_eq!(v["rfc5780"], true);
    assert_eq!(v["mapping"], "endpoint-independent");
    assert_eq!(v["filtering"], "endpoint-independent");
    assert_eq!(v["nat_type"], "open-internet");
    assert_eq!(v["other_address"], format!("127.0.0.2:{}", port + 1));

    let o = kyuu(&["nat", &listen, "--local", "127.0.0.1"]);
    assert!(o.status.success());
    let t = text(&o.stdout);
    assert!(t.contains("NAT type        open internet"), "{t}");
    assert_eq!(v["wrong_source"], serde_json::json!([]));

    // RFC 5780 §4.6 binding lifetime, bounded: kyuu honours RESPONSE-PORT, and on loopback the
    // "mapping" (no NAT) lives through the whole bound.
    let o = kyuu(&[
        "nat",
        &listen,
        "--local",
        "127.0.0.1",
        "--lifetime",
        "1s",
        "--json",
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["alive_after_ms"], 1000, "{v}");
    assert_eq!(v["expired_after_ms"], serde_json::Value::Null, "{v}");
    let o = kyuu(&["nat", &listen, "--lifetime", "11m"]);
    assert!(!o.status.success());
    assert!(text(&o.stderr).contains("--lifetime"));

    // HTTP: health, metrics, ICE servers with TURN credentials.
    let http = server.http();
    let h = http_get(http, "/healthz");
    assert!(
        h.starts_with("HTTP/1.0 200") && h.contains("\"status\":\"ok\""),
        "{h}"
    );
    let m = http_get(http, "/metrics");
    assert!(m.contains("kyuu_up 1"), "{m}");
    assert!(
        m.contains("kyuu_stun_binding_requests_total") || m.contains("kyuu_"),
        "{m}"
    );
    let ice = http_get(http, "/v1/ice-servers");
    assert!(
        ice.contains("\"username\"") && ice.contains("\"credential\""),
        "{ice}"
    );
    assert!(ice.contains(&format!("stun:127.0.0.1:{port}")), "{ice}");
}

#[test]
fn nat_without_rfc5780_is_partial() {
    let server = Serve::start(&["--listen", "127.0.0.1:0", "--tls", "off", "--http", "off"]);
    let line = server
        .summary
        .lines()
        .find(|l| l.contains("udp "))
        .unwrap()
        .to_owned();
    let addr = line.split_whitespace().last().unwrap().to_owned();
    let o = kyuu(&["nat", &addr, "--local", "127.0.0.1"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o.stderr));
    assert!(text(&o.stderr).contains(
        "server does not support RFC 5780 (no OTHER-ADDRESS); only the mapped address is known"
    ));
    assert!(text(&o.stdout).contains("Public address  127.0.0.1:"));
}

#[test]
fn nat_times_out_on_silence() {
    // A bound socket that never answers.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let t0 = Instant::now();
    let o = kyuu(&["nat", &addr, "--timeout", "1s"]);
    let took = t0.elapsed();
    assert_eq!(o.status.code(), Some(1));
    let e = text(&o.stderr);
    assert!(
        e.contains(&format!(
            "no response from {addr} after 2 transmissions in 1.0s"
        )),
        "{e}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    // Requests really were retransmitted: two arrived.
    silent.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 100];
    let mut n = 0;
    while silent.recv_from(&mut buf).is_ok() {
        n += 1;
    }
    assert_eq!(n, 2);
}

#[test]
fn serve_with_rawr_answers_on_the_stun_port() {
    let cfg = temp_file("rawr.toml", "[rawr]\nenabled = true\nname = \"isp1\"\n");
    let server = Serve::start(&[
        "--config",
        cfg.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "off",
        "--http",
        "127.0.0.1:0",
    ]);
    assert!(
        server.summary.contains("RAWR        node on the STUN port"),
        "{}",
        server.summary
    );
    let line = server
        .summary
        .lines()
        .find(|l| l.contains("udp "))
        .unwrap()
        .to_owned();
    let addr: SocketAddr = line.split_whitespace().last().unwrap().parse().unwrap();
    // A RAWR request (method 0xC01) without attributes: the node, not the TURN server's
    // "unknown method", answers.
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut req = vec![0x30, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42];
    req.extend_from_slice(&[7u8; 12]);
    sock.send_to(&req, addr).unwrap();
    let mut buf = [0u8; 1500];
    let (n, _) = sock.recv_from(&mut buf).unwrap();
    let msg = kyuu_stun::Message::parse(&buf[..n]).unwrap();
    assert_eq!(msg.method(), 0xC01);
    assert_eq!(msg.class(), kyuu_stun::Class::Error);
    let ec = msg.error_code().unwrap().unwrap();
    assert!(ec.reason.contains("SESSION"), "{}", ec.reason);
    let js = http_get(server.http(), "/rawr/rawr.js");
    assert!(js.starts_with("HTTP/1.0 200"), "{js}");
}

/// Runs an Allocate with `user`/`pass` against `server` and returns the first event.
fn allocate(server: SocketAddr, user: &str, pass: &str) -> kyuu_client::turn::Event {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    support::allocate(&sock, server, user, pass)
}

#[test]
fn default_auth_is_on_and_ice_servers_credentials_allocate() {
    let server = Serve::start(&[
        "--listen",
        "127.0.0.1:0",
        "--tls",
        "off",
        "--http",
        "127.0.0.1:0",
    ]);
    let line = server
        .summary
        .lines()
        .find(|l| l.contains("udp "))
        .unwrap()
        .to_owned();
    let addr: SocketAddr = line.split_whitespace().last().unwrap().parse().unwrap();

    let ev = allocate(addr, "nobody", "guess");
    assert!(
        matches!(
            ev,
            kyuu_client::turn::Event::Error {
                code: 401 | 441,
                ..
            }
        ),
        "{ev:?}"
    );

    let resp = http_get(server.http(), "/v1/ice-servers");
    let body = resp.split("\r\n\r\n").nth(1).unwrap();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let turn = v
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s.get("username").is_some())
        .unwrap();
    let user = turn["username"].as_str().unwrap();
    let pass = turn["credential"].as_str().unwrap();
    match allocate(addr, user, pass) {
        kyuu_client::turn::Event::Allocated { relayed, .. } => {
            assert!(relayed.iter().any(|r| r.ip() == addr.ip()), "{relayed:?}");
        }
        other => panic!("allocate with /v1/ice-servers credentials: {other:?}"),
    }
}

#[test]
fn serve_https_prints_wss_and_answers() {
    let port = free_pair();
    let listen = format!("127.0.0.1:{port}");
    let server = Serve::start(&[
        "--listen",
        &listen,
        "--tls",
        "off",
        "--http",
        "127.0.0.1:0",
        "--https",
        "127.0.0.1:0",
    ]);
    let s = &server.summary;
    let line = s
        .lines()
        .find(|l| l.trim_start().starts_with("HTTPS"))
        .unwrap_or_else(|| panic!("no HTTPS line: {s}"));
    let addr: SocketAddr = line
        .split("https://")
        .nth(1)
        .and_then(|a| a.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no https address: {line}"));
    assert!(line.contains(&format!("wss://{addr}/<id>")), "{line}");
    assert!(s.contains("self-signed certificate"), "{s}");
    // curl, where installed, gets /healthz over TLS (the certificate is self-signed: -k).
    let Ok(o) = Command::new("curl")
        .args(["-sk", "--max-time", "5", &format!("https://{addr}/healthz")])
        .output()
    else {
        println!("SKIP https fetch: no curl");
        return;
    };
    assert!(o.status.success(), "curl: {}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("\"status\":\"ok\""),
        "{}",
        text(&o.stdout)
    );
}

/// `--dtls` sets `listen.dtls` (RFC 7350's port 5349 for a lone IP); DTLS is off by default; a
/// DTLS address on a UDP listener's port and a bad flag value are refused, naming the key.
#[test]
fn dtls_flag_and_validation() {
    let o = kyuu(&["serve", "--print-config"]);
    assert!(text(&o.stdout).contains("dtls = []"), "{}", text(&o.stdout));
    let o = kyuu(&["serve", "--dtls", "127.0.0.1", "--print-config"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(
        text(&o.stdout).contains("dtls = [\"127.0.0.1:5349\"]"),
        "{}",
        text(&o.stdout)
    );
    let o = kyuu(&["serve", "--dtls", "nonsense", "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("--dtls"), "{}", text(&o.stderr));
    let p = temp_file(
        "dtls-clash.toml",
        "[listen]\nudp = [\"0.0.0.0:3478\"]\ndtls = [\"127.0.0.1:3478\"]\n",
    );
    let o = kyuu(&["serve", "--config", p.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("listen.dtls:"),
        "{}",
        text(&o.stderr)
    );
    let p = temp_file(
        "dtls-zero.toml",
        "[listen]\ndtls = [\"0.0.0.0:5349\"]\ndtls_max_associations = 0\n",
    );
    let o = kyuu(&["serve", "--config", p.to_str().unwrap(), "--check"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("listen.dtls_max_associations"),
        "{}",
        text(&o.stderr)
    );
}
