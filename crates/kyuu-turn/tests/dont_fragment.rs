//! DONT-FRAGMENT (RFC 8656 §7.2, §11.2, §14, §18.9): an allocation made with it relays with DF,
//! a Send indication with it relays that datagram with DF, everything else without; a core told
//! its shell cannot do this answers an Allocate with DONT-FRAGMENT with 420.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use kyuu_client::turn::{AllocateOptions, Event};
use kyuu_stun::{attr, Message};
use kyuu_turn::{Output, ToPeer};

fn allocate_df(p: &mut Pair) {
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            dont_fragment: true,
            ..Default::default()
        },
    );
    let ev = p.run();
    assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");
}

/// What the client's last ChannelData on 0x4000 became.
fn channel_data(p: &mut Pair) -> ToPeer {
    let mut buf = [0u8; 16];
    let n = p.client.channel_data(0x4000, b"abcd", &mut buf).unwrap();
    p.server.handle_client(p.now, p.sock, &buf[..n]).unwrap()
}

fn send_indication(p: &mut Pair, df: bool) -> ToPeer {
    p.client.send_indication_with(peer(), b"abcd", df);
    let b = p.client.poll_transmit().unwrap();
    assert_eq!(Message::parse(&b).unwrap().has(attr::DONT_FRAGMENT), df);
    p.server.handle_client(p.now, p.sock, &b).unwrap()
}

#[test]
fn the_relay_socket_of_an_allocation_with_dont_fragment_is_bound_with_df() {
    let mut p = Pair::new(cfg());
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            dont_fragment: true,
            ..Default::default()
        },
    );
    let b = p.client.poll_transmit().unwrap();
    p.server.handle_client(p.now, p.sock, &b);
    // The first attempt is challenged (401); answer it.
    while let Some(o) = p.server.poll_output() {
        if let Output::Transmit(t) = o {
            p.client.handle_input(p.now, &t.data);
        }
    }
    let b = p.client.poll_transmit().unwrap();
    p.server.handle_client(p.now, p.sock, &b);
    let binds: Vec<bool> = std::iter::from_fn(|| p.server.poll_output())
        .filter_map(|o| match o {
            Output::BindRelay { dont_fragment, .. } => Some(dont_fragment),
            _ => None,
        })
        .collect();
    assert_eq!(binds, vec![true]);
}

#[test]
fn channel_data_follows_the_allocation_and_send_indications_their_own_attribute() {
    // Allocation without DONT-FRAGMENT: ChannelData without DF, a Send indication with it DF.
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4000, peer());
    assert!(!channel_data(&mut p).dont_fragment);
    assert!(!send_indication(&mut p, false).dont_fragment);
    assert!(send_indication(&mut p, true).dont_fragment);

    // Allocation with DONT-FRAGMENT: ChannelData with DF; a Send indication as it says (§11.2).
    let mut p = Pair::new(cfg());
    allocate_df(&mut p);
    p.bind_channel(0x4000, peer());
    assert!(channel_data(&mut p).dont_fragment);
    assert!(send_indication(&mut p, true).dont_fragment);
    assert!(!send_indication(&mut p, false).dont_fragment);
}

#[test]
fn without_shell_support_dont_fragment_in_allocate_gets_420_naming_it() {
    let mut p = Pair::new(cfg());
    p.server.set_dont_fragment_supported(false);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            dont_fragment: true,
            ..Default::default()
        },
    );
    // First attempt: 401 challenge, handled by the client; the second gets the answer.
    let mut last = Vec::new();
    for _ in 0..2 {
        let b = p.client.poll_transmit().unwrap();
        p.server.handle_client(p.now, p.sock, &b);
        while let Some(o) = p.server.poll_output() {
            if let Output::Transmit(t) = o {
                p.client.handle_input(p.now, &t.data);
                last = t.data.to_vec();
            }
        }
    }
    let m = Message::parse(&last).unwrap();
    assert_eq!(m.error_code().unwrap().unwrap().code, 420);
    // UNKNOWN-ATTRIBUTES lists DONT-FRAGMENT (0x001A).
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x00, 0x1A]);
    assert!(matches!(
        p.client.poll_event(),
        Some(Event::Error { code: 420, .. })
    ));
    // Without the attribute the same server allocates.
    p.allocate();
}
