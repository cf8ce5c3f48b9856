//! The tokio shell around [`kyuu_turn::Server`]: STUN/TURN over UDP, TCP and TLS, IPv4 and IPv6,
//! RFC 5780 alternate addresses, relay sockets.
//!
//! Shape: `listen.threads` worker threads ("shards"), each with its own current-thread runtime,
//! its own `kyuu_turn::Server` and its own copy of every listening socket (SO_REUSEPORT, so the
//! kernel spreads clients over shards by their address). A shard owns the relay sockets of the
//! allocations it made, so the relay path never takes a lock: a datagram is received in a batch
//! (recvmmsg via quinn-udp), handed to the core, and sent on, all on one thread. Shards share only
//! the nonce key, the clock origin and the quota counters ([`kyuu_turn::Shared`]). Each shard
//! hands out relay ports from its own slice of `turn.relay_ports`.

pub mod config;
mod control;
pub(crate) mod dtls;
mod icmp;
mod shard;
mod tls;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kyuu_turn::{PortRange, Rfc5780, ServerOptions, Shared, TurnConfig};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, watch};

pub use config::ListenConfig;
pub use control::{parse_alloc_id, AdoptableStream, AdoptedStream, RelayControl, ShardAllocation};
pub use kyuu_turn::{ClientSocket, Transport};

/// Hands STUN requests in [`kyuu_turn::EXTENSION_METHODS`] (RAWR control messages) to another
/// part of the server instead of answering 400.
#[derive(Debug, Clone)]
pub struct Extension {
    pub requests: mpsc::Sender<ExtensionRequest>,
}

/// One extension request.
#[derive(Debug)]
pub struct ExtensionRequest {
    /// Who sent it, over which transport and to which server address.
    pub client: ClientSocket,
    /// The whole STUN message.
    pub data: Vec<u8>,
    /// Where to send the answer.
    pub reply: ExtensionReply,
}

/// Sends a message to a client over the socket or connection its request arrived on.
#[derive(Debug, Clone)]
pub struct ExtensionReply {
    tx: mpsc::UnboundedSender<(ClientSocket, Vec<u8>)>,
}

impl ExtensionReply {
    /// Queues `data` for `client`; false when the shard has stopped.
    pub fn send(&self, client: ClientSocket, data: Vec<u8>) -> bool {
        self.tx.send((client, data)).is_ok()
    }
}

/// A running STUN/TURN service.
#[derive(Debug)]
pub struct RelayHandle {
    listeners: Vec<(Transport, SocketAddr)>,
    alternate: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    control: RelayControl,
    steering: Option<shard::SharedSteering>,
}

impl RelayHandle {
    /// Relay ports steered to the relay threads' steering sockets now (`turn.relay_steering`);
    /// `None` when steering is off or could not be attached.
    pub fn steered_ports(&self) -> Option<usize> {
        let s = self.steering.as_ref()?;
        s.lock().ok().map(|s| s.len())
    }

    /// Bound listeners as (transport, address), after port 0 was resolved.
    pub fn listeners(&self) -> &[(Transport, SocketAddr)] {
        &self.listeners
    }

    /// The first bound address of a transport.
    pub fn addr(&self, proto: Transport) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(p, _)| *p == proto)
            .map(|(_, a)| *a)
    }

    /// The RFC 5780 alternate address (alternate IP and port), when configured.
    pub fn alternate(&self) -> Option<SocketAddr> {
        self.alternate
    }

    /// Live allocations across all shards.
    pub fn allocations(&self) -> u32 {
        self.shared.allocations()
    }

    /// A handle for operator commands (list, kill, reconfigure, drain).
    pub fn control(&self) -> RelayControl {
        self.control.clone()
    }

    /// Stops every shard and waits for their threads (blocking; call from a blocking context or
    /// use [`RelayHandle::shutdown`]).
    pub fn stop_blocking(mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Stops every shard and waits until they have closed their sockets.
    pub async fn shutdown(self) {
        let _ = tokio::task::spawn_blocking(move || self.stop_blocking()).await;
    }
}

impl Drop for RelayHandle {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

use kyuu_stun::rest::unix_now;

/// Bound sockets of one shard.
#[derive(Debug, Default)]
pub(crate) struct ShardSockets {
    pub udp: Vec<std::net::UdpSocket>,
    pub tcp: Vec<std::net::TcpListener>,
    pub tls: Vec<std::net::TcpListener>,
    pub dtls: Vec<std::net::UdpSocket>,
}

fn new_socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Fails if anything (even another process with SO_REUSEPORT, like coturn) already holds `addr`:
/// a socket without SO_REUSEPORT cannot bind then.
fn probe_free(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<SocketAddr> {
    let s = new_socket(addr, ty, proto)?;
    s.bind(&addr.into())?;
    let a = s.local_addr()?.as_socket().unwrap_or(addr);
    Ok(a)
}

pub(crate) fn bind_udp(
    addr: SocketAddr,
    reuse_port: bool,
    buf: usize,
) -> std::io::Result<std::net::UdpSocket> {
    let s = new_socket(addr, Type::DGRAM, Protocol::UDP)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if buf > 0 {
        let _ = s.set_recv_buffer_size(buf);
        let _ = s.set_send_buffer_size(buf);
    }
    s.bind(&addr.into())?;
    Ok(s.into())
}

pub(crate) fn bind_tcp(
    addr: SocketAddr,
    reuse_port: bool,
) -> std::io::Result<std::net::TcpListener> {
    let s = new_socket(addr, Type::STREAM, Protocol::TCP)?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Resolves port 0: the first port-0 address gets a free port that is then reused for the
/// others of the same group.
fn resolve(
    addr: SocketAddr,
    group_port: &mut Option<u16>,
    ty: Type,
    proto: Protocol,
) -> anyhow::Result<SocketAddr> {
    let want = if addr.port() == 0 {
        SocketAddr::new(addr.ip(), group_port.unwrap_or(0))
    } else {
        addr
    };
    let name = if ty == Type::DGRAM { "udp" } else { "tcp" };
    let got = match probe_free(want, ty, proto) {
        Ok(a) => a,
        Err(_) if addr.port() == 0 && want.port() != 0 => probe_free(addr, ty, proto)
            .with_context(|| format!("listen: cannot bind {name} {addr}"))?,
        Err(e) => {
            return Err(e).with_context(|| format!("listen: cannot bind {name} {want} (in use?)"))
        }
    };
    if addr.port() == 0 && group_port.is_none() {
        *group_port = Some(got.port());
    }
    Ok(got)
}

/// Starts STUN/TURN on `listen` with `turn`. `ext` receives extension-range requests.
pub async fn start(
    listen: &ListenConfig,
    turn: TurnConfig,
    ext: Option<Extension>,
) -> anyhow::Result<RelayHandle> {
    start_keyed(listen, turn, ext, None).await
}

/// [`start`] with the nonce key: the fleet's shared key, so that every node accepts every
/// other node's nonces (`None`: a random key of this process).
pub async fn start_keyed(
    listen: &ListenConfig,
    mut turn: TurnConfig,
    ext: Option<Extension>,
    nonce_key: Option<[u8; 32]>,
) -> anyhow::Result<RelayHandle> {
    listen.validate().map_err(anyhow::Error::msg)?;
    turn.validate().map_err(anyhow::Error::msg)?;
    // Every allocation holds a relay socket: raise the descriptor limit to the hard limit.
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) if n < 4096 => tracing::warn!(
            target: "kyuu::relay",
            "open file limit is {n}: at most about {n} allocations can be held"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(target: "kyuu::relay", "cannot raise the open file limit: {e}"),
    }
    let all = || {
        listen
            .udp
            .iter()
            .chain(listen.tcp.iter())
            .chain(listen.tls.iter())
            .chain(listen.dtls.iter())
    };
    if turn.relay_ipv4.is_none() {
        turn.relay_ipv4 = all().find_map(|a| match a.ip() {
            IpAddr::V4(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        });
    }
    if turn.relay_ipv6.is_none() {
        turn.relay_ipv6 = all().find_map(|a| match a.ip() {
            IpAddr::V6(ip) if !ip.is_unspecified() => Some(ip),
            _ => None,
        });
    }
    if turn.enabled && turn.relay_ipv4.is_none() && turn.relay_ipv6.is_none() {
        tracing::warn!(
            "turn: listening on wildcard addresses only and neither turn.relay_ipv4 nor turn.relay_ipv6 is set; Allocate will fail with 440"
        );
    }

    // Listener addresses, with the RFC 5780 combinations.
    let mut udp_addrs = listen.udp.clone();
    let mut tcp_addrs = listen.tcp.clone();
    let mut rfc5780 = None;
    let mut alternate = None;
    if let (Some(alt_ip), Some(alt_port), Some(primary)) =
        (listen.alt_ip, listen.alternate_port(), listen.udp.first())
    {
        let r = Rfc5780 {
            primary_ip: primary.ip(),
            alternate_ip: alt_ip,
            primary_port: primary.port(),
            alternate_port: alt_port,
        };
        for a in [
            SocketAddr::new(r.primary_ip, r.alternate_port),
            SocketAddr::new(r.alternate_ip, r.primary_port),
            SocketAddr::new(r.alternate_ip, r.alternate_port),
        ] {
            if !udp_addrs.contains(&a) {
                udp_addrs.push(a);
            }
            if !listen.tcp.is_empty() && !tcp_addrs.contains(&a) {
                tcp_addrs.push(a);
            }
        }
        alternate = Some(SocketAddr::new(alt_ip, alt_port));
        rfc5780 = Some(r);
    }

    // Resolve addresses (port 0 and "is it free?") once.
    let mut listeners = Vec::new();
    let mut p4 = None;
    let mut p6 = None;
    let mut ptls4 = None;
    let mut ptls6 = None;
    let mut proxy_rules = crate::proxy::Rules::new(&listen.proxy_protocol);
    let mut udp_final = Vec::new();
    for a in &udp_addrs {
        let g = if a.is_ipv4() { &mut p4 } else { &mut p6 };
        let got = resolve(*a, g, Type::DGRAM, Protocol::UDP)?;
        proxy_rules.resolve("udp", *a, got);
        udp_final.push(got);
        listeners.push((Transport::Udp, got));
    }
    let mut tcp_final = Vec::new();
    for a in &tcp_addrs {
        let g = if a.is_ipv4() { &mut p4 } else { &mut p6 };
        let got = resolve(*a, g, Type::STREAM, Protocol::TCP)?;
        proxy_rules.resolve("tcp", *a, got);
        tcp_final.push(got);
        listeners.push((Transport::Tcp, got));
    }
    let mut tls_final = Vec::new();
    for a in &listen.tls {
        let g = if a.is_ipv4() { &mut ptls4 } else { &mut ptls6 };
        let got = resolve(*a, g, Type::STREAM, Protocol::TCP)?;
        proxy_rules.resolve("tls", *a, got);
        tls_final.push(got);
        listeners.push((Transport::Tls, got));
    }
    let mut dtls_final = Vec::new();
    let (mut pdtls4, mut pdtls6) = (None, None);
    for a in &listen.dtls {
        let g = if a.is_ipv4() {
            &mut pdtls4
        } else {
            &mut pdtls6
        };
        let got = resolve(*a, g, Type::DGRAM, Protocol::UDP)?;
        dtls_final.push(got);
        listeners.push((Transport::Dtls, got));
    }
    let mut dtls_endpoint = if dtls_final.is_empty() {
        None
    } else {
        let mut names = listen.tls_names.clone();
        names.extend(
            dtls_final
                .iter()
                .filter(|a| !a.ip().is_unspecified())
                .map(|a| a.ip().to_string()),
        );
        let store = crate::tls::dtls_store(
            "listen",
            listen.tls_cert.as_deref(),
            listen.tls_key.as_deref(),
            names,
        )?;
        Some(dtls::Endpoint::new(
            store,
            listen.dtls_limits(),
            rand::random(),
        ))
    };
    let acceptor = if tls_final.is_empty() {
        None
    } else {
        Some(tls::acceptor(listen)?)
    };

    let threads = if listen.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        listen.threads
    };
    let mut shard_sockets: Vec<ShardSockets> = Vec::new();
    for _ in 0..threads {
        let mut s = ShardSockets::default();
        for a in &udp_final {
            s.udp.push(
                bind_udp(*a, true, listen.socket_buffer)
                    .with_context(|| format!("listen: cannot bind udp {a}"))?,
            );
        }
        // Stream clients all go to the first shard: an RFC 6062 data connection must reach the
        // shard that holds its allocation, and SO_REUSEPORT would spread them.
        if shard_sockets.is_empty() {
            for a in &tcp_final {
                s.tcp.push(
                    bind_tcp(*a, true).with_context(|| format!("listen: cannot bind tcp {a}"))?,
                );
            }
            for a in &tls_final {
                s.tls.push(
                    bind_tcp(*a, true).with_context(|| format!("listen: cannot bind tls {a}"))?,
                );
            }
            // DTLS associations live in the first shard too (one table, one set of limits).
            for a in &dtls_final {
                s.dtls.push(
                    bind_udp(*a, true, listen.socket_buffer)
                        .with_context(|| format!("listen: cannot bind dtls {a}"))?,
                );
            }
        }
        shard_sockets.push(s);
    }

    let fast_path = fast_path(&turn, &listeners)?;
    let binding = match (&fast_path, rfc5780) {
        (Some(fp), None) if fast_path_binding(&turn, fp, &udp_final, &proxy_rules) => {
            Some(fp.clone())
        }
        _ => None,
    };
    let steering = steering(&turn)?;
    let (stop, stop_rx) = watch::channel(false);
    if let Some(fp) = &binding {
        follow_interface_addresses(fp, stop_rx.clone());
    }
    let shared = Shared::new(
        nonce_key.unwrap_or_else(rand::random),
        Instant::now(),
        unix_now(),
    );
    let ranges = split_ports(turn.relay_ports, threads);
    let mut handles = Vec::new();
    let mut control = Vec::new();
    let limits = Arc::new(shard::StreamLimits {
        conns: crate::limits::ConnLimiter::new("stun", listen.max_conns_per_ip),
        first_message: (listen.first_message_timeout_secs > 0)
            .then(|| Duration::from_secs(listen.first_message_timeout_secs)),
        tls_handshake: Duration::from_secs(listen.tls_handshake_timeout_secs.max(1)),
    });
    let (ready_tx, mut ready_rx) = mpsc::channel::<anyhow::Result<()>>(threads);
    // Every shard's control and paired-packet channels, made first so each shard can reach the
    // others (RAWR pairs across shards, docs/rawr.md §6.1).
    let n = shard_sockets.len();
    let (mut ctl_rxs, mut pkt_rxs, mut pkt_txs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
        control.push(ctl_tx);
        ctl_rxs.push(Some(ctl_rx));
        let (pkt_tx, pkt_rx) = mpsc::channel(shard::CROSS_PACKETS);
        pkt_txs.push(pkt_tx);
        pkt_rxs.push(Some(pkt_rx));
    }
    let cross = Arc::new(shard::CrossShard {
        control: control.clone(),
        packets: pkt_txs,
        halves: std::sync::Mutex::new(std::collections::HashMap::new()),
    });
    for (i, sockets) in shard_sockets.into_iter().enumerate() {
        let opts = ServerOptions {
            rfc5780,
            shared: shared.clone(),
            ports: ranges.get(i).copied().unwrap_or(turn.relay_ports),
            extension: ext.is_some(),
            seed: rand::random(),
            shard: i as u16,
        };
        let mut core = kyuu_turn::Server::new(turn.clone(), opts).map_err(anyhow::Error::msg)?;
        if fast_path.is_some() {
            core.enable_fast_path();
        }
        let acceptor = acceptor.clone();
        let ext = ext.as_ref().map(|e| e.requests.clone());
        let stop_rx = stop_rx.clone();
        let buf = listen.socket_buffer;
        let ready = ready_tx.clone();
        let limits = limits.clone();
        let (Some(ctl_rx), Some(pkt_rx)) = (
            ctl_rxs.get_mut(i).and_then(Option::take),
            pkt_rxs.get_mut(i).and_then(Option::take),
        ) else {
            anyhow::bail!("relay: shard {i} has no channels");
        };
        let io = shard::ShardIo {
            control: ctl_rx,
            cross: cross.clone(),
            cross_rx: pkt_rx,
            proxy: proxy_rules.clone(),
            fast_path: fast_path.clone(),
            dtls: if i == 0 { dtls_endpoint.take() } else { None },
            steering: steering.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("kyuu-relay-{i}"))
            .spawn(move || {
                shard::run(
                    i, sockets, core, acceptor, ext, stop_rx, buf, ready, limits, io,
                )
            })
            .context("spawning relay thread")?;
        handles.push(h);
    }
    drop(ready_tx);
    while let Some(r) = ready_rx.recv().await {
        r?;
    }
    for (p, a) in &listeners {
        tracing::info!(target: "kyuu::relay", "STUN/TURN listening on {p} {a}");
    }
    Ok(RelayHandle {
        listeners,
        alternate,
        shared: shared.clone(),
        stop,
        threads: handles,
        control: RelayControl {
            shards: control,
            shared,
            binding: binding.as_ref().map(Arc::downgrade),
        },
        steering: steering.map(|(s, _)| s),
    })
}

/// Attaches the kernel fast path as `turn.fast_path` says: to `turn.fast_path_interface`, or the
/// interface holding the first UDP listener's address (or `turn.relay_ipv4`/`relay_ipv6` for a
/// wildcard listener). `"auto"` logs why it could not and goes on without; `"required"` fails.
fn fast_path(
    turn: &TurnConfig,
    listeners: &[(Transport, SocketAddr)],
) -> anyhow::Result<Option<shard::SharedFastPath>> {
    use kyuu_turn::FastPathMode;
    if turn.fast_path == FastPathMode::Off {
        return Ok(None);
    }
    let attach = || -> Result<kyuu_ebpf::FastPath, String> {
        if let Some(why) = kyuu_ebpf::unavailable() {
            return Err(format!("unavailable: {why}"));
        }
        let name = match &turn.fast_path_interface {
            Some(name) => name.clone(),
            None => {
                let ip = listeners
                    .iter()
                    .filter(|(t, _)| *t == Transport::Udp)
                    .map(|(_, a)| a.ip())
                    .chain(turn.relay_ipv4.map(IpAddr::V4))
                    .chain(turn.relay_ipv6.map(IpAddr::V6))
                    .find(|ip| !ip.is_unspecified())
                    .ok_or("no UDP listener or relay address names an interface; set turn.fast_path_interface")?;
                kyuu_ebpf::interface_of(ip).ok_or_else(|| {
                    format!("no interface holds {ip}; set turn.fast_path_interface")
                })?
            }
        };
        let native = turn.fast_path_xdp == kyuu_turn::XdpMode::Native;
        kyuu_ebpf::FastPath::attach_mode(&name, native).map_err(|e| {
            if native {
                format!(
                    "{e} (turn.fast_path_xdp = \"native\": does the driver of {name} support XDP?)"
                )
            } else {
                e.to_string()
            }
        })
    };
    match attach() {
        Ok(fp) => {
            let mode = match turn.fast_path_xdp {
                kyuu_turn::XdpMode::Generic => "generic",
                kyuu_turn::XdpMode::Native => "native",
            };
            tracing::info!(target: "kyuu::relay", interface = fp.interface(), "kernel fast path attached (XDP, {mode} mode)");
            Ok(Some(Arc::new(std::sync::Mutex::new(fp))))
        }
        Err(e) if turn.fast_path == FastPathMode::Required => {
            anyhow::bail!("turn.fast_path = \"required\": {e}")
        }
        Err(e) => {
            tracing::warn!(target: "kyuu::relay", "turn.fast_path = \"auto\": relaying in userspace only: {e}");
            Ok(None)
        }
    }
}

/// Lets the attached fast path answer plain STUN Binding requests to the UDP listeners
/// (`turn.fast_path_binding`), unless RFC 5780 is on (its answers carry more attributes) or the
/// listener takes the PROXY protocol (the balancer's datagrams are not the client's). Failing
/// that leaves Binding to userspace, with a log line. True when the kernel answers Binding.
fn fast_path_binding(
    turn: &TurnConfig,
    fp: &shard::SharedFastPath,
    udp: &[SocketAddr],
    proxy: &crate::proxy::Rules,
) -> bool {
    if !turn.fast_path_binding {
        return false;
    }
    let listeners: Vec<SocketAddr> = udp
        .iter()
        .copied()
        .filter(|a| proxy.trusted("udp", *a).is_none())
        .collect();
    if listeners.is_empty() {
        return false;
    }
    let cfg = kyuu_ebpf::BindingConfig {
        listeners,
        software: turn.software.clone(),
        rate: turn.unauth_rate,
        burst: turn.unauth_burst,
    };
    let result = match fp.lock() {
        Ok(mut k) => k.enable_binding(&cfg, None),
        Err(_) => return false,
    };
    match result {
        Ok(()) => {
            tracing::info!(target: "kyuu::relay", "kernel fast path answers STUN Binding");
            true
        }
        Err(e) => {
            tracing::warn!(target: "kyuu::relay", "fast path: STUN Binding stays in userspace: {e}");
            false
        }
    }
}

/// How often the kernel's Binding answers on a wildcard listener follow the interface's
/// addresses.
const ADDRESS_REFRESH: std::time::Duration = std::time::Duration::from_secs(5);

/// With a wildcard UDP listener, re-reads the fast path interface's addresses every
/// [`ADDRESS_REFRESH`] until `stop`, so the kernel also answers Binding on addresses added after
/// start (and stops on removed ones); until then userspace answers them.
fn follow_interface_addresses(fp: &shard::SharedFastPath, mut stop: watch::Receiver<bool>) {
    let interface = match fp.lock() {
        Ok(k) if k.binding_has_wildcard() => k.interface().to_owned(),
        _ => return,
    };
    // Weak: the shards own the fast path; the task ends when they have dropped it.
    let fp = Arc::downgrade(fp);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(ADDRESS_REFRESH) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let (fp, interface) = (fp.clone(), interface.clone());
            let done = tokio::task::spawn_blocking(move || {
                let addrs = kyuu_ebpf::interface_addrs(&interface);
                let fp = fp.upgrade()?;
                let mut k = fp.lock().ok()?;
                Some(k.refresh_binding_listeners(&addrs))
            })
            .await;
            match done {
                Ok(Some(Ok((0, 0)))) => {}
                Ok(Some(Ok((added, removed)))) => tracing::info!(
                    target: "kyuu::relay",
                    added, removed, "fast path: STUN Binding follows the interface's addresses"
                ),
                Ok(Some(Err(e))) => {
                    tracing::warn!(target: "kyuu::relay", "fast path: Binding listener addresses: {e}")
                }
                Ok(None) | Err(_) => return,
            }
        }
    });
}

/// Loads relay steering as `turn.relay_steering` says, for the relay addresses configured.
/// `"auto"` logs one line saying why it could not (no CAP_BPF, a kernel without sk_lookup, a
/// build without clang) and goes on without; `"required"` fails.
fn steering(turn: &TurnConfig) -> anyhow::Result<Option<(shard::SharedSteering, Vec<SocketAddr>)>> {
    use kyuu_turn::FastPathMode;
    if turn.relay_steering == FastPathMode::Off {
        return Ok(None);
    }
    let addrs: Vec<SocketAddr> = turn
        .relay_ipv4
        .map(IpAddr::V4)
        .into_iter()
        .chain(turn.relay_ipv6.map(IpAddr::V6))
        .map(|ip| SocketAddr::new(ip, 0))
        .collect();
    match kyuu_ebpf::Steering::attach() {
        Ok(s) => {
            tracing::info!(target: "kyuu::relay", "relay steering attached (sk_lookup): one relay socket read per thread");
            Ok(Some((Arc::new(std::sync::Mutex::new(s)), addrs)))
        }
        Err(e) if turn.relay_steering == FastPathMode::Required => {
            anyhow::bail!("turn.relay_steering = \"required\": {e}")
        }
        Err(e) => {
            tracing::warn!(target: "kyuu::relay", "turn.relay_steering = \"auto\": reading relay sockets one by one: {e}");
            Ok(None)
        }
    }
}

/// Starts STUN/TURN on 127.0.0.1 with free ports for UDP, TCP and TLS (self-signed), TURN REST
/// API credentials under `rest_secret` (mint them with [`kyuu_turn::rest_credentials`]), and
/// loopback peers allowed (127.0.0.0/8, ::1): for tests of other parts (the browser relay test,
/// RAWR). `handle.addr(Transport::Udp)` (and `Tcp`, `Tls`) give the ports.
pub async fn start_local(rest_secret: &str) -> anyhow::Result<RelayHandle> {
    let any = |p| SocketAddr::from(([127, 0, 0, 1], p));
    let listen = ListenConfig {
        threads: 1,
        ..ListenConfig::on(&[any(0)], &[any(0)])
    };
    let turn = TurnConfig {
        static_auth_secrets: vec![rest_secret.to_owned()],
        allow_peers: ["127.0.0.0/8", "::1/128"]
            .iter()
            .filter_map(|n| n.parse::<kyuu_turn::ipnet::IpNet>().ok())
            .collect(),
        unauth_rate: 0,
        ..TurnConfig::default()
    };
    start(&listen, turn, None).await
}

/// Splits the relay port range into one contiguous, even-aligned slice per shard.
fn split_ports(r: PortRange, n: usize) -> Vec<PortRange> {
    let n = n.max(1) as u32;
    let span = u32::from(r.max) - u32::from(r.min) + 1;
    if span < n * 2 {
        return vec![r; n as usize];
    }
    let per = (span / n) & !1;
    (0..n)
        .map(|i| {
            let lo = u32::from(r.min) + i * per;
            let hi = if i + 1 == n {
                u32::from(r.max)
            } else {
                lo + per - 1
            };
            PortRange {
                min: lo as u16,
                max: hi as u16,
            }
        })
        .collect()
}
