//! A faithful mock of DashScope (Qwen / Model Studio) on loopback, for tests,
//! benchmarks, demos, and your own agent's test suite.
//!
//! [`MockDashScope::builder`] starts a real HTTP/1 server (axum routing on
//! hyper, on `127.0.0.1` and a random port) that speaks both wire dialects
//! the way QWEN-API.md describes them, enforces per-account quotas, answers
//! with tool calls, JSON and reasoning as the service does, follows a
//! [`Script`] of decisions and faults request by request, and injects
//! random faults on demand, deterministically for a seed. Unlike a
//! `tower-test` mock service, it exercises the whole client path: TCP,
//! pooling, timeouts, body streaming and connection resets. The official
//! SDKs' wire shapes (OpenAI's and DashScope's) parse its answers as the
//! service's.
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
//! | `GET /api/v1/tasks/{id}`, `POST /api/v1/tasks/{id}/cancel`, `GET /api/v1/tasks` | task poll, cancel, list |
//! | `GET /compatible-mode/v1/models`, `GET /compatible-mode/v1/models/{id}` | the models, OpenAI's list shape |
//! | `GET /api/v1/models?page_no=&page_size=&model=` | the models, the native SDK's shape |
//! | `/compatible-mode/v1/files[/{id}[/content]]`, `/compatible-mode/v1/batches[/{id}[/cancel]]` | the Batch API and its files: upload, create, retrieve, list, cancel, output and error files, validation, the `batch-test-model` dry run, injected failures (see [`batch`]) |
//!
//! Every answer carries the request id in an `x-request-id` header and in
//! the body (`request_id` natively, `id: "chatcmpl-<id>"` compatibly).
//!
//! # What it models
//!
//! **Streaming.** Native streaming is asked for with `X-DashScope-SSE:
//! enable` or `Accept: text/event-stream`, compatible streaming with
//! `"stream": true` (the mock decides with
//! [`RequestInfo::parse`](crate::request::RequestInfo::parse), as the
//! client-side layers do). Native frames are
//! `id:N\nevent:result\n:HTTP_STATUS/200\ndata:{..}\n\n`, one per output
//! piece, with cumulative `usage` on every frame, `finish_reason` the string
//! `"null"` until the last frame, no `[DONE]`; `parameters.incremental_output`
//! chooses deltas (`true`) or cumulative snapshots (`false`, the default).
//! Compatible frames are `data: {chat.completion.chunk}\n\n`: a first chunk
//! with the role and empty content, one delta per piece, a chunk with the
//! `finish_reason` and an empty delta, with `stream_options.include_usage` a
//! tail chunk with `"choices":[]` and `usage` (earlier chunks then carry
//! `"usage":null`), then `data: [DONE]`.
//!
//! **Tokens.** Input tokens are exactly
//! `RequestInfo::parse(path, &headers, Some(body)).input_tokens` (see
//! [`crate::tokens`]), so a client-side estimate and the mock agree. Output
//! comes in pieces of about one token: the default reply is
//! [`MockDashScopeBuilder::output_tokens`] (default 20) four-byte ASCII
//! pieces, so its token estimate equals the reported output tokens; a
//! scripted text is cut into four ASCII bytes or two other characters per
//! piece, tool-call arguments into fragments of at most 12 bytes, and
//! `usage` counts each piece's estimate (plus the tool's name once).
//! `max_tokens` / `max_completion_tokens` / `parameters.max_tokens` cap the
//! text (`finish_reason` `"length"`), not reasoning or tool calls.
//! Embeddings have no output tokens; their vectors are deterministic unit
//! vectors of the requested dimension (`parameters.dimension` /
//! `dimensions`, default 1024), the same for the same text.
//!
//! **Models.** A catalogue of [`ModelInfo`]s ([`ModelInfo::catalogue`]:
//! the Qwen models of QWEN-API.md with their capabilities, function calling,
//! JSON modes, thinking, stream-only, embeddings and their batch limits,
//! task models), changeable with [`MockDashScopeBuilder::model`],
//! [`models`](MockDashScopeBuilder::models) and at run time. A model outside
//! it (names are case-sensitive), or of another kind than the endpoint's,
//! gets the service's answer: compatible `404` `model_not_found` "The model
//! \`X\` does not exist or you do not have access to it."; native `400
//! InvalidParameter` "Model not exist." (or `404 Model.NotExist`, see
//! [`NativeModelError`]). [`accept_any_model`](MockDashScopeBuilder::accept_any_model)
//! serves any name. A parameter a model refuses
//! ([`ModelInfo::unsupported_parameter`]) gets "`<400>
//! InternalError.Algo.InvalidParameter: Parameter 'temperature'=0.7 is not
//! supported for kimi-k3 model.`".
//!
//! **Function calling.** `tools`, `tool_choice` (`"auto"`, `"none"`,
//! `"required"`, a named function) and `parallel_tool_calls` (top level in
//! compatible mode, under `parameters` natively). Unless a [`Script`] says
//! otherwise, the model calls the first tool (a forced choice: the named
//! one) until the conversation's last message is a `role: "tool"` result,
//! which it answers in text. Calls carry ids `call_` + 22 hex digits
//! (seeded), and arguments as a JSON string: a minimal valid instance of the
//! tool's `parameters` schema (required properties, their types, the first
//! enum value). `finish_reason` is `"tool_calls"`, except for a forced
//! choice, which ends `"stop"` natively (the captured quirk). Streamed
//! natively, the first fragment of a call carries its `index`, `id`, `type`,
//! `name` and first argument piece, later ones `"id":""` and arguments only,
//! and the finish rides on the last fragment; compatibly, there is no empty
//! first chunk (the first fragment carries `"content":null,"role":"assistant"`),
//! continuation fragments never repeat `name` or a non-empty `id`, and the
//! finish comes in its own empty-delta chunk before `[DONE]`. The errors
//! DashScope sends are reproduced word for word: a model without function
//! calling ("The tool call is not supported."), a forced function not in
//! `tools`, an assistant message with `"tool_calls":[]`, a forced choice in
//! thinking mode.
//!
//! **JSON mode.** `response_format` `{"type":"json_object"}` answers a JSON
//! object, and needs the word "json" in a system or user message (else the
//! service's `400` "'messages' must contain the word 'json' in some form,
//! to use 'response_format' of type 'json_object'."); `json_schema` (only
//! models with [`ModelInfo::json_schema`], e.g. `qwen-plus`) answers a
//! minimal instance of `json_schema.schema`.
//!
//! **Thinking.** `enable_thinking` / `thinking_budget` on models with a
//! thinking mode ([`Thinking`]: open-source Qwen3 on by default, hybrid
//! commercial models off, QwQ/QVQ always): reasoning pieces
//! ([`reasoning_tokens`](MockDashScopeBuilder::reasoning_tokens), default
//! 12, capped by the budget) stream before the answer, natively with
//! `content` and `reasoning_content` on every chunk, a last empty chunk with
//! the finish reason and `usage.output_tokens_details.reasoning_tokens`;
//! compatibly with a first chunk `{"content":null,"role":"assistant",
//! "reasoning_content":""}`, reasoning deltas, content deltas with
//! `"reasoning_content":null`, and `usage.completion_tokens_details`.
//! Non-stream calls that would think are refused ("parameter.enable_thinking
//! must be set to false for non-streaming calls"); stream-only models refuse
//! any non-stream call ("This model only support stream mode…").
//!
//! **Scripts.** A [`Script`] says per request (by order, by number, by the
//! last user message, or with a closure over a [`ScriptRequest`]) what the
//! model decides ([`Reply`]: a text, one or several tool calls with given or
//! generated arguments, its own answer) and which [`Fault`] happens ("fail
//! the first N requests with X", throttling after three tokens, a task that
//! ends `FAILED`), so agent loops and exact failure sequences are testable
//! without hunting for seeds. See `examples/agent_loop.rs`.
//!
//! **Auth and accounts.** `Authorization: Bearer <key>` is required; each
//! key belongs to an account ([`MockDashScopeBuilder::key`]), and quotas
//! belong to (account, model), so keys of one account share them. A missing
//! or unknown key gets `401 InvalidApiKey` "Invalid API-key provided."
//! (compatible: `invalid_api_key` "Incorrect API key provided."). With no key
//! configured the mock accepts [`MockDashScope::DEFAULT_KEY`]. A key's
//! [`AccountState`] turns every call into the matching permanent error.
//! `X-DashScope-WorkSpace` is read: counted per workspace in [`Stats`] and
//! shown to scripts.
//!
//! **Validation.** Bodies over the size cap get `413`, non-JSON or
//! wrongly-typed bodies `400 InvalidParameter` (compatible
//! `invalid_parameter_error`), a missing model `400 BadRequest.EmptyModel`,
//! more texts than the model's embedding batch limit (10 for
//! `text-embedding-v3`/`v4`, 25 for `v1`/`v2`) `400` "batch size is
//! invalid…". `X-DashScope-Async: enable` on text or multimodal generation
//! is refused with `403 AccessDenied` "current user api does not support
//! asynchronous calls", as DashScope does; a task API called without it
//! gets "…does not support synchronous calls".
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
//!    `limit_burst_rate`, a stand-in);
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
//! frames after partial content, streams cut short) and a [`Latency`]; a
//! [`Script`] gives chosen requests chosen faults. [`ApiError`] has every
//! error of the catalogue, including one whose `message` holds nested JSON
//! ([`ApiError::engine_overloaded`]);
//! [`sse_without_blank_lines`](MockDashScopeBuilder::sse_without_blank_lines)
//! sends frames as older gateways do. All randomness comes from a
//! [`SeededRng`](crate::util::rng::SeededRng) seeded with
//! [`MockDashScopeBuilder::seed`] and the request's arrival number, so a
//! given seed and request order always produce the same faults, delays,
//! request ids and tool-call ids. All waits use tokio's timer, so tests run
//! under `#[tokio::test(start_paused = true)]`.
//!
//! # Counters
//!
//! [`MockHandle::stats`] returns [`Stats`]: requests, answers by status and
//! by code, tokens charged, requests in flight and their peak, calls and
//! admissions per model, streams started / completed / cancelled, resets,
//! requests per workspace, scripted requests.
//!
//! # Inferred, and a knob
//!
//! Where QWEN-API.md marks a fact as inferred (no capture), the mock follows
//! it and lets you change it:
//!
//! * a forced `tool_choice` ends `"stop"` in compatible mode too
//!   ([`compatible_forced_tool_choice_stops`](MockDashScopeBuilder::compatible_forced_tool_choice_stops));
//! * the native status of an unknown model
//!   ([`native_model_error`](MockDashScopeBuilder::native_model_error));
//! * `parallel_tool_calls` defaults to `false` (only the first of several
//!   scripted calls is sent without it);
//! * `json_schema` needs no "json" in the messages
//!   ([`json_schema_needs_json_word`](MockDashScopeBuilder::json_schema_needs_json_word));
//! * which model supports what ([`ModelInfo`]).
//!
//! These rest on inferred facts too, without a knob: the text of the errors
//! for `json_schema` or JSON mode on a model without it and for
//! `enable_thinking` on a model without thinking (the "Parameter 'x'=v is
//! not supported" template), for structured output in thinking mode and for
//! native non-incremental thinking streams; that a model of another kind
//! (an embedding model on the chat endpoint) "does not exist"; the
//! compatible codes where A2 has none (`internal_error`,
//! `service_unavailable`, `gateway_timeout`, `limit_burst_rate`,
//! `request_too_large`; the classifier reads them like their native codes);
//! the field names of `GET /api/v1/tasks`; the models list's `created` and
//! `owned_by`.
//!
//! # Not modelled
//!
//! Real token counts (the estimate is deterministic, not Qwen's tokenizer);
//! model quality (text is filler unless scripted; tool arguments are a
//! minimal schema instance, not an understanding of the conversation; a
//! schema's `pattern`, `uniqueItems` and conditionals are not honoured);
//! `n > 1`, `logprobs`, `seed`, `stop`, search, and other parameters
//! (accepted and ignored); `required` tool choice's exact semantics beyond
//! "call the first tool"; fragments of two calls in one chunk, the stray
//! empty tool-call fragment some models send, and `incremental_output:
//! false` streams with partial tool names (cumulative tool-call snapshots
//! here carry whole names); non-stream thinking answers (some third-party
//! models allow them); cached-token discounts; HTTP/2 and TLS; the
//! Anthropic-compatible and websocket APIs; the Files API beyond `purpose=batch`;
//! per-task results beyond one placeholder URL; workspace ids (any is
//! accepted) and per-workspace quotas; DashScope's own rate limits on task
//! polling and model listing; region-specific keys; the exact dynamic rule
//! of the real burst guard (DashScope does not publish it; [`BurstGuard`]
//! is a documented stand-in, off by default); output-token billing of
//! cancelled streams (a request is charged in full when admitted).
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
//!
//! A scripted tool call, as an agent's test would ask for it:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use serde_json::json;
//! use tower_qwen::mock::{MockDashScope, Reply, Script, ToolCall};
//!
//! let mock = MockDashScope::builder()
//!     .script(Script::new().then(Reply::tool_call(ToolCall::new(
//!         "get_weather",
//!         json!({"city": "Paris"}),
//!     ))))
//!     .start()
//!     .await?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let body = json!({
//!     "model": "qwen-plus",
//!     "messages": [{"role": "user", "content": "Weather in Paris?"}],
//!     "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {
//!         "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
//! });
//! let req = http::Request::post(format!("{}/chat/completions", mock.compatible_base_url()))
//!     .header("authorization", format!("Bearer {}", MockDashScope::DEFAULT_KEY))
//!     .body(Full::from(body.to_string()))?;
//! let res = client.request(req).await?;
//! let v: serde_json::Value = serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
//! let call = &v["choices"][0]["message"]["tool_calls"][0];
//! assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);
//! assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
//! # Ok(())
//! # }
//! ```

pub mod batch;
mod body;
mod chat;
mod config;
mod error;
mod handlers;
mod models;
mod quota;
mod schema;
mod script;
mod server;
mod state;
mod stats;
mod validate;

use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use self::batch::{BatchFault, BatchStats, BatchTiming};
pub use self::config::{AccountState, BurstGuard, Dist, Fault, FaultPlan, Latency, Quota};
pub use self::error::ApiError;
pub use self::models::{ModelInfo, ModelKind, NativeModelError, Thinking};
pub use self::script::{Reply, RequestKind, Script, ScriptRequest, ToolCall};
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

    /// Adds `model` to the catalogue, or replaces the model of that name.
    ///
    /// Default is [`ModelInfo::catalogue`].
    pub fn model(mut self, model: ModelInfo) -> Self {
        self.cfg.models.insert(model.name().to_owned(), model);
        self
    }

    /// Serves exactly these models: names in the catalogue keep their
    /// capabilities, other names are served as [`ModelInfo::any`] (every
    /// capability, any endpoint). Every other model gets the service's
    /// "model not found".
    ///
    /// Default is the whole [`ModelInfo::catalogue`].
    pub fn models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let mut keep = std::collections::BTreeMap::new();
        for name in models.into_iter().map(Into::into) {
            let info = self
                .cfg
                .models
                .remove(&name)
                .unwrap_or_else(|| ModelInfo::any(name.clone()));
            keep.insert(name, info);
        }
        self.cfg.models = keep;
        self
    }

    /// Serves any model name, the catalogue's with their capabilities and
    /// any other as [`ModelInfo::any`] (any endpoint, every capability).
    /// Off, an unknown model gets the service's "model not found": `404
    /// model_not_found` in compatible mode, natively per
    /// [`native_model_error`](Self::native_model_error).
    ///
    /// Default is `false`.
    pub fn accept_any_model(mut self, yes: bool) -> Self {
        self.cfg.any_model = yes;
        self
    }

    /// How the native dialect answers an unknown model (the captures
    /// disagree; see [`NativeModelError`]).
    ///
    /// Default is [`NativeModelError::InvalidParameter`] (`400` "Model not
    /// exist.").
    pub fn native_model_error(mut self, answer: NativeModelError) -> Self {
        self.cfg.native_model_error = answer;
        self
    }

    /// Marks exactly these models as stream-only (unknown names are added
    /// as [`ModelInfo::any`]); every other model serves non-stream calls.
    ///
    /// Default is the catalogue's: QwQ, QVQ and Omni models.
    #[deprecated(
        since = "0.1.0",
        note = "use `model(ModelInfo::chat(name).stream_only(true))`"
    )]
    pub fn stream_only_models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        let names: std::collections::HashSet<String> = models.into_iter().map(Into::into).collect();
        for m in self.cfg.models.values_mut() {
            *m = m.clone().stream_only(names.contains(m.name()));
        }
        for name in names {
            self.cfg
                .models
                .entry(name)
                .or_insert_with_key(|name| ModelInfo::any(name.clone()).stream_only(true));
        }
        self
    }

    /// The most texts one embedding request of `model` may carry (a model
    /// not in the catalogue yet is added as an embedding model).
    ///
    /// Default is 10 for `text-embedding-v3`/`v4`, 25 for `v1`/`v2` (the
    /// catalogue's).
    pub fn embedding_batch_limit(mut self, model: impl Into<String>, limit: NonZeroU32) -> Self {
        let model = model.into();
        let info = self
            .cfg
            .models
            .remove(&model)
            .unwrap_or_else(|| ModelInfo::embedding(model.clone()));
        self.cfg
            .models
            .insert(model, info.embedding_batch_limit(limit));
        self
    }

    /// The embedding batch limit of models outside the catalogue (served
    /// with [`accept_any_model`](Self::accept_any_model)).
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

    /// Reasoning tokens a thinking call sends before its answer (capped by
    /// the request's `thinking_budget`).
    ///
    /// Default is 12.
    pub fn reasoning_tokens(mut self, tokens: NonZeroU32) -> Self {
        self.cfg.reasoning_tokens = tokens.get();
        self
    }

    /// What the model answers, request by request (see [`Script`]).
    ///
    /// Default is no script: every request gets the mock's own answer.
    pub fn script(mut self, script: Script) -> Self {
        self.cfg.script = script;
        self
    }

    /// Whether a forced `tool_choice` (a named function or `"required"`)
    /// ends with `finish_reason: "stop"` in compatible mode, as it does
    /// natively (captured); `false` sends `"tool_calls"`. Compatible mode
    /// was not captured: `true` mirrors the native quirk (inferred).
    ///
    /// Default is `true`.
    pub fn compatible_forced_tool_choice_stops(mut self, yes: bool) -> Self {
        self.cfg.compatible_forced_finish = if yes { "stop" } else { "tool_calls" };
        self
    }

    /// Whether `response_format` `json_schema` also needs the word "json"
    /// in a system or user message, as `json_object` does. The docs say it
    /// does not; one third-party report says it does (unverified).
    ///
    /// Default is `false`.
    pub fn json_schema_needs_json_word(mut self, yes: bool) -> Self {
        self.cfg.json_schema_needs_word = yes;
        self
    }

    /// Whether event-stream frames end with a single newline instead of a
    /// blank line, as older DashScope gateways send them ("complete JSON
    /// frames without blank lines between them").
    ///
    /// Default is `false`.
    pub fn sse_without_blank_lines(mut self, yes: bool) -> Self {
        self.cfg.sse_without_blank_lines = yes;
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

    /// Replaces the script (and restarts its count of requests).
    pub fn set_script(&self, script: Script) {
        self.shared.set_script(&script);
        self.shared.cfg_mut().script = script;
    }

    /// Adds `model` to the catalogue, or replaces the model of that name.
    pub fn set_model(&self, model: ModelInfo) {
        self.shared
            .cfg_mut()
            .models
            .insert(model.name().to_owned(), model);
    }

    /// Removes `model` from the catalogue; returns whether it was there.
    pub fn remove_model(&self, model: &str) -> bool {
        self.shared.cfg_mut().models.remove(model).is_some()
    }

    /// The catalogue, by name.
    pub fn models(&self) -> Vec<ModelInfo> {
        self.shared.cfg().models.values().cloned().collect()
    }

    /// Turns frames without blank lines on or off (see
    /// [`MockDashScopeBuilder::sse_without_blank_lines`]).
    pub fn set_sse_without_blank_lines(&self, yes: bool) {
        self.shared.cfg_mut().sse_without_blank_lines = yes;
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
