//! `[rawr]` configuration (`docs/rawr.md` §10).

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `[rawr]` section of kyuu's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawrConfig {
    /// Run a RAWR node beside the STUN/TURN server.
    pub enabled: bool,
    /// This node's name: 1..=63 bytes of `[a-z0-9.-]`.
    pub name: String,
    /// Transport addresses that mean "this node" when a peer names it as ROOT.
    #[serde(rename = "self")]
    pub self_addrs: Vec<SocketAddr>,
    /// TURN URIs handed to peers that meet here.
    pub relay: Vec<String>,
    /// TURN REST secret shared with this node's TURN server.
    pub secret: String,
    /// Networks this node serves (CIDR); neighbour entries outside them are ignored. Empty: all.
    pub networks: Vec<String>,
    /// The upstream node.
    pub gateway: Option<GatewayConfig>,
    /// Linked children.
    pub children: Vec<ChildConfig>,
    /// Refuse PATH-bearing Connects and Cancels from nodes that are not linked children.
    pub require_links: bool,
    /// Under `kyuu serve`: link the two allocations of a session that pairs here inside the TURN
    /// server (no CreatePermission needed, packets between them never leave the process;
    /// `docs/rawr.md` §6.1). Default true.
    pub pair_in_process: bool,
    /// A separate UDP control listener, for running beside a TURN server that does not hand RAWR
    /// methods over (for example coturn). Unset: RAWR arrives through the STUN port.
    pub listen: Option<SocketAddr>,
    /// Network namespace to read the neighbour table from (lab use); unset: this process's.
    pub netns: Option<String>,
    pub limits: Limits,
}

impl Default for RawrConfig {
    fn default() -> Self {
        RawrConfig {
            enabled: false,
            name: "kyuu".into(),
            self_addrs: Vec::new(),
            relay: Vec::new(),
            secret: String::new(),
            networks: Vec::new(),
            gateway: None,
            children: Vec::new(),
            require_links: false,
            pair_in_process: true,
            listen: None,
            netns: None,
            limits: Limits::default(),
        }
    }
}

/// The upstream link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    pub addr: SocketAddr,
    /// Link key; absent when the gateway is not linked (then messages go unauthenticated).
    #[serde(default)]
    pub key: Option<String>,
}

/// A linked child.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildConfig {
    pub name: String,
    pub key: String,
}

/// Timeouts (milliseconds) and caps, `docs/rawr.md` §4.5.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub local_wait_ms: u64,
    pub pending_timeout_ms: u64,
    pub exchange_hold_ms: u64,
    pub exchange_linger_ms: u64,
    pub credential_lifetime_s: u32,
    pub max_pending_per_source: usize,
    pub max_pending: usize,
    pub max_exchange_per_source: usize,
    pub max_exchange: usize,
    pub max_register_per_source: usize,
    pub max_register: usize,
    pub register_lifetime_s: u32,
    pub register_max_lifetime_s: u32,
    /// Reservations (§4.6): bytes one side of a session may relay here (0: unlimited).
    pub session_max_bytes: u64,
    /// Seconds a session may relay here after pairing (0: unlimited).
    pub session_max_secs: u64,
    /// Sessions relayed here at once per direct peer (source IP) (0: unlimited).
    pub sessions_per_peer: usize,
    /// Sessions relayed here at once per linked child (0: unlimited).
    pub sessions_per_link: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            local_wait_ms: 1000,
            pending_timeout_ms: 20_000,
            exchange_hold_ms: 10_000,
            exchange_linger_ms: 30_000,
            credential_lifetime_s: 3600,
            max_pending_per_source: 64,
            max_pending: 4096,
            max_exchange_per_source: 64,
            max_exchange: 4096,
            max_register_per_source: 16,
            max_register: 4096,
            register_lifetime_s: 600,
            register_max_lifetime_s: 3600,
            session_max_bytes: 0,
            session_max_secs: 0,
            sessions_per_peer: 0,
            sessions_per_link: 0,
        }
    }
}

impl Limits {
    pub fn local_wait(&self) -> Duration {
        Duration::from_millis(self.local_wait_ms)
    }
    pub fn pending_timeout(&self) -> Duration {
        Duration::from_millis(self.pending_timeout_ms)
    }
    pub fn exchange_hold(&self) -> Duration {
        Duration::from_millis(self.exchange_hold_ms)
    }
    pub fn exchange_linger(&self) -> Duration {
        Duration::from_millis(self.exchange_linger_ms)
    }
    /// How long a reservation counts against the per-peer and per-link caps.
    pub fn reservation(&self) -> Duration {
        if self.session_max_secs > 0 {
            Duration::from_secs(self.session_max_secs)
        } else {
            Duration::from_secs(u64::from(self.credential_lifetime_s))
        }
    }
}

/// Why a configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("rawr.name {0:?} is not 1..=63 bytes of [a-z0-9.-]")]
    Name(String),
    #[error("rawr.children: name {0:?} is invalid or duplicated")]
    Child(String),
    #[error("rawr.networks: {0:?} is not a CIDR prefix")]
    Network(String),
    #[error("rawr.secret is empty: the node could not mint TURN credentials")]
    NoSecret,
    #[error("rawr.relay is empty: the node has no TURN URI to hand out")]
    NoRelay,
}

impl RawrConfig {
    /// Checks names, networks and that the node can mint credentials.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !crate::wire::valid_name(&self.name) {
            return Err(ConfigError::Name(self.name.clone()));
        }
        let mut seen = std::collections::HashSet::new();
        for c in &self.children {
            if !crate::wire::valid_name(&c.name) || !seen.insert(c.name.as_str()) {
                return Err(ConfigError::Child(c.name.clone()));
            }
        }
        self.parsed_networks()?;
        if self.secret.is_empty() {
            return Err(ConfigError::NoSecret);
        }
        if self.relay.is_empty() {
            return Err(ConfigError::NoRelay);
        }
        Ok(())
    }

    /// The addresses that mean "this node": `self` plus the addresses of its own `relay` URIs
    /// (under `kyuu serve` RAWR arrives on the TURN port, so a peer naming this node as its root
    /// uses one of them).
    pub fn self_addresses(&self) -> Vec<SocketAddr> {
        let mut v = self.self_addrs.clone();
        for u in &self.relay {
            if let Ok(a) = parse_turn_uri(u) {
                if !v.contains(&a) {
                    v.push(a);
                }
            }
        }
        v
    }

    pub fn parsed_networks(&self) -> Result<Vec<ipnet::IpNet>, ConfigError> {
        self.networks
            .iter()
            .map(|n| n.parse().map_err(|_| ConfigError::Network(n.clone())))
            .collect()
    }
}

/// A `turn:` URI that is not `turn:<ip>[:port][?…]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad TURN URI {0:?} (expected turn:<ip>[:port][?transport=udp])")]
pub struct BadTurnUri(pub String);

/// `turn:host:port?transport=udp` → address (IP literals only; the lab and RAWR nodes use them).
pub fn parse_turn_uri(uri: &str) -> Result<SocketAddr, BadTurnUri> {
    let rest = uri
        .strip_prefix("turn:")
        .ok_or_else(|| BadTurnUri(uri.into()))?;
    let hostport = rest.split('?').next().unwrap_or(rest);
    hostport
        .parse()
        .or_else(|_| format!("{hostport}:3478").parse())
        .map_err(|_| BadTurnUri(uri.into()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_documented_example() {
        let t = r#"
            enabled = true
            name = "isp1"
            self = ["198.18.0.1:3478"]
            relay = ["turn:198.18.0.1:3478?transport=udp"]
            secret = "s"
            networks = ["198.19.1.0/24"]
            [gateway]
            addr = "198.18.100.1:3478"
            key = "k"
            [[children]]
            name = "home1"
            key = "k1"
        "#;
        let c: RawrConfig = toml::from_str(t).unwrap();
        c.validate().unwrap();
        assert_eq!(c.children.len(), 1);
        assert!(toml::from_str::<RawrConfig>("nmae = \"x\"").is_err());
    }

    #[test]
    fn parses_turn_uris() {
        assert_eq!(
            parse_turn_uri("turn:198.18.0.1:3478?transport=udp").unwrap(),
            "198.18.0.1:3478".parse().unwrap()
        );
        assert_eq!(
            parse_turn_uri("turn:198.18.0.1").unwrap(),
            "198.18.0.1:3478".parse().unwrap()
        );
        assert!(parse_turn_uri("stun:x").is_err());
    }
}
