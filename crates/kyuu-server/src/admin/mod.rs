//! The admin API: JSON over HTTP for operators (`kyuu admin …` is its command-line client), and
//! the live `/status` page. Off by default; see [`AdminConfig`] for where it listens and how it
//! authenticates. The routes and their bodies are documented in `docs/admin-openapi.json`, which
//! a test checks against [`router`].
//!
//! Commands for TURN allocations reach the relay shards as messages
//! ([`crate::relay::RelayControl`]); signaling is reached through
//! [`kyuu_signal::SignalAdmin`].

pub mod config;
mod stats;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post, put, MethodRouter};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

pub use config::AdminConfig;
pub use stats::metric_sum;

use crate::config::Config;
use crate::relay::RelayControl;

/// The OpenAPI 3 document of the admin API.
pub const OPENAPI: &str = include_str!("../../../../docs/admin-openapi.json");
const STATUS_HTML: &str = include_str!("status.html");

/// Sets the log filter at run time (a `tracing_subscriber` reload handle, installed by the
/// binary). The argument is an `EnvFilter` directive string.
pub type LogHook = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;
/// Re-reads the configuration the server was started from (file plus command-line flags) and
/// validates it.
pub type ReloadHook = Arc<dyn Fn() -> Result<Config, String> + Send + Sync>;

/// What the binary lends the server for run-time changes. Both optional: without them the
/// routes answer 501.
#[derive(Clone, Default)]
pub struct Hooks {
    pub log_level: Option<LogHook>,
    pub reload_config: Option<ReloadHook>,
}

impl std::fmt::Debug for Hooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hooks")
            .field("log_level", &self.log_level.is_some())
            .field("reload_config", &self.reload_config.is_some())
            .finish()
    }
}

/// The outcome of a configuration reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ReloadReport {
    /// Keys applied to the running server.
    pub applied: Vec<String>,
    /// Sections or keys that changed but only take effect after a restart.
    pub restart_needed: Vec<String>,
}

/// An ongoing drain.
#[derive(Debug, Clone, Copy)]
struct Drain {
    started: Instant,
    deadline: Instant,
}

/// Everything the admin routes work on. Shared by the admin listener, `SIGHUP` and the
/// status sampler.
pub struct Admin {
    token: Option<String>,
    relay: Option<RelayControl>,
    signal: Option<kyuu_signal::SignalAdmin>,
    hooks: Hooks,
    /// The configuration in force (after reloads), with a generated REST secret filled in.
    config: Mutex<Config>,
    /// The REST secret generated at start when none was configured: kept over reloads that
    /// still configure none.
    generated_secret: Option<String>,
    turn_urls: Vec<String>,
    drain: Mutex<Option<Drain>>,
    exit: Arc<tokio::sync::Notify>,
    pub(crate) stats: stats::Sampler,
    /// Fleet mode: where a drain sends clients.
    fleet: Option<Arc<crate::fleet::TurnFleet>>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin").finish_non_exhaustive()
    }
}

/// Inputs of [`Admin::new`].
pub(crate) struct AdminParts {
    pub config: Config,
    pub generated_secret: Option<String>,
    pub turn_urls: Vec<String>,
    pub relay: Option<RelayControl>,
    pub signal: Option<kyuu_signal::SignalAdmin>,
    pub hooks: Hooks,
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    pub exit: Arc<tokio::sync::Notify>,
    pub fleet: Option<Arc<crate::fleet::TurnFleet>>,
}

/// Samples the status page's numbers until the process ends.
pub(crate) async fn run_sampler(admin: Arc<Admin>) {
    let mut tick = tokio::time::interval(stats::INTERVAL);
    loop {
        tick.tick().await;
        admin.stats.tick().await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({ "error": msg.into() }))).into_response()
}

impl Admin {
    pub(crate) fn new(p: AdminParts) -> Arc<Admin> {
        Arc::new(Admin {
            token: p.config.admin.token.clone(),
            relay: p.relay.clone(),
            signal: p.signal.clone(),
            hooks: p.hooks,
            config: Mutex::new(p.config),
            generated_secret: p.generated_secret,
            turn_urls: p.turn_urls,
            drain: Mutex::new(None),
            exit: p.exit,
            fleet: p.fleet,
            stats: stats::Sampler::new(p.metrics, p.relay, p.signal),
        })
    }

    fn config(&self) -> std::sync::MutexGuard<'_, Config> {
        self.config.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Re-reads the configuration and applies what can change live: TURN credentials (REST
    /// secrets, static users, realm), peer policy, quotas, lifetimes and rate limits, and the
    /// log level. An invalid file changes nothing and the error is returned. Also run on
    /// `SIGHUP`.
    pub async fn reload(&self) -> Result<ReloadReport, String> {
        let Some(hook) = &self.hooks.reload_config else {
            return Err("reload is not available: the server was not started from a file".into());
        };
        let mut new = hook()?;
        new.validate().map_err(|e| e.to_string())?;
        if new.turn.static_auth_secrets.is_empty() && new.turn.users.is_empty() {
            if let Some(s) = &self.generated_secret {
                new.turn.static_auth_secrets.push(s.clone());
            }
        }
        // Renewed certificates: read them all before changing anything.
        let certs = crate::tls::prepare_reload().map_err(|e| format!("{e:#}"))?;
        let old = self.config().clone();
        let mut report = ReloadReport::default();
        let mut restart = |changed: bool, name: &str| {
            if changed {
                report.restart_needed.push(name.to_owned());
            }
        };
        restart(old.listen != new.listen, "listen");
        restart(old.http != new.http, "http");
        restart(old.signal != new.signal, "signal");
        restart(old.rawr != new.rawr, "rawr");
        restart(old.admin != new.admin, "admin");
        restart(old.log.ansi != new.log.ansi, "log.ansi");
        // Relay addresses were filled in at start from the listeners when unset.
        new.turn.relay_ipv4 = new.turn.relay_ipv4.or(old.turn.relay_ipv4);
        new.turn.relay_ipv6 = new.turn.relay_ipv6.or(old.turn.relay_ipv6);
        if new.log.level != old.log.level {
            if let Some(h) = &self.hooks.log_level {
                h(&new.log.level)?;
                report.applied.push("log.level".into());
            }
        }
        if new.turn != old.turn {
            if let Some(relay) = &self.relay {
                let kept = relay.reconfigure(&new.turn).await?;
                report
                    .restart_needed
                    .extend(kept.0.iter().map(|k| (*k).to_owned()));
                report.applied.push("turn".into());
            }
            if let Some(sig) = &self.signal {
                sig.set_rest_secret(new.turn.static_auth_secrets.first().cloned());
            }
        }
        if !certs.is_empty() {
            crate::tls::apply_reload(certs);
            report.applied.push("tls certificates".into());
        }
        tracing::info!(
            applied = ?report.applied,
            restart_needed = ?report.restart_needed,
            "configuration reloaded"
        );
        *self.config() = new;
        Ok(report)
    }

    /// Stops new allocations and ends the process when the last one ends or at `deadline`.
    pub fn start_drain(self: &Arc<Self>, deadline: Duration, alternate: Option<SocketAddr>) {
        let now = Instant::now();
        {
            let mut d = self.drain.lock().unwrap_or_else(|p| p.into_inner());
            if d.is_some() {
                return;
            }
            *d = Some(Drain {
                started: now,
                deadline: now + deadline,
            });
        }
        tracing::info!(?deadline, ?alternate, "draining: no new allocations");
        // In a fleet without an explicit alternate: send TURN clients to other nodes (re-chosen
        // as the fleet changes) and signaling clients to another node's URL.
        let fleet = self.fleet.clone().filter(|_| alternate.is_none());
        if let Some(f) = &self.fleet {
            f.set_draining();
        }
        let mut alts = Vec::new();
        if let Some(r) = &self.relay {
            match &fleet {
                Some(f) => {
                    alts = f.alternates();
                    tracing::info!(alternates = ?alts, "draining: sending TURN clients to other nodes");
                    r.drain_to(&alts);
                }
                None => r.drain(alternate),
            }
        }
        if let (Some(f), Some(s)) = (&self.fleet, &self.signal) {
            s.drain(f.signal_url().as_deref());
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut rounds = 0u32;
            loop {
                rounds = rounds.wrapping_add(1);
                if let (Some(f), Some(r), 0) = (&fleet, &me.relay, rounds % 5) {
                    let now_alts = f.alternates();
                    if now_alts != alts {
                        tracing::info!(alternates = ?now_alts, "draining: alternates changed");
                        r.drain_to(&now_alts);
                        alts = now_alts;
                    }
                }
                let left = me.relay.as_ref().map_or(0, |r| r.allocation_count());
                if left == 0 || Instant::now() >= now + deadline {
                    tracing::info!(allocations_left = left, "drain finished, exiting");
                    me.exit.notify_one();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    fn check_token(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        let Some(want) = &self.token else {
            return true;
        };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned)
            .or_else(|| {
                query?.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=')?;
                    (k == "token").then(|| v.to_owned())
                })
            });
        given.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes()))
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(a): State<Arc<Admin>>, req: Request, next: Next) -> Response {
    if a.check_token(req.headers(), req.uri().query()) {
        return next.run(req).await;
    }
    metrics::counter!("kyuu_admin_unauthorized_total").increment(1);
    let mut r = error(
        StatusCode::UNAUTHORIZED,
        "admin token required (Authorization: Bearer <admin.token>)",
    );
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Every admin route as (method, path, handler). [`router`] is built from this table, and a
/// test checks it against `docs/admin-openapi.json` both ways.
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<Admin>>)> {
    vec![
        ("GET", "/admin/v1/allocations", get(allocations)),
        (
            "DELETE",
            "/admin/v1/allocations/{id}",
            delete(kill_allocation),
        ),
        ("GET", "/admin/v1/signaling", get(signaling)),
        ("DELETE", "/admin/v1/signaling/{id}", delete(kill_signaling)),
        ("POST", "/admin/v1/credentials", post(mint_credentials)),
        (
            "POST",
            "/admin/v1/credentials/check",
            post(check_credentials),
        ),
        ("GET", "/admin/v1/loglevel", get(get_loglevel)),
        ("PUT", "/admin/v1/loglevel", put(set_loglevel)),
        ("POST", "/admin/v1/reload", post(reload)),
        ("GET", "/admin/v1/drain", get(drain_status)),
        ("POST", "/admin/v1/drain", post(drain)),
        ("GET", "/admin/v1/stats", get(stats)),
        ("GET", "/admin/v1/openapi.json", get(openapi)),
        ("GET", "/status", get(status_page)),
    ]
}

/// The admin routes (`/admin/v1/…` and `/status`), behind the token when one is configured.
pub fn router(admin: Arc<Admin>) -> Router {
    let mut by_path: Vec<(&'static str, MethodRouter<Arc<Admin>>)> = Vec::new();
    for (_, path, handler) in routes() {
        match by_path.iter_mut().find(|(p, _)| *p == path) {
            Some((_, mr)) => *mr = std::mem::take(mr).merge(handler),
            None => by_path.push((path, handler)),
        }
    }
    let mut r = Router::new();
    for (path, mr) in by_path {
        r = r.route(path, mr);
    }
    r.route_layer(middleware::from_fn_with_state(admin.clone(), auth))
        .with_state(admin)
}

async fn allocations(State(a): State<Arc<Admin>>) -> Response {
    let list = match &a.relay {
        Some(r) => r.allocations().await,
        None => Vec::new(),
    };
    Json(json!({ "count": list.len(), "allocations": list })).into_response()
}

async fn kill_allocation(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    let killed = match &a.relay {
        Some(r) => r.kill(&id).await,
        None => false,
    };
    if killed {
        tracing::info!(allocation = %id, "allocation killed by admin");
        Json(json!({ "killed": true, "id": id })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, format!("no allocation {id}"))
    }
}

async fn signaling(State(a): State<Arc<Admin>>) -> Response {
    let (connections, rooms) = match &a.signal {
        Some(s) => (s.connections(), s.rooms()),
        None => (Vec::new(), Vec::new()),
    };
    Json(json!({ "count": connections.len(), "connections": connections, "rooms": rooms }))
        .into_response()
}

async fn kill_signaling(State(a): State<Arc<Admin>>, Path(id): Path<String>) -> Response {
    if a.signal.as_ref().is_some_and(|s| s.kill(&id)) {
        tracing::info!(client = %id, "signaling connection closed by admin");
        Json(json!({ "killed": true, "id": id })).into_response()
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("no signaling connection {id}"),
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MintRequest {
    user: Option<String>,
    ttl_secs: Option<u64>,
}

async fn mint_credentials(
    State(a): State<Arc<Admin>>,
    body: Option<Json<MintRequest>>,
) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let (secret, default_ttl) = {
        let c = a.config();
        (
            c.turn.static_auth_secrets.first().cloned(),
            c.http.credential_ttl_secs,
        )
    };
    let Some(secret) = secret else {
        return error(
            StatusCode::CONFLICT,
            "no TURN REST secret configured (turn.static_auth_secrets)",
        );
    };
    let ttl = req.ttl_secs.unwrap_or(default_ttl);
    if ttl == 0 || ttl > 366 * 86_400 {
        return error(
            StatusCode::BAD_REQUEST,
            "ttl_secs: must be between 1 and 31622400",
        );
    }
    let user: String = req
        .user
        .unwrap_or_else(|| "admin".into())
        .chars()
        .filter(|c| *c != ':')
        .take(64)
        .collect();
    let now = unix_now();
    let (username, password) = kyuu_turn::rest_credentials(&secret, &user, now, ttl);
    Json(json!({
        "username": username,
        "password": password,
        "ttl_secs": ttl,
        "expires_at": now + ttl,
        "uris": a.turn_urls,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckRequest {
    username: String,
    password: String,
}

async fn check_credentials(State(a): State<Arc<Admin>>, Json(req): Json<CheckRequest>) -> Response {
    let turn = a.config().turn.clone();
    let r = kyuu_turn::check_credentials(&turn, &req.username, &req.password, unix_now());
    Json(r).into_response()
}

async fn get_loglevel(State(a): State<Arc<Admin>>) -> Response {
    let level = a.config().log.level.clone();
    Json(json!({ "level": level })).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LevelRequest {
    level: String,
}

async fn set_loglevel(State(a): State<Arc<Admin>>, Json(req): Json<LevelRequest>) -> Response {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&req.level) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("level: {:?}: {e}", req.level),
        );
    }
    let Some(hook) = &a.hooks.log_level else {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            "the log level cannot be changed in this process",
        );
    };
    if let Err(e) = hook(&req.level) {
        return error(StatusCode::BAD_REQUEST, e);
    }
    a.config().log.level.clone_from(&req.level);
    tracing::info!(level = %req.level, "log level changed by admin");
    Json(json!({ "level": req.level })).into_response()
}

async fn reload(State(a): State<Arc<Admin>>) -> Response {
    match a.reload().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            tracing::warn!("configuration reload refused: {e}");
            error(StatusCode::BAD_REQUEST, e)
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    deadline_secs: Option<u64>,
    alternate: Option<SocketAddr>,
}

fn drain_json(a: &Admin) -> Value {
    let d = *a.drain.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    json!({
        "draining": d.is_some(),
        "allocations": a.relay.as_ref().map_or(0, |r| r.allocation_count()),
        "elapsed_secs": d.map(|d| now.saturating_duration_since(d.started).as_secs()),
        "deadline_in_secs": d.map(|d| d.deadline.saturating_duration_since(now).as_secs()),
    })
}

async fn drain_status(State(a): State<Arc<Admin>>) -> Response {
    Json(drain_json(&a)).into_response()
}

async fn drain(State(a): State<Arc<Admin>>, body: Option<Json<DrainRequest>>) -> Response {
    let req = body.map(|Json(b)| b).unwrap_or_default();
    let deadline = Duration::from_secs(req.deadline_secs.unwrap_or(3600));
    let alternate = req.alternate.or_else(|| a.config().turn.alternate_server);
    a.start_drain(deadline, alternate);
    Json(drain_json(&a)).into_response()
}

async fn stats(State(a): State<Arc<Admin>>) -> Response {
    Json(a.stats.snapshot().await).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn status_page() -> Response {
    Html(STATUS_HTML).into_response()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::collections::BTreeSet;

    /// Every route is documented and every documented path and method is routed.
    #[test]
    fn openapi_matches_routes() {
        let doc: Value = serde_json::from_str(OPENAPI).unwrap();
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
        let mut documented = BTreeSet::new();
        for (path, ops) in doc["paths"].as_object().unwrap() {
            for method in ops.as_object().unwrap().keys() {
                documented.insert((method.to_uppercase(), path.clone()));
            }
        }
        let routed: BTreeSet<(String, String)> = routes()
            .into_iter()
            .map(|(m, p, _)| (m.to_owned(), p.to_owned()))
            .collect();
        let undocumented: Vec<_> = routed.difference(&documented).collect();
        let unrouted: Vec<_> = documented.difference(&routed).collect();
        assert!(
            undocumented.is_empty(),
            "routes missing from the OpenAPI document: {undocumented:?}"
        );
        assert!(
            unrouted.is_empty(),
            "documented but not routed: {unrouted:?}"
        );
    }
}
