//! The accept loop: each connection is served by hyper's HTTP/1 server with
//! the axum router, and can be dropped on purpose (with a TCP reset) by a
//! handler or a body.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tower_service::Service;

use super::body::Tracked;
use super::stats::Counters;

/// Lets a handler or a body drop its connection.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConnCtl(Arc<CtlInner>);

#[derive(Debug, Default)]
struct CtlInner {
    killed: AtomicBool,
    notify: Notify,
}

impl ConnCtl {
    /// Drops the connection as soon as its task runs: no further byte is
    /// sent, and the socket is closed with a reset.
    pub(crate) fn kill(&self) {
        self.0.killed.store(true, Ordering::SeqCst);
        self.0.notify.notify_one();
    }

    pub(crate) fn is_killed(&self) -> bool {
        self.0.killed.load(Ordering::SeqCst)
    }

    async fn killed(&self) {
        self.0.notify.notified().await;
    }
}

/// The TCP stream, which is closed with a reset (`SO_LINGER` 0) when its
/// connection was killed.
struct KillableIo {
    stream: TcpStream,
    ctl: ConnCtl,
}

impl Drop for KillableIo {
    fn drop(&mut self) {
        if self.ctl.is_killed() {
            // A zero linger never blocks: the kernel discards unsent data and
            // sends RST on close, which is exactly the fault wanted here.
            #[allow(deprecated)]
            let _ = self.stream.set_linger(Some(Duration::ZERO));
        }
    }
}

impl AsyncRead for KillableIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for KillableIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Accepts connections until `shutdown` changes (or its sender is gone),
/// then lets open connections finish for up to `grace` and drops the rest.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    counters: Counters,
    mut shutdown: watch::Receiver<bool>,
    grace: Duration,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_conn(
                        stream,
                        router.clone(),
                        counters.clone(),
                        shutdown.clone(),
                    ));
                }
                // Out of file descriptors and the like: back off a little.
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
    conns.shutdown().await;
}

async fn serve_conn(
    stream: TcpStream,
    router: axum::Router,
    counters: Counters,
    mut shutdown: watch::Receiver<bool>,
) {
    let ctl = ConnCtl::default();
    let io = TokioIo::new(KillableIo {
        stream,
        ctl: ctl.clone(),
    });
    let conn_ctl = ctl.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        let guard = counters.request_started();
        req.extensions_mut().insert(conn_ctl.clone());
        let mut router = router.clone();
        let counters = counters.clone();
        async move {
            let res = match std::future::poll_fn(|cx| {
                <axum::Router as Service<Request<Incoming>>>::poll_ready(&mut router, cx)
            })
            .await
            {
                Ok(()) => router.call(req).await,
                Err(e) => Err(e),
            };
            let res = match res {
                Ok(res) => res,
                Err(never) => match never {},
            };
            counters.status(res.status().as_u16());
            Ok::<_, Infallible>(res.map(|b| Tracked::new(b, guard)))
        }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = ctl.killed() => return,
        _ = shutdown.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = ctl.killed() => {}
    }
}
