//! One worker thread: a current-thread runtime driving one `kyuu_turn::Server` and every socket
//! it owns. Nothing here is shared with other threads, so state lives in `Rc<RefCell<_>>` and a
//! borrow never spans an `.await`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kyuu_stun::frame_len;
use kyuu_turn::fxhash::FxHashMap;
use kyuu_turn::{
    BindFailed, ClientSocket, ConnectionId, FastPathChannel, FastPathId, Output, PeerAddr,
    RelayKey, RelayProto, Server, ToPeer, Transport, PEER_HEADROOM,
};
use quinn_udp::{RecvMeta, UdpSockRef, UdpSocketState};
use tokio::io::unix::{AsyncFd, AsyncFdReadyGuard};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::control::ShardCmd;
use super::icmp;
use super::{ExtensionReply, ExtensionRequest, ShardSockets};
use crate::proxy;
use kyuu_turn::ipnet::IpNet;

mod steer;
pub(crate) use steer::SharedSteering;

/// RAWR usernames watched for session limits per shard (bounded; closed watchers go first).
const LIMIT_WATCH_MAX: usize = 65_536;
const BATCH: usize = quinn_udp::BATCH_SIZE;
/// Relay sockets carry one peer flow each and mostly hold a datagram or two per wake-up;
/// preparing fewer message headers per `recvmmsg` is cheaper there.
const RELAY_BATCH: usize = 8;
/// Room for one GRO-coalesced receive (64 segments) plus the Data indication headroom.
const SLOT: usize = PEER_HEADROOM + 64 * 1536;
const STREAM_QUEUE: usize = 1024;
const STREAM_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// A stream connection without an allocation that sends nothing for this long is closed; one with
/// an allocation lives as long as the allocation.
const STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Batches a relay socket may read before letting other tasks run.
const READ_BUDGET: usize = 16;
/// Batches a listener may read before letting other tasks run: as many datagrams as a relay
/// socket's turn (`READ_BUDGET` x `RELAY_BATCH`). Client datagrams the listener forwards come back
/// as peer datagrams on the relay sockets, so a listener that admitted more per turn than the
/// relay sockets drain would fill their receive buffers under load and lose the return half of
/// round trips it had already paid for (measured: 1 allocation, unpaced, 4 of 5 echoes dropped at
/// the relay socket with a 16-batch listener turn).
const LISTENER_READ_BUDGET: usize = (READ_BUDGET * RELAY_BATCH).div_ceil(BATCH);

type Sh = Rc<RefCell<State>>;
/// A UDP socket registered with the runtime. `AsyncFd` rather than `tokio::net::UdpSocket` so a
/// short batch can clear readiness without the extra `recvmmsg` that would return EAGAIN
/// (edge-triggered: a datagram arriving later raises a new event).
type UdpSocket = AsyncFd<std::net::UdpSocket>;

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Listener {
    addr: SocketAddr,
    sock: Rc<UdpSocket>,
    state: Rc<UdpSocketState>,
    /// Balancers allowed to send PROXY v2 datagrams, when this listener expects them.
    proxy: Option<Rc<[IpNet]>>,
}

/// Paired packets one shard may have queued for another before new ones are dropped.
pub(crate) const CROSS_PACKETS: usize = 4096;
/// Pair halves remembered for linking across shards (a flood only forgets old entries).
const HALVES_MAX: usize = 16_384;

/// A client payload for a paired allocation on another shard.
pub(crate) struct CrossPacket {
    relay: RelayKey,
    from: kyuu_turn::PeerAddr,
    data: Vec<u8>,
}

/// What the shards share to link RAWR pairs across shards (`docs/rawr.md` §6.1): every
/// shard's control channel and paired-packet channel, and the pair halves waiting for their
/// partner (username → shard, allocation, relayed addresses). The mutex is taken only when an
/// allocation of a pairing completes, never per packet.
pub(crate) struct CrossShard {
    pub control: Vec<mpsc::UnboundedSender<ShardCmd>>,
    pub packets: Vec<mpsc::Sender<CrossPacket>>,
    #[allow(clippy::type_complexity)]
    pub halves:
        std::sync::Mutex<HashMap<String, (u16, kyuu_turn::AllocId, [Option<SocketAddr>; 2])>>,
}

/// What a shard gets besides its sockets: its operator control channel and the PROXY protocol
/// rules of its listeners.
pub(crate) struct ShardIo {
    pub control: mpsc::UnboundedReceiver<ShardCmd>,
    pub cross: Arc<CrossShard>,
    pub cross_rx: mpsc::Receiver<CrossPacket>,
    pub proxy: proxy::Rules,
    pub fast_path: Option<SharedFastPath>,
    /// The DTLS association table (first shard only, with `ShardSockets::dtls`).
    pub dtls: Option<super::dtls::Endpoint>,
    /// Relay steering (`turn.relay_steering`) and the relay addresses to steer (port 0).
    pub steering: Option<(SharedSteering, Vec<SocketAddr>)>,
}

/// The kernel fast path, shared by every shard: its maps are touched only when a channel comes,
/// changes or goes and once per tick for the counters, never per packet.
pub(crate) type SharedFastPath = Arc<std::sync::Mutex<kyuu_ebpf::FastPath>>;

/// This shard's entries in the kernel fast path: the core's id to the map entry id.
struct FastPathState {
    shared: SharedFastPath,
    ids: FxHashMap<FastPathId, u64>,
    next: u64,
    /// When the kernel's counters were last read: once a second, not every sub-tick of the
    /// core (a read is a map lookup per entry).
    read_at: Option<Instant>,
}

/// How often the kernel's per-entry counters are read into the core.
const FAST_PATH_READ: Duration = Duration::from_secs(1);

/// Real clients behind UDP balancers remembered at once (a flood only forgets old entries).
const MAX_PROXIED: usize = 65_536;

struct Relay {
    udp: Option<(Rc<UdpSocket>, Rc<UdpSocketState>)>,
    /// The socket's DF setting: its allocation's DONT-FRAGMENT (`icmp::set_dont_fragment`).
    dont_fragment: bool,
    addr: SocketAddr,
    _task: AbortOnDrop,
}

enum StreamCmd {
    Data(Vec<u8>),
    Close,
}

struct State {
    core: Server,
    udp: Vec<Listener>,
    /// DTLS listeners (RFC 7350) and their associations.
    dtls_socks: Vec<Listener>,
    dtls: Option<super::dtls::Endpoint>,
    relays: FxHashMap<RelayKey, Relay>,
    /// PROXY protocol over UDP: the balancer address each real client came through (answers go
    /// back through it).
    udp_via: HashMap<SocketAddr, SocketAddr>,
    streams: HashMap<(SocketAddr, SocketAddr), mpsc::Sender<StreamCmd>>,
    /// RFC 6062 peer connections waiting for ConnectionBind.
    peer_conns: HashMap<ConnectionId, TcpStream>,
    /// Client data connections to splice with a peer connection.
    splices: HashMap<(SocketAddr, SocketAddr), TcpStream>,
    ext: Option<mpsc::Sender<ExtensionRequest>>,
    ext_reply: ExtensionReply,
    socket_buffer: usize,
    dropped_sends: u64,
    /// Datagrams read from relay sockets, and client packets handed to a paired allocation
    /// in-process, since the last flush.
    relay_in: u64,
    paired_pkts: u64,
    /// The other shards, for RAWR pairs across shards.
    cross: Arc<CrossShard>,
    index: u16,
    /// Paired packets dropped because the other shard's channel was full.
    cross_dropped: u64,
    /// Who to tell when the allocation of a RAWR username is cut by its session limits.
    limit_watch: HashMap<String, mpsc::UnboundedSender<String>>,
    arena: Rc<RefCell<Arena>>,
    batch: Batch,
    /// quinn-udp state shared by every relay socket of the shard. `UdpSocketState::new` probes
    /// GSO/GRO with throwaway sockets (on this kernel the UDP_GRO probe flips a static key and
    /// IPIs every CPU), far too costly per allocation; the state holds nothing socket-specific.
    relay_state: Option<Rc<UdpSocketState>>,
    fast_path: Option<FastPathState>,
    answers: Answers,
    /// Relay steering: this shard's steering sockets read every steered relay port.
    steer: Option<steer::SteerState>,
}

/// Small datagrams to UDP clients produced while a client listener's batch is handled (Binding
/// answers above all, each to its own client address) gathered to leave in one `sendmmsg` per
/// socket and batch instead of one `sendmsg` each. Only for listeners bound to one address (a
/// wildcard listener needs IP_PKTINFO per datagram and takes [`State::queue_udp`]).
struct Answers {
    /// Set by [`listener_loop`] while it hands a batch to the core.
    active: bool,
    sock: Option<(Rc<UdpSocket>, Rc<UdpSocketState>)>,
    buf: Vec<u8>,
    /// Each message's bytes in `buf`, its destination and its datagram size: consecutive
    /// answers of one size to one destination form one message that leaves with UDP GSO (one
    /// `sendmsg` for the run, cheaper than a `sendmmsg` entry per datagram).
    msgs: Vec<(std::ops::Range<usize>, SocketAddr, usize)>,
}

/// Answers per `sendmmsg`.
const ANSWERS_MAX: usize = BATCH;
/// Larger datagrams take the GSO path.
const ANSWER_MAX: usize = 512;

/// Datagrams waiting to leave together (UDP GSO).
struct Batch {
    buf: Vec<u8>,
    sock: Option<(Rc<UdpSocket>, Rc<UdpSocketState>)>,
    to: SocketAddr,
    src_ip: Option<IpAddr>,
    seg: usize,
    n: usize,
    max: usize,
    closed: bool,
}

/// Datagrams larger than this go alone (a GSO segment must fit the path MTU).
const GSO_MAX_SEGMENT: usize = 1400;
const GSO_MAX_BYTES: usize = 60_000;

/// Per-shard receive buffers, shared by every socket of the shard (only one reads at a time).
struct Arena {
    bufs: Vec<Vec<u8>>,
    metas: [RecvMeta; BATCH],
    scratch: Vec<u8>,
}

impl Arena {
    fn new() -> Self {
        Arena {
            bufs: (0..BATCH).map(|_| vec![0u8; SLOT]).collect(),
            metas: [RecvMeta::default(); BATCH],
            scratch: vec![0u8; PEER_HEADROOM + 65536 + 8],
        }
    }

    /// One recvmmsg into the slots, each starting `head` bytes in.
    fn recv(
        &mut self,
        state: &UdpSocketState,
        sock: &UdpSocket,
        head: usize,
        slots: usize,
    ) -> std::io::Result<usize> {
        let slots = slots.clamp(1, BATCH);
        let mut slices: [IoSliceMut<'_>; BATCH] = {
            let mut it = self.bufs.iter_mut();
            std::array::from_fn(|_| {
                let b = it.next().map(|b| &mut b[..]).unwrap_or(&mut []);
                IoSliceMut::new(b.get_mut(head..).unwrap_or(&mut []))
            })
        };
        let (Some(slices), Some(metas)) = (slices.get_mut(..slots), self.metas.get_mut(..slots))
        else {
            return Ok(0);
        };
        state.recv(UdpSockRef::from(sock.get_ref()), slices, metas)
    }
}

/// Registers a socket with the runtime. `AsyncFd::new` is deprecated because it accepts types
/// that do not own their descriptor; `std::net::UdpSocket` does, so the safe constructor is sound
/// here and spares an `unsafe` block (denied workspace-wide) for `AsyncFd::register`.
#[allow(deprecated)]
fn register(s: std::net::UdpSocket) -> std::io::Result<UdpSocket> {
    AsyncFd::new(s)
}

/// As [`register`], for a relay socket: also woken by `EPOLLERR`, which a queued ICMP error
/// raises (`icmp.rs`).
#[allow(deprecated)]
fn register_relay(s: std::net::UdpSocket) -> std::io::Result<UdpSocket> {
    AsyncFd::with_interest(
        s,
        tokio::io::Interest::READABLE | tokio::io::Interest::ERROR,
    )
}

/// One `sendmsg`, tried a second time after a failure other than a full buffer. With
/// `IP_RECVERR` (relay sockets, `icmp.rs`) an ICMP error for an earlier datagram is also left
/// pending on the socket, and the kernel reports it, once, as the result of the next send (which
/// then sends nothing): that datagram must not be lost to another datagram's ICMP. A real error
/// fails again; the ICMP itself stays on the error queue for the relay task.
fn send_udp(
    state: &UdpSocketState,
    sock: &std::net::UdpSocket,
    t: &quinn_udp::Transmit<'_>,
) -> std::io::Result<()> {
    match state.try_send(UdpSockRef::from(sock), t) {
        Err(e) if !is_would_block(&e) => state.try_send(UdpSockRef::from(sock), t),
        r => r,
    }
}

fn is_would_block(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn run(
    index: usize,
    sockets: ShardSockets,
    core: Server,
    acceptor: Option<TlsAcceptor>,
    ext: Option<mpsc::Sender<ExtensionRequest>>,
    mut stop: watch::Receiver<bool>,
    socket_buffer: usize,
    ready: mpsc::Sender<anyhow::Result<()>>,
    limits: Arc<StreamLimits>,
    io: ShardIo,
) {
    let ShardIo {
        mut control,
        cross,
        mut cross_rx,
        proxy: proxy_rules,
        fast_path,
        dtls,
        steering,
    } = io;
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.try_send(Err(e.into()));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let (reply_tx, mut reply_rx) = mpsc::unbounded_channel();
        let mut udp = Vec::new();
        let mut tcp = Vec::new();
        let mut tls = Vec::new();
        let mut dtls_socks = Vec::new();
        let setup = (|| -> anyhow::Result<()> {
            for s in sockets.dtls {
                let state = UdpSocketState::new(UdpSockRef::from(&s))?;
                let addr = s.local_addr()?;
                dtls_socks.push(Listener {
                    addr,
                    sock: Rc::new(register(s)?),
                    state: Rc::new(state),
                    proxy: None,
                });
            }
            for s in sockets.udp {
                let state = UdpSocketState::new(UdpSockRef::from(&s))?;
                let addr = s.local_addr()?;
                udp.push(Listener {
                    addr,
                    sock: Rc::new(register(s)?),
                    state: Rc::new(state),
                    proxy: proxy_rules.trusted("udp", addr).map(Rc::from),
                });
            }
            for s in sockets.tcp {
                tcp.push(TcpListener::from_std(s)?);
            }
            for s in sockets.tls {
                tls.push(TcpListener::from_std(s)?);
            }
            Ok(())
        })();
        if let Err(e) = setup {
            let _ = ready.send(Err(e)).await;
            return;
        }
        let arena = Rc::new(RefCell::new(Arena::new()));
        let sh: Sh = Rc::new(RefCell::new(State {
            core,
            udp: Vec::new(),
            dtls_socks: Vec::new(),
            dtls,
            relays: FxHashMap::default(),
            udp_via: HashMap::new(),
            streams: HashMap::new(),
            peer_conns: HashMap::new(),
            splices: HashMap::new(),
            ext,
            ext_reply: ExtensionReply { tx: reply_tx },
            socket_buffer,
            dropped_sends: 0,
            relay_in: 0,
            paired_pkts: 0,
            cross,
            index: index as u16,
            cross_dropped: 0,
            limit_watch: HashMap::new(),
            arena: arena.clone(),
            batch: Batch {
                buf: Vec::with_capacity(GSO_MAX_BYTES + GSO_MAX_SEGMENT),
                sock: None,
                to: SocketAddr::from(([0, 0, 0, 0], 0)),
                src_ip: None,
                seg: 0,
                n: 0,
                max: 1,
                closed: false,
            },
            relay_state: udp.first().map(|l| l.state.clone()),
            fast_path: fast_path.map(|shared| FastPathState {
                shared,
                ids: FxHashMap::default(),
                next: (index as u64) << 48,
                read_at: None,
            }),
            answers: Answers {
                active: false,
                sock: None,
                buf: Vec::with_capacity(ANSWERS_MAX * ANSWER_MAX),
                msgs: Vec::with_capacity(ANSWERS_MAX),
            },
            steer: None,
        }));
        let mut tasks = Vec::new();
        if let Some((shared, addrs)) = steering {
            let (state, socks) = steer::setup(index, shared, &addrs, socket_buffer);
            sh.borrow_mut().steer = Some(state);
            for (sock, v6) in socks {
                tasks.push(AbortOnDrop(tokio::task::spawn_local(steer::steered_loop(
                    sh.clone(),
                    arena.clone(),
                    sock,
                    v6,
                ))));
            }
        }
        for (i, l) in udp.iter().enumerate() {
            tasks.push(AbortOnDrop(tokio::task::spawn_local(client_udp_loop(
                sh.clone(),
                arena.clone(),
                i,
                l.sock.clone(),
                l.state.clone(),
            ))));
        }
        sh.borrow_mut().udp = udp;
        for (i, l) in dtls_socks.iter().enumerate() {
            tasks.push(AbortOnDrop(tokio::task::spawn_local(dtls_udp_loop(
                sh.clone(),
                arena.clone(),
                i,
                l.sock.clone(),
                l.state.clone(),
            ))));
        }
        if !dtls_socks.is_empty() {
            tasks.push(AbortOnDrop(tokio::task::spawn_local(dtls_sweep_loop(
                sh.clone(),
            ))));
        }
        sh.borrow_mut().dtls_socks = dtls_socks;
        let trust = |t: &str, l: &TcpListener| -> Option<Rc<[IpNet]>> {
            l.local_addr()
                .ok()
                .and_then(|a| proxy_rules.trusted(t, a))
                .map(Rc::from)
        };
        for l in tcp {
            let t = trust("tcp", &l);
            tasks.push(AbortOnDrop(tokio::task::spawn_local(accept_loop(
                sh.clone(),
                l,
                None,
                limits.clone(),
                t,
            ))));
        }
        if let Some(acc) = acceptor {
            for l in tls {
                let t = trust("tls", &l);
                tasks.push(AbortOnDrop(tokio::task::spawn_local(accept_loop(
                    sh.clone(),
                    l,
                    Some(acc.clone()),
                    limits.clone(),
                    t,
                ))));
            }
        }
        let timer_sh = sh.clone();
        tasks.push(AbortOnDrop(tokio::task::spawn_local(async move {
            loop {
                let next = timer_sh.borrow().core.poll_timeout();
                let at = next.unwrap_or_else(|| Instant::now() + Duration::from_secs(1));
                tokio::time::sleep_until(at.into()).await;
                let mut st = timer_sh.borrow_mut();
                match st.core.poll_timeout() {
                    Some(t) if t <= Instant::now() => st.fast_path_counters(),
                    // No tick running (no packet reached the core): the kernel's Binding answers
                    // still have to reach /metrics; handing them over starts the tick.
                    None => st.fast_path_binding_counters(),
                    Some(_) => {}
                }
                st.core.handle_timeout(Instant::now());
                if st.dropped_sends > 0 {
                    metrics::counter!("kyuu_relay_send_dropped_total").increment(st.dropped_sends);
                    st.dropped_sends = 0;
                }
                if st.relay_in > 0 {
                    metrics::counter!("kyuu_relay_socket_datagrams_total").increment(st.relay_in);
                    st.relay_in = 0;
                }
                if st.paired_pkts > 0 {
                    metrics::counter!("kyuu_relay_paired_packets_total").increment(st.paired_pkts);
                    st.paired_pkts = 0;
                }
                if st.cross_dropped > 0 {
                    metrics::counter!("kyuu_relay_paired_dropped_total")
                        .increment(st.cross_dropped);
                    st.cross_dropped = 0;
                }
                st.drain(&timer_sh);
            }
        })));
        let reply_sh = sh.clone();
        tasks.push(AbortOnDrop(tokio::task::spawn_local(async move {
            while let Some((client, data)) = reply_rx.recv().await {
                let mut st = reply_sh.borrow_mut();
                st.send_client(client, &data);
                st.flush_udp();
            }
        })));
        // Paired packets from other shards: enter the partner allocation as if its relay socket
        // had read them.
        let cross_sh = sh.clone();
        tasks.push(AbortOnDrop(tokio::task::spawn_local(async move {
            let mut batch = Vec::with_capacity(64);
            let mut scratch = vec![0u8; PEER_HEADROOM + 65536 + 8];
            while cross_rx.recv_many(&mut batch, 64).await > 0 {
                let mut st = cross_sh.borrow_mut();
                let now = Instant::now();
                for p in batch.drain(..) {
                    st.cross_packet(now, p, &mut scratch);
                }
                st.flush_udp();
                st.drain(&cross_sh);
            }
        })));
        let control_sh = sh.clone();
        let first_message = limits.first_message;
        tasks.push(AbortOnDrop(tokio::task::spawn_local(async move {
            while let Some(cmd) = control.recv().await {
                control_sh
                    .borrow_mut()
                    .command(&control_sh, cmd, first_message);
            }
        })));
        let _ = ready.send(Ok(())).await;
        drop(ready);
        tracing::debug!(target: "kyuu::relay", shard = index, "relay shard running");
        let _ = stop.wait_for(|s| *s).await;
        drop(tasks);
        let mut st = sh.borrow_mut();
        if let Some(s) = &mut st.steer {
            s.clear();
        }
        st.relays.clear();
        st.streams.clear();
        st.peer_conns.clear();
        st.fast_path_clear();
    });
}

impl State {
    /// An operator command (`super::control`), between two inputs like any other.
    fn command(&mut self, sh: &Sh, cmd: ShardCmd, first_message: Option<Duration>) {
        let now = Instant::now();
        match cmd {
            ShardCmd::Allocations(reply) => {
                let _ = reply.send(self.core.allocations(now));
            }
            ShardCmd::Kill { id, reply } => {
                let _ = reply.send(self.core.kill_allocation(now, id));
            }
            ShardCmd::Reconfigure { turn, reply } => {
                let _ = reply.send(self.core.reconfigure(*turn));
            }
            ShardCmd::Drain { alternate } => self.core.drain(alternate),
            ShardCmd::Pair {
                usernames,
                lifetime,
                limits,
                ended,
                link,
            } => {
                let [a, b] = &usernames;
                if link {
                    self.core.pair_usernames(now, a, b, lifetime, limits);
                } else {
                    self.core.limit_usernames(now, a, b, lifetime, limits);
                }
                if let Some(tx) = ended {
                    if self.limit_watch.len() >= LIMIT_WATCH_MAX {
                        self.limit_watch.retain(|_, t| !t.is_closed());
                    }
                    if self.limit_watch.len() < LIMIT_WATCH_MAX {
                        for u in usernames {
                            self.limit_watch.insert(u, tx.clone());
                        }
                    }
                }
            }
            ShardCmd::LinkRemote {
                alloc,
                shard,
                other,
                other_addr,
            } => {
                self.core.link_remote(now, alloc, shard, other, other_addr);
            }
            ShardCmd::Unlink { alloc, gone } => self.core.unlink_remote(alloc, gone),
            ShardCmd::DrainTo { alternates } => self.core.drain_to(&alternates),
            ShardCmd::Stream { stream, client } => {
                tokio::task::spawn_local(stream_task(sh.clone(), stream, client, first_message));
            }
        }
        self.drain(sh);
    }

    fn send_client(&mut self, client: ClientSocket, data: &[u8]) {
        match client.transport {
            Transport::Udp => {
                let Some(l) = self.udp.iter().find(|l| {
                    l.addr == client.local
                        || (l.addr.ip().is_unspecified()
                            && l.addr.port() == client.local.port()
                            && l.addr.is_ipv4() == client.local.is_ipv4())
                }) else {
                    self.dropped_sends += 1;
                    return;
                };
                // A wildcard socket answers from the address the client wrote to.
                let src_ip = l.addr.ip().is_unspecified().then(|| client.local.ip());
                let (sock, state) = (l.sock.clone(), l.state.clone());
                let family = l.addr.is_ipv4();
                // Behind a PROXY protocol balancer the answer goes back through it.
                let to = match &l.proxy {
                    None => client.remote,
                    Some(_) => match self.udp_via.get(&client.remote) {
                        Some(via) => *via,
                        None => {
                            self.dropped_sends += 1;
                            return;
                        }
                    },
                };
                if self.answers.active
                    && src_ip.is_none()
                    && data.len() <= ANSWER_MAX
                    && to.is_ipv4() == family
                {
                    self.answer(&sock, &state, to, data);
                } else {
                    self.queue_udp(&sock, &state, to, src_ip, data);
                }
            }
            Transport::Dtls => {
                let sent = self
                    .dtls
                    .as_mut()
                    .and_then(|ep| ep.write(client.local, client.remote, data));
                match sent {
                    Some(datagrams) => self.send_dtls(client.local, client.remote, &datagrams),
                    None => self.dropped_sends += 1,
                }
            }
            Transport::Tcp | Transport::Tls => {
                let sent = self
                    .streams
                    .get(&(client.local, client.remote))
                    .is_some_and(|tx| tx.try_send(StreamCmd::Data(data.to_vec())).is_ok());
                if !sent {
                    self.dropped_sends += 1;
                }
            }
        }
    }

    /// Sends DTLS datagrams to a client from the DTLS listener it wrote to.
    fn send_dtls(&mut self, local: SocketAddr, remote: SocketAddr, datagrams: &[Vec<u8>]) {
        let Some(l) = find_listener(&self.dtls_socks, local) else {
            self.dropped_sends += datagrams.len() as u64;
            return;
        };
        let src_ip = l.addr.ip().is_unspecified().then(|| local.ip());
        let (sock, state) = (l.sock.clone(), l.state.clone());
        for d in datagrams {
            self.queue_udp(&sock, &state, remote, src_ip, d);
        }
    }

    /// One datagram on a DTLS listener: handshake progress, or records for the core.
    fn dtls_datagram(&mut self, now: Instant, client: ClientSocket, data: &[u8]) {
        let mut input = super::dtls::DtlsInput::default();
        let Some(ep) = self.dtls.as_mut() else {
            return;
        };
        ep.handle(now, client.local, client.remote, data, &mut input);
        self.send_dtls(client.local, client.remote, &input.send);
        for rec in &input.records {
            if let Some(tp) = self.core.handle_client(now, client, rec) {
                self.send_peer(&tp, rec);
            }
        }
        if input.closed {
            self.core.client_closed(now, client);
        }
    }

    /// A datagram on a PROXY protocol listener: from a trusted balancer, with a v2 header naming
    /// the real client. Returns the client and the payload after the header, or `None` (dropped
    /// and counted).
    fn proxied_datagram<'a>(
        &mut self,
        trusted: &[IpNet],
        client: ClientSocket,
        seg: &'a [u8],
    ) -> Option<(ClientSocket, &'a [u8])> {
        if !proxy::trusted(trusted, client.remote.ip()) {
            proxy::refused("udp", "untrusted");
            return None;
        }
        let header = match proxy::parse(seg) {
            Ok(Some(h)) => h,
            Ok(None) => {
                proxy::refused("udp", "bad_header");
                return None;
            }
            Err(e) => {
                proxy::refused("udp", e.label());
                return None;
            }
        };
        let payload = seg.get(header.len..)?;
        // LOCAL (the balancer's own health check): it is the client.
        let real = header.source().unwrap_or(client.remote);
        if self.udp_via.get(&real) != Some(&client.remote) {
            if self.udp_via.len() >= MAX_PROXIED {
                self.udp_via.clear();
            }
            self.udp_via.insert(real, client.remote);
        }
        Some((
            ClientSocket {
                remote: real,
                ..client
            },
            payload,
        ))
    }

    /// A client packet for the allocation paired with the sender (`ToPeer::paired`): copied
    /// behind headroom in `scratch` and handed to that allocation as if its relay socket had
    /// read it, so it never touches the kernel. Without a target, [`State::send_peer`].
    fn relay_packet(&mut self, now: Instant, tp: &ToPeer, packet: &[u8], scratch: &mut [u8]) {
        let Some(target) = tp.paired else {
            return self.send_peer(tp, packet);
        };
        let Some(data) = packet.get(tp.data.clone()) else {
            return;
        };
        if let Some(shard) = target.shard.filter(|s| *s != self.index) {
            // The partner lives on another shard: hand the payload over (never blocks; a full
            // channel drops the packet, as a full socket buffer would).
            let p = CrossPacket {
                relay: target.relay,
                from: target.from,
                data: data.to_vec(),
            };
            match self
                .cross
                .packets
                .get(usize::from(shard))
                .map(|tx| tx.try_send(p))
            {
                Some(Ok(())) => self.paired_pkts += 1,
                _ => self.cross_dropped += 1,
            }
            return;
        }
        let Some(dst) = scratch.get_mut(PEER_HEADROOM..PEER_HEADROOM + data.len()) else {
            return self.send_peer(tp, packet);
        };
        dst.copy_from_slice(data);
        self.paired_pkts += 1;
        let range = PEER_HEADROOM..PEER_HEADROOM + data.len();
        if let Some(tc) = self
            .core
            .handle_peer(now, target.relay, target.from, scratch, range)
        {
            if let Some(out) = scratch.get(tc.data) {
                self.send_client(tc.client, out);
            }
        }
    }

    /// A paired packet from another shard for an allocation here.
    fn cross_packet(&mut self, now: Instant, p: CrossPacket, scratch: &mut [u8]) {
        let range = PEER_HEADROOM..PEER_HEADROOM + p.data.len();
        let Some(dst) = scratch.get_mut(range.clone()) else {
            return;
        };
        dst.copy_from_slice(&p.data);
        if let Some(tc) = self.core.handle_peer(now, p.relay, p.from, scratch, range) {
            if let Some(out) = scratch.get(tc.data) {
                self.send_client(tc.client, out);
            }
        }
    }

    /// One side of a pairing is here without its partner: remember it, and link both when the
    /// partner is already on another shard.
    fn pair_half(
        &mut self,
        username: String,
        partner: &str,
        alloc: kyuu_turn::AllocId,
        addrs: [Option<SocketAddr>; 2],
    ) {
        let found = {
            let mut h = self
                .cross
                .halves
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if h.len() >= HALVES_MAX && !h.contains_key(&username) {
                h.clear();
            }
            h.insert(username, (self.index, alloc, addrs));
            h.get(partner).copied()
        };
        let Some((shard, other, other_addr)) = found else {
            return;
        };
        if shard == self.index {
            return;
        }
        if self
            .core
            .link_remote(Instant::now(), alloc, shard, other, other_addr)
        {
            if let Some(tx) = self.cross.control.get(usize::from(shard)) {
                let _ = tx.send(ShardCmd::LinkRemote {
                    alloc: other,
                    shard: self.index,
                    other: alloc,
                    other_addr: addrs,
                });
            }
        }
    }

    fn send_peer(&mut self, tp: &ToPeer, packet: &[u8]) {
        let Some(r) = self.relays.get(&tp.relay) else {
            return;
        };
        let socket_df = r.dont_fragment;
        let Some((sock, state)) = r.udp.clone() else {
            return;
        };
        let Some(data) = packet.get(tp.data.clone()) else {
            return;
        };
        if tp.dont_fragment == socket_df {
            self.queue_udp(&sock, &state, tp.peer.addr(), None, data);
            return;
        }
        // A Send indication whose DONT-FRAGMENT differs from its allocation's: this datagram
        // alone, with the socket's DF flipped around it (RFC 8656 §11.2).
        self.flush_udp();
        let v6 = tp.relay.family == kyuu_turn::Family::V6;
        let fd = sock.get_ref();
        if icmp::set_dont_fragment(fd, v6, tp.dont_fragment).is_err() {
            self.dropped_sends += 1;
            return;
        }
        let t = quinn_udp::Transmit {
            destination: tp.peer.addr(),
            ecn: None,
            contents: data,
            segment_size: None,
            src_ip: None,
        };
        if send_udp(&state, fd, &t).is_err() {
            self.dropped_sends += 1;
        }
        let _ = icmp::set_dont_fragment(fd, v6, socket_df);
    }

    /// Queues a datagram. Consecutive datagrams of one size from one socket to one destination
    /// leave in a single `sendmsg` with UDP GSO; [`State::flush_udp`] ends every input batch.
    fn queue_udp(
        &mut self,
        sock: &Rc<UdpSocket>,
        state: &Rc<UdpSocketState>,
        to: SocketAddr,
        src_ip: Option<IpAddr>,
        data: &[u8],
    ) {
        let b = &mut self.batch;
        let same = b.n > 0
            && !b.closed
            && b.to == to
            && b.src_ip == src_ip
            && b.sock.as_ref().is_some_and(|(s, _)| Rc::ptr_eq(s, sock))
            && data.len() <= b.seg
            && b.n < b.max
            && b.buf.len() + data.len() <= GSO_MAX_BYTES;
        if !same {
            self.flush_udp();
            if data.len() > GSO_MAX_SEGMENT || state.max_gso_segments() < 2 {
                let t = quinn_udp::Transmit {
                    destination: to,
                    ecn: None,
                    contents: data,
                    segment_size: None,
                    src_ip,
                };
                if send_udp(state, (**sock).get_ref(), &t).is_err() {
                    self.dropped_sends += 1;
                }
                return;
            }
            let b = &mut self.batch;
            b.sock = Some((sock.clone(), state.clone()));
            b.to = to;
            b.src_ip = src_ip;
            b.seg = data.len();
            b.max = state.max_gso_segments().min(64);
        }
        let b = &mut self.batch;
        b.buf.extend_from_slice(data);
        b.n += 1;
        // A shorter datagram can only be the last segment.
        b.closed = data.len() < b.seg;
    }

    fn flush_udp(&mut self) {
        let b = &mut self.batch;
        if b.n == 0 {
            return;
        }
        if let Some((sock, state)) = b.sock.take() {
            let t = quinn_udp::Transmit {
                destination: b.to,
                ecn: None,
                contents: &b.buf,
                segment_size: (b.n > 1).then_some(b.seg),
                src_ip: b.src_ip,
            };
            if send_udp(&state, sock.get_ref(), &t).is_err() {
                self.dropped_sends += b.n as u64;
            }
        }
        b.buf.clear();
        b.n = 0;
        b.closed = false;
    }

    /// Adds an answer to the `sendmmsg` batch (see [`Answers`]).
    fn answer(
        &mut self,
        sock: &Rc<UdpSocket>,
        state: &Rc<UdpSocketState>,
        to: SocketAddr,
        data: &[u8],
    ) {
        let a = &mut self.answers;
        let gso_max = state.max_gso_segments().min(64);
        if let Some((range, dest, seg)) = a.msgs.last_mut() {
            if *dest == to
                && *seg == data.len()
                && gso_max >= 2
                && range.len() / (*seg).max(1) < gso_max
                && a.sock.as_ref().is_some_and(|(s, _)| Rc::ptr_eq(s, sock))
            {
                a.buf.extend_from_slice(data);
                range.end = a.buf.len();
                return;
            }
        }
        if a.msgs.len() >= ANSWERS_MAX || a.sock.as_ref().is_some_and(|(s, _)| !Rc::ptr_eq(s, sock))
        {
            self.flush_answers();
        }
        let a = &mut self.answers;
        if a.sock.is_none() {
            a.sock = Some((sock.clone(), state.clone()));
        }
        let start = a.buf.len();
        a.buf.extend_from_slice(data);
        a.msgs.push((start..a.buf.len(), to, data.len()));
    }

    /// Sends the batched answers with `sendmmsg` (a message the kernel refuses is counted as
    /// dropped and the rest still go; a full socket buffer drops what is left, as a full buffer
    /// does on every other send path).
    fn flush_answers(&mut self) {
        use rustix::net::{MMsgHdr, SendAncillaryBuffer, SendFlags, SocketAddrAny};
        let a = &mut self.answers;
        let n = a.msgs.len().min(ANSWERS_MAX);
        let Some((sock, state)) = a.sock.take() else {
            a.msgs.clear();
            a.buf.clear();
            return;
        };
        if n == 0 {
            a.buf.clear();
            return;
        }
        let mut dropped = 0;
        // Runs to one destination: one GSO send each; the single answers go in the sendmmsg.
        for (range, to, seg) in a.msgs.iter().filter(|m| m.0.len() > m.2) {
            let t = quinn_udp::Transmit {
                destination: *to,
                ecn: None,
                contents: a.buf.get(range.clone()).unwrap_or(&[]),
                segment_size: Some(*seg),
                src_ip: None,
            };
            if send_udp(&state, sock.get_ref(), &t).is_err() {
                dropped += range.len() / (*seg).max(1);
            }
        }
        a.msgs.retain(|m| m.0.len() <= m.2);
        let n = a.msgs.len().min(ANSWERS_MAX);
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let addrs: [SocketAddrAny; ANSWERS_MAX] = std::array::from_fn(|i| {
            SocketAddrAny::from(a.msgs.get(i).map_or(unspecified, |m| m.1))
        });
        let iovs: [[std::io::IoSlice<'_>; 1]; ANSWERS_MAX] = std::array::from_fn(|i| {
            let data = a
                .msgs
                .get(i)
                .and_then(|m| a.buf.get(m.0.clone()))
                .unwrap_or(&[]);
            [std::io::IoSlice::new(data)]
        });
        let mut controls: [SendAncillaryBuffer<'_, '_, '_>; ANSWERS_MAX] =
            std::array::from_fn(|_| SendAncillaryBuffer::default());
        // One small allocation per batch (the headers borrow the arrays above).
        let mut hdrs: Vec<MMsgHdr<'_>> = addrs
            .iter()
            .zip(iovs.iter())
            .zip(controls.iter_mut())
            .take(n)
            .map(|((addr, iov), ctl)| MMsgHdr::new_with_addr(addr, iov, ctl))
            .collect();
        let mut sent = 0;
        // Each round sends at least one message or skips one, so n + 1 rounds are enough.
        for _ in 0..=n {
            let Some(rest) = hdrs.get_mut(sent..) else {
                break;
            };
            if rest.is_empty() {
                break;
            }
            match rustix::net::sendmmsg(sock.get_ref(), rest, SendFlags::DONTWAIT) {
                Ok(0) => break,
                Ok(k) => sent += k,
                Err(rustix::io::Errno::AGAIN) => break,
                // The first message failed (nothing of this call went): skip it.
                Err(_) => {
                    sent += 1;
                    dropped += 1;
                }
            }
        }
        dropped += n.saturating_sub(sent);
        drop(hdrs);
        self.dropped_sends += dropped as u64;
        let a = &mut self.answers;
        a.msgs.clear();
        a.buf.clear();
    }

    /// Carries out everything the core asked for.
    fn drain(&mut self, sh: &Sh) {
        self.drain_outputs(sh);
        self.flush_udp();
    }

    fn drain_outputs(&mut self, sh: &Sh) {
        while let Some(out) = self.core.poll_output() {
            match out {
                Output::Transmit(t) => self.send_client(t.client, &t.data),
                Output::BindRelay {
                    key,
                    addr,
                    proto,
                    dont_fragment,
                } => self.bind_relay(sh, key, addr, proto, dont_fragment),
                Output::CloseRelay { key } => {
                    // The port leaves the steering map before its socket closes.
                    if let (Some(r), Some(s)) = (self.relays.get(&key), &mut self.steer) {
                        s.unsteer(key, r.addr);
                    }
                    self.relays.remove(&key);
                }
                Output::CloseClient { client } if client.transport == Transport::Dtls => {
                    let closed = self
                        .dtls
                        .as_mut()
                        .and_then(|ep| ep.close(client.local, client.remote));
                    if let Some(c) = closed {
                        self.send_dtls(c.local, c.remote, &c.send);
                        self.core.client_closed(Instant::now(), client);
                    }
                }
                Output::CloseClient { client } => {
                    if let Some(tx) = self.streams.get(&(client.local, client.remote)) {
                        let _ = tx.try_send(StreamCmd::Close);
                    }
                }
                Output::ConnectPeer {
                    key,
                    connection_id,
                    peer,
                } => {
                    let Some(from) = self.relays.get(&key).map(|r| r.addr) else {
                        self.core
                            .peer_connected(Instant::now(), connection_id, false);
                        continue;
                    };
                    tokio::task::spawn_local(connect_peer(sh.clone(), from, peer, connection_id));
                }
                Output::SpliceConnection {
                    client,
                    connection_id,
                } => {
                    if let Some(peer) = self.peer_conns.remove(&connection_id) {
                        self.splices.insert((client.local, client.remote), peer);
                    }
                }
                Output::ClosePeerConnection { connection_id } => {
                    self.peer_conns.remove(&connection_id);
                }
                Output::FastPathInstall(c) => self.fast_path_install(c),
                Output::FastPathRemove(id) => self.fast_path_remove(id),
                Output::PairHalf {
                    username,
                    partner,
                    alloc,
                    addrs,
                } => self.pair_half(username, &partner, alloc, addrs),
                Output::Unpair { shard, alloc, gone } => {
                    if let Some(tx) = self.cross.control.get(usize::from(shard)) {
                        let _ = tx.send(ShardCmd::Unlink { alloc, gone });
                    }
                }
                Output::SessionLimit { username } => {
                    metrics::counter!("kyuu_relay_session_limit_total").increment(1);
                    if let Some(tx) = self.limit_watch.remove(&username) {
                        let _ = tx.send(username);
                    }
                }
                Output::Extension { client, data } => {
                    if let Some(tx) = &self.ext {
                        let _ = tx.try_send(ExtensionRequest {
                            client,
                            data,
                            reply: self.ext_reply.clone(),
                        });
                    }
                }
            }
        }
    }

    /// Puts a channel into the kernel's maps, unless the kernel cannot relay it as the core
    /// would: a client behind a PROXY protocol balancer (answers go through the balancer), or
    /// addresses of different families.
    fn fast_path_install(&mut self, c: FastPathChannel) {
        let Some(fp) = &mut self.fast_path else {
            return;
        };
        let relayable = !self.udp_via.contains_key(&c.client.remote)
            && kyuu_ebpf::relayable(c.client.remote, c.client.local, c.relay, c.peer);
        if !relayable {
            return;
        }
        let now = Instant::now();
        let expires_ns = kyuu_ebpf::monotonic_ns()
            .saturating_add(c.expires.saturating_duration_since(now).as_nanos() as u64);
        let id = *fp.ids.entry(c.id).or_insert_with(|| {
            fp.next += 1;
            fp.next
        });
        let channel = kyuu_ebpf::Channel {
            client: c.client.remote,
            server: c.client.local,
            number: c.id.channel,
            relay: c.relay,
            peer: c.peer,
            expires_ns,
            to_peer: c.to_peer,
            to_client: c.to_client,
        };
        let result = match fp.shared.lock() {
            Ok(mut k) => k.install(id, channel),
            Err(_) => return,
        };
        if let Err(e) = result {
            fp.ids.remove(&c.id);
            tracing::debug!(target: "kyuu::relay", "fast path: channel stays in userspace: {e}");
        }
    }

    fn fast_path_remove(&mut self, id: FastPathId) {
        let Some(fp) = &mut self.fast_path else {
            return;
        };
        let Some(entry) = fp.ids.remove(&id) else {
            return;
        };
        let [to_peer, to_client] = match fp.shared.lock() {
            Ok(mut k) => k.remove(entry),
            Err(_) => return,
        };
        self.core.fast_path_traffic(
            Instant::now(),
            id,
            (to_peer.packets, to_peer.bytes),
            (to_client.packets, to_client.bytes),
        );
    }

    /// Reads what the kernel relayed since the last tick into the core (metrics, accounting,
    /// `max_bps`).
    fn fast_path_counters(&mut self) {
        let Some(fp) = &mut self.fast_path else {
            return;
        };
        let now = Instant::now();
        if fp.read_at.is_some_and(|t| now < t + FAST_PATH_READ) {
            return;
        }
        fp.read_at = Some(now);
        let Ok(mut k) = fp.shared.lock() else {
            return;
        };
        // Binding answers are global to the program: whichever shard ticks first takes them.
        let b = k.take_bindings();
        if b.answered + b.rate_limited > 0 {
            self.core
                .fast_path_bindings(now, b.answered, b.rate_limited);
        }
        for (id, entry) in &fp.ids {
            let [to_peer, to_client] = k.take_traffic(*entry);
            if to_peer.packets + to_client.packets > 0 {
                self.core.fast_path_traffic(
                    now,
                    *id,
                    (to_peer.packets, to_peer.bytes),
                    (to_client.packets, to_client.bytes),
                );
            }
        }
    }

    /// Hands the kernel's Binding answers and drops since the last call to the core.
    fn fast_path_binding_counters(&mut self) {
        let Some(fp) = &mut self.fast_path else {
            return;
        };
        let b = match fp.shared.lock() {
            Ok(mut k) => k.take_bindings(),
            Err(_) => return,
        };
        if b.answered + b.rate_limited > 0 {
            self.core
                .fast_path_bindings(Instant::now(), b.answered, b.rate_limited);
        }
    }

    /// The shard stops: its entries leave the kernel.
    fn fast_path_clear(&mut self) {
        let Some(fp) = &mut self.fast_path else {
            return;
        };
        if let Ok(mut k) = fp.shared.lock() {
            for (_, entry) in fp.ids.drain() {
                k.remove(entry);
            }
        }
    }

    fn bind_relay(
        &mut self,
        sh: &Sh,
        key: RelayKey,
        addr: SocketAddr,
        proto: RelayProto,
        dont_fragment: bool,
    ) {
        let now = Instant::now();
        match proto {
            RelayProto::Udp => {
                let bound =
                    super::bind_udp(addr, false, self.socket_buffer.min(1 << 20)).and_then(|s| {
                        let state = match &self.relay_state {
                            Some(state) => state.clone(),
                            None => {
                                let state = Rc::new(UdpSocketState::new(UdpSockRef::from(&s))?);
                                self.relay_state = Some(state.clone());
                                state
                            }
                        };
                        relay_socket_options(&s, addr, dont_fragment)?;
                        let local = s.local_addr()?;
                        Ok((Rc::new(register_relay(s)?), state, local))
                    });
                match bound {
                    Ok((sock, state, local)) => {
                        let task = tokio::task::spawn_local(relay_udp_loop(
                            sh.clone(),
                            self.arena.clone(),
                            key,
                            sock.clone(),
                            state.clone(),
                        ));
                        self.relays.insert(
                            key,
                            Relay {
                                udp: Some((sock, state)),
                                dont_fragment,
                                addr: local,
                                _task: AbortOnDrop(task),
                            },
                        );
                        if let Some(s) = &mut self.steer {
                            s.steer(key, local);
                        }
                        self.core.relay_bound(now, key, Ok(local));
                    }
                    Err(e) => {
                        tracing::debug!(target: "kyuu::relay", %addr, "relay bind failed: {e}");
                        eprintln!("relay bind {addr} failed: {e}");
                        self.core.relay_bound(now, key, Err(BindFailed(e.kind())));
                    }
                }
            }
            RelayProto::Tcp => {
                let bound = super::probe_free(addr, socket2::Type::STREAM, socket2::Protocol::TCP)
                    .and_then(|_| super::bind_tcp(addr, true))
                    .and_then(|l| {
                        let local = l.local_addr()?;
                        Ok((TcpListener::from_std(l)?, local))
                    });
                match bound {
                    Ok((listener, local)) => {
                        let task =
                            tokio::task::spawn_local(relay_tcp_accept(sh.clone(), key, listener));
                        self.relays.insert(
                            key,
                            Relay {
                                udp: None,
                                dont_fragment,
                                addr: local,
                                _task: AbortOnDrop(task),
                            },
                        );
                        self.core.relay_bound(now, key, Ok(local));
                    }
                    Err(e) => self.core.relay_bound(now, key, Err(BindFailed(e.kind()))),
                }
            }
        }
    }
}

/// A relay socket's IP options (`icmp.rs`): DF as its allocation asked (RFC 8656 §7.2;
/// overriding what `UdpSocketState::new` set on the first one) and the ICMP error queue
/// (§11.5). The socket is already non-blocking (`bind_udp`). Both are required: without them
/// the relay would not do what the allocation was promised, so the bind fails instead.
fn relay_socket_options(
    s: &std::net::UdpSocket,
    addr: SocketAddr,
    dont_fragment: bool,
) -> std::io::Result<()> {
    icmp::set_dont_fragment(s, addr.is_ipv6(), dont_fragment)?;
    icmp::enable_recverr(s, addr.is_ipv6())
}

fn local_addr(l: SocketAddr, dst_ip: Option<IpAddr>) -> SocketAddr {
    if !l.ip().is_unspecified() {
        return l;
    }
    match dst_ip {
        Some(IpAddr::V6(v6)) if l.is_ipv4() => v6
            .to_ipv4_mapped()
            .map_or(l, |v4| SocketAddr::new(IpAddr::V4(v4), l.port())),
        Some(ip) => SocketAddr::new(ip, l.port()),
        None => l,
    }
}

async fn client_udp_loop(
    sh: Sh,
    arena: Rc<RefCell<Arena>>,
    index: usize,
    sock: Rc<UdpSocket>,
    state: Rc<UdpSocketState>,
) {
    let Some((listen_addr, trust)) = sh
        .borrow()
        .udp
        .get(index)
        .map(|l| (l.addr, l.proxy.clone()))
    else {
        return;
    };
    listener_loop(
        sh,
        arena,
        sock,
        state,
        move |st, now, meta, seg, scratch| {
            let client = ClientSocket {
                transport: Transport::Udp,
                local: local_addr(listen_addr, meta.dst_ip),
                remote: meta.addr,
            };
            let (client, seg) = match &trust {
                None => (client, seg),
                Some(nets) => match st.proxied_datagram(nets, client, seg) {
                    Some(x) => x,
                    None => return,
                },
            };
            if let Some(tp) = st.core.handle_client(now, client, seg) {
                st.relay_packet(now, &tp, seg, scratch);
            }
        },
    )
    .await
}

/// Reads a listener socket (UDP or DTLS clients) in `recvmmsg` batches under the shard's read
/// budget, hands every datagram (every GRO segment) to `each` with the batch's time and the
/// arena's scratch buffer, and carries out the core's outputs after each batch.
async fn listener_loop(
    sh: Sh,
    arena: Rc<RefCell<Arena>>,
    sock: Rc<UdpSocket>,
    state: Rc<UdpSocketState>,
    mut each: impl FnMut(&mut State, Instant, &RecvMeta, &[u8], &mut [u8]),
) {
    loop {
        let Ok(guard) = sock.readable().await else {
            return;
        };
        read_turn(guard, LISTENER_READ_BUDGET, None, false, || {
            let mut ar = arena.borrow_mut();
            let n = match ar.recv(&state, &sock, 0, BATCH) {
                Ok(n) => n,
                Err(e) if is_would_block(&e) => return BatchRead::Drained,
                // A pending socket error is reported once; read on.
                Err(_) => return BatchRead::More,
            };
            let now = Instant::now();
            let mut st = sh.borrow_mut();
            st.answers.active = true;
            let Arena {
                bufs,
                metas,
                scratch,
            } = &mut *ar;
            for (meta, buf) in metas.iter().zip(bufs.iter()).take(n) {
                let data = buf.get(..meta.len).unwrap_or(&[]);
                for seg in data.chunks(meta.stride.max(1)) {
                    each(&mut st, now, meta, seg, scratch);
                }
            }
            st.drain(&sh);
            st.flush_answers();
            st.answers.active = false;
            BatchRead::full_if(n >= BATCH)
        })
        .await;
    }
}

/// What one batch read of a socket's turn found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BatchRead {
    /// A full batch, or a pending socket error reported: the socket may hold more.
    More,
    /// A short batch, or nothing (the read would block): the socket is drained.
    Drained,
}

impl BatchRead {
    fn full_if(full: bool) -> BatchRead {
        if full {
            BatchRead::More
        } else {
            BatchRead::Drained
        }
    }
}

/// One turn of a socket woken readable: calls `batch` (one batch read and its handling) until
/// it finds the socket drained or `budget` batches were read. A drained socket's readiness is
/// cleared (`clear`, or all the guard was woken for when `None`) so the next wait is for new
/// datagrams; a socket still readable when the budget ran out, or any socket when
/// `yield_anyway`, lets the shard's other tasks run before its next turn.
async fn read_turn(
    mut guard: AsyncFdReadyGuard<'_, std::net::UdpSocket>,
    budget: usize,
    clear: Option<tokio::io::Ready>,
    yield_anyway: bool,
    mut batch: impl FnMut() -> BatchRead,
) {
    let mut exhausted = true;
    for _ in 0..budget {
        if batch() == BatchRead::Drained {
            match clear {
                Some(ready) => guard.clear_ready_matching(ready),
                None => guard.clear_ready(),
            }
            exhausted = false;
            break;
        }
    }
    drop(guard);
    if exhausted || yield_anyway {
        tokio::task::yield_now().await;
    }
}

/// Reads up to [`icmp::ERRQUEUE_BUDGET`] entries of a relay socket's error queue and passes the
/// ICMP errors among them to the core (RFC 8656 §11.5). Returns whether the queue is now empty
/// (or unreadable, which no retry would change).
fn relay_errors(sh: &Sh, key: RelayKey, sock: &UdpSocket) -> bool {
    let mut st = sh.borrow_mut();
    let mut emptied = false;
    for _ in 0..icmp::ERRQUEUE_BUDGET {
        match icmp::read_error(sock.get_ref()) {
            Ok(Some(e)) => {
                let mut out = [0u8; kyuu_turn::ICMP_INDICATION_MAX];
                if let Some(tc) = st.core.handle_icmp(Instant::now(), key, e, &mut out) {
                    if let Some(b) = out.get(tc.data) {
                        st.send_client(tc.client, b);
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                if !icmp::is_empty(&e) {
                    tracing::debug!(target: "kyuu::relay", "error queue: {e}");
                }
                emptied = true;
                break;
            }
        }
    }
    st.drain(sh);
    emptied
}

/// The listener of `list` that answers for `local` (itself, or a wildcard on its port).
fn find_listener(list: &[Listener], local: SocketAddr) -> Option<&Listener> {
    list.iter().find(|l| {
        l.addr == local
            || (l.addr.ip().is_unspecified()
                && l.addr.port() == local.port()
                && l.addr.is_ipv4() == local.is_ipv4())
    })
}

/// A DTLS listener (RFC 7350): datagrams go through the association table, whose decrypted
/// records reach the core like UDP datagrams from a `Transport::Dtls` client.
async fn dtls_udp_loop(
    sh: Sh,
    arena: Rc<RefCell<Arena>>,
    index: usize,
    sock: Rc<UdpSocket>,
    state: Rc<UdpSocketState>,
) {
    let Some(listen_addr) = sh.borrow().dtls_socks.get(index).map(|l| l.addr) else {
        return;
    };
    listener_loop(sh, arena, sock, state, move |st, now, meta, seg, _| {
        let client = ClientSocket {
            transport: Transport::Dtls,
            local: local_addr(listen_addr, meta.dst_ip),
            remote: meta.addr,
        };
        st.dtls_datagram(now, client, seg);
    })
    .await
}

/// Once a second: drops DTLS handshakes past their deadline and idle associations without an
/// allocation, and publishes the association gauges.
async fn dtls_sweep_loop(sh: Sh) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut st = sh.borrow_mut();
        let st = &mut *st;
        let Some(ep) = st.dtls.as_mut() else {
            return;
        };
        let core = &st.core;
        let swept = ep.sweep(now, |local, remote| {
            core.has_allocation(&ClientSocket {
                transport: Transport::Dtls,
                local,
                remote,
            })
        });
        metrics::gauge!("kyuu_relay_dtls_associations").set(ep.len() as f64);
        metrics::gauge!("kyuu_relay_dtls_handshakes").set(ep.handshakes() as f64);
        for c in swept {
            st.send_dtls(c.local, c.remote, &c.send);
            if c.established {
                st.core.client_closed(
                    now,
                    ClientSocket {
                        transport: Transport::Dtls,
                        local: c.local,
                        remote: c.remote,
                    },
                );
            }
        }
        st.drain(&sh);
    }
}

async fn relay_udp_loop(
    sh: Sh,
    arena: Rc<RefCell<Arena>>,
    key: RelayKey,
    sock: Rc<UdpSocket>,
    state: Rc<UdpSocketState>,
) {
    loop {
        let Ok(mut guard) = sock
            .ready(tokio::io::Interest::READABLE | tokio::io::Interest::ERROR)
            .await
        else {
            return;
        };
        // ICMP errors (RFC 8656 §11.5), a bounded number per wake-up. Error readiness is
        // cleared only once the queue is empty; a longer queue is read on the next turn, after
        // the datagrams, so neither side can starve the other.
        let mut errors_left = false;
        if guard.ready().is_error() {
            errors_left = !relay_errors(&sh, key, &sock);
            if !errors_left {
                guard.clear_ready_matching(tokio::io::Ready::ERROR);
            }
        }
        // What the datagram loop may clear when the socket has no more datagrams.
        let drained = if errors_left {
            tokio::io::Ready::READABLE
        } else {
            tokio::io::Ready::ALL
        };
        if !guard.ready().is_readable() {
            drop(guard);
            tokio::task::yield_now().await;
            continue;
        }
        read_turn(guard, READ_BUDGET, Some(drained), errors_left, || {
            let mut ar = arena.borrow_mut();
            let n = match ar.recv(&state, &sock, PEER_HEADROOM, RELAY_BATCH) {
                Ok(n) => n,
                Err(e) if is_would_block(&e) => return BatchRead::Drained,
                // A pending socket error is reported once; read on.
                Err(_) => return BatchRead::More,
            };
            let now = Instant::now();
            let mut st = sh.borrow_mut();
            st.relay_in += n as u64;
            let Arena {
                bufs,
                metas,
                scratch,
            } = &mut *ar;
            for (meta, buf) in metas.iter().zip(bufs.iter_mut()).take(n) {
                let peer = PeerAddr::new(meta.addr);
                let stride = meta.stride.max(1);
                if meta.len <= stride {
                    let payload = PEER_HEADROOM..PEER_HEADROOM + meta.len;
                    if let Some(tc) = st.core.handle_peer(now, key, peer, buf, payload) {
                        if let Some(out) = buf.get(tc.data) {
                            st.send_client(tc.client, out);
                        }
                    }
                    continue;
                }
                // GRO-coalesced: copy each segment behind headroom.
                let total = meta.len;
                let mut off = 0;
                while off < total {
                    let len = stride.min(total - off);
                    let src = PEER_HEADROOM + off..PEER_HEADROOM + off + len;
                    let (Some(seg), Some(dst)) = (
                        buf.get(src),
                        scratch.get_mut(PEER_HEADROOM..PEER_HEADROOM + len),
                    ) else {
                        break;
                    };
                    dst.copy_from_slice(seg);
                    if let Some(tc) = st.core.handle_peer(
                        now,
                        key,
                        peer,
                        scratch,
                        PEER_HEADROOM..PEER_HEADROOM + len,
                    ) {
                        if let Some(out) = scratch.get(tc.data) {
                            st.send_client(tc.client, out);
                        }
                    }
                    off += len;
                }
            }
            st.drain(&sh);
            BatchRead::full_if(n >= RELAY_BATCH)
        })
        .await;
    }
}

/// Pre-authentication limits of the STUN/TURN stream listeners (`[listen]`, see
/// `crate::limits`), shared by every shard.
#[derive(Debug)]
pub(crate) struct StreamLimits {
    pub conns: Arc<crate::limits::ConnLimiter>,
    /// Until the first complete STUN message or ChannelData (`None`: no limit).
    pub first_message: Option<Duration>,
    pub tls_handshake: Duration,
}

async fn accept_loop(
    sh: Sh,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Arc<StreamLimits>,
    proxy_trust: Option<Rc<[IpNet]>>,
) {
    let transport = if tls.is_some() { "tls" } else { "tcp" };
    loop {
        let Ok((mut stream, mut remote)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Behind a PROXY protocol balancer every connection comes from the balancer: the
        // per-IP cap applies to the client its header names, once it is read.
        let mut guard = None;
        match &proxy_trust {
            Some(nets) => {
                if !proxy::trusted(nets, remote.ip()) {
                    proxy::refused(transport, "untrusted");
                    continue;
                }
            }
            // Over the per-IP cap: dropped (closed) before any buffer or task exists for it.
            None => match limits.conns.admit(remote.ip()) {
                Some(g) => guard = Some(g),
                None => continue,
            },
        }
        let _ = stream.set_nodelay(true);
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let sh = sh.clone();
        let proxied = proxy_trust.is_some();
        let first = limits.first_message;
        let limits = limits.clone();
        let tls = tls.clone();
        tokio::task::spawn_local(async move {
            let mut guard = guard;
            if proxied {
                match proxy::read_stream_header(&mut stream, transport, remote).await {
                    Some(real) => remote = real,
                    None => return,
                }
                match limits.conns.admit(remote.ip()) {
                    Some(g) => guard = Some(g),
                    None => return,
                }
            }
            let _guard = guard;
            let Some(acc) = tls else {
                let client = ClientSocket {
                    transport: Transport::Tcp,
                    local,
                    remote,
                };
                stream_task(sh, stream, client, first).await;
                return;
            };
            let s = match tokio::time::timeout(limits.tls_handshake, acc.accept(stream)).await {
                Ok(Ok(s)) => s,
                Ok(Err(_)) => {
                    metrics::counter!("kyuu_relay_tls_handshake_failures_total").increment(1);
                    return;
                }
                Err(_) => {
                    metrics::counter!("kyuu_relay_tls_handshake_failures_total").increment(1);
                    crate::limits::closed("stun_tls", "tls_handshake_timeout");
                    return;
                }
            };
            let client = ClientSocket {
                transport: Transport::Tls,
                local,
                remote,
            };
            stream_task(sh, s, client, first).await;
        });
    }
}

/// The metrics label of a STUN/TURN stream listener.
fn stream_listener(t: Transport) -> &'static str {
    match t {
        Transport::Tls => "stun_tls",
        Transport::Tcp | Transport::Udp | Transport::Dtls => "stun_tcp",
    }
}

/// Read buffer of a new stream connection; grown up to [`STREAM_BUF_MAX`] as messages need, so
/// thousands of idle connections cost little.
const STREAM_BUF_START: usize = 2048;
/// The largest STUN message (64 KiB + header) or ChannelData frame, with room to spare.
const STREAM_BUF_MAX: usize = 70_000;

/// A client's TCP or TLS connection: RFC 8489 §6.2.2 framing in, queued messages out.
/// `first_message`: the connection is closed unless one complete frame arrives in time.
async fn stream_task<S: AsyncRead + AsyncWrite + Unpin>(
    sh: Sh,
    mut s: S,
    client: ClientSocket,
    first_message: Option<Duration>,
) {
    let key = (client.local, client.remote);
    let (tx, mut rx) = mpsc::channel(STREAM_QUEUE);
    sh.borrow_mut().streams.insert(key, tx);
    let mut buf = vec![0u8; STREAM_BUF_START];
    let mut filled = 0usize;
    let mut splice_with = None;
    let first_deadline = first_message.map(|d| tokio::time::Instant::now() + d);
    let mut got_frame = false;
    'conn: loop {
        if filled == buf.len() && buf.len() < STREAM_BUF_MAX {
            buf.resize((buf.len() * 2).min(STREAM_BUF_MAX), 0);
        }
        let idle = match first_deadline {
            Some(d) if !got_frame => d.saturating_duration_since(tokio::time::Instant::now()),
            _ => STREAM_IDLE_TIMEOUT,
        };
        tokio::select! {
            r = tokio::time::timeout(idle, s.read(buf.get_mut(filled..).unwrap_or(&mut []))) => {
                let n = match r {
                    Ok(Ok(n)) if n > 0 => n,
                    Err(_) if !got_frame => {
                        crate::limits::closed(stream_listener(client.transport), "first_message_timeout");
                        break 'conn;
                    }
                    Err(_) if sh.borrow().core.has_allocation(&client) => continue 'conn,
                    _ => break 'conn,
                };
                filled += n;
                let mut off = 0;
                loop {
                    let Some(rest) = buf.get(off..filled) else { break 'conn };
                    match frame_len(rest) {
                        Ok(Some(len)) if len <= rest.len() => {
                            let Some(frame) = rest.get(..len) else { break 'conn };
                            got_frame = true;
                            let now = Instant::now();
                            let mut st = sh.borrow_mut();
                            if let Some(tp) = st.core.handle_client(now, client, frame) {
                                st.send_peer(&tp, frame);
                            }
                            st.drain(&sh);
                            off += len;
                            if let Some(peer) = st.splices.remove(&key) {
                                splice_with = Some((peer, off));
                                break 'conn;
                            }
                        }
                        Ok(_) => break,
                        Err(_) => {
                            metrics::counter!("kyuu_turn_dropped_total", "reason" => "bad_stream_framing").increment(1);
                            break 'conn;
                        }
                    }
                }
                buf.copy_within(off..filled, 0);
                filled -= off;
            }
            cmd = rx.recv() => {
                match cmd {
                    Some(StreamCmd::Data(d)) => {
                        if !matches!(tokio::time::timeout(STREAM_WRITE_TIMEOUT, s.write_all(&d)).await, Ok(Ok(()))) {
                            break 'conn;
                        }
                    }
                    Some(StreamCmd::Close) | None => break 'conn,
                }
            }
        }
    }
    {
        let mut st = sh.borrow_mut();
        st.streams.remove(&key);
        st.core.client_closed(Instant::now(), client);
        st.drain(&sh);
    }
    if let Some((mut peer, off)) = splice_with {
        // Flush what the core queued (the ConnectionBind answer), then join the two streams.
        while let Ok(StreamCmd::Data(d)) = rx.try_recv() {
            if s.write_all(&d).await.is_err() {
                return;
            }
        }
        let label = client.transport.label();
        if let Some(rest) = buf.get(off..filled) {
            if peer.write_all(rest).await.is_err() {
                return;
            }
            relayed(label, "to_peer", rest.len());
        }
        let (mut cr, mut cw) = tokio::io::split(s);
        let (mut pr, mut pw) = peer.split();
        let _ = tokio::join!(
            counted_copy(&mut cr, &mut pw, label, "to_peer"),
            counted_copy(&mut pr, &mut cw, label, "to_client"),
        );
    }
}

/// RFC 6062 relayed bytes, counted in the same `kyuu_turn_relayed_*` series as UDP relaying
/// (`transport` is the client's; a "packet" of a stream is one read).
fn relayed(transport: &'static str, direction: &'static str, bytes: usize) {
    if bytes == 0 {
        return;
    }
    metrics::counter!("kyuu_turn_relayed_packets_total", "direction" => direction, "transport" => transport)
        .increment(1);
    metrics::counter!("kyuu_turn_relayed_bytes_total", "direction" => direction, "transport" => transport)
        .increment(bytes as u64);
}

/// Copies one direction of a spliced RFC 6062 connection pair until EOF or an error, counting
/// what it relays; shuts the writer down at the end so the other side sees EOF.
async fn counted_copy<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    r: &mut R,
    w: &mut W,
    transport: &'static str,
    direction: &'static str,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(n) if n > 0 => n,
            _ => break,
        };
        let Some(chunk) = buf.get(..n) else { break };
        if w.write_all(chunk).await.is_err() {
            break;
        }
        relayed(transport, direction, n);
    }
    let _ = w.shutdown().await;
}

async fn connect_peer(sh: Sh, from: SocketAddr, peer: PeerAddr, connection_id: ConnectionId) {
    let attempt = async {
        let sock = if from.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        sock.set_reuseaddr(true)?;
        sock.set_reuseport(true)?;
        sock.bind(from)?;
        sock.connect(peer.addr()).await
    };
    let res = tokio::time::timeout(PEER_CONNECT_TIMEOUT, attempt).await;
    let mut st = sh.borrow_mut();
    match res {
        Ok(Ok(stream)) => {
            st.peer_conns.insert(connection_id, stream);
            st.core.peer_connected(Instant::now(), connection_id, true);
        }
        _ => st.core.peer_connected(Instant::now(), connection_id, false),
    }
    st.drain(&sh);
}

async fn relay_tcp_accept(sh: Sh, key: RelayKey, listener: TcpListener) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut st = sh.borrow_mut();
        if let Some(id) = st
            .core
            .peer_connection_accepted(Instant::now(), key, PeerAddr::new(peer))
        {
            st.peer_conns.insert(id, stream);
        }
        st.drain(&sh);
    }
}
