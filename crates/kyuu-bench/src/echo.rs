//! The UDP echo peer: sends every datagram back where it came from (a relay address, or the
//! client itself for the no-server bound).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::{Events, Interest, Poll, Token};
use socket2::{Domain, Protocol, Socket, Type};

use crate::batch;

/// A running echo thread; stopped and joined when dropped.
#[derive(Debug)]
pub struct Echo {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    received: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

pub const SOCKET_BUFFER: usize = 4 << 20;

/// A UDP socket bound to `addr` with large buffers.
pub fn udp_socket(addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    let _ = s.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(SOCKET_BUFFER);
    s.bind(&addr.into())?;
    Ok(s.into())
}

impl Echo {
    pub fn start() -> anyhow::Result<Echo> {
        Self::start_at(SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// An echo peer on `addr` (the lab benchmark: a peer host's address in its namespace).
    pub fn start_at(addr: SocketAddr) -> anyhow::Result<Echo> {
        let std_sock = udp_socket(addr)?;
        std_sock.set_nonblocking(true)?;
        let addr = std_sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let mut poll = Poll::new()?;
        let mut sock = mio::net::UdpSocket::from_std(std_sock);
        poll.registry()
            .register(&mut sock, Token(0), Interest::READABLE)?;
        let mut rx = batch::Receiver::new(&UdpSocket::bind("127.0.0.1:0")?)?;
        let thread = {
            let stop = Arc::clone(&stop);
            let received = Arc::clone(&received);
            std::thread::Builder::new()
                .name("echo".into())
                .spawn(move || {
                    let mut events = Events::with_capacity(8);
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if poll
                            .poll(&mut events, Some(Duration::from_millis(50)))
                            .is_err()
                        {
                            continue;
                        }
                        // Drain (bounded) before publishing the counter.
                        for _ in 0..64 {
                            let Ok(n) = rx.recv(&sock) else {
                                break;
                            };
                            let items: Vec<(&[u8], SocketAddr)> =
                                (0..n).map(|i| rx.datagram(i)).collect();
                            count += (0..n).map(|i| rx.segments(i) as u64).sum::<u64>();
                            batch::send_to_each(&sock, &items);
                        }
                        received.store(count, Ordering::Relaxed);
                    }
                })?
        };
        Ok(Echo {
            addr,
            stop,
            received,
            thread: Some(thread),
        })
    }

    /// Datagrams received so far (published every few hundred, or on idle).
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
