//! The admin API over real sockets: a TURN client allocates and relays through a real peer
//! socket and a WebSocket client connects to signaling; the API lists, kills, mints and checks
//! credentials, reloads the configuration file (and refuses a broken one, changing nothing),
//! and drains. Every response is checked against the fields `docs/admin-openapi.json` requires.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use kyuu_client::turn::{Client, Event};
use kyuu_server::admin::{Hooks, OPENAPI};
use kyuu_server::config::Config;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UdpSocket;

const TOKEN: &str = "test-admin-token-0123456789";

/// Fields the OpenAPI document requires of `schema`, checked recursively on `v`.
fn check_schema(doc: &Value, schema: &Value, v: &Value, at: &str) {
    let schema = match schema["$ref"].as_str() {
        Some(r) => {
            let name = r.rsplit('/').next().unwrap();
            &doc["components"]["schemas"][name]
        }
        None => schema,
    };
    match schema["type"].as_str() {
        Some("object") => {
            let obj = v
                .as_object()
                .unwrap_or_else(|| panic!("{at}: not an object: {v}"));
            for f in schema["required"].as_array().into_iter().flatten() {
                let f = f.as_str().unwrap();
                assert!(obj.contains_key(f), "{at}: missing field {f:?} in {v}");
            }
            if let Some(props) = schema["properties"].as_object() {
                for (k, s) in props {
                    if let Some(x) = obj.get(k).filter(|x| !x.is_null()) {
                        check_schema(doc, s, x, &format!("{at}.{k}"));
                    }
                }
            }
        }
        Some("array") => {
            let arr = v
                .as_array()
                .unwrap_or_else(|| panic!("{at}: not an array: {v}"));
            for (i, x) in arr.iter().enumerate() {
                check_schema(doc, &schema["items"], x, &format!("{at}[{i}]"));
            }
        }
        Some("integer") => assert!(v.is_u64() || v.is_i64(), "{at}: not an integer: {v}"),
        Some("number") => assert!(v.is_number(), "{at}: not a number: {v}"),
        Some("string") => assert!(v.is_string(), "{at}: not a string: {v}"),
        Some("boolean") => assert!(v.is_boolean(), "{at}: not a boolean: {v}"),
        _ => {}
    }
}

/// Checks a 200 body against the documented response of `method path`.
fn documented(method: &str, path: &str, body: &Value) {
    let doc: Value = serde_json::from_str(OPENAPI).unwrap();
    let op = &doc["paths"][path][method.to_lowercase()];
    assert!(op.is_object(), "{method} {path} is not documented");
    let schema = &op["responses"]["200"]["content"]["application/json"]["schema"];
    check_schema(&doc, schema, body, &format!("{method} {path}"));
}

/// One HTTP/1.1 request; returns the status and the body (JSON when it parses).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let ctype = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}{ctype}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
        .await
        .expect("admin API timed out")
        .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let v = serde_json::from_str(body).unwrap_or(Value::String(body.to_owned()));
    (status, v)
}

struct Udp {
    c: Client,
    s: UdpSocket,
    server: SocketAddr,
}

impl Udp {
    async fn new(server: SocketAddr, user: &str, pass: &str) -> Self {
        Udp {
            c: Client::new(user, pass, false),
            s: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
            server,
        }
    }

    async fn event(&mut self) -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        loop {
            while let Some(b) = self.c.poll_transmit() {
                self.s.send_to(&b, self.server).await.unwrap();
            }
            if let Some(e) = self.c.poll_event() {
                return e;
            }
            assert!(Instant::now() < deadline, "no event");
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(100), self.s.recv_from(&mut buf)).await
            {
                self.c.handle_input(Instant::now(), &buf[..n]);
            }
            self.c.handle_timeout(Instant::now());
        }
    }
}

fn base_toml(extra_users: &str) -> String {
    format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = []\nthreads = 2\n\
         [turn]\nstatic_auth_secrets = [\"s3cret\"]\nallow_peers = [\"127.0.0.0/8\"]\nunauth_rate = 0\n\
         {extra_users}\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"
    )
}

async fn start(file: &Path) -> kyuu_server::Running {
    let config = Config::from_file(file).unwrap();
    config.validate().unwrap();
    let path = file.to_path_buf();
    let hooks = Hooks {
        log_level: Some(Arc::new(|_: &str| Ok(()))),
        reload_config: Some(Arc::new(move || {
            let c = Config::from_file(&path).map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string())?;
            Ok(c)
        })),
    };
    kyuu_server::start_with(config, hooks).await.unwrap()
}

fn temp_file(name: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kyuu-admin-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("kyuu.toml");
    std::fs::write(&f, text).unwrap();
    f
}

#[tokio::test]
async fn sessions_kill_credentials_reload() {
    let file = temp_file("main", &base_toml(""));
    let running = start(&file).await;
    let admin = running.admin_addr.expect("admin listener");
    let turn = running.listeners[0].1;
    let t = Some(TOKEN);

    // No token, wrong token: 401, nothing listed.
    assert_eq!(
        http(admin, "GET", "/admin/v1/allocations", None, None)
            .await
            .0,
        401
    );
    assert_eq!(
        http(
            admin,
            "GET",
            "/admin/v1/allocations",
            Some("wrong-token-0123456789"),
            None
        )
        .await
        .0,
        401
    );
    assert_eq!(http(admin, "GET", "/status", None, None).await.0, 401);

    // Mint credentials through the API and allocate with them.
    let (st, cred) = http(
        admin,
        "POST",
        "/admin/v1/credentials",
        t,
        Some(json!({"user": "alice", "ttl_secs": 600})),
    )
    .await;
    assert_eq!(st, 200, "{cred}");
    documented("POST", "/admin/v1/credentials", &cred);
    let user = cred["username"].as_str().unwrap().to_owned();
    let pass = cred["password"].as_str().unwrap().to_owned();
    assert!(user.ends_with(":alice"));
    let (st, check) = http(
        admin,
        "POST",
        "/admin/v1/credentials/check",
        t,
        Some(json!({"username": user, "password": pass})),
    )
    .await;
    assert_eq!((st, check["valid"].as_bool()), (200, Some(true)), "{check}");
    documented("POST", "/admin/v1/credentials/check", &check);

    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut u = Udp::new(turn, &user, &pass).await;
    u.c.allocate(Instant::now());
    let Event::Allocated { relayed, .. } = u.event().await else {
        panic!("allocate failed")
    };
    u.c.create_permission(Instant::now(), &[peer_addr]);
    assert_eq!(u.event().await, Event::PermissionCreated);
    u.c.send_indication(peer_addr, b"12345678");
    while let Some(b) = u.c.poll_transmit() {
        u.s.send_to(&b, turn).await.unwrap();
    }
    let mut buf = [0u8; 64];
    let (n, _) = tokio::time::timeout(Duration::from_secs(2), peer.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf[..n], b"12345678");

    // The allocation as the API lists it.
    let (st, list) = http(admin, "GET", "/admin/v1/allocations", t, None).await;
    assert_eq!(st, 200);
    documented("GET", "/admin/v1/allocations", &list);
    assert_eq!(list["count"], 1, "{list}");
    let a = &list["allocations"][0];
    assert_eq!(a["username"], json!(user));
    assert_eq!(a["client"], json!(u.s.local_addr().unwrap().to_string()));
    assert_eq!(a["transport"], "udp");
    assert_eq!(a["relayed"], json!([relayed[0].to_string()]));
    assert_eq!(a["permissions"], json!(["127.0.0.1"]));
    assert_eq!(a["to_peer_packets"], 1);
    assert_eq!(a["to_peer_bytes"], 8);
    let id = a["id"].as_str().unwrap().to_owned();

    // A signaling connection, listed and closed.
    let http_addr = running.http_addr.unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{http_addr}/bob"))
        .await
        .unwrap();
    let (st, sig) = http(admin, "GET", "/admin/v1/signaling", t, None).await;
    assert_eq!(st, 200);
    documented("GET", "/admin/v1/signaling", &sig);
    assert_eq!(sig["connections"][0]["id"], "bob", "{sig}");
    let (st, k) = http(admin, "DELETE", "/admin/v1/signaling/bob", t, None).await;
    assert_eq!(st, 200, "{k}");
    documented("DELETE", "/admin/v1/signaling/{id}", &k);
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match ws.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(f))) => return f,
                None | Some(Err(_)) => return None,
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("signaling connection not closed");
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(1008));
    assert_eq!(
        http(admin, "DELETE", "/admin/v1/signaling/bob", t, None)
            .await
            .0,
        404
    );

    // Kill the allocation: gone from the list, its relay socket closed.
    let (st, k) = http(
        admin,
        "DELETE",
        &format!("/admin/v1/allocations/{id}"),
        t,
        None,
    )
    .await;
    assert_eq!(st, 200, "{k}");
    documented("DELETE", "/admin/v1/allocations/{id}", &k);
    let (_, list) = http(admin, "GET", "/admin/v1/allocations", t, None).await;
    assert_eq!(list["count"], 0, "{list}");
    assert_eq!(
        http(
            admin,
            "DELETE",
            &format!("/admin/v1/allocations/{id}"),
            t,
            None
        )
        .await
        .0,
        404
    );
    u.c.refresh(Instant::now(), 600);
    assert!(
        matches!(u.event().await, Event::Error { code: 437, .. }),
        "a killed allocation is gone for the client too"
    );

    // Log level: invalid refused, valid applied.
    let (st, _) = http(
        admin,
        "PUT",
        "/admin/v1/loglevel",
        t,
        Some(json!({"level": "info,=x=y"})),
    )
    .await;
    assert_eq!(st, 400);
    let (st, lv) = http(
        admin,
        "PUT",
        "/admin/v1/loglevel",
        t,
        Some(json!({"level": "debug"})),
    )
    .await;
    assert_eq!((st, lv["level"].as_str()), (200, Some("debug")));
    documented("PUT", "/admin/v1/loglevel", &lv);
    let (_, lv) = http(admin, "GET", "/admin/v1/loglevel", t, None).await;
    documented("GET", "/admin/v1/loglevel", &lv);
    assert_eq!(lv["level"], "debug");

    // Reload: a new static user becomes valid; a broken file changes nothing.
    let (_, c) = http(
        admin,
        "POST",
        "/admin/v1/credentials/check",
        t,
        Some(json!({"username": "carol", "password": "pw"})),
    )
    .await;
    assert_eq!(c["reason"], "unknown_user");
    std::fs::write(
        &file,
        base_toml("[[turn.users]]\nname = \"carol\"\npassword = \"pw\"\n")
            .replace("threads = 2", "threads = 3"),
    )
    .unwrap();
    let (st, r) = http(admin, "POST", "/admin/v1/reload", t, None).await;
    assert_eq!(st, 200, "{r}");
    documented("POST", "/admin/v1/reload", &r);
    // The file's log level replaces the one set through the API above.
    assert_eq!(r["applied"], json!(["log.level", "turn"]), "{r}");
    assert_eq!(r["restart_needed"], json!(["listen"]), "{r}");
    let mut carol = Udp::new(turn, "carol", "pw").await;
    carol.c.allocate(Instant::now());
    assert!(matches!(carol.event().await, Event::Allocated { .. }));

    std::fs::write(&file, "[turn]\nrelay_ports = { min = 6, max = 5 }\n").unwrap();
    let (st, e) = http(admin, "POST", "/admin/v1/reload", t, None).await;
    assert_eq!(st, 400);
    assert!(
        e["error"].as_str().unwrap().starts_with("turn.relay_ports"),
        "{e}"
    );
    let (_, c) = http(
        admin,
        "POST",
        "/admin/v1/credentials/check",
        t,
        Some(json!({"username": "carol", "password": "pw"})),
    )
    .await;
    assert_eq!(
        c["valid"], true,
        "a refused reload keeps the running configuration"
    );

    // Stats and the OpenAPI document itself.
    let (st, s) = http(admin, "GET", "/admin/v1/stats", t, None).await;
    assert_eq!(st, 200);
    documented("GET", "/admin/v1/stats", &s);
    let (st, doc) = http(admin, "GET", "/admin/v1/openapi.json", t, None).await;
    assert_eq!((st, doc["openapi"].as_str()), (200, Some("3.0.3")));
    let (st, d) = http(admin, "GET", "/admin/v1/drain", t, None).await;
    assert_eq!((st, d["draining"].as_bool()), (200, Some(false)));
    documented("GET", "/admin/v1/drain", &d);

    running.shutdown(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// Drain: new allocations get 486 (or 300 with an alternate), the server exits by itself when
/// the last allocation ends.
#[tokio::test]
async fn drain_refuses_new_allocations_and_exits_when_empty() {
    let file = temp_file("drain", &base_toml(""));
    let mut running = start(&file).await;
    let admin = running.admin_addr.unwrap();
    let turn = running.listeners[0].1;
    let t = Some(TOKEN);
    let (_, cred) = http(admin, "POST", "/admin/v1/credentials", t, None).await;
    let (user, pass) = (
        cred["username"].as_str().unwrap().to_owned(),
        cred["password"].as_str().unwrap().to_owned(),
    );
    let mut first = Udp::new(turn, &user, &pass).await;
    first.c.allocate(Instant::now());
    assert!(matches!(first.event().await, Event::Allocated { .. }));

    let (st, d) = http(
        admin,
        "POST",
        "/admin/v1/drain",
        t,
        Some(json!({"deadline_secs": 60})),
    )
    .await;
    assert_eq!(st, 200, "{d}");
    documented("POST", "/admin/v1/drain", &d);
    assert_eq!(
        (d["draining"].as_bool(), d["allocations"].as_u64()),
        (Some(true), Some(1))
    );

    let mut late = Udp::new(turn, &user, &pass).await;
    late.c.allocate(Instant::now());
    assert!(
        matches!(late.event().await, Event::Error { code: 486, .. }),
        "no new allocations while draining"
    );
    // The server is still up for the existing allocation...
    assert!(
        tokio::time::timeout(Duration::from_millis(500), running.wait())
            .await
            .is_err()
    );
    // ...and ends when it ends.
    first.c.refresh(Instant::now(), 0);
    assert_eq!(first.event().await, Event::Refreshed { lifetime: 0 });
    tokio::time::timeout(Duration::from_secs(5), running.wait())
        .await
        .expect("server did not exit after the drain")
        .unwrap();
    running.shutdown(Duration::from_millis(200)).await;
    let _ = std::fs::remove_dir_all(file.parent().unwrap());
}

/// Only the token guards a non-loopback admin listener, and without a separate listener the
/// API rides on the HTTP port, still behind the token.
#[tokio::test]
async fn admin_placement_and_refusals() {
    let mut c = Config::default();
    c.admin.listen = Some("0.0.0.0:0".parse().unwrap());
    let e = c.validate().unwrap_err().to_string();
    assert!(
        e.starts_with("admin.listen: 0.0.0.0:0 is not a loopback address"),
        "{e}"
    );

    let mut c = Config::from_toml(&base_toml(""), "t").unwrap();
    c.admin.listen = None;
    c.validate().unwrap();
    let running = kyuu_server::start(c).await.unwrap();
    assert!(running.admin_addr.is_none());
    let h = running.http_addr.unwrap();
    assert_eq!(
        http(h, "GET", "/admin/v1/allocations", None, None).await.0,
        401
    );
    let (st, v) = http(h, "GET", "/admin/v1/allocations", Some(TOKEN), None).await;
    assert_eq!((st, v["count"].as_u64()), (200, Some(0)));
    // Signaling and health still answer on the same port.
    assert_eq!(http(h, "GET", "/healthz", None, None).await.0, 200);
    // Off by default: no admin routes at all.
    running.shutdown(Duration::from_millis(100)).await;
    let mut c = Config::from_toml(&base_toml(""), "t").unwrap();
    c.admin = Default::default();
    let running = kyuu_server::start(c).await.unwrap();
    let h = running.http_addr.unwrap();
    let (st, _) = http(h, "GET", "/admin/v1/allocations", Some(TOKEN), None).await;
    assert_ne!(st, 200);
    running.shutdown(Duration::from_millis(100)).await;
}
