//! The response future of [`RateLimit`](super::RateLimit), and the hook
//! that reconciles tokens and feeds throttles back when a response ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use crate::BoxError;
use crate::body::future::ObserveFuture;
use crate::body::{BodyEnd, EndKind, Inspect, OnEnd};
use crate::classify::{Classify, Outcome, ThrottleCause};
use crate::time::{self, Instant};

use super::backend::{Decision, Permit, Ticket};
use super::fair::{Turn, WaitTurn};
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

/// How a queued call decides when its turn comes: the backend's
/// `decide` for its key and cost, given the request, what is left of its
/// wait, and now.
pub(crate) type Book<Req, T, D> =
    Box<dyn FnOnce(&mut Req, Duration, Instant) -> Decision<T, D> + Send>;

pin_project! {
    // Fields drop in order: a booked slot is given back before the turn
    // passes on, so the next call can take it.
    struct Wait<S, Req, C, T, D>
    where
        T: Ticket,
    {
        // The slot's instant; while queued, the end of the wait.
        #[pin]
        sleep: Sleep,
        queued: Option<WaitTurn>,
        book: Option<Book<Req, T, D>>,
        max_wait: Duration,
        pending: Option<D>,
        ticket: Option<T>,
        permit: Option<T::Permit>,
        svc: Option<S>,
        req: Option<Req>,
        classifier: Option<C>,
        turn: Option<Turn>,
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

    /// Waits for a booked ticket (`Ok`) or a backend's decision (`Err`),
    /// holding the turn of its key's fair queue, if any.
    pub(crate) fn waiting(
        booked: Result<T, D>,
        svc: S,
        req: Req,
        classifier: C,
        turn: Option<Turn>,
    ) -> Self {
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
                    queued: None,
                    book: None,
                    max_wait: Duration::ZERO,
                    pending,
                    ticket,
                    permit: None,
                    svc: Some(svc),
                    req: Some(req),
                    classifier: Some(classifier),
                    turn,
                }),
            },
        }
    }

    /// Waits in a fair queue for its turn (until `deadline`), then decides
    /// with `book`.
    pub(crate) fn queued(
        queued: WaitTurn,
        book: Book<Req, T, D>,
        max_wait: Duration,
        svc: S,
        req: Req,
        classifier: C,
    ) -> Self {
        let now = time::now();
        let deadline = now
            .checked_add(max_wait)
            .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365));
        Self {
            state: State::Waiting {
                wait: Box::pin(Wait {
                    sleep: tokio::time::sleep_until(deadline),
                    queued: Some(queued),
                    book: Some(book),
                    max_wait,
                    pending: None,
                    ticket: None,
                    permit: None,
                    svc: Some(svc),
                    req: Some(req),
                    classifier: Some(classifier),
                    turn: None,
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
            State::Waiting { wait } if wait.queued.is_some() => "queued",
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
                    let (mut sleep, ticket, permit, svc, req) =
                        (w.sleep, w.ticket, w.permit, w.svc, w.req);
                    if let Some(q) = w.queued.as_mut() {
                        let Poll::Ready(turn) = q.poll_turn(cx) else {
                            // Still queued: until its wait runs out.
                            ready!(sleep.as_mut().poll(cx));
                            let e = q.expired(*w.max_wait);
                            *w.queued = None;
                            return Poll::Ready(Err(e));
                        };
                        *w.queued = None;
                        *w.turn = Some(turn);
                        let book = w.book.take().expect("polled after completion");
                        let now = time::now();
                        let left = sleep.deadline().saturating_duration_since(now);
                        let r = req.as_mut().expect("polled after completion");
                        match book(r, left, now) {
                            Decision::Admitted(p) => {
                                *permit = Some(p);
                                sleep.as_mut().reset(now);
                            }
                            Decision::Booked(t) => {
                                if let Some(turn) = w.turn.as_ref() {
                                    turn.booked(t.ready_at());
                                }
                                sleep.as_mut().reset(t.ready_at());
                                *ticket = Some(t);
                            }
                            Decision::Pending(d) => *w.pending = Some(d),
                            Decision::Refused(e) => {
                                w.turn.take();
                                return Poll::Ready(Err(e));
                            }
                        }
                    }
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
                        if let Some(turn) = w.turn.as_ref() {
                            turn.booked(at);
                        }
                        sleep.as_mut().reset(at);
                        *ticket = Some(t);
                    }
                    if let Some(t) = ticket.as_ref() {
                        if sleep.deadline() > time::now() {
                            ready!(sleep.as_mut().poll(cx));
                        }
                        // An upstream throttle may have paused the key meanwhile.
                        let at = t.ready_at();
                        if at > sleep.deadline() {
                            sleep.as_mut().reset(at);
                            continue;
                        }
                    }
                    let s = svc.as_mut().expect("polled after completion");
                    if let Err(e) = ready!(s.poll_ready(cx)) {
                        // The call never went: dropping the ticket cancels it,
                        // then the turn passes on.
                        ticket.take();
                        permit.take();
                        w.turn.take();
                        return Poll::Ready(Err(e.into()));
                    }
                    let permit = match permit.take() {
                        Some(p) => p,
                        None => ticket.take().expect("polled after completion").admit(),
                    };
                    // Admitted: the next waiter of the key may decide.
                    w.turn.take();
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
