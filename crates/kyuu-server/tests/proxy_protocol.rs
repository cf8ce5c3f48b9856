//! PROXY protocol v2 over real sockets: hand-made headers in front of UDP datagrams (the DGRAM
//! form) and TCP connections make kyuu see the client named in the header (XOR-MAPPED-ADDRESS,
//! the allocation's client), answers go back through the "balancer" socket, untrusted sources
//! and missing headers are dropped and counted in `/metrics`; and HAProxy with `send-proxy-v2`
//! in front of kyuu's TCP listener (SKIP without `haproxy`, a failure with
//! `KYUU_INTEROP_REQUIRED=1`).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_server::config::Config;
use kyuu_server::proxy;
use kyuu_server::relay::Transport;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UdpSocket};

/// A server whose UDP and TCP listeners on 127.0.0.1 expect PROXY v2 headers from `trusted`.
async fn start(trusted: &str) -> kyuu_server::Running {
    let udp_port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{udp_port}").parse().unwrap();
    let text = format!(
        "[listen]\nudp = [\"{addr}\"]\ntcp = [\"{addr}\"]\ntls = []\nthreads = 1\n\
         [[listen.proxy_protocol]]\ntransport = \"udp\"\nlisten = \"{addr}\"\ntrusted = [\"{trusted}\"]\n\
         [[listen.proxy_protocol]]\ntransport = \"tcp\"\nlisten = \"{addr}\"\ntrusted = [\"{trusted}\"]\n\
         [turn]\nallow_peers = [\"127.0.0.0/8\"]\nunauth_rate = 0\n\
         [[turn.users]]\nname = \"u\"\npassword = \"p\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n"
    );
    let c = Config::from_toml(&text, "proxy test").unwrap();
    c.validate().unwrap();
    kyuu_server::start(c).await.unwrap()
}

fn udp_addr(r: &kyuu_server::Running) -> SocketAddr {
    r.listeners
        .iter()
        .find(|(p, _)| *p == Transport::Udp)
        .unwrap()
        .1
}

async fn metrics(r: &kyuu_server::Running) -> String {
    let mut s = TcpStream::connect(r.http_addr.unwrap()).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn refused(metrics: &str, transport: &str, reason: &str) -> u64 {
    let want = format!(
        "kyuu_proxy_protocol_refused_total{{transport=\"{transport}\",reason=\"{reason}\"}} "
    );
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

/// The "balancer": a UDP socket that prefixes every datagram with a header for `client`.
struct Balancer {
    sock: UdpSocket,
    server: SocketAddr,
    header: Vec<u8>,
}

impl Balancer {
    async fn exchange(&self, c: &mut Client) -> Event {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        loop {
            while let Some(t) = c.poll_transmit() {
                let mut d = self.header.clone();
                d.extend_from_slice(&t);
                self.sock.send_to(&d, self.server).await.unwrap();
            }
            if let Some(e) = c.poll_event() {
                return e;
            }
            assert!(Instant::now() < deadline, "no answer");
            // Answers come back to the balancer, without a header.
            if let Ok(Ok((n, _))) =
                tokio::time::timeout(Duration::from_millis(100), self.sock.recv_from(&mut buf))
                    .await
            {
                c.handle_input(Instant::now(), &buf[..n]);
            }
            c.handle_timeout(Instant::now());
        }
    }
}

#[tokio::test]
async fn udp_dgram_headers_name_the_client() {
    let running = start("127.0.0.0/8").await;
    let server = udp_addr(&running);
    let real: SocketAddr = "203.0.113.7:50000".parse().unwrap();
    let lb = Balancer {
        sock: UdpSocket::bind("127.0.0.1:0").await.unwrap(),
        server,
        // A header written by hand: signature, v2 PROXY (0x21), AF_INET + DGRAM (0x12),
        // 12 address bytes: 203.0.113.7 -> 127.0.0.1, ports 50000 -> the server's.
        header: {
            let mut h = vec![
                0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A, 0x21, 0x12,
                0x00, 0x0C, 203, 0, 113, 7, 127, 0, 0, 1, 0xC3, 0x50,
            ];
            h.extend_from_slice(&server.port().to_be_bytes());
            assert_eq!(h, proxy::encode(real, server, true));
            h
        },
    };
    // Binding: the mapped address is the client in the header.
    let mut c = Client::new("u", "p", false);
    c.binding(Instant::now());
    assert_eq!(lb.exchange(&mut c).await, Event::Mapped { mapped: real });

    // A TURN allocation for that client; a peer's data comes back through the balancer.
    c.allocate(Instant::now());
    let Event::Allocated {
        relayed, mapped, ..
    } = lb.exchange(&mut c).await
    else {
        panic!("allocate failed")
    };
    assert_eq!(mapped, Some(real));
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    c.create_permission(Instant::now(), &[peer.local_addr().unwrap()]);
    assert_eq!(lb.exchange(&mut c).await, Event::PermissionCreated);
    peer.send_to(b"hello client", relayed[0]).await.unwrap();
    assert_eq!(
        lb.exchange(&mut c).await,
        Event::Data {
            peer: peer.local_addr().unwrap(),
            data: b"hello client".to_vec()
        }
    );

    // From a trusted source without a header: dropped and counted.
    let bare = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut c2 = Client::new("u", "p", false);
    c2.binding(Instant::now());
    bare.send_to(&c2.poll_transmit().unwrap(), server)
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), bare.recv_from(&mut buf))
            .await
            .is_err(),
        "a datagram without a PROXY header must not be answered"
    );
    let m = metrics(&running).await;
    assert!(refused(&m, "udp", "no_header") >= 1, "{m}");
    running.shutdown(Duration::from_millis(100)).await;
}

#[tokio::test]
async fn untrusted_sources_are_refused() {
    let running = start("192.0.2.0/24").await;
    let server = udp_addr(&running);
    let real: SocketAddr = "203.0.113.7:50000".parse().unwrap();
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut c = Client::new("u", "p", false);
    c.binding(Instant::now());
    let mut d = proxy::encode(real, server, true);
    d.extend_from_slice(&c.poll_transmit().unwrap());
    sock.send_to(&d, server).await.unwrap();
    let mut buf = [0u8; 512];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv_from(&mut buf))
            .await
            .is_err()
    );
    // TCP from an untrusted address: closed at once.
    let tcp_addr = running
        .listeners
        .iter()
        .find(|(p, _)| *p == Transport::Tcp)
        .unwrap()
        .1;
    let mut t = TcpStream::connect(tcp_addr).await.unwrap();
    let mut b = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(2), t.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0, "untrusted TCP connection closed");
    let m = metrics(&running).await;
    assert!(refused(&m, "udp", "untrusted") >= 1, "{m}");
    assert!(refused(&m, "tcp", "untrusted") >= 1, "{m}");
    running.shutdown(Duration::from_millis(100)).await;
}

async fn stream_event(s: &mut TcpStream, c: &mut Client) -> Event {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        while let Some(b) = c.poll_transmit() {
            s.write_all(&b).await.unwrap();
        }
        if let Some(e) = c.poll_event() {
            return e;
        }
        assert!(Instant::now() < deadline, "no event");
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

#[tokio::test]
async fn tcp_stream_header_names_the_client() {
    let running = start("127.0.0.0/8").await;
    let tcp_addr = running
        .listeners
        .iter()
        .find(|(p, _)| *p == Transport::Tcp)
        .unwrap()
        .1;
    let real: SocketAddr = "[2001:db8::9]:41000".parse().unwrap();
    let mut s = TcpStream::connect(tcp_addr).await.unwrap();
    // The header arrives in two pieces: kyuu must wait for all of it.
    let h = proxy::encode(real, tcp_addr, false);
    s.write_all(&h[..7]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    s.write_all(&h[7..]).await.unwrap();
    let mut c = Client::new("u", "p", true);
    c.allocate(Instant::now());
    let Event::Allocated { mapped, .. } = stream_event(&mut s, &mut c).await else {
        panic!("allocate failed")
    };
    assert_eq!(mapped, Some(real));
    running.shutdown(Duration::from_millis(100)).await;
}

/// HAProxy (`mode tcp`, `send-proxy-v2`) in front of kyuu's TCP listener: kyuu sees the TURN
/// client's own address, not HAProxy's.
#[tokio::test]
async fn haproxy_send_proxy_v2_in_front_of_tcp() {
    let required = std::env::var("KYUU_INTEROP_REQUIRED").is_ok_and(|v| v == "1");
    let haproxy = ["/usr/sbin/haproxy", "/usr/bin/haproxy"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let Some(haproxy) = haproxy else {
        assert!(!required, "haproxy required (apt-get install haproxy)");
        println!("SKIP haproxy_send_proxy_v2_in_front_of_tcp: haproxy not installed");
        return;
    };
    let running = start("127.0.0.0/8").await;
    let kyuu_tcp = running
        .listeners
        .iter()
        .find(|(p, _)| *p == Transport::Tcp)
        .unwrap()
        .1;
    let front = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("kyuu-haproxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 64\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
             frontend turn\n  bind {front}\n  default_backend kyuu\n\
             backend kyuu\n  server k {kyuu_tcp} send-proxy-v2\n"
        ),
    )
    .unwrap();
    let mut child = Command::new(haproxy)
        .arg("-db")
        .arg("-f")
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until HAProxy listens.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut s = loop {
        match TcpStream::connect(front).await {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("haproxy did not listen: {e}"),
        }
    };
    let mut c = Client::new("u", "p", true);
    c.allocate(Instant::now());
    let ev = stream_event(&mut s, &mut c).await;
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    let Event::Allocated { mapped, .. } = ev else {
        panic!("allocate through haproxy failed: {ev:?}")
    };
    assert_eq!(
        mapped,
        Some(s.local_addr().unwrap()),
        "kyuu saw the client's address through HAProxy's PROXY v2 header"
    );
    running.shutdown(Duration::from_millis(100)).await;
}

/// PROXY v2 on the HTTP listener (`http.proxy_protocol_trusted`): signaling sees the address in
/// the header (listed by the admin API), and a connection without a header gets no answer.
#[tokio::test]
async fn http_listener_takes_the_client_from_the_header() {
    let text = "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = []\nthreads = 1\n\
        [http]\nlisten = \"127.0.0.1:0\"\nproxy_protocol_trusted = [\"127.0.0.0/8\"]\n\
        [admin]\nlisten = \"127.0.0.1:0\"\n";
    let c = Config::from_toml(text, "t").unwrap();
    c.validate().unwrap();
    let running = kyuu_server::start(c).await.unwrap();
    let http = running.http_addr.unwrap();
    let admin = running.admin_addr.unwrap();
    let real: SocketAddr = "203.0.113.9:40000".parse().unwrap();

    let mut tcp = TcpStream::connect(http).await.unwrap();
    tcp.write_all(&proxy::encode(real, http, false))
        .await
        .unwrap();
    let (_ws, _) = tokio_tungstenite::client_async(format!("ws://{http}/carol"), tcp)
        .await
        .unwrap();
    let mut a = TcpStream::connect(admin).await.unwrap();
    a.write_all(b"GET /admin/v1/signaling HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    a.read_to_string(&mut out).await.unwrap();
    assert!(
        out.contains(r#""id":"carol","ip":"203.0.113.9""#),
        "signaling saw the header's address: {out}"
    );

    // No header: nothing is served.
    let mut bare = TcpStream::connect(http).await.unwrap();
    bare.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(7), bare.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "answered without a PROXY header"
    );
    running.shutdown(Duration::from_millis(100)).await;
}

/// On a TLS listener the header comes before the TLS handshake.
#[tokio::test]
async fn tls_header_precedes_the_handshake() {
    let dir = std::env::temp_dir().join(format!("kyuu-proxy-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tls_addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let text = format!(
        "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = [\"{tls_addr}\"]\nthreads = 1\n\
         tls_cert = \"{}\"\ntls_key = \"{}\"\n\
         [[listen.proxy_protocol]]\ntransport = \"tls\"\nlisten = \"{tls_addr}\"\ntrusted = [\"127.0.0.1/32\"]\n\
         [turn]\nunauth_rate = 0\n[[turn.users]]\nname = \"u\"\npassword = \"p\"\n\
         [http]\nenabled = false\n",
        cert.display(),
        key.display()
    );
    let c = Config::from_toml(&text, "t").unwrap();
    c.validate().unwrap();
    let running = kyuu_server::start(c).await.unwrap();

    let real: SocketAddr = "198.51.100.77:45678".parse().unwrap();
    let mut tcp = TcpStream::connect(tls_addr).await.unwrap();
    tcp.write_all(&proxy::encode(real, tls_addr, false))
        .await
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut c = Client::new("u", "p", true);
    c.allocate(Instant::now());
    let deadline = Instant::now() + Duration::from_secs(5);
    let ev = loop {
        while let Some(b) = c.poll_transmit() {
            s.write_all(&b).await.unwrap();
        }
        if let Some(e) = c.poll_event() {
            break e;
        }
        assert!(Instant::now() < deadline, "no answer over TLS");
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
    };
    let Event::Allocated { mapped, .. } = ev else {
        panic!("{ev:?}")
    };
    assert_eq!(mapped, Some(real));
    running.shutdown(Duration::from_millis(100)).await;
    let _ = std::fs::remove_dir_all(&dir);
}
