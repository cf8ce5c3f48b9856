//! Arbitrary input never panics the server core, before or after authentication.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_turn::*;
use proptest::prelude::*;

fn setup() -> (Server, ClientSocket, Instant, Vec<u8>) {
    let t0 = Instant::now();
    let cfg = TurnConfig {
        users: vec![UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        relay_ipv4: Some("198.51.100.1".parse().unwrap()),
        unauth_rate: 0,
        ..Default::default()
    };
    let ports = cfg.relay_ports;
    let mut s = Server::new(
        cfg,
        ServerOptions {
            rfc5780: None,
            shared: Shared::new([1; 32], t0, 0),
            ports,
            extension: false,
            seed: 1,
            shard: 0,
        },
    )
    .unwrap();
    let sock = ClientSocket {
        transport: Transport::Udp,
        local: "198.51.100.1:3478".parse().unwrap(),
        remote: "203.0.113.1:5".parse().unwrap(),
    };
    let mut c = Client::new("u", "p", false);
    c.allocate(t0);
    for _ in 0..3 {
        let Some(b) = c.poll_transmit() else { break };
        s.handle_client(t0, sock, &b);
        while let Some(o) = s.poll_output() {
            match o {
                Output::Transmit(t) => c.handle_input(t0, &t.data),
                Output::BindRelay { key, addr, .. } => s.relay_bound(t0, key, Ok(addr)),
                _ => {}
            }
        }
    }
    assert!(matches!(c.poll_event(), Some(Event::Allocated { .. })));
    c.create_permission(t0, &["8.8.8.8:1".parse().unwrap()]);
    let authed = c.poll_transmit().unwrap();
    (s, sock, t0, authed)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn random_bytes_do_not_panic(data in proptest::collection::vec(any::<u8>(), 0..600), flip in 0usize..600, stream in any::<bool>()) {
        let (mut s, mut sock, t0, authed) = setup();
        if stream { sock.transport = Transport::Tcp; }
        s.handle_client(t0, sock, &data);
        // A valid authenticated message with one byte changed.
        let mut m = authed.clone();
        if let Some(b) = m.get_mut(flip % authed.len()) { *b ^= 0x5a; }
        s.handle_client(t0, sock, &m);
        // Random bytes that look like STUN or ChannelData.
        let mut d = data.clone();
        if d.len() >= 8 { d[0] &= 0x3f; d[4..8].copy_from_slice(&0x2112_A442u32.to_be_bytes()); }
        s.handle_client(t0, sock, &d);
        let mut c = data.clone();
        if !c.is_empty() { c[0] = 0x40; }
        s.handle_client(t0, sock, &c);
        let relay = RelayKey { alloc: AllocId { slot: 0, generation: 0 }, family: Family::V4 };
        let mut buf = vec![0u8; PEER_HEADROOM + data.len() + PEER_TAILROOM];
        buf[PEER_HEADROOM..PEER_HEADROOM + data.len()].copy_from_slice(&data);
        s.handle_peer(t0, relay, PeerAddr::new("8.8.8.8:1".parse().unwrap()), &mut buf, PEER_HEADROOM..PEER_HEADROOM + data.len());
        s.handle_timeout(t0 + Duration::from_secs(2));
        while s.poll_output().is_some() {}
    }
}
