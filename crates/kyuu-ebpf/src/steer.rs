//! Relay steering: a `BPF_PROG_TYPE_SK_LOOKUP` program (`src/bpf/relay_steer.bpf.c`) attached to
//! the server's network namespace that hands every UDP datagram for a listed relay port to one
//! steering socket per shard, so a shard reads all its allocations' peer datagrams from one socket
//! in `recvmmsg` batches instead of waking one task per relay socket.
//!
//! The allocation's own socket stays bound (it reserves the port and sends). The steering socket
//! learns each datagram's relay port from `IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR`. Loading needs
//! `CAP_BPF` and `CAP_NET_ADMIN` (root); without them [`Steering::attach`] fails and the caller
//! relays with one socket per allocation as before.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

use aya::maps::{Array, MapData, SockMap};

/// Steering sockets the program can hold (`MAX_SOCKETS`).
pub const MAX_SOCKETS: u32 = 1024;
const PORTS_PER_FAMILY: u32 = 65_536;

/// Why steering could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SteerError {
    /// This build has no eBPF object (no clang at build time).
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    #[error("loading the sk_lookup program: {0}")]
    Load(String),
    #[error("attaching sk_lookup to this network namespace: {0}")]
    Attach(String),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
    #[error("steering socket index {0} is past the program's {MAX_SOCKETS}")]
    Index(u32),
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SteerVal {
    socket: u32,
    ip4: [u8; 4],
    ip6: [u8; 16],
}

// SAFETY: `#[repr(C)]`, `Copy`, made only of integers and byte arrays with no implicit padding
// (4 + 4 + 16 bytes, alignment 4), so any bit pattern is a valid value and the layout matches
// `struct steer_val` in `relay_steer.bpf.c` byte for byte.
#[allow(unsafe_code)]
unsafe impl aya::Pod for SteerVal {}

#[cfg(kyuu_ebpf)]
fn object() -> Result<&'static [u8], SteerError> {
    Ok(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/relay_steer.o"
    )))
}

#[cfg(not(kyuu_ebpf))]
fn object() -> Result<&'static [u8], SteerError> {
    Err(SteerError::Unavailable(
        crate::unavailable().unwrap_or("built without clang"),
    ))
}

/// The attached program and its maps. Dropping it detaches the program: every relay port goes
/// back to the kernel's normal lookup (its own socket).
pub struct Steering {
    _ebpf: aya::Ebpf,
    ports: Array<MapData, SteerVal>,
    socks: SockMap<MapData>,
    steered: usize,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("steered", &self.steered)
            .finish()
    }
}

fn key(relay: SocketAddr) -> u32 {
    let family = if relay.is_ipv6() { PORTS_PER_FAMILY } else { 0 };
    u32::from(relay.port()) + family
}

impl Steering {
    /// Loads the program and attaches it to the calling thread's network namespace.
    pub fn attach() -> Result<Self, SteerError> {
        let mut ebpf = aya::Ebpf::load(object()?).map_err(|e| SteerError::Load(e.to_string()))?;
        let take = |ebpf: &mut aya::Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| SteerError::Map(name, "missing".into()))
        };
        let ports = Array::try_from(take(&mut ebpf, "PORTS")?)
            .map_err(|e| SteerError::Map("PORTS", e.to_string()))?;
        let socks = SockMap::try_from(take(&mut ebpf, "SOCKS")?)
            .map_err(|e| SteerError::Map("SOCKS", e.to_string()))?;
        {
            let prog: &mut aya::programs::SkLookup = ebpf
                .program_mut("kyuu_steer")
                .ok_or_else(|| SteerError::Load("no program kyuu_steer".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| SteerError::Load(e.to_string()))?;
            crate::load_retrying(|| prog.load())
                .map_err(|e| SteerError::Load(crate::describe_load_error(&e)))?;
            let netns = std::fs::File::open("/proc/thread-self/ns/net")
                .map_err(|e| SteerError::Attach(format!("/proc/thread-self/ns/net: {e}")))?;
            prog.attach(netns)
                .map_err(|e| SteerError::Attach(format!("{e} ({e:?})")))?;
        }
        Ok(Steering {
            _ebpf: ebpf,
            ports,
            socks,
            steered: 0,
        })
    }

    /// Puts a bound UDP socket at `index` (a shard's steering socket for one family).
    pub fn set_socket<S: AsRawFd>(&mut self, index: u32, sock: &S) -> Result<(), SteerError> {
        if index >= MAX_SOCKETS {
            return Err(SteerError::Index(index));
        }
        self.socks
            .set(index, sock, 0)
            .map_err(|e| SteerError::Map("SOCKS", e.to_string()))
    }

    /// Removes the socket at `index`.
    pub fn clear_socket(&mut self, index: u32) {
        // An empty slot is fine.
        let _ = self.socks.clear_index(&index);
    }

    /// Steers datagrams for `relay` (an allocation's bound address; a wildcard address matches
    /// every local address) to the steering socket at `index`.
    pub fn steer(&mut self, relay: SocketAddr, index: u32) -> Result<(), SteerError> {
        if index >= MAX_SOCKETS {
            return Err(SteerError::Index(index));
        }
        let mut val = SteerVal {
            socket: index + 1,
            ..SteerVal::default()
        };
        match relay.ip() {
            IpAddr::V4(v4) => val.ip4 = v4.octets(),
            IpAddr::V6(v6) => val.ip6 = v6.octets(),
        }
        self.ports
            .set(key(relay), val, 0)
            .map_err(|e| SteerError::Map("PORTS", e.to_string()))?;
        self.steered += 1;
        Ok(())
    }

    /// Stops steering `relay`'s port: datagrams for it take the normal lookup again.
    pub fn unsteer(&mut self, relay: SocketAddr) {
        if self.ports.set(key(relay), SteerVal::default(), 0).is_ok() {
            self.steered = self.steered.saturating_sub(1);
        }
    }

    /// Ports steered now.
    pub fn len(&self) -> usize {
        self.steered
    }

    pub fn is_empty(&self) -> bool {
        self.steered == 0
    }
}
