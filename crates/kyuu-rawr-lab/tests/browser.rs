//! Two headless Chromium instances, each in its own lab subnet behind symmetric NAT, load a page
//! from their gateway node, get their ICE servers through RAWR (rawr.js and the HTTP form) and
//! open a relay-only data channel, which must run through the ISP node they met at.
//!
//! SKIP without root/nft/coturn (lab) or without Chromium/node/playwright-core, unless
//! `KYUU_BROWSER_REQUIRED=1` (then a failure). Chromium is the system one: nothing is downloaded.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use kyuu_rawr_lab::{LabSpec, RawrLab};

type Mailbox = Arc<Mutex<HashMap<String, String>>>;

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

fn skip(why: &str) {
    assert!(
        std::env::var("KYUU_BROWSER_REQUIRED").as_deref() != Ok("1"),
        "browser test required but cannot run: {why}"
    );
    println!("SKIP rawr browser test: {why}");
}

fn prerequisites() -> Result<(), String> {
    if !Path::new("/usr/bin/chromium").exists() && std::env::var("KYUU_CHROMIUM").is_err() {
        return Err("no /usr/bin/chromium".into());
    }
    if Command::new("node").arg("--version").output().is_err() {
        return Err("no node".into());
    }
    // The tests of this file run in parallel: one `npm ci` at a time (a second one deletes the
    // node_modules the first is filling, and fails).
    static NPM: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _npm = NPM
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = browser_dir();
    if dir.join("node_modules/playwright-core").exists() {
        return Ok(());
    }
    let st = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir)
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .status()
        .map_err(|e| format!("npm: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("npm ci failed: {st}"))
    }
}

async fn page() -> Html<&'static str> {
    Html(include_str!("browser/page.html"))
}

async fn mail_get(State(m): State<Mailbox>, UrlPath(k): UrlPath<String>) -> impl IntoResponse {
    match m.lock().unwrap().get(&k) {
        Some(v) => (StatusCode::OK, v.clone()),
        None => (StatusCode::NOT_FOUND, String::new()),
    }
}

async fn mail_put(State(m): State<Mailbox>, UrlPath(k): UrlPath<String>, body: String) {
    let mut m = m.lock().unwrap();
    if m.len() < 64 && body.len() < 64 * 1024 {
        m.insert(k, body);
    }
}

fn run_browser(child: kyuu_lab::LabChild) -> serde_json::Value {
    let mut out = child.take_stdout().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = child.wait_timeout(Duration::from_secs(120)).unwrap();
    child.kill();
    let text = reader.join().unwrap();
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .unwrap_or_else(|| panic!("no RESULT line (exit {status:?}): {text}"));
    serde_json::from_str(line).unwrap()
}

/// rawr.js over the plain HTTP form.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chromiums_behind_nat_open_a_data_channel_through_the_isp_node() {
    browsers_through_rawr("rawr browser", LabSpec::default(), "http").await;
}

/// The same with `kyuu serve` (STUN/TURN + RAWR on one port) on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chromiums_through_kyuu_serve_nodes() {
    let Some(bin) = kyuu_rawr_lab::kyuu_bin_or_skip("rawr browser kyuu serve") else {
        return;
    };
    let spec = LabSpec {
        server: kyuu_rawr_lab::LabServer::Kyuu(bin),
        ..LabSpec::default()
    };
    browsers_through_rawr("rawr browser kyuu serve", spec, "ws").await;
}

/// `transport`: "ws" (one WebSocket carries Register, Exchange, Connect and the pending
/// indications) or "http" (one POST each).
async fn browsers_through_rawr(test: &str, spec: LabSpec, transport: &str) {
    if let Err(why) = prerequisites() {
        skip(&why);
        return;
    }
    let Some(lab) = RawrLab::build_or_skip(test, spec).await.unwrap() else {
        skip("the network lab cannot run here");
        return;
    };
    let mailbox: Mailbox = Arc::default();
    let mut servers = Vec::new();
    for (router, ip) in [(&lab.homea, "198.19.1.1"), (&lab.homeb, "198.19.2.1")] {
        let node = router.node().clone();
        let l = node.tcp_listen(&format!("{ip}:8080")).unwrap();
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        let factory: kyuu_server::rawr::http::SocketFactory = Arc::new(move || {
            node.udp_bind("0.0.0.0:0")
                .map_err(|e| std::io::Error::other(e.to_string()))
        });
        let rawr_addr: SocketAddr = format!("{ip}:{}", lab.port()).parse().unwrap();
        let app = axum::Router::new()
            .route("/", get(page))
            .route("/mailbox/{key}", get(mail_get).post(mail_put))
            .with_state(mailbox.clone())
            .nest(
                "/rawr",
                kyuu_server::rawr::http::router_with(rawr_addr, factory),
            );
        servers.push(tokio::spawn(async move { axum::serve(l, app).await }));
    }
    let session = hex::encode(rand::random::<[u8; 16]>());
    let root = lab.root_addr();
    let script = browser_dir().join("rawr-e2e.mjs");
    let mut children = Vec::new();
    for (peer, gw, role) in [
        (&lab.pa, "198.19.1.1", "offer"),
        (&lab.pb, "198.19.2.1", "answer"),
    ] {
        let mut cmd = peer.command("node");
        cmd.arg(&script)
            .arg(format!(
                "http://{gw}:8080/?role={role}&session={session}&root={root}&transport={transport}"
            ))
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        children.push(peer.spawn(cmd).unwrap());
    }
    let results: Vec<serde_json::Value> =
        tokio::task::spawn_blocking(move || children.into_iter().map(run_browser).collect())
            .await
            .unwrap();
    for s in servers {
        s.abort();
    }
    println!("browsers: {results:#?}");
    for (r, home) in results.iter().zip(["homea", "homeb"]) {
        assert_eq!(r["ok"], true, "{r}");
        assert_eq!(r["route"], "node", "{r}");
        assert_eq!(r["transport"], transport, "{r}");
        assert_eq!(r["path"], serde_json::json!([home, "isp"]), "{r}");
        assert_eq!(r["pair"]["local"]["type"], "relay", "{r}");
        assert_eq!(r["pair"]["local"]["address"], "198.18.1.1", "{r}");
    }
    if let Some(s) = lab.stats("root").await {
        assert_eq!(s.paired, 0);
    }
}
