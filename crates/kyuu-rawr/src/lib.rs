//! RAWR: hierarchical relay selection for TURN. The normative spec is `docs/rawr.md`.
//!
//! A protocol crate: sans-IO cores (time and bytes in, transmits and timers out), no sockets,
//! no runtime, no clock.
//! * [`wire`]: methods (0xC01-0xC04), attributes (0x4C01-0x4C09, 0xCC01-0xCC02), typed messages.
//! * [`node`]: the node rules (Exchange, Register, Connect, Cancel; spec §4).
//! * [`peer`]: the peer algorithm (spec §8).
//! * [`txn`]: request retransmission and liveness shared by both (spec §5).
//! * [`cred`]: the TURN REST credentials a meeting node mints.
//! * [`config::RawrConfig`]: the `[rawr]` config section.
//!
//! The shells live elsewhere: the tokio runners, the JSON/HTTP form and the neighbour table in
//! `kyuu_server::rawr`; `kyuu rawr …` in the `kyuu` binary; the namespace lab scenarios in
//! `kyuu-rawr-lab`; the TURN client peers use in `kyuu_client::turn`.

pub mod config;
pub mod cred;
pub mod node;
pub mod peer;
pub mod txn;
pub mod wire;

pub use config::RawrConfig;
