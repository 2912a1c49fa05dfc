#![cfg(feature = "coalesce")]
//! Tests of the `coalesce` layer: merging, max wait, keys, errors, splits,
//! drops, pass-through, usage, clones and the batcher's lifetime. Paused
//! tokio time throughout; the fake upstream lives in `fake.rs`, and the
//! last tests run against the mock DashScope server.

mod fake;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use tower::{Service, ServiceExt};
use tower_layer::Layer;
use tower_qwen::BoxError;
use tower_qwen::body::Body;
use tower_qwen::classify::{Classifier, Outcome, ThrottleCause};
use tower_qwen::coalesce::error::BatchFailed;
use tower_qwen::coalesce::{Coalesce, CoalesceLayer, ResponseBody};

use fake::{COMPAT, Fake, FakeSvc, Mode, NATIVE, tokens, vector};

type Svc = Coalesce<FakeSvc>;
type Res = Response<ResponseBody<Full<Bytes>>>;

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

fn stack(fake: &Arc<Fake>, layer: CoalesceLayer) -> Svc {
    layer.layer(FakeSvc(fake.clone()))
}

fn native(model: &str, texts: &[&str], key: &str) -> Request<Body> {
    let body = json!({"model": model, "input": {"texts": texts}, "parameters": {"dimension": 2}});
    Request::post(format!("http://dashscope.test{NATIVE}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn compat(body: Value, key: &str) -> Request<Body> {
    Request::post(format!("http://dashscope.test{COMPAT}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn text(i: usize) -> String {
    format!("text number {i} {}", "x".repeat(i % 7))
}

/// Lets every spawned task run until it waits on something.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

fn spawn_call(svc: &Svc, req: Request<Body>) -> JoinHandle<Result<Res, BoxError>> {
    let svc = svc.clone();
    tokio::spawn(svc.oneshot(req))
}

async fn json_of(res: Res) -> (StatusCode, Value, bool) {
    let status = res.status();
    let rebuilt = res.body().is_rebuilt();
    let bytes = res.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap(), rebuilt)
}

async fn join_all(handles: Vec<JoinHandle<Result<Res, BoxError>>>) -> Vec<Result<Res, BoxError>> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

fn embedding(v: &Value, native: bool) -> Vec<f64> {
    let e = if native {
        &v["output"]["embeddings"][0]["embedding"]
    } else {
        &v["data"][0]["embedding"]
    };
    e.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn merges_concurrent_single_texts_into_capped_batches() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..25)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    let results = join_all(handles).await;
    // 25 texts at a cap of 10: 3 upstream calls.
    let mut sizes = fake.sizes();
    sizes.sort_unstable();
    assert_eq!(sizes, vec![5, 10, 10]);
    let mut usage_sum = 0;
    for (i, r) in results.into_iter().enumerate() {
        let (status, v, rebuilt) = json_of(r.unwrap()).await;
        assert_eq!(status, 200);
        assert!(rebuilt);
        assert_eq!(
            embedding(&v, true),
            vector(&text(i)),
            "caller {i} got another vector"
        );
        let list = v["output"]["embeddings"].as_array().unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0]["text_index"], 0);
        assert!(v["request_id"].as_str().unwrap().starts_with("req-"));
        usage_sum += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    let total: u64 = (0..25).map(|i| tokens(&text(i))).sum();
    assert_eq!(
        usage_sum, total,
        "usage shares must add up to the upstream totals"
    );
    let stats = svc.stats();
    assert_eq!((stats.coalesced, stats.upstream_calls), (25, 3));
}

#[tokio::test(start_paused = true)]
async fn compatible_shape_is_kept() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..4)
        .map(|i| {
            // Both input shapes merge: a string and a one-element array.
            let input = if i % 2 == 0 { json!(text(i)) } else { json!([text(i)]) };
            let body = json!({"model": "text-embedding-v3", "input": input, "dimensions": 512, "encoding_format": "float"});
            spawn_call(&svc, compat(body, "sk-a"))
        })
        .collect();
    let results = join_all(handles).await;
    assert_eq!(fake.sizes(), vec![4]);
    let sent: Value = serde_json::from_slice(&fake.calls()[0].body).unwrap();
    assert_eq!(sent["dimensions"], 512);
    assert_eq!(sent["encoding_format"], "float");
    assert_eq!(sent["model"], "text-embedding-v3");
    let mut sum = (0, 0);
    for (i, r) in results.into_iter().enumerate() {
        let (_, v, _) = json_of(r.unwrap()).await;
        assert_eq!(embedding(&v, false), vector(&text(i)));
        assert_eq!(v["data"][0]["index"], 0);
        assert_eq!(v["data"][0]["object"], "embedding");
        assert_eq!(v["object"], "list");
        assert_eq!(v["model"], "text-embedding-v3");
        sum.0 += v["usage"]["prompt_tokens"].as_u64().unwrap();
        sum.1 += v["usage"]["total_tokens"].as_u64().unwrap();
    }
    let total: u64 = (0..4).map(|i| tokens(&text(i))).sum();
    assert_eq!(sum, (total, total));
}

#[tokio::test(start_paused = true)]
async fn flushes_after_max_wait() {
    let fake = Arc::new(Fake::default());
    let svc = stack(
        &fake,
        CoalesceLayer::new().max_wait(Duration::from_millis(20)),
    );
    let handles: Vec<_> = (0..3)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    settle().await;
    tokio::time::advance(Duration::from_millis(19)).await;
    settle().await;
    assert!(fake.calls().is_empty(), "sent before the max wait");
    assert!(handles.iter().all(|h| !h.is_finished()));
    tokio::time::advance(Duration::from_millis(1)).await;
    settle().await;
    assert_eq!(fake.sizes(), vec![3]);
    for r in join_all(handles).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    // A later text starts a new batch with its own wait.
    let h = spawn_call(&svc, native("text-embedding-v4", &["late"], "sk-a"));
    settle().await;
    tokio::time::advance(Duration::from_millis(10)).await;
    settle().await;
    assert_eq!(fake.calls().len(), 1);
    tokio::time::advance(Duration::from_millis(10)).await;
    let (_, v, _) = json_of(h.await.unwrap().unwrap()).await;
    assert_eq!(embedding(&v, true), vector("late"));
    assert_eq!(fake.sizes(), vec![3, 1]);
}

#[tokio::test(start_paused = true)]
async fn a_full_batch_does_not_wait() {
    let fake = Arc::new(Fake::default());
    let svc = stack(
        &fake,
        CoalesceLayer::new()
            .max_wait(Duration::from_secs(3600))
            .max_batch("text-embedding-v4", nz(4)),
    );
    let handles: Vec<_> = (0..4)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    settle().await;
    assert_eq!(fake.sizes(), vec![4]);
    for h in handles {
        assert!(h.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn never_merges_different_models_params_keys_or_headers() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    let mut reqs = vec![
        native("text-embedding-v4", &["a"], "sk-a"),
        native("text-embedding-v4", &["b"], "sk-a"), // merges with the first
        native("text-embedding-v4", &["c"], "sk-b"), // another key
        native("text-embedding-v3", &["d"], "sk-a"), // another model
        compat(json!({"model": "text-embedding-v4", "input": "e"}), "sk-a"), // another endpoint
    ];
    // Other parameters.
    let body = json!({"model": "text-embedding-v4", "input": {"texts": ["f"]}, "parameters": {"dimension": 512}});
    reqs.push(
        Request::post(format!("http://dashscope.test{NATIVE}"))
            .header("authorization", "Bearer sk-a")
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap(),
    );
    // Another workspace.
    let mut ws = native("text-embedding-v4", &["g"], "sk-a");
    ws.headers_mut()
        .insert("x-dashscope-workspace", "ws-2".parse().unwrap());
    reqs.push(ws);
    // A trace id alone does not split a batch.
    let mut traced = native("text-embedding-v4", &["h"], "sk-a");
    traced
        .headers_mut()
        .insert("traceparent", "00-abc-def-01".parse().unwrap());
    reqs.push(traced);
    let handles: Vec<_> = reqs.into_iter().map(|r| spawn_call(&svc, r)).collect();
    let results = join_all(handles).await;
    let calls = fake.calls();
    assert_eq!(calls.len(), 6);
    let mut groups: Vec<Vec<String>> = calls.iter().map(|c| c.texts.clone()).collect();
    groups.sort();
    assert_eq!(
        groups,
        vec![
            vec!["a", "b", "h"],
            vec!["c"],
            vec!["d"],
            vec!["e"],
            vec!["f"],
            vec!["g"]
        ]
        .into_iter()
        .map(|g| g.into_iter().map(str::to_owned).collect::<Vec<_>>())
        .collect::<Vec<_>>()
    );
    // Each call carried the key of its own callers.
    for c in &calls {
        let key = c.headers["authorization"].to_str().unwrap();
        let expected = if c.texts == ["c"] {
            "Bearer sk-b"
        } else {
            "Bearer sk-a"
        };
        assert_eq!(key, expected);
        if c.texts == ["g"] {
            assert_eq!(c.headers["x-dashscope-workspace"], "ws-2");
        } else {
            assert!(!c.headers.contains_key("x-dashscope-workspace"));
        }
    }
    for (r, t) in results
        .into_iter()
        .zip(["a", "b", "c", "d", "e", "f", "g", "h"])
    {
        let (_, v, _) = json_of(r.unwrap()).await;
        assert_eq!(embedding(&v, t != "e"), vector(t));
    }
}

#[tokio::test(start_paused = true)]
async fn an_error_answer_reaches_every_caller() {
    const BODY: &str = r#"{"request_id":"r1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#;
    let fake = Arc::new(Fake::default());
    *fake.mode.lock().unwrap() = Mode::Status(429, BODY);
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..4)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    let results = join_all(handles).await;
    assert_eq!(fake.calls().len(), 1);
    for r in results {
        let res = r.unwrap();
        assert_eq!(res.status(), 429);
        assert_eq!(res.headers()["x-request-id"], "fake");
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, BODY.as_bytes());
        assert_eq!(
            Classifier::new().classify(StatusCode::TOO_MANY_REQUESTS, &Default::default(), &bytes),
            Outcome::throttled(ThrottleCause::Requests)
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_business_error_in_a_200_reaches_every_caller() {
    const BODY: &str = r#"{"code":"Arrearage","message":"Access denied, please make sure your account is in good standing.","request_id":"r2"}"#;
    let fake = Arc::new(Fake::default());
    *fake.mode.lock().unwrap() = Mode::Status(200, BODY);
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..3)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    for r in join_all(handles).await {
        let res = r.unwrap();
        assert_eq!(res.status(), 200);
        let bytes = res.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, BODY.as_bytes());
    }
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_transport_error_reaches_every_caller() {
    let fake = Arc::new(Fake::default());
    *fake.mode.lock().unwrap() = Mode::Reset;
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..3)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    for r in join_all(handles).await {
        let err = r.unwrap_err();
        let failed = err.downcast_ref::<BatchFailed>().expect("a BatchFailed");
        assert!(failed.is_upstream());
        let source = std::error::Error::source(failed).unwrap();
        let io = source.downcast_ref::<std::io::Error>().unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::ConnectionReset);
        assert!(Classifier::new().classify_error(&err).is_transient());
        assert!(
            err.to_string()
                .starts_with("merged embedding request failed")
        );
    }
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_success_is_an_error_for_every_caller() {
    let fake = Arc::new(Fake::default());
    *fake.mode.lock().unwrap() = Mode::Status(
        200,
        r#"{"output":{"embeddings":[]},"usage":{"total_tokens":1}}"#,
    );
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..2)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    for r in join_all(handles).await {
        let err = r.unwrap_err();
        assert!(err.downcast_ref::<BatchFailed>().unwrap().is_malformed());
        assert!(Classifier::new().classify_error(&err).is_permanent());
    }
}

#[tokio::test(start_paused = true)]
async fn a_size_error_splits_the_batch_and_lowers_the_cap() {
    let fake = Arc::new(Fake::default());
    *fake.cap.lock().unwrap() = Some((4, true));
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..10)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    let results = join_all(handles).await;
    let sizes = fake.sizes();
    assert_eq!(sizes[0], 10, "first the whole batch, refused");
    let mut rest = sizes[1..].to_vec();
    rest.sort_unstable();
    assert_eq!(rest, vec![2, 4, 4], "then chunks of the stated limit");
    for (i, r) in results.into_iter().enumerate() {
        let (status, v, _) = json_of(r.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(embedding(&v, true), vector(&text(i)));
    }
    assert_eq!(svc.stats().size_splits, 1);
    // The learned limit applies from now on: no refusal this time.
    let handles: Vec<_> = (10..18)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    for r in join_all(handles).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(&fake.sizes()[4..], &[4, 4]);
    assert_eq!(svc.stats().size_splits, 1);
}

#[tokio::test(start_paused = true)]
async fn a_size_error_without_a_limit_halves_until_accepted() {
    let fake = Arc::new(Fake::default());
    *fake.cap.lock().unwrap() = Some((3, false));
    let svc = stack(
        &fake,
        CoalesceLayer::new().max_batch("text-embedding-v4", nz(8)),
    );
    let handles: Vec<_> = (0..8)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    let results = join_all(handles).await;
    let mut sizes = fake.sizes();
    sizes.sort_unstable();
    // 8 refused, 4 + 4 refused, 2 + 2 + 2 + 2 accepted.
    assert_eq!(sizes, vec![2, 2, 2, 2, 4, 4, 8]);
    for (i, r) in results.into_iter().enumerate() {
        let (_, v, _) = json_of(r.unwrap()).await;
        assert_eq!(embedding(&v, true), vector(&text(i)));
    }
}

#[tokio::test(start_paused = true)]
async fn a_single_text_refused_as_too_large_gets_the_answer() {
    let fake = Arc::new(Fake::default());
    *fake.cap.lock().unwrap() = Some((0, true));
    let svc = stack(&fake, CoalesceLayer::new());
    let res = svc
        .clone()
        .oneshot(native("text-embedding-v4", &["x"], "sk-a"))
        .await
        .unwrap();
    assert_eq!(res.status(), 400);
    assert_eq!(fake.calls().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_drops_before_the_flush_is_left_out() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..3)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    settle().await;
    handles[1].abort();
    settle().await;
    tokio::time::advance(Duration::from_millis(5)).await;
    settle().await;
    assert_eq!(fake.calls()[0].texts, vec![text(0), text(2)]);
    let mut it = handles.into_iter();
    let (_, v, _) = json_of(it.next().unwrap().await.unwrap().unwrap()).await;
    assert_eq!(embedding(&v, true), vector(&text(0)));
    assert!(it.next().unwrap().await.unwrap_err().is_cancelled());
    let (_, v, _) = json_of(it.next().unwrap().await.unwrap().unwrap()).await;
    assert_eq!(embedding(&v, true), vector(&text(2)));
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_drops_during_the_call_does_not_break_the_others() {
    let fake = Arc::new(Fake {
        delay: Duration::from_secs(1),
        ..Default::default()
    });
    let svc = stack(&fake, CoalesceLayer::new());
    let handles: Vec<_> = (0..3)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    settle().await;
    tokio::time::advance(Duration::from_millis(5)).await;
    settle().await;
    assert_eq!(fake.sizes(), vec![3]);
    handles[0].abort();
    tokio::time::advance(Duration::from_secs(1)).await;
    let results: Vec<_> = {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await);
        }
        out
    };
    assert!(results[0].as_ref().unwrap_err().is_cancelled());
    for (i, r) in results.into_iter().enumerate().skip(1) {
        let (_, v, _) = json_of(r.unwrap().unwrap()).await;
        assert_eq!(embedding(&v, true), vector(&text(i)));
    }
}

#[tokio::test(start_paused = true)]
async fn multi_text_requests_under_the_cap_pass_through_untouched() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    let req = native("text-embedding-v4", &["a", "b", "c"], "sk-a");
    let sent = req.body().buffered().unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert!(!res.body().is_rebuilt());
    let (_, v, _) = json_of(res).await;
    assert_eq!(v["output"]["embeddings"].as_array().unwrap().len(), 3);
    assert_eq!(fake.calls()[0].body, sent);
    assert_eq!(svc.stats().passed_through, 1);
}

use tower_qwen::body::BufferedBody;

#[tokio::test(start_paused = true)]
async fn multi_text_requests_over_the_cap_are_split_and_joined() {
    for native_shape in [true, false] {
        let fake = Arc::new(Fake::default());
        let svc = stack(&fake, CoalesceLayer::new());
        let texts: Vec<String> = (0..23).map(text).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let req = if native_shape {
            native("text-embedding-v4", &refs, "sk-a")
        } else {
            compat(json!({"model": "text-embedding-v4", "input": refs}), "sk-a")
        };
        let res = svc.clone().oneshot(req).await.unwrap();
        let (status, v, rebuilt) = json_of(res).await;
        assert_eq!(status, 200);
        assert!(rebuilt);
        let mut sizes = fake.sizes();
        sizes.sort_unstable();
        assert_eq!(sizes, vec![3, 10, 10]);
        let (list, index) = if native_shape {
            (v["output"]["embeddings"].as_array().unwrap(), "text_index")
        } else {
            (v["data"].as_array().unwrap(), "index")
        };
        assert_eq!(list.len(), 23);
        for (i, e) in list.iter().enumerate() {
            assert_eq!(e[index], i);
            let got: Vec<f64> = e["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(got, vector(&texts[i]));
        }
        let total: u64 = texts.iter().map(|t| tokens(t)).sum();
        assert_eq!(v["usage"]["total_tokens"], total);
        assert_eq!(svc.stats().chunked, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_failed_chunk_fails_the_joined_request() {
    const BODY: &str = r#"{"request_id":"r1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#;
    let fake = Arc::new(Fake::default());
    *fake.mode.lock().unwrap() = Mode::Status(429, BODY);
    let svc = stack(&fake, CoalesceLayer::new());
    let texts: Vec<String> = (0..12).map(text).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let res = svc
        .clone()
        .oneshot(native("text-embedding-v4", &refs, "sk-a"))
        .await
        .unwrap();
    assert_eq!(res.status(), 429);
    assert_eq!(fake.calls().len(), 2);
}

#[tokio::test(start_paused = true)]
async fn other_requests_pass_through_untouched() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    // A chat request, whose (event-stream) answer is handed on as is.
    let chat = r#"{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}],"stream":true}"#;
    let req = Request::post("http://dashscope.test/compatible-mode/v1/chat/completions")
        .body(Body::from(chat))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert!(!res.body().is_rebuilt());
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    assert_eq!(res.into_body().collect().await.unwrap().to_bytes(), chat);
    // A streamed (unbuffered) embedding body.
    let body = json!({"model": "text-embedding-v4", "input": {"texts": ["s"]}}).to_string();
    let req = Request::post(format!("http://dashscope.test{NATIVE}"))
        .body(Body::stream(Full::new(Bytes::from(body.clone()))))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert!(!res.body().is_rebuilt());
    // An async batch-embedding task submission.
    let req = Request::post(format!("http://dashscope.test{NATIVE}"))
        .header("x-dashscope-async", "enable")
        .body(Body::from(body.clone()))
        .unwrap();
    assert!(!svc.clone().oneshot(req).await.unwrap().body().is_rebuilt());
    // A GET.
    let req = Request::get(format!("http://dashscope.test{NATIVE}"))
        .body(Body::empty())
        .unwrap();
    assert!(!svc.clone().oneshot(req).await.unwrap().body().is_rebuilt());
    let calls = fake.calls();
    assert_eq!(calls.len(), 4);
    assert_eq!(calls[0].body, chat);
    assert_eq!(calls[0].path, "/compatible-mode/v1/chat/completions");
    assert_eq!(calls[1].body, body);
    assert_eq!(svc.stats().passed_through, 4);
    assert_eq!(svc.stats().coalesced, 0);
}

#[tokio::test(start_paused = true)]
async fn usage_shares_follow_text_length_and_sum_to_the_total() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new());
    let texts = [
        "a",
        "a much longer text than the first one, by far",
        "mid-sized text",
    ];
    let handles: Vec<_> = texts
        .iter()
        .map(|t| spawn_call(&svc, native("text-embedding-v4", &[t], "sk-a")))
        .collect();
    let mut shares = Vec::new();
    for r in join_all(handles).await {
        let (_, v, _) = json_of(r.unwrap()).await;
        shares.push(v["usage"]["total_tokens"].as_u64().unwrap());
    }
    assert_eq!(
        shares.iter().sum::<u64>(),
        texts.iter().map(|t| tokens(t)).sum::<u64>()
    );
    assert!(shares[1] > shares[2] && shares[2] > shares[0], "{shares:?}");
}

#[tokio::test(start_paused = true)]
async fn clones_share_one_batcher() {
    let fake = Arc::new(Fake::default());
    let a = stack(&fake, CoalesceLayer::new());
    let b = a.clone();
    let h1 = spawn_call(&a, native("text-embedding-v4", &["one"], "sk-a"));
    let h2 = spawn_call(&b, native("text-embedding-v4", &["two"], "sk-a"));
    assert!(h1.await.unwrap().is_ok() && h2.await.unwrap().is_ok());
    assert_eq!(fake.sizes(), vec![2]);
    assert_eq!(a.stats(), b.stats());
    // Two services from one layer do not share.
    let layer = CoalesceLayer::new();
    let (c, d) = (stack(&fake, layer.clone()), stack(&fake, layer));
    let h1 = spawn_call(&c, native("text-embedding-v4", &["three"], "sk-a"));
    let h2 = spawn_call(&d, native("text-embedding-v4", &["four"], "sk-a"));
    assert!(h1.await.unwrap().is_ok() && h2.await.unwrap().is_ok());
    assert_eq!(fake.sizes(), vec![2, 1, 1]);
}

#[tokio::test(start_paused = true)]
async fn the_batcher_ends_when_the_service_is_dropped() {
    let fake = Arc::new(Fake::default());
    let svc = stack(
        &fake,
        CoalesceLayer::new().max_wait(Duration::from_secs(60)),
    );
    let h = spawn_call(&svc, native("text-embedding-v4", &["pending"], "sk-a"));
    settle().await;
    // The batcher holds a clone of the inner service.
    assert_eq!(Arc::strong_count(&fake), 3);
    drop(svc);
    settle().await;
    // Dropping the last clone sends what was waiting at once...
    assert_eq!(fake.sizes(), vec![1]);
    let (_, v, _) = json_of(h.await.unwrap().unwrap()).await;
    assert_eq!(embedding(&v, true), vector("pending"));
    settle().await;
    // ...and the batcher (and its clone of the inner service) is gone.
    assert_eq!(Arc::strong_count(&fake), 1);
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_makes_callers_wait_for_a_slot() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = Arc::new(Fake {
        gate: Some(gate.clone()),
        ..Default::default()
    });
    let svc = stack(&fake, CoalesceLayer::new().queue_capacity(nz(2)));
    let handles: Vec<_> = (0..3)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    settle().await;
    tokio::time::advance(Duration::from_millis(5)).await;
    settle().await;
    // Two slots: the third caller is not in the batch.
    assert_eq!(fake.sizes(), vec![2]);
    tokio::time::advance(Duration::from_secs(10)).await;
    settle().await;
    assert_eq!(
        fake.sizes(),
        vec![2],
        "the third text waits while the slots are taken"
    );
    assert!(handles.iter().all(|h| !h.is_finished()));
    // The answer frees the slots; the third text goes next.
    gate.add_permits(1);
    settle().await;
    tokio::time::advance(Duration::from_millis(5)).await;
    settle().await;
    assert_eq!(fake.sizes(), vec![2, 1]);
    gate.add_permits(1);
    for (i, r) in join_all(handles).await.into_iter().enumerate() {
        let (_, v, _) = json_of(r.unwrap()).await;
        assert_eq!(embedding(&v, true), vector(&text(i)));
    }
}

#[tokio::test(start_paused = true)]
async fn a_caller_that_drops_frees_its_slot() {
    let fake = Arc::new(Fake::default());
    let svc = stack(&fake, CoalesceLayer::new().queue_capacity(nz(2)));
    let gone: Vec<_> = (0..2)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    settle().await;
    let waiting = spawn_call(&svc, native("text-embedding-v4", &["third"], "sk-a"));
    settle().await;
    gone.iter().for_each(JoinHandle::abort);
    settle().await;
    // The batch of the two callers that went away is dropped unsent, which
    // frees their slots for the third.
    tokio::time::advance(Duration::from_millis(5)).await;
    settle().await;
    tokio::time::advance(Duration::from_millis(5)).await;
    let (_, v, _) = json_of(waiting.await.unwrap().unwrap()).await;
    assert_eq!(embedding(&v, true), vector("third"));
    assert_eq!(fake.sizes(), vec![1]);
}

#[tokio::test(start_paused = true)]
async fn a_huge_max_wait_does_not_overflow() {
    let fake = Arc::new(Fake::default());
    let svc = stack(
        &fake,
        CoalesceLayer::new()
            .max_wait(Duration::MAX)
            .max_batch("text-embedding-v4", nz(2)),
    );
    let handles: Vec<_> = (0..2)
        .map(|i| spawn_call(&svc, native("text-embedding-v4", &[&text(i)], "sk-a")))
        .collect();
    for r in join_all(handles).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(fake.sizes(), vec![2]);
}

#[test]
fn outside_a_runtime_a_single_text_is_sent_alone() {
    let fake = Arc::new(Fake::default());
    let mut svc = stack(&fake, CoalesceLayer::new());
    let fut = svc.call(native("text-embedding-v4", &["alone"], "sk-a"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let res = rt.block_on(fut).unwrap();
    assert!(!res.body().is_rebuilt());
    assert_eq!(fake.sizes(), vec![1]);
    assert_eq!(svc.stats().passed_through, 1);
}

#[tokio::test(start_paused = true)]
async fn a_waiting_caller_is_woken_by_its_answer() {
    let fake = Arc::new(Fake::default());
    let mut svc = stack(&fake, CoalesceLayer::new());
    std::future::poll_fn(|cx| Service::<Request<Body>>::poll_ready(&mut svc, cx))
        .await
        .unwrap();
    let mut fut = tokio_test::task::spawn(svc.call(native("text-embedding-v4", &["w"], "sk-a")));
    tokio_test::assert_pending!(fut.poll());
    settle().await;
    assert!(!fut.is_woken());
    tokio::time::advance(Duration::from_millis(5)).await;
    settle().await;
    assert!(fut.is_woken());
    let res = tokio_test::assert_ready_ok!(fut.poll());
    let (_, v, _) = json_of(res).await;
    assert_eq!(embedding(&v, true), vector("w"));
}

#[cfg(feature = "mock")]
mod against_the_mock {
    use super::*;
    use hyper_util::client::legacy::Client;
    use hyper_util::rt::TokioExecutor;
    use tower_qwen::mock::MockDashScope;

    type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Body>;

    fn client() -> HttpClient {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn req(base: &str, path: &str, body: Value) -> Request<Body> {
        Request::post(format!("{base}{path}"))
            .header(
                "authorization",
                format!("Bearer {}", MockDashScope::DEFAULT_KEY),
            )
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    }

    async fn body_json<B>(res: Response<B>) -> Value
    where
        B: http_body::Body,
        B::Error: std::fmt::Debug,
    {
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn every_caller_gets_the_vector_it_would_get_alone() {
        let mock = MockDashScope::builder().start().await.unwrap();
        let base = mock.base_url();
        let client = client();
        let svc = Coalesce::new(client.clone());
        for (path, native) in [(NATIVE, true), (COMPAT, false)] {
            mock.reset_stats();
            let body_for = |t: &str| {
                if native {
                    json!({"model": "text-embedding-v4", "input": {"texts": [t]}, "parameters": {"dimension": 64}})
                } else {
                    json!({"model": "text-embedding-v4", "input": t, "dimensions": 64})
                }
            };
            let handles: Vec<_> = (0..25)
                .map(|i| {
                    let svc = svc.clone();
                    tokio::spawn(svc.oneshot(req(&base, path, body_for(&text(i)))))
                })
                .collect();
            let mut merged = Vec::new();
            for h in handles {
                merged.push(body_json(h.await.unwrap().unwrap()).await);
            }
            let stats = mock.stats();
            assert_eq!(stats.calls("text-embedding-v4"), 3, "25 texts, 10 per call");
            assert_eq!(stats.status(200), 3);
            let mut usage = 0;
            for (i, v) in merged.iter().enumerate() {
                // The same text sent alone, straight to the mock.
                let alone = body_json(
                    client
                        .request(req(&base, path, body_for(&text(i))))
                        .await
                        .unwrap(),
                )
                .await;
                assert_eq!(
                    embedding(v, native),
                    embedding(&alone, native),
                    "caller {i}"
                );
                usage += v["usage"]["total_tokens"].as_u64().unwrap();
            }
            assert_eq!(
                usage, stats.input_tokens,
                "usage shares add up to what the mock charged"
            );
        }
        mock.shutdown().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_mock_batch_limit_is_learned() {
        let mock = MockDashScope::builder().start().await.unwrap();
        let base = mock.base_url();
        // Configured too high for the mock's limit of 10.
        let svc = CoalesceLayer::new()
            .max_batch("text-embedding-v4", nz(25))
            .layer(client());
        let handles: Vec<_> = (0..25)
            .map(|i| {
                let body = json!({"model": "text-embedding-v4", "input": {"texts": [text(i)]}});
                tokio::spawn(svc.clone().oneshot(req(&base, NATIVE, body)))
            })
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            let v = body_json(h.await.unwrap().unwrap()).await;
            assert_eq!(
                v["output"]["embeddings"][0]["text_index"], 0,
                "caller {i}: {v}"
            );
        }
        let stats = mock.stats();
        // One refused call of 25, then 10 + 10 + 5.
        assert_eq!(stats.status(400), 1);
        assert_eq!(stats.status(200), 3);
        assert_eq!(svc.stats().size_splits, 1);
        mock.shutdown().await;
    }
}
