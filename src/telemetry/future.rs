//! The response future of [`GenAiTrace`](super::GenAiTrace).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use super::Record;
use crate::body::{BodyEnd, EndKind, Inspect, Observed, OnEnd};
use crate::classify::Classifier;

pin_project! {
    /// Response future of [`GenAiTrace`](super::GenAiTrace): the inner
    /// future, polled inside the call's span; its response's body is
    /// observed until it ends.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        record: Option<Record>,
        classifier: Classifier,
    }

    impl<F> PinnedDrop for ResponseFuture<F> {
        fn drop(this: Pin<&mut Self>) {
            // Dropped before the response came: the call was cancelled.
            if let Some(record) = this.project().record.take() {
                record.on_end(BodyEnd::new(crate::classify::Outcome::Success, EndKind::Dropped));
            }
        }
    }
}

impl<F> ResponseFuture<F> {
    pub(crate) fn new(
        inner: F,
        span: tracing::Span,
        record: Record,
        classifier: Classifier,
    ) -> Self {
        Self {
            inner,
            span,
            record: Some(record),
            classifier,
        }
    }
}

impl<F, RB, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<RB>, E>>,
    RB: http_body::Body + Send + 'static,
    RB::Data: 'static,
    RB::Error: 'static,
    E: fmt::Display + 'static,
{
    type Output = Result<Response<Observed<RB::Data, RB::Error>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = {
            let _entered = this.span.enter();
            ready!(this.inner.poll(cx))
        };
        let record = this.record.take().expect("polled after completion");
        Poll::Ready(match result {
            Ok(res) => {
                let inspect = if record.is_live() {
                    Inspect {
                        outcome: true,
                        usage: true,
                        timing: record.streams(),
                        answer: true,
                    }
                } else {
                    Inspect::NOTHING
                };
                Ok(Observed::wrap(res, this.classifier, inspect, record))
            }
            Err(err) => {
                let outcome = this.classifier.classify_error(&err);
                record.on_end(BodyEnd::new(outcome, EndKind::Failed));
                Err(err)
            }
        })
    }
}

impl<F> fmt::Debug for ResponseFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}
