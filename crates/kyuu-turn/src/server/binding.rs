//! STUN Binding ([RFC 8489 §6.3]) and NAT behaviour discovery ([RFC 5780 §6]): the answer's
//! XOR-MAPPED-ADDRESS, and with RFC 5780 enabled CHANGE-REQUEST (answer from the alternate IP
//! and/or port), RESPONSE-PORT (answer to another port of the client), RESPONSE-ORIGIN and
//! OTHER-ADDRESS.
//!
//! Classic STUN ([RFC 3489], no magic cookie) is recognised in `Server::handle_client` when
//! [`Message::parse`] refuses a packet, and answered by [`Server::classic_binding`] as RFC 8489
//! §11 says: MAPPED-ADDRESS, the request's bytes 4..8 copied back.
//!
//! CHANGE-REQUEST is always understood. With no flags set it asks for nothing, so it is a plain
//! Binding whether or not RFC 5780 is on (several clients always send it). With a flag set and
//! RFC 5780 off the server has no alternate address: RFC 5780 §6.1 / §7.2 — a server without
//! one treats the attribute as unsupported — so the answer is 420 with UNKNOWN-ATTRIBUTES
//! listing CHANGE-REQUEST, exactly what an RFC 8489-only server answers.
//!
//! [RFC 8489 §6.3]: https://www.rfc-editor.org/rfc/rfc8489#section-6.3
//! [RFC 5780 §6]: https://www.rfc-editor.org/rfc/rfc5780#section-6
//! [RFC 3489]: https://www.rfc-editor.org/rfc/rfc3489

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use kyuu_stun::{attr, method, Class, ErrorCode, Message};

use crate::server::metrics::Dropped;
use crate::server::Server;
use crate::types::{ClientSocket, Transport};

/// RFC 5780 addresses: with both an alternate IP and an alternate port the server answers
/// CHANGE-REQUEST and includes OTHER-ADDRESS and RESPONSE-ORIGIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rfc5780 {
    pub primary_ip: IpAddr,
    pub alternate_ip: IpAddr,
    pub primary_port: u16,
    pub alternate_port: u16,
}

impl Rfc5780 {
    fn swap_ip(&self, ip: IpAddr) -> IpAddr {
        if ip == self.primary_ip {
            self.alternate_ip
        } else {
            self.primary_ip
        }
    }

    fn swap_port(&self, port: u16) -> u16 {
        if port == self.primary_port {
            self.alternate_port
        } else {
            self.primary_port
        }
    }

    /// OTHER-ADDRESS for a request that arrived at `local`: both IP and port changed.
    fn other(&self, local: SocketAddr) -> SocketAddr {
        SocketAddr::new(self.swap_ip(local.ip()), self.swap_port(local.port()))
    }
}

/// Attributes a Binding request may carry: those of RFC 8489, ICE's (RFC 8445 §16.1), and
/// CHANGE-REQUEST (whose flags need RFC 5780: see [`change_unsupported`]). Unknown
/// comprehension-required ones get 420.
fn known_binding(t: u16) -> bool {
    matches!(
        t,
        attr::USERNAME
            | attr::MESSAGE_INTEGRITY
            | attr::MESSAGE_INTEGRITY_SHA256
            | attr::USERHASH
            | attr::REALM
            | attr::NONCE
            | attr::PRIORITY
            | attr::USE_CANDIDATE
            | attr::RESPONSE_PORT
            | attr::PADDING
            | attr::PASSWORD_ALGORITHM
            | attr::XOR_MAPPED_ADDRESS
            | attr::MAPPED_ADDRESS
            | attr::CHANGE_REQUEST
    )
}

/// A CHANGE-REQUEST with a flag set cannot be honoured without RFC 5780's alternate address.
fn change_unsupported(rfc5780: bool, change: u32) -> bool {
    !rfc5780 && change & (attr::CHANGE_IP | attr::CHANGE_PORT) != 0
}

impl Server {
    /// Binding request (RFC 8489 §6.3.1; RFC 5780 §6.1 for CHANGE-REQUEST and RESPONSE-PORT).
    /// Unauthenticated, so rate limited per source.
    pub(super) fn binding(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        if !self.limiter.allow(client.remote.ip(), now) {
            self.counters.drop(Dropped::RateLimited);
            return;
        }
        self.counters.binding(client.transport);
        let rfc5780 = self.opts.rfc5780;
        let unknown = super::request::unknown_required(msg, known_binding);
        if !unknown.is_empty() {
            self.unknown_attributes(client, msg, &unknown, None);
            return;
        }
        let change = match msg.u32_attr(attr::CHANGE_REQUEST) {
            None => 0,
            Some(Ok(v)) => v,
            Some(Err(_)) => {
                self.error(client, msg, ErrorCode::BAD_REQUEST, None);
                return;
            }
        };
        if change_unsupported(rfc5780.is_some(), change) {
            self.unknown_attributes(client, msg, &[attr::CHANGE_REQUEST], None);
            return;
        }
        let response_port = match msg.get(attr::RESPONSE_PORT).map(attr::decode_response_port) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                self.error(client, msg, ErrorCode::BAD_REQUEST, None);
                return;
            }
        };
        // CHANGE-REQUEST and RESPONSE-PORT only make sense over plain UDP (RFC 5780 §7.2, §7.5;
        // over DTLS an answer from another address or port has no association to travel in).
        if client.transport != Transport::Udp
            && (change & (attr::CHANGE_IP | attr::CHANGE_PORT) != 0 || response_port.is_some())
        {
            self.error(client, msg, ErrorCode::BAD_REQUEST, None);
            return;
        }
        let mut from = client.local;
        if let Some(r) = rfc5780 {
            if change & attr::CHANGE_IP != 0 {
                from.set_ip(r.swap_ip(from.ip()));
            }
            if change & attr::CHANGE_PORT != 0 {
                from.set_port(r.swap_port(from.port()));
            }
        }
        let mut to = client.remote;
        if let Some(p) = response_port {
            to.set_port(p);
        }
        let mapped = client.remote;
        // Header, XOR-MAPPED-ADDRESS, RESPONSE-ORIGIN and OTHER-ADDRESS (IPv6 at most),
        // SOFTWARE and FINGERPRINT.
        let max = 20 + 3 * 24 + 4 + self.cfg.software.len() + 3 + 8;
        let resp = self.build_sized(
            max,
            method::BINDING,
            Class::Success,
            *msg.transaction_id(),
            None,
            |b| {
                b.add_xor_address(attr::XOR_MAPPED_ADDRESS, mapped)?;
                if let Some(r) = rfc5780 {
                    b.add_address(attr::RESPONSE_ORIGIN, from)?;
                    b.add_address(attr::OTHER_ADDRESS, r.other(client.local))?;
                }
                Ok(())
            },
        );
        let answer_to = ClientSocket {
            transport: client.transport,
            local: from,
            remote: to,
        };
        self.send(answer_to, resp);
    }

    /// An RFC 3489 Binding request (RFC 8489 §11): MAPPED-ADDRESS with the client's 128-bit
    /// transaction id; with RFC 5780 on also SOURCE-ADDRESS and CHANGED-ADDRESS, and
    /// CHANGE-REQUEST honoured over UDP (RFC 3489 §8.2). RESPONSE-ADDRESS and other
    /// comprehension-required attributes get 420 (RFC 8489 §11 allows it; it also refuses
    /// reflection to third parties).
    pub(super) fn classic_binding(
        &mut self,
        now: Instant,
        client: ClientSocket,
        req: &kyuu_stun::ClassicRequest<'_>,
    ) {
        if !self.limiter.allow(client.remote.ip(), now) {
            self.counters.drop(Dropped::RateLimited);
            return;
        }
        self.counters.binding(client.transport);
        let tid = req.transaction_id();
        let mut buf = vec![0u8; 128];
        let unknown = req.unknown_required(|t| t == attr::CHANGE_REQUEST);
        let change = match req.change_request() {
            None => Ok(0),
            Some(Ok(v)) => Ok(v),
            Some(Err(_)) => Err(ErrorCode::BAD_REQUEST.code()),
        };
        let rfc5780 = self.opts.rfc5780;
        let built = match change {
            _ if !unknown.is_empty() => kyuu_stun::build_classic_error(
                &mut buf,
                tid,
                ErrorCode::UNKNOWN_ATTRIBUTE.code(),
                &unknown,
            )
            .map(|n| (n, client)),
            Err(code) => {
                kyuu_stun::build_classic_error(&mut buf, tid, code, &[]).map(|n| (n, client))
            }
            Ok(change) if change_unsupported(rfc5780.is_some(), change) => {
                kyuu_stun::build_classic_error(
                    &mut buf,
                    tid,
                    ErrorCode::UNKNOWN_ATTRIBUTE.code(),
                    &[attr::CHANGE_REQUEST],
                )
                .map(|n| (n, client))
            }
            Ok(change)
                if client.transport != Transport::Udp
                    && change & (attr::CHANGE_IP | attr::CHANGE_PORT) != 0 =>
            {
                kyuu_stun::build_classic_error(&mut buf, tid, ErrorCode::BAD_REQUEST.code(), &[])
                    .map(|n| (n, client))
            }
            Ok(change) => {
                let mut from = client.local;
                if let Some(r) = rfc5780 {
                    if change & attr::CHANGE_IP != 0 {
                        from.set_ip(r.swap_ip(from.ip()));
                    }
                    if change & attr::CHANGE_PORT != 0 {
                        from.set_port(r.swap_port(from.port()));
                    }
                }
                let (source, changed) = match rfc5780 {
                    Some(r) => (Some(from), Some(r.other(client.local))),
                    None => (None, None),
                };
                kyuu_stun::build_classic_success(&mut buf, tid, client.remote, source, changed).map(
                    |n| {
                        (
                            n,
                            ClientSocket {
                                transport: client.transport,
                                local: from,
                                remote: client.remote,
                            },
                        )
                    },
                )
            }
        };
        if let Ok((n, to)) = built {
            buf.truncate(n);
            self.send(to, Some(buf));
        }
    }
}
