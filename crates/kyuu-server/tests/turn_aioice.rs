//! Interop with an independent TURN client library: Python's `aioice` (`pip install aioice`)
//! allocates on kyuu over UDP and TCP, binds channels as it sends, and relays to a UDP echo peer.
//! Skips with a SKIP line when python3 or aioice is missing, unless KYUU_INTEROP_REQUIRED=1.
#![allow(clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use kyuu_server::relay::Transport;
use kyuu_server::relay::{self, ListenConfig};
use kyuu_turn::{TurnConfig, UserConfig};

const SCRIPT: &str = r#"
import asyncio, sys
from aioice import turn

host, port, user, password, transport = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
COUNT = 50

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, data, addr): self.t.sendto(data, addr)

class Client(asyncio.DatagramProtocol):
    def __init__(self): self.got = []; self.done = asyncio.get_event_loop().create_future()
    def datagram_received(self, data, addr):
        self.got.append(data)
        if len(self.got) == COUNT and not self.done.done(): self.done.set_result(True)

async def main():
    loop = asyncio.get_event_loop()
    echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
    peer = echo_t.get_extra_info("sockname")
    t, p = await turn.create_turn_endpoint(Client, server_addr=(host, port), username=user, password=password, transport=transport)
    relayed = t.get_extra_info("sockname")
    print("relayed", relayed, "mapped", t.get_extra_info("related_address"))
    for i in range(COUNT):
        t.sendto(b"packet %d" % i, peer)
        await asyncio.sleep(0.005)
    try:
        await asyncio.wait_for(p.done, 5)
    except asyncio.TimeoutError:
        pass
    print("received", len(p.got), "of", COUNT)
    t.close()
    await asyncio.sleep(0.2)
    sys.exit(0 if len(p.got) == COUNT else 1)

asyncio.run(main())
"#;

fn aioice_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import aioice"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        if std::env::var("KYUU_INTEROP_REQUIRED").as_deref() == Ok("1") {
            panic!("python3 with aioice is required (KYUU_INTEROP_REQUIRED=1): pip install aioice");
        }
        println!("SKIP: python3 module aioice not installed (pip install aioice)");
    }
    ok
}

#[tokio::test]
async fn aioice_client_relays_over_udp_and_tcp() {
    if !aioice_available() {
        return;
    }
    let turn = TurnConfig {
        users: vec![UserConfig {
            name: "u".into(),
            password: Some("p".into()),
            key: None,
            key_sha256: None,
        }],
        allow_peers: vec!["127.0.0.0/8".parse().unwrap()],
        ..Default::default()
    };
    let l = ListenConfig {
        threads: 2,
        ..ListenConfig::on(&["127.0.0.1:0".parse().unwrap()], &[])
    };
    let h = relay::start(&l, turn, None).await.unwrap();
    let dir = std::env::temp_dir().join(format!("kyuu-aioice-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("client.py");
    std::fs::write(&script, SCRIPT).unwrap();
    for (transport, addr) in [
        ("udp", h.addr(Transport::Udp).unwrap()),
        ("tcp", h.addr(Transport::Tcp).unwrap()),
    ] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new("python3")
                .arg(&script)
                .args([
                    addr.ip().to_string(),
                    addr.port().to_string(),
                    "u".into(),
                    "p".into(),
                    transport.to_string(),
                ])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap()
        .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("aioice over {transport}: {text}");
        assert!(
            out.status.success(),
            "aioice over {transport} failed:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    h.shutdown().await;
}
