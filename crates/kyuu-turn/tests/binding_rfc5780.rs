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
    let mut s = with_5780();
    let t = binding_at(&mut s, Transport::Tcp, PRIMARY, change(attr::CHANGE_IP));
    assert_eq!(error_code(&t.data), Some(400));
    assert_eq!(t.client.local, addr(PRIMARY));
}

#[test]
fn response_port_over_tcp_gets_400() {
    let mut s = with_5780();
    let t = binding_at(&mut s, Transport::Tcp, PRIMARY, |b| {
        b.add_response_port(5555).unwrap()
    });
    assert_eq!(error_code(&t.data), Some(400));
    assert_eq!(t.client.remote, addr(CLIENT));
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
