#![cfg(feature = "retry")]
//! Tests of the retry layer: tower-test mocks on tokio's paused clock (no
//! real sleeps; waits are measured exactly), and, with the `mock` feature,
//! the mock DashScope server over loopback.

#[path = "support.rs"]
mod support;

mod foreign;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{Layer, ServiceExt};
use tower_qwen::body::Body;
use tower_qwen::classify::{Classifier, Outcome, ThrottleCause};
use tower_qwen::retry::{Backoff, Budget, Hold, Policy, Retry, RetryLayer};
use tower_qwen::time::Deadline;
use tower_qwen::util::rng::SeededRng;
use tower_test::mock;

use support::*;

type Req = Request<Full<Bytes>>;
type Res = Response<TestBody>;
type Svc = Retry<mock::Mock<Req, Res>>;

const MS: fn(u64) -> Duration = Duration::from_millis;
const S: fn(u64) -> Duration = Duration::from_secs;
const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";

/// Exact waits: no jitter, a seeded source anyway.
fn layer() -> RetryLayer {
    RetryLayer::new()
        .rng(SeededRng::new(1))
        .backoff(Backoff::new().jitter(false))
}

fn setup(layer: RetryLayer) -> (Svc, mock::Handle<Req, Res>) {
    let (svc, handle) = mock::pair::<Req, Res>();
    (layer.layer(svc), handle)
}

fn req() -> Req {
    Request::post(NATIVE)
        .header("x-test", "1")
        .body(Full::new(Bytes::from_static(
            br#"{"model":"qwen-plus","input":{"prompt":"Hi"}}"#,
        )))
        .unwrap()
}

async fn text<B>(res: Response<B>) -> String
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Answers the next request and returns the time it arrived at.
async fn answer(h: &mut mock::Handle<Req, Res>, res: Res) -> Instant {
    let (_, send) = h.next_request().await.expect("a request");
    let at = Instant::now();
    send.send_response(res);
    at
}

// ---------------------------------------------------------------------------
// What is retried, and how long it waits

#[tokio::test(start_paused = true)]
async fn waits_follow_the_cause() {
    // (status, body, first wait, second wait) with jitter off: floor + the
    // exponential part (0.5 s, then 1 s).
    let cases = [
        (429, RATE_QUOTA, MS(1500), MS(2000)),
        (429, "", MS(1500), MS(2000)), // a plain 429: requests floor
        (429, ALLOCATION_QUOTA, MS(1500), MS(3000)), // tokens: 1 s, 2 s
        (429, BURST_RATE, MS(5500), MS(11_000)), // burst: 5 s, 10 s
        (503, UNAVAILABLE, MS(500), MS(1000)), // transient: exponential only
    ];
    for (status, body, first, second) in cases {
        let (svc, mut h) = setup(layer());
        let stats = svc.stats();
        let call = tokio::spawn(svc.oneshot(req()));
        let t0 = answer(&mut h, json(status, body)).await;
        let t1 = answer(&mut h, json(status, body)).await;
        assert_eq!(t1 - t0, first, "first wait after {status} {body}");
        let t2 = answer(&mut h, ok()).await;
        assert_eq!(t2 - t1, second, "second wait after {status} {body}");
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(text(res).await, OK_BODY);
        assert_eq!(
            (stats.requests(), stats.attempts(), stats.retries()),
            (1, 3, 2)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn jittered_waits_stay_within_the_cause_bounds() {
    for seed in 0..20 {
        let (svc, mut h) = setup(RetryLayer::new().rng(SeededRng::new(seed)));
        let call = tokio::spawn(svc.oneshot(req()));
        let t0 = answer(&mut h, json(429, RATE_QUOTA)).await;
        let t1 = answer(&mut h, ok()).await;
        let wait = t1 - t0;
        // At least the next one-second window, spread over half a second.
        assert!(wait >= S(1) && wait < MS(1500), "seed {seed}: {wait:?}");
        call.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn permanent_failures_are_not_retried() {
    for (status, body) in [
        (401, INVALID_KEY),
        (400, INVALID_PARAMETER),
        (400, ARREARAGE),
        (200, ARREARAGE), // a business error inside a 200
        (404, ""),
    ] {
        let (svc, mut h) = setup(layer());
        let stats = svc.stats();
        let call = tokio::spawn(svc.oneshot(req()));
        answer(&mut h, json(status, body)).await;
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), status);
        // The caller gets the answer whole.
        assert_eq!(text(res).await, body);
        assert_eq!(stats.attempts(), 1, "{status} {body}");
        assert_eq!(stats.retries(), 0);
        // And no second request ever comes.
        assert!(h.next_request().await.is_none());
    }
}

#[tokio::test(start_paused = true)]
async fn business_throttle_in_a_200_is_retried() {
    let (svc, mut h) = setup(layer());
    let call = tokio::spawn(svc.oneshot(req()));
    let t0 = answer(&mut h, json(200, RATE_QUOTA)).await;
    let t1 = answer(&mut h, ok()).await;
    assert_eq!(t1 - t0, MS(1500));
    assert_eq!(text(call.await.unwrap().unwrap()).await, OK_BODY);
}

#[tokio::test(start_paused = true)]
async fn success_bodies_that_mention_code_are_not_errors() {
    let body = r#"{"output":{"text":"the \"code\" and the \"error\" keys are fine here"},"request_id":"x"}"#;
    let (svc, mut h) = setup(layer());
    let stats = svc.stats();
    let call = tokio::spawn(svc.oneshot(req()));
    answer(&mut h, json(200, body)).await;
    assert_eq!(text(call.await.unwrap().unwrap()).await, body);
    assert_eq!(stats.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn max_retries_bound_the_attempts() {
    let (svc, mut h) = setup(layer().policy(Policy::new().max_retries(2)));
    let stats = svc.stats();
    let call = tokio::spawn(svc.oneshot(req()));
    for _ in 0..3 {
        answer(&mut h, json(503, UNAVAILABLE)).await;
    }
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(text(res).await, UNAVAILABLE);
    assert_eq!((stats.attempts(), stats.exhausted()), (3, 1));
    assert!(h.next_request().await.is_none());

    // Zero retries: sent once, the answer handed on untouched.
    let (svc, mut h) = setup(layer().policy(Policy::new().max_retries(0)));
    let call = tokio::spawn(svc.oneshot(req()));
    answer(&mut h, json(503, UNAVAILABLE)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert!(h.next_request().await.is_none());
}

/// Issue 14: setters behave one way. A setter configures the services the
/// layer makes from then on (a service made before keeps its policy), and
/// the stats taken before it count the calls of every service the layer
/// makes, before or after.
#[tokio::test(start_paused = true)]
async fn setters_never_change_services_already_made_nor_detach_the_stats() {
    let layer = layer().policy(Policy::new().max_retries(1));
    let stats = layer.stats();
    let (before, mut h1) = setup(layer.clone());
    let layer = layer.policy(Policy::new().max_retries(0));
    let (after, mut h2) = setup(layer);
    // Made before the setter: still retries once.
    let call = tokio::spawn(before.oneshot(req()));
    answer(&mut h1, json(503, UNAVAILABLE)).await;
    answer(&mut h1, ok()).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    // Made after: sends once.
    let call = tokio::spawn(after.oneshot(req()));
    answer(&mut h2, json(503, UNAVAILABLE)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert!(h2.next_request().await.is_none());
    // One set of stats for both.
    assert_eq!(
        (stats.requests(), stats.attempts(), stats.retries()),
        (2, 3, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn policy_switches_choose_what_retries() {
    let (svc, mut h) = setup(layer().policy(Policy::new().retry_transient(false)));
    let call = tokio::spawn(svc.oneshot(req()));
    answer(&mut h, json(503, UNAVAILABLE)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);

    let (svc, mut h) = setup(layer().policy(Policy::new().retry_throttled(false)));
    let call = tokio::spawn(svc.oneshot(req()));
    answer(&mut h, json(429, RATE_QUOTA)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 429);
}

#[tokio::test(start_paused = true)]
async fn errors_are_classified_and_retried() {
    let (svc, mut h) = setup(layer());
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let t0 = Instant::now();
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let t1 = answer(&mut h, ok()).await;
    assert_eq!(t1 - t0, MS(500));
    assert_eq!(call.await.unwrap().unwrap().status(), 200);

    // When retries run out, the caller gets the last error itself.
    let (svc, mut h) = setup(layer().policy(Policy::new().max_retries(1)));
    let call = tokio::spawn(svc.oneshot(req()));
    for _ in 0..2 {
        let (_, send) = h.next_request().await.unwrap();
        send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    }
    let err = call.await.unwrap().unwrap_err();
    let io = err
        .downcast_ref::<std::io::Error>()
        .expect("the inner error");
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
}

// ---------------------------------------------------------------------------
// Hostile headers

#[tokio::test(start_paused = true)]
async fn hostile_retry_after_headers_are_capped_or_ignored() {
    let cases: &[(&str, &str, Duration)] = &[
        ("retry-after", "99999999", S(60)),
        ("retry-after", "-5", MS(1500)),
        ("retry-after", "garbage", MS(1500)),
        ("retry-after", "NaN", MS(1500)),
        ("retry-after", "1e309", MS(1500)),
        ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT", S(60)),
        ("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT", S(0)),
        ("retry-after", "3", S(3)),
        ("retry-after-ms", "18446744073709551616", S(60)),
        ("retry-after-ms", "250", MS(250)),
        ("retry-after-ms", "-1", MS(1500)),
    ];
    for &(name, value, expected) in cases {
        let (svc, mut h) = setup(layer());
        let call = tokio::spawn(svc.oneshot(req()));
        let res = Response::builder()
            .status(429)
            .header(name, value)
            .header("content-type", "application/json")
            .body(chunks(&[RATE_QUOTA]))
            .unwrap();
        let t0 = answer(&mut h, res).await;
        let t1 = answer(&mut h, ok()).await;
        assert_eq!(t1 - t0, expected, "{name}: {value}");
        assert_eq!(call.await.unwrap().unwrap().status(), 200);
    }
}

#[tokio::test(start_paused = true)]
async fn a_tighter_classifier_cap_applies() {
    let (svc, mut h) = setup(layer().classifier(Classifier::new().max_retry_after(S(5))));
    let call = tokio::spawn(svc.oneshot(req()));
    let res = Response::builder()
        .status(503)
        .header("retry-after", "3600")
        .body(chunks(&[UNAVAILABLE]))
        .unwrap();
    let t0 = answer(&mut h, res).await;
    let t1 = answer(&mut h, ok()).await;
    assert_eq!(t1 - t0, S(5));
    call.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------
// The budget

#[tokio::test(start_paused = true)]
async fn budget_caps_retries_during_an_outage() {
    const N: u64 = 200;
    let (floor, ratio, window) = (2u32, 0.2f32, S(10));
    let budget = Budget::new(window, floor, ratio).unwrap();
    let (svc, mut h) = setup(
        layer()
            .policy(Policy::new().max_retries(10))
            .budget(budget.clone()),
    );
    let stats = svc.stats();
    let upstream = Arc::new(Mutex::new(0u64));
    let responder = {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            while let Some((_, send)) = h.next_request().await {
                *upstream.lock().unwrap() += 1;
                send.send_response(json(503, UNAVAILABLE));
            }
        })
    };
    let start = Instant::now();
    let calls: Vec<_> = (0..N)
        .map(|_| tokio::spawn(svc.clone().oneshot(req())))
        .collect();
    drop(svc);
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), 503);
    }
    let elapsed = start.elapsed();
    responder.await.unwrap();
    let upstream = *upstream.lock().unwrap();
    // Each window admits at most ratio × its requests + floor × window
    // retries; every request arrived in the first window.
    let windows = (elapsed.as_secs_f64() / window.as_secs_f64()).ceil() + 1.0;
    let bound =
        N as f64 * (1.0 + f64::from(ratio)) + f64::from(floor) * window.as_secs_f64() * windows;
    assert!(
        (upstream as f64) <= bound,
        "{upstream} upstream calls > {bound} ({elapsed:?})"
    );
    // Without the budget it would have been 11 calls per request.
    assert!(upstream < N * 2);
    assert!(stats.budget_denied() > 0);
    assert_eq!(stats.budget_denied(), budget.denied());
    assert_eq!(stats.attempts(), upstream);
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_budget() {
    // A reserve of exactly 10 retries, and requests earn nothing.
    let budget = Budget::new(S(10), 1, 0.0).unwrap();
    let (svc_a, mut h) = setup(
        layer()
            .policy(Policy::new().max_retries(1))
            .budget(budget.clone()),
    );
    let svc_b = svc_a.clone();
    let stats = svc_b.stats();
    let upstream = Arc::new(Mutex::new(0u64));
    let responder = {
        let upstream = upstream.clone();
        tokio::spawn(async move {
            while let Some((_, send)) = h.next_request().await {
                *upstream.lock().unwrap() += 1;
                send.send_response(json(503, UNAVAILABLE));
            }
        })
    };
    for _ in 0..10 {
        svc_a.clone().oneshot(req()).await.unwrap();
    }
    assert_eq!(*upstream.lock().unwrap(), 20);
    assert_eq!(budget.balance(tokio::time::Instant::now()), 0);
    // The other clone finds the budget spent.
    svc_b.oneshot(req()).await.unwrap();
    drop(svc_a);
    responder.await.unwrap();
    assert_eq!(*upstream.lock().unwrap(), 21);
    assert_eq!(stats.budget_denied(), 1);
    assert!(budget.is_exhausted());

    // A second layer given the same budget shares it too.
    let (svc_c, mut h) = setup(layer().budget(budget.clone()));
    let call = tokio::spawn(svc_c.oneshot(req()));
    answer(&mut h, json(503, UNAVAILABLE)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(budget.denied(), 2);
}

/// The budget is credited when a first attempt's answer arrives: a call
/// that waited longer than the budget's window inside (a rate limiter's
/// queue, a slow upstream) can still be retried. (Regression: the deposit
/// was made when the call arrived and had expired by then, so the demo's
/// queued calls lost their retries.)
#[tokio::test(start_paused = true)]
async fn a_call_slower_than_the_window_keeps_its_deposit() {
    let budget = Budget::new(S(10), 0, 1.0).unwrap();
    let (svc, mut h) = setup(layer().budget(budget.clone()));
    let stats = svc.stats();
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    tokio::time::sleep(S(20)).await;
    send.send_response(json(503, UNAVAILABLE));
    answer(&mut h, json(200, OK_BODY)).await;
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!((stats.retries(), stats.budget_denied()), (1, 0));
}

// ---------------------------------------------------------------------------
// Streams

#[tokio::test(start_paused = true)]
async fn stream_failing_before_its_first_frame_is_retried() {
    let (svc, mut h) = setup(layer());
    let call = tokio::spawn(svc.oneshot(req()));
    // A 200 event stream whose first frame is a throttling error.
    let t0 = answer(&mut h, sse(&[SSE_THROTTLED])).await;
    let t1 = answer(&mut h, sse(&[SSE_FRAME_1, SSE_FRAME_2])).await;
    assert_eq!(
        t1 - t0,
        MS(1500),
        "a requests throttle, read from the frame"
    );
    let res = call.await.unwrap().unwrap();
    assert_eq!(text(res).await, format!("{SSE_FRAME_1}{SSE_FRAME_2}"));
}

#[tokio::test(start_paused = true)]
async fn compatible_error_frame_first_is_retried() {
    let (svc, mut h) = setup(layer());
    let call = tokio::spawn(svc.oneshot(req()));
    let err = "data: {\"error\":{\"message\":\"You exceeded your current requests list.\",\"type\":\"limit_requests\",\"param\":null,\"code\":\"limit_requests\"},\"id\":\"chatcmpl-1\"}\n\n";
    answer(&mut h, sse(&[err])).await;
    let good = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\ndata: [DONE]\n\n";
    answer(&mut h, sse(&[good])).await;
    assert_eq!(text(call.await.unwrap().unwrap()).await, good);
}

#[tokio::test(start_paused = true)]
async fn stream_failing_after_its_first_frame_is_not_retried() {
    let (svc, mut h) = setup(layer());
    let stats = svc.stats();
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap(),
    );
    assert_pending!(call.poll());
    // The first frame arrives: the response is handed on at once.
    feed.data(SSE_FRAME_1);
    assert!(call.is_woken());
    let res = assert_ready_ok!(call.poll());
    let mut body = res.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, SSE_FRAME_1);
    // Then the stream fails: the caller sees the error frame, and then a
    // transport error; nothing is retried.
    feed.data(SSE_ERROR_500);
    let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(second, SSE_ERROR_500);
    feed.error("connection reset");
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "connection reset");
    drop(feed);
    assert!(body.frame().await.is_none());
    tokio::time::advance(S(60)).await;
    assert_eq!(stats.attempts(), 1);
    assert!(h.next_request().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn stream_reset_before_its_first_frame_is_retried() {
    let (svc, mut h) = setup(layer());
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap(),
    );
    feed.error("connection reset");
    let (_, send) = h.next_request().await.unwrap();
    // The failed answer was released before the wait.
    assert!(feed.is_closed());
    send.send_response(sse(&[SSE_FRAME_1]));
    assert_eq!(text(call.await.unwrap().unwrap()).await, SSE_FRAME_1);
}

#[tokio::test(start_paused = true)]
async fn peeked_bytes_are_replayed_in_order_whatever_the_split() {
    let whole = format!("{SSE_FRAME_1}{SSE_FRAME_2}");
    for split in [
        1,
        7,
        40,
        90,
        SSE_FRAME_1.len() - 3,
        SSE_FRAME_1.len(),
        whole.len() - 1,
    ] {
        let (svc, mut h) = setup(layer());
        let mut call = task::spawn(svc.oneshot(req()));
        assert_pending!(call.poll());
        let (_, send) = h.next_request().await.unwrap();
        let (feed, body) = live();
        send.send_response(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap(),
        );
        // Byte by byte up to the split: no complete data line yet unless the
        // split is past the first one.
        for b in whole.as_bytes()[..split].chunks(1) {
            feed.data(std::str::from_utf8(b).unwrap());
        }
        let first_data_line_end = SSE_FRAME_1.find("}\n").unwrap() + 2;
        if split < first_data_line_end {
            assert_pending!(call.poll());
        }
        feed.data(&whole[split..]);
        drop(feed);
        let res = call.await.unwrap();
        assert_eq!(text(res).await, whole, "split at {split}");
    }
}

// ---------------------------------------------------------------------------
// Holding frames that carry no output (#15)

const ROLE_CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"\",\"role\":\"assistant\"},\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"object\":\"chat.completion.chunk\",\"usage\":null,\"created\":1,\"system_fingerprint\":null,\"model\":\"qwen-plus\",\"id\":\"chatcmpl-1\"}\n\n";
const CONTENT_CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"},\"index\":0,\"logprobs\":null,\"finish_reason\":null}],\"object\":\"chat.completion.chunk\",\"id\":\"chatcmpl-1\"}\n\n";
const COMPAT_THROTTLED: &str = "data: {\"error\":{\"message\":\"You exceeded your current requests list.\",\"type\":\"limit_requests\",\"param\":null,\"code\":\"limit_requests\"},\"id\":\"chatcmpl-1\"}\n\n";

/// Sends a live event-stream answer to the next request.
async fn live_stream(h: &mut mock::Handle<Req, Res>) -> Feed {
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap(),
    );
    feed
}

#[tokio::test(start_paused = true)]
async fn an_error_right_after_the_role_only_chunk_is_retried() {
    let (svc, mut h) = setup(layer());
    let stats = svc.stats();
    let call = tokio::spawn(svc.oneshot(req()));
    let first = live_stream(&mut h).await;
    first.data(ROLE_CHUNK);
    first.data(COMPAT_THROTTLED);
    let good = format!("{ROLE_CHUNK}{CONTENT_CHUNK}data: [DONE]\n\n");
    answer(&mut h, sse(&[&good])).await;
    // The held role chunk of the failed attempt never reached the caller.
    assert_eq!(text(call.await.unwrap().unwrap()).await, good);
    assert!(first.is_closed());
    assert_eq!(stats.retries(), 1);
}

#[tokio::test(start_paused = true)]
async fn without_a_hold_the_role_only_chunk_commits_the_stream() {
    let (svc, mut h) = setup(layer().hold(Hold::NONE));
    let stats = svc.stats();
    let call = tokio::spawn(svc.oneshot(req()));
    let feed = live_stream(&mut h).await;
    feed.data(ROLE_CHUNK);
    feed.data(COMPAT_THROTTLED);
    drop(feed);
    assert_eq!(
        text(call.await.unwrap().unwrap()).await,
        format!("{ROLE_CHUNK}{COMPAT_THROTTLED}")
    );
    assert_eq!(stats.retries(), 0);
}

#[tokio::test(start_paused = true)]
async fn held_frames_go_on_in_order_with_the_first_output() {
    let (svc, mut h) = setup(layer());
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let feed = live_stream(&mut h).await;
    assert_pending!(call.poll());
    feed.data(ROLE_CHUNK);
    feed.data(": keep-alive\n\n");
    // Nothing with output yet: still held.
    assert_pending!(call.poll());
    feed.data(CONTENT_CHUNK);
    assert!(call.is_woken());
    let res = assert_ready_ok!(call.poll());
    feed.data("data: [DONE]\n\n");
    drop(feed);
    assert_eq!(
        text(res).await,
        format!("{ROLE_CHUNK}: keep-alive\n\n{CONTENT_CHUNK}data: [DONE]\n\n")
    );
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_after_its_time() {
    let (svc, mut h) = setup(layer().hold(Hold::new().time(S(3))));
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let feed = live_stream(&mut h).await;
    assert_pending!(call.poll());
    let t0 = Instant::now();
    feed.data(ROLE_CHUNK);
    assert_pending!(call.poll());
    tokio::time::advance(MS(2_999)).await;
    assert_pending!(call.poll());
    tokio::time::advance(MS(1)).await;
    assert!(call.is_woken());
    let res = assert_ready_ok!(call.poll());
    assert_eq!(t0.elapsed(), S(3));
    // Handed on as flowing: a later error is the caller's to see.
    feed.data(COMPAT_THROTTLED);
    drop(feed);
    assert_eq!(text(res).await, format!("{ROLE_CHUNK}{COMPAT_THROTTLED}"));
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_past_its_bytes() {
    let (svc, mut h) = setup(layer().hold(Hold::new().bytes(1_000)));
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let feed = live_stream(&mut h).await;
    let empty = "data: {\"choices\":[{\"delta\":{\"content\":\"\"},\"index\":0}]}\n\n";
    let mut sent = String::new();
    while sent.len() <= 1_000 {
        assert_pending!(call.poll());
        feed.data(empty);
        sent.push_str(empty);
    }
    let res = assert_ready_ok!(call.poll());
    drop(feed);
    assert_eq!(text(res).await, sent);
}

// ---------------------------------------------------------------------------
// Deadlines

#[tokio::test(start_paused = true)]
async fn no_wait_ends_past_the_deadline() {
    let (svc, mut h) = setup(layer().deadline(S(2)));
    let stats = svc.stats();
    let call = tokio::spawn(svc.oneshot(req()));
    let (r, send) = h.next_request().await.unwrap();
    // The deadline travels with the request, for the layers further in.
    let d = Deadline::of(&r).expect("a deadline extension");
    assert_eq!(d.remaining(), S(2));
    let t0 = Instant::now();
    // A burst throttle waits 5.5 s: past the deadline, so no wait at all.
    send.send_response(json(429, BURST_RATE));
    let res = call.await.unwrap().unwrap();
    assert_eq!(t0.elapsed(), Duration::ZERO);
    assert_eq!(res.status(), 429);
    assert_eq!(text(res).await, BURST_RATE);
    assert_eq!(stats.deadline_gave_up(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_in_the_request_is_honoured() {
    let (svc, mut h) = setup(layer());
    let mut r = req();
    Deadline::after(S(1)).tighten(&mut r);
    let call = tokio::spawn(svc.oneshot(r));
    let t0 = answer(&mut h, json(503, UNAVAILABLE)).await;
    // 0.5 s fits; the next wait (1 s) would not.
    let t1 = answer(&mut h, json(503, UNAVAILABLE)).await;
    assert_eq!(t1 - t0, MS(500));
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert!(h.next_request().await.is_none());

    // A layer deadline later than the request's keeps the request's.
    let (svc, mut h) = setup(layer().deadline(S(60)));
    let mut r = req();
    Deadline::after(S(1)).tighten(&mut r);
    let call = tokio::spawn(svc.oneshot(r));
    let (r, send) = h.next_request().await.unwrap();
    assert_eq!(Deadline::of(&r).unwrap().remaining(), S(1));
    send.send_response(ok());
    call.await.unwrap().unwrap();
}

// ---------------------------------------------------------------------------
// Request bodies

#[tokio::test(start_paused = true)]
async fn every_attempt_sends_the_same_request() {
    let (svc, mut h) = setup(layer());
    let call = tokio::spawn(svc.oneshot(req()));
    let mut seen = Vec::new();
    for res in [json(503, UNAVAILABLE), json(429, RATE_QUOTA), ok()] {
        let (r, send) = h.next_request().await.unwrap();
        let (parts, body) = r.into_parts();
        seen.push((
            parts.method,
            parts.uri,
            parts.headers,
            body.collect().await.unwrap().to_bytes(),
        ));
        send.send_response(res);
    }
    call.await.unwrap().unwrap();
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(seen[0].2["x-test"], "1");
}

type BodyReq = Request<Body>;

fn stream_body(parts: &[&'static str]) -> Body {
    let frames = parts
        .iter()
        .map(|p| {
            Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from_static(
                p.as_bytes(),
            )))
        })
        .collect::<Vec<_>>();
    Body::stream(http_body_util::StreamBody::new(futures_util::stream::iter(
        frames,
    )))
}

#[tokio::test(start_paused = true)]
async fn streamed_request_bodies_are_buffered_and_replayed() {
    let (svc, mut h) = mock::pair::<BodyReq, Res>();
    let svc = layer().layer(svc);
    let stats = svc.stats();
    let r = Request::post(NATIVE)
        .body(stream_body(&["{\"model\":", "\"qwen-plus\"}"]))
        .unwrap();
    let call = tokio::spawn(svc.oneshot(r));
    for res in [json(503, UNAVAILABLE), ok()] {
        let (r, send) = h.next_request().await.unwrap();
        let body = r.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(body, "{\"model\":\"qwen-plus\"}");
        send.send_response(res);
    }
    assert_eq!(call.await.unwrap().unwrap().status(), 200);
    assert_eq!((stats.attempts(), stats.sent_once()), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn streamed_request_bodies_over_the_cap_are_sent_once_whole() {
    let (svc, mut h) = mock::pair::<BodyReq, Res>();
    let svc = layer().buffer_limit(8).layer(svc);
    let stats = svc.stats();
    let r = Request::post(NATIVE)
        .body(stream_body(&[
            "{\"model\":",
            "\"qwen-plus\",",
            "\"input\":{}}",
        ]))
        .unwrap();
    let call = tokio::spawn(svc.oneshot(r));
    let (r, send) = h.next_request().await.unwrap();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "{\"model\":\"qwen-plus\",\"input\":{}}");
    send.send_response(json(503, UNAVAILABLE));
    // Not retried: the caller gets the 503, and the counters say why.
    assert_eq!(call.await.unwrap().unwrap().status(), 503);
    assert_eq!(stats.sent_once(), 1);
    assert_eq!(stats.not_replayable(), 1);
    assert!(h.next_request().await.is_none());
}

// ---------------------------------------------------------------------------
// The service contract

#[tokio::test(start_paused = true)]
async fn readiness_is_passed_through_and_wakes() {
    let (mut svc, mut h) = mock::spawn_layer::<Req, Res, _>(layer());
    h.allow(0);
    assert_pending!(svc.poll_ready());
    h.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(req()));
    assert_pending!(call.poll());
    let (_, send) = h.next_request().await.unwrap();
    send.send_response(json(503, UNAVAILABLE));
    // The retry waits out its backoff, then waits for readiness.
    assert_pending!(call.poll());
    tokio::time::advance(S(1)).await;
    assert_pending!(call.poll());
    assert!(h.poll_request().is_pending());
    h.allow(1);
    assert!(call.is_woken());
    assert_pending!(call.poll());
    let (_, send) = h.next_request().await.unwrap();
    send.send_response(ok());
    assert_eq!(assert_ready_ok!(call.poll()).status(), 200);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_mid_backoff_cancels_cleanly() {
    let (svc, mut h) = setup(layer());
    let stats = svc.stats();
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    answer(&mut h, json(503, UNAVAILABLE)).await;
    assert_pending!(call.poll()); // now in its 0.5 s backoff
    assert_eq!(stats.retries(), 1);
    drop(call);
    tokio::time::advance(S(60)).await;
    // The service clone and the request went with the future: no request
    // comes, and the handle sees every service gone.
    assert!(h.next_request().await.is_none());
    assert_eq!(stats.attempts(), 1);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_response_body_drops_the_upstream_body() {
    let (svc, mut h) = setup(layer());
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(
        Response::builder()
            .header("content-type", "text/event-stream")
            .body(body)
            .unwrap(),
    );
    feed.data(SSE_FRAME_1);
    let res = assert_ready_ok!(call.poll());
    assert!(!feed.is_closed());
    drop(res);
    assert!(feed.is_closed());
}

#[test]
fn service_and_future_are_send() {
    fn assert_send<T: Send>() {}
    fn assert_sync<T: Sync>() {}
    assert_send::<Svc>();
    assert_send::<<Svc as tower::Service<Req>>::Future>();
    assert_sync::<RetryLayer>();
    assert_send::<tower_qwen::retry::PeekBody<TestBody>>();
}

// ---------------------------------------------------------------------------
// Tracing

// A global subscriber that records events only on threads that asked for it:
// with a per-test scoped subscriber, callsites first hit by tests running on
// other threads cache "no interest" and events go missing.
thread_local! {
    static CAPTURED: std::cell::RefCell<Option<Vec<String>>> = const { std::cell::RefCell::new(None) };
}

struct Capture;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct V(String);
        impl tracing::field::Visit for V {
            fn record_debug(&mut self, f: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0.push_str(&format!("{}={:?} ", f.name(), v));
            }
        }
        CAPTURED.with(|c| {
            if let Some(events) = c.borrow_mut().as_mut() {
                let mut v = V(String::new());
                event.record(&mut v);
                events.push(v.0);
            }
        });
    }
}

fn start_capture() {
    use tracing_subscriber::layer::SubscriberExt;
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        tracing::subscriber::set_global_default(tracing_subscriber::registry().with(Capture))
            .expect("no other global subscriber in this test binary");
    });
    CAPTURED.with(|c| *c.borrow_mut() = Some(Vec::new()));
}

fn captured() -> Vec<String> {
    CAPTURED.with(|c| c.borrow_mut().take().unwrap_or_default())
}

#[tokio::test(start_paused = true)]
async fn every_retry_is_a_tracing_event_with_attempt_wait_and_outcome() {
    start_capture();
    let (svc, mut h) = setup(layer().policy(Policy::new().max_retries(1)));
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    answer(&mut h, json(429, RATE_QUOTA)).await;
    assert_pending!(call.poll());
    tokio::time::advance(MS(1500)).await;
    assert_pending!(call.poll());
    answer(&mut h, json(429, RATE_QUOTA)).await;
    assert_eq!(assert_ready_ok!(call.poll()).status(), 429);
    let events = captured();
    assert!(
        events.iter().any(|e| e.contains("attempt=1")
            && e.contains("wait_ms=1500")
            && e.contains("throttled (Requests)")),
        "{events:#?}"
    );
    assert!(
        events
            .iter()
            .any(|e| e.contains("attempt=2") && e.contains("all attempts used")),
        "{events:#?}"
    );
}

#[test]
fn outcome_sanity() {
    // The constants above classify as the tests assume.
    let c = Classifier::new();
    let h = http::HeaderMap::new();
    assert_eq!(
        c.classify(StatusCode::TOO_MANY_REQUESTS, &h, BURST_RATE.as_bytes()),
        Outcome::throttled(ThrottleCause::Burst)
    );
    assert_eq!(
        c.classify(
            StatusCode::TOO_MANY_REQUESTS,
            &h,
            ALLOCATION_QUOTA.as_bytes()
        ),
        Outcome::throttled(ThrottleCause::Tokens)
    );
}

// ---------------------------------------------------------------------------
// Against the mock DashScope server (loopback, paused clock)

#[cfg(feature = "mock")]
mod against_the_mock {
    use std::collections::BTreeMap;
    use std::num::NonZeroU32;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use bytes::Bytes;
    use futures_util::future::join_all;
    use http::{Request, Response};
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use tokio::time::Instant;
    use tower::{BoxError, Service, ServiceExt};
    use tower_qwen::mock::{ApiError, Fault, FaultPlan, MockDashScope, MockHandle, Quota};
    use tower_qwen::retry::{Backoff, Budget, Policy, RetryLayer};
    use tower_qwen::util::rng::SeededRng;

    const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";
    const KEY: &str = "sk-retry";

    /// One upstream call: which request, when, and what came back.
    type Log = Arc<Mutex<Vec<(String, Instant, u16)>>>;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    async fn mock(quota: Quota, faults: FaultPlan) -> MockHandle {
        MockDashScope::builder()
            .key(KEY, "account")
            .quota("qwen-plus", quota)
            .faults(faults)
            .seed(7)
            .start()
            .await
            .expect("mock starts")
    }

    /// The hyper client, recording every upstream call.
    fn upstream(
        log: Log,
    ) -> impl Service<
        Request<Full<Bytes>>,
        Response = Response<Incoming>,
        Error = hyper_util::client::legacy::Error,
        Future = impl Send,
    > + Clone
    + Send {
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        tower::service_fn(move |req: Request<Full<Bytes>>| {
            let client = client.clone();
            let log = log.clone();
            async move {
                let id = req.headers()["x-test-id"].to_str().unwrap().to_owned();
                let res = client.request(req).await?;
                log.lock()
                    .unwrap()
                    .push((id, Instant::now(), res.status().as_u16()));
                Ok(res)
            }
        })
    }

    fn request(
        m: &MockHandle,
        id: usize,
        key: &str,
        body: &'static str,
        stream: bool,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::post(format!("{}{NATIVE}", m.base_url()))
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .header("x-test-id", id.to_string());
        if stream {
            b = b.header("x-dashscope-sse", "enable");
        }
        b.body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap()
    }

    const BODY: &str = r#"{"model":"qwen-plus","input":{"messages":[{"role":"user","content":"Hello"}]},"parameters":{"result_format":"message","incremental_output":true}}"#;

    async fn read(res: Response<impl http_body::Body<Error = impl Into<BoxError>>>) -> String {
        let bytes = res
            .into_body()
            .collect()
            .await
            .map_err(Into::into)
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_429_storm_heals_within_the_attempts_allowed() {
        // 2 requests per second; 8 callers at once.
        let m = mock(Quota::per_minute(nz(120)), FaultPlan::new()).await;
        let log = Log::default();
        let layer = RetryLayer::new()
            .policy(Policy::new().max_retries(5))
            .rng(SeededRng::new(3));
        let stats = layer.stats();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(upstream(log.clone()));
        let answers =
            join_all((0..8).map(|i| svc.clone().oneshot(request(&m, i, KEY, BODY, false)))).await;
        for a in answers {
            let res = a.unwrap();
            assert_eq!(res.status(), 200);
            assert!(read(res).await.contains("\"finish_reason\":\"stop\""));
        }
        let log = log.lock().unwrap().clone();
        let mut by_request: BTreeMap<String, Vec<(Instant, u16)>> = BTreeMap::new();
        for (id, at, status) in &log {
            by_request
                .entry(id.clone())
                .or_default()
                .push((*at, *status));
        }
        let stats_m = m.stats();
        assert!(stats_m.status(429) > 0, "the quota throttled some calls");
        assert_eq!(stats_m.status(429), stats.retries());
        assert_eq!(stats_m.requests, stats.attempts());
        assert_eq!(stats_m.code("Throttling.RateQuota"), stats_m.status(429));
        for (id, calls) in by_request {
            assert!(calls.len() <= 6, "request {id}: {calls:?}");
            assert_eq!(calls.last().unwrap().1, 200);
            // Waits follow the cause: a requests throttle is retried no
            // sooner than the next one-second window.
            for w in calls.windows(2) {
                assert_eq!(w[0].1, 429);
                assert!(
                    w[1].0 - w[0].0 >= Duration::from_secs(1),
                    "request {id}: {calls:?}"
                );
            }
        }
        m.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn unauthorized_and_invalid_requests_are_sent_once() {
        let m = mock(Quota::unlimited(), FaultPlan::new()).await;
        let log = Log::default();
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new().rng(SeededRng::new(1)))
            .service(upstream(log.clone()));
        let res = svc
            .clone()
            .oneshot(request(&m, 1, "sk-wrong", BODY, false))
            .await
            .unwrap();
        assert_eq!(res.status(), 401);
        assert!(read(res).await.contains("InvalidApiKey"));
        assert_eq!(m.stats().requests, 1);
        let res = svc
            .oneshot(request(&m, 2, KEY, "{not json", false))
            .await
            .unwrap();
        assert_eq!(res.status(), 400);
        assert!(read(res).await.contains("InvalidParameter"));
        assert_eq!(m.stats().requests, 2);
        assert_eq!(log.lock().unwrap().len(), 2);
        m.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_throttled_in_its_first_frame_is_retried() {
        // 1 request per second; throttled native streams answer 200 with an
        // `event:error` first frame.
        let m = mock(
            Quota::per_minute(nz(60)),
            FaultPlan::new().throttled_stream_as_sse(1.0),
        )
        .await;
        let log = Log::default();
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new().rng(SeededRng::new(1)))
            .service(upstream(log.clone()));
        let answers =
            join_all((0..2).map(|i| svc.clone().oneshot(request(&m, i, KEY, BODY, true)))).await;
        for a in answers {
            let res = a.unwrap();
            assert_eq!(res.status(), 200);
            let wire = read(res).await;
            assert!(!wire.contains("event:error"), "{wire}");
            assert!(wire.contains("\"finish_reason\":\"stop\""), "{wire}");
        }
        let s = m.stats();
        assert_eq!(s.code("Throttling.RateQuota"), 1);
        assert_eq!(s.requests, 3);
        // Every upstream answer was a 200: the error was in the stream.
        assert!(
            log.lock()
                .unwrap()
                .iter()
                .all(|(_, _, status)| *status == 200)
        );
        m.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_failing_after_its_first_frame_reaches_the_caller() {
        let plan = FaultPlan::new().with(
            Fault::StreamError {
                after_tokens: 2,
                error: ApiError::internal_error(),
            },
            1.0,
        );
        let m = mock(Quota::unlimited(), plan).await;
        let svc = tower::ServiceBuilder::new()
            .layer(RetryLayer::new().rng(SeededRng::new(1)))
            .service(upstream(Log::default()));
        let res = svc.oneshot(request(&m, 1, KEY, BODY, true)).await.unwrap();
        assert_eq!(res.status(), 200);
        let wire = read(res).await;
        assert!(wire.contains("event:result"), "{wire}");
        assert!(
            wire.contains("event:error") && wire.contains("InternalError"),
            "{wire}"
        );
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(m.stats().requests, 1);
        m.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_upstream_calls_in_a_503_outage() {
        const N: u64 = 50;
        let plan = FaultPlan::new().with(Fault::Error(ApiError::service_unavailable()), 1.0);
        let m = mock(Quota::unlimited(), plan).await;
        let budget = Budget::new(Duration::from_secs(10), 1, 0.2).unwrap();
        let layer = RetryLayer::new()
            .policy(Policy::new().max_retries(10))
            .backoff(Backoff::new())
            .budget(budget.clone())
            .rng(SeededRng::new(5));
        let stats = layer.stats();
        let svc = tower::ServiceBuilder::new()
            .layer(layer)
            .service(upstream(Log::default()));
        let start = Instant::now();
        let answers = join_all(
            (0..N as usize).map(|i| svc.clone().oneshot(request(&m, i, KEY, BODY, false))),
        )
        .await;
        let elapsed = start.elapsed();
        for a in answers {
            assert_eq!(a.unwrap().status(), 503);
        }
        let calls = m.stats().requests;
        let windows = (elapsed.as_secs_f64() / 10.0).ceil() + 1.0;
        let bound = N as f64 * 1.2 + 1.0 * 10.0 * windows;
        assert!(
            (calls as f64) <= bound,
            "{calls} calls > {bound} ({elapsed:?})"
        );
        assert!(stats.budget_denied() > 0);
        assert_eq!(stats.attempts(), calls);
        m.shutdown().await;
    }
}

// ---------------------------------------------------------------------------
// With the timeout layer inside

#[cfg(feature = "timeout")]
mod with_timeouts {
    use super::*;
    use tower_qwen::timeout::TimeoutLayer;

    #[tokio::test(start_paused = true)]
    async fn a_stream_stalled_before_its_first_frame_is_cut_and_retried() {
        let (mock_svc, mut h) = mock::pair::<Req, Res>();
        let svc = tower::ServiceBuilder::new()
            .layer(layer())
            .layer(TimeoutLayer::none().idle(S(10)))
            .service(mock_svc);
        let call = tokio::spawn(svc.oneshot(req()));
        let (_, send) = h.next_request().await.unwrap();
        let (stalled, body) = live();
        send.send_response(
            Response::builder()
                .header("content-type", "text/event-stream")
                .body(body)
                .unwrap(),
        );
        let t0 = Instant::now();
        // Cut after 10 s of silence, then retried after 0.5 s.
        let t1 = answer(&mut h, sse(&[SSE_FRAME_1, SSE_FRAME_2])).await;
        assert_eq!(t1 - t0, MS(10_500));
        assert!(stalled.is_closed());
        let res = call.await.unwrap().unwrap();
        assert_eq!(text(res).await, format!("{SSE_FRAME_1}{SSE_FRAME_2}"));
    }

    #[tokio::test(start_paused = true)]
    async fn header_timeouts_are_retried_and_the_deadline_bounds_all_attempts() {
        let (mock_svc, mut h) = mock::pair::<Req, Res>();
        let svc = tower::ServiceBuilder::new()
            .layer(layer().deadline(S(25)).policy(Policy::new().max_retries(5)))
            .layer(TimeoutLayer::none().header(S(10)))
            .service(mock_svc);
        let start = Instant::now();
        let call = tokio::spawn(svc.oneshot(req()));
        // Nothing answers: 10 s header timeout, 0.5 s wait, 10 s, 1 s wait,
        // then the third attempt is cut by the 25 s deadline itself.
        let mut pending = Vec::new();
        for _ in 0..3 {
            pending.push(h.next_request().await.unwrap());
        }
        let err = call.await.unwrap().unwrap_err();
        assert!(
            err.is::<tower_qwen::timeout::error::DeadlineExceeded>(),
            "{err}"
        );
        assert_eq!(start.elapsed(), S(25));
        drop(pending);
    }
}
