//! Retry until the first output token (#15): the success rate of streams
//! whose fault comes right after their first frame, before and after the
//! retry layer held back frames that carry no output, side by side in one
//! run against the mock DashScope.
//!
//! A compatible-mode stream opens with a role-only chunk
//! (`{"delta":{"role":"assistant","content":""}}`). When the fault comes
//! right after it, a retry layer that commits at the first frame hands the
//! error to the caller; one that holds frames without output retries it. A
//! native stream has no such frame (its first frame carries a token), so its
//! fault is the first frame either way: it is the reference. A fault after
//! real content must reach the caller in every case (no contestant may
//! retry it), which the last rows check.
//!
//! Contestants: no retry; tower-qwen's `Retry` with [`Hold::NONE`] (the
//! behaviour before #15: the first `data:` line decides); tower-qwen's
//! `Retry` at its defaults (output-less frames held, 16 KiB / 10 s). Each
//! sees the same seeded faults: `--error-rate` of the streams (default 30 %)
//! get an error frame after `--after` tokens (0: right after the first
//! frame), half `limit_requests` (429), half `service_unavailable` (503).
//!
//! Real HTTP/1 over loopback to the real mock server, on tokio's paused
//! clock (waits are virtual). A request succeeds when its stream ends with
//! its final chunk and no error frame.
//!
//! ```text
//! cargo bench --features retry,mock --bench retry_first_token
//! cargo bench --features retry,mock --bench retry_first_token -- --requests 2000 --seed 3
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use futures_util::future::join_all;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tower::{BoxError, Service, ServiceExt};
use tower_qwen::mock::{ApiError, Fault, FaultPlan, MockDashScope, MockHandle};
use tower_qwen::retry::{Hold, RetryLayer};
use tower_qwen::util::rng::SeededRng;

const COMPAT: &str = "/compatible-mode/v1/chat/completions";
const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";
const COMPAT_BODY: &str = r#"{"model":"qwen-plus","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Hello"}]}"#;
const NATIVE_BODY: &str = r#"{"model":"qwen-plus","input":{"messages":[{"role":"user","content":"Hello"}]},"parameters":{"result_format":"message","incremental_output":true}}"#;

#[derive(Clone, Copy)]
struct Args {
    requests: usize,
    concurrency: usize,
    error_rate: f64,
    seed: u64,
}

fn args() -> Args {
    let mut a = Args {
        requests: 1000,
        concurrency: 20,
        error_rate: 0.3,
        seed: 1,
    };
    let argv: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < argv.len() {
        let v = argv.get(i + 1).cloned().unwrap_or_default();
        match argv[i].as_str() {
            "--requests" => a.requests = v.parse().expect("--requests N"),
            "--concurrency" => a.concurrency = v.parse().expect("--concurrency N"),
            "--error-rate" => a.error_rate = v.parse().expect("--error-rate P"),
            "--seed" => a.seed = v.parse().expect("--seed N"),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

async fn mock(args: Args, after_tokens: u32) -> MockHandle {
    let p = args.error_rate / 2.0;
    let plan = FaultPlan::new()
        .with(
            Fault::StreamError {
                after_tokens,
                error: ApiError::rate_quota(),
            },
            p,
        )
        .with(
            Fault::StreamError {
                after_tokens,
                error: ApiError::service_unavailable(),
            },
            p,
        );
    MockDashScope::builder()
        .faults(plan)
        .seed(args.seed)
        .start()
        .await
        .expect("mock starts")
}

/// Whether a stream body ended whole: its final chunk, no error frame.
fn whole(native: bool, wire: &str) -> bool {
    if native {
        !wire.contains("event:error") && wire.contains("\"finish_reason\":\"stop\"")
    } else {
        !wire.contains("\"error\"") && wire.ends_with("data: [DONE]\n\n")
    }
}

/// Sends `args.requests` streams from `args.concurrency` callers; returns
/// the successes.
async fn workload<S, B>(svc: S, mock: &MockHandle, native: bool, args: Args) -> usize
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let next = Arc::new(AtomicUsize::new(0));
    let url = format!(
        "{}{}",
        mock.base_url(),
        if native { NATIVE } else { COMPAT }
    );
    let callers = (0..args.concurrency).map(|_| {
        let (svc, next, url) = (svc.clone(), next.clone(), url.clone());
        async move {
            let mut ok = 0;
            while next.fetch_add(1, Ordering::Relaxed) < args.requests {
                let mut req = Request::post(&url)
                    .header(
                        "authorization",
                        format!("Bearer {}", MockDashScope::DEFAULT_KEY),
                    )
                    .header("content-type", "application/json");
                let body = if native {
                    req = req.header("x-dashscope-sse", "enable");
                    NATIVE_BODY
                } else {
                    COMPAT_BODY
                };
                let req = req
                    .body(Full::new(Bytes::from_static(body.as_bytes())))
                    .unwrap();
                if let Ok(res) = svc.clone().oneshot(req).await
                    && let Ok(bytes) = res.into_body().collect().await
                    && whole(native, &String::from_utf8_lossy(&bytes.to_bytes()))
                {
                    ok += 1;
                }
            }
            ok
        }
    });
    join_all(callers).await.into_iter().sum()
}

struct Row {
    what: &'static str,
    ok: usize,
    calls: u64,
}

async fn scenario(args: Args, native: bool, after_tokens: u32) -> Vec<Row> {
    let mut rows = Vec::new();
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let contestants: [(&'static str, Option<Hold>); 3] = [
        ("no retry", None),
        ("tower-qwen Retry, Hold::NONE (before)", Some(Hold::NONE)),
        ("tower-qwen Retry, default hold (after)", Some(Hold::new())),
    ];
    for (what, hold) in contestants {
        let m = mock(args, after_tokens).await;
        let ok = match hold {
            None => workload(client.clone(), &m, native, args).await,
            Some(hold) => {
                let svc = tower::ServiceBuilder::new()
                    .layer(RetryLayer::new().hold(hold).rng(SeededRng::new(args.seed)))
                    .service(client.clone());
                workload(svc, &m, native, args).await
            }
        };
        rows.push(Row {
            what,
            ok,
            calls: m.stats().requests,
        });
        m.shutdown().await;
    }
    rows
}

fn main() {
    let args = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    println!(
        "{} streams, {} callers, {:.0}% get an error frame (half 429, half 503), seed {}",
        args.requests,
        args.concurrency,
        args.error_rate * 100.0,
        args.seed
    );
    println!("| dialect | fault | strategy | success | upstream calls / request |");
    println!("|---|---|---|---:|---:|");
    for (native, after, fault) in [
        (false, 0, "after the role-only first chunk"),
        (true, 0, "as the first frame"),
        (false, 3, "after 3 content tokens"),
        (true, 3, "after 3 content tokens"),
    ] {
        for row in rt.block_on(scenario(args, native, after)) {
            println!(
                "| {} | {fault} | {} | {:.1}% | {:.2} |",
                if native { "native" } else { "compatible" },
                row.what,
                row.ok as f64 * 100.0 / args.requests as f64,
                row.calls as f64 / args.requests as f64
            );
        }
    }
}
