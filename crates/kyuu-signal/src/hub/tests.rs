#![allow(clippy::unwrap_used)]
//! Virtual-time tests of the hub: no sockets, no sleeping.

use super::*;
use std::time::Duration;

const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

fn hub(cfg: SignalConfig) -> (Hub, Instant) {
    (Hub::new(cfg, 7), Instant::now())
}

fn req(id: Option<&str>) -> ConnectRequest {
    ConnectRequest {
        id: id.map(str::to_owned),
        resume: None,
        v2: false,
        ip: IP,
        claims: None,
        ice_servers: None,
    }
}

fn v2(id: Option<&str>) -> ConnectRequest {
    ConnectRequest {
        v2: true,
        ..req(id)
    }
}

fn drain(h: &mut Hub) -> Vec<Output> {
    std::iter::from_fn(|| h.poll_output()).collect()
}

/// Frames sent to `conn`, parsed.
fn to(outs: &[Output], conn: ConnId) -> Vec<Value> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, text } if *c == conn => {
                Some(serde_json::from_str(text).unwrap())
            }
            Output::Send { .. }
            | Output::Close { .. }
            | Output::Route { .. }
            | Output::Dir { .. }
            | Output::Room { .. } => None,
        })
        .collect()
}

fn texts(outs: &[Output], conn: ConnId) -> Vec<String> {
    outs.iter()
        .filter_map(|o| match o {
            Output::Send { conn: c, text } if *c == conn => Some(text.clone()),
            Output::Send { .. }
            | Output::Close { .. }
            | Output::Route { .. }
            | Output::Dir { .. }
            | Output::Room { .. } => None,
        })
        .collect()
}

#[test]
fn seed_004_exchange_is_relayed_exactly() {
    let (mut h, now) = hub(SignalConfig::default());
    let a = h.connect(now, req(Some("3251357a"))).unwrap().conn;
    let b = h.connect(now, req(Some("4626b02b"))).unwrap().conn;
    assert!(drain(&mut h).is_empty(), "legacy clients get no welcome");
    let offer = r#"{"id":"3251357a","payload":{"sdp":"v=0\r\no=rtc 4075634777 0 IN IP4 127.0.0.1\r\n","type":"offer"}}"#;
    h.text(now, b, offer);
    let outs = drain(&mut h);
    assert_eq!(
        texts(&outs, a),
        vec![
            r#"{"id":"4626b02b","payload":{"sdp":"v=0\r\no=rtc 4075634777 0 IN IP4 127.0.0.1\r\n","type":"offer"}}"#
        ]
    );
    assert_eq!(outs.len(), 1);
}

#[test]
fn stale_disconnect_never_removes_newer_connection() {
    let (mut h, now) = hub(SignalConfig::default());
    let old = h.connect(now, req(Some("robot"))).unwrap().conn;
    let new = h.connect(now, req(Some("robot"))).unwrap().conn;
    let outs = drain(&mut h);
    assert!(outs.contains(&Output::Close {
        conn: old,
        code: 4000,
        reason: "replaced by a newer connection with this id"
    }));
    // The old connection's cleanup arrives late.
    h.disconnect(now, old);
    let peer = h.connect(now, req(Some("cloud"))).unwrap().conn;
    h.text(now, peer, r#"{"id":"robot","x":1}"#);
    assert_eq!(texts(&drain(&mut h), new), vec![r#"{"id":"cloud","x":1}"#]);
    assert_eq!(h.connections(), 2);
}

#[test]
fn welcome_and_resume_token_ownership() {
    let (mut h, now) = hub(SignalConfig::default());
    let mut r = v2(Some("cam"));
    r.ice_servers = Some(json!([{"urls": ["stun:x"]}]));
    let a = h.connect(now, r).unwrap().conn;
    let w = to(&drain(&mut h), a).remove(0);
    assert_eq!(w["type"], "welcome");
    assert_eq!(w["you"], "cam");
    assert_eq!(w["iceServers"][0]["urls"][0], "stun:x");
    let token = w["resume"].as_str().unwrap().to_owned();

    // Without the token: refused, legacy or not.
    assert_eq!(
        h.connect(now, req(Some("cam"))),
        Err(Refusal::IdTaken("cam".into()))
    );
    let mut bad = v2(Some("cam"));
    bad.resume = Some("00".into());
    assert_eq!(
        h.connect(now, bad).map(|_| ()).unwrap_err().http_status(),
        409
    );

    // With it: takes over, old one closed; old cleanup is a no-op.
    let mut good = v2(Some("cam"));
    good.resume = Some(token);
    let b = h.connect(now, good).unwrap().conn;
    let outs = drain(&mut h);
    assert!(matches!(outs[0], Output::Close { conn, code: 4000, .. } if conn == a));
    let token2 = to(&outs, b)[0]["resume"].as_str().unwrap().to_owned();
    h.disconnect(now, a);
    assert_eq!(h.id_of(b), Some("cam"));

    // After b disconnects the id stays reserved for its token...
    h.disconnect(now, b);
    assert!(h.connect(now, req(Some("cam"))).is_err());
    let mut again = v2(Some("cam"));
    again.resume = Some(token2);
    let c = h.connect(now, again).unwrap().conn;
    h.disconnect(now, c);
    // ...until the grace period ends.
    let later = now + Duration::from_secs(31);
    h.handle_timeout(later);
    assert!(h.connect(later, req(Some("cam"))).is_ok());
}

#[test]
fn assigned_ids_are_v2_and_unique() {
    let (mut h, now) = hub(SignalConfig::default());
    let a = h.connect(now, req(None)).unwrap();
    let b = h.connect(now, req(Some(""))).unwrap();
    assert_ne!(a.id, b.id);
    assert_eq!(a.id.len(), 8);
    let outs = drain(&mut h);
    assert_eq!(to(&outs, a.conn)[0]["you"], a.id.as_str());
}

#[test]
fn unknown_peer_error_only_for_v2() {
    let (mut h, now) = hub(SignalConfig::default());
    let legacy = h.connect(now, req(Some("l"))).unwrap().conn;
    let modern = h.connect(now, v2(Some("m"))).unwrap().conn;
    drain(&mut h);
    h.text(now, legacy, r#"{"id":"nobody"}"#);
    h.text(now, legacy, "not json");
    h.binary(now, legacy, 3);
    assert!(drain(&mut h).is_empty());
    h.text(now, modern, r#"{"id":"nobody"}"#);
    h.text(now, modern, "not json");
    h.text(now, modern, "[]");
    h.binary(now, modern, 3);
    let got = to(&drain(&mut h), modern);
    let codes: Vec<_> = got
        .iter()
        .map(|v| v["code"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        codes,
        [
            "unknown-peer",
            "invalid-json",
            "invalid-message",
            "binary-unsupported"
        ]
    );
    assert_eq!(got[0]["peer"], "nobody");
}

#[test]
fn messages_for_reconnecting_peer_are_held_then_delivered_or_expire() {
    let (mut h, now) = hub(SignalConfig::default());
    let robot = h.connect(now, req(Some("robot"))).unwrap().conn;
    let cloud = h.connect(now, v2(Some("cloud"))).unwrap().conn;
    h.disconnect(now, robot);
    drain(&mut h);
    h.text(now, cloud, r#"{"id":"robot","n":1}"#);
    h.text(now, cloud, r#"{"id":"robot","n":2}"#);
    assert!(drain(&mut h).is_empty());
    let t1 = now + Duration::from_secs(1);
    let robot2 = h.connect(t1, req(Some("robot"))).unwrap().conn;
    assert_eq!(
        texts(&drain(&mut h), robot2),
        vec![r#"{"id":"cloud","n":1}"#, r#"{"id":"cloud","n":2}"#]
    );
    // Now it goes away again and does not come back.
    h.disconnect(t1, robot2);
    h.text(t1, cloud, r#"{"id":"robot","n":3}"#);
    // Spurious earlier wake-ups (stale entries) are allowed; nothing expires before the TTL.
    assert!(h.poll_timeout().unwrap() <= t1 + Duration::from_secs(5));
    h.handle_timeout(t1 + Duration::from_secs(4));
    assert!(drain(&mut h).is_empty());
    h.handle_timeout(t1 + Duration::from_secs(5));
    let errs = to(&drain(&mut h), cloud);
    assert_eq!(errs[0]["code"], "peer-unavailable");
    assert_eq!(errs[0]["peer"], "robot");
}

#[test]
fn hold_buffer_is_bounded() {
    let cfg = SignalConfig {
        pending_max_per_peer: 2,
        ..SignalConfig::default()
    };
    let (mut h, now) = hub(cfg);
    let p = h.connect(now, req(Some("p"))).unwrap().conn;
    let s = h.connect(now, v2(Some("s"))).unwrap().conn;
    h.disconnect(now, p);
    drain(&mut h);
    for _ in 0..3 {
        h.text(now, s, r#"{"id":"p"}"#);
    }
    let errs = to(&drain(&mut h), s);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["code"], "peer-unavailable");
}

#[test]
fn rooms_presence() {
    let (mut h, now) = hub(SignalConfig::default());
    let a = h.connect(now, req(Some("a"))).unwrap().conn;
    let b = h.connect(now, req(Some("b"))).unwrap().conn;
    h.text(now, a, r#"{"type":"join","room":"r"}"#);
    let o = drain(&mut h);
    assert_eq!(
        to(&o, a),
        vec![json!({"type":"members","room":"r","members":["a"]})]
    );
    h.text(now, b, r#"{"type":"join","room":"r"}"#);
    let o = drain(&mut h);
    assert_eq!(
        to(&o, a),
        vec![json!({"type":"joined","room":"r","peer":"b"})]
    );
    assert_eq!(
        to(&o, b),
        vec![json!({"type":"members","room":"r","members":["a","b"]})]
    );
    h.disconnect(now, b);
    let o = drain(&mut h);
    assert_eq!(
        to(&o, a),
        vec![json!({"type":"left","room":"r","peer":"b"})]
    );
    h.text(now, a, r#"{"type":"members","room":"r"}"#);
    assert_eq!(to(&drain(&mut h), a)[0]["members"], json!(["a"]));
    h.text(now, a, r#"{"type":"leave","room":"r"}"#);
    assert_eq!(
        to(&drain(&mut h), a),
        vec![json!({"type":"left","room":"r","peer":"a"})]
    );
    assert!(h.rooms.is_empty());
}

#[test]
fn directory_names_topics_watch_and_expiry() {
    let (mut h, now) = hub(SignalConfig::default());
    let robot1 = h.connect(now, req(Some("r1"))).unwrap().conn;
    let robot2 = h.connect(now, req(Some("r2"))).unwrap().conn;
    let cloud = h.connect(now, req(Some("cloud"))).unwrap().conn;
    h.text(now, cloud, r#"{"type":"watch","topic":"/camera"}"#);
    assert_eq!(
        to(&drain(&mut h), cloud),
        vec![json!({"type":"lookup","topic":"/camera","peers":[]})]
    );
    h.text(now, robot1, r#"{"type":"publish","topic":"/camera"}"#);
    h.text(now, robot2, r#"{"type":"publish","topic":"/camera"}"#);
    h.text(now, robot1, r#"{"type":"publish","name":"arm"}"#);
    h.text(now, robot2, r#"{"type":"publish","name":"arm"}"#);
    let o = drain(&mut h);
    assert_eq!(
        to(&o, cloud),
        vec![
            json!({"type":"published","topic":"/camera","peer":"r1"}),
            json!({"type":"published","topic":"/camera","peer":"r2"}),
        ]
    );
    assert_eq!(to(&o, robot2).last().unwrap()["code"], "name-taken");
    h.text(now, cloud, r#"{"type":"lookup","name":"arm"}"#);
    assert_eq!(
        to(&drain(&mut h), cloud),
        vec![json!({"type":"lookup","name":"arm","peers":["r1"]})]
    );
    // Entries expire with their owner.
    h.disconnect(now, robot1);
    assert_eq!(
        to(&drain(&mut h), cloud),
        vec![json!({"type":"unpublished","topic":"/camera","peer":"r1"})]
    );
    h.text(now, cloud, r#"{"type":"lookup","name":"arm"}"#);
    assert_eq!(to(&drain(&mut h), cloud)[0]["peers"], json!([]));
    h.text(now, robot2, r#"{"type":"publish","name":"arm"}"#);
    assert_eq!(to(&drain(&mut h), robot2)[0]["type"], "published");
    h.text(now, cloud, r#"{"type":"lookup","name":"x","topic":"y"}"#);
    assert_eq!(to(&drain(&mut h), cloud)[0]["code"], "invalid-message");
}

#[test]
fn rate_limit_and_size() {
    let cfg = SignalConfig {
        rate_limit_burst: 3,
        rate_limit_per_sec: 1,
        max_message_size: 24,
        ..SignalConfig::default()
    };
    let (mut h, now) = hub(cfg);
    let a = h.connect(now, v2(Some("a"))).unwrap().conn;
    drain(&mut h);
    h.text(now, a, r#"{"type":"ping","ts":1}"#);
    h.text(now, a, r#"{"id":"a","x":"0123456789abcdefgh"}"#);
    h.text(now, a, r#"{"type":"ping"}"#);
    h.text(now, a, r#"{"type":"ping"}"#);
    let got = to(&drain(&mut h), a);
    assert_eq!(got[0], json!({"type":"pong","ts":1}));
    assert_eq!(got[1]["code"], "too-large");
    assert_eq!(got[2], json!({"type":"pong"}));
    assert_eq!(got[3]["code"], "rate-limited");
    h.text(now + Duration::from_secs(1), a, r#"{"type":"ping"}"#);
    assert_eq!(to(&drain(&mut h), a), vec![json!({"type":"pong"})]);
}

#[test]
fn connection_caps() {
    let cfg = SignalConfig {
        max_connections: 3,
        max_connections_per_ip: 2,
        ..SignalConfig::default()
    };
    let (mut h, now) = hub(cfg);
    h.connect(now, req(Some("a"))).unwrap();
    let b = h.connect(now, req(Some("b"))).unwrap().conn;
    assert_eq!(
        h.connect(now, req(Some("c"))),
        Err(Refusal::TooManyFromAddress)
    );
    let mut other = req(Some("c"));
    other.ip = "127.0.0.2".parse().unwrap();
    h.connect(now, other.clone()).unwrap();
    other.id = Some("d".into());
    assert_eq!(h.connect(now, other).unwrap_err().http_status(), 503);
    h.disconnect(now, b);
    assert!(h.connect(now, req(Some("e"))).is_ok());
}

#[test]
fn token_claims_bind_id_and_rooms() {
    let (mut h, now) = hub(SignalConfig::default());
    let claims = Claims {
        sub: "alice".into(),
        rooms: Some(vec!["ok".into()]),
        exp: u64::MAX,
    };
    let mut r = req(Some("bob"));
    r.claims = Some(claims.clone());
    assert_eq!(h.connect(now, r).unwrap_err().http_status(), 403);
    let mut r = req(None);
    r.claims = Some(claims);
    let acc = h.connect(now, r).unwrap();
    assert_eq!(acc.id, "alice");
    drain(&mut h);
    h.text(now, acc.conn, r#"{"type":"join","room":"no"}"#);
    h.text(now, acc.conn, r#"{"type":"join","room":"ok"}"#);
    let got = to(&drain(&mut h), acc.conn);
    assert_eq!(got[0]["code"], "forbidden");
    assert_eq!(got[1]["type"], "members");
}

#[test]
fn invalid_ids_refused() {
    let (mut h, now) = hub(SignalConfig::default());
    assert_eq!(
        h.connect(now, req(Some("a b"))).unwrap_err().http_status(),
        400
    );
    assert_eq!(
        h.connect(now, req(Some(&"x".repeat(65))))
            .unwrap_err()
            .http_status(),
        400
    );
}

#[test]
fn fuzzish_inputs_never_panic() {
    let (mut h, now) = hub(SignalConfig::default());
    let a = h.connect(now, v2(Some("a"))).unwrap().conn;
    let inputs = [
        "",
        "{",
        "}",
        "null",
        "{\"id\":\"a\"}",
        "{\"type\":\"join\",\"room\":\"\"}",
        "{\"type\":\"publish\",\"name\":\"\"}",
        "{\"type\":\"unpublish\",\"name\":\"z\"}",
        "{\"type\":\"leave\",\"room\":\"z\"}",
        "{\"type\":\"unwatch\",\"topic\":\"z\"}",
        "{\"type\":\"ping\",\"ts\":1e999}",
        "\u{feff}{}",
        "{\"id\":\"a\",\"id\":\"b\"}",
    ];
    for (i, s) in inputs.iter().enumerate() {
        h.text(now + Duration::from_millis(i as u64), a, s);
        h.handle_timeout(now + Duration::from_secs(i as u64 * 10));
    }
    // Events for unknown connections are ignored.
    h.text(now, ConnId(999), "{}");
    h.disconnect(now, ConnId(999));
    drain(&mut h);
}

#[test]
fn fleet_mode_routes_unknown_ids_out_and_takes_frames_in() {
    let (mut h, now) = hub(SignalConfig::default());
    h.set_fleet(true);
    let a = h.connect(now, v2(Some("alice"))).unwrap().conn;
    drain(&mut h);
    h.text(now, a, r#"{"id":"bob","type":"offer","sdp":"x"}"#);
    let outs = drain(&mut h);
    let [Output::Route {
        from_conn,
        from,
        to: dest,
        text,
    }] = outs.as_slice()
    else {
        panic!("expected one route: {outs:?}");
    };
    assert_eq!(
        (*from_conn, from.as_str(), dest.as_str()),
        (a, "alice", "bob")
    );
    let v: Value = serde_json::from_str(text).unwrap();
    assert_eq!(v, json!({"id":"alice","type":"offer","sdp":"x"}));

    // No node has bob: unknown-peer to the sender (buffer_unknown is off).
    h.remote_unknown(now, a, "alice", "bob", text.clone());
    let errs = to(&drain(&mut h), a);
    assert_eq!(errs[0]["code"], "unknown-peer");

    // A frame from another node for alice is delivered as is; one for a stranger is dropped.
    assert!(h.from_remote(now, "alice", r#"{"id":"bob","n":1}"#.into()));
    assert_eq!(texts(&drain(&mut h), a), vec![r#"{"id":"bob","n":1}"#]);
    assert!(!h.from_remote(now, "nobody", "{}".into()));
    assert!(drain(&mut h).is_empty());

    // A message held for carol on her old node, forwarded because she resumes here, waits for
    // her handshake; a node that loses carol hands over what it held for her.
    assert!(h.held_from_remote(now, "carol", r#"{"id":"bob","n":2}"#.into()));
    assert_eq!(
        h.take_held("carol"),
        vec![r#"{"id":"bob","n":2}"#.to_owned()]
    );
    assert!(h.take_held("carol").is_empty());
}

#[test]
fn fleet_mode_routes_a_locally_gone_id_and_holds_when_no_node_has_it() {
    let (mut h, now) = hub(SignalConfig::default());
    h.set_fleet(true);
    let a = h.connect(now, req(Some("alice"))).unwrap().conn;
    let b = h.connect(now, req(Some("bob"))).unwrap().conn;
    h.disconnect(now, b);
    drain(&mut h);
    // bob may have reconnected to another node: route, don't hold.
    h.text(now, a, r#"{"id":"bob","n":1}"#);
    let outs = drain(&mut h);
    assert!(
        matches!(outs.as_slice(), [Output::Route { .. }]),
        "{outs:?}"
    );
    // Nobody has him: held here, delivered when he comes back.
    h.remote_unknown(now, a, "alice", "bob", r#"{"id":"alice","n":1}"#.into());
    assert!(drain(&mut h).is_empty());
    let b2 = h.connect(now, req(Some("bob"))).unwrap().conn;
    assert_eq!(texts(&drain(&mut h), b2), vec![r#"{"id":"alice","n":1}"#]);
}

#[test]
fn without_fleet_mode_nothing_is_routed() {
    let (mut h, now) = hub(SignalConfig::default());
    let a = h.connect(now, v2(Some("alice"))).unwrap().conn;
    drain(&mut h);
    h.text(now, a, r#"{"id":"bob"}"#);
    let outs = drain(&mut h);
    assert!(!outs.iter().any(|o| matches!(o, Output::Route { .. })));
    assert_eq!(to(&outs, a)[0]["code"], "unknown-peer");
}

#[test]
fn fleet_directory_mirrors_remote_publications_and_drops_a_dead_nodes() {
    let (mut h, now) = hub(SignalConfig::default());
    h.set_fleet(true);
    let w = h.connect(now, v2(Some("watcher"))).unwrap().conn;
    let p = h.connect(now, v2(Some("local"))).unwrap().conn;
    drain(&mut h);
    h.text(now, w, r#"{"type":"watch","name":"arm-7"}"#);
    drain(&mut h);
    h.remote_dir("node-b", DirKey::Name("arm-7".into()), "far", true);
    let ev = to(&drain(&mut h), w);
    assert_eq!(ev[0]["type"], "published");
    assert_eq!(ev[0]["peer"], "far");
    // The name is held fleet-wide.
    h.text(now, p, r#"{"type":"publish","name":"arm-7"}"#);
    assert_eq!(to(&drain(&mut h), p)[0]["code"], "name-taken");
    // A local publication is announced to the fleet.
    h.text(now, p, r#"{"type":"publish","topic":"/cam"}"#);
    let outs = drain(&mut h);
    assert!(outs
        .iter()
        .any(|o| matches!(o, Output::Dir { on: true, peer, .. } if peer == "local")));
    assert_eq!(h.remote_nodes(), vec!["node-b".to_owned()]);
    h.node_gone("node-b");
    let ev = to(&drain(&mut h), w);
    assert_eq!(ev[0]["type"], "unpublished");
    assert!(h.remote_nodes().is_empty());
    h.text(now, w, r#"{"type":"lookup","name":"arm-7"}"#);
    assert_eq!(to(&drain(&mut h), w)[0]["peers"], json!([]));
}
