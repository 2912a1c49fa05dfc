//! The in-memory limiter at its edges (issue 19): what it reports (limits,
//! remaining, resets, waits, rates, headers), which quota refused, the
//! feedback settings, ramps, keys and eviction, each pinned to an exact
//! number, so that a changed comparison or operator fails a test. Paused
//! time throughout.

use std::time::Duration;

use tokio::time::Instant;
use tower_qwen::classify::ThrottleCause;
use tower_qwen::rate_limit::error::RateLimited;
use tower_qwen::rate_limit::{
    Backend, Cost, Decision, Feedback, Limits, Permit, Quota, RateLimiter, SlowStart, Ticket,
};

use super::{MS, nz, smooth};

fn rate(limiter: &RateLimiter, tokens: bool) -> f64 {
    let s = limiter.snapshot(&()).unwrap();
    if tokens { s.tokens } else { s.requests }.unwrap().rate
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

/// The feedback settings each count: the pause, the rate factor, the
/// floor and the recovery (every throttle tightening fully).
#[tokio::test(start_paused = true)]
async fn feedback_pause_factor_floor_and_recovery() {
    let limiter = RateLimiter::builder(Limits::requests(smooth(10)))
        .feedback(
            Feedback::new()
                .repeat_within(Duration::ZERO)
                .pause(Duration::from_millis(300))
                .rate_factor(0.25)
                .min_rate(0.2)
                .recover_over(Duration::from_secs(100)),
        )
        .build();
    limiter.check(&(), Cost::ONE).unwrap();
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    // Paused for 300 ms, the 100 ms of debt after it re-paced at a quarter
    // of the rate (recovering: a little under 400 ms); a quarter of the
    // rate when the pause ends.
    let err = limiter.check(&(), Cost::ONE).unwrap_err();
    let wait = err.retry_after().unwrap_or_default();
    assert!(wait > 695 * MS && wait <= 700 * MS, "{wait:?}");
    assert_eq!(rate(&limiter, false), 0.25);
    tokio::time::advance(wait).await;
    limiter.check(&(), Cost::ONE).unwrap();
    // A second throttle (of a call admitted after the first): a quarter of
    // the rate reached is below the floor, so the floor.
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    assert!(
        close(rate(&limiter, false), 0.2),
        "{}",
        rate(&limiter, false)
    );
    // Half way through the recovery (100 s from the pause's end at 700 ms).
    tokio::time::advance(Duration::from_millis(300 + 50_000)).await;
    assert!(
        close(rate(&limiter, false), 0.6),
        "{}",
        rate(&limiter, false)
    );
    tokio::time::advance(Duration::from_secs(50)).await;
    assert_eq!(rate(&limiter, false), 1.0);
    assert_eq!(limiter.snapshot(&()).unwrap().throttles, 2);
}

/// A lone throttle of the key's own quota (requests or tokens, none other
/// within `repeat_within`) is timing jitter at the upstream's window
/// boundary: the throttled quota's rate steps down by the lone factor
/// (0.98 by default), with no pause. A second throttle within the window
/// (of a call admitted after the first) is a quota that is too high: paused
/// 1 s and halved, as before. Past the window, a throttle is lone again.
#[tokio::test(start_paused = true)]
async fn a_lone_quota_throttle_steps_the_rate_down_and_a_repeated_one_halves_it() {
    tokio::time::advance(Duration::from_secs(3)).await;
    for (cause, tokens) in [
        (ThrottleCause::Requests, false),
        (ThrottleCause::Tokens, true),
    ] {
        let limiter = RateLimiter::builder(Limits::requests(smooth(10)).and_tokens(smooth(1_000)))
            .feedback(Feedback::new().recover_over(Duration::from_secs(100)))
            .build();
        limiter.check(&(), Cost::call(100)).unwrap();
        assert!(limiter.throttled(&(), cause), "{cause:?}");
        // No pause: the next call waits only for the first one's 100 ms.
        let wait = limiter.check(&(), Cost::ONE).unwrap_err().retry_after();
        assert_eq!(wait, Some(100 * MS), "{cause:?}");
        assert!(close(rate(&limiter, tokens), 0.98), "{cause:?}");
        assert_eq!(rate(&limiter, !tokens), 1.0, "{cause:?}");
        assert_eq!(limiter.snapshot(&()).unwrap().throttles, 1);
        // Recovering linearly over 100 s: half way at 50 s.
        tokio::time::advance(Duration::from_secs(50)).await;
        assert!(close(rate(&limiter, tokens), 0.99), "{cause:?}");
        // A second throttle 1.999 s after the first: paused, and halved
        // from the rate reached.
        let limiter = RateLimiter::builder(Limits::requests(smooth(10)).and_tokens(smooth(1_000)))
            .feedback(Feedback::new().recover_over(Duration::from_secs(100)))
            .build();
        assert!(limiter.throttled(&(), cause));
        tokio::time::advance(Duration::from_millis(1_999)).await;
        limiter.check(&(), Cost::call(100)).unwrap();
        assert!(limiter.throttled(&(), cause));
        let r = rate(&limiter, tokens);
        assert!(
            close(r, 0.5 * (0.98 + 0.02 * 1.999 / 100.0)),
            "{cause:?} {r}"
        );
        // Paused 1 s, behind the call's 100 ms of requests: re-paced at the
        // halved rate when requests were throttled (102 ms at 98%, about
        // 204 ms at 49%), only moved by the pause when tokens were.
        let wait = limiter.check(&(), Cost::ONE).unwrap_err().retry_after();
        let wait = wait.unwrap_or_default();
        let debt = if tokens { 100 * MS } else { 200 * MS };
        assert!(
            wait >= Duration::from_secs(1) + debt && wait < Duration::from_secs(1) + debt + 5 * MS,
            "{cause:?} {wait:?}"
        );
        assert_eq!(limiter.snapshot(&()).unwrap().throttles, 2);
        // 2 s after that one (the window counts from the last throttle
        // acted on): lone again, a step down from where the recovery got.
        tokio::time::advance(Duration::from_secs(2)).await;
        let before = rate(&limiter, tokens);
        assert!(limiter.throttled(&(), cause));
        assert!(close(rate(&limiter, tokens), before * 0.98), "{cause:?}");
        assert!(limiter.check(&(), Cost::ONE).is_ok(), "{cause:?}");
    }
}

/// Only the key's own quotas have lone throttles: a burst, overload or
/// unknown throttle tightens fully the first time; a zero window makes
/// every throttle tighten fully; a lone factor of 1 keeps the rate.
#[tokio::test(start_paused = true)]
async fn lone_throttles_are_quota_throttles_within_a_window_of_their_own() {
    tokio::time::advance(Duration::from_secs(3)).await;
    let build = |f: Feedback| {
        RateLimiter::builder(Limits::requests(smooth(10)).and_tokens(smooth(1_000)))
            .feedback(f)
            .build()
    };
    for cause in [
        ThrottleCause::Burst,
        ThrottleCause::Overloaded,
        ThrottleCause::Unknown,
    ] {
        let limiter = build(Feedback::new());
        assert!(limiter.throttled(&(), cause));
        assert_eq!(rate(&limiter, false), 0.5, "{cause:?}");
        let wait = limiter.check(&(), Cost::ONE).unwrap_err().retry_after();
        assert_eq!(wait, Some(Duration::from_secs(1)), "{cause:?}");
    }
    let limiter = build(Feedback::new().repeat_within(Duration::ZERO));
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    assert_eq!(rate(&limiter, false), 0.5);
    let limiter = build(Feedback::new().lone_rate_factor(1.0));
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    assert_eq!(rate(&limiter, false), 1.0);
    assert_eq!(limiter.snapshot(&()).unwrap().throttles, 1);
    limiter.check(&(), Cost::ONE).unwrap();
}

/// A lone quota throttle during a slow start leaves the slow start alone
/// (its rate is below the quota already); once the slow start is over, a
/// lone one steps the rate down, and a repeated one halves it.
#[tokio::test(start_paused = true)]
async fn a_lone_quota_throttle_leaves_a_slow_start_alone() {
    let limiter = RateLimiter::builder(Limits::requests(smooth(10)))
        .slow_start(SlowStart::new(Duration::from_secs(4)).initial_rate(0.5))
        .build();
    limiter.check(&(), Cost::ONE).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    let before = rate(&limiter, false);
    assert!(close(before, 0.5 * 2f64.powf(0.25)), "{before}");
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    assert_eq!(rate(&limiter, false), before);
    // The slow start goes on: full at 4 s.
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(rate(&limiter, false), 1.0);
    limiter.check(&(), Cost::ONE).unwrap();
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    assert!(close(rate(&limiter, false), 0.98));
    // 1 s later (recovering over 30 s), a repeated one.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    let r = rate(&limiter, false);
    assert!(close(r, 0.5 * (0.98 + 0.02 / 30.0)), "{r}");
}

/// A snapshot reports each quota exactly (limit = burst, remaining units,
/// reset, the wait for one unit), and the headers say the same, the reset
/// rounded up to whole seconds.
#[tokio::test(start_paused = true)]
async fn snapshots_and_headers_report_each_quota_exactly() {
    let limits = Limits::requests(Quota::per_second(nz(10)).allow_burst(nz(3)))
        .and_tokens(Quota::per_second(nz(1_000)).allow_burst(nz(500)));
    let limiter = RateLimiter::new(limits);
    let full = {
        let mut h = http::HeaderMap::new();
        limiter.snapshot(&()).unwrap().write_headers(&mut h);
        h
    };
    assert_eq!(full["x-ratelimit-limit-requests"], "3");
    assert_eq!(full["x-ratelimit-remaining-requests"], "3");
    assert_eq!(full["x-ratelimit-reset-requests"], "0");
    assert_eq!(full["x-ratelimit-limit-tokens"], "500");
    assert_eq!(full["x-ratelimit-remaining-tokens"], "500");
    assert_eq!(full["x-ratelimit-reset-tokens"], "0");
    limiter.check(&(), Cost::new(2, 200)).unwrap();
    let s = limiter.snapshot(&()).unwrap();
    let (r, t) = (s.requests.unwrap(), s.tokens.unwrap());
    assert_eq!((r.limit, r.remaining, r.reset), (3, 1, 200 * MS));
    assert_eq!((r.retry_after, r.rate), (Duration::ZERO, 1.0));
    assert_eq!((t.limit, t.remaining, t.reset), (500, 300, 200 * MS));
    assert_eq!((s.throttles, s.last_throttle), (0, None));
    // One more request: no unit left, the next one in 100 ms.
    limiter.check(&(), Cost::new(1, 0)).unwrap();
    let r = limiter.snapshot(&()).unwrap().requests.unwrap();
    assert_eq!(
        (r.remaining, r.reset, r.retry_after),
        (0, 300 * MS, 100 * MS)
    );
    let mut h = http::HeaderMap::new();
    limiter.snapshot(&()).unwrap().write_headers(&mut h);
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert_eq!(h["x-ratelimit-reset-requests"], "1");
    assert_eq!(h["x-ratelimit-remaining-tokens"], "300");
    // A quota the limiter does not have writes no header.
    let mut h = http::HeaderMap::new();
    RateLimiter::new(Limits::requests(smooth(1)))
        .snapshot(&())
        .unwrap()
        .write_headers(&mut h);
    assert_eq!(h.len(), 3);
    assert!(h.get("x-ratelimit-limit-tokens").is_none());
}

/// The quota that refused is the one whose slot is later; on a tie, the
/// request quota. A refusal charges neither.
#[tokio::test(start_paused = true)]
async fn the_refusing_quota_is_the_later_one() {
    let limits = Limits::requests(Quota::per_second(nz(10)).allow_burst(nz(3)))
        .and_tokens(Quota::per_second(nz(1_000)).allow_burst(nz(500)));
    let limiter = RateLimiter::new(limits);
    limiter.check(&(), Cost::new(2, 200)).unwrap();
    // Tokens: 350 conform at 50 ms; requests at once.
    let e = limiter.check(&(), Cost::new(1, 350)).unwrap_err();
    assert!(e.is_tokens() && !e.is_requests());
    assert_eq!(e.retry_after(), Some(50 * MS));
    // Requests: 2 conform at 100 ms; tokens at once.
    let e = limiter.check(&(), Cost::new(2, 0)).unwrap_err();
    assert!(e.is_requests() && !e.is_tokens());
    assert_eq!(e.retry_after(), Some(100 * MS));
    // Both at 100 ms: the request quota is named.
    let e = limiter.check(&(), Cost::new(2, 400)).unwrap_err();
    assert!(e.is_requests());
    assert_eq!(e.retry_after(), Some(100 * MS));
    // Nothing was charged by the refusals.
    let s = limiter.snapshot(&()).unwrap();
    assert_eq!(s.requests.unwrap().remaining, 1);
    assert_eq!(s.tokens.unwrap().remaining, 300);
    // A call of no tokens never waits on the token quota, a call of no
    // requests never on the request quota.
    limiter.check(&(), Cost::new(0, 300)).unwrap();
    limiter.check(&(), Cost::new(1, 0)).unwrap();
    let s = limiter.snapshot(&()).unwrap();
    assert_eq!(s.requests.unwrap().remaining, 0);
    assert_eq!(s.tokens.unwrap().remaining, 0);
}

/// A second `slow_start` replaces the first (the builder given one is a
/// `RateLimiterBuilder<InMemorySlowStart>`, whose setter replaces it).
#[tokio::test(start_paused = true)]
async fn a_second_slow_start_replaces_the_first() {
    let limiter = RateLimiter::builder(Limits::requests(smooth(10)))
        .slow_start(SlowStart::new(Duration::from_secs(100)).initial_rate(0.25))
        .slow_start(SlowStart::new(Duration::from_secs(100)).initial_rate(0.5))
        .build();
    limiter.check(&(), Cost::ONE).unwrap();
    assert_eq!(rate(&limiter, false), 0.5);
    assert_eq!(
        limiter.check(&(), Cost::ONE).unwrap_err().retry_after(),
        Some(200 * MS)
    );
}

/// The slow start's starting rate and idle time count.
#[tokio::test(start_paused = true)]
async fn slow_start_initial_rate_and_idle_time() {
    let limiter = RateLimiter::builder(Limits::requests(smooth(10)))
        .slow_start(
            SlowStart::new(Duration::from_secs(100))
                .initial_rate(0.5)
                .idle_after(Duration::from_secs(2)),
        )
        .build();
    limiter.check(&(), Cost::ONE).unwrap();
    assert_eq!(
        limiter.check(&(), Cost::ONE).unwrap_err().retry_after(),
        Some(200 * MS)
    );
    assert_eq!(rate(&limiter, false), 0.5);
    // Busy for 10 s: the rate climbs a tenth of the way, geometrically
    // (0.5 x 2^0.1).
    for _ in 0..20 {
        tokio::time::advance(Duration::from_millis(500)).await;
        limiter.check(&(), Cost::ONE).unwrap();
    }
    assert!(
        close(rate(&limiter, false), 0.5 * 2f64.powf(0.1)),
        "{}",
        rate(&limiter, false)
    );
    // Idle for exactly 2 s after the bucket is full: a new ramp.
    let reset = limiter.snapshot(&()).unwrap().requests.unwrap().reset;
    tokio::time::advance(reset + Duration::from_secs(2)).await;
    limiter.check(&(), Cost::ONE).unwrap();
    assert_eq!(rate(&limiter, false), 0.5);
}

/// Debug output names the limiter, tickets and permits and their slots.
#[tokio::test(start_paused = true)]
async fn debug_output() {
    let limiter = RateLimiter::new(Limits::requests(smooth(10)).and_tokens(smooth(1_000)));
    assert!(format!("{limiter:?}").starts_with("RateLimiter {"));
    let now = limiter
        .reserve(&(), Cost::new(1, 5), Duration::from_secs(1))
        .unwrap();
    let later = limiter
        .reserve(&(), Cost::new(1, 5), Duration::from_secs(1))
        .unwrap();
    assert!(format!("{later:?}").contains("MemoryTicket { slot: Some(100000000)"));
    let admitted = now.ready().await;
    let permit = format!("{:?}", admitted.get_ref());
    assert_eq!(permit, "MemoryPermit { slot: Some(0), tokens: Some(5) }");
}

/// What [`Backend::decide`] hands out: the cost function is told whether
/// the key has a token quota; a call at its slot is admitted, a later one
/// booked; a permit carries its tokens and says whether the limiter wants
/// to hear back.
#[tokio::test(start_paused = true)]
async fn decide_weighs_admits_books_and_permits_report() {
    let seen = std::cell::Cell::new(None);
    let weigh = |cost: Cost| {
        let seen = &seen;
        move |tokens: bool| {
            seen.set(Some(tokens));
            cost
        }
    };
    let wait = Duration::from_secs(1);
    // Request-only keys, compact or full (limits of their own): no tokens.
    let compact: RateLimiter<u32> =
        RateLimiter::builder(Limits::requests(smooth(10))).build_keyed();
    let full: RateLimiter<u32> = RateLimiter::builder(Limits::requests(smooth(10)))
        .feedback(None)
        .build_keyed_with(|k| {
            if *k == 0 {
                Limits::requests(smooth(10))
            } else {
                Limits::requests(smooth(10)).and_tokens(smooth(1_000))
            }
        });
    for limiter in [&compact, &full] {
        let Decision::Admitted(p) = limiter.decide(&0, weigh(Cost::ONE), wait, Instant::now())
        else {
            panic!("admitted")
        };
        assert_eq!(seen.take(), Some(false));
        assert_eq!(p.tokens(), 0);
        let Decision::Booked(t) = limiter.decide(&0, weigh(Cost::ONE), wait, Instant::now()) else {
            panic!("booked")
        };
        assert_eq!(t.ready_at() - Instant::now(), 100 * MS);
    }
    // The compact limiter has feedback (the default), the other not.
    let Decision::Admitted(p) = compact.decide(&1, weigh(Cost::ONE), wait, Instant::now()) else {
        panic!("admitted")
    };
    assert!(p.wants_feedback());
    let Decision::Admitted(p) = full.decide(&2, weigh(Cost::ONE), wait, Instant::now()) else {
        panic!("admitted")
    };
    assert!(!p.wants_feedback());
    // Key 2 is the first with a token quota: weighed with tokens after the
    // lookup.
    assert_eq!(seen.take(), Some(true));
    // A key with a token quota is weighed with tokens, and charged them.
    let Decision::Admitted(p) = full.decide(&1, weigh(Cost::call(300)), wait, Instant::now())
    else {
        panic!("admitted")
    };
    assert_eq!(seen.take(), Some(true));
    assert_eq!(p.tokens(), 300);
    assert_eq!(
        Backend::snapshot(&full, &1).unwrap().tokens.unwrap().reset,
        300 * MS
    );
    // Once a token key was seen, every key is weighed before the lookup.
    tokio::time::advance(Duration::from_secs(1)).await;
    let Decision::Admitted(_) = full.decide(&0, weigh(Cost::ONE), wait, Instant::now()) else {
        panic!("admitted")
    };
    assert_eq!(seen.take(), Some(true));
    // A refusal.
    let Decision::Refused(e) = full.decide(&0, weigh(Cost::ONE), Duration::ZERO, Instant::now())
    else {
        panic!("refused")
    };
    assert!(e.downcast_ref::<RateLimited>().unwrap().is_requests());
    assert_eq!(Backend::snapshot(&compact, &9), None);
}

/// Calls of no requests are free on a request-only key, even one in debt;
/// a free reservation is ready now; the waits are exact away from the
/// epoch, and a wait of exactly the maximum is booked.
#[tokio::test(start_paused = true)]
async fn free_calls_exact_waits_and_the_maximum_wait() {
    // Ten seconds after the limiters' epoch, so that `now` is not 0.
    let limiter: RateLimiter<u32> = RateLimiter::builder(Limits::requests(smooth(1))).build_keyed();
    let two = RateLimiter::new(Limits::requests(smooth(10)).and_tokens(smooth(1_000)));
    tokio::time::advance(Duration::from_secs(10)).await;
    // 5 requests on a full bucket (burst 1): admitted; the next conforms
    // in 5 s.
    limiter.check(&1, Cost::new(5, 0)).unwrap();
    limiter.check(&1, Cost::new(0, 7)).unwrap();
    let free = limiter
        .reserve(&1, Cost::new(0, 0), Duration::ZERO)
        .unwrap();
    assert_eq!(free.ready_at(), Instant::now());
    assert_eq!(
        limiter.check(&1, Cost::ONE).unwrap_err().retry_after(),
        Some(Duration::from_secs(5))
    );
    // A wait of exactly the maximum is booked; a nanosecond less is not.
    assert!(
        limiter
            .reserve(
                &1,
                Cost::ONE,
                Duration::from_secs(5) - Duration::from_nanos(1)
            )
            .is_err()
    );
    let r = limiter
        .reserve(&1, Cost::ONE, Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.ready_at() - Instant::now(), Duration::from_secs(5));
    // Cancelled (the tail): the slot is given back.
    drop(r);
    let r = limiter
        .reserve(&1, Cost::ONE, Duration::from_secs(5))
        .unwrap();
    assert_eq!(r.ready_at() - Instant::now(), Duration::from_secs(5));
    std::mem::forget(r);
    // The same on an unkeyed limiter with two quotas.
    let limiter = two;
    limiter.check(&(), Cost::new(1, 50)).unwrap();
    assert_eq!(
        limiter
            .check(&(), Cost::new(1, 0))
            .unwrap_err()
            .retry_after(),
        Some(100 * MS)
    );
    assert!(
        limiter
            .reserve(&(), Cost::ONE, 100 * MS - Duration::from_nanos(1))
            .is_err()
    );
    let r = limiter.reserve(&(), Cost::ONE, 100 * MS).unwrap();
    assert_eq!(r.ready_at() - Instant::now(), 100 * MS);
    // A call that uses no tokens books nothing in the token bucket, even
    // at a later slot.
    assert_eq!(
        limiter.snapshot(&()).unwrap().tokens.unwrap().reset,
        50 * MS
    );
    // And one of no requests nothing in the request bucket.
    let limiter = RateLimiter::new(Limits::requests(smooth(10)).and_tokens(smooth(1_000)));
    limiter.check(&(), Cost::new(0, 500)).unwrap();
    let r = limiter
        .reserve(&(), Cost::new(0, 10), Duration::from_secs(1))
        .unwrap();
    assert_eq!(r.ready_at() - Instant::now(), 500 * MS);
    let s = limiter.snapshot(&()).unwrap();
    assert_eq!(s.requests.unwrap().reset, Duration::ZERO);
    assert_eq!(s.tokens.unwrap().reset, 510 * MS);
}

/// A refund never returns capacity ahead of a waiter already booked.
#[tokio::test(start_paused = true)]
async fn a_refund_stays_behind_the_waiters() {
    let limiter = RateLimiter::new(tokens_1k());
    let a = limiter
        .reserve(&(), Cost::call(1_000), Duration::ZERO)
        .unwrap()
        .ready()
        .await;
    // B waits for its slot at 1 s (the bucket is in debt until then).
    let b = limiter
        .reserve(&(), Cost::call(100), Duration::from_secs(2))
        .unwrap();
    assert_eq!(b.ready_at() - Instant::now(), Duration::from_secs(1));
    // A used nothing: nothing comes back ahead of B's slot and charge.
    a.reconcile(0);
    assert_eq!(token_reset(&limiter), 1_100 * MS);
    // Used exactly the estimate: nothing changes either way.
    let c = b.ready().await;
    c.reconcile(100);
    assert_eq!(token_reset(&limiter), 100 * MS);
}

fn tokens_1k() -> Limits {
    Limits::tokens(smooth(1_000))
}

fn token_reset(limiter: &RateLimiter) -> Duration {
    limiter.snapshot(&()).unwrap().tokens.unwrap().reset
}

/// A request throttle lowers the request rate only, a token throttle the
/// token rate only, an overload both; the instant of the last tightening is
/// reported exactly (every throttle tightening fully).
#[tokio::test(start_paused = true)]
async fn each_cause_tightens_its_own_quota() {
    let two = || {
        RateLimiter::builder(Limits::requests(smooth(10)).and_tokens(smooth(1_000)))
            .feedback(
                Feedback::new()
                    .repeat_within(Duration::ZERO)
                    .recover_over(Duration::from_secs(100)),
            )
            .build()
    };
    tokio::time::advance(Duration::from_secs(3)).await;
    for (cause, req, tok) in [
        (ThrottleCause::Requests, 0.5, 1.0),
        (ThrottleCause::Burst, 0.5, 1.0),
        (ThrottleCause::Tokens, 1.0, 0.5),
        (ThrottleCause::Overloaded, 0.5, 0.5),
    ] {
        let limiter = two();
        let at = Instant::now();
        assert!(limiter.throttled(&(), cause), "{cause:?}");
        assert_eq!(
            (rate(&limiter, false), rate(&limiter, true)),
            (req, tok),
            "{cause:?}"
        );
        assert_eq!(limiter.snapshot(&()).unwrap().last_throttle, Some(at));
    }
}

/// A throttle of a call admitted at the instant of the last tightening is
/// ignored (it was admitted before it); one admitted a nanosecond later
/// tightens again.
#[tokio::test(start_paused = true)]
async fn throttles_of_calls_admitted_before_the_tightening_are_ignored() {
    tokio::time::advance(Duration::from_secs(3)).await;
    let limiter = RateLimiter::builder(Limits::requests(
        Quota::per_second(nz(10)).allow_burst(nz(5)),
    ))
    .build();
    let t = Instant::now();
    let admit = |at: Instant| {
        let Decision::Admitted(p) = limiter.decide(&(), |_| Cost::ONE, Duration::ZERO, at) else {
            panic!("admitted")
        };
        p
    };
    let (same, later) = (admit(t), admit(t + Duration::from_nanos(1)));
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    same.finish(Some(ThrottleCause::Requests), None);
    assert_eq!(limiter.snapshot(&()).unwrap().throttles, 1);
    later.finish(Some(ThrottleCause::Requests), None);
    assert_eq!(limiter.snapshot(&()).unwrap().throttles, 2);
}

/// Keys: len, emptiness and evictions count both kinds of state (compact
/// words and full states); a key is idle only when every bucket is full and
/// it is not recovering; a slow start ramp does not keep a key.
#[tokio::test(start_paused = true)]
async fn keys_of_both_kinds_are_counted_and_evicted_when_idle() {
    let limiter: RateLimiter<u32> =
        RateLimiter::builder(Limits::requests(smooth(10))).build_keyed();
    assert!(limiter.is_keyed());
    assert!(!RateLimiter::new(Limits::requests(smooth(10))).is_keyed());
    assert!(limiter.is_empty());
    limiter.check(&1, Cost::ONE).unwrap();
    limiter.check(&2, Cost::ONE).unwrap();
    limiter.check(&3, Cost::ONE).unwrap();
    assert!(!limiter.is_empty());
    // Key 3 is upgraded to a full state by a throttle.
    assert!(limiter.throttled(&3, ThrottleCause::Requests));
    assert_eq!(limiter.len(), 3);
    // Words are full after 100 ms; key 3 recovers until 31 s.
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(limiter.evict_idle(), 2);
    assert_eq!((limiter.len(), limiter.evicted()), (1, 2));
    tokio::time::advance(Duration::from_secs(29)).await;
    assert_eq!(limiter.evict_idle(), 1);
    assert_eq!((limiter.len(), limiter.evicted()), (0, 3));
    assert!(
        RateLimiter::<u64>::bytes_per_key() >= std::mem::size_of::<(u64, u64)>(),
        "a key and its TAT"
    );

    // Full states: a key with tokens in debt is not idle though its
    // request bucket is full; one on a slow start ramp is, once full.
    let limiter: RateLimiter<u32> =
        RateLimiter::builder(Limits::requests(smooth(10)).and_tokens(smooth(1_000)))
            .slow_start(SlowStart::new(Duration::from_secs(100)))
            .build_keyed();
    limiter.check(&1, Cost::new(1, 2_000)).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(limiter.evict_idle(), 0);
    tokio::time::advance(Duration::from_secs(7)).await;
    assert_eq!(limiter.evict_idle(), 1);
    assert!(limiter.is_empty());
}

/// A keyed limiter with slow start gives each new key its ramp.
#[tokio::test(start_paused = true)]
async fn keyed_slow_start() {
    let limiter: RateLimiter<u32> = RateLimiter::builder(Limits::requests(smooth(10)))
        .slow_start(SlowStart::new(Duration::from_secs(10)))
        .build_keyed();
    for key in [1, 2] {
        limiter.check(&key, Cost::ONE).unwrap();
        assert_eq!(
            limiter.check(&key, Cost::ONE).unwrap_err().retry_after(),
            Some(400 * MS)
        );
    }
}

/// Without feedback, or for a local throttle, a request-only key stays a
/// word: nothing is tightened, nothing upgraded.
#[tokio::test(start_paused = true)]
async fn nothing_to_tighten_leaves_a_compact_key_compact() {
    let fulls = |l: &RateLimiter<u32>| {
        let d = format!("{l:?}");
        let at = d.find("fulls: Store").unwrap();
        d[at..].contains("keys: 0,")
    };
    let none: RateLimiter<u32> = RateLimiter::builder(Limits::requests(smooth(10)))
        .feedback(None)
        .build_keyed();
    let some: RateLimiter<u32> = RateLimiter::builder(Limits::requests(smooth(10))).build_keyed();
    none.check(&1, Cost::ONE).unwrap();
    some.check(&1, Cost::ONE).unwrap();
    assert!(!none.throttled(&1, ThrottleCause::Requests));
    assert!(!some.throttled(&1, ThrottleCause::Local));
    assert!(fulls(&none) && fulls(&some));
    assert!(some.throttled(&1, ThrottleCause::Requests));
    assert!(!fulls(&some));
}

/// After a full tightening, the calls already booked are re-paced at the
/// lowered rate, not only moved by the pause (issue 14, item 6): 200 calls
/// booked at 100 a second, a burst throttle half a second in (the key
/// pauses 1 s, then resumes at half the rate, recovering over 30 s). After
/// the pause, no second holds more calls than the recovering rate allows
/// (plus the burst of 1); every call goes, in booking order, and the queue
/// is done when the lowered rate has done its work (not later: nothing
/// starves). Translated only, the 149 calls left went at 100 a second.
/// A lone quota throttle's 2% step re-paces nothing.
#[tokio::test(start_paused = true)]
async fn a_full_tightening_re_paces_the_calls_already_booked() {
    let limiter = RateLimiter::builder(Limits::requests(smooth(100))).build();
    let start = Instant::now();
    let mut waiters = Vec::new();
    for i in 0..200 {
        let r = limiter
            .reserve(&(), Cost::ONE, Duration::from_secs(60))
            .unwrap();
        assert_eq!(r.ready_at(), start + i * 10 * MS);
        waiters.push(tokio::spawn(async move {
            let _admitted = r.ready().await;
            Instant::now()
        }));
    }
    // A lone quota throttle steps the rate down without moving a slot.
    let last = limiter
        .reserve(&(), Cost::ONE, Duration::from_secs(60))
        .unwrap();
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    assert_eq!(last.ready_at(), start + 2_000 * MS);
    drop(last);
    tokio::time::sleep(505 * MS).await;
    assert!(limiter.throttled(&(), ThrottleCause::Burst));
    let mut at = Vec::new();
    for w in waiters {
        at.push(w.await.unwrap() - start);
    }
    let resume = Duration::from_millis(1_505);
    let before = at.iter().filter(|t| **t < resume).count();
    assert_eq!(before, 51, "{at:?}");
    // Booking order kept.
    assert!(at.windows(2).all(|w| w[0] <= w[1]), "{at:?}");
    for (i, t) in at.iter().enumerate().filter(|(_, t)| **t >= resume) {
        let window = at[i..].iter().filter(|u| **u < *t + Duration::from_secs(1));
        // The rate at the window's end: half, recovering over 30 s.
        let rate = 0.5 + 0.5 * (*t + Duration::from_secs(1) - resume).as_secs_f64() / 30.0;
        let allowed = (100.0 * rate).ceil() as usize + 1;
        assert!(
            window.count() <= allowed,
            "call {i} at {t:?}: more than {allowed} in the second after it: {at:?}"
        );
    }
    // 149 calls of 10 ms at the recovering rate from half: 2.85 s of work.
    let end = at[199] - resume;
    assert!(
        end >= Duration::from_millis(2_800) && end <= Duration::from_millis(2_900),
        "{end:?}"
    );
}
