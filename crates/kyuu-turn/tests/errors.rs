//! Requests the server does not carry out: unknown methods and attributes, extension methods,
//! TURN switched off, broken messages.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use kyuu_stun::{attr, method, Message};
use kyuu_turn::Output;

#[test]
fn an_unknown_method_gets_400() {
    let mut p = Pair::new(cfg());
    let t = p.exchange(&raw_request(0x0FF, |_| {})).unwrap();
    assert_eq!(error_code(&t.data), Some(400));
}

#[test]
fn extension_methods_are_handed_to_the_shell() {
    let mut p = Pair::new(cfg());
    let req = raw_request(0xC01, |_| {});
    p.server.handle_client(p.now, p.sock, &req);
    assert!(matches!(
        p.server.poll_output(),
        Some(Output::Extension { data, .. }) if data == req
    ));
}

#[test]
fn a_turn_request_with_an_unknown_required_attribute_gets_a_signed_420() {
    let mut p = Pair::new(cfg());
    p.allocate();
    let req = p.authed_request(method::CREATE_PERMISSION, |b| {
        b.add_xor_address(attr::XOR_PEER_ADDRESS, peer()).unwrap();
        b.add(0x7ABC, &[0; 4]).unwrap();
    });
    let t = p.exchange(&req).unwrap();
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(error_code(&t.data), Some(420));
    assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x7A, 0xBC]);
    assert!(m.verify_integrity(&alice_key()).is_ok());
}

#[test]
fn turn_methods_get_400_when_turn_is_disabled() {
    let mut c = cfg();
    c.enabled = false;
    let mut p = Pair::new(c);
    let req = raw_request(method::ALLOCATE, |b| b.add_requested_transport(17).unwrap());
    let t = p.exchange(&req).unwrap();
    assert_eq!(error_code(&t.data), Some(400));
}

#[test]
fn a_message_with_a_wrong_fingerprint_is_dropped() {
    let mut p = Pair::new(cfg());
    let mut req = raw_request(method::BINDING, |b| b.add_fingerprint().unwrap());
    let last = req.len() - 1;
    req[last] ^= 1;
    assert!(p.exchange(&req).is_none());
}

#[test]
fn responses_and_unknown_indications_from_clients_are_ignored() {
    let mut p = Pair::new(cfg());
    let mut req = raw_request(method::BINDING, |_| {});
    // Turn the request into a success response (class bit C1 is 0x0100 of the type).
    req[0] |= 0x01;
    assert!(p.exchange(&req).is_none());
}
