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
pub struct RetryLayer<C = Classifier> {
    pub(crate) config: Config<C>,
    pub(crate) budget: Option<Budget>,
    pub(crate) rng: Arc<Mutex<dyn Rng>>,
    pub(crate) stats: RetryStats,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Config<C> {
    pub(crate) policy: Policy,
    pub(crate) backoff: Backoff,
    pub(crate) classifier: C,
    pub(crate) deadline: Option<Duration>,
    pub(crate) buffer_limit: usize,
    pub(crate) hold: Hold,
}

/// What every service made by one [`RetryLayer`] shares.
pub(crate) struct Shared<C = Classifier> {
    pub(crate) config: Config<C>,
    pub(crate) budget: Option<Budget>,
    pub(crate) rng: Arc<Mutex<dyn Rng>>,
    pub(crate) stats: RetryStats,
}

impl<C> Shared<C> {
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
}

impl<C> RetryLayer<C> {
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

    /// The classifier that reads responses and errors: any
    /// [`Classify`](crate::classify::Classify), like the circuit breaker's.
    /// A [`Classifier`]'s [body limit](Classifier::body_limit) bounds what is
    /// read ahead of the caller; a classifier that judges the response value
    /// alone (an [`FnClassifier`](crate::classify::FnClassifier)) reads
    /// nothing ahead. Errors are classified by
    /// [`Classify::classify_error`](crate::classify::Classify::classify_error):
    /// teach it your own error type with `on_error`. Default is
    /// [`Classifier::default`].
    ///
    /// # Example
    ///
    /// A service whose error is a gRPC-style status: `Unavailable` is
    /// retried, `NotFound` is handed back at once.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    /// use tower::{ServiceBuilder, ServiceExt};
    /// use tower_qwen::body::Body;
    /// use tower_qwen::classify::{Classifier, Outcome, PermanentReason};
    /// use tower_qwen::retry::RetryLayer;
    ///
    /// #[derive(Debug)]
    /// enum Status { NotFound, Unavailable }
    /// impl std::fmt::Display for Status {
    ///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{self:?}") }
    /// }
    /// impl std::error::Error for Status {}
    ///
    /// let calls = Arc::new(AtomicU32::new(0));
    /// let upstream = tower::service_fn({
    ///     let calls = calls.clone();
    ///     move |_req: http::Request<Body>| {
    ///         calls.fetch_add(1, Ordering::SeqCst);
    ///         async { Err::<http::Response<String>, _>(Status::NotFound) }
    ///     }
    /// });
    /// let layer = RetryLayer::new().classifier(Classifier::new().on_error(|s: &Status| match s {
    ///     Status::NotFound => Outcome::Permanent { reason: PermanentReason::NotFound },
    ///     Status::Unavailable => Outcome::TRANSIENT,
    /// }));
    /// let client = ServiceBuilder::new().layer(layer).service(upstream);
    /// let err = client.oneshot(http::Request::new(Body::from("{}"))).await.unwrap_err();
    /// assert!(matches!(err, Status::NotFound));
    /// assert_eq!(calls.load(Ordering::SeqCst), 1); // permanent: not retried
    /// # }
    /// ```
    pub fn classifier<C2>(self, classifier: C2) -> RetryLayer<C2> {
        let Config {
            policy,
            backoff,
            classifier: _,
            deadline,
            buffer_limit,
            hold,
        } = self.config;
        RetryLayer {
            config: Config {
                policy,
                backoff,
                classifier,
                deadline,
                buffer_limit,
                hold,
            },
            budget: self.budget,
            rng: self.rng,
            stats: self.stats,
        }
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

    pub(crate) fn shared(&self) -> Arc<Shared<C>>
    where
        C: Clone,
    {
        Arc::new(Shared {
            config: self.config.clone(),
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

impl<S, C: Clone> Layer<S> for RetryLayer<C> {
    type Service = Retry<S, C>;

    fn layer(&self, inner: S) -> Retry<S, C> {
        Retry::from_shared(inner, self.shared())
    }
}

impl<C> fmt::Debug for RetryLayer<C> {
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

impl<C> fmt::Debug for Shared<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("policy", &self.config.policy)
            .field("backoff", &self.config.backoff)
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
