//! The RAWR wire codec (`kyuu_rawr::wire`) and the node rules (`kyuu_rawr::node`, sans-IO)
//! driven by arbitrary input: raw datagrams, valid messages with a byte flipped, from the
//! gateway, a child, a neighbour or a stranger; neighbour table changes and time. Neither the
//! codec nor the node may panic, and every output must be a well-formed STUN message.
#![no_main]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_rawr::config::{ChildConfig, GatewayConfig, RawrConfig};
use kyuu_rawr::node::{Node, Output};
use kyuu_rawr::wire::{self, ConnectReq, Mac};
use kyuu_stun::{Message, TransactionId};
use libfuzzer_sys::fuzz_target;

fn addr(i: u8) -> SocketAddr {
    SocketAddr::from(([198, 18, 0, i], 3478))
}

fn node(t0: Instant) -> Node {
    let cfg = RawrConfig {
        name: "n".into(),
        self_addrs: vec![addr(1)],
        relay: vec!["turn:198.18.0.1:3478".into()],
        secret: "s".into(),
        gateway: Some(GatewayConfig {
            addr: addr(2),
            key: Some("k".into()),
        }),
        children: vec![ChildConfig {
            name: "c".into(),
            key: "kc".into(),
        }],
        ..RawrConfig::default()
    };
    Node::new(&cfg, t0, 1_700_000_000, 7)
}

/// Every decoder of the wire module on one datagram.
fn decode_all(data: &[u8]) {
    let Ok(m) = Message::parse(data) else { return };
    let _ = wire::Request::decode(&m);
    let _ = wire::Relay::decode(&m);
    let _ = wire::decode_exchange_answer(&m);
    for a in m.attrs() {
        let _ = wire::decode_path(a.value);
    }
}

struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    fn chunk(&mut self) -> &[u8] {
        let n = (usize::from(self.byte()) * 4).min(self.0.len());
        let (c, rest) = self.0.split_at(n);
        self.0 = rest;
        c
    }
}

fn valid(sel: u8, a: u8, b: u8, session: u8) -> Vec<u8> {
    let c = ConnectReq {
        session: vec![session; 16],
        mac: Mac([2, 0, 0, 0, 0, a]),
        // Wildcard Connects (no TARGET-MAC) too.
        target: (b & 4 == 0).then_some(Mac([2, 0, 0, 0, 0, b])),
        root: addr(9),
        hops: a % 8,
        path: vec!["x".into()],
    };
    let child = kyuu_stun::integrity::Key::short_term("kc");
    let gw = kyuu_stun::integrity::Key::short_term("k");
    let (username, key) = if b & 1 == 0 {
        (Some("c"), &child)
    } else {
        (None, &gw)
    };
    let auth = wire::Auth { username, key };
    let t = TransactionId([a ^ b; 12]);
    let relay = wire::Relay {
        uris: vec!["turn:198.18.0.1:3478".into()],
        username: "1:u".into(),
        password: "p".into(),
        lifetime: u32::from(a),
        path: vec!["n".into(), "x".into()],
        at_root: b & 2 == 0,
    };
    match sel % 10 {
        0 => wire::encode_connect(t, &c, None),
        1 => wire::encode_connect(t, &c, Some(&auth)),
        2 => wire::encode_exchange(t, &c.session, c.mac, &[addr(3), addr(b)]),
        3 => wire::encode_register(t, c.mac, Some(u32::from(b))),
        // Cancels with and without the relay a pairing below handed out.
        4 => {
            let r = (a & 1 == 0).then_some(&relay);
            wire::encode_cancel(t, &c.session, c.mac, c.target, r, Some(&auth))
        }
        5 => wire::encode_error(wire::method::CONNECT, t, 482, "x", &[], Some(&auth)),
        6 => wire::encode_connect_answer(t, &relay, Some(&auth)),
        7 => wire::encode_pending(wire::method::CONNECT, t),
        8 => wire::encode_exchange_answer(t, c.mac, &[addr(4)]),
        _ => wire::encode_binding_request(t),
    }
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut n = node(t0);
    let mut input = Input(data);
    for _ in 0..64 {
        if input.0.is_empty() {
            break;
        }
        let op = input.byte();
        let from = addr(match input.byte() % 5 {
            0 => 2,  // the gateway
            1 => 3,  // a child
            2 => 10, // a neighbour
            3 => 11, // a stranger
            _ => 1,  // itself
        });
        match op % 5 {
            0 => {
                let d = input.chunk().to_vec();
                decode_all(&d);
                let _ = Node::wants(&d);
                let _ = n.needs_neighbours(&d);
                n.handle_input(now, from, &d);
            }
            1 => {
                let (s, a, b, sess) = (input.byte(), input.byte(), input.byte(), input.byte());
                let mut d = valid(s, a, b, sess);
                let pos = usize::from(input.byte()) * 2;
                let flip = input.byte();
                if let Some(x) = d.get_mut(pos) {
                    *x ^= flip;
                }
                decode_all(&d);
                n.handle_input(now, from, &d);
            }
            2 => {
                now += Duration::from_millis(u64::from(input.byte()) * 250);
                n.handle_timeout(now);
            }
            3 => {
                let k = input.byte() % 4;
                n.set_neighbours((0..k).map(|i| Mac([2, 0, 0, 0, 0, i])));
            }
            _ => {
                let _ = n.poll_timeout();
                let _ = n.stats();
            }
        }
        while let Some(o) = n.poll_output() {
            if let Output::Transmit { data, .. } = o {
                assert!(Message::parse(&data).is_ok(), "node sent a malformed message");
                decode_all(&data);
            }
        }
    }
    // Whatever the node holds is freed by its timers.
    n.handle_timeout(now + Duration::from_secs(3600));
    while n.poll_output().is_some() {}
});
