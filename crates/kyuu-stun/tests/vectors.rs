//! RFC 5769 test vectors (and RFC 8489 appendix B.1), parsed and produced byte for byte.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;

use kyuu_stun::attr;
use kyuu_stun::integrity::{userhash, Key};
use kyuu_stun::method::BINDING;
use kyuu_stun::{Class, Message, MessageBuilder, TransactionId};

const PASSWORD: &str = "VOkJxbRl1RmTxUk/WvJxBt";

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.split_whitespace().collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn sample_request() -> Vec<u8> {
    hex("00010058 2112a442 b7e7a701 bc34d686 fa87dfae
         80220010 5354554e 20746573 7420636c 69656e74
         00240004 6e0001ff
         80290008 932ff9b1 51263b36
         00060009 6576746a 3a683676 59202020
         00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
         80280004 e57a3bcf")
}

fn sample_ipv4_response() -> Vec<u8> {
    hex("0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
         8022000b 74657374 20766563 746f7220
         00200008 0001a147 e112a643
         00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
         80280004 c07d4c96")
}

fn sample_ipv6_response() -> Vec<u8> {
    hex("01010048 2112a442 b7e7a701 bc34d686 fa87dfae
         8022000b 74657374 20766563 746f7220
         00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
         00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
         80280004 c8fb0b4c")
}

fn sample_long_term() -> Vec<u8> {
    hex("00010060 2112a442 78ad3433 c6ad72c0 29da412e
         00060012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
         0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
         0014000b 6578616d 706c652e 6f726700
         00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666")
}

fn tid(bytes: &[u8]) -> TransactionId {
    TransactionId(bytes[8..20].try_into().unwrap())
}

#[test]
fn rfc5769_request_parses_and_verifies() {
    let buf = sample_request();
    let m = Message::parse(&buf).unwrap();
    assert_eq!(m.method(), BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(
        m.text(attr::SOFTWARE, 763).unwrap().unwrap(),
        "STUN test client"
    );
    assert_eq!(m.username().unwrap().unwrap(), "evtj:h6vY");
    assert_eq!(m.u32_attr(attr::PRIORITY).unwrap().unwrap(), 0x6e0001ff);
    assert_eq!(
        attr::decode_u64(attr::ICE_CONTROLLED, m.get(attr::ICE_CONTROLLED).unwrap()).unwrap(),
        0x932ff9b151263b36
    );
    m.verify_integrity(&Key::short_term(PASSWORD)).unwrap();
    assert!(m.verify_fingerprint().unwrap());
    assert!(m.verify_integrity(&Key::short_term("wrong")).is_err());
}

#[test]
fn rfc5769_request_is_produced_exactly() {
    let want = sample_request();
    let mut out = [0u8; 256];
    let mut b = MessageBuilder::new(&mut out, BINDING, Class::Request, tid(&want))
        .unwrap()
        .padding_byte(0x20);
    b.add(attr::SOFTWARE, b"STUN test client").unwrap();
    b.add_u32(attr::PRIORITY, 0x6e0001ff).unwrap();
    b.add_u64(attr::ICE_CONTROLLED, 0x932ff9b151263b36).unwrap();
    b.add(attr::USERNAME, b"evtj:h6vY").unwrap();
    b.add_integrity(&Key::short_term(PASSWORD)).unwrap();
    b.add_fingerprint().unwrap();
    let n = b.finish();
    assert_eq!(&out[..n], &want[..]);
}

#[test]
fn rfc5769_responses_parse_and_are_produced_exactly() {
    let cases: [(Vec<u8>, SocketAddr); 2] = [
        (sample_ipv4_response(), "192.0.2.1:32853".parse().unwrap()),
        (
            sample_ipv6_response(),
            "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                .parse()
                .unwrap(),
        ),
    ];
    for (want, mapped) in cases {
        let m = Message::parse(&want).unwrap();
        assert_eq!(m.class(), Class::Success);
        assert_eq!(
            m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
            mapped
        );
        m.verify_integrity(&Key::short_term(PASSWORD)).unwrap();
        assert!(m.verify_fingerprint().unwrap());

        let mut out = [0u8; 256];
        let mut b = MessageBuilder::new(&mut out, BINDING, Class::Success, tid(&want))
            .unwrap()
            .padding_byte(0x20);
        b.add(attr::SOFTWARE, b"test vector").unwrap();
        b.add_xor_address(attr::XOR_MAPPED_ADDRESS, mapped).unwrap();
        b.add_integrity(&Key::short_term(PASSWORD)).unwrap();
        b.add_fingerprint().unwrap();
        let n = b.finish();
        assert_eq!(&out[..n], &want[..]);
    }
}

#[test]
fn rfc5769_long_term_parses_verifies_and_is_produced() {
    let want = sample_long_term();
    let m = Message::parse(&want).unwrap();
    let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    assert_eq!(m.username().unwrap().unwrap(), user);
    assert_eq!(m.realm().unwrap().unwrap(), "example.org");
    assert_eq!(m.nonce().unwrap(), b"f//499k954d6OL34oL9FSTvy64sA");
    let key = Key::long_term_md5(user, "example.org", "TheMatrIX").unwrap();
    m.verify_integrity(&key).unwrap();
    // RFC 5769 §2.4 gives the password before SASLprep (RFC 4013) as "The<U+00AD>M<U+00AA>tr
    // <U+2168>". RFC 8489 §9.2.2 replaced SASLprep with OpaqueString (RFC 8265), which refuses
    // U+00AD (a default-ignorable code point FreeformClass disallows) and would not fold U+00AA
    // and U+2168 (no NFKC): that raw form is no longer a valid password, and the username, a
    // valid OpaqueString, is unchanged by it.
    assert!(Key::long_term_md5(user, "example.org", "The\u{00AD}M\u{00AA}tr\u{2168}").is_err());
    assert_eq!(kyuu_stun::opaque_string(user).unwrap(), user);
    assert!(!m.verify_fingerprint().unwrap());

    let mut out = [0u8; 256];
    let mut b = MessageBuilder::new(&mut out, BINDING, Class::Request, tid(&want)).unwrap();
    b.add(attr::USERNAME, user.as_bytes()).unwrap();
    b.add(attr::NONCE, b"f//499k954d6OL34oL9FSTvy64sA").unwrap();
    b.add(attr::REALM, b"example.org").unwrap();
    b.add_integrity(&key).unwrap();
    let n = b.finish();
    assert_eq!(&out[..n], &want[..]);
}

/// RFC 8489 appendix B.1 (with erratum 6268): USERHASH, security-feature nonce,
/// PASSWORD-ALGORITHM and MESSAGE-INTEGRITY-SHA256.
#[test]
fn rfc8489_b1_sha256_request() {
    let want = hex("00010090 2112a442 78ad3433 c6ad72c0 29da412e
         001e0020 4a3cf38f ef6992bd a952c678 0417da0f 24819415 569e60b2 05c46e41 407f1704
         00150029 6f624d61 744a6f73 32414141 43662f2f 3439396b 39353464 364f4c33 346f4c39 46535476 79363473 41000000
         0014000b 6578616d 706c652e 6f726700
         001d0004 00020000
         001c0020 b5c7bf00 5b6c52a2 1c51c5e8 92f81924 136296cb 927c4314 9309278c c6518e65");
    let m = Message::parse(&want).unwrap();
    let user = "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}";
    assert_eq!(
        m.get(attr::USERHASH).unwrap(),
        &userhash(user, "example.org")
    );
    let nonce = m.nonce().unwrap();
    assert_eq!(nonce, b"obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA");
    assert_eq!(attr::nonce_features(nonce), Some(2));
    assert_eq!(&attr::nonce_features_prefix(2)[..], &nonce[..13]);
    assert_eq!(
        attr::decode_password_algorithm(m.get(attr::PASSWORD_ALGORITHM).unwrap()).unwrap(),
        (attr::PASSWORD_ALGORITHM_SHA256, &[][..])
    );
    let key = Key::long_term_sha256(user, "example.org", "TheMatrIX").unwrap();
    m.verify_integrity(&key).unwrap();

    let mut out = [0u8; 256];
    let mut b = MessageBuilder::new(&mut out, BINDING, Class::Request, tid(&want)).unwrap();
    b.add(attr::USERHASH, &userhash(user, "example.org"))
        .unwrap();
    b.add(attr::NONCE, nonce).unwrap();
    b.add(attr::REALM, b"example.org").unwrap();
    b.add_password_algorithm(attr::PASSWORD_ALGORITHM_SHA256)
        .unwrap();
    b.add_integrity_sha256(&key).unwrap();
    let n = b.finish();
    assert_eq!(&out[..n], &want[..]);
}

#[test]
fn tampering_is_detected() {
    let mut buf = sample_request();
    buf[30] ^= 1; // inside SOFTWARE
    let m = Message::parse(&buf).unwrap();
    assert!(m.verify_integrity(&Key::short_term(PASSWORD)).is_err());
    assert!(m.verify_fingerprint().is_err());
}

#[test]
fn attributes_after_integrity_are_ignored() {
    let mut out = [0u8; 256];
    let t = TransactionId([7; 12]);
    let mut b = MessageBuilder::new(&mut out, BINDING, Class::Request, t).unwrap();
    b.add(attr::USERNAME, b"alice").unwrap();
    b.add_integrity(&Key::short_term("pw")).unwrap();
    b.add(attr::REALM, b"after").unwrap();
    let n = b.finish();
    let m = Message::parse(&out[..n]).unwrap();
    assert!(m.get(attr::REALM).is_none());
    assert!(m.attrs().any(|a| a.attr_type == attr::REALM));
}

#[test]
fn malformed_inputs_are_errors_not_panics() {
    let good = sample_request();
    for cut in 0..good.len() {
        let _ = Message::parse(&good[..cut]);
    }
    let mut bad = good.clone();
    bad[3] = 0x59; // length not multiple of 4
    assert!(Message::parse(&bad).is_err());
    let mut bad = good.clone();
    bad[4] = 0; // cookie
    assert!(Message::parse(&bad).is_err());
    let mut bad = good.clone();
    bad[23] = 0xff; // SOFTWARE length overruns
    assert!(Message::parse(&bad).is_err());
    // A 19-byte crafted message (str0m's panic) is rejected.
    assert!(Message::parse(&[0u8; 19]).is_err());
    // Attribute after FINGERPRINT.
    let mut extra = good;
    extra.extend_from_slice(&[0x80, 0x22, 0, 0]);
    let l = (extra.len() - 20) as u16;
    extra[2..4].copy_from_slice(&l.to_be_bytes());
    assert!(Message::parse(&extra).is_err());
}

/// RFC 8656 §18.13: ICMP is Reserved (16 bits, 0), Type, Code, then 32 bits of Error Data.
#[test]
fn icmp_attribute_bytes() {
    use kyuu_stun::attr::{decode_icmp, encode_icmp, Icmp};
    let i = Icmp {
        icmp_type: 3,
        code: 4,
        error_data: 1500,
    };
    assert_eq!(encode_icmp(i), [0, 0, 3, 4, 0, 0, 0x05, 0xDC]);
    assert_eq!(
        decode_icmp(&[0xFF, 0xFF, 3, 4, 0, 0, 0x05, 0xDC]).unwrap(),
        i
    );
    assert!(decode_icmp(&[0, 0, 3, 4, 0, 0, 0x05]).is_err());
    assert!(decode_icmp(&[0; 9]).is_err());
    assert_eq!(attr::name(attr::ICMP), "ICMP");
    assert!(!attr::is_comprehension_required(attr::ICMP));
}
