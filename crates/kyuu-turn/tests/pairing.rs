//! In-process pairing (RAWR, `docs/rawr.md` §6.1): two allocations a meeting node paired reach
//! each other without CreatePermission, and their packets are handed over inside the process.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use kyuu_client::turn::{Client, Event};
use kyuu_turn::*;

struct Side {
    sock: ClientSocket,
    cl: Client,
    relayed: SocketAddr,
}

/// Runs `cl`'s transmissions through `s`; returns the relay instructions produced.
fn drive(
    s: &mut Server,
    now: Instant,
    side: &mut (ClientSocket, Client),
) -> Vec<(ToPeer, Vec<u8>)> {
    let mut out = Vec::new();
    for _ in 0..8 {
        let Some(b) = side.1.poll_transmit() else {
            break;
        };
        if let Some(tp) = s.handle_client(now, side.0, &b) {
            out.push((tp.clone(), b[tp.data].to_vec()));
        }
        while let Some(o) = s.poll_output() {
            match o {
                Output::Transmit(t) if t.client == side.0 => side.1.handle_input(now, &t.data),
                Output::BindRelay { key, addr, .. } => s.relay_bound(now, key, Ok(addr)),
                _ => {}
            }
        }
    }
    out
}

fn side(s: &mut Server, now: Instant, user: &str, remote: &str) -> Side {
    let mut x = (
        client_socket(Transport::Udp, remote),
        Client::new(user, "secret", false),
    );
    x.1.allocate(now);
    drive(s, now, &mut x);
    let relayed = *x.1.relayed().first().unwrap();
    Side {
        sock: x.0,
        cl: x.1,
        relayed,
    }
}

fn two() -> (Server, Instant, Side, Side) {
    let mut c = cfg();
    c.users = vec![user("alice", "secret"), user("bob", "secret")];
    let now = Instant::now();
    let mut s = server(c, now);
    let a = side(&mut s, now, "alice", "203.0.113.5:40000");
    let b = side(&mut s, now, "bob", "203.0.113.6:40000");
    (s, now, a, b)
}

/// A sends to B's relayed address with a Send indication; returns the relay instruction.
fn a_sends(
    s: &mut Server,
    now: Instant,
    a: &mut Side,
    to: SocketAddr,
) -> Option<(ToPeer, Vec<u8>)> {
    a.cl.send_indication(to, b"hello b");
    let mut x = (
        a.sock,
        std::mem::replace(&mut a.cl, Client::new("x", "x", false)),
    );
    let r = drive(s, now, &mut x).pop();
    a.cl = x.1;
    r
}

#[test]
fn unpaired_allocations_need_a_permission() {
    let (mut s, now, mut a, b) = two();
    // The relay address is the server's own, which the default policy refuses as a peer.
    assert!(a_sends(&mut s, now, &mut a, b.relayed).is_none());
}

#[test]
fn paired_allocations_reach_each_other_in_process_without_create_permission() {
    let (mut s, now, mut a, mut b) = two();
    assert!(s.pair_usernames(
        now,
        "alice",
        "bob",
        Duration::from_secs(60),
        SessionLimits::default()
    ));
    assert_eq!(s.paired_allocations(), 2);
    let (tp, payload) = a_sends(&mut s, now, &mut a, b.relayed).unwrap();
    assert_eq!(payload, b"hello b");
    let target = tp.paired.expect("a paired target");
    assert_eq!(target.from.addr(), a.relayed);
    // The shell hands the payload to B's allocation as if it came in on B's relay socket.
    let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
    buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(&payload);
    let range = PEER_HEADROOM..PEER_HEADROOM + payload.len();
    let tc = s
        .handle_peer(now, target.relay, target.from, &mut buf, range)
        .unwrap();
    assert_eq!(tc.client, b.sock);
    b.cl.handle_input(now, &buf[tc.data]);
    let got = std::iter::from_fn(|| b.cl.poll_event()).find_map(|e| match e {
        Event::Data { peer, data } => Some((peer, data)),
        _ => None,
    });
    assert_eq!(got, Some((a.relayed, b"hello b".to_vec())));
}

#[test]
fn pairing_learnt_before_the_allocations_links_them_when_they_complete() {
    let mut c = cfg();
    c.users = vec![user("alice", "secret"), user("bob", "secret")];
    let now = Instant::now();
    let mut s = server(c, now);
    assert!(!s.pair_usernames(
        now,
        "alice",
        "bob",
        Duration::from_secs(60),
        SessionLimits::default()
    ));
    let mut a = side(&mut s, now, "alice", "203.0.113.5:40000");
    let b = side(&mut s, now, "bob", "203.0.113.6:40000");
    assert_eq!(s.paired_allocations(), 2);
    assert!(a_sends(&mut s, now, &mut a, b.relayed)
        .unwrap()
        .0
        .paired
        .is_some());
}

#[test]
fn other_peers_still_need_permissions_and_deleting_one_side_unlinks_the_other() {
    let (mut s, now, mut a, b) = two();
    s.pair_usernames(
        now,
        "alice",
        "bob",
        Duration::from_secs(60),
        SessionLimits::default(),
    );
    assert!(a_sends(&mut s, now, &mut a, peer()).is_none());
    let mut x = (b.sock, b.cl);
    x.1.refresh(now, 0);
    drive(&mut s, now, &mut x);
    assert_eq!(s.paired_allocations(), 0);
    assert!(a_sends(&mut s, now, &mut a, b.relayed).is_none());
}

#[test]
fn a_session_over_its_byte_limit_is_cut_and_reported() {
    let (mut s, now, mut a, b) = two();
    let limits = SessionLimits {
        max_bytes: 20,
        max_duration: None,
    };
    s.pair_usernames(now, "alice", "bob", Duration::from_secs(60), limits);
    // 7 bytes a packet: three pass (21 >= 20 after the third), the fourth is dropped.
    let passed = (0..4)
        .filter(|_| a_sends(&mut s, now, &mut a, b.relayed).is_some())
        .count();
    assert_eq!(passed, 3);
    s.handle_timeout(now + Duration::from_secs(2));
    let mut ended = Vec::new();
    while let Some(o) = s.poll_output() {
        if let Output::SessionLimit { username } = o {
            ended.push(username);
        }
    }
    assert_eq!(ended, vec!["alice".to_owned()]);
    assert!(!s.has_allocation(&a.sock));
    assert!(s.has_allocation(&b.sock));
}

#[test]
fn a_session_past_its_time_limit_is_cut() {
    let (mut s, now, a, b) = two();
    let limits = SessionLimits {
        max_bytes: 0,
        max_duration: Some(Duration::from_secs(5)),
    };
    s.pair_usernames(now, "alice", "bob", Duration::from_secs(60), limits);
    s.handle_timeout(now + Duration::from_secs(2));
    assert!(s.has_allocation(&a.sock));
    s.handle_timeout(now + Duration::from_secs(6));
    assert!(!s.has_allocation(&a.sock) && !s.has_allocation(&b.sock));
}
