//! The accept loop: HTTP/1.1 and HTTP/2 cleartext (prior knowledge) with a header size cap and a header read
//! timeout; a cap on open connections that closes idle ones first; accept
//! back-off when the process is out of file descriptors, logged once per
//! episode; DashScope-shaped answers where hyper would answer a head it
//! cannot parse with a bare status; and a graceful shutdown that lets
//! in-flight answers (streams included) finish up to a deadline and closes
//! at once the connections that owe nothing (idle, or still sending a
//! head).

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use axum::extract::ConnectInfo;
use http::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tower_service::Service;

use super::metrics::Metrics;
use super::metrics::route_label;
use super::respond::{Refusal, raw_answer};
use crate::body::{BodyEnd, Observed};
use crate::classify::Outcome;
use crate::request::Protocol;
use crate::time::{self, Instant};

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest pause between accept attempts while accepting fails.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What [`serve`] needs besides the router.
pub(crate) struct Options {
    pub(crate) max_header_bytes: usize,
    pub(crate) max_connections: usize,
    pub(crate) grace: Duration,
}

/// The default connection cap: half the process's soft limit on open files
/// (each client connection may hold an upstream connection too) less a
/// reserve of 64, at least 16. The limit is read from `/proc/self/limits`
/// (Linux); where that cannot be read, a soft limit of 1024 is assumed.
pub(crate) fn default_max_connections() -> usize {
    let soft = fd_soft_limit().unwrap_or(1024);
    let n = soft.saturating_sub(64) / 2;
    usize::try_from(n).unwrap_or(usize::MAX).clamp(16, 1 << 20)
}

/// The soft `RLIMIT_NOFILE` of this process, from `/proc/self/limits`
/// (`None` when unreadable; `u64::MAX` when unlimited).
fn fd_soft_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line["Max open files".len()..].split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting, closes the connections that owe nothing, lets the others
/// finish their current exchange for up to `grace`, and drops what is
/// left.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    metrics: Arc<Metrics>,
    opts: Options,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let (tx, rx) = watch::channel(false);
    let registry = Arc::new(Registry::new(metrics.clone()));
    let slots = Arc::new(Semaphore::new(opts.max_connections));
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut failing: Option<Failing> = None;
    let mut at_cap = false;
    'accept: loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            // The connection went away before it was accepted: nothing to
            // do about it, nothing to wait for.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE, ENFILE) or memory: free
                // what idle connections hold and back off, logging once per
                // episode rather than once per attempt.
                let f = failing.get_or_insert_with(|| {
                    tracing::warn!(
                        error = %e,
                        open_connections = conns.len(),
                        "accepting connections fails (out of file descriptors?); closing idle connections and backing off, further failures of this episode are not logged"
                    );
                    Failing {
                        since: time::now(),
                        last: time::now(),
                        attempts: 0,
                        delay: Duration::from_millis(10),
                    }
                });
                f.attempts += 1;
                f.last = time::now();
                registry.close_oldest_idle();
                let delay = f.delay;
                f.delay = (f.delay * 2).min(MAX_ACCEPT_BACKOFF);
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(delay) => continue,
                }
            }
        };
        // The episode is over once accepts have not failed for a while
        // (one success between failures does not end it).
        if let Some(f) = failing.take_if(|f| f.last.elapsed() >= EPISODE_QUIET) {
            tracing::info!(
                failed_attempts = f.attempts,
                episode_ms = f.since.elapsed().as_millis() as u64,
                "accepting connections again"
            );
        }
        let permit = match slots.clone().try_acquire_owned() {
            Ok(p) => {
                at_cap = false;
                p
            }
            Err(_) => {
                // At the cap: the connection idle longest makes room; with
                // none idle, this one waits for a slot (and the listener's
                // backlog for it).
                if !std::mem::replace(&mut at_cap, true) {
                    tracing::warn!(
                        max_connections = opts.max_connections,
                        "connection cap reached; closing idle connections first, new ones wait for a slot"
                    );
                }
                registry.close_oldest_idle();
                tokio::select! {
                    () = &mut shutdown => break 'accept,
                    p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                }
            }
        };
        let conn = Conn {
            state: registry.add(),
            registry: registry.clone(),
            _permit: permit,
        };
        conns.spawn(serve_conn(
            stream,
            peer,
            router.clone(),
            conn,
            opts.max_header_bytes,
            rx.clone(),
        ));
    }
    drop(listener);
    let open = conns.len();
    tracing::info!(
        open_connections = open,
        grace_ms = opts.grace.as_millis() as u64,
        "shutting down: no new connections; letting in-flight requests finish"
    );
    let _ = tx.send(true);
    let finished = tokio::time::timeout(opts.grace, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            cut = conns.len(),
            "shutdown grace period over; dropping the connections still open"
        );
    }
    conns.shutdown().await;
    tracing::info!("gateway stopped");
    Ok(())
}

/// An episode of failing accepts.
struct Failing {
    since: Instant,
    /// The last failure.
    last: Instant,
    attempts: u32,
    delay: Duration,
}

/// How long accepts must not fail for an episode of failures to be over.
const EPISODE_QUIET: Duration = Duration::from_secs(1);

/// Accept errors that concern one connection, not the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    router: axum::Router,
    conn: Conn,
    max_header_bytes: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let state = conn.state.clone();
    let io = TokioIo::new(ConnIo::new(
        stream,
        state.clone(),
        conn.registry.metrics.clone(),
    ));
    let svc_state = state.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let mut router = router.clone();
        let state = svc_state.clone();
        let serving = Serving::begin(state.clone());
        req.extensions_mut().insert(ConnectInfo(peer));
        async move {
            let res = match router.call(req).await {
                Ok(res) => res,
                Err(never) => match never {},
            };
            // Its head goes out next: not one of hyper's own.
            state.heads_due.fetch_add(1, Ordering::SeqCst);
            // The request is in progress until its answer's body is over.
            Ok::<_, Infallible>(res.map(|body| {
                let over = move |_: BodyEnd| drop(serving);
                axum::body::Body::new(Observed::plain(body, Outcome::Success, over))
            }))
        }
    });
    // HTTP/1.1, or HTTP/2 with prior knowledge (h2c), told apart by the
    // connection's first bytes.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        // hyper answers 431 when the head does not fit (answered in
        // DashScope's shape by `ConnIo`); it needs at least 8 KiB. The
        // handler enforces the exact cap.
        .max_buf_size(max_header_bytes.max(8192) + 1024)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(max_header_bytes.max(8192) + 1024).unwrap_or(u32::MAX));
    let conn_fut = builder.serve_connection(io, svc);
    let mut conn_fut = std::pin::pin!(conn_fut);
    tokio::select! {
        _ = conn_fut.as_mut() => return,
        _ = shutdown.changed() => {}
        () = state.evict.notified() => {}
    }
    // Closing: no new exchange starts. A connection that owes nothing (no
    // request in progress: idle, or still sending its head) is closed once
    // hyper has flushed what it holds; one serving a request finishes it.
    conn_fut.as_mut().graceful_shutdown();
    let done = std::future::poll_fn(|cx| Poll::Ready(conn_fut.as_mut().poll(cx).is_ready())).await;
    if done {
        return;
    }
    if state.serving.load(Ordering::SeqCst) > 0 {
        let _ = conn_fut.await;
    }
    drop(conn);
}

/// The open connections, so that the one idle longest can be asked to
/// close.
struct Registry {
    metrics: Arc<Metrics>,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    next: AtomicU64,
    epoch: Instant,
}

impl Registry {
    fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            conns: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            epoch: time::now(),
        }
    }

    fn add(&self) -> Arc<ConnState> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            epoch: self.epoch,
            serving: AtomicUsize::new(0),
            heads_due: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            evicting: AtomicBool::new(false),
            evict: Notify::new(),
        });
        state.mark_idle();
        let mut conns = self.conns.lock().expect("registry lock");
        conns.insert(id, state.clone());
        self.metrics.connections.set(conns.len() as f64);
        state
    }

    fn remove(&self, id: u64) {
        let mut conns = self.conns.lock().expect("registry lock");
        conns.remove(&id);
        self.metrics.connections.set(conns.len() as f64);
    }

    /// Asks the connection idle longest (no request in progress) to close.
    /// Returns whether there was one.
    fn close_oldest_idle(&self) -> bool {
        let conns = self.conns.lock().expect("registry lock");
        let oldest = conns
            .values()
            .filter(|c| {
                c.serving.load(Ordering::SeqCst) == 0 && !c.evicting.load(Ordering::Relaxed)
            })
            .min_by_key(|c| (c.idle_since.load(Ordering::Relaxed), c.id));
        let Some(c) = oldest else {
            return false;
        };
        c.evicting.store(true, Ordering::Relaxed);
        c.evict.notify_one();
        self.metrics.idle_closed.increment(1);
        tracing::debug!(connection = c.id, "closing an idle connection to make room");
        true
    }
}

/// A live connection: its slot under the cap and its registry entry, both
/// given back when it ends (or its task is dropped).
struct Conn {
    state: Arc<ConnState>,
    registry: Arc<Registry>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.registry.remove(self.state.id);
    }
}

/// What the accept loop, the service and the connection's I/O share about
/// one connection.
struct ConnState {
    id: u64,
    epoch: Instant,
    /// Requests whose answer is not over (the service was called and the
    /// answer's body not dropped yet).
    serving: AtomicUsize,
    /// Answers the service returned whose head is not on the wire yet.
    heads_due: AtomicUsize,
    /// When the connection last had no request in progress (nanoseconds
    /// since the registry's epoch, on tokio's clock).
    idle_since: AtomicU64,
    evicting: AtomicBool,
    evict: Notify,
}

impl ConnState {
    fn mark_idle(&self) {
        let nanos = time::now().saturating_duration_since(self.epoch).as_nanos();
        self.idle_since
            .store(u64::try_from(nanos).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// One request in progress on a connection, until its answer's body is
/// dropped.
struct Serving(Arc<ConnState>);

impl Serving {
    fn begin(state: Arc<ConnState>) -> Self {
        state.serving.fetch_add(1, Ordering::SeqCst);
        Serving(state)
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        if self.0.serving.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.mark_idle();
        }
    }
}

/// The first bytes of a request head kept to tell its dialect.
const SNIFF: usize = 40;

/// A connection's socket as hyper sees it. It lets everything through,
/// except the bare answer hyper writes for a head it cannot parse (400,
/// 414, 431 with an empty body, written when no answer of the service is
/// due): that one is replaced by the same status in DashScope's shape, in
/// the dialect of the request line when it was seen, and counted.
struct ConnIo {
    inner: TcpStream,
    state: Arc<ConnState>,
    metrics: Arc<Metrics>,
    sniff: [u8; SNIFF],
    sniffed: usize,
    sniffing: bool,
    /// The last write did not take all it was given: the next one goes on
    /// with the same bytes, not with a new answer.
    partial: bool,
    /// The answer written instead of hyper's, and how much of it is out.
    replacement: Option<(Vec<u8>, usize)>,
}

impl ConnIo {
    fn new(inner: TcpStream, state: Arc<ConnState>, metrics: Arc<Metrics>) -> Self {
        Self {
            inner,
            state,
            metrics,
            sniff: [0; SNIFF],
            sniffed: 0,
            sniffing: true,
            partial: false,
            replacement: None,
        }
    }

    /// Looks at the start of what hyper writes: counts the service's own
    /// heads, and replaces hyper's own error answer.
    fn inspect(&mut self, first: &[u8]) {
        if self.partial || !first.starts_with(b"HTTP/1.") || first.get(9) == Some(&b'1') {
            return;
        }
        let due = self.state.heads_due.load(Ordering::SeqCst);
        if due > 0 {
            self.state.heads_due.fetch_sub(1, Ordering::SeqCst);
            self.sniffed = 0;
            self.sniffing = true;
            return;
        }
        if self.state.serving.load(Ordering::SeqCst) > 0 || !is_bare_error(first) {
            return;
        }
        let refusal = match first.get(9..12) {
            Some(b"431") => Refusal::HeadersTooLarge,
            Some(b"414") => Refusal::UriTooLong,
            _ => Refusal::MalformedRequest,
        };
        let head = &self.sniff[..self.sniffed];
        let protocol = if memchr::memmem::find(head, b" /compatible-mode/").is_some() {
            Protocol::Compatible
        } else {
            Protocol::Native
        };
        self.metrics.refusal(None, refusal);
        self.metrics
            .request(None, route_label(None), refusal.status().as_u16());
        tracing::debug!(
            status = refusal.status().as_u16(),
            "refused: the request head could not be parsed"
        );
        self.replacement = Some((raw_answer(protocol, refusal), 0));
    }

    /// Writes what is left of the replacement answer.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some((bytes, done)) = &mut self.replacement else {
            return Poll::Ready(Ok(()));
        };
        while *done < bytes.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *done += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// Whether `buf` is exactly a body-less 4xx head, as hyper writes for a
/// head it cannot parse.
fn is_bare_error(buf: &[u8]) -> bool {
    buf.starts_with(b"HTTP/1.1 4")
        && buf.ends_with(b"\r\n\r\n")
        && memchr::memmem::find(buf, b"\r\n\r\n") == Some(buf.len() - 4)
        && memchr::memmem::find(buf, b"\r\ncontent-length: 0\r\n").is_some()
}

impl AsyncRead for ConnIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        if this.sniffing {
            let new = &buf.filled()[before..];
            let n = new.len().min(SNIFF - this.sniffed);
            this.sniff[this.sniffed..this.sniffed + n].copy_from_slice(&new[..n]);
            this.sniffed += n;
            this.sniffing = this.sniffed < SNIFF;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ConnIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.replacement.is_none() {
            this.inspect(buf);
        }
        if this.replacement.is_some() {
            // hyper's bytes are dropped; ours go instead.
            ready!(this.drain(cx))?;
            return Poll::Ready(Ok(buf.len()));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.partial = n < buf.len();
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if this.replacement.is_none()
            && let Some(first) = bufs.iter().find(|b| !b.is_empty())
        {
            this.inspect(first);
        }
        if this.replacement.is_some() {
            ready!(this.drain(cx))?;
            return Poll::Ready(Ok(total));
        }
        let n = ready!(Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))?;
        this.partial = n < total;
        Poll::Ready(Ok(n))
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
