//! A small, seedable random number source for jitter.
//!
//! Jitter in backoff, open-circuit durations and probe spreading goes through
//! the [`Rng`] trait, so tests pass a [`SeededRng`] (or no jitter at all) and
//! get the same sequence every run.
//!
//! # Example
//!
//! ```
//! use tower_qwen::util::rng::{Rng, SeededRng};
//! let mut a = SeededRng::new(7);
//! let mut b = SeededRng::new(7);
//! assert_eq!(a.next_u64(), b.next_u64());
//! let x = a.next_f64();
//! assert!((0.0..1.0).contains(&x));
//! ```

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// A source of random numbers for jitter.
pub trait Rng: Send + 'static {
    /// The next 64 random bits.
    fn next_u64(&mut self) -> u64;

    /// A uniformly distributed float in `[0, 1)`.
    fn next_f64(&mut self) -> f64 {
        // 53 random bits -> [0, 1)
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// SplitMix64: fast, statistically fine for jitter, and fully determined by
/// its seed.
#[derive(Debug, Clone)]
pub struct SeededRng {
    state: u64,
}

impl SeededRng {
    /// A generator that yields the same sequence for the same `seed`.
    pub const fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    /// A generator seeded from the process's hash randomness (not
    /// reproducible; the default outside tests).
    pub fn from_entropy() -> Self {
        Self::new(RandomState::new().hash_one(0x5157_454e_u64))
    }
}

impl Default for SeededRng {
    /// Default is [`SeededRng::from_entropy`].
    fn default() -> Self {
        Self::from_entropy()
    }
}

impl Rng for SeededRng {
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_are_in_range_and_spread() {
        let mut r = SeededRng::new(1);
        let mut lo = 0;
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            if x < 0.5 {
                lo += 1;
            }
        }
        assert!((4_500..5_500).contains(&lo), "{lo}");
    }

    #[test]
    fn rng_obj_safe() {
        fn _f(_: &mut dyn Rng) {}
    }
}
