//! RAWR: hierarchical relay selection for TURN. The normative spec is `docs/rawr.md`.
//!
//! Sans-IO cores (time and bytes in, transmits and timers out):
//! * [`wire`]: methods (0xC01-0xC04), attributes (0x4C01-0x4C09, 0xCC01-0xCC02), typed messages.
//! * [`node`]: the node rules (Exchange, Register, Connect, Cancel; spec §4).
//! * [`peer`]: the peer algorithm (spec §8).
//! * [`txn`]: request retransmission and liveness shared by both.
//! * [`cred`]: the TURN REST credentials a meeting node mints.
//! * [`config::RawrConfig`]: the `[rawr]` config section.
//!
//! Shells and tools:
//! * [`runtime`]: tokio runners: [`runtime::start`] for `kyuu serve` (fed by the STUN port's
//!   extension channel), [`runtime::spawn_node`] standalone, [`runtime::run_peer`].
//! * [`http`]: the JSON/HTTP form for browsers and `rawr.js` (mount at `/rawr`).
//! * [`sys`]: neighbour table and interface MACs (iproute2, `/proc/net/arp`).
//! * [`turn`]: a minimal TURN client used by the lab, benchmark and tests.
//! * [`lab`]: the RAWR network in `kyuu-lab` namespaces (tests, benchmark, `kyuu lab`).
//! * [`cli`]: `kyuu rawr …` and `kyuu lab` arguments and runners.

pub mod cli;
pub mod config;
pub mod cred;
pub mod http;
pub mod lab;
pub mod node;
pub mod peer;
pub mod runtime;
pub mod sys;
pub mod turn;
pub mod txn;
pub mod wire;

pub use config::RawrConfig;
