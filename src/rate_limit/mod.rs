//! Rate limiting for requests **and tokens**: a shared, lock-free GCRA,
//! keyed, with wait and reject modes, slow start and feedback from the
//! upstream's throttles.
//!
//! DashScope limits each (root account, model) by requests per minute and
//! tokens per minute, both also enforced per second, plus a growth guard
//! ("Request rate increased too quickly"), and sends no `Retry-After` or
//! `x-ratelimit-*` headers. Retrying 429s harder makes it worse; the cure is
//! admission control before the request leaves. [`RateLimit`] does that:
//!
//! * **Two dimensions.** A call passes only when both the request quota
//!   (cost 1) and the token quota (cost = the request's estimate:
//!   [`RequestInfo::estimated_tokens`](crate::request::RequestInfo::estimated_tokens),
//!   i.e. the input estimate plus `max_tokens` or
//!   [`RateLimitLayer::default_output_tokens`]) admit it, at one common
//!   slot. When the response body ends, the token reservation is
//!   reconciled with the real `usage` (see [`future::Reconcile`]).
//! * **GCRA, one atomic word per quota** ([`bucket`]): the decision is a
//!   compare-and-swap, no lock, no allocation. Costs above the burst are
//!   admitted when the bucket is full and leave a debt (never stuck,
//!   never an error for being big).
//! * **Reservations.** In [`Mode::Wait`] a call that must wait reserves its
//!   slot, so waiters go in FIFO order, each at its own instant (no
//!   thundering herd); a call whose slot is beyond `max_wait` fails at
//!   once with [`RateLimited`](error::RateLimited) and reserves nothing.
//!   Dropping a waiting call gives its slot back. [`Mode::Reject`] fails
//!   at once with the exact `retry_after` (gateways turn it into a 429).
//! * **Keys** ([`KeyFn`]): one limiter ([`Global`]), per model
//!   ([`ByModel`]), per (account, model) ([`ByAccountModel`], DashScope's
//!   own scope; keys of one account share its budget), per client key
//!   header ([`ByHeader`]), or any closure over the request head. Idle keys
//!   are evicted and the key count is capped
//!   ([`RateLimiterBuilder::max_keys`]); memory per key is
//!   [`RateLimiter::bytes_per_key`].
//! * **Slow start** ([`SlowStart`]): after idle, start at a fraction of the
//!   quota and ramp up linearly.
//! * **Feedback** ([`Feedback`]): when the upstream throttles a call we
//!   admitted, the key pauses (past the one-second window) and resumes at
//!   a lower rate that recovers over time. Logged with `tracing` and
//!   readable in a [`Snapshot`].
//! * **Quotas** ([`Quota`], [`Limits`]): governor-style constructors with
//!   `NonZero` arguments, and the Qwen defaults per model
//!   ([`qwen_defaults`], [`QuotaTable`]) with the burst that DashScope's
//!   per-second enforcement allows (see [`qwen_defaults`] for the
//!   arithmetic).
//!
//! # How it differs from tower's `RateLimit`
//!
//! tower's `RateLimit` counts requests in fixed windows, **per service
//! clone** (so users wrap it in a `Buffer` to share it), waits in
//! `poll_ready` (blocking every caller behind one), and knows nothing of
//! tokens, keys or the upstream's answers. Here every clone of the service
//! a layer makes shares one [`RateLimiter`]; the wait happens in the
//! response future, per call; and the limiter learns from the response.
//! Compared with governor, the decision is the same GCRA, plus weighted
//! reservations with FIFO waiting and give-back, two dimensions at once,
//! reconciliation, slow start and feedback.
//!
//! # With other layers
//!
//! Put it inside `Retry` and the circuit breaker (a retry must pass the
//! limiter again) and outside the concurrency limit and timeouts. Queues
//! inside it (a concurrency limit, a `Buffer`) can bunch calls that the
//! limiter spaced out. [`RateLimited`](error::RateLimited) is classified as
//! `Throttled { cause: Local, retry_after }`, so `Retry` waits for the slot
//! rather than hammering, and the breaker ignores it.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::num::NonZeroU32;
//! use std::time::Duration;
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::rate_limit::{Limits, Quota, RateLimitLayer, RateLimiter};
//! use tower_qwen::rate_limit::error::RateLimited;
//!
//! // 2 requests a second, no burst; 1,000 tokens a second, no burst.
//! let limits = Limits::requests(Quota::per_second(NonZeroU32::new(2).unwrap()).allow_burst(NonZeroU32::MIN))
//!     .and_tokens(Quota::per_second(NonZeroU32::new(1_000).unwrap()).allow_burst(NonZeroU32::MIN));
//! let limiter = RateLimiter::new(limits);
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(limiter.clone()).reject())
//!     .service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     });
//!
//! let req = || {
//!     http::Request::post("/compatible-mode/v1/chat/completions")
//!         .body(Full::new(Bytes::from_static(
//!             br#"{"model":"qwen-plus","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#,
//!         )))
//!         .unwrap()
//! };
//! assert!(svc.clone().oneshot(req()).await.is_ok());
//! // A clone shares the budget: the next call is refused, with the exact wait.
//! let err = svc.clone().oneshot(req()).await.unwrap_err();
//! let limited = err.downcast_ref::<RateLimited>().unwrap();
//! assert_eq!(limited.retry_after(), Some(Duration::from_millis(500)));
//! tokio::time::advance(Duration::from_millis(500)).await;
//! assert!(svc.oneshot(req()).await.is_ok());
//! assert_eq!(limiter.snapshot(&()).unwrap().requests.unwrap().remaining, 0);
//! # }
//! ```

pub mod bucket;
pub mod error;
pub mod future;
mod key;
mod layer;
mod limiter;
mod quota;
mod service;

pub use key::{Account, AccountModel, ByAccountModel, ByHeader, ByModel, Global, KeyFn};
pub use layer::{DEFAULT_MAX_WAIT, DEFAULT_OUTPUT_TOKENS, Mode, RateLimitLayer};
pub use limiter::{
    Admission, Cost, DimState, Feedback, RateLimiter, RateLimiterBuilder, Reservation, SlowStart,
    Snapshot,
};
pub use quota::{Limits, Quota, QuotaTable, qwen_defaults, qwen_limits};
pub use service::RateLimit;
