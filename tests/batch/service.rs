//! The batch service (issue 18, item 1).

use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};
use tower_qwen::BoxError;
use tower_qwen::batch::error::BatchError;
use tower_qwen::batch::{Batch, BatchLine, BatchStore, CustomId, FileStore, ResponseBody};
use tower_qwen::body::Body;
use tower_qwen::client::{COMPATIBLE_CHAT, COMPATIBLE_EMBEDDING, HttpClient, SetUpstream};
use tower_qwen::mock::{ApiError, BatchFault, BatchTiming};
use tower_qwen::usage::Usage;

use super::{Raw, chat, eventually, layer, mock, service, temp_dir, transport};

type Res = Result<Response<ResponseBody>, BoxError>;

pub(crate) fn post(path: &str, body: Value) -> Request<Body> {
    Request::post(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn spawn<S>(svc: &S, req: Request<Body>) -> JoinHandle<Res>
where
    S: Service<Request<Body>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    tokio::spawn(svc.clone().oneshot(req))
}

pub(crate) async fn body(res: Response<ResponseBody>) -> Value {
    serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
}

fn batch_error(e: &BoxError) -> &BatchError {
    e.downcast_ref::<BatchError>()
        .unwrap_or_else(|| panic!("a BatchError, got {e}"))
}

/// `n` chat calls with texts "0", "1"...
fn spawn_chats(svc: &Batch<SetUpstream<HttpClient>>, n: usize) -> Vec<JoinHandle<Res>> {
    (0..n)
        .map(|i| {
            spawn(
                svc,
                post(COMPATIBLE_CHAT, chat("qwen-plus", &i.to_string())),
            )
        })
        .collect()
}

/// Waits (a bounded time) until the mock has a batch.
async fn until_created(mock: &tower_qwen::mock::MockHandle) {
    eventually("a batch", || mock.batch_stats().batches_created > 0).await;
}

/// Whether the store in `dir` is empty within a minute (a collected
/// batch is forgotten right after its answers are handed out).
pub(crate) async fn store_empties(dir: &std::path::Path) -> bool {
    for _ in 0..600 {
        // A new store each time: one reads the file once.
        let store = FileStore::new(dir.join("batches.json"));
        if store.load().await.unwrap().is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Lets spawned tasks run until they wait.
async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn requests_are_filed_per_model_and_each_caller_gets_its_answer() {
    let mock = mock(BatchTiming::default()).await;
    let dir = temp_dir("per-model");
    let svc = service(&mock, &dir);
    let mut calls = Vec::new();
    for i in 0..5 {
        calls.push((
            "qwen-plus",
            spawn(
                &svc,
                post(COMPATIBLE_CHAT, chat("qwen-plus", &format!("item {i}"))),
            ),
        ));
    }
    for i in 0..3 {
        calls.push((
            "qwen-max",
            spawn(
                &svc,
                post(COMPATIBLE_CHAT, chat("qwen-max", &"word ".repeat(i + 1))),
            ),
        ));
    }
    for i in 0..2 {
        let e =
            json!({"model": "text-embedding-v4", "input": format!("text {i}"), "dimensions": 8});
        calls.push((
            "text-embedding-v4",
            spawn(&svc, post(COMPATIBLE_EMBEDDING, e)),
        ));
    }
    let mut ids = std::collections::HashSet::new();
    for (model, call) in calls {
        let res = call.await.unwrap().unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.headers()["content-type"], "application/json");
        assert!(res.headers().contains_key("x-request-id"));
        let line = res.extensions().get::<BatchLine>().unwrap().clone();
        assert!(line.batch_id().starts_with("batch_"));
        assert!(
            ids.insert(line.custom_id().to_owned()),
            "custom ids are unique"
        );
        let usage = *res.extensions().get::<Usage>().unwrap();
        let v = body(res).await;
        assert_eq!(v["model"], model);
        assert_eq!(
            u64::from(usage.input_tokens),
            v["usage"]["prompt_tokens"].as_u64().unwrap()
        );
    }
    let bs = mock.batch_stats();
    assert_eq!(
        (bs.files_uploaded, bs.batches_created, bs.lines_succeeded),
        (3, 3, 10)
    );
    // None of it touched the real-time quota.
    let stats = mock.stats();
    assert!(stats.admitted_by_model.is_empty() && stats.calls_by_model.is_empty());
    let s = svc.stats();
    assert_eq!(
        (s.requests, s.files, s.batches, s.completed, s.responses),
        (10, 3, 3, 3, 10)
    );
    assert_eq!(s.input_tokens, bs.input_tokens);
    assert_eq!(s.output_tokens, bs.output_tokens);
    // Collected: the store empties and the files are deleted.
    assert!(store_empties(&dir).await);
    let raw = Raw::new(&mock);
    let (_, files) = raw.json(Method::GET, "/files", None).await;
    assert_eq!(files["data"].as_array().unwrap().len(), 0, "{files}");
}

#[tokio::test(start_paused = true)]
async fn a_file_is_sent_when_full_or_after_max_wait() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("flush");
    let svc = layer(&dir)
        .max_lines(NonZeroUsize::new(4).unwrap())
        .max_wait(Duration::from_secs(60))
        .layer(transport(&mock));
    let t0 = Instant::now();
    let calls: Vec<_> = (0..10)
        .map(|i| {
            spawn(
                &svc,
                post(COMPATIBLE_CHAT, chat("qwen-plus", &format!("n{i}"))),
            )
        })
        .collect();
    let mut done = Vec::new();
    for c in calls {
        c.await.unwrap().unwrap();
        done.push(t0.elapsed());
    }
    // Two full files went at once; the last two lines waited a minute.
    assert!(done[7] < Duration::from_secs(60), "{done:?}");
    assert!(done[8] >= Duration::from_secs(60), "{done:?}");
    assert_eq!(mock.batch_stats().files_uploaded, 3);

    // By size: two ~200-byte lines per 500-byte file.
    let by_size = layer(&dir)
        .max_bytes(NonZeroUsize::new(500).unwrap())
        .max_wait(Duration::from_secs(60))
        .layer(transport(&mock));
    let t0 = Instant::now();
    let calls: Vec<_> = (0..4)
        .map(|i| {
            spawn(
                &by_size,
                post(
                    COMPATIBLE_CHAT,
                    chat("qwen-plus", &format!("{i}{}", "x".repeat(60))),
                ),
            )
        })
        .collect();
    let mut done = Vec::new();
    for c in calls {
        c.await.unwrap().unwrap();
        done.push(t0.elapsed());
    }
    // The first file was full at the third line; the last waited.
    assert!(done[1] < Duration::from_secs(60), "{done:?}");
    assert!(done[3] >= Duration::from_secs(60), "{done:?}");
    assert_eq!(mock.batch_stats().files_uploaded, 5);
}

#[tokio::test(start_paused = true)]
async fn a_new_model_beyond_the_open_file_cap_sends_the_oldest_file() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("open-files");
    let svc = layer(&dir)
        .max_open_files(NonZeroUsize::new(2).unwrap())
        .max_wait(Duration::from_secs(600))
        .layer(transport(&mock));
    let t0 = Instant::now();
    let first = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-plus", "a")));
    settle().await;
    let _second = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-max", "b")));
    settle().await;
    let _third = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-turbo", "c")));
    first.await.unwrap().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(600));
    assert_eq!(mock.batch_stats().files_uploaded, 1);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_custom_id_starts_a_new_file() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("dup-id");
    let svc = service(&mock, &dir);
    let mut calls = Vec::new();
    for text in ["first", "second"] {
        let mut req = post(COMPATIBLE_CHAT, chat("qwen-plus", text));
        req.extensions_mut().insert(CustomId("row-1".into()));
        calls.push(spawn(&svc, req));
    }
    for c in calls {
        let res = c.await.unwrap().unwrap();
        assert_eq!(
            res.extensions().get::<BatchLine>().unwrap().custom_id(),
            "row-1"
        );
    }
    let bs = mock.batch_stats();
    assert_eq!((bs.batches_created, bs.batches_failed), (2, 0));
}

#[tokio::test(start_paused = true)]
async fn what_cannot_be_batched_is_refused_at_once() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("refused");
    let svc = service(&mock, &dir);
    let mut stream = chat("qwen-plus", "x");
    stream["stream"] = json!(true);
    for req in [
        post(COMPATIBLE_CHAT, stream),
        post(
            "/api/v1/services/aigc/text-generation/generation",
            json!({"model": "qwen-plus"}),
        ),
        post(COMPATIBLE_CHAT, json!({"messages": []})),
        Request::post(COMPATIBLE_CHAT)
            .header("x-tower-qwen-custom-id", "no spaces")
            .body(Body::from(chat("qwen-plus", "x").to_string()))
            .unwrap(),
    ] {
        let e = svc.clone().oneshot(req).await.unwrap_err();
        assert!(batch_error(&e).is_unsupported(), "{e}");
    }
    assert_eq!(svc.stats().refused, 4);
    assert_eq!(mock.batch_stats().files_uploaded, 0);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_leaves_drops_only_its_line() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("drop-line");
    let svc = service(&mock, &dir);
    let keep1 = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-plus", "a")));
    let leave = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-plus", "b")));
    let keep2 = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-plus", "c")));
    settle().await;
    leave.abort();
    assert!(keep1.await.unwrap().is_ok());
    assert!(keep2.await.unwrap().is_ok());
    let bs = mock.batch_stats();
    assert_eq!((bs.batches_created, bs.lines_succeeded), (1, 2));
    assert_eq!(svc.stats().dropped, 1);
}

#[tokio::test(start_paused = true)]
async fn when_every_caller_leaves_the_batch_is_cancelled_upstream() {
    let mock = mock(BatchTiming::default().in_progress(Duration::from_secs(3600))).await;
    let dir = temp_dir("cancel-all");
    let svc = service(&mock, &dir);
    let calls = spawn_chats(&svc, 3);
    until_created(&mock).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    for c in &calls {
        c.abort();
    }
    // The next poll sees nobody waiting and cancels.
    eventually("the cancel", || svc.stats().cancelled_by_callers > 0).await;
    let raw = Raw::new(&mock);
    let (_, list) = raw.json(Method::GET, "/batches", None).await;
    let status = list["data"][0]["status"].as_str().unwrap();
    assert!(["cancelling", "cancelled"].contains(&status), "{status}");
    assert_eq!(mock.batch_stats().lines_succeeded, 0);
    // Its record is gone: nothing for a restart to collect.
    assert!(store_empties(&dir).await);
}

#[tokio::test(start_paused = true)]
async fn failed_expired_and_line_errors_reach_each_caller() {
    let mock = mock(BatchTiming::default()).await;
    let dir = temp_dir("failures");
    let svc = service(&mock, &dir);
    let run = |n: usize| {
        let calls: Vec<_> = (0..n)
            .map(|i| {
                spawn(
                    &svc,
                    post(COMPATIBLE_CHAT, chat("qwen-plus", &format!("q{i}"))),
                )
            })
            .collect();
        async move {
            let mut out = Vec::new();
            for c in calls {
                out.push(c.await.unwrap());
            }
            out
        }
    };

    // The whole batch fails.
    mock.set_batch_fault(BatchFault::Fail {
        code: "internal_error".into(),
        message: "boom".into(),
    });
    for r in run(3).await {
        let e = r.unwrap_err();
        let e = batch_error(&e);
        assert!(e.is_failed());
        assert_eq!(e.code(), Some("internal_error"));
        assert!(e.batch_id().is_some() && e.custom_id().is_some());
    }

    // It expires with half its lines done.
    mock.set_batch_fault(BatchFault::Expire { completed: 0.5 });
    let results = run(4).await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    let expired = results
        .iter()
        .filter(|r| r.as_ref().is_err_and(|e| batch_error(e).is_expired()))
        .count();
    assert_eq!((ok, expired), (2, 2));

    // Every third line fails with a 500: those callers get the 500
    // response, as they would in real time.
    mock.set_batch_fault(BatchFault::FailLines {
        every: NonZeroU32::new(3).unwrap(),
        error: ApiError::internal_error(),
    });
    let mut statuses = Vec::new();
    for r in run(6).await {
        let res = r.unwrap();
        let status = res.status().as_u16();
        if status == 500 {
            assert_eq!(body(res).await["error"]["code"], "internal_error");
        }
        statuses.push(status);
    }
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 200, 200, 200, 500, 500]);
    let s = svc.stats();
    assert_eq!((s.failed, s.expired, s.completed), (1, 1, 1));
    assert_eq!(s.errors, 3 + 2);

    // A model the Batch API does not take: validation fails the batch.
    mock.set_batch_fault(None);
    let dir2 = temp_dir("failures-model");
    let strict = tower_qwen::mock::MockDashScope::builder()
        .key(super::KEY, "acct")
        .batch_models(["qwen-max"])
        .batch_timing(BatchTiming::instant())
        .start()
        .await
        .unwrap();
    let e = service(&strict, &dir2)
        .oneshot(post(COMPATIBLE_CHAT, chat("qwen-plus", "x")))
        .await
        .unwrap_err();
    assert_eq!(batch_error(&e).code(), Some("model_not_found"));
}

#[tokio::test(start_paused = true)]
async fn a_batch_cancelled_upstream_ends_its_lines_as_cancelled() {
    let mock = mock(BatchTiming::default().in_progress(Duration::from_secs(100))).await;
    let dir = temp_dir("cancelled-upstream");
    let svc = service(&mock, &dir);
    let calls = spawn_chats(&svc, 10);
    until_created(&mock).await;
    // Someone else (the console) cancels it half-way.
    tokio::time::sleep(Duration::from_secs(50)).await;
    let raw = Raw::new(&mock);
    let (_, list) = raw.json(Method::GET, "/batches", None).await;
    let id = list["data"][0]["id"].as_str().unwrap().to_owned();
    let (status, _) = raw
        .json(Method::POST, &format!("/batches/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    let mut ok = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(res) => {
                assert_eq!(res.status(), 200);
                ok += 1;
            }
            Err(e) => assert!(batch_error(&e).is_cancelled(), "{e}"),
        }
    }
    assert!((3..=6).contains(&ok), "{ok}");
    assert_eq!(svc.stats().cancelled, 1);
}

/// The transport, with scripted trouble on the Files and Batch API.
#[derive(Clone)]
struct Flaky {
    inner: SetUpstream<HttpClient>,
    uploads_failed: Arc<AtomicUsize>,
    creates_lost: Arc<AtomicUsize>,
}

type Fut = Pin<Box<dyn Future<Output = Result<Response<Incoming>, BoxError>> + Send>>;

impl Service<Request<Body>> for Flaky {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = Fut;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Body>) -> Fut {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let fut = self.inner.call(req);
        let (uploads, creates) = (self.uploads_failed.clone(), self.creates_lost.clone());
        Box::pin(async move {
            if method == Method::POST
                && path.ends_with("/files")
                && uploads.load(Ordering::SeqCst) > 0
            {
                uploads.fetch_sub(1, Ordering::SeqCst);
                drop(fut);
                return Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                )));
            }
            let res = fut.await.map_err(BoxError::from)?;
            if method == Method::POST
                && path.ends_with("/batches")
                && creates.load(Ordering::SeqCst) > 0
            {
                // The batch was created, but the answer is lost.
                creates.fetch_sub(1, Ordering::SeqCst);
                let _ = res.into_body().collect().await;
                return Err(BoxError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                )));
            }
            Ok(res)
        })
    }
}

#[tokio::test(start_paused = true)]
async fn transient_api_failures_are_retried_without_duplicate_batches() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("flaky");
    let flaky = Flaky {
        inner: transport(&mock),
        uploads_failed: Arc::new(AtomicUsize::new(2)),
        creates_lost: Arc::new(AtomicUsize::new(1)),
    };
    let svc: Batch<Flaky> = layer(&dir).layer(flaky.clone());
    let res = svc
        .clone()
        .oneshot(post(COMPATIBLE_CHAT, chat("qwen-plus", "x")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let bs = mock.batch_stats();
    // Two uploads failed before reaching the mock; the lost create was
    // found by its input file instead of being created again.
    assert_eq!((bs.files_uploaded, bs.batches_created), (1, 1));

    // Failing for good: the caller gets an upstream error.
    flaky.uploads_failed.store(100, Ordering::SeqCst);
    let e = svc
        .oneshot(post(COMPATIBLE_CHAT, chat("qwen-plus", "y")))
        .await
        .unwrap_err();
    let e = batch_error(&e);
    assert!(e.is_upstream(), "{e}");
    assert!(std::error::Error::source(e).is_some());
}

#[tokio::test(start_paused = true)]
async fn a_bad_key_fails_every_caller_with_the_status() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("bad-key");
    let bad = tower_qwen::client::SetUpstreamLayer::new(
        mock.base_url().parse().unwrap(),
        tower_qwen::client::ApiKey::new("sk-nope").unwrap(),
    )
    .layer(tower_qwen::client::TransportConfig::new().build());
    let svc = layer(&dir).layer(bad);
    let e = svc
        .oneshot(post(COMPATIBLE_CHAT, chat("qwen-plus", "x")))
        .await
        .unwrap_err();
    let e = batch_error(&e);
    assert!(e.is_upstream());
    assert_eq!(e.status(), Some(401));
    assert_eq!(e.code(), Some("invalid_api_key"));
    assert!(!e.to_string().contains("sk-nope"));
}

#[tokio::test(start_paused = true)]
async fn dropping_the_service_sends_what_is_filling() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("drop-service");
    let svc = layer(&dir)
        .max_wait(Duration::from_secs(3600))
        .layer(transport(&mock));
    let t0 = Instant::now();
    let call = spawn(&svc, post(COMPATIBLE_CHAT, chat("qwen-plus", "x")));
    settle().await;
    drop(svc);
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(t0.elapsed() < Duration::from_secs(3600));
}

#[tokio::test(start_paused = true)]
async fn the_dry_run_model_goes_to_the_test_endpoint() {
    let mock = mock(BatchTiming::instant()).await;
    let dir = temp_dir("dry-run");
    let svc = service(&mock, &dir);
    let res = svc
        .oneshot(post(COMPATIBLE_CHAT, chat("batch-test-model", "hello")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v = body(res).await;
    assert_eq!(v["model"], "batch-test-model");
    assert_eq!(mock.batch_stats().input_tokens, 0);
}
