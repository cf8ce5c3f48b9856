//! PROXY protocol version 2 ([HAProxy's specification], §2.2): a load balancer in front of kyuu
//! prefixes each TCP/TLS connection (once, before any TLS) or each UDP datagram (the `DGRAM`
//! form) with a binary header naming the real client's address, so TURN authentication nonces,
//! quotas and XOR-MAPPED-ADDRESS see the client and not the balancer.
//!
//! Enabled per listener (`[[listen.proxy_protocol]]`) and only accepted from `trusted`
//! networks: anything else reaching such a listener is dropped and counted in
//! `kyuu_proxy_protocol_refused_total{transport,reason}`. Behind a UDP balancer, answers go back
//! to the balancer's address (which maps them to the client), so the shell remembers which
//! balancer address each real client came through.
//!
//! [HAProxy's specification]: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use kyuu_turn::ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// The 12-byte v2 signature (§2.2).
pub const SIGNATURE: [u8; 12] = [
    0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
];
/// Signature, version/command, family/protocol and length.
pub const HEADER_LEN: usize = 16;
/// `\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A` + ver/cmd + fam + len: the longest header
/// kyuu accepts (addresses plus TLVs), far above what balancers send.
pub const MAX_LEN: usize = HEADER_LEN + 1024;

const CMD_LOCAL: u8 = 0x0;
const CMD_PROXY: u8 = 0x1;
const AF_UNSPEC: u8 = 0x0;
const AF_INET: u8 = 0x1;
const AF_INET6: u8 = 0x2;
const AF_UNIX: u8 = 0x3;
const PROTO_STREAM: u8 = 0x1;
const PROTO_DGRAM: u8 = 0x2;
/// Address block sizes for INET and INET6 (§2.2: src, dst, src port, dst port).
const INET_LEN: usize = 12;
const INET6_LEN: usize = 36;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client's address and the address it connected to; `None` for `LOCAL` (a health check
    /// by the balancer itself) or an unspecified/unix family.
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// `STREAM` (TCP) or `DGRAM` (UDP); `None` when unspecified.
    pub dgram: Option<bool>,
    /// Bytes the header took, TLVs included.
    pub len: usize,
}

impl Header {
    /// The real client address, if the header carries one.
    pub fn source(&self) -> Option<SocketAddr> {
        self.addrs.map(|(s, _)| s)
    }
}

/// Why a header was refused; the `reason` label of the refusal metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no PROXY v2 signature")]
    NoSignature,
    #[error("PROXY version {0} (only 2)")]
    Version(u8),
    #[error("unknown PROXY command {0}")]
    Command(u8),
    #[error("PROXY address block too short for its family")]
    Truncated,
    #[error("PROXY header longer than {MAX_LEN} bytes")]
    TooLong,
}

impl ProxyError {
    pub fn label(self) -> &'static str {
        match self {
            ProxyError::NoSignature => "no_header",
            ProxyError::Version(_) | ProxyError::Command(_) => "bad_header",
            ProxyError::Truncated | ProxyError::TooLong => "bad_header",
        }
    }
}

/// Parses a header at the start of `buf`. `Ok(None)`: more bytes are needed (a stream that has
/// not sent the whole header yet; for a datagram that means it is malformed).
pub fn parse(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let have = buf.len().min(SIGNATURE.len());
    if buf.get(..have) != SIGNATURE.get(..have) {
        return Err(ProxyError::NoSignature);
    }
    let Some(fixed) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let ver_cmd = fixed[12];
    let fam = fixed[13];
    let body_len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Version(ver_cmd >> 4));
    }
    let cmd = ver_cmd & 0x0F;
    if cmd != CMD_LOCAL && cmd != CMD_PROXY {
        return Err(ProxyError::Command(cmd));
    }
    let len = HEADER_LEN + body_len;
    if len > MAX_LEN {
        return Err(ProxyError::TooLong);
    }
    let Some(body) = buf.get(HEADER_LEN..len) else {
        return Ok(None);
    };
    let dgram = match fam & 0x0F {
        PROTO_STREAM => Some(false),
        PROTO_DGRAM => Some(true),
        _ => None,
    };
    let addrs = match (cmd, fam >> 4) {
        (CMD_PROXY, AF_INET) => {
            let a = body.get(..INET_LEN).ok_or(ProxyError::Truncated)?;
            let ip = |o: usize| IpAddr::V4(Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]));
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(8)),
                SocketAddr::new(ip(4), port(10)),
            ))
        }
        (CMD_PROXY, AF_INET6) => {
            let a = body.get(..INET6_LEN).ok_or(ProxyError::Truncated)?;
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                IpAddr::V6(Ipv6Addr::from(b))
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Some((
                SocketAddr::new(ip(0), port(32)),
                SocketAddr::new(ip(16), port(34)),
            ))
        }
        // LOCAL, UNSPEC and UNIX: no usable client address; the connection's own is used.
        (_, AF_UNSPEC | AF_UNIX) | (CMD_LOCAL, _) => None,
        (_, _) => None,
    };
    Ok(Some(Header { addrs, dgram, len }))
}

/// Builds a v2 `PROXY` header (tests and tools).
pub fn encode(src: SocketAddr, dst: SocketAddr, dgram: bool) -> Vec<u8> {
    let mut v = SIGNATURE.to_vec();
    v.push(0x20 | CMD_PROXY);
    let proto = if dgram { PROTO_DGRAM } else { PROTO_STREAM };
    match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V4(d)) => {
            v.push(AF_INET << 4 | proto);
            v.extend_from_slice(&(INET_LEN as u16).to_be_bytes());
            v.extend_from_slice(&s.ip().octets());
            v.extend_from_slice(&d.ip().octets());
        }
        (s, d) => {
            let six = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                IpAddr::V6(v6) => v6.octets(),
            };
            v.push(AF_INET6 << 4 | proto);
            v.extend_from_slice(&(INET6_LEN as u16).to_be_bytes());
            v.extend_from_slice(&six(s));
            v.extend_from_slice(&six(d));
        }
    }
    v.extend_from_slice(&src.port().to_be_bytes());
    v.extend_from_slice(&dst.port().to_be_bytes());
    v
}

/// One `[[listen.proxy_protocol]]` entry: a listener that expects PROXY v2 headers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyListener {
    /// `udp`, `tcp` or `tls`.
    pub transport: String,
    /// The listener's address, as in `listen.udp`/`tcp`/`tls`.
    pub listen: SocketAddr,
    /// Networks of the balancers allowed to send headers (CIDR); required.
    pub trusted: Vec<IpNet>,
}

/// Checks `[[listen.proxy_protocol]]` against the listeners; errors name the key.
pub fn validate(
    rules: &[ProxyListener],
    udp: &[SocketAddr],
    tcp: &[SocketAddr],
    tls: &[SocketAddr],
) -> Result<(), String> {
    for (i, r) in rules.iter().enumerate() {
        let key = format!("listen.proxy_protocol[{i}]");
        let list = match r.transport.as_str() {
            "udp" => udp,
            "tcp" => tcp,
            "tls" => tls,
            other => return Err(format!("{key}.transport: {other:?} is not udp, tcp or tls")),
        };
        if !list.contains(&r.listen) {
            return Err(format!(
                "{key}.listen: {} is not a listen.{} address",
                r.listen, r.transport
            ));
        }
        if r.trusted.is_empty() {
            return Err(format!(
                "{key}.trusted: list the balancers' networks (a PROXY header from anyone else \
                 would let them pose as any client)"
            ));
        }
    }
    Ok(())
}

/// The rules of one listener, looked up by its bound address.
#[derive(Debug, Clone, Default)]
pub struct Rules(Vec<(&'static str, SocketAddr, Vec<IpNet>)>);

impl Rules {
    pub fn new(rules: &[ProxyListener]) -> Rules {
        Rules(
            rules
                .iter()
                .map(|r| {
                    let t = match r.transport.as_str() {
                        "udp" => "udp",
                        "tls" => "tls",
                        _ => "tcp",
                    };
                    (t, r.listen, r.trusted.clone())
                })
                .collect(),
        )
    }

    /// Port 0 was resolved at start: replace configured addresses by the bound ones.
    pub fn resolve(&mut self, transport: &str, configured: SocketAddr, bound: SocketAddr) {
        for (t, a, _) in &mut self.0 {
            if *t == transport && *a == configured {
                *a = bound;
            }
        }
    }

    /// The trusted networks of the `transport` listener bound at `local`, when it expects
    /// PROXY headers.
    pub fn trusted(&self, transport: &str, local: SocketAddr) -> Option<&[IpNet]> {
        self.0
            .iter()
            .find(|(t, a, _)| *t == transport && *a == local)
            .map(|(_, _, n)| n.as_slice())
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Whether `ip` is in one of `nets` (IPv4-mapped IPv6 addresses count as IPv4).
pub fn trusted(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    nets.iter().any(|n| n.contains(&ip))
}

/// How long a connection may take to send its PROXY header.
const STREAM_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a PROXY v2 header from the start of a connection, exactly (nothing after it is
/// consumed, so TLS, STUN framing or HTTP starts right behind it). Returns the real client
/// address, or `remote` for LOCAL; `None` when refused (counted under `transport`).
pub async fn read_stream_header<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    transport: &'static str,
    remote: SocketAddr,
) -> Option<SocketAddr> {
    use tokio::io::AsyncReadExt as _;
    let read = async {
        let mut head = [0u8; HEADER_LEN];
        stream.read_exact(&mut head).await.ok()?;
        let body_len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        let mut whole = head.to_vec();
        if HEADER_LEN + body_len <= MAX_LEN {
            whole.resize(HEADER_LEN + body_len, 0);
            stream.read_exact(whole.get_mut(HEADER_LEN..)?).await.ok()?;
        }
        Some(parse(&whole))
    };
    match tokio::time::timeout(STREAM_HEADER_TIMEOUT, read).await {
        Ok(Some(Ok(Some(h)))) => Some(h.source().unwrap_or(remote)),
        Ok(Some(Err(e))) => {
            refused(transport, e.label());
            None
        }
        Ok(Some(Ok(None))) | Ok(None) | Err(_) => {
            refused(transport, "bad_header");
            None
        }
    }
}

/// Counts a refused connection or datagram.
pub fn refused(transport: &'static str, reason: &'static str) {
    metrics::counter!("kyuu_proxy_protocol_refused_total", "transport" => transport, "reason" => reason)
        .increment(1);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A header written out by hand, field by field.
    #[test]
    fn parses_hand_made_ipv4_stream_header() {
        let h: &[u8] = &[
            // signature
            0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A,
            0x21, // version 2, command PROXY
            0x11, // AF_INET, STREAM
            0x00, 0x0C, // 12 bytes of addresses follow
            203, 0, 113, 7, // source 203.0.113.7
            192, 0, 2, 1, // destination 192.0.2.1
            0xC3, 0x50, // source port 50000
            0x0D, 0x96, // destination port 3478
            0x00, 0x01, // (payload after the header)
        ];
        let p = parse(h).unwrap().unwrap();
        assert_eq!(p.len, 28);
        assert_eq!(p.dgram, Some(false));
        assert_eq!(
            p.addrs,
            Some((
                "203.0.113.7:50000".parse().unwrap(),
                "192.0.2.1:3478".parse().unwrap()
            ))
        );
        // Every prefix of a header is "need more", never an error or a panic.
        for n in 0..28 {
            assert_eq!(parse(&h[..n]), Ok(None), "prefix {n}");
        }
    }

    #[test]
    fn parses_ipv6_dgram_local_and_tlvs() {
        let src: SocketAddr = "[2001:db8::7]:40000".parse().unwrap();
        let dst: SocketAddr = "[2001:db8::1]:3478".parse().unwrap();
        let h = encode(src, dst, true);
        assert_eq!(h.len(), 16 + 36);
        let p = parse(&h).unwrap().unwrap();
        assert_eq!((p.addrs, p.dgram), (Some((src, dst)), Some(true)));

        // LOCAL (0x20) with UNSPEC family and a 3-byte TLV: no address, length counted.
        let mut l = SIGNATURE.to_vec();
        l.extend_from_slice(&[0x20, 0x00, 0x00, 0x03, 0x04, 0x00, 0x00]);
        let p = parse(&l).unwrap().unwrap();
        assert_eq!((p.addrs, p.len), (None, 19));
    }

    #[test]
    fn refuses_bad_headers() {
        assert_eq!(parse(b"GET / HTTP/1.1"), Err(ProxyError::NoSignature));
        // PROXY v1 text form is not accepted.
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Err(ProxyError::NoSignature));
        let mut v1 = SIGNATURE.to_vec();
        v1.extend_from_slice(&[0x11, 0x11, 0x00, 0x0C]);
        assert_eq!(parse(&v1), Err(ProxyError::Version(1)));
        let mut cmd = SIGNATURE.to_vec();
        cmd.extend_from_slice(&[0x2F, 0x11, 0x00, 0x0C]);
        assert_eq!(parse(&cmd), Err(ProxyError::Command(0xF)));
        // INET with a 4-byte address block.
        let mut short = SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0x00, 0x04, 1, 2, 3, 4]);
        assert_eq!(parse(&short), Err(ProxyError::Truncated));
        let mut long = SIGNATURE.to_vec();
        long.extend_from_slice(&[0x21, 0x11, 0xFF, 0xFF]);
        assert_eq!(parse(&long), Err(ProxyError::TooLong));
    }

    proptest::proptest! {
        /// Any bytes, and any bytes behind a valid signature: an answer, never a panic; a
        /// parsed header never claims more bytes than it was given.
        #[test]
        fn parse_never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..80), signed: bool) {
            let mut buf = if signed { SIGNATURE.to_vec() } else { Vec::new() };
            buf.extend_from_slice(&tail);
            if let Ok(Some(h)) = parse(&buf) {
                proptest::prop_assert!(h.len <= buf.len());
            }
        }

        #[test]
        fn encode_parse_round_trip(a: [u8; 4], b: [u8; 16], p: u16, q: u16, dgram: bool, six: bool) {
            let src = if six {
                SocketAddr::new(IpAddr::V6(Ipv6Addr::from(b)), p)
            } else {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)
            };
            let dst = SocketAddr::new(src.ip(), q);
            let h = encode(src, dst, dgram);
            let parsed = parse(&h).unwrap().unwrap();
            proptest::prop_assert_eq!(parsed.addrs, Some((src, dst)));
            proptest::prop_assert_eq!(parsed.dgram, Some(dgram));
            proptest::prop_assert_eq!(parsed.len, h.len());
        }
    }

    #[test]
    fn trust_and_validation() {
        let nets: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert!(trusted(&nets, "10.1.2.3".parse().unwrap()));
        assert!(trusted(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(!trusted(&nets, "192.0.2.1".parse().unwrap()));
        let tcp: SocketAddr = "0.0.0.0:3478".parse().unwrap();
        let mut r = vec![ProxyListener {
            transport: "tcp".into(),
            listen: tcp,
            trusted: vec![],
        }];
        let e = validate(&r, &[], &[tcp], &[]).unwrap_err();
        assert!(e.starts_with("listen.proxy_protocol[0].trusted"), "{e}");
        r[0].trusted = nets;
        validate(&r, &[], &[tcp], &[]).unwrap();
        let e = validate(&r, &[tcp], &[], &[]).unwrap_err();
        assert!(e.starts_with("listen.proxy_protocol[0].listen"), "{e}");
        r[0].transport = "sctp".into();
        assert!(validate(&r, &[], &[tcp], &[]).is_err());
    }
}
