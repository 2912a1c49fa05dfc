use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use crate::classify::Classifier;

use super::key::{ByAccountModel, Global, KeyFn};
use super::limiter::{RateLimiter, SlowStart};
use super::quota::{Limits, QuotaTable};
use super::service::RateLimit;

/// What a call does when its quota has no room now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Client side: the response future waits for its reserved slot (FIFO)
    /// and then calls the inner service. A call whose slot is more than
    /// `max_wait` away fails at once with
    /// [`RateLimited`](super::error::RateLimited) (its `retry_after` says
    /// when it would have gone) and reserves nothing.
    Wait {
        /// The longest a call may wait.
        max_wait: Duration,
    },
    /// Server side (gateways): fail at once with
    /// [`RateLimited`](super::error::RateLimited), whose `retry_after` is
    /// exact.
    Reject,
}

/// Applies [`RateLimit`] to a service. See the [module docs](super).
///
/// Every service this layer makes shares the layer's [`RateLimiter`] (and
/// so do the services' clones).
pub struct RateLimitLayer<KF: KeyFn = Global, C = Classifier> {
    pub(crate) limiter: RateLimiter<KF::Key>,
    pub(crate) key_fn: KF,
    pub(crate) mode: Mode,
    pub(crate) default_output: u32,
    pub(crate) classifier: C,
}

impl<KF: KeyFn, C: Clone> Clone for RateLimitLayer<KF, C> {
    fn clone(&self) -> Self {
        Self {
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            mode: self.mode,
            default_output: self.default_output,
            classifier: self.classifier.clone(),
        }
    }
}

impl<KF: KeyFn + fmt::Debug, C: fmt::Debug> fmt::Debug for RateLimitLayer<KF, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("limiter", &self.limiter)
            .field("key_fn", &self.key_fn)
            .field("mode", &self.mode)
            .field("default_output", &self.default_output)
            .field("classifier", &self.classifier)
            .finish()
    }
}

/// The default maximum wait: 30 s.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// The default output budget of a call without `max_tokens`: 1024 tokens.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 1024;

impl RateLimitLayer<Global> {
    /// One limiter for every request.
    pub fn new(limiter: RateLimiter<()>) -> Self {
        Self::keyed(limiter, Global)
    }

    /// One limiter with these limits and the default settings.
    pub fn from_limits(limits: Limits) -> Self {
        Self::new(RateLimiter::new(limits))
    }
}

impl RateLimitLayer<ByAccountModel> {
    /// The Qwen preset: one limiter per (account, model) with
    /// [`qwen_defaults`](super::qwen_defaults) (per-second smoothed RPM and
    /// TPM), feedback on, a slow start from 50% over 5 s, waiting up to 30 s.
    /// Every API
    /// key counts as its own account; see
    /// [`RateLimitLayer::qwen_with`] to group keys and override quotas.
    pub fn qwen() -> Self {
        Self::qwen_with(QuotaTable::qwen(), ByAccountModel::new())
    }

    /// The Qwen preset with your quota table and key → account map.
    pub fn qwen_with(table: QuotaTable, accounts: ByAccountModel) -> Self {
        let limiter = RateLimiter::builder(Limits::UNLIMITED)
            .slow_start(SlowStart::new(Duration::from_secs(5)).initial_rate(0.5))
            .build_keyed_with(move |k: &super::key::AccountModel| table.get(k.model()));
        Self::keyed(limiter, accounts)
    }
}

impl<KF: KeyFn> RateLimitLayer<KF> {
    /// A keyed limiter: each request is charged to `key_fn(request)`.
    pub fn keyed(limiter: RateLimiter<KF::Key>, key_fn: KF) -> Self {
        Self {
            limiter,
            key_fn,
            mode: Mode::Wait {
                max_wait: DEFAULT_MAX_WAIT,
            },
            default_output: DEFAULT_OUTPUT_TOKENS,
            classifier: Classifier::new(),
        }
    }
}

impl<KF: KeyFn, C> RateLimitLayer<KF, C> {
    /// Wait or reject. Default is `Mode::Wait { max_wait: 30 s }`.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Shortcut for `Mode::Wait { max_wait }`.
    pub fn wait(self, max_wait: Duration) -> Self {
        self.mode(Mode::Wait { max_wait })
    }

    /// Shortcut for `Mode::Reject`.
    pub fn reject(self) -> Self {
        self.mode(Mode::Reject)
    }

    /// The output tokens reserved for a call that sets no `max_tokens` /
    /// `max_completion_tokens`. Default is 1024. Reservations are
    /// reconciled with the real `usage` when the response ends, but a
    /// reservation cannot be moved up once later calls are queued behind
    /// it, so an estimate close to reality gives the best goodput.
    pub fn default_output_tokens(mut self, tokens: u32) -> Self {
        self.default_output = tokens;
        self
    }

    /// Uses another classifier (e.g. a
    /// [`FnClassifier`](crate::classify::FnClassifier)). Default is the
    /// DashScope [`Classifier`].
    pub fn classifier<C2>(self, classifier: C2) -> RateLimitLayer<KF, C2> {
        RateLimitLayer {
            limiter: self.limiter,
            key_fn: self.key_fn,
            mode: self.mode,
            default_output: self.default_output,
            classifier,
        }
    }

    /// The shared limiter (for snapshots and manual feedback).
    pub fn limiter(&self) -> &RateLimiter<KF::Key> {
        &self.limiter
    }
}

impl<S, KF: KeyFn, C: Clone> Layer<S> for RateLimitLayer<KF, C> {
    type Service = RateLimit<S, KF, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_layer(inner, self)
    }
}
