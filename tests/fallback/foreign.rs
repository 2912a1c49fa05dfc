//! Fallback over a service this crate knows nothing about: its errors are a
//! gRPC-style status, and the user's classifier says which of them another
//! model can take.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt};
use tower_qwen::body::{Body, BufferedBody};
use tower_qwen::classify::{FnClassifier, Outcome, PermanentReason};
use tower_qwen::fallback::{FallbackLayer, FallbackOn, MODEL_HEADER};
use tower_qwen::request::RequestInfo;

use super::{CHAIN, Calls, chat};

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

/// An upstream failing with a status per model (the others answer "ok"),
/// counting calls per model.
fn upstream(
    errors: &'static [(&'static str, Status)],
    calls: Calls,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<String>,
    Error = Status,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |req: Request<Body>| {
        let body = req.body().buffered();
        let info = RequestInfo::parse(req.uri().path(), req.headers(), body.as_deref());
        let model = info.model.as_deref().unwrap_or("").to_owned();
        *calls.lock().unwrap().entry(model.clone()).or_default() += 1;
        let error = errors.iter().find(|e| e.0 == model).map(|e| e.1);
        async move {
            match error {
                Some(e) => Err(e),
                None => Ok(Response::new(String::from("ok"))),
            }
        }
    })
}

fn classifier() -> impl tower_qwen::classify::Classify<Response<String>> {
    FnClassifier::new(|_: &Response<String>| Outcome::Success).on_error(|s: &Status| match s {
        Status::NotFound => Outcome::Permanent {
            reason: PermanentReason::NotFound,
        },
        Status::Unavailable => Outcome::TRANSIENT,
    })
}

fn counts(calls: &Calls) -> BTreeMap<String, u32> {
    calls.lock().unwrap().clone()
}

const TRANSIENT_TOO: FallbackOn = FallbackOn {
    throttled: true,
    local: true,
    circuit_open: true,
    transient: true,
};

#[tokio::test(start_paused = true)]
async fn the_users_closure_decides_which_foreign_errors_fall_back() {
    // Unavailable is transient: with transient failures falling back, the
    // next model answers.
    let calls = Calls::default();
    static UNAVAILABLE: [(&str, Status); 1] = [("qwen-turbo", Status::Unavailable)];
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(CHAIN)
                .on(TRANSIENT_TOO)
                .classifier(classifier()),
        )
        .service(upstream(&UNAVAILABLE, calls.clone()));
    let start = Instant::now();
    let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(
        counts(&calls),
        BTreeMap::from([("qwen-turbo".into(), 1), ("qwen-plus".into(), 1)])
    );

    // NotFound is permanent: handed back at once, no other model asked.
    let calls = Calls::default();
    static NOT_FOUND: [(&str, Status); 1] = [("qwen-turbo", Status::NotFound)];
    let svc = ServiceBuilder::new()
        .layer(
            FallbackLayer::new(CHAIN)
                .on(TRANSIENT_TOO)
                .classifier(classifier()),
        )
        .service(upstream(&NOT_FOUND, calls.clone()));
    let err = svc.oneshot(chat("qwen-turbo")).await.unwrap_err();
    assert_eq!(err, Status::NotFound);
    assert_eq!(counts(&calls), BTreeMap::from([("qwen-turbo".into(), 1)]));
}

/// A classifier that judges the response value alone (a trailers-only
/// gRPC answer's `grpc-status` header) decides without any body read.
#[tokio::test(start_paused = true)]
async fn a_classifier_that_reads_no_body_decides_on_responses() {
    let calls: Calls = Arc::new(Mutex::new(BTreeMap::new()));
    let upstream = tower::service_fn({
        let calls = calls.clone();
        move |req: Request<Body>| {
            let body = req.body().buffered();
            let info = RequestInfo::parse(req.uri().path(), req.headers(), body.as_deref());
            let model = info.model.as_deref().unwrap_or("").to_owned();
            *calls.lock().unwrap().entry(model.clone()).or_default() += 1;
            let mut res = Response::new(String::from("answer"));
            if model == "qwen-turbo" {
                res.headers_mut()
                    .insert("grpc-status", "8".parse().unwrap());
            }
            async move { Ok::<_, std::convert::Infallible>(res) }
        }
    });
    // 8 is RESOURCE_EXHAUSTED: a throttle, which falls back by default.
    let classifier = FnClassifier::new(|res: &Response<String>| {
        match res.headers().get("grpc-status").map(|v| v.as_bytes()) {
            Some(b"8") => Outcome::throttled(tower_qwen::classify::ThrottleCause::Unknown),
            _ => Outcome::Success,
        }
    });
    let svc = ServiceBuilder::new()
        .layer(FallbackLayer::new(CHAIN).classifier(classifier))
        .service(upstream);
    let res = svc.oneshot(chat("qwen-turbo")).await.unwrap();
    assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
    assert!(res.headers().get("grpc-status").is_none());
    assert_eq!(
        counts(&calls),
        BTreeMap::from([("qwen-turbo".into(), 1), ("qwen-plus".into(), 1)])
    );
}
