//! TURN requests decoded into typed structs, or the error to answer with. A handler receives a
//! well-formed request and checks it only against state (allocation, policy, quotas).
//!
//! Each `decode` reads only the message; it does not know who sent it.

use std::net::SocketAddr;
use std::ops::Range;

use kyuu_stun::{attr, ChannelNumber, ErrorCode, Message};

use crate::types::{ConnectionId, Family, RelayProto};

/// Attributes the TURN methods understand. A comprehension-required attribute outside this list
/// gets 420 (RFC 8489 §7.3.1) or, in an indication, the message dropped (§7.3.2).
pub(crate) fn known_turn(t: u16) -> bool {
    matches!(
        t,
        attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::USERHASH
            | attr::REALM
            | attr::NONCE
            | attr::PASSWORD_ALGORITHM
            | attr::CHANNEL_NUMBER
            | attr::LIFETIME
            | attr::XOR_PEER_ADDRESS
            | attr::DATA
            | attr::REQUESTED_ADDRESS_FAMILY
            | attr::EVEN_PORT
            | attr::REQUESTED_TRANSPORT
            | attr::DONT_FRAGMENT
            | attr::RESERVATION_TOKEN
            | attr::CONNECTION_ID
            | attr::ERROR_CODE
            | attr::PADDING
    )
}

/// Up to 16 comprehension-required attributes of `msg` that `known` does not list, for
/// UNKNOWN-ATTRIBUTES.
pub(crate) fn unknown_required(msg: &Message<'_>, known: impl Fn(u16) -> bool) -> Vec<u16> {
    msg.effective_attrs()
        .map(|a| a.attr_type)
        .filter(|t| attr::is_comprehension_required(*t) && !known(*t))
        .take(16)
        .collect()
}

/// An optional attribute: absent, or present and decoded, or 400.
fn optional<T, E>(
    msg: &Message<'_>,
    t: u16,
    decode: impl FnOnce(&[u8]) -> Result<T, E>,
) -> Result<Option<T>, ErrorCode> {
    msg.get(t)
        .map(decode)
        .transpose()
        .map_err(|_| ErrorCode::BAD_REQUEST)
}

/// Allocate (RFC 8656 §7.2, RFC 6062 §5.1 for TCP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AllocateReq {
    pub proto: RelayProto,
    /// RESERVATION-TOKEN: use a port an earlier EVEN-PORT kept (§14.9).
    pub token: Option<u64>,
    /// EVEN-PORT (§14.6): `Some(true)` also reserves the next port.
    pub even_port: Option<bool>,
    /// REQUESTED-ADDRESS-FAMILY (§14.7); IPv4 when absent.
    pub family: Family,
    /// ADDITIONAL-ADDRESS-FAMILY IPv6 (§14.8): relay both families.
    pub also_v6: bool,
    pub lifetime: Option<u32>,
    /// DONT-FRAGMENT (§7.2, §18.9): datagrams relayed for this allocation carry DF.
    pub dont_fragment: bool,
}

impl AllocateReq {
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        let proto = match msg
            .get(attr::REQUESTED_TRANSPORT)
            .map(attr::decode_requested_transport)
        {
            Some(Ok(attr::TRANSPORT_UDP)) => RelayProto::Udp,
            Some(Ok(attr::TRANSPORT_TCP)) => RelayProto::Tcp,
            Some(Ok(_)) => return Err(ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL),
            _ => return Err(ErrorCode::BAD_REQUEST),
        };
        let token = optional(msg, attr::RESERVATION_TOKEN, |v| {
            attr::decode_u64(attr::RESERVATION_TOKEN, v)
        })?;
        let even_port = optional(msg, attr::EVEN_PORT, attr::decode_even_port)?;
        let requested = msg
            .get(attr::REQUESTED_ADDRESS_FAMILY)
            .map(|v| attr::decode_family(attr::REQUESTED_ADDRESS_FAMILY, v));
        let additional = msg
            .get(attr::ADDITIONAL_ADDRESS_FAMILY)
            .map(|v| attr::decode_family(attr::ADDITIONAL_ADDRESS_FAMILY, v));
        // RESERVATION-TOKEN fixes family and port; it excludes EVEN-PORT and
        // REQUESTED-ADDRESS-FAMILY (§7.2 steps 4 and 5), which excludes ADDITIONAL-...
        if token.is_some() && (even_port.is_some() || requested.is_some()) {
            return Err(ErrorCode::BAD_REQUEST);
        }
        if requested.is_some() && additional.is_some() {
            return Err(ErrorCode::BAD_REQUEST);
        }
        let family = match requested {
            None => Family::V4,
            Some(Ok(code)) => {
                Family::from_code(code).ok_or(ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED)?
            }
            Some(Err(_)) => return Err(ErrorCode::BAD_REQUEST),
        };
        let also_v6 = match additional {
            None => false,
            Some(Ok(attr::FAMILY_IPV6)) => true,
            Some(_) => return Err(ErrorCode::BAD_REQUEST),
        };
        // RFC 6062 allocations relay one TCP listener: no second family, no reservations.
        if (also_v6 || token.is_some()) && proto == RelayProto::Tcp {
            return Err(ErrorCode::BAD_REQUEST);
        }
        // A malformed LIFETIME in an Allocate is ignored (the default applies).
        let lifetime = msg.u32_attr(attr::LIFETIME).and_then(Result::ok);
        Ok(AllocateReq {
            proto,
            token,
            even_port,
            family,
            also_v6,
            lifetime,
            dont_fragment: msg.has(attr::DONT_FRAGMENT),
        })
    }
}

/// Refresh (RFC 8656 §7.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RefreshReq {
    /// REQUESTED-ADDRESS-FAMILY: refresh (or delete) only this family's relayed address.
    pub family: Option<Family>,
    /// 0 deletes the allocation.
    pub lifetime: Option<u32>,
}

impl RefreshReq {
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        let family = match msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(v) => Some(
                attr::decode_family(attr::REQUESTED_ADDRESS_FAMILY, v)
                    .ok()
                    .and_then(Family::from_code)
                    .ok_or(ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH)?,
            ),
        };
        let lifetime = msg
            .u32_attr(attr::LIFETIME)
            .transpose()
            .map_err(|_| ErrorCode::BAD_REQUEST)?;
        Ok(RefreshReq { family, lifetime })
    }
}

/// CreatePermission (RFC 8656 §9.2): one or more XOR-PEER-ADDRESS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CreatePermissionReq {
    pub peers: Vec<SocketAddr>,
}

impl CreatePermissionReq {
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        let peers = msg
            .xor_peer_addresses()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ErrorCode::BAD_REQUEST)?;
        if peers.is_empty() {
            return Err(ErrorCode::BAD_REQUEST);
        }
        Ok(CreatePermissionReq { peers })
    }
}

/// ChannelBind (RFC 8656 §12.2). With `strict` (the default) only numbers of RFC 8656 §12
/// (0x4000..=0x4FFF); otherwise RFC 5766's range (up to 0x7FFF) too, since coturn 4.6.1's
/// `turnutils_uclient` still binds such numbers (the interop tests opt out for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ChannelBindReq {
    pub number: ChannelNumber,
    pub peer: SocketAddr,
}

impl ChannelBindReq {
    pub fn decode(msg: &Message<'_>, strict: bool) -> Result<Self, ErrorCode> {
        let number = msg
            .get(attr::CHANNEL_NUMBER)
            .and_then(|v| attr::decode_channel_number(v).ok())
            .and_then(if strict {
                ChannelNumber::new
            } else {
                ChannelNumber::new_rfc5766
            });
        let peer = msg.xor_address(attr::XOR_PEER_ADDRESS);
        let (Some(number), Some(Ok(peer))) = (number, peer) else {
            return Err(ErrorCode::BAD_REQUEST);
        };
        Ok(ChannelBindReq { number, peer })
    }
}

/// A Send indication (RFC 8656 §11.2), on the relay path: no heap, the payload as a range of the
/// message. Indications are never answered; an error means "drop".
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SendInd {
    pub peer: SocketAddr,
    /// DATA's value within the message bytes.
    pub data: Range<usize>,
    /// DONT-FRAGMENT (§14.8). Passed to the shell in `ToPeer::dont_fragment`.
    pub dont_fragment: bool,
}

impl SendInd {
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        if msg
            .effective_attrs()
            .any(|a| attr::is_comprehension_required(a.attr_type) && !known_turn(a.attr_type))
        {
            return Err(ErrorCode::UNKNOWN_ATTRIBUTE);
        }
        let Some(Ok(peer)) = msg.xor_address(attr::XOR_PEER_ADDRESS) else {
            return Err(ErrorCode::BAD_REQUEST);
        };
        let Some(data) = msg.effective_attrs().find(|a| a.attr_type == attr::DATA) else {
            return Err(ErrorCode::BAD_REQUEST);
        };
        let start = data.offset.checked_add(4).ok_or(ErrorCode::BAD_REQUEST)?;
        let end = start
            .checked_add(data.value.len())
            .filter(|end| *end <= msg.as_bytes().len())
            .ok_or(ErrorCode::BAD_REQUEST)?;
        Ok(SendInd {
            peer,
            data: start..end,
            dont_fragment: msg.has(attr::DONT_FRAGMENT),
        })
    }
}

/// Connect (RFC 6062 §5.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectReq {
    pub peer: SocketAddr,
}

impl ConnectReq {
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        match msg.xor_address(attr::XOR_PEER_ADDRESS) {
            Some(Ok(peer)) => Ok(ConnectReq { peer }),
            _ => Err(ErrorCode::BAD_REQUEST),
        }
    }
}

/// ConnectionBind (RFC 6062 §5.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ConnectionBindReq {
    pub connection_id: ConnectionId,
}

impl ConnectionBindReq {
    pub fn decode(msg: &Message<'_>) -> Result<Self, ErrorCode> {
        match msg.u32_attr(attr::CONNECTION_ID) {
            Some(Ok(id)) => Ok(ConnectionBindReq {
                connection_id: ConnectionId::new(id),
            }),
            _ => Err(ErrorCode::BAD_REQUEST),
        }
    }
}
