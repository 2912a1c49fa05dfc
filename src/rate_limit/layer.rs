use std::fmt;
use std::time::Duration;

use tower_layer::Layer;

use crate::body::BufferedBody;
use crate::classify::Classifier;
use crate::key::{AccountModel, ByAccountModel, Global, Keys};
use crate::request::RequestInfo;

use super::fair::{FairShare, Fifo};
use super::limiter::{Cost, RateLimiter, SlowStart};
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

/// The cost of a request: what one call takes from the request and token
/// quotas. See the [module docs](super).
///
/// Implemented by [`Estimate`] (HTTP requests: one request and the token
/// estimate of the body), [`PerCall`] (one request, any request type) and
/// closures `Fn(&mut Req) -> Cost`.
pub trait CostOf<Req>: Clone + Send + Sync + 'static {
    /// The cost of `req`. `tokens` says whether its key has a token quota:
    /// an estimate is worth computing only then.
    fn cost_of(&self, req: &mut Req, tokens: bool) -> Cost;

    /// Whether `req` must not wait for a slot (it is refused at once, with
    /// the exact `retry_after`, as in [`Mode::Reject`]). Default is
    /// `false`; [`Estimate`] says so for an HTTP request that a
    /// [fallback](crate::fallback) layer outside can move to another model
    /// at once (it carries a `FallbackAvailable` that takes local
    /// throttles).
    fn no_wait(&self, req: &Req) -> bool {
        let _ = req;
        false
    }
}

impl<Req, F> CostOf<Req> for F
where
    F: Fn(&mut Req) -> Cost + Clone + Send + Sync + 'static,
{
    #[inline]
    fn cost_of(&self, req: &mut Req, _tokens: bool) -> Cost {
        self(req)
    }
}

/// One request per call, no tokens: the cost for any request type.
#[derive(Clone, Copy, Debug, Default)]
pub struct PerCall;

impl<Req> CostOf<Req> for PerCall {
    #[inline]
    fn cost_of(&self, _: &mut Req, _: bool) -> Cost {
        Cost::ONE
    }
}

/// The cost of an HTTP request to DashScope: one request, and (when the key
/// has a token quota) the token estimate of its body,
/// [`RequestInfo::estimated_tokens`]: the input estimate plus `max_tokens`,
/// or the default output budget when the request sets none.
///
/// # Default
///
/// A default output budget of [`DEFAULT_OUTPUT_TOKENS`] (1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Estimate {
    default_output: u32,
}

impl Default for Estimate {
    fn default() -> Self {
        Self::new(DEFAULT_OUTPUT_TOKENS)
    }
}

impl Estimate {
    /// Estimates with `default_output` tokens of output for a call that
    /// sets no `max_tokens` / `max_completion_tokens`.
    pub const fn new(default_output: u32) -> Self {
        Self { default_output }
    }

    /// The output budget of a call that sets no maximum.
    pub const fn default_output(&self) -> u32 {
        self.default_output
    }
}

impl<B: BufferedBody> CostOf<http::Request<B>> for Estimate {
    fn cost_of(&self, req: &mut http::Request<B>, tokens: bool) -> Cost {
        if tokens {
            Cost::call(RequestInfo::of(req).estimated_tokens(self.default_output))
        } else {
            Cost::ONE
        }
    }

    /// Issue 14: with a later model to fall back to, refuse rather than
    /// wait.
    fn no_wait(&self, req: &http::Request<B>) -> bool {
        #[cfg(feature = "fallback")]
        {
            crate::fallback::FallbackAvailable::refuse_rather_than_wait(req.extensions())
        }
        #[cfg(not(feature = "fallback"))]
        {
            let _ = req;
            false
        }
    }
}

/// Applies [`RateLimit`] to a service: a key function, a cost function and
/// a backend. See the [module docs](super).
///
/// Every service this layer makes shares the layer's backend (and so do
/// the services' clones).
pub struct RateLimitLayer<B = RateLimiter, K = Global, C = Classifier, W = Estimate, Q = Fifo> {
    pub(crate) backend: B,
    pub(crate) keys: K,
    pub(crate) mode: Mode,
    pub(crate) classifier: C,
    pub(crate) cost: W,
    pub(crate) order: Q,
}

impl<B: Clone, K: Clone, C: Clone, W: Clone, Q: Clone> Clone for RateLimitLayer<B, K, C, W, Q> {
    fn clone(&self) -> Self {
        Self {
            backend: self.backend.clone(),
            keys: self.keys.clone(),
            mode: self.mode,
            classifier: self.classifier.clone(),
            cost: self.cost.clone(),
            order: self.order.clone(),
        }
    }
}

impl<B: fmt::Debug, K: fmt::Debug, C: fmt::Debug, W: fmt::Debug, Q: fmt::Debug> fmt::Debug
    for RateLimitLayer<B, K, C, W, Q>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitLayer")
            .field("backend", &self.backend)
            .field("keys", &self.keys)
            .field("mode", &self.mode)
            .field("classifier", &self.classifier)
            .field("cost", &self.cost)
            .field("order", &self.order)
            .finish()
    }
}

/// The default maximum wait: 30 s.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// The default output budget of a call without `max_tokens`: 1024 tokens.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 1024;

impl<B> RateLimitLayer<B> {
    /// One limit for every request, decided by `backend` (a
    /// [`RateLimiter<()>`](RateLimiter), a
    /// [`RedisLimiter<()>`](crate::redis::RedisLimiter), ...).
    pub fn new(backend: B) -> Self {
        Self::keyed(backend, Global)
    }
}

impl RateLimitLayer {
    /// One in-memory limiter with these limits and the default settings.
    pub fn from_limits(limits: Limits) -> Self {
        Self::new(RateLimiter::new(limits))
    }
}

impl RateLimitLayer<RateLimiter<AccountModel>, ByAccountModel> {
    /// The Qwen preset over `quotas` (usually
    /// [`QuotaTable::qwen`], the published defaults, with your overrides):
    /// one in-memory limiter per (account, model) as `accounts` groups API
    /// keys, per-second smoothed RPM and TPM, feedback on, a slow start
    /// (half the quota held for 1 s, then growing by √2 per second to the
    /// full quota at 3 s), waiting up to 30 s.
    ///
    /// What the slow start assumes of DashScope's undocumented growth guard:
    /// an idle key may send half its per-second quota (RPM / 60) in any one
    /// second, and its rate may then grow by √2 (1.41x) from one second to
    /// the next.
    pub fn qwen(quotas: QuotaTable, accounts: ByAccountModel) -> Self {
        let limiter = RateLimiter::builder(Limits::UNLIMITED)
            .slow_start(
                SlowStart::new(Duration::from_secs(3))
                    .initial_rate(0.5)
                    .hold(Duration::from_secs(1)),
            )
            .build_keyed_with(move |k: &AccountModel| quotas.get(k.model()));
        Self::keyed(limiter, accounts)
    }
}

impl<B, K> RateLimitLayer<B, K> {
    /// A keyed limit: each request is charged to the key `keys` finds for
    /// it (see [`key`](crate::key)), in `backend`.
    pub fn keyed(backend: B, keys: K) -> Self {
        Self {
            backend,
            keys,
            mode: Mode::Wait {
                max_wait: DEFAULT_MAX_WAIT,
            },
            classifier: Classifier::new(),
            cost: Estimate::default(),
            order: Fifo,
        }
    }
}

impl<B, K, C, Q> RateLimitLayer<B, K, C, Estimate, Q> {
    /// The output tokens reserved for a call that sets no `max_tokens` /
    /// `max_completion_tokens`. Default is 1024. Reservations are
    /// reconciled with the real `usage` when the response ends, but a
    /// reservation cannot be moved up once later calls are queued behind
    /// it, so an estimate close to reality gives the best goodput.
    pub fn default_output_tokens(mut self, tokens: u32) -> Self {
        self.cost = Estimate::new(tokens);
        self
    }
}

impl<B, K, C, W, Q> RateLimitLayer<B, K, C, W, Q> {
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

    /// Uses another classifier (e.g. a
    /// [`FnClassifier`](crate::classify::FnClassifier) for non-HTTP
    /// responses). Default is the DashScope [`Classifier`].
    pub fn classifier<C2>(self, classifier: C2) -> RateLimitLayer<B, K, C2, W, Q> {
        RateLimitLayer {
            backend: self.backend,
            keys: self.keys,
            mode: self.mode,
            classifier,
            cost: self.cost,
            order: self.order,
        }
    }

    /// Uses another cost function (see [`CostOf`]): [`PerCall`] or a
    /// closure for non-HTTP requests. Default is [`Estimate`].
    pub fn cost<W2>(self, cost: W2) -> RateLimitLayer<B, K, C, W2, Q> {
        RateLimitLayer {
            backend: self.backend,
            keys: self.keys,
            mode: self.mode,
            classifier: self.classifier,
            cost,
            order: self.order,
        }
    }

    /// Waiting calls share the quota by flow and weight (see
    /// [`fair`](super::fair)) instead of going in arrival order. Applies in
    /// [`Mode::Wait`]. Default is [`Fifo`].
    pub fn fair<F>(self, fair: FairShare<F>) -> RateLimitLayer<B, K, C, W, FairShare<F>> {
        RateLimitLayer {
            backend: self.backend,
            keys: self.keys,
            mode: self.mode,
            classifier: self.classifier,
            cost: self.cost,
            order: fair,
        }
    }

    /// The shared backend (for snapshots and manual feedback).
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<S, B: Clone, K: Keys, C: Clone, W: Clone, Q: Clone> Layer<S>
    for RateLimitLayer<B, K, C, W, Q>
{
    type Service = RateLimit<S, B, K, C, W, Q>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit::from_layer(inner, self)
    }
}
