//! The adaptive limit: additive increase, multiplicative decrease (AIMD),
//! driven by the classifier's outcomes. Pure: no clock, no atomics; the
//! service feeds it samples under a short lock.

use std::fmt;
use std::num::NonZeroUsize;
use std::time::Duration;

use crate::classify::{Outcome, ThrottleCause};

use super::error::InvalidLimit;

/// Configuration of the adaptive (AIMD) concurrency limit.
///
/// The limit grows by [`Aimd::increase`] per window of successful calls
/// (about `+increase / limit` per call, as TCP's congestion avoidance does)
/// while callers actually use it, and is multiplied by
/// [`Aimd::decrease_factor`] when a call is throttled upstream (429), fails
/// transiently (5xx, timeout, reset), or, if configured, is slow. At most one
/// decrease happens per "round": calls that started before the last decrease
/// cannot decrease it again, so a burst of 429s from one overload does not
/// collapse the limit to its minimum.
///
/// See the [module docs](super) for an example.
///
/// # Default
///
/// `min` 1, `initial` 10, `max` 20, increase 1, decrease factor 0.75, no
/// latency signal.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Aimd {
    pub(crate) min: usize,
    pub(crate) initial: usize,
    pub(crate) max: usize,
    pub(crate) increase: f64,
    pub(crate) decrease: f64,
    pub(crate) slow: Option<Latency>,
}

/// How a call's latency is normalised before it is compared with the
/// slow-call threshold of [`Aimd::slow_after`].
///
/// A long generation is not congestion: comparing total durations would
/// shrink the limit every time a user asks for a long answer. Time to the
/// first byte, or time per output token, stays flat as answers grow and rises
/// when the upstream queues.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Latency {
    /// Time from sending the request to the first body frame (for a
    /// non-streamed body: to its first frame). Slow when above the duration.
    FirstByte(Duration),
    /// Total time divided by the output tokens reported in `usage` (falls
    /// back to time to first byte when no usage was reported). Slow when
    /// above the duration.
    PerOutputToken(Duration),
}

impl Default for Aimd {
    fn default() -> Self {
        Self {
            min: 1,
            initial: 10,
            max: 20,
            increase: 1.0,
            decrease: 0.75,
            slow: None,
        }
    }
}

impl Aimd {
    /// An AIMD limit with the [defaults](Aimd#default).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the bounds and the starting limit.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] unless `min <= initial <= max` and `max` fits in
    /// `i32`.
    pub fn bounds(
        mut self,
        min: NonZeroUsize,
        initial: NonZeroUsize,
        max: NonZeroUsize,
    ) -> Result<Self, InvalidLimit> {
        let (min, initial, max) = (min.get(), initial.get(), max.get());
        if !(min <= initial && initial <= max) {
            return Err(InvalidLimit::new(
                "bounds must satisfy min <= initial <= max",
            ));
        }
        if max > i32::MAX as usize {
            return Err(InvalidLimit::new("max must fit in an i32"));
        }
        self.min = min;
        self.initial = initial;
        self.max = max;
        Ok(self)
    }

    /// How much the limit grows per window of successes (one window = as
    /// many successful calls as the current limit). Default is 1.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] unless `0 < amount <= 1000` and finite.
    pub fn increase(mut self, amount: f64) -> Result<Self, InvalidLimit> {
        if !(amount > 0.0 && amount <= 1000.0) {
            return Err(InvalidLimit::new("increase must be in (0, 1000]"));
        }
        self.increase = amount;
        Ok(self)
    }

    /// The factor the limit is multiplied by on a congestion signal.
    /// Default is 0.75.
    ///
    /// # Errors
    ///
    /// [`InvalidLimit`] unless `0 < factor < 1`.
    pub fn decrease_factor(mut self, factor: f64) -> Result<Self, InvalidLimit> {
        if !(factor > 0.0 && factor < 1.0) {
            return Err(InvalidLimit::new("decrease factor must be in (0, 1)"));
        }
        self.decrease = factor;
        Ok(self)
    }

    /// Also treat slow calls as congestion, with latency normalised as
    /// `latency` says. Default is `None`: only throttling and transient
    /// failures shrink the limit (DashScope signals overload with 429s).
    pub fn slow_after(mut self, latency: impl Into<Option<Latency>>) -> Self {
        self.slow = latency.into();
        self
    }

    /// The starting limit.
    pub fn get_initial(&self) -> usize {
        self.initial
    }

    /// The lower bound.
    pub fn get_min(&self) -> usize {
        self.min
    }

    /// The upper bound.
    pub fn get_max(&self) -> usize {
        self.max
    }
}

/// What one finished call says about congestion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    /// The call went well and used the limit: grow.
    Grow,
    /// Congestion: shrink.
    Shrink,
    /// Nothing to learn (a permanent error, a local refusal, a call the
    /// caller abandoned).
    Nothing,
}

impl Signal {
    /// Reads an outcome. `slow` says whether the normalised latency was above
    /// the threshold; `complete` whether the response was seen to its end.
    pub(crate) fn of(outcome: &Outcome, slow: bool, complete: bool) -> Signal {
        match outcome {
            Outcome::Throttled {
                cause: ThrottleCause::Local,
                ..
            } => Signal::Nothing,
            Outcome::Throttled { .. } | Outcome::Transient { .. } => Signal::Shrink,
            Outcome::Success if slow => Signal::Shrink,
            Outcome::Success if complete => Signal::Grow,
            _ => Signal::Nothing,
        }
    }
}

/// One finished call.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) signal: Signal,
    /// The decrease round the call started in.
    pub(crate) round: u64,
    /// Calls in flight (including this one) when it started.
    pub(crate) in_flight: usize,
}

/// The AIMD state.
pub(crate) struct AimdState {
    cfg: Aimd,
    limit: f64,
    round: u64,
}

impl AimdState {
    pub(crate) fn new(cfg: Aimd) -> Self {
        Self {
            cfg,
            limit: cfg.initial as f64,
            round: 0,
        }
    }

    /// The whole-number limit the semaphore enforces.
    pub(crate) fn cap(&self) -> usize {
        (self.limit.floor() as usize).clamp(self.cfg.min, self.cfg.max)
    }

    /// The exact (fractional) limit.
    pub(crate) fn limit(&self) -> f64 {
        self.limit
    }

    /// The current decrease round.
    pub(crate) fn round(&self) -> u64 {
        self.round
    }

    /// Feeds one sample; returns the new whole-number cap.
    pub(crate) fn on_sample(&mut self, s: Sample) -> usize {
        match s.signal {
            Signal::Nothing => {}
            Signal::Grow => {
                // Grow only when the limit was actually in use (at least half
                // of it), so an idle client does not inflate it on no
                // evidence.
                if s.in_flight * 2 >= self.cap() {
                    let l = self.limit + self.cfg.increase / self.limit.max(1.0);
                    self.limit = l.min(self.cfg.max as f64);
                }
            }
            Signal::Shrink => {
                if s.round == self.round {
                    self.round += 1;
                    let l = self.limit * self.cfg.decrease;
                    self.limit = l.max(self.cfg.min as f64);
                }
            }
        }
        self.cap()
    }
}

impl fmt::Debug for AimdState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AimdState")
            .field("limit", &self.limit)
            .field("round", &self.round)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn nz(n: usize) -> NonZeroUsize {
        NonZeroUsize::new(n).unwrap()
    }

    #[test]
    fn config_validation() {
        assert!(Aimd::new().bounds(nz(5), nz(4), nz(10)).is_err());
        assert!(Aimd::new().bounds(nz(5), nz(11), nz(10)).is_err());
        assert!(Aimd::new().bounds(nz(1), nz(1), nz(1)).is_ok());
        assert!(Aimd::new().decrease_factor(1.0).is_err());
        assert!(Aimd::new().decrease_factor(f64::NAN).is_err());
        assert!(Aimd::new().increase(0.0).is_err());
        assert!(Aimd::new().increase(f64::INFINITY).is_err());
    }

    #[test]
    fn grows_by_one_per_window_and_shrinks_once_per_round() {
        let mut a = AimdState::new(Aimd::new());
        assert_eq!(a.cap(), 10);
        for _ in 0..10 {
            a.on_sample(Sample {
                signal: Signal::Grow,
                round: 0,
                in_flight: 10,
            });
        }
        assert_eq!(a.cap(), 10); // 10 + ~0.98
        a.on_sample(Sample {
            signal: Signal::Grow,
            round: 0,
            in_flight: 10,
        });
        assert_eq!(a.cap(), 11);
        // Five 429s from calls that started in round 0: one decrease.
        for _ in 0..5 {
            a.on_sample(Sample {
                signal: Signal::Shrink,
                round: 0,
                in_flight: 11,
            });
        }
        assert_eq!(a.cap(), 8); // 11.07 * 0.75
        assert_eq!(a.round(), 1);
        // A call that started after the decrease can decrease again.
        a.on_sample(Sample {
            signal: Signal::Shrink,
            round: 1,
            in_flight: 8,
        });
        assert_eq!(a.cap(), 6);
    }

    #[test]
    fn idle_client_does_not_grow() {
        let mut a = AimdState::new(Aimd::new());
        for _ in 0..1000 {
            a.on_sample(Sample {
                signal: Signal::Grow,
                round: 0,
                in_flight: 1,
            });
        }
        assert_eq!(a.cap(), 10);
    }

    #[test]
    fn signals() {
        use crate::classify::PermanentReason;
        assert_eq!(Signal::of(&Outcome::Success, false, true), Signal::Grow);
        assert_eq!(Signal::of(&Outcome::Success, false, false), Signal::Nothing);
        assert_eq!(Signal::of(&Outcome::Success, true, true), Signal::Shrink);
        assert_eq!(
            Signal::of(&Outcome::throttled(ThrottleCause::Requests), false, true),
            Signal::Shrink
        );
        assert_eq!(
            Signal::of(&Outcome::throttled(ThrottleCause::Local), false, true),
            Signal::Nothing
        );
        assert_eq!(
            Signal::of(&Outcome::TRANSIENT, false, false),
            Signal::Shrink
        );
        assert_eq!(
            Signal::of(
                &Outcome::Permanent {
                    reason: PermanentReason::InvalidRequest
                },
                false,
                true
            ),
            Signal::Nothing
        );
    }

    proptest! {
        #[test]
        fn cap_stays_within_bounds(
            min in 1usize..8, span in 0usize..40, start in 0usize..40,
            samples in proptest::collection::vec((0u8..3, 0u64..4, 0usize..64), 0..300),
        ) {
            let max = min + span;
            let initial = (min + start).min(max);
            let cfg = Aimd::new().bounds(nz(min), nz(initial), nz(max)).unwrap();
            let mut a = AimdState::new(cfg);
            let mut last_round = 0;
            for (sig, dr, in_flight) in samples {
                let signal = [Signal::Grow, Signal::Shrink, Signal::Nothing][sig as usize];
                let round = a.round().saturating_sub(dr);
                let before = a.cap();
                let cap = a.on_sample(Sample { signal, round, in_flight });
                prop_assert!((min..=max).contains(&cap));
                prop_assert!(a.round() >= last_round);
                last_round = a.round();
                match signal {
                    Signal::Grow => prop_assert!(cap >= before && cap <= before + 1),
                    Signal::Shrink => prop_assert!(cap <= before),
                    Signal::Nothing => prop_assert_eq!(cap, before),
                }
            }
        }
    }
}
