//! The thin axum/tokio shell around [`Hub`]: HTTP routes, WebSocket upgrades, one task per
//! connection, a bounded send queue per connection, and the hub's timer.
//!
//! All routing decisions are the hub's; this module only moves frames. The hub sits behind a
//! `std::sync::Mutex` that is never held across an `.await`; outputs are handed to connection
//! tasks with `try_send`, so a slow client can never block the hub or another client: when its
//! queue is full it is cut off (close 1008).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, Once};
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, Request, State};
use axum::http::{header, request::Parts, HeaderMap, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::serve::ListenerExt as _;
use axum::{Json, Router};
use futures_util::SinkExt as _;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, Notify};
use tracing::{debug, warn};

use crate::config::SignalConfig;
use crate::fleet::{Cmd, Fleet, FleetConfig, FleetStatus, HubPort};
use crate::hub::{ConnId, ConnectRequest, Hub, Output};
use crate::ice::{IceProvider, IceServer};
use crate::mint::MintLimiter;
use crate::token::{self, Claims};

const INDEX_HTML: &str = include_str!("../web/index.html");
const CHECK_HTML: &str = include_str!("../web/check.html");
const COMMON_JS: &str = include_str!("../web/kyuu.js");

/// Close code and reason a connection task is told to close with.
type Kill = (u16, &'static str);

struct Link {
    tx: mpsc::Sender<String>,
    kill: oneshot::Sender<Kill>,
}

struct State_ {
    hub: Hub,
    links: HashMap<ConnId, Link>,
    next_wake: Option<std::time::Instant>,
}

struct Shared {
    cfg: SignalConfig,
    /// Behind a lock so a configuration reload can change the REST secret it mints with.
    ice: Mutex<IceProvider>,
    /// Open minting (no `auth_secret`) only.
    mint: Mutex<MintLimiter>,
    state: Mutex<State_>,
    wake: Notify,
    timer: Once,
    /// Fleet mode glue (set once, right after the router is built).
    fleet: std::sync::OnceLock<Fleet>,
    /// The fleet's nodes, for handing out other nodes' TURN URLs (set once by the server).
    view: std::sync::OnceLock<crate::nodes::FleetView>,
    /// Set by [`SignalAdmin::drain`]: new connections are refused.
    draining: std::sync::atomic::AtomicBool,
}

impl HubPort for Shared {
    fn live_ids(&self) -> Vec<(String, Option<String>)> {
        let st = self.lock();
        st.hub
            .live_ids()
            .map(|id| {
                let h = st.hub.resume_token(id).map(crate::fleet::token_hash);
                (id.to_owned(), h)
            })
            .collect()
    }

    fn evict(&self, id: &str) -> Vec<String> {
        self.with_hub(|h, now| {
            h.evict(now, id);
            h.take_held(id)
        })
    }

    fn local_publications(&self) -> Vec<(crate::hub::DirKey, String)> {
        self.lock().hub.local_publications()
    }

    fn local_memberships(&self) -> Vec<(String, String)> {
        self.lock().hub.local_memberships()
    }

    fn remote_room(&self, node: &str, room: &str, peer: &str, on: bool) {
        self.with_hub(|h, _| h.remote_room(node, room, peer, on));
    }

    fn remote_nodes(&self) -> Vec<String> {
        self.lock().hub.remote_nodes()
    }

    fn remote_dir(&self, node: &str, key: crate::hub::DirKey, peer: &str, on: bool) {
        self.with_hub(|h, _| h.remote_dir(node, key, peer, on));
    }

    fn node_gone(&self, node: &str) {
        self.with_hub(|h, _| h.node_gone(node));
    }

    fn deliver_remote(&self, to: &str, text: String) {
        self.with_hub(|h, now| {
            if !h.from_remote(now, to, text) {
                debug!("fleet: frame for {to}, who is not here, dropped");
            }
        });
    }

    fn name_taken(&self, peer: &str, key: &crate::hub::DirKey) {
        self.with_hub(|h, _| h.revoke_publication(peer, key));
    }

    fn deliver_held(&self, to: &str, text: String) {
        self.with_hub(|h, now| {
            if !h.held_from_remote(now, to, text) {
                debug!("fleet: held frame for {to} dropped (hold buffer full)");
            }
        });
    }

    fn remote_unknown(&self, from_conn: ConnId, from: &str, to: &str, text: String) {
        self.with_hub(|h, now| h.remote_unknown(now, from_conn, from, to, text));
    }
}

impl Shared {
    /// ICE servers for `user`; in a fleet, with the TURN URLs of the least loaded healthy,
    /// non-draining node of `region` (this node's region when `None`), or of this node when
    /// the fleet view is stale (Redis unreachable).
    fn ice_servers(&self, user: &str, region: Option<&str>) -> Vec<crate::ice::IceServer> {
        let ice = self.ice.lock().unwrap_or_else(|p| p.into_inner());
        let picked = self.view.get().and_then(|v| {
            v.pick(region, false, std::time::Instant::now(), |n| {
                !n.turn_urls.is_empty()
            })
        });
        match picked {
            Some(n) => {
                metrics::counter!("kyuu_signal_fleet_provisioned_total", "node" => n.node.clone())
                    .increment(1);
                let mut other = ice.clone();
                other.turn_urls = n.turn_urls;
                other.ice_servers(user, now_unix())
            }
            None => ice.ice_servers(user, now_unix()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State_> {
        // The hub never panics on input; should it ever, keep serving with its state as is.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the hub, then delivers its outputs.
    fn with_hub<T>(&self, f: impl FnOnce(&mut Hub, std::time::Instant) -> T) -> T {
        let now = std::time::Instant::now();
        let mut st = self.lock();
        let r = f(&mut st.hub, now);
        self.deliver(&mut st, now);
        r
    }

    fn deliver(&self, st: &mut State_, now: std::time::Instant) {
        loop {
            let mut cut = Vec::new();
            while let Some(o) = st.hub.poll_output() {
                match o {
                    Output::Send { conn, text } => {
                        let Some(link) = st.links.get(&conn) else {
                            continue;
                        };
                        match link.tx.try_send(text) {
                            Ok(()) => {}
                            Err(mpsc::error::TrySendError::Full(_)) => cut.push(conn),
                            Err(mpsc::error::TrySendError::Closed(_)) => {}
                        }
                    }
                    Output::Close { conn, code, reason } => {
                        if let Some(link) = st.links.remove(&conn) {
                            let _ = link.kill.send((code, reason));
                        }
                    }
                    Output::Route {
                        from_conn,
                        from,
                        to,
                        text,
                    } => {
                        let queued = self.fleet.get().is_some_and(|f| {
                            f.send(Cmd::Route {
                                from_conn,
                                from: from.clone(),
                                to: to.clone(),
                                text: text.clone(),
                            })
                        });
                        if !queued {
                            st.hub.remote_unknown(now, from_conn, &from, &to, text);
                        }
                    }
                    Output::Room { room, peer, on } => {
                        if let Some(f) = self.fleet.get() {
                            if !f.send(Cmd::Room { room, peer, on }) {
                                warn!("fleet: queue full, a room change was not announced");
                            }
                        }
                    }
                    Output::Dir { key, peer, on } => {
                        if let Some(f) = self.fleet.get() {
                            if !f.send(Cmd::Dir { key, peer, on }) {
                                warn!("fleet: queue full, a directory change was not announced");
                            }
                        }
                    }
                }
            }
            if cut.is_empty() {
                break;
            }
            for conn in cut {
                if let Some(link) = st.links.remove(&conn) {
                    warn!(
                        "Client {} cut off: send queue full (slow reader)",
                        st.hub.id_of(conn).unwrap_or("?")
                    );
                    metrics::counter!("kyuu_signal_slow_readers_cut_total").increment(1);
                    let _ = link.kill.send((1008, "slow reader: send queue full"));
                }
                st.hub.disconnect(now, conn);
            }
        }
        if let Some(t) = st.hub.poll_timeout() {
            if st.next_wake.is_none_or(|w| t < w) {
                st.next_wake = Some(t);
                self.wake.notify_one();
            }
        }
    }

    fn start_timer(self: &Arc<Self>) {
        self.timer.call_once(|| {
            // Weak: the timer must not keep a dropped router alive.
            let weak = Arc::downgrade(self);
            tokio::spawn(async move {
                loop {
                    let Some(s) = weak.upgrade() else {
                        return;
                    };
                    let wake = s.lock().next_wake;
                    let sleep = match wake {
                        Some(t) => tokio::time::sleep_until(t.into()),
                        None => tokio::time::sleep(Duration::from_secs(3600)),
                    };
                    tokio::select! {
                        _ = sleep => {
                            let now = std::time::Instant::now();
                            let mut st = s.lock();
                            st.next_wake = None;
                            st.hub.handle_timeout(now);
                            s.deliver(&mut st, now);
                        }
                        _ = s.wake.notified() => {}
                    }
                }
            });
        });
    }
}

/// The signaling routes: WebSocket at `/` and `/<id>`, `GET /v1/ice-servers`, `/healthz`, and
/// the web pages at `/` and `/check`.
///
/// Serve it with `into_make_service_with_connect_info::<SocketAddr>()` so the per-address
/// connection cap sees real addresses (without it all clients count as one unknown address).
pub fn router(cfg: SignalConfig, ice: IceProvider) -> Router {
    router_with_admin(cfg, ice).0
}

/// An operator's handle on a running signaling router: list connections and rooms, close a
/// connection.
#[derive(Clone)]
pub struct SignalAdmin(Arc<Shared>);

impl std::fmt::Debug for SignalAdmin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignalAdmin")
    }
}

impl SignalAdmin {
    /// Live connections, ordered by client id.
    pub fn connections(&self) -> Vec<crate::hub::ConnInfo> {
        self.0.lock().hub.connection_list()
    }

    /// Mints `/v1/ice-servers` credentials with `secret` from now on (a reloaded
    /// configuration's first TURN REST secret).
    pub fn set_rest_secret(&self, secret: Option<String>) {
        let mut ice = self.0.ice.lock().unwrap_or_else(|p| p.into_inner());
        ice.rest_secret = secret;
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.0.lock().links.len()
    }

    /// Fleet mode: hand out the TURN URLs of the node [`crate::nodes::FleetView::pick`]
    /// chooses. Set once; later calls are ignored.
    pub fn set_fleet_view(&self, view: crate::nodes::FleetView) {
        let _ = self.0.view.set(view);
    }

    /// Drain: refuses new connections (503) and sends every connected client elsewhere: a
    /// client on the opt-in protocol gets `{"type":"reconnect","url":<url>}` (when `url` is
    /// known), then every connection is closed with 1012 (service restart). TURN allocations
    /// are not touched, so calls in progress keep their media path. Returns how many
    /// connections were closed.
    pub fn drain(&self, url: Option<&str>) -> usize {
        self.0
            .draining
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let v2: std::collections::HashSet<ConnId> = self
            .connections()
            .into_iter()
            .filter(|c| c.v2)
            .map(|c| c.conn)
            .collect();
        let links: Vec<(ConnId, Link)> = self.0.lock().links.drain().collect();
        let n = links.len();
        for (conn, link) in links {
            if let (true, Some(u)) = (v2.contains(&conn), url) {
                let msg = serde_json::json!({ "type": "reconnect", "url": u }).to_string();
                let _ = link.tx.try_send(msg);
            }
            // The queued message goes out first; then the close.
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = link.kill.send((1012, "draining"));
                drop(link.tx);
            });
        }
        tracing::info!(connections = n, ?url, "signaling: draining");
        n
    }

    /// Rooms and their members.
    pub fn rooms(&self) -> Vec<crate::hub::RoomInfo> {
        self.0.lock().hub.room_list()
    }

    /// Closes the connection of client `id` (WebSocket close 1008 "closed by admin"); false when
    /// no live connection has that id.
    pub fn kill(&self, id: &str) -> bool {
        self.0
            .with_hub(|hub, _| hub.conn_of(id))
            .is_some_and(|conn| {
                let link = self.0.lock().links.remove(&conn);
                if let Some(link) = link {
                    let _ = link.kill.send((1008, "closed by admin"));
                }
                self.0.with_hub(|hub, now| hub.disconnect(now, conn));
                true
            })
    }
}

/// [`router`] plus its [`SignalAdmin`] handle.
pub fn router_with_admin(cfg: SignalConfig, ice: IceProvider) -> (Router, SignalAdmin) {
    let (shared, router) = build(cfg, ice);
    (router, SignalAdmin(shared))
}

/// [`router`] in fleet mode when `fleet` is given: clients on other nodes sharing the Redis
/// are reached by id (see [`crate::fleet`]). Returns the Redis status for `/healthz`. Must be
/// called inside a tokio runtime when `fleet` is given.
pub fn router_with_fleet(
    cfg: SignalConfig,
    ice: IceProvider,
    fleet: Option<FleetConfig>,
) -> Result<(Router, SignalAdmin, Option<FleetStatus>), String> {
    let (shared, r) = build(cfg, ice);
    let Some(fc) = fleet else {
        return Ok((r, SignalAdmin(shared), None));
    };
    shared.lock().hub.set_fleet(true);
    let weak: std::sync::Weak<Shared> = Arc::downgrade(&shared);
    let port: std::sync::Weak<dyn HubPort> = weak;
    let f = Fleet::start(fc, port)?;
    let status = f.status();
    let _ = shared.fleet.set(f);
    Ok((r, SignalAdmin(shared), Some(status)))
}

fn build(cfg: SignalConfig, ice: IceProvider) -> (Arc<Shared>, Router) {
    let seed = rand::random();
    let shared = Arc::new(Shared {
        state: Mutex::new(State_ {
            hub: Hub::new(cfg.clone(), seed),
            links: HashMap::new(),
            next_wake: None,
        }),
        mint: Mutex::new(MintLimiter::new(
            cfg.mint_rate_per_min,
            cfg.mint_burst,
            cfg.mint_table_size,
        )),
        cfg,
        ice: Mutex::new(ice),
        wake: Notify::new(),
        timer: Once::new(),
        fleet: std::sync::OnceLock::new(),
        view: std::sync::OnceLock::new(),
        draining: std::sync::atomic::AtomicBool::new(false),
    });
    let r = Router::new()
        .route("/", get(root))
        .route("/healthz", get(healthz))
        .route("/v1/ice-servers", get(ice_servers))
        .route("/kyuu.js", get(common_js))
        .route("/{id}", get(by_id))
        .route("/{id}/{*rest}", get(by_id_rest))
        .with_state(shared.clone());
    (shared, r)
}

/// Binds `addr` and serves [`router`] until an error occurs.
pub async fn serve(addr: SocketAddr, cfg: SignalConfig, ice: IceProvider) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    serve_listener(listener, cfg, ice).await
}

/// Serves [`router`] on an already bound listener (tests bind port 0 and read the address).
pub async fn serve_listener(
    listener: tokio::net::TcpListener,
    cfg: SignalConfig,
    ice: IceProvider,
) -> anyhow::Result<()> {
    let app = router(cfg, ice).into_make_service_with_connect_info::<SocketAddr>();
    // Signaling frames are small and latency-bound: no Nagle.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
struct WsParams {
    v: Option<u32>,
    resume: Option<String>,
    token: Option<String>,
    /// The client's region, for choosing a TURN node in a fleet.
    region: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct IceParams {
    user: Option<String>,
    token: Option<String>,
    /// The client's region, for choosing a TURN node in a fleet.
    region: Option<String>,
}

/// The client's region: the `region` query parameter, else the `X-Kyuu-Region` header (set by
/// a geo-aware load balancer), else none (this node's region).
fn region_of(param: Option<String>, h: &HeaderMap) -> Option<String> {
    param.or_else(|| {
        h.get("x-kyuu-region")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

fn is_ws_upgrade(h: &HeaderMap) -> bool {
    h.get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

use kyuu_stun::rest::unix_now as now_unix;

fn bearer(h: &HeaderMap) -> Option<String> {
    let v = h.get(header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ").map(str::to_owned)
}

/// `None` when auth is off; `Some(Err)` is a 401 response.
fn authenticate(
    cfg: &SignalConfig,
    given: Option<String>,
    headers: &HeaderMap,
) -> Option<Result<Claims, Response>> {
    let secret = cfg.auth_secret.as_deref()?;
    let Some(tok) = given.or_else(|| bearer(headers)) else {
        return Some(Err(refuse(
            StatusCode::UNAUTHORIZED,
            "access token required (?token= or Authorization: Bearer)",
        )));
    };
    Some(
        token::verify(secret.as_bytes(), &tok, now_unix())
            .map_err(|e| refuse(StatusCode::UNAUTHORIZED, &e.to_string())),
    )
}

fn refuse(status: StatusCode, msg: &str) -> Response {
    metrics::counter!("kyuu_signal_refused_total", "status" => status.as_u16().to_string())
        .increment(1);
    debug!("handshake refused: {status} {msg}");
    (status, format!("{msg}\n")).into_response()
}

async fn root(State(s): State<Arc<Shared>>, req: Request) -> Response {
    if is_ws_upgrade(req.headers()) {
        return ws_entry(s, None, req).await;
    }
    page(INDEX_HTML)
}

async fn by_id(State(s): State<Arc<Shared>>, Path(id): Path<String>, req: Request) -> Response {
    if is_ws_upgrade(req.headers()) {
        return ws_entry(s, Some(id), req).await;
    }
    match id.as_str() {
        "check" => page(CHECK_HTML),
        _ => (
            StatusCode::NOT_FOUND,
            "kyuu signaling: connect a WebSocket to /<id>\n",
        )
            .into_response(),
    }
}

async fn by_id_rest(
    State(s): State<Arc<Shared>>,
    Path((id, _rest)): Path<(String, String)>,
    req: Request,
) -> Response {
    if is_ws_upgrade(req.headers()) {
        return ws_entry(s, Some(id), req).await;
    }
    StatusCode::NOT_FOUND.into_response()
}

fn page(html: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(html),
    )
        .into_response()
}

async fn common_js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        COMMON_JS,
    )
        .into_response()
}

async fn healthz(State(s): State<Arc<Shared>>) -> Response {
    let n = s.lock().hub.connections();
    let mut v = serde_json::json!({"status": "ok", "connections": n});
    if let (Some(f), serde_json::Value::Object(m)) = (s.fleet.get(), &mut v) {
        m.insert("fleet".into(), f.status().as_str().into());
    }
    Json(v).into_response()
}

async fn ice_servers(
    State(s): State<Arc<Shared>>,
    Query(p): Query<IceParams>,
    req: Request,
) -> Response {
    let headers = req.headers();
    let region = region_of(p.region, headers);
    let user = match authenticate(&s.cfg, p.token, headers) {
        Some(Err(r)) => return r,
        Some(Ok(claims)) => claims.sub,
        None => {
            if !s.may_mint(client_ip(req.extensions()), "ice_servers") {
                return (
                    StatusCode::TOO_MANY_REQUESTS,
                    [(header::RETRY_AFTER, HeaderValue::from_static("60"))],
                    "too many credential requests from this address; set signal.auth_secret \
                     to hand credentials to authenticated users only\n",
                )
                    .into_response();
            }
            p.user.unwrap_or_else(anonymous_user)
        }
    };
    let servers = s.ice_servers(&user, region.as_deref());
    (
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(servers),
    )
        .into_response()
}

/// The user part of an open-minted credential: its own name per credential, so
/// `turn.user_quota` bounds what one credential can hold.
fn anonymous_user() -> String {
    format!("anon-{:08x}", rand::random::<u32>())
}

fn client_ip(ext: &axum::http::Extensions) -> IpAddr {
    ext.get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

impl Shared {
    /// Open minting: whether `ip` may have another credential now (counted either way).
    fn may_mint(&self, ip: IpAddr, route: &'static str) -> bool {
        let ok = self
            .mint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(ip, std::time::Instant::now());
        if ok {
            metrics::counter!("kyuu_signal_credentials_minted_total", "route" => route)
                .increment(1);
        } else {
            metrics::counter!("kyuu_signal_mint_limited_total", "route" => route).increment(1);
            debug!("credential minting limited for {ip} ({route})");
        }
        ok
    }
}

async fn ws_entry(s: Arc<Shared>, id: Option<String>, req: Request) -> Response {
    let (mut parts, _body) = req.into_parts();
    if let Some(r) = check_origin(&s.cfg, &parts) {
        return r;
    }
    let params = match Query::<WsParams>::try_from_uri(&parts.uri) {
        Ok(Query(p)) => p,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, &e.body_text()),
    };
    let claims = match authenticate(&s.cfg, params.token, &parts.headers) {
        Some(Ok(c)) => Some(c),
        Some(Err(r)) => return r,
        None => None,
    };
    let ip = client_ip(&parts.extensions);
    if s.draining.load(std::sync::atomic::Ordering::Relaxed) {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining; connect to another node",
        );
    }
    let region = region_of(params.region.clone(), &parts.headers);
    let upgrade = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(u) => u,
        Err(rej) => return rej.into_response(),
    };
    let v2 = params.v == Some(2) || id.as_deref().is_none_or(str::is_empty);
    let ice = v2.then(|| {
        let mut servers = match (&claims, id.as_deref()) {
            (Some(_), Some(user)) => s.ice_servers(user, region.as_deref()),
            (Some(_), None) => s.ice_servers("kyuu", region.as_deref()),
            (None, _) => s.ice_servers(&anonymous_user(), region.as_deref()),
        };
        // Open minting past its limit: the welcome still carries the STUN servers.
        let minting = servers.iter().any(|i| i.username.is_some());
        if claims.is_none() && minting && !s.may_mint(ip, "welcome") {
            servers.retain(|i: &IceServer| i.username.is_none());
        }
        serde_json::to_value(servers).unwrap_or_default()
    });
    let request = ConnectRequest {
        id,
        resume: params.resume,
        v2,
        ip,
        claims,
        ice_servers: ice,
    };
    if let (Some(f), Some(id)) = (s.fleet.get(), request.id.as_deref()) {
        if !id.is_empty()
            && f.admit(id, request.resume.as_deref(), s.cfg.legacy_takeover)
                .await
                .is_err()
        {
            let r = crate::hub::Refusal::IdTaken(id.to_owned());
            return refuse(StatusCode::CONFLICT, &r.to_string());
        }
    }
    s.start_timer();
    let (tx, rx) = mpsc::channel(s.cfg.send_queue.max(1));
    let (kill_tx, kill_rx) = oneshot::channel();
    let accepted = {
        let now = std::time::Instant::now();
        let mut st = s.lock();
        match st.hub.connect(now, request) {
            Ok(a) => {
                st.links.insert(a.conn, Link { tx, kill: kill_tx });
                if let Some(f) = s.fleet.get() {
                    // Same queue as routes, so the claim is ordered before this client's frames.
                    let hash = st.hub.resume_token(&a.id).map(crate::fleet::token_hash);
                    let _ = f.send(Cmd::Claim(a.id.clone(), hash));
                }
                s.deliver(&mut st, now);
                a
            }
            Err(r) => {
                drop(st);
                let status =
                    StatusCode::from_u16(r.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
                return refuse(status, &r.to_string());
            }
        }
    };
    let conn = accepted.conn;
    let s_fail = s.clone();
    let limit = s.cfg.hard_frame_limit();
    upgrade
        .read_buffer_size(s.cfg.read_buffer_size.max(64))
        .write_buffer_size(8 * 1024)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_failed_upgrade(move |e| {
            debug!("upgrade failed: {e}");
            s_fail.with_hub(|h, now| h.disconnect(now, conn));
            s_fail.lock().links.remove(&conn);
        })
        .on_upgrade(move |socket| run_conn(s, conn, socket, rx, kill_rx))
}

fn check_origin(cfg: &SignalConfig, parts: &Parts) -> Option<Response> {
    if cfg.allowed_origins.is_empty() {
        return None;
    }
    let origin = parts.headers.get(header::ORIGIN)?;
    let ok = origin
        .to_str()
        .is_ok_and(|o| cfg.allowed_origins.iter().any(|a| a == o));
    (!ok).then(|| refuse(StatusCode::FORBIDDEN, "origin not allowed"))
}

/// One task per connection: reads frames into the hub, writes its queue to the socket, pings.
async fn run_conn(
    s: Arc<Shared>,
    conn: ConnId,
    mut socket: WebSocket,
    mut rx: mpsc::Receiver<String>,
    mut kill: oneshot::Receiver<Kill>,
) {
    let write_timeout = s.cfg.write_timeout();
    let ping_every = Duration::from_secs(s.cfg.ping_interval_secs);
    let idle_limit = Duration::from_secs(s.cfg.idle_timeout_secs);
    let mut last_heard = tokio::time::Instant::now();
    let far = Duration::from_secs(365 * 24 * 3600);
    let tick = if ping_every.is_zero() {
        far
    } else {
        ping_every
    };
    let mut ticker = tokio::time::interval_at(last_heard + tick, tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut kill_armed = true;

    let close: Option<Kill> = loop {
        // Fixed order (no random start): queued output first (it drains before more input adds
        // to it, and what the hub queued before a close goes out before it), then a close, then
        // input, then the ping timer.
        tokio::select! {
            biased;
            o = rx.recv() => match o {
                Some(text) => {
                    if write_batch(&mut socket, &mut rx, text, write_timeout).await.is_err() {
                        break None;
                    }
                }
                // The hub dropped our queue. It does that together with sending a close reason,
                // and `select!` may see the closed queue first: take the reason if one is there.
                None => break kill.try_recv().ok(),
            },
            k = &mut kill, if kill_armed => match k {
                Ok(k) => break Some(k),
                // The link was dropped without a reason: the hub no longer knows us.
                Err(_) => kill_armed = false,
            },
            m = socket.recv() => match m {
                Some(Ok(Message::Text(t))) => {
                    last_heard = tokio::time::Instant::now();
                    s.with_hub(|h, now| h.text(now, conn, t.as_str()));
                }
                Some(Ok(Message::Binary(b))) => {
                    last_heard = tokio::time::Instant::now();
                    s.with_hub(|h, now| h.binary(now, conn, b.len()));
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {
                    last_heard = tokio::time::Instant::now();
                }
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => {
                    let text = e.to_string();
                    debug!("connection {} read error: {text}", conn.get());
                    if text.contains("too long") || text.contains("Space limit") {
                        break Some((1009, "message too big"));
                    }
                    break None;
                }
            },
            _ = ticker.tick() => {
                if !idle_limit.is_zero() && last_heard.elapsed() > idle_limit {
                    break Some((1001, "idle timeout"));
                }
                let ping = tokio::time::timeout(write_timeout, socket.send(Message::Ping(Default::default())));
                if !matches!(ping.await, Ok(Ok(()))) {
                    break None;
                }
            }
        }
    };
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: reason.into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
    s.with_hub(|h, now| h.disconnect(now, conn));
    s.lock().links.remove(&conn);
}

/// Writes `first` and whatever else is queued (bounded), then flushes once.
async fn write_batch(
    socket: &mut WebSocket,
    rx: &mut mpsc::Receiver<String>,
    first: String,
    timeout: Duration,
) -> Result<(), ()> {
    let fut = async {
        socket.feed(Message::Text(first.into())).await?;
        for _ in 0..64 {
            let Ok(more) = rx.try_recv() else {
                break;
            };
            socket.feed(Message::Text(more.into())).await?;
        }
        socket.flush().await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(()),
    }
}
