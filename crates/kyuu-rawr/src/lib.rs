//! RAWR: hierarchical relay selection for TURN. The normative spec is `docs/rawr.md`.
//!
//! * [`wire`]: methods, attributes and typed messages.
//! * [`node`]: the sans-IO node (Exchange, Register, Connect, Cancel; §4 of the spec).
//! * [`peer`]: the sans-IO peer algorithm (§8).
//! * [`config::RawrConfig`]: the `[rawr]` config section.
//! * [`cred`]: TURN REST credentials the meeting node mints.

pub mod config;
pub mod cred;
pub mod node;
pub mod peer;
pub mod txn;
pub mod wire;

pub use config::RawrConfig;
pub mod cli;
pub mod http;
pub mod lab;
pub mod runtime;
pub mod sys;
pub mod turn;
