#![cfg(all(feature = "client", feature = "mock"))]
//! The client preset end to end against the mock DashScope server.

use std::num::{NonZeroU32, NonZeroU64};
use std::time::Duration;

use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_qwen::client::{ChatRequest, EmbeddingRequest, QwenClient};
use tower_qwen::mock::{MockDashScope, Quota};
use tower_qwen::rate_limit::{Limits, Quota as RlQuota};
use tower_qwen::sse::parse_events;

async fn mock_with_quota(rpm: u32) -> tower_qwen::mock::MockHandle {
    MockDashScope::builder()
        .key("sk-client-test", "acct")
        .quota(
            "qwen-plus",
            Quota::new(
                NonZeroU32::new(rpm).unwrap(),
                NonZeroU64::new(10_000_000).unwrap(),
            ),
        )
        .start()
        .await
        .unwrap()
}

fn client(mock: &tower_qwen::mock::MockHandle, rpm: u32) -> QwenClient {
    client_with(mock, rpm, 10_000_000)
}

/// A client whose qwen-plus budget is `rpm` (one request of burst) and
/// `tpm`.
fn client_with(mock: &tower_qwen::mock::MockHandle, rpm: u32, tpm: u32) -> QwenClient {
    QwenClient::builder()
        .base_url(mock.base_url().parse().unwrap())
        .api_key("sk-client-test")
        .unwrap()
        .quota(
            "qwen-plus",
            Limits::requests(
                RlQuota::per_minute(NonZeroU32::new(rpm).unwrap()).allow_burst(NonZeroU32::MIN),
            )
            .and_tokens(RlQuota::per_minute(NonZeroU32::new(tpm).unwrap())),
        )
        .build()
        .unwrap()
}

#[tokio::test(start_paused = true)]
async fn chat_and_streams_in_both_dialects() {
    let mock = mock_with_quota(6000).await;
    let client = client(&mock, 6000);
    // Non-streamed, compatible.
    let res = client
        .clone()
        .oneshot(
            ChatRequest::new("qwen-plus")
                .user("Hello")
                .max_tokens(5)
                .into_request(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let v: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 5);
    // Streamed, compatible: include_usage was set by the request builder.
    let res = client
        .clone()
        .oneshot(
            ChatRequest::new("qwen-plus")
                .user("Hello")
                .max_tokens(4)
                .stream(true)
                .into_request(),
        )
        .await
        .unwrap();
    assert_eq!(res.headers()["content-type"], "text/event-stream");
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let events = parse_events(&body);
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let tail: serde_json::Value = serde_json::from_str(&events[events.len() - 2].data).unwrap();
    assert_eq!(tail["choices"], serde_json::json!([]));
    assert_eq!(tail["usage"]["completion_tokens"], 4);
    // Streamed, native.
    let res = client
        .clone()
        .oneshot(
            ChatRequest::new("qwen-plus")
                .user("Hello")
                .max_tokens(3)
                .stream(true)
                .native()
                .into_request(),
        )
        .await
        .unwrap();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let events = parse_events(&body);
    assert_eq!(events.len(), 3);
    assert!(events.iter().all(|e| e.http_status == Some(200)));
    // Embeddings.
    let res = client
        .clone()
        .oneshot(
            EmbeddingRequest::new("text-embedding-v4")
                .inputs(["a", "b"])
                .dimension(64)
                .into_request(),
        )
        .await
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&res.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    assert_eq!(mock.stats().status(200), 4);
}

/// A burst far above the quota: the stack spaces the calls out, so every
/// call succeeds and the upstream never says 429.
#[tokio::test(start_paused = true)]
async fn a_burst_is_admitted_at_the_quota_without_429s() {
    let mock = mock_with_quota(600).await; // 10 per second, enforced per second
    let client = client(&mock, 600);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..60 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let req = ChatRequest::new("qwen-plus")
                .user(format!("q{i}"))
                .max_tokens(8)
                .stream(i % 3 == 0)
                .into_request();
            let res = client.oneshot(req).await.unwrap();
            let status = res.status();
            res.into_body().collect().await.unwrap();
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    let s = mock.stats();
    assert_eq!(s.status(429), 0, "{s:?}");
    assert_eq!(s.requests, 60);
    // 60 requests at 10/s take about 6 s (slow start makes it a little
    // longer), never much more.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(5) && took <= Duration::from_secs(12),
        "{took:?}"
    );
}

#[test]
fn the_key_never_shows() {
    let b = QwenClient::builder()
        .api_key("sk-very-secret-0123")
        .unwrap();
    let shown = format!("{b:?}");
    assert!(!shown.contains("very-secret"), "{shown}");
    assert!(QwenClient::builder().api_key("bad key\n").is_err());
}

/// Issue 12, item 1, the client side: a body with a repeated `"model"`
/// used to be read as naming no model, so the (account, model) budget
/// never saw it. The client stack charges an ambiguous body as its
/// strictest reading: to the model the upstream keeps (the last), with the
/// whole body as the input estimate (see `RequestInfo`'s "Ambiguous
/// bodies"); the gateway refuses such bodies instead.
#[tokio::test(start_paused = true)]
async fn an_ambiguous_body_is_charged_as_its_strictest_reading() {
    use tower_qwen::key::{AccountId, AccountModel};
    use tower_qwen::tokens::estimate_text_tokens;

    let mock = mock_with_quota(6000).await;
    // One call a second; 1000 tokens a second.
    let client = client_with(&mock, 60, 60_000);
    // The key is set below the limiter: one account.
    let key = AccountModel {
        account: AccountId::Anonymous,
        model: Some("qwen-plus".into()),
    };
    let filler = "lorem ipsum ".repeat(40);
    let body = format!(
        r#"{{"model":"qwen-turbo","stream":true,"max_tokens":10,"messages":[{{"role":"user","content":"hi"}}],"user":"{filler}","model":"qwen-plus"}}"#
    );
    let req = http::Request::post("/compatible-mode/v1/chat/completions")
        .header("content-type", "application/json")
        .body(tower_qwen::body::Body::from(body.clone()))
        .unwrap();
    let t0 = tokio::time::Instant::now();
    let res = client.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), 200);
    // While the stream is open, qwen-plus's budget holds the strict
    // estimate: the whole body as text plus the output budget (a plain
    // reading would have reserved 2 + 4 + 10 tokens, under any model).
    let booked = client
        .rate_limiter()
        .snapshot(&key)
        .expect("qwen-plus was charged");
    // (Debt repaid at 1000 a second, times the slow start's rate now.)
    let dim = booked.tokens.unwrap();
    let tokens = dim.reset.as_secs_f64() * 1000.0 * dim.rate;
    let strict = f64::from(estimate_text_tokens(&body) + 10);
    assert!(
        (strict - 2.0..=strict + 1.0).contains(&tokens),
        "{tokens} tokens booked, {strict} expected"
    );
    res.into_body().collect().await.unwrap();
    // The next qwen-plus call waits for the request slot the ambiguous one
    // took (one a second).
    let res = client
        .clone()
        .oneshot(
            ChatRequest::new("qwen-plus")
                .user("Hello")
                .max_tokens(5)
                .into_request(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert!(t0.elapsed() >= Duration::from_secs(1), "{:?}", t0.elapsed());
    assert_eq!(mock.stats().requests, 2);
}

/// Issue 14: a client without a key, and without `DASHSCOPE_API_KEY`, fails
/// to build instead of sending keyless requests; `without_key` says so on
/// purpose. The environment is set per case in a child run of this test.
#[tokio::test]
async fn building_without_a_key_is_an_error() {
    const CASE: &str = "TOWER_QWEN_KEY_CASE";
    match std::env::var(CASE).as_deref() {
        Ok("unset") => {
            let err = QwenClient::builder().build().unwrap_err();
            assert!(err.is_not_set(), "{err}");
            assert!(QwenClient::builder().without_key().build().is_ok());
            assert!(
                QwenClient::builder()
                    .api_key("sk-x")
                    .unwrap()
                    .build()
                    .is_ok()
            );
            return;
        }
        Ok("set") => {
            assert!(QwenClient::builder().build().is_ok());
            return;
        }
        Ok("bad") => {
            let err = QwenClient::builder().build().unwrap_err();
            assert!(!err.is_not_set());
            assert!(!err.to_string().contains("bad key"));
            return;
        }
        _ => {}
    }
    for (case, value) in [
        ("unset", None),
        ("set", Some("sk-from-env")),
        ("bad", Some("bad key\n")),
    ] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child
            .args([
                "--exact",
                "building_without_a_key_is_an_error",
                "--test-threads=1",
            ])
            .env(CASE, case);
        match value {
            Some(v) => child.env("DASHSCOPE_API_KEY", v),
            None => child.env_remove("DASHSCOPE_API_KEY"),
        };
        let out = child.output().unwrap();
        assert!(
            out.status.success(),
            "case {case}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("1 passed"),
            "case {case}"
        );
    }
}

/// Issue 14: `ChatAnswer` reads the text and usage of a chat answer from
/// the mock in both dialects, streamed and not.
#[tokio::test(start_paused = true)]
async fn chat_answers_in_both_dialects_streamed_or_not() {
    use tower_qwen::client::ChatAnswer;
    let mock = mock_with_quota(6000).await;
    let client = client(&mock, 6000);
    for native in [false, true] {
        for stream in [false, true] {
            let mut req = ChatRequest::new("qwen-plus")
                .user("Hello")
                .max_tokens(4)
                .stream(stream);
            if native {
                req = req.native();
            }
            let res = client.clone().oneshot(req.into_request()).await.unwrap();
            let answer = ChatAnswer::read(res).await.unwrap();
            let case = format!("native {native}, stream {stream}");
            assert!(!answer.text().is_empty(), "{case}");
            assert_eq!(answer.usage().unwrap().output_tokens, 4, "{case}");
            assert!(answer.finish_reason().is_some(), "{case}");
        }
    }
}
