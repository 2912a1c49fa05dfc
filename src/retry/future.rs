//! The response future of [`Retry`](super::Retry).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http::request::Parts;
use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::time::Sleep;
use tower_service::Service;

use super::body::{BufferFuture, ReplayBody};
use super::layer::{Counter, Shared};
use super::peek::{Peek, PeekBody, Peeked};
use crate::classify::{Classifier, Classify, Early, Outcome};
use crate::time::{self, Deadline};

pin_project! {
    /// Response future of [`Retry`](super::Retry): attempts, peeks at each
    /// answer, waits, and tries again until the answer is final.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<S, B, ResB, C = Classifier>
    where
        S: Service<Request<B>>,
        ResB: http_body::Body,
    {
        #[pin]
        state: State<S::Future, B, ResB>,
        service: S,
        template: Option<(Parts, B)>,
        shared: Arc<Shared<C>>,
        retries: u32,
        deadline: Option<Deadline>,
        handoff: Handoff,
        // The span of a retry (none on the first attempt: boxed, so that
        // the first attempt's future does not carry it).
        span: Option<Box<tracing::Span>>,
    }
}

/// What the request says about a fallback outside (issue 14): a local
/// refusal it takes is handed back at once, not retried.
#[cfg(feature = "fallback")]
pub(crate) type Handoff = Option<crate::fallback::FallbackAvailable>;
#[cfg(not(feature = "fallback"))]
pub(crate) type Handoff = ();

/// The request's [`Handoff`].
#[cfg_attr(not(feature = "fallback"), allow(unused_variables))]
pub(crate) fn handoff_of<B>(req: &Request<B>) -> Handoff {
    #[cfg(feature = "fallback")]
    return req
        .extensions()
        .get::<crate::fallback::FallbackAvailable>()
        .copied();
}

/// Whether a fallback outside takes this failed attempt at once.
#[cfg_attr(not(feature = "fallback"), allow(unused_variables))]
fn handed_off<E: 'static>(handoff: &Handoff, outcome: &Outcome, err: &E) -> bool {
    #[cfg(feature = "fallback")]
    return handoff.is_some_and(|h| h.takes(outcome, err));
    #[cfg(not(feature = "fallback"))]
    false
}

pin_project! {
    // The states off the happy path box what they hold, so that the future
    // every request moves around stays small.
    #[project = StateProj]
    enum State<F, B, ResB: http_body::Body> {
        // Reading a streamed request body into memory before the first
        // attempt.
        Buffering { buffering: BufferFuture<B>, parts: Option<Box<Parts>> },
        // Waiting for the service to be ready to send `req`.
        Ready { req: Option<Box<Request<B>>> },
        Calling { #[pin] future: F },
        Peeking { peek: Peek<ResB> },
        Waiting { sleep: Pin<Box<Sleep>>, req: Option<Box<Request<B>>> },
        Done,
    }
}

impl<S, B, ResB, C> ResponseFuture<S, B, ResB, C>
where
    S: Service<Request<B>>,
    ResB: http_body::Body,
{
    pub(crate) fn calling(
        service: S,
        template: Option<(Parts, B)>,
        future: S::Future,
        shared: Arc<Shared<C>>,
        deadline: Option<Deadline>,
        handoff: Handoff,
    ) -> Self {
        Self {
            state: State::Calling { future },
            service,
            template,
            shared,
            retries: 0,
            deadline,
            handoff,
            span: None,
        }
    }

    pub(crate) fn buffering(
        service: S,
        parts: Parts,
        buffering: BufferFuture<B>,
        shared: Arc<Shared<C>>,
        deadline: Option<Deadline>,
        handoff: Handoff,
    ) -> Self {
        Self {
            state: State::Buffering {
                buffering,
                parts: Some(Box::new(parts)),
            },
            service,
            template: None,
            shared,
            retries: 0,
            deadline,
            handoff,
            span: None,
        }
    }
}

/// Why a retryable failure is handed back.
#[derive(Clone, Copy, Debug)]
enum GiveUp {
    NotRetryable,
    Exhausted,
    NotReplayable,
    Deadline,
    Budget,
    Fallback,
}

impl GiveUp {
    fn as_str(self) -> &'static str {
        match self {
            GiveUp::NotRetryable => "not retryable",
            GiveUp::Exhausted => "all attempts used",
            GiveUp::NotReplayable => "request body cannot be replayed",
            GiveUp::Deadline => "the wait would end past the deadline",
            GiveUp::Budget => "retry budget exhausted",
            GiveUp::Fallback => "refused locally: the next model takes it",
        }
    }
}

fn decide<B: ReplayBody, C>(
    shared: &Shared<C>,
    template: &Option<(Parts, B)>,
    retries: u32,
    deadline: Option<Deadline>,
    outcome: &Outcome,
) -> Result<(Duration, Request<B>), GiveUp> {
    let config = &shared.config;
    if !config.policy.retries(outcome) {
        return Err(GiveUp::NotRetryable);
    }
    if retries >= config.policy.get_max_retries() {
        shared.stats.bump(Counter::Exhausted);
        return Err(GiveUp::Exhausted);
    }
    let Some((parts, body)) = template else {
        shared.stats.bump(Counter::NotReplayable);
        return Err(GiveUp::NotReplayable);
    };
    let n = retries + 1;
    let wait = shared.jitter_source(|rng| config.backoff.wait(n, outcome, rng));
    let now = time::now();
    if let Some(Deadline(at)) = deadline
        && now.checked_add(wait).is_none_or(|end| end >= at)
    {
        shared.stats.bump(Counter::Deadline);
        return Err(GiveUp::Deadline);
    }
    let Some(copy) = body.try_clone() else {
        shared.stats.bump(Counter::NotReplayable);
        return Err(GiveUp::NotReplayable);
    };
    if let Some(budget) = &shared.budget
        && !budget.withdraw(now)
    {
        shared.stats.bump(Counter::BudgetDenied);
        return Err(GiveUp::Budget);
    }
    shared.stats.bump(Counter::Retries);
    Ok((wait, Request::from_parts(parts.clone(), copy)))
}

impl<S, B, ResB, C> Future for ResponseFuture<S, B, ResB, C>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: fmt::Display + 'static,
    C: Classify<Response<ResB>>,
    B: ReplayBody,
    ResB: http_body::Body + Unpin + 'static,
    ResB::Data: 'static,
    ResB::Error: 'static,
{
    type Output = Result<Response<PeekBody<ResB>>, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            let outcome = match this.state.as_mut().project() {
                StateProj::Buffering { buffering, parts } => {
                    let buffered = ready!(buffering.as_mut().poll(cx));
                    let parts = *parts.take().expect("buffering completes once");
                    if buffered.replayable {
                        if let Some(copy) = buffered.body.try_clone() {
                            *this.template = Some((parts.clone(), copy));
                        }
                    } else {
                        this.shared.stats.bump(Counter::SentOnce);
                        tracing::debug!(
                            target: "tower_qwen::retry",
                            limit = this.shared.config.buffer_limit,
                            "streamed request body exceeds the buffer limit: sending it once, without retries"
                        );
                    }
                    let req = Request::from_parts(parts, buffered.body);
                    this.state.set(State::Ready {
                        req: Some(Box::new(req)),
                    });
                    continue;
                }
                StateProj::Ready { req } => {
                    if let Err(e) = ready!(this.service.poll_ready(cx)) {
                        this.state.set(State::Done);
                        return Poll::Ready(Err(e));
                    }
                    let req = *req.take().expect("a request is ready to send");
                    if *this.retries > 0 {
                        this.shared.stats.bump(Counter::RetryAttempts);
                    }
                    let future = {
                        let _enter = this.span.as_ref().map(|s| s.enter());
                        this.service.call(req)
                    };
                    this.state.set(State::Calling { future });
                    continue;
                }
                StateProj::Calling { future } => {
                    let result = {
                        let _enter = this.span.as_ref().map(|s| s.enter());
                        ready!(future.poll(cx))
                    };
                    // The budget is credited when a first attempt's answer
                    // arrives, not when the call is made: a call may wait
                    // long in a rate limiter inside, and a deposit made on
                    // arrival would have expired by the time its failure
                    // needs a retry.
                    if *this.retries == 0
                        && let Some(budget) = &this.shared.budget
                    {
                        budget.deposit(time::now());
                    }
                    match result {
                        Ok(res) => {
                            let config = &this.shared.config;
                            let early = config.classifier.early(&res);
                            let can_retry = this.template.is_some()
                                && *this.retries < config.policy.get_max_retries();
                            if !can_retry {
                                // Nothing left to decide: hand the answer on
                                // unread. Its head still tells the counters
                                // whether a retry was wanted.
                                let head = match early {
                                    Early::Known(outcome) => outcome,
                                    Early::Peek(c) => c.classify_head(res.status(), res.headers()),
                                };
                                if !head.is_success() && config.policy.retries(&head) {
                                    let why = if *this.retries >= config.policy.get_max_retries() {
                                        this.shared.stats.bump(Counter::Exhausted);
                                        GiveUp::Exhausted
                                    } else {
                                        this.shared.stats.bump(Counter::NotReplayable);
                                        GiveUp::NotReplayable
                                    };
                                    trace_give_up(*this.retries, &head, why);
                                }
                                this.state.set(State::Done);
                                return Poll::Ready(Ok(res.map(PeekBody::new)));
                            }
                            match early {
                                Early::Peek(c) => {
                                    let peek = Peek::with_hold(res, &c, config.hold);
                                    this.state.set(State::Peeking { peek });
                                    continue;
                                }
                                // Known from the response itself: nothing to
                                // read ahead of the caller.
                                Early::Known(outcome) => {
                                    let peeked = Peeked {
                                        outcome,
                                        response: res.map(PeekBody::new),
                                    };
                                    match settle(
                                        this.shared,
                                        this.template,
                                        *this.retries,
                                        *this.deadline,
                                        peeked,
                                    ) {
                                        Next::Retry(wait, req) => (wait, req),
                                        Next::Answer(done) => {
                                            this.state.set(State::Done);
                                            return Poll::Ready(Ok(done));
                                        }
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            let outcome = this.shared.config.classifier.classify_error(&e);
                            if handed_off(this.handoff, &outcome, &e) {
                                trace_give_up(*this.retries, &outcome, GiveUp::Fallback);
                                this.state.set(State::Done);
                                return Poll::Ready(Err(e));
                            }
                            match decide(
                                this.shared,
                                this.template,
                                *this.retries,
                                *this.deadline,
                                &outcome,
                            ) {
                                Ok((wait, req)) => {
                                    trace_retry(*this.retries, &outcome, wait);
                                    (wait, req)
                                }
                                Err(why) => {
                                    trace_give_up(*this.retries, &outcome, why);
                                    this.state.set(State::Done);
                                    return Poll::Ready(Err(e));
                                }
                            }
                        }
                    }
                }
                StateProj::Peeking { peek } => {
                    let peeked = ready!(Pin::new(peek).poll(cx));
                    match settle(
                        this.shared,
                        this.template,
                        *this.retries,
                        *this.deadline,
                        peeked,
                    ) {
                        Next::Retry(wait, req) => (wait, req),
                        Next::Answer(done) => {
                            this.state.set(State::Done);
                            return Poll::Ready(Ok(done));
                        }
                    }
                }
                StateProj::Waiting { sleep, req } => {
                    ready!(sleep.as_mut().poll(cx));
                    let req = req.take();
                    *this.retries += 1;
                    *this.span = Some(Box::new(tracing::debug_span!(
                        target: "tower_qwen::retry",
                        "retry",
                        attempt = *this.retries + 1
                    )));
                    this.state.set(State::Ready { req });
                    continue;
                }
                StateProj::Done => panic!("retry ResponseFuture polled after completion"),
            };
            let (wait, req) = outcome;
            let sleep = Box::pin(tokio::time::sleep_until(time::now() + wait));
            this.state.set(State::Waiting {
                sleep,
                req: Some(Box::new(req)),
            });
        }
    }
}

/// What follows a classified answer.
// Both variants are large (a request, a response); it lives only between
// the decision and the next state.
#[allow(clippy::large_enum_variant)]
enum Next<B, R> {
    /// A retry, after this wait.
    Retry(Duration, Request<B>),
    /// The answer, handed on.
    Answer(R),
}

/// What follows a classified answer: a retry, or the answer handed on.
fn settle<B: ReplayBody, C, ResB: http_body::Body>(
    shared: &Shared<C>,
    template: &Option<(Parts, B)>,
    retries: u32,
    deadline: Option<Deadline>,
    peeked: Peeked<ResB>,
) -> Next<B, Response<PeekBody<ResB>>> {
    let outcome = peeked.outcome;
    if outcome.is_success() {
        return Next::Answer(peeked.response);
    }
    match decide(shared, template, retries, deadline, &outcome) {
        Ok((wait, req)) => {
            trace_retry(retries, &outcome, wait);
            // The failed answer (and its connection) is released before the
            // wait.
            drop(peeked);
            Next::Retry(wait, req)
        }
        Err(why) => {
            trace_give_up(retries, &outcome, why);
            Next::Answer(peeked.response)
        }
    }
}

fn trace_retry(retries: u32, outcome: &Outcome, wait: Duration) {
    tracing::debug!(
        target: "tower_qwen::retry",
        attempt = retries + 1,
        outcome = %outcome,
        wait_ms = wait.as_millis() as u64,
        "attempt failed; retrying after a wait"
    );
}

fn trace_give_up(retries: u32, outcome: &Outcome, why: GiveUp) {
    if matches!(why, GiveUp::NotRetryable) {
        tracing::trace!(
            target: "tower_qwen::retry",
            attempt = retries + 1,
            outcome = %outcome,
            "final answer"
        );
    } else {
        tracing::debug!(
            target: "tower_qwen::retry",
            attempt = retries + 1,
            outcome = %outcome,
            reason = why.as_str(),
            "attempt failed; not retrying"
        );
    }
}

impl<S, B, ResB, C> fmt::Debug for ResponseFuture<S, B, ResB, C>
where
    S: Service<Request<B>>,
    ResB: http_body::Body,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("retries", &self.retries)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
