#![cfg(feature = "timeout")]
//! Tests of the timeout layer, on tokio's paused clock with tower-test mocks
//! and channel-fed bodies: no real sleeps, exact times.

#[path = "../retry/support.rs"]
mod support;

use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_err, assert_ready_ok, task};
use tower::{Layer, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::classify::Classifier;
use tower_qwen::time::Deadline;
use tower_qwen::timeout::error::{DeadlineExceeded, HeaderTimeout, IdleTimeout};
use tower_qwen::timeout::{Timeout, TimeoutBody, TimeoutLayer};
use tower_test::mock;

use support::*;

type Req = Request<String>;
type Res = Response<TestBody>;
type Svc = Timeout<mock::Mock<Req, Res>>;

const S: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

fn setup(layer: TimeoutLayer) -> (Svc, mock::Handle<Req, Res>) {
    let (svc, handle) = mock::pair::<Req, Res>();
    (layer.layer(svc), handle)
}

fn req() -> Req {
    Request::new(String::from("{}"))
}

fn stream(body: TestBody) -> Res {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(body)
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn header_timeout_fires_when_no_headers_come() {
    let (svc, mut h) = setup(TimeoutLayer::none().header(S(30)));
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(req()));
    let (_r, _send) = h.next_request().await.unwrap(); // never answered
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), S(30));
    let timeout = err
        .downcast_ref::<HeaderTimeout>()
        .expect("a HeaderTimeout");
    assert_eq!(timeout.timeout(), S(30));
    assert_eq!(err.to_string(), "no response headers within 30s");
    assert!(Classifier::new().classify_error(&err).is_transient());
}

#[tokio::test(start_paused = true)]
async fn headers_in_time_pass_and_the_header_timer_stops() {
    let (svc, mut h) = setup(TimeoutLayer::none().header(S(30)));
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let (_, send) = h.next_request().await.unwrap();
    advance(S(29)).await;
    assert_pending!(call.poll());
    let (feed, body) = live();
    send.send_response(stream(body));
    let res = assert_ready_ok!(call.poll());
    // The header timeout does not reach into the body.
    let mut body = res.into_body();
    let mut next = task::spawn(body.frame());
    assert_pending!(next.poll());
    advance(S(600)).await;
    assert_pending!(next.poll());
    feed.data("data: {}\n\n");
    assert!(next.is_woken());
    assert!(assert_ready!(next.poll()).unwrap().unwrap().is_data());
}

#[tokio::test(start_paused = true)]
async fn a_stalled_stream_is_cut_with_an_idle_timeout_in_the_body() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(20)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    feed.data("data: 1\n\n");
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let stalled_at = Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(stalled_at.elapsed(), S(20));
    assert_eq!(err.downcast_ref::<IdleTimeout>().unwrap().timeout(), S(20));
    assert!(Classifier::new().classify_error(&err).is_transient());
    // Cut for good: the body ends, even if the upstream wakes up again.
    feed.data("data: late\n\n");
    assert!(body.frame().await.is_none());
    assert!(http_body::Body::is_end_stream(&body));
}

#[tokio::test(start_paused = true)]
async fn a_slow_but_steady_stream_is_never_cut() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(10)).header(S(5)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    let start = Instant::now();
    let producer = tokio::spawn(async move {
        for i in 0..30 {
            tokio::time::sleep(MS(9_900)).await;
            feed.data(&format!("data: {i}\n\n"));
        }
    });
    let mut frames = 0;
    while let Some(frame) = body.frame().await {
        frame.expect("never cut");
        frames += 1;
    }
    producer.await.unwrap();
    assert_eq!(frames, 30);
    // Five minutes of stream under a ten-second idle timeout.
    assert_eq!(start.elapsed(), MS(297_000));
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_also_bounds_the_wait_for_the_first_frame() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(15)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (_feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    let start = Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(err.is::<IdleTimeout>());
    assert_eq!(start.elapsed(), S(15));
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_covers_the_body() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(10)).total(S(60)));
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    let producer = tokio::spawn(async move {
        loop {
            tokio::time::sleep(S(5)).await;
            feed.data("data: {}\n\n");
        }
    });
    let mut frames = 0;
    let err = loop {
        match body.frame().await.unwrap() {
            Ok(_) => frames += 1,
            Err(e) => break e,
        }
    };
    producer.abort();
    assert_eq!(start.elapsed(), S(60));
    assert_eq!(frames, 11);
    let d = err
        .downcast_ref::<DeadlineExceeded>()
        .expect("a DeadlineExceeded");
    assert!(d.is_during_body());
    assert!(Classifier::new().classify_error(&err).is_transient());
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_cuts_even_frames_that_are_always_ready() {
    let (svc, mut h) = setup(TimeoutLayer::none().total(S(10)));
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll()); // the deadline timer is armed
    let (_, send) = h.next_request().await.unwrap();
    send.send_response(stream(chunks(&["a", "b", "c"])));
    let mut body = assert_ready_ok!(call.poll()).into_body();
    assert!(body.frame().await.unwrap().is_ok());
    // The caller dawdles past the deadline; frames are still ready.
    advance(S(11)).await;
    let err = body.frame().await.unwrap().unwrap_err();
    assert!(
        err.downcast_ref::<DeadlineExceeded>()
            .unwrap()
            .is_during_body()
    );
    assert!(body.frame().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn idle_time_counts_only_while_waiting_for_the_upstream() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(10)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    // The caller takes a minute before its first poll: not the upstream's
    // silence.
    advance(S(60)).await;
    let mut next = task::spawn(body.frame());
    assert_pending!(next.poll());
    advance(S(9)).await;
    assert_pending!(next.poll());
    feed.data("data: {}\n\n");
    assert!(assert_ready!(next.poll()).unwrap().is_ok());
    drop(next);
    let start = Instant::now();
    assert!(body.frame().await.unwrap().unwrap_err().is::<IdleTimeout>());
    assert_eq!(start.elapsed(), S(10));
}

#[tokio::test(start_paused = true)]
async fn the_total_deadline_before_headers_wins_over_the_header_timeout() {
    let (svc, mut h) = setup(TimeoutLayer::none().header(S(30)).total(S(10)));
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(req()));
    let _pending = h.next_request().await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert_eq!(start.elapsed(), S(10));
    let d = err.downcast_ref::<DeadlineExceeded>().unwrap();
    assert!(!d.is_during_body());
}

#[tokio::test(start_paused = true)]
async fn a_deadline_in_the_request_is_honoured() {
    // No total configured: the request's own deadline applies.
    let (svc, mut h) = setup(TimeoutLayer::none().header(S(30)));
    let mut r = req();
    Deadline::after(S(3)).tighten(&mut r);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(r));
    let _pending = h.next_request().await.unwrap();
    let err = call.await.unwrap().unwrap_err();
    assert!(err.is::<DeadlineExceeded>());
    assert_eq!(start.elapsed(), S(3));

    // A later configured total does not loosen an earlier request deadline,
    // and an earlier configured total wins over a later request deadline.
    for (total, in_request) in [(S(100), S(3)), (S(3), S(100))] {
        let (svc, mut h) = setup(TimeoutLayer::none().total(total));
        let mut r = req();
        Deadline::after(in_request).tighten(&mut r);
        let start = Instant::now();
        let call = tokio::spawn(svc.oneshot(r));
        let _pending = h.next_request().await.unwrap();
        assert!(call.await.unwrap().unwrap_err().is::<DeadlineExceeded>());
        assert_eq!(start.elapsed(), S(3));
    }
}

#[tokio::test(start_paused = true)]
async fn no_timeouts_means_no_cut() {
    let (svc, mut h) = setup(TimeoutLayer::none());
    let mut call = task::spawn(svc.oneshot(req()));
    assert_pending!(call.poll());
    let (r, send) = h.next_request().await.unwrap();
    assert!(Deadline::of(&r).is_none());
    advance(S(3600)).await;
    assert_pending!(call.poll());
    send.send_response(json(200, OK_BODY));
    let res = assert_ready_ok!(call.poll());
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes, OK_BODY);
}

#[tokio::test(start_paused = true)]
async fn inner_errors_pass_through() {
    let (svc, mut h) = setup(TimeoutLayer::none().header(S(1)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    send.send_error(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    let err = call.await.unwrap().unwrap_err();
    let io = err.downcast_ref::<std::io::Error>().unwrap();
    assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);

    // And body errors too.
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(1)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    feed.error("reset by peer");
    let mut body = call.await.unwrap().unwrap().into_body();
    let err: BoxError = body.frame().await.unwrap().unwrap_err();
    assert_eq!(err.to_string(), "reset by peer");
}

#[tokio::test(start_paused = true)]
async fn readiness_and_wakeups_pass_through() {
    let (mut svc, mut h) = mock::spawn_layer::<Req, Res, _>(TimeoutLayer::none().header(S(1)));
    h.allow(0);
    assert_pending!(svc.poll_ready());
    h.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
    let mut call = task::spawn(svc.call(req()));
    assert_pending!(call.poll());
    advance(S(1)).await;
    assert!(call.is_woken());
    let err = assert_ready_err!(call.poll());
    assert!(err.is::<HeaderTimeout>());
    // An error from poll_ready is boxed.
    h.send_error(std::io::Error::other("broken"));
    let err = assert_ready_err!(svc.poll_ready());
    assert_eq!(err.to_string(), "broken");
}

#[tokio::test(start_paused = true)]
async fn dropping_the_body_drops_the_upstream_body() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(S(1)).total(S(10)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let res = call.await.unwrap().unwrap();
    assert!(!feed.is_closed());
    drop(res);
    assert!(feed.is_closed());
}

#[tokio::test(start_paused = true)]
async fn many_fast_frames_pass_without_cuts() {
    let (svc, mut h) = setup(TimeoutLayer::none().idle(MS(50)).total(S(3600)));
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    let producer = tokio::spawn(async move {
        for _ in 0..2_000 {
            tokio::time::sleep(MS(40)).await;
            feed.data("x");
        }
    });
    let mut n = 0;
    while let Some(f) = body.frame().await {
        f.unwrap();
        n += 1;
    }
    producer.await.unwrap();
    assert_eq!(n, 2_000);
}

#[test]
fn types_are_send_and_bodies_unpin() {
    fn send<T: Send>() {}
    fn unpin<T: Unpin>() {}
    send::<Svc>();
    send::<<Svc as tower::Service<Req>>::Future>();
    send::<TimeoutBody<TestBody>>();
    unpin::<TimeoutBody<TestBody>>();
}

/// Issue 14: `TimeoutLayer::new()` is useful as it is (60 s idle, 300 s in
/// all, no header timeout), and `none()` is every timeout off.
#[tokio::test(start_paused = true)]
async fn new_starts_from_llm_defaults_and_none_from_nothing() {
    assert_eq!(TimeoutLayer::new(), TimeoutLayer::default());
    assert_eq!(
        TimeoutLayer::none().idle(S(60)).total(S(300)),
        TimeoutLayer::new()
    );
    // A stream that stalls is cut after 60 s.
    let (svc, mut h) = setup(TimeoutLayer::new());
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    // A slow non-streamed answer: no header timeout cuts it before 300 s.
    advance(S(250)).await;
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    feed.data("data: 1\n\n");
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let stalled_at = Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    // The total deadline (300 s from the call) comes before 60 s of silence.
    assert_eq!(stalled_at.elapsed(), S(50));
    assert!(err.is::<DeadlineExceeded>());

    let (svc, mut h) = setup(TimeoutLayer::new());
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    let (feed, body) = live();
    send.send_response(stream(body));
    let mut body = call.await.unwrap().unwrap().into_body();
    feed.data("data: 1\n\n");
    assert!(body.frame().await.unwrap().unwrap().is_data());
    let stalled_at = Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(stalled_at.elapsed(), S(60));
    assert!(err.is::<IdleTimeout>());

    // With none(), nothing is cut.
    let (svc, mut h) = setup(TimeoutLayer::none());
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, send) = h.next_request().await.unwrap();
    advance(S(3600)).await;
    let (_feed, body) = live();
    send.send_response(stream(body));
    assert!(call.await.unwrap().is_ok());
}
