//! kyuu-signal: WebSocket signaling for WebRTC.
//!
//! * A relay compatible with libdatachannel's example signaling servers: a client connects to
//!   `ws://host:port/<id>`; a text frame `{"id":"<dest>", ..}` is delivered to `<dest>` with
//!   `"id"` replaced by the sender's id and every other member untouched.
//! * An opt-in protocol on top (server-assigned ids, resume tokens, rooms with presence, a
//!   directory of names and topics, held messages for reconnecting peers, keepalive, errors),
//!   described in `PROTOCOL.md`. Legacy clients never see any of it.
//! * ICE provisioning (`GET /v1/ice-servers`) with TURN REST credentials, `/healthz`, and two
//!   embedded web pages (`/` a call page, `/check` an ICE server check).
//!
//! The routing logic is the sans-IO [`hub::Hub`]; [`router`] is the thin axum/tokio shell.

pub mod config;
pub mod fleet;
pub mod frame;
pub mod hub;
pub mod ice;
pub mod mint;
pub mod nodes;
mod server;
pub mod token;

pub use config::SignalConfig;
pub use fleet::{FleetConfig, FleetStatus};
pub use ice::{IceProvider, IceServer};
pub use nodes::{FleetView, NodeLoad};
pub use server::{
    router, router_with_admin, router_with_fleet, serve, serve_listener, SignalAdmin,
};
