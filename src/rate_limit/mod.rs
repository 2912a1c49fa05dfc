//! Rate limiting for requests **and tokens**: one layer over pluggable
//! backends (in memory, Redis, your own), keyed, with wait and reject
//! modes, slow start and feedback from the upstream's throttles, for any
//! request type.
//!
//! DashScope limits each (root account, model) by requests per minute and
//! tokens per minute, both also enforced per second, plus a growth guard
//! ("Request rate increased too quickly"), and sends no `Retry-After` or
//! `x-ratelimit-*` headers. Retrying 429s harder makes it worse; the cure is
//! admission control before the request leaves. [`RateLimit`] does that:
//!
//! * **One layer, several backends.** The layer owns admission, FIFO
//!   waiting, give-back on cancel, token reservation and reconciliation at
//!   the body's end, the wait and reject modes; a [`Backend`] decides and
//!   stores. [`RateLimiter`] decides in memory, at once, with no future;
//!   [`RedisLimiter`](crate::redis::RedisLimiter) decides in Redis so that
//!   replicas share one quota; implement [`Backend`] for a third. One
//!   builder makes either: [`RateLimiter::builder`] takes the settings
//!   the backends share (feedback, key bound, sweep) once, and builds in
//!   memory, or on Redis after
//!   [`redis`](RateLimiterBuilder::redis); token budgets likewise from
//!   [`Budget::builder`].
//! * **Any request type.** A key function ([`key`](crate::key): global,
//!   by model, by (account, model), by header, or a closure) and a cost
//!   function ([`CostOf`]: [`Estimate`] for DashScope HTTP requests,
//!   [`PerCall`], or a closure) make it a layer for a tonic channel or a
//!   plain `service_fn` as well as for `http::Request` (with an
//!   [`FnClassifier`](crate::classify::FnClassifier) reading your response
//!   type). Token reconciliation reads the `usage` of HTTP bodies; with
//!   other response types a token estimate stands, unless you reconcile by
//!   hand with a backend's [`Reservation`] and [`Admission`].
//! * **Two dimensions.** A call passes only when both the request quota
//!   (cost 1) and the token quota (cost = the request's estimate:
//!   [`RequestInfo::estimated_tokens`](crate::request::RequestInfo::estimated_tokens),
//!   i.e. the input estimate plus `max_tokens` or
//!   [`RateLimitLayer::default_output_tokens`]) admit it, at one common
//!   slot. When the response body ends, the token reservation is
//!   reconciled with the real `usage` (see [`future::Reconcile`]).
//! * **GCRA, one atomic word per quota** ([`bucket`]): the in-memory
//!   decision is a compare-and-swap, no lock, no allocation. Costs above
//!   the burst are admitted when the bucket is full and leave a debt (never
//!   stuck, never an error for being big).
//! * **Reservations.** In [`Mode::Wait`] a call that must wait reserves its
//!   slot, so waiters go in FIFO order, each at its own instant (no
//!   thundering herd); a call whose slot is beyond `max_wait` fails at
//!   once with [`RateLimited`](error::RateLimited) and reserves nothing.
//!   Dropping a waiting call gives its slot back. [`Mode::Reject`] fails
//!   at once with the exact `retry_after` (gateways turn it into a 429).
//! * **Fair share** ([`fair`], [`RateLimitLayer::fair`]): the waiting
//!   calls of a key can instead be ordered by flow (a tenant, a client key)
//!   and weight, so that a saturated quota is shared by weight, a flow
//!   alone gets all of it, and a flow that floods does not delay the
//!   others; only the call whose turn it is books its slot.
//! * **Bounded keys.** Idle keys are evicted and the key count is capped
//!   ([`RateLimiterBuilder::max_keys`]); a request-only key takes one
//!   `u64` of state ([`RateLimiter::bytes_per_key`]).
//! * **Slow start** ([`SlowStart`]): after idle, start at a fraction of the
//!   quota, hold it, and grow it by the same ratio every second.
//! * **Feedback** ([`Feedback`]): when the upstream throttles a call we
//!   admitted, the key pauses (past the one-second window) and resumes at
//!   a lower rate that recovers over time, the calls already waiting
//!   re-paced at it; a lone throttle of the key's own
//!   quota (timing jitter at the upstream's window boundary, not a wrong
//!   quota) only lowers the rate a step (2%), with no pause. Logged with
//!   `tracing` and readable in a [`Snapshot`].
//! * **Token budgets** ([`Budget`], [`budget`]): tokens per UTC day and
//!   month per key, a fixed-window backend for the same layer (reserve the
//!   estimate, reconcile at the body's end), refusing with
//!   [`BudgetExceeded`](error::BudgetExceeded) until the window resets.
//! * **Quotas** ([`Quota`], [`Limits`]): governor-style constructors with
//!   `NonZero` arguments, and the Qwen defaults per model
//!   ([`QuotaTable::qwen`], the one source of them) with the burst that
//!   DashScope's per-second enforcement allows.
//!
//! # The backends
//!
//! | | [`RateLimiter`] (memory) | [`RedisLimiter`](crate::redis::RedisLimiter) |
//! |---|---|---|
//! | built by | `RateLimiter::builder(limits)` ... `.build*()` | the same builder, `.redis(conn)` ... `.build*()` |
//! | shared by | the clones in one process | every replica on the Redis |
//! | a decision | a CAS, no future | a script call (batched), or a local lease |
//! | two dimensions, FIFO slots, give-back, reconciliation | yes | yes (the same arithmetic, property-tested) |
//! | pause on an upstream throttle | yes (none for a lone quota throttle) | yes, for every replica (none for a lone quota throttle, judged per replica) |
//! | reduced-rate recovery after a throttle, slow start | yes | no (see below) |
//! | snapshots (`x-ratelimit-*`, the pool's pick) | exact | this replica's view as of its last round trip for the key |
//!
//! The Redis backend lacks the two rate *ramps* (slow start, and recovery
//! at a reduced rate after a throttle) on purpose: a ramp changes the time
//! charge of every call (`units × interval / rate`), which the script
//! would compute in Lua's doubles, inexactly above 2^53 ns, and the two
//! backends would no longer decide alike to the nanosecond (the property
//! `tests/redis` checks). The pause itself is exact and replicated. A
//! builder given a [`slow_start`](RateLimiterBuilder::slow_start) is a
//! [`RateLimiterBuilder<InMemorySlowStart>`], which has no `redis`: asking
//! for both does not compile, rather than losing the slow start.
//!
//! # How it differs from tower's `RateLimit`
//!
//! tower's `RateLimit` counts requests in fixed windows, **per service
//! clone** (so users wrap it in a `Buffer` to share it), waits in
//! `poll_ready` (blocking every caller behind one), and knows nothing of
//! tokens, keys or the upstream's answers. Here every clone of the service
//! a layer makes shares one backend; the wait happens in the response
//! future, per call; and the limiter learns from the response. Compared
//! with governor, the decision is the same GCRA, plus weighted
//! reservations with FIFO waiting and give-back, two dimensions at once,
//! reconciliation, slow start, feedback, and a distributed backend.
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
//!
//! Any request type: a key and a cost function over a plain `service_fn`.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::num::NonZeroU32;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::classify::{FnClassifier, Outcome};
//! use tower_qwen::key::key_fn;
//! use tower_qwen::rate_limit::{Cost, Limits, Quota, RateLimitLayer, RateLimiter};
//!
//! // A job queue: jobs are (user, weight); each user may spend 10 weight
//! // units a minute.
//! let limiter = RateLimiter::builder(Limits::tokens(Quota::per_minute(NonZeroU32::new(10).unwrap())))
//!     .build_keyed();
//! let svc = ServiceBuilder::new()
//!     .layer(
//!         RateLimitLayer::keyed(limiter, key_fn(|job: &mut (&'static str, u32)| job.0))
//!             .cost(|job: &mut (&'static str, u32)| Cost::new(0, job.1))
//!             .classifier(FnClassifier::new(|_: &u32| Outcome::Success))
//!             .reject(),
//!     )
//!     .service(service_fn(|job: (&'static str, u32)| async move { Ok::<_, std::convert::Infallible>(job.1) }));
//!
//! assert_eq!(svc.clone().oneshot(("ann", 8)).await.unwrap(), 8);
//! assert!(svc.clone().oneshot(("ann", 8)).await.is_err()); // ann has 2 left
//! assert_eq!(svc.oneshot(("bob", 8)).await.unwrap(), 8);
//! # }
//! ```

mod backend;
pub mod bucket;
pub mod budget;
pub mod error;
pub mod fair;
pub mod future;
mod layer;
mod limiter;
mod quota;
mod service;

pub use backend::{Admission, Backend, Decision, Immediate, Permit, Reservation, Ticket};
#[cfg(feature = "gateway")]
pub(crate) use budget::Tightest;
pub use budget::{
    Budget, BudgetBuilder, BudgetLimits, BudgetPermit, BudgetStore, BudgetTicket, Period, WallClock,
};
#[cfg(feature = "redis")]
pub(crate) use budget::{Window, refusal, windows};
pub use layer::{
    CostOf, DEFAULT_MAX_WAIT, DEFAULT_OUTPUT_TOKENS, Estimate, Mode, PerCall, RateLimitLayer,
};
pub use limiter::{
    Cost, DimState, Feedback, InMemory, InMemorySlowStart, LimiterStore, MemoryPermit,
    MemoryTicket, RateLimiter, RateLimiterBuilder, SlowStart, Snapshot,
};
#[cfg(feature = "redis")]
pub(crate) use limiter::{dim_state, judge_throttle, sealed};
pub use quota::{Limits, Quota, QuotaTable, qwen_limits};
pub use service::RateLimit;
