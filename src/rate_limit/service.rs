use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use tower_service::Service;

use crate::BoxError;
use crate::body::{BufferedBody, Inspect};
use crate::classify::{Classifier, Classify};
use crate::request::RequestInfo;
use crate::time::{self, duration_nanos};
use crate::util::macros::define_inner_service_accessors;

use super::future::{Reconcile, ResponseFuture};
use super::key::{Global, KeyFn};
use super::layer::{Mode, RateLimitLayer};
use super::limiter::{Cost, RateLimiter, Ticket};

/// Limits the calls (and tokens) that reach the inner service. See the
/// [module docs](super) for an example.
///
/// `poll_ready` is the inner service's. In [`Mode::Wait`], a call that has
/// to wait gets a fresh clone of the inner service, which its response
/// future drives (`poll_ready` then `call`) when its slot comes, and the
/// ready inner service is dropped, so no inner capacity (a concurrency
/// permit) is held while waiting.
///
/// # Clone
///
/// Clones share the limiter (one budget for all). A clone never inherits a
/// reservation: reservations belong to response futures.
pub struct RateLimit<S, KF: KeyFn = Global, C = Classifier> {
    inner: S,
    limiter: RateLimiter<KF::Key>,
    key_fn: KF,
    max_wait: u64,
    default_output: u32,
    classifier: C,
}

impl<S: Clone, KF: KeyFn, C: Clone> Clone for RateLimit<S, KF, C> {
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

impl<S: fmt::Debug, KF: KeyFn + fmt::Debug, C> fmt::Debug for RateLimit<S, KF, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("limiter", &self.limiter)
            .field("key_fn", &self.key_fn)
            .field("max_wait", &Duration::from_nanos(self.max_wait))
            .finish_non_exhaustive()
    }
}

impl<S, KF: KeyFn, C: Clone> RateLimit<S, KF, C> {
    pub(crate) fn from_layer(inner: S, layer: &RateLimitLayer<KF, C>) -> Self {
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

impl<S, KF: KeyFn, C> RateLimit<S, KF, C> {
    /// The shared limiter.
    pub fn limiter(&self) -> &RateLimiter<KF::Key> {
        &self.limiter
    }

    define_inner_service_accessors!();
}

impl<S> RateLimit<S> {
    /// One limiter around `inner`, in wait mode (see [`RateLimitLayer`] for
    /// the other settings).
    pub fn new(inner: S, limiter: RateLimiter<()>) -> Self {
        RateLimit::from_layer(inner, &RateLimitLayer::new(limiter))
    }

    /// A layer; see [`RateLimitLayer::new`].
    pub fn layer(limiter: RateLimiter<()>) -> RateLimitLayer {
        RateLimitLayer::new(limiter)
    }
}

impl<S, KF, C, B> Service<Request<B>> for RateLimit<S, KF, C>
where
    S: Service<Request<B>> + Clone,
    S::Error: Into<BoxError>,
    KF: KeyFn,
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
        let estimate = if self.key_fn.needs_request_info() || self.limiter.tokens_seen() {
            Some(RequestInfo::of(&mut req).estimated_tokens(self.default_output))
        } else {
            None
        };
        let key = {
            let (parts, body) = req.into_parts();
            let key = self.key_fn.key(&parts);
            req = Request::from_parts(parts, body);
            key
        };
        let t = time::now();
        let now = self.limiter.nanos(t);
        let default_output = self.default_output;
        let max_wait = self.max_wait;
        // Issue 14: with a later model to fall back to, refuse rather than wait.
        #[cfg(feature = "fallback")]
        let max_wait =
            match crate::fallback::FallbackAvailable::refuse_rather_than_wait(req.extensions()) {
                true => 0,
                false => max_wait,
            };
        let limiter = &self.limiter;
        let decided = limiter.with_state(&key, now, |state, slot| {
            let tokens = if state.has_tokens() {
                // Estimated before the lookup unless this is the first key
                // with a token quota.
                estimate
                    .unwrap_or_else(|| RequestInfo::of(&mut req).estimated_tokens(default_output))
            } else {
                0
            };
            limiter
                .book(state, now, Cost::call(tokens), max_wait)
                .map(|b| (b, slot))
        });
        let (booking, slot) = match decided {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(
                    retry_after_ms = e.retry_after().unwrap_or_default().as_millis() as u64,
                    "local rate limit refused a call"
                );
                return ResponseFuture::limited(e, self.classifier.clone());
            }
        };
        let inspect = Inspect {
            outcome: true,
            usage: booking.tokens > 0,
            timing: false,
        };
        let ticket = Ticket::new(self.limiter.clone(), key, slot, booking);
        if booking.slot <= now {
            let admitted = ticket.admit();
            let fut = self.inner.call(req);
            ResponseFuture::called(fut, admitted, self.classifier.clone(), inspect)
        } else {
            let at = ticket.ready_at();
            tracing::debug!(
                wait_ms = at.saturating_duration_since(t).as_millis() as u64,
                tokens = booking.tokens,
                "waiting for a rate limit slot"
            );
            // The waiter drives a fresh clone when its slot comes. The ready
            // inner service is dropped, not kept: whatever capacity its
            // `poll_ready` reserved (a concurrency permit, say) must not sit
            // idle while this call waits, or a caller that keeps this
            // service (a retry future does) could starve the very waiters
            // that need it. `self` must be polled ready again, as the
            // `Service` contract says.
            let fresh = self.inner.clone();
            drop(std::mem::replace(&mut self.inner, fresh));
            let svc = self.inner.clone();
            ResponseFuture::waiting(ticket, at, svc, req, self.classifier.clone(), inspect)
        }
    }
}
