#![cfg(all(feature = "batch", feature = "mock", feature = "client"))]
//! Tests of issue 18: the mock's Files and Batch API (`mock_api`), the
//! batch service (`service`), restarts (`resume`), and routing by urgency
//! (`route`). Paused tokio time throughout: the mock's batch states follow
//! tokio's clock, and the service's waits and polls auto-advance it.

mod mock_api;
#[cfg(feature = "redis")]
#[path = "../redis/server.rs"]
mod redis_server;
mod resume;
mod route;
mod service;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tower::Layer;
use tower_qwen::batch::{Batch, BatchLayer, FileStore};
use tower_qwen::client::{ApiKey, HttpClient, SetUpstream, SetUpstreamLayer, TransportConfig};
use tower_qwen::mock::{BatchTiming, MockDashScope, MockHandle};

pub(crate) const KEY: &str = "sk-batch-test";

/// A mock with one key and the given batch timing.
pub(crate) async fn mock(timing: BatchTiming) -> MockHandle {
    MockDashScope::builder()
        .key(KEY, "acct")
        .batch_timing(timing)
        .start()
        .await
        .unwrap()
}

/// The transport with the mock's base URL and key.
pub(crate) fn transport(mock: &MockHandle) -> SetUpstream<HttpClient> {
    SetUpstreamLayer::new(mock.base_url().parse().unwrap(), ApiKey::new(KEY).unwrap())
        .layer(TransportConfig::new().build())
}

/// A fresh temporary directory for a store.
pub(crate) fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tq-batch-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A batch layer with short waits and a store in `dir`.
pub(crate) fn layer(dir: &std::path::Path) -> BatchLayer {
    BatchLayer::new()
        .max_wait(Duration::from_secs(5))
        .poll_interval(Duration::from_secs(1), Duration::from_secs(30))
        .store(FileStore::new(dir.join("batches.json")))
}

pub(crate) fn service(mock: &MockHandle, dir: &std::path::Path) -> Batch<SetUpstream<HttpClient>> {
    layer(dir).layer(transport(mock))
}

/// A compatible chat request body.
pub(crate) fn chat(model: &str, text: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 5})
}

/// Raw calls to the mock's Files and Batch API.
pub(crate) struct Raw {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    key: String,
}

impl Raw {
    pub(crate) fn new(mock: &MockHandle) -> Self {
        Self::with_key(mock, KEY)
    }

    pub(crate) fn with_key(mock: &MockHandle, key: &str) -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            base: mock.compatible_base_url(),
            key: key.to_owned(),
        }
    }

    pub(crate) async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<String>,
        body: Bytes,
    ) -> (StatusCode, Bytes) {
        let mut b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", format!("Bearer {}", self.key));
        if let Some(ct) = content_type {
            b = b.header("content-type", ct);
        }
        let res = self
            .client
            .request(b.body(Full::new(body)).unwrap())
            .await
            .unwrap();
        let status = res.status();
        (status, res.into_body().collect().await.unwrap().to_bytes())
    }

    pub(crate) async fn json(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let (ct, bytes) = match body {
            Some(b) => (
                Some("application/json".to_owned()),
                Bytes::from(b.to_string()),
            ),
            None => (None, Bytes::new()),
        };
        let (status, bytes) = self.send(method, path, ct, bytes).await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Uploads `content` as a batch file; the file object.
    pub(crate) async fn upload(&self, content: &str) -> (StatusCode, Value) {
        let b = "XyZbOuNdArY";
        let body = format!(
            "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
             --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n{content}\r\n--{b}--\r\n"
        );
        let (status, bytes) = self
            .send(
                Method::POST,
                "/files",
                Some(format!("multipart/form-data; boundary={b}")),
                Bytes::from(body),
            )
            .await;
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    pub(crate) async fn create(&self, file_id: &str, endpoint: &str) -> (StatusCode, Value) {
        self.json(
            Method::POST,
            "/batches",
            Some(
                json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"}),
            ),
        )
        .await
    }

    pub(crate) async fn batch(&self, id: &str) -> Value {
        let (status, v) = self
            .json(Method::GET, &format!("/batches/{id}"), None)
            .await;
        assert_eq!(status, 200, "{v}");
        v
    }

    /// The lines of a file, parsed.
    pub(crate) async fn lines(&self, file_id: &str) -> Vec<Value> {
        let (status, bytes) = self
            .send(
                Method::GET,
                &format!("/files/{file_id}/content"),
                None,
                Bytes::new(),
            )
            .await;
        assert_eq!(status, 200);
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }
}

/// Waits until `cond` holds, checking every half second for at most five
/// minutes (of paused time); panics naming `what` otherwise.
pub(crate) async fn eventually(what: &str, cond: impl FnMut() -> bool) {
    eventually_every(what, Duration::from_millis(500), cond).await;
}

/// Waits until `cond` holds, checking every `step`, at most 600 times;
/// panics naming `what` otherwise.
pub(crate) async fn eventually_every(what: &str, step: Duration, mut cond: impl FnMut() -> bool) {
    for _ in 0..600 {
        if cond() {
            return;
        }
        tokio::time::sleep(step).await;
    }
    panic!("{what} did not happen within {:?}", step * 600);
}

/// A JSONL line for the Batch API.
pub(crate) fn line(custom_id: &str, url: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body}).to_string()
}
