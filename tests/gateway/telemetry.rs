//! The gateway's GenAI spans (issue 17, item 3): each proxied generation
//! or embedding call gets the client half's span and metrics
//! ([`GenAiOtel`]), with the client key's name (never the key), as a child
//! of the client's `traceparent`; asserted in the SDK's in-memory
//! exporters, against the mock.

use axum::Router;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId};
use opentelemetry::{Array, Value};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower_qwen::telemetry::otel::GenAiOtel;

use super::*;

/// A trace and span id the client sends as its `traceparent`.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

struct Exporters {
    spans: InMemorySpanExporter,
    tracer: SdkTracerProvider,
    metrics: InMemoryMetricExporter,
    meter: SdkMeterProvider,
}

impl Exporters {
    fn new() -> Self {
        let spans = InMemorySpanExporter::default();
        let metrics = InMemoryMetricExporter::default();
        Self {
            tracer: SdkTracerProvider::builder()
                .with_simple_exporter(spans.clone())
                .build(),
            meter: SdkMeterProvider::builder()
                .with_reader(PeriodicReader::builder(metrics.clone()).build())
                .build(),
            spans,
            metrics,
        }
    }

    /// The gateway of the base configuration plus `extra`, recording here.
    fn gateway(&self, mock: &MockHandle, extra: &str) -> Router {
        let cfg = GatewayConfig::from_toml_with_env(&config(mock, extra), |_| None)
            .expect("valid config")
            .otel(GenAiOtel::new(&self.meter).tracer(&self.tracer));
        Gateway::new(cfg).router()
    }

    fn spans(&self) -> Vec<SpanData> {
        self.spans.get_finished_spans().unwrap()
    }

    /// Every attribute of every exported metric data point, as text.
    fn metric_attributes(&self) -> Vec<String> {
        use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
        fn points<T>(d: &MetricData<T>, out: &mut Vec<String>) {
            if let MetricData::Histogram(h) = d {
                for p in h.data_points() {
                    out.extend(p.attributes().map(|kv| format!("{}={}", kv.key, kv.value)));
                }
            }
        }
        self.meter.force_flush().unwrap();
        let mut out = Vec::new();
        for rm in self.metrics.get_finished_metrics().unwrap() {
            for sm in rm.scope_metrics() {
                for m in sm.metrics() {
                    match m.data() {
                        AggregatedMetrics::F64(d) => points(d, &mut out),
                        AggregatedMetrics::U64(d) => points(d, &mut out),
                        _ => {}
                    }
                }
            }
        }
        out
    }
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn text(s: &SpanData, key: &str) -> Option<String> {
    attr(s, key).map(Value::to_string)
}

/// No attribute of any span or metric holds key material: the client
/// key, its digest, the upstream keys, an `authorization` value.
fn assert_no_key_material(spans: &[SpanData], metrics: &[String]) {
    let secrets = [ALICE, &key_sha256(ALICE), UPSTREAM, UPSTREAM2, "Bearer"];
    let values = spans
        .iter()
        .flat_map(|s| {
            s.attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
        })
        .chain(spans.iter().map(|s| s.name.to_string()))
        .chain(metrics.iter().cloned());
    for v in values {
        for secret in secrets {
            assert!(!v.contains(secret), "{v:?} holds key material");
        }
    }
}

/// Asserts the attributes every chat span through the gateway carries,
/// and the usage the answer reported.
fn assert_chat_span(s: &SpanData, usage: &Value2) {
    assert_eq!(s.name, "chat qwen-plus");
    assert_eq!(s.span_kind, SpanKind::Client);
    assert_eq!(s.status, Status::Unset);
    assert_eq!(text(s, "gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(
        text(s, "gen_ai.provider.name").as_deref(),
        Some("dashscope")
    );
    assert_eq!(
        text(s, "gen_ai.request.model").as_deref(),
        Some("qwen-plus")
    );
    assert_eq!(
        text(s, "gen_ai.response.model").as_deref(),
        Some("qwen-plus")
    );
    assert_eq!(
        attr(s, "gen_ai.response.finish_reasons"),
        Some(&Value::Array(Array::String(vec!["stop".into()])))
    );
    assert_eq!(
        attr(s, "gen_ai.usage.input_tokens"),
        Some(&Value::I64(usage["prompt_tokens"].as_i64().unwrap()))
    );
    assert_eq!(
        attr(s, "gen_ai.usage.output_tokens"),
        Some(&Value::I64(usage["completion_tokens"].as_i64().unwrap()))
    );
    assert_eq!(
        text(s, "tower_qwen.client_key.name").as_deref(),
        Some("alice")
    );
    assert_eq!(attr(s, "error.type"), None);
}

type Value2 = serde_json::Value;

#[tokio::test(start_paused = true)]
async fn a_chat_call_gets_a_genai_span_under_the_clients_trace() {
    let mock = mock().start().await.expect("mock starts");
    let otel = Exporters::new();
    let app = otel.gateway(&mock, "");
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let a = call(
        &app,
        ALICE,
        CHAT,
        &[("traceparent", &traceparent)],
        &chat("qwen-plus", false),
    )
    .await;
    assert_eq!(a.status, 200, "{:?}", a.body);

    let spans = otel.spans();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let s = &spans[0];
    assert_chat_span(s, &a.json()["usage"]);
    // A child of the client's span, in its trace.
    assert_eq!(s.span_context.trace_id(), TraceId::from_hex(TRACE).unwrap());
    assert_eq!(s.parent_span_id, SpanId::from_hex(PARENT).unwrap());
    assert!(s.parent_span_is_remote);
    // The upstream (set further in) is the GenAI server.
    let upstream: http::Uri = mock.base_url().parse().unwrap();
    assert_eq!(text(s, "server.address").as_deref(), upstream.host());
    assert_eq!(
        attr(s, "server.port"),
        Some(&Value::I64(i64::from(upstream.port_u16().unwrap())))
    );
    // Not a stream: no time to first chunk.
    assert_eq!(attr(s, "gen_ai.response.time_to_first_chunk"), None);

    // The metrics: no per-key attribute.
    let metrics = otel.metric_attributes();
    assert!(
        metrics.contains(&"gen_ai.operation.name=chat".to_owned()),
        "{metrics:?}"
    );
    assert!(
        metrics.iter().all(|m| !m.starts_with("tower_qwen.")),
        "{metrics:?}"
    );
    assert_no_key_material(&spans, &metrics);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_call_gets_its_time_to_first_chunk_and_usage() {
    let mock = mock()
        .faults(
            FaultPlan::new().latency(
                Latency::none()
                    .time_to_headers(Dist::fixed(Duration::from_millis(300)))
                    .per_token(Dist::fixed(Duration::from_millis(50))),
            ),
        )
        .start()
        .await
        .expect("mock starts");
    let otel = Exporters::new();
    let app = otel.gateway(&mock, "");
    let body = r#"{"model":"qwen-plus","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello, world"}]}"#;
    let a = call(&app, ALICE, CHAT, &[], body).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    // The usage chunk of the stream.
    let wire = String::from_utf8(a.body.to_vec()).unwrap();
    let usage: Value2 = wire
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<Value2>(d).ok())
        .find_map(|c| c.get("usage").filter(|u| !u.is_null()).cloned())
        .expect("a usage chunk");

    let spans = otel.spans();
    assert_eq!(spans.len(), 1, "{spans:?}");
    let s = &spans[0];
    assert_chat_span(s, &usage);
    // No traceparent: a root span.
    assert_eq!(s.parent_span_id, SpanId::INVALID);
    // The first chunk came after the mock's first-token latency.
    match attr(s, "gen_ai.response.time_to_first_chunk") {
        Some(Value::F64(t)) => assert!(*t >= 0.3, "{t}"),
        other => panic!("time to first chunk: {other:?}"),
    }
    assert_no_key_material(&spans, &otel.metric_attributes());
}

#[tokio::test(start_paused = true)]
async fn genai_spans_off_records_nothing_and_refusals_are_failed_operations() {
    let mock = mock().start().await.expect("mock starts");
    // Off: no span, no metric.
    let otel = Exporters::new();
    let app = otel.gateway(&mock, "[telemetry]\ngenai_spans = false");
    let a = call(&app, ALICE, CHAT, &[], &chat("qwen-plus", false)).await;
    assert_eq!(a.status, 200);
    assert!(otel.spans().is_empty());
    assert!(otel.metric_attributes().is_empty());

    // On (the default): a call the key's tokens per minute refuse (inside
    // the span; the first call empties the bucket) is a failed operation.
    let otel = Exporters::new();
    let app = otel.gateway(&mock, "tpm = 1");
    let a = call(&app, ALICE, CHAT, &[], &chat("qwen-plus", false)).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let a = call(&app, ALICE, CHAT, &[], &chat("qwen-plus", false)).await;
    assert_eq!(a.status, 429, "{:?}", a.body);
    let spans = otel.spans();
    assert_eq!(spans.len(), 2, "{spans:?}");
    assert_eq!(attr(&spans[0], "error.type"), None);
    let refused = &spans[1];
    assert_eq!(
        text(refused, "error.type").as_deref(),
        Some("throttled.local")
    );
    assert_eq!(
        text(refused, "tower_qwen.client_key.name").as_deref(),
        Some("alice")
    );
    assert_no_key_material(&spans, &otel.metric_attributes());
}
