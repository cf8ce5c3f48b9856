//! kyuu's kernel fast path for TURN channels: an XDP program (`src/bpf/turn_router.bpf.c`,
//! compiled by `build.rs`) that relays ChannelData of UDP clients to peers and peer datagrams
//! back as ChannelData, and answers plain STUN Binding requests to the listeners
//! ([`FastPath::enable_binding`]), and the userspace side that loads it, fills its maps and
//! reads its counters.
//!
//! Userspace stays the authority: [`FastPath::install`] is called when the TURN core says a
//! channel may be relayed in the kernel, [`FastPath::remove`] when it may not any more. Anything
//! the program does not find in its maps goes up the stack unchanged.
//!
//! Built without clang, [`FastPath::attach`] returns [`FastPathError::Unavailable`].

mod steer;
pub use steer::{SteerError, Steering, MAX_SOCKETS as STEER_MAX_SOCKETS};

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues};

/// Entries per direction map (the program's `MAX_ENTRIES`).
pub const MAX_ENTRIES: u32 = 65_536;

/// Why the fast path could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FastPathError {
    /// This build has no eBPF object (no clang at build time).
    #[error("unavailable: {0}")]
    Unavailable(&'static str),
    #[error("interface {0}: {1}")]
    Interface(String, String),
    #[error("loading the XDP program: {0}")]
    Load(String),
    #[error("attaching XDP to {0}: {1}")]
    Attach(String, String),
    #[error("eBPF map {0}: {1}")]
    Map(&'static str, String),
    #[error("all {MAX_ENTRIES} fast path counter slots are in use")]
    Full,
}

/// Why this build has no fast path, if it has none.
pub fn unavailable() -> Option<&'static str> {
    #[cfg(kyuu_ebpf)]
    {
        None
    }
    #[cfg(not(kyuu_ebpf))]
    {
        Some(option_env!("KYUU_EBPF_UNAVAILABLE").unwrap_or("built without clang"))
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds: the clock of `bpf_ktime_get_ns` (and of
/// `std::time::Instant` on Linux).
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// One channel to relay in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Channel {
    /// The client's address and the server address it sends to (the UDP listener).
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub number: u16,
    /// The allocation's relayed address and the channel's peer (same family as `client`).
    pub relay: SocketAddr,
    pub peer: SocketAddr,
    /// CLOCK_MONOTONIC nanoseconds after which the kernel hands packets back to userspace.
    pub expires_ns: u64,
    /// Which directions to relay (a direction whose `max_bps` budget is spent stays in userspace).
    pub to_peer: bool,
    pub to_client: bool,
}

/// Packets and payload bytes the kernel relayed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub packets: u64,
    pub bytes: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct C2pKey {
    client_ip: [u8; 16],
    server_ip: [u8; 16],
    client_port: [u8; 2],
    server_port: [u8; 2],
    channel: [u8; 2],
    pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct C2pVal {
    relay_ip: [u8; 16],
    peer_ip: [u8; 16],
    relay_port: [u8; 2],
    peer_port: [u8; 2],
    slot: u32,
    expires_ns: u64,
    /// Learned by the program; kept across updates.
    peer_mac: [u8; 6],
    pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct P2cKey {
    peer_ip: [u8; 16],
    relay_ip: [u8; 16],
    peer_port: [u8; 2],
    relay_port: [u8; 2],
    pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct P2cVal {
    client_ip: [u8; 16],
    server_ip: [u8; 16],
    client_port: [u8; 2],
    server_port: [u8; 2],
    channel: [u8; 2],
    pad: u16,
    slot: u32,
    pad2: u32,
    expires_ns: u64,
    /// Learned by the program; kept across updates.
    client_mac: [u8; 6],
    pad3: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Counter {
    packets: u64,
    bytes: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct Config {
    max_ip_len: u32,
    flags: u32,
}

/// SOFTWARE attribute bytes the program can include (its `SW_MAX`).
pub const SOFTWARE_MAX: usize = 132;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
struct ListenerKey {
    ip: [u8; 16],
    port: [u8; 2],
    pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct BindingCfg {
    enabled: u32,
    rate: u32,
    burst: u32,
    sw_len: u32,
    sw: [u8; SOFTWARE_MAX],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct BindingCounter {
    answered: u64,
    rate_limited: u64,
}

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and byte arrays laid out
// without implicit padding (explicit `pad` fields fill the gaps), so any bit pattern is a valid
// value and the layout matches the C structs in `turn_router.bpf.c` byte for byte.
#[allow(unsafe_code)]
unsafe impl aya::Pod for C2pKey {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for C2pVal {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for P2cKey {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for P2cVal {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for Counter {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for Config {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for ListenerKey {}
// SAFETY: as above (4 u32 then 132 bytes: 148, a multiple of 4).
#[allow(unsafe_code)]
unsafe impl aya::Pod for BindingCfg {}
// SAFETY: as above.
#[allow(unsafe_code)]
unsafe impl aya::Pod for BindingCounter {}

/// What the kernel answers STUN Binding requests with, and how often per source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindingConfig {
    /// The UDP listeners whose plain Binding requests the kernel answers. A wildcard address
    /// stands for each address of the interface the program is attached to.
    pub listeners: Vec<SocketAddr>,
    /// The SOFTWARE value userspace puts in its answers (empty: none).
    pub software: String,
    /// The per-source limit on unauthenticated answers (`turn.unauth_rate`, 0: unlimited) and
    /// its burst (`turn.unauth_burst`).
    pub rate: u32,
    pub burst: u32,
}

/// Binding requests the kernel answered, and dropped over the per-source limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bindings {
    pub answered: u64,
    pub rate_limited: u64,
}

/// Swap MAC addresses instead of asking the FIB (for `BPF_PROG_TEST_RUN`, which has no ingress
/// interface).
const FLAG_SWAP_MACS: u32 = 1;

fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The MTU of `interface`: from sysfs, or from `ip -o link` where sysfs belongs to another
/// network namespace (a thread that entered one with `setns` sees the old `/sys`).
fn interface_mtu(interface: &str) -> Result<u32, FastPathError> {
    let err = |e: String| FastPathError::Interface(interface.into(), e);
    let text = match std::fs::read_to_string(format!("/sys/class/net/{interface}/mtu")) {
        Ok(t) => t,
        Err(sys) => {
            let out = std::process::Command::new("ip")
                .args(["-o", "link", "show", "dev", interface])
                .output()
                .map_err(|e| err(format!("{sys}; ip link: {e}")))?;
            let line = String::from_utf8_lossy(&out.stdout).to_string();
            let mut words = line.split_whitespace();
            words
                .find(|w| *w == "mtu")
                .and_then(|_| words.next())
                .map(str::to_owned)
                .ok_or_else(|| err(sys.to_string()))?
        }
    };
    text.trim().parse().map_err(|e| err(format!("mtu: {e}")))
}

fn listener_key(ip: IpAddr, port: u16) -> ListenerKey {
    ListenerKey {
        ip: ip16(ip),
        port: port.to_be_bytes(),
        pad: 0,
    }
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    }
}

struct Installed {
    channel: Channel,
    /// Counter slots: to-peer, to-client.
    slots: [u32; 2],
    /// Totals already handed out by [`FastPath::take_traffic`].
    seen: [Traffic; 2],
}

/// The loaded program and its maps. Dropping it detaches the program.
pub struct FastPath {
    _ebpf: aya::Ebpf,
    c2p: BpfHashMap<MapData, C2pKey, C2pVal>,
    p2c: BpfHashMap<MapData, P2cKey, P2cVal>,
    counters: PerCpuArray<MapData, Counter>,
    cpus: usize,
    free: Vec<u32>,
    installed: HashMap<u64, Installed>,
    interface: String,
    listeners: BpfHashMap<MapData, ListenerKey, u32>,
    /// The listeners Binding was enabled for (wildcards as configured) and the keys installed.
    binding_listeners: Vec<SocketAddr>,
    listener_keys: std::collections::HashSet<ListenerKey>,
    binding_cfg: Array<MapData, BindingCfg>,
    binding_counters: PerCpuArray<MapData, BindingCounter>,
    bindings_seen: Bindings,
}

impl std::fmt::Debug for FastPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastPath")
            .field("interface", &self.interface)
            .field("entries", &self.installed.len())
            .finish()
    }
}

#[cfg(kyuu_ebpf)]
fn object() -> Result<&'static [u8], FastPathError> {
    Ok(aya::include_bytes_aligned!(concat!(
        env!("OUT_DIR"),
        "/turn_router.o"
    )))
}

#[cfg(not(kyuu_ebpf))]
fn object() -> Result<&'static [u8], FastPathError> {
    Err(FastPathError::Unavailable(
        unavailable().unwrap_or("built without clang"),
    ))
}

fn map_err(name: &'static str) -> impl Fn(aya::maps::MapError) -> FastPathError {
    move |e| FastPathError::Map(name, e.to_string())
}

impl FastPath {
    /// Loads the program and attaches it to `interface` in generic (SKB) XDP mode, which every
    /// driver supports (veth included); the MTU of the interface bounds what it emits.
    pub fn attach(interface: &str) -> Result<Self, FastPathError> {
        Self::attach_mode(interface, false)
    }

    /// [`FastPath::attach`], in the driver's native XDP mode when `native` (an error where the
    /// driver has none: no fallback, the operator asked for it).
    pub fn attach_mode(interface: &str, native: bool) -> Result<Self, FastPathError> {
        let mtu = interface_mtu(interface)?;
        let mut fp = Self::load(interface, mtu, 0)?;
        let prog = fp.program()?;
        let flags = if native {
            aya::programs::XdpFlags::DRV_MODE
        } else {
            aya::programs::XdpFlags::SKB_MODE
        };
        prog.attach(interface, flags)
            .map_err(|e| FastPathError::Attach(interface.into(), e.to_string()))?;
        Ok(fp)
    }

    /// Loads the program without attaching it, MAC addresses swapped instead of routed, and pins
    /// it at `pin` (for `bpftool prog run`: tests and the per-packet microbenchmark).
    pub fn load_for_test_run(pin: &Path, max_ip_len: u32) -> Result<Self, FastPathError> {
        let mut fp = Self::load("test-run", max_ip_len, FLAG_SWAP_MACS)?;
        fp.program()?
            .pin(pin)
            .map_err(|e| FastPathError::Load(format!("pin {}: {e}", pin.display())))?;
        Ok(fp)
    }

    fn program(&mut self) -> Result<&mut aya::programs::Xdp, FastPathError> {
        let prog = self
            ._ebpf
            .program_mut("kyuu_turn")
            .ok_or_else(|| FastPathError::Load("no program kyuu_turn".into()))?;
        prog.try_into()
            .map_err(|e: aya::programs::ProgramError| FastPathError::Load(e.to_string()))
    }

    fn load(interface: &str, max_ip_len: u32, flags: u32) -> Result<Self, FastPathError> {
        let mut ebpf =
            aya::Ebpf::load(object()?).map_err(|e| FastPathError::Load(e.to_string()))?;
        let take = |ebpf: &mut aya::Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or_else(|| FastPathError::Map(name, "missing".into()))
        };
        let c2p = BpfHashMap::try_from(take(&mut ebpf, "C2P")?).map_err(map_err("C2P"))?;
        let p2c = BpfHashMap::try_from(take(&mut ebpf, "P2C")?).map_err(map_err("P2C"))?;
        let counters =
            PerCpuArray::try_from(take(&mut ebpf, "COUNTERS")?).map_err(map_err("COUNTERS"))?;
        let mut config: Array<MapData, Config> =
            Array::try_from(take(&mut ebpf, "CONFIG")?).map_err(map_err("CONFIG"))?;
        config
            .set(0, Config { max_ip_len, flags }, 0)
            .map_err(map_err("CONFIG"))?;
        let listeners =
            BpfHashMap::try_from(take(&mut ebpf, "LISTENERS")?).map_err(map_err("LISTENERS"))?;
        let binding_cfg =
            Array::try_from(take(&mut ebpf, "BINDING_CFG")?).map_err(map_err("BINDING_CFG"))?;
        let binding_counters = PerCpuArray::try_from(take(&mut ebpf, "BINDING_COUNTERS")?)
            .map_err(map_err("BINDING_COUNTERS"))?;
        let cpus =
            aya::util::nr_cpus().map_err(|(m, e)| FastPathError::Load(format!("{m}: {e}")))?;
        {
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut("kyuu_turn")
                .ok_or_else(|| FastPathError::Load("no program kyuu_turn".into()))?
                .try_into()
                .map_err(|e: aya::programs::ProgramError| FastPathError::Load(e.to_string()))?;
            load_retrying(|| prog.load())
                .map_err(|e| FastPathError::Load(describe_load_error(&e)))?;
        }
        Ok(FastPath {
            _ebpf: ebpf,
            c2p,
            p2c,
            counters,
            cpus,
            free: (0..2 * MAX_ENTRIES).rev().collect(),
            installed: HashMap::new(),
            interface: interface.into(),
            listeners,
            binding_listeners: Vec::new(),
            listener_keys: std::collections::HashSet::new(),
            binding_cfg,
            binding_counters,
            bindings_seen: Bindings::default(),
        })
    }

    /// Lets the kernel answer plain STUN Binding requests (no attributes, or only FINGERPRINT)
    /// to `cfg.listeners`, with exactly the attributes userspace answers with. A SOFTWARE value
    /// longer than the program can hold leaves Binding to userspace (an error says so). A
    /// wildcard listener is installed for each address of the interface (or `local` if given,
    /// for tests) of its family.
    pub fn enable_binding(
        &mut self,
        cfg: &BindingConfig,
        local: Option<&[IpAddr]>,
    ) -> Result<(), FastPathError> {
        let sw = software_attribute(&cfg.software).ok_or(FastPathError::Map(
            "BINDING_CFG",
            format!("SOFTWARE longer than {} bytes", SOFTWARE_MAX - 4),
        ))?;
        let addrs = match local {
            Some(a) => a.to_vec(),
            None => interface_addrs(&self.interface),
        };
        self.binding_listeners = cfg.listeners.clone();
        self.refresh_binding_listeners(&addrs)?;
        self.write_binding_cfg(&sw, cfg.rate, cfg.burst)
    }

    /// Whether a Binding listener is a wildcard address, whose kernel answers follow the
    /// interface's addresses ([`FastPath::refresh_binding_listeners`]).
    pub fn binding_has_wildcard(&self) -> bool {
        self.binding_listeners
            .iter()
            .any(|l| l.ip().is_unspecified())
    }

    /// Makes the kernel answer Binding on `addrs` (the interface's addresses now, as
    /// [`interface_addrs`] reads them) for each wildcard listener, and no longer on addresses
    /// the interface has lost; listeners on a given address stay. Returns how many
    /// (address, port) pairs were added and removed. Requests to an address not (yet) listed go
    /// to userspace, which answers them.
    pub fn refresh_binding_listeners(
        &mut self,
        addrs: &[IpAddr],
    ) -> Result<(usize, usize), FastPathError> {
        let mut want = std::collections::HashSet::new();
        for l in &self.binding_listeners {
            if l.ip().is_unspecified() {
                for a in addrs.iter().filter(|a| a.is_ipv4() == l.is_ipv4()) {
                    want.insert(listener_key(*a, l.port()));
                }
            } else {
                want.insert(listener_key(l.ip(), l.port()));
            }
        }
        let gone: Vec<ListenerKey> = self.listener_keys.difference(&want).copied().collect();
        for key in &gone {
            self.listeners.remove(key).map_err(map_err("LISTENERS"))?;
            self.listener_keys.remove(key);
        }
        let mut added = 0;
        for key in want {
            if !self.listener_keys.contains(&key) {
                self.listeners
                    .insert(key, 1, 0)
                    .map_err(map_err("LISTENERS"))?;
                self.listener_keys.insert(key);
                added += 1;
            }
        }
        Ok((added, gone.len()))
    }

    /// Applies a reloaded SOFTWARE value and per-source limit (`turn.software`,
    /// `turn.unauth_rate`, `turn.unauth_burst`) to the kernel's Binding answers. Only after
    /// [`FastPath::enable_binding`]; otherwise nothing changes and `Ok(false)` is returned.
    /// The listeners stay as they were enabled. Sources' buckets keep their tokens, capped at
    /// the new burst on their next request.
    pub fn set_binding_limits(
        &mut self,
        software: &str,
        rate: u32,
        burst: u32,
    ) -> Result<bool, FastPathError> {
        let enabled = self
            .binding_cfg
            .get(&0, 0)
            .map_err(map_err("BINDING_CFG"))?
            .enabled;
        if enabled == 0 {
            return Ok(false);
        }
        let sw = software_attribute(software).ok_or(FastPathError::Map(
            "BINDING_CFG",
            format!("SOFTWARE longer than {} bytes", SOFTWARE_MAX - 4),
        ))?;
        self.write_binding_cfg(&sw, rate, burst).map(|()| true)
    }

    fn write_binding_cfg(&mut self, sw: &[u8], rate: u32, burst: u32) -> Result<(), FastPathError> {
        let mut val = BindingCfg {
            enabled: 1,
            rate,
            burst,
            sw_len: sw.len() as u32,
            sw: [0; SOFTWARE_MAX],
        };
        val.sw[..sw.len()].copy_from_slice(sw);
        self.binding_cfg
            .set(0, val, 0)
            .map_err(map_err("BINDING_CFG"))
    }

    /// Binding requests the kernel answered or dropped since the last call, summed over CPUs.
    pub fn take_bindings(&mut self) -> Bindings {
        let Ok(values) = self.binding_counters.get(&0, 0) else {
            return Bindings::default();
        };
        let total = values.iter().fold(Bindings::default(), |t, c| Bindings {
            answered: t.answered + c.answered,
            rate_limited: t.rate_limited + c.rate_limited,
        });
        let out = Bindings {
            answered: total.answered.saturating_sub(self.bindings_seen.answered),
            rate_limited: total
                .rate_limited
                .saturating_sub(self.bindings_seen.rate_limited),
        };
        self.bindings_seen = total;
        out
    }

    /// The interface the program is attached to.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Entries installed.
    pub fn len(&self) -> usize {
        self.installed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.installed.is_empty()
    }

    /// Installs (or updates) entry `id`: the directions `channel` asks for go in, the others
    /// come out. Counters carry over an update.
    pub fn install(&mut self, id: u64, channel: Channel) -> Result<(), FastPathError> {
        // Next hops the program learned stay across an update.
        let peer_mac = self
            .c2p
            .get(&c2p_key(&channel), 0)
            .map(|v| v.peer_mac)
            .unwrap_or_default();
        let client_mac = self
            .p2c
            .get(&p2c_key(&channel), 0)
            .map(|v| v.client_mac)
            .unwrap_or_default();
        if let Some(old) = self.installed.get(&id) {
            if old.channel == channel {
                return Ok(());
            }
            let old = old.channel;
            self.delete_keys(&old);
        } else {
            let (Some(a), Some(b)) = (self.free.pop(), self.free.pop()) else {
                return Err(FastPathError::Full);
            };
            for slot in [a, b] {
                let zero = PerCpuValues::try_from(vec![Counter::default(); self.cpus])
                    .map_err(|e| FastPathError::Map("COUNTERS", e.to_string()))?;
                if let Err(e) = self.counters.set(slot, zero, 0) {
                    self.free.extend([a, b]);
                    return Err(FastPathError::Map("COUNTERS", e.to_string()));
                }
            }
            self.installed.insert(
                id,
                Installed {
                    channel,
                    slots: [a, b],
                    seen: [Traffic::default(); 2],
                },
            );
        }
        let Some(entry) = self.installed.get_mut(&id) else {
            return Ok(());
        };
        entry.channel = channel;
        let slots = entry.slots;
        let port = |a: SocketAddr| a.port().to_be_bytes();
        let ch = channel.number.to_be_bytes();
        let result = (|| {
            if channel.to_peer {
                let key = c2p_key(&channel);
                let val = C2pVal {
                    relay_ip: ip16(channel.relay.ip()),
                    peer_ip: ip16(channel.peer.ip()),
                    relay_port: port(channel.relay),
                    peer_port: port(channel.peer),
                    slot: slots[0],
                    expires_ns: channel.expires_ns,
                    peer_mac,
                    pad: 0,
                };
                self.c2p.insert(key, val, 0).map_err(map_err("C2P"))?;
            }
            if channel.to_client {
                let key = p2c_key(&channel);
                let val = P2cVal {
                    client_ip: ip16(channel.client.ip()),
                    server_ip: ip16(channel.server.ip()),
                    client_port: port(channel.client),
                    server_port: port(channel.server),
                    channel: ch,
                    slot: slots[1],
                    expires_ns: channel.expires_ns,
                    client_mac,
                    ..P2cVal::default()
                };
                self.p2c.insert(key, val, 0).map_err(map_err("P2C"))?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.delete_keys(&channel);
        }
        result
    }

    fn delete_keys(&mut self, channel: &Channel) {
        // A key that is not there is fine: the direction was not installed.
        let _ = self.c2p.remove(&c2p_key(channel));
        let _ = self.p2c.remove(&p2c_key(channel));
    }

    /// Removes entry `id`; returns the traffic it relayed since the last
    /// [`FastPath::take_traffic`] (to-peer, to-client).
    pub fn remove(&mut self, id: u64) -> [Traffic; 2] {
        let traffic = self.take_traffic(id);
        if let Some(entry) = self.installed.remove(&id) {
            self.delete_keys(&entry.channel);
            self.free.extend(entry.slots);
        }
        traffic
    }

    /// Traffic the kernel relayed for `id` since the last call (to-peer, to-client), summed over
    /// the per-CPU counters.
    pub fn take_traffic(&mut self, id: u64) -> [Traffic; 2] {
        let Some(entry) = self.installed.get_mut(&id) else {
            return [Traffic::default(); 2];
        };
        let mut out = [Traffic::default(); 2];
        for (i, slot) in entry.slots.iter().enumerate() {
            let Ok(values) = self.counters.get(slot, 0) else {
                continue;
            };
            let total = values.iter().fold(Traffic::default(), |t, c| Traffic {
                packets: t.packets + c.packets,
                bytes: t.bytes + c.bytes,
            });
            let seen = &mut entry.seen[i];
            out[i] = Traffic {
                packets: total.packets.saturating_sub(seen.packets),
                bytes: total.bytes.saturating_sub(seen.bytes),
            };
            *seen = total;
        }
        out
    }

    /// Ids of the installed entries.
    pub fn ids(&self) -> Vec<u64> {
        self.installed.keys().copied().collect()
    }
}

fn c2p_key(c: &Channel) -> C2pKey {
    C2pKey {
        client_ip: ip16(c.client.ip()),
        server_ip: ip16(c.server.ip()),
        client_port: c.client.port().to_be_bytes(),
        server_port: c.server.port().to_be_bytes(),
        channel: c.number.to_be_bytes(),
        pad: 0,
    }
}

fn p2c_key(c: &Channel) -> P2cKey {
    P2cKey {
        peer_ip: ip16(c.peer.ip()),
        relay_ip: ip16(c.relay.ip()),
        peer_port: c.peer.port().to_be_bytes(),
        relay_port: c.relay.port().to_be_bytes(),
        pad: 0,
    }
}

/// Whether the kernel can relay between these addresses: one family on both sides (the program
/// rewrites addresses, it does not translate between IPv4 and IPv6) and a server address that is
/// not a wildcard.
pub fn relayable(
    client: SocketAddr,
    server: SocketAddr,
    relay: SocketAddr,
    peer: SocketAddr,
) -> bool {
    let v4 = |a: SocketAddr| canonical(a.ip()).is_ipv4();
    v4(client) == v4(peer)
        && v4(server) == v4(client)
        && v4(relay) == v4(peer)
        && !server.ip().is_unspecified()
        && !relay.ip().is_unspecified()
}

/// The SOFTWARE attribute as it goes on the wire (type, length, value, zero padding), as
/// `kyuu_stun::MessageBuilder` writes it; empty for no SOFTWARE; `None` when too long.
fn software_attribute(software: &str) -> Option<Vec<u8>> {
    if software.is_empty() {
        return Some(Vec::new());
    }
    let v = software.as_bytes();
    let padded = v.len().div_ceil(4) * 4;
    if 4 + padded > SOFTWARE_MAX {
        return None;
    }
    let mut out = vec![0x80, 0x22];
    out.extend((v.len() as u16).to_be_bytes());
    out.extend(v);
    out.resize(4 + padded, 0);
    Some(out)
}

/// The addresses of interface `name` (from `ip -o addr show dev`).
pub fn interface_addrs(name: &str) -> Vec<IpAddr> {
    let Ok(out) = std::process::Command::new("ip")
        .args(["-o", "addr", "show", "dev", name])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let cidr = line.split_whitespace().nth(3)?;
            cidr.split('/').next()?.parse::<IpAddr>().ok()
        })
        .collect()
}

/// Finds the interface holding `ip` (for `turn.fast_path = "auto"` without
/// `turn.fast_path_interface`), by reading `ip -o addr` output.
pub fn interface_of(ip: IpAddr) -> Option<String> {
    let out = std::process::Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = canonical(ip);
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(_), Some(name), Some(_), Some(cidr)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let addr = cidr.split('/').next().unwrap_or("");
        if addr.parse::<IpAddr>().ok().map(canonical) == Some(want) {
            return Some(name.split('@').next().unwrap_or(name).to_string());
        }
    }
    None
}

/// Tries a failed program load again (at most 5 times in all, 10 ms apart). The verifier gives
/// up with EAGAIN when a signal is pending for the loading thread, whatever the program (libbpf
/// retries the same way); but aya retries a failed load itself with ever larger log buffers,
/// and the error it returns is the last of those (often ENOSPC, the log not fitting), not the
/// first. So any load error is retried: a program the verifier rejects fails the same way five
/// times, in milliseconds.
pub(crate) fn load_retrying(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut tries = 1;
    loop {
        match load() {
            Err(aya::programs::ProgramError::LoadError { .. }) if tries < 5 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            r => return r,
        }
    }
}

/// A failed program load for a person: the kernel's error first, then the end of the
/// verifier's log (where it says why), not its whole trace.
pub(crate) fn describe_load_error(e: &aya::programs::ProgramError) -> String {
    const TAIL: usize = 1500;
    match e {
        aya::programs::ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let mut cut = log.len().saturating_sub(TAIL);
            while !log.is_char_boundary(cut) {
                cut += 1;
            }
            format!(
                "BPF_PROG_LOAD failed: {io_error} ({:?}); verifier log ends: {}",
                io_error.kind(),
                &log[cut..]
            )
        }
        e => e.to_string(),
    }
}
