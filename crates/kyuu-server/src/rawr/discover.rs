//! Finding the RAWR gateway without configuration (`docs/rawr.md` §8.1): the default router
//! probed on the STUN port, then a DNS SRV record `_rawr._udp.<domain>` in the search domain,
//! then the configured gateway, in that order.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;

use super::runtime::transact_on;
use super::sys::HostNet;
use kyuu_rawr::wire::{self, Mac};
use kyuu_stun::{Class, Message};

/// The STUN/TURN port a router's RAWR node answers on.
pub const STUN_PORT: u16 = 3478;
/// How long a probe waits for an answer.
const PROBE_WAIT: Duration = Duration::from_millis(700);
/// How long a DNS query waits.
const DNS_WAIT: Duration = Duration::from_millis(800);

/// How the gateway was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Found {
    Router,
    Srv,
    Config,
}

/// The gateway discovery found (if any), and what was tried.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Discovery {
    pub gateway: Option<SocketAddr>,
    pub found: Option<Found>,
    pub tried: Vec<String>,
}

/// Whether a RAWR node answers at `addr`: a Cancel for a random session is a no-op at a node
/// (success), and a plain STUN/TURN server answers it 400/420 or not at all.
pub async fn probe(sock: &UdpSocket, addr: SocketAddr) -> bool {
    let session: [u8; 16] = rand::random();
    let ans = transact_on(
        sock,
        addr,
        |t| wire::encode_cancel(t, &session, Mac([2, 0, 0, 0, 0, 0]), None, None, None),
        PROBE_WAIT,
    )
    .await;
    let Ok(ans) = ans else { return false };
    let Ok(m) = Message::parse(&ans) else {
        return false;
    };
    m.method() == wire::method::CANCEL
        && match m.class() {
            Class::Success => true,
            // A node that only takes Cancels from its children still speaks RAWR.
            Class::Error => {
                matches!(m.error_code(), Some(Ok(e)) if e.code == wire::code::FORBIDDEN)
            }
            _ => false,
        }
}

/// Runs discovery from `sock` (a socket of the peer, in its network namespace).
pub async fn discover_gateway(
    host: &HostNet,
    sock: &UdpSocket,
    configured: Option<SocketAddr>,
) -> Discovery {
    let mut d = Discovery {
        gateway: None,
        found: None,
        tried: Vec::new(),
    };
    // 1. The default router, on the STUN port.
    match host.default_router().await {
        Some(ip) => {
            let a = SocketAddr::new(ip, STUN_PORT);
            if probe(sock, a).await {
                d.gateway = Some(a);
                d.found = Some(Found::Router);
                return d;
            }
            d.tried.push(format!("router {a}: no RAWR"));
        }
        None => d.tried.push("router: no default route".into()),
    }
    // 2. DNS SRV in the search domain.
    match host.resolv_conf().await {
        Some(rc) => {
            let (servers, domains) = parse_resolv_conf(&rc);
            'outer: for dom in &domains {
                let name = format!("_rawr._udp.{dom}");
                for ns in &servers {
                    match srv_lookup(sock, SocketAddr::new(*ns, 53), &name).await {
                        Some(targets) => {
                            for (target, port) in targets {
                                let Some(a) = resolve(&target, port).await else {
                                    continue;
                                };
                                if probe(sock, a).await {
                                    d.gateway = Some(a);
                                    d.found = Some(Found::Srv);
                                    return d;
                                }
                                d.tried.push(format!("SRV {name} -> {a}: no RAWR"));
                            }
                            break 'outer;
                        }
                        None => d.tried.push(format!("SRV {name} at {ns}: no answer")),
                    }
                }
            }
            if domains.is_empty() {
                d.tried.push("SRV: no search domain".into());
            }
        }
        None => d.tried.push("SRV: no resolv.conf".into()),
    }
    // 3. Configuration.
    if let Some(g) = configured {
        d.gateway = Some(g);
        d.found = Some(Found::Config);
    }
    d
}

async fn resolve(target: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = target.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    tokio::time::timeout(DNS_WAIT, tokio::net::lookup_host((target, port)))
        .await
        .ok()?
        .ok()?
        .next()
}

/// `(nameservers, search domains)` from resolv.conf text (`domain` counts as a search domain).
pub fn parse_resolv_conf(text: &str) -> (Vec<IpAddr>, Vec<String>) {
    let (mut ns, mut dom) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let mut w = line.split_whitespace();
        match w.next() {
            Some("nameserver") => ns.extend(w.next().and_then(|a| a.parse::<IpAddr>().ok())),
            Some("search") | Some("domain") => {
                for d in w {
                    let d = d.trim_end_matches('.').to_owned();
                    if !d.is_empty() && !dom.contains(&d) && dom.len() < 6 {
                        dom.push(d);
                    }
                }
            }
            _ => {}
        }
    }
    ns.truncate(3);
    (ns, dom)
}

/// A DNS query for `name` of type SRV (33), id `id`.
pub fn srv_query(id: u16, name: &str) -> Option<Vec<u8>> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len())
            .ok()
            .filter(|l| (1..=63).contains(l))?;
        q.push(len);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 33, 0, 1]);
    (q.len() <= 512).then_some(q)
}

/// Reads a (possibly compressed) name at `pos`; returns it and the position after it.
fn read_name(msg: &[u8], mut pos: usize) -> Option<(String, usize)> {
    let mut out = String::new();
    let mut end = None;
    for _ in 0..64 {
        let len = *msg.get(pos)?;
        if len & 0xC0 == 0xC0 {
            let lo = *msg.get(pos + 1)?;
            end.get_or_insert(pos + 2);
            pos = (usize::from(len & 0x3F) << 8) | usize::from(lo);
            continue;
        }
        if len == 0 {
            return Some((out, end.unwrap_or(pos + 1)));
        }
        let label = msg.get(pos + 1..pos + 1 + usize::from(len))?;
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(std::str::from_utf8(label).ok()?);
        pos += 1 + usize::from(len);
    }
    None
}

fn u16_at(msg: &[u8], pos: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(pos)?, *msg.get(pos + 1)?]))
}

/// The SRV targets `(name, port)` of an answer to query `id`, by priority then weight
/// (highest weight first; RFC 2782's random weighting is not needed for one or two records).
pub fn parse_srv_answer(id: u16, msg: &[u8]) -> Option<Vec<(String, u16)>> {
    if u16_at(msg, 0)? != id || msg.get(2)? & 0x80 == 0 || msg.get(3)? & 0x0F != 0 {
        return None;
    }
    let (qd, an) = (u16_at(msg, 4)?, u16_at(msg, 6)?);
    let mut pos = 12;
    for _ in 0..qd {
        pos = read_name(msg, pos)?.1 + 4;
    }
    let mut out = Vec::new();
    for _ in 0..an.min(16) {
        let (_, p) = read_name(msg, pos)?;
        let (ty, len) = (u16_at(msg, p)?, usize::from(u16_at(msg, p + 8)?));
        let data = p + 10;
        if ty == 33 && len >= 7 {
            let (prio, weight, port) = (
                u16_at(msg, data)?,
                u16_at(msg, data + 2)?,
                u16_at(msg, data + 4)?,
            );
            let (target, _) = read_name(msg, data + 6)?;
            if !target.is_empty() {
                out.push((prio, u16::MAX - weight, target, port));
            }
        }
        pos = data + len;
    }
    out.sort();
    Some(out.into_iter().map(|(_, _, t, p)| (t, p)).collect())
}

/// One SRV query over UDP to `server`.
pub async fn srv_lookup(
    sock: &UdpSocket,
    server: SocketAddr,
    name: &str,
) -> Option<Vec<(String, u16)>> {
    let id: u16 = rand::random();
    let q = srv_query(id, name)?;
    sock.send_to(&q, server).await.ok()?;
    let mut buf = vec![0u8; 1500];
    let deadline = tokio::time::Instant::now() + DNS_WAIT;
    for _ in 0..16 {
        let (n, from) = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf))
            .await
            .ok()?
            .ok()?;
        if from != server {
            continue;
        }
        if let Some(v) = parse_srv_answer(id, buf.get(..n)?) {
            return Some(v);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_resolv_conf() {
        let (ns, dom) =
            parse_resolv_conf("# x\nnameserver 198.18.0.53\nsearch lab.example. corp.example\n");
        assert_eq!(ns, vec!["198.18.0.53".parse::<IpAddr>().unwrap()]);
        assert_eq!(dom, vec!["lab.example", "corp.example"]);
    }

    /// An answer as a DNS server writes it: the question echoed, then SRV records whose owner
    /// is a compression pointer to the question.
    pub(crate) fn answer(id: u16, name: &str, recs: &[(u16, u16, u16, &str)]) -> Vec<u8> {
        let q = srv_query(id, name).unwrap();
        let mut m = q;
        m[2] = 0x81;
        m[3] = 0x80;
        m[6..8].copy_from_slice(&(recs.len() as u16).to_be_bytes());
        for (prio, weight, port, target) in recs {
            m.extend_from_slice(&[0xC0, 12, 0, 33, 0, 1, 0, 0, 0, 60]);
            let mut rd = Vec::new();
            rd.extend_from_slice(&prio.to_be_bytes());
            rd.extend_from_slice(&weight.to_be_bytes());
            rd.extend_from_slice(&port.to_be_bytes());
            for l in target.split('.') {
                rd.push(l.len() as u8);
                rd.extend_from_slice(l.as_bytes());
            }
            rd.push(0);
            m.extend_from_slice(&(rd.len() as u16).to_be_bytes());
            m.extend_from_slice(&rd);
        }
        m
    }

    #[test]
    fn srv_answers_parse_in_priority_order() {
        let a = answer(
            7,
            "_rawr._udp.lab.example",
            &[
                (20, 0, 3478, "b.lab.example"),
                (10, 5, 3479, "a.lab.example"),
            ],
        );
        assert_eq!(
            parse_srv_answer(7, &a).unwrap(),
            vec![
                ("a.lab.example".to_owned(), 3479),
                ("b.lab.example".to_owned(), 3478)
            ]
        );
        assert!(parse_srv_answer(8, &a).is_none());
    }

    #[test]
    fn garbage_never_panics() {
        for n in 0..64usize {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let _ = parse_srv_answer(u16_at(&junk, 0).unwrap_or(0), &junk);
        }
        // A pointer loop.
        let mut a = answer(1, "_rawr._udp.x", &[]);
        a[6] = 0;
        a[7] = 1;
        a.extend_from_slice(&[0xC0, (a.len() as u8)]);
        let _ = parse_srv_answer(1, &a);
    }

    #[tokio::test]
    async fn srv_lookup_against_a_fake_server() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sa = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, from) = server.recv_from(&mut buf).await.unwrap();
            let id = u16::from_be_bytes([buf[0], buf[1]]);
            assert_eq!(srv_query(id, "_rawr._udp.lab.example").unwrap(), buf[..n]);
            let a = answer(
                id,
                "_rawr._udp.lab.example",
                &[(0, 0, 3478, "gw.lab.example")],
            );
            server.send_to(&a, from).await.unwrap();
        });
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r = srv_lookup(&sock, sa, "_rawr._udp.lab.example").await;
        assert_eq!(r, Some(vec![("gw.lab.example".to_owned(), 3478)]));
    }
}
