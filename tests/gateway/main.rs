#![cfg(all(feature = "gateway", feature = "mock"))]
//! The gateway against the mock DashScope server, over loopback: client
//! keys, buckets and 429s, degradation, streaming, cancellation, limits,
//! metrics, shutdown, logs. Time-dependent tests run on tokio's paused
//! clock: nothing sleeps for real.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::join_all;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{Instant, advance};
use tower_qwen::gateway::{Gateway, GatewayConfig, key_sha256};
use tower_qwen::mock::{
    ApiError, Dist, Fault, FaultPlan, Latency, MockDashScope, MockDashScopeBuilder, MockHandle,
};

const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";
const CHAT: &str = "/compatible-mode/v1/chat/completions";
const IMAGE: &str = "/api/v1/services/aigc/text2image/image-synthesis";
const ALICE: &str = "gw-alice-key-0001";
const BOB: &str = "gw-bob-key-0002";
const UPSTREAM: &str = "sk-upstream-main";
const UPSTREAM2: &str = "sk-upstream-backup";

mod budgets;
mod fair_share;
mod files;
mod ops;
#[cfg(feature = "redis")]
#[path = "../redis/server.rs"]
mod redis_server;
#[cfg(feature = "redis")]
mod replicas;
#[cfg(feature = "otel")]
mod telemetry;

// ---------------------------------------------------------------------------
// Harness

struct Env {
    mock: MockHandle,
    gateway: Gateway,
    addr: SocketAddr,
    client: Client<HttpConnector, Full<Bytes>>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
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

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
            .to_str()
            .unwrap()
    }
}

fn mock() -> MockDashScopeBuilder {
    MockDashScope::builder()
        .key(UPSTREAM, "acct-main")
        .key(UPSTREAM2, "acct-backup")
}

/// The base configuration: one upstream account, two client keys; `extra`
/// is appended (more sections, or fields of the last `[[keys]]`).
fn config(mock: &MockHandle, extra: &str) -> String {
    format!(
        r#"
        [upstream]
        base_url = "{base}"
        [degrade]
        jitter = 0
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        [[keys]]
        name = "bob"
        sha256 = "{bob}"
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        {extra}
        "#,
        base = mock.base_url(),
        bob = key_sha256(BOB),
    )
}

async fn start(mock: MockDashScopeBuilder, extra: &str) -> Env {
    let mock = mock.start().await.expect("mock starts");
    let text = config(&mock, extra);
    start_with(mock, &text).await
}

async fn start_with(mock: MockHandle, text: &str) -> Env {
    let cfg = GatewayConfig::from_toml_with_env(text, |_| None).expect("valid config");
    let gateway = Gateway::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(gateway.clone().serve(listener, async move {
        let _ = rx.await;
    }));
    Env {
        mock,
        gateway,
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        stop: Some(tx),
        server: Some(server),
    }
}

/// One upstream account (`models`: its `[accounts.models.*]` tables) and
/// Alice's key, with the given admission wait.
fn one_account(mock: &MockHandle, admission_wait: &str, models: &str) -> String {
    format!(
        r#"
        [upstream]
        base_url = "{base}"
        admission_wait = "{admission_wait}"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        {models}
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        "#,
        base = mock.base_url()
    )
}

fn chat(model: &str, stream: bool) -> String {
    format!(
        r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Hello, world"}}]}}"#
    )
}

fn native(model: &str) -> String {
    format!(
        r#"{{"model":"{model}","input":{{"messages":[{{"role":"user","content":"Hello, world"}}]}},"parameters":{{"incremental_output":true}}}}"#
    )
}

impl Env {
    fn request(
        &self,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::post(format!("http://{}{path}", self.addr))
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(Full::new(Bytes::from(body.to_owned()))).unwrap()
    }

    async fn send(&self, req: Request<Full<Bytes>>) -> Answer {
        let res = self.client.request(req).await.expect("gateway answers");
        let status = res.status();
        let headers = res.headers().clone();
        let body = res
            .into_body()
            .collect()
            .await
            .expect("whole body")
            .to_bytes();
        Answer {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, path: &str, key: Option<&str>, body: &str) -> Answer {
        self.send(self.request(path, key, &[], body)).await
    }

    /// The status of a plain non-stream chat call with Alice's key.
    async fn alice_chat(&self, model: &str) -> u16 {
        let a = self.post(CHAT, Some(ALICE), &chat(model, false)).await;
        a.status.as_u16()
    }

    /// The whole wire of a 200 stream answer to Alice, which must end
    /// cleanly.
    async fn stream_wire(&self, path: &str, headers: &[(&str, &str)], body: &str) -> String {
        let res = self
            .open(self.request(path, Some(ALICE), headers, body))
            .await;
        assert_eq!(res.status(), 200);
        let bytes = res
            .into_body()
            .collect()
            .await
            .expect("a clean end")
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// [`Env::stream_wire`] of a native qwen-plus stream.
    async fn native_stream_wire(&self) -> String {
        let sse = [("x-dashscope-sse", "enable")];
        self.stream_wire(NATIVE, &sse, &native("qwen-plus")).await
    }

    async fn open(&self, req: Request<Full<Bytes>>) -> http::Response<Incoming> {
        self.client.request(req).await.expect("gateway answers")
    }

    async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        let mut b = Request::get(format!("http://{}{path}", self.addr));
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        self.send(b.body(Full::new(Bytes::new())).unwrap()).await
    }

    async fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            s.await.unwrap().unwrap();
        }
    }
}

/// One call through `app` in process with client key `key`; the answer's
/// body is read to its end.
async fn call(
    app: &axum::Router,
    key: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    use tower::ServiceExt as _;
    let mut req = Request::post(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

fn count(answers: &[Answer], status: u16) -> usize {
    answers
        .iter()
        .filter(|a| a.status.as_u16() == status)
        .count()
}

/// Asserts a gateway-made error in the compatible (OpenAI) shape.
fn assert_compat(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status.as_u16(), status, "{:?}", a.body);
    let v = a.json();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["message"].is_string() && v["error"]["type"].is_string(),
        "{v}"
    );
    assert!(v["error"].get("param").is_some(), "{v}");
    assert!(v["request_id"].as_str().unwrap().starts_with("gw-"), "{v}");
}

/// Asserts a gateway-made error in the native shape.
fn assert_native(a: &Answer, status: u16, code: &str) {
    assert_eq!(a.status.as_u16(), status, "{:?}", a.body);
    let v = a.json();
    assert_eq!(v["code"], code, "{v}");
    assert!(v["message"].is_string(), "{v}");
    assert_eq!(v["request_id"].as_str(), Some(a.header("x-request-id")));
}

/// Collects the data frames of a body with the (paused) instant each
/// arrived.
async fn frames(res: http::Response<Incoming>) -> Vec<(Instant, Bytes)> {
    let mut body = res.into_body();
    let mut out = Vec::new();
    while let Some(f) = body.frame().await {
        if let Ok(d) = f.expect("frame").into_data() {
            out.push((Instant::now(), d));
        }
    }
    out
}

/// The text deltas of a compatible SSE body.
fn compat_deltas(wire: &[u8]) -> (Vec<String>, Option<String>, bool) {
    let text = std::str::from_utf8(wire).unwrap();
    let mut deltas = Vec::new();
    let mut finish = None;
    let mut done = false;
    for line in text.lines() {
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(data).unwrap();
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str()
            && !c.is_empty()
        {
            deltas.push(c.to_owned());
        }
        if let Some(f) = v["choices"][0]["finish_reason"].as_str() {
            finish = Some(f.to_owned());
        }
    }
    (deltas, finish, done)
}

/// Log lines written while the guard lives (thread-local subscriber: the
/// tests run on a current-thread runtime, so every task logs here).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn capture(&self) -> tracing::subscriber::DefaultGuard {
        // A global subscriber that wants everything (and does nothing with
        // it), set once: with a single thread-local subscriber alive,
        // tracing computes a callsite's interest from the thread that hits
        // it first, so a test without a subscriber running beside this one
        // could otherwise switch a callsite off for good.
        static GLOBAL: std::sync::Once = std::sync::Once::new();
        GLOBAL.call_once(|| {
            let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
        });
        let buf = self.0.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || LogWriter(buf.clone()))
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// ---------------------------------------------------------------------------
// Keys, buckets, 429s

#[tokio::test(start_paused = true)]
async fn keys_are_isolated_and_an_empty_bucket_answers_429_then_refills() {
    let env = start(mock(), "capacity = 3\nrefill_per_second = 1").await;
    for _ in 0..3 {
        let a = env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.header("x-ratelimit-limit"), "3");
    }
    // Alice's bucket is empty: 429 at once, in the compatible shape.
    let t0 = Instant::now();
    let a = env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
    assert_eq!(Instant::now(), t0, "refused without waiting");
    assert_compat(&a, 429, "limit_requests");
    assert_eq!(a.header("retry-after"), "1");
    assert_eq!(a.header("x-ratelimit-limit"), "3");
    assert_eq!(a.header("x-ratelimit-remaining"), "0");
    assert_eq!(a.header("x-ratelimit-reset"), "3");
    // ... and in the native shape on a native path.
    let a = env.post(NATIVE, Some(ALICE), &native("qwen-plus")).await;
    assert_native(&a, 429, "Throttling.RateQuota");
    assert_eq!(a.header("retry-after"), "1");

    // Bob's bucket (the default 50) is untouched by Alice's.
    let body = chat("qwen-plus", false);
    let answers = join_all((0..20).map(|_| env.post(CHAT, Some(BOB), &body))).await;
    assert_eq!(count(&answers, 200), 20);
    assert_eq!(answers[19].header("x-ratelimit-limit"), "50");

    // One second refills one request for Alice.
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false))
            .await
            .status,
        429
    );
    // Only admitted requests reached the upstream.
    assert_eq!(env.mock.stats().requests, 3 + 20 + 1);
}

#[tokio::test]
async fn missing_or_unknown_keys_get_401_in_the_endpoint_shape() {
    let env = start(mock(), "").await;
    let a = env.post(CHAT, None, &chat("qwen-plus", false)).await;
    assert_compat(&a, 401, "invalid_api_key");
    let a = env
        .post(CHAT, Some("gw-not-a-key"), &chat("qwen-plus", false))
        .await;
    assert_compat(&a, 401, "invalid_api_key");
    let a = env.post(NATIVE, Some(UPSTREAM), &native("qwen-plus")).await;
    assert_native(&a, 401, "InvalidApiKey");
    // Unknown paths are not proxied anywhere.
    let a = env.post("/v1/anything", Some(ALICE), "{}").await;
    assert_native(&a, 404, "InvalidURL");
    assert_eq!(env.mock.stats().requests, 0);
    // Both configured forms of a key work (plain and SHA-256).
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
    assert_eq!(
        env.post(CHAT, Some(BOB), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
}

#[tokio::test(start_paused = true)]
async fn upstream_account_budgets_spill_over_the_pool_then_answer_429() {
    let m = mock().start().await.unwrap();
    let text = format!(
        r#"
        [upstream]
        base_url = "{base}"
        admission_wait = "off"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        [accounts.models.qwen-plus]
        rpm = 60
        [[accounts]]
        name = "backup"
        api_key = "{UPSTREAM2}"
        [accounts.models.qwen-plus]
        rpm = 60
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        accounts = ["main", "backup"]
        "#,
        base = m.base_url()
    );
    let env = start_with(m, &text).await;
    // 60 RPM = one request a second per account: two pass (one on each
    // account), the third is refused by both.
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
    let a = env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
    assert_compat(&a, 429, "limit_requests");
    assert_eq!(a.header("retry-after"), "1");
    // Issue 12, item 8: the quota per minute, not the burst it is smoothed
    // to (60 RPM are enforced as one a second: the limit showed 1), and
    // what is left of it (one call booked on each account).
    assert_eq!(a.header("x-ratelimit-limit-requests"), "60");
    assert_eq!(a.header("x-ratelimit-remaining-requests"), "59");
    assert_eq!(a.header("x-ratelimit-reset-requests"), "1");
    assert!(a.headers.get("x-ratelimit-limit-tokens").is_none());
    let a = env.post(NATIVE, Some(ALICE), &native("qwen-plus")).await;
    assert_native(&a, 429, "Throttling.RateQuota");
    // Another model has its own budget (the Qwen defaults).
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-turbo", false))
            .await
            .status,
        200
    );
    let s = env.mock.stats();
    assert_eq!(s.requests, 3);
    assert_eq!(s.status(200), 3);
    advance(Duration::from_secs(1)).await;
    assert_eq!(
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
}

#[tokio::test(start_paused = true)]
async fn a_short_wait_for_the_upstream_budget_is_waited_not_refused() {
    let m = mock().start().await.unwrap();
    let text = one_account(&m, "3s", "[accounts.models.qwen-plus]\nrpm = 30");
    let env = start_with(m, &text).await;
    // 30 RPM: one call every 2 s. Three at once: the first goes now, the
    // second waits 2 s, the third would wait 4 s > 3 s and is refused now.
    let t0 = Instant::now();
    let body = chat("qwen-plus", false);
    let calls = (0..3).map(|_| async {
        let a = env.post(CHAT, Some(ALICE), &body).await;
        (a.status.as_u16(), Instant::now() - t0)
    });
    let mut got = join_all(calls).await;
    got.sort();
    assert_eq!(
        got,
        [
            (200, Duration::ZERO),
            (200, Duration::from_secs(2)),
            (429, Duration::ZERO)
        ]
    );
    assert_eq!(env.mock.stats().requests, 2);
}

/// Issue 12, item 8, with both quotas: the token headers show the TPM.
#[tokio::test(start_paused = true)]
async fn account_429s_show_the_quotas_per_minute() {
    let m = mock().start().await.unwrap();
    let text = one_account(
        &m,
        "off",
        "[accounts.models.qwen-plus]\nrpm = 600\ntpm = 6000",
    );
    let env = start_with(m, &text).await;
    // 6000 TPM are smoothed to 100 a second: a call that reserves 1000
    // tokens goes when nothing is owed, and leaves a debt the next one
    // waits for.
    let big =
        r#"{"model":"qwen-plus","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#;
    assert_eq!(env.post(CHAT, Some(ALICE), big).await.status, 200);
    let a = env.post(CHAT, Some(ALICE), big).await;
    assert_compat(&a, 429, "insufficient_quota");
    assert_eq!(a.header("x-ratelimit-limit-requests"), "600");
    assert_eq!(a.header("x-ratelimit-limit-tokens"), "6000");
    let left = |name: &str| a.header(name).parse::<u64>().unwrap();
    assert!((599..=600).contains(&left("x-ratelimit-remaining-requests")));
    // The first call's tokens (its estimate, reconciled to its usage) are
    // booked against the minute.
    let tokens = left("x-ratelimit-remaining-tokens");
    assert!((4900..6000).contains(&tokens), "{tokens}");
    assert!(left("x-ratelimit-reset-tokens") >= 1);
}

// ---------------------------------------------------------------------------
// Hostile input

/// Sends `request` as raw bytes on a fresh connection and reads the answer
/// to its end (the request asks the server to close): (status, head, body).
async fn raw(addr: SocketAddr, request: &[u8]) -> (u16, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no answer head in {text:?}"));
    let status = head[9..12].parse().unwrap();
    (status, head.to_ascii_lowercase(), body.as_bytes().to_vec())
}

fn raw_post(path: &str, key: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "POST {path} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn answer(status: u16, head: String, body: Vec<u8>) -> Answer {
    let mut headers = HeaderMap::new();
    for line in head.lines().skip(1) {
        if let Some((n, v)) = line.split_once(':') {
            headers.append(
                http::HeaderName::from_bytes(n.trim().as_bytes()).unwrap(),
                v.trim().parse().unwrap(),
            );
        }
    }
    Answer {
        status: StatusCode::from_u16(status).unwrap(),
        headers,
        body: Bytes::from(body),
    }
}

/// Issue 12, item 1: a repeated `"model"` was read as no model, so the
/// call passed the (account, model) budget uncounted (40 of 40 admitted
/// where normal calls got 1 of 40). Now every ambiguity in what admission
/// reads gets a 400 in the endpoint's shape and nothing leaves.
#[tokio::test(start_paused = true)]
async fn ambiguous_bodies_get_400_and_never_reach_the_upstream() {
    let m = mock().start().await.unwrap();
    let text =
        one_account(&m, "off", "[accounts.models.qwen-plus]\nrpm = 60") + "capacity = 1000\n";
    let env = start_with(m, &text).await;
    // The account admits one call a second for qwen-plus.
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
    assert_eq!(env.alice_chat("qwen-plus").await, 429);
    // The body of the report, forty times: none passes.
    let twice =
        r#"{"model":"qwen-plus","model":"qwen-plus","messages":[{"role":"user","content":"hi"}]}"#;
    for _ in 0..40 {
        let a = env.post(CHAT, Some(ALICE), twice).await;
        assert_compat(&a, 400, "invalid_parameter_error");
        let msg = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(msg.contains("`model` twice"), "{msg}");
    }
    let native_twice = r#"{"model":"qwen-plus","input":{"messages":[{"role":"user","content":"hi"}]},"model":"qwen-turbo"}"#;
    let a = env.post(NATIVE, Some(ALICE), native_twice).await;
    assert_native(&a, 400, "InvalidParameter");
    let msgs = r#""messages":[{"role":"user","content":"hi"}]"#;
    let deep = format!(
        r#"{{"model":"qwen-plus","messages":[{{"role":"user","content":{}"hi"{}}}]}}"#,
        "[".repeat(300),
        "]".repeat(300)
    );
    for body in [
        format!(r#"{{"Model":"qwen-turbo","model":"qwen-plus",{msgs}}}"#),
        format!(r#"{{"model":"qwen-plus",{msgs},"stream":false,"stream":true}}"#),
        format!(r#"{{"model":"qwen-plus","max_tokens":"100000",{msgs}}}"#),
        format!(r#"{{"model":"qwen-plus",{msgs},{msgs}}}"#),
        format!(r#"{{"model":"qwen-plus",{msgs}}} {{"model":"qwen-turbo"}}"#),
        format!(r#"[{{"model":"qwen-plus",{msgs}}}]"#),
        format!(r#"{{"model":"qwen-plus",{msgs}"#),
        deep,
    ] {
        let a = env.post(CHAT, Some(ALICE), &body).await;
        assert_compat(&a, 400, "invalid_parameter_error");
        let a = env.post(NATIVE, Some(ALICE), &body).await;
        assert_native(&a, 400, "InvalidParameter");
    }
    // Invalid UTF-8 (even where no one reads it), over a raw connection.
    let mut bad = format!(r#"{{"model":"qwen-plus","user":"xx",{msgs}}}"#).into_bytes();
    let at = bad.iter().position(|b| *b == b'x').unwrap();
    bad[at] = 0xff;
    let (status, head, body) = raw(env.addr, &raw_post(CHAT, ALICE, &bad)).await;
    let a = answer(status, head, body);
    assert_compat(&a, 400, "invalid_parameter_error");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("UTF-8")
    );
    // No model: nothing to charge, refused (the upstream would too).
    for body in [
        format!("{{{msgs}}}"),
        format!(r#"{{"model":null,{msgs}}}"#),
        format!(r#"{{"model":"  ",{msgs}}}"#),
        String::new(),
    ] {
        let a = env.post(CHAT, Some(ALICE), &body).await;
        assert_compat(&a, 400, "invalid_parameter_error");
        let a = env.post(NATIVE, Some(ALICE), &body).await;
        assert_native(&a, 400, "BadRequest.EmptyModel");
    }
    // Other spellings of the model share its budget: still refused.
    for model in ["Qwen-Plus", " qwen-plus", "QWEN-PLUS "] {
        let a = env.post(CHAT, Some(ALICE), &chat(model, false)).await;
        assert_compat(&a, 429, "limit_requests");
    }
    assert_eq!(env.mock.stats().requests, 1, "nothing else left");
    let metrics = env.gateway.render_metrics();
    assert!(
        metrics.contains(r#"gateway_refusals_total{key="alice",reason="invalid_body"}"#),
        "{metrics}"
    );
    // A second later the budget admits one call again, the plain way.
    advance(Duration::from_secs(1)).await;
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
}

/// Issue 12, item 2: `/api/v1/services/../files` and its encoded forms
/// were forwarded verbatim, with the account's key, to a host that
/// normalises them. Only allow-listed paths leave, byte for byte.
#[tokio::test]
async fn paths_off_the_allow_list_never_leave() {
    let env = start(mock(), "").await;
    let body = native("qwen-plus");
    for path in [
        "/api/v1/services/../files",
        "/api/v1/services/aigc/../../files",
        "/api/v1/services/%2e%2e/files",
        "/api/v1/services/%2E%2e/%2e%2E/files",
        "/api/v1/services/aigc%2f..%2f..%2ffiles/x",
        "/api/v1/services/aigc/./text-generation/generation",
        "/api/v1/services/aigc/text-generation/generation/",
        "/api/v1/services//aigc/text-generation/generation",
        "/api/v1/services/aigc/text-generation//generation",
        "/api/v1/services/aigc/text-generation/generation/..",
        "/api/v1/services/aigc\\..\\files/x",
        "/api/v1/services/aigc/%74ext-generation/generation",
        "/api/v1/services/a/b/c/d/e",
        "/api/v1/services/x/chat/completions",
        "/api/v1/tasks/..",
        "/api/v1/tasks/%2e%2e/cancel",
        "/api/v1/tasks/../files/cancel",
        "/api/v1/tasks/abc/../../files",
    ] {
        let (status, head, body) = raw(env.addr, &raw_post(path, ALICE, body.as_bytes())).await;
        assert!(
            status == 404 || status == 400 || status == 405,
            "{path}: {status}"
        );
        let a = answer(status, head, body);
        let v = a.json();
        assert!(v["code"].is_string(), "{path}: {v}");
    }
    for path in [
        "/compatible-mode/v1/../v1/chat/completions",
        "/compatible-mode/v1/chat/completions/",
        "/compatible-mode/v1/chat%2fcompletions",
    ] {
        let (status, head, body) = raw(
            env.addr,
            &raw_post(path, ALICE, chat("qwen-plus", false).as_bytes()),
        )
        .await;
        assert_compat(&answer(status, head, body), 404, "not_found");
    }
    assert_eq!(env.mock.stats().requests, 0, "nothing left");
    // The plain paths still go.
    let (status, _, _) = raw(env.addr, &raw_post(NATIVE, ALICE, body.as_bytes())).await;
    assert_eq!(status, 200);
    let (status, _, _) = raw(
        env.addr,
        &raw_post(CHAT, ALICE, chat("qwen-plus", false).as_bytes()),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(env.mock.stats().requests, 2);
}

/// Issue 12, item 5: 405s had empty bodies and were not counted.
#[tokio::test]
async fn wrong_methods_get_405_in_shape_and_are_counted() {
    let env = start(mock(), "").await;
    let a = env.get(CHAT, Some(ALICE)).await;
    assert_compat(&a, 405, "method_not_allowed");
    assert_eq!(a.header("allow"), "POST");
    let a = env.post("/api/v1/tasks", Some(ALICE), "").await;
    assert_native(&a, 405, "InvalidURL");
    assert_eq!(a.header("allow"), "GET, HEAD");
    let a = env.get(NATIVE, None).await;
    assert_native(&a, 405, "InvalidURL");
    let a = env.post("/healthz", None, "").await;
    assert_native(&a, 405, "InvalidURL");
    assert_eq!(env.mock.stats().requests, 0);
    let text = env.gateway.render_metrics();
    for needle in [
        r#"gateway_requests_total{route="compatible_chat",status="405",key="none"} 1"#,
        r#"gateway_requests_total{route="task",status="405",key="none"} 1"#,
        r#"gateway_requests_total{route="native_generation",status="405",key="none"} 1"#,
        r#"gateway_refusals_total{key="none",reason="method_not_allowed"} 4"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

/// Issue 12, item 5: hyper answered heads it could not parse (too large,
/// malformed) with a bare status, an empty body, and no count. They are
/// now answered in DashScope's shape and counted.
#[tokio::test]
async fn heads_that_cannot_be_parsed_get_answers_in_shape_and_are_counted() {
    let env = start(mock(), "").await;
    let big = "v".repeat(40_000);
    for (path, compatible) in [(NATIVE, false), (CHAT, true)] {
        let req = format!("POST {path} HTTP/1.1\r\nhost: gw\r\nx-big: {big}\r\n\r\n");
        let (status, head, body) = raw(env.addr, req.as_bytes()).await;
        let a = answer(status, head, body);
        if compatible {
            assert_compat(&a, 431, "request_headers_too_large");
        } else {
            assert_native(&a, 431, "InvalidParameter");
        }
    }
    for garbage in [
        "GARBAGE\r\n\r\n",
        "POST /api/v1/tasks HTTP/1.1\r\nbad header\r\n\r\n",
        "POST /api/v1/tasks HTTP/9.9\r\nhost: gw\r\n\r\n",
    ] {
        let (status, head, body) = raw(env.addr, garbage.as_bytes()).await;
        assert_native(&answer(status, head, body), 400, "InvalidParameter");
    }
    // After a good exchange on the same connection, too.
    let (status, head, body) = raw(
        env.addr,
        b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\nGARBAGE\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let second = text.split_once("HTTP/1.1 ").expect("a second answer").1;
    assert!(second.starts_with("400 "), "{head}\n{text}");
    assert!(second.contains(r#""code":"InvalidParameter""#), "{second}");
    let metrics = env.gateway.render_metrics();
    for needle in [
        r#"gateway_requests_total{route="unknown",status="431",key="none"} 2"#,
        r#"gateway_requests_total{route="unknown",status="400",key="none"} 4"#,
        r#"gateway_refusals_total{key="none",reason="headers_too_large"} 2"#,
        r#"gateway_refusals_total{key="none",reason="malformed_request"} 4"#,
    ] {
        assert!(metrics.contains(needle), "missing {needle} in:\n{metrics}");
    }
    assert_eq!(env.mock.stats().requests, 0);
}

/// Issue 12, item 6: failed authentications were never throttled (5,000
/// wrong keys at 2,600/s). A client address gets a bounded number per
/// minute, then 429 whatever key it sends; the addresses tracked are
/// bounded.
#[tokio::test(start_paused = true)]
async fn failed_authentications_are_limited_per_address() {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    use tower::ServiceExt;

    let m = mock().start().await.unwrap();
    let text = config(&m, "").replace(
        "[degrade]",
        "[server]\nmax_auth_failures_per_minute = 3\n[degrade]",
    );
    let cfg = GatewayConfig::from_toml_with_env(&text, |_| None).unwrap();
    let gateway = Gateway::new(cfg);
    let app = gateway.router();
    let call = |ip: IpAddr, path: &'static str, key: &str, body: String| {
        let mut req = Request::post(path)
            .header("authorization", format!("Bearer {key}"))
            .body(axum::body::Body::from(body))
            .unwrap();
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(SocketAddr::new(ip, 40000)));
        let app = app.clone();
        async move {
            let res = app.oneshot(req).await.unwrap();
            let (status, headers) = (res.status(), res.headers().clone());
            let body = res.into_body().collect().await.unwrap().to_bytes();
            Answer {
                status,
                headers,
                body,
            }
        }
    };
    let a_ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
    let b_ip = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 8));
    for i in 0..3 {
        let a = call(
            a_ip,
            CHAT,
            &format!("gw-guess-{i}"),
            chat("qwen-plus", false),
        )
        .await;
        assert_compat(&a, 401, "invalid_api_key");
    }
    // Over the allowance: 429 in shape, even with a good key.
    let a = call(a_ip, CHAT, ALICE, chat("qwen-plus", false)).await;
    assert_compat(&a, 429, "limit_requests");
    assert_eq!(a.header("retry-after"), "20");
    let a = call(a_ip, NATIVE, ALICE, native("qwen-plus")).await;
    assert_native(&a, 429, "Throttling");
    // Another address is not affected.
    assert_eq!(
        call(b_ip, CHAT, ALICE, chat("qwen-plus", false))
            .await
            .status,
        200
    );
    // One failure is forgiven every 20 s.
    advance(Duration::from_secs(20)).await;
    assert_eq!(
        call(a_ip, CHAT, ALICE, chat("qwen-plus", false))
            .await
            .status,
        200
    );
    assert_eq!(
        call(a_ip, CHAT, "gw-guess-x", String::new()).await.status,
        401
    );
    assert_eq!(call(a_ip, CHAT, ALICE, String::new()).await.status, 429);
    // IPv6 addresses count per /64.
    let v6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
    for i in 0..3 {
        assert_eq!(
            call(v6(i), CHAT, "gw-guess", String::new()).await.status,
            401
        );
    }
    assert_eq!(call(v6(99), CHAT, ALICE, String::new()).await.status, 429);
    // A flood from many addresses: the addresses tracked stay bounded, and
    // once the table (4,096) is full of addresses still counted, the new
    // ones share one allowance of 3: 4,094 + 3 guesses get an answer, the
    // rest 429 (issue 13: the auth limiter is the crate's keyed limiter).
    let mut guesses = 0;
    for i in 0..4_200u32 {
        let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        let status = call(ip, CHAT, "gw-guess", String::new()).await.status;
        guesses += usize::from(status == 401);
    }
    assert_eq!(guesses, 4_094 + 3);
    // Tracked addresses were not pushed out by the flood; a fresh address
    // is refused while the shared allowance is spent, even with a good key
    // (the limit fails closed).
    assert_eq!(call(a_ip, CHAT, ALICE, String::new()).await.status, 429);
    let fresh = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1));
    assert_eq!(call(fresh, CHAT, ALICE, String::new()).await.status, 429);
    let metrics = gateway.render_metrics();
    let tracked: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("gateway_auth_failure_peers "))
        .expect("the gauge")
        .parse()
        .unwrap();
    assert!(tracked <= 4096.0, "{tracked}");
    assert!(
        metrics.contains(r#"gateway_refusals_total{key="none",reason="auth_failures"} 109"#),
        "{metrics}"
    );
    assert_eq!(m.stats().requests, 2, "only the two good calls left");
}

// ---------------------------------------------------------------------------
// Connections

/// A connection of its own (hyper's low-level client), so that tests
/// control which requests share one.
async fn connection(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// Whether the server closed the connection (within a bounded wait).
async fn closed(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> bool {
    for _ in 0..100 {
        if sender.is_closed() || sender.ready().await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

async fn healthz_on(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> u16 {
    sender.ready().await.expect("the connection is open");
    let req = Request::get("/healthz")
        .header("host", "gw")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = sender.send_request(req).await.unwrap();
    let status = res.status().as_u16();
    res.into_body().collect().await.unwrap();
    status
}

/// Issue 12, item 3: with no cap, the fd limit stopped service. With
/// `max_connections`, a new connection at the cap closes the connection
/// idle longest; with none idle, it waits for a slot.
#[tokio::test(start_paused = true)]
async fn the_connection_cap_closes_idle_connections_first() {
    let latency = Latency::none().per_token(Dist::fixed(Duration::from_millis(100)));
    let m = mock()
        .faults(FaultPlan::new().latency(latency))
        .start()
        .await
        .unwrap();
    let text = config(&m, "").replace("[degrade]", "[server]\nmax_connections = 4\n[degrade]");
    let env = start_with(m, &text).await;
    let mut conns = Vec::new();
    for _ in 0..4 {
        let mut c = connection(env.addr).await;
        assert_eq!(healthz_on(&mut c).await, 200);
        conns.push(c);
        advance(Duration::from_millis(10)).await;
    }
    // A fifth connection is served at once; the first (idle longest) is
    // closed (not left to the 30 s header read timeout).
    let t0 = Instant::now();
    let mut fifth = connection(env.addr).await;
    assert_eq!(healthz_on(&mut fifth).await, 200);
    assert_eq!(Instant::now() - t0, Duration::ZERO);
    assert!(
        closed(&mut conns[0]).await,
        "the idle-longest connection was closed"
    );
    for c in &mut conns[1..] {
        assert_eq!(healthz_on(c).await, 200, "the others stay open");
    }
    let metrics = env.gateway.render_metrics();
    assert!(
        metrics.contains("gateway_idle_connections_closed_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_connections_open 4"), "{metrics}");
    drop(conns);
    drop(fifth);
    tokio::task::yield_now().await;

    // Four connections each streaming (1.9 s): none is idle, so a fifth
    // waits for the first stream to end, then is served.
    let mut streams = Vec::new();
    for _ in 0..4 {
        let mut c = connection(env.addr).await;
        c.ready().await.unwrap();
        let req = env.request(CHAT, Some(BOB), &[], &chat("qwen-plus", true));
        let (parts, body) = req.into_parts();
        let mut req = Request::from_parts(parts, body);
        *req.uri_mut() = CHAT.parse().unwrap();
        req.headers_mut().insert("host", "gw".parse().unwrap());
        let res = c.send_request(req).await.unwrap();
        assert_eq!(res.status(), 200);
        streams.push(tokio::spawn(async move {
            let _keep = c;
            res.into_body().collect().await.unwrap();
            Instant::now()
        }));
    }
    let t0 = Instant::now();
    let mut fifth = connection(env.addr).await;
    assert_eq!(healthz_on(&mut fifth).await, 200);
    let served = Instant::now();
    let mut ends = Vec::new();
    for s in streams {
        ends.push(s.await.unwrap());
    }
    let first_end = ends.iter().min().unwrap();
    assert!(served >= *first_end, "served before a slot was free");
    assert!(
        served - t0 >= Duration::from_millis(1900),
        "{:?}",
        served - t0
    );
}

/// Issue 12, item 3: out of file descriptors, the accept loop logged a
/// line per attempt (~100 a second) and freed nothing, so service stopped
/// until idle connections timed out. Now an episode logs one warning, the
/// connections idle longest are closed to make room, and service resumes.
/// The test runs itself again in a child process with `ulimit -n 64`.
#[test]
fn out_of_file_descriptors_backs_off_with_one_warning_and_recovers() {
    const CHILD: &str = "TOWER_QWEN_GATEWAY_FD_CHILD";
    if std::env::var_os(CHILD).is_some() {
        return fd_child();
    }
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#"ulimit -n 64 && exec "$0" --exact out_of_file_descriptors_backs_off_with_one_warning_and_recovers --nocapture --test-threads=1"#)
        .arg(&exe)
        .env(CHILD, "1")
        .output()
        .expect("sh runs");
    assert!(
        out.status.success(),
        "the child failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("1 passed"),
        "the child ran the test"
    );
}

fn fd_child() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        let logs = Logs::default();
        let _guard = logs.capture();
        let text = format!(
            r#"
            [server]
            max_connections = 1000
            [upstream]
            base_url = "http://127.0.0.1:9"
            [[accounts]]
            name = "main"
            api_key = "{UPSTREAM}"
            [[keys]]
            name = "alice"
            key = "{ALICE}"
            "#
        );
        let gateway = Gateway::new(GatewayConfig::from_toml_with_env(&text, |_| None).unwrap());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(gateway.clone().serve(listener, std::future::pending()));
        let warned = || logs.text().contains("accepting connections fails");
        // Connect until this process (client and server sides both) is out
        // of descriptors and the server's accept has failed.
        let mut clients = Vec::new();
        while !warned() {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(s) => clients.push(s),
                Err(_) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
            assert!(clients.len() < 64, "the descriptor limit did not apply");
            tokio::task::yield_now().await;
        }
        // Let the episode run its course (the clock is paused: back-off
        // sleeps pass at once).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let text = logs.text();
        let warnings = text
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("accepting connections fails"))
            .count();
        assert_eq!(warnings, 1, "{text}");
        let metrics = gateway.render_metrics();
        let closed: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("gateway_idle_connections_closed_total "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(closed >= 1.0, "{metrics}");
        // Service goes on: a new connection is served.
        drop(clients);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut c = connection(addr).await;
        assert_eq!(healthz_on(&mut c).await, 200);
        assert!(
            logs.text().contains("accepting connections again"),
            "{}",
            logs.text()
        );
    });
}

/// Issue 12, item 7: a connection that had sent half a head held graceful
/// shutdown until the header read timeout (~30 s). Connections that owe
/// nothing (idle, or mid-head) are now closed at once.
#[tokio::test(start_paused = true)]
async fn shutdown_closes_connections_that_have_not_sent_a_full_head() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut env = start(mock(), "").await;
    let mut half = tokio::net::TcpStream::connect(env.addr).await.unwrap();
    half.write_all(b"POST /compatible-mode/v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthor")
        .await
        .unwrap();
    let mut idle = connection(env.addr).await;
    assert_eq!(healthz_on(&mut idle).await, 200);
    tokio::task::yield_now().await;
    let t0 = Instant::now();
    env.shutdown().await;
    assert_eq!(Instant::now() - t0, Duration::ZERO, "shutdown waited");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(1), half.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0, "no answer to half a head, just the close");
    assert!(closed(&mut idle).await);
}

// ---------------------------------------------------------------------------
// Degradation

#[tokio::test(start_paused = true)]
async fn a_key_degrades_after_three_upstream_failures_and_recovers_through_probes() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let env = start(
        mock().faults(FaultPlan::new().with(Fault::Error(ApiError::service_unavailable()), 1.0)),
        "capacity = 100",
    )
    .await;
    for _ in 0..3 {
        let a = env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
        assert_eq!(a.status, 503, "upstream answers pass through");
    }
    assert_eq!(env.gateway.is_degraded("alice"), Some(true));
    assert_eq!(env.gateway.is_degraded("bob"), Some(false));
    let text = logs.text();
    let line = text
        .lines()
        .find(|l| l.contains("gateway key degraded"))
        .unwrap_or_else(|| panic!("no degrade warning in:\n{text}"));
    assert!(line.contains("WARN"), "{line}");
    let id = &key_sha256(ALICE)[..8];
    assert!(
        line.contains(id),
        "the warning names the key by its redacted id: {line}"
    );

    // Degraded: 5 per second. A burst of 10 at one instant: one call goes
    // (and fails upstream), nine are refused with 429 at once.
    let before = env.mock.stats().requests;
    let body = chat("qwen-plus", false);
    let answers = join_all((0..10).map(|_| env.post(CHAT, Some(ALICE), &body))).await;
    assert_eq!(count(&answers, 503), 1);
    assert_eq!(count(&answers, 429), 9);
    let refused = answers.iter().find(|a| a.status == 429).unwrap();
    assert_compat(refused, 429, "limit_requests");
    assert_eq!(refused.header("retry-after"), "1");
    assert_eq!(refused.header("x-ratelimit-limit"), "5");
    assert_eq!(env.mock.stats().requests, before + 1);
    // Over a second, five get through.
    let mut passed = 0;
    for _ in 0..10 {
        advance(Duration::from_millis(100)).await;
        let a = env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
        passed += usize::from(a.status != 429);
    }
    assert_eq!(passed, 5);
    // Bob is not affected by Alice's state.
    assert_eq!(
        env.post(CHAT, Some(BOB), &chat("qwen-plus", false))
            .await
            .status,
        503
    );
    assert_eq!(env.gateway.is_degraded("bob"), Some(false));

    // The upstream heals; after the probe delay (5 s, doubled by each
    // failed probe, at most 60 s) a probe succeeds and the key recovers.
    env.mock.set_faults(FaultPlan::new());
    let mut recovered = false;
    for _ in 0..130 {
        advance(Duration::from_millis(500)).await;
        let a = env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
        if a.status == 200 && env.gateway.is_degraded("alice") == Some(false) {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "the key recovered through a probe");
    let body = chat("qwen-plus", false);
    let answers = join_all((0..10).map(|_| env.post(CHAT, Some(ALICE), &body))).await;
    assert_eq!(count(&answers, 200), 10);
    assert!(logs.text().contains("gateway key recovered"));
}

// ---------------------------------------------------------------------------
// Streaming and cancellation

#[tokio::test(start_paused = true)]
async fn a_stream_arrives_intact_and_frame_by_frame() {
    let latency = Latency::none().per_token(Dist::fixed(Duration::from_millis(100)));
    let env = start(mock().faults(FaultPlan::new().latency(latency)), "").await;

    // The same completion directly from the mock, for comparison.
    let direct = env
        .client
        .request(
            Request::post(format!("{}{CHAT}", env.mock.base_url()))
                .header("authorization", format!("Bearer {UPSTREAM}"))
                .body(Full::new(Bytes::from(chat("qwen-plus", true))))
                .unwrap(),
        )
        .await
        .unwrap();
    let direct = frames(direct).await;
    let direct_wire: Vec<u8> = direct.iter().flat_map(|(_, b)| b.to_vec()).collect();

    let t0 = Instant::now();
    let res = env
        .open(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", true)))
        .await;
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let via = frames(res).await;
    let wire: Vec<u8> = via.iter().flat_map(|(_, b)| b.to_vec()).collect();
    let (deltas, finish, done) = compat_deltas(&wire);
    assert_eq!(
        (deltas.len(), finish.as_deref(), done),
        (20, Some("stop"), true)
    );
    assert_eq!(compat_deltas(&direct_wire), (deltas, finish, done));
    assert_eq!(wire.len(), direct_wire.len(), "same bytes, ids aside");

    // Incremental: the first frame arrived at once, the last 19 token
    // delays later; frames arrived at many distinct instants.
    let first = via.first().unwrap().0;
    let last = via.last().unwrap().0;
    assert_eq!(first, t0, "the first frame is not held back");
    assert_eq!(last - first, Duration::from_millis(1900));
    let mut instants: Vec<Instant> = via.iter().map(|(t, _)| *t).collect();
    instants.dedup();
    assert!(
        instants.len() >= 20,
        "{} distinct arrival instants",
        instants.len()
    );

    // The native dialect streams too.
    let res = env
        .open(env.request(
            NATIVE,
            Some(ALICE),
            &[("x-dashscope-sse", "enable")],
            &native("qwen-plus"),
        ))
        .await;
    assert_eq!(res.status(), 200);
    let via = frames(res).await;
    let wire = String::from_utf8(via.iter().flat_map(|(_, b)| b.to_vec()).collect()).unwrap();
    assert_eq!(wire.matches("event:result").count(), 20);
    assert!(via.len() >= 20);
}

#[tokio::test(start_paused = true)]
async fn a_client_that_goes_away_cancels_the_upstream_request() {
    let latency = Latency::none().per_token(Dist::fixed(Duration::from_millis(100)));
    let env = start(
        mock()
            .output_tokens(std::num::NonZeroU32::new(1000).unwrap())
            .faults(FaultPlan::new().latency(latency)),
        "",
    )
    .await;
    let res = env
        .open(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", true)))
        .await;
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    let s = env.mock.stats();
    assert_eq!(
        (s.in_flight, s.streams_started, s.streams_cancelled),
        (1, 1, 0)
    );
    // The client hangs up mid-stream.
    drop(body);
    let mut cancelled = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let s = env.mock.stats();
        if s.streams_cancelled == 1 && s.in_flight == 0 {
            cancelled = true;
            break;
        }
    }
    let s = env.mock.stats();
    assert!(cancelled, "upstream still streaming: {s:?}");
    assert_eq!(s.streams_completed, 0);
    let metrics = env.get("/metrics", None).await;
    let text = String::from_utf8_lossy(&metrics.body);
    assert!(text.contains("gateway_streams_cancelled_total 1"), "{text}");
}

// ---------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn an_oversized_body_gets_413_and_never_reaches_the_upstream() {
    let m = mock().start().await.unwrap();
    let text = config(&m, "").replace("[degrade]", "[server]\nmax_body_bytes = 1024\n[degrade]");
    let env = start_with(m, &text).await;
    let big = format!(
        r#"{{"model":"qwen-plus","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let a = env.post(CHAT, Some(ALICE), &big).await;
    assert_compat(&a, 413, "request_too_large");
    let a = env.post(NATIVE, Some(ALICE), &big).await;
    assert_native(&a, 413, "InvalidParameter");
    // Without a content-length (chunked), the cap applies while reading.
    let chunks = futures_util::stream::iter((0..4).map(|_| {
        Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(vec![b' '; 400])))
    }));
    let client = Client::builder(TokioExecutor::new()).build_http::<StreamBody<_>>();
    let req = Request::post(format!("http://{}{CHAT}", env.addr))
        .header("authorization", format!("Bearer {ALICE}"))
        .body(StreamBody::new(chunks))
        .unwrap();
    let res = client.request(req).await.unwrap();
    assert_eq!(res.status(), 413);
    // Just under the cap passes.
    let ok = format!(
        r#"{{"model":"qwen-plus","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(900)
    );
    assert_eq!(env.post(CHAT, Some(ALICE), &ok).await.status, 200);
    assert_eq!(env.mock.stats().requests, 1);
}

/// Found by the `gateway_router` fuzz target: a request with many header
/// fields but few bytes was forwarded, and the upstream (hyper, as most
/// servers, takes at most 100 fields) answered a bare 431 that reached the
/// client out of DashScope's shape. The gateway now refuses more than 96
/// fields itself, in shape, before anything leaves.
#[tokio::test]
async fn too_many_header_fields_get_431_in_shape_before_anything_leaves() {
    let env = start(mock(), "").await;
    let names: Vec<String> = (0..97).map(|i| format!("x-h{i}")).collect();
    let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "v")).collect();
    // The client's request has 97 + its own fields: over the cap.
    let a = env
        .send(env.request(CHAT, Some(ALICE), &many, &chat("qwen-plus", false)))
        .await;
    assert_compat(&a, 431, "request_headers_too_large");
    assert_eq!(env.mock.stats().requests, 0);
    // 90 extra fields are forwarded, and the upstream takes them.
    let a = env
        .send(env.request(CHAT, Some(ALICE), &many[..90], &chat("qwen-plus", false)))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(env.mock.stats().requests, 1);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let env = start(mock(), "").await;
    let big = "v".repeat(20_000);
    let a = env
        .send(env.request(
            CHAT,
            Some(ALICE),
            &[("x-big", big.as_str())],
            &chat("qwen-plus", false),
        ))
        .await;
    assert_eq!(a.status, 431);
    let mid = "v".repeat(12_000); // above hyper's 8 KiB floor, below the 16 KiB cap
    let a = env
        .send(env.request(
            CHAT,
            Some(ALICE),
            &[("x-mid", mid.as_str())],
            &chat("qwen-plus", false),
        ))
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(env.mock.stats().requests, 1);
}

#[tokio::test(start_paused = true)]
async fn upstream_timeouts_answer_504_and_cut_stalled_streams() {
    let m = mock()
        .faults(FaultPlan::new().with(
            Fault::Stall {
                after_tokens: 2,
                duration: None,
            },
            1.0,
        ))
        .start()
        .await
        .unwrap();
    // The timeouts come from the environment here.
    let text = config(&m, "");
    let cfg = GatewayConfig::from_toml_with_env(&text, |n| match n {
        "QWEN_GATEWAY_UPSTREAM_HEADER_TIMEOUT" => Some("2s".into()),
        "QWEN_GATEWAY_UPSTREAM_IDLE_TIMEOUT" => Some("3s".into()),
        _ => None,
    })
    .unwrap();
    let gateway = Gateway::new(cfg);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gateway.clone().serve(listener, std::future::pending()));
    let env = Env {
        mock: m,
        gateway,
        addr,
        client: Client::builder(TokioExecutor::new()).build_http(),
        stop: None,
        server: None,
    };
    // A non-stream call whose headers never come: 504 after 2 s.
    let t0 = Instant::now();
    let a = env.post(NATIVE, Some(ALICE), &native("qwen-plus")).await;
    assert_native(&a, 504, "RequestTimeOut");
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    // A stream that stalls after two tokens is cut after 3 s of silence,
    // and (issue 12, item 4) ends with an error event in its dialect, so
    // the cut stream is not passed off as complete.
    let t0 = Instant::now();
    let wire = env.stream_wire(CHAT, &[], &chat("qwen-plus", true)).await;
    assert_eq!(Instant::now() - t0, Duration::from_secs(3));
    let (deltas, finish, done) =
        compat_deltas(wire.split("data: {\"error\"").next().unwrap().as_bytes());
    assert_eq!((deltas.len(), finish, done), (2, None, false), "{wire}");
    let last = assert_compat_error_event(&wire, "timeout");
    assert_eq!(last["error"]["type"], "server_error");
    let wire = env.native_stream_wire().await;
    assert_eq!(wire.matches("event:result").count(), 2, "{wire}");
    assert_native_error_event(&wire, 504, "RequestTimeOut");
}

/// Asserts that an SSE answer ends with a compatible error event of
/// `code` (after a whole event), that the crate's classifier reads as
/// transient; returns the error object.
fn assert_compat_error_event(wire: &str, code: &str) -> Value {
    assert!(wire.ends_with("\n\n"), "{wire:?}");
    let last = wire.trim_end().rsplit("\n\n").next().unwrap();
    let v: Value = serde_json::from_str(last.strip_prefix("data: ").expect("a data line")).unwrap();
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["request_id"].as_str().unwrap().starts_with("gw-"));
    assert!(!wire.contains("[DONE]"));
    assert_transient(wire);
    v
}

/// Asserts that a native SSE answer ends with `event:error`,
/// `:HTTP_STATUS/<status>` and a `code`.
fn assert_native_error_event(wire: &str, status: u16, code: &str) {
    let last = wire.trim_end().rsplit("\n\n").next().unwrap();
    let lines: Vec<&str> = last.lines().collect();
    assert_eq!(lines[0], "event:error", "{wire:?}");
    assert_eq!(lines[1], format!(":HTTP_STATUS/{status}"));
    let v: Value = serde_json::from_str(lines[2].strip_prefix("data:").unwrap()).unwrap();
    assert_eq!(v["code"], code, "{v}");
    assert_transient(wire);
}

fn assert_transient(wire: &str) {
    let mut h = HeaderMap::new();
    h.insert("content-type", "text/event-stream".parse().unwrap());
    let outcome =
        tower_qwen::classify::Classifier::new().classify(StatusCode::OK, &h, wire.as_bytes());
    assert!(outcome.is_transient(), "{outcome:?} for {wire}");
}

/// Issue 12, item 4: a stream the upstream resets was only cut; it now
/// ends with an error event in its dialect, and every upstream failure
/// (5xx answers included) logs a `warn`.
#[tokio::test(start_paused = true)]
async fn upstream_failures_end_streams_in_their_dialect_and_log_warnings() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let env = start(
        mock().faults(FaultPlan::new().with(Fault::ResetMidBody { after_tokens: 3 }, 1.0)),
        "",
    )
    .await;
    let wire = env.stream_wire(CHAT, &[], &chat("qwen-plus", true)).await;
    let (deltas, _, _) = compat_deltas(wire.split("data: {\"error\"").next().unwrap().as_bytes());
    assert_eq!(deltas.len(), 3, "{wire}");
    assert_compat_error_event(&wire, "upstream_error");
    let wire = env.native_stream_wire().await;
    assert_native_error_event(&wire, 502, "InternalError");
    // A 5xx answer passes through, with a warning.
    env.mock
        .set_faults(FaultPlan::new().with(Fault::Error(ApiError::internal_error()), 1.0));
    assert_eq!(env.alice_chat("qwen-plus").await, 500);
    let text = logs.text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("upstream call failed"))
        .collect();
    assert_eq!(warnings.len(), 3, "{text}");
    assert!(warnings.iter().all(|l| l.contains(&key_sha256(ALICE)[..8])));
    assert!(warnings[2].contains("status=500"), "{}", warnings[2]);
}

// ---------------------------------------------------------------------------
// Tasks, operations, shutdown, config, logs

#[tokio::test]
async fn async_tasks_are_submitted_and_polled_through_the_gateway() {
    let env = start(mock(), "").await;
    let a = env
        .send(env.request(
            IMAGE,
            Some(ALICE),
            &[("x-dashscope-async", "enable")],
            r#"{"model":"wanx-v1","input":{"prompt":"a cat"}}"#,
        ))
        .await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let id = a.json()["output"]["task_id"].as_str().unwrap().to_owned();
    let a = env.get(&format!("/api/v1/tasks/{id}"), Some(ALICE)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(a.json()["output"]["task_id"], id.as_str());
    let a = env.get(&format!("/api/v1/tasks/{id}"), None).await;
    assert_native(&a, 401, "InvalidApiKey");
}

#[tokio::test]
async fn healthz_and_metrics() {
    // A slow refill: the test runs on the real clock.
    let env = start(mock(), "capacity = 2\nrefill_per_second = 0.01").await;
    let h = env.get("/healthz", None).await;
    assert_eq!(
        (h.status.as_u16(), &h.body[..]),
        (200, &br#"{"status":"ok"}"#[..])
    );
    for _ in 0..3 {
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
    }
    env.post(CHAT, Some("gw-wrong-key-1"), &chat("qwen-plus", false))
        .await;
    let m = env.get("/metrics", None).await;
    assert_eq!(m.status, 200);
    let text = String::from_utf8(m.body.to_vec()).unwrap();
    for needle in [
        r#"gateway_requests_total{route="compatible_chat",status="200",key="alice"} 2"#,
        r#"gateway_requests_total{route="compatible_chat",status="429",key="alice"} 1"#,
        r#"gateway_requests_total{route="compatible_chat",status="401",key="none"} 1"#,
        r#"gateway_rate_limited_total{key="alice",reason="key_bucket"} 1"#,
        r#"gateway_refusals_total{key="none",reason="unauthorized"} 1"#,
        r#"gateway_upstream_latency_seconds_count{route="compatible_chat"} 2"#,
        r#"gateway_key_bucket_remaining{key="alice"} 0"#,
        r#"gateway_key_bucket_remaining{key="bob"} 50"#,
        r#"gateway_key_degraded{key="alice"} 0"#,
        "gateway_degraded_keys 0",
        "gateway_requests_in_flight 0",
        "gateway_streams_cancelled_total 0",
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
    assert!(!text.contains(ALICE));
}

#[tokio::test(start_paused = true)]
async fn graceful_shutdown_finishes_streams_up_to_the_deadline() {
    let latency = Latency::none().per_token(Dist::fixed(Duration::from_millis(100)));
    let m = mock()
        .output_tokens(std::num::NonZeroU32::new(30).unwrap())
        .faults(FaultPlan::new().latency(latency))
        .start()
        .await
        .unwrap();
    let text = config(&m, "").replace("[degrade]", "[server]\nshutdown_grace = \"2s\"\n[degrade]");
    let mut env = start_with(m, &text).await;
    // A stream of 30 tokens (2.9 s) and one of 10 tokens (0.9 s).
    let long = env
        .open(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", true)))
        .await;
    let short_body = r#"{"model":"qwen-plus","stream":true,"max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    let short = env
        .open(env.request(CHAT, Some(BOB), &[], short_body))
        .await;
    let (long_tx, long_rx) = oneshot::channel();
    tokio::spawn(async move {
        let mut body = long.into_body();
        let mut failed = false;
        let mut n = 0;
        while let Some(f) = body.frame().await {
            match f {
                Ok(_) => n += 1,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let _ = long_tx.send((n, failed));
    });
    let t0 = Instant::now();
    let stop = env.stop.take().unwrap();
    stop.send(()).unwrap();
    // The short stream finishes in full during the grace period.
    let wire: Vec<u8> = frames(short)
        .await
        .iter()
        .flat_map(|(_, b)| b.to_vec())
        .collect();
    let (deltas, finish, done) = compat_deltas(&wire);
    assert_eq!(
        (deltas.len(), finish.as_deref(), done),
        (10, Some("length"), true)
    );
    // New connections are refused once the gateway stopped accepting.
    tokio::task::yield_now().await;
    let fresh = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    assert!(
        fresh
            .request(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", false)))
            .await
            .is_err()
    );
    // The long one is cut at the deadline, not completed.
    env.server.take().unwrap().await.unwrap().unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
    let (n, failed) = long_rx.await.unwrap();
    assert!(n > 1 && n < 30, "{n} frames");
    assert!(failed, "the cut stream ends with an error, not a clean end");
    env.shutdown().await;
}

#[test]
fn a_bad_config_names_every_bad_field() {
    let text = r#"
        [server]
        listen = "nowhere"
        max_body_bytes = -1
        [upstream]
        base_url = "ftp://x"
        idle_timeout = "soon"
        [limits]
        capacity = 0
        refill_per_second = "fast"
        [degrade]
        consecutive_failures = 0
        probe_after = "10s"
        probe_after_max = "5s"
        [[accounts]]
        name = "main"
        api_key_env = "NOT_SET_ANYWHERE"
        quotas = "lots"
        [accounts.models.qwen-plus]
        rpm = 0
        [[keys]]
        key = "short"
        accounts = ["main", "nope"]
        [[keys]]
        sha256 = "abc"
        colour = "blue"
        [[keys]]
        key = "gw-secret-key-42"
        [[keys]]
        key = "gw-secret-key-42"
        [extra]
    "#;
    let err = GatewayConfig::from_toml_with_env(text, |_| None).unwrap_err();
    let fields: Vec<&str> = err.fields().collect();
    for f in [
        "server.listen",
        "server.max_body_bytes",
        "upstream.base_url",
        "upstream.idle_timeout",
        "limits.capacity",
        "limits.refill_per_second",
        "degrade.consecutive_failures",
        "degrade.probe_after_max",
        "accounts[0].api_key_env",
        "accounts[0].quotas",
        "accounts[0].models.qwen-plus.rpm",
        "keys[0].key",
        "keys[0].accounts[1]",
        "keys[1].sha256",
        "keys[1].colour",
        "keys[3]",
        "extra",
    ] {
        assert!(fields.contains(&f), "{f} not named in:\n{err}");
    }
    let shown = err.to_string();
    assert!(
        shown.starts_with("invalid gateway configuration"),
        "{shown}"
    );
    assert!(
        !shown.contains("gw-secret-key-42"),
        "no key in errors:\n{shown}"
    );
    assert!(shown.contains("unknown account \"nope\""), "{shown}");
    // A TOML syntax error names where.
    let err = GatewayConfig::from_toml_with_env("[server\nlisten=1", |_| None).unwrap_err();
    assert_eq!(err.fields().collect::<Vec<_>>(), ["toml"]);
    assert!(err.to_string().contains("line"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn no_key_material_in_logs() {
    let logs = Logs::default();
    let _guard = logs.capture();
    let env = start(
        mock().faults(FaultPlan::new().with(Fault::Error(ApiError::internal_error()), 0.5)),
        "capacity = 5",
    )
    .await;
    let wrong = "gw-wrong-key-9999";
    env.post(CHAT, Some(wrong), &chat("qwen-plus", false)).await;
    for _ in 0..12 {
        env.post(CHAT, Some(ALICE), &chat("qwen-plus", false)).await;
        env.post(NATIVE, Some(BOB), &native("qwen-plus")).await;
        advance(Duration::from_millis(300)).await;
    }
    let res = env
        .open(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", true)))
        .await;
    drop(res);
    let text = logs.text();
    assert!(text.lines().count() > 20, "logs were captured:\n{text}");
    assert!(
        text.contains(&key_sha256(ALICE)[..8]),
        "keys are named by id"
    );
    for secret in [ALICE, BOB, wrong, UPSTREAM, &key_sha256(ALICE)] {
        assert!(!text.contains(secret), "{secret} leaked into:\n{text}");
    }
}

/// `examples/gateway.toml` documents every field: it stays a valid
/// configuration, its `[redis]` section included once uncommented.
#[test]
fn the_example_config_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gateway.toml"
    ))
    .unwrap();
    let env = |name: &str| (name == "DASHSCOPE_API_KEY").then(|| "sk-example-key".to_owned());
    let c = GatewayConfig::from_toml_with_env(&text, env).unwrap();
    assert!(!c.has_redis());
    // Every commented default, uncommented, is accepted as written.
    let uncommented: String = text
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if (rest.starts_with('[') && rest.trim_end().ends_with(']'))
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        !k.contains(' ') && k != "base_url" && k != "sha256" && k != "key_env"
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let c = GatewayConfig::from_toml_with_env(&uncommented, env);
    if cfg!(feature = "redis") {
        assert!(c.unwrap().has_redis());
    } else {
        let e = c.unwrap_err();
        assert_eq!(e.fields().collect::<Vec<_>>(), ["redis"], "{e}");
    }
}
