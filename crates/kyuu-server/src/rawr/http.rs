//! The RAWR control plane as JSON over HTTP, for browsers (`docs/rawr.md` §9). Mount with
//! `Router::new().nest("/rawr", kyuu_server::rawr::http::router(node_udp_addr))`.
//!
//! The handlers speak RAWR over UDP to the node on the browser's behalf (to this node, or to the
//! root for Exchange and for the root fallback), so the node core is the same for both forms.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kyuu_stun::{Class, Message};
use serde::{Deserialize, Serialize};

use std::sync::Arc;

use super::runtime::transact_on;
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

fn bad(e: &'static str) -> Response {
    err(StatusCode::BAD_REQUEST, 400, e)
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

impl AskError {
    fn into_response(self) -> Response {
        match self {
            AskError::Rawr(code, reason) => {
                err(StatusCode::BAD_GATEWAY, code, format!("{code} {reason}"))
            }
            AskError::Transport(status, e) => err(status, status.as_u16(), e),
        }
    }
}

/// Sends a request and returns the success answer; error answers become [`AskError::Rawr`].
async fn ask(
    st: &AppState,
    to: SocketAddr,
    build: impl FnOnce(kyuu_stun::TransactionId) -> Vec<u8>,
    deadline: Duration,
) -> Result<Vec<u8>, AskError> {
    let transport = |e: std::io::Error| AskError::Transport(StatusCode::BAD_GATEWAY, e.to_string());
    let sock = (st.sockets)().map_err(transport)?;
    sock.set_nonblocking(true).map_err(transport)?;
    let sock = tokio::net::UdpSocket::from_std(sock).map_err(transport)?;
    let ans = transact_on(&sock, to, build, deadline)
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

async fn exchange(State(st): State<AppState>, Json(r): Json<ExchangeIn>) -> Response {
    let (session, mac) = match (parse_session(&r.session), parse_mac(&r.mac)) {
        (Ok(s), Ok(m)) => (s, m),
        (Err(e), _) | (_, Err(e)) => return bad(e),
    };
    let to = r.root.unwrap_or(st.node);
    for _ in 0..4 {
        let s2 = session.clone();
        match ask(
            &st,
            to,
            |t| wire::encode_exchange(t, &s2, mac, &[]),
            Duration::from_secs(12),
        )
        .await
        {
            Ok(ans) => {
                let Ok(m) = Message::parse(&ans) else {
                    return err(StatusCode::BAD_GATEWAY, 502, "bad answer");
                };
                return match wire::decode_exchange_answer(&m) {
                    Ok((other, _)) => Json(ExchangeOut {
                        mac: other.to_string(),
                    })
                    .into_response(),
                    Err(e) => err(StatusCode::BAD_GATEWAY, 502, e),
                };
            }
            // The other peer has not asked yet: ask again.
            Err(AskError::Rawr(wire::code::TIMEOUT, _)) => continue,
            Err(e) => return e.into_response(),
        }
    }
    err(
        StatusCode::GATEWAY_TIMEOUT,
        408,
        "the other peer did not ask",
    )
}

#[derive(Debug, Deserialize)]
struct RegisterIn {
    mac: String,
    lifetime: Option<u32>,
}

async fn register(State(st): State<AppState>, Json(r): Json<RegisterIn>) -> Response {
    let mac = match parse_mac(&r.mac) {
        Ok(m) => m,
        Err(e) => return bad(e),
    };
    let lifetime = r.lifetime;
    match ask(
        &st,
        st.node,
        |t| wire::encode_register(t, mac, lifetime),
        Duration::from_secs(5),
    )
    .await
    {
        Ok(ans) => {
            let lifetime = Message::parse(&ans)
                .ok()
                .and_then(|m| m.u32_attr(kyuu_stun::attr::LIFETIME))
                .and_then(Result::ok)
                .unwrap_or(0);
            Json(serde_json::json!({ "lifetime": lifetime })).into_response()
        }
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

async fn connect(State(st): State<AppState>, Json(r): Json<ConnectIn>) -> Response {
    let (session, mac, target) = match (
        parse_session(&r.session),
        parse_mac(&r.mac),
        r.target.as_deref().map(parse_mac).transpose(),
    ) {
        (Ok(s), Ok(m), Ok(t)) => (s, m, t),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return bad(e),
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
    match ask(
        &st,
        to,
        |t| wire::encode_connect(t, &req, None),
        Duration::from_secs(25),
    )
    .await
    {
        Ok(ans) => {
            let relay = Message::parse(&ans)
                .map_err(|e| e.to_string())
                .and_then(|m| Relay::decode(&m).map_err(|e| e.to_string()));
            match relay {
                Ok(r) => Json(ConnectOut {
                    ice_servers: serde_json::json!([{
                        "urls": r.uris,
                        "username": r.username,
                        "credential": r.password,
                    }]),
                    path: r.path,
                    at_root: r.at_root,
                })
                .into_response(),
                Err(e) => err(StatusCode::BAD_GATEWAY, 502, e),
            }
        }
        Err(e) => e.into_response(),
    }
}
