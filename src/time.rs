//! The crate's one clock.
//!
//! Every time read in tower-qwen goes through this module, so that
//! `#[tokio::test(start_paused = true)]` plus [`tokio::time::advance`] drives
//! both the decisions (buckets, breakers, backoff) and the waits. Pure cores
//! take an [`Instant`] argument instead of reading the clock themselves.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! let t0 = tower_qwen::time::now();
//! tokio::time::advance(Duration::from_secs(5)).await;
//! assert!(tower_qwen::time::now() - t0 >= Duration::from_secs(5));
//! # }
//! ```

use std::time::{Duration, SystemTime};

/// The instant type used everywhere in the crate: tokio's, so that paused
/// test time applies.
pub type Instant = tokio::time::Instant;

/// The current instant from tokio's clock (paused and advanced in tests).
#[inline]
pub fn now() -> Instant {
    tokio::time::Instant::now()
}

/// Wall-clock time, used only to interpret HTTP-date `Retry-After` values.
///
/// This is the one place the crate reads the system clock.
pub fn system_now() -> SystemTime {
    SystemTime::now()
}

/// Nanoseconds in a [`Duration`], saturating at `u64::MAX` (~584 years).
#[inline]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
