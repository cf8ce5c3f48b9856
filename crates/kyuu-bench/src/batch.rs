//! Batched datagram IO for the load generator and the echo peer: `recvmmsg` through quinn-udp,
//! `sendmmsg` through rustix, so the generator spends as little of the shared CPU as it can
//! and the server under test becomes the bottleneck.
//!
//! Sends are always separate datagrams (no GSO), as real clients' packets are: a server must
//! not get a cheaper receive path than it would see in production.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::AsFd;

use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use rustix::net::{sendmmsg, MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};

/// Datagrams one call moves at most.
pub const BATCH: usize = 32;
const SLOT: usize = 2048;

/// Receive buffers and a quinn-udp state, reusable for any socket.
pub struct Receiver {
    state: UdpSocketState,
    bufs: Vec<[u8; SLOT]>,
    metas: [RecvMeta; BATCH],
}

impl Receiver {
    /// `template` only lends its options probe; the receiver then reads from any socket. Sockets
    /// that never had quinn-udp's options set (no GRO) simply return one datagram per buffer.
    pub fn new<S: AsFd>(template: &S) -> io::Result<Receiver> {
        Ok(Receiver {
            state: UdpSocketState::new(UdpSockRef::from(template))?,
            bufs: vec![[0u8; SLOT]; BATCH],
            metas: [RecvMeta::default(); BATCH],
        })
    }

    /// Reads up to [`BATCH`] datagrams; returns how many buffers were filled.
    pub fn recv<S: AsFd>(&mut self, sock: &S) -> io::Result<usize> {
        let mut iovs: Vec<IoSliceMut<'_>> = self
            .bufs
            .iter_mut()
            .map(|b| IoSliceMut::new(&mut b[..]))
            .collect();
        self.state
            .recv(UdpSockRef::from(sock), &mut iovs, &mut self.metas)
    }

    /// Datagram `i` of the last [`Receiver::recv`] (a GRO batch counts as its first segment's
    /// buffer; see [`Receiver::segments`]).
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let m = &self.metas[i];
        (&self.bufs[i][..m.len.min(SLOT)], m.addr)
    }

    /// Datagrams in buffer `i` (more than one only with GRO).
    pub fn segments(&self, i: usize) -> usize {
        let m = &self.metas[i];
        if m.stride == 0 {
            1
        } else {
            m.len.div_ceil(m.stride)
        }
    }
}

/// Sends `count` copies of `pkt` on a connected socket in as few `sendmmsg` calls as possible;
/// returns how many went out (stops at the first short send, e.g. a full buffer).
pub fn send_copies<S: AsFd>(sock: &S, pkt: &[u8], count: usize) -> usize {
    let iov = [IoSlice::new(pkt)];
    let mut sent = 0;
    while sent < count {
        let k = (count - sent).min(BATCH);
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> =
            (0..k).map(|_| SendAncillaryBuffer::default()).collect();
        let mut msgs: Vec<MMsgHdr<'_>> =
            controls.iter_mut().map(|c| MMsgHdr::new(&iov, c)).collect();
        match sendmmsg(sock, &mut msgs, SendFlags::empty()) {
            Ok(n) => {
                sent += n;
                if n < k {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    sent
}

/// Sends each `(payload, destination)` as its own datagram with `sendmmsg`.
pub fn send_to_each<S: AsFd>(sock: &S, items: &[(&[u8], SocketAddr)]) -> usize {
    let mut sent = 0;
    for chunk in items.chunks(BATCH) {
        let addrs: Vec<SocketAddrAny> =
            chunk.iter().map(|(_, a)| SocketAddrAny::from(*a)).collect();
        let iovs: Vec<[IoSlice<'_>; 1]> = chunk.iter().map(|(p, _)| [IoSlice::new(p)]).collect();
        let mut controls: Vec<SendAncillaryBuffer<'_, '_, '_>> = (0..chunk.len())
            .map(|_| SendAncillaryBuffer::default())
            .collect();
        let mut msgs: Vec<MMsgHdr<'_>> = addrs
            .iter()
            .zip(iovs.iter())
            .zip(controls.iter_mut())
            .map(|((a, iov), c)| MMsgHdr::new_with_addr(a, iov, c))
            .collect();
        let mut off = 0;
        // Retry the rest after a partial send; give up on an error (the echo drops it).
        for _ in 0..4 {
            match sendmmsg(sock, &mut msgs[off..], SendFlags::empty()) {
                Ok(n) => {
                    off += n;
                    if off >= msgs.len() || n == 0 {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        sent += off;
    }
    sent
}
