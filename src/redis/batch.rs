//! The batching client: operations that wait at the same moment go to
//! Redis in one script call.
//!
//! Every operation (a decision, a give-back, a reconciliation, a pause) is
//! queued to one task per limiter. The task takes everything queued, up to
//! [`MAX_BATCH`] operations, and sends it as one script call; up to
//! [`IN_FLIGHT`] calls are on the wire at once (pipelined on the one
//! connection), so Redis works on one batch while the next is being
//! gathered. Each caller gets its own answer. With one caller a batch is
//! that caller's operation (one round trip, as without batching); with
//! many, a round trip carries many exact decisions, and the script reads
//! and writes each key once per batch. Operations run in the order they
//! were queued: batches are sent in order on one connection, and Redis runs
//! them in that order.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::Duration;

use ::redis::RedisError;
use ::redis::aio::ConnectionManager;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::time::{self, Instant, duration_nanos};

use super::fallback::{FailurePolicy, Health};
use super::script::{self, Op};

/// The most operations in one script call.
pub(crate) const MAX_BATCH: usize = 128;

/// The most script calls on the wire at once.
pub(crate) const IN_FLIGHT: usize = 2;

/// Why Redis gave no answer.
#[derive(Debug)]
pub(crate) enum Failure {
    Timeout,
    Redis(RedisError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl Failure {
    /// Whether the failure says Redis cannot decide (as opposed to, say, a
    /// script error on a healthy server).
    pub(crate) fn is_store_failure(&self) -> bool {
        match self {
            Failure::Timeout => true,
            Failure::Redis(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.is_unrecoverable_error()
                    || !matches!(e.kind(), ::redis::ErrorKind::Server(_))
            }
        }
    }

    fn copy(&self) -> Failure {
        match self {
            Failure::Timeout => Failure::Timeout,
            Failure::Redis(e) => Failure::Redis(RedisError::from((
                e.kind(),
                "redis rate limit batch failed",
                e.to_string(),
            ))),
        }
    }
}

/// Counters of a limiter (see `RedisLimiter::stats`).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) redis: std::sync::atomic::AtomicU64,
    pub(crate) leased: std::sync::atomic::AtomicU64,
    pub(crate) fallback: std::sync::atomic::AtomicU64,
    pub(crate) closed: std::sync::atomic::AtomicU64,
    pub(crate) errors: std::sync::atomic::AtomicU64,
    pub(crate) calls: std::sync::atomic::AtomicU64,
}

/// Background operations (give-backs, reconciliations, pauses) queued or
/// in flight.
#[derive(Debug, Default)]
pub(crate) struct Background {
    inflight: AtomicUsize,
    idle: Notify,
}

impl Background {
    /// Waits until no background operation is queued or in flight.
    pub(crate) async fn settle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    /// Counts one more operation in flight (until [`Background::end`]).
    pub(crate) fn begin(&self) {
        self.inflight.fetch_add(1, Ordering::AcqRel);
    }

    /// One operation of [`Background::begin`] is done.
    pub(crate) fn end(&self) {
        if self.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Counts a background operation until it is done (or dropped).
struct Counted(Arc<Exec>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.background.end();
    }
}

/// What running a script call needs, shared by the batch task and the
/// limiter.
pub(crate) struct Exec {
    pub(crate) conn: ConnectionManager,
    pub(crate) timeout: Option<Duration>,
    pub(crate) origin: Instant,
    pub(crate) slack_ms: u64,
    pub(crate) health: Health,
    pub(crate) policy: FailurePolicy,
    pub(crate) counters: Counters,
    pub(crate) background: Background,
}

impl fmt::Debug for Exec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exec")
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("down", &self.health.is_down())
            .finish_non_exhaustive()
    }
}

impl Exec {
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        duration_nanos(t.saturating_duration_since(self.origin))
    }

    /// Keeps the health state after a call.
    pub(crate) fn record(&self, res: Result<(), &Failure>) {
        let now = self.nanos(time::now());
        match res {
            Ok(()) => {
                self.health.up(now);
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                if e.is_store_failure() {
                    self.health.down(now, e, self.policy);
                } else {
                    tracing::warn!(error = %e, "redis rate limit script failed");
                }
            }
        }
    }

    /// Runs one batch and answers its callers.
    async fn run(self: Arc<Self>, mut jobs: Vec<Job>) {
        let ops: Vec<Op> = jobs.iter_mut().map(|j| j.op.take().expect("op")).collect();
        let mut conn = self.conn.clone();
        let call = script::run(&mut conn, &ops, self.slack_ms);
        let res = match self.timeout {
            Some(d) => match tokio::time::timeout(d, call).await {
                Ok(r) => r.map_err(Failure::Redis),
                Err(_) => Err(Failure::Timeout),
            },
            None => call.await.map_err(Failure::Redis),
        };
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        self.record(res.as_ref().map(drop));
        match res {
            Ok(replies) => {
                for (job, reply) in jobs.drain(..).zip(replies) {
                    if let Some(tx) = job.done {
                        let _ = tx.send(Ok(reply));
                    }
                }
            }
            Err(e) => {
                for job in jobs.drain(..) {
                    if let Some(tx) = job.done {
                        let _ = tx.send(Err(e.copy()));
                    }
                }
            }
        }
    }
}

struct Job {
    op: Option<Op>,
    done: Option<oneshot::Sender<Result<Vec<i64>, Failure>>>,
    _counted: Option<Counted>,
}

/// The sending side of a limiter's batch task (started on first use, on
/// the current tokio runtime; it ends when the limiter is dropped).
pub(crate) struct Batcher {
    exec: Arc<Exec>,
    tx: OnceLock<mpsc::UnboundedSender<Job>>,
}

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("exec", &self.exec)
            .field("started", &self.tx.get().is_some())
            .finish()
    }
}

impl Batcher {
    pub(crate) fn new(exec: Arc<Exec>) -> Self {
        Self {
            exec,
            tx: OnceLock::new(),
        }
    }

    pub(crate) fn exec(&self) -> &Arc<Exec> {
        &self.exec
    }

    fn sender(&self) -> Option<&mpsc::UnboundedSender<Job>> {
        if let Some(tx) = self.tx.get() {
            return Some(tx);
        }
        let rt = tokio::runtime::Handle::try_current().ok()?;
        Some(self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            rt.spawn(batch_loop(self.exec.clone(), rx));
            tx
        }))
    }

    /// Runs `op` in the next batch and waits for its answer (bounded by the
    /// limiter's timeout, queueing included).
    pub(crate) async fn call(&self, op: Op) -> Result<Vec<i64>, Failure> {
        let (tx, rx) = oneshot::channel();
        let job = Job {
            op: Some(op),
            done: Some(tx),
            _counted: None,
        };
        let Some(sender) = self.sender() else {
            return Err(Failure::Timeout);
        };
        if sender.send(job).is_err() {
            return Err(Failure::Timeout);
        }
        let answer = match self.exec.timeout {
            Some(d) => match tokio::time::timeout(d, rx).await {
                Ok(a) => a,
                Err(_) => {
                    // Queued behind a slow batch: Redis is too slow to decide.
                    let e = Failure::Timeout;
                    self.exec.record(Err(&e));
                    return Err(e);
                }
            },
            None => rx.await,
        };
        answer.unwrap_or(Err(Failure::Timeout))
    }

    /// Queues `op` in the background (a give-back, a reconciliation, a
    /// pause), counted for `settle`. Skipped while Redis is known to be
    /// down: a give-back or refund is then lost (capacity, never a burst),
    /// and so is an overrun (the fallback decides meanwhile anyway).
    pub(crate) fn background(&self, op: Op) {
        if self.exec.health.is_down() {
            tracing::debug!("redis is down; a rate limit give-back or reconciliation is dropped");
            return;
        }
        let Some(sender) = self.sender() else {
            tracing::debug!(
                "no tokio runtime; a rate limit give-back or reconciliation is dropped"
            );
            return;
        };
        self.exec.background.begin();
        let job = Job {
            op: Some(op),
            done: None,
            _counted: Some(Counted(self.exec.clone())),
        };
        let _ = sender.send(job);
    }
}

async fn batch_loop(exec: Arc<Exec>, mut rx: mpsc::UnboundedReceiver<Job>) {
    type Flight = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
    let mut flying: VecDeque<Flight> = VecDeque::with_capacity(IN_FLIGHT);
    let mut closed = false;
    std::future::poll_fn(|cx| {
        loop {
            // Send new batches while there is room. A batch is polled once
            // at once, which hands its request to the connection: requests
            // go out in the order the operations were queued.
            while !closed && flying.len() < IN_FLIGHT {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(first)) => {
                        let mut jobs = Vec::with_capacity(MAX_BATCH.min(rx.len() + 1));
                        jobs.push(first);
                        while jobs.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(j) => jobs.push(j),
                                Err(_) => break,
                            }
                        }
                        let mut f: Flight = Box::pin(exec.clone().run(jobs));
                        if f.as_mut().poll(cx).is_pending() {
                            flying.push_back(f);
                        }
                    }
                    Poll::Ready(None) => closed = true,
                    Poll::Pending => break,
                }
            }
            let before = flying.len();
            flying.retain_mut(|f| f.as_mut().poll(cx).is_pending());
            if closed && flying.is_empty() {
                return Poll::Ready(());
            }
            // A batch finished, with operations maybe waiting: look again.
            // Otherwise the queue, or every batch in flight, will wake us.
            if flying.len() == before || closed {
                return Poll::Pending;
            }
        }
    })
    .await;
}
