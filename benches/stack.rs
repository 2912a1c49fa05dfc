//! What the whole tower-qwen stack adds per request, next to what a user
//! would stack from tower instead (`Retry` + `ConcurrencyLimit` + `Timeout`),
//! in one run.
//!
//! Each call is `ready` + `call` + reading the response body to its end
//! (one small JSON frame); the upstream answers at once, so the time is the
//! layers' own. Rows:
//!
//! * `upstream`: no layer;
//! * `tower`: tower's `Retry` (a policy that never retries) +
//!   `ConcurrencyLimit` + `Timeout`;
//! * `tower-qwen`: retry (classifies the answer, budget) + circuit breaker +
//!   rate limit (one global request quota that never makes anyone wait) +
//!   concurrency limit (permit held until the body ends) + timeouts (idle
//!   and total);
//! * `tower-qwen (qwen preset)`: the same with the rate limiter keyed per
//!   (account, model) and counting tokens: the request body is parsed for
//!   the model and the token estimate, and the estimate is reconciled with
//!   the answer's `usage`.
//!
//! ```text
//! cargo bench --bench stack -- --warm-up-time 1 --measurement-time 4
//! ```
//!
//! It also prints each stack's response future and response sizes. With
//! `STACK_COUNT=<calls>` (and `STACK_ONLY=<row name>`) it runs the same
//! services without criterion, for an instruction count per call under
//! callgrind (`--collect-atstart=no --toggle-collect='stack::count'`); see
//! BENCHMARKS.md.

use std::convert::Infallible;
use std::future::{Ready, ready};
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_qwen::circuit_breaker::CircuitBreakerLayer;
use tower_qwen::concurrency::ConcurrencyLimitLayer;
use tower_qwen::key::ByAccountModel;
use tower_qwen::rate_limit::{Limits, Quota, QuotaTable, RateLimitLayer};
use tower_qwen::retry::RetryLayer;
use tower_qwen::timeout::TimeoutLayer;

const BODY: &[u8] =
    br#"{"model":"qwen-plus","max_tokens":64,"messages":[{"role":"user","content":"Hello there"}]}"#;
const ANSWER: &[u8] = br#"{"choices":[{"message":{"role":"assistant","content":"Hi"}}],"usage":{"prompt_tokens":7,"completion_tokens":1,"total_tokens":8}}"#;

#[derive(Clone, Copy)]
struct Upstream;

impl Service<Request<Full<Bytes>>> for Upstream {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;
    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Request<Full<Bytes>>) -> Self::Future {
        let mut res = Response::new(Full::new(Bytes::from_static(ANSWER)));
        res.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        ready(Ok(res))
    }
}

fn request() -> Request<Full<Bytes>> {
    Request::post("/compatible-mode/v1/chat/completions")
        .header("authorization", "Bearer sk-bench")
        .body(Full::new(Bytes::from_static(BODY)))
        .unwrap()
}

/// Never retries: the same happy path as ours, where nothing fails.
#[derive(Clone, Copy)]
struct NoRetry;

impl<Req: Clone, Res, E> tower::retry::Policy<Req, Res, E> for NoRetry {
    type Future = Ready<()>;
    fn retry(&mut self, _: &mut Req, _: &mut Result<Res, E>) -> Option<Self::Future> {
        None
    }
    fn clone_request(&mut self, req: &Req) -> Option<Req> {
        Some(req.clone())
    }
}

async fn one<S, B>(svc: &mut S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let res = svc.ready().await.unwrap().call(request()).await.unwrap();
    let body = res.into_body().collect().await.unwrap();
    std::hint::black_box(body);
}

fn bench<S, B>(c: &mut Criterion, name: &str, svc: S)
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
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let mut svc = svc.clone();
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    one(&mut svc).await;
                }
                start.elapsed()
            })
        })
    });
}

/// The stacks of the benchmark, by name. Built by one function so that the
/// criterion run and the instruction count use the very same services.
macro_rules! with_stacks {
    (|$name:ident, $svc:ident| $body:block) => {{
        let nz = |n| NonZeroU32::new(n).unwrap();
        {
            let ($name, $svc) = ("stack/upstream", Upstream);
            $body
        }

        let tower_stack = ServiceBuilder::new()
            .retry(NoRetry)
            .concurrency_limit(1024)
            .timeout(Duration::from_secs(30))
            .service(Upstream);
        {
            let ($name, $svc) = (
                "stack/tower (Retry + ConcurrencyLimit + Timeout)",
                tower_stack,
            );
            $body
        }

        let huge = Limits::requests(Quota::per_second(nz(1_000_000_000)));
        let ours = ServiceBuilder::new()
            .layer(RetryLayer::new())
            .layer(CircuitBreakerLayer::new())
            .layer(RateLimitLayer::from_limits(huge))
            .layer(ConcurrencyLimitLayer::new(NonZeroUsize::new(1024).unwrap()))
            .layer(
                TimeoutLayer::new()
                    .idle(Duration::from_secs(60))
                    .total(Duration::from_secs(300)),
            )
            .service(Upstream);
        {
            let ($name, $svc) = ("stack/tower-qwen", ours);
            $body
        }

        let table = QuotaTable::new(
            Limits::requests(Quota::per_second(nz(1_000_000_000)))
                .and_tokens(Quota::per_second(nz(1_000_000_000))),
        );
        let qwen = ServiceBuilder::new()
            .layer(RetryLayer::new())
            .layer(CircuitBreakerLayer::new())
            .layer(RateLimitLayer::qwen(table, ByAccountModel::new()))
            .layer(ConcurrencyLimitLayer::new(NonZeroUsize::new(1024).unwrap()))
            .layer(
                TimeoutLayer::new()
                    .idle(Duration::from_secs(60))
                    .total(Duration::from_secs(300)),
            )
            .service(Upstream);
        {
            let ($name, $svc) = ("stack/tower-qwen (qwen preset: keyed, tokens)", qwen);
            $body
        }
    }};
}

/// The size of one call's response future and of its response.
fn sizes<S, B>(name: &str, mut svc: S)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
{
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = rt.enter();
    assert!(svc.poll_ready(&mut cx).is_ready());
    let fut = svc.call(request());
    println!(
        "{name}: response future {} bytes, response {} bytes",
        std::mem::size_of_val(&fut),
        std::mem::size_of::<Response<B>>()
    );
}

/// Runs `iters` calls through `svc` outside criterion, for an instruction
/// count under callgrind (`STACK_COUNT`, see `main`).
#[inline(never)]
fn count<S, B>(svc: &mut S, rt: &tokio::runtime::Runtime, iters: u64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    calls(svc, rt, iters);
}

/// The calls of `count`, and the warm-up before it (not counted).
fn calls<S, B>(svc: &mut S, rt: &tokio::runtime::Runtime, iters: u64)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    rt.block_on(async {
        for _ in 0..iters {
            one(svc).await;
        }
    });
}

fn stacks(c: &mut Criterion) {
    with_stacks!(|name, svc| { bench(c, name, svc) });
    with_stacks!(|name, svc| { sizes(name, svc) });
}

fn main() {
    // `STACK_COUNT=<calls> STACK_ONLY=<name>`: run the stack of that name
    // (all when unset) for that many calls, after
    // as many warm-up calls, without criterion; under callgrind with
    // `--collect-atstart=no --toggle-collect=stack::count` the instruction
    // count divided by the calls is the cost of one call.
    if let Ok(n) = std::env::var("STACK_COUNT") {
        let iters: u64 = n.parse().expect("STACK_COUNT: a number of calls");
        let only = std::env::var("STACK_ONLY").unwrap_or_default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        with_stacks!(|name, svc| {
            if only.is_empty() || name == only {
                let mut svc = svc;
                calls(&mut svc, &rt, iters);
                count(&mut svc, &rt, iters);
                println!("{name}: {iters} calls counted");
            }
        });
        with_stacks!(|name, svc| { sizes(name, svc) });
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}

criterion_group!(benches, stacks);
