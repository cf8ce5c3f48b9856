//! Refresh (RFC 8656 §7.3), expiry, and retransmitted requests.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use kyuu_client::turn::Event;
use kyuu_stun::ErrorCode;
use kyuu_turn::Output;

#[test]
fn refresh_without_an_allocation_gets_437() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.sock.remote = "203.0.113.5:40001".parse().unwrap();
    p.client.refresh(p.now, 600);
    p.expect_error(ErrorCode::ALLOCATION_MISMATCH);
}

#[test]
fn a_lifetime_below_the_default_is_raised_to_the_default() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.refresh(p.now, 10);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 600 }]);
}

#[test]
fn a_retransmitted_refresh_gets_the_cached_answer() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.refresh(p.now, 700);
    let req = p.client.poll_transmit().unwrap();
    let first = p.exchange(&req).unwrap();
    let again = p.exchange(&req).unwrap();
    assert_eq!(first, again);
}

#[test]
fn a_retransmitted_refresh_to_zero_is_answered_and_not_executed_twice() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.refresh(p.now, 0);
    let req = p.client.poll_transmit().unwrap();
    let first = p.exchange(&req).unwrap();
    assert_eq!(p.server.allocation_count(), 0);
    // Without the cache the retransmission would get 437.
    assert_eq!(p.exchange(&req).unwrap(), first);
}

#[test]
fn an_allocation_expires_and_its_relay_socket_is_closed() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.advance(Duration::from_secs(599));
    assert_eq!(p.server.allocation_count(), 1);
    p.advance(Duration::from_secs(2));
    assert_eq!(p.server.allocation_count(), 0);
    assert!(p
        .other
        .iter()
        .any(|o| matches!(o, Output::CloseRelay { .. })));
}

#[test]
fn a_refresh_extends_the_allocation() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.advance(Duration::from_secs(500));
    p.client.refresh(p.now, 600);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 600 }]);
    p.advance(Duration::from_secs(500));
    assert_eq!(p.server.allocation_count(), 1);
}

#[test]
fn refresh_to_zero_deletes_the_allocation_at_once() {
    let mut p = Pair::new(cfg());
    p.allocate();
    p.client.refresh(p.now, 0);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 0 }]);
    assert_eq!(p.server.allocation_count(), 0);
}
