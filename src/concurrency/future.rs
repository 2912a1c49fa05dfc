//! The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use crate::BoxError;
use crate::body::Inspect;
use crate::classify::Classify;

use super::body::Release;
use super::error::Overloaded;

pin_project! {
    /// The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).
    ///
    /// It holds the call's permit. When the inner future resolves, the
    /// permit moves into the response (for HTTP, into its body; see
    /// [`Release`]); when this future is dropped first, the permit is given
    /// back at once.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, C> {
        #[pin]
        kind: Kind<F>,
        release: Option<Release>,
        classifier: C,
        inspect: Inspect,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F },
        Shed { error: Option<Overloaded> },
    }
}

impl<F, C> ResponseFuture<F, C> {
    pub(crate) fn called(future: F, release: Release, classifier: C, inspect: Inspect) -> Self {
        Self {
            kind: Kind::Called { future },
            release: Some(release),
            classifier,
            inspect,
        }
    }

    pub(crate) fn shed(error: Overloaded, classifier: C) -> Self {
        Self {
            kind: Kind::Shed { error: Some(error) },
            release: None,
            classifier,
            inspect: Inspect::NOTHING,
        }
    }
}

impl<F, C, Res, E> Future for ResponseFuture<F, C>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    C: Classify<Res>,
{
    type Output = Result<C::Observed<Release>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Shed { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
            KindProj::Called { future } => match ready!(future.poll(cx)) {
                Ok(res) => {
                    let release = this.release.take().expect("polled after completion");
                    Poll::Ready(Ok(this.classifier.observe(res, *this.inspect, release)))
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    if let Some(release) = this.release.take()
                        && release.is_adaptive()
                    {
                        release.on_error(this.classifier.classify_error(&e));
                    }
                    Poll::Ready(Err(e))
                }
            },
        }
    }
}

impl<F, C> fmt::Debug for ResponseFuture<F, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("holds_permit", &self.release.is_some())
            .finish_non_exhaustive()
    }
}
