//! Virtual-time simulation of RAWR nodes and peers (every rule of `docs/rawr.md` §4 and §8).
#![allow(clippy::unwrap_used, clippy::large_enum_variant)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_rawr::config::{ChildConfig, GatewayConfig, RawrConfig};
use kyuu_rawr::node::{Node, Output};
use kyuu_rawr::peer::{Outcome, Peer, PeerConfig, PeerError, PeerOutput, Route};
use kyuu_rawr::wire::{self, Mac};
use kyuu_stun::{Class, Message, TransactionId};

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, i], 3478))
}

const ROOT: u8 = 1;

enum Entity {
    Node(Box<Node>),
    Peer {
        peer: Box<Peer>,
        on_link: bool,
        result: Option<Result<Outcome, PeerError>>,
    },
    /// A plain STUN/TURN server: answers unknown methods with 400.
    Plain,
    /// A killed host: drops everything.
    Dead,
}

struct Sim {
    t0: Instant,
    now: Instant,
    ents: BTreeMap<SocketAddr, Entity>,
    queue: Vec<(Instant, u64, SocketAddr, SocketAddr, Vec<u8>)>,
    seq: u64,
    delay: HashMap<(SocketAddr, SocketAddr), Duration>,
    /// Every datagram delivered: (from, to, method, class).
    log: Vec<(SocketAddr, SocketAddr, u16, Class)>,
    /// Peers added from now on send Connect in parallel with Exchange (the default) or after it.
    overlap: bool,
    /// The session id peers added from now on use.
    session: Vec<u8>,
}

fn node_cfg(name: &str, me: SocketAddr) -> RawrConfig {
    RawrConfig {
        enabled: true,
        name: name.into(),
        self_addrs: vec![me],
        relay: vec![format!("turn:{}?transport=udp", me)],
        secret: format!("secret-{name}"),
        ..RawrConfig::default()
    }
}

impl Sim {
    fn new() -> Sim {
        let t0 = Instant::now();
        Sim {
            t0,
            now: t0,
            ents: BTreeMap::new(),
            queue: Vec::new(),
            seq: 0,
            delay: HashMap::new(),
            log: Vec::new(),
            overlap: true,
            session: vec![9; 16],
        }
    }

    fn add_node(&mut self, cfg: RawrConfig) {
        let me = cfg.self_addrs[0];
        self.ents.insert(
            me,
            Entity::Node(Box::new(Node::new(
                &cfg,
                self.now,
                1_700_000_000,
                me.ip().to_string().len() as u64,
            ))),
        );
    }

    /// A node `name` at `a`, with gateway `gw` (linked, key "k-<name>") and linked children.
    fn node(&mut self, name: &str, a: u8, gw: Option<u8>, children: &[&str]) {
        self.node_with(name, a, gw, children, |_| {});
    }

    /// [`Sim::node`] with its config adjusted by `f`.
    fn node_with(
        &mut self,
        name: &str,
        a: u8,
        gw: Option<u8>,
        children: &[&str],
        f: impl FnOnce(&mut RawrConfig),
    ) {
        let mut c = node_cfg(name, addr(a));
        c.gateway = gw.map(|g| GatewayConfig {
            addr: addr(g),
            key: Some(format!("k-{name}")),
        });
        c.children = children
            .iter()
            .map(|n| ChildConfig {
                name: (*n).into(),
                key: format!("k-{n}"),
            })
            .collect();
        f(&mut c);
        self.add_node(c);
    }

    fn peer(&mut self, a: u8, mac: u8, other: u8, gw: Option<u8>, on_link: bool) {
        let mut cfg = PeerConfig::new(self.session.clone(), Mac([2, 0, 0, 0, 0, mac]), addr(ROOT));
        cfg.gateway = gw.map(addr);
        cfg.hosts = vec![addr(a)];
        cfg.overlap = self.overlap;
        let _ = other;
        let mut p = Peer::new(cfg, u64::from(a));
        p.start(self.now);
        self.ents.insert(
            addr(a),
            Entity::Peer {
                peer: Box::new(p),
                on_link,
                result: None,
            },
        );
        self.drain(addr(a));
    }

    fn node_mut(&mut self, a: u8) -> &mut Node {
        match self.ents.get_mut(&addr(a)) {
            Some(Entity::Node(n)) => n,
            _ => panic!("no node at {a}"),
        }
    }

    fn result(&self, a: u8) -> Option<&Result<Outcome, PeerError>> {
        match self.ents.get(&addr(a)) {
            Some(Entity::Peer { result, .. }) => result.as_ref(),
            _ => None,
        }
    }

    fn outcome(&self, a: u8) -> &Outcome {
        match self.result(a) {
            Some(Ok(o)) => o,
            other => panic!("peer {a}: {other:?}"),
        }
    }

    fn send(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        let d = self
            .delay
            .get(&(from, to))
            .or(self.delay.get(&(to, from)))
            .copied()
            .unwrap_or(Duration::from_millis(1));
        self.seq += 1;
        self.queue.push((self.now + d, self.seq, from, to, data));
    }

    fn drain(&mut self, a: SocketAddr) {
        let mut sends = Vec::new();
        let mut check = None;
        match self.ents.get_mut(&a) {
            Some(Entity::Node(n)) => {
                while let Some(o) = n.poll_output() {
                    if let Output::Transmit { to, data, .. } = o {
                        sends.push((to, data));
                    }
                }
            }
            Some(Entity::Peer {
                peer,
                on_link,
                result,
            }) => {
                while let Some(o) = peer.poll_output() {
                    match o {
                        PeerOutput::Transmit { to, data } => sends.push((to, data)),
                        PeerOutput::CheckNeighbour { .. } => check = Some(*on_link),
                        PeerOutput::Done(o) => *result = Some(Ok(*o)),
                        PeerOutput::Failed(e) => *result = Some(Err(e)),
                    }
                }
            }
            _ => {}
        }
        for (to, data) in sends {
            self.send(a, to, data);
        }
        if let Some(on) = check {
            if let Some(Entity::Peer { peer, .. }) = self.ents.get_mut(&a) {
                peer.neighbour_result(self.now, on);
            }
            self.drain(a);
        }
    }

    fn deliver(&mut self, from: SocketAddr, to: SocketAddr, data: Vec<u8>) {
        if let Ok(m) = Message::parse(&data) {
            self.log.push((from, to, m.method(), m.class()));
        }
        let now = self.now;
        match self.ents.get_mut(&to) {
            Some(Entity::Node(n)) => n.handle_input(now, from, &data),
            Some(Entity::Peer { peer, .. }) => peer.handle_input(now, from, &data),
            Some(Entity::Plain) => {
                if let Ok(m) = Message::parse(&data) {
                    if m.class() == Class::Request {
                        let r =
                            wire::encode_error(m.method(), *m.transaction_id(), 400, "", &[], None);
                        self.send(to, from, r);
                    }
                }
                return;
            }
            _ => return,
        }
        self.drain(to);
    }

    fn next_timer(&self) -> Option<(Instant, SocketAddr)> {
        self.ents
            .iter()
            .filter_map(|(a, e)| match e {
                Entity::Node(n) => n.poll_timeout().map(|t| (t, *a)),
                Entity::Peer { peer, .. } => peer.poll_timeout().map(|t| (t, *a)),
                _ => None,
            })
            .min()
    }

    /// Runs until nothing is left to do or `limit` of virtual time passes.
    fn run_for(&mut self, limit: Duration) {
        let end = self.now + limit;
        for _ in 0..1_000_000 {
            self.queue.sort_by_key(|(t, s, ..)| (*t, *s));
            let q = self.queue.first().map(|(t, ..)| *t);
            let timer = self.next_timer();
            let next = match (q, timer) {
                (None, None) => return,
                (Some(q), None) => q,
                (None, Some((t, _))) => t,
                (Some(q), Some((t, _))) => q.min(t),
            };
            if next > end {
                self.now = end;
                return;
            }
            self.now = self.now.max(next);
            if q == Some(next) {
                let (_, _, from, to, data) = self.queue.remove(0);
                self.deliver(from, to, data);
            } else if let Some((_, a)) = timer {
                let now = self.now;
                match self.ents.get_mut(&a) {
                    Some(Entity::Node(n)) => n.handle_timeout(now),
                    Some(Entity::Peer { peer, .. }) => peer.handle_timeout(now),
                    _ => {}
                }
                self.drain(a);
            }
        }
        panic!("simulation did not settle");
    }

    fn run(&mut self) {
        self.run_for(Duration::from_secs(120));
    }

    fn sent_to(&self, a: u8, method: u16) -> usize {
        self.log
            .iter()
            .filter(|(_, to, m, c)| *to == addr(a) && *m == method && *c == Class::Request)
            .count()
    }

    fn assert_clean(&self) {
        for (a, e) in &self.ents {
            if let Entity::Node(n) = e {
                let s = n.stats();
                assert_eq!(s.pending, 0, "pending left at {a}: {s:?}");
                assert_eq!(s.upstream, 0, "upstream left at {a}: {s:?}");
                assert_eq!(s.exchanges, 0, "exchanges left at {a}: {s:?}");
            }
        }
    }

    fn elapsed(&self) -> Duration {
        self.now - self.t0
    }
}

/// Root at .1; ISP node at .2 (no gateway); home routers .3 and .4 under it; peers .10, .11.
fn isp_topology(s: &mut Sim) {
    s.node("root", ROOT, None, &[]);
    s.node("isp", 2, None, &["home-a", "home-b"]);
    s.node("home-a", 3, Some(2), &[]);
    s.node("home-b", 4, Some(2), &[]);
    // Realistic one-way delays: LAN 1 ms, home to ISP 10 ms, to the root 40 ms.
    for (a, b, ms) in [(10, 3, 1), (11, 4, 1), (3, 2, 10), (4, 2, 10)] {
        s.delay
            .insert((addr(a), addr(b)), Duration::from_millis(ms));
    }
    for a in [2, 3, 4, 10, 11] {
        s.delay
            .insert((addr(a), addr(ROOT)), Duration::from_millis(40));
    }
}

#[test]
fn peers_under_one_isp_meet_at_the_isp_node() {
    let mut s = Sim::new();
    isp_topology(&mut s);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    for p in [10, 11] {
        let o = s.outcome(p);
        assert_eq!(o.route, Route::Node { name: "isp".into() });
        let r = o.relay.as_ref().unwrap();
        assert_eq!(
            r.uris,
            vec!["turn:198.18.0.2:3478?transport=udp".to_string()]
        );
        assert!(r.username.contains(":rawr-"));
        assert_eq!(
            r.password,
            kyuu_rawr::cred::rest_password("secret-isp", &r.username)
        );
    }
    assert_eq!(
        s.outcome(10).relay.as_ref().unwrap().path,
        vec!["home-a", "isp"]
    );
    assert_eq!(
        s.outcome(11).relay.as_ref().unwrap().path,
        vec!["home-b", "isp"]
    );
    // The root paired nothing; the request that reached it was cancelled.
    assert_eq!(s.node_mut(ROOT).stats().paired, 0);
    assert_eq!(s.node_mut(2).stats().paired, 1);
    assert!(s.sent_to(ROOT, wire::method::CANCEL) >= 1);
    // Setup within one root round trip plus one round trip to the meeting node (+ slack for
    // the second peer starting at the same time).
    let o = s.outcome(10);
    assert!(o.total_ms <= 80 + 22 + 10, "setup took {} ms", o.total_ms);
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn same_link_peers_go_direct_and_no_node_relays() {
    let mut s = Sim::new();
    s.overlap = false;
    s.node("root", ROOT, None, &[]);
    s.node("home", 3, None, &[]);
    s.peer(10, 0xa, 0xb, Some(3), true);
    s.peer(11, 0xb, 0xa, Some(3), true);
    s.run();
    assert_eq!(s.outcome(10).route, Route::Direct);
    assert_eq!(s.outcome(11).route, Route::Direct);
    assert!(s.outcome(10).relay.is_none());
    assert_eq!(s.sent_to(3, wire::method::CONNECT), 0);
    assert_eq!(s.sent_to(ROOT, wire::method::CONNECT), 0);
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn without_nodes_it_is_turn_through_the_root() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.peer(10, 0xa, 0xb, None, false);
    s.peer(11, 0xb, 0xa, None, false);
    s.run();
    for p in [10, 11] {
        let o = s.outcome(p);
        assert_eq!(
            o.route,
            Route::Root {
                name: "root".into()
            }
        );
        assert_eq!(o.relay.as_ref().unwrap().path, vec!["root"]);
    }
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn plain_turn_gateway_falls_back_to_the_root() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.ents.insert(addr(3), Entity::Plain);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(3), false);
    s.run();
    for p in [10, 11] {
        let o = s.outcome(p);
        assert_eq!(
            o.route,
            Route::Root {
                name: "root".into()
            }
        );
        assert!(
            o.gateway_error
                .as_deref()
                .unwrap()
                .contains("does not speak RAWR"),
            "{:?}",
            o.gateway_error
        );
    }
    // The fallback is decided from Register (at most a racing first Connect reaches the plain
    // server, answered 400 like any unknown method).
    assert!(s.sent_to(3, wire::method::CONNECT) <= 2);
}

#[test]
fn four_level_chains_meet_at_their_lowest_common_node() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.node("n4", 2, None, &["n3"]);
    s.node("n3", 3, Some(2), &["a2", "b2"]);
    s.node("a2", 4, Some(3), &["a1"]);
    s.node("a1", 5, Some(4), &[]);
    s.node("b2", 6, Some(3), &["b1"]);
    s.node("b1", 7, Some(6), &[]);
    s.peer(10, 0xa, 0xb, Some(5), false);
    s.peer(11, 0xb, 0xa, Some(7), false);
    s.run();
    let a = s.outcome(10);
    assert_eq!(a.route, Route::Node { name: "n3".into() });
    assert_eq!(a.relay.as_ref().unwrap().path, vec!["a1", "a2", "n3"]);
    assert_eq!(
        s.outcome(11).relay.as_ref().unwrap().path,
        vec!["b1", "b2", "n3"]
    );
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn four_level_chain_up_to_the_root() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &["n4"]);
    s.node("n4", 2, Some(ROOT), &["n3"]);
    s.node("n3", 3, Some(2), &["n2"]);
    s.node("n2", 4, Some(3), &["n1"]);
    s.node("n1", 5, Some(4), &[]);
    s.peer(10, 0xa, 0xb, Some(5), false);
    s.peer(11, 0xb, 0xa, None, false);
    s.run();
    let a = s.outcome(10);
    assert_eq!(
        a.route,
        Route::Root {
            name: "root".into()
        }
    );
    assert_eq!(
        a.relay.as_ref().unwrap().path,
        vec!["n1", "n2", "n3", "n4", "root"]
    );
    assert_eq!(
        s.outcome(11).route,
        Route::Root {
            name: "root".into()
        }
    );
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn gateway_loop_is_refused_and_the_peer_falls_back() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.node("x", 3, Some(4), &["y"]);
    s.node("y", 4, Some(3), &["x"]);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, None, false);
    s.run();
    let a = s.outcome(10);
    assert_eq!(
        a.route,
        Route::Root {
            name: "root".into()
        }
    );
    let why = a.gateway_error.as_deref().unwrap();
    assert!(why.contains("482") && why.contains("x -> y -> x"), "{why}");
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn too_many_hops_is_refused() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    // A chain of 18 nodes: the 17th forward has no hops left.
    for i in 0..18u8 {
        let gw = if i == 17 { None } else { Some(31 + i) };
        let child = if i > 0 {
            format!("c{}", i - 1)
        } else {
            String::new()
        };
        let children: Vec<&str> = if i > 0 { vec![child.as_str()] } else { vec![] };
        s.node(&format!("c{i}"), 30 + i, gw, &children);
    }
    s.peer(10, 0xa, 0xb, Some(30), false);
    s.peer(11, 0xb, 0xa, None, false);
    s.run();
    let a = s.outcome(10);
    assert!(a.gateway_error.as_deref().unwrap().contains("483"), "{a:?}");
    assert_eq!(
        a.route,
        Route::Root {
            name: "root".into()
        }
    );
}

#[test]
fn same_link_peers_go_direct_and_withdraw_their_parallel_connects() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.node("home", 3, None, &[]);
    for a in [10, 11, 3] {
        s.delay
            .insert((addr(a), addr(ROOT)), Duration::from_millis(40));
    }
    s.peer(10, 0xa, 0xb, Some(3), true);
    s.run_for(Duration::from_millis(30));
    s.peer(11, 0xb, 0xa, Some(3), true);
    s.run();
    assert_eq!(s.outcome(10).route, Route::Direct);
    assert_eq!(s.outcome(11).route, Route::Direct);
    // The wildcard Connects went out with Exchange; direct peers cancel what is still held.
    assert_eq!(s.sent_to(3, wire::method::CONNECT), 2);
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn parallel_connect_sets_up_within_one_root_rtt_plus_one_meeting_rtt() {
    let mut s = Sim::new();
    isp_topology(&mut s);
    for a in [10, 11, 2, 3, 4] {
        s.delay
            .insert((addr(a), addr(ROOT)), Duration::from_millis(40));
    }
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    for p in [10, 11] {
        let o = s.outcome(p);
        assert_eq!(o.route, Route::Node { name: "isp".into() });
        // Sequential Exchange then Connect costs 80 ms plus the climb; in parallel it is the
        // root round trip alone (+ a millisecond of sim delay per hop).
        assert!(o.total_ms <= 80 + 5, "setup took {} ms", o.total_ms);
    }
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn sequential_peers_still_pair_with_parallel_ones() {
    let mut s = Sim::new();
    isp_topology(&mut s);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.overlap = false;
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    assert_eq!(s.outcome(10).route, Route::Node { name: "isp".into() });
    assert_eq!(s.outcome(11).route, Route::Node { name: "isp".into() });
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn target_on_the_subnet_pairs_at_the_gateway_without_forwarding() {
    let mut s = Sim::new();
    // Rule 2 needs TARGET-MAC: sequential peers.
    s.overlap = false;
    s.node("root", ROOT, None, &[]);
    s.node("home", 3, None, &[]);
    s.node_mut(3).set_neighbours([Mac([2, 0, 0, 0, 0, 0xb])]);
    // The peers do not see each other (e.g. separate Wi-Fi client isolation), the router does.
    s.delay
        .insert((addr(11), addr(ROOT)), Duration::from_millis(40));
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(3), false);
    s.run();
    assert_eq!(
        s.outcome(10).route,
        Route::Node {
            name: "home".into()
        }
    );
    assert_eq!(s.node_mut(3).stats().forwarded, 0);
    assert_eq!(s.sent_to(ROOT, wire::method::CONNECT), 0);
}

#[test]
fn local_hold_is_bounded_when_the_target_goes_elsewhere() {
    let mut s = Sim::new();
    s.overlap = false;
    s.node("root", ROOT, None, &[]);
    s.node("home", 3, None, &[]);
    s.node_mut(3).set_neighbours([Mac([2, 0, 0, 0, 0, 0xb])]);
    s.peer(10, 0xa, 0xb, Some(3), false);
    // B does not use the home node.
    s.peer(11, 0xb, 0xa, None, false);
    s.run();
    assert_eq!(
        s.outcome(10).route,
        Route::Root {
            name: "root".into()
        }
    );
    assert!(s.outcome(10).total_ms >= 1000);
    assert_eq!(s.node_mut(3).stats().forwarded, 1);
}

#[test]
fn gateway_killed_mid_request_falls_back_to_the_root() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.node("home", 3, None, &[]);
    s.delay
        .insert((addr(11), addr(ROOT)), Duration::from_millis(40));
    s.peer(10, 0xa, 0xb, Some(3), false);
    // Let A's Connect reach the gateway, then kill it.
    s.run_for(Duration::from_millis(10));
    s.ents.insert(addr(3), Entity::Dead);
    s.peer(11, 0xb, 0xa, None, false);
    s.run();
    let a = s.outcome(10);
    assert_eq!(
        a.route,
        Route::Root {
            name: "root".into()
        }
    );
    assert!(
        a.gateway_error
            .as_deref()
            .unwrap()
            .contains("stopped answering"),
        "{:?}",
        a.gateway_error
    );
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn node_restart_mid_request_only_costs_a_retransmission() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.node("isp", 2, None, &["home-a", "home-b"]);
    s.node("home-a", 3, Some(2), &[]);
    s.node("home-b", 4, Some(2), &[]);
    for a in [10, 11, 2, 3, 4] {
        s.delay
            .insert((addr(a), addr(ROOT)), Duration::from_millis(40));
    }
    s.delay
        .insert((addr(11), addr(4)), Duration::from_millis(200));
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run_for(Duration::from_millis(150));
    // A's Connect is pending at isp, B's is still on its way; restart isp (state lost).
    assert_eq!(s.node_mut(2).stats().pending, 1);
    s.node("isp", 2, None, &["home-a", "home-b"]);
    s.run();
    assert_eq!(s.outcome(10).route, Route::Node { name: "isp".into() });
    assert_eq!(s.outcome(11).route, Route::Node { name: "isp".into() });
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

#[test]
fn root_unreachable_is_a_clear_error() {
    let mut s = Sim::new();
    s.peer(10, 0xa, 0xb, None, false);
    s.run();
    match s.result(10) {
        Some(Err(PeerError::RootUnreachable(a))) => assert_eq!(*a, addr(ROOT)),
        other => panic!("{other:?}"),
    }
    assert!(s.elapsed() <= Duration::from_secs(3));
}

#[test]
fn lonely_peer_times_out_and_leaves_nothing_behind() {
    let mut s = Sim::new();
    s.node("root", ROOT, None, &[]);
    s.peer(10, 0xa, 0xb, None, false);
    s.run();
    assert!(matches!(s.result(10), Some(Err(PeerError::Deadline(_)))));
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

// ---- Node rules driven with raw messages ----

fn connect(sess: u8, from: u8, to: u8, path: &[&str]) -> wire::ConnectReq {
    wire::ConnectReq {
        session: vec![sess; 16],
        mac: Mac([2, 0, 0, 0, 0, from]),
        target: Some(Mac([2, 0, 0, 0, 0, to])),
        root: addr(ROOT),
        hops: 16,
        path: path.iter().map(|s| s.to_string()).collect(),
    }
}

fn outputs(n: &mut Node) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut v = Vec::new();
    while let Some(o) = n.poll_output() {
        if let Output::Transmit { to, data, .. } = o {
            v.push((to, data));
        }
    }
    v
}

fn class_and_code(data: &[u8]) -> (Class, Option<u16>) {
    let m = Message::parse(data).unwrap();
    (m.class(), m.error_code().map(|e| e.unwrap().code))
}

#[test]
fn per_source_and_total_caps() {
    let mut cfg = node_cfg("root", addr(ROOT));
    cfg.limits.max_pending_per_source = 2;
    cfg.limits.max_pending = 3;
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let src = addr(10);
    for i in 0..3u8 {
        let d = wire::encode_connect(TransactionId([i; 12]), &connect(i, 1, 2, &[]), None);
        n.handle_input(t, src, &d);
    }
    let outs = outputs(&mut n);
    assert_eq!(
        class_and_code(&outs.last().unwrap().1),
        (Class::Error, Some(486))
    );
    let d = wire::encode_connect(TransactionId([7; 12]), &connect(7, 1, 2, &[]), None);
    n.handle_input(t, addr(11), &d);
    let d = wire::encode_connect(TransactionId([8; 12]), &connect(8, 1, 2, &[]), None);
    n.handle_input(t, addr(12), &d);
    let outs = outputs(&mut n);
    assert_eq!(
        class_and_code(&outs.last().unwrap().1),
        (Class::Error, Some(508))
    );
    // Expiry frees everything and answers 408.
    let later = t + Duration::from_secs(21);
    n.handle_timeout(later);
    let outs = outputs(&mut n);
    assert_eq!(outs.len(), 3);
    assert!(outs
        .iter()
        .all(|(_, d)| class_and_code(d) == (Class::Error, Some(408))));
    assert_eq!(n.stats().pending, 0);
}

#[test]
fn link_authentication() {
    let mut cfg = node_cfg("isp", addr(2));
    cfg.children = vec![ChildConfig {
        name: "home".into(),
        key: "right".into(),
    }];
    cfg.require_links = true;
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let wrong = kyuu_stun::integrity::Key::short_term("wrong");
    let auth = wire::Auth {
        username: Some("home"),
        key: &wrong,
    };
    let d = wire::encode_connect(
        TransactionId([1; 12]),
        &connect(1, 1, 2, &["home"]),
        Some(&auth),
    );
    n.handle_input(t, addr(3), &d);
    assert_eq!(
        class_and_code(&outputs(&mut n)[0].1),
        (Class::Error, Some(401))
    );
    // Unauthenticated with a path: refused under require_links.
    let d = wire::encode_connect(TransactionId([2; 12]), &connect(1, 1, 2, &["home"]), None);
    n.handle_input(t, addr(3), &d);
    assert_eq!(
        class_and_code(&outputs(&mut n)[0].1),
        (Class::Error, Some(403))
    );
    // Right key: held (pending indication), forwarded to the root.
    let right = kyuu_stun::integrity::Key::short_term("right");
    let auth = wire::Auth {
        username: Some("home"),
        key: &right,
    };
    let d = wire::encode_connect(
        TransactionId([3; 12]),
        &connect(1, 1, 2, &["home"]),
        Some(&auth),
    );
    n.handle_input(t, addr(3), &d);
    let outs = outputs(&mut n);
    assert_eq!(class_and_code(&outs[0].1), (Class::Indication, None));
    assert_eq!(outs[1].0, addr(ROOT));
    // A spoofed answer from the root is accepted only from its transaction: fine (no key on
    // the root link); but an answer with a wrong transaction id is ignored.
    let fake = wire::encode_error(
        wire::method::CONNECT,
        TransactionId([9; 12]),
        504,
        "",
        &[],
        None,
    );
    n.handle_input(t, addr(ROOT), &fake);
    assert!(outputs(&mut n).is_empty());
    assert_eq!(n.stats().pending, 1);
}

#[test]
fn unauthenticated_answer_from_a_linked_gateway_is_dropped() {
    let mut cfg = node_cfg("home", addr(3));
    cfg.gateway = Some(GatewayConfig {
        addr: addr(2),
        key: Some("k".into()),
    });
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let d = wire::encode_connect(TransactionId([1; 12]), &connect(1, 1, 2, &[]), None);
    n.handle_input(t, addr(10), &d);
    let outs = outputs(&mut n);
    let up = outs.iter().find(|(to, _)| *to == addr(2)).unwrap();
    let tid = *Message::parse(&up.1).unwrap().transaction_id();
    let spoof = wire::encode_error(wire::method::CONNECT, tid, 504, "", &[], None);
    n.handle_input(t, addr(2), &spoof);
    assert!(outputs(&mut n).is_empty());
    assert_eq!(n.stats().pending, 1);
    let key = kyuu_stun::integrity::Key::short_term("k");
    let real = wire::encode_error(
        wire::method::CONNECT,
        tid,
        482,
        "loop",
        &[],
        Some(&wire::Auth {
            username: None,
            key: &key,
        }),
    );
    n.handle_input(t, addr(2), &real);
    let outs = outputs(&mut n);
    assert_eq!(outs[0].0, addr(10));
    assert_eq!(class_and_code(&outs[0].1), (Class::Error, Some(482)));
    assert_eq!(n.stats().pending, 0);
}

#[test]
fn exchange_is_idempotent_and_full_at_two() {
    let cfg = node_cfg("root", addr(ROOT));
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let s = [5u8; 16];
    let a = Mac([2, 0, 0, 0, 0, 0xa]);
    let b = Mac([2, 0, 0, 0, 0, 0xb]);
    n.handle_input(
        t,
        addr(10),
        &wire::encode_exchange(TransactionId([1; 12]), &s, a, &[]),
    );
    let outs = outputs(&mut n);
    assert_eq!(class_and_code(&outs[0].1).0, Class::Indication);
    n.handle_input(
        t,
        addr(11),
        &wire::encode_exchange(TransactionId([2; 12]), &s, b, &[addr(11)]),
    );
    let outs = outputs(&mut n);
    assert_eq!(outs.len(), 2);
    for (to, d) in &outs {
        let m = Message::parse(d).unwrap();
        let (other, _) = wire::decode_exchange_answer(&m).unwrap();
        assert_eq!(other, if *to == addr(10) { b } else { a });
    }
    // A retry with a new transaction id gets the answer at once.
    n.handle_input(
        t,
        addr(10),
        &wire::encode_exchange(TransactionId([3; 12]), &s, a, &[]),
    );
    let outs = outputs(&mut n);
    let m = Message::parse(&outs[0].1).unwrap();
    assert_eq!(
        wire::decode_exchange_answer(&m).unwrap(),
        (b, vec![addr(11)])
    );
    // A third MAC.
    let c = Mac([2, 0, 0, 0, 0, 0xc]);
    n.handle_input(
        t,
        addr(12),
        &wire::encode_exchange(TransactionId([4; 12]), &s, c, &[]),
    );
    assert_eq!(
        class_and_code(&outputs(&mut n)[0].1),
        (Class::Error, Some(409))
    );
    n.handle_timeout(t + Duration::from_secs(31));
    assert_eq!(n.stats().exchanges, 0);
}

#[test]
fn cancel_frees_the_forwarded_request_upstream() {
    let mut s = Sim::new();
    isp_topology(&mut s);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run_for(Duration::from_millis(300));
    // Before its own timeout, the root has already dropped the request it held.
    assert_eq!(s.node_mut(ROOT).stats().pending, 0);
    let _ = HashSet::<u8>::new();
}

#[test]
fn register_counts_a_mac_as_local_and_expires() {
    let cfg = node_cfg("home", addr(3));
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let m = Mac([6, 1, 2, 3, 4, 5]);
    n.handle_input(
        t,
        addr(10),
        &wire::encode_register(TransactionId([1; 12]), m, Some(5)),
    );
    let outs = outputs(&mut n);
    assert_eq!(class_and_code(&outs[0].1).0, Class::Success);
    assert_eq!(n.stats().registrations, 1);
    n.handle_timeout(t + Duration::from_secs(6));
    assert_eq!(n.stats().registrations, 0);
}

#[test]
fn garbage_never_panics() {
    let cfg = node_cfg("root", addr(ROOT));
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let valid = wire::encode_connect(TransactionId([1; 12]), &connect(1, 1, 2, &["a"]), None);
    for cut in 0..valid.len() {
        n.handle_input(t, addr(10), &valid[..cut]);
    }
    for i in 20..valid.len() {
        let mut v = valid.clone();
        v[i] ^= 0xff;
        n.handle_input(t, addr(10), &v);
    }
    let _ = outputs(&mut n);
}

#[test]
fn neighbour_reads_are_skipped_when_the_connect_pairs() {
    let cfg = node_cfg("isp", addr(2));
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let a = wire::encode_connect(TransactionId([1; 12]), &connect(1, 1, 2, &[]), None);
    assert!(n.needs_neighbours(&a));
    n.handle_input(t, addr(10), &a);
    assert!(!n.needs_neighbours(&a), "a retransmission");
    let b = wire::encode_connect(TransactionId([2; 12]), &connect(1, 2, 1, &[]), None);
    assert!(!n.needs_neighbours(&b), "the partner pairs");
    n.set_neighbours([Mac([2, 0, 0, 0, 0, 9])]);
    let c = wire::encode_connect(TransactionId([3; 12]), &connect(2, 1, 9, &[]), None);
    assert!(!n.needs_neighbours(&c), "target already known local");
    assert!(!n.needs_neighbours(b"garbage"));
}

#[test]
fn a_root_missing_its_own_address_says_so() {
    let mut cfg = node_cfg("root", addr(ROOT));
    cfg.self_addrs.clear();
    cfg.relay = vec!["turn:198.18.0.200:3478".into()];
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let d = wire::encode_connect(TransactionId([1; 12]), &connect(1, 1, 2, &[]), None);
    n.handle_input(t, addr(10), &d);
    let outs = outputs(&mut n);
    // It forwards to ROOT, which is itself...
    let (to, fwd) = outs.iter().find(|(to, _)| *to == addr(ROOT)).unwrap();
    n.handle_input(t, addr(ROOT), fwd);
    let _ = to;
    let outs = outputs(&mut n);
    // ...answers itself 482 naming the fix, and passes that down to the peer.
    let back = outs.iter().find(|(to, _)| *to == addr(ROOT)).unwrap();
    n.handle_input(t, addr(ROOT), &back.1);
    let outs = outputs(&mut n);
    let (to, d) = &outs[0];
    assert_eq!(*to, addr(10));
    let m = Message::parse(d).unwrap();
    let e = m.error_code().unwrap().unwrap();
    assert_eq!(e.code, 482);
    assert!(e.reason.contains("rawr.self"), "{}", e.reason);
}

#[test]
fn relay_uris_count_as_self_addresses() {
    let mut cfg = node_cfg("root", addr(ROOT));
    cfg.self_addrs.clear();
    // node_cfg's relay URI names addr(ROOT): that alone makes it the root.
    let t = Instant::now();
    let mut n = Node::new(&cfg, t, 0, 1);
    let d = wire::encode_connect(TransactionId([1; 12]), &connect(1, 1, 2, &[]), None);
    n.handle_input(t, addr(10), &d);
    let outs = outputs(&mut n);
    assert_eq!(outs.len(), 1, "held, not forwarded");
    assert_eq!(class_and_code(&outs[0].1), (Class::Indication, None));
}

#[test]
fn side_whose_answer_died_below_is_redirected_by_the_root_to_where_it_paired() {
    // A's parallel Connect climbs home-a → isp → root; home-a dies; B pairs with A's request at
    // isp, whose answer to A is lost with home-a. A falls back to the root, which learnt from
    // isp's Cancel where A's half paired, and hands A the isp relay.
    let mut s = Sim::new();
    isp_topology(&mut s);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.run_for(Duration::from_millis(100));
    assert_eq!(s.node_mut(2).stats().pending, 1);
    s.ents.insert(addr(3), Entity::Dead);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    assert_eq!(s.outcome(11).route, Route::Node { name: "isp".into() });
    let a = s.outcome(10);
    assert_eq!(a.route, Route::Node { name: "isp".into() }, "{a:?}");
    assert!(a
        .gateway_error
        .as_deref()
        .unwrap()
        .contains("stopped answering"));
    assert_eq!(s.node_mut(ROOT).stats().paired, 0);
    s.run_for(Duration::from_secs(60));
    s.assert_clean();
}

/// The ISP topology with the ISP node's config adjusted by `f`.
fn isp_topology_with(s: &mut Sim, f: impl FnOnce(&mut RawrConfig)) {
    isp_topology(s);
    s.node_with("isp", 2, None, &["home-a", "home-b"], f);
}

#[test]
fn reservation_refused_per_link_sends_the_session_above() {
    let mut s = Sim::new();
    isp_topology_with(&mut s, |c| c.limits.sessions_per_link = 1);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    assert_eq!(s.outcome(10).route, Route::Node { name: "isp".into() });
    // A second session over the same links: home-a already holds its one reservation at isp.
    s.session = vec![8; 16];
    s.peer(12, 0xc, 0xd, Some(3), false);
    s.peer(13, 0xd, 0xc, Some(4), false);
    s.run();
    for p in [12, 13] {
        let o = s.outcome(p);
        assert_eq!(
            o.route,
            Route::Root {
                name: "root".into()
            },
            "{o:?}"
        );
        assert!(o.gateway_error.as_deref().unwrap().contains("470"), "{o:?}");
    }
}

#[test]
fn session_over_its_limit_meets_above_when_the_peers_come_back() {
    let mut s = Sim::new();
    isp_topology(&mut s);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    let user = s.outcome(10).relay.as_ref().unwrap().username.clone();
    assert_eq!(s.outcome(10).route, Route::Node { name: "isp".into() });
    // The ISP's TURN server reports the byte or time limit reached; the peers run again.
    let now = s.now;
    s.node_mut(2).session_exhausted(now, &user);
    s.peer(10, 0xa, 0xb, Some(3), false);
    s.peer(11, 0xb, 0xa, Some(4), false);
    s.run();
    for p in [10, 11] {
        let o = s.outcome(p);
        assert_eq!(
            o.route,
            Route::Root {
                name: "root".into()
            },
            "{o:?}"
        );
        assert!(o.gateway_error.as_deref().unwrap().contains("470"), "{o:?}");
    }
}

// ---- A root that is a fleet (§4.7) ----

#[test]
fn fleet_halves_at_two_root_nodes_pair_at_the_owner() {
    let (r1, r2) = (addr(1), addr(2));
    let mut c1 = node_cfg("root1", r1);
    let mut c2 = node_cfg("root2", r2);
    for c in [&mut c1, &mut c2] {
        c.children = vec![ChildConfig {
            name: "isp".into(),
            key: "isp-key".into(),
        }];
    }
    let t = Instant::now();
    let (mut n1, n2) = (Node::new(&c1, t, 0, 1), Node::new(&c2, t, 0, 2));
    // A's wildcard Connect names root1 and is held there; B's names root2.
    let mut ca = connect(7, 0xa, 0, &[]);
    ca.target = None;
    ca.root = r1;
    let mut cb = connect(7, 0xb, 0, &[]);
    cb.target = None;
    cb.root = r2;
    let (pa, pb) = (addr(10), addr(11));
    n1.handle_input(
        t,
        pa,
        &wire::encode_connect(TransactionId([1; 12]), &ca, None),
    );
    outputs(&mut n1);
    let db = wire::encode_connect(TransactionId([2; 12]), &cb, None);
    // At root2 it is a root request of session 7; a Connect naming another root is not.
    assert_eq!(
        n2.fleet_route(&db),
        Some(kyuu_rawr::node::FleetRoute::Claim(vec![7; 16]))
    );
    assert_eq!(n1.fleet_route(&db), None);
    let ex = wire::encode_exchange(
        TransactionId([3; 12]),
        &[7; 16],
        Mac([2, 0, 0, 0, 0, 0xb]),
        &[],
    );
    assert_eq!(
        n2.fleet_route(&ex),
        Some(kyuu_rawr::node::FleetRoute::Claim(vec![7; 16]))
    );
    // root2 forwards it to the owner, root1, which pairs it with A's and answers both.
    let fwd = n2.fleet_forward(&db, r1).unwrap();
    assert!(n1.fleet_route(&fwd).is_some());
    n1.handle_input(t, pb, &fwd);
    let outs = outputs(&mut n1);
    let ok: Vec<_> = outs
        .iter()
        .filter(|(_, d)| class_and_code(d).0 == Class::Success)
        .map(|(to, _)| *to)
        .collect();
    assert!(ok.contains(&pa) && ok.contains(&pb), "{outs:?}");
    assert_eq!(n1.stats().paired, 1);

    // A linked child's Connect is signed again with the shared key; a forged one is refused.
    let key = kyuu_stun::integrity::Key::short_term("isp-key");
    let auth = wire::Auth {
        username: Some("isp"),
        key: &key,
    };
    let mut cc = connect(8, 0xc, 0, &["isp"]);
    cc.target = None;
    cc.root = r2;
    let signed = wire::encode_connect(TransactionId([4; 12]), &cc, Some(&auth));
    let fwd = n2.fleet_forward(&signed, r1).unwrap();
    n1.handle_input(t, pb, &fwd);
    let outs = outputs(&mut n1);
    assert!(
        outs.iter().all(|(_, d)| class_and_code(d).1.is_none()),
        "{outs:?}"
    );
    assert_eq!(n1.stats().pending, 1);
    let bad_key = kyuu_stun::integrity::Key::short_term("wrong");
    let forged = wire::encode_connect(
        TransactionId([5; 12]),
        &cc,
        Some(&wire::Auth {
            username: Some("isp"),
            key: &bad_key,
        }),
    );
    assert_eq!(n2.fleet_forward(&forged, r1), None);
}
