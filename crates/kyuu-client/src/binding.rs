//! Binding requests and responses, as a client sees them
//! ([RFC 8489 §7](https://www.rfc-editor.org/rfc/rfc8489#section-7),
//! [RFC 5780 §7](https://www.rfc-editor.org/rfc/rfc5780#section-7)).

use std::net::SocketAddr;

use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};

/// RFC 3489's CHANGED-ADDRESS, which servers that predate RFC 5780 send instead of
/// OTHER-ADDRESS (same encoding).
pub const CHANGED_ADDRESS: u16 = 0x0005;

/// Largest request this module writes (header, CHANGE-REQUEST, FINGERPRINT).
pub const MAX_REQUEST_LEN: usize = 20 + 8 + 8;

/// A fresh random transaction id.
pub fn new_transaction_id() -> TransactionId {
    TransactionId(rand::random())
}

/// Writes a Binding request into `buf`, with CHANGE-REQUEST when `change` is non-zero
/// ([`attr::CHANGE_IP`] | [`attr::CHANGE_PORT`]), and returns its length.
pub fn write_request(
    buf: &mut [u8],
    tid: TransactionId,
    change: u32,
    fingerprint: bool,
) -> Result<usize, kyuu_stun::Error> {
    let mut b = MessageBuilder::new(buf, method::BINDING, Class::Request, tid)?;
    if change != 0 {
        b.add_u32(attr::CHANGE_REQUEST, change)?;
    }
    if fingerprint {
        b.add_fingerprint()?;
    }
    Ok(b.finish())
}

/// The parts of a Binding response the NAT tests use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindingResponse {
    Success {
        /// XOR-MAPPED-ADDRESS (or MAPPED-ADDRESS from an RFC 3489 server).
        mapped: SocketAddr,
        /// OTHER-ADDRESS (or CHANGED-ADDRESS): the server's alternate address, RFC 5780 §7.4.
        other: Option<SocketAddr>,
        /// RESPONSE-ORIGIN: where the server says it sent the response from.
        origin: Option<SocketAddr>,
        software: Option<String>,
    },
    Error {
        code: u16,
        reason: String,
    },
}

/// Why a datagram that carries our transaction id is not a usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResponseError {
    #[error("malformed STUN message: {0}")]
    Malformed(#[from] kyuu_stun::Error),
    #[error("success response without XOR-MAPPED-ADDRESS or MAPPED-ADDRESS")]
    NoMappedAddress,
    #[error("error response without a valid ERROR-CODE")]
    NoErrorCode,
}

/// Parses a Binding success or error response. `Ok(None)` means "not a response": a request,
/// an indication, or another method.
pub fn parse_response(msg: &Message<'_>) -> Result<Option<BindingResponse>, ResponseError> {
    if msg.method() != method::BINDING {
        return Ok(None);
    }
    match msg.class() {
        Class::Success => {
            let mapped = match msg.xor_address(attr::XOR_MAPPED_ADDRESS) {
                Some(r) => r?,
                None => msg
                    .address(attr::MAPPED_ADDRESS)
                    .ok_or(ResponseError::NoMappedAddress)??,
            };
            let other = match msg.address(attr::OTHER_ADDRESS) {
                Some(r) => Some(r?),
                None => msg.address(CHANGED_ADDRESS).transpose()?,
            };
            let origin = msg.address(attr::RESPONSE_ORIGIN).transpose()?;
            let software = msg
                .text(attr::SOFTWARE, attr::MAX_SOFTWARE)
                .and_then(Result::ok)
                .map(str::to_owned);
            Ok(Some(BindingResponse::Success {
                mapped,
                other,
                origin,
                software,
            }))
        }
        Class::Error => {
            let Some(Ok(ec)) = msg.error_code() else {
                return Err(ResponseError::NoErrorCode);
            };
            Ok(Some(BindingResponse::Error {
                code: ec.code,
                reason: ec.reason.to_owned(),
            }))
        }
        Class::Request | Class::Indication => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn request_round_trip() {
        let mut buf = [0u8; MAX_REQUEST_LEN];
        let tid = new_transaction_id();
        let n = write_request(&mut buf, tid, attr::CHANGE_IP | attr::CHANGE_PORT, true).unwrap();
        assert_eq!(n, MAX_REQUEST_LEN);
        let msg = Message::parse(&buf[..n]).unwrap();
        assert_eq!(msg.class(), Class::Request);
        assert_eq!(*msg.transaction_id(), tid);
        assert_eq!(msg.u32_attr(attr::CHANGE_REQUEST).unwrap().unwrap(), 6);
        assert!(msg.verify_fingerprint().unwrap());
        assert_eq!(parse_response(&msg).unwrap(), None);
    }

    #[test]
    fn success_response() {
        let mut buf = [0u8; 128];
        let tid = new_transaction_id();
        let mapped: SocketAddr = "203.0.113.5:40000".parse().unwrap();
        let other: SocketAddr = "198.51.100.2:3479".parse().unwrap();
        let mut b = MessageBuilder::new(&mut buf, method::BINDING, Class::Success, tid).unwrap();
        b.add_xor_address(attr::XOR_MAPPED_ADDRESS, mapped).unwrap();
        b.add_address(attr::OTHER_ADDRESS, other).unwrap();
        b.add(attr::SOFTWARE, b"kyuu").unwrap();
        let n = b.finish();
        let msg = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            parse_response(&msg).unwrap(),
            Some(BindingResponse::Success {
                mapped,
                other: Some(other),
                origin: None,
                software: Some("kyuu".into())
            })
        );
    }

    #[test]
    fn error_response() {
        let mut buf = [0u8; 128];
        let tid = new_transaction_id();
        let mut b = MessageBuilder::new(&mut buf, method::BINDING, Class::Error, tid).unwrap();
        b.add_error(420, "Unknown Attribute").unwrap();
        let n = b.finish();
        let msg = Message::parse(&buf[..n]).unwrap();
        assert_eq!(
            parse_response(&msg).unwrap(),
            Some(BindingResponse::Error {
                code: 420,
                reason: "Unknown Attribute".into()
            })
        );
    }
}
