//! The tower-qwen demo: one workload, three clients, one quota.
//!
//! ```text
//! cargo run --release --features demo --bin demo
//! ```
//!
//! (A binary behind the `demo` feature rather than an example, so that it
//! builds without the crate's dev-dependencies: criterion, governor,
//! proptest and the rest are for the tests and benches.)
//!
//! It starts the mock DashScope server on loopback with a realistic quota
//! (per-minute limits enforced per second, plus the burst guard) and light
//! faults, then sends the same bursty workload of chat requests (some
//! streamed) from many concurrent callers through:
//!
//! 1. a naive client: fire everything at once, retry at once on error (the
//!    common blog advice);
//! 2. tower's built-in layers: `Buffer` + `Retry` (exponential backoff and a
//!    `TpsBudget`) + `ConcurrencyLimit` + `RateLimit` + `Timeout`;
//! 3. the tower-qwen stack.
//!
//! Every run gets a fresh mock with the same seed. It prints a table
//! (successes, failures by kind, 429s received, upstream calls, goodput as
//! a fraction of the quota, latency) and writes a chart of successful
//! requests per second (`demo.svg`). Flags change the size and the quota;
//! `--upstream URL --key KEY` aims it at a real DashScope endpoint instead.
//!
//! Every request ends in a success or a counted, typed failure; the table's
//! `lost` column counts requests that did neither within the run's hard
//! limit (it should be zero for every client).

// The flags' doc comments are clap's help text: URLs in them stay bare.
#![allow(rustdoc::bare_urls)]

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use clap::Parser;
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;
use tower::{ServiceBuilder, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::body::{Body, BufferedBody};
use tower_qwen::classify::{Classifier, Outcome, ThrottleCause};
use tower_qwen::client::{
    ApiKey, BaseUrl, ChatRequest, QwenClient, SetUpstreamLayer, TransportConfig,
};
use tower_qwen::mock::{BurstGuard, Dist, FaultPlan, Latency, MockDashScope, MockHandle, Quota};
use tower_qwen::rate_limit::qwen_limits;
use tower_qwen::util::rng::{Rng, SeededRng};

#[derive(Parser, Debug, Clone)]
#[command(
    about = "tower-qwen demo: naive client vs tower's layers vs tower-qwen against one quota"
)]
struct Args {
    /// Requests per run.
    #[arg(long, default_value_t = 4000)]
    requests: usize,
    /// The quota's requests per minute (enforced per second, RPM/60).
    #[arg(long, default_value_t = 6000)]
    rpm: u32,
    /// The quota's tokens per minute (enforced per second, TPM/60).
    #[arg(long, default_value_t = 2_000_000)]
    tpm: u64,
    /// Offered load as a multiple of the quota (arrivals come in bursts).
    #[arg(long, default_value_t = 1.5)]
    load: f64,
    /// Seconds between bursts of arrivals.
    #[arg(long, default_value_t = 2.0)]
    burst_every: f64,
    /// Fraction of requests that stream (SSE).
    #[arg(long, default_value_t = 0.3)]
    stream_fraction: f64,
    /// Fraction of upstream calls that fail with 500/503/504 (mock only).
    #[arg(long, default_value_t = 0.01)]
    fault_rate: f64,
    /// max_tokens of each request (the mock answers 60 tokens).
    #[arg(long, default_value_t = 100)]
    max_tokens: u32,
    /// The model.
    #[arg(long, default_value = "qwen-plus")]
    model: String,
    /// Seed of the workload and of the mock's faults.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Where to write the chart (SVG).
    #[arg(long, default_value = "demo.svg")]
    chart: PathBuf,
    /// Runs to do, comma-separated: naive, tower, qwen.
    #[arg(long, value_delimiter = ',', default_value = "naive,tower,qwen")]
    runs: Vec<String>,
    /// A real upstream instead of the mock, e.g. https://dashscope-intl.aliyuncs.com
    #[arg(long)]
    upstream: Option<String>,
    /// The API key for --upstream (or DASHSCOPE_API_KEY).
    #[arg(long)]
    key: Option<String>,
    /// Also print successes per second of each run, and the tower-qwen
    /// stack's retry counters.
    #[arg(long)]
    verbose: bool,
}

const MOCK_KEY: &str = "sk-demo";
static QWEN: std::sync::OnceLock<QwenClient> = std::sync::OnceLock::new();
const OUTPUT_TOKENS: u32 = 60;

type RespBody = UnsyncBoxBody<Bytes, BoxError>;
type Client = BoxCloneSyncService<Request<Body>, Response<RespBody>, BoxError>;

/// How one request ended, as the caller sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum End {
    Ok,
    Throttled,
    ServerError,
    Timeout,
    LocalLimit,
    Other,
    Lost,
}

impl End {
    const ALL: [End; 7] = [
        End::Ok,
        End::Throttled,
        End::ServerError,
        End::Timeout,
        End::LocalLimit,
        End::Other,
        End::Lost,
    ];
    fn name(self) -> &'static str {
        match self {
            End::Ok => "ok",
            End::Throttled => "429",
            End::ServerError => "5xx",
            End::Timeout => "timeout",
            End::LocalLimit => "shed",
            End::Other => "other",
            End::Lost => "lost",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Record {
    arrived: Duration,
    finished: Duration,
    end: End,
}

/// Counts what actually went upstream, for every client alike: in all, and
/// per second of the run (by when the answer's head came back).
#[derive(Debug)]
struct Wire {
    start: Instant,
    calls: AtomicU64,
    throttled: AtomicU64,
    per_second: std::sync::Mutex<Vec<(u32, u32)>>,
}

impl Wire {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            calls: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            per_second: std::sync::Mutex::new(Vec::new()),
        }
    }
}

struct RunResult {
    name: &'static str,
    records: Vec<Record>,
    calls: u64,
    throttled: u64,
    /// Upstream calls and 429s per second of the run.
    per_second: Vec<(u32, u32)>,
    /// The mock's errors sent, by code (empty for a real upstream).
    codes: BTreeMap<String, u64>,
    elapsed: Duration,
}

fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> Result<(), BoxError> {
    let rps = f64::from(args.rpm) / 60.0;
    println!(
        "tower-qwen demo: {} chat requests per run ({:.0}% streamed), offered at {:.1}x a quota of {} RPM / {} TPM ({:.0} req/s), model {}",
        args.requests,
        args.stream_fraction * 100.0,
        args.load,
        args.rpm,
        args.tpm,
        rps,
        args.model
    );
    match &args.upstream {
        Some(u) => println!("upstream: {u} (real service)"),
        None => println!(
            "upstream: the mock DashScope server on 127.0.0.1 (per-second enforcement, burst guard, {:.0}% 5xx faults)",
            args.fault_rate * 100.0
        ),
    }
    let mut results = Vec::new();
    for name in &args.runs {
        let name: &'static str = match name.trim() {
            "naive" => "naive",
            "tower" => "tower",
            "qwen" | "tower-qwen" => "tower-qwen",
            other => return Err(format!("unknown run {other:?} (naive, tower, qwen)").into()),
        };
        results.push(one_run(name, &args).await?);
    }
    print_table(&results, rps);
    if let (Some(q), true) = (QWEN.get(), args.verbose) {
        let r = q.retry_stats();
        println!(
            "retry: requests {} attempts {} retries {} budget_denied {} deadline {} exhausted {}",
            r.requests(),
            r.attempts(),
            r.retries(),
            r.budget_denied(),
            r.deadline_gave_up(),
            r.exhausted()
        );
    }
    if args.verbose {
        for r in &results {
            let mut per = vec![0u32; r.elapsed.as_secs() as usize + 1];
            for rec in r.records.iter().filter(|x| x.end == End::Ok) {
                per[rec.finished.as_secs() as usize] += 1;
            }
            println!("{:>10}: successes per second {:?}", r.name, per);
            let calls: Vec<u32> = r.per_second.iter().map(|c| c.0).collect();
            println!("{:>10}: upstream calls per second {:?}", r.name, calls);
            if r.throttled > 0 {
                let t: Vec<u32> = r.per_second.iter().map(|c| c.1).collect();
                println!("{:>10}: 429s per second {:?}", r.name, t);
            }
            if !r.codes.is_empty() {
                println!("{:>10}: the mock's errors by code {:?}", r.name, r.codes);
            }
        }
    }
    draw_chart(&results, rps, &args.chart)?;
    println!("chart: {}", args.chart.display());
    // Every request must end in a success or a counted, typed failure.
    let lost: usize = results
        .iter()
        .map(|r| r.records.iter().filter(|x| x.end == End::Lost).count())
        .sum();
    if lost > 0 {
        return Err(format!("{lost} requests were lost (no answer within the hard limit)").into());
    }
    Ok(())
}

async fn one_run(name: &'static str, args: &Args) -> Result<RunResult, BoxError> {
    let (mock, base, key) = match &args.upstream {
        Some(u) => {
            let key = match &args.key {
                Some(k) => ApiKey::new(k)?,
                None => ApiKey::from_env()?,
            };
            (None, u.parse::<BaseUrl>()?, key)
        }
        None => {
            let mock = start_mock(args).await?;
            let base = mock.base_url().parse::<BaseUrl>()?;
            (Some(mock), base, ApiKey::new(MOCK_KEY)?)
        }
    };
    let wire = Arc::new(Wire::new());
    let client = match name {
        "naive" => naive_client(base, key, wire.clone()),
        "tower" => tower_client(base, key, wire.clone(), args),
        _ => qwen_client(base, key, wire.clone(), args),
    };
    let records = drive(name, client, args).await;
    let elapsed = records.iter().map(|r| r.finished).max().unwrap_or_default();
    let mut codes = BTreeMap::new();
    if let Some(mock) = mock {
        codes = mock.stats().by_code;
        mock.shutdown().await;
    }
    let per_second =
        std::mem::take(&mut *wire.per_second.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(RunResult {
        name,
        records,
        calls: wire.calls.load(Ordering::Relaxed),
        throttled: wire.throttled.load(Ordering::Relaxed),
        per_second,
        codes,
        elapsed,
    })
}

async fn start_mock(args: &Args) -> Result<MockHandle, BoxError> {
    let rpm = NonZeroU32::new(args.rpm).ok_or("--rpm must be > 0")?;
    let tpm = NonZeroU64::new(args.tpm).ok_or("--tpm must be > 0")?;
    let rps = NonZeroU32::new(args.rpm.div_ceil(60)).ok_or("--rpm too small")?;
    let faults = FaultPlan::new().server_errors(args.fault_rate).latency(
        Latency::none()
            .time_to_headers(Dist::uniform(
                Duration::from_millis(20),
                Duration::from_millis(80),
            ))
            .per_token(Dist::uniform(
                Duration::from_millis(2),
                Duration::from_millis(6),
            )),
    );
    Ok(MockDashScope::builder()
        .key(MOCK_KEY, "demo-account")
        .quota(&args.model, Quota::new(rpm, tpm))
        // "Request rate increased too quickly": from idle, 60% of the
        // per-second quota, then at most 1.5x the previous second.
        .burst_guard(
            BurstGuard::new(
                NonZeroU32::new(rps.get() * 3 / 5).unwrap_or(NonZeroU32::MIN),
                1.5,
            )
            .window(1),
        )
        .output_tokens(NonZeroU32::new(OUTPUT_TOKENS).unwrap_or(NonZeroU32::MIN))
        .faults(faults)
        .seed(args.seed)
        .start()
        .await?)
}

/// The transport every client shares: the tuned hyper-util client, aimed
/// at the upstream, with the wire counter beneath everything.
fn transport(base: BaseUrl, key: ApiKey, wire: Arc<Wire>) -> Client {
    let http = TransportConfig::new().pool_max_idle_per_host(256).build();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(SetUpstreamLayer::new(base, key))
            .service(http)
            .map_err(BoxError::from)
            .map_response(move |res: Response<hyper::body::Incoming>| {
                count(&wire, &res);
                res.map(|b| b.map_err(BoxError::from).boxed_unsync())
            }),
    )
}

/// The naive client: fire everything, retry at once on any error, up to 3 times.
fn naive_client(base: BaseUrl, key: ApiKey, wire: Arc<Wire>) -> Client {
    let inner = transport(base, key, wire);
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<Body>| {
        let inner = inner.clone();
        async move {
            let mut last = None;
            for _ in 0..4 {
                let attempt = clone_request(&req).ok_or("request body not replayable")?;
                match inner.clone().oneshot(attempt).await {
                    Ok(res) if res.status().is_success() => return Ok(res),
                    Ok(res) => last = Some(Ok(res)),
                    Err(e) => last = Some(Err(e)),
                }
            }
            last.unwrap_or_else(|| Err("no attempt".into()))
        }
    }))
}

fn clone_request(req: &Request<Body>) -> Option<Request<Body>> {
    let mut r = Request::new(req.body().try_clone()?);
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.headers_mut() = req.headers().clone();
    Some(r)
}

/// tower's built-in layers, configured as their docs suggest: `Retry`
/// with exponential backoff and a `TpsBudget` (retrying 429 and 5xx), a
/// `Buffer` so every task shares one `ConcurrencyLimit` and `RateLimit` (at
/// the quota's requests per second), and a `Timeout`.
fn tower_client(base: BaseUrl, key: ApiKey, wire: Arc<Wire>, args: &Args) -> Client {
    use tower::retry::backoff::{
        Backoff, ExponentialBackoff, ExponentialBackoffMaker, MakeBackoff,
    };
    use tower::retry::budget::{Budget, TpsBudget};
    use tower::util::rng::HasherRng;

    #[derive(Clone)]
    struct Policy {
        backoff: ExponentialBackoff,
        budget: Arc<TpsBudget>,
        retries_left: usize,
        first: bool,
    }
    impl tower::retry::Policy<Request<Body>, Response<RespBody>, BoxError> for Policy {
        type Future = tokio::time::Sleep;
        fn retry(
            &mut self,
            _: &mut Request<Body>,
            result: &mut Result<Response<RespBody>, BoxError>,
        ) -> Option<Self::Future> {
            let retryable = match result {
                Ok(res) => {
                    res.status() == StatusCode::TOO_MANY_REQUESTS || res.status().is_server_error()
                }
                Err(_) => true,
            };
            if !retryable || self.retries_left == 0 || !self.budget.withdraw() {
                return None;
            }
            self.retries_left -= 1;
            Some(self.backoff.next_backoff())
        }
        fn clone_request(&mut self, req: &Request<Body>) -> Option<Request<Body>> {
            if std::mem::take(&mut self.first) {
                self.budget.deposit();
                // A fresh jitter source per request: a cloned one would give
                // every request the same jitter.
                self.backoff = backoff_maker().make_backoff();
            }
            clone_request(req)
        }
    }

    fn backoff_maker() -> ExponentialBackoffMaker {
        ExponentialBackoffMaker::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            0.5,
            HasherRng::default(),
        )
        .expect("valid backoff")
    }
    let rps = u64::from(args.rpm.div_ceil(60)).max(1);
    let policy = Policy {
        backoff: backoff_maker().make_backoff(),
        budget: Arc::new(TpsBudget::new(Duration::from_secs(10), 10, 0.2)),
        retries_left: 3,
        first: true,
    };
    // tower's RateLimit and ConcurrencyLimit are per instance and not
    // Clone: a Buffer in front makes one shared instance (and Retry needs a
    // Clone inner service).
    let svc = ServiceBuilder::new()
        .retry(policy)
        .buffer(8192)
        .concurrency_limit(64)
        .rate_limit(rps, Duration::from_secs(1))
        .timeout(Duration::from_secs(60))
        .service(transport(base, key, wire));
    BoxCloneSyncService::new(svc.map_err(BoxError::from))
}

/// The tower-qwen stack: `QwenClient` with the quota of the model set to
/// the account's real one, around the same counting transport.
fn qwen_client(base: BaseUrl, key: ApiKey, wire: Arc<Wire>, args: &Args) -> Client {
    let tpm = u32::try_from(args.tpm).unwrap_or(u32::MAX);
    let client = QwenClient::builder()
        .base_url(base)
        .key(key)
        .quota(&args.model, qwen_limits(args.rpm, tpm))
        .max_wait(Duration::from_secs(120))
        .build_with(transport_for_qwen(wire))
        .expect("a key is set");
    let _ = QWEN.set(client.clone());
    BoxCloneSyncService::new(client)
}

/// The counting transport without the upstream layer (`QwenClient` adds its
/// own).
fn transport_for_qwen(wire: Arc<Wire>) -> Client {
    let http = TransportConfig::new().pool_max_idle_per_host(256).build();
    BoxCloneSyncService::new(
        ServiceBuilder::new()
            .service(http)
            .map_err(BoxError::from)
            .map_response(move |res: Response<hyper::body::Incoming>| {
                count(&wire, &res);
                res.map(|b| b.map_err(BoxError::from).boxed_unsync())
            }),
    )
}

fn count<B>(wire: &Wire, res: &Response<B>) {
    wire.calls.fetch_add(1, Ordering::Relaxed);
    let throttled = res.status() == StatusCode::TOO_MANY_REQUESTS;
    if throttled {
        wire.throttled.fetch_add(1, Ordering::Relaxed);
    }
    let sec = wire.start.elapsed().as_secs() as usize;
    let mut per = wire.per_second.lock().unwrap_or_else(|e| e.into_inner());
    if per.len() <= sec {
        per.resize(sec + 1, (0, 0));
    }
    per[sec].0 += 1;
    per[sec].1 += u32::from(throttled);
}

/// Sends the workload: bursts of arrivals, each request from its own task.
async fn drive(name: &'static str, client: Client, args: &Args) -> Vec<Record> {
    let rps = f64::from(args.rpm) / 60.0;
    let per_burst = ((rps * args.load * args.burst_every).round() as usize).max(1);
    let mut rng = SeededRng::new(args.seed);
    let start = Instant::now();
    let done = Arc::new(AtomicU64::new(0));
    let ok = Arc::new(AtomicU64::new(0));
    let hard_limit =
        Duration::from_secs((args.requests as f64 / rps * 4.0 + 120.0).min(3600.0) as u64);
    let progress = tokio::spawn(progress(
        name,
        args.requests as u64,
        done.clone(),
        ok.clone(),
    ));
    let mut tasks = Vec::with_capacity(args.requests);
    for i in 0..args.requests {
        let at = start + Duration::from_secs_f64((i / per_burst) as f64 * args.burst_every);
        let stream = rng.next_f64() < args.stream_fraction;
        let words = 8 + (rng.next_u64() % 40) as usize;
        let native = rng.next_f64() < 0.3;
        let mut req = ChatRequest::new(&args.model)
            .system("You are a helpful assistant.")
            .user(prompt(&mut rng, words))
            .max_tokens(args.max_tokens)
            .stream(stream);
        if native {
            req = req.native();
        }
        let req = req.into_request();
        let client = client.clone();
        let (done, ok) = (done.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(at).await;
            let arrived = start.elapsed();
            let end = match tokio::time::timeout(hard_limit, one_call(client, req)).await {
                Ok(end) => end,
                Err(_) => End::Lost,
            };
            done.fetch_add(1, Ordering::Relaxed);
            if end == End::Ok {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Record {
                arrived,
                finished: start.elapsed(),
                end,
            }
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.unwrap_or(Record {
            arrived: Duration::ZERO,
            finished: start.elapsed(),
            end: End::Lost,
        }));
    }
    progress.abort();
    eprintln!();
    records
}

fn prompt(rng: &mut SeededRng, words: usize) -> String {
    const W: [&str; 12] = [
        "quota", "token", "stream", "qwen", "latency", "tower", "layer", "retry", "budget",
        "burst", "model", "gateway",
    ];
    let mut s = String::from("Explain briefly:");
    for _ in 0..words {
        s.push(' ');
        s.push_str(W[(rng.next_u64() % W.len() as u64) as usize]);
    }
    s
}

/// One call, judged the same way for every client: the whole body is read
/// and classified (an SSE error frame or a business error in a 200 is a
/// failure).
async fn one_call(client: Client, req: Request<Body>) -> End {
    let res = match client.oneshot(req).await {
        Ok(res) => res,
        Err(e) => return end_of_error(&e),
    };
    let (parts, body) = res.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return end_of_error(&e),
    };
    end_of(Classifier::new().classify(parts.status, &parts.headers, &bytes))
}

fn end_of(o: Outcome) -> End {
    match o {
        Outcome::Success => End::Ok,
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            ..
        } => End::LocalLimit,
        Outcome::Throttled { .. } => End::Throttled,
        Outcome::Transient { .. } => End::ServerError,
        _ => End::Other,
    }
}

fn end_of_error(e: &BoxError) -> End {
    let text = e.to_string().to_ascii_lowercase();
    if text.contains("timed out") || text.contains("timeout") || text.contains("deadline") {
        return End::Timeout;
    }
    match Classifier::new().classify_error(e) {
        Outcome::Throttled { .. } => End::LocalLimit,
        Outcome::Transient { .. } => End::ServerError,
        _ => End::Other,
    }
}

async fn progress(name: &'static str, total: u64, done: Arc<AtomicU64>, ok: Arc<AtomicU64>) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    loop {
        let d = done.load(Ordering::Relaxed);
        let width = 30;
        let filled = (d * width / total.max(1)) as usize;
        let line = format!(
            "{name:>10} [{}{}] {d}/{total} done, {} ok",
            "#".repeat(filled),
            ".".repeat(width as usize - filled),
            ok.load(Ordering::Relaxed)
        );
        if tty {
            eprint!("\r{line}");
        } else {
            eprintln!("{line}");
        }
        // A terminal gets a live bar; a log gets a line every 10 s.
        tokio::time::sleep(Duration::from_secs(if tty { 1 } else { 10 })).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn print_table(results: &[RunResult], rps: f64) {
    println!();
    print!("| client | ");
    for e in End::ALL {
        print!("{} | ", e.name());
    }
    println!(
        "429s received | upstream calls | calls/success | goodput (of quota) | steady goodput | p50 | p99 | time |"
    );
    print!("|---|");
    for _ in End::ALL {
        print!("---:|");
    }
    println!("---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let mut by: BTreeMap<End, u64> = BTreeMap::new();
        for rec in &r.records {
            *by.entry(rec.end).or_default() += 1;
        }
        let ok = by.get(&End::Ok).copied().unwrap_or(0);
        let mut lat: Vec<Duration> = r
            .records
            .iter()
            .filter(|x| x.end == End::Ok)
            .map(|x| x.finished.saturating_sub(x.arrived))
            .collect();
        lat.sort();
        let secs = r.elapsed.as_secs_f64().max(1e-9);
        let goodput = ok as f64 / secs / rps;
        // Past the cold start (5 s) and before the tail (the last 2 s).
        let (from, to) = (5.0, secs - 2.0);
        let steady = if to > from {
            let n = r
                .records
                .iter()
                .filter(|x| x.end == End::Ok)
                .filter(|x| (from..to).contains(&x.finished.as_secs_f64()))
                .count();
            format!("{:.1}%", n as f64 / (to - from) / rps * 100.0)
        } else {
            "-".to_owned()
        };
        print!("| {} | ", r.name);
        for e in End::ALL {
            print!("{} | ", by.get(&e).copied().unwrap_or(0));
        }
        println!(
            "{} ({:.1}%) | {} | {:.2} | {:.1}% | {} | {:.2}s | {:.2}s | {:.1}s |",
            r.throttled,
            100.0 * r.throttled as f64 / (r.calls.max(1)) as f64,
            r.calls,
            r.calls as f64 / ok.max(1) as f64,
            goodput * 100.0,
            steady,
            percentile(&lat, 0.5).as_secs_f64(),
            percentile(&lat, 0.99).as_secs_f64(),
            secs,
        );
    }
    println!();
    println!(
        "goodput = successful requests per second over the run / the quota's requests per second;"
    );
    println!(
        "steady goodput = the same between 5 s after the start and 2 s before the end (past the cold start)."
    );
}

fn draw_chart(results: &[RunResult], rps: f64, path: &std::path::Path) -> Result<(), BoxError> {
    use plotters::prelude::*;
    let secs = results
        .iter()
        .map(|r| r.elapsed.as_secs_f64().ceil() as usize)
        .max()
        .unwrap_or(1)
        .max(1);
    let series: Vec<(&str, Vec<(f64, f64)>)> = results
        .iter()
        .map(|r| {
            let mut per_sec = vec![0u64; secs + 1];
            for rec in r.records.iter().filter(|x| x.end == End::Ok) {
                per_sec[(rec.finished.as_secs_f64() as usize).min(secs)] += 1;
            }
            (
                r.name,
                per_sec
                    .iter()
                    .enumerate()
                    .map(|(i, n)| (i as f64, *n as f64))
                    .collect(),
            )
        })
        .collect();
    let ymax = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|p| p.1))
        .fold(rps * 1.3, f64::max);
    let root = SVGBackend::new(path, (960, 540)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("successful requests per second", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..secs as f64, 0f64..ymax)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first arrival")
        .y_desc("successes / s")
        .draw()?;
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, rps), (secs as f64, rps)],
            ShapeStyle::from(&BLACK).stroke_width(1),
        ))?
        .label(format!("quota ({rps:.0}/s)"))
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (i, (name, pts)) in series.into_iter().enumerate() {
        let c = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(pts, ShapeStyle::from(&c).stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
