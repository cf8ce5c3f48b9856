//! The tokio shell around [`NatProbe`]: one UDP socket, a clock, and the probe's contract.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};
use std::time::Instant;

use tokio::net::UdpSocket;

use crate::nat::{NatProbe, NatReport, ProbeConfig, ProbeError};

/// The default STUN port (RFC 8489 §18.6).
pub const DEFAULT_PORT: u16 = 3478;

/// Why discovery failed.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("cannot resolve {host:?}: {source}")]
    Resolve { host: String, source: io::Error },
    #[error("{host:?} has no {family} address")]
    NoAddress { host: String, family: &'static str },
    #[error("cannot bind {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("socket error: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Probe(#[from] ProbeError),
}

/// Resolves `host`, `host:port`, `ip`, `ip:port` or `[v6]:port` (port 3478 when absent),
/// preferring the family of `local` when given.
pub fn resolve_server(host: &str, local: Option<SocketAddr>) -> Result<SocketAddr, DiscoverError> {
    let with_port = if let Ok(addr) = host.parse::<SocketAddr>() {
        return Ok(addr);
    } else if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    } else if host
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.contains(':') && p.parse::<u16>().is_ok())
    {
        host.to_owned()
    } else {
        format!("{host}:{DEFAULT_PORT}")
    };
    let addrs: Vec<SocketAddr> = with_port
        .to_socket_addrs()
        .map_err(|source| DiscoverError::Resolve {
            host: host.to_owned(),
            source,
        })?
        .collect();
    let want_v6 = local.map(|l| l.is_ipv6());
    addrs
        .iter()
        .find(|a| want_v6.is_none_or(|v6| a.is_ipv6() == v6))
        .or_else(|| {
            if want_v6.is_none() {
                addrs.first()
            } else {
                None
            }
        })
        .copied()
        .ok_or_else(|| DiscoverError::NoAddress {
            host: host.to_owned(),
            family: if want_v6 == Some(true) {
                "IPv6"
            } else {
                "IPv4"
            },
        })
}

/// The local address a socket bound to `bound` uses towards `server`: a wildcard IP is replaced
/// by the source address the kernel's routing picks (found by connecting a throw-away socket).
pub fn effective_local(bound: SocketAddr, server: SocketAddr) -> io::Result<SocketAddr> {
    if !bound.ip().is_unspecified() {
        return Ok(bound);
    }
    let any: SocketAddr = if server.is_ipv6() {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let probe = std::net::UdpSocket::bind(any)?;
    probe.connect(server)?;
    Ok(SocketAddr::new(probe.local_addr()?.ip(), bound.port()))
}

/// Runs the RFC 5780 tests against `server` from a socket bound to `local` (default: wildcard,
/// ephemeral port, the server's family).
pub async fn discover(
    server: SocketAddr,
    local: Option<SocketAddr>,
    cfg: ProbeConfig,
) -> Result<NatReport, DiscoverError> {
    let bind: SocketAddr = local.unwrap_or_else(|| {
        if server.is_ipv6() {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        }
    });
    let socket = UdpSocket::bind(bind)
        .await
        .map_err(|source| DiscoverError::Bind { addr: bind, source })?;
    discover_on(&socket, server, cfg).await
}

/// Runs the tests on an existing socket.
pub async fn discover_on(
    socket: &UdpSocket,
    server: SocketAddr,
    cfg: ProbeConfig,
) -> Result<NatReport, DiscoverError> {
    let local = effective_local(socket.local_addr()?, server)?;
    let mut probe = NatProbe::new(server, local, cfg, Instant::now());
    let mut buf = vec![0u8; 2048];
    loop {
        while let Some(t) = probe.poll_transmit() {
            // A send error (e.g. ICMP unreachable reported on a later send) is like a loss: the
            // probe's timers decide when to give up.
            let _ = socket.send_to(&t.payload, t.dst).await;
        }
        if let Some(out) = probe.take_outcome() {
            return Ok(out?);
        }
        let Some(deadline) = probe.poll_timeout() else {
            // Unreachable by the probe's contract (no outcome implies a pending test); stop
            // rather than spin.
            return Err(io::Error::other("probe stalled").into());
        };
        tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    if let Some(data) = buf.get(..n) {
                        probe.handle_input(Instant::now(), from, data);
                    }
                }
                // Linux reports ICMP port unreachable as ECONNREFUSED on the next recv.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                Err(e) => return Err(e.into()),
            },
            () = tokio::time::sleep_until(deadline.into()) => {}
        }
        probe.handle_timeout(Instant::now());
    }
}
