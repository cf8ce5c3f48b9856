//! TURN over TLS beside HTTPS on one port, from a browser: the real `kyuu serve` with
//! `http.tls_turn`, headless Chromium gathering relay candidates through `turns:` on the HTTPS
//! port, and curl fetching `/healthz` over HTTPS from the same port. kyuu's
//! `kyuu_tls_shared_connections_total{route}` must count both kinds.
//!
//! Loopback only, no namespace. Needs /usr/bin/chromium (or `KYUU_CHROMIUM`), node, curl and
//! kyuu-signal's `tests/browser` driver (playwright-core): SKIP otherwise, a failure with
//! `KYUU_BROWSER_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

mod support;
use support::{chromium, driver_dir, quiet_ok, skip, KYUU};

const TEST: &str = "chromium_turns_and_curl_https_share_one_port";

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "{path}").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn counter(metrics: &str, route: &str) -> u64 {
    let want = format!("kyuu_tls_shared_connections_total{{route=\"{route}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn chromium_turns_and_curl_https_share_one_port() {
    if !Path::new(&chromium()).exists() {
        return skip(TEST, "chromium not installed");
    }
    if !quiet_ok("node", &["--version"]) || !quiet_ok("curl", &["--version"]) {
        return skip(TEST, "node or curl missing");
    }
    let driver = driver_dir();
    if !driver.join("node_modules/playwright-core").exists() {
        let ok = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund"])
            .current_dir(&driver)
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            return skip(TEST, "npm ci for playwright-core failed");
        }
    }
    let https_port = free_port();
    let dir = std::env::temp_dir().join(format!("kyuu-turns-shared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("kyuu.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = []\nthreads = 1\n\
             [turn]\nstatic_auth_secrets = [\"s3cret\"]\nrelay_ipv4 = \"127.0.0.1\"\n\
             [http]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:{https_port}\"\ntls_turn = true\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n[log]\nansi = false\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(KYUU)
        .args(["serve", "--config"])
        .arg(&cfg)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let _server = Serve(child);
    let mut summary = String::new();
    while !summary.contains("try it") {
        let mut l = String::new();
        assert!(
            out.read_line(&mut l).unwrap() > 0,
            "serve exited: {summary}"
        );
        summary.push_str(&l);
    }
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = out.read_to_end(&mut sink);
    });
    assert!(
        summary.contains("TURN over TLS on the same port"),
        "{summary}"
    );
    let after = |label: &str| -> SocketAddr {
        let l = summary
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        let a = l.split("http://").nth(1).unwrap();
        a.split(['/', ' ']).next().unwrap().parse().unwrap()
    };
    let (http, admin) = (after("HTTP "), after("admin"));
    // The ICE servers browsers get include turns: on the HTTPS port.
    let ice = get(http, "GET /v1/ice-servers HTTP/1.0\r\n\r\n");
    assert!(
        ice.contains(&format!("turns:127.0.0.1:{https_port}?transport=tcp")),
        "{ice}"
    );

    // HTTPS from curl on the port.
    let curl = Command::new("curl")
        .args(["-sk", "--max-time", "10"])
        .arg(format!("https://127.0.0.1:{https_port}/healthz"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&curl.stdout).contains("\"status\":\"ok\""));

    // TURN from Chromium on the same port.
    let body = "{\"user\":\"chromium\"}";
    let cred = get(
        admin,
        &format!(
            "POST /admin/v1/credentials HTTP/1.0\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    let json: serde_json::Value =
        serde_json::from_str(cred.split_once("\r\n\r\n").unwrap().1).unwrap();
    let o = Command::new("node")
        .arg(driver.join("turns.mjs"))
        .arg(format!("turns:localhost:{https_port}?transport=tcp"))
        .arg(json["username"].as_str().unwrap())
        .arg(json["password"].as_str().unwrap())
        .current_dir(&driver)
        .env("KYUU_CHROMIUM", chromium())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let result: serde_json::Value = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|j| serde_json::from_str(j).unwrap())
        .unwrap_or_else(|| {
            panic!(
                "driver failed: {stdout}{}",
                String::from_utf8_lossy(&o.stderr)
            )
        });
    println!("chromium: {result}");
    let relay = result["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.as_str().unwrap().contains(" typ relay "))
        .count();
    assert!(relay >= 1, "no relay candidate through turns: {result}");

    let metrics = get(http, "GET /metrics HTTP/1.0\r\n\r\n");
    assert!(counter(&metrics, "turn") >= 1, "{metrics}");
    assert!(counter(&metrics, "http") >= 1, "{metrics}");
    let _ = std::fs::remove_dir_all(&dir);
}
