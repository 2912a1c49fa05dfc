use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::TimeoutLayer;
use super::body::TimeoutBody;
use super::future::ResponseFuture;
use crate::BoxError;
use crate::time::{self, Deadline};

/// Bounds the time to response headers, the silence between response body
/// frames, and the whole exchange. See the [module docs](super) for an
/// example.
///
/// # Clone
///
/// Clones are independent: the layer keeps no state besides its settings.
#[derive(Clone, Debug)]
pub struct Timeout<S> {
    inner: S,
    config: TimeoutLayer,
}

impl<S> Timeout<S> {
    /// Wraps `inner` with the timeouts of `config`.
    pub const fn new(inner: S, config: TimeoutLayer) -> Self {
        Self { inner, config }
    }

    /// A [`TimeoutLayer`] with the defaults ([`TimeoutLayer::new`]).
    pub const fn layer() -> TimeoutLayer {
        TimeoutLayer::new()
    }

    crate::util::macros::define_inner_service_accessors!();
}

impl<S, B, ResB> Service<Request<B>> for Timeout<S>
where
    S: Service<Request<B>, Response = Response<ResB>>,
    S::Error: Into<BoxError>,
    ResB: http_body::Body,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<TimeoutBody<ResB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // Read by a layer outside in this same call, if one did.
        let now = time::call_now();
        // The earlier of the configured total and a deadline in the request
        // (a retry layer outside puts one there). Not stored back: this
        // layer sits just above the client, where nothing reads it.
        let own = self
            .config
            .total
            .map(|t| now.checked_add(t).unwrap_or_else(time::far_future));
        let deadline = match (own, Deadline::of(&req)) {
            (Some(a), Some(Deadline(b))) => Some(a.min(b)),
            (a, b) => a.or(b.map(|d| d.0)),
        };
        let future = self.inner.call(req);
        ResponseFuture::new(future, self.config.header, self.config.idle, deadline, now)
    }
}
