//! STUN Binding (RFC 8489 §6.3) and NAT behaviour discovery (RFC 5780 §6) against the sans-IO
//! core: which socket an answer leaves from, where it goes, and what it says.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use common::*;
use kyuu_stun::{attr, method, Message, MessageBuilder};
use kyuu_turn::{ClientSocket, Rfc5780, Server, Transmit, Transport};

const PRIMARY: &str = "198.51.100.1:3478";
const ALTERNATE_IP: &str = "198.51.100.2:3478";
const ALTERNATE_PORT: &str = "198.51.100.1:3479";
const OTHER: &str = "198.51.100.2:3479";
const CLIENT: &str = "203.0.113.5:40000";

fn rfc5780() -> Rfc5780 {
    Rfc5780 {
        primary_ip: "198.51.100.1".parse().unwrap(),
        alternate_ip: "198.51.100.2".parse().unwrap(),
        primary_port: 3478,
        alternate_port: 3479,
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn with_5780() -> Server {
    server_with(cfg(), Instant::now(), Some(rfc5780()))
}

fn without_5780() -> Server {
    server_with(cfg(), Instant::now(), None)
}

/// A Binding request from `CLIENT` to `local` over `transport`; returns the one answer.
fn binding_at(
    s: &mut Server,
    transport: Transport,
    local: &str,
    f: impl FnOnce(&mut MessageBuilder<'_>),
) -> Transmit {
    let sock = ClientSocket {
        transport,
        local: addr(local),
        remote: addr(CLIENT),
    };
    let req = raw_request(method::BINDING, f);
    assert!(s.handle_client(Instant::now(), sock, &req).is_none());
    let t = next_transmit(s).unwrap();
    assert!(s.poll_output().is_none());
    t
}

fn binding(s: &mut Server, f: impl FnOnce(&mut MessageBuilder<'_>)) -> Transmit {
    binding_at(s, Transport::Udp, PRIMARY, f)
}

fn change(flags: u32) -> impl FnOnce(&mut MessageBuilder<'_>) {
    move |b| b.add_u32(attr::CHANGE_REQUEST, flags).unwrap()
}

fn address(t: &Transmit, which: u16) -> Option<SocketAddr> {
    Message::parse(&t.data)
        .unwrap()
        .address(which)
        .map(Result::unwrap)
}

#[test]
fn binding_answers_with_the_clients_address_from_where_the_request_arrived() {
    let mut s = without_5780();
    let t = binding(&mut s, |_| {});
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        addr(CLIENT)
    );
    assert_eq!(
        (t.client.local, t.client.remote),
        (addr(PRIMARY), addr(CLIENT))
    );
    assert!(m.verify_fingerprint().is_ok());
}

#[test]
fn without_rfc5780_the_answer_has_no_response_origin_or_other_address() {
    let mut s = without_5780();
    let t = binding(&mut s, |_| {});
    assert_eq!(address(&t, attr::RESPONSE_ORIGIN), None);
    assert_eq!(address(&t, attr::OTHER_ADDRESS), None);
}

#[test]
fn without_rfc5780_change_request_gets_420_naming_it() {
    let mut s = without_5780();
    let t = binding(&mut s, change(attr::CHANGE_IP | attr::CHANGE_PORT));
    assert_eq!(error_code(&t.data), Some(420));
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x00, 0x03]);
    assert_eq!(t.client.local, addr(PRIMARY));
}

#[test]
fn without_rfc5780_a_change_request_without_flags_is_a_plain_binding() {
    // Several clients always send CHANGE-REQUEST; with no flag set it asks for nothing.
    let mut s = without_5780();
    let t = binding(&mut s, change(0));
    assert_eq!(error_code(&t.data), None);
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        addr(CLIENT)
    );
    assert_eq!(t.client.local, addr(PRIMARY));
    assert_eq!(address(&t, attr::OTHER_ADDRESS), None);
}

#[test]
fn without_rfc5780_change_port_alone_gets_420_naming_it() {
    let mut s = without_5780();
    let t = binding(&mut s, change(attr::CHANGE_PORT));
    assert_eq!(error_code(&t.data), Some(420));
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x00, 0x03]);
}

/// An RFC 3489 Binding request from `CLIENT` to `local`, bytes written out by hand.
fn classic_at(
    s: &mut Server,
    transport: Transport,
    local: &str,
    change: Option<u32>,
) -> Option<Transmit> {
    let mut req = vec![
        0x00, 0x01, // Binding request
        0x00, 0x00, // length, set below
        0xde, 0xad, 0xbe, 0xef, // transaction id bytes 0..4, where RFC 8489 has its cookie
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, // transaction id bytes 4..16
    ];
    if let Some(flags) = change {
        req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04]); // CHANGE-REQUEST, length 4
        req.extend_from_slice(&flags.to_be_bytes());
    }
    req[3] = (req.len() - 20) as u8;
    let sock = ClientSocket {
        transport,
        local: addr(local),
        remote: addr(CLIENT),
    };
    assert!(s.handle_client(Instant::now(), sock, &req).is_none());
    next_transmit(s)
}

/// A classic answer: (message type, copied transaction id ok, attributes by type).
fn classic_answer(t: &Transmit) -> (u16, Vec<(u16, Vec<u8>)>) {
    let d = &t.data;
    assert_eq!(
        &d[4..8],
        &[0xde, 0xad, 0xbe, 0xef],
        "cookie field copied back"
    );
    assert_eq!(&d[8..20], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
    let mut attrs = Vec::new();
    let mut pos = 20;
    while pos + 4 <= d.len() {
        let t = u16::from_be_bytes([d[pos], d[pos + 1]]);
        let n = usize::from(u16::from_be_bytes([d[pos + 2], d[pos + 3]]));
        attrs.push((t, d[pos + 4..pos + 4 + n].to_vec()));
        pos += 4 + n.div_ceil(4) * 4;
    }
    (u16::from_be_bytes([d[0], d[1]]), attrs)
}

fn v4(value: &[u8]) -> SocketAddr {
    kyuu_stun::attr::decode_address(attr::MAPPED_ADDRESS, value).unwrap()
}

#[test]
fn rfc3489_binding_gets_mapped_address_and_its_transaction_id_back() {
    for transport in [Transport::Udp, Transport::Tcp] {
        let mut s = without_5780();
        let t = classic_at(&mut s, transport, PRIMARY, None).unwrap();
        let (ty, attrs) = classic_answer(&t);
        assert_eq!(ty, 0x0101);
        assert_eq!(attrs.len(), 1, "{attrs:?}");
        assert_eq!(attrs[0].0, attr::MAPPED_ADDRESS);
        assert_eq!(v4(&attrs[0].1), addr(CLIENT), "not XOR'd");
        assert_eq!(t.client.remote, addr(CLIENT));
    }
}

#[test]
fn rfc3489_binding_with_an_empty_change_request_is_answered_without_rfc5780() {
    let mut s = without_5780();
    let t = classic_at(&mut s, Transport::Udp, PRIMARY, Some(0)).unwrap();
    let (ty, attrs) = classic_answer(&t);
    assert_eq!(ty, 0x0101);
    assert_eq!(v4(&attrs[0].1), addr(CLIENT));
}

#[test]
fn rfc3489_change_request_with_flags_without_rfc5780_gets_420() {
    let mut s = without_5780();
    let t = classic_at(&mut s, Transport::Udp, PRIMARY, Some(attr::CHANGE_IP)).unwrap();
    let (ty, attrs) = classic_answer(&t);
    assert_eq!(ty, 0x0111);
    assert_eq!(attrs[0], (attr::ERROR_CODE, vec![0, 0, 4, 20]));
    assert_eq!(attrs[1], (attr::UNKNOWN_ATTRIBUTES, vec![0, 3, 0, 3]));
}

#[test]
fn rfc3489_change_request_is_honoured_with_rfc5780() {
    let mut s = with_5780();
    let t = classic_at(
        &mut s,
        Transport::Udp,
        PRIMARY,
        Some(attr::CHANGE_IP | attr::CHANGE_PORT),
    )
    .unwrap();
    assert_eq!(t.client.local, addr(OTHER));
    let (ty, attrs) = classic_answer(&t);
    assert_eq!(ty, 0x0101);
    let get = |w: u16| v4(&attrs.iter().find(|a| a.0 == w).unwrap().1);
    assert_eq!(get(attr::MAPPED_ADDRESS), addr(CLIENT));
    assert_eq!(get(kyuu_stun::classic::SOURCE_ADDRESS), addr(OTHER));
    assert_eq!(get(kyuu_stun::classic::CHANGED_ADDRESS), addr(OTHER));
    // Over TCP a change cannot be honoured: 400.
    let t = classic_at(&mut s, Transport::Tcp, PRIMARY, Some(attr::CHANGE_PORT)).unwrap();
    assert_eq!(classic_answer(&t).0, 0x0111);
}

#[test]
fn malformed_cookieless_traffic_is_still_dropped() {
    let mut s = without_5780();
    let sock = ClientSocket {
        transport: Transport::Udp,
        local: addr(PRIMARY),
        remote: addr(CLIENT),
    };
    let mut bad = vec![0u8; 24];
    bad[1] = 0x01; // Binding request
    bad[3] = 0x08; // length 8, only 4 present
    assert!(s.handle_client(Instant::now(), sock, &bad).is_none());
    bad[1] = 0x03; // Allocate without the cookie: not answered either
    bad[3] = 0x04;
    assert!(s.handle_client(Instant::now(), sock, &bad).is_none());
    assert!(next_transmit(&mut s).is_none());
}

#[test]
fn with_rfc5780_the_answer_carries_response_origin_and_other_address() {
    let mut s = with_5780();
    let t = binding(&mut s, |_| {});
    assert_eq!(address(&t, attr::RESPONSE_ORIGIN), Some(addr(PRIMARY)));
    assert_eq!(address(&t, attr::OTHER_ADDRESS), Some(addr(OTHER)));
}

#[test]
fn change_ip_is_answered_from_the_alternate_ip() {
    let mut s = with_5780();
    let t = binding(&mut s, change(attr::CHANGE_IP));
    assert_eq!(t.client.local, addr(ALTERNATE_IP));
    assert_eq!(t.client.remote, addr(CLIENT));
    assert_eq!(address(&t, attr::RESPONSE_ORIGIN), Some(addr(ALTERNATE_IP)));
}

#[test]
fn change_port_is_answered_from_the_alternate_port() {
    let mut s = with_5780();
    let t = binding(&mut s, change(attr::CHANGE_PORT));
    assert_eq!(t.client.local, addr(ALTERNATE_PORT));
    assert_eq!(
        address(&t, attr::RESPONSE_ORIGIN),
        Some(addr(ALTERNATE_PORT))
    );
}

#[test]
fn change_ip_and_port_is_answered_from_the_other_address() {
    let mut s = with_5780();
    let t = binding(&mut s, change(attr::CHANGE_IP | attr::CHANGE_PORT));
    assert_eq!(t.client.local, addr(OTHER));
    assert_eq!(address(&t, attr::RESPONSE_ORIGIN), Some(addr(OTHER)));
    // OTHER-ADDRESS is relative to where the request arrived, not where the answer leaves.
    assert_eq!(address(&t, attr::OTHER_ADDRESS), Some(addr(OTHER)));
}

#[test]
fn a_change_request_without_flags_is_answered_from_the_same_address() {
    let mut s = with_5780();
    let t = binding(&mut s, change(0));
    assert_eq!(t.client.local, addr(PRIMARY));
}

#[test]
fn a_request_to_the_other_address_with_change_ip_and_port_is_answered_from_the_primary() {
    let mut s = with_5780();
    let t = binding_at(
        &mut s,
        Transport::Udp,
        OTHER,
        change(attr::CHANGE_IP | attr::CHANGE_PORT),
    );
    assert_eq!(t.client.local, addr(PRIMARY));
    assert_eq!(address(&t, attr::OTHER_ADDRESS), Some(addr(PRIMARY)));
}

#[test]
fn response_port_sends_the_answer_to_that_port_of_the_client() {
    let mut s = with_5780();
    let t = binding(&mut s, |b| b.add_response_port(5555).unwrap());
    assert_eq!(t.client.remote, addr("203.0.113.5:5555"));
    // The mapped address is still where the request came from.
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        addr(CLIENT)
    );
}

#[test]
fn change_request_over_tcp_gets_400() {
    // DTLS too: an answer from another address or port has no association to travel in.
    for transport in [Transport::Tcp, Transport::Dtls] {
        let mut s = with_5780();
        let t = binding_at(&mut s, transport, PRIMARY, change(attr::CHANGE_IP));
        assert_eq!(error_code(&t.data), Some(400), "{transport}");
        assert_eq!(t.client.local, addr(PRIMARY));
    }
}

#[test]
fn response_port_over_tcp_gets_400() {
    for transport in [Transport::Tcp, Transport::Dtls] {
        let mut s = with_5780();
        let t = binding_at(&mut s, transport, PRIMARY, |b| {
            b.add_response_port(5555).unwrap()
        });
        assert_eq!(error_code(&t.data), Some(400), "{transport}");
        assert_eq!(t.client.remote, addr(CLIENT));
    }
}

#[test]
fn a_malformed_change_request_gets_400() {
    let mut s = with_5780();
    let t = binding(&mut s, |b| b.add(attr::CHANGE_REQUEST, &[0, 0, 4]).unwrap());
    assert_eq!(error_code(&t.data), Some(400));
}

#[test]
fn binding_with_an_unknown_comprehension_required_attribute_gets_420() {
    let mut s = with_5780();
    let t = binding(&mut s, |b| b.add(0x7ABC, &[0; 4]).unwrap());
    assert_eq!(error_code(&t.data), Some(420));
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x7A, 0xBC]);
}
