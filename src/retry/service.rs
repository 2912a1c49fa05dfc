use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_service::Service;

use super::future::{ResponseFuture, handoff_of};
use super::layer::{Counter, Shared};
use super::{PeekBody, ReplayBody, RetryLayer, RetryStats};
use crate::classify::{Classifier, Classify};
use crate::time::{self, Deadline};

/// Retries requests that failed in a way that heals: throttled or transient,
/// per the classifier, before anything of the response reached the caller.
///
/// See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share the budget, the random source and the counters. Each call
/// clones the inner service (which must be `Clone`) into its response future
/// for the retries, like tower's `Retry`; a clone never inherits the
/// readiness of the original.
pub struct Retry<S, C = Classifier> {
    inner: S,
    shared: Arc<Shared<C>>,
}

impl<S> Retry<S> {
    /// Wraps `inner` with the default settings.
    pub fn new(inner: S) -> Self {
        Self::from_shared(inner, RetryLayer::new().shared())
    }

    /// A [`RetryLayer`] with the default settings.
    pub fn layer() -> RetryLayer {
        RetryLayer::new()
    }
}

impl<S, C> Retry<S, C> {
    pub(crate) fn from_shared(inner: S, shared: Arc<Shared<C>>) -> Self {
        Self { inner, shared }
    }

    /// The counters this service shares with its clones and its layer.
    pub fn stats(&self) -> RetryStats {
        self.shared.stats.clone()
    }

    crate::util::macros::define_inner_service_accessors!();
}

impl<S: Clone, C> Clone for Retry<S, C> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug, C> fmt::Debug for Retry<S, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Retry")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish()
    }
}

impl<S, C, B, ResB> Service<Request<B>> for Retry<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: fmt::Display + 'static,
    C: Classify<Response<ResB>>,
    B: ReplayBody,
    ResB: http_body::Body + Unpin + 'static,
    ResB::Data: 'static,
    ResB::Error: 'static,
{
    type Response = Response<PeekBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, ResB, C>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        shared.stats.bump(Counter::Requests);
        // The clock is read only when a deadline is configured.
        let deadline = match config.deadline {
            Some(total) => Some(
                Deadline(
                    time::now()
                        .checked_add(total)
                        .unwrap_or_else(time::far_future),
                )
                .tighten(&mut req),
            ),
            None => Deadline::of(&req),
        };
        // The ready service makes this call (and must be polled ready
        // before its next one); the future keeps a clone of it for the
        // retries, taken after the call as tower's `Retry` does (polled
        // ready before each retry), so the service is not moved around.
        let shared = self.shared.clone();
        // `()` without the `fallback` feature.
        #[allow(clippy::let_unit_value)]
        let handoff = handoff_of(&req);

        if config.policy.get_max_retries() == 0 {
            let future = self.inner.call(req);
            let service = self.inner.clone();
            return ResponseFuture::calling(service, None, future, shared, deadline, handoff);
        }
        let (parts, body) = req.into_parts();
        match body.try_clone() {
            Some(copy) => {
                let template = (parts.clone(), copy);
                let future = self.inner.call(Request::from_parts(parts, body));
                let service = self.inner.clone();
                ResponseFuture::calling(service, Some(template), future, shared, deadline, handoff)
            }
            None => match body.buffer(config.buffer_limit) {
                Ok(buffering) => {
                    // The call waits for the body: the ready service is
                    // given to the future, `self` gets a fresh clone.
                    let clone = self.inner.clone();
                    let service = std::mem::replace(&mut self.inner, clone);
                    ResponseFuture::buffering(service, parts, buffering, shared, deadline, handoff)
                }
                Err(body) => {
                    tracing::debug!(
                        target: "tower_qwen::retry",
                        "request body cannot be replayed: sending it once"
                    );
                    let future = self.inner.call(Request::from_parts(parts, body));
                    let service = self.inner.clone();
                    ResponseFuture::calling(service, None, future, shared, deadline, handoff)
                }
            },
        }
    }
}
