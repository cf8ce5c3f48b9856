//! Property tests: whatever is written parses back to the same values, and arbitrary bytes never
//! panic the parser or the typed accessors.
#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, SocketAddr};

use kyuu_stun::integrity::Key;
use kyuu_stun::{attr, frame_len, ChannelData, Class, Message, MessageBuilder, TransactionId};
use proptest::prelude::*;

fn any_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::new(IpAddr::from(ip), p)),
    ]
}

proptest! {
    #[test]
    fn round_trip(method in 0u16..0x1000, class in 0u8..4, tid in any::<[u8; 12]>(),
                  user in "[a-z0-9:]{0,40}", addr in any_addr(), peer in any_addr(),
                  lifetime in any::<u32>(), code in 300u16..700, data in proptest::collection::vec(any::<u8>(), 0..300),
                  pw in "[ -~]{0,20}", sha256 in any::<bool>(), fp in any::<bool>()) {
        let class = [Class::Request, Class::Indication, Class::Success, Class::Error][usize::from(class)];
        let mut out = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut out, method, class, TransactionId(tid)).unwrap();
        b.add(attr::USERNAME, user.as_bytes()).unwrap();
        b.add_xor_address(attr::XOR_MAPPED_ADDRESS, addr).unwrap();
        b.add_xor_address(attr::XOR_PEER_ADDRESS, peer).unwrap();
        b.add_address(attr::OTHER_ADDRESS, peer).unwrap();
        b.add_u32(attr::LIFETIME, lifetime).unwrap();
        b.add_error(code, "").unwrap();
        b.add(attr::DATA, &data).unwrap();
        let key = Key::short_term(&pw);
        if sha256 { b.add_integrity_sha256(&key).unwrap() } else { b.add_integrity(&key).unwrap() }
        if fp { b.add_fingerprint().unwrap() }
        let n = b.finish();
        let m = Message::parse(&out[..n]).unwrap();
        prop_assert_eq!(m.method(), method);
        prop_assert_eq!(m.class(), class);
        prop_assert_eq!(m.transaction_id().0, tid);
        prop_assert_eq!(m.username().unwrap().unwrap(), user.as_str());
        prop_assert_eq!(m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(), addr);
        prop_assert_eq!(m.xor_peer_addresses().next().unwrap().unwrap(), peer);
        prop_assert_eq!(m.address(attr::OTHER_ADDRESS).unwrap().unwrap(), peer);
        prop_assert_eq!(m.u32_attr(attr::LIFETIME).unwrap().unwrap(), lifetime);
        prop_assert_eq!(m.error_code().unwrap().unwrap().code, code);
        prop_assert_eq!(m.get(attr::DATA).unwrap(), &data[..]);
        prop_assert!(m.verify_integrity(&key).is_ok());
        prop_assert_eq!(m.verify_fingerprint().unwrap(), fp);
        prop_assert_eq!(frame_len(&out[..n]).unwrap(), Some(n));
    }

    #[test]
    fn channel_data_round_trip(ch in 0x4000u16..=0x4FFF, data in proptest::collection::vec(any::<u8>(), 0..1500), pad in any::<bool>()) {
        let mut out = vec![0u8; 1600];
        let n = ChannelData::encode(ch, &data, pad, &mut out).unwrap();
        let cd = ChannelData::parse(&out[..n]).unwrap();
        prop_assert_eq!(cd.channel.get(), ch);
        prop_assert_eq!(cd.data, &data[..]);
        if pad { prop_assert_eq!(frame_len(&out[..n]).unwrap(), Some(n)); }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = ChannelData::parse(&bytes);
        let _ = frame_len(&bytes);
        if let Ok(m) = Message::parse(&bytes) {
            for a in m.attrs() {
                let _ = attr::decode_address(a.attr_type, a.value);
                let _ = attr::decode_xor_address(a.attr_type, a.value, m.transaction_id());
                let _ = attr::decode_error_code(a.value);
                let _ = attr::decode_password_algorithms(a.value);
                let _ = attr::decode_even_port(a.value);
                let _ = attr::nonce_features(a.value);
            }
            let _ = m.verify_integrity(&Key::short_term("x"));
            let _ = m.verify_fingerprint();
        }
    }

    /// Valid framing with random attribute contents: typed accessors must not panic.
    #[test]
    fn random_attribute_values_never_panic(tid in any::<[u8; 12]>(), attrs in proptest::collection::vec((any::<u16>(), proptest::collection::vec(any::<u8>(), 0..40)), 0..12)) {
        let mut out = vec![0u8; 2048];
        let mut b = MessageBuilder::new(&mut out, 1, Class::Request, TransactionId(tid)).unwrap();
        for (t, v) in &attrs { b.add(*t, v).unwrap(); }
        let n = b.finish();
        // Random types may include integrity/fingerprint with wrong lengths: parse may refuse.
        if let Ok(m) = Message::parse(&out[..n]) {
            let _ = m.username(); let _ = m.realm(); let _ = m.nonce(); let _ = m.error_code();
            let _ = m.xor_address(attr::XOR_MAPPED_ADDRESS); let _ = m.xor_peer_addresses().count();
            let _ = m.verify_integrity(&Key::short_term("x")); let _ = m.verify_fingerprint();
            let _ = m.unknown_required(&[attr::USERNAME]).count();
        }
    }
}

proptest! {
    /// OpaqueString (RFC 8265) never panics, is idempotent on what it accepts, leaves printable
    /// ASCII alone, and ICMP attribute values round-trip.
    #[test]
    fn opaque_string_is_total_and_idempotent(s in any::<String>(), ascii in "[ -~]{1,40}",
                                             t in any::<u8>(), c in any::<u8>(), d in any::<u32>()) {
        if let Ok(p) = kyuu_stun::opaque_string(&s) {
            let again = kyuu_stun::opaque_string(&p).unwrap();
            prop_assert_eq!(again.as_ref(), p.as_ref());
        }
        let fast = kyuu_stun::opaque_string(&ascii).unwrap();
        prop_assert_eq!(fast.as_ref(), ascii.as_str());
        // The printable-ASCII shortcut agrees with the full profile.
        use precis_profiles::precis_core::profile::PrecisFastInvocation as _;
        let full = precis_profiles::OpaqueString::enforce(ascii.as_str()).unwrap();
        prop_assert_eq!(full.as_ref(), ascii.as_str());
        let i = attr::Icmp { icmp_type: t, code: c, error_data: d };
        prop_assert_eq!(attr::decode_icmp(&attr::encode_icmp(i)).unwrap(), i);
    }
}
