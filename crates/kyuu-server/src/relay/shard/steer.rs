//! Relay steering on the shard side (`turn.relay_steering`, `kyuu_ebpf::Steering`): one UDP
//! socket per shard and address family receives the peer datagrams of every relay port the shard
//! owns, read in `recvmmsg` batches, each datagram's relay port taken from `IP_ORIGDSTADDR` /
//! `IPV6_ORIGDSTADDR`. The allocation's own socket stays bound and sends; its task
//! (`relay_udp_loop`) stays registered for anything that still reaches the socket (datagrams
//! that arrived before the port was steered, ICMP errors) but is not woken per datagram.

use std::cell::RefCell;
use std::io::IoSliceMut;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kyuu_turn::fxhash::FxHashMap;
use kyuu_turn::{PeerAddr, RelayKey, PEER_HEADROOM};
use nix::sys::socket::{
    recvmmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, MultiHeaders, SockaddrStorage,
};

use super::{is_would_block, read_turn, Arena, BatchRead, Sh, UdpSocket, BATCH, READ_BUDGET};

/// The steering program, shared by every shard: touched when a relay port is bound or closed,
/// never per packet.
pub(crate) type SharedSteering = Arc<Mutex<kyuu_ebpf::Steering>>;

/// This shard's part of steering.
pub(super) struct SteerState {
    shared: SharedSteering,
    /// The program's socket index of this shard's steering socket, per family (IPv4, IPv6);
    /// `None` where the family is not steered.
    index: [Option<u32>; 2],
    /// Steered relay ports (family, port) and the allocation each belongs to.
    ports: FxHashMap<(bool, u16), RelayKey>,
}

/// The program's socket index for `shard`'s steering socket of a family.
fn socket_index(shard: usize, v6: bool) -> u32 {
    (shard as u32).saturating_mul(2) + u32::from(v6)
}

/// Binds this shard's steering sockets (one per relay address in `addrs`, port 0), puts them in
/// the program and returns the state plus the sockets to read. A family whose socket cannot be
/// set up stays unsteered (one log line).
pub(super) fn setup(
    shard: usize,
    shared: SharedSteering,
    addrs: &[SocketAddr],
    buf: usize,
) -> (SteerState, Vec<(Rc<UdpSocket>, bool)>) {
    let mut st = SteerState {
        shared,
        index: [None, None],
        ports: FxHashMap::default(),
    };
    let mut socks = Vec::new();
    for addr in addrs {
        let v6 = addr.is_ipv6();
        let index = socket_index(shard, v6);
        let made = (|| -> anyhow::Result<Rc<UdpSocket>> {
            let s = super::super::bind_udp(SocketAddr::new(addr.ip(), 0), false, buf)?;
            if v6 {
                setsockopt(&s, sockopt::Ipv6OrigDstAddr, &true)?;
            } else {
                setsockopt(&s, sockopt::Ipv4OrigDstAddr, &true)?;
            }
            st.shared
                .lock()
                .map_err(|_| anyhow::anyhow!("steering lock poisoned"))?
                .set_socket(index, &s)?;
            Ok(Rc::new(super::register(s)?))
        })();
        match made {
            Ok(sock) => {
                st.index[usize::from(v6)] = Some(index);
                socks.push((sock, v6));
            }
            Err(e) => tracing::warn!(
                target: "kyuu::relay",
                shard, %addr,
                "relay steering: this shard reads its relay sockets one by one: {e}"
            ),
        }
    }
    (st, socks)
}

impl SteerState {
    /// Steers a newly bound relay address to this shard's socket; false when it is not steered
    /// (its own socket keeps receiving).
    pub(super) fn steer(&mut self, key: RelayKey, local: SocketAddr) -> bool {
        let v6 = local.is_ipv6();
        let Some(index) = self.index[usize::from(v6)] else {
            return false;
        };
        let Ok(mut k) = self.shared.lock() else {
            return false;
        };
        match k.steer(local, index) {
            Ok(()) => {
                self.ports.insert((v6, local.port()), key);
                true
            }
            Err(e) => {
                tracing::debug!(target: "kyuu::relay", %local, "relay steering: port not steered: {e}");
                false
            }
        }
    }

    /// Stops steering a relay address (its allocation is gone). Only the port steered for `key`:
    /// a TCP relay of another allocation may have the same number.
    pub(super) fn unsteer(&mut self, key: RelayKey, local: SocketAddr) {
        let port = (local.is_ipv6(), local.port());
        if self.ports.get(&port) != Some(&key) {
            return;
        }
        self.ports.remove(&port);
        if let Ok(mut k) = self.shared.lock() {
            k.unsteer(local);
        }
    }

    /// Every port of this shard leaves the program (the shard stops).
    pub(super) fn clear(&mut self) {
        let Ok(mut k) = self.shared.lock() else {
            return;
        };
        for ((v6, port), _) in self.ports.drain() {
            let ip = if v6 {
                std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
            } else {
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
            };
            k.unsteer(SocketAddr::new(ip, port));
        }
    }
}

/// Reads one steering socket: a `recvmmsg` batch of datagrams for any of the shard's relay ports,
/// each handed to the core as its relay socket's task would.
pub(super) async fn steered_loop(sh: Sh, arena: Rc<RefCell<Arena>>, sock: Rc<UdpSocket>, v6: bool) {
    let cmsg = if v6 {
        nix::cmsg_space!(libc::sockaddr_in6)
    } else {
        nix::cmsg_space!(libc::sockaddr_in)
    };
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, Some(cmsg));
    let fd = sock.get_ref().as_raw_fd();
    // (length, peer, relay port) of each datagram of a batch.
    let mut got = [(0usize, None::<SocketAddr>, 0u16); BATCH];
    loop {
        let Ok(guard) = sock.readable().await else {
            return;
        };
        read_turn(guard, READ_BUDGET, None, false, || {
            let mut ar = arena.borrow_mut();
            let n = {
                let mut it = ar.bufs.iter_mut();
                let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = std::array::from_fn(|_| {
                    let b = it.next().map(|b| &mut b[..]).unwrap_or(&mut []);
                    [IoSliceMut::new(
                        b.get_mut(PEER_HEADROOM..).unwrap_or(&mut []),
                    )]
                });
                match recvmmsg(
                    fd,
                    &mut headers,
                    iovs.iter_mut(),
                    MsgFlags::MSG_DONTWAIT,
                    None,
                ) {
                    Ok(results) => {
                        let mut n = 0;
                        for (r, slot) in results.zip(got.iter_mut()) {
                            n += 1;
                            *slot = (0, None, 0);
                            if r.flags.contains(MsgFlags::MSG_TRUNC) {
                                continue;
                            }
                            let port = r.cmsgs().ok().and_then(|mut c| {
                                c.find_map(|m| match m {
                                    ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                                        Some(u16::from_be(a.sin_port))
                                    }
                                    ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                                        Some(u16::from_be(a.sin6_port))
                                    }
                                    _ => None,
                                })
                            });
                            let from = r.address.and_then(|a| {
                                a.as_sockaddr_in()
                                    .map(|a| SocketAddr::V4(SocketAddrV4::from(*a)))
                                    .or_else(|| {
                                        a.as_sockaddr_in6()
                                            .map(|a| SocketAddr::V6(SocketAddrV6::from(*a)))
                                    })
                            });
                            if let Some(port) = port {
                                *slot = (r.bytes, from, port);
                            }
                        }
                        n
                    }
                    Err(e) => {
                        let e = std::io::Error::from(e);
                        if is_would_block(&e) {
                            return BatchRead::Drained;
                        }
                        // A pending socket error is reported once; read on.
                        return BatchRead::More;
                    }
                }
            };
            let now = Instant::now();
            let mut st = sh.borrow_mut();
            st.relay_in += n as u64;
            let st = &mut *st;
            for ((len, from, port), buf) in got.iter().zip(ar.bufs.iter_mut()).take(n) {
                let Some(from) = from else {
                    continue;
                };
                let Some(key) = st
                    .steer
                    .as_ref()
                    .and_then(|s| s.ports.get(&(v6, *port)).copied())
                else {
                    continue;
                };
                let payload = PEER_HEADROOM..PEER_HEADROOM + len;
                if let Some(tc) = st
                    .core
                    .handle_peer(now, key, PeerAddr::new(*from), buf, payload)
                {
                    if let Some(out) = buf.get(tc.data) {
                        st.send_client(tc.client, out);
                    }
                }
            }
            st.drain(&sh);
            BatchRead::full_if(n >= BATCH)
        })
        .await;
    }
}
