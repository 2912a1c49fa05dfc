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

thread_local! {
    /// The instant read by the outermost layer of a call that is being
    /// made on this thread (see [`CallClock`]).
    static CALL_NOW: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// One clock read shared by the layers a call passes through: while it
/// lives, [`call_now`] on this thread answers the instant it was made with,
/// instead of reading the clock again. A layer that reads the clock in its
/// `call` makes one around its inner service's `call`, so the layers below
/// it (which run in the same synchronous `call`) take its reading; a future
/// polled later reads the clock afresh. Dropping it (also on unwind) puts
/// back what was there before, so nested calls are fine.
#[allow(dead_code)] // used by several optional layers
pub(crate) struct CallClock {
    prev: Option<Instant>,
}

#[allow(dead_code)] // used by several optional layers
impl CallClock {
    /// `now` is the instant of the call being made, until this is dropped.
    #[inline]
    pub(crate) fn enter(now: Instant) -> Self {
        Self {
            prev: CALL_NOW.with(|c| c.replace(Some(now))),
        }
    }
}

impl Drop for CallClock {
    #[inline]
    fn drop(&mut self) {
        CALL_NOW.with(|c| c.set(self.prev));
    }
}

/// The instant of the call being made (a layer outside read the clock for
/// it, see [`CallClock`]), or [`now`] outside a call.
#[allow(dead_code)] // used by several optional layers
#[inline]
pub(crate) fn call_now() -> Instant {
    CALL_NOW.with(std::cell::Cell::get).unwrap_or_else(now)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 14 (cost): the layers of one call share one clock read; the
    /// reading is gone once the call is made, also after a panic, and a
    /// nested call puts back the outer one's.
    #[tokio::test(start_paused = true)]
    async fn a_call_shares_one_reading_and_only_while_it_is_made() {
        let t0 = now();
        tokio::time::advance(Duration::from_secs(5)).await;
        assert_eq!(call_now(), now());
        {
            let _outer = CallClock::enter(t0);
            assert_eq!(call_now(), t0);
            {
                let _inner = CallClock::enter(t0 + Duration::from_secs(1));
                assert_eq!(call_now(), t0 + Duration::from_secs(1));
            }
            assert_eq!(call_now(), t0);
        }
        assert_eq!(call_now(), now());
        let r = std::panic::catch_unwind(|| {
            let _clock = CallClock::enter(t0);
            panic!("a layer panicked mid-call");
        });
        assert!(r.is_err());
        assert_eq!(call_now(), t0 + Duration::from_secs(5));
    }
}
