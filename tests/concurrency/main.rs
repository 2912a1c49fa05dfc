#![cfg(feature = "concurrency")]
//! Service tests for the concurrency limit (issue 5). Paused time, no real
//! sleeps.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::BodyExt;
use tokio::sync::mpsc;
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_qwen::classify::{Classifier, FnClassifier, Outcome, ThrottleCause};
use tower_qwen::concurrency::error::Overloaded;
use tower_qwen::concurrency::{Aimd, ConcurrencyLimit, ConcurrencyLimitLayer};

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

/// A response body fed through a channel: it ends when the sender is
/// dropped.
struct ChannelBody(mpsc::UnboundedReceiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

fn streaming() -> (mpsc::UnboundedSender<Bytes>, Response<ChannelBody>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let res = Response::builder()
        .header("content-type", "text/event-stream")
        .body(ChannelBody(rx))
        .unwrap();
    (tx, res)
}

type Req = Request<String>;

fn req() -> Req {
    Request::new(String::new())
}

/// An inner service answering with responses handed to it through a queue.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<VecDeque<Response<ChannelBody>>>>);

impl Answers {
    fn push(&self, res: Response<ChannelBody>) {
        self.0.lock().unwrap().push_back(res);
    }
    fn service(
        &self,
    ) -> impl Service<Req, Response = Response<ChannelBody>, Error = Infallible, Future: Send> + Clone
    {
        let q = self.0.clone();
        service_fn(move |_req: Req| {
            let res = q.lock().unwrap().pop_front().expect("an answer was queued");
            async move { Ok::<_, Infallible>(res) }
        })
    }
}

#[tokio::test(start_paused = true)]
async fn permit_is_held_until_the_streamed_body_ends() {
    let answers = Answers::default();
    let layer = ConcurrencyLimitLayer::new(nz(1));
    let handle = layer.handle();
    let svc = layer.layer(answers.service());

    let (tx, res) = streaming();
    answers.push(res);
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.in_flight(), 1);

    // A second caller waits while the first stream is open.
    let mut other = svc.clone();
    let mut ready = task::spawn(async move {
        other.ready().await.unwrap();
    });
    assert_pending!(ready.poll());
    assert_eq!(handle.waiting(), 1);

    let mut body = res.into_body();
    tx.send(Bytes::from_static(b"data: {\"a\":1}\n\n")).unwrap();
    body.frame().await.unwrap().unwrap();
    assert_pending!(ready.poll());
    assert!(!ready.is_woken());

    // The stream ends: the permit goes to the waiter, who is woken.
    drop(tx);
    assert!(body.frame().await.is_none());
    assert!(ready.is_woken());
    assert_ready!(ready.poll());
    assert_eq!(handle.waiting(), 0);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_body_or_the_future_releases_the_permit() {
    let answers = Answers::default();
    let layer = ConcurrencyLimitLayer::new(nz(1));
    let handle = layer.handle();
    let svc = layer.layer(answers.service());

    let (_tx, res) = streaming();
    answers.push(res);
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.in_flight(), 1);
    drop(res);
    assert_eq!(handle.in_flight(), 0);

    // A response future dropped before it resolves releases too.
    let (mut mock_svc, mut mock) = tower_test::mock::spawn_layer::<Req, Response<String>, _>(
        ConcurrencyLimitLayer::new(nz(1)),
    );
    assert_ready_ok!(mock_svc.poll_ready());
    let fut = mock_svc.call(req());
    let _ = mock.next_request().await.unwrap();
    let mut other = mock_svc.clone();
    assert_pending!(other.poll_ready());
    drop(fut);
    assert!(other.is_woken());
    assert_ready_ok!(other.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_limit_but_never_a_permit() {
    let layer = ConcurrencyLimitLayer::new(nz(1));
    let handle = layer.handle();
    // Two services from two `layer` calls share one limit (tower's
    // ConcurrencyLimitLayer would give each its own semaphore).
    let (mut a, _ha) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    let (mut b, _hb) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    assert_ready_ok!(a.poll_ready());
    assert_eq!(handle.in_flight(), 1);
    assert_pending!(b.poll_ready());
    // A clone of a ready service starts without a permit.
    let mut a2 = a.clone();
    assert_pending!(a2.poll_ready());
    assert_eq!(handle.waiting(), 2);
    drop(a);
    assert!(b.is_woken());
    assert_ready_ok!(b.poll_ready());
    assert_pending!(a2.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_order() {
    let layer = ConcurrencyLimitLayer::new(nz(1));
    let (mut first, _h) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    assert_ready_ok!(first.poll_ready());
    let mut waiters: Vec<_> = (0..3).map(|_| first.clone()).collect();
    for w in waiters.iter_mut() {
        assert_pending!(w.poll_ready());
    }
    // A newcomer arriving after them cannot overtake the queue either.
    let mut late = first.clone();
    drop(first);
    assert_pending!(late.poll_ready());
    for i in 0..3 {
        assert!(waiters[i].is_woken());
        assert_ready_ok!(waiters[i].poll_ready());
        for w in waiters[i + 1..].iter_mut() {
            assert_pending!(w.poll_ready());
        }
        // Give the permit back by dropping the ready service.
        waiters[i] = late.clone();
    }
    drop(waiters);
    assert_ready_ok!(late.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_sheds_with_overloaded() {
    let layer = ConcurrencyLimitLayer::new(nz(1)).max_waiting(1);
    let (mut a, _h) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    assert_ready_ok!(a.poll_ready());
    let mut b = a.clone();
    assert_pending!(b.poll_ready());
    // The third caller finds the queue full: ready at once, and its call
    // fails without reaching the inner service.
    let mut c = a.clone();
    assert_ready_ok!(c.poll_ready());
    let err = c.call(req()).await.unwrap_err();
    let overloaded = err.downcast_ref::<Overloaded>().unwrap();
    assert!(overloaded.is_queue_full());
    assert_eq!(
        Classifier::new().classify_error(&err),
        Outcome::throttled(ThrottleCause::Local)
    );
    // max_waiting(0): pure load shedding.
    let layer = ConcurrencyLimitLayer::new(nz(1)).max_waiting(0);
    let (mut a, _h) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    assert_ready_ok!(a.poll_ready());
    let mut b = a.clone();
    assert_ready_ok!(b.poll_ready());
    assert!(b.call(req()).await.unwrap_err().is::<Overloaded>());
}

#[tokio::test(start_paused = true)]
async fn max_wait_sheds_after_the_wait() {
    let layer = ConcurrencyLimitLayer::new(nz(1)).max_wait(Duration::from_secs(2));
    let (mut a, _h) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    assert_ready_ok!(a.poll_ready());
    let mut b = a.clone();
    assert_pending!(b.poll_ready());
    tokio::time::advance(Duration::from_millis(1999)).await;
    assert_pending!(b.poll_ready());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(b.is_woken());
    assert_ready_ok!(b.poll_ready());
    let err = b.call(req()).await.unwrap_err();
    assert!(err.downcast_ref::<Overloaded>().unwrap().is_timeout());
    // It left the queue: a later waiter is next in line.
    let mut c = a.clone();
    assert_pending!(c.poll_ready());
    drop(a);
    assert_ready_ok!(c.poll_ready());
}

#[tokio::test(start_paused = true)]
async fn a_dropped_waiter_leaves_the_queue() {
    let layer = ConcurrencyLimitLayer::new(nz(1));
    let handle = layer.handle();
    let (mut a, _h) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    assert_ready_ok!(a.poll_ready());
    let mut b = a.clone();
    let mut c = a.clone();
    assert_pending!(b.poll_ready());
    assert_pending!(c.poll_ready());
    drop(b);
    assert_eq!(handle.waiting(), 1);
    drop(a);
    assert!(c.is_woken());
    assert_ready_ok!(c.poll_ready());
    // A waiter granted a permit and dropped before noticing gives it back.
    let mut d = c.clone();
    assert_pending!(d.poll_ready());
    drop(c); // the permit goes to d
    drop(d); // d never polled again
    assert_eq!(handle.in_flight(), 0);
}

/// An inner service answering with a status code per call, body as given.
fn statuses(
    codes: Vec<(u16, &'static str)>,
) -> impl Service<Req, Response = Response<String>, Error = Infallible, Future: Send> + Clone {
    let q = Arc::new(Mutex::new(VecDeque::from(codes)));
    service_fn(move |_req: Req| {
        let (code, body) = q.lock().unwrap().pop_front().unwrap_or((200, "{}"));
        let res = Response::builder()
            .status(code)
            .header(
                "content-type",
                if body.starts_with("data:") || body.starts_with("id:") {
                    "text/event-stream"
                } else {
                    "application/json"
                },
            )
            .body(body.to_string())
            .unwrap();
        async move { Ok::<_, Infallible>(res) }
    })
}

const THROTTLED: &str = r#"{"code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#;

#[tokio::test(start_paused = true)]
async fn adaptive_shrinks_once_per_round_on_429s_and_grows_on_success() {
    let aimd = Aimd::new()
        .bounds(nz(1), nz(8), nz(10))
        .unwrap()
        .decrease_factor(0.5)
        .unwrap();
    let layer = ConcurrencyLimitLayer::adaptive(aimd);
    let handle = layer.handle();
    let svc = layer.layer(statuses(vec![(429, THROTTLED); 4]));
    assert_eq!(handle.limit(), 8);

    // Four 429s that were in flight together: one decrease.
    let mut responses = Vec::new();
    for _ in 0..4 {
        responses.push(svc.clone().oneshot(req()).await.unwrap());
    }
    for r in responses {
        r.into_body().collect().await.unwrap();
    }
    assert_eq!(handle.limit(), 4);

    // Successes while the limit is in use grow it by about one per window.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(svc.clone().oneshot(req()).await.unwrap());
    }
    for _ in 0..12 {
        let r = svc.clone().oneshot(req()).await.unwrap();
        r.into_body().collect().await.unwrap();
    }
    assert_eq!(handle.limit(), 6, "{handle:?}"); // 4 + 1/4 + 1/4.25 + ... (12 steps) = 6.36
    drop(held);
}

#[tokio::test(start_paused = true)]
async fn adaptive_reads_errors_inside_200s_and_streams() {
    let aimd = Aimd::new().bounds(nz(1), nz(8), nz(10)).unwrap();
    let layer = ConcurrencyLimitLayer::adaptive(aimd);
    let handle = layer.handle();
    let midstream = "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{}}\n\nid:2\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.AllocationQuota\",\"message\":\"Allocated quota exceeded, please increase your quota limit.\"}\n\n";
    let svc = layer.layer(statuses(vec![(200, THROTTLED), (200, midstream)]));
    let r = svc.clone().oneshot(req()).await.unwrap();
    r.into_body().collect().await.unwrap();
    assert_eq!(handle.limit(), 6); // 8 * 0.75
    let r = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.limit(), 6); // not at headers...
    r.into_body().collect().await.unwrap();
    assert_eq!(handle.limit(), 4); // ...at the error frame's end: 6 * 0.75
}

#[tokio::test(start_paused = true)]
async fn adaptive_ignores_local_refusals_and_shrinks_on_errors() {
    let aimd = Aimd::new().bounds(nz(1), nz(8), nz(10)).unwrap();
    let layer = ConcurrencyLimitLayer::adaptive(aimd);
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|r: Req| async move {
        if r.uri().path() == "/reset" {
            Err::<Response<String>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
        } else {
            Ok(Response::new(String::new()))
        }
    }));
    let reset = Request::builder()
        .uri("/reset")
        .body(String::new())
        .unwrap();
    assert!(svc.clone().oneshot(reset).await.is_err());
    assert_eq!(handle.limit(), 6);
    assert_eq!(handle.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn works_on_plain_services_with_a_fn_classifier() {
    let layer = ConcurrencyLimitLayer::new(nz(1)).classifier(FnClassifier::new(|n: &u32| {
        if *n < 10 {
            Outcome::Success
        } else {
            Outcome::TRANSIENT
        }
    }));
    let handle = layer.handle();
    let svc = layer.layer(service_fn(
        |n: u32| async move { Ok::<_, Infallible>(n * 2) },
    ));
    // The permit is released as soon as a non-HTTP response arrives.
    assert_eq!(svc.clone().oneshot(3).await.unwrap(), 6);
    assert_eq!(handle.in_flight(), 0);
    let mut s = ConcurrencyLimit::new(
        service_fn(|_: Req| async move { Ok::<_, Infallible>(Response::new(String::new())) }),
        nz(2),
    );
    s.ready().await.unwrap();
    assert_eq!(s.handle().in_flight(), 1);
}

/// The adaptive limit against the mock DashScope server over loopback, on
/// tokio's paused clock: it settles under the quota (429s below 1 % of the
/// calls once converged) and climbs again when the quota is raised.
#[cfg(feature = "mock")]
#[tokio::test(start_paused = true)]
async fn adaptive_converges_under_the_mock_quota_and_recovers() {
    use std::num::NonZeroU32;

    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tower_qwen::mock::{Dist, FaultPlan, Latency, MockDashScope, Quota};

    const MODEL: &str = "qwen-plus";
    let rpm = |n| Quota::per_minute(NonZeroU32::new(n).unwrap());
    let mock = MockDashScope::builder()
        .key("sk-test", "acct")
        .quota(MODEL, rpm(600)) // 10 per second
        .faults(
            FaultPlan::new()
                .latency(Latency::none().time_to_headers(Dist::fixed(Duration::from_secs(1)))),
        )
        .start()
        .await
        .unwrap();
    let url = format!("{}/compatible-mode/v1/chat/completions", mock.base_url());
    let client = Client::builder(TokioExecutor::new()).build_http::<http_body_util::Full<Bytes>>();

    let aimd = Aimd::new()
        .bounds(nz(1), nz(5), nz(40))
        .unwrap()
        .increase(0.25)
        .unwrap()
        .decrease_factor(0.5)
        .unwrap();
    let layer = ConcurrencyLimitLayer::adaptive(aimd);
    let handle = layer.handle();
    let svc = layer.layer(service_fn(move |req| client.request(req)));

    // (seconds since start, status) of every call.
    let log: Arc<Mutex<Vec<(u64, u16)>>> = Arc::default();
    let t0 = tokio::time::Instant::now();
    let run_until = |end: u64| {
        let workers: Vec<_> = (0..40)
            .map(|_| {
                let (svc, log, url) = (svc.clone(), log.clone(), url.clone());
                tokio::spawn(async move {
                    while t0.elapsed() < Duration::from_secs(end) {
                        let body = format!(
                            r#"{{"model":"{MODEL}","messages":[{{"role":"user","content":"hi"}}]}}"#
                        );
                        let req = Request::post(url.as_str())
                            .header("authorization", "Bearer sk-test")
                            .header("content-type", "application/json")
                            .body(http_body_util::Full::new(Bytes::from(body)))
                            .unwrap();
                        let res = svc.clone().oneshot(req).await.unwrap();
                        let status = res.status().as_u16();
                        res.into_body().collect().await.unwrap();
                        log.lock().unwrap().push((t0.elapsed().as_secs(), status));
                    }
                })
            })
            .collect();
        async move {
            for w in workers {
                w.await.unwrap();
            }
        }
    };
    let window = |from: u64, to: u64| {
        let log = log.lock().unwrap();
        let calls: Vec<_> = log.iter().filter(|(t, _)| (from..to).contains(t)).collect();
        let throttled = calls.iter().filter(|(_, s)| *s == 429).count();
        let ok = calls.iter().filter(|(_, s)| *s == 200).count();
        (calls.len(), throttled, ok as f64 / (to - from) as f64)
    };

    // Phase 1: 10 calls per second allowed, 40 callers that want more.
    run_until(240).await;
    let (calls, throttled, goodput) = window(60, 240);
    let limit_at_10 = handle.limit();
    eprintln!("phase1 calls {calls} 429s {throttled} goodput {goodput} limit {limit_at_10}");
    assert!(
        (throttled as f64) < 0.01 * calls as f64,
        "429s {throttled} of {calls} (limit {limit_at_10})"
    );
    assert!(goodput >= 6.0, "goodput {goodput}/s (limit {limit_at_10})");
    assert!((3..=14).contains(&limit_at_10), "limit {limit_at_10}");

    // Phase 2: the quota is doubled; the limit climbs to use it.
    mock.set_quota(MODEL, rpm(1200));
    run_until(480).await;
    let (calls, throttled, goodput) = window(420, 480);
    assert!(
        goodput >= 13.0,
        "goodput {goodput}/s after the raise (limit {})",
        handle.limit()
    );
    assert!(
        (throttled as f64) < 0.02 * calls as f64,
        "429s {throttled} of {calls}"
    );
    assert!(
        handle.limit() > limit_at_10,
        "{} <= {limit_at_10}",
        handle.limit()
    );
    eprintln!(
        "phase2 calls {calls} 429s {throttled} goodput {goodput} limit {}",
        handle.limit()
    );
    mock.shutdown().await;
}

/// Issue 14: setters behave one way. A setter configures the services the
/// layer makes from then on: services made before keep their settings, and
/// the shared limit (with a handle taken before) is never replaced.
#[tokio::test(start_paused = true)]
async fn setters_never_change_services_already_made_nor_detach_a_handle() {
    let layer = ConcurrencyLimitLayer::new(nz(1));
    let handle = layer.handle();
    let (mut waits, _h1) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    let layer = layer.max_waiting(0);
    let (mut sheds, _h2) =
        tower_test::mock::spawn_with::<Req, Response<String>, _, _>(|s| layer.layer(s));
    // `sheds` takes the one permit of the shared limit.
    assert_ready_ok!(sheds.poll_ready());
    assert_eq!(handle.in_flight(), 1, "the handle sees the same limit");
    // `waits` was made before max_waiting(0): it still queues.
    assert_pending!(waits.poll_ready());
    assert_eq!(handle.waiting(), 1);
    // A service made after sheds at once.
    let mut more = sheds.clone();
    assert_ready_ok!(more.poll_ready());
    assert!(more.call(req()).await.unwrap_err().is::<Overloaded>());
}
