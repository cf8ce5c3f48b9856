//! The operator commands of the core in virtual time: listing, killing, reconfiguring and
//! draining.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_turn::*;

fn cfg() -> TurnConfig {
    TurnConfig {
        users: vec![UserConfig {
            name: "alice".into(),
            password: Some("secret".into()),
            key: None,
            key_sha256: None,
        }],
        relay_ipv4: Some("198.51.100.1".parse().unwrap()),
        ..Default::default()
    }
}

fn server(t0: Instant) -> Server {
    server_with(t0, cfg())
}

fn server_with(t0: Instant, c: TurnConfig) -> Server {
    let ports = c.relay_ports;
    Server::new(
        c,
        ServerOptions {
            rfc5780: None,
            shared: Shared::new([7; 32], t0, 1_700_000_000),
            ports,
            extension: false,
            seed: 7,
            shard: 0,
        },
    )
    .unwrap()
}

fn sock(port: u16, transport: Transport) -> ClientSocket {
    ClientSocket {
        transport,
        local: "198.51.100.1:3478".parse().unwrap(),
        remote: SocketAddr::from(([203, 0, 113, 5], port)),
    }
}

/// Runs the client against the server until quiet; returns its events and the other outputs.
fn run(
    s: &mut Server,
    c: &mut Client,
    at: ClientSocket,
    now: Instant,
) -> (Vec<Event>, Vec<Output>) {
    let mut other = Vec::new();
    for _ in 0..20 {
        let Some(b) = c.poll_transmit() else { break };
        s.handle_client(now, at, &b);
        while let Some(o) = s.poll_output() {
            match o {
                Output::Transmit(t) if t.client == at => c.handle_input(now, &t.data),
                Output::BindRelay { key, addr, .. } => s.relay_bound(now, key, Ok(addr)),
                o => other.push(o),
            }
        }
    }
    let mut ev = Vec::new();
    while let Some(e) = c.poll_event() {
        ev.push(e);
    }
    (ev, other)
}

#[test]
fn list_and_kill() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let at = sock(1000, Transport::Tcp);
    let mut c = Client::new("alice", "secret", true);
    c.allocate(t0);
    let (ev, _) = run(&mut s, &mut c, at, t0);
    let [Event::Allocated { relayed, .. }] = ev.as_slice() else {
        panic!("{ev:?}")
    };
    c.create_permission(t0, &["8.8.8.8:53".parse().unwrap()]);
    run(&mut s, &mut c, at, t0);

    let now = t0 + Duration::from_secs(5);
    let list = s.allocations(now);
    assert_eq!(list.len(), 1);
    let a = &list[0];
    assert_eq!(
        (a.username.as_str(), a.client, a.transport),
        ("alice", at.remote, "tcp")
    );
    assert_eq!(a.relayed, vec![relayed[0]]);
    assert_eq!(
        a.permissions,
        vec!["8.8.8.8".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(a.age_secs, 5);

    assert!(s.kill_allocation(now, a.id));
    assert!(!s.kill_allocation(now, a.id), "a second kill finds nothing");
    let mut outs = Vec::new();
    while let Some(o) = s.poll_output() {
        outs.push(o);
    }
    assert!(
        outs.iter().any(|o| matches!(o, Output::CloseRelay { .. })),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Output::CloseClient { client } if *client == at)),
        "a stream client's connection is closed too: {outs:?}"
    );
    assert!(s.allocations(now).is_empty());
    assert_eq!(s.allocation_count(), 0);
}

#[test]
fn reconfigure_applies_credentials_and_keeps_relay_ports() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut new = cfg();
    new.users.push(UserConfig {
        name: "bob".into(),
        password: Some("pw".into()),
        key: None,
        key_sha256: None,
    });
    new.relay_ports = PortRange {
        min: 50000,
        max: 50100,
    };
    let kept = s.reconfigure(new).unwrap();
    assert_eq!(kept.0, vec!["turn.relay_ports"]);
    assert_eq!(s.config().relay_ports, PortRange::default());
    let mut bob = Client::new("bob", "pw", false);
    bob.allocate(t0);
    let (ev, _) = run(&mut s, &mut bob, sock(2000, Transport::Udp), t0);
    assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");

    // Invalid: refused, nothing changes (bob still works, carol never appears).
    let mut bad = cfg();
    bad.relay_ports = PortRange { min: 9, max: 1 };
    assert!(s
        .reconfigure(bad)
        .unwrap_err()
        .starts_with("turn.relay_ports"));
    let mut bob2 = Client::new("bob", "pw", false);
    bob2.allocate(t0);
    let (ev, _) = run(&mut s, &mut bob2, sock(2001, Transport::Udp), t0);
    assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");
}

#[test]
fn drain_refuses_with_486_or_redirects_with_300() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut first = Client::new("alice", "secret", false);
    first.allocate(t0);
    assert!(matches!(
        run(&mut s, &mut first, sock(3000, Transport::Udp), t0)
            .0
            .as_slice(),
        [Event::Allocated { .. }]
    ));
    s.drain(None);
    assert!(s.is_draining());
    let mut late = Client::new("alice", "secret", false);
    late.allocate(t0);
    let (ev, _) = run(&mut s, &mut late, sock(3001, Transport::Udp), t0);
    assert!(
        matches!(ev.as_slice(), [Event::Error { code: 486, .. }]),
        "{ev:?}"
    );
    // The existing allocation still refreshes.
    first.refresh(t0, 600);
    let (ev, _) = run(&mut s, &mut first, sock(3000, Transport::Udp), t0);
    assert!(matches!(ev.as_slice(), [Event::Refreshed { .. }]), "{ev:?}");

    let alt: SocketAddr = "192.0.2.20:3478".parse().unwrap();
    s.drain(Some(alt));
    let mut moved = Client::new("alice", "secret", false);
    moved.allocate(t0);
    let (ev, _) = run(&mut s, &mut moved, sock(3002, Transport::Udp), t0);
    assert!(
        matches!(ev.as_slice(), [Event::TryAlternate { alternate, .. }] if *alternate == alt),
        "{ev:?}"
    );
}

#[test]
fn a_draining_fleet_node_names_an_alternate_of_the_clients_family() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let v4: SocketAddr = "192.0.2.30:3478".parse().unwrap();
    let v6: SocketAddr = "[2001:db8::30]:3478".parse().unwrap();
    // Only an IPv6 alternate: an IPv4 client gets 486, not an address it cannot reach.
    s.drain_to(&[v6]);
    let mut c = Client::new("alice", "secret", false);
    c.allocate(t0);
    let (ev, _) = run(&mut s, &mut c, sock(3100, Transport::Udp), t0);
    assert!(
        matches!(ev.as_slice(), [Event::Error { code: 486, .. }]),
        "{ev:?}"
    );
    s.drain_to(&[v6, v4]);
    let mut c = Client::new("alice", "secret", false);
    c.allocate(t0);
    let (ev, _) = run(&mut s, &mut c, sock(3101, Transport::Udp), t0);
    assert!(
        matches!(ev.as_slice(), [Event::TryAlternate { alternate, .. }] if *alternate == v4),
        "{ev:?}"
    );
}

#[test]
fn the_user_quota_counts_allocations_on_other_fleet_nodes() {
    let mut c = cfg();
    c.user_quota = 2;
    let t0 = Instant::now();
    let shared = Shared::new([7; 32], t0, 1_700_000_000);
    let ports = c.relay_ports;
    let mut s = Server::new(
        c,
        ServerOptions {
            rfc5780: None,
            shared: shared.clone(),
            ports,
            extension: false,
            seed: 7,
            shard: 0,
        },
    )
    .unwrap();
    let g0 = shared.user_allocations_generation();
    // One of alice's two allocations lives on another node.
    shared.set_remote_user_allocations([("alice".to_owned(), 1)].into_iter().collect());
    let mut a = Client::new("alice", "secret", false);
    a.allocate(t0);
    let (ev, _) = run(&mut s, &mut a, sock(3200, Transport::Udp), t0);
    assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");
    assert_ne!(shared.user_allocations_generation(), g0);
    assert_eq!(shared.user_allocations().1, vec![("alice".to_owned(), 1)]);
    let mut b = Client::new("alice", "secret", false);
    b.allocate(t0);
    let (ev, _) = run(&mut s, &mut b, sock(3201, Transport::Udp), t0);
    assert!(
        matches!(ev.as_slice(), [Event::Error { code: 486, .. }]),
        "{ev:?}"
    );
    // The other node's allocation ended (or Redis is gone: local counting only).
    shared.set_remote_user_allocations(Default::default());
    let mut b = Client::new("alice", "secret", false);
    b.allocate(t0);
    let (ev, _) = run(&mut s, &mut b, sock(3202, Transport::Udp), t0);
    assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");
}

#[test]
fn reconfigure_keeps_the_kernel_programs_for_a_restart() {
    let t0 = Instant::now();
    let mut s = server(t0);
    let mut new = cfg();
    new.fast_path = kyuu_turn::FastPathMode::Auto;
    new.fast_path_interface = Some("eth9".into());
    new.fast_path_binding = !new.fast_path_binding;
    new.fast_path_xdp = kyuu_turn::XdpMode::Native;
    new.relay_steering = kyuu_turn::FastPathMode::Required;
    new.unauth_rate = 7;
    let kept = s.reconfigure(new).unwrap();
    assert_eq!(
        kept.0,
        vec![
            "turn.fast_path",
            "turn.fast_path_interface",
            "turn.fast_path_binding",
            "turn.fast_path_xdp",
            "turn.relay_steering"
        ]
    );
    let now = s.config();
    let old = cfg();
    assert_eq!(now.fast_path, old.fast_path);
    assert_eq!(now.fast_path_interface, old.fast_path_interface);
    assert_eq!(now.fast_path_binding, old.fast_path_binding);
    assert_eq!(now.fast_path_xdp, old.fast_path_xdp);
    assert_eq!(now.relay_steering, old.relay_steering);
    assert_eq!(now.unauth_rate, 7, "the rest is applied");
}

/// The expiry walk is spread over sub-ticks (a tenth of the allocation table each 100 ms), so
/// no single turn of a shard walks every allocation; a late call (a whole tick or more) walks
/// them all at once, and every allocation is still checked within a tick of its expiry.
#[test]
fn expiry_walk_is_spread_over_sub_ticks() {
    let t0 = Instant::now();
    let mut s = server_with(
        t0,
        TurnConfig {
            user_quota: 0,
            client_quota: 0,
            ..cfg()
        },
    );
    const N: u16 = 20;
    for i in 0..N {
        let mut cl = Client::new("alice", "secret", false);
        cl.allocate(t0);
        let (ev, _) = run(&mut s, &mut cl, sock(3000 + i, Transport::Udp), t0);
        assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");
    }
    assert_eq!(s.allocation_count(), usize::from(N));
    let expiry = t0 + Duration::from_secs(600);
    // A late call just before the expiry walks everything and expires nothing.
    let mut now = expiry - Duration::from_millis(50);
    s.handle_timeout(now);
    assert_eq!(s.allocation_count(), usize::from(N), "none expires early");
    // From the expiry on, one sub-tick at a time: each takes one slice.
    let mut left = Vec::new();
    for _ in 0..10 {
        now += Duration::from_millis(100);
        assert_eq!(s.poll_timeout(), Some(now), "the next sub-tick");
        s.handle_timeout(now);
        left.push(s.allocation_count());
    }
    assert!(
        left[0] > 0 && left[0] < usize::from(N),
        "the first sub-tick after the expiry expired some, not all: {left:?}"
    );
    assert!(left.windows(2).all(|w| w[1] <= w[0]), "{left:?}");
    assert_eq!(left[9], 0, "all gone within a tick: {left:?}");

    // Again, and this time one late call a whole tick after the expiry takes them all.
    let t1 = now;
    for i in 0..N {
        let mut cl = Client::new("alice", "secret", false);
        cl.allocate(t1);
        let (ev, _) = run(&mut s, &mut cl, sock(4000 + i, Transport::Udp), t1);
        assert!(matches!(ev.as_slice(), [Event::Allocated { .. }]), "{ev:?}");
    }
    s.handle_timeout(t1 + Duration::from_secs(601));
    assert_eq!(s.allocation_count(), 0, "a late call walks every slice");
}
