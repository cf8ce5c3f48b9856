//! Link impairment without `tc netem`: a userspace Ethernet forwarder.
//!
//! A delayed link is `node veth <-> [a | forwarder | b] <-> veth peer`, where
//! `a` and `b` live in a namespace of their own with no addresses. A thread
//! entered into that namespace holds one `AF_PACKET` raw socket per side,
//! reads every frame, drops it with probability `loss`, and re-sends it on
//! the other side once its release time (`now + delay (+ jitter)`, after
//! serialisation at `rate_bps`) has come. Frames are never reordered.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::sys::{self, Frame, PacketSocket};
use crate::LabError;

/// Largest frame the forwarder handles (offloads are off, so frames are MTU-sized).
const MAX_FRAME: usize = 65_536;
/// Longest the forwarder sleeps before rechecking its stop flag.
const MAX_IDLE: Duration = Duration::from_millis(20);
/// Frames read from one side per loop iteration, so one busy side cannot starve the other.
const RECV_BURST: usize = 256;

/// How a link between two lab nodes behaves, each way (both directions get
/// the same impairment, independently).
#[derive(Clone, Debug, PartialEq)]
pub struct LinkSpec {
    /// One-way delay added to every frame.
    pub delay: Duration,
    /// Extra uniformly random delay in `0..=jitter` (frames keep their order).
    pub jitter: Duration,
    /// Probability in `0.0..=1.0` that a frame is dropped.
    pub loss: f64,
    /// Bottleneck rate in bits per second; `None` for unlimited.
    pub rate_bps: Option<u64>,
    /// Frames queued per direction before tail drop.
    pub queue_limit: usize,
}

impl Default for LinkSpec {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue_limit: 10_000,
        }
    }
}

impl LinkSpec {
    /// A link with this one-way delay and nothing else.
    pub fn delay(delay: Duration) -> Self {
        Self {
            delay,
            ..Self::default()
        }
    }

    /// Same link, dropping each frame with probability `loss`.
    #[must_use]
    pub fn loss(mut self, loss: f64) -> Self {
        self.loss = loss;
        self
    }

    /// Same link, with up to `jitter` extra delay per frame.
    #[must_use]
    pub fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }

    /// Same link, limited to `bps` bits per second.
    #[must_use]
    pub fn rate(mut self, bps: u64) -> Self {
        self.rate_bps = Some(bps);
        self
    }
}

/// Frame counters of one delayed link. Direction "out" is from the node that
/// attached towards the switch/peer, "in" the reverse.
#[derive(Debug, Default)]
pub struct LinkStats {
    /// Frames delivered node -> peer.
    pub out_forwarded: AtomicU64,
    /// Frames delivered peer -> node.
    pub in_forwarded: AtomicU64,
    /// Frames dropped (loss, queue overflow or send error) node -> peer.
    pub out_dropped: AtomicU64,
    /// Frames dropped peer -> node.
    pub in_dropped: AtomicU64,
}

/// Handle to a running forwarder: change its behaviour or read its counters.
/// Cloning shares the same link.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    spec: Arc<Mutex<LinkSpec>>,
    stats: Arc<LinkStats>,
}

impl LinkHandle {
    /// Replace the link's behaviour from now on (frames already queued keep
    /// their release time). Use `LinkSpec::default().loss(1.0)` to cut a link.
    pub fn set(&self, spec: LinkSpec) {
        *self.spec.lock().unwrap_or_else(PoisonError::into_inner) = spec;
    }

    /// The current behaviour.
    pub fn spec(&self) -> LinkSpec {
        self.spec
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Frame counters.
    pub fn stats(&self) -> &LinkStats {
        &self.stats
    }
}

/// A forwarder thread; stopped and joined on drop.
pub(crate) struct Forwarder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Forwarder {
    /// Start forwarding between interfaces `a` (node side) and `b` (peer
    /// side) inside the namespace mounted at `ns_path`. Returns once both
    /// sockets are bound.
    pub(crate) fn start(
        ns_path: PathBuf,
        a: String,
        b: String,
        spec: LinkSpec,
    ) -> Result<(Self, LinkHandle), LabError> {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = LinkHandle {
            spec: Arc::new(Mutex::new(spec)),
            stats: Arc::new(LinkStats::default()),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let stop = Arc::clone(&stop);
            let handle = handle.clone();
            std::thread::Builder::new()
                .name(format!("kyuu-lab-fwd-{a}"))
                .spawn(move || {
                    let sockets = sys::enter_netns(&ns_path)
                        .and_then(|()| Ok((PacketSocket::bind(&a)?, PacketSocket::bind(&b)?)));
                    match sockets {
                        Ok((sa, sb)) => {
                            let _ = ready_tx.send(Ok(()));
                            forward_loop(&sa, &sb, &handle, &stop);
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(|e| LabError::io("spawning forwarder thread", e))?
        };
        let fwd = Self {
            stop,
            thread: Some(thread),
        };
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => Ok((fwd, handle)),
            Ok(Err(e)) => Err(LabError::io("starting forwarder", e)),
            Err(_) => Err(LabError::Timeout {
                what: "forwarder start".into(),
            }),
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            // The loop checks the flag at least every MAX_IDLE.
            let _ = t.join();
        }
    }
}

/// Small xorshift generator: loss decisions need no cryptographic quality.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        static STREAMS: AtomicU64 = AtomicU64::new(0);
        let seed = STREAMS.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)
            ^ u64::from(std::process::id()).rotate_left(32)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Self(seed | 1)
    }

    /// Uniform in [0, 1).
    fn next_f64(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// One direction's queue.
struct Lane {
    queue: VecDeque<(Instant, Vec<u8>)>,
    /// When the bottleneck is free again (rate limiting).
    busy_until: Instant,
    /// Release time of the last queued frame (keeps FIFO order under jitter).
    last_release: Instant,
}

impl Lane {
    fn new(now: Instant) -> Self {
        Self {
            queue: VecDeque::new(),
            busy_until: now,
            last_release: now,
        }
    }

    fn enqueue(&mut self, frame: &[u8], now: Instant, spec: &LinkSpec, rng: &mut Rng) -> bool {
        if spec.loss > 0.0 && rng.next_f64() < spec.loss {
            return false;
        }
        if self.queue.len() >= spec.queue_limit {
            return false;
        }
        let mut depart = now;
        if let Some(bps) = spec.rate_bps.filter(|b| *b > 0) {
            let bits = (frame.len() as u64).saturating_mul(8);
            let tx = Duration::from_nanos(bits.saturating_mul(1_000_000_000) / bps);
            depart = self.busy_until.max(now) + tx;
            self.busy_until = depart;
        }
        let jitter = spec.jitter.mul_f64(rng.next_f64());
        let release = (depart + spec.delay + jitter).max(self.last_release);
        self.last_release = release;
        self.queue.push_back((release, frame.to_vec()));
        true
    }

    /// Send every frame due by `now`; returns how many were sent and failed.
    fn flush(&mut self, out: &PacketSocket, now: Instant) -> (u64, u64) {
        let (mut sent, mut failed) = (0, 0);
        while self.queue.front().is_some_and(|(t, _)| *t <= now) {
            let Some((_, frame)) = self.queue.pop_front() else {
                break;
            };
            match out.send(&frame) {
                Ok(()) => sent += 1,
                Err(_) => failed += 1,
            }
        }
        (sent, failed)
    }

    fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }
}

fn forward_loop(a: &PacketSocket, b: &PacketSocket, handle: &LinkHandle, stop: &AtomicBool) {
    let mut rng = Rng::new();
    let mut buf = vec![0u8; MAX_FRAME];
    let start = Instant::now();
    let mut out = Lane::new(start); // a -> b
    let mut inn = Lane::new(start); // b -> a
    let stats = &handle.stats;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        let (s, f) = out.flush(b, now);
        stats.out_forwarded.fetch_add(s, Ordering::Relaxed);
        stats.out_dropped.fetch_add(f, Ordering::Relaxed);
        let (s, f) = inn.flush(a, now);
        stats.in_forwarded.fetch_add(s, Ordering::Relaxed);
        stats.in_dropped.fetch_add(f, Ordering::Relaxed);

        let due = [out.next_due(), inn.next_due()].into_iter().flatten().min();
        let timeout = due.map_or(MAX_IDLE, |t| t.saturating_duration_since(now).min(MAX_IDLE));
        let Ok((ra, rb)) = sys::poll2(a, b, timeout) else {
            // A poll error on our own sockets is not recoverable; avoid a busy loop.
            std::thread::sleep(MAX_IDLE);
            continue;
        };
        if !(ra || rb) {
            continue;
        }
        let spec = handle.spec();
        let now = Instant::now();
        for (ready, sock, lane, dropped) in [
            (ra, a, &mut out, &stats.out_dropped),
            (rb, b, &mut inn, &stats.in_dropped),
        ] {
            if !ready {
                continue;
            }
            for _ in 0..RECV_BURST {
                match sock.recv(&mut buf) {
                    Ok(Some(Frame::Received(n))) => {
                        let frame = buf.get(..n).unwrap_or_default();
                        if !lane.enqueue(frame, now, &spec, &mut rng) {
                            dropped.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(Some(Frame::Skipped)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_never_reorders() {
        let now = Instant::now();
        let mut lane = Lane::new(now);
        let mut rng = Rng::new();
        let spec = LinkSpec::delay(Duration::from_millis(5)).jitter(Duration::from_millis(20));
        for i in 0..200u64 {
            assert!(lane.enqueue(
                &[0u8; 100],
                now + Duration::from_micros(i * 10),
                &spec,
                &mut rng
            ));
        }
        let times: Vec<Instant> = lane.queue.iter().map(|(t, _)| *t).collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times.iter().all(|t| *t >= now + Duration::from_millis(5)));
    }

    #[test]
    fn rate_spaces_frames_by_serialisation_time() {
        let now = Instant::now();
        let mut lane = Lane::new(now);
        let mut rng = Rng::new();
        // 1000 bytes at 8 Mbit/s = 1 ms each.
        let spec = LinkSpec::delay(Duration::from_millis(10)).rate(8_000_000);
        for _ in 0..3 {
            assert!(lane.enqueue(&[0u8; 1000], now, &spec, &mut rng));
        }
        let times: Vec<Duration> = lane.queue.iter().map(|(t, _)| *t - now).collect();
        assert_eq!(times, [11, 12, 13].map(Duration::from_millis));
    }

    #[test]
    fn loss_and_queue_limit_drop() {
        let now = Instant::now();
        let mut rng = Rng::new();
        let mut lane = Lane::new(now);
        let all_lost = LinkSpec::default().loss(1.0);
        assert!(!lane.enqueue(&[0u8; 10], now, &all_lost, &mut rng));
        let tiny = LinkSpec {
            queue_limit: 2,
            ..LinkSpec::default()
        };
        assert!(lane.enqueue(&[0u8; 10], now, &tiny, &mut rng));
        assert!(lane.enqueue(&[0u8; 10], now, &tiny, &mut rng));
        assert!(!lane.enqueue(&[0u8; 10], now, &tiny, &mut rng));
    }
}
