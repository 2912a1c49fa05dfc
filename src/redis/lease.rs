//! Local pre-reservation: lease a small slice of budget from Redis per
//! round trip and hand it out locally.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use crate::rate_limit::Cost;

use super::script::{Grant, Refund};

/// Local pre-reservation: when a call needs Redis anyway, it books a
/// `slice` more in the same round trip (only if that conforms now), and the
/// next calls for the key are admitted from the slice locally, with no
/// round trip, until it runs out or `ttl` passes. What is left of a slice is
/// refunded to Redis with the next renewal (an idle replica's leftovers are
/// simply lost: capacity, never a burst).
///
/// # The bound
///
/// Without leases, over any window of length `T` the replicas together
/// admit at most `max(b, c) + r·T` units of a quota with rate `r` and burst
/// `b` (`c` is the largest single call), exactly like one in-memory
/// limiter. A leased unit is booked in Redis at some instant and spent
/// locally at most `ttl` later, and each booking is one call plus one
/// slice `L`, so the units spent in a window of length `T` were booked in a
/// window of length `T + ttl`:
///
/// ```text
/// admitted(T) <= max(b, c + L) + r·(T + ttl)
/// ```
///
/// whatever the number of replicas: the overshoot is at most `L + r·ttl`
/// units per quota (a slice above the burst is admitted only when the
/// bucket is full, and then goes out at once, like a burst of `L`). With
/// the Qwen defaults (burst 1), keep `L` small and `ttl` short.
///
/// # Default
///
/// Off. A typical setting is a slice of a few requests (and a few thousand
/// tokens) with a `ttl` of 100 ms to 1 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lease {
    slice: Cost,
    ttl: Duration,
}

impl Lease {
    /// Lease `slice` (requests and tokens) at a time, for at most `ttl`.
    pub const fn new(slice: Cost, ttl: Duration) -> Self {
        Self { slice, ttl }
    }

    /// The slice booked per round trip.
    pub const fn slice(&self) -> Cost {
        self.slice
    }

    /// How long a slice may be spent.
    pub const fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// One key's slice and the calls waiting for its renewal.
#[derive(Debug, Default)]
pub(crate) struct LeaseCell {
    state: Mutex<LeaseState>,
    renewed: Notify,
}

impl LeaseCell {
    pub(crate) fn lock(&self) -> MutexGuard<'_, LeaseState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Woken when a renewal ends.
    pub(crate) fn renewed(&self) -> &Notify {
        &self.renewed
    }
}

/// A new slice: what it holds, when it expires, the booking it came with
/// and the time one unit is worth in each dimension.
pub(crate) type Slice = (Cost, u64, Grant, u64, u64);

/// A renewal in flight. Dropping it ends the renewal (with the slice set by
/// [`Renewal::granted`], if any) and wakes the calls waiting for it, also
/// when the call that renews is cancelled.
#[derive(Debug)]
pub(crate) struct Renewal {
    cell: Arc<LeaseCell>,
    slice: Option<Slice>,
}

impl Renewal {
    pub(crate) fn new(cell: Arc<LeaseCell>) -> Self {
        Self { cell, slice: None }
    }

    /// Redis booked the slice too.
    pub(crate) fn granted(&mut self, slice: Slice) {
        self.slice = Some(slice);
    }
}

impl Drop for Renewal {
    fn drop(&mut self) {
        self.cell.lock().end_renewal(self.slice.take());
        self.cell.renewed.notify_waiters();
    }
}

/// One key's local slice. Times are nanoseconds since the limiter's origin.
#[derive(Debug, Default)]
pub(crate) struct LeaseState {
    left: Cost,
    expires: u64,
    generation: u64,
    /// The booking the slice came with, and the time one unit is worth in
    /// each dimension, for refunding the leftovers.
    grant: Option<(Grant, u64, u64)>,
    renewing: bool,
}

impl LeaseState {
    fn live(&self, now: u64) -> bool {
        now < self.expires
    }

    /// Takes `cost` from the slice; returns the slice's generation.
    pub(crate) fn take(&mut self, cost: Cost, now: u64) -> Option<u64> {
        if self.live(now) && self.left.requests >= cost.requests && self.left.tokens >= cost.tokens
        {
            self.left.requests -= cost.requests;
            self.left.tokens -= cost.tokens;
            Some(self.generation)
        } else {
            None
        }
    }

    /// Starts a renewal unless one is in flight: empties the slice and
    /// returns the refund of its leftovers (`Some(None)`: nothing to
    /// refund).
    pub(crate) fn begin_renewal(&mut self) -> Option<Option<(i64, Refund, Refund)>> {
        if self.renewing {
            return None;
        }
        self.renewing = true;
        let left = std::mem::take(&mut self.left);
        self.generation += 1;
        let refund = self.grant.take().and_then(|(g, ir, it)| {
            let r = g
                .req
                .map(|d| Refund::of(g.slot, &d, u64::from(left.requests).saturating_mul(ir)));
            let t = g
                .tok
                .map(|d| Refund::of(g.slot, &d, u64::from(left.tokens).saturating_mul(it)));
            let r = r.unwrap_or_default();
            let t = t.unwrap_or_default();
            (r.amount > 0 || t.amount > 0).then_some((g.epoch, r, t))
        });
        Some(refund)
    }

    /// Ends a renewal; `slice` is the new slice if one was booked.
    pub(crate) fn end_renewal(&mut self, slice: Option<Slice>) {
        self.renewing = false;
        if let Some((left, expires, grant, ir, it)) = slice {
            self.generation += 1;
            self.left = left;
            self.expires = expires;
            self.grant = Some((grant, ir, it));
        }
    }

    /// Puts `tokens` back into the slice they came from, if it is still the
    /// current one.
    pub(crate) fn give_back_tokens(&mut self, generation: u64, tokens: u32, now: u64) {
        if generation == self.generation && self.live(now) {
            self.left.tokens = self.left.tokens.saturating_add(tokens);
        }
    }

    /// Takes up to `tokens` more from the slice they came from; returns
    /// how many it could take.
    pub(crate) fn take_tokens(&mut self, generation: u64, tokens: u32, now: u64) -> u32 {
        if generation == self.generation && self.live(now) {
            let n = tokens.min(self.left.tokens);
            self.left.tokens -= n;
            n
        } else {
            0
        }
    }

    /// The epoch and slot of the booking the current slice came with.
    pub(crate) fn granted_at(&self) -> Option<(i64, i64)> {
        self.grant.map(|(g, _, _)| (g.epoch, g.slot))
    }

    /// Whether the state can be forgotten.
    pub(crate) fn is_idle(&self, now: u64) -> bool {
        !self.renewing && !self.live(now)
    }
}

#[cfg(test)]
mod tests {
    use super::super::script::DimGrant;
    use super::*;

    fn grant() -> Grant {
        Grant {
            epoch: 1,
            slot: 0,
            req: Some(DimGrant {
                before: 50,
                after: 650,
                charge: 600,
            }),
            tok: None,
        }
    }

    #[test]
    fn slices_are_spent_refunded_and_expire() {
        let mut s = LeaseState::default();
        assert_eq!(s.take(Cost::ONE, 0), None);
        assert_eq!(s.begin_renewal(), Some(None));
        assert_eq!(s.begin_renewal(), None, "one renewal at a time");
        s.end_renewal(Some((Cost::new(5, 0), 1_000, grant(), 100, 0)));
        let g = s.take(Cost::ONE, 10).unwrap();
        assert_eq!(s.take(Cost::new(4, 0), 10), Some(g));
        assert_eq!(s.take(Cost::ONE, 10), None);
        s.give_back_tokens(g, 3, 10);
        assert_eq!(s.take(Cost::new(0, 3), 10), Some(g));
        assert_eq!(s.take_tokens(g, 5, 10), 0);
        // A new slice; two units left over when it is renewed.
        assert_eq!(s.begin_renewal(), Some(None));
        s.end_renewal(Some((Cost::new(5, 0), 1_000, grant(), 100, 0)));
        s.take(Cost::new(3, 0), 20).unwrap();
        let (epoch, r, t) = s.begin_renewal().unwrap().unwrap();
        // The refund counts later charges from the end of the charge laid
        // from the slot (0 + 600), not from the TAT after the grant (650).
        assert_eq!((epoch, r.amount, r.end, t.amount), (1, 200, 600, 0));
        s.end_renewal(None);
        assert_eq!(s.take(Cost::ONE, 30), None);
        assert!(s.is_idle(2_000));
        // Expiry.
        s.begin_renewal();
        s.end_renewal(Some((Cost::new(5, 0), 1_000, grant(), 100, 0)));
        assert_eq!(s.take(Cost::ONE, 1_000), None);
    }
}
