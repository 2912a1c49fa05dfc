//! The rate limiter's decision and layer cost, side by side in one run with
//! what a user would pick instead: governor (the same GCRA) and tower's
//! `RateLimit` behind a `Buffer` (how users share it between clones).
//!
//! ```text
//! cargo bench --bench rate_limit --features rate-limit -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Groups:
//! * `decision`: one uncontended decision. `clock` variants read each
//!   limiter's own clock (tokio's for ours, quanta for governor); `manual`
//!   variants pass an atomically advanced counter to both.
//! * `two_threads`: 2 threads hammering one bucket (time per decision).
//! * `keyed_1m`: a decision on one of 1,000,000 `u64` keys (random order),
//!   each side reading its own clock, and both on a manual clock; and the
//!   bytes per key of a request-only keyed limiter, measured with a
//!   counting global allocator over the 1M insertions (printed), with the
//!   same key type as governor's `keyed` limiter.
//! * `layer`: one request through the whole layer, against a ready inner
//!   service, vs tower's `RateLimit` behind a `Buffer`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::convert::Infallible;
use std::hint::black_box;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use governor::clock::FakeRelativeClock;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_qwen::key::ByModel;
use tower_qwen::rate_limit::bucket::{Bucket, FULL_RATE, Gcra};
use tower_qwen::rate_limit::{
    Budget, BudgetLimits, Cost, Limits, Quota, RateLimitLayer, RateLimiter,
};

// ---------------------------------------------------------------------------
// A counting allocator, to measure bytes per key.

struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        ALLOCATED.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// A quota that never refuses in a benchmark (so both sides take the
/// admit path).
fn huge() -> Quota {
    Quota::per_second(nz(u32::MAX))
}

fn gov_huge() -> governor::Quota {
    governor::Quota::per_second(nz(u32::MAX))
}

// ---------------------------------------------------------------------------

fn decision(c: &mut Criterion) {
    let mut g = c.benchmark_group("decision");

    let ours = RateLimiter::new(Limits::requests(huge()));
    g.bench_function("ours check() clock", |b| {
        b.iter(|| black_box(ours.check(&(), Cost::ONE)))
    });
    let gov = governor::RateLimiter::direct(gov_huge());
    g.bench_function("governor check() clock", |b| {
        b.iter(|| black_box(gov.check()))
    });

    let ours2 = RateLimiter::new(Limits::requests(huge()).and_tokens(huge()));
    g.bench_function("ours check(1 req + 5 tokens) clock", |b| {
        b.iter(|| black_box(ours2.check(&(), Cost::call(5))))
    });
    let ours5 = RateLimiter::new(Limits::tokens(huge()));
    g.bench_function("ours check(5 tokens) clock", |b| {
        b.iter(|| black_box(ours5.check(&(), Cost::new(0, 5))))
    });
    g.bench_function("governor check_n(5) clock", |b| {
        b.iter(|| black_box(gov.check_n(nz(5))))
    });

    // Manual clocks: both advance an atomic counter by 1 ns per decision.
    let gcra = Gcra::new(1, u32::MAX);
    let bucket = Bucket::new();
    let now = AtomicU64::new(1);
    g.bench_function("ours Bucket::reserve manual", |b| {
        b.iter(|| {
            let t = now.fetch_add(1, Ordering::Relaxed);
            black_box(bucket.reserve(&gcra, t, gcra.charge(1, FULL_RATE), 0))
        })
    });
    let clock = FakeRelativeClock::default();
    let gov_fake = governor::RateLimiter::direct_with_clock(gov_huge(), clock.clone());
    g.bench_function("governor check() manual", |b| {
        b.iter(|| {
            clock.advance(Duration::from_nanos(1));
            black_box(gov_fake.check())
        })
    });
    // What the clocks alone cost.
    g.bench_function("clock: tower_qwen::time::now() (tokio)", |b| {
        b.iter(|| black_box(tower_qwen::time::now()))
    });
    let quanta = governor::clock::DefaultClock::default();
    g.bench_function("clock: governor DefaultClock::now() (quanta)", |b| {
        b.iter(|| black_box(governor::clock::Clock::now(&quanta)))
    });
    g.finish();
}

/// Runs `f` `iters` times split over two threads; returns the wall time.
fn two_threads(iters: u64, f: impl Fn() + Sync) -> Duration {
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..iters / 2 {
                    f();
                }
            });
        }
    });
    start.elapsed()
}

fn contended(c: &mut Criterion) {
    let mut g = c.benchmark_group("two_threads");
    let ours = RateLimiter::new(Limits::requests(huge()));
    g.bench_function("ours check()", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box(ours.check(&(), Cost::ONE)).ok();
            })
        })
    });
    let gov = governor::RateLimiter::direct(gov_huge());
    g.bench_function("governor check()", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                black_box(gov.check()).ok();
            })
        })
    });
    let gcra = Gcra::new(1, u32::MAX);
    let bucket = Bucket::new();
    let now = AtomicU64::new(1);
    g.bench_function("ours Bucket::reserve manual", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let t = now.fetch_add(1, Ordering::Relaxed);
                black_box(bucket.reserve(&gcra, t, gcra.charge(1, FULL_RATE), 0)).ok();
            })
        })
    });
    let clock = FakeRelativeClock::default();
    let gov_fake = governor::RateLimiter::direct_with_clock(gov_huge(), clock.clone());
    g.bench_function("governor check() manual", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                clock.advance(Duration::from_nanos(1));
                black_box(gov_fake.check()).ok();
            })
        })
    });
    g.finish();
}

const KEYS: u64 = 1_000_000;

/// A fixed pseudo-random visiting order of the keys.
fn key_order() -> Vec<u64> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..1 << 16)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % KEYS
        })
        .collect()
}

/// The resident set size of this process, in bytes (Linux; 0 elsewhere).
fn rss() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Heap bytes (counting allocator) and RSS growth while `fill` runs.
fn grown(fill: impl FnOnce()) -> (usize, usize) {
    let (heap, res) = (ALLOCATED.load(Ordering::Relaxed), rss());
    fill();
    (
        ALLOCATED.load(Ordering::Relaxed) - heap,
        rss().saturating_sub(res),
    )
}

/// Nanoseconds per call of `f` over one pass of `order`.
fn pass(order: &[u64], mut f: impl FnMut(&u64)) -> f64 {
    let start = Instant::now();
    for k in order {
        f(k);
    }
    start.elapsed().as_nanos() as f64 / order.len() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn keyed(c: &mut Criterion) {
    let order = key_order();
    let mut g = c.benchmark_group("keyed_1m");

    let ours: RateLimiter<u64> = RateLimiter::builder(Limits::requests(huge()))
        .max_keys(KEYS as usize + 1)
        .build_keyed();
    let (ours_heap, ours_rss) = grown(|| {
        for k in 0..KEYS {
            ours.check(&k, Cost::ONE).unwrap();
        }
    });
    let gov = governor::RateLimiter::keyed(gov_huge());
    let (gov_heap, gov_rss) = grown(|| {
        for k in 0..KEYS {
            gov.check_key(&k).unwrap();
        }
    });
    let per_key = |b: usize| b as f64 / KEYS as f64;
    println!(
        "keyed_1m memory, 1M u64 keys, request-only: ours {:.1} B/key heap, {:.1} B/key RSS \
         (slot formula at a full table: {} B/key); governor {:.1} B/key heap, {:.1} B/key RSS; \
         ratio {:.2}x heap, {:.2}x RSS",
        per_key(ours_heap),
        per_key(ours_rss),
        RateLimiter::<u64>::bytes_per_key(),
        per_key(gov_heap),
        per_key(gov_rss),
        ours_heap as f64 / gov_heap as f64,
        ours_rss as f64 / gov_rss as f64,
    );

    let mut i = 0usize;
    g.bench_function("ours check(key) clock", |b| {
        b.iter(|| {
            i = (i + 1) & (order.len() - 1);
            black_box(ours.check(&order[i], Cost::ONE))
        })
    });
    let mut i = 0usize;
    g.bench_function("governor check_key(key) clock", |b| {
        b.iter(|| {
            i = (i + 1) & (order.len() - 1);
            black_box(gov.check_key(&order[i]))
        })
    });
    // Manual clocks: an instant advanced by 1 ns per decision for both.
    let t0 = tower_qwen::time::now();
    let mut i = 0usize;
    let mut n = 0u64;
    g.bench_function("ours check_at(key) manual", |b| {
        b.iter(|| {
            i = (i + 1) & (order.len() - 1);
            n += 1;
            black_box(ours.check_at(&order[i], Cost::ONE, t0 + Duration::from_nanos(n)))
        })
    });
    let clock = FakeRelativeClock::default();
    let gov_fake = governor::RateLimiter::dashmap_with_clock(gov_huge(), clock.clone());
    for k in 0..KEYS {
        gov_fake.check_key(&k).unwrap();
    }
    let mut i = 0usize;
    g.bench_function("governor check_key(key) manual", |b| {
        b.iter(|| {
            i = (i + 1) & (order.len() - 1);
            clock.advance(Duration::from_nanos(1));
            black_box(gov_fake.check_key(&order[i]))
        })
    });
    g.finish();

    // Paired passes: on this shared, noisy machine the load drifts between
    // criterion's runs, so each round times one pass of the same 65,536
    // keys for every side back to back (the order rotating), and the
    // ratios are taken within a round.
    let rounds = 31;
    let mut t = [vec![], vec![], vec![], vec![]];
    for round in 0..rounds {
        for j in 0..4 {
            let side = (round + j) % 4;
            let ns = match side {
                0 => pass(&order, |k| {
                    black_box(ours.check(k, Cost::ONE)).ok();
                }),
                1 => pass(&order, |k| {
                    black_box(gov.check_key(k)).ok();
                }),
                2 => pass(&order, |k| {
                    n += 1;
                    black_box(ours.check_at(k, Cost::ONE, t0 + Duration::from_nanos(n))).ok();
                }),
                _ => pass(&order, |k| {
                    clock.advance(Duration::from_nanos(1));
                    black_box(gov_fake.check_key(k)).ok();
                }),
            };
            t[side].push(ns);
        }
    }
    let ratio = |a: usize, b: usize| median(t[a].iter().zip(&t[b]).map(|(x, y)| x / y).collect());
    println!(
        "keyed_1m paired ({rounds} rounds of 65,536 decisions, medians): own clocks: ours {:.0} ns, \
         governor {:.0} ns, ratio {:.2}x; manual clocks: ours {:.0} ns, governor {:.0} ns, \
         ratio {:.2}x",
        median(t[0].clone()),
        median(t[1].clone()),
        ratio(0, 1),
        median(t[2].clone()),
        median(t[3].clone()),
        ratio(2, 3),
    );
}

type Req = Request<Full<Bytes>>;

fn request() -> Req {
    Request::post("/compatible-mode/v1/chat/completions")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"qwen-plus","max_tokens":20,"messages":[{"role":"user","content":"Hello there"}]}"#,
        )))
        .unwrap()
}

fn inner() -> impl Service<Req, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send>
+ Clone
+ Send
+ 'static {
    tower::service_fn(|_req: Req| async {
        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
            br#"{"usage":{"prompt_tokens":7,"completion_tokens":20,"total_tokens":27}}"#,
        ))))
    })
}

/// `iters` requests, one after the other, each response body read to its
/// end (which is when ours reconciles).
fn run_layer<S, B>(rt: &tokio::runtime::Runtime, svc: S, iters: u64) -> Duration
where
    S: Service<Req, Response = Response<B>> + Clone,
    S::Error: std::fmt::Debug,
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    rt.block_on(async move {
        let mut svc = svc;
        let start = Instant::now();
        for _ in 0..iters {
            let res = svc.ready().await.unwrap().call(request()).await.unwrap();
            black_box(res.into_body().collect().await.unwrap());
        }
        start.elapsed()
    })
}

fn layer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("layer");
    g.bench_function("no limiter", |b| {
        b.iter_custom(|n| run_layer(&rt, inner(), n))
    });
    g.bench_function("tower RateLimit behind Buffer", |b| {
        let svc = rt.block_on(async {
            ServiceBuilder::new()
                .buffer(1024)
                .rate_limit(u64::from(u32::MAX), Duration::from_secs(1))
                .service(inner())
        });
        b.iter_custom(|n| run_layer(&rt, svc.clone(), n))
    });
    g.bench_function("ours requests", |b| {
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::from_limits(Limits::requests(huge())))
            .service(inner());
        b.iter_custom(|n| run_layer(&rt, svc.clone(), n))
    });
    g.bench_function("ours requests+tokens by model", |b| {
        let limiter =
            RateLimiter::builder(Limits::requests(huge()).and_tokens(huge())).build_keyed();
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::keyed(limiter, ByModel))
            .service(inner());
        b.iter_custom(|n| run_layer(&rt, svc.clone(), n))
    });
    // A token budget per day: a fixed-window counter behind the same layer
    // (estimate charged, reconciled with the usage at the body's end).
    g.bench_function("ours token budget per day", |b| {
        let budget = Budget::builder().build(BudgetLimits::per_day(NonZeroU64::MAX));
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(budget).reject())
            .service(inner());
        b.iter_custom(|n| run_layer(&rt, svc.clone(), n))
    });
    g.finish();
}

criterion_group!(benches, decision, contended, keyed, layer);
criterion_main!(benches);
