//! Lab basics and the userspace delay/loss forwarder.
//! Needs root, `ip` and `nft`; skips otherwise unless KYUU_LAB_REQUIRED=1.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kyuu_lab::{lab_or_skip, LinkSpec, Node};

/// Echo every datagram back until `deadline` passes or `stop` arrives.
fn spawn_echo(
    node: &Node,
    addr: &str,
    lifetime: Duration,
) -> Result<std::thread::JoinHandle<usize>> {
    let sock = node.udp_bind(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + lifetime;
        let mut buf = [0u8; 2048];
        let mut n_echoed = 0;
        while Instant::now() < deadline {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            if buf.get(..n) == Some(b"stop") {
                break;
            }
            if sock.send_to(buf.get(..n).unwrap_or_default(), from).is_ok() {
                n_echoed += 1;
            }
        }
        n_echoed
    });
    Ok(handle)
}

/// Send `count` probes one at a time, return the RTT of each answered one.
fn probe_rtts(sock: &UdpSocket, to: &str, count: u32, wait: Duration) -> Result<Vec<Duration>> {
    sock.set_read_timeout(Some(wait))?;
    let mut rtts = Vec::new();
    let mut buf = [0u8; 64];
    for i in 0..count {
        let msg = i.to_be_bytes();
        let t0 = Instant::now();
        sock.send_to(&msg, to)?;
        // Skip late answers to earlier probes; bounded by the read timeout.
        for _ in 0..8 {
            match sock.recv_from(&mut buf) {
                Ok((4, _)) if buf.get(..4) == Some(&msg[..]) => {
                    rtts.push(t0.elapsed());
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    Ok(rtts)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[test]
fn hosts_on_a_switch_talk_and_teardown_removes_namespaces() -> Result<()> {
    let Some(lab) = lab_or_skip("hosts_on_a_switch_talk_and_teardown_removes_namespaces") else {
        return Ok(());
    };
    let sw = lab.switch("sw")?;
    let a = lab.host("a")?;
    let b = lab.host("b")?;
    a.attach(&sw, "198.18.1.1/24")?;
    b.attach(&sw, "198.18.1.2/24")?;
    let echo = spawn_echo(&b, "198.18.1.2:7000", Duration::from_secs(10))?;
    let sock = a.udp_bind("0.0.0.0:0")?;
    let rtts = probe_rtts(&sock, "198.18.1.2:7000", 5, Duration::from_secs(1))?;
    ensure!(rtts.len() == 5, "only {} of 5 echoes came back", rtts.len());
    sock.send_to(b"stop", "198.18.1.2:7000")?;
    let echoed = echo.join().map_err(|_| anyhow::anyhow!("echo panicked"))?;
    ensure!(echoed == 5, "echoed {echoed}");

    // A spawned process lives in the namespace and dies with the lab.
    let mut cmd = b.command("sleep");
    cmd.arg("30");
    let child = b.spawn(cmd)?;
    let pid = child.pid();
    ensure!(Path::new(&format!("/proc/{pid}")).exists());
    let mut cmd = a.command("ip");
    cmd.args(["-4", "-o", "addr"]);
    let out = a.run(cmd, Duration::from_secs(5))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(text.contains("198.18.1.1/24"), "ip addr in a: {text}");

    let names: Vec<String> = [a.ns_name(), b.ns_name(), sw.ns_name()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    std::mem::forget(child); // the lab must kill it by itself
    drop(lab);
    for ns in &names {
        ensure!(
            !Path::new("/run/netns").join(ns).exists(),
            "{ns} left behind"
        );
    }
    // Killed and reaped: no such process (pids are not reused this fast).
    ensure!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "child {pid} still alive"
    );
    Ok(())
}

#[test]
fn rejects_addresses_outside_lab_range() -> Result<()> {
    let Some(lab) = lab_or_skip("rejects_addresses_outside_lab_range") else {
        return Ok(());
    };
    let sw = lab.switch("sw")?;
    let a = lab.host("a")?;
    ensure!(a.attach(&sw, "10.0.0.1/24").is_err());
    ensure!(a.route_default("192.168.1.1").is_err());
    Ok(())
}

#[test]
fn delay_link_adds_configured_rtt() -> Result<()> {
    let Some(lab) = lab_or_skip("delay_link_adds_configured_rtt") else {
        return Ok(());
    };
    let sw = lab.switch("sw")?;
    let a = lab.host("a")?;
    let b = lab.host("b")?;
    let delay = Duration::from_millis(10);
    let ia = a.attach_with(&sw, "198.18.2.1/24", LinkSpec::delay(delay))?;
    b.attach(&sw, "198.18.2.2/24")?;
    let echo = spawn_echo(&b, "198.18.2.2:7000", Duration::from_secs(20))?;
    let sock = a.udp_bind("0.0.0.0:0")?;
    // First probe pays for ARP; measure the rest.
    let _ = probe_rtts(&sock, "198.18.2.2:7000", 1, Duration::from_secs(2))?;
    let mut rtts = probe_rtts(&sock, "198.18.2.2:7000", 20, Duration::from_secs(2))?;
    sock.send_to(b"stop", "198.18.2.2:7000")?;
    let _ = echo.join();
    ensure!(
        rtts.len() == 20,
        "only {} of 20 echoes came back",
        rtts.len()
    );
    let min = rtts.iter().min().copied().unwrap_or_default();
    let med = median(&mut rtts);
    println!("10 ms one-way link: min RTT {min:?}, median {med:?}");
    // Delay applies each way: RTT can never be below 2 x delay.
    ensure!(min >= 2 * delay, "min RTT {min:?} below 2 x {delay:?}");
    // Generous ceiling: shared 2-core CI machines.
    ensure!(
        med < Duration::from_millis(80),
        "median RTT {med:?} too high"
    );
    let link = ia.link.context("attach_with returns the link handle")?;
    ensure!(link.stats().out_forwarded.load(Ordering::Relaxed) >= 21);

    // Changing the spec at run time takes effect.
    link.set(LinkSpec::delay(Duration::from_millis(30)));
    let echo = spawn_echo(&b, "198.18.2.2:7001", Duration::from_secs(20))?;
    let rtts = probe_rtts(&sock, "198.18.2.2:7001", 3, Duration::from_secs(2))?;
    sock.send_to(b"stop", "198.18.2.2:7001")?;
    let _ = echo.join();
    let min = rtts.iter().min().copied().context("no echo after set()")?;
    ensure!(
        min >= Duration::from_millis(60),
        "after set(30 ms) min RTT {min:?}"
    );
    Ok(())
}

#[test]
fn loss_link_drops_about_the_configured_fraction() -> Result<()> {
    let Some(lab) = lab_or_skip("loss_link_drops_about_the_configured_fraction") else {
        return Ok(());
    };
    let sw = lab.switch("sw")?;
    let a = lab.host("a")?;
    let b = lab.host("b")?;
    // Static ARP so the loss does not hit neighbour discovery.
    let ia = a.attach_with(&sw, "198.18.3.1/24", LinkSpec::default().loss(0.3))?;
    let ib = b.attach(&sw, "198.18.3.2/24")?;
    let mac_b = b.ip(&["-br", "link", "show", &ib.name])?;
    let mac_b = mac_b
        .split_whitespace()
        .nth(2)
        .context("mac of b")?
        .to_owned();
    a.ip(&[
        "neigh",
        "replace",
        "198.18.3.2",
        "lladdr",
        &mac_b,
        "dev",
        &ia.name,
        "nud",
        "permanent",
    ])?;
    let rx = b.udp_bind("198.18.3.2:7000")?;
    rx.set_read_timeout(Some(Duration::from_millis(300)))?;
    let tx = a.udp_bind("0.0.0.0:0")?;
    let sent = 400;
    for i in 0u32..sent {
        tx.send_to(&i.to_be_bytes(), "198.18.3.2:7000")?;
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut got = 0u32;
    let mut buf = [0u8; 16];
    for _ in 0..sent {
        if rx.recv_from(&mut buf).is_err() {
            break;
        }
        got += 1;
    }
    let frac = f64::from(got) / f64::from(sent);
    println!("30% loss link: {got}/{sent} delivered ({frac:.2})");
    // 400 Bernoulli(0.7) trials: sd ~ 0.023; accept +-5 sd.
    ensure!((0.58..=0.82).contains(&frac), "delivered fraction {frac}");
    Ok(())
}

#[test]
fn tcp_bulk_transfer_over_delayed_link() -> Result<()> {
    let Some(lab) = lab_or_skip("tcp_bulk_transfer_over_delayed_link") else {
        return Ok(());
    };
    let sw = lab.switch("sw")?;
    let a = lab.host("a")?;
    let b = lab.host("b")?;
    a.attach_with(
        &sw,
        "198.18.4.1/24",
        LinkSpec::delay(Duration::from_millis(2)),
    )?;
    b.attach_with(
        &sw,
        "198.18.4.2/24",
        LinkSpec::delay(Duration::from_millis(2)),
    )?;
    let listener = b.tcp_listen("198.18.4.2:8000")?;
    let size = 4 << 20;
    let server = std::thread::spawn(move || -> std::io::Result<usize> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut total = 0;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                break;
            }
            total += n;
        }
        Ok(total)
    });
    let mut stream = a.in_ns(|| {
        TcpStream::connect_timeout(
            &"198.18.4.2:8000".parse().expect("addr"),
            Duration::from_secs(5),
        )
    })??;
    stream.set_write_timeout(Some(Duration::from_secs(20)))?;
    let data = vec![0x5au8; size];
    let t0 = Instant::now();
    stream.write_all(&data)?;
    drop(stream);
    let total = server
        .join()
        .map_err(|_| anyhow::anyhow!("server panicked"))??;
    println!(
        "TCP {size} bytes over 2x2 ms forwarded links in {:?}",
        t0.elapsed()
    );
    ensure!(total == size, "received {total} of {size}");
    Ok(())
}

#[test]
fn stale_namespaces_of_dead_processes_are_removed() -> Result<()> {
    let Some(lab) = lab_or_skip("stale_namespaces_of_dead_processes_are_removed") else {
        return Ok(());
    };
    // Above the kernel's maximum pid_max (2^22), so never a live process.
    // Unique per test process, so concurrent runs of this test do not collide.
    let stale = format!("kyuu-4194399-{}-gone", std::process::id());
    let stale = stale.as_str();
    // `ip netns add` creates /run/netns/<name> and then bind-mounts the new namespace on it; a
    // concurrent test's Lab::new can clean the file up between the two (it names a dead pid) and
    // the add fails. Seen once in CI; a few bounded tries.
    let mut added = false;
    for _ in 0..5 {
        let mut add = std::process::Command::new("ip");
        add.args(["netns", "add", stale]);
        if add.status()?.success() {
            added = true;
            break;
        }
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", stale])
            .stderr(std::process::Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(50));
    }
    ensure!(added, "ip netns add {stale}");
    // A concurrent test's Lab::new may get there first; either way it must go.
    let removed = kyuu_lab::Lab::cleanup_stale()?;
    println!("cleanup_stale removed {removed}");
    ensure!(
        !Path::new("/run/netns").join(stale).exists(),
        "{stale} still there"
    );
    // Our own lab's namespaces are untouched.
    let h = lab.host("h")?;
    kyuu_lab::Lab::cleanup_stale()?;
    ensure!(h.ns_path().exists());
    Ok(())
}

#[test]
fn point_to_point_link_with_delay_between_routers() -> Result<()> {
    let Some(lab) = lab_or_skip("point_to_point_link_with_delay_between_routers") else {
        return Ok(());
    };
    let r1 = lab.router("r1", kyuu_lab::NatKind::None)?;
    let r2 = lab.router("r2", kyuu_lab::NatKind::None)?;
    let (i1, i2) = lab.connect(
        &r1,
        "198.18.6.1/30",
        &r2,
        "198.18.6.2/30",
        Some(LinkSpec::delay(Duration::from_millis(5))),
    )?;
    ensure!(i1.link.is_some() && i2.link.is_some());
    let echo = spawn_echo(&r2, "198.18.6.2:7000", Duration::from_secs(10))?;
    let sock = r1.udp_bind("198.18.6.1:0")?;
    let _ = probe_rtts(&sock, "198.18.6.2:7000", 1, Duration::from_secs(2))?;
    let rtts = probe_rtts(&sock, "198.18.6.2:7000", 5, Duration::from_secs(2))?;
    sock.send_to(b"stop", "198.18.6.2:7000")?;
    let _ = echo.join();
    let min = rtts
        .iter()
        .min()
        .copied()
        .context("no echo over p2p link")?;
    ensure!(min >= Duration::from_millis(10), "p2p min RTT {min:?}");

    // A hard link failure and recovery.
    i1.down()?;
    // Sending fails outright (no route) or goes unanswered.
    let none =
        probe_rtts(&sock, "198.18.6.2:7000", 1, Duration::from_millis(200)).unwrap_or_default();
    ensure!(none.is_empty(), "echo answered over a downed link");
    i1.up()?;
    Ok(())
}
