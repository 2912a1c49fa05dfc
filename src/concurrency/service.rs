use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::Sleep;
use tower_service::Service;

use crate::BoxError;
use crate::classify::{Classifier, Classify};
use crate::time::{self, Instant};
use crate::util::macros::define_inner_service_accessors;

use super::body::Release;
use super::error::Overloaded;
use super::future::ResponseFuture;
use super::layer::ConcurrencyLimitLayer;
use super::semaphore::Acquire;
use super::shared::{LimitHandle, Permit, Shared};

/// Limits the calls in flight to the inner service; a call counts from
/// `poll_ready` until its response (body) ends or is dropped.
///
/// See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share the limit (and the wait queue) but never a permit: a clone
/// starts without one, and must be polled ready itself.
pub struct ConcurrencyLimit<S, C = Classifier> {
    inner: S,
    shared: Arc<Shared>,
    classifier: C,
    max_wait: Option<Duration>,
    max_waiting: u32,
    state: State,
    sleep: Option<Pin<Box<Sleep>>>,
}

enum State {
    Idle,
    Waiting { ticket: Ticket, since: Instant },
    Ready(Permit),
    Shed(Overloaded),
}

/// A place in the wait queue; leaves it (or gives back a permit granted
/// meanwhile) when dropped.
struct Ticket {
    shared: Arc<Shared>,
    id: u64,
    done: bool,
}

impl Ticket {
    /// Leaves the queue; `Some(permit)` if one was granted meanwhile.
    fn cancel(mut self) -> Option<Permit> {
        self.done = true;
        if self.shared.sem.cancel(self.id) {
            Some(Permit::taken(self.shared.clone()))
        } else {
            None
        }
    }

    fn granted(mut self) -> Permit {
        self.done = true;
        Permit::taken(self.shared.clone())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done && self.shared.sem.cancel(self.id) {
            self.shared.sem.release();
        }
    }
}

impl<S> ConcurrencyLimit<S> {
    /// A fixed limit of `limit` calls in flight around `inner`, with the
    /// [`Classifier`] and the layer's defaults.
    pub fn new(inner: S, limit: NonZeroUsize) -> Self {
        use tower_layer::Layer;
        ConcurrencyLimitLayer::new(limit).layer(inner)
    }

    /// A fixed-limit layer; see [`ConcurrencyLimitLayer::new`].
    pub fn layer(limit: NonZeroUsize) -> ConcurrencyLimitLayer {
        ConcurrencyLimitLayer::new(limit)
    }
}

impl<S, C> ConcurrencyLimit<S, C> {
    pub(crate) fn from_parts(
        inner: S,
        shared: Arc<Shared>,
        classifier: C,
        max_wait: Option<Duration>,
        max_waiting: u32,
    ) -> Self {
        Self {
            inner,
            shared,
            classifier,
            max_wait,
            max_waiting,
            state: State::Idle,
            sleep: None,
        }
    }

    /// A handle that reads the limit, the calls in flight and the waiters.
    pub fn handle(&self) -> LimitHandle {
        LimitHandle {
            shared: self.shared.clone(),
        }
    }

    define_inner_service_accessors!();

    fn start_wait(&mut self, id: u64) {
        let since = time::now();
        if let Some(max) = self.max_wait {
            let deadline = since + max;
            match &mut self.sleep {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
        }
        tracing::trace!(
            waiting = self.shared.sem.waiting(),
            "waiting for a concurrency permit"
        );
        self.state = State::Waiting {
            ticket: Ticket {
                shared: self.shared.clone(),
                id,
                done: false,
            },
            since,
        };
    }
}

impl<S, C, Req> Service<Req> for ConcurrencyLimit<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
{
    type Response = C::Observed;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        loop {
            match &mut self.state {
                State::Ready(_) => return self.inner.poll_ready(cx).map_err(Into::into),
                State::Shed(_) => return Poll::Ready(Ok(())),
                State::Idle => {
                    if self.shared.sem.try_acquire() {
                        self.state = State::Ready(Permit::taken(self.shared.clone()));
                        continue;
                    }
                    match self
                        .shared
                        .sem
                        .acquire_or_enqueue(cx.waker(), self.max_waiting)
                    {
                        Acquire::Acquired => {
                            self.state = State::Ready(Permit::taken(self.shared.clone()));
                        }
                        Acquire::Full => {
                            tracing::debug!(
                                waiting = self.shared.sem.waiting(),
                                "concurrency wait queue full: shedding the call"
                            );
                            self.state = State::Shed(Overloaded::queue_full());
                        }
                        Acquire::Queued(id) => self.start_wait(id),
                    }
                }
                State::Waiting { ticket, since } => {
                    if self.shared.sem.poll_waiter(ticket.id, cx.waker()) {
                        let State::Waiting { ticket, since } =
                            std::mem::replace(&mut self.state, State::Idle)
                        else {
                            unreachable!()
                        };
                        tracing::trace!(waited = ?time::now().saturating_duration_since(since), "got a concurrency permit");
                        self.state = State::Ready(ticket.granted());
                        continue;
                    }
                    let since = *since;
                    let timed_out = match (&mut self.sleep, self.max_wait) {
                        (Some(sleep), Some(_)) => sleep.as_mut().poll(cx).is_ready(),
                        _ => false,
                    };
                    if !timed_out {
                        return Poll::Pending;
                    }
                    let State::Waiting { ticket, .. } =
                        std::mem::replace(&mut self.state, State::Idle)
                    else {
                        unreachable!()
                    };
                    self.state = match ticket.cancel() {
                        Some(permit) => State::Ready(permit),
                        None => {
                            let waited = time::now().saturating_duration_since(since);
                            tracing::debug!(
                                ?waited,
                                "no concurrency permit within the maximum wait: shedding the call"
                            );
                            State::Shed(Overloaded::waited(self.max_wait.unwrap_or(waited)))
                        }
                    };
                }
            }
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        match std::mem::replace(&mut self.state, State::Idle) {
            State::Ready(permit) => {
                let start = self.shared.start();
                let inspect = self.shared.inspect();
                let release = Release::new(permit, start);
                ResponseFuture::called(
                    self.inner.call(req),
                    Some(release),
                    self.classifier.clone(),
                    inspect,
                )
            }
            State::Shed(err) => ResponseFuture::refused(err, self.classifier.clone()),
            _ => panic!("poll_ready must be called first"),
        }
    }
}

impl<S: Clone, C: Clone> Clone for ConcurrencyLimit<S, C> {
    fn clone(&self) -> Self {
        Self::from_parts(
            self.inner.clone(),
            self.shared.clone(),
            self.classifier.clone(),
            self.max_wait,
            self.max_waiting,
        )
    }
}

impl<S: fmt::Debug, C> fmt::Debug for ConcurrencyLimit<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Idle => "idle",
            State::Waiting { .. } => "waiting",
            State::Ready(_) => "ready",
            State::Shed(_) => "shed",
        };
        f.debug_struct("ConcurrencyLimit")
            .field("inner", &self.inner)
            .field("limit", &self.shared)
            .field("state", &state)
            .finish()
    }
}
