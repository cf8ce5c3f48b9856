//! Arbitrary bytes through every parsing entry point of the STUN codec: nothing may panic.
#![no_main]

use kyuu_stun::integrity::Key;
use kyuu_stun::{attr, frame_len, ChannelData, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = frame_len(data);
    let _ = ChannelData::parse(data);
    let Ok(m) = Message::parse(data) else { return };
    for a in m.attrs() {
        let _ = attr::decode_address(a.attr_type, a.value);
        let _ = attr::decode_xor_address(a.attr_type, a.value, m.transaction_id());
        let _ = attr::decode_error_code(a.value);
        let _ = attr::decode_password_algorithms(a.value);
        let _ = attr::decode_even_port(a.value);
        let _ = attr::decode_u32(a.attr_type, a.value);
        let _ = attr::decode_u64(a.attr_type, a.value);
        let _ = attr::decode_channel_number(a.value);
        let _ = attr::decode_icmp(a.value);
        // OpaqueString preparation (RFC 8265) of any UTF-8 value, as the server applies to
        // USERNAME and clients to realms.
        if let Ok(s) = std::str::from_utf8(a.value) {
            let _ = kyuu_stun::opaque_string(s);
        }
        let _ = attr::nonce_features(a.value);
        if let Ok(it) = attr::decode_unknown_attributes(a.value) {
            let _ = it.count();
        }
    }
    let _ = m.username();
    let _ = m.realm();
    let _ = m.nonce();
    let _ = m.error_code();
    let _ = m.xor_peer_addresses().count();
    let _ = m.unknown_required(&[attr::USERNAME, attr::REALM]).count();
    let _ = m.verify_integrity(&Key::short_term("pw"));
    let _ = m.verify_fingerprint();
});
