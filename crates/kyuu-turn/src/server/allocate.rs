//! The life of an allocation: Allocate (RFC 8656 §7.2) asks the shell to bind relay sockets and
//! answers once they are bound ([`Server::relay_bound`]); Refresh (§7.3) extends or ends it;
//! expiry and the end of a client's stream connection end it too.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_stun::{attr, method, Class, ErrorCode, Message};

use crate::ratelimit::TokenBucket;
use crate::server::allocation::{Allocation, PendingAllocate, RelaySlot};
use crate::server::authenticate::Authed;
use crate::server::metrics::{flush_stats, Stats};
use crate::server::request::{AllocateReq, RefreshReq};
use crate::server::reservation::{Claim, Reservation, RESERVATION_LIFETIME};
use crate::server::Server;
use crate::types::{AllocId, BindFailed, ClientSocket, Family, Output, RelayKey, RelayProto};

/// Ports tried per relayed address before the Allocate fails with 508.
const MAX_BIND_ATTEMPTS: u8 = 16;

impl Server {
    /// The lifetime granted for a requested one: the default at least, `max_lifetime` at most
    /// (RFC 8656 §7.2 step 7 and §7.3).
    fn lifetime(&self, requested: Option<u32>) -> u32 {
        let d = self.cfg.default_lifetime;
        match requested {
            Some(r) => r.clamp(d, self.cfg.max_lifetime),
            None => d,
        }
    }

    /// Allocate (RFC 8656 §7.2; RFC 6062 §5.1 for REQUESTED-TRANSPORT TCP; RFC 8656 §14.6 and
    /// §14.9 for EVEN-PORT and RESERVATION-TOKEN; §14.8 for ADDITIONAL-ADDRESS-FAMILY).
    pub(super) fn allocate(
        &mut self,
        now: Instant,
        client: ClientSocket,
        msg: &Message<'_>,
        auth: Authed,
    ) {
        if self.allocs.id_of(&client).is_some() {
            return self.error(client, msg, ErrorCode::ALLOCATION_MISMATCH, Some(&auth));
        }
        let req = match AllocateReq::decode(msg) {
            Ok(r) => r,
            Err(code) => return self.error(client, msg, code, Some(&auth)),
        };
        if req.proto == RelayProto::Tcp && !client.transport.is_stream() {
            let code = ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL;
            return self.error(client, msg, code, Some(&auth));
        }
        // A reservation token fixes the family and the port.
        let (family, reserved_port) = match req.token {
            None => (req.family, None),
            Some(t) => match self
                .reservations
                .claim(&self.opts.shared.reservations, t, now)
            {
                Claim::Port(f, p) => {
                    self.ports.mark(f, p);
                    (f, Some(p))
                }
                Claim::Gone(free) => {
                    if let Some((f, p)) = free {
                        self.ports.release(f, p);
                    }
                    let code = ErrorCode::INSUFFICIENT_CAPACITY;
                    return self.error(client, msg, code, Some(&auth));
                }
            },
        };
        let release_reserved = |s: &mut Self| {
            if let Some(p) = reserved_port {
                s.ports.release(family, p);
            }
        };
        if self.cfg.relay_ip(family).is_none() {
            release_reserved(self);
            let code = ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED;
            return self.error(client, msg, code, Some(&auth));
        }
        // A draining fleet node sends the client to another node of the client's family,
        // unless `turn.alternate_server` names one explicitly.
        let fleet_alt = match client.remote {
            SocketAddr::V4(_) => self.drain_alternates[0],
            SocketAddr::V6(_) => self.drain_alternates[1],
        };
        let alternate = self
            .cfg
            .alternate_server
            .or(fleet_alt.filter(|_| self.draining));
        if let Some(alt) = alternate {
            release_reserved(self);
            if self.draining {
                metrics::counter!("kyuu_turn_quota_refusals_total", "quota" => "draining_redirected")
                    .increment(1);
            }
            // RFC 8489 §10: send the client elsewhere.
            let resp = self.build(
                method::ALLOCATE,
                Class::Error,
                *msg.transaction_id(),
                Some((&auth.key, auth.kind)),
                |b| {
                    b.add_error_code(ErrorCode::TRY_ALTERNATE)?;
                    b.add_address(attr::ALTERNATE_SERVER, alt)
                },
            );
            return self.send_cached(client, *msg.transaction_id(), resp);
        }
        if self.draining {
            metrics::counter!("kyuu_turn_quota_refusals_total", "quota" => "draining").increment(1);
            release_reserved(self);
            let code = ErrorCode::ALLOCATION_QUOTA_REACHED;
            return self.error(client, msg, code, Some(&auth));
        }
        let quotas = &self.opts.shared.quotas;
        if let Err(which) = quotas.take(&self.cfg, &auth.username, client.remote.ip()) {
            metrics::counter!("kyuu_turn_quota_refusals_total", "quota" => which.label())
                .increment(1);
            release_reserved(self);
            let code = ErrorCode::ALLOCATION_QUOTA_REACHED;
            return self.error(client, msg, code, Some(&auth));
        }
        let lifetime = self.lifetime(req.lifetime);
        let mut new_token = None;
        let port = match reserved_port {
            Some(p) => Some(p),
            None => {
                let p = self
                    .ports
                    .pick(family, req.even_port.is_some(), &mut self.rng);
                if let (Some(p), Some(true)) = (p, req.even_port) {
                    // EVEN-PORT(R): keep the next port for a later Allocate with the token.
                    self.ports.mark(family, p + 1);
                    let t = self.rng.next() ^ self.opts.seed.rotate_left(17);
                    let r = Reservation {
                        family,
                        port: p + 1,
                        expires: now + RESERVATION_LIFETIME,
                    };
                    self.reservations
                        .create(&self.opts.shared.reservations, t, r);
                    new_token = Some(t);
                }
                p
            }
        };
        let Some(port) = port else {
            self.opts
                .shared
                .quotas
                .release(&auth.username, client.remote.ip());
            let code = ErrorCode::INSUFFICIENT_CAPACITY;
            return self.error(client, msg, code, Some(&auth));
        };
        let mut relays = [None, None];
        relays[family.index()] = Some(RelaySlot {
            port,
            bound: None,
            attempts: 0,
        });
        let mut address_error = None;
        if req.also_v6 && family == Family::V4 {
            if self.cfg.relay_ipv6.is_none() {
                address_error = Some((Family::V6, ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED));
            } else if let Some(p6) = self.ports.pick(Family::V6, false, &mut self.rng) {
                relays[Family::V6.index()] = Some(RelaySlot {
                    port: p6,
                    bound: None,
                    attempts: 0,
                });
            } else {
                address_error = Some((Family::V6, ErrorCode::INSUFFICIENT_CAPACITY));
            }
        }
        let waiting = relays.iter().flatten().count() as u8;
        let max_bps = self.cfg.max_bps as f64;
        let id = self.allocs.insert(|id| Allocation {
            id,
            client,
            username: auth.username,
            proto: req.proto,
            dont_fragment: req.dont_fragment,
            relays,
            created: now,
            expires: now + Duration::from_secs(u64::from(lifetime)),
            perms: Vec::new(),
            channels: Vec::new(),
            pending: Some(PendingAllocate {
                tid: *msg.transaction_id(),
                kind: auth.kind,
                key: auth.key,
                lifetime,
                token: new_token,
                address_error,
                waiting,
            }),
            stats: Stats::default(),
            flushed: Stats::default(),
            buckets: [TokenBucket::full(max_bps, now); 2],
            paired: None,
            limit: None,
        });
        for f in Family::BOTH {
            let Some(r) = relays[f.index()] else { continue };
            let Some(ip) = self.cfg.relay_ip(f) else {
                continue;
            };
            self.out.push_back(Output::BindRelay {
                key: RelayKey {
                    alloc: id,
                    family: f,
                },
                addr: SocketAddr::new(ip, r.port),
                proto: req.proto,
                dont_fragment: req.dont_fragment,
            });
        }
        metrics::counter!("kyuu_turn_allocations_total", "transport" => client.transport.label())
            .increment(1);
    }

    /// The shell's answer to [`Output::BindRelay`]: the bound address, or an error (the core then
    /// tries another port, or gives up on the family; with no family left the Allocate fails with
    /// 508, RFC 8656 §7.2).
    pub fn relay_bound(
        &mut self,
        now: Instant,
        key: RelayKey,
        result: Result<SocketAddr, BindFailed>,
    ) {
        let idx = key.family.index();
        let Some(alloc) = self.allocs.get_mut(key.alloc) else {
            if result.is_ok() {
                self.out.push_back(Output::CloseRelay { key });
            }
            return;
        };
        let proto = alloc.proto;
        let dont_fragment = alloc.dont_fragment;
        let reserved = alloc.pending.as_ref().is_some_and(|p| p.token.is_some());
        let Some(slot) = alloc.relays.get_mut(idx).and_then(|s| s.as_mut()) else {
            return;
        };
        match result {
            Ok(addr) => {
                slot.bound = Some(addr);
                if let Some(p) = alloc.pending.as_mut() {
                    p.waiting = p.waiting.saturating_sub(1);
                }
            }
            Err(e) => {
                tracing::debug!(target: "kyuu::turn", port = slot.port, error = %e, "relay bind failed");
                let attempts = slot.attempts;
                // A reserved pair's port cannot move. The failed port stays marked used: someone
                // else holds it.
                if attempts < MAX_BIND_ATTEMPTS && !reserved {
                    if let Some(port) = self.ports.pick(key.family, false, &mut self.rng) {
                        if let Some(Some(slot)) = self
                            .allocs
                            .get_mut(key.alloc)
                            .and_then(|a| a.relays.get_mut(idx))
                        {
                            slot.port = port;
                            slot.attempts = attempts + 1;
                        }
                        if let Some(ip) = self.cfg.relay_ip(key.family) {
                            let addr = SocketAddr::new(ip, port);
                            self.out.push_back(Output::BindRelay {
                                key,
                                addr,
                                proto,
                                dont_fragment,
                            });
                            return;
                        }
                    }
                }
                let Some(alloc) = self.allocs.get_mut(key.alloc) else {
                    return;
                };
                alloc.relays[idx] = None;
                let other_live = alloc.relays.iter().flatten().next().is_some();
                if let Some(p) = alloc.pending.as_mut() {
                    p.waiting = p.waiting.saturating_sub(1);
                    if other_live {
                        p.address_error = Some((key.family, ErrorCode::INSUFFICIENT_CAPACITY));
                    }
                }
                if !other_live {
                    return self.fail_pending(now, key.alloc, ErrorCode::INSUFFICIENT_CAPACITY);
                }
            }
        }
        self.finish_allocate(now, key.alloc);
    }

    /// Answers a pending Allocate once every relay socket is bound (RFC 8656 §7.2 step 10ff:
    /// XOR-RELAYED-ADDRESS per family, LIFETIME, RESERVATION-TOKEN, XOR-MAPPED-ADDRESS).
    fn finish_allocate(&mut self, now: Instant, id: AllocId) {
        let Some(alloc) = self.allocs.get_mut(id) else {
            return;
        };
        if alloc.pending.as_ref().is_none_or(|p| p.waiting > 0) {
            return;
        }
        let Some(p) = alloc.pending.take() else {
            return;
        };
        let client = alloc.client;
        alloc.expires = now + Duration::from_secs(u64::from(p.lifetime));
        let relayed = Family::BOTH.map(|f| alloc.relayed(f).map(|a| self.cfg.advertised(a)));
        let resp = self.build(
            method::ALLOCATE,
            Class::Success,
            p.tid,
            Some((&p.key, p.kind)),
            |b| {
                for a in relayed.iter().flatten() {
                    b.add_xor_address(attr::XOR_RELAYED_ADDRESS, *a)?;
                }
                if let Some((family, code)) = p.address_error {
                    b.add_address_error(family.code(), code.code(), "")?;
                }
                b.add_u32(attr::LIFETIME, p.lifetime)?;
                if let Some(t) = p.token {
                    b.add_u64(attr::RESERVATION_TOKEN, t)?;
                }
                b.add_xor_address(attr::XOR_MAPPED_ADDRESS, client.remote)
            },
        );
        self.send_cached(client, p.tid, resp);
        if let Some(user) = self.allocs.get(id).map(|a| a.username.clone()) {
            self.try_link(now, &user);
        }
    }

    fn fail_pending(&mut self, now: Instant, id: AllocId, code: ErrorCode) {
        let Some(alloc) = self.allocs.get_mut(id) else {
            return;
        };
        let Some(p) = alloc.pending.take() else {
            return;
        };
        let client = alloc.client;
        let resp = self.build(
            method::ALLOCATE,
            Class::Error,
            p.tid,
            Some((&p.key, p.kind)),
            |b| b.add_error_code(code),
        );
        self.send_cached(client, p.tid, resp);
        self.delete_allocation(now, id, "relay bind failed");
    }

    /// Ends an allocation: frees its ports and quota, closes its sockets and connections, logs
    /// its traffic.
    pub(super) fn delete_allocation(&mut self, now: Instant, id: AllocId, why: &str) {
        let Some(mut a) = self.allocs.remove(id) else {
            return;
        };
        self.fast_path_sync(now, Some(id));
        self.unlink(id, a.paired.take());
        for f in Family::BOTH {
            let Some(r) = a.relays[f.index()] else {
                continue;
            };
            self.ports.release(f, r.port);
            if r.bound.is_some() {
                let key = RelayKey {
                    alloc: id,
                    family: f,
                };
                self.out.push_back(Output::CloseRelay { key });
            }
        }
        for connection_id in self.conns.remove_for(id) {
            self.out
                .push_back(Output::ClosePeerConnection { connection_id });
        }
        self.opts
            .shared
            .quotas
            .release(&a.username, a.client.remote.ip());
        flush_stats(&mut a);
        let s = a.stats;
        tracing::info!(
            target: "kyuu::turn",
            client = %a.client.remote,
            transport = a.client.transport.label(),
            user = %a.username,
            relayed_v4 = ?a.relayed(Family::V4),
            relayed_v6 = ?a.relayed(Family::V6),
            duration_s = now.saturating_duration_since(a.created).as_secs_f64(),
            to_peer_packets = s.to_peer_pkts,
            to_peer_bytes = s.to_peer_bytes,
            to_client_packets = s.to_client_pkts,
            to_client_bytes = s.to_client_bytes,
            reason = why,
            "allocation ended"
        );
    }

    /// Refresh (RFC 8656 §7.3): a new lifetime, or 0 to delete the allocation now.
    pub(super) fn refresh(
        &mut self,
        now: Instant,
        msg: &Message<'_>,
        auth: Authed,
        id: AllocId,
        client: ClientSocket,
    ) {
        let req = match RefreshReq::decode(msg) {
            Ok(r) => r,
            Err(code) => return self.error(client, msg, code, Some(&auth)),
        };
        if let Some(f) = req.family {
            if !self.allocs.get(id).is_some_and(|a| a.has_family(f)) {
                let code = ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH;
                return self.error(client, msg, code, Some(&auth));
            }
        }
        let lifetime = match req.lifetime {
            Some(0) => 0,
            requested => self.lifetime(requested),
        };
        let tid = *msg.transaction_id();
        let resp = self.build(
            method::REFRESH,
            Class::Success,
            tid,
            Some((&auth.key, auth.kind)),
            |b| b.add_u32(attr::LIFETIME, lifetime),
        );
        if lifetime == 0 {
            self.delete_allocation(now, id, "refreshed to zero");
        } else if let Some(a) = self.allocs.get_mut(id) {
            a.expires = now + Duration::from_secs(u64::from(lifetime));
        }
        self.send_cached(client, tid, resp);
    }
}
