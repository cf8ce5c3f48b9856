//! Robustness of the node and peer input paths: arbitrary bytes and mutated valid messages
//! never panic, and whatever a node holds is freed by its timers.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_rawr::config::{ChildConfig, GatewayConfig, RawrConfig};
use kyuu_rawr::node::Node;
use kyuu_rawr::peer::{Peer, PeerConfig};
use kyuu_rawr::wire::{self, ConnectReq, Mac};
use kyuu_stun::TransactionId;
use proptest::prelude::*;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, i], 3478))
}

fn node() -> Node {
    let cfg = RawrConfig {
        name: "n".into(),
        self_addrs: vec![addr(1)],
        relay: vec!["turn:198.18.0.1:3478".into()],
        secret: "s".into(),
        gateway: Some(GatewayConfig {
            addr: addr(2),
            key: Some("k".into()),
        }),
        children: vec![ChildConfig {
            name: "c".into(),
            key: "kc".into(),
        }],
        ..RawrConfig::default()
    };
    Node::new(&cfg, Instant::now(), 0, 7)
}

fn valid_messages(session: u8, a: u8, b: u8) -> Vec<Vec<u8>> {
    let c = ConnectReq {
        session: vec![session; 16],
        mac: Mac([2, 0, 0, 0, 0, a]),
        target: Some(Mac([2, 0, 0, 0, 0, b])),
        root: addr(9),
        hops: 3,
        path: vec!["x".into()],
    };
    let key = kyuu_stun::integrity::Key::short_term("kc");
    let auth = wire::Auth {
        username: Some("c"),
        key: &key,
    };
    let t = TransactionId([a; 12]);
    vec![
        wire::encode_connect(t, &c, None),
        wire::encode_connect(t, &c, Some(&auth)),
        wire::encode_exchange(t, &c.session, c.mac, &[addr(3)]),
        wire::encode_register(t, c.mac, Some(5)),
        wire::encode_cancel(t, &c.session, c.mac, c.target, None, Some(&auth)),
        wire::encode_error(wire::method::CONNECT, t, 482, "x", &[], None),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn node_survives_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut n = node();
        let t = Instant::now();
        n.handle_input(t, addr(10), &data);
        while n.poll_output().is_some() {}
        n.handle_timeout(t + Duration::from_secs(100));
        while n.poll_output().is_some() {}
    }

    #[test]
    fn node_survives_mutated_messages_and_frees_everything(
        ops in proptest::collection::vec((0usize..6, 0u8..3, 1u8..4, 1u8..4, 0u8..4, any::<u8>(), 0usize..120), 1..40)
    ) {
        let mut n = node();
        let t0 = Instant::now();
        let mut now = t0;
        for (kind, session, a, b, src, flip, at) in ops {
            let msgs = valid_messages(session, a, b);
            let mut m = msgs[kind].clone();
            if flip != 0 {
                if let Some(byte) = m.get_mut(at) {
                    *byte ^= flip;
                }
            }
            n.handle_input(now, addr(10 + src), &m);
            while n.poll_output().is_some() {}
            now += Duration::from_millis(u64::from(flip) * 10);
            n.handle_timeout(now);
            while n.poll_output().is_some() {}
        }
        // Every timer fires eventually and nothing stays.
        for _ in 0..200 {
            let Some(t) = n.poll_timeout() else { break };
            now = now.max(t);
            n.handle_timeout(now);
            while n.poll_output().is_some() {}
        }
        let s = n.stats();
        prop_assert_eq!((s.pending, s.upstream, s.exchanges, s.registrations), (0, 0, 0, 0));
    }

    #[test]
    fn peer_survives_arbitrary_answers(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut cfg = PeerConfig::new(vec![1; 16], Mac([2, 0, 0, 0, 0, 1]), addr(1));
        cfg.gateway = Some(addr(2));
        let mut p = Peer::new(cfg, 1);
        let t = Instant::now();
        p.start(t);
        while p.poll_output().is_some() {}
        p.handle_input(t, addr(1), &data);
        p.handle_input(t, addr(2), &data);
        while p.poll_output().is_some() {}
        p.handle_timeout(t + Duration::from_secs(60));
        prop_assert!(p.is_finished());
    }
}
