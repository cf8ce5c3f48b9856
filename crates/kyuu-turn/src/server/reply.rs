//! Writing answers: every response gets SOFTWARE, MESSAGE-INTEGRITY(-SHA256) with the request's
//! key when it was authenticated, and FINGERPRINT (RFC 8489 §6.3.4, §14.7); answers to
//! authenticated requests are remembered for retransmissions. Errors to unauthenticated
//! requests (unverified source addresses) carry neither SOFTWARE nor a reason phrase, so no
//! answer outgrows a Binding answer relative to its request (`kyuu-server/tests/amplification.rs`).

use std::time::Instant;

use kyuu_stun::integrity::{IntegrityKind, Key};
use kyuu_stun::{attr, method, Class, ErrorCode, Message, MessageBuilder, TransactionId};

use crate::server::authenticate::{Authed, PASSWORD_ALGORITHMS};
use crate::server::{Server, SUB_TICK};
use crate::types::{ClientSocket, Output, Transmit};

/// Control messages are small; 1400 bytes keeps them within a typical path MTU.
const REPLY_MAX: usize = 1400;

impl Server {
    /// Builds a message: `f` adds the method's attributes, then SOFTWARE, integrity and
    /// FINGERPRINT follow.
    pub(super) fn build(
        &self,
        m: u16,
        class: Class,
        tid: TransactionId,
        auth: Option<(&Key, IntegrityKind)>,
        f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
    ) -> Option<Vec<u8>> {
        self.build_sized(REPLY_MAX, m, class, tid, auth, f)
    }

    /// As [`Server::build`] into a buffer of `max` bytes (small answers such as Binding's need
    /// no 1400-byte buffer zeroed per request).
    pub(super) fn build_sized(
        &self,
        max: usize,
        m: u16,
        class: Class,
        tid: TransactionId,
        auth: Option<(&Key, IntegrityKind)>,
        f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
    ) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; max.min(REPLY_MAX)];
        let mut b = MessageBuilder::new(&mut buf, m, class, tid).ok()?;
        f(&mut b).ok()?;
        // Not in errors to unauthenticated requests: they go to unverified addresses, and
        // must stay no larger than a Binding answer relative to the request (amplification).
        let unverified_error = class == Class::Error && auth.is_none();
        if !self.cfg.software.is_empty() && class != Class::Indication && !unverified_error {
            b.add(attr::SOFTWARE, self.cfg.software.as_bytes()).ok()?;
        }
        match auth {
            Some((key, IntegrityKind::Sha1)) => b.add_integrity(key).ok()?,
            Some((key, IntegrityKind::Sha256)) => b.add_integrity_sha256(key).ok()?,
            None => {}
        }
        b.add_fingerprint().ok()?;
        let n = b.finish();
        buf.truncate(n);
        Some(buf)
    }

    pub(super) fn send(&mut self, client: ClientSocket, data: Option<Vec<u8>>) {
        if let Some(data) = data {
            self.out
                .push_back(Output::Transmit(Transmit { client, data }));
        }
    }

    /// Sends and remembers the answer for retransmissions of the request.
    pub(super) fn send_cached(
        &mut self,
        client: ClientSocket,
        tid: TransactionId,
        data: Option<Vec<u8>>,
    ) {
        let Some(data) = data else { return };
        let at = self.now_hint();
        self.cache.put(client, tid, data.clone(), at);
        self.out
            .push_back(Output::Transmit(Transmit { client, data }));
    }

    /// The time of the current tick, good enough for cache ageing.
    fn now_hint(&self) -> Instant {
        self.next_tick
            .map(|t| t.checked_sub(SUB_TICK).unwrap_or(t))
            .unwrap_or(self.opts.shared.start)
    }

    /// An empty authenticated success answer, remembered for retransmissions.
    pub(super) fn reply_ok(
        &mut self,
        client: ClientSocket,
        msg: &Message<'_>,
        m: u16,
        auth: &Authed,
    ) {
        let tid = *msg.transaction_id();
        let resp = self.build(m, Class::Success, tid, Some((&auth.key, auth.kind)), |_| {
            Ok(())
        });
        self.send_cached(client, tid, resp);
    }

    /// An error answer; signed and cached when the request was authenticated.
    #[track_caller]
    pub(super) fn error(
        &mut self,
        client: ClientSocket,
        msg: &Message<'_>,
        code: ErrorCode,
        auth: Option<&Authed>,
    ) {
        tracing::debug!(target: "kyuu::turn", method = method::name(msg.method()), code = code.code(), at = %std::panic::Location::caller(), "error response");
        // No reason phrase to unverified addresses (amplification, as for SOFTWARE).
        self.error_with(client, msg, auth, |b| match auth {
            Some(_) => b.add_error_code(code),
            None => b.add_error_bare(code.code()),
        });
    }

    /// 420 with UNKNOWN-ATTRIBUTES (RFC 8489 §7.3.1).
    pub(super) fn unknown_attributes(
        &mut self,
        client: ClientSocket,
        msg: &Message<'_>,
        unknown: &[u16],
        auth: Option<&Authed>,
    ) {
        self.error_with(client, msg, auth, |b| {
            b.add_error_code(ErrorCode::UNKNOWN_ATTRIBUTE)?;
            b.add_unknown_attributes(unknown)
        });
    }

    fn error_with(
        &mut self,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Option<&Authed>,
        f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
    ) {
        let resp = self.error_answer(msg, auth, f);
        if auth.is_some() {
            self.send_cached(client, *msg.transaction_id(), resp);
        } else {
            self.send(client, resp);
        }
    }

    /// The error answer to `msg`: `f` adds the attributes, signed when `auth` is given.
    fn error_answer(
        &self,
        msg: &Message<'_>,
        auth: Option<&Authed>,
        f: impl FnOnce(&mut MessageBuilder<'_>) -> Result<(), kyuu_stun::Error>,
    ) -> Option<Vec<u8>> {
        self.build(
            msg.method(),
            Class::Error,
            *msg.transaction_id(),
            auth.map(|a| (&a.key, a.kind)),
            f,
        )
    }

    /// 401 or 438 with REALM, a fresh NONCE and PASSWORD-ALGORITHMS (RFC 8489 §9.2.4).
    pub(super) fn challenge(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        code: ErrorCode,
    ) {
        let nonce = self
            .nonces
            .issue(self.opts.shared.unix_now(now), client.remote);
        let resp = self.error_answer(msg, None, |b| {
            b.add_error_bare(code.code())?;
            b.add(attr::REALM, self.creds.realm().as_bytes())?;
            b.add(attr::NONCE, &nonce)?;
            b.add_password_algorithms(&PASSWORD_ALGORITHMS)
        });
        self.send(client, resp);
    }
}
