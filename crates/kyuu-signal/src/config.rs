//! `[signal]` configuration section.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Configuration of the signaling service; embedded by `kyuu serve` as the `[signal]` TOML
/// section. Every field has a default, so an empty section is valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SignalConfig {
    /// Largest text message (bytes) that is relayed. A larger one up to twice this size is
    /// answered with a `too-large` error (opt-in clients) or dropped (legacy clients); a frame
    /// above twice this size closes the connection with status 1009.
    pub max_message_size: usize,
    /// Sustained messages per second a connection may send (token bucket refill rate).
    pub rate_limit_per_sec: u32,
    /// Token bucket size: how many messages may arrive in a burst.
    pub rate_limit_burst: u32,
    /// Maximum number of simultaneous WebSocket connections (HTTP 503 beyond).
    pub max_connections: usize,
    /// Maximum simultaneous connections from one IP address (HTTP 429 beyond).
    pub max_connections_per_ip: usize,
    /// Allowed `Origin` header values (e.g. `https://app.example.org`). Empty: any origin.
    /// Requests without an `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Outgoing messages queued per connection. A client that falls this far behind is cut off
    /// (close 1008) so it cannot hold memory or slow anyone else down.
    pub send_queue: usize,
    /// Initial WebSocket read buffer per connection, bytes. Small keeps idle connections cheap;
    /// it grows for larger messages.
    pub read_buffer_size: usize,
    /// A single WebSocket write that takes longer than this closes the connection, milliseconds.
    pub write_timeout_ms: u64,
    /// Interval of server WebSocket pings, seconds (0 disables).
    pub ping_interval_secs: u64,
    /// A connection from which nothing (not even a pong) arrived for this long is closed,
    /// seconds (0 disables).
    pub idle_timeout_secs: u64,
    /// Without `auth_secret`: TURN credentials (`GET /v1/ice-servers`, the signaling welcome)
    /// one source (IPv4 address or IPv6 /64) may mint per minute; past it `/v1/ice-servers`
    /// answers 429 and the welcome carries STUN servers only. 0: unlimited.
    pub mint_rate_per_min: u32,
    /// Credentials a source may mint in a burst before `mint_rate_per_min` applies.
    pub mint_burst: u32,
    /// Sources the mint limiter tracks (bounded memory; when all are limited, new sources wait).
    pub mint_table_size: usize,
    /// Secret for HMAC-SHA256 access tokens. When set, every WebSocket connection and
    /// `GET /v1/ice-servers` needs a valid token (`?token=` or `Authorization: Bearer`).
    pub auth_secret: Option<String>,
    /// After an opt-in client disconnects, its id stays reserved for this long, seconds:
    /// only a reconnect presenting its resume token may take it.
    pub resume_grace_secs: u64,
    /// How long messages for a peer that is (re)connecting are held, milliseconds (0: never).
    pub pending_ttl_ms: u64,
    /// Messages held per waiting peer.
    pub pending_max_per_peer: usize,
    /// Messages held in total, all waiting peers together.
    pub pending_max_total: usize,
    /// Also hold messages for ids the server has never seen (otherwise `unknown-peer` at once).
    pub buffer_unknown: bool,
    /// A legacy connection (no resume token) may replace a connection of the same id that was
    /// not claimed with a resume token, like libdatachannel's example servers do.
    pub legacy_takeover: bool,
    /// Length of server-assigned ids (hex characters).
    pub assigned_id_len: usize,
    /// Longest accepted client id, bytes.
    pub max_id_len: usize,
    /// Longest room, name or topic, bytes.
    pub max_name_len: usize,
    /// Rooms, publications and watches one client may hold (each).
    pub max_subscriptions: usize,
    /// Members per room.
    pub max_room_members: usize,
}

impl Default for SignalConfig {
    fn default() -> Self {
        Self {
            max_message_size: 64 * 1024,
            rate_limit_per_sec: 50,
            rate_limit_burst: 200,
            max_connections: 100_000,
            max_connections_per_ip: 1_000,
            allowed_origins: Vec::new(),
            send_queue: 256,
            read_buffer_size: 1024,
            write_timeout_ms: 10_000,
            ping_interval_secs: 30,
            idle_timeout_secs: 75,
            mint_rate_per_min: 10,
            mint_burst: 20,
            mint_table_size: 65_536,
            auth_secret: None,
            resume_grace_secs: 30,
            pending_ttl_ms: 5_000,
            pending_max_per_peer: 32,
            pending_max_total: 10_000,
            buffer_unknown: false,
            legacy_takeover: true,
            assigned_id_len: 8,
            max_id_len: 64,
            max_name_len: 128,
            max_subscriptions: 32,
            max_room_members: 1_000,
        }
    }
}

impl SignalConfig {
    pub(crate) fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms.max(1))
    }
    pub(crate) fn resume_grace(&self) -> Duration {
        Duration::from_secs(self.resume_grace_secs)
    }
    pub(crate) fn pending_ttl(&self) -> Duration {
        Duration::from_millis(self.pending_ttl_ms)
    }
    /// Frames above this close the connection (WebSocket layer limit).
    pub(crate) fn hard_frame_limit(&self) -> usize {
        self.max_message_size.saturating_mul(2).max(1024)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_section_is_default() {
        let c: SignalConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, SignalConfig::default());
        let c: SignalConfig =
            serde_json::from_str(r#"{"max_message_size": 10, "allowed_origins": ["https://a"]}"#)
                .unwrap();
        assert_eq!(c.max_message_size, 10);
        assert!(serde_json::from_str::<SignalConfig>(r#"{"nope": 1}"#).is_err());
    }
}
