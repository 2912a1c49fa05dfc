use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tower_layer::Layer;

use super::{Backoff, Budget, Hold, Policy, Retry};
use crate::classify::Classifier;
use crate::util::rng::{Rng, SeededRng};

/// Applies [`Retry`] to services. See the [module docs](super) for an
/// example.
///
/// # Clone
///
/// Clones of the layer, and every service any of them makes, share one
/// budget, one random source and one set of [`RetryStats`].
///
/// # Default
///
/// [`Policy::default`] (2 retries of throttled and transient failures),
/// [`Backoff::default`], [`Budget::default`] (20 % of requests plus 1 per
/// second), [`Classifier::default`], no deadline, streamed request bodies
/// buffered up to 1 MiB, output-less stream frames held per [`Hold::new`],
/// jitter from [`SeededRng::from_entropy`].
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct RetryLayer {
    pub(crate) config: Config,
    pub(crate) budget: Option<Budget>,
    pub(crate) rng: Arc<Mutex<dyn Rng>>,
    pub(crate) stats: RetryStats,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Config {
    pub(crate) policy: Policy,
    pub(crate) backoff: Backoff,
    pub(crate) classifier: Classifier,
    pub(crate) deadline: Option<Duration>,
    pub(crate) buffer_limit: usize,
    pub(crate) hold: Hold,
}

/// What every service made by one [`RetryLayer`] shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) budget: Option<Budget>,
    pub(crate) rng: Arc<Mutex<dyn Rng>>,
    pub(crate) stats: RetryStats,
}

impl Shared {
    pub(crate) fn jitter_source<T>(&self, f: impl FnOnce(&mut dyn Rng) -> T) -> T {
        let mut guard = self
            .rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&mut *guard)
    }
}

impl RetryLayer {
    /// A layer with the defaults.
    pub fn new() -> Self {
        Self {
            config: Config {
                policy: Policy::new(),
                backoff: Backoff::new(),
                classifier: Classifier::new(),
                deadline: None,
                buffer_limit: 1 << 20,
                hold: Hold::new(),
            },
            budget: Some(Budget::default()),
            rng: Arc::new(Mutex::new(SeededRng::from_entropy())),
            stats: RetryStats::default(),
        }
    }

    /// Which outcomes are retried, and how often. Default is
    /// [`Policy::default`].
    pub fn policy(mut self, policy: Policy) -> Self {
        self.config.policy = policy;
        self
    }

    /// The wait before each retry. Default is [`Backoff::default`].
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.config.backoff = backoff;
        self
    }

    /// The retry budget; `None` turns it off (then only
    /// [`Policy::max_retries`] bounds the retries: not recommended). Pass a
    /// clone of one [`Budget`] to several layers to share it. Default is
    /// [`Budget::default`].
    pub fn budget(mut self, budget: impl Into<Option<Budget>>) -> Self {
        self.budget = budget.into();
        self
    }

    /// The classifier that reads responses and errors. Its
    /// [body limit](Classifier::body_limit) bounds what is read ahead of the
    /// caller. Default is [`Classifier::default`].
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.config.classifier = classifier;
        self
    }

    /// A total deadline per request, from the call to the last attempt's
    /// response: no wait is started that would end past it. It is also
    /// stored in the request as a [`Deadline`](crate::time::Deadline)
    /// extension (keeping an earlier one), so a
    /// `timeout::Timeout` layer further in can cut an attempt at
    /// it. A `Deadline` already in the request is honoured either way.
    /// Default is none.
    pub fn deadline(mut self, total: impl Into<Option<Duration>>) -> Self {
        self.config.deadline = total.into();
        self
    }

    /// The most bytes of a streamed request body ([`Body::stream`](crate::body::Body::stream))
    /// read into memory before the first attempt so that it can be replayed.
    /// A longer body is sent once, whole, and not retried. Default is 1 MiB.
    pub fn buffer_limit(mut self, bytes: usize) -> Self {
        self.config.buffer_limit = bytes;
        self
    }

    /// How long the leading frames of an event stream that carry no output
    /// are held back so that the stream stays retryable until its first
    /// real token ([`Hold::NONE`]: the first `data:` line decides). Default
    /// is [`Hold::new`] (16 KiB, 10 s).
    pub fn hold(mut self, hold: Hold) -> Self {
        self.config.hold = hold;
        self
    }

    /// The random source for jitter (pass a seeded one in tests). Default is
    /// [`SeededRng::from_entropy`].
    pub fn rng(mut self, rng: impl Rng) -> Self {
        self.rng = Arc::new(Mutex::new(rng));
        self
    }

    /// The counters shared by every service this layer makes.
    pub fn stats(&self) -> RetryStats {
        self.stats.clone()
    }

    pub(crate) fn shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            config: self.config,
            budget: self.budget.clone(),
            rng: self.rng.clone(),
            stats: self.stats.clone(),
        })
    }
}

impl Default for RetryLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;

    fn layer(&self, inner: S) -> Retry<S> {
        Retry::from_shared(inner, self.shared())
    }
}

impl fmt::Debug for RetryLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryLayer")
            .field("policy", &self.config.policy)
            .field("backoff", &self.config.backoff)
            .field("budget", &self.budget)
            .field("deadline", &self.config.deadline)
            .field("buffer_limit", &self.config.buffer_limit)
            .field("hold", &self.config.hold)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("budget", &self.budget)
            .finish_non_exhaustive()
    }
}

/// Counters of a [`RetryLayer`], shared by every service it makes (cloning
/// shares them).
#[derive(Clone, Default)]
pub struct RetryStats {
    inner: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    attempts: AtomicU64,
    retries: AtomicU64,
    budget_denied: AtomicU64,
    deadline: AtomicU64,
    exhausted: AtomicU64,
    not_replayable: AtomicU64,
    sent_once: AtomicU64,
}

#[derive(Clone, Copy)]
pub(crate) enum Counter {
    Requests,
    /// A retry's call (first attempts are counted by `Requests`).
    RetryAttempts,
    Retries,
    BudgetDenied,
    Deadline,
    Exhausted,
    NotReplayable,
    SentOnce,
}

impl RetryStats {
    pub(crate) fn bump(&self, c: Counter) {
        let i = &self.inner;
        let cell = match c {
            Counter::Requests => &i.requests,
            Counter::RetryAttempts => &i.attempts,
            Counter::Retries => &i.retries,
            Counter::BudgetDenied => &i.budget_denied,
            Counter::Deadline => &i.deadline,
            Counter::Exhausted => &i.exhausted,
            Counter::NotReplayable => &i.not_replayable,
            Counter::SentOnce => &i.sent_once,
        };
        cell.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests received.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Calls made to the inner service (first attempts and retries; a
    /// request whose body was still being buffered when it was dropped counts
    /// one).
    pub fn attempts(&self) -> u64 {
        self.requests()
            .saturating_add(self.inner.attempts.load(Ordering::Relaxed))
    }

    /// Retries decided (each followed by a wait, then an attempt unless the
    /// caller went away).
    pub fn retries(&self) -> u64 {
        self.inner.retries.load(Ordering::Relaxed)
    }

    /// Retryable failures handed back because the budget denied a retry.
    pub fn budget_denied(&self) -> u64 {
        self.inner.budget_denied.load(Ordering::Relaxed)
    }

    /// Retryable failures handed back because the wait would have ended past
    /// the request's deadline.
    pub fn deadline_gave_up(&self) -> u64 {
        self.inner.deadline.load(Ordering::Relaxed)
    }

    /// Retryable failures handed back because every attempt was used.
    pub fn exhausted(&self) -> u64 {
        self.inner.exhausted.load(Ordering::Relaxed)
    }

    /// Retryable failures handed back because the request body could not be
    /// replayed.
    pub fn not_replayable(&self) -> u64 {
        self.inner.not_replayable.load(Ordering::Relaxed)
    }

    /// Requests whose streamed body outgrew the buffer limit (or failed while
    /// being buffered) and were therefore sent once.
    pub fn sent_once(&self) -> u64 {
        self.inner.sent_once.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for RetryStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetryStats")
            .field("requests", &self.requests())
            .field("attempts", &self.attempts())
            .field("retries", &self.retries())
            .field("budget_denied", &self.budget_denied())
            .field("deadline_gave_up", &self.deadline_gave_up())
            .field("exhausted", &self.exhausted())
            .field("not_replayable", &self.not_replayable())
            .field("sent_once", &self.sent_once())
            .finish()
    }
}
