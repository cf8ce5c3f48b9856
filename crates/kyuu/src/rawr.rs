//! `kyuu rawr …` and `kyuu lab`: clap argument structs and their runners (the RAWR peer, a
//! standalone node over `kyuu_server::rawr`, and the lab demo from `kyuu_rawr_lab`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::net::UdpSocket;

use kyuu_rawr::config::RawrConfig;
use kyuu_rawr::peer::{PeerConfig, Route};
use kyuu_rawr::wire::Mac;
use kyuu_server::rawr::runtime::{run_peer, spawn_node, PeerEnv};
use kyuu_server::rawr::sys::HostNet;

/// `kyuu rawr`: the RAWR peer and a standalone node.
#[derive(Debug, clap::Args)]
pub struct RawrArgs {
    #[command(subcommand)]
    pub command: RawrCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum RawrCommand {
    /// Run the peer algorithm for a session and print the chosen path and the ICE servers.
    Connect(ConnectArgs),
    /// Run a standalone RAWR control node (UDP `rawr.listen`) from a TOML file.
    Node(NodeArgs),
    /// Print a fresh random session id (16 bytes, hex) to share through signaling.
    Session,
}

#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// The root node (ip:port), the one both peers name.
    #[arg(long)]
    pub root: SocketAddr,
    /// This host's RAWR gateway (ip:port), usually the router; `auto`: probe the default router
    /// on the STUN port, then DNS SRV `_rawr._udp.<search domain>` (docs/rawr.md §8.1).
    #[arg(long)]
    pub gateway: Option<GatewayArg>,
    /// Session id (hex, 16..64 bytes) shared with the other peer.
    #[arg(long)]
    pub session: String,
    /// MAC to announce (default: the interface toward the gateway, else toward the root).
    #[arg(long)]
    pub mac: Option<Mac>,
    /// Announce a random locally administered MAC (registered with the gateway).
    #[arg(long, conflicts_with = "mac")]
    pub random_mac: bool,
    /// Overall deadline in seconds (per attempt).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// Run the whole algorithm again this many times after a failure (1 s apart).
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `--gateway`: an address, or `auto` for discovery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayArg {
    Addr(SocketAddr),
    Auto,
}

impl std::str::FromStr for GatewayArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            return Ok(GatewayArg::Auto);
        }
        s.parse()
            .map(GatewayArg::Addr)
            .map_err(|_| format!("--gateway: `{s}` is neither ip:port nor auto"))
    }
}

#[derive(Debug, clap::Args)]
pub struct NodeArgs {
    /// TOML file: a kyuu config with a `[rawr]` section, or the section's keys at top level.
    #[arg(long)]
    pub config: PathBuf,
}

/// `kyuu lab`: build a small RAWR network on this machine (root needed), connect two peers,
/// print where they met and both RTTs, tear everything down.
#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Sessions to measure.
    #[arg(long, default_value_t = 1)]
    pub rounds: usize,
    /// Print the report as JSON too.
    #[arg(long)]
    pub json: bool,
    /// Use in-process RAWR nodes with coturn as TURN instead of `kyuu serve` on every node.
    #[arg(long)]
    pub coturn: bool,
}

/// Runs `kyuu rawr …`.
pub async fn run(args: RawrArgs) -> anyhow::Result<()> {
    match args.command {
        RawrCommand::Connect(a) => connect(a).await,
        RawrCommand::Node(a) => node(a).await,
        RawrCommand::Session => {
            let s: [u8; 16] = rand::random();
            println!("{}", hex::encode(s));
            Ok(())
        }
    }
}

async fn connect(a: ConnectArgs) -> anyhow::Result<()> {
    let session = hex::decode(&a.session).context("--session is not hex")?;
    if !(kyuu_rawr::wire::MIN_SESSION..=kyuu_rawr::wire::MAX_SESSION).contains(&session.len()) {
        bail!("--session must be 16..64 bytes (32..128 hex digits)");
    }
    let mut host = HostNet::default();
    let gateway = match a.gateway {
        None => None,
        Some(GatewayArg::Addr(g)) => Some(g),
        Some(GatewayArg::Auto) => {
            let probe = UdpSocket::bind(("0.0.0.0", 0))
                .await
                .context("binding a UDP socket")?;
            let d = kyuu_server::rawr::discover::discover_gateway(&host, &probe, None).await;
            match (&d.gateway, &d.found) {
                (Some(g), Some(how)) => eprintln!("gateway: {g} (found by {how:?})"),
                _ => eprintln!(
                    "gateway: none found ({}); using the root",
                    d.tried.join("; ")
                ),
            }
            d.gateway
        }
    };
    let toward = gateway.unwrap_or(a.root).ip();
    let ident = host.mac_toward(toward).await;
    let (mac, ip) = match (a.mac, a.random_mac, ident) {
        (Some(m), _, Ok((_, ip))) => (m, Some(ip)),
        (Some(m), _, Err(_)) => (m, None),
        (None, true, r) => (
            Mac::random_local(&mut rand::thread_rng()),
            r.ok().map(|x| x.1),
        ),
        (None, false, Ok((m, ip))) => (m, Some(ip)),
        (None, false, Err(e)) => {
            eprintln!("no MAC toward {toward} ({e}); using a random one");
            (Mac::random_local(&mut rand::thread_rng()), None)
        }
    };
    host.on_link = host.prefixes().await.ok();
    let bind: SocketAddr = match ip {
        Some(ip) => SocketAddr::new(ip, 0),
        None => SocketAddr::from(([0, 0, 0, 0], 0)),
    };
    let sock = UdpSocket::bind(bind)
        .await
        .context("binding a UDP socket")?;
    let local = sock.local_addr()?;
    let mut cfg = PeerConfig::new(session, mac, a.root);
    cfg.gateway = gateway;
    cfg.deadline = Duration::from_secs(a.timeout);
    if !local.ip().is_unspecified() {
        cfg.hosts = vec![local];
    }
    let env = PeerEnv { host };
    let mut attempt = 0;
    let o = loop {
        match run_peer(cfg.clone(), &sock, &env).await {
            Ok(o) => break o,
            Err(e) if attempt < a.retries => {
                attempt += 1;
                eprintln!("attempt {attempt} failed: {e}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    if a.json {
        let v = serde_json::json!({
            "route": o.route,
            "path": o.relay.as_ref().map(|r| r.path.clone()),
            "iceServers": o.ice_servers(),
            "gatewayError": o.gateway_error,
            "setupMs": o.total_ms,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("mac:     {mac}  (other peer: {})", o.other_mac);
    match &o.route {
        Route::Direct => println!("path:    direct (same link: use host candidates, no relay)"),
        Route::Node { name } => println!(
            "path:    relay at node {name} ({})",
            o.relay
                .as_ref()
                .map(|r| r.path.join(" -> "))
                .unwrap_or_default()
        ),
        Route::Root { name } => println!("path:    relay at the root ({name})"),
    }
    if let Some(e) = &o.gateway_error {
        println!("gateway: not used: {e}");
    }
    println!("setup:   {} ms (exchange {} ms)", o.total_ms, o.exchange_ms);
    println!("iceServers: {}", serde_json::to_string(&o.ice_servers())?);
    Ok(())
}

/// Loads `[rawr]` from a TOML file (a whole kyuu config or the section alone).
pub fn load_config(text: &str) -> anyhow::Result<RawrConfig> {
    let v: toml::Value = toml::from_str(text).context("parsing TOML")?;
    let section = match v.get("rawr") {
        Some(s) => s.clone(),
        None => v,
    };
    let cfg: RawrConfig = section.try_into().context("in [rawr]")?;
    Ok(cfg)
}

async fn node(a: NodeArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg = load_config(&text)?;
    let Some(listen) = cfg.listen else {
        bail!("rawr.listen is not set: a standalone node needs its own UDP address");
    };
    let sock = UdpSocket::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let handle = spawn_node(cfg.clone(), sock)?;
    println!(
        "rawr node {} listening on {}",
        cfg.name,
        handle.local_addr()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}

/// Runs `kyuu lab`.
pub async fn run_lab(args: LabArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().ok();
    let server = match exe {
        Some(p)
            if !args.coturn
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("kyuu")) =>
        {
            kyuu_rawr_lab::LabServer::Kyuu(p)
        }
        _ => kyuu_rawr_lab::LabServer::Coturn,
    };
    match kyuu_rawr_lab::run_demo(args.rounds, true, server).await? {
        Some(r) => {
            r.print();
            if args.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
            println!("lab torn down");
            Ok(())
        }
        None => bail!("the lab needs root, iproute2 and nftables (and coturn with --coturn)"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn loads_a_section_or_a_bare_table() {
        let a = load_config("[rawr]\nname = \"n1\"\n[listen]\nx = 1\n").unwrap();
        assert_eq!(a.name, "n1");
        let b = load_config("name = \"n2\"\n").unwrap();
        assert_eq!(b.name, "n2");
        assert!(load_config("[rawr]\nnmae = \"x\"\n").is_err());
    }

    #[test]
    fn args_parse() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(subcommand)]
            c: Top,
        }
        #[derive(clap::Subcommand)]
        enum Top {
            Rawr(RawrArgs),
            Lab(LabArgs),
        }
        let t = T::try_parse_from([
            "kyuu",
            "rawr",
            "connect",
            "--root",
            "198.18.0.1:3478",
            "--session",
            "00ff",
        ])
        .unwrap();
        assert!(matches!(t.c, Top::Rawr(_)));
        assert!(T::try_parse_from(["kyuu", "lab", "--rounds", "3"]).is_ok());
    }
}
