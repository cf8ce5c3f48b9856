//! TLS for the STUN/TURN listener (RFC 8489 §6.2.3 over TCP): a configured PEM pair, or a
//! self-signed certificate generated at start.

use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

use super::config::ListenConfig;

pub(crate) fn acceptor(cfg: &ListenConfig) -> anyhow::Result<TlsAcceptor> {
    let (certs, key) = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(cert), Some(key)) => {
            let pem = std::fs::read(cert)
                .with_context(|| format!("listen.tls_cert: cannot read {}", cert.display()))?;
            let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .with_context(|| format!("listen.tls_cert: bad PEM in {}", cert.display()))?;
            let pem = std::fs::read(key)
                .with_context(|| format!("listen.tls_key: cannot read {}", key.display()))?;
            let key = rustls_pemfile::private_key(&mut pem.as_slice())
                .with_context(|| format!("listen.tls_key: bad PEM in {}", key.display()))?
                .with_context(|| format!("listen.tls_key: no key in {}", key.display()))?;
            (certs, key)
        }
        _ => {
            let mut names = cfg.tls_names.clone();
            for a in cfg.tls.iter() {
                if !a.ip().is_unspecified() {
                    names.push(a.ip().to_string());
                }
            }
            let ck = rcgen::generate_simple_self_signed(names)
                .context("generating a self-signed TLS certificate")?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
            (vec![ck.cert.der().clone()], key)
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("listen.tls_cert: certificate and key do not match")?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
