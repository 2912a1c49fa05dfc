#![cfg(all(feature = "client", feature = "mock"))]
//! Hand-built stacks compile and run where real code puts them: inside
//! `tokio::spawn` and an axum handler (issue 14). Each case builds the
//! README's stack (or a breaker over tower's own `Timeout`) exactly as
//! written there, with no `map_err` in between, and sends a request to the
//! mock DashScope server. A stack whose future is not `Send` fails to
//! compile here.

use std::num::NonZeroUsize;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_qwen::body::Body;
use tower_qwen::client::{ApiKey, ChatRequest, SetUpstreamLayer, TransportConfig};
use tower_qwen::key::ByAccountModel;
use tower_qwen::mock::{MockDashScope, MockHandle};
use tower_qwen::rate_limit::{QuotaTable, RateLimitLayer};
use tower_qwen::{circuit_breaker, concurrency, retry, timeout};

const KEY: &str = "sk-compile";

async fn mock() -> MockHandle {
    MockDashScope::builder()
        .key(KEY, "acct")
        .start()
        .await
        .unwrap()
}

/// The README's hand-built stack, as written there, aimed at `base`.
macro_rules! readme_stack {
    ($base:expr) => {
        ServiceBuilder::new()
            .layer(retry::RetryLayer::new()) // retry what heals, with a budget
            .layer(circuit_breaker::CircuitBreakerLayer::new()) // fail fast (or degrade) when broken
            .layer(RateLimitLayer::qwen(QuotaTable::qwen(), ByAccountModel::new())) // RPM + TPM per (account, model)
            .layer(concurrency::ConcurrencyLimitLayer::new(
                NonZeroUsize::new(64).unwrap(),
            ))
            .layer(timeout::TimeoutLayer::new()) // 60 s idle between frames, 300 s in all
            .layer(SetUpstreamLayer::new($base, ApiKey::new(KEY).unwrap()))
            .service(TransportConfig::new().build())
    };
}

fn chat() -> Request<Body> {
    ChatRequest::new("qwen-plus")
        .user("Hello")
        .max_tokens(4)
        .into_request()
}

#[tokio::test]
async fn the_readme_stack_runs_inside_tokio_spawn() {
    let mock = mock().await;
    let client = readme_stack!(mock.base_url().parse().unwrap());
    let task = tokio::spawn(client.clone().oneshot(chat()));
    let res = task.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    // The body is read inside a task too.
    let body = tokio::spawn(async move { res.into_body().collect().await.unwrap().to_bytes() })
        .await
        .unwrap();
    assert!(body.starts_with(b"{"));
}

#[tokio::test]
async fn the_readme_stack_runs_inside_an_axum_handler() {
    let mock = mock().await;
    let client = readme_stack!(mock.base_url().parse().unwrap());
    // The handler owns a clone of the concrete stack: axum requires its
    // future to be `Send`, checked here with the stack's own types.
    let handler = move |question: String| {
        let client = client.clone();
        async move {
            let req = ChatRequest::new("qwen-plus")
                .user(question)
                .max_tokens(4)
                .into_request();
            let res = client
                .oneshot(req)
                .await
                .map_err(|_| StatusCode::SERVICE_UNAVAILABLE)?;
            let bytes = res
                .into_body()
                .collect()
                .await
                .map_err(|_| StatusCode::BAD_GATEWAY)?
                .to_bytes();
            Ok::<_, StatusCode>(String::from_utf8_lossy(&bytes).into_owned())
        }
    };
    let app = axum::Router::new().route("/ask", axum::routing::post(handler));
    let res = app
        .oneshot(
            Request::post("/ask")
                .body(axum::body::Body::from("What is a token bucket?"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert!(body.starts_with(b"{"), "{body:?}");
}

/// A plain (non-HTTP) upstream whose error is its own type.
#[derive(Clone, Debug)]
struct Echo;

impl Service<u32> for Echo {
    type Response = u32;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<u32, std::io::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, n: u32) -> Self::Future {
        std::future::ready(Ok(n))
    }
}

/// A breaker over a service whose error is a `BoxError` (tower's own
/// `Timeout`), HTTP and not, inside `tokio::spawn`.
#[tokio::test]
async fn a_breaker_over_towers_timeout_runs_inside_tokio_spawn() {
    use tower_qwen::classify::{FnClassifier, Outcome};
    let classify = FnClassifier::new(|_: &u32| Outcome::Success);
    let svc = ServiceBuilder::new()
        .layer(circuit_breaker::CircuitBreakerLayer::new().classifier(classify))
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(5)))
        .service(Echo);
    assert_eq!(tokio::spawn(svc.oneshot(7)).await.unwrap().unwrap(), 7);

    let mock = mock().await;
    let client = ServiceBuilder::new()
        .layer(retry::RetryLayer::new())
        .layer(circuit_breaker::CircuitBreakerLayer::new())
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_secs(30)))
        .layer(SetUpstreamLayer::new(
            mock.base_url().parse().unwrap(),
            ApiKey::new(KEY).unwrap(),
        ))
        .service(TransportConfig::new().build());
    let res = tokio::spawn(client.oneshot(chat())).await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
}
