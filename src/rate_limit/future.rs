//! The response future of [`RateLimit`](super::RateLimit), and the hook
//! that reconciles tokens and feeds throttles back when a response ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::BoxError;
use crate::body::future::ObserveFuture;
use crate::body::{BodyEnd, EndKind, Inspect, OnEnd};
use crate::classify::{Classify, Outcome, ThrottleCause};
use crate::time;

use super::backend::{Permit, Ticket};
use super::service::inspect_for;

pin_project! {
    /// The response future of [`RateLimit`](super::RateLimit).
    ///
    /// A call that waits (for a backend's round trip, then for its slot)
    /// holds its reservation here; dropping the future before its slot
    /// cancels the reservation (given back when no later call reserved
    /// after it). Once the call goes, this is the shared
    /// [`ObserveFuture`] with a [`Reconcile`] hook.
    pub struct ResponseFuture<F, S, Req, C, T, D>
    where
        T: Ticket,
    {
        #[pin]
        state: State<F, S, Req, C, T, D>,
    }
}

pin_project! {
    struct Wait<S, Req, C, T, D> {
        #[pin]
        sleep: Sleep,
        pending: Option<D>,
        ticket: Option<T>,
        svc: Option<S>,
        req: Option<Req>,
        classifier: Option<C>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req, C, T: Ticket, D> {
        // Boxed: only calls that wait pay for it, and the future every call
        // moves around stays small.
        Waiting {
            wait: Pin<Box<Wait<S, Req, C, T, D>>>,
        },
        Observing {
            #[pin]
            future: ObserveFuture<F, C, Reconcile<T::Permit>, BoxError>,
        },
    }
}

/// The hook and the inspection a permit asks for: none when there is
/// nothing to reconcile and nothing to feed back.
fn hook_for<P: Permit>(permit: P) -> (Option<Reconcile<P>>, Inspect) {
    let inspect = inspect_for(&permit);
    if inspect.outcome || inspect.usage {
        (Some(Reconcile { permit }), inspect)
    } else {
        (None, Inspect::NOTHING)
    }
}

impl<F, S, Req, C, T: Ticket, D> ResponseFuture<F, S, Req, C, T, D> {
    pub(crate) fn called(future: F, permit: T::Permit, classifier: C) -> Self {
        let (hook, inspect) = hook_for(permit);
        Self {
            state: State::Observing {
                future: ObserveFuture::called(future, hook, classifier, inspect),
            },
        }
    }

    /// Waits for a booked ticket (`Ok`) or a backend's decision (`Err`).
    pub(crate) fn waiting(booked: Result<T, D>, svc: S, req: Req, classifier: C) -> Self {
        let (ticket, pending, at) = match booked {
            Ok(t) => {
                let at = t.ready_at();
                (Some(t), None, at)
            }
            Err(d) => (None, Some(d), time::now()),
        };
        Self {
            state: State::Waiting {
                wait: Box::pin(Wait {
                    sleep: tokio::time::sleep_until(at),
                    pending,
                    ticket,
                    svc: Some(svc),
                    req: Some(req),
                    classifier: Some(classifier),
                }),
            },
        }
    }

    pub(crate) fn refused(error: BoxError, classifier: C) -> Self {
        Self {
            state: State::Observing {
                future: ObserveFuture::refused(error, classifier),
            },
        }
    }
}

impl<F, S, Req, C, T: Ticket, D> fmt::Debug for ResponseFuture<F, S, Req, C, T, D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Waiting { wait } if wait.pending.is_some() => "deciding",
            State::Waiting { .. } => "waiting",
            State::Observing { future } if future.has_hook() => "called",
            State::Observing { .. } => "done",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<F, S, Req, C, T, D, Res, E> Future for ResponseFuture<F, S, Req, C, T, D>
where
    F: Future<Output = Result<Res, E>>,
    S: Service<Req, Future = F, Response = Res, Error = E>,
    E: Into<BoxError>,
    C: Classify<Res>,
    T: Ticket,
    D: Future<Output = Result<T, BoxError>> + Unpin,
{
    type Output = Result<C::Observed, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Waiting { wait } => {
                    let w = wait.as_mut().project();
                    let (mut sleep, ticket, svc, req) = (w.sleep, w.ticket, w.svc, w.req);
                    if let Some(d) = w.pending.as_mut() {
                        let decided = ready!(Pin::new(d).poll(cx));
                        *w.pending = None;
                        let t = decided?;
                        let at = t.ready_at();
                        if at > time::now() {
                            tracing::debug!(
                                wait_ms =
                                    at.saturating_duration_since(time::now()).as_millis() as u64,
                                "waiting for a rate limit slot"
                            );
                        }
                        sleep.as_mut().reset(at);
                        *ticket = Some(t);
                    }
                    let t = ticket.as_ref().expect("polled after completion");
                    if sleep.deadline() > time::now() {
                        ready!(sleep.as_mut().poll(cx));
                    }
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
                    let permit = ticket.take().expect("polled after completion").admit();
                    let mut s = svc.take().expect("polled after completion");
                    let future = s.call(req.take().expect("polled after completion"));
                    let classifier = w.classifier.take().expect("polled after completion");
                    let (hook, inspect) = hook_for(permit);
                    this.state.set(State::Observing {
                        future: ObserveFuture::called(future, hook, classifier, inspect),
                    });
                }
                StateProj::Observing { future } => return future.poll(cx),
            }
        }
    }
}

/// Called when an admitted call's response ends: reconciles the token
/// reservation with the real usage, and tells the backend when the
/// upstream throttled the call.
///
/// * usage reported: refund the difference or charge the overrun (native
///   streams report cumulative usage; the last one counts);
/// * no usage, and the upstream refused the call (throttled or a permanent
///   error): nothing was consumed, the reservation is refunded;
/// * an error that a local limit inside made (a local throttle: another
///   limiter, a token budget, a fallback-less pool): the call never left,
///   the reservation is refunded;
/// * otherwise (a stream that failed or was dropped, a success without
///   usage): the estimate stands.
pub struct Reconcile<P> {
    permit: P,
}

impl<P: fmt::Debug> fmt::Debug for Reconcile<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reconcile")
            .field("permit", &self.permit)
            .finish()
    }
}

impl<P: Permit> OnEnd for Reconcile<P> {
    fn on_end(self, end: BodyEnd) {
        let p = self.permit;
        let throttled = match end.outcome {
            Outcome::Throttled { cause, .. } if cause != ThrottleCause::Local => Some(cause),
            _ => None,
        };
        let actual = if p.tokens() == 0 {
            None
        } else {
            match (end.usage, end.kind) {
                (Some(u), _) => Some(u.total()),
                (None, EndKind::Complete)
                    if end.outcome.is_throttled() || end.outcome.is_permanent() =>
                {
                    Some(0)
                }
                (None, EndKind::Failed)
                    if matches!(
                        end.outcome,
                        Outcome::Throttled {
                            cause: ThrottleCause::Local,
                            ..
                        }
                    ) =>
                {
                    Some(0)
                }
                _ => None,
            }
        };
        if throttled.is_some() || actual.is_some() {
            p.finish(throttled, actual);
        }
    }
}
