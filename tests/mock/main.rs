#![cfg(feature = "mock")]
//! Integration tests of the mock DashScope server, driven by a plain
//! hyper-util client over loopback. Time-dependent tests run on tokio's
//! paused clock: they never sleep for real.

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::time::{Instant, advance};
use tower_qwen::mock::{
    AccountState, ApiError, BurstGuard, Dist, Fault, FaultPlan, Latency, MockDashScope,
    MockDashScopeBuilder, MockHandle, ModelInfo, NativeModelError, Quota,
};
use tower_qwen::request::RequestInfo;

#[cfg(feature = "client")]
mod agent;

const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";
const MULTIMODAL: &str = "/api/v1/services/aigc/multimodal-generation/generation";
const CHAT: &str = "/compatible-mode/v1/chat/completions";
const NATIVE_EMB: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
const COMPAT_EMB: &str = "/compatible-mode/v1/embeddings";
const IMAGE: &str = "/api/v1/services/aigc/text2image/image-synthesis";
const KEY: &str = "sk-a1";

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

fn quota(rpm: u32, tpm: u64) -> Quota {
    Quota::new(nz(rpm), NonZeroU64::new(tpm).unwrap())
}

// ---------------------------------------------------------------------------
// Harness

struct Mock {
    handle: MockHandle,
    client: Client<HttpConnector, Full<Bytes>>,
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn request_id(&self) -> &str {
        self.headers["x-request-id"].to_str().unwrap()
    }

    fn text(&self) -> &str {
        std::str::from_utf8(&self.body).unwrap()
    }
}

fn builder() -> MockDashScopeBuilder {
    MockDashScope::builder()
        .key(KEY, "account-a")
        .key("sk-a2", "account-a")
        .key("sk-b1", "account-b")
}

async fn start(b: MockDashScopeBuilder) -> Mock {
    let handle = b.start().await.expect("mock starts");
    let client = Client::builder(TokioExecutor::new()).build_http();
    Mock { handle, client }
}

fn chat(model: &str, text: &str) -> Value {
    json!({ "model": model, "messages": [{ "role": "user", "content": text }] })
}

fn native(model: &str, text: &str) -> Value {
    json!({
        "model": model,
        "input": { "messages": [{ "role": "user", "content": text }] },
        "parameters": { "result_format": "message" },
    })
}

impl Mock {
    fn request(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.handle.base_url()))
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Full::new(body.into())).unwrap()
    }

    async fn open(
        &self,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> http::Response<Incoming> {
        let req = self.request("POST", path, key, headers, body.to_string());
        self.client.request(req).await.expect("response")
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let res = self.client.request(req).await.expect("response");
        let (parts, body) = res.into_parts();
        let body = body.collect().await.expect("whole body").to_bytes();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    async fn post(
        &self,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Answer {
        self.send(self.request("POST", path, key, headers, body.to_string()))
            .await
    }

    async fn post_raw(&self, path: &str, body: impl Into<Bytes>) -> Answer {
        self.send(self.request("POST", path, Some(KEY), &[], body))
            .await
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.send(self.request("GET", path, key, &[], Bytes::new()))
            .await
    }
}

fn assert_native_error(a: &Answer, status: u16, code: &str, message: &str) {
    assert_eq!(a.status.as_u16(), status, "{}", a.text());
    let v = a.json();
    assert_eq!(v["code"], code, "{v}");
    assert_eq!(v["message"], message, "{v}");
    assert_eq!(v["request_id"], a.request_id());
}

fn assert_compat_error(a: &Answer, status: u16, code: &str, message: &str) {
    assert_eq!(a.status.as_u16(), status, "{}", a.text());
    let v = a.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert_eq!(v["error"]["message"], message, "{v}");
    assert!(v["error"]["param"].is_null());
    assert!(v["error"]["type"].is_string());
    assert_eq!(v["request_id"], a.request_id());
}

/// One SSE event as it appeared on the wire.
#[derive(Debug, Default)]
struct Event {
    id: Option<String>,
    event: Option<String>,
    comment: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

fn events(wire: &str) -> Vec<Event> {
    assert!(
        wire.ends_with("\n\n") || wire.is_empty(),
        "unterminated: {wire:?}"
    );
    wire.split("\n\n")
        .filter(|e| !e.is_empty())
        .map(|raw| {
            let mut ev = Event::default();
            for line in raw.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    ev.id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event:") {
                    ev.event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix(':') {
                    ev.comment = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    ev.data = v.strip_prefix(' ').unwrap_or(v).to_owned();
                } else {
                    panic!("unexpected SSE line {line:?}");
                }
            }
            ev
        })
        .collect()
}

/// Reads body frames until the body ends, returning the text and whether it
/// ended cleanly (`false`: the connection broke).
async fn read_stream(res: http::Response<Incoming>) -> (String, bool) {
    let mut body = res.into_body();
    let mut out = Vec::new();
    loop {
        match body.frame().await {
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data() {
                    out.extend_from_slice(&d);
                }
            }
            Some(Err(_)) => return (String::from_utf8(out).unwrap(), false),
            None => return (String::from_utf8(out).unwrap(), true),
        }
    }
}

fn input_tokens(path: &str, headers: &[(&str, &str)], body: &Value) -> u64 {
    let mut h = HeaderMap::new();
    for (n, v) in headers {
        h.insert(
            http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let info = RequestInfo::parse(path, &h, Some(body.to_string().as_bytes()));
    u64::from(info.input_tokens)
}

// ---------------------------------------------------------------------------
// Auth

#[tokio::test]
async fn auth_is_required_in_both_shapes() {
    let m = start(builder()).await;
    let body = native("qwen-plus", "hi");
    for key in [None, Some("sk-wrong")] {
        let a = m.post(NATIVE, key, &[], &body).await;
        assert_native_error(&a, 401, "InvalidApiKey", "Invalid API-key provided.");
        let a = m.post(CHAT, key, &[], &chat("qwen-plus", "hi")).await;
        assert_compat_error(&a, 401, "invalid_api_key", "Incorrect API key provided.");
        assert_eq!(a.json()["error"]["type"], "invalid_request_error");
        let a = m
            .post(
                COMPAT_EMB,
                key,
                &[],
                &json!({"model":"text-embedding-v4","input":"x"}),
            )
            .await;
        assert_eq!(a.status, 401);
    }
    // Not a bearer token.
    let req = m.request(
        "POST",
        NATIVE,
        None,
        &[("authorization", KEY)],
        body.to_string(),
    );
    assert_eq!(m.send(req).await.status, 401);
    // Every configured key works; the default key does not once keys are set.
    for key in [KEY, "sk-a2", "sk-b1"] {
        assert_eq!(m.post(NATIVE, Some(key), &[], &body).await.status, 200);
    }
    let a = m
        .post(NATIVE, Some(MockDashScope::DEFAULT_KEY), &[], &body)
        .await;
    assert_eq!(a.status, 401);
    let s = m.handle.stats();
    assert_eq!(s.code("InvalidApiKey"), 4);
    assert_eq!(s.code("invalid_api_key"), 4);
    assert_eq!(s.status(401), 8);

    // With no key configured, the default key is accepted.
    let d = start(MockDashScope::builder()).await;
    let a = d
        .post(NATIVE, Some(MockDashScope::DEFAULT_KEY), &[], &body)
        .await;
    assert_eq!(a.status, 200);
    // Keys can be added and removed at run time.
    d.handle.add_key("sk-new", "acct");
    assert_eq!(d.post(NATIVE, Some("sk-new"), &[], &body).await.status, 200);
    assert!(d.handle.remove_key("sk-new"));
    assert_eq!(d.post(NATIVE, Some("sk-new"), &[], &body).await.status, 401);

    // Any key, each its own account.
    let any = start(
        MockDashScope::builder()
            .accept_any_key(true)
            .default_quota(Quota::per_minute(nz(60))),
    )
    .await;
    assert_eq!(any.post(NATIVE, Some("sk-x"), &[], &body).await.status, 200);
    assert_eq!(any.post(NATIVE, Some("sk-y"), &[], &body).await.status, 200);
    assert_eq!(any.post(NATIVE, Some("sk-x"), &[], &body).await.status, 429);
    assert_eq!(any.post(NATIVE, None, &[], &body).await.status, 401);
}

// ---------------------------------------------------------------------------
// Non-stream answers

#[tokio::test]
async fn native_generation_answers_with_usage_and_request_id() {
    let m = start(builder()).await;
    let body = json!({
        "model": "qwen-plus",
        "input": { "messages": [
            { "role": "system", "content": "You are helpful." },
            { "role": "user", "content": "你好，世界! Hello there." },
        ]},
        "parameters": { "result_format": "message" },
    });
    let a = m.post(NATIVE, Some(KEY), &[], &body).await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    let input = input_tokens(NATIVE, &[], &body);
    assert!(input > 8);
    assert_eq!(v["usage"]["input_tokens"], input);
    assert_eq!(v["usage"]["output_tokens"], 20);
    assert_eq!(v["usage"]["total_tokens"], input + 20);
    assert_eq!(v["request_id"], a.request_id());
    let choice = &v["output"]["choices"][0];
    assert_eq!(choice["finish_reason"], "stop");
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap();
    assert_eq!(tower_qwen::tokens::estimate_text_tokens(text), 20);

    // The old text format, and max_tokens capping the output.
    let body = json!({
        "model": "qwen-turbo",
        "input": { "prompt": "Tell me a story" },
        "parameters": { "max_tokens": 5 },
    });
    let v = m.post(NATIVE, Some(KEY), &[], &body).await.json();
    assert_eq!(v["output"]["finish_reason"], "length");
    assert!(v["output"]["text"].is_string());
    assert_eq!(v["usage"]["output_tokens"], 5);
    assert_eq!(v["usage"]["input_tokens"], input_tokens(NATIVE, &[], &body));

    // Request ids differ between requests.
    let a1 = m.post(NATIVE, Some(KEY), &[], &body).await;
    let a2 = m.post(NATIVE, Some(KEY), &[], &body).await;
    assert_ne!(a1.request_id(), a2.request_id());
}

#[tokio::test]
async fn native_multimodal_answers_with_content_parts() {
    let m = start(builder()).await;
    let body = json!({
        "model": "qwen-vl-max",
        "input": { "messages": [{ "role": "user", "content": [
            { "image": "https://example.invalid/cat.png" },
            { "text": "What is in this picture?" },
        ]}]},
    });
    let a = m.post(MULTIMODAL, Some(KEY), &[], &body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    let content = &v["output"]["choices"][0]["message"]["content"];
    assert!(content[0]["text"].is_string(), "{v}");
    assert_eq!(
        v["usage"]["input_tokens"],
        input_tokens(MULTIMODAL, &[], &body)
    );
}

#[tokio::test]
async fn compatible_chat_answers_openai_shape() {
    let m = start(builder().output_tokens(nz(12))).await;
    let body = chat("qwen-plus", "Hello, world");
    let a = m.post(CHAT, Some(KEY), &[], &body).await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["model"], "qwen-plus");
    assert_eq!(v["id"], format!("chatcmpl-{}", a.request_id()));
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], 3 + 4);
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["usage"]["total_tokens"], 19);
    assert!(v["created"].as_u64().unwrap() > 1_600_000_000);

    let mut capped = body.clone();
    capped["max_tokens"] = json!(3);
    let v = m.post(CHAT, Some(KEY), &[], &capped).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 3);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    capped["max_completion_tokens"] = json!(2);
    let v = m.post(CHAT, Some(KEY), &[], &capped).await.json();
    assert_eq!(v["usage"]["completion_tokens"], 2);

    let s = m.handle.stats();
    assert_eq!(s.input_tokens, 3 * 7);
    assert_eq!(s.output_tokens, 12 + 3 + 2);
    assert_eq!(s.calls("qwen-plus"), 3);
    assert_eq!(s.admitted("qwen-plus"), 3);
}

// ---------------------------------------------------------------------------
// Streams

fn check_native_stream(wire: &str, input: u64, n: u64, incremental: bool) -> String {
    let evs = events(wire);
    assert_eq!(evs.len() as u64, n, "{wire}");
    let mut text = String::new();
    let mut rid = None;
    for (i, ev) in evs.iter().enumerate() {
        let i = i as u64 + 1;
        assert_eq!(ev.id.as_deref(), Some(i.to_string().as_str()));
        assert_eq!(ev.event.as_deref(), Some("result"));
        assert_eq!(ev.comment.as_deref(), Some("HTTP_STATUS/200"));
        let v = ev.json();
        assert_eq!(v["usage"]["input_tokens"], input);
        assert_eq!(v["usage"]["output_tokens"], i, "usage is cumulative");
        assert_eq!(v["usage"]["total_tokens"], input + i);
        let choice = &v["output"]["choices"][0];
        let finish = if i == n { "stop" } else { "null" };
        assert_eq!(choice["finish_reason"], finish);
        let content = choice["message"]["content"].as_str().unwrap();
        if incremental {
            text.push_str(content);
        } else {
            assert!(content.starts_with(&text));
            text = content.to_owned();
        }
        let r = v["request_id"].as_str().unwrap().to_owned();
        assert_eq!(rid.get_or_insert(r.clone()), &r);
    }
    assert!(!wire.contains("[DONE]"));
    assert_eq!(
        u64::from(tower_qwen::tokens::estimate_text_tokens(&text)),
        n
    );
    text
}

#[tokio::test]
async fn native_stream_frames_match_the_wire_format() {
    let m = start(builder().output_tokens(nz(6))).await;
    let mut body = native("qwen-plus", "Stream to me please");
    body["parameters"]["incremental_output"] = json!(true);
    let sse = [("x-dashscope-sse", "enable")];
    let input = input_tokens(NATIVE, &sse, &body);
    let res = m.open(NATIVE, Some(KEY), &sse, &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "text/event-stream;charset=UTF-8"
    );
    let rid = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let (wire, clean) = read_stream(res).await;
    assert!(clean);
    assert!(
        wire.starts_with("id:1\nevent:result\n:HTTP_STATUS/200\ndata:{"),
        "{wire}"
    );
    let deltas = check_native_stream(&wire, input, 6, true);
    assert!(wire.contains(&rid));

    // incremental_output false (the default): cumulative snapshots, same
    // final text. `Accept: text/event-stream` also asks for a stream.
    body["parameters"]["incremental_output"] = json!(false);
    let accept = [("accept", "text/event-stream")];
    let res = m.open(NATIVE, Some(KEY), &accept, &body).await;
    let (wire, _) = read_stream(res).await;
    let full = check_native_stream(&wire, input, 6, false);
    assert_eq!(full, deltas);

    // The crate's own SSE reader sees the same frames.
    let parsed = tower_qwen::sse::parse_events(wire.as_bytes());
    assert_eq!(parsed.len(), 6);
    assert!(
        parsed
            .iter()
            .all(|e| e.http_status == Some(200) && !e.is_error())
    );

    let s = m.handle.stats();
    assert_eq!(
        (s.streams_started, s.streams_completed, s.streams_cancelled),
        (2, 2, 0)
    );
}

#[tokio::test]
async fn compatible_stream_with_and_without_include_usage() {
    let m = start(builder().output_tokens(nz(4))).await;
    let mut body = chat("qwen-plus", "Hello, world");
    body["stream"] = json!(true);
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let (wire, clean) = read_stream(res).await;
    assert!(clean);
    assert!(wire.ends_with("data: [DONE]\n\n"), "{wire}");
    let evs = events(&wire);
    // role chunk, 4 deltas, finish chunk, [DONE]
    assert_eq!(evs.len(), 7, "{wire}");
    assert!(evs.iter().all(|e| e.id.is_none() && e.event.is_none()));
    let first = evs[0].json();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert!(first.get("usage").is_none());
    let text: String = evs[1..5]
        .iter()
        .map(|e| {
            let v = e.json();
            assert!(v["choices"][0]["finish_reason"].is_null());
            v["choices"][0]["delta"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(tower_qwen::tokens::estimate_text_tokens(&text), 4);
    assert_eq!(evs[5].json()["choices"][0]["finish_reason"], "stop");
    assert_eq!(evs[6].data, "[DONE]");

    body["stream_options"] = json!({ "include_usage": true });
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    let (wire, _) = read_stream(res).await;
    let evs = events(&wire);
    assert_eq!(evs.len(), 8, "{wire}");
    for e in &evs[..6] {
        assert!(e.json()["usage"].is_null());
    }
    let tail = evs[6].json();
    assert_eq!(tail["choices"], json!([]));
    assert_eq!(tail["usage"]["prompt_tokens"], 7);
    assert_eq!(tail["usage"]["completion_tokens"], 4);
    assert_eq!(tail["usage"]["total_tokens"], 11);
    assert_eq!(evs[7].data, "[DONE]");
}

#[tokio::test]
async fn stream_only_models_refuse_non_stream_calls() {
    let m = start(builder()).await;
    let a = m
        .post(CHAT, Some(KEY), &[], &chat("qwq-plus", "think"))
        .await;
    let msg = "This model only support stream mode, please enable the stream parameter to access the model.";
    assert_compat_error(&a, 400, "invalid_parameter_error", msg);
    let a = m
        .post(NATIVE, Some(KEY), &[], &native("qwq-plus", "think"))
        .await;
    assert_native_error(&a, 400, "InvalidParameter", msg);
    let mut body = chat("qwq-plus", "think");
    body["stream"] = json!(true);
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    assert_eq!(res.status(), 200);
    read_stream(res).await;

    // Stream-only is a property of the model in the catalogue.
    let m = start(
        builder()
            .model(ModelInfo::chat("my-model").stream_only(true))
            .model(ModelInfo::chat("qwq-plus")),
    )
    .await;
    assert_eq!(
        m.post(CHAT, Some(KEY), &[], &chat("qwq-plus", "x"))
            .await
            .status,
        200
    );
    let a = m.post(CHAT, Some(KEY), &[], &chat("my-model", "x")).await;
    assert_compat_error(&a, 400, "invalid_parameter_error", msg);
}

#[tokio::test]
async fn unknown_models_get_the_services_answer_in_each_dialect() {
    // The default catalogue: a name outside it does not exist.
    let m = start(builder()).await;
    let a = m
        .post(NATIVE, Some(KEY), &[], &native("qwen-nope", "x"))
        .await;
    assert_native_error(&a, 400, "InvalidParameter", "Model not exist.");
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-nope", "x")).await;
    assert_compat_error(
        &a,
        404,
        "model_not_found",
        "The model `qwen-nope` does not exist or you do not have access to it.",
    );
    assert_eq!(a.json()["error"]["type"], "invalid_request_error");
    // Names are case-sensitive.
    let a = m.post(CHAT, Some(KEY), &[], &chat("Qwen-Plus", "x")).await;
    assert_eq!(a.status, 404);
    // An embedding model is not a chat model, nor the reverse.
    let a = m
        .post(CHAT, Some(KEY), &[], &chat("text-embedding-v4", "x"))
        .await;
    assert_eq!(a.json()["error"]["code"], "model_not_found");
    let a = m
        .post(
            COMPAT_EMB,
            Some(KEY),
            &[],
            &json!({"model": "qwen-plus", "input": "x"}),
        )
        .await;
    assert_eq!(a.json()["error"]["code"], "model_not_found");
    assert_eq!(m.handle.stats().calls("qwen-nope"), 0);

    // The native status is a knob.
    let m = start(builder().native_model_error(NativeModelError::NotExist)).await;
    let a = m
        .post(NATIVE, Some(KEY), &[], &native("qwen-nope", "x"))
        .await;
    assert_native_error(&a, 404, "Model.NotExist", "Model not exist.");

    // An allow-list, and a builder option that accepts any model.
    let m = start(builder().models(["qwen-plus", "my-own"])).await;
    for (model, status) in [("qwen-plus", 200), ("my-own", 200), ("qwen-max", 404)] {
        let a = m.post(CHAT, Some(KEY), &[], &chat(model, "x")).await;
        assert_eq!(a.status, status, "{model}");
    }
    let m = start(builder().accept_any_model(true)).await;
    for model in ["qwen-nope", "anything-at-all"] {
        assert_eq!(
            m.post(CHAT, Some(KEY), &[], &chat(model, "x")).await.status,
            200
        );
        let a = m
            .post(
                COMPAT_EMB,
                Some(KEY),
                &[],
                &json!({"model": model, "input": "x"}),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
}

// ---------------------------------------------------------------------------
// Embeddings

#[tokio::test]
async fn embeddings_in_both_shapes() {
    let m = start(builder()).await;
    let body = json!({
        "model": "text-embedding-v4",
        "input": { "texts": ["first text", "second, longer text"] },
        "parameters": { "dimension": 256 },
    });
    let a = m.post(NATIVE_EMB, Some(KEY), &[], &body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    let embs = v["output"]["embeddings"].as_array().unwrap();
    assert_eq!(embs.len(), 2);
    for (i, e) in embs.iter().enumerate() {
        assert_eq!(e["text_index"], i);
        assert_eq!(e["embedding"].as_array().unwrap().len(), 256);
    }
    assert_eq!(
        v["usage"]["total_tokens"],
        input_tokens(NATIVE_EMB, &[], &body)
    );
    assert_eq!(v["request_id"], a.request_id());

    let cbody = json!({ "model": "text-embedding-v4", "input": ["first text"] });
    let v = m.post(COMPAT_EMB, Some(KEY), &[], &cbody).await.json();
    assert_eq!(v["object"], "list");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    let vec = v["data"][0]["embedding"].as_array().unwrap();
    assert_eq!(vec.len(), 1024, "the default dimension");
    let tokens = input_tokens(COMPAT_EMB, &[], &cbody);
    assert_eq!(v["usage"]["prompt_tokens"], tokens);
    assert_eq!(v["usage"]["total_tokens"], tokens);
    // Same text, same vector (prefix of the native one at another dimension
    // is not promised; equality at the same dimension is).
    let again = m
        .post(
            COMPAT_EMB,
            Some(KEY),
            &[],
            &json!({"model":"text-embedding-v4","input":"first text"}),
        )
        .await
        .json();
    assert_eq!(again["data"][0]["embedding"], v["data"][0]["embedding"]);
    assert_eq!(m.handle.stats().output_tokens, 0);
}

#[tokio::test]
async fn embedding_batches_are_capped_per_model() {
    let m = start(builder().embedding_batch_limit("my-embed", nz(3))).await;
    let texts = |n: usize| (0..n).map(|i| format!("text {i}")).collect::<Vec<_>>();
    for (model, cap) in [
        ("text-embedding-v4", 10),
        ("text-embedding-v3", 10),
        ("text-embedding-v2", 25),
        ("text-embedding-v1", 25),
        ("my-embed", 3),
    ] {
        let ok = m
            .post(
                NATIVE_EMB,
                Some(KEY),
                &[],
                &json!({"model": model, "input": {"texts": texts(cap)}}),
            )
            .await;
        assert_eq!(ok.status, 200, "{model}");
        let msg = format!("batch size is invalid, it should not be larger than {cap}.");
        let a = m
            .post(
                NATIVE_EMB,
                Some(KEY),
                &[],
                &json!({"model": model, "input": {"texts": texts(cap + 1)}}),
            )
            .await;
        assert_native_error(&a, 400, "InvalidParameter", &msg);
        let a = m
            .post(
                COMPAT_EMB,
                Some(KEY),
                &[],
                &json!({"model": model, "input": texts(cap + 1)}),
            )
            .await;
        assert_compat_error(&a, 400, "invalid_parameter_error", &msg);
    }
    // Wrong input types.
    for input in [json!(5), json!([]), json!([1, 2]), json!(null)] {
        let a = m
            .post(
                COMPAT_EMB,
                Some(KEY),
                &[],
                &json!({"model":"text-embedding-v4","input": input}),
            )
            .await;
        assert_eq!(a.status, 400, "{input}");
    }
}

// ---------------------------------------------------------------------------
// Quotas

async fn burst(m: &Mock, n: usize, key: &str, model: &str) -> Vec<Answer> {
    let body = native(model, "hi");
    join_all((0..n).map(|_| m.post(NATIVE, Some(key), &[], &body))).await
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers
        .iter()
        .filter(|a| a.status.as_u16() == status)
        .count()
}

#[tokio::test(start_paused = true)]
async fn rps_quota_lets_exactly_the_limit_through() {
    // 600 RPM = 10 requests per second.
    let m = start(builder().quota("qwen-plus", quota(600, 10_000_000))).await;
    let t0 = Instant::now();
    let answers = burst(&m, 50, KEY, "qwen-plus").await;
    assert_eq!(Instant::now(), t0, "no time passed");
    assert_eq!(count(&answers, 200), 10);
    assert_eq!(count(&answers, 429), 40);
    for a in answers.iter().filter(|a| a.status == 429) {
        assert_native_error(
            a,
            429,
            "Throttling.RateQuota",
            "Requests rate limit exceeded, please try again later.",
        );
        assert!(a.headers.get("retry-after").is_none());
    }
    // Compatible shape of the same refusal.
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi")).await;
    assert_compat_error(
        &a,
        429,
        "limit_requests",
        "You exceeded your current requests list.",
    );

    // The next second admits 10 more.
    advance(Duration::from_secs(1)).await;
    let answers = burst(&m, 50, KEY, "qwen-plus").await;
    assert_eq!(count(&answers, 200), 10);
    let s = m.handle.stats();
    assert_eq!(s.admitted("qwen-plus"), 20);
    assert_eq!(s.calls("qwen-plus"), 101);
    assert_eq!(s.code("Throttling.RateQuota"), 80);
    assert_eq!(s.code("limit_requests"), 1);

    // Other models are not limited by this quota.
    let answers = burst(&m, 30, KEY, "qwen-turbo").await;
    assert_eq!(count(&answers, 200), 30);
}

#[tokio::test(start_paused = true)]
async fn rpm_window_slides_over_sixty_seconds() {
    let q = Quota::per_minute(nz(20)).per_second(false);
    let m = start(builder().quota("qwen-max", q)).await;
    assert_eq!(count(&burst(&m, 15, KEY, "qwen-max").await, 200), 15);
    advance(Duration::from_secs(30)).await;
    let answers = burst(&m, 10, KEY, "qwen-max").await;
    assert_eq!(count(&answers, 200), 5);
    advance(Duration::from_secs(29)).await; // t = 59 s: all 20 still in the window
    assert_eq!(count(&burst(&m, 5, KEY, "qwen-max").await, 200), 0);
    advance(Duration::from_secs(1)).await; // t = 60 s: the first 15 left
    assert_eq!(count(&burst(&m, 20, KEY, "qwen-max").await, 200), 15);
}

#[tokio::test(start_paused = true)]
async fn tpm_quota_answers_allocation_quota() {
    // 6000 TPM = 100 tokens per second; each request costs 20 output tokens
    // plus its input.
    let m = start(builder().quota(
        "qwen-plus",
        Quota::tokens_per_minute(NonZeroU64::new(6000).unwrap()),
    ))
    .await;
    let body = native("qwen-plus", "hi");
    let per = input_tokens(NATIVE, &[], &body) + 20;
    let answers = burst(&m, 10, KEY, "qwen-plus").await;
    let expect = 100u64.div_ceil(per) as usize; // admitted while below 100
    assert_eq!(count(&answers, 200), expect);
    for a in answers.iter().filter(|a| a.status == 429) {
        assert_native_error(
            a,
            429,
            "Throttling.AllocationQuota",
            "Allocated quota exceeded, please increase your quota limit.",
        );
    }
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi")).await;
    assert_compat_error(
        &a,
        429,
        "insufficient_quota",
        "You exceeded your current quota, please check your plan and billing details.",
    );
    let s = m.handle.stats();
    assert_eq!(s.input_tokens + s.output_tokens, per * expect as u64);
    advance(Duration::from_secs(1)).await;
    assert_eq!(m.post(NATIVE, Some(KEY), &[], &body).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn keys_of_one_account_share_its_quota() {
    let m = start(builder().default_quota(Quota::per_minute(nz(300)))).await; // 5 RPS
    let body = native("qwen-plus", "hi");
    let a = join_all((0..10).map(|i| {
        let key = if i % 2 == 0 { KEY } else { "sk-a2" };
        m.post(NATIVE, Some(key), &[], &body)
    }))
    .await;
    assert_eq!(count(&a, 200), 5, "two keys of account-a share 5 RPS");
    // account-b has its own 5.
    assert_eq!(count(&burst(&m, 10, "sk-b1", "qwen-plus").await, 200), 5);
}

#[tokio::test(start_paused = true)]
async fn quota_can_be_raised_mid_run() {
    let m = start(builder().quota("qwen-plus", Quota::per_minute(nz(60)))).await; // 1 RPS
    assert_eq!(count(&burst(&m, 5, KEY, "qwen-plus").await, 200), 1);
    m.handle.set_quota("qwen-plus", Quota::per_minute(nz(600)));
    assert_eq!(
        count(&burst(&m, 20, KEY, "qwen-plus").await, 200),
        9,
        "10 RPS, one already used"
    );
    m.handle.set_quota("qwen-plus", None);
    assert_eq!(count(&burst(&m, 20, KEY, "qwen-plus").await, 200), 20);
    m.handle.set_default_quota(Quota::per_minute(nz(60)));
    m.handle.reset_quota_usage();
    assert_eq!(count(&burst(&m, 3, KEY, "qwen-plus").await, 200), 1);
}

#[tokio::test(start_paused = true)]
async fn burst_guard_refuses_sudden_growth() {
    let guard = BurstGuard::new(nz(4), 2.0).window(2);
    let m = start(
        builder()
            .quota("qwen-plus", quota(6000, 100_000_000))
            .burst_guard(guard),
    )
    .await;
    // Cold start: 4 pass, the rest are a burst (100 RPS is far away).
    let a = burst(&m, 10, KEY, "qwen-plus").await;
    assert_eq!(count(&a, 200), 4);
    let msg = "Request rate increased too quickly. To ensure system stability, please adjust your client logic to scale requests more smoothly over time.";
    for x in a.iter().filter(|a| a.status == 429) {
        assert_native_error(x, 429, "Throttling.BurstRate", msg);
    }
    let c = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "x")).await;
    assert_compat_error(&c, 429, "limit_burst_rate", msg);
    // Ramping: average of the last 2 s is 2 -> limit max(4, 4) = 4.
    advance(Duration::from_secs(1)).await;
    assert_eq!(count(&burst(&m, 10, KEY, "qwen-plus").await, 200), 4);
    // Then average 4 -> 8.
    advance(Duration::from_secs(1)).await;
    assert_eq!(count(&burst(&m, 10, KEY, "qwen-plus").await, 200), 8);
    // Disabled at run time.
    m.handle.set_burst_guard(None);
    advance(Duration::from_secs(1)).await;
    assert_eq!(count(&burst(&m, 30, KEY, "qwen-plus").await, 200), 30);
}

#[tokio::test(start_paused = true)]
async fn throttled_streams_get_a_real_429_or_an_sse_error_frame() {
    let m = start(builder().quota("qwen-plus", Quota::per_minute(nz(60)))).await;
    let sse = [("x-dashscope-sse", "enable")];
    let body = native("qwen-plus", "hi");
    assert_eq!(m.post(NATIVE, Some(KEY), &sse, &body).await.status, 200);
    let a = m.post(NATIVE, Some(KEY), &sse, &body).await;
    assert_native_error(
        &a,
        429,
        "Throttling.RateQuota",
        "Requests rate limit exceeded, please try again later.",
    );

    m.handle
        .set_faults(FaultPlan::new().throttled_stream_as_sse(1.0));
    let res = m.open(NATIVE, Some(KEY), &sse, &body).await;
    assert_eq!(res.status(), 200);
    let (wire, clean) = read_stream(res).await;
    assert!(clean);
    let evs = events(&wire);
    assert_eq!(evs.len(), 1);
    assert_eq!(evs[0].id.as_deref(), Some("1"));
    assert_eq!(evs[0].event.as_deref(), Some("error"));
    assert_eq!(evs[0].comment.as_deref(), Some("HTTP_STATUS/429"));
    assert_eq!(evs[0].json()["code"], "Throttling.RateQuota");
    // Compatible streams always get the real status.
    let mut c = chat("qwen-plus", "hi");
    c["stream"] = json!(true);
    assert_eq!(m.post(CHAT, Some(KEY), &[], &c).await.status, 429);
}

// ---------------------------------------------------------------------------
// Account states

#[tokio::test]
async fn account_states_answer_permanent_errors() {
    let m = start(
        builder()
            .key_state("sk-a2", AccountState::FreeQuotaExhausted)
            .key_state("sk-b1", AccountState::Arrearage),
    )
    .await;
    let body = native("qwen-plus", "hi");
    let a = m.post(NATIVE, Some("sk-a2"), &[], &body).await;
    assert_native_error(
        &a,
        429,
        "Throttling.AllocationQuota",
        "Free allocated quota exceeded.",
    );
    let a = m
        .post(CHAT, Some("sk-a2"), &[], &chat("qwen-plus", "hi"))
        .await;
    assert_compat_error(
        &a,
        429,
        "insufficient_quota",
        "Free allocated quota exceeded.",
    );
    let a = m.post(NATIVE, Some("sk-b1"), &[], &body).await;
    assert_native_error(
        &a,
        400,
        "Arrearage",
        "Access denied, please make sure your account is in good standing.",
    );
    let a = m
        .post(CHAT, Some("sk-b1"), &[], &chat("qwen-plus", "hi"))
        .await;
    assert_eq!(a.json()["error"]["code"], "Arrearage");

    m.handle.set_key_state(KEY, AccountState::FreeTierOnly);
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi")).await;
    assert_eq!(a.status, 403);
    assert_eq!(a.json()["error"]["code"], "AllocationQuota.FreeTierOnly");
    assert_eq!(a.json()["error"]["type"], "AllocationQuota.FreeTierOnly");
    let a = m
        .post(
            NATIVE_EMB,
            Some(KEY),
            &[],
            &json!({"model":"text-embedding-v4","input":{"texts":["x"]}}),
        )
        .await;
    assert_eq!(a.json()["code"], "AllocationQuota.FreeTierOnly");
    m.handle.set_key_state(KEY, AccountState::Active);
    assert_eq!(m.post(NATIVE, Some(KEY), &[], &body).await.status, 200);
}

// ---------------------------------------------------------------------------
// Async tasks

#[tokio::test(start_paused = true)]
async fn async_tasks_progress_and_cancel() {
    let m = start(builder().task_durations(Duration::from_secs(2), Duration::from_secs(5))).await;
    let asy = [("x-dashscope-async", "enable")];
    let body =
        json!({ "model": "wanx-v1", "input": { "prompt": "a cat" }, "parameters": { "n": 1 } });
    let a = m.post(IMAGE, Some(KEY), &asy, &body).await;
    assert_eq!(a.status, 200, "{}", a.text());
    let v = a.json();
    assert_eq!(v["output"]["task_status"], "PENDING");
    assert_eq!(v["request_id"], a.request_id());
    let id = v["output"]["task_id"].as_str().unwrap().to_owned();
    let poll = |key: &'static str| {
        let path = format!("/api/v1/tasks/{id}");
        let m = &m;
        async move { m.get(&path, Some(key)).await.json()["output"]["task_status"].clone() }
    };
    assert_eq!(poll(KEY).await, "PENDING");
    // Another key of the same account sees it; another account does not.
    assert_eq!(poll("sk-a2").await, "PENDING");
    assert_eq!(poll("sk-b1").await, "UNKNOWN");
    advance(Duration::from_secs(2)).await;
    assert_eq!(poll(KEY).await, "RUNNING");
    // Only PENDING tasks can be cancelled.
    let c = m
        .post(
            &format!("/api/v1/tasks/{id}/cancel"),
            Some(KEY),
            &[],
            &json!({}),
        )
        .await;
    assert_native_error(
        &c,
        400,
        "UnsupportedOperation",
        "Failed to cancel the task, please confirm if the task is in PENDING status.",
    );
    advance(Duration::from_secs(5)).await;
    let done = m
        .get(&format!("/api/v1/tasks/{id}"), Some(KEY))
        .await
        .json();
    assert_eq!(done["output"]["task_status"], "SUCCEEDED");
    assert!(done["output"]["results"][0]["url"].is_string());

    // Cancel a fresh task while PENDING.
    let v = m.post(IMAGE, Some(KEY), &asy, &body).await.json();
    let id2 = v["output"]["task_id"].as_str().unwrap().to_owned();
    assert_ne!(id, id2);
    let c = m
        .post(
            &format!("/api/v1/tasks/{id2}/cancel"),
            Some(KEY),
            &[],
            &json!({}),
        )
        .await;
    assert_eq!(c.status, 200);
    advance(Duration::from_secs(10)).await;
    let v = m
        .get(&format!("/api/v1/tasks/{id2}"), Some(KEY))
        .await
        .json();
    assert_eq!(v["output"]["task_status"], "CANCELED");

    // A task API without the async header, and text generation with it.
    let a = m.post(IMAGE, Some(KEY), &[], &body).await;
    assert_native_error(
        &a,
        403,
        "AccessDenied",
        "current user api does not support synchronous calls",
    );
    let a = m
        .post(NATIVE, Some(KEY), &asy, &native("qwen-plus", "hi"))
        .await;
    assert_native_error(
        &a,
        403,
        "AccessDenied",
        "current user api does not support asynchronous calls",
    );
    // Polling needs a key too.
    assert_eq!(
        m.get(&format!("/api/v1/tasks/{id}"), None).await.status,
        401
    );
}

// ---------------------------------------------------------------------------
// Faults

#[tokio::test]
async fn server_error_faults_are_deterministic_for_a_seed() {
    async fn statuses(seed: u64) -> Vec<u16> {
        let m = start(
            builder()
                .seed(seed)
                .faults(FaultPlan::new().server_errors(0.3)),
        )
        .await;
        let mut out = Vec::new();
        for _ in 0..60 {
            out.push(
                m.post(NATIVE, Some(KEY), &[], &native("qwen-plus", "hi"))
                    .await
                    .status
                    .as_u16(),
            );
        }
        out
    }
    let a = statuses(7).await;
    assert_eq!(a, statuses(7).await, "same seed, same faults");
    assert_ne!(a, statuses(8).await, "another seed, other faults");
    let errors = a.iter().filter(|s| **s != 200).count();
    assert!((8..=30).contains(&errors), "about 30% of 60: {errors}");
    for s in [500, 503, 504] {
        assert!(a.contains(&s), "{s} in {a:?}");
    }
}

#[tokio::test]
async fn error_faults_in_both_shapes_and_per_model() {
    let m = start(
        builder()
            .faults(FaultPlan::new().with(Fault::Error(ApiError::service_unavailable()), 1.0))
            .model_faults("qwen-turbo", FaultPlan::new()),
    )
    .await;
    let a = m
        .post(NATIVE, Some(KEY), &[], &native("qwen-plus", "hi"))
        .await;
    assert_native_error(
        &a,
        503,
        "ServiceUnavailable",
        "Service temporarily unavailable, possibly overloaded or not ready.",
    );
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi")).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["error"]["code"], "service_unavailable");
    // qwen-turbo has its own (empty) plan.
    assert_eq!(
        m.post(CHAT, Some(KEY), &[], &chat("qwen-turbo", "hi"))
            .await
            .status,
        200
    );
    m.handle.set_model_faults(
        "qwen-turbo",
        FaultPlan::new().with(Fault::Error(ApiError::gateway_timeout()), 1.0),
    );
    let a = m
        .post(NATIVE, Some(KEY), &[], &native("qwen-turbo", "hi"))
        .await;
    assert_native_error(
        &a,
        504,
        "GatewayTimeout",
        "Request timed out, please try again later.",
    );
    m.handle.set_faults(FaultPlan::new());
    m.handle.set_model_faults("qwen-turbo", None);
    assert_eq!(
        m.post(NATIVE, Some(KEY), &[], &native("qwen-turbo", "hi"))
            .await
            .status,
        200
    );
    let s = m.handle.stats();
    assert_eq!(s.status(503), 2);
    assert_eq!(s.code("GatewayTimeout"), 1);
}

#[tokio::test]
async fn http_200_with_a_business_error() {
    let e = ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "InternalError.Algo",
        "An internal error has occured.",
    );
    let m = start(builder().faults(FaultPlan::new().with(Fault::ErrorIn200(e), 1.0))).await;
    let a = m
        .post(NATIVE, Some(KEY), &[], &native("qwen-plus", "hi"))
        .await;
    assert_native_error(
        &a,
        200,
        "InternalError.Algo",
        "An internal error has occured.",
    );
    assert_eq!(m.handle.stats().code("InternalError.Algo"), 1);
}

#[tokio::test(start_paused = true)]
async fn latency_is_time_to_headers_plus_time_per_token() {
    let lat = Latency::none()
        .time_to_headers(Dist::fixed(Duration::from_secs(2)))
        .per_token(Dist::fixed(Duration::from_millis(100)));
    let m = start(
        builder()
            .output_tokens(nz(10))
            .faults(FaultPlan::new().latency(lat)),
    )
    .await;
    let t0 = Instant::now();
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi")).await;
    assert_eq!(a.status, 200);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_millis(2950),
        "{took:?}"
    );

    // Streams: the headers after 2 s, then a token every 100 ms.
    let mut body = chat("qwen-plus", "hi");
    body["stream"] = json!(true);
    let t0 = Instant::now();
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    let headers_at = t0.elapsed();
    assert!(headers_at >= Duration::from_secs(2) && headers_at < Duration::from_millis(2050));
    let (wire, _) = read_stream(res).await;
    assert_eq!(events(&wire).len(), 1 + 10 + 1 + 1);
    let total = t0.elapsed();
    assert!(
        total >= Duration::from_millis(2900) && total < Duration::from_millis(2950),
        "{total:?}"
    );

    // Random latency is reproducible for a seed.
    async fn timing(seed: u64) -> Vec<Duration> {
        let lat = Latency::none().time_to_headers(Dist::exponential(Duration::from_millis(300)));
        let m = start(builder().seed(seed).faults(FaultPlan::new().latency(lat))).await;
        let mut out = Vec::new();
        for _ in 0..5 {
            let t0 = Instant::now();
            m.post(
                NATIVE_EMB,
                Some(KEY),
                &[],
                &json!({"model":"text-embedding-v4","input":{"texts":["x"]}}),
            )
            .await;
            out.push(t0.elapsed());
        }
        out
    }
    let a = timing(3).await;
    assert_eq!(a, timing(3).await);
    assert!(a.iter().any(|d| *d != a[0]));
}

#[tokio::test(start_paused = true)]
async fn stall_mid_stream_for_a_while_and_forever() {
    let stall = Fault::Stall {
        after_tokens: 3,
        duration: Some(Duration::from_secs(30)),
    };
    let m = start(
        builder()
            .output_tokens(nz(6))
            .faults(FaultPlan::new().with(stall, 1.0)),
    )
    .await;
    let sse = [("x-dashscope-sse", "enable")];
    let body = native("qwen-plus", "hi");
    let t0 = Instant::now();
    let res = m.open(NATIVE, Some(KEY), &sse, &body).await;
    let mut b = res.into_body();
    let mut seen = String::new();
    for _ in 0..3 {
        let f = b.frame().await.unwrap().unwrap();
        seen.push_str(std::str::from_utf8(f.data_ref().unwrap()).unwrap());
    }
    assert_eq!(t0.elapsed(), Duration::ZERO);
    let f = b.frame().await.unwrap().unwrap();
    assert_eq!(t0.elapsed(), Duration::from_secs(30));
    seen.push_str(std::str::from_utf8(f.data_ref().unwrap()).unwrap());
    while let Some(f) = b.frame().await {
        seen.push_str(std::str::from_utf8(f.unwrap().data_ref().unwrap()).unwrap());
    }
    check_native_stream(&seen, input_tokens(NATIVE, &sse, &body), 6, false);

    // Forever: three frames, then nothing until the client gives up.
    m.handle.set_faults(FaultPlan::new().with(
        Fault::Stall {
            after_tokens: 3,
            duration: None,
        },
        1.0,
    ));
    let res = m.open(NATIVE, Some(KEY), &sse, &body).await;
    let mut b = res.into_body();
    for _ in 0..3 {
        b.frame().await.unwrap().unwrap();
    }
    let waited = tokio::time::timeout(Duration::from_secs(3600), b.frame()).await;
    assert!(waited.is_err(), "no frame for an hour");
    assert_eq!(m.handle.stats().in_flight, 1);
    drop(b);
    // The server notices the client went away.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let s = m.handle.stats();
    assert_eq!(s.streams_cancelled, 1);
    assert_eq!(s.in_flight, 0);

    // Non-stream requests stall before the headers.
    m.handle.set_faults(FaultPlan::new().with(
        Fault::Stall {
            after_tokens: 0,
            duration: Some(Duration::from_secs(7)),
        },
        1.0,
    ));
    let t0 = Instant::now();
    assert_eq!(m.post(NATIVE, Some(KEY), &[], &body).await.status, 200);
    assert_eq!(t0.elapsed(), Duration::from_secs(7));
}

#[tokio::test]
async fn connection_resets_before_and_during_the_body() {
    let m = start(
        builder()
            .output_tokens(nz(5))
            .faults(FaultPlan::new().with(Fault::Reset, 1.0)),
    )
    .await;
    let req = m.request(
        "POST",
        NATIVE,
        Some(KEY),
        &[],
        native("qwen-plus", "hi").to_string(),
    );
    let err = m.client.request(req).await.expect_err("no response");
    assert!(
        err.is_connect()
            || err.to_string().contains("connection")
            || std::error::Error::source(&err).is_some(),
        "{err}"
    );
    assert_eq!(m.handle.stats().resets, 1);

    // Mid-stream: two frames, then the connection breaks.
    m.handle
        .set_faults(FaultPlan::new().with(Fault::ResetMidBody { after_tokens: 2 }, 1.0));
    let sse = [("x-dashscope-sse", "enable")];
    let res = m
        .open(NATIVE, Some(KEY), &sse, &native("qwen-plus", "hi"))
        .await;
    assert_eq!(res.status(), 200);
    let (wire, clean) = read_stream(res).await;
    assert!(!clean, "the body must not end cleanly");
    assert_eq!(events(&wire).len(), 2);
    // Non-stream: half the body under a full content-length.
    let res = m
        .client
        .request(m.request(
            "POST",
            CHAT,
            Some(KEY),
            &[],
            chat("qwen-plus", "hi").to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("content-length"));
    assert!(res.into_body().collect().await.is_err());
    let s = m.handle.stats();
    assert_eq!(s.resets, 3);
    assert_eq!(
        s.streams_cancelled, 0,
        "a reset is not a client cancellation"
    );

    // The server keeps serving new connections.
    m.handle.set_faults(FaultPlan::new());
    assert_eq!(
        m.post(NATIVE, Some(KEY), &[], &native("qwen-plus", "hi"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn error_frames_mid_stream_in_both_dialects() {
    let native_err = Fault::StreamError {
        after_tokens: 2,
        error: ApiError::internal_error(),
    };
    let m = start(
        builder()
            .output_tokens(nz(5))
            .faults(FaultPlan::new().with(native_err, 1.0)),
    )
    .await;
    let sse = [("x-dashscope-sse", "enable")];
    let res = m
        .open(NATIVE, Some(KEY), &sse, &native("qwen-plus", "hi"))
        .await;
    assert_eq!(res.status(), 200);
    let (wire, clean) = read_stream(res).await;
    assert!(clean);
    let evs = events(&wire);
    assert_eq!(evs.len(), 3);
    assert_eq!(
        evs[1].json()["output"]["choices"][0]["finish_reason"],
        "null"
    );
    assert_eq!(evs[2].id.as_deref(), Some("3"));
    assert_eq!(evs[2].event.as_deref(), Some("error"));
    assert_eq!(evs[2].comment.as_deref(), Some("HTTP_STATUS/500"));
    assert_eq!(evs[2].json()["code"], "InternalError");
    assert!(tower_qwen::sse::parse_events(wire.as_bytes())[2].is_error());

    let inspect = Fault::StreamError {
        after_tokens: 3,
        error: ApiError::data_inspection_failed(),
    };
    m.handle.set_faults(FaultPlan::new().with(inspect, 1.0));
    let mut body = chat("qwen-plus", "hi");
    body["stream"] = json!(true);
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    let (wire, _) = read_stream(res).await;
    let evs = events(&wire);
    assert_eq!(evs.len(), 1 + 3 + 1, "{wire}");
    let err = evs[4].json();
    assert_eq!(err["error"]["code"], "data_inspection_failed");
    assert_eq!(err["error"]["type"], "data_inspection_failed");
    assert_eq!(
        err["error"]["message"],
        "Output data may contain inappropriate content."
    );
    assert!(!wire.contains("[DONE]"));
    // Non-stream requests get the error as an error response.
    let a = m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi")).await;
    assert_compat_error(
        &a,
        400,
        "data_inspection_failed",
        "Output data may contain inappropriate content.",
    );
    let s = m.handle.stats();
    assert_eq!(s.code("InternalError"), 1);
    assert_eq!(s.code("data_inspection_failed"), 2);
}

#[tokio::test]
async fn streams_cut_without_a_final_chunk() {
    let m = start(
        builder()
            .output_tokens(nz(5))
            .faults(FaultPlan::new().with(Fault::StreamCut { after_tokens: 99 }, 1.0)),
    )
    .await;
    let sse = [("x-dashscope-sse", "enable")];
    let res = m
        .open(NATIVE, Some(KEY), &sse, &native("qwen-plus", "hi"))
        .await;
    let (wire, clean) = read_stream(res).await;
    assert!(clean, "the HTTP body ends normally");
    let evs = events(&wire);
    assert_eq!(evs.len(), 4, "clamped to before the last token");
    assert!(
        evs.iter()
            .all(|e| e.json()["output"]["choices"][0]["finish_reason"] == "null")
    );

    let mut body = chat("qwen-plus", "hi");
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    let (wire, clean) = read_stream(res).await;
    assert!(clean);
    assert!(
        !wire.contains("[DONE]")
            && !wire.contains("\"finish_reason\":\"stop\"")
            && !wire.contains("completion_tokens")
    );
    // Non-stream answers are whole.
    assert_eq!(
        m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi"))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn native_stream_errors_can_be_sent_as_sse() {
    let m = start(builder().stream_errors_as_sse(true)).await;
    let sse = [("x-dashscope-sse", "enable")];
    let res = m
        .open(NATIVE, Some("sk-bad"), &sse, &native("qwen-plus", "hi"))
        .await;
    assert_eq!(res.status(), 401);
    assert_eq!(
        res.headers()["content-type"],
        "text/event-stream;charset=UTF-8"
    );
    let (wire, _) = read_stream(res).await;
    let evs = events(&wire);
    assert_eq!(evs[0].event.as_deref(), Some("error"));
    assert_eq!(evs[0].comment.as_deref(), Some("HTTP_STATUS/401"));
    assert_eq!(evs[0].json()["code"], "InvalidApiKey");
    // Non-stream requests still get JSON.
    let a = m
        .post(NATIVE, Some("sk-bad"), &[], &native("qwen-plus", "hi"))
        .await;
    assert_eq!(a.headers["content-type"], "application/json");
}

// ---------------------------------------------------------------------------
// Counters

#[tokio::test(start_paused = true)]
async fn counters_track_concurrency_and_streams() {
    let lat = Latency::none().time_to_headers(Dist::fixed(Duration::from_secs(1)));
    let m = start(builder().faults(FaultPlan::new().latency(lat))).await;
    let answers = burst(&m, 7, KEY, "qwen-plus").await;
    assert_eq!(count(&answers, 200), 7);
    let s = m.handle.stats();
    assert_eq!(s.peak_in_flight, 7);
    assert_eq!(s.in_flight, 0);
    assert_eq!(s.requests, 7);

    // A stream the client drops half way is counted as cancelled.
    m.handle.set_faults(
        FaultPlan::new().latency(Latency::none().per_token(Dist::fixed(Duration::from_secs(1)))),
    );
    let mut body = chat("qwen-plus", "hi");
    body["stream"] = json!(true);
    let res = m.open(CHAT, Some(KEY), &[], &body).await;
    let mut b = res.into_body();
    b.frame().await.unwrap().unwrap();
    drop(b);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = m.handle.stats();
    assert_eq!(
        (s.streams_started, s.streams_completed, s.streams_cancelled),
        (1, 0, 1)
    );
    assert_eq!(s.in_flight, 0);
    m.handle.reset_stats();
    assert_eq!(m.handle.stats().requests, 0);
}

// ---------------------------------------------------------------------------
// Robustness

#[tokio::test]
async fn hostile_bodies_get_a_400_in_the_right_shape() {
    let m = start(builder().body_limit(64 * 1024)).await;
    let deep = "[".repeat(10_000);
    let bad: Vec<Bytes> = vec![
        Bytes::from_static(b""),
        Bytes::from_static(b"not json"),
        Bytes::from_static(b"[]"),
        Bytes::from_static(b"null"),
        Bytes::from_static(b"{\"model\":5}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":\"hi\"}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[]}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[{\"content\":\"no role\"}]}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[{\"role\":\"user\",\"content\":5}]}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream\":\"yes\"}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":-1}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"max_tokens\":0}"),
        Bytes::from_static(b"{\"model\":\"qwen-plus\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"stream_options\":3}"),
        Bytes::from(deep),
        Bytes::from_static(b"\xff\xfe{"),
    ];
    for body in &bad {
        let a = m.post_raw(CHAT, body.clone()).await;
        assert_eq!(a.status, 400, "{body:?}: {}", a.text());
        assert_eq!(
            a.json()["error"]["code"],
            "invalid_parameter_error",
            "{body:?}"
        );
    }
    let native_bad: Vec<&[u8]> = vec![
        b"{\"model\":\"qwen-plus\"}",
        b"{\"model\":\"qwen-plus\",\"input\":5}",
        b"{\"model\":\"qwen-plus\",\"input\":{\"prompt\":5}}",
        b"{\"model\":\"qwen-plus\",\"input\":{\"prompt\":\"x\"},\"parameters\":[]}",
        b"{\"model\":\"qwen-plus\",\"input\":{\"prompt\":\"x\"},\"parameters\":{\"result_format\":1}}",
        b"{\"model\":\"qwen-plus\",\"input\":{\"prompt\":\"x\"},\"parameters\":{\"incremental_output\":\"true\"}}",
        b"{\"input\":{\"prompt\":\"x\"}}",
    ];
    for body in native_bad {
        let a = m.post_raw(NATIVE, Bytes::from_static(body)).await;
        assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(body));
        assert!(a.json()["code"].is_string());
        assert_eq!(a.json()["request_id"], a.request_id());
    }
    let a = m
        .post_raw(
            NATIVE,
            Bytes::from_static(b"{\"input\":{\"prompt\":\"x\"}}"),
        )
        .await;
    assert_eq!(a.json()["code"], "BadRequest.EmptyModel");
    let a = m
        .post_raw(NATIVE, Bytes::from_static(b"{\"model\":\"qwen-plus\"}"))
        .await;
    assert_eq!(a.json()["code"], "BadRequest.EmptyInput");

    // Over the size cap.
    let huge = format!(
        "{{\"model\":\"qwen-plus\",\"messages\":[{{\"role\":\"user\",\"content\":\"{}\"}}]}}",
        "a".repeat(100_000)
    );
    let a = m.post_raw(CHAT, huge.clone()).await;
    assert_eq!(a.status, 413);
    assert_eq!(a.json()["error"]["code"], "request_too_large");
    let a = m.post_raw(NATIVE, huge).await;
    assert_eq!(a.json()["code"], "RequestTooLarge");

    // Unknown paths and methods, in the shape of their prefix.
    let a = m
        .post_raw("/compatible-mode/v1/nothing", Bytes::new())
        .await;
    assert_eq!(a.status, 404);
    assert!(a.json()["error"]["code"].is_string());
    let a = m.get(NATIVE, Some(KEY)).await;
    assert_eq!(a.status, 405);
    assert_eq!(a.json()["code"], "MethodNotAllowed");

    // Still healthy.
    assert_eq!(
        m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi"))
            .await
            .status,
        200
    );
    let s = m.handle.stats();
    assert_eq!(s.status(500), 0);
    assert_eq!(
        s.calls("qwen-plus"),
        1,
        "invalid requests never reach a model"
    );
}

// ---------------------------------------------------------------------------
// Lifecycle

#[tokio::test]
async fn shutdown_and_drop_stop_the_server() {
    let m = start(builder()).await;
    let addr = m.handle.addr();
    assert_eq!(m.handle.base_url(), format!("http://{addr}"));
    assert_eq!(
        m.handle.compatible_base_url(),
        format!("http://{addr}/compatible-mode/v1")
    );
    assert_eq!(m.handle.native_base_url(), format!("http://{addr}/api/v1"));
    assert_eq!(
        m.post(CHAT, Some(KEY), &[], &chat("qwen-plus", "hi"))
            .await
            .status,
        200
    );
    let Mock { handle, client } = m;
    drop(client);
    handle.shutdown().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());

    let m = start(builder()).await;
    let addr = m.handle.addr();
    drop(m);
    tokio::task::yield_now().await;
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

// ---------------------------------------------------------------------------
// The crate's classifier reads every mock answer as intended.

#[tokio::test(start_paused = true)]
async fn classifier_agrees_with_every_mock_answer() {
    use tower_qwen::classify::{Classifier, Outcome, PermanentReason as P, ThrottleCause as T};

    let m = start(
        builder()
            .key("sk-free", "free")
            .key_state("sk-free", AccountState::FreeQuotaExhausted)
            .key("sk-tier", "tier")
            .key_state("sk-tier", AccountState::FreeTierOnly)
            .key("sk-debt", "debt")
            .key_state("sk-debt", AccountState::Arrearage)
            .models([
                "qwen-plus",
                "qwen-rpm",
                "qwen-tpm",
                "qwen-burst",
                "qwq-plus",
                "qwen-5xx",
            ])
            .quota("qwen-rpm", Quota::per_minute(nz(60)))
            .quota(
                "qwen-tpm",
                Quota::tokens_per_minute(NonZeroU64::new(60).unwrap()),
            )
            .quota("qwen-burst", quota(6000, 100_000_000))
            .body_limit(4096),
    )
    .await;
    let c = Classifier::new();
    let check = |a: &Answer, want: Outcome, what: &str| {
        let got = c.classify(a.status, &a.headers, &a.body);
        assert_eq!(got, want, "{what}: {} {}", a.status, a.text());
    };
    for (path, body) in [
        (NATIVE, native as fn(&str, &str) -> Value),
        (CHAT, chat as fn(&str, &str) -> Value),
    ] {
        let req = |model: &str| body(model, "hi");
        let ok = m.post(path, Some(KEY), &[], &req("qwen-plus")).await;
        check(&ok, Outcome::Success, "success");
        let a = m.post(path, Some("sk-nope"), &[], &req("qwen-plus")).await;
        check(&a, Outcome::Permanent { reason: P::Auth }, "bad key");
        let a = m.post(path, Some("sk-free"), &[], &req("qwen-plus")).await;
        check(
            &a,
            Outcome::Permanent {
                reason: P::FreeQuotaExhausted,
            },
            "free quota",
        );
        let a = m.post(path, Some("sk-tier"), &[], &req("qwen-plus")).await;
        check(
            &a,
            Outcome::Permanent {
                reason: P::FreeQuotaExhausted,
            },
            "free tier only",
        );
        let a = m.post(path, Some("sk-debt"), &[], &req("qwen-plus")).await;
        check(&a, Outcome::Permanent { reason: P::Billing }, "arrearage");
        let a = m.post(path, Some(KEY), &[], &req("qwen-unknown")).await;
        check(
            &a,
            Outcome::Permanent {
                reason: P::ModelNotFound,
            },
            "model",
        );
        let a = m.post(path, Some(KEY), &[], &req("qwq-plus")).await;
        check(
            &a,
            Outcome::Permanent {
                reason: P::StreamOnly,
            },
            "stream only",
        );
        let a = m
            .post_raw(path, Bytes::from_static(b"{\"model\":\"qwen-plus\"}"))
            .await;
        assert!(
            matches!(
                c.classify(a.status, &a.headers, &a.body),
                Outcome::Permanent { .. }
            ),
            "invalid request: {}",
            a.text()
        );
        let a = m.post_raw(path, Bytes::from(vec![b' '; 8192])).await;
        check(
            &a,
            Outcome::Permanent {
                reason: P::TooLarge,
            },
            "too large",
        );

        // Quotas: each in a fresh second.
        advance(Duration::from_secs(1)).await;
        m.post(path, Some(KEY), &[], &req("qwen-rpm")).await;
        let a = m.post(path, Some(KEY), &[], &req("qwen-rpm")).await;
        check(&a, Outcome::throttled(T::Requests), "rpm");
        m.post(path, Some(KEY), &[], &req("qwen-tpm")).await;
        let a = m.post(path, Some(KEY), &[], &req("qwen-tpm")).await;
        check(&a, Outcome::throttled(T::Tokens), "tpm");
        m.handle.set_burst_guard(BurstGuard::new(nz(1), 1.0));
        m.post(path, Some(KEY), &[], &req("qwen-burst")).await;
        let a = m.post(path, Some(KEY), &[], &req("qwen-burst")).await;
        check(&a, Outcome::throttled(T::Burst), "burst");
        m.handle.set_burst_guard(None);

        // Injected server errors are transient, a 200 with an error is not a
        // success.
        for e in [
            ApiError::internal_error(),
            ApiError::service_unavailable(),
            ApiError::gateway_timeout(),
        ] {
            m.handle
                .set_model_faults("qwen-5xx", FaultPlan::new().with(Fault::Error(e), 1.0));
            let a = m.post(path, Some(KEY), &[], &req("qwen-5xx")).await;
            assert!(
                c.classify(a.status, &a.headers, &a.body).is_transient(),
                "{}",
                a.text()
            );
        }
        m.handle.set_model_faults(
            "qwen-5xx",
            FaultPlan::new().with(Fault::ErrorIn200(ApiError::internal_error()), 1.0),
        );
        let a = m.post(path, Some(KEY), &[], &req("qwen-5xx")).await;
        assert_eq!(a.status, 200);
        assert!(
            !c.classify(a.status, &a.headers, &a.body).is_success(),
            "{}",
            a.text()
        );
        m.handle.set_model_faults("qwen-5xx", None);
    }

    // In-stream errors, frame by frame.
    m.handle.set_model_faults(
        "qwen-5xx",
        FaultPlan::new().with(
            Fault::StreamError {
                after_tokens: 1,
                error: ApiError::internal_error(),
            },
            1.0,
        ),
    );
    let sse = [("x-dashscope-sse", "enable")];
    let (wire, _) = read_stream(
        m.open(NATIVE, Some(KEY), &sse, &native("qwen-5xx", "hi"))
            .await,
    )
    .await;
    let outcomes = classify_frames(&c, &wire);
    assert_eq!(outcomes.len(), 1, "{wire}");
    assert!(outcomes[0].is_transient());

    m.handle.set_model_faults(
        "qwen-5xx",
        FaultPlan::new().with(
            Fault::StreamError {
                after_tokens: 1,
                error: ApiError::data_inspection_failed(),
            },
            1.0,
        ),
    );
    let mut body = chat("qwen-5xx", "hi");
    body["stream"] = json!(true);
    let (wire, _) = read_stream(m.open(CHAT, Some(KEY), &[], &body).await).await;
    assert_eq!(
        classify_frames(&c, &wire),
        vec![Outcome::Permanent {
            reason: P::ContentFilter
        }],
        "{wire}"
    );

    m.handle
        .set_model_faults("qwen-5xx", FaultPlan::new().throttled_stream_as_sse(1.0));
    m.handle.set_quota("qwen-5xx", Quota::per_minute(nz(60)));
    advance(Duration::from_secs(1)).await;
    read_stream(
        m.open(NATIVE, Some(KEY), &sse, &native("qwen-5xx", "hi"))
            .await,
    )
    .await;
    let res = m
        .open(NATIVE, Some(KEY), &sse, &native("qwen-5xx", "hi"))
        .await;
    assert_eq!(res.status(), 200);
    let (wire, _) = read_stream(res).await;
    assert_eq!(
        classify_frames(&c, &wire),
        vec![Outcome::throttled(T::Requests)]
    );
}

/// The classifier's verdicts on the error frames of a stream.
fn classify_frames(
    c: &tower_qwen::classify::Classifier,
    wire: &str,
) -> Vec<tower_qwen::classify::Outcome> {
    let mut out = Vec::new();
    let mut scanner = tower_qwen::sse::SseScanner::new();
    scanner.feed(wire.as_bytes(), |data, meta| {
        if let Some(o) = c.classify_event(meta, data) {
            out.push(o);
        }
    });
    out
}
