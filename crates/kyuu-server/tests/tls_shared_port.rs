//! TURN over TLS beside HTTPS on one port (`http.tls_turn`): curl gets `/healthz` over HTTPS,
//! a TURN client allocates over TLS on the same port with ALPN `stun.turn`, one without ALPN is
//! recognised by its first bytes, and coturn's `turnutils_uclient -S` relays through it with no
//! loss (SKIP without curl/coturn's tools, a failure with `KYUU_INTEROP_REQUIRED=1`).
#![allow(clippy::unwrap_used)]

mod common;
use common::have;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kyuu_client::turn::{Client, Event};
use kyuu_server::config::Config;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn start() -> (kyuu_server::Running, SocketAddr) {
    let text = "[listen]\nudp = [\"127.0.0.1:0\"]\ntcp = []\ntls = []\nthreads = 1\n\
        [turn]\nstrict_channel_numbers = false\nallow_peers = [\"127.0.0.0/8\"]\nunauth_rate = 0\nrelay_ipv4 = \"127.0.0.1\"\n\
        [[turn.users]]\nname = \"u\"\npassword = \"p\"\n\
        [http]\nlisten = \"127.0.0.1:0\"\ntls_listen = \"127.0.0.1:0\"\ntls_turn = true\n\
        tls_turn_names = [\"turn.localhost\"]\nmetrics = false\n";
    let c = Config::from_toml(text, "t").unwrap();
    c.validate().unwrap();
    let r = kyuu_server::start(c).await.unwrap();
    let a = r.https_addr.unwrap();
    (r, a)
}

async fn tls(addr: SocketAddr, alpn: &[&[u8]], sni: &str) -> Tls {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(common::AnyCert))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_owned()).unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap()
}

async fn stream_event(s: &mut Tls, c: &mut Client) -> Event {
    common::stream_event(s, c, 5).await
}

async fn allocate_over(mut s: Tls) -> SocketAddr {
    let local = s.get_ref().0.local_addr().unwrap();
    let mut c = Client::new("u", "p", true);
    c.allocate(Instant::now());
    let Event::Allocated { mapped, .. } = stream_event(&mut s, &mut c).await else {
        panic!("allocate over the shared port failed")
    };
    assert_eq!(mapped, Some(local));
    local
}

#[tokio::test]
async fn https_and_turn_share_one_tls_port() {
    let (running, addr) = start().await;
    // The ICE servers include a turns: URL on the HTTPS port... when it is a fixed port; here it
    // is port 0, so only check the listener works.

    // TURN with ALPN stun.turn, with a TURN SNI name and no ALPN, and with neither (sniffed).
    allocate_over(tls(addr, &[b"stun.turn"], "localhost").await).await;
    allocate_over(tls(addr, &[], "turn.localhost").await).await;
    allocate_over(tls(addr, &[], "localhost").await).await;

    // HTTPS on the same port, with ALPN http/1.1 and without.
    for alpn in [&[b"http/1.1" as &[u8]][..], &[]] {
        let mut s = tls(addr, alpn, "localhost").await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut body = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    }

    if have("curl") {
        let out = tokio::process::Command::new("curl")
            .args(["-sk", "--max-time", "10"])
            .arg(format!("https://127.0.0.1:{}/healthz", addr.port()))
            .output()
            .await
            .unwrap();
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.contains("\"status\":\"ok\""), "curl: {body}");
    }

    if have("turnutils_uclient") && have("turnutils_peer") {
        let peer_port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut peer = tokio::process::Command::new("turnutils_peer")
            .args(["-L", "127.0.0.1", "-p", &peer_port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let args = [
            "-S",
            "-t",
            "-u",
            "u",
            "-w",
            "p",
            "-p",
            &addr.port().to_string(),
            "-e",
            "127.0.0.1",
            "-r",
            &peer_port.to_string(),
            "-n",
            "20",
            "-m",
            "2",
            "-l",
            "120",
            "-z",
            "5",
            "127.0.0.1",
        ];
        let out = tokio::time::timeout(
            Duration::from_secs(60),
            tokio::process::Command::new("turnutils_uclient")
                .args(args)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("turnutils_uclient timed out")
        .unwrap();
        let _ = peer.start_kill();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let lost = text
            .lines()
            .rev()
            .find_map(|l| l.split("Total lost packets").nth(1))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok());
        assert_eq!(lost, Some(0), "uclient -S on the HTTPS port:\n{text}");
    }
    running.shutdown(Duration::from_millis(200)).await;
}

#[test]
fn tls_turn_needs_tls_listen() {
    let c = Config::from_toml("[http]\ntls_turn = true\n", "t").unwrap();
    let e = c.validate().unwrap_err().to_string();
    assert!(e.starts_with("http.tls_turn: needs http.tls_listen"), "{e}");
}
