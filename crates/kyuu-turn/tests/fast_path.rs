//! The core's side of the kernel fast path: which channels it announces
//! ([`Output::FastPathInstall`] / [`Output::FastPathRemove`]) and when they are withdrawn
//! (permission expiry, allocation deletion, a peer forbidden by reconfiguration, a spent
//! `max_bps` budget), and kernel traffic counted back.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use kyuu_turn::{FastPathChannel, FastPathId, Output, TurnConfig};

fn installs(p: &mut Pair) -> Vec<FastPathChannel> {
    let mut v = Vec::new();
    p.other.retain(|o| match o {
        Output::FastPathInstall(c) => {
            v.push(*c);
            false
        }
        _ => true,
    });
    v
}

fn removes(p: &mut Pair) -> Vec<FastPathId> {
    let mut v = Vec::new();
    p.other.retain(|o| match o {
        Output::FastPathRemove(id) => {
            v.push(*id);
            false
        }
        _ => true,
    });
    v
}

fn bound(cfg: TurnConfig) -> (Pair, FastPathChannel) {
    let mut p = Pair::new(cfg);
    p.server.enable_fast_path();
    p.allocate();
    p.bind_channel(0x4001, peer());
    let got = installs(&mut p);
    assert_eq!(got.len(), 1, "one entry per bound channel: {got:?}");
    (p, got[0])
}

#[test]
fn nothing_is_announced_unless_the_shell_enabled_the_fast_path() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.bind_channel(0x4001, peer());
    p.advance(Duration::from_secs(2));
    assert!(installs(&mut p).is_empty());
    assert_eq!(p.server.fast_path_entries(), 0);
}

#[test]
fn a_bound_channel_is_announced_with_its_addresses_and_the_permission_expiry() {
    let (p, c) = bound(cfg());
    assert_eq!(c.id.channel, 0x4001);
    assert_eq!(c.client, p.sock);
    assert_eq!(c.peer, peer());
    assert_eq!(c.relay.ip().to_string(), "198.51.100.1");
    assert!(c.to_peer && c.to_client);
    // The permission (5 min) ends before the binding (10 min).
    assert_eq!(c.expires, p.now + Duration::from_secs(300));
}

#[test]
fn the_entry_goes_when_the_permission_expires_and_a_refresh_moves_its_expiry() {
    let (mut p, c) = bound(cfg());
    p.advance(Duration::from_secs(200));
    p.client.create_permission(p.now, &[peer()]);
    p.run();
    let refreshed = installs(&mut p);
    assert_eq!(refreshed.len(), 1);
    assert_eq!(refreshed[0].expires, p.now + Duration::from_secs(300));
    assert!(removes(&mut p).is_empty());
    p.advance(Duration::from_secs(301));
    assert_eq!(removes(&mut p), vec![c.id]);
    assert_eq!(p.server.fast_path_entries(), 0);
    // Userspace agrees: no permission, nothing relayed.
    assert_eq!(p.channel_data(0x4001, b"late"), None);
}

#[test]
fn the_entry_goes_with_the_allocation() {
    let (mut p, c) = bound(cfg());
    p.client.refresh(p.now, 0);
    p.run();
    assert_eq!(removes(&mut p), vec![c.id]);
}

#[test]
fn a_peer_forbidden_by_reconfiguration_is_withdrawn_at_the_next_tick() {
    let (mut p, c) = bound(cfg());
    let mut cfg = cfg();
    cfg.deny_peers = vec![format!("{}/32", peer().ip()).parse().unwrap()];
    p.server.reconfigure(cfg).unwrap();
    p.advance(Duration::from_secs(2));
    assert_eq!(removes(&mut p), vec![c.id]);
}

#[test]
fn stream_clients_stay_in_userspace() {
    let mut p = Pair::tcp(cfg());
    p.server.enable_fast_path();
    p.allocate();
    p.bind_channel(0x4001, peer());
    p.advance(Duration::from_secs(2));
    assert!(installs(&mut p).is_empty());
}

#[test]
fn kernel_bytes_spend_the_budget_and_the_direction_comes_back_when_it_refills() {
    let cfg = TurnConfig {
        max_bps: 1000,
        ..cfg()
    };
    let (mut p, c) = bound(cfg);
    // The kernel relayed 5 s worth of the cap to the peer in one tick.
    p.server.fast_path_traffic(p.now, c.id, (50, 5000), (0, 0));
    p.advance(Duration::from_secs(1));
    let now = installs(&mut p);
    assert_eq!(now.len(), 1);
    assert!(
        !now[0].to_peer && now[0].to_client,
        "to-peer withdrawn: {now:?}"
    );
    // Userspace refuses too until the debt is repaid.
    assert_eq!(p.channel_data(0x4001, b"x"), None);
    p.advance(Duration::from_secs(5));
    let back = installs(&mut p);
    assert_eq!(back.len(), 1);
    assert!(back[0].to_peer, "budget refilled: {back:?}");
}
