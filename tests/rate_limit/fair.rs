//! Weighted fair waiting (issue 17, item 2): the quota's split by weight
//! while saturated, a flow alone gets it all, a flood does not delay
//! another flow, cancelling gives the place back, bounded queues. Each
//! scenario also runs in arrival order ([`Fifo`]) and checks that it
//! fails there, so the test tells the two apart. Paused time.

use std::convert::Infallible;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_test::{assert_pending, task};
use tower::util::BoxCloneService;
use tower::{BoxError, ServiceExt, service_fn};
use tower_qwen::classify::{FnClassifier, Outcome};
use tower_qwen::rate_limit::error::RateLimited;
use tower_qwen::rate_limit::fair::FairShare;
use tower_qwen::rate_limit::{Limits, PerCall, RateLimitLayer, RateLimiter};

use super::{nz, smooth};

/// A call: (flow, weight).
type Job = (char, u32);
type Log = Arc<Mutex<Vec<(char, Instant)>>>;
type Svc = BoxCloneService<Job, (), BoxError>;
type Fair = FairShare<fn(&mut Job) -> (char, NonZeroU32)>;

fn flows(job: &mut Job) -> (char, NonZeroU32) {
    (job.0, nz(job.1))
}

/// `per_second` calls a second (burst 1), waiting up to `max_wait`, fair
/// or in arrival order; every admitted call is logged with its instant.
fn svc(per_second: u32, fair: Option<Fair>, max_wait: Duration) -> (Svc, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let inner = service_fn(move |job: Job| {
        seen.lock().unwrap().push((job.0, Instant::now()));
        async { Ok::<_, Infallible>(()) }
    });
    let layer = RateLimitLayer::new(RateLimiter::new(Limits::requests(smooth(per_second))))
        .cost(PerCall)
        .classifier(FnClassifier::new(|_: &()| Outcome::Success))
        .wait(max_wait);
    let svc = match fair {
        Some(f) => BoxCloneService::new(tower::Layer::layer(&layer.fair(f), inner)),
        None => BoxCloneService::new(tower::Layer::layer(&layer, inner)),
    };
    (svc, log)
}

fn fair() -> Fair {
    FairShare::new(flows as fn(&mut Job) -> (char, NonZeroU32))
}

/// `n` callers of `job`, each sending its next call when the last ends,
/// until `end`.
fn closed_loop(svc: &Svc, job: Job, n: usize, end: Instant) -> Vec<JoinHandle<()>> {
    (0..n)
        .map(|_| {
            let svc = svc.clone();
            tokio::spawn(async move {
                while Instant::now() < end {
                    svc.clone().oneshot(job).await.unwrap();
                }
            })
        })
        .collect()
}

/// The share of `flow` among the calls admitted in `[from, to)`.
fn share(log: &Log, flow: char, from: Instant, to: Instant) -> (f64, usize) {
    let log = log.lock().unwrap();
    let window: Vec<_> = log.iter().filter(|(_, t)| *t >= from && *t < to).collect();
    let mine = window.iter().filter(|(f, _)| *f == flow).count();
    (mine as f64 / window.len() as f64, window.len())
}

/// Two flows saturating a 10/s quota with 20 waiters each: their split
/// over 60 s (after 5 s of warm-up).
async fn split(fair_share: bool, heavy: u32, light: u32) -> f64 {
    let (svc, log) = svc(10, fair_share.then(fair), Duration::from_secs(600));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(65);
    let mut tasks = closed_loop(&svc, ('h', heavy), 20, end);
    tasks.extend(closed_loop(&svc, ('l', light), 20, end));
    tokio::time::sleep_until(end).await;
    for t in &tasks {
        t.abort();
    }
    let (heavy_share, n) = share(&log, 'h', t0 + Duration::from_secs(5), end);
    // Saturated: 10 a second.
    assert!((595..=605).contains(&n), "{n} calls in 60 s");
    heavy_share
}

#[tokio::test(start_paused = true)]
async fn saturating_flows_share_by_weight() {
    for (w, expected) in [(3, 0.75), (1, 0.5), (9, 0.9)] {
        let got = split(true, w, 1).await;
        assert!(
            (got - expected).abs() <= 0.05,
            "weights {w}:1: heavy got {got:.3}, expected {expected}"
        );
    }
    // In arrival order the faster sender decides, not the weight.
    let fifo = split(false, 3, 1).await;
    assert!((fifo - 0.75).abs() > 0.05, "fifo gave {fifo:.3}");
}

#[tokio::test(start_paused = true)]
async fn a_flow_alone_gets_the_whole_quota() {
    for fair_share in [true, false] {
        let (svc, log) = svc(10, fair_share.then(fair), Duration::from_secs(600));
        let t0 = Instant::now();
        let end = t0 + Duration::from_secs(60);
        let tasks = closed_loop(&svc, ('a', 1), 20, end);
        tokio::time::sleep_until(end).await;
        for t in &tasks {
            t.abort();
        }
        let (mine, n) = share(&log, 'a', t0, end);
        assert_eq!(mine, 1.0);
        // 600 in 60 s at 10/s (the first at once).
        assert!(n >= 588, "fair {fair_share}: {n} of 600");
    }
}

/// The p99 wait of a weight-9 flow sending every 500 ms, beside a weight-1
/// flow that keeps `low_waiters` calls waiting, over 60 s.
async fn high_p99(fair_share: bool, low_waiters: usize) -> Duration {
    let (svc, _log) = svc(10, fair_share.then(fair), Duration::from_secs(600));
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(62);
    let low = closed_loop(&svc, ('l', 1), low_waiters, end);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut high = Vec::new();
    while Instant::now() + Duration::from_millis(500) < end {
        let svc = svc.clone();
        high.push(tokio::spawn(async move {
            let sent = Instant::now();
            svc.oneshot(('h', 9)).await.unwrap();
            sent.elapsed()
        }));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let mut waits = Vec::new();
    for h in high {
        waits.push(h.await.unwrap());
    }
    for t in &low {
        t.abort();
    }
    waits.sort();
    assert!(waits.len() >= 110, "{} high calls", waits.len());
    waits[(waits.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(start_paused = true)]
async fn a_low_weight_flood_does_not_delay_a_high_weight_flow() {
    // Without the flood the low flow still saturates the quota, with one
    // call at a time; with it, 200 at a time.
    let calm = high_p99(true, 1).await;
    let flood = high_p99(true, 200).await;
    assert!(
        flood <= calm,
        "p99 wait of the high flow: {flood:?} with the flood, {calm:?} without"
    );
    assert!(calm <= Duration::from_millis(200), "{calm:?}");
    // In arrival order the flood's backlog is in front of every call.
    let fifo_calm = high_p99(false, 1).await;
    let fifo_flood = high_p99(false, 200).await;
    assert!(
        fifo_flood > fifo_calm * 10,
        "fifo: {fifo_flood:?} vs {fifo_calm:?}"
    );
}

/// A 1/s quota: the first call goes at once, `b` takes the turn (booked
/// for t = 1 s), `c` and `d` queue. Returns the admissions after dropping
/// `c` (queued) and `b` (holding the turn) at 500 ms.
async fn cancel_scenario(fair_share: bool) -> Vec<(char, Duration)> {
    let (svc, log) = svc(1, fair_share.then(fair), Duration::from_secs(60));
    let t0 = Instant::now();
    svc.clone().oneshot(('a', 1)).await.unwrap();
    let b = tokio::spawn(svc.clone().oneshot(('b', 1)));
    tokio::task::yield_now().await;
    let c = tokio::spawn(svc.clone().oneshot(('c', 1)));
    tokio::task::yield_now().await;
    let d = tokio::spawn(svc.clone().oneshot(('d', 1)));
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.abort();
    b.abort();
    d.await.unwrap().unwrap();
    let log = log.lock().unwrap();
    log.iter().map(|(f, t)| (*f, *t - t0)).collect()
}

#[tokio::test(start_paused = true)]
async fn cancelling_a_waiter_gives_its_place_back() {
    // `d` inherits the slot `b` held, at 1 s.
    assert_eq!(
        cancel_scenario(true).await,
        [('a', Duration::ZERO), ('d', Duration::from_secs(1))]
    );
    // In arrival order `b`'s and `c`'s slots are lost (booked behind).
    let fifo = cancel_scenario(false).await;
    assert_eq!(fifo.last(), Some(&('d', Duration::from_secs(3))));
}

#[tokio::test(start_paused = true)]
async fn queues_are_bounded() {
    let bounded = fair().max_waiters_per_flow(2).max_waiters(3);
    let (svc, _log) = svc(1, Some(bounded.clone()), Duration::from_secs(10));
    svc.clone().oneshot(('x', 1)).await.unwrap();
    // Holds the turn.
    let mut calls = vec![tokio::spawn(svc.clone().oneshot(('x', 1)))];
    tokio::task::yield_now().await;
    for _ in 0..2 {
        calls.push(tokio::spawn(svc.clone().oneshot(('x', 1))));
    }
    tokio::task::yield_now().await;
    assert_eq!(bounded.waiting(), 2);
    // A third waiter of flow x: refused at once, with a wait.
    let err = svc.clone().oneshot(('x', 1)).await.unwrap_err();
    assert!(
        err.downcast_ref::<RateLimited>()
            .unwrap()
            .retry_after()
            .is_some()
    );
    // Another flow still queues, up to the key's bound.
    calls.push(tokio::spawn(svc.clone().oneshot(('y', 1))));
    tokio::task::yield_now().await;
    assert_eq!(bounded.waiting(), 3);
    assert!(
        svc.clone()
            .oneshot(('z', 1))
            .await
            .unwrap_err()
            .is::<RateLimited>()
    );

    for c in calls {
        c.abort();
    }
}

/// Spawns a call of `job` and gives it a turn to enter the queue; its
/// handle answers the call's outcome and when it ended.
async fn timed(svc: &Svc, job: Job) -> JoinHandle<(bool, Duration)> {
    let svc = svc.clone();
    let t0 = Instant::now();
    let h = tokio::spawn(async move {
        let r = svc.oneshot(job).await;
        if let Err(e) = &r {
            assert!(e.is::<RateLimited>(), "{e}");
        }
        (r.is_ok(), t0.elapsed())
    });
    tokio::task::yield_now().await;
    h
}

#[tokio::test(start_paused = true)]
async fn a_call_the_queue_cannot_serve_within_its_wait_is_refused() {
    // 1/s, waits up to 3 s.
    let (svc, _log) = svc(1, Some(fair()), Duration::from_secs(3));
    svc.clone().oneshot(('x', 1)).await.unwrap();
    let holder = timed(&svc, ('x', 1)).await; // booked for 1 s
    let light = timed(&svc, ('l', 1)).await; // expected at 2 s: queued
    // Heavier calls go ahead of it while they fit in 3 s: two do, the
    // third is refused at once.
    let h1 = timed(&svc, ('h', 9)).await;
    let h2 = timed(&svc, ('h', 9)).await;
    let h3 = timed(&svc, ('h', 9)).await;
    let secs = Duration::from_secs;
    assert_eq!(h3.await.unwrap(), (false, Duration::ZERO));
    assert_eq!(holder.await.unwrap(), (true, secs(1)));
    assert_eq!(h1.await.unwrap(), (true, secs(2)));
    assert_eq!(h2.await.unwrap(), (true, secs(3)));
    // The light call's turn would have come at 4 s: it fails when its
    // wait runs out.
    assert_eq!(light.await.unwrap(), (false, secs(3)));
}

#[tokio::test(start_paused = true)]
async fn a_call_dropped_when_its_turn_came_passes_it_on() {
    for fair_share in [true, false] {
        let (svc, log) = svc(1, fair_share.then(fair), Duration::from_secs(60));
        let t0 = Instant::now();
        svc.clone().oneshot(('a', 1)).await.unwrap();
        let b = tokio::spawn(svc.clone().oneshot(('b', 1))); // booked for 1 s
        tokio::task::yield_now().await;
        let mut c = task::spawn(svc.clone().oneshot(('c', 1)));
        assert_pending!(c.poll());
        let d = tokio::spawn(svc.clone().oneshot(('d', 1)));
        tokio::task::yield_now().await;
        b.await.unwrap().unwrap();
        if fair_share {
            // `b` went: the turn is `c`'s, which never sees it.
            assert!(c.is_woken());
        }
        drop(c);
        d.await.unwrap().unwrap();
        let last = log.lock().unwrap().last().map(|(f, t)| (*f, *t - t0));
        let expected = if fair_share { 2 } else { 3 };
        assert_eq!(
            last,
            Some(('d', Duration::from_secs(expected))),
            "fair {fair_share}"
        );
    }
}
