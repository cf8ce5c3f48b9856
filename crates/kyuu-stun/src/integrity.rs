//! Credentials, MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT (RFC 8489 §9, §14.5-14.7).
//!
//! Long-term keys prepare the realm and password with the OpaqueString profile of PRECIS
//! ([RFC 8265 §4.2], [`opaque_string`]) as [RFC 8489 §9.2.2] says: non-ASCII spaces become
//! U+0020, the result is in Unicode Normalization Form C, and strings holding code points that
//! FreeformClass disallows (control characters, default-ignorable code points such as U+00AD,
//! unassigned code points) or that are empty are refused. No width or case mapping. The username
//! is used as received: RFC 8489 §14.3 makes the client apply OpaqueString before sending it;
//! servers prepare their configured names once ([`opaque_string`]) and refuse a USERNAME that is
//! not already in that form. ASCII printable strings are never changed.
//!
//! [RFC 8265 §4.2]: https://www.rfc-editor.org/rfc/rfc8265#section-4.2
//! [RFC 8489 §9.2.2]: https://www.rfc-editor.org/rfc/rfc8489#section-9.2.2

use std::borrow::Cow;

use hmac::{Hmac, Mac};
use md5::{Digest as _, Md5};
use precis_profiles::precis_core::profile::PrecisFastInvocation as _;
use precis_profiles::OpaqueString;
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

/// A string the OpaqueString profile refuses (RFC 8265 §4.2: empty, or holding a code point
/// FreeformClass disallows).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid OpaqueString (RFC 8265 §4.2): {0}")]
pub struct PrepError(String);

/// The OpaqueString profile (RFC 8265 §4.2) enforced on `s` (the `precis-profiles` crate does the
/// work). Printable ASCII is returned unchanged without further work, which is what every
/// browser-made and TURN REST credential is.
pub fn opaque_string(s: &str) -> Result<Cow<'_, str>, PrepError> {
    if !s.is_empty() && s.bytes().all(|b| (0x20..0x7F).contains(&b)) {
        return Ok(Cow::Borrowed(s));
    }
    // RFC 8264 §7: apply the rules again until the output is stable; reject a string that does
    // not stabilise after three more applications, or whose output the rules refuse (seen with
    // the crate's tables: an accepted string whose NFC form holds an unassigned code point).
    let mut out = OpaqueString::enforce(s).map_err(|e| PrepError(e.to_string()))?;
    for _ in 0..3 {
        let again = OpaqueString::enforce(out.as_ref()).map_err(|e| PrepError(e.to_string()))?;
        if again.as_ref() == out.as_ref() {
            return Ok(out);
        }
        out = Cow::Owned(again.into_owned());
    }
    Err(PrepError("does not stabilise (RFC 8264 §7)".into()))
}

impl Key {
    /// Long-term key with MD5 (RFC 8489 §9.2.2): MD5(username ":" OpaqueString(realm) ":"
    /// OpaqueString(password)). The username is taken as given (already prepared).
    pub fn long_term_md5(username: &str, realm: &str, password: &str) -> Result<Self, PrepError> {
        let (realm, password) = (opaque_string(realm)?, opaque_string(password)?);
        let mut h = Md5::new();
        h.update(username.as_bytes());
        h.update(b":");
        h.update(realm.as_bytes());
        h.update(b":");
        h.update(password.as_bytes());
        Ok(Key {
            bytes: h.finalize().to_vec(),
        })
    }

    /// Long-term key with SHA-256 (RFC 8489 §9.2.2): SHA-256(username ":" OpaqueString(realm)
    /// ":" OpaqueString(password)).
    pub fn long_term_sha256(
        username: &str,
        realm: &str,
        password: &str,
    ) -> Result<Self, PrepError> {
        let (realm, password) = (opaque_string(realm)?, opaque_string(password)?);
        let mut h = Sha256::new();
        h.update(username.as_bytes());
        h.update(b":");
        h.update(realm.as_bytes());
        h.update(b":");
        h.update(password.as_bytes());
        Ok(Key {
            bytes: h.finalize().to_vec(),
        })
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
mod opaque_string_tests {
    use super::*;

    fn ok(s: &str) -> String {
        opaque_string(s).map(Cow::into_owned).unwrap_or_default()
    }

    #[test]
    fn ascii_is_unchanged_and_borrowed() {
        for s in [
            "secret",
            "Secret With Spaces",
            "1700000000:alice",
            "a+b/c=",
            " x ",
        ] {
            assert!(matches!(opaque_string(s), Ok(Cow::Borrowed(b)) if b == s));
        }
    }

    /// RFC 8265 §4.2.2: non-ASCII spaces (Zs) map to U+0020.
    #[test]
    fn non_ascii_spaces_become_space() {
        assert_eq!(ok("pass\u{00A0}word"), "pass word");
        assert_eq!(ok("a\u{3000}b\u{2003}c"), "a b c");
    }

    /// RFC 8265 §4.2.2 normalization rule: NFC.
    #[test]
    fn nfc_composes() {
        assert_eq!(ok("cafe\u{0301}"), "caf\u{00E9}");
        assert_eq!(ok("ju\u{0308}rgen"), "j\u{00FC}rgen");
    }

    /// RFC 8265 §4.2.2: no width mapping and no case mapping, unlike SASLprep's NFKC (under
    /// which fullwidth "ＡＢ" became "AB" and U+2168 became "IX").
    #[test]
    fn width_compatibility_and_case_are_kept() {
        assert_eq!(ok("\u{FF21}\u{FF22}"), "\u{FF21}\u{FF22}");
        assert_eq!(ok("\u{2168}"), "\u{2168}");
        assert_eq!(ok("\u{00AA}"), "\u{00AA}");
        assert_eq!(ok("\u{00C4}pfel"), "\u{00C4}pfel");
    }

    /// FreeformClass (RFC 8264 §9.11-9.13) disallows control characters and default-ignorable
    /// code points; the empty string is refused (RFC 8265 §4.2.2).
    #[test]
    fn controls_ignorables_and_empty_are_refused() {
        for s in [
            "a\u{0007}b",
            "tab\there",
            "nl\n",
            "\u{007F}",
            "I\u{00AD}X",
            "",
            "x\u{200B}",
        ] {
            assert!(opaque_string(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn keys_of_equivalent_passwords_match_and_refused_ones_fail() {
        assert_eq!(
            Key::long_term_md5("u", "realm", "cafe\u{0301}\u{00A0}").ok(),
            Key::long_term_md5("u", "realm", "caf\u{00E9} ").ok()
        );
        assert_ne!(
            Key::long_term_md5("u", "realm", "\u{FF21}").ok(),
            Key::long_term_md5("u", "realm", "A").ok()
        );
        assert!(Key::long_term_sha256("u", "realm", "bad\u{0000}").is_err());
        assert!(Key::long_term_md5("u", "", "p").is_err());
    }
}
