//! Host facts the shells need: the neighbour table and the MAC of the interface toward an
//! address, read with iproute2 (`ip [-n NETNS] neigh|route|link`), optionally inside a named
//! network namespace (the lab runs nodes and peers of many namespaces in one process).

use std::net::IpAddr;
use std::time::Duration;

use kyuu_rawr::wire::Mac;

/// Bound on one `ip` invocation.
const IP_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the text of `/proc/net/arp` in the right namespace (the lab enters a namespace on a
/// helper thread; a process of its own needs none).
pub type ArpReader = std::sync::Arc<dyn Fn() -> std::io::Result<String> + Send + Sync>;

/// Where to look: this process's network namespace or a named one.
#[derive(Clone, Default)]
pub struct HostNet {
    pub netns: Option<String>,
    /// Fast neighbour-table reader; without it, `/proc/net/arp` when `netns` is unset, else
    /// `ip -n NETNS neigh`.
    pub arp: Option<ArpReader>,
    /// This host's on-link prefixes, when known in advance (saves an `ip route get` per check).
    pub on_link: Option<Vec<ipnet::IpNet>>,
}

impl std::fmt::Debug for HostNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostNet")
            .field("netns", &self.netns)
            .field("arp", &self.arp.is_some())
            .field("on_link", &self.on_link)
            .finish()
    }
}

/// Parses `/proc/net/arp`: `IP  HWtype  Flags  HWaddress  Mask  Device`, skipping incomplete
/// entries (flags 0x0).
pub fn parse_proc_arp(text: &str) -> Vec<(IpAddr, Mac)> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let w: Vec<&str> = line.split_whitespace().collect();
        let (Some(ip), Some(flags), Some(mac)) = (w.first(), w.get(2), w.get(3)) else {
            continue;
        };
        if *flags == "0x0" {
            continue;
        }
        if let (Ok(ip), Ok(mac)) = (ip.parse::<IpAddr>(), mac.parse::<Mac>()) {
            if mac.0 != [0; 6] {
                out.push((ip, mac));
            }
        }
    }
    out
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
        HostNet {
            netns,
            arp: None,
            on_link: None,
        }
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
        let reader = match (&self.arp, &self.netns) {
            (Some(r), _) => Some(r.clone()),
            (None, None) => {
                let r: ArpReader = std::sync::Arc::new(|| std::fs::read_to_string("/proc/net/arp"));
                Some(r)
            }
            (None, Some(_)) => None,
        };
        if let Some(r) = reader {
            let read = tokio::task::spawn_blocking(move || r()).await;
            if let Ok(Ok(text)) = read {
                return Ok(parse_proc_arp(&text));
            }
        }
        let text = self.ip(&["neigh", "show"]).await?;
        Ok(parse_neigh(&text))
    }

    /// This host's IPv4/IPv6 prefixes (`ip -o addr show`).
    pub async fn prefixes(&self) -> Result<Vec<ipnet::IpNet>, SysError> {
        let text = self.ip(&["-o", "addr", "show"]).await?;
        Ok(parse_addr_prefixes(&text))
    }

    /// Whether `dst` is on one of this host's links (its route has no `via`), i.e. whether the
    /// same-link check of `docs/rawr.md` §8 step 2 can succeed at all.
    pub async fn is_on_link(&self, dst: IpAddr) -> bool {
        if let Some(nets) = &self.on_link {
            return nets.iter().any(|n| n.contains(&dst) && n.addr() != dst);
        }
        let d = dst.to_string();
        match self.ip(&["route", "get", &d]).await {
            Ok(r) => {
                let words: Vec<&str> = r.split_whitespace().collect();
                !words.contains(&"via") && words.first().is_none_or(|w| *w != "local")
            }
            Err(_) => false,
        }
    }

    /// The IPv4 default router (`ip route show default`: `default via 198.19.1.1 dev eth0`).
    pub async fn default_router(&self) -> Option<IpAddr> {
        let text = self.ip(&["-4", "route", "show", "default"]).await.ok()?;
        text.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let i = w.iter().position(|x| *x == "via")?;
            w.get(i + 1)?.parse().ok()
        })
    }

    /// This host's resolv.conf (`/etc/netns/<ns>/resolv.conf` for a namespace, as `ip netns
    /// exec` would bind it, else `/etc/resolv.conf`).
    pub async fn resolv_conf(&self) -> Option<String> {
        let path = match &self.netns {
            Some(ns) => format!("/etc/netns/{ns}/resolv.conf"),
            None => "/etc/resolv.conf".to_owned(),
        };
        tokio::fs::read_to_string(path).await.ok()
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

/// Parses `ip -o addr show`: `2: eth0    inet 198.19.1.10/24 brd ... scope global eth0`.
/// Loopback prefixes are skipped.
pub fn parse_addr_prefixes(text: &str) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = w.iter().position(|x| *x == "inet" || *x == "inet6") else {
            continue;
        };
        let Some(Ok(net)) = w.get(i + 1).map(|p| p.parse::<ipnet::IpNet>()) else {
            continue;
        };
        if !net.addr().is_loopback() {
            out.push(net);
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
        let arp = parse_proc_arp(
            "IP address       HW type     Flags       HW address            Mask     Device\n\
             198.19.1.10      0x1         0x2         02:aa:bb:cc:dd:ee     *        eth0\n\
             198.19.1.11      0x1         0x0         00:00:00:00:00:00     *        eth0\n",
        );
        assert_eq!(arp.len(), 1);
        let p = parse_addr_prefixes(
            "1: lo    inet 127.0.0.1/8 scope host lo\n2: eth0    inet 198.19.1.10/24 brd 198.19.1.255 scope global eth0\n",
        );
        assert_eq!(p, vec!["198.19.1.10/24".parse::<ipnet::IpNet>().unwrap()]);
    }
}
