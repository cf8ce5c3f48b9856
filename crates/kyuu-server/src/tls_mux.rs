//! TURN over TLS on the HTTPS port (`http.tls_turn`): restrictive networks often let only
//! TCP 443 out, so one TLS listener serves both HTTPS and TURN-over-TLS. Each connection is
//! routed after the handshake:
//!
//! 1. by ALPN (RFC 7443): `stun.turn` goes to TURN (preferred when offered beside `http/1.1`),
//!    `http/1.1` to HTTP;
//! 2. without ALPN, by SNI: a name in `http.tls_turn_names` goes to TURN;
//! 3. otherwise by the first byte the client sends: a STUN message starts with its two top bits
//!    clear (RFC 8489 §5; first byte below 0x40), an HTTP request with a method letter.
//!
//! A TURN connection is handed to the relay ([`crate::relay::RelayControl::adopt_stream`]),
//! which serves it exactly like one from a `listen.tls` listener.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, ReadBuf};

use crate::relay::RelayControl;

/// ALPN protocol id of TURN (RFC 7443).
pub const STUN_TURN_ALPN: &[u8] = b"stun.turn";
/// ALPN offered by the shared listener, in the server's order of preference: a client offering
/// `stun.turn` is a TURN client even when it offers `http/1.1` too (coturn's clients offer
/// `http/1.1`, `stun.turn` and `stun.nat-discovery`); browsers offer only HTTP protocols.
pub const SHARED_ALPN: &[&[u8]] = &[STUN_TURN_ALPN, b"http/1.1"];
/// How long a client without ALPN or a TURN SNI may wait before sending its first byte.
const SNIFF_TIMEOUT: Duration = Duration::from_secs(10);

/// Where TURN connections on the HTTPS port go.
#[derive(Debug, Clone)]
pub struct TurnOnTls {
    pub relay: RelayControl,
    /// SNI names routed to TURN when the client offers no ALPN.
    pub names: Vec<String>,
}

/// Where a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Http,
    Turn,
}

/// The decision from the handshake alone; `None` means "look at the first byte".
pub fn by_handshake(
    alpn: Option<&[u8]>,
    sni: Option<&str>,
    turn_names: &[String],
) -> Option<Route> {
    match alpn {
        Some(STUN_TURN_ALPN) => Some(Route::Turn),
        Some(_) => Some(Route::Http),
        None => sni
            .filter(|s| turn_names.iter().any(|n| n.eq_ignore_ascii_case(s)))
            .map(|_| Route::Turn),
    }
}

/// The decision from the first byte of the client's data.
pub fn by_first_byte(b: u8) -> Route {
    if b < 0x40 {
        Route::Turn
    } else {
        Route::Http
    }
}

/// Routes a finished TLS connection; returns it with any byte read to decide put back in front.
/// `None` when the client closed or stayed silent.
pub async fn classify<S: AsyncRead + Unpin>(
    mut s: S,
    alpn: Option<&[u8]>,
    sni: Option<&str>,
    turn_names: &[String],
) -> Option<(Prefixed<S>, Route)> {
    if let Some(r) = by_handshake(alpn, sni, turn_names) {
        return Some((Prefixed::new(Vec::new(), s), r));
    }
    let mut first = [0u8; 1];
    match tokio::time::timeout(SNIFF_TIMEOUT, s.read(&mut first)).await {
        Ok(Ok(1)) => Some((Prefixed::new(first.to_vec(), s), by_first_byte(first[0]))),
        _ => None,
    }
}

/// A stream with bytes already read from it put back in front.
#[derive(Debug)]
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Prefixed {
            prefix,
            pos: 0,
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(rest) = self.prefix.get(self.pos..).filter(|r| !r.is_empty()) {
            let n = rest.len().min(buf.remaining());
            buf.put_slice(rest.get(..n).unwrap_or_default());
            self.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn routing_rules() {
        let names = vec!["turn.example.org".to_owned()];
        assert_eq!(
            by_handshake(Some(b"stun.turn"), None, &names),
            Some(Route::Turn)
        );
        assert_eq!(
            by_handshake(Some(b"http/1.1"), Some("turn.example.org"), &names),
            Some(Route::Http)
        );
        assert_eq!(
            by_handshake(None, Some("TURN.example.org"), &names),
            Some(Route::Turn)
        );
        assert_eq!(by_handshake(None, Some("www.example.org"), &names), None);
        assert_eq!(by_handshake(None, None, &names), None);
        // STUN Binding/Allocate requests start 0x00 0x01 / 0x00 0x03; HTTP with a method.
        assert_eq!(by_first_byte(0x00), Route::Turn);
        assert_eq!(by_first_byte(b'G'), Route::Http);
        assert_eq!(by_first_byte(b'P'), Route::Http);
    }

    #[tokio::test]
    async fn sniffed_byte_is_put_back() {
        let data: &[u8] = b"GET / HTTP/1.1\r\n";
        let (mut s, r) = classify(data, None, None, &[]).await.unwrap();
        assert_eq!(r, Route::Http);
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, data);
    }
}
