//! Pre-authentication limits under a flood (`kyuu_server::limits`): with 3,000 idle TCP
//! connections and 1,000 half-open TLS handshakes held against the STUN/TURN listeners and
//! 2,000 idle WebSocket connections against HTTP, a legitimate client still allocates over TCP,
//! relays, exchanges signaling messages and gets HTTP answers. Then the limits act: per-IP caps
//! refuse the excess, the first-message and TLS handshake deadlines and the slow-header timeout
//! close what they must, and `/metrics` counts each reason.
//!
//! The flood comes from 127.0.0.2-127.0.0.201 (so per-IP caps apply per source, as they would
//! to many clients) and needs about 13,000 file descriptors: the test raises RLIMIT_NOFILE (CI
//! runs `ulimit -n 65536`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use kyuu_client::turn::{Client, Event};
use kyuu_server::config::Config;
use kyuu_server::relay::ListenConfig;
use kyuu_server::relay::Transport;
use kyuu_turn::UserConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpSocket, TcpStream, UdpSocket};
use tokio_tungstenite::tungstenite::Message;

const SOURCES: u8 = 200;
const IDLE_TCP: usize = 3_000;
const HALF_OPEN_TLS: usize = 1_000;
const IDLE_WS: usize = 2_000;
/// Per source: 15 TCP + 5 TLS on the STUN/TURN listeners, 10 WebSockets on HTTP.
const STUN_CAP: u32 = 24;
const HTTP_CAP: u32 = 16;
/// Long enough to hold the flood while the legitimate client is served.
const FIRST_MESSAGE_SECS: u64 = 25;
const HEADER_SECS: u64 = 3;

fn source(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        0,
        2 + (i % usize::from(SOURCES)) as u8,
    ))
}

async fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

/// Runs `f(i)` for `0..n`, `batch` at a time.
async fn batched<T, F, Fut>(n: usize, batch: usize, f: F) -> Vec<T>
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let mut out = Vec::with_capacity(n);
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        out.extend(futures_util::future::join_all((i..end).map(&f)).await);
        i = end;
    }
    out
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
        .await
        .expect("HTTP answer timed out")
        .unwrap();
    body
}

/// The value of the sample of `name` whose labels include every one of `labels`.
fn metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            let rest = &l[name.len()..];
            rest.starts_with('{') || rest.starts_with(' ')
        })
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The TURN client's next event, exchanging framed messages over `s`.
async fn event(c: &mut Client, s: &mut TcpStream) -> Event {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        while let Some(b) = c.poll_transmit() {
            s.write_all(&b).await.unwrap();
        }
        if let Some(e) = c.poll_event() {
            return e;
        }
        assert!(Instant::now() < deadline, "no TURN answer under the flood");
        let mut head = [0u8; 4];
        if let Ok(r) =
            tokio::time::timeout(Duration::from_millis(200), s.read_exact(&mut head)).await
        {
            r.unwrap();
            let n = kyuu_stun::frame_len(&head).unwrap().unwrap();
            let mut rest = vec![0u8; n - 4];
            s.read_exact(&mut rest).await.unwrap();
            c.handle_input(Instant::now(), &[head.to_vec(), rest].concat());
        }
    }
}

/// TURN Allocate over TCP, a channel, and one packet relayed to a UDP peer.
async fn allocate_and_relay_over_tcp(tcp: SocketAddr) {
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut s = TcpStream::connect(tcp).await.unwrap();
    let mut c = Client::new("u", "p", true);
    c.allocate(Instant::now());
    let Event::Allocated { relayed, .. } = event(&mut c, &mut s).await else {
        panic!("allocation refused under the flood")
    };
    let peer_addr = peer.local_addr().unwrap();
    c.channel_bind(Instant::now(), 0x4001, peer_addr);
    assert!(matches!(
        event(&mut c, &mut s).await,
        Event::ChannelBound { .. }
    ));
    let mut buf = [0u8; 64];
    let n = c.channel_data(0x4001, b"through", &mut buf).unwrap();
    s.write_all(&buf[..n]).await.unwrap();
    let mut got = [0u8; 64];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut got))
        .await
        .expect("nothing relayed under the flood")
        .unwrap();
    assert_eq!(&got[..n], b"through");
    assert_eq!(from, relayed[0]);
}

/// Two signaling clients exchange a message (libdatachannel's relay format).
async fn signaling_exchange(http: SocketAddr) {
    let (mut a, _) = tokio_tungstenite::connect_async(format!("ws://{http}/alice"))
        .await
        .unwrap();
    let (mut b, _) = tokio_tungstenite::connect_async(format!("ws://{http}/bob"))
        .await
        .unwrap();
    a.send(Message::Text(r#"{"id":"bob","type":"offer"}"#.into()))
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match b.next().await {
                Some(Ok(Message::Text(t))) => return t.to_string(),
                Some(Ok(_)) => continue,
                other => panic!("signaling ended: {other:?}"),
            }
        }
    })
    .await
    .expect("no signaling message under the flood");
    assert_eq!(got, r#"{"id":"alice","type":"offer"}"#);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legitimate_client_served_under_flood_and_limits_close_connections() {
    let limit = rlimit::increase_nofile_limit(65_536).unwrap();
    assert!(
        limit >= 14_000,
        "RLIMIT_NOFILE {limit} is too low for this test (run `ulimit -n 65536` first)"
    );
    let lo: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut config = Config {
        listen: ListenConfig {
            threads: 2,
            max_conns_per_ip: STUN_CAP,
            first_message_timeout_secs: FIRST_MESSAGE_SECS,
            tls_handshake_timeout_secs: FIRST_MESSAGE_SECS,
            ..ListenConfig::on(&[lo], &[lo])
        },
        ..Config::default()
    };
    config.turn.users.push(UserConfig {
        name: "u".into(),
        password: Some("p".into()),
        key: None,
        key_sha256: None,
    });
    config.turn.relay_ipv4 = Some(Ipv4Addr::LOCALHOST);
    config.turn.allow_peers = vec!["127.0.0.0/8".parse().unwrap()];
    config.http.listen = lo;
    config.http.max_conns_per_ip = HTTP_CAP;
    config.http.header_timeout_secs = HEADER_SECS;
    config.validate().unwrap();
    let running = kyuu_server::start(config).await.unwrap();
    let addr = |p: Transport| {
        running
            .listeners
            .iter()
            .find(|(proto, _)| *proto == p)
            .unwrap()
            .1
    };
    let (tcp, tls) = (addr(Transport::Tcp), addr(Transport::Tls));
    let http = running.http_addr.unwrap();

    // The flood.
    let t0 = Instant::now();
    let mut idle_tcp: Vec<TcpStream> = batched(IDLE_TCP, 250, |i| async move {
        connect_from(source(i), tcp).await.unwrap()
    })
    .await;
    let mut half_tls: Vec<TcpStream> = batched(HALF_OPEN_TLS, 250, |i| async move {
        let mut s = connect_from(source(i), tls).await.unwrap();
        // A TLS record header announcing a ClientHello that never comes.
        s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        s
    })
    .await;
    let ws = batched(IDLE_WS, 100, |i| async move {
        let s = connect_from(source(i), http).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{http}/flood-{i}"), s)
            .await
            .expect("idle WebSocket refused");
        ws
    })
    .await;
    println!(
        "flood held after {:?}: {} idle TCP, {} half-open TLS, {} idle WebSocket",
        t0.elapsed(),
        idle_tcp.len(),
        half_tls.len(),
        ws.len()
    );
    let m = http_get(http, "/metrics").await;
    assert!(
        metric(&m, "kyuu_conns_open", &["listener=\"stun\""]) >= (IDLE_TCP + HALF_OPEN_TLS) as f64,
        "the STUN/TURN listeners hold the flood:\n{m}"
    );
    assert!(metric(&m, "kyuu_conns_open", &["listener=\"http\""]) >= IDLE_WS as f64);

    // A legitimate client is served meanwhile.
    let t1 = Instant::now();
    allocate_and_relay_over_tcp(tcp).await;
    signaling_exchange(http).await;
    let health = http_get(http, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    println!("legitimate client served in {:?}", t1.elapsed());
    assert!(
        t0.elapsed() < Duration::from_secs(FIRST_MESSAGE_SECS),
        "the flood was not held for the whole legitimate exchange (slow machine?)"
    );

    // Per-IP caps: one more source opens more than its share of each.
    let greedy = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 250));
    let mut stun_conns = Vec::new();
    for _ in 0..STUN_CAP + 10 {
        stun_conns.push(connect_from(greedy, tcp).await.unwrap());
    }
    let mut http_conns = Vec::new();
    for _ in 0..HTTP_CAP + 10 {
        http_conns.push(connect_from(greedy, http).await.unwrap());
    }
    let refused = futures_util::future::join_all(
        stun_conns
            .iter_mut()
            .chain(http_conns.iter_mut())
            .map(|s| closed_within(s, Duration::from_millis(500))),
    )
    .await
    .into_iter()
    .filter(|c| *c)
    .count();
    assert_eq!(
        refused, 20,
        "exactly the connections over the caps are closed at once"
    );
    drop(stun_conns);
    drop(http_conns);

    // Slow headers: half a request, then nothing.
    let mut slow = connect_from(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 251)), http)
        .await
        .unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(&mut slow, Duration::from_secs(HEADER_SECS + 5)).await,
        "slow headers not cut off"
    );

    // The deadlines close the idle TCP and half-open TLS flood; the WebSockets stay.
    let deadline = Instant::now() + Duration::from_secs(FIRST_MESSAGE_SECS + 20);
    let m = loop {
        let m = http_get(http, "/metrics").await;
        let idle = metric(
            &m,
            "kyuu_conn_closed_total",
            &["listener=\"stun_tcp\"", "reason=\"first_message_timeout\""],
        );
        let hs = metric(
            &m,
            "kyuu_conn_closed_total",
            &["listener=\"stun_tls\"", "reason=\"tls_handshake_timeout\""],
        );
        if idle >= IDLE_TCP as f64 && hs >= HALF_OPEN_TLS as f64 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "idle connections not closed: {idle} first-message, {hs} TLS handshake timeouts"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    for s in idle_tcp
        .iter_mut()
        .step_by(97)
        .chain(half_tls.iter_mut().step_by(97))
    {
        assert!(closed_within(s, Duration::from_secs(2)).await);
    }
    let refused_stun = metric(
        &m,
        "kyuu_conn_refused_total",
        &["listener=\"stun\"", "reason=\"per_ip_cap\""],
    );
    let refused_http = metric(
        &m,
        "kyuu_conn_refused_total",
        &["listener=\"http\"", "reason=\"per_ip_cap\""],
    );
    let slow_closed = metric(
        &m,
        "kyuu_conn_closed_total",
        &["listener=\"http\"", "reason=\"header_timeout\""],
    );
    println!(
        "refused per IP: stun {refused_stun}, http {refused_http}; header timeouts {slow_closed}"
    );
    assert_eq!(refused_stun, 10.0);
    assert_eq!(refused_http, 10.0);
    assert!(slow_closed >= 1.0);
    // Only the greedy source's STUN connections were still open: all closed by now.
    assert_eq!(
        metric(&m, "kyuu_conns_open", &["listener=\"stun\""]),
        0.0,
        "{m}"
    );
    assert!(metric(&m, "kyuu_conns_open", &["listener=\"http\""]) >= IDLE_WS as f64);
    drop(ws);
    running.shutdown(Duration::from_millis(500)).await;
}
