//! Tokio shells around the sans-IO [`Node`] and [`Peer`].
//!
//! * [`spawn_node`]: a node on a UDP socket of its own (standalone control port, e.g. beside
//!   coturn, or the lab), or fed by the STUN/TURN server's extension channel with
//!   [`spawn_node_with`].
//! * [`run_peer`]: the whole peer algorithm over one UDP socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::fleet::{Owner, RawrFleet};
use super::sys::HostNet;
use kyuu_rawr::config::{ConfigError, RawrConfig};
use kyuu_rawr::node::{FleetRoute, Node, Output, Stats};
use kyuu_rawr::peer::{Outcome, Peer, PeerConfig, PeerError, PeerOutput};
use kyuu_rawr::wire::Mac;

use kyuu_stun::rest::unix_now;

/// Sources remembered as having used the node's own socket (bounded; cleared when full).
const SOCKET_CLIENTS_MAX: usize = 4096;

/// Sends downstream answers when requests arrive through the STUN server rather than the node's
/// own socket: `(client, bytes)`.
pub type ReplyFn = Box<dyn Fn(SocketAddr, Vec<u8>) + Send + Sync>;

/// A session paired at this node, for the TURN server (`docs/rawr.md` §6.1, §4.6): link the two
/// allocations in-process, hold each side to the limits, and send the username of a side cut by
/// them to `ended`.
#[derive(Debug, Clone)]
pub struct PairRequest {
    pub usernames: [String; 2],
    /// The credential lifetime.
    pub lifetime: Duration,
    pub max_bytes: u64,
    pub max_secs: u64,
    pub ended: mpsc::UnboundedSender<String>,
}

/// Called for every session that pairs at this node.
pub type PairFn = Box<dyn Fn(PairRequest) + Send + Sync>;

/// Requests handed over by the STUN/TURN server: `(client, bytes)`.
pub type Inbound = mpsc::Receiver<(SocketAddr, Vec<u8>)>;

enum Cmd {
    Stats(oneshot::Sender<Stats>),
}

/// A running node. Dropping it stops the node.
#[derive(Debug)]
pub struct NodeHandle {
    cmd: mpsc::Sender<Cmd>,
    task: JoinHandle<()>,
    /// The neighbour-table refresher.
    refresher: JoinHandle<()>,
    local: SocketAddr,
}

impl NodeHandle {
    /// The node's own UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub async fn stats(&self) -> Option<Stats> {
        let (tx, rx) = oneshot::channel();
        self.cmd.send(Cmd::Stats(tx)).await.ok()?;
        rx.await.ok()
    }

    /// Stops the node (as a crash would: pending state is lost).
    pub fn kill(&self) {
        self.task.abort();
        self.refresher.abort();
    }
}

impl Drop for NodeHandle {
    fn drop(&mut self) {
        self.task.abort();
        self.refresher.abort();
    }
}

/// Runs a node on `socket`: requests from peers and children arrive on it, and it sends its own
/// upstream requests from it.
pub fn spawn_node(cfg: RawrConfig, socket: UdpSocket) -> Result<NodeHandle, ConfigError> {
    spawn_node_with(cfg, socket, None)
}

/// Runs a node whose downstream requests come from the STUN/TURN server (`inbound`), answered
/// through `reply`; `socket` carries only its upstream requests. With `inbound = None` the node
/// serves requests on `socket` too.
pub fn spawn_node_with(
    cfg: RawrConfig,
    socket: UdpSocket,
    ext: Option<(Inbound, ReplyFn)>,
) -> Result<NodeHandle, ConfigError> {
    let host = HostNet::new(cfg.netns.clone());
    spawn_node_on(cfg, socket, ext, host)
}

/// [`spawn_node_with`] reading host facts through `host`.
pub fn spawn_node_on(
    cfg: RawrConfig,
    socket: UdpSocket,
    ext: Option<(Inbound, ReplyFn)>,
    host: HostNet,
) -> Result<NodeHandle, ConfigError> {
    spawn_node_full(cfg, socket, ext, host, None)
}

/// [`spawn_node_on`] telling `on_paired` about every session that pairs here.
pub fn spawn_node_full(
    cfg: RawrConfig,
    socket: UdpSocket,
    ext: Option<(Inbound, ReplyFn)>,
    host: HostNet,
    on_paired: Option<PairFn>,
) -> Result<NodeHandle, ConfigError> {
    spawn_node_fleet(cfg, socket, ext, host, on_paired, None)
}

/// [`spawn_node_full`] as one root node of a fleet (`docs/rawr.md` §4.7): a session's root
/// requests go to the fleet node that claimed it in Redis.
pub fn spawn_node_fleet(
    cfg: RawrConfig,
    socket: UdpSocket,
    ext: Option<(Inbound, ReplyFn)>,
    host: HostNet,
    on_paired: Option<PairFn>,
    fleet: Option<Arc<RawrFleet>>,
) -> Result<NodeHandle, ConfigError> {
    cfg.validate()?;
    let cred_lifetime = Duration::from_secs(u64::from(cfg.limits.credential_lifetime_s));
    let (ended_tx, mut ended_rx) = mpsc::unbounded_channel::<String>();
    let networks = cfg.parsed_networks()?;
    let local = socket
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (tx, mut rx) = mpsc::channel(16);
    let seed: u64 = rand::random();
    let mut node = Node::new(&cfg, Instant::now(), unix_now(), seed);
    let socket = Arc::new(socket);
    let never = Instant::now()
        .checked_sub(NEIGHBOUR_REFRESH * 4)
        .unwrap_or_else(Instant::now);
    let (ntx, mut neigh) = tokio::sync::watch::channel((never, Vec::new()));
    let refresher = tokio::spawn(refresh_neighbours(host.clone(), networks.clone(), ntx));
    let task = tokio::spawn(async move {
        let (mut inbound, reply) = match ext {
            Some((i, r)) => (Some(i), Some(r)),
            None => (None, None),
        };
        let mut buf = vec![0u8; 4096];
        let mut socket_clients = std::collections::HashSet::new();
        let mut forwarded = 0u64;
        let (owner_tx, mut owner_rx) = mpsc::channel::<(Vec<u8>, Owner)>(256);
        let mut fl = fleet.map(|f| FleetState::new(f, owner_tx));
        // Requests for the node after the fleet routing: (from, data).
        let mut ready: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
        for _ in 0..u64::MAX {
            let wake = node
                .poll_timeout()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            let tick = tokio::time::Instant::now()
                + if fl.is_some() {
                    FLEET_TICK
                } else {
                    Duration::from_secs(3600)
                };
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    let data = buf.get(..n).unwrap_or(&[]).to_vec();
                    if let Some((client, via_socket)) = fl.as_mut().and_then(|f| f.answer(&data)) {
                        // The answer of a fleet node to a request forwarded there.
                        match (&reply, via_socket) {
                            (Some(reply), false) => reply(client, data),
                            _ => { let _ = socket.send_to(&data, client).await; }
                        }
                        continue;
                    }
                    if reply.is_some() {
                        // A request on the node's own socket (the HTTP form, or a node that
                        // was given this address) is answered on that socket too.
                        if socket_clients.len() >= SOCKET_CLIENTS_MAX {
                            socket_clients.clear();
                        }
                        socket_clients.insert(from);
                    }
                    ready.push((from, data));
                }
                Some((from, data)) = recv_opt(&mut inbound) => ready.push((from, data)),
                Some((session, owner)) = owner_rx.recv() => {
                    if let Some(f) = fl.as_mut() {
                        ready.extend(f.resolved(session, owner));
                    }
                }
                _ = tokio::time::sleep_until(tick) => {
                    if let Some(f) = fl.as_mut() {
                        f.tick(Instant::now());
                    }
                }
                _ = tokio::time::sleep_until(wake) => node.handle_timeout(Instant::now()),
                Some(user) = ended_rx.recv() => {
                    tracing::info!(node = node.name(), %user, "rawr: session limit reached");
                    node.session_exhausted(Instant::now(), &user);
                }
                c = rx.recv() => match c {
                    Some(Cmd::Stats(tx)) => { let _ = tx.send(node.stats()); }
                    None => break,
                },
            }
            for (from, data) in std::mem::take(&mut ready) {
                let via_socket = reply.is_none() || socket_clients.contains(&from);
                let data = match fl.as_mut() {
                    Some(f) => match f.intake(&node, from, data, via_socket) {
                        Intake::Local(d) => d,
                        Intake::Forward(to, bytes) => {
                            let _ = socket.send_to(&bytes, to).await;
                            continue;
                        }
                        Intake::Queued => continue,
                    },
                    None => data,
                };
                refresh_if_connect(&mut node, &host, &networks, &mut neigh, &data).await;
                node.handle_input(Instant::now(), from, &data);
            }
            while let Some(o) = node.poll_output() {
                match o {
                    Output::Transmit { to, data, upstream } => match (&reply, upstream) {
                        (Some(reply), false) if !socket_clients.contains(&to) => reply(to, data),
                        _ => {
                            let _ = socket.send_to(&data, to).await;
                        }
                    },
                    Output::Paired {
                        tag,
                        usernames,
                        max_bytes,
                        max_secs,
                    } => {
                        metrics::counter!("kyuu_rawr_paired_total").increment(1);
                        tracing::info!(node = node.name(), %tag, ?usernames, "rawr: paired");
                        if let Some(f) = &on_paired {
                            f(PairRequest {
                                usernames,
                                lifetime: cred_lifetime,
                                max_bytes,
                                max_secs,
                                ended: ended_tx.clone(),
                            });
                        }
                    }
                }
            }
            let st = node.stats();
            metrics::gauge!("kyuu_rawr_pending").set(st.pending as f64);
            metrics::gauge!("kyuu_rawr_exchanges").set(st.exchanges as f64);
            metrics::gauge!("kyuu_rawr_registrations").set(st.registrations as f64);
            if st.forwarded > forwarded {
                metrics::counter!("kyuu_rawr_forwarded_total").increment(st.forwarded - forwarded);
                forwarded = st.forwarded;
            }
        }
    });
    Ok(NodeHandle {
        cmd: tx,
        task,
        refresher,
        local,
    })
}

/// How often a fleet node checks its forwarded requests for an owner that stopped answering.
const FLEET_TICK: Duration = Duration::from_millis(250);
/// A fleet owner that sent nothing back for this long after a forwarded request is taken for
/// dead: the session's next requests are handled here (per-node behaviour).
const OWNER_SILENT: Duration = Duration::from_secs(1);
const OWNERS_MAX: usize = 65_536;
const PROXIED_MAX: usize = 65_536;
/// Requests of one session waiting for its owner lookup.
const QUEUED_MAX: usize = 8;
const LOOKUPS_MAX: usize = 1024;

/// What to do with a request arriving at a fleet node.
enum Intake {
    /// Hand it to this node.
    Local(Vec<u8>),
    /// Send these bytes to the owner.
    Forward(SocketAddr, Vec<u8>),
    /// Waiting for Redis.
    Queued,
}

type Waiting = (SocketAddr, Vec<u8>, bool);

struct Proxied {
    client: SocketAddr,
    via_socket: bool,
    session: Vec<u8>,
    sent: Instant,
    heard: bool,
}

/// A fleet node's routing state (`docs/rawr.md` §4.7); all of it in this process, so Redis
/// going away loses none of it.
struct FleetState {
    fleet: Arc<RawrFleet>,
    owners: std::collections::HashMap<Vec<u8>, (Owner, Instant)>,
    /// Requests waiting for their session's owner lookup: (from, data, via the node's socket).
    lookups: std::collections::HashMap<Vec<u8>, Vec<Waiting>>,
    proxied: std::collections::HashMap<kyuu_stun::TransactionId, Proxied>,
    tx: mpsc::Sender<(Vec<u8>, Owner)>,
}

impl FleetState {
    fn new(fleet: Arc<RawrFleet>, tx: mpsc::Sender<(Vec<u8>, Owner)>) -> FleetState {
        FleetState {
            fleet,
            owners: std::collections::HashMap::new(),
            lookups: std::collections::HashMap::new(),
            proxied: std::collections::HashMap::new(),
            tx,
        }
    }

    fn intake(&mut self, node: &Node, from: SocketAddr, data: Vec<u8>, via_socket: bool) -> Intake {
        let Some(route) = node.fleet_route(&data) else {
            return Intake::Local(data);
        };
        let (session, claim) = match route {
            FleetRoute::Claim(s) => (s, true),
            FleetRoute::Lookup(s) => (s, false),
        };
        let now = Instant::now();
        match self.owners.get(&session) {
            Some((Owner::Me, exp)) if *exp > now => return Intake::Local(data),
            Some((Owner::Other(to), exp)) if *exp > now => {
                let to = *to;
                return self.forward(node, session, from, data, via_socket, to);
            }
            _ => {}
        }
        if let Some(q) = self.lookups.get_mut(&session) {
            if q.len() < QUEUED_MAX {
                q.push((from, data, via_socket));
            }
            return Intake::Queued;
        }
        if self.lookups.len() >= LOOKUPS_MAX {
            // Redis is not keeping up: keep the session here.
            return Intake::Local(data);
        }
        self.lookups
            .insert(session.clone(), vec![(from, data, via_socket)]);
        let (fleet, tx) = (self.fleet.clone(), self.tx.clone());
        tokio::spawn(async move {
            let owner = fleet.owner(&session, claim).await;
            let _ = tx.send((session, owner)).await;
        });
        Intake::Queued
    }

    fn forward(
        &mut self,
        node: &Node,
        session: Vec<u8>,
        from: SocketAddr,
        data: Vec<u8>,
        via_socket: bool,
        to: SocketAddr,
    ) -> Intake {
        let Some(bytes) = node.fleet_forward(&data, to) else {
            return Intake::Local(data);
        };
        let Ok(m) = kyuu_stun::Message::parse(&bytes) else {
            return Intake::Local(data);
        };
        if self.proxied.len() >= PROXIED_MAX {
            let cut = Instant::now() - kyuu_rawr_linger();
            self.proxied.retain(|_, p| p.sent > cut);
            if self.proxied.len() >= PROXIED_MAX {
                self.proxied.clear();
            }
        }
        let tid = *m.transaction_id();
        let sent = Instant::now();
        match self.proxied.get_mut(&tid) {
            // A retransmission: the owner's silence counts from the first send.
            Some(p) if p.client == from => p.via_socket = via_socket,
            _ => {
                self.proxied.insert(
                    tid,
                    Proxied {
                        client: from,
                        via_socket,
                        session,
                        sent,
                        heard: false,
                    },
                );
            }
        }
        metrics::counter!("kyuu_rawr_fleet_forwarded_total").increment(1);
        Intake::Forward(to, bytes)
    }

    /// The owner of `session` is known: the queued requests, for [`FleetState::intake`] again.
    fn resolved(&mut self, session: Vec<u8>, owner: Owner) -> Vec<(SocketAddr, Vec<u8>)> {
        let now = Instant::now();
        if self.owners.len() >= OWNERS_MAX {
            self.owners.retain(|_, (_, exp)| *exp > now);
            if self.owners.len() >= OWNERS_MAX {
                self.owners.clear();
            }
        }
        self.owners
            .insert(session.clone(), (owner, now + super::fleet::CLAIM_TTL));
        self.lookups
            .remove(&session)
            .unwrap_or_default()
            .into_iter()
            .map(|(from, data, _)| (from, data))
            .collect()
    }

    /// `Some(client, via_socket)` when `data` is an owner's answer (or pending indication) to a
    /// request forwarded for `client`.
    fn answer(&mut self, data: &[u8]) -> Option<(SocketAddr, bool)> {
        let m = kyuu_stun::Message::parse(data).ok()?;
        if m.class() == kyuu_stun::Class::Request {
            return None;
        }
        let p = self.proxied.get_mut(m.transaction_id())?;
        p.heard = true;
        Some((p.client, p.via_socket))
    }

    /// Owners silent for [`OWNER_SILENT`] after a forwarded request are taken for dead; old
    /// entries are forgotten.
    fn tick(&mut self, now: Instant) {
        let mut dead = Vec::new();
        self.proxied.retain(|_, p| {
            if !p.heard && now.saturating_duration_since(p.sent) >= OWNER_SILENT {
                dead.push(p.session.clone());
                return false;
            }
            now.saturating_duration_since(p.sent) < kyuu_rawr_linger()
        });
        for s in dead {
            if let Some((Owner::Other(a), _)) = self.owners.get(&s) {
                tracing::warn!(owner = %a, "rawr fleet: session owner silent; keeping the session here");
                self.owners
                    .insert(s, (Owner::Me, now + super::fleet::CLAIM_TTL));
            }
        }
    }
}

/// How long a forwarded request's route back is kept (the peer's whole algorithm).
fn kyuu_rawr_linger() -> Duration {
    Duration::from_secs(60)
}

async fn recv_opt(rx: &mut Option<Inbound>) -> Option<(SocketAddr, Vec<u8>)> {
    match rx {
        Some(r) => r.recv().await,
        None => std::future::pending().await,
    }
}

/// How often the neighbour table is re-read in the background.
const NEIGHBOUR_REFRESH: Duration = Duration::from_millis(250);

/// Reads the neighbour table every [`NEIGHBOUR_REFRESH`] into `tx` (MACs on `networks`).
async fn refresh_neighbours(
    host: HostNet,
    networks: Vec<ipnet::IpNet>,
    tx: tokio::sync::watch::Sender<(Instant, Vec<Mac>)>,
) {
    for _ in 0..u64::MAX {
        match host.neighbours().await {
            Ok(n) => {
                let macs = n
                    .into_iter()
                    .filter(|(ip, _)| {
                        networks.is_empty() || networks.iter().any(|p| p.contains(ip))
                    })
                    .map(|(_, mac)| mac)
                    .collect();
                if tx.send((Instant::now(), macs)).is_err() {
                    return;
                }
            }
            Err(e) => tracing::warn!("rawr: cannot read the neighbour table: {e}"),
        }
        tokio::time::sleep(NEIGHBOUR_REFRESH).await;
    }
}

/// Rule 2 wants a recent neighbour table before a Connect that may consult it: use the
/// background snapshot when it is recent, else read now. Rule 2 only saves upstream traffic
/// (the pair still meets at the lowest common node by rule 1), so a snapshot a few hundred
/// milliseconds old is good enough and keeps reads off the critical path.
async fn refresh_if_connect(
    node: &mut Node,
    host: &HostNet,
    networks: &[ipnet::IpNet],
    neigh: &mut tokio::sync::watch::Receiver<(Instant, Vec<Mac>)>,
    data: &[u8],
) {
    if !node.needs_neighbours(data) {
        return;
    }
    let fresh = {
        let snap = neigh.borrow_and_update();
        (snap.0.elapsed() <= NEIGHBOUR_REFRESH * 2).then(|| snap.1.clone())
    };
    if let Some(macs) = fresh {
        node.set_neighbours(macs);
        return;
    }
    match host.neighbours().await {
        Ok(n) => node.set_neighbours(
            n.into_iter()
                .filter(|(ip, _)| networks.is_empty() || networks.iter().any(|p| p.contains(ip)))
                .map(|(_, mac)| mac),
        ),
        Err(e) => tracing::warn!("rawr: cannot read the neighbour table: {e}"),
    }
}

/// What a peer needs besides its [`PeerConfig`].
#[derive(Debug, Clone, Default)]
pub struct PeerEnv {
    pub host: HostNet,
}

/// The peer's MAC and host address toward `toward` (its gateway, else the root).
pub async fn local_identity(
    host: &HostNet,
    toward: IpAddr,
) -> Result<(Mac, IpAddr), super::sys::SysError> {
    host.mac_toward(toward).await
}

/// Runs the peer algorithm on `socket` to completion.
pub async fn run_peer(
    cfg: PeerConfig,
    socket: &UdpSocket,
    env: &PeerEnv,
) -> Result<Outcome, PeerError> {
    let mut peer = Peer::new(cfg, rand::random());
    peer.start(Instant::now());
    let mut buf = vec![0u8; 4096];
    for _ in 0..1_000_000u32 {
        while let Some(o) = peer.poll_output() {
            match o {
                PeerOutput::Transmit { to, data } => {
                    let _ = socket.send_to(&data, to).await;
                }
                PeerOutput::CheckNeighbour { mac, hosts } => {
                    let on = check_neighbour(socket, &env.host, mac, &hosts).await;
                    peer.neighbour_result(Instant::now(), on);
                }
                PeerOutput::Done(o) => return Ok(*o),
                PeerOutput::Failed(e) => return Err(e),
            }
        }
        let Some(wake) = peer.poll_timeout() else {
            break;
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    peer.handle_input(Instant::now(), from, buf.get(..n).unwrap_or(&[]));
                }
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                peer.handle_timeout(Instant::now());
            }
        }
    }
    Err(PeerError::Deadline(Duration::ZERO))
}

/// §8 step 2: probe the other's host addresses, then look for its MAC in the neighbour table.
async fn check_neighbour(
    socket: &UdpSocket,
    host: &HostNet,
    mac: Mac,
    hosts: &[SocketAddr],
) -> bool {
    let mut on_link = Vec::new();
    for h in hosts {
        if host.is_on_link(h.ip()).await {
            on_link.push(*h);
        }
    }
    if on_link.is_empty() {
        return false;
    }
    for h in &on_link {
        let _ = socket.send_to(&[0u8], h).await;
    }
    for _ in 0..6 {
        match host.neighbours().await {
            Ok(n) if n.iter().any(|(_, m)| *m == mac) => return true,
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("rawr: cannot read the neighbour table: {e}");
                return false;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("rawr.listen is unset and no STUN-port extension was given: the node has no input")]
    NoInput,
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Starts the node for `kyuu serve`: with `ext` (the STUN/TURN server's extension channel for
/// methods 0xC01-0xC0F and its reply function) requests arrive through the STUN port and the
/// node binds `rawr.listen` or an ephemeral port for its upstream requests; without `ext` it
/// serves on `rawr.listen`.
pub async fn start(
    cfg: RawrConfig,
    ext: Option<(Inbound, ReplyFn)>,
) -> Result<NodeHandle, StartError> {
    start_paired(cfg, ext, None).await
}

/// [`start`] with a [`PairFn`] (kyuu serve links paired allocations in its TURN shards).
pub async fn start_paired(
    cfg: RawrConfig,
    ext: Option<(Inbound, ReplyFn)>,
    on_paired: Option<PairFn>,
) -> Result<NodeHandle, StartError> {
    start_fleet(cfg, ext, on_paired, None).await
}

/// [`start_paired`] as a root node of a fleet (`docs/rawr.md` §4.7).
pub async fn start_fleet(
    cfg: RawrConfig,
    ext: Option<(Inbound, ReplyFn)>,
    on_paired: Option<PairFn>,
    fleet: Option<Arc<RawrFleet>>,
) -> Result<NodeHandle, StartError> {
    let addr = match (cfg.listen, &ext) {
        (Some(a), _) => a,
        (None, Some(_)) => SocketAddr::from(([0, 0, 0, 0], 0)),
        (None, None) => return Err(StartError::NoInput),
    };
    let socket = UdpSocket::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let host = HostNet::new(cfg.netns.clone());
    Ok(spawn_node_fleet(cfg, socket, ext, host, on_paired, fleet)?)
}

/// One RAWR request/answer exchange from a fresh socket, with retransmission and liveness
/// (pending indications keep a held request alive). Used by the HTTP form.
pub async fn transact(
    to: SocketAddr,
    build: impl FnOnce(kyuu_stun::TransactionId) -> Vec<u8>,
    deadline: Duration,
) -> Result<Vec<u8>, std::io::Error> {
    let bind: SocketAddr = if to.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    };
    let sock = UdpSocket::bind(bind).await?;
    transact_on(&sock, to, build, deadline).await
}

/// [`transact`] on a given socket.
pub async fn transact_on(
    sock: &UdpSocket,
    to: SocketAddr,
    build: impl FnOnce(kyuu_stun::TransactionId) -> Vec<u8>,
    deadline: Duration,
) -> Result<Vec<u8>, std::io::Error> {
    transact_on_pending(sock, to, build, deadline, &|| {}).await
}

/// [`transact_on`], calling `pending` for every pending indication (the node holds the request).
pub async fn transact_on_pending(
    sock: &UdpSocket,
    to: SocketAddr,
    build: impl FnOnce(kyuu_stun::TransactionId) -> Vec<u8>,
    deadline: Duration,
    pending: &(dyn Fn() + Send + Sync),
) -> Result<Vec<u8>, std::io::Error> {
    use kyuu_rawr::txn::{Txn, TxnPoll};
    let tid = kyuu_stun::TransactionId(rand::random());
    let data = build(tid);
    let start = Instant::now();
    sock.send_to(&data, to).await?;
    let mut txn = Txn::new(start, tid, to, data);
    let mut buf = vec![0u8; 4096];
    for _ in 0..100_000u32 {
        let wake = txn.deadline().min(start + deadline);
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (n, from) = r?;
                let d = buf.get(..n).unwrap_or(&[]);
                let Ok(m) = kyuu_stun::Message::parse(d) else { continue };
                if from != to || *m.transaction_id() != tid {
                    continue;
                }
                if m.class() == kyuu_stun::Class::Indication {
                    txn.heard(Instant::now());
                    pending();
                    continue;
                }
                return Ok(d.to_vec());
            }
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {
                let now = Instant::now();
                if now >= start + deadline {
                    break;
                }
                match txn.poll(now) {
                    TxnPoll::Idle => {}
                    TxnPoll::Retransmit => { sock.send_to(&txn.bytes, to).await?; }
                    TxnPoll::Dead => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            format!("{to} did not answer"),
                        ))
                    }
                }
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{to}: deadline passed"),
    ))
}

/// A sequence counter and, per client, (sequence, responder).
type BookEntries = (u64, std::collections::HashMap<SocketAddr, (u64, Responder)>);

/// How to answer one client whose request came through the STUN/TURN server.
pub type Responder = Box<dyn Fn(Vec<u8>) -> bool + Send + Sync>;

/// Remembers, per client address, how to answer it (the extension channel gives a reply handle
/// per request; the node addresses answers by `SocketAddr`). Bounded: the oldest entry is
/// evicted when full.
pub struct ReplyBook {
    inner: std::sync::Mutex<BookEntries>,
    cap: usize,
}

impl std::fmt::Debug for ReplyBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyBook").field("cap", &self.cap).finish()
    }
}

impl ReplyBook {
    pub fn new(cap: usize) -> Arc<ReplyBook> {
        Arc::new(ReplyBook {
            inner: std::sync::Mutex::new((0, std::collections::HashMap::new())),
            cap: cap.max(1),
        })
    }

    /// Records how to answer `client`.
    pub fn remember(&self, client: SocketAddr, respond: Responder) {
        let mut g = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        g.0 += 1;
        let seq = g.0;
        if g.1.len() >= self.cap && !g.1.contains_key(&client) {
            if let Some(oldest) = g.1.iter().min_by_key(|(_, (s, _))| *s).map(|(k, _)| *k) {
                g.1.remove(&oldest);
            }
        }
        g.1.insert(client, (seq, respond));
    }

    /// The [`ReplyFn`] for [`spawn_node_with`]/[`start`].
    pub fn reply_fn(self: &Arc<Self>) -> ReplyFn {
        let book = self.clone();
        Box::new(move |to, data| {
            let g = book
                .inner
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some((_, respond)) = g.1.get(&to) {
                respond(data);
            }
        })
    }
}
