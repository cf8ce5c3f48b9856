//! The tokio driver against misbehaving RFC 5780 servers on loopback (127.0.0.1 and 127.0.0.2),
//! real sockets, no root.
#![allow(clippy::unwrap_used)]

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kyuu_client::{discover, NatType, ProbeConfig, RetransmitConfig};
use kyuu_stun::{attr, method, Class, Message, MessageBuilder};

#[derive(Clone, Copy)]
enum Misbehaviour {
    /// Answers CHANGE-REQUEST from the primary address anyway.
    IgnoresChangeRequest,
    /// Answers CHANGE-REQUEST with 420 Unknown Attribute.
    RejectsChangeRequest,
    /// Advertises an OTHER-ADDRESS with the same IP as the primary.
    SameIpOther,
}

/// A fake server on 127.0.0.1:p that advertises 127.0.0.2:p+1; stops when dropped.
struct Fake {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn fake(kind: Misbehaviour) -> Fake {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    let other: SocketAddr = match kind {
        Misbehaviour::SameIpOther => SocketAddr::new(addr.ip(), addr.port().wrapping_add(1)),
        Misbehaviour::IgnoresChangeRequest | Misbehaviour::RejectsChangeRequest => {
            SocketAddr::new("127.0.0.2".parse().unwrap(), addr.port().wrapping_add(1))
        }
    };
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while !s.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(req) = Message::parse(&buf[..n]) else {
                continue;
            };
            let change = req.has(attr::CHANGE_REQUEST);
            let mut out = [0u8; 256];
            let class = if change && matches!(kind, Misbehaviour::RejectsChangeRequest) {
                Class::Error
            } else {
                Class::Success
            };
            let mut b =
                MessageBuilder::new(&mut out, method::BINDING, class, *req.transaction_id())
                    .unwrap();
            if class == Class::Error {
                b.add_error(420, "Unknown Attribute").unwrap();
                b.add_unknown_attributes(&[attr::CHANGE_REQUEST]).unwrap();
            } else {
                b.add_xor_address(attr::XOR_MAPPED_ADDRESS, from).unwrap();
                b.add_address(attr::OTHER_ADDRESS, other).unwrap();
            }
            let len = b.finish();
            let _ = sock.send_to(&out[..len], from);
        }
    });
    Fake { addr, stop }
}

fn cfg() -> ProbeConfig {
    ProbeConfig {
        retransmit: RetransmitConfig::with_timeout(Duration::from_millis(600)),
        hairpin: true,
    }
}

#[tokio::test]
async fn server_ignoring_change_request_is_reported() {
    let f = fake(Misbehaviour::IgnoresChangeRequest);
    let r = discover(f.addr, Some("127.0.0.1:0".parse().unwrap()), cfg())
        .await
        .unwrap();
    assert!(!r.behind_nat);
    assert_eq!(r.filtering, None);
    assert_eq!(r.nat_type, NatType::Unknown);
    assert!(
        r.problems[0].contains("the server ignores CHANGE-REQUEST"),
        "{:?}",
        r.problems
    );
    // The same finding, for programs: which test, where the answer had to come from, and where
    // it came from.
    assert_eq!(
        r.wrong_source,
        vec![kyuu_client::WrongSource {
            test: "filtering: change IP and port",
            expected: SocketAddr::new("127.0.0.2".parse().unwrap(), f.addr.port() + 1),
            from: f.addr,
        }]
    );
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(
        json["wrong_source"][0]["from"],
        serde_json::Value::String(f.addr.to_string())
    );
}

#[tokio::test]
async fn server_rejecting_change_request_is_reported() {
    let f = fake(Misbehaviour::RejectsChangeRequest);
    let r = discover(f.addr, Some("127.0.0.1:0".parse().unwrap()), cfg())
        .await
        .unwrap();
    assert_eq!(r.filtering, None);
    assert!(
        r.problems[0].contains("refused CHANGE-REQUEST with error 420"),
        "{:?}",
        r.problems
    );
}

#[tokio::test]
async fn other_address_with_same_ip_is_reported() {
    let f = fake(Misbehaviour::SameIpOther);
    let r = discover(f.addr, Some("127.0.0.1:0".parse().unwrap()), cfg())
        .await
        .unwrap();
    assert!(r.rfc5780);
    assert_eq!(r.mapping, None);
    assert!(r.problems[0].contains("same IP"), "{:?}", r.problems);
}

#[tokio::test]
async fn wildcard_local_address_is_resolved() {
    let f = fake(Misbehaviour::IgnoresChangeRequest);
    let r = discover(f.addr, None, cfg()).await.unwrap();
    // Bound to 0.0.0.0, the probe still knows it talks from 127.0.0.1: no NAT.
    assert_eq!(r.local.ip().to_string(), "127.0.0.1");
    assert!(!r.behind_nat);
}
