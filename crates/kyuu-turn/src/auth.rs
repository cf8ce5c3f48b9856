//! Long-term credentials (RFC 8489 §9.2): static users, TURN REST API shared secrets, and
//! stateless nonces.
//!
//! A nonce is `obMatJos2` + security feature bits + base64url (16 characters) of a 4-byte
//! timestamp and 8 bytes of HMAC-SHA1(server key, timestamp | client IP address). Kept short:
//! the 401 challenge it rides in must stay no larger, relative to the request, than a Binding
//! answer (`kyuu-server/tests/amplification.rs`). The server keeps nothing per client
//! before authentication: it recomputes the MAC to check a nonce, and a nonce older than
//! `nonce_lifetime` gets 438 Stale Nonce with a fresh one. The timestamp is wall-clock
//! seconds and the key may be shared (`fleet.nonce_secret`), so every node of a fleet accepts
//! the nonces of every other (up to 30 s of clock skew).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use kyuu_stun::attr;
use kyuu_stun::integrity::{opaque_string, userhash, Key};
use sha1::Sha1;

use crate::config::{parse_hex_key, TurnConfig};

/// The keys one identity may have used.
#[derive(Debug, Clone)]
pub(crate) struct UserKeys {
    pub md5: Option<Key>,
    pub sha256: Option<Key>,
}

/// Why authentication failed; a metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthFailure {
    UnknownUser,
    Expired,
    BadIntegrity,
    StaleNonce,
    BadNonce,
    WrongRealm,
    Malformed,
}

impl AuthFailure {
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "expired_credential",
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::StaleNonce => "stale_nonce",
            AuthFailure::BadNonce => "bad_nonce",
            AuthFailure::WrongRealm => "wrong_realm",
            AuthFailure::Malformed => "malformed",
        }
    }
}

/// Credential store built once from the config.
#[derive(Debug, Clone)]
pub(crate) struct Credentials {
    realm: String,
    users: HashMap<String, UserKeys>,
    by_hash: HashMap<[u8; 32], String>,
    secrets: Vec<Vec<u8>>,
}

impl Credentials {
    pub fn new(cfg: &TurnConfig) -> Self {
        let mut users = HashMap::new();
        let mut by_hash = HashMap::new();
        for u in &cfg.users {
            // Clients send the OpaqueString form of the name (RFC 8489 §14.3), and it goes into
            // the key as sent; `TurnConfig::validate` refused names and passwords that have none.
            let name = opaque_string(&u.name).map_or_else(|_| u.name.clone(), |n| n.into_owned());
            let (md5, sha256) = match (&u.password, &u.key) {
                (Some(p), _) => (
                    Key::long_term_md5(&name, &cfg.realm, p).ok(),
                    Key::long_term_sha256(&name, &cfg.realm, p).ok(),
                ),
                (None, Some(k)) => (parse_hex_key(k).map(|k| Key::from_bytes(&k)), None),
                (None, None) => (None, None),
            };
            let sha256 = u
                .key_sha256
                .as_deref()
                .and_then(parse_hex_key)
                .map(|k| Key::from_bytes(&k))
                .or(sha256);
            by_hash.insert(userhash(&name, &cfg.realm), name.clone());
            users.insert(name, UserKeys { md5, sha256 });
        }
        Credentials {
            realm: cfg.realm.clone(),
            users,
            by_hash,
            secrets: cfg
                .static_auth_secrets
                .iter()
                .map(|s| s.as_bytes().to_vec())
                .collect(),
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    pub fn user_for_hash(&self, hash: &[u8]) -> Option<&str> {
        let h: [u8; 32] = hash.try_into().ok()?;
        self.by_hash.get(&h).map(String::as_str)
    }

    /// Every key `username` may be using, at `unix_now` seconds.
    ///
    /// `live_allocation`: the request comes from the five-tuple of an allocation this username
    /// made. A REST credential is checked for expiry only when it starts something (Allocate,
    /// and requests without an allocation); the allocation it opened keeps working past the
    /// credential's expiry (Refresh, CreatePermission, ChannelBind) until it is released or
    /// expires, as `turn.max_lifetime` bounds each refresh. Short credential lifetimes are then
    /// safe: a call outlives the credential that started it.
    pub fn keys(
        &self,
        username: &str,
        unix_now: u64,
        live_allocation: bool,
    ) -> Result<Vec<UserKeys>, AuthFailure> {
        // RFC 8489 §14.3: USERNAME MUST have been processed with OpaqueString. One that is not in
        // that form (or has none, e.g. holding control characters) names no one.
        if !opaque_string(username).is_ok_and(|p| p == username) {
            return Err(AuthFailure::UnknownUser);
        }
        if let Some(k) = self.users.get(username) {
            return Ok(vec![k.clone()]);
        }
        if self.secrets.is_empty() {
            return Err(AuthFailure::UnknownUser);
        }
        // REST API: "<expiry>:<user>" (or a bare expiry).
        let stamp = username.split(':').next().unwrap_or(username);
        let Ok(expiry) = stamp.parse::<u64>() else {
            return Err(AuthFailure::UnknownUser);
        };
        if expiry < unix_now && !live_allocation {
            return Err(AuthFailure::Expired);
        }
        Ok(self
            .secrets
            .iter()
            .map(|secret| {
                let password = rest_password(secret, username);
                UserKeys {
                    md5: Key::long_term_md5(username, &self.realm, &password).ok(),
                    sha256: Key::long_term_sha256(username, &self.realm, &password).ok(),
                }
            })
            .collect())
    }
}

pub use kyuu_stun::rest::{credentials as rest_credentials, password as rest_password};

/// Stateless nonces.
#[derive(Clone)]
pub(crate) struct Nonces {
    key: [u8; 32],
    lifetime: u64,
    prefix: [u8; 13],
}

impl std::fmt::Debug for Nonces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nonces(..)")
    }
}

/// How far ahead of this node's clock another node's nonce timestamp may be (fleet nodes'
/// clocks are NTP-synchronised, not identical).
const MAX_CLOCK_SKEW_SECS: u32 = 30;

/// Nonce length: 13 prefix + 16 base64url characters of (4-byte timestamp, 8-byte MAC).
pub(crate) const NONCE_LEN: usize = 29;

impl Nonces {
    pub fn new(key: [u8; 32], lifetime: u64) -> Self {
        Nonces {
            key,
            lifetime,
            prefix: attr::nonce_features_prefix(
                attr::FEATURE_PASSWORD_ALGORITHMS | attr::FEATURE_USERNAME_ANONYMITY,
            ),
        }
    }

    fn mac(&self, ts: u32, client: SocketAddr) -> [u8; 8] {
        let mut out = [0u8; 8];
        let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(&self.key) else {
            return out;
        };
        mac.update(&ts.to_be_bytes());
        match client.ip() {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        let full = mac.finalize().into_bytes();
        out.copy_from_slice(&full[..8]);
        out
    }

    /// A fresh nonce for `client` at server time `secs`.
    pub fn issue(&self, secs: u64, client: SocketAddr) -> [u8; NONCE_LEN] {
        let ts = secs as u32;
        let mut raw = [0u8; 12];
        raw[..4].copy_from_slice(&ts.to_be_bytes());
        raw[4..].copy_from_slice(&self.mac(ts, client));
        let mut out = [0u8; NONCE_LEN];
        out[..13].copy_from_slice(&self.prefix);
        let _ = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode_slice(raw, &mut out[13..]);
        out
    }

    /// Checks a nonce; `Err(StaleNonce)` for an expired or forged one (both answered with 438).
    pub fn check(&self, nonce: &[u8], secs: u64, client: SocketAddr) -> Result<(), AuthFailure> {
        if nonce.len() != NONCE_LEN || nonce[..13] != self.prefix {
            return Err(AuthFailure::BadNonce);
        }
        let mut raw = [0u8; 12];
        match base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(&nonce[13..], &mut raw)
        {
            Ok(12) => {}
            _ => return Err(AuthFailure::BadNonce),
        }
        let ts = u32::from_be_bytes([raw[0], raw[1], raw[2], raw[3]]);
        let mac = &raw[4..];
        let want = self.mac(ts, client);
        if want
            .iter()
            .zip(mac.iter())
            .fold(0u8, |a, (x, y)| a | (x ^ y))
            != 0
        {
            return Err(AuthFailure::BadNonce);
        }
        let now = secs as u32;
        let age = now.wrapping_sub(ts);
        // Issued by another node whose clock runs slightly ahead.
        let ahead = ts.wrapping_sub(now);
        if u64::from(age) > self.lifetime && ahead > MAX_CLOCK_SKEW_SECS {
            return Err(AuthFailure::StaleNonce);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn nonce_round_trip_expiry_and_forgery() {
        let n = Nonces::new([7; 32], 600);
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        let nonce = n.issue(100, a);
        assert!(n.check(&nonce, 100, a).is_ok());
        assert!(n.check(&nonce, 700, a).is_ok());
        assert_eq!(n.check(&nonce, 701, a), Err(AuthFailure::StaleNonce));
        // Bound to the IP only, so an RFC 6062 data connection (new port) can reuse it.
        assert!(n.check(&nonce, 100, b).is_ok());
        let c: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        assert_eq!(n.check(&nonce, 100, c), Err(AuthFailure::BadNonce));
        let mut forged = nonce;
        forged[20] ^= 1;
        assert!(n.check(&forged, 100, a).is_err());
        // A node whose clock is a little behind the issuer's still accepts it; far behind not.
        let later = n.issue(1_000, a);
        assert!(n.check(&later, 990, a).is_ok());
        assert_eq!(n.check(&later, 950, a), Err(AuthFailure::StaleNonce));
        // Another node with the same key (a fleet) accepts it; one with another key does not.
        assert!(Nonces::new([7; 32], 600).check(&nonce, 100, a).is_ok());
        assert_eq!(
            Nonces::new([8; 32], 600).check(&nonce, 100, a),
            Err(AuthFailure::BadNonce)
        );
        assert_eq!(
            attr::nonce_features(&nonce),
            Some(attr::FEATURE_PASSWORD_ALGORITHMS | attr::FEATURE_USERNAME_ANONYMITY)
        );
    }

    #[test]
    fn rest_credentials_match_coturn_scheme() {
        let cfg = TurnConfig {
            static_auth_secrets: vec!["old".into(), "new".into()],
            ..Default::default()
        };
        let c = Credentials::new(&cfg);
        let (u, p) = rest_credentials("new", "alice", 1000, 60);
        assert_eq!(u, "1060:alice");
        let keys = c.keys(&u, 1000, false).unwrap();
        assert_eq!(keys.len(), 2);
        let want = Key::long_term_md5(&u, "kyuu", &p).unwrap();
        assert!(keys.iter().any(|k| k.md5.as_ref() == Some(&want)));
        assert_eq!(c.keys(&u, 1061, false).unwrap_err(), AuthFailure::Expired);
        // An allocation made while the credential was valid keeps it.
        assert!(c.keys(&u, 1061, true).is_ok());
        assert_eq!(
            c.keys("bob", 0, false).unwrap_err(),
            AuthFailure::UnknownUser
        );
    }
}
