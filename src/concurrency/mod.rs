//! Limits the calls in flight, fixed or adaptive, counting a call until its
//! response **body** ends.
//!
//! [`ConcurrencyLimitLayer::new`] caps the calls in flight at a fixed number;
//! [`ConcurrencyLimitLayer::adaptive`] lets the cap move with [`Aimd`]:
//! additive increase while calls succeed, multiplicative decrease when the
//! upstream throttles (429) or fails transiently (5xx, timeouts), reading the
//! crate's one [`Classifier`](crate::classify::Classifier) (so a
//! `Throttling.RateQuota` inside an HTTP 200 body or an SSE error frame
//! counts too). The source advice's "concurrency cap of 10 to 20" is the
//! adaptive default: start at 10, never above 20.
//!
//! # How it differs from tower's `ConcurrencyLimit`
//!
//! * **The permit lives until the body ends.** tower gives the permit back
//!   when the response head arrives; an SSE generation then streams for a
//!   minute outside the limit. Here the permit moves into the response body
//!   (an [`Observed`](crate::body::Observed) body with a [`body::Release`]
//!   hook) and is given back when the last frame passes, when reading fails,
//!   or when the body is dropped. Dropping the response future before it
//!   resolves gives it back at once. For non-HTTP services an
//!   [`FnClassifier`](crate::classify::FnClassifier) releases when the
//!   response arrives.
//! * **One limit for every service the layer makes.** tower's
//!   `ConcurrencyLimitLayer` creates a new semaphore in each `layer()` call;
//!   here the layer owns the limit, so every service it makes and all their
//!   clones share it ([`LimitHandle`] reads it).
//! * **Bounded, fair waiting.** Callers wait first come, first served (a
//!   newcomer never overtakes the queue), up to [`max_waiting`] callers and
//!   for at most [`max_wait`]; past either the call fails with
//!   [`error::Overloaded`] (load shedding) instead of queueing without end.
//!
//! # Where the permit is taken
//!
//! In `poll_ready`, as tower does: a caller that is ready holds a permit, and
//! `call` consumes it. This keeps the `Service` contract (backpressure
//! reaches the layers outside, and nothing is sent before a permit is
//! held), needs no clone of the inner service per call, and works behind
//! `tower::buffer::Buffer`. Shedding does not make `poll_ready` fail (which
//! `Buffer` and others read as "the service is dead"): like tower's
//! `LoadShed`, `poll_ready` reports ready and the call's future fails with
//! [`error::Overloaded`]. The wait queue bound and the maximum wait are kept
//! per waiting service with a reusable timer.
//!
//! # Interaction with other layers
//!
//! Put it inside the rate limiter and the circuit breaker, outside the
//! timeout (see the crate's recommended order). [`error::Overloaded`] is
//! classified as [`Throttled`](crate::classify::Outcome::Throttled) with
//! cause [`Local`](crate::classify::ThrottleCause::Local): a retry layer
//! outside may try again later, the circuit breaker ignores it, and the
//! adaptive limit does not shrink on it. Keep the limit at or below the
//! HTTP client's pool size.
//!
//! [`max_waiting`]: ConcurrencyLimitLayer::max_waiting
//! [`max_wait`]: ConcurrencyLimitLayer::max_wait
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_qwen::BoxError> {
//! use std::num::NonZeroUsize;
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::concurrency::ConcurrencyLimitLayer;
//!
//! let limit = ConcurrencyLimitLayer::new(NonZeroUsize::new(2).unwrap());
//! let handle = limit.handle();
//! let svc = ServiceBuilder::new().layer(limit).service(service_fn(|_req: http::Request<String>| async {
//!     Ok::<_, std::convert::Infallible>(http::Response::new(String::from("data: {}\n\n")))
//! }));
//!
//! let res = svc.clone().oneshot(http::Request::new(String::new())).await?;
//! // The response head is here, but its body has not been read: the call
//! // still counts.
//! assert_eq!(handle.in_flight(), 1);
//! let body = res.into_body().collect().await?.to_bytes();
//! assert_eq!(&body[..], b"data: {}\n\n");
//! assert_eq!(handle.in_flight(), 0);
//! # Ok(())
//! # }
//! ```
//!
//! An adaptive limit, read through its handle:
//!
//! ```
//! use std::num::NonZeroUsize;
//! use tower_qwen::concurrency::{Aimd, ConcurrencyLimitLayer};
//!
//! let nz = |n| NonZeroUsize::new(n).unwrap();
//! let aimd = Aimd::new().bounds(nz(2), nz(10), nz(40))?.decrease_factor(0.5)?;
//! let layer = ConcurrencyLimitLayer::adaptive(aimd).max_waiting(100);
//! assert_eq!(layer.handle().limit(), 10);
//! # Ok::<_, tower_qwen::concurrency::error::InvalidLimit>(())
//! ```

mod aimd;
pub mod body;
pub mod error;
pub mod future;
mod layer;
mod semaphore;
mod service;
mod shared;

pub use aimd::{Aimd, Latency};
pub use layer::ConcurrencyLimitLayer;
pub use service::ConcurrencyLimit;
pub use shared::LimitHandle;
