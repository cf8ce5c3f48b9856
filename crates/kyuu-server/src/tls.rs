//! TLS server configuration shared by the STUN/TURN listener (`[listen]`, RFC 8489 §6.2.3) and
//! the HTTPS/`wss://` server (`[http]`): a configured PEM pair, or a self-signed certificate
//! generated at start.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// ALPN for the HTTP server: HTTP/1.1 only (WebSocket upgrades).
pub const HTTP_ALPN: &[&[u8]] = &[b"http/1.1"];

/// Where the HTTPS certificate came from, for the start-up summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// `http.tls_cert` / `http.tls_key` (or `listen.tls_cert` / `listen.tls_key`).
    File(std::path::PathBuf),
    /// Generated at start for these names; browsers do not trust it.
    SelfSigned(Vec<String>),
}

/// A TLS acceptor: the PEM pair when both paths are given, else a self-signed certificate for
/// `names`. `section` (`"http"` or `"listen"`) names the keys the paths came from in errors.
/// `alpn` lists the protocols offered; empty means no ALPN, so a client offering any protocol
/// (TURN clients may offer `stun.turn`, RFC 7443) is not refused.
pub fn acceptor(
    section: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
    names: Vec<String>,
    alpn: &[&[u8]],
) -> anyhow::Result<(TlsAcceptor, CertSource)> {
    let (certs, key, source) = match (cert, key) {
        (Some(cert), Some(key)) => {
            let pem = std::fs::read(cert)
                .with_context(|| format!("{section}.tls_cert: cannot read {}", cert.display()))?;
            let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .with_context(|| format!("{section}.tls_cert: bad PEM in {}", cert.display()))?;
            if certs.is_empty() {
                anyhow::bail!("{section}.tls_cert: no certificate in {}", cert.display());
            }
            let pem = std::fs::read(key)
                .with_context(|| format!("{section}.tls_key: cannot read {}", key.display()))?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .with_context(|| format!("{section}.tls_key: bad PEM in {}", key.display()))?
                .with_context(|| format!("{section}.tls_key: no key in {}", key.display()))?;
            (certs, key_der, CertSource::File(cert.to_path_buf()))
        }
        _ => {
            let ck = rcgen::generate_simple_self_signed(names.clone())
                .context("generating a self-signed certificate for HTTPS")?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
            (
                vec![ck.cert.der().clone()],
                key,
                CertSource::SelfSigned(names),
            )
        }
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .with_context(|| format!("{section}.tls_cert: certificate and key do not match"))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok((TlsAcceptor::from(Arc::new(config)), source))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tls_errors_name_the_key() {
        let missing = Path::new("/nonexistent/kyuu-cert.pem");
        let e = acceptor("http", Some(missing), Some(missing), vec![], HTTP_ALPN)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").starts_with("http.tls_cert: cannot read"),
            "{e:#}"
        );

        // A certificate with someone else's key.
        let dir = std::env::temp_dir().join(format!("kyuu-http-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        let (cert, key) = (dir.join("a.pem"), dir.join("b.key"));
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, b.key_pair.serialize_pem()).unwrap();
        let e = acceptor("listen", Some(&cert), Some(&key), vec![], HTTP_ALPN)
            .err()
            .unwrap();
        assert!(format!("{e:#}").starts_with("listen.tls_cert: "), "{e:#}");
        std::fs::write(&key, a.key_pair.serialize_pem()).unwrap();
        let (_, source) = acceptor("http", Some(&cert), Some(&key), vec![], HTTP_ALPN).unwrap();
        assert_eq!(source, CertSource::File(cert));
        let _ = std::fs::remove_dir_all(&dir);

        let (_, source) =
            acceptor("http", None, None, vec!["localhost".into()], HTTP_ALPN).unwrap();
        assert_eq!(source, CertSource::SelfSigned(vec!["localhost".into()]));
    }
}
