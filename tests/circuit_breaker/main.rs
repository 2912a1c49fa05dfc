#![cfg(feature = "circuit-breaker")]
//! Service tests for the circuit breaker (issue 5). Paused time, seeded
//! jitter, no real sleeps.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::num::{NonZeroU32, NonZeroUsize};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use tokio_test::{assert_pending, assert_ready_ok};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_qwen::circuit_breaker::error::CircuitOpen;
use tower_qwen::circuit_breaker::{CircuitBreakerLayer, State, Transition, TripAction};
use tower_qwen::classify::{Classifier, FnClassifier, Outcome};
use tower_qwen::util::rng::SeededRng;

type Req = Request<String>;

fn req() -> Req {
    Request::new(String::new())
}

fn req_for(account: &str) -> Req {
    Request::builder()
        .header("x-account", account)
        .body(String::new())
        .unwrap()
}

const S: Duration = Duration::from_secs(1);

/// A breaker with no jitter, so open durations are exact.
fn breaker() -> CircuitBreakerLayer {
    CircuitBreakerLayer::new().jitter(0.0)
}

/// An inner service that answers each call with the next (status, body),
/// and counts the calls that reached it.
#[derive(Clone, Default)]
struct Upstream {
    answers: Arc<Mutex<VecDeque<(u16, &'static str)>>>,
    calls: Arc<AtomicUsize>,
}

impl Upstream {
    fn queue(&self, n: usize, status: u16, body: &'static str) {
        let mut q = self.answers.lock().unwrap();
        for _ in 0..n {
            q.push_back((status, body));
        }
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    fn service(
        &self,
    ) -> impl Service<Req, Response = Response<String>, Error = Infallible, Future: Send> + Clone
    {
        let me = self.clone();
        service_fn(move |_req: Req| {
            me.calls.fetch_add(1, Ordering::SeqCst);
            let (status, body) = me
                .answers
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or((200, "{}"));
            let ct = if body.starts_with("id:") || body.starts_with("data:") {
                "text/event-stream"
            } else {
                "application/json"
            };
            let res = Response::builder()
                .status(status)
                .header("content-type", ct)
                .body(body.to_string())
                .unwrap();
            async move { Ok::<_, Infallible>(res) }
        })
    }
}

/// Sends one call and reads its body to the end; returns the status or
/// the error.
async fn send<S>(svc: &S, r: Req) -> Result<u16, tower_qwen::BoxError>
where
    S: Service<Req, Error = tower_qwen::BoxError> + Clone,
    S::Response: IntoStatusAndBody,
{
    let res = svc.clone().oneshot(r).await?;
    Ok(res.read().await)
}

trait IntoStatusAndBody {
    fn read(self) -> impl std::future::Future<Output = u16>;
}

impl<B> IntoStatusAndBody for Response<B>
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    async fn read(self) -> u16 {
        let status = self.status().as_u16();
        self.into_body().collect().await.unwrap();
        status
    }
}

const SERVICE_UNAVAILABLE: &str = r#"{"code":"ServiceUnavailable","message":"Service temporarily unavailable, possibly overloaded or not ready."}"#;
const RATE_QUOTA: &str = r#"{"code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#;

#[tokio::test(start_paused = true)]
async fn three_consecutive_503s_open_it_and_a_probe_closes_it() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());

    up.queue(3, 503, SERVICE_UNAVAILABLE);
    for i in 0..3 {
        assert_eq!(handle.state(), State::Closed, "call {i}");
        assert_eq!(send(&svc, req()).await.unwrap(), 503);
    }
    assert_eq!(handle.state(), State::Open);

    // Open: fail fast, nothing sent upstream, retry_after = time to probe.
    tokio::time::advance(2 * S).await;
    let err = send(&svc, req()).await.unwrap_err();
    let open = err.downcast_ref::<CircuitOpen>().unwrap();
    assert_eq!(open.retry_after(), Some(3 * S));
    assert_eq!(open.state(), State::Open);
    assert_eq!(up.calls(), 3);
    // A retry layer outside reads it as transient, with that wait.
    assert_eq!(
        Classifier::new().classify_error(&err),
        Outcome::Transient {
            retry_after: Some(3 * S)
        }
    );

    // Half-open: the probe succeeds and closes the circuit.
    tokio::time::advance(3 * S).await;
    assert_eq!(send(&svc, req()).await.unwrap(), 200);
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(up.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_reopens_for_twice_as_long() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(4, 503, SERVICE_UNAVAILABLE);
    for _ in 0..3 {
        send(&svc, req()).await.unwrap();
    }
    tokio::time::advance(5 * S).await;
    assert_eq!(send(&svc, req()).await.unwrap(), 503);
    assert_eq!(handle.state(), State::Open);
    assert_eq!(handle.open_remaining(), Some(10 * S));
}

#[tokio::test(start_paused = true)]
async fn a_429_storm_does_not_open_it() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(50, 429, RATE_QUOTA);
    // Also 429s hidden in HTTP 200 bodies.
    up.queue(50, 200, RATE_QUOTA);
    for _ in 0..100 {
        send(&svc, req()).await.unwrap();
    }
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.counts(), (0, 0, 0));
    assert_eq!(up.calls(), 100);
}

#[tokio::test(start_paused = true)]
async fn permanent_errors_do_not_open_it_by_default_but_can() {
    let bad_request = r#"{"code":"InvalidParameter","message":"x"}"#;
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(10, 400, bad_request);
    for _ in 0..10 {
        send(&svc, req()).await.unwrap();
    }
    assert_eq!(handle.state(), State::Closed);

    let layer = breaker().failure_if(|o| !o.is_success());
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(3, 400, bad_request);
    for _ in 0..3 {
        send(&svc, req()).await.unwrap();
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_errors_midway_counts_at_its_end() {
    let midway = "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[]}}\n\nid:2\nevent:error\n:HTTP_STATUS/500\ndata:{\"code\":\"InternalError\",\"message\":\"x\"}\n\n";
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(3, 200, midway);
    let mut responses = Vec::new();
    for _ in 0..3 {
        responses.push(svc.clone().oneshot(req()).await.unwrap());
    }
    // The heads said 200: nothing is known yet.
    assert_eq!(handle.state(), State::Closed);
    for r in responses {
        assert_eq!(r.read().await, 200);
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn an_unread_503_counts_and_an_abandoned_success_does_not() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(3, 503, SERVICE_UNAVAILABLE);
    for _ in 0..3 {
        drop(svc.clone().oneshot(req()).await.unwrap());
    }
    assert_eq!(handle.state(), State::Open);

    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    up.queue(2, 503, SERVICE_UNAVAILABLE);
    for _ in 0..2 {
        send(&svc, req()).await.unwrap();
    }
    // A 200 dropped before its end neither resets the streak nor counts.
    up.queue(1, 200, "data: {}\n\n");
    drop(svc.clone().oneshot(req()).await.unwrap());
    assert_eq!(handle.counts().2, 2);
}

#[tokio::test(start_paused = true)]
async fn clones_and_services_of_one_layer_share_the_circuit() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let a = layer.layer(up.service());
    let b = layer.layer(up.service());
    let a2 = a.clone();
    up.queue(3, 503, SERVICE_UNAVAILABLE);
    send(&a, req()).await.unwrap();
    send(&b, req()).await.unwrap();
    send(&a2, req()).await.unwrap();
    assert_eq!(handle.state(), State::Open);
    assert!(send(&b, req()).await.unwrap_err().is::<CircuitOpen>());
    assert!(send(&a, req()).await.unwrap_err().is::<CircuitOpen>());
}

#[tokio::test(start_paused = true)]
async fn errors_from_the_inner_service_count_as_transient() {
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|_r: Req| async {
        Err::<Response<String>, _>(std::io::Error::from(std::io::ErrorKind::ConnectionReset))
    }));
    for _ in 0..3 {
        assert!(
            svc.clone()
                .oneshot(req())
                .await
                .unwrap_err()
                .is::<std::io::Error>()
        );
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn an_open_unkeyed_breaker_rejects_in_poll_ready_without_polling_inner() {
    let layer = breaker();
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Req, Response<String>, _>(layer);
    handle.force_open();
    mock.allow(0);
    // The inner service is not ready, yet the breaker answers at once.
    assert_ready_ok!(svc.poll_ready());
    let err = svc.call(req()).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().state(),
        State::ForcedOpen
    );
    handle.release();
    assert_pending!(svc.poll_ready());
    mock.allow(1);
    assert!(svc.is_woken());
    assert_ready_ok!(svc.poll_ready());
}

async fn open_it<S>(svc: &S, up: &Upstream)
where
    S: Service<Req, Error = tower_qwen::BoxError> + Clone,
    S::Response: IntoStatusAndBody,
{
    up.queue(3, 503, SERVICE_UNAVAILABLE);
    for _ in 0..3 {
        send(svc, req()).await.unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_dropped_probe_future_frees_its_slot() {
    let layer = breaker();
    let handle = layer.handle();
    let (mut svc, mut mock) = tower_test::mock::spawn_layer::<Req, Response<String>, _>(layer);
    // Trip it with three transient errors.
    for _ in 0..3 {
        assert_ready_ok!(svc.poll_ready());
        let fut = svc.call(req());
        let (_, send) = mock.next_request().await.unwrap();
        send.send_error(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert!(fut.await.is_err());
    }
    assert_eq!(handle.state(), State::Open);
    tokio::time::advance(5 * S).await;

    // The probe is in flight: a second caller is refused.
    assert_ready_ok!(svc.poll_ready());
    let probe = svc.call(req());
    let _ = mock.next_request().await.unwrap();
    let mut other = svc.clone();
    assert_ready_ok!(other.poll_ready());
    let err = other.call(req()).await.unwrap_err();
    assert_eq!(
        err.downcast_ref::<CircuitOpen>().unwrap().state(),
        State::HalfOpen
    );

    // The probe's caller gives up: its slot is free for the next caller.
    drop(probe);
    assert_ready_ok!(other.poll_ready());
    let fut = other.call(req());
    let (_, send) = mock.next_request().await.unwrap();
    send.send_response(Response::new(String::from("{}")));
    fut.await.unwrap().read().await;
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_probe_body_dropped_midway_frees_its_slot() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    open_it(&svc, &up).await;
    tokio::time::advance(5 * S).await;
    up.queue(1, 200, "data: {\"a\":1}\n\n");
    let res = svc.clone().oneshot(req()).await.unwrap();
    assert_eq!(handle.state(), State::HalfOpen);
    assert!(send(&svc, req()).await.unwrap_err().is::<CircuitOpen>());
    drop(res);
    assert_eq!(handle.state(), State::HalfOpen);
    assert_eq!(send(&svc, req()).await.unwrap(), 200);
    assert_eq!(handle.state(), State::Closed);
}

#[tokio::test(start_paused = true)]
async fn degrade_admits_five_per_second_and_reports_each_transition_once() {
    let up = Upstream::default();
    let changes: Arc<Mutex<Vec<Transition>>> = Arc::default();
    let seen = changes.clone();
    let layer = breaker()
        .trip_action(TripAction::degrade())
        .on_state_change(move |_key: &(), t: &Transition| seen.lock().unwrap().push(*t));
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    open_it(&svc, &up).await;
    assert_eq!(handle.state(), State::Degraded);

    // Over 5 s (the open duration), 25 of 250 callers get through.
    let mut passed = 0;
    for _ in 0..250 {
        match send(&svc, req()).await {
            Ok(_) => passed += 1,
            Err(e) => assert!(e.downcast_ref::<CircuitOpen>().unwrap().is_degraded()),
        }
        tokio::time::advance(Duration::from_millis(20)).await;
    }
    assert_eq!(passed, 25);
    // Past the open duration the admitted calls are probes: a success
    // closes.
    assert_eq!(send(&svc, req()).await.unwrap(), 200);
    assert_eq!(handle.state(), State::Closed);
    let changes = changes.lock().unwrap();
    let path: Vec<_> = changes.iter().map(|t| (t.from, t.to)).collect();
    assert_eq!(
        path,
        vec![
            (State::Closed, State::Degraded),
            (State::Degraded, State::Closed)
        ]
    );
    assert_eq!(changes[0].open_for, Some(5 * S));
}

#[tokio::test(start_paused = true)]
async fn the_open_duration_is_jittered_by_the_injected_rng() {
    let durations = |seed| async move {
        let up = Upstream::default();
        let layer = CircuitBreakerLayer::new().rng(SeededRng::new(seed));
        let handle = layer.handle();
        let svc = layer.layer(up.service());
        open_it(&svc, &up).await;
        handle.open_remaining().unwrap()
    };
    let a = durations(1).await;
    assert_eq!(a, durations(1).await);
    assert_ne!(a, durations(2).await);
    assert!(a <= 5 * S && a >= 4 * S, "{a:?}");
}

#[tokio::test(start_paused = true)]
async fn keyed_breakers_are_independent_and_bounded() {
    let up = Upstream::default();
    let changes: Arc<Mutex<Vec<(String, State)>>> = Arc::default();
    let seen = changes.clone();
    let layer = breaker()
        .keyed(
            tower_qwen::key::key_fn(|r: &mut Req| {
                r.headers()
                    .get("x-account")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned()
            }),
            NonZeroUsize::new(2).unwrap(),
        )
        .on_state_change(move |k: &String, t: &Transition| {
            seen.lock().unwrap().push((k.clone(), t.to))
        });
    let handle = layer.handle();
    let svc = layer.layer(up.service());

    up.queue(3, 503, SERVICE_UNAVAILABLE);
    for _ in 0..3 {
        send(&svc, req_for("a")).await.unwrap();
    }
    assert_eq!(handle.state_of(&"a".to_owned()), Some(State::Open));
    assert!(
        send(&svc, req_for("a"))
            .await
            .unwrap_err()
            .is::<CircuitOpen>()
    );
    assert_eq!(send(&svc, req_for("b")).await.unwrap(), 200);
    assert_eq!(handle.state_of(&"b".to_owned()), Some(State::Closed));
    assert_eq!(handle.keys(), 2);

    // A third key evicts the idle one (b), not the open one (a).
    assert_eq!(send(&svc, req_for("c")).await.unwrap(), 200);
    assert_eq!(handle.keys(), 2);
    assert_eq!(handle.state_of(&"b".to_owned()), None);
    assert_eq!(handle.state_of(&"a".to_owned()), Some(State::Open));

    // Forcing one key.
    handle.force_open_key(&"c".to_owned());
    assert!(
        send(&svc, req_for("c"))
            .await
            .unwrap_err()
            .is::<CircuitOpen>()
    );
    handle.release_key(&"c".to_owned());
    assert_eq!(send(&svc, req_for("c")).await.unwrap(), 200);
    assert_eq!(
        *changes.lock().unwrap(),
        vec![
            ("a".to_owned(), State::Open),
            ("c".to_owned(), State::ForcedOpen),
            ("c".to_owned(), State::Closed),
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn forced_closed_never_trips() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    handle.force_closed();
    up.queue(10, 503, SERVICE_UNAVAILABLE);
    for _ in 0..10 {
        assert_eq!(send(&svc, req()).await.unwrap(), 503);
    }
    assert_eq!(handle.state(), State::ForcedClosed);
    handle.release();
    open_it(&svc, &up).await;
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_trips_on_interleaved_failures() {
    let up = Upstream::default();
    let layer = breaker()
        .consecutive_failures(NonZeroU32::new(3))
        .failure_rate(
            tower_qwen::circuit_breaker::FailureRate::new(0.5)
                .unwrap()
                .window(NonZeroU32::new(20).unwrap())
                .min_calls(10),
        );
    let handle = layer.handle();
    let svc = layer.layer(up.service());
    // 200, 503, 200, 503...: never 3 in a row, but half fail; the rate is
    // judged from the 10th call on.
    for _ in 0..5 {
        up.queue(1, 200, "{}");
        up.queue(1, 503, SERVICE_UNAVAILABLE);
    }
    for i in 0..10 {
        send(&svc, req()).await.unwrap();
        if i < 9 {
            assert_eq!(handle.state(), State::Closed, "call {i}");
        }
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_can_count_as_failures() {
    let layer = breaker().slow_call(Duration::from_secs(2));
    let handle = layer.handle();
    let svc = layer.layer(service_fn(|_r: Req| async {
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok::<_, Infallible>(Response::new(String::from("{}")))
    }));
    for _ in 0..3 {
        assert_eq!(send(&svc, req()).await.unwrap(), 200);
    }
    assert_eq!(handle.state(), State::Open);
}

#[tokio::test(start_paused = true)]
async fn works_on_plain_services_with_a_fn_classifier() {
    let layer = breaker().classifier(FnClassifier::new(|code: &u16| {
        if *code >= 500 {
            Outcome::TRANSIENT
        } else {
            Outcome::Success
        }
    }));
    let handle = layer.handle();
    let svc = layer.layer(service_fn(
        |code: u16| async move { Ok::<_, Infallible>(code) },
    ));
    for _ in 0..3 {
        assert_eq!(svc.clone().oneshot(500).await.unwrap(), 500);
    }
    assert_eq!(handle.state(), State::Open);
    assert!(
        svc.clone()
            .oneshot(200)
            .await
            .unwrap_err()
            .is::<CircuitOpen>()
    );
}

#[cfg(feature = "concurrency")]
#[tokio::test(start_paused = true)]
async fn local_load_shedding_inside_does_not_open_it() {
    use tower_qwen::concurrency::ConcurrencyLimitLayer;
    let layer = breaker();
    let handle = layer.handle();
    let up = Upstream::default();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .layer(ConcurrencyLimitLayer::new(NonZeroUsize::new(1).unwrap()).max_waiting(0))
        .service(up.service());
    up.queue(1, 200, "data: {}\n\n");
    let held = svc.clone().oneshot(req()).await.unwrap();
    for _ in 0..5 {
        let err = svc.clone().oneshot(req()).await.unwrap_err();
        assert!(err.is::<tower_qwen::concurrency::error::Overloaded>());
    }
    assert_eq!(handle.state(), State::Closed);
    drop(held);
}

/// A gRPC-style status, as a tonic channel's `Err` would carry it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Status {
    NotFound,
    Unavailable,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl std::error::Error for Status {}

/// Issue 14: a foreign `Err` value classified by the user's closure. A
/// `NotFound` is permanent, so a run of them never opens the circuit; an
/// `Unavailable` stays transient and does. Without the closure every
/// unknown error counts as transient.
#[tokio::test(start_paused = true)]
async fn foreign_errors_are_classified_by_the_users_closure() {
    use tower_qwen::classify::PermanentReason;
    let classify = FnClassifier::new(|_: &u16| Outcome::Success).on_error(|s: &Status| match s {
        Status::NotFound => Outcome::Permanent {
            reason: PermanentReason::NotFound,
        },
        Status::Unavailable => Outcome::TRANSIENT,
    });
    let upstream = service_fn(|s: Status| async move { Err::<u16, _>(s) });

    let layer = breaker().classifier(classify);
    let handle = layer.handle();
    let svc = layer.layer(upstream);
    for _ in 0..10 {
        let err = svc.clone().oneshot(Status::NotFound).await.unwrap_err();
        assert_eq!(err.downcast_ref::<Status>(), Some(&Status::NotFound));
    }
    assert_eq!(handle.state(), State::Closed, "NotFound is permanent");
    for _ in 0..3 {
        svc.clone().oneshot(Status::Unavailable).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::Open, "Unavailable is transient");

    // The same upstream without the closure: NotFound opens the circuit.
    let layer = breaker().classifier(FnClassifier::new(|_: &u16| Outcome::Success));
    let handle = layer.handle();
    let svc = layer.layer(upstream);
    for _ in 0..3 {
        svc.clone().oneshot(Status::NotFound).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::Open);
}

/// Issue 14: the closure also finds its type boxed by a layer in between
/// (here tower's `Timeout`, whose error is a `BoxError`), and a local
/// throttle boxed twice is still a local throttle to the breaker.
#[tokio::test(start_paused = true)]
async fn foreign_errors_are_found_when_boxed_and_local_throttles_boxed_twice() {
    let classify = Classifier::new().on_error(|_: &Status| Outcome::Permanent {
        reason: tower_qwen::classify::PermanentReason::NotFound,
    });
    let up = service_fn(|_: Req| async move { Err::<Response<String>, _>(Status::NotFound) });
    let layer = breaker().classifier(classify);
    let handle = layer.handle();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .layer(tower::timeout::TimeoutLayer::new(S))
        .service(up);
    for _ in 0..5 {
        svc.clone().oneshot(req()).await.unwrap_err();
    }
    assert_eq!(handle.state(), State::Closed);

    #[cfg(feature = "rate-limit")]
    {
        use tower_qwen::classify::ThrottleCause;
        let limited = {
            let limiter =
                tower_qwen::rate_limit::RateLimiter::new(tower_qwen::rate_limit::Limits::requests(
                    tower_qwen::rate_limit::Quota::per_minute(NonZeroU32::MIN)
                        .allow_burst(NonZeroU32::MIN),
                ));
            let _first = limiter
                .reserve(&(), tower_qwen::rate_limit::Cost::call(0), Duration::ZERO)
                .unwrap();
            limiter
                .reserve(&(), tower_qwen::rate_limit::Cost::call(0), Duration::ZERO)
                .unwrap_err()
        };
        let twice = tower_qwen::BoxError::from(Box::new(limited));
        assert!(!twice.is::<tower_qwen::rate_limit::error::RateLimited>());
        let outcome = Classifier::new().classify_error(&twice);
        assert_eq!(outcome.throttle_cause(), Some(ThrottleCause::Local));
        let up = service_fn(move |_: Req| {
            let e = tower_qwen::BoxError::from(Box::new(limited));
            async move { Err::<Response<String>, _>(e) }
        });
        let layer = breaker();
        let handle = layer.handle();
        let svc = layer.layer(up);
        for _ in 0..5 {
            svc.clone().oneshot(req()).await.unwrap_err();
        }
        assert_eq!(
            handle.state(),
            State::Closed,
            "a local throttle is no failure"
        );
    }
}

/// Issue 14: setters behave one way. A setter configures the services the
/// layer makes from then on: services made before keep their settings, and
/// the circuit they share (with a handle taken before) is never replaced.
#[tokio::test(start_paused = true)]
async fn setters_never_change_services_already_made_nor_detach_a_handle() {
    let up = Upstream::default();
    let layer = breaker();
    let handle = layer.handle();
    let three = layer.layer(up.service());
    let layer = layer.consecutive_failures(NonZeroU32::new(5));
    let five = layer.layer(up.service());
    // Four 503s through the service made after the setter: not enough.
    up.queue(4, 503, SERVICE_UNAVAILABLE);
    for _ in 0..4 {
        send(&five, req()).await.unwrap();
    }
    assert_eq!(handle.state(), State::Closed);
    assert_eq!(handle.counts().2, 4, "the handle sees the same circuit");
    // The fifth opens the circuit, for every service and the handle.
    up.queue(1, 503, SERVICE_UNAVAILABLE);
    send(&five, req()).await.unwrap();
    assert_eq!(handle.state(), State::Open);
    assert!(send(&three, req()).await.unwrap_err().is::<CircuitOpen>());
    // The handle steers the circuit of services made after it was taken.
    handle.release();
    send(&five, req()).await.unwrap();
    handle.force_open();
    assert!(send(&five, req()).await.unwrap_err().is::<CircuitOpen>());
    handle.release();
    // The service made before the setter still trips after 3 in a row.
    up.queue(3, 503, SERVICE_UNAVAILABLE);
    for _ in 0..3 {
        send(&three, req()).await.unwrap();
    }
    assert_eq!(handle.state(), State::Open);
    // A handle taken from the newer layer is the same circuit.
    assert_eq!(layer.handle().state(), State::Open);
}
