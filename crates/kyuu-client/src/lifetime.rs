//! The binding-lifetime test of [RFC 5780 §4.6]: how long a NAT keeps an idle UDP mapping.
//!
//! Each round makes a fresh mapping from socket X (a Binding answered to X), stays idle for T,
//! then asks from another socket Y for a Binding whose answer goes to X's mapped port
//! (RESPONSE-PORT, RFC 5780 §7.5). If X still receives it, the mapping outlived T and T doubles;
//! otherwise the lifetime lies between the last T that worked and this one. T never exceeds the
//! caller's maximum, so the whole test is bounded by about twice that maximum.
//!
//! [RFC 5780 §4.6]: https://www.rfc-editor.org/rfc/rfc5780#section-4.6

use std::net::SocketAddr;
use std::time::Duration;

use kyuu_stun::{method, Class, Message, MessageBuilder};
use serde::Serialize;
use tokio::net::UdpSocket;

use crate::binding::{self, BindingResponse};

/// Waits of the rounds: 1 s, then doubling, up to `max`.
const FIRST_WAIT: Duration = Duration::from_secs(1);
/// Tries per request (each waiting `ANSWER_WAIT`).
const TRIES: u32 = 3;
const ANSWER_WAIT: Duration = Duration::from_millis(700);

/// What the binding-lifetime test found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LifetimeReport {
    /// The longest idle time after which the mapping still worked (milliseconds).
    pub alive_after_ms: Option<u64>,
    /// The shortest idle time after which it no longer did, if one was seen (milliseconds).
    pub expired_after_ms: Option<u64>,
    /// The bound the test was given (milliseconds).
    pub max_ms: u64,
    /// Why the test could not conclude, in plain words.
    pub problems: Vec<String>,
}

fn request(resp_port: Option<u16>) -> Option<(kyuu_stun::TransactionId, Vec<u8>)> {
    let tid = binding::new_transaction_id();
    let mut buf = vec![0u8; 128];
    let mut b = MessageBuilder::new(&mut buf, method::BINDING, Class::Request, tid).ok()?;
    if let Some(p) = resp_port {
        b.add_response_port(p).ok()?;
    }
    b.add_fingerprint().ok()?;
    let n = b.finish();
    buf.truncate(n);
    Some((tid, buf))
}

/// Waits up to `wait` on `sock` for a Binding success with `tid`; returns the mapped address.
async fn answer(
    sock: &UdpSocket,
    tid: kyuu_stun::TransactionId,
    wait: Duration,
) -> Option<SocketAddr> {
    let mut buf = vec![0u8; 1500];
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let r = tokio::time::timeout_at(deadline, sock.recv_from(&mut buf)).await;
        let Ok(Ok((n, _))) = r else { return None };
        let Some(data) = buf.get(..n) else { continue };
        let Ok(msg) = Message::parse(data) else {
            continue;
        };
        if *msg.transaction_id() != tid {
            continue;
        }
        if let Ok(Some(BindingResponse::Success { mapped, .. })) = binding::parse_response(&msg) {
            return Some(mapped);
        }
    }
}

/// Runs the test against `server` from sockets bound to `bind` (IP, port 0), bounded by `max`.
pub async fn binding_lifetime(
    server: SocketAddr,
    bind: SocketAddr,
    max: Duration,
) -> std::io::Result<LifetimeReport> {
    let mut report = LifetimeReport {
        alive_after_ms: None,
        expired_after_ms: None,
        max_ms: max.as_millis() as u64,
        problems: Vec::new(),
    };
    let mut wait = FIRST_WAIT.min(max);
    loop {
        let x = UdpSocket::bind(bind).await?;
        let mut mapped = None;
        for _ in 0..TRIES {
            let Some((tid, req)) = request(None) else {
                break;
            };
            let _ = x.send_to(&req, server).await;
            mapped = answer(&x, tid, ANSWER_WAIT).await;
            if mapped.is_some() {
                break;
            }
        }
        let Some(mapped) = mapped else {
            report
                .problems
                .push(format!("no answer from {server}; the lifetime is unknown"));
            return Ok(report);
        };
        tokio::time::sleep(wait).await;
        let y = UdpSocket::bind(bind).await?;
        let mut alive = false;
        let mut to_y = false;
        for _ in 0..TRIES {
            let Some((tid, req)) = request(Some(mapped.port())) else {
                break;
            };
            let _ = y.send_to(&req, server).await;
            if answer(&x, tid, ANSWER_WAIT).await.is_some() {
                alive = true;
                break;
            }
            if answer(&y, tid, Duration::ZERO).await.is_some() {
                to_y = true;
            }
        }
        if to_y && !alive {
            report.problems.push(
                "the server answered RESPONSE-PORT requests to the sending port instead; it does \
                 not support RESPONSE-PORT (RFC 5780 §7.5), so the lifetime is unknown"
                    .into(),
            );
            return Ok(report);
        }
        let ms = wait.as_millis() as u64;
        if !alive {
            report.expired_after_ms = Some(ms);
            return Ok(report);
        }
        report.alive_after_ms = Some(ms);
        if wait >= max {
            return Ok(report);
        }
        wait = (wait * 2).min(max);
    }
}
