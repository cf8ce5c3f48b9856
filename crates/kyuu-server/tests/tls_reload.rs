//! A configuration reload re-reads the TLS certificate files (a renewed certificate) of the
//! TURN-over-TLS, TURN-over-DTLS and HTTPS listeners: new handshakes present the new certificate, open
//! connections are untouched, and an unreadable or mismatched pair is refused with the key
//! named, changing nothing. (Its own test binary: the certificate registry is process-wide.)
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use kyuu_server::admin::Hooks;
use kyuu_server::config::Config;
use kyuu_server::relay::Transport;

/// The end-entity certificate a TLS server at `addr` presents now.
async fn presented(addr: SocketAddr) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::AnyCert))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// The end-entity certificate a DTLS server at `addr` presents now (OpenSSL DTLS 1.2 client).
async fn presented_dtls(addr: SocketAddr) -> Vec<u8> {
    use openssl::ssl::{ErrorCode, SslConnector, SslMethod, SslStream, SslVerifyMode};
    struct Udp(std::net::UdpSocket);
    impl std::io::Read for Udp {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.0.recv(buf)
        }
    }
    impl std::io::Write for Udp {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.send(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    tokio::task::spawn_blocking(move || {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(addr).unwrap();
        sock.set_read_timeout(Some(std::time::Duration::from_millis(100)))
            .unwrap();
        let mut b = SslConnector::builder(SslMethod::dtls()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        let ssl = b
            .build()
            .configure()
            .unwrap()
            .into_ssl("localhost")
            .unwrap();
        let mut s = SslStream::new(ssl, Udp(sock)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match s.connect() {
                Ok(()) => break,
                Err(e)
                    if e.code() == ErrorCode::WANT_READ && std::time::Instant::now() < deadline => {
                }
                Err(e) => panic!("DTLS handshake: {e}"),
            }
        }
        let der = s.ssl().peer_certificate().unwrap().to_der().unwrap();
        let _ = s.shutdown();
        der
    })
    .await
    .unwrap()
}

fn write_pair(dir: &Path) -> Vec<u8> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), ck.key_pair.serialize_pem()).unwrap();
    ck.cert.der().to_vec()
}

#[tokio::test]
async fn reload_swaps_tls_certificates() {
    let dir = std::env::temp_dir().join(format!("kyuu-tls-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let first = write_pair(&dir);
    let text = format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = [\"127.0.0.1:0\"]\ndtls = [\"127.0.0.1:0\"]\nthreads = 1\n\
         tls_cert = \"{c}\"\ntls_key = \"{k}\"\n\
         [turn]\nstatic_auth_secrets = [\"x\"]\n\
         [http]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\nmetrics = false\n",
        c = dir.join("cert.pem").display(),
        k = dir.join("key.pem").display()
    );
    let file = dir.join("kyuu.toml");
    std::fs::write(&file, &text).unwrap();
    let path = file.clone();
    let hooks = Hooks {
        log_level: None,
        reload_config: Some(Arc::new(move || {
            let c = Config::from_file(&path).map_err(|e| e.to_string())?;
            c.validate().map_err(|e| e.to_string())?;
            Ok(c)
        })),
    };
    let c = Config::from_file(&file).unwrap();
    c.validate().unwrap();
    let running = kyuu_server::start_with(c, hooks).await.unwrap();
    let turn_tls = running
        .listeners
        .iter()
        .find(|(p, _)| *p == Transport::Tls)
        .unwrap()
        .1;
    let https = running.https_addr.unwrap();
    let turn_dtls = running
        .listeners
        .iter()
        .find(|(p, _)| *p == Transport::Dtls)
        .unwrap()
        .1;
    assert_eq!(presented(turn_tls).await, first);
    assert_eq!(presented_dtls(turn_dtls).await, first);
    assert_eq!(presented(https).await, first);

    // A renewed certificate (certbot writes new files and signals a reload).
    let second = write_pair(&dir);
    assert_ne!(first, second);
    let r = running.admin.reload().await.unwrap();
    assert!(r.applied.contains(&"tls certificates".to_owned()), "{r:?}");
    assert_eq!(presented(turn_tls).await, second);
    assert_eq!(presented(https).await, second);
    assert_eq!(presented_dtls(turn_dtls).await, second);

    // A key that does not belong to the certificate: refused, the running certificate stays.
    let other = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
    std::fs::write(dir.join("key.pem"), other.key_pair.serialize_pem()).unwrap();
    let e = running.admin.reload().await.unwrap_err();
    assert!(
        e.contains("tls_cert: certificate and key do not match"),
        "{e}"
    );
    assert_eq!(presented(turn_tls).await, second);
    assert_eq!(presented_dtls(turn_dtls).await, second);

    running
        .shutdown(std::time::Duration::from_millis(100))
        .await;
    let _ = std::fs::remove_dir_all(&dir);
}
