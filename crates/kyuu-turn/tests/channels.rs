//! Channels (RFC 8656 §12): ChannelBind, ChannelData both ways, and the rules on numbers.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use kyuu_client::turn::Event;
use kyuu_stun::ErrorCode;
use kyuu_turn::TurnConfig;

fn other_peer() -> SocketAddr {
    "8.8.4.4:1".parse().unwrap()
}

#[test]
fn a_bound_channel_carries_channel_data_to_its_peer() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    assert_eq!(
        p.channel_data(0x4001, b"abc"),
        Some((peer(), b"abc".to_vec()))
    );
}

#[test]
fn peer_data_on_a_bound_channel_reaches_the_client_as_channel_data() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    let out = p.peer_sends(peer(), b"defg").unwrap();
    assert_eq!(out, [0x40, 0x01, 0, 4, b'd', b'e', b'f', b'g']);
}

#[test]
fn channel_data_on_an_unbound_channel_is_dropped() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    assert_eq!(p.channel_data(0x4002, b"abc"), None);
}

#[test]
fn channel_data_without_an_allocation_is_dropped() {
    let mut p = Pair::new(cfg());
    assert_eq!(p.channel_data(0x4001, b"abc"), None);
}

#[test]
fn binding_a_bound_number_to_another_peer_gets_400() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    p.client.channel_bind(p.now, 0x4001, other_peer());
    p.expect_error(ErrorCode::BAD_REQUEST);
}

#[test]
fn binding_a_bound_peer_to_another_number_gets_400() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    p.client.channel_bind(p.now, 0x4003, peer());
    p.expect_error(ErrorCode::BAD_REQUEST);
}

#[test]
fn rebinding_the_same_number_to_the_same_peer_refreshes_it() {
    let mut c = cfg();
    c.default_lifetime = 3600;
    let mut p = Pair::new(c);
    p.allocate();
    p.bind_channel(0x4001, peer());
    p.advance(Duration::from_secs(500));
    p.bind_channel(0x4001, peer());
    p.advance(Duration::from_secs(200));
    assert!(p.channel_data(0x4001, b"still").is_some());
}

#[test]
fn channel_numbers_outside_0x4000_to_0x4fff_get_400_by_default() {
    // RFC 8656 §12 / §12.2: 0x4000..=0x4FFF, anything else MUST get 400; RFC 5766's
    // 0x5000..=0x7FFF are no longer channel numbers. Strict is the default.
    assert!(TurnConfig::default().strict_channel_numbers);
    let mut p = Pair::new(cfg());
    p.allocate();
    for n in [0x3FFF, 0x5000, 0x7FFF, 0x8000] {
        p.client.channel_bind(p.now, n, peer());
        p.expect_error(ErrorCode::BAD_REQUEST);
    }
    p.bind_channel(0x4FFF, peer());
    assert_eq!(
        p.channel_data(0x4FFF, b"edge"),
        Some((peer(), b"edge".to_vec()))
    );
}

#[test]
fn channel_numbers_below_0x4000_or_above_0x7fff_get_400_even_for_rfc5766_clients() {
    let mut p = Pair::new(TurnConfig {
        strict_channel_numbers: false,
        ..cfg()
    });
    p.allocate();
    for n in [0x3FFF, 0x8000] {
        p.client.channel_bind(p.now, n, peer());
        p.expect_error(ErrorCode::BAD_REQUEST);
    }
}

#[test]
fn channel_numbers_of_the_rfc5766_range_are_accepted_with_the_opt_out() {
    let mut p = Pair::new(TurnConfig {
        strict_channel_numbers: false,
        ..cfg()
    });
    p.allocate();
    p.bind_channel(0x7FFF, peer());
    assert_eq!(
        p.channel_data(0x7FFF, b"old"),
        Some((peer(), b"old".to_vec()))
    );
}

#[test]
fn channel_data_to_a_stream_client_is_padded_to_four_bytes() {
    let mut p = Pair::tcp(cfg());
    p.allocate();
    p.bind_channel(0x4000, peer());
    let out = p.peer_sends(peer(), b"abcde").unwrap();
    assert_eq!(out.len(), 12);
    assert_eq!(&out[..4], &[0x40, 0, 0, 5]);
    assert_eq!(&out[9..], &[0, 0, 0]);
}

#[test]
fn channel_data_to_a_dtls_client_is_not_padded() {
    // DTLS carries datagrams (RFC 7350): one ChannelData per record, padding only on streams.
    let mut p = Pair::with(
        cfg(),
        kyuu_client::turn::Client::new("alice", "secret", false),
        kyuu_turn::Transport::Dtls,
    );
    p.allocate();
    p.bind_channel(0x4000, peer());
    let out = p.peer_sends(peer(), b"abcde").unwrap();
    assert_eq!(out.len(), 9);
    assert_eq!(&out[..4], &[0x40, 0, 0, 5]);
}

#[test]
fn an_expired_channel_relays_nothing() {
    let mut c = cfg();
    c.default_lifetime = 3600;
    let mut p = Pair::new(c);
    p.allocate();
    p.bind_channel(0x4000, peer());
    p.advance(Duration::from_secs(601));
    assert_eq!(p.channel_data(0x4000, b"x"), None);
}

#[test]
fn an_expired_channel_number_stays_reserved_for_five_minutes() {
    let mut c = cfg();
    c.default_lifetime = 3600;
    let mut p = Pair::new(c);
    p.allocate();
    p.bind_channel(0x4000, peer());
    p.advance(Duration::from_secs(601));
    p.client.channel_bind(p.now, 0x4000, other_peer());
    p.expect_error(ErrorCode::BAD_REQUEST);
    p.advance(Duration::from_secs(300));
    p.client.channel_bind(p.now, 0x4000, other_peer());
    assert!(matches!(p.run().as_slice(), [Event::ChannelBound { .. }]));
}

#[test]
fn a_channel_bind_installs_a_permission_for_its_peer() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4000, peer());
    assert_eq!(
        p.send_indication(peer(), b"via send"),
        Some((peer(), b"via send".to_vec()))
    );
}
