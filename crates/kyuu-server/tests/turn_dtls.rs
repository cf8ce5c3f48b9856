//! TURN over DTLS (RFC 7350) through real UDP sockets: an OpenSSL DTLS 1.2 client (the `openssl`
//! crate, nothing of kyuu's DTLS code) allocates, creates a permission, relays with Send/Data
//! indications and ChannelData to a UDP peer on 127.0.0.1 and back, and the admin listing shows
//! the allocation as `dtls`. Garbage and truncated DTLS records sprayed at the listener get no
//! answer (a ClientHello gets only a stateless HelloVerifyRequest) and leave the server working.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_server::relay::{self, ListenConfig, Transport};
use kyuu_turn::TurnConfig;
use openssl::ssl::{ErrorCode, SslConnector, SslMethod, SslStream, SslVerifyMode};

/// A connected UDP socket as a datagram Read/Write for OpenSSL.
struct Udp(UdpSocket);

impl Read for Udp {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv(buf)
    }
}

impl Write for Udp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.send(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn dtls_connect(server: SocketAddr) -> SslStream<Udp> {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.connect(server).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut b = SslConnector::builder(SslMethod::dtls()).unwrap();
    // Self-signed server certificate; this test is about TURN over DTLS, not PKI.
    b.set_verify(SslVerifyMode::NONE);
    let ssl = b
        .build()
        .configure()
        .unwrap()
        .into_ssl("localhost")
        .unwrap();
    let mut s = SslStream::new(ssl, Udp(sock)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match s.connect() {
            Ok(()) => return s,
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
            Err(e) => panic!("DTLS handshake with {server}: {e}"),
        }
    }
}

/// The TURN client's next event, each transmit one DTLS record, each record one input.
fn dtls_event(s: &mut SslStream<Udp>, c: &mut Client, secs: u64) -> Event {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = vec![0u8; 65536];
    loop {
        while let Some(b) = c.poll_transmit() {
            s.ssl_write(&b).unwrap();
        }
        if let Some(e) = c.poll_event() {
            return e;
        }
        assert!(Instant::now() < deadline, "no TURN answer over DTLS");
        match s.ssl_read(&mut buf) {
            Ok(n) => c.handle_input(Instant::now(), &buf[..n]),
            Err(e) if e.code() == ErrorCode::WANT_READ => c.handle_timeout(Instant::now()),
            Err(e) => panic!("DTLS read: {e}"),
        }
    }
}

fn peer_recv(peer: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 2048];
    let (n, from) = peer.recv_from(&mut buf).unwrap();
    (buf[..n].to_vec(), from)
}

async fn start_dtls() -> relay::RelayHandle {
    let l = ListenConfig {
        threads: 2,
        udp: vec![],
        tcp: vec![],
        tls: vec![],
        dtls: vec!["127.0.0.1:0".parse().unwrap()],
        ..ListenConfig::default()
    };
    let turn = TurnConfig {
        users: vec![kyuu_turn::UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        realm: "kyuu.test".into(),
        relay_ipv4: Some("127.0.0.1".parse().unwrap()),
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        unauth_rate: 0,
        ..Default::default()
    };
    relay::start(&l, turn, None).await.unwrap()
}

/// Allocate, permission, Send/Data and ChannelData both ways, all over one DTLS association.
fn turn_session(server: SocketAddr) -> Vec<u8> {
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let mut s = dtls_connect(server);
    let mut c = Client::new("u", "p", false);
    let now = Instant::now;

    c.allocate(now());
    let relayed = match dtls_event(&mut s, &mut c, 10) {
        Event::Allocated { relayed, .. } => relayed[0],
        e => panic!("allocate over DTLS: {e:?}"),
    };
    c.create_permission(now(), &[peer_addr]);
    assert_eq!(dtls_event(&mut s, &mut c, 10), Event::PermissionCreated);

    // Send indication → peer; peer → Data indication.
    c.send_indication(peer_addr, b"via send");
    while let Some(b) = c.poll_transmit() {
        s.ssl_write(&b).unwrap();
    }
    let (got, from) = peer_recv(&peer);
    assert_eq!((got.as_slice(), from), (&b"via send"[..], relayed));
    peer.send_to(b"data back", relayed).unwrap();
    assert_eq!(
        dtls_event(&mut s, &mut c, 10),
        Event::Data {
            peer: peer_addr,
            data: b"data back".to_vec()
        }
    );

    // ChannelData both ways: unpadded, one record each (datagram semantics).
    c.channel_bind(now(), 0x4001, peer_addr);
    assert_eq!(
        dtls_event(&mut s, &mut c, 10),
        Event::ChannelBound {
            channel: 0x4001,
            peer: peer_addr
        }
    );
    let mut frame = [0u8; 64];
    let n = c.channel_data(0x4001, b"odd", &mut frame).unwrap();
    assert_eq!(n, 7, "no padding over DTLS");
    s.ssl_write(&frame[..n]).unwrap();
    let (got, from) = peer_recv(&peer);
    assert_eq!((got.as_slice(), from), (&b"odd"[..], relayed));
    peer.send_to(b"channel back", relayed).unwrap();
    let mut buf = vec![0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(10);
    let record = loop {
        match s.ssl_read(&mut buf) {
            Ok(n) => break buf[..n].to_vec(),
            Err(e) if e.code() == ErrorCode::WANT_READ && Instant::now() < deadline => {}
            Err(e) => panic!("DTLS read: {e}"),
        }
    };
    assert_eq!(&record[..4], &[0x40, 0x01, 0, 12]);
    assert_eq!(
        &record[4..],
        b"channel back",
        "one unpadded ChannelData per record"
    );
    let _ = s.shutdown();
    record
}

#[tokio::test]
async fn turn_over_dtls_relays_both_ways() {
    let h = start_dtls().await;
    let server = h.addr(Transport::Dtls).unwrap();
    assert!(h.addr(Transport::Udp).is_none());

    // A client that keeps its association open, so the admin listing can see it.
    let listing = tokio::task::spawn_blocking(move || {
        let mut s = dtls_connect(server);
        let mut c = Client::new("u", "p", false);
        c.allocate(Instant::now());
        match dtls_event(&mut s, &mut c, 10) {
            Event::Allocated { .. } => {}
            e => panic!("allocate over DTLS: {e:?}"),
        }
        s
    })
    .await
    .unwrap();
    let allocs = h.control().allocations().await;
    assert_eq!(allocs.len(), 1, "{allocs:?}");
    let json = serde_json::to_value(&allocs[0]).unwrap();
    assert_eq!(json["transport"], "dtls", "{json}");

    // Closing the association (close_notify) ends its allocation, as a TCP close does.
    tokio::task::spawn_blocking(move || {
        let mut s = listing;
        let _ = s.shutdown();
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.allocations() > 0 {
        assert!(
            Instant::now() < deadline,
            "allocation outlived its association"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    tokio::task::spawn_blocking(move || turn_session(server))
        .await
        .unwrap();
    h.shutdown().await;
}

/// Garbage, truncated records and ClientHellos with forged cookies: never a panic, no answer but
/// a HelloVerifyRequest, and a real client still gets through afterwards.
#[tokio::test]
async fn garbage_records_get_no_state_and_no_answer() {
    let h = start_dtls().await;
    let server = h.addr(Transport::Dtls).unwrap();
    tokio::task::spawn_blocking(move || {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        // A ClientHello (no cookie) as OpenSSL would send it.
        let mut hello = vec![22u8, 0xfe, 0xff, 0, 0, 0, 0, 0, 0, 0, 0];
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[1u8; 32]);
        body.extend_from_slice(&[0, 0, 0, 2, 0xc0, 0x2b, 1, 0]);
        let mut hs = vec![
            1,
            0,
            0,
            body.len() as u8,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            body.len() as u8,
        ];
        hs.extend_from_slice(&body);
        hello.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        hello.extend_from_slice(&hs);

        let mut junk: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![22],
            vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 4, 1, 2, 3, 4],
            vec![0xff; 1500],
            b"\x00\x01\x00\x00\x21\x12\xa4\x42plainstunxx".to_vec(),
        ];
        for n in 0..hello.len() {
            junk.push(hello[..n].to_vec());
        }
        // A forged cookie in an otherwise valid second ClientHello.
        let mut forged = hello.clone();
        let cookie_at = 13 + 12 + 2 + 32 + 1;
        forged[cookie_at] = 4;
        forged.splice(cookie_at + 1..cookie_at + 1, [9, 9, 9, 9]);
        forged[10] = 1;
        forged[13 + 5] = 1;
        let hs_len = (forged.len() - 13 - 12) as u8;
        forged[13 + 3] = hs_len;
        forged[13 + 11] = hs_len;
        forged[12] = (forged.len() - 13) as u8;
        let mut buf = [0u8; 2048];
        for j in &junk {
            sock.send_to(j, server).unwrap();
        }
        sock.set_read_timeout(Some(Duration::from_millis(700)))
            .unwrap();
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            panic!("garbage was answered: {:?}", &buf[..n.min(16)]);
        }
        for hello in [&hello, &forged] {
            sock.send_to(hello, server).unwrap();
            let (n, _) = sock.recv_from(&mut buf).expect("HelloVerifyRequest");
            assert_eq!(buf[0], 22, "a handshake record");
            assert_eq!(buf[13], 3, "HelloVerifyRequest");
            assert!(n < 80, "small: no amplification");
        }
    })
    .await
    .unwrap();
    assert_eq!(h.allocations(), 0);
    tokio::task::spawn_blocking(move || turn_session(server))
        .await
        .unwrap();
    h.shutdown().await;
}
