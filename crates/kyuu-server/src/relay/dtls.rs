//! STUN/TURN over DTLS (RFC 7350): the association table of the DTLS listeners.
//!
//! No sockets and no clock here: the shard hands in `(now, local, remote, datagram)` and gets back
//! the datagrams to send to that client and the decrypted records (each one STUN message or one
//! ChannelData, exactly what a UDP client sends) for `kyuu_turn::Server::handle_client`. Each
//! association is an OpenSSL DTLS 1.2 session (`openssl` crate, `SslMethod::dtls()`) over
//! [`MemDgram`], an in-memory datagram pipe: its read returns one queued datagram, its write
//! collects one outgoing datagram. See `docs/design.md` for why OpenSSL.
//!
//! Denial of service (RFC 7350 §4 requires RFC 6347 §4.2.1): a ClientHello without a valid cookie
//! is answered with a HelloVerifyRequest built here from the datagram alone (the cookie is an
//! HMAC of the five-tuple and a time slot), so a spoofed source makes the server keep nothing.
//! Only a ClientHello that returns a valid cookie creates an OpenSSL session. OpenSSL cannot be
//! started in the middle of a cookie exchange (its `DTLSv1_listen` is not in the safe API), so
//! the new session is first shown the same ClientHello without the cookie (as message 0), its
//! HelloVerifyRequest is discarded, and then it gets the real one (message 1): the handshake
//! transcript starts at the second ClientHello (RFC 6347 §4.2.1), so both sides agree.
//!
//! Bounds: at most `max_associations` associations and `max_handshakes` of them unfinished; a
//! handshake older than `handshake_timeout` is dropped; an association idle for `idle_timeout`
//! without an allocation is closed (close_notify). Malformed input is dropped, never panics.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use openssl::ssl::{ErrorCode, Ssl, SslContext, SslStream};
use sha2::Sha256;

/// The largest datagram a client may send (and the read buffer for one decrypted record).
const MAX_DATAGRAM: usize = 65_536;
/// DTLS handshake messages are fragmented to fit this (path MTU minus IP/UDP headers, with room).
const HANDSHAKE_MTU: u32 = 1200;
/// Cookie time slot: a cookie is accepted in its slot and the next one.
const COOKIE_SLOT_SECS: u64 = 30;
/// One slot byte and 19 bytes of HMAC-SHA256.
const COOKIE_LEN: usize = 20;

const CT_HANDSHAKE: u8 = 22;
const HT_CLIENT_HELLO: u8 = 1;
const HT_HELLO_VERIFY_REQUEST: u8 = 3;
const RECORD_HEADER: usize = 13;
const HANDSHAKE_HEADER: usize = 12;
/// DTLS 1.0's wire version, which RFC 6347 §4.2.1 asks a HelloVerifyRequest to carry.
const DTLS_1_0: [u8; 2] = [0xfe, 0xff];

/// The limits of the DTLS listeners (`[listen]`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DtlsLimits {
    pub max_associations: usize,
    pub max_handshakes: usize,
    pub handshake_timeout: Duration,
    pub idle_timeout: Duration,
}

/// The server certificate of the DTLS listeners, swappable at run time (`crate::tls` reloads it
/// with the TLS certificates on SIGHUP or an admin reload).
#[derive(Debug)]
pub struct DtlsContext {
    pub(crate) current: RwLock<SslContext>,
}

impl DtlsContext {
    pub(crate) fn get(&self) -> SslContext {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// An in-memory datagram pipe under one OpenSSL session: `read` returns one queued datagram
/// (`WouldBlock` when none), `write` records one outgoing datagram.
#[derive(Debug, Default)]
pub(crate) struct MemDgram {
    inbox: VecDeque<Vec<u8>>,
    outbox: Vec<Vec<u8>>,
}

impl Read for MemDgram {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Some(d) = self.inbox.pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = d.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), d.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }
}

impl Write for MemDgram {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Assoc {
    ssl: SslStream<MemDgram>,
    established: bool,
    created: Instant,
    last_rx: Instant,
}

/// What one datagram from a client produced.
#[derive(Debug, Default)]
pub(crate) struct DtlsInput {
    /// Datagrams to send back to the client.
    pub send: Vec<Vec<u8>>,
    /// Decrypted application records: one STUN message or ChannelData each.
    pub records: Vec<Vec<u8>>,
    /// The client closed the association (close_notify) or it failed after the handshake: the
    /// core should forget the client.
    pub closed: bool,
}

/// An association the sweep closed, with the close_notify to send.
#[derive(Debug)]
pub(crate) struct Swept {
    pub local: SocketAddr,
    pub remote: SocketAddr,
    pub send: Vec<Vec<u8>>,
    pub established: bool,
}

/// Every DTLS association of one shard.
pub(crate) struct Endpoint {
    store: Arc<crate::tls::DtlsStore>,
    limits: DtlsLimits,
    secret: [u8; 32],
    origin: Instant,
    assocs: HashMap<(SocketAddr, SocketAddr), Assoc>,
    handshakes: usize,
    scratch: Vec<u8>,
}

/// Where a ClientHello's parts are in its datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ClientHello {
    record_seq: u64,
    message_seq: u16,
    /// The whole record (header and fragment).
    record_len: usize,
    /// Offset of the cookie length byte in the datagram.
    cookie_at: usize,
    cookie_len: usize,
}

impl Endpoint {
    pub(crate) fn new(
        store: Arc<crate::tls::DtlsStore>,
        limits: DtlsLimits,
        secret: [u8; 32],
    ) -> Self {
        Endpoint {
            store,
            limits,
            secret,
            origin: Instant::now(),
            assocs: HashMap::new(),
            handshakes: 0,
            scratch: vec![0u8; MAX_DATAGRAM],
        }
    }

    /// Live associations (established or handshaking).
    pub(crate) fn len(&self) -> usize {
        self.assocs.len()
    }

    /// Handshakes in progress.
    pub(crate) fn handshakes(&self) -> usize {
        self.handshakes
    }

    /// One datagram from `remote` to the listener address `local`.
    pub(crate) fn handle(
        &mut self,
        now: Instant,
        local: SocketAddr,
        remote: SocketAddr,
        data: &[u8],
        out: &mut DtlsInput,
    ) {
        // An empty read would look like end of file to OpenSSL.
        if data.is_empty() || data.len() > MAX_DATAGRAM {
            dropped("bad_length");
            return;
        }
        let key = (local, remote);
        if self.assocs.contains_key(&key) {
            self.existing(now, key, data, out);
            return;
        }
        let Some(ch) = parse_client_hello(data) else {
            dropped("no_association");
            return;
        };
        let slot = self.slot(now);
        let cookie = data
            .get(ch.cookie_at + 1..ch.cookie_at + 1 + ch.cookie_len)
            .unwrap_or(&[]);
        let valid = [slot, slot.wrapping_sub(1)]
            .iter()
            .any(|s| cookie == self.cookie(*s, local, remote).as_slice());
        if !valid {
            if let Some(hvr) = hello_verify_request(&ch, &self.cookie(slot, local, remote)) {
                metrics::counter!("kyuu_relay_dtls_cookies_sent_total").increment(1);
                out.send.push(hvr);
            }
            return;
        }
        if self.assocs.len() >= self.limits.max_associations
            || self.handshakes >= self.limits.max_handshakes
        {
            dropped("association_limit");
            return;
        }
        let Some(first) = without_cookie(data, &ch) else {
            dropped("bad_client_hello");
            return;
        };
        let Some(ssl) = self.new_session() else {
            dropped("session_setup");
            return;
        };
        let mut a = Assoc {
            ssl,
            established: false,
            created: now,
            last_rx: now,
        };
        // Message 0 without the cookie: OpenSSL answers with a HelloVerifyRequest (discarded;
        // the client already has ours) and then expects message 1 with a cookie.
        a.ssl.get_mut().inbox.push_back(first);
        match a.ssl.accept() {
            Err(e) if e.code() == ErrorCode::WANT_READ => {}
            Ok(()) | Err(_) => {
                handshake_failed("setup");
                return;
            }
        }
        a.ssl.get_mut().outbox.clear();
        self.handshakes += 1;
        self.assocs.insert(key, a);
        self.existing(now, key, data, out);
    }

    fn new_session(&self) -> Option<SslStream<MemDgram>> {
        let mut ssl = Ssl::new(&self.store.ctx.get()).ok()?;
        ssl.set_mtu(HANDSHAKE_MTU).ok()?;
        SslStream::new(ssl, MemDgram::default()).ok()
    }

    fn existing(
        &mut self,
        now: Instant,
        key: (SocketAddr, SocketAddr),
        data: &[u8],
        out: &mut DtlsInput,
    ) {
        let Some(a) = self.assocs.get_mut(&key) else {
            return;
        };
        if !records_plausible(data, min_sealed_len(&a.ssl)) {
            dropped("short_record");
            return;
        }
        a.last_rx = now;
        a.ssl.get_mut().inbox.push_back(data.to_vec());
        let mut remove = false;
        if !a.established {
            match a.ssl.accept() {
                Ok(()) => {
                    a.established = true;
                    self.handshakes = self.handshakes.saturating_sub(1);
                    metrics::counter!("kyuu_relay_dtls_handshakes_total").increment(1);
                }
                Err(e) if e.code() == ErrorCode::WANT_READ => {}
                Err(_) => {
                    handshake_failed("handshake");
                    remove = true;
                }
            }
        }
        if a.established && !remove {
            // A datagram may hold several records; each read returns one.
            for _ in 0..64 {
                match a.ssl.ssl_read(&mut self.scratch) {
                    Ok(n) => {
                        if let Some(rec) = self.scratch.get(..n) {
                            if !rec.is_empty() {
                                out.records.push(rec.to_vec());
                            }
                        }
                    }
                    Err(e) if e.code() == ErrorCode::WANT_READ => break,
                    Err(e) => {
                        if e.code() != ErrorCode::ZERO_RETURN {
                            dropped("session_error");
                        } else {
                            // Answer the close_notify with ours.
                            let _ = a.ssl.shutdown();
                        }
                        remove = true;
                        out.closed = true;
                        break;
                    }
                }
            }
        }
        let io = a.ssl.get_mut();
        io.inbox.clear();
        out.send.append(&mut io.outbox);
        if remove {
            if let Some(a) = self.assocs.remove(&key) {
                if !a.established {
                    self.handshakes = self.handshakes.saturating_sub(1);
                }
            }
        }
    }

    /// Encrypts one message for an established association; the datagrams to send, or `None`
    /// when there is no such association (or the message does not fit a record).
    pub(crate) fn write(
        &mut self,
        local: SocketAddr,
        remote: SocketAddr,
        data: &[u8],
    ) -> Option<Vec<Vec<u8>>> {
        let a = self.assocs.get_mut(&(local, remote))?;
        if !a.established {
            return None;
        }
        let ok = a.ssl.ssl_write(data).is_ok();
        let sent = std::mem::take(&mut a.ssl.get_mut().outbox);
        ok.then_some(sent)
    }

    /// Closes an association now (close_notify); the datagrams to send.
    pub(crate) fn close(&mut self, local: SocketAddr, remote: SocketAddr) -> Option<Swept> {
        let mut a = self.assocs.remove(&(local, remote))?;
        if !a.established {
            self.handshakes = self.handshakes.saturating_sub(1);
        } else {
            let _ = a.ssl.shutdown();
        }
        Some(Swept {
            local,
            remote,
            send: std::mem::take(&mut a.ssl.get_mut().outbox),
            established: a.established,
        })
    }

    /// Drops handshakes past their deadline and idle associations without an allocation.
    pub(crate) fn sweep(
        &mut self,
        now: Instant,
        has_allocation: impl Fn(SocketAddr, SocketAddr) -> bool,
    ) -> Vec<Swept> {
        let limits = self.limits;
        let expired: Vec<(SocketAddr, SocketAddr)> = self
            .assocs
            .iter()
            .filter(|((l, r), a)| {
                if a.established {
                    now.saturating_duration_since(a.last_rx) >= limits.idle_timeout
                        && !has_allocation(*l, *r)
                } else {
                    now.saturating_duration_since(a.created) >= limits.handshake_timeout
                }
            })
            .map(|(k, _)| *k)
            .collect();
        let mut out = Vec::new();
        for (l, r) in expired {
            if let Some(s) = self.close(l, r) {
                let reason = if s.established {
                    "dtls_idle_timeout"
                } else {
                    "dtls_handshake_timeout"
                };
                crate::limits::closed("stun_dtls", reason);
                out.push(s);
            }
        }
        out
    }

    fn slot(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / COOKIE_SLOT_SECS
    }

    /// The cookie of a five-tuple in a time slot: the slot's low byte, then an HMAC.
    fn cookie(&self, slot: u64, local: SocketAddr, remote: SocketAddr) -> [u8; COOKIE_LEN] {
        let mut out = [0u8; COOKIE_LEN];
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.secret) else {
            return out;
        };
        mac.update(&slot.to_be_bytes());
        mac.update(local.to_string().as_bytes());
        mac.update(b"|");
        mac.update(remote.to_string().as_bytes());
        let tag = mac.finalize().into_bytes();
        out[0] = slot as u8;
        if let (Some(dst), Some(src)) = (out.get_mut(1..), tag.get(..COOKIE_LEN - 1)) {
            dst.copy_from_slice(src);
        }
        out
    }
}

/// The shortest protected record the negotiated cipher can produce: the AEAD tag, plus GCM's
/// explicit nonce.
fn min_sealed_len(ssl: &SslStream<MemDgram>) -> usize {
    match ssl.ssl().current_cipher() {
        Some(c) if c.name().contains("CHACHA20") => 16,
        _ => 24,
    }
}

/// Whether every record header in `d` fits the datagram, and no protected (epoch > 0) record is
/// shorter than `min_sealed`. OpenSSL 3.0 discards a forged record silently, as RFC 6347
/// §4.1.2.7 asks, unless it is too short to hold the AEAD overhead: such a record leaves the
/// session unusable, so a spoofed datagram could end an association. Such datagrams never reach
/// it.
fn records_plausible(d: &[u8], min_sealed: usize) -> bool {
    let mut at = 0usize;
    for _ in 0..64 {
        if at == d.len() {
            return true;
        }
        let (Some(epoch), Some(len)) = (u16_at(d, at + 3), u16_at(d, at + 11)) else {
            return false;
        };
        let len = usize::from(len);
        if epoch > 0 && len < min_sealed {
            return false;
        }
        at += RECORD_HEADER + len;
        if at > d.len() {
            return false;
        }
    }
    false
}

fn dropped(reason: &'static str) {
    metrics::counter!("kyuu_relay_dtls_dropped_total", "reason" => reason).increment(1);
}

fn handshake_failed(stage: &'static str) {
    metrics::counter!("kyuu_relay_dtls_handshake_failures_total", "stage" => stage).increment(1);
}

fn u16_at(d: &[u8], at: usize) -> Option<u16> {
    let b = d.get(at..at + 2)?;
    Some(u16::from_be_bytes([*b.first()?, *b.get(1)?]))
}

fn u24_at(d: &[u8], at: usize) -> Option<usize> {
    let b = d.get(at..at + 3)?;
    Some(
        (usize::from(*b.first()?) << 16) | (usize::from(*b.get(1)?) << 8) | usize::from(*b.get(2)?),
    )
}

/// The first record of `d` when it is an unfragmented epoch-0 ClientHello (RFC 6347 §4.1, §4.2.2,
/// RFC 5246 §7.4.1.2 with the DTLS cookie).
fn parse_client_hello(d: &[u8]) -> Option<ClientHello> {
    if *d.first()? != CT_HANDSHAKE || u16_at(d, 3)? != 0 {
        return None;
    }
    let seq = d.get(5..11)?;
    let record_seq = seq.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
    let frag_len = usize::from(u16_at(d, 11)?);
    let frag = d.get(RECORD_HEADER..RECORD_HEADER + frag_len)?;
    if *frag.first()? != HT_CLIENT_HELLO {
        return None;
    }
    let len = u24_at(frag, 1)?;
    let message_seq = u16_at(frag, 4)?;
    if u24_at(frag, 6)? != 0 || u24_at(frag, 9)? != len || HANDSHAKE_HEADER + len > frag.len() {
        return None;
    }
    // client_version (2), random (32), session_id (1 + n), cookie (1 + n).
    let body = RECORD_HEADER + HANDSHAKE_HEADER;
    let sid_at = body + 2 + 32;
    let sid_len = usize::from(*d.get(sid_at)?);
    let cookie_at = sid_at + 1 + sid_len;
    let cookie_len = usize::from(*d.get(cookie_at)?);
    if cookie_at + 1 + cookie_len > body + len {
        return None;
    }
    Some(ClientHello {
        record_seq,
        message_seq,
        record_len: RECORD_HEADER + frag_len,
        cookie_at,
        cookie_len,
    })
}

/// A HelloVerifyRequest answering `ch` (RFC 6347 §4.2.1: the ClientHello's record and message
/// sequence numbers, version DTLS 1.0).
fn hello_verify_request(ch: &ClientHello, cookie: &[u8]) -> Option<Vec<u8>> {
    let body_len = 2 + 1 + cookie.len();
    let mut v = Vec::with_capacity(RECORD_HEADER + HANDSHAKE_HEADER + body_len);
    v.push(CT_HANDSHAKE);
    v.extend_from_slice(&DTLS_1_0);
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(ch.record_seq.to_be_bytes().get(2..)?);
    v.extend_from_slice(
        &u16::try_from(HANDSHAKE_HEADER + body_len)
            .ok()?
            .to_be_bytes(),
    );
    v.push(HT_HELLO_VERIFY_REQUEST);
    let len24 = u32::try_from(body_len).ok()?.to_be_bytes();
    v.extend_from_slice(len24.get(1..)?);
    v.extend_from_slice(&ch.message_seq.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0]);
    v.extend_from_slice(len24.get(1..)?);
    v.extend_from_slice(&DTLS_1_0);
    v.push(u8::try_from(cookie.len()).ok()?);
    v.extend_from_slice(cookie);
    Some(v)
}

/// The ClientHello record of `d` as the client's first one would have been: no cookie, message
/// sequence 0, the record sequence number before this one.
fn without_cookie(d: &[u8], ch: &ClientHello) -> Option<Vec<u8>> {
    let seq = ch.record_seq.checked_sub(1)?;
    if ch.message_seq == 0 {
        return None;
    }
    let record = d.get(..ch.record_len)?;
    let mut v = Vec::with_capacity(record.len());
    v.extend_from_slice(record.get(..ch.cookie_at)?);
    v.push(0);
    v.extend_from_slice(record.get(ch.cookie_at + 1 + ch.cookie_len..)?);
    let frag_len = u16::try_from(v.len() - RECORD_HEADER).ok()?;
    let hs_len = u32::try_from(v.len() - RECORD_HEADER - HANDSHAKE_HEADER).ok()?;
    v.get_mut(5..11)?
        .copy_from_slice(seq.to_be_bytes().get(2..)?);
    v.get_mut(11..13)?.copy_from_slice(&frag_len.to_be_bytes());
    let h = RECORD_HEADER;
    v.get_mut(h + 1..h + 4)?
        .copy_from_slice(hs_len.to_be_bytes().get(1..)?);
    v.get_mut(h + 4..h + 6)?.copy_from_slice(&[0, 0]);
    v.get_mut(h + 9..h + 12)?
        .copy_from_slice(hs_len.to_be_bytes().get(1..)?);
    Some(v)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A ClientHello record: given session id and cookie, message and record sequence.
    fn client_hello(cookie: &[u8], msg_seq: u16, rec_seq: u8) -> Vec<u8> {
        let mut body = vec![0xfe, 0xfd];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0);
        body.push(cookie.len() as u8);
        body.extend_from_slice(cookie);
        body.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
        let mut hs = vec![HT_CLIENT_HELLO, 0, 0, body.len() as u8];
        hs.extend_from_slice(&msg_seq.to_be_bytes());
        hs.extend_from_slice(&[0, 0, 0, 0, 0, body.len() as u8]);
        hs.extend_from_slice(&body);
        let mut r = vec![CT_HANDSHAKE, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, rec_seq];
        r.extend_from_slice(&(hs.len() as u16).to_be_bytes());
        r.extend_from_slice(&hs);
        r
    }

    #[test]
    fn client_hello_parse_and_rewrite() {
        let d = client_hello(&[1, 2, 3], 1, 1);
        let ch = parse_client_hello(&d).unwrap();
        assert_eq!((ch.record_seq, ch.message_seq, ch.cookie_len), (1, 1, 3));
        let first = without_cookie(&d, &ch).unwrap();
        assert_eq!(first, client_hello(&[], 0, 0));
        let hvr = hello_verify_request(&ch, &[9; 4]).unwrap();
        assert_eq!(hvr.len(), RECORD_HEADER + HANDSHAKE_HEADER + 3 + 4);
        assert_eq!(hvr[10], 1, "record sequence copied");
        assert_eq!(&hvr[RECORD_HEADER + 4..RECORD_HEADER + 6], &[0, 1]);
        // Every truncation and a garbage byte in every position are refused or parsed, never
        // a panic.
        for n in 0..d.len() {
            assert!(parse_client_hello(&d[..n]).is_none());
        }
        for i in 0..d.len() {
            let mut e = d.clone();
            e[i] ^= 0xff;
            if let Some(ch) = parse_client_hello(&e) {
                let _ = without_cookie(&e, &ch);
                let _ = hello_verify_request(&ch, &[0; COOKIE_LEN]);
            }
        }
    }

    fn endpoint(max_associations: usize, max_handshakes: usize) -> Endpoint {
        let store = crate::tls::dtls_store("listen", None, None, vec!["localhost".into()]).unwrap();
        let limits = DtlsLimits {
            max_associations,
            max_handshakes,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
        };
        Endpoint::new(store, limits, [7; 32])
    }

    fn client() -> SslStream<MemDgram> {
        use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode};
        let mut b = SslConnector::builder(SslMethod::dtls()).unwrap();
        b.set_verify(SslVerifyMode::NONE);
        let ssl = b
            .build()
            .configure()
            .unwrap()
            .into_ssl("localhost")
            .unwrap();
        SslStream::new(ssl, MemDgram::default()).unwrap()
    }

    const SERVER: &str = "127.0.0.1:5349";

    /// Runs a handshake between `c` (at `from`) and `ep` in memory; true when both finished.
    fn handshake(ep: &mut Endpoint, c: &mut SslStream<MemDgram>, from: &str) -> bool {
        let now = Instant::now();
        for _ in 0..20 {
            let done = c.connect().is_ok();
            let sent = std::mem::take(&mut c.get_mut().outbox);
            if done && sent.is_empty() {
                return ep.assocs.values().any(|a| a.established);
            }
            for d in sent {
                let mut out = DtlsInput::default();
                ep.handle(
                    now,
                    SERVER.parse().unwrap(),
                    from.parse().unwrap(),
                    &d,
                    &mut out,
                );
                c.get_mut().inbox.extend(out.send);
            }
        }
        false
    }

    #[test]
    fn stateless_until_a_valid_cookie_then_bounded() {
        let mut ep = endpoint(2, 1);
        let now = Instant::now();
        let (local, spoofed): (SocketAddr, SocketAddr) =
            (SERVER.parse().unwrap(), "192.0.2.1:1000".parse().unwrap());
        // Garbage, truncations and cookie-less ClientHellos: no association, no session.
        let hello = client_hello(&[], 0, 0);
        let mut inputs: Vec<Vec<u8>> = vec![vec![], vec![22; 13], vec![23; 100], vec![0xff; 2000]];
        inputs.extend((0..hello.len()).map(|n| hello[..n].to_vec()));
        // Forged fatal alerts: plaintext in epoch 0, and unauthenticated in epoch 1.
        inputs.push(vec![21, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 9, 0, 2, 2, 40]);
        inputs.push(vec![21, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 2, 2, 40]);
        let mut long = vec![23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 40];
        long.extend_from_slice(&[0x33; 40]);
        inputs.push(long);
        inputs.push(hello.clone());
        for d in &inputs[..inputs.len() - 1] {
            let mut out = DtlsInput::default();
            ep.handle(now, local, spoofed, d, &mut out);
            assert!(out.send.is_empty() && out.records.is_empty(), "{d:?}");
        }
        let mut out = DtlsInput::default();
        ep.handle(now, local, spoofed, &hello, &mut out);
        assert_eq!(out.send.len(), 1, "a HelloVerifyRequest");
        assert_eq!(out.send[0][13], HT_HELLO_VERIFY_REQUEST);
        // A cookie for another source is no good.
        let cookie = ep.cookie(ep.slot(now), local, "192.0.2.2:1000".parse().unwrap());
        let mut out = DtlsInput::default();
        ep.handle(now, local, spoofed, &client_hello(&cookie, 1, 1), &mut out);
        assert_eq!(out.send.len(), 1, "again a HelloVerifyRequest");
        assert_eq!(
            (ep.len(), ep.handshakes()),
            (0, 0),
            "no state for spoofed sources"
        );

        // A real client gets through; garbage inside its association changes nothing.
        let mut c = client();
        assert!(handshake(&mut ep, &mut c, "127.0.0.1:4000"));
        assert_eq!((ep.len(), ep.handshakes()), (1, 0));
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        for d in &inputs {
            let mut out = DtlsInput::default();
            ep.handle(now, local, from, d, &mut out);
            assert!(out.records.is_empty() && !out.closed, "{d:?}");
        }
        assert_eq!(ep.len(), 1, "forged records ended the association");
        // Records both ways.
        c.ssl_write(b"\x00\x01\x00\x00stun").unwrap();
        let mut out = DtlsInput::default();
        for d in std::mem::take(&mut c.get_mut().outbox) {
            ep.handle(now, local, from, &d, &mut out);
        }
        assert_eq!(out.records, vec![b"\x00\x01\x00\x00stun".to_vec()]);
        let back = ep.write(local, from, b"answer").unwrap();
        c.get_mut().inbox.extend(back);
        let mut buf = [0u8; 64];
        let n = c.ssl_read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"answer");

        // One handshake at a time: a second one waits its turn (dropped, no state).
        let mut c2 = client();
        let _ = c2.connect();
        let d = std::mem::take(&mut c2.get_mut().outbox);
        let from2: SocketAddr = "127.0.0.1:4001".parse().unwrap();
        let mut out = DtlsInput::default();
        ep.handle(now, local, from2, &d[0], &mut out);
        c2.get_mut().inbox.extend(out.send);
        let _ = c2.connect();
        let mut c3 = client();
        assert!(
            handshake(&mut ep, &mut c3, "127.0.0.1:4002"),
            "a third one fits"
        );
        assert_eq!(ep.len(), 2);
        // At the association cap: c2's valid-cookie ClientHello makes nothing.
        let mut out = DtlsInput::default();
        for d in std::mem::take(&mut c2.get_mut().outbox) {
            ep.handle(now, local, from2, &d, &mut out);
        }
        assert!(out.send.is_empty());
        assert_eq!(ep.len(), 2);

        // Idle associations without an allocation are closed with a close_notify; the sweep
        // keeps those with one.
        let later = now + Duration::from_secs(121);
        let swept = ep.sweep(later, |_, r| r == from);
        assert_eq!(swept.len(), 1);
        assert!(!swept[0].send.is_empty(), "close_notify");
        assert_eq!(ep.len(), 1);
        let swept = ep.sweep(later, |_, _| false);
        assert_eq!((swept.len(), ep.len()), (1, 0));
    }

    #[test]
    fn unfinished_handshakes_time_out() {
        let mut ep = endpoint(10, 10);
        let now = Instant::now();
        let mut c = client();
        let _ = c.connect();
        let local: SocketAddr = SERVER.parse().unwrap();
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        // ClientHello, HelloVerifyRequest, ClientHello with the cookie: the server's flight goes
        // out and the client never answers.
        for _ in 0..2 {
            let mut out = DtlsInput::default();
            for d in std::mem::take(&mut c.get_mut().outbox) {
                ep.handle(now, local, from, &d, &mut out);
            }
            c.get_mut().inbox.extend(out.send);
            let _ = c.connect();
        }
        assert_eq!((ep.len(), ep.handshakes()), (1, 1));
        assert!(ep
            .sweep(now + Duration::from_secs(9), |_, _| false)
            .is_empty());
        assert_eq!(
            ep.sweep(now + Duration::from_secs(10), |_, _| false).len(),
            1
        );
        assert_eq!((ep.len(), ep.handshakes()), (0, 0));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Arbitrary datagrams, alone or as a ClientHello's tail: no panic, no association, at
        /// most one small HelloVerifyRequest; inside an established association, no record and
        /// the association survives.
        #[test]
        fn arbitrary_datagrams_make_no_state(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1600),
            cut in 0usize..200,
        ) {
            let mut ep = endpoint(4, 4);
            let now = Instant::now();
            let local: SocketAddr = SERVER.parse().unwrap();
            let spoofed: SocketAddr = "192.0.2.1:1000".parse().unwrap();
            let mut hello = client_hello(&[1; 20], 1, 1);
            hello.truncate(cut.min(hello.len()));
            hello.extend_from_slice(&data);
            for d in [&data, &hello] {
                let mut out = DtlsInput::default();
                ep.handle(now, local, spoofed, d, &mut out);
                proptest::prop_assert!(out.send.len() <= 1);
                proptest::prop_assert!(out.send.iter().all(|s| s.len() < 80));
                proptest::prop_assert!(out.records.is_empty());
                proptest::prop_assert_eq!(ep.len(), 0);
            }
            let mut c = client();
            proptest::prop_assert!(handshake(&mut ep, &mut c, "127.0.0.1:4000"));
            let mut out = DtlsInput::default();
            ep.handle(now, local, "127.0.0.1:4000".parse().unwrap(), &data, &mut out);
            proptest::prop_assert!(out.records.is_empty());
            proptest::prop_assert!(!out.closed, "a forged datagram ended the association");
            proptest::prop_assert_eq!(ep.len(), 1);
        }
    }

    /// Forged protected records of every short length (OpenSSL 3.0 would give up on the session
    /// for those shorter than the AEAD overhead) leave the association working.
    #[test]
    fn forged_short_records_do_not_end_an_association() {
        let local: SocketAddr = SERVER.parse().unwrap();
        let from: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let mut ep = endpoint(4, 4);
        let now = Instant::now();
        let mut c = client();
        assert!(handshake(&mut ep, &mut c, "127.0.0.1:4000"));
        for len in 0..48u8 {
            for ct in [21u8, 23] {
                let mut forged = vec![ct, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 100 + len, 0, len];
                forged.extend(std::iter::repeat_n(0x33, usize::from(len)));
                let mut out = DtlsInput::default();
                ep.handle(now, local, from, &forged, &mut out);
                assert!(!out.closed && out.records.is_empty());
                c.ssl_write(b"abc").unwrap();
                let mut out = DtlsInput::default();
                for d in std::mem::take(&mut c.get_mut().outbox) {
                    ep.handle(now, local, from, &d, &mut out);
                }
                assert_eq!(out.records, vec![b"abc".to_vec()], "after {ct}/{len}");
            }
        }
    }
}
