//! The response future of [`Pool`](super::Pool).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::BoxError;

use super::error::Exhausted;
use super::service::Picked;

pin_project! {
    /// The response future of [`Pool`](super::Pool).
    ///
    /// It holds a clone of the chosen account's service and the request,
    /// drives the service to readiness, calls it, and marks the response
    /// with [`Picked`]. Dropping it before the call sends nothing (the pool
    /// reserved nothing; a layer inside gives back what it reserved).
    pub struct ResponseFuture<F, S, Req> {
        #[pin]
        state: State<F, S, Req>,
        picked: Option<Picked>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F, S, Req> {
        Ready {
            svc: Option<S>,
            req: Option<Req>,
        },
        Called {
            #[pin]
            future: F,
        },
        Exhausted {
            error: Option<Exhausted>,
        },
    }
}

impl<F, S, Req> ResponseFuture<F, S, Req> {
    pub(crate) fn new(svc: S, req: Req, picked: Picked) -> Self {
        Self {
            state: State::Ready {
                svc: Some(svc),
                req: Some(req),
            },
            picked: Some(picked),
        }
    }

    pub(crate) fn exhausted(error: Exhausted) -> Self {
        Self {
            state: State::Exhausted { error: Some(error) },
            picked: None,
        }
    }
}

impl<F, S, Req> fmt::Debug for ResponseFuture<F, S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Ready { .. } => "ready",
            State::Called { .. } => "called",
            State::Exhausted { .. } => "exhausted",
        };
        f.debug_struct("ResponseFuture")
            .field("state", &state)
            .field("picked", &self.picked)
            .finish()
    }
}

impl<F, S, Req, ResB, E> Future for ResponseFuture<F, S, Req>
where
    F: Future<Output = Result<Response<ResB>, E>>,
    S: Service<Req, Future = F, Response = Response<ResB>, Error = E>,
    E: Into<BoxError>,
{
    type Output = Result<Response<ResB>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        loop {
            match this.state.as_mut().project() {
                StateProj::Ready { svc, req } => {
                    let s = svc.as_mut().expect("polled after completion");
                    ready!(s.poll_ready(cx)).map_err(Into::into)?;
                    let mut s = svc.take().expect("polled after completion");
                    let future = s.call(req.take().expect("polled after completion"));
                    this.state.set(State::Called { future });
                }
                StateProj::Called { future } => {
                    let mut res = ready!(future.poll(cx)).map_err(Into::into)?;
                    if let Some(p) = this.picked.take() {
                        res.extensions_mut().insert(p);
                    }
                    return Poll::Ready(Ok(res));
                }
                StateProj::Exhausted { error } => {
                    return Poll::Ready(Err(error.take().expect("polled after completion").into()));
                }
            }
        }
    }
}
