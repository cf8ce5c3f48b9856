#![allow(clippy::unwrap_used)]
//! Limits and bad input: each limit is hit, and no other client is affected.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use kyuu_signal::token::{self, Claims};
use kyuu_signal::{IceProvider, SignalConfig};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

async fn close_code(ws: &mut Ws) -> Option<u16> {
    tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    })
    .await
    .expect("connection was not closed")
}

#[tokio::test]
async fn oversized_frames() {
    let cfg = SignalConfig {
        max_message_size: 1000,
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    let mut a = connect(addr, "/a?v=2").await;
    recv_json(&mut a).await;
    let mut b = connect(addr, "/b").await;
    let big = format!(r#"{{"id":"b","x":"{}"}}"#, "y".repeat(1500));
    send(&mut a, &big).await;
    assert_eq!(recv_json(&mut a).await["code"], "too-large");
    silent(&mut b, 100).await;
    // Far too big: the connection is closed with 1009, b is unaffected.
    let huge = format!(r#"{{"id":"b","x":"{}"}}"#, "y".repeat(5000));
    send(&mut a, &huge).await;
    assert_eq!(close_code(&mut a).await, Some(1009));
    let mut c = connect(addr, "/c").await;
    send(&mut c, r#"{"id":"b","fine":1}"#).await;
    assert_eq!(recv(&mut b).await, r#"{"id":"c","fine":1}"#);
}

#[tokio::test]
async fn invalid_input_errors_for_opt_in_clients() {
    let addr = start(SignalConfig::default()).await;
    let mut a = connect(addr, "/a?v=2").await;
    recv_json(&mut a).await;
    for (input, code) in [
        ("{oops", "invalid-json"),
        ("42", "invalid-message"),
        (r#"{"id":7}"#, "invalid-message"),
        (r#"{"type":"nope"}"#, "invalid-message"),
        (r#"{"id":"nobody"}"#, "unknown-peer"),
    ] {
        send(&mut a, input).await;
        assert_eq!(recv_json(&mut a).await["code"], code, "for {input}");
    }
    a.send(Message::Binary(vec![0u8; 10].into())).await.unwrap();
    assert_eq!(recv_json(&mut a).await["code"], "binary-unsupported");
}

#[tokio::test]
async fn rate_limit_drops_excess_only_for_the_sender() {
    let cfg = SignalConfig {
        rate_limit_per_sec: 1,
        rate_limit_burst: 5,
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    let mut a = connect(addr, "/a").await;
    let mut b = connect(addr, "/b").await;
    let mut c = connect(addr, "/c").await;
    for i in 0..20 {
        send(&mut a, &format!(r#"{{"id":"b","n":{i}}}"#)).await;
    }
    for i in 0..5 {
        assert_eq!(recv(&mut b).await, format!(r#"{{"id":"a","n":{i}}}"#));
    }
    silent(&mut b, 200).await;
    send(&mut c, r#"{"id":"b","from":"c"}"#).await;
    assert_eq!(recv(&mut b).await, r#"{"id":"c","from":"c"}"#);
    // The opt-in variant is told.
    let mut d = connect(addr, "/d?v=2").await;
    recv_json(&mut d).await;
    for _ in 0..6 {
        send(&mut d, r#"{"type":"ping"}"#).await;
    }
    for _ in 0..5 {
        assert_eq!(recv_json(&mut d).await["type"], "pong");
    }
    assert_eq!(recv_json(&mut d).await["code"], "rate-limited");
}

#[tokio::test]
async fn connection_caps_refuse_at_handshake() {
    let cfg = SignalConfig {
        max_connections: 3,
        max_connections_per_ip: 2,
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    let _a = connect(addr, "/a").await;
    let _b = connect(addr, "/b").await;
    assert_eq!(try_connect(addr, "/c").await.err(), Some(429));
    // A second loopback address counts separately, until the total cap.
    let other: std::net::SocketAddr = format!("127.0.0.2:{}", addr.port()).parse().unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let _c = tokio_tungstenite::client_async(format!("ws://{addr}/c"), tcp)
        .await
        .unwrap();
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.4:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    match tokio_tungstenite::client_async(format!("ws://{addr}/d"), tcp).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    let _ = other;
    let (status, _) = http_get(addr, "/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn origin_allow_list() {
    let cfg = SignalConfig {
        allowed_origins: vec!["https://good.example".into()],
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    for (origin, ok) in [
        ("https://good.example", true),
        ("https://evil.example", false),
    ] {
        let mut req = format!("ws://{addr}/x{}", ok as u8)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok(_) => assert!(ok),
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => {
                assert!(!ok);
                assert_eq!(r.status(), 403);
            }
            Err(e) => panic!("{e}"),
        }
    }
    // Non-browser clients send no Origin and are allowed.
    connect(addr, "/native").await;
}

#[tokio::test]
async fn token_authentication_at_handshake() {
    let secret = "hunter2";
    let cfg = SignalConfig {
        auth_secret: Some(secret.into()),
        ..SignalConfig::default()
    };
    let ice = IceProvider {
        turn_urls: vec!["turn:127.0.0.1:3478".into()],
        rest_secret: Some("turnsecret".into()),
        ttl: Duration::from_secs(300),
        ..IceProvider::default()
    };
    let addr = start_with(cfg, ice).await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let good = token::issue(
        secret.as_bytes(),
        &Claims {
            sub: "alice".into(),
            rooms: Some(vec!["r".into()]),
            exp: now + 60,
        },
    );
    let expired = token::issue(
        secret.as_bytes(),
        &Claims {
            sub: "alice".into(),
            rooms: None,
            exp: now - 1,
        },
    );
    let forged = token::issue(
        b"wrong",
        &Claims {
            sub: "alice".into(),
            rooms: None,
            exp: now + 60,
        },
    );
    assert_eq!(try_connect(addr, "/alice").await.err(), Some(401));
    assert_eq!(
        try_connect(addr, &format!("/alice?token={expired}"))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        try_connect(addr, &format!("/alice?token={forged}"))
            .await
            .err(),
        Some(401)
    );
    assert_eq!(
        try_connect(addr, &format!("/bob?token={good}")).await.err(),
        Some(403)
    );
    let mut a = connect(addr, &format!("/alice?v=2&token={good}")).await;
    let w = recv_json(&mut a).await;
    assert_eq!(w["you"], "alice");
    assert!(w["iceServers"][0]["username"]
        .as_str()
        .unwrap()
        .ends_with(":alice"));
    send(&mut a, r#"{"type":"join","room":"other"}"#).await;
    assert_eq!(recv_json(&mut a).await["code"], "forbidden");
    // Server-assigned path with a token: the token's id is used.
    let carol = token::issue(
        secret.as_bytes(),
        &Claims {
            sub: "carol".into(),
            rooms: None,
            exp: now + 60,
        },
    );
    let mut b = connect(addr, &format!("/?token={carol}")).await;
    assert_eq!(recv_json(&mut b).await["you"], "carol");
    // ICE credentials need the token too.
    assert_eq!(http_get(addr, "/v1/ice-servers").await.0, 401);
    let (status, resp) = http_get(addr, &format!("/v1/ice-servers?token={good}")).await;
    assert_eq!(status, 200);
    let servers: serde_json::Value = serde_json::from_str(body(&resp)).unwrap();
    assert!(servers[0]["username"].as_str().unwrap().ends_with(":alice"));
}

/// A client that never reads is cut off once its queue and socket buffers are full; the sender
/// and an unrelated pair of clients keep working throughout.
#[tokio::test]
async fn slow_reader_is_cut_off_others_unaffected() {
    let cfg = SignalConfig {
        send_queue: 8,
        rate_limit_per_sec: 100_000,
        rate_limit_burst: 100_000,
        write_timeout_ms: 1_000,
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    // The slow reader: a raw socket with a tiny receive buffer that never reads.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(addr).await.unwrap();
    let (mut slow, _) = tokio_tungstenite::client_async(format!("ws://{addr}/slow"), tcp)
        .await
        .unwrap();
    let mut fast_tx = connect(addr, "/fast-tx").await;
    let mut fast_rx = connect(addr, "/fast-rx").await;
    let mut blaster = connect(addr, "/blaster").await;
    let chunk = "z".repeat(30_000);
    let msg = format!(r#"{{"id":"slow","x":"{chunk}"}}"#);
    let mut cut = false;
    for i in 0..400 {
        send(&mut blaster, &msg).await;
        if i % 20 == 0 {
            send(&mut fast_tx, &format!(r#"{{"id":"fast-rx","i":{i}}}"#)).await;
            assert_eq!(
                recv(&mut fast_rx).await,
                format!(r#"{{"id":"fast-tx","i":{i}}}"#)
            );
            let (status, resp) = http_get(addr, "/healthz").await;
            assert_eq!(status, 200);
            if body(&resp).contains("\"connections\":3") {
                cut = true;
                break;
            }
        }
    }
    assert!(cut, "slow reader was never cut off");
    // The blaster itself is fine.
    send(&mut fast_rx, r#"{"id":"blaster","still":"here"}"#).await;
    assert_eq!(
        recv(&mut blaster).await,
        r#"{"id":"fast-rx","still":"here"}"#
    );
    // The slow reader, once it reads, sees the end of its connection.
    let mut n = 0;
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(5), slow.next()).await {
        n += 1;
        if m.is_close() {
            break;
        }
    }
    assert!(n > 0);
}

#[tokio::test]
async fn keepalive_pings_and_idle_timeout() {
    let cfg = SignalConfig {
        ping_interval_secs: 1,
        idle_timeout_secs: 2,
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    let mut a = connect(addr, "/a").await;
    // Reading answers pings automatically, so this client stays alive and sees a ping.
    let got_ping = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(Ok(Message::Ping(_))) = a.next().await {
                return true;
            }
        }
    })
    .await
    .unwrap();
    assert!(got_ping);
    // A raw TCP peer that completes the handshake and then goes silent is dropped.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(
        format!(
            "GET /mute HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let ended = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            match raw.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await
    .unwrap();
    assert!(ended);
}

#[tokio::test]
async fn http_endpoints() {
    let ice = IceProvider {
        stun_urls: vec!["stun:127.0.0.1:3478".into()],
        turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
        rest_secret: Some("secret".into()),
        ttl: Duration::from_secs(600),
    };
    let addr = start_with(SignalConfig::default(), ice).await;
    let (s, resp) = http_get(addr, "/healthz").await;
    assert_eq!(s, 200);
    assert!(body(&resp).contains("\"status\":\"ok\""));
    let (s, resp) = http_get(addr, "/v1/ice-servers?user=web").await;
    assert_eq!(s, 200);
    assert!(resp
        .to_ascii_lowercase()
        .contains("cache-control: no-store"));
    let servers: Vec<kyuu_signal::IceServer> = serde_json::from_str(body(&resp)).unwrap();
    assert_eq!(servers[0].urls, ["stun:127.0.0.1:3478"]);
    let user = servers[1].username.clone().unwrap();
    assert!(user.ends_with(":web"));
    assert_eq!(
        servers[1].credential.as_deref(),
        Some(IceProvider::turn_credential("secret", &user).as_str())
    );
    let (s, resp) = http_get(addr, "/").await;
    assert_eq!(s, 200);
    assert!(resp.contains("<html"));
    let (s, resp) = http_get(addr, "/check").await;
    assert_eq!(s, 200);
    assert!(resp.contains("<html"));
    assert_eq!(http_get(addr, "/kyuu.js").await.0, 200);
    assert_eq!(http_get(addr, "/some-id").await.0, 404);
}

/// Without `auth_secret`, credential minting is limited per source: `/v1/ice-servers` answers
/// 429 past the burst, and the welcome then carries STUN servers only; with a token, no limit.
#[tokio::test]
async fn open_minting_is_rate_limited_per_source() {
    let ice = IceProvider {
        stun_urls: vec!["stun:127.0.0.1:3478".into()],
        turn_urls: vec!["turn:127.0.0.1:3478?transport=udp".into()],
        rest_secret: Some("secret".into()),
        ttl: Duration::from_secs(600),
    };
    let cfg = SignalConfig {
        mint_rate_per_min: 1,
        mint_burst: 3,
        ..SignalConfig::default()
    };
    let addr = start_with(cfg.clone(), ice.clone()).await;
    let mut users = Vec::new();
    for _ in 0..3 {
        let (s, resp) = http_get(addr, "/v1/ice-servers").await;
        assert_eq!(s, 200);
        let servers: Vec<kyuu_signal::IceServer> = serde_json::from_str(body(&resp)).unwrap();
        users.push(servers[1].username.clone().unwrap());
    }
    // Each open-minted credential has a user of its own (turn.user_quota applies per credential).
    users.sort();
    users.dedup();
    assert_eq!(users.len(), 3, "{users:?}");
    let (s, resp) = http_get(addr, "/v1/ice-servers").await;
    assert_eq!(s, 429, "{resp}");
    assert!(resp.to_ascii_lowercase().contains("retry-after: 60"));
    // The welcome still works, without TURN credentials.
    let mut a = connect(addr, "/?v=2").await;
    let welcome = recv_json(&mut a).await;
    let servers = welcome["iceServers"].as_array().expect("iceServers");
    assert_eq!(servers.len(), 1, "{welcome}");
    assert!(servers[0].get("username").is_none(), "{welcome}");

    // With access tokens every authenticated request is served.
    let secret = "tok-secret";
    let addr = start_with(
        SignalConfig {
            auth_secret: Some(secret.into()),
            ..cfg
        },
        ice,
    )
    .await;
    let good = token::issue(
        secret.as_bytes(),
        &Claims {
            sub: "alice".into(),
            rooms: None,
            exp: u64::MAX / 2,
        },
    );
    for _ in 0..6 {
        let (s, _) = http_get(addr, &format!("/v1/ice-servers?token={good}")).await;
        assert_eq!(s, 200);
    }
}
