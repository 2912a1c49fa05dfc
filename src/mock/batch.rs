//! The OpenAI-compatible Batch API and the Files API it reads from
//! (`/compatible-mode/v1/files`, `/compatible-mode/v1/batches`, QWEN-API.md
//! A1 and A6).
//!
//! A client uploads a JSONL file (`multipart/form-data`, `purpose=batch`),
//! creates a batch from it, polls the batch until it is terminal, and reads
//! the output and error files. The mock follows OpenAI's wire shapes, which
//! DashScope copies: the file object, the batch object with its `status`
//! (`validating`, `in_progress`, `finalizing`, `completed`, `failed`,
//! `expired`, `cancelling`, `cancelled`), `request_counts`,
//! `output_file_id`, `error_file_id`, and result lines
//! `{"id","custom_id","response":{"status_code","request_id","body"},"error"}`.
//!
//! **Time.** A batch's status is a function of tokio's clock since it was
//! created ([`BatchTiming`]), so paused-time tests step through it with
//! `tokio::time::advance`. Lines run when a client first observes the batch
//! in a terminal state, through the mock's own chat and embedding handlers
//! (the same bodies a real-time call gets), with no quota, no burst guard
//! and no fault (neither random nor [scripted](super::Script): those play
//! on real-time calls): batch work never shows in the real-time counters
//! ([`Stats`](super::Stats)); it has its own ([`BatchStats`]).
//!
//! **Validation** (a batch that fails it goes `validating` → `failed`, with
//! `errors.data[{code, message, param, line}]`): `mismatched_model` (all
//! lines must name one model), `duplicate_custom_id`, `model_not_found` (a
//! model the mock does not serve at the batch's endpoint, or outside
//! [`batch_models`](super::MockDashScopeBuilder::batch_models)); these three
//! codes are DashScope's (QWEN-API.md A2). Inferred, with OpenAI's names
//! where it has one: `invalid_json_line` (a line that is not a JSON object
//! with a string `custom_id`, `method: "POST"`, a `url` and a `body` object
//! with a `model`), `mismatched_url` (a line's `url` differs from the
//! batch's `endpoint`), `empty_file`, `too_many_lines` (over 50,000),
//! `line_too_large` (over 6 MB; both caps from the Model Studio batch page),
//! and for the dry run `test_file_too_large` (`batch-test-model` files are at
//! most 1 MB and 100 lines).
//!
//! **The dry run.** `batch-test-model` with `url` and `endpoint`
//! `/v1/chat/ds-test` validates and walks through the states without
//! inference: each line answers a fixed test completion with zero usage
//! (the content is inferred). At most 2 test batches of an account run at
//! once; a third is refused with `429 limit_requests` (the code is
//! inferred).
//!
//! **Injected failures** ([`BatchFault`]): a batch that expires at the end
//! of its completion window with part of its lines done, one that fails,
//! one that completes with every n-th line failed.
//!
//! **Inferred details**, not documented by DashScope: expired and cancelled
//! batches list their unfinished lines in the error file with `error.code`
//! `batch_expired` / `batch_cancelled` and `response: null` (OpenAI does so
//! for expired ones); a line answered with an HTTP error is in the error
//! file with its `response` and also `error.{code,message}` from its body;
//! `completion_window` accepts `24h` to `336h` (or `1d` to `14d`); list
//! endpoints page newest first with `after` and `limit` (at most 100); a
//! line asking for `stream: true` fails with `400 invalid_parameter_error`.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use bytes::Bytes;
//! use http_body_util::{BodyExt, Full};
//! use hyper_util::client::legacy::Client;
//! use hyper_util::rt::TokioExecutor;
//! use serde_json::{Value, json};
//! use tower_qwen::mock::{BatchTiming, MockDashScope};
//!
//! let mock = MockDashScope::builder().batch_timing(BatchTiming::default()).start().await?;
//! let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
//! let call = |path: &str, content_type: String, body: String| {
//!     let req = http::Request::post(format!("{}{path}", mock.compatible_base_url()))
//!         .header("authorization", "Bearer sk-mock")
//!         .header("content-type", content_type)
//!         .body(Full::from(body))
//!         .unwrap();
//!     let client = client.clone();
//!     async move {
//!         let res = client.request(req).await.unwrap();
//!         serde_json::from_slice::<Value>(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
//!     }
//! };
//! let line = json!({"custom_id": "1", "method": "POST", "url": "/v1/chat/completions",
//!     "body": {"model": "qwen-plus", "messages": [{"role": "user", "content": "Hi"}]}});
//! let form = format!(
//!     "--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
//!      --B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n{line}\n\r\n--B--\r\n"
//! );
//! let file = call("/files", "multipart/form-data; boundary=B".into(), form).await;
//! let create = json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"});
//! let batch = call("/batches", "application/json".into(), create.to_string()).await;
//! assert_eq!(batch["status"], "validating");
//!
//! tokio::time::advance(std::time::Duration::from_secs(12)).await; // validating + in progress + finalizing
//! let id = batch["id"].as_str().unwrap();
//! let req = http::Request::get(format!("{}/batches/{id}", mock.compatible_base_url()))
//!     .header("authorization", "Bearer sk-mock")
//!     .body(Full::default())?;
//! let batch: Value = serde_json::from_slice(&client.request(req).await?.into_body().collect().await?.to_bytes())?;
//! assert_eq!(batch["status"], "completed");
//! assert_eq!(batch["request_counts"]["completed"], 1);
//! assert_eq!(mock.stats().admitted("qwen-plus"), 0); // no real-time quota used
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::multipart::MultipartRejection;
use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::OnceCell;
use tower_service::Service;

use super::config::Quota;
use super::error::ApiError;
use super::models::ModelKind;
use super::script::Script;
use super::server::ConnCtl;
use super::state::{Config, KeyEntry, Shared, request_rng, uuid};
use super::{MockDashScopeBuilder, MockHandle};
use crate::request::Protocol;
use crate::time::{self, Instant};
use crate::usage::Usage;

const FILES: &str = "/compatible-mode/v1/files";
const BATCHES: &str = "/compatible-mode/v1/batches";
const CHAT_URL: &str = "/v1/chat/completions";
const EMBEDDINGS_URL: &str = "/v1/embeddings";
const TEST_URL: &str = "/v1/chat/ds-test";
const TEST_MODEL: &str = "batch-test-model";
const MAX_LINES: usize = 50_000;
const MAX_LINE_BYTES: usize = 6_000_000;
const MAX_TEST_BYTES: usize = 1_000_000;
const MAX_TEST_LINES: usize = 100;
const MAX_TEST_JOBS: usize = 2;
const MAX_FILES: usize = 10_000;
const MAX_BATCHES: usize = 10_000;
const MAX_ERRORS: usize = 100;

// ---------------------------------------------------------------------------
// Public configuration.

/// How long a mock batch spends in each state, on tokio's clock.
///
/// A batch is `validating` for [`validating`](Self::validating), then
/// `in_progress` for [`in_progress`](Self::in_progress) plus
/// [`per_line`](Self::per_line) per line (its `request_counts.completed`
/// grows linearly meanwhile), then `finalizing` for
/// [`finalizing`](Self::finalizing), then `completed`. A cancelled batch is
/// `cancelling` for [`cancelling`](Self::cancelling), then `cancelled`.
///
/// # Default
///
/// 1 s validating, 10 s in progress, nothing per line, 1 s finalizing, 1 s
/// cancelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchTiming {
    validating: Duration,
    in_progress: Duration,
    per_line: Duration,
    finalizing: Duration,
    cancelling: Duration,
}

impl Default for BatchTiming {
    fn default() -> Self {
        Self {
            validating: Duration::from_secs(1),
            in_progress: Duration::from_secs(10),
            per_line: Duration::ZERO,
            finalizing: Duration::from_secs(1),
            cancelling: Duration::from_secs(1),
        }
    }
}

impl BatchTiming {
    /// Every state passes at once: a batch is `completed` as soon as it is
    /// looked at again.
    pub const fn instant() -> Self {
        Self {
            validating: Duration::ZERO,
            in_progress: Duration::ZERO,
            per_line: Duration::ZERO,
            finalizing: Duration::ZERO,
            cancelling: Duration::ZERO,
        }
    }

    /// Time in `validating`.
    ///
    /// Default is 1 s.
    pub const fn validating(mut self, d: Duration) -> Self {
        self.validating = d;
        self
    }

    /// Time in `in_progress`, before the per-line time.
    ///
    /// Default is 10 s.
    pub const fn in_progress(mut self, d: Duration) -> Self {
        self.in_progress = d;
        self
    }

    /// Time in `in_progress` added per line.
    ///
    /// Default is zero.
    pub const fn per_line(mut self, d: Duration) -> Self {
        self.per_line = d;
        self
    }

    /// Time in `finalizing`.
    ///
    /// Default is 1 s.
    pub const fn finalizing(mut self, d: Duration) -> Self {
        self.finalizing = d;
        self
    }

    /// Time in `cancelling` after a cancel request.
    ///
    /// Default is 1 s.
    pub const fn cancelling(mut self, d: Duration) -> Self {
        self.cancelling = d;
        self
    }

    fn running(&self, lines: usize) -> Duration {
        let per_line = self
            .per_line
            .checked_mul(u32::try_from(lines).unwrap_or(u32::MAX))
            .unwrap_or(Duration::MAX);
        self.in_progress.saturating_add(per_line)
    }
}

/// A failure injected into every batch created while it is set (see
/// [`MockDashScopeBuilder::batch_fault`] and [`MockHandle::set_batch_fault`]).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum BatchFault {
    /// The batch runs the first `completed` fraction (0 to 1) of its lines
    /// during `in_progress`, then stays `in_progress` until its completion
    /// window ends and is `expired`: the lines done are in the output file,
    /// the others in the error file with `error.code` `batch_expired`.
    Expire {
        /// The fraction of lines done before the window ends.
        completed: f64,
    },
    /// The batch is `failed` at the end of `in_progress`, with this error
    /// in `errors.data`, and no output.
    Fail {
        /// `errors.data[0].code`.
        code: String,
        /// `errors.data[0].message`.
        message: String,
    },
    /// The batch completes, but every `every`-th line (the `every`-th, the
    /// `2 × every`-th, ...) is answered with `error` (its status and
    /// compatible body) in the error file.
    FailLines {
        /// The period of failed lines.
        every: NonZeroU32,
        /// The answer of a failed line.
        error: ApiError,
    },
}

/// Counters of the mock's Files and Batch APIs, from
/// [`MockHandle::batch_stats`]. Batch lines are never counted in
/// [`Stats`](super::Stats) (the real-time counters): they use no real-time
/// quota.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Files uploaded.
    pub files_uploaded: u64,
    /// Bytes uploaded.
    pub bytes_uploaded: u64,
    /// Batches created.
    pub batches_created: u64,
    /// Batches that ended `completed`.
    pub batches_completed: u64,
    /// Batches that ended `failed` (validation or an injected failure).
    pub batches_failed: u64,
    /// Batches that ended `expired`.
    pub batches_expired: u64,
    /// Batches that ended `cancelled`.
    pub batches_cancelled: u64,
    /// Lines answered with a success (in output files).
    pub lines_succeeded: u64,
    /// Lines in error files (HTTP errors, expired or cancelled lines).
    pub lines_failed: u64,
    /// Input tokens of the lines run.
    pub input_tokens: u64,
    /// Output tokens of the lines run.
    pub output_tokens: u64,
}

/// The batch settings in the mock's configuration.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    timing: BatchTiming,
    fault: Option<BatchFault>,
    models: Option<HashSet<String>>,
    file_limit: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            timing: BatchTiming::default(),
            fault: None,
            models: None,
            file_limit: 500_000_000,
        }
    }
}

impl MockDashScopeBuilder {
    /// How long batches spend in each state.
    ///
    /// Default is [`BatchTiming::default`].
    pub fn batch_timing(mut self, timing: BatchTiming) -> Self {
        self.cfg.batch.timing = timing;
        self
    }

    /// A failure injected into every batch created; `None` for none.
    ///
    /// Default is `None`.
    pub fn batch_fault(mut self, fault: impl Into<Option<BatchFault>>) -> Self {
        self.cfg.batch.fault = fault.into();
        self
    }

    /// The models the Batch API accepts; others fail validation with
    /// `model_not_found`.
    ///
    /// Default is every model the mock serves.
    pub fn batch_models<I>(mut self, models: I) -> Self
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        self.cfg.batch.models = Some(models.into_iter().map(Into::into).collect());
        self
    }

    /// The largest file upload accepted; larger ones get `413`.
    ///
    /// Default is 500 MB (DashScope's cap for a batch file).
    pub fn batch_file_limit(mut self, bytes: usize) -> Self {
        self.cfg.batch.file_limit = bytes;
        self
    }
}

impl MockHandle {
    /// A snapshot of the Files and Batch API counters.
    pub fn batch_stats(&self) -> BatchStats {
        self.shared.batches.lock().stats.clone()
    }

    /// Sets the state timings of batches created from now on.
    pub fn set_batch_timing(&self, timing: BatchTiming) {
        self.shared.cfg_mut().batch.timing = timing;
    }

    /// Sets (or with `None` clears) the failure injected into batches
    /// created from now on.
    pub fn set_batch_fault(&self, fault: impl Into<Option<BatchFault>>) {
        self.shared.cfg_mut().batch.fault = fault.into();
    }
}

// ---------------------------------------------------------------------------
// State.

/// Files and batches of every account.
#[derive(Debug, Default)]
pub(crate) struct Store(Mutex<Inner>);

#[derive(Debug, Default)]
pub(crate) struct Inner {
    files: HashMap<String, Arc<StoredFile>>,
    /// File ids, oldest first.
    file_order: Vec<String>,
    batches: HashMap<String, Job>,
    /// Batch ids, oldest first.
    batch_order: Vec<String>,
    stats: BatchStats,
}

impl Store {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct StoredFile {
    id: String,
    account: Arc<str>,
    filename: String,
    purpose: &'static str,
    created_at: u64,
    content: Bytes,
}

impl StoredFile {
    fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.content.len(),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        })
    }
}

/// One line of an input file that passed validation.
#[derive(Debug)]
struct InLine {
    custom_id: String,
    body: Bytes,
    stream: bool,
}

#[derive(Debug)]
enum Plan {
    Valid { lines: Vec<InLine>, test: bool },
    Invalid(Vec<Value>),
}

impl Plan {
    fn total(&self) -> usize {
        match self {
            Self::Valid { lines, .. } => lines.len(),
            Self::Invalid(_) => 0,
        }
    }
}

/// What a terminal batch produced.
#[derive(Debug)]
struct Finished {
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    completed: u64,
    failed: u64,
}

#[derive(Clone, Debug)]
struct Job {
    id: String,
    account: Arc<str>,
    /// The API key the lines run with.
    key: String,
    input_file_id: String,
    endpoint: String,
    window: (String, Duration),
    metadata: Value,
    created: Instant,
    created_at: u64,
    plan: Arc<Plan>,
    fault: Option<BatchFault>,
    timing: BatchTiming,
    cancel_at: Option<Instant>,
    finished: Arc<OnceCell<Finished>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Self::Validating => "validating",
            Self::Failed => "failed",
            Self::InProgress => "in_progress",
            Self::Finalizing => "finalizing",
            Self::Completed => "completed",
            Self::Expired => "expired",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
        }
    }

    fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Failed | Self::Completed | Self::Expired | Self::Cancelled
        )
    }
}

/// A batch at one instant.
#[derive(Debug)]
struct View {
    status: Status,
    /// Lines run (or, before a terminal state, run so far).
    done: usize,
    in_progress_at: Option<Instant>,
    finalizing_at: Option<Instant>,
    terminal_at: Option<Instant>,
}

impl Job {
    fn fraction(&self) -> f64 {
        match &self.fault {
            Some(BatchFault::Expire { completed }) if completed.is_finite() => {
                completed.clamp(0.0, 1.0)
            }
            Some(BatchFault::Expire { .. }) => 0.0,
            _ => 1.0,
        }
    }

    /// Lines done by `t`, while running from `start` for `running`.
    fn progress(&self, t: Instant, start: Instant, running: Duration) -> usize {
        let total = self.plan.total();
        let target = (total as f64 * self.fraction()).floor() as usize;
        if t < start {
            return 0;
        }
        if running.is_zero() || t - start >= running {
            return target;
        }
        let share = (t - start).as_secs_f64() / running.as_secs_f64();
        ((target as f64) * share).floor() as usize
    }

    fn view(&self, now: Instant) -> View {
        let t = &self.timing;
        let total = self.plan.total();
        let validated = self.created + t.validating;
        let running = t.running(total);
        let run_end = validated + running;
        let expiry = self.created + self.window.1;
        let mut v = View {
            status: Status::Validating,
            done: 0,
            in_progress_at: None,
            finalizing_at: None,
            terminal_at: None,
        };
        // Cancellation (only ever set while the batch was not terminal).
        if let Some(c) = self.cancel_at {
            if c > validated {
                v.in_progress_at = Some(validated);
            }
            v.done = if c > validated {
                self.progress(c.min(expiry), validated, running)
            } else {
                0
            };
            if now < c + t.cancelling {
                v.status = Status::Cancelling;
            } else {
                v.status = Status::Cancelled;
                v.terminal_at = Some(c + t.cancelling);
            }
            return v;
        }
        if now < validated {
            return v;
        }
        if matches!(*self.plan, Plan::Invalid(_)) {
            v.status = Status::Failed;
            v.terminal_at = Some(validated);
            return v;
        }
        v.in_progress_at = Some(validated);
        match &self.fault {
            Some(BatchFault::Fail { .. }) => {
                if now < run_end {
                    v.status = Status::InProgress;
                } else {
                    v.status = Status::Failed;
                    v.terminal_at = Some(run_end);
                }
            }
            Some(BatchFault::Expire { .. }) => {
                v.done = self.progress(now.min(expiry), validated, running);
                if now < expiry {
                    v.status = Status::InProgress;
                } else {
                    v.status = Status::Expired;
                    v.terminal_at = Some(expiry);
                }
            }
            _ => {
                v.done = self.progress(now, validated, running);
                if now < run_end {
                    v.status = Status::InProgress;
                } else if now < run_end + t.finalizing {
                    v.status = Status::Finalizing;
                    v.finalizing_at = Some(run_end);
                } else {
                    v.status = Status::Completed;
                    v.finalizing_at = Some(run_end);
                    v.terminal_at = Some(run_end + t.finalizing);
                }
            }
        }
        v
    }

    /// Whether line `i` (0-based) fails by the injected fault.
    fn line_fails(&self, i: usize) -> Option<&ApiError> {
        match &self.fault {
            Some(BatchFault::FailLines { every, error })
                if (i + 1).is_multiple_of(every.get() as usize) =>
            {
                Some(error)
            }
            _ => None,
        }
    }

    fn unix(&self, t: Instant) -> u64 {
        self.created_at + t.saturating_duration_since(self.created).as_secs()
    }

    /// The batch object at `now`; `finished` once the batch is terminal
    /// and has run.
    fn object(&self, view: &View, finished: Option<&Finished>) -> Value {
        let ts = |t: Option<Instant>| t.map(|t| self.unix(t));
        let status = view.status;
        let at = |s: Status| {
            if status == s {
                ts(view.terminal_at)
            } else {
                None
            }
        };
        let total = if matches!(status, Status::Validating) && self.cancel_at.is_none() {
            0
        } else {
            self.plan.total()
        };
        let (completed, failed) = match finished {
            Some(f) => (f.completed, f.failed),
            None => {
                let failed = (0..view.done)
                    .filter(|&i| self.line_fails(i).is_some())
                    .count();
                ((view.done - failed) as u64, failed as u64)
            }
        };
        let errors = match (&*self.plan, &self.fault, status) {
            (Plan::Invalid(errs), _, Status::Failed) => json!({ "object": "list", "data": errs }),
            (_, Some(BatchFault::Fail { code, message }), Status::Failed) => json!({
                "object": "list",
                "data": [{ "code": code, "message": message, "param": null, "line": null }],
            }),
            _ => Value::Null,
        };
        let cancelling_at = self.cancel_at.map(|c| self.unix(c));
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.window.0,
            "status": status.as_str(),
            "output_file_id": finished.and_then(|f| f.output_file_id.clone()),
            "error_file_id": finished.and_then(|f| f.error_file_id.clone()),
            "created_at": self.created_at,
            "in_progress_at": ts(view.in_progress_at),
            "expires_at": self.created_at + self.window.1.as_secs(),
            "finalizing_at": ts(view.finalizing_at),
            "completed_at": at(Status::Completed),
            "failed_at": at(Status::Failed),
            "expired_at": at(Status::Expired),
            "cancelling_at": cancelling_at,
            "cancelled_at": at(Status::Cancelled),
            "request_counts": { "total": total, "completed": completed, "failed": failed },
            "metadata": self.metadata,
        })
    }
}

// ---------------------------------------------------------------------------
// Routes.

type St = State<Arc<Shared>>;

/// The Files and Batch routes, merged into the mock's router.
pub(crate) fn routes(shared: &Shared) -> Router<Arc<Shared>> {
    let limit = shared.cfg().batch.file_limit;
    Router::new()
        .route(
            FILES,
            post(upload)
                .get(list_files)
                .layer(DefaultBodyLimit::max(limit)),
        )
        .route(
            &format!("{FILES}/{{id}}"),
            get(get_file).delete(delete_file),
        )
        .route(&format!("{FILES}/{{id}}/content"), get(file_content))
        .route(BATCHES, post(create).get(list_batches))
        .route(&format!("{BATCHES}/{{id}}"), get(retrieve))
        .route(&format!("{BATCHES}/{{id}}/cancel"), post(cancel))
}

/// One request's id and helpers.
struct Call {
    shared: Arc<Shared>,
    rid: String,
}

impl Call {
    fn new(shared: Arc<Shared>) -> Self {
        let seq = shared.next_seq();
        let seed = shared.cfg().seed;
        let rid = uuid(&mut request_rng(seed, seq, 1));
        Self { shared, rid }
    }

    fn id(&self, prefix: &str) -> String {
        let seq = self.shared.next_seq();
        let seed = self.shared.cfg().seed;
        format!("{prefix}{}", uuid(&mut request_rng(seed, seq, 3)))
    }

    fn reply(&self, status: StatusCode, content_type: &'static str, body: Bytes) -> Response {
        let mut res = Response::new(Body::from(body));
        *res.status_mut() = status;
        let h = res.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        if let Ok(v) = HeaderValue::from_str(&self.rid) {
            h.insert("x-request-id", v);
        }
        res
    }

    fn json(&self, v: &Value) -> Response {
        self.reply(
            StatusCode::OK,
            "application/json",
            Bytes::from(v.to_string()),
        )
    }

    fn error(&self, e: &ApiError) -> Response {
        self.shared
            .counters
            .code(e.counted_code(Protocol::Compatible));
        self.reply(
            e.status(),
            "application/json",
            e.body(Protocol::Compatible, &self.rid),
        )
    }

    /// The caller's key and its account.
    fn auth(&self, headers: &HeaderMap) -> Result<(String, KeyEntry), ApiError> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, rest) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .ok_or_else(ApiError::invalid_api_key)?;
        let entry = self
            .shared
            .cfg()
            .key(key)
            .ok_or_else(ApiError::invalid_api_key)?;
        if let Some(e) = entry.state.error() {
            return Err(e);
        }
        Ok((key.to_owned(), entry))
    }
}

fn not_found(what: &str, id: &str) -> ApiError {
    let msg = format!("No {what} found with id '{id}'.");
    ApiError::new(StatusCode::NOT_FOUND, "NotFound", msg.clone()).with_compat(
        "not_found",
        "invalid_request_error",
        msg,
    )
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::invalid_parameter(message.into())
}

#[derive(Debug, Default, Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

/// A page of `items` (oldest first), newest first, starting after `after`.
fn page<'a>(ids: impl DoubleEndedIterator<Item = &'a String>, page: &Page) -> (Vec<String>, bool) {
    let limit = page.limit.unwrap_or(20).clamp(1, 100);
    let mut it = ids.rev().peekable();
    if let Some(after) = &page.after {
        for id in it.by_ref() {
            if id == after {
                break;
            }
        }
    }
    let out: Vec<String> = it.by_ref().take(limit).cloned().collect();
    let more = it.peek().is_some();
    (out, more)
}

fn list(data: Vec<Value>, more: bool) -> Value {
    let first = data.first().and_then(|v| v.get("id")).cloned();
    let last = data.last().and_then(|v| v.get("id")).cloned();
    json!({ "object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more })
}

// ---------------------------------------------------------------------------
// Files.

async fn upload(
    State(shared): St,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    let call = Call::new(shared.clone());
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    let mut form = match form {
        Ok(f) => f,
        Err(_) => {
            return call.error(&bad_request(
                "The request must be multipart/form-data with a 'file' and a 'purpose'.",
            ));
        }
    };
    let (mut file, mut purpose) = (None, None);
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return call.error(&if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::request_too_large()
                } else {
                    bad_request("The multipart body is malformed.")
                });
            }
        };
        let name = field.name().unwrap_or_default().to_owned();
        let filename = field.file_name().map(str::to_owned);
        let bytes = match field.bytes().await {
            Ok(b) => b,
            Err(e) => {
                return call.error(&if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::request_too_large()
                } else {
                    bad_request("The multipart body is malformed.")
                });
            }
        };
        match name.as_str() {
            "file" => file = Some((filename.unwrap_or_else(|| "upload.jsonl".into()), bytes)),
            "purpose" => purpose = Some(String::from_utf8_lossy(&bytes).trim().to_owned()),
            _ => {}
        }
    }
    let Some((filename, content)) = file else {
        return call.error(&bad_request("'file' must be provided."));
    };
    match purpose.as_deref() {
        Some("batch") => {}
        None => return call.error(&bad_request("'purpose' must be provided.")),
        Some(p) => {
            return call.error(&bad_request(format!(
                "'purpose' must be 'batch' on this mock, got '{p}'."
            )));
        }
    }
    let id = call.id("file-batch-");
    let f = Arc::new(StoredFile {
        id: id.clone(),
        account,
        filename,
        purpose: "batch",
        created_at: shared.created(),
        content,
    });
    let object = f.object();
    let mut store = shared.batches.lock();
    if store.files.len() >= MAX_FILES {
        drop(store);
        return call.error(&bad_request(format!(
            "The file count limit ({MAX_FILES}) is reached; delete files first."
        )));
    }
    store.stats.files_uploaded += 1;
    store.stats.bytes_uploaded += f.content.len() as u64;
    store.files.insert(id.clone(), f);
    store.file_order.push(id);
    drop(store);
    call.json(&object)
}

/// `id` if `account` owns it.
fn owned_file(shared: &Shared, id: &str, account: &str) -> Option<Arc<StoredFile>> {
    shared
        .batches
        .lock()
        .files
        .get(id)
        .filter(|f| &*f.account == account)
        .cloned()
}

async fn list_files(
    State(shared): St,
    headers: HeaderMap,
    q: Result<Query<Page>, QueryRejection>,
) -> Response {
    let call = Call::new(shared.clone());
    let Ok(Query(q)) = q else {
        return call.error(&bad_request("'after' must be an id and 'limit' a number."));
    };
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    let store = shared.batches.lock();
    let mine = store
        .file_order
        .iter()
        .filter(|id| store.files.get(*id).is_some_and(|f| f.account == account));
    let (ids, more) = page(mine, &q);
    let data = ids
        .iter()
        .filter_map(|id| store.files.get(id))
        .map(|f| f.object())
        .collect();
    drop(store);
    call.json(&list(data, more))
}

async fn get_file(State(shared): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let call = Call::new(shared.clone());
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    match owned_file(&shared, &id, &account) {
        Some(f) => call.json(&f.object()),
        None => call.error(&not_found("file", &id)),
    }
}

async fn delete_file(State(shared): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let call = Call::new(shared.clone());
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    let mut store = shared.batches.lock();
    if store.files.get(&id).is_none_or(|f| f.account != account) {
        drop(store);
        return call.error(&not_found("file", &id));
    }
    store.files.remove(&id);
    store.file_order.retain(|f| f != &id);
    drop(store);
    call.json(&json!({ "id": id, "object": "file", "deleted": true }))
}

async fn file_content(State(shared): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let call = Call::new(shared.clone());
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    match owned_file(&shared, &id, &account) {
        Some(f) => call.reply(
            StatusCode::OK,
            "application/octet-stream",
            f.content.clone(),
        ),
        None => call.error(&not_found("file", &id)),
    }
}

// ---------------------------------------------------------------------------
// Batches.

#[derive(Debug, Deserialize)]
struct CreateBody {
    input_file_id: Option<String>,
    endpoint: Option<String>,
    completion_window: Option<String>,
    metadata: Option<Value>,
}

/// `24h` to `336h`, or `1d` to `14d`.
fn parse_window(s: &str) -> Option<Duration> {
    let (n, unit) = s.split_at(s.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    let hours = match unit {
        "h" => n,
        "d" => n.checked_mul(24)?,
        _ => return None,
    };
    (24..=336)
        .contains(&hours)
        .then(|| Duration::from_secs(hours * 3600))
}

fn line_error(code: &str, message: String, line: usize) -> Value {
    json!({ "code": code, "message": message, "param": null, "line": line })
}

/// Validates an input file against the batch's endpoint.
fn validate(content: &[u8], endpoint: &str, cfg: &Config) -> Plan {
    let test = endpoint == TEST_URL;
    let kind = if endpoint == EMBEDDINGS_URL {
        ModelKind::Embedding
    } else {
        ModelKind::Chat
    };
    let mut errors = Vec::new();
    let push = |errors: &mut Vec<Value>, e: Value| {
        if errors.len() < MAX_ERRORS {
            errors.push(e);
        }
    };
    if test && content.len() > MAX_TEST_BYTES {
        push(
            &mut errors,
            json!({ "code": "test_file_too_large", "message": format!("A {TEST_MODEL} file is at most 1 MB."), "param": null, "line": null }),
        );
    }
    let mut lines = Vec::new();
    let mut ids = HashSet::new();
    let mut model: Option<String> = None;
    for (i, raw) in content.split(|&b| b == b'\n').enumerate() {
        let n = i + 1;
        let raw = raw.trim_ascii();
        if raw.is_empty() {
            continue;
        }
        if raw.len() > MAX_LINE_BYTES {
            push(
                &mut errors,
                line_error("line_too_large", "A line is at most 6 MB.".into(), n),
            );
            continue;
        }
        let parsed = serde_json::from_slice::<Map<String, Value>>(raw)
            .ok()
            .and_then(|o| {
                let custom_id = o.get("custom_id")?.as_str()?.to_owned();
                let method = o.get("method")?.as_str()?;
                let url = o.get("url")?.as_str()?.to_owned();
                let body = o.get("body")?.as_object()?;
                let m = body.get("model")?.as_str()?.to_owned();
                let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
                (method == "POST" && !custom_id.is_empty())
                    .then(|| (custom_id, url, m, stream, Value::Object(body.clone())))
            });
        let Some((custom_id, url, m, stream, body)) = parsed else {
            push(
                &mut errors,
                line_error(
                    "invalid_json_line",
                    "Each line must be a JSON object with a string custom_id, method \"POST\", a url and a body with a model.".into(),
                    n,
                ),
            );
            continue;
        };
        if url != endpoint {
            push(
                &mut errors,
                line_error(
                    "mismatched_url",
                    format!("The line's url '{url}' differs from the batch endpoint '{endpoint}'."),
                    n,
                ),
            );
        }
        match &model {
            None => {
                let known = if test {
                    m == TEST_MODEL
                } else {
                    m != TEST_MODEL
                        && cfg.model_for(&m, kind, Protocol::Compatible).is_ok()
                        && cfg.batch.models.as_ref().is_none_or(|s| s.contains(&m))
                };
                if !known {
                    push(
                        &mut errors,
                        line_error(
                            "model_not_found",
                            format!(
                                "The model `{m}` does not exist or does not support batch calls."
                            ),
                            n,
                        ),
                    );
                }
                model = Some(m);
            }
            Some(first) if *first != m => push(
                &mut errors,
                line_error(
                    "mismatched_model",
                    format!("All lines must use the same model: found '{m}' after '{first}'."),
                    n,
                ),
            ),
            Some(_) => {}
        }
        if !ids.insert(custom_id.clone()) {
            push(
                &mut errors,
                line_error(
                    "duplicate_custom_id",
                    format!("The custom_id '{custom_id}' is used by an earlier line."),
                    n,
                ),
            );
        }
        lines.push(InLine {
            custom_id,
            body: Bytes::from(body.to_string()),
            stream,
        });
    }
    if lines.is_empty() && errors.is_empty() {
        push(
            &mut errors,
            json!({ "code": "empty_file", "message": "The input file has no request.", "param": null, "line": null }),
        );
    }
    if lines.len() > MAX_LINES {
        push(
            &mut errors,
            json!({ "code": "too_many_lines", "message": format!("A batch file holds at most {MAX_LINES} requests."), "param": null, "line": null }),
        );
    }
    if test && lines.len() > MAX_TEST_LINES {
        push(
            &mut errors,
            json!({ "code": "test_file_too_large", "message": format!("A {TEST_MODEL} file holds at most {MAX_TEST_LINES} lines."), "param": null, "line": null }),
        );
    }
    if errors.is_empty() {
        Plan::Valid { lines, test }
    } else {
        Plan::Invalid(errors)
    }
}

async fn create(
    State(shared): St,
    headers: HeaderMap,
    body: Result<axum::Json<CreateBody>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let call = Call::new(shared.clone());
    let (key, entry) = match call.auth(&headers) {
        Ok(k) => k,
        Err(e) => return call.error(&e),
    };
    let Ok(axum::Json(body)) = body else {
        return call.error(&bad_request(
            "The request body must be a JSON object with input_file_id, endpoint and completion_window.",
        ));
    };
    let Some(input_file_id) = body.input_file_id.filter(|s| !s.is_empty()) else {
        return call.error(&bad_request("'input_file_id' must be provided."));
    };
    let endpoint = body.endpoint.unwrap_or_default();
    if ![CHAT_URL, EMBEDDINGS_URL, TEST_URL].contains(&endpoint.as_str()) {
        return call.error(&bad_request(format!(
            "'endpoint' must be one of {CHAT_URL}, {EMBEDDINGS_URL}, {TEST_URL}."
        )));
    }
    let window_s = body.completion_window.unwrap_or_else(|| "24h".into());
    let Some(window) = parse_window(&window_s) else {
        return call.error(&bad_request(
            "'completion_window' must be between 24h and 336h.",
        ));
    };
    let metadata = match body.metadata {
        None | Some(Value::Null) => Value::Null,
        Some(Value::Object(m))
            if m.len() <= 16
                && m.values()
                    .all(|v| v.as_str().is_some_and(|s| s.len() <= 512)) =>
        {
            Value::Object(m)
        }
        Some(_) => {
            return call.error(&bad_request(
                "'metadata' must be an object of at most 16 string values.",
            ));
        }
    };
    let Some(file) = owned_file(&shared, &input_file_id, &entry.account) else {
        return call.error(&not_found("file", &input_file_id));
    };
    if file.purpose != "batch" {
        return call.error(&bad_request("The input file's purpose must be 'batch'."));
    }
    let (plan, timing, fault) = {
        let cfg = shared.cfg();
        (
            validate(&file.content, &endpoint, &cfg),
            cfg.batch.timing,
            cfg.batch.fault.clone(),
        )
    };
    let now = time::now();
    let id = call.id("batch_");
    let job = Job {
        id: id.clone(),
        account: entry.account.clone(),
        key,
        input_file_id,
        endpoint,
        window: (window_s, window),
        metadata,
        created: now,
        created_at: shared.created(),
        plan: Arc::new(plan),
        fault,
        timing,
        cancel_at: None,
        finished: Arc::new(OnceCell::new()),
    };
    if let Err(e) = register(&shared, &job, now) {
        return call.error(&e);
    }
    call.json(&observe(&shared, &job).await)
}

/// Stores a new batch, within the limits on test batches and on batches
/// kept.
fn register(shared: &Shared, job: &Job, now: Instant) -> Result<(), ApiError> {
    let mut store = shared.batches.lock();
    if job.endpoint == TEST_URL {
        let running = store
            .batches
            .values()
            .filter(|j| {
                j.account == job.account
                    && j.endpoint == TEST_URL
                    && !j.view(now).status.is_terminal()
            })
            .count();
        if running >= MAX_TEST_JOBS {
            let msg = format!("{TEST_MODEL} allows at most {MAX_TEST_JOBS} batches at once.");
            return Err(
                ApiError::new(StatusCode::TOO_MANY_REQUESTS, "Throttling", msg.clone())
                    .with_compat("limit_requests", "limit_requests", msg),
            );
        }
    }
    if store.batches.len() >= MAX_BATCHES {
        // Forget the oldest terminal batch.
        let pos = store.batch_order.iter().position(|b| {
            store
                .batches
                .get(b)
                .is_some_and(|j| j.view(now).status.is_terminal())
        });
        let Some(pos) = pos else {
            return Err(bad_request(format!(
                "At most {MAX_BATCHES} batches may be unfinished."
            )));
        };
        let old = store.batch_order.remove(pos);
        store.batches.remove(&old);
    }
    store.stats.batches_created += 1;
    store.batches.insert(job.id.clone(), job.clone());
    store.batch_order.push(job.id.clone());
    Ok(())
}

/// The batch object of `job` now, running its lines first if it just
/// became terminal.
async fn observe(shared: &Arc<Shared>, job: &Job) -> Value {
    let view = job.view(time::now());
    if !view.status.is_terminal() {
        return job.object(&view, None);
    }
    let finished = job
        .finished
        .get_or_init(|| finish(shared.clone(), job.clone(), view.status, view.done))
        .await;
    job.object(&view, Some(finished))
}

fn owned_job(shared: &Shared, id: &str, account: &str) -> Option<Job> {
    shared
        .batches
        .lock()
        .batches
        .get(id)
        .filter(|j| &*j.account == account)
        .cloned()
}

async fn retrieve(State(shared): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let call = Call::new(shared.clone());
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    match owned_job(&shared, &id, &account) {
        Some(job) => call.json(&observe(&shared, &job).await),
        None => call.error(&not_found("batch", &id)),
    }
}

async fn list_batches(
    State(shared): St,
    headers: HeaderMap,
    q: Result<Query<Page>, QueryRejection>,
) -> Response {
    let call = Call::new(shared.clone());
    let Ok(Query(q)) = q else {
        return call.error(&bad_request("'after' must be an id and 'limit' a number."));
    };
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    let (jobs, more) = {
        let store = shared.batches.lock();
        let mine = store
            .batch_order
            .iter()
            .filter(|id| store.batches.get(*id).is_some_and(|j| j.account == account));
        let (ids, more) = page(mine, &q);
        let jobs: Vec<Job> = ids
            .iter()
            .filter_map(|id| store.batches.get(id).cloned())
            .collect();
        (jobs, more)
    };
    let mut data = Vec::with_capacity(jobs.len());
    for job in &jobs {
        data.push(observe(&shared, job).await);
    }
    call.json(&list(data, more))
}

async fn cancel(State(shared): St, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let call = Call::new(shared.clone());
    let account = match call.auth(&headers) {
        Ok((_, k)) => k.account,
        Err(e) => return call.error(&e),
    };
    let now = time::now();
    let job = {
        let mut store = shared.batches.lock();
        let Some(job) = store.batches.get_mut(&id).filter(|j| j.account == account) else {
            drop(store);
            return call.error(&not_found("batch", &id));
        };
        let status = job.view(now).status;
        if status.is_terminal() || status == Status::Cancelling {
            drop(store);
            let msg = format!("Cannot cancel a batch with status '{}'.", status.as_str());
            return call.error(&bad_request(msg));
        }
        job.cancel_at = Some(now);
        job.clone()
    };
    call.json(&observe(&shared, &job).await)
}

// ---------------------------------------------------------------------------
// Running the lines.

/// A configuration for running lines: the mock's own, without quotas,
/// burst guard, faults or latency, so a batch line gets the body a
/// real-time call would and charges nothing real-time.
fn worker_config(cfg: &Config, batch_id: &str) -> Config {
    let mut w = cfg.clone();
    w.default_quota = Quota::unlimited();
    w.quotas.clear();
    w.burst = None;
    w.faults = Arc::default();
    w.model_faults.clear();
    w.stream_errors_as_sse = false;
    // Scripted replies and faults play on real-time calls only.
    w.script = Script::new();
    // Distinct request ids per batch (FNV-1a of the id).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in batch_id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    w.seed ^= h;
    w
}

/// One line's answer: status, request id, JSON body.
async fn run_line(
    router: &mut Router,
    key: &str,
    url: &str,
    line: &InLine,
) -> (u16, String, Value) {
    let req = http::Request::post(format!("/compatible-mode{url}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .body(Body::from(line.body.clone()));
    let Ok(mut req) = req else {
        let e = ApiError::invalid_api_key();
        let body = serde_json::from_slice(&e.body(Protocol::Compatible, "")).unwrap_or_default();
        return (e.status().as_u16(), String::new(), body);
    };
    req.extensions_mut().insert(ConnCtl::default());
    let res = match router.call(req).await {
        Ok(res) => res,
        Err(never) => match never {},
    };
    let status = res.status().as_u16();
    let rid = res
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .unwrap_or_default();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, rid, body)
}

/// The dry run's answer to a line.
fn test_answer(rid: &str, created: u64) -> Value {
    json!({
        "id": format!("chatcmpl-{rid}"),
        "object": "chat.completion",
        "created": created,
        "model": TEST_MODEL,
        "system_fingerprint": null,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": "This is a test result." },
            "finish_reason": "stop",
            "logprobs": null,
        }],
        "usage": { "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0 },
    })
}

/// Runs the first `done` lines of a terminal batch and stores its output
/// and error files.
async fn finish(shared: Arc<Shared>, job: Job, status: Status, done: usize) -> Finished {
    let lines = match (&*job.plan, status) {
        (Plan::Valid { lines, test }, Status::Completed | Status::Expired | Status::Cancelled) => {
            Some((lines, *test))
        }
        _ => None,
    };
    let done = if status == Status::Completed {
        usize::MAX
    } else {
        done
    };
    let Some((lines, test)) = lines else {
        let mut store = shared.batches.lock();
        store.stats.batches_failed += 1;
        return Finished {
            output_file_id: None,
            error_file_id: None,
            completed: 0,
            failed: 0,
        };
    };
    let cfg = worker_config(&shared.cfg(), &job.id);
    let mut ids = request_rng(cfg.seed, 0, 4);
    let worker = Arc::new(Shared::new(cfg));
    let mut router = super::handlers::router(worker.clone());
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut completed, mut failed) = (0u64, 0u64);
    let (mut input, mut output) = (0u64, 0u64);
    for (i, line) in lines.iter().enumerate() {
        let line_id = format!("batch_req_{}", uuid(&mut ids));
        if i >= done {
            let (code, message) = if status == Status::Expired {
                (
                    "batch_expired",
                    "This request could not be executed before the completion window expired.",
                )
            } else {
                (
                    "batch_cancelled",
                    "This request was not executed: the batch was cancelled.",
                )
            };
            push_line(
                &mut err,
                &json!({
                    "id": line_id, "custom_id": line.custom_id, "response": null,
                    "error": { "code": code, "message": message },
                }),
            );
            failed += 1;
            continue;
        }
        let (code, rid, body) = if let Some(e) = job.line_fails(i) {
            let rid = uuid(&mut ids);
            let body =
                serde_json::from_slice(&e.body(Protocol::Compatible, &rid)).unwrap_or_default();
            (e.status().as_u16(), rid, body)
        } else if line.stream {
            let rid = uuid(&mut ids);
            let e = bad_request("Batch requests cannot stream: remove 'stream'.");
            let body =
                serde_json::from_slice(&e.body(Protocol::Compatible, &rid)).unwrap_or_default();
            (e.status().as_u16(), rid, body)
        } else if test {
            let rid = uuid(&mut ids);
            (200, rid.clone(), test_answer(&rid, job.created_at))
        } else {
            run_line(&mut router, &job.key, &job.endpoint, line).await
        };
        let record = |error: Value| {
            json!({
                "id": line_id,
                "custom_id": line.custom_id,
                "response": { "status_code": code, "request_id": rid, "body": body },
                "error": error,
            })
        };
        if (200..300).contains(&code) {
            if let Some(u) = Usage::find(body.to_string().as_bytes()) {
                input += u64::from(u.input_tokens);
                output += u64::from(u.output_tokens);
            }
            push_line(&mut out, &record(Value::Null));
            completed += 1;
        } else {
            let e = body.get("error");
            let error = json!({
                "code": e.and_then(|e| e.get("code")).cloned().unwrap_or_else(|| json!("error")),
                "message": e.and_then(|e| e.get("message")).cloned().unwrap_or_else(|| json!("The request failed.")),
            });
            push_line(&mut err, &record(error));
            failed += 1;
        }
    }
    let make = |content: Vec<u8>, name: &str, ids: &mut crate::util::rng::SeededRng| {
        (!content.is_empty()).then(|| {
            Arc::new(StoredFile {
                id: format!("file-batch_output-{}", uuid(ids)),
                account: job.account.clone(),
                filename: format!("{}_{name}.jsonl", job.id),
                purpose: "batch_output",
                created_at: shared.created(),
                content: Bytes::from(content),
            })
        })
    };
    let out_file = make(out, "output", &mut ids);
    let err_file = make(err, "error", &mut ids);
    let mut store = shared.batches.lock();
    let s = &mut store.stats;
    match status {
        Status::Completed => s.batches_completed += 1,
        Status::Expired => s.batches_expired += 1,
        _ => s.batches_cancelled += 1,
    }
    s.lines_succeeded += completed;
    s.lines_failed += failed;
    s.input_tokens += input;
    s.output_tokens += output;
    let mut ids_of = |f: Option<Arc<StoredFile>>| {
        f.map(|f| {
            let id = f.id.clone();
            store.files.insert(id.clone(), f);
            store.file_order.push(id.clone());
            id
        })
    };
    let output_file_id = ids_of(out_file);
    let error_file_id = ids_of(err_file);
    Finished {
        output_file_id,
        error_file_id,
        completed,
        failed,
    }
}

fn push_line(buf: &mut Vec<u8>, v: &Value) {
    // Serializing a Value into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, v);
    buf.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(parse_window("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_window("14d"), Some(Duration::from_secs(14 * 86_400)));
        assert_eq!(parse_window("23h"), None);
        assert_eq!(parse_window("15d"), None);
        assert_eq!(parse_window("h"), None);
        assert_eq!(parse_window(""), None);
        assert_eq!(parse_window("99999999999999999999d"), None);
    }

    #[test]
    fn pages_newest_first() {
        let ids: Vec<String> = (1..=5).map(|i| i.to_string()).collect();
        let q = Page {
            after: None,
            limit: Some(2),
        };
        assert_eq!(page(ids.iter(), &q), (vec!["5".into(), "4".into()], true));
        let q = Page {
            after: Some("4".into()),
            limit: Some(5),
        };
        assert_eq!(
            page(ids.iter(), &q),
            (vec!["3".into(), "2".into(), "1".into()], false)
        );
    }

    #[test]
    fn validation_codes() {
        let cfg = Config::default();
        let line = |id: &str, model: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}}}"#
            )
        };
        let ok = format!("{}\n{}\n", line("a", "qwen-plus"), line("b", "qwen-plus"));
        assert!(
            matches!(validate(ok.as_bytes(), CHAT_URL, &cfg), Plan::Valid { ref lines, .. } if lines.len() == 2)
        );
        let codes =
            |content: String, endpoint: &str| match validate(content.as_bytes(), endpoint, &cfg) {
                Plan::Invalid(e) => e
                    .iter()
                    .map(|e| e["code"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>(),
                Plan::Valid { .. } => vec![],
            };
        assert_eq!(
            codes(
                format!("{}\n{}", line("a", "qwen-plus"), line("b", "qwen-max")),
                CHAT_URL
            ),
            ["mismatched_model"]
        );
        assert_eq!(
            codes(
                format!("{}\n{}", line("a", "qwen-plus"), line("a", "qwen-plus")),
                CHAT_URL
            ),
            ["duplicate_custom_id"]
        );
        assert_eq!(codes(line("a", TEST_MODEL), CHAT_URL), ["model_not_found"]);
        assert_eq!(
            codes(line("a", "qwen-plus"), TEST_URL),
            ["mismatched_url", "model_not_found"]
        );
        assert_eq!(codes("not json".into(), CHAT_URL), ["invalid_json_line"]);
        assert_eq!(codes(String::new(), CHAT_URL), ["empty_file"]);
        let test_line = line("t", TEST_MODEL).replace(CHAT_URL, TEST_URL);
        assert!(codes(test_line, TEST_URL).is_empty());
    }
}
