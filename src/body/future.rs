//! The response future shared by the layers that watch a response to its
//! end (circuit breaker, concurrency limit, rate limit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use crate::BoxError;
use crate::classify::Classify;

use super::{BodyEnd, EndKind, Inspect, OnEnd};

pin_project! {
    /// A call's response future with a hook that must learn how the call
    /// ends: when the inner service answers, the classifier hands the hook
    /// to the response (for HTTP, to its one [`Observed`](super::Observed)
    /// body wrapper, see [`Classify`]); when it fails, the hook runs at once
    /// with the error's outcome; when this future is dropped first, the
    /// hook is dropped without running (it gives back what it holds).
    ///
    /// A call refused before it went (an open circuit, a full queue, a
    /// rate limit) resolves to its error `R`.
    ///
    /// This is the `ResponseFuture` of [`CircuitBreaker`](crate::circuit_breaker::CircuitBreaker),
    /// [`ConcurrencyLimit`](crate::concurrency::ConcurrencyLimit) and, once
    /// its wait is over, [`RateLimit`](crate::rate_limit::RateLimit).
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ObserveFuture<F, C, H, R> {
        #[pin]
        kind: Kind<F, R>,
        hook: Option<H>,
        classifier: C,
        inspect: Inspect,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, R> {
        Called { #[pin] future: F },
        Refused { error: Option<R> },
    }
}

impl<F, C, H, R> ObserveFuture<F, C, H, R> {
    /// The inner service was called; `hook` (when there is one) learns how
    /// the call ends, and the response is inspected for `inspect`.
    pub(crate) fn called(future: F, hook: Option<H>, classifier: C, inspect: Inspect) -> Self {
        Self {
            kind: Kind::Called { future },
            hook,
            classifier,
            inspect,
        }
    }

    /// The call was refused with `error`.
    pub(crate) fn refused(error: R, classifier: C) -> Self {
        Self {
            kind: Kind::Refused { error: Some(error) },
            hook: None,
            classifier,
            inspect: Inspect::NOTHING,
        }
    }

    /// Whether the future still holds its hook (the call has not resolved).
    #[cfg(feature = "rate-limit")]
    pub(crate) fn has_hook(&self) -> bool {
        self.hook.is_some()
    }
}

impl<F, C, H, R, Res, E> Future for ObserveFuture<F, C, H, R>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    C: Classify<Res>,
    H: OnEnd,
    R: Into<BoxError>,
{
    type Output = Result<C::Observed, BoxError>;

    #[inline]
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Refused { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
            KindProj::Called { future } => match ready!(future.poll(cx)) {
                Ok(res) => Poll::Ready(Ok(match this.hook.take() {
                    Some(hook) => this.classifier.observe(res, *this.inspect, hook),
                    None => this.classifier.observe(res, *this.inspect, |_: BodyEnd| {}),
                })),
                Err(e) => {
                    let e: BoxError = e.into();
                    if let Some(hook) = this.hook.take() {
                        let outcome = this.classifier.classify_error(&e);
                        hook.on_end(BodyEnd::new(outcome, EndKind::Failed));
                    }
                    Poll::Ready(Err(e))
                }
            },
        }
    }
}

impl<F, C, H: fmt::Debug, R> fmt::Debug for ObserveFuture<F, C, H, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.kind {
            Kind::Called { .. } => "called",
            Kind::Refused { .. } => "refused",
        };
        f.debug_struct("ObserveFuture")
            .field("state", &state)
            .field("hook", &self.hook)
            .field("inspect", &self.inspect)
            .finish_non_exhaustive()
    }
}
