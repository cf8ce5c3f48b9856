//! STUN/TURN error codes by name ([RFC 8489 §14.8], [RFC 8656 §19], [RFC 6062 §6.3]), so code
//! that answers with an error says which one, not a bare number.
//!
//! [RFC 8489 §14.8]: https://www.rfc-editor.org/rfc/rfc8489#section-14.8
//! [RFC 8656 §19]: https://www.rfc-editor.org/rfc/rfc8656#section-19
//! [RFC 6062 §6.3]: https://www.rfc-editor.org/rfc/rfc6062#section-6.3

/// A STUN error code (300..=699) as carried by ERROR-CODE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ErrorCode(u16);

impl ErrorCode {
    /// 300: the client should use ALTERNATE-SERVER (RFC 8489 §14.8).
    pub const TRY_ALTERNATE: ErrorCode = ErrorCode(300);
    /// 400: malformed request (RFC 8489 §14.8).
    pub const BAD_REQUEST: ErrorCode = ErrorCode(400);
    /// 401: missing or wrong credentials; the answer carries REALM and NONCE (RFC 8489 §14.8).
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(401);
    /// 403: the request is valid but refused, e.g. a denied peer (RFC 8656 §19).
    pub const FORBIDDEN: ErrorCode = ErrorCode(403);
    /// 405: mobility is not allowed (RFC 8016).
    pub const MOBILITY_FORBIDDEN: ErrorCode = ErrorCode(405);
    /// 420: a comprehension-required attribute was not understood (RFC 8489 §14.8).
    pub const UNKNOWN_ATTRIBUTE: ErrorCode = ErrorCode(420);
    /// 437: the request does not fit the 5-tuple's allocation state (RFC 8656 §19).
    pub const ALLOCATION_MISMATCH: ErrorCode = ErrorCode(437);
    /// 438: the nonce is no longer valid; a fresh one is in the answer (RFC 8489 §14.8).
    pub const STALE_NONCE: ErrorCode = ErrorCode(438);
    /// 440: the server cannot relay the requested address family (RFC 8656 §19).
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: ErrorCode = ErrorCode(440);
    /// 441: the credentials differ from the ones that created the allocation (RFC 8656 §19).
    pub const WRONG_CREDENTIALS: ErrorCode = ErrorCode(441);
    /// 442: REQUESTED-TRANSPORT names a protocol the server does not relay (RFC 8656 §19).
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: ErrorCode = ErrorCode(442);
    /// 443: the peer's address family differs from the relayed address's (RFC 8656 §19).
    pub const PEER_ADDRESS_FAMILY_MISMATCH: ErrorCode = ErrorCode(443);
    /// 446: a TCP connection to this peer already exists (RFC 6062 §6.3).
    pub const CONNECTION_ALREADY_EXISTS: ErrorCode = ErrorCode(446);
    /// 447: the TCP connection to the peer failed or timed out (RFC 6062 §6.3).
    pub const CONNECTION_TIMEOUT_OR_FAILURE: ErrorCode = ErrorCode(447);
    /// 486: the user or client has too many allocations (RFC 8656 §19).
    pub const ALLOCATION_QUOTA_REACHED: ErrorCode = ErrorCode(486);
    /// 487: ICE role conflict (RFC 8445 §7.3.1.1).
    pub const ROLE_CONFLICT: ErrorCode = ErrorCode(487);
    /// 500: temporary server error (RFC 8489 §14.8).
    pub const SERVER_ERROR: ErrorCode = ErrorCode(500);
    /// 508: out of ports, permissions or another resource (RFC 8656 §19).
    pub const INSUFFICIENT_CAPACITY: ErrorCode = ErrorCode(508);

    /// An error code from its number; `None` outside 300..=699.
    pub const fn new(code: u16) -> Option<Self> {
        if code >= 300 && code <= 699 {
            Some(ErrorCode(code))
        } else {
            None
        }
    }

    /// The number, e.g. 401.
    pub const fn code(self) -> u16 {
        self.0
    }

    /// The default reason phrase from the RFC that defines the code.
    pub const fn reason(self) -> &'static str {
        match self.0 {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthenticated",
            403 => "Forbidden",
            405 => "Mobility Forbidden",
            420 => "Unknown Attribute",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            446 => "Connection Already Exists",
            447 => "Connection Timeout or Failure",
            486 => "Allocation Quota Reached",
            487 => "Role Conflict",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "Error",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0, self.reason())
    }
}

impl From<ErrorCode> for u16 {
    fn from(c: ErrorCode) -> u16 {
        c.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_outside_300_to_699_are_refused() {
        assert_eq!(ErrorCode::new(299), None);
        assert_eq!(ErrorCode::new(700), None);
        assert_eq!(ErrorCode::new(401), Some(ErrorCode::UNAUTHORIZED));
        assert_eq!(ErrorCode::UNAUTHORIZED.to_string(), "401 Unauthenticated");
    }
}
