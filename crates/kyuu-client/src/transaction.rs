//! Client transaction timing: the one STUN retransmission policy of kyuu's clients (the Binding
//! and NAT probes, the TURN client in [`crate::turn`]).
//!
//! Over UDP ([RFC 8489 §6.2.1](https://www.rfc-editor.org/rfc/rfc8489#section-6.2.1)):
//! A request is sent at 0, RTO, 3·RTO, 7·RTO, … (the interval doubles after each send) until
//! `Rc` transmissions have gone out; the transaction then fails `Rm`·RTO after the last one. With
//! the RFC's defaults (RTO 500 ms, Rc 7, Rm 16) that is 39.5 s, far too long for an interactive
//! tool that *expects* some requests to go unanswered (the filtering tests), so the whole
//! transaction is also bounded by a caller-chosen timeout.

use std::time::{Duration, Instant};

/// Retransmission parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetransmitConfig {
    /// Initial retransmission timeout (RFC 8489 recommends 500 ms).
    pub rto: Duration,
    /// Maximum number of transmissions, `Rc` (RFC default 7).
    pub max_transmissions: u32,
    /// Multiple of RTO to wait after the last transmission, `Rm` (RFC default 16).
    pub last_wait_factor: u32,
    /// Upper bound on the whole transaction.
    pub timeout: Duration,
}

impl Default for RetransmitConfig {
    fn default() -> Self {
        RetransmitConfig {
            rto: Duration::from_millis(500),
            max_transmissions: 7,
            last_wait_factor: 16,
            timeout: Duration::from_secs(3),
        }
    }
}

/// RFC 8489's total transaction time with the default RTO, Rc and Rm, and its TCP/TLS
/// transaction timeout Ti (§6.2.2).
pub const RFC_TRANSACTION_TIMEOUT: Duration = Duration::from_millis(39_500);

impl RetransmitConfig {
    /// RFC 8489 §6.2.1 over UDP: RTO 500 ms doubling, Rc 7, Rm 16, no tighter bound (39.5 s).
    pub fn udp() -> Self {
        RetransmitConfig::with_timeout(RFC_TRANSACTION_TIMEOUT)
    }

    /// RFC 8489 §6.2.2 over TCP/TLS: one transmission, failing after Ti = 39.5 s.
    pub fn reliable() -> Self {
        RetransmitConfig {
            rto: RFC_TRANSACTION_TIMEOUT,
            max_transmissions: 1,
            last_wait_factor: 1,
            timeout: RFC_TRANSACTION_TIMEOUT,
        }
    }

    /// The RFC defaults with the overall bound set to `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        RetransmitConfig {
            timeout,
            ..RetransmitConfig::default()
        }
    }
}

/// What a [`Timer`] wants done at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerAction {
    /// Nothing yet; wake up at the given instant.
    Wait(Instant),
    /// Send (or resend) the request now.
    Send,
    /// The transaction has failed: no answer in time.
    Expired,
}

/// The send/resend/give-up schedule of one client transaction.
#[derive(Debug, Clone)]
pub struct Timer {
    cfg: RetransmitConfig,
    deadline: Instant,
    next_send: Option<Instant>,
    interval: Duration,
    sent: u32,
}

impl Timer {
    /// A timer whose first transmission is due at `now`.
    pub fn new(cfg: RetransmitConfig, now: Instant) -> Self {
        Timer {
            cfg,
            deadline: now + cfg.timeout,
            next_send: Some(now),
            interval: cfg.rto,
            sent: 0,
        }
    }

    /// Transmissions so far.
    pub fn transmissions(&self) -> u32 {
        self.sent
    }

    /// Decides what to do at `now`. On [`TimerAction::Send`] the caller sends and the timer has
    /// already scheduled the next retransmission.
    pub fn poll(&mut self, now: Instant) -> TimerAction {
        if now >= self.deadline {
            return TimerAction::Expired;
        }
        match self.next_send {
            Some(at) if now >= at => {
                self.sent += 1;
                if self.sent >= self.cfg.max_transmissions.max(1) {
                    self.next_send = None;
                    let last_wait = self.cfg.rto.saturating_mul(self.cfg.last_wait_factor);
                    self.deadline = self.deadline.min(now + last_wait);
                } else {
                    self.next_send = Some(now + self.interval);
                    self.interval = self.interval.saturating_mul(2);
                }
                TimerAction::Send
            }
            Some(at) => TimerAction::Wait(at.min(self.deadline)),
            None => TimerAction::Wait(self.deadline),
        }
    }

    /// When [`Timer::poll`] next has something to do.
    pub fn next_wakeup(&self) -> Instant {
        match self.next_send {
            Some(at) => at.min(self.deadline),
            None => self.deadline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(cfg: RetransmitConfig) -> (Vec<u64>, u64) {
        let t0 = Instant::now();
        let mut timer = Timer::new(cfg, t0);
        let mut now = t0;
        let mut out = Vec::new();
        loop {
            match timer.poll(now) {
                TimerAction::Send => out.push((now - t0).as_millis() as u64),
                TimerAction::Wait(at) => now = at,
                TimerAction::Expired => return (out, (now - t0).as_millis() as u64),
            }
        }
    }

    #[test]
    fn rfc_schedule_without_bound() {
        let cfg = RetransmitConfig {
            timeout: Duration::from_secs(100),
            ..RetransmitConfig::default()
        };
        let (at, end) = sends(cfg);
        assert_eq!(at, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
        // RFC 8489 §6.2.1: "the client will have given up after 39500 ms".
        assert_eq!(end, 39500);
    }

    #[test]
    fn udp_is_the_rfc_schedule() {
        let (at, end) = sends(RetransmitConfig::udp());
        assert_eq!(at, vec![0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!(end, 39500);
    }

    #[test]
    fn reliable_sends_once_and_waits_ti() {
        let (at, end) = sends(RetransmitConfig::reliable());
        assert_eq!(at, vec![0]);
        assert_eq!(end, 39500);
    }

    #[test]
    fn bounded_by_timeout() {
        let (at, end) = sends(RetransmitConfig::with_timeout(Duration::from_secs(3)));
        assert_eq!(at, vec![0, 500, 1500]);
        assert_eq!(end, 3000);
    }

    #[test]
    fn one_transmission() {
        let cfg = RetransmitConfig {
            max_transmissions: 1,
            ..RetransmitConfig::with_timeout(Duration::from_secs(60))
        };
        let (at, end) = sends(cfg);
        assert_eq!(at, vec![0]);
        assert_eq!(end, 8000);
    }
}
