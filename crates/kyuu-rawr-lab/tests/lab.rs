//! RAWR in the network lab (root needed: SKIP otherwise, failure with KYUU_LAB_REQUIRED=1).
//! Each test asserts where the relay landed and that data flowed.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use kyuu_rawr::peer::Route;
use kyuu_rawr_lab::{ping_pong, LabSpec, RawrLab};

fn session() -> Vec<u8> {
    rand::random::<[u8; 16]>().to_vec()
}

async fn build(test: &str, spec: LabSpec) -> Option<RawrLab> {
    RawrLab::build_or_skip(test, spec).await.unwrap()
}

/// Both peers fell back to the root (their gateway does not speak RAWR), the gateway error
/// contains `why`, and data flows through the root.
async fn assert_root_fallback(lab: &RawrLab, why: &str) {
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    assert_eq!(
        b.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    let err = a.outcome.gateway_error.clone().unwrap();
    assert!(err.contains(why), "{err}");
    println!("peer A fell back: {err}");
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symmetric_nat_homes_meet_at_the_isp_and_the_root_relays_nothing() {
    let Some(lab) = build("rawr lab isp", LabSpec::default()).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(b.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(a.outcome.relay.as_ref().unwrap().path, vec!["homea", "isp"]);
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
    let before = lab.root_udp_in().unwrap();
    let rtt = ping_pong(&a, &b, 20).await.unwrap();
    let after = lab.root_udp_in().unwrap();
    assert!(rtt.samples.len() >= 18, "data did not flow: {rtt:?}");
    assert_eq!(
        after - before,
        0,
        "the root received datagrams during the session"
    );
    assert_eq!(lab.stats("root").await.unwrap().paired, 0);
    assert_eq!(lab.stats("isp").await.unwrap().paired, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_subnet_peers_connect_directly() {
    let spec = LabSpec {
        same_lan: true,
        ..LabSpec::default()
    };
    let Some(lab) = build("rawr lab same subnet", spec).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Direct);
    assert_eq!(b.outcome.route, Route::Direct);
    assert!(a.outcome.relay.is_none() && b.outcome.relay.is_none());
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
    assert_eq!(rtt.relay, None, "data went through a relay");
    // The parallel Connects (sent with Exchange) may have paired at the shared gateway before
    // the peers saw each other on the link; they never reach the root, and nothing is held.
    assert_eq!(lab.stats("root").await.unwrap().paired, 0);
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_rawr_nodes_it_is_plain_turn_through_the_root() {
    let spec = LabSpec {
        isp_node: false,
        home_nodes: false,
        ..LabSpec::default()
    };
    let Some(lab) = build("rawr lab no nodes", spec).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(
        a.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    assert_eq!(
        b.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
    assert_eq!(rtt.relay.unwrap().ip().to_string(), "198.18.0.10");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_turn_gateway_falls_back_to_the_root() {
    let spec = LabSpec {
        plain_gateway_a: true,
        ..LabSpec::default()
    };
    let Some(lab) = build("rawr lab plain gateway", spec).await else {
        return;
    };
    assert_root_fallback(&lab, "gateway").await;
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_level_chain_meets_at_the_isp() {
    let spec = LabSpec {
        chain_a: true,
        ..LabSpec::default()
    };
    let Some(lab) = build("rawr lab chain", spec).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(
        a.outcome.relay.as_ref().unwrap().path,
        vec!["homea", "d1", "d2", "isp"]
    );
    assert_eq!(b.outcome.route, Route::Node { name: "isp".into() });
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_loop_is_detected_and_refused() {
    let spec = LabSpec {
        loop_a: true,
        ..LabSpec::default()
    };
    let Some(lab) = build("rawr lab loop", spec).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    let why = a.outcome.gateway_error.clone().unwrap();
    assert!(
        why.contains("482") && why.contains("homea -> d1 -> homea"),
        "{why}"
    );
    // A fell back to the root; B's request climbed there through its chain: they meet there.
    assert_eq!(
        a.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    assert_eq!(
        b.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_killed_mid_request_falls_back_with_a_clear_error() {
    let Some(mut lab) = build("rawr lab gateway killed", LabSpec::default()).await else {
        return;
    };
    let s = session();
    let root = lab.root_addr();
    let (ga, gb) = (lab.gateway_a(), lab.gateway_b());
    let (pa, pb) = (lab.pa.clone(), lab.pb.clone());
    let sa = s.clone();
    let ta = tokio::spawn(async move { kyuu_rawr_lab::lab_peer(&pa, &sa, root, ga).await });
    // A has registered and is waiting at the root for B; its gateway dies now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.kill_node("homea");
    let b = kyuu_rawr_lab::lab_peer(&pb, &s, root, gb).await.unwrap();
    let a = ta.await.unwrap().unwrap();
    let why = a.outcome.gateway_error.clone().unwrap();
    assert!(why.contains("stopped answering"), "{why}");
    // A's parallel Connect had reached the ISP before its gateway died, so B paired with it
    // there; A's answer died with homea, and the root, told by the ISP's Cancel, sends A's
    // fallback to the ISP relay as well.
    assert_eq!(b.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(a.outcome.relay.as_ref().unwrap().path, vec!["homea", "isp"]);
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_restart_keeps_the_session_and_serves_new_ones() {
    let Some(mut lab) = build("rawr lab restart", LabSpec::default()).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    // Restart the meeting node's control plane mid-session: the data plane keeps going.
    lab.restart_node("isp").await.unwrap();
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
    // And the restarted node serves a new session.
    let (a2, b2) = lab.connect_pair(&session(), lab.root_addr()).await;
    assert_eq!(
        a2.unwrap().outcome.route,
        Route::Node { name: "isp".into() }
    );
    assert_eq!(
        b2.unwrap().outcome.route,
        Route::Node { name: "isp".into() }
    );
    lab.wait_clean(Duration::from_secs(3)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_unreachable_is_a_clear_error_and_leaves_no_state() {
    let Some(mut lab) = build("rawr lab root down", LabSpec::default()).await else {
        return;
    };
    lab.kill_node("root");
    let t = std::time::Instant::now();
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    for r in [a, b] {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("198.18.0.10:3479") && e.contains("unreachable"),
            "{e}"
        );
    }
    assert!(t.elapsed() < Duration::from_secs(5));
    lab.wait_clean(Duration::from_secs(1)).await.unwrap();
}

/// The `kyuu` binary for `kyuu serve` on every node: `KYUU_BIN`, else next to this test's
/// target directory (built by `cargo test --workspace` / `cargo build -p kyuu`).
async fn build_kyuu(test: &str, mut spec: LabSpec) -> Option<RawrLab> {
    let bin = kyuu_rawr_lab::kyuu_bin_or_skip(test)?;
    spec.server = kyuu_rawr_lab::LabServer::Kyuu(bin);
    build(test, spec).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kyuu_serve_nodes_meet_at_the_isp_and_relay_through_kyuu_turn() {
    let Some(lab) = build_kyuu("rawr lab kyuu serve", LabSpec::default()).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(b.outcome.route, Route::Node { name: "isp".into() });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = lab.root_udp_in().unwrap();
    let rtt = ping_pong(&a, &b, 20).await.unwrap();
    let after = lab.root_udp_in().unwrap();
    assert!(rtt.samples.len() >= 18, "data did not flow: {rtt:?}");
    assert_eq!(rtt.relay.unwrap().to_string(), "198.18.1.1:3478");
    assert_eq!(
        after - before,
        0,
        "the root received datagrams during the session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kyuu_serve_without_rawr_as_gateway_falls_back_to_the_root() {
    let spec = LabSpec {
        plain_gateway_a: true,
        ..LabSpec::default()
    };
    let Some(lab) = build_kyuu("rawr lab kyuu plain gateway", spec).await else {
        return;
    };
    assert_root_fallback(&lab, "400").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kyuu_serve_meeting_node_pairs_in_process_and_its_relay_sockets_carry_nothing() {
    let Some(lab) = build_kyuu("rawr lab in-process pairing", LabSpec::default()).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    // Metrics are flushed once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sock0 = lab
        .node_metric("isp", "kyuu_relay_socket_datagrams_total")
        .unwrap();
    let paired0 = lab
        .node_metric("isp", "kyuu_relay_paired_packets_total")
        .unwrap();
    // No CreatePermission for each other: the meeting node installed the pairing.
    let rtt = kyuu_rawr_lab::ping_pong_with(&a, &b, 20, false)
        .await
        .unwrap();
    assert!(rtt.samples.len() >= 18, "data did not flow: {rtt:?}");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let sock1 = lab
        .node_metric("isp", "kyuu_relay_socket_datagrams_total")
        .unwrap();
    let paired1 = lab
        .node_metric("isp", "kyuu_relay_paired_packets_total")
        .unwrap();
    assert_eq!(
        sock1 - sock0,
        0.0,
        "datagrams went through the meeting node's relay sockets"
    );
    // Each round trip is two client packets handed over in-process (A→B and the echo).
    assert!(paired1 - paired0 >= 36.0, "{paired0} -> {paired1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kyuu_serve_without_in_process_pairing_relays_through_its_sockets() {
    let spec = LabSpec {
        pair_in_process: false,
        ..LabSpec::default()
    };
    let Some(lab) = build_kyuu("rawr lab pairing off", spec).await else {
        return;
    };
    let (a, b) = lab.connect_pair(&session(), lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    // Without the pairing, peers that skip CreatePermission get nothing through.
    let rtt = kyuu_rawr_lab::ping_pong_with(&a, &b, 5, false)
        .await
        .unwrap();
    assert!(rtt.samples.is_empty(), "{rtt:?}");
    let rtt = ping_pong(&a, &b, 20).await.unwrap();
    assert!(rtt.samples.len() >= 18, "{rtt:?}");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let sock = lab
        .node_metric("isp", "kyuu_relay_socket_datagrams_total")
        .unwrap();
    assert!(sock >= 36.0, "{sock}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kyuu_serve_session_over_its_byte_limit_falls_back_to_the_parent() {
    // 8-byte pings: each side relays 16 bytes a round trip, so 250 bytes last ~15 of 20.
    let spec = LabSpec {
        isp_session_max_bytes: 250,
        ..LabSpec::default()
    };
    let Some(lab) = build_kyuu("rawr lab session limit", spec).await else {
        return;
    };
    let s = session();
    let (a, b) = lab.connect_pair(&s, lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    let rtt = ping_pong(&a, &b, 20).await.unwrap();
    assert!(
        (5..20).contains(&rtt.samples.len()),
        "the limit did not cut the session: {rtt:?}"
    );
    // The ISP's TURN server deletes the allocations on its next tick and tells its node.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // The peers run RAWR again for the same session: the ISP refuses (470), they meet above it.
    let (a, b) = lab.connect_pair(&s, lab.root_addr()).await;
    let (a, b) = (a.unwrap(), b.unwrap());
    for p in [&a, &b] {
        assert_eq!(
            p.outcome.route,
            Route::Root {
                name: "root".into()
            },
            "{:?}",
            p.outcome
        );
        let why = p.outcome.gateway_error.clone().unwrap();
        assert!(why.contains("470"), "{why}");
    }
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
}

/// RAWR across a fleet (`docs/rawr.md` §4.7): the root is two `kyuu serve` nodes (198.18.0.10
/// "root", 198.18.0.11 "root2") sharing one `redis-server`. Peer A's root is node 1 and peer
/// B's root is node 2, both behind symmetric NAT with no RAWR node on the way: without the
/// fleet neither Exchange would see the other. They still pair at one root node (the one that
/// claimed the session; the other forwarded), and data flows both ways through its relay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kyuu_serve_exchange_split_across_two_root_nodes_of_a_fleet_still_pairs() {
    let spec = LabSpec {
        root_fleet: true,
        isp_node: false,
        home_nodes: false,
        ..LabSpec::default()
    };
    let Some(lab) = build_kyuu("rawr lab root fleet", spec).await else {
        return;
    };
    let s = session();
    let (a, b) = tokio::time::timeout(Duration::from_secs(40), async {
        tokio::join!(
            kyuu_rawr_lab::lab_peer(&lab.pa, &s, lab.root_addr(), None),
            kyuu_rawr_lab::lab_peer(&lab.pb, &s, lab.root2_addr(), None),
        )
    })
    .await
    .expect("peers end by their deadline");
    let (a, b) = (a.unwrap(), b.unwrap());
    let Route::Root { name } = &a.outcome.route else {
        panic!("peer A did not meet at a root: {:?}", a.outcome);
    };
    assert!(name == "root" || name == "root2", "{name}");
    assert_eq!(a.outcome.route, b.outcome.route, "one meeting point");
    let (ra, rb) = (
        a.outcome.relay.as_ref().unwrap(),
        b.outcome.relay.as_ref().unwrap(),
    );
    assert_eq!(ra.uris, rb.uris, "one meeting node");
    let relay = kyuu_rawr::config::parse_turn_uri(&ra.uris[0]).unwrap();
    let expect = if name == "root" {
        "198.18.0.10:3478"
    } else {
        "198.18.0.11:3478"
    };
    assert_eq!(relay.to_string(), expect, "the relay is the meeting node's");
    println!(
        "peers met at {name} (path {:?} / {:?}), relay {relay}",
        ra.path, rb.path
    );
    // ping_pong: A sends, B echoes: data both ways through the meeting node's relay.
    let rtt = ping_pong(&a, &b, 20).await.unwrap();
    assert!(rtt.samples.len() >= 18, "data did not flow: {rtt:?}");
    assert_eq!(rtt.relay, Some(relay));
    // The requests that reached the other node crossed the fleet (metrics flush once a second).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let other = if name == "root" { "root2" } else { "root" };
    let forwarded = lab
        .node_metric(other, "kyuu_rawr_fleet_forwarded_total")
        .unwrap();
    assert!(forwarded >= 2.0, "{other} forwarded {forwarded} requests");
    println!("{other} forwarded {forwarded} requests to {name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_a_configured_gateway_find_their_router_and_meet_at_the_isp() {
    let Some(lab) = build_kyuu("rawr lab gateway discovery", LabSpec::default()).await else {
        return;
    };
    let s = session();
    let root = lab.root_addr();
    let (a, b) = tokio::join!(
        kyuu_rawr_lab::lab_peer_discovering(&lab.pa, &s, root),
        kyuu_rawr_lab::lab_peer_discovering(&lab.pb, &s, root),
    );
    let ((a, da), (b, db)) = (a.unwrap(), b.unwrap());
    assert_eq!(
        da.found,
        Some(kyuu_server::rawr::discover::Found::Router),
        "{da:?}"
    );
    assert_eq!(da.gateway.unwrap().to_string(), "198.19.1.1:3478");
    assert_eq!(db.gateway.unwrap().to_string(), "198.19.2.1:3478");
    // Without discovery these peers would have gone straight to the root.
    assert_eq!(a.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(b.outcome.route, Route::Node { name: "isp".into() });
    assert_eq!(a.outcome.relay.as_ref().unwrap().path, vec!["homea", "isp"]);
    let rtt = ping_pong(&a, &b, 10).await.unwrap();
    assert!(rtt.samples.len() >= 9, "{rtt:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_nothing_behind_a_router_without_rawr() {
    let spec = LabSpec {
        home_nodes: false,
        ..LabSpec::default()
    };
    let Some(lab) = build_kyuu("rawr lab discovery none", spec).await else {
        return;
    };
    let s = session();
    let root = lab.root_addr();
    let (a, b) = tokio::join!(
        kyuu_rawr_lab::lab_peer_discovering(&lab.pa, &s, root),
        kyuu_rawr_lab::lab_peer_discovering(&lab.pb, &s, root),
    );
    let ((a, da), (b, _)) = (a.unwrap(), b.unwrap());
    assert_eq!(da.gateway, None, "{da:?}");
    assert!(da.tried.iter().any(|t| t.contains("no RAWR")), "{da:?}");
    assert_eq!(
        a.outcome.route,
        Route::Root {
            name: "root".into()
        }
    );
    let rtt = ping_pong(&a, &b, 5).await.unwrap();
    assert!(rtt.samples.len() >= 4, "{rtt:?}");
}
