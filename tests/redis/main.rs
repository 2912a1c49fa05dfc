#![cfg(feature = "redis")]
//! Tests for the distributed limiter (issue 8), each against its own
//! `redis-server` on a free loopback port (see `server.rs`), killed at the
//! end.
//!
//! Determinism: Redis's clock cannot be paused, so the tests use
//! [`Clock::Local`] (the script takes `now` from the caller) and pass
//! explicit instants, or run under paused tokio time with no Redis timeout
//! (no timer races the I/O), or use quotas (per hour / per day) that real
//! time cannot refill during a test. Outage tests run in real time because
//! the connection manager reconnects in real time; they assert what the
//! policy decided, never how long it took.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tower::{BoxError, Layer, Service, ServiceExt, service_fn};
use tower_qwen::classify::{Classifier, ThrottleCause};
use tower_qwen::key::StoreKey;
use tower_qwen::rate_limit::error::RateLimited;
use tower_qwen::rate_limit::{
    Admission, Cost, Feedback, Limits, Quota, RateLimitLayer, RateLimiter, RateLimiterBuilder,
};
use tower_qwen::redis::error::StoreUnavailable;
use tower_qwen::redis::{
    Clock, FailurePolicy, Lease, RedisLimiter, RedisPermit, RedisStore, connect_lazy,
};

mod builder;
mod script;
mod server;

use server::RedisServer;

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// A limiter builder on a fresh key prefix, deciding on the local clock
/// from `origin`, with no Redis timeout (paused-time tests) and keys kept
/// for an hour after they are full (Redis expires on its own clock).
fn local(
    limits: Limits,
    prefix: &str,
    origin: Instant,
    conn: redis::aio::ConnectionManager,
) -> RateLimiterBuilder<RedisStore> {
    RateLimiter::builder(limits)
        .redis(conn)
        .prefix(format!("test:{prefix}:"))
        .clock(Clock::Local(origin))
        .timeout(None)
        .expiry_slack(HOUR)
}

fn conn(server: &RedisServer) -> redis::aio::ConnectionManager {
    connect_lazy(&server.url(), None).unwrap()
}

fn limited(err: &BoxError) -> RateLimited {
    *err.downcast_ref::<RateLimited>()
        .unwrap_or_else(|| panic!("a rate limit error, got {err}"))
}

// ---------------------------------------------------------------------------
// Sharing: 3 replicas admit what one limiter admits; 3 in-memory limiters 3x.

#[tokio::test(start_paused = true)]
async fn three_replicas_share_one_budget_and_in_memory_would_admit_three_times() {
    let server = RedisServer::start();
    let t0 = tokio::time::Instant::now();
    // 10 per second, burst 5; arrivals every 10 ms at each of 3 replicas
    // over a 10 s window.
    let limits = Limits::requests(Quota::per_second(nz(10)).allow_burst(nz(5)));
    let replicas: Vec<_> = (0..3)
        .map(|_| local(limits, "share", t0, conn(&server)).build())
        .collect();
    let memory: Vec<_> = (0..3).map(|_| RateLimiter::new(limits)).collect();
    let (mut in_redis, mut in_memory) = (0u32, 0u32);
    let steps = 1000u32;
    for step in 0..steps {
        let now = t0 + 10 * MS * step;
        for r in &replicas {
            match r.check_at(&(), Cost::ONE, now).await {
                Ok(a) => {
                    assert!(a.get_ref().is_from_redis());
                    in_redis += 1;
                }
                Err(e) => {
                    limited(&e);
                }
            }
        }
        for m in &memory {
            in_memory += u32::from(m.check_at(&(), Cost::ONE, now).is_ok());
        }
    }
    let window = (10 * MS * (steps - 1)).as_secs_f64();
    let bound = 5.0 + 10.0 * window;
    println!(
        "3 replicas over {window:.2} s (bound burst + rate*T = {bound:.1}): redis {in_redis}, in-memory {in_memory}"
    );
    assert!(f64::from(in_redis) <= bound, "{in_redis} > {bound}");
    // Exactly what one limiter admits (the same GCRA), so the bound is met
    // with full goodput ...
    assert_eq!(in_redis, 104);
    // ... while three separate in-memory limiters admit three times that.
    assert_eq!(in_memory, 3 * in_redis);
    for r in &replicas {
        let s = r.stats();
        assert_eq!((s.fallback, s.errors, s.outages), (0, 0, 0), "{s:?}");
    }
}

#[tokio::test]
async fn replicas_on_the_server_clock_share_a_daily_budget() {
    let server = RedisServer::start();
    // 20 a day: real time cannot refill a unit during the test.
    let limits = Limits::requests(Quota::new(nz(20), Duration::from_secs(86_400)).unwrap());
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            RateLimiter::builder(limits)
                .redis(conn(&server))
                .prefix("test:server-clock:")
                .timeout(Duration::from_secs(5))
                .build()
        })
        .collect();
    let mut admitted = 0;
    for i in 0..60 {
        match replicas[i % 3].check(&(), Cost::ONE).await {
            Ok(_) => admitted += 1,
            Err(e) => {
                let r = limited(&e);
                assert!(r.is_requests());
                assert!(r.retry_after().unwrap() > Duration::from_secs(3600));
            }
        }
    }
    assert_eq!(admitted, 20);
}

#[tokio::test(start_paused = true)]
async fn keys_are_separate_and_expire_when_full() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_second(nz(1)).allow_burst(nz(1)));
    let lim = RateLimiter::builder(limits)
        .redis(conn(&server))
        .prefix("test:expiry:")
        .clock(Clock::Local(t0))
        .timeout(None)
        .expiry_slack(Duration::ZERO)
        .build_keyed::<String>();
    lim.check_at(&"a".to_owned(), Cost::ONE, t0).await.unwrap();
    lim.check_at(&"b".to_owned(), Cost::ONE, t0).await.unwrap();
    let e = lim
        .check_at(&"a".to_owned(), Cost::ONE, t0)
        .await
        .unwrap_err();
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(1)));
    // Each key carries a TTL of "until full again" (1 s here, no slack).
    let mut c = conn(&server);
    let ttl: i64 = redis::cmd("PTTL")
        .arg("test:expiry:a")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!((1..=1000).contains(&ttl), "{ttl}");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("test:expiry:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2);
}

// ---------------------------------------------------------------------------
// Batches: concurrent decisions share round trips and stay exact (issue 13).

#[tokio::test(start_paused = true)]
async fn concurrent_decisions_share_round_trips_and_decide_like_memory() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    // 10 an hour per key (burst 10); 40 concurrent calls on each of 2 keys,
    // all at t0, some with a token cost too.
    let limits = Limits::requests(Quota::per_hour(nz(10)))
        .and_tokens(Quota::per_hour(nz(1_000)).allow_burst(nz(1_000)));
    let lim: RedisLimiter<u32> = local(limits, "batch", t0, conn(&server)).build_keyed();
    let memory: RateLimiter<u32> = RateLimiter::builder(limits).build_keyed();
    let cost = |i: u32| Cost::call(if i.is_multiple_of(3) { 150 } else { 0 });
    let mut set = tokio::task::JoinSet::new();
    for i in 0..80u32 {
        let l = lim.clone();
        set.spawn(async move { (i, l.check_at(&(i % 2), cost(i), t0).await.is_ok()) });
    }
    let mut got = Vec::new();
    while let Some(r) = set.join_next().await {
        got.push(r.unwrap());
    }
    // Exact decisions: as many admitted per key as one in-memory limiter
    // admits for the same calls.
    let s = lim.stats();
    assert_eq!((s.redis, s.errors, s.fallback), (80, 0, 0));
    let admitted = |key: u32| got.iter().filter(|(i, ok)| i % 2 == key && *ok).count();
    let in_memory = |key: u32| {
        (0..80u32)
            .filter(|i| i % 2 == key)
            .filter(|&i| memory.check_at(&key, cost(i), t0).is_ok())
            .count()
    };
    assert_eq!((admitted(0), admitted(1)), (in_memory(0), in_memory(1)));
    assert!(admitted(0) >= 6 && admitted(0) <= 10, "{}", admitted(0));
    println!("80 concurrent decisions in {} round trips", s.round_trips);
    assert!(s.round_trips <= 10, "{} round trips", s.round_trips);
}

// ---------------------------------------------------------------------------
// Failure policy: Redis killed or frozen mid-run.

/// Calls `check` with a guard against hanging (the test fails, instead of
/// hanging, if a call never returns).
async fn guarded<K>(lim: &RedisLimiter<K>, key: &K) -> Result<Admission<RedisPermit<K>>, BoxError>
where
    K: StoreKey + std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    tokio::time::timeout(Duration::from_secs(30), lim.check(key, Cost::ONE))
        .await
        .expect("a decision never hangs")
}

/// Probes until Redis answers again. The server is up when this is called;
/// the first probe on the dead connection fails and makes the connection
/// manager reconnect, and the next probe waits for that reconnection (no
/// sleeping here).
async fn until_back<K>(lim: &RedisLimiter<K>)
where
    K: StoreKey + std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    for _ in 0..50 {
        if lim.probe().await {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("redis did not come back");
}

#[tokio::test]
async fn fail_open_at_one_nth_when_redis_dies_and_resume_when_it_returns() {
    let mut server = RedisServer::start();
    // 30 an hour shared by 3 replicas: each falls back to 10 an hour.
    let limits = Limits::requests(Quota::per_hour(nz(30)));
    let lim = RateLimiter::builder(limits)
        .redis(conn(&server))
        .prefix("test:fail-open:")
        .timeout(Duration::from_secs(2))
        .probe_every(Duration::from_millis(50))
        .on_failure(FailurePolicy::fail_open(nz(3)))
        .build();
    for _ in 0..5 {
        assert!(guarded(&lim, &()).await.unwrap().get_ref().is_from_redis());
    }
    server.stop();
    let mut admitted = 0;
    for _ in 0..20 {
        match guarded(&lim, &()).await {
            Ok(a) => {
                assert!(a.get_ref().is_fallback());
                admitted += 1;
            }
            Err(e) => {
                limited(&e);
            }
        }
    }
    // The local limiter at 1/3 of the quota: a burst of 10, then nothing.
    assert_eq!(admitted, 10);
    let s = lim.stats();
    assert!(!s.available);
    assert_eq!(s.outages, 1);
    assert_eq!(s.fallback, 20);

    server.restart();
    until_back(&lim).await;
    // Redis restarted empty: the full shared quota (30), not the local 10.
    let mut admitted = 0;
    for _ in 0..40 {
        match guarded(&lim, &()).await {
            Ok(a) => {
                assert!(a.get_ref().is_from_redis());
                admitted += 1;
            }
            Err(e) => {
                limited(&e);
            }
        }
    }
    assert_eq!(admitted, 30);
    let s = lim.stats();
    assert!(s.available);
    assert_eq!(s.outages, 1);
}

#[tokio::test]
async fn fail_closed_on_a_frozen_redis_times_out_then_refuses_fast_then_recovers() {
    let server = RedisServer::start();
    let limits = Limits::requests(Quota::per_hour(nz(100)));
    let lim = RateLimiter::builder(limits)
        .redis(conn(&server))
        .prefix("test:fail-closed:")
        .timeout(Duration::from_secs(1))
        .probe_every(Duration::from_secs(3600))
        .on_failure(FailurePolicy::fail_closed())
        .build();
    guarded(&lim, &()).await.unwrap();
    server.freeze();
    // The first call waits for its own timeout, then fails closed.
    let e = guarded(&lim, &()).await.unwrap_err();
    let u = e.downcast_ref::<StoreUnavailable>().expect("fails closed");
    assert!(u.is_timeout());
    assert!(Classifier::new().classify_error(&e).is_transient());
    // Redis is now known to be down: no request, no wait, until a probe is
    // due.
    let e = guarded(&lim, &()).await.unwrap_err();
    let u = e.downcast_ref::<StoreUnavailable>().unwrap();
    assert!(u.is_down());
    assert!(u.retry_after().unwrap() > Duration::from_secs(3000));
    assert_eq!(lim.stats().failed_closed, 2);
    server.thaw();
    until_back(&lim).await;
    assert!(guarded(&lim, &()).await.unwrap().get_ref().is_from_redis());
}

// ---------------------------------------------------------------------------
// Leases: most calls decided locally, overshoot within the documented bound.

#[tokio::test(start_paused = true)]
async fn leases_save_round_trips_under_the_quota_and_stay_within_the_bound_over_it() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let (rate, burst, slice, ttl) = (10u32, 10u32, 5u32, Duration::from_secs(3));
    let limits = Limits::requests(Quota::per_second(nz(rate)).allow_burst(nz(burst)));
    let replicas: Vec<_> = (0..3)
        .map(|_| {
            local(limits, "lease", t0, conn(&server))
                .lease(Lease::new(Cost::new(slice, 0), ttl))
                .build()
        })
        .collect();
    // Under the quota: each replica calls every 500 ms (6/s in all, the
    // quota is 10/s). Every call is admitted, most without a round trip.
    let mut now = t0;
    let calls = 3 * 40;
    for _ in 0..40 {
        for r in &replicas {
            r.check_at(&(), Cost::ONE, now).await.unwrap();
        }
        now += 500 * MS;
    }
    let (leased, trips) = replicas.iter().fold((0, 0), |(l, t), r| {
        let s = r.stats();
        (l + s.leased, t + s.redis)
    });
    println!("under the quota: {calls} calls, {leased} from leases, {trips} round trips");
    assert_eq!(leased + trips, calls);
    assert!(trips * 4 <= calls, "{trips} round trips for {calls} calls");

    // Over the quota: every 10 ms at each replica for 10 s. Slices can only
    // be booked when the bucket has room for them, and the total stays
    // within max(b, c + L) + r·(T + ttl).
    let start = now + Duration::from_secs(10);
    let steps = 1000u32;
    let mut admitted = 0u32;
    for step in 0..steps {
        let now = start + 10 * MS * step;
        for r in &replicas {
            admitted += u32::from(r.check_at(&(), Cost::ONE, now).await.is_ok());
        }
    }
    let window = (10 * MS * (steps - 1)).as_secs_f64();
    let bound = f64::from(burst.max(1 + slice)) + f64::from(rate) * (window + ttl.as_secs_f64());
    println!(
        "over the quota: admitted {admitted} (bound with leases {bound:.1}; {:.1} without)",
        f64::from(burst) + f64::from(rate) * window,
    );
    assert!(f64::from(admitted) <= bound, "{admitted} > {bound}");
    assert!(admitted >= 100, "leases must not starve: {admitted}");
}

// ---------------------------------------------------------------------------
// The layer: same modes, keys and reconciliation as the in-memory one.

const CHAT: &str = "/compatible-mode/v1/chat/completions";

/// A compatible chat request; its estimate is 5 input tokens + `max`.
fn chat(max: u32, id: usize) -> Request<Full<Bytes>> {
    Request::post(CHAT)
        .header("authorization", "Bearer sk-test")
        .header("x-id", id.to_string())
        .body(Full::new(Bytes::from(format!(
            r#"{{"model":"qwen-plus","max_tokens":{max},"messages":[{{"role":"user","content":"hi"}}]}}"#
        ))))
        .unwrap()
}

fn json(status: u16, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

fn usage(total: u32) -> Response<Full<Bytes>> {
    json(
        200,
        format!(
            r#"{{"choices":[],"usage":{{"prompt_tokens":5,"completion_tokens":{},"total_tokens":{total}}}}}"#,
            total.saturating_sub(5)
        ),
    )
}

fn rate_quota_429() -> Response<Full<Bytes>> {
    json(
        429,
        r#"{"request_id":"1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#.into(),
    )
}

type Log = Arc<Mutex<Vec<(String, Instant)>>>;

/// An upstream that logs each call and answers with `answer`.
fn upstream<F>(
    log: Log,
    answer: F,
) -> impl Service<Request<Full<Bytes>>, Response = Response<Full<Bytes>>, Error = BoxError, Future: Send>
+ Clone
+ Send
+ 'static
where
    F: Fn() -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    service_fn(move |req: Request<Full<Bytes>>| {
        let id = req.headers()["x-id"].to_str().unwrap().to_owned();
        log.lock().unwrap().push((id, Instant::now()));
        let res = answer();
        async move { Ok::<_, BoxError>(res) }
    })
}

async fn drain<B: http_body::Body>(res: Response<B>)
where
    B::Error: std::fmt::Debug,
{
    res.into_body().collect().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn layer_replicas_wait_for_the_shared_slot_and_reject_with_the_exact_wait() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_second(nz(1)).allow_burst(nz(1)));
    let log = Log::default();
    // Two replicas (two limiters, two connections), same key.
    let a = RateLimitLayer::new(local(limits, "layer-wait", t0, conn(&server)).build())
        .layer(upstream(log.clone(), || usage(10)));
    let b = RateLimitLayer::new(local(limits, "layer-wait", t0, conn(&server)).build())
        .wait(Duration::from_secs(5))
        .layer(upstream(log.clone(), || usage(10)));
    drain(a.clone().oneshot(chat(10, 0)).await.unwrap()).await;
    // b waits for the slot a left: exactly 1 s later (the sleep is the only
    // timer, so paused time jumps straight to it).
    drain(b.clone().oneshot(chat(10, 1)).await.unwrap()).await;
    let calls = log.lock().unwrap().clone();
    assert_eq!(calls[0], ("0".to_owned(), t0));
    assert_eq!(calls[1], ("1".to_owned(), t0 + Duration::from_secs(1)));
    // Reject mode on a clone of a third replica: the exact wait.
    let c = RateLimitLayer::new(local(limits, "layer-wait", t0, conn(&server)).build())
        .reject()
        .layer(upstream(log.clone(), || usage(10)));
    let e = c.clone().oneshot(chat(10, 2)).await.unwrap_err();
    let now = Instant::now();
    assert_eq!(now, t0 + Duration::from_secs(1));
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(1)));
    assert!(matches!(
        Classifier::new().classify_error(&e),
        tower_qwen::classify::Outcome::Throttled {
            cause: ThrottleCause::Local,
            ..
        }
    ));
    // A wait beyond max_wait fails at once and reserves nothing.
    let short = RateLimitLayer::new(local(limits, "layer-wait", t0, conn(&server)).build())
        .wait(Duration::from_millis(500))
        .layer(upstream(log.clone(), || usage(10)));
    let e = short.oneshot(chat(10, 3)).await.unwrap_err();
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(Instant::now(), now);
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn layer_dropped_waiter_gives_its_slot_back() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_second(nz(1)).allow_burst(nz(1)));
    let limiter = local(limits, "layer-drop", t0, conn(&server)).build();
    let layer = RateLimitLayer::new(limiter.clone());
    let log = Log::default();
    let svc = layer.layer(upstream(log.clone(), || usage(10)));
    drain(svc.clone().oneshot(chat(10, 0)).await.unwrap()).await;
    let waiter = tokio::spawn(svc.clone().oneshot(chat(10, 1)));
    // Until the waiter has booked its slot in Redis (1 s away); bounded, so
    // a broken count fails here instead of spinning.
    for _ in 0..100_000 {
        if limiter.stats().redis >= 2 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(limiter.stats().redis >= 2, "the waiter never booked");
    waiter.abort();
    assert!(waiter.await.unwrap_err().is_cancelled());
    limiter.settle().await;
    // Its slot came back: the next call's slot is 1 s away, not 2 s.
    let reject = RateLimitLayer::new(limiter.clone())
        .reject()
        .layer(upstream(log.clone(), || usage(10)));
    let e = reject.oneshot(chat(10, 2)).await.unwrap_err();
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(log.lock().unwrap().len(), 1);
}

/// A token quota of 100 tokens a second, burst 1: a call of 100 tokens
/// (5 in + 95 max) leaves 1 s of debt.
fn tokens_only() -> Limits {
    Limits::tokens(Quota::per_second(nz(100)).allow_burst(nz(1)))
}

async fn next_wait<S>(svc: S) -> Duration
where
    S: Service<Request<Full<Bytes>>, Error = BoxError>,
{
    let e = svc.oneshot(chat(95, 9)).await.err().expect("refused");
    limited(&e).retry_after().unwrap()
}

#[tokio::test(start_paused = true)]
async fn layer_reconciles_tokens_with_the_real_usage() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limiter = local(tokens_only(), "layer-usage", t0, conn(&server)).build();
    let layer = RateLimitLayer::new(limiter.clone()).reject();
    let svc = layer.layer(upstream(Log::default(), || usage(10)));
    drain(svc.clone().oneshot(chat(95, 0)).await.unwrap()).await;
    limiter.settle().await;
    // 100 reserved, 10 used: 90 tokens (900 ms) refunded.
    assert_eq!(next_wait(svc).await, Duration::from_millis(100));
}

#[tokio::test(start_paused = true)]
async fn layer_keeps_the_estimate_of_a_dropped_stream() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limiter = local(tokens_only(), "layer-stream", t0, conn(&server)).build();
    let layer = RateLimitLayer::new(limiter.clone()).reject();
    let sse = || {
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(Full::new(Bytes::from_static(b"data: {\"choices\":[]}\n\n")))
            .unwrap()
    };
    let svc = layer.layer(upstream(Log::default(), sse));
    let res = svc.clone().oneshot(chat(95, 0)).await.unwrap();
    drop(res);
    limiter.settle().await;
    assert_eq!(next_wait(svc).await, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn layer_pauses_the_key_for_every_replica_on_an_upstream_429() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_second(nz(1)).allow_burst(nz(1)));
    // Every throttle pauses (no lone ones): see the next test for those.
    let a_lim = local(limits, "layer-429", t0, conn(&server))
        .feedback(Feedback::new().repeat_within(Duration::ZERO))
        .build();
    let a = RateLimitLayer::new(a_lim.clone()).layer(upstream(Log::default(), rate_quota_429));
    let res = a.oneshot(chat(10, 0)).await.unwrap();
    assert_eq!(res.status(), 429);
    drain(res).await;
    a_lim.settle().await;
    // Another replica sees the pause: 1 s of debt + 1 s of pause.
    let b = RateLimitLayer::new(local(limits, "layer-429", t0, conn(&server)).build())
        .reject()
        .layer(upstream(Log::default(), || usage(10)));
    let e = b.oneshot(chat(10, 1)).await.unwrap_err();
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(2)));
}

/// A lone quota throttle (none other acted on within `repeat_within`) is
/// timing jitter at the upstream's window edge: no replica is paused. A
/// second one within the window, or a burst throttle, pauses the key for
/// every replica.
#[tokio::test(start_paused = true)]
async fn a_lone_quota_throttle_pauses_no_replica_a_repeated_or_burst_one_does() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    // 10 per second, burst 1: one call every 100 ms.
    let limits = Limits::requests(Quota::per_second(nz(10)).allow_burst(nz(1)));
    let step = 100 * MS;
    let a = local(limits, "lone-429", t0, conn(&server)).build();
    let b = local(limits, "lone-429", t0, conn(&server)).build();
    // A lone Requests throttle: the other replica's next call goes at its
    // slot, as if nothing happened.
    a.check(&(), Cost::ONE)
        .await
        .unwrap()
        .throttled(ThrottleCause::Requests);
    a.settle().await;
    tokio::time::advance(step).await;
    let e = b.check(&(), Cost::ONE).await.err();
    assert!(e.is_none(), "a lone throttle paused the key: {e:?}");
    // A second one within `repeat_within` (2 s) pauses the key for 1 s,
    // for every replica.
    tokio::time::advance(step).await;
    a.check(&(), Cost::ONE)
        .await
        .unwrap()
        .throttled(ThrottleCause::Requests);
    a.settle().await;
    tokio::time::advance(step).await;
    // The throttled call's 100 ms of debt, moved 1 s later, is all ahead.
    let e = b.check(&(), Cost::ONE).await.expect_err("paused");
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(1)));
    // Long after (a Requests throttle would be lone again): a Burst
    // throttle pauses at once.
    tokio::time::advance(Duration::from_secs(10)).await;
    b.check(&(), Cost::ONE)
        .await
        .unwrap()
        .throttled(ThrottleCause::Burst);
    b.settle().await;
    tokio::time::advance(step).await;
    let e = a.check(&(), Cost::ONE).await.expect_err("paused");
    assert_eq!(limited(&e).retry_after(), Some(Duration::from_secs(1)));
}

/// As in memory, a throttle of a call admitted before the last throttle
/// acted on is covered by that one: two calls landing in one upstream
/// window are one lone throttle, not a repeat.
#[tokio::test(start_paused = true)]
async fn a_throttle_of_a_call_admitted_before_a_lone_one_pauses_nothing() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_second(nz(10)).allow_burst(nz(1)));
    let step = 100 * MS;
    let a = local(limits, "lone-older", t0, conn(&server)).build();
    let b = local(limits, "lone-older", t0, conn(&server)).build();
    let older = a.check(&(), Cost::ONE).await.unwrap();
    tokio::time::advance(step).await;
    let newer = a.check(&(), Cost::ONE).await.unwrap();
    newer.throttled(ThrottleCause::Requests);
    older.throttled(ThrottleCause::Requests);
    a.settle().await;
    tokio::time::advance(step).await;
    let e = b.check(&(), Cost::ONE).await.err();
    assert!(
        e.is_none(),
        "the older call's throttle paused the key: {e:?}"
    );
}

#[tokio::test]
async fn layer_fails_closed_with_a_typed_transient_error_when_redis_is_gone() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let limiter = RateLimiter::builder(Limits::requests(Quota::per_hour(nz(10))))
        .redis(connect_lazy(&url, None).unwrap())
        .prefix("test:layer-closed:")
        .timeout(Duration::from_millis(200))
        .on_failure(FailurePolicy::fail_closed())
        .build();
    let log = Log::default();
    let svc = RateLimitLayer::new(limiter).layer(upstream(log.clone(), || usage(10)));
    let e = tokio::time::timeout(Duration::from_secs(30), svc.oneshot(chat(10, 0)))
        .await
        .expect("never hangs")
        .unwrap_err();
    assert!(e.is::<StoreUnavailable>(), "{e}");
    assert!(Classifier::new().classify_error(&e).is_transient());
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn layer_holds_no_inner_capacity_while_deciding_or_waiting() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_second(nz(1)).allow_burst(nz(1)));
    let limiter = local(limits, "layer-permit", t0, conn(&server)).build();
    let inner = tower::limit::ConcurrencyLimit::new(upstream(Log::default(), || usage(10)), 1);
    let mut svc = RateLimitLayer::new(limiter).layer(inner);
    // poll_ready takes the only permit ...
    svc.ready().await.unwrap();
    let call = svc.call(chat(10, 0));
    // ... and the call, which must ask Redis first, gave it up: another
    // user of the inner service gets it while this call is decided (a
    // caller that keeps `svc`, like a retry future, cannot starve it).
    let mut probe = svc.get_ref().clone();
    let mut ready = tokio_test::task::spawn(probe.ready());
    tokio_test::assert_ready_ok!(ready.poll());
    drop(ready);
    drop(probe);
    drain(call.await.unwrap()).await;
}
