//! TCP relaying ([RFC 6062]): Connect (§5.2) opens a connection from a TCP allocation's relayed
//! address to a peer, a peer connecting in is announced with ConnectionAttempt (§5.3), and
//! ConnectionBind (§5.4) on a new client connection joins the two; from then on the shell pipes
//! bytes and the core is no longer involved.
//!
//! [RFC 6062]: https://www.rfc-editor.org/rfc/rfc6062

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_stun::integrity::{IntegrityKind, Key};
use kyuu_stun::{attr, method, Class, ErrorCode, Message, TransactionId};

use crate::server::allocation::PERMISSION_LIFETIME;
use crate::server::authenticate::Authed;
use crate::server::metrics::Dropped;
use crate::server::request::{ConnectReq, ConnectionBindReq};
use crate::server::rng::Rng;
use crate::server::Server;
use crate::types::{
    AllocId, ClientSocket, ConnectionId, Family, Output, PeerAddr, RelayKey, RelayProto, Transmit,
};

/// A peer connection not claimed by ConnectionBind within 30 s is closed (RFC 6062 §5.3).
const CONNECTION_BIND_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, PartialEq, Eq)]
enum PeerConnState {
    /// Connect sent to the shell; answer the client's Connect when it completes.
    Connecting {
        tid: TransactionId,
        kind: IntegrityKind,
        key: Key,
    },
    /// Waiting for the client's ConnectionBind.
    Ready,
}

#[derive(Debug)]
struct PeerConn {
    alloc: AllocId,
    peer: SocketAddr,
    state: PeerConnState,
    expires: Instant,
}

/// Peer connections by id, until bound or expired.
#[derive(Debug, Default)]
pub(crate) struct Connections(HashMap<ConnectionId, PeerConn>);

impl Connections {
    fn new_id(&self, rng: &mut Rng) -> ConnectionId {
        // Bounded: the table is far smaller than 2^32 ids, so a free one comes up at once.
        for _ in 0..64 {
            let id = ConnectionId::new(rng.next() as u32);
            if id.get() != 0 && !self.0.contains_key(&id) {
                return id;
            }
        }
        ConnectionId::new((rng.next() as u32) | 1)
    }

    /// Removes the connections past their deadline; returns their ids for the shell to close.
    pub fn expire(&mut self, now: Instant) -> Vec<ConnectionId> {
        let stale: Vec<ConnectionId> = self
            .0
            .iter()
            .filter(|(_, c)| c.expires <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in &stale {
            self.0.remove(id);
        }
        stale
    }

    /// Removes the connections of an allocation that ended.
    pub fn remove_for(&mut self, alloc: AllocId) -> Vec<ConnectionId> {
        let ids: Vec<ConnectionId> = self
            .0
            .iter()
            .filter(|(_, c)| c.alloc == alloc)
            .map(|(k, _)| *k)
            .collect();
        for id in &ids {
            self.0.remove(id);
        }
        ids
    }
}

impl Server {
    /// The shell's answer to [`Output::ConnectPeer`]: the Connect succeeds with CONNECTION-ID or
    /// fails with 447 (RFC 6062 §5.2).
    pub fn peer_connected(&mut self, now: Instant, connection_id: ConnectionId, ok: bool) {
        let Some(conn) = self.conns.0.get_mut(&connection_id) else {
            if ok {
                self.out
                    .push_back(Output::ClosePeerConnection { connection_id });
            }
            return;
        };
        let PeerConnState::Connecting { tid, kind, key } =
            std::mem::replace(&mut conn.state, PeerConnState::Ready)
        else {
            return;
        };
        conn.expires = now + CONNECTION_BIND_TIMEOUT;
        let Some(client) = self.allocs.get(conn.alloc).map(|a| a.client) else {
            self.conns.0.remove(&connection_id);
            return;
        };
        let auth = Some((&key, kind));
        let resp = if ok {
            self.build(method::CONNECT, Class::Success, tid, auth, |b| {
                b.add_u32(attr::CONNECTION_ID, connection_id.get())
            })
        } else {
            self.conns.0.remove(&connection_id);
            self.build(method::CONNECT, Class::Error, tid, auth, |b| {
                b.add_error_code(ErrorCode::CONNECTION_TIMEOUT_OR_FAILURE)
            })
        };
        self.send_cached(client, tid, resp);
    }

    /// A peer connected to a TCP allocation's relayed address (RFC 6062 §5.3). Returns the
    /// connection id the shell keeps the connection under, or `None` to refuse it (no
    /// permission); the client is told with a ConnectionAttempt indication.
    pub fn peer_connection_accepted(
        &mut self,
        now: Instant,
        relay: RelayKey,
        peer: PeerAddr,
    ) -> Option<ConnectionId> {
        let alloc = self.allocs.get(relay.alloc)?;
        if !alloc.permitted(peer.addr().ip(), now) {
            self.counters.drop(Dropped::NoPermission);
            return None;
        }
        let client = alloc.client;
        let id = self.conns.new_id(&mut self.rng);
        self.conns.0.insert(
            id,
            PeerConn {
                alloc: relay.alloc,
                peer: peer.addr(),
                state: PeerConnState::Ready,
                expires: now + CONNECTION_BIND_TIMEOUT,
            },
        );
        let tid = self.rng.tid();
        let msg = self.build(
            method::CONNECTION_ATTEMPT,
            Class::Indication,
            tid,
            None,
            |b| {
                b.add_xor_address(attr::XOR_PEER_ADDRESS, peer.addr())?;
                b.add_u32(attr::CONNECTION_ID, id.get())
            },
        );
        if let Some(data) = msg {
            self.out
                .push_back(Output::Transmit(Transmit { client, data }));
        }
        Some(id)
    }

    /// A peer connection of RFC 6062 closed.
    pub fn peer_connection_closed(&mut self, connection_id: ConnectionId) {
        self.conns.0.remove(&connection_id);
    }

    /// Connect (RFC 6062 §5.2): asks the shell to connect to the peer; answered when it has.
    pub(super) fn connect(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
        client: ClientSocket,
    ) {
        let peer = match ConnectReq::decode(msg) {
            Ok(r) => r.peer,
            Err(code) => return self.error(client, msg, code, Some(&auth)),
        };
        if self
            .allocs
            .get(id)
            .is_some_and(|a| a.proto != RelayProto::Tcp)
        {
            return self.error(client, msg, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        if let Err(code) = self.check_peer(id, peer) {
            return self.error(client, msg, code, Some(&auth));
        }
        if self
            .conns
            .0
            .values()
            .any(|c| c.alloc == id && c.peer == peer)
        {
            return self.error(
                client,
                msg,
                ErrorCode::CONNECTION_ALREADY_EXISTS,
                Some(&auth),
            );
        }
        let connection_id = self.conns.new_id(&mut self.rng);
        if let Some(a) = self.allocs.get_mut(id) {
            // A Connect implies a permission for the peer (RFC 6062 §5.2).
            a.add_permission(peer.ip(), now + PERMISSION_LIFETIME);
        }
        self.conns.0.insert(
            connection_id,
            PeerConn {
                alloc: id,
                peer,
                state: PeerConnState::Connecting {
                    tid: *msg.transaction_id(),
                    kind: auth.kind,
                    key: auth.key,
                },
                expires: now + CONNECTION_BIND_TIMEOUT,
            },
        );
        self.out.push_back(Output::ConnectPeer {
            key: RelayKey {
                alloc: id,
                family: Family::of(&peer),
            },
            connection_id,
            peer: PeerAddr::new(peer),
        });
    }

    /// ConnectionBind (RFC 6062 §5.4), on a new client connection without an allocation, by the
    /// user who owns the allocation.
    pub(super) fn connection_bind(
        &mut self,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
    ) {
        if !client.transport.is_stream() || self.allocs.id_of(&client).is_some() {
            return self.error(client, msg, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let connection_id = match ConnectionBindReq::decode(msg) {
            Ok(r) => r.connection_id,
            Err(code) => return self.error(client, msg, code, Some(&auth)),
        };
        let Some(conn) = self.conns.0.get(&connection_id) else {
            return self.error(client, msg, ErrorCode::BAD_REQUEST, Some(&auth));
        };
        if conn.state != PeerConnState::Ready {
            return self.error(client, msg, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let owner = self.allocs.get(conn.alloc).map(|a| a.username.as_str());
        if owner != Some(auth.username.as_str()) {
            return self.error(client, msg, ErrorCode::WRONG_CREDENTIALS, Some(&auth));
        }
        self.conns.0.remove(&connection_id);
        let resp = self.build(
            method::CONNECTION_BIND,
            Class::Success,
            *msg.transaction_id(),
            Some((&auth.key, auth.kind)),
            |_| Ok(()),
        );
        // Not cached: after this answer the connection is a byte pipe.
        self.send(client, resp);
        self.out.push_back(Output::SpliceConnection {
            client,
            connection_id,
        });
    }
}
