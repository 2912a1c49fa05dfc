//! The Files and Batch APIs through the gateway (issue 18, item 4): a
//! client key uploads, creates, retrieves and collects the output file;
//! upstream, the account's key does it, on the account that holds the
//! files; each call is counted for the key and takes from its bucket, none
//! from the real-time quota.

use http::Method;
use tower_qwen::mock::BatchTiming;

use super::*;

const FILES: &str = "/compatible-mode/v1/files";
const BATCHES: &str = "/compatible-mode/v1/batches";

impl Env {
    /// A call with any method, content type and body.
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        content_type: Option<&str>,
        body: String,
    ) -> Answer {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        if let Some(t) = content_type {
            b = b.header("content-type", t);
        }
        self.send(b.body(Full::new(Bytes::from(body))).unwrap())
            .await
    }

    async fn alice_get(&self, path: &str) -> Answer {
        self.call(Method::GET, path, Some(ALICE), None, String::new())
            .await
    }

    /// Uploads `content` as a batch input file with Alice's key.
    async fn upload(&self, content: &str) -> Answer {
        let b = "GwBoUnDaRy";
        let body = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{b}--\r\n"
        );
        let ct = format!("multipart/form-data; boundary={b}");
        self.call(Method::POST, FILES, Some(ALICE), Some(&ct), body)
            .await
    }
}

/// One line of a batch input file.
fn line(custom_id: &str, text: &str) -> String {
    serde_json::json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "qwen-plus", "messages": [{"role": "user", "content": text}]},
    })
    .to_string()
}

#[tokio::test(start_paused = true)]
async fn files_and_batches_pass_through_with_the_accounts_key() {
    let env = start(
        mock().batch_timing(BatchTiming::default()),
        "capacity = 30\nrefill_per_second = 0.001",
    )
    .await;
    let content = format!("{}\n{}\n", line("row-0", "one"), line("row-1", "two"));

    // Upload: the mock knows only the account's key, so a 200 means the
    // gateway swapped Alice's key for it.
    let f = env.upload(&content).await;
    assert_eq!(f.status, 200, "{:?}", f.body);
    let f = f.json();
    assert_eq!(
        (f["object"].as_str(), f["purpose"].as_str()),
        (Some("file"), Some("batch"))
    );
    assert_eq!(f["bytes"], content.len());
    let file_id = f["id"].as_str().unwrap().to_owned();

    // Create.
    let create = serde_json::json!({
        "input_file_id": file_id,
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    });
    let b = env
        .call(
            Method::POST,
            BATCHES,
            Some(ALICE),
            Some("application/json"),
            create.to_string(),
        )
        .await;
    assert_eq!(b.status, 200, "{:?}", b.body);
    let batch_id = b.json()["id"].as_str().unwrap().to_owned();

    // Retrieve until completed (the mock's default timing: 12 s).
    let mut done = None;
    for _ in 0..20 {
        advance(Duration::from_secs(1)).await;
        let b = env.alice_get(&format!("{BATCHES}/{batch_id}")).await;
        assert_eq!(b.status, 200, "{:?}", b.body);
        let b = b.json();
        if b["status"] == "completed" {
            done = Some(b);
            break;
        }
    }
    let b = done.expect("the batch completes");
    assert_eq!(b["request_counts"]["completed"], 2);

    // The output file, through the gateway.
    let out = env
        .alice_get(&format!(
            "{FILES}/{}/content",
            b["output_file_id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(out.status, 200);
    let ids: Vec<String> = out
        .body
        .split(|&c| c == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| serde_json::from_slice::<Value>(l).unwrap()["custom_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&"\"row-0\"".to_owned()) && ids.contains(&"\"row-1\"".to_owned()));
    // Lists and the file's metadata, with their query strings.
    let list = env.alice_get(&format!("{BATCHES}?limit=5")).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["data"][0]["id"], batch_id.as_str());
    assert_eq!(
        env.alice_get(&format!("{FILES}/{file_id}")).await.status,
        200
    );

    // Counted per key; none of it touched the real-time quota.
    let metrics = env.gateway.render_metrics();
    for line in [
        r#"gateway_requests_total{route="files",status="200",key="alice"} 3"#,
        r#"gateway_requests_total{route="batches",status="200",key="alice"} "#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert_eq!(env.mock.stats().admitted("qwen-plus"), 0);
    let bs = env.mock.batch_stats();
    assert_eq!((bs.batches_created, bs.batches_completed), (1, 1));

    // Each call takes one from the key's bucket (30): what is left is
    // refused in the compatible shape, before anything is sent.
    let sent = env.mock.stats().requests;
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(env.alice_get(FILES).await.status.as_u16());
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    let a = env.alice_get(FILES).await;
    assert_compat(&a, 429, "limit_requests");
    assert_eq!(
        env.mock.stats().requests - sent,
        statuses.iter().filter(|&&s| s == 200).count() as u64
    );
}

#[tokio::test(start_paused = true)]
async fn files_and_batches_refusals_come_in_the_compatible_shape() {
    let env = start(mock(), "").await;
    // No key.
    let a = env
        .call(Method::GET, FILES, None, None, String::new())
        .await;
    assert_compat(&a, 401, "invalid_api_key");
    // Paths off the allow-list.
    for path in [
        "/compatible-mode/v1/files/../batches",
        "/compatible-mode/v1/files/%2e%2e/x",
        "/compatible-mode/v1/files/a/b",
        "/compatible-mode/v1/batches/x/delete",
    ] {
        let a = env.alice_get(path).await;
        assert_compat(&a, 404, "not_found");
    }
    // Methods each path does not take: 405 with Allow.
    for (method, path, allow) in [
        (Method::DELETE, FILES, "GET, HEAD, POST"),
        (
            Method::POST,
            "/compatible-mode/v1/files/file-1",
            "GET, HEAD, DELETE",
        ),
        (
            Method::POST,
            "/compatible-mode/v1/files/file-1/content",
            "GET, HEAD",
        ),
        (
            Method::DELETE,
            "/compatible-mode/v1/batches/b-1",
            "GET, HEAD",
        ),
        (
            Method::GET,
            "/compatible-mode/v1/batches/b-1/cancel",
            "POST",
        ),
    ] {
        let a = env
            .call(method, path, Some(ALICE), None, String::new())
            .await;
        assert_eq!(a.status, 405, "{path}");
        assert_eq!(a.header("allow"), allow, "{path}");
    }
}

#[tokio::test(start_paused = true)]
async fn an_upload_over_the_file_cap_is_refused_and_never_reaches_the_upstream() {
    let m = mock().start().await.unwrap();
    let text = config(&m, "").replace("[degrade]", "[server]\nmax_file_bytes = 1000\n[degrade]");
    let env = start_with(m, &text).await;
    let small = env.upload(&line("a", "x")).await;
    assert_eq!(small.status, 200, "{:?}", small.body);
    let sent = env.mock.stats().requests;
    // Declared too large: refused at once.
    let big = env.upload(&line("a", &"x".repeat(1000))).await;
    assert_compat(&big, 413, "request_too_large");
    assert_eq!(env.mock.stats().requests, sent);
    // Sent without a length (chunked): cut at the cap, and 413.
    use tower::ServiceExt;
    let chunks = (0..20).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 100])));
    let req = Request::post(FILES)
        .header("authorization", format!("Bearer {ALICE}"))
        .header("content-type", "multipart/form-data; boundary=x")
        .body(axum::body::Body::from_stream(futures_util::stream::iter(
            chunks,
        )))
        .unwrap();
    let res = env.gateway.router().oneshot(req).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let cut = Answer {
        status,
        headers: HeaderMap::new(),
        body,
    };
    assert_compat(&cut, 413, "request_too_large");
}
