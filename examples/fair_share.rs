//! The fair-share table of BENCHMARKS.md: how client keys share an
//! account's saturated quota by `weight`, through the gateway against the
//! mock DashScope on loopback, beside arrival order (the rate limiter
//! without [`FairShare`], in process).
//!
//! Paused time (tokio's test clock): the figures are exact and the run takes
//! a few seconds. The account admits 10 calls a second (600 RPM); each
//! saturating key keeps 20 calls waiting; shares are counted over 40 s after
//! 5 s of warm-up.
//!
//! ```text
//! cargo run --features gateway,mock --example fair_share
//! ```

use std::convert::Infallible;
use std::future::Future;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService as BoxCloneService;
use tower::{BoxError, Layer, ServiceExt, service_fn};
use tower_qwen::classify::{FnClassifier, Outcome};
use tower_qwen::gateway::{Gateway, GatewayConfig};
use tower_qwen::mock::MockDashScope;
use tower_qwen::rate_limit::fair::FairShare;
use tower_qwen::rate_limit::{Limits, PerCall, Quota, RateLimitLayer, RateLimiter};

const HEAVY: usize = 0;
const LIGHT: usize = 1;
const SECRETS: [&str; 2] = ["gw-heavy-key-0001", "gw-light-key-0002"];

/// Sends one call with key 0 or 1; resolves when it is answered.
type Call = Arc<dyn Fn(usize) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The gateway over the mock: one account of 600 RPM, two keys of these
/// weights, waits up to 60 s.
async fn gateway(weights: [u32; 2]) -> Call {
    let mock = MockDashScope::builder()
        .key("sk-upstream", "acct")
        .start()
        .await
        .expect("mock starts");
    let mut text = format!(
        r#"
        [upstream]
        base_url = "{}"
        admission_wait = "60s"
        [[accounts]]
        name = "main"
        api_key = "sk-upstream"
        [accounts.models.qwen-plus]
        rpm = 600
        tpm = 100000000
        "#,
        mock.base_url()
    );
    for (i, w) in weights.iter().enumerate() {
        text += &format!(
            "[[keys]]\nname = \"k{i}\"\nkey = \"{}\"\ncapacity = 100000\nrefill_per_second = 100000\nweight = {w}\n",
            SECRETS[i]
        );
    }
    let cfg = GatewayConfig::from_toml_with_env(&text, |_| None).expect("valid config");
    let gw = Gateway::new(cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(gw.serve(listener, std::future::pending::<()>()));
    // The mock lives as long as the calls.
    let mock = Arc::new(mock);
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    Arc::new(move |key| {
        let (client, _mock) = (client.clone(), mock.clone());
        Box::pin(async move {
            let req =
                http::Request::post(format!("http://{addr}/compatible-mode/v1/chat/completions"))
                    .header("authorization", format!("Bearer {}", SECRETS[key]))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(
                        br#"{"model":"qwen-plus","messages":[{"role":"user","content":"Hello"}]}"#,
                    )))
                    .unwrap();
            let res = client.request(req).await.expect("gateway answers");
            assert_eq!(res.status(), 200);
            res.into_body().collect().await.expect("whole body");
        })
    })
}

/// The rate limiter alone, 10 a second, waiting up to 60 s: fair by these
/// weights, or in arrival order.
fn layer(weights: [u32; 2], fair: bool) -> Call {
    let limiter = RateLimiter::new(Limits::requests(
        Quota::per_second(NonZeroU32::new(10).unwrap()).allow_burst(NonZeroU32::MIN),
    ));
    let base = RateLimitLayer::new(limiter)
        .cost(PerCall)
        .classifier(FnClassifier::new(|_: &()| Outcome::Success))
        .wait(Duration::from_secs(60));
    let inner = service_fn(|_: usize| async { Ok::<_, Infallible>(()) });
    let svc: BoxCloneService<usize, (), BoxError> = if fair {
        let flows = move |key: &mut usize| (*key, NonZeroU32::new(weights[*key]).unwrap());
        BoxCloneService::new(base.fair(FairShare::new(flows)).layer(inner))
    } else {
        BoxCloneService::new(base.layer(inner))
    };
    Arc::new(move |key| {
        let svc = svc.clone();
        Box::pin(async move { svc.oneshot(key).await.expect("admitted") })
    })
}

/// `n` callers of `key`, each sending its next call when the last is
/// answered, until `end`, logging each answer.
fn callers(
    call: &Call,
    key: usize,
    n: usize,
    end: Instant,
    log: &Arc<Mutex<Vec<(usize, Instant)>>>,
) {
    for _ in 0..n {
        let (call, log) = (call.clone(), log.clone());
        tokio::spawn(async move {
            while Instant::now() < end {
                call(key).await;
                log.lock().unwrap().push((key, Instant::now()));
            }
        });
    }
}

/// Heavy's share of the admissions, and the admissions as a share of the
/// quota, with `light` waiters of the light key (0: heavy alone).
async fn split(call: Call, light: usize) -> (f64, f64) {
    let log = Arc::default();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(45);
    callers(&call, HEAVY, 20, end, &log);
    callers(&call, LIGHT, light, end, &log);
    tokio::time::sleep_until(end + Duration::from_secs(1)).await;
    let log = log.lock().unwrap();
    let from = t0 + Duration::from_secs(5);
    let window: Vec<_> = log.iter().filter(|(_, t)| *t >= from && *t < end).collect();
    let heavy = window.iter().filter(|(k, _)| *k == HEAVY).count();
    (
        heavy as f64 / window.len() as f64,
        window.len() as f64 / 400.0,
    )
}

/// The p50 and p99 wait of the heavy key sending every 500 ms for 40 s,
/// beside the light key keeping `light` calls waiting.
async fn waits(call: Call, light: usize) -> (Duration, Duration) {
    let log = Arc::default();
    let end = Instant::now() + Duration::from_secs(42);
    callers(&call, LIGHT, light, end, &log);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut sent = Vec::new();
    while Instant::now() + Duration::from_millis(500) < end {
        let call = call.clone();
        sent.push(tokio::spawn(async move {
            let t = Instant::now();
            call(HEAVY).await;
            t.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut w = Vec::new();
    for s in sent {
        w.push(s.await.unwrap());
    }
    w.sort();
    let at = |p: usize| w[(w.len() * p).div_ceil(100) - 1];
    (at(50), at(99))
}

fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    println!(
        "account: 10 calls/s; saturating keys keep 20 calls waiting; 40 s windows (paused time)\n"
    );
    println!("| scenario | expected | gateway (fair share) | arrival order (FIFO) |");
    println!("|---|---|---|---|");
    for w in [1, 3, 9] {
        let expected = f64::from(w) / f64::from(w + 1);
        let (fair, _) = split(gateway([w, 1]).await, 20).await;
        let (fifo, _) = split(layer([w, 1], false), 20).await;
        println!(
            "| weights {w}:1, heavy's share | {} | {} | {} |",
            pct(expected),
            pct(fair),
            pct(fifo)
        );
    }
    let (_, fair) = split(gateway([1, 1]).await, 0).await;
    let (_, fifo) = split(layer([1, 1], false), 0).await;
    println!(
        "| one key alone, share of the quota | 100% | {} | {} |",
        pct(fair),
        pct(fifo)
    );
    for (what, light) in [("1 waiting (calm)", 1), ("200 waiting (flood)", 200)] {
        let (f50, f99) = waits(gateway([9, 1]).await, light).await;
        let (o50, o99) = waits(layer([9, 1], false), light).await;
        println!(
            "| weight-9 key every 500 ms, weight-1 key {what}: p50 / p99 wait | | {} / {} | {} / {} |",
            ms(f50),
            ms(f99),
            ms(o50),
            ms(o99)
        );
    }
    // The in-process fair layer, for the same table without HTTP.
    let (f, _) = split(layer([3, 1], true), 20).await;
    println!(
        "\nthe rate limiter alone with FairShare, weights 3:1: heavy's share {}",
        pct(f)
    );
}
