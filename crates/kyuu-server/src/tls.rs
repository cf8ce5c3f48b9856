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

/// Certificates read by [`prepare_reload`], applied by [`apply_reload`] (TLS listeners, then
/// DTLS listeners).
pub struct PreparedCerts(
    Vec<(Arc<CertStore>, Arc<CertifiedKey>)>,
    Vec<(Arc<DtlsStore>, openssl::ssl::SslContext)>,
);

impl std::fmt::Debug for PreparedCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedCerts({})", self.len())
    }
}

impl PreparedCerts {
    pub fn len(&self) -> usize {
        self.0.len() + self.1.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
    let dtls: Vec<Arc<DtlsStore>> = {
        let mut list = DTLS_STORES.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|w| w.strong_count() > 0);
        list.iter().filter_map(Weak::upgrade).collect()
    };
    let mut out_dtls = Vec::new();
    for s in dtls {
        if let Some((section, cert, key)) = &s.files {
            let (chain, pkey) = read_pem_pair(section, cert, key)?;
            out_dtls.push((s.clone(), dtls_context(section, &chain, &pkey)?));
        }
    }
    Ok(PreparedCerts(out, out_dtls))
}

/// New handshakes use the certificates [`prepare_reload`] read.
pub fn apply_reload(p: PreparedCerts) {
    for (store, key) in p.0 {
        *store.current.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
    for (store, ctx) in p.1 {
        *store.ctx.current.write().unwrap_or_else(|p| p.into_inner()) = ctx;
    }
}

/// The certificate of a DTLS listener (RFC 7350) and where it came from, for reloads.
#[derive(Debug)]
pub struct DtlsStore {
    pub(crate) ctx: crate::relay::dtls::DtlsContext,
    files: Option<(String, PathBuf, PathBuf)>,
}

static DTLS_STORES: Mutex<Vec<Weak<DtlsStore>>> = Mutex::new(Vec::new());

fn read_pem_pair(section: &str, cert: &Path, key: &Path) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let chain = std::fs::read(cert)
        .with_context(|| format!("{section}.tls_cert: cannot read {}", cert.display()))?;
    let pkey = std::fs::read(key)
        .with_context(|| format!("{section}.tls_key: cannot read {}", key.display()))?;
    Ok((chain, pkey))
}

/// An OpenSSL DTLS 1.2 server context for a PEM chain and key: RFC 7350 §4's mandatory ECDHE
/// AES-128-GCM suites first, HelloVerifyRequest cookies on (checked before a session exists, see
/// `relay::dtls`), no renegotiation.
fn dtls_context(
    section: &str,
    chain_pem: &[u8],
    key_pem: &[u8],
) -> anyhow::Result<openssl::ssl::SslContext> {
    use openssl::ssl::{SslContextBuilder, SslMethod, SslMode, SslOptions, SslVersion};
    let mut chain = openssl::x509::X509::stack_from_pem(chain_pem)
        .with_context(|| format!("{section}.tls_cert: bad PEM"))?
        .into_iter();
    let leaf = chain
        .next()
        .with_context(|| format!("{section}.tls_cert: no certificate"))?;
    let key = openssl::pkey::PKey::private_key_from_pem(key_pem)
        .with_context(|| format!("{section}.tls_key: bad PEM"))?;
    let mut b = SslContextBuilder::new(SslMethod::dtls()).context("DTLS context")?;
    b.set_min_proto_version(Some(SslVersion::DTLS1_2))
        .context("DTLS context")?;
    b.set_cipher_list(
        "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:\
         ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:\
         ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305",
    )
    .context("DTLS cipher list")?;
    b.set_certificate(&leaf)
        .with_context(|| format!("{section}.tls_cert: unusable certificate"))?;
    for c in chain {
        b.add_extra_chain_cert(c)
            .with_context(|| format!("{section}.tls_cert: unusable chain certificate"))?;
    }
    b.set_private_key(&key)
        .with_context(|| format!("{section}.tls_key: unusable key"))?;
    b.check_private_key()
        .with_context(|| format!("{section}.tls_cert: certificate and key do not match"))?;
    b.set_options(
        SslOptions::COOKIE_EXCHANGE | SslOptions::NO_QUERY_MTU | SslOptions::NO_RENEGOTIATION,
    );
    b.set_mode(SslMode::ACCEPT_MOVING_WRITE_BUFFER);
    // The cookie was checked statelessly before the session was created; the session's own
    // HelloVerifyRequest is never sent.
    b.set_cookie_generate_cb(|_, out| {
        let n = out.len().min(16);
        if let Some(o) = out.get_mut(..n) {
            o.fill(0x5a);
        }
        Ok(n)
    });
    b.set_cookie_verify_cb(|_, _| true);
    Ok(b.build())
}

/// The DTLS certificate store: the PEM pair when both paths are given, else a self-signed
/// certificate for `names`. A file-backed one is re-read by [`prepare_reload`]/[`apply_reload`].
pub fn dtls_store(
    section: &str,
    cert: Option<&Path>,
    key: Option<&Path>,
    names: Vec<String>,
) -> anyhow::Result<Arc<DtlsStore>> {
    let (ctx, files) = match (cert, key) {
        (Some(cert), Some(key)) => {
            let (chain, pkey) = read_pem_pair(section, cert, key)?;
            (
                dtls_context(section, &chain, &pkey)?,
                Some((section.to_owned(), cert.to_path_buf(), key.to_path_buf())),
            )
        }
        _ => {
            let ck = rcgen::generate_simple_self_signed(names)
                .context("generating a self-signed certificate for DTLS")?;
            let ctx = dtls_context(
                section,
                ck.cert.pem().as_bytes(),
                ck.key_pair.serialize_pem().as_bytes(),
            )?;
            (ctx, None)
        }
    };
    let store = Arc::new(DtlsStore {
        ctx: crate::relay::dtls::DtlsContext {
            current: RwLock::new(ctx),
        },
        files,
    });
    if store.files.is_some() {
        DTLS_STORES
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&store));
    }
    Ok(store)
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
