//! Client transactions with retransmission and liveness (`docs/rawr.md` §5), shared by the node
//! (its upstream requests) and the peer.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_stun::TransactionId;

/// First retransmission timeout.
pub const RTO: Duration = Duration::from_millis(250);
/// Retransmission timeout cap.
pub const RTO_MAX: Duration = Duration::from_millis(1000);
/// Silence after which the destination counts as unreachable.
pub const LIVENESS: Duration = Duration::from_millis(2000);

/// One outstanding request.
#[derive(Debug, Clone)]
pub struct Txn {
    pub tid: TransactionId,
    pub to: SocketAddr,
    pub bytes: Vec<u8>,
    rto: Duration,
    next_send: Instant,
    /// Last time anything came back (or the first send).
    heard: Instant,
    liveness: Duration,
}

/// What a transaction wants on a timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnPoll {
    Idle,
    Retransmit,
    Dead,
}

impl Txn {
    /// A transaction whose first send is happening now.
    pub fn new(now: Instant, tid: TransactionId, to: SocketAddr, bytes: Vec<u8>) -> Self {
        Txn {
            tid,
            to,
            bytes,
            rto: RTO,
            next_send: now + RTO,
            heard: now,
            liveness: LIVENESS,
        }
    }

    pub fn with_liveness(mut self, d: Duration) -> Self {
        self.liveness = d;
        self
    }

    /// A pending indication (or any message of this transaction) arrived.
    pub fn heard(&mut self, now: Instant) {
        self.heard = now;
    }

    pub fn deadline(&self) -> Instant {
        self.next_send.min(self.heard + self.liveness)
    }

    pub fn poll(&mut self, now: Instant) -> TxnPoll {
        if now >= self.heard + self.liveness {
            return TxnPoll::Dead;
        }
        if now >= self.next_send {
            self.rto = (self.rto * 2).min(RTO_MAX);
            self.next_send = now + self.rto;
            return TxnPoll::Retransmit;
        }
        TxnPoll::Idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retransmits_then_dies_without_answers() {
        let t0 = Instant::now();
        let mut t = Txn::new(
            t0,
            TransactionId([0; 12]),
            ([127, 0, 0, 1], 1).into(),
            vec![],
        );
        let mut sends = 0;
        let mut now = t0;
        for _ in 0..100 {
            now = t.deadline();
            match t.poll(now) {
                TxnPoll::Retransmit => sends += 1,
                TxnPoll::Dead => break,
                TxnPoll::Idle => {}
            }
        }
        assert_eq!(now - t0, LIVENESS);
        assert!((3..=4).contains(&sends), "{sends}");
    }

    #[test]
    fn pending_indications_keep_it_alive() {
        let t0 = Instant::now();
        let mut t = Txn::new(
            t0,
            TransactionId([0; 12]),
            ([127, 0, 0, 1], 1).into(),
            vec![],
        );
        let mut now = t0;
        for _ in 0..50 {
            now = t.deadline();
            assert_ne!(t.poll(now), TxnPoll::Dead);
            t.heard(now);
        }
        assert!(now - t0 > Duration::from_secs(10));
    }
}
