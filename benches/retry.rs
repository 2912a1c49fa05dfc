//! Happy-path overhead of the retry and timeout layers, side by side with
//! tower's in one run.
//!
//! Every iteration builds a request, drives `ready().call()` on the stack and
//! reads the whole response body; the inner service answers at once. The
//! difference to the "no layer" row is the layer's per-request cost:
//!
//! * retry: tower-qwen's `Retry` (clone the request for a replay, deposit in
//!   the budget, and read the body up to the verdict: the whole small JSON
//!   body, or an SSE stream up to its first data line) vs tower's `Retry`
//!   with `ExponentialBackoff` + `TpsBudget` (clone the request, deposit on
//!   success; it never looks at a body);
//! * timeout: tower-qwen's `Timeout` with all three timeouts on (header,
//!   idle between frames, total) vs tower's `Timeout` (headers only), on a
//!   20-frame SSE body.
//!
//! ```text
//! cargo bench --features retry,timeout --bench retry -- --warm-up-time 1 --measurement-time 3
//! ```

use std::convert::Infallible;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use futures_util::stream;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::util::rng::HasherRng;
use tower::{Layer, Service, ServiceExt};
use tower_qwen::retry::RetryLayer;
use tower_qwen::timeout::TimeoutLayer;

const JSON: &[u8] = br#"{"output":{"choices":[{"message":{"content":"Hello! How can I help you today?","role":"assistant"},"finish_reason":"stop"}]},"usage":{"input_tokens":12,"output_tokens":10,"total_tokens":22},"request_id":"9d3c1a2b-0f1e-4c5d-8e7f-123456789abc"}"#;
const FRAME: &[u8] = b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"Hel\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]},\"usage\":{\"input_tokens\":12,\"output_tokens\":1},\"request_id\":\"9d3c\"}\n\n";
const REQ: &[u8] = br#"{"model":"qwen-plus","input":{"messages":[{"role":"user","content":"Hello"}]},"parameters":{"result_format":"message"}}"#;

type SseBody = StreamBody<stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn request() -> Request<Full<Bytes>> {
    Request::post("http://127.0.0.1/api/v1/services/aigc/text-generation/generation")
        .header("authorization", "Bearer sk-bench")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(REQ)))
        .unwrap()
}

fn json_service() -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(|_req: Request<Full<Bytes>>| async {
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from_static(JSON)))
                .unwrap(),
        )
    })
}

fn sse_service(
    frames: usize,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<SseBody>,
    Error = Infallible,
    Future = impl Send,
> + Clone {
    tower::service_fn(move |_req: Request<Full<Bytes>>| async move {
        let frames: Vec<_> = (0..frames)
            .map(|_| Ok(Frame::data(Bytes::from_static(FRAME))))
            .collect();
        Ok::<_, Infallible>(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(StreamBody::new(stream::iter(frames)))
                .unwrap(),
        )
    })
}

#[derive(Clone)]
struct TowerPolicy {
    backoff: ExponentialBackoff<HasherRng>,
    budget: Arc<TpsBudget>,
    retries: u32,
}

impl TowerPolicy {
    fn new() -> Self {
        let mut maker = ExponentialBackoffMaker::new(
            Duration::from_millis(500),
            Duration::from_secs(8),
            1.0,
            HasherRng::default(),
        )
        .unwrap();
        Self {
            backoff: maker.make_backoff(),
            budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2)),
            retries: 0,
        }
    }
}

impl<ResB, E> tower::retry::Policy<Request<Full<Bytes>>, Response<ResB>, E> for TowerPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _req: &mut Request<Full<Bytes>>,
        result: &mut Result<Response<ResB>, E>,
    ) -> Option<Self::Future> {
        let retryable = match result {
            Ok(res) => res.status() == 429 || res.status().is_server_error(),
            Err(_) => true,
        };
        if !retryable {
            self.budget.deposit();
            return None;
        }
        if self.retries >= 2 || !self.budget.withdraw() {
            return None;
        }
        self.retries += 1;
        Some(self.backoff.next_backoff())
    }

    fn clone_request(&mut self, req: &Request<Full<Bytes>>) -> Option<Request<Full<Bytes>>> {
        let mut r = Request::new(req.body().clone());
        *r.method_mut() = req.method().clone();
        *r.uri_mut() = req.uri().clone();
        *r.headers_mut() = req.headers().clone();
        Some(r)
    }
}

/// Time per request through `svc`, body read to its end.
fn bench_stack<S, B>(c: &mut Criterion, group: &str, name: &str, svc: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group(group);
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut svc = svc.clone();
            rt.block_on(async {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
                    let body = res.into_body().collect().await.unwrap();
                    black_box(body);
                }
                start.elapsed()
            })
        })
    });
    g.finish();
}

fn retry(c: &mut Criterion) {
    let tower_layer = tower::retry::RetryLayer::new(TowerPolicy::new());
    let ours = RetryLayer::new();

    bench_stack(c, "retry/json", "no layer", json_service());
    bench_stack(
        c,
        "retry/json",
        "tower Retry",
        tower_layer.layer(json_service()),
    );
    bench_stack(
        c,
        "retry/json",
        "tower-qwen Retry",
        ours.layer(json_service()),
    );

    bench_stack(c, "retry/sse-20-frames", "no layer", sse_service(20));
    bench_stack(
        c,
        "retry/sse-20-frames",
        "tower Retry",
        tower_layer.layer(sse_service(20)),
    );
    bench_stack(
        c,
        "retry/sse-20-frames",
        "tower-qwen Retry",
        ours.layer(sse_service(20)),
    );
    // Before #15: the first data line decides, without looking for output.
    bench_stack(
        c,
        "retry/sse-20-frames",
        "tower-qwen Retry, Hold::NONE",
        RetryLayer::new()
            .hold(tower_qwen::retry::Hold::NONE)
            .layer(sse_service(20)),
    );
}

fn timeout(c: &mut Criterion) {
    let all_three = TimeoutLayer::new()
        .header(Duration::from_secs(30))
        .idle(Duration::from_secs(30))
        .total(Duration::from_secs(300));
    let tower_timeout = tower::timeout::TimeoutLayer::new(Duration::from_secs(30));

    bench_stack(c, "timeout/sse-20-frames", "no layer", sse_service(20));
    bench_stack(
        c,
        "timeout/sse-20-frames",
        "tower Timeout (headers only)",
        tower_timeout.layer(sse_service(20)),
    );
    bench_stack(
        c,
        "timeout/sse-20-frames",
        "tower-qwen Timeout (header+idle+total)",
        all_three.layer(sse_service(20)),
    );
}

/// What one read of tokio's clock costs in this build. Dev-dependencies turn
/// on tokio's `test-util`, which routes every `tokio::time::Instant::now()`
/// through the pausable clock; both crates' layers read it, so this is
/// part of every number above (and not of a release build of an
/// application).
fn clock(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    let mut g = c.benchmark_group("clock");
    g.bench_function("tokio Instant::now (test-util build)", |b| {
        b.iter(|| black_box(tokio::time::Instant::now()))
    });
    g.bench_function("std Instant::now", |b| {
        b.iter(|| black_box(std::time::Instant::now()))
    });
    g.finish();
}

criterion_group!(benches, retry, timeout, clock);

/// `RETRY_BENCH_ONLY=<stack> RETRY_BENCH_ITERS=<n>` runs `n` requests
/// through one stack and exits, for an instruction count under
/// `valgrind --tool=callgrind` (noise-free on a busy machine): subtract the
/// `none` run from the others. Stacks: `none`, `tower-retry`, `qwen-retry`,
/// `tower-timeout`, `qwen-timeout`, each with `-json` or `-sse`.
fn counted() -> bool {
    let Ok(only) = std::env::var("RETRY_BENCH_ONLY") else {
        return false;
    };
    let iters: u64 = std::env::var("RETRY_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    fn run<S, B>(svc: S, iters: u64)
    where
        S: Service<Request<Full<Bytes>>, Response = Response<B>>,
        S::Error: std::fmt::Debug,
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut svc = svc;
        rt.block_on(async {
            for _ in 0..iters {
                let res = svc.ready().await.unwrap().call(request()).await.unwrap();
                black_box(res.into_body().collect().await.unwrap());
            }
        });
    }
    let tower_retry = tower::retry::RetryLayer::new(TowerPolicy::new());
    let all_three = TimeoutLayer::new()
        .header(Duration::from_secs(30))
        .idle(Duration::from_secs(30))
        .total(Duration::from_secs(300));
    let tower_timeout = tower::timeout::TimeoutLayer::new(Duration::from_secs(30));
    match only.as_str() {
        "none-json" => run(json_service(), iters),
        "none-sse" => run(sse_service(20), iters),
        "tower-retry-json" => run(tower_retry.layer(json_service()), iters),
        "tower-retry-sse" => run(tower_retry.layer(sse_service(20)), iters),
        "qwen-retry-json" => run(RetryLayer::new().layer(json_service()), iters),
        "qwen-retry-sse" => run(RetryLayer::new().layer(sse_service(20)), iters),
        "tower-timeout-sse" => run(tower_timeout.layer(sse_service(20)), iters),
        "qwen-timeout-sse" => run(all_three.layer(sse_service(20)), iters),
        other => panic!("unknown stack {other}"),
    }
    true
}

fn main() {
    if counted() {
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
