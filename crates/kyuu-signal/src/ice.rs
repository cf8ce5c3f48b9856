//! ICE server provisioning: `RTCIceServer[]` with short-lived TURN credentials.
//!
//! TURN credentials follow the "TURN REST API" scheme implemented by coturn's
//! `use-auth-secret` / `static-auth-secret` (draft-uberti-behave-turn-rest-00 §2.2):
//! `username = "<unix expiry>:<user>"`, `credential = base64(HMAC-SHA1(secret, username))`.
//! A web app therefore never sees the TURN secret, only credentials that expire.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// One `RTCIceServer` dictionary as the browser's `RTCPeerConnection` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:`/`turn:`/`turns:` URLs.
    pub urls: Vec<String>,
    /// TURN username (`"<expiry>:<user>"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential (base64 HMAC-SHA1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Hands out kyuu's STUN/TURN servers with fresh TURN REST credentials.
#[derive(Debug, Clone, Default)]
pub struct IceProvider {
    /// STUN URLs, e.g. `stun:stun.example.org:3478`.
    pub stun_urls: Vec<String>,
    /// TURN URLs, e.g. `turn:turn.example.org:3478?transport=udp`. Only offered when
    /// `rest_secret` is set (a browser refuses a TURN server without credentials).
    pub turn_urls: Vec<String>,
    /// The secret shared with the TURN server (coturn's `static-auth-secret`).
    pub rest_secret: Option<String>,
    /// Lifetime of issued TURN credentials.
    pub ttl: Duration,
}

impl IceProvider {
    /// The TURN REST credential for `username` under `secret`.
    pub fn turn_credential(secret: &str, username: &str) -> String {
        kyuu_stun::rest::password(secret.as_bytes(), username)
    }

    /// The `RTCIceServer[]` for `user` at Unix time `now_unix`.
    pub fn ice_servers(&self, user: &str, now_unix: u64) -> Vec<IceServer> {
        let mut out = Vec::with_capacity(2);
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if let (false, Some(secret)) = (self.turn_urls.is_empty(), self.rest_secret.as_deref()) {
            let expiry = now_unix.saturating_add(self.ttl.as_secs().max(1));
            // ':' separates expiry and user in the scheme; keep the user part free of it.
            let user: String = user.chars().filter(|c| *c != ':').take(64).collect();
            let username = format!("{expiry}:{user}");
            let credential = Self::turn_credential(secret, &username);
            out.push(IceServer {
                urls: self.turn_urls.clone(),
                username: Some(username),
                credential: Some(credential),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coturn_rest_vector() {
        // Cross-checked with: printf '%s' '1700000000:alice' | openssl dgst -sha1 -hmac secret -binary | base64
        assert_eq!(
            IceProvider::turn_credential("secret", "1700000000:alice"),
            "d8soP47RbdIKLDUOpnJPVQyq5Ts="
        );
    }

    #[test]
    fn servers() {
        let p = IceProvider {
            stun_urls: vec!["stun:a:3478".into()],
            turn_urls: vec!["turn:a:3478".into()],
            rest_secret: Some("secret".into()),
            ttl: Duration::from_secs(600),
        };
        let s = p.ice_servers("bob:x", 1000);
        assert_eq!(s.len(), 2);
        assert_eq!(s[1].username.as_deref(), Some("1600:bobx"));
        let no_secret = IceProvider {
            rest_secret: None,
            ..p
        };
        assert_eq!(no_secret.ice_servers("bob", 1).len(), 1);
    }
}
