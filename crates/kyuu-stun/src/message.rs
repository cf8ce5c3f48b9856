//! Zero-copy parsing of STUN messages (RFC 8489 §5, §14).

use std::net::SocketAddr;

use crate::attr;
use crate::{Error, HEADER_LEN, MAGIC_COOKIE};

/// The class of a message (the C1/C0 bits of the message type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    pub(crate) const fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }

    const fn from_bits(bits: u16) -> Self {
        match bits & 0b11 {
            0b00 => Class::Request,
            0b01 => Class::Indication,
            0b10 => Class::Success,
            _ => Class::Error,
        }
    }
}

/// Encodes method and class into the 14-bit message type (RFC 8489 §5, figure 3).
pub const fn message_type(method: u16, class: Class) -> u16 {
    let c = class.bits();
    (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((c & 0b01) << 4)
        | ((c & 0b10) << 7)
}

const fn split_type(t: u16) -> (u16, Class) {
    let method = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = ((t >> 4) & 0b01) | ((t >> 7) & 0b10);
    (method, Class::from_bits(class))
}

/// The 96-bit transaction id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransactionId(pub [u8; 12]);

impl TransactionId {
    pub fn as_bytes(&self) -> &[u8; 12] {
        &self.0
    }
}

/// Rounds up to the next multiple of four.
pub(crate) const fn padded(len: usize) -> usize {
    (len + 3) & !3
}

/// Cheap test of whether `buf` could be a STUN message (top two bits zero and the magic cookie),
/// used to demultiplex STUN from ChannelData and other protocols.
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= HEADER_LEN
        && buf[0] & 0xC0 == 0
        && u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) == MAGIC_COOKIE
}

/// A parsed STUN message borrowing its bytes.
///
/// Construction validates every attribute's bounds, so the accessors never panic.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    buf: &'a [u8],
    method: u16,
    class: Class,
    tid: TransactionId,
    /// Offset of MESSAGE-INTEGRITY, if present.
    integrity_at: Option<usize>,
    /// Offset of MESSAGE-INTEGRITY-SHA256, if present.
    integrity256_at: Option<usize>,
    /// Offset of FINGERPRINT, if present.
    fingerprint_at: Option<usize>,
}

/// One attribute as it appears on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAttr<'a> {
    pub attr_type: u16,
    pub value: &'a [u8],
    /// Offset of the attribute header from the start of the message.
    pub offset: usize,
}

/// Iterates over the attributes of a validated message.
#[derive(Debug, Clone)]
pub struct AttrIter<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for AttrIter<'a> {
    type Item = RawAttr<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        let head = self.buf.get(self.pos..self.pos + 4)?;
        let attr_type = u16::from_be_bytes([head[0], head[1]]);
        let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let value = self.buf.get(self.pos + 4..self.pos + 4 + len)?;
        let offset = self.pos;
        self.pos += 4 + padded(len);
        Some(RawAttr {
            attr_type,
            value,
            offset,
        })
    }
}

impl<'a> Message<'a> {
    /// Parses and validates a complete STUN message. `buf` must hold exactly one message.
    pub fn parse(buf: &'a [u8]) -> Result<Self, Error> {
        if buf.len() < HEADER_LEN {
            return Err(Error::Truncated {
                expected: HEADER_LEN,
                actual: buf.len(),
            });
        }
        if buf[0] & 0xC0 != 0 {
            return Err(Error::NotStun("first two bits are not zero"));
        }
        if u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE {
            return Err(Error::NotStun("bad magic cookie"));
        }
        let length = usize::from(u16::from_be_bytes([buf[2], buf[3]]));
        if !length.is_multiple_of(4) {
            return Err(Error::NotStun("length is not a multiple of 4"));
        }
        if HEADER_LEN + length != buf.len() {
            return Err(Error::LengthMismatch {
                length,
                actual: buf.len() - HEADER_LEN,
            });
        }
        let (method, class) = split_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut tid = [0u8; 12];
        tid.copy_from_slice(&buf[8..20]);

        let mut msg = Message {
            buf,
            method,
            class,
            tid: TransactionId(tid),
            integrity_at: None,
            integrity256_at: None,
            fingerprint_at: None,
        };
        let mut pos = HEADER_LEN;
        while pos < buf.len() {
            let Some(head) = buf.get(pos..pos + 4) else {
                return Err(Error::AttributeOverrun {
                    attr_type: 0,
                    offset: pos,
                });
            };
            let attr_type = u16::from_be_bytes([head[0], head[1]]);
            let len = usize::from(u16::from_be_bytes([head[2], head[3]]));
            if pos + 4 + padded(len) > buf.len() {
                return Err(Error::AttributeOverrun {
                    attr_type,
                    offset: pos,
                });
            }
            if msg.fingerprint_at.is_some() {
                return Err(Error::NotStun("attribute after FINGERPRINT"));
            }
            match attr_type {
                attr::MESSAGE_INTEGRITY
                    if msg.integrity_at.is_none() && msg.integrity256_at.is_none() =>
                {
                    if len != 20 {
                        return Err(Error::InvalidAttribute {
                            attr_type,
                            reason: "expected 20 bytes",
                        });
                    }
                    msg.integrity_at = Some(pos);
                }
                attr::MESSAGE_INTEGRITY_SHA256 if msg.integrity256_at.is_none() => {
                    // RFC 8489 §14.6: at least 16 bytes, multiple of 4, at most 32.
                    if !(16..=32).contains(&len) || !len.is_multiple_of(4) {
                        return Err(Error::InvalidAttribute {
                            attr_type,
                            reason: "bad length",
                        });
                    }
                    msg.integrity256_at = Some(pos);
                }
                attr::FINGERPRINT => {
                    if len != 4 {
                        return Err(Error::InvalidAttribute {
                            attr_type,
                            reason: "expected 4 bytes",
                        });
                    }
                    msg.fingerprint_at = Some(pos);
                }
                _ => {}
            }
            pos += 4 + padded(len);
        }
        Ok(msg)
    }

    pub fn method(&self) -> u16 {
        self.method
    }

    pub fn class(&self) -> Class {
        self.class
    }

    pub fn transaction_id(&self) -> &TransactionId {
        &self.tid
    }

    /// The whole message as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    /// Every attribute on the wire, in order, including any that follow MESSAGE-INTEGRITY.
    pub fn attrs(&self) -> AttrIter<'a> {
        AttrIter {
            buf: self.buf,
            pos: HEADER_LEN,
        }
    }

    /// The attributes an agent must act on: those before the first integrity attribute, plus the
    /// integrity attributes and FINGERPRINT themselves (RFC 8489 §14.5: anything else after
    /// MESSAGE-INTEGRITY is ignored).
    pub fn effective_attrs(&self) -> impl Iterator<Item = RawAttr<'a>> + 'a {
        let cut = match (self.integrity_at, self.integrity256_at) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => usize::MAX,
        };
        self.attrs().filter(move |a| {
            a.offset < cut
                || matches!(
                    a.attr_type,
                    attr::MESSAGE_INTEGRITY | attr::MESSAGE_INTEGRITY_SHA256 | attr::FINGERPRINT
                )
        })
    }

    /// The first effective attribute of a type.
    pub fn get(&self, attr_type: u16) -> Option<&'a [u8]> {
        self.effective_attrs()
            .find(|a| a.attr_type == attr_type)
            .map(|a| a.value)
    }

    pub fn has(&self, attr_type: u16) -> bool {
        self.get(attr_type).is_some()
    }

    /// Comprehension-required attributes present that are not in `known` (for a 420 answer).
    pub fn unknown_required<'k>(&self, known: &'k [u16]) -> impl Iterator<Item = u16> + 'k
    where
        'a: 'k,
    {
        self.effective_attrs()
            .map(|a| a.attr_type)
            .filter(move |t| attr::is_comprehension_required(*t) && !known.contains(t))
    }

    pub(crate) fn integrity_offset(&self) -> Option<usize> {
        self.integrity_at
    }

    pub(crate) fn integrity256_offset(&self) -> Option<usize> {
        self.integrity256_at
    }

    pub(crate) fn fingerprint_offset(&self) -> Option<usize> {
        self.fingerprint_at
    }

    // Typed accessors. Each returns None when absent and Some(Err) when malformed.

    pub fn xor_address(&self, attr_type: u16) -> Option<Result<SocketAddr, Error>> {
        self.get(attr_type)
            .map(|v| attr::decode_xor_address(attr_type, v, &self.tid))
    }

    pub fn address(&self, attr_type: u16) -> Option<Result<SocketAddr, Error>> {
        self.get(attr_type)
            .map(|v| attr::decode_address(attr_type, v))
    }

    /// All XOR-PEER-ADDRESS attributes (CreatePermission may carry several).
    pub fn xor_peer_addresses(&self) -> impl Iterator<Item = Result<SocketAddr, Error>> + 'a {
        let tid = self.tid;
        self.effective_attrs()
            .filter(|a| a.attr_type == attr::XOR_PEER_ADDRESS)
            .map(move |a| attr::decode_xor_address(attr::XOR_PEER_ADDRESS, a.value, &tid))
    }

    pub fn text(&self, attr_type: u16, max: usize) -> Option<Result<&'a str, Error>> {
        self.get(attr_type)
            .map(|v| attr::decode_text(attr_type, v, max))
    }

    pub fn username(&self) -> Option<Result<&'a str, Error>> {
        self.text(attr::USERNAME, attr::MAX_USERNAME)
    }

    pub fn realm(&self) -> Option<Result<&'a str, Error>> {
        self.text(attr::REALM, attr::MAX_REALM)
    }

    pub fn nonce(&self) -> Option<&'a [u8]> {
        self.get(attr::NONCE).filter(|n| n.len() <= attr::MAX_NONCE)
    }

    pub fn u32_attr(&self, attr_type: u16) -> Option<Result<u32, Error>> {
        self.get(attr_type).map(|v| attr::decode_u32(attr_type, v))
    }

    pub fn error_code(&self) -> Option<Result<attr::ErrorCode<'a>, Error>> {
        self.get(attr::ERROR_CODE).map(attr::decode_error_code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_encoding_round_trips() {
        for method in 0..0x1000u16 {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let t = message_type(method, class);
                assert_eq!(t & 0xC000, 0);
                assert_eq!(split_type(t), (method, class));
            }
        }
        assert_eq!(message_type(crate::method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(crate::method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(crate::method::BINDING, Class::Error), 0x0111);
        assert_eq!(message_type(crate::method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(crate::method::DATA, Class::Indication), 0x0017);
        assert_eq!(
            message_type(crate::method::ALLOCATE, Class::Request),
            0x0003
        );
    }
}
