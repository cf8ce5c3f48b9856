//! NAT behaviours (RFC 4787) built from nftables rules in a router namespace.
//!
//! Linux conntrack with `snat` keeps the inside source port whenever the
//! resulting tuple is unique, so a plain `snat to WAN` is an
//! endpoint-independent mapping with address-and-port-dependent filtering
//! (only replies from the exact remote a flow was opened to pass).
//!
//! The looser filtering behaviours add an inbound path for *new* flows:
//!
//! * a dynamic map `mapping`, `mapped port -> inside addr . inside port`,
//!   learned from outbound packets after source NAT (postrouting, priority
//!   `srcnat + 10`, where the packet already carries the mapped port and
//!   `ct original` still names the inside endpoint);
//! * a prerouting `dnat` of inbound UDP to `WAN:port` through that map
//!   (endpoint-independent filtering, "full cone");
//! * for address-dependent filtering ("restricted cone") the `dnat` only
//!   applies when `mapped port . remote addr` is in the dynamic set
//!   `allowed`, learned from the destinations of outbound packets.
//!
//! Symmetric NAT is `snat ... fully-random`: every new 5-tuple gets a random
//! port (address-and-port-dependent mapping), and filtering is conntrack's.
//!
//! Learned entries live [`MAPPING_TIMEOUT_SECS`] after the last outbound
//! packet, like conntrack's UDP stream timeout. The inbound paths are UDP
//! only; TCP always behaves as port-restricted (plain conntrack).

use std::net::Ipv4Addr;

/// Lifetime of learned mappings and permissions, refreshed by outbound traffic.
pub const MAPPING_TIMEOUT_SECS: u32 = 120;

/// How a NAT depends on the remote endpoint (RFC 4787 section 4.1 for
/// mapping, section 5 for filtering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dependence {
    /// Same for every remote endpoint.
    EndpointIndependent,
    /// Depends on the remote IP address only.
    AddressDependent,
    /// Depends on the remote IP address and port.
    AddressAndPortDependent,
}

/// The NAT a [`Router`](crate::Router) applies on its WAN interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NatKind {
    /// Plain IP router, no translation.
    None,
    /// EIM + endpoint-independent filtering ("full cone").
    FullCone,
    /// EIM + address-dependent filtering ("restricted cone").
    RestrictedCone,
    /// EIM + address-and-port-dependent filtering ("port-restricted cone").
    PortRestrictedCone,
    /// Address-and-port-dependent mapping with random ports, APDF ("symmetric").
    Symmetric,
}

impl NatKind {
    /// All translating kinds, for table-driven tests.
    pub const ALL_NAT: [NatKind; 4] = [
        NatKind::FullCone,
        NatKind::RestrictedCone,
        NatKind::PortRestrictedCone,
        NatKind::Symmetric,
    ];

    /// The mapping behaviour, `None` for [`NatKind::None`].
    pub fn mapping(self) -> Option<Dependence> {
        match self {
            NatKind::None => None,
            NatKind::FullCone | NatKind::RestrictedCone | NatKind::PortRestrictedCone => {
                Some(Dependence::EndpointIndependent)
            }
            NatKind::Symmetric => Some(Dependence::AddressAndPortDependent),
        }
    }

    /// The filtering behaviour, `None` for [`NatKind::None`].
    pub fn filtering(self) -> Option<Dependence> {
        match self {
            NatKind::None => None,
            NatKind::FullCone => Some(Dependence::EndpointIndependent),
            NatKind::RestrictedCone => Some(Dependence::AddressDependent),
            NatKind::PortRestrictedCone | NatKind::Symmetric => {
                Some(Dependence::AddressAndPortDependent)
            }
        }
    }
}

/// Name of the nftables table the lab installs in a router namespace.
pub const NFT_TABLE: &str = "kyuu_nat";

/// The `nft -f` script for `kind` with WAN interface `wan` holding `addr`.
/// `None` for [`NatKind::None`].
pub fn nft_script(kind: NatKind, wan: &str, addr: Ipv4Addr) -> Option<String> {
    let snat = match kind {
        NatKind::None => return None,
        NatKind::Symmetric => format!("oifname \"{wan}\" snat ip to {addr} fully-random"),
        NatKind::FullCone | NatKind::RestrictedCone | NatKind::PortRestrictedCone => {
            format!("oifname \"{wan}\" snat ip to {addr}")
        }
    };
    let t = MAPPING_TIMEOUT_SECS;
    let mut s = format!(
        "table ip {NFT_TABLE} {{\n\
         \x20 chain post {{ type nat hook postrouting priority srcnat; policy accept;\n\
         \x20   {snat}\n\
         \x20 }}\n"
    );
    let inbound = match kind {
        NatKind::FullCone => Some(format!("iifname \"{wan}\" ip daddr {addr} dnat ip to udp dport map @mapping")),
        NatKind::RestrictedCone => Some(format!(
            "iifname \"{wan}\" ip daddr {addr} udp dport . ip saddr @allowed dnat ip to udp dport map @mapping"
        )),
        NatKind::None | NatKind::PortRestrictedCone | NatKind::Symmetric => None,
    };
    if let Some(inbound) = inbound {
        s.push_str(&format!(
            "  map mapping {{ type inet_service : ipv4_addr . inet_service; flags dynamic,timeout; timeout {t}s; }}\n\
             \x20 set allowed {{ type inet_service . ipv4_addr; flags dynamic,timeout; timeout {t}s; }}\n\
             \x20 chain learn {{ type filter hook postrouting priority srcnat + 10; policy accept;\n\
             \x20   oifname \"{wan}\" ct direction original update @mapping {{ udp sport : ct original ip saddr . ct original proto-src }}\n\
             \x20   oifname \"{wan}\" ct direction original update @allowed {{ udp sport . ip daddr }}\n\
             \x20 }}\n\
             \x20 chain pre {{ type nat hook prerouting priority dstnat; policy accept;\n\
             \x20   {inbound}\n\
             \x20 }}\n"
        ));
    }
    s.push_str("}\n");
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_shapes() {
        let a = Ipv4Addr::new(198, 18, 0, 1);
        assert!(nft_script(NatKind::None, "eth0", a).is_none());
        let sym = nft_script(NatKind::Symmetric, "eth0", a).unwrap_or_default();
        assert!(sym.contains("fully-random") && !sym.contains("dnat"));
        let full = nft_script(NatKind::FullCone, "eth0", a).unwrap_or_default();
        assert!(
            full.contains("dnat ip to udp dport map @mapping") && !full.contains("@allowed dnat")
        );
        let rc = nft_script(NatKind::RestrictedCone, "eth0", a).unwrap_or_default();
        assert!(rc.contains("udp dport . ip saddr @allowed dnat"));
        let prc = nft_script(NatKind::PortRestrictedCone, "eth0", a).unwrap_or_default();
        assert!(!prc.contains("dnat") && !prc.contains("random"));
    }
}
