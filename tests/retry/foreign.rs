//! Retry over a service this crate knows nothing about: its errors are a
//! gRPC-style status, and the user's classifier says which of them heal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};
use tower_qwen::body::Body;
use tower_qwen::classify::{FnClassifier, Outcome, PermanentReason};
use tower_qwen::retry::{Backoff, Policy, RetryLayer};
use tower_qwen::util::rng::SeededRng;

/// A tonic-like status, the error of the upstream below.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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

fn status_outcome(s: &Status) -> Outcome {
    match s {
        Status::NotFound => Outcome::Permanent {
            reason: PermanentReason::NotFound,
        },
        Status::Unavailable => Outcome::TRANSIENT,
    }
}

/// An upstream that fails with `errors` in turn, then answers "ok"; it
/// counts its calls.
fn upstream(
    errors: &'static [Status],
    calls: Arc<AtomicU32>,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<String>,
    Error = Status,
    Future = impl Future<Output = Result<Response<String>, Status>>,
> + Clone {
    tower::service_fn(move |_req: Request<Body>| {
        let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
        async move {
            match errors.get(n) {
                Some(&e) => Err(e),
                None => Ok(Response::new(String::from("ok"))),
            }
        }
    })
}

fn layer() -> RetryLayer {
    RetryLayer::new()
        .policy(Policy::new().max_retries(3))
        .rng(SeededRng::new(1))
        .backoff(Backoff::new().jitter(false))
}

fn req() -> Request<Body> {
    Request::new(Body::from(r#"{"input":"hi"}"#))
}

#[tokio::test(start_paused = true)]
async fn the_users_closure_decides_which_foreign_errors_are_retried() {
    let classifier =
        FnClassifier::new(|_: &Response<String>| Outcome::Success).on_error(status_outcome);

    // Unavailable heals: retried until the answer comes.
    let calls = Arc::new(AtomicU32::new(0));
    let retry = layer().classifier(classifier);
    let stats = retry.stats();
    let svc = retry.layer(upstream(
        &[Status::Unavailable, Status::Unavailable],
        calls.clone(),
    ));
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(crate::text(res).await, "ok");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(stats.retries(), 2);

    // NotFound is permanent: handed back after one call, no wait.
    let calls = Arc::new(AtomicU32::new(0));
    let retry = layer().classifier(classifier);
    let stats = retry.stats();
    let svc = retry.layer(upstream(&[Status::NotFound], calls.clone()));
    let start = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(err, Status::NotFound);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(stats.retries(), 0);
    assert_eq!(start.elapsed(), Duration::ZERO);
}

/// A classifier that judges the response value alone (here a
/// trailers-only gRPC answer's `grpc-status` header) is obeyed without any
/// body being read, and the wait it suggests is honoured.
#[tokio::test(start_paused = true)]
async fn a_classifier_that_reads_no_body_decides_on_responses() {
    let classifier = FnClassifier::new(|res: &Response<String>| {
        match res.headers().get("grpc-status").map(|v| v.as_bytes()) {
            Some(b"14") => Outcome::Transient {
                retry_after: Some(Duration::from_secs(7)),
            },
            Some(b"5") => Outcome::Permanent {
                reason: PermanentReason::NotFound,
            },
            _ => Outcome::Success,
        }
    });
    let answers = |codes: &'static [&'static str], calls: Arc<AtomicU32>| {
        tower::service_fn(move |_req: Request<Body>| {
            let n = calls.fetch_add(1, Ordering::SeqCst) as usize;
            let mut res = Response::new(format!("answer {n}"));
            if let Some(code) = codes.get(n) {
                res.headers_mut()
                    .insert("grpc-status", code.parse().unwrap());
            }
            async move { Ok::<_, std::convert::Infallible>(res) }
        })
    };

    let calls = Arc::new(AtomicU32::new(0));
    let svc = layer()
        .classifier(classifier)
        .layer(answers(&["14"], calls.clone()));
    let start = Instant::now();
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(crate::text(res).await, "answer 1");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(start.elapsed(), Duration::from_secs(7));

    let calls = Arc::new(AtomicU32::new(0));
    let svc = layer()
        .classifier(classifier)
        .layer(answers(&["5"], calls.clone()));
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.headers()["grpc-status"], "5");
    assert_eq!(crate::text(res).await, "answer 0");
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}
