//! The response future of [`Coalesce`](super::Coalesce).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Request, Response};
use pin_project_lite::pin_project;
use tokio::sync::oneshot;
use tower_service::Service;

use super::answer::Reply;
use super::batch::BoxFuture;
use super::body::ResponseBody;
use super::error::BatchFailed;
use crate::BoxError;

pin_project! {
    /// The response future of [`Coalesce`](super::Coalesce): the inner
    /// service's own future for a request that passes through, or the wait
    /// for this caller's share of a merged answer.
    pub struct ResponseFuture<S, B>
    where
        S: Service<Request<B>>,
    {
        #[pin]
        state: State<S, B>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<S, B>
    where
        S: Service<Request<B>>,
    {
        // Passing through: waiting for the inner service (a clone of it).
        NotReady { svc: S, req: Option<Request<B>> },
        Called { #[pin] fut: S::Future },
        // Merging: waiting for a queue slot, then for the answer.
        Acquire { acquire: BoxFuture<Result<(), BoxError>>, rx: Option<oneshot::Receiver<Reply>> },
        Queued { rx: oneshot::Receiver<Reply> },
        // A request over the cap, split and re-joined.
        Boxed { fut: BoxFuture<Reply> },
    }
}

impl<S, B> ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    pub(crate) fn pass(svc: S, req: Request<B>) -> Self {
        Self {
            state: State::NotReady {
                svc,
                req: Some(req),
            },
        }
    }

    pub(crate) fn queued(rx: oneshot::Receiver<Reply>) -> Self {
        Self {
            state: State::Queued { rx },
        }
    }

    pub(crate) fn acquire(
        acquire: BoxFuture<Result<(), BoxError>>,
        rx: oneshot::Receiver<Reply>,
    ) -> Self {
        Self {
            state: State::Acquire {
                acquire,
                rx: Some(rx),
            },
        }
    }

    pub(crate) fn boxed(fut: BoxFuture<Reply>) -> Self {
        Self {
            state: State::Boxed { fut },
        }
    }
}

impl<S, B> fmt::Debug for ResponseFuture<S, B>
where
    S: Service<Request<B>>,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::NotReady { .. } => "NotReady",
            State::Called { .. } => "Called",
            State::Acquire { .. } => "Acquire",
            State::Queued { .. } => "Queued",
            State::Boxed { .. } => "Split",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .finish()
    }
}

fn rebuilt<RB>(reply: Reply) -> Result<Response<ResponseBody<RB>>, BoxError> {
    reply.map(|res| res.map(ResponseBody::full))
}

impl<S, B, RB> Future for ResponseFuture<S, B>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    type Output = Result<Response<ResponseBody<RB>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        const DONE: &str = "ResponseFuture polled after completion";
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::NotReady { svc, req } => {
                    if let Err(e) = ready!(svc.poll_ready(cx)) {
                        return Poll::Ready(Err(e.into()));
                    }
                    let fut = svc.call(req.take().expect(DONE));
                    this.state.set(State::Called { fut });
                }
                StateProj::Called { fut } => {
                    return fut.poll(cx).map(|r| {
                        r.map(|res| res.map(ResponseBody::inner))
                            .map_err(Into::into)
                    });
                }
                StateProj::Acquire { acquire, rx } => {
                    if let Err(e) = ready!(acquire.as_mut().poll(cx)) {
                        return Poll::Ready(Err(e));
                    }
                    let rx = rx.take().expect(DONE);
                    this.state.set(State::Queued { rx });
                }
                StateProj::Queued { rx } => {
                    let reply = ready!(Pin::new(rx).poll(cx))
                        .unwrap_or_else(|_| Err(Box::new(BatchFailed::closed())));
                    return Poll::Ready(rebuilt(reply));
                }
                StateProj::Boxed { fut } => return fut.as_mut().poll(cx).map(rebuilt),
            }
        }
    }
}
