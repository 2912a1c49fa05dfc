//! The `otel` feature: OpenTelemetry spans and GenAI metrics, asserted in
//! the SDK's in-memory exporters; OTLP over HTTP to a local listener.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, Value};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, HistogramDataPoint, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tower_qwen::telemetry::otel::{GenAiOtel, Otlp};

use super::*;

struct Otel {
    spans: InMemorySpanExporter,
    tracer: SdkTracerProvider,
    metrics: InMemoryMetricExporter,
    meter: SdkMeterProvider,
}

impl Otel {
    fn new() -> Self {
        let spans = InMemorySpanExporter::default();
        let tracer = SdkTracerProvider::builder()
            .with_simple_exporter(spans.clone())
            .build();
        let metrics = InMemoryMetricExporter::default();
        let meter = SdkMeterProvider::builder()
            .with_reader(PeriodicReader::builder(metrics.clone()).build())
            .build();
        Self {
            spans,
            tracer,
            metrics,
            meter,
        }
    }

    fn layer(&self) -> GenAiTraceLayer {
        GenAiTraceLayer::new().otel(GenAiOtel::new(&self.meter).tracer(&self.tracer))
    }

    fn spans(&self) -> Vec<SpanData> {
        self.spans.get_finished_spans().unwrap()
    }

    /// The data points of a histogram, with their attributes as a map.
    fn histogram<T: Copy + 'static>(
        &self,
        name: &str,
        pick: fn(&AggregatedMetrics) -> Option<&MetricData<T>>,
    ) -> Vec<(BTreeMap<String, String>, u64, T)> {
        self.meter.force_flush().unwrap();
        let all = self.metrics.get_finished_metrics().unwrap();
        let last = all.last().expect("metrics exported");
        let mut out = Vec::new();
        for sm in last.scope_metrics() {
            assert_eq!(sm.scope().name(), "tower-qwen");
            for m in sm.metrics().filter(|m| m.name() == name) {
                let Some(MetricData::Histogram(h)) = pick(m.data()) else {
                    panic!("{name} is not a histogram of that type");
                };
                for p in h.data_points() {
                    out.push((attrs(p), p.count(), p.sum()));
                }
            }
        }
        out
    }
}

fn attrs<T>(p: &HistogramDataPoint<T>) -> BTreeMap<String, String> {
    p.attributes()
        .map(|kv| (kv.key.to_string(), kv.value.to_string()))
        .collect()
}

fn f64s(m: &AggregatedMetrics) -> Option<&MetricData<f64>> {
    match m {
        AggregatedMetrics::F64(d) => Some(d),
        _ => None,
    }
}

fn u64s(m: &AggregatedMetrics) -> Option<&MetricData<u64>> {
    match m {
        AggregatedMetrics::U64(d) => Some(d),
        _ => None,
    }
}

fn span_attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

#[tokio::test(start_paused = true)]
async fn a_stream_gives_a_client_span_and_the_genai_metrics() {
    let otel = Otel::new();
    let svc = ServiceBuilder::new().layer(otel.layer()).service(upstream(
        1000,
        "text/event-stream",
        compat_stream,
    ));
    let res = svc
        .oneshot(request(
            "/compatible-mode/v1/chat/completions",
            COMPAT_STREAM_REQ,
        ))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();

    let spans = otel.spans();
    assert_eq!(spans.len(), 1);
    let s = &spans[0];
    assert_eq!(s.name, "chat qwen-plus");
    assert_eq!(s.span_kind, SpanKind::Client);
    assert_eq!(s.status, Status::Unset);
    // Headers at 1 s, then 3 more seconds of stream: the span covers them.
    assert_eq!(
        s.end_time.duration_since(s.start_time).unwrap(),
        Duration::from_secs(4)
    );
    let str_attr = |k: &str| span_attr(s, k).map(|v| v.to_string());
    assert_eq!(str_attr("gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(
        str_attr("gen_ai.provider.name").as_deref(),
        Some("dashscope")
    );
    assert_eq!(
        str_attr("gen_ai.request.model").as_deref(),
        Some("qwen-plus")
    );
    assert_eq!(
        span_attr(s, "gen_ai.request.max_tokens"),
        Some(&Value::I64(50))
    );
    assert_eq!(
        str_attr("gen_ai.response.model").as_deref(),
        Some("qwen-plus")
    );
    assert_eq!(
        span_attr(s, "gen_ai.response.finish_reasons"),
        Some(&Value::Array(Array::String(vec!["stop".into()])))
    );
    assert_eq!(
        span_attr(s, "gen_ai.usage.input_tokens"),
        Some(&Value::I64(11))
    );
    assert_eq!(
        span_attr(s, "gen_ai.usage.output_tokens"),
        Some(&Value::I64(3))
    );
    assert_eq!(
        span_attr(s, "gen_ai.response.time_to_first_chunk"),
        Some(&Value::F64(1.0))
    );
    assert_eq!(
        str_attr("server.address").as_deref(),
        Some("dashscope-intl.aliyuncs.com")
    );
    assert_eq!(span_attr(s, "server.port"), Some(&Value::I64(443)));
    assert_eq!(span_attr(s, "error.type"), None);

    let expected: BTreeMap<String, String> = [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "dashscope"),
        ("gen_ai.request.model", "qwen-plus"),
        ("gen_ai.response.model", "qwen-plus"),
        ("server.address", "dashscope-intl.aliyuncs.com"),
        ("server.port", "443"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let duration = otel.histogram("gen_ai.client.operation.duration", f64s);
    assert_eq!(duration, vec![(expected.clone(), 1, 4.0)]);
    let first = otel.histogram("gen_ai.client.operation.time_to_first_chunk", f64s);
    assert_eq!(first, vec![(expected.clone(), 1, 1.0)]);
    let mut tokens = otel.histogram("gen_ai.client.token.usage", u64s);
    tokens.sort_by_key(|(a, ..)| a["gen_ai.token.type"].clone());
    let with = |kind: &str| {
        let mut e = expected.clone();
        e.insert("gen_ai.token.type".into(), kind.into());
        e
    };
    assert_eq!(tokens, vec![(with("input"), 1, 11), (with("output"), 1, 3)]);
}

#[tokio::test(start_paused = true)]
async fn failures_embeddings_and_plain_calls() {
    let otel = Otel::new();
    // A business error in an HTTP 200 body.
    let throttled = || {
        full(
            r#"{"request_id":"1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#,
        )
    };
    let svc = otel
        .layer()
        .layer(upstream(250, "application/json", throttled));
    let res = svc
        .oneshot(request(
            "/api/v1/services/aigc/text-generation/generation",
            r#"{"model":"qwen-max","input":{"messages":[{"role":"user","content":"x"}]}}"#,
        ))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();
    // A native embedding: usage is a total only, which is input.
    let embedded = || {
        full(
            r#"{"output":{"embeddings":[{"embedding":[0.1],"text_index":0}]},"usage":{"total_tokens":9},"request_id":"2"}"#,
        )
    };
    let svc = otel
        .layer()
        .layer(upstream(100, "application/json", embedded));
    let res = svc
        .oneshot(request(
            "/api/v1/services/embeddings/text-embedding/text-embedding",
            r#"{"model":"text-embedding-v3","input":{"texts":["hello"]}}"#,
        ))
        .await
        .unwrap();
    res.into_body().collect().await.unwrap();

    let spans = otel.spans();
    assert_eq!(spans.len(), 2);
    let (err, emb) = (&spans[0], &spans[1]);
    assert_eq!(err.name, "chat qwen-max");
    assert_eq!(
        err.status,
        Status::Error {
            description: "throttled.requests".into()
        }
    );
    assert_eq!(
        span_attr(err, "error.type")
            .map(|v| v.to_string())
            .as_deref(),
        Some("throttled.requests")
    );
    assert_eq!(emb.name, "embeddings text-embedding-v3");
    assert_eq!(
        span_attr(emb, "gen_ai.usage.input_tokens"),
        Some(&Value::I64(9))
    );
    assert_eq!(span_attr(emb, "gen_ai.usage.output_tokens"), None);
    // Not streamed: no time to first chunk.
    assert_eq!(span_attr(emb, "gen_ai.response.time_to_first_chunk"), None);

    let mut duration = otel.histogram("gen_ai.client.operation.duration", f64s);
    duration.sort_by(|a, b| a.2.total_cmp(&b.2));
    assert_eq!(duration.len(), 2);
    assert_eq!(duration[0].2, 0.1);
    assert_eq!(duration[0].0.get("error.type"), None);
    assert_eq!(duration[1].2, 0.25);
    assert_eq!(duration[1].0["error.type"], "throttled.requests");
    assert_eq!(duration[1].0["gen_ai.request.model"], "qwen-max");
    assert!(
        otel.histogram("gen_ai.client.operation.time_to_first_chunk", f64s)
            .is_empty()
    );
    let tokens = otel.histogram("gen_ai.client.token.usage", u64s);
    assert_eq!(
        tokens.len(),
        1,
        "only the embedding reported usage: {tokens:?}"
    );
    assert_eq!(
        (tokens[0].0["gen_ai.token.type"].as_str(), tokens[0].2),
        ("input", 9)
    );
    assert_eq!(tokens[0].0["gen_ai.operation.name"], "embeddings");
}

/// The OTLP pipeline posts protobuf spans and metrics to the collector's
/// `/v1/traces` and `/v1/metrics`. The collector is a plain listener on
/// 127.0.0.1 that answers 200; each read is bounded.
#[test]
fn otlp_exports_spans_and_metrics_over_http() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::thread::spawn(move || {
        let mut seen = Vec::new();
        listener.set_nonblocking(false).unwrap();
        // Two exports are expected: one per signal.
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            // Read the head, then the body by its content-length.
            let (head, body_len) = loop {
                let n = conn.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed before the head");
                buf.extend_from_slice(&chunk[..n]);
                if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:"))
                        .map_or(0, |v| v.trim().parse::<usize>().unwrap());
                    buf.drain(..end + 4);
                    break (head, len);
                }
            };
            while buf.len() < body_len {
                let n = conn.read(&mut chunk).unwrap();
                assert!(n > 0, "connection closed before the body");
                buf.extend_from_slice(&chunk[..n]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                .unwrap();
            let line = head.lines().next().unwrap().to_owned();
            let protobuf = head.contains("content-type: application/x-protobuf");
            // The model name travels inside the protobuf payload.
            let names_model = buf.windows(9).any(|w| w == b"qwen-plus");
            seen.push((line, protobuf, names_model));
        }
        seen
    });

    let otlp = Otlp::http(&format!("http://{addr}"), "telemetry-test").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let layer = GenAiTraceLayer::new()
            .otel(GenAiOtel::new(otlp.meter_provider()).tracer(otlp.tracer_provider()));
        let svc = layer.layer(upstream(0, "text/event-stream", compat_stream));
        let res = svc
            .oneshot(request(
                "/compatible-mode/v1/chat/completions",
                COMPAT_STREAM_REQ,
            ))
            .await
            .unwrap();
        res.into_body().collect().await.unwrap();
    });
    otlp.shutdown().unwrap();
    // Both exports are done (or failed) once shutdown returns: if the
    // listener still waits, these connections end its wait (and the test).
    for _ in 0..2 {
        let _ = std::net::TcpStream::connect(addr);
    }
    let mut seen = seen.join().expect("both exports reached the listener");
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("post /v1/metrics http/1.1".to_owned(), true, true),
            ("post /v1/traces http/1.1".to_owned(), true, true),
        ]
    );
}
