//! STUN Binding ([RFC 8489 §6.3]) and NAT behaviour discovery ([RFC 5780 §6]): the answer's
//! XOR-MAPPED-ADDRESS, and with RFC 5780 enabled CHANGE-REQUEST (answer from the alternate IP
//! and/or port), RESPONSE-PORT (answer to another port of the client), RESPONSE-ORIGIN and
//! OTHER-ADDRESS.
//!
//! Extensions of Binding go here: classic STUN ([RFC 3489], no magic cookie) would be recognised
//! before [`Message::parse`] in `Server::handle_client` and answered by a sibling of
//! [`Server::binding`]; CHANGE-REQUEST without RFC 5780 (answered 420 today, since the attribute
//! is then unknown) is decided in [`known_binding`] and [`Server::binding`].
//!
//! [RFC 8489 §6.3]: https://www.rfc-editor.org/rfc/rfc8489#section-6.3
//! [RFC 5780 §6]: https://www.rfc-editor.org/rfc/rfc5780#section-6
//! [RFC 3489]: https://www.rfc-editor.org/rfc/rfc3489

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use kyuu_stun::{attr, method, Class, ErrorCode, Message};

use crate::server::metrics::Dropped;
use crate::server::Server;
use crate::types::ClientSocket;

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
/// CHANGE-REQUEST when RFC 5780 is on. Unknown comprehension-required ones get 420.
fn known_binding(rfc5780: bool, t: u16) -> bool {
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
    ) || (rfc5780 && t == attr::CHANGE_REQUEST)
}

impl Server {
    /// Binding request (RFC 8489 §6.3.1; RFC 5780 §6.1 for CHANGE-REQUEST and RESPONSE-PORT).
    /// Unauthenticated, so rate limited per source.
    pub(super) fn binding(&mut self, now: Instant, client: ClientSocket, msg: &Message<'_>) {
        if !self.limiter.allow(client.remote.ip(), now) {
            self.counters.drop(Dropped::RateLimited);
            return;
        }
        metrics::counter!("kyuu_stun_binding_requests_total", "transport" => client.transport.label())
            .increment(1);
        let rfc5780 = self.opts.rfc5780;
        let unknown =
            super::request::unknown_required(msg, |t| known_binding(rfc5780.is_some(), t));
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
        let response_port = match msg.get(attr::RESPONSE_PORT).map(attr::decode_response_port) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(_)) => {
                self.error(client, msg, ErrorCode::BAD_REQUEST, None);
                return;
            }
        };
        // CHANGE-REQUEST and RESPONSE-PORT only make sense over UDP (RFC 5780 §7.2, §7.5).
        if client.transport.is_stream()
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
        let resp = self.build(
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
}
