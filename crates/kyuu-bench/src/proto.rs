//! The load generator's TURN session: Allocate (answering the 401 challenge), then optionally
//! CreatePermission (RFC 8656 §9) and ChannelBind (§11), Refreshes while held, and finally a
//! Refresh with LIFETIME 0 to deallocate (§8). A step machine over kyuu's one TURN client, [`kyuu_client::turn::Client`]
//! (authentication, retransmission and answer matching live there); the relay hot loop in
//! `load.rs` writes its own ChannelData without allocating.
//!
//! Bytes and time in, the request to (re)send out: the caller owns the socket.

use std::net::SocketAddr;
use std::time::Instant;

use kyuu_client::turn::{Client, Event};
use kyuu_stun::{method, Class, Message, MessageBuilder, TransactionId};

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

/// The channel number every session binds (channels are per allocation, so one suffices).
pub const CHANNEL: u16 = 0x4000;

/// The lifetime a Refresh asks for, seconds.
pub const REFRESH_LIFETIME: u32 = 600;

/// One client's TURN allocation, as a state machine.
#[derive(Debug)]
pub struct Session {
    plan: Plan,
    peer: SocketAddr,
    client: Client,
    step: Step,
    req: Vec<u8>,
    relayed: Option<SocketAddr>,
    error: Option<String>,
}

fn new_tid() -> TransactionId {
    TransactionId(rand::random())
}

impl Session {
    pub fn new(plan: Plan, peer: SocketAddr, _now: Instant) -> Self {
        Session {
            plan,
            peer,
            client: Client::new("", "", false),
            step: Step::Idle,
            req: Vec::new(),
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
        &self.req
    }

    /// Starts allocating (unauthenticated first, as a fresh client does).
    pub fn start(&mut self, creds: &Credentials, now: Instant) -> Action {
        self.client = Client::new(&creds.username, &creds.password, false);
        self.step = Step::Allocate;
        self.client.allocate(now);
        self.transmit()
    }

    /// Starts deallocating a ready session (Refresh with LIFETIME 0).
    pub fn deallocate(&mut self, _creds: &Credentials, now: Instant) -> Action {
        match self.step {
            Step::Ready | Step::Permission | Step::Channel => {
                self.step = Step::Deallocate;
                self.client.refresh(now, 0);
                self.transmit()
            }
            _ => {
                self.step = Step::Closed;
                Action::Done
            }
        }
    }

    /// Starts refreshing a ready session (Refresh with LIFETIME [`REFRESH_LIFETIME`]).
    pub fn refresh(&mut self, _creds: &Credentials, now: Instant) -> Action {
        match self.step {
            Step::Ready => {
                self.step = Step::Refresh;
                self.client.refresh(now, REFRESH_LIFETIME);
                self.transmit()
            }
            _ => Action::Ignore,
        }
    }

    /// When the outstanding request should be retransmitted (or given up).
    pub fn timeout(&self) -> Option<Instant> {
        match self.step {
            Step::Allocate
            | Step::Permission
            | Step::Channel
            | Step::Refresh
            | Step::Deallocate => self.client.poll_timeout(),
            Step::Idle | Step::Ready | Step::Closed | Step::Failed => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) -> Action {
        if self.timeout().is_none_or(|t| now < t) {
            return Action::Ignore;
        }
        self.client.handle_timeout(now);
        self.advance(now)
    }

    /// Feeds one datagram received from the server.
    pub fn handle(&mut self, _creds: &Credentials, data: &[u8], now: Instant) -> Action {
        self.client.handle_input(now, data);
        self.advance(now)
    }

    /// Acts on the client's events: the next step's request, done, or failed.
    fn advance(&mut self, now: Instant) -> Action {
        // Bounded: one request is outstanding, so at most a couple of events are queued.
        while let Some(ev) = self.client.poll_event() {
            match ev {
                Event::Allocated { relayed, .. } => {
                    self.relayed = relayed.first().copied();
                    self.after(Step::Allocate, now);
                }
                Event::PermissionCreated => self.after(Step::Permission, now),
                Event::ChannelBound { .. } => self.after(Step::Channel, now),
                Event::Refreshed { .. } if self.step == Step::Refresh => self.step = Step::Ready,
                Event::Refreshed { .. } => self.step = Step::Closed,
                // A deallocation that finds nothing to delete is done all the same.
                Event::Error { code: 437, .. } if self.step == Step::Deallocate => {
                    self.step = Step::Closed;
                }
                Event::Error { code, reason, .. } => {
                    return self.fail(format!("{:?}: error {code} {reason}", self.step));
                }
                Event::Timeout { .. } => {
                    return self.fail(format!("{:?}: no answer", self.step));
                }
                _ => {}
            }
        }
        let act = self.transmit();
        match (act, self.step) {
            (Action::Send, _) => Action::Send,
            (_, Step::Ready | Step::Closed) => Action::Done,
            _ => Action::Ignore,
        }
    }

    /// The step after `done` succeeded, starting its request.
    fn after(&mut self, done: Step, now: Instant) {
        let next = match done {
            Step::Allocate if self.plan.permission => Step::Permission,
            Step::Allocate | Step::Permission if self.plan.channel => Step::Channel,
            _ => Step::Ready,
        };
        self.step = next;
        match next {
            Step::Permission => {
                self.client.create_permission(now, &[self.peer]);
            }
            Step::Channel => {
                self.client.channel_bind(now, CHANNEL, self.peer);
            }
            _ => {}
        }
    }

    /// Takes the client's next transmission, if any.
    fn transmit(&mut self) -> Action {
        match self.client.poll_transmit() {
            Some(t) => {
                self.req = t;
                Action::Send
            }
            None => Action::Ignore,
        }
    }

    fn fail(&mut self, why: String) -> Action {
        self.step = Step::Failed;
        self.error = Some(why);
        Action::Failed
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
    use kyuu_stun::attr;
    use kyuu_stun::integrity::Key;

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
        let tid = *Message::parse(s.request())?.transaction_id();
        let mut b = MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Error, tid)?;
        b.add_error(401, "Unauthorized")?;
        b.add(attr::REALM, b"r")?;
        b.add(attr::NONCE, b"n0")?;
        let len = b.finish();
        assert_eq!(s.handle(&creds, &buf[..len], now), Action::Send);
        let req = Message::parse(s.request())?;
        let key = Key::long_term_md5("u", "r", "p")?;
        req.verify_integrity(&key)?;
        assert_eq!(req.get(attr::NONCE), Some(&b"n0"[..]));
        // Success moves on to CreatePermission.
        let tid = *req.transaction_id();
        let mut b = MessageBuilder::new(&mut buf, method::ALLOCATE, Class::Success, tid)?;
        b.add_xor_address(attr::XOR_RELAYED_ADDRESS, "127.0.0.1:5000".parse()?)?;
        b.add_integrity(&key)?;
        let len = b.finish();
        assert_eq!(s.handle(&creds, &buf[..len], now), Action::Send);
        assert_eq!(s.step(), Step::Permission);
        assert_eq!(s.relayed(), Some("127.0.0.1:5000".parse()?));
        Ok(())
    }
}
