//! Helpers shared by the STUN/TURN socket tests.
#![allow(clippy::unwrap_used, dead_code)]

/// Whether `tool` is installed; if not, prints a SKIP line, or panics with
/// `KYUU_INTEROP_REQUIRED=1`.
pub fn have(tool: &str) -> bool {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("KYUU_INTEROP_REQUIRED").as_deref() != Ok("1"),
            "{tool} is required (KYUU_INTEROP_REQUIRED=1) but not installed"
        );
        println!("SKIP: {tool} not installed");
    }
    found
}

/// A port and the next one, both free for UDP and TCP on 127.0.0.1 and 127.0.0.2 (RFC 5780
/// tests listen on the primary and alternate IP and port).
pub fn free_port_pair() -> (u16, u16) {
    for _ in 0..50 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        drop(s);
        if p > 65000 {
            continue;
        }
        let q = p + 1;
        let ok = ["127.0.0.1", "127.0.0.2"].iter().all(|ip| {
            [p, q].iter().all(|port| {
                std::net::UdpSocket::bind((*ip, *port)).is_ok()
                    && std::net::TcpListener::bind((*ip, *port)).is_ok()
            })
        });
        if ok {
            return (p, q);
        }
    }
    panic!("no free port pair");
}

/// The sans-IO TURN client's next event, exchanging framed STUN/ChannelData over stream `s`
/// (TCP, TLS), failing the test after `secs` seconds without one.
pub async fn stream_event<S>(
    s: &mut S,
    c: &mut kyuu_client::turn::Client,
    secs: u64,
) -> kyuu_client::turn::Event
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        while let Some(b) = c.poll_transmit() {
            s.write_all(&b).await.unwrap();
        }
        if let Some(e) = c.poll_event() {
            return e;
        }
        assert!(std::time::Instant::now() < deadline, "no TURN answer");
        let mut head = [0u8; 4];
        if let Ok(r) = tokio::time::timeout(
            std::time::Duration::from_millis(200),
            s.read_exact(&mut head),
        )
        .await
        {
            r.unwrap();
            let n = kyuu_stun::frame_len(&head).unwrap().unwrap();
            let mut rest = vec![0u8; n - 4];
            s.read_exact(&mut rest).await.unwrap();
            c.handle_input(std::time::Instant::now(), &[head.to_vec(), rest].concat());
        }
    }
}

/// A TLS client verifier that accepts any certificate: the servers under test use
/// self-signed ones, and these tests are about STUN/TURN, not PKI.
#[derive(Debug)]
pub struct AnyCert;

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A TURN client over UDP: the sans-IO client (`kyuu_client::turn`) on a socket bound to the
/// loopback address of the server's family. Test files add their own methods (`impl Udp`).
pub struct Udp {
    pub c: kyuu_client::turn::Client,
    pub s: tokio::net::UdpSocket,
    pub server: std::net::SocketAddr,
}

impl Udp {
    /// The user `u` with password `p`.
    pub async fn new(server: std::net::SocketAddr) -> Self {
        Self::with_user(server, "u", "p").await
    }

    pub async fn with_user(server: std::net::SocketAddr, user: &str, password: &str) -> Self {
        let bind = if server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        Udp {
            c: kyuu_client::turn::Client::new(user, password, false),
            s: tokio::net::UdpSocket::bind(bind).await.unwrap(),
            server,
        }
    }

    pub async fn flush(&mut self) {
        while let Some(b) = self.c.poll_transmit() {
            self.s.send_to(&b, self.server).await.unwrap();
        }
    }

    /// Runs the client until an event arrives (at most 5 s).
    pub async fn event(&mut self) -> kyuu_client::turn::Event {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut buf = vec![0u8; 4096];
        loop {
            self.flush().await;
            if let Some(e) = self.c.poll_event() {
                return e;
            }
            assert!(std::time::Instant::now() < deadline, "no event");
            if let Ok(Ok((n, _))) = tokio::time::timeout(
                std::time::Duration::from_millis(100),
                self.s.recv_from(&mut buf),
            )
            .await
            {
                self.c.handle_input(std::time::Instant::now(), &buf[..n]);
            }
            self.c.handle_timeout(std::time::Instant::now());
        }
    }

    /// Allocates a relay of the server's address family; returns its relayed address and the
    /// mapped address the server saw.
    pub async fn allocate_same_family(
        &mut self,
    ) -> (std::net::SocketAddr, Option<std::net::SocketAddr>) {
        let family = if self.server.is_ipv4() {
            kyuu_stun::attr::FAMILY_IPV4
        } else {
            kyuu_stun::attr::FAMILY_IPV6
        };
        self.c.allocate_with(
            std::time::Instant::now(),
            &kyuu_client::turn::AllocateOptions {
                family: Some(family),
                ..Default::default()
            },
        );
        let kyuu_client::turn::Event::Allocated {
            relayed, mapped, ..
        } = self.event().await
        else {
            panic!("allocate failed")
        };
        (relayed[0], mapped)
    }

    /// ChannelBind `channel` to `peer`, waiting for the success.
    pub async fn bind(&mut self, channel: u16, peer: std::net::SocketAddr) {
        self.c
            .channel_bind(std::time::Instant::now(), channel, peer);
        assert!(matches!(
            self.event().await,
            kyuu_client::turn::Event::ChannelBound { .. }
        ));
    }

    /// Sends `data` to the server as ChannelData on `channel`.
    pub async fn channel_send(&mut self, channel: u16, data: &[u8]) {
        let mut buf = [0u8; 256];
        let n = self.c.channel_data(channel, data, &mut buf).unwrap();
        self.s.send_to(&buf[..n], self.server).await.unwrap();
    }

    /// Deletes the allocation (a Refresh with lifetime 0), waiting for the success.
    pub async fn delete(&mut self) {
        self.c.refresh(std::time::Instant::now(), 0);
        assert_eq!(
            self.event().await,
            kyuu_client::turn::Event::Refreshed { lifetime: 0 }
        );
    }
}

/// A relay peer's next datagram and its source, failing the test after 2 s without one.
pub async fn peer_recv(peer: &tokio::net::UdpSocket) -> (Vec<u8>, std::net::SocketAddr) {
    let mut buf = vec![0u8; 2048];
    let (n, from) =
        tokio::time::timeout(std::time::Duration::from_secs(2), peer.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
    (buf[..n].to_vec(), from)
}

/// Relays both ways between the client `u`, whose allocation is `relayed`, and a new peer on the
/// loopback address of the server's family: a Send indication out and a Data indication back
/// after CreatePermission, then ChannelData each way on channel 0x4001, each datagram arriving
/// at the peer from `relayed`. On IPv4 a peer without permission (127.0.0.2) is not relayed.
pub async fn relay_both_ways(u: &mut Udp, relayed: std::net::SocketAddr) {
    use kyuu_client::turn::Event;
    let v4 = u.server.is_ipv4();
    let peer = tokio::net::UdpSocket::bind(if v4 { "127.0.0.1:0" } else { "[::1]:0" })
        .await
        .unwrap();
    let peer_addr = peer.local_addr().unwrap();

    u.c.create_permission(std::time::Instant::now(), &[peer_addr]);
    assert_eq!(u.event().await, Event::PermissionCreated);
    u.c.send_indication(peer_addr, b"via send");
    u.flush().await;
    let (d, from) = peer_recv(&peer).await;
    assert_eq!((d.as_slice(), from), (&b"via send"[..], relayed));
    peer.send_to(b"back as data", relayed).await.unwrap();
    assert_eq!(
        u.event().await,
        Event::Data {
            peer: peer_addr,
            data: b"back as data".to_vec()
        }
    );

    u.bind(0x4001, peer_addr).await;
    u.channel_send(0x4001, b"via channel").await;
    let (d, from) = peer_recv(&peer).await;
    assert_eq!((d.as_slice(), from), (&b"via channel"[..], relayed));
    peer.send_to(b"back on channel", relayed).await.unwrap();
    assert_eq!(
        u.event().await,
        Event::ChannelData {
            channel: 0x4001,
            data: b"back on channel".to_vec()
        }
    );

    if v4 {
        let stranger = tokio::net::UdpSocket::bind("127.0.0.2:0").await.unwrap();
        stranger.send_to(b"spam", relayed).await.unwrap();
        let mut b = [0u8; 100];
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(300), u.s.recv_from(&mut b))
                .await
                .is_err()
        );
    }
}
