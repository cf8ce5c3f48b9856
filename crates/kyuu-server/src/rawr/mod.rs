//! The RAWR node's and peer's IO shell around the sans-IO cores in `kyuu_rawr`.
//!
//! * [`runtime`]: tokio runners: [`runtime::start`] for `kyuu serve` (fed by the STUN port's
//!   extension channel), [`runtime::spawn_node`] standalone, [`runtime::run_peer`].
//! * [`http`]: the JSON/HTTP form for browsers and `rawr.js` (mounted at `/rawr`).
//! * [`sys`]: neighbour table and interface MACs (iproute2, `/proc/net/arp`).
//! * [`fleet`]: which root node of a fleet holds a session (Redis claims).
//! * [`discover`]: finding the gateway without configuration (router probe, DNS SRV).

pub mod discover;
pub mod fleet;
pub mod http;
pub mod runtime;
pub mod sys;
