//! `serve()`: everything `kyuu serve` runs, started from one [`Config`].

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use kyuu_signal::IceProvider;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::admin::{self, Admin, Hooks};
use crate::config::Config;
use crate::http::{self, Health};
use crate::relay::{self, RelayHandle, Transport};

/// How TURN clients authenticate, for the start-up summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthMode {
    /// A REST secret was generated at start (none configured).
    GeneratedSecret,
    /// Configured REST secrets and/or static users.
    Configured { secrets: usize, users: usize },
}

/// A started server.
#[derive(Debug)]
pub struct Running {
    /// Where HTTP listens (after binding, so port 0 shows the real port).
    pub http_addr: Option<SocketAddr>,
    /// Where HTTPS (and `wss://` signaling) listens, when `http.tls_listen` is set.
    pub https_addr: Option<SocketAddr>,
    /// The HTTPS certificate's origin.
    pub https_cert: Option<crate::tls::CertSource>,
    /// STUN/TURN listeners as (transport, address).
    pub listeners: Vec<(Transport, SocketAddr)>,
    /// RFC 5780 alternate address, when configured.
    pub alternate: Option<SocketAddr>,
    pub auth: AuthMode,
    /// The ICE provisioning `/v1/ice-servers` uses.
    pub ice: IceProvider,
    /// Whether `/v1/ice-servers` needs a token.
    pub ice_needs_token: bool,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<anyhow::Result<()>>,
    relay: Option<RelayHandle>,
    /// The metrics upkeep task, which never ends by itself.
    upkeep: Option<tokio::task::AbortHandle>,
    /// The RAWR node's own UDP address, when `[rawr]` is enabled.
    pub rawr_node: Option<SocketAddr>,
    /// Exposure warnings (open credential minting on a public address), also in the summary.
    pub warnings: Vec<String>,
    rawr: Option<crate::rawr::runtime::NodeHandle>,
    /// Where the separate admin listener (`admin.listen`) listens.
    pub admin_addr: Option<SocketAddr>,
    /// The admin API's state (also behind `SIGHUP` reloads); its routes are served only when
    /// `[admin]` enables them.
    pub admin: Arc<Admin>,
    admin_enabled: bool,
    /// TURN over TLS is served on the HTTPS port too (`http.tls_turn`).
    pub https_turn: bool,
    /// Notified when the server should end by itself (a finished drain).
    exit: Arc<tokio::sync::Notify>,
}

/// Starts every service the configuration enables. The configuration must have been validated.
pub async fn start(config: Config) -> anyhow::Result<Running> {
    start_with(config, Hooks::default()).await
}

/// [`start`], with the binary's hooks for run-time log level changes and configuration reloads
/// (used by the admin API and `SIGHUP`).
pub async fn start_with(mut config: Config, hooks: Hooks) -> anyhow::Result<Running> {
    let started = Instant::now();
    let mut generated_secret = None;
    let warnings = config.exposure_warnings(crate::limits::host_public_address());
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let auth = if config.turn.static_auth_secrets.is_empty() && config.turn.users.is_empty() {
        let secret = random_secret();
        generated_secret = Some(secret.clone());
        config.turn.static_auth_secrets.push(secret);
        AuthMode::GeneratedSecret
    } else {
        AuthMode::Configured {
            secrets: config.turn.static_auth_secrets.len(),
            users: config.turn.users.len(),
        }
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();

    fill_relay_addresses(&mut config);

    // RAWR control messages reach the node through the STUN port (relay::Extension).
    let (ext, ext_rx) = if config.rawr.enabled {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        (Some(relay::Extension { requests: tx }), Some(rx))
    } else {
        (None, None)
    };
    let nonce_key = crate::fleet::nonce_key(
        config.fleet.as_ref(),
        config.turn.static_auth_secrets.first().map(String::as_str),
    );
    let relay = relay::start_keyed(&config.listen, config.turn.clone(), ext, nonce_key).await?;
    let exit = Arc::new(tokio::sync::Notify::new());
    let listeners = relay.listeners().to_vec();
    let alternate = relay.alternate();

    let host = public_host(&config);
    let ice = ice_provider(&config, &host, &listeners);

    let rawr = match ext_rx {
        Some(rx) => Some(start_rawr(&config, &ice, rx, relay.control()).await?),
        None => None,
    };
    let ice_needs_token = config.signal.auth_secret.is_some();

    let metrics = if config.http.metrics {
        crate::metrics::install()
    } else {
        None
    };
    let mut upkeep = None;
    if let Some(h) = metrics.clone() {
        upkeep = Some(tasks.spawn(async move {
            crate::metrics::upkeep(h).await;
            Ok(())
        }));
    }
    metrics::gauge!("kyuu_up").set(1.0);
    metrics::gauge!("kyuu_start_time_seconds").set(unix_now() as f64);

    let mut http_addr = None;
    let mut https_addr = None;
    let mut https_cert = None;
    let mut admin_addr = None;
    let mut signal_admin = None;
    let admin_listener = match config.admin.listen {
        Some(a) => {
            let l = tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("admin.listen: cannot bind {a}"))?;
            admin_addr = Some(l.local_addr()?);
            Some(l)
        }
        None => None,
    };
    let mut app = None;
    let mut http_sockets = None;
    if config.http.enabled {
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .with_context(|| format!("http.listen: cannot bind {}", config.http.listen))?;
        http_addr = Some(listener.local_addr()?);
        let tls = match config.http.tls_listen {
            Some(addr) => {
                let (acceptor, source) = https_acceptor(&config, &host, addr)?;
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("http.tls_listen: cannot bind {addr}"))?;
                https_addr = Some(l.local_addr()?);
                https_cert = Some(source);
                Some((l, acceptor))
            }
            None => None,
        };
        let (signal, sig_admin, fleet) = kyuu_signal::router_with_fleet(
            config.signal.clone(),
            ice.clone(),
            config.fleet.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        signal_admin = Some(sig_admin);
        let health = Arc::new(Health {
            started,
            listeners: listeners.iter().map(|(p, a)| format!("{p} {a}")).collect(),
            fleet,
        });
        let mut a = http::router(signal, metrics.clone(), health);
        if let Some(node) = &rawr {
            a = a.nest("/rawr", crate::rawr::http::router(node.local_addr()));
        }
        app = Some(a);
        http_sockets = Some((listener, tls));
    }
    let fleet = match &config.fleet {
        Some(fc) => {
            let turn_urls = if fc.public_turn.is_empty() {
                ice.turn_urls.clone()
            } else {
                fc.public_turn.clone()
            };
            let f = crate::fleet::TurnFleet::start(
                fc.clone(),
                crate::fleet::Sources {
                    relay: relay.control(),
                    signal: signal_admin.clone(),
                    metrics: metrics.clone(),
                    turn_urls,
                    turn_addrs: public_turn_addrs(&config, &listeners),
                },
            )
            .map_err(anyhow::Error::msg)?;
            if let Some(s) = &signal_admin {
                s.set_fleet_view(f.view());
            }
            Some(Arc::new(f))
        }
        None => None,
    };
    // The admin state exists even when its routes are off: SIGHUP reloads through it.
    let admin = Admin::new(admin::AdminParts {
        fleet,
        config: config.clone(),
        generated_secret,
        turn_urls: ice.turn_urls.clone(),
        relay: Some(relay.control()),
        signal: signal_admin,
        hooks,
        metrics: metrics.clone(),
        exit: exit.clone(),
    });
    if config.admin.enabled() {
        let a = &admin;
        let sampler = a.clone();
        tasks.spawn(async move {
            admin::run_sampler(sampler).await;
            Ok(())
        });
        if let Some(l) = admin_listener {
            let router = admin::router(a.clone());
            let mut rx = shutdown_rx.clone();
            tasks.spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                http::serve(l, router, stop).await.context("admin server")
            });
        } else if let Some(a2) = app.take() {
            // Token only: the admin routes ride on the HTTP listener(s), behind the token.
            app = Some(admin::router(a.clone()).merge(a2));
        }
    }
    if let (Some(app), Some((listener, tls))) = (app, http_sockets) {
        let limits = crate::limits::HttpLimits::from(&config.http);
        if let Some((l, acceptor)) = tls {
            let limits = limits.clone();
            let mut rx = shutdown_rx.clone();
            let app = app.clone();
            let tls_turn = config.http.tls_turn.then(|| crate::tls_mux::TurnOnTls {
                relay: relay.control(),
                names: config.http.tls_turn_names.clone(),
            });
            tasks.spawn(async move {
                let stop = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                crate::limits::serve_https_shared(l, acceptor, app, &limits, stop, tls_turn)
                    .await
                    .context("https server")
            });
        }
        let mut rx = shutdown_rx.clone();
        let trusted = config.http.proxy_protocol_trusted.clone();
        tasks.spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            crate::limits::serve_http_proxied(listener, app, &limits, stop, trusted)
                .await
                .context("http server")
        });
    }

    Ok(Running {
        http_addr,
        https_addr,
        https_cert,
        listeners,
        alternate,
        auth,
        ice,
        ice_needs_token,
        shutdown,
        tasks,
        relay: Some(relay),
        upkeep,
        rawr_node: rawr.as_ref().map(|n| n.local_addr()),
        rawr,
        admin_addr,
        admin,
        admin_enabled: config.admin.enabled(),
        https_turn: config.http.tls_turn && https_addr.is_some(),
        exit,
        warnings,
    })
}

impl Running {
    /// Waits until a service fails (or all end); returns the first error.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        loop {
            let res = tokio::select! {
                r = self.tasks.join_next() => r,
                () = self.exit.notified() => return Ok(()),
            };
            let Some(res) = res else { break };
            match res {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(anyhow::anyhow!("task failed: {e}")),
            }
        }
        Ok(())
    }

    /// Stops everything, giving open HTTP connections `grace` to finish.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.shutdown.send(true);
        if let Some(node) = self.rawr.take() {
            node.kill();
        }
        if let Some(relay) = self.relay.take() {
            relay.shutdown().await;
        }
        if let Some(u) = self.upkeep.take() {
            u.abort();
        }
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(grace, drain).await;
        self.tasks.abort_all();
    }

    /// The human-readable start-up summary: what listens where and how to get credentials.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "kyuu {} is serving", env!("CARGO_PKG_VERSION"));
        if self.listeners.is_empty() {
            let _ = writeln!(
                s,
                "  STUN/TURN   (not started: relay not available in this build)"
            );
        }
        for (proto, addr) in &self.listeners {
            let _ = writeln!(s, "  STUN/TURN   {proto:<4} {addr}");
        }
        match self.alternate {
            Some(a) => {
                let _ = writeln!(s, "  RFC 5780    alternate address {a}");
            }
            None => {
                let _ = writeln!(
                    s,
                    "  RFC 5780    off (give --alt-ip to answer NAT behaviour discovery)"
                );
            }
        }
        if let Some(n) = self.rawr_node {
            let _ = writeln!(
                s,
                "  RAWR        node on the STUN port (methods 0xC01-0xC0F), own socket {n}{}",
                if self.http_addr.is_some() {
                    ", HTTP form at /rawr"
                } else {
                    ""
                }
            );
        }
        match self.http_addr {
            Some(a) => {
                let _ = writeln!(
                    s,
                    "  HTTP        http://{a}  signaling ws://{a}/<id>, /v1/ice-servers, /metrics, /healthz"
                );
            }
            None => {
                let _ = writeln!(s, "  HTTP        off");
            }
        }
        if let Some(a) = self.https_addr {
            let _ = writeln!(
                s,
                "  HTTPS       https://{a}  signaling wss://{a}/<id>, same routes as HTTP"
            );
            if self.https_turn {
                let _ = writeln!(
                    s,
                    "              and TURN over TLS on the same port (ALPN stun.turn, SNI, or STUN first)"
                );
            }
            match &self.https_cert {
                Some(crate::tls::CertSource::SelfSigned(names)) => {
                    let _ = writeln!(
                        s,
                        "              self-signed certificate for {} (browsers refuse it; set \
                         http.tls_cert and http.tls_key)",
                        names.join(", ")
                    );
                }
                Some(crate::tls::CertSource::File(p)) => {
                    let _ = writeln!(s, "              certificate {}", p.display());
                }
                None => {}
            }
        }
        match (self.admin_addr, self.admin_enabled) {
            (Some(a), _) => {
                let _ = writeln!(
                    s,
                    "  admin       http://{a}/admin/v1/  status page http://{a}/status  (kyuu admin --url http://{a})"
                );
            }
            (None, true) => {
                let _ = writeln!(
                    s,
                    "  admin       /admin/v1/ and /status on the HTTP listener, with admin.token"
                );
            }
            (None, false) => {}
        }
        match &self.auth {
            AuthMode::GeneratedSecret => {
                let _ = writeln!(
                    s,
                    "  TURN auth   on: REST secret generated at start (lost on restart; set \
                     turn.static_auth_secrets to keep one)"
                );
            }
            AuthMode::Configured { secrets, users } => {
                let _ = writeln!(
                    s,
                    "  TURN auth   on: {secrets} REST secret(s), {users} static user(s)"
                );
            }
        }
        if let Some(a) = self.http_addr {
            let host = match a.ip() {
                ip if ip.is_unspecified() => "127.0.0.1".to_owned(),
                IpAddr::V6(ip) => format!("[{ip}]"),
                IpAddr::V4(ip) => ip.to_string(),
            };
            let token = if self.ice_needs_token {
                "?token=<signal token>"
            } else {
                ""
            };
            let _ = writeln!(
                s,
                "  credentials curl http://{host}:{}/v1/ice-servers{token}",
                a.port()
            );
            if !self.ice_needs_token {
                let _ = writeln!(
                    s,
                    "              (open to anyone who reaches the HTTP port, rate-limited per address by \
                     signal.mint_rate_per_min; set \
                     signal.auth_secret to require a token)"
                );
            }
        }
        for w in &self.warnings {
            let _ = writeln!(s, "  WARNING     {w}");
        }
        if let Some(turn) = self
            .ice
            .ice_servers("kyuu", unix_now())
            .into_iter()
            .find(|i| i.username.is_some())
        {
            let _ = writeln!(
                s,
                "  try it      username {} password {} ({})",
                turn.username.unwrap_or_default(),
                turn.credential.unwrap_or_default(),
                turn.urls.join(" ")
            );
        }
        s
    }
}

/// Starts the RAWR node, fed by the relay's extension channel. Empty `rawr.secret` and
/// `rawr.relay` default to the TURN REST secret and the TURN URLs `/v1/ice-servers` hands out.
async fn start_rawr(
    config: &Config,
    ice: &IceProvider,
    mut requests: tokio::sync::mpsc::Receiver<relay::ExtensionRequest>,
    control: relay::RelayControl,
) -> anyhow::Result<crate::rawr::runtime::NodeHandle> {
    use std::collections::HashMap;
    use std::sync::Mutex;

    let mut cfg = config.rawr.clone();
    if cfg.secret.is_empty() {
        cfg.secret = config
            .turn
            .static_auth_secrets
            .first()
            .cloned()
            .unwrap_or_default();
    }
    if cfg.relay.is_empty() {
        cfg.relay.clone_from(&ice.turn_urls);
    }
    cfg.validate().map_err(|e| anyhow::anyhow!("{e}"))?;

    // The node answers by client address; remember which five-tuple and shard each came from.
    // Bounded: a flood of sources only forgets old entries.
    const MAX_CLIENTS: usize = 65_536;
    type Routes = HashMap<SocketAddr, (relay::ClientSocket, relay::ExtensionReply)>;
    let routes: Arc<Mutex<Routes>> = Arc::new(Mutex::new(HashMap::new()));
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let r = routes.clone();
    tokio::spawn(async move {
        while let Some(req) = requests.recv().await {
            {
                let mut m = r.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                if m.len() >= MAX_CLIENTS && !m.contains_key(&req.client.remote) {
                    m.clear();
                }
                m.insert(req.client.remote, (req.client, req.reply));
            }
            if tx.send((req.client.remote, req.data)).await.is_err() {
                break;
            }
        }
    });
    let reply: crate::rawr::runtime::ReplyFn = Box::new(move |to, data| {
        let m = routes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((client, reply)) = m.get(&to) {
            let _ = reply.send(*client, data);
        }
    });
    // A session that pairs here gets its two allocations linked in-process (docs/rawr.md §6.1),
    // unless `rawr.pair_in_process = false`.
    // Session limits (§4.6) are enforced by the TURN shards either way.
    let in_process = cfg.pair_in_process;
    let on_paired: crate::rawr::runtime::PairFn =
        Box::new(move |p: crate::rawr::runtime::PairRequest| {
            let limits = kyuu_turn::SessionLimits {
                max_bytes: p.max_bytes,
                max_duration: (p.max_secs > 0).then(|| Duration::from_secs(p.max_secs)),
            };
            if !in_process && limits == kyuu_turn::SessionLimits::default() {
                return;
            }
            control.pair(p.usernames, p.lifetime, limits, Some(p.ended), in_process);
        });
    let on_paired = Some(on_paired);
    // In a fleet, a session's root requests go to the node that claimed it (docs/rawr.md §4.7);
    // the others reach this node at its first `self` address (else its first relay URI's).
    let fleet = match (&config.fleet, cfg.self_addresses().first()) {
        (Some(f), Some(me)) => Some(
            crate::rawr::fleet::RawrFleet::new(&f.redis_url, *me)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        ),
        _ => None,
    };
    crate::rawr::runtime::start_fleet(cfg, Some((rx, reply)), on_paired, fleet)
        .await
        .map_err(|e| anyhow::anyhow!("rawr: {e}"))
}

/// The HTTPS certificate: `http.tls_cert`/`tls_key`, else `listen.tls_cert`/`tls_key`, else
/// self-signed for `listen.tls_names`, the public host and the `tls_listen` IP.
fn https_acceptor(
    config: &Config,
    host: &str,
    addr: SocketAddr,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, crate::tls::CertSource)> {
    let (section, cert, key) = match (&config.http.tls_cert, &config.http.tls_key) {
        (Some(c), Some(k)) => ("http", Some(c), Some(k)),
        _ => (
            "listen",
            config.listen.tls_cert.as_ref(),
            config.listen.tls_key.as_ref(),
        ),
    };
    let mut names = config.listen.tls_names.clone();
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if !host.is_empty() && !names.iter().any(|n| n == host) {
        names.push(host.to_owned());
    }
    if !addr.ip().is_unspecified() && !names.contains(&addr.ip().to_string()) {
        names.push(addr.ip().to_string());
    }
    crate::tls::acceptor(
        section,
        cert.map(|p| p.as_path()),
        key.map(|p| p.as_path()),
        names,
        if config.http.tls_turn {
            crate::tls_mux::SHARED_ALPN
        } else {
            crate::tls::HTTP_ALPN
        },
    )
}

fn random_secret() -> String {
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

use kyuu_stun::rest::unix_now;

/// The host name put into ICE URLs.
fn public_host(config: &Config) -> String {
    if let Some(h) = &config.http.public_host {
        return h.clone();
    }
    if let Some(ip) = config.turn.external_ipv4 {
        return ip.to_string();
    }
    if let Some(a) = config
        .listen
        .udp
        .iter()
        .chain(config.listen.tcp.iter())
        .find(|a| !a.ip().is_unspecified())
    {
        return url_host(a.ip());
    }
    outbound_ipv4().map_or_else(|| "127.0.0.1".to_owned(), |ip| ip.to_string())
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("[{v6}]"),
    }
}

/// With only wildcard listeners and no `turn.relay_ipv4`/`relay_ipv6`, relay from the address
/// of the default route, so TURN works with no configuration at all.
fn fill_relay_addresses(config: &mut Config) {
    let all = || {
        config
            .listen
            .udp
            .iter()
            .chain(config.listen.tcp.iter())
            .chain(config.listen.tls.iter())
            .chain(config.listen.dtls.iter())
    };
    let specific_v4 = all().any(|a| a.is_ipv4() && !a.ip().is_unspecified());
    let any_v4 = all().any(|a| a.is_ipv4());
    if config.turn.relay_ipv4.is_none() && any_v4 && !specific_v4 {
        if let Some(ip) = outbound_ipv4() {
            tracing::info!(
                "turn.relay_ipv4 not set: relaying from {ip}, the default route's address"
            );
            config.turn.relay_ipv4 = Some(ip);
        }
    }
    let specific_v6 = all().any(|a| a.is_ipv6() && !a.ip().is_unspecified());
    let any_v6 = all().any(|a| a.is_ipv6());
    if config.turn.relay_ipv6.is_none() && any_v6 && !specific_v6 {
        if let Some(ip) = outbound_ipv6() {
            tracing::info!(
                "turn.relay_ipv6 not set: relaying from {ip}, the default route's address"
            );
            config.turn.relay_ipv6 = Some(ip);
        }
    }
}

fn outbound_ipv6() -> Option<std::net::Ipv6Addr> {
    let s = std::net::UdpSocket::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).ok()?;
    s.connect(("2001:db8::1", 3478)).ok()?;
    match s.local_addr().ok()?.ip() {
        IpAddr::V6(ip) if !ip.is_unspecified() && !ip.is_loopback() => Some(ip),
        IpAddr::V4(_) | IpAddr::V6(_) => None,
    }
}

/// The source address the host would use towards the internet (no packet is sent).
fn outbound_ipv4() -> Option<Ipv4Addr> {
    let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).ok()?;
    s.connect((Ipv4Addr::new(192, 0, 2, 1), 3478)).ok()?;
    match s.local_addr().ok()?.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() && !ip.is_loopback() => Some(ip),
        IpAddr::V4(_) | IpAddr::V6(_) => None,
    }
}

/// This node's TURN addresses as another node names them in 300 ALTERNATE-SERVER: the first
/// UDP listener of each family, a wildcard address replaced by the external or relay address.
fn public_turn_addrs(config: &Config, listeners: &[(Transport, SocketAddr)]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for v4 in [true, false] {
        let Some((_, a)) = listeners
            .iter()
            .find(|(t, a)| *t == Transport::Udp && a.is_ipv4() == v4)
        else {
            continue;
        };
        let ip = if !a.ip().is_unspecified() {
            Some(a.ip())
        } else if v4 {
            config
                .turn
                .external_ipv4
                .or(config.turn.relay_ipv4)
                .map(IpAddr::V4)
        } else {
            config
                .turn
                .external_ipv6
                .or(config.turn.relay_ipv6)
                .map(IpAddr::V6)
        };
        out.extend(ip.map(|ip| SocketAddr::new(ip, a.port())));
    }
    out
}

fn ice_provider(config: &Config, host: &str, listeners: &[(Transport, SocketAddr)]) -> IceProvider {
    let port_of = |proto: Transport| {
        listeners
            .iter()
            .find(|(p, _)| *p == proto)
            .map(|(_, a)| a.port())
    };
    // Before the relay reports its listeners, fall back to the configured ports.
    let udp = port_of(Transport::Udp).or(config.listen.udp.first().map(|a| a.port()));
    let tcp = port_of(Transport::Tcp).or(config.listen.tcp.first().map(|a| a.port()));
    let tls = port_of(Transport::Tls);
    let mut stun_urls = Vec::new();
    let mut turn_urls = Vec::new();
    if let Some(p) = udp {
        stun_urls.push(format!("stun:{host}:{p}"));
        if config.turn.enabled {
            turn_urls.push(format!("turn:{host}:{p}?transport=udp"));
        }
    }
    if let Some(p) = tcp {
        if config.turn.enabled {
            turn_urls.push(format!("turn:{host}:{p}?transport=tcp"));
        }
    }
    if let Some(p) = tls {
        if config.turn.enabled {
            turn_urls.push(format!("turns:{host}:{p}?transport=tcp"));
        }
    }
    // TURN over TLS beside HTTPS (http.tls_turn), e.g. on 443.
    if let Some(p) = config
        .http
        .tls_listen
        .filter(|a| config.http.tls_turn && config.turn.enabled && a.port() != 0)
        .map(|a| a.port())
    {
        if Some(p) != tls {
            turn_urls.push(format!("turns:{host}:{p}?transport=tcp"));
        }
    }
    IceProvider {
        stun_urls,
        turn_urls,
        rest_secret: config.turn.static_auth_secrets.first().cloned(),
        ttl: Duration::from_secs(config.http.credential_ttl_secs),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use futures_util::{SinkExt as _, StreamExt as _};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::Message;

    const SEED: &str = include_str!("../../kyuu-signal/tests/fixtures/seed004.log");

    type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

    /// A server with HTTP and HTTPS on loopback, its certificate from PEM files made here.
    async fn start_https() -> (Running, rustls::RootCertStore, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kyuu-https-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ck.cert.der().clone()).unwrap();

        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = Config {
            listen: crate::relay::ListenConfig::on(&[lo], &[]),
            ..Config::default()
        };
        config.http.listen = lo;
        config.http.tls_listen = Some(lo);
        config.http.tls_cert = Some(cert);
        config.http.tls_key = Some(key);
        config.http.metrics = false;
        config.validate().unwrap();
        (start(config).await.unwrap(), roots, dir)
    }

    async fn tls_connect(addr: SocketAddr, roots: &rustls::RootCertStore) -> Tls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    async fn recv_text(ws: &mut tokio_tungstenite::WebSocketStream<Tls>) -> String {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("timed out")
                .expect("stream ended")
                .expect("read error");
            match m {
                Message::Text(t) => return t.to_string(),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }

    /// Two clients relay seed 004's offer, answer and candidates through `wss://`, and
    /// `https://.../healthz` answers.
    #[tokio::test]
    async fn wss_relays_seed_004_and_https_healthz() {
        let (running, roots, dir) = start_https().await;
        let addr = running.https_addr.expect("https is on");
        assert!(
            running.summary().contains(&format!("wss://{addr}/<id>")),
            "{}",
            running.summary()
        );
        let url = |id: &str| format!("wss://localhost:{}/{id}", addr.port());
        let (mut a, _) =
            tokio_tungstenite::client_async(url("3251357a"), tls_connect(addr, &roots).await)
                .await
                .unwrap();
        let (mut b, _) =
            tokio_tungstenite::client_async(url("4626b02b"), tls_connect(addr, &roots).await)
                .await
                .unwrap();
        let parse = |l: &'static str| {
            let rest = l.strip_prefix("Client ")?;
            let (id, rest) = rest.split_once(' ')?;
            let (dir, msg) = rest.split_once(' ')?;
            Some((id, dir, msg))
        };
        let lines: Vec<&'static str> = SEED.lines().collect();
        let mut exchanged = 0;
        for pair in lines.windows(2) {
            let (Some((from, "<<", msg)), Some((to, ">>", expected))) =
                (parse(pair[0]), parse(pair[1]))
            else {
                continue;
            };
            assert_ne!(from, to);
            let (src, dst) = if from == "3251357a" {
                (&mut a, &mut b)
            } else {
                (&mut b, &mut a)
            };
            src.send(Message::Text(msg.into())).await.unwrap();
            assert_eq!(recv_text(dst).await, expected);
            exchanged += 1;
        }
        assert_eq!(exchanged, 6, "offer, answer and four candidates");

        let mut tls = tls_connect(addr, &roots).await;
        tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(5), tls.read_to_string(&mut body))
            .await
            .expect("timed out")
            .ok();
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("\"status\":\"ok\""), "{body}");

        // Plain HTTP on the other port still serves the same routes.
        let http = running.http_addr.expect("http is on");
        let mut tcp = tokio::net::TcpStream::connect(http).await.unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut plain = String::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_string(&mut plain))
            .await
            .expect("timed out")
            .unwrap();
        assert!(plain.starts_with("HTTP/1.1 200"), "{plain}");

        running.shutdown(Duration::from_millis(200)).await;
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Without a certificate, HTTPS starts with a self-signed one and says so.
    #[tokio::test]
    async fn https_self_signed_by_default() {
        let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let mut config = Config {
            listen: crate::relay::ListenConfig::on(&[lo], &[]),
            ..Config::default()
        };
        config.http.listen = lo;
        config.http.tls_listen = Some(lo);
        config.http.metrics = false;
        let running = start(config).await.unwrap();
        assert!(matches!(
            running.https_cert,
            Some(crate::tls::CertSource::SelfSigned(ref n)) if n.iter().any(|n| n == "localhost")
        ));
        assert!(running.summary().contains("self-signed"));
        running.shutdown(Duration::from_millis(200)).await;
    }
}
