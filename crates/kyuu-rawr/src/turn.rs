//! A minimal TURN-over-UDP client (RFC 8656: Allocate with long-term credentials,
//! CreatePermission, Send and Data indications), enough for RAWR's lab tests, benchmark and
//! `kyuu lab` to push data through the relay a RAWR answer names. Real peers use their WebRTC
//! stack's TURN client.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use kyuu_stun::attr as sattr;
use kyuu_stun::integrity::Key;
use kyuu_stun::{method as smethod, Class, Message, MessageBuilder, TransactionId};
use tokio::net::UdpSocket;

/// Why a TURN operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer from TURN server {0}")]
    NoAnswer(SocketAddr),
    #[error("TURN server {server} answered {code} {reason}")]
    Rejected {
        server: SocketAddr,
        code: u16,
        reason: String,
    },
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
    #[error("bad TURN URI {0:?}")]
    Uri(String),
}

/// `turn:host:port?transport=udp` → address (IP literals only; the lab and RAWR nodes use them).
pub fn parse_turn_uri(uri: &str) -> Result<SocketAddr, TurnError> {
    let rest = uri
        .strip_prefix("turn:")
        .ok_or_else(|| TurnError::Uri(uri.into()))?;
    let hostport = rest.split('?').next().unwrap_or(rest);
    hostport
        .parse()
        .or_else(|_| format!("{hostport}:3478").parse())
        .map_err(|_| TurnError::Uri(uri.into()))
}

/// An allocation on a TURN server, over `sock`.
#[derive(Debug)]
pub struct Allocation {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub relayed: SocketAddr,
    pub mapped: Option<SocketAddr>,
    username: String,
    realm: String,
    nonce: Vec<u8>,
    key: Key,
}

fn tid() -> TransactionId {
    TransactionId(rand::random())
}

fn build(
    method: u16,
    class: Class,
    t: TransactionId,
    f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
) -> Result<Vec<u8>, TurnError> {
    let mut buf = vec![0u8; 1600];
    let mut b = MessageBuilder::new(&mut buf, method, class, t)
        .map_err(|_| TurnError::Malformed("buffer"))?;
    f(&mut b).map_err(|_| TurnError::Malformed("encode"))?;
    let n = b.finish();
    buf.truncate(n);
    Ok(buf)
}

/// Sends `req` and waits for the answer with its transaction id, retransmitting.
async fn transact(
    sock: &UdpSocket,
    server: SocketAddr,
    req: &[u8],
    t: TransactionId,
) -> Result<Vec<u8>, TurnError> {
    let mut buf = vec![0u8; 2048];
    let mut rto = Duration::from_millis(300);
    for _ in 0..5 {
        sock.send_to(req, server).await?;
        let deadline = tokio::time::Instant::now() + rto;
        loop {
            let r = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await;
            let Ok(r) = r else { break };
            let (n, from) = r?;
            let data = buf.get(..n).unwrap_or(&[]);
            if from != server {
                continue;
            }
            if let Ok(m) = Message::parse(data) {
                if *m.transaction_id() == t && m.class() != Class::Indication {
                    return Ok(data.to_vec());
                }
            }
        }
        rto *= 2;
    }
    Err(TurnError::NoAnswer(server))
}

fn rejected(server: SocketAddr, m: &Message<'_>) -> TurnError {
    match m.error_code() {
        Some(Ok(e)) => TurnError::Rejected {
            server,
            code: e.code,
            reason: e.reason.to_owned(),
        },
        _ => TurnError::Malformed("error without ERROR-CODE"),
    }
}

impl Allocation {
    /// Allocates a UDP relay at `server` with long-term credentials.
    pub async fn new(
        sock: UdpSocket,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) -> Result<Allocation, TurnError> {
        let t = tid();
        let req = build(smethod::ALLOCATE, Class::Request, t, |b| {
            b.add_requested_transport(sattr::TRANSPORT_UDP)
        })?;
        let ans = transact(&sock, server, &req, t).await?;
        let m = Message::parse(&ans).map_err(|_| TurnError::Malformed("answer"))?;
        let realm = match m.realm() {
            Some(Ok(r)) => r.to_owned(),
            _ => return Err(rejected(server, &m)),
        };
        let nonce = m.nonce().ok_or(TurnError::Malformed("no NONCE"))?.to_vec();
        let key = Key::long_term_md5(username, &realm, password);
        let t = tid();
        let req = build(smethod::ALLOCATE, Class::Request, t, |b| {
            b.add_requested_transport(sattr::TRANSPORT_UDP)?;
            b.add_u32(sattr::LIFETIME, 600)?;
            b.add(sattr::USERNAME, username.as_bytes())?;
            b.add(sattr::REALM, realm.as_bytes())?;
            b.add(sattr::NONCE, &nonce)?;
            b.add_integrity(&key)
        })?;
        let ans = transact(&sock, server, &req, t).await?;
        let m = Message::parse(&ans).map_err(|_| TurnError::Malformed("answer"))?;
        if m.class() != Class::Success {
            return Err(rejected(server, &m));
        }
        let relayed = m
            .xor_address(sattr::XOR_RELAYED_ADDRESS)
            .ok_or(TurnError::Malformed("no XOR-RELAYED-ADDRESS"))?
            .map_err(|_| TurnError::Malformed("XOR-RELAYED-ADDRESS"))?;
        let mapped = m
            .xor_address(sattr::XOR_MAPPED_ADDRESS)
            .and_then(Result::ok);
        Ok(Allocation {
            sock,
            server,
            relayed,
            mapped,
            username: username.to_owned(),
            realm,
            nonce,
            key,
        })
    }

    /// Installs a permission for `peer`.
    pub async fn permit(&mut self, peer: IpAddr) -> Result<(), TurnError> {
        let t = tid();
        let (user, realm, nonce, key) = (&self.username, &self.realm, &self.nonce, &self.key);
        let req = build(smethod::CREATE_PERMISSION, Class::Request, t, |b| {
            b.add_xor_address(sattr::XOR_PEER_ADDRESS, SocketAddr::new(peer, 0))?;
            b.add(sattr::USERNAME, user.as_bytes())?;
            b.add(sattr::REALM, realm.as_bytes())?;
            b.add(sattr::NONCE, nonce)?;
            b.add_integrity(key)
        })?;
        let ans = transact(&self.sock, self.server, &req, t).await?;
        let m = Message::parse(&ans).map_err(|_| TurnError::Malformed("answer"))?;
        if m.class() != Class::Success {
            return Err(rejected(self.server, &m));
        }
        Ok(())
    }

    /// Sends `data` to `peer` through the relay (Send indication).
    pub async fn send_to(&self, data: &[u8], peer: SocketAddr) -> Result<(), TurnError> {
        let req = build(smethod::SEND, Class::Indication, tid(), |b| {
            b.add_xor_address(sattr::XOR_PEER_ADDRESS, peer)?;
            b.add(sattr::DATA, data)
        })?;
        self.sock.send_to(&req, self.server).await?;
        Ok(())
    }

    /// Receives the next Data indication: `(peer, data)`.
    pub async fn recv_from(&self) -> Result<(SocketAddr, Vec<u8>), TurnError> {
        let mut buf = vec![0u8; 2048];
        for _ in 0..10_000 {
            let (n, from) = self.sock.recv_from(&mut buf).await?;
            if from != self.server {
                continue;
            }
            let Ok(m) = Message::parse(buf.get(..n).unwrap_or(&[])) else {
                continue;
            };
            if m.method() != smethod::DATA || m.class() != Class::Indication {
                continue;
            }
            let (Some(Ok(peer)), Some(data)) =
                (m.xor_address(sattr::XOR_PEER_ADDRESS), m.get(sattr::DATA))
            else {
                continue;
            };
            return Ok((peer, data.to_vec()));
        }
        Err(TurnError::Malformed("no Data indication"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_turn_uris() {
        assert_eq!(
            parse_turn_uri("turn:198.18.0.1:3478?transport=udp").unwrap(),
            "198.18.0.1:3478".parse().unwrap()
        );
        assert_eq!(
            parse_turn_uri("turn:198.18.0.1").unwrap(),
            "198.18.0.1:3478".parse().unwrap()
        );
        assert!(parse_turn_uri("stun:x").is_err());
    }
}
