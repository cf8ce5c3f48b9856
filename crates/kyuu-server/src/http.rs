//! The HTTP server: `/metrics` and `/healthz` in front of the signaling router
//! (`kyuu_signal::router`: WebSocket signaling, `/v1/ice-servers`, web pages).
//!
//! The same router is served over plain HTTP ([`serve`]) and over TLS ([`serve_tls`], for
//! `https://` and `wss://`), with a configured PEM pair or a self-signed certificate
//! ([`crate::tls::acceptor`]).

use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpListener;
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

/// Serves `app` on `listener` until `shutdown` resolves, with the default `[http]` limits
/// (per-IP connection cap, slow-header timeout: [`crate::limits::serve_http`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::limits::serve_http(listener, app, &Default::default(), shutdown).await
}

/// Serves `app` over TLS on `listener` until `shutdown` resolves: `https://` and `wss://`
/// ([`crate::limits::serve_https`]: handshakes bounded in number and time, per-IP cap).
pub async fn serve_tls(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::limits::serve_https(listener, acceptor, app, &Default::default(), shutdown).await
}
