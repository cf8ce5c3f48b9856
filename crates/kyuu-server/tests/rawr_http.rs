//! The HTTP form of the control plane (what rawr.js calls), over loopback.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use kyuu_rawr::config::{ChildConfig, GatewayConfig, RawrConfig};
use kyuu_server::rawr::runtime::{spawn_node, NodeHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

async fn node(name: &str, gw: Option<SocketAddr>, children: &[&str]) -> NodeHandle {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = sock.local_addr().unwrap();
    let cfg = RawrConfig {
        enabled: true,
        name: name.into(),
        self_addrs: vec![me],
        relay: vec![format!("turn:{me}?transport=udp")],
        secret: "s".into(),
        gateway: gw.map(|addr| GatewayConfig {
            addr,
            key: Some(format!("k-{name}")),
        }),
        children: children
            .iter()
            .map(|c| ChildConfig {
                name: (*c).into(),
                key: format!("k-{c}"),
            })
            .collect(),
        ..RawrConfig::default()
    };
    spawn_node(cfg, sock).unwrap()
}

async fn serve(node: SocketAddr) -> SocketAddr {
    let app = axum::Router::new().nest("/rawr", kyuu_server::rawr::http::router(node));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    a
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

async fn browser(gw: SocketAddr, root: SocketAddr, session: &str, mac: &str) -> serde_json::Value {
    let (st, _) = http(
        gw,
        "POST",
        "/rawr/register",
        &format!(r#"{{"mac":"{mac}"}}"#),
    )
    .await;
    assert_eq!(st, 200);
    let (st, body) = http(
        gw,
        "POST",
        "/rawr/exchange",
        &format!(r#"{{"session":"{session}","mac":"{mac}","root":"{root}"}}"#),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    let other: serde_json::Value = serde_json::from_str(&body).unwrap();
    let target = other["mac"].as_str().unwrap();
    let (st, body) = http(
        gw,
        "POST",
        "/rawr/connect",
        &format!(r#"{{"session":"{session}","mac":"{mac}","target":"{target}","root":"{root}"}}"#),
    )
    .await;
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn browsers_meet_at_the_isp_through_the_http_form() {
    let root = node("root", None, &[]).await;
    let isp = node("isp", None, &["homea", "homeb"]).await;
    let ha = node("homea", Some(isp.local_addr()), &[]).await;
    let hb = node("homeb", Some(isp.local_addr()), &[]).await;
    let (wa, wb) = (serve(ha.local_addr()).await, serve(hb.local_addr()).await);
    let session = hex::encode(rand::random::<[u8; 16]>());
    let r = root.local_addr();
    let (a, b) = tokio::join!(
        browser(wa, r, &session, "02:00:00:00:00:0a"),
        browser(wb, r, &session, "02:00:00:00:00:0b"),
    );
    assert_eq!(a["path"], serde_json::json!(["homea", "isp"]));
    assert_eq!(b["path"], serde_json::json!(["homeb", "isp"]));
    assert_eq!(a["atRoot"], false);
    assert!(a["iceServers"][0]["urls"][0]
        .as_str()
        .unwrap()
        .starts_with("turn:127.0.0.1:"));
    let (st, js) = http(wa, "GET", "/rawr/rawr.js", "").await;
    assert_eq!(st, 200);
    assert!(js.contains("rawrIceServers"));
    // Bad input is a 400 with a reason, not a crash.
    let (st, body) = http(wa, "POST", "/rawr/register", r#"{"mac":"nope"}"#).await;
    assert_eq!(st, 400, "{body}");
    drop((root, isp, ha, hb));
}

/// A browser over the WebSocket form: one connection, Exchange and Connect sent at once.
async fn ws_browser(
    gw: SocketAddr,
    root: SocketAddr,
    session: &str,
    mac: &str,
) -> (serde_json::Value, usize) {
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{gw}/rawr/ws"))
        .await
        .unwrap();
    let send = |v: serde_json::Value| Message::Text(v.to_string().into());
    ws.send(send(
        serde_json::json!({"op": "register", "id": 1, "mac": mac}),
    ))
    .await
    .unwrap();
    ws.send(send(serde_json::json!({"op": "connect", "id": 2, "session": session, "mac": mac, "root": root.to_string()})))
        .await
        .unwrap();
    ws.send(send(serde_json::json!({"op": "exchange", "id": 3, "session": session, "mac": mac, "root": root.to_string()})))
        .await
        .unwrap();
    ws.send(send(serde_json::json!({"op": "nope", "id": 4})))
        .await
        .unwrap();
    let mut pending = 0;
    let mut results = std::collections::HashMap::new();
    while results.len() < 4 {
        let m = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Message::Text(t) = m else { continue };
        let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap();
        if v["pending"] == true {
            pending += 1;
            continue;
        }
        results.insert(v["id"].as_u64().unwrap(), v);
    }
    assert_eq!(results[&4]["code"], 400, "{:?}", results[&4]);
    assert_eq!(results[&1]["result"]["lifetime"], 600);
    assert!(results[&3]["result"]["mac"].is_string());
    (results[&2]["result"].clone(), pending)
}

#[tokio::test]
async fn browsers_meet_at_the_isp_over_one_websocket_each() {
    let root = node("root", None, &[]).await;
    let isp = node("isp", None, &["homea", "homeb"]).await;
    let ha = node("homea", Some(isp.local_addr()), &[]).await;
    let hb = node("homeb", Some(isp.local_addr()), &[]).await;
    let (wa, wb) = (serve(ha.local_addr()).await, serve(hb.local_addr()).await);
    let session = hex::encode(rand::random::<[u8; 16]>());
    let r = root.local_addr();
    let (a, b) = tokio::join!(
        ws_browser(wa, r, &session, "02:00:00:00:00:0a"),
        ws_browser(wb, r, &session, "02:00:00:00:00:0b"),
    );
    assert_eq!(a.0["path"], serde_json::json!(["homea", "isp"]));
    assert_eq!(b.0["path"], serde_json::json!(["homeb", "isp"]));
    // Somebody waited: at least one held request's pending indication reached its browser.
    assert!(a.1 + b.1 >= 1, "no pending indication over the WebSocket");
    drop((root, isp, ha, hb));
}
