//! The `/status` page of the admin listener in headless Chromium against the real `kyuu serve`:
//! a TURN client relays traffic through a peer socket, then Chromium loads the page (token in
//! the URL), and the numbers it shows (allocations, relayed bytes and packets, top user) must
//! match `/metrics` and the traffic sent. A screenshot is left in
//! `target/test-artifacts/status.png` for a person to look at.
//!
//! Only loopback sockets, no namespace: needs /usr/bin/chromium (or `KYUU_CHROMIUM`): SKIP
//! otherwise, a failure with `KYUU_BROWSER_REQUIRED=1`.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");
const TOKEN: &str = "status-page-token-0123456789";

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn chromium() -> String {
    std::env::var("KYUU_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into())
}

fn skip(why: &str) {
    let required = std::env::var("KYUU_BROWSER_REQUIRED").is_ok_and(|v| v == "1");
    assert!(!required, "browser test required but cannot run: {why}");
    println!("SKIP status_page_numbers_match_metrics: {why}");
}

fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").unwrap().1.to_owned()
}

fn metric_sum(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Chromium's DOM of `url` after the page's scripts ran.
fn dump_dom(url: &str, extra: &[&str]) -> String {
    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--window-size=1200,760",
        ])
        .args(extra)
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn element_text<'a>(dom: &'a str, id: &str) -> &'a str {
    let tag = format!("id=\"{id}\">");
    let start = dom
        .find(&tag)
        .unwrap_or_else(|| panic!("no #{id} in the page"))
        + tag.len();
    let rest = &dom[start..];
    &rest[..rest.find('<').unwrap()]
}

fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn status_page_numbers_match_metrics() {
    if !Path::new(&chromium()).exists() {
        skip(&format!("{} not found", chromium()));
        return;
    }
    let dir = std::env::temp_dir().join(format!("kyuu-status-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("kyuu.toml");
    std::fs::write(
        &cfg,
        format!(
            "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = []\nthreads = 1\n\
             [turn]\nstatic_auth_secrets = [\"s3cret\"]\nallow_peers = [\"127.0.0.0/8\"]\n\
             [http]\nlisten = \"127.0.0.1:0\"\n\
             [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[log]\nansi = false\n"
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
    let server = Serve(child);
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
    let after = |label: &str, scheme: &str| -> SocketAddr {
        let l = summary
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .unwrap();
        let a = l.split(scheme).nth(1).unwrap();
        a.split(['/', ' ']).next().unwrap().parse().unwrap()
    };
    let admin = after("admin", "http://");
    let http_addr = after("HTTP", "http://");
    let turn = after("STUN/TURN", "udp  ");

    // Traffic: 20 datagrams of 100 bytes to the peer, 10 of 50 back.
    let cred: serde_json::Value = serde_json::from_str(&http(
        admin,
        "POST",
        "/admin/v1/credentials",
        r#"{"user":"alice"}"#,
    ))
    .unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut c = Client::new(
        cred["username"].as_str().unwrap(),
        cred["password"].as_str().unwrap(),
        false,
    );
    let step = |c: &mut Client| -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 2048];
        loop {
            while let Some(t) = c.poll_transmit() {
                sock.send_to(&t, turn).unwrap();
            }
            if let Some(e) = c.poll_event() {
                return e;
            }
            assert!(Instant::now() < deadline, "no TURN answer");
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                c.handle_input(Instant::now(), &buf[..n]);
            }
            c.handle_timeout(Instant::now());
        }
    };
    c.allocate(Instant::now());
    let Event::Allocated { relayed, .. } = step(&mut c) else {
        panic!("allocate failed")
    };
    c.create_permission(Instant::now(), &[peer.local_addr().unwrap()]);
    assert_eq!(step(&mut c), Event::PermissionCreated);
    let mut buf = [0u8; 2048];
    for _ in 0..20 {
        c.send_indication(peer.local_addr().unwrap(), &[7u8; 100]);
        while let Some(t) = c.poll_transmit() {
            sock.send_to(&t, turn).unwrap();
        }
        let (n, _) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(n, 100);
    }
    for _ in 0..10 {
        peer.send_to(&[9u8; 50], relayed[0]).unwrap();
        assert!(matches!(step(&mut c), Event::Data { .. }));
    }

    // Counters are flushed every second and sampled every two: wait for a few samples.
    std::thread::sleep(Duration::from_millis(4500));
    let url = format!("http://{admin}/status?token={TOKEN}");
    let dom = dump_dom(&url, &["--dump-dom"]);
    let metrics = http(http_addr, "GET", "/metrics", "");
    let bytes = metric_sum(&metrics, "kyuu_turn_relayed_bytes_total");
    let packets = metric_sum(&metrics, "kyuu_turn_relayed_packets_total");
    assert_eq!((bytes, packets), (20 * 100 + 10 * 50, 30), "{metrics}");
    assert_eq!(
        element_text(&dom, "relayed-bytes"),
        bytes.to_string(),
        "{dom}"
    );
    assert_eq!(element_text(&dom, "relayed-packets"), packets.to_string());
    assert_eq!(element_text(&dom, "allocations"), "1");
    assert_eq!(
        element_text(&dom, "allocations"),
        metric_sum(&metrics, "kyuu_turn_allocations").to_string()
    );
    assert!(dom.contains(":alice</td>"), "top users lists alice: {dom}");
    assert!(dom.contains("<polyline"), "charts drawn");
    assert!(dom.contains("data-loaded=\"1\""));
    // The page loads nothing from elsewhere.
    assert!(!dom.contains("src=\"http"), "no external resources");

    // Without the token the page is refused.
    let refused = dump_dom(&format!("http://{admin}/status"), &["--dump-dom"]);
    assert!(!refused.contains("id=\"relayed-bytes\""), "{refused}");

    let shot = artifacts().join("status.png");
    let _ = std::fs::remove_file(&shot);
    dump_dom(&url, &[&format!("--screenshot={}", shot.display())]);
    let len = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(len > 10_000, "screenshot {} is {len} bytes", shot.display());
    println!("status page screenshot: {}", shot.display());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
