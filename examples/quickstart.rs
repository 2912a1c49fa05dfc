//! One chat call and one streamed call through the whole tower-qwen stack.
//!
//! ```text
//! cargo run --example quickstart
//! DASHSCOPE_API_KEY=sk-... cargo run --example quickstart   # the real service (Singapore)
//! ```
//!
//! With `DASHSCOPE_API_KEY` set it talks to DashScope (`DASHSCOPE_REGION`
//! picks the region, default Singapore); without it, it starts the mock
//! DashScope server on loopback and says so.

use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_qwen::BoxError;
use tower_qwen::client::{ApiKey, ChatRequest, QwenClient, Region};
use tower_qwen::mock::MockDashScope;
use tower_qwen::sse::parse_events;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let mut _mock = None;
    let builder = match ApiKey::from_env() {
        Ok(key) => {
            let region: Region = std::env::var("DASHSCOPE_REGION")
                .ok()
                .map(|r| r.parse())
                .transpose()?
                .unwrap_or(Region::Singapore);
            println!("using DASHSCOPE_API_KEY ({key}) against {region:?}");
            QwenClient::builder().region(region).key(key)
        }
        Err(_) => {
            let mock = MockDashScope::builder()
                .key("sk-quickstart", "me")
                .start()
                .await?;
            println!(
                "DASHSCOPE_API_KEY is not set: using the mock DashScope server at {}",
                mock.base_url()
            );
            let b = QwenClient::builder()
                .base_url(mock.base_url().parse()?)
                .api_key("sk-quickstart")?;
            _mock = Some(mock);
            b
        }
    };
    let client = builder.build()?;

    // 1. One chat call (OpenAI-compatible mode).
    let req = ChatRequest::new("qwen-plus")
        .system("You are a helpful assistant.")
        .user("Say hello in five words.")
        .max_tokens(32)
        .into_request();
    let res = client.clone().oneshot(req).await?;
    let status = res.status();
    let body: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await?.to_bytes())?;
    println!("\n[chat] {status}");
    println!("  answer: {}", body["choices"][0]["message"]["content"]);
    println!("  usage:  {}", body["usage"]);

    // 2. One streamed call (native protocol): frames arrive as they are made.
    let req = ChatRequest::new("qwen-plus")
        .user("Count to five.")
        .max_tokens(16)
        .stream(true)
        .native()
        .into_request();
    let res = client.clone().oneshot(req).await?;
    println!("\n[stream] {}", res.status());
    let mut body = res.into_body();
    let mut frames = 0;
    let mut last_usage = serde_json::Value::Null;
    while let Some(frame) = body.frame().await {
        let Ok(bytes) = frame?.into_data() else {
            continue;
        };
        for event in parse_events(&bytes) {
            frames += 1;
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&event.data) {
                print!(
                    "{}",
                    v["output"]["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap_or("")
                );
                last_usage = v["usage"].clone();
            }
        }
    }
    println!("\n  {frames} frames, usage (cumulative, last frame): {last_usage}");

    let snapshot = client.rate_limiter().len();
    println!(
        "\nrate limiter keys in use: {snapshot}; retries so far: {}",
        client.retry_stats().retries()
    );
    Ok(())
}
