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
use super::chat;
use super::config::Fault;
use super::error::ApiError;
use super::models::ModelKind;
use super::quota::Throttle;
use super::script::{Reply, RequestKind, ScriptRequest};
use super::server::ConnCtl;
use super::state::{KeyEntry, Shared, TaskStatus, TaskView, request_rng, uuid};
use super::validate::{invalid, model_of, opt_object, opt_positive};
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
        .route("/api/v1/tasks", get(task_list))
        .route("/api/v1/tasks/{id}", get(task_get))
        .route("/api/v1/tasks/{id}/cancel", post(task_cancel))
        .route("/api/v1/models", get(native_models))
        .route("/compatible-mode/v1/models", get(compatible_models))
        .route("/compatible-mode/v1/models/{id}", get(compatible_model))
        .merge(super::batch::routes(&shared))
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
    /// The request's arrival number (seeds its randomness).
    seq: u64,
    rid: String,
    rng: SeededRng,
    /// Error answers go out as a native `event:error` stream (see
    /// `MockDashScopeBuilder::stream_errors_as_sse`).
    sse_errors: bool,
    /// Event-stream frames end with one newline, not a blank line.
    no_blank_lines: bool,
    /// `X-DashScope-WorkSpace`.
    workspace: Option<String>,
}

impl Ctx {
    fn new(shared: Arc<Shared>, protocol: Protocol, headers: &HeaderMap) -> Self {
        let seq = shared.next_seq();
        let (seed, sse, no_blank_lines) = {
            let cfg = shared.cfg();
            (
                cfg.seed,
                cfg.stream_errors_as_sse,
                cfg.sse_without_blank_lines,
            )
        };
        let rid = uuid(&mut request_rng(seed, seq, 1));
        let rng = request_rng(seed, seq, 2);
        let sse_errors =
            sse && protocol == Protocol::Native && RequestInfo::parse("", headers, None).stream;
        let workspace = headers
            .get("x-dashscope-workspace")
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|w| !w.is_empty())
            .map(str::to_owned);
        if let Some(w) = &workspace {
            shared.counters.workspace(w);
        }
        Self {
            shared,
            protocol,
            seq,
            rid,
            rng,
            sse_errors,
            no_blank_lines,
            workspace,
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
            let mut frame =
                VecDeque::from([(Duration::ZERO, e.sse_frame(Protocol::Native, &self.rid, 1))]);
            if self.no_blank_lines {
                squash(&mut frame);
            }
            let body = frame.pop_front().map(|f| f.1).unwrap_or_default();
            return self.response(e.status(), NATIVE_SSE, Body::from(body));
        }
        self.json(e.status(), e.body(self.protocol, &self.rid))
    }

    /// A `200` event stream of `frames`, then `end`.
    fn stream(&self, mut frames: VecDeque<(Duration, Bytes)>, end: End, conn: ConnCtl) -> Response {
        if self.no_blank_lines {
            squash(&mut frames);
        }
        let body = ScriptBody::new(frames, end, conn, self.shared.counters.clone(), true);
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

    /// The account's standing, and the model as served at an endpoint of
    /// `kind`.
    fn check_account_and_model(
        &self,
        key: &KeyEntry,
        model: &str,
        kind: ModelKind,
    ) -> Result<super::models::ModelInfo, ApiError> {
        if let Some(e) = key.state.error() {
            return Err(e);
        }
        self.shared.cfg().model_for(model, kind, self.protocol)
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
// Generation.

/// Frames end with a single newline instead of a blank line (older
/// gateways), when configured.
fn squash(frames: &mut VecDeque<(Duration, Bytes)>) {
    for (_, f) in frames.iter_mut() {
        if f.ends_with(b"\n\n") {
            *f = f.slice(..f.len() - 1);
        }
    }
}

/// Whether a fault replaces the whole answer (no content is generated).
fn is_answer_fault(f: &Fault) -> bool {
    matches!(f, Fault::Error(_) | Fault::ErrorIn200(_) | Fault::Reset)
}

/// Asks the script about a request, counting it when a rule answers.
fn scripted<'a>(ctx: &Ctx, view: impl FnOnce(u64) -> ScriptRequest<'a>) -> Reply {
    match ctx.shared.script(view) {
        Some(r) => {
            ctx.shared.counters.scripted();
            r
        }
        None => Reply::default(),
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
    let req = match chat::parse(endpoint, &obj) {
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
    let (model, quota, burst, plan, defaults, rules, as_sse) = {
        let cfg = shared.cfg();
        (
            cfg.model_for(&req.model, ModelKind::Chat, protocol),
            cfg.quota(&req.model),
            cfg.burst,
            cfg.plan(&req.model),
            chat::Defaults {
                output_tokens: cfg.output_tokens,
                reasoning_tokens: cfg.reasoning_tokens,
                compatible_forced_finish: cfg.compatible_forced_finish,
            },
            chat::Rules {
                json_schema_needs_word: cfg.json_schema_needs_word,
            },
            cfg.stream_errors_as_sse,
        )
    };
    ctx.sse_errors = as_sse && stream && protocol == Protocol::Native;
    if let Some(e) = key.state.error() {
        return ctx.error(&e);
    }
    let model = match model {
        Ok(m) => m,
        Err(e) => return ctx.error(&e),
    };
    if protocol == Protocol::Native && header_is(&headers, "x-dashscope-async", "enable") {
        return ctx.error(&ApiError::async_not_supported());
    }
    let thinking = match chat::check(&req, &obj, protocol, &model, stream, rules) {
        Ok(t) => t,
        Err(e) => return ctx.error(&e),
    };
    shared.counters.call(&req.model);
    let reply = scripted(&ctx, |seq| ScriptRequest {
        seq,
        kind: RequestKind::Chat,
        compatible: protocol == Protocol::Compatible,
        stream,
        model: &req.model,
        body: &obj,
        messages: &req.messages,
        workspace: ctx.workspace.as_deref(),
    });

    let u_sse = ctx.rng.next_f64();
    let u_fault = ctx.rng.next_f64();
    let fault = match &reply.fault {
        Some(f) => Some(f.clone()),
        None => plan.pick(u_fault).cloned(),
    };
    if let Some(f) = reply.fault.as_ref().filter(|f| is_answer_fault(f)) {
        // A scripted error answer replaces the call before the quota.
        let ttfh = plan.latency.time_to_headers.sample(&mut ctx.rng);
        return serve_answer_fault(&ctx, &conn, f, stream, ttfh).await;
    }

    let input = info.input_tokens;
    let mut ids = request_rng(shared.cfg().seed, ctx.seq, 3);
    let answer = chat::Plan::new(&req, protocol, thinking, &reply, &defaults, &mut ids);
    let output = answer.output;
    let charge = u64::from(input) + u64::from(output);
    if let Err(t) = shared.admit(&key.account, &req.model, charge, &quota, burst.as_ref()) {
        let e = throttle_error(t);
        if stream && protocol == Protocol::Native && u_sse < plan.throttled_stream_as_sse {
            ctx.count_code(&e);
            let frames = VecDeque::from([(Duration::ZERO, e.sse_frame(protocol, &ctx.rid, 1))]);
            return ctx.stream(frames, End::Complete, conn);
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
        (1..answer.pieces())
            .map(|_| plan.latency.per_token.sample(&mut ctx.rng))
            .collect()
    };
    let g = chat::Generation {
        endpoint,
        model: req.model,
        input,
        plan: answer,
        incremental: req.incremental,
        message_format: req.message_format,
        include_usage: info.include_usage,
        created: shared.created(),
    };
    serve_generation(ctx, conn, g, stream, ttfh, gaps, fault).await
}

/// Answers with a fault that replaces the whole answer.
async fn serve_answer_fault(
    ctx: &Ctx,
    conn: &ConnCtl,
    fault: &Fault,
    stream: bool,
    ttfh: Duration,
) -> Response {
    match fault {
        Fault::Reset => reset(ctx, conn).await,
        Fault::ErrorIn200(e) => {
            sleep(ttfh).await;
            ctx.count_code(e);
            ctx.json(StatusCode::OK, e.body(ctx.protocol, &ctx.rid))
        }
        Fault::StreamError { error: e, .. } | Fault::Error(e) => {
            sleep(ttfh).await;
            let _ = stream;
            ctx.error(e)
        }
        _ => ctx.error(&ApiError::internal_error()),
    }
}

async fn serve_generation(
    ctx: Ctx,
    conn: ConnCtl,
    g: chat::Generation,
    stream: bool,
    ttfh: Duration,
    gaps: Vec<Duration>,
    fault: Option<Fault>,
) -> Response {
    let last = g.plan.pieces().saturating_sub(1);
    let gen_time: Duration = gaps.iter().sum();
    match &fault {
        Some(f) if is_answer_fault(f) => {
            return serve_answer_fault(&ctx, &conn, f, stream, ttfh).await;
        }
        Some(f @ Fault::StreamError { .. }) if !stream => {
            return serve_answer_fault(&ctx, &conn, f, stream, ttfh).await;
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
            let id = u32::try_from(frames.len())
                .unwrap_or(u32::MAX)
                .saturating_add(1);
            frames.push_back((gap, error.sse_frame(ctx.protocol, &rid, id)));
            (frames, End::Complete)
        }
        Some(Fault::StreamCut { after_tokens }) => (
            g.frames(&rid, &gaps, Some(after_tokens.min(last))),
            End::Complete,
        ),
        _ => (g.frames(&rid, &gaps, None), End::Complete),
    };
    ctx.stream(frames, end, conn)
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
        return submit_task(&ctx, &conn, &key, &obj).await;
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
    let (quota, burst, plan, default_dim) = {
        let cfg = shared.cfg();
        (
            cfg.quota(&model),
            cfg.burst,
            cfg.plan(&model),
            cfg.default_dimension,
        )
    };
    let dimension = dimension.unwrap_or(default_dim);
    if dimension > 8192 {
        return ctx.error(&invalid(format!(
            "dimension is invalid, it should not be larger than 8192: {dimension}."
        )));
    }
    let info = match ctx.check_account_and_model(&key, &model, ModelKind::Embedding) {
        Ok(m) => m,
        Err(e) => return ctx.error(&e),
    };
    let limit = info.get_embedding_batch_limit();
    if texts.len() > limit as usize {
        return ctx.error(&invalid(format!(
            "batch size is invalid, it should not be larger than {limit}."
        )));
    }
    shared.counters.call(&model);
    let reply = scripted(&ctx, |seq| ScriptRequest {
        seq,
        kind: RequestKind::Embedding,
        compatible: protocol == Protocol::Compatible,
        stream: false,
        model: &model,
        body: &obj,
        messages: &[],
        workspace: ctx.workspace.as_deref(),
    });
    let path = match protocol {
        Protocol::Native => NATIVE_EMBEDDING,
        Protocol::Compatible => COMPATIBLE_EMBEDDING,
    };
    let input = RequestInfo::parse(path, &headers, Some(&bytes)).input_tokens;
    let _u_sse = ctx.rng.next_f64();
    let u_fault = ctx.rng.next_f64();
    if let Some(f) = reply.fault.as_ref().filter(|f| is_answer_fault(f)) {
        let ttfh = plan.latency.time_to_headers.sample(&mut ctx.rng);
        return serve_answer_fault(&ctx, &conn, f, false, ttfh).await;
    }
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
    let fault = reply.fault.or_else(|| plan.pick(u_fault).cloned());
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

async fn submit_task(
    ctx: &Ctx,
    conn: &ConnCtl,
    key: &KeyEntry,
    obj: &Map<String, Value>,
) -> Response {
    let model = match model_of(obj, Protocol::Native) {
        Ok(m) => m,
        Err(e) => return ctx.error(&e),
    };
    if let Err(e) = ctx.check_account_and_model(key, &model, ModelKind::Task) {
        return ctx.error(&e);
    }
    let shared = &ctx.shared;
    shared.counters.call(&model);
    let reply = scripted(ctx, |seq| ScriptRequest {
        seq,
        kind: RequestKind::Task,
        compatible: false,
        stream: false,
        model: &model,
        body: obj,
        messages: &[],
        workspace: ctx.workspace.as_deref(),
    });
    if let Some(f) = &reply.fault {
        return serve_answer_fault(ctx, conn, f, false, Duration::ZERO).await;
    }
    let (quota, burst) = {
        let cfg = shared.cfg();
        (cfg.quota(&model), cfg.burst)
    };
    if let Err(t) = shared.admit(&key.account, &model, 0, &quota, burst.as_ref()) {
        return ctx.error(&throttle_error(t));
    }
    shared.counters.admitted(&model, 0, 0);
    let task_id = uuid(&mut ctx.rng.clone());
    shared.add_task(
        task_id.clone(),
        key.account.clone(),
        model,
        reply.task_failure,
    );
    let body = json!({
        "output": { "task_id": task_id, "task_status": "PENDING" },
        "request_id": ctx.rid,
    });
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
}

async fn task_api(
    State(shared): St,
    Extension(conn): Extension<ConnCtl>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let ctx = Ctx::new(shared, Protocol::Native, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    if !header_is(&headers, "x-dashscope-async", "enable") {
        return ctx.error(&ApiError::sync_not_supported());
    }
    match ctx.read_json(body).await {
        Ok((_, obj)) => submit_task(&ctx, &conn, &key, &obj).await,
        Err(e) => ctx.error(&e),
    }
}

/// A task's `output` as polled.
fn task_output(id: &str, view: Option<&TaskView>) -> Value {
    match view {
        None => json!({ "task_id": id, "task_status": "UNKNOWN" }),
        Some(v) => match v.status {
            TaskStatus::Succeeded => json!({
                "task_id": id,
                "task_status": "SUCCEEDED",
                "results": [{ "url": format!("https://dashscope-result.mock.invalid/{id}/0.png") }],
                "task_metrics": { "TOTAL": 1, "SUCCEEDED": 1, "FAILED": 0 },
            }),
            TaskStatus::Failed => {
                let e = v.failure.clone().unwrap_or_else(ApiError::internal_error);
                json!({
                    "task_id": id,
                    "task_status": "FAILED",
                    "code": e.code(),
                    "message": e.message(),
                })
            }
            s => json!({ "task_id": id, "task_status": s.as_str() }),
        },
    }
}

async fn task_get(State(shared): St, Path(id): Path<String>, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Native, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    let view = shared.task(&id, &key.account);
    let mut body = json!({ "request_id": ctx.rid, "output": task_output(&id, view.as_ref()) });
    if view.is_some_and(|v| v.status == TaskStatus::Succeeded) {
        body["usage"] = json!({ "image_count": 1 });
    }
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
}

/// `page_no` and `page_size` (1-based page, 1 to 100 items; defaults 1 and
/// 10), as the SDK sends them.
fn paging(q: &[(String, String)]) -> (usize, usize) {
    let get = |k: &str| {
        q.iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse::<usize>().ok())
    };
    let page = get("page_no").unwrap_or(1).max(1);
    let size = get("page_size").unwrap_or(10).clamp(1, 100);
    (page, size)
}

fn query_value<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter()
        .find(|(n, _)| n == key)
        .map(|(_, v)| v.as_str())
        .filter(|v| !v.is_empty())
}

/// The query string's pairs, percent-decoded (`+` is a space).
fn query(uri: &Uri) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match std::str::from_utf8(&b[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok())
                    {
                        Some(v) => {
                            out.push(v);
                            i += 2;
                        }
                        None => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// `GET /api/v1/tasks`: the key's account's tasks, newest first, filtered
/// by `status` and `model_name`, paged by `page_no` / `page_size`. The
/// SDK hands the JSON through without a schema; the field names here are
/// the mock's (an inferred shape).
async fn task_list(State(shared): St, uri: Uri, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Native, &headers);
    let key = match ctx.auth(&headers) {
        Ok(k) => k,
        Err(e) => return ctx.error(&e),
    };
    let q = query(&uri);
    let (page, size) = paging(&q);
    let status = query_value(&q, "status");
    let model = query_value(&q, "model_name");
    let mut all = shared.tasks_of(&key.account);
    all.reverse();
    let matching: Vec<&TaskView> = all
        .iter()
        .filter(|v| status.is_none_or(|s| s.eq_ignore_ascii_case(v.status.as_str())))
        .filter(|v| model.is_none_or(|m| m == v.model))
        .collect();
    let total = matching.len();
    let data: Vec<Value> = matching
        .iter()
        .skip((page - 1).saturating_mul(size))
        .take(size)
        .map(|v| {
            let mut t = json!({
                "task_id": v.id,
                "task_status": v.status.as_str(),
                "model_name": v.model,
                "submit_time_offset_s": v.submitted_secs,
            });
            if let Some(e) = v
                .failure
                .as_ref()
                .filter(|_| v.status == TaskStatus::Failed)
            {
                t["code"] = json!(e.code());
                t["message"] = json!(e.message());
            }
            t
        })
        .collect();
    let body = json!({
        "request_id": ctx.rid,
        "data": data,
        "total": total,
        "total_page": total.div_ceil(size),
        "page_no": page,
        "page_size": size,
    });
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
// Models.

/// `GET /compatible-mode/v1/models`: the OpenAI list shape (3P sample,
/// unverified: `{"object":"list","data":[{"id","object":"model","created",
/// "owned_by":"system"}]}`).
async fn compatible_models(State(shared): St, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Compatible, &headers);
    if let Err(e) = ctx.auth(&headers) {
        return ctx.error(&e);
    }
    let created = shared.created();
    let data: Vec<Value> = shared
        .cfg()
        .models
        .keys()
        .map(|id| json!({ "id": id, "object": "model", "created": created, "owned_by": "system" }))
        .collect();
    let body = json!({ "object": "list", "data": data });
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
}

/// `GET /compatible-mode/v1/models/{id}`: one model, or `404
/// model_not_found`.
async fn compatible_model(
    State(shared): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Compatible, &headers);
    if let Err(e) = ctx.auth(&headers) {
        return ctx.error(&e);
    }
    if !shared.cfg().models.contains_key(&id) {
        return ctx.error(&ApiError::model_not_found(&id));
    }
    let body =
        json!({ "id": id, "object": "model", "created": shared.created(), "owned_by": "system" });
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
}

/// `GET /api/v1/models?page_no=1&page_size=10[&model=name]`: the SDK's
/// shape (`{"output":{"models":[{"model","provider","opensource"}],
/// "page_no","page_size","total"},"request_id"}`).
async fn native_models(State(shared): St, uri: Uri, headers: HeaderMap) -> Response {
    let ctx = Ctx::new(shared.clone(), Protocol::Native, &headers);
    if let Err(e) = ctx.auth(&headers) {
        return ctx.error(&e);
    }
    let q = query(&uri);
    let (page, size) = paging(&q);
    let filter = query_value(&q, "model");
    let cfg = shared.cfg();
    let matching: Vec<&super::models::ModelInfo> = cfg
        .models
        .values()
        .filter(|m| filter.is_none_or(|f| f == m.name()))
        .collect();
    let models: Vec<Value> = matching
        .iter()
        .skip((page - 1).saturating_mul(size))
        .take(size)
        .map(|m| json!({ "model": m.name(), "provider": "qwen", "opensource": m.is_open_source() }))
        .collect();
    let body = json!({
        "output": { "models": models, "page_no": page, "page_size": size, "total": matching.len() },
        "request_id": ctx.rid,
    });
    ctx.json(StatusCode::OK, Bytes::from(body.to_string()))
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

    #[test]
    fn embeddings_are_unit_vectors_and_deterministic() {
        let a = embedding("hello", 64);
        assert_eq!(a.len(), 64);
        assert_eq!(a, embedding("hello", 64));
        assert_ne!(a, embedding("world", 64));
        let norm: f32 = a.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-4);
    }

    #[test]
    fn query_strings_decode() {
        let uri: Uri = "/api/v1/tasks?page_no=2&model_name=wanx%2Dv1&status=&x=a+b&bad=%zz%4"
            .parse()
            .unwrap();
        let q = query(&uri);
        assert_eq!(query_value(&q, "model_name"), Some("wanx-v1"));
        assert_eq!(query_value(&q, "status"), None);
        assert_eq!(query_value(&q, "x"), Some("a b"));
        assert_eq!(query_value(&q, "bad"), Some("%zz%4"));
        assert_eq!(paging(&q), (2, 10));
        let q = query(&"/x?page_no=0&page_size=1000".parse().unwrap());
        assert_eq!(paging(&q), (1, 100));
    }
}
