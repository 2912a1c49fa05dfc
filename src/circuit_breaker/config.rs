//! The breaker's settings.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::classify::Outcome;
use crate::util::rng::{Rng, SeededRng};

use super::error::InvalidConfig;

/// What a tripped circuit does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TripAction {
    /// Fail every call fast with
    /// [`CircuitOpen`](super::error::CircuitOpen) for the open duration,
    /// then let probes through (half-open). Default.
    #[default]
    Open,
    /// Keep admitting calls, at most this many per second (the rest fail
    /// fast); once the open duration has passed, admitted calls are probes:
    /// a success closes the circuit, a failure degrades it again for
    /// longer. A `warn` event marks each entry into the degraded state.
    Degrade(NonZeroU32),
}

impl TripAction {
    /// [`TripAction::Degrade`] at 5 calls per second (the source advice's
    /// "degrade a key to 5 QPS").
    pub const fn degrade() -> Self {
        TripAction::Degrade(NonZeroU32::new(5).unwrap())
    }
}

/// The failure-rate rule: trip when at least `ratio` of the calls in a
/// sliding window of the last `window` counted calls failed, once the
/// window holds at least `min_calls`.
///
/// # Default
///
/// 50 % over the last 100 calls, at least 20 calls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FailureRate {
    pub(crate) ratio: f64,
    pub(crate) window: u32,
    pub(crate) min_calls: u32,
}

impl Default for FailureRate {
    fn default() -> Self {
        Self {
            ratio: 0.5,
            window: 100,
            min_calls: 20,
        }
    }
}

impl FailureRate {
    /// Trip at `ratio` (in `(0, 1]`) of failures, with the default window
    /// and minimum.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when `ratio` is not in `(0, 1]`.
    pub fn new(ratio: f64) -> Result<Self, InvalidConfig> {
        if !(ratio > 0.0 && ratio <= 1.0) {
            return Err(InvalidConfig::new("failure ratio must be in (0, 1]"));
        }
        Ok(Self {
            ratio,
            ..Self::default()
        })
    }

    /// How many of the most recent counted calls the window holds. Default
    /// is 100. Capped at 65 536.
    pub fn window(mut self, calls: NonZeroU32) -> Self {
        self.window = calls.get().min(65_536);
        self
    }

    /// The fewest calls in the window before the rate can trip the circuit.
    /// Default is 20.
    pub fn min_calls(mut self, calls: u32) -> Self {
        self.min_calls = calls;
        self
    }
}

/// A callback run on every state change, with the circuit's key (`()` for an
/// unkeyed breaker).
pub(crate) type OnChange<K> = Arc<dyn Fn(&K, &super::Transition) + Send + Sync>;

#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) consecutive_failures: Option<NonZeroU32>,
    pub(crate) failure_rate: Option<FailureRate>,
    pub(crate) slow_call: Option<Duration>,
    pub(crate) open_base: Duration,
    pub(crate) open_max: Duration,
    pub(crate) jitter: f64,
    pub(crate) rng: Arc<Mutex<Box<dyn Rng>>>,
    pub(crate) half_open_probes: u32,
    pub(crate) action: TripAction,
    pub(crate) is_failure: fn(&Outcome) -> bool,
    pub(crate) max_keys: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            consecutive_failures: NonZeroU32::new(3),
            failure_rate: Some(FailureRate::default()),
            slow_call: None,
            open_base: Duration::from_secs(5),
            open_max: Duration::from_secs(60),
            jitter: 0.2,
            rng: Arc::new(Mutex::new(Box::new(SeededRng::from_entropy()))),
            half_open_probes: 1,
            action: TripAction::Open,
            is_failure: Outcome::is_transient,
            max_keys: 1024,
        }
    }
}

impl Config {
    /// The open duration after `trips` trips in a row: doubled per trip from
    /// the base, capped, then shortened by up to the jitter fraction.
    pub(crate) fn open_duration(&self, trips: u32) -> Duration {
        let shift = trips.saturating_sub(1).min(30);
        let d = self
            .open_base
            .checked_mul(1u32 << shift)
            .unwrap_or(self.open_max)
            .min(self.open_max);
        if self.jitter <= 0.0 {
            return d;
        }
        let x = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .next_f64();
        d.mul_f64(1.0 - self.jitter * x)
    }

    pub(crate) fn set_jitter(&mut self, fraction: f64) {
        self.jitter = if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        };
    }

    pub(crate) fn set_rng(&mut self, rng: impl Rng) {
        self.rng = Arc::new(Mutex::new(Box::new(rng)));
    }

    pub(crate) fn set_max_keys(&mut self, n: NonZeroUsize) {
        self.max_keys = n.get();
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("consecutive_failures", &self.consecutive_failures)
            .field("failure_rate", &self.failure_rate)
            .field("slow_call", &self.slow_call)
            .field("open_base", &self.open_base)
            .field("open_max", &self.open_max)
            .field("jitter", &self.jitter)
            .field("half_open_probes", &self.half_open_probes)
            .field("action", &self.action)
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}
