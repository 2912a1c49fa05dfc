use std::collections::HashSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::UNIX_EPOCH;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use tokio::sync::{mpsc, oneshot};
use tower_service::Service;

use super::api::Api;
use super::error::BatchError;
use super::future::{Answer, ResponseFuture};
use super::layer::{BatchLayer, Config};
use super::line;
use super::worker::{self, Item, Recovery};
use crate::BoxError;
use crate::body::{Body, BufferedBody};

/// The body of a batched answer: the line's JSON body, whole. The same type
/// as the client stack's response body
/// (`tower_qwen::client::ResponseBody`), so a caller can switch between
/// the real-time stack and the Batch API.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// Sends requests through DashScope's Batch API and answers each caller
/// with its line's response. See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share the worker, the files filling, the counters and the store.
/// When the service and all its clones are dropped, the worker sends the
/// files still filling and keeps collecting batches for the callers still
/// waiting.
pub struct Batch<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// Held only by the service and its clones: the worker's inbox closes when
/// the last one is dropped.
pub(crate) struct Shared {
    pub(crate) ctx: Arc<Ctx>,
    tx: OnceLock<mpsc::UnboundedSender<Item>>,
}

/// What the worker tasks share.
pub(crate) struct Ctx {
    pub(crate) config: Arc<Config>,
    pub(crate) stats: Counters,
    /// Input files whose batches this process is collecting.
    tracked: Mutex<HashSet<String>>,
    seq: AtomicU64,
    prefix: String,
}

impl Ctx {
    /// A `custom_id` unique to this process.
    pub(crate) fn next_id(&self) -> Arc<str> {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        Arc::from(format!("{}-{n}", self.prefix))
    }

    /// Starts tracking `input_file_id`; false if it already was.
    pub(crate) fn track(&self, input_file_id: &str) -> bool {
        self.tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(input_file_id.to_owned())
    }

    pub(crate) fn untrack(&self, input_file_id: &str) {
        self.tracked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(input_file_id);
    }
}

/// Counters of a [`Batch`] service and its clones, from [`Batch::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Requests taken in (including those refused as not batchable).
    pub requests: u64,
    /// Requests refused at once (not batchable).
    pub refused: u64,
    /// Lines left out of a file because their caller went away first.
    pub dropped: u64,
    /// Input files uploaded.
    pub files: u64,
    /// Batches created.
    pub batches: u64,
    /// Batches that ended `completed`.
    pub completed: u64,
    /// Batches that ended `failed`.
    pub failed: u64,
    /// Batches that ended `expired`.
    pub expired: u64,
    /// Batches that ended `cancelled`.
    pub cancelled: u64,
    /// Batches this service cancelled because every caller went away.
    pub cancelled_by_callers: u64,
    /// Lines answered with a response (success or HTTP error).
    pub responses: u64,
    /// Lines answered with a [`BatchError`] after they were sent.
    pub errors: u64,
    /// Input tokens in the `usage` of the responses.
    pub input_tokens: u64,
    /// Output tokens in the `usage` of the responses.
    pub output_tokens: u64,
    /// Batch status polls.
    pub polls: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) refused: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) files: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) failed: AtomicU64,
    pub(crate) expired: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) cancelled_by_callers: AtomicU64,
    pub(crate) responses: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) input_tokens: AtomicU64,
    pub(crate) output_tokens: AtomicU64,
    pub(crate) polls: AtomicU64,
}

impl Counters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    fn snapshot(&self) -> BatchStats {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BatchStats {
            requests: l(&self.requests),
            refused: l(&self.refused),
            dropped: l(&self.dropped),
            files: l(&self.files),
            batches: l(&self.batches),
            completed: l(&self.completed),
            failed: l(&self.failed),
            expired: l(&self.expired),
            cancelled: l(&self.cancelled),
            cancelled_by_callers: l(&self.cancelled_by_callers),
            responses: l(&self.responses),
            errors: l(&self.errors),
            input_tokens: l(&self.input_tokens),
            output_tokens: l(&self.output_tokens),
            polls: l(&self.polls),
        }
    }
}

impl<S> Batch<S> {
    /// Wraps `inner` with the [defaults](BatchLayer#default).
    pub fn new(inner: S) -> Self {
        Self::with_config(inner, Arc::new(Config::default()))
    }

    /// A [`BatchLayer`] with the defaults, to configure.
    pub fn layer() -> BatchLayer {
        BatchLayer::new()
    }

    pub(crate) fn with_config(inner: S, config: Arc<Config>) -> Self {
        let millis = crate::time::system_now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0);
        let prefix = format!("tq{:x}{millis:x}", std::process::id());
        Self {
            inner,
            shared: Arc::new(Shared {
                ctx: Arc::new(Ctx {
                    config,
                    stats: Counters::default(),
                    tracked: Mutex::new(HashSet::new()),
                    seq: AtomicU64::new(0),
                    prefix,
                }),
                tx: OnceLock::new(),
            }),
        }
    }

    /// A snapshot of the counters, shared by every clone.
    pub fn stats(&self) -> BatchStats {
        self.shared.ctx.stats.snapshot()
    }

    crate::util::macros::define_inner_service_accessors!();
}

impl<S: Clone> Clone for Batch<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Batch<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("inner", &self.inner)
            .field("config", &self.shared.ctx.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<S, RB> Batch<S>
where
    S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    fn api(&self) -> Api<S> {
        let c = &self.shared.ctx.config;
        Api {
            svc: std::sync::Mutex::new(self.inner.clone()),
            base: c.base_path.clone(),
            attempts: c.attempts,
            backoff: c.poll_initial,
            window: Arc::from(c.window()),
        }
    }

    /// The worker's inbox, spawning the worker on first use. `None` outside
    /// a tokio runtime.
    fn worker(&self) -> Option<&mpsc::UnboundedSender<Item>> {
        if let Some(tx) = self.shared.tx.get() {
            return Some(tx);
        }
        let rt = tokio::runtime::Handle::try_current().ok()?;
        Some(self.shared.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            rt.spawn(worker::run(
                rx,
                self.api(),
                self.shared.ctx.clone(),
                Arc::downgrade(&self.shared),
            ));
            tx
        }))
    }

    /// Collects the batches this service's [store](BatchLayer::store)
    /// remembers: those a previous process submitted and did not finish
    /// collecting (its callers are gone, so the answers come out of the
    /// returned [`Recovery`], each with its `custom_id`).
    ///
    /// A batch already being collected by this service is skipped, so
    /// calling it twice is harmless. A batch whose input file was uploaded
    /// but whose creation was not recorded is looked up by its input file
    /// and created if it does not exist. Each batch's record is removed once
    /// its lines are handed to the `Recovery` (or the `Recovery` is dropped
    /// and the batch cancelled, see the [module docs](super#cancellation)).
    ///
    /// # Errors
    ///
    /// When the store cannot be read ([`BatchError::is_store`]).
    pub async fn resume(&self) -> Result<Recovery, BatchError> {
        let ctx = self.shared.ctx.clone();
        let records = ctx
            .config
            .store
            .load()
            .await
            .map_err(|e| BatchError::store(Arc::new(e)))?;
        Ok(worker::resume(
            records,
            self.api(),
            ctx,
            Arc::downgrade(&self.shared),
        ))
    }
}

impl<S, B, RB> Service<Request<B>> for Batch<S>
where
    S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: BufferedBody,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: a request waits for its batch in its response future.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> ResponseFuture {
        let ctx = &self.shared.ctx;
        Counters::add(&ctx.stats.requests, 1);
        let prepared = line::custom_id_of(&req)
            .map(|id| id.unwrap_or_else(|| ctx.next_id()))
            .and_then(|id| line::prepare(&req, id, &ctx.config));
        drop(req);
        let prepared = match prepared {
            Ok(p) => p,
            Err(e) => {
                Counters::add(&ctx.stats.refused, 1);
                return ResponseFuture::failed(e);
            }
        };
        let Some(tx) = self.worker() else {
            return ResponseFuture::failed(BatchError::closed());
        };
        let (reply, rx) = oneshot::channel::<Answer>();
        match tx.send(Item { prepared, reply }) {
            Ok(()) => ResponseFuture::waiting(rx),
            Err(_) => ResponseFuture::failed(BatchError::closed()),
        }
    }
}
