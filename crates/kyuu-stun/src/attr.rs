//! Attribute types and typed value codecs.
//!
//! Types below 0x8000 are comprehension-required: an agent that does not understand one must
//! reject the message (420 with UNKNOWN-ATTRIBUTES for requests). Registry:
//! [RFC 8489 §18.3](https://www.rfc-editor.org/rfc/rfc8489#section-18.3).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::{Error, TransactionId, MAGIC_COOKIE};

// RFC 8489 §14
pub const MAPPED_ADDRESS: u16 = 0x0001;
/// RFC 5780 §7.2
pub const CHANGE_REQUEST: u16 = 0x0003;
pub const USERNAME: u16 = 0x0006;
pub const MESSAGE_INTEGRITY: u16 = 0x0008;
pub const ERROR_CODE: u16 = 0x0009;
pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
/// RFC 8656 §18.1
pub const CHANNEL_NUMBER: u16 = 0x000C;
/// RFC 8656 §18.2
pub const LIFETIME: u16 = 0x000D;
/// RFC 8656 §18.3
pub const XOR_PEER_ADDRESS: u16 = 0x0012;
/// RFC 8656 §18.4
pub const DATA: u16 = 0x0013;
pub const REALM: u16 = 0x0014;
pub const NONCE: u16 = 0x0015;
/// RFC 8656 §18.5
pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
/// RFC 8656 §18.6
pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
/// RFC 8656 §18.7
pub const EVEN_PORT: u16 = 0x0018;
/// RFC 8656 §18.8
pub const REQUESTED_TRANSPORT: u16 = 0x0019;
/// RFC 8656 §18.9
pub const DONT_FRAGMENT: u16 = 0x001A;
pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
pub const PASSWORD_ALGORITHM: u16 = 0x001D;
pub const USERHASH: u16 = 0x001E;
pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
/// RFC 8656 §18.10
pub const RESERVATION_TOKEN: u16 = 0x0022;
/// RFC 8445 (ICE)
pub const PRIORITY: u16 = 0x0024;
pub const USE_CANDIDATE: u16 = 0x0025;
/// RFC 5780 §7.6
pub const PADDING: u16 = 0x0026;
/// RFC 5780 §7.5
pub const RESPONSE_PORT: u16 = 0x0027;
/// RFC 6062 §6.2.1
pub const CONNECTION_ID: u16 = 0x002A;

// Comprehension-optional.
/// RFC 8656 §18.11
pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
/// RFC 8656 §18.12
pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
pub const ALTERNATE_DOMAIN: u16 = 0x8003;
/// RFC 8656 §18.13 (see [`Icmp`])
pub const ICMP: u16 = 0x8004;
pub const SOFTWARE: u16 = 0x8022;
pub const ALTERNATE_SERVER: u16 = 0x8023;
/// RFC 7982
pub const TRANSACTION_TRANSMIT_COUNTER: u16 = 0x8025;
/// RFC 5780 §7.7
pub const CACHE_TIMEOUT: u16 = 0x8027;
pub const FINGERPRINT: u16 = 0x8028;
pub const ICE_CONTROLLED: u16 = 0x8029;
pub const ICE_CONTROLLING: u16 = 0x802A;
/// RFC 5780 §7.3
pub const RESPONSE_ORIGIN: u16 = 0x802B;
/// RFC 5780 §7.4
pub const OTHER_ADDRESS: u16 = 0x802C;

/// Whether an attribute type is comprehension-required (RFC 8489 §14).
pub const fn is_comprehension_required(attr_type: u16) -> bool {
    attr_type < 0x8000
}

/// A human name for an attribute type, for logs.
pub fn name(attr_type: u16) -> &'static str {
    match attr_type {
        MAPPED_ADDRESS => "MAPPED-ADDRESS",
        CHANGE_REQUEST => "CHANGE-REQUEST",
        USERNAME => "USERNAME",
        MESSAGE_INTEGRITY => "MESSAGE-INTEGRITY",
        ERROR_CODE => "ERROR-CODE",
        UNKNOWN_ATTRIBUTES => "UNKNOWN-ATTRIBUTES",
        CHANNEL_NUMBER => "CHANNEL-NUMBER",
        LIFETIME => "LIFETIME",
        XOR_PEER_ADDRESS => "XOR-PEER-ADDRESS",
        DATA => "DATA",
        REALM => "REALM",
        NONCE => "NONCE",
        XOR_RELAYED_ADDRESS => "XOR-RELAYED-ADDRESS",
        REQUESTED_ADDRESS_FAMILY => "REQUESTED-ADDRESS-FAMILY",
        EVEN_PORT => "EVEN-PORT",
        REQUESTED_TRANSPORT => "REQUESTED-TRANSPORT",
        DONT_FRAGMENT => "DONT-FRAGMENT",
        MESSAGE_INTEGRITY_SHA256 => "MESSAGE-INTEGRITY-SHA256",
        PASSWORD_ALGORITHM => "PASSWORD-ALGORITHM",
        USERHASH => "USERHASH",
        XOR_MAPPED_ADDRESS => "XOR-MAPPED-ADDRESS",
        RESERVATION_TOKEN => "RESERVATION-TOKEN",
        PRIORITY => "PRIORITY",
        USE_CANDIDATE => "USE-CANDIDATE",
        PADDING => "PADDING",
        RESPONSE_PORT => "RESPONSE-PORT",
        CONNECTION_ID => "CONNECTION-ID",
        ADDITIONAL_ADDRESS_FAMILY => "ADDITIONAL-ADDRESS-FAMILY",
        ADDRESS_ERROR_CODE => "ADDRESS-ERROR-CODE",
        PASSWORD_ALGORITHMS => "PASSWORD-ALGORITHMS",
        ALTERNATE_DOMAIN => "ALTERNATE-DOMAIN",
        ICMP => "ICMP",
        SOFTWARE => "SOFTWARE",
        ALTERNATE_SERVER => "ALTERNATE-SERVER",
        TRANSACTION_TRANSMIT_COUNTER => "TRANSACTION-TRANSMIT-COUNTER",
        CACHE_TIMEOUT => "CACHE-TIMEOUT",
        FINGERPRINT => "FINGERPRINT",
        ICE_CONTROLLED => "ICE-CONTROLLED",
        ICE_CONTROLLING => "ICE-CONTROLLING",
        RESPONSE_ORIGIN => "RESPONSE-ORIGIN",
        OTHER_ADDRESS => "OTHER-ADDRESS",
        _ => "unknown",
    }
}

/// Address family codes used in address attributes and REQUESTED-ADDRESS-FAMILY.
pub const FAMILY_IPV4: u8 = 0x01;
pub const FAMILY_IPV6: u8 = 0x02;

/// Transport protocol numbers for REQUESTED-TRANSPORT (RFC 8656 §18.8, RFC 6062).
pub const TRANSPORT_UDP: u8 = 17;
pub const TRANSPORT_TCP: u8 = 6;

/// CHANGE-REQUEST flags (RFC 5780 §7.2).
pub const CHANGE_IP: u32 = 0x4;
pub const CHANGE_PORT: u32 = 0x2;

/// Password algorithm numbers (RFC 8489 §18.5).
pub const PASSWORD_ALGORITHM_MD5: u16 = 0x0001;
pub const PASSWORD_ALGORITHM_SHA256: u16 = 0x0002;

fn invalid(attr_type: u16, reason: &'static str) -> Error {
    Error::InvalidAttribute { attr_type, reason }
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes([
        *b.get(at)?,
        *b.get(at + 1)?,
        *b.get(at + 2)?,
        *b.get(at + 3)?,
    ]))
}

/// Decodes a plain address attribute (MAPPED-ADDRESS, ALTERNATE-SERVER, RESPONSE-ORIGIN,
/// OTHER-ADDRESS).
pub fn decode_address(attr_type: u16, value: &[u8]) -> Result<SocketAddr, Error> {
    let (family, port) = match (value.get(1), be_u16(value, 2)) {
        (Some(f), Some(p)) => (*f, p),
        _ => return Err(invalid(attr_type, "address shorter than 4 bytes")),
    };
    match (family, value.len()) {
        (FAMILY_IPV4, 8) => {
            let ip = Ipv4Addr::new(value[4], value[5], value[6], value[7]);
            Ok(SocketAddr::new(IpAddr::V4(ip), port))
        }
        (FAMILY_IPV6, 20) => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&value[4..20]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        (FAMILY_IPV4 | FAMILY_IPV6, _) => {
            Err(invalid(attr_type, "address length does not fit family"))
        }
        _ => Err(invalid(attr_type, "unknown address family")),
    }
}

/// Decodes an XOR'd address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS,
/// XOR-RELAYED-ADDRESS), RFC 8489 §14.2.
pub fn decode_xor_address(
    attr_type: u16,
    value: &[u8],
    tid: &TransactionId,
) -> Result<SocketAddr, Error> {
    let plain = decode_address(attr_type, value)?;
    Ok(xor_address(plain, tid))
}

/// XOR (or un-XOR; the operation is its own inverse) an address with the cookie and transaction id.
pub fn xor_address(addr: SocketAddr, tid: &TransactionId) -> SocketAddr {
    let cookie = MAGIC_COOKIE.to_be_bytes();
    let port = addr.port() ^ (MAGIC_COOKIE >> 16) as u16;
    match addr.ip() {
        IpAddr::V4(ip) => {
            let o = ip.octets();
            let x = [
                o[0] ^ cookie[0],
                o[1] ^ cookie[1],
                o[2] ^ cookie[2],
                o[3] ^ cookie[3],
            ];
            SocketAddr::new(IpAddr::V4(Ipv4Addr::from(x)), port)
        }
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            let mut key = [0u8; 16];
            key[..4].copy_from_slice(&cookie);
            key[4..].copy_from_slice(tid.as_bytes());
            for (b, k) in o.iter_mut().zip(key.iter()) {
                *b ^= k;
            }
            SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port)
        }
    }
}

/// Writes a plain address value into `out`, returning its length (8 or 20).
pub fn encode_address(addr: SocketAddr, out: &mut [u8; 20]) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&addr.port().to_be_bytes());
    match addr.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_IPV4;
            out[4..8].copy_from_slice(&ip.octets());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_IPV6;
            out[4..20].copy_from_slice(&ip.octets());
            20
        }
    }
}

/// A decoded ERROR-CODE attribute (RFC 8489 §14.8): the number and the sender's reason phrase.
/// For the code by name see [`crate::ErrorCode`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorCode<'a> {
    pub code: u16,
    pub reason: &'a str,
}

pub fn decode_error_code(value: &[u8]) -> Result<ErrorCode<'_>, Error> {
    if value.len() < 4 {
        return Err(invalid(ERROR_CODE, "shorter than 4 bytes"));
    }
    let class = u16::from(value[2] & 0x07);
    let number = u16::from(value[3]);
    if !(3..=6).contains(&class) || number > 99 {
        return Err(invalid(ERROR_CODE, "code out of range"));
    }
    let reason =
        std::str::from_utf8(&value[4..]).map_err(|_| invalid(ERROR_CODE, "reason is not UTF-8"))?;
    Ok(ErrorCode {
        code: class * 100 + number,
        reason,
    })
}

/// The default reason phrase for an error code, from the RFCs that define it.
pub fn error_reason(code: u16) -> &'static str {
    crate::ErrorCode::new(code).map_or("Error", crate::ErrorCode::reason)
}

/// Decodes a big-endian u32 attribute (LIFETIME, CHANGE-REQUEST, PRIORITY, CONNECTION-ID...).
pub fn decode_u32(attr_type: u16, value: &[u8]) -> Result<u32, Error> {
    if value.len() != 4 {
        return Err(invalid(attr_type, "expected 4 bytes"));
    }
    be_u32(value, 0).ok_or(invalid(attr_type, "expected 4 bytes"))
}

/// Decodes a big-endian u64 attribute (ICE-CONTROLLING/CONTROLLED, RESERVATION-TOKEN).
pub fn decode_u64(attr_type: u16, value: &[u8]) -> Result<u64, Error> {
    let arr: [u8; 8] = value
        .try_into()
        .map_err(|_| invalid(attr_type, "expected 8 bytes"))?;
    Ok(u64::from_be_bytes(arr))
}

/// CHANNEL-NUMBER: the number in the first two bytes, RFFU after.
pub fn decode_channel_number(value: &[u8]) -> Result<u16, Error> {
    if value.len() != 4 {
        return Err(invalid(CHANNEL_NUMBER, "expected 4 bytes"));
    }
    be_u16(value, 0).ok_or(invalid(CHANNEL_NUMBER, "expected 4 bytes"))
}

/// The value of an ICMP attribute (RFC 8656 §18.13): the type and code of an ICMP error a relay
/// received for a datagram it sent to a peer (§11.5), and its error data.
///
/// ```text
///  0                   1                   2                   3
/// +-------------------------------+---------------+---------------+
/// |           Reserved            |   ICMP Type   |   ICMP Code   |
/// +-------------------------------+---------------+---------------+
/// |                          Error Data                           |
/// +---------------------------------------------------------------+
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Icmp {
    pub icmp_type: u8,
    pub code: u8,
    /// The next-hop MTU for ICMPv4 type 3 code 4 ("fragmentation needed") and ICMPv6 type 2
    /// ("packet too big"); zero for everything else (§18.13).
    pub error_data: u32,
}

/// The 8-byte ICMP attribute value; Reserved is sent as 0.
pub fn encode_icmp(i: Icmp) -> [u8; 8] {
    let d = i.error_data.to_be_bytes();
    [0, 0, i.icmp_type, i.code, d[0], d[1], d[2], d[3]]
}

/// An ICMP attribute value; Reserved is ignored (§18.13).
pub fn decode_icmp(value: &[u8]) -> Result<Icmp, Error> {
    let (8, Some(&icmp_type), Some(&code), Some(error_data)) =
        (value.len(), value.get(2), value.get(3), be_u32(value, 4))
    else {
        return Err(invalid(ICMP, "expected 8 bytes"));
    };
    Ok(Icmp {
        icmp_type,
        code,
        error_data,
    })
}

/// REQUESTED-TRANSPORT: the protocol number in the first byte.
pub fn decode_requested_transport(value: &[u8]) -> Result<u8, Error> {
    if value.len() != 4 {
        return Err(invalid(REQUESTED_TRANSPORT, "expected 4 bytes"));
    }
    Ok(value[0])
}

/// REQUESTED-ADDRESS-FAMILY / ADDITIONAL-ADDRESS-FAMILY: the family in the first byte.
pub fn decode_family(attr_type: u16, value: &[u8]) -> Result<u8, Error> {
    if value.len() != 4 {
        return Err(invalid(attr_type, "expected 4 bytes"));
    }
    Ok(value[0])
}

/// EVEN-PORT: the R bit asks to also reserve the next port.
pub fn decode_even_port(value: &[u8]) -> Result<bool, Error> {
    match value.first() {
        Some(b) if value.len() == 1 || value.len() == 4 => Ok(b & 0x80 != 0),
        _ => Err(invalid(EVEN_PORT, "expected 1 byte")),
    }
}

/// RESPONSE-PORT: the port in the first two bytes.
pub fn decode_response_port(value: &[u8]) -> Result<u16, Error> {
    if value.len() != 4 {
        return Err(invalid(RESPONSE_PORT, "expected 4 bytes"));
    }
    be_u16(value, 0).ok_or(invalid(RESPONSE_PORT, "expected 4 bytes"))
}

/// UNKNOWN-ATTRIBUTES: a list of 16-bit types.
pub fn decode_unknown_attributes(value: &[u8]) -> Result<impl Iterator<Item = u16> + '_, Error> {
    if !value.len().is_multiple_of(2) {
        return Err(invalid(UNKNOWN_ATTRIBUTES, "odd length"));
    }
    Ok(value
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]])))
}

/// PASSWORD-ALGORITHM value: algorithm number and parameters.
pub fn decode_password_algorithm(value: &[u8]) -> Result<(u16, &[u8]), Error> {
    let (Some(alg), Some(len)) = (be_u16(value, 0), be_u16(value, 2)) else {
        return Err(invalid(PASSWORD_ALGORITHM, "shorter than 4 bytes"));
    };
    let params = value
        .get(4..4 + usize::from(len))
        .ok_or(invalid(PASSWORD_ALGORITHM, "parameters overrun"))?;
    Ok((alg, params))
}

/// PASSWORD-ALGORITHMS value: a list of (algorithm, parameters), each padded to 4 bytes.
pub fn decode_password_algorithms(value: &[u8]) -> Result<Vec<(u16, &[u8])>, Error> {
    let mut out = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (alg, params) = decode_password_algorithm(rest)
            .map_err(|_| invalid(PASSWORD_ALGORITHMS, "malformed entry"))?;
        let used = 4 + crate::message::padded(params.len());
        out.push((alg, params));
        rest = rest.get(used..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Decodes a UTF-8 text attribute (USERNAME, REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN) with the
/// RFC's length limit (in bytes).
pub fn decode_text(attr_type: u16, value: &[u8], max: usize) -> Result<&str, Error> {
    if value.len() > max {
        return Err(invalid(attr_type, "too long"));
    }
    std::str::from_utf8(value).map_err(|_| invalid(attr_type, "not UTF-8"))
}

/// Length limits from RFC 8489 §14 (in bytes of UTF-8).
pub const MAX_USERNAME: usize = 513;
pub const MAX_REALM: usize = 763;
pub const MAX_NONCE: usize = 763;
pub const MAX_SOFTWARE: usize = 763;

/// The nonce cookie of RFC 8489 §9.2: a nonce that starts with it carries security feature bits.
pub const NONCE_COOKIE: &[u8; 9] = b"obMatJos2";
/// Security feature: PASSWORD-ALGORITHMS supported (RFC 8489 §18.1).
pub const FEATURE_PASSWORD_ALGORITHMS: u32 = 1 << 23;
/// Security feature: USERHASH (username anonymity) supported.
pub const FEATURE_USERNAME_ANONYMITY: u32 = 1 << 22;

/// The 13-byte prefix that announces `features` (24 bits, most significant bit first) in a nonce.
pub fn nonce_features_prefix(features: u32) -> [u8; 13] {
    use base64::Engine;
    let mut out = [0u8; 13];
    out[..9].copy_from_slice(NONCE_COOKIE);
    let bits = features.to_be_bytes();
    let mut enc = [0u8; 4];
    // 3 bytes encode to exactly 4 base64 characters.
    let _ = base64::engine::general_purpose::STANDARD.encode_slice(&bits[1..4], &mut enc);
    out[9..].copy_from_slice(&enc);
    out
}

/// The security feature bits a nonce announces, if it starts with the nonce cookie.
pub fn nonce_features(nonce: &[u8]) -> Option<u32> {
    use base64::Engine;
    let rest = nonce.strip_prefix(NONCE_COOKIE.as_slice())?;
    let enc = rest.get(..4)?;
    let mut bits = [0u8; 3];
    let n = base64::engine::general_purpose::STANDARD
        .decode_slice(enc, &mut bits)
        .ok()?;
    (n == 3).then(|| u32::from_be_bytes([0, bits[0], bits[1], bits[2]]))
}
