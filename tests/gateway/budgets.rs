//! Token limits per client key (issue 17, item 1): tokens per minute
//! beside the request bucket, and token budgets per UTC day and month,
//! reserved at admission and reconciled with the real usage when the
//! answer ends (streams included); with `[redis]`, shared by replicas and
//! kept across a restart.
//!
//! Everything runs on tokio's paused clock; the budgets' calendar comes
//! from a [`WallClock`] set to a chosen UTC time, so `advance` crosses
//! midnight and month ends.

use std::time::SystemTime;

use tower_qwen::rate_limit::{DEFAULT_OUTPUT_TOKENS, WallClock};
use tower_qwen::request::RequestInfo;

use super::*;

const DAY: u64 = 86_400;

/// Seconds since the epoch of `y-m-d` at `hour`:00:00 UTC (from 2000 on).
fn utc(y: u64, m: u64, d: u64, hour: u64) -> SystemTime {
    // Days from 1970 to 2000-01-01, then whole years and months.
    let leap = |y: u64| (y.is_multiple_of(4) && !y.is_multiple_of(100)) || y.is_multiple_of(400);
    let mut days = 10_957;
    for year in 2000..y {
        days += if leap(year) { 366 } else { 365 };
    }
    let months = [
        31,
        if leap(y) { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    days += months[..(m - 1) as usize].iter().sum::<u64>() + (d - 1);
    SystemTime::UNIX_EPOCH + Duration::from_secs(days * DAY + hour * 3600)
}

/// A gateway for `text` whose budgets read the UTC time `at` now.
fn gateway_at(text: &str, at: SystemTime) -> Gateway {
    let cfg = GatewayConfig::from_toml_with_env(text, |_| None)
        .expect("valid config")
        .wall_clock(WallClock::starting_at(at));
    Gateway::new(cfg)
}

/// A compatible chat call that may use at most `max_tokens` of output.
fn capped_chat(max_tokens: u32, stream: bool) -> String {
    format!(
        r#"{{"model":"qwen-turbo","stream":{stream},"max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hello, world"}}]}}"#
    )
}

/// A native streamed call that may use at most `max_tokens` of output.
fn capped_native_stream(max_tokens: u32) -> String {
    format!(
        r#"{{"model":"qwen-turbo","input":{{"messages":[{{"role":"user","content":"Hello, world"}}]}},"parameters":{{"incremental_output":true,"max_tokens":{max_tokens}}}}}"#
    )
}

/// The token estimate the gateway reserves for `body` on `path`.
fn estimate(path: &str, body: &str) -> u64 {
    let info = RequestInfo::parse(path, &HeaderMap::new(), Some(body.as_bytes()));
    u64::from(info.estimated_tokens(DEFAULT_OUTPUT_TOKENS))
}

/// The total tokens a non-stream answer reports.
fn used(a: &Answer) -> u64 {
    assert_eq!(a.status, 200, "{:?}", a.body);
    a.json()["usage"]["total_tokens"]
        .as_u64()
        .unwrap_or_else(|| panic!("usage in {:?}", a.body))
}

/// The total tokens the last usage of a native stream reports.
fn stream_used(a: &Answer) -> u64 {
    assert_eq!(a.status, 200, "{:?}", a.body);
    let wire = String::from_utf8(a.body.to_vec()).unwrap();
    wire.lines()
        .rev()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .find_map(|v| v["usage"]["total_tokens"].as_u64())
        .unwrap_or_else(|| panic!("usage in {wire}"))
}

/// Alice with `fields` (a budget, a TPM); Bob unlimited (to measure).
fn budget_config(mock: &MockHandle, fields: &str, redis: &str) -> String {
    format!(
        r#"
        [upstream]
        base_url = "{base}"
        admission_wait = "off"
        header_timeout = "off"
        idle_timeout = "off"
        total_timeout = "off"
        pool_idle_timeout = "off"
        {redis}
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        [[keys]]
        name = "bob"
        key = "{BOB}"
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        {fields}
        "#,
        base = mock.base_url(),
    )
}

/// Asserts a gateway 429 for Alice's `period` budget ("Daily", "Monthly")
/// with its headers, and returns its `Retry-After`.
fn assert_budget_refusal(a: &Answer, period: &str, limit: u64) -> u64 {
    assert_compat(a, 429, "insufficient_quota");
    let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(
        message.starts_with(&format!("{period} token budget exhausted")),
        "{message}"
    );
    let retry: u64 = a.header("retry-after").parse().unwrap();
    assert_eq!(a.header("x-ratelimit-limit-tokens"), limit.to_string());
    assert_eq!(a.header("x-ratelimit-reset-tokens"), retry.to_string());
    let remaining: u64 = a.header("x-ratelimit-remaining-tokens").parse().unwrap();
    assert!(remaining < limit);
    retry
}

#[tokio::test(start_paused = true)]
async fn a_day_budget_admits_until_spent_then_refuses_until_utc_midnight() {
    let m = mock().start().await.unwrap();
    let body = capped_chat(200, false);
    let est = estimate(CHAT, &body);
    // What one call really uses (Bob has no budget).
    let text = budget_config(&m, "", "");
    let probe = gateway_at(&text, utc(2026, 3, 10, 22)).router();
    let u = used(&call(&probe, BOB, CHAT, &[], &body).await);
    assert!(
        u < est,
        "the test needs real usage ({u}) below the estimate ({est})"
    );

    // Three estimates' worth: without reconciliation, exactly three calls.
    let budget = 3 * est;
    let text = budget_config(&m, &format!("tokens_per_day = {budget}"), "");
    let app = gateway_at(&text, utc(2026, 3, 10, 22)).router();
    let mut admitted = 0;
    let refusal = loop {
        let a = call(&app, ALICE, CHAT, &[], &body).await;
        if a.status != 200 {
            break a;
        }
        assert_eq!(used(&a), u);
        // An answer shows the budget with this call's estimate reserved.
        assert_eq!(a.header("x-ratelimit-limit-tokens"), budget.to_string());
        assert_eq!(
            a.header("x-ratelimit-remaining-tokens"),
            (budget - admitted * u - est).to_string()
        );
        assert_eq!(a.header("x-ratelimit-reset-tokens"), (2 * 3600).to_string());
        admitted += 1;
        assert!(admitted < 1_000, "the budget never refused");
    };
    // Each call reserves `est` and keeps `u`: calls fit while the spent
    // usage leaves room for one more estimate.
    let expected = (budget - est) / u + 1;
    assert_eq!(
        admitted, expected,
        "estimate {est}, usage {u}, budget {budget}"
    );
    assert!(admitted > 3, "reconciliation gave tokens back");
    let retry = assert_budget_refusal(&refusal, "Daily", budget);
    assert_eq!(retry, 2 * 3600, "22:00 UTC to midnight");
    assert_eq!(
        refusal.header("x-ratelimit-remaining-tokens"),
        (budget - admitted * u).to_string()
    );
    // Bob is not limited by Alice's budget.
    assert_eq!(call(&app, BOB, CHAT, &[], &body).await.status, 200);

    // A second before midnight: still refused; at midnight, a new budget.
    advance(Duration::from_secs(2 * 3600 - 1)).await;
    let a = call(&app, ALICE, CHAT, &[], &body).await;
    assert_eq!(assert_budget_refusal(&a, "Daily", budget), 1);
    advance(Duration::from_secs(1)).await;
    for _ in 0..expected {
        assert_eq!(used(&call(&app, ALICE, CHAT, &[], &body).await), u);
    }
    assert_eq!(call(&app, ALICE, CHAT, &[], &body).await.status, 429);
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_what_keys_spent_under_their_new_budgets() {
    let m = mock().start().await.unwrap();
    let body = capped_chat(100, false);
    let est = estimate(CHAT, &body);
    let text = |budget: u64| budget_config(&m, &format!("tokens_per_day = {budget}"), "");
    let gateway = gateway_at(&text(est), utc(2026, 3, 10, 12));
    let app = gateway.router();
    assert_eq!(call(&app, ALICE, CHAT, &[], &body).await.status, 200);
    let a = call(&app, ALICE, CHAT, &[], &body).await;
    assert_eq!(a.status, 429, "{:?}", a.body);
    // The same configuration again (SIGHUP): still spent.
    let reload = |budget: u64| GatewayConfig::from_toml_with_env(&text(budget), |_| None).unwrap();
    gateway.reload(reload(est));
    let a = call(&app, ALICE, CHAT, &[], &body).await;
    assert_budget_refusal(&a, "Daily", est);
    // A larger budget takes effect at once.
    gateway.reload(reload(10 * est));
    let a = call(&app, ALICE, CHAT, &[], &body).await;
    assert_eq!(a.status, 200);
    assert!(used(&a) < est);
}

#[tokio::test(start_paused = true)]
async fn a_streamed_call_is_reconciled_when_its_stream_ends() {
    let m = mock().start().await.unwrap();
    let body = capped_native_stream(300);
    let est = estimate(NATIVE, &body);
    let sse = [("x-dashscope-sse", "enable")];
    let text = budget_config(&m, "", "");
    let probe = gateway_at(&text, utc(2026, 3, 10, 12)).router();
    let u = stream_used(&call(&probe, BOB, NATIVE, &sse, &body).await);
    assert!(u < est, "usage {u}, estimate {est}");

    // Room for one estimate plus one real usage: the second call fits only
    // if the first stream gave back what it did not use.
    let budget = est + u;
    let text = budget_config(&m, &format!("tokens_per_day = {budget}"), "");
    let app = gateway_at(&text, utc(2026, 3, 10, 12)).router();
    assert_eq!(
        stream_used(&call(&app, ALICE, NATIVE, &sse, &body).await),
        u
    );
    assert_eq!(
        stream_used(&call(&app, ALICE, NATIVE, &sse, &body).await),
        u
    );
    let a = call(&app, ALICE, NATIVE, &sse, &body).await;
    assert_native(&a, 429, "Throttling.AllocationQuota");
    assert!(
        a.json()["message"]
            .as_str()
            .unwrap()
            .starts_with("Daily token budget exhausted"),
        "{:?}",
        a.body
    );
    assert_eq!(a.header("retry-after"), (12 * 3600).to_string());
    assert_eq!(
        a.header("x-ratelimit-remaining-tokens"),
        (budget - 2 * u).to_string()
    );
}

#[tokio::test(start_paused = true)]
async fn a_month_budget_outlasts_midnight_and_resets_on_the_first() {
    let m = mock().start().await.unwrap();
    let body = capped_chat(100, false);
    let est = estimate(CHAT, &body);
    // 2026-01-30, 23:00 UTC; the day's budget is the month's: when both
    // are spent, the refusal names the month (the day's reset would not
    // help).
    let budget = 2 * est;
    let fields = format!("tokens_per_day = {budget}\ntokens_per_month = {budget}");
    let text = budget_config(&m, &fields, "");
    let app = gateway_at(&text, utc(2026, 1, 30, 23)).router();
    let mut admitted = 0;
    while call(&app, ALICE, CHAT, &[], &body).await.status == 200 {
        admitted += 1;
        assert!(admitted < 1_000);
    }
    assert!(admitted >= 2);
    let a = call(&app, ALICE, CHAT, &[], &body).await;
    let to_february = assert_budget_refusal(&a, "Monthly", budget);
    assert_eq!(to_february, DAY + 3600, "23:00 on the 30th to February 1st");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("on the 1st")
    );

    // Midnight: a new day, the same month: still refused.
    advance(Duration::from_secs(3600)).await;
    let a = call(&app, ALICE, CHAT, &[], &body).await;
    assert_eq!(assert_budget_refusal(&a, "Monthly", budget), DAY);
    // The 31st, 23:59:59: still January.
    advance(Duration::from_secs(DAY - 1)).await;
    assert_eq!(call(&app, ALICE, CHAT, &[], &body).await.status, 429);
    // February.
    advance(Duration::from_secs(1)).await;
    assert_eq!(call(&app, ALICE, CHAT, &[], &body).await.status, 200);
}

#[tokio::test(start_paused = true)]
async fn tokens_per_minute_per_key_admit_about_tpm_a_minute() {
    let m = mock().start().await.unwrap();
    let body = capped_chat(20, false);
    let est = estimate(CHAT, &body);
    let tpm = 300u64;
    assert!(est < tpm);
    let text = budget_config(&m, &format!("tpm = {tpm}"), "");
    let app = gateway_at(&text, utc(2026, 3, 10, 12)).router();
    // One call a second for five minutes, far more than 300 tokens a
    // minute: the bucket starts full (one minute's worth), then refills
    // at `tpm` a minute.
    let (mut tokens, mut refused) = (0, 0);
    let mut refusal = None;
    for _ in 0..300 {
        let a = call(&app, ALICE, CHAT, &[], &body).await;
        if a.status == 200 {
            tokens += used(&a);
            assert_eq!(a.header("x-ratelimit-limit-tokens"), tpm.to_string());
        } else {
            refused += 1;
            refusal = Some(a);
        }
        advance(Duration::from_secs(1)).await;
    }
    println!("tpm {tpm}: {tokens} tokens admitted in 5 minutes, {refused} calls refused");
    assert!(
        tokens >= 5 * tpm && tokens <= 6 * tpm + est,
        "{tokens} tokens in 5 minutes at {tpm} a minute"
    );
    let a = refusal.expect("some calls were refused");
    assert_compat(&a, 429, "insufficient_quota");
    assert!(
        a.json()["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Tokens per minute"),
        "{:?}",
        a.body
    );
    assert_eq!(a.header("x-ratelimit-limit-tokens"), tpm.to_string());
    assert!(a.header("retry-after").parse::<u64>().unwrap() >= 1);
    // The request bucket is still its own: Bob, without a TPM, is never
    // refused at one call a second.
    for _ in 0..10 {
        assert_eq!(call(&app, BOB, CHAT, &[], &body).await.status, 200);
    }
}

#[cfg(feature = "redis")]
mod shared {
    use axum::Router;
    use tower::ServiceExt;

    use super::*;
    use crate::redis_server::RedisServer;
    use tower_qwen::redis::Clock;

    /// Waits (in steps of paused time, bounded) until Redis holds `want`
    /// at `key`: the background reconciliation of the last answer.
    async fn until_counter(url: &str, key: &str, want: u64) {
        // A blocking connection: an async one would arm a connect timeout,
        // which paused time fires at once.
        let client = redis::Client::open(url).unwrap();
        let mut conn = client.get_connection().unwrap();
        let mut seen = None;
        for _ in 0..2_000 {
            seen = redis::cmd("GET")
                .arg(key)
                .query::<Option<u64>>(&mut conn)
                .unwrap();
            if seen == Some(want) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("{key} is {seen:?}, expected {want}");
    }

    /// The Redis backend on its own, behind the crate's `RateLimitLayer`: a
    /// reconciliation gives back what the call did not use, and never takes
    /// a counter Redis lost below 0. Real time, bounded.
    #[tokio::test]
    async fn a_redis_budget_reconciles_and_never_goes_below_zero() {
        use tower_qwen::rate_limit::Budget;
        use tower_qwen::rate_limit::{BudgetLimits, RateLimitLayer};
        use tower_qwen::redis::connect_lazy;

        let server = RedisServer::start();
        let conn = connect_lazy(&server.url(), None).unwrap();
        let budget = Budget::builder()
            .redis(conn)
            .prefix("t:")
            .clock(WallClock::starting_at(utc(2026, 3, 10, 12)))
            .build(BudgetLimits::per_day(
                std::num::NonZeroU64::new(1_000).unwrap(),
            ));
        let svc = tower::ServiceBuilder::new()
            .layer(RateLimitLayer::new(budget.clone()).reject())
            .service_fn(|_req: Request<Full<Bytes>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                    Bytes::from_static(
                        br#"{"usage":{"prompt_tokens":4,"completion_tokens":6,"total_tokens":10}}"#,
                    ),
                )))
            });
        let body = capped_chat(100, false);
        let est = estimate(CHAT, &body);
        let req = || {
            Request::post(CHAT)
                .body(Full::new(Bytes::from(body.clone())))
                .unwrap()
        };
        let counter = "t:*:day:2026-03-10";
        let mut sync = redis::Client::open(server.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let get = |sync: &mut redis::Connection| {
            redis::cmd("GET")
                .arg(counter)
                .query::<Option<i64>>(sync)
                .unwrap()
        };
        let bounded = Duration::from_secs(20);
        let res = tokio::time::timeout(bounded, svc.clone().oneshot(req()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(get(&mut sync), Some(est as i64), "the estimate is charged");
        res.into_body().collect().await.unwrap();
        tokio::time::timeout(bounded, budget.settle())
            .await
            .unwrap();
        assert_eq!(get(&mut sync), Some(10), "the difference is given back");

        // The counter is lost (evicted, flushed) while a call is running.
        let res = tokio::time::timeout(bounded, svc.oneshot(req()))
            .await
            .unwrap()
            .unwrap();
        redis::cmd("DEL")
            .arg(counter)
            .query::<i64>(&mut sync)
            .unwrap();
        res.into_body().collect().await.unwrap();
        tokio::time::timeout(bounded, budget.settle())
            .await
            .unwrap();
        assert_eq!(get(&mut sync), Some(0), "not below 0");
    }

    /// Redis unreachable, failing open: the budget is counted locally at
    /// 1/replicas. Real time (the Redis client fails in real time); every
    /// call is bounded.
    #[tokio::test]
    async fn with_redis_down_failing_open_a_budget_counts_locally_at_one_nth() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("redis://{}", closed.local_addr().unwrap());
        drop(closed);
        let m = mock().start().await.unwrap();
        let body = capped_chat(100, false);
        let est = estimate(CHAT, &body);
        let redis = format!(
            "[redis]\nurl = \"{url}\"\nfailure = \"fail-open\"\nreplicas = 2\ntimeout = \"2s\""
        );
        // Two estimates a day in all: one per replica while Redis is away.
        let text = budget_config(&m, &format!("tokens_per_day = {}", 2 * est), &redis);
        let app = gateway_at(&text, utc(2026, 3, 10, 12)).router();
        let bounded = |app: Router| {
            let body = body.clone();
            async move {
                tokio::time::timeout(Duration::from_secs(20), async move {
                    call(&app, ALICE, CHAT, &[], &body).await
                })
                .await
                .expect("answered without waiting for Redis")
            }
        };
        assert_eq!(bounded(app.clone()).await.status, 200);
        let a = bounded(app.clone()).await;
        assert_budget_refusal(&a, "Daily", est);
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_share_a_day_budget_and_a_restart_keeps_it() {
        let server = RedisServer::start();
        let t0 = Instant::now();
        let m = mock().start().await.unwrap();
        let body = capped_chat(200, false);
        let est = estimate(CHAT, &body);
        let probe = gateway_at(&budget_config(&m, "", ""), utc(2026, 3, 10, 22)).router();
        let u = used(&call(&probe, BOB, CHAT, &[], &body).await);
        assert!(u < est);

        // Room for three calls once each is reconciled.
        let budget = est + 2 * u;
        let redis = format!(
            "[redis]\nurl = \"{}\"\nkey_prefix = \"gw-budget:\"\ntimeout = \"off\"",
            server.url()
        );
        let text = budget_config(&m, &format!("tokens_per_day = {budget}"), &redis);
        let replica = || {
            let cfg = GatewayConfig::from_toml_with_env(&text, |_| None)
                .unwrap()
                .redis_clock(Clock::Local(t0))
                .wall_clock(WallClock::starting_at(utc(2026, 3, 10, 22)));
            Gateway::new(cfg).router()
        };
        let (a, b) = (replica(), replica());
        let counter = "gw-budget:budget:alice:day:2026-03-10";
        for (i, app) in [&a, &b, &a].into_iter().enumerate() {
            let i = i as u64;
            let answer = call(app, ALICE, CHAT, &[], &body).await;
            assert_eq!(used(&answer), u);
            // What every replica spent, as Redis counted it at admission.
            assert_eq!(
                answer.header("x-ratelimit-remaining-tokens"),
                (budget - i * u - est).to_string()
            );
            until_counter(&server.url(), counter, (i + 1) * u).await;
        }
        // The fourth call, on the other replica, finds the budget spent.
        let refused = call(&b, ALICE, CHAT, &[], &body).await;
        assert_eq!(assert_budget_refusal(&refused, "Daily", budget), 2 * 3600);
        assert_eq!(
            refused.header("x-ratelimit-remaining-tokens"),
            (budget - 3 * u).to_string()
        );

        // A new gateway (a restart) reads the spent budget from Redis.
        drop((a, b));
        let restarted = replica();
        let again = call(&restarted, ALICE, CHAT, &[], &body).await;
        assert_budget_refusal(&again, "Daily", budget);
        // Without Redis, a new gateway would start afresh.
        let alone = gateway_at(
            &budget_config(&m, &format!("tokens_per_day = {budget}"), ""),
            utc(2026, 3, 10, 22),
        )
        .router();
        assert_eq!(call(&alone, ALICE, CHAT, &[], &body).await.status, 200);
    }
}
