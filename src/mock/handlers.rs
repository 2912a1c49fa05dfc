//! The endpoints.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use bytes::Bytes;
use serde_json::{Map, Value, json};

use super::body::{End, ScriptBody};
use super::config::Fault;
use super::error::ApiError;
use super::quota::Throttle;
use super::server::ConnCtl;
use super::state::{KeyEntry, Shared, TaskStatus, request_rng, uuid};
use crate::request::{Endpoint, Protocol, RequestInfo};
use crate::util::rng::{Rng, SeededRng};

pub(crate) const NATIVE_GENERATION: &str = "/api/v1/services/aigc/text-generation/generation";
pub(crate) const NATIVE_MULTIMODAL: &str = "/api/v1/services/aigc/multimodal-generation/generation";
pub(crate) const COMPATIBLE_CHAT: &str = "/compatible-mode/v1/chat/completions";
pub(crate) const NATIVE_EMBEDDING: &str =
    "/api/v1/services/embeddings/text-embedding/text-embedding";
pub(crate) const COMPATIBLE_EMBEDDING: &str = "/compatible-mode/v1/embeddings";

const NATIVE_SSE: &str = "text/event-stream;charset=UTF-8";
const COMPAT_SSE: &str = "text/event-stream";
const JSON: &str = "application/json";

type St = State<Arc<Shared>>;

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route(
            NATIVE_GENERATION,
            post(|s: St, c: Extension<ConnCtl>, h: HeaderMap, b: Body| {
                generate(s, c, h, b, Endpoint::NativeGeneration)
            }),
        )
        .route(
            NATIVE_MULTIMODAL,
            post(|s: St, c: Extension<ConnCtl>, h: HeaderMap, b: Body| {
                generate(s, c, h, b, Endpoint::NativeMultimodal)
            }),
        )
        .route(
            COMPATIBLE_CHAT,
            post(|s: St, c: Extension<ConnCtl>, h: HeaderMap, b: Body| {
                generate(s, c, h, b, Endpoint::CompatibleChat)
            }),
        )
        .route(
            NATIVE_EMBEDDING,
            post(|s: St, c: Extension<ConnCtl>, h: HeaderMap, b: Body| {
                embed(s, c, h, b, Endpoint::NativeEmbedding)
            }),
        )
        .route(
            COMPATIBLE_EMBEDDING,
            post(|s: St, c: Extension<ConnCtl>, h: HeaderMap, b: Body| {
                embed(s, c, h, b, Endpoint::CompatibleEmbedding)
            }),
        )
        .route("/api/v1/services/{group}/{task}/{function}", post(task_api))
        .route("/api/v1/tasks/{id}", get(task_get))
        .route("/api/v1/tasks/{id}/cancel", post(task_cancel))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(shared)
}

fn protocol_of_path(path: &str) -> Protocol {
    if path.starts_with("/compatible-mode/") {
        Protocol::Compatible
    } else {
        Protocol::Native
    }
}

fn header_is(headers: &HeaderMap, name: &str, value: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(value)))
}

/// One request's identity and helpers.
struct Ctx {
    shared: Arc<Shared>,
    protocol: Protocol,
    rid: String,
    rng: SeededRng,
    /// Error answers go out as a native `event:error` stream (see
    /// `MockDashScopeBuilder::stream_errors_as_sse`).
    sse_errors: bool,
}

impl Ctx {
    fn new(shared: Arc<Shared>, protocol: Protocol, headers: &HeaderMap) -> Self {
        let seq = shared.next_seq();
        let (seed, sse) = {
            let cfg = shared.cfg();
            (cfg.seed, cfg.stream_errors_as_sse)
        };
        let rid = uuid(&mut request_rng(seed, seq, 1));
        let rng = request_rng(seed, seq, 2);
        let sse_errors =
            sse && protocol == Protocol::Native && RequestInfo::parse("", headers, None).stream;
        Self {
            shared,
            protocol,
            rid,
            rng,
            sse_errors,
        }
    }

    fn response(&self, status: StatusCode, content_type: &'static str, body: Body) -> Response {
        let mut res = Response::new(body);
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        if let Ok(v) = header::HeaderValue::from_str(&self.rid) {
            h.insert("x-request-id", v);
        }
        h.insert(
            "x-dashscope-call-gateway",
            header::HeaderValue::from_static("true"),
        );
        res
    }

    fn json(&self, status: StatusCode, body: Bytes) -> Response {
        self.response(status, JSON, Body::from(body))
    }

    fn count_code(&self, e: &ApiError) {
        self.shared.counters.code(e.counted_code(self.protocol));
    }

    /// An error answer in the endpoint's shape.
    fn error(&self, e: &ApiError) -> Response {
        self.count_code(e);
        if self.sse_errors {
            let frame = e.sse_frame(Protocol::Native, &self.rid, 1);
            return self.response(e.status(), NATIVE_SSE, Body::from(frame));
        }
        self.json(e.status(), e.body(self.protocol, &self.rid))
    }

    fn stream(&self, body: ScriptBody) -> Response {
        let ct = match self.protocol {
            Protocol::Native => NATIVE_SSE,
            Protocol::Compatible => COMPAT_SSE,
        };
        let mut res = self.response(StatusCode::OK, ct, Body::new(body));
        res.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-cache"),
        );
        res
    }

    fn auth(&self, headers: &HeaderMap) -> Result<KeyEntry, ApiError> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let v = v.trim();
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(ApiError::invalid_api_key)?;
        self.shared
            .cfg()
            .key(key)
            .ok_or_else(ApiError::invalid_api_key)
    }

    async fn read_json(&self, body: Body) -> Result<(Bytes, Map<String, Value>), ApiError> {
        let limit = self.shared.cfg().body_limit;
        let bytes = axum::body::to_bytes(body, limit).await.map_err(|e| {
            let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(s) = src {
                if s.is::<http_body_util::LengthLimitError>() {
                    return ApiError::request_too_large();
                }
                src = s.source();
            }
            ApiError::invalid_parameter("Failed to read the request body.")
        })?;
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(map)) => Ok((bytes, map)),
            Ok(_) => Err(ApiError::invalid_parameter(
                "The request body must be a JSON object.",
            )),
            Err(_) => Err(ApiError::invalid_parameter(
                "The request body is not valid JSON.",
            )),
        }
    }

    /// The account's standing and the model's existence.
    fn check_account_and_model(&self, key: &KeyEntry, model: &str) -> Result<(), ApiError> {
        if let Some(e) = key.state.error() {
            return Err(e);
        }
        if !self.shared.cfg().model_exists(model) {
            return Err(ApiError::model_not_found(model));
        }
        Ok(())
    }
}

async fn sleep(d: Duration) {
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

fn throttle_error(t: Throttle) -> ApiError {
    match t {
        Throttle::Requests => ApiError::rate_quota(),
        Throttle::Tokens => ApiError::allocation_quota(),
        Throttle::Burst => ApiError::burst_rate(),
    }
}

// ---------------------------------------------------------------------------
// Body validation.

fn invalid(msg: String) -> ApiError {
    ApiError::invalid_parameter(msg)
}

fn opt_bool(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(format!("{at}{key} must be a boolean."))),
    }
}

fn opt_positive(obj: &Map<String, Value>, key: &str, at: &str) -> Result<Option<u32>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
            _ => Err(invalid(format!("{at}{key} must be a positive integer."))),
        },
    }
}

fn opt_object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(invalid(format!("{key} must be an object."))),
    }
}

fn model_of(obj: &Map<String, Value>, protocol: Protocol) -> Result<String, ApiError> {
    match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(match protocol {
            Protocol::Native => ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest.EmptyModel",
                "Required parameter \"model\" missing from request.",
            ),
            Protocol::Compatible => ApiError::invalid_parameter("model must be provided."),
        }),
        Some(_) => Err(invalid("model must be a non-empty string.".into())),
    }
}

fn check_messages(v: Option<&Value>, at: &str) -> Result<bool, ApiError> {
    let Some(v) = v else { return Ok(false) };
    let Some(list) = v.as_array().filter(|l| !l.is_empty()) else {
        return Err(invalid(format!("{at}messages must be a non-empty array.")));
    };
    for m in list {
        let ok = m.as_object().is_some_and(|m| {
            m.get("role").is_some_and(Value::is_string)
                && matches!(
                    m.get("content"),
                    None | Some(Value::Null | Value::String(_) | Value::Array(_))
                )
        });
        if !ok {
            return Err(invalid(format!(
                "{at}messages must be objects with a string role and a string or array content."
            )));
        }
    }
    Ok(true)
}

/// What a generation request asks for, beyond [`RequestInfo`].
#[derive(Debug)]
struct GenRequest {
    model: String,
    max_tokens: Option<u32>,
    /// Native: `parameters.incremental_output` (compatible is always
    /// incremental).
    incremental: bool,
    /// Native: `result_format: "message"` (always for multimodal).
    message_format: bool,
}

fn parse_generation(endpoint: Endpoint, obj: &Map<String, Value>) -> Result<GenRequest, ApiError> {
    let protocol = endpoint.protocol();
    let model = model_of(obj, protocol)?;
    match protocol {
        Protocol::Native => {
            let empty_input = || {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BadRequest.EmptyInput",
                    "Required input parameter missing from request.",
                )
            };
            let input = opt_object(obj, "input")?.ok_or_else(empty_input)?;
            let has_messages = check_messages(input.get("messages"), "input.")?;
            let has_prompt = match input.get("prompt") {
                None | Some(Value::Null) => false,
                Some(Value::String(_)) => true,
                Some(_) => return Err(invalid("input.prompt must be a string.".into())),
            };
            if !has_messages && !has_prompt {
                return Err(empty_input());
            }
            let empty = Map::new();
            let params = opt_object(obj, "parameters")?.unwrap_or(&empty);
            let max_tokens = opt_positive(params, "max_tokens", "parameters.")?;
            let incremental =
                opt_bool(params, "incremental_output", "parameters.")?.unwrap_or(false);
            let message_format = match params.get("result_format") {
                None | Some(Value::Null) => endpoint == Endpoint::NativeMultimodal,
                Some(Value::String(s)) if s == "message" => true,
                Some(Value::String(s)) if s == "text" => endpoint == Endpoint::NativeMultimodal,
                Some(_) => {
                    return Err(invalid(
                        "parameters.result_format must be \"text\" or \"message\".".into(),
                    ));
                }
            };
            Ok(GenRequest {
                model,
                max_tokens,
                incremental,
                message_format,
            })
        }
        Protocol::Compatible => {
            if !check_messages(obj.get("messages"), "")? {
                return Err(invalid("messages must be a non-empty array.".into()));
            }
            opt_bool(obj, "stream", "")?;
            if let Some(o) = opt_object(obj, "stream_options")? {
                opt_bool(o, "include_usage", "stream_options.")?;
            }
            let max_tokens = match opt_positive(obj, "max_completion_tokens", "")? {
                Some(n) => Some(n),
                None => opt_positive(obj, "max_tokens", "")?,
            };
            Ok(GenRequest {
                model,
                max_tokens,
                incremental: true,
                message_format: true,
            })
        }
    }
}

// ---------------------------------------------------------------------------
// Generation.

/// The reply text: every piece is four ASCII bytes, so each is exactly one
/// token by [`crate::tokens::estimate_text_tokens`].
const REPLY: &str = "This is a deterministic reply from the mock DashScope server, four \
                     bytes per token. ";
const _: () = assert!(REPLY.len().is_multiple_of(4));

fn piece(k: u32) -> &'static str {
    let n = REPLY.len() / 4;
    let i = (k as usize % n) * 4;
    &REPLY[i..i + 4]
}

fn text_upto(n: u32) -> String {
    (0..n).map(piece).collect()
}

/// Everything needed to render one generation.
struct Generation {
    endpoint: Endpoint,
    model: String,
    input: u32,
    output: u32,
    finish: &'static str,
    incremental: bool,
    message_format: bool,
    include_usage: bool,
    created: u64,
}

impl Generation {
    fn native_output(&self, content: String, finish: &str) -> Value {
        if !self.message_format {
            return json!({ "text": content, "finish_reason": finish });
        }
        let content = if self.endpoint == Endpoint::NativeMultimodal {
            json!([{ "text": content }])
        } else {
            Value::String(content)
        };
        json!({
            "choices": [{
                "finish_reason": finish,
                "message": { "role": "assistant", "content": content },
            }]
        })
    }

    fn native_usage(&self, output: u32) -> Value {
        json!({
            "input_tokens": self.input,
            "output_tokens": output,
            "total_tokens": self.input + output,
        })
    }

    fn compat_usage(&self) -> Value {
        json!({
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.input + self.output,
            "prompt_tokens_details": { "cached_tokens": 0 },
        })
    }

    /// The non-stream body.
    fn body(&self, rid: &str) -> Bytes {
        let v = match self.endpoint.protocol() {
            Protocol::Native => json!({
                "output": self.native_output(text_upto(self.output), self.finish),
                "usage": self.native_usage(self.output),
                "request_id": rid,
            }),
            Protocol::Compatible => json!({
                "choices": [{
                    "message": { "role": "assistant", "content": text_upto(self.output) },
                    "finish_reason": self.finish,
                    "index": 0,
                    "logprobs": null,
                }],
                "object": "chat.completion",
                "usage": self.compat_usage(),
                "created": self.created,
                "system_fingerprint": null,
                "model": self.model,
                "id": format!("chatcmpl-{rid}"),
            }),
        };
        Bytes::from(v.to_string())
    }

    fn compat_chunk(&self, rid: &str, choices: Value, usage: Option<Value>) -> Bytes {
        let mut v = json!({
            "id": format!("chatcmpl-{rid}"),
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {v}\n\n"))
    }

    /// The stream's frames, each with the delay before it. `cut`: stop
    /// after that many tokens, without any final frame.
    fn frames(
        &self,
        rid: &str,
        gaps: &[Duration],
        cut: Option<u32>,
    ) -> VecDeque<(Duration, Bytes)> {
        let tokens = cut.unwrap_or(self.output).min(self.output);
        let gap = |i: u32| -> Duration {
            // Delay before token i (1-based).
            if i <= 1 {
                Duration::ZERO
            } else {
                gaps.get(i as usize - 2).copied().unwrap_or_default()
            }
        };
        let mut out = VecDeque::with_capacity(tokens as usize + 4);
        match self.endpoint.protocol() {
            Protocol::Native => {
                for i in 1..=tokens {
                    let content = if self.incremental {
                        piece(i - 1).to_owned()
                    } else {
                        text_upto(i)
                    };
                    let finish = if i == self.output {
                        self.finish
                    } else {
                        "null"
                    };
                    let data = json!({
                        "output": self.native_output(content, finish),
                        "usage": self.native_usage(i),
                        "request_id": rid,
                    });
                    out.push_back((
                        gap(i),
                        Bytes::from(format!(
                            "id:{i}\nevent:result\n:HTTP_STATUS/200\ndata:{data}\n\n"
                        )),
                    ));
                }
            }
            Protocol::Compatible => {
                let choice = |delta: Value, finish: Value| json!([{ "index": 0, "delta": delta, "logprobs": null, "finish_reason": finish }]);
                out.push_back((
                    Duration::ZERO,
                    self.compat_chunk(
                        rid,
                        choice(json!({ "role": "assistant", "content": "" }), Value::Null),
                        None,
                    ),
                ));
                for i in 1..=tokens {
                    out.push_back((
                        gap(i),
                        self.compat_chunk(
                            rid,
                            choice(json!({ "content": piece(i - 1) }), Value::Null),
                            None,
                        ),
                    ));
                }
                if cut.is_none() {
                    out.push_back((
                        Duration::ZERO,
                        self.compat_chunk(rid, choice(json!({}), json!(self.finish)), None),
                    ));
                    if self.include_usage {
                        out.push_back((
                            Duration::ZERO,
                            self.compat_chunk(rid, json!([]), Some(self.compat_usage())),
                        ));
                    }
                    out.push_back((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));
                }
            }
        }
        out
    }

    /// Index in `frames` of token `i` (1-based).
    fn frame_index(&self, i: u32) -> usize {
        match self.endpoint.protocol() {
            Protocol::Native => i as usize - 1,
            Protocol::Compatible => i as usize,
        }
    }
}

/// Output tokens and finish reason: the configured default, capped by
/// `max_tokens` ("length" when the cap cut it short).
fn output_len(default: u32, max_tokens: Option<u32>) -> (u32, &'static str) {
    let default = default.max(1);
    match max_tokens {
        Some(m) if m < default => (m, "length"),
        _ => (default, "stop"),
    }
}

async fn generate(
    State(shared): St,
    Extension(conn): Extension<ConnCtl>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let protocol = endpoint.protocol();
    let mut ctx = Ctx::new(shared.clone(), protocol, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    let (bytes, obj) = match ctx.read_json(body).await {
        Ok(x) => x,
        Err(e) => return ctx.error(&e),
    };
    let req = match parse_generation(endpoint, &obj) {
        Ok(r) => r,
        Err(e) => return ctx.error(&e),
    };
    let path = match endpoint {
        Endpoint::NativeGeneration => NATIVE_GENERATION,
        Endpoint::NativeMultimodal => NATIVE_MULTIMODAL,
        _ => COMPATIBLE_CHAT,
    };
    let info = RequestInfo::parse(path, &headers, Some(&bytes));
    let stream = info.stream;
    let (quota, burst, plan, default_output, stream_only, as_sse) = {
        let cfg = shared.cfg();
        (
            cfg.quota(&req.model),
            cfg.burst,
            cfg.plan(&req.model),
            cfg.output_tokens,
            cfg.stream_only.contains(&req.model),
            cfg.stream_errors_as_sse,
        )
    };
    ctx.sse_errors = as_sse && stream && protocol == Protocol::Native;
    if let Err(e) = ctx.check_account_and_model(&key, &req.model) {
        return ctx.error(&e);
    }
    if protocol == Protocol::Native && header_is(&headers, "x-dashscope-async", "enable") {
        return ctx.error(&ApiError::async_not_supported());
    }
    if stream_only && !stream {
        return ctx.error(&ApiError::stream_only());
    }
    shared.counters.call(&req.model);

    let input = info.input_tokens;
    let (output, finish) = output_len(default_output, req.max_tokens);
    let u_sse = ctx.rng.next_f64();
    let u_fault = ctx.rng.next_f64();
    let charge = u64::from(input) + u64::from(output);
    if let Err(t) = shared.admit(&key.account, &req.model, charge, &quota, burst.as_ref()) {
        let e = throttle_error(t);
        if stream && protocol == Protocol::Native && u_sse < plan.throttled_stream_as_sse {
            ctx.count_code(&e);
            let frames = VecDeque::from([(Duration::ZERO, e.sse_frame(protocol, &ctx.rid, 1))]);
            return ctx.stream(ScriptBody::new(
                frames,
                End::Complete,
                conn,
                shared.counters.clone(),
                true,
            ));
        }
        return ctx.error(&e);
    }
    shared
        .counters
        .admitted(&req.model, u64::from(input), u64::from(output));

    let ttfh = plan.latency.time_to_headers.sample(&mut ctx.rng);
    let gaps: Vec<Duration> = if plan.latency.per_token.is_zero() {
        Vec::new()
    } else {
        (1..output)
            .map(|_| plan.latency.per_token.sample(&mut ctx.rng))
            .collect()
    };
    let g = Generation {
        endpoint,
        model: req.model,
        input,
        output,
        finish,
        incremental: req.incremental,
        message_format: req.message_format,
        include_usage: info.include_usage,
        created: shared.created(),
    };
    let fault = plan.pick(u_fault).cloned();
    serve_generation(ctx, conn, g, stream, ttfh, gaps, fault).await
}

async fn serve_generation(
    ctx: Ctx,
    conn: ConnCtl,
    g: Generation,
    stream: bool,
    ttfh: Duration,
    gaps: Vec<Duration>,
    fault: Option<Fault>,
) -> Response {
    let counters = ctx.shared.counters.clone();
    let last = g.output - 1;
    let gen_time: Duration = gaps.iter().sum();
    match fault {
        Some(Fault::Reset) => return reset(&ctx, &conn).await,
        Some(Fault::Error(e)) => {
            sleep(ttfh).await;
            return ctx.error(&e);
        }
        Some(Fault::StreamError { error, .. }) if !stream => {
            sleep(ttfh).await;
            return ctx.error(&error);
        }
        Some(Fault::ErrorIn200(e)) => {
            sleep(ttfh).await;
            ctx.count_code(&e);
            return ctx.json(StatusCode::OK, e.body(ctx.protocol, &ctx.rid));
        }
        _ => {}
    }
    sleep(ttfh).await;
    if !stream {
        match fault {
            Some(Fault::Stall { duration, .. }) => match duration {
                Some(d) => sleep(d).await,
                None => std::future::pending::<()>().await,
            },
            Some(Fault::ResetMidBody { .. }) => {
                sleep(gen_time).await;
                return partial_body(&ctx, conn, g.body(&ctx.rid));
            }
            _ => {}
        }
        sleep(gen_time).await;
        return ctx.json(StatusCode::OK, g.body(&ctx.rid));
    }
    let rid = ctx.rid.clone();
    let (frames, end) = match fault {
        Some(Fault::Stall {
            after_tokens,
            duration: Some(d),
        }) => {
            let mut frames = g.frames(&rid, &gaps, None);
            let at = g.frame_index(after_tokens.min(last) + 1);
            if let Some(f) = frames.get_mut(at) {
                f.0 += d;
            }
            (frames, End::Complete)
        }
        Some(Fault::Stall {
            after_tokens,
            duration: None,
        }) => (
            g.frames(&rid, &gaps, Some(after_tokens.min(last))),
            End::StallForever,
        ),
        Some(Fault::ResetMidBody { after_tokens }) => (
            g.frames(&rid, &gaps, Some(after_tokens.min(last))),
            End::Reset,
        ),
        Some(Fault::StreamError {
            after_tokens,
            error,
        }) => {
            let a = after_tokens.min(last);
            let mut frames = g.frames(&rid, &gaps, Some(a));
            let gap = if a == 0 {
                Duration::ZERO
            } else {
                gaps.get(a as usize - 1).copied().unwrap_or_default()
            };
            ctx.count_code(&error);
            frames.push_back((gap, error.sse_frame(ctx.protocol, &rid, a + 1)));
            (frames, End::Complete)
        }
        Some(Fault::StreamCut { after_tokens }) => (
            g.frames(&rid, &gaps, Some(after_tokens.min(last))),
            End::Complete,
        ),
        _ => (g.frames(&rid, &gaps, None), End::Complete),
    };
    ctx.stream(ScriptBody::new(frames, end, conn, counters, true))
}

/// Drops the connection without an answer.
async fn reset(ctx: &Ctx, conn: &ConnCtl) -> Response {
    ctx.shared.counters.reset_conn();
    conn.kill();
    std::future::pending().await
}

/// Headers with the full `content-length`, half the body, then a reset.
fn partial_body(ctx: &Ctx, conn: ConnCtl, full: Bytes) -> Response {
    let len = full.len();
    let half = full.slice(..len / 2);
    let body = ScriptBody::new(
        VecDeque::from([(Duration::ZERO, half)]),
        End::Reset,
        conn,
        ctx.shared.counters.clone(),
        false,
    );
    let mut res = ctx.response(StatusCode::OK, JSON, Body::new(body));
    res.headers_mut()
        .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    res
}

// ---------------------------------------------------------------------------
// Embeddings.

fn texts_of(v: Option<&Value>, at: &str) -> Result<Vec<String>, ApiError> {
    let bad = || {
        invalid(format!(
            "{at} must be a string or a non-empty array of strings."
        ))
    };
    match v {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|t| t.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        _ => Err(bad()),
    }
}

/// A deterministic unit vector for `text`: the same text always embeds the
/// same way, whatever the seed.
fn embedding(text: &str, dimension: u32) -> Vec<f32> {
    // FNV-1a of the text seeds the generator.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut rng = SeededRng::new(h);
    let mut v: Vec<f64> = (0..dimension).map(|_| rng.next_f64() * 2.0 - 1.0).collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    v.iter_mut().for_each(|x| *x /= norm);
    v.into_iter().map(|x| x as f32).collect()
}

async fn embed(
    State(shared): St,
    Extension(conn): Extension<ConnCtl>,
    headers: HeaderMap,
    body: Body,
    endpoint: Endpoint,
) -> Response {
    let protocol = endpoint.protocol();
    let mut ctx = Ctx::new(shared.clone(), protocol, &headers);
    ctx.sse_errors = false;
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    let (bytes, obj) = match ctx.read_json(body).await {
        Ok(x) => x,
        Err(e) => return ctx.error(&e),
    };
    if protocol == Protocol::Native && header_is(&headers, "x-dashscope-async", "enable") {
        // Batch embedding (`BatchTextEmbedding`) is an async task on the
        // same path.
        return submit_task(&ctx, &key, &obj);
    }
    let parsed = (|| {
        let model = model_of(&obj, protocol)?;
        let (texts, dimension) = match protocol {
            Protocol::Native => {
                let input = opt_object(&obj, "input")?
                    .ok_or_else(|| invalid("input.texts must be provided.".into()))?;
                let texts = texts_of(input.get("texts"), "input.texts")?;
                let empty = Map::new();
                let params = opt_object(&obj, "parameters")?.unwrap_or(&empty);
                (texts, opt_positive(params, "dimension", "parameters.")?)
            }
            Protocol::Compatible => (
                texts_of(obj.get("input"), "input")?,
                opt_positive(&obj, "dimensions", "")?,
            ),
        };
        Ok::<_, ApiError>((model, texts, dimension))
    })();
    let (model, texts, dimension) = match parsed {
        Ok(x) => x,
        Err(e) => return ctx.error(&e),
    };
    let (quota, burst, plan, limit, default_dim) = {
        let cfg = shared.cfg();
        (
            cfg.quota(&model),
            cfg.burst,
            cfg.plan(&model),
            cfg.embedding_limit(&model),
            cfg.default_dimension,
        )
    };
    let dimension = dimension.unwrap_or(default_dim);
    if dimension > 8192 {
        return ctx.error(&invalid(format!(
            "dimension is invalid, it should not be larger than 8192: {dimension}."
        )));
    }
    if let Err(e) = ctx.check_account_and_model(&key, &model) {
        return ctx.error(&e);
    }
    if texts.len() > limit as usize {
        return ctx.error(&invalid(format!(
            "batch size is invalid, it should not be larger than {limit}."
        )));
    }
    shared.counters.call(&model);
    let path = match protocol {
        Protocol::Native => NATIVE_EMBEDDING,
        Protocol::Compatible => COMPATIBLE_EMBEDDING,
    };
    let input = RequestInfo::parse(path, &headers, Some(&bytes)).input_tokens;
    let _u_sse = ctx.rng.next_f64();
    let u_fault = ctx.rng.next_f64();
    if let Err(t) = shared.admit(
        &key.account,
        &model,
        u64::from(input),
        &quota,
        burst.as_ref(),
    ) {
        return ctx.error(&throttle_error(t));
    }
    shared.counters.admitted(&model, u64::from(input), 0);
    let ttfh = plan.latency.time_to_headers.sample(&mut ctx.rng);
    let fault = plan.pick(u_fault).cloned();
    let make_body = || {
        let v = match protocol {
            Protocol::Native => json!({
                "output": {
                    "embeddings": texts.iter().enumerate().map(|(i, t)| json!({
                        "text_index": i,
                        "embedding": embedding(t, dimension),
                    })).collect::<Vec<_>>(),
                },
                "usage": { "total_tokens": input },
                "request_id": ctx.rid,
            }),
            Protocol::Compatible => json!({
                "data": texts.iter().enumerate().map(|(i, t)| json!({
                    "embedding": embedding(t, dimension),
                    "index": i,
                    "object": "embedding",
                })).collect::<Vec<_>>(),
                "model": model,
                "object": "list",
                "usage": { "prompt_tokens": input, "total_tokens": input },
                "id": ctx.rid,
            }),
        };
        Bytes::from(v.to_string())
    };
    match fault {
        Some(Fault::Reset) => reset(&ctx, &conn).await,
        Some(Fault::Error(e) | Fault::StreamError { error: e, .. }) => {
            sleep(ttfh).await;
            ctx.error(&e)
        }
        Some(Fault::ErrorIn200(e)) => {
            sleep(ttfh).await;
            ctx.count_code(&e);
            ctx.json(StatusCode::OK, e.body(protocol, &ctx.rid))
        }
        Some(Fault::Stall { duration, .. }) => {
            sleep(ttfh).await;
            match duration {
                Some(d) => sleep(d).await,
                None => std::future::pending::<()>().await,
            }
            ctx.json(StatusCode::OK, make_body())
        }
        Some(Fault::ResetMidBody { .. }) => {
            sleep(ttfh).await;
            partial_body(&ctx, conn, make_body())
        }
        _ => {
            sleep(ttfh).await;
            ctx.json(StatusCode::OK, make_body())
        }
    }
}

// ---------------------------------------------------------------------------
// Async tasks.

fn submit_task(ctx: &Ctx, key: &KeyEntry, obj: &Map<String, Value>) -> Response {
    let model = match model_of(obj, Protocol::Native) {
        Ok(m) => m,
        Err(e) => return ctx.error(&e),
    };
    if let Err(e) = ctx.check_account_and_model(key, &model) {
        return ctx.error(&e);
    }
    let shared = &ctx.shared;
    shared.counters.call(&model);
    let (quota, burst) = {
        let cfg = shared.cfg();
        (cfg.quota(&model), cfg.burst)
    };
    if let Err(t) = shared.admit(&key.account, &model, 0, &quota, burst.as_ref()) {
        return ctx.error(&throttle_error(t));
    }
    shared.counters.admitted(&model, 0, 0);
    let task_id = uuid(&mut ctx.rng.clone());
    shared.add_task(task_id.clone(), key.account.clone());
    let body = json!({
        "output": { "task_id": task_id, "task_status": "PENDING" },
        "request_id": ctx.rid,
    });
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
}

async fn task_api(State(shared): St, headers: HeaderMap, body: Body) -> Response {
    let ctx = Ctx::new(shared, Protocol::Native, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    if !header_is(&headers, "x-dashscope-async", "enable") {
        return ctx.error(&ApiError::sync_not_supported());
    }
    match ctx.read_json(body).await {
        Ok((_, obj)) => submit_task(&ctx, &key, &obj),
        Err(e) => ctx.error(&e),
    }
}

async fn task_get(State(shared): St, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Native, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    let status = shared.task_status(&id, &key.account);
    let output = match status {
        None => json!({ "task_id": id, "task_status": "UNKNOWN" }),
        Some(TaskStatus::Succeeded) => json!({
            "task_id": id,
            "task_status": "SUCCEEDED",
            "results": [{ "url": format!("https://dashscope-result.mock.invalid/{id}/0.png") }],
            "task_metrics": { "TOTAL": 1, "SUCCEEDED": 1, "FAILED": 0 },
        }),
        Some(s) => json!({ "task_id": id, "task_status": s.as_str() }),
    };
    let mut body = json!({ "request_id": ctx.rid, "output": output });
    if status == Some(TaskStatus::Succeeded) {
        body["usage"] = json!({ "image_count": 1 });
    }
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
}

async fn task_cancel(State(shared): St, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Native, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    match shared.cancel_task(&id, &key.account) {
        Some(TaskStatus::Pending) => ctx.json(
            StatusCode::OK,
            Bytes::from(json!({ "request_id": ctx.rid }).to_string()),
        ),
        _ => ctx.error(&ApiError::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedOperation",
            "Failed to cancel the task, please confirm if the task is in PENDING status.",
        )),
    }
}

// ---------------------------------------------------------------------------
// Everything else.

async fn not_found(State(shared): St, uri: Uri, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared, protocol_of_path(uri.path()), &headers);
    ctx.error(&ApiError::new(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("The requested path {} is not served.", uri.path()),
    ))
}

async fn method_not_allowed(State(shared): St, uri: Uri, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared, protocol_of_path(uri.path()), &headers);
    ctx.error(&ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "The request method is not allowed for this path.",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::estimate_text_tokens;

    #[test]
    fn reply_pieces_are_one_token_each() {
        for n in [1, 7, 20, 100] {
            assert_eq!(estimate_text_tokens(&text_upto(n)), n);
        }
    }

    #[test]
    fn output_is_capped_by_max_tokens() {
        assert_eq!(output_len(20, None), (20, "stop"));
        assert_eq!(output_len(20, Some(5)), (5, "length"));
        assert_eq!(output_len(20, Some(20)), (20, "stop"));
        assert_eq!(output_len(0, None), (1, "stop"));
    }

    #[test]
    fn embeddings_are_unit_vectors_and_deterministic() {
        let a = embedding("hello", 64);
        assert_eq!(a.len(), 64);
        assert_eq!(a, embedding("hello", 64));
        assert_ne!(a, embedding("world", 64));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}
