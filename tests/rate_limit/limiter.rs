//! The in-memory limiter at its edges (issue 19): what it reports (limits,
//! remaining, resets, waits, rates, headers), which quota refused, the
//! feedback settings, ramps, keys and eviction, each pinned to an exact
//! number, so that a changed comparison or operator fails a test. Paused
//! time throughout.

use std::time::Duration;

use tower_qwen::classify::ThrottleCause;
use tower_qwen::rate_limit::{Cost, Feedback, Limits, Quota, RateLimiter, SlowStart};

use super::{MS, nz, smooth};

fn rate(limiter: &RateLimiter, tokens: bool) -> f64 {
    let s = limiter.snapshot(&()).unwrap();
    if tokens { s.tokens } else { s.requests }.unwrap().rate
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-3
}

/// The feedback settings each count: the pause, the rate factor, the
/// floor and the recovery.
#[tokio::test(start_paused = true)]
async fn feedback_pause_factor_floor_and_recovery() {
    let limiter = RateLimiter::builder(Limits::requests(smooth(10)))
        .feedback(
            Feedback::new()
                .pause(Duration::from_millis(300))
                .rate_factor(0.25)
                .min_rate(0.2)
                .recover_over(Duration::from_secs(100)),
        )
        .build();
    limiter.check(&(), Cost::ONE).unwrap();
    assert!(limiter.throttled(&(), ThrottleCause::Requests));
    // Paused for 300 ms, the 100 ms of debt after it; a quarter of the rate
    // when the pause ends.
    let err = limiter.check(&(), Cost::ONE).unwrap_err();
    assert_eq!(err.retry_after(), Some(400 * MS));
    assert_eq!(rate(&limiter, false), 0.25);
    tokio::time::advance(400 * MS).await;
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
    // Busy for 10 s: the rate climbs (a tenth of the way to full).
    for _ in 0..20 {
        tokio::time::advance(Duration::from_millis(500)).await;
        limiter.check(&(), Cost::ONE).unwrap();
    }
    assert!(
        close(rate(&limiter, false), 0.55),
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
