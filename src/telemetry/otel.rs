//! OpenTelemetry: the GenAI metrics (and, if you want them, spans made
//! with an OpenTelemetry tracer) of [`GenAiTraceLayer`](super::GenAiTraceLayer),
//! and an OTLP pipeline to export them.
//!
//! [`GenAiOtel`] records, per call:
//!
//! | instrument | unit | what |
//! |---|---|---|
//! | `gen_ai.client.operation.duration` | `s` | from the call to the end of the response body (streams included) |
//! | `gen_ai.client.token.usage` | `{token}` | input and output tokens (`gen_ai.token.type` = `input` / `output`), when the answer reported usage |
//! | `gen_ai.client.operation.time_to_first_chunk` | `s` | streamed calls only: from the call to the first body frame |
//!
//! with the attributes `gen_ai.operation.name`, `gen_ai.provider.name`,
//! `gen_ai.request.model`, `gen_ai.response.model` (when the answer names
//! it), `server.address` / `server.port` (when the request URI has a host)
//! and `error.type` (when the call failed), and the bucket boundaries the
//! conventions advise. Nothing per client or per key is a metric attribute.
//!
//! With [`GenAiOtel::tracer`] it also makes an OpenTelemetry span per call
//! (kind client, named `{operation} {model}`, the span attributes of the
//! conventions including `gen_ai.response.finish_reasons` as an array),
//! a child of the request's W3C `traceparent` (and `tracestate`) when it
//! carries a valid one (what a gateway receives from its clients), else of
//! the current OpenTelemetry context, for applications that do not bridge `tracing` to OpenTelemetry. If you
//! do bridge it (`tracing-opentelemetry`), leave the tracer out: the layer's
//! `tracing` span already carries the same fields, `otel.name` and
//! `otel.kind` included.
//!
//! Durations follow tokio's clock (paused in tests), like everything else
//! in the crate.
//!
//! # Example
//!
//! Metrics into the SDK's in-memory exporter:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http_body_util::{BodyExt, Full};
//! use bytes::Bytes;
//! use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::telemetry::{GenAiTraceLayer, otel::GenAiOtel};
//!
//! let exporter = InMemoryMetricExporter::default();
//! let meters = SdkMeterProvider::builder()
//!     .with_reader(PeriodicReader::builder(exporter.clone()).build())
//!     .build();
//! let svc = ServiceBuilder::new()
//!     .layer(GenAiTraceLayer::new().otel(GenAiOtel::new(&meters)))
//!     .service(service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
//!             br#"{"choices":[{"message":{"content":"Hi"},"finish_reason":"stop"}],"model":"qwen-plus","usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}"#,
//!         ))))
//!     }));
//! let req = http::Request::post("/compatible-mode/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"qwen-plus","messages":[{"role":"user","content":"Hi"}]}"#)))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! res.into_body().collect().await.unwrap();
//!
//! meters.force_flush().unwrap();
//! let names: Vec<String> = exporter.get_finished_metrics().unwrap().iter()
//!     .flat_map(|rm| rm.scope_metrics().flat_map(|sm| sm.metrics().map(|m| m.name().to_string())).collect::<Vec<_>>())
//!     .collect();
//! assert!(names.iter().any(|n| n == "gen_ai.client.operation.duration"));
//! assert!(names.iter().any(|n| n == "gen_ai.client.token.usage"));
//! # }
//! ```
//!
//! Over OTLP (HTTP + protobuf) to a collector:
//!
//! ```no_run
//! # fn main() -> Result<(), tower_qwen::BoxError> {
//! use tower_qwen::telemetry::{GenAiTraceLayer, otel::{GenAiOtel, Otlp}};
//!
//! let otlp = Otlp::http("http://127.0.0.1:4318", "my-service")?;
//! let layer = GenAiTraceLayer::new()
//!     .otel(GenAiOtel::new(otlp.meter_provider()).tracer(otlp.tracer_provider()));
//! // ... stack the layer, serve ...
//! otlp.shutdown()?;
//! # Ok(()) }
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use opentelemetry::global::{BoxedSpan, BoxedTracer};
use opentelemetry::metrics::{Histogram, MeterProvider};
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{
    Span as _, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider,
};
use opentelemetry::{Array, Context, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;

use super::record::{Call, End, PROVIDER};
use crate::BoxError;
use crate::time;

/// Bucket boundaries the GenAI conventions advise for durations, in seconds.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92,
];

/// Bucket boundaries the GenAI conventions advise for token counts.
pub const TOKEN_BUCKETS: [f64; 14] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
    16777216.0, 67108864.0,
];

/// The GenAI instruments (and optionally a tracer) a
/// [`GenAiTraceLayer`](super::GenAiTraceLayer) records into. See the
/// [module docs](self) for an example.
///
/// # Clone
///
/// Clones share the instruments.
#[derive(Clone)]
pub struct GenAiOtel {
    inner: Arc<Instruments>,
}

struct Instruments {
    duration: Histogram<f64>,
    tokens: Histogram<u64>,
    first_chunk: Histogram<f64>,
    tracer: Option<BoxedTracer>,
}

impl fmt::Debug for GenAiOtel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GenAiOtel")
            .field("tracer", &self.inner.tracer.is_some())
            .finish_non_exhaustive()
    }
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder(env!("CARGO_PKG_NAME"))
        .with_version(env!("CARGO_PKG_VERSION"))
        .build()
}

impl GenAiOtel {
    /// Metrics from `provider`'s meter (scope `tower-qwen`); no
    /// OpenTelemetry spans.
    pub fn new<P: MeterProvider + ?Sized>(provider: &P) -> Self {
        let meter = provider.meter_with_scope(scope());
        let duration = meter
            .f64_histogram("gen_ai.client.operation.duration")
            .with_unit("s")
            .with_description("GenAI operation duration.")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        let tokens = meter
            .u64_histogram("gen_ai.client.token.usage")
            .with_unit("{token}")
            .with_description("Number of input and output tokens used.")
            .with_boundaries(TOKEN_BUCKETS.to_vec())
            .build();
        let first_chunk = meter
            .f64_histogram("gen_ai.client.operation.time_to_first_chunk")
            .with_unit("s")
            .with_description("Time to receive the first chunk of a streamed response.")
            .with_boundaries(DURATION_BUCKETS.to_vec())
            .build();
        Self {
            inner: Arc::new(Instruments {
                duration,
                tokens,
                first_chunk,
                tracer: None,
            }),
        }
    }

    /// Metrics from the global meter provider
    /// (`opentelemetry::global::meter_provider()`).
    pub fn global() -> Self {
        Self::new(&*opentelemetry::global::meter_provider())
    }

    /// Also make an OpenTelemetry span per call with `provider`'s tracer
    /// (parented on the current OpenTelemetry context). Default is none:
    /// spans go through `tracing` only.
    pub fn tracer<P>(self, provider: &P) -> Self
    where
        P: TracerProvider + ?Sized,
        P::Tracer: Send + Sync + 'static,
        <P::Tracer as opentelemetry::trace::Tracer>::Span: Send + Sync + 'static,
    {
        let tracer = BoxedTracer::new(Box::new(provider.tracer_with_scope(scope())));
        let Instruments {
            duration,
            tokens,
            first_chunk,
            ..
        } = &*self.inner;
        Self {
            inner: Arc::new(Instruments {
                duration: duration.clone(),
                tokens: tokens.clone(),
                first_chunk: first_chunk.clone(),
                tracer: Some(tracer),
            }),
        }
    }

    pub(crate) fn start(&self, call: &Call, headers: &http::HeaderMap) -> Live {
        // The OpenTelemetry span keeps wall-clock stamps; its length follows
        // tokio's clock, as the metrics do.
        let wall_start = time::system_now();
        let span = self.inner.tracer.as_ref().map(|tracer| {
            let model = call.model.as_deref().unwrap_or("");
            let mut attrs = common(call);
            if let Some(n) = call.max_tokens {
                attrs.push(KeyValue::new("gen_ai.request.max_tokens", i64::from(n)));
            }
            if let Some(name) = &call.caller {
                attrs.push(KeyValue::new(
                    "tower_qwen.client_key.name",
                    Value::String(StringValue::from(name.clone())),
                ));
            }
            let builder = tracer
                .span_builder(format!("{} {model}", call.operation))
                .with_kind(SpanKind::Client)
                .with_start_time(wall_start)
                .with_attributes(attrs);
            match remote_parent(headers) {
                Some(parent) => builder.start_with_context(tracer, &parent),
                None => builder.start(tracer),
            }
        });
        Live {
            instruments: self.inner.clone(),
            span,
            wall_start,
        }
    }
}

/// The context of the request's `traceparent` header, when it carries a
/// valid one.
fn remote_parent(headers: &http::HeaderMap) -> Option<Context> {
    struct Headers<'a>(&'a http::HeaderMap);
    impl Extractor for Headers<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).and_then(|v| v.to_str().ok())
        }
        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(http::HeaderName::as_str).collect()
        }
    }
    if !headers.contains_key("traceparent") {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    cx.span().span_context().is_valid().then_some(cx)
}

/// The attributes every signal of a call carries.
fn common(call: &Call) -> Vec<KeyValue> {
    let mut attrs = Vec::with_capacity(8);
    attrs.push(KeyValue::new("gen_ai.operation.name", call.operation));
    attrs.push(KeyValue::new("gen_ai.provider.name", PROVIDER));
    if let Some(model) = &call.model {
        attrs.push(KeyValue::new(
            "gen_ai.request.model",
            Value::String(StringValue::from(model.clone())),
        ));
    }
    if let Some((host, port)) = &call.server {
        attrs.push(KeyValue::new(
            "server.address",
            Value::String(StringValue::from(host.clone())),
        ));
        attrs.push(KeyValue::new("server.port", i64::from(*port)));
    }
    attrs
}

/// One call in flight, on the OpenTelemetry side.
pub(crate) struct Live {
    instruments: Arc<Instruments>,
    span: Option<BoxedSpan>,
    wall_start: SystemTime,
}

impl Live {
    pub(crate) fn end(self, call: &Call, end: &End) {
        let Live {
            instruments,
            span,
            wall_start,
        } = self;
        let mut attrs = common(call);
        if let Some(model) = end.answer.model() {
            attrs.push(KeyValue::new("gen_ai.response.model", model.to_owned()));
        }
        if let Some(e) = end.error_type {
            attrs.push(KeyValue::new("error.type", e));
        }
        instruments
            .duration
            .record(end.duration.as_secs_f64(), &attrs);
        if let Some(t) = end.first_chunk {
            instruments.first_chunk.record(t.as_secs_f64(), &attrs);
        }
        for (kind, n) in [("input", end.input_tokens), ("output", end.output_tokens)] {
            if let Some(n) = n {
                attrs.push(KeyValue::new("gen_ai.token.type", kind));
                instruments.tokens.record(u64::from(n), &attrs);
                attrs.pop();
            }
        }
        if let Some(mut span) = span {
            let reasons: Vec<StringValue> = end
                .answer
                .finish_reasons()
                .map(|r| StringValue::from(r.as_str()))
                .collect();
            if !reasons.is_empty() {
                span.set_attribute(KeyValue::new(
                    "gen_ai.response.finish_reasons",
                    Value::Array(Array::String(reasons)),
                ));
            }
            if let Some(model) = end.answer.model() {
                span.set_attribute(KeyValue::new("gen_ai.response.model", model.to_owned()));
            }
            for (key, n) in [
                ("gen_ai.usage.input_tokens", end.input_tokens),
                ("gen_ai.usage.output_tokens", end.output_tokens),
            ] {
                if let Some(n) = n {
                    span.set_attribute(KeyValue::new(key, i64::from(n)));
                }
            }
            if let Some(t) = end.first_chunk {
                span.set_attribute(KeyValue::new(
                    "gen_ai.response.time_to_first_chunk",
                    t.as_secs_f64(),
                ));
            }
            if let Some(e) = end.error_type {
                span.set_attribute(KeyValue::new("error.type", e));
                span.set_status(Status::Error {
                    description: Cow::Borrowed(e),
                });
            }
            span.end_with_timestamp(wall_start + end.duration);
        }
    }
}

impl fmt::Debug for Live {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Live").finish_non_exhaustive()
    }
}

/// An OTLP pipeline (HTTP + protobuf): a tracer provider with a batch span
/// processor and a meter provider with a periodic reader (every 60 s, or
/// `OTEL_METRIC_EXPORT_INTERVAL`), both exporting to one collector, with
/// the resource's `service.name` set. See the [module docs](self).
///
/// The exporters run on the SDK's own threads with a blocking HTTP client,
/// so no runtime is needed and none is blocked. The usual
/// `OTEL_EXPORTER_OTLP_*` variables (headers, timeout, compression) apply.
///
/// Call [`Otlp::shutdown`] before exiting, or the last batch is lost.
#[derive(Debug, Clone)]
pub struct Otlp {
    tracer: SdkTracerProvider,
    meter: SdkMeterProvider,
}

impl Otlp {
    /// Exports to the collector at `endpoint` (its base URL, e.g.
    /// `http://127.0.0.1:4318`: `/v1/traces` and `/v1/metrics` are
    /// appended), naming the service `service_name`.
    ///
    /// # Errors
    ///
    /// When an exporter cannot be built (an invalid endpoint).
    pub fn http(endpoint: &str, service_name: &str) -> Result<Self, BoxError> {
        use opentelemetry_otlp::{MetricExporter, SpanExporter, WithExportConfig};
        let base = endpoint.trim_end_matches('/');
        let resource = Resource::builder()
            .with_service_name(service_name.to_owned())
            .build();
        let spans = SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{base}/v1/traces"))
            .build()?;
        let metrics = MetricExporter::builder()
            .with_http()
            .with_endpoint(format!("{base}/v1/metrics"))
            .build()?;
        let tracer = SdkTracerProvider::builder()
            .with_resource(resource.clone())
            .with_batch_exporter(spans)
            .build();
        let meter = SdkMeterProvider::builder()
            .with_resource(resource)
            .with_periodic_exporter(metrics)
            .build();
        Ok(Self { tracer, meter })
    }

    /// The tracer provider (give it to [`GenAiOtel::tracer`], or set it
    /// global).
    pub fn tracer_provider(&self) -> &SdkTracerProvider {
        &self.tracer
    }

    /// The meter provider (give it to [`GenAiOtel::new`], or set it global).
    pub fn meter_provider(&self) -> &SdkMeterProvider {
        &self.meter
    }

    /// Exports what is pending now.
    ///
    /// # Errors
    ///
    /// When an export fails.
    pub fn force_flush(&self) -> Result<(), BoxError> {
        self.tracer.force_flush()?;
        self.meter.force_flush()?;
        Ok(())
    }

    /// Exports what is pending and stops the exporters.
    ///
    /// # Errors
    ///
    /// When an export fails or the pipeline was already shut down.
    pub fn shutdown(&self) -> Result<(), BoxError> {
        let spans = self.tracer.shutdown();
        let metrics = self.meter.shutdown();
        spans?;
        metrics?;
        Ok(())
    }
}
