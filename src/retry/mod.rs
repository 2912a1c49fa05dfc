//! Retry what heals, never what can't, never a stream already flowing.
//!
//! [`Retry`] sends a request again when the [classifier](crate::classify)
//! says the attempt was [`Throttled`](crate::classify::Outcome::Throttled) or
//! [`Transient`](crate::classify::Outcome::Transient), and never when it was
//! [`Permanent`](crate::classify::Outcome::Permanent) (bad key, arrears,
//! content filter, invalid request, free quota gone: repeating cannot help).
//!
//! * **It classifies before the caller sees anything.** DashScope hides
//!   errors in bodies, so each answer is [peeked](peek) at first: a non-2xx
//!   body and a 2xx JSON body are read (up to the classifier's body limit)
//!   and classified; an SSE stream is read up to its first frame that
//!   carries output, and an error frame before it (`event:error` with
//!   `:HTTP_STATUS/429`, a compatible `{"error":...}`) is a failed attempt
//!   that may be retried. Frames with no output (the compatible role-only
//!   first chunk, empty deltas) are held back within a [`Hold`] bound (16
//!   KiB, 10 s by default; [`RetryLayer::hold`]), so a stream stays
//!   retryable until the caller would see its first real token. Otherwise
//!   the response is handed on with the bytes already read replayed in
//!   front of the rest: nothing is lost or reordered. Once a frame with
//!   output has reached the caller there is no retry; an error later in the
//!   stream reaches the caller as the stream's end.
//! * **Waits follow the cause** ([`Backoff`]): exponential backoff with full
//!   jitter for failures, and for throttles at least the time the limit needs
//!   to refill (a one-second window for requests, growing pauses for tokens
//!   and for the "rate increased too quickly" burst guard). A `Retry-After` /
//!   `retry-after-ms` header (capped by the classifier) takes precedence.
//! * **A budget shared by all clones** ([`Budget`]) bounds retries to a
//!   fraction of the traffic (20 % plus a small reserve by default), so an
//!   outage cannot multiply the load; a denied retry is counted
//!   ([`RetryStats::budget_denied`]) and logged when the budget runs dry.
//! * **Deadline-aware**: with [`RetryLayer::deadline`] or a
//!   [`Deadline`](crate::time::Deadline) request extension, no wait starts
//!   that would end past the deadline; the last answer is handed back
//!   instead.
//! * **Bodies are replayed, never dropped**: a request body that
//!   [`try_clone`](crate::body::BufferedBody::try_clone)s (the crate's
//!   [`Body`](crate::body::Body) from bytes, `Full<Bytes>`, `String`...) is
//!   cloned for each retry. A [`Body::stream`](crate::body::Body::stream) is
//!   read into memory first, up to [`RetryLayer::buffer_limit`] (1 MiB by
//!   default); a longer stream is sent once, whole, and not retried
//!   ([`RetryStats::sent_once`]). See [`ReplayBody`] for other body types.
//! * **Any classifier**: [`RetryLayer::classifier`] takes any
//!   [`Classify`](crate::classify::Classify), like the circuit breaker. A
//!   classifier that judges the response value alone (an
//!   [`FnClassifier`](crate::classify::FnClassifier)) reads nothing ahead
//!   of the caller; one taught your error type with `on_error` decides
//!   which of your errors are retried (a gRPC-style `Unavailable` is,
//!   `NotFound` is not).
//! * Every retry is a `tracing` event (target `tower_qwen::retry`) with the
//!   attempt number, the outcome and the wait, and each retried attempt runs
//!   inside a `retry` span with its `attempt` number.
//!
//! # How it differs from tower's `Retry`
//!
//! tower's [`Retry`](https://docs.rs/tower/latest/tower/retry/struct.Retry.html)
//! hands the response to a policy you write, and the policy cannot look into
//! the body without consuming it. This layer reads the DashScope verdict out
//! of the body and puts the bytes back, retries only what the classifier
//! calls retryable, waits by cause, and ships a lock-free budget and a
//! deadline. Like tower's, it clones the inner service into each response
//! future (the inner service must be `Clone`), keeps the inner error type,
//! and answers with the last response or error when it gives up.
//!
//! # With other layers
//!
//! Put it outermost (inside a model fallback, if any): retry →
//! circuit breaker → rate limit → concurrency → `timeout` →
//! client. The rate limiter then admits each retry like any other request,
//! a retried attempt releases its concurrency permit when its failed answer
//! is dropped (before the wait), the breaker sees every attempt, and the
//! timeout cuts each attempt (its [`Deadline`](crate::time::Deadline) set
//! here applies to all of them). Errors of this crate's own layers are
//! classified too: a local rate-limit rejection is a throttle with the
//! limiter's wait, a timeout is transient.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::convert::Infallible;
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicU32, Ordering};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::retry::{Budget, Policy, RetryLayer};
//! use tower_qwen::util::rng::SeededRng;
//!
//! // An upstream that throttles the first call, then answers.
//! let calls = Arc::new(AtomicU32::new(0));
//! let upstream = tower::service_fn({
//!     let calls = calls.clone();
//!     move |_req: http::Request<Full<Bytes>>| {
//!         let first = calls.fetch_add(1, Ordering::SeqCst) == 0;
//!         async move {
//!             let res = http::Response::builder().header("content-type", "application/json");
//!             let res = if first {
//!                 res.status(429).body(String::from(
//!                     r#"{"code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#,
//!                 ))
//!             } else {
//!                 res.body(String::from(r#"{"output":{"text":"Hello!"}}"#))
//!             };
//!             Ok::<_, Infallible>(res.unwrap())
//!         }
//!     }
//! });
//!
//! let layer = RetryLayer::new()
//!     .policy(Policy::new().max_retries(2))
//!     .budget(Budget::default())
//!     .rng(SeededRng::new(7));
//! let stats = layer.stats();
//! let client = ServiceBuilder::new().layer(layer).service(upstream);
//!
//! let start = tokio::time::Instant::now();
//! let req = http::Request::post("/api/v1/services/aigc/text-generation/generation")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"qwen-plus","input":{"prompt":"Hi"}}"#)))
//!     .unwrap();
//! let res = client.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(body, r#"{"output":{"text":"Hello!"}}"#);
//! assert_eq!(calls.load(Ordering::SeqCst), 2);
//! assert_eq!(stats.retries(), 1);
//! // A requests throttle waits at least for the next one-second window.
//! assert!(start.elapsed() >= std::time::Duration::from_secs(1));
//! # }
//! ```

mod backoff;
mod body;
mod budget;
pub mod future;
mod layer;
pub mod peek;
mod policy;
mod service;

pub use backoff::{Backoff, InvalidBackoff};
pub use body::{BufferFuture, Buffered, ReplayBody};
pub use budget::{Budget, InvalidBudget};
pub use layer::{RetryLayer, RetryStats};
pub use peek::{Hold, Peek, PeekBody, Peeked};
pub use policy::Policy;
pub use service::Retry;
