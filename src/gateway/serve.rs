//! The accept loop: HTTP/1.1 with a header size cap and a header read
//! timeout, and a graceful shutdown that lets in-flight answers (streams
//! included) finish up to a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower_service::Service;

/// Serves `router` on `listener` until `shutdown` completes, then stops
/// accepting, lets each open connection finish its current exchange for up
/// to `grace`, and drops what is left.
pub(crate) async fn serve(
    listener: TcpListener,
    router: axum::Router,
    max_header_bytes: usize,
    grace: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> io::Result<()> {
    let (tx, rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    conns.spawn(serve_conn(stream, router.clone(), max_header_bytes, rx.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off a little.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let open = conns.len();
    tracing::info!(
        open_connections = open,
        grace_ms = grace.as_millis() as u64,
        "shutting down: no new connections; letting in-flight requests finish"
    );
    let _ = tx.send(true);
    let finished =
        tokio::time::timeout(grace, async { while conns.join_next().await.is_some() {} }).await;
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

async fn serve_conn(
    stream: TcpStream,
    router: axum::Router,
    max_header_bytes: usize,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut router = router.clone();
        async move {
            match router.call(req).await {
                Ok(res) => Ok::<_, Infallible>(res),
                Err(never) => match never {},
            }
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30))
        // hyper answers 431 when the head does not fit; it needs at least
        // 8 KiB. The handler enforces the exact cap.
        .max_buf_size(max_header_bytes.max(8192) + 1024)
        .keep_alive(true)
        .serve_connection(io, svc);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = shutdown.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}
