//! Host facts the shells need: the neighbour table and the MAC of the interface toward an
//! address, read with iproute2 (`ip [-n NETNS] neigh|route|link`), optionally inside a named
//! network namespace (the lab runs nodes and peers of many namespaces in one process).

use std::net::IpAddr;
use std::time::Duration;

use crate::wire::Mac;

/// Bound on one `ip` invocation.
const IP_TIMEOUT: Duration = Duration::from_secs(2);

/// Where to look: this process's network namespace or a named one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostNet {
    pub netns: Option<String>,
}

/// Why a host fact could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("running ip {args}: {source}")]
    Spawn {
        args: String,
        source: std::io::Error,
    },
    #[error("ip {args} timed out")]
    Timeout { args: String },
    #[error("ip {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
    #[error("no route or no MAC toward {0}")]
    NoMac(IpAddr),
}

impl HostNet {
    pub fn new(netns: Option<String>) -> Self {
        HostNet { netns }
    }

    async fn ip(&self, args: &[&str]) -> Result<String, SysError> {
        let mut cmd = tokio::process::Command::new("ip");
        if let Some(ns) = &self.netns {
            cmd.args(["-n", ns]);
        }
        cmd.args(args);
        cmd.kill_on_drop(true);
        cmd.stdin(std::process::Stdio::null());
        let joined = args.join(" ");
        let out = match tokio::time::timeout(IP_TIMEOUT, cmd.output()).await {
            Err(_) => return Err(SysError::Timeout { args: joined }),
            Ok(Err(source)) => {
                return Err(SysError::Spawn {
                    args: joined,
                    source,
                })
            }
            Ok(Ok(o)) => o,
        };
        if !out.status.success() {
            return Err(SysError::Failed {
                args: joined,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `(ip, mac)` of every resolved neighbour.
    pub async fn neighbours(&self) -> Result<Vec<(IpAddr, Mac)>, SysError> {
        let text = self.ip(&["neigh", "show"]).await?;
        Ok(parse_neigh(&text))
    }

    /// The MAC and source address of the interface that routes toward `dst`.
    pub async fn mac_toward(&self, dst: IpAddr) -> Result<(Mac, IpAddr), SysError> {
        let d = dst.to_string();
        let route = self.ip(&["route", "get", &d]).await?;
        let (dev, src) = parse_route_get(&route).ok_or(SysError::NoMac(dst))?;
        let link = self.ip(&["link", "show", "dev", &dev]).await?;
        let mac = parse_link_mac(&link).ok_or(SysError::NoMac(dst))?;
        Ok((mac, src))
    }
}

/// Parses `ip neigh show` lines: `198.19.1.10 dev eth0 lladdr 02:..:.. REACHABLE`.
pub fn parse_neigh(text: &str) -> Vec<(IpAddr, Mac)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let words: Vec<&str> = words.collect();
        if words.iter().any(|w| *w == "FAILED" || *w == "INCOMPLETE") {
            continue;
        }
        let mac = words
            .iter()
            .position(|w| *w == "lladdr")
            .and_then(|i| words.get(i + 1))
            .and_then(|m| m.parse::<Mac>().ok());
        if let Some(mac) = mac {
            out.push((ip, mac));
        }
    }
    out
}

/// Parses `ip route get`: `198.18.0.1 via 198.19.1.1 dev eth0 src 198.19.1.10 uid 0`.
pub fn parse_route_get(text: &str) -> Option<(String, IpAddr)> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |k: &str| {
        words
            .iter()
            .position(|w| *w == k)
            .and_then(|i| words.get(i + 1))
    };
    let dev = after("dev")?.to_string();
    let src = after("src")?.parse().ok()?;
    Some((dev, src))
}

/// Parses `ip link show`: `... link/ether 02:11:22:33:44:55 brd ff:ff:ff:ff:ff:ff`.
pub fn parse_link_mac(text: &str) -> Option<Mac> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let i = words.iter().position(|w| *w == "link/ether")?;
    words.get(i + 1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_iproute2_output() {
        let n = parse_neigh(
            "198.19.1.10 dev eth0 lladdr 02:aa:bb:cc:dd:ee REACHABLE\n\
             198.19.1.11 dev eth0 FAILED\n\
             198.19.1.12 dev eth0 lladdr 02:aa:bb:cc:dd:ef STALE\n\
             fe80::1 dev eth0 lladdr 02:aa:bb:cc:dd:01 router STALE\n",
        );
        assert_eq!(n.len(), 3);
        assert_eq!(n[0].1.to_string(), "02:aa:bb:cc:dd:ee");
        let (dev, src) = parse_route_get(
            "198.18.0.1 via 198.19.1.1 dev eth0 src 198.19.1.10 uid 0 \n    cache \n",
        )
        .unwrap();
        assert_eq!(dev, "eth0");
        assert_eq!(src.to_string(), "198.19.1.10");
        let mac = parse_link_mac(
            "2: eth0@if3: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\n    link/ether 02:11:22:33:44:55 brd ff:ff:ff:ff:ff:ff link-netnsid 0\n",
        )
        .unwrap();
        assert_eq!(mac.to_string(), "02:11:22:33:44:55");
    }
}
