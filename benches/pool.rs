//! The account pool against the mock DashScope, side by side in one run.
//!
//! **Goodput** (real time, `--secs` per case, default 20): 40 callers loop
//! on `qwen-plus` chat calls for the whole window; the mock gives every
//! account 300 RPM (5 RPS as DashScope enforces it per second) and answers
//! after 20-60 ms. Each case gets a fresh mock. Every account stack is
//! circuit breaker → rate limit (wait mode, `qwen_limits(300, ..)`, keyed
//! by model) → one shared hyper client. Calls still waiting when the window
//! closes are cancelled (never sent). The cases:
//!
//! * `pool, 2 accounts`: [`Pool`] over two keys of two accounts;
//! * `pool, 2 keys of 1 account`: the same pool, but both keys belong to
//!   one account (each key has its own local limiter, which believes in a
//!   quota of its own);
//! * `pool, 2 keys of 1 account, 1 limiter`: both keys share one local
//!   limiter (the caller knows they are one account);
//! * `single key`: one account stack, no pool;
//! * `tower Balance, 2 accounts`: what a user would reach for instead:
//!   `tower::balance::p2c::Balance` (power of two choices over
//!   `PendingRequests`) behind a `Buffer`, over the same two account stacks,
//!   each setting its key;
//! * `..., 1 unreachable`: the pool and `Balance` again, but the second
//!   account's upstream refuses connections (its region is down); its
//!   breaker opens after 3 failures.
//!
//! A caller that gets an error (a failed call, an open circuit) waits the
//! error's `retry_after` (or 100 ms) and goes on; "errors to callers"
//! counts them. 429s are counted by the mock.
//!
//! **Overhead** (real time, in memory): the mean cost of one call through
//! an account stack over an always-ready in-memory upstream, directly,
//! through a pool of 2 and of 8 accounts, and through tower's `Balance`
//! over 2; median of 5 rounds.
//!
//! ```text
//! cargo bench --bench pool --features pool,mock -- [--secs 20] [--callers 40] [--iters 200000] [--skip-goodput]
//! ```

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Mutex;
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::ServiceList;
use tower::load::{CompleteOnResponse, PendingRequests};
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::circuit_breaker::{BreakerHandle, CircuitBreaker, CircuitBreakerLayer};
use tower_qwen::classify::Classifier;
use tower_qwen::key::ByModel;
use tower_qwen::mock::{Dist, FaultPlan, Latency, MockDashScope, Quota as MockQuota};
use tower_qwen::pool::{Account, Pool};
use tower_qwen::rate_limit::{Limits, Quota, RateLimit, RateLimitLayer, RateLimiter, qwen_limits};
use tower_qwen::time;
use tower_qwen::util::rng::SeededRng;

const CHAT: &str = "/compatible-mode/v1/chat/completions";
const BODY: &[u8] =
    br#"{"model":"qwen-plus","max_tokens":20,"messages":[{"role":"user","content":"hello there"}]}"#;

struct Args {
    secs: u64,
    callers: usize,
    iters: usize,
}

fn args() -> Args {
    let mut a = Args {
        secs: 20,
        callers: 40,
        iters: 200_000,
    };
    let argv: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        argv.iter()
            .position(|x| x == name)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(v) = value("--secs") {
        a.secs = v.clamp(1, 600);
    }
    if let Some(v) = value("--callers") {
        a.callers = v.clamp(1, 10_000) as usize;
    }
    if let Some(v) = value("--iters") {
        a.iters = v.clamp(1, 10_000_000) as usize;
    }
    a
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

type Limiter = RateLimiter<Option<Arc<str>>>;

/// The hyper client, or (`down`) an unreachable upstream: every call fails
/// at once with a connection error, as when an account's region is down.
#[derive(Clone)]
struct Transport {
    http: Client<HttpConnector, Full<Bytes>>,
    down: bool,
}

type TransportFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<Response<Incoming>, BoxError>> + Send>,
>;

impl Service<Request<Full<Bytes>>> for Transport {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = TransportFuture;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Full<Bytes>>) -> TransportFuture {
        if self.down {
            return Box::pin(async {
                Err(std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into())
            });
        }
        let fut = self.http.request(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

/// One account's stack: breaker → rate limit (wait) → `inner`.
fn stack<S: Clone>(
    inner: &S,
    limiter: &Limiter,
) -> (
    CircuitBreaker<RateLimit<S, Limiter, ByModel>>,
    BreakerHandle,
) {
    let breaker = CircuitBreakerLayer::new();
    let handle = breaker.handle();
    let rl = RateLimitLayer::keyed(limiter.clone(), ByModel).wait(Duration::from_secs(60));
    (breaker.layer(rl.layer(inner.clone())), handle)
}

fn account_limiter() -> Limiter {
    RateLimiter::builder(qwen_limits(300, 10_000_000)).build_keyed()
}

/// The services under test, erased: they answer with the status once the
/// body has been read.
type Svc = BoxCloneService<Request<Full<Bytes>>, u16, BoxError>;

fn status_of<S, B>(svc: S) -> Svc
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    BoxCloneService::new(
        svc.map_err(Into::into)
            .and_then(|res: Response<B>| async move {
                let status = res.status().as_u16();
                res.into_body().collect().await.map_err(Into::into)?;
                Ok::<_, BoxError>(status)
            }),
    )
}

/// Sets a key on every request (for the cases without a pool).
fn with_key<S>(
    svc: S,
    key: &str,
) -> impl Service<Request<Full<Bytes>>, Response = S::Response, Error = S::Error, Future = S::Future>
+ Clone
+ use<S>
where
    S: Service<Request<Full<Bytes>>> + Clone,
{
    let v = HeaderValue::from_str(&format!("Bearer {key}")).unwrap();
    ServiceBuilder::new()
        .map_request(move |mut req: Request<Full<Bytes>>| {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, v.clone());
            req
        })
        .service(svc)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    PoolTwoAccounts,
    PoolOneAccount,
    PoolOneAccountShared,
    SingleKey,
    BalanceTwoAccounts,
    PoolOneDown,
    BalanceOneDown,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::PoolTwoAccounts => "pool, 2 accounts",
            Case::PoolOneAccount => "pool, 2 keys of 1 account",
            Case::PoolOneAccountShared => "pool, 2 keys of 1 account, 1 limiter",
            Case::SingleKey => "single key",
            Case::BalanceTwoAccounts => "tower Balance, 2 accounts",
            Case::PoolOneDown => "pool, 2 accounts, 1 unreachable",
            Case::BalanceOneDown => "tower Balance, 2 accounts, 1 unreachable",
        }
    }

    fn keys(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Case::PoolTwoAccounts
            | Case::BalanceTwoAccounts
            | Case::PoolOneDown
            | Case::BalanceOneDown => &[("sk-1", "acme"), ("sk-2", "globex")],
            Case::PoolOneAccount | Case::PoolOneAccountShared => {
                &[("sk-1", "acme"), ("sk-2", "acme")]
            }
            Case::SingleKey => &[("sk-1", "acme")],
        }
    }
}

struct Row {
    case: &'static str,
    ok: u64,
    secs: f64,
    upstream: u64,
    upstream_429: u64,
    errors: u64,
    p50: Duration,
    p99: Duration,
}

async fn goodput(case: Case, a: &Args) -> Row {
    let mut b = MockDashScope::builder()
        .default_quota(MockQuota::new(
            nz(300),
            NonZeroU64::new(10_000_000).unwrap(),
        ))
        .output_tokens(nz(20))
        .faults(
            FaultPlan::new().latency(Latency::none().time_to_headers(Dist::uniform(
                Duration::from_millis(20),
                Duration::from_millis(60),
            ))),
        )
        .seed(3);
    for (key, account) in case.keys() {
        b = b.key(*key, *account);
    }
    let m = b.start().await.expect("mock starts");
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let client = Transport { http, down: false };
    // The second account's region is unreachable in the "down" cases.
    let second = Transport {
        down: matches!(case, Case::PoolOneDown | Case::BalanceOneDown),
        ..client.clone()
    };
    let transport = |i: usize| if i == 1 { &second } else { &client };
    let shared = account_limiter();
    let svc: Svc = match case {
        Case::SingleKey => {
            let (s, _) = stack(&client, &shared);
            status_of(with_key(s, "sk-1"))
        }
        Case::BalanceTwoAccounts | Case::BalanceOneDown => {
            let list: Vec<_> = case
                .keys()
                .iter()
                .enumerate()
                .map(|(i, (key, _))| {
                    let (s, _) = stack(transport(i), &account_limiter());
                    PendingRequests::new(with_key(s, key), CompleteOnResponse::default())
                })
                .collect();
            let balance = Balance::new(ServiceList::new(list));
            status_of(Buffer::new(balance, 1024))
        }
        _ => {
            let accounts = case.keys().iter().enumerate().map(|(i, (key, _))| {
                let limiter = if case == Case::PoolOneAccountShared {
                    shared.clone()
                } else {
                    account_limiter()
                };
                let (s, handle) = stack(transport(i), &limiter);
                Account::new(format!("account-{i}"), *key, s)
                    .unwrap()
                    .limiter(limiter, ByModel)
                    .breaker(handle)
            });
            let pool = Pool::builder()
                .accounts(accounts)
                .rng(SeededRng::new(1))
                .build()
                .unwrap();
            status_of(pool)
        }
    };

    let url = format!("{}{CHAT}", m.base_url());
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let start = time::now();
    let deadline = start + Duration::from_secs(a.secs);
    let mut tasks = Vec::new();
    for _ in 0..a.callers {
        let (svc, url, ok, errors, latencies) = (
            svc.clone(),
            url.clone(),
            ok.clone(),
            errors.clone(),
            latencies.clone(),
        );
        tasks.push(tokio::spawn(async move {
            while time::now() < deadline {
                let req = Request::post(&url)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(BODY)))
                    .unwrap();
                let t0 = time::now();
                match tokio::time::timeout_at(deadline, svc.clone().oneshot(req)).await {
                    Err(_) => break, // the window closed: cancelled, never sent
                    Ok(Ok(200)) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                        latencies.lock().await.push(time::now() - t0);
                    }
                    Ok(Ok(_)) => {} // a 429 (counted by the mock)
                    Ok(Err(e)) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        let wait = Classifier::new()
                            .classify_error(&e)
                            .retry_after()
                            .unwrap_or(Duration::from_millis(100));
                        let until = time::now() + wait.max(Duration::from_millis(10));
                        tokio::time::sleep_until(until.min(deadline)).await;
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Only calls that ended inside the window count.
    let secs = (deadline - start).as_secs_f64();
    let stats = m.stats();
    m.shutdown().await;
    let mut lat = std::mem::take(&mut *latencies.lock().await);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Row {
        case: case.name(),
        ok: ok.load(Ordering::Relaxed),
        secs,
        upstream: stats.requests,
        upstream_429: stats.status(429),
        errors: errors.load(Ordering::Relaxed),
        p50: pct(0.5),
        p99: pct(0.99),
    }
}

// ---------------------------------------------------------------------------
// Overhead

type Mem = tower::util::ServiceFn<
    fn(Request<Full<Bytes>>) -> std::future::Ready<Result<Response<Full<Bytes>>, BoxError>>,
>;

fn mem_upstream() -> Mem {
    fn answer(
        _: Request<Full<Bytes>>,
    ) -> std::future::Ready<Result<Response<Full<Bytes>>, BoxError>> {
        std::future::ready(Ok(Response::new(Full::new(Bytes::from_static(b"{}")))))
    }
    tower::service_fn(answer as fn(_) -> _)
}

fn huge_limiter() -> Limiter {
    RateLimiter::builder(Limits::requests(Quota::per_second(nz(u32::MAX)))).build_keyed()
}

fn mem_pool(n: usize) -> Pool<CircuitBreaker<RateLimit<Mem, Limiter, ByModel>>> {
    let up = mem_upstream();
    let accounts = (0..n).map(|i| {
        let limiter = huge_limiter();
        let (s, h) = stack(&up, &limiter);
        Account::new(format!("a{i}"), format!("sk-{i}"), s)
            .unwrap()
            .limiter(limiter, ByModel)
            .breaker(h)
    });
    Pool::builder()
        .accounts(accounts)
        .rng(SeededRng::new(1))
        .build()
        .unwrap()
}

/// Mean ns per call of `iters` sequential calls, median of 5 rounds.
async fn per_call<S>(mut svc: S, iters: usize) -> f64
where
    S: Service<Request<Full<Bytes>>>,
    S::Error: std::fmt::Debug,
{
    let mut rounds = Vec::new();
    for _ in 0..5 {
        let t0 = time::now();
        for _ in 0..iters {
            let req = Request::post(CHAT)
                .body(Full::new(Bytes::from_static(BODY)))
                .unwrap();
            let res = svc.ready().await.unwrap().call(req).await.unwrap();
            drop(res);
        }
        rounds.push((time::now() - t0).as_nanos() as f64 / iters as f64);
    }
    rounds.sort_by(f64::total_cmp);
    rounds[2]
}

async fn overhead(a: &Args) -> Vec<(&'static str, f64)> {
    let up = mem_upstream();
    let direct = {
        let (s, _) = stack(&up, &huge_limiter());
        with_key(s, "sk-0")
    };
    let balance = {
        let list: Vec<_> = (0..2)
            .map(|i| {
                let (s, _) = stack(&up, &huge_limiter());
                PendingRequests::new(
                    with_key(s, &format!("sk-{i}")),
                    CompleteOnResponse::default(),
                )
            })
            .collect();
        Balance::new(ServiceList::new(list))
    };
    vec![
        ("account stack, direct", per_call(direct, a.iters).await),
        ("pool of 2 accounts", per_call(mem_pool(2), a.iters).await),
        ("pool of 8 accounts", per_call(mem_pool(8), a.iters).await),
        ("tower Balance of 2", per_call(balance, a.iters).await),
    ]
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "pool bench: {} s per case, {} callers, mock quota 300 RPM (5 RPS) per account, 20-60 ms to headers",
        a.secs, a.callers
    );
    let mut rows = Vec::new();
    let skip_goodput = std::env::args().any(|x| x == "--skip-goodput");
    let cases = if skip_goodput {
        vec![]
    } else {
        vec![
            Case::PoolTwoAccounts,
            Case::PoolOneAccount,
            Case::PoolOneAccountShared,
            Case::SingleKey,
            Case::BalanceTwoAccounts,
            Case::PoolOneDown,
            Case::BalanceOneDown,
        ]
    };
    for case in cases {
        let row = rt.block_on(goodput(case, &a));
        eprintln!("  done: {}", row.case);
        rows.push(row);
    }
    println!();
    println!(
        "| case | goodput (ok/s) | ok | upstream calls | upstream 429s | errors to callers | p50 | p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {} | {} | {} | {} | {:.0} ms | {:.0} ms |",
            r.case,
            r.ok as f64 / r.secs,
            r.ok,
            r.upstream,
            r.upstream_429,
            r.errors,
            r.p50.as_secs_f64() * 1e3,
            r.p99.as_secs_f64() * 1e3,
        );
    }

    let rt1 = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let o = rt1.block_on(overhead(&a));
    let base = o[0].1;
    println!();
    println!(
        "| per call, in memory ({} calls x 5 rounds, median) | ns/call | vs direct |",
        a.iters
    );
    println!("|---|---:|---:|");
    for (name, ns) in &o {
        println!("| {name} | {ns:.0} | {:+.0} ns |", ns - base);
    }
}
