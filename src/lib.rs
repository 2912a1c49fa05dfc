//! Tower middleware that gets the most out of a Qwen (DashScope, Alibaba
//! Cloud Model Studio) quota: no 429 storms, no hung requests, no retry
//! avalanches, no lost work.
//!
//! DashScope limits each (root account, model) by requests and tokens per
//! minute, enforces both **per second** (RPM/60, TPM/60), adds a dynamic
//! "request rate increased too quickly" guard, and sends no `Retry-After`
//! or `x-ratelimit-*` headers. Errors hide in HTTP 200 bodies and in SSE
//! frames. Retrying harder makes all of it worse. tower-qwen puts admission
//! control, stream-aware limits and a DashScope-literate classifier in
//! front of any `Service<http::Request<B>>`: a hyper-util client, an axum
//! handler's upstream, a tonic channel.
//!
//! | module | what it does | feature |
//! |---|---|---|
//! | [`classify`] | one [`Outcome`](classify::Outcome) for every way DashScope reports trouble, and for every error of this crate's layers (teach it yours with [`on_error`](classify::Classifier::on_error)) | always |
//! | [`rate_limit`] | one layer over pluggable backends (memory, Redis, yours): GCRA for requests **and tokens** (reserve, then reconcile with real `usage`), token budgets per UTC day/month ([`Budget`](rate_limit::Budget)), keyed per (account, model), wait or reject, slow start, feedback, any request type | `rate-limit` |
//! | [`key`] | which bucket, circuit or account a request belongs to, for the limiter, the breaker, the pool and Redis | always |
//! | [`retry`] | retry what heals, never what can't, never a stream already flowing; cause-aware backoff, shared budget, deadlines | `retry` |
//! | [`timeout`] | time to headers, idle time between body frames, total deadline | `timeout` |
//! | [`concurrency`] | fixed or adaptive (AIMD) limit held until a streamed body ends; FIFO, bounded waiting | `concurrency` |
//! | [`circuit_breaker`] | fail fast or degrade to a low rate; half-open probes; keyed | `circuit-breaker` |
//! | [`fallback`] | on throttling or an open circuit, ask the next model of a chain | `fallback` |
//! | [`coalesce`] | merge single-text embedding calls into batched requests | `coalesce` |
//! | [`pool`] | spread load over several accounts (quotas are per account) by their headroom in any backend; key rotation, pinning | `pool` |
//! | [`batch`] | work that can wait goes through the Batch API: half price, no real-time quota; routing by urgency | `batch` |
//! | [`client`] | the tuned hyper-util + rustls client, endpoints, keys, and the whole stack as [`QwenClient`](client::QwenClient) | `client` |
//! | [`gateway`] | a ready axum proxy: per-key buckets, tokens per minute and token budgets per day/month, 429 + `Retry-After`, degradation, metrics | `gateway` |
//! | [`telemetry`] | one span per call with the OpenTelemetry GenAI attributes (operation, provider, models, tokens, finish reasons, time to first chunk, `error.type`), held until the body ends; with `otel`, the `gen_ai.client.*` metrics over OTLP | always (`otel` for OpenTelemetry) |
//! | [`redis`] | a rate-limit backend: the same GCRA decision in Redis, batched, shared by many replicas | `redis` |
//! | [`mock`] | a faithful mock DashScope server for tests, benches, demos and agent test suites (tools, JSON mode, thinking, scripted decisions and faults) | `mock` |
//!
//! # Order
//!
//! The recommended stack, outermost first:
//!
//! ```text
//! fallback → retry (budget) → circuit_breaker → coalesce → rate_limit → concurrency → timeout → client
//! ```
//!
//! * **retry outside everything else**, so each attempt passes the breaker
//!   and the limiter again, and the budget bounds the total;
//! * **the breaker outside the limiter**, so a call refused fast does not
//!   spend a rate-limit slot;
//! * **coalesce outside the limiter and the concurrency limit**, so those
//!   count the merged upstream calls, not the callers;
//! * **the concurrency limit inside the rate limiter**: calls wait for
//!   their rate slot without holding a connection-bound permit; the permit
//!   is then held until the response body ends;
//! * **timeouts innermost**, per attempt.
//!
//! With several accounts, a [`pool`] goes right inside retry and holds one
//! stack per account (circuit breaker → rate limit → concurrency → timeout)
//! over a shared client, so a retry can land on another account.
//!
//! [`client::QwenClient`] builds exactly this with Qwen defaults.
//!
//! The layers stack with no `map_err` in between: a layer that adds
//! failures answers with a [`BoxError`] whose value classifies itself, and
//! one that adds none keeps its inner error. With a fallback outermost, a
//! request that a local limit or an open circuit refuses moves to the next
//! model at once (see [`fallback`]).
//!
//! # Example
//!
//! ```
//! # #[cfg(not(all(feature = "client", feature = "mock")))] fn main() {}
//! # #[cfg(all(feature = "client", feature = "mock"))]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_qwen::BoxError> {
//! use std::num::NonZeroUsize;
//! use std::time::Duration;
//! use http_body_util::BodyExt;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::client::{ApiKey, ChatRequest, SetUpstreamLayer, TransportConfig};
//! use tower_qwen::{circuit_breaker, concurrency, rate_limit, retry, timeout};
//!
//! // A mock DashScope on loopback (a real base URL works the same way).
//! let mock = tower_qwen::mock::MockDashScope::builder().key("sk-demo", "acct").start().await?;
//!
//! let client = ServiceBuilder::new()
//!     .layer(retry::RetryLayer::new())
//!     .layer(circuit_breaker::CircuitBreakerLayer::new())
//!     .layer(rate_limit::RateLimitLayer::qwen(rate_limit::QuotaTable::qwen(), tower_qwen::key::ByAccountModel::new()))
//!     .layer(concurrency::ConcurrencyLimitLayer::new(NonZeroUsize::new(20).unwrap()))
//!     .layer(timeout::TimeoutLayer::new())        // 60 s idle between frames, 300 s in all
//!     .layer(SetUpstreamLayer::new(mock.base_url().parse()?, ApiKey::new("sk-demo")?))
//!     .service(TransportConfig::new().build());
//!
//! // The stack is `Clone + Send + Sync`, its futures `Send`: run calls in
//! // any task (or an axum handler).
//! let req = ChatRequest::new("qwen-plus").user("Hello").into_request();
//! let res = tokio::spawn(client.clone().oneshot(req)).await??;
//! assert_eq!(res.status(), 200);
//! let body = res.into_body().collect().await?.to_bytes();
//! assert!(body.starts_with(b"{"));
//! # Ok(()) }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | enables |
//! |---|---|---|
//! | `rate-limit` | yes | [`rate_limit`] |
//! | `retry` | yes | [`retry`] |
//! | `timeout` | yes | [`timeout`] |
//! | `concurrency` | yes | [`concurrency`] |
//! | `circuit-breaker` | yes | [`circuit_breaker`] |
//! | `fallback` | no | [`fallback`] (pulls `retry`) |
//! | `coalesce` | no | [`coalesce`] |
//! | `pool` | no | [`pool`] |
//! | `batch` | no | [`batch`]: the Batch API service, its stores, the urgency router |
//! | `client` | yes | [`client`]: hyper-util, hyper-rustls (ring), and the default layers |
//! | `mock` | yes | [`mock`]: axum + hyper server (for your tests, and the demo) |
//! | `gateway` | no | [`gateway`]: axum, metrics, TOML config |
//! | `redis` | no | [`redis`]: the `redis` crate with its tokio connection manager |
//! | `otel` | no | [`telemetry::otel`]: the GenAI metrics and spans with `opentelemetry`, exported over OTLP (HTTP + protobuf) |
//! | `full` | no | all of the above |
//! | `demo` | no | the demo program (`cargo run --release --features demo --bin demo`): `client`, `mock`, `clap`, `plotters` and tower's own layers to compare with; not part of `full` |
//!
//! For a lean build, `default-features = false` and pick: each feature
//! builds alone. The core ([`classify`], [`body`], [`key`], [`request`], [`sse`],
//! [`usage`], [`tokens`], [`time`], and [`telemetry`]'s `tracing` spans) is always there and depends only on
//! `http`, `http-body`, `tokio` (time), `serde_json` and `tracing` (the
//! keyed store behind [`key`] adds `dashmap` with `rate-limit` or
//! `circuit-breaker`).
//!
//! # Time and determinism
//!
//! Every clock read goes through [`time::now`], tokio's clock, and every
//! wait through tokio's timer, so tests run with
//! `#[tokio::test(start_paused = true)]` and never sleep. Jitter comes from
//! an injectable [`util::rng::Rng`].
//!
//! # MSRV
//!
//! Rust 1.88 (edition 2024). Raising it is a minor-version change.

#![forbid(unsafe_code)]
#![warn(
    missing_docs,
    missing_debug_implementations,
    rust_2018_idioms,
    unreachable_pub
)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod body;
pub mod builder;
pub mod classify;
pub mod key;
pub mod request;
pub mod sse;
pub mod telemetry;
pub mod time;
pub mod tokens;
pub mod usage;
pub mod util;

#[cfg(feature = "batch")]
#[cfg_attr(docsrs, doc(cfg(feature = "batch")))]
pub mod batch;
#[cfg(feature = "circuit-breaker")]
#[cfg_attr(docsrs, doc(cfg(feature = "circuit-breaker")))]
pub mod circuit_breaker;
#[cfg(feature = "client")]
#[cfg_attr(docsrs, doc(cfg(feature = "client")))]
pub mod client;
#[cfg(feature = "coalesce")]
#[cfg_attr(docsrs, doc(cfg(feature = "coalesce")))]
pub mod coalesce;
#[cfg(feature = "concurrency")]
#[cfg_attr(docsrs, doc(cfg(feature = "concurrency")))]
pub mod concurrency;
#[cfg(feature = "fallback")]
#[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
pub mod fallback;
#[cfg(feature = "gateway")]
#[cfg_attr(docsrs, doc(cfg(feature = "gateway")))]
pub mod gateway;
#[cfg(feature = "pool")]
#[cfg_attr(docsrs, doc(cfg(feature = "pool")))]
pub mod pool;
#[cfg(feature = "rate-limit")]
#[cfg_attr(docsrs, doc(cfg(feature = "rate-limit")))]
pub mod rate_limit;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub mod redis;
#[cfg(feature = "retry")]
#[cfg_attr(docsrs, doc(cfg(feature = "retry")))]
pub mod retry;
#[cfg(feature = "timeout")]
#[cfg_attr(docsrs, doc(cfg(feature = "timeout")))]
pub mod timeout;

#[cfg(feature = "mock")]
#[cfg_attr(docsrs, doc(cfg(feature = "mock")))]
pub mod mock;

/// Alias for a type-erased error type.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The README's code blocks, compiled as doctests so they stay true (they
/// use the client and, for the one limiter with two backends, Redis).
#[cfg(all(doctest, feature = "client", feature = "redis"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
