//! The pure GCRA core: no clock reads, no allocation, no locks.
//!
//! Time is a `u64` count of nanoseconds since the limiter's epoch (the
//! instant it was built); the caller passes `now`. A bucket's whole state is
//! one [`AtomicU64`]: its *theoretical arrival time* (TAT), updated with a
//! compare-and-swap. The bucket is full when `tat <= now`, and holds
//! `(now + tolerance - tat) / interval` units otherwise.
//!
//! * A cost `x` (in nanoseconds: units × interval, divided by the slow-start
//!   or feedback rate factor) **conforms** at `t` when
//!   `tat <= t + tolerance - min(x, tolerance)`. A cost above the burst
//!   therefore conforms when the bucket is full (*admit when full*) and
//!   drives it into debt: later calls wait until the debt is repaid. It
//!   never hangs and never fails for being too big.
//! * A **reservation** at slot `s` (the conforming time, or later when
//!   another dimension asks for later) sets `tat = max(tat, s) + x`. Waiters
//!   are thus served in reservation order (FIFO), each at its own instant: no
//!   thundering herd.
//! * Over any window of length `T`, the admitted cost is at most
//!   `max(burst, largest cost) + T / interval` units, whatever the order of
//!   the reservations (see `tests/rate_limit` for the property test).
//!
//! Giving capacity back is where a GCRA can silently break its own bound:
//! moving capacity from one instant to a later one lets two calls land where
//! one was allowed. So:
//!
//! * [`Bucket::give_back`] (a cancelled waiter) restores the previous TAT
//!   only if nothing was reserved after it (and keeps what may have been,
//!   as a refund does); otherwise the slot stays consumed (a *phantom*:
//!   capacity lost, never a burst).
//! * [`Bucket::refund`] (reconciliation) returns at most the part of the
//!   charge, laid from the grant's slot, that lies after every slot already
//!   granted and that time has not yet repaid; see its docs.
//!
//! The bucket is one word; the decision around it (two dimensions at one
//! slot, slow start, feedback, keys) is [`RateLimiter`](super::RateLimiter)'s,
//! and the same arithmetic runs as a Redis script in the
//! [`redis`](crate::redis) backend.

use std::sync::atomic::{AtomicU64, Ordering};

/// A rate factor of 1.0 in 16.16 fixed point.
pub const FULL_RATE: u32 = 1 << 16;

/// The parameters of one GCRA dimension: the emission interval (nanoseconds
/// per unit) and the tolerance (burst × interval).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Gcra {
    interval: u64,
    tolerance: u64,
}

impl Gcra {
    /// A GCRA admitting one unit per `interval` nanoseconds with a burst of
    /// `burst` units. Both are at least 1.
    pub const fn new(interval: u64, burst: u32) -> Self {
        let interval = if interval == 0 { 1 } else { interval };
        let burst = if burst == 0 { 1 } else { burst as u64 };
        Self {
            interval,
            tolerance: interval.saturating_mul(burst),
        }
    }

    /// Nanoseconds per unit.
    pub const fn interval(&self) -> u64 {
        self.interval
    }

    /// Burst × interval, in nanoseconds.
    pub const fn tolerance(&self) -> u64 {
        self.tolerance
    }

    /// The time charge of `units` at `rate` (16.16 fixed point, at most
    /// [`FULL_RATE`]; a lower rate costs proportionally more time).
    #[inline]
    pub fn charge(&self, units: u32, rate: u32) -> u64 {
        let base = self.interval.saturating_mul(u64::from(units));
        if rate >= FULL_RATE {
            base
        } else {
            let x = u128::from(base) * u128::from(FULL_RATE) / u128::from(rate.max(1));
            u64::try_from(x).unwrap_or(u64::MAX)
        }
    }

    /// The earliest time a charge `x` conforms, given `tat`.
    #[inline]
    pub fn conforms_at(&self, tat: u64, x: u64) -> u64 {
        tat.saturating_sub(self.tolerance - x.min(self.tolerance))
    }

    /// Units available at `now` given `tat` (what a `remaining` header says).
    pub fn remaining(&self, tat: u64, now: u64) -> u64 {
        let used = tat.saturating_sub(now);
        self.tolerance.saturating_sub(used) / self.interval
    }
}

/// A granted reservation in one bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    /// When the call may go (nanoseconds since the epoch).
    pub slot: u64,
    /// The TAT before this reservation.
    pub before: u64,
    /// The TAT this reservation set.
    pub after: u64,
    /// The time charged, in nanoseconds.
    pub charge: u64,
}

/// One bucket's state: its TAT, in nanoseconds since the epoch. One word:
/// a request-only bucket is exactly this.
#[derive(Debug, Default)]
pub struct Bucket {
    tat: AtomicU64,
}

impl Bucket {
    /// A full bucket.
    pub const fn new() -> Self {
        Self {
            tat: AtomicU64::new(0),
        }
    }

    /// A bucket with this TAT.
    pub const fn with_tat(tat: u64) -> Self {
        Self {
            tat: AtomicU64::new(tat),
        }
    }

    /// The current TAT.
    #[inline]
    pub fn tat(&self) -> u64 {
        self.tat.load(Ordering::Acquire)
    }

    /// Whether the bucket is full at `now` (nothing to remember about it).
    #[inline]
    pub fn is_full(&self, now: u64) -> bool {
        self.tat() <= now
    }

    /// Reserves a charge `x` at the earliest conforming slot, if that slot is
    /// at most `max_wait` nanoseconds after `now`. With `max_wait == 0` this
    /// is the plain "conforms now?" decision.
    ///
    /// # Errors
    ///
    /// The earliest conforming time, when it is further than `max_wait`;
    /// nothing is reserved then.
    #[inline]
    pub fn reserve(&self, g: &Gcra, now: u64, x: u64, max_wait: u64) -> Result<Grant, u64> {
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let slot = g.conforms_at(tat, x).max(now);
            if slot - now > max_wait {
                return Err(slot);
            }
            let after = tat.max(slot).saturating_add(x);
            match self
                .tat
                .compare_exchange_weak(tat, after, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Ok(Grant {
                        slot,
                        before: tat,
                        after,
                        charge: x,
                    });
                }
                Err(actual) => tat = actual,
            }
        }
    }

    /// Reserves a charge `x` at exactly `slot`, if the bucket's current TAT
    /// (`expected`) still lets it conform there. Used to book several
    /// dimensions at one common slot. A caller that refunds records a
    /// future slot (see [`Bucket::refund`]'s `latest`) before this call.
    ///
    /// # Errors
    ///
    /// The current TAT when it is no longer `expected`, or when `x` does not
    /// conform at `slot`.
    #[inline]
    pub fn reserve_at(&self, g: &Gcra, slot: u64, x: u64, expected: u64) -> Result<Grant, u64> {
        if g.conforms_at(expected, x) > slot {
            return Err(expected);
        }
        let after = expected.max(slot).saturating_add(x);
        match self
            .tat
            .compare_exchange(expected, after, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => Ok(Grant {
                slot,
                before: expected,
                after,
                charge: x,
            }),
            Err(actual) => Err(actual),
        }
    }

    /// Gives a reservation back (a cancelled waiter, before its slot).
    /// Returns `false`, doing nothing, unless the TAT is still the one the
    /// grant set (`grant.after`): otherwise something was booked after it,
    /// and the slot becomes a phantom (capacity lost, never a burst).
    ///
    /// An equal TAT does not prove that nothing was booked after the grant:
    /// a refund of an earlier grant can lower the TAT, and a later booking
    /// raise it back to exactly `grant.after`. So, as in [`Bucket::refund`],
    /// whatever the TAT holds beyond the grant's end `slot + charge` is
    /// counted as charged after it and stays charged, placed after
    /// `max(now, latest)`: the TAT goes back to `grant.before`, or to
    /// `max(now, latest) + (tat - (slot + charge))` when that is later.
    /// The price: a cancelled waiter queued behind a debt gives back less
    /// than its whole charge when `latest` is a later waiter's slot (one
    /// still queued, or one cancelled before it).
    ///
    /// `latest` is [`Bucket::refund`]'s. A bucket that is never refunded
    /// may pass 0: there only a booking raises the TAT, only the tail's
    /// give-back lowers it, so an equal TAT is the tail, and the grant's
    /// own debt share (`before - slot`) lies after `now`, before its slot.
    pub fn give_back(&self, grant: &Grant, now: u64, latest: u64) -> bool {
        let later = grant
            .after
            .saturating_sub(grant.slot.saturating_add(grant.charge));
        let new = if later > 0 {
            grant.before.max(now.max(latest).saturating_add(later))
        } else {
            grant.before
        };
        self.tat
            .compare_exchange(grant.after, new, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Returns up to `amount` nanoseconds of `grant`'s charge (the call used
    /// less than it reserved). Returns what was actually returned.
    ///
    /// The charge is laid from the grant's slot: it ends at
    /// `end = slot + charge`, and everything the TAT holds beyond `end` is
    /// counted as charged after the grant (later calls, and any debt the
    /// bucket was in when the grant was booked). The refund keeps the TAT at
    /// or above `max(now, latest) + (tat - end)`, `latest` being the latest
    /// slot granted to a waiter (recorded by the caller before each
    /// reservation of a future slot): what was charged after the grant stays
    /// charged and is placed after every slot already granted, so capacity
    /// only ever comes back behind the queue, and at most the part of the
    /// charge still ahead of `max(now, latest)` comes back. When nothing is
    /// charged after `end`, no waiter is behind the grant and the refund is
    /// exact down to `now` (`latest` may then be a cancelled waiter's slot).
    ///
    /// `end` never moves, whatever other refunds did to the TAT since the
    /// grant was booked; `grant.after` would (an earlier refund can lower
    /// the TAT below it, and `tat - after` then undercounts the later
    /// charges: the refund would hand back capacity a later booking holds).
    /// The price: a refund does not give back the debt the bucket was in
    /// when the grant was booked.
    pub fn refund(&self, grant: &Grant, amount: u64, now: u64, latest: u64) -> u64 {
        let amount = amount.min(grant.charge);
        if amount == 0 {
            return 0;
        }
        let end = grant.slot.saturating_add(grant.charge);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let later = tat.saturating_sub(end);
            // Nothing charged after the grant: no waiter is behind it
            // (`latest` is then a cancelled waiter's slot, or one before it).
            let horizon = if later > 0 { now.max(latest) } else { now };
            let new = tat
                .saturating_sub(amount)
                .max(horizon.saturating_add(later));
            if new >= tat {
                return 0;
            }
            match self
                .tat
                .compare_exchange_weak(tat, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return tat - new,
                Err(actual) => tat = actual,
            }
        }
    }

    /// Charges `amount` more nanoseconds (the call used more than it
    /// reserved). The overrun was spent when the call was admitted, so it is
    /// added to the TAT as it stands: if elapsed time has repaid it already,
    /// nothing changes.
    pub fn charge_more(&self, amount: u64) {
        // Equivalent mutant `>=`: it only adds 0, which changes nothing.
        if amount > 0 {
            let _ = self
                .tat
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                    Some(t.saturating_add(amount))
                });
        }
    }

    /// How far the TAT must move so that nothing conforms before
    /// `now + pause` and the bucket is empty then. Apply it with
    /// [`Bucket::charge_more`]; waiters already holding a slot must move
    /// theirs by the same amount (the whole schedule is translated).
    pub fn pause_delta(&self, g: &Gcra, now: u64, pause: u64) -> u64 {
        let tat = self.tat();
        let empty = now.saturating_add(g.tolerance - g.interval.min(g.tolerance));
        tat.max(empty).saturating_add(pause) - tat
    }
}

// ---------------------------------------------------------------------------
// Rate ramps: slow start after idle, and recovery after upstream throttling.

/// What a ramp is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RampKind {
    /// Slow start after idle.
    SlowStart,
    /// Recovery after an upstream throttle.
    Recover,
}

const KIND_BITS: u32 = 4;
const RATE_BITS: u32 = 17;
const KIND_SLOW: u64 = 1;
const KIND_RECOVER: u64 = 2;

/// A ramp packed in one `u64`: start (milliseconds since the epoch, 43
/// bits, ~278 years), starting rate (17 bits, 16.16 fixed point up to 1.0)
/// and kind (4 bits). `0` means "fresh": never used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ramp {
    /// When the ramp starts (nanoseconds since the epoch, kept to the ms).
    pub start: u64,
    /// The rate at the start (16.16 fixed point, at most [`FULL_RATE`]).
    pub from: u32,
    /// What the ramp is for.
    pub kind: RampKind,
}

impl Ramp {
    /// Packs the ramp into a word.
    pub fn pack(self) -> u64 {
        let ms = (self.start / 1_000_000) & ((1 << 43) - 1);
        let rate = u64::from(self.from.clamp(1, FULL_RATE));
        let kind = match self.kind {
            RampKind::SlowStart => KIND_SLOW,
            RampKind::Recover => KIND_RECOVER,
        };
        // Equivalent mutants `^` for `|`: the three ranges share no bit.
        (ms << (RATE_BITS + KIND_BITS)) | (rate << KIND_BITS) | kind
    }

    /// Unpacks a word; `None` for a fresh (0) or unknown word.
    pub fn unpack(word: u64) -> Option<Self> {
        let kind = match word & ((1 << KIND_BITS) - 1) {
            KIND_SLOW => RampKind::SlowStart,
            KIND_RECOVER => RampKind::Recover,
            _ => return None,
        };
        let from = ((word >> KIND_BITS) & ((1 << RATE_BITS) - 1)) as u32;
        let start = (word >> (RATE_BITS + KIND_BITS)).saturating_mul(1_000_000);
        Some(Self { start, from, kind })
    }

    /// The rate factor at `now` for a ramp lasting `duration` nanoseconds:
    /// `from` until `start`, then linear up to [`FULL_RATE`] at
    /// `start + duration`.
    #[inline]
    pub fn rate_at(&self, now: u64, duration: u64) -> u32 {
        if now <= self.start {
            return self.from;
        }
        let elapsed = now - self.start;
        if elapsed >= duration || duration == 0 {
            return FULL_RATE;
        }
        let gain = u128::from(FULL_RATE - self.from.min(FULL_RATE)) * u128::from(elapsed)
            / u128::from(duration);
        self.from + gain as u32
    }

    /// The rate factor at `now` of a slow start lasting `duration`
    /// nanoseconds: `from` until `start + hold`, then growing by the same
    /// ratio per unit of time (geometrically) up to [`FULL_RATE`] at
    /// `start + duration`.
    #[inline]
    pub fn grown_at(&self, now: u64, hold: u64, duration: u64) -> u32 {
        let from = self.from.clamp(1, FULL_RATE);
        let grow = self.start.saturating_add(hold);
        if now <= grow {
            return from;
        }
        let end = self.start.saturating_add(duration);
        if now >= end {
            return FULL_RATE;
        }
        let x = (now - grow) as f64 / (end - grow) as f64;
        let rate = f64::from(from) * (f64::from(FULL_RATE) / f64::from(from)).powf(x);
        (rate as u32).clamp(from, FULL_RATE)
    }

    /// When the ramp is over.
    pub fn end(&self, duration: u64) -> u64 {
        self.start.saturating_add(duration)
    }
}

/// A rate factor in 16.16 fixed point from a fraction in `(0, 1]`.
pub fn rate_from_f64(f: f64) -> u32 {
    if f >= 1.0 {
        FULL_RATE
    } else {
        // `as` saturates: NaN and negative fractions give 0, then 1.
        ((f * f64::from(FULL_RATE)) as u32).max(1)
    }
}

/// A rate factor as a fraction.
pub fn rate_to_f64(rate: u32) -> f64 {
    f64::from(rate.min(FULL_RATE)) / f64::from(FULL_RATE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn burst_then_rate() {
        let g = Gcra::new(100 * MS, 3);
        let b = Bucket::new();
        for _ in 0..3 {
            assert!(b.reserve(&g, 0, g.charge(1, FULL_RATE), 0).is_ok());
        }
        assert_eq!(b.reserve(&g, 0, g.interval(), 0), Err(100 * MS));
        assert!(b.reserve(&g, 100 * MS, g.interval(), 0).is_ok());
        assert_eq!(g.remaining(b.tat(), 100 * MS), 0);
        assert_eq!(g.remaining(b.tat(), 400 * MS), 3);
    }

    #[test]
    fn oversize_cost_is_admitted_when_full_and_makes_debt() {
        let g = Gcra::new(MS, 10);
        let b = Bucket::new();
        let x = g.charge(50, FULL_RATE);
        assert_eq!(b.reserve(&g, 5 * MS, x, 0).unwrap().slot, 5 * MS);
        // 50 units of debt: the next unit conforms when the bucket holds one.
        assert_eq!(b.reserve(&g, 5 * MS, g.interval(), 0), Err(46 * MS));
    }

    #[test]
    fn waiters_get_successive_slots_and_tail_give_back_is_exact() {
        let g = Gcra::new(100 * MS, 1);
        let b = Bucket::new();
        let x = g.interval();
        let max = 10_000 * MS;
        let a = b.reserve(&g, 0, x, max).unwrap();
        let w1 = b.reserve(&g, 0, x, max).unwrap();
        let w2 = b.reserve(&g, 0, x, max).unwrap();
        assert_eq!((a.slot, w1.slot, w2.slot), (0, 100 * MS, 200 * MS));
        // w1 is not the tail: its slot stays consumed.
        assert!(!b.give_back(&w1, 0, w2.slot));
        assert!(b.give_back(&w2, 0, w2.slot));
        assert_eq!(b.reserve(&g, 0, x, max).unwrap().slot, 200 * MS);
    }

    #[test]
    fn refund_is_exact_for_the_tail_and_bounded_otherwise() {
        let g = Gcra::new(MS, 1);
        let b = Bucket::new();
        let r = b.reserve(&g, 0, g.charge(100, FULL_RATE), 0).unwrap();
        assert_eq!(b.refund(&r, 90 * MS, 10 * MS, 0), 90 * MS);
        assert_eq!(b.tat(), 10 * MS);
        // Not the tail: a later call was charged 5; only the part of r's
        // charge still ahead of now can come back, and the later charge stays.
        let b = Bucket::new();
        let r = b.reserve(&g, 0, g.charge(100, FULL_RATE), 0).unwrap();
        b.charge_more(5 * MS);
        assert_eq!(b.tat(), 105 * MS);
        let got = b.refund(&r, 90 * MS, 40 * MS, 0);
        assert_eq!(b.tat(), 45 * MS);
        assert_eq!(got, 60 * MS);
    }

    #[test]
    fn pause_moves_everything() {
        let g = Gcra::new(100 * MS, 1);
        let b = Bucket::new();
        b.reserve(&g, 0, g.interval(), 0).unwrap();
        let moved = b.pause_delta(&g, 50 * MS, 1000 * MS);
        // The 50 ms of debt left is kept, after the pause.
        assert_eq!(moved, 1000 * MS);
        b.charge_more(moved);
        assert_eq!(b.reserve(&g, 1049 * MS, g.interval(), 0), Err(1100 * MS));
    }

    #[test]
    fn ramp_pack_and_rate() {
        let r = Ramp {
            start: 2_000 * MS,
            from: FULL_RATE / 4,
            kind: RampKind::Recover,
        };
        let u = Ramp::unpack(r.pack()).unwrap();
        assert_eq!(u, r);
        assert_eq!(Ramp::unpack(0), None);
        assert_eq!(u.rate_at(0, 1000 * MS), FULL_RATE / 4);
        assert_eq!(
            u.rate_at(2_500 * MS, 1000 * MS),
            FULL_RATE / 4 + 3 * FULL_RATE / 8
        );
        assert_eq!(u.rate_at(3_000 * MS, 1000 * MS), FULL_RATE);
        let g = Gcra::new(MS, 1);
        assert_eq!(g.charge(1, FULL_RATE / 2), 2 * MS);
    }
}
