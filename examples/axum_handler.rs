//! An axum app whose handlers share one tower-qwen stack.
//!
//! ```text
//! cargo run --example axum_handler
//! curl -s localhost:3000/ask -d 'What is a token bucket?'
//! ```
//!
//! `QwenClient` is `Clone + Send + Sync`: it goes into the app's state, and
//! every handler's calls share one rate limiter, one circuit breaker, one
//! retry budget and one connection pool. Without `DASHSCOPE_API_KEY` the
//! app talks to a mock DashScope server on loopback. `--self-test` sends a
//! few requests to itself and exits (used by CI to keep this example
//! honest).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_qwen::BoxError;
use tower_qwen::client::{ApiKey, ChatRequest, QwenClient};
use tower_qwen::mock::MockDashScope;

async fn ask(
    State(client): State<QwenClient>,
    question: String,
) -> Result<String, (StatusCode, String)> {
    let req = ChatRequest::new("qwen-plus")
        .user(question)
        .max_tokens(256)
        .into_request();
    let res = client
        .oneshot(req)
        .await
        // A local limit (the wait would exceed the maximum), an open circuit
        // or a transport failure: a typed error the app turns into a 503.
        .map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err((
            StatusCode::BAD_GATEWAY,
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| (StatusCode::BAD_GATEWAY, e.to_string()))?;
    Ok(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let self_test = std::env::args().any(|a| a == "--self-test");
    let mut _mock = None;
    let client = match ApiKey::from_env() {
        Ok(key) => QwenClient::builder().key(key).build()?,
        Err(_) => {
            let mock = MockDashScope::builder()
                .key("sk-axum", "me")
                .start()
                .await?;
            eprintln!(
                "DASHSCOPE_API_KEY is not set: using the mock at {}",
                mock.base_url()
            );
            let client = QwenClient::builder()
                .base_url(mock.base_url().parse()?)
                .api_key("sk-axum")?
                .build()?;
            _mock = Some(mock);
            client
        }
    };
    let app = Router::new().route("/ask", post(ask)).with_state(client);
    let addr = if self_test {
        "127.0.0.1:0"
    } else {
        "127.0.0.1:3000"
    };
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    eprintln!("listening on http://{local}");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    if !self_test {
        server.await??;
        return Ok(());
    }
    // Self-test: three questions at once through the shared stack.
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<String>();
    let mut answers = Vec::new();
    for q in ["one", "two", "three"] {
        let req = http::Request::post(format!("http://{local}/ask")).body(q.to_owned())?;
        answers.push(http.request(req));
    }
    for a in answers {
        let res = a.await?;
        let status = res.status();
        let text = res.into_body().collect().await?.to_bytes();
        println!("{status}: {}", String::from_utf8_lossy(&text));
        if !status.is_success() {
            return Err("the self-test failed".into());
        }
    }
    server.abort();
    Ok(())
}
