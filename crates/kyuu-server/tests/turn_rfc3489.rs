//! Classic STUN (RFC 3489, RFC 8489 §11) and CHANGE-REQUEST without RFC 5780 over real sockets:
//! hand-made requests over UDP and TCP, and Debian's `stun` client (stund 0.97), which sends
//! RFC 3489 Binding requests that always carry CHANGE-REQUEST. The `stun` tests skip with a SKIP
//! line when the client is not installed, unless KYUU_INTEROP_REQUIRED=1.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

mod common;
use common::free_port_pair;

use kyuu_server::relay::{self, ListenConfig};
use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};
use kyuu_turn::TurnConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// An RFC 3489 Binding request: no magic cookie, a 128-bit transaction id.
fn classic_request(change: Option<u32>) -> Vec<u8> {
    let mut req = vec![
        0x00, 0x01, // Binding request
        0x00, 0x00, // attribute length, set below
        0x0b, 0xad, 0xf0, 0x0d, // transaction id bytes 0..4 (where RFC 8489 puts 2112a442)
        0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, // bytes 4..16
    ];
    if let Some(flags) = change {
        req.extend_from_slice(&[0x00, 0x03, 0x00, 0x04]); // CHANGE-REQUEST, length 4
        req.extend_from_slice(&flags.to_be_bytes());
    }
    req[3] = (req.len() - 20) as u8;
    req
}

/// Checks an RFC 3489 success answer and returns its MAPPED-ADDRESS (the first attribute).
fn classic_mapped(resp: &[u8]) -> SocketAddr {
    assert_eq!(&resp[..2], &[0x01, 0x01], "Binding success");
    assert_eq!(
        &resp[4..20],
        &classic_request(None)[4..20],
        "transaction id copied"
    );
    assert_eq!(&resp[20..22], &[0x00, 0x01], "MAPPED-ADDRESS first");
    let n = usize::from(u16::from_be_bytes([resp[22], resp[23]]));
    attr::decode_address(attr::MAPPED_ADDRESS, &resp[24..24 + n]).unwrap()
}

async fn udp_roundtrip(sock: &UdpSocket, to: SocketAddr, req: &[u8]) -> Option<Vec<u8>> {
    sock.send_to(req, to).await.unwrap();
    let mut buf = vec![0u8; 1500];
    match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            assert_eq!(from, to);
            buf.truncate(n);
            Some(buf)
        }
        _ => None,
    }
}

fn plain(p: u16) -> ListenConfig {
    let a = SocketAddr::from(([127, 0, 0, 1], p));
    ListenConfig {
        threads: 1,
        ..ListenConfig::on(&[a], &[])
    }
}

#[tokio::test]
async fn rfc3489_binding_over_udp_and_tcp() {
    let (p, _) = free_port_pair();
    let h = relay::start(&plain(p), TurnConfig::default(), None)
        .await
        .unwrap();
    let a = SocketAddr::from(([127, 0, 0, 1], p));
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let resp = udp_roundtrip(&s, a, &classic_request(None))
        .await
        .expect("classic answer over UDP");
    assert_eq!(classic_mapped(&resp), s.local_addr().unwrap());
    // CHANGE-REQUEST with no flag: answered (RFC 5780 is off here).
    let resp = udp_roundtrip(&s, a, &classic_request(Some(0)))
        .await
        .expect("classic answer with empty CHANGE-REQUEST");
    assert_eq!(classic_mapped(&resp), s.local_addr().unwrap());
    // CHANGE-REQUEST with a flag and no alternate address: 420 naming CHANGE-REQUEST.
    let resp = udp_roundtrip(&s, a, &classic_request(Some(attr::CHANGE_PORT)))
        .await
        .expect("420");
    assert_eq!(&resp[..2], &[0x01, 0x11]);
    assert_eq!(&resp[20..28], &[0x00, 0x09, 0x00, 0x04, 0, 0, 4, 20]);
    // Malformed cookieless traffic is still dropped: truncated, and a cookieless Allocate.
    let r = classic_request(Some(0));
    assert!(udp_roundtrip(&s, a, &r[..r.len() - 4]).await.is_none());
    let mut alloc = classic_request(None);
    alloc[1] = 0x03;
    assert!(udp_roundtrip(&s, a, &alloc).await.is_none());

    // TCP: two classic requests in one write.
    let mut c = TcpStream::connect(a).await.unwrap();
    c.write_all(&[classic_request(None), classic_request(Some(0))].concat())
        .await
        .unwrap();
    for _ in 0..2 {
        let mut head = [0u8; 20];
        tokio::time::timeout(Duration::from_secs(2), c.read_exact(&mut head))
            .await
            .unwrap()
            .unwrap();
        let n = usize::from(u16::from_be_bytes([head[2], head[3]]));
        let mut rest = vec![0u8; n];
        c.read_exact(&mut rest).await.unwrap();
        assert_eq!(
            classic_mapped(&[head.to_vec(), rest].concat()),
            c.local_addr().unwrap()
        );
    }
    h.shutdown().await;
}

#[tokio::test]
async fn rfc8489_change_request_without_flags_is_a_plain_binding_without_rfc5780() {
    let (p, _) = free_port_pair();
    let h = relay::start(&plain(p), TurnConfig::default(), None)
        .await
        .unwrap();
    let a = SocketAddr::from(([127, 0, 0, 1], p));
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let tid = TransactionId(rand::random());
    let mut buf = vec![0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, method::BINDING, Class::Request, tid).unwrap();
    b.add_u32(attr::CHANGE_REQUEST, 0).unwrap();
    let n = b.finish();
    let resp = udp_roundtrip(&s, a, &buf[..n]).await.expect("answer");
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        s.local_addr().unwrap()
    );
    h.shutdown().await;
}

fn stun_client() -> Option<&'static str> {
    if Command::new("stun").arg("-h").output().is_ok() {
        return Some("stun");
    }
    if std::env::var("KYUU_INTEROP_REQUIRED").as_deref() == Ok("1") {
        panic!("stun (Debian stun-client) is required (KYUU_INTEROP_REQUIRED=1) but not installed");
    }
    println!("SKIP: stun (Debian stun-client) not installed");
    None
}

/// Runs `stun 127.0.0.1:<port> -v` (bounded) and returns its output.
async fn run_stun(port: u16) -> String {
    let out = tokio::task::spawn_blocking(move || {
        Command::new("timeout")
            .args(["20", "stun", &format!("127.0.0.1:{port}"), "-v"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{text}");
    text
}

#[tokio::test]
async fn debian_stun_client_learns_its_address_without_rfc5780() {
    let Some(_) = stun_client() else { return };
    let (p, _) = free_port_pair();
    let h = relay::start(&plain(p), TurnConfig::default(), None)
        .await
        .unwrap();
    let text = run_stun(p).await;
    h.shutdown().await;
    // The client sends test I (CHANGE-REQUEST 0): it gets its address back, not XOR'd, as
    // the port it opened. Tests II and III (change IP / port) get 420.
    let opened = opened_port(&text);
    assert!(
        text.contains(&format!("MappedAddress = 127.0.0.1:{opened}")),
        "{text}"
    );
    assert!(text.contains("Received message of type 257"), "{text}");
    assert!(text.contains("ErrorCode = 4 20"), "{text}");
}

/// The first port the client says it opened ("Opened port N with fd 3").
fn opened_port(text: &str) -> u16 {
    text.lines()
        .find_map(|l| l.strip_prefix("Opened port "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no opened port in {text}"))
}

#[tokio::test]
async fn debian_stun_client_classifies_with_rfc5780() {
    let Some(_) = stun_client() else { return };
    let (p, q) = free_port_pair();
    let cfg = ListenConfig {
        udp: vec![SocketAddr::from(([127, 0, 0, 1], p))],
        tcp: vec![],
        tls: vec![],
        alt_ip: Some("127.0.0.2".parse().unwrap()),
        alt_port: Some(q),
        threads: 1,
        ..Default::default()
    };
    let h = relay::start(&cfg, TurnConfig::default(), None)
        .await
        .unwrap();
    let text = run_stun(p).await;
    h.shutdown().await;
    // Tests II (change IP) and III (change port) are answered from the alternate addresses,
    // and on loopback (no NAT) the client's verdict is "Open".
    let opened = opened_port(&text);
    for want in [
        format!("MappedAddress = 127.0.0.1:{opened}"),
        format!("SourceAddress = 127.0.0.2:{p}"),
        format!("SourceAddress = 127.0.0.1:{q}"),
        format!("ChangedAddress = 127.0.0.2:{q}"),
        "Primary: Open".to_string(),
    ] {
        assert!(text.contains(&want), "{want} missing from {text}");
    }
}
