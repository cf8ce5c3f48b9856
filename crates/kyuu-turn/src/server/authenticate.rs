//! The long-term credential check of a TURN request ([RFC 8489 §9.2.4]), as a function that
//! decides: it reads the request and the credential store and returns a [`Verdict`]. The server
//! writes the answer (a challenge carries a fresh nonce) and counts the failure.
//!
//! [RFC 8489 §9.2.4]: https://www.rfc-editor.org/rfc/rfc8489#section-9.2.4

use std::net::SocketAddr;

use kyuu_stun::integrity::{IntegrityKind, Key};
use kyuu_stun::{attr, ErrorCode, Message};

use crate::auth::{AuthFailure, Credentials, Nonces};

/// The password algorithms offered in challenges, in this order (RFC 8489 §14.11).
pub(crate) const PASSWORD_ALGORITHMS: [u16; 2] = [
    attr::PASSWORD_ALGORITHM_MD5,
    attr::PASSWORD_ALGORITHM_SHA256,
];

/// An authenticated request's identity and the key that verified it (the answer is signed with
/// the same key and algorithm).
#[derive(Debug)]
pub(crate) struct Authed {
    pub username: String,
    pub key: Key,
    pub kind: IntegrityKind,
}

/// How to answer a request that did not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answer {
    /// The error with REALM, a fresh NONCE and PASSWORD-ALGORITHMS (401, 438).
    Challenge(ErrorCode),
    /// A plain error without integrity (400).
    Error(ErrorCode),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub answer: Answer,
    /// What to count, if this is an authentication failure rather than a first request.
    pub failure: Option<AuthFailure>,
    /// Whether the answer is subject to the per-source limit on unauthenticated answers: those
    /// a spoofed source could trigger without a valid nonce.
    pub rate_limited: bool,
}

#[derive(Debug)]
pub(crate) enum Verdict {
    Authed(Authed),
    Refused(Refusal),
}

fn refuse(answer: Answer, failure: Option<AuthFailure>, rate_limited: bool) -> Verdict {
    Verdict::Refused(Refusal {
        answer,
        failure,
        rate_limited,
    })
}

/// What the check needs besides the message.
pub(crate) struct AuthContext<'a> {
    pub creds: &'a Credentials,
    pub nonces: &'a Nonces,
    pub client: SocketAddr,
    /// Wall-clock seconds (the nonce clock, shared by the nodes of a fleet).
    pub secs: u64,
    /// Wall-clock seconds, for TURN REST credential expiry.
    pub unix_now: u64,
    /// The username of the allocation on this five-tuple, for requests other than Allocate:
    /// its REST credential may have expired since (`crate::auth::Credentials::keys`).
    pub live_user: Option<&'a str>,
}

/// Decides whether `msg` carries valid long-term credentials (RFC 8489 §9.2.4 steps in order:
/// integrity present, REALM/NONCE present, nonce valid, realm ours, user known, password
/// algorithm agreed, MESSAGE-INTEGRITY(-SHA256) verifies).
pub(crate) fn authenticate(cx: &AuthContext<'_>, msg: &Message<'_>) -> Verdict {
    use Answer::{Challenge, Error};
    let Some(kind) = msg.integrity_kind() else {
        return refuse(Challenge(ErrorCode::UNAUTHORIZED), None, true);
    };
    let username = match (msg.username(), msg.get(attr::USERHASH)) {
        (Some(Ok(u)), _) => Some(u.to_owned()),
        (None, Some(h)) => cx.creds.user_for_hash(h).map(str::to_owned),
        _ => None,
    };
    let (Some(Ok(realm)), Some(nonce)) = (msg.realm(), msg.nonce()) else {
        return refuse(
            Error(ErrorCode::BAD_REQUEST),
            Some(AuthFailure::Malformed),
            true,
        );
    };
    if let Err(f) = cx.nonces.check(nonce, cx.secs, cx.client) {
        return refuse(Challenge(ErrorCode::STALE_NONCE), Some(f), true);
    }
    if realm != cx.creds.realm() {
        return refuse(
            Challenge(ErrorCode::UNAUTHORIZED),
            Some(AuthFailure::WrongRealm),
            false,
        );
    }
    let Some(username) = username else {
        return if msg.has(attr::USERHASH) {
            refuse(
                Challenge(ErrorCode::UNAUTHORIZED),
                Some(AuthFailure::UnknownUser),
                false,
            )
        } else {
            refuse(
                Error(ErrorCode::BAD_REQUEST),
                Some(AuthFailure::Malformed),
                false,
            )
        };
    };
    // PASSWORD-ALGORITHM negotiation (RFC 8489 §9.2.4 steps on PASSWORD-ALGORITHMS): the
    // client's choice must come with our list, unchanged.
    let sha256 = match msg.get(attr::PASSWORD_ALGORITHM) {
        None if msg.has(attr::PASSWORD_ALGORITHMS) => {
            return refuse(Error(ErrorCode::BAD_REQUEST), None, false);
        }
        None => false,
        Some(v) => {
            let algs_ok = msg.get(attr::PASSWORD_ALGORITHMS).is_some_and(|list| {
                attr::decode_password_algorithms(list).is_ok_and(|l| {
                    l.iter()
                        .map(|(a, _)| *a)
                        .eq(PASSWORD_ALGORITHMS.iter().copied())
                })
            });
            match attr::decode_password_algorithm(v) {
                Ok((attr::PASSWORD_ALGORITHM_MD5, _)) if algs_ok => false,
                Ok((attr::PASSWORD_ALGORITHM_SHA256, _)) if algs_ok => true,
                _ => {
                    return refuse(
                        Error(ErrorCode::BAD_REQUEST),
                        Some(AuthFailure::Malformed),
                        false,
                    );
                }
            }
        }
    };
    let live = cx.live_user == Some(username.as_str());
    let keys = match cx.creds.keys(&username, cx.unix_now, live) {
        Ok(k) => k,
        Err(f) => return refuse(Challenge(ErrorCode::UNAUTHORIZED), Some(f), false),
    };
    let key = keys
        .into_iter()
        .filter_map(|k| if sha256 { k.sha256 } else { k.md5 })
        .find(|k| msg.verify_integrity(k).is_ok());
    let Some(key) = key else {
        return refuse(
            Challenge(ErrorCode::UNAUTHORIZED),
            Some(AuthFailure::BadIntegrity),
            false,
        );
    };
    Verdict::Authed(Authed {
        username,
        key,
        kind,
    })
}
