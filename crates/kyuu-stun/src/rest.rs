//! TURN REST credentials, the coturn `use-auth-secret` scheme
//! (draft-uberti-behave-turn-rest-00 §2.2): username `"<unix expiry>:<user>"`, password
//! `base64(HMAC-SHA1(secret, username))`. One copy for every crate: the TURN core verifies them,
//! signaling, RAWR and the benchmark mint them.

use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use sha1::Sha1;

/// The password for `username` under `secret`: base64(HMAC-SHA1(secret, username)).
pub fn password(secret: &[u8], username: &str) -> String {
    // HMAC takes keys of any length; kept total rather than unwrapped.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(username.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
}

/// Wall-clock seconds since the Unix epoch, the clock REST usernames are written in (0 if the
/// system clock is before 1970). The one copy: shells call it, cores take it as an argument.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `(username, password)` for `user`, valid for `ttl_secs` from `unix_now`.
pub fn credentials(secret: &str, user: &str, unix_now: u64, ttl_secs: u64) -> (String, String) {
    let username = format!("{}:{user}", unix_now.saturating_add(ttl_secs));
    let password = password(secret.as_bytes(), &username);
    (username, password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_coturn_scheme() {
        // printf '%s' '1600000000:alice' | openssl dgst -sha1 -hmac secret -binary | base64
        let (u, p) = credentials("secret", "alice", 1_599_999_000, 1000);
        assert_eq!(u, "1600000000:alice");
        assert_eq!(p, password(b"secret", "1600000000:alice"));
        assert_eq!(p.len(), 28);
    }
}
