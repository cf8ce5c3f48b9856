//! RAWR wire format: method numbers, attribute types and typed encode/decode of the four messages
//! (`docs/rawr.md` §3). Everything here is pure; decoding never panics on input.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use kyuu_stun::attr as sattr;
use kyuu_stun::integrity::Key;
use kyuu_stun::{Class, Message, MessageBuilder, TransactionId};

/// Methods (designated-expert range, `docs/rawr.md` §3).
pub mod method {
    pub const EXCHANGE: u16 = 0xC01;
    pub const REGISTER: u16 = 0xC02;
    pub const CONNECT: u16 = 0xC03;
    pub const CANCEL: u16 = 0xC04;

    /// Whether a STUN method is one of RAWR's (the range the STUN shell hands to the node).
    pub const fn is_rawr(m: u16) -> bool {
        m >= 0xC01 && m <= 0xC0F
    }
}

/// Attribute types (`docs/rawr.md` §3.1).
pub mod attr {
    pub const SESSION: u16 = 0x4C01;
    pub const MAC: u16 = 0x4C02;
    pub const TARGET_MAC: u16 = 0x4C03;
    pub const ROOT: u16 = 0x4C04;
    pub const HOPS: u16 = 0x4C05;
    pub const PATH: u16 = 0x4C06;
    pub const RELAY: u16 = 0x4C07;
    pub const TURN_USERNAME: u16 = 0x4C08;
    pub const TURN_PASSWORD: u16 = 0x4C09;
    /// Comprehension-optional: a host address of the peer, passed through Exchange.
    pub const HOST_ADDRESS: u16 = 0xCC01;
    /// Comprehension-optional, empty: set in a Connect answer when the meeting node was the root.
    pub const AT_ROOT: u16 = 0xCC02;
    /// The attributes a RAWR node understands (for 420 checks).
    pub const KNOWN: &[u16] = &[
        SESSION,
        MAC,
        TARGET_MAC,
        ROOT,
        HOPS,
        PATH,
        RELAY,
        TURN_USERNAME,
        TURN_PASSWORD,
        kyuu_stun::attr::LIFETIME,
        kyuu_stun::attr::USERNAME,
        kyuu_stun::attr::MESSAGE_INTEGRITY,
        kyuu_stun::attr::MESSAGE_INTEGRITY_SHA256,
        kyuu_stun::attr::ERROR_CODE,
        kyuu_stun::attr::UNKNOWN_ATTRIBUTES,
    ];
}

/// Error codes (`docs/rawr.md` §3.2).
pub mod code {
    pub const BAD_REQUEST: u16 = 400;
    pub const UNAUTHENTICATED: u16 = 401;
    pub const FORBIDDEN: u16 = 403;
    pub const TIMEOUT: u16 = 408;
    pub const SESSION_FULL: u16 = 409;
    pub const UNKNOWN_ATTRIBUTE: u16 = 420;
    pub const LOOP_DETECTED: u16 = 482;
    pub const TOO_MANY_HOPS: u16 = 483;
    /// This node will not relay the session: its reservation was refused (per-peer or per-link
    /// session cap) or used up (byte or duration limit reached). The peer asks above it.
    pub const RELAY_LIMIT: u16 = 470;
    pub const QUOTA: u16 = 486;
    pub const UPSTREAM_UNREACHABLE: u16 = 504;
    pub const CAPACITY: u16 = 508;

    pub fn reason(code: u16) -> &'static str {
        match code {
            TIMEOUT => "Request Timeout",
            SESSION_FULL => "Session Full",
            LOOP_DETECTED => "Loop Detected",
            TOO_MANY_HOPS => "Too Many Hops",
            RELAY_LIMIT => "Relay Limit Reached",
            QUOTA => "Quota Reached",
            UPSTREAM_UNREACHABLE => "Upstream Unreachable",
            CAPACITY => "Insufficient Capacity",
            other => kyuu_stun::attr::error_reason(other),
        }
    }
}

/// Limits from the spec.
pub const MAX_HOPS: u8 = 16;
pub const MAX_PATH: usize = 16;
pub const MAX_NAME: usize = 63;
pub const MIN_SESSION: usize = 16;
pub const MAX_SESSION: usize = 64;
pub const MAX_HOSTS: usize = 8;
pub const MAX_TEXT: usize = 255;
pub const MAX_RELAYS: usize = 8;

/// An EUI-48.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// A random locally administered unicast MAC (for browsers and privacy).
    pub fn random_local<R: rand::Rng>(rng: &mut R) -> Self {
        let mut b = [0u8; 6];
        rng.fill(&mut b);
        b[0] = (b[0] | 0x02) & !0x01;
        Mac(b)
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = WireError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let mut n = 0;
        for part in s.split([':', '-']) {
            let slot = out.get_mut(n).ok_or(WireError::Invalid("MAC"))?;
            if part.len() != 2 {
                return Err(WireError::Invalid("MAC"));
            }
            *slot = u8::from_str_radix(part, 16).map_err(|_| WireError::Invalid("MAC"))?;
            n += 1;
        }
        if n == 6 {
            Ok(Mac(out))
        } else {
            Err(WireError::Invalid("MAC"))
        }
    }
}

/// Why a RAWR message could not be decoded; maps to 400 or 420.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("missing attribute {0}")]
    Missing(&'static str),
    #[error("invalid attribute {0}")]
    Invalid(&'static str),
    #[error("unknown comprehension-required attributes {0:?}")]
    Unknown(Vec<u16>),
    #[error("STUN: {0}")]
    Stun(#[from] kyuu_stun::Error),
}

impl WireError {
    pub fn code(&self) -> u16 {
        match self {
            WireError::Unknown(_) => code::UNKNOWN_ATTRIBUTE,
            WireError::Missing(_) | WireError::Invalid(_) | WireError::Stun(_) => code::BAD_REQUEST,
        }
    }
}

/// Whether a node name is valid: 1..=63 bytes of `[a-z0-9.-]`.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= MAX_NAME
        && n.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
}

fn mac_attr(m: &Message<'_>, t: u16, name: &'static str) -> Result<Mac, WireError> {
    let v = m.get(t).ok_or(WireError::Missing(name))?;
    let arr: [u8; 6] = v.try_into().map_err(|_| WireError::Invalid(name))?;
    Ok(Mac(arr))
}

fn opt_mac_attr(m: &Message<'_>, t: u16, name: &'static str) -> Result<Option<Mac>, WireError> {
    match m.get(t) {
        None => Ok(None),
        Some(_) => mac_attr(m, t, name).map(Some),
    }
}

fn session_attr(m: &Message<'_>) -> Result<Vec<u8>, WireError> {
    let v = m.get(attr::SESSION).ok_or(WireError::Missing("SESSION"))?;
    if !(MIN_SESSION..=MAX_SESSION).contains(&v.len()) {
        return Err(WireError::Invalid("SESSION"));
    }
    Ok(v.to_vec())
}

fn text_list(m: &Message<'_>, t: u16, name: &'static str) -> Result<Vec<String>, WireError> {
    let mut out = Vec::new();
    for a in m.effective_attrs().filter(|a| a.attr_type == t) {
        if out.len() >= MAX_RELAYS {
            return Err(WireError::Invalid(name));
        }
        let s = sattr::decode_text(t, a.value, MAX_TEXT).map_err(|_| WireError::Invalid(name))?;
        out.push(s.to_owned());
    }
    Ok(out)
}

fn text(m: &Message<'_>, t: u16, name: &'static str) -> Result<Option<String>, WireError> {
    match m.get(t) {
        None => Ok(None),
        Some(v) => sattr::decode_text(t, v, MAX_TEXT)
            .map(|s| Some(s.to_owned()))
            .map_err(|_| WireError::Invalid(name)),
    }
}

/// Decodes PATH: length-prefixed names.
pub fn decode_path(v: &[u8]) -> Result<Vec<String>, WireError> {
    let mut out = Vec::new();
    let mut rest = v;
    while let Some((&len, tail)) = rest.split_first() {
        let len = usize::from(len);
        let name = tail.get(..len).ok_or(WireError::Invalid("PATH"))?;
        let name = std::str::from_utf8(name).map_err(|_| WireError::Invalid("PATH"))?;
        if !valid_name(name) || out.len() >= MAX_PATH {
            return Err(WireError::Invalid("PATH"));
        }
        out.push(name.to_owned());
        rest = tail.get(len..).unwrap_or(&[]);
    }
    Ok(out)
}

pub fn encode_path(path: &[String]) -> Vec<u8> {
    let mut v = Vec::new();
    for n in path {
        let b = n.as_bytes();
        let len = b.len().min(MAX_NAME);
        v.push(len as u8);
        v.extend_from_slice(&b[..len]);
    }
    v
}

fn path_attr(m: &Message<'_>) -> Result<Vec<String>, WireError> {
    match m.get(attr::PATH) {
        None => Ok(Vec::new()),
        Some(v) => decode_path(v),
    }
}

fn check_unknown(m: &Message<'_>) -> Result<(), WireError> {
    let unknown: Vec<u16> = m.unknown_required(attr::KNOWN).collect();
    if unknown.is_empty() {
        Ok(())
    } else {
        Err(WireError::Unknown(unknown))
    }
}

/// A decoded RAWR request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Exchange {
        session: Vec<u8>,
        mac: Mac,
        hosts: Vec<SocketAddr>,
    },
    Register {
        mac: Mac,
        lifetime: Option<u32>,
    },
    Connect(ConnectReq),
    Cancel {
        session: Vec<u8>,
        mac: Mac,
        /// `None`: the wildcard direction (a Connect sent without TARGET-MAC).
        target: Option<Mac>,
        /// Set when the Cancel is sent because the direction paired below: the relay handed to
        /// that side there, for the node to hand out again if the side comes back by another
        /// route (its answer was lost with a dead node; `docs/rawr.md` §4.4).
        relay: Option<Relay>,
    },
}

/// Connect's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectReq {
    pub session: Vec<u8>,
    pub mac: Mac,
    /// `None` (TARGET-MAC absent): "the other peer of this session, whichever MAC it has", so
    /// a peer can send Connect in parallel with Exchange (`docs/rawr.md` §4.3, wildcard).
    pub target: Option<Mac>,
    pub root: SocketAddr,
    pub hops: u8,
    pub path: Vec<String>,
}

impl Request {
    /// Decodes the attributes of a RAWR request (the caller checked class and method range).
    pub fn decode(m: &Message<'_>) -> Result<Request, WireError> {
        check_unknown(m)?;
        match m.method() {
            method::EXCHANGE => {
                let mut hosts = Vec::new();
                for a in m
                    .effective_attrs()
                    .filter(|a| a.attr_type == attr::HOST_ADDRESS)
                    .take(MAX_HOSTS)
                {
                    if let Ok(addr) = sattr::decode_address(attr::HOST_ADDRESS, a.value) {
                        hosts.push(addr);
                    }
                }
                Ok(Request::Exchange {
                    session: session_attr(m)?,
                    mac: mac_attr(m, attr::MAC, "MAC")?,
                    hosts,
                })
            }
            method::REGISTER => Ok(Request::Register {
                mac: mac_attr(m, attr::MAC, "MAC")?,
                lifetime: match m.u32_attr(sattr::LIFETIME) {
                    None => None,
                    Some(r) => Some(r.map_err(|_| WireError::Invalid("LIFETIME"))?),
                },
            }),
            method::CONNECT => {
                let hops = m.get(attr::HOPS).ok_or(WireError::Missing("HOPS"))?;
                let hops = match hops {
                    [h, 0, 0, 0] if *h <= MAX_HOPS => *h,
                    _ => return Err(WireError::Invalid("HOPS")),
                };
                let root = m
                    .address(attr::ROOT)
                    .ok_or(WireError::Missing("ROOT"))?
                    .map_err(|_| WireError::Invalid("ROOT"))?;
                Ok(Request::Connect(ConnectReq {
                    session: session_attr(m)?,
                    mac: mac_attr(m, attr::MAC, "MAC")?,
                    target: opt_mac_attr(m, attr::TARGET_MAC, "TARGET-MAC")?,
                    root,
                    hops,
                    path: path_attr(m)?,
                }))
            }
            method::CANCEL => Ok(Request::Cancel {
                session: session_attr(m)?,
                mac: mac_attr(m, attr::MAC, "MAC")?,
                target: opt_mac_attr(m, attr::TARGET_MAC, "TARGET-MAC")?,
                relay: if m.has(attr::RELAY) {
                    Some(Relay::decode(m)?)
                } else {
                    None
                },
            }),
            _ => Err(WireError::Invalid("method")),
        }
    }
}

/// What a meeting node hands each peer: its relay and credentials for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Relay {
    pub uris: Vec<String>,
    pub username: String,
    pub password: String,
    pub lifetime: u32,
    /// Node names from the peer's first node up to and including the meeting node.
    pub path: Vec<String>,
    /// Whether the meeting node was the session's root.
    pub at_root: bool,
}

impl Relay {
    pub fn meeting_node(&self) -> Option<&str> {
        self.path.last().map(String::as_str)
    }

    pub fn decode(m: &Message<'_>) -> Result<Relay, WireError> {
        let uris = text_list(m, attr::RELAY, "RELAY")?;
        if uris.is_empty() {
            return Err(WireError::Missing("RELAY"));
        }
        Ok(Relay {
            uris,
            username: text(m, attr::TURN_USERNAME, "TURN-USERNAME")?
                .ok_or(WireError::Missing("TURN-USERNAME"))?,
            password: text(m, attr::TURN_PASSWORD, "TURN-PASSWORD")?
                .ok_or(WireError::Missing("TURN-PASSWORD"))?,
            lifetime: m
                .u32_attr(sattr::LIFETIME)
                .ok_or(WireError::Missing("LIFETIME"))?
                .map_err(|_| WireError::Invalid("LIFETIME"))?,
            path: path_attr(m)?,
            at_root: m.has(attr::AT_ROOT),
        })
    }

    fn encode(&self, b: &mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error> {
        for u in self.uris.iter().take(MAX_RELAYS) {
            b.add(attr::RELAY, truncate(u).as_bytes())?;
        }
        b.add(attr::TURN_USERNAME, truncate(&self.username).as_bytes())?;
        b.add(attr::TURN_PASSWORD, truncate(&self.password).as_bytes())?;
        b.add_u32(sattr::LIFETIME, self.lifetime)?;
        b.add(attr::PATH, &encode_path(&self.path))?;
        if self.at_root {
            b.add(attr::AT_ROOT, &[])?;
        }
        Ok(())
    }
}

fn truncate(s: &str) -> &str {
    if s.len() <= MAX_TEXT {
        return s;
    }
    let mut end = MAX_TEXT;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Link authentication to add to an outgoing message.
#[derive(Debug, Clone)]
pub struct Auth<'a> {
    /// USERNAME to put on requests (the sender's node name); `None` on answers.
    pub username: Option<&'a str>,
    pub key: &'a Key,
}

/// Size of the scratch buffer used for RAWR messages.
pub const BUF: usize = 2048;

fn finish(mut b: MessageBuilder<'_>, auth: Option<&Auth<'_>>) -> Result<usize, kyuu_stun::Error> {
    if let Some(a) = auth {
        if let Some(u) = a.username {
            b.add(sattr::USERNAME, u.as_bytes())?;
        }
        b.add_integrity(a.key)?;
    }
    b.add_fingerprint()?;
    Ok(b.finish())
}

fn build(
    method: u16,
    class: Class,
    tid: TransactionId,
    auth: Option<&Auth<'_>>,
    f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
) -> Vec<u8> {
    let mut buf = vec![0u8; BUF];
    let n = (|| {
        let mut b = MessageBuilder::new(&mut buf, method, class, tid)?;
        f(&mut b)?;
        finish(b, auth)
    })();
    match n {
        Ok(n) => {
            buf.truncate(n);
            buf
        }
        // Only reachable with over-long values, which encoders truncate; send nothing useful.
        Err(_) => Vec::new(),
    }
}

pub fn encode_exchange(
    tid: TransactionId,
    session: &[u8],
    mac: Mac,
    hosts: &[SocketAddr],
) -> Vec<u8> {
    build(method::EXCHANGE, Class::Request, tid, None, |b| {
        b.add(attr::SESSION, session)?;
        b.add(attr::MAC, &mac.0)?;
        for h in hosts.iter().take(MAX_HOSTS) {
            b.add_address(attr::HOST_ADDRESS, *h)?;
        }
        Ok(())
    })
}

pub fn encode_exchange_answer(tid: TransactionId, other: Mac, hosts: &[SocketAddr]) -> Vec<u8> {
    build(method::EXCHANGE, Class::Success, tid, None, |b| {
        b.add(attr::MAC, &other.0)?;
        for h in hosts.iter().take(MAX_HOSTS) {
            b.add_address(attr::HOST_ADDRESS, *h)?;
        }
        Ok(())
    })
}

/// The other side's MAC and hosts from an Exchange answer.
pub fn decode_exchange_answer(m: &Message<'_>) -> Result<(Mac, Vec<SocketAddr>), WireError> {
    let mac = mac_attr(m, attr::MAC, "MAC")?;
    let hosts = m
        .effective_attrs()
        .filter(|a| a.attr_type == attr::HOST_ADDRESS)
        .take(MAX_HOSTS)
        .filter_map(|a| sattr::decode_address(attr::HOST_ADDRESS, a.value).ok())
        .collect();
    Ok((mac, hosts))
}

pub fn encode_register(tid: TransactionId, mac: Mac, lifetime: Option<u32>) -> Vec<u8> {
    build(method::REGISTER, Class::Request, tid, None, |b| {
        b.add(attr::MAC, &mac.0)?;
        if let Some(l) = lifetime {
            b.add_u32(sattr::LIFETIME, l)?;
        }
        Ok(())
    })
}

pub fn encode_register_answer(tid: TransactionId, lifetime: u32) -> Vec<u8> {
    build(method::REGISTER, Class::Success, tid, None, |b| {
        b.add_u32(sattr::LIFETIME, lifetime)
    })
}

pub fn encode_connect(tid: TransactionId, c: &ConnectReq, auth: Option<&Auth<'_>>) -> Vec<u8> {
    build(method::CONNECT, Class::Request, tid, auth, |b| {
        b.add(attr::SESSION, &c.session)?;
        b.add(attr::MAC, &c.mac.0)?;
        if let Some(t) = c.target {
            b.add(attr::TARGET_MAC, &t.0)?;
        }
        b.add_address(attr::ROOT, c.root)?;
        b.add(attr::HOPS, &[c.hops, 0, 0, 0])?;
        if !c.path.is_empty() {
            b.add(attr::PATH, &encode_path(&c.path))?;
        }
        Ok(())
    })
}

pub fn encode_connect_answer(tid: TransactionId, r: &Relay, auth: Option<&Auth<'_>>) -> Vec<u8> {
    build(method::CONNECT, Class::Success, tid, auth, |b| r.encode(b))
}

pub fn encode_cancel(
    tid: TransactionId,
    session: &[u8],
    mac: Mac,
    target: Option<Mac>,
    relay: Option<&Relay>,
    auth: Option<&Auth<'_>>,
) -> Vec<u8> {
    build(method::CANCEL, Class::Request, tid, auth, |b| {
        b.add(attr::SESSION, session)?;
        b.add(attr::MAC, &mac.0)?;
        if let Some(t) = target {
            b.add(attr::TARGET_MAC, &t.0)?;
        }
        match relay {
            Some(r) => r.encode(b),
            None => Ok(()),
        }
    })
}

/// An empty success answer (Cancel).
pub fn encode_ok(method: u16, tid: TransactionId, auth: Option<&Auth<'_>>) -> Vec<u8> {
    build(method, Class::Success, tid, auth, |_| Ok(()))
}

/// A pending indication: same method and transaction id, no attributes.
pub fn encode_pending(method: u16, tid: TransactionId) -> Vec<u8> {
    build(method, Class::Indication, tid, None, |_| Ok(()))
}

pub fn encode_error(
    method: u16,
    tid: TransactionId,
    code: u16,
    reason: &str,
    unknown: &[u16],
    auth: Option<&Auth<'_>>,
) -> Vec<u8> {
    build(method, Class::Error, tid, auth, |b| {
        let reason = if reason.is_empty() {
            code::reason(code)
        } else {
            truncate(reason)
        };
        b.add_error(code, reason)?;
        if !unknown.is_empty() {
            b.add_unknown_attributes(unknown)?;
        }
        Ok(())
    })
}

pub fn encode_binding_request(tid: TransactionId) -> Vec<u8> {
    build(
        kyuu_stun::method::BINDING,
        Class::Request,
        tid,
        None,
        |_| Ok(()),
    )
}

pub fn encode_binding_answer(tid: TransactionId, from: SocketAddr) -> Vec<u8> {
    build(kyuu_stun::method::BINDING, Class::Success, tid, None, |b| {
        b.add_xor_address(sattr::XOR_MAPPED_ADDRESS, from)
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn connect_round_trips() {
        let c = ConnectReq {
            session: vec![7; 16],
            mac: Mac([2, 0, 0, 0, 0, 1]),
            target: Some(Mac([2, 0, 0, 0, 0, 2])),
            root: "198.18.0.1:3478".parse().unwrap(),
            hops: 15,
            path: vec!["home1".into(), "isp".into()],
        };
        let bytes = encode_connect(TransactionId([1; 12]), &c, None);
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.method(), method::CONNECT);
        assert_eq!(Request::decode(&m).unwrap(), Request::Connect(c.clone()));
        // The wildcard form: no TARGET-MAC on the wire.
        let w = ConnectReq { target: None, ..c };
        let bytes = encode_connect(TransactionId([2; 12]), &w, None);
        let m = Message::parse(&bytes).unwrap();
        assert!(m.get(attr::TARGET_MAC).is_none());
        assert_eq!(Request::decode(&m).unwrap(), Request::Connect(w));
    }

    #[test]
    fn relay_round_trips_with_integrity() {
        let key = Key::short_term("k");
        let r = Relay {
            uris: vec!["turn:198.18.0.1:3478?transport=udp".into()],
            username: "1:rawr".into(),
            password: "pw".into(),
            lifetime: 60,
            path: vec!["a".into()],
            at_root: true,
        };
        let bytes = encode_connect_answer(
            TransactionId([1; 12]),
            &r,
            Some(&Auth {
                username: None,
                key: &key,
            }),
        );
        let m = Message::parse(&bytes).unwrap();
        m.verify_integrity(&key).unwrap();
        assert_eq!(Relay::decode(&m).unwrap(), r);
    }

    #[test]
    fn mac_parses() {
        let m: Mac = "02:aa:bb:cc:dd:0f".parse().unwrap();
        assert_eq!(m.to_string(), "02:aa:bb:cc:dd:0f");
        assert!("02:aa".parse::<Mac>().is_err());
        assert!("02:aa:bb:cc:dd:0f:11".parse::<Mac>().is_err());
    }

    #[test]
    fn bad_paths_are_rejected() {
        assert!(decode_path(&[5, b'a']).is_err());
        assert!(decode_path(&[1, b'A']).is_err());
        assert_eq!(decode_path(&[]).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn unknown_required_attribute_is_420() {
        let bytes = build(
            method::REGISTER,
            Class::Request,
            TransactionId([0; 12]),
            None,
            |b| {
                b.add(attr::MAC, &[2, 0, 0, 0, 0, 1])?;
                b.add(0x4CFF, &[1])
            },
        );
        let m = Message::parse(&bytes).unwrap();
        let e = Request::decode(&m).unwrap_err();
        assert_eq!(e.code(), 420);
    }
}
