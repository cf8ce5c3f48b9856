//! Operator views and commands on a [`Server`]: list allocations, end one, apply a new
//! configuration, drain, and check credentials. The shell calls these between inputs, like any
//! other input; nothing here runs on the relay path.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use serde::Serialize;

use super::metrics::flush_stats;
use super::Server;
use crate::auth::Credentials;
use crate::config::TurnConfig;
use crate::policy::PeerPolicy;
use crate::ratelimit::RateLimiter;
use crate::types::{AllocId, Family, Output, Transport};

/// A snapshot of one allocation, for the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AllocationInfo {
    /// The allocation's slot and generation in its shard.
    #[serde(skip)]
    pub id: AllocId,
    pub username: String,
    /// The client's transport address as the server sees it.
    pub client: SocketAddr,
    /// The server address the client reached.
    pub server: SocketAddr,
    /// `udp`, `tcp` or `tls`: how the client reached the server.
    pub transport: &'static str,
    /// `udp` or `tcp` (RFC 6062): what the relay carries.
    pub relay_transport: &'static str,
    /// Relayed transport addresses (one per address family).
    pub relayed: Vec<SocketAddr>,
    /// Peer IP addresses with a live permission.
    pub permissions: Vec<IpAddr>,
    /// Peers bound to a channel, with the channel number.
    pub channels: Vec<(u16, SocketAddr)>,
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    pub age_secs: u64,
    pub expires_in_secs: u64,
}

/// What [`Server::reconfigure`] could not apply without a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NotApplied(pub Vec<&'static str>);

/// The result of checking a username and password against the configured credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CredentialCheck {
    pub valid: bool,
    /// `static_user`, `rest` (a TURN REST credential) or empty when invalid.
    pub kind: &'static str,
    /// Why it is invalid: `unknown_user`, `expired_credential`, `wrong_password`.
    pub reason: Option<&'static str>,
    /// Unix time a REST credential expires.
    pub expires_at: Option<u64>,
}

/// Checks `username`/`password` as a TURN client would present them, at `unix_now`.
pub fn check_credentials(
    cfg: &TurnConfig,
    username: &str,
    password: &str,
    unix_now: u64,
) -> CredentialCheck {
    let invalid = |reason| CredentialCheck {
        valid: false,
        kind: "",
        reason: Some(reason),
        expires_at: None,
    };
    let creds = Credentials::new(cfg);
    // As for a new allocation: an expired REST credential is refused.
    let keys = match creds.keys(username, unix_now, false) {
        Ok(k) => k,
        Err(f) => return invalid(f.label()),
    };
    let Ok(want) = kyuu_stun::integrity::Key::long_term_md5(username, &cfg.realm, password) else {
        return invalid("wrong_password");
    };
    if !keys.iter().any(|k| k.md5.as_ref() == Some(&want)) {
        return invalid("wrong_password");
    }
    let is_static = cfg.users.iter().any(|u| u.name == username);
    CredentialCheck {
        valid: true,
        kind: if is_static { "static_user" } else { "rest" },
        reason: None,
        expires_at: (!is_static)
            .then(|| username.split(':').next()?.parse().ok())
            .flatten(),
    }
}

impl Server {
    /// Every allocation of this shard (pending ones included, with no relayed address yet).
    pub fn allocations(&self, now: Instant) -> Vec<AllocationInfo> {
        self.allocs
            .iter()
            .map(|a| {
                let s = a.stats;
                AllocationInfo {
                    id: a.id,
                    username: a.username.clone(),
                    client: a.client.remote,
                    server: a.client.local,
                    transport: a.client.transport.label(),
                    relay_transport: match a.proto {
                        crate::types::RelayProto::Udp => "udp",
                        crate::types::RelayProto::Tcp => "tcp",
                    },
                    relayed: [Family::V4, Family::V6]
                        .into_iter()
                        .filter_map(|f| a.relayed(f))
                        .collect(),
                    permissions: a
                        .perms
                        .iter()
                        .filter(|(_, exp)| *exp > now)
                        .map(|(ip, _)| *ip)
                        .collect(),
                    channels: a
                        .channels
                        .iter()
                        .filter(|c| c.expires > now)
                        .map(|c| (c.number.get(), c.peer))
                        .collect(),
                    to_peer_packets: s.to_peer_pkts,
                    to_peer_bytes: s.to_peer_bytes,
                    to_client_packets: s.to_client_pkts,
                    to_client_bytes: s.to_client_bytes,
                    age_secs: now.saturating_duration_since(a.created).as_secs(),
                    expires_in_secs: a.expires.saturating_duration_since(now).as_secs(),
                }
            })
            .collect()
    }

    /// Ends an allocation now, as if it had expired, and closes a stream client's connection.
    /// False when `id` is not (or no longer) an allocation of this shard.
    pub fn kill_allocation(&mut self, now: Instant, id: AllocId) -> bool {
        let Some(client) = self.allocs.get(id).map(|a| a.client) else {
            return false;
        };
        if let Some(a) = self.allocs.get_mut(id) {
            flush_stats(a);
        }
        self.delete_allocation(now, id, "killed by admin");
        if client.transport != Transport::Udp {
            self.out.push_back(Output::CloseClient { client });
        }
        true
    }

    /// Applies a new `[turn]` section to what is checked per request: credentials (REST secrets,
    /// static users, realm), the peer policy, quotas, lifetimes, bandwidth, rate limits and the
    /// alternate server. Live allocations keep running. `relay_ports` (split between shards at
    /// start), `enabled` and the kernel programs (`fast_path`, `fast_path_interface`,
    /// `fast_path_binding`, `fast_path_xdp`, `relay_steering`) need a restart; they are kept and named in the
    /// result. Nothing changes when `cfg` is invalid.
    pub fn reconfigure(&mut self, mut cfg: TurnConfig) -> Result<NotApplied, String> {
        cfg.validate().map_err(|e| e.to_string())?;
        let mut kept = Vec::new();
        // Read at start only: the old value stays and the setting is named for a restart.
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if cfg.$field != self.cfg.$field {
                    kept.push(concat!("turn.", stringify!($field)));
                    cfg.$field = self.cfg.$field.clone();
                }
            )*};
        }
        // The relay ports are split between shards and the kernel programs attached at start.
        keep!(
            relay_ports,
            enabled,
            fast_path,
            fast_path_interface,
            fast_path_binding,
            fast_path_xdp,
            relay_steering
        );
        // Unset relay addresses were filled in at start from the listeners.
        cfg.relay_ipv4 = cfg.relay_ipv4.or(self.cfg.relay_ipv4);
        cfg.relay_ipv6 = cfg.relay_ipv6.or(self.cfg.relay_ipv6);
        if self.draining && cfg.alternate_server.is_none() {
            cfg.alternate_server = self.cfg.alternate_server;
        }
        self.creds = Credentials::new(&cfg);
        self.policy = PeerPolicy::new(&cfg.allow_peers, &cfg.deny_peers);
        if (cfg.unauth_rate, cfg.unauth_burst, cfg.rate_table_size)
            != (
                self.cfg.unauth_rate,
                self.cfg.unauth_burst,
                self.cfg.rate_table_size,
            )
        {
            self.limiter = RateLimiter::new(cfg.unauth_rate, cfg.unauth_burst, cfg.rate_table_size);
        }
        if cfg.nonce_lifetime != self.cfg.nonce_lifetime {
            self.nonces =
                crate::auth::Nonces::new(self.opts.shared.nonce_key, u64::from(cfg.nonce_lifetime));
        }
        self.cfg = cfg;
        Ok(NotApplied(kept))
    }

    /// Stops taking new allocations: Allocate is answered 300 Try Alternate with `alternate`
    /// (or `turn.alternate_server`) when there is one, else 486 Allocation Quota Reached.
    /// Existing allocations keep running until they end.
    pub fn drain(&mut self, alternate: Option<SocketAddr>) {
        self.draining = true;
        if alternate.is_some() {
            self.cfg.alternate_server = alternate;
        }
    }

    /// [`Server::drain`] for a fleet node: Allocate is answered 300 Try Alternate naming the
    /// address of `alternates` of the client's family (other nodes the shell chose), unless
    /// `turn.alternate_server` is set; a client of a family without one gets 486. May be
    /// called again as the fleet changes (an alternate that died, one that appeared).
    pub fn drain_to(&mut self, alternates: &[SocketAddr]) {
        self.draining = true;
        self.drain_alternates = [
            alternates.iter().copied().find(SocketAddr::is_ipv4),
            alternates.iter().copied().find(SocketAddr::is_ipv6),
        ];
    }

    /// Whether [`Server::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::rest_credentials;

    #[test]
    fn credential_check_rest_and_static() {
        let cfg = TurnConfig {
            static_auth_secrets: vec!["s3cret".into()],
            users: vec![crate::UserConfig {
                name: "alice".into(),
                password: Some("pw".into()),
                key: None,
                key_sha256: None,
            }],
            ..TurnConfig::default()
        };
        let (u, p) = rest_credentials("s3cret", "bob", 1000, 60);
        let ok = check_credentials(&cfg, &u, &p, 1000);
        assert!(ok.valid);
        assert_eq!((ok.kind, ok.expires_at), ("rest", Some(1060)));
        let late = check_credentials(&cfg, &u, &p, 2000);
        assert_eq!(late.reason, Some("expired_credential"));
        assert_eq!(
            check_credentials(&cfg, &u, "nope", 1000).reason,
            Some("wrong_password")
        );
        assert_eq!(
            check_credentials(&cfg, "alice", "pw", 0).kind,
            "static_user"
        );
        assert!(!check_credentials(&cfg, "alice", "px", 0).valid);
        assert_eq!(
            check_credentials(&cfg, "carol", "pw", 0).reason,
            Some("unknown_user")
        );
    }
}
