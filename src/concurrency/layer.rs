use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use crate::classify::Classifier;

use super::aimd::Aimd;
use super::service::ConcurrencyLimit;
use super::shared::{LimitHandle, Shared};

/// The default bound on callers waiting for a permit.
const DEFAULT_MAX_WAITING: u32 = 1024;

/// Applies a [`ConcurrencyLimit`] to services. Every service this layer
/// makes, and every clone of them, shares one limit.
///
/// See the [module docs](super) for an example.
///
/// # Default
///
/// No `Default`: pick [`ConcurrencyLimitLayer::new`] (fixed) or
/// [`ConcurrencyLimitLayer::adaptive`]. Waiting callers are bounded at 1024,
/// with no maximum wait, and responses are classified with [`Classifier`].
#[derive(Clone)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct ConcurrencyLimitLayer<C = Classifier> {
    shared: Arc<Shared>,
    classifier: C,
    max_wait: Option<Duration>,
    max_waiting: u32,
}

impl ConcurrencyLimitLayer {
    /// A fixed limit of `limit` calls in flight.
    pub fn new(limit: NonZeroUsize) -> Self {
        Self {
            shared: Arc::new(Shared::fixed(limit.get())),
            classifier: Classifier::new(),
            max_wait: None,
            max_waiting: DEFAULT_MAX_WAITING,
        }
    }

    /// A limit that adapts with AIMD to throttling and transient failures.
    pub fn adaptive(aimd: Aimd) -> Self {
        Self {
            shared: Arc::new(Shared::adaptive(aimd)),
            classifier: Classifier::new(),
            max_wait: None,
            max_waiting: DEFAULT_MAX_WAITING,
        }
    }
}

impl<C> ConcurrencyLimitLayer<C> {
    /// The most callers that may wait for a permit; past it a call fails at
    /// once with [`Overloaded`](super::error::Overloaded). `Some(0)` sheds
    /// every call that finds the limit reached; `None` lets any number
    /// wait. Waiters are served first come, first served. Default is 1024.
    ///
    /// Like every setter, it applies to the services this layer makes from
    /// now on; services made before keep their bound (the shared limit and
    /// a [`handle`](Self::handle) taken earlier are never replaced).
    pub fn max_waiting(mut self, max: impl Into<Option<usize>>) -> Self {
        self.max_waiting = max
            .into()
            .map_or(u32::MAX, |n| u32::try_from(n).unwrap_or(u32::MAX));
        self
    }

    /// The longest a caller waits for a permit before its call fails with
    /// [`Overloaded`](super::error::Overloaded). Default is `None` (no
    /// limit: the queue bound and the caller's own deadline apply).
    pub fn max_wait(mut self, max: impl Into<Option<Duration>>) -> Self {
        self.max_wait = max.into();
        self
    }

    /// Classifies responses with `classifier` (for the adaptive limit; and it
    /// decides how the end of a response is observed, e.g. an
    /// [`FnClassifier`](crate::classify::FnClassifier) for non-HTTP
    /// services). Default is [`Classifier`].
    pub fn classifier<C2>(self, classifier: C2) -> ConcurrencyLimitLayer<C2> {
        ConcurrencyLimitLayer {
            shared: self.shared,
            classifier,
            max_wait: self.max_wait,
            max_waiting: self.max_waiting,
        }
    }

    /// A handle that reads the limit, the calls in flight and the waiters of
    /// every service this layer makes.
    pub fn handle(&self) -> LimitHandle {
        LimitHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<S, C: Clone> Layer<S> for ConcurrencyLimitLayer<C> {
    type Service = ConcurrencyLimit<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        ConcurrencyLimit::from_parts(
            inner,
            self.shared.clone(),
            self.classifier.clone(),
            self.max_wait,
            self.max_waiting,
        )
    }
}

impl<C> fmt::Debug for ConcurrencyLimitLayer<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConcurrencyLimitLayer")
            .field("limit", &self.handle())
            .field("max_wait", &self.max_wait)
            .field("max_waiting", &self.max_waiting)
            .finish()
    }
}
