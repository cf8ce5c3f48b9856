//! TURN REST credentials (coturn `use-auth-secret` scheme), `docs/rawr.md` §6.

use sha2::{Digest, Sha256};

use crate::wire::Mac;

/// `password = base64(HMAC-SHA1(secret, username))` ([`kyuu_stun::rest::password`]).
pub fn rest_password(secret: &str, username: &str) -> String {
    kyuu_stun::rest::password(secret.as_bytes(), username)
}

/// First 8 bytes of SHA-256("rawr" || session), hex: names a session without revealing it.
pub fn session_tag(session: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"rawr");
    h.update(session);
    let d = h.finalize();
    hex::encode(d.get(..8).unwrap_or(&[]))
}

/// `(username, password)` for one side of a session, valid until `expiry` (unix seconds).
pub fn mint(secret: &str, expiry: u64, session: &[u8], mac: Mac) -> (String, String) {
    let user = format!("{expiry}:rawr-{}-{}", session_tag(session), mac.to_hex());
    let pass = rest_password(secret, &user);
    (user, pass)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_coturn_scheme() {
        // echo -n "1600000000:alice" | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            rest_password("secret", "1600000000:alice"),
            "UQpbzqLy8wUgAxlVOh3KKXno2lk="
        );
    }
}
