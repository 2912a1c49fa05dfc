//! A bulk job of classifications through the Batch API of the mock
//! DashScope: half the price, and none of the real-time quota.
//!
//! ```text
//! cargo run --release --features batch --example batch                  # 10,000 classifications
//! cargo run --release --features batch --example batch -- --requests 300
//! ```
//!
//! Every request goes through one client: [`DeferLayer`] sends the ones
//! marked [`Deferrable`] to the [`Batch`](tower_qwen::batch::Batch) service
//! and would send the others to the real-time [`QwenClient`]. The mock runs
//! each batch through states that take a few seconds (validating 0.5 s, in
//! progress 2 s, finalizing 0.5 s), on the real clock.
//!
//! Prices are list prices per million tokens, input and output (default:
//! qwen-plus on the international site, $0.40 and $1.20, as the Model
//! Studio price page listed them in 2025; pass yours with `--input-price`
//! and `--output-price`). The Batch API bills 50% of them (QWEN-API.md A6).

use std::time::{Duration, Instant};

use clap::Parser;
use http_body_util::BodyExt;
use tower::{Layer, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::batch::{BatchLayer, DeferLayer, Deferrable, FileStore};
use tower_qwen::client::{ApiKey, ChatRequest, QwenClient, SetUpstreamLayer, TransportConfig};
use tower_qwen::mock::{BatchTiming, MockDashScope};

#[derive(Parser)]
#[command(about = "A bulk classification job through the Batch API of the mock DashScope")]
struct Args {
    /// Classifications to run.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// List price of a million input tokens, in dollars.
    #[arg(long, default_value_t = 0.40)]
    input_price: f64,
    /// List price of a million output tokens, in dollars.
    #[arg(long, default_value_t = 1.20)]
    output_price: f64,
}

const REVIEWS: [&str; 5] = [
    "Arrived on time and works perfectly.",
    "The battery died after two days.",
    "It is a phone case. It holds the phone.",
    "Best purchase I made this year!",
    "Customer support never answered my emails.",
];

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let mock = MockDashScope::builder()
        .key("sk-batch-example", "example")
        .batch_timing(
            BatchTiming::default()
                .validating(Duration::from_millis(500))
                .in_progress(Duration::from_secs(2))
                .finalizing(Duration::from_millis(500)),
        )
        .start()
        .await?;
    let dir = std::env::temp_dir().join(format!("tower-qwen-batch-example-{}", std::process::id()));

    // The Batch API over the transport; the real-time stack beside it.
    let batch = BatchLayer::new()
        .max_wait(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(250), Duration::from_secs(2))
        .store(FileStore::new(dir.join("batches.json")))
        .layer(
            SetUpstreamLayer::new(mock.base_url().parse()?, ApiKey::new("sk-batch-example")?)
                .layer(TransportConfig::new().build()),
        );
    let realtime = QwenClient::builder()
        .base_url(mock.base_url().parse()?)
        .api_key("sk-batch-example")?
        .build()?;
    let client = DeferLayer::new(batch.clone()).layer(realtime);

    println!(
        "classifying {} reviews through the Batch API of the mock DashScope at {}",
        args.requests,
        mock.base_url()
    );
    let t0 = Instant::now();
    let calls: Vec<_> = (0..args.requests)
        .map(|i| {
            let mut req = ChatRequest::new("qwen-plus")
                .system("Answer with one word: positive, negative or neutral.")
                .user(format!("Review #{i}: {}", REVIEWS[i % REVIEWS.len()]))
                .max_tokens(2)
                .into_request();
            Deferrable::mark(&mut req);
            tokio::spawn(client.clone().oneshot(req))
        })
        .collect();
    let (mut ok, mut failed) = (0usize, 0usize);
    for call in calls {
        match call.await? {
            Ok(res) if res.status().is_success() => {
                let _ = res.into_body().collect().await?;
                ok += 1;
            }
            Ok(_) | Err(_) => failed += 1,
        }
    }
    let wall = t0.elapsed();

    let s = batch.stats();
    let rt = mock.stats();
    let list = (s.input_tokens as f64 * args.input_price
        + s.output_tokens as f64 * args.output_price)
        / 1e6;
    let rows = [
        ("requests", format!("{}", args.requests)),
        ("answered 200 / failed", format!("{ok} / {failed}")),
        ("files uploaded", format!("{}", s.files)),
        ("batches", format!("{}", s.batches)),
        (
            "real-time quota used (requests / tokens, mock counters)",
            format!(
                "{} / {}",
                rt.admitted_by_model.values().sum::<u64>(),
                rt.input_tokens + rt.output_tokens
            ),
        ),
        (
            "tokens (input / output)",
            format!("{} / {}", s.input_tokens, s.output_tokens),
        ),
        ("cost at list price (real time)", format!("${list:.4}")),
        (
            "cost through the Batch API (50%)",
            format!("${:.4}", list / 2.0),
        ),
        (
            "HTTP calls to the mock (upload, create, polls, downloads, deletes)",
            format!("{}", rt.requests),
        ),
        ("wall time", format!("{:.2} s", wall.as_secs_f64())),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    println!();
    for (k, v) in rows {
        println!("  {k:<width$}  {v}");
    }
    println!(
        "\n(at qwen-plus' default 600 RPM, the same job in real time needs at least {:.1} min of quota)",
        args.requests as f64 / 600.0
    );
    let _ = std::fs::remove_dir_all(&dir);
    mock.shutdown().await;
    if failed > 0 || rt.admitted_by_model.values().sum::<u64>() > 0 {
        return Err("the bulk job did not complete through the Batch API alone".into());
    }
    Ok(())
}
