//! A thin tokio wrapper around [`crate::turn::Client`] over one UDP socket: allocate, permit,
//! send and receive through the relay, one request at a time. The RAWR lab, RAWR tests and
//! `kyuu lab` use it to push data through the relay a RAWR answer names; real peers use their
//! WebRTC stack's TURN client.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

use crate::turn::{Client, Event};

/// Why a TURN operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("no answer from TURN server {0}")]
    NoAnswer(SocketAddr),
    #[error("TURN server {server} answered {code} {reason}")]
    Rejected {
        server: SocketAddr,
        code: u16,
        reason: String,
    },
    #[error("malformed answer: {0}")]
    Malformed(&'static str),
}

/// An allocation on a TURN server, over `sock`.
#[derive(Debug)]
pub struct Allocation {
    pub sock: UdpSocket,
    pub server: SocketAddr,
    pub relayed: SocketAddr,
    pub mapped: Option<SocketAddr>,
    client: Client,
    /// Data indications that arrived while a request was outstanding.
    data: VecDeque<(SocketAddr, Vec<u8>)>,
}

/// 300 Try Alternate answers followed by [`Allocation::new`] before giving up.
const MAX_REDIRECTS: usize = 3;

/// Longest wait for one answer; the client's own schedule gives up first (39.5 s).
const MAX_WAIT: Duration = Duration::from_secs(60);

impl Allocation {
    /// Allocates a UDP relay at `server` with long-term credentials (answering the server's
    /// 401 challenge).
    pub async fn new(
        sock: UdpSocket,
        server: SocketAddr,
        username: &str,
        password: &str,
    ) -> Result<Allocation, TurnError> {
        let mut a = Allocation {
            sock,
            server,
            relayed: SocketAddr::from(([0, 0, 0, 0], 0)),
            mapped: None,
            client: Client::new(username, password, false),
            data: VecDeque::new(),
        };
        // 300 Try Alternate (a draining fleet node): start over at the alternate server, with
        // the same credentials (RFC 8489 §10), a bounded number of times.
        for _ in 0..=MAX_REDIRECTS {
            a.client.allocate(Instant::now());
            match a.answer().await? {
                Event::Allocated {
                    relayed, mapped, ..
                } => {
                    a.relayed = *relayed
                        .first()
                        .ok_or(TurnError::Malformed("no XOR-RELAYED-ADDRESS"))?;
                    a.mapped = mapped;
                    return Ok(a);
                }
                Event::TryAlternate { alternate, .. } => {
                    a.server = alternate;
                    a.client = Client::new(username, password, false);
                }
                _ => return Err(TurnError::Malformed("unexpected answer to Allocate")),
            }
        }
        Err(TurnError::Malformed("too many 300 Try Alternate redirects"))
    }

    /// Ends the allocation (Refresh with lifetime 0, RFC 8656 §7.3).
    pub async fn delete(&mut self) -> Result<(), TurnError> {
        self.client.refresh(Instant::now(), 0);
        self.answer().await.map(|_| ())
    }

    /// Installs a permission for `peer`.
    pub async fn permit(&mut self, peer: IpAddr) -> Result<(), TurnError> {
        self.client
            .create_permission(Instant::now(), &[SocketAddr::new(peer, 0)]);
        match self.answer().await? {
            Event::PermissionCreated => Ok(()),
            _ => Err(TurnError::Malformed(
                "unexpected answer to CreatePermission",
            )),
        }
    }

    /// Sends `data` to `peer` through the relay (Send indication).
    pub async fn send_to(&mut self, data: &[u8], peer: SocketAddr) -> Result<(), TurnError> {
        self.client.send_indication(peer, data);
        self.flush().await
    }

    /// Receives the next Data indication or ChannelData from the relay: `(peer, data)`.
    /// Cancel-safe between datagrams.
    pub async fn recv_from(&mut self) -> Result<(SocketAddr, Vec<u8>), TurnError> {
        let mut buf = vec![0u8; 2048];
        for _ in 0..10_000 {
            if let Some(d) = self.data.pop_front() {
                return Ok(d);
            }
            let (n, from) = self.sock.recv_from(&mut buf).await?;
            if from == self.server {
                self.client
                    .handle_input(Instant::now(), buf.get(..n).unwrap_or(&[]));
                self.drain_data();
            }
        }
        Err(TurnError::Malformed("no Data indication"))
    }

    async fn flush(&mut self) -> Result<(), TurnError> {
        while let Some(t) = self.client.poll_transmit() {
            self.sock.send_to(&t, self.server).await?;
        }
        Ok(())
    }

    /// Keeps Data events for [`Allocation::recv_from`]; returns the first other event.
    fn drain_data(&mut self) -> Option<Event> {
        while let Some(ev) = self.client.poll_event() {
            match ev {
                Event::Data { peer, data } => self.data.push_back((peer, data)),
                other => return Some(other),
            }
        }
        None
    }

    /// Drives the one outstanding request to its answer: an event, or the error it means.
    async fn answer(&mut self) -> Result<Event, TurnError> {
        let mut buf = vec![0u8; 2048];
        let started = Instant::now();
        // Bounded: every round either reads a datagram or passes a retransmission deadline, and
        // the client gives up after its schedule (or MAX_WAIT passes).
        while started.elapsed() < MAX_WAIT {
            self.flush().await?;
            if let Some(ev) = self.drain_data() {
                return match ev {
                    Event::Error { code, reason, .. } => Err(TurnError::Rejected {
                        server: self.server,
                        code,
                        reason,
                    }),
                    Event::Timeout { .. } => Err(TurnError::NoAnswer(self.server)),
                    other => Ok(other),
                };
            }
            let wake = self
                .client
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + MAX_WAIT);
            let read = tokio::time::timeout_at(
                tokio::time::Instant::from_std(wake),
                self.sock.recv_from(&mut buf),
            )
            .await;
            match read {
                Ok(r) => {
                    let (n, from) = r?;
                    if from == self.server {
                        self.client
                            .handle_input(Instant::now(), buf.get(..n).unwrap_or(&[]));
                    }
                }
                Err(_) => self.client.handle_timeout(Instant::now()),
            }
        }
        Err(TurnError::NoAnswer(self.server))
    }
}
