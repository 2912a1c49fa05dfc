//! Work that can wait goes through DashScope's Batch API: half the price,
//! and none of the real-time quota.
//!
//! [`Batch`] is a `tower::Service` that takes ordinary OpenAI-compatible
//! chat and embedding requests and answers each caller with an ordinary
//! `http::Response`, the same type the real-time stack
//! ([`QwenClient`](crate::client::QwenClient)) answers, with the line's
//! status, JSON body and `usage`. Underneath, it writes the requests into
//! JSONL files, one per endpoint and model, uploads each file
//! (`POST /compatible-mode/v1/files`, `multipart/form-data`,
//! `purpose=batch`), creates a batch (`POST /compatible-mode/v1/batches`,
//! `completion_window` 24 h), polls it with backoff, downloads the output and
//! error files and hands every caller the line with its `custom_id`
//! (QWEN-API.md A1, A6: "costs only 50% of real-time calls", processed
//! within the window, outside the RPM/TPM quota).
//!
//! | what | where |
//! |---|---|
//! | the service and its settings | [`Batch`], [`BatchLayer`], [`BatchStats`] |
//! | errors (failed, expired, cancelled, line errors...) | [`error::BatchError`] |
//! | remembering submitted batches; collecting them after a restart | [`BatchStore`], [`FileStore`], [`RedisStore`] (with `redis`), [`Batch::resume`], [`Recovery`] |
//! | routing by urgency | [`Defer`], [`DeferLayer`], [`Deferrable`], [`DEFER_HEADER`] |
//! | choosing a line's id | [`CustomId`], [`CUSTOM_ID_HEADER`] |
//!
//! # Files
//!
//! A request joins the file filling for its (endpoint, model): DashScope
//! wants one model per file (`mismatched_model`) and unique `custom_id`s
//! (`duplicate_custom_id`, QWEN-API.md A2). Ids are made up per process
//! unless the request carries a [`CustomId`] (or the [`CUSTOM_ID_HEADER`]);
//! a request whose id is already in the file sends the file first. A file
//! is sent when it holds [`max_lines`](BatchLayer::max_lines) lines or
//! [`max_bytes`](BatchLayer::max_bytes) bytes, when its first line has
//! waited [`max_wait`](BatchLayer::max_wait), or at once when the service
//! and all its clones are dropped. `batch-test-model` requests go to the
//! dry-run endpoint `/v1/chat/ds-test`.
//!
//! Only what the Batch API takes is accepted: a `POST` to
//! `/compatible-mode/v1/chat/completions` or `/compatible-mode/v1/embeddings`
//! with a buffered JSON body naming a `model`, without `stream: true` (a
//! batch answers whole responses; a stream is never silently turned into a
//! non-stream call), no larger than a line may be. Anything else is refused
//! at once with [`BatchError::is_unsupported`](error::BatchError::is_unsupported).
//! Only the path and the body go into the file: headers of the request are
//! not carried (the Batch API has none per line); the inner service's
//! (e.g. `Authorization` from [`SetUpstream`](crate::client::SetUpstream))
//! apply to the whole batch.
//!
//! # Answers
//!
//! Each line ends in exactly one of:
//!
//! * a **response**, from the output file, or from the error file when the
//!   line got an HTTP error (e.g. `400 invalid_parameter_error`): its status,
//!   `content-type: application/json`, `x-request-id` (the line's
//!   `request_id`), the body, and two extensions, the line's
//!   [`Usage`](crate::usage::Usage) and a [`BatchLine`] (batch id and
//!   `custom_id`);
//! * a [`BatchError`](error::BatchError): the batch failed as a whole
//!   (`is_failed`, with the first validation `code`), expired before the
//!   line ran (`is_expired`), was cancelled before it ran (`is_cancelled`),
//!   the line failed without an HTTP answer (`is_line`, e.g.
//!   `batch_expired`), the batch completed without mentioning the line
//!   (`is_missing`), a Files or Batch API call kept failing
//!   (`is_upstream`, after [`attempts`](BatchLayer::attempts) tries of
//!   transient failures, read by the crate's
//!   [`Classifier`](crate::classify::Classifier)), or the worker stopped
//!   (`is_closed`).
//!
//! # Cancellation
//!
//! A caller that drops its future before its file is sent is left out of
//! the file. One that drops it later only loses its answer. When every
//! caller of a sent batch is gone while the service lives, the batch is
//! cancelled upstream at its next poll (the work is not wanted; DashScope
//! bills the lines already done) and its input file deleted. When the
//! service **and** every caller are gone, as in a process that stops, the
//! batch is left running for [`Batch::resume`].
//!
//! # Restarts
//!
//! Each submitted batch is remembered in the [store](BatchLayer::store)
//! before it is created (its input file id and every `custom_id`), updated
//! with its batch id, and forgotten once every answer was handed out. The
//! default [`FileStore`] writes `tower-qwen-batches.json` in the working
//! directory, atomically; [`RedisStore`] (features `batch` and `redis`)
//! keeps them in a Redis hash. To collect what a previous process
//! submitted, build the service over the same store and call
//! [`Batch::resume`]: it returns a [`Recovery`] that yields every line of
//! those batches, with its `custom_id` (give requests your own
//! [`CustomId`]s to know which is which):
//!
//! ```no_run
//! # async fn f<S>(batch: tower_qwen::batch::Batch<S>) -> Result<(), tower_qwen::BoxError>
//! # where
//! #     S: tower::Service<http::Request<tower_qwen::body::Body>, Response = http::Response<tower_qwen::batch::ResponseBody>> + Clone + Send + 'static,
//! #     S::Future: Send + 'static,
//! #     S::Error: Into<tower_qwen::BoxError>,
//! # {
//! let mut recovery = batch.resume().await?;
//! while let Some(line) = recovery.next().await {
//!     let id = line.custom_id().to_owned();
//!     match line.into_result() {
//!         Ok(res) => println!("{id}: {}", res.status()),
//!         Err(e) => println!("{id}: {e}"),
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! A batch whose input file was uploaded but whose creation was not
//! recorded (a crash in between) is looked up among the recent batches by
//! its input file and created if it is not there. Polls of resumed batches
//! start at once. A record is removed only after its answers were handed
//! out, so a crash in between hands them out again on resume (at least
//! once, never lost). A batch that cannot be polled for now (say, a revoked
//! key: `401`) fails its callers but stays in the store for a later resume;
//! one the API no longer knows (`404`) is forgotten.
//!
//! # Routing by urgency
//!
//! [`Defer`] (made by [`DeferLayer`]) sends requests marked
//! [`Deferrable`] (the extension, or `x-tower-qwen-defer: 1`) to a `Batch`
//! and the others to the real-time stack, so one client serves both and the
//! caller decides per request.
//!
//! # How it differs
//!
//! tower has nothing like it; [`Coalesce`](crate::coalesce) merges
//! concurrent embedding calls into one real-time request (milliseconds,
//! full price, counted by the quota), this defers work by hours for half the
//! price outside the quota. The inner service should resolve path-only
//! URIs and authenticate ([`SetUpstream`](crate::client::SetUpstream) over
//! the transport, or a whole [`QwenClient`](crate::client::QwenClient),
//! whose rate limiter then paces the Files and Batch API calls, which carry
//! no model).
//!
//! **Inferred** (the shapes follow OpenAI's Batch and Files APIs, which
//! DashScope says it is compatible with; QWEN-API.md does not list them):
//! the batch and file objects and statuses, the output line shape
//! `{"id","custom_id","response":{"status_code","request_id","body"},"error"}`,
//! `GET /files/{id}/content`, batch listing with `after`/`limit` (used to
//! find a batch whose creation was not recorded), and `metadata` on batch
//! creation (`{"tower_qwen_job": ..}`). DashScope's caps on a file (50,000
//! lines, 500 MB, 6 MB per line) come from its batch documentation page.
//!
//! # Example
//!
//! A classification that can wait goes through the Batch API of the mock
//! DashScope, and uses none of its real-time quota:
//!
//! ```
//! # #[cfg(not(all(feature = "client", feature = "mock")))] fn main() {}
//! # #[cfg(all(feature = "client", feature = "mock"))]
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), tower_qwen::BoxError> {
//! use std::time::Duration;
//! use tower::{Layer, ServiceExt};
//! use tower_qwen::batch::{BatchLayer, DeferLayer, Deferrable, FileStore};
//! use tower_qwen::client::{ApiKey, ChatRequest, QwenClient, SetUpstreamLayer, TransportConfig};
//! use tower_qwen::mock::{BatchTiming, MockDashScope};
//!
//! let mock = MockDashScope::builder()
//!     .key("sk-demo", "acct")
//!     .batch_timing(BatchTiming::default().in_progress(Duration::from_secs(60)))
//!     .start()
//!     .await?;
//! let base = mock.base_url().parse()?;
//!
//! // The Batch API over the plain transport with the key.
//! let transport = SetUpstreamLayer::new(mock.base_url().parse()?, ApiKey::new("sk-demo")?)
//!     .layer(TransportConfig::new().build());
//! # let dir = std::env::temp_dir().join(format!("tq-batch-doc-{}", std::process::id()));
//! let batch = BatchLayer::new()
//!     .max_wait(Duration::from_secs(5))
//!     .store(FileStore::new(dir.join("batches.json")))
//!     .layer(transport);
//! // Deferrable requests there, the others through the real-time stack.
//! let client = DeferLayer::new(batch)
//!     .layer(QwenClient::builder().base_url(base).api_key("sk-demo")?.build()?);
//!
//! let mut req = ChatRequest::new("qwen-plus").user("Classify: 'great product'").into_request();
//! Deferrable::mark(&mut req);
//! let res = client.oneshot(req).await?;
//! assert_eq!(res.status(), 200);
//! assert!(res.extensions().get::<tower_qwen::usage::Usage>().is_some());
//! assert_eq!(mock.stats().admitted("qwen-plus"), 0); // no real-time quota used
//! assert_eq!(mock.batch_stats().lines_succeeded, 1);
//! # let _ = std::fs::remove_dir_all(&dir);
//! # Ok(()) }
//! ```

mod api;
pub mod error;
pub mod future;
mod layer;
mod line;
mod route;
mod service;
mod store;
mod worker;

pub use self::layer::BatchLayer;
pub use self::line::{CUSTOM_ID_HEADER, CustomId};
pub use self::route::{DEFER_HEADER, Defer, DeferLayer, Deferrable};
pub use self::service::{Batch, BatchStats, ResponseBody};
#[cfg(feature = "redis")]
pub use self::store::RedisStore;
pub use self::store::{BatchStore, DEFAULT_STORE_PATH, FileStore, Record, StoreFuture};
pub use self::worker::{BatchLine, Recovered, Recovery};
