//! Allocate (RFC 8656 §7.2): what a client gets, and each error it can get instead.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Instant;

use common::*;
use kyuu_client::turn::{AllocateOptions, Client, Event};
use kyuu_stun::ErrorCode;

#[test]
fn allocate_gives_a_relayed_address_on_the_relay_ip_and_the_mapped_address() {
    let mut p = Pair::new(cfg());
    let relayed = p.allocate();
    assert_eq!(relayed.ip().to_string(), "198.51.100.1");
    assert!(cfg().relay_ports.min <= relayed.port() && relayed.port() <= cfg().relay_ports.max);
    assert_eq!(p.server.allocation_count(), 1);
    assert!(p.server.has_allocation(&p.sock));
}

#[test]
fn a_second_allocate_on_the_same_five_tuple_gets_437() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::ALLOCATION_MISMATCH);
}

#[test]
fn an_unknown_requested_transport_gets_442() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        transport: Some(99),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL);
}

#[test]
fn tcp_relaying_requested_over_udp_gets_442() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        transport: Some(6),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL);
}

#[test]
fn tcp_relaying_requested_over_dtls_gets_442() {
    // RFC 7350: a DTLS association runs over UDP, so no RFC 6062 TCP allocation through it.
    let mut p = Pair::with(
        cfg(),
        Client::new("alice", "secret", false),
        kyuu_turn::Transport::Dtls,
    );
    let o = AllocateOptions {
        transport: Some(6),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL);
}

#[test]
fn ipv6_without_an_ipv6_relay_address_gets_440() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        family: Some(2),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED);
}

#[test]
fn an_unknown_address_family_gets_440() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        family: Some(9),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED);
}

#[test]
fn even_port_together_with_a_reservation_token_gets_400() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        even_port: Some(false),
        reservation_token: Some(1),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::BAD_REQUEST);
}

#[test]
fn an_unknown_reservation_token_gets_508() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        reservation_token: Some(1),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::INSUFFICIENT_CAPACITY);
}

#[test]
fn even_port_gives_an_even_port_and_a_token_that_gets_the_next_port_from_another_client() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        even_port: Some(true),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    let ev = p.run();
    let [Event::Allocated {
        relayed,
        reservation_token: Some(token),
        ..
    }] = ev.as_slice()
    else {
        panic!("{ev:?}")
    };
    let even = relayed[0].port();
    assert_eq!(even % 2, 0);
    // Another client of the same server uses the token.
    let mut q = Pair::new(cfg());
    q.server = std::mem::replace(&mut p.server, server(cfg(), p.now));
    q.sock.remote = "203.0.113.6:1".parse().unwrap();
    let o = AllocateOptions {
        reservation_token: Some(*token),
        ..Default::default()
    };
    q.client.allocate_with(q.now, &o);
    let ev = q.run();
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed[0].port(), even + 1);
}

#[test]
fn additional_address_family_gives_an_ipv4_and_an_ipv6_relayed_address() {
    let mut c = cfg();
    c.relay_ipv6 = Some("2001:db8::1".parse().unwrap());
    let mut p = Pair::new(c);
    let o = AllocateOptions {
        additional_ipv6: true,
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    let ev = p.run();
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed.len(), 2);
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6());
}

#[test]
fn additional_together_with_requested_address_family_gets_400() {
    let mut c = cfg();
    c.relay_ipv6 = Some("2001:db8::1".parse().unwrap());
    let mut p = Pair::new(c);
    let o = AllocateOptions {
        additional_ipv6: true,
        family: Some(1),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    p.expect_error(ErrorCode::BAD_REQUEST);
}

#[test]
fn additional_ipv6_without_an_ipv6_relay_address_gives_ipv4_only() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        additional_ipv6: true,
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    let ev = p.run();
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    assert_eq!(relayed.len(), 1);
    assert!(relayed[0].is_ipv4());
}

#[test]
fn the_allocate_fails_with_508_when_no_relay_port_can_be_bound() {
    let mut p = Pair::new(cfg());
    p.bind_fail = 100;
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::INSUFFICIENT_CAPACITY);
    assert_eq!(p.server.allocation_count(), 0);
}

#[test]
fn a_failed_relay_bind_is_retried_on_another_port() {
    let mut p = Pair::new(cfg());
    p.bind_fail = 2;
    p.allocate();
    assert_eq!(p.server.allocation_count(), 1);
}

#[test]
fn an_alternate_server_answers_300() {
    let mut c = cfg();
    c.alternate_server = Some("192.0.2.9:3478".parse().unwrap());
    let mut p = Pair::new(c);
    p.client.allocate(p.now);
    let ev = p.run();
    assert!(
        matches!(ev.as_slice(), [Event::TryAlternate { alternate, .. }]
            if *alternate == "192.0.2.9:3478".parse::<std::net::SocketAddr>().unwrap()),
        "{ev:?}"
    );
}

#[test]
fn a_requested_lifetime_is_capped_at_max_lifetime() {
    let mut p = Pair::new(cfg());
    let o = AllocateOptions {
        lifetime: Some(99_999),
        ..Default::default()
    };
    p.client.allocate_with(p.now, &o);
    let ev = p.run();
    assert!(
        matches!(ev.as_slice(), [Event::Allocated { lifetime: 3600, .. }]),
        "{ev:?}"
    );
}

#[test]
fn the_user_quota_refuses_a_second_allocation_with_486() {
    let mut c = cfg();
    c.user_quota = 1;
    let t0 = Instant::now();
    let mut s = server(c, t0);
    let first = allocate_from(&mut s, t0, "203.0.113.5:1000");
    let second = allocate_from(&mut s, t0, "203.0.113.5:1001");
    assert!(matches!(first, Some(Event::Allocated { .. })));
    assert!(
        matches!(second, Some(Event::Error { code: 486, .. })),
        "{second:?}"
    );
}

#[test]
fn the_total_quota_refuses_a_second_allocation_with_486() {
    let mut c = cfg();
    c.total_quota = 1;
    let t0 = Instant::now();
    let mut s = server(c, t0);
    assert!(matches!(
        allocate_from(&mut s, t0, "203.0.113.5:1000"),
        Some(Event::Allocated { .. })
    ));
    let second = allocate_from(&mut s, t0, "203.0.113.9:1000");
    assert!(
        matches!(second, Some(Event::Error { code: 486, .. })),
        "{second:?}"
    );
}

#[test]
fn the_per_client_quota_refuses_a_second_allocation_from_the_same_ip_with_486() {
    let mut c = cfg();
    c.client_quota = 1;
    let t0 = Instant::now();
    let mut s = server(c, t0);
    assert!(matches!(
        allocate_from(&mut s, t0, "203.0.113.5:1000"),
        Some(Event::Allocated { .. })
    ));
    let same_ip = allocate_from(&mut s, t0, "203.0.113.5:1001");
    assert!(
        matches!(same_ip, Some(Event::Error { code: 486, .. })),
        "{same_ip:?}"
    );
    let other_ip = allocate_from(&mut s, t0, "203.0.113.6:1000");
    assert!(
        matches!(other_ip, Some(Event::Allocated { .. })),
        "{other_ip:?}"
    );
}

#[test]
fn a_freed_quota_slot_can_be_used_again() {
    let mut c = cfg();
    c.user_quota = 1;
    let mut p = Pair::new(c);
    p.allocate();
    p.client.refresh(p.now, 0);
    p.run();
    p.sock.remote = "203.0.113.5:40001".parse().unwrap();
    p.client = Client::new("alice", "secret", false);
    p.allocate();
}
