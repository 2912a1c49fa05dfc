//! Soak: the gateway in front of the mock DashScope, under a mixed fault
//! plan, for a given time; exits non-zero if anything was lost, leaked or
//! miscounted. RELIABILITY.md has the figures of record.
//!
//! ```text
//! cargo run --release --all-features --example soak -- --duration 1800   # the record
//! cargo run --all-features --example soak -- --duration 60               # CI
//! ```
//!
//! Everything runs in this process, on loopback: the mock (faults from a
//! seeded plan: 500/503/504 answers, resets before and in the middle of the
//! body, stalls past the gateway's idle and header timeouts, SSE error
//! frames, streams cut short, errors in a `200`), the gateway
//! ([`Gateway::serve`] on a loopback port, with short upstream timeouts),
//! and `--clients` client tasks sending a seeded mix: compatible and native
//! chat, streamed or not, embeddings, unknown keys, unknown paths, bad
//! bodies, slow readers, clients that go away after the head or the first
//! frame, and bursts on a key with a small bucket. Every few seconds the
//! mock's quota for one model collapses for a while (a storm of upstream
//! 429s). Built with feature `redis`, the gateway shares its limits over a
//! private `redis-server` on a free loopback port, which is killed
//! (SIGKILL) and restarted during the run.
//!
//! Checked at the end (each failure is printed, and the exit code is 1):
//!
//! - **nothing lost**: every request got a head, or a typed client error,
//!   within `--client-deadline` (a slow reader's pauses included);
//! - **every refusal in shape**: a non-2xx JSON answer parses as
//!   DashScope's native `{"code",..}` or compatible `{"error":{..}}`;
//! - **RSS flat after warm-up**: the process's RSS (`/proc/self/status`,
//!   sampled every second: mock, gateway and clients together) at the end
//!   is at most the highest RSS seen during the warm-up plus
//!   `--rss-slack-mib`;
//! - **metrics equal the client's counts**: `gateway_requests_total` from
//!   `/metrics`, summed per status, equals the heads the clients received
//!   per status;
//! - **no key material in the logs**: every log line (the crate's events at
//!   `debug` and up) and the `/metrics` text are scanned for every client
//!   and upstream key and every 12-character piece of one;
//! - with Redis: it was killed and restarted the planned number of times,
//!   and every limiter reaches it again at the end.

#[cfg(feature = "redis")]
#[path = "../tests/redis/server.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::net::TcpListener;
use tower_qwen::gateway::{Gateway, GatewayConfig};
use tower_qwen::mock::{ApiError, Dist, Fault, FaultPlan, Latency, MockDashScope, Quota};
use tower_qwen::util::rng::{Rng, SeededRng};

#[derive(Parser, Debug)]
#[command(about = "Soak the gateway in front of the mock under a mixed fault plan")]
struct Args {
    /// How long to send traffic, in seconds.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Client tasks sending at once.
    #[arg(long, default_value_t = 12)]
    clients: usize,
    /// Seed of the traffic mix and of the mock's faults.
    #[arg(long, default_value_t = 16)]
    seed: u64,
    /// Warm-up in seconds, after which RSS must stay flat (default: a
    /// quarter of the run, 15 s at least, 300 s at most).
    #[arg(long)]
    warmup: Option<u64>,
    /// Allowed RSS growth after the warm-up, in MiB.
    #[arg(long, default_value_t = 32)]
    rss_slack_mib: u64,
    /// How long a request may take before it counts as lost, in seconds.
    #[arg(long, default_value_t = 60)]
    client_deadline: u64,
    /// Kill and restart Redis every this many seconds (default: a third of
    /// the run, so twice). Needs feature `redis`.
    #[arg(long)]
    redis_kill_every: Option<u64>,
    /// Run without Redis even when built with feature `redis`.
    #[arg(long)]
    no_redis: bool,
    /// Also write every captured log line to this file.
    #[arg(long)]
    log: Option<std::path::PathBuf>,
}

// ---------------------------------------------------------------------------
// Secrets and the log scanner.

/// A key for this run: a fixed prefix and 32 hex digits from the seed.
fn secret(prefix: &str, rng: &mut SeededRng) -> String {
    format!("{prefix}{:016x}{:016x}", rng.next_u64(), rng.next_u64())
}

/// Every log line goes through here: counted, scanned for key material,
/// and optionally copied to a file.
struct LogScan {
    needles: Vec<String>,
    lines: AtomicU64,
    bytes: AtomicU64,
    leaks: Mutex<Vec<String>>,
    copy: Option<Mutex<std::fs::File>>,
}

impl LogScan {
    /// The secrets, whole and as every 12-byte piece.
    fn new(secrets: &[String], copy: Option<std::fs::File>) -> Self {
        let mut needles = Vec::new();
        for s in secrets {
            needles.push(s.clone());
            for i in 0..=s.len().saturating_sub(12) {
                needles.push(s[i..i + 12].to_owned());
            }
        }
        needles.sort();
        needles.dedup();
        Self {
            needles,
            lines: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            leaks: Mutex::new(Vec::new()),
            copy: copy.map(Mutex::new),
        }
    }

    /// Scans `text` from `what`; records a leak.
    fn scan(&self, what: &str, text: &str) {
        if let Some(n) = self.needles.iter().find(|n| text.contains(n.as_str())) {
            let mut leaks = self.leaks.lock().unwrap();
            if leaks.len() < 10 {
                leaks.push(format!("{what} holds key material ({n}...): {text}"));
            }
        }
    }
}

#[derive(Clone)]
struct LogWriter(Arc<LogScan>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let scan = &self.0;
        scan.bytes.fetch_add(buf.len() as u64, Relaxed);
        scan.lines
            .fetch_add(buf.iter().filter(|&&b| b == b'\n').count() as u64, Relaxed);
        scan.scan("a log line", &String::from_utf8_lossy(buf));
        if let Some(f) = &scan.copy {
            f.lock().unwrap().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        self.clone()
    }
}

// ---------------------------------------------------------------------------
// What the clients saw.

#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    /// Heads received, by status.
    heads: Mutex<BTreeMap<u16, u64>>,
    /// Bodies read to their end.
    complete: AtomicU64,
    /// Streams that ended with an error event (the upstream failed or was
    /// cut, and the gateway said so).
    error_events: AtomicU64,
    /// Bodies that failed after the head (a JSON answer the upstream cut).
    cut: AtomicU64,
    /// Clients that went away after the head (before or after a frame).
    disconnects: AtomicU64,
    /// Slow readers.
    slow: AtomicU64,
    /// Typed client errors before any head, by kind.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Requests not finished within the deadline.
    lost: AtomicU64,
    /// Non-2xx JSON answers not in DashScope's shape.
    unshaped: Mutex<Vec<String>>,
}

impl Tally {
    fn head(&self, status: u16) {
        *self.heads.lock().unwrap().entry(status).or_default() += 1;
    }

    fn error(&self, kind: String) {
        *self.errors.lock().unwrap().entry(kind).or_default() += 1;
    }

    fn heads_total(&self) -> u64 {
        self.heads.lock().unwrap().values().sum()
    }
}

/// What one request does with its answer.
#[derive(Clone, Copy, PartialEq)]
enum Read {
    /// Reads it to the end.
    All,
    /// Reads it with a pause between frames.
    Slowly,
    /// Drops it right after the head.
    DropAfterHead,
    /// Drops it after the first frame.
    DropAfterFrame,
}

/// One request of the mix.
struct Call {
    path: &'static str,
    key: String,
    body: String,
    native_stream: bool,
    read: Read,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// Sends `call`; records what came back.
async fn send(client: &HttpClient, base: &str, call: Call, tally: &Tally, deadline: Duration) {
    tally.sent.fetch_add(1, Relaxed);
    let mut req = http::Request::post(format!("{base}{}", call.path))
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {}", call.key));
    if call.native_stream {
        req = req.header("x-dashscope-sse", "enable");
    }
    let req = req
        .body(Full::new(Bytes::from(call.body)))
        .expect("a valid request");
    let run = async {
        let res = match client.request(req).await {
            Ok(r) => r,
            Err(e) => {
                tally.error(error_kind(&e));
                return;
            }
        };
        let status = res.status().as_u16();
        tally.head(status);
        let json = res
            .headers()
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
        let mut body = res.into_body();
        let mut wire = Vec::new();
        match call.read {
            Read::DropAfterHead => {
                tally.disconnects.fetch_add(1, Relaxed);
                return;
            }
            Read::Slowly => {
                tally.slow.fetch_add(1, Relaxed);
            }
            _ => {}
        }
        loop {
            match body.frame().await {
                None => break,
                Some(Err(_)) => {
                    tally.cut.fetch_add(1, Relaxed);
                    return;
                }
                Some(Ok(f)) => {
                    if let Some(d) = f.data_ref() {
                        wire.extend_from_slice(d);
                    }
                    match call.read {
                        Read::DropAfterFrame => {
                            tally.disconnects.fetch_add(1, Relaxed);
                            return;
                        }
                        Read::Slowly => tokio::time::sleep(Duration::from_millis(40)).await,
                        _ => {}
                    }
                }
            }
        }
        tally.complete.fetch_add(1, Relaxed);
        let text = String::from_utf8_lossy(&wire);
        if text.contains("event:error") || text.contains("data: {\"error\"") {
            tally.error_events.fetch_add(1, Relaxed);
        }
        if !(200..300).contains(&status) && json && !in_shape(&wire) {
            let mut u = tally.unshaped.lock().unwrap();
            if u.len() < 10 {
                u.push(format!("{status} {text}"));
            }
        }
    };
    if tokio::time::timeout(deadline, run).await.is_err() {
        tally.lost.fetch_add(1, Relaxed);
    }
}

/// A DashScope error body: native `{"code","message",..}` or compatible
/// `{"error":{"message","code",..}}`.
fn in_shape(body: &[u8]) -> bool {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    v.get("code").is_some_and(|c| c.is_string()) && v.get("message").is_some()
        || v.get("error")
            .is_some_and(|e| e.get("message").is_some() && e.get("code").is_some())
}

/// A short name for a client error before any head.
fn error_kind(e: &hyper_util::client::legacy::Error) -> String {
    if e.is_connect() {
        return "connect".into();
    }
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}

/// The mix: one call drawn from `rng`.
fn draw(rng: &mut SeededRng, keys: &[String]) -> Call {
    const CHAT: &str = "/compatible-mode/v1/chat/completions";
    const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";
    const EMBED: &str = "/compatible-mode/v1/embeddings";
    let model = if rng.next_u64().is_multiple_of(3) {
        "qwen-turbo"
    } else {
        "qwen-plus"
    };
    let key = keys[(rng.next_u64() % 2) as usize].clone();
    let read = match rng.next_u64() % 20 {
        0 | 1 => Read::Slowly,
        2 => Read::DropAfterHead,
        3 | 4 => Read::DropAfterFrame,
        _ => Read::All,
    };
    let chat = |stream: bool| {
        format!(
            r#"{{"model":"{model}","stream":{stream},"messages":[{{"role":"user","content":"Soak test, say something"}}]}}"#
        )
    };
    let native = format!(
        r#"{{"model":"{model}","input":{{"messages":[{{"role":"user","content":"Soak test"}}]}},"parameters":{{"incremental_output":true}}}}"#
    );
    let call = |path, key, body, native_stream, read| Call {
        path,
        key,
        body,
        native_stream,
        read,
    };
    match rng.next_u64() % 100 {
        0..=29 => call(CHAT, key, chat(true), false, read),
        30..=49 => call(CHAT, key, chat(false), false, read),
        50..=69 => call(NATIVE, key, native, true, read),
        70..=79 => call(NATIVE, key, native, false, read),
        80..=89 => call(
            EMBED,
            key,
            r#"{"model":"text-embedding-v3","input":["soak one","soak two"]}"#.into(),
            false,
            read,
        ),
        // An unknown key: 401.
        90..=92 => call(CHAT, "gw-not-a-key".into(), chat(false), false, Read::All),
        // A path off the allow-list: 404.
        93..=94 => call(
            "/api/v1/services/../tasks",
            key,
            chat(false),
            false,
            Read::All,
        ),
        // An ambiguous body: 400, never forwarded.
        95..=96 => call(
            CHAT,
            key,
            r#"{"model":"qwen-plus","model":"qwen-max","messages":[]}"#.into(),
            false,
            Read::All,
        ),
        // No model: 400.
        _ => call(
            CHAT,
            key,
            r#"{"messages":[{"role":"user","content":"hi"}]}"#.into(),
            false,
            Read::All,
        ),
    }
}

// ---------------------------------------------------------------------------
// RSS.

/// The process's resident set, in KiB (Linux).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// `gateway_requests_total` from the Prometheus text, summed per status.
fn requests_by_status(text: &str) -> BTreeMap<u16, u64> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("gateway_requests_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let status = labels
            .split(',')
            .find_map(|l| l.strip_prefix("status=\""))
            .and_then(|s| s.trim_end_matches('"').parse::<u16>().ok());
        if let (Some(s), Ok(v)) = (status, value.trim().parse::<f64>()) {
            *out.entry(s).or_default() += v as u64;
        }
    }
    out
}

// ---------------------------------------------------------------------------

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut rng = SeededRng::new(args.seed);
    let upstream = [
        secret("sk-soak-a1-", &mut rng),
        secret("sk-soak-a2-", &mut rng),
        secret("sk-soak-b1-", &mut rng),
    ];
    let clients = [
        secret("gw-soak-alpha-", &mut rng),
        secret("gw-soak-beta-", &mut rng),
        secret("gw-soak-storm-", &mut rng),
    ];
    let secrets: Vec<String> = upstream.iter().chain(&clients).cloned().collect();
    let copy = args
        .log
        .as_ref()
        .map(|p| std::fs::File::create(p).expect("the log file can be created"));
    let logs = Arc::new(LogScan::new(&secrets, copy));
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn,tower_qwen=debug"))
        .with_ansi(false)
        .with_writer(LogWriter(logs.clone()))
        .init();

    let duration = Duration::from_secs(args.duration);
    let warmup = Duration::from_secs(args.warmup.unwrap_or((args.duration / 4).clamp(15, 300)));
    let deadline = Duration::from_secs(args.client_deadline);

    // The mock, with the fault plan.
    let plan = FaultPlan::new()
        .server_errors(0.03)
        .with(Fault::Reset, 0.01)
        .with(Fault::ResetMidBody { after_tokens: 3 }, 0.01)
        .with(
            Fault::Stall {
                after_tokens: 2,
                duration: Some(Duration::from_millis(1500)),
            },
            0.005,
        )
        .with(
            Fault::Stall {
                after_tokens: 1,
                duration: None,
            },
            0.002,
        )
        .with(
            Fault::StreamError {
                after_tokens: 4,
                error: ApiError::internal_error(),
            },
            0.01,
        )
        .with(Fault::StreamCut { after_tokens: 5 }, 0.01)
        .with(Fault::ErrorIn200(ApiError::internal_error()), 0.005)
        .latency(
            Latency::none()
                .time_to_headers(Dist::uniform(Duration::ZERO, Duration::from_millis(20)))
                .per_token(Dist::uniform(Duration::ZERO, Duration::from_millis(2))),
        );
    let mock = MockDashScope::builder()
        .key(&upstream[0], "acct-a")
        .key(&upstream[1], "acct-a")
        .key(&upstream[2], "acct-b")
        .seed(args.seed)
        .faults(plan)
        .start()
        .await
        .expect("the mock starts");
    let mock = Arc::new(mock);

    // Redis, when built with it.
    #[cfg(feature = "redis")]
    let redis = (!args.no_redis).then(|| Arc::new(Mutex::new(redis_server::RedisServer::start())));
    #[cfg(feature = "redis")]
    let redis_section = redis.as_ref().map_or(String::new(), |r| {
        format!(
            r#"
            [redis]
            url = "{}"
            key_prefix = "soak:{}:"
            failure = "fail-open"
            replicas = 1
            timeout = "50ms"
            probe_every = "500ms"
            "#,
            r.lock().unwrap().url(),
            args.seed
        )
    });
    #[cfg(not(feature = "redis"))]
    let redis_section = String::new();

    let text = format!(
        r#"
        [server]
        # Every client of the soak shares 127.0.0.1: no per-address limit
        # on failed authentications (its 429s would hide everything else).
        max_auth_failures_per_minute = 0
        [upstream]
        base_url = "{base}"
        connect_timeout = "1s"
        header_timeout = "3s"
        idle_timeout = "1s"
        total_timeout = "15s"
        admission_wait = "500ms"
        [limits]
        capacity = 1000
        refill_per_second = 1000
        [degrade]
        rate_per_second = 50
        probe_after = "1s"
        probe_after_max = "4s"
        {redis_section}
        [[accounts]]
        name = "a"
        api_keys = ["{a1}", "{a2}"]
        quotas = "unlimited"
        [[accounts]]
        name = "b"
        api_key = "{b1}"
        quotas = "qwen"
        [accounts.models."qwen-turbo"]
        rpm = 1200
        tpm = 5000000
        [[keys]]
        name = "alpha"
        key = "{k0}"
        accounts = ["a", "b"]
        [[keys]]
        name = "beta"
        key = "{k1}"
        accounts = ["b", "a"]
        [[keys]]
        name = "storm"
        key = "{k2}"
        accounts = ["a"]
        capacity = 10
        refill_per_second = 5
        "#,
        base = mock.base_url(),
        a1 = upstream[0],
        a2 = upstream[1],
        b1 = upstream[2],
        k0 = clients[0],
        k1 = clients[1],
        k2 = clients[2],
    );
    let config = match GatewayConfig::from_toml_with_env(&text, |_| None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("soak: the gateway configuration is invalid: {e}");
            return ExitCode::FAILURE;
        }
    };
    logs.scan("the configuration's Debug", &format!("{config:?}"));
    let gateway = Gateway::new(config);
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("a loopback port");
    let addr: SocketAddr = listener.local_addr().expect("its address");
    let base = format!("http://{addr}");
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(gateway.clone().serve(listener, async move {
        let _ = stop_rx.await;
    }));

    let tally = Arc::new(Tally::default());
    let done = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let rss_start = rss_kib().unwrap_or(0);
    println!(
        "soak: {} s, {} clients, seed {}, warm-up {} s, gateway {base}, mock {}, redis {}",
        args.duration,
        args.clients,
        args.seed,
        warmup.as_secs(),
        mock.base_url(),
        if redis_section.is_empty() {
            "off"
        } else {
            "on"
        },
    );

    // RSS every second; progress every 10 s.
    let samples = Arc::new(Mutex::new(Vec::<(Duration, u64)>::new()));
    let sampler = {
        let (samples, done, tally) = (samples.clone(), done.clone(), tally.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            let mut n = 0u64;
            while !done.load(Relaxed) {
                tick.tick().await;
                let rss = rss_kib().unwrap_or(0);
                samples.lock().unwrap().push((start.elapsed(), rss));
                n += 1;
                if n.is_multiple_of(10) {
                    println!(
                        "  {:>5} s  requests {:>8}  heads {:>8}  rss {:>6.1} MiB",
                        start.elapsed().as_secs(),
                        tally.sent.load(Relaxed),
                        tally.heads_total(),
                        mib(rss)
                    );
                }
            }
        })
    };

    // 429 storms upstream: every 15 s, qwen-turbo's quota collapses for 3 s.
    let storms = Arc::new(AtomicU64::new(0));
    let storm_task = {
        let (done, storms) = (done.clone(), storms.clone());
        let mock_quota = mock.clone();
        tokio::spawn(async move {
            let tiny = Quota::per_minute(std::num::NonZeroU32::new(60).expect("non-zero"));
            loop {
                tokio::time::sleep(Duration::from_secs(12)).await;
                if done.load(Relaxed) {
                    break;
                }
                mock_quota.set_quota("qwen-turbo", tiny);
                storms.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_secs(3)).await;
                mock_quota.set_quota("qwen-turbo", None);
            }
        })
    };

    // Redis kills.
    let kills = Arc::new(AtomicU64::new(0));
    #[cfg(feature = "redis")]
    let redis_task = redis.clone().map(|redis| {
        let (done, kills) = (done.clone(), kills.clone());
        let every =
            Duration::from_secs(args.redis_kill_every.unwrap_or((args.duration / 3).max(5)));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if done.load(Relaxed) {
                    break;
                }
                let r = redis.clone();
                tokio::task::spawn_blocking(move || r.lock().unwrap().stop())
                    .await
                    .expect("stop redis");
                kills.fetch_add(1, Relaxed);
                println!("  {:>5} s  redis killed", start.elapsed().as_secs());
                tokio::time::sleep(Duration::from_secs(3)).await;
                let r = redis.clone();
                tokio::task::spawn_blocking(move || r.lock().unwrap().restart())
                    .await
                    .expect("restart redis");
                println!("  {:>5} s  redis restarted", start.elapsed().as_secs());
            }
        })
    });

    // The clients.
    let http: HttpClient = Client::builder(TokioExecutor::new()).build_http();
    let mut workers = Vec::new();
    for w in 0..args.clients {
        let (http, base, tally, done) = (http.clone(), base.clone(), tally.clone(), done.clone());
        let keys = clients.to_vec();
        let mut rng = SeededRng::new(args.seed ^ (w as u64 + 1).wrapping_mul(0x9E37_79B9));
        workers.push(tokio::spawn(async move {
            while !done.load(Relaxed) {
                if w == 0 && rng.next_u64().is_multiple_of(50) {
                    // A burst on the small bucket: mostly 429s from the gateway.
                    let mut burst = Vec::new();
                    for _ in 0..40 {
                        let call = Call {
                            path: "/compatible-mode/v1/chat/completions",
                            key: keys[2].clone(),
                            body: r#"{"model":"qwen-plus","messages":[{"role":"user","content":"storm"}]}"#.into(),
                            native_stream: false,
                            read: Read::All,
                        };
                        let (http, base, tally) = (http.clone(), base.clone(), tally.clone());
                        burst.push(tokio::spawn(async move {
                            send(&http, &base, call, &tally, deadline).await;
                        }));
                    }
                    for b in burst {
                        let _ = b.await;
                    }
                    continue;
                }
                let call = draw(&mut rng, &keys);
                send(&http, &base, call, &tally, deadline).await;
            }
        }));
    }

    tokio::time::sleep(duration).await;
    done.store(true, Relaxed);
    for w in workers {
        let _ = w.await;
    }
    let _ = sampler.await;
    storm_task.abort();
    let _ = storm_task.await;
    mock.set_quota("qwen-turbo", None);
    let mut failures = Vec::<String>::new();

    #[cfg(feature = "redis")]
    let redis_back = if let Some(task) = redis_task {
        let _ = task.await;
        // Every limiter reaches Redis again (each probes every 500 ms).
        let mut back = false;
        for _ in 0..50 {
            if gateway.probe_redis().await {
                back = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !back {
            failures.push("the gateway does not reach Redis again after its restarts".into());
        }
        Some(back)
    } else {
        None
    };
    #[cfg(not(feature = "redis"))]
    let redis_back: Option<bool> = None;

    // /metrics against the clients' counts.
    let metrics = match http
        .request(
            http::Request::get(format!("{base}/metrics"))
                .body(Full::new(Bytes::new()))
                .expect("a valid request"),
        )
        .await
    {
        Ok(res) => String::from_utf8_lossy(
            &res.into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default(),
        )
        .into_owned(),
        Err(e) => {
            failures.push(format!("GET /metrics failed: {e}"));
            String::new()
        }
    };
    logs.scan("/metrics", &metrics);
    let counted = requests_by_status(&metrics);
    let heads = tally.heads.lock().unwrap().clone();
    let stats = mock.stats();
    let _ = stop_tx.send(());
    let _ = server.await;
    if let Ok(mock) = Arc::try_unwrap(mock) {
        mock.shutdown().await;
    }

    // The figures.
    let samples = samples.lock().unwrap().clone();
    let at_warmup = samples
        .iter()
        .filter(|(t, _)| *t <= warmup)
        .map(|&(_, r)| r)
        .max()
        .unwrap_or(rss_start);
    let end = samples
        .iter()
        .rev()
        .take(5)
        .map(|&(_, r)| r)
        .max()
        .unwrap_or(0);
    let peak = samples.iter().map(|&(_, r)| r).max().unwrap_or(0);
    let sent = tally.sent.load(Relaxed);
    let errors = tally.errors.lock().unwrap().clone();
    let errors_total: u64 = errors.values().sum();
    let lost = tally.lost.load(Relaxed);
    let upstream_faults = stats.requests - stats.status(200);
    let cancelled = metric_value(&metrics, "gateway_streams_cancelled_total");

    println!("\nsoak results ({:.0} s)", start.elapsed().as_secs_f64());
    println!("  requests sent            {sent}");
    println!("  heads by status          {heads:?}");
    println!("  /metrics by status       {counted:?}");
    println!("  client errors, no head   {errors:?}");
    println!("  lost                     {lost}");
    println!(
        "  bodies complete / cut / with an error event   {} / {} / {}",
        tally.complete.load(Relaxed),
        tally.cut.load(Relaxed),
        tally.error_events.load(Relaxed)
    );
    println!(
        "  client disconnects / slow readers             {} / {} (gateway counted {} cancelled)",
        tally.disconnects.load(Relaxed),
        tally.slow.load(Relaxed),
        cancelled
    );
    println!(
        "  upstream: {} requests, {} not 200 (faults and 429s), {} resets; 429 storms {}",
        stats.requests,
        upstream_faults,
        stats.resets,
        storms.load(Relaxed)
    );
    println!(
        "  rss MiB: start {:.1}, warm-up {:.1}, end {:.1}, peak {:.1} (allowed end {:.1})",
        mib(rss_start),
        mib(at_warmup),
        mib(end),
        mib(peak),
        mib(at_warmup + args.rss_slack_mib * 1024)
    );
    println!(
        "  redis: {}, killed {} times{}",
        if redis_section.is_empty() {
            "off"
        } else {
            "on"
        },
        kills.load(Relaxed),
        match redis_back {
            Some(true) => ", reached again at the end",
            Some(false) => ", NOT reached again",
            None => "",
        }
    );
    println!(
        "  logs: {} lines, {} bytes scanned",
        logs.lines.load(Relaxed),
        logs.bytes.load(Relaxed)
    );

    if lost > 0 {
        failures.push(format!(
            "{lost} requests lost (no head and no error within {deadline:?})"
        ));
    }
    if sent != tally.heads_total() + errors_total + lost {
        failures.push(format!(
            "{sent} sent, but {} heads + {errors_total} errors + {lost} lost",
            tally.heads_total()
        ));
    }
    if counted != heads {
        failures.push(format!(
            "/metrics counts {counted:?}, the clients received {heads:?}"
        ));
    }
    for u in tally.unshaped.lock().unwrap().iter() {
        failures.push(format!("an answer not in DashScope's shape: {u}"));
    }
    if end > at_warmup + args.rss_slack_mib * 1024 {
        failures.push(format!(
            "RSS grew after warm-up: {:.1} MiB at the end, {:.1} MiB at warm-up",
            mib(end),
            mib(at_warmup)
        ));
    }
    if samples.len() < 2 || rss_start == 0 {
        failures.push("RSS could not be sampled (/proc/self/status)".into());
    }
    if !redis_section.is_empty() {
        let planned = args.duration / args.redis_kill_every.unwrap_or((args.duration / 3).max(5));
        if kills.load(Relaxed) < planned.min(1) {
            failures.push("Redis was never killed".into());
        }
    }
    failures.extend(logs.leaks.lock().unwrap().iter().cloned());

    if failures.is_empty() {
        println!("soak: ok");
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            println!("soak FAILED: {f}");
        }
        ExitCode::FAILURE
    }
}

/// The sum of a counter's series in the Prometheus text.
fn metric_value(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum::<f64>() as u64
}
