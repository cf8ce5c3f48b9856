//! Pre-authentication resource limits on every stream listener.
//!
//! Before a client has authenticated it costs the server a socket, a task and buffers; these
//! limits keep that cost bounded per client and in time:
//!
//! * per-IP connection caps ([`ConnLimiter`]): STUN/TURN TCP+TLS (`listen.max_conns_per_ip`),
//!   HTTP+HTTPS including WebSocket signaling (`http.max_conns_per_ip`). IPv6 clients count per
//!   /64. A connection over the cap is closed at once.
//! * STUN/TURN: a TLS handshake timeout (`listen.tls_handshake_timeout_secs`) and a deadline
//!   for the first complete STUN message (`listen.first_message_timeout_secs`), applied in
//!   `relay::shard`.
//! * HTTP: every request's headers must arrive within `http.header_timeout_secs` of the
//!   connection or of the previous response (slow headers), and HTTPS handshakes within the
//!   same time. Served here by [`serve_http`] and [`serve_https`] (hyper HTTP/1.1 with
//!   upgrades, for WebSocket).
//!
//! Each refusal and each close is counted in Prometheus:
//! `kyuu_conn_refused_total{listener, reason="per_ip_cap"}` and
//! `kyuu_conn_closed_total{listener, reason="tls_handshake_timeout" | "first_message_timeout" |
//! "header_timeout"}`; `kyuu_conns_open{listener}` is the gauge of open connections.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::TlsAcceptor;
use tower::Service as _;

/// Whether `ip` is a globally routable unicast address (not loopback, private, shared,
/// link-local, documentation, benchmarking or reserved; the TURN peer policy's definition).
pub fn is_public(ip: IpAddr) -> bool {
    kyuu_turn::policy::PeerPolicy::default().permits(ip)
}

/// The host's public address, as seen from its default route (no packet is sent): what a
/// wildcard listener is reachable at from the internet, if anything.
pub fn host_public_address() -> Option<IpAddr> {
    let probe = |bind: IpAddr, to: SocketAddr| -> Option<IpAddr> {
        let s = std::net::UdpSocket::bind((bind, 0)).ok()?;
        s.connect(to).ok()?;
        Some(s.local_addr().ok()?.ip())
    };
    let v4 = probe(
        IpAddr::from([0, 0, 0, 0]),
        SocketAddr::from(([192, 0, 2, 1], 3478)),
    );
    let v6 = probe(
        IpAddr::from([0u16; 8]),
        SocketAddr::new(IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]), 3478),
    );
    v4.into_iter().chain(v6).find(|ip| is_public(*ip))
}

/// Open connections per client (IPv4 address or IPv6 /64) on one listener kind, capped.
#[derive(Debug)]
pub struct ConnLimiter {
    listener: &'static str,
    per_ip: u32,
    counts: Mutex<HashMap<IpAddr, u32>>,
}

/// One admitted connection; dropping it frees its slot.
#[derive(Debug)]
pub struct ConnGuard {
    limiter: Arc<ConnLimiter>,
    key: IpAddr,
}

impl ConnLimiter {
    /// `listener` labels the metrics (`"stun"`, `"http"`); `per_ip == 0` means no cap.
    pub fn new(listener: &'static str, per_ip: u32) -> Arc<Self> {
        Arc::new(ConnLimiter {
            listener,
            per_ip,
            counts: Mutex::new(HashMap::new()),
        })
    }

    /// Admits a connection from `ip`, or counts the refusal and returns `None`.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnGuard> {
        let key = kyuu_signal::mint::source_key(ip);
        {
            let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(key).or_insert(0);
            if self.per_ip > 0 && *n >= self.per_ip {
                drop(m);
                refused(self.listener, "per_ip_cap");
                return None;
            }
            *n += 1;
        }
        metrics::gauge!("kyuu_conns_open", "listener" => self.listener).increment(1.0);
        Some(ConnGuard {
            limiter: self.clone(),
            key,
        })
    }

    /// Open connections from `ip`'s source (tests).
    pub fn open_from(&self, ip: IpAddr) -> u32 {
        let key = kyuu_signal::mint::source_key(ip);
        let m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut m = self
            .limiter
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.key);
            }
        }
        drop(m);
        metrics::gauge!("kyuu_conns_open", "listener" => self.limiter.listener).decrement(1.0);
    }
}

/// Counts a connection refused before it was served.
pub fn refused(listener: &'static str, reason: &'static str) {
    metrics::counter!("kyuu_conn_refused_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// Counts a connection closed by a pre-authentication limit.
pub fn closed(listener: &'static str, reason: &'static str) {
    metrics::counter!("kyuu_conn_closed_total", "listener" => listener, "reason" => reason)
        .increment(1);
}

/// The HTTP server's limits (`[http]`).
#[derive(Debug, Clone)]
pub struct HttpLimits {
    pub max_conns_per_ip: u32,
    /// Slow headers and the HTTPS handshake.
    pub header_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        let c = crate::config::HttpConfig::default();
        HttpLimits::from(&c)
    }
}

impl From<&crate::config::HttpConfig> for HttpLimits {
    fn from(c: &crate::config::HttpConfig) -> Self {
        HttpLimits {
            max_conns_per_ip: c.max_conns_per_ip,
            header_timeout: Duration::from_secs(c.header_timeout_secs.max(1)),
        }
    }
}

/// TLS handshakes that may run at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;

/// Serves `app` on `listener` (plain HTTP/1.1 with upgrades) until `shutdown` resolves, then
/// lets open requests finish. The handler sees the client address as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve_http(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_http_proxied(listener, app, limits, shutdown, Vec::new()).await
}

/// [`serve_http`]; with `proxy_trusted` non-empty every connection must start with a PROXY
/// protocol v2 header from those networks ([`crate::proxy`], `http.proxy_protocol_trusted`),
/// and the address it names is the client: for `ConnectInfo` and the per-IP cap.
pub async fn serve_http_proxied(
    listener: TcpListener,
    app: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    proxy_trusted: Vec<kyuu_turn::ipnet::IpNet>,
) -> std::io::Result<()> {
    let limiter = ConnLimiter::new("http", limits.max_conns_per_ip);
    let (tx, rx) = mpsc::channel(64);
    let proxy_trusted: Arc<[kyuu_turn::ipnet::IpNet]> = proxy_trusted.into();
    let accept = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let (mut tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    tracing::debug!("http accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !proxy_trusted.is_empty() {
                // Behind a balancer: read the header in its own task (bounded in number and
                // time), then admit the client it names.
                if !crate::proxy::trusted(&proxy_trusted, peer.ip()) {
                    crate::proxy::refused("http", "untrusted");
                    continue;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tx, limiter) = (tx.clone(), limiter.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let Some(real) = crate::proxy::read_stream_header(&mut tcp, "http", peer).await
                    else {
                        return;
                    };
                    let Some(guard) = limiter.admit(real.ip()) else {
                        return;
                    };
                    let _ = tcp.set_nodelay(true);
                    let _ = tx.send((tcp, real, guard)).await;
                });
                continue;
            }
            let Some(guard) = limiter.admit(peer.ip()) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            if tx.send((tcp, peer, guard)).await.is_err() {
                return;
            }
        }
    });
    let r = serve_conns("http", rx, app, limits.header_timeout, shutdown).await;
    accept.abort();
    r
}

/// [`serve_http`] over TLS: `https://` and `wss://`. Handshakes run in their own tasks (bounded
/// in number and by `header_timeout`), so a slow client never holds up others.
pub async fn serve_https(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_https_shared(listener, acceptor, app, limits, shutdown, None).await
}

/// [`serve_https`], with TURN over TLS on the same port when `turn` is given
/// ([`crate::tls_mux`]; the acceptor must offer [`crate::tls_mux::SHARED_ALPN`]).
pub async fn serve_https_shared(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    limits: &HttpLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    turn: Option<crate::tls_mux::TurnOnTls>,
) -> std::io::Result<()> {
    let turn = turn.map(Arc::new);
    let limiter = ConnLimiter::new("https", limits.max_conns_per_ip);
    let (tx, rx) = mpsc::channel(64);
    let handshake = limits.header_timeout;
    let accept = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!("https accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let Some(guard) = limiter.admit(peer.ip()) else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let turn = turn.clone();
            let Ok(local) = tcp.local_addr() else {
                continue;
            };
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => match turn {
                        None => {
                            let tls = crate::tls_mux::Prefixed::new(Vec::new(), tls);
                            let _ = tx.send((tls, peer, guard)).await;
                        }
                        Some(turn) => route_shared(tls, peer, local, guard, &turn, &tx).await,
                    },
                    Ok(Err(e)) => tracing::debug!("https handshake from {peer}: {e}"),
                    Err(_) => {
                        closed("https", "tls_handshake_timeout");
                        tracing::debug!("https handshake from {peer}: timed out");
                    }
                }
            });
        }
    });
    let r = serve_conns("https", rx, app, limits.header_timeout, shutdown).await;
    accept.abort();
    r
}

/// A connection of the HTTPS listener, with any byte read while routing put back.
type HttpsStream = crate::tls_mux::Prefixed<tokio_rustls::server::TlsStream<TcpStream>>;

/// Sends a connection of the shared HTTPS/TURN listener to HTTP or to the relay (with its
/// per-IP slot either way).
async fn route_shared(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    local: SocketAddr,
    guard: ConnGuard,
    turn: &crate::tls_mux::TurnOnTls,
    http: &mpsc::Sender<(HttpsStream, SocketAddr, ConnGuard)>,
) {
    use crate::tls_mux::{classify, Route};
    let conn = tls.get_ref().1;
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let sni = conn.server_name().map(str::to_owned);
    let Some((stream, r)) = classify(tls, alpn.as_deref(), sni.as_deref(), &turn.names).await
    else {
        return;
    };
    match r {
        Route::Http => {
            metrics::counter!("kyuu_tls_shared_connections_total", "route" => "http").increment(1);
            let _ = http.send((stream, peer, guard)).await;
        }
        Route::Turn => {
            metrics::counter!("kyuu_tls_shared_connections_total", "route" => "turn").increment(1);
            let client = kyuu_turn::ClientSocket {
                transport: kyuu_turn::Transport::Tls,
                local,
                remote: peer,
            };
            let io = Guarded {
                io: stream,
                _guard: guard,
            };
            turn.relay.adopt_stream(Box::new(io), client);
        }
    }
}

/// Serves each admitted connection with hyper's HTTP/1.1 server and a header read timeout.
async fn serve_conns<I>(
    listener: &'static str,
    mut conns: mpsc::Receiver<(I, SocketAddr, ConnGuard)>,
    app: Router,
    header_timeout: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    // Dropped to tell connections to finish; `done` closes when the last one has.
    let (stop_tx, stop_rx) = watch::channel(());
    let (done_tx, done_rx) = watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (io, peer, guard) = tokio::select! {
            c = conns.recv() => match c {
                Some(c) => c,
                None => break,
            },
            () = &mut shutdown => break,
        };
        let app = app.clone();
        let mut stop = stop_rx.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let _done = done;
            // The guard rides with the IO, so an upgraded (WebSocket) connection keeps its slot.
            let io = Guarded { io, _guard: guard };
            let svc = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                let mut app = app.clone();
                app.call(req.map(axum::body::Body::new))
            });
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout);
            let conn = builder
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades();
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                _ = stop.changed() => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                if e.is_timeout() {
                    closed(listener, "header_timeout");
                }
                tracing::trace!("{listener} connection from {peer}: {e}");
            }
        });
    }
    drop(stop_tx);
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// A connection and its per-IP slot, freed together.
struct Guarded<I> {
    io: I,
    _guard: ConnGuard,
}

impl<I: AsyncRead + Unpin> AsyncRead for Guarded<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Guarded<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cap_per_ip_and_per_64_frees_on_drop() {
        let l = ConnLimiter::new("test", 2);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g1 = l.admit(a).unwrap();
        let _g2 = l.admit(a).unwrap();
        assert!(l.admit(a).is_none());
        assert!(l.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(g1);
        assert!(l.admit(a).is_some());
        let v6: IpAddr = "2001:db8:1:1::1".parse().unwrap();
        let _h = (
            l.admit(v6).unwrap(),
            l.admit("2001:db8:1:1::2".parse().unwrap()),
        );
        assert!(l.admit("2001:db8:1:1:ffff::3".parse().unwrap()).is_none());
        assert_eq!(l.open_from(v6), 2);
        let unlimited = ConnLimiter::new("test", 0);
        let all: Vec<_> = (0..100).filter_map(|_| unlimited.admit(a)).collect();
        assert_eq!(all.len(), 100);
    }

    #[test]
    fn public_addresses() {
        for ip in ["8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "169.254.1.1",
            "0.0.0.0",
            "::",
            "::1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(!is_public(ip.parse().unwrap()), "{ip}");
        }
    }
}
