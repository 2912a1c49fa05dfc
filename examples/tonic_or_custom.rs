//! tower-qwen's non-HTTP layers on a plain `tower::Service`: the shape of a
//! tonic channel wrapper, an SDK-style client, or any custom transport.
//!
//! ```text
//! cargo run --example tonic_or_custom
//! ```
//!
//! The concurrency limit and the circuit breaker take a
//! [`FnClassifier`](tower_qwen::classify::FnClassifier) that reads your
//! response type; the rate limiter's [`RateLimiter`] is used directly:
//! reserve a slot (requests + estimated tokens), wait for it, call, then
//! reconcile with the real usage. Runs in paused (virtual) time, so it
//! finishes at once and prints exact waits.

use std::convert::Infallible;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use tower::{Service, ServiceBuilder, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::circuit_breaker::{CircuitBreakerLayer, State};
use tower_qwen::classify::{FnClassifier, Outcome, ThrottleCause};
use tower_qwen::concurrency::ConcurrencyLimitLayer;
use tower_qwen::rate_limit::{Cost, Limits, Quota, RateLimiter};
use tower_qwen::tokens::estimate_text_tokens;

/// A request of your own protocol (a protobuf message, an SDK struct...).
#[derive(Clone, Debug)]
struct Prompt {
    model: &'static str,
    text: String,
}

/// Its answer: a status code of your protocol and the tokens used.
#[derive(Clone, Debug)]
struct Completion {
    code: u32, // 0 ok, 8 RESOURCE_EXHAUSTED, 14 UNAVAILABLE (gRPC-style)
    tokens: u32,
}

/// How each layer reads a `Completion`.
fn outcome(c: &Completion) -> Outcome {
    match c.code {
        0 => Outcome::Success,
        8 => Outcome::throttled(ThrottleCause::Unknown),
        14 => Outcome::TRANSIENT,
        _ => Outcome::Permanent {
            reason: tower_qwen::classify::PermanentReason::Other,
        },
    }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    // The "upstream": fails (UNAVAILABLE) on calls 4 to 6, then recovers.
    let calls = Arc::new(AtomicU32::new(0));
    let upstream = tower::service_fn({
        let calls = calls.clone();
        move |p: Prompt| {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let code = if (4..=6).contains(&n) { 14 } else { 0 };
                Ok::<_, Infallible>(Completion {
                    code,
                    tokens: estimate_text_tokens(&p.text) + 20,
                })
            }
        }
    });

    let classify = FnClassifier::new(outcome);
    let breaker = CircuitBreakerLayer::new().classifier(classify).jitter(0.0);
    let health = breaker.handle();
    let stack = ServiceBuilder::new()
        .layer(breaker)
        .layer(ConcurrencyLimitLayer::new(NonZeroUsize::new(4).unwrap()).classifier(classify))
        .service(upstream);

    // 2 calls and 100 tokens per second for this model, no burst.
    let nz = |n| NonZeroU32::new(n).unwrap();
    let limiter = RateLimiter::new(
        Limits::requests(Quota::per_second(nz(2)).allow_burst(nz(1)))
            .and_tokens(Quota::per_second(nz(100)).allow_burst(nz(1))),
    );

    let start = tokio::time::Instant::now();
    for i in 1..=10 {
        let prompt = Prompt {
            model: "qwen-plus",
            text: format!("question number {i}"),
        };
        // Reserve: one request and an estimate of its tokens.
        let estimate = estimate_text_tokens(&prompt.text) + 32;
        let reservation = limiter.reserve(&(), Cost::call(estimate), Duration::from_secs(30))?;
        let admission = reservation.ready().await;
        let at = start.elapsed();
        let result = stack.clone().ready().await?.call(prompt.clone()).await;
        match result {
            Ok(c) => {
                // Reconcile the reservation with what was really used.
                admission.reconcile(c.tokens);
                println!(
                    "{:>6.2}s call {i:>2} ({}): code {} ({} tokens); circuit {:?}",
                    at.as_secs_f64(),
                    prompt.model,
                    c.code,
                    c.tokens,
                    health.state()
                );
            }
            Err(e) => println!(
                "{:>6.2}s call {i:>2}: refused without calling: {e}; circuit {:?}",
                at.as_secs_f64(),
                health.state()
            ),
        }
    }
    assert_eq!(
        health.state(),
        State::Open,
        "three UNAVAILABLE answers opened the circuit"
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let probe = stack
        .clone()
        .oneshot(Prompt {
            model: "qwen-plus",
            text: "probe".into(),
        })
        .await?;
    println!(
        "after the open duration a probe passes: code {}; circuit {:?}",
        probe.code,
        health.state()
    );
    assert_eq!(health.state(), State::Closed);
    Ok(())
}
