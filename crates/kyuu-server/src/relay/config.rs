//! `[listen]`: where STUN/TURN listens.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// STUN/TURN listeners. Port 0 picks a free port (tests); the UDP, TCP and TLS listeners of
/// one address family then share whatever the first one got where possible.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenConfig {
    /// UDP listen addresses (default `0.0.0.0:3478` and `[::]:3478`).
    pub udp: Vec<SocketAddr>,
    /// TCP listen addresses, RFC 8489 stream framing (default as UDP).
    pub tcp: Vec<SocketAddr>,
    /// TLS listen addresses (default `0.0.0.0:5349` and `[::]:5349`).
    pub tls: Vec<SocketAddr>,
    /// DTLS listen addresses: STUN/TURN over DTLS 1.2 on UDP (RFC 7350; its default port is
    /// 5349, e.g. `["0.0.0.0:5349"]`). Empty (the default): off. Uses the TLS certificate
    /// (`tls_cert`/`tls_key`, or a self-signed one) and `tls_handshake_timeout_secs`.
    pub dtls: Vec<SocketAddr>,
    /// DTLS associations held at once, handshaking or established; further ClientHellos are
    /// dropped.
    pub dtls_max_associations: usize,
    /// DTLS handshakes in progress at once (each past the cookie exchange).
    pub dtls_max_handshakes: usize,
    /// A DTLS association that has received nothing for this long and has no allocation is
    /// closed, seconds.
    pub dtls_idle_timeout_secs: u64,
    /// PEM certificate chain for TLS. Without `tls_cert`/`tls_key` a self-signed certificate is
    /// generated at start for `tls_names`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    pub tls_key: Option<PathBuf>,
    /// Names (and IPs) the generated self-signed certificate covers.
    pub tls_names: Vec<String>,
    /// RFC 5780 second IP address. With it, the first UDP address's IP is the primary IP, and
    /// UDP and TCP listen on primary/alternate IP x primary/alternate port.
    pub alt_ip: Option<IpAddr>,
    /// RFC 5780 second port (default: primary port + 1 when `alt_ip` is set).
    pub alt_port: Option<u16>,
    /// Worker threads, one socket each per address via SO_REUSEPORT (0: one per core).
    pub threads: usize,
    /// SO_RCVBUF/SO_SNDBUF for UDP sockets in bytes (0: the system default).
    pub socket_buffer: usize,
    /// Listeners behind a load balancer that sends PROXY protocol v2 headers
    /// (`[[listen.proxy_protocol]]`, see `crate::proxy`).
    pub proxy_protocol: Vec<crate::proxy::ProxyListener>,
    /// Open TCP and TLS connections one client IP address may hold on the STUN/TURN listeners;
    /// further ones are closed at once (0: unlimited).
    pub max_conns_per_ip: u32,
    /// A TCP or TLS connection that has not sent one complete STUN message (or ChannelData)
    /// this long after it was accepted is closed, seconds (0: no limit).
    pub first_message_timeout_secs: u64,
    /// A TLS handshake that takes longer is dropped, seconds (at least 1).
    pub tls_handshake_timeout_secs: u64,
}

impl Default for ListenConfig {
    fn default() -> Self {
        let v4 = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        let v6 = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        ListenConfig {
            udp: vec![SocketAddr::new(v4, 3478), SocketAddr::new(v6, 3478)],
            tcp: vec![SocketAddr::new(v4, 3478), SocketAddr::new(v6, 3478)],
            tls: vec![SocketAddr::new(v4, 5349), SocketAddr::new(v6, 5349)],
            dtls: Vec::new(),
            dtls_max_associations: 10_000,
            dtls_max_handshakes: 1_000,
            dtls_idle_timeout_secs: 120,
            tls_cert: None,
            tls_key: None,
            tls_names: vec!["localhost".into()],
            alt_ip: None,
            alt_port: None,
            threads: 0,
            socket_buffer: 4 << 20,
            proxy_protocol: Vec::new(),
            max_conns_per_ip: 64,
            first_message_timeout_secs: 10,
            tls_handshake_timeout_secs: 10,
        }
    }
}

impl ListenConfig {
    /// Checks the values; errors name the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.udp.is_empty() && self.tcp.is_empty() && self.tls.is_empty() && self.dtls.is_empty()
        {
            return Err("listen: no udp, tcp, tls or dtls address".into());
        }
        for d in &self.dtls {
            if let Some(u) = self.udp.iter().find(|u| same_port(**u, *d)) {
                return Err(format!(
                    "listen.dtls: {d} overlaps listen.udp {u}; DTLS needs its own UDP port (5349)"
                ));
            }
        }
        if !self.dtls.is_empty() {
            if self.dtls_max_associations == 0 {
                return Err("listen.dtls_max_associations: must be positive".into());
            }
            if self.dtls_max_handshakes == 0
                || self.dtls_max_handshakes > self.dtls_max_associations
            {
                return Err(
                    "listen.dtls_max_handshakes: must be positive and at most dtls_max_associations"
                        .into(),
                );
            }
            if self.dtls_idle_timeout_secs == 0 {
                return Err("listen.dtls_idle_timeout_secs: must be positive".into());
            }
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("listen.tls_cert: tls_cert and tls_key go together".into());
        }
        if let Some(alt) = self.alt_ip {
            let Some(primary) = self.udp.first() else {
                return Err("listen.alt_ip: needs a udp address (the primary)".into());
            };
            if primary.ip().is_unspecified() {
                return Err(format!(
                    "listen.alt_ip: the first listen.udp address must be a specific IP for RFC 5780, not {}",
                    primary.ip()
                ));
            }
            if alt == primary.ip() || alt.is_unspecified() || alt.is_ipv4() != primary.is_ipv4() {
                return Err(format!(
                    "listen.alt_ip: {alt} must differ from {} and be of the same family",
                    primary.ip()
                ));
            }
            if primary.port() == 0 {
                return Err("listen.udp: RFC 5780 needs a fixed port, not 0".into());
            }
            if self.alternate_port() == Some(primary.port()) {
                return Err("listen.alt_port: must differ from the primary port".into());
            }
        } else if self.alt_port.is_some() {
            return Err("listen.alt_port: needs listen.alt_ip".into());
        }
        crate::proxy::validate(&self.proxy_protocol, &self.udp, &self.tcp, &self.tls)?;
        if self.tls_handshake_timeout_secs == 0 {
            return Err("listen.tls_handshake_timeout_secs: must be positive".into());
        }
        if self.threads > 256 {
            return Err("listen.threads: at most 256".into());
        }
        Ok(())
    }

    /// The DTLS limits (`dtls_*`, `tls_handshake_timeout_secs`).
    pub(crate) fn dtls_limits(&self) -> super::dtls::DtlsLimits {
        super::dtls::DtlsLimits {
            max_associations: self.dtls_max_associations,
            max_handshakes: self.dtls_max_handshakes,
            handshake_timeout: std::time::Duration::from_secs(
                self.tls_handshake_timeout_secs.max(1),
            ),
            idle_timeout: std::time::Duration::from_secs(self.dtls_idle_timeout_secs.max(1)),
        }
    }

    /// The RFC 5780 alternate port, when an alternate IP is set.
    pub fn alternate_port(&self) -> Option<u16> {
        self.alt_ip?;
        let p = self.udp.first()?.port();
        Some(self.alt_port.unwrap_or(p.wrapping_add(1)))
    }

    /// Whether a TCP listener (for example HTTP) would collide with `addr`.
    pub fn conflicts_with_tcp(&self, addr: SocketAddr) -> bool {
        self.tcp.iter().chain(self.tls.iter()).any(|t| {
            t.port() == addr.port()
                && t.port() != 0
                && (t.ip() == addr.ip() || t.ip().is_unspecified() || addr.ip().is_unspecified())
        })
    }

    /// Listen only on these addresses for UDP and TCP, and on `tls` for TLS (tests).
    pub fn on(addrs: &[SocketAddr], tls: &[SocketAddr]) -> Self {
        ListenConfig {
            udp: addrs.to_vec(),
            tcp: addrs.to_vec(),
            tls: tls.to_vec(),
            ..Default::default()
        }
    }
}

/// Whether two listeners of one protocol would share a port (same port, and the same IP or a
/// wildcard of the same family).
fn same_port(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn validation_names_keys() {
        ListenConfig::default().validate().unwrap();
        let c = ListenConfig {
            alt_ip: Some("127.0.0.2".parse().unwrap()),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().starts_with("listen.alt_ip"));
        let c = ListenConfig {
            udp: vec!["127.0.0.1:3478".parse().unwrap()],
            alt_ip: Some("127.0.0.2".parse().unwrap()),
            ..Default::default()
        };
        c.validate().unwrap();
        assert_eq!(c.alternate_port(), Some(3479));
        let e: Result<ListenConfig, _> = toml::from_str("udpp = []");
        assert!(e.unwrap_err().to_string().contains("udpp"));
    }

    #[test]
    fn dtls_validation_names_keys() {
        let off = ListenConfig::default();
        assert!(off.dtls.is_empty(), "DTLS is off by default");
        let on: ListenConfig = toml::from_str("dtls = [\"0.0.0.0:5349\"]").unwrap();
        on.validate().unwrap();
        let clash: ListenConfig = toml::from_str("dtls = [\"127.0.0.1:3478\"]").unwrap();
        assert!(clash.validate().unwrap_err().starts_with("listen.dtls:"));
        for (key, bad) in [
            ("listen.dtls_max_associations", "dtls_max_associations = 0"),
            ("listen.dtls_max_handshakes", "dtls_max_handshakes = 0"),
            (
                "listen.dtls_max_handshakes",
                "dtls_max_associations = 5\ndtls_max_handshakes = 6",
            ),
            (
                "listen.dtls_idle_timeout_secs",
                "dtls_idle_timeout_secs = 0",
            ),
        ] {
            let c: ListenConfig =
                toml::from_str(&format!("dtls = [\"0.0.0.0:5349\"]\n{bad}")).unwrap();
            let e = c.validate().unwrap_err();
            assert!(e.starts_with(key), "{bad}: {e}");
        }
        let e: Result<ListenConfig, _> = toml::from_str("dtls_port = 5349");
        assert!(e.unwrap_err().to_string().contains("dtls_port"));
    }
}
