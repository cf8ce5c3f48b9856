//! TLS server configuration shared by the STUN/TURN listener (`[listen]`, RFC 8489 §6.2.3) and
//! the HTTPS/`wss://` server (`[http]`): a configured PEM pair, or a self-signed certificate
//! generated at start.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use anyhow::Context as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
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

/// Reads a PEM certificate chain and key into a signing key checked against the certificate.
fn load_pair(section: &str, cert: &Path, key: &Path) -> anyhow::Result<CertifiedKey> {
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
    CertifiedKey::from_der(certs, key_der, &rustls::crypto::ring::default_provider())
        .with_context(|| format!("{section}.tls_cert: certificate and key do not match"))
}

/// The certificate a TLS listener presents, swappable at run time: a configuration reload
/// re-reads the PEM files (a renewed certificate) without dropping connections.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
    /// `(section, cert, key)` for a file-backed certificate.
    files: Option<(String, PathBuf, PathBuf)>,
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// File-backed certificate stores of every TLS listener in the process.
static STORES: Mutex<Vec<Weak<CertStore>>> = Mutex::new(Vec::new());

/// Certificates read by [`prepare_reload`], applied by [`apply_reload`].
pub struct PreparedCerts(Vec<(Arc<CertStore>, Arc<CertifiedKey>)>);

impl std::fmt::Debug for PreparedCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedCerts({})", self.0.len())
    }
}

impl PreparedCerts {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Re-reads the PEM files of every file-backed TLS listener; fails (changing nothing) when any
/// of them is unreadable or mismatched.
pub fn prepare_reload() -> anyhow::Result<PreparedCerts> {
    let stores: Vec<Arc<CertStore>> = {
        let mut list = STORES.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    let mut out = Vec::new();
    for s in stores {
        if let Some((section, cert, key)) = &s.files {
            let k = load_pair(section, cert, key)?;
            out.push((s.clone(), Arc::new(k)));
        }
    }
    Ok(PreparedCerts(out))
}

/// New handshakes use the certificates [`prepare_reload`] read.
pub fn apply_reload(p: PreparedCerts) {
    for (store, key) in p.0 {
        *store.current.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

/// A TLS acceptor: the PEM pair when both paths are given, else a self-signed certificate for
/// `names`. `section` (`"http"` or `"listen"`) names the keys the paths came from in errors.
/// `alpn` lists the protocols offered; empty means no ALPN, so a client offering any protocol
/// (TURN clients may offer `stun.turn`, RFC 7443) is not refused. A file-backed certificate is
/// re-read by [`prepare_reload`]/[`apply_reload`].
pub fn acceptor(
    section: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
    names: Vec<String>,
    alpn: &[&[u8]],
) -> anyhow::Result<(TlsAcceptor, CertSource)> {
    let (certified, source, files) = match (cert, key) {
        (Some(cert), Some(key)) => (
            load_pair(section, cert, key)?,
            CertSource::File(cert.to_path_buf()),
            Some((section.to_owned(), cert.to_path_buf(), key.to_path_buf())),
        ),
        _ => {
            let ck = rcgen::generate_simple_self_signed(names.clone())
                .context("generating a self-signed certificate for HTTPS")?;
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
            let certified = CertifiedKey::from_der(
                vec![ck.cert.der().clone()],
                key,
                &rustls::crypto::ring::default_provider(),
            )
            .context("self-signed certificate")?;
            (certified, CertSource::SelfSigned(names), None)
        }
    };
    let file_backed = files.is_some();
    let store = Arc::new(CertStore {
        current: RwLock::new(Arc::new(certified)),
        files,
    });
    if file_backed {
        STORES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&store));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_cert_resolver(store);
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
