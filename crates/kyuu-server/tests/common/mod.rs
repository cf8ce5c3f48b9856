//! Helpers shared by the STUN/TURN socket tests.
#![allow(clippy::unwrap_used, dead_code)]

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
