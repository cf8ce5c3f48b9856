//! EVEN-PORT reservations ([RFC 8656 §14.6], §14.9 RESERVATION-TOKEN): an Allocate with
//! EVEN-PORT(R) keeps the next port for 30 seconds under a token; a later Allocate with that token
//! gets it. The token may be used from another shard (a client's second socket hashes elsewhere),
//! so tokens live in a table shared by all shards; each shard also remembers the ones it made, to
//! free their ports when they expire or are used elsewhere.
//!
//! [RFC 8656 §14.6]: https://www.rfc-editor.org/rfc/rfc8656#section-14.6

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::types::Family;

/// How long a reserved port waits for its token (RFC 8656 §7.2: "approximately 30 seconds").
pub(crate) const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    pub family: Family,
    pub port: u16,
    pub expires: Instant,
}

/// Tokens of every shard (in [`crate::Shared`]).
#[derive(Debug, Default)]
pub(crate) struct SharedReservations(Mutex<HashMap<u64, Reservation>>);

/// What a RESERVATION-TOKEN found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Claim {
    /// The reserved family and port, now the caller's.
    Port(Family, u16),
    /// Unknown or expired token (the request gets 508). `Some` is a port of this shard to free.
    Gone(Option<(Family, u16)>),
}

/// The tokens this shard made.
#[derive(Debug, Default)]
pub(crate) struct Reservations {
    mine: HashMap<u64, Reservation>,
}

impl Reservations {
    pub fn create(&mut self, shared: &SharedReservations, token: u64, r: Reservation) {
        self.mine.insert(token, r);
        if let Ok(mut m) = shared.0.lock() {
            m.insert(token, r);
        }
    }

    /// Consumes `token`.
    pub fn claim(&mut self, shared: &SharedReservations, token: u64, now: Instant) -> Claim {
        let found = shared.0.lock().ok().and_then(|mut m| m.remove(&token));
        let mine = self.mine.remove(&token);
        match (found, mine) {
            (Some(r), _) if r.expires > now => Claim::Port(r.family, r.port),
            (_, Some(r)) => Claim::Gone(Some((r.family, r.port))),
            (_, None) => Claim::Gone(None),
        }
    }

    /// Forgets this shard's tokens that expired or were claimed by another shard; returns their
    /// ports to free (a clash with the other shard's bind fails that bind, which is retried).
    pub fn expire(&mut self, shared: &SharedReservations, now: Instant) -> Vec<(Family, u16)> {
        let mut free = Vec::new();
        if let Ok(mut shared) = shared.0.lock() {
            self.mine.retain(|t, r| {
                let keep = r.expires > now && shared.contains_key(t);
                if !keep {
                    shared.remove(t);
                    free.push((r.family, r.port));
                }
                keep
            });
        }
        free
    }
}
