//! The few Linux system calls the lab needs that std does not offer:
//! `setns(2)` to enter a network namespace, `AF_PACKET` raw sockets for the
//! delay/loss forwarder, `SIOCETHTOOL` to switch off veth offloads, and
//! `kill(2)` on a process group.
//!
//! This is the only module allowed to use `unsafe` (the workspace denies it).
//! Every block is a plain FFI call on values owned here; pointers passed to the
//! kernel point at locals that outlive the call.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// `linux/if_packet.h`: the frame was sent by this host (seen on a packet socket).
const PACKET_OUTGOING: u8 = 4;
/// `linux/if_packet.h`: do not deliver our own outgoing frames to this socket (Linux >= 4.20).
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
/// `linux/sockios.h`.
const SIOCETHTOOL: libc::c_ulong = 0x8946;
/// `linux/ethtool.h` legacy "set" commands, each taking a `struct ethtool_value`.
const ETHTOOL_STXCSUM: u32 = 0x17;
const ETHTOOL_SSG: u32 = 0x19;
const ETHTOOL_STSO: u32 = 0x1f;
const ETHTOOL_SGSO: u32 = 0x24;
const ETHTOOL_SGRO: u32 = 0x2c;

/// Whether the effective user is root.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Move the calling thread into the network namespace mounted at `path`
/// (`/run/netns/NAME`). Only the calling thread changes namespace.
pub(crate) fn enter_netns(path: &Path) -> io::Result<()> {
    let file = File::open(path)?;
    // SAFETY: the fd is valid for the duration of the call.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Send SIGKILL to the process group `pid` (the lab starts every child as
/// the leader of its own group, so this also reaches its descendants).
pub(crate) fn kill_group(pid: u32) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "pid out of range"))?;
    if pid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "refusing to signal pid <= 1",
        ));
    }
    // SAFETY: kill has no memory preconditions.
    let rc = unsafe { libc::kill(-pid, libc::SIGKILL) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifindex(ifname: &str) -> io::Result<u32> {
    let cname = CString::new(ifname)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn socklen<T>() -> libc::socklen_t {
    // Socket address structs are a few dozen bytes; this cannot truncate.
    libc::socklen_t::try_from(size_of::<T>()).unwrap_or(libc::socklen_t::MAX)
}

/// A non-blocking `AF_PACKET`/`SOCK_RAW` socket bound to one interface,
/// receiving every Ethernet frame that arrives on it.
pub(crate) struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    pub(crate) fn bind(ifname: &str) -> io::Result<Self> {
        let index = ifindex(ifname)?;
        let proto_be = u16::try_from(libc::ETH_P_ALL).unwrap_or(3).to_be();
        // SAFETY: plain socket creation.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                libc::c_int::from(proto_be),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let one: libc::c_int = 1;
        // SAFETY: `one` outlives the call; the length matches its type. A
        // failure (kernel < 4.20) is fine: recv() also filters PACKET_OUTGOING.
        let _ = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                std::ptr::from_ref(&one).cast(),
                socklen::<libc::c_int>(),
            )
        };
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap_or(17);
        sll.sll_protocol = proto_be;
        sll.sll_ifindex = i32::try_from(index)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "ifindex out of range"))?;
        // SAFETY: sll outlives the call and the length is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&sll).cast(),
                socklen::<libc::sockaddr_ll>(),
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Receive one frame into `buf`. `Ok(None)` when nothing is queued.
    /// Frames this host sent, and frames longer than `buf`, are reported as
    /// `Some(Frame::Skipped)`.
    pub(crate) fn recv(&self, buf: &mut [u8]) -> io::Result<Option<Frame>> {
        // SAFETY: zeroed sockaddr_ll is valid; recvfrom writes at most `len` bytes into it.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        let mut len = socklen::<libc::sockaddr_ll>();
        // SAFETY: buf and sll are valid for writes of the given lengths.
        let n = unsafe {
            libc::recvfrom(
                self.fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_TRUNC,
                std::ptr::from_mut(&mut sll).cast(),
                &mut len,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::WouldBlock || err.kind() == io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(err);
        }
        let n = usize::try_from(n).unwrap_or(usize::MAX);
        if sll.sll_pkttype == PACKET_OUTGOING || n > buf.len() {
            return Ok(Some(Frame::Skipped));
        }
        Ok(Some(Frame::Received(n)))
    }

    /// Send one complete Ethernet frame out of the bound interface.
    pub(crate) fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: frame is valid for reads of its length.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// What [`PacketSocket::recv`] got.
pub(crate) enum Frame {
    /// A frame of this many bytes is at the start of the buffer.
    Received(usize),
    /// A frame to ignore (our own outgoing frame, or too long).
    Skipped,
}

/// Wait until either socket is readable or `timeout` passes.
/// Returns (a readable, b readable).
pub(crate) fn poll2(
    a: &PacketSocket,
    b: &PacketSocket,
    timeout: Duration,
) -> io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // c_long is 32 bits on 32-bit targets, where the conversion can fail.
    #[allow(clippy::unnecessary_fallible_conversions)]
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(1),
        tv_nsec: libc::c_long::try_from(timeout.subsec_nanos()).unwrap_or(0),
    };
    // SAFETY: fds and ts outlive the call; nfds matches the array; a null sigmask is allowed.
    let rc = unsafe { libc::ppoll(fds.as_mut_ptr(), 2, &ts, std::ptr::null()) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(err);
    }
    let ready = |p: &libc::pollfd| p.revents & (libc::POLLIN | libc::POLLERR) != 0;
    Ok((ready(&fds[0]), ready(&fds[1])))
}

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with the `ifr_data` member of the union (40 bytes on 64-bit).
#[repr(C)]
struct IfReqData {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

/// Switch off checksum offload, scatter-gather, TSO, GSO and GRO on
/// `ifname` (in the calling thread's namespace).
///
/// Needed on every veth end that transmits into a userspace forwarder: with
/// offloads on, the kernel hands the packet socket frames with unfilled
/// checksums (CHECKSUM_PARTIAL) and 64 KiB TCP super-frames, which cannot be
/// re-sent as-is.
pub(crate) fn disable_offloads(ifname: &str) -> io::Result<()> {
    let bytes = ifname.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: plain socket creation.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a freshly created fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // Order matters: TSO depends on SG which depends on TX checksumming.
    for (cmd, required) in [
        (ETHTOOL_SGRO, false),
        (ETHTOOL_SGSO, false),
        (ETHTOOL_STSO, false),
        (ETHTOOL_SSG, false),
        (ETHTOOL_STXCSUM, true),
    ] {
        let mut value = EthtoolValue { cmd, data: 0 };
        let mut req = IfReqData {
            name: [0; libc::IFNAMSIZ],
            data: std::ptr::from_mut(&mut value).cast(),
            _pad: [0; 16],
        };
        if let Some(dst) = req.name.get_mut(..bytes.len()) {
            dst.copy_from_slice(bytes);
        }
        // SAFETY: req and value outlive the call; SIOCETHTOOL reads an ifreq
        // whose data member points at a struct ethtool_value.
        let rc = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                SIOCETHTOOL as _,
                std::ptr::from_mut(&mut req),
            )
        };
        if rc != 0 && required {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
