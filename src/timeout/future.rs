//! The response future of [`Timeout`](super::Timeout).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Response;
use pin_project_lite::pin_project;
use tokio::time::Sleep;

use super::body::TimeoutBody;
use super::error::{DeadlineExceeded, HeaderTimeout};
use crate::BoxError;
use crate::time::{self, Instant};

pin_project! {
    /// Response future of [`Timeout`](super::Timeout): the inner future,
    /// raced against the header timeout and the total deadline.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        // When the head must have arrived (header timeout or deadline).
        wake: Option<Instant>,
        // Made at the first wait only, and boxed so that it can move into the
        // response body and be reset there, in place, for the idle timeout
        // and the deadline. An answer that is ready at once costs no timer.
        sleep: Option<Pin<Box<Sleep>>>,
        header: Option<Duration>,
        idle: Option<Duration>,
        deadline: Option<Instant>,
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        inner: F,
        header: Option<Duration>,
        idle: Option<Duration>,
        deadline: Option<Instant>,
        now: Instant,
    ) -> Self {
        let header_at = header.map(|h| now.checked_add(h).unwrap_or_else(time::far_future));
        let wake = match (header_at, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Self {
            inner,
            wake,
            sleep: None,
            header,
            idle,
            deadline,
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
{
    type Output = Result<Response<TimeoutBody<B>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(result) = this.inner.poll(cx) {
            return Poll::Ready(match result {
                Ok(res) => {
                    let (sleep, idle, deadline) = (this.sleep.take(), *this.idle, *this.deadline);
                    Ok(res.map(|body| TimeoutBody::new(body, sleep, idle, deadline)))
                }
                Err(e) => Err(e.into()),
            });
        }
        let Some(wake) = *this.wake else {
            return Poll::Pending;
        };
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake)));
        if sleep.as_mut().poll(cx).is_ready() {
            *this.wake = None;
            let now = time::now();
            let err: BoxError = match (*this.header, *this.deadline) {
                (_, Some(at)) if now >= at => Box::new(DeadlineExceeded::new(false)),
                (Some(h), _) => Box::new(HeaderTimeout::new(h)),
                (None, _) => Box::new(DeadlineExceeded::new(false)),
            };
            tracing::debug!(target: "tower_qwen::timeout", error = %err, "request timed out");
            return Poll::Ready(Err(err));
        }
        Poll::Pending
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("header", &self.header)
            .field("idle", &self.idle)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}
