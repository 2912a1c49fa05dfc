//! The response future of [`RateLimit`](super::RateLimit), and the hook
//! that reconciles tokens and feeds throttles back when a response ends.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::BoxError;
use crate::body::{BodyEnd, EndKind, Inspect, OnEnd};
use crate::classify::{Classify, Outcome};
use crate::time::Instant;

use super::error::RateLimited;
use super::limiter::{Admitted, Ticket};

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    ///
    /// A call that must wait holds its reservation here; dropping the
    /// future before its slot cancels the reservation (given back when no
    /// later call reserved after it). Once the inner service answers, the
    /// response is wrapped by the classifier with a [`Reconcile`] hook.
    pub struct ResponseFuture<F, S, Req, C, K>
    where
        K: Hash,
        K: Eq,
        K: Clone,
        K: Send,
        K: Sync,
        K: 'static,
    {
        #[pin]
        state: State<F, S, Req, K>,
        admitted: Option<Admitted<K>>,
        classifier: C,
        inspect: Inspect,
    }
}

pin_project! {
    struct Wait<S, Req, K>
    where
        K: Hash,
        K: Eq,
        K: Clone,
        K: Send,
        K: Sync,
        K: 'static,
    {
        #[pin]
        sleep: Sleep,
        ticket: Option<Ticket<K>>,
        svc: Option<S>,
        req: Option<Req>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req, K>
    where
        K: Hash,
        K: Eq,
        K: Clone,
        K: Send,
        K: Sync,
        K: 'static,
    {
        // Boxed: only calls that wait pay for it, and the future every call
        // moves around stays small.
        Waiting {
            wait: Pin<Box<Wait<S, Req, K>>>,
        },
        Called {
            #[pin]
            future: F,
        },
        Limited {
            error: Option<RateLimited>,
        },
    }
}

impl<F, S, Req, C, K> ResponseFuture<F, S, Req, C, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub(crate) fn called(
        future: F,
        admitted: Admitted<K>,
        classifier: C,
        inspect: Inspect,
    ) -> Self {
        Self {
            state: State::Called { future },
            admitted: Some(admitted),
            classifier,
            inspect,
        }
    }

    pub(crate) fn waiting(
        ticket: Ticket<K>,
        at: Instant,
        svc: S,
        req: Req,
        classifier: C,
        inspect: Inspect,
    ) -> Self {
        Self {
            state: State::Waiting {
                wait: Box::pin(Wait {
                    sleep: tokio::time::sleep_until(at),
                    ticket: Some(ticket),
                    svc: Some(svc),
                    req: Some(req),
                }),
            },
            admitted: None,
            classifier,
            inspect,
        }
    }

    pub(crate) fn limited(error: RateLimited, classifier: C) -> Self {
        Self {
            state: State::Limited { error: Some(error) },
            admitted: None,
            classifier,
            inspect: Inspect::NOTHING,
        }
    }
}

impl<F, S, Req, C, K> fmt::Debug for ResponseFuture<F, S, Req, C, K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { .. } => "waiting",
            State::Called { .. } => "called",
            State::Limited { .. } => "limited",
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
                StateProj::Waiting { wait } => {
                    let w = wait.as_mut().project();
                    let (mut sleep, ticket, svc, req) = (w.sleep, w.ticket, w.svc, w.req);
                    ready!(sleep.as_mut().poll(cx));
                    let t = ticket.as_ref().expect("polled after completion");
                    // An upstream throttle may have paused the key meanwhile.
                    let at = t.ready_at();
                    if at > sleep.deadline() {
                        sleep.as_mut().reset(at);
                        continue;
                    }
                    let s = svc.as_mut().expect("polled after completion");
                    if let Err(e) = ready!(s.poll_ready(cx)) {
                        // The call never went: dropping the ticket cancels it.
                        ticket.take();
                        return Poll::Ready(Err(e.into()));
                    }
                    let admitted = ticket.take().expect("polled after completion").admit();
                    let mut s = svc.take().expect("polled after completion");
                    let future = s.call(req.take().expect("polled after completion"));
                    *this.admitted = Some(admitted);
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    return match ready!(future.poll(cx)) {
                        Ok(res) => {
                            let hook = Reconcile {
                                admitted: this.admitted.take(),
                            };
                            Poll::Ready(Ok(this.classifier.observe(res, *this.inspect, hook)))
                        }
                        Err(e) => {
                            let e: BoxError = e.into();
                            if let Some(a) = this.admitted.take()
                                && let Outcome::Throttled { cause, .. } =
                                    this.classifier.classify_error(&e)
                            {
                                a.throttled(cause);
                            }
                            Poll::Ready(Err(e))
                        }
                    };
                }
                StateProj::Limited { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion").into()));
                }
            }
        }
    }
}

/// Called when an admitted call's response ends: reconciles the token
/// reservation with the real usage, and tightens the key when the upstream
/// throttled the call.
///
/// * usage reported: refund the difference or charge the overrun (native
///   streams report cumulative usage; the last one counts);
/// * no usage, and the upstream refused the call (throttled or a permanent
///   error): nothing was consumed, the reservation is refunded;
/// * otherwise (a stream that failed or was dropped, a success without
///   usage): the estimate stands.
pub struct Reconcile<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    admitted: Option<Admitted<K>>,
}

impl<K> fmt::Debug for Reconcile<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconcile")
            .field("admitted", &self.admitted)
            .finish()
    }
}

impl<K> OnEnd for Reconcile<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn on_end(self, end: BodyEnd) {
        let Some(a) = self.admitted else { return };
        if let Outcome::Throttled { cause, .. } = end.outcome {
            a.throttled(cause);
        }
        let actual = match (end.usage, end.kind) {
            (Some(u), _) => Some(u.total()),
            (None, EndKind::Complete)
                if end.outcome.is_throttled() || end.outcome.is_permanent() =>
            {
                Some(0)
            }
            _ => None,
        };
        a.reconcile(actual);
    }
}
