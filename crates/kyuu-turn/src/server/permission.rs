//! CreatePermission (RFC 8656 §9.2) and ChannelBind (§12.2): what a client may send to and hear
//! from, checked against the peer policy and the permission limit.

use std::net::SocketAddr;
use std::time::Instant;

use kyuu_stun::{method, ErrorCode, Message};

use crate::server::allocation::PERMISSION_LIFETIME;
use crate::server::authenticate::Authed;
use crate::server::metrics::Dropped;
use crate::server::request::{ChannelBindReq, CreatePermissionReq};
use crate::server::Server;
use crate::types::{AllocId, ClientSocket, Family, RelayProto};

impl Server {
    /// Checks a peer address against the allocation's families (443, RFC 8656 §9.2) and the peer
    /// policy (403, §19 and RFC 8656 §21.1 on relaying to internal addresses).
    pub(super) fn check_peer(&mut self, id: AllocId, peer: SocketAddr) -> Result<(), ErrorCode> {
        let Some(a) = self.allocs.get(id) else {
            return Err(ErrorCode::ALLOCATION_MISMATCH);
        };
        if !a.has_family(Family::of(&peer)) {
            return Err(ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        // The paired allocation (RAWR, `pairing.rs`) is reached in-process: no policy applies.
        let paired = a.paired.is_some_and(|l| l.is_other(peer));
        if !paired && !self.policy.permits(peer.ip()) {
            self.counters.drop(Dropped::ForbiddenPeer);
            metrics::counter!("kyuu_turn_forbidden_peers_total").increment(1);
            return Err(ErrorCode::FORBIDDEN);
        }
        Ok(())
    }

    /// CreatePermission (RFC 8656 §9.2): installs or refreshes a permission per peer IP, all or
    /// none; 508 past `max_permissions`.
    pub(super) fn create_permission(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
        client: ClientSocket,
    ) {
        let peers = match CreatePermissionReq::decode(msg) {
            Ok(r) => r.peers,
            Err(code) => return self.error(client, msg, code, Some(&auth)),
        };
        for p in &peers {
            if let Err(code) = self.check_peer(id, *p) {
                return self.error(client, msg, code, Some(&auth));
            }
        }
        let max = self.cfg.max_permissions as usize;
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        let new = peers
            .iter()
            .filter(|p| !a.perms.iter().any(|(ip, _)| *ip == p.ip()))
            .count();
        if a.perms.len() + new > max {
            return self.error(client, msg, ErrorCode::INSUFFICIENT_CAPACITY, Some(&auth));
        }
        for p in &peers {
            a.add_permission(p.ip(), now + PERMISSION_LIFETIME);
        }
        self.reply_ok(client, msg, method::CREATE_PERMISSION, &auth);
    }

    /// ChannelBind (RFC 8656 §12.2): binds or refreshes a channel number to a peer, which also
    /// installs a permission. A number and a peer belong together until five minutes after the
    /// binding expires.
    pub(super) fn channel_bind(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
        client: ClientSocket,
    ) {
        let ChannelBindReq { number, peer } =
            match ChannelBindReq::decode(msg, self.cfg.strict_channel_numbers) {
                Ok(r) => r,
                Err(code) => return self.error(client, msg, code, Some(&auth)),
            };
        if self
            .allocs
            .get(id)
            .is_some_and(|a| a.proto != RelayProto::Udp)
        {
            return self.error(client, msg, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        if let Err(code) = self.check_peer(id, peer) {
            return self.error(client, msg, code, Some(&auth));
        }
        let max = self.cfg.max_permissions as usize;
        let Some(a) = self.allocs.get_mut(id) else {
            return;
        };
        if a.channel_conflict(number, peer, now) {
            return self.error(client, msg, ErrorCode::BAD_REQUEST, Some(&auth));
        }
        let new_perm = !a.perms.iter().any(|(ip, _)| *ip == peer.ip());
        if new_perm && a.perms.len() >= max {
            return self.error(client, msg, ErrorCode::INSUFFICIENT_CAPACITY, Some(&auth));
        }
        a.bind_channel(number, peer, now);
        self.reply_ok(client, msg, method::CHANNEL_BIND, &auth);
    }
}
