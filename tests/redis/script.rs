//! The Redis script decides exactly like the in-memory GCRA for the same
//! arrival sequence: reservations with and without waits (slots and
//! refusals to the nanosecond, and which quota refused), give-backs of
//! cancelled reservations, refunds and overruns from reconciliation, in
//! one or two dimensions.
//!
//! Both sides run on one paused tokio clock: the in-memory limiter reads it,
//! the script is handed the same instants ([`Clock::Local`]). There is no
//! Redis timeout, so no timer races the I/O and paused time only moves when
//! the test advances it.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestRunner};
use tower_qwen::rate_limit;

use super::*;

#[derive(Clone, Debug)]
enum Op {
    Reserve {
        dt_ms: u64,
        requests: u32,
        tokens: u32,
        max_wait_ms: u64,
    },
    Cancel(usize),
    Reconcile(usize, u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..400, 0u32..3, 0u32..3_000, prop_oneof![Just(0u64), 0u64..3_000]).prop_map(
            |(dt_ms, requests, tokens, max_wait_ms)| Op::Reserve {
                dt_ms,
                requests,
                tokens,
                max_wait_ms,
            }
        ),
        1 => any::<usize>().prop_map(Op::Cancel),
        2 => (any::<usize>(), 0u32..5_000).prop_map(|(i, t)| Op::Reconcile(i, t)),
    ]
}

fn limits() -> impl Strategy<Value = Limits> {
    (
        prop::option::of((1u32..20, 1u32..5)),
        prop::option::of((1_000u32..200_000, 1u32..5_000)),
    )
        .prop_map(|(r, t)| {
            let mut l = Limits::UNLIMITED;
            if let Some((n, b)) = r {
                l = l.and_requests(Quota::per_second(nz(n)).allow_burst(nz(b)));
            }
            if let Some((n, b)) = t {
                l = l.and_tokens(Quota::tokens_per_minute(nz(n)).allow_burst(nz(b)));
            }
            l
        })
}

type Pair = (
    rate_limit::Reservation<rate_limit::MemoryTicket<()>>,
    rate_limit::Reservation<tower_qwen::redis::RedisTicket<()>>,
);

async fn run_case(
    conn: redis::aio::ConnectionManager,
    case: usize,
    limits: Limits,
    ops: Vec<Op>,
) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let memory = RateLimiter::new(limits);
    let redis = RateLimiter::builder(limits)
        .redis(conn)
        .prefix(format!("test:prop{case}:"))
        .clock(Clock::Local(t0))
        .timeout(None)
        .expiry_slack(HOUR)
        .build();
    let mut pending: Vec<Pair> = Vec::new();
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            Op::Reserve {
                dt_ms,
                requests,
                tokens,
                max_wait_ms,
            } => {
                tokio::time::advance(Duration::from_millis(dt_ms)).await;
                let now = Instant::now();
                let cost = Cost::new(requests, tokens);
                let max_wait = Duration::from_millis(max_wait_ms);
                let m = memory.reserve(&(), cost, max_wait);
                let r = redis.reserve_at(&(), cost, max_wait, now).await;
                match (m, r) {
                    (Ok(m), Ok(r)) => {
                        prop_assert_eq!(
                            m.ready_at() - now,
                            r.ready_at() - now,
                            "op {}: slots differ",
                            i
                        );
                        pending.push((m, r));
                    }
                    (Err(me), Err(re)) => {
                        let re = limited(&re);
                        prop_assert_eq!(
                            me.retry_after(),
                            re.retry_after(),
                            "op {}: waits differ",
                            i
                        );
                        prop_assert_eq!(me.is_tokens(), re.is_tokens(), "op {}: quotas differ", i);
                    }
                    (m, r) => {
                        return Err(TestCaseError::fail(format!(
                            "op {i}: in-memory {:?}, redis {:?}",
                            m.map(|x| x.ready_at() - now),
                            r.map(|x| x.ready_at() - now).map_err(|e| e.to_string())
                        )));
                    }
                }
            }
            Op::Cancel(k) => {
                if pending.is_empty() {
                    continue;
                }
                let (m, r) = pending.swap_remove(k % pending.len());
                drop(m);
                drop(r);
                redis.settle().await;
            }
            Op::Reconcile(k, actual) => {
                let now = Instant::now();
                let due: Vec<usize> = (0..pending.len())
                    .filter(|&j| pending[j].0.ready_at() <= now)
                    .collect();
                if due.is_empty() {
                    continue;
                }
                let (m, r) = pending.swap_remove(due[k % due.len()]);
                m.ready().await.reconcile(actual);
                r.ready().await.reconcile(actual);
                redis.settle().await;
            }
        }
    }
    let s = redis.stats();
    prop_assert_eq!((s.errors, s.fallback), (0, 0));
    Ok(())
}

/// A runner's config: `cases` unless `PROPTEST_CASES` says otherwise,
/// drawn from a fixed seed (a CI run is reproducible) unless
/// `PROPTEST_RNG_SEED` gives one.
fn config(cases: u32) -> Config {
    let env = Config::default();
    Config {
        cases: std::env::var_os("PROPTEST_CASES").map_or(cases, |_| env.cases),
        rng_seed: match env.rng_seed {
            RngSeed::Random => RngSeed::Fixed(0x7157_0019),
            seed => seed,
        },
        failure_persistence: None,
        ..env
    }
}

#[test]
fn script_decides_like_the_in_memory_core() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let conn = rt.block_on(async { conn(&server) });
    let mut runner = TestRunner::new(config(96));
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&(limits(), vec(op(), 1..60)), |(limits, ops)| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(run_case(conn.clone(), n, limits, ops))
        })
        .unwrap();
}

/// Books `tokens` in both limiters, which must give the same slot.
async fn both(memory: &RateLimiter, redis: &RedisLimiter, tokens: u32, max_wait: Duration) -> Pair {
    let now = Instant::now();
    let m = memory.reserve(&(), Cost::new(0, tokens), max_wait).unwrap();
    let r = redis
        .reserve_at(&(), Cost::new(0, tokens), max_wait, now)
        .await
        .unwrap();
    assert_eq!(m.ready_at() - now, r.ready_at() - now);
    (m, r)
}

/// The wait both limiters give the next token (both must refuse it).
async fn same_wait(memory: &RateLimiter, redis: &RedisLimiter) -> Duration {
    let now = Instant::now();
    let m = memory.reserve(&(), Cost::new(0, 1), Duration::ZERO);
    let r = redis
        .reserve_at(&(), Cost::new(0, 1), Duration::ZERO, now)
        .await;
    let m = match m {
        Ok(x) => panic!("in-memory admitted, ready in {:?}", x.ready_at() - now),
        Err(e) => e.retry_after().unwrap(),
    };
    let r = match r {
        Ok(x) => panic!("redis admitted, ready in {:?}", x.ready_at() - now),
        Err(e) => limited(&e).retry_after().unwrap(),
    };
    assert_eq!(m, r);
    m
}

/// The Redis twin of the bucket's regression test: a refund after another
/// refund lowered the TAT below the grant's `after` keeps what was booked
/// after the grant charged (interval 1 ms, burst 4). A rule counting later
/// charges as `tat - after` gives 1.98 ms back to c and admits two tokens at
/// 5.02 ms beside d's four.
#[tokio::test(start_paused = true)]
async fn a_refund_after_another_refund_keeps_the_later_charges() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::tokens(Quota::tokens_per_minute(nz(60_000)).allow_burst(nz(4)));
    let memory = RateLimiter::new(limits);
    let redis = RateLimiter::builder(limits)
        .redis(conn(&server))
        .prefix("test:refunds:")
        .clock(Clock::Local(t0))
        .timeout(None)
        .expiry_slack(HOUR)
        .build();
    let us = Duration::from_micros;
    let _a = both(&memory, &redis, 1, Duration::ZERO).await;
    tokio::time::advance(MS).await;
    let (mb, rb) = both(&memory, &redis, 4, Duration::ZERO).await;
    // c waits until 3 ms; the refund of b places it from there (TAT 5 ms).
    let (mc, rc) = both(&memory, &redis, 2, 3 * MS).await;
    assert_eq!(mc.ready_at() - t0, 3 * MS);
    tokio::time::advance(MS).await;
    mb.ready().await.reconcile(0);
    rb.ready().await.reconcile(0);
    redis.settle().await;
    tokio::time::advance(us(500)).await;
    // d: four tokens at 5 ms, behind c (TAT 9 ms).
    let (md, _rd) = both(&memory, &redis, 4, 3 * MS).await;
    assert_eq!(md.ready_at() - t0, 5 * MS);
    tokio::time::advance(us(2_520)).await;
    // c used nothing, but its charge (3 to 5 ms) has elapsed, and d's four
    // stay charged: nothing comes back, the next token waits for 6 ms.
    mc.ready().await.reconcile(0);
    rc.ready().await.reconcile(0);
    redis.settle().await;
    assert_eq!(same_wait(&memory, &redis).await, us(980));
}

/// The Redis twin of the bucket's give-back regression test (tokens:
/// interval 4 ms, burst 4; requests: interval 3 ms, burst 1). a's refund
/// lowers the token TAT to 20 ms, below waiter b's `after` (24 ms); c,
/// held to 11 ms by the request quota, raises it back to exactly 24 ms.
/// b's give-back then keeps c's token behind c's slot: d's four tokens go
/// at 15 ms, where restoring the TAT b saw (12 ms) sent them at 12 ms,
/// five tokens within 1 ms.
#[tokio::test(start_paused = true)]
async fn a_give_back_after_a_refund_keeps_the_later_booking() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    let limits = Limits::requests(Quota::per_minute(nz(20_000)).allow_burst(nz(1)))
        .and_tokens(Quota::tokens_per_minute(nz(15_000)).allow_burst(nz(4)));
    let memory = RateLimiter::new(limits);
    let redis = RateLimiter::builder(limits)
        .redis(conn(&server))
        .prefix("test:give-back:")
        .clock(Clock::Local(t0))
        .timeout(None)
        .expiry_slack(HOUR)
        .build();
    let book = async |requests, tokens| {
        let now = Instant::now();
        let cost = Cost::new(requests, tokens);
        let m = memory.reserve(&(), cost, 20 * MS).unwrap();
        let r = redis.reserve_at(&(), cost, 20 * MS, now).await.unwrap();
        assert_eq!(m.ready_at() - now, r.ready_at() - now);
        (m.ready_at() - t0, (m, r))
    };
    let (at, (ma, ra)) = book(1, 3).await;
    assert_eq!(at, Duration::ZERO);
    let (at, b) = book(1, 3).await;
    assert_eq!(at, 8 * MS);
    tokio::time::advance(2 * MS).await;
    ma.ready().await.reconcile(0);
    ra.ready().await.reconcile(0);
    redis.settle().await;
    let (at, _c) = book(1, 1).await;
    assert_eq!(at, 11 * MS);
    drop(b);
    redis.settle().await;
    tokio::time::advance(9 * MS).await;
    let (at, _d) = book(0, 4).await;
    assert_eq!(at, 15 * MS);
}

/// Keys store times relative to an epoch second and are rebased when it is
/// more than a day old; grants made before a rebase (a give-back, a refund)
/// must still land exactly. A debt of 100,000 s (beyond 10^14 ns, so also
/// the full-precision encoding) spans the rebase.
#[tokio::test(start_paused = true)]
async fn grants_survive_the_daily_epoch_rebase_exactly() {
    let server = RedisServer::start();
    let t0 = Instant::now();
    // One token a second, burst 1.
    let limits = Limits::tokens(Quota::per_second(nz(1)).allow_burst(nz(1)));
    let memory = RateLimiter::new(limits);
    let redis = RateLimiter::builder(limits)
        .redis(conn(&server))
        .prefix("test:rebase:")
        .clock(Clock::Local(t0))
        .timeout(None)
        .expiry_slack(HOUR)
        .build();
    let day = Duration::from_secs(86_400);
    tokio::time::advance(Duration::from_millis(10_250)).await;
    // a: 100,000 tokens at once (admit when full), b waits behind it.
    let (ma, ra) = both(&memory, &redis, 100_000, Duration::ZERO).await;
    let (mb, rb) = both(&memory, &redis, 50, 2 * day).await;
    // More than a day later the key is rebased by the next write (c).
    tokio::time::advance(day + Duration::from_secs(7)).await;
    let (mc, rc) = both(&memory, &redis, 20, 2 * day).await;
    // The next token waits behind a, b and c.
    let behind_c = same_wait(&memory, &redis).await;
    assert_eq!(
        behind_c,
        mc.ready_at() - Instant::now() + Duration::from_secs(20)
    );
    // c is the tail: its give-back (epoch after the rebase) is exact; then
    // b's (epoch before the rebase) too.
    drop(mc);
    drop(rc);
    redis.settle().await;
    drop(mb);
    drop(rb);
    redis.settle().await;
    let w = same_wait(&memory, &redis).await;
    assert_eq!(w, behind_c - Duration::from_secs(70));
    // a used 99,000 tokens: the refund of 1,000 (a grant from before the
    // rebase) lands exactly.
    ma.ready().await.reconcile(99_000);
    ra.ready().await.reconcile(99_000);
    redis.settle().await;
    assert_eq!(
        same_wait(&memory, &redis).await,
        w - Duration::from_secs(1_000)
    );
    let mut c = conn(&server);
    // The key's first field (a little-endian double) is its epoch second.
    let raw: Vec<u8> = redis::cmd("GET")
        .arg("test:rebase:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(raw.len(), 56);
    let e = f64::from_le_bytes(raw[..8].try_into().unwrap());
    assert!(e > 86_400.0, "the key was rebased: epoch second {e}");
}

// ---------------------------------------------------------------------------
// Batches: many calls queued at one instant, on several keys, go to Redis in
// one script call (grouped by key, bookings of a key as one run); each must
// get the slot the in-memory core gives the same calls in the same order.

#[derive(Clone, Debug)]
enum BatchOp {
    /// Calls queued at once after `dt_ms`: (key, requests, tokens,
    /// max_wait_ms) each.
    Burst(u64, Vec<(u8, u32, u32, u64)>),
    /// Drop pending reservations, among the latest few (mostly the tails
    /// of their keys, which give back exactly); their give-backs go in one
    /// batch.
    Cancel(Vec<usize>),
    Reconcile(usize, u32),
}

fn batch_op() -> impl Strategy<Value = BatchOp> {
    let call = (
        0u8..3,
        0u32..3,
        0u32..3_000,
        prop_oneof![Just(0u64), 0u64..3_000],
    );
    prop_oneof![
        5 => (0u64..400, vec(call, 1..10)).prop_map(|(dt, calls)| BatchOp::Burst(dt, calls)),
        1 => vec(any::<usize>(), 1..4).prop_map(BatchOp::Cancel),
        2 => (any::<usize>(), 0u32..5_000).prop_map(|(i, t)| BatchOp::Reconcile(i, t)),
    ]
}

type KeyedPair = (
    rate_limit::Reservation<rate_limit::MemoryTicket<u8>>,
    rate_limit::Reservation<tower_qwen::redis::RedisTicket<u8>>,
);

async fn run_batch_case(
    conn: redis::aio::ConnectionManager,
    case: usize,
    limits: Limits,
    ops: Vec<BatchOp>,
) -> Result<(), TestCaseError> {
    let t0 = Instant::now();
    let memory: RateLimiter<u8> = RateLimiter::builder(limits).build_keyed();
    let redis: RedisLimiter<u8> = RateLimiter::builder(limits)
        .redis(conn)
        .prefix(format!("test:batch{case}:"))
        .clock(Clock::Local(t0))
        .timeout(None)
        .expiry_slack(HOUR)
        .build_keyed();
    let mut pending: Vec<KeyedPair> = Vec::new();
    let steps = ops.len() as u64;
    for (i, op) in ops.into_iter().enumerate() {
        match op {
            BatchOp::Burst(dt, burst) => {
                tokio::time::advance(Duration::from_millis(dt)).await;
                let now = Instant::now();
                let m: Vec<_> = burst
                    .iter()
                    .map(|&(k, r, t, w)| {
                        memory.reserve(&k, Cost::new(r, t), Duration::from_millis(w))
                    })
                    .collect();
                let r = futures_util::future::join_all(burst.iter().map(|&(k, r, t, w)| {
                    let redis = redis.clone();
                    async move {
                        redis
                            .reserve_at(&k, Cost::new(r, t), Duration::from_millis(w), now)
                            .await
                    }
                }))
                .await;
                for (j, (m, r)) in m.into_iter().zip(r).enumerate() {
                    match (m, r) {
                        (Ok(m), Ok(r)) => {
                            prop_assert_eq!(
                                m.ready_at() - now,
                                r.ready_at() - now,
                                "op {} call {}: slots differ",
                                i,
                                j
                            );
                            pending.push((m, r));
                        }
                        (Err(me), Err(re)) => {
                            let re = limited(&re);
                            prop_assert_eq!(me.retry_after(), re.retry_after());
                            prop_assert_eq!(me.is_tokens(), re.is_tokens());
                        }
                        (m, r) => {
                            return Err(TestCaseError::fail(format!(
                                "op {i} call {j}: in-memory {:?}, redis {:?}",
                                m.map(|x| x.ready_at() - now),
                                r.map(|x| x.ready_at() - now).map_err(|e| e.to_string())
                            )));
                        }
                    }
                }
            }
            BatchOp::Cancel(which) => {
                for k in which {
                    if pending.is_empty() {
                        break;
                    }
                    let (m, r) = pending.remove(pending.len() - 1 - k % pending.len().min(3));
                    drop(m);
                    drop(r);
                }
                redis.settle().await;
            }
            BatchOp::Reconcile(k, actual) => {
                let now = Instant::now();
                let due: Vec<usize> = (0..pending.len())
                    .filter(|&j| pending[j].0.ready_at() <= now)
                    .collect();
                if due.is_empty() {
                    continue;
                }
                let (m, r) = pending.remove(due[k % due.len()]);
                m.ready().await.reconcile(actual);
                r.ready().await.reconcile(actual);
                redis.settle().await;
            }
        }
    }
    let s = redis.stats();
    prop_assert_eq!((s.errors, s.fallback), (0, 0));
    // Each step was one script call at most: a burst's calls (and a
    // cancel's give-backs) went together.
    prop_assert!(
        s.round_trips <= steps,
        "{} calls for {} steps",
        s.round_trips,
        steps
    );
    Ok(())
}

#[test]
fn batched_calls_on_several_keys_decide_like_the_in_memory_core() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    let conn = rt.block_on(async { conn(&server) });
    let mut runner = TestRunner::new(config(96));
    let case = std::sync::atomic::AtomicUsize::new(0);
    runner
        .run(&(limits(), vec(batch_op(), 1..30)), |(limits, ops)| {
            let n = case.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            rt.block_on(run_batch_case(conn.clone(), n, limits, ops))
        })
        .unwrap();
}
