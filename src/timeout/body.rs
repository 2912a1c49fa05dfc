//! The response body of [`Timeout`](super::Timeout): idle timeout between
//! frames and the total deadline.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::error::{DeadlineExceeded, IdleTimeout};
use crate::BoxError;
use crate::time::{self, Instant};

pin_project! {
    /// A response body cut with [`IdleTimeout`] when no frame arrives for the
    /// idle timeout, or with [`DeadlineExceeded`] when the request's total
    /// deadline passes. See the [module docs](super) for an example.
    ///
    /// One timer serves both and is re-armed in place only when it fires
    /// early (frames merely record when they passed), so a fast stream costs
    /// one clock read per frame and no timer operations. The body is `Unpin`
    /// when the inner body is.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        timer: Option<Timer>,
    }
}

struct Timer {
    sleep: Pin<Box<Sleep>>,
    idle: Option<Duration>,
    deadline: Option<Instant>,
    last_frame: Instant,
    expired: bool,
}

impl<B> TimeoutBody<B> {
    pub(crate) fn new(
        inner: B,
        sleep: Option<Pin<Box<Sleep>>>,
        idle: Option<Duration>,
        deadline: Option<Instant>,
    ) -> Self {
        if idle.is_none() && deadline.is_none() {
            return Self { inner, timer: None };
        }
        let now = time::now();
        let at = next_wake(now, idle, deadline);
        let sleep = match sleep {
            Some(mut s) => {
                s.as_mut().reset(at);
                s
            }
            None => Box::pin(tokio::time::sleep_until(at)),
        };
        Self {
            inner,
            timer: Some(Timer {
                sleep,
                idle,
                deadline,
                last_frame: now,
                expired: false,
            }),
        }
    }

    /// A body without timeouts.
    pub fn unlimited(inner: B) -> Self {
        Self { inner, timer: None }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

fn next_wake(from: Instant, idle: Option<Duration>, deadline: Option<Instant>) -> Instant {
    let idle_at = idle.map(|i| from.checked_add(i).unwrap_or_else(time::far_future));
    match (idle_at, deadline) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) => a,
        (None, Some(b)) => b,
        (None, None) => time::far_future(),
    }
}

impl<B> Body for TimeoutBody<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.project();
        if this.timer.as_ref().is_some_and(|t| t.expired) {
            return Poll::Ready(None);
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = this.timer.as_mut() {
                    if t.idle.is_some() {
                        t.last_frame = time::now();
                    }
                }
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let Some(t) = this.timer.as_mut() else {
            return Poll::Pending;
        };
        loop {
            ready!(t.sleep.as_mut().poll(cx));
            let now = time::now();
            if t.deadline.is_some_and(|at| now >= at) {
                t.expired = true;
                tracing::debug!(target: "tower_qwen::timeout", "deadline passed while reading the response body");
                return Poll::Ready(Some(Err(Box::new(DeadlineExceeded::new(true)))));
            }
            if let Some(idle) = t.idle {
                if now
                    >= t.last_frame
                        .checked_add(idle)
                        .unwrap_or_else(time::far_future)
                {
                    t.expired = true;
                    tracing::debug!(target: "tower_qwen::timeout", idle_ms = idle.as_millis() as u64, "response body stalled");
                    return Poll::Ready(Some(Err(Box::new(IdleTimeout::new(idle)))));
                }
            }
            // Fired early: frames came since it was armed. Re-arm in place.
            let at = next_wake(t.last_frame, t.idle, t.deadline);
            t.sleep.as_mut().reset(at);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.timer.as_ref().is_some_and(|t| t.expired) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug> fmt::Debug for TimeoutBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("TimeoutBody");
        d.field("inner", &self.inner);
        if let Some(t) = &self.timer {
            d.field("idle", &t.idle)
                .field("deadline", &t.deadline)
                .field("expired", &t.expired);
        }
        d.finish()
    }
}
