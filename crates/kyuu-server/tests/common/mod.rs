//! Helpers shared by the STUN/TURN socket tests.
#![allow(clippy::unwrap_used)]

/// A port and the next one, both free for UDP and TCP on 127.0.0.1 and 127.0.0.2 (RFC 5780
/// tests listen on the primary and alternate IP and port).
pub fn free_port_pair() -> (u16, u16) {
    for _ in 0..50 {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = s.local_addr().unwrap().port();
        drop(s);
        if p > 65000 {
            continue;
        }
        let q = p + 1;
        let ok = ["127.0.0.1", "127.0.0.2"].iter().all(|ip| {
            [p, q].iter().all(|port| {
                std::net::UdpSocket::bind((*ip, *port)).is_ok()
                    && std::net::TcpListener::bind((*ip, *port)).is_ok()
            })
        });
        if ok {
            return (p, q);
        }
    }
    panic!("no free port pair");
}
