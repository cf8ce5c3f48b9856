//! ICMP errors for relayed datagrams (RFC 8656 §11.5) become Data indications with
//! XOR-PEER-ADDRESS and ICMP (§18.13), only for peers with a permission and only for the ICMP
//! types §11.5 names.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::*;
use kyuu_client::turn::{AllocateOptions, Event};
use kyuu_stun::attr::{self, Icmp};
use kyuu_turn::{Family, PeerIcmp, ICMP_INDICATION_MAX};

fn icmp(peer: SocketAddr, icmp_type: u8, code: u8, info: u32) -> PeerIcmp {
    PeerIcmp {
        peer,
        icmp_type,
        code,
        info,
    }
}

/// The indication the server writes, or `None`.
fn indication(p: &mut Pair, family: Family, e: PeerIcmp) -> Option<Vec<u8>> {
    let mut buf = [0u8; ICMP_INDICATION_MAX];
    let relay = p.relay(family);
    let tc = p.server.handle_icmp(p.now, relay, e, &mut buf)?;
    assert_eq!(tc.client, p.sock);
    Some(buf[tc.data].to_vec())
}

#[test]
fn port_unreachable_from_a_permitted_peer_reaches_the_client_byte_for_byte() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    // The peer 8.8.8.8:5000 answered a relayed datagram with ICMP type 3 code 3.
    let out = indication(&mut p, Family::V4, icmp(peer(), 3, 3, 0)).unwrap();
    #[rustfmt::skip]
    let want_head = [
        0x00, 0x17, 0x00, 0x18,             // Data indication, 24 bytes of attributes
        0x21, 0x12, 0xA4, 0x42,             // magic cookie
    ];
    #[rustfmt::skip]
    let want_attrs = [
        0x00, 0x12, 0x00, 0x08,             // XOR-PEER-ADDRESS, 8 bytes
        0x00, 0x01, 0x32, 0x9A,             // IPv4, port 5000 (0x1388) ^ 0x2112
        0x29, 0x1A, 0xAC, 0x4A,             // 8.8.8.8 ^ 0x2112A442
        0x80, 0x04, 0x00, 0x08,             // ICMP (RFC 8656 §18.13), 8 bytes
        0x00, 0x00, 0x03, 0x03,             // reserved, type 3, code 3
        0x00, 0x00, 0x00, 0x00,             // error data: 0 for port unreachable
    ];
    assert_eq!(&out[..8], &want_head);
    assert_eq!(&out[20..], &want_attrs);
    // The client surfaces it.
    p.client.handle_input(p.now, &out);
    assert_eq!(
        p.client.poll_event(),
        Some(Event::Icmp {
            peer: peer(),
            icmp: Icmp {
                icmp_type: 3,
                code: 3,
                error_data: 0
            }
        })
    );
}

#[test]
fn fragmentation_needed_carries_the_next_hop_mtu() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    let out = indication(&mut p, Family::V4, icmp(peer(), 3, 4, 1280)).unwrap();
    // ICMP value: reserved, type 3, code 4, MTU 1280 = 0x0500.
    assert_eq!(&out[out.len() - 8..], &[0, 0, 3, 4, 0, 0, 0x05, 0x00]);
    // Other codes carry no error data even when the kernel reports something.
    let out = indication(&mut p, Family::V4, icmp(peer(), 11, 0, 99)).unwrap();
    assert_eq!(&out[out.len() - 8..], &[0, 0, 11, 0, 0, 0, 0, 0]);
}

#[test]
fn only_the_permission_for_the_peer_address_matters_not_the_port() {
    let mut p = Pair::new(cfg());
    p.allocate();
    // No permission for 8.8.8.8 yet: dropped.
    assert!(indication(&mut p, Family::V4, icmp(peer(), 3, 3, 0)).is_none());
    p.permit(peer());
    // Another port of the permitted address: passed on, with that port.
    let other_port: SocketAddr = "8.8.8.8:9".parse().unwrap();
    let out = indication(&mut p, Family::V4, icmp(other_port, 3, 3, 0)).unwrap();
    p.client.handle_input(p.now, &out);
    assert!(matches!(p.client.poll_event(), Some(Event::Icmp { peer, .. }) if peer == other_port));
    // Another address: dropped.
    let stranger: SocketAddr = "9.9.9.9:5000".parse().unwrap();
    assert!(indication(&mut p, Family::V4, icmp(stranger, 3, 3, 0)).is_none());
}

#[test]
fn icmp_types_section_11_5_does_not_name_are_dropped() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.permit(peer());
    // ICMPv4: echo reply 0, redirect 5, echo 8, parameter problem 12 are not errors §11.5 keeps.
    for t in [0u8, 5, 8, 12] {
        assert!(
            indication(&mut p, Family::V4, icmp(peer(), t, 0, 0)).is_none(),
            "{t}"
        );
    }
}

#[test]
fn icmpv6_types_1_2_3_pass_and_packet_too_big_carries_the_mtu() {
    let mut c = cfg();
    c.relay_ipv6 = Some("2001:db8::1".parse().unwrap());
    let mut p = Pair::new(c);
    p.client.allocate_with(
        p.now,
        &AllocateOptions {
            additional_ipv6: true,
            ..Default::default()
        },
    );
    p.run();
    let peer6: SocketAddr = "[2001:4860::8888]:5000".parse().unwrap();
    p.permit(peer6);
    // Destination unreachable, port unreachable (type 1 code 4).
    let out = indication(&mut p, Family::V6, icmp(peer6, 1, 4, 0)).unwrap();
    // XOR-PEER-ADDRESS of an IPv6 peer is 20 bytes: 20 header + 24 + 12 ICMP.
    assert_eq!(out.len(), 20 + 24 + 12);
    assert_eq!(
        &out[out.len() - 12..],
        &[0x80, 0x04, 0, 8, 0, 0, 1, 4, 0, 0, 0, 0]
    );
    let out = indication(&mut p, Family::V6, icmp(peer6, 2, 0, 1400)).unwrap();
    assert_eq!(
        attr::decode_icmp(&out[out.len() - 8..]).unwrap(),
        Icmp {
            icmp_type: 2,
            code: 0,
            error_data: 1400
        }
    );
    assert!(indication(&mut p, Family::V6, icmp(peer6, 3, 0, 0)).is_some());
    // Echo request/reply (128/129) and ICMPv4-only numbers are dropped on IPv6.
    for t in [128u8, 129, 11, 4] {
        assert!(
            indication(&mut p, Family::V6, icmp(peer6, t, 0, 0)).is_none(),
            "{t}"
        );
    }
}

#[test]
fn icmp_for_an_unknown_allocation_is_dropped() {
    let mut p = Pair::new(cfg());
    // No allocation at all.
    assert!(indication(&mut p, Family::V4, icmp(peer(), 3, 3, 0)).is_none());
}
