#![cfg(all(
    feature = "fallback",
    feature = "circuit-breaker",
    feature = "mock",
    feature = "client"
))]
//! Model fallback: throttles and open circuits move a request down the
//! chain; permanent errors and flowing streams never do.

mod foreign;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{ServiceBuilder, ServiceExt};
use tower_qwen::body::{Body, BufferedBody};
use tower_qwen::circuit_breaker::CircuitBreakerLayer;
use tower_qwen::fallback::{FallbackLayer, FallbackOn, MODEL_HEADER};
use tower_qwen::request::RequestInfo;

const CHAIN: [&str; 3] = ["qwen-turbo", "qwen-plus", "qwen-max"];

type Calls = Arc<Mutex<BTreeMap<String, u32>>>;

/// An upstream that answers per model with a canned status and body.
fn upstream(
    answers: &'static [(&'static str, u16, &'static str, &'static str)],
    calls: Calls,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<String>,
    Error = Infallible,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Body>| {
        let body = req.body().buffered();
        let info = RequestInfo::parse(req.uri().path(), req.headers(), body.as_deref());
        let model = info.model.as_deref().unwrap_or("").to_owned();
        *calls.lock().unwrap().entry(model.clone()).or_default() += 1;
        let (status, ct, text) = answers
            .iter()
            .find(|a| a.0 == model)
            .map(|a| (a.1, a.2, a.3))
            .unwrap_or((200, "application/json", r#"{"output":{"text":"ok"}}"#));
        async move {
            Ok(Response::builder()
                .status(status)
                .header("content-type", ct)
                .body(text.to_owned())
                .unwrap())
        }
    })
}

fn chat(model: &str) -> Request<Body> {
    Request::post("/compatible-mode/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"model":"{model}","messages":[{{"role":"user","content":"hi"}}]}}"#
        )))
        .unwrap()
}

const RATE_QUOTA: &str = r#"{"error":{"message":"You exceeded your current requests list.","type":"limit_requests","param":null,"code":"limit_requests"}}"#;

#[tokio::test]
async fn throttled_model_falls_to_the_next_and_says_so() {
    let calls = Calls::default();
    static ANSWERS: [(&str, u16, &str, &str); 2] = [
        ("qwen-turbo", 429, "application/json", RATE_QUOTA),
        ("qwen-plus", 429, "application/json", RATE_QUOTA),
    ];
    let layer = FallbackLayer::new(CHAIN);
    let stats = layer.stats();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-max");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, Bytes::from_static(br#"{"output":{"text":"ok"}}"#));
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.values().sum::<u32>(), 3);
    assert_eq!(
        (stats.requests(), stats.fallbacks(), stats.exhausted()),
        (1, 2, 0)
    );
}

#[tokio::test]
async fn only_later_models_and_never_on_permanent_errors() {
    static ANSWERS: [(&str, u16, &str, &str); 2] = [
        (
            "qwen-plus",
            401,
            "application/json",
            r#"{"code":"InvalidApiKey","message":"Invalid API-key provided."}"#,
        ),
        ("qwen-max", 429, "application/json", RATE_QUOTA),
    ];
    // A permanent error is returned as it is, with no fallback.
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN))
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.clone().oneshot(chat("qwen-plus")).await.unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    assert_eq!(calls.lock().unwrap().len(), 1);

    // The last model of the chain has nowhere to go: its 429 comes back,
    // body intact.
    let layer = FallbackLayer::new(CHAIN);
    let stats = layer.stats();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.oneshot(chat("qwen-max")).await.unwrap();
    assert_eq!(res.status(), 429);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, RATE_QUOTA.as_bytes());
    assert_eq!(stats.exhausted(), 1);
    assert!(!calls.lock().unwrap().contains_key("qwen-turbo"));
}

#[tokio::test]
async fn models_outside_the_chain_pass_through() {
    static ANSWERS: [(&str, u16, &str, &str); 1] =
        [("qwen-long", 429, "application/json", RATE_QUOTA)];
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN))
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.oneshot(chat("qwen-long")).await.unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-long");
    assert_eq!(calls.lock().unwrap()["qwen-long"], 1);
}

#[tokio::test]
async fn transient_failures_fall_back_only_when_asked() {
    static ANSWERS: [(&str, u16, &str, &str); 1] = [(
        "qwen-turbo",
        503,
        "application/json",
        r#"{"code":"ServiceUnavailable","message":"Service temporarily unavailable, possibly overloaded or not ready."}"#,
    )];
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN))
        .service(upstream(&ANSWERS, calls.clone()));
    assert_eq!(svc.oneshot(chat("qwen-turbo")).await.unwrap().status(), 503);
    let on = FallbackOn {
        transient: true,
        ..FallbackOn::default()
    };
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN).on(on))
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(
        (
            res.status().as_u16(),
            res.headers()[MODEL_HEADER].to_str().unwrap()
        ),
        (200, "qwen-plus")
    );
}

#[tokio::test]
async fn sse_error_first_frame_falls_back_but_a_flowing_stream_does_not() {
    static ANSWERS: [(&str, u16, &str, &str); 2] = [
        (
            "qwen-turbo",
            200,
            "text/event-stream",
            "id:1\nevent:error\n:HTTP_STATUS/429\ndata:{\"request_id\":\"1\",\"code\":\"Throttling.AllocationQuota\",\"message\":\"Allocated quota exceeded, please increase your quota limit.\"}\n\n",
        ),
        (
            "qwen-plus",
            200,
            "text/event-stream",
            "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"Hi\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]}}\n\nid:2\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.AllocationQuota\",\"message\":\"Allocated quota exceeded\"}\n\n",
        ),
    ];
    let calls = Calls::default();
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN))
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
    // qwen-plus's stream started well (its first frame carries output): it
    // is handed on whole, error and all.
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, ANSWERS[1].3.as_bytes());
    assert!(!calls.lock().unwrap().contains_key("qwen-max"));
}

#[tokio::test]
async fn open_circuit_of_one_model_moves_to_the_next() {
    let calls = Calls::default();
    static ANSWERS: [(&str, u16, &str, &str); 0] = [];
    let breaker =
        CircuitBreakerLayer::new().keyed(tower_qwen::key::ByModel, NonZeroUsize::new(16).unwrap());
    let handle = breaker.handle();
    handle.force_open_key(&Some(Arc::from("qwen-turbo")));
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN))
        .layer(breaker)
        .service(upstream(&ANSWERS, calls.clone()));
    let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    let calls = calls.lock().unwrap();
    assert_eq!(
        (calls.get("qwen-turbo"), calls.get("qwen-plus")),
        (None, Some(&1))
    );
}

/// Against the mock: qwen-turbo's quota is tiny, so a burst overflows to
/// qwen-plus, and every request succeeds.
#[tokio::test(start_paused = true)]
async fn overflow_to_the_next_model_against_the_mock() {
    use std::num::NonZeroU64;
    use tower_qwen::client::{ApiKey, SetUpstreamLayer, TransportConfig};
    use tower_qwen::mock::{MockDashScope, Quota};

    let mock = MockDashScope::builder()
        .key("sk-fb", "acct")
        .quota(
            "qwen-turbo",
            Quota::new(
                NonZeroU32::new(60).unwrap(),
                NonZeroU64::new(1_000_000).unwrap(),
            ),
        )
        .quota(
            "qwen-plus",
            Quota::new(
                NonZeroU32::new(600).unwrap(),
                NonZeroU64::new(1_000_000).unwrap(),
            ),
        )
        .start()
        .await
        .unwrap();
    let layer = FallbackLayer::new(CHAIN);
    let stats = layer.stats();
    let svc = ServiceBuilder::new()
        .layer(layer)
        .layer(SetUpstreamLayer::new(
            mock.base_url().parse().unwrap(),
            ApiKey::new("sk-fb").unwrap(),
        ))
        .service(TransportConfig::new().build());
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
            let model = res.headers()[MODEL_HEADER].to_str().unwrap().to_owned();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            (status, model)
        }));
    }
    let mut by_model = BTreeMap::new();
    for t in tasks {
        let (status, model) = t.await.unwrap();
        assert_eq!(status, 200);
        *by_model.entry(model).or_insert(0) += 1;
    }
    // 60 RPM is 1 per second: one request on turbo, seven on plus.
    assert_eq!(by_model.get("qwen-turbo"), Some(&1));
    assert_eq!(by_model.get("qwen-plus"), Some(&7));
    assert_eq!(stats.fallbacks(), 7);
    let s = mock.stats();
    assert_eq!(s.code("Throttling.RateQuota") + s.code("limit_requests"), 7);
}

/// The recommended order: fallback → retry → breaker (per model) → rate
/// limit (per model) → upstream.
fn recommended_stack(
    answers: &'static [(&'static str, u16, &'static str, &'static str)],
    calls: Calls,
    turbo_rpm: u32,
) -> (
    impl tower::Service<
        Request<Body>,
        Response = Response<impl http_body::Body<Data = Bytes, Error: std::fmt::Debug>>,
        Error = tower_qwen::BoxError,
    > + Clone,
    tower_qwen::retry::RetryStats,
    tower_qwen::fallback::FallbackStats,
) {
    use tower_qwen::key::ByModel;
    use tower_qwen::rate_limit::{Limits, Quota, RateLimitLayer, RateLimiter};
    let nz = |n| NonZeroU32::new(n).unwrap();
    let turbo = Limits::requests(Quota::per_minute(nz(turbo_rpm)).allow_burst(nz(1)));
    let limiter = RateLimiter::builder(Limits::UNLIMITED).build_keyed_with(
        move |model: &Option<Arc<str>>| match model.as_deref() {
            Some("qwen-turbo") => turbo,
            _ => Limits::UNLIMITED,
        },
    );
    let retry = tower_qwen::retry::RetryLayer::new().rng(tower_qwen::util::rng::SeededRng::new(1));
    let retry_stats = retry.stats();
    let fallback = FallbackLayer::new(CHAIN);
    let fallback_stats = fallback.stats();
    let svc = ServiceBuilder::new()
        .layer(fallback)
        .layer(retry)
        .layer(
            CircuitBreakerLayer::new()
                .jitter(0.0)
                .keyed(ByModel, NonZeroUsize::new(16).unwrap()),
        )
        .layer(RateLimitLayer::keyed(limiter, ByModel))
        .service(upstream(answers, calls));
    (svc, retry_stats, fallback_stats)
}

/// Issue 14: a request the local limiter would make wait (here 10 s, under
/// its 30 s maximum) goes to the next model at once: no wait, no retry, no
/// retry budget spent.
#[tokio::test(start_paused = true)]
async fn a_local_throttle_moves_to_the_next_model_at_once() {
    static ANSWERS: [(&str, u16, &str, &str); 0] = [];
    let calls = Calls::default();
    let (svc, retries, fallbacks) = recommended_stack(&ANSWERS, calls.clone(), 6);
    let start = tokio::time::Instant::now();
    let res = svc.clone().oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-turbo");
    for _ in 0..3 {
        let res = svc.clone().oneshot(chat("qwen-turbo")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    }
    assert_eq!(start.elapsed(), std::time::Duration::ZERO, "no wait");
    assert_eq!((retries.retries(), retries.budget_denied()), (0, 0));
    assert_eq!(fallbacks.fallbacks(), 3);
    let calls = calls.lock().unwrap().clone();
    assert_eq!(
        (calls.get("qwen-turbo"), calls.get("qwen-plus")),
        (Some(&1), Some(&3))
    );
}

/// Issue 14: once a model's circuit is open, its requests go to the next
/// model at once instead of waiting out the open time behind the retry
/// layer.
#[tokio::test(start_paused = true)]
async fn a_dead_model_moves_to_the_next_at_once() {
    static ANSWERS: [(&str, u16, &str, &str); 1] = [(
        "qwen-turbo",
        503,
        "application/json",
        r#"{"code":"ServiceUnavailable","message":"down"}"#,
    )];
    let calls = Calls::default();
    let (svc, retries, fallbacks) = recommended_stack(&ANSWERS, calls.clone(), 6000);
    // Three 503s (one request and its two retries) open turbo's circuit;
    // a plain 5xx does not fall back by default.
    let res = svc.clone().oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(calls.lock().unwrap().get("qwen-turbo"), Some(&3));
    let retried = retries.retries();

    let start = tokio::time::Instant::now();
    for _ in 0..3 {
        let res = svc.clone().oneshot(chat("qwen-turbo")).await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    }
    assert_eq!(start.elapsed(), std::time::Duration::ZERO, "no wait");
    assert_eq!(retries.retries(), retried, "no retry of an open circuit");
    assert_eq!(fallbacks.fallbacks(), 3);
    assert_eq!(calls.lock().unwrap().get("qwen-turbo"), Some(&3));
}
