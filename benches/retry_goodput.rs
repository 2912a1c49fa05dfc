//! Goodput of retry strategies against the mock DashScope, side by side in
//! one run: a quota of 10 requests per second (enforced per second, as
//! DashScope does), 30 % of admitted requests answered `503`, 1,000
//! requests from 50 concurrent callers.
//!
//! Contestants: no retry; tower's `Retry` with its `ExponentialBackoff` and
//! `TpsBudget` at their defaults (retries bounded by the budget only);
//! tower's `Retry` tuned like this crate's defaults (same attempts, same
//! budget, 0.5 s..8 s backoff); tower-qwen's `Retry` at its defaults; and
//! tower-qwen's `Retry` with a 50 % budget. Every tower policy retries
//! `429`, `5xx` and transport errors (tower has no classifier of its own)
//! and deposits on every final answer, as in tower's budget docs.
//!
//! Two workloads: requests arriving at 8 per second (under the quota, so
//! failures are mostly the injected 503s and collisions within a second),
//! and the same requests back to back from the 50 callers (far over the
//! quota: retries alone cannot save it; that is the rate limiter's job).
//!
//! Real HTTP/1 over loopback to the real mock server, on tokio's paused clock:
//! every wait (mock latency, backoff) is virtual, so the run takes seconds of
//! wall time while covering minutes of virtual time; latencies are virtual.
//! (While a request is on the wire, an idle runtime may jump the clock to
//! the next timer, which can only lengthen latencies, equally for all.)
//!
//! ```text
//! cargo bench --features retry,mock --bench retry_goodput
//! cargo bench --features retry,mock --bench retry_goodput -- --requests 2000 --seed 9
//! ```

use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::retry::backoff::{Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff};
use tower::retry::budget::{Budget as _, TpsBudget};
use tower::util::rng::HasherRng;
use tower::{BoxError, Service, ServiceExt};
use tower_qwen::mock::{
    ApiError, Dist, Fault, FaultPlan, Latency, MockDashScope, MockHandle, Quota,
};
use tower_qwen::retry::{Budget, Policy as QwenPolicy, RetryLayer};
use tower_qwen::util::rng::SeededRng;

const PATH: &str = "/api/v1/services/aigc/text-generation/generation";
const BODY: &str = r#"{"model":"qwen-plus","input":{"messages":[{"role":"user","content":"Hello"}]},"parameters":{"result_format":"message"}}"#;

#[derive(Clone, Copy)]
struct Args {
    requests: usize,
    concurrency: usize,
    rpm: u32,
    error_rate: f64,
    max_retries: u32,
    seed: u64,
    /// Offered requests per second; 0: each caller sends its next request
    /// as soon as the last one ended.
    rate: f64,
}

fn args() -> Args {
    let mut a = Args {
        requests: 1000,
        concurrency: 50,
        rpm: 600,
        error_rate: 0.3,
        max_retries: 2,
        seed: 1,
        rate: 8.0,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--requests" => a.requests = v.parse().expect("--requests N"),
            "--concurrency" => a.concurrency = v.parse().expect("--concurrency N"),
            "--rpm" => a.rpm = v.parse().expect("--rpm N"),
            "--error-rate" => a.error_rate = v.parse().expect("--error-rate P"),
            "--max-retries" => a.max_retries = v.parse().expect("--max-retries N"),
            "--seed" => a.seed = v.parse().expect("--seed N"),
            "--rate" => a.rate = v.parse().expect("--rate RPS"),
            _ => {
                i += 1; // `--bench` and friends from cargo
                continue;
            }
        }
        i += 2;
    }
    a
}

// ---------------------------------------------------------------------------
// tower's Retry with a policy in the style of tower's budget docs.

#[derive(Clone)]
struct TowerPolicy {
    backoff: ExponentialBackoff<HasherRng>,
    budget: Arc<TpsBudget>,
    max_retries: Option<u32>,
    retries: u32,
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
        if self.max_retries.is_some_and(|m| self.retries >= m) || !self.budget.withdraw() {
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

// ---------------------------------------------------------------------------
// The workload

#[derive(Default)]
struct Outcome {
    ok: usize,
    throttled: usize,
    failed: usize,
    latencies: Vec<Duration>,
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + 'a>>;

/// Sends `args.requests` requests from `args.concurrency` callers through
/// `svc`; returns how each ended.
async fn workload<S, B>(svc: S, mock: &MockHandle, args: Args) -> Outcome
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!("{}{PATH}", mock.base_url());
    let t0 = Instant::now();
    let callers: Vec<BoxFut<'static, Outcome>> = (0..args.concurrency)
        .map(|_| {
            let (svc, next, url) = (svc.clone(), next.clone(), url.clone());
            let caller: BoxFut<'static, Outcome> = Box::pin(async move {
                let mut out = Outcome::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= args.requests {
                        break;
                    }
                    if args.rate > 0.0 {
                        tokio::time::sleep_until(
                            t0 + Duration::from_secs_f64(i as f64 / args.rate),
                        )
                        .await;
                    }
                    let req = Request::post(&url)
                        .header(
                            "authorization",
                            format!("Bearer {}", MockDashScope::DEFAULT_KEY),
                        )
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                        .unwrap();
                    let start = Instant::now();
                    let status = match svc.clone().oneshot(req).await {
                        Ok(res) => {
                            let status = res.status().as_u16();
                            let read = res.into_body().collect().await.map_err(Into::into);
                            if read.is_ok() { status } else { 0 }
                        }
                        Err(_) => 0,
                    };
                    out.latencies.push(start.elapsed());
                    match status {
                        200 => out.ok += 1,
                        429 => out.throttled += 1,
                        _ => out.failed += 1,
                    }
                }
                out
            });
            caller
        })
        .collect();
    let mut total = Outcome::default();
    for o in futures_util::future::join_all(callers).await {
        total.ok += o.ok;
        total.throttled += o.throttled;
        total.failed += o.failed;
        total.latencies.extend(o.latencies);
    }
    total
}

async fn start_mock(args: Args) -> MockHandle {
    MockDashScope::builder()
        .quota(
            "qwen-plus",
            Quota::per_minute(NonZeroU32::new(args.rpm).expect("rpm > 0")),
        )
        .faults(
            FaultPlan::new()
                .with(
                    Fault::Error(ApiError::service_unavailable()),
                    args.error_rate,
                )
                .latency(Latency::none().time_to_headers(Dist::uniform(
                    Duration::from_millis(100),
                    Duration::from_millis(300),
                ))),
        )
        .seed(args.seed)
        .start()
        .await
        .expect("mock starts")
}

fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

struct Row {
    name: &'static str,
    out: Outcome,
    calls: u64,
    upstream_429: u64,
    upstream_503: u64,
    virtual_secs: f64,
    wall_secs: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn contest<S, B>(name: &'static str, svc: S, mock: MockHandle, args: Args) -> Row
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let wall = std::time::Instant::now();
    let start = Instant::now();
    let out = workload(svc, &mock, args).await;
    let virtual_secs = start.elapsed().as_secs_f64();
    let stats = mock.stats();
    let row = Row {
        name,
        out,
        calls: stats.requests,
        upstream_429: stats.status(429),
        upstream_503: stats.status(503),
        virtual_secs,
        wall_secs: wall.elapsed().as_secs_f64(),
    };
    mock.shutdown().await;
    row
}

fn tower_retry(
    backoff: ExponentialBackoffMaker<HasherRng>,
    budget: TpsBudget,
    max_retries: Option<u32>,
) -> tower::retry::Retry<TowerPolicy, Client<HttpConnector, Full<Bytes>>> {
    let mut backoff = backoff;
    let policy = TowerPolicy {
        backoff: backoff.make_backoff(),
        budget: Arc::new(budget),
        max_retries,
        retries: 0,
    };
    tower::retry::Retry::new(policy, client())
}

async fn scenario(args: Args) -> Vec<Row> {
    let mut rows = Vec::new();

    let mock = start_mock(args).await;
    rows.push(contest("no retry", client(), mock, args).await);

    let mock = start_mock(args).await;
    let svc = tower_retry(
        ExponentialBackoffMaker::default(),
        TpsBudget::default(),
        None,
    );
    rows.push(contest("tower Retry, defaults", svc, mock, args).await);

    let mock = start_mock(args).await;
    let svc = tower_retry(
        ExponentialBackoffMaker::new(
            Duration::from_millis(500),
            Duration::from_secs(8),
            1.0,
            HasherRng::default(),
        )
        .expect("valid backoff"),
        TpsBudget::new(Duration::from_secs(10), 1, 0.2),
        Some(args.max_retries),
    );
    rows.push(contest("tower Retry, tuned", svc, mock, args).await);

    let mock = start_mock(args).await;
    let layer = RetryLayer::new()
        .policy(QwenPolicy::new().max_retries(args.max_retries))
        .rng(SeededRng::new(args.seed));
    let svc = tower::ServiceBuilder::new().layer(layer).service(client());
    rows.push(contest("tower-qwen Retry", svc, mock, args).await);

    let mock = start_mock(args).await;
    let layer = RetryLayer::new()
        .policy(QwenPolicy::new().max_retries(args.max_retries))
        .budget(Budget::new(Duration::from_secs(10), 1, 0.5).expect("valid budget"))
        .rng(SeededRng::new(args.seed));
    let svc = tower::ServiceBuilder::new().layer(layer).service(client());
    rows.push(contest("tower-qwen Retry, 50% budget", svc, mock, args).await);
    rows
}

fn print(args: Args, rows: Vec<Row>) {
    let arrivals = if args.rate > 0.0 {
        format!("arriving at {} per second", args.rate)
    } else {
        String::from("back to back (no pacing)")
    };
    println!(
        "\n{} requests {arrivals}, {} callers; quota {} RPM ({} RPS, per second); {:.0}% of admitted requests 503; up to {} retries (tower defaults: budget only); seed {}\n",
        args.requests,
        args.concurrency,
        args.rpm,
        args.rpm.div_ceil(60),
        args.error_rate * 100.0,
        args.max_retries,
        args.seed
    );
    println!(
        "| strategy | success | upstream calls | calls / success | upstream 429 | upstream 503 | p50 latency | p99 latency | virtual time | wall time |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for mut r in rows {
        r.out.latencies.sort();
        let n = r.out.ok + r.out.throttled + r.out.failed;
        let per = if r.out.ok == 0 {
            f64::INFINITY
        } else {
            r.calls as f64 / r.out.ok as f64
        };
        println!(
            "| {} | {}/{} ({:.1}%) | {} | {:.2} | {} | {} | {:.2} s | {:.2} s | {:.0} s | {:.1} s |",
            r.name,
            r.out.ok,
            n,
            100.0 * r.out.ok as f64 / n.max(1) as f64,
            r.calls,
            per,
            r.upstream_429,
            r.upstream_503,
            percentile(&r.out.latencies, 0.5).as_secs_f64(),
            percentile(&r.out.latencies, 0.99).as_secs_f64(),
            r.virtual_secs,
            r.wall_secs,
        );
    }
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    let paced = rt.block_on(scenario(args));
    print(args, paced);
    if args.rate > 0.0 {
        let unpaced = Args { rate: 0.0, ..args };
        let rows = rt.block_on(scenario(unpaced));
        print(unpaced, rows);
    }
}
