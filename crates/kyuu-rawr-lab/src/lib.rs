//! A RAWR network in the kyuu network lab (`kyuu-lab`): a root, an ISP router, two home routers
//! with NAT, peers behind them, RAWR nodes on the routers and coturn as each meeting node's TURN
//! data plane. Used by the lab tests, the RTT benchmark and `kyuu lab`; a test-support crate
//! that only the `kyuu` binary (for `kyuu lab`) links, never `kyuu-server`.
//!
//! ```text
//!   root 198.18.0.10 ──(40 ms)── isp 198.18.0.2 | 198.18.1.1 ──(10 ms)── homea 198.18.1.2 | 198.19.1.1 ──(1 ms)── pa 198.19.1.10
//!                                                             └─(10 ms)── homeb 198.18.1.3 | 198.19.2.1 ──(1 ms)── pb 198.19.2.10
//!                                 d1 198.18.1.21, d2 198.18.1.22 (extra chain nodes on the ISP network)
//! ```
//! RAWR control listens on port 3479 beside coturn on 3478 (until RAWR shares kyuu's TURN port).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use kyuu_lab::{Lab, LabChild, LabError, LinkSpec, NatKind, Node as LabNode, Router};
use tokio::net::UdpSocket;

use kyuu_client::turn_udp::{Allocation, TurnError};
use kyuu_rawr::config::{parse_turn_uri, BadTurnUri, ChildConfig, GatewayConfig, RawrConfig};
use kyuu_rawr::peer::{Outcome, PeerConfig, PeerError, Route};
use kyuu_rawr::wire::Relay;
use kyuu_server::rawr::runtime::{run_peer, spawn_node_on, NodeHandle, PeerEnv};
use kyuu_server::rawr::sys::HostNet;

pub const RAWR_PORT: u16 = 3479;
/// `kyuu serve` nodes serve `/metrics` here (inside their namespace).
pub const METRICS_PORT: u16 = 9100;
pub const TURN_PORT: u16 = 3478;
const SECRET: &str = "lab-turn-secret";

/// What runs on the lab's nodes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LabServer {
    /// In-process RAWR nodes on port 3479, coturn beside them on 3478 as the data plane.
    #[default]
    Coturn,
    /// `<kyuu binary> serve` on every node: STUN/TURN and RAWR on port 3478, nothing else needed.
    Kyuu(std::path::PathBuf),
}

/// Which lab to build.
#[derive(Debug, Clone)]
pub struct LabSpec {
    /// The servers on the nodes.
    pub server: LabServer,
    /// LAN 1 ms, ISP 10 ms, root 40 ms one way (else no impairment).
    pub delays: bool,
    /// NAT of the home routers.
    pub nat: NatKind,
    /// RAWR node on the ISP router.
    pub isp_node: bool,
    /// RAWR nodes on the home routers (the peers' gateways).
    pub home_nodes: bool,
    /// Home A's gateway is a plain TURN server (coturn) instead of a RAWR node.
    pub plain_gateway_a: bool,
    /// Home A's node reaches the ISP through d1 and d2: homea → d1 → d2 → isp.
    pub chain_a: bool,
    /// A gateway loop: homea → d1 → homea.
    pub loop_a: bool,
    /// Put peer B on A's LAN (pb2, 198.19.1.11) instead of behind home B.
    pub same_lan: bool,
    /// `rawr.pair_in_process` on kyuu serve nodes (default true).
    pub pair_in_process: bool,
    /// `rawr.limits.session_max_bytes` on the ISP node (0: unlimited).
    pub isp_session_max_bytes: u64,
    /// The root is a fleet (`docs/rawr.md` §4.7, `kyuu serve` labs only): a second root node
    /// "root2" on host 198.18.0.11 beside "root", both with `[fleet]` on one `redis-server`
    /// that the lab starts on the root host (free port, stopped by PID).
    pub root_fleet: bool,
}

impl Default for LabSpec {
    fn default() -> Self {
        LabSpec {
            server: LabServer::Coturn,
            delays: false,
            nat: NatKind::Symmetric,
            isp_node: true,
            home_nodes: true,
            plain_gateway_a: false,
            chain_a: false,
            loop_a: false,
            same_lan: false,
            pair_in_process: true,
            isp_session_max_bytes: 0,
            root_fleet: false,
        }
    }
}

/// Errors from the RAWR lab.
#[derive(Debug, thiserror::Error)]
pub enum RawrLabError {
    #[error("lab: {0}")]
    Lab(#[from] LabError),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("rawr peer: {0}")]
    Peer(#[from] PeerError),
    #[error("turn: {0}")]
    Turn(#[from] TurnError),
    #[error("config: {0}")]
    Config(#[from] kyuu_rawr::config::ConfigError),
    #[error("{0}")]
    Uri(#[from] BadTurnUri),
    #[error("host: {0}")]
    Sys(#[from] kyuu_server::rawr::sys::SysError),
    #[error("{0}")]
    Other(String),
}

enum NodeRun {
    Task(NodeHandle),
    Process(LabChild),
}

struct RunningNode {
    run: NodeRun,
    cfg: RawrConfig,
    ns: LabNode,
}

/// The built lab. Dropping it stops nodes and coturn and deletes every namespace.
pub struct RawrLab {
    pub spec: LabSpec,
    pub root: LabNode,
    pub isp: Router,
    pub homea: Router,
    pub homeb: Router,
    pub pa: LabNode,
    pub pb: LabNode,
    nodes: BTreeMap<String, RunningNode>,
    _turns: Vec<LabChild>,
    files: Vec<std::path::PathBuf>,
    /// Redis of a [`LabSpec::root_fleet`] lab.
    fleet_redis: Option<SocketAddr>,
    // Declared last: dropped after the children and nodes above.
    pub lab: Lab,
}

fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::from(ip), port))
}

pub const ROOT_IP: [u8; 4] = [198, 18, 0, 10];
/// The second root node of a [`LabSpec::root_fleet`] lab.
pub const ROOT2_IP: [u8; 4] = [198, 18, 0, 11];
pub const ISP_IP: [u8; 4] = [198, 18, 1, 1];
pub const HOMEA_IP: [u8; 4] = [198, 19, 1, 1];
pub const HOMEB_IP: [u8; 4] = [198, 19, 2, 1];
pub const HOMEA_WAN_IP: [u8; 4] = [198, 18, 1, 2];
pub const D1_IP: [u8; 4] = [198, 18, 1, 21];
pub const D2_IP: [u8; 4] = [198, 18, 1, 22];

fn link(ms: u64, on: bool) -> Option<LinkSpec> {
    on.then(|| LinkSpec::delay(Duration::from_millis(ms)))
}

fn to_tokio(s: std::net::UdpSocket) -> Result<UdpSocket, RawrLabError> {
    s.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(s)?)
}

/// Starts coturn inside `node`, listening on `ip`, with the lab's REST secret.
fn coturn(node: &LabNode, ip: [u8; 4]) -> Result<LabChild, RawrLabError> {
    let ip = Ipv4Addr::from(ip).to_string();
    let mut cmd = node.command("turnserver");
    cmd.args([
        "-n",
        &format!("--listening-ip={ip}"),
        &format!("--listening-port={TURN_PORT}"),
        &format!("--relay-ip={ip}"),
        "--use-auth-secret",
        &format!("--static-auth-secret={SECRET}"),
        "--realm=kyuu-lab",
        "--no-tls",
        "--no-dtls",
        "--no-tcp",
        "--no-cli",
        // Lab addresses are in the benchmarking range: allow relaying to it explicitly.
        "--allowed-peer-ip=198.18.0.0-198.19.255.255",
        "--min-port=49152",
        "--max-port=49352",
        "--log-file=/dev/null",
        "--no-stdout-log",
    ]);
    cmd.stdout(std::process::Stdio::null());
    cmd.stderr(std::process::Stdio::null());
    Ok(node.spawn(cmd)?)
}

/// Waits (bounded) until a STUN server answers Binding at `addr` from inside `node`.
async fn wait_stun(node: &LabNode, addr: SocketAddr) -> Result<(), RawrLabError> {
    let sock = to_tokio(node.udp_bind("0.0.0.0:0")?)?;
    let mut buf = [0u8; 512];
    for i in 0..50u8 {
        let req = kyuu_rawr::wire::encode_binding_request(kyuu_stun::TransactionId([i; 12]));
        sock.send_to(&req, addr).await?;
        if tokio::time::timeout(Duration::from_millis(100), sock.recv_from(&mut buf))
            .await
            .is_ok()
        {
            return Ok(());
        }
    }
    Err(RawrLabError::Other(format!(
        "no STUN server answered at {addr}"
    )))
}

impl RawrLab {
    /// Builds the lab, or `Ok(None)` after printing a SKIP line when this machine cannot run it
    /// (not root, no `ip`/`nft`) and `KYUU_LAB_REQUIRED` is not set.
    pub async fn build_or_skip(test: &str, spec: LabSpec) -> Result<Option<RawrLab>, RawrLabError> {
        if spec.server == LabServer::Coturn
            && std::process::Command::new("turnserver")
                .arg("--version")
                .output()
                .is_err()
        {
            if kyuu_lab::lab_required() {
                return Err(RawrLabError::Other(
                    "turnserver (coturn) is required for the RAWR lab".into(),
                ));
            }
            println!("SKIP {test}: turnserver (coturn) not installed");
            return Ok(None);
        }
        if spec.root_fleet
            && std::process::Command::new("redis-server")
                .arg("--version")
                .output()
                .is_err()
        {
            if kyuu_lab::lab_required() {
                return Err(RawrLabError::Other(
                    "redis-server is required for the RAWR fleet lab".into(),
                ));
            }
            println!("SKIP {test}: redis-server not installed");
            return Ok(None);
        }
        let Some(lab) = kyuu_lab::lab_or_skip(test) else {
            return Ok(None);
        };
        Self::build(lab, spec).await.map(Some)
    }

    /// Builds the topology in `lab`.
    pub async fn build(lab: Lab, spec: LabSpec) -> Result<RawrLab, RawrLabError> {
        let d = spec.delays;
        let core = lab.switch("core")?;
        let ispnet = lab.switch("ispnet")?;
        let lana = lab.switch("lana")?;
        let lanb = lab.switch("lanb")?;

        let root = lab.host("root")?;
        root.attach(&core, "198.18.0.10/24")?;
        root.route("198.18.1.0/24", "198.18.0.2")?;

        let isp = lab.router("isp", NatKind::None)?;
        match link(40, d) {
            Some(l) => isp.wan_with(&core, "198.18.0.2/24", l)?,
            None => isp.wan(&core, "198.18.0.2/24")?,
        };
        isp.lan(&ispnet, "198.18.1.1/24")?;

        let mk_home = |name: &str, wan: &str, lan_sw, lan: &str| -> Result<Router, LabError> {
            let r = lab.router(name, spec.nat)?;
            match link(10, d) {
                Some(l) => r.wan_with(&ispnet, wan, l)?,
                None => r.wan(&ispnet, wan)?,
            };
            r.lan(lan_sw, lan)?;
            r.node().route_default("198.18.1.1")?;
            Ok(r)
        };
        let homea = mk_home("homea", "198.18.1.2/24", &lana, "198.19.1.1/24")?;
        let homeb = mk_home("homeb", "198.18.1.3/24", &lanb, "198.19.2.1/24")?;

        let mk_peer = |name: &str, sw, cidr: &str, gw: &str| -> Result<LabNode, LabError> {
            let p = lab.host(name)?;
            match link(1, d) {
                Some(l) => p.attach_with(sw, cidr, l)?,
                None => p.attach(sw, cidr)?,
            };
            p.route_default(gw)?;
            Ok(p)
        };
        let pa = mk_peer("pa", &lana, "198.19.1.10/24", "198.19.1.1")?;
        let pb = if spec.same_lan {
            mk_peer("pb", &lana, "198.19.1.11/24", "198.19.1.1")?
        } else {
            mk_peer("pb", &lanb, "198.19.2.10/24", "198.19.2.1")?
        };

        let mut turns = Vec::new();
        if spec.server == LabServer::Coturn {
            turns.push(coturn(&root, ROOT_IP)?);
            if spec.isp_node {
                turns.push(coturn(isp.node(), ISP_IP)?);
            }
            if spec.plain_gateway_a {
                turns.push(coturn(homea.node(), HOMEA_IP)?);
            }
        }

        let mut rl = RawrLab {
            spec: spec.clone(),
            root,
            isp,
            homea,
            homeb,
            pa,
            pb,
            nodes: BTreeMap::new(),
            _turns: turns,
            files: Vec::new(),
            fleet_redis: None,
            lab,
        };
        let port = rl.port();
        let node_cfg =
            |name: &str, ip, gw, children: &[&str]| node_cfg(name, ip, gw, children, port);
        if spec.plain_gateway_a {
            if let LabServer::Kyuu(_) = &spec.server {
                // A kyuu TURN server with RAWR disabled.
                let mut cfg = node_cfg("homea", HOMEA_IP, None, &[]);
                cfg.enabled = false;
                let ns = rl.homea.node().clone();
                rl.start_node(ns, cfg).await?;
            }
        }

        // RAWR nodes. Every node also runs a TURN server in a full deployment; here only the
        // root, the ISP and (as a plain TURN gateway) home A have one, since only they relay.
        if spec.root_fleet {
            rl.start_fleet_redis().await?;
        }
        let root_ns = rl.root.clone();
        rl.start_node(root_ns, node_cfg("root", ROOT_IP, None, &[]))
            .await?;
        if spec.root_fleet {
            let root2 = rl.lab.host("root2")?;
            root2.attach(&core, "198.18.0.11/24")?;
            root2.route("198.18.1.0/24", "198.18.0.2")?;
            rl.start_node(root2, node_cfg("root2", ROOT2_IP, None, &[]))
                .await?;
        }
        if spec.isp_node {
            let mut children = vec!["homea", "homeb"];
            if spec.chain_a {
                children.push("d2");
            }
            let ns = rl.isp.node().clone();
            let mut cfg = node_cfg("isp", ISP_IP, None, &children);
            cfg.limits.session_max_bytes = spec.isp_session_max_bytes;
            rl.start_node(ns, cfg).await?;
        }
        let isp_gw = spec.isp_node.then_some(ISP_IP);
        if spec.chain_a || spec.loop_a {
            let d1 = rl.lab.host("d1")?;
            d1.attach(&ispnet, "198.18.1.21/24")?;
            d1.route_default("198.18.1.1")?;
            let cfg = if spec.loop_a {
                node_cfg("d1", D1_IP, Some(("d1", HOMEA_WAN_IP)), &["homea"])
            } else {
                node_cfg("d1", D1_IP, Some(("d1", D2_IP)), &["homea"])
            };
            rl.start_node(d1, cfg).await?;
            if spec.chain_a {
                let d2 = rl.lab.host("d2")?;
                d2.attach(&ispnet, "198.18.1.22/24")?;
                d2.route_default("198.18.1.1")?;
                let cfg = node_cfg("d2", D2_IP, isp_gw.map(|g| ("d2", g)), &["d1"]);
                rl.start_node(d2, cfg).await?;
            }
        }
        if spec.home_nodes {
            if !spec.plain_gateway_a {
                let gw = if spec.chain_a || spec.loop_a {
                    Some(D1_IP)
                } else {
                    isp_gw
                };
                let children: &[&str] = if spec.loop_a { &["d1"] } else { &[] };
                let ns = rl.homea.node().clone();
                rl.start_node(
                    ns,
                    node_cfg("homea", HOMEA_IP, gw.map(|g| ("homea", g)), children),
                )
                .await?;
            }
            if !spec.same_lan {
                let ns = rl.homeb.node().clone();
                rl.start_node(
                    ns,
                    node_cfg("homeb", HOMEB_IP, isp_gw.map(|g| ("homeb", g)), &[]),
                )
                .await?;
            }
        }
        wait_stun(&rl.pa, sa(ROOT_IP, TURN_PORT)).await?;
        if spec.isp_node {
            wait_stun(&rl.pa, sa(ISP_IP, TURN_PORT)).await?;
        }
        if spec.plain_gateway_a {
            wait_stun(&rl.pa, sa(HOMEA_IP, TURN_PORT)).await?;
        }
        if let LabServer::Kyuu(_) = &spec.server {
            // Every node is a kyuu server process: wait until each answers STUN.
            let addrs: Vec<(SocketAddr, bool)> = rl
                .nodes
                .values()
                .filter_map(|n| {
                    n.cfg
                        .self_addrs
                        .first()
                        .map(|a| (*a, n.cfg.name == "homeb"))
                })
                .collect();
            for (a, from_b) in addrs {
                let from = if from_b { &rl.pb } else { &rl.pa };
                wait_stun(from, a).await?;
            }
        }
        Ok(rl)
    }

    /// `redis-server` on the root host at a free port (bounded wait until it accepts).
    async fn start_fleet_redis(&mut self) -> Result<(), RawrLabError> {
        if self.spec.server == LabServer::Coturn {
            return Err(RawrLabError::Other(
                "root_fleet needs kyuu serve nodes".into(),
            ));
        }
        let port = self
            .root
            .tcp_listen(&format!("{}:0", Ipv4Addr::from(ROOT_IP)))?
            .local_addr()?
            .port();
        let addr = sa(ROOT_IP, port);
        let mut cmd = self.root.command("redis-server");
        cmd.args(["--port", &port.to_string(), "--bind"])
            .arg(Ipv4Addr::from(ROOT_IP).to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"]);
        cmd.stdout(std::process::Stdio::null());
        cmd.stderr(std::process::Stdio::null());
        self._turns.push(self.root.spawn(cmd)?);
        for _ in 0..100 {
            let up = self.root.in_ns(|| {
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
            })?;
            if up {
                self.fleet_redis = Some(addr);
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(RawrLabError::Other(format!(
            "redis-server did not start at {addr}"
        )))
    }

    /// The second root node of a [`LabSpec::root_fleet`] lab.
    pub fn root2_addr(&self) -> SocketAddr {
        sa(ROOT2_IP, self.port())
    }

    /// The port RAWR requests go to.
    pub fn port(&self) -> u16 {
        match self.spec.server {
            LabServer::Coturn => RAWR_PORT,
            LabServer::Kyuu(_) => TURN_PORT,
        }
    }

    /// `kyuu serve` in `ns` with this node's `[rawr]` (STUN/TURN and RAWR on port 3478).
    fn spawn_kyuu(
        &mut self,
        bin: &std::path::Path,
        ns: &LabNode,
        cfg: &RawrConfig,
    ) -> Result<LabChild, RawrLabError> {
        let ip = cfg
            .self_addrs
            .first()
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let mut rawr = cfg.clone();
        rawr.netns = None;
        let rawr = toml::Value::try_from(&rawr)
            .map_err(|e| RawrLabError::Other(format!("rawr config: {e}")))?;
        let mut t = toml::Table::new();
        let table = |pairs: Vec<(&str, toml::Value)>| {
            toml::Value::Table(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
        };
        let strs = |v: &[&str]| {
            toml::Value::Array(v.iter().map(|x| toml::Value::String((*x).into())).collect())
        };
        t.insert(
            "listen".into(),
            table(vec![
                ("udp", strs(&[&format!("0.0.0.0:{TURN_PORT}")])),
                ("tcp", strs(&[])),
                ("tls", strs(&[])),
                // One shard: in-process pairing links allocations of one shard only.
                ("threads", toml::Value::Integer(1)),
            ]),
        );
        t.insert(
            "turn".into(),
            table(vec![
                ("realm", toml::Value::String("kyuu-lab".into())),
                ("static_auth_secrets", strs(&[SECRET])),
                ("allow_peers", strs(&["198.18.0.0/15"])),
                ("relay_ipv4", toml::Value::String(ip)),
            ]),
        );
        t.insert(
            "http".into(),
            table(vec![
                ("enabled", toml::Value::Boolean(true)),
                (
                    "listen",
                    toml::Value::String(format!("0.0.0.0:{METRICS_PORT}")),
                ),
                ("metrics", toml::Value::Boolean(true)),
            ]),
        );
        t.insert("rawr".into(), rawr);
        if let (Some(redis), "root" | "root2") = (self.fleet_redis, cfg.name.as_str()) {
            t.insert(
                "fleet".into(),
                table(vec![
                    (
                        "redis_url",
                        toml::Value::String(format!("redis://{redis}/")),
                    ),
                    ("node", toml::Value::String(cfg.name.clone())),
                    ("peer_ttl_secs", toml::Value::Integer(4)),
                    ("heartbeat_secs", toml::Value::Integer(1)),
                ]),
            );
        }
        let text = toml::to_string(&t).map_err(|e| RawrLabError::Other(e.to_string()))?;
        let file = std::env::temp_dir().join(format!("{}-{}.toml", self.lab.prefix(), cfg.name));
        std::fs::write(&file, text)?;
        self.files.push(file.clone());
        let mut cmd = ns.command(bin);
        cmd.arg("serve").arg("--config").arg(&file);
        cmd.stdout(std::process::Stdio::null());
        cmd.stderr(std::process::Stdio::null());
        Ok(ns.spawn(cmd)?)
    }

    async fn start_node(&mut self, ns: LabNode, mut cfg: RawrConfig) -> Result<(), RawrLabError> {
        cfg.pair_in_process = self.spec.pair_in_process;
        if let LabServer::Kyuu(bin) = self.spec.server.clone() {
            let child = self.spawn_kyuu(&bin, &ns, &cfg)?;
            self.nodes.insert(
                cfg.name.clone(),
                RunningNode {
                    run: NodeRun::Process(child),
                    cfg,
                    ns,
                },
            );
            return Ok(());
        }
        cfg.netns = Some(ns.ns_name().to_owned());
        let addr = cfg
            .self_addrs
            .first()
            .copied()
            .ok_or_else(|| RawrLabError::Other("node without an address".into()))?;
        // The previous instance's socket may still be closing: retry the bind (bounded).
        let mut sock = None;
        for _ in 0..50 {
            // Bound to every address: a router's node is reached on its LAN and WAN sides.
            match ns.udp_bind(&format!("0.0.0.0:{}", addr.port())) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
        let sock = sock.ok_or_else(|| RawrLabError::Other(format!("cannot bind {addr}")))?;
        let handle = spawn_node_on(cfg.clone(), to_tokio(sock)?, None, lab_host(&ns))?;
        self.nodes.insert(
            cfg.name.clone(),
            RunningNode {
                run: NodeRun::Task(handle),
                cfg,
                ns,
            },
        );
        Ok(())
    }

    /// Kills a node (its pending state is lost).
    pub fn kill_node(&mut self, name: &str) {
        if let Some(n) = self.nodes.get(name) {
            match &n.run {
                NodeRun::Task(h) => h.kill(),
                NodeRun::Process(c) => c.kill(),
            }
        }
    }

    /// Kills and restarts a node on the same address.
    pub async fn restart_node(&mut self, name: &str) -> Result<(), RawrLabError> {
        let Some(n) = self.nodes.remove(name) else {
            return Err(RawrLabError::Other(format!("no node {name}")));
        };
        match n.run {
            NodeRun::Task(h) => {
                h.kill();
                drop(h);
            }
            NodeRun::Process(c) => c.kill(),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.start_node(n.ns, n.cfg).await
    }

    /// The process id of a `kyuu serve` node.
    pub fn node_pid(&self, name: &str) -> Option<u32> {
        match &self.nodes.get(name)?.run {
            NodeRun::Process(c) => Some(c.pid()),
            NodeRun::Task(_) => None,
        }
    }

    /// The sum of a Prometheus counter over its label sets, read from a `kyuu serve` node's
    /// `/metrics` (from inside its namespace). 0 when the series does not exist yet.
    pub fn node_metric(&self, name: &str, metric: &str) -> Result<f64, RawrLabError> {
        let n = self
            .nodes
            .get(name)
            .ok_or_else(|| RawrLabError::Other(format!("no node {name}")))?;
        let ip = n
            .cfg
            .self_addrs
            .first()
            .map(|a| a.ip())
            .ok_or_else(|| RawrLabError::Other("node without an address".into()))?;
        let mut cmd = n.ns.command("curl");
        cmd.args(["-sf", "--max-time", "2"])
            .arg(format!("http://{ip}:{METRICS_PORT}/metrics"));
        let out = n.ns.run(cmd, Duration::from_secs(3))?;
        if !out.status.success() {
            return Err(RawrLabError::Other(format!(
                "/metrics of {name}: {}",
                out.status
            )));
        }
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter(|l| {
                l.strip_prefix(metric)
                    .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }

    pub async fn stats(&self, name: &str) -> Option<kyuu_rawr::node::Stats> {
        match &self.nodes.get(name)?.run {
            NodeRun::Task(h) => h.stats().await,
            NodeRun::Process(_) => None,
        }
    }

    /// `(name, stats)` of every running node.
    pub async fn all_stats(&self) -> Vec<(String, kyuu_rawr::node::Stats)> {
        let mut v = Vec::new();
        for (name, n) in &self.nodes {
            let NodeRun::Task(h) = &n.run else { continue };
            if let Some(s) = h.stats().await {
                v.push((name.clone(), s));
            }
        }
        v
    }

    /// Waits (bounded by `limit`) until no node holds pending or upstream state.
    pub async fn wait_clean(&self, limit: Duration) -> Result<(), String> {
        let end = Instant::now() + limit;
        loop {
            let stats = self.all_stats().await;
            let dirty: Vec<_> = stats
                .iter()
                .filter(|(_, s)| s.pending > 0 || s.upstream > 0)
                .collect();
            if dirty.is_empty() {
                return Ok(());
            }
            if Instant::now() >= end {
                return Err(format!("state left behind: {dirty:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peer A's gateway for the scenario (RAWR port, or coturn's port for a plain gateway).
    pub fn gateway_a(&self) -> Option<SocketAddr> {
        if self.spec.plain_gateway_a {
            Some(sa(HOMEA_IP, TURN_PORT))
        } else {
            self.spec.home_nodes.then(|| sa(HOMEA_IP, self.port()))
        }
    }

    pub fn gateway_b(&self) -> Option<SocketAddr> {
        if self.spec.same_lan {
            self.gateway_a()
        } else {
            self.spec.home_nodes.then(|| sa(HOMEB_IP, self.port()))
        }
    }

    pub fn root_addr(&self) -> SocketAddr {
        sa(ROOT_IP, self.port())
    }

    /// Runs the peer algorithm on both peers at once for `session`.
    pub async fn connect_pair(
        &self,
        session: &[u8],
        root: SocketAddr,
    ) -> (Result<LabPeer, RawrLabError>, Result<LabPeer, RawrLabError>) {
        tokio::join!(
            lab_peer(&self.pa, session, root, self.gateway_a()),
            lab_peer(&self.pb, session, root, self.gateway_b()),
        )
    }

    /// UDP datagrams received in the root's namespace so far (from `/proc/net/snmp`).
    pub fn root_udp_in(&self) -> Result<u64, RawrLabError> {
        let mut cmd = self.root.command("cat");
        cmd.arg("/proc/net/snmp");
        let out = self.root.run(cmd, Duration::from_secs(2))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
        let (Some(h), Some(v)) = (lines.next(), lines.next()) else {
            return Err(RawrLabError::Other(
                "no Udp: lines in /proc/net/snmp".into(),
            ));
        };
        let i = h
            .split_whitespace()
            .position(|w| w == "InDatagrams")
            .ok_or_else(|| RawrLabError::Other("no InDatagrams".into()))?;
        v.split_whitespace()
            .nth(i)
            .and_then(|x| x.parse().ok())
            .ok_or_else(|| RawrLabError::Other("bad InDatagrams".into()))
    }
}

fn node_cfg(
    name: &str,
    ip: [u8; 4],
    gateway: Option<(&str, [u8; 4])>,
    children: &[&str],
    port: u16,
) -> RawrConfig {
    RawrConfig {
        enabled: true,
        name: name.into(),
        self_addrs: vec![sa(ip, port)],
        relay: vec![format!("turn:{}?transport=udp", sa(ip, TURN_PORT))],
        secret: SECRET.into(),
        gateway: gateway.map(|(me, gw)| GatewayConfig {
            addr: sa(gw, port),
            key: Some(format!("link-{me}")),
        }),
        children: children
            .iter()
            .map(|c| ChildConfig {
                name: (*c).into(),
                key: format!("link-{c}"),
            })
            .collect(),
        ..RawrConfig::default()
    }
}

/// Host facts for a lab namespace: the neighbour table is read on a thread inside it.
/// The `kyuu` binary for [`LabServer::Kyuu`] labs in tests: `KYUU_BIN`, else `kyuu` beside the
/// calling test binary's directory (cargo's `target/<profile>`), else the release build. When
/// none exists this prints a SKIP line for `test` and returns `None`, or panics when
/// `KYUU_BIN_REQUIRED=1` (CI sets it, so those scenarios can never be skipped silently there).
pub fn kyuu_bin_or_skip(test: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("KYUU_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let exe = std::env::current_exe().ok()?;
            let dir = exe.parent()?.parent()?.to_path_buf();
            [dir.join("kyuu"), dir.join("../release/kyuu")]
                .into_iter()
                .find(|p| p.exists())
        });
    if found.is_none() {
        assert!(
            std::env::var("KYUU_BIN_REQUIRED").map_or(true, |v| v != "1"),
            "{test}: no kyuu binary (KYUU_BIN_REQUIRED=1)"
        );
        println!("SKIP {test}: no kyuu binary (set KYUU_BIN or build -p kyuu)");
    }
    found
}

pub fn lab_host(ns: &LabNode) -> HostNet {
    let node = ns.clone();
    let arp: kyuu_server::rawr::sys::ArpReader = std::sync::Arc::new(move || {
        node.in_ns(|| std::fs::read_to_string("/proc/thread-self/net/arp"))
            .map_err(|e| std::io::Error::other(e.to_string()))?
    });
    HostNet {
        netns: Some(ns.ns_name().to_owned()),
        arp: Some(arp),
        on_link: None,
    }
}

impl Drop for RawrLab {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// A peer's result in the lab.
#[derive(Debug)]
pub struct LabPeer {
    pub outcome: Outcome,
    pub host_ip: IpAddr,
    pub ns: LabNode,
}

/// Runs the peer algorithm inside `ns` with no gateway configured: the gateway is discovered
/// (`docs/rawr.md` §8.1: the default router probed on the STUN port, then DNS SRV).
pub async fn lab_peer_discovering(
    ns: &LabNode,
    session: &[u8],
    root: SocketAddr,
) -> Result<(LabPeer, kyuu_server::rawr::discover::Discovery), RawrLabError> {
    let host = lab_host(ns);
    let sock = to_tokio(ns.udp_bind("0.0.0.0:0")?)?;
    let d = kyuu_server::rawr::discover::discover_gateway(&host, &sock, None).await;
    drop(sock);
    let p = lab_peer(ns, session, root, d.gateway).await?;
    Ok((p, d))
}

/// Runs the peer algorithm inside `ns` (MAC of the interface toward the gateway or root).
pub async fn lab_peer(
    ns: &LabNode,
    session: &[u8],
    root: SocketAddr,
    gateway: Option<SocketAddr>,
) -> Result<LabPeer, RawrLabError> {
    let mut host = lab_host(ns);
    let toward = gateway.unwrap_or(root).ip();
    let (mac, ip) = host.mac_toward(toward).await?;
    host.on_link = Some(host.prefixes().await?);
    let sock = to_tokio(ns.udp_bind("0.0.0.0:0")?)?;
    let port = sock.local_addr()?.port();
    let mut cfg = PeerConfig::new(session.to_vec(), mac, root);
    cfg.gateway = gateway;
    cfg.hosts = vec![SocketAddr::new(ip, port)];
    cfg.deadline = Duration::from_secs(30);
    let outcome = run_peer(cfg, &sock, &PeerEnv { host }).await?;
    Ok(LabPeer {
        outcome,
        host_ip: ip,
        ns: ns.clone(),
    })
}

/// Round-trip samples between the two peers over the route they chose.
#[derive(Debug, Clone)]
pub struct Rtt {
    pub samples: Vec<Duration>,
    pub relay: Option<SocketAddr>,
}

impl Rtt {
    pub fn median(&self) -> Duration {
        let mut s = self.samples.clone();
        s.sort();
        s.get(s.len() / 2).copied().unwrap_or_default()
    }
}

/// The TURN server a relay offer names first.
fn relay_server(r: &Relay) -> Result<SocketAddr, RawrLabError> {
    Ok(parse_turn_uri(
        r.uris.first().map(String::as_str).unwrap_or(""),
    )?)
}

/// TURN allocations from `a`'s and `b`'s namespaces on the relays their outcomes name (`ra`,
/// `rb`: the first URI of each, with the credentials it came with).
async fn allocate_pair(
    a: &LabPeer,
    ra: &Relay,
    b: &LabPeer,
    rb: &Relay,
) -> Result<(Allocation, Allocation), RawrLabError> {
    let server_a = relay_server(ra)?;
    let server_b = relay_server(rb)?;
    let xa = Allocation::new(
        to_tokio(a.ns.udp_bind("0.0.0.0:0")?)?,
        server_a,
        &ra.username,
        &ra.password,
    )
    .await?;
    let xb = Allocation::new(
        to_tokio(b.ns.udp_bind("0.0.0.0:0")?)?,
        server_b,
        &rb.username,
        &rb.password,
    )
    .await?;
    Ok((xa, xb))
}

const ECHO_PORT: u16 = 40_000;

/// Sends `n` pings from A to B over the chosen route and measures round trips; data flowing is
/// the proof that the route works.
pub async fn ping_pong(a: &LabPeer, b: &LabPeer, n: usize) -> Result<Rtt, RawrLabError> {
    ping_pong_with(a, b, n, true).await
}

/// [`ping_pong`]; `permit: false` skips CreatePermission for the other side's relayed address
/// (a paired meeting node installs it itself).
pub async fn ping_pong_with(
    a: &LabPeer,
    b: &LabPeer,
    n: usize,
    permit: bool,
) -> Result<Rtt, RawrLabError> {
    match (&a.outcome.relay, &b.outcome.relay) {
        (None, None) => {
            let sa_ = to_tokio(a.ns.udp_bind("0.0.0.0:0")?)?;
            let sb = to_tokio(b.ns.udp_bind(&format!("0.0.0.0:{ECHO_PORT}"))?)?;
            let target = SocketAddr::new(b.host_ip, ECHO_PORT);
            let echo = tokio::spawn(async move {
                let mut buf = [0u8; 256];
                for _ in 0..10_000 {
                    let Ok(Ok((k, from))) =
                        tokio::time::timeout(Duration::from_secs(3), sb.recv_from(&mut buf)).await
                    else {
                        return;
                    };
                    let _ = sb.send_to(buf.get(..k).unwrap_or(&[]), from).await;
                }
            });
            let mut samples = Vec::new();
            let mut buf = [0u8; 256];
            for i in 0..n {
                let msg = (i as u64).to_be_bytes();
                let t = Instant::now();
                sa_.send_to(&msg, target).await?;
                let r = tokio::time::timeout(Duration::from_secs(2), sa_.recv_from(&mut buf)).await;
                if let Ok(Ok((k, _))) = r {
                    if buf.get(..k) == Some(&msg[..]) {
                        samples.push(t.elapsed());
                    }
                }
            }
            echo.abort();
            Ok(Rtt {
                samples,
                relay: None,
            })
        }
        (Some(ra), Some(rb)) => {
            let server_a = relay_server(ra)?;
            let (mut xa, mut xb) = allocate_pair(a, ra, b, rb).await?;
            if permit {
                xa.permit(xb.relayed.ip()).await?;
                xb.permit(xa.relayed.ip()).await?;
            }
            let (ra_addr, rb_addr) = (xa.relayed, xb.relayed);
            let echo = tokio::spawn(async move {
                for _ in 0..10_000 {
                    let Ok(Ok((from, data))) =
                        tokio::time::timeout(Duration::from_secs(3), xb.recv_from()).await
                    else {
                        return;
                    };
                    let _ = xb.send_to(&data, from).await;
                }
            });
            let mut samples = Vec::new();
            for i in 0..n {
                let msg = (i as u64).to_be_bytes();
                let t = Instant::now();
                xa.send_to(&msg, rb_addr).await?;
                let r = tokio::time::timeout(Duration::from_secs(2), xa.recv_from()).await;
                if let Ok(Ok((from, data))) = r {
                    if from == rb_addr && data == msg {
                        samples.push(t.elapsed());
                    }
                }
            }
            echo.abort();
            let _ = ra_addr;
            Ok(Rtt {
                samples,
                relay: Some(server_a),
            })
        }
        _ => Err(RawrLabError::Other(
            "the peers chose different routes (one direct, one relayed)".into(),
        )),
    }
}

/// A one-line description of a route.
pub fn describe(route: &Route) -> String {
    match route {
        Route::Direct => "direct (same link, no relay)".into(),
        Route::Node { name } => format!("relay at node {name}"),
        Route::Root { name } => format!("relay at the root ({name})"),
    }
}

/// What `kyuu lab` and the benchmark measure.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    /// Where the peers met through RAWR.
    pub rawr_route: String,
    pub rawr_path: Vec<String>,
    /// Median A→B→A round trip through the RAWR relay and through the root, in ms.
    pub rawr_rtt_ms: f64,
    pub root_rtt_ms: f64,
    pub ratio: f64,
    /// Control-plane setup (Exchange + Connect), slower of the two peers, median over rounds.
    pub rawr_setup_ms: u64,
    pub root_setup_ms: u64,
    /// STUN round trips from peer A to the root and to the meeting node, in ms.
    pub root_stun_rtt_ms: f64,
    pub meeting_stun_rtt_ms: f64,
    /// `rawr_setup_ms <= root_stun_rtt_ms + meeting_stun_rtt_ms`.
    pub setup_budget_met: bool,
    /// UDP datagrams the root received while the RAWR session carried data.
    pub root_datagrams_during_rawr_session: u64,
    pub rounds: usize,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median<T: Copy + PartialOrd>(mut v: Vec<T>) -> Option<T> {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v.get(v.len() / 2).copied()
}

/// Median STUN Binding round trip from inside `node` to `addr`.
pub async fn stun_rtt(
    node: &LabNode,
    addr: SocketAddr,
    n: usize,
) -> Result<Duration, RawrLabError> {
    let sock = to_tokio(node.udp_bind("0.0.0.0:0")?)?;
    let mut buf = [0u8; 512];
    let mut v = Vec::new();
    for i in 0..n {
        let req = kyuu_rawr::wire::encode_binding_request(kyuu_stun::TransactionId([i as u8; 12]));
        let t = Instant::now();
        sock.send_to(&req, addr).await?;
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(1), sock.recv_from(&mut buf)).await
        {
            v.push(t.elapsed());
        }
    }
    median(v).ok_or_else(|| RawrLabError::Other(format!("no STUN answer from {addr}")))
}

impl RawrLab {
    /// Both peers, with explicit gateways (None: straight to the root).
    pub async fn connect_pair_with(
        &self,
        session: &[u8],
        ga: Option<SocketAddr>,
        gb: Option<SocketAddr>,
    ) -> Result<(LabPeer, LabPeer), RawrLabError> {
        let root = self.root_addr();
        let (a, b) = tokio::join!(
            lab_peer(&self.pa, session, root, ga),
            lab_peer(&self.pb, session, root, gb),
        );
        Ok((a?, b?))
    }
}

/// Builds the delayed lab (LAN 1 ms, ISP 10 ms, root 40 ms, symmetric NAT at home), connects the
/// two peers `rounds` times through RAWR and through the root only, and measures both.
/// `Ok(None)` when the lab cannot run here (SKIP printed).
pub async fn run_demo(
    rounds: usize,
    log: bool,
    server: LabServer,
) -> Result<Option<DemoReport>, RawrLabError> {
    let spec = LabSpec {
        server: server.clone(),
        delays: true,
        ..LabSpec::default()
    };
    let Some(lab) = RawrLab::build_or_skip("kyuu lab", spec).await? else {
        return Ok(None);
    };
    if log {
        println!("lab built: root 198.18.0.10, ISP node 198.18.1.1, homes behind symmetric NAT (198.19.1.0/24, 198.19.2.0/24)");
        println!("one-way delays: LAN 1 ms, home-ISP 10 ms, ISP-root 40 ms");
        match &server {
            LabServer::Coturn => println!("servers: RAWR nodes on :3479, coturn TURN on :3478"),
            LabServer::Kyuu(bin) => println!(
                "servers: `{} serve` on every node (STUN/TURN + RAWR on :3478)",
                bin.display()
            ),
        }
    }
    let root_stun = stun_rtt(&lab.pa, sa(ROOT_IP, TURN_PORT), 5).await?;
    let isp_stun = stun_rtt(&lab.pa, sa(ISP_IP, TURN_PORT), 5).await?;
    let rounds = rounds.max(1);
    let (mut rawr_rtt, mut root_rtt, mut rawr_setup, mut root_setup) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut route = String::new();
    let mut path = Vec::new();
    let mut root_dgrams = 0;
    for round in 0..rounds {
        let s: [u8; 16] = rand::random();
        let (a, b) = lab
            .connect_pair_with(&s, lab.gateway_a(), lab.gateway_b())
            .await?;
        rawr_setup.push(a.outcome.total_ms.max(b.outcome.total_ms));
        route = describe(&a.outcome.route);
        path = a
            .outcome
            .relay
            .as_ref()
            .map(|r| r.path.clone())
            .unwrap_or_default();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = lab.root_udp_in()?;
        let rtt = ping_pong(&a, &b, 20).await?;
        root_dgrams += lab.root_udp_in()?.saturating_sub(before);
        rawr_rtt.push(rtt.median());
        if log {
            println!(
                "round {}: RAWR: {route} via {}; setup {} ms; RTT {:.1} ms ({} samples)",
                round + 1,
                path.join(" -> "),
                a.outcome.total_ms.max(b.outcome.total_ms),
                ms(rtt.median()),
                rtt.samples.len()
            );
        }
        let s: [u8; 16] = rand::random();
        let (a, b) = lab.connect_pair_with(&s, None, None).await?;
        root_setup.push(a.outcome.total_ms.max(b.outcome.total_ms));
        let rtt = ping_pong(&a, &b, 20).await?;
        root_rtt.push(rtt.median());
        if log {
            println!(
                "round {}: plain TURN at the root: setup {} ms; RTT {:.1} ms",
                round + 1,
                a.outcome.total_ms.max(b.outcome.total_ms),
                ms(rtt.median())
            );
        }
    }
    let rawr = median(rawr_rtt).unwrap_or_default();
    let root = median(root_rtt).unwrap_or_default();
    let report = DemoReport {
        rawr_route: route,
        rawr_path: path,
        rawr_rtt_ms: ms(rawr),
        root_rtt_ms: ms(root),
        ratio: if root.is_zero() {
            0.0
        } else {
            rawr.as_secs_f64() / root.as_secs_f64()
        },
        rawr_setup_ms: median(rawr_setup.clone()).unwrap_or(0),
        root_setup_ms: median(root_setup).unwrap_or(0),
        root_stun_rtt_ms: ms(root_stun),
        meeting_stun_rtt_ms: ms(isp_stun),
        setup_budget_met: (median(rawr_setup.clone()).unwrap_or(u64::MAX) as f64)
            <= ms(root_stun) + ms(isp_stun),
        root_datagrams_during_rawr_session: root_dgrams,
        rounds,
    };
    drop(lab);
    Ok(Some(report))
}

impl DemoReport {
    /// Human summary.
    pub fn print(&self) {
        println!();
        println!(
            "peers met at:           {} ({})",
            self.rawr_route,
            self.rawr_path.join(" -> ")
        );
        println!("RTT through RAWR relay: {:.1} ms", self.rawr_rtt_ms);
        println!("RTT through the root:   {:.1} ms", self.root_rtt_ms);
        println!("ratio:                  {:.3} (goal <= 0.333)", self.ratio);
        println!(
            "setup (Exchange+Connect): {} ms via RAWR, {} ms root only; budget one root RTT + one meeting-node RTT = {:.1} ms: {}",
            self.rawr_setup_ms,
            self.root_setup_ms,
            self.root_stun_rtt_ms + self.meeting_stun_rtt_ms,
            if self.setup_budget_met { "MET" } else { "NOT MET" }
        );
        println!(
            "root datagrams during the RAWR session: {}",
            self.root_datagrams_during_rawr_session
        );
    }
}

/// CPU time a process has used, in nanoseconds (sum over its threads' `schedstat`).
pub fn process_cpu_ns(pid: u32) -> Result<u64, RawrLabError> {
    let mut total = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let e = e?;
        let s = std::fs::read_to_string(e.path().join("schedstat")).unwrap_or_default();
        total += s
            .split_whitespace()
            .next()
            .and_then(|x| x.parse::<u64>().ok())
            .unwrap_or(0);
    }
    Ok(total)
}

/// What [`relay_cost`] measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RelayCost {
    /// Packets A sent and B received through the meeting node.
    pub sent: usize,
    pub received: usize,
    /// The meeting node's CPU time per received packet, in microseconds.
    pub cpu_us_per_packet: f64,
    /// Datagrams the meeting node read from its relay sockets meanwhile (from `/metrics`).
    pub relay_socket_datagrams: f64,
}

/// Connects the two peers through the ISP node (a `kyuu serve` lab), sends `n` datagrams from
/// A to B through the relay (paced in bursts of 8 a millisecond), and measures the ISP process's CPU time per
/// packet delivered. With `spec.pair_in_process` the packets are handed over inside the node;
/// without, they go out of one relay socket and into the other.
pub async fn relay_cost(lab: &RawrLab, n: usize) -> Result<RelayCost, RawrLabError> {
    let s: [u8; 16] = rand::random();
    let (a, b) = lab
        .connect_pair_with(&s, lab.gateway_a(), lab.gateway_b())
        .await?;
    let (Some(ra), Some(rb)) = (&a.outcome.relay, &b.outcome.relay) else {
        return Err(RawrLabError::Other("the peers did not get a relay".into()));
    };
    let (mut xa, mut xb) = allocate_pair(&a, ra, &b, rb).await?;
    xa.permit(xb.relayed.ip()).await?;
    xb.permit(xa.relayed.ip()).await?;
    let to = xb.relayed;
    let pid = lab
        .node_pid("isp")
        .ok_or_else(|| RawrLabError::Other("relay_cost needs kyuu serve nodes".into()))?;
    // Metrics flush once a second.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sock0 = lab.node_metric("isp", "kyuu_relay_socket_datagrams_total")?;
    let cpu0 = process_cpu_ns(pid)?;
    // The receiver samples the node's CPU every 256 packets and at the last one, so the idle
    // wait for stragglers is not counted: (packets, CPU ns) at the last sample.
    let counter = tokio::spawn(async move {
        let mut got = 0usize;
        let mut sample = (0usize, cpu0);
        for _ in 0..10_000_000u64 {
            match tokio::time::timeout(Duration::from_millis(1500), xb.recv_from()).await {
                Ok(Ok(_)) => {
                    got += 1;
                    if got.is_multiple_of(256) || got == n {
                        sample = (got, process_cpu_ns(pid).unwrap_or(sample.1));
                    }
                }
                _ => break,
            }
        }
        (got, sample)
    });
    let payload = [0x5au8; 160];
    for i in 0..n {
        xa.send_to(&payload, to).await?;
        if i % 8 == 7 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    let (received, (sampled, cpu1)) = counter
        .await
        .map_err(|e| RawrLabError::Other(e.to_string()))?;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let sock1 = lab.node_metric("isp", "kyuu_relay_socket_datagrams_total")?;
    Ok(RelayCost {
        sent: n,
        received,
        cpu_us_per_packet: if sampled == 0 {
            0.0
        } else {
            (cpu1.saturating_sub(cpu0)) as f64 / 1000.0 / sampled as f64
        },
        relay_socket_datagrams: sock1 - sock0,
    })
}
