//! Drives the TURN server core's whole input path with arbitrary bytes, before and after
//! authentication: client datagrams and stream frames (STUN and ChannelData), peer datagrams,
//! bind results, connection events and time. The core must never panic.
#![no_main]

use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_turn::*;
use libfuzzer_sys::fuzz_target;

fn setup(t0: Instant) -> (Server, ClientSocket, Vec<Vec<u8>>) {
    let cfg = TurnConfig {
        users: vec![UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        static_auth_secrets: vec!["s".into()],
        relay_ipv4: Some("198.51.100.1".parse().unwrap()),
        relay_ipv6: Some("2001:db8::1".parse().unwrap()),
        relay_ports: PortRange {
            min: 50000,
            max: 50015,
        },
        unauth_rate: 0,
        ..Default::default()
    };
    let ports = cfg.relay_ports;
    let opts = ServerOptions {
        rfc5780: None,
        shared: Shared::new([3; 32], t0, 1_700_000_000),
        ports,
        extension: true,
        seed: 7,
        shard: 0,
    };
    let mut s = Server::new(cfg, opts).unwrap();
    let sock = ClientSocket {
        transport: Transport::Udp,
        local: "198.51.100.1:3478".parse().unwrap(),
        remote: "203.0.113.1:5000".parse().unwrap(),
    };
    // Authenticate and allocate, so later inputs reach the authenticated paths.
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
    let _ = matches!(c.poll_event(), Some(Event::Allocated { .. }));
    // Valid authenticated requests to mutate.
    let mut templates = Vec::new();
    c.create_permission(t0, &["8.8.8.8:1".parse().unwrap()]);
    c.channel_bind(t0, 0x4000, "8.8.8.8:1".parse().unwrap());
    c.refresh(t0, 600);
    c.send_indication("8.8.8.8:1".parse().unwrap(), b"x");
    while let Some(b) = c.poll_transmit() {
        templates.push(b);
    }
    (s, sock, templates)
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let (mut s, sock, templates) = setup(t0);
    let mut now = t0;
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        let len = usize::from(tail.first().copied().unwrap_or(0)) * 4 + 4;
        let (chunk, next) = tail.split_at(len.min(tail.len()));
        rest = next;
        let mut client = sock;
        if op & 0x10 != 0 {
            client.transport = Transport::Tcp;
        }
        if op & 0x20 != 0 {
            client.remote.set_port(5001);
        }
        match op % 8 {
            0 | 1 => {
                s.handle_client(now, client, chunk);
            }
            2 => {
                // A valid authenticated request with bytes overwritten.
                if let Some(t) = templates.get(usize::from(op / 8) % templates.len().max(1)) {
                    let mut m = t.clone();
                    for (i, b) in chunk.iter().enumerate().step_by(2) {
                        let at = usize::from(*b) % m.len();
                        m[at] = chunk.get(i + 1).copied().unwrap_or(0);
                    }
                    s.handle_client(now, client, &m);
                }
            }
            3 => {
                let mut buf = vec![0u8; PEER_HEADROOM + chunk.len() + PEER_TAILROOM];
                buf[PEER_HEADROOM..PEER_HEADROOM + chunk.len()].copy_from_slice(chunk);
                let relay = RelayKey {
                    alloc: AllocId {
                        slot: u32::from(op / 64),
                        generation: 0,
                    },
                    family: if op & 8 != 0 { Family::V6 } else { Family::V4 },
                };
                let peer = PeerAddr::new("8.8.8.8:1".parse().unwrap());
                s.handle_peer(
                    now,
                    relay,
                    peer,
                    &mut buf,
                    PEER_HEADROOM..PEER_HEADROOM + chunk.len(),
                );
            }
            4 => {
                now += Duration::from_secs(u64::from(chunk.first().copied().unwrap_or(1)) * 8);
                s.handle_timeout(now);
            }
            5 => s.client_closed(now, client),
            6 => s.peer_connected(now, ConnectionId::new(u32::from_be_bytes([op, 0, 0, 1])), op & 8 != 0),
            _ => {
                for t in &templates {
                    s.handle_client(now, client, t);
                }
            }
        }
        while let Some(o) = s.poll_output() {
            if let Output::BindRelay { key, addr, .. } = o {
                if op & 4 != 0 {
                    s.relay_bound(now, key, Err(BindFailed(std::io::ErrorKind::AddrInUse)));
                } else {
                    s.relay_bound(now, key, Ok(addr));
                }
            }
        }
    }
});
