//! The relay path, once per data packet: ChannelData from a client (RFC 8656 §12.6), a Send
//! indication (§11.2), and a peer's datagram turned into ChannelData (§12.7) or a Data indication
//! (§11.6). Nothing here allocates: the client's payload is relayed as a range of the buffer it
//! came in, and a peer's payload gets its header written in the headroom in front of it.
//!
//! ```text
//!  peer datagram, read PEER_HEADROOM bytes into the buffer:
//!  [ ........ headroom ........ | payload ....... | tail ]
//!  ChannelData written in place:            [ch|len| payload ....... |pad ]  (pad on streams)
//!  Data indication written in place: [hdr|XOR-PEER-ADDRESS|DATA| payload ....... |pad ]
//! ```
//!
//! DONT-FRAGMENT is passed on in `ToPeer::dont_fragment`; ICMP errors for relayed datagrams
//! (RFC 8656 §11.5) are handled beside this, in `icmp.rs`.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

use kyuu_stun::{attr, method, ChannelData, Class, Message, MessageBuilder};

use crate::server::allocation::{Allocation, Direction};
use crate::server::metrics::{Counters, Dropped};
use crate::server::request::SendInd;
use crate::server::Server;
use crate::types::{
    ClientSocket, Family, PairedTarget, PeerAddr, RelayKey, RelayProto, ToClient, ToPeer,
};

/// A ToPeer/ToClient payload range, checked to fit the buffer.
fn range_in(start: usize, len: usize, buf_len: usize) -> Option<Range<usize>> {
    let end = start.checked_add(len)?;
    (end <= buf_len).then_some(start..end)
}

impl Server {
    /// A datagram from `peer` on relay socket `relay` (RFC 8656 §11.3 for the permission check,
    /// §12.7 / §11.6 for the message to the client). The payload is `buf[payload]`, with at least
    /// [`crate::PEER_HEADROOM`] bytes before it and [`crate::PEER_TAILROOM`] after it.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: RelayKey,
        peer: PeerAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> Option<ToClient> {
        let max_bps = self.cfg.max_bps;
        let Some(alloc) = self.allocs.get_mut(relay.alloc) else {
            self.counters.drop(Dropped::NoAllocation);
            return None;
        };
        let len = payload.len();
        if alloc.over_limit(now) {
            self.counters.drop(Dropped::SessionLimit);
            return None;
        }
        // The paired allocation's relayed address is permitted by the pairing itself.
        let paired = alloc.paired.is_some_and(|l| l.is_other(peer.addr()));
        if !paired && !alloc.permitted(peer.addr().ip(), now) {
            self.counters.drop(Dropped::NoPermission);
            return None;
        }
        if !alloc.take_bytes(Direction::ToClient, len, max_bps, now) {
            self.counters.drop(Dropped::Bandwidth);
            return None;
        }
        let client = alloc.client;
        let channel = alloc.channel_to(peer, now);
        alloc.stats.to_client_pkts += 1;
        alloc.stats.to_client_bytes += len as u64;
        if let Some(number) = channel {
            let start = payload.start.checked_sub(4)?;
            let len16 = u16::try_from(len).ok()?;
            ChannelData::write_header(number.get(), len16, buf.get_mut(start..)?).ok()?;
            let mut end = payload.end;
            if client.transport.is_stream() {
                // Streams carry ChannelData padded to four bytes (§12.5).
                let new_end = start + 4 + ((len + 3) & !3);
                buf.get_mut(end..new_end)?.fill(0);
                end = new_end;
            }
            return Some(ToClient {
                client,
                data: start..end,
            });
        }
        // Data indication, built around the payload: the header and XOR-PEER-ADDRESS in the
        // headroom, DATA's header just before the payload, its padding after.
        let addr_len = if peer.addr().is_ipv4() { 8 } else { 20 };
        let start = payload.start.checked_sub(20 + 4 + addr_len + 4)?;
        let end = payload.end.checked_add(3)?;
        let tid = self.rng.tid();
        let slot = buf.get_mut(start..end)?;
        let mut b = MessageBuilder::new(slot, method::DATA, Class::Indication, tid).ok()?;
        b.add_xor_address(attr::XOR_PEER_ADDRESS, peer.addr())
            .ok()?;
        // The payload already sits where DATA's value goes: reserve writes only the header and
        // padding.
        b.reserve(attr::DATA, len).ok()?;
        let total = b.finish();
        Some(ToClient {
            client,
            data: start..start + total,
        })
    }

    /// ChannelData from a client (RFC 8656 §12.6): relayed if the channel is bound and its peer
    /// still has a permission.
    pub(super) fn channel_data(
        &mut self,
        now: Instant,
        client: ClientSocket,
        packet: &[u8],
    ) -> Option<ToPeer> {
        let Ok(cd) = ChannelData::parse(packet) else {
            self.counters.drop(Dropped::Malformed);
            return None;
        };
        let Some(id) = self.allocs.id_of(&client) else {
            self.counters.drop(Dropped::NoAllocation);
            return None;
        };
        let alloc = self.allocs.get_mut(id)?;
        let Some(peer) = alloc.channel_peer(cd.channel, now) else {
            self.counters.drop(Dropped::NoPermission);
            return None;
        };
        let data = range_in(4, cd.data.len(), packet.len())?;
        let out = Outbound {
            peer,
            data,
            dont_fragment: alloc.dont_fragment,
        };
        to_peer(alloc, &mut self.counters, now, out, self.cfg.max_bps)
    }

    /// A Send indication (RFC 8656 §11.2): relayed if the peer has a permission. Never answered.
    pub(super) fn send_indication(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
    ) -> Option<ToPeer> {
        let Some(id) = self.allocs.id_of(&client) else {
            self.counters.drop(Dropped::NoAllocation);
            return None;
        };
        let Ok(send) = SendInd::decode(msg) else {
            self.counters.drop(Dropped::Malformed);
            return None;
        };
        let alloc = self.allocs.get_mut(id)?;
        // Traffic to the paired allocation never leaves the process: the peer policy (which
        // keeps relayed traffic out of internal networks) does not apply to it.
        let paired = alloc.paired.is_some_and(|l| l.is_other(send.peer));
        if !paired && !self.policy.permits(send.peer.ip()) {
            self.counters.drop(Dropped::ForbiddenPeer);
            return None;
        }
        if alloc.proto != RelayProto::Udp || !alloc.has_family(Family::of(&send.peer)) {
            self.counters.drop(Dropped::NoPermission);
            return None;
        }
        let out = Outbound {
            peer: send.peer,
            data: send.data,
            dont_fragment: send.dont_fragment,
        };
        to_peer(alloc, &mut self.counters, now, out, self.cfg.max_bps)
    }
}

/// A client payload on its way to a peer.
struct Outbound {
    peer: SocketAddr,
    data: Range<usize>,
    dont_fragment: bool,
}

/// The checks both client directions share: permission (§9), byte budget, counters.
fn to_peer(
    alloc: &mut Allocation,
    counters: &mut Counters,
    now: Instant,
    out: Outbound,
    max_bps: u64,
) -> Option<ToPeer> {
    let paired = alloc.paired.and_then(|l| {
        let (family, own) = l.target(out.peer)?;
        Some(PairedTarget {
            relay: RelayKey {
                alloc: l.other,
                family,
            },
            from: PeerAddr::new(own),
            shard: l.shard,
        })
    });
    if paired.is_none() && !alloc.permitted(out.peer.ip(), now) {
        counters.drop(Dropped::NoPermission);
        return None;
    }
    if alloc.over_limit(now) {
        counters.drop(Dropped::SessionLimit);
        return None;
    }
    let len = out.data.len();
    if !alloc.take_bytes(Direction::ToPeer, len, max_bps, now) {
        counters.drop(Dropped::Bandwidth);
        return None;
    }
    alloc.stats.to_peer_pkts += 1;
    alloc.stats.to_peer_bytes += len as u64;
    Some(ToPeer {
        relay: RelayKey {
            alloc: alloc.id,
            family: Family::of(&out.peer),
        },
        peer: PeerAddr::new(out.peer),
        data: out.data,
        dont_fragment: out.dont_fragment,
        paired,
    })
}
