//! Runs the tower-qwen gateway.
//!
//! ```text
//! DASHSCOPE_API_KEY=sk-... cargo run --release --features gateway,mock --example gateway -- --config examples/gateway.toml
//! # or, with a mock DashScope behind it (no key, no network):
//! cargo run --release --features gateway,mock --example gateway -- --config examples/gateway.toml --mock
//!
//! curl -s localhost:8080/compatible-mode/v1/chat/completions \
//!   -H 'authorization: Bearer gw-demo-key-change-me' -H 'content-type: application/json' \
//!   -d '{"model":"qwen-plus","messages":[{"role":"user","content":"Hello"}]}'
//! curl -s localhost:8080/metrics
//! ```
//!
//! Logs go to stderr (`RUST_LOG` filters them, default `info`). Ctrl-C or
//! SIGTERM shuts down gracefully.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tower_qwen::gateway::{Gateway, GatewayConfig};
use tower_qwen::mock::MockDashScope;

#[derive(Parser, Debug)]
#[command(
    about = "A local DashScope gateway: per-key buckets, 429s with Retry-After, degradation, SSE pass-through, metrics"
)]
struct Args {
    /// The TOML configuration file.
    #[arg(long, default_value = "gateway.toml")]
    config: PathBuf,
    /// Start a mock DashScope on loopback and send everything there.
    #[arg(long)]
    mock: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("cannot read {}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    let mock = if args.mock {
        match MockDashScope::builder().accept_any_key(true).start().await {
            Ok(m) => {
                tracing::info!(url = %m.base_url(), "mock DashScope started");
                Some(m)
            }
            Err(e) => {
                eprintln!("cannot start the mock: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let mock_url = mock.as_ref().map(|m| m.base_url());
    let config = GatewayConfig::from_toml_with_env(&text, |name| {
        // With --mock, the upstream is the mock, and any upstream key works.
        match (&mock_url, name) {
            (Some(url), "QWEN_GATEWAY_UPSTREAM_BASE_URL") => Some(url.clone()),
            (Some(_), "QWEN_GATEWAY_UPSTREAM_REGION") => None,
            (Some(_), n) if n.contains("API_KEY") => {
                Some(std::env::var(n).unwrap_or_else(|_| "sk-mock".into()))
            }
            _ => std::env::var(name).ok(),
        }
    });
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    let gateway = Gateway::new(config);
    let result = gateway.serve_on().await;
    drop(mock);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}
