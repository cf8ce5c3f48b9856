//! Signed, expiring access tokens for the signaling endpoint.
//!
//! Format: `base64url(claims JSON) "." base64url(HMAC-SHA256(secret, first part))`, no padding.
//! The claims bind the token to a client id (`sub`), optionally to a set of rooms, and to an
//! expiry time (`exp`, Unix seconds). Pure functions: the caller passes the current time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The client id the token is bound to. `"*"` allows any id (and a server-assigned one).
    pub sub: String,
    /// Rooms the holder may join; `None` means any room.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rooms: Option<Vec<String>>,
    /// Expiry, Unix seconds.
    pub exp: u64,
}

impl Claims {
    /// Whether the token allows joining `room`.
    pub fn allows_room(&self, room: &str) -> bool {
        self.rooms
            .as_ref()
            .is_none_or(|rs| rs.iter().any(|r| r == room))
    }

    /// Whether the token allows using `id`.
    pub fn allows_id(&self, id: &str) -> bool {
        self.sub == "*" || self.sub == id
    }
}

/// Why a token was rejected. All of these map to HTTP 401, except where noted by the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not `a.b`, or not base64url, or claims not JSON.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match.
    #[error("bad token signature")]
    BadSignature,
    /// `exp` is in the past.
    #[error("token expired at {exp}, now {now}")]
    Expired {
        /// Expiry in the token.
        exp: u64,
        /// Time of the check.
        now: u64,
    },
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length; the error branch is unreachable but not unwrapped.
    match HmacSha256::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) =>
        {
            #[allow(clippy::expect_used)]
            HmacSha256::new_from_slice(b"").expect("empty HMAC key is valid")
        }
    }
}

/// Issue a token for `claims`, signed with `secret`.
pub fn issue(secret: &[u8], claims: &Claims) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let body = URL_SAFE_NO_PAD.encode(json);
    let mut m = mac(secret);
    m.update(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
    format!("{body}.{sig}")
}

/// Verify `token` with `secret` at time `now_unix`; returns its claims.
pub fn verify(secret: &[u8], token: &str, now_unix: u64) -> Result<Claims, TokenError> {
    let (body, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| TokenError::Malformed)?;
    let mut m = mac(secret);
    m.update(body.as_bytes());
    // Constant-time comparison.
    m.verify_slice(&sig).map_err(|_| TokenError::BadSignature)?;
    let json = URL_SAFE_NO_PAD
        .decode(body)
        .map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| TokenError::Malformed)?;
    if claims.exp <= now_unix {
        return Err(TokenError::Expired {
            exp: claims.exp,
            now: now_unix,
        });
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn claims() -> Claims {
        Claims {
            sub: "alice".into(),
            rooms: Some(vec!["r1".into()]),
            exp: 1000,
        }
    }

    #[test]
    fn roundtrip() {
        let t = issue(b"s3cret", &claims());
        assert_eq!(verify(b"s3cret", &t, 999).unwrap(), claims());
        assert!(claims().allows_room("r1"));
        assert!(!claims().allows_room("r2"));
        assert!(claims().allows_id("alice"));
        assert!(!claims().allows_id("bob"));
    }

    #[test]
    fn rejects() {
        let t = issue(b"s3cret", &claims());
        assert_eq!(
            verify(b"s3cret", &t, 1000),
            Err(TokenError::Expired {
                exp: 1000,
                now: 1000
            })
        );
        assert_eq!(verify(b"other", &t, 1), Err(TokenError::BadSignature));
        assert_eq!(verify(b"s3cret", "nodot", 1), Err(TokenError::Malformed));
        assert_eq!(verify(b"s3cret", "a.!!", 1), Err(TokenError::Malformed));
        // Tampered claims with the old signature.
        let (_, sig) = t.split_once('.').unwrap();
        let forged = Claims {
            sub: "mallory".into(),
            ..claims()
        };
        let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(
            verify(b"s3cret", &format!("{body}.{sig}"), 1),
            Err(TokenError::BadSignature)
        );
    }
}
