//! Command-line arguments (clap derive; the doc comments are the help text).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// kyuu: STUN, TURN, WebSocket signaling and RAWR in one server.
#[derive(Debug, Parser)]
#[command(
    name = "kyuu",
    version,
    propagate_version = true,
    after_help = "Examples:
  kyuu serve                                  run with built-in defaults (no config file needed)
  kyuu serve --config /etc/kyuu.toml          run with a configuration file
  kyuu serve --print-config > kyuu.toml       write the effective configuration as a starting point
  kyuu nat stun.example.org                   what kind of NAT is this host behind?
  kyuu admin sessions                         allocations of a running server ([admin] listen)
  kyuu rawr session                           a fresh RAWR session id
  kyuu lab                                    RAWR demo in network namespaces (root)

Run `kyuu <command> --help` for each command's options."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server: STUN/TURN over UDP, TCP and TLS (DTLS with --dtls), plus signaling, ICE provisioning,
    /// metrics and health over HTTP.
    Serve(Box<ServeArgs>),
    /// Find out what NAT sits between this host and a STUN server (RFC 5780 tests).
    Nat(NatArgs),
    /// Talk to a running server's admin API: sessions, kill, credentials, log level, reload,
    /// drain.
    Admin(crate::admin::AdminArgs),
    /// RAWR: find a path to another peer through RAWR nodes, or run a standalone node.
    Rawr(crate::rawr::RawrArgs),
    /// Build a small RAWR network on this machine (root), connect two peers, report, tear down.
    Lab(crate::rawr::LabArgs),
}

/// Options of `kyuu serve`. Flags override the configuration file, which overrides the
/// built-in defaults.
#[derive(Debug, Args)]
#[command(after_help = "Defaults without any file or flag:
  STUN/TURN on UDP and TCP 0.0.0.0:3478 and [::]:3478, TLS on :5349 (self-signed certificate),
  HTTP on 0.0.0.0:8080 (HTTPS/wss off: --https or http.tls_listen), TURN authentication on
  with a REST secret generated at start.
  Credentials come from GET /v1/ice-servers (printed at start): without signal.auth_secret
  anyone who reaches the HTTP port may mint them, rate-limited per address and bounded by the
  default quotas (see `--print-config`); --check and the start banner warn when that port is
  public, and --production refuses to start so.

Examples:
  kyuu serve
  kyuu serve --listen 203.0.113.10:3478 --alt-ip 203.0.113.11     RFC 5780 NAT discovery
  kyuu serve --external-ip 203.0.113.10 --realm example.org          behind a 1:1 NAT
  kyuu serve --secret \"$TURN_SECRET\" --http 127.0.0.1:8080          coturn-style REST secret
  kyuu serve --user alice:wonderland                                 static user, no REST secret
  kyuu serve --https 0.0.0.0:8443 --config kyuu.toml                 wss:// (set http.tls_cert/tls_key)
  kyuu serve --config kyuu.toml --log debug
  kyuu serve --config kyuu.toml --check                              validate only
  kyuu serve --config kyuu.toml --production                         refuse open credential minting

Configuration errors name the key (e.g. `config error: turn.relay_ports: min 60000 > max 50000`)
and exit with status 2.")]
pub struct ServeArgs {
    /// TOML configuration file. Every section ([listen], [turn], [http], [signal], [rawr], [log])
    /// and key is optional; unknown keys are errors.
    #[arg(short, long, value_name = "FILE", env = "KYUU_CONFIG")]
    pub config: Option<PathBuf>,

    /// STUN/TURN address for UDP and TCP (repeatable; replaces listen.udp and listen.tcp).
    /// An IP alone means port 3478.
    #[arg(long, value_name = "ADDR", value_parser = parse_listen)]
    pub listen: Vec<SocketAddr>,

    /// TURN over TLS address (repeatable; replaces listen.tls). "off" disables TLS.
    #[arg(long, value_name = "ADDR|off")]
    pub tls: Vec<String>,

    /// TURN over DTLS address, UDP (RFC 7350; repeatable; replaces listen.dtls; off by default).
    /// An IP alone means port 5349. Uses the TLS certificate.
    #[arg(long, value_name = "ADDR|off")]
    pub dtls: Vec<String>,

    /// HTTP address for signaling, /v1/ice-servers, /metrics and /healthz (http.listen).
    /// "off" disables HTTP.
    #[arg(long, value_name = "ADDR|off")]
    pub http: Option<String>,

    /// HTTPS address: the same routes over TLS, signaling as wss://host:port/<id>
    /// (http.tls_listen; off by default). An IP alone means port 8443. Certificate from
    /// http.tls_cert/tls_key, else listen.tls_cert/tls_key, else self-signed. "off" disables.
    #[arg(long, value_name = "ADDR|off")]
    pub https: Option<String>,

    /// Long-term credential realm (turn.realm).
    #[arg(long, value_name = "REALM")]
    pub realm: Option<String>,

    /// Public IP advertised in relayed addresses and ICE URLs when behind a 1:1 NAT
    /// (turn.external_ipv4 / turn.external_ipv6).
    #[arg(long, value_name = "IP")]
    pub external_ip: Vec<IpAddr>,

    /// Second IP address for RFC 5780 NAT behaviour discovery (listen.alt_ip). Needs a
    /// specific first --listen address.
    #[arg(long, value_name = "IP")]
    pub alt_ip: Option<IpAddr>,

    /// Second port for RFC 5780 (listen.alt_port; default: primary port + 1).
    #[arg(long, value_name = "PORT")]
    pub alt_port: Option<u16>,

    /// TURN REST shared secret (repeatable; turn.static_auth_secrets), coturn's
    /// static-auth-secret. Default: a random one generated at start.
    #[arg(
        long,
        value_name = "SECRET",
        env = "KYUU_TURN_SECRET",
        hide_env_values = true
    )]
    pub secret: Vec<String>,

    /// Static TURN user as NAME:PASSWORD (repeatable; turn.users).
    #[arg(long, value_name = "NAME:PASSWORD", value_parser = parse_user)]
    pub user: Vec<(String, String)>,

    /// Serve STUN Binding only, no TURN allocations (turn.enabled = false).
    #[arg(long)]
    pub no_turn: bool,

    /// Relay port range MIN-MAX (turn.relay_ports).
    #[arg(long, value_name = "MIN-MAX", value_parser = parse_range)]
    pub relay_ports: Option<(u16, u16)>,

    /// Worker threads for STUN/TURN (listen.threads; 0 = one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,

    /// Log filter (log.level): error, warn, info, debug, trace, or directives such as
    /// "info,kyuu_turn=debug". RUST_LOG overrides it.
    #[arg(long, value_name = "FILTER")]
    pub log: Option<String>,

    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,

    /// Validate the configuration and exit (status 0 when valid, 2 when not). Warnings (open
    /// credential minting on a public address) go to standard error.
    #[arg(long)]
    pub check: bool,

    /// The production profile (server.profile = "production"): refuse to start while anyone
    /// who reaches the HTTP port can mint TURN credentials (no signal.auth_secret).
    #[arg(long)]
    pub production: bool,
}

/// Options of `kyuu nat`.
#[derive(Debug, Args)]
#[command(
    after_help = "The tests (RFC 5780 §4.3-4.5) need a server with two IP addresses that
returns OTHER-ADDRESS, such as `kyuu serve --listen IP1 --alt-ip IP2` or coturn with two
listening IPs. A server without it still gives the public address.

Exit status: 0 all tests answered; 1 no answer or an error; 2 bad arguments;
3 partial result (server without RFC 5780, or some tests unanswerable).

Examples:
  kyuu nat stun.example.org
  kyuu nat 203.0.113.10:3478 --json
  kyuu nat stun.example.org --local 192.168.1.20:40000 --timeout 5s"
)]
pub struct NatArgs {
    /// STUN server: HOST, HOST:PORT, IP or IP:PORT ([IPv6]:PORT). Default port 3478.
    pub server: String,

    /// Local address to send from: IP or IP:PORT (default: any address, ephemeral port).
    #[arg(long, value_name = "ADDR", value_parser = parse_local)]
    pub local: Option<SocketAddr>,

    /// How long to wait for each test's answer, retransmitting (RFC 8489: RTO 500 ms, doubling).
    /// Unanswered filtering tests take this long. Examples: 3s, 500ms, 1.5.
    #[arg(long, value_name = "DURATION", default_value = "3s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Initial retransmission timeout.
    #[arg(long, value_name = "DURATION", default_value = "500ms", value_parser = parse_duration)]
    pub rto: Duration,

    /// Skip the hairpinning test.
    #[arg(long)]
    pub no_hairpin: bool,

    /// Run the binding-lifetime test (RFC 5780 §4.6) instead: how long the NAT keeps an idle
    /// mapping, waiting 1 s, 2 s, 4 s... up to this bound (at most 10 min; the test takes about
    /// twice the bound). Needs a server that honours RESPONSE-PORT. Examples: 60s, 5m.
    #[arg(long, value_name = "MAX", value_parser = parse_lifetime)]
    pub lifetime: Option<Duration>,

    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(600) {
        return Err(format!("--lifetime must be between 1ms and 10m, not {s}"));
    }
    Ok(d)
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 3478))
        .map_err(|_| format!("{s:?} is not IP, IP:PORT or [IPv6]:PORT"))
}

fn parse_local(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    s.parse::<IpAddr>()
        .map(|ip| SocketAddr::new(ip, 0))
        .map_err(|_| format!("{s:?} is not IP, IP:PORT or [IPv6]:PORT"))
}

fn parse_user(s: &str) -> Result<(String, String), String> {
    match s.split_once(':') {
        Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok((n.to_owned(), p.to_owned())),
        Some(_) | None => Err(format!("{s:?} is not NAME:PASSWORD")),
    }
}

fn parse_range(s: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{s:?} is not MIN-MAX (e.g. 49152-65535)");
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    Ok((
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    ))
}

/// `3`, `3s`, `1.5s`, `500ms`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("{s:?} is not a duration (e.g. 3s, 500ms, 1.5)");
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !v.is_finite() || v <= 0.0 || v * scale > 3600.0 {
        return Err(format!("{s:?}: must be more than 0 and at most 1 hour"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("x").is_err());
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(
            parse_listen("10.0.0.1").unwrap(),
            "10.0.0.1:3478".parse().unwrap()
        );
        assert_eq!(parse_listen("[::1]:9").unwrap(), "[::1]:9".parse().unwrap());
        assert!(parse_listen("nope").is_err());
        assert_eq!(parse_range("1000-2000").unwrap(), (1000, 2000));
        assert_eq!(
            parse_user("a:b:c").unwrap(),
            ("a".to_owned(), "b:c".to_owned())
        );
    }
}
