//! Routing by urgency: requests that can wait go to the Batch API, the
//! others to the real-time stack.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Request;
use pin_project_lite::pin_project;
use tower_layer::Layer;
use tower_service::Service;

use super::line::CUSTOM_ID_HEADER;

/// The header that marks a request deferrable: `1`, `true` or `yes`
/// (any case). [`Defer`] removes it (and [`CUSTOM_ID_HEADER`]) before
/// either service sees the request.
pub const DEFER_HEADER: &str = "x-tower-qwen-defer";

/// A request extension marking a request deferrable: it may wait for the
/// Batch API (hours, at half price) instead of the real-time quota.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Deferrable;

impl Deferrable {
    /// Marks `req` deferrable.
    pub fn mark<B>(req: &mut Request<B>) {
        req.extensions_mut().insert(Deferrable);
    }

    /// Whether `req` is marked deferrable, by the extension or the
    /// [`DEFER_HEADER`].
    pub fn is_marked<B>(req: &Request<B>) -> bool {
        req.extensions().get::<Deferrable>().is_some()
            || req
                .headers()
                .get_all(DEFER_HEADER)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| {
                    let v = v.trim();
                    ["1", "true", "yes"]
                        .iter()
                        .any(|t| v.eq_ignore_ascii_case(t))
                })
    }
}

/// Sends [deferrable](Deferrable) requests to the `deferred` service (a
/// [`Batch`](super::Batch)) and the others to the inner service (the
/// real-time stack). See the [module docs](super) for an example.
///
/// Both services take the same request and answer the same response and
/// error types, so a caller cannot tell them apart but by the time the
/// answer takes. With a [`QwenClient`](crate::client::QwenClient) inside and
/// a [`Batch`](super::Batch) over the same transport, they already do.
///
/// # Readiness
///
/// Like `tower::steer::Steer`, `poll_ready` waits for both services (a
/// `Batch` is always ready), since the choice is made only in `call`.
#[derive(Clone, Debug)]
pub struct Defer<S, D> {
    inner: S,
    deferred: D,
}

/// Applies [`Defer`] with a given deferred service.
#[derive(Clone, Debug)]
pub struct DeferLayer<D> {
    deferred: D,
}

impl<D> DeferLayer<D> {
    /// Deferrable requests go to `deferred`.
    pub fn new(deferred: D) -> Self {
        Self { deferred }
    }
}

impl<S, D: Clone> Layer<S> for DeferLayer<D> {
    type Service = Defer<S, D>;

    fn layer(&self, inner: S) -> Defer<S, D> {
        Defer::new(inner, self.deferred.clone())
    }
}

impl<S, D> Defer<S, D> {
    /// Deferrable requests go to `deferred`, the others to `inner`.
    pub fn new(inner: S, deferred: D) -> Self {
        Self { inner, deferred }
    }

    /// The deferred service.
    pub fn deferred(&self) -> &D {
        &self.deferred
    }

    crate::util::macros::define_inner_service_accessors!();
}

impl<S, D, B> Service<Request<B>> for Defer<S, D>
where
    S: Service<Request<B>>,
    D: Service<Request<B>, Response = S::Response, Error = S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeferFuture<S::Future, D::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let a = self.inner.poll_ready(cx)?;
        ready!(self.deferred.poll_ready(cx))?;
        a.map(Ok)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let deferred = Deferrable::is_marked(&req);
        req.headers_mut().remove(DEFER_HEADER);
        if deferred {
            tracing::trace!("batch: deferring a request");
            DeferFuture {
                kind: Kind::Deferred {
                    fut: self.deferred.call(req),
                },
            }
        } else {
            req.headers_mut().remove(CUSTOM_ID_HEADER);
            DeferFuture {
                kind: Kind::Now {
                    fut: self.inner.call(req),
                },
            }
        }
    }
}

pin_project! {
    /// The future of a [`Defer`] call: the chosen service's.
    pub struct DeferFuture<A, B> {
        #[pin]
        kind: Kind<A, B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<A, B> {
        Now { #[pin] fut: A },
        Deferred { #[pin] fut: B },
    }
}

impl<A, B> fmt::Debug for DeferFuture<A, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let which = match self.kind {
            Kind::Now { .. } => "now",
            Kind::Deferred { .. } => "deferred",
        };
        f.debug_struct("DeferFuture").field("kind", &which).finish()
    }
}

impl<A, B, T, E> Future for DeferFuture<A, B>
where
    A: Future<Output = Result<T, E>>,
    B: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Now { fut } => fut.poll(cx),
            KindProj::Deferred { fut } => fut.poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks() {
        let mut r = Request::new(());
        assert!(!Deferrable::is_marked(&r));
        r.headers_mut().insert(DEFER_HEADER, "no".parse().unwrap());
        assert!(!Deferrable::is_marked(&r));
        r.headers_mut()
            .insert(DEFER_HEADER, " TRUE ".parse().unwrap());
        assert!(Deferrable::is_marked(&r));
        let mut r = Request::new(());
        Deferrable::mark(&mut r);
        assert!(Deferrable::is_marked(&r));
    }
}
