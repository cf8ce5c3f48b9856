//! Permissions (RFC 8656 §9) and the peer policy: who a client may reach and hear from.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kyuu_client::turn::Event;
use kyuu_stun::ErrorCode;

/// Addresses the default policy refuses (RFC 8656 §21.1 and docs: loopback, private, CGNAT,
/// benchmarking, unspecified, multicast, broadcast).
const DENIED: [&str; 8] = [
    "127.0.0.1:9",
    "10.0.0.1:9",
    "192.168.1.1:9",
    "100.64.0.1:9",
    "198.18.0.1:9",
    "0.0.0.0:9",
    "224.0.0.1:9",
    "255.255.255.255:9",
];

#[test]
fn a_send_indication_without_a_permission_is_dropped() {
    let mut p = Pair::new(cfg());
    p.allocate();
    assert_eq!(p.send_indication(peer(), b"hello"), None);
}

#[test]
fn peer_data_without_a_permission_is_dropped() {
    let mut p = Pair::new(cfg());
    p.allocate();
    assert!(p.peer_sends(peer(), b"x").is_none());
}

#[test]
fn a_permission_lets_send_indications_through_to_the_peer() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    assert_eq!(
        p.send_indication(peer(), b"hello"),
        Some((peer(), b"hello".to_vec()))
    );
}

#[test]
fn peer_data_reaches_the_client_as_a_data_indication() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    let out = p.peer_sends(peer(), b"world").unwrap();
    p.client.handle_input(p.now, &out);
    assert_eq!(
        p.client.poll_event(),
        Some(Event::Data {
            peer: peer(),
            data: b"world".to_vec()
        })
    );
}

#[test]
fn permissions_are_per_ip_not_per_port() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    let other_port: SocketAddr = "8.8.8.8:6000".parse().unwrap();
    assert!(p.peer_sends(other_port, b"w").is_some());
}

#[test]
fn a_permission_expires_after_five_minutes() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    p.advance(Duration::from_secs(299));
    assert!(p.peer_sends(peer(), b"in time").is_some());
    p.advance(Duration::from_secs(2));
    assert!(p.peer_sends(peer(), b"late").is_none());
}

#[test]
fn a_channel_alone_does_not_keep_its_permission_alive() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    p.advance(Duration::from_secs(301));
    assert!(p.peer_sends(peer(), b"late").is_none());
}

#[test]
fn denied_peers_get_403_on_create_permission() {
    let mut p = Pair::new(cfg());
    p.allocate();
    for bad in DENIED {
        p.client.create_permission(p.now, &[bad.parse().unwrap()]);
        p.expect_error(ErrorCode::FORBIDDEN);
    }
}

#[test]
fn denied_peers_get_403_on_channel_bind() {
    let mut p = Pair::new(cfg());
    p.allocate();
    for bad in DENIED {
        p.client.channel_bind(p.now, 0x4000, bad.parse().unwrap());
        p.expect_error(ErrorCode::FORBIDDEN);
    }
}

#[test]
fn send_indications_to_denied_peers_are_dropped() {
    let mut p = Pair::new(cfg());
    p.allocate();
    for bad in DENIED {
        assert_eq!(p.send_indication(bad.parse().unwrap(), b"x"), None, "{bad}");
    }
}

#[test]
fn an_ipv6_peer_on_an_ipv4_allocation_gets_443() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client
        .create_permission(p.now, &["[2606:4700::1]:9".parse().unwrap()]);
    p.expect_error(ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH);
}

#[test]
fn allow_peers_opens_loopback_and_nothing_else() {
    let mut c = cfg();
    c.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    let mut p = Pair::new(c);
    p.allocate();
    p.permit("127.0.0.1:9".parse().unwrap());
    p.client
        .create_permission(p.now, &["10.0.0.1:9".parse().unwrap()]);
    p.expect_error(ErrorCode::FORBIDDEN);
}

#[test]
fn permissions_beyond_max_permissions_get_508() {
    let mut c = cfg();
    c.max_permissions = 2;
    let mut p = Pair::new(c);
    p.allocate();
    p.permit("8.8.8.8:1".parse().unwrap());
    p.permit("8.8.4.4:1".parse().unwrap());
    // Refreshing an existing one is fine; a third IP is not.
    p.permit("8.8.8.8:2".parse().unwrap());
    p.client
        .create_permission(p.now, &["1.1.1.1:1".parse().unwrap()]);
    p.expect_error(ErrorCode::INSUFFICIENT_CAPACITY);
}
