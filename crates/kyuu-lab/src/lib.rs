//! kyuu-lab: a network lab for kyuu's integration tests.
//!
//! Builds throw-away topologies out of Linux network namespaces: hosts,
//! L2 switches (a bridge in a namespace of its own), routers with nftables
//! NAT of each RFC 4787 kind, and links with delay, jitter, loss and a rate
//! limit. Link impairment does not use `tc netem` (the kernels kyuu is tested
//! on have no qdisc modules): a userspace forwarder thread relays Ethernet
//! frames between two veths over `AF_PACKET` sockets (see [`LinkSpec`]).
//!
//! Every lab network uses 198.18.0.0/15 (RFC 2544 benchmarking space); the
//! API rejects any other address. Needs root, `ip` (iproute2) and, for NAT,
//! `nft` (nftables).
//!
//! ```no_run
//! use std::time::Duration;
//! use kyuu_lab::{Lab, LinkSpec, NatKind};
//!
//! # fn main() -> Result<(), kyuu_lab::LabError> {
//! let lab = Lab::new()?;
//! let wan = lab.switch("wan")?;
//! let lan = lab.switch("lan")?;
//!
//! let server = lab.host("srv")?;
//! let eth = server.attach(&wan, "198.18.0.10/24")?;
//! server.add_addr(&eth, "198.18.0.11/24")?; // second address, for RFC 5780
//!
//! let nat = lab.router("nat1", NatKind::PortRestrictedCone)?;
//! nat.wan(&wan, "198.18.0.1/24")?;
//! nat.lan(&lan, "198.19.1.1/24")?;
//!
//! let client = lab.host("cli")?;
//! // 10 ms each way, 1% loss, between the client and the LAN switch.
//! client.attach_with(&lan, "198.19.1.10/24", LinkSpec::delay(Duration::from_millis(10)).loss(0.01))?;
//! client.route_default("198.19.1.1")?;
//!
//! // A process inside a namespace, killed when `child` or `lab` drops:
//! let mut cmd = server.command("kyuu");
//! cmd.args(["serve", "--config", "/tmp/x.toml"]);
//! let child = server.spawn(cmd)?;
//!
//! // A socket created inside the namespace, usable from any thread after:
//! let sock = client.in_ns(|| std::net::UdpSocket::bind("0.0.0.0:0"))??;
//! sock.send_to(b"hi", "198.18.0.10:3478")?;
//! # drop(child);
//! # Ok(()) }
//! ```
//!
//! # Names and parallel tests
//!
//! Each [`Lab`] gets a prefix `kyuu-<pid>-<n>`; its namespaces are
//! `kyuu-<pid>-<n>-<name>` (switches, hosts, routers) and
//! `kyuu-<pid>-<n>-l<k>` (one per impaired link). Interfaces are created
//! directly inside their namespaces (`eth<i>` on nodes, `p<i>` on switches,
//! `fa`/`fb` in link namespaces), so nothing touches the root namespace and
//! labs in parallel tests never collide. [`Lab::new`] also deletes `kyuu-*`
//! namespaces whose process is gone ([`Lab::cleanup_stale`]).
//!
//! # NAT routers
//!
//! [`Lab::router`] enables forwarding; [`Router::wan`] installs the
//! nftables table [`NFT_TABLE`] for its [`NatKind`] (see [`nft_script`]):
//!
//! * all translating kinds: `oifname WAN snat ip to WAN_ADDR` (conntrack keeps
//!   the inside port when it can, so the mapping is endpoint-independent);
//!   [`NatKind::Symmetric`] adds `fully-random` (a random port per 5-tuple);
//! * [`NatKind::FullCone`] / [`NatKind::RestrictedCone`] also learn, after
//!   source NAT, a dynamic map `mapped port -> inside addr . port` and a set
//!   `mapped port . remote addr`, and DNAT new inbound UDP to `WAN_ADDR:port`
//!   through the map (restricted: only from remote addresses in the set);
//! * [`NatKind::PortRestrictedCone`] and Symmetric filter by conntrack alone.
//!
//! The inbound (cone) paths are UDP only; learned entries expire
//! [`MAPPING_TIMEOUT_SECS`] after the last outbound packet. No hairpinning.
//! Every namespace has IPv6 disabled: the lab is IPv4 only.
//!
//! # Teardown
//!
//! Dropping the [`Lab`] kills every child it spawned (SIGKILL to the child's
//! process group, by pid), stops and joins every forwarder thread, and
//! deletes every namespace it created. Sockets created with
//! [`Node::in_ns`] keep their (now unnamed) namespace alive until they close.
//!
//! # Tests that need the lab
//!
//! Use [`lab_or_skip`]: without root, `ip` or `nft` it prints a `SKIP` line
//! and returns `None`, unless `KYUU_LAB_REQUIRED=1` (set by CI), in which
//! case it panics so a broken CI machine cannot pass by skipping.

mod link;
mod nat;
mod process;
mod sys;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

pub use link::{LinkHandle, LinkSpec, LinkStats};
pub use nat::{nft_script, Dependence, NatKind, MAPPING_TIMEOUT_SECS, NFT_TABLE};
pub use process::LabChild;

use link::Forwarder;

/// Prefix of every namespace any lab creates.
pub const NS_PREFIX: &str = "kyuu-";
/// Where iproute2 mounts named network namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Environment variable that turns a missing prerequisite into a failure.
pub const REQUIRED_ENV: &str = "KYUU_LAB_REQUIRED";
/// Bound on any `ip`/`nft` invocation the lab makes itself.
const TOOL_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on waiting for a new interface to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Errors from building or running a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// The lab needs root (namespaces, veths, nftables).
    #[error("the network lab needs root (effective uid 0)")]
    NotRoot,
    /// A required tool is not installed.
    #[error("the network lab needs `{tool}` on PATH (apt-get install {package}): {source}")]
    MissingTool {
        /// Binary name.
        tool: &'static str,
        /// Debian package providing it.
        package: &'static str,
        /// Why running it failed.
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: ExitStatus,
        /// Its trimmed stderr.
        stderr: String,
    },
    /// A command could not be started.
    #[error("cannot start `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: io::Error,
    },
    /// Some other OS error.
    #[error("{context}: {source}")]
    Io {
        /// What the lab was doing.
        context: String,
        /// The OS error.
        source: io::Error,
    },
    /// A bounded wait ran out.
    #[error("timed out: {what}")]
    Timeout {
        /// What was waited for.
        what: String,
    },
    /// An address or prefix that is malformed or outside 198.18.0.0/15.
    #[error("address `{addr}` rejected: {reason}")]
    Address {
        /// The offending text.
        addr: String,
        /// Why.
        reason: &'static str,
    },
    /// A node name that is empty, too long or not `[a-z0-9]`.
    #[error("invalid lab node name `{0}`: use 1-20 characters [a-z0-9]")]
    Name(String),
    /// Misuse of the API (e.g. a second WAN on a router).
    #[error("{0}")]
    Usage(String),
    /// The lab was already dropped.
    #[error("the lab has been torn down")]
    TornDown,
    /// A closure run in a namespace panicked.
    #[error("a thread running inside namespace {0} panicked")]
    ThreadPanicked(String),
}

impl LabError {
    fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }

    /// True for errors that mean "this machine cannot run the lab"
    /// (not root, a tool missing) rather than a bug.
    pub fn is_missing_prerequisite(&self) -> bool {
        matches!(self, LabError::NotRoot | LabError::MissingTool { .. })
    }
}

impl From<io::Error> for LabError {
    fn from(e: io::Error) -> Self {
        Self::io("I/O", e)
    }
}

/// Whether `KYUU_LAB_REQUIRED=1` is set.
pub fn lab_required() -> bool {
    std::env::var(REQUIRED_ENV).is_ok_and(|v| v == "1")
}

/// A lab for a test, or `None` (after printing `SKIP <test>: <why>`) when
/// this machine cannot run one: not root, or `ip`/`nft` missing.
///
/// # Panics
///
/// When the lab cannot be built and `KYUU_LAB_REQUIRED=1`, or when it fails
/// for a reason other than a missing prerequisite.
pub fn lab_or_skip(test: &str) -> Option<Lab> {
    let lab = Lab::check_nft().and_then(|()| Lab::new());
    match lab {
        Ok(lab) => Some(lab),
        Err(e) if e.is_missing_prerequisite() && !lab_required() => {
            println!("SKIP {test}: {e} (set {REQUIRED_ENV}=1 to make this a failure)");
            None
        }
        Err(e) => panic!("{test}: cannot build the network lab: {e}"),
    }
}

/// An IPv4 address with prefix length, inside 198.18.0.0/15.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length.
    pub len: u8,
}

fn check_lab_addr(addr: Ipv4Addr, text: &str) -> Result<Ipv4Addr, LabError> {
    let [a, b, ..] = addr.octets();
    if a == 198 && (b == 18 || b == 19) {
        Ok(addr)
    } else {
        Err(LabError::Address {
            addr: text.to_owned(),
            reason: "lab addresses must be in 198.18.0.0/15",
        })
    }
}

impl FromStr for Cidr {
    type Err = LabError;

    fn from_str(s: &str) -> Result<Self, LabError> {
        let bad = |reason| LabError::Address {
            addr: s.to_owned(),
            reason,
        };
        let (a, l) = s.split_once('/').ok_or_else(|| bad("expected ADDR/LEN"))?;
        let addr = Ipv4Addr::from_str(a).map_err(|_| bad("not an IPv4 address"))?;
        let len = u8::from_str(l)
            .ok()
            .filter(|l| *l <= 32)
            .ok_or_else(|| bad("bad prefix length"))?;
        check_lab_addr(addr, s)?;
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn parse_addr(s: &str) -> Result<Ipv4Addr, LabError> {
    let addr = Ipv4Addr::from_str(s).map_err(|_| LabError::Address {
        addr: s.to_owned(),
        reason: "not an IPv4 address",
    })?;
    check_lab_addr(addr, s)
}

fn check_name(name: &str) -> Result<(), LabError> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(LabError::Name(name.to_owned()))
    }
}

fn ip_cmd() -> Command {
    Command::new("ip")
}

fn ip_ns(ns: &str, args: &[&str]) -> Result<Output, LabError> {
    let mut cmd = ip_cmd();
    cmd.arg("-n").arg(ns).args(args);
    process::run_checked(cmd, None, TOOL_TIMEOUT)
}

/// Wait (bounded) until `ifname` in `ns` is operationally up and, for a
/// bridge port, forwarding. Until the kernel's link watcher has run, a new
/// veth drops everything sent on it (its qdisc is still the no-op one) and
/// a bridge port does not forward, so traffic in the first tens of
/// milliseconds would vanish.
fn wait_ready(ns: &str, ifname: &str, bridge_port: bool) -> Result<(), LabError> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let out = ip_ns(ns, &["-d", "-o", "link", "show", "dev", ifname])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let up = text.contains(" state UP ");
        let fwd = !bridge_port || text.contains("bridge_slave state forwarding");
        if up && fwd {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(LabError::Timeout {
                what: format!("{ifname} in {ns} coming up: {}", text.trim()),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn wait_link_ready(link_ns: Option<&str>) -> Result<(), LabError> {
    if let Some(ns) = link_ns {
        wait_ready(ns, "fa", false)?;
        wait_ready(ns, "fb", false)?;
    }
    Ok(())
}

fn ns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Run `f` on a fresh thread inside namespace `ns` and wait for it.
fn in_ns_path<F, R>(ns: &str, f: F) -> Result<R, LabError>
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    let path = ns_path(ns);
    let joined = std::thread::scope(|s| {
        let handle = s.spawn(move || sys::enter_netns(&path).map(|()| f()));
        handle.join()
    });
    joined
        .map_err(|_| LabError::ThreadPanicked(ns.to_owned()))?
        .map_err(|e| LabError::io(format!("entering namespace {ns}"), e))
}

/// Write a sysctl (`net.ipv4.ip_forward`) inside namespace `ns`.
fn sysctl_ns(ns: &str, key: &str, value: &str) -> Result<(), LabError> {
    let path = Path::new("/proc/sys").join(key.replace('.', "/"));
    in_ns_path(ns, || std::fs::write(&path, value))?
        .map_err(|e| LabError::io(format!("sysctl {key}={value} in {ns}"), e))
}

struct Inner {
    prefix: String,
    links: AtomicU32,
    state: Mutex<State>,
    children: Mutex<Vec<Weak<Mutex<Option<std::process::Child>>>>>,
}

#[derive(Default)]
struct State {
    namespaces: Vec<String>,
    forwarders: Vec<Forwarder>,
    torn_down: bool,
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Create namespace `<prefix>-<suffix>` with loopback up and IPv6 off
    /// (the lab is IPv4 only; this keeps router solicitations and DAD out of
    /// captures and forwarders).
    fn add_ns(&self, suffix: &str) -> Result<String, LabError> {
        let ns = format!("{}-{suffix}", self.prefix);
        {
            let mut st = self.state();
            if st.torn_down {
                return Err(LabError::TornDown);
            }
            let mut cmd = ip_cmd();
            cmd.args(["netns", "add", &ns]);
            process::run_checked(cmd, None, TOOL_TIMEOUT)?;
            st.namespaces.push(ns.clone());
        }
        ip_ns(&ns, &["link", "set", "lo", "up"])?;
        for key in [
            "net.ipv6.conf.all.disable_ipv6",
            "net.ipv6.conf.default.disable_ipv6",
        ] {
            // Absent when the kernel has no IPv6; nothing to disable then.
            let _ = sysctl_ns(&ns, key, "1");
        }
        Ok(ns)
    }

    /// Join `if_a` in `ns_a` and `if_b` in `ns_b`: a veth pair, or with a
    /// spec, two veth pairs into a link namespace with a forwarder between.
    fn connect(
        &self,
        ns_a: &str,
        if_a: &str,
        ns_b: &str,
        if_b: &str,
        spec: Option<LinkSpec>,
    ) -> Result<(Option<LinkHandle>, Option<String>), LabError> {
        let Some(spec) = spec else {
            ip_ns(
                ns_a,
                &[
                    "link", "add", if_a, "type", "veth", "peer", "name", if_b, "netns", ns_b,
                ],
            )?;
            return Ok((None, None));
        };
        let k = self.links.fetch_add(1, Ordering::Relaxed);
        let link_ns = self.add_ns(&format!("l{k}"))?;
        ip_ns(
            ns_a,
            &[
                "link", "add", if_a, "type", "veth", "peer", "name", "fa", "netns", &link_ns,
            ],
        )?;
        ip_ns(
            ns_b,
            &[
                "link", "add", if_b, "type", "veth", "peer", "name", "fb", "netns", &link_ns,
            ],
        )?;
        for (ns, ifname) in [
            (ns_a, if_a),
            (ns_b, if_b),
            (link_ns.as_str(), "fa"),
            (link_ns.as_str(), "fb"),
        ] {
            in_ns_path(ns, || sys::disable_offloads(ifname))?
                .map_err(|e| LabError::io(format!("disabling offloads on {ifname} in {ns}"), e))?;
        }
        ip_ns(&link_ns, &["link", "set", "fa", "up"])?;
        ip_ns(&link_ns, &["link", "set", "fb", "up"])?;
        let (fwd, handle) = Forwarder::start(ns_path(&link_ns), "fa".into(), "fb".into(), spec)?;
        self.state().forwarders.push(fwd);
        Ok((Some(handle), Some(link_ns)))
    }

    fn teardown(&self) {
        let namespaces = {
            let mut st = self.state();
            if st.torn_down {
                return;
            }
            st.torn_down = true;
            let children =
                std::mem::take(&mut *self.children.lock().unwrap_or_else(PoisonError::into_inner));
            for child in children.iter().filter_map(Weak::upgrade) {
                process::reap(&child);
            }
            // Dropping a forwarder stops and joins its thread.
            st.forwarders.clear();
            std::mem::take(&mut st.namespaces)
        };
        for ns in namespaces.iter().rev() {
            let mut cmd = ip_cmd();
            cmd.args(["netns", "delete", ns]);
            if let Err(e) = process::run_checked(cmd, None, TOOL_TIMEOUT) {
                eprintln!("kyuu-lab: teardown: {e}");
            }
        }
    }
}

/// A network lab: owns every namespace, forwarder and child process built
/// through it, and removes them all when dropped.
pub struct Lab {
    inner: Arc<Inner>,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

impl Lab {
    /// Check prerequisites (root, `ip`), remove stale namespaces of dead
    /// processes, and start an empty lab with a unique name prefix.
    pub fn new() -> Result<Self, LabError> {
        Self::check()?;
        if let Err(e) = Self::cleanup_stale() {
            eprintln!("kyuu-lab: stale namespace cleanup: {e}");
        }
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("{NS_PREFIX}{}-{n}", std::process::id());
        Ok(Self {
            inner: Arc::new(Inner {
                prefix,
                links: AtomicU32::new(0),
                state: Mutex::new(State::default()),
                children: Mutex::new(Vec::new()),
            }),
        })
    }

    /// Root and `ip` present?
    pub fn check() -> Result<(), LabError> {
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        check_tool("ip", "iproute2", &["-V"])
    }

    /// `nft` present? (Needed by NAT routers.)
    pub fn check_nft() -> Result<(), LabError> {
        if !sys::is_root() {
            return Err(LabError::NotRoot);
        }
        check_tool("nft", "nftables", &["--version"])
    }

    /// Delete `kyuu-<pid>-*` namespaces whose process no longer exists.
    /// Returns how many were deleted.
    pub fn cleanup_stale() -> Result<usize, LabError> {
        let dir = match std::fs::read_dir(NETNS_DIR) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(LabError::io(format!("reading {NETNS_DIR}"), e)),
        };
        let mut deleted = 0;
        for entry in dir.take(100_000).flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(NS_PREFIX) else {
                continue;
            };
            let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
                continue;
            }
            let mut cmd = ip_cmd();
            cmd.args(["netns", "delete", &name]);
            if process::run_checked(cmd, None, TOOL_TIMEOUT).is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// This lab's namespace name prefix (`kyuu-<pid>-<n>`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    fn node(&self, name: &str) -> Result<Node, LabError> {
        check_name(name)?;
        let ns = self.inner.add_ns(name)?;
        Ok(Node {
            lab: Arc::clone(&self.inner),
            name: name.to_owned(),
            ns,
            next_if: Arc::new(AtomicU32::new(0)),
        })
    }

    /// An end host.
    pub fn host(&self, name: &str) -> Result<Node, LabError> {
        self.node(name)
    }

    /// An L2 segment: a bridge `br0` in a namespace of its own.
    pub fn switch(&self, name: &str) -> Result<Switch, LabError> {
        let node = self.node(name)?;
        ip_ns(
            &node.ns,
            &["link", "add", "br0", "type", "bridge", "stp_state", "0"],
        )?;
        ip_ns(&node.ns, &["link", "set", "br0", "up"])?;
        Ok(Switch { node })
    }

    /// A router (IP forwarding on) applying `kind` of NAT on the interface
    /// given to [`Router::wan`].
    pub fn router(&self, name: &str, kind: NatKind) -> Result<Router, LabError> {
        if kind != NatKind::None {
            Self::check_nft()?;
        }
        let node = self.node(name)?;
        sysctl_ns(&node.ns, "net.ipv4.ip_forward", "1")?;
        Ok(Router {
            node,
            kind,
            wan: Arc::new(AtomicBool::new(false)),
        })
    }

    /// A point-to-point link between two nodes, each end with an address.
    pub fn connect(
        &self,
        a: &Node,
        a_cidr: &str,
        b: &Node,
        b_cidr: &str,
        spec: Option<LinkSpec>,
    ) -> Result<(Iface, Iface), LabError> {
        let (ca, cb) = (Cidr::from_str(a_cidr)?, Cidr::from_str(b_cidr)?);
        let (ia, ib) = (a.next_ifname(), b.next_ifname());
        let (link, link_ns) = self.inner.connect(&a.ns, &ia, &b.ns, &ib, spec)?;
        a.configure(&ia, ca)?;
        b.configure(&ib, cb)?;
        wait_ready(&a.ns, &ia, false)?;
        wait_ready(&b.ns, &ib, false)?;
        wait_link_ready(link_ns.as_deref())?;
        Ok((
            Iface {
                name: ia,
                cidr: ca,
                link: link.clone(),
                node_ns: a.ns.clone(),
            },
            Iface {
                name: ib,
                cidr: cb,
                link,
                node_ns: b.ns.clone(),
            },
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.inner.teardown();
    }
}

fn check_tool(tool: &'static str, package: &'static str, args: &[&str]) -> Result<(), LabError> {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    match process::run_checked(cmd, None, TOOL_TIMEOUT) {
        Ok(_) => Ok(()),
        Err(LabError::Spawn { source, .. }) => Err(LabError::MissingTool {
            tool,
            package,
            source,
        }),
        Err(e) => Err(e),
    }
}

/// An interface of a node.
#[derive(Clone, Debug)]
pub struct Iface {
    /// Interface name inside the node's namespace (`eth0`, ...).
    pub name: String,
    /// Its first address.
    pub cidr: Cidr,
    /// The forwarder of this link, when it was attached with a [`LinkSpec`].
    pub link: Option<LinkHandle>,
    node_ns: String,
}

impl Iface {
    /// The interface's first address.
    pub fn addr(&self) -> Ipv4Addr {
        self.cidr.addr
    }

    /// Take the interface down (a hard link failure).
    pub fn down(&self) -> Result<(), LabError> {
        ip_ns(&self.node_ns, &["link", "set", &self.name, "down"]).map(drop)
    }

    /// Bring the interface back up.
    pub fn up(&self) -> Result<(), LabError> {
        ip_ns(&self.node_ns, &["link", "set", &self.name, "up"]).map(drop)
    }
}

/// A namespace in the lab: a host, or the inside of a router or switch.
/// Cheap to clone; all clones name the same namespace.
#[derive(Clone)]
pub struct Node {
    lab: Arc<Inner>,
    name: String,
    ns: String,
    next_if: Arc<AtomicU32>,
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node").field("ns", &self.ns).finish()
    }
}

impl Node {
    /// The short name given at creation.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace name (for `ip netns exec NAME ...`).
    pub fn ns_name(&self) -> &str {
        &self.ns
    }

    /// The namespace mount (`/run/netns/NAME`), for `setns(2)`.
    pub fn ns_path(&self) -> PathBuf {
        ns_path(&self.ns)
    }

    fn next_ifname(&self) -> String {
        format!("eth{}", self.next_if.fetch_add(1, Ordering::Relaxed))
    }

    fn configure(&self, ifname: &str, cidr: Cidr) -> Result<(), LabError> {
        ip_ns(&self.ns, &["addr", "add", &cidr.to_string(), "dev", ifname])?;
        ip_ns(&self.ns, &["link", "set", ifname, "up"]).map(drop)
    }

    /// Plug a new interface into `switch` with address `cidr`.
    pub fn attach(&self, switch: &Switch, cidr: &str) -> Result<Iface, LabError> {
        self.attach_inner(switch, cidr, None)
    }

    /// Plug a new interface into `switch` through an impaired link.
    pub fn attach_with(
        &self,
        switch: &Switch,
        cidr: &str,
        spec: LinkSpec,
    ) -> Result<Iface, LabError> {
        self.attach_inner(switch, cidr, Some(spec))
    }

    fn attach_inner(
        &self,
        switch: &Switch,
        cidr: &str,
        spec: Option<LinkSpec>,
    ) -> Result<Iface, LabError> {
        let cidr = Cidr::from_str(cidr)?;
        let ifname = self.next_ifname();
        let port = format!("p{}", switch.node.next_if.fetch_add(1, Ordering::Relaxed));
        let (link, link_ns) = self
            .lab
            .connect(&self.ns, &ifname, &switch.node.ns, &port, spec)?;
        ip_ns(&switch.node.ns, &["link", "set", &port, "master", "br0"])?;
        ip_ns(&switch.node.ns, &["link", "set", &port, "up"])?;
        self.configure(&ifname, cidr)?;
        wait_ready(&self.ns, &ifname, false)?;
        wait_ready(&switch.node.ns, &port, true)?;
        wait_link_ready(link_ns.as_deref())?;
        Ok(Iface {
            name: ifname,
            cidr,
            link,
            node_ns: self.ns.clone(),
        })
    }

    /// Add another address to `iface` (e.g. RFC 5780's alternate address).
    pub fn add_addr(&self, iface: &Iface, cidr: &str) -> Result<(), LabError> {
        let cidr = Cidr::from_str(cidr)?;
        ip_ns(
            &self.ns,
            &["addr", "add", &cidr.to_string(), "dev", &iface.name],
        )
        .map(drop)
    }

    /// Default route via `gateway`.
    pub fn route_default(&self, gateway: &str) -> Result<(), LabError> {
        let gw = parse_addr(gateway)?;
        ip_ns(
            &self.ns,
            &["route", "replace", "default", "via", &gw.to_string()],
        )
        .map(drop)
    }

    /// Route `dst` (a prefix in 198.18.0.0/15) via `gateway`.
    pub fn route(&self, dst: &str, gateway: &str) -> Result<(), LabError> {
        let dst = Cidr::from_str(dst)?;
        let gw = parse_addr(gateway)?;
        ip_ns(
            &self.ns,
            &["route", "replace", &dst.to_string(), "via", &gw.to_string()],
        )
        .map(drop)
    }

    /// Run `ip -n NS <args>` and return its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String, LabError> {
        let out = ip_ns(&self.ns, args)?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Load an nftables script (`nft -f -`) in this namespace.
    pub fn nft(&self, script: &str) -> Result<(), LabError> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "nft", "-f", "-"]);
        process::run_checked(cmd, Some(script.as_bytes()), TOOL_TIMEOUT).map(drop)
    }

    /// Set a sysctl (`net.ipv4.ip_forward`, `1`) in this namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), LabError> {
        sysctl_ns(&self.ns, key, value)
    }

    /// A command that runs `program` inside this namespace
    /// (`ip netns exec NS program`). Add arguments, then pass it to
    /// [`Node::spawn`] or [`Node::run`].
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Start a command from [`Node::command`]; it is killed when the returned
    /// child or the lab is dropped.
    pub fn spawn(&self, cmd: Command) -> Result<LabChild, LabError> {
        if self.lab.state().torn_down {
            return Err(LabError::TornDown);
        }
        LabChild::spawn(cmd, &self.lab.children)
    }

    /// Run a command from [`Node::command`] to completion with captured
    /// output, killing it after `timeout`. Does not check the exit status.
    pub fn run(&self, mut cmd: Command, timeout: Duration) -> Result<Output, LabError> {
        process::run_timeout(&mut cmd, None, timeout)
    }

    /// Run `f` on a new thread inside this namespace and return its result.
    /// Sockets created by `f` stay in this namespace wherever they are used later.
    pub fn in_ns<F, R>(&self, f: F) -> Result<R, LabError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        in_ns_path(&self.ns, f)
    }

    /// Start `f` on a new thread inside this namespace. The thread is not
    /// stopped by the lab: give it its own bound (deadline, stop flag).
    pub fn spawn_thread<F, R>(
        &self,
        f: F,
    ) -> Result<std::thread::JoinHandle<Result<R, LabError>>, LabError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let path = self.ns_path();
        let ns = self.ns.clone();
        std::thread::Builder::new()
            .name(format!("kyuu-lab-{}", self.name))
            .spawn(move || {
                sys::enter_netns(&path)
                    .map_err(|e| LabError::io(format!("entering namespace {ns}"), e))?;
                Ok(f())
            })
            .map_err(|e| LabError::io("spawning namespace thread", e))
    }

    /// A UDP socket bound to `addr` inside this namespace.
    pub fn udp_bind(&self, addr: &str) -> Result<UdpSocket, LabError> {
        self.in_ns(|| UdpSocket::bind(addr))?
            .map_err(|e| LabError::io(format!("udp bind {addr} in {}", self.ns), e))
    }

    /// A TCP listener bound to `addr` inside this namespace.
    pub fn tcp_listen(&self, addr: &str) -> Result<TcpListener, LabError> {
        self.in_ns(|| TcpListener::bind(addr))?
            .map_err(|e| LabError::io(format!("tcp listen {addr} in {}", self.ns), e))
    }
}

/// An L2 segment (Linux bridge). Nodes join it with [`Node::attach`].
#[derive(Clone, Debug)]
pub struct Switch {
    node: Node,
}

impl Switch {
    /// The switch's namespace name.
    pub fn ns_name(&self) -> &str {
        &self.node.ns
    }

    /// Run `f` on a new thread inside the switch's namespace (see [`Node::in_ns`]).
    pub fn in_ns<F, R>(&self, f: F) -> Result<R, LabError>
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        self.node.in_ns(f)
    }
}

/// A router namespace: IP forwarding, and NAT of its [`NatKind`] on the
/// WAN interface. Derefs to [`Node`] for routes, commands and so on.
#[derive(Clone, Debug)]
pub struct Router {
    node: Node,
    kind: NatKind,
    wan: Arc<AtomicBool>,
}

impl Deref for Router {
    type Target = Node;

    fn deref(&self) -> &Node {
        &self.node
    }
}

impl Router {
    /// The NAT kind.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    /// The router as a plain node.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Attach the outside interface (once) and install the NAT rules on it.
    pub fn wan(&self, switch: &Switch, cidr: &str) -> Result<Iface, LabError> {
        self.wan_inner(switch, cidr, None)
    }

    /// [`Router::wan`] through an impaired link.
    pub fn wan_with(&self, switch: &Switch, cidr: &str, spec: LinkSpec) -> Result<Iface, LabError> {
        self.wan_inner(switch, cidr, Some(spec))
    }

    fn wan_inner(
        &self,
        switch: &Switch,
        cidr: &str,
        spec: Option<LinkSpec>,
    ) -> Result<Iface, LabError> {
        if self.wan.swap(true, Ordering::SeqCst) {
            return Err(LabError::Usage(format!(
                "router {} already has a WAN interface",
                self.node.name
            )));
        }
        let iface = self.node.attach_inner(switch, cidr, spec)?;
        if let Some(script) = nft_script(self.kind, &iface.name, iface.addr()) {
            self.node.nft(&script)?;
        }
        Ok(iface)
    }

    /// Attach an inside interface.
    pub fn lan(&self, switch: &Switch, cidr: &str) -> Result<Iface, LabError> {
        self.node.attach(switch, cidr)
    }

    /// [`Router::lan`] through an impaired link.
    pub fn lan_with(&self, switch: &Switch, cidr: &str, spec: LinkSpec) -> Result<Iface, LabError> {
        self.node.attach_with(switch, cidr, spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_only_in_lab_range() {
        assert!("198.18.0.10/24".parse::<Cidr>().is_ok());
        assert!("198.19.255.1/16".parse::<Cidr>().is_ok());
        assert!("10.0.0.1/8".parse::<Cidr>().is_err());
        assert!("198.20.0.1/24".parse::<Cidr>().is_err());
        assert!("198.18.0.1".parse::<Cidr>().is_err());
        assert!("198.18.0.1/33".parse::<Cidr>().is_err());
        assert!(parse_addr("127.0.0.1").is_err());
    }

    #[test]
    fn names() {
        assert!(check_name("srv1").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("Srv").is_err());
        assert!(check_name("a-b").is_err());
    }
}

#[cfg(test)]
mod send_sync {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_move_between_threads() {
        assert_send_sync::<super::Lab>();
        assert_send_sync::<super::Node>();
        assert_send_sync::<super::Router>();
        assert_send_sync::<super::Switch>();
        assert_send_sync::<super::Iface>();
        assert_send_sync::<super::LabChild>();
    }
}
