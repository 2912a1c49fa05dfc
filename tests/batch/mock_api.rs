//! The mock's Files and Batch API on the wire (issue 18, item 3).

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{Value, json};
use tokio::time::advance;
use tower_qwen::mock::{ApiError, BatchFault, BatchTiming, Fault, MockDashScope, Reply, Script};

use super::{KEY, Raw, chat, line, mock};

const CHAT: &str = "/v1/chat/completions";
const S: Duration = Duration::from_secs(1);

fn file(lines: &[String]) -> String {
    lines.join("\n") + "\n"
}

async fn created(raw: &Raw, content: &str, endpoint: &str) -> Value {
    let (status, f) = raw.upload(content).await;
    assert_eq!(status, 200, "{f}");
    let (status, b) = raw.create(f["id"].as_str().unwrap(), endpoint).await;
    assert_eq!(status, 200, "{b}");
    b
}

#[tokio::test(start_paused = true)]
async fn a_batch_walks_through_its_states_and_answers_like_real_time() {
    let mock = mock(BatchTiming::default()).await;
    let raw = Raw::new(&mock);
    let bodies: Vec<Value> = (0..3)
        .map(|i| chat("qwen-plus", &format!("classify item {i}")))
        .collect();
    let content = file(
        &bodies
            .iter()
            .enumerate()
            .map(|(i, b)| line(&format!("row-{i}"), CHAT, b.clone()))
            .collect::<Vec<_>>(),
    );
    let (status, f) = raw.upload(&content).await;
    assert_eq!(status, 200);
    assert_eq!(f["object"], "file");
    assert_eq!(f["purpose"], "batch");
    assert_eq!(f["bytes"], content.len());
    let b = created(&raw, &content, CHAT).await;
    let id = b["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("batch_"));
    assert_eq!(b["object"], "batch");
    assert_eq!(b["status"], "validating");
    assert_eq!(b["completion_window"], "24h");
    assert_eq!(
        b["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    assert!(b["output_file_id"].is_null());
    assert_eq!(
        b["expires_at"].as_u64().unwrap(),
        b["created_at"].as_u64().unwrap() + 86_400
    );

    advance(S).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "in_progress");
    assert!(b["in_progress_at"].is_u64());
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 0, "failed": 0})
    );
    advance(5 * S).await;
    assert_eq!(raw.batch(&id).await["request_counts"]["completed"], 1);
    advance(5 * S).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "finalizing");
    assert!(b["output_file_id"].is_null());
    advance(S).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 3, "completed": 3, "failed": 0})
    );
    assert!(b["completed_at"].is_u64());
    assert!(b["error_file_id"].is_null());
    let out = raw.lines(b["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 3);

    // Each line is what the real-time endpoint answers for the same body.
    for (i, l) in out.iter().enumerate() {
        assert_eq!(l["custom_id"], format!("row-{i}"));
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"));
        assert!(l["error"].is_null());
        assert_eq!(l["response"]["status_code"], 200);
        assert!(l["response"]["request_id"].is_string());
        let (status, now) = raw
            .json(Method::POST, "/chat/completions", Some(bodies[i].clone()))
            .await;
        assert_eq!(status, 200);
        let body = &l["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["usage"], now["usage"]);
        assert_eq!(body["choices"][0]["message"], now["choices"][0]["message"]);
    }
    // Only the three real-time comparisons count against the quota.
    let stats = mock.stats();
    assert_eq!(stats.admitted("qwen-plus"), 3);
    let bs = mock.batch_stats();
    assert_eq!(bs.batches_created, 1);
    assert_eq!(bs.batches_completed, 1);
    assert_eq!(bs.lines_succeeded, 3);
    assert_eq!(
        bs.input_tokens,
        out.iter()
            .map(|l| l["response"]["body"]["usage"]["prompt_tokens"]
                .as_u64()
                .unwrap())
            .sum::<u64>()
    );
}

#[tokio::test(start_paused = true)]
async fn embeddings_batch_and_no_real_time_quota() {
    let mock = mock(BatchTiming::instant()).await;
    let raw = Raw::new(&mock);
    let content = file(&[
        line(
            "a",
            "/v1/embeddings",
            json!({"model": "text-embedding-v4", "input": "hello", "dimensions": 4}),
        ),
        line(
            "b",
            "/v1/embeddings",
            json!({"model": "text-embedding-v4", "input": ["x", "y"], "dimensions": 4}),
        ),
    ]);
    let b = created(&raw, &content, "/v1/embeddings").await;
    let b = raw.batch(b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    let out = raw.lines(b["output_file_id"].as_str().unwrap()).await;
    assert_eq!(
        out[0]["response"]["body"]["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .len(),
        4
    );
    assert_eq!(
        out[1]["response"]["body"]["data"].as_array().unwrap().len(),
        2
    );
    let stats = mock.stats();
    assert!(stats.admitted_by_model.is_empty());
    assert_eq!(stats.input_tokens, 0);
    assert!(stats.calls_by_model.is_empty());
}

async fn failed_codes(raw: &Raw, content: &str, endpoint: &str) -> Vec<(String, Value)> {
    let b = created(raw, content, endpoint).await;
    assert_eq!(b["status"], "validating");
    advance(S).await;
    let b = raw.batch(b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "failed", "{b}");
    assert!(b["failed_at"].is_u64());
    assert!(b["output_file_id"].is_null());
    b["errors"]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["code"].as_str().unwrap().to_owned(), e["line"].clone()))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn validation_errors_fail_the_batch() {
    let mock = MockDashScope::builder()
        .key(KEY, "acct")
        .batch_models(["qwen-plus", "qwen-max"])
        .start()
        .await
        .unwrap();
    let raw = Raw::new(&mock);
    let l = |id: &str, model: &str| line(id, CHAT, chat(model, "hi"));
    assert_eq!(
        failed_codes(
            &raw,
            &file(&[l("a", "qwen-plus"), l("b", "qwen-max")]),
            CHAT
        )
        .await,
        [("mismatched_model".to_owned(), json!(2))]
    );
    assert_eq!(
        failed_codes(
            &raw,
            &file(&[l("a", "qwen-plus"), l("a", "qwen-plus")]),
            CHAT
        )
        .await,
        [("duplicate_custom_id".to_owned(), json!(2))]
    );
    assert_eq!(
        failed_codes(&raw, &file(&[l("a", "qwen-turbo")]), CHAT).await,
        [("model_not_found".to_owned(), json!(1))]
    );
    assert_eq!(
        failed_codes(&raw, &file(&["{not json".to_owned()]), CHAT).await,
        [("invalid_json_line".to_owned(), json!(1))]
    );
    assert_eq!(
        failed_codes(&raw, &file(&[l("a", "qwen-plus")]), "/v1/embeddings").await,
        // A chat model is not served at the embeddings endpoint either.
        [
            ("mismatched_url".to_owned(), json!(1)),
            ("model_not_found".to_owned(), json!(1))
        ]
    );
    assert_eq!(mock.batch_stats().batches_failed, 5);
}

#[tokio::test(start_paused = true)]
async fn requests_the_api_refuses_at_once() {
    let mock = mock(BatchTiming::default()).await;
    let raw = Raw::new(&mock);
    // Wrong key.
    let (status, v) = Raw::with_key(&mock, "sk-wrong").upload("{}").await;
    assert_eq!(status, 401);
    assert_eq!(v["error"]["code"], "invalid_api_key");
    // Not multipart, no purpose, wrong purpose.
    let (status, v) = raw
        .send(
            Method::POST,
            "/files",
            Some("application/json".into()),
            Bytes::from_static(b"{}"),
        )
        .await;
    assert_eq!(status, 400, "{v:?}");
    let b = "BB";
    let no_purpose = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"f.jsonl\"\r\n\r\nx\r\n--{b}--\r\n"
    );
    let (status, _) = raw
        .send(
            Method::POST,
            "/files",
            Some(format!("multipart/form-data; boundary={b}")),
            Bytes::from(no_purpose.clone()),
        )
        .await;
    assert_eq!(status, 400);
    let wrong = no_purpose.replacen(
        &format!("--{b}\r\n"),
        &format!("--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nfine-tune\r\n--{b}\r\n"),
        1,
    );
    let (status, _) = raw
        .send(
            Method::POST,
            "/files",
            Some(format!("multipart/form-data; boundary={b}")),
            Bytes::from(wrong),
        )
        .await;
    assert_eq!(status, 400);
    // Unknown file, bad endpoint, bad window.
    let (status, v) = raw.create("file-nope", CHAT).await;
    assert_eq!(status, 404);
    assert_eq!(v["error"]["code"], "not_found");
    let (_, f) = raw
        .upload(&file(&[line("a", CHAT, chat("qwen-plus", "x"))]))
        .await;
    let fid = f["id"].as_str().unwrap();
    let (status, _) = raw.create(fid, "/v1/completions").await;
    assert_eq!(status, 400);
    let (status, _) = raw
        .json(
            Method::POST,
            "/batches",
            Some(json!({"input_file_id": fid, "endpoint": CHAT, "completion_window": "1h"})),
        )
        .await;
    assert_eq!(status, 400);
    // Another account sees neither the file nor its batches.
    mock.add_key("sk-other", "other");
    let other = Raw::with_key(&mock, "sk-other");
    let (status, _) = other
        .json(Method::GET, &format!("/files/{fid}"), None)
        .await;
    assert_eq!(status, 404);
    let (status, _) = other.create(fid, CHAT).await;
    assert_eq!(status, 404);
    assert_eq!(mock.batch_stats().batches_created, 0);
}

#[tokio::test(start_paused = true)]
async fn files_are_listed_read_and_deleted() {
    let mock = mock(BatchTiming::default()).await;
    let raw = Raw::new(&mock);
    let mut ids = Vec::new();
    for i in 0..3 {
        let (_, f) = raw.upload(&format!("line {i}\n")).await;
        ids.push(f["id"].as_str().unwrap().to_owned());
    }
    let (status, list) = raw.json(Method::GET, "/files?limit=2", None).await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(list["has_more"], true);
    let (status, v) = raw.json(Method::GET, "/files?limit=many", None).await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "invalid_parameter_error");
    let (_, f) = raw
        .json(Method::GET, &format!("/files/{}", ids[0]), None)
        .await;
    assert_eq!(f["filename"], "in.jsonl");
    let (status, bytes) = raw
        .send(
            Method::GET,
            &format!("/files/{}/content", ids[0]),
            None,
            Bytes::new(),
        )
        .await;
    assert_eq!((status.as_u16(), &bytes[..]), (200, &b"line 0\n"[..]));
    let (status, v) = raw
        .json(Method::DELETE, &format!("/files/{}", ids[0]), None)
        .await;
    assert_eq!((status.as_u16(), v["deleted"].clone()), (200, json!(true)));
    let (status, _) = raw
        .json(Method::GET, &format!("/files/{}", ids[0]), None)
        .await;
    assert_eq!(status, 404);
    assert_eq!(mock.batch_stats().files_uploaded, 3);
}

#[tokio::test(start_paused = true)]
async fn batch_test_model_dry_run() {
    let mock = mock(BatchTiming::instant()).await;
    let raw = Raw::new(&mock);
    let test = |id: &str| line(id, "/v1/chat/ds-test", chat("batch-test-model", "Hello!"));
    let b = created(&raw, &file(&[test("1"), test("2")]), "/v1/chat/ds-test").await;
    let b = raw.batch(b["id"].as_str().unwrap()).await;
    assert_eq!(b["status"], "completed");
    let out = raw.lines(b["output_file_id"].as_str().unwrap()).await;
    assert_eq!(out.len(), 2);
    assert_eq!(out[0]["response"]["body"]["model"], "batch-test-model");
    assert_eq!(out[0]["response"]["body"]["usage"]["total_tokens"], 0);
    // The test model with the real endpoint, or a real model on the test
    // endpoint: model_not_found.
    mock.set_batch_timing(BatchTiming::default());
    let wrong = line("1", CHAT, chat("batch-test-model", "x"));
    assert_eq!(
        failed_codes(&raw, &file(&[wrong]), CHAT).await[0].0,
        "model_not_found"
    );
    // At most 100 lines.
    let many: Vec<String> = (0..101).map(|i| test(&i.to_string())).collect();
    assert_eq!(
        failed_codes(&raw, &file(&many), "/v1/chat/ds-test").await[0].0,
        "test_file_too_large"
    );
    // At most 2 test batches at once.
    created(&raw, &file(&[test("1")]), "/v1/chat/ds-test").await;
    created(&raw, &file(&[test("1")]), "/v1/chat/ds-test").await;
    let (_, f) = raw.upload(&file(&[test("1")])).await;
    let (status, v) = raw
        .create(f["id"].as_str().unwrap(), "/v1/chat/ds-test")
        .await;
    assert_eq!(status, 429);
    assert_eq!(v["error"]["code"], "limit_requests");
    assert_eq!(mock.stats().input_tokens, 0);
}

#[tokio::test(start_paused = true)]
async fn injected_failures() {
    let mock = mock(BatchTiming::default()).await;
    let raw = Raw::new(&mock);
    let content = file(
        &(0..4)
            .map(|i| line(&format!("r{i}"), CHAT, chat("qwen-plus", "x")))
            .collect::<Vec<_>>(),
    );

    // Expires at the end of its 24 h window with half its lines done.
    mock.set_batch_fault(BatchFault::Expire { completed: 0.5 });
    let b = created(&raw, &content, CHAT).await;
    let id = b["id"].as_str().unwrap().to_owned();
    advance(Duration::from_secs(3600)).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "in_progress");
    assert_eq!(b["request_counts"]["completed"], 2);
    advance(Duration::from_secs(86_400)).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "expired");
    assert!(b["expired_at"].is_u64());
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 2})
    );
    assert_eq!(
        raw.lines(b["output_file_id"].as_str().unwrap()).await.len(),
        2
    );
    let errs = raw.lines(b["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errs.len(), 2);
    assert_eq!(errs[0]["custom_id"], "r2");
    assert_eq!(errs[0]["error"]["code"], "batch_expired");
    assert!(errs[0]["response"].is_null());

    // Fails at the end of in_progress.
    mock.set_batch_fault(BatchFault::Fail {
        code: "internal_error".into(),
        message: "boom".into(),
    });
    let b = created(&raw, &content, CHAT).await;
    let id = b["id"].as_str().unwrap().to_owned();
    advance(5 * S).await;
    assert_eq!(raw.batch(&id).await["status"], "in_progress");
    advance(10 * S).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "failed");
    assert_eq!(b["errors"]["data"][0]["code"], "internal_error");
    assert!(b["output_file_id"].is_null());

    // Completes with every second line failed.
    mock.set_batch_fault(BatchFault::FailLines {
        every: NonZeroU32::new(2).unwrap(),
        error: ApiError::internal_error(),
    });
    let b = created(&raw, &content, CHAT).await;
    let id = b["id"].as_str().unwrap().to_owned();
    advance(20 * S).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "completed");
    assert_eq!(
        b["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 2})
    );
    let errs = raw.lines(b["error_file_id"].as_str().unwrap()).await;
    assert_eq!(
        errs.iter()
            .map(|e| e["custom_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["r1", "r3"]
    );
    assert_eq!(errs[0]["response"]["status_code"], 500);
    assert_eq!(
        errs[0]["response"]["body"]["error"]["code"],
        errs[0]["error"]["code"]
    );
    let bs = mock.batch_stats();
    assert_eq!(
        (bs.batches_expired, bs.batches_failed, bs.batches_completed),
        (1, 1, 1)
    );
}

#[tokio::test(start_paused = true)]
async fn cancel_keeps_the_lines_done() {
    let mock = mock(BatchTiming::default()).await;
    let raw = Raw::new(&mock);
    let content = file(
        &(0..10)
            .map(|i| line(&format!("r{i}"), CHAT, chat("qwen-plus", "x")))
            .collect::<Vec<_>>(),
    );
    let b = created(&raw, &content, CHAT).await;
    let id = b["id"].as_str().unwrap().to_owned();
    advance(4 * S).await; // 3 s in progress: 3 of 10 lines done
    let (status, b) = raw
        .json(Method::POST, &format!("/batches/{id}/cancel"), None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(b["status"], "cancelling");
    assert!(b["cancelling_at"].is_u64());
    advance(S).await;
    let b = raw.batch(&id).await;
    assert_eq!(b["status"], "cancelled");
    assert_eq!(
        b["request_counts"],
        json!({"total": 10, "completed": 3, "failed": 7})
    );
    assert_eq!(
        raw.lines(b["output_file_id"].as_str().unwrap()).await.len(),
        3
    );
    let errs = raw.lines(b["error_file_id"].as_str().unwrap()).await;
    assert_eq!(errs[0]["error"]["code"], "batch_cancelled");
    // A terminal batch cannot be cancelled.
    let (status, v) = raw
        .json(Method::POST, &format!("/batches/{id}/cancel"), None)
        .await;
    assert_eq!(status, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cancelled")
    );
    assert_eq!(mock.batch_stats().batches_cancelled, 1);
}

#[tokio::test(start_paused = true)]
async fn batches_are_listed_newest_first() {
    let mock = mock(BatchTiming::default()).await;
    let raw = Raw::new(&mock);
    let content = file(&[line("a", CHAT, chat("qwen-plus", "x"))]);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            created(&raw, &content, CHAT).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let (_, page) = raw.json(Method::GET, "/batches?limit=2", None).await;
    let got: Vec<&str> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[2].as_str(), ids[1].as_str()]);
    assert_eq!(page["has_more"], true);
    assert_eq!(page["last_id"], ids[1].as_str());
    let (_, page) = raw
        .json(Method::GET, &format!("/batches?after={}", ids[1]), None)
        .await;
    assert_eq!(page["data"][0]["id"], ids[0].as_str());
    assert_eq!(page["has_more"], false);
}

#[tokio::test(start_paused = true)]
async fn scripts_play_on_real_time_calls_not_on_batch_lines() {
    let mock = mock(BatchTiming::instant()).await;
    mock.set_script(Script::new().then(Reply::fault(Fault::Error(ApiError::internal_error()))));
    let raw = Raw::new(&mock);
    let b = created(
        &raw,
        &file(&[line("a", CHAT, chat("qwen-plus", "x"))]),
        CHAT,
    )
    .await;
    let b = raw.batch(b["id"].as_str().unwrap()).await;
    assert_eq!(b["request_counts"]["completed"], 1);
    // The scripted fault is still there for the next real-time call.
    let (status, _) = raw
        .json(
            Method::POST,
            "/chat/completions",
            Some(chat("qwen-plus", "x")),
        )
        .await;
    assert_eq!(status, 500);
}
