//! The `kyuu serve` configuration: one TOML file, every section optional.
//!
//! ```toml
//! [server]   # ServerConfig: the profile (`production` refuses open credential minting)
//! [listen]   # STUN/TURN listeners (kyuu_server::relay::ListenConfig)
//! [turn]     # kyuu_turn::TurnConfig: realm, credentials, relay ports, quotas, peer policy
//! [http]     # HttpConfig: signaling, /v1/ice-servers, /metrics, /healthz
//! [signal]   # kyuu_signal::SignalConfig
//! [rawr]     # kyuu_rawr::RawrConfig: a RAWR node beside STUN/TURN (off by default)
//! [log]      # LogConfig
//! [admin]    # crate::admin::AdminConfig: the admin API and /status (off by default)
//! [fleet]    # kyuu_signal::FleetConfig: many nodes as one service over Redis (absent: one node)
//! ```
//!
//! Unknown keys are refused (`deny_unknown_fields`) and [`Config::validate`] names the offending
//! key, so a typo never silently falls back to a default. Defaults are embedded: `kyuu serve`
//! runs without any file.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::admin::AdminConfig;
pub use crate::relay::ListenConfig;
pub use kyuu_rawr::RawrConfig;
pub use kyuu_signal::{FleetConfig, SignalConfig};
pub use kyuu_turn::TurnConfig;

/// The whole configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub listen: ListenConfig,
    pub turn: TurnConfig,
    pub http: HttpConfig,
    pub signal: SignalConfig,
    pub rawr: RawrConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
    /// Absent: a single node, no Redis.
    pub fleet: Option<FleetConfig>,
}

/// The `[server]` section.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// `"default"` starts with any valid configuration (warning when anyone on the internet
    /// can mint TURN credentials); `"production"` (or `kyuu serve --production`) refuses to
    /// start unless credential minting needs a token (`signal.auth_secret`).
    pub profile: Profile,
}

/// See [`ServerConfig::profile`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    #[default]
    Default,
    Production,
}

/// The `[http]` section: one HTTP server for signaling, ICE provisioning, metrics and health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Serve HTTP at all.
    pub enabled: bool,
    /// Address of the HTTP server.
    pub listen: SocketAddr,
    /// Serve Prometheus metrics at `/metrics`.
    pub metrics: bool,
    /// Host name (or IP) put into the `stun:`/`turn:` URLs that `/v1/ice-servers` hands out.
    /// Default: `turn.external_ipv4`, else the first non-wildcard listen address, else the
    /// host's outbound IPv4 address.
    pub public_host: Option<String>,
    /// Lifetime of the TURN credentials `/v1/ice-servers` hands out, seconds.
    pub credential_ttl_secs: u64,
    /// Address of the HTTPS server: the same routes over TLS, so signaling works as
    /// `wss://host:port/<id>`. Off by default (a browser only accepts `wss://` with a
    /// certificate it trusts, which kyuu cannot make up); e.g. `"0.0.0.0:8443"`.
    /// `enabled = false` turns HTTPS off too.
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for HTTPS. Without `tls_cert`/`tls_key`, `listen.tls_cert`/
    /// `listen.tls_key` are used when set, else a self-signed certificate is generated at start
    /// for `listen.tls_names`, `public_host` and the `tls_listen` IP.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS (with `tls_cert`).
    pub tls_key: Option<PathBuf>,
    /// Serve TURN over TLS on `tls_listen` too (e.g. both on 443, for networks that let only
    /// HTTPS out): a connection goes to TURN when it negotiates ALPN `stun.turn`, or offers no
    /// ALPN and names one of `tls_turn_names` in SNI, or sends a STUN message first
    /// (`crate::tls_mux`). `/v1/ice-servers` then adds a `turns:` URL on that port.
    pub tls_turn: bool,
    /// SNI names that mean TURN when the client offers no ALPN.
    pub tls_turn_names: Vec<String>,
    /// PROXY protocol v2 on `listen` (plain HTTP): every connection must start with a header
    /// from one of these networks (the balancers'); empty: off. Signaling's per-address limits
    /// then count real clients.
    pub proxy_protocol_trusted: Vec<kyuu_turn::ipnet::IpNet>,
    /// Open HTTP and HTTPS connections (WebSocket signaling included) one client IP address
    /// may hold; further ones are closed at once (0: unlimited).
    pub max_conns_per_ip: u32,
    /// A client must send a request's complete headers within this many seconds of
    /// connecting, or of the previous response, else the connection is closed (slow headers).
    /// Also bounds the TLS handshake of HTTPS. At least 1.
    pub header_timeout_secs: u64,
}

/// Default lifetime of minted TURN credentials: 20 minutes. An allocation made with one keeps
/// being refreshed after it expires (`kyuu_turn` checks expiry only when something new starts).
pub const DEFAULT_CREDENTIAL_TTL_SECS: u64 = 20 * 60;

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from((Ipv4Addr::UNSPECIFIED, 8080)),
            metrics: true,
            public_host: None,
            credential_ttl_secs: DEFAULT_CREDENTIAL_TTL_SECS,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_turn: false,
            tls_turn_names: Vec::new(),
            proxy_protocol_trusted: Vec::new(),
            max_conns_per_ip: 1024,
            header_timeout_secs: 10,
        }
    }
}

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter: a level (`error`, `warn`, `info`, `debug`, `trace`) or directives
    /// such as `info,kyuu_turn=debug`. The `RUST_LOG` environment variable overrides it.
    pub level: String,
    /// Colours on a terminal.
    pub ansi: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            ansi: true,
        }
    }
}

/// Why a configuration was refused. Displayed after `config error: `.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// TOML syntax or type error, including unknown keys; `message` names the section.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value that parsed but is not acceptable, e.g. `turn.relay_ports: min 60000 > max 50000`.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads and parses a file (not yet validated: flags may still change it).
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let parse_err = |e: toml::de::Error| {
            let (line, column) = e.span().map_or((0, 0), |s| line_col(text, s.start));
            let key = e
                .span()
                .and_then(|s| key_at(text, s.start))
                .map(|k| format!("{k}: "))
                .unwrap_or_default();
            ConfigError::Parse {
                path: origin.to_owned(),
                line,
                column,
                message: format!("{key}{}", e.message().trim_end()),
            }
        };
        toml::from_str(text).map_err(parse_err)
    }

    /// Checks every section; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.listen.validate().map_err(ConfigError::Invalid)?;
        self.turn
            .validate()
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        if let Some(f) = &self.fleet {
            f.validate().map_err(ConfigError::Invalid)?;
        }
        if self.http.enabled && self.http.credential_ttl_secs == 0 {
            return Err(ConfigError::Invalid(
                "http.credential_ttl_secs: must be positive".into(),
            ));
        }
        if self.http.enabled && self.http.header_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "http.header_timeout_secs: must be positive".into(),
            ));
        }
        if self.server.profile == Profile::Production && self.open_minting() {
            return Err(ConfigError::Invalid(
                "server.profile: \"production\" refuses to start while anyone who reaches the \
                 HTTP port can mint TURN credentials; set signal.auth_secret (tokens for \
                 /v1/ice-servers and signaling), or serve TURN with static users only, or set \
                 http.enabled = false"
                    .into(),
            ));
        }
        if let Some(h) = &self.http.public_host {
            if h.is_empty() || h.contains(['/', ' ', '?']) {
                return Err(ConfigError::Invalid(format!(
                    "http.public_host: {h:?} is not a host name or IP address"
                )));
            }
        }
        if self.http.enabled && self.listen.conflicts_with_tcp(self.http.listen) {
            return Err(ConfigError::Invalid(format!(
                "http.listen: {} is also a STUN/TURN TCP listener",
                self.http.listen
            )));
        }
        if self.http.tls_cert.is_some() != self.http.tls_key.is_some() {
            return Err(ConfigError::Invalid(
                "http.tls_cert: tls_cert and tls_key go together".into(),
            ));
        }
        if let Some(tls) = self.http.tls_listen.filter(|_| self.http.enabled) {
            if self.listen.conflicts_with_tcp(tls) {
                return Err(ConfigError::Invalid(format!(
                    "http.tls_listen: {tls} is also a STUN/TURN TCP listener"
                )));
            }
            let h = self.http.listen;
            if tls.port() == h.port()
                && tls.port() != 0
                && (tls.ip() == h.ip() || tls.ip().is_unspecified() || h.ip().is_unspecified())
            {
                return Err(ConfigError::Invalid(format!(
                    "http.tls_listen: {tls} is also http.listen"
                )));
            }
        } else if self.http.tls_cert.is_some() && self.http.enabled {
            return Err(ConfigError::Invalid(
                "http.tls_cert: set http.tls_listen too (HTTPS is off without it)".into(),
            ));
        }
        if self.http.tls_turn && (self.http.tls_listen.is_none() || !self.http.enabled) {
            return Err(ConfigError::Invalid(
                "http.tls_turn: needs http.tls_listen (TURN shares the HTTPS listener)".into(),
            ));
        }
        if self.http.tls_turn && !self.turn.enabled {
            return Err(ConfigError::Invalid(
                "http.tls_turn: TURN is off (turn.enabled = false)".into(),
            ));
        }
        if self.rawr.enabled {
            // `kyuu serve` fills an empty rawr.secret and rawr.relay from [turn] and the ICE
            // URLs at start; validate as it will run.
            let mut rawr = self.rawr.clone();
            if rawr.secret.is_empty() {
                rawr.secret = "filled at start".into();
            }
            if rawr.relay.is_empty() {
                rawr.relay.push("turn:filled.at.start".into());
            }
            rawr.validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        self.admin.validate().map_err(ConfigError::Invalid)?;
        if self.admin.token.is_some() && self.admin.listen.is_none() && !self.http.enabled {
            return Err(ConfigError::Invalid(
                "admin.token: without admin.listen the admin API is served on the HTTP \
                 listener, which is off (http.enabled = false); set admin.listen"
                    .into(),
            ));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::Invalid(format!("log.level: {:?}: {e}", self.log.level)))?;
        Ok(())
    }

    /// Whether anyone who reaches the HTTP port gets TURN credentials without a token:
    /// `/v1/ice-servers` and the signaling welcome mint REST credentials (from a configured or
    /// a generated secret) and `signal.auth_secret` is unset.
    pub fn open_minting(&self) -> bool {
        let mints = !self.turn.static_auth_secrets.is_empty() || self.turn.users.is_empty();
        self.http.enabled && self.turn.enabled && mints && self.signal.auth_secret.is_none()
    }

    /// Warnings for `kyuu serve --check` and the start banner: open minting on an address the
    /// internet may reach. `host_public` is the host's own public address for wildcard
    /// listeners (the default route's source address when it is public).
    pub fn exposure_warnings(&self, host_public: Option<std::net::IpAddr>) -> Vec<String> {
        let mut out = Vec::new();
        if !self.open_minting() {
            return out;
        }
        let mut exposed: Vec<SocketAddr> = std::iter::once(self.http.listen)
            .chain(self.http.tls_listen)
            .filter(|a| crate::limits::is_public(a.ip()))
            .collect();
        let wildcard = std::iter::once(self.http.listen)
            .chain(self.http.tls_listen)
            .find(|a| a.ip().is_unspecified());
        if let (Some(w), Some(ip)) = (wildcard, host_public) {
            exposed.push(SocketAddr::new(ip, w.port()));
        }
        if let Some(a) = exposed.first() {
            out.push(format!(
                "open credential minting on a public address ({a}): anyone who reaches it gets \
                 TURN credentials (rate-limited: signal.mint_rate_per_min, quotas: \
                 turn.client_quota, turn.user_quota, turn.total_quota, turn.max_bps); set \
                 signal.auth_secret, or server.profile = \"production\" to refuse this"
            ));
        }
        out
    }

    /// The effective configuration as TOML (`kyuu serve --print-config`).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        let mut out = String::new();
        out.push_str(&section("server", &self.server)?);
        out.push_str(&section("listen", &self.listen)?);
        out.push_str(&section("turn", &self.turn)?);
        out.push_str(&section("http", &self.http)?);
        out.push_str(&section("signal", &self.signal)?);
        out.push_str(&section("rawr", &self.rawr)?);
        out.push_str(&section("log", &self.log)?);
        out.push_str(&section("admin", &self.admin)?);
        if let Some(f) = &self.fleet {
            out.push_str(&section("fleet", f)?);
        }
        Ok(out)
    }
}

fn section<T: Serialize>(name: &str, value: &T) -> Result<String, toml::ser::Error> {
    let mut wrapper = toml::Table::new();
    wrapper.insert(name.to_owned(), toml::Value::try_from(value)?);
    let mut s = toml::to_string(&wrapper)?;
    if !s.ends_with("\n\n") {
        s.push('\n');
    }
    Ok(s)
}

/// 1-based line and column of byte offset `pos`.
fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = text.get(..pos).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// The dotted key an error at byte offset `pos` is about: the header's name when `pos` is on a
/// `[section]`/`[[array]]` line, else the section in force plus the line's key
/// (`turn.relay_ports`).
fn key_at(text: &str, pos: usize) -> Option<String> {
    let pos = pos.min(text.len());
    let start = text.get(..pos)?.rfind('\n').map_or(0, |i| i + 1);
    let end = text.get(pos..)?.find('\n').map_or(text.len(), |i| pos + i);
    let line = text.get(start..end)?.trim();
    if line.starts_with('[') {
        return header_name(line);
    }
    let section = text
        .get(..start)?
        .lines()
        .filter_map(|l| header_name(l.trim()))
        .next_back();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().replace(['"', '\''], ""))
        .filter(|k| !k.is_empty());
    match (section, key) {
        (Some(s), Some(k)) => Some(format!("{s}.{k}")),
        (Some(s), None) => Some(s),
        (None, k) => k,
    }
}

/// `turn.users` for `[[turn.users]]`, `turn` for `[turn]`.
fn header_name(line: &str) -> Option<String> {
    let inner = line.strip_prefix('[')?.trim_start_matches('[');
    let end = inner.find(']')?;
    Some(inner.get(..end)?.trim().replace(['"', '\''], ""))
}

impl fmt::Display for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.enabled {
            write!(f, "http://{}", self.listen)
        } else {
            f.write_str("disabled")
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn empty_file_is_default() {
        let c = Config::from_toml("", "x").unwrap();
        c.validate().unwrap();
        assert_eq!(c.http, HttpConfig::default());
        assert_eq!(c.turn, TurnConfig::default());
    }

    #[test]
    fn unknown_key_names_section_and_key() {
        let text = "[http]\nlisten = \"127.0.0.1:1\"\n\n[turn]\nrealm = \"x\"\nrelay_port = 5\n";
        let e = Config::from_toml(text, "k.toml").unwrap_err().to_string();
        assert!(
            e.starts_with("k.toml:6:1: turn.relay_port: unknown field `relay_port`"),
            "{e}"
        );
        let e = Config::from_toml("[turn]\nrealm = 5\n", "k")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("k:2:9: turn.realm: invalid type"), "{e}");
        let e = Config::from_toml("turn.relay_ports.min = \"x\"\n", "k")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("k:1:24: turn.relay_ports.min: "), "{e}");
        let e = Config::from_toml("[[turn.users]]\npassword = \"x\"\n", "k")
            .unwrap_err()
            .to_string();
        assert!(e.contains("turn.users: missing field `name`"), "{e}");
    }

    #[test]
    fn unknown_section() {
        let e = Config::from_toml("[htp]\n", "k.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `htp`"), "{e}");
    }

    #[test]
    fn wrong_type_names_key() {
        let e = Config::from_toml("[http]\nlisten = 8080\n", "k.toml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("k.toml:2:"), "{e}");
        assert!(e.contains("http.listen: "), "{e}");
    }

    #[test]
    fn invalid_value_names_key() {
        let c = Config::from_toml("[turn.relay_ports]\nmin = 60000\nmax = 50000\n", "k").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("turn.relay_ports: "), "{e}");
        let c = Config::from_toml("[log]\nlevel = \"info,=x=y\"\n", "k").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("log.level: "), "{e}");
    }

    #[test]
    fn fleet_section_is_optional_and_validated() {
        assert!(Config::from_toml("", "k").unwrap().fleet.is_none());
        let ok = "[fleet]\nredis_url = \"redis://127.0.0.1:6379/\"\nnode = \"a\"\n";
        let c = Config::from_toml(ok, "k").unwrap();
        c.validate().unwrap();
        assert_eq!(c.fleet.as_ref().map(|f| f.peer_ttl_secs), Some(10));
        let bad = "[fleet]\nredis_url = \"http://x\"\nnode = \"a\"\n";
        let e = Config::from_toml(bad, "k")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("fleet.redis_url"), "{e}");
        let bad = "[fleet]\nredis_url = \"redis://x/\"\nnode = \"a b\"\n";
        let e = Config::from_toml(bad, "k")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("fleet.node"), "{e}");
    }

    #[test]
    fn rawr_validation_names_key() {
        let c = Config::from_toml("[rawr]\nenabled = true\nname = \"Bad Name\"\n", "k").unwrap();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("rawr.name"), "{e}");
        let c = Config::from_toml("[rawr]\nenabled = true\n", "k").unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn exposure_warnings_and_production_profile() {
        let public: std::net::IpAddr = "8.8.8.8".parse().unwrap();
        // Wildcard HTTP on a host whose default route is public: warned.
        let c = Config::default();
        assert!(c.open_minting());
        let w = c.exposure_warnings(Some(public));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("8.8.8.8:8080"), "{w:?}");
        // ... but not on a host with only private addresses, nor on loopback.
        assert!(c.exposure_warnings(None).is_empty());
        let mut lo = Config::default();
        lo.http.listen = "127.0.0.1:8080".parse().unwrap();
        assert!(lo.exposure_warnings(Some(public)).is_empty());
        // Tokens, static users only, or no HTTP: nothing is minted openly.
        let mut tok = Config::default();
        tok.signal.auth_secret = Some("s".into());
        assert!(!tok.open_minting());
        assert!(tok.exposure_warnings(Some(public)).is_empty());
        let mut users = Config::default();
        users.turn.users.push(kyuu_turn::UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        });
        assert!(!users.open_minting());
        // The production profile refuses open minting and names the key.
        let mut prod = Config::from_toml("[server]\nprofile = \"production\"\n", "k").unwrap();
        let e = prod.validate().unwrap_err().to_string();
        assert!(
            e.starts_with("server.profile: \"production\" refuses"),
            "{e}"
        );
        prod.signal.auth_secret = Some("s".into());
        prod.validate().unwrap();
        assert!(Config::from_toml("[server]\nprofile = \"prod\"\n", "k").is_err());
    }

    #[test]
    fn print_config_round_trips() {
        let text = "[http]\nlisten = \"127.0.0.1:9000\"\n[signal]\nmax_connections = 7\n";
        let c = Config::from_toml(text, "k").unwrap();
        let printed = c.to_toml().unwrap();
        let again = Config::from_toml(&printed, "printed").unwrap();
        assert_eq!(again.http.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(again.signal.max_connections, 7);
        assert_eq!(again.signal, c.signal);
        assert_eq!(again.http, c.http);
        assert_eq!(again.turn, c.turn);
        assert_eq!(again.listen, c.listen);
        assert_eq!(again.rawr, c.rawr);
        assert_eq!(again.server, c.server);
    }
}
