#![cfg(feature = "retry")]
//! Tests of the retry layer: tower-test mocks on tokio's paused clock (no
//! real sleeps; waits are measured exactly), and, with the `mock` feature,
//! the mock DashScope server over loopback.

#[path = "support.rs"]
mod support;

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
use tower_qwen::retry::{Backoff, Budget, Policy, Retry, RetryLayer};
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
        for b in whole[..split].as_bytes().chunks(1) {
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
