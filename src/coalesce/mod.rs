//! Merging single-text embedding requests into one upstream request.
//!
//! Many callers each embedding one text is the common pattern, and it spends
//! one request of the per-minute quota (RPM) per text. DashScope takes up to
//! 10 texts per request for `text-embedding-v3`/`v4` and 25 for `v1`/`v2`
//! (QWEN-API.md A6). [`Coalesce`] gathers concurrent single-text requests
//! that could share a call, sends one request, and hands each caller its own
//! answer, of the same shape as if it had been sent alone.
//!
//! # What is merged
//!
//! A request takes part when it is a `POST` to the native
//! (`/api/v1/services/embeddings/text-embedding/text-embedding`, body
//! `{"model", "input": {"texts": [..]}, "parameters": {..}}`) or the
//! compatible (`/compatible-mode/v1/embeddings`, body `{"model", "input":
//! "text" | [..], "dimensions", "encoding_format"}`) embedding endpoint, its
//! body is buffered ([`BufferedBody`](crate::body::BufferedBody) returns the
//! bytes), and it carries exactly one text. Two such requests share a call
//! only when everything but the text is equal: the target URI, the HTTP
//! version, every header except framing and tracing ones (`content-length`,
//! `transfer-encoding`, `accept-encoding`, `connection`, `traceparent`,
//! `tracestate`, `x-request-id`), so requests of different API keys or
//! workspaces are never merged, and the whole JSON body except the text
//! (model, parameters, dimensions, encoding format...; key order does not
//! matter).
//!
//! A batch is sent when it holds the model's cap
//! ([`CoalesceLayer::max_batch`]), when its first text has waited
//! [`CoalesceLayer::max_wait`] (default 5 ms, on tokio's clock), or at once
//! when the service and all its clones are dropped.
//!
//! # The answers
//!
//! Each caller gets the upstream status, headers and extensions, and the
//! upstream JSON with only its own embedding, re-indexed to 0 (native
//! `output.embeddings[{"text_index": 0, "embedding"}]`, compatible
//! `data[{"object", "embedding", "index": 0}]`); the other fields
//! (`request_id`, `id`, `model`, `object`) are the shared call's. Every
//! integer field of `usage` (`total_tokens`, `prompt_tokens`, ...) is split
//! among the callers in proportion to the estimated tokens of their texts
//! ([`tokens::estimate_text_tokens`](crate::tokens::estimate_text_tokens)),
//! by largest remainder: each gets the floor of its exact share, and the
//! units left over go to the largest fractional parts (the earlier text
//! first on ties). The shares are integers that add up to the reported
//! total, so a token limiter reconciling each caller's usage charges the
//! call exactly once.
//!
//! # Failures
//!
//! * An HTTP error (any non-2xx, or a business error in a 200 body) reaches
//!   every caller of the batch as a response with the same status, headers
//!   and body, so the classifier and retry layers outside see what they
//!   would have seen alone.
//! * A batch refused as too large (a 400 whose message mentions the batch
//!   size, e.g. "batch size is invalid, it should not be larger than 10.")
//!   is split and sent again: in chunks of the limit the message states
//!   (which the layer then uses for that model from then on, logging a
//!   warning), else in halves.
//! * An error instead of a response (transport, timeout, another layer's
//!   error), a body that fails mid-read, or a success that cannot be split
//!   reaches every caller as an [`error::BatchFailed`] whose `source()` is
//!   the original error; [`Classifier`](crate::classify::Classifier)
//!   classifies it as it would the original.
//! * A caller that goes away before its batch is sent is left out of it; one
//!   that goes away later just misses its answer. Neither affects the
//!   others.
//!
//! # What passes through
//!
//! Everything else goes to the inner service untouched, and its response
//! body is handed on as is ([`ResponseBody`]): other endpoints, streamed
//! (unbuffered) bodies, async batch-embedding tasks (`X-DashScope-Async:
//! enable`), bodies this layer does not understand, and requests that
//! already carry several texts. A request with more texts than the model's
//! cap is split into requests of at most the cap, sent concurrently, and
//! joined into one answer (the embeddings in order, `usage` summed); if any
//! part fails, the caller gets that failure.
//!
//! # Backpressure and lifetime
//!
//! [`Coalesce`] is always ready; each request waits for what it needs in
//! its response future, like `tower::buffer::Buffer`. A request that passes
//! through is sent on a clone of the inner service once that clone is
//! ready (so nothing the inner service reserves in `poll_ready` is held on
//! behalf of a merged request). Merged requests take one of
//! [`CoalesceLayer::queue_capacity`] slots from the moment they arrive
//! until their answer is handed back; when none is free, callers wait for
//! one. The batcher is one task on the tokio runtime of the first
//! single-text request (outside a runtime, such requests are sent alone);
//! each merged call runs in a task of its own with a clone of the inner
//! service. When the service and all its clones are dropped, the batcher
//! sends what is waiting and ends.
//!
//! # How it differs from tower, and where it goes in a stack
//!
//! tower has no request-merging layer; `tower::buffer::Buffer` also runs a
//! worker task, but sends requests one by one. Put `Coalesce` **outside**
//! the rate limiter and the concurrency limit, so that they count the
//! merged upstream calls rather than the callers. Retry can sit inside (a
//! failed merged call is retried once for all its callers) or outside
//! (each caller is retried on its own, and merged again). Merged requests
//! start with empty extensions, so a layer inside reads the merged body
//! afresh (e.g. [`RequestInfo`](crate::request::RequestInfo) estimates all
//! of its texts).
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_qwen::BoxError> {
//! use std::sync::Arc;
//! use std::sync::atomic::{AtomicUsize, Ordering};
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use serde_json::{Value, json};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::body::Body;
//! use tower_qwen::coalesce::CoalesceLayer;
//!
//! // A stand-in for DashScope's compatible endpoint: embeds each text as
//! // [its length].
//! let calls = Arc::new(AtomicUsize::new(0));
//! let upstream = service_fn({
//!     let calls = calls.clone();
//!     move |req: http::Request<Body>| {
//!         calls.fetch_add(1, Ordering::SeqCst);
//!         async move {
//!             let body: Value = serde_json::from_slice(&req.into_body().collect().await?.to_bytes())?;
//!             let data: Vec<Value> = body["input"].as_array().unwrap().iter().enumerate()
//!                 .map(|(i, t)| json!({"object": "embedding", "index": i, "embedding": [t.as_str().unwrap().len()]}))
//!                 .collect();
//!             let answer = json!({"data": data, "object": "list", "usage": {"prompt_tokens": 6, "total_tokens": 6}});
//!             Ok::<_, tower_qwen::BoxError>(http::Response::new(Full::new(Bytes::from(answer.to_string()))))
//!         }
//!     }
//! });
//!
//! let svc = ServiceBuilder::new().layer(CoalesceLayer::new()).service(upstream);
//!
//! let embed = |text: &str| {
//!     let body = json!({"model": "text-embedding-v4", "input": text}).to_string();
//!     let req = http::Request::post("https://dashscope-intl.aliyuncs.com/compatible-mode/v1/embeddings")
//!         .header("authorization", "Bearer sk-test")
//!         .body(Body::from(body))
//!         .unwrap();
//!     svc.clone().oneshot(req)
//! };
//!
//! // Three callers at once: one upstream request.
//! let (a, b, c) = tokio::join!(embed("a"), embed("bb"), embed("ccc"));
//! assert_eq!(calls.load(Ordering::SeqCst), 1);
//!
//! // Each gets its own vector, at index 0, and a third of the usage.
//! let b: Value = serde_json::from_slice(&b?.into_body().collect().await?.to_bytes())?;
//! assert_eq!(b["data"][0]["embedding"][0], 2);
//! assert_eq!(b["data"][0]["index"], 0);
//! assert_eq!(b["usage"]["total_tokens"], 2);
//! # let _ = (a?, c?);
//! # Ok(())
//! # }
//! ```

mod answer;
mod batch;
mod body;
pub mod error;
pub mod future;
mod layer;
mod request;
mod service;

pub use self::body::ResponseBody;
pub use self::layer::CoalesceLayer;
pub use self::service::{Coalesce, CoalesceStats};
