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
    /// A response body cut with [`IdleTimeout`] when the upstream sends no
    /// frame for the idle timeout, or with [`DeadlineExceeded`] when the
    /// request's total deadline passes. See the [module docs](super) for an
    /// example.
    ///
    /// Idle time is counted while the body waits for the upstream: from the
    /// first poll that finds no frame ready until a frame arrives (time the
    /// caller spends between polls is not the upstream's silence). One timer
    /// serves both limits; it is re-armed in place, and only when it fires
    /// early. Frames that are ready when polled cost no clock read and no
    /// timer operation; each wait costs one clock read. The body is `Unpin`
    /// when the inner body is.
    pub struct TimeoutBody<B> {
        #[pin]
        inner: B,
        timer: Option<Timer>,
    }
}

struct Timer {
    // Taken over from the response future when it had one; otherwise made
    // at the first wait.
    sleep: Option<Pin<Box<Sleep>>>,
    idle: Option<Duration>,
    deadline: Option<Instant>,
    // When the current wait for a frame began; `None` while frames flow.
    waiting_since: Option<Instant>,
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
        Self {
            inner,
            timer: Some(Timer {
                sleep,
                idle,
                deadline,
                waiting_since: None,
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

impl Timer {
    /// The timer fired: cut the body, or re-arm it for the next limit.
    fn fired(&mut self) -> Option<BoxError> {
        let now = time::now();
        if self.deadline.is_some_and(|at| now >= at) {
            self.expired = true;
            tracing::debug!(
                target: "tower_qwen::timeout",
                "deadline passed while reading the response body"
            );
            return Some(Box::new(DeadlineExceeded::new(true)));
        }
        if let (Some(idle), Some(since)) = (self.idle, self.waiting_since)
            && now >= since.checked_add(idle).unwrap_or_else(time::far_future)
        {
            self.expired = true;
            tracing::debug!(
                target: "tower_qwen::timeout",
                idle_ms = idle.as_millis() as u64,
                "response body stalled"
            );
            return Some(Box::new(IdleTimeout::new(idle)));
        }
        // Early (armed for the headers, or frames came since): re-arm.
        let at = match self.waiting_since {
            Some(since) => next_wake(since, self.idle, self.deadline),
            None => self.deadline.unwrap_or_else(time::far_future),
        };
        if let Some(sleep) = self.sleep.as_mut() {
            sleep.as_mut().reset(at);
        }
        None
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
        let Some(t) = this.timer.as_mut() else {
            return this.inner.poll_frame(cx).map_err(Into::into);
        };
        if t.expired {
            return Poll::Ready(None);
        }
        // A limit may have passed while frames kept coming without a wait.
        if t.sleep.as_ref().is_some_and(|s| s.is_elapsed())
            && let Some(err) = t.fired()
        {
            return Poll::Ready(Some(Err(err)));
        }
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                t.waiting_since = None;
                return Poll::Ready(Some(Ok(frame)));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        let since = *t.waiting_since.get_or_insert_with(time::now);
        let wake = next_wake(since, t.idle, t.deadline);
        match t.sleep.as_mut() {
            // Armed no later than needed: it re-arms itself if early.
            Some(sleep) if sleep.deadline() <= wake => {}
            Some(sleep) => sleep.as_mut().reset(wake),
            None => t.sleep = Some(Box::pin(tokio::time::sleep_until(wake))),
        }
        loop {
            let sleep = t.sleep.as_mut().expect("armed above");
            ready!(sleep.as_mut().poll(cx));
            if let Some(err) = t.fired() {
                return Poll::Ready(Some(Err(err)));
            }
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
