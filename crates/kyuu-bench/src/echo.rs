//! The UDP echo peer: sends every datagram back where it came from (a relay address, or the
//! client itself for the no-server bound).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

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
        let sock = udp_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let thread = {
            let stop = Arc::clone(&stop);
            let received = Arc::clone(&received);
            std::thread::Builder::new()
                .name("echo".into())
                .spawn(move || {
                    let mut buf = [0u8; 2048];
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        // Drain a batch before publishing the counter.
                        for _ in 0..256 {
                            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                                break;
                            };
                            count += 1;
                            let _ = sock.send_to(&buf[..n], from);
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
