//! Distributed rate limits on Redis: many replicas share one account's
//! quota.
//!
//! DashScope's quota belongs to the account, so N gateway replicas (or N
//! services) each running the in-memory [`RateLimiter`] would send N times
//! the quota. [`RedisLimiter`] is a rate-limit [`Backend`] that keeps the
//! state in Redis instead: put it in the one
//! [`RateLimitLayer`] (the same key functions, the same [`Mode`]s, the same
//! token estimate, reconciliation from the response's `usage` and feedback
//! from upstream throttles, and the same error,
//! [`RateLimited`](crate::rate_limit::error::RateLimited)), or call it
//! directly ([`RedisLimiter::check`], [`RedisLimiter::reserve`]). It is
//! built by the one rate limiter builder, the in-memory limiter's:
//! [`RateLimiter::builder(limits)`](crate::rate_limit::RateLimiter::builder)
//! sets what both backends share, [`.redis(conn)`](crate::rate_limit::RateLimiterBuilder::redis)
//! chooses Redis and its own settings ([`RedisStore`]). [`RedisBudget`],
//! token budgets in Redis, comes from
//! [`Budget::builder().redis(conn)`](crate::rate_limit::BudgetBuilder::redis)
//! the same way.
//!
//! * **Atomic scripts, batched** (Lua, in `src/redis/script.rs`): the
//!   in-memory GCRA operation for operation (a weighted cost in the
//!   request and token dimensions booked at one common slot, reservations
//!   up to a maximum wait with give-back, refunds and overruns with the
//!   same safety rules), run with `EVALSHA` (falling back to `EVAL`, which
//!   also caches it). A property test checks that the script and the
//!   in-memory core decide alike, to the nanosecond, for the same arrivals.
//!   Operations waiting at the same moment (decisions of concurrent calls,
//!   for one key or many, give-backs, reconciliations) go in **one script
//!   call**, each key read and written once: with one caller a decision is
//!   one round trip, with many a round trip carries many exact decisions
//!   (`cargo bench --bench redis`, see `BENCHMARKS.md`: on a shared key,
//!   more decisions per second than the usual `INCR` + `PEXPIRE` limiter;
//!   with a key per caller, about 0.6x of it exact and 5x with a lease).
//! * **Keys** are the limiter's keys written with [`StoreKey`] under a
//!   prefix; each is one 56-byte string that expires when its buckets
//!   would be full again (plus a slack), so idle keys vanish. Redis 6.0 or
//!   later.
//! * **One clock.** By default the script reads Redis's `TIME`
//!   ([`Clock::Server`]), so replicas whose clocks differ still decide on
//!   one clock; a wait is counted locally from when the answer arrived
//!   (late by at most one network latency, never early). [`Clock::Local`]
//!   passes the caller's tokio time instead, for tests and one-process use.
//! * **Failure policy** ([`FailurePolicy`]): every Redis call has its own
//!   timeout ([`timeout`](crate::rate_limit::RateLimiterBuilder::timeout), queueing included); when
//!   Redis fails or is slow, the limiter fails open to an in-memory limiter
//!   at `1/N` of the quota (`N` replicas) or fails closed with
//!   [`StoreUnavailable`](error::StoreUnavailable). While Redis is down,
//!   one call per [`probe_every`](crate::rate_limit::RateLimiterBuilder::probe_every) tries
//!   it again (the others do not wait for it), and the first success
//!   switches back. Each transition is a `tracing::warn!`. Connections are
//!   the `redis` crate's tokio [`ConnectionManager`], which reconnects on
//!   its own ([`manager_config`], [`connect_lazy`]).
//! * **Leases** ([`Lease`], optional): book a small slice of budget with a
//!   round trip that happens anyway and spend it locally, so most calls
//!   need no round trip. The overshoot across all replicas is bounded by
//!   `slice + rate × ttl` per quota (see [`Lease`] for the proof).
//!
//! # How it differs
//!
//! From the in-memory backend: a decision costs a round trip (shared with
//! the other calls of the moment, or none with a lease); slow start and
//! the reduced-rate recovery after a throttle are not replicated (a
//! throttle pauses the key for every replica, except a lone quota throttle,
//! judged from what this replica has seen, which pauses nothing; see
//! [`Feedback`](crate::rate_limit::Feedback) and the
//! [rate limiter's docs](crate::rate_limit#the-backends) for why); a
//! waiter keeps its slot when another replica pauses the key; snapshots
//! are this replica's view as of its last round trip for the key. From a
//! fixed-window `INCR` + `EXPIRE` counter (the usual Redis limiter): no
//! double burst at window edges, weighted costs, waiting in FIFO order
//! with exact slots, and refunds. From redis-cell: no server module to
//! install, two dimensions at once, reservations and refunds.
//!
//! This module talks to one Redis (a primary) through a
//! [`ConnectionManager`]; a batch touches several keys, so a Redis Cluster
//! would need them in one hash slot. After a failover to an asynchronously
//! replicated Redis, the last decisions may be lost: a brief overshoot, at
//! most what was admitted during the replication lag.
//!
//! Unknown API keys are keyed by a hash of the secret in
//! [`ByAccountModel`](crate::key::ByAccountModel) and
//! [`ByHeader`](crate::key::ByHeader) that is the same in every
//! replica running the same build (see [`StoreKey`]); name accounts when
//! replicas of different versions must share a limit.
//!
//! # With other layers
//!
//! As with the in-memory backend: inside `Retry` and the circuit breaker,
//! outside the concurrency limit and timeouts.
//! [`StoreUnavailable`](error::StoreUnavailable) is classified as
//! transient (with the time until Redis is tried again), so a retry waits
//! and a breaker outside it counts it.
//!
//! # Example
//!
//! Three replicas (three limiters with their own connections) share 2
//! requests per hour:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! # use std::io::BufRead;
//! # let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
//! # let mut server = std::process::Command::new("redis-server")
//! #     .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
//! #     .stdout(std::process::Stdio::piped())
//! #     .spawn()
//! #     .expect("redis-server is installed");
//! # let mut out = std::io::BufReader::new(server.stdout.take().unwrap());
//! # let mut line = String::new();
//! # while out.read_line(&mut line).unwrap() > 0 && !line.contains("Ready to accept") { line.clear(); }
//! # let url = format!("redis://127.0.0.1:{port}");
//! use std::num::NonZeroU32;
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::rate_limit::{Limits, Quota, RateLimiter};
//! use tower_qwen::rate_limit::error::RateLimited;
//! use tower_qwen::rate_limit::RateLimitLayer;
//! use tower_qwen::redis::{FailurePolicy, connect_lazy};
//!
//! let limits = Limits::requests(Quota::per_hour(NonZeroU32::new(2).unwrap()));
//! let replica = || {
//!     let conn = connect_lazy(&url, None).unwrap();
//!     // The one rate limiter builder; `redis` picks the backend.
//!     let limiter = RateLimiter::builder(limits)
//!         .redis(conn)
//!         .prefix("example:")
//!         .on_failure(FailurePolicy::fail_open(NonZeroU32::new(3).unwrap()))
//!         .build();
//!     ServiceBuilder::new()
//!         .layer(RateLimitLayer::new(limiter).reject())
//!         .service_fn(|_req: http::Request<Full<Bytes>>| async {
//!             Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
//!         })
//! };
//! let (a, b, c) = (replica(), replica(), replica());
//! let req = || http::Request::new(Full::new(Bytes::new()));
//! assert!(a.oneshot(req()).await.is_ok());
//! assert!(b.oneshot(req()).await.is_ok());
//! // The third replica finds the shared budget spent.
//! let err = c.oneshot(req()).await.unwrap_err();
//! assert!(err.downcast_ref::<RateLimited>().unwrap().retry_after().unwrap().as_secs() > 1700);
//! # server.kill().unwrap();
//! # server.wait().unwrap();
//! # }
//! ```
//!
//! [`RateLimiter`]: crate::rate_limit::RateLimiter
//! [`RateLimiterBuilder`]: crate::rate_limit::RateLimiterBuilder
//! [`RateLimiterBuilder::redis`]: crate::rate_limit::RateLimiterBuilder::redis
//! [`RateLimitLayer`]: crate::rate_limit::RateLimitLayer
//! [`Backend`]: crate::rate_limit::Backend
//! [`StoreKey`]: crate::key::StoreKey
//! [`Mode`]: crate::rate_limit::Mode
//! [`ConnectionManager`]: ::redis::aio::ConnectionManager

mod batch;
mod budget;
pub mod error;
mod fallback;
mod lease;
mod limiter;
mod script;
mod store;

pub use budget::{RedisBudget, RedisBudgetPermit};
pub use fallback::FailurePolicy;
pub use lease::Lease;
pub use limiter::{
    Clock, Pending, RedisLimiter, RedisPermit, RedisTicket, Stats, connect_lazy, manager_config,
};
pub use store::{DEFAULT_TIMEOUT, RedisStore};
