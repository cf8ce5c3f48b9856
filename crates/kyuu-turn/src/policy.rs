//! Which peer addresses a client may relay to.
//!
//! By default every address that is not globally routable unicast is refused (loopback,
//! unspecified, RFC 1918 private, shared 100.64/10, link-local, multicast, broadcast, reserved,
//! benchmarking 198.18/15, documentation, IETF protocol assignments), in every IPv6 spelling that
//! can reach an IPv4 address: IPv4-mapped, IPv4-compatible, 6to4 (2002::/16), NAT64 (64:ff9b::/96,
//! 64:ff9b:1::/48) and Teredo (inside 2001::/23, refused whole). The configured allow list wins
//! where it matches; the deny list adds ranges.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// The peer address policy.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
}

impl PeerPolicy {
    pub fn new(allow: &[IpNet], deny: &[IpNet]) -> Self {
        PeerPolicy {
            allow: allow.to_vec(),
            deny: deny.to_vec(),
        }
    }

    /// Whether relaying to `ip` is permitted.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let embedded = embedded_v4(ip);
        let listed = |list: &[IpNet], ip: IpAddr| list.iter().any(|n| n.contains(&ip));
        let allowed = listed(&self.allow, ip)
            || embedded.is_some_and(|v4| listed(&self.allow, IpAddr::V4(v4)));
        if allowed {
            return true;
        }
        if listed(&self.deny, ip) || embedded.is_some_and(|v4| listed(&self.deny, IpAddr::V4(v4))) {
            return false;
        }
        match ip {
            IpAddr::V4(v4) => v4_global(v4),
            IpAddr::V6(v6) => {
                if let Some(v4) = embedded {
                    // Only the NAT64/6to4/mapped forms of a global address are fine.
                    return v4_global(v4) && v6_global(v6, true);
                }
                v6_global(v6, false)
            }
        }
    }
}

/// The IPv4 address an IPv6 address leads to, for the forms that embed one.
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else {
        return None;
    };
    let o = v6.octets();
    let seg = v6.segments();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    // IPv4-mapped ::ffff:a.b.c.d and IPv4-compatible ::a.b.c.d (including :: and ::1).
    if seg[..5] == [0; 5] && (seg[5] == 0xffff || seg[5] == 0) {
        return Some(tail);
    }
    // IPv4-translated ::ffff:0:a.b.c.d (RFC 2765).
    if seg[..4] == [0; 4] && seg[4] == 0xffff && seg[5] == 0 {
        return Some(tail);
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(tail);
    }
    // NAT64 local-use 64:ff9b:1::/48: the IPv4 address may sit anywhere; treat the last 32 bits.
    if seg[..3] == [0x64, 0xff9b, 1] {
        return Some(tail);
    }
    // 6to4 2002:AABB:CCDD::/48.
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn in4(ip: Ipv4Addr, net: [u8; 4], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u32::MAX << (32 - bits)
    };
    u32::from(ip) & mask == u32::from(Ipv4Addr::from(net)) & mask
}

fn v4_global(ip: Ipv4Addr) -> bool {
    const DENY: &[([u8; 4], u32)] = &[
        ([0, 0, 0, 0], 8),       // "this network", unspecified
        ([10, 0, 0, 0], 8),      // private
        ([100, 64, 0, 0], 10),   // shared address space (CGN)
        ([127, 0, 0, 0], 8),     // loopback
        ([169, 254, 0, 0], 16),  // link-local
        ([172, 16, 0, 0], 12),   // private
        ([192, 0, 0, 0], 24),    // IETF protocol assignments
        ([192, 0, 2, 0], 24),    // TEST-NET-1
        ([192, 31, 196, 0], 24), // AS112
        ([192, 52, 193, 0], 24), // AMT
        ([192, 88, 99, 0], 24),  // deprecated 6to4 relay anycast
        ([192, 168, 0, 0], 16),  // private
        ([192, 175, 48, 0], 24), // direct delegation AS112
        ([198, 18, 0, 0], 15),   // benchmarking
        ([198, 51, 100, 0], 24), // TEST-NET-2
        ([203, 0, 113, 0], 24),  // TEST-NET-3
        ([224, 0, 0, 0], 4),     // multicast
        ([240, 0, 0, 0], 4),     // reserved, including 255.255.255.255 broadcast
    ];
    !DENY.iter().any(|(net, bits)| in4(ip, *net, *bits))
}

fn in6(ip: Ipv6Addr, net: [u16; 8], bits: u32) -> bool {
    let mask = if bits == 0 {
        0
    } else {
        u128::MAX << (128 - bits)
    };
    u128::from(ip) & mask == u128::from(Ipv6Addr::from(net)) & mask
}

/// `via_v4`: the address embeds an IPv4 address that was already checked, so the translation
/// prefixes themselves are acceptable.
fn v6_global(ip: Ipv6Addr, via_v4: bool) -> bool {
    if via_v4 {
        // Mapped/compatible forms are never routed on the wire by a v6-only relay socket, but
        // NAT64 and 6to4 of a global IPv4 are real destinations.
        let seg = ip.segments();
        return seg[0] == 0x2002 || seg[..2] == [0x64, 0xff9b];
    }
    // Global unicast is 2000::/3; everything else (::, ::1, fc00::/7, fe80::/10, ff00::/8,
    // 100::/64 discard, ...) is refused.
    if !in6(ip, [0x2000, 0, 0, 0, 0, 0, 0, 0], 3) {
        return false;
    }
    const DENY: &[([u16; 8], u32)] = &[
        ([0x2001, 0, 0, 0, 0, 0, 0, 0], 23), // IETF protocol assignments incl. Teredo, ORCHID, benchmarking
        ([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32), // documentation
        ([0x3fff, 0, 0, 0, 0, 0, 0, 0], 20), // documentation (RFC 9637)
        ([0x2002, 0, 0, 0, 0, 0, 0, 0], 16), // 6to4 without a usable embedded address
    ];
    !DENY.iter().any(|(net, bits)| in6(ip, *net, *bits))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn p(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn safe_defaults_refuse_every_special_range() {
        let pol = PeerPolicy::default();
        for bad in [
            "127.0.0.1",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "100.127.255.254",
            "169.254.1.1",
            "224.0.0.1",
            "239.1.1.1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "198.19.255.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.0.0.8",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::7f00:1",
            "64:ff9b::a00:1",
            "64:ff9b:1::a00:1",
            "2002:7f00:1::",
            "2002:c0a8:101::1",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "ff0e::1",
            "2001:db8::1",
            "2001::1",
            "2001:0:4136:e378::1",
            "100::1",
            "3fff::1",
            "::ffff:0:7f00:1",
        ] {
            assert!(!pol.permits(p(bad)), "{bad} must be refused");
        }
        for good in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            assert!(pol.permits(p(good)), "{good} must be allowed");
        }
    }

    #[test]
    fn allow_wins_where_listed_and_deny_adds() {
        let pol = PeerPolicy::new(
            &["127.0.0.0/8".parse().unwrap()],
            &["8.8.8.0/24".parse().unwrap()],
        );
        assert!(pol.permits(p("127.0.0.1")));
        assert!(pol.permits(p("::ffff:127.0.0.1")));
        assert!(!pol.permits(p("10.0.0.1")));
        assert!(!pol.permits(p("8.8.8.8")));
        assert!(pol.permits(p("8.8.4.4")));
    }
}
