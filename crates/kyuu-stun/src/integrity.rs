//! Credentials, MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT (RFC 8489 §9, §14.5-14.7).
//!
//! Long-term keys prepare the realm and password with [`saslprep`] (RFC 5389 §15.4 SASLprep,
//! which RFC 8489 §9.2.2 replaced by RFC 8265 OpaqueString; the two agree on what clients send
//! in practice: non-ASCII spaces become U+0020, soft hyphens and other "mapped to nothing"
//! characters vanish, and the result is Unicode-normalised). The username is used as received
//! (RFC 8489 §9.2.2: the client prepares it; it is matched byte for byte).

use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use sha1::Sha1;
use sha2::Sha256;

use crate::{Error, Message};

/// FINGERPRINT is the CRC-32 of the message XOR'd with this (RFC 8489 §14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// A message-integrity key: 16 bytes (MD5 long-term), 32 bytes (SHA-256 long-term) or the
/// short-term password bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Key {
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

/// SASLprep ([RFC 4013]) of a realm or password, as the long-term key uses it. A string the
/// profile prohibits (control characters, unassigned code points, bad bidi) is used unchanged
/// rather than refused, so a configured credential never becomes unusable.
///
/// [RFC 4013]: https://www.rfc-editor.org/rfc/rfc4013
pub fn saslprep(s: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(s).unwrap_or(std::borrow::Cow::Borrowed(s))
}

impl Key {
    /// Long-term key with MD5 (RFC 8489 §9.2.2): MD5(username ":" SASLprep(realm) ":"
    /// SASLprep(password)).
    pub fn long_term_md5(username: &str, realm: &str, password: &str) -> Self {
        let (realm, password) = (saslprep(realm), saslprep(password));
        let mut h = Md5::new();
        h.update(username.as_bytes());
        h.update(b":");
        h.update(realm.as_bytes());
        h.update(b":");
        h.update(password.as_bytes());
        Key {
            bytes: h.finalize().to_vec(),
        }
    }

    /// Long-term key with SHA-256: SHA-256(username ":" SASLprep(realm) ":" SASLprep(password)).
    pub fn long_term_sha256(username: &str, realm: &str, password: &str) -> Self {
        let (realm, password) = (saslprep(realm), saslprep(password));
        let mut h = Sha256::new();
        h.update(username.as_bytes());
        h.update(b":");
        h.update(realm.as_bytes());
        h.update(b":");
        h.update(password.as_bytes());
        Key {
            bytes: h.finalize().to_vec(),
        }
    }

    /// Short-term key: the password itself (RFC 8489 §9.1.1).
    pub fn short_term(password: &str) -> Self {
        Key {
            bytes: password.as_bytes().to_vec(),
        }
    }

    /// A pre-computed key (for example coturn-style `0x<md5 hex>` keys in config).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Key {
            bytes: bytes.to_vec(),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }
}

/// USERHASH (RFC 8489 §14.4): SHA-256(username ":" realm).
pub fn userhash(username: &str, realm: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.finalize().into()
}

/// HMAC-SHA1 over the message prefix `buf[..upto]`, with the header's length field replaced by
/// `length` (the value it has when the integrity attribute is the last one counted).
pub(crate) fn hmac_sha1(key: &[u8], buf: &[u8], upto: usize, length: u16) -> [u8; 20] {
    // HMAC accepts keys of any length.
    let Ok(mut mac) = Hmac::<Sha1>::new_from_slice(key) else {
        return [0; 20];
    };
    mac.update(&buf[..2]);
    mac.update(&length.to_be_bytes());
    mac.update(&buf[4..upto]);
    mac.finalize().into_bytes().into()
}

pub(crate) fn hmac_sha256(key: &[u8], buf: &[u8], upto: usize, length: u16) -> [u8; 32] {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        return [0; 32];
    };
    mac.update(&buf[..2]);
    mac.update(&length.to_be_bytes());
    mac.update(&buf[4..upto]);
    mac.finalize().into_bytes().into()
}

pub(crate) fn crc_fingerprint(buf: &[u8], upto: usize, length: u16) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&buf[..2]);
    h.update(&length.to_be_bytes());
    h.update(&buf[4..upto]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// Constant-time comparison, so integrity checks leak no timing about the expected value.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Message<'_> {
    /// Which integrity attribute the message carries, preferring SHA-256.
    pub fn integrity_kind(&self) -> Option<IntegrityKind> {
        if self.integrity256_offset().is_some() {
            Some(IntegrityKind::Sha256)
        } else if self.integrity_offset().is_some() {
            Some(IntegrityKind::Sha1)
        } else {
            None
        }
    }

    /// Verifies MESSAGE-INTEGRITY-SHA256 if present, else MESSAGE-INTEGRITY.
    pub fn verify_integrity(&self, key: &Key) -> Result<(), Error> {
        let buf = self.as_bytes();
        if let Some(at) = self.integrity256_offset() {
            let len = usize::from(u16::from_be_bytes([buf[at + 2], buf[at + 3]]));
            let length = u16::try_from(at + 4 + len - crate::HEADER_LEN)
                .map_err(|_| Error::IntegrityMismatch)?;
            let mac = hmac_sha256(key.as_bytes(), buf, at, length);
            let got = &buf[at + 4..at + 4 + len];
            return if ct_eq(&mac[..len], got) {
                Ok(())
            } else {
                Err(Error::IntegrityMismatch)
            };
        }
        let at = self
            .integrity_offset()
            .ok_or(Error::MissingAttribute(crate::attr::MESSAGE_INTEGRITY))?;
        let length =
            u16::try_from(at + 24 - crate::HEADER_LEN).map_err(|_| Error::IntegrityMismatch)?;
        let mac = hmac_sha1(key.as_bytes(), buf, at, length);
        if ct_eq(&mac, &buf[at + 4..at + 24]) {
            Ok(())
        } else {
            Err(Error::IntegrityMismatch)
        }
    }

    /// Verifies FINGERPRINT. `Ok(false)` when the message has none.
    pub fn verify_fingerprint(&self) -> Result<bool, Error> {
        let Some(at) = self.fingerprint_offset() else {
            return Ok(false);
        };
        let buf = self.as_bytes();
        let length =
            u16::try_from(at + 8 - crate::HEADER_LEN).map_err(|_| Error::FingerprintMismatch)?;
        let want = crc_fingerprint(buf, at, length);
        let got = u32::from_be_bytes([buf[at + 4], buf[at + 5], buf[at + 6], buf[at + 7]]);
        if want == got {
            Ok(true)
        } else {
            Err(Error::FingerprintMismatch)
        }
    }
}

/// Which integrity attribute protects a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntegrityKind {
    Sha1,
    Sha256,
}

#[cfg(test)]
mod saslprep_tests {
    use super::*;

    /// RFC 4013 §3 examples (and RFC 5769 §2.4's password).
    #[test]
    fn rfc4013_examples() {
        assert_eq!(saslprep("I\u{00AD}X"), "IX"); // SOFT HYPHEN mapped to nothing
        assert_eq!(saslprep("user"), "user"); // no transformation
        assert_eq!(saslprep("USER"), "USER"); // case preserved
        assert_eq!(saslprep("\u{00AA}"), "a"); // output is NFKC, input in ISO 8859-1
        assert_eq!(saslprep("\u{2168}"), "IX"); // output is NFKC
        assert_eq!(saslprep("pass\u{00A0}word"), "pass word"); // non-ASCII space
        assert_eq!(saslprep("\u{FF21}\u{FF22}"), "AB"); // fullwidth letters
        assert_eq!(
            saslprep("The\u{00AD}M\u{00AA}tr\u{2168}"),
            "TheMatrIX",
            "RFC 5769 §2.4"
        );
        // Prohibited (U+0007 control, RFC 4013 §3 example 6): kept as configured.
        assert_eq!(saslprep("\u{0007}"), "\u{0007}");
    }

    #[test]
    fn long_term_keys_prepare_the_password_and_realm() {
        let u = "alice";
        assert!(
            Key::long_term_md5(u, "kyuu", "pass\u{00A0}word")
                == Key::long_term_md5(u, "kyuu", "pass word")
        );
        assert!(
            Key::long_term_sha256(u, "\u{FF4B}yuu", "\u{FF21}\u{00AD}B")
                == Key::long_term_sha256(u, "kyuu", "AB")
        );
        assert!(Key::long_term_md5(u, "kyuu", "pa") != Key::long_term_md5(u, "kyuu", "pb"));
    }
}
