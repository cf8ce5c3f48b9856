//! Each NatKind behaves as RFC 4787 names it, probed with plain UDP.
//! Needs root, `ip` and `nft`; skips otherwise unless KYUU_LAB_REQUIRED=1.

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use kyuu_lab::{lab_or_skip, Dependence, Lab, NatKind, Node};

const S1: &str = "198.18.0.10";
const S2: &str = "198.18.0.11";
const NAT_WAN: &str = "198.18.0.1";

struct World {
    _lab: Lab,
    client: Node,
    server: Node,
}

fn build(lab: Lab, kind: NatKind) -> Result<World> {
    let wan = lab.switch("wan")?;
    let lan = lab.switch("lan")?;
    let server = lab.host("srv")?;
    let eth = server.attach(&wan, &format!("{S1}/24"))?;
    server.add_addr(&eth, &format!("{S2}/24"))?;
    let nat = lab.router("nat", kind)?;
    nat.wan(&wan, &format!("{NAT_WAN}/24"))?;
    nat.lan(&lan, "198.19.1.1/24")?;
    let client = lab.host("cli")?;
    client.attach(&lan, "198.19.1.10/24")?;
    client.route_default("198.19.1.1")?;
    if kind == NatKind::None {
        server.route("198.19.1.0/24", NAT_WAN)?;
    }
    Ok(World {
        _lab: lab,
        client,
        server,
    })
}

/// Receive one datagram (bounded), returning its source.
fn recv_from(sock: &UdpSocket, wait: Duration) -> Option<SocketAddr> {
    sock.set_read_timeout(Some(wait)).ok()?;
    let mut buf = [0u8; 64];
    sock.recv_from(&mut buf).ok().map(|(_, from)| from)
}

/// Send from `client` to `server`, return the source address the server saw.
/// Retries a few times: the first packet may wait on ARP.
fn mapped(client: &UdpSocket, server: &UdpSocket) -> Result<SocketAddr> {
    let to = server.local_addr()?;
    for _ in 0..5 {
        client.send_to(b"probe", to)?;
        if let Some(from) = recv_from(server, Duration::from_millis(400)) {
            return Ok(from);
        }
    }
    anyhow::bail!("no probe from client reached {to}")
}

struct Observed {
    mapping: Dependence,
    filtering: Dependence,
    public: SocketAddr,
}

fn observe(w: &World) -> Result<Observed> {
    let srv = |addr: &str| w.server.udp_bind(addr);
    let (s1a, s1b) = (srv(&format!("{S1}:3478"))?, srv(&format!("{S1}:3479"))?);
    let (s2a, s2b) = (srv(&format!("{S2}:3478"))?, srv(&format!("{S2}:3479"))?);

    // Mapping: the same inside socket towards three remote endpoints.
    let c = w.client.udp_bind("0.0.0.0:40000")?;
    let m_s1a = mapped(&c, &s1a)?;
    let m_s1b = mapped(&c, &s1b)?;
    let m_s2a = mapped(&c, &s2a)?;
    let mapping = if m_s1a == m_s1b && m_s1a == m_s2a {
        Dependence::EndpointIndependent
    } else if m_s1a == m_s1b {
        Dependence::AddressDependent
    } else {
        Dependence::AddressAndPortDependent
    };

    // Filtering: a fresh inside socket that only ever sent to S1:3478.
    let c2 = w.client.udp_bind("0.0.0.0:40001")?;
    let m = mapped(&c2, &s1a)?;
    for (i, s) in [&s1b, &s2a, &s2b].iter().enumerate() {
        // Tagged so the client can tell which one got through.
        let tag = [b'0' + u8::try_from(i).unwrap_or(9)];
        for _ in 0..3 {
            s.send_to(&tag, m)?;
        }
    }
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_millis(800);
    let mut buf = [0u8; 64];
    c2.set_read_timeout(Some(Duration::from_millis(100)))?;
    while Instant::now() < deadline {
        if let Ok((n, from)) = c2.recv_from(&mut buf) {
            if n == 1 {
                got.insert(from);
            }
        }
    }
    let from_s1b = got.contains(&s1b.local_addr()?);
    let from_s2a = got.contains(&s2a.local_addr()?);
    let from_s2b = got.contains(&s2b.local_addr()?);
    let filtering = match (from_s1b, from_s2a, from_s2b) {
        (true, true, true) => Dependence::EndpointIndependent,
        (true, false, false) => Dependence::AddressDependent,
        (false, false, false) => Dependence::AddressAndPortDependent,
        other => {
            anyhow::bail!("inconsistent filtering: (S1:other port, S2, S2:other port) = {other:?}")
        }
    };
    // Replies from the endpoint it sent to always pass.
    s1a.send_to(b"reply", m)?;
    ensure!(
        recv_from(&c2, Duration::from_secs(1)) == Some(s1a.local_addr()?),
        "reply from S1:3478 blocked"
    );
    Ok(Observed {
        mapping,
        filtering,
        public: m_s1a,
    })
}

fn check_kind(test: &str, kind: NatKind) -> Result<()> {
    let Some(lab) = lab_or_skip(test) else {
        return Ok(());
    };
    let world = build(lab, kind)?;
    let o = observe(&world).with_context(|| format!("{kind:?}"))?;
    println!(
        "{kind:?}: mapping {:?}, filtering {:?}, public {}",
        o.mapping, o.filtering, o.public
    );
    ensure!(
        o.public.ip().to_string() == NAT_WAN,
        "{kind:?}: public address {}",
        o.public
    );
    ensure!(
        Some(o.mapping) == kind.mapping(),
        "{kind:?}: mapping {:?}",
        o.mapping
    );
    ensure!(
        Some(o.filtering) == kind.filtering(),
        "{kind:?}: filtering {:?}",
        o.filtering
    );
    Ok(())
}

#[test]
fn full_cone() -> Result<()> {
    check_kind("full_cone", NatKind::FullCone)
}

#[test]
fn restricted_cone() -> Result<()> {
    check_kind("restricted_cone", NatKind::RestrictedCone)
}

#[test]
fn port_restricted_cone() -> Result<()> {
    check_kind("port_restricted_cone", NatKind::PortRestrictedCone)
}

#[test]
fn symmetric() -> Result<()> {
    check_kind("symmetric", NatKind::Symmetric)
}

#[test]
fn plain_router_does_not_translate() -> Result<()> {
    let Some(lab) = lab_or_skip("plain_router_does_not_translate") else {
        return Ok(());
    };
    let w = build(lab, NatKind::None)?;
    let s = w.server.udp_bind(&format!("{S1}:3478"))?;
    let c = w.client.udp_bind("0.0.0.0:40000")?;
    let seen = mapped(&c, &s)?;
    ensure!(seen.to_string() == "198.19.1.10:40000", "server saw {seen}");
    Ok(())
}

/// Two clients behind one full-cone NAT using the same inside port get
/// different public ports, and inbound traffic reaches the right one.
#[test]
fn full_cone_two_clients_same_port() -> Result<()> {
    let Some(lab) = lab_or_skip("full_cone_two_clients_same_port") else {
        return Ok(());
    };
    let wan = lab.switch("wan")?;
    let lan = lab.switch("lan")?;
    let nat = lab.router("nat", NatKind::FullCone)?;
    nat.wan(&wan, "198.18.5.1/24")?;
    nat.lan(&lan, "198.19.5.1/24")?;
    let srv2 = lab.host("srv")?;
    srv2.attach(&wan, "198.18.5.10/24")?;
    let a = lab.host("ca")?;
    let b = lab.host("cb")?;
    a.attach(&lan, "198.19.5.10/24")?;
    b.attach(&lan, "198.19.5.11/24")?;
    a.route_default("198.19.5.1")?;
    b.route_default("198.19.5.1")?;
    let s = srv2.udp_bind("198.18.5.10:3478")?;
    let other = srv2.udp_bind("198.18.5.10:9999")?;
    let ca = a.udp_bind("0.0.0.0:50000")?;
    let cb = b.udp_bind("0.0.0.0:50000")?;
    let ma = mapped(&ca, &s)?;
    let mb = mapped(&cb, &s)?;
    ensure!(ma != mb, "both clients mapped to {ma}");
    other.send_to(b"a", ma)?;
    other.send_to(b"b", mb)?;
    ensure!(
        recv_from(&ca, Duration::from_secs(1)) == Some(other.local_addr()?),
        "a missed unsolicited packet"
    );
    ensure!(
        recv_from(&cb, Duration::from_secs(1)) == Some(other.local_addr()?),
        "b missed unsolicited packet"
    );
    Ok(())
}
