//! The Linux side of two per-datagram IP features of relay sockets (the decisions are in the
//! core, `kyuu_turn::Server::handle_icmp` and `ToPeer::dont_fragment`):
//!
//! * **ICMP errors** (RFC 8656 §11.5): `IP_RECVERR` / `IPV6_RECVERR` make the kernel queue the
//!   ICMP errors a relay socket's datagrams cause on the socket's error queue, with the original
//!   destination (the peer, port included) and the ICMP type, code and info (the MTU for
//!   "fragmentation needed" / "packet too big"). A queued error makes the socket report
//!   `EPOLLERR`, which the relay task waits for beside readability; it reads at most
//!   [`ERRQUEUE_BUDGET`] errors per wake-up, so a flood of ICMP cannot starve the data path.
//!   Errors the local stack raises itself (origin `SO_EE_ORIGIN_LOCAL`, e.g. EMSGSIZE) are not
//!   ICMP from the path and are dropped.
//! * **DF** (RFC 8656 §7.2, §11.2, §14): a relay socket's `IP_MTU_DISCOVER` (and
//!   `IPV6_MTU_DISCOVER`) follows its allocation: `IP_PMTUDISC_PROBE` (DF set, the cached path
//!   MTU not enforced, as quinn-udp sets it) for allocations made with DONT-FRAGMENT,
//!   `IP_PMTUDISC_DONT` (DF clear, the kernel fragments) for the others. ChannelData thus never
//!   pays a system call for DF. A Send indication whose DONT-FRAGMENT differs from its
//!   allocation's flips the option around that one datagram (two `setsockopt` calls, on a path
//!   that already parses a STUN message).

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

use kyuu_turn::PeerIcmp;
use nix::sys::socket::{
    recvmsg, setsockopt, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage,
};

/// Errors read from one relay socket's error queue per wake-up.
pub(crate) const ERRQUEUE_BUDGET: usize = 8;

/// Turns on the error queue of a relay socket.
pub(crate) fn enable_recverr(s: &std::net::UdpSocket, v6: bool) -> io::Result<()> {
    if v6 {
        setsockopt(s, sockopt::Ipv6RecvErr, &true)?;
    } else {
        setsockopt(s, sockopt::Ipv4RecvErr, &true)?;
    }
    Ok(())
}

/// Sets whether the socket's datagrams carry DF (IPv4) / may be fragmented by this host (IPv6).
pub(crate) fn set_dont_fragment<Fd: std::os::fd::AsFd>(
    s: Fd,
    v6: bool,
    df: bool,
) -> io::Result<()> {
    use rustix::net::sockopt as rs;
    if v6 {
        let mode = if df {
            rs::Ipv6PathMtuDiscovery::PROBE
        } else {
            rs::Ipv6PathMtuDiscovery::DONT
        };
        rs::set_ipv6_mtu_discover(&s, mode)?;
        // A dual-stack socket sends IPv4-mapped peers' datagrams over IPv4; ignore where the
        // option does not apply.
    }
    let mode = if df {
        rs::Ipv4PathMtuDiscovery::PROBE
    } else {
        rs::Ipv4PathMtuDiscovery::DONT
    };
    match rs::set_ip_mtu_discover(&s, mode) {
        Err(_) if v6 => Ok(()),
        r => r.map_err(io::Error::from),
    }
}

/// One entry of the error queue: `Ok(Some)` an ICMP error, `Ok(None)` something else (a local
/// error), `Err(WouldBlock)` when the queue is empty.
pub(crate) fn read_error(s: &std::net::UdpSocket) -> io::Result<Option<PeerIcmp>> {
    // The start of the datagram the error is about comes back too; kyuu does not need it.
    let mut data = [0u8; 64];
    let mut iov = [io::IoSliceMut::new(&mut data)];
    let mut cmsg = nix::cmsg_space!(libc::sock_extended_err, libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        s.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
    )?;
    let Some(peer) = msg.address.as_ref().and_then(to_std) else {
        return Ok(None);
    };
    for c in msg.cmsgs()? {
        let ee = match c {
            ControlMessageOwned::Ipv4RecvErr(ee, _) if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP => {
                ee
            }
            ControlMessageOwned::Ipv6RecvErr(ee, _) if ee.ee_origin == libc::SO_EE_ORIGIN_ICMP6 => {
                ee
            }
            _ => continue,
        };
        return Ok(Some(PeerIcmp {
            peer,
            icmp_type: ee.ee_type,
            code: ee.ee_code,
            info: ee.ee_info,
        }));
    }
    Ok(None)
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    let v6 = a.as_sockaddr_in6()?;
    let v6 = SocketAddrV6::from(*v6);
    // A dual-stack socket reports IPv4 peers as IPv4-mapped IPv6.
    Some(match v6.ip().to_ipv4_mapped() {
        Some(v4) => SocketAddr::new(v4.into(), v6.port()),
        None => SocketAddr::V6(v6),
    })
}

/// Whether `e` says "nothing (more) queued".
pub(crate) fn is_empty(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}
