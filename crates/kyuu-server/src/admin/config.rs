//! The `[admin]` section: where the admin API (and `/status`) listens and the token it wants.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The `[admin]` section. The admin API is off unless `listen` or `token` is set:
///
/// * `listen` alone: a separate listener without authentication, which must be a loopback
///   address (`127.0.0.1:8081`, `[::1]:8081`);
/// * `token` alone: the API under `/admin/v1/` and `/status` on the HTTP listener, every request
///   with `Authorization: Bearer <token>` (or `?token=`);
/// * both: a separate listener on any address, with the token.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of a separate admin listener, e.g. `"127.0.0.1:8081"`.
    pub listen: Option<SocketAddr>,
    /// Bearer token every admin request must carry (at least 16 characters).
    pub token: Option<String>,
}

/// Shortest accepted `admin.token`.
pub const MIN_TOKEN_LEN: usize = 16;

impl AdminConfig {
    /// Whether the admin API is served at all.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || self.token.is_some()
    }

    /// Checks the section; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.token {
            if t.len() < MIN_TOKEN_LEN || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "admin.token: must be at least {MIN_TOKEN_LEN} characters without spaces \
                     (e.g. the output of `openssl rand -hex 24`)"
                ));
            }
        }
        if let Some(a) = self.listen {
            if self.token.is_none() && !a.ip().is_loopback() {
                return Err(format!(
                    "admin.listen: {a} is not a loopback address and admin.token is not set; \
                     the admin API can kill sessions and mint credentials, so set admin.token \
                     to serve it beyond this host (or listen on 127.0.0.1)"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn public_listener_needs_token() {
        let mut c = AdminConfig {
            listen: Some("0.0.0.0:8081".parse().unwrap()),
            token: None,
        };
        let e = c.validate().unwrap_err();
        assert!(
            e.starts_with("admin.listen: 0.0.0.0:8081 is not a loopback"),
            "{e}"
        );
        c.token = Some("0123456789abcdef".into());
        c.validate().unwrap();
        c.token = Some("short".into());
        assert!(c.validate().unwrap_err().starts_with("admin.token"));
        let lo = AdminConfig {
            listen: Some("127.0.0.1:8081".parse().unwrap()),
            token: None,
        };
        lo.validate().unwrap();
        assert!(lo.enabled());
        assert!(!AdminConfig::default().enabled());
    }
}
