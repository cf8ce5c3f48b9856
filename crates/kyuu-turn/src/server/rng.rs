//! The core's cheap pseudo-random numbers, seeded by the shell.

use kyuu_stun::TransactionId;

/// xorshift64*: cheap, and only used where unpredictability against an off-path attacker is
/// enough (transaction ids of indications, port choice, connection ids); reservation tokens mix in
/// the seed as well.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn tid(&mut self) -> TransactionId {
        let a = self.next().to_le_bytes();
        let b = self.next().to_le_bytes();
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&a);
        t[8..].copy_from_slice(&b[..4]);
        TransactionId(t)
    }
}
