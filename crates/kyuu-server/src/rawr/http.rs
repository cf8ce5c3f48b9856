//! The RAWR control plane as JSON over HTTP and over one WebSocket, for browsers
//! (`docs/rawr.md` §9). Mount with
//! `Router::new().nest("/rawr", kyuu_server::rawr::http::router(node_udp_addr))`.
//!
//! The handlers speak RAWR over UDP to the node on the browser's behalf (to this node, or to the
//! root for Exchange and for the root fallback), so the node core is the same for every form.
//! `GET /rawr/ws` upgrades to a WebSocket that carries the same operations as JSON messages,
//! several at once (Exchange and Connect in parallel) and the node's pending indications.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kyuu_stun::{Class, Message};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::runtime::transact_on_pending;
use kyuu_rawr::wire::{self, ConnectReq, Mac, Relay, MAX_HOPS};

/// The script web apps load: `rawrIceServers({gateway, root, session})`.
pub const SCRIPT: &str = include_str!("rawr.js");

/// Makes the UDP socket a handler speaks RAWR from (the lab makes it inside a namespace).
pub type SocketFactory = Arc<dyn Fn() -> std::io::Result<std::net::UdpSocket> + Send + Sync>;

#[derive(Clone)]
struct AppState {
    node: SocketAddr,
    sockets: SocketFactory,
}

/// The `/rawr` router for a node whose RAWR UDP address is `node` (an unspecified IP is
/// replaced by loopback).
pub fn router(node: SocketAddr) -> Router {
    router_with(node, Arc::new(|| std::net::UdpSocket::bind(("0.0.0.0", 0))))
}

/// [`router`] with the handlers' UDP sockets made by `sockets`.
pub fn router_with(node: SocketAddr, sockets: SocketFactory) -> Router {
    let node = if node.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), node.port())
    } else {
        node
    };
    Router::new()
        .route("/rawr.js", get(script))
        .route("/exchange", post(exchange))
        .route("/register", post(register))
        .route("/connect", post(connect))
        .route("/ws", get(ws_upgrade))
        .with_state(AppState { node, sockets })
}

async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}

#[derive(Debug, Serialize)]
struct ErrorBody {
    error: String,
    code: u16,
}

fn err(status: StatusCode, code: u16, e: impl ToString) -> Response {
    (
        status,
        Json(ErrorBody {
            error: e.to_string(),
            code,
        }),
    )
        .into_response()
}

fn parse_session(s: &str) -> Result<Vec<u8>, &'static str> {
    let b = hex::decode(s).map_err(|_| "session is not hex")?;
    if !(wire::MIN_SESSION..=wire::MAX_SESSION).contains(&b.len()) {
        return Err("session must be 16..64 bytes");
    }
    Ok(b)
}

fn parse_mac(s: &str) -> Result<Mac, &'static str> {
    s.parse().map_err(|_| "bad MAC")
}

/// A failed RAWR exchange.
#[derive(Debug)]
enum AskError {
    /// The node answered with an error code.
    Rawr(u16, String),
    /// No answer, or an unusable one.
    Transport(StatusCode, String),
}

/// Why an operation failed: bad input, or what [`ask`] reports.
#[derive(Debug)]
enum Fail {
    Bad(&'static str),
    Ask(AskError),
}

impl From<AskError> for Fail {
    fn from(e: AskError) -> Self {
        Fail::Ask(e)
    }
}

impl Fail {
    /// `(HTTP status, RAWR-or-HTTP code, message)`.
    fn parts(self) -> (StatusCode, u16, String) {
        match self {
            Fail::Bad(e) => (StatusCode::BAD_REQUEST, 400, e.to_owned()),
            Fail::Ask(AskError::Rawr(code, reason)) => {
                (StatusCode::BAD_GATEWAY, code, format!("{code} {reason}"))
            }
            Fail::Ask(AskError::Transport(status, e)) => (status, status.as_u16(), e),
        }
    }

    fn into_response(self) -> Response {
        let (status, code, e) = self.parts();
        err(status, code, e)
    }
}

/// Told when the node holds a request (a pending indication came back).
type OnPending<'a> = &'a (dyn Fn() + Send + Sync);

/// Sends a request and returns the success answer; error answers become [`AskError::Rawr`].
async fn ask(
    st: &AppState,
    to: SocketAddr,
    build: impl FnOnce(kyuu_stun::TransactionId) -> Vec<u8>,
    deadline: Duration,
    pending: OnPending<'_>,
) -> Result<Vec<u8>, AskError> {
    let transport = |e: std::io::Error| AskError::Transport(StatusCode::BAD_GATEWAY, e.to_string());
    let sock = (st.sockets)().map_err(transport)?;
    sock.set_nonblocking(true).map_err(transport)?;
    let sock = tokio::net::UdpSocket::from_std(sock).map_err(transport)?;
    let ans = transact_on_pending(&sock, to, build, deadline, pending)
        .await
        .map_err(|e| AskError::Transport(StatusCode::GATEWAY_TIMEOUT, e.to_string()))?;
    let m = Message::parse(&ans)
        .map_err(|e| AskError::Transport(StatusCode::BAD_GATEWAY, e.to_string()))?;
    if m.class() == Class::Error {
        return Err(match m.error_code() {
            Some(Ok(e)) => AskError::Rawr(e.code, e.reason.to_owned()),
            _ => AskError::Rawr(502, "malformed error".into()),
        });
    }
    Ok(ans)
}

fn bad_answer(e: impl ToString) -> Fail {
    Fail::Ask(AskError::Transport(StatusCode::BAD_GATEWAY, e.to_string()))
}

#[derive(Debug, Deserialize)]
struct ExchangeIn {
    session: String,
    mac: String,
    /// The root's RAWR address; absent: this node is the root.
    root: Option<SocketAddr>,
}

#[derive(Debug, Serialize)]
struct ExchangeOut {
    mac: String,
}

async fn run_exchange(
    st: &AppState,
    r: ExchangeIn,
    pending: OnPending<'_>,
) -> Result<serde_json::Value, Fail> {
    let (session, mac) = match (parse_session(&r.session), parse_mac(&r.mac)) {
        (Ok(s), Ok(m)) => (s, m),
        (Err(e), _) | (_, Err(e)) => return Err(Fail::Bad(e)),
    };
    let to = r.root.unwrap_or(st.node);
    for _ in 0..4 {
        let s2 = session.clone();
        match ask(
            st,
            to,
            |t| wire::encode_exchange(t, &s2, mac, &[]),
            Duration::from_secs(12),
            pending,
        )
        .await
        {
            Ok(ans) => {
                let m = Message::parse(&ans).map_err(bad_answer)?;
                let (other, _) = wire::decode_exchange_answer(&m).map_err(bad_answer)?;
                return Ok(serde_json::json!(ExchangeOut {
                    mac: other.to_string()
                }));
            }
            // The other peer has not asked yet: ask again.
            Err(AskError::Rawr(wire::code::TIMEOUT, _)) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(Fail::Ask(AskError::Transport(
        StatusCode::GATEWAY_TIMEOUT,
        "the other peer did not ask".into(),
    )))
}

async fn exchange(State(st): State<AppState>, Json(r): Json<ExchangeIn>) -> Response {
    match run_exchange(&st, r, &|| {}).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct RegisterIn {
    mac: String,
    lifetime: Option<u32>,
}

async fn run_register(
    st: &AppState,
    r: RegisterIn,
    pending: OnPending<'_>,
) -> Result<serde_json::Value, Fail> {
    let mac = parse_mac(&r.mac).map_err(Fail::Bad)?;
    let lifetime = r.lifetime;
    let ans = ask(
        st,
        st.node,
        |t| wire::encode_register(t, mac, lifetime),
        Duration::from_secs(5),
        pending,
    )
    .await?;
    let lifetime = Message::parse(&ans)
        .ok()
        .and_then(|m| m.u32_attr(kyuu_stun::attr::LIFETIME))
        .and_then(Result::ok)
        .unwrap_or(0);
    Ok(serde_json::json!({ "lifetime": lifetime }))
}

async fn register(State(st): State<AppState>, Json(r): Json<RegisterIn>) -> Response {
    match run_register(&st, r, &|| {}).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Debug, Deserialize)]
struct ConnectIn {
    session: String,
    mac: String,
    /// The other peer's MAC; absent: the wildcard Connect, sent in parallel with Exchange.
    #[serde(default)]
    target: Option<String>,
    root: SocketAddr,
    /// "gateway" (default: this node) or "root" (the fallback: Connect at the root directly).
    #[serde(default)]
    at: Option<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectOut {
    path: Vec<String>,
    at_root: bool,
    ice_servers: serde_json::Value,
}

async fn run_connect(
    st: &AppState,
    r: ConnectIn,
    pending: OnPending<'_>,
) -> Result<serde_json::Value, Fail> {
    let (session, mac, target) = match (
        parse_session(&r.session),
        parse_mac(&r.mac),
        r.target.as_deref().map(parse_mac).transpose(),
    ) {
        (Ok(s), Ok(m), Ok(t)) => (s, m, t),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return Err(Fail::Bad(e)),
    };
    let to = match r.at.as_deref() {
        Some("root") => r.root,
        _ => st.node,
    };
    let req = ConnectReq {
        session,
        mac,
        target,
        root: r.root,
        hops: MAX_HOPS,
        path: Vec::new(),
    };
    let ans = ask(
        st,
        to,
        |t| wire::encode_connect(t, &req, None),
        Duration::from_secs(25),
        pending,
    )
    .await?;
    let m = Message::parse(&ans).map_err(bad_answer)?;
    let r = Relay::decode(&m).map_err(bad_answer)?;
    Ok(serde_json::json!(ConnectOut {
        ice_servers: serde_json::json!([{
            "urls": r.uris,
            "username": r.username,
            "credential": r.password,
        }]),
        path: r.path,
        at_root: r.at_root,
    }))
}

async fn connect(State(st): State<AppState>, Json(r): Json<ConnectIn>) -> Response {
    match run_connect(&st, r, &|| {}).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

// ---- WebSocket form ----

/// Operations one WebSocket may have running at once.
const WS_MAX_OPS: usize = 8;
/// Largest message accepted from the browser.
const WS_MAX_MESSAGE: usize = 4096;
/// Operations one WebSocket may start in all (a page needs three or four per session).
const WS_MAX_TOTAL_OPS: usize = 64;
/// How long a WebSocket may stay open.
const WS_LIFETIME: Duration = Duration::from_secs(300);

async fn ws_upgrade(State(st): State<AppState>, ws: WebSocketUpgrade) -> Response {
    ws.max_message_size(WS_MAX_MESSAGE)
        .on_upgrade(move |socket| ws_session(st, socket))
}

/// One browser's WebSocket: each text message `{"op", "id", ...fields of the HTTP form}` starts
/// an operation (`register`, `exchange`, `connect`); answers are `{"id", "result"}` or
/// `{"id", "error", "code"}`, and `{"id", "pending": true}` when the node first holds it.
async fn ws_session(st: AppState, mut socket: WebSocket) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<serde_json::Value>(4 * WS_MAX_OPS);
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut started = 0usize;
    let end = tokio::time::Instant::now() + WS_LIFETIME;
    let mut ops = tokio::task::JoinSet::new();
    loop {
        let msg = tokio::select! {
            m = socket.recv() => m,
            Some(v) = rx.recv() => {
                if socket.send(WsMessage::Text(v.to_string().into())).await.is_err() {
                    break;
                }
                continue;
            }
            Some(_) = ops.join_next(), if !ops.is_empty() => continue,
            _ = tokio::time::sleep_until(end) => break,
        };
        let text = match msg {
            Some(Ok(WsMessage::Text(t))) => t,
            Some(Ok(WsMessage::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => continue,
        };
        let v: serde_json::Value = match serde_json::from_str(text.as_str()) {
            Ok(v) => v,
            Err(_) => {
                let _ = tx.try_send(serde_json::json!({"error": "not JSON", "code": 400}));
                continue;
            }
        };
        let id = v.get("id").cloned().unwrap_or(serde_json::Value::Null);
        let busy = running.load(std::sync::atomic::Ordering::Relaxed) >= WS_MAX_OPS;
        if busy || started >= WS_MAX_TOTAL_OPS {
            let _ = tx.try_send(
                serde_json::json!({"id": id, "error": "too many operations", "code": 486}),
            );
            continue;
        }
        started += 1;
        running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (st, tx, running) = (st.clone(), tx.clone(), running.clone());
        ops.spawn(async move {
            let said = std::sync::atomic::AtomicBool::new(false);
            let ptx = tx.clone();
            let pid = id.clone();
            let pending = move || {
                if !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    let _ = ptx.try_send(serde_json::json!({"id": pid, "pending": true}));
                }
            };
            let out = ws_op(&st, v, &pending).await;
            let reply = match out {
                Ok(result) => serde_json::json!({"id": id, "result": result}),
                Err(e) => {
                    let (_, code, error) = e.parts();
                    serde_json::json!({"id": id, "error": error, "code": code})
                }
            };
            let _ = tx.send(reply).await;
            running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        });
    }
    ops.abort_all();
}

async fn ws_op(
    st: &AppState,
    v: serde_json::Value,
    pending: OnPending<'_>,
) -> Result<serde_json::Value, Fail> {
    let op = v
        .get("op")
        .and_then(|o| o.as_str())
        .unwrap_or("")
        .to_owned();
    let parse = |_: serde_json::Error| Fail::Bad("bad fields for op");
    match op.as_str() {
        "register" => run_register(st, serde_json::from_value(v).map_err(parse)?, pending).await,
        "exchange" => run_exchange(st, serde_json::from_value(v).map_err(parse)?, pending).await,
        "connect" => run_connect(st, serde_json::from_value(v).map_err(parse)?, pending).await,
        _ => Err(Fail::Bad("unknown op")),
    }
}
