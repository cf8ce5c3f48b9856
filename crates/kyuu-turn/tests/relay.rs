//! The relay path's own rules: bandwidth budgets, stale allocation ids, in-place writing.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use kyuu_client::turn::{Client, Event};
use kyuu_turn::{AllocId, Family, PeerAddr, RelayKey, PEER_HEADROOM, PEER_TAILROOM};

fn capped(max_bps: u64) -> Pair {
    let mut c = cfg();
    c.max_bps = max_bps;
    let mut p = Pair::new(c);
    p.allocate();
    p.bind_channel(0x4000, peer());
    p
}

#[test]
fn packets_over_max_bps_are_dropped() {
    let mut p = capped(1000);
    // 1000 bytes of budget: two 400-byte payloads pass, the rest is dropped.
    let passed = (0..5)
        .filter(|_| p.channel_data(0x4000, &[7u8; 400]).is_some())
        .count();
    assert_eq!(passed, 2);
}

#[test]
fn the_bandwidth_budget_refills_with_time() {
    let mut p = capped(1000);
    for _ in 0..3 {
        p.channel_data(0x4000, &[7u8; 400]);
    }
    assert!(p.channel_data(0x4000, &[7u8; 400]).is_none());
    p.advance(Duration::from_secs(1));
    assert!(p.channel_data(0x4000, &[7u8; 400]).is_some());
}

#[test]
fn each_direction_has_its_own_bandwidth_budget() {
    let mut p = capped(1000);
    for _ in 0..3 {
        p.channel_data(0x4000, &[7u8; 400]);
    }
    assert!(p.peer_sends(peer(), &[1u8; 400]).is_some());
}

#[test]
fn peer_data_for_a_deleted_allocation_is_dropped_even_when_its_slot_is_reused() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    let old = p.relay(Family::V4);
    p.client.refresh(p.now, 0);
    p.run();
    // A new allocation takes the same slot with a new generation.
    p.client = Client::new("alice", "secret", false);
    p.allocate();
    p.permit(peer());
    assert!(p.peer_sends_on(old, peer(), b"stale").is_none());
    let new = RelayKey {
        alloc: AllocId {
            generation: old.alloc.generation + 1,
            ..old.alloc
        },
        ..old
    };
    assert!(p.peer_sends_on(new, peer(), b"fresh").is_some());
}

#[test]
fn a_data_indication_is_written_in_place_within_the_headroom() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    let payload = [5u8; 33];
    let mut buf = vec![0u8; PEER_HEADROOM + payload.len() + PEER_TAILROOM];
    buf[PEER_HEADROOM..PEER_HEADROOM + payload.len()].copy_from_slice(&payload);
    let relay = p.relay(Family::V4);
    let tc = p
        .server
        .handle_peer(
            p.now,
            relay,
            PeerAddr::new(peer()),
            &mut buf,
            PEER_HEADROOM..PEER_HEADROOM + payload.len(),
        )
        .unwrap();
    // Header (20) + XOR-PEER-ADDRESS for IPv4 (12) + DATA's header (4) just in front of the
    // payload; DATA padded to four bytes in the tailroom.
    assert_eq!(tc.data.start, PEER_HEADROOM - 36);
    assert_eq!(tc.data.end, PEER_HEADROOM + payload.len() + 3);
    p.client.handle_input(p.now, &buf[tc.data]);
    assert_eq!(
        p.client.poll_event(),
        Some(Event::Data {
            peer: peer(),
            data: payload.to_vec()
        })
    );
}

#[test]
fn channel_data_relayed_to_a_peer_is_a_range_of_the_clients_packet() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4000, peer());
    let mut buf = [0u8; 16];
    let n = p.client.channel_data(0x4000, b"abcd", &mut buf).unwrap();
    let tp = p.server.handle_client(p.now, p.sock, &buf[..n]).unwrap();
    assert_eq!(tp.data, 4..8);
    assert_eq!(tp.peer, PeerAddr::new(peer()));
    assert!(!tp.dont_fragment);
}
