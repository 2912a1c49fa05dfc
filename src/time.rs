//! The crate's one clock.
//!
//! Every time read in tower-qwen goes through this module, so that
//! `#[tokio::test(start_paused = true)]` plus `tokio::time::advance` drives
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

/// A request's total deadline, carried as a request extension.
///
/// The retry layer never starts a wait that would end past it and gives up
/// with the last answer instead; the timeout layer cuts the exchange
/// (response body included) when it passes. The retry layer inserts it when
/// it is configured with a total deadline (keeping an earlier one already
/// present), so a timeout layer further in bounds every attempt by it.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread", start_paused = true)]
/// # async fn main() {
/// use std::time::Duration;
/// use tower_qwen::time::Deadline;
///
/// let mut req = http::Request::new(());
/// Deadline::after(Duration::from_secs(30)).tighten(&mut req);
/// Deadline::after(Duration::from_secs(60)).tighten(&mut req); // later: ignored
/// let d = Deadline::of(&req).unwrap();
/// assert_eq!(d.remaining(), Duration::from_secs(30));
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Deadline(pub Instant);

impl Deadline {
    /// The deadline `d` from now.
    pub fn after(d: Duration) -> Self {
        Self(now().checked_add(d).unwrap_or_else(far_future))
    }

    /// The deadline in `req`'s extensions, if any.
    pub fn of<B>(req: &http::Request<B>) -> Option<Self> {
        req.extensions().get::<Self>().copied()
    }

    /// Stores this deadline in `req` unless an earlier one is there; returns
    /// the deadline now in force.
    pub fn tighten<B>(self, req: &mut http::Request<B>) -> Self {
        let ext = req.extensions_mut();
        match ext.get::<Self>() {
            Some(&cur) if cur <= self => cur,
            _ => {
                ext.insert(self);
                self
            }
        }
    }

    /// Time left until the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.0.saturating_duration_since(now())
    }
}

/// An instant about thirty years ahead, for "never" that still fits.
pub(crate) fn far_future() -> Instant {
    now() + Duration::from_secs(86_400 * 365 * 30)
}

/// Nanoseconds in a [`Duration`], saturating at `u64::MAX` (~584 years).
#[allow(dead_code)] // used by several optional layers
#[inline]
pub(crate) fn duration_nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
