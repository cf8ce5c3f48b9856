//! STUN Binding requests and the check of their answers, shared by the two tests of the kernel's
//! Binding answers: the XDP program on crafted packets (kyuu-ebpf/tests/test_run.rs) and
//! `kyuu serve` in the network lab (kyuu/tests/fast_path_lab.rs, which includes this file with
//! `#[path]`).

use std::net::SocketAddr;

use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};

/// A Binding request with the attributes `attrs` (type, value) in order, then a FINGERPRINT
/// when `fingerprint`.
pub fn request(tid: [u8; 12], attrs: &[(u16, &[u8])], fingerprint: bool) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let mut b = MessageBuilder::new(
        &mut buf,
        method::BINDING,
        Class::Request,
        TransactionId(tid),
    )
    .expect("builder");
    for (t, v) in attrs {
        b.add(*t, v).expect("attribute");
    }
    if fingerprint {
        b.add_fingerprint().expect("fingerprint");
    }
    let n = b.finish();
    buf[..n].to_vec()
}

/// Asserts that `answer` is a Binding success response to `tid` with `mapped` in
/// XOR-MAPPED-ADDRESS and a valid FINGERPRINT; `what` names the case in the failure messages.
pub fn check_success(answer: &[u8], tid: [u8; 12], mapped: SocketAddr, what: &str) {
    let msg = Message::parse(answer).unwrap_or_else(|e| panic!("{what}: not STUN: {e}"));
    assert_eq!(msg.class(), Class::Success, "{what}: class");
    assert_eq!(msg.method(), method::BINDING, "{what}: method");
    assert_eq!(msg.transaction_id().0, tid, "{what}: transaction id");
    let got = msg
        .xor_address(attr::XOR_MAPPED_ADDRESS)
        .unwrap_or_else(|| panic!("{what}: no XOR-MAPPED-ADDRESS"))
        .unwrap_or_else(|e| panic!("{what}: XOR-MAPPED-ADDRESS: {e}"));
    assert_eq!(got, mapped, "{what}: XOR-MAPPED-ADDRESS");
    assert_eq!(
        msg.verify_fingerprint().ok(),
        Some(true),
        "{what}: FINGERPRINT"
    );
}
