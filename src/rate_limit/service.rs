use std::fmt;
use std::task::{Context, Poll};
use std::time::Duration;

use tower_service::Service;

use crate::BoxError;
use crate::classify::{Classifier, Classify};
use crate::key::{Global, KeyOf, Keys};
use crate::time;
use crate::util::macros::define_inner_service_accessors;

use super::backend::{Backend, Decision, Permit, Ticket};
use super::fair::{Fifo, PlaceKind, WaitOrder};
use super::future::ResponseFuture;
use super::layer::{CostOf, Estimate, Mode, RateLimitLayer};
use super::limiter::RateLimiter;

/// Limits the calls (and tokens) that reach the inner service. See the
/// [module docs](super) for an example.
///
/// `poll_ready` is the inner service's. A call the backend admits at once
/// goes to the ready inner service. A call that must wait for its slot (or
/// for a backend's round trip) gets a fresh clone of the inner service,
/// which its response future drives (`poll_ready` then `call`) when its
/// slot comes, and the ready inner service is dropped, so no inner capacity
/// (a concurrency permit) is held while waiting.
///
/// # Clone
///
/// Clones share the backend (one budget for all). A clone never inherits a
/// reservation: reservations belong to response futures.
pub struct RateLimit<S, B = RateLimiter, K = Global, C = Classifier, W = Estimate, Q = Fifo> {
    inner: S,
    backend: B,
    keys: K,
    cost: W,
    max_wait: Duration,
    classifier: C,
    order: Q,
}

impl<S: Clone, B: Clone, K: Clone, C: Clone, W: Clone, Q: Clone> Clone
    for RateLimit<S, B, K, C, W, Q>
{
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            backend: self.backend.clone(),
            keys: self.keys.clone(),
            cost: self.cost.clone(),
            max_wait: self.max_wait,
            classifier: self.classifier.clone(),
            order: self.order.clone(),
        }
    }
}

impl<S: fmt::Debug, B: fmt::Debug, K: fmt::Debug, C, W, Q> fmt::Debug
    for RateLimit<S, B, K, C, W, Q>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimit")
            .field("inner", &self.inner)
            .field("backend", &self.backend)
            .field("keys", &self.keys)
            .field("max_wait", &self.max_wait)
            .finish_non_exhaustive()
    }
}

impl<S, B: Clone, K: Keys, C: Clone, W: Clone, Q: Clone> RateLimit<S, B, K, C, W, Q> {
    pub(crate) fn from_layer(inner: S, layer: &RateLimitLayer<B, K, C, W, Q>) -> Self {
        Self {
            inner,
            backend: layer.backend.clone(),
            keys: layer.keys.clone(),
            cost: layer.cost.clone(),
            max_wait: match layer.mode {
                Mode::Wait { max_wait } => max_wait,
                Mode::Reject => Duration::ZERO,
            },
            classifier: layer.classifier.clone(),
            order: layer.order.clone(),
        }
    }
}

impl<S, B, K, C, W, Q> RateLimit<S, B, K, C, W, Q> {
    /// The shared backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    define_inner_service_accessors!();
}

impl<S, B> RateLimit<S, B> {
    /// One limit around `inner`, in wait mode (see [`RateLimitLayer`] for
    /// the other settings).
    pub fn new(inner: S, backend: B) -> Self
    where
        B: Clone,
    {
        RateLimit::from_layer(inner, &RateLimitLayer::new(backend))
    }

    /// A layer; see [`RateLimitLayer::new`].
    pub fn layer(backend: B) -> RateLimitLayer<B> {
        RateLimitLayer::new(backend)
    }
}

impl<S, B, K, C, W, Q, Req> Service<Req> for RateLimit<S, B, K, C, W, Q>
where
    S: Service<Req> + Clone,
    S::Error: Into<BoxError>,
    B: Backend<K::Key>,
    K: KeyOf<Req>,
    K::Key: Send + 'static,
    C: Classify<S::Response>,
    W: CostOf<Req>,
    Q: WaitOrder<Req, K::Key>,
{
    type Response = C::Observed;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S, Req, C, B::Ticket, B::Pending>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let key = self.keys.key_of(&mut req);
        let now = time::call_now();
        // The layers inside, called below in this same `call`, take this
        // reading instead of reading the clock again.
        let _clock = time::CallClock::enter(now);
        // With a later model to fall back to, refuse rather than wait.
        let max_wait = if self.cost.no_wait(&req) {
            Duration::ZERO
        } else {
            self.max_wait
        };
        let hold = match self.order.place(&key, &mut req, max_wait).0 {
            PlaceKind::Free => None,
            PlaceKind::First(hold) => Some(hold),
            PlaceKind::Full(e) => return ResponseFuture::refused(e, self.classifier.clone()),
            PlaceKind::Queued(turn) => {
                // Decides when its turn comes, with what is left of its wait.
                let (backend, cost) = (self.backend.clone(), self.cost.clone());
                let book: super::future::Book<Req, B::Ticket, B::Pending> =
                    Box::new(move |req, max_wait, now| {
                        backend.decide(&key, |tokens| cost.cost_of(req, tokens), max_wait, now)
                    });
                let svc = self.fresh();
                return ResponseFuture::queued(
                    turn,
                    book,
                    max_wait,
                    svc,
                    req,
                    self.classifier.clone(),
                );
            }
        };
        let cost = &self.cost;
        let decision =
            self.backend
                .decide(&key, |tokens| cost.cost_of(&mut req, tokens), max_wait, now);
        let waiting = match decision {
            Decision::Admitted(permit) => {
                let fut = self.inner.call(req);
                return ResponseFuture::called(fut, permit, self.classifier.clone());
            }
            Decision::Refused(e) => return ResponseFuture::refused(e, self.classifier.clone()),
            Decision::Booked(ticket) => {
                tracing::debug!(
                    wait_ms = ticket.ready_at().saturating_duration_since(now).as_millis() as u64,
                    "waiting for a rate limit slot"
                );
                Ok(ticket)
            }
            Decision::Pending(pending) => Err(pending),
        };
        // A call that waits holds the turn of its key's fair queue, if any:
        // later calls queue behind it.
        let turn = hold.map(|h| h.take(waiting.as_ref().ok().map(|t| t.ready_at())));
        let svc = self.fresh();
        ResponseFuture::waiting(waiting, svc, req, self.classifier.clone(), turn)
    }
}

impl<S: Clone, B, K, C, W, Q> RateLimit<S, B, K, C, W, Q> {
    /// The service a waiter drives when its slot comes: a fresh clone. The
    /// ready inner service is dropped, not kept: whatever capacity its
    /// `poll_ready` reserved (a concurrency permit, say) must not sit idle
    /// while this call waits, or a caller that keeps this service (a retry
    /// future does) could starve the very waiters that need it. `self` must
    /// be polled ready again, as the `Service` contract says.
    fn fresh(&mut self) -> S {
        let fresh = self.inner.clone();
        drop(std::mem::replace(&mut self.inner, fresh));
        self.inner.clone()
    }
}

/// What the layer asks the response body to report, from a permit.
pub(crate) fn inspect_for<P: Permit>(permit: &P) -> crate::body::Inspect {
    let usage = permit.tokens() > 0;
    crate::body::Inspect {
        outcome: usage || permit.wants_feedback(),
        usage,
        timing: false,
        answer: false,
    }
}
