//! Fails calls fast while the upstream is broken, probes it back, and can
//! degrade to a low rate instead of failing; stream-aware and optionally
//! keyed.
//!
//! # What trips it
//!
//! Only [`Transient`](crate::classify::Outcome::Transient) outcomes count as
//! failures by default: 5xx, timeouts, connection resets, an SSE error frame
//! with `:HTTP_STATUS/500` half-way through a stream. A 429 storm does not
//! open the circuit (throttled calls are ignored: the upstream is healthy,
//! the quota is not — that is the rate limiter's and the retry layer's
//! business), and a 4xx counts as a success (the upstream answered; the
//! request was wrong). [`CircuitBreakerLayer::failure_if`] changes that.
//!
//! The circuit trips on either rule:
//! * **consecutive failures** (default 3);
//! * **failure rate** over a sliding window of the last N counted calls (a
//!   ring of outcome bits; default 50 % of the last 100, at least 20 calls).
//!
//! An optional slow-call rule counts successes whose time to first byte is
//! above a threshold as failures.
//!
//! # Open, half-open, degraded
//!
//! With [`TripAction::Open`] a tripped circuit fails calls fast with
//! [`error::CircuitOpen`] (carrying `retry_after`, the time until it probes)
//! for the open duration: 5 s, doubled for each trip in a row up to 60 s,
//! and shortened at random by up to 20 % (injectable [`Rng`]). Then it is
//! half-open: a bounded number of probes pass (default 1); the first success
//! closes it, a failure opens it again for longer. A probe whose caller gave
//! up (future or body dropped) frees its slot.
//!
//! With [`TripAction::Degrade`] a tripped circuit keeps admitting calls at a
//! low rate (default 5 per second; the rest fail fast with `CircuitOpen`,
//! whose `retry_after` is the wait for the next slot), logs one `warn` event
//! per entry into the degraded state, and once the open duration has passed
//! treats admitted calls as probes, exactly like half-open. This is the
//! source advice's "degrade a key to 5 QPS after 3 consecutive failures".
//!
//! [`Rng`]: crate::util::rng::Rng
//!
//! # Streams
//!
//! For `http::Response<B>`, the verdict is recorded when the response
//! **body** ends (through [`Classify::observe`](crate::classify::Classify)
//! and an [`OnEnd`](crate::body::OnEnd) hook, [`future::Record`]), not when
//! the head arrives: a stream that fails half-way is a failure, a body
//! nobody read of a 503 is a failure, a success whose caller stopped reading
//! counts as nothing.
//!
//! # How it differs from other breakers
//!
//! tower has no circuit breaker; `tower-resilience`'s decides on the
//! `Result` of the response future, so a 200 that carries an error, or a
//! stream that breaks after its head, counts as a success, and it cannot
//! degrade. Here the closed state costs a few atomic operations and no
//! allocation per call, every clone shares the circuit, and a keyed breaker
//! ([`CircuitBreakerLayer::keyed`]) keeps one circuit per upstream account,
//! key or model in a bounded map. [`BreakerHandle`] reads the state and
//! forces circuits open or closed; state changes are `tracing` events and an
//! optional callback ([`CircuitBreakerLayer::on_state_change`]). Breakers
//! that must agree (replicas of one service) share their state through
//! both: each publishes its trips' deadlines from the callback and applies
//! the others' with [`BreakerHandle::trip_key_until`] (the gateway does so
//! through Redis).
//!
//! # Interaction with other layers
//!
//! Put it inside the retry layer and outside the rate limiter (see the
//! crate's recommended order). An unkeyed breaker admits in `poll_ready`, so
//! a rejected call does not take a rate-limit token first. Errors from the
//! layers inside are classified by the crate's one classifier: a local
//! rate-limit or concurrency refusal is throttled (ignored), a timeout is
//! transient (counted). [`error::CircuitOpen`] is itself transient with
//! `retry_after` = time until the circuit probes, so a retry layer outside
//! waits that long (if its deadline allows) and a fallback layer can switch
//! to another model at once.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::time::Duration;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::circuit_breaker::{CircuitBreakerLayer, State, error::CircuitOpen};
//!
//! let breaker = CircuitBreakerLayer::new().jitter(0.0);
//! let handle = breaker.handle();
//! let svc = ServiceBuilder::new().layer(breaker).service(service_fn(|_req: http::Request<String>| async {
//!     let res = http::Response::builder().status(503).body(String::new()).unwrap();
//!     Ok::<_, std::convert::Infallible>(res)
//! }));
//!
//! for _ in 0..3 {
//!     let res = svc.clone().oneshot(http::Request::new(String::new())).await.unwrap();
//!     assert_eq!(res.status(), 503);
//! }
//! assert_eq!(handle.state(), State::Open);
//! let err = svc.clone().oneshot(http::Request::new(String::new())).await.unwrap_err();
//! let open = err.downcast_ref::<CircuitOpen>().unwrap();
//! assert_eq!(open.retry_after(), Some(Duration::from_secs(5)));
//! # }
//! ```

mod config;
pub mod error;
pub mod future;
mod layer;
mod service;
mod shared;
mod state;

pub use config::{FailureRate, TripAction};
pub use layer::CircuitBreakerLayer;
pub use service::CircuitBreaker;
pub use shared::BreakerHandle;
pub use state::{State, Transition};
