//! Sans-IO STUN Binding ([RFC 8489], [RFC 5780]) and TURN ([RFC 8656], [RFC 6062]) server core.
//!
//! # Contract
//!
//! [`Server`] owns no sockets and reads no clock. Its shell feeds it:
//!
//! * [`Server::handle_client`] with every datagram or stream frame from a client (STUN or
//!   ChannelData). A returned [`ToPeer`] is relayed at once (the fast path); everything else is
//!   queued.
//! * [`Server::handle_peer`] with every datagram a relay socket receives, placed at least
//!   [`PEER_HEADROOM`] bytes into the buffer so the ChannelData header or Data indication can be
//!   written in front without copying. A returned [`ToClient`] is sent at once.
//! * [`Server::relay_bound`], [`Server::peer_connected`], [`Server::client_closed`] with the
//!   results of what it asked for, and [`Server::handle_timeout`] when [`Server::poll_timeout`]
//!   is reached.
//!
//! After every input the shell drains [`Server::poll_output`] until it returns `None`.
//!
//! The server lives in `src/server/`, one file per piece of state it owns; `server/mod.rs`
//! has the map. The per-packet path is `server/relay.rs`.
//!
//! The TURN client is `kyuu_client::turn` (a dev-dependency here: the server core does not link it).
//!
//! [RFC 8489]: https://www.rfc-editor.org/rfc/rfc8489
//! [RFC 5780]: https://www.rfc-editor.org/rfc/rfc5780
//! [RFC 8656]: https://www.rfc-editor.org/rfc/rfc8656
//! [RFC 6062]: https://www.rfc-editor.org/rfc/rfc6062

mod auth;
pub mod config;
pub mod fxhash;
pub mod policy;
mod ratelimit;
mod server;
mod types;

pub use auth::{rest_credentials, rest_password};
pub use config::{ConfigError, FastPathMode, PortRange, TurnConfig, UserConfig, XdpMode};
/// The CIDR type of `allow_peers`/`deny_peers`.
pub use ipnet;
pub use server::admin::{check_credentials, AllocationInfo, CredentialCheck, NotApplied};
pub use server::{
    PeerIcmp, Rfc5780, Server, ServerError, ServerOptions, SessionLimits, Shared,
    ICMP_INDICATION_MAX,
};
pub use types::*;

/// First and last STUN method handed to the extension (RAWR control messages, `docs/rawr.md`).
pub const EXTENSION_METHODS: std::ops::RangeInclusive<u16> = 0xC01..=0xC0F;
