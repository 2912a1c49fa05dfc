//! Three independent timeouts for LLM calls: time to response headers,
//! silence between body frames, and the whole exchange.
//!
//! A single request timeout does not fit LLM traffic: a long generation can
//! stream for minutes and be perfectly healthy, while a stream that stopped
//! sending frames is dead however young it is. [`Timeout`] offers the three
//! bounds that do fit, each optional ([`TimeoutLayer`]; by default 60 s
//! idle and 300 s in all, [`TimeoutLayer::none`] for none):
//!
//! * **header**: the longest wait from the call to the response headers
//!   ([`HeaderTimeout`](error::HeaderTimeout));
//! * **idle**: the longest the response body waits for the upstream's next
//!   frame (the first one included). A stalled SSE stream is cut with an
//!   [`IdleTimeout`](error::IdleTimeout) error *in the body*, so the caller
//!   (and every body-watching layer outside: concurrency permits, breaker,
//!   token reconciliation) sees the stream fail; a slow but steady stream is
//!   never cut. (The "5 s read timeout" of common advice becomes this: it
//!   would kill every long generation as a total timeout.)
//! * **total**: a deadline for the whole exchange, body included
//!   ([`DeadlineExceeded`](error::DeadlineExceeded)). An earlier
//!   [`Deadline`](crate::time::Deadline) already in the request (a
//!   `retry` layer outside puts its deadline there) is
//!   honoured even when this is off.
//!
//! The errors are opaque, downcastable (`err.is::<IdleTimeout>()`) and
//! [classified](crate::classify) as transient, so a
//! `retry` layer outside retries a header timeout or a stream
//! that stalled before its first frame, and never one whose frames already
//! reached the caller.
//!
//! # How it differs from tower and tower-http
//!
//! tower's `Timeout` bounds only the response future (the headers), and its
//! `TimeoutLayer::new(Duration)` takes that one bound; this crate's
//! [`TimeoutLayer::new`] takes none and starts from the LLM defaults above.
//! tower-http's `TimeoutBody` bounds the gap between frames but creates a new
//! `Sleep` after every frame. Here one boxed timer per request serves the
//! header timeout, then moves into the body for the idle timeout and the
//! deadline, and is reset in place only when it fires early: frames that are
//! ready when polled cost no clock read and no timer work, and each wait for
//! the upstream costs one clock read. The layer's error type is
//! [`BoxError`](crate::BoxError), and the response body's too.
//!
//! # With other layers
//!
//! Put it innermost, just around the client: every attempt of a
//! `retry` layer outside gets its own header and idle timeout,
//! and a retry layer's deadline (a `Deadline` extension) bounds them all.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::convert::Infallible;
//! use std::time::Duration;
//! use bytes::Bytes;
//! use futures_util::StreamExt;
//! use http_body::Frame;
//! use http_body_util::{BodyExt, StreamBody};
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::timeout::TimeoutLayer;
//! use tower_qwen::timeout::error::IdleTimeout;
//!
//! // An SSE stream that sends one frame, then stalls forever.
//! let upstream = tower::service_fn(|_req: http::Request<String>| async {
//!     let first = Frame::data(Bytes::from_static(b"data: {\"choices\":[]}\n\n"));
//!     let frames = futures_util::stream::iter([Ok::<_, Infallible>(first)])
//!         .chain(futures_util::stream::pending());
//!     let res = http::Response::builder()
//!         .header("content-type", "text/event-stream")
//!         .body(StreamBody::new(frames))
//!         .unwrap();
//!     Ok::<_, Infallible>(res)
//! });
//!
//! let client = ServiceBuilder::new()
//!     .layer(
//!         TimeoutLayer::new()
//!             .header(Duration::from_secs(30))
//!             .idle(Duration::from_secs(20))
//!             .total(Duration::from_secs(300)),
//!     )
//!     .service(upstream);
//!
//! let res = client.oneshot(http::Request::new(String::new())).await.unwrap();
//! let mut body = res.into_body();
//! assert!(body.frame().await.unwrap().unwrap().is_data());
//! let start = tokio::time::Instant::now();
//! let err = body.frame().await.unwrap().unwrap_err();
//! assert!(err.is::<IdleTimeout>());
//! assert_eq!(start.elapsed(), Duration::from_secs(20));
//! # }
//! ```

mod body;
pub mod error;
pub mod future;
mod layer;
mod service;

pub use body::TimeoutBody;
pub use layer::{DEFAULT_IDLE, DEFAULT_TOTAL, TimeoutLayer};
pub use service::Timeout;
