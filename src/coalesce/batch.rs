//! The batching task and the merged calls.
//!
//! One task per [`Coalesce`](super::Coalesce) (shared by its clones) owns
//! the open batches: a map from [`Key`] to the texts waiting for it. A batch
//! is sent when it is full (the model's cap) or when its first text has
//! waited `max_wait`; each send runs in its own task with its own clone of
//! the inner service, so a slow upstream call never holds up the batcher.
//! When every clone of the service is dropped, the channel closes, the task
//! sends what is still open at once and ends.

use std::collections::HashMap;
use std::collections::hash_map::Entry as MapEntry;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use serde_json::{Map, Value};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tower_service::Service;

use super::answer::{self, Failure, Head, Piece, Reply};
use super::error::BatchFailed;
use super::layer::Config;
use super::request::{self, Key, Shape, Target, Text};
use crate::BoxError;
use crate::time::{self, Instant};

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// The most bytes read from one upstream embedding answer.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// One caller's text on its way to the batcher.
pub(crate) struct Item {
    pub(crate) shape: Shape,
    pub(crate) text: Text,
    pub(crate) waiter: Waiter,
}

/// Where a caller waits for its answer, and its slot in the queue.
pub(crate) struct Waiter {
    pub(crate) reply: oneshot::Sender<Reply>,
    pub(crate) permit: Option<OwnedSemaphorePermit>,
}

/// State shared by the service clones, the batcher and the merged calls.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) config: Arc<Config>,
    /// Caps learned from upstream "batch size is invalid" answers, lower
    /// than the configured ones.
    learned: Mutex<HashMap<Box<str>, usize>>,
    any_learned: AtomicBool,
    pub(crate) counters: Counters,
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) coalesced: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) size_splits: AtomicU64,
    pub(crate) chunked: AtomicU64,
    pub(crate) passed_through: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl Ctx {
    pub(crate) fn new(config: Arc<Config>) -> Self {
        Self {
            config,
            learned: Mutex::new(HashMap::new()),
            any_learned: AtomicBool::new(false),
            counters: Counters::default(),
        }
    }

    /// The most texts one request for `model` may carry.
    pub(crate) fn cap(&self, model: &str) -> usize {
        let configured = self.config.max_batch_for(model);
        if !self.any_learned.load(Ordering::Acquire) {
            return configured;
        }
        let learned = self.learned.lock().ok().and_then(|m| m.get(model).copied());
        learned.map_or(configured, |l| l.min(configured))
    }

    fn learn(&self, model: &str, limit: usize) {
        if limit >= self.cap(model) {
            return;
        }
        if let Ok(mut m) = self.learned.lock() {
            // Bounded: one entry per model this service ever saw refused.
            m.insert(model.into(), limit);
            self.any_learned.store(true, Ordering::Release);
        }
        tracing::warn!(
            model,
            limit,
            "coalesce: upstream caps embedding batches lower than configured; using its limit"
        );
    }
}

/// A batch being filled.
struct Open {
    template: Map<String, Value>,
    texts: Vec<Text>,
    waiters: Vec<Waiter>,
    deadline: Instant,
    cap: usize,
}

// A short-lived value on the batcher's stack: boxing the item would cost an
// allocation per request for nothing.
#[allow(clippy::large_enum_variant)]
enum Event {
    Item(Item),
    Closed,
    Timer,
}

/// The batcher. Ends when every sender is gone and every open batch has
/// been sent.
pub(crate) async fn run<S, B, RB>(mut rx: mpsc::UnboundedReceiver<Item>, svc: S, ctx: Arc<Ctx>)
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let mut open: HashMap<Key, Open> = HashMap::new();
    let mut sleep = pin!(tokio::time::sleep_until(time::now()));
    let mut closed = false;
    tracing::trace!("coalesce: batcher started");
    loop {
        if closed && open.is_empty() {
            break;
        }
        let next = open.values().map(|o| o.deadline).min();
        if let Some(d) = next
            && sleep.deadline() != d
        {
            sleep.as_mut().reset(d);
        }
        let event = poll_fn(|cx| {
            if !closed {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(item)) => return Poll::Ready(Event::Item(item)),
                    Poll::Ready(None) => return Poll::Ready(Event::Closed),
                    Poll::Pending => {}
                }
            }
            if next.is_some() && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Event::Timer);
            }
            Poll::Pending
        })
        .await;
        match event {
            Event::Item(item) => {
                let Item {
                    shape,
                    text,
                    waiter,
                } = item;
                match open.entry(shape.key) {
                    MapEntry::Occupied(mut o) => {
                        let batch = o.get_mut();
                        batch.texts.push(text);
                        batch.waiters.push(waiter);
                        if batch.texts.len() >= batch.cap {
                            let (key, batch) = o.remove_entry();
                            send(&svc, key, batch, &ctx, "full");
                        }
                    }
                    MapEntry::Vacant(v) => {
                        let cap = ctx.cap(&v.key().model);
                        let batch = Open {
                            template: shape.template,
                            texts: vec![text],
                            waiters: vec![waiter],
                            deadline: deadline(ctx.config.max_wait),
                            cap,
                        };
                        if cap <= 1 {
                            let key = v.into_key();
                            send(&svc, key, batch, &ctx, "full");
                        } else {
                            v.insert(batch);
                        }
                    }
                }
            }
            Event::Closed => {
                closed = true;
                for (key, batch) in open.drain() {
                    send(&svc, key, batch, &ctx, "closing");
                }
            }
            Event::Timer => {
                let now = time::now();
                let due: Vec<(Key, Open)> = open.extract_if(|_, b| b.deadline <= now).collect();
                for (key, batch) in due {
                    send(&svc, key, batch, &ctx, "max wait");
                }
            }
        }
    }
    tracing::trace!("coalesce: batcher stopped");
}

/// When a batch opened now must be sent; a wait too long to represent
/// means "a year from now" (the batch still goes when full or on drop).
fn deadline(max_wait: std::time::Duration) -> Instant {
    let now = time::now();
    now.checked_add(max_wait)
        .or_else(|| now.checked_add(std::time::Duration::from_secs(365 * 86_400)))
        .unwrap_or(now)
}

/// Spawns the merged call for `batch`.
fn send<S, B, RB>(svc: &S, key: Key, batch: Open, ctx: &Arc<Ctx>, why: &'static str)
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let Open {
        template,
        mut texts,
        mut waiters,
        ..
    } = batch;
    // Callers that went away take no part (and free their slot now).
    let mut i = 0;
    while i < waiters.len() {
        if waiters[i].reply.is_closed() {
            waiters.swap_remove(i);
            texts.swap_remove(i);
        } else {
            i += 1;
        }
    }
    if waiters.is_empty() {
        return;
    }
    tracing::debug!(
        model = %key.model,
        texts = texts.len(),
        reason = why,
        "coalesce: sending merged embedding request"
    );
    let target = Target::new(Shape { key, template });
    let svc = svc.clone();
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let results = embed::<S, B, RB>(svc, target, texts, ctx).await;
        for (waiter, result) in waiters.into_iter().zip(results) {
            let reply = match result {
                Ok(piece) => Ok(answer::render(vec![piece])),
                Err(failure) => failure.reply(),
            };
            // The caller may have gone away meanwhile; that is fine.
            let _ = waiter.reply.send(reply);
        }
    });
}

/// What became of each text of a merged call.
pub(crate) type Results = Vec<Result<Piece, Arc<Failure>>>;

/// Embeds `texts` (in order) with as few upstream calls as the model's cap
/// allows: chunks of at most the cap, sent concurrently; a chunk refused as
/// too large is split (to the limit the upstream states, else in halves)
/// and sent again.
pub(crate) fn embed<S, B, RB>(
    svc: S,
    target: Arc<Target>,
    texts: Vec<Text>,
    ctx: Arc<Ctx>,
) -> BoxFuture<Results>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    Box::pin(async move {
        let n = texts.len();
        let cap = ctx.cap(&target.key.model).max(1);
        if n > cap {
            return in_chunks(svc, target, texts, cap, ctx).await;
        }
        let fail = |f: Failure| {
            let f = Arc::new(f);
            (0..n).map(|_| Err(f.clone())).collect::<Results>()
        };
        let req = request::build::<B>(&target.key, &target.template, &texts);
        Counters::add(&ctx.counters.batches);
        let res = match call(svc.clone(), req).await {
            Ok(res) => res,
            Err(e) => {
                tracing::debug!(model = %target.key.model, texts = n, error = %e, "coalesce: merged call failed");
                return fail(Failure::Error(BatchFailed::upstream(Arc::new(e))));
            }
        };
        let (parts, body) = res.into_parts();
        let bytes = match Limited::new(body, MAX_RESPONSE_BYTES).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => return fail(Failure::Error(BatchFailed::body(Arc::new(e)))),
        };
        let (head, bytes) = if parts.status.is_success() {
            let weights: Vec<u64> = texts.iter().map(|t| t.weight).collect();
            match answer::split(parts, bytes, target.key.protocol, &weights) {
                Ok(pieces) => return pieces.into_iter().map(Ok).collect(),
                Err(Failure::Response { head, body }) => (head, body),
                Err(f) => return fail(f),
            }
        } else {
            (Box::new(Head::new(parts)), bytes)
        };
        if n > 1
            && let Some(limit) = answer::batch_size_error(head.status(), &bytes)
        {
            Counters::add(&ctx.counters.size_splits);
            if let Some(l) = limit {
                ctx.learn(&target.key.model, l);
            }
            let size = limit.filter(|&l| l < n).unwrap_or(n.div_ceil(2));
            tracing::debug!(model = %target.key.model, sent = n, size, "coalesce: batch refused as too large; splitting");
            return in_chunks(svc, target, texts, size, ctx).await;
        }
        tracing::debug!(model = %target.key.model, texts = n, status = %head.status(), "coalesce: merged call answered with an error");
        fail(Failure::Response { head, body: bytes })
    })
}

async fn in_chunks<S, B, RB>(
    svc: S,
    target: Arc<Target>,
    mut texts: Vec<Text>,
    size: usize,
    ctx: Arc<Ctx>,
) -> Results
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: From<Bytes> + Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    let mut chunks = Vec::with_capacity(texts.len().div_ceil(size));
    while !texts.is_empty() {
        let rest = texts.split_off(size.min(texts.len()));
        chunks.push(std::mem::replace(&mut texts, rest));
    }
    let futures = chunks
        .into_iter()
        .map(|c| embed::<S, B, RB>(svc.clone(), target.clone(), c, ctx.clone()))
        .collect();
    join_all(futures).await.into_iter().flatten().collect()
}

/// Waits for the inner service, then calls it.
async fn call<S, B, RB>(mut svc: S, req: Request<B>) -> Result<Response<RB>, BoxError>
where
    S: Service<Request<B>, Response = Response<RB>>,
    S::Error: Into<BoxError>,
{
    poll_fn(|cx| svc.poll_ready(cx)).await.map_err(Into::into)?;
    svc.call(req).await.map_err(Into::into)
}

/// Runs `futures` concurrently; their outputs in order.
pub(crate) async fn join_all<T>(futures: Vec<BoxFuture<T>>) -> Vec<T> {
    let mut futures: Vec<Option<BoxFuture<T>>> = futures.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futures.iter().map(|_| None).collect();
    poll_fn(|cx| {
        let mut pending = false;
        for (slot, done) in futures.iter_mut().zip(out.iter_mut()) {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => {
                        *done = Some(v);
                        *slot = None;
                    }
                    Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}
