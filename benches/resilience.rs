//! Happy-path overhead per call of the concurrency limit and the circuit
//! breaker, side by side with the crates a user would pick instead:
//! tower's `ConcurrencyLimit` / `GlobalConcurrencyLimit`, tower-resilience's
//! bulkhead and circuit breaker.
//!
//! Each call is `ready().await` + `call(req).await` + reading the response
//! body to its end (one small data frame), so our permit, which lives until
//! the body ends, is measured with the body. The inner service answers at
//! once. "2 threads" runs two OS threads, each on its own current-thread
//! runtime, each making `iters` calls through clones of one service: the
//! time is per call per thread (contention on the shared state shows up
//! there).
//!
//! ```text
//! cargo bench --bench resilience --features concurrency,circuit-breaker -- --warm-up-time 1 --measurement-time 3
//! ```

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::num::NonZeroUsize;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_qwen::circuit_breaker::CircuitBreakerLayer;
use tower_qwen::classify::{FnClassifier, Outcome};
use tower_qwen::concurrency::ConcurrencyLimitLayer;

const LIMIT: usize = 1024;

/// The upstream: answers at once with a one-frame body.
#[derive(Clone, Copy)]
struct Upstream;

impl Service<Request<()>> for Upstream {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<()>) -> Self::Future {
        ready(Ok(Response::new(Full::new(Bytes::from_static(
            b"{\"ok\":true}",
        )))))
    }
}

/// A non-HTTP upstream: answers a number.
#[derive(Clone, Copy)]
struct Plain;

impl Service<u32> for Plain {
    type Response = u32;
    type Error = Infallible;
    type Future = Ready<Result<u32, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, n: u32) -> Self::Future {
        ready(Ok(n))
    }
}

async fn one_http<S, B>(svc: &mut S)
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc
        .ready()
        .await
        .unwrap()
        .call(Request::new(()))
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap();
    std::hint::black_box(body);
}

async fn one_plain<S>(svc: &mut S)
where
    S: Service<u32>,
    S::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(7).await.unwrap();
    std::hint::black_box(res);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

/// Runs `iters` calls on each of `threads` threads; returns the slowest
/// thread's time.
fn run<S: Clone + Send>(
    svc: &S,
    threads: usize,
    iters: u64,
    one_thread: fn(S, u64, &Barrier) -> Duration,
) -> Duration {
    let barrier = Barrier::new(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                let svc = svc.clone();
                let barrier = &barrier;
                scope.spawn(move || one_thread(svc, iters, barrier))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .max()
            .unwrap()
    })
}

fn thread_http<S, B>(mut svc: S, iters: u64, barrier: &Barrier) -> Duration
where
    S: Service<Request<()>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let rt = runtime();
    barrier.wait();
    let start = Instant::now();
    rt.block_on(async {
        for _ in 0..iters {
            one_http(&mut svc).await;
        }
    });
    start.elapsed()
}

fn thread_plain<S>(mut svc: S, iters: u64, barrier: &Barrier) -> Duration
where
    S: Service<u32>,
    S::Error: std::fmt::Debug,
{
    let rt = runtime();
    barrier.wait();
    let start = Instant::now();
    rt.block_on(async {
        for _ in 0..iters {
            one_plain(&mut svc).await;
        }
    });
    start.elapsed()
}

fn bench_http<S, B>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
) where
    S: Service<Request<()>, Response = Response<B>> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    for threads in [1usize, 2] {
        c.bench_with_input(
            BenchmarkId::new(name, format!("{threads}t")),
            &threads,
            |b, &threads| b.iter_custom(|iters| run(&svc, threads, iters, thread_http::<S, B>)),
        );
    }
}

fn bench_plain<S>(
    c: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    svc: S,
) where
    S: Service<u32> + Clone + Send + 'static,
    S::Error: std::fmt::Debug,
    S::Future: Send,
{
    for threads in [1usize, 2] {
        c.bench_with_input(
            BenchmarkId::new(name, format!("{threads}t")),
            &threads,
            |b, &threads| b.iter_custom(|iters| run(&svc, threads, iters, thread_plain::<S>)),
        );
    }
}

fn concurrency(c: &mut Criterion) {
    let mut g = c.benchmark_group("concurrency");
    bench_http(&mut g, "none", Upstream);
    bench_http(
        &mut g,
        "tower-qwen fixed",
        ConcurrencyLimitLayer::new(NonZeroUsize::new(LIMIT).unwrap()).layer(Upstream),
    );
    bench_http(
        &mut g,
        "tower ConcurrencyLimit",
        tower::limit::ConcurrencyLimitLayer::new(LIMIT).layer(Upstream),
    );
    bench_http(
        &mut g,
        "tower GlobalConcurrencyLimit",
        tower::limit::GlobalConcurrencyLimitLayer::new(LIMIT).layer(Upstream),
    );
    bench_http(
        &mut g,
        "tower-resilience bulkhead",
        tower_resilience::bulkhead::BulkheadLayer::builder()
            .max_concurrent_calls(LIMIT)
            .build()
            .unwrap()
            .layer(Upstream),
    );
    bench_http(
        &mut g,
        "tower-qwen adaptive",
        ConcurrencyLimitLayer::adaptive(
            tower_qwen::concurrency::Aimd::new()
                .bounds(
                    NonZeroUsize::new(LIMIT).unwrap(),
                    NonZeroUsize::new(LIMIT).unwrap(),
                    NonZeroUsize::new(LIMIT).unwrap(),
                )
                .unwrap(),
        )
        .layer(Upstream),
    );
    g.finish();
}

fn breaker(c: &mut Criterion) {
    let mut g = c.benchmark_group("breaker");
    bench_http(&mut g, "none", Upstream);
    bench_http(
        &mut g,
        "tower-qwen",
        CircuitBreakerLayer::new().layer(Upstream),
    );
    bench_http(
        &mut g,
        "tower-resilience",
        tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
            .classify_response(|r: &Response<Full<Bytes>>| r.status().is_server_error())
            .build()
            .unwrap()
            .layer(Upstream),
    );
    bench_plain(&mut g, "plain none", Plain);
    bench_plain(
        &mut g,
        "plain tower-qwen",
        CircuitBreakerLayer::new()
            .classifier(FnClassifier::new(|n: &u32| {
                if *n < 500 {
                    Outcome::Success
                } else {
                    Outcome::TRANSIENT
                }
            }))
            .layer(Plain),
    );
    bench_plain(
        &mut g,
        "plain tower-resilience",
        tower_resilience::circuitbreaker::CircuitBreakerLayer::builder()
            .classify_response(|n: &u32| *n >= 500)
            .build()
            .unwrap()
            .layer(Plain),
    );
    g.finish();
}

criterion_group!(benches, concurrency, breaker);
criterion_main!(benches);
