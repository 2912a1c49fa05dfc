//! The response future of [`RedisRateLimit`](super::RedisRateLimit), and
//! the hook that reconciles tokens and feeds throttles back when a response
//! ends.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;
use crate::body::{BodyEnd, EndKind, Inspect, OnEnd};
use crate::classify::{Classify, Outcome};

use super::limiter::Admission;

/// The decision in flight: Redis (or the failure policy), then the wait
/// for the slot.
pub(crate) type Decision<K> = Pin<Box<dyn Future<Output = Result<Admission<K>, BoxError>> + Send>>;

pin_project! {
    /// The response future of [`RedisRateLimit`](super::RedisRateLimit).
    ///
    /// While the decision is in flight or the call waits for its slot,
    /// dropping the future cancels the reservation (given back in Redis
    /// when no later call was booked after it). Once the inner service
    /// answers, the response is wrapped by the classifier with a
    /// [`Reconcile`] hook.
    pub struct ResponseFuture<F, S, Req, C, K>
    where
        K: Hash, K: Eq, K: Clone, K: Send, K: Sync, K: 'static,
    {
        #[pin]
        state: State<F, S, Req, K>,
        admission: Option<Admission<K>>,
        tokens: u32,
        classifier: C,
        inspect: Inspect,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req, K>
    where
        K: Hash, K: Eq, K: Clone, K: Send, K: Sync, K: 'static,
    {
        Admitting {
            decision: Option<Decision<K>>,
            svc: Option<S>,
            req: Option<Req>,
        },
        Called {
            #[pin]
            future: F,
        },
    }
}

impl<F, S, Req, C, K> ResponseFuture<F, S, Req, C, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub(crate) fn called(
        future: F,
        admission: Admission<K>,
        tokens: u32,
        classifier: C,
        inspect: Inspect,
    ) -> Self {
        Self {
            state: State::Called { future },
            admission: Some(admission),
            tokens,
            classifier,
            inspect,
        }
    }

    pub(crate) fn admitting(
        decision: Decision<K>,
        svc: S,
        req: Req,
        tokens: u32,
        classifier: C,
        inspect: Inspect,
    ) -> Self {
        Self {
            state: State::Admitting {
                decision: Some(decision),
                svc: Some(svc),
                req: Some(req),
            },
            admission: None,
            tokens,
            classifier,
            inspect,
        }
    }
}

impl<F, S, Req, C, K> fmt::Debug for ResponseFuture<F, S, Req, C, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Admitting {
                decision: Some(_), ..
            } => "deciding",
            State::Admitting { .. } => "admitted",
            State::Called { .. } => "called",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<F, S, Req, C, K, Res, E> Future for ResponseFuture<F, S, Req, C, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    F: Future<Output = Result<Res, E>>,
    S: Service<Req, Future = F, Response = Res, Error = E>,
    E: Into<BoxError>,
    C: Classify<Res>,
{
    type Output = Result<C::Observed<Reconcile<K>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Admitting { decision, svc, req } => {
                    if let Some(d) = decision.as_mut() {
                        let admission = ready!(d.as_mut().poll(cx));
                        *decision = None;
                        *this.admission = Some(admission?);
                    }
                    let s = svc.as_mut().expect("polled after completion");
                    if let Err(e) = ready!(s.poll_ready(cx)) {
                        // The call never went; the admission is dropped (the
                        // estimate stands: capacity lost, never a burst).
                        this.admission.take();
                        return Poll::Ready(Err(e.into()));
                    }
                    let mut s = svc.take().expect("polled after completion");
                    let future = s.call(req.take().expect("polled after completion"));
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    return match ready!(future.poll(cx)) {
                        Ok(res) => {
                            let hook = Reconcile {
                                admission: this.admission.take(),
                                tokens: *this.tokens,
                            };
                            Poll::Ready(Ok(this.classifier.observe(res, *this.inspect, hook)))
                        }
                        Err(e) => {
                            let e: BoxError = e.into();
                            if let Some(a) = this.admission.take()
                                && let Outcome::Throttled { cause, .. } =
                                    this.classifier.classify_error(&e)
                            {
                                a.finish(Some(cause), None);
                            }
                            Poll::Ready(Err(e))
                        }
                    };
                }
            }
        }
    }
}

/// Called when an admitted call's response ends: reconciles the token
/// reservation with the real usage, and pauses the key in Redis when the
/// upstream throttled the call. The same rules as the in-memory
/// [`Reconcile`](crate::rate_limit::future::Reconcile); the Redis calls run
/// in the background (see
/// [`RedisLimiter::settle`](super::RedisLimiter::settle)).
pub struct Reconcile<K = ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    admission: Option<Admission<K>>,
    tokens: u32,
}

impl<K> fmt::Debug for Reconcile<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static + fmt::Debug,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconcile")
            .field("admission", &self.admission)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> OnEnd for Reconcile<K> {
    fn on_end(self, end: BodyEnd) {
        let Some(a) = self.admission else { return };
        let throttled = match end.outcome {
            Outcome::Throttled { cause, .. } => Some(cause),
            _ => None,
        };
        let actual = if self.tokens == 0 {
            None
        } else {
            match (end.usage, end.kind) {
                (Some(u), _) => Some(u.total()),
                (None, EndKind::Complete)
                    if end.outcome.is_throttled() || end.outcome.is_permanent() =>
                {
                    Some(0)
                }
                _ => None,
            }
        };
        if throttled.is_some() || actual.is_some() {
            a.finish(throttled, actual);
        }
    }
}
