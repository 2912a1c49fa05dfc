use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tower_service::Service;

use super::answer;
use super::batch::{self, Counters, Ctx, Item, Waiter};
use super::body::ResponseBody;
use super::error::BatchFailed;
use super::future::ResponseFuture;
use super::layer::{CoalesceLayer, Config};
use super::request::{self, Route, Target};
use crate::BoxError;
use crate::body::BufferedBody;

/// Merges concurrent single-text embedding requests into one upstream
/// request. See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share the batcher, the queue and the counters, so requests from
/// every clone are merged together. A clone holds no reserved capacity.
pub struct Coalesce<S> {
    inner: S,
    shared: Arc<Shared>,
}

struct Shared {
    ctx: Arc<Ctx>,
    /// One permit per single-text request inside the layer.
    queue: Arc<Semaphore>,
    /// The batcher's inbox, created (and the batcher spawned) by the first
    /// single-text request. Dropping the last clone of the service drops
    /// it, which ends the batcher.
    tx: OnceLock<mpsc::UnboundedSender<Item>>,
}

/// Counters of a [`Coalesce`] service and its clones, from
/// [`Coalesce::stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CoalesceStats {
    /// Single-text embedding requests taken in for merging.
    pub coalesced: u64,
    /// Requests the layer itself sent upstream: merged batches, the chunks
    /// of split multi-text requests, and re-sends after a batch was refused
    /// as too large.
    pub upstream_calls: u64,
    /// Batches the upstream refused as too large, which were split and sent
    /// again.
    pub size_splits: u64,
    /// Multi-text requests over the model's cap, split into chunks.
    pub chunked: u64,
    /// Requests passed through untouched.
    pub passed_through: u64,
}

impl<S> Coalesce<S> {
    /// Wraps `inner` with the default settings (see
    /// [`CoalesceLayer`](super::CoalesceLayer#default)).
    pub fn new(inner: S) -> Self {
        Self::with_config(inner, Arc::new(Config::default()))
    }

    /// A [`CoalesceLayer`] with the default settings, to configure.
    pub fn layer() -> CoalesceLayer {
        CoalesceLayer::new()
    }

    pub(crate) fn with_config(inner: S, config: Arc<Config>) -> Self {
        let queue = Arc::new(Semaphore::new(config.queue_capacity.get()));
        Self {
            inner,
            shared: Arc::new(Shared {
                ctx: Arc::new(Ctx::new(config)),
                queue,
                tx: OnceLock::new(),
            }),
        }
    }

    /// A snapshot of the counters, shared by every clone.
    pub fn stats(&self) -> CoalesceStats {
        let c = &self.shared.ctx.counters;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        CoalesceStats {
            coalesced: load(&c.coalesced),
            upstream_calls: load(&c.batches),
            size_splits: load(&c.size_splits),
            chunked: load(&c.chunked),
            passed_through: load(&c.passed_through),
        }
    }

    crate::util::macros::define_inner_service_accessors!();
}

impl<S: Clone> Clone for Coalesce<S> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
        }
    }
}

impl<S: fmt::Debug> fmt::Debug for Coalesce<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Coalesce")
            .field("inner", &self.inner)
            .field("config", &self.shared.ctx.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl<S, B, RB> Service<Request<B>> for Coalesce<S>
where
    S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: BufferedBody + From<Bytes> + Send + 'static,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<RB>>;
    type Error = BoxError;
    type Future = ResponseFuture<S, B>;

    /// Always ready: each request waits for what it needs (the inner
    /// service's readiness, or a queue slot) in its response future.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (shape, mut texts) = match request::route(&req) {
            Route::Pass => return self.pass(req),
            Route::Embed(shape, texts) => (shape, texts),
        };
        let ctx = &self.shared.ctx;
        if texts.len() > 1 {
            if texts.len() <= ctx.cap(&shape.key.model) {
                return self.pass(req);
            }
            Counters::add(&ctx.counters.chunked);
            tracing::debug!(
                model = %shape.key.model,
                texts = texts.len(),
                "coalesce: splitting a request over the model's batch cap"
            );
            let (svc, target, ctx) = (self.inner.clone(), Target::new(shape), ctx.clone());
            return ResponseFuture::boxed(Box::pin(async move {
                let results = batch::embed::<S, B, RB>(svc, target, texts, ctx).await;
                let mut pieces = Vec::with_capacity(results.len());
                for r in results {
                    match r {
                        Ok(p) => pieces.push(p),
                        Err(failure) => return failure.reply(),
                    }
                }
                Ok(answer::render(pieces))
            }));
        }
        let Some(tx) = self.batcher::<B, RB>() else {
            // No tokio runtime to run the batcher on: send it alone.
            return self.pass(req);
        };
        let (reply, rx) = oneshot::channel();
        let mut item = Item {
            shape,
            text: texts.swap_remove(0),
            waiter: Waiter {
                reply,
                permit: None,
            },
        };
        Counters::add(&ctx.counters.coalesced);
        match self.shared.queue.clone().try_acquire_owned() {
            Ok(permit) => {
                item.waiter.permit = Some(permit);
                match tx.send(item) {
                    Ok(()) => ResponseFuture::queued(rx),
                    // The batcher is gone (it can only have panicked, in a
                    // clone of the inner service): send this one alone.
                    Err(_) => self.pass(req),
                }
            }
            Err(_) => {
                drop(req);
                tracing::trace!("coalesce: queue full; waiting for a slot");
                let (queue, tx) = (self.shared.queue.clone(), tx.clone());
                ResponseFuture::acquire(
                    Box::pin(async move {
                        let permit = queue
                            .acquire_owned()
                            .await
                            .map_err(|_| Box::new(BatchFailed::closed()) as BoxError)?;
                        item.waiter.permit = Some(permit);
                        tx.send(item)
                            .map_err(|_| Box::new(BatchFailed::closed()) as BoxError)
                    }),
                    rx,
                )
            }
        }
    }
}

impl<S> Coalesce<S> {
    fn pass<B>(&self, req: Request<B>) -> ResponseFuture<S, B>
    where
        S: Service<Request<B>> + Clone,
    {
        Counters::add(&self.shared.ctx.counters.passed_through);
        ResponseFuture::pass(self.inner.clone(), req)
    }

    /// The batcher's inbox, spawning the batcher on first use. `None` when
    /// called outside a tokio runtime.
    fn batcher<B, RB>(&self) -> Option<&mpsc::UnboundedSender<Item>>
    where
        S: Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
        B: From<Bytes> + Send + 'static,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        if let Some(tx) = self.shared.tx.get() {
            return Some(tx);
        }
        let rt = tokio::runtime::Handle::try_current().ok()?;
        Some(self.shared.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            rt.spawn(batch::run::<S, B, RB>(
                rx,
                self.inner.clone(),
                self.shared.ctx.clone(),
            ));
            tx
        }))
    }
}
