//! kyuu-client: the client side of kyuu's STUN.
//!
//! * [`nat`]: RFC 5780 NAT behaviour discovery as a sans-IO state machine ([`nat::NatProbe`]),
//!   with the classic RFC 3489 names; [`discover`] drives it over a tokio UDP socket
//!   (`kyuu nat`).
//! * [`transaction`]: RFC 8489 retransmission timing, the one schedule of every client here.
//! * [`turn`]: the sans-IO TURN client (tests, fuzzing, RAWR, benchmarks); [`turn_udp`] drives
//!   it over a tokio UDP socket.
//! * [`binding`]: writing Binding requests, reading Binding responses.
//! * `kyuu-stun-bench` (a binary of this crate): Binding requests per second and latency, kyuu
//!   against coturn.

pub mod binding;
pub mod discover;
pub mod lifetime;
pub mod nat;
pub mod transaction;
pub mod turn;
pub mod turn_udp;

pub use discover::{discover, resolve_server, DiscoverError};
pub use lifetime::{binding_lifetime, LifetimeReport};
pub use nat::{
    Filtering, Mapping, NatProbe, NatReport, NatType, ProbeConfig, ProbeError, WrongSource,
};
pub use transaction::RetransmitConfig;
