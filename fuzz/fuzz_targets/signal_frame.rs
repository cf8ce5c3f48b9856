//! The signaling wire formats as they arrive from the network: WebSocket text frames
//! (`kyuu_signal::frame::parse`: legacy relay frames and opt-in control messages), the relay
//! rewrite that puts the sender's id in, and access tokens (`kyuu_signal::token::verify`), both
//! forged and correctly signed around arbitrary claims JSON. Nothing may panic; a rewritten relay
//! frame must parse again with the sender's id as its one `"id"`.
#![no_main]

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use kyuu_signal::frame::{self, Inbound};
use kyuu_signal::token;
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret";

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match sel % 3 {
        0 | 1 => {
            if let Ok(Inbound::Relay(r)) = frame::parse(&text) {
                let from = if sel & 4 == 0 { "sender" } else { "a\"b\\c\u{1}" };
                let out = r.rewrite(from);
                let v: serde_json::Value =
                    serde_json::from_str(&out).expect("a rewritten frame is JSON");
                assert_eq!(v.get("id").and_then(|i| i.as_str()), Some(from));
                assert!(matches!(frame::parse(&out), Ok(Inbound::Relay(_))));
            }
        }
        _ => {
            let _ = token::verify(SECRET, &text, 1_700_000_000);
            // The same bytes as a correctly signed claims body, to reach the claims parser.
            let body = URL_SAFE_NO_PAD.encode(rest);
            let Ok(mut m) = Hmac::<sha2::Sha256>::new_from_slice(SECRET) else {
                return;
            };
            m.update(body.as_bytes());
            let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
            if let Ok(c) = token::verify(SECRET, &format!("{body}.{sig}"), 1_700_000_000) {
                let _ = c.allows_id("x");
                let _ = c.allows_room("r");
                let again = token::issue(SECRET, &c);
                assert!(token::verify(SECRET, &again, 1_700_000_000).is_ok());
            }
        }
    }
});
