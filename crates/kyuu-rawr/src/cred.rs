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

/// The Redis key naming a session across a fleet of root nodes (`docs/rawr.md` §4.7): a
/// SHA-256 of the session, so the bearer secret itself never reaches Redis.
pub fn fleet_key(session: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"kyuu rawr fleet\0");
    h.update(session);
    format!("kyuu:rawr:s:{}", hex::encode(h.finalize()))
}

/// `(username, password)` for one side of a session, valid until `expiry` (unix seconds).
pub fn mint(secret: &str, expiry: u64, session: &[u8], mac: Mac) -> (String, String) {
    let user = format!("{expiry}:rawr-{}-{}", session_tag(session), mac.to_hex());
    let pass = rest_password(secret, &user);
    (user, pass)
}

/// The session tag inside a username [`mint`] made (`"<expiry>:rawr-<tag>-<mac>"`).
pub fn tag_of_username(username: &str) -> Option<&str> {
    let rest = username.split_once(":rawr-")?.1;
    let (tag, _mac) = rest.split_once('-')?;
    (tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(tag)
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

    #[test]
    fn the_tag_comes_back_out_of_a_username() {
        let (u, _) = mint("s", 1, &[7; 16], Mac([2, 0, 0, 0, 0, 1]));
        assert_eq!(tag_of_username(&u), Some(session_tag(&[7; 16]).as_str()));
        assert_eq!(tag_of_username("1:alice"), None);
    }
}
