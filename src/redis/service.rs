use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower_service::Service;

use crate::BoxError;
use crate::body::{BufferedBody, Inspect};
use crate::classify::{Classifier, Classify};
use crate::rate_limit::{Cost, Global, KeyFn, Mode};
use crate::request::RequestInfo;
use crate::time::{self, duration_nanos};
use crate::util::macros::define_inner_service_accessors;

use super::future::{Reconcile, ResponseFuture};
use super::key::StoreKey;
use super::layer::RedisRateLimitLayer;
use super::limiter::RedisLimiter;

/// Limits the calls (and tokens) that reach the inner service, deciding in
/// Redis. See the [module docs](super) for an example.
///
/// `poll_ready` is the inner service's. A call admitted from a local lease
/// goes to the ready inner service at once; any other call gets a fresh
/// clone of the inner service, which its response future drives
/// (`poll_ready` then `call`) once Redis (or the failure policy) admitted
/// it and its slot came, and the ready inner service is dropped, so no
/// inner capacity (a concurrency permit) is held meanwhile.
///
/// # Clone
///
/// Clones share the limiter (one budget for all, across replicas). A clone
/// never inherits a reservation: reservations belong to response futures.
pub struct RedisRateLimit<S, KF: KeyFn = Global, C = Classifier> {
    inner: S,
    limiter: RedisLimiter<KF::Key>,
    key_fn: KF,
    max_wait: u64,
    default_output: u32,
    classifier: C,
}

impl<S: Clone, KF: KeyFn, C: Clone> Clone for RedisRateLimit<S, KF, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            limiter: self.limiter.clone(),
            key_fn: self.key_fn.clone(),
            max_wait: self.max_wait,
            default_output: self.default_output,
            classifier: self.classifier.clone(),
        }
    }
}

impl<S: fmt::Debug, KF: KeyFn + fmt::Debug, C> fmt::Debug for RedisRateLimit<S, KF, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisRateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("key_fn", &self.key_fn)
            .field("max_wait", &Duration::from_nanos(self.max_wait))
            .finish_non_exhaustive()
    }
}

impl<S, KF: KeyFn, C: Clone> RedisRateLimit<S, KF, C> {
    pub(crate) fn from_layer(inner: S, layer: &RedisRateLimitLayer<KF, C>) -> Self {
        Self {
            inner,
            limiter: layer.limiter.clone(),
            key_fn: layer.key_fn.clone(),
            max_wait: match layer.mode {
                Mode::Wait { max_wait } => duration_nanos(max_wait),
                Mode::Reject => 0,
            },
            default_output: layer.default_output,
            classifier: layer.classifier.clone(),
        }
    }
}

impl<S, KF: KeyFn, C> RedisRateLimit<S, KF, C> {
    /// The shared limiter.
    pub fn limiter(&self) -> &RedisLimiter<KF::Key> {
        &self.limiter
    }

    define_inner_service_accessors!();
}

impl<S> RedisRateLimit<S> {
    /// One limit around `inner`, in wait mode (see [`RedisRateLimitLayer`]
    /// for the other settings).
    pub fn new(inner: S, limiter: RedisLimiter<()>) -> Self {
        RedisRateLimit::from_layer(inner, &RedisRateLimitLayer::new(limiter))
    }

    /// A layer; see [`RedisRateLimitLayer::new`].
    pub fn layer(limiter: RedisLimiter<()>) -> RedisRateLimitLayer {
        RedisRateLimitLayer::new(limiter)
    }
}

impl<S, KF, C, B> Service<Request<B>> for RedisRateLimit<S, KF, C>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
    KF: KeyFn,
    KF::Key: StoreKey,
    C: Classify<S::Response>,
    B: BufferedBody,
{
    type Response = C::Observed<Reconcile<KF::Key>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S, Request<B>, C, KF::Key>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if self.key_fn.needs_request_info() {
            RequestInfo::of(&mut req);
        }
        let key = {
            let (parts, body) = req.into_parts();
            let key = self.key_fn.key(&parts);
            req = Request::from_parts(parts, body);
            key
        };
        let limits = self.limiter.limits(&key);
        let tokens = if limits.get_tokens().is_some() {
            RequestInfo::of(&mut req).estimated_tokens(self.default_output)
        } else {
            0
        };
        let cost = Cost::call(tokens);
        let inspect = Inspect {
            outcome: true,
            usage: tokens > 0,
            timing: false,
        };
        let now = time::now();
        if let Some(admission) = self.limiter.try_lease(&key, &limits, cost, now) {
            let fut = self.inner.call(req);
            return ResponseFuture::called(
                fut,
                admission,
                tokens,
                self.classifier.clone(),
                inspect,
            );
        }
        let limiter = self.limiter.clone();
        let max_wait = self.max_wait;
        let decision = Box::pin(async move {
            let reservation = limiter.decide(&key, limits, cost, max_wait, now).await?;
            let at = reservation.ready_at();
            if at > time::now() {
                tracing::debug!(
                    wait_ms = at.saturating_duration_since(now).as_millis() as u64,
                    tokens,
                    "waiting for a distributed rate limit slot"
                );
            }
            Ok(reservation.ready().await)
        });
        // The decided call drives a fresh clone. The ready inner service is
        // dropped, not kept: whatever capacity its `poll_ready` reserved (a
        // concurrency permit, say) must not sit idle during the round trip
        // and the wait, or a caller that keeps this service (a retry future
        // does) could starve the calls that need it. `self` must be polled
        // ready again, as the `Service` contract says (as in the in-memory
        // layer).
        let fresh = self.inner.clone();
        drop(std::mem::replace(&mut self.inner, fresh));
        let svc = self.inner.clone();
        ResponseFuture::admitting(decision, svc, req, tokens, self.classifier.clone(), inspect)
    }
}
