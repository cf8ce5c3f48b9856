#![allow(clippy::unwrap_used)]
//! Wire-format tests: raw tokio-tungstenite clients speaking exactly what libdatachannel's
//! clients and the seed 004 log send.

mod common;

use common::*;
use kyuu_signal::SignalConfig;
use serde_json::json;

const SEED: &str = include_str!("fixtures/seed004.log");

/// Replays the seed 004 log: each `Client X << M` is sent by X, and the next line
/// `Client Y >> M'` must arrive at Y byte for byte.
#[tokio::test]
async fn seed_004_log_replays_byte_exact() {
    let addr = start(SignalConfig::default()).await;
    let mut a = connect(addr, "/3251357a").await;
    let mut b = connect(addr, "/4626b02b").await;
    let lines: Vec<&str> = SEED.lines().collect();
    let mut exchanged = 0;
    for pair in lines.windows(2) {
        let (Some(sent), Some(got)) = (parse_line(pair[0]), parse_line(pair[1])) else {
            continue;
        };
        let ((from, "<<", msg), (to, ">>", expected)) = (sent, got) else {
            continue;
        };
        let (src, dst) = match from {
            "3251357a" => (&mut a, &mut b),
            _ => (&mut b, &mut a),
        };
        assert_ne!(from, to);
        send(src, msg).await;
        assert_eq!(recv(dst).await, expected);
        exchanged += 1;
    }
    assert_eq!(exchanged, 6, "offer, answer and four candidates");
    silent(&mut a, 100).await;
    silent(&mut b, 100).await;
}

fn parse_line(l: &str) -> Option<(&str, &str, &str)> {
    let rest = l.strip_prefix("Client ")?;
    let (id, rest) = rest.split_once(' ')?;
    let (dir, msg) = rest.split_once(' ')?;
    Some((id, dir, msg))
}

/// libdatachannel's examples/client and examples/web message shapes.
#[tokio::test]
async fn libdatachannel_client_exchange() {
    let addr = start(SignalConfig::default()).await;
    let mut offerer = connect(addr, "/abcd").await;
    let mut answerer = connect(addr, "/wxyz").await;
    let offer =
        r#"{"id":"wxyz","type":"offer","description":"v=0\r\no=rtc 1 0 IN IP4 127.0.0.1\r\n"}"#;
    send(&mut offerer, offer).await;
    assert_eq!(
        recv(&mut answerer).await,
        r#"{"id":"abcd","type":"offer","description":"v=0\r\no=rtc 1 0 IN IP4 127.0.0.1\r\n"}"#
    );
    send(
        &mut answerer,
        r#"{"id":"abcd","type":"answer","description":"v=0\r\n"}"#,
    )
    .await;
    assert_eq!(
        recv(&mut offerer).await,
        r#"{"id":"wxyz","type":"answer","description":"v=0\r\n"}"#
    );
    send(
        &mut offerer,
        r#"{"id":"wxyz","type":"candidate","candidate":"a=candidate:1 1 UDP 2122317823 192.0.2.1 5000 typ host","mid":"0"}"#,
    )
    .await;
    assert_eq!(
        recv(&mut answerer).await,
        r#"{"id":"abcd","type":"candidate","candidate":"a=candidate:1 1 UDP 2122317823 192.0.2.1 5000 typ host","mid":"0"}"#
    );
}

#[tokio::test]
async fn query_string_is_not_part_of_the_id_and_extra_segments_ignored() {
    let addr = start(SignalConfig::default()).await;
    let mut a = connect(addr, "/alpha?foo=bar").await;
    let mut b = connect(addr, "/beta/extra/segments").await;
    send(&mut a, r#"{"id":"beta","x":1}"#).await;
    assert_eq!(recv(&mut b).await, r#"{"id":"alpha","x":1}"#);
}

#[tokio::test]
async fn legacy_clients_see_nothing_new_on_bad_input() {
    let addr = start(SignalConfig::default()).await;
    let mut a = connect(addr, "/a").await;
    let mut b = connect(addr, "/b").await;
    for bad in [
        "not json",
        "[1,2]",
        r#"{"id":5}"#,
        r#"{"id":"nobody","x":1}"#,
        r#"{"type":"bogus"}"#,
    ] {
        send(&mut a, bad).await;
    }
    use futures_util::SinkExt;
    a.send(tokio_tungstenite::tungstenite::Message::Binary(
        vec![1, 2, 3].into(),
    ))
    .await
    .unwrap();
    silent(&mut a, 200).await;
    silent(&mut b, 50).await;
    // Still connected and relaying.
    send(&mut a, r#"{"id":"b","ok":true}"#).await;
    assert_eq!(recv(&mut b).await, r#"{"id":"a","ok":true}"#);
}

#[tokio::test]
async fn reconnect_with_same_id_old_cleanup_does_not_remove_new() {
    let addr = start(SignalConfig::default()).await;
    let old = connect(addr, "/robot").await;
    let mut new = connect(addr, "/robot").await;
    drop(old); // its disconnect arrives after the new connection registered
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut cloud = connect(addr, "/cloud").await;
    send(&mut cloud, r#"{"id":"robot","n":1}"#).await;
    assert_eq!(recv(&mut new).await, r#"{"id":"cloud","n":1}"#);
}

#[tokio::test]
async fn opt_in_welcome_rooms_directory_over_the_wire() {
    let addr = start(SignalConfig::default()).await;
    let mut alice = connect(addr, "/").await;
    let w = recv_json(&mut alice).await;
    assert_eq!(w["type"], "welcome");
    let alice_id = w["you"].as_str().unwrap().to_owned();
    assert!(w["resume"].is_string());
    assert!(w["iceServers"].is_array());

    send(&mut alice, r#"{"type":"publish","name":"alice"}"#).await;
    assert_eq!(
        recv_json(&mut alice).await,
        json!({"type":"published","name":"alice","peer":alice_id})
    );
    let mut bob = connect(addr, "/bob?v=2").await;
    assert_eq!(recv_json(&mut bob).await["you"], "bob");
    send(&mut bob, r#"{"type":"lookup","name":"alice"}"#).await;
    let l = recv_json(&mut bob).await;
    assert_eq!(l["peers"], json!([alice_id]));
    send(
        &mut bob,
        &format!(r#"{{"id":"{alice_id}","type":"offer","description":"x"}}"#),
    )
    .await;
    assert_eq!(
        recv(&mut alice).await,
        r#"{"id":"bob","type":"offer","description":"x"}"#
    );

    send(&mut alice, r#"{"type":"join","room":"lobby"}"#).await;
    assert_eq!(recv_json(&mut alice).await["members"], json!([alice_id]));
    send(&mut bob, r#"{"type":"join","room":"lobby"}"#).await;
    assert_eq!(
        recv_json(&mut alice).await,
        json!({"type":"joined","room":"lobby","peer":"bob"})
    );
    assert_eq!(
        recv_json(&mut bob).await["members"],
        json!([alice_id, "bob"])
    );
    send(&mut bob, r#"{"type":"ping","ts":42}"#).await;
    assert_eq!(recv_json(&mut bob).await, json!({"type":"pong","ts":42}));
    drop(bob);
    assert_eq!(
        recv_json(&mut alice).await,
        json!({"type":"left","room":"lobby","peer":"bob"})
    );
}

#[tokio::test]
async fn resume_token_takes_the_id_over() {
    let addr = start(SignalConfig::default()).await;
    let mut first = connect(addr, "/cam?v=2").await;
    let token = recv_json(&mut first).await["resume"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(try_connect(addr, "/cam").await.err(), Some(409));
    assert_eq!(
        try_connect(addr, "/cam?v=2&resume=bad").await.err(),
        Some(409)
    );
    let mut second = connect(addr, &format!("/cam?v=2&resume={token}")).await;
    assert_eq!(recv_json(&mut second).await["you"], "cam");
    // The old connection is closed with 4000.
    use futures_util::StreamExt;
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match first.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                    return u16::from(f.code)
                }
                Some(Ok(_)) => continue,
                _ => return 0,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(closed, 4000);
    let mut peer = connect(addr, "/peer").await;
    send(&mut peer, r#"{"id":"cam","hi":1}"#).await;
    assert_eq!(recv(&mut second).await, r#"{"id":"peer","hi":1}"#);
}

#[tokio::test]
async fn held_message_reaches_reconnecting_peer() {
    let addr = start(SignalConfig::default()).await;
    let robot = connect(addr, "/robot").await;
    let mut cloud = connect(addr, "/cloud?v=2").await;
    recv_json(&mut cloud).await;
    drop(robot);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    send(&mut cloud, r#"{"id":"robot","n":1}"#).await;
    let mut robot = connect(addr, "/robot").await;
    assert_eq!(recv(&mut robot).await, r#"{"id":"cloud","n":1}"#);
}

#[tokio::test]
async fn held_message_expiry_and_unknown_peer_errors() {
    let cfg = SignalConfig {
        pending_ttl_ms: 200,
        ..SignalConfig::default()
    };
    let addr = start(cfg).await;
    let robot = connect(addr, "/robot").await;
    let mut cloud = connect(addr, "/cloud?v=2").await;
    recv_json(&mut cloud).await;
    send(&mut cloud, r#"{"id":"ghost"}"#).await;
    let e = recv_json(&mut cloud).await;
    assert_eq!(
        (e["code"].as_str(), e["peer"].as_str()),
        (Some("unknown-peer"), Some("ghost"))
    );
    drop(robot);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    send(&mut cloud, r#"{"id":"robot"}"#).await;
    let e = recv_json(&mut cloud).await;
    assert_eq!(
        (e["code"].as_str(), e["peer"].as_str()),
        (Some("peer-unavailable"), Some("robot"))
    );
}
