//! Telemetry that follows the OpenTelemetry GenAI semantic conventions:
//! one span per call, and (feature `otel`) the GenAI metrics, exported
//! over OTLP.
//!
//! [`GenAiTraceLayer`] reads each request with [`RequestInfo`] (operation
//! `chat` or `embeddings` from the endpoint, the requested model, streaming,
//! `max_tokens`) and opens a `tracing` span named `gen_ai` with the
//! conventions' attribute names as fields:
//!
//! | field | from |
//! |---|---|
//! | `gen_ai.operation.name` | the endpoint: `chat` (native and compatible generation, multimodal) or `embeddings` |
//! | `gen_ai.provider.name` | `dashscope` |
//! | `gen_ai.request.model`, `gen_ai.request.max_tokens` | the request body |
//! | `server.address`, `server.port` | the request URI, when it has a host, else [`GenAiTraceLayer::server`] |
//! | `gen_ai.response.model` | the answer, when it names one (compatible mode) |
//! | `gen_ai.response.finish_reasons` | the answer's `finish_reason`s, comma-separated (an array on OpenTelemetry spans) |
//! | `gen_ai.usage.input_tokens`, `gen_ai.usage.output_tokens` | the answer's `usage` (streams included) |
//! | `gen_ai.response.time_to_first_chunk` | streamed calls: seconds from the call to the first body frame |
//! | `error.type` | a failed call: a short name of its [`Outcome`](crate::classify::Outcome) ([`error_type`]), `cancelled` for a body dropped half-way |
//! | `tower_qwen.client_key.name` | who made the call, when [`GenAiTraceLayer::caller`] names it (the gateway: the client key's configured name, never the key) |
//! | `otel.name`, `otel.kind`, `otel.status_code` | `{operation} {model}`, `client`, `ERROR` on failure: what `tracing-opentelemetry` turns into the span's name, kind and status |
//!
//! The span lasts until the response **body** ends (a stream's last frame,
//! an error, or the caller dropping it), not just the headers; what the
//! answer reports is read as the body passes by the crate's one
//! [body observer](crate::body::Observed) (with the classifier, the SSE
//! reader and the usage finder), never by buffering it or parsing it twice.
//! Requests to other endpoints (task polls, model lists) pass through
//! untraced.
//!
//! Put it outermost: the conventions ask for one span per logical
//! operation, retries and fallbacks included, and the inner layers' events
//! (retry attempts, waits) then nest inside it.
//!
//! With the `otel` feature, [`GenAiTraceLayer::otel`] also records the
//! `gen_ai.client.*` metrics (and optionally OpenTelemetry spans) with the
//! `opentelemetry` crates, and [`otel::Otlp`] exports them to a collector.
//! See [`otel`].
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::telemetry::GenAiTraceLayer;
//!
//! let svc = ServiceBuilder::new()
//!     .layer(GenAiTraceLayer::new())
//!     .service(service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(
//!             br#"{"choices":[{"message":{"content":"Hi"},"finish_reason":"stop"}],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#,
//!         ))))
//!     }));
//! let req = http::Request::post("https://dashscope-intl.aliyuncs.com/compatible-mode/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(br#"{"model":"qwen-plus","messages":[{"role":"user","content":"Hi"}]}"#)))
//!     .unwrap();
//! // The span `chat qwen-plus` closes when this body has been read.
//! let res = svc.oneshot(req).await.unwrap();
//! let body = res.into_body().collect().await.unwrap().to_bytes();
//! assert!(body.starts_with(b"{\"choices\""));
//! # }
//! ```

pub mod future;
#[cfg(feature = "otel")]
#[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
pub mod otel;
mod record;

use std::fmt;
use std::task::{Context, Poll};

use http::{Request, Response};
use tower_layer::Layer;
use tower_service::Service;

pub use record::{PROVIDER, Record, error_type, operation};

use crate::body::{BufferedBody, Observed};
use crate::classify::Classifier;
use crate::request::RequestInfo;

/// Applies [`GenAiTrace`] to services. See the [module docs](self) for an
/// example.
///
/// # Default
///
/// `tracing` spans only, the default [`Classifier`].
#[derive(Clone, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct GenAiTraceLayer {
    classifier: Classifier,
    caller: Option<Caller>,
    server: Option<(std::sync::Arc<str>, u16)>,
    /// No span, no metrics (the gateway's `[telemetry] genai_spans = false`).
    off: bool,
    #[cfg(feature = "otel")]
    otel: Option<otel::GenAiOtel>,
}

impl fmt::Debug for GenAiTraceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("GenAiTraceLayer");
        d.field("classifier", &self.classifier);
        d.field("caller", &self.caller.is_some());
        d.field("server", &self.server);
        d.field("off", &self.off);
        #[cfg(feature = "otel")]
        d.field("otel", &self.otel);
        d.finish()
    }
}

impl GenAiTraceLayer {
    /// `tracing` spans with the default classifier.
    pub fn new() -> Self {
        Self::default()
    }

    /// The classifier that decides whether a call failed (and its
    /// `error.type`). Default is [`Classifier::new`].
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = classifier;
        self
    }

    /// Names who made each call, from the request's extensions, as the
    /// span attribute `tower_qwen.client_key.name` (the gateway gives its
    /// client key's configured name). Never a metric attribute (one series
    /// per caller would grow without bound). Default is none.
    pub fn caller(mut self, caller: Caller) -> Self {
        self.caller = Some(caller);
        self
    }

    /// The GenAI server's address and port (`server.address`,
    /// `server.port`) for calls whose request URI names no host, e.g. in a
    /// gateway, which sets the upstream further in. Default is none: the
    /// request URI's host, if it has one.
    pub fn server(mut self, address: &str, port: u16) -> Self {
        self.server = Some((std::sync::Arc::from(address), port));
        self
    }

    /// Traces nothing: the calls pass through (their body wrapped, nothing
    /// read from it).
    #[cfg(feature = "gateway")]
    pub(crate) fn off(mut self) -> Self {
        self.off = true;
        self
    }

    /// Also record the GenAI metrics (and, if it has a tracer,
    /// OpenTelemetry spans). Default is none.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn otel(mut self, otel: otel::GenAiOtel) -> Self {
        self.otel = Some(otel);
        self
    }
}

impl<S> Layer<S> for GenAiTraceLayer {
    type Service = GenAiTrace<S>;

    fn layer(&self, inner: S) -> GenAiTrace<S> {
        GenAiTrace {
            inner,
            layer: self.clone(),
        }
    }
}

/// Who made a call, read from its request's extensions (see
/// [`GenAiTraceLayer::caller`]).
pub type Caller = fn(&http::Extensions) -> Option<std::sync::Arc<str>>;

/// Traces each GenAI call (and records its metrics with `otel`) until its
/// response body ends. See the [module docs](self) for an example.
///
/// The response body is the inner one wrapped once in the crate's
/// [`Observed`] body; errors are the inner service's, unchanged.
#[derive(Clone, Debug)]
pub struct GenAiTrace<S> {
    inner: S,
    layer: GenAiTraceLayer,
}

impl<S> GenAiTrace<S> {
    /// Wraps `inner` with the [defaults](GenAiTraceLayer#default).
    pub fn new(inner: S) -> Self {
        GenAiTraceLayer::new().layer(inner)
    }

    /// A layer, as [`GenAiTraceLayer::new`].
    pub fn layer() -> GenAiTraceLayer {
        GenAiTraceLayer::new()
    }

    crate::util::macros::define_inner_service_accessors!();
}

impl<S, B, RB> Service<Request<B>> for GenAiTrace<S>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: fmt::Display + 'static,
    B: BufferedBody,
    RB: http_body::Body + Send + 'static,
    RB::Data: 'static,
    RB::Error: 'static,
{
    type Response = Response<Observed<RB::Data, RB::Error>>;
    type Error = S::Error;
    type Future = future::ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let record = if self.layer.off {
            Record::none()
        } else {
            let info = RequestInfo::of(&mut req);
            Record::start(&self.layer, &info, &req)
        };
        let span = record.span();
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        future::ResponseFuture::new(inner, span, record, self.layer.classifier)
    }
}
