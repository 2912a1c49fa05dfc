//! One builder per concept (issue 14, item 5): the settings the backends
//! share are set once on `RateLimiter::builder` / `Budget::builder`, and
//! reach the in-memory and the Redis backend alike (through the Redis
//! backend's own decisions and through its fail-open fallback).

use std::convert::Infallible;
use std::num::NonZeroU64;
use std::time::SystemTime;

use tower_qwen::classify::{FnClassifier, Outcome};
use tower_qwen::key::key_fn;
use tower_qwen::rate_limit::error::BudgetExceeded;
use tower_qwen::rate_limit::{
    Backend, Budget, BudgetBuilder, BudgetLimits, BudgetStore, Decision, LimiterStore, Permit,
    RateLimiterBuilder, Ticket, WallClock,
};

use tower_qwen::redis::RedisBudget;

use super::*;

/// Admits one call of `key` in `backend` (waiting for a round trip if the
/// backend needs one) and returns its permit.
async fn admit<B: Backend<u32>>(backend: &B, key: u32) -> <B::Ticket as Ticket>::Permit {
    match backend.decide(&key, |_| Cost::ONE, Duration::ZERO, Instant::now()) {
        Decision::Admitted(p) => p,
        Decision::Booked(t) => t.admit(),
        Decision::Pending(f) => tokio::time::timeout(Duration::from_secs(30), f)
            .await
            .expect("a decision never hangs")
            .expect("admitted")
            .admit(),
        Decision::Refused(e) => panic!("refused: {e}"),
    }
}

/// What `backend` says, in the one layer (reject mode), to calls
/// `(key, tokens)` in order: `None` admitted, or the refusal's type.
async fn outcomes<B>(backend: B, calls: &[(u32, u32)]) -> Vec<Option<&'static str>>
where
    B: Backend<u32>,
{
    let svc = RateLimitLayer::keyed(backend, key_fn(|c: &mut (u32, u32)| c.0))
        .cost(|c: &mut (u32, u32)| Cost::call(c.1))
        .classifier(FnClassifier::new(|_: &u32| Outcome::Success))
        .reject()
        .layer(service_fn(|c: (u32, u32)| async move {
            Ok::<_, Infallible>(c.1)
        }));
    let mut out = Vec::new();
    for &call in calls {
        let r = tokio::time::timeout(Duration::from_secs(30), svc.clone().oneshot(call))
            .await
            .expect("a decision never hangs");
        out.push(r.err().map(|e| {
            if e.is::<RateLimited>() {
                "rate limited"
            } else if e.is::<BudgetExceeded>() {
                "budget exceeded"
            } else {
                panic!("unexpected error: {e}")
            }
        }));
    }
    out
}

/// A Redis connection that cannot connect (the server is gone).
fn dead_redis() -> redis::aio::ConnectionManager {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    connect_lazy(&url, None).unwrap()
}

/// Both backends from one builder: the settings are set once.
fn both<S>(shared: RateLimiterBuilder, conn: S) -> (RateLimiter<u32>, RedisLimiter<u32>)
where
    S: FnOnce(RateLimiterBuilder) -> RateLimiterBuilder<RedisStore>,
{
    let memory = shared.clone().build_keyed();
    (memory, conn(shared).build_keyed())
}

fn shared_again(
    limits: Limits,
    feedback: Option<tower_qwen::rate_limit::Feedback>,
) -> RateLimiterBuilder {
    RateLimiter::builder(limits).feedback(feedback)
}

#[tokio::test]
async fn one_limiter_builder_gives_both_backends_the_same_feedback_setting() {
    let server = RedisServer::start();
    let limits = Limits::requests(Quota::per_hour(nz(100)));
    for (feedback, wanted) in [
        (None, false),
        (Some(tower_qwen::rate_limit::Feedback::new()), true),
    ] {
        let shared = shared_again(limits, feedback);
        let (memory, redis) = both(shared, |b| {
            b.redis(conn(&server))
                .prefix(format!("test:one-builder-feedback-{wanted}:"))
                .timeout(Duration::from_secs(5))
        });
        let m = admit(&memory, 1).await;
        let r = admit(&redis, 1).await;
        assert!(r.is_from_redis());
        assert_eq!(m.wants_feedback(), wanted);
        assert_eq!(r.wants_feedback(), wanted, "redis, feedback {feedback:?}");
        // The fail-open fallback too (it always had feedback on before
        // the builders were one).
        let down = shared_again(limits, feedback)
            .redis(dead_redis())
            .timeout(Duration::from_secs(2))
            .build_keyed::<u32>();
        let f = admit(&down, 1).await;
        assert!(f.is_fallback());
        assert_eq!(
            f.wants_feedback(),
            wanted,
            "fallback, feedback {feedback:?}"
        );
    }
}

#[tokio::test]
async fn one_limiter_builder_gives_both_backends_the_same_key_bound() {
    // 1 an hour per key; Redis is gone, so the Redis backend decides in
    // its fail-open fallback, which the shared settings build too.
    let limits = Limits::requests(Quota::per_hour(nz(1)));
    let calls = [(1, 1), (2, 1), (3, 1)];
    for (max_keys, expected) in [
        // Key 1 holds the only place; keys 2 and 3 share the overflow
        // state: 3 is refused.
        (1, vec![None, None, Some("rate limited")]),
        (100, vec![None, None, None]),
    ] {
        let shared = RateLimiter::builder(limits).max_keys(max_keys);
        let (memory, redis) = both(shared, |b| {
            b.redis(dead_redis())
                .timeout(Duration::from_secs(2))
                .probe_every(Duration::from_secs(3600))
                .on_failure(FailurePolicy::fail_open(nz(1)))
        });
        assert_eq!(
            outcomes(memory, &calls).await,
            expected,
            "memory, {max_keys}"
        );
        assert_eq!(
            outcomes(redis.clone(), &calls).await,
            expected,
            "redis, {max_keys}"
        );
        assert!(redis.stats().fallback >= 3, "{:?}", redis.stats());
    }
}

/// Both budget backends from one builder.
fn budgets<S>(shared: BudgetBuilder, limits: BudgetLimits, on: S) -> (Budget<u32>, RedisBudget<u32>)
where
    S: FnOnce(BudgetBuilder) -> BudgetBuilder<RedisStore>,
{
    (shared.build(limits), on(shared).build(limits))
}

#[tokio::test]
async fn one_budget_builder_gives_both_backends_the_same_clock_and_key_bound() {
    // 100 tokens a day, and it is 22:00 UTC on the shared clock.
    let ten_pm = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 22 * 3600);
    let limits = BudgetLimits::per_day(NonZeroU64::new(100).unwrap());
    let calls = [(1, 60), (2, 30), (3, 80)];
    for (max_keys, expected) in [
        // Keys 2 and 3 share the overflow count: 30 + 80 > 100.
        (1, vec![None, None, Some("budget exceeded")]),
        (100, vec![None, None, None]),
    ] {
        let shared = Budget::builder()
            .clock(WallClock::starting_at(ten_pm))
            .max_keys(max_keys);
        let (memory, redis) = budgets(shared, limits, |b| {
            b.redis(dead_redis())
                .timeout(Duration::from_secs(2))
                .probe_every(Duration::from_secs(3600))
                .on_failure(FailurePolicy::fail_open(nz(1)))
        });
        assert_eq!(
            outcomes(memory.clone(), &calls).await,
            expected,
            "memory, {max_keys}"
        );
        assert_eq!(
            outcomes(redis.clone(), &calls).await,
            expected,
            "redis, {max_keys}"
        );
        // The same wall clock: the day ends in 2 h for both.
        for snapshot in [memory.snapshot(&1), redis.snapshot(&1)] {
            let reset = snapshot.unwrap().tokens.unwrap().reset;
            assert!(
                reset <= Duration::from_secs(2 * 3600)
                    && reset > Duration::from_secs(2 * 3600 - 60),
                "{reset:?}"
            );
        }
    }
}

/// The store is a type parameter: code generic over it sets the shared
/// settings once for any backend.
#[tokio::test]
async fn code_generic_over_the_store_builds_either_backend() {
    fn per_key<S: LimiterStore<u32>>(b: RateLimiterBuilder<S>) -> S::Limiter {
        b.max_keys(1).build_keyed()
    }
    fn daily<S: BudgetStore<u32>>(b: BudgetBuilder<S>) -> S::Budget {
        b.max_keys(1)
            .build(BudgetLimits::per_day(NonZeroU64::new(100).unwrap()))
    }
    let limits = Limits::requests(Quota::per_hour(nz(1)));
    let calls = [(1, 1), (2, 1), (3, 1)];
    let expected = vec![None, None, Some("rate limited")];
    let memory: RateLimiter<u32> = per_key(RateLimiter::builder(limits));
    let redis: RedisLimiter<u32> = per_key(RateLimiter::builder(limits).redis(dead_redis()));
    assert_eq!(outcomes(memory, &calls).await, expected);
    assert_eq!(outcomes(redis, &calls).await, expected);
    let memory: Budget<u32> = daily(Budget::builder());
    let redis: RedisBudget<u32> = daily(Budget::builder().redis(dead_redis()));
    for snapshot in [memory.snapshot(&1), redis.snapshot(&1)] {
        assert_eq!(snapshot.unwrap().tokens.unwrap().remaining, 100);
    }
}
