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
use std::num::NonZeroU32;
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
use tower_qwen::rate_limit::{Cost, Limits, Quota, RateLimitLayer, RateLimiter};

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

fn keyed(c: &mut Criterion) {
    let order = key_order();
    let mut g = c.benchmark_group("keyed_1m");

    let before = ALLOCATED.load(Ordering::Relaxed);
    let ours: RateLimiter<u64> = RateLimiter::builder(Limits::requests(huge()))
        .max_keys(KEYS as usize + 1)
        .build_keyed();
    for k in 0..KEYS {
        ours.check(&k, Cost::ONE).unwrap();
    }
    let ours_bytes = ALLOCATED.load(Ordering::Relaxed) - before;

    let before = ALLOCATED.load(Ordering::Relaxed);
    let gov = governor::RateLimiter::keyed(gov_huge());
    for k in 0..KEYS {
        gov.check_key(&k).unwrap();
    }
    let gov_bytes = ALLOCATED.load(Ordering::Relaxed) - before;
    println!(
        "keyed_1m memory (counting allocator, 1M u64 keys, request-only): ours {:.1} B/key \
         (slot formula at a full table: {} B/key), governor {:.1} B/key, ratio {:.2}x",
        ours_bytes as f64 / KEYS as f64,
        RateLimiter::<u64>::bytes_per_key(),
        gov_bytes as f64 / KEYS as f64,
        ours_bytes as f64 / gov_bytes as f64,
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
    drop(gov);
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
    g.finish();
}

criterion_group!(benches, decision, contended, keyed, layer);
criterion_main!(benches);
