//! The sans-IO peer algorithm (`docs/rawr.md` §8): Exchange at the root, decide direct, Connect via
//! the gateway, fall back to the root.
//!
//! Contract: call [`Peer::start`] once, then after every input drain [`Peer::poll_output`] and
//! sleep until [`Peer::poll_timeout`]. When it emits [`PeerOutput::CheckNeighbour`], the shell
//! probes and reads its neighbour table and answers with [`Peer::neighbour_result`].

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_stun::{Class, Message, TransactionId};
use rand::{Rng, SeedableRng};

use crate::txn::{Txn, TxnPoll};
use crate::wire::{self, ConnectReq, Mac, Relay, MAX_HOPS};

/// What the peer is given.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub session: Vec<u8>,
    pub mac: Mac,
    pub root: SocketAddr,
    pub gateway: Option<SocketAddr>,
    /// Host addresses offered to the other peer (for the same-link check).
    pub hosts: Vec<SocketAddr>,
    /// Register `mac` at the gateway (always done when there is one: it doubles as the probe
    /// for "does my gateway speak RAWR").
    pub register_lifetime: u32,
    /// Overall deadline.
    pub deadline: Duration,
    /// Skip the direct check (e.g. when the caller knows the peers are not on one link).
    pub no_direct: bool,
    /// Send Connect (without TARGET-MAC) in parallel with Exchange instead of after it, so setup
    /// costs max(root RTT, meeting-node RTT) instead of their sum (`docs/rawr.md` §8).
    pub overlap: bool,
}

impl PeerConfig {
    pub fn new(session: Vec<u8>, mac: Mac, root: SocketAddr) -> Self {
        PeerConfig {
            session,
            mac,
            root,
            gateway: None,
            hosts: Vec::new(),
            register_lifetime: 600,
            deadline: Duration::from_secs(30),
            no_direct: false,
            overlap: true,
        }
    }
}

/// Where the session's media goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Route {
    /// Same link: host candidates, no relay.
    Direct,
    /// Relay at a node below the root (reached through the gateway chain).
    Node { name: String },
    /// Relay at the root.
    Root { name: String },
}

/// The result of the algorithm.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    pub route: Route,
    pub other_mac: String,
    pub other_hosts: Vec<SocketAddr>,
    pub relay: Option<Relay>,
    /// Why the gateway was not used, if it was not.
    pub gateway_error: Option<String>,
    pub exchange_ms: u64,
    pub total_ms: u64,
}

impl Outcome {
    /// `RTCIceServer[]` for WebRTC (empty for a direct route).
    pub fn ice_servers(&self) -> serde_json::Value {
        match &self.relay {
            None => serde_json::json!([]),
            Some(r) => serde_json::json!([{
                "urls": r.uris,
                "username": r.username,
                "credential": r.password,
            }]),
        }
    }
}

/// Why the algorithm failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("root {0} unreachable: no answer to Exchange")]
    RootUnreachable(SocketAddr),
    #[error("Exchange at root {at} failed: {code} {reason}")]
    Exchange {
        at: SocketAddr,
        code: u16,
        reason: String,
    },
    #[error("Connect at root {at} failed: {code} {reason} (gateway: {gateway})")]
    Connect {
        at: SocketAddr,
        code: u16,
        reason: String,
        gateway: String,
    },
    #[error("root {at} unreachable during Connect (gateway: {gateway})")]
    ConnectUnreachable { at: SocketAddr, gateway: String },
    #[error("deadline of {0:?} passed")]
    Deadline(Duration),
}

/// What the peer asks its shell to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerOutput {
    Transmit {
        to: SocketAddr,
        data: Vec<u8>,
    },
    /// Probe `hosts` and tell whether `mac` is in the neighbour table.
    CheckNeighbour {
        mac: Mac,
        hosts: Vec<SocketAddr>,
    },
    Done(Box<Outcome>),
    Failed(PeerError),
}

/// Progress of Exchange and the direct check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Idle,
    Exchanging,
    Checking,
    /// Exchange done, not direct: waiting for (or about to send) Connect.
    Relaying,
    Finished,
}

/// Where the Connect went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    Gateway,
    Root,
}

/// One run of the peer algorithm.
#[derive(Debug)]
pub struct Peer {
    cfg: PeerConfig,
    rng: rand::rngs::StdRng,
    phase: Phase,
    start: Instant,
    exchange: Option<Txn>,
    register: Option<Txn>,
    connect: Option<Txn>,
    /// Where the current Connect goes; `None` before the first one.
    via: Option<Via>,
    /// The TARGET-MAC the current Connect carries (`None`: wildcard).
    connect_target: Option<Mac>,
    /// The destination answered 400 to a wildcard Connect (a node predating it): re-send with
    /// TARGET-MAC there once Exchange has told it.
    wildcard_refused: Option<SocketAddr>,
    /// The Connect answer, when it came before Exchange finished.
    relay: Option<Relay>,
    other: Option<(Mac, Vec<SocketAddr>)>,
    exchange_ms: u64,
    gateway_error: Option<String>,
    out: VecDeque<PeerOutput>,
}

impl Peer {
    pub fn new(cfg: PeerConfig, seed: u64) -> Peer {
        Peer {
            cfg,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            phase: Phase::Idle,
            start: Instant::now(),
            exchange: None,
            register: None,
            connect: None,
            via: None,
            connect_target: None,
            wildcard_refused: None,
            relay: None,
            other: None,
            exchange_ms: 0,
            gateway_error: None,
            out: VecDeque::new(),
        }
    }

    fn tid(&mut self) -> TransactionId {
        TransactionId(self.rng.gen())
    }

    fn send_txn(
        &mut self,
        now: Instant,
        to: SocketAddr,
        build: impl FnOnce(TransactionId) -> Vec<u8>,
    ) -> Txn {
        let tid = self.tid();
        let data = build(tid);
        self.out.push_back(PeerOutput::Transmit {
            to,
            data: data.clone(),
        });
        Txn::new(now, tid, to, data)
    }

    /// Sends Exchange (and Register at the gateway).
    pub fn start(&mut self, now: Instant) {
        self.start = now;
        self.phase = Phase::Exchanging;
        self.send_exchange(now);
        if let Some(g) = self.cfg.gateway {
            let (mac, life) = (self.cfg.mac, self.cfg.register_lifetime);
            let t = self.send_txn(now, g, |tid| wire::encode_register(tid, mac, Some(life)));
            self.register = Some(t);
        }
        if self.cfg.overlap {
            self.begin_connect(now);
        }
    }

    fn send_exchange(&mut self, now: Instant) {
        let (root, session, mac, hosts) = (
            self.cfg.root,
            self.cfg.session.clone(),
            self.cfg.mac,
            self.cfg.hosts.clone(),
        );
        let t = self.send_txn(now, root, |tid| {
            wire::encode_exchange(tid, &session, mac, &hosts)
        });
        self.exchange = Some(t);
    }

    fn send_connect(&mut self, now: Instant, to: SocketAddr) {
        let target = self.other.as_ref().map(|(m, _)| *m);
        if target.is_none() && !(self.cfg.overlap && self.wildcard_refused != Some(to)) {
            // Needs TARGET-MAC: sent when Exchange answers.
            self.wildcard_refused = Some(to);
            self.connect = None;
            return;
        }
        self.wildcard_refused = None;
        self.connect_target = target;
        let req = ConnectReq {
            session: self.cfg.session.clone(),
            mac: self.cfg.mac,
            target,
            root: self.cfg.root,
            hops: MAX_HOPS,
            path: Vec::new(),
        };
        let t = self.send_txn(now, to, |tid| wire::encode_connect(tid, &req, None));
        self.connect = Some(t);
    }

    pub fn poll_output(&mut self) -> Option<PeerOutput> {
        self.out.pop_front()
    }

    pub fn is_finished(&self) -> bool {
        self.phase == Phase::Finished
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.phase == Phase::Finished || self.phase == Phase::Idle {
            return None;
        }
        let mut t = self.start + self.cfg.deadline;
        for x in [&self.exchange, &self.register, &self.connect]
            .into_iter()
            .flatten()
        {
            t = t.min(x.deadline());
        }
        Some(t)
    }

    /// Withdraws an outstanding Connect (one Cancel datagram, no retransmission: the node's
    /// pending timeout frees it anyway).
    fn cancel_connect(&mut self) {
        if let Some(t) = self.connect.take() {
            let tid = self.tid();
            let data = wire::encode_cancel(
                tid,
                &self.cfg.session,
                self.cfg.mac,
                self.connect_target,
                None,
                None,
            );
            self.out.push_back(PeerOutput::Transmit { to: t.to, data });
        }
    }

    fn finish(&mut self, o: PeerOutput) {
        if !matches!(o, PeerOutput::Done(ref d) if d.relay.is_some()) {
            self.cancel_connect();
        }
        self.phase = Phase::Finished;
        self.exchange = None;
        self.register = None;
        self.connect = None;
        self.out.push_back(o);
    }

    fn elapsed_ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.start).as_millis()).unwrap_or(u64::MAX)
    }

    fn gateway_failed(&mut self, now: Instant, why: String) {
        if self.gateway_error.is_none() {
            self.gateway_error = Some(why);
        }
        if self.via == Some(Via::Gateway) && self.relay.is_none() {
            self.via = Some(Via::Root);
            let root = self.cfg.root;
            self.send_connect(now, root);
        }
    }

    /// Answer to [`PeerOutput::CheckNeighbour`].
    pub fn neighbour_result(&mut self, now: Instant, on_link: bool) {
        if self.phase != Phase::Checking {
            return;
        }
        if on_link {
            let Some((mac, hosts)) = self.other.clone() else {
                return;
            };
            let o = Outcome {
                route: Route::Direct,
                other_mac: mac.to_string(),
                other_hosts: hosts,
                relay: None,
                gateway_error: None,
                exchange_ms: self.exchange_ms,
                total_ms: self.elapsed_ms(now),
            };
            self.finish(PeerOutput::Done(Box::new(o)));
            return;
        }
        self.relaying(now);
    }

    /// Exchange done and not direct: finish with the relay if Connect already answered, else
    /// make sure a Connect is on its way.
    fn relaying(&mut self, now: Instant) {
        self.phase = Phase::Relaying;
        if let Some(relay) = self.relay.take() {
            self.finish_relay(now, relay);
        } else if let Some(to) = self.wildcard_refused {
            self.send_connect(now, to);
        } else if self.via.is_none() {
            self.begin_connect(now);
        }
    }

    fn begin_connect(&mut self, now: Instant) {
        match (self.cfg.gateway, &self.gateway_error) {
            (Some(g), None) => {
                self.via = Some(Via::Gateway);
                self.send_connect(now, g);
            }
            _ => {
                self.via = Some(Via::Root);
                let root = self.cfg.root;
                self.send_connect(now, root);
            }
        }
    }

    fn finish_relay(&mut self, now: Instant, relay: Relay) {
        let name = relay.meeting_node().unwrap_or("?").to_owned();
        let route = if relay.at_root {
            Route::Root { name }
        } else {
            Route::Node { name }
        };
        let (mac, hosts) = self.other.clone().unwrap_or((Mac([0; 6]), Vec::new()));
        let o = Outcome {
            route,
            other_mac: mac.to_string(),
            other_hosts: hosts,
            relay: Some(relay),
            gateway_error: self.gateway_error.clone(),
            exchange_ms: self.exchange_ms,
            total_ms: self.elapsed_ms(now),
        };
        self.finish(PeerOutput::Done(Box::new(o)));
    }

    pub fn handle_input(&mut self, now: Instant, from: SocketAddr, data: &[u8]) {
        let Ok(m) = Message::parse(data) else {
            return;
        };
        let tid = *m.transaction_id();
        let is = |t: &Option<Txn>| t.as_ref().is_some_and(|t| t.tid == tid && t.to == from);
        if is(&self.exchange) {
            self.on_exchange(now, &m);
        } else if is(&self.register) {
            self.on_register(now, &m);
        } else if is(&self.connect) {
            self.on_connect(now, &m);
        }
    }

    fn error_of(m: &Message<'_>) -> (u16, String) {
        match m.error_code() {
            Some(Ok(e)) => (e.code, e.reason.to_owned()),
            _ => (0, "malformed error".to_owned()),
        }
    }

    fn on_exchange(&mut self, now: Instant, m: &Message<'_>) {
        match m.class() {
            Class::Indication => {
                if let Some(t) = &mut self.exchange {
                    t.heard(now);
                }
            }
            Class::Success => {
                self.exchange = None;
                match wire::decode_exchange_answer(m) {
                    Ok((mac, hosts)) => {
                        self.exchange_ms = self.elapsed_ms(now);
                        self.other = Some((mac, hosts.clone()));
                        if self.cfg.no_direct {
                            self.relaying(now);
                        } else {
                            self.phase = Phase::Checking;
                            self.out
                                .push_back(PeerOutput::CheckNeighbour { mac, hosts });
                        }
                    }
                    Err(e) => {
                        let at = self.cfg.root;
                        self.finish(PeerOutput::Failed(PeerError::Exchange {
                            at,
                            code: 0,
                            reason: e.to_string(),
                        }));
                    }
                }
            }
            Class::Error => {
                let (code, reason) = Self::error_of(m);
                if code == wire::code::TIMEOUT {
                    // The other peer has not asked yet: ask again.
                    self.send_exchange(now);
                    return;
                }
                let at = self.cfg.root;
                self.finish(PeerOutput::Failed(PeerError::Exchange { at, code, reason }));
            }
            Class::Request => {}
        }
    }

    fn on_register(&mut self, now: Instant, m: &Message<'_>) {
        match m.class() {
            Class::Success => self.register = None,
            Class::Error => {
                self.register = None;
                let (code, reason) = Self::error_of(m);
                self.gateway_failed(
                    now,
                    format!("gateway does not speak RAWR: Register answered {code} {reason}"),
                );
            }
            Class::Indication | Class::Request => {}
        }
    }

    fn on_connect(&mut self, now: Instant, m: &Message<'_>) {
        match m.class() {
            Class::Indication => {
                if let Some(t) = &mut self.connect {
                    t.heard(now);
                }
            }
            Class::Success => {
                self.connect = None;
                let relay = match Relay::decode(m) {
                    Ok(r) => r,
                    Err(e) => {
                        let reason = format!("bad Connect answer: {e}");
                        self.connect_failed(now, 0, reason);
                        return;
                    }
                };
                if self.phase == Phase::Relaying {
                    self.finish_relay(now, relay);
                } else {
                    // Exchange (or the direct check) is still running.
                    self.relay = Some(relay);
                }
            }
            Class::Error => {
                let to = self.connect.take().map(|t| t.to);
                let (code, reason) = Self::error_of(m);
                if code == wire::code::BAD_REQUEST && self.connect_target.is_none() {
                    if let Some(to) = to {
                        // A node that requires TARGET-MAC: ask it again with one.
                        self.wildcard_refused = Some(to);
                        if self.phase == Phase::Relaying {
                            self.send_connect(now, to);
                        }
                        return;
                    }
                }
                if code == wire::code::TIMEOUT && self.other.is_none() {
                    // Sent in parallel with an Exchange that is still waiting for the other
                    // peer: the node's pending timeout is not a failure yet; ask again.
                    if let Some(to) = to {
                        self.send_connect(now, to);
                        return;
                    }
                }
                self.connect_failed(now, code, reason);
            }
            Class::Request => {}
        }
    }

    fn connect_failed(&mut self, now: Instant, code: u16, reason: String) {
        if self.via == Some(Via::Gateway) {
            self.gateway_failed(now, format!("gateway Connect failed: {code} {reason}"));
        } else {
            let at = self.cfg.root;
            let gateway = self.gateway_error.clone().unwrap_or_else(|| "none".into());
            self.finish(PeerOutput::Failed(PeerError::Connect {
                at,
                code,
                reason,
                gateway,
            }));
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Finished | Phase::Idle) {
            return;
        }
        if now >= self.start + self.cfg.deadline {
            let d = self.cfg.deadline;
            self.finish(PeerOutput::Failed(PeerError::Deadline(d)));
            return;
        }
        let mut resend = Vec::new();
        let mut dead = [false; 3];
        for (i, t) in [&mut self.exchange, &mut self.register, &mut self.connect]
            .into_iter()
            .enumerate()
        {
            if let Some(tx) = t {
                match tx.poll(now) {
                    TxnPoll::Idle => {}
                    TxnPoll::Retransmit => resend.push((tx.to, tx.bytes.clone())),
                    TxnPoll::Dead => {
                        if let Some(d) = dead.get_mut(i) {
                            *d = true;
                        }
                    }
                }
            }
        }
        for (to, data) in resend {
            self.out.push_back(PeerOutput::Transmit { to, data });
        }
        let [ex_dead, reg_dead, con_dead] = dead;
        if ex_dead {
            let root = self.cfg.root;
            self.finish(PeerOutput::Failed(PeerError::RootUnreachable(root)));
            return;
        }
        if reg_dead {
            self.register = None;
            self.gateway_failed(now, "gateway did not answer Register".into());
        }
        if con_dead {
            let to = self.connect.as_ref().map(|t| t.to);
            self.connect = None;
            if self.via == Some(Via::Gateway) {
                self.gateway_failed(now, format!("gateway {to:?} stopped answering Connect"));
            } else {
                let at = self.cfg.root;
                let gateway = self.gateway_error.clone().unwrap_or_else(|| "none".into());
                self.finish(PeerOutput::Failed(PeerError::ConnectUnreachable {
                    at,
                    gateway,
                }));
            }
        }
    }
}
