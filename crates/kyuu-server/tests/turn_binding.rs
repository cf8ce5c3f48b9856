//! STUN Binding over real sockets: UDP, TCP, TLS, IPv4 and IPv6, RFC 5780.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::free_port_pair;

use kyuu_server::relay::Transport;
use kyuu_server::relay::{self, ListenConfig};
use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};
use kyuu_turn::TurnConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

fn binding(extra: impl FnOnce(&mut MessageBuilder<'_>)) -> (TransactionId, Vec<u8>) {
    let tid = TransactionId(rand::random());
    let mut buf = vec![0u8; 512];
    let mut b = MessageBuilder::new(&mut buf, method::BINDING, Class::Request, tid).unwrap();
    extra(&mut b);
    b.add_fingerprint().unwrap();
    let n = b.finish();
    buf.truncate(n);
    (tid, buf)
}

async fn udp_roundtrip(
    sock: &UdpSocket,
    to: SocketAddr,
    req: &[u8],
) -> Option<(Vec<u8>, SocketAddr)> {
    sock.send_to(req, to).await.unwrap();
    let mut buf = vec![0u8; 1500];
    match tokio::time::timeout(Duration::from_millis(500), sock.recv_from(&mut buf)).await {
        Ok(Ok((n, from))) => {
            buf.truncate(n);
            Some((buf, from))
        }
        _ => None,
    }
}

fn check_success(resp: &[u8], tid: TransactionId, mapped: SocketAddr) {
    let m = Message::parse(resp).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(*m.transaction_id(), tid);
    assert_eq!(
        m.xor_address(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        mapped
    );
    assert!(m.has(attr::SOFTWARE));
    assert!(m.verify_fingerprint().unwrap());
}

fn listen(addrs: &[&str], tls: &[&str]) -> ListenConfig {
    let p = |v: &[&str]| {
        v.iter()
            .map(|a| a.parse().unwrap())
            .collect::<Vec<SocketAddr>>()
    };
    ListenConfig {
        threads: 2,
        ..ListenConfig::on(&p(addrs), &p(tls))
    }
}

#[tokio::test]
async fn binding_over_udp_tcp_tls_v4_and_v6() {
    let h = relay::start(
        &listen(&["127.0.0.1:0", "[::1]:0"], &["127.0.0.1:0"]),
        TurnConfig::default(),
        None,
    )
    .await
    .unwrap();
    for (proto, addr) in h.listeners() {
        eprintln!("{proto} {addr}");
    }
    // UDP v4 and v6.
    for a in h
        .listeners()
        .iter()
        .filter(|(p, _)| *p == Transport::Udp)
        .map(|(_, a)| *a)
    {
        let bind: SocketAddr = if a.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        }
        .parse()
        .unwrap();
        let s = UdpSocket::bind(bind).await.unwrap();
        let (tid, req) = binding(|_| {});
        let (resp, from) = udp_roundtrip(&s, a, &req).await.expect("binding answer");
        assert_eq!(from, a);
        check_success(&resp, tid, s.local_addr().unwrap());
        // Unknown comprehension-required attribute: 420 + UNKNOWN-ATTRIBUTES.
        let (_, req) = binding(|b| b.add(0x7F01, &[1, 2, 3, 4]).unwrap());
        let (resp, _) = udp_roundtrip(&s, a, &req).await.expect("420");
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.class(), Class::Error);
        assert_eq!(m.error_code().unwrap().unwrap().code, 420);
        assert_eq!(m.get(attr::UNKNOWN_ATTRIBUTES).unwrap(), &[0x7F, 0x01]);
        // Malformed and truncated: dropped.
        assert!(udp_roundtrip(&s, a, &req[..req.len() - 3]).await.is_none());
        assert!(udp_roundtrip(&s, a, b"\x00\x01\x00").await.is_none());
        // CHANGE-REQUEST without RFC 5780 configured: 420.
        let (_, req) = binding(|b| b.add_u32(attr::CHANGE_REQUEST, attr::CHANGE_IP).unwrap());
        let (resp, _) = udp_roundtrip(&s, a, &req)
            .await
            .expect("420 for CHANGE-REQUEST");
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.error_code().unwrap().unwrap().code, 420);
    }
    // TCP v4 and v6, two messages in one write to exercise framing.
    for a in h
        .listeners()
        .iter()
        .filter(|(p, _)| *p == Transport::Tcp)
        .map(|(_, a)| *a)
    {
        let mut c = TcpStream::connect(a).await.unwrap();
        let (t1, r1) = binding(|_| {});
        let (t2, r2) = binding(|_| {});
        c.write_all(&[r1, r2].concat()).await.unwrap();
        for tid in [t1, t2] {
            let resp = read_frame(&mut c).await;
            check_success(&resp, tid, c.local_addr().unwrap());
        }
    }
    // TLS with the generated self-signed certificate.
    let a = h.addr(Transport::Tls).unwrap();
    let tcp = TcpStream::connect(a).await.unwrap();
    let mine = tcp.local_addr().unwrap();
    let mut tls = tls_connect(tcp).await;
    let (tid, req) = binding(|_| {});
    tls.write_all(&req).await.unwrap();
    let resp = read_frame(&mut tls).await;
    check_success(&resp, tid, mine);
    h.shutdown().await;
}

pub async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Vec<u8> {
    let mut head = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    let n = kyuu_stun::frame_len(&head).unwrap().unwrap();
    let mut rest = vec![0u8; n - 4];
    s.read_exact(&mut rest).await.unwrap();
    [head.to_vec(), rest].concat()
}

async fn tls_connect(tcp: TcpStream) -> tokio_rustls::client::TlsStream<TcpStream> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::AnyCert))
        .with_no_client_auth();
    let conn = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    conn.connect("localhost".try_into().unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn rfc5780_change_request_other_address_response_port() {
    let (p, q) = free_port_pair();
    let cfg = ListenConfig {
        udp: vec![SocketAddr::from(([127, 0, 0, 1], p))],
        tcp: vec![SocketAddr::from(([127, 0, 0, 1], p))],
        tls: vec![],
        alt_ip: Some("127.0.0.2".parse().unwrap()),
        alt_port: Some(q),
        threads: 1,
        ..Default::default()
    };
    let h = relay::start(&cfg, TurnConfig::default(), None)
        .await
        .unwrap();
    assert_eq!(
        h.listeners()
            .iter()
            .filter(|(p, _)| *p == Transport::Udp)
            .count(),
        4
    );
    let primary = SocketAddr::from(([127, 0, 0, 1], p));
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let me = s.local_addr().unwrap();

    let (tid, req) = binding(|_| {});
    let (resp, from) = udp_roundtrip(&s, primary, &req).await.unwrap();
    assert_eq!(from, primary);
    check_success(&resp, tid, me);
    let m = Message::parse(&resp).unwrap();
    assert_eq!(m.address(attr::RESPONSE_ORIGIN).unwrap().unwrap(), primary);
    assert_eq!(
        m.address(attr::OTHER_ADDRESS).unwrap().unwrap(),
        SocketAddr::from(([127, 0, 0, 2], q))
    );

    for (flags, want) in [
        (
            attr::CHANGE_IP | attr::CHANGE_PORT,
            SocketAddr::from(([127, 0, 0, 2], q)),
        ),
        (attr::CHANGE_PORT, SocketAddr::from(([127, 0, 0, 1], q))),
        (attr::CHANGE_IP, SocketAddr::from(([127, 0, 0, 2], p))),
    ] {
        let (tid, req) = binding(|b| b.add_u32(attr::CHANGE_REQUEST, flags).unwrap());
        let (resp, from) = udp_roundtrip(&s, primary, &req).await.unwrap();
        assert_eq!(from, want, "flags {flags:#x}");
        check_success(&resp, tid, me);
        let m = Message::parse(&resp).unwrap();
        assert_eq!(m.address(attr::RESPONSE_ORIGIN).unwrap().unwrap(), want);
    }
    // RESPONSE-PORT: the answer goes to another port of ours; PADDING is accepted.
    let other = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (tid, req) = binding(|b| {
        b.add_response_port(other.local_addr().unwrap().port())
            .unwrap();
        b.add(attr::PADDING, &[0u8; 64]).unwrap();
    });
    s.send_to(&req, primary).await.unwrap();
    let mut buf = vec![0u8; 1500];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), other.recv_from(&mut buf))
        .await
        .unwrap()
        .unwrap();
    check_success(&buf[..n], tid, me);
    h.shutdown().await;
}
