//! Coalesce against the mock DashScope under an RPM quota: N single-text
//! embeddings from C concurrent callers, sent one request per text ("not
//! merged", a plain hyper client) and through `Coalesce` ("merged"), in one
//! run, each against a fresh mock with the same quota.
//!
//! Callers are naive on purpose: on a 429 they sleep 100-200 ms (seeded
//! jitter) and send again, until the text is embedded or the run's deadline
//! passes. Real time, bounded: the default quota (30,000 RPM, so 500 RPS as
//! DashScope enforces it per second) keeps the unmerged run near 20 s.
//!
//! ```text
//! cargo bench --bench coalesce --features coalesce,mock -- [--texts 10000] [--callers 200] [--rpm 30000] [--deadline-secs 60]
//! ```

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tower::{Service, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::body::Body;
use tower_qwen::coalesce::Coalesce;
use tower_qwen::mock::{MockDashScope, Quota};
use tower_qwen::time;
use tower_qwen::util::rng::{Rng, SeededRng};

const MODEL: &str = "text-embedding-v4";
const PATH: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
const DIMENSION: u32 = 64;

struct Args {
    texts: usize,
    callers: usize,
    rpm: u32,
    deadline: Duration,
}

fn args() -> Args {
    let mut a = Args {
        texts: 10_000,
        callers: 200,
        rpm: 30_000,
        deadline: Duration::from_secs(60),
    };
    let argv: Vec<String> = std::env::args().collect();
    let value = |name: &str| {
        argv.iter()
            .position(|x| x == name)
            .and_then(|i| argv.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    if let Some(v) = value("--texts") {
        a.texts = v as usize;
    }
    if let Some(v) = value("--callers") {
        a.callers = v.max(1) as usize;
    }
    if let Some(v) = value("--rpm") {
        a.rpm = v.clamp(1, u64::from(u32::MAX)) as u32;
    }
    if let Some(v) = value("--deadline-secs") {
        a.deadline = Duration::from_secs(v);
    }
    a
}

#[derive(Default)]
struct Tally {
    done: AtomicUsize,
    caller_429s: AtomicU64,
    other_failures: AtomicU64,
    latencies: Mutex<Vec<Duration>>,
}

struct Row {
    mode: &'static str,
    done: usize,
    wall: Duration,
    upstream: u64,
    upstream_429: u64,
    caller_429s: u64,
    failures: u64,
    p50: Duration,
    p99: Duration,
}

async fn run<S>(mode: &'static str, svc: S, base: String, a: &Args) -> (Row, Tally)
where
    S: Service<Request<Body>, Response = Response<Vec<u8>>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicUsize::new(0));
    let start = time::now();
    let deadline = start + a.deadline;
    let mut tasks = Vec::new();
    for c in 0..a.callers {
        let (svc, base, tally, next) = (svc.clone(), base.clone(), tally.clone(), next.clone());
        let texts = a.texts;
        tasks.push(tokio::spawn(async move {
            let mut rng = SeededRng::new(c as u64 + 1);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= texts {
                    return;
                }
                let text = format!("text {i}: the quick brown fox jumps over the lazy dog");
                let t0 = time::now();
                loop {
                    if time::now() >= deadline {
                        return;
                    }
                    let body = json!({"model": MODEL, "input": {"texts": [text]}, "parameters": {"dimension": DIMENSION}});
                    let req = Request::post(format!("{base}{PATH}"))
                        .header("authorization", format!("Bearer {}", MockDashScope::DEFAULT_KEY))
                        .header("content-type", "application/json")
                        .body(Body::from(body.to_string()))
                        .unwrap();
                    match svc.clone().oneshot(req).await {
                        Ok(res) if res.status() == 200 => {
                            let v: Value = serde_json::from_slice(res.body()).unwrap_or(Value::Null);
                            let e = &v["output"]["embeddings"];
                            let ok = e.as_array().is_some_and(|l| l.len() == 1)
                                && e[0]["text_index"] == 0
                                && e[0]["embedding"].as_array().is_some_and(|x| x.len() == DIMENSION as usize);
                            if ok {
                                tally.done.fetch_add(1, Ordering::Relaxed);
                                tally.latencies.lock().await.push(time::now() - t0);
                            } else {
                                tally.other_failures.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                        Ok(res) if res.status() == 429 => {
                            tally.caller_429s.fetch_add(1, Ordering::Relaxed);
                            let wait = Duration::from_millis(100 + (rng.next_f64() * 100.0) as u64);
                            tokio::time::sleep(wait).await;
                        }
                        _ => {
                            tally.other_failures.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let wall = time::now() - start;
    let tally = Arc::try_unwrap(tally).ok().expect("callers are done");
    let mut lat = std::mem::take(&mut *tally.latencies.lock().await);
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let row = Row {
        mode,
        done: tally.done.load(Ordering::Relaxed),
        wall,
        upstream: 0,
        upstream_429: 0,
        caller_429s: tally.caller_429s.load(Ordering::Relaxed),
        failures: tally.other_failures.load(Ordering::Relaxed),
        p50: pct(0.50),
        p99: pct(0.99),
    };
    (row, tally)
}

/// A service that reads the whole body, so both modes hand callers bytes.
fn collecting<S, B>(
    svc: S,
) -> impl Service<Request<Body>, Response = Response<Vec<u8>>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static
where
    S: Service<Request<Body>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    tower::service_fn(move |req: Request<Body>| {
        let svc = svc.clone();
        async move {
            let res = svc.oneshot(req).await.map_err(Into::into)?;
            let (parts, body) = res.into_parts();
            let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
            Ok::<_, BoxError>(Response::from_parts(parts, bytes.to_vec()))
        }
    })
}

async fn mock(rpm: u32) -> tower_qwen::mock::MockHandle {
    MockDashScope::builder()
        .quota(MODEL, Quota::per_minute(NonZeroU32::new(rpm).unwrap()))
        .default_dimension(NonZeroU32::new(DIMENSION).unwrap())
        .start()
        .await
        .expect("mock starts")
}

fn client() -> Client<HttpConnector, Body> {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http()
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mut rows = Vec::new();

        let m = mock(a.rpm).await;
        let (mut row, _) = run("not merged (one request per text)", collecting(client()), m.base_url(), &a).await;
        let s = m.stats();
        (row.upstream, row.upstream_429) = (s.requests, s.status(429));
        rows.push(row);
        m.shutdown().await;

        let m = mock(a.rpm).await;
        let svc = Coalesce::new(client());
        let (mut row, _) = run("merged (Coalesce, defaults)", collecting(svc.clone()), m.base_url(), &a).await;
        let s = m.stats();
        (row.upstream, row.upstream_429) = (s.requests, s.status(429));
        rows.push(row);
        let cs = svc.stats();
        m.shutdown().await;

        println!(
            "\n{} single-text embeddings ({}, dimension {}), {} callers, mock quota {} RPM ({} RPS enforced per second), naive 429 retry after 100-200 ms, deadline {:?} per run\n",
            a.texts,
            MODEL,
            DIMENSION,
            a.callers,
            a.rpm,
            u64::from(a.rpm).div_ceil(60),
            a.deadline
        );
        println!("| mode | embedded | wall s | embeddings/s | upstream requests | upstream 429s | 429s seen by callers | other failures | p50 ms | p99 ms |");
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for r in &rows {
            println!(
                "| {} | {} | {:.2} | {:.0} | {} | {} | {} | {} | {:.1} | {:.1} |",
                r.mode,
                r.done,
                r.wall.as_secs_f64(),
                r.done as f64 / r.wall.as_secs_f64(),
                r.upstream,
                r.upstream_429,
                r.caller_429s,
                r.failures,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
            );
        }
        let (n, m) = (&rows[0], &rows[1]);
        println!(
            "\nmerged / not merged: throughput x{:.1}, upstream requests x{:.3}; Coalesce stats: {:?}",
            (m.done as f64 / m.wall.as_secs_f64()) / (n.done as f64 / n.wall.as_secs_f64()),
            m.upstream as f64 / n.upstream as f64,
            cs
        );
    });
}
