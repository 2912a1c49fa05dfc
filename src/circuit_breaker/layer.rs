use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::classify::{Classifier, Outcome};
use crate::util::rng::Rng;

use super::config::{Config, FailureRate, OnChange, TripAction};
use super::service::CircuitBreaker;
use super::shared::{BreakerHandle, Shared};
use super::state::Transition;
use crate::key::{Global, Keys};

/// Applies a [`CircuitBreaker`] to services. Every service this layer makes,
/// and every clone of them, shares its circuit(s).
///
/// Like every setter of the crate's layers, a setter configures the
/// services the layer makes from then on: services made before keep their
/// settings, and every service shares the same circuit(s), which a
/// [`handle`](CircuitBreakerLayer::handle) taken before or after reads and
/// steers alike. (The failure-rate window of a circuit is as long as the
/// rule of the first call it counts says.) [`keyed`](CircuitBreakerLayer::keyed)
/// is the exception: it makes a breaker with keys, whose circuits and handle
/// are new.
///
/// See the [module docs](super) for an example.
///
/// # Default
///
/// Trips after 3 consecutive transient failures, or when 50 % of the last
/// 100 counted calls failed (at least 20 calls); only
/// [`Outcome::Transient`] counts as a failure; throttled calls are ignored.
/// Open for 5 s, doubled per trip in a row up to 60 s, shortened at random
/// by up to 20 %; one probe at a time when half-open; trip action
/// [`TripAction::Open`]; no slow-call rule; one circuit for every call.
#[must_use = "a layer does nothing until it wraps a service"]
pub struct CircuitBreakerLayer<C = Classifier, P: Keys = Global> {
    shared: Arc<Shared<P::Key>>,
    keys: P,
    classifier: C,
    on_change: Option<OnChange<P::Key>>,
}

impl Default for CircuitBreakerLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl CircuitBreakerLayer {
    /// A breaker with the [defaults](CircuitBreakerLayer#default).
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared::new(Config::default(), Some(()), None)),
            keys: Global,
            classifier: Classifier::new(),
            on_change: None,
        }
    }
}

impl<C> CircuitBreakerLayer<C, Global> {
    /// One circuit per key, the key found by `keys` for the request (an
    /// extractor of the [`key`](crate::key) module: an upstream account, a
    /// client key, a model, or a closure with
    /// [`key_fn`](crate::key::key_fn)), at most `max_keys` of them. When a
    /// new key arrives and the map is full, circuits with nothing to
    /// remember (closed, no failure counted, no call in flight) are evicted
    /// (at most once a second); if none is, new keys share one overflow
    /// circuit until room frees up.
    ///
    /// Never log or report a secret as a key: the key reaches the
    /// [`on_state_change`](CircuitBreakerLayer::on_state_change) callback.
    /// This makes a new breaker: its circuits have keys, so services made
    /// and handles taken before this call are not part of it. A
    /// state-change callback set before this call is dropped (its key type
    /// changes); set it after.
    pub fn keyed<P: Keys>(self, keys: P, max_keys: NonZeroUsize) -> CircuitBreakerLayer<C, P> {
        let mut cfg = self.shared.cfg.clone();
        cfg.set_max_keys(max_keys);
        CircuitBreakerLayer {
            shared: Arc::new(Shared::new(cfg, None, None)),
            keys,
            classifier: self.classifier,
            on_change: None,
        }
    }
}

impl<C, P: Keys> CircuitBreakerLayer<C, P> {
    fn update(self, f: impl FnOnce(&mut Config)) -> Self {
        let mut cfg = self.shared.cfg.clone();
        f(&mut cfg);
        Self {
            shared: Arc::new(self.shared.with(cfg, self.on_change.clone())),
            keys: self.keys,
            classifier: self.classifier,
            on_change: self.on_change,
        }
    }

    /// Trip after this many consecutive failures; `None` disables the rule.
    /// Default is 3.
    pub fn consecutive_failures(self, n: impl Into<Option<NonZeroU32>>) -> Self {
        let n = n.into();
        self.update(|c| c.consecutive_failures = n)
    }

    /// Trip on the failure rate over a sliding window; `None` disables the
    /// rule. Default is [`FailureRate::default`] (50 % of the last 100
    /// calls, at least 20).
    pub fn failure_rate(self, rate: impl Into<Option<FailureRate>>) -> Self {
        let rate = rate.into();
        self.update(|c| c.failure_rate = rate)
    }

    /// Also count a success whose time to the first body frame exceeds
    /// `threshold` as a failure (the slow-call rule; time to first byte, so
    /// a long generation is not mistaken for a slow upstream). Default is
    /// `None`.
    pub fn slow_call(self, threshold: impl Into<Option<Duration>>) -> Self {
        let t = threshold.into();
        self.update(|c| c.slow_call = t)
    }

    /// How long a circuit stays open: `base` after the first trip, doubled
    /// per trip in a row, at most `max` (raised to `base` if smaller).
    /// Default is 5 s up to 60 s.
    pub fn open_duration(self, base: Duration, max: Duration) -> Self {
        self.update(|c| {
            c.open_base = base;
            c.open_max = max.max(base);
        })
    }

    /// Shortens each open duration at random by up to this fraction of it
    /// (clamped to `[0, 1]`), so that many circuits (or replicas) do not
    /// probe at the same instant. Default is 0.2.
    pub fn jitter(self, fraction: f64) -> Self {
        self.update(|c| c.set_jitter(fraction))
    }

    /// The random source of the jitter. Default is
    /// [`SeededRng::from_entropy`](crate::util::rng::SeededRng::from_entropy);
    /// tests pass a seeded one.
    pub fn rng(self, rng: impl Rng) -> Self {
        self.update(|c| c.set_rng(rng))
    }

    /// How many probes may be in flight at once when half-open. Default
    /// is 1.
    pub fn half_open_probes(self, n: NonZeroU32) -> Self {
        self.update(|c| c.half_open_probes = n.get())
    }

    /// What a tripped circuit does. Default is [`TripAction::Open`].
    pub fn trip_action(self, action: TripAction) -> Self {
        self.update(|c| c.action = action)
    }

    /// Which outcomes count as failures. Outcomes that are not failures
    /// count as successes, except throttled ones, which are ignored. Default
    /// is [`Outcome::is_transient`] (5xx, timeouts, resets; not 429, not
    /// 4xx). For example, `|o| o.is_transient() || o.is_throttled()` also
    /// trips on throttling.
    pub fn failure_if(self, is_failure: fn(&Outcome) -> bool) -> Self {
        self.update(|c| c.is_failure = is_failure)
    }

    /// Runs `f` on every state change, with the circuit's key (`()` for an
    /// unkeyed breaker): the changes made by calls of the services this
    /// layer makes from now on, and through handles taken from now on. It
    /// runs on the caller's task: keep it short. Default is none (state
    /// changes are `tracing` events either way).
    pub fn on_state_change<F>(mut self, f: F) -> Self
    where
        F: Fn(&P::Key, &Transition) + Send + Sync + 'static,
    {
        self.on_change = Some(Arc::new(f));
        self.update(|_| {})
    }

    /// Classifies responses with `classifier` (an
    /// [`FnClassifier`](crate::classify::FnClassifier) for non-HTTP
    /// services). Default is [`Classifier`].
    pub fn classifier<C2>(self, classifier: C2) -> CircuitBreakerLayer<C2, P> {
        CircuitBreakerLayer {
            shared: self.shared,
            keys: self.keys,
            classifier,
            on_change: self.on_change,
        }
    }

    /// A handle that reads and steers the circuit(s) of every service this
    /// layer makes.
    pub fn handle(&self) -> BreakerHandle<P::Key> {
        BreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<C: Clone, P: Keys> Clone for CircuitBreakerLayer<C, P> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
            keys: self.keys.clone(),
            classifier: self.classifier.clone(),
            on_change: self.on_change.clone(),
        }
    }
}

impl<S, C: Clone, P: Keys> Layer<S> for CircuitBreakerLayer<C, P> {
    type Service = CircuitBreaker<S, C, P>;

    fn layer(&self, inner: S) -> Self::Service {
        CircuitBreaker::from_parts(
            inner,
            self.shared.clone(),
            self.keys.clone(),
            self.classifier.clone(),
        )
    }
}

impl<C, P: Keys> fmt::Debug for CircuitBreakerLayer<C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerLayer")
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}
