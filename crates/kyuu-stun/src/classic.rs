//! Classic STUN ([RFC 3489]) Binding requests, answered as [RFC 8489 §11] says.
//!
//! An RFC 3489 header has no magic cookie: bytes 4..20 are one 128-bit transaction id. RFC 8489
//! §11 lets a server recognise such a client by the *absence* of the cookie, answer with
//! MAPPED-ADDRESS instead of XOR-MAPPED-ADDRESS, and copy the request's bytes 4..8 back.
//!
//! The two parsers cannot be confused: [`Message::parse`](crate::Message::parse) refuses any
//! header without the cookie, and [`ClassicRequest::parse`] refuses any header *with* it, and
//! accepts nothing but a Binding request (type 0x0001) whose length and attribute TLVs are
//! exactly consistent with the datagram. Everything else stays "not STUN" and is dropped.
//!
//! [RFC 3489]: https://www.rfc-editor.org/rfc/rfc3489
//! [RFC 8489 §11]: https://www.rfc-editor.org/rfc/rfc8489#section-11

use std::net::SocketAddr;

use crate::attr;
use crate::message::{padded, Class, RawAttr, TransactionId};
use crate::{Error, MessageBuilder, HEADER_LEN, MAGIC_COOKIE};

/// RFC 3489 §11.2.2 RESPONSE-ADDRESS: not supported (reflection); answered 420.
pub const RESPONSE_ADDRESS: u16 = 0x0002;
/// RFC 3489 §11.2.3 SOURCE-ADDRESS: where the answer was sent from.
pub const SOURCE_ADDRESS: u16 = 0x0004;
/// RFC 3489 §11.2.3 CHANGED-ADDRESS: the address a CHANGE-REQUEST with both flags answers from.
pub const CHANGED_ADDRESS: u16 = 0x0005;

/// The 128-bit transaction id of an RFC 3489 message (bytes 4..20 of the header).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClassicTransactionId(pub [u8; 16]);

/// A validated RFC 3489 Binding request borrowing its bytes.
#[derive(Debug, Clone, Copy)]
pub struct ClassicRequest<'a> {
    buf: &'a [u8],
    tid: ClassicTransactionId,
}

impl<'a> ClassicRequest<'a> {
    /// Parses an RFC 3489 Binding request. Fails for anything carrying the RFC 8489 magic cookie,
    /// any other message type, and any length or attribute layout inconsistent with `buf`.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        let head = buf.get(..HEADER_LEN).ok_or(Error::Truncated {
            expected: HEADER_LEN,
            actual: buf.len(),
        })?;
        if u32::from_be_bytes([head[4], head[5], head[6], head[7]]) == MAGIC_COOKIE {
            return Err(Error::NotStun("magic cookie present: not RFC 3489"));
        }
        if u16::from_be_bytes([head[0], head[1]]) != 0x0001 {
            return Err(Error::NotStun(
                "RFC 3489: only Binding requests are answered",
            ));
        }
        let length = usize::from(u16::from_be_bytes([head[2], head[3]]));
        if !length.is_multiple_of(4) {
            return Err(Error::NotStun("length is not a multiple of 4"));
        }
        if HEADER_LEN + length != buf.len() {
            return Err(Error::LengthMismatch {
                length,
                actual: buf.len() - HEADER_LEN,
            });
        }
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            let h = buf.get(pos..pos + 4).ok_or(Error::AttributeOverrun {
                attr_type: 0,
                offset: pos,
            })?;
            let attr_type = u16::from_be_bytes([h[0], h[1]]);
            let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let end = pos + 4 + padded(len);
            if end > buf.len() {
                return Err(Error::AttributeOverrun {
                    attr_type,
                    offset: pos,
                });
            }
            pos = end;
        }
        let mut tid = [0u8; 16];
        tid.copy_from_slice(&head[4..20]);
        Ok(ClassicRequest {
            buf,
            tid: ClassicTransactionId(tid),
        })
    }

    pub fn transaction_id(&self) -> &ClassicTransactionId {
        &self.tid
    }

    /// The attributes, in order (bounds were checked by [`ClassicRequest::parse`]).
    pub fn attrs(&self) -> impl Iterator<Item = RawAttr<'a>> + 'a {
        let buf = self.buf;
        let mut pos = HEADER_LEN;
        std::iter::from_fn(move || {
            let h = buf.get(pos..pos + 4)?;
            let attr_type = u16::from_be_bytes([h[0], h[1]]);
            let len = usize::from(u16::from_be_bytes([h[2], h[3]]));
            let value = buf.get(pos + 4..pos + 4 + len)?;
            let offset = pos;
            pos += 4 + padded(len);
            Some(RawAttr {
                attr_type,
                value,
                offset,
            })
        })
    }

    /// CHANGE-REQUEST's flags ([`attr::CHANGE_IP`], [`attr::CHANGE_PORT`]): `None` when absent,
    /// an error when its value is not four bytes.
    pub fn change_request(&self) -> Option<Result<u32, Error>> {
        let a = self.attrs().find(|a| a.attr_type == attr::CHANGE_REQUEST)?;
        Some(match <[u8; 4]>::try_from(a.value) {
            Ok(v) => Ok(u32::from_be_bytes(v)),
            Err(_) => Err(Error::InvalidAttribute {
                attr_type: attr::CHANGE_REQUEST,
                reason: "CHANGE-REQUEST is not 4 bytes",
            }),
        })
    }

    /// Comprehension-required attributes (below 0x8000) for which `known` is false, at most 16.
    pub fn unknown_required(&self, known: impl Fn(u16) -> bool) -> Vec<u16> {
        self.attrs()
            .map(|a| a.attr_type)
            .filter(|t| attr::is_comprehension_required(*t) && !known(*t))
            .take(16)
            .collect()
    }
}

/// Writes an RFC 3489 answer: the RFC 8489 builder with the request's bytes 4..8 put back where
/// the cookie would be, so the client sees its 128-bit transaction id. `f` must not add XOR'd
/// attributes (they would be XOR'd with the cookie the client never sent).
fn build(
    buf: &mut [u8],
    class: Class,
    tid: &ClassicTransactionId,
    f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), Error>,
) -> Result<usize, Error> {
    let mut rest = [0u8; 12];
    rest.copy_from_slice(&tid.0[4..]);
    let mut b = MessageBuilder::new(buf, crate::method::BINDING, class, TransactionId(rest))?;
    f(&mut b)?;
    let n = b.finish();
    buf[4..8].copy_from_slice(&tid.0[..4]);
    Ok(n)
}

/// Binding success answer to an RFC 3489 request: MAPPED-ADDRESS, and SOURCE-ADDRESS and
/// CHANGED-ADDRESS when given (RFC 3489 §8.2, a server with an alternate address).
pub fn build_classic_success(
    buf: &mut [u8],
    tid: &ClassicTransactionId,
    mapped: SocketAddr,
    source: Option<SocketAddr>,
    changed: Option<SocketAddr>,
) -> Result<usize, Error> {
    build(buf, Class::Success, tid, |b| {
        b.add_address(attr::MAPPED_ADDRESS, mapped)?;
        if let Some(s) = source {
            b.add_address(SOURCE_ADDRESS, s)?;
        }
        if let Some(c) = changed {
            b.add_address(CHANGED_ADDRESS, c)?;
        }
        Ok(())
    })
}

/// Binding error answer to an RFC 3489 request: ERROR-CODE without a reason phrase and, for 420,
/// UNKNOWN-ATTRIBUTES (RFC 3489 §11.2.10: an odd count repeats one type to fill four bytes).
pub fn build_classic_error(
    buf: &mut [u8],
    tid: &ClassicTransactionId,
    code: u16,
    unknown: &[u16],
) -> Result<usize, Error> {
    build(buf, Class::Error, tid, |b| {
        b.add_error_bare(code)?;
        if let Some(&last) = unknown.last() {
            let mut types: Vec<u16> = unknown.to_vec();
            if types.len() % 2 == 1 {
                types.push(last);
            }
            b.add_unknown_attributes(&types)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Message;

    /// What Debian's `stun` client (stund) sends for its first test: an RFC 3489 Binding request
    /// with CHANGE-REQUEST carrying no flags.
    const CLASSIC_CHANGE_NONE: [u8; 28] = [
        0x00, 0x01, // type: Binding request
        0x00, 0x08, // length: 8 bytes of attributes
        0x11, 0x22, 0x33, 0x44, // transaction id bytes 0..4 (NOT the magic cookie 2112a442)
        0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, // transaction id bytes 4..12
        0xdd, 0xee, 0xff, 0x00, // transaction id bytes 12..16
        0x00, 0x03, 0x00, 0x04, // CHANGE-REQUEST, length 4
        0x00, 0x00, 0x00, 0x00, // flags: change neither IP (0x4) nor port (0x2)
    ];

    #[test]
    fn classic_binding_request_parses_with_its_128_bit_transaction_id() {
        let r = ClassicRequest::parse(&CLASSIC_CHANGE_NONE).expect("classic request");
        assert_eq!(
            r.transaction_id().0,
            [
                0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee,
                0xff, 0x00
            ]
        );
        assert_eq!(r.change_request(), Some(Ok(0)));
        assert!(r.unknown_required(|t| t == attr::CHANGE_REQUEST).is_empty());
        // The RFC 8489 parser does not take it for a modern message.
        assert!(Message::parse(&CLASSIC_CHANGE_NONE).is_err());
    }

    #[test]
    fn the_empty_classic_request_parses() {
        let mut b = [0u8; 20];
        b[1] = 0x01; // Binding request, length 0
        b[4..20].copy_from_slice(&[7; 16]); // 128-bit transaction id
        let r = ClassicRequest::parse(&b).expect("classic");
        assert_eq!(r.change_request(), None);
    }

    #[test]
    fn modern_messages_and_junk_are_not_classic() {
        // An RFC 8489 Binding request: cookie 2112a442 at offset 4.
        let mut modern = [0u8; 20];
        modern[1] = 0x01;
        modern[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        assert!(Message::parse(&modern).is_ok());
        assert!(ClassicRequest::parse(&modern).is_err());

        let mut b = CLASSIC_CHANGE_NONE;
        b[1] = 0x11; // Binding indication: only requests are answered
        assert!(ClassicRequest::parse(&b).is_err());
        let mut b = CLASSIC_CHANGE_NONE;
        b[0] = 0x80; // not STUN at all
        assert!(ClassicRequest::parse(&b).is_err());
        let mut b = CLASSIC_CHANGE_NONE;
        b[3] = 0x0c; // length says 12, 8 present
        assert!(ClassicRequest::parse(&b).is_err());
        let mut b = CLASSIC_CHANGE_NONE;
        b[23] = 0x08; // attribute length 8 overruns the message
        assert!(ClassicRequest::parse(&b).is_err());
        let mut b = CLASSIC_CHANGE_NONE;
        b[3] = 0x06; // length not a multiple of four
        assert!(ClassicRequest::parse(&b[..26]).is_err());
        assert!(ClassicRequest::parse(&CLASSIC_CHANGE_NONE[..19]).is_err());
        // Every truncation is refused, never a panic.
        for n in 0..CLASSIC_CHANGE_NONE.len() {
            assert!(ClassicRequest::parse(&CLASSIC_CHANGE_NONE[..n]).is_err());
        }
    }

    #[test]
    fn classic_success_copies_the_transaction_id_and_carries_mapped_address() {
        let r = ClassicRequest::parse(&CLASSIC_CHANGE_NONE).expect("classic");
        let mut out = [0u8; 128];
        let mapped: SocketAddr = "192.0.2.1:32853".parse().expect("addr");
        let n =
            build_classic_success(&mut out, r.transaction_id(), mapped, None, None).expect("build");
        #[rustfmt::skip]
        let expected: [u8; 32] = [
            0x01, 0x01, // Binding success response
            0x00, 0x0c, // length 12
            0x11, 0x22, 0x33, 0x44, // the request's bytes 4..8, copied back
            0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x00,
            0x00, 0x01, 0x00, 0x08, // MAPPED-ADDRESS, length 8
            0x00, 0x01, // reserved, family IPv4
            0x80, 0x55, // port 32853, not XOR'd
            192, 0, 2, 1, // address, not XOR'd
        ];
        assert_eq!(&out[..n], &expected);
    }

    #[test]
    fn classic_error_pads_an_odd_unknown_attributes_list() {
        let r = ClassicRequest::parse(&CLASSIC_CHANGE_NONE).expect("classic");
        let mut out = [0u8; 128];
        let n = build_classic_error(&mut out, r.transaction_id(), 420, &[RESPONSE_ADDRESS])
            .expect("build");
        #[rustfmt::skip]
        let expected: [u8; 36] = [
            0x01, 0x11, // Binding error response
            0x00, 0x10, // length 16
            0x11, 0x22, 0x33, 0x44,
            0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x00,
            0x00, 0x09, 0x00, 0x04, // ERROR-CODE, length 4
            0x00, 0x00, 0x04, 20, // class 4, number 20: 420
            0x00, 0x0a, 0x00, 0x04, // UNKNOWN-ATTRIBUTES, length 4
            0x00, 0x02, 0x00, 0x02, // RESPONSE-ADDRESS, repeated to fill four bytes
        ];
        assert_eq!(&out[..n], &expected);
    }
}
