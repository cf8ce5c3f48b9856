//! The XDP program run on crafted packets with `BPF_PROG_TEST_RUN` (through `bpftool prog run`):
//! every rewritten packet is checked byte for byte and its IP and UDP checksums are verified from
//! scratch; every packet the program must not touch comes back unchanged with XDP_PASS. The last
//! test is the per-packet microbenchmark (ns/packet, printed, never asserted).
//!
//! Needs root and bpftool; skips otherwise unless `KYUU_LAB_REQUIRED=1`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;

use kyuu_ebpf::{Channel, FastPath};

#[path = "support/binding.rs"]
mod binding;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

fn skip(why: &str) -> bool {
    if std::env::var("KYUU_LAB_REQUIRED").as_deref() == Ok("1") {
        panic!("KYUU_LAB_REQUIRED=1 but {why}");
    }
    eprintln!("SKIP: {why}");
    true
}

fn usable() -> bool {
    if let Some(why) = kyuu_ebpf::unavailable() {
        return !skip(why);
    }
    if !rustix::process::geteuid().is_root() {
        return !skip("not root");
    }
    if Command::new("bpftool").arg("version").output().is_err() {
        return !skip("bpftool not installed");
    }
    true
}

struct Pinned {
    fp: FastPath,
    path: PathBuf,
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The BPF filesystem the program is pinned in: systemd mounts it at boot, a bare container may
/// not have it; then it is mounted there, as systemd would.
fn bpffs() {
    static MOUNTED: std::sync::Once = std::sync::Once::new();
    MOUNTED.call_once(|| {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if !mounts.lines().any(|l| {
            l.split(' ').nth(1) == Some("/sys/fs/bpf") && l.split(' ').nth(2) == Some("bpf")
        }) {
            let st = Command::new("mount")
                .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
                .status()
                .expect("run mount");
            assert!(
                st.success(),
                "mounting the BPF filesystem at /sys/fs/bpf failed"
            );
        }
    });
}

fn load(max_ip_len: u32) -> Pinned {
    bpffs();
    let path = PathBuf::from(format!(
        "/sys/fs/bpf/kyuu_test_{}_{}",
        std::process::id(),
        rand_u32()
    ));
    let fp = FastPath::load_for_test_run(&path, max_ip_len).expect("load the XDP program");
    Pinned { fp, path }
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(kyuu_ebpf::monotonic_ns());
    h.finish() as u32
}

/// Runs the program once on `pkt`: (return value, output packet, average ns).
fn run(p: &Pinned, pkt: &[u8], repeat: u32) -> (u32, Vec<u8>, u64) {
    let dir = std::env::temp_dir();
    let tag = format!("{}_{}", std::process::id(), rand_u32());
    let inp = dir.join(format!("kyuu_xdp_in_{tag}"));
    let outp = dir.join(format!("kyuu_xdp_out_{tag}"));
    std::fs::write(&inp, pkt).expect("write packet");
    let out = Command::new("bpftool")
        .arg("prog")
        .arg("run")
        .arg("pinned")
        .arg(&p.path)
        .arg("data_in")
        .arg(&inp)
        .arg("data_out")
        .arg(&outp)
        .arg("repeat")
        .arg(repeat.to_string())
        .output()
        .expect("bpftool");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bpftool prog run: {text}");
    let data = std::fs::read(&outp).unwrap_or_default();
    let _ = std::fs::remove_file(&inp);
    let _ = std::fs::remove_file(&outp);
    // "Return value: 3, duration (average): 41ns"
    let rv = text
        .split("Return value:")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no return value in {text}"));
    let ns = text
        .split("duration (average):")
        .nth(1)
        .map(|r| r.trim().trim_end_matches("ns").trim().to_string())
        .and_then(|r| r.split_whitespace().next().map(str::to_string))
        .and_then(|r| r.trim_end_matches("ns").parse().ok())
        .unwrap_or(0);
    (rv, data, ns)
}

const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

fn sum16(data: &[u8]) -> u32 {
    let mut s = 0u32;
    for c in data.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        s += u32::from(w);
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

fn pseudo(src: IpAddr, dst: IpAddr, udp_len: usize) -> Vec<u8> {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend([0, 17]);
            p.extend((udp_len as u16).to_be_bytes());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend(s.octets());
            p.extend(d.octets());
            p.extend((udp_len as u32).to_be_bytes());
            p.extend([0, 0, 0, 17]);
        }
        _ => panic!("mixed families"),
    }
    p
}

/// An Ethernet frame with a UDP datagram, checksums computed from scratch (`udp_csum` false: an
/// IPv4 datagram without a UDP checksum).
fn frame(src: SocketAddr, dst: SocketAddr, payload: &[u8], udp_csum: bool) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut udp = Vec::new();
    udp.extend(src.port().to_be_bytes());
    udp.extend(dst.port().to_be_bytes());
    udp.extend((udp_len as u16).to_be_bytes());
    udp.extend([0, 0]);
    udp.extend(payload);
    if udp_csum {
        let mut all = pseudo(src.ip(), dst.ip(), udp_len);
        all.extend(&udp);
        let c = !fold(sum16(&all));
        let c = if c == 0 { 0xffff } else { c };
        udp[6..8].copy_from_slice(&c.to_be_bytes());
    }
    let mut f = Vec::new();
    f.extend(MAC_B);
    f.extend(MAC_A);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend([0x08, 0x00]);
            let mut ip = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
            ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
            ip.extend(s.octets());
            ip.extend(d.octets());
            let c = !fold(sum16(&ip));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend([0x86, 0xdd]);
            f.extend([0x60, 0, 0, 0]);
            f.extend((udp_len as u16).to_be_bytes());
            f.extend([17, 64]);
            f.extend(s.octets());
            f.extend(d.octets());
        }
        _ => panic!("mixed families"),
    }
    f.extend(udp);
    f
}

/// Parses an emitted frame, verifying MACs (swapped), IP header checksum, lengths and the UDP
/// checksum; returns (src, dst, payload).
fn check(f: &[u8]) -> (SocketAddr, SocketAddr, Vec<u8>) {
    assert_eq!(f[0..6], MAC_A, "destination MAC");
    assert_eq!(f[6..12], MAC_B, "source MAC");
    let (src, dst, l4) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 => {
            let ip = &f[14..34];
            assert_eq!(fold(sum16(ip)), 0xffff, "IPv4 header checksum");
            assert_eq!(ip[8], 64, "TTL");
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            assert_eq!(total, f.len() - 14, "IPv4 total length");
            let s: [u8; 4] = ip[12..16].try_into().expect("4");
            let d: [u8; 4] = ip[16..20].try_into().expect("4");
            (IpAddr::from(s), IpAddr::from(d), &f[34..])
        }
        0x86dd => {
            let ip = &f[14..54];
            let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            assert_eq!(plen, f.len() - 54, "IPv6 payload length");
            let s: [u8; 16] = ip[8..24].try_into().expect("16");
            let d: [u8; 16] = ip[24..40].try_into().expect("16");
            (IpAddr::from(s), IpAddr::from(d), &f[54..])
        }
        other => panic!("ethertype {other:#x}"),
    };
    let udp_len = usize::from(u16::from_be_bytes([l4[4], l4[5]]));
    assert_eq!(udp_len, l4.len(), "UDP length");
    let csum = u16::from_be_bytes([l4[6], l4[7]]);
    if csum != 0 || src.is_ipv6() {
        let mut all = pseudo(src, dst, udp_len);
        all.extend(l4);
        assert_eq!(fold(sum16(&all)), 0xffff, "UDP checksum of {f:02x?}");
    }
    let sp = u16::from_be_bytes([l4[0], l4[1]]);
    let dp = u16::from_be_bytes([l4[2], l4[3]]);
    (
        SocketAddr::new(src, sp),
        SocketAddr::new(dst, dp),
        l4[8..].to_vec(),
    )
}

struct Net {
    client: SocketAddr,
    server: SocketAddr,
    relay: SocketAddr,
    peer: SocketAddr,
}

fn v4() -> Net {
    Net {
        client: "198.18.1.2:40000".parse().expect("addr"),
        server: "198.18.0.1:3478".parse().expect("addr"),
        relay: "198.18.0.1:50000".parse().expect("addr"),
        peer: "198.18.2.2:6000".parse().expect("addr"),
    }
}

fn v6() -> Net {
    Net {
        client: "[2001:2::1:2]:40000".parse().expect("addr"),
        server: "[2001:2::1]:3478".parse().expect("addr"),
        relay: "[2001:2::1]:50000".parse().expect("addr"),
        peer: "[2001:2::2:2]:6000".parse().expect("addr"),
    }
}

fn channel(n: &Net, expires_ns: u64) -> Channel {
    Channel {
        client: n.client,
        server: n.server,
        number: 0x4001,
        relay: n.relay,
        peer: n.peer,
        expires_ns,
        to_peer: true,
        to_client: true,
    }
}

fn far() -> u64 {
    kyuu_ebpf::monotonic_ns() + 3_600_000_000_000
}

fn payload(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 0x01)
        .collect()
}

#[test]
fn channel_data_both_ways_with_checksums_verified() {
    if !usable() {
        return;
    }
    let mut p = load(1500);
    for (name, net) in [("v4", v4()), ("v6", v6())] {
        p.fp.install(1, channel(&net, far())).expect("install");
        let mut emitted = 0;
        for len in (0..=9).chain([100, 333, 1000, 1400]) {
            let data = payload(len, len as u8);
            // Client → peer, without padding and with (non-zero) padding bytes.
            for pad_bytes in [0usize, (4 - len % 4) % 4] {
                let mut cd = vec![0x40, 0x01];
                cd.extend((len as u16).to_be_bytes());
                cd.extend(&data);
                cd.extend(std::iter::repeat_n(0xa5, pad_bytes));
                let pkt = frame(net.client, net.server, &cd, true);
                let (rv, out, _) = run(&p, &pkt, 1);
                assert_eq!(rv, XDP_TX, "{name} c2p len {len} pad {pad_bytes}");
                let (src, dst, got) = check(&out);
                assert_eq!((src, dst), (net.relay, net.peer), "{name} c2p addresses");
                assert_eq!(got, data, "{name} c2p payload len {len}");
                emitted += 1;
            }
            // Peer → client.
            let pkt = frame(net.peer, net.relay, &data, true);
            let (rv, out, _) = run(&p, &pkt, 1);
            assert_eq!(rv, XDP_TX, "{name} p2c len {len}");
            let (src, dst, got) = check(&out);
            assert_eq!((src, dst), (net.server, net.client), "{name} p2c addresses");
            assert_eq!(got[..4], [0x40, 0x01, (len >> 8) as u8, len as u8]);
            assert_eq!(got[4..], data[..], "{name} p2c payload");
            emitted += 1;
        }
        let [to_peer, to_client] = p.fp.take_traffic(1);
        assert!(to_peer.packets > 0 && to_client.packets > 0);
        assert_eq!(to_peer.packets + to_client.packets, emitted);
        p.fp.remove(1);
    }
}

#[test]
fn ipv4_without_udp_checksum_stays_without() {
    if !usable() {
        return;
    }
    let mut p = load(1500);
    let net = v4();
    p.fp.install(7, channel(&net, far())).expect("install");
    let data = payload(21, 3);
    let pkt = frame(net.peer, net.relay, &data, false);
    let (rv, out, _) = run(&p, &pkt, 1);
    assert_eq!(rv, XDP_TX);
    let (_, _, got) = check(&out);
    assert_eq!(out[34 + 6..34 + 8], [0, 0], "no UDP checksum");
    assert_eq!(got[4..], data[..]);
}

#[test]
fn everything_else_passes_to_userspace_unchanged() {
    if !usable() {
        return;
    }
    let mut p = load(300);
    let net = v4();
    p.fp.install(1, channel(&net, far())).expect("install");
    let n6 = v6();
    let mut expired = channel(&n6, 1);
    expired.number = 0x4002;
    p.fp.install(2, expired).expect("install");
    let cd = |ch: u16, len: usize, extra: usize| {
        let mut v = ch.to_be_bytes().to_vec();
        v.extend((len as u16).to_be_bytes());
        v.extend(payload(len + extra, 9));
        v
    };
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        // A STUN Binding request (first byte 0).
        (
            "stun",
            frame(
                net.client,
                net.server,
                &{
                    let mut m = vec![0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42];
                    m.extend([7; 12]);
                    m
                },
                true,
            ),
        ),
        (
            "unknown channel",
            frame(net.client, net.server, &cd(0x4003, 10, 0), true),
        ),
        (
            "unknown client",
            frame(
                "198.18.1.3:40000".parse().expect("a"),
                net.server,
                &cd(0x4001, 10, 0),
                true,
            ),
        ),
        (
            "length beyond datagram",
            frame(net.client, net.server, &cd(0x4001, 10, 0)[..10], true),
        ),
        (
            "trailing bytes beyond padding",
            frame(net.client, net.server, &cd(0x4001, 8, 4), true),
        ),
        (
            "oversize c2p",
            frame(net.client, net.server, &cd(0x4001, 280, 0), true),
        ),
        (
            "oversize p2c",
            frame(net.peer, net.relay, &payload(270, 1), true),
        ),
        (
            "unknown peer",
            frame(
                "198.18.2.3:6000".parse().expect("a"),
                net.relay,
                &payload(10, 1),
                true,
            ),
        ),
        (
            "unknown peer port",
            frame(
                "198.18.2.2:6001".parse().expect("a"),
                net.relay,
                &payload(10, 1),
                true,
            ),
        ),
        ("expired", frame(n6.peer, n6.relay, &payload(10, 1), true)),
        ("v6 zero checksum", {
            let mut f = frame(n6.client, n6.server, &cd(0x4002, 10, 0), true);
            f[54 + 6] = 0;
            f[54 + 7] = 0;
            f
        }),
    ];
    // A fragment (MF set) and a header with options.
    let mut frag = frame(net.peer, net.relay, &payload(10, 1), true);
    frag[14 + 6] = 0x20;
    cases.push(("fragment", frag));
    let mut opts = frame(net.peer, net.relay, &payload(12, 1), true);
    opts[14] = 0x46;
    cases.push(("ip options", opts));
    // TCP to the listener.
    let mut tcp = frame(net.client, net.server, &cd(0x4001, 10, 0), true);
    tcp[14 + 9] = 6;
    cases.push(("tcp", tcp));
    for (name, pkt) in cases {
        let (rv, out, _) = run(&p, &pkt, 1);
        assert_eq!(rv, XDP_PASS, "{name}");
        assert_eq!(
            out, pkt,
            "{name}: the packet must reach userspace unchanged"
        );
    }
    let [a, b] = p.fp.take_traffic(1);
    assert_eq!((a.packets, b.packets), (0, 0));
}

#[test]
fn removed_entries_pass() {
    if !usable() {
        return;
    }
    let mut p = load(1500);
    let net = v4();
    p.fp.install(1, channel(&net, far())).expect("install");
    let pkt = frame(net.peer, net.relay, &payload(10, 1), true);
    assert_eq!(run(&p, &pkt, 1).0, XDP_TX);
    // Only the to-peer direction left (to-client budget spent): peer datagrams go up.
    let mut half = channel(&net, far());
    half.to_client = false;
    p.fp.install(1, half).expect("update");
    assert_eq!(run(&p, &pkt, 1).0, XDP_PASS);
    p.fp.remove(1);
    let mut cd = vec![0x40, 0x01, 0, 4];
    cd.extend([1, 2, 3, 4]);
    assert_eq!(
        run(&p, &frame(net.client, net.server, &cd, true), 1).0,
        XDP_PASS
    );
}

/// Per-packet cost of the program in the kernel (BPF_PROG_TEST_RUN, 1,000,000 runs); doubles as a
/// check that the verifier accepts the program. The test run reruns the program on the buffer the
/// previous run left, so the entries form a loop: client ChannelData becomes a datagram that a
/// second entry turns back into the same ChannelData (alternating c2p and p2c, 100-byte payload),
/// and after an even number of runs the packet is the one that went in.
#[test]
fn microbenchmark_ns_per_packet() {
    if !usable() {
        return;
    }
    let mut p = load(1500);
    let net = v4();
    p.fp.install(1, channel(&net, far())).expect("install");
    let back = Channel {
        client: net.server,
        server: net.client,
        number: 0x4001,
        relay: net.peer,
        peer: net.relay,
        expires_ns: far(),
        to_peer: false,
        to_client: true,
    };
    p.fp.install(2, back).expect("install");
    let data = payload(100, 1);
    let mut cd = vec![0x40, 0x01, 0, 100];
    cd.extend(&data);
    let c2p = frame(net.client, net.server, &cd, true);
    let (rv, out, ns) = run(&p, &c2p, 1_000_000);
    assert_eq!(rv, XDP_TX, "relayed");
    assert_eq!(
        out, c2p,
        "a million rewrites later the packet is the one that went in"
    );
    println!("xdp test run, relayed 100 B (c2p and p2c alternating): {ns} ns/packet");
    let stun = frame(
        net.client,
        net.server,
        &[
            0, 1, 0, 0, 0x21, 0x12, 0xa4, 0x42, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
        ],
        true,
    );
    let (rv, _, ns) = run(&p, &stun, 1_000_000);
    assert_eq!(rv, XDP_PASS, "STUN passes");
    println!("xdp test run, STUN passed to userspace: {ns} ns/packet");
    let [a, b] = p.fp.take_traffic(1);
    assert_eq!(a.packets, 500_000);
    assert_eq!(b.packets, 0);
    assert_eq!(p.fp.take_traffic(2)[1].packets, 500_000);
}

// ---- STUN Binding answered in the kernel ----

const SOFTWARE: &str = "kyuu 0.1.0 (test)";

fn binding_config(n: &Net, rate: u32, burst: u32) -> kyuu_ebpf::BindingConfig {
    kyuu_ebpf::BindingConfig {
        listeners: vec![n.server],
        software: SOFTWARE.into(),
        rate,
        burst,
    }
}

/// A Binding request (`fingerprint`: with a FINGERPRINT) built with kyuu_stun.
fn binding_request(tid: [u8; 12], fingerprint: bool) -> Vec<u8> {
    binding::request(tid, &[], fingerprint)
}

/// What userspace kyuu answers (crates/kyuu-turn/src/server/binding.rs with RFC 5780 off):
/// XOR-MAPPED-ADDRESS, SOFTWARE, FINGERPRINT.
fn userspace_answer(tid: [u8; 12], mapped: SocketAddr) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let mut b = kyuu_stun::MessageBuilder::new(
        &mut buf,
        kyuu_stun::method::BINDING,
        kyuu_stun::Class::Success,
        kyuu_stun::TransactionId(tid),
    )
    .expect("builder");
    b.add_xor_address(kyuu_stun::attr::XOR_MAPPED_ADDRESS, mapped)
        .expect("xma");
    b.add(kyuu_stun::attr::SOFTWARE, SOFTWARE.as_bytes())
        .expect("software");
    b.add_fingerprint().expect("fingerprint");
    let n = b.finish();
    buf[..n].to_vec()
}

#[test]
fn binding_requests_answered_in_the_kernel_v4_and_v6() {
    if !usable() {
        return;
    }
    for (name, net) in [("v4", v4()), ("v6", v6())] {
        let mut p = load(1500);
        p.fp.enable_binding(&binding_config(&net, 0, 0), None)
            .expect("enable binding");
        for (i, fingerprint) in [false, true].into_iter().enumerate() {
            let tid = [i as u8 + 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0xfe];
            let req = binding_request(tid, fingerprint);
            let pkt = frame(net.client, net.server, &req, true);
            let (rv, out, _) = run(&p, &pkt, 1);
            assert_eq!(rv, XDP_TX, "{name} fingerprint {fingerprint}: answered");
            let (src, dst, got) = check(&out);
            assert_eq!(
                (src, dst),
                (net.server, net.client),
                "{name} addresses swapped"
            );
            binding::check_success(&got, tid, net.client, name);
            assert_eq!(
                got,
                userspace_answer(tid, net.client),
                "{name}: byte for byte what userspace answers"
            );
        }
        let b = p.fp.take_bindings();
        assert_eq!((b.answered, b.rate_limited), (2, 0), "{name} counters");
        assert_eq!(p.fp.take_bindings().answered, 0, "counted once");
    }
}

/// The program with Binding on a wildcard listener (0.0.0.0:3478) on an interface with the
/// server's address only.
fn load_wildcard_binding(net: &Net) -> Pinned {
    let mut p = load(1500);
    let cfg = kyuu_ebpf::BindingConfig {
        listeners: vec!["0.0.0.0:3478".parse().expect("addr")],
        ..binding_config(net, 0, 0)
    };
    p.fp.enable_binding(&cfg, Some(&[net.server.ip()]))
        .expect("enable");
    p
}

#[test]
fn binding_on_a_wildcard_listener_answers_for_its_addresses() {
    if !usable() {
        return;
    }
    let net = v4();
    let p = load_wildcard_binding(&net);
    let req = binding_request([9; 12], false);
    assert_eq!(
        run(&p, &frame(net.client, net.server, &req, true), 1).0,
        XDP_TX
    );
    // Another address (not the interface's): up the stack.
    let other: SocketAddr = "198.18.0.9:3478".parse().expect("addr");
    assert_eq!(
        run(&p, &frame(net.client, other, &req, true), 1).0,
        XDP_PASS
    );
}

#[test]
fn binding_requests_the_kernel_must_not_answer_pass_unchanged() {
    if !usable() {
        return;
    }
    for (name, net) in [("v4", v4()), ("v6", v6())] {
        let mut p = load(1500);
        p.fp.enable_binding(&binding_config(&net, 0, 0), None)
            .expect("enable binding");
        let tid = [7u8; 12];
        let with_attr = |t: u16, v: &[u8], fp: bool| binding::request(tid, &[(t, v)], fp);
        let mut bad_fp = binding_request(tid, true);
        bad_fp[27] ^= 1;
        let mut wrong_len = binding_request(tid, false);
        wrong_len[3] = 4;
        let mut long_tail = binding_request(tid, false);
        long_tail.extend([0, 0, 0, 0]);
        let mut response = binding_request(tid, false);
        response[1] = 0x01;
        response[0] = 0x01;
        let mut error = binding_request(tid, false);
        error[0] = 0x01;
        error[1] = 0x11;
        let mut indication = binding_request(tid, false);
        indication[1] = 0x11;
        let mut no_cookie = binding_request(tid, false);
        no_cookie[4] = 0;
        let mut other_port = net.server;
        other_port.set_port(3479);
        let mut port0 = net.client;
        port0.set_port(0);
        let plain = binding_request(tid, false);
        let to_server = |m: &[u8]| frame(net.client, net.server, m, true);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            (
                "CHANGE-REQUEST",
                to_server(&with_attr(
                    kyuu_stun::attr::CHANGE_REQUEST,
                    &[0, 0, 0, 6],
                    false,
                )),
            ),
            (
                "USERNAME + FINGERPRINT",
                to_server(&with_attr(kyuu_stun::attr::USERNAME, b"abcd", true)),
            ),
            (
                "SOFTWARE",
                to_server(&with_attr(kyuu_stun::attr::SOFTWARE, b"some", false)),
            ),
            ("bad FINGERPRINT", to_server(&bad_fp)),
            ("wrong length", to_server(&wrong_len)),
            ("trailing bytes", to_server(&long_tail)),
            ("response", to_server(&response)),
            ("error response", to_server(&error)),
            ("indication", to_server(&indication)),
            ("no magic cookie", to_server(&no_cookie)),
            (
                "non-listener port",
                frame(net.client, other_port, &plain, true),
            ),
            ("source port 0", frame(port0, net.server, &plain, true)),
            (
                "classic RFC 3489",
                to_server(&{
                    let mut m = plain.clone();
                    m[4..8].copy_from_slice(&[1, 2, 3, 4]);
                    m
                }),
            ),
        ];
        for (case, pkt) in cases {
            let (rv, out, _) = run(&p, &pkt, 1);
            assert_eq!(rv, XDP_PASS, "{name} {case}");
            assert_eq!(out, pkt, "{name} {case}: reaches userspace unchanged");
        }
        assert_eq!(p.fp.take_bindings().answered, 0);
    }
    // With Binding not enabled, a plain request goes up too.
    let p = load(1500);
    let net = v4();
    let pkt = frame(
        net.client,
        net.server,
        &binding_request([1; 12], false),
        true,
    );
    let (rv, out, _) = run(&p, &pkt, 1);
    assert_eq!((rv, out), (XDP_PASS, pkt), "binding off");
}

#[test]
fn binding_rate_limit_drops_after_the_burst_per_source() {
    if !usable() {
        return;
    }
    const XDP_DROP: u32 = 1;
    let net = v4();
    let mut p = load(1500);
    // 1 answer per second after a burst of 5: the test's runs take far less than a second.
    p.fp.enable_binding(&binding_config(&net, 1, 5), None)
        .expect("enable");
    let req = binding_request([3; 12], true);
    let pkt = frame(net.client, net.server, &req, true);
    let rvs: Vec<u32> = (0..8).map(|_| run(&p, &pkt, 1).0).collect();
    assert_eq!(&rvs[..5], &[XDP_TX; 5], "the burst is answered: {rvs:?}");
    assert!(
        rvs[5..].iter().filter(|r| **r == XDP_DROP).count() >= 2,
        "then dropped: {rvs:?}"
    );
    // Another source has its own bucket.
    let other: SocketAddr = "198.18.1.7:40000".parse().expect("addr");
    assert_eq!(run(&p, &frame(other, net.server, &req, true), 1).0, XDP_TX);
    let b = p.fp.take_bindings();
    assert!(b.answered >= 6 && b.rate_limited >= 2, "{b:?}");
    assert_eq!(b.answered + b.rate_limited, 9);
}

#[test]
fn binding_wildcard_addresses_follow_a_refresh() {
    if !usable() {
        return;
    }
    let net = v4();
    let mut p = load_wildcard_binding(&net);
    assert!(p.fp.binding_has_wildcard());
    let req = binding_request([9; 12], false);
    let added: SocketAddr = "198.18.0.9:3478".parse().expect("addr");
    let to = |dst| frame(net.client, dst, &req, true);
    assert_eq!(run(&p, &to(added), 1).0, XDP_PASS, "not an address yet");
    // The interface gains 198.18.0.9 and loses the server's address.
    assert_eq!(
        p.fp.refresh_binding_listeners(&[added.ip()])
            .expect("refresh"),
        (1, 1)
    );
    assert_eq!(
        run(&p, &to(added), 1).0,
        XDP_TX,
        "the new address is answered"
    );
    assert_eq!(
        run(&p, &to(net.server), 1).0,
        XDP_PASS,
        "the old one no more"
    );
    assert_eq!(
        p.fp.refresh_binding_listeners(&[added.ip()])
            .expect("refresh"),
        (0, 0),
        "nothing changed"
    );
}

#[test]
fn binding_limits_change_without_reloading_the_program() {
    if !usable() {
        return;
    }
    const XDP_DROP: u32 = 1;
    let net = v4();
    let mut p = load(1500);
    assert!(
        !p.fp.set_binding_limits(SOFTWARE, 0, 0).expect("no binding"),
        "nothing to change before enable_binding"
    );
    p.fp.enable_binding(&binding_config(&net, 1, 1), None)
        .expect("enable");
    let pkt = frame(
        net.client,
        net.server,
        &binding_request([4; 12], false),
        true,
    );
    let rvs: Vec<u32> = (0..3).map(|_| run(&p, &pkt, 1).0).collect();
    assert_eq!(rvs, [XDP_TX, XDP_DROP, XDP_DROP], "burst 1");
    assert!(p.fp.set_binding_limits("other", 0, 0).expect("set"));
    let (rv, out, _) = run(&p, &pkt, 1);
    assert_eq!(rv, XDP_TX, "unlimited now");
    let (_, _, got) = check(&out);
    let msg = kyuu_stun::Message::parse(&got).expect("a STUN message");
    assert_eq!(
        msg.get(kyuu_stun::attr::SOFTWARE),
        Some(&b"other"[..]),
        "the new SOFTWARE"
    );
}
