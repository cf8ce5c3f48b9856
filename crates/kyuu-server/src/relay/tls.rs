//! TLS for the STUN/TURN listener (RFC 8489 §6.2.3 over TCP): `listen.tls_cert`/`tls_key`, or a
//! self-signed certificate for `listen.tls_names` and the TLS listen addresses.

use tokio_rustls::TlsAcceptor;

use super::config::ListenConfig;

pub(crate) fn acceptor(cfg: &ListenConfig) -> anyhow::Result<TlsAcceptor> {
    let mut names = cfg.tls_names.clone();
    for a in cfg.tls.iter() {
        if !a.ip().is_unspecified() {
            names.push(a.ip().to_string());
        }
    }
    // No ALPN: STUN/TURN clients that offer `stun.turn` (RFC 7443) or nothing are both served.
    let (acceptor, _) = crate::tls::acceptor(
        "listen",
        cfg.tls_cert.as_deref(),
        cfg.tls_key.as_deref(),
        names,
        &[],
    )?;
    Ok(acceptor)
}
