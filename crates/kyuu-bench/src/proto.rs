//! A small sans-IO TURN client session for the load generator: long-term authentication
//! (Allocate → 401 → Allocate with USERNAME/REALM/NONCE/MESSAGE-INTEGRITY, RFC 8656 §7.2 and
//! RFC 8489 §9.2), then optionally CreatePermission (§9) and ChannelBind (§11), and finally a
//! Refresh with LIFETIME 0 to deallocate (§8).
//!
//! Bytes and time in, the request to (re)send out: the caller owns the socket. Responses are
//! matched by transaction id; their MESSAGE-INTEGRITY is not checked (a benchmark trusts its
//! own server on loopback).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_stun::integrity::Key;
use kyuu_stun::{attr, method, Class, Message, MessageBuilder, TransactionId};

/// Long-term credentials shared by every session of a run.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// What the session does after the allocation exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub permission: bool,
    pub channel: bool,
}

/// Where a session stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Idle,
    Allocate,
    Permission,
    Channel,
    Ready,
    /// Refresh of a ready allocation (back to Ready).
    Refresh,
    Deallocate,
    Closed,
    Failed,
}

/// What the caller should do after an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send [`Session::request`] now.
    Send,
    /// Reached [`Step::Ready`] or [`Step::Closed`].
    Done,
    /// Gave up; [`Session::error`] says why.
    Failed,
    /// Not for us (stale or foreign transaction); nothing to do.
    Ignore,
}

/// The lifetime a Refresh asks for, seconds.
pub const REFRESH_LIFETIME: u32 = 600;

/// The channel number every session binds (channels are per allocation, so one suffices).
pub const CHANNEL: u16 = 0x4000;

const RTO: Duration = Duration::from_millis(400);
const MAX_TRIES: u8 = 6;
const MAX_AUTH_ROUNDS: u8 = 3;

#[derive(Debug, Clone)]
struct Auth {
    realm: String,
    nonce: Vec<u8>,
    key: Key,
}

/// One client's TURN allocation, as a state machine.
#[derive(Debug)]
pub struct Session {
    plan: Plan,
    peer: SocketAddr,
    auth: Option<Auth>,
    step: Step,
    tid: TransactionId,
    req: [u8; 512],
    req_len: usize,
    sent_at: Instant,
    tries: u8,
    auth_rounds: u8,
    relayed: Option<SocketAddr>,
    error: Option<String>,
}

fn new_tid() -> TransactionId {
    TransactionId(rand::random())
}

impl Session {
    pub fn new(plan: Plan, peer: SocketAddr, now: Instant) -> Self {
        Session {
            plan,
            peer,
            auth: None,
            step: Step::Idle,
            tid: TransactionId([0; 12]),
            req: [0; 512],
            req_len: 0,
            sent_at: now,
            tries: 0,
            auth_rounds: 0,
            relayed: None,
            error: None,
        }
    }

    pub fn step(&self) -> Step {
        self.step
    }

    /// The relayed transport address the server granted.
    #[cfg(test)]
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// The request to put on the wire.
    pub fn request(&self) -> &[u8] {
        &self.req[..self.req_len]
    }

    /// Starts allocating (unauthenticated first, as a fresh client does).
    pub fn start(&mut self, creds: &Credentials, now: Instant) -> Action {
        self.enter(Step::Allocate, creds, now)
    }

    /// Starts deallocating a ready session (Refresh with LIFETIME 0).
    pub fn deallocate(&mut self, creds: &Credentials, now: Instant) -> Action {
        match self.step {
            Step::Ready | Step::Permission | Step::Channel => {
                self.enter(Step::Deallocate, creds, now)
            }
            _ => {
                self.step = Step::Closed;
                Action::Done
            }
        }
    }

    /// Starts refreshing a ready session (Refresh with LIFETIME [`REFRESH_LIFETIME`]).
    pub fn refresh(&mut self, creds: &Credentials, now: Instant) -> Action {
        match self.step {
            Step::Ready => self.enter(Step::Refresh, creds, now),
            _ => Action::Ignore,
        }
    }

    /// When the outstanding request should be retransmitted.
    pub fn timeout(&self) -> Option<Instant> {
        match self.step {
            Step::Allocate
            | Step::Permission
            | Step::Channel
            | Step::Refresh
            | Step::Deallocate => {
                Some(self.sent_at + RTO * (1u32 << self.tries.saturating_sub(1).min(3)))
            }
            Step::Idle | Step::Ready | Step::Closed | Step::Failed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Action {
        match self.timeout() {
            Some(t) if now >= t => {}
            _ => return Action::Ignore,
        }
        if self.tries >= MAX_TRIES {
            return self.fail(format!(
                "{:?}: no answer after {} tries",
                self.step, self.tries
            ));
        }
        self.tries += 1;
        self.sent_at = now;
        Action::Send
    }

    /// Feeds one datagram received from the server.
    pub fn handle(&mut self, creds: &Credentials, data: &[u8], now: Instant) -> Action {
        let Ok(msg) = Message::parse(data) else {
            return Action::Ignore;
        };
        if msg.transaction_id() != &self.tid {
            return Action::Ignore;
        }
        match msg.class() {
            Class::Success => self.on_success(&msg, creds, now),
            Class::Error => self.on_error(&msg, creds, now),
            Class::Request | Class::Indication => Action::Ignore,
        }
    }

    fn on_success(&mut self, msg: &Message<'_>, creds: &Credentials, now: Instant) -> Action {
        match self.step {
            Step::Allocate => {
                self.relayed = msg.get(attr::XOR_RELAYED_ADDRESS).and_then(|v| {
                    attr::decode_xor_address(attr::XOR_RELAYED_ADDRESS, v, msg.transaction_id())
                        .ok()
                });
                if self.plan.permission {
                    self.enter(Step::Permission, creds, now)
                } else if self.plan.channel {
                    self.enter(Step::Channel, creds, now)
                } else {
                    self.step = Step::Ready;
                    Action::Done
                }
            }
            Step::Permission => {
                if self.plan.channel {
                    self.enter(Step::Channel, creds, now)
                } else {
                    self.step = Step::Ready;
                    Action::Done
                }
            }
            Step::Channel | Step::Refresh => {
                self.step = Step::Ready;
                Action::Done
            }
            Step::Deallocate => {
                self.step = Step::Closed;
                Action::Done
            }
            Step::Idle | Step::Ready | Step::Closed | Step::Failed => Action::Ignore,
        }
    }

    fn on_error(&mut self, msg: &Message<'_>, creds: &Credentials, now: Instant) -> Action {
        let code = msg
            .get(attr::ERROR_CODE)
            .and_then(|v| attr::decode_error_code(v).ok())
            .map(|e| (e.code, e.reason.to_owned()))
            .unwrap_or((0, "no ERROR-CODE".into()));
        let nonce = msg.get(attr::NONCE).map(<[u8]>::to_vec);
        match (code.0, nonce) {
            (401 | 438, Some(nonce)) if self.auth_rounds < MAX_AUTH_ROUNDS => {
                self.auth_rounds += 1;
                let realm = msg
                    .get(attr::REALM)
                    .and_then(|r| std::str::from_utf8(r).ok())
                    .map(str::to_owned)
                    .or_else(|| self.auth.as_ref().map(|a| a.realm.clone()))
                    .unwrap_or_default();
                let key = match &self.auth {
                    Some(a) if a.realm == realm => a.key.clone(),
                    _ => Key::long_term_md5(&creds.username, &realm, &creds.password),
                };
                self.auth = Some(Auth { realm, nonce, key });
                let step = self.step;
                self.enter(step, creds, now)
            }
            // A deallocation that finds nothing to delete is done all the same.
            (437, _) if self.step == Step::Deallocate => {
                self.step = Step::Closed;
                Action::Done
            }
            (c, _) => self.fail(format!("{:?}: error {c} {}", self.step, code.1)),
        }
    }

    fn fail(&mut self, why: String) -> Action {
        self.step = Step::Failed;
        self.error = Some(why);
        Action::Failed
    }

    /// Builds the request for `step` with a fresh transaction id.
    fn enter(&mut self, step: Step, creds: &Credentials, now: Instant) -> Action {
        self.step = step;
        self.tid = new_tid();
        self.tries = 1;
        self.sent_at = now;
        match self.build(creds) {
            Ok(len) => {
                self.req_len = len;
                Action::Send
            }
            Err(e) => self.fail(format!("{step:?}: cannot build request: {e}")),
        }
    }

    fn build(&mut self, creds: &Credentials) -> Result<usize, kyuu_stun::Error> {
        let m = match self.step {
            Step::Allocate => method::ALLOCATE,
            Step::Permission => method::CREATE_PERMISSION,
            Step::Channel => method::CHANNEL_BIND,
            Step::Refresh | Step::Deallocate => method::REFRESH,
            Step::Idle | Step::Ready | Step::Closed | Step::Failed => method::BINDING,
        };
        let mut b = MessageBuilder::new(&mut self.req, m, Class::Request, self.tid)?;
        match self.step {
            Step::Allocate => b.add_requested_transport(attr::TRANSPORT_UDP)?,
            Step::Permission => b.add_xor_address(attr::XOR_PEER_ADDRESS, self.peer)?,
            Step::Channel => {
                b.add_channel_number(CHANNEL)?;
                b.add_xor_address(attr::XOR_PEER_ADDRESS, self.peer)?;
            }
            Step::Refresh => b.add_u32(attr::LIFETIME, REFRESH_LIFETIME)?,
            Step::Deallocate => b.add_u32(attr::LIFETIME, 0)?,
            Step::Idle | Step::Ready | Step::Closed | Step::Failed => {}
        }
        if let Some(a) = &self.auth {
            b.add(attr::USERNAME, creds.username.as_bytes())?;
            b.add(attr::REALM, a.realm.as_bytes())?;
            b.add(attr::NONCE, &a.nonce)?;
            b.add_integrity(&a.key)?;
        }
        Ok(b.finish())
    }
}

/// A STUN Binding request (readiness probe).
pub fn binding_request(out: &mut [u8]) -> Result<usize, kyuu_stun::Error> {
    let b = MessageBuilder::new(out, method::BINDING, Class::Request, new_tid())?;
    Ok(b.finish())
}

/// Whether `data` is a Binding success response.
pub fn is_binding_success(data: &[u8]) -> bool {
    Message::parse(data).is_ok_and(|m| m.method() == method::BINDING && m.class() == Class::Success)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_request_then_challenge_adds_integrity() -> anyhow::Result<()> {
        let now = Instant::now();
        let creds = Credentials {
            username: "u".into(),
            password: "p".into(),
        };
        let peer: SocketAddr = "127.0.0.1:9".parse()?;
        let mut s = Session::new(
            Plan {
                permission: true,
                channel: true,
            },
            peer,
            now,
        );
        assert_eq!(s.start(&creds, now), Action::Send);
        let req = Message::parse(s.request())?;
        assert_eq!(req.method(), method::ALLOCATE);
        assert!(!req.has(attr::MESSAGE_INTEGRITY));
        // The server's 401.
        let mut buf = [0u8; 256];
        let mut b = MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Error, s.tid)?;
        b.add_error(401, "Unauthorized")?;
        b.add(attr::REALM, b"r")?;
        b.add(attr::NONCE, b"n0")?;
        let len = b.finish();
        assert_eq!(s.handle(&creds, &buf[..len], now), Action::Send);
        let req = Message::parse(s.request())?;
        req.verify_integrity(&Key::long_term_md5("u", "r", "p"))?;
        assert_eq!(req.get(attr::NONCE), Some(&b"n0"[..]));
        // Success moves on to CreatePermission.
        let mut b = MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Success, s.tid)?;
        b.add_xor_address(attr::XOR_RELAYED_ADDRESS, "127.0.0.1:5000".parse()?)?;
        let len = b.finish();
        assert_eq!(s.handle(&creds, &buf[..len], now), Action::Send);
        assert_eq!(s.step(), Step::Permission);
        assert_eq!(s.relayed(), Some("127.0.0.1:5000".parse()?));
        Ok(())
    }
}
