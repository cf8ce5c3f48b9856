//! The HTTP server: `/metrics` and `/healthz` in front of the signaling router
//! (`kyuu_signal::router`: WebSocket signaling, `/v1/ice-servers`, web pages).
//!
//! The same router is served over plain HTTP ([`serve`]) and over TLS ([`serve_tls`], for
//! `https://` and `wss://`), with a configured PEM pair or a self-signed certificate
//! ([`crate::tls::acceptor`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;

/// What `/healthz` reports.
#[derive(Debug)]
pub struct Health {
    pub started: Instant,
    /// STUN/TURN listener addresses, as `proto address`.
    pub listeners: Vec<String>,
    /// Redis reachability in fleet mode (`"fleet": "ok"|"degraded"`); `None` for one node.
    pub fleet: Option<kyuu_signal::FleetStatus>,
}

#[derive(Clone)]
struct AppState {
    metrics: Option<PrometheusHandle>,
    health: Arc<Health>,
}

/// kyuu's routes, with everything else handed to `signal` (so the signaling router's own
/// routes, including its catch-all `/{id}`, keep working).
pub fn router(signal: Router, metrics: Option<PrometheusHandle>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(healthz))
        .with_state(AppState { metrics, health })
        .fallback_service(signal)
}

async fn render_metrics(State(s): State<AppState>) -> Response {
    metrics::counter!("kyuu_http_requests_total", "route" => "metrics").increment(1);
    match s.metrics {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics disabled\n").into_response(),
    }
}

async fn healthz(State(s): State<AppState>) -> Response {
    let fleet = s
        .health
        .fleet
        .as_ref()
        .map(|f| format!(",\"fleet\":\"{}\"", f.as_str()))
        .unwrap_or_default();
    let body = format!(
        "{{\"status\":\"ok\",\"uptime_secs\":{},\"listeners\":{}{fleet}}}\n",
        s.health.started.elapsed().as_secs(),
        json_strings(&s.health.listeners)
    );
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

fn json_strings(items: &[String]) -> String {
    let quoted: Vec<String> = items
        .iter()
        .map(|s| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    format!("[{}]", quoted.join(","))
}

/// Serves `app` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// TLS handshakes that may run at once; further connections wait in the kernel's backlog.
const MAX_HANDSHAKES: usize = 1024;
/// A TLS handshake that takes longer than this is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// An axum [`Listener`](axum::serve::Listener) yielding finished TLS connections. Handshakes
/// run in their own tasks (bounded in number and time), so a slow client never holds up others.
struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor_task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        let acceptor_task = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::debug!("https accept: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!("https handshake from {peer}: {e}"),
                        Err(_) => tracing::debug!("https handshake from {peer}: timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            acceptor_task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor_task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor task only ends when the listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves: `https://` and `wss://`.
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    // `tap_io` gives the listener axum's `ConnectInfo<SocketAddr>` (the per-address limits of
    // signaling need the client's address).
    let listener = TlsListener::new(listener, acceptor)?.tap_io(|_| {});
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
