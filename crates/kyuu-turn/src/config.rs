//! `[turn]` configuration: credentials, relay ports, lifetimes, quotas and the peer address policy.
//!
//! Every field has a default, unknown keys are rejected, and [`TurnConfig::validate`] names the
//! offending key (`turn.relay_ports: min 60000 > max 50000`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::types::Family;

/// Default `user_quota` and `client_quota`: allocations per username and per client IP.
pub const DEFAULT_QUOTA: u32 = 10;
/// Default `total_quota`.
pub const DEFAULT_TOTAL_QUOTA: u32 = 10_000;
/// Default `max_bps`: 5 Mbit/s per allocation and direction, in bytes per second.
pub const DEFAULT_MAX_BPS: u64 = 5_000_000 / 8;

/// The `[turn]` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TurnConfig {
    /// Serve TURN (Allocate and friends). When false only STUN Binding is answered and TURN
    /// requests get 400.
    pub enabled: bool,
    /// ChannelBind accepts only RFC 8656 §12 channel numbers (0x4000..=0x4FFF; others get 400,
    /// as RFC 8656 §12.2 requires). On by default. `false` is RFC 5766 compatibility: numbers up
    /// to 0x7FFF are accepted too, which coturn 4.6.1's `turnutils_uclient` needs (it binds
    /// numbers above 0x4FFF, and its channel binds fail with 400 when this is on).
    pub strict_channel_numbers: bool,
    /// The long-term credential realm (RFC 8489 §9.2).
    pub realm: String,
    /// SOFTWARE attribute value; empty to send none.
    pub software: String,
    /// Static users.
    pub users: Vec<UserConfig>,
    /// TURN REST API shared secrets (coturn `static-auth-secret`): username `"<unix-expiry>:<user>"`,
    /// password `base64(HMAC-SHA1(secret, username))`. Several may be listed for rotation.
    pub static_auth_secrets: Vec<String>,
    /// IPv4 address relay sockets bind to; relayed IPv4 allocations are refused (440) without it.
    pub relay_ipv4: Option<Ipv4Addr>,
    /// IPv6 address relay sockets bind to; relayed IPv6 allocations are refused (440) without it.
    pub relay_ipv6: Option<Ipv6Addr>,
    /// Advertised IPv4 relayed address when the server sits behind a 1:1 NAT.
    pub external_ipv4: Option<Ipv4Addr>,
    /// Advertised IPv6 relayed address.
    pub external_ipv6: Option<Ipv6Addr>,
    /// UDP/TCP ports relay sockets use.
    pub relay_ports: PortRange,
    /// Allocation lifetime when the client asks for less (seconds, RFC 8656 default 600).
    pub default_lifetime: u32,
    /// Longest allocation lifetime granted (seconds).
    pub max_lifetime: u32,
    /// How long a nonce stays valid before 438 Stale Nonce (seconds).
    pub nonce_lifetime: u32,
    /// Allocations per username (0: unlimited). On by default (10, [`DEFAULT_QUOTA`]): a
    /// browser makes one to three per call, so a real call never meets it, while one minted
    /// credential cannot hold the whole relay.
    pub user_quota: u32,
    /// Allocations per client IP address (0: unlimited). Default 10 ([`DEFAULT_QUOTA`]); raise
    /// it for clients behind a shared NAT or for load generators.
    pub client_quota: u32,
    /// Allocations in total (0: unlimited). Default 10,000 ([`DEFAULT_TOTAL_QUOTA`]).
    pub total_quota: u32,
    /// Relayed bytes per second per allocation, each direction (0: unlimited). Default
    /// 625,000 B/s = 5 Mbit/s ([`DEFAULT_MAX_BPS`]): above a 1080p video call, far below what an
    /// abuser wants from an open relay.
    pub max_bps: u64,
    /// Most permissions one allocation may hold.
    pub max_permissions: u32,
    /// Peer networks allowed even though the built-in safe defaults deny them (CIDR).
    pub allow_peers: Vec<IpNet>,
    /// Extra peer networks to refuse with 403 (CIDR).
    pub deny_peers: Vec<IpNet>,
    /// Answer Allocate with 300 Try Alternate pointing here.
    pub alternate_server: Option<SocketAddr>,
    /// Unauthenticated requests (Binding, 401 challenges) allowed per source IP per second;
    /// 0 disables the limit.
    pub unauth_rate: u32,
    /// Burst size of the per-source token bucket.
    pub unauth_burst: u32,
    /// Number of source IPs the rate limiter tracks (bounded memory).
    pub rate_table_size: u32,
    /// Kernel fast path (XDP) for channels of UDP clients: `"off"` (default), `"auto"` (attach
    /// where the kernel and interface allow, else log why and relay in userspace) or
    /// `"required"` (refuse to start without it). Read at start only.
    pub fast_path: FastPathMode,
    /// Interface to attach the fast path to (default: the one holding the first UDP listener's
    /// address).
    pub fast_path_interface: Option<String>,
    /// With the fast path attached, also answer plain STUN Binding requests (no attributes, or
    /// only FINGERPRINT) to the UDP listeners in the kernel, under the same per-source limit
    /// (`unauth_rate`/`unauth_burst`). Off: the kernel relays channels only. Read at start only.
    pub fast_path_binding: bool,
    /// How the fast path attaches: `"generic"` (default: SKB mode, which every driver has) or
    /// `"native"` (the driver's own XDP hook, before an skb exists: for NICs with driver XDP
    /// support; refused at start where the driver has none). On a veth, what native XDP sends
    /// leaves promptly only when the other end has an XDP program of its own (the kernel
    /// flushes the other end's queue only then). Read at start only.
    pub fast_path_xdp: XdpMode,
    /// Relay steering (`BPF_PROG_TYPE_SK_LOOKUP`): each relay thread reads the peer datagrams of
    /// all its UDP allocations from one socket in batches instead of waking once per relay
    /// socket. `"off"` (default), `"auto"` (use it where the kernel allows, which needs
    /// CAP_BPF and CAP_NET_ADMIN; else log why and read relay sockets one by one) or
    /// `"required"` (refuse to start without it). Peers' ICMP errors are not relayed to clients
    /// for steered ports (RFC 8656 §11.5). Read at start only.
    pub relay_steering: FastPathMode,
}

/// `turn.fast_path_xdp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    #[default]
    Generic,
    Native,
}

/// `turn.fast_path` and `turn.relay_steering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FastPathMode {
    #[default]
    Off,
    Auto,
    Required,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            enabled: true,
            strict_channel_numbers: true,
            realm: "kyuu".into(),
            software: concat!("kyuu ", env!("CARGO_PKG_VERSION")).into(),
            users: Vec::new(),
            static_auth_secrets: Vec::new(),
            relay_ipv4: None,
            relay_ipv6: None,
            external_ipv4: None,
            external_ipv6: None,
            relay_ports: PortRange::default(),
            default_lifetime: 600,
            max_lifetime: 3600,
            nonce_lifetime: 600,
            user_quota: DEFAULT_QUOTA,
            client_quota: DEFAULT_QUOTA,
            total_quota: DEFAULT_TOTAL_QUOTA,
            max_bps: DEFAULT_MAX_BPS,
            max_permissions: 256,
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            alternate_server: None,
            unauth_rate: 200,
            unauth_burst: 400,
            rate_table_size: 8192,
            fast_path: FastPathMode::Off,
            fast_path_interface: None,
            fast_path_binding: true,
            fast_path_xdp: XdpMode::Generic,
            relay_steering: FastPathMode::Off,
        }
    }
}

/// One static user. Exactly one of `password`, `key` is required; `key` is the hex MD5 long-term
/// key `MD5(user:realm:password)` (coturn's `0x...` form is accepted), and `key_sha256` the hex
/// SHA-256 key for clients that choose PASSWORD-ALGORITHM SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_sha256: Option<String>,
}

/// An inclusive port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl Default for PortRange {
    fn default() -> Self {
        PortRange {
            min: 49152,
            max: 65535,
        }
    }
}

pub(crate) fn parse_hex_key(s: &str) -> Option<Vec<u8>> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    hex::decode(s).ok()
}

/// An invalid `[turn]` value; the message starts with the key, e.g.
/// `turn.relay_ports: min 60000 > max 50000`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl ConfigError {
    /// The config key the error is about (`turn.relay_ports`).
    pub fn key(&self) -> &str {
        self.0.split(':').next().unwrap_or_default()
    }
}

impl TurnConfig {
    /// Checks the values; the error names the key, e.g. `turn.relay_ports: min 60000 > max 50000`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.relay_ports.min > self.relay_ports.max {
            return Err(ConfigError(format!(
                "turn.relay_ports: min {} > max {}",
                self.relay_ports.min, self.relay_ports.max
            )));
        }
        if self.relay_ports.min == 0 {
            return Err(ConfigError(
                "turn.relay_ports: min must be at least 1".into(),
            ));
        }
        if self.realm.is_empty() || self.realm.len() > 763 {
            return Err(ConfigError("turn.realm: must be 1 to 763 bytes".into()));
        }
        if self.software.len() > 763 {
            return Err(ConfigError("turn.software: longer than 763 bytes".into()));
        }
        if self.default_lifetime == 0 {
            return Err(ConfigError(
                "turn.default_lifetime: must be positive".into(),
            ));
        }
        if self.max_lifetime < self.default_lifetime {
            return Err(ConfigError(format!(
                "turn.max_lifetime: {} < turn.default_lifetime {}",
                self.max_lifetime, self.default_lifetime
            )));
        }
        if self.nonce_lifetime == 0 {
            return Err(ConfigError("turn.nonce_lifetime: must be positive".into()));
        }
        if self.unauth_rate > 0 && self.unauth_burst == 0 {
            return Err(ConfigError(
                "turn.unauth_burst: must be positive when turn.unauth_rate is set".into(),
            ));
        }
        if self.rate_table_size == 0 {
            return Err(ConfigError("turn.rate_table_size: must be positive".into()));
        }
        for (i, u) in self.users.iter().enumerate() {
            if u.name.is_empty() || u.name.len() > 513 {
                return Err(ConfigError(format!(
                    "turn.users[{i}].name: must be 1 to 513 bytes"
                )));
            }
            // RFC 8489 §9.2.2 / §14.3: names and passwords go through OpaqueString (RFC 8265).
            if let Err(e) = kyuu_stun::opaque_string(&u.name) {
                return Err(ConfigError(format!("turn.users[{i}].name: {e}")));
            }
            if let Some(Err(e)) = u.password.as_deref().map(kyuu_stun::opaque_string) {
                return Err(ConfigError(format!("turn.users[{i}].password: {e}")));
            }
            match (&u.password, &u.key) {
                (Some(_), Some(_)) => {
                    return Err(ConfigError(format!(
                        "turn.users[{i}]: give either password or key, not both"
                    )))
                }
                (None, None) => {
                    return Err(ConfigError(format!(
                        "turn.users[{i}]: password or key required"
                    )))
                }
                (None, Some(k)) => {
                    if parse_hex_key(k).map(|k| k.len()) != Some(16) {
                        return Err(ConfigError(format!(
                            "turn.users[{i}].key: expected 32 hex digits (MD5 of user:realm:password)"
                        )));
                    }
                }
                (Some(_), None) => {}
            }
            if let Some(k) = &u.key_sha256 {
                if parse_hex_key(k).map(|k| k.len()) != Some(32) {
                    return Err(ConfigError(format!(
                        "turn.users[{i}].key_sha256: expected 64 hex digits"
                    )));
                }
            }
        }
        for (i, s) in self.static_auth_secrets.iter().enumerate() {
            if s.is_empty() {
                return Err(ConfigError(format!(
                    "turn.static_auth_secrets[{i}]: empty secret"
                )));
            }
        }
        if let Some(ip) = self.relay_ipv4 {
            if ip.is_multicast() || ip.is_broadcast() {
                return Err(ConfigError(format!(
                    "turn.relay_ipv4: {ip} is not a unicast address"
                )));
            }
        }
        if let Some(ip) = self.relay_ipv6 {
            if ip.is_multicast() {
                return Err(ConfigError(format!(
                    "turn.relay_ipv6: {ip} is not a unicast address"
                )));
            }
        }
        Ok(())
    }

    /// The address relay sockets of `family` bind to, if that family is configured.
    pub fn relay_ip(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.relay_ipv4.map(IpAddr::V4),
            Family::V6 => self.relay_ipv6.map(IpAddr::V6),
        }
    }

    /// The address advertised in XOR-RELAYED-ADDRESS for a socket bound to `bound`.
    pub fn advertised(&self, bound: SocketAddr) -> SocketAddr {
        match bound.ip() {
            IpAddr::V4(_) => match self.external_ipv4 {
                Some(ip) => SocketAddr::new(IpAddr::V4(ip), bound.port()),
                None => bound,
            },
            IpAddr::V6(_) => match self.external_ipv6 {
                Some(ip) => SocketAddr::new(IpAddr::V6(ip), bound.port()),
                None => bound,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn defaults_validate_and_errors_name_keys() {
        TurnConfig::default().validate().unwrap();
        let c = TurnConfig {
            relay_ports: PortRange {
                min: 60000,
                max: 50000,
            },
            ..Default::default()
        };
        let e = c.validate().unwrap_err();
        assert_eq!(e.to_string(), "turn.relay_ports: min 60000 > max 50000");
        assert_eq!(e.key(), "turn.relay_ports");
        let c: Result<TurnConfig, _> = toml::from_str("realmm = \"x\"");
        assert!(c.unwrap_err().to_string().contains("realmm"));
        let c: TurnConfig = toml::from_str(
            r#"
            realm = "example.org"
            static_auth_secrets = ["a", "b"]
            allow_peers = ["127.0.0.0/8", "::1/128"]
            relay_ports = { min = 50000, max = 50100 }
            [[users]]
            name = "u"
            password = "p"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.allow_peers.len(), 2);
    }
}
