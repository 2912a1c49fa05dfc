//! The futures of [`Batch`](super::Batch) and [`Defer`](super::Defer) calls.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use tokio::sync::oneshot;

use super::error::BatchError;
use super::service::ResponseBody;
use crate::BoxError;

pub use super::route::DeferFuture;

pub(crate) type Answer = Result<Response<ResponseBody>, BoxError>;

/// Resolves when the request's line was collected from its batch's output
/// or error file, or failed. Dropping it drops the line (from the file if
/// it was not sent yet; its answer is then discarded).
pub struct ResponseFuture {
    state: State,
}

enum State {
    Waiting(oneshot::Receiver<Answer>),
    Ready(Option<BoxError>),
}

impl ResponseFuture {
    pub(crate) fn waiting(rx: oneshot::Receiver<Answer>) -> Self {
        Self {
            state: State::Waiting(rx),
        }
    }

    pub(crate) fn failed(e: BatchError) -> Self {
        Self {
            state: State::Ready(Some(Box::new(e))),
        }
    }
}

impl fmt::Debug for ResponseFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Waiting(_) => "waiting",
            State::Ready(_) => "ready",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

impl Future for ResponseFuture {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Answer> {
        match &mut self.get_mut().state {
            State::Waiting(rx) => match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(answer)) => Poll::Ready(answer),
                Poll::Ready(Err(_)) => Poll::Ready(Err(Box::new(BatchError::closed()))),
                Poll::Pending => Poll::Pending,
            },
            State::Ready(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| Box::new(BatchError::closed())))),
        }
    }
}
