//! A ready gateway: a local proxy in front of DashScope with per-client-key
//! token buckets, 429s with `Retry-After`, degradation of failing keys,
//! SSE pass-through, and metrics.
//!
//! [`Gateway`] (or [`router`]) is an axum [`Router`] that
//! speaks DashScope's own paths, so the official SDKs and OpenAI-compatible
//! clients work by changing only their base URL:
//!
//! | path | |
//! |---|---|
//! | `POST /api/v1/services/...` | native text, multimodal, embeddings, async task submission |
//! | `POST /compatible-mode/v1/chat/completions`, `POST /compatible-mode/v1/embeddings` | OpenAI-compatible |
//! | `GET /api/v1/tasks`, `GET /api/v1/tasks/{id}`, `POST /api/v1/tasks/{id}/cancel` | task polling |
//! | `GET, POST /compatible-mode/v1/files`, `GET, DELETE .../files/{id}`, `GET .../files/{id}/content` | Files API (batch input and output) |
//! | `GET, POST /compatible-mode/v1/batches`, `GET .../batches/{id}`, `POST .../batches/{id}/cancel` | Batch API |
//! | `GET /healthz`, `GET /metrics` | operations |
//!
//! Every request goes through, in order:
//!
//! 0. **Path allow-list**: only the paths above leave, byte for byte, and
//!    each segment of a native service path or a task id is ASCII letters,
//!    digits, `-` and `_`: dot segments (`..`, `%2e%2e`), encoded slashes,
//!    empty segments and backslashes get 404 (`InvalidURL`) before
//!    anything else. Another method on a served path gets 405 with
//!    `Allow`.
//! 1. **Header cap** (431: over `server.max_header_bytes`, or more than
//!    96 header fields, so that what is forwarded with the headers the
//!    gateway sets stays within the 100 fields servers accept) and
//!    **client key**: `Authorization: Bearer
//!    <gateway key>`. Keys are configured as SHA-256 digests (or hashed at
//!    load) and never stored, logged or shown: logs and metrics name a key
//!    by its name or an 8-hex-digit redacted id. A missing or unknown key
//!    gets 401 `InvalidApiKey` in the endpoint's error shape. A client
//!    address gets `max_auth_failures_per_minute` failed authentications
//!    (default 10, a burst of as many, IPv6 per /64); beyond that its
//!    requests get 429 (`Throttling`, `Retry-After`) whatever key they
//!    carry, so keys cannot be guessed quickly. At most 4,096 addresses
//!    are tracked; while all are still counted, new addresses share one
//!    such allowance (a flood of addresses gets no more, and is refused
//!    429 once it is spent, good key or not). The address comes from
//!    axum's `ConnectInfo<SocketAddr>` ([`Gateway::serve`] provides it; when
//!    you mount the router yourself, serve it with
//!    `into_make_service_with_connect_info::<SocketAddr>()`, or there is no
//!    limit). Behind a reverse proxy every client has the proxy's address:
//!    raise the limit or set it to 0 there.
//! 2. **The key's token bucket** (default capacity 50, refill 30 per
//!    second; per key overrides): empty means an immediate 429 with
//!    `Retry-After` (whole seconds, rounded up) and
//!    `x-ratelimit-limit/remaining/reset`, the body in DashScope's shape for
//!    the endpoint (`Throttling.RateQuota` natively, `limit_requests` in
//!    compatible mode). Every proxied answer carries the same three
//!    headers.
//! 3. **The body**, read up to a cap (413) and a read timeout (408), then
//!    parsed once, strictly, for the model, streaming and a token estimate
//!    ([`RequestInfo`](crate::request::RequestInfo)). A body the upstream
//!    might read otherwise than admission does (a repeated `"model"`, a
//!    `Model` beside a `model`, a string `max_tokens`, invalid UTF-8 or
//!    JSON, data after the object, nesting deeper than 128: see
//!    [Ambiguous bodies](crate::request::RequestInfo#ambiguous-bodies)) gets
//!    400 (`InvalidParameter` / `invalid_parameter_error`, the message
//!    naming the field), and a generation or embedding body without a
//!    model 400 (`BadRequest.EmptyModel`): nothing the gateway cannot
//!    account for leaves. The model is matched to its budget trimmed and
//!    lowercased, as the quota table reads it.
//! 4. **The key's tokens** (none by default; `[limits]` or per key),
//!    charged with the body's token estimate (input plus `max_tokens`, or
//!    1024 output tokens when it sets none) and reconciled with the real
//!    `usage` when the answer ends, streams included (a call the upstream
//!    refused is refunded):
//!    - `tpm`: tokens per minute, the token quota of the key's bucket (a
//!      bucket of `tpm` tokens refilled at `tpm` a minute). Empty: 429
//!      (`Throttling.AllocationQuota` / `insufficient_quota`) with
//!      `Retry-After` and `x-ratelimit-{limit,remaining,reset}-tokens`.
//!    - `tokens_per_day`, `tokens_per_month`: budgets per UTC day and
//!      month ([`Budget`](crate::rate_limit::Budget), a fixed-window
//!      counter). A call whose estimate does not fit gets 429 in the same
//!      shape, its message naming the budget ("Daily token budget
//!      exhausted ... it resets at 00:00 UTC"; "Monthly ... on the 1st"),
//!      `Retry-After` to the reset and `x-ratelimit-limit-tokens` (the
//!      budget), `-remaining-tokens`, `-reset-tokens` (seconds). Without
//!      `[redis]` the counts are in memory: kept across a
//!      [reload](Gateway::reload), lost on restart; with `[redis]` they are
//!      Redis counters (see below).
//!
//!    Every proxied answer of a key with token limits carries
//!    `x-ratelimit-{limit,remaining,reset}-tokens` of the tighter of the
//!    two (the one with fewer tokens left), the call's own estimate still
//!    reserved.
//! 5. **Degradation**: a [`CircuitBreaker`](crate::circuit_breaker) per key
//!    with [`TripAction::Degrade`](crate::circuit_breaker::TripAction):
//!    after 3 consecutive upstream failures (5xx, timeouts, resets, an SSE
//!    error frame mid-stream; not 429s, not 4xx) the key is limited to
//!    5 calls per second (429 beyond that) and a `warn` event names it by
//!    its redacted id; after the probe delay (5 s, doubling up to 60 s),
//!    admitted calls are probes and the first success restores the key.
//!    With `[redis]` the replicas share this state (see
//!    [Replicas](#replicas-redis)).
//! 6. **Upstream admission**: the key maps to a [`Pool`](crate::pool::Pool)
//!    of upstream accounts (DashScope's quotas belong to accounts, not
//!    keys; an account may list several of its keys, used in turn). Each
//!    account has a [`RateLimitLayer`](crate::rate_limit::RateLimitLayer)
//!    keyed by (account, model)
//!    ([`ByAccountModel`](crate::key::ByAccountModel)) with RPM and TPM (the
//!    Qwen defaults or configured, smoothed per second as DashScope enforces
//!    them). The pool takes the account with the most room now; when none
//!    has, the call goes to the account that frees up first and waits there
//!    if that is within `admission_wait` (default 2 s: smoothing, not
//!    queueing), else it gets 429 (`Throttling.RateQuota` or
//!    `Throttling.AllocationQuota`) with `Retry-After` and
//!    `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` per minute
//!    (the account's RPM and TPM, what is left of them after what is booked
//!    ahead, and the seconds until nothing is). While an (account, model)
//!    budget is saturated, the client keys waiting for it share it by
//!    their `weight` (default 1; [fair share](crate::rate_limit::fair):
//!    weights 3 and 1 get 75% / 25%, a key alone gets all of it, a flood
//!    of one key does not delay another), at most 1,024 waiting calls per
//!    key and account (429 beyond); with `[redis]`, each replica shares
//!    out the calls waiting on it. Token reservations are
//!    reconciled with the real `usage` when the answer ends, and an
//!    upstream 429 tightens the account. Task polls and async submissions
//!    are pinned to the key's first account (a task lives in the account
//!    that created it).
//! 6. **The upstream call**, to the configured base URL only (no open
//!    proxying), with the account's key, hop-by-hop headers stripped both
//!    ways, and the configured connect, header, idle and total timeouts
//!    (504 / 502 when the upstream cannot answer).
//!
//! **Files and batches** (the OpenAI-compatible Batch API, at half price
//! and outside the real-time quota): a client key's calls go to the first
//! account of its pool (files and batches live in the account that created
//! them) with that account's key, each taking one from the key's bucket
//! and counted for the key (`route="files"` / `"batches"`); no account
//! quota, body parsing or degradation applies. An upload is streamed
//! through, never buffered, up to `max_file_bytes` (default 500 MB; 413
//! beyond, at once when `content-length` says so); the body read timeout
//! does not apply to it (the upstream total timeout does).
//!
//! The answer streams back frame by frame: nothing is buffered, an SSE
//! stream reaches the client as the upstream sends it, and when the client
//! goes away the gateway drops the upstream body, which closes the upstream
//! connection and so cancels the generation.
//!
//! **Operations.** `/healthz`; `/metrics` in Prometheus text through the
//! `metrics` facade and a recorder owned by the gateway (requests by route,
//! status and key, 429s and other refusals by reason, upstream latency,
//! bucket levels, degraded keys, cancelled streams, requests in flight);
//! `tracing` events (a `warn` per degradation and per upstream failure,
//! 5xx answers included, `debug` per request). The `key` label is bounded:
//! at most `[metrics] key_series` keys (default 100: those with `metrics =
//! true`, then those without a setting, in file order) have their own
//! series; the others are counted under `key="_other"`, so `/metrics`
//! stays the same size with 100 or 100,000 keys (unauthenticated requests
//! are `key="none"`; no key may be named `_other` or `none`).
//!
//! **GenAI spans** (`[telemetry] genai_spans`, on by default): each
//! generation or embedding call a key sends gets the
//! [`GenAiTraceLayer`](crate::telemetry::GenAiTraceLayer)'s span, following
//! the OpenTelemetry GenAI conventions (`gen_ai.operation.name`, provider
//! `dashscope`, request and response model, input and output tokens,
//! finish reasons, time to first chunk, `error.type`, the upstream as
//! `server.address` and `server.port`), plus `tower_qwen.client_key.name`, the key's configured name (never the key,
//! never a metric attribute). It opens once the body is read and lasts
//! until the answer's body ends, so the key's token limits, the breaker,
//! every attempt and failover in the pool and the whole stream are inside
//! it; a call refused by the key's limits is a failed operation
//! (`throttled.local`). It is a `tracing` span (any subscriber;
//! `tracing-opentelemetry` bridges it); with the `otel` feature,
//! `GatewayConfig::otel` also records the `gen_ai.client.*` metrics and
//! an OpenTelemetry span per call, a child of the client's `traceparent`
//! when it sent one. `[telemetry] otlp_endpoint` (or the standard
//! `OTEL_EXPORTER_OTLP_ENDPOINT`) says where `qwen-gateway` exports them
//! over OTLP ([`GatewayConfig::otlp_endpoint`]); a configuration asking
//! for it in a build without `otel` is refused. `/metrics` is unchanged.
//!
//! **Reload** ([`Gateway::reload`], [`Gateway::reload_from`]; SIGHUP in
//! `qwen-gateway`): keys, limits, accounts and the rest take effect for
//! the next request; open connections stay open and a request in progress
//! finishes under the configuration it started with.
//!
//! An SSE answer the upstream breaks off (a reset, the idle or total
//! timeout) ends with a final error event in its dialect, so clients see
//! an error rather than a stream that just stops: natively `event:error`,
//! `:HTTP_STATUS/504` (timeout) or `502`, `data:{"code":"RequestTimeOut"`
//! or `"InternalError",...}`; compatible `data: {"error":{"code":"timeout"`
//! or `"upstream_error",...}}` (no `[DONE]`). If the upstream stopped
//! inside an event, a blank line ends that partial event first. A JSON
//! answer cut mid-way cannot be completed and is cut.
//!
//! **Serving** ([`Gateway::serve`]): HTTP/1.1 with keep-alive and a 30 s
//! header read timeout, and HTTP/2 cleartext with prior knowledge (h2c:
//! told apart by the connection's first bytes); at most `max_connections` open connections
//! (default: half the process's soft file-descriptor limit less 64, read
//! from `/proc/self/limits`, 480 where that cannot be read): at the cap a
//! new connection closes the one idle longest, and waits for a slot when
//! none is idle. When accepting fails (out of file descriptors) the idle
//! connections go first and accepting backs off (10 ms doubling to 1 s),
//! with one `warn` per episode. Heads hyper cannot parse get their 400,
//! 414 or 431 in DashScope's shape (the dialect of the request line when
//! it was read) and are counted. A graceful shutdown closes at once the
//! connections that owe nothing (idle, or still sending a head) and lets
//! the others finish their answer (streams included) up to
//! `shutdown_grace`.
//!
//! # Built from the public pieces
//!
//! Each client key's stack is made of this crate's public layers, so the
//! same behaviour can be assembled in-process without the gateway:
//!
//! ```text
//! RateLimitLayer (the key's bucket: reject mode, keyed by client key)
//!   -> the body (cap, read timeout, strict RequestInfo, model required)
//!   -> CircuitBreakerLayer (TripAction::Degrade, keyed by client key)
//!   -> Pool (the key's accounts: headroom, key rotation, pinning)
//!        -> per account: RateLimitLayer (ByAccountModel; wait up to
//!           admission_wait) -> SetUpstreamLayer -> TimeoutLayer -> client
//! ```
//!
//! The handler around it keeps only the path allow-list, authentication,
//! hop-by-hop header stripping and the answer's body.
//!
//! # Replicas: `[redis]`
//!
//! Without a `[redis]` section every limit and degrade state lives in the
//! process. With one, every replica of the gateway pointed at the same
//! Redis and key prefix shares three things:
//!
//! * **the client keys' buckets** and **the accounts' (account, model)
//!   quotas**, decided by the [Redis backend](crate::redis) (feature
//!   `redis`): one key hammered through three replicas gets its bucket
//!   once, not three times, and one account's RPM holds across them;
//! * **the degrade state**: when a replica's breaker degrades a key, it
//!   publishes the instant its probes start (a sorted set
//!   `{key_prefix}degraded`, a later deadline winning), and every replica
//!   with traffic reads it at most once per `probe_every` (in a task of its
//!   own, never on the request path) and degrades the key until the same
//!   instant with
//!   [`BreakerHandle::trip_key_until`](crate::circuit_breaker::BreakerHandle::trip_key_until),
//!   so a failing upstream is not hit by each replica in turn. From that
//!   instant each replica probes on its own; a failed probe degrades the
//!   key for longer, and that is published too. Recovery is not published
//!   (a deadline passes, it is never withdrawn). This needs Redis 6.2 or
//!   later (`ZADD GT`); on an older one every write fails and each replica
//!   keeps its own degrade state, as while Redis is down.
//!
//! When Redis fails or is slower than `timeout`, the `failure` policy
//! decides the limits: `"fail-open"` (default) decides locally at
//! 1/`replicas` of each quota, `"fail-closed"` answers 503
//! (`ServiceUnavailable` / `service_unavailable`, `Retry-After`); either
//! way every request is answered, none waits for Redis longer than
//! `timeout`, and after Redis returns the replicas share again (each
//! limiter retries Redis every `probe_every`; [`Gateway::probe_redis`]
//! tries at once). The degrade state falls back to each replica's own:
//! a replica still degrades a key on the failures it sees, failed reads
//! and writes are counted (`gateway_degrade_sync_errors_total`) and logged
//! once per outage, and sharing resumes with the next write or read once
//! Redis answers. `tests/gateway/replicas.rs` shows it with three
//! replicas and a real `redis-server`: one key hammered through all three
//! gets 50 + 30/s in total (three times that without Redis), one account's
//! RPM holds with no upstream 429, a key degraded on one replica is served
//! at the degraded rate by another that saw no failure, and a killed Redis
//! is answered by the policy while each replica keeps degrading on its
//! own. Slow start is not available with `[redis]` (the Redis backend has
//! none).
//!
//! The keys' token limits follow: `tpm` is the shared bucket's token
//! quota, and the day and month budgets are Redis counters
//! ([`RedisBudget`](crate::redis::RedisBudget)),
//! `{key_prefix}budget:{key name}:{day|month}:{2026-03-31|2026-03}`,
//! charged atomically (`INCRBY` in a script) and expiring a day after
//! their window: shared by every replica and kept across restarts. When
//! Redis is down the same `failure` policy applies: fail-open counts
//! locally at 1/`replicas` of each budget, from zero (what was spent in
//! Redis is not known there), fail-closed answers 503; reconciliations
//! are skipped meanwhile (estimates stand). The windows are UTC calendar
//! days and months by each replica's clock.
//!
//! # Configuration
//!
//! TOML ([`GatewayConfig`]) read by serde, unknown fields refused, defaults
//! in one place; every scalar of `[server]`, `[upstream]`, `[limits]`,
//! `[degrade]`, `[redis]`, `[metrics]` and `[telemetry]` overridable by
//! `QWEN_GATEWAY_<SECTION>_<FIELD>` (e.g. `QWEN_GATEWAY_SERVER_LISTEN`,
//! `QWEN_GATEWAY_REDIS_URL`), secrets read from variables named by `*_env`
//! fields. A bad file gets a [`ConfigError`](error::ConfigError) naming
//! every bad or unknown field (and the variable a bad value came from).
//! `examples/gateway.toml` documents every field with its default:
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"
//! max_body_bytes = 8388608        # 413 above
//! max_file_bytes = 500000000      # a Files API upload, streamed; 413 above
//! max_header_bytes = 16384        # 431 above
//! body_read_timeout = "30s"       # 408
//! shutdown_grace = "30s"
//! max_connections = 480           # default: from the fd limit
//! max_auth_failures_per_minute = 10
//! worker_threads = 1              # the qwen-gateway program's threads; 0: one per CPU
//!
//! [upstream]
//! region = "singapore"            # or base_url = "https://dashscope.aliyuncs.com"
//! connect_timeout = "5s"
//! header_timeout = "off"
//! idle_timeout = "60s"            # silence between stream frames
//! total_timeout = "300s"
//! admission_wait = "2s"           # longest wait for an account's budget, else 429
//!
//! [limits]                        # each client key's bucket, unless overridden
//! capacity = 50
//! refill_per_second = 30
//! tpm = 0                         # tokens per minute per key (0: none)
//! tokens_per_day = 0              # token budget per key per UTC day (0: none)
//! tokens_per_month = 0            # ... per UTC month
//!
//! [degrade]
//! consecutive_failures = 3
//! rate_per_second = 5
//! probe_after = "5s"
//! probe_after_max = "60s"
//!
//! [metrics]
//! key_series = 100                # keys named in /metrics; the rest: key="_other"
//!
//! [telemetry]
//! genai_spans = true              # a GenAI span per generation/embedding call
//! otlp_endpoint = "off"           # OTLP collector (qwen-gateway with `otel`); unset:
//!                                 # OTEL_EXPORTER_OTLP_ENDPOINT
//! service_name = "qwen-gateway"   # unset: OTEL_SERVICE_NAME
//!
//! [redis]                         # optional: replicas share limits and degrade state
//! url = "redis://127.0.0.1:6379"
//! key_prefix = "tower-qwen:gw:"
//! failure = "fail-open"           # or "fail-closed" (503)
//! replicas = 3                    # fail-open decides at 1/replicas
//! timeout = "100ms"
//! probe_every = "500ms"           # retry a down Redis; read the shared degrade state
//!
//! [[accounts]]
//! name = "main"
//! api_key_env = "DASHSCOPE_API_KEY"
//! quotas = "qwen"                 # the published defaults per model, or "unlimited"
//! [accounts.models."qwen-plus"]
//! rpm = 15000
//! tpm = 1200000
//!
//! [[keys]]
//! name = "team-a"
//! sha256 = "<64 hex digits: printf %s KEY | sha256sum>"
//! accounts = ["main"]
//! capacity = 100
//! tpm = 100000
//! tokens_per_day = 2000000        # 429 naming the budget until 00:00 UTC
//! tokens_per_month = 40000000
//! weight = 3                      # share of a saturated account (default 1)
//! metrics = true                  # always its own /metrics series
//! ```
//!
//! # How it differs
//!
//! Compared with LiteLLM's or Helicone's proxies (QWEN-API.md), the
//! limits here are admission control before the request leaves (GCRA,
//! tokens reserved and reconciled), 429s carry `Retry-After` and
//! `x-ratelimit-*` (DashScope sends neither), errors are classified from
//! bodies and SSE frames too, and a failing key is slowed rather than
//! ejected. It is built from this crate's layers, so the same behaviour is
//! available in-process without the gateway.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use tower::ServiceExt;
//! use tower_qwen::gateway::{Gateway, GatewayConfig};
//!
//! let config = GatewayConfig::from_toml(r#"
//!     [upstream]
//!     base_url = "http://127.0.0.1:9"
//!     [[accounts]]
//!     name = "main"
//!     api_key = "sk-upstream"
//!     [[keys]]
//!     name = "alice"
//!     key = "gw-alice-0001"
//!     capacity = 1
//! "#).unwrap();
//! let app = Gateway::new(config).router();
//!
//! // No key: 401 in the compatible (OpenAI) shape.
//! let req = http::Request::post("/compatible-mode/v1/chat/completions")
//!     .body(axum::body::Body::from("{}"))
//!     .unwrap();
//! let res = app.clone().oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 401);
//!
//! // The health check needs no key.
//! let res = app.oneshot(http::Request::get("/healthz").body(axum::body::Body::empty()).unwrap()).await.unwrap();
//! assert_eq!(res.status(), 200);
//! # }
//! ```

mod auth;
mod config;
pub mod error;
mod metrics;
mod proxy;
mod respond;
mod serve;
#[cfg(feature = "redis")]
mod shared;
mod stack;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::Path;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::routing::{get, post};
use tokio::net::TcpListener;

pub use auth::key_sha256;
pub use config::{ENV_PREFIX, GatewayConfig};

use proxy::{ClientKey, Inner};

/// A configured gateway. Cheap to clone (shared state). See the
/// [module docs](self) for an example.
#[derive(Clone)]
pub struct Gateway {
    live: Arc<Live>,
    max_header_bytes: usize,
    max_connections: usize,
    grace: std::time::Duration,
    listen: std::net::SocketAddr,
    worker_threads: usize,
}

/// What the handlers share: the state built from the current
/// configuration, replaced whole by a reload, and the metrics recorder,
/// which outlives reloads.
pub(crate) struct Live {
    current: RwLock<Arc<Inner>>,
    metrics: Arc<metrics::Metrics>,
}

impl Live {
    /// The current configuration's state. A request keeps the one it
    /// started with until its answer ends.
    pub(crate) fn load(&self) -> Arc<Inner> {
        self.current.read().expect("gateway state lock").clone()
    }
}

impl fmt::Debug for Gateway {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Gateway")
            .field("inner", &self.live.load())
            .finish_non_exhaustive()
    }
}

/// The gateway's [`Router`] for `config`: the same as
/// `Gateway::new(config).router()`.
///
/// # Panics
///
/// As [`Gateway::new`].
pub fn router(config: GatewayConfig) -> Router {
    Gateway::new(config).router()
}

/// Builds the state of one configuration: the upstream client, the client
/// keys' buckets, the degrade breaker, one pool per client key over the
/// accounts; metrics go to `metrics`.
fn build(
    config: &GatewayConfig,
    metrics: Arc<metrics::Metrics>,
    previous: Option<&Inner>,
) -> Inner {
    let series: Vec<metrics::KeySeries> = config
        .keys
        .iter()
        .map(|k| metrics.key_series(k.own_series.then_some(k.name.as_str())))
        .collect();
    let key_metrics = metrics::KeyMetrics {
        degradations: series.iter().map(|s| s.degradations.clone()).collect(),
        degrade_sync_errors: metrics.degrade_sync_errors.clone(),
    };
    let built = stack::build(config, &key_metrics, previous.map(|p| &p.budgets));
    let mut clients = Vec::with_capacity(config.keys.len());
    let mut by_digest = HashMap::with_capacity(config.keys.len());
    let stacks = built.services.into_iter().zip(built.files);
    for ((k, series), (svc, files)) in config.keys.iter().zip(series).zip(stacks) {
        let client = Arc::new(ClientKey {
            idx: series.id,
            own_series: series.own,
            name: Arc::from(k.name.as_str()),
            id: k.digest.redacted_id(),
            capacity: k.bucket.capacity.get(),
            pin_to: Arc::from(config.accounts[k.accounts[0]].name.as_str()),
            svc,
            files,
        });
        by_digest.insert(k.digest, client.clone());
        clients.push(client);
    }
    tracing::info!(
        upstream = %config.upstream.base_url,
        accounts = config.accounts.len(),
        keys = clients.len(),
        keys_with_own_series = config.keys.iter().filter(|k| k.own_series).count(),
        redis = config.redis.is_some(),
        "gateway configured"
    );
    Inner {
        max_header_bytes: config.server.max_header_bytes,
        degrade_rate: config.degrade.rate_per_second.get(),
        keys: by_digest,
        clients,
        buckets: built.buckets,
        budgets: built.budgets,
        breaker: built.breaker,
        metrics,
        auth_failures: auth::AuthFailures::new(config.server.max_auth_failures_per_minute),
        #[cfg(feature = "redis")]
        redis: built.redis,
    }
}

impl Gateway {
    /// Builds the gateway: the upstream client, the client keys' buckets,
    /// the degrade breaker, one pool per client key over the accounts, the
    /// metrics recorder. Nothing is sent until a request comes; without
    /// `[redis]` no runtime is needed either.
    ///
    /// # Panics
    ///
    /// With a `[redis]` section, outside a tokio runtime (the Redis
    /// connection manager spawns its task; it connects lazily, so Redis
    /// need not be up yet).
    pub fn new(config: GatewayConfig) -> Self {
        #[cfg(feature = "otel")]
        let exporting = config.otel.is_some();
        #[cfg(not(feature = "otel"))]
        let exporting = false;
        if let (Some(endpoint), false) = (config.otlp_endpoint(), exporting) {
            tracing::warn!(
                endpoint,
                "telemetry.otlp_endpoint is set but no GatewayConfig::otel was given: nothing is exported (qwen-gateway builds the OTLP pipeline; a program of your own passes its own)"
            );
        }
        let metrics = Arc::new(metrics::Metrics::new());
        let inner = build(&config, metrics.clone(), None);
        Self {
            live: Arc::new(Live {
                current: RwLock::new(Arc::new(inner)),
                metrics,
            }),
            max_header_bytes: config.server.max_header_bytes,
            max_connections: config.server.max_connections,
            grace: config.server.shutdown_grace,
            listen: config.server.listen,
            worker_threads: config.server.worker_threads,
        }
    }

    /// Replaces the configuration of this gateway (and of every clone of
    /// it, every router it made and the server it runs): keys, limits,
    /// accounts, upstream, degradation, `[redis]` and the `[server]`
    /// settings the handler applies take effect for the next request.
    /// Open connections stay open; a request in progress (a stream
    /// included) finishes under the configuration it started with. This is
    /// what `qwen-gateway` does on SIGHUP.
    ///
    /// What starts afresh: the in-memory buckets, account budgets and
    /// degraded states (with `[redis]` the buckets, budgets and degrade
    /// deadlines live in Redis and are kept), and the failed-authentication
    /// counts. The client keys' token budgets per day and month are kept
    /// (in memory too): what a key spent still counts under its new
    /// limits. Metrics
    /// keep counting: a key keeps its series. `listen`, `max_connections`,
    /// `shutdown_grace` and `worker_threads` belong to the running server
    /// and need a restart (a `warn` says so when they changed).
    ///
    /// # Panics
    ///
    /// With a `[redis]` section, outside a tokio runtime (as
    /// [`Gateway::new`]).
    pub fn reload(&self, config: GatewayConfig) {
        let s = &config.server;
        if s.listen != self.listen
            || s.max_connections != self.max_connections
            || s.shutdown_grace != self.grace
            || s.worker_threads != self.worker_threads
        {
            tracing::warn!(
                "server.listen, server.max_connections, server.shutdown_grace or server.worker_threads changed: they take effect on restart only"
            );
        }
        let previous = self
            .live
            .current
            .read()
            .expect("gateway state lock")
            .clone();
        let next = Arc::new(build(&config, self.live.metrics.clone(), Some(&previous)));
        let old = std::mem::replace(
            &mut *self.live.current.write().expect("gateway state lock"),
            next,
        );
        // Requests in progress hold the old state; it goes when they end.
        drop(old);
        tracing::info!(keys = config.keys.len(), "gateway configuration reloaded");
    }

    /// Reads the configuration file at `path` and, when it is valid,
    /// [reloads](Gateway::reload) it; when it is not, nothing changes.
    ///
    /// # Errors
    ///
    /// [`ConfigError`](error::ConfigError) when the file cannot be read or
    /// is invalid (the gateway keeps its configuration).
    pub fn reload_from(&self, path: impl AsRef<Path>) -> Result<(), error::ConfigError> {
        let config = GatewayConfig::load(path)?;
        self.reload(config);
        Ok(())
    }

    /// Pings Redis from every shared limiter of this gateway (with the
    /// configured timeout) and returns whether all answered; each limiter
    /// that gets an answer goes back to Redis at once (otherwise one call
    /// per `probe_every` tries it). `true` without `[redis]`. For health
    /// checks and tests.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub async fn probe_redis(&self) -> bool {
        let mut all = true;
        let inner = self.live.load();
        for probe in inner.redis.iter() {
            all &= probe().await;
        }
        all
    }

    /// The axum router: mount it in your app, or run it with
    /// [`Gateway::serve`].
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(proxy::healthz))
            .route("/metrics", get(proxy::metrics))
            .route("/api/v1/services/{*path}", post(proxy::proxy))
            .route("/compatible-mode/v1/chat/completions", post(proxy::proxy))
            .route("/compatible-mode/v1/embeddings", post(proxy::proxy))
            .route("/api/v1/tasks", get(proxy::proxy))
            .route("/api/v1/tasks/{id}", get(proxy::proxy))
            .route("/api/v1/tasks/{id}/cancel", post(proxy::proxy))
            .route(
                "/compatible-mode/v1/files",
                post(proxy::proxy).get(proxy::proxy),
            )
            .route(
                "/compatible-mode/v1/files/{id}",
                get(proxy::proxy).delete(proxy::proxy),
            )
            .route("/compatible-mode/v1/files/{id}/content", get(proxy::proxy))
            .route(
                "/compatible-mode/v1/batches",
                post(proxy::proxy).get(proxy::proxy),
            )
            .route("/compatible-mode/v1/batches/{id}", get(proxy::proxy))
            .route(
                "/compatible-mode/v1/batches/{id}/cancel",
                post(proxy::proxy),
            )
            .fallback(proxy::not_found)
            .method_not_allowed_fallback(proxy::method_not_allowed)
            .with_state(self.live.clone())
    }

    /// The Prometheus text of the gateway's metrics: what `/metrics`
    /// answers (the bucket and degradation gauges read now, for the keys of
    /// the configuration in force).
    pub fn render_metrics(&self) -> String {
        self.live.load().render_metrics()
    }

    /// Whether the client key named `name` is degraded now; `None` for an
    /// unknown name.
    pub fn is_degraded(&self, name: &str) -> Option<bool> {
        let inner = self.live.load();
        inner
            .clients
            .iter()
            .find(|c| &*c.name == name)
            .map(|c| inner.is_degraded(c))
    }

    /// Serves on `listener` (HTTP/1.1, and HTTP/2 cleartext with prior
    /// knowledge) until `shutdown` completes; then
    /// stops accepting connections and lets in-flight requests, streams
    /// included, finish for up to the configured `shutdown_grace` before
    /// dropping them.
    ///
    /// Connections are capped (`max_connections`, idle ones closed first),
    /// accept failures back off, heads hyper cannot parse are answered in
    /// DashScope's shape, and the connections that owe nothing are closed
    /// at once on shutdown (see the [module docs](self)). Each request
    /// carries axum's `ConnectInfo<SocketAddr>`.
    ///
    /// What cannot be shaped: a head not complete within 30 s closes the
    /// connection without an answer (hyper sends none); and when a client
    /// keeps sending a head far over the cap, closing its connection with
    /// unread bytes may reset it before it reads the 431.
    ///
    /// # Errors
    ///
    /// None so far (accept errors are logged and retried); the `Result`
    /// leaves room for setup errors.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> io::Result<()> {
        let router = self.router();
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "gateway listening");
        }
        let opts = serve::Options {
            max_header_bytes: self.max_header_bytes,
            max_connections: self.max_connections,
            grace: self.grace,
        };
        serve::serve(listener, router, self.live.metrics.clone(), opts, shutdown).await
    }

    /// Binds the configured `server.listen` address and serves until
    /// Ctrl-C or SIGTERM, then shuts down gracefully.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub async fn serve_on(self) -> io::Result<()> {
        let listener = TcpListener::bind(self.listen).await?;
        self.serve(listener, shutdown_signal()).await
    }
}

/// Completes on Ctrl-C, or SIGTERM on Unix.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<Gateway>();
}
