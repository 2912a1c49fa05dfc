//! Runs the mock DashScope server until Ctrl-C.
//!
//! ```text
//! cargo run --features mock --example mock_server -- --rpm 600 --tpm 1000000
//! cargo run --features mock --example mock_server -- --port 8080 --key sk-1=acct --key sk-2=acct \
//!     --fault-rate 0.05 --latency-ms 300 --per-token-ms 20 --burst-floor 20
//! cargo run --features mock --example mock_server -- --any-model --native-model-404 \
//!     --fail-first 2 --sse-without-blank-lines
//! ```
//!
//! Tools, JSON mode and thinking work as the service's (see the `mock`
//! module docs); scripted decisions need the library
//! (`MockDashScope::builder().script(..)`, see `examples/agent_loop.rs`).
//!
//! Then point a client at the printed base URL, e.g.
//!
//! ```text
//! curl -s $BASE/compatible-mode/v1/chat/completions -H 'authorization: Bearer sk-mock' \
//!     -H 'content-type: application/json' \
//!     -d '{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}]}'
//! ```

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use clap::Parser;
use tower_qwen::mock::{
    AccountState, ApiError, BurstGuard, Dist, Fault, FaultPlan, Latency, MockDashScope,
    NativeModelError, Quota, Reply, Script,
};

/// A mock DashScope (Qwen) server on 127.0.0.1.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Requests per minute per (account, model); also enforced per second
    /// (RPM/60). 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    rpm: u32,
    /// Tokens per minute per (account, model); also enforced per second
    /// (TPM/60). 0 = unlimited.
    #[arg(long, default_value_t = 0)]
    tpm: u64,
    /// A per-model quota, `MODEL=RPM:TPM` (0 = unlimited); repeatable.
    #[arg(long = "model-quota", value_name = "MODEL=RPM:TPM")]
    model_quotas: Vec<String>,
    /// Port on 127.0.0.1 (0 picks a free one).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// An accepted API key, `KEY` or `KEY=ACCOUNT`; repeatable. Default:
    /// `sk-mock`.
    #[arg(long = "key", value_name = "KEY[=ACCOUNT]")]
    keys: Vec<String>,
    /// Accept any key, each as its own account.
    #[arg(long)]
    any_key: bool,
    /// A key whose account is in a bad state, `KEY=free-quota|free-tier-only|arrearage`.
    #[arg(long = "key-state", value_name = "KEY=STATE")]
    key_states: Vec<String>,
    /// Fraction of requests answered 500/503/504 (split evenly).
    #[arg(long, default_value_t = 0.0)]
    fault_rate: f64,
    /// Fraction of requests whose connection is reset before the answer.
    #[arg(long, default_value_t = 0.0)]
    reset_rate: f64,
    /// Fraction of streams that stall forever after a few tokens.
    #[arg(long, default_value_t = 0.0)]
    stall_rate: f64,
    /// Fraction of throttled native streams answered 200 + `event:error`.
    #[arg(long, default_value_t = 0.0)]
    sse_throttle_rate: f64,
    /// Mean time to response headers, in milliseconds (exponential).
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Time per output token, in milliseconds (fixed).
    #[arg(long, default_value_t = 0)]
    per_token_ms: u64,
    /// Output tokens per generation (capped by max_tokens).
    #[arg(long, default_value_t = 20)]
    output_tokens: u32,
    /// Enable the burst guard with this many requests allowed in a cold
    /// second.
    #[arg(long)]
    burst_floor: Option<u32>,
    /// Burst guard growth factor over the recent average.
    #[arg(long, default_value_t = 2.0)]
    burst_factor: f64,
    /// Seed of all randomness.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Serve any model name (by default only the catalogue's).
    #[arg(long)]
    any_model: bool,
    /// Answer an unknown model natively with `404 Model.NotExist` instead
    /// of `400 InvalidParameter` "Model not exist.".
    #[arg(long)]
    native_model_404: bool,
    /// Fail the first N requests with `503 ServiceUnavailable`.
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    /// End event-stream frames with one newline, as older gateways do.
    #[arg(long)]
    sse_without_blank_lines: bool,
    /// Reasoning tokens of a thinking call.
    #[arg(long, default_value_t = 12)]
    reasoning_tokens: u32,
}

fn quota(rpm: u32, tpm: u64) -> Quota {
    Quota::unlimited()
        .with_rpm(NonZeroU32::new(rpm))
        .with_tpm(NonZeroU64::new(tpm))
}

fn parse_model_quota(s: &str) -> Result<(String, Quota), String> {
    let (model, limits) = s.split_once('=').ok_or("expected MODEL=RPM:TPM")?;
    let (rpm, tpm) = limits.split_once(':').ok_or("expected MODEL=RPM:TPM")?;
    let rpm = rpm.parse().map_err(|e| format!("bad RPM in {s:?}: {e}"))?;
    let tpm = tpm.parse().map_err(|e| format!("bad TPM in {s:?}: {e}"))?;
    Ok((model.to_owned(), quota(rpm, tpm)))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut b = MockDashScope::builder()
        .port(args.port)
        .seed(args.seed)
        .accept_any_key(args.any_key)
        .default_quota(quota(args.rpm, args.tpm));
    if let Some(n) = NonZeroU32::new(args.output_tokens) {
        b = b.output_tokens(n);
    }
    if let Some(n) = NonZeroU32::new(args.reasoning_tokens) {
        b = b.reasoning_tokens(n);
    }
    b = b
        .accept_any_model(args.any_model)
        .sse_without_blank_lines(args.sse_without_blank_lines);
    if args.native_model_404 {
        b = b.native_model_error(NativeModelError::NotExist);
    }
    if args.fail_first > 0 {
        b = b.script(Script::new().times(
            args.fail_first,
            Reply::fault(Fault::Error(ApiError::service_unavailable())),
        ));
    }
    for k in &args.keys {
        let (key, account) = k.split_once('=').unwrap_or((k, k));
        b = b.key(key, account);
    }
    for s in &args.key_states {
        let (key, state) = s.split_once('=').ok_or("expected KEY=STATE")?;
        let state = match state {
            "free-quota" => AccountState::FreeQuotaExhausted,
            "free-tier-only" => AccountState::FreeTierOnly,
            "arrearage" => AccountState::Arrearage,
            "active" => AccountState::Active,
            other => return Err(format!("unknown key state {other:?}").into()),
        };
        b = b.key_state(key, state);
    }
    for q in &args.model_quotas {
        let (model, q) = parse_model_quota(q)?;
        b = b.quota(model, q);
    }
    if let Some(floor) = args.burst_floor.and_then(NonZeroU32::new) {
        b = b.burst_guard(BurstGuard::new(floor, args.burst_factor));
    }
    let mut latency = Latency::none();
    if args.latency_ms > 0 {
        latency =
            latency.time_to_headers(Dist::exponential(Duration::from_millis(args.latency_ms)));
    }
    if args.per_token_ms > 0 {
        latency = latency.per_token(Dist::fixed(Duration::from_millis(args.per_token_ms)));
    }
    let plan = FaultPlan::new()
        .server_errors(args.fault_rate)
        .with(Fault::Reset, args.reset_rate)
        .with(
            Fault::Stall {
                after_tokens: 3,
                duration: None,
            },
            args.stall_rate,
        )
        .throttled_stream_as_sse(args.sse_throttle_rate)
        .latency(latency);
    let mock = b.faults(plan).start().await?;

    println!("{}", mock.base_url());
    eprintln!(
        "mock DashScope listening on {} (native: {}, compatible: {}); Ctrl-C to stop",
        mock.base_url(),
        mock.native_base_url(),
        mock.compatible_base_url()
    );
    if args.keys.is_empty() && !args.any_key {
        eprintln!("API key: {}", MockDashScope::DEFAULT_KEY);
    }
    tokio::signal::ctrl_c().await?;
    let stats = mock.stats();
    eprintln!(
        "served {} requests ({} ok, {} throttled), peak concurrency {}",
        stats.requests,
        stats.status(200),
        stats.status(429),
        stats.peak_in_flight
    );
    mock.shutdown().await;
    Ok(())
}
