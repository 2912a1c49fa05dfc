use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use crate::classify::Classifier;
use crate::rate_limit::{DEFAULT_MAX_WAIT, DEFAULT_OUTPUT_TOKENS, Global, KeyFn, Mode};

use super::key::StoreKey;
use super::limiter::RedisLimiter;
use super::service::RedisRateLimit;

/// Applies [`RedisRateLimit`] to a service: the
/// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) of the in-memory
/// limiter, with the decision made in Redis. Same key functions, same
/// [`Mode`]s, same token estimate and reconciliation. See the
/// [module docs](super).
///
/// Every service this layer makes shares the layer's [`RedisLimiter`] (and
/// so do the services' clones).
pub struct RedisRateLimitLayer<KF: KeyFn = Global, C = Classifier> {
    pub(crate) limiter: RedisLimiter<KF::Key>,
    pub(crate) key_fn: KF,
    pub(crate) mode: Mode,
    pub(crate) default_output: u32,
    pub(crate) classifier: C,
}

impl<KF: KeyFn, C: Clone> Clone for RedisRateLimitLayer<KF, C> {
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

impl<KF: KeyFn + fmt::Debug, C: fmt::Debug> fmt::Debug for RedisRateLimitLayer<KF, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimitLayer")
            .field("limiter", &self.limiter)
            .field("key_fn", &self.key_fn)
            .field("mode", &self.mode)
            .field("default_output", &self.default_output)
            .field("classifier", &self.classifier)
            .finish()
    }
}

impl RedisRateLimitLayer<Global> {
    /// One limit for every request.
    pub fn new(limiter: RedisLimiter<()>) -> Self {
        Self::keyed(limiter, Global)
    }
}

impl<KF: KeyFn> RedisRateLimitLayer<KF>
where
    KF::Key: StoreKey,
{
    /// A keyed limiter: each request is charged to `key_fn(request)`.
    pub fn keyed(limiter: RedisLimiter<KF::Key>, key_fn: KF) -> Self {
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

impl<KF: KeyFn, C> RedisRateLimitLayer<KF, C> {
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
    /// `max_completion_tokens`. Default is 1024.
    pub fn default_output_tokens(mut self, tokens: u32) -> Self {
        self.default_output = tokens;
        self
    }

    /// Uses another classifier. Default is the DashScope [`Classifier`].
    pub fn classifier<C2>(self, classifier: C2) -> RedisRateLimitLayer<KF, C2> {
        RedisRateLimitLayer {
            limiter: self.limiter,
            key_fn: self.key_fn,
            mode: self.mode,
            default_output: self.default_output,
            classifier,
        }
    }

    /// The shared limiter.
    pub fn limiter(&self) -> &RedisLimiter<KF::Key> {
        &self.limiter
    }
}

impl<S, KF: KeyFn, C: Clone> Layer<S> for RedisRateLimitLayer<KF, C> {
    type Service = RedisRateLimit<S, KF, C>;

    fn layer(&self, inner: S) -> Self::Service {
        RedisRateLimit::from_layer(inner, self)
    }
}
