//! The relay port pool of one shard: a bitmap per address family over all 65,536 ports, of
//! which the shard hands out its own slice of `turn.relay_ports` (RFC 8656 §7.2: the server picks
//! the relayed port; EVEN-PORT asks for an even one with the next one kept free, §14.6).

use crate::config::PortRange;
use crate::server::rng::Rng;
use crate::types::Family;

const WORDS: usize = 65536 / 64;

#[derive(Debug)]
pub(crate) struct PortPool {
    range: PortRange,
    used: [Vec<u64>; 2],
}

impl PortPool {
    pub fn new(range: PortRange) -> Self {
        PortPool {
            range,
            used: [vec![0u64; WORDS], vec![0u64; WORDS]],
        }
    }

    fn is_used(&self, f: Family, port: u16) -> bool {
        let (w, b) = (usize::from(port) / 64, usize::from(port) % 64);
        self.used[f.index()]
            .get(w)
            .is_none_or(|word| word & (1 << b) != 0)
    }

    fn set(&mut self, f: Family, port: u16, used: bool) {
        let (w, b) = (usize::from(port) / 64, usize::from(port) % 64);
        if let Some(word) = self.used[f.index()].get_mut(w) {
            if used {
                *word |= 1 << b;
            } else {
                *word &= !(1 << b);
            }
        }
    }

    /// Marks `port` taken (a reservation's port, or the odd half of an EVEN-PORT pair).
    pub fn mark(&mut self, f: Family, port: u16) {
        self.set(f, port, true);
    }

    pub fn release(&mut self, f: Family, port: u16) {
        self.set(f, port, false);
    }

    /// Picks a free port in this shard's range, starting at a random place (even, with the next
    /// one free too, when `even`), and marks it used.
    pub fn pick(&mut self, f: Family, even: bool, rng: &mut Rng) -> Option<u16> {
        let PortRange { min, max } = self.range;
        let span = u32::from(max) - u32::from(min) + 1;
        let start = (rng.next() % u64::from(span)) as u32;
        for i in 0..span {
            let port = (u32::from(min) + (start + i) % span) as u16;
            if even && (!port.is_multiple_of(2) || port == u16::MAX || port >= max) {
                continue;
            }
            if self.is_used(f, port) || (even && self.is_used(f, port + 1)) {
                continue;
            }
            self.mark(f, port);
            return Some(port);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_pick_leaves_the_next_port_free_and_pool_runs_dry() {
        let mut pool = PortPool::new(PortRange {
            min: 50000,
            max: 50003,
        });
        let mut rng = Rng::new(7);
        let p = pool.pick(Family::V4, true, &mut rng);
        assert!(p.is_some_and(|p| p % 2 == 0 && !pool.is_used(Family::V4, p + 1)));
        let mut n = 1;
        while pool.pick(Family::V4, false, &mut rng).is_some() {
            n += 1;
        }
        assert_eq!(n, 4);
        assert!(pool.pick(Family::V6, false, &mut rng).is_some());
    }
}
