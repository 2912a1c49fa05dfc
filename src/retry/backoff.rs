//! How long to wait before the next attempt: exponential backoff with full
//! jitter, and floors that follow the cause of a throttle.
//!
//! The math is pure: [`Backoff::wait`] takes the retry number, the outcome
//! and a random source, and reads no clock.

use std::fmt;
use std::time::Duration;

use crate::classify::{Outcome, ThrottleCause};
use crate::util::rng::Rng;

/// The wait before each retry. See the [module docs](super) for an example.
///
/// For retry `n` (1 for the first retry) the exponential part is
/// `min(cap, base × factor^(n-1))`, and with full jitter the wait is a
/// uniformly random duration up to it (AWS's "full jitter", which spreads
/// retries of many callers best). Then, in order:
///
/// 1. A server-suggested wait (`Retry-After` / `retry-after-ms`, already
///    parsed and capped by the classifier; or the wait a local limit
///    reported) takes precedence: the wait is that, plus (with jitter on) up
///    to 10 % more, so that callers told the same thing do not come back
///    together.
/// 2. A throttle with a known cause waits at least until that limit can have
///    refilled, then the jittered exponential part on top (so the retries of
///    many callers spread over the next window instead of landing on its
///    first millisecond):
///    * requests (`Throttling.RateQuota`, and a plain `429`): DashScope
///      enforces RPM per second, so the floor is one window, 1 s;
///    * tokens (`Throttling.AllocationQuota`): 1 s, doubling with each
///      retry (a large request may need several seconds of token refill);
///    * burst (`Throttling.BurstRate`, "rate increased too quickly"): the
///      growth guard wants the client to slow down, so 5 s, doubling;
///    * overloaded and local throttles: no floor (plain exponential).
/// 3. Every wait is capped by [`max_wait`](Self::max_wait).
///
/// # Default
///
/// Base 500 ms, factor 2, cap 8 s (the official SDK 2.x schedule), full
/// jitter, floors 1 s / 1 s / 5 s, maximum wait 60 s.
#[derive(Clone, Copy, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    cap: Duration,
    jitter: bool,
    requests_floor: Duration,
    tokens_floor: Duration,
    burst_floor: Duration,
    max_wait: Duration,
}

/// An invalid [`Backoff`] configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct InvalidBackoff {
    what: &'static str,
}

impl fmt::Display for InvalidBackoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid backoff: {}", self.what)
    }
}

impl std::error::Error for InvalidBackoff {}

impl crate::classify::KnownError for InvalidBackoff {
    fn outcome(&self) -> crate::classify::Outcome {
        crate::classify::Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}

impl InvalidBackoff {
    #[cfg(test)]
    pub(crate) const fn new(what: &'static str) -> Self {
        Self { what }
    }
}

impl Backoff {
    /// The default schedule.
    pub const fn new() -> Self {
        Self {
            base: Duration::from_millis(500),
            factor: 2.0,
            cap: Duration::from_secs(8),
            jitter: true,
            requests_floor: Duration::from_secs(1),
            tokens_floor: Duration::from_secs(1),
            burst_floor: Duration::from_secs(5),
            max_wait: Duration::from_secs(60),
        }
    }

    /// An exponential schedule: `base × factor^(n-1)`, capped at `cap`.
    ///
    /// # Errors
    ///
    /// When `base` is zero or larger than `cap`, or `factor` is not a finite
    /// number of at least 1.
    pub fn exponential(base: Duration, factor: f64, cap: Duration) -> Result<Self, InvalidBackoff> {
        if base.is_zero() {
            return Err(InvalidBackoff {
                what: "base must be positive",
            });
        }
        if base > cap {
            return Err(InvalidBackoff {
                what: "base must not exceed the cap",
            });
        }
        if !factor.is_finite() || factor < 1.0 {
            return Err(InvalidBackoff {
                what: "factor must be a finite number of at least 1",
            });
        }
        Ok(Self {
            base,
            factor,
            cap,
            ..Self::new()
        })
    }

    /// Whether the exponential part is fully jittered. Without jitter the
    /// schedule is exact (useful in tests; in production many callers then
    /// retry in lockstep). Default is `true`.
    pub const fn jitter(mut self, yes: bool) -> Self {
        self.jitter = yes;
        self
    }

    /// The least wait after a requests throttle (`Throttling.RateQuota`,
    /// plain 429). Default is 1 s.
    pub const fn requests_floor(mut self, floor: Duration) -> Self {
        self.requests_floor = floor;
        self
    }

    /// The least wait after a tokens throttle, doubling with each retry.
    /// Default is 1 s.
    pub const fn tokens_floor(mut self, floor: Duration) -> Self {
        self.tokens_floor = floor;
        self
    }

    /// The least wait after a burst throttle ("Request rate increased too
    /// quickly"), doubling with each retry. Default is 5 s.
    pub const fn burst_floor(mut self, floor: Duration) -> Self {
        self.burst_floor = floor;
        self
    }

    /// The longest wait ever, whatever the server or the floors say. Default
    /// is 60 s.
    pub const fn max_wait(mut self, max: Duration) -> Self {
        self.max_wait = max;
        self
    }

    /// The exponential part for retry `n` (1-based), before jitter.
    pub fn exponential_part(&self, n: u32) -> Duration {
        let exp = n.saturating_sub(1).min(64) as i32;
        let secs = self.base.as_secs_f64() * self.factor.powi(exp);
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The least wait the cause of `outcome` asks for, before retry `n`.
    pub fn floor(&self, n: u32, outcome: &Outcome) -> Duration {
        let doubling = |d: Duration| d.saturating_mul(1u32 << n.saturating_sub(1).min(16));
        match outcome.throttle_cause() {
            Some(ThrottleCause::Requests | ThrottleCause::Unknown) => self.requests_floor,
            Some(ThrottleCause::Tokens) => doubling(self.tokens_floor),
            Some(ThrottleCause::Burst) => doubling(self.burst_floor),
            _ => Duration::ZERO,
        }
    }

    /// The wait before retry `n` (1-based) after `outcome`. Pure: reads no
    /// clock; `rng` supplies the jitter.
    pub fn wait(&self, n: u32, outcome: &Outcome, rng: &mut dyn Rng) -> Duration {
        let wait = if let Some(server) = outcome.retry_after() {
            let extra = if self.jitter {
                (server / 10).mul_f64(rng.next_f64())
            } else {
                Duration::ZERO
            };
            server.saturating_add(extra)
        } else {
            let exp = self.exponential_part(n);
            self.floor(n, outcome)
                .saturating_add(self.jittered(exp, rng))
        };
        wait.min(self.max_wait)
    }

    fn jittered(&self, d: Duration, rng: &mut dyn Rng) -> Duration {
        if self.jitter {
            d.mul_f64(rng.next_f64())
        } else {
            d
        }
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("base", &self.base)
            .field("factor", &self.factor)
            .field("cap", &self.cap)
            .field("jitter", &self.jitter)
            .field("requests_floor", &self.requests_floor)
            .field("tokens_floor", &self.tokens_floor)
            .field("burst_floor", &self.burst_floor)
            .field("max_wait", &self.max_wait)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::rng::SeededRng;
    use proptest::prelude::*;

    const S: fn(u64) -> Duration = Duration::from_secs;
    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn invalid_configs_are_errors() {
        assert!(Backoff::exponential(Duration::ZERO, 2.0, S(1)).is_err());
        assert!(Backoff::exponential(S(2), 2.0, S(1)).is_err());
        assert!(Backoff::exponential(MS(1), 0.5, S(1)).is_err());
        assert!(Backoff::exponential(MS(1), f64::NAN, S(1)).is_err());
        assert!(Backoff::exponential(MS(1), f64::INFINITY, S(1)).is_err());
        assert!(Backoff::exponential(MS(1), 1.0, S(1)).is_ok());
    }

    #[test]
    fn exact_schedule_without_jitter() {
        let b = Backoff::new().jitter(false);
        let mut rng = SeededRng::new(1);
        let t = Outcome::TRANSIENT;
        let waits: Vec<_> = (1..=6).map(|n| b.wait(n, &t, &mut rng)).collect();
        assert_eq!(waits, [MS(500), S(1), S(2), S(4), S(8), S(8)]);
        // Huge retry numbers do not overflow.
        assert_eq!(b.wait(u32::MAX, &t, &mut rng), S(8));
    }

    #[test]
    fn floors_follow_the_cause() {
        let b = Backoff::new().jitter(false);
        let mut rng = SeededRng::new(1);
        let w = |n, cause| b.wait(n, &Outcome::throttled(cause), &mut SeededRng::new(1));
        assert_eq!(w(1, ThrottleCause::Requests), MS(1500));
        assert_eq!(w(2, ThrottleCause::Requests), S(2));
        assert_eq!(w(1, ThrottleCause::Unknown), MS(1500));
        assert_eq!(w(1, ThrottleCause::Tokens), MS(1500));
        assert_eq!(w(3, ThrottleCause::Tokens), S(6));
        assert_eq!(w(1, ThrottleCause::Burst), MS(5500));
        assert_eq!(w(2, ThrottleCause::Burst), S(11));
        assert_eq!(w(1, ThrottleCause::Overloaded), MS(500));
        assert_eq!(w(1, ThrottleCause::Local), MS(500));
        // The cap holds even for the burst floor's growth.
        assert_eq!(w(30, ThrottleCause::Burst), S(60));
        let _ = &mut rng;
    }

    #[test]
    fn server_wait_takes_precedence() {
        let b = Backoff::new().jitter(false);
        let o = Outcome::Throttled {
            cause: ThrottleCause::Burst,
            retry_after: Some(S(2)),
        };
        assert_eq!(b.wait(1, &o, &mut SeededRng::new(1)), S(2));
        let jittered = Backoff::new().wait(1, &o, &mut SeededRng::new(1));
        assert!(jittered >= S(2) && jittered <= MS(2200), "{jittered:?}");
        let o = Outcome::Transient {
            retry_after: Some(S(3600)),
        };
        assert_eq!(b.wait(1, &o, &mut SeededRng::new(1)), S(60));
    }

    /// #19: each setter is read, and each bound is inclusive where the
    /// docs say so.
    #[test]
    fn setters_and_bounds() {
        let t = |cause| Outcome::throttled(cause);
        let b = Backoff::new()
            .jitter(false)
            .requests_floor(S(3))
            .tokens_floor(S(2))
            .burst_floor(S(7))
            .max_wait(S(20));
        let mut rng = SeededRng::new(1);
        assert_eq!(b.wait(1, &t(ThrottleCause::Requests), &mut rng), MS(3500));
        assert_eq!(b.wait(2, &t(ThrottleCause::Tokens), &mut rng), S(5));
        assert_eq!(b.wait(1, &t(ThrottleCause::Burst), &mut rng), MS(7500));
        assert_eq!(b.wait(2, &t(ThrottleCause::Burst), &mut rng), S(15));
        assert_eq!(b.wait(3, &t(ThrottleCause::Burst), &mut rng), S(20));
        let server = Outcome::Transient {
            retry_after: Some(S(30)),
        };
        assert_eq!(b.wait(1, &server, &mut rng), S(20));
        // A base equal to the cap is a constant schedule.
        let flat = Backoff::exponential(S(1), 3.0, S(1)).unwrap().jitter(false);
        assert_eq!(flat.exponential_part(1), S(1));
        assert_eq!(flat.exponential_part(5), S(1));
        let b = Backoff::exponential(MS(125), 4.0, S(10))
            .unwrap()
            .jitter(false);
        let parts: Vec<_> = (1..=5).map(|n| b.exponential_part(n)).collect();
        assert_eq!(parts, [MS(125), MS(500), S(2), S(8), S(10)]);
        assert_eq!(b.exponential_part(0), MS(125));
        assert_eq!(b.exponential_part(u32::MAX), S(10));
        // A factor so large that the power is infinite: the cap.
        let huge = Backoff::exponential(MS(1), f64::MAX, S(10)).unwrap();
        assert_eq!(huge.exponential_part(3), S(10));
        // Floors double from the first retry on and stop doubling at 2^16.
        let b = Backoff::new().tokens_floor(MS(1)).max_wait(Duration::MAX);
        assert_eq!(b.floor(1, &t(ThrottleCause::Tokens)), MS(1));
        assert_eq!(b.floor(17, &t(ThrottleCause::Tokens)), MS(65_536));
        assert_eq!(b.floor(40, &t(ThrottleCause::Tokens)), MS(65_536));
        assert_eq!(b.floor(3, &Outcome::TRANSIENT), Duration::ZERO);
        assert_eq!(b.floor(3, &Outcome::Success), Duration::ZERO);
    }

    #[test]
    fn jitter_draws_from_the_rng() {
        /// An RNG that always answers `x`.
        struct Fixed(f64);
        impl crate::util::rng::Rng for Fixed {
            fn next_u64(&mut self) -> u64 {
                (self.0 * (1u64 << 53) as f64) as u64
            }
            fn next_f64(&mut self) -> f64 {
                self.0
            }
        }
        let b = Backoff::new();
        let o = Outcome::Throttled {
            cause: ThrottleCause::Requests,
            retry_after: Some(S(10)),
        };
        // The server's wait plus up to a tenth more.
        assert_eq!(b.wait(1, &o, &mut Fixed(0.5)), S(10) + MS(500));
        assert_eq!(b.wait(1, &o, &mut Fixed(0.0)), S(10));
        // Full jitter on the exponential part, on top of the floor.
        let t = Outcome::throttled(ThrottleCause::Requests);
        assert_eq!(b.wait(4, &t, &mut Fixed(0.25)), S(1) + S(1));
        assert_eq!(b.wait(4, &Outcome::TRANSIENT, &mut Fixed(0.75)), S(3));
    }

    #[test]
    fn debug_and_errors_read_well() {
        let text = format!("{:?}", Backoff::default());
        for field in [
            "base: 500ms",
            "factor: 2.0",
            "cap: 8s",
            "jitter: true",
            "requests_floor: 1s",
            "tokens_floor: 1s",
            "burst_floor: 5s",
            "max_wait: 60s",
        ] {
            assert!(text.contains(field), "{text}");
        }
        assert_eq!(Backoff::default(), Backoff::new());
        let err = Backoff::exponential(Duration::ZERO, 2.0, S(1)).unwrap_err();
        assert_eq!(err.to_string(), "invalid backoff: base must be positive");
        let err = Backoff::exponential(S(2), 2.0, S(1)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backoff: base must not exceed the cap"
        );
        let err = Backoff::exponential(S(1), 0.99, S(2)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid backoff: factor must be a finite number of at least 1"
        );
    }

    proptest! {
        #[test]
        fn waits_are_bounded_and_respect_floors(
            seed in any::<u64>(),
            n in 1u32..40,
            cause in 0usize..6,
            ra_ms in proptest::option::of(0u64..100_000),
        ) {
            let causes = [
                ThrottleCause::Requests, ThrottleCause::Tokens, ThrottleCause::Burst,
                ThrottleCause::Overloaded, ThrottleCause::Local, ThrottleCause::Unknown,
            ];
            let b = Backoff::new();
            let o = Outcome::Throttled { cause: causes[cause], retry_after: ra_ms.map(MS) };
            let w = b.wait(n, &o, &mut SeededRng::new(seed));
            prop_assert!(w <= S(60));
            match ra_ms {
                Some(ra) => {
                    prop_assert!(w >= MS(ra).min(S(60)));
                    prop_assert!(w <= MS(ra + ra / 10 + 1).min(S(60)));
                }
                None => {
                    prop_assert!(w >= b.floor(n, &o).min(S(60)));
                    prop_assert!(w <= b.floor(n, &o).saturating_add(S(8)).min(S(60)));
                }
            }
            // Transient waits are full jitter below the exponential part.
            let t = b.wait(n, &Outcome::TRANSIENT, &mut SeededRng::new(seed));
            prop_assert!(t <= b.exponential_part(n));
        }
    }
}
