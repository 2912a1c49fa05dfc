//! Three gateway replicas in front of the mock, sharing one real
//! `redis-server` through `[redis]` (issue 13, "What it must show").
//!
//! The replicas are in-process routers, each with its own limiters and its
//! own Redis connection, as separate processes would have. The sharing test
//! runs in paused time: the replicas decide on the test's clock
//! ([`Clock::Local`]) and no timer is armed while Redis answers (Redis and
//! upstream timeouts off), so paused time cannot jump while a reply is on
//! its way. The outage test runs in real time (the Redis client reconnects
//! in real time) with quotas real time cannot refill during the test; it
//! asserts what the policy decided, never how long it took, and every call
//! is bounded.

use std::num::NonZeroU32;

use axum::Router;
use tower::ServiceExt;
use tower_qwen::mock::Quota;
use tower_qwen::redis::Clock;

use super::redis_server::RedisServer;
use super::*;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// One call through `app` with client key `key`: the status and the body.
async fn call(app: &Router, key: &str, model: &str) -> Answer {
    let req = Request::post(CHAT)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(axum::body::Body::from(chat(model, false)))
        .unwrap();
    let res = app.clone().oneshot(req).await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body,
    }
}

/// [`call`], failing the test instead of hanging (real-time tests only:
/// in paused time the bound would be a timer that could fire while Redis
/// answers).
async fn bounded_call(app: &Router, key: &str, model: &str) -> Answer {
    tokio::time::timeout(Duration::from_secs(20), call(app, key, model))
        .await
        .expect("every request is answered, none hangs")
}

/// Three replicas of the gateway for `text`, deciding on `clock`.
fn gateways(text: &str, clock: Clock) -> Vec<Gateway> {
    (0..3)
        .map(|_| {
            let cfg = GatewayConfig::from_toml_with_env(text, |_| None)
                .expect("valid config")
                .redis_clock(clock);
            Gateway::new(cfg)
        })
        .collect()
}

/// The routers of three replicas (see [`gateways`]).
fn replicas(text: &str, clock: Clock) -> Vec<Router> {
    gateways(text, clock).iter().map(Gateway::router).collect()
}

/// The sharing test's configuration: Alice's bucket is the default (50,
/// 30/s) and she calls `qwen-turbo` (no account quota); Bob's bucket is
/// wide open and he calls `qwen-plus`, which the account may call 120 times
/// a minute (2 a second), as the mock enforces.
fn sharing_config(mock: &MockHandle, redis: &str) -> String {
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
        [accounts.models.qwen-plus]
        rpm = 120
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        [[keys]]
        name = "bob"
        key = "{BOB}"
        capacity = 1000000
        refill_per_second = 1000000
        "#,
        base = mock.base_url(),
    )
}

/// What [`hammer`] saw.
struct Hammered {
    /// Answered 200.
    admitted: u32,
    /// The upstream's 429s, passed through.
    upstream_429: u32,
    /// From the first call to the last, in seconds.
    secs: f64,
}

/// Sends `key`'s calls for `model` through the three replicas in turn,
/// one round every 20 ms (150 calls a second) for `rounds` rounds. Every answer is a 200, the
/// gateway's own 429, or an upstream 429 passed through.
async fn hammer(apps: &[Router], key: &str, model: &str, rounds: u32) -> Hammered {
    let t0 = Instant::now();
    let (mut admitted, mut upstream_429) = (0, 0);
    for round in 0..rounds {
        if round > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for app in apps {
            let a = call(app, key, model).await;
            let gateway_made = a.status == 429
                && a.json()["request_id"]
                    .as_str()
                    .is_some_and(|id| id.starts_with("gw-"));
            match a.status.as_u16() {
                200 => admitted += 1,
                429 if !gateway_made => upstream_429 += 1,
                _ => assert_compat(&a, 429, "limit_requests"),
            }
        }
    }
    Hammered {
        admitted,
        upstream_429,
        secs: t0.elapsed().as_secs_f64(),
    }
}

#[tokio::test(start_paused = true)]
async fn three_replicas_share_one_client_bucket_and_one_account_quota() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let quota = Quota::per_minute(nz(120));
    let m = mock().quota("qwen-plus", quota).start().await.unwrap();
    let redis = format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"gw-share:\"\ntimeout = \"off\"\nreplicas = 3",
        server.url()
    );
    let shared = replicas(&sharing_config(&m, &redis), Clock::Local(t0));
    // The same three replicas without Redis: today's behaviour.
    let m_alone = mock().quota("qwen-plus", quota).start().await.unwrap();
    let alone = replicas(&sharing_config(&m_alone, ""), Clock::Local(t0));

    // One client key hammered through all three (150 calls a second for
    // 3 s): the bucket's 50 + 30/s in total, not three times that.
    let shared_key = hammer(&shared, ALICE, "qwen-turbo", 150).await;
    let alone_key = hammer(&alone, ALICE, "qwen-turbo", 150).await;
    let bound = 50.0 + 30.0 * shared_key.secs;
    println!(
        "one key through 3 replicas over {:.2} s (50 + 30/s = {bound:.1}): \
         shared {}, without Redis {}",
        shared_key.secs, shared_key.admitted, alone_key.admitted
    );
    assert!(
        (f64::from(shared_key.admitted) - bound).abs() <= 50.0,
        "{} admitted, {bound:.1} +- 50 expected",
        shared_key.admitted
    );
    assert!(f64::from(alone_key.admitted) > 2.5 * bound);
    assert_eq!(shared_key.upstream_429 + alone_key.upstream_429, 0);

    // One account's RPM (120, so 2 a second) held across the replicas
    // over 3 s: no upstream 429; without Redis each replica spends the
    // whole quota and the upstream refuses the excess.
    let before = m.stats().status(200);
    let shared_acct = hammer(&shared, BOB, "qwen-plus", 150).await;
    let alone_acct = hammer(&alone, BOB, "qwen-plus", 150).await;
    let (s, s_alone) = (m.stats(), m_alone.stats());
    println!(
        "one account (120 RPM) through 3 replicas over {:.2} s: shared {} sent, {} upstream 429s; \
         without Redis {} sent, {} upstream 429s",
        shared_acct.secs,
        shared_acct.admitted,
        s.status(429),
        alone_acct.admitted + alone_acct.upstream_429,
        s_alone.status(429)
    );
    assert_eq!(s.status(429), 0, "{s:?}");
    assert_eq!(shared_acct.upstream_429, 0);
    // 2 a second (the first at once), every one answered by the upstream.
    let expected = 1 + (2.0 * shared_acct.secs) as u32;
    assert_eq!(shared_acct.admitted, expected);
    assert_eq!(s.status(200) - before, u64::from(expected));
    assert!(alone_acct.upstream_429 > 0);
    assert_eq!(u64::from(alone_acct.upstream_429), s_alone.status(429));
}

/// The outage test's configuration: Alice's bucket holds 30 calls and
/// refills one per 1,000 s (nothing during the test), shared through Redis
/// with the `failure` policy.
fn outage_config(mock: &MockHandle, server: &RedisServer, failure: &str) -> String {
    format!(
        r#"
        [upstream]
        base_url = "{base}"
        admission_wait = "off"
        [redis]
        url = "{url}"
        key_prefix = "gw-outage-{failure}:"
        failure = "{failure}"
        replicas = 3
        timeout = "500ms"
        probe_every = "50ms"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        capacity = 30
        refill_per_second = 0.001
        "#,
        base = mock.base_url(),
        url = server.url(),
    )
}

/// `n` calls through the replicas in turn, each bounded; the statuses.
async fn round_robin(apps: &[Router], n: usize) -> Vec<u16> {
    let mut statuses = Vec::with_capacity(n);
    for i in 0..n {
        let a = bounded_call(&apps[i % apps.len()], ALICE, "qwen-plus").await;
        if a.status != 200 {
            assert_compat(&a, 429, "limit_requests");
        }
        statuses.push(a.status.as_u16());
    }
    statuses
}

fn ok(statuses: &[u16]) -> usize {
    statuses.iter().filter(|&&s| s == 200).count()
}

/// Probes Redis from every replica until all of them are back on it. The
/// server is up when this is called; a probe on a dead connection fails and
/// makes the client reconnect, the next one waits for that (bounded).
async fn until_back(gateways: &[Gateway]) {
    for _ in 0..50 {
        let mut all = true;
        for g in gateways {
            all &= tokio::time::timeout(Duration::from_secs(5), g.probe_redis())
                .await
                .unwrap_or(false);
        }
        if all {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the replicas did not get back to Redis");
}

#[tokio::test]
async fn redis_killed_mid_run_every_request_is_answered_by_the_policy_then_shared_again() {
    let mut server = RedisServer::start();
    let m = mock().start().await.unwrap();
    let open_gw = gateways(&outage_config(&m, &server, "fail-open"), Clock::Server);
    let closed_gw = gateways(&outage_config(&m, &server, "fail-closed"), Clock::Server);
    let open: Vec<Router> = open_gw.iter().map(Gateway::router).collect();
    let closed: Vec<Router> = closed_gw.iter().map(Gateway::router).collect();

    // Shared: 30 calls in all, whichever replica they come through.
    assert_eq!(ok(&round_robin(&open, 45).await), 30);
    for app in &closed {
        assert_eq!(bounded_call(app, ALICE, "qwen-plus").await.status, 200);
    }

    // Redis killed: every call is answered, by the policy.
    server.stop();
    // Fail-open: each replica decides alone at 1/3 of the bucket (10).
    let statuses = round_robin(&open, 45).await;
    assert_eq!(statuses.len(), 45);
    assert_eq!(ok(&statuses), 30, "{statuses:?}");
    for i in 0..3 {
        let mine: Vec<u16> = statuses.iter().skip(i).step_by(3).copied().collect();
        assert_eq!(ok(&mine), 10, "replica {i}: {mine:?}");
    }
    // Fail-closed: 503 in DashScope's shape with Retry-After, nothing sent.
    let sent = m.stats().requests;
    for app in closed.iter().cycle().take(6) {
        let a = bounded_call(app, ALICE, "qwen-plus").await;
        assert_compat(&a, 503, "service_unavailable");
        assert!(a.header("retry-after").parse::<u64>().unwrap() >= 1);
    }
    assert_eq!(m.stats().requests, sent);

    // Redis back (empty): the replicas share again. Replica 0 gets the
    // whole shared bucket (30; its local one had nothing left), and the
    // others nothing more.
    server.restart();
    until_back(&open_gw).await;
    until_back(&closed_gw).await;
    assert_eq!(ok(&round_robin(&open[..1], 40).await), 30);
    assert_eq!(ok(&round_robin(&open[1..], 10).await), 0);
    for app in &closed {
        assert_eq!(bounded_call(app, ALICE, "qwen-plus").await.status, 200);
    }
}

// ---------------------------------------------------------------------------
// Degrade state shared through Redis

/// The degrade tests' configuration: [`sharing_config`] (Bob's bucket is
/// wide open and he calls `qwen-turbo`, which has no account quota, so only
/// the degrade breaker refuses), no jitter; `redis` is a `[redis]` section
/// or nothing.
fn degrade_config(mock: &MockHandle, redis: &str) -> String {
    sharing_config(mock, &format!("[degrade]\njitter = 0\n{redis}"))
}

fn failing() -> FaultPlan {
    FaultPlan::new().with(Fault::Error(ApiError::service_unavailable()), 1.0)
}

/// Three calls from Bob through `app`, each failing upstream (503): the
/// degrade breaker's three consecutive failures.
async fn fail_three(app: &Router) {
    for _ in 0..3 {
        assert_eq!(call(app, BOB, "qwen-turbo").await.status, 503);
    }
}

/// Calls through `app` (upstream healthy) until Bob's key is degraded on
/// `gateway`, at most `max` calls, without moving the clock; how many calls
/// it took (`max` + 1 if it never was).
async fn calls_until_degraded(gateway: &Gateway, app: &Router, max: usize) -> usize {
    for n in 1..=max {
        let a = call(app, BOB, "qwen-turbo").await;
        assert!(a.status == 200 || a.status == 429, "{:?}", a.body);
        if gateway.is_degraded("bob") == Some(true) {
            return n;
        }
    }
    max + 1
}

/// Over one second (a call every 100 ms), how many of Bob's calls
/// through `app` pass; starts by letting one degraded slot (200 ms) go by.
async fn passed_in_a_second(app: &Router) -> usize {
    tokio::time::advance(Duration::from_millis(200)).await;
    let mut passed = 0;
    for _ in 0..10 {
        tokio::time::advance(Duration::from_millis(100)).await;
        let a = call(app, BOB, "qwen-turbo").await;
        if a.status == 429 {
            assert_compat(&a, 429, "limit_requests");
        } else {
            assert_eq!(a.status, 200, "{:?}", a.body);
            passed += 1;
        }
    }
    passed
}

#[tokio::test(start_paused = true)]
async fn a_key_degraded_on_one_replica_is_degraded_on_all_within_one_read() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let prefix = "gw-degrade:";
    let redis = format!(
        "[redis]\nurl = \"{}\"\nkey_prefix = \"{prefix}\"\ntimeout = \"off\"\nprobe_every = \"500ms\"",
        server.url()
    );
    let m = mock().faults(failing()).start().await.unwrap();
    let shared = gateways(&degrade_config(&m, &redis), Clock::Local(t0));
    let apps: Vec<Router> = shared.iter().map(Gateway::router).collect();
    let m_alone = mock().faults(failing()).start().await.unwrap();
    let alone = gateways(&degrade_config(&m_alone, ""), Clock::Local(t0));
    let alone_apps: Vec<Router> = alone.iter().map(Gateway::router).collect();

    // Replica A sees three upstream failures and degrades Bob's key; the
    // upstream heals at once, so replica B never sees a failure.
    fail_three(&apps[0]).await;
    fail_three(&alone_apps[0]).await;
    assert_eq!(shared[0].is_degraded("bob"), Some(true));
    assert_eq!(alone[0].is_degraded("bob"), Some(true));
    let tripped = Instant::now();
    m.set_faults(FaultPlan::new());
    m_alone.set_faults(FaultPlan::new());

    // A's deadline reaches Redis (a write of its own task, bounded here).
    let mut conn = tower_qwen::redis::connect_lazy(&server.url(), None).unwrap();
    let set = format!("{prefix}degraded");
    let mut score = None;
    for _ in 0..1000 {
        score = ::redis::cmd("ZSCORE")
            .arg(&set)
            .arg("bob")
            .query_async::<Option<f64>>(&mut conn)
            .await
            .unwrap();
        if score.is_some() {
            break;
        }
        tokio::task::yield_now().await;
    }
    let until_ms = (tripped - t0 + Duration::from_secs(5)).as_millis() as f64;
    assert_eq!(score, Some(until_ms), "A's deadline on the shared clock");

    // B's first call starts its read of the shared state (never waited
    // for): B is degraded within a few calls, no time having passed.
    let n = calls_until_degraded(&shared[1], &apps[1], 100).await;
    assert!(n <= 100, "B never followed A");
    assert_eq!(Instant::now(), tripped);
    // Without [redis], B knows nothing of A's state.
    assert_eq!(
        calls_until_degraded(&alone[1], &alone_apps[1], 20).await,
        21
    );

    // B serves Bob at the degraded rate (5 a second), though its
    // upstream calls all succeed; without Redis it serves them all.
    assert_eq!(passed_in_a_second(&apps[1]).await, 5);
    assert_eq!(passed_in_a_second(&alone_apps[1]).await, 10);
    // Replica C follows too (its first read).
    let n = calls_until_degraded(&shared[2], &apps[2], 100).await;
    assert!(n <= 100, "C never followed A");

    // Until A's deadline B is degraded (a call passes at the degraded
    // pace and changes nothing); from then on B probes on its own: the
    // upstream is healthy, the first probe succeeds and B recovers.
    let deadline = tripped + Duration::from_secs(5);
    tokio::time::advance(deadline - Duration::from_millis(10) - Instant::now()).await;
    assert_eq!(call(&apps[1], BOB, "qwen-turbo").await.status, 200);
    assert_eq!(call(&apps[1], BOB, "qwen-turbo").await.status, 429);
    assert_eq!(shared[1].is_degraded("bob"), Some(true));
    tokio::time::advance(Duration::from_millis(200)).await;
    assert_eq!(call(&apps[1], BOB, "qwen-turbo").await.status, 200);
    assert_eq!(shared[1].is_degraded("bob"), Some(false));
    // A past deadline in Redis degrades nobody again.
    assert_eq!(call(&apps[1], BOB, "qwen-turbo").await.status, 200);
    tokio::time::advance(Duration::from_millis(600)).await;
    for _ in 0..20 {
        assert_eq!(call(&apps[1], BOB, "qwen-turbo").await.status, 200);
    }
    assert_eq!(shared[1].is_degraded("bob"), Some(false));
}

/// The value of the counter `name` in `gateway`'s metrics.
fn counter(gateway: &Gateway, name: &str) -> f64 {
    gateway
        .render_metrics()
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn with_redis_down_each_replica_degrades_on_its_own_then_sharing_resumes() {
    let mut server = RedisServer::start();
    let m = mock().faults(failing()).start().await.unwrap();
    // Real time: degraded for a minute, longer than the test.
    let redis = format!(
        "probe_after = \"60s\"\n[redis]\nurl = \"{}\"\nkey_prefix = \"gw-degrade-outage:\"\nreplicas = 3\ntimeout = \"500ms\"\nprobe_every = \"50ms\"",
        server.url()
    );
    let gws = gateways(&degrade_config(&m, &redis), Clock::Server);
    let apps: Vec<Router> = gws.iter().map(Gateway::router).collect();
    // Reads start and the replicas connect while Redis is up.
    for app in &apps {
        assert_eq!(bounded_call(app, BOB, "qwen-turbo").await.status, 503);
    }

    // Redis killed: A degrades on its own failures, every call answered.
    server.stop();
    for _ in 0..2 {
        assert_eq!(bounded_call(&apps[0], BOB, "qwen-turbo").await.status, 503);
    }
    assert_eq!(gws[0].is_degraded("bob"), Some(true));
    // Its write failed: counted (and logged once), nothing waits for it.
    tokio::time::timeout(Duration::from_secs(20), async {
        while counter(&gws[0], "gateway_degrade_sync_errors_total") < 1.0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the failed write is counted");
    // A's local degradation still holds: of 20 calls at once, one passes
    // (5 a second), the rest are refused.
    let answers = join_all((0..20).map(|_| bounded_call(&apps[0], BOB, "qwen-turbo"))).await;
    let refused = answers.iter().filter(|a| a.status == 429).count();
    assert!(refused >= 15, "{refused} of 20 refused");

    // The others keep their own state: healthy upstream, B serves all.
    m.set_faults(FaultPlan::new());
    for _ in 0..20 {
        assert_eq!(bounded_call(&apps[1], BOB, "qwen-turbo").await.status, 200);
    }
    assert_eq!(gws[1].is_degraded("bob"), Some(false));

    // Redis back: C degrades, B follows within a read.
    server.restart();
    until_back(&gws).await;
    m.set_faults(failing());
    tokio::time::timeout(Duration::from_secs(20), async {
        while gws[2].is_degraded("bob") != Some(true) {
            let a = bounded_call(&apps[2], BOB, "qwen-turbo").await;
            assert!(a.status == 503 || a.status == 429, "{:?}", a.body);
        }
    })
    .await
    .expect("C degrades");
    m.set_faults(FaultPlan::new());
    tokio::time::timeout(Duration::from_secs(20), async {
        while gws[1].is_degraded("bob") != Some(true) {
            let a = bounded_call(&apps[1], BOB, "qwen-turbo").await;
            assert!(a.status == 200 || a.status == 429, "{:?}", a.body);
        }
    })
    .await
    .expect("B follows C once Redis is back");
}
