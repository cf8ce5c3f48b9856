//! The kernel fast path (XDP, `turn.fast_path`) end to end in the network lab: the same TURN
//! session against `kyuu serve` with the fast path required and with it off gives the same bytes
//! to the peer and to the client, on every relay path (ChannelData both ways on two channels,
//! Send and Data indications); a forbidden peer is refused, a deleted allocation relays nothing
//! more, the kernel's counters reach `/metrics`, and the receiving kernels found every checksum
//! right (`Udp InCsumErrors` stays 0 on client and peer).
//!
//! Topology: server 198.18.0.10 on the WAN switch behind a plain router (198.18.0.1); client
//! 198.18.1.10 and peer 198.18.2.10 on two LANs of that router. Client and peer send with
//! transmit checksum offload off (ethtool), so their datagrams carry full checksums, the XDP
//! program updates them, and the receivers verify them in software.
//!
//! The same over IPv6 (benchmarking prefix 2001:2::/48, RFC 5180; the hosts are dual-stack, the
//! TURN traffic is IPv6 only): server 2001:2::10, client 2001:2:0:1::10, peer 2001:2:0:2::10,
//! an IPv6 allocation (REQUESTED-ADDRESS-FAMILY), the fast path relaying IPv6 both ways.
//!
//! Needs root, `ip`, `ethtool` and an eBPF-capable build (SKIP otherwise, failure with
//! `KYUU_LAB_REQUIRED=1`).
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use kyuu_client::turn::{AllocateOptions, Client, Event};
use kyuu_lab::{lab_or_skip, Lab, LabChild, NatKind, Node};

#[path = "../../kyuu-ebpf/tests/support/binding.rs"]
mod binding;

const KYUU: &str = env!("CARGO_BIN_EXE_kyuu");
const SERVER: &str = "198.18.0.10";
const CLIENT: &str = "198.18.1.10";
const PEER: &str = "198.18.2.10";
const HTTP_PORT: u16 = 8080;

/// The addresses the TURN session uses: IPv4, or IPv6 from the benchmarking prefix.
#[derive(Debug, Clone, Copy)]
struct Family {
    v6: bool,
    server: &'static str,
    client: &'static str,
    peer: &'static str,
    /// Outside `allow_peers` (and in a range refused by default).
    forbidden: &'static str,
    allow: [&'static str; 2],
}

const V4: Family = Family {
    v6: false,
    server: SERVER,
    client: CLIENT,
    peer: PEER,
    forbidden: "198.18.3.10",
    allow: ["198.18.1.0/24", "198.18.2.0/24"],
};

const V6: Family = Family {
    v6: true,
    server: "2001:2::10",
    client: "2001:2:0:1::10",
    peer: "2001:2:0:2::10",
    forbidden: "2001:2:0:3::10",
    allow: ["2001:2:0:1::/64", "2001:2:0:2::/64"],
};

impl Family {
    fn addr(ip: &str, port: u16) -> String {
        let ip: IpAddr = ip.parse().unwrap();
        SocketAddr::new(ip, port).to_string()
    }
}

struct World {
    _lab: Lab,
    server: Node,
    /// The server's interface, and the switch its other end is plugged into.
    server_if: String,
    wan: kyuu_lab::Switch,
    client: Node,
    peer: Node,
    fam: Family,
}

fn build(lab: Lab, fam: Family) -> Result<World> {
    let wan = lab.switch("wan")?;
    let lan1 = lab.switch("lan1")?;
    let lan2 = lab.switch("lan2")?;
    let rt = lab.router("rt", NatKind::None)?;
    let rw = rt.wan(&wan, "198.18.0.1/24")?;
    let rl1 = rt.lan(&lan1, "198.18.1.1/24")?;
    let rl2 = rt.lan(&lan2, "198.18.2.1/24")?;
    let server = lab.host("srv")?;
    let si = server.attach(&wan, &format!("{SERVER}/24"))?;
    server.route_default("198.18.0.1")?;
    let client = lab.host("cli")?;
    let ci = client.attach(&lan1, &format!("{CLIENT}/24"))?;
    client.route_default("198.18.1.1")?;
    let peer = lab.host("peer")?;
    let pi = peer.attach(&lan2, &format!("{PEER}/24"))?;
    peer.route_default("198.18.2.1")?;
    if fam.v6 {
        // Dual-stack: IPv6 on the same links (no duplicate address detection wait), the router
        // forwarding IPv6 too.
        rt.node().sysctl("net.ipv6.conf.all.forwarding", "1")?;
        for (iface, cidr) in [
            (&rw, "2001:2::1/64"),
            (&rl1, "2001:2:0:1::1/64"),
            (&rl2, "2001:2:0:2::1/64"),
        ] {
            // The lab turns IPv6 off in every namespace; on for these links only.
            rt.node()
                .sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", iface.name), "0")?;
            rt.node()
                .ip(&["-6", "addr", "add", cidr, "dev", &iface.name, "nodad"])?;
        }
        for (node, iface, cidr, gw) in [
            (&server, &si, "2001:2::10/64", "2001:2::1"),
            (&client, &ci, "2001:2:0:1::10/64", "2001:2:0:1::1"),
            (&peer, &pi, "2001:2:0:2::10/64", "2001:2:0:2::1"),
        ] {
            node.sysctl(&format!("net.ipv6.conf.{}.disable_ipv6", iface.name), "0")?;
            node.ip(&["-6", "addr", "add", cidr, "dev", &iface.name, "nodad"])?;
            node.ip(&["-6", "route", "add", "default", "via", gw])?;
        }
    }
    for (node, iface) in [(&client, &ci), (&peer, &pi)] {
        let mut cmd = node.command("ethtool");
        cmd.args(["-K", &iface.name, "tx", "off"]);
        let out = node.run(cmd, Duration::from_secs(10))?;
        ensure!(
            out.status.success(),
            "ethtool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(World {
        _lab: lab,
        server,
        server_if: si.name,
        wan,
        client,
        peer,
        fam,
    })
}

/// `kyuu serve` with `turn.fast_path = fast_path` and `extra` lines in `[turn]`.
fn start_kyuu_with(w: &World, fast_path: &str, extra: &str) -> Result<LabChild> {
    let conf = write_kyuu_config(w, fast_path, extra)?;
    spawn_kyuu(w, &conf)
}

/// Writes the configuration [`start_kyuu_with`] serves (the same path for the same
/// `fast_path` and length of `extra`, so a reload test can rewrite it).
fn write_kyuu_config(w: &World, fast_path: &str, extra: &str) -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "kyuu-fastpath-{}-{fast_path}-{}",
        std::process::id(),
        extra.len()
    ));
    std::fs::create_dir_all(&dir)?;
    let conf = dir.join("kyuu.toml");
    let fam = w.fam;
    let udp = Family::addr(fam.server, 3478);
    let [allow1, allow2] = fam.allow;
    std::fs::write(
        &conf,
        format!(
            r#"
[listen]
udp = ["{udp}"]
tcp = []
tls = []
threads = 1

[http]
listen = "{SERVER}:{HTTP_PORT}"

[turn]
users = [{{ name = "alice", password = "secret" }}]
allow_peers = ["{allow1}", "{allow2}"]
max_bps = 0
fast_path = "{fast_path}"
{extra}
"#
        ),
    )?;
    Ok(conf)
}

/// Starts `kyuu serve --config conf` in the server namespace and waits for its `/metrics`.
fn spawn_kyuu(w: &World, conf: &std::path::Path) -> Result<LabChild> {
    let mut cmd = w.server.command(KYUU);
    cmd.arg("serve")
        .arg("--config")
        .arg(conf)
        .args(["--log", "warn"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = w.server.spawn(cmd)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if metrics(&w.server).is_ok() {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.take_stderr() {
                let _ = e.read_to_string(&mut err);
            }
            bail!("kyuu serve exited ({status}): {err}");
        }
        ensure!(Instant::now() < deadline, "kyuu serve did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metrics(server: &Node) -> Result<String> {
    server.in_ns(|| -> Result<String> {
        let mut s = TcpStream::connect((SERVER, HTTP_PORT))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })?
}

fn metric(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

fn udp_csum_errors(node: &Node) -> Result<u64> {
    let mut cmd = node.command("cat");
    cmd.arg("/proc/net/snmp");
    let out = node.run(cmd, Duration::from_secs(5))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut cmd = node.command("cat");
    cmd.arg("/proc/net/snmp6");
    let out6 = node.run(cmd, Duration::from_secs(5))?;
    let v6: u64 = String::from_utf8_lossy(&out6.stdout)
        .lines()
        .filter(|l| l.starts_with("Udp6InCsumErrors"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    let mut lines = text.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(head), Some(vals)) = (lines.next(), lines.next()) else {
        bail!("no Udp line in /proc/net/snmp");
    };
    let i = head
        .split_whitespace()
        .position(|h| h == "InCsumErrors")
        .context("InCsumErrors")?;
    let v4: u64 = vals.split_whitespace().nth(i).context("value")?.parse()?;
    Ok(v4 + v6)
}

/// A blocking driver for the sans-IO TURN client.
struct Turn {
    c: Client,
    sock: UdpSocket,
    server: SocketAddr,
}

impl Turn {
    fn pump(&mut self, wait: Duration, mut done: impl FnMut(&Event) -> bool) -> Result<Vec<Event>> {
        let deadline = Instant::now() + wait;
        let mut events = Vec::new();
        let mut buf = vec![0u8; 2048];
        while Instant::now() < deadline {
            while let Some(t) = self.c.poll_transmit() {
                self.sock.send_to(&t, self.server)?;
            }
            let mut finished = false;
            while let Some(e) = self.c.poll_event() {
                finished |= done(&e);
                events.push(e);
            }
            if finished {
                return Ok(events);
            }
            self.sock
                .set_read_timeout(Some(Duration::from_millis(50)))?;
            match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => self.c.handle_input(Instant::now(), &buf[..n]),
                Err(_) => self.c.handle_timeout(Instant::now()),
            }
        }
        Ok(events)
    }

    fn expect(&mut self, what: &str, done: impl FnMut(&Event) -> bool) -> Result<Vec<Event>> {
        let ev = self.pump(Duration::from_secs(5), done)?;
        ensure!(!ev.is_empty(), "no answer for {what}");
        Ok(ev)
    }

    fn channel_data(&mut self, ch: u16, data: &[u8]) -> Result<()> {
        let mut out = vec![0u8; data.len() + 8];
        let n = self.c.channel_data(ch, data, &mut out).context("encode")?;
        self.sock.send_to(&out[..n], self.server)?;
        Ok(())
    }
}

fn payloads() -> Vec<Vec<u8>> {
    (0..40)
        .map(|i: usize| {
            let len = [1, 2, 3, 5, 100, 333, 1000, 1200][i % 8] + i;
            (0..len).map(|j| (i * 7 + j * 13) as u8).collect()
        })
        .collect()
}

/// What the peer and the client saw, with the relay port replaced by "relay".
#[derive(Debug, PartialEq, Eq)]
struct Transcript {
    at_peer: Vec<(u16, String, Vec<u8>)>,
    at_client: Vec<String>,
}

fn recv_all(sock: &UdpSocket, n: usize) -> Vec<(SocketAddr, Vec<u8>)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(3);
    let _ = sock.set_read_timeout(Some(Duration::from_millis(100)));
    while got.len() < n && Instant::now() < deadline {
        if let Ok((len, from)) = sock.recv_from(&mut buf) {
            got.push((from, buf[..len].to_vec()));
        }
    }
    got
}

fn session(w: &World, fast_path: &str) -> Result<(Transcript, String)> {
    session_with(w, fast_path, "")
}

/// [`session`] with `extra` lines in kyuu's `[turn]`.
fn session_with(w: &World, fast_path: &str, extra: &str) -> Result<(Transcript, String)> {
    let fam = w.fam;
    let server = start_kyuu_with(w, fast_path, extra)?;
    let server_addr: SocketAddr = Family::addr(fam.server, 3478).parse()?;
    let peer_a = w.peer.udp_bind(&Family::addr(fam.peer, 7000))?;
    let peer_b = w.peer.udp_bind(&Family::addr(fam.peer, 7001))?;
    let peer_c = w.peer.udp_bind(&Family::addr(fam.peer, 7002))?;
    let mut t = Turn {
        c: Client::new("alice", "secret", false),
        sock: w.client.udp_bind(&Family::addr(fam.client, 0))?,
        server: server_addr,
    };
    t.c.allocate_with(
        Instant::now(),
        &AllocateOptions {
            // IPv4 is the default family (RFC 8656 §7.1).
            family: fam.v6.then_some(kyuu_stun::attr::FAMILY_IPV6),
            ..AllocateOptions::default()
        },
    );
    let ev = t.expect("Allocate", |e| matches!(e, Event::Allocated { .. }))?;
    let relayed = ev
        .iter()
        .find_map(|e| match e {
            Event::Allocated { relayed, .. } => relayed.first().copied(),
            _ => None,
        })
        .context(format!("not allocated: {ev:?}"))?;
    ensure!(
        relayed.is_ipv6() == fam.v6,
        "relayed address {relayed} is not of the session's family"
    );
    let (a, b, c) = (
        peer_a.local_addr()?,
        peer_b.local_addr()?,
        peer_c.local_addr()?,
    );
    for (ch, peer) in [(0x4001, a), (0x4002, b)] {
        t.c.channel_bind(Instant::now(), ch, peer);
        t.expect("ChannelBind", |e| matches!(e, Event::ChannelBound { .. }))?;
    }
    // A forbidden peer is refused whatever the fast path.
    t.c.channel_bind(
        Instant::now(),
        0x4003,
        Family::addr(fam.forbidden, 9).parse()?,
    );
    let ev = t.expect("forbidden ChannelBind", |e| {
        matches!(e, Event::Error { .. })
    })?;
    ensure!(
        ev.iter()
            .any(|e| matches!(e, Event::Error { code: 403, .. })),
        "forbidden peer: {ev:?}"
    );
    t.c.create_permission(Instant::now(), &[c]);
    t.expect("CreatePermission", |e| {
        matches!(e, Event::PermissionCreated)
    })?;
    // One exchange per channel first, as ICE checks would: the kernel learns each side's next
    // hop from the other side's packets (this server does not forward IP, so the FIB helper
    // cannot be asked).
    for (ch, sock) in [(0x4001, &peer_a), (0x4002, &peer_b)] {
        t.channel_data(ch, b"hello")?;
        ensure!(recv_all(sock, 1).len() == 1, "warm-up to the peer");
        sock.send_to(b"hello", relayed)?;
        let ev = t.pump(Duration::from_secs(3), |e| {
            matches!(e, Event::ChannelData { .. })
        })?;
        ensure!(
            ev.iter().any(|e| matches!(e, Event::ChannelData { .. })),
            "warm-up to the client"
        );
    }

    let data = payloads();
    let mut at_peer = Vec::new();
    let mut at_client = Vec::new();
    let name = |port: u16| match port {
        7000 => "a",
        7001 => "b",
        _ => "c",
    };
    // Client → peers: ChannelData on both channels, a Send indication to the third peer port.
    for (i, d) in data.iter().enumerate() {
        match i % 3 {
            0 => t.channel_data(0x4001, d)?,
            1 => t.channel_data(0x4002, d)?,
            _ => {
                t.c.send_indication(c, d);
                t.pump(Duration::from_millis(1), |_| false)?;
            }
        }
        // Pace a little so no socket buffer overflows.
        std::thread::sleep(Duration::from_millis(2));
    }
    for (sock, n) in [(&peer_a, 14), (&peer_b, 13), (&peer_c, 13)] {
        for (from, d) in recv_all(sock, n) {
            ensure!(
                from == relayed,
                "peer datagram from {from}, relay is {relayed}"
            );
            at_peer.push((sock.local_addr()?.port(), "relay".to_string(), d));
        }
    }
    // Peers → client: ChannelData from a and b, a Data indication from c.
    for (i, d) in data.iter().enumerate() {
        let sock = [&peer_a, &peer_b, &peer_c][i % 3];
        sock.send_to(d, relayed)?;
        std::thread::sleep(Duration::from_millis(2));
    }
    let ev = t.pump(Duration::from_secs(3), {
        let mut n = 0;
        move |e| {
            if matches!(e, Event::ChannelData { .. } | Event::Data { .. }) {
                n += 1;
            }
            n >= data.len()
        }
    })?;
    for e in ev {
        match e {
            Event::ChannelData { channel, data } => {
                at_client.push(format!("channel {channel:#x} {}", hex(&data)))
            }
            Event::Data { peer, data } => {
                at_client.push(format!("data from {} {}", name(peer.port()), hex(&data)))
            }
            _ => {}
        }
    }
    // Let a tick pass so the kernel's counters are read, then look at /metrics.
    std::thread::sleep(Duration::from_millis(2200));
    let m = metrics(&w.server)?;

    // The allocation ends: nothing is relayed any more, in either direction.
    t.c.refresh(Instant::now(), 0);
    t.expect("Refresh 0", |e| matches!(e, Event::Refreshed { .. }))?;
    t.channel_data(0x4001, b"after deletion")?;
    peer_a.send_to(b"after deletion", relayed)?;
    ensure!(
        recv_all(&peer_a, 1).is_empty(),
        "relayed after the allocation was deleted"
    );
    let late = t.pump(Duration::from_millis(500), |_| false)?;
    ensure!(
        !late.iter().any(|e| matches!(e, Event::ChannelData { .. })),
        "client got data after deletion"
    );
    server.kill();
    // Arrival order may differ (the kernel is faster than userspace); the bytes may not.
    at_peer.sort();
    at_client.sort();
    Ok((Transcript { at_peer, at_client }, m))
}

/// A UDP socket of the client's, on an ephemeral port.
fn client_socket(w: &World) -> UdpSocket {
    w.client.udp_bind(&Family::addr(w.fam.client, 0)).unwrap()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// `extra`: lines for kyuu's `[turn]` in the fast path's session.
fn on_and_off_relay_the_same_bytes(test: &str, fam: Family, extra: &str) {
    let Some(lab) = fast_path_lab(test) else {
        return;
    };
    let w = build(lab, fam).unwrap();
    on_and_off_in(test, &w, extra);
}

fn on_and_off_in(test: &str, w: &World, extra: &str) {
    let csum_before = (
        udp_csum_errors(&w.client).unwrap(),
        udp_csum_errors(&w.peer).unwrap(),
    );
    let (off, m_off) = session(w, "off").unwrap();
    let (on, m_on) = session_with(w, "required", extra).unwrap();
    let data = payloads();
    assert_eq!(
        off.at_peer.len(),
        data.len(),
        "userspace relayed everything to peers"
    );
    assert_eq!(
        off.at_client.len(),
        data.len(),
        "userspace relayed everything to the client"
    );
    assert_eq!(on, off, "the fast path changes no byte");
    let kernel_to_peer = metric(&m_on, "kyuu_turn_fast_path_packets_total", "to_peer");
    let kernel_to_client = metric(&m_on, "kyuu_turn_fast_path_packets_total", "to_client");
    println!("{test}: kernel relayed {kernel_to_peer} to peers, {kernel_to_client} to the client");
    // The two channels' traffic (27 each way) went through the kernel; Send/Data did not. Of
    // the warm-up, the client's first packet on each channel taught the kernel its next hop, so
    // the peers' answers went through the kernel too.
    assert_eq!(kernel_to_peer, 27, "{m_on}");
    assert_eq!(kernel_to_client, 27 + 2, "{m_on}");
    // Kernel traffic is counted with the rest.
    assert_eq!(
        metric(&m_on, "kyuu_turn_relayed_packets_total", "to_peer"),
        metric(&m_off, "kyuu_turn_relayed_packets_total", "to_peer"),
    );
    assert_eq!(metric(&m_off, "kyuu_turn_fast_path_packets_total", ""), 0);
    let csum_after = (
        udp_csum_errors(&w.client).unwrap(),
        udp_csum_errors(&w.peer).unwrap(),
    );
    assert_eq!(csum_after, csum_before, "receivers found bad UDP checksums");
}

#[test]
fn fast_path_on_and_off_relay_the_same_bytes() {
    on_and_off_relay_the_same_bytes("fast_path_on_and_off_relay_the_same_bytes", V4, "");
}

#[test]
fn fast_path_ipv6_on_and_off_relay_the_same_bytes() {
    on_and_off_relay_the_same_bytes("fast_path_ipv6_on_and_off_relay_the_same_bytes", V6, "");
}

/// `turn.fast_path_xdp = "native"`: the program is attached to the veth driver's own XDP hook
/// (`ip link` says `xdp`, not `xdpgeneric`) and relays the same bytes as userspace. On a veth,
/// the kernel flushes what native XDP_TX queues for the other end only when that end has an XDP
/// program of its own, so each switch port gets one: kyuu's, with no entries (it passes
/// everything).
#[test]
fn native_xdp_relays_the_same_bytes() {
    const TEST: &str = "native_xdp_relays_the_same_bytes";
    const NATIVE: &str = "fast_path_xdp = \"native\"";
    let Some(lab) = fast_path_lab(TEST) else {
        return;
    };
    let w = build(lab, V4).unwrap();
    let ports = std::process::Command::new("ip")
        .args(["-n", w.wan.ns_name(), "-o", "link", "show"])
        .output()
        .unwrap();
    let ports = String::from_utf8_lossy(&ports.stdout).to_string();
    let names: Vec<String> = ports
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_owned())
        .filter(|n| n.starts_with('p'))
        .collect();
    assert!(names.len() >= 2, "the switch's ports: {ports}");
    let _pass: Vec<kyuu_ebpf::FastPath> = names
        .iter()
        .map(|n| {
            w.wan
                .in_ns(|| kyuu_ebpf::FastPath::attach_mode(n, true))
                .unwrap()
                .unwrap_or_else(|e| panic!("native XDP on the switch port {n}: {e}"))
        })
        .collect();

    let child = start_kyuu_with(&w, "required", NATIVE).unwrap();
    let mut cmd = w.server.command("ip");
    cmd.args(["link", "show", "dev", &w.server_if]);
    let out = w.server.run(cmd, Duration::from_secs(10)).unwrap();
    let link = String::from_utf8_lossy(&out.stdout).to_string();
    println!("{TEST}: {link}");
    assert!(
        link.contains(" xdp ") && !link.contains("xdpgeneric"),
        "attached in native mode: {link}"
    );
    drop(child);
    on_and_off_in(TEST, &w, NATIVE);
}

/// `kyuu serve` links kyuu-ebpf through kyuu-server: this build's answer is the binary's.
fn kyuu_server_fast_path_unavailable() -> Option<&'static str> {
    kyuu_ebpf::unavailable()
}

/// The lab for `test`, or None after a SKIP line when this build has no fast path, `ethtool`
/// (which [`build`] runs) is missing, or the lab cannot be built; a failure instead with
/// `KYUU_LAB_REQUIRED=1`.
fn fast_path_lab(test: &str) -> Option<Lab> {
    if let Some(why) = kyuu_server_fast_path_unavailable() {
        if kyuu_lab::lab_required() {
            panic!("KYUU_LAB_REQUIRED=1 but the fast path is unavailable: {why}");
        }
        eprintln!("SKIP: fast path unavailable: {why}");
        return None;
    }
    if std::process::Command::new("ethtool")
        .arg("--version")
        .output()
        .is_err()
    {
        if kyuu_lab::lab_required() {
            panic!("KYUU_LAB_REQUIRED=1 but ethtool is missing");
        }
        eprintln!("SKIP: ethtool missing");
        return None;
    }
    lab_or_skip(test)
}

/// Sends the Binding request `req` from `sock` to the server (again after 500 ms without an
/// answer, at most 6 times) and returns the answer with its transaction id; answers to earlier
/// retransmissions are skipped, as a client matches answers by transaction id.
fn binding_answer(
    sock: &UdpSocket,
    server: SocketAddr,
    req: &[u8],
    sends: &mut u64,
) -> Result<Vec<u8>> {
    let mut buf = [0u8; 1500];
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    for _ in 0..6 {
        sock.send_to(req, server)?;
        *sends += 1;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until {
            if let Ok((n, from)) = sock.recv_from(&mut buf) {
                ensure!(from == server, "answer from {from}");
                if n >= 20 && buf[8..20] == req[8..20] {
                    return Ok(buf[..n].to_vec());
                }
            }
        }
    }
    bail!("no answer to a Binding request")
}

fn binding_request(tid: [u8; 12], fingerprint: bool, software: bool) -> Vec<u8> {
    let attrs: &[(u16, &[u8])] = if software {
        &[(kyuu_stun::attr::SOFTWARE, b"lab client")]
    } else {
        &[]
    };
    binding::request(tid, attrs, fingerprint)
}

/// Waits (bounded) until `/metrics` shows `want` for `name` (counters are flushed once a second).
fn metric_at_least(server: &Node, name: &str, label: &str, want: u64) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = metrics(server)?;
        if metric(&m, name, label) >= want || Instant::now() > deadline {
            return Ok(m);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// STUN Binding through the kernel: a client behind the router gets a correct answer (its own
/// address in XOR-MAPPED-ADDRESS, its transaction id, a valid FINGERPRINT) that the kernel sent
/// (`kyuu_turn_fast_path_bindings_total`, with every Binding still in
/// `kyuu_stun_binding_requests_total`), byte for byte what userspace answers with
/// `turn.fast_path_binding = false`, where the kernel answers none. A request with another
/// attribute is answered by userspace either way.
#[test]
fn fast_path_answers_stun_binding() {
    binding_through_the_kernel("fast_path_answers_stun_binding", V4);
}

#[test]
fn fast_path_answers_stun_binding_ipv6() {
    binding_through_the_kernel("fast_path_answers_stun_binding_ipv6", V6);
}

fn binding_through_the_kernel(test: &str, fam: Family) {
    let Some(lab) = fast_path_lab(test) else {
        return;
    };
    let w = build(lab, fam).unwrap();
    let server: SocketAddr = Family::addr(fam.server, 3478).parse().unwrap();
    let sock = client_socket(&w);
    let me = sock.local_addr().unwrap();
    let csum_before = udp_csum_errors(&w.client).unwrap();
    let mut answers = Vec::new();
    for (mode, extra) in [("kernel", ""), ("userspace", "fast_path_binding = false")] {
        let child = start_kyuu_with(&w, "required", extra).unwrap();
        let mut got = Vec::new();
        let (mut plain, mut other_sends, mut stunclient) = (0u64, 0u64, 0u64);
        for i in 0..6u8 {
            let tid = [i, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
            let req = binding_request(tid, i % 2 == 1, false);
            let a = binding_answer(&sock, server, &req, &mut plain).unwrap();
            binding::check_success(&a, tid, me, mode);
            got.push(a);
        }
        // coturn's STUN client, where installed (a plain Binding request without -f).
        if mode == "kernel" && which("turnutils_stunclient") {
            let mut cmd = w.client.command("turnutils_stunclient");
            cmd.args(["-p", "3478", fam.server]);
            let out = w.client.run(cmd, Duration::from_secs(20)).unwrap();
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            println!("{test}: turnutils_stunclient: {text}");
            assert!(out.status.success(), "turnutils_stunclient: {text}");
            assert!(text.contains(fam.client), "its mapped address: {text}");
            let m = metric_at_least(
                &w.server,
                "kyuu_turn_fast_path_bindings_total",
                "",
                plain + 1,
            )
            .unwrap();
            let after = metric(&m, "kyuu_turn_fast_path_bindings_total", "");
            println!("{test}: the kernel answered {after} requests, {plain} of them ours");
            assert!(
                after > plain,
                "the kernel answered turnutils_stunclient: {m}"
            );
            stunclient = after - plain;
        }
        // With another attribute: userspace answers.
        let other = binding_answer(
            &sock,
            server,
            &binding_request([99; 12], true, true),
            &mut other_sends,
        )
        .unwrap();
        assert_eq!(
            kyuu_stun::Message::parse(&other).unwrap().class(),
            kyuu_stun::Class::Success
        );
        // Every request sent (retransmissions included) is answered and counted once.
        let total = plain + other_sends + stunclient;
        let m =
            metric_at_least(&w.server, "kyuu_stun_binding_requests_total", "udp", total).unwrap();
        let kernel = metric(&m, "kyuu_turn_fast_path_bindings_total", "");
        let all = metric(&m, "kyuu_stun_binding_requests_total", "transport=\"udp\"");
        println!("{test}: {mode}: {plain} plain requests sent ({other_sends} others), {kernel} answered by the kernel, {all} Bindings counted");
        if mode == "kernel" {
            assert_eq!(
                kernel,
                plain + stunclient,
                "the kernel answered the plain requests: {m}"
            );
        } else {
            assert_eq!(kernel, 0, "fast_path_binding = false: {m}");
        }
        assert_eq!(all, total, "every Binding counted: {m}");
        drop(child);
        answers.push(got);
    }
    assert_eq!(
        answers[0], answers[1],
        "the kernel's answers are byte for byte userspace's"
    );
    assert_eq!(
        udp_csum_errors(&w.client).unwrap(),
        csum_before,
        "bad UDP checksums"
    );
}

fn which(bin: &str) -> bool {
    std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Sends `n` distinct plain Binding requests at once (tags `tag`, 0..n) and counts the answers
/// that come within 400 ms.
fn binding_burst(sock: &UdpSocket, server: SocketAddr, tag: u8, n: u8) -> Result<usize> {
    for i in 0..n {
        sock.send_to(
            &binding_request([tag, i, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7], false, false),
            server,
        )?;
    }
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut seen = std::collections::HashSet::new();
    let mut buf = [0u8; 1500];
    let until = Instant::now() + Duration::from_millis(400);
    while Instant::now() < until {
        if let Ok((len, _)) = sock.recv_from(&mut buf) {
            if len >= 20 && buf[8] == tag && buf[19] == 7 {
                seen.insert(buf[9]);
            }
        }
    }
    Ok(seen.len())
}

/// A reload (`SIGHUP`) of `turn.unauth_rate` reaches the kernel's Binding answers: at 1 answer
/// per second (burst 2) a burst of 10 plain requests is mostly dropped in XDP; after the file
/// says `unauth_rate = 0` (unlimited) and kyuu is sent SIGHUP, the kernel answers all ten.
#[test]
fn reload_reaches_the_kernel_binding_limit() {
    const TEST: &str = "reload_reaches_the_kernel_binding_limit";
    let Some(lab) = fast_path_lab(TEST) else {
        return;
    };
    let w = build(lab, V4).unwrap();
    let server: SocketAddr = Family::addr(V4.server, 3478).parse().unwrap();
    let sock = client_socket(&w);
    let limited = "unauth_rate = 1\nunauth_burst = 2";
    let unlimited = "unauth_rate = 0\nunauth_burst = 2";
    assert_eq!(limited.len(), unlimited.len(), "one config file for both");
    let child = start_kyuu_with(&w, "required", limited).unwrap();
    let before = binding_burst(&sock, server, 1, 10).unwrap();
    println!("{TEST}: at unauth_rate = 1: {before} of 10 answered");
    assert!(
        before <= 3,
        "the kernel holds a source to its burst: {before} of 10"
    );
    let m = metric_at_least(&w.server, "kyuu_turn_dropped_total", "rate_limited", 7).unwrap();
    assert!(
        metric(&m, "kyuu_turn_dropped_total", "rate_limited") >= 7,
        "the kernel's drops are counted: {m}"
    );
    let kernel_before = metric(&m, "kyuu_turn_fast_path_bindings_total", "");

    write_kyuu_config(&w, "required", unlimited).unwrap();
    let pid = child.pid().to_string();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(hup.success(), "kill -HUP {pid}");
    // The reload is asynchronous: try a burst until all ten are answered (bounded).
    let mut after = 0;
    for round in 2..20u8 {
        after = binding_burst(&sock, server, round, 10).unwrap();
        if after == 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("{TEST}: after the reload to unauth_rate = 0: {after} of 10 answered");
    assert_eq!(after, 10, "the reloaded limit reached the kernel");
    let m = metric_at_least(
        &w.server,
        "kyuu_turn_fast_path_bindings_total",
        "",
        kernel_before + 10,
    )
    .unwrap();
    assert!(
        metric(&m, "kyuu_turn_fast_path_bindings_total", "") >= kernel_before + 10,
        "the kernel, not userspace, answered them: {m}"
    );
    drop(child);
}

/// With a wildcard UDP listener the kernel answers Binding on the interface's addresses, and
/// follows them: an address added after start is answered by userspace at first, then (within
/// the refresh period, 5 s) by the kernel too.
#[test]
fn kernel_binding_follows_a_wildcard_listeners_addresses() {
    const TEST: &str = "kernel_binding_follows_a_wildcard_listeners_addresses";
    const ADDED: &str = "198.18.0.11";
    let Some(lab) = fast_path_lab(TEST) else {
        return;
    };
    let w = build(lab, V4).unwrap();
    let conf = write_kyuu_config(&w, "required", &format!("relay_ipv4 = \"{SERVER}\"")).unwrap();
    let text = std::fs::read_to_string(&conf).unwrap();
    let wildcard = text.replace(
        &format!("udp = [\"{SERVER}:3478\"]"),
        "udp = [\"0.0.0.0:3478\"]",
    );
    assert_ne!(text, wildcard, "the listener line was found");
    std::fs::write(&conf, wildcard).unwrap();
    let child = spawn_kyuu(&w, &conf).unwrap();
    let sock = client_socket(&w);
    let kernel = |w: &World| {
        metric(
            &metrics(&w.server).unwrap(),
            "kyuu_turn_fast_path_bindings_total",
            "",
        )
    };
    let mut sends = 0;
    let first: SocketAddr = Family::addr(SERVER, 3478).parse().unwrap();
    binding_answer(
        &sock,
        first,
        &binding_request([1; 12], false, false),
        &mut sends,
    )
    .unwrap();
    let m = metric_at_least(&w.server, "kyuu_turn_fast_path_bindings_total", "", sends).unwrap();
    assert_eq!(
        metric(&m, "kyuu_turn_fast_path_bindings_total", ""),
        sends,
        "the kernel answers on the address the interface had at start: {m}"
    );
    let before = kernel(&w);

    // A second address on the server's interface.
    w.server
        .ip(&["addr", "add", &format!("{ADDED}/24"), "dev", &w.server_if])
        .unwrap();
    let added: SocketAddr = Family::addr(ADDED, 3478).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut round = 0u8;
    let by_kernel = loop {
        round += 1;
        let mut n = 0;
        let a = binding_answer(
            &sock,
            added,
            &binding_request([2, round, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], false, false),
            &mut n,
        )
        .unwrap();
        let msg = kyuu_stun::Message::parse(&a).unwrap();
        assert_eq!(
            msg.class(),
            kyuu_stun::Class::Success,
            "answered on {added}"
        );
        std::thread::sleep(Duration::from_millis(1200));
        let now = kernel(&w);
        if now > before {
            break now - before;
        }
        assert!(
            Instant::now() < deadline,
            "the kernel never answered on {added} ({round} requests, all answered by userspace)"
        );
    };
    println!("{TEST}: {round} requests to {added}; the kernel answered {by_kernel} of them");
    drop(child);
}
