//! kyuu-server: the tokio shell around kyuu's protocol cores.
//!
//! * [`admin`]: the admin API and the `/status` page.
//! * [`config`]: the TOML configuration of `kyuu serve`.
//! * [`http`]: one axum server for signaling (`kyuu_signal::router`), `/metrics` and `/healthz`.
//! * [`limits`]: pre-authentication limits on every stream listener (per-IP caps, timeouts).
//! * [`metrics`]: the Prometheus recorder.
//! * [`proxy`]: PROXY protocol v2 headers from load balancers.
//! * [`tls_mux`]: TURN over TLS beside HTTPS on one port.
//! * [`tls`]: certificates for the TLS listeners (STUN/TURN and HTTPS).
//! * [`rawr`]: the RAWR node and peer runners, HTTP form and neighbour table around `kyuu_rawr`.
//! * `relay`: the STUN/TURN listeners and relay sockets around `kyuu_turn`.
//! * [`start`]: starts everything from a [`config::Config`].

pub mod admin;
pub mod config;
pub mod fleet;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod proxy;
pub mod rawr;
pub mod relay;
mod serve;
pub mod tls;
pub mod tls_mux;

pub use serve::{start, start_with, Running};
