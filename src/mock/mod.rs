//! A faithful mock of DashScope (Qwen / Model Studio) on loopback, for tests,
//! benchmarks and demos.
//!
//! [`MockDashScope::builder`] starts a real HTTP/1 server (axum routing on
//! hyper, on `127.0.0.1` and a random port) that speaks both wire dialects
//! the way QWEN-API.md describes them, enforces per-account quotas, and
//! injects faults on demand, deterministically for a seed. Unlike a
//! `tower-test` mock service, it exercises the whole client path: TCP,
//! pooling, timeouts, body streaming and connection resets.
//!
//! # Endpoints
//!
//! | path | what |
//! |---|---|
//! | `POST /api/v1/services/aigc/text-generation/generation` | native chat (`result_format` `text` or `message`) |
//! | `POST /api/v1/services/aigc/multimodal-generation/generation` | native multimodal (content as `[{"text":..}]`) |
//! | `POST /compatible-mode/v1/chat/completions` | OpenAI-compatible chat |
//! | `POST /api/v1/services/embeddings/text-embedding/text-embedding` | native embeddings |
//! | `POST /compatible-mode/v1/embeddings` | compatible embeddings |
//! | `POST /api/v1/services/{group}/{task}/{function}` with `X-DashScope-Async: enable` | async task submission (image synthesis and the like) |
//! | `GET /api/v1/tasks/{id}`, `POST /api/v1/tasks/{id}/cancel` | task poll and cancel |
//!
//! Every answer carries the request id in an `x-request-id` header and in
//! the body (`request_id` natively, `id: "chatcmpl-<id>"` compatibly).
//!
//! **Streaming.** Native streaming is asked for with `X-DashScope-SSE:
//! enable` or `Accept: text/event-stream`, compatible streaming with
//! `"stream": true` (the mock decides with
//! [`RequestInfo::parse`](crate::request::RequestInfo::parse), as the
//! client-side layers do). Native frames are
//! `id:N\nevent:result\n:HTTP_STATUS/200\ndata:{..}\n\n`, one per output
//! token, with cumulative `usage` on every frame, `finish_reason` the string
//! `"null"` until the last frame, no `[DONE]`; `parameters.incremental_output`
//! chooses deltas (`true`) or cumulative text (`false`, the default).
//! Compatible frames are `data: {chat.completion.chunk}\n\n`: a role chunk,
//! one content delta per token, a chunk with the `finish_reason`, with
//! `stream_options.include_usage` a tail chunk with `"choices":[]` and
//! `usage` (earlier chunks then carry `"usage":null`), then `data: [DONE]`.
//!
//! **Tokens.** Input tokens are exactly
//! `RequestInfo::parse(path, &headers, Some(body)).input_tokens` (see
//! [`crate::tokens`]), so a client-side estimate and the mock agree.
//! Output tokens are the configured count
//! ([`MockDashScopeBuilder::output_tokens`], default 20) capped by
//! `max_tokens` / `max_completion_tokens` / `parameters.max_tokens`, with
//! `finish_reason` `"length"` when the cap cut it short and `"stop"`
//! otherwise. The reply text is built of four-byte ASCII pieces, so its
//! token estimate equals the reported output tokens. Embeddings have no
//! output tokens; their vectors are deterministic unit vectors of the
//! requested dimension (`parameters.dimension` / `dimensions`, default
//! 1024), the same for the same text.
//!
//! **Auth and accounts.** `Authorization: Bearer <key>` is required; each
//! key belongs to an account ([`MockDashScopeBuilder::key`]), and quotas
//! belong to (account, model), so keys of one account share them. A missing
//! or unknown key gets `401 InvalidApiKey` "Invalid API-key provided."
//! (compatible: `invalid_api_key` "Incorrect API key provided."). With no key
//! configured the mock accepts [`MockDashScope::DEFAULT_KEY`]. A key's
//! [`AccountState`] turns every call into the matching permanent error.
//!
//! **Validation.** Bodies over the size cap get `413`, non-JSON or
//! wrongly-typed bodies `400 InvalidParameter` (compatible
//! `invalid_parameter_error`), a missing model `400 BadRequest.EmptyModel`,
//! a model outside the optional allow-list `404 Model.NotExist`
//! (`model_not_found`), a stream-only model called without streaming the
//! `400` "This model only support stream mode…", more texts than the
//! model's embedding batch limit (10 for `text-embedding-v3`/`v4`, 25 for
//! `v1`/`v2`) `400` "batch size is invalid…". `X-DashScope-Async: enable` on
//! text or multimodal generation is refused with `403 AccessDenied`
//! "current user api does not support asynchronous calls", as DashScope
//! does; a task API called without it gets "…does not support synchronous
//! calls".
//!
//! # Quotas
//!
//! Each (account, model) has a [`Quota`] (per model, else the default):
//! RPM and TPM, each also enforced per second (RPS = ceil(RPM/60), TPS =
//! ceil(TPM/60)), over per-second buckets: a one-second window and a sliding
//! 60-second window. The clock is tokio's, counted in whole seconds since
//! the server started, so `tokio::time::advance` moves the windows.
//!
//! A request is admitted while every window holds **fewer** requests (or
//! tokens) than its limit; a request's own tokens (input + output, both
//! known when it arrives) may take a window past the token limit, and are
//! charged to the second in which it was admitted. Refused requests charge
//! nothing. Checks run in this order and answer:
//!
//! 1. RPS, then RPM: `429 Throttling.RateQuota` (compatible `limit_requests`);
//! 2. the optional [`BurstGuard`]: `429 Throttling.BurstRate` (compatible
//!    `limit_burst_rate`);
//! 3. TPS, then TPM: `429 Throttling.AllocationQuota` (compatible
//!    `insufficient_quota`).
//!
//! Throttled streams get a real `429`; with
//! [`FaultPlan::throttled_stream_as_sse`] a native stream may instead get a
//! `200` event stream whose first frame is `event:error` with
//! `:HTTP_STATUS/429`. Task submissions count one request and no tokens;
//! task polls are not limited.
//!
//! # Faults and determinism
//!
//! A [`FaultPlan`] (global, or per model) gives each admitted request a
//! chance of one [`Fault`] (5xx answers, connection resets before or in the
//! middle of the body, stalls, `200` with an error body, in-stream error
//! frames, streams cut short) and a [`Latency`]. All randomness comes from a
//! [`SeededRng`](crate::util::rng::SeededRng) seeded with
//! [`MockDashScopeBuilder::seed`] and the request's arrival number, so a
//! given seed and request order always produce the same faults, delays and
//! request ids. All waits use tokio's timer, so tests run under
//! `#[tokio::test(start_paused = true)]`.
//!
//! # Counters
//!
//! [`MockHandle::stats`] returns [`Stats`]: requests, answers by status and
//! by code, tokens charged, requests in flight and their peak, calls and
//! admissions per model, streams started / completed / cancelled, resets.
//!
//! # Not modelled (yet)
//!
//! Real token counts (the estimate is deterministic, not Qwen's tokenizer);
//! model output (the text is a fixed filler); tool calls, `n > 1`,
//! `logprobs`, reasoning content, search and other parameters (accepted and
//! ignored); cached-token discounts; HTTP/2 and TLS; the Anthropic-compatible
//! and websocket APIs; the Batch, Files and task-list APIs; task failures
//! and per-task results beyond one placeholder URL; DashScope's own rate
//! limits on task polling; region-specific keys; the exact dynamic rule of
//! the real burst guard (DashScope does not publish it; [`BurstGuard`] is a
//! documented stand-in, off by default); output-token billing of cancelled
//! streams (a request is charged in full when admitted).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::num::{NonZeroU32, NonZeroU64};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use tower_qwen::mock::{MockDashScope, Quota};
//!
//! let mock = MockDashScope::builder()
//!     .key("sk-test", "account-1")
//!     .quota(
//!         "qwen-plus",
//!         Quota::new(NonZeroU32::new(600).unwrap(), NonZeroU64::new(1_000_000).unwrap()),
//!     )
//!     .start()
//!     .await?;
//!
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let req = http::Request::post(format!("{}/compatible-mode/v1/chat/completions", mock.base_url()))
//!     .header("authorization", "Bearer sk-test")
//!     .header("content-type", "application/json")
//!     .body(Full::from(
//!         r#"{"model":"qwen-plus","messages":[{"role":"user","content":"Hello, world"}]}"#,
//!     ))?;
//! let res = client.request(req).await?;
//! assert_eq!(res.status(), 200);
//! assert!(res.headers().contains_key("x-request-id"));
//! let body: serde_json::Value =
//!     serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
//! // "Hello, world" is 3 tokens, plus 4 for the message.
//! assert_eq!(body["usage"]["prompt_tokens"], 7);
//! assert_eq!(body["usage"]["completion_tokens"], 20);
//! assert_eq!(mock.stats().status(200), 1);
//! mock.shutdown().await;
//! # Ok(())
//! # }
//! ```

mod body;
mod config;
mod error;
mod handlers;
mod quota;
mod server;
mod state;
mod stats;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::config::{AccountState, BurstGuard, Dist, Fault, FaultPlan, Latency, Quota};
pub use self::error::ApiError;
pub use self::stats::Stats;

use self::state::{Config, KeyEntry, Shared};

/// The mock DashScope server. See the [module docs](self) for an example.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct MockDashScope;

impl MockDashScope {
    /// The API key accepted (in account `"default"`) while no key is
    /// configured.
    pub const DEFAULT_KEY: &'static str = state::DEFAULT_KEY;

    /// A builder with the defaults: the [`DEFAULT_KEY`](Self::DEFAULT_KEY),
    /// no quota, no burst guard, no faults, seed 0.
    pub fn builder() -> MockDashScopeBuilder {
        MockDashScopeBuilder::default()
    }
}

/// Configures and starts a [`MockDashScope`]. See the [module docs](self)
/// for an example.
#[derive(Clone, Debug, Default)]
pub struct MockDashScopeBuilder {
    cfg: Config,
    port: u16,
    grace: Option<Duration>,
}

fn account_for(key: &str) -> Arc<str> {
    if key == state::DEFAULT_KEY {
        Arc::from("default")
    } else {
        Arc::from(key)
    }
}

impl MockDashScopeBuilder {
    /// Accepts `key`, belonging to `account`. Keys of one account share its
    /// quotas. Once any key is configured, the default key is no longer
    /// accepted unless configured too.
    ///
    /// Default is the single key [`MockDashScope::DEFAULT_KEY`].
    pub fn key(mut self, key: impl Into<String>, account: impl Into<String>) -> Self {
        let (key, account): (String, String) = (key.into(), account.into());
        let state = self.cfg.keys.get(&key).map(|e| e.state);
        self.cfg.keys.insert(
            key,
            KeyEntry {
                account: Arc::from(account),
                state: state.unwrap_or_default(),
            },
        );
        self
    }

    /// Sets the standing of `key`'s account as seen through that key (a key
    /// not configured yet is added, in an account named after it).
    ///
    /// Default is [`AccountState::Active`].
    pub fn key_state(mut self, key: impl Into<String>, state: AccountState) -> Self {
        let key = key.into();
        let account = account_for(&key);
        self.cfg
            .keys
            .entry(key)
            .or_insert(KeyEntry {
                account,
                state: AccountState::Active,
            })
            .state = state;
        self
    }

    /// Accepts any non-empty key, each as its own account (configured keys
    /// keep their accounts).
    ///
    /// Default is `false`.
    pub fn accept_any_key(mut self, enabled: bool) -> Self {
        self.cfg.accept_any_key = enabled;
        self
    }

    /// The quota of models without their own.
    ///
    /// Default is [`Quota::unlimited`].
    pub fn default_quota(mut self, quota: Quota) -> Self {
        self.cfg.default_quota = quota;
        self
    }

    /// The quota of `model` (per account).
    pub fn quota(mut self, model: impl Into<String>, quota: Quota) -> Self {
        self.cfg.quotas.insert(model.into(), quota);
        self
    }

    /// The burst guard, for every (account, model); `None` disables it.
    ///
    /// Default is `None` (disabled).
    pub fn burst_guard(mut self, guard: impl Into<Option<BurstGuard>>) -> Self {
        self.cfg.burst = guard.into();
        self
    }

    /// Serves only these models; others get `404 Model.NotExist`.
    ///
    /// Default is to serve any model.
    pub fn models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.cfg.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// Replaces the list of stream-only models, which refuse non-stream
    /// calls.
    ///
    /// Default is `qwq-plus`, `qwq-plus-latest`, `qwq-32b`, `qvq-max`,
    /// `qvq-max-latest`, `qvq-plus`, `qwen-omni-turbo`,
    /// `qwen-omni-turbo-latest` and `qwen3-omni-flash`.
    pub fn stream_only_models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.cfg.stream_only = models.into_iter().map(Into::into).collect();
        self
    }

    /// The most texts one embedding request of `model` may carry.
    ///
    /// Default is 10 for `text-embedding-v3`/`v4`, 25 for `v1`/`v2`, and
    /// the [default limit](Self::default_embedding_batch_limit) otherwise.
    pub fn embedding_batch_limit(mut self, model: impl Into<String>, limit: NonZeroU32) -> Self {
        self.cfg.embedding_limits.insert(model.into(), limit.get());
        self
    }

    /// The embedding batch limit of models without their own.
    ///
    /// Default is 10.
    pub fn default_embedding_batch_limit(mut self, limit: NonZeroU32) -> Self {
        self.cfg.default_embedding_limit = limit.get();
        self
    }

    /// The embedding dimension when the request names none.
    ///
    /// Default is 1024.
    pub fn default_dimension(mut self, dimension: NonZeroU32) -> Self {
        self.cfg.default_dimension = dimension.get().min(8192);
        self
    }

    /// Output tokens of a generation that sets no lower `max_tokens`.
    ///
    /// Default is 20.
    pub fn output_tokens(mut self, tokens: NonZeroU32) -> Self {
        self.cfg.output_tokens = tokens.get();
        self
    }

    /// The seed of all randomness (faults, latency, request and task ids).
    ///
    /// Default is 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.cfg.seed = seed;
        self
    }

    /// Faults and latency for every model without its own plan.
    ///
    /// Default is no fault and no latency.
    pub fn faults(mut self, plan: FaultPlan) -> Self {
        self.cfg.faults = Arc::new(plan);
        self
    }

    /// Faults and latency for `model`, replacing the global plan for it.
    pub fn model_faults(mut self, model: impl Into<String>, plan: FaultPlan) -> Self {
        self.cfg.model_faults.insert(model.into(), Arc::new(plan));
        self
    }

    /// How long an async task stays `PENDING`, then `RUNNING`, before it is
    /// `SUCCEEDED`.
    ///
    /// Default is 1 s pending and 3 s running.
    pub fn task_durations(mut self, pending: Duration, running: Duration) -> Self {
        self.cfg.task_pending = pending;
        self.cfg.task_running = running;
        self
    }

    /// The largest request body accepted; larger ones get `413`.
    ///
    /// Default is 8 MiB.
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.cfg.body_limit = bytes;
        self
    }

    /// Whether error answers to native **stream** requests carry their body
    /// as an event stream (`event:error`, `:HTTP_STATUS/NNN`) with the error
    /// status, as older DashScope gateways do, instead of JSON.
    ///
    /// Default is `false`.
    pub fn stream_errors_as_sse(mut self, enabled: bool) -> Self {
        self.cfg.stream_errors_as_sse = enabled;
        self
    }

    /// The port on 127.0.0.1; 0 picks a free one.
    ///
    /// Default is 0.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// How long [`MockHandle::shutdown`] lets open connections finish before
    /// dropping them.
    ///
    /// Default is 1 second.
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.grace = Some(grace);
        self
    }

    /// Binds 127.0.0.1 and starts serving on the current tokio runtime.
    ///
    /// # Errors
    ///
    /// When the port cannot be bound.
    pub async fn start(self) -> io::Result<MockHandle> {
        let listener =
            TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::new(self.cfg));
        let router = handlers::router(shared.clone());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(server::serve(
            listener,
            router,
            shared.counters.clone(),
            rx,
            self.grace.unwrap_or(Duration::from_secs(1)),
        ));
        Ok(MockHandle {
            addr,
            shared,
            shutdown: tx,
            task: Some(task),
        })
    }
}

/// A running mock: its address, counters and run-time controls. Dropping it
/// stops the server at once (open connections are dropped); use
/// [`shutdown`](Self::shutdown) to let them finish.
///
/// See the [module docs](self) for an example.
#[must_use = "dropping the handle stops the mock server"]
pub struct MockHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl fmt::Debug for MockHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MockHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl MockHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`, the host part of every DashScope URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/api/v1`, like `DASHSCOPE_HTTP_BASE_URL`.
    pub fn native_base_url(&self) -> String {
        format!("http://{}/api/v1", self.addr)
    }

    /// `http://127.0.0.1:PORT/compatible-mode/v1`, the OpenAI-style base URL.
    pub fn compatible_base_url(&self) -> String {
        format!("http://{}/compatible-mode/v1", self.addr)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Zeroes the counters (requests in flight stay counted, and become the
    /// new peak).
    pub fn reset_stats(&self) {
        self.shared.counters.reset();
    }

    /// Sets (or with `None` removes) the quota of `model`; it applies to the
    /// next request, with the usage already in the windows.
    pub fn set_quota(&self, model: impl Into<String>, quota: impl Into<Option<Quota>>) {
        let model = model.into();
        let mut cfg = self.shared.cfg_mut();
        match quota.into() {
            Some(q) => cfg.quotas.insert(model, q),
            None => cfg.quotas.remove(&model),
        };
    }

    /// Sets the quota of models without their own.
    pub fn set_default_quota(&self, quota: Quota) {
        self.shared.cfg_mut().default_quota = quota;
    }

    /// Sets or disables the burst guard.
    pub fn set_burst_guard(&self, guard: impl Into<Option<BurstGuard>>) {
        self.shared.cfg_mut().burst = guard.into();
    }

    /// Forgets every request and token counted in the quota windows.
    pub fn reset_quota_usage(&self) {
        self.shared.clear_windows();
    }

    /// Replaces the global fault plan.
    pub fn set_faults(&self, plan: FaultPlan) {
        self.shared.cfg_mut().faults = Arc::new(plan);
    }

    /// Sets (or with `None` removes) the fault plan of `model`.
    pub fn set_model_faults(&self, model: impl Into<String>, plan: impl Into<Option<FaultPlan>>) {
        let model = model.into();
        let mut cfg = self.shared.cfg_mut();
        match plan.into() {
            Some(p) => cfg.model_faults.insert(model, Arc::new(p)),
            None => cfg.model_faults.remove(&model),
        };
    }

    /// Accepts `key`, belonging to `account`, from now on.
    pub fn add_key(&self, key: impl Into<String>, account: impl Into<String>) {
        let account: String = account.into();
        self.shared.cfg_mut().keys.insert(
            key.into(),
            KeyEntry {
                account: Arc::from(account),
                state: AccountState::Active,
            },
        );
    }

    /// Stops accepting `key`; returns whether it was configured.
    pub fn remove_key(&self, key: &str) -> bool {
        self.shared.cfg_mut().keys.remove(key).is_some()
    }

    /// Sets the standing of `key`'s account as seen through that key (a key
    /// not configured yet is added, in an account named after it).
    pub fn set_key_state(&self, key: impl Into<String>, state: AccountState) {
        let key = key.into();
        let account = account_for(&key);
        self.shared
            .cfg_mut()
            .keys
            .entry(key)
            .or_insert(KeyEntry {
                account,
                state: AccountState::Active,
            })
            .state = state;
    }

    /// Stops accepting connections, lets open ones finish for up to the
    /// [shutdown grace](MockDashScopeBuilder::shutdown_grace), then drops the
    /// rest and returns.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for MockHandle {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}
