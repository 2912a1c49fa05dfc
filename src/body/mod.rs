//! Bodies: a replayable request body, and the response-body wrapper that
//! lets a layer act when a (streamed) response really ends.
//!
//! * [`Body`] is the crate's request body: bytes that can be read (to find
//!   the model and estimate tokens) and replayed (to retry), or a stream.
//!   [`BufferedBody`] is the trait the layers use to read and clone request
//!   bodies; it is also implemented for `http_body_util::Full<Bytes>`,
//!   `Empty<Bytes>` and `String`.
//! * [`Observed`] wraps a response body and calls [`OnEnd`] hooks exactly
//!   once, when the body ends, fails or is dropped, with the final
//!   [`Outcome`](crate::classify::Outcome) (an SSE error frame mid-stream, a
//!   business error in a 200 JSON body), the token [`Usage`](crate::usage::Usage)
//!   and, when asked, the [`Answer`]'s finish reasons and model. This is how a
//!   concurrency permit is held until an SSE generation finishes, how the
//!   circuit breaker sees a stream that failed half-way, and how the rate
//!   limiter reconciles reserved tokens with real usage. tower's own layers
//!   release at response headers, which is too early for LLM streams.
//! * **One observer.** A response is wrapped once, by the first (innermost)
//!   layer that watches it; every layer above adds its hook and what it
//!   needs to know ([`Inspect`]: outcome, usage, time to first byte, the
//!   answer's finish reasons and model) to that
//!   same wrapper, so the body is scanned and classified once for the
//!   breaker, the rate limiter, the concurrency limit, telemetry and retry's
//!   peek together. `future::ObserveFuture` is the response future those
//!   layers share.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::sync::{Arc, Mutex};
//! use http_body_util::BodyExt;
//! use tower_qwen::body::{BodyEnd, EndKind, Inspect, Observed, OnEnd};
//! use tower_qwen::classify::{Classifier, Outcome, PermanentReason};
//!
//! #[derive(Clone, Default)]
//! struct Record(Arc<Mutex<Option<BodyEnd>>>);
//! impl OnEnd for Record {
//!     fn on_end(self, end: BodyEnd) {
//!         *self.0.lock().unwrap() = Some(end);
//!     }
//! }
//!
//! // A compatible stream that fails after partial content.
//! let wire = "data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n\
//!             data: {\"error\":{\"message\":\"Output data may contain inappropriate content.\",\"type\":\"data_inspection_failed\",\"param\":null,\"code\":\"data_inspection_failed\"}}\n\n";
//! let res = http::Response::builder()
//!     .header("content-type", "text/event-stream")
//!     .body(String::from(wire))
//!     .unwrap();
//! let record = Record::default();
//! let res = Observed::wrap(res, &Classifier::new(), Inspect::ALL, record.clone());
//! let bytes = res.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(bytes.len(), wire.len()); // the caller sees every byte
//! let end = record.0.lock().unwrap().take().unwrap();
//! assert_eq!(end.kind, EndKind::Complete);
//! assert_eq!(end.outcome, Outcome::Permanent { reason: PermanentReason::ContentFilter });
//! # }
//! ```

mod answer;
#[cfg(any(
    feature = "circuit-breaker",
    feature = "concurrency",
    feature = "rate-limit"
))]
#[cfg_attr(
    docsrs,
    doc(cfg(any(
        feature = "circuit-breaker",
        feature = "concurrency",
        feature = "rate-limit"
    )))
)]
pub mod future;
mod observed;
mod request;

pub use answer::{Answer, FinishReason, ModelName};
pub use observed::{BodyEnd, EndKind, Inspect, Observed, OnEnd};
pub use request::{Body, BufferedBody};
