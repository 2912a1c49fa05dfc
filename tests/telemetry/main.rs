//! GenAiTraceLayer: the span's GenAI fields (tracing), and with `otel` the
//! OpenTelemetry spans and metrics in the SDK's in-memory exporters, and an
//! OTLP export to a local listener. Time is paused: durations are exact.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::{Layer, Service, ServiceBuilder, ServiceExt, service_fn};
use tower_qwen::telemetry::GenAiTraceLayer;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

#[cfg(feature = "otel")]
mod otel;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A body whose frames come after the given delays (paused time).
fn timed(frames: Vec<(u64, &'static str)>) -> Body {
    let stream = futures_util::stream::iter(frames).then(|(ms, s)| async move {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(s.as_bytes())))
    });
    StreamBody::new(stream).boxed_unsync()
}

fn full(s: &'static str) -> Body {
    Full::new(Bytes::from_static(s.as_bytes())).boxed_unsync()
}

/// An upstream that answers after `head_ms` with `content_type` and `body`.
fn upstream(
    head_ms: u64,
    content_type: &'static str,
    body: impl Fn() -> Body + Clone + Send + 'static,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Body>, Error = Infallible, Future: Send>
+ Clone {
    service_fn(move |_req: Request<Full<Bytes>>| {
        let body = body.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(head_ms)).await;
            Ok::<_, Infallible>(
                Response::builder()
                    .header("content-type", content_type)
                    .body(body())
                    .unwrap(),
            )
        }
    })
}

fn request(path: &str, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("https://dashscope-intl.aliyuncs.com{path}"))
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

const COMPAT_STREAM_REQ: &str = r#"{"model":"qwen-plus","stream":true,"stream_options":{"include_usage":true},"max_tokens":50,"messages":[{"role":"user","content":"Hi"}]}"#;

/// A compatible stream: role chunk at 2 s, content, finish, usage tail at 5 s.
fn compat_stream() -> Body {
    timed(vec![
        (
            0,
            "data: {\"choices\":[{\"delta\":{\"content\":\"\",\"role\":\"assistant\"},\"index\":0,\"finish_reason\":null}],\"model\":\"qwen-plus\",\"usage\":null}\n\n",
        ),
        (
            1000,
            "data: {\"choices\":[{\"delta\":{\"content\":\"Hello\"},\"index\":0,\"finish_reason\":null}],\"model\":\"qwen-plus\"}\n\n",
        ),
        (
            1000,
            "data: {\"choices\":[{\"delta\":{},\"index\":0,\"finish_reason\":\"stop\"}],\"model\":\"qwen-plus\"}\n\n",
        ),
        (
            1000,
            "data: {\"choices\":[],\"model\":\"qwen-plus\",\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":3,\"total_tokens\":14}}\n\ndata: [DONE]\n\n",
        ),
    ])
}

/// A closed span: its name and its fields as recorded.
type Closed = (String, BTreeMap<String, String>);

/// Every closed span, in order.
#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<Closed>>>);

struct Fields<'a>(&'a mut BTreeMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }
}

struct Open(BTreeMap<String, String>);

impl<S: tracing::Subscriber + for<'a> LookupSpan<'a>> tracing_subscriber::Layer<S> for Spans {
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut map = BTreeMap::new();
        attrs.record(&mut Fields(&mut map));
        ctx.span(id).unwrap().extensions_mut().insert(Open(map));
    }
    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        ctx: Context<'_, S>,
    ) {
        let span = ctx.span(id).unwrap();
        let mut ext = span.extensions_mut();
        values.record(&mut Fields(&mut ext.get_mut::<Open>().unwrap().0));
    }
    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        let span = ctx.span(&id).unwrap();
        let fields = span.extensions_mut().remove::<Open>().unwrap().0;
        self.0
            .lock()
            .unwrap()
            .push((span.name().to_owned(), fields));
    }
}

/// Records this thread's spans into `spans` until the guard is dropped.
///
/// A global subscriber that wants everything (and does nothing with it) is
/// set once first: tracing caches a callsite's interest from the first thread
/// that hits it, so a test without a subscriber running beside this one (the
/// otel tests) could otherwise switch the `gen_ai` span off for good.
fn capture(spans: &Spans) -> tracing::subscriber::DefaultGuard {
    static GLOBAL: std::sync::Once = std::sync::Once::new();
    GLOBAL.call_once(|| {
        let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    });
    tracing::subscriber::set_default(tracing_subscriber::registry().with(spans.clone()))
}

#[tokio::test(start_paused = true)]
async fn tracing_span_carries_the_genai_fields_until_the_stream_ends() {
    let spans = Spans::default();
    let _guard = capture(&spans);
    let svc = ServiceBuilder::new()
        .layer(GenAiTraceLayer::new())
        .service(upstream(1000, "text/event-stream", compat_stream));
    let res = svc
        .oneshot(request(
            "/compatible-mode/v1/chat/completions",
            COMPAT_STREAM_REQ,
        ))
        .await
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    // Headers and a first frame are in: the span is still open.
    assert!(spans.0.lock().unwrap().is_empty());
    while body.frame().await.is_some() {}
    let closed = spans.0.lock().unwrap().clone();
    assert_eq!(closed.len(), 1);
    let (name, f) = &closed[0];
    assert_eq!(name, "gen_ai");
    let get = |k: &str| f.get(k).map(String::as_str);
    assert_eq!(get("otel.name"), Some("chat qwen-plus"));
    assert_eq!(get("otel.kind"), Some("client"));
    assert_eq!(get("gen_ai.operation.name"), Some("chat"));
    assert_eq!(get("gen_ai.provider.name"), Some("dashscope"));
    assert_eq!(get("gen_ai.request.model"), Some("qwen-plus"));
    assert_eq!(get("gen_ai.request.max_tokens"), Some("50"));
    assert_eq!(get("server.address"), Some("dashscope-intl.aliyuncs.com"));
    assert_eq!(get("server.port"), Some("443"));
    assert_eq!(get("gen_ai.response.model"), Some("qwen-plus"));
    assert_eq!(get("gen_ai.response.finish_reasons"), Some("stop"));
    assert_eq!(get("gen_ai.usage.input_tokens"), Some("11"));
    assert_eq!(get("gen_ai.usage.output_tokens"), Some("3"));
    // Headers after 1 s, first frame at once: 1 s to the first chunk.
    assert_eq!(get("gen_ai.response.time_to_first_chunk"), Some("1.0"));
    assert_eq!(get("error.type"), None);
    assert_eq!(get("otel.status_code"), None);
}

#[tokio::test(start_paused = true)]
async fn errors_in_the_body_the_call_or_a_drop_set_error_type() {
    let spans = Spans::default();
    let _guard = capture(&spans);
    let last = |spans: &Spans| spans.0.lock().unwrap().last().unwrap().1.clone();

    // A native stream cut by an error frame (tokens throttled).
    let native = || {
        full(
            "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"a\"},\"finish_reason\":\"null\"}]},\"usage\":{\"input_tokens\":4,\"output_tokens\":1}}\n\n\
             id:2\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.AllocationQuota\",\"message\":\"Allocated quota exceeded\"}\n\n",
        )
    };
    let svc = GenAiTraceLayer::new().layer(upstream(0, "text/event-stream", native));
    let req = request(
        "/api/v1/services/aigc/text-generation/generation",
        r#"{"model":"qwen-turbo","input":{"messages":[{"role":"user","content":"x"}]},"parameters":{"incremental_output":true}}"#,
    );
    let mut req = req;
    req.headers_mut()
        .insert("x-dashscope-sse", "enable".parse().unwrap());
    let res = svc.oneshot(req).await.unwrap();
    res.into_body().collect().await.unwrap();
    let f = last(&spans);
    assert_eq!(
        f.get("error.type").map(String::as_str),
        Some("throttled.tokens")
    );
    assert_eq!(f.get("otel.status_code").map(String::as_str), Some("ERROR"));
    assert_eq!(
        f.get("gen_ai.usage.input_tokens").map(String::as_str),
        Some("4")
    );
    assert_eq!(f.get("gen_ai.response.model"), None); // native answers name no model

    // The inner service fails: the span ends at once, classified.
    let failing = service_fn(|_req: Request<Full<Bytes>>| async {
        Err::<Response<Body>, _>(std::io::Error::other("connection reset"))
    });
    let err = GenAiTraceLayer::new()
        .layer(failing)
        .oneshot(request(
            "/compatible-mode/v1/embeddings",
            r#"{"model":"text-embedding-v4","input":"hi"}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    let f = last(&spans);
    assert_eq!(
        f.get("gen_ai.operation.name").map(String::as_str),
        Some("embeddings")
    );
    assert_eq!(f.get("error.type").map(String::as_str), Some("transient"));

    // The caller drops a stream half-way.
    let n = spans.0.lock().unwrap().len();
    let svc = GenAiTraceLayer::new().layer(upstream(0, "text/event-stream", compat_stream));
    let res = svc
        .oneshot(request(
            "/compatible-mode/v1/chat/completions",
            COMPAT_STREAM_REQ,
        ))
        .await
        .unwrap();
    let mut body = res.into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(spans.0.lock().unwrap().len(), n);
    drop(body);
    let f = last(&spans);
    assert_eq!(f.get("error.type").map(String::as_str), Some("cancelled"));
    assert_eq!(f.get("gen_ai.usage.input_tokens"), None);
}

#[tokio::test(start_paused = true)]
async fn other_endpoints_pass_through_untraced() {
    let spans = Spans::default();
    let _guard = capture(&spans);
    let svc =
        GenAiTraceLayer::new().layer(upstream(0, "application/json", || full("{\"output\":{}}")));
    let res = svc
        .oneshot(
            Request::get("/api/v1/tasks/abc")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(
        &res.into_body().collect().await.unwrap().to_bytes()[..],
        b"{\"output\":{}}"
    );
    assert!(spans.0.lock().unwrap().is_empty());
}

/// The preset opts in: one span per logical call, outside retries, with
/// what the mock answered.
#[cfg(all(feature = "client", feature = "mock"))]
#[tokio::test]
async fn qwen_client_preset_traces_calls_against_the_mock() {
    use tower_qwen::client::{ChatRequest, QwenClient};
    use tower_qwen::mock::MockDashScope;

    let spans = Spans::default();
    let _guard = capture(&spans);
    let mock = MockDashScope::builder()
        .key("sk-t", "acct")
        .start()
        .await
        .unwrap();
    let client = QwenClient::builder()
        .base_url(mock.base_url().parse().unwrap())
        .api_key("sk-t")
        .unwrap()
        .telemetry(GenAiTraceLayer::new())
        .build()
        .unwrap();
    for stream in [false, true] {
        let req = ChatRequest::new("qwen-plus")
            .user("Hello")
            .max_tokens(3)
            .stream(stream)
            .into_request();
        let res = tokio::time::timeout(Duration::from_secs(30), client.clone().oneshot(req))
            .await
            .unwrap()
            .unwrap();
        res.into_body().collect().await.unwrap();
    }
    let closed: Vec<_> = spans
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(name, _)| name == "gen_ai")
        .cloned()
        .collect();
    assert_eq!(closed.len(), 2, "{closed:?}");
    for (i, (_, f)) in closed.iter().enumerate() {
        let get = |k: &str| f.get(k).map(String::as_str);
        assert_eq!(get("gen_ai.request.model"), Some("qwen-plus"));
        assert_eq!(get("gen_ai.usage.output_tokens"), Some("3"), "{f:?}");
        assert_eq!(
            get("gen_ai.response.finish_reasons"),
            Some("length"),
            "{f:?}"
        );
        assert_eq!(get("error.type"), None);
        assert_eq!(get("gen_ai.response.time_to_first_chunk").is_some(), i == 1);
    }
}
