//! The RFC 5780 §4.6 binding-lifetime test against small UDP responders on loopback: one that
//! behaves, one that imitates a NAT forgetting idle mappings after 1.5 s, and one that ignores
//! RESPONSE-PORT.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kyuu_client::binding_lifetime;
use kyuu_stun::{attr, method, Class, Message, MessageBuilder};

#[derive(Clone, Copy)]
enum Kind {
    Good,
    /// Answers to a port only if that port was heard from in the last 1.5 s (an idle NAT
    /// mapping that expired drops the answer).
    Forgets,
    IgnoresResponsePort,
}

struct Responder {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn responder(kind: Kind) -> Responder {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    std::thread::spawn(move || {
        let mut heard: HashMap<u16, Instant> = HashMap::new();
        let mut buf = [0u8; 1500];
        while !s.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let Ok(req) = Message::parse(&buf[..n]) else {
                continue;
            };
            heard.insert(from.port(), Instant::now());
            let mut to = from;
            if let Some(Ok(p)) = req.get(attr::RESPONSE_PORT).map(attr::decode_response_port) {
                if !matches!(kind, Kind::IgnoresResponsePort) {
                    to.set_port(p);
                }
            }
            if matches!(kind, Kind::Forgets)
                && heard
                    .get(&to.port())
                    .is_none_or(|t| t.elapsed() > Duration::from_millis(1500))
            {
                continue;
            }
            let mut out = [0u8; 256];
            let mut b = MessageBuilder::new(
                &mut out,
                method::BINDING,
                Class::Success,
                *req.transaction_id(),
            )
            .unwrap();
            b.add_xor_address(attr::XOR_MAPPED_ADDRESS, from).unwrap();
            let len = b.finish();
            let _ = sock.send_to(&out[..len], to);
        }
    });
    Responder { addr, stop }
}

fn local() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn a_mapping_that_lives_through_the_bound_is_reported_alive() {
    let r = responder(Kind::Good);
    let rep = binding_lifetime(r.addr, local(), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(rep.alive_after_ms, Some(2000), "{rep:?}");
    assert_eq!(rep.expired_after_ms, None);
    assert!(rep.problems.is_empty());
}

#[tokio::test]
async fn an_expiring_mapping_is_bracketed() {
    let r = responder(Kind::Forgets);
    let rep = binding_lifetime(r.addr, local(), Duration::from_secs(8))
        .await
        .unwrap();
    assert_eq!(rep.alive_after_ms, Some(1000), "{rep:?}");
    assert_eq!(rep.expired_after_ms, Some(2000), "{rep:?}");
}

#[tokio::test]
async fn a_server_ignoring_response_port_is_reported() {
    let r = responder(Kind::IgnoresResponsePort);
    let rep = binding_lifetime(r.addr, local(), Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(rep.alive_after_ms, None, "{rep:?}");
    assert!(rep.problems[0].contains("RESPONSE-PORT"), "{rep:?}");
}
