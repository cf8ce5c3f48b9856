//! Long-term credentials (RFC 8489 §9.2), TURN REST credentials, and the limit on
//! unauthenticated answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use kyuu_client::turn::{Client, Event};
use kyuu_stun::{attr, method, ErrorCode, Message};
use kyuu_turn::{rest_credentials, Transport};

fn pair_as(user: &str, password: &str) -> Pair {
    Pair::with(cfg(), Client::new(user, password, false), Transport::Udp)
}

#[test]
fn a_wrong_password_gets_401() {
    let mut p = pair_as("alice", "wrong");
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::UNAUTHORIZED);
}

#[test]
fn an_unknown_user_gets_401() {
    let mut p = pair_as("mallory", "x");
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::UNAUTHORIZED);
}

#[test]
fn an_unauthenticated_request_gets_401_with_realm_nonce_and_password_algorithms() {
    let mut p = Pair::new(cfg());
    let req = raw_request(method::ALLOCATE, |b| b.add_requested_transport(17).unwrap());
    let t = p.exchange(&req).unwrap();
    let m = Message::parse(&t.data).unwrap();
    assert_eq!(error_code(&t.data), Some(401));
    assert!(m.nonce().is_some() && m.realm().is_some());
    assert!(m.has(attr::PASSWORD_ALGORITHMS));
}

#[test]
fn a_forged_nonce_gets_438() {
    let mut p = Pair::new(cfg());
    let req = raw_request(method::ALLOCATE, |b| {
        b.add_requested_transport(17).unwrap();
        b.add(attr::USERNAME, b"alice").unwrap();
        b.add(attr::REALM, b"kyuu").unwrap();
        b.add(attr::NONCE, b"obMatJos2AAAAforgedforgedforgedforged")
            .unwrap();
        b.add_integrity(&alice_key()).unwrap();
    });
    let t = p.exchange(&req).unwrap();
    assert_eq!(error_code(&t.data), Some(438));
}

#[test]
fn integrity_without_username_and_realm_gets_400() {
    let mut p = Pair::new(cfg());
    let req = raw_request(method::ALLOCATE, |b| {
        b.add_requested_transport(17).unwrap();
        b.add_integrity(&alice_key()).unwrap();
    });
    let t = p.exchange(&req).unwrap();
    assert_eq!(error_code(&t.data), Some(400));
}

#[test]
fn a_stale_nonce_gets_438_and_the_retry_with_the_fresh_nonce_succeeds() {
    let mut c = cfg();
    c.default_lifetime = 1200;
    let mut p = Pair::new(c);
    p.allocate();
    p.advance(Duration::from_secs(601));
    p.client.refresh(p.now, 1200);
    // The client handles the 438 itself and retries; the only event is the success.
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 1200 }]);
}

#[test]
fn rest_credentials_from_either_of_two_rotated_secrets_are_accepted() {
    let mut c = cfg();
    c.static_auth_secrets = vec!["old".into(), "new".into()];
    for secret in ["old", "new"] {
        let (u, pw) = rest_credentials(secret, "bob", UNIX0, 3600);
        let mut p = Pair::with(c.clone(), Client::new(&u, &pw, false), Transport::Udp);
        p.allocate();
    }
}

#[test]
fn expired_rest_credentials_get_401() {
    let (u, pw) = rest_credentials("rest-secret", "bob", UNIX0 - 7200, 3600);
    let mut p = pair_as(&u, &pw);
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::UNAUTHORIZED);
}

#[test]
fn rest_credentials_from_an_unknown_secret_get_401() {
    let (u, pw) = rest_credentials("unknown", "bob", UNIX0, 3600);
    let mut p = pair_as(&u, &pw);
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::UNAUTHORIZED);
}

#[test]
fn the_sha256_password_algorithm_is_accepted() {
    let client = Client::new("alice", "secret", false).with_sha256();
    let mut p = Pair::with(cfg(), client, Transport::Udp);
    p.allocate();
}

#[test]
fn userhash_instead_of_username_is_accepted() {
    let client = Client::new("alice", "secret", false).with_userhash();
    let mut p = Pair::with(cfg(), client, Transport::Udp);
    p.allocate();
}

#[test]
fn another_user_on_an_existing_allocation_gets_441() {
    let mut c = cfg();
    c.users.push(user("bob", "pw"));
    let mut p = Pair::with(c, Client::new("bob", "pw", false), Transport::Udp);
    p.allocate();
    p.client = Client::new("alice", "secret", false);
    p.client.refresh(p.now, 600);
    p.expect_error(ErrorCode::WRONG_CREDENTIALS);
}

#[test]
fn unauthenticated_answers_are_rate_limited_per_source() {
    let mut c = cfg();
    c.unauth_rate = 5;
    c.unauth_burst = 5;
    let mut p = Pair::new(c);
    let req = raw_request(method::BINDING, |_| {});
    let mut answered = 0;
    for _ in 0..50 {
        p.server.handle_client(p.now, p.sock, &req);
        while p.server.poll_output().is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 5);
    p.advance(Duration::from_secs(1));
    p.server.handle_client(p.now, p.sock, &req);
    assert!(p.server.poll_output().is_some());
}

#[test]
fn answers_to_authenticated_requests_are_signed_with_the_requests_key() {
    let mut p = Pair::new(cfg());
    p.allocate();
    let req = p.authed_request(method::REFRESH, |_| {});
    let t = p.exchange(&req).unwrap();
    let m = Message::parse(&t.data).unwrap();
    assert!(m.verify_integrity(&alice_key()).is_ok());
    assert_eq!(m.error_code().map(|e| e.map(|e| e.code)), None);
}

/// A short-lived REST credential starts an allocation; after it expires, the allocation is still
/// refreshed (with a stale-nonce round on the way), while a new Allocate with it is refused.
#[test]
fn refresh_outlives_a_short_rest_credential() {
    let (u, pw) = rest_credentials("rest-secret", "bob", UNIX0, 60);
    let mut p = pair_as(&u, &pw);
    p.allocate();
    p.advance(Duration::from_secs(300));
    p.client.refresh(p.now, 600);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 600 }]);
    p.client
        .create_permission(p.now, &["8.8.8.8:9".parse().unwrap()]);
    assert_eq!(p.run(), vec![Event::PermissionCreated]);
    // Past the nonce lifetime too: 438, then the retry with a fresh nonce is accepted.
    p.advance(Duration::from_secs(550));
    p.client.refresh(p.now, 600);
    assert_eq!(p.run(), vec![Event::Refreshed { lifetime: 600 }]);
    assert_eq!(p.server.allocation_count(), 1);

    // The same expired credential cannot start anything new.
    let mut q = pair_as(&u, &pw);
    q.advance(Duration::from_secs(300));
    q.client.allocate(q.now);
    q.expect_error(ErrorCode::UNAUTHORIZED);
}

/// Without credentials only an Allocate that could succeed is challenged; other requests get a
/// short error (no SOFTWARE, no reason phrase) no larger than a Binding answer per request byte.
#[test]
fn only_a_complete_allocate_is_challenged() {
    let mut p = Pair::new(cfg());
    for (m, code) in [
        (method::REFRESH, 437),
        (method::CREATE_PERMISSION, 437),
        (method::CHANNEL_BIND, 437),
        (method::CONNECT, 437),
        (method::CONNECTION_BIND, 400),
        (method::ALLOCATE, 400),
    ] {
        let req = raw_request(m, |_| {});
        let t = p.exchange(&req).unwrap();
        assert_eq!(error_code(&t.data), Some(code), "{}", method::name(m));
        let msg = Message::parse(&t.data).unwrap();
        assert!(msg.nonce().is_none() && !msg.has(attr::SOFTWARE));
        assert!(t.data.len() <= 3 * req.len(), "{} bytes", t.data.len());
    }
    // A challenge is small too: a 28-byte Allocate gets at most 92 bytes.
    let req = raw_request(method::ALLOCATE, |b| b.add_requested_transport(17).unwrap());
    let t = p.exchange(&req).unwrap();
    assert_eq!(error_code(&t.data), Some(401));
    assert!(t.data.len() <= 92, "{} bytes", t.data.len());
    // With an allocation on the five-tuple, a Refresh without credentials is challenged.
    let mut p = Pair::new(cfg());
    p.allocate();
    let t = p.exchange(&raw_request(method::REFRESH, |_| {})).unwrap();
    assert_eq!(error_code(&t.data), Some(401));
}

/// RFC 8489 §9.2.2 / §14.3 with RFC 8265 OpaqueString: the configured user "ju\u{0308}rgen"
/// (decomposed) with password "p\u{00A0}ss" (no-break space) is the same credential as the NFC
/// name and an ASCII space, which is what a client following RFC 8489 computes. Fullwidth is not
/// folded (no width mapping), so "\u{FF50} ss" is another password.
#[test]
fn non_ascii_credentials_are_prepared_with_opaque_string() {
    let mut config = cfg();
    config.users = vec![user("ju\u{0308}rgen", "p\u{00A0}ss")];
    let mut p = Pair::with(
        config.clone(),
        Client::new("j\u{00FC}rgen", "p ss", false),
        Transport::Udp,
    );
    p.allocate();
    let mut p = Pair::with(
        config,
        Client::new("j\u{00FC}rgen", "\u{FF50} ss", false),
        Transport::Udp,
    );
    p.client.allocate(p.now);
    p.expect_error(ErrorCode::UNAUTHORIZED);
}

/// A USERNAME that OpaqueString refuses (a control character) is answered 401, never a panic;
/// REST usernames are checked the same way.
#[test]
fn usernames_that_fail_opaque_string_get_401() {
    for name in [
        "ali\u{0007}ce",
        "9999999999:b\u{00AD}ob",
        "9999999999:\u{0000}",
    ] {
        let mut p = Pair::with(cfg(), Client::new(name, "secret", false), Transport::Udp);
        p.client.allocate(p.now);
        p.expect_error(ErrorCode::UNAUTHORIZED);
    }
}

/// A configured name or password without an OpaqueString form is a config error naming the key.
#[test]
fn configured_credentials_that_fail_opaque_string_are_refused_by_name() {
    let mut c = cfg();
    c.users = vec![user("alice", "tab\tpassword")];
    let e = c.validate().unwrap_err().0;
    assert!(e.contains("turn.users[0].password"), "{e}");
    c.users = vec![user("al\u{200B}ice", "secret")];
    let e = c.validate().unwrap_err().0;
    assert!(e.contains("turn.users[0].name"), "{e}");
}
