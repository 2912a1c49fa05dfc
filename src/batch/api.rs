//! Calls to the Files and Batch API through the inner service, and their
//! wire shapes (OpenAI's, which DashScope copies; QWEN-API.md A6).

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{Value, json};
use tower_service::Service;

use super::error::{ApiFailure, BatchError};
use crate::BoxError;
use crate::body::Body;
use crate::classify::{Classifier, ErrorInfo, Outcome};

/// A file object; only the id is read.
#[derive(Debug, Deserialize)]
pub(crate) struct FileObject {
    pub(crate) id: String,
}

/// A batch object, as far as this module reads it.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct BatchObject {
    pub(crate) id: String,
    pub(crate) status: String,
    #[serde(default)]
    pub(crate) input_file_id: Option<String>,
    #[serde(default)]
    pub(crate) output_file_id: Option<String>,
    #[serde(default)]
    pub(crate) error_file_id: Option<String>,
    #[serde(default)]
    pub(crate) errors: Option<Errors>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct Errors {
    #[serde(default)]
    pub(crate) data: Vec<ErrorData>,
}

#[derive(Clone, Debug, Deserialize)]
pub(crate) struct ErrorData {
    #[serde(default)]
    pub(crate) code: Option<String>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) line: Option<u64>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct BatchList {
    #[serde(default)]
    pub(crate) data: Vec<BatchObject>,
    #[serde(default)]
    pub(crate) has_more: bool,
    #[serde(default)]
    pub(crate) last_id: Option<String>,
}

/// One line of an output or error file.
#[derive(Debug, Deserialize)]
pub(crate) struct OutLine {
    pub(crate) custom_id: String,
    #[serde(default)]
    pub(crate) response: Option<OutResponse>,
    #[serde(default)]
    pub(crate) error: Option<OutError>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OutResponse {
    pub(crate) status_code: u16,
    #[serde(default)]
    pub(crate) request_id: Option<String>,
    #[serde(default)]
    pub(crate) body: Value,
}

#[derive(Debug, Deserialize)]
pub(crate) struct OutError {
    #[serde(default)]
    pub(crate) code: Option<String>,
    #[serde(default)]
    pub(crate) message: Option<String>,
}

/// Batch states, from the `status` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Running,
    Completed,
    Failed,
    Expired,
    Cancelled,
}

impl Status {
    pub(crate) fn of(s: &str) -> Self {
        match s {
            "completed" => Self::Completed,
            "failed" => Self::Failed,
            "expired" => Self::Expired,
            "cancelled" => Self::Cancelled,
            // validating, in_progress, finalizing, cancelling, and anything
            // newer: keep polling.
            _ => Self::Running,
        }
    }
}

/// The inner service's answer: the head, and the body read up to a limit
/// (or the error reading it).
pub(crate) type Answer = (http::response::Parts, Result<Bytes, BoxError>);

/// [`Upstream::send`]'s future.
pub(crate) type UpstreamFuture = Pin<Box<dyn Future<Output = Result<Answer, BoxError>> + Send>>;

/// What the worker needs of the inner service, in one bound: any
/// `Service<http::Request<Body>>` whose future, error and response body
/// can cross tasks.
pub(crate) trait Upstream: Clone + Send + 'static {
    /// Waits until ready, calls, and reads at most `limit` bytes of body.
    fn send(self, req: Request<Body>, limit: usize) -> UpstreamFuture;
}

impl<S, RB> Upstream for S
where
    S: Service<Request<Body>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    RB: http_body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<BoxError>,
{
    fn send(mut self, req: Request<Body>, limit: usize) -> UpstreamFuture {
        Box::pin(async move {
            if let Err(e) = std::future::poll_fn(|cx| self.poll_ready(cx)).await {
                return Err(e.into());
            }
            let (parts, body) = match self.call(req).await {
                Ok(res) => res.into_parts(),
                Err(e) => return Err(e.into()),
            };
            let body = http_body_util::Limited::new(body, limit)
                .collect()
                .await
                .map(|b| b.to_bytes());
            Ok((parts, body))
        })
    }
}

/// The inner service, with the base path and the retry settings.
///
/// The service sits in a mutex only so that `&Api` is `Send` for any
/// `S: Send` (the tasks hold it across awaits); each call clones it out.
pub(crate) struct Api<S> {
    pub(crate) svc: Mutex<S>,
    pub(crate) base: Arc<str>,
    pub(crate) attempts: u32,
    pub(crate) backoff: Duration,
    /// `completion_window`, e.g. `24h`.
    pub(crate) window: Arc<str>,
}

impl<S: Clone> Api<S> {
    fn svc(&self) -> S {
        self.svc.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl<S: Clone> Clone for Api<S> {
    fn clone(&self) -> Self {
        Self {
            svc: Mutex::new(self.svc()),
            base: self.base.clone(),
            attempts: self.attempts,
            backoff: self.backoff,
            window: self.window.clone(),
        }
    }
}

/// What one attempt got.
enum Attempt {
    Ok(Bytes),
    /// Worth another attempt after the wait (if any).
    Retry(BatchError, Option<Duration>),
    Fail(BatchError),
}

/// JSON answers are small; output files may be large (DashScope caps a
/// batch file at 500 MB, and output lines carry whole answers).
const JSON_LIMIT: usize = 16 << 20;

fn upstream(what: &'static str, status: Option<u16>, body: &[u8]) -> BatchError {
    let info = ErrorInfo::parse(body);
    let code = info.as_ref().and_then(|i| i.code.clone());
    let message = info.and_then(|i| i.message).unwrap_or_default();
    BatchError::upstream(ApiFailure {
        what,
        status,
        code,
        message,
        source: None,
    })
}

/// A multipart/form-data body with `purpose=batch` and the file.
pub(crate) fn multipart(content: &[u8], filename: &str, boundary: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(content.len() + 512);
    b.put_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
        )
        .as_bytes(),
    );
    b.put_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    b.put_slice(content);
    b.put_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b.freeze()
}

impl<S: Upstream> Api<S> {
    fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Bytes,
    ) -> Request<Body> {
        let mut req = Request::new(Body::from(body));
        *req.method_mut() = method;
        *req.uri_mut() = format!("{}{path}", self.base)
            .parse()
            .unwrap_or_else(|_| http::Uri::from_static("/"));
        if !content_type.is_empty()
            && let Ok(v) = header::HeaderValue::from_str(content_type)
        {
            req.headers_mut().insert(header::CONTENT_TYPE, v);
        }
        req
    }

    async fn attempt(&self, what: &'static str, req: Request<Body>, limit: usize) -> Attempt {
        let res = self.svc().send(req, limit).await;
        let classifier = Classifier::new();
        let (parts, body) = match res {
            Ok(r) => r,
            Err(e) => {
                let outcome = classifier.classify_error(&e);
                let err = BatchError::upstream(ApiFailure {
                    what,
                    status: None,
                    code: None,
                    message: String::new(),
                    source: Some(Arc::new(e)),
                });
                return if outcome.is_retryable() {
                    Attempt::Retry(err, outcome.retry_after())
                } else {
                    Attempt::Fail(err)
                };
            }
        };
        let body = match body {
            Ok(b) => b,
            Err(e) => {
                let err = BatchError::upstream(ApiFailure {
                    what,
                    status: Some(parts.status.as_u16()),
                    code: None,
                    message: "reading the answer failed".into(),
                    source: Some(Arc::new(e)),
                });
                return Attempt::Retry(err, None);
            }
        };
        let outcome = classify(&classifier, parts.status, &parts.headers, &body);
        match outcome {
            Outcome::Success => Attempt::Ok(body),
            o if o.is_retryable() => Attempt::Retry(
                upstream(what, Some(parts.status.as_u16()), &body),
                o.retry_after(),
            ),
            _ => Attempt::Fail(upstream(what, Some(parts.status.as_u16()), &body)),
        }
    }

    /// Sends the request made by `make` until it succeeds, fails for good,
    /// or `attempts` attempts failed.
    async fn call(
        &self,
        what: &'static str,
        make: impl Fn() -> Request<Body>,
        limit: usize,
    ) -> Result<Bytes, BatchError> {
        let mut wait = self.backoff;
        let mut n = 0;
        loop {
            n += 1;
            match self.attempt(what, make(), limit).await {
                Attempt::Ok(b) => return Ok(b),
                Attempt::Fail(e) => return Err(e),
                Attempt::Retry(e, after) => {
                    if n >= self.attempts {
                        return Err(e);
                    }
                    tracing::debug!(%e, attempt = n, "batch: retrying a Files/Batch API call");
                    tokio::time::sleep(after.unwrap_or(wait).max(wait)).await;
                    wait = wait.saturating_mul(2);
                }
            }
        }
    }

    /// One attempt only (the caller's loop decides what to do next).
    async fn once(
        &self,
        what: &'static str,
        req: Request<Body>,
    ) -> Result<Bytes, (BatchError, bool)> {
        match self.attempt(what, req, JSON_LIMIT).await {
            Attempt::Ok(b) => Ok(b),
            Attempt::Retry(e, _) => Err((e, true)),
            Attempt::Fail(e) => Err((e, false)),
        }
    }

    pub(crate) async fn upload(
        &self,
        content: Bytes,
        filename: &str,
    ) -> Result<FileObject, BatchError> {
        let boundary = boundary_for(&content);
        let body = multipart(&content, filename, &boundary);
        let ct = format!("multipart/form-data; boundary={boundary}");
        let bytes = self
            .call(
                "upload",
                || self.request(Method::POST, "/files", &ct, body.clone()),
                JSON_LIMIT,
            )
            .await?;
        parse("upload", &bytes)
    }

    /// One create attempt: `Err((error, retryable))`.
    pub(crate) async fn create_once(
        &self,
        input_file_id: &str,
        endpoint: &str,
        window: &str,
        job: &str,
    ) -> Result<BatchObject, (BatchError, bool)> {
        let body = json!({
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": window,
            "metadata": { "tower_qwen_job": job },
        });
        let req = self.request(
            Method::POST,
            "/batches",
            "application/json",
            Bytes::from(body.to_string()),
        );
        let bytes = self.once("create", req).await?;
        parse("create", &bytes).map_err(|e| (e, false))
    }

    pub(crate) async fn retrieve(&self, batch_id: &str) -> Result<BatchObject, (BatchError, bool)> {
        let req = self.request(
            Method::GET,
            &format!("/batches/{batch_id}"),
            "",
            Bytes::new(),
        );
        let bytes = self.once("poll", req).await?;
        parse("poll", &bytes).map_err(|e| (e, true))
    }

    pub(crate) async fn list(&self, after: Option<&str>) -> Result<BatchList, BatchError> {
        let path = match after {
            Some(a) => format!("/batches?limit=100&after={a}"),
            None => "/batches?limit=100".to_owned(),
        };
        let bytes = self
            .call(
                "list",
                || self.request(Method::GET, &path, "", Bytes::new()),
                JSON_LIMIT,
            )
            .await?;
        parse("list", &bytes)
    }

    pub(crate) async fn cancel(&self, batch_id: &str) -> Result<BatchObject, BatchError> {
        let path = format!("/batches/{batch_id}/cancel");
        let bytes = self
            .call(
                "cancel",
                || self.request(Method::POST, &path, "", Bytes::new()),
                JSON_LIMIT,
            )
            .await?;
        parse("cancel", &bytes)
    }

    pub(crate) async fn content(&self, file_id: &str) -> Result<Bytes, BatchError> {
        let path = format!("/files/{file_id}/content");
        self.call(
            "download",
            || self.request(Method::GET, &path, "", Bytes::new()),
            usize::MAX,
        )
        .await
    }

    pub(crate) async fn delete(&self, file_id: &str) -> Result<(), BatchError> {
        let path = format!("/files/{file_id}");
        self.call(
            "delete",
            || self.request(Method::DELETE, &path, "", Bytes::new()),
            JSON_LIMIT,
        )
        .await
        .map(drop)
    }
}

/// Classifies an API answer: a JSON error body or a non-2xx status is a
/// failure; an output file (not JSON) with a 2xx status is a success.
fn classify(c: &Classifier, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if status.is_success() && !body.trim_ascii_start().starts_with(b"{") {
        return Outcome::Success;
    }
    c.classify(status, headers, body)
}

fn parse<T: for<'de> Deserialize<'de>>(what: &'static str, body: &[u8]) -> Result<T, BatchError> {
    serde_json::from_slice(body).map_err(|e| {
        BatchError::upstream(ApiFailure {
            what,
            status: Some(200),
            code: None,
            message: format!("unexpected answer: {e}"),
            source: None,
        })
    })
}

/// A boundary that does not occur in `content`.
fn boundary_for(content: &[u8]) -> String {
    let mut n: u64 = 0x7157_656e_2d62_6174;
    loop {
        let b = format!("tower-qwen-batch-{n:016x}");
        if memchr::memmem::find(content, b.as_bytes()).is_none() {
            return b;
        }
        n = n.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multipart_shape() {
        let body = multipart(b"{\"a\":1}\n", "x.jsonl", "B");
        let s = std::str::from_utf8(&body).unwrap();
        assert!(s.starts_with(
            "--B\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--B\r\n"
        ));
        assert!(s.contains("filename=\"x.jsonl\""));
        assert!(s.ends_with("\r\n\r\n{\"a\":1}\n\r\n--B--\r\n"));
    }

    #[test]
    fn boundary_avoids_the_content() {
        let first = boundary_for(b"");
        let content = format!("xx{first}yy");
        let second = boundary_for(content.as_bytes());
        assert_ne!(first, second);
        assert!(!content.contains(&second));
    }

    #[test]
    fn statuses() {
        assert_eq!(Status::of("completed"), Status::Completed);
        assert_eq!(Status::of("finalizing"), Status::Running);
        assert_eq!(Status::of("cancelling"), Status::Running);
        assert_eq!(Status::of("expired"), Status::Expired);
    }
}
