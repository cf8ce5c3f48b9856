//! Addresses and identifiers shared by the core and its shell. Newtypes keep a client's transport
//! address from being mixed up with a peer's.

use std::net::SocketAddr;
use std::ops::Range;
use std::time::Instant;

/// The transport a client reached the server over. A datagram transport added later (DTLS,
/// RFC 7350) belongs here, with `is_stream` false: the core's rules depend only on whether
/// ChannelData is framed by datagrams or padded in a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    /// DTLS over UDP (RFC 7350): datagram semantics like UDP (no ChannelData padding, no RFC 6062
    /// TCP allocations), but the five-tuple is a DTLS association.
    Dtls,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `pad`, not `write_str`, so `{:<4}` aligns the banner.
        f.pad(self.label())
    }
}

impl Transport {
    /// `"udp"`, `"tcp"`, `"tls"` or `"dtls"`: metric labels, logs and the banner.
    pub fn label(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Dtls => "dtls",
        }
    }

    /// Stream transports carry ChannelData padded to four bytes (RFC 8656 §12.5).
    pub fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }
}

/// A client's five-tuple: transport, the server address it sent to, and its own address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientSocket {
    pub transport: Transport,
    /// The server's address (where the client's packets arrived; where answers leave from).
    pub local: SocketAddr,
    /// The client's address as the server sees it.
    pub remote: SocketAddr,
}

/// A peer's transport address. Kept apart from [`ClientSocket`] addresses by type: the relay
/// path never sends client bytes to an address that did not come in as a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerAddr(SocketAddr);

impl PeerAddr {
    pub const fn new(addr: SocketAddr) -> Self {
        PeerAddr(addr)
    }

    pub const fn addr(self) -> SocketAddr {
        self.0
    }

    pub fn family(self) -> Family {
        Family::of(&self.0)
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> Self {
        PeerAddr(addr)
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// An RFC 6062 connection id (CONNECTION-ID, §6.2.1): names one peer TCP connection between the
/// Connect or ConnectionAttempt that created it and the ConnectionBind that claims it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionId(u32);

impl ConnectionId {
    pub const fn new(id: u32) -> Self {
        ConnectionId(id)
    }

    /// The value carried in CONNECTION-ID.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for ConnectionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// Index of an allocation in the core; stable for its life, never reused while a stale copy
/// could still be around (the generation changes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocId {
    pub slot: u32,
    pub generation: u32,
}

/// Address family of a relayed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &SocketAddr) -> Family {
        if addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }

    /// The family of an address-family attribute's code (REQUESTED-ADDRESS-FAMILY,
    /// ADDITIONAL-ADDRESS-FAMILY, ADDRESS-ERROR-CODE; RFC 8656 §18.10).
    pub fn from_code(code: u8) -> Option<Family> {
        match code {
            kyuu_stun::attr::FAMILY_IPV4 => Some(Family::V4),
            kyuu_stun::attr::FAMILY_IPV6 => Some(Family::V6),
            _ => None,
        }
    }

    /// The wire code of the family.
    pub fn code(self) -> u8 {
        match self {
            Family::V4 => kyuu_stun::attr::FAMILY_IPV4,
            Family::V6 => kyuu_stun::attr::FAMILY_IPV6,
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }

    pub(crate) const BOTH: [Family; 2] = [Family::V4, Family::V6];
}

/// The shell could not bind a relay socket ([`Output::BindRelay`]); the core tries another port
/// or fails the allocation with 508.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("could not bind the relay socket: {0:?}")]
pub struct BindFailed(pub std::io::ErrorKind);

/// One relay socket: an allocation's relayed address of one family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayKey {
    pub alloc: AllocId,
    pub family: Family,
}

/// Protocol of a relay socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RelayProto {
    Udp,
    /// RFC 6062: a listening TCP socket on the relayed address.
    Tcp,
}

/// A control message for a client (responses, indications).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Where to send: `client.local` is the source address (RFC 5780 may change it),
    /// `client.remote` the destination.
    pub client: ClientSocket,
    pub data: Vec<u8>,
}

/// What the core asks of its shell.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send bytes to a client.
    Transmit(Transmit),
    /// Bind a relay socket at exactly `addr`; answer with [`crate::Server::relay_bound`].
    /// `dont_fragment`: the allocation asked for DONT-FRAGMENT (RFC 8656 §7.2), so the socket's
    /// datagrams carry DF (IPv4) / are not fragmented (IPv6); otherwise they may be fragmented.
    BindRelay {
        key: RelayKey,
        addr: SocketAddr,
        proto: RelayProto,
        dont_fragment: bool,
    },
    /// Close the relay socket (allocation gone).
    CloseRelay { key: RelayKey },
    /// Close a client's stream connection (TCP allocations end with it and vice versa).
    CloseClient { client: ClientSocket },
    /// RFC 6062 Connect: open a TCP connection from the relay address to the peer; answer with
    /// [`crate::Server::peer_connected`].
    ConnectPeer {
        key: RelayKey,
        connection_id: ConnectionId,
        peer: PeerAddr,
    },
    /// RFC 6062: join the client data connection with the peer connection `connection_id`; from
    /// now on both are raw byte pipes.
    SpliceConnection {
        client: ClientSocket,
        connection_id: ConnectionId,
    },
    /// RFC 6062: drop a peer connection that was never bound (or refused).
    ClosePeerConnection { connection_id: ConnectionId },
    /// A STUN request in the extension method range (RAWR), for the extension's handler.
    Extension { client: ClientSocket, data: Vec<u8> },
    /// The allocation made with `username` reached the byte or duration limit a RAWR pairing
    /// gave it ([`crate::SessionLimits`]) and was deleted; tell the RAWR node.
    SessionLimit { username: String },
    /// One allocation of an in-process pairing exists on this shard but its partner does not
    /// (`docs/rawr.md` §6.1, pairs across shards): the shell looks for the partner on the other
    /// shards and, when found, links both with [`crate::Server::link_remote`].
    PairHalf {
        username: String,
        partner: String,
        alloc: AllocId,
        /// The allocation's advertised relayed address per family.
        addrs: [Option<std::net::SocketAddr>; 2],
    },
    /// Allocation `gone`, linked to `alloc` on shard `shard`, went away: the shell tells that
    /// shard ([`crate::Server::unlink_remote`]).
    Unpair {
        shard: u16,
        alloc: AllocId,
        gone: AllocId,
    },
    /// The kernel fast path may relay this channel (installed or updated: expiry, directions).
    /// Only after [`crate::Server::enable_fast_path`].
    FastPathInstall(FastPathChannel),
    /// The kernel fast path must stop relaying this channel; report what it relayed since the
    /// last report with [`crate::Server::fast_path_traffic`].
    FastPathRemove(FastPathId),
}

/// One channel of one allocation, as the kernel fast path knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FastPathId {
    pub alloc: AllocId,
    pub channel: u16,
}

/// A channel the kernel may relay: a UDP client of a UDP allocation, a live binding whose peer
/// has a live permission and is not forbidden. Userspace keeps deciding everything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FastPathChannel {
    pub id: FastPathId,
    pub client: ClientSocket,
    /// The allocation's relayed address of the peer's family.
    pub relay: SocketAddr,
    pub peer: SocketAddr,
    /// The binding or the permission ends here, whichever is first; the kernel must not relay
    /// past it.
    pub expires: Instant,
    /// Directions with `max_bps` budget left (both when there is no limit).
    pub to_peer: bool,
    pub to_client: bool,
}

/// Relay a payload from a relay socket to a peer. `data` indexes the buffer the client packet was
/// passed in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToPeer {
    pub relay: RelayKey,
    pub peer: PeerAddr,
    pub data: Range<usize>,
    /// Send this datagram with DF (RFC 8656 §14): the allocation's DONT-FRAGMENT for
    /// ChannelData, the Send indication's own DONT-FRAGMENT for a Send indication (§11.2).
    pub dont_fragment: bool,
    /// Set when `peer` is the relayed address of an allocation paired with this one (on this
    /// shard, or on `shard`) (RAWR, `docs/rawr.md` §6.1): the shell MAY skip the relay socket and hand the payload
    /// to [`crate::Server::handle_peer`] with this target, as if it had arrived there. A shell
    /// that ignores it sends the datagram as usual, which works too.
    pub paired: Option<PairedTarget>,
}

/// Where a paired packet enters the other allocation: its relay key, and the peer address it
/// comes from (the sending allocation's relayed address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairedTarget {
    pub relay: RelayKey,
    pub from: PeerAddr,
    /// The shard holding the target allocation when it is not this one: the shell hands the
    /// payload to that shard, which calls [`crate::Server::handle_peer`] there.
    pub shard: Option<u16>,
}

/// Send a ChannelData message or Data indication, written in place in the buffer the peer packet
/// was passed in, to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToClient {
    pub client: ClientSocket,
    pub data: Range<usize>,
}

/// How many bytes a peer payload needs in front of it for [`crate::Server::handle_peer`] to
/// write a Data indication header in place (20 header + 24 XOR-PEER-ADDRESS + 4 DATA header).
pub const PEER_HEADROOM: usize = 48;
/// Bytes needed after a peer payload for padding.
pub const PEER_TAILROOM: usize = 4;
