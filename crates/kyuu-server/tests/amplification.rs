//! The amplification table: for every request a client can send without credentials, bytes
//! answered over bytes received. Over UDP the source address is unverified, so an answer larger
//! than its request turns kyuu into a reflector; the bound is the RFC-inherent case, a Binding
//! request of 20 bytes answered with XOR-MAPPED-ADDRESS (largest for an IPv6 client). STUN,
//! TURN and RAWR run through their sans-IO cores (`kyuu_turn::Server`, `kyuu_rawr::node::Node`,
//! fed exactly as the UDP shell feeds them); HTTP endpoints over real sockets, where the TCP
//! handshake has verified the address first (printed for the record, bounded separately).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use kyuu_rawr::config::RawrConfig;
use kyuu_rawr::node::{Node, Output as NodeOutput};
use kyuu_stun::{attr, method, Class, MessageBuilder, TransactionId};
use kyuu_turn::{ClientSocket, Output, PortRange, Server, ServerOptions, Shared, Transport};
use kyuu_turn::{TurnConfig, UserConfig};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const UNIX0: u64 = 1_700_000_000;

fn message(m: u16, class: Class, attrs: &[(u16, Vec<u8>)], fingerprint: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 2048];
    let mut b = MessageBuilder::new(&mut buf, m, class, TransactionId([7; 12])).unwrap();
    for (t, v) in attrs {
        b.add(*t, v).unwrap();
    }
    if fingerprint {
        b.add_fingerprint().unwrap();
    }
    let n = b.finish();
    buf.truncate(n);
    buf
}

fn request(m: u16, attrs: &[(u16, Vec<u8>)]) -> Vec<u8> {
    message(m, Class::Request, attrs, false)
}

fn requested_transport() -> (u16, Vec<u8>) {
    (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])
}

/// A TURN server core as `kyuu serve` runs it by default, with a REST secret and a user.
fn turn(t0: Instant) -> Server {
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
            max: 50100,
        },
        // Every row is measured once; the per-source limiter would only hide answers.
        unauth_rate: 0,
        ..Default::default()
    };
    let ports = cfg.relay_ports;
    Server::new(
        cfg,
        ServerOptions {
            rfc5780: None,
            shared: Shared::new([5; 32], t0, UNIX0),
            ports,
            extension: true,
            seed: 1,
            shard: 0,
        },
    )
    .unwrap()
}

fn rawr_node(t0: Instant) -> Node {
    let cfg = RawrConfig {
        enabled: true,
        name: "n".into(),
        self_addrs: vec!["198.51.100.1:3478".parse().unwrap()],
        relay: vec!["turn:198.51.100.1:3478".into()],
        secret: "s".into(),
        ..RawrConfig::default()
    };
    Node::new(&cfg, t0, UNIX0, 3)
}

/// Bytes kyuu answers to `req` from `client`: the TURN core's transmits, plus the RAWR node's
/// for requests the core hands to the extension.
fn answered(client: SocketAddr, req: &[u8]) -> usize {
    let t0 = Instant::now();
    let mut core = turn(t0);
    let mut node = rawr_node(t0);
    let sock = ClientSocket {
        transport: Transport::Udp,
        local: if client.is_ipv4() {
            "198.51.100.1:3478".parse().unwrap()
        } else {
            "[2001:db8::1]:3478".parse().unwrap()
        },
        remote: client,
    };
    let mut total = 0;
    let _ = core.handle_client(t0, sock, req);
    while let Some(o) = core.poll_output() {
        match o {
            Output::Transmit(t) => {
                assert_eq!(t.client, sock);
                total += t.data.len();
            }
            Output::Extension { client, data } => {
                node.handle_input(t0, client.remote, &data);
                while let Some(o) = node.poll_output() {
                    // Answers to the client and anything forwarded on its behalf (a Connect
                    // toward the root it names) both count.
                    if let NodeOutput::Transmit { data, .. } = o {
                        total += data.len();
                    }
                }
            }
            other => panic!("unauthenticated request caused {other:?}"),
        }
    }
    total
}

/// Allocate with credentials that fail: a good nonce (from a first challenge) and a wrong
/// password, and a fabricated nonce.
fn bad_credentials(client: SocketAddr, good_nonce: bool) -> Vec<u8> {
    let nonce = if good_nonce {
        let t0 = Instant::now();
        let mut core = turn(t0);
        let sock = ClientSocket {
            transport: Transport::Udp,
            local: "198.51.100.1:3478".parse().unwrap(),
            remote: client,
        };
        let _ = core.handle_client(
            t0,
            sock,
            &request(method::ALLOCATE, &[requested_transport()]),
        );
        let Some(Output::Transmit(t)) = core.poll_output() else {
            panic!("no challenge")
        };
        let m = kyuu_stun::Message::parse(&t.data).unwrap();
        m.nonce().unwrap().to_vec()
    } else {
        b"obMatJos2AAECAAAAAAAAAAAAAAAAAAAAAAAA".to_vec()
    };
    let mut buf = vec![0u8; 2048];
    let mut b = MessageBuilder::new(
        &mut buf,
        method::ALLOCATE,
        Class::Request,
        TransactionId([9; 12]),
    )
    .unwrap();
    b.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).unwrap();
    b.add(attr::USERNAME, b"u").unwrap();
    b.add(attr::REALM, b"kyuu").unwrap();
    b.add(attr::NONCE, &nonce).unwrap();
    let key = kyuu_stun::integrity::Key::long_term_md5("u", "kyuu", "wrong").unwrap();
    b.add_integrity(&key).unwrap();
    let n = b.finish();
    buf.truncate(n);
    buf
}

struct Row {
    kind: String,
    request: usize,
    response: usize,
}

impl Row {
    fn ratio(&self) -> f64 {
        self.response as f64 / self.request as f64
    }
}

fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}\n| request | request B | answer B | ratio |\n| --- | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.2} |",
            r.kind,
            r.request,
            r.response,
            r.ratio()
        );
    }
}

#[test]
fn udp_answers_never_exceed_the_binding_ratio() {
    let v4: SocketAddr = "203.0.113.5:40000".parse().unwrap();
    let v6: SocketAddr = "[2001:db8:5::5]:40000".parse().unwrap();
    let unknown_attrs: Vec<(u16, Vec<u8>)> = (0..40u16).map(|i| (0x0030 + i, vec![])).collect();
    let mut kinds: Vec<(String, Vec<u8>)> = vec![
        ("Binding".into(), request(method::BINDING, &[])),
        (
            "Binding + FINGERPRINT".into(),
            message(method::BINDING, Class::Request, &[], true),
        ),
        (
            "Binding, 40 unknown comprehension-required attributes".into(),
            request(method::BINDING, &unknown_attrs),
        ),
        (
            "Binding indication".into(),
            message(method::BINDING, Class::Indication, &[], false),
        ),
        (
            "Allocate, no attributes".into(),
            request(method::ALLOCATE, &[]),
        ),
        (
            "Allocate, no credentials".into(),
            request(method::ALLOCATE, &[requested_transport()]),
        ),
        (
            "Allocate + FINGERPRINT, no credentials".into(),
            message(
                method::ALLOCATE,
                Class::Request,
                &[requested_transport()],
                true,
            ),
        ),
        (
            "Allocate, 40 unknown comprehension-required attributes".into(),
            request(
                method::ALLOCATE,
                &[&[requested_transport()][..], &unknown_attrs].concat(),
            ),
        ),
        ("Allocate, wrong password".into(), bad_credentials(v4, true)),
        ("Allocate, forged nonce".into(), bad_credentials(v4, false)),
        (
            "Refresh, no credentials".into(),
            request(method::REFRESH, &[]),
        ),
        (
            "CreatePermission, no credentials".into(),
            request(method::CREATE_PERMISSION, &[]),
        ),
        (
            "ChannelBind, no credentials".into(),
            request(method::CHANNEL_BIND, &[]),
        ),
        (
            "Connect, no credentials".into(),
            request(method::CONNECT, &[]),
        ),
        (
            "ConnectionBind, no credentials".into(),
            request(method::CONNECTION_BIND, &[]),
        ),
        (
            "Send indication, no allocation".into(),
            message(method::SEND, Class::Indication, &[], false),
        ),
        ("unknown method 0x0FF".into(), request(0x0FF, &[])),
        ("unknown method 0xBFF".into(), request(0xBFF, &[])),
        (
            "ChannelData, no allocation".into(),
            vec![0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4],
        ),
    ];
    for (name, m) in [
        ("Exchange", kyuu_rawr::wire::method::EXCHANGE),
        ("Register", kyuu_rawr::wire::method::REGISTER),
        ("Connect", kyuu_rawr::wire::method::CONNECT),
        ("Cancel", kyuu_rawr::wire::method::CANCEL),
        ("0xC0F", 0xC0F),
    ] {
        kinds.push((
            format!("RAWR {name} ({m:#05x}), no attributes"),
            request(m, &[]),
        ));
        kinds.push((
            format!("RAWR {name}, 40 unknown attributes"),
            request(m, &unknown_attrs),
        ));
    }
    // Well-formed RAWR requests from a stranger.
    let c = kyuu_rawr::wire::ConnectReq {
        session: vec![1; 16],
        mac: kyuu_rawr::wire::Mac([2, 0, 0, 0, 0, 1]),
        target: Some(kyuu_rawr::wire::Mac([2, 0, 0, 0, 0, 2])),
        root: "198.51.100.9:3478".parse().unwrap(),
        hops: 1,
        path: vec![],
    };
    let t = TransactionId([3; 12]);
    kinds.push((
        "RAWR Connect, well-formed".into(),
        kyuu_rawr::wire::encode_connect(t, &c, None),
    ));
    kinds.push((
        "RAWR Exchange, well-formed".into(),
        kyuu_rawr::wire::encode_exchange(t, &c.session, c.mac, &[v4]),
    ));
    kinds.push((
        "RAWR Register, well-formed".into(),
        kyuu_rawr::wire::encode_register(t, c.mac, Some(60)),
    ));
    kinds.push((
        "RAWR Cancel, well-formed".into(),
        kyuu_rawr::wire::encode_cancel(t, &c.session, c.mac, c.target, None, None),
    ));

    let mut rows = Vec::new();
    for (family, client) in [("IPv4", v4), ("IPv6", v6)] {
        for (kind, req) in &kinds {
            rows.push(Row {
                kind: format!("{kind} ({family})"),
                request: req.len(),
                response: answered(client, req),
            });
        }
    }
    // The RFC-inherent case: a bare Binding request answered with XOR-MAPPED-ADDRESS.
    let bound = rows
        .iter()
        .filter(|r| r.kind == "Binding (IPv4)" || r.kind == "Binding (IPv6)")
        .map(Row::ratio)
        .fold(0.0, f64::max);
    print_table("STUN/TURN/RAWR over UDP (sans-IO cores)", &rows);
    println!("bound: the IPv6 Binding ratio {bound:.2}");
    assert!(bound > 1.0, "Binding is answered");
    let over: Vec<String> = rows
        .iter()
        .filter(|r| r.ratio() > bound + 1e-9)
        .map(|r| format!("{} ({:.2})", r.kind, r.ratio()))
        .collect();
    assert!(
        over.is_empty(),
        "answers above the Binding ratio {bound:.2}: {over:?}"
    );
}

/// HTTP over real sockets: the table for the record (the TCP handshake verified the client's
/// address, so there is no reflection), and every unauthenticated answer bounded in size.
#[tokio::test]
async fn http_answers_table() {
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = kyuu_server::config::Config {
        listen: kyuu_server::relay::ListenConfig::on(&[lo], &[]),
        ..Default::default()
    };
    config.http.listen = lo;
    config.http.metrics = false;
    config.rawr.enabled = true;
    config.rawr.listen = Some(lo);
    config.validate().unwrap();
    let running = kyuu_server::start(config).await.unwrap();
    let http = running.http_addr.unwrap();
    let mut rows = Vec::new();
    for path in [
        "/healthz",
        "/v1/ice-servers",
        "/metrics",
        "/nonexistent",
        "/some-id",
        "/some-id/more",
        "/",
        "/check",
        "/kyuu.js",
        "/rawr",
        "/rawr/rawr.js",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut s = tokio::net::TcpStream::connect(http).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut resp))
            .await
            .unwrap()
            .unwrap();
        rows.push(Row {
            kind: format!(
                "GET {path} ({})",
                String::from_utf8_lossy(&resp[..12.min(resp.len())])
            ),
            request: req.len(),
            response: resp.len(),
        });
    }
    print_table("HTTP over TCP (address verified by the handshake)", &rows);
    for r in &rows {
        assert!(
            r.response < 256 * 1024,
            "{} answers {} bytes",
            r.kind,
            r.response
        );
    }
    running.shutdown(Duration::from_millis(200)).await;
}
