//! ICMP errors for relayed datagrams, passed on to the client ([RFC 8656 §11.5]): the shell reads
//! an error the kernel queued on a relay socket (Linux `IP_RECVERR`/`IPV6_RECVERR`) and hands it
//! here; the core checks it the way §11.5 says and writes a Data indication carrying
//! XOR-PEER-ADDRESS and the ICMP attribute ([RFC 8656 §18.13], [`kyuu_stun::attr::Icmp`]).
//!
//! The checks, in §11.5's order: an ICMPv4 type 3 or 11, or an ICMPv6 type 1, 2 or 3 (anything
//! else is dropped); an allocation owns the relay socket the datagram left from (the shell's
//! socket *is* the encapsulated packet's source address and port); a permission exists for the
//! encapsulated packet's *destination* address (the peer, not the ICMP's sender, and only the
//! address is compared). The peer's port is known on Linux (the error queue gives the original
//! destination), so XOR-PEER-ADDRESS carries it rather than 0.
//!
//! [RFC 8656 §11.5]: https://www.rfc-editor.org/rfc/rfc8656#section-11.5
//! [RFC 8656 §18.13]: https://www.rfc-editor.org/rfc/rfc8656#section-18.13

use std::net::SocketAddr;
use std::time::Instant;

use kyuu_stun::attr::{self, Icmp};
use kyuu_stun::{method, Class, MessageBuilder};

use crate::server::metrics::Dropped;
use crate::server::Server;
use crate::types::{Family, RelayKey, ToClient};

/// An ICMP error as the kernel reported it for a datagram sent from a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerIcmp {
    /// The destination of the datagram the error is about (the peer).
    pub peer: SocketAddr,
    pub icmp_type: u8,
    pub code: u8,
    /// The kernel's extra information: the next-hop MTU for "fragmentation needed" / "packet too
    /// big", otherwise unused.
    pub info: u32,
}

/// Room a Data indication with XOR-PEER-ADDRESS (IPv6) and ICMP needs.
pub const ICMP_INDICATION_MAX: usize = 20 + 4 + 20 + 4 + 8;

/// Whether §11.5 lets this ICMP type through, and the Error Data §18.13 asks for.
fn error_data(family: Family, icmp_type: u8, code: u8, info: u32) -> Option<u32> {
    match (family, icmp_type, code) {
        // Destination unreachable, "fragmentation needed and DF set": the next-hop MTU.
        (Family::V4, 3, 4) => Some(info),
        (Family::V4, 3 | 11, _) => Some(0),
        // Packet too big: the MTU.
        (Family::V6, 2, _) => Some(info),
        (Family::V6, 1 | 3, _) => Some(0),
        _ => None,
    }
}

impl Server {
    /// An ICMP error for a datagram relay socket `relay` sent (RFC 8656 §11.5). Returns the Data
    /// indication to send to the client, written at the start of `buf` (at least
    /// [`ICMP_INDICATION_MAX`] bytes), or `None` when §11.5 says to drop it.
    pub fn handle_icmp(
        &mut self,
        now: Instant,
        relay: RelayKey,
        icmp: PeerIcmp,
        buf: &mut [u8],
    ) -> Option<ToClient> {
        // Types §11.5 does not name are dropped silently (they are not errors about a datagram).
        let error_data = error_data(relay.family, icmp.icmp_type, icmp.code, icmp.info)?;
        let Some(alloc) = self.allocs.get_mut(relay.alloc) else {
            self.counters.drop(Dropped::NoAllocation);
            return None;
        };
        if !alloc.permitted(icmp.peer.ip(), now) {
            self.counters.drop(Dropped::NoPermission);
            return None;
        }
        let client = alloc.client;
        let tid = self.rng.tid();
        let value = attr::encode_icmp(Icmp {
            icmp_type: icmp.icmp_type,
            code: icmp.code,
            error_data,
        });
        let mut b = MessageBuilder::new(buf, method::DATA, Class::Indication, tid).ok()?;
        b.add_xor_address(attr::XOR_PEER_ADDRESS, icmp.peer).ok()?;
        b.add(attr::ICMP, &value).ok()?;
        let len = b.finish();
        self.counters.icmp_forwarded += 1;
        Some(ToClient {
            client,
            data: 0..len,
        })
    }
}
