//! Writing STUN messages into caller-provided buffers.

use std::net::SocketAddr;

use crate::attr;
use crate::integrity::{crc_fingerprint, hmac_sha1, hmac_sha256, Key};
use crate::message::{message_type, padded, Class, TransactionId};
use crate::{Error, HEADER_LEN, MAGIC_COOKIE};

/// Writes one STUN message into a borrowed buffer. The header's length field is kept current
/// after every attribute, so [`MessageBuilder::finish`] only returns the size.
#[derive(Debug)]
pub struct MessageBuilder<'b> {
    buf: &'b mut [u8],
    len: usize,
    pad: u8,
    tid: TransactionId,
}

impl<'b> MessageBuilder<'b> {
    /// Starts a message of `method`/`class` with transaction id `tid`.
    pub fn new(
        buf: &'b mut [u8],
        method: u16,
        class: Class,
        tid: TransactionId,
    ) -> Result<Self, Error> {
        let head = buf.get_mut(..HEADER_LEN).ok_or(Error::BufferTooSmall)?;
        head[..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        head[2..4].copy_from_slice(&[0, 0]);
        head[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        head[8..20].copy_from_slice(&tid.0);
        Ok(MessageBuilder {
            buf,
            len: HEADER_LEN,
            pad: 0,
            tid,
        })
    }

    /// The byte used to pad attribute values to four bytes (zero by default; RFC 5769's vectors use
    /// 0x20). Receivers must ignore padding, so this only matters for byte-exact tests.
    pub fn padding_byte(mut self, pad: u8) -> Self {
        self.pad = pad;
        self
    }

    pub fn transaction_id(&self) -> &TransactionId {
        &self.tid
    }

    fn set_length(&mut self) {
        // `len` never exceeds HEADER_LEN + u16::MAX: `reserve` checks it.
        let body = (self.len - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
    }

    /// Reserves an attribute of `value_len` bytes and returns the value's slice to fill in.
    pub fn reserve(&mut self, attr_type: u16, value_len: usize) -> Result<&mut [u8], Error> {
        let len16 = u16::try_from(value_len).map_err(|_| Error::ValueTooLong(value_len))?;
        let total = 4 + padded(value_len);
        let end = self.len + total;
        if end - HEADER_LEN > usize::from(u16::MAX) {
            return Err(Error::ValueTooLong(value_len));
        }
        let slot = self
            .buf
            .get_mut(self.len..end)
            .ok_or(Error::BufferTooSmall)?;
        slot[..2].copy_from_slice(&attr_type.to_be_bytes());
        slot[2..4].copy_from_slice(&len16.to_be_bytes());
        for b in &mut slot[4 + value_len..] {
            *b = self.pad;
        }
        let start = self.len + 4;
        self.len = end;
        self.set_length();
        Ok(&mut self.buf[start..start + value_len])
    }

    /// Adds an attribute with the given value bytes.
    pub fn add(&mut self, attr_type: u16, value: &[u8]) -> Result<(), Error> {
        self.reserve(attr_type, value.len())?.copy_from_slice(value);
        Ok(())
    }

    pub fn add_u32(&mut self, attr_type: u16, v: u32) -> Result<(), Error> {
        self.add(attr_type, &v.to_be_bytes())
    }

    pub fn add_u64(&mut self, attr_type: u16, v: u64) -> Result<(), Error> {
        self.add(attr_type, &v.to_be_bytes())
    }

    /// A plain address attribute (MAPPED-ADDRESS, ALTERNATE-SERVER, RESPONSE-ORIGIN, OTHER-ADDRESS).
    pub fn add_address(&mut self, attr_type: u16, addr: SocketAddr) -> Result<(), Error> {
        let mut v = [0u8; 20];
        let n = attr::encode_address(addr, &mut v);
        self.add(attr_type, &v[..n])
    }

    /// An XOR'd address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS, XOR-RELAYED-ADDRESS).
    pub fn add_xor_address(&mut self, attr_type: u16, addr: SocketAddr) -> Result<(), Error> {
        let x = attr::xor_address(addr, &self.tid);
        self.add_address(attr_type, x)
    }

    /// ERROR-CODE with the given code (300..=699) and reason (the default phrase when empty).
    pub fn add_error(&mut self, code: u16, reason: &str) -> Result<(), Error> {
        let reason = if reason.is_empty() {
            attr::error_reason(code)
        } else {
            reason
        };
        let v = self.reserve(attr::ERROR_CODE, 4 + reason.len())?;
        v[0] = 0;
        v[1] = 0;
        v[2] = ((code / 100) & 0x07) as u8;
        v[3] = (code % 100) as u8;
        v[4..].copy_from_slice(reason.as_bytes());
        Ok(())
    }

    /// ERROR-CODE with an empty reason phrase (RFC 8489 §14.8 allows any phrase): for answers
    /// to unverified addresses, where every byte counts towards amplification.
    pub fn add_error_bare(&mut self, code: u16) -> Result<(), Error> {
        let v = self.reserve(attr::ERROR_CODE, 4)?;
        v[0] = 0;
        v[1] = 0;
        v[2] = ((code / 100) & 0x07) as u8;
        v[3] = (code % 100) as u8;
        Ok(())
    }

    /// ERROR-CODE with its default reason phrase.
    pub fn add_error_code(&mut self, code: crate::ErrorCode) -> Result<(), Error> {
        self.add_error(code.code(), code.reason())
    }

    pub fn add_unknown_attributes(&mut self, types: &[u16]) -> Result<(), Error> {
        let v = self.reserve(attr::UNKNOWN_ATTRIBUTES, types.len() * 2)?;
        for (chunk, t) in v.chunks_exact_mut(2).zip(types) {
            chunk.copy_from_slice(&t.to_be_bytes());
        }
        Ok(())
    }

    pub fn add_channel_number(&mut self, channel: u16) -> Result<(), Error> {
        let c = channel.to_be_bytes();
        self.add(attr::CHANNEL_NUMBER, &[c[0], c[1], 0, 0])
    }

    pub fn add_requested_transport(&mut self, proto: u8) -> Result<(), Error> {
        self.add(attr::REQUESTED_TRANSPORT, &[proto, 0, 0, 0])
    }

    /// REQUESTED-ADDRESS-FAMILY or ADDITIONAL-ADDRESS-FAMILY.
    pub fn add_family(&mut self, attr_type: u16, family: u8) -> Result<(), Error> {
        self.add(attr_type, &[family, 0, 0, 0])
    }

    pub fn add_even_port(&mut self, reserve_next: bool) -> Result<(), Error> {
        self.add(attr::EVEN_PORT, &[if reserve_next { 0x80 } else { 0 }])
    }

    pub fn add_response_port(&mut self, port: u16) -> Result<(), Error> {
        let p = port.to_be_bytes();
        self.add(attr::RESPONSE_PORT, &[p[0], p[1], 0, 0])
    }

    /// ADDRESS-ERROR-CODE (RFC 8656 §18.12) for one family of a dual allocation.
    pub fn add_address_error(&mut self, family: u8, code: u16, reason: &str) -> Result<(), Error> {
        let reason = if reason.is_empty() {
            attr::error_reason(code)
        } else {
            reason
        };
        let v = self.reserve(attr::ADDRESS_ERROR_CODE, 4 + reason.len())?;
        v[0] = family;
        v[1] = 0;
        v[2] = ((code / 100) & 0x07) as u8;
        v[3] = (code % 100) as u8;
        v[4..].copy_from_slice(reason.as_bytes());
        Ok(())
    }

    /// PASSWORD-ALGORITHM with no parameters (MD5 and SHA-256 take none).
    pub fn add_password_algorithm(&mut self, alg: u16) -> Result<(), Error> {
        let a = alg.to_be_bytes();
        self.add(attr::PASSWORD_ALGORITHM, &[a[0], a[1], 0, 0])
    }

    /// PASSWORD-ALGORITHMS listing algorithms without parameters.
    pub fn add_password_algorithms(&mut self, algs: &[u16]) -> Result<(), Error> {
        let v = self.reserve(attr::PASSWORD_ALGORITHMS, algs.len() * 4)?;
        for (chunk, a) in v.chunks_exact_mut(4).zip(algs) {
            let b = a.to_be_bytes();
            chunk.copy_from_slice(&[b[0], b[1], 0, 0]);
        }
        Ok(())
    }

    /// MESSAGE-INTEGRITY (HMAC-SHA1). Must follow every attribute it protects.
    pub fn add_integrity(&mut self, key: &Key) -> Result<(), Error> {
        let at = self.len;
        self.reserve(attr::MESSAGE_INTEGRITY, 20)?;
        let length = (self.len - HEADER_LEN) as u16;
        let mac = hmac_sha1(key.as_bytes(), self.buf, at, length);
        self.buf[at + 4..at + 24].copy_from_slice(&mac);
        Ok(())
    }

    /// MESSAGE-INTEGRITY-SHA256 (full 32 bytes).
    pub fn add_integrity_sha256(&mut self, key: &Key) -> Result<(), Error> {
        let at = self.len;
        self.reserve(attr::MESSAGE_INTEGRITY_SHA256, 32)?;
        let length = (self.len - HEADER_LEN) as u16;
        let mac = hmac_sha256(key.as_bytes(), self.buf, at, length);
        self.buf[at + 4..at + 36].copy_from_slice(&mac);
        Ok(())
    }

    /// FINGERPRINT; must be the last attribute.
    pub fn add_fingerprint(&mut self) -> Result<(), Error> {
        let at = self.len;
        self.reserve(attr::FINGERPRINT, 4)?;
        let length = (self.len - HEADER_LEN) as u16;
        let crc = crc_fingerprint(self.buf, at, length);
        self.buf[at + 4..at + 8].copy_from_slice(&crc.to_be_bytes());
        Ok(())
    }

    /// The bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Ends the message and returns its total size in bytes.
    pub fn finish(self) -> usize {
        self.len
    }
}
