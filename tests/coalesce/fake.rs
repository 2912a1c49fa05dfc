//! A fake DashScope embedding upstream: deterministic vectors per text,
//! records every call, and fails on demand.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::Service;
use tower_qwen::BoxError;
use tower_qwen::body::Body;

pub const NATIVE: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
pub const COMPAT: &str = "/compatible-mode/v1/embeddings";

/// The vector the fake gives `text`: unique per text in these tests.
pub fn vector(text: &str) -> Vec<f64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    vec![text.len() as f64, (h % 1000) as f64 / 8.0]
}

/// Tokens the fake charges for `text`: its length plus one, so totals rarely
/// divide evenly.
pub fn tokens(text: &str) -> u64 {
    text.len() as u64 + 1
}

#[derive(Clone, Debug)]
pub struct Call {
    /// The request path.
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The texts of an embedding call (empty otherwise).
    pub texts: Vec<String>,
}

#[derive(Clone, Debug)]
pub enum Mode {
    Ok,
    /// Answer every embedding call with this status and body.
    Status(u16, &'static str),
    /// Fail every call with a transport error.
    Reset,
}

pub struct Fake {
    pub calls: Mutex<Vec<Call>>,
    pub mode: Mutex<Mode>,
    /// Refuse batches over this many texts with a 400 "batch size" error;
    /// `true` states the limit in the message.
    pub cap: Mutex<Option<(usize, bool)>>,
    /// When set, each call takes one permit before answering.
    pub gate: Option<Arc<Semaphore>>,
    /// Latency of each call (tokio time).
    pub delay: Duration,
}

impl Default for Fake {
    fn default() -> Self {
        Self {
            calls: Mutex::new(Vec::new()),
            mode: Mutex::new(Mode::Ok),
            cap: Mutex::new(None),
            gate: None,
            delay: Duration::ZERO,
        }
    }
}

impl Fake {
    pub fn calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// The number of texts of each call, in order.
    pub fn sizes(&self) -> Vec<usize> {
        self.calls().iter().map(|c| c.texts.len()).collect()
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Body>,
    ) -> Result<Response<Full<Bytes>>, BoxError> {
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        let path = parts.uri.path().to_owned();
        let parsed: Option<Value> = serde_json::from_slice(&body).ok();
        let native = path == NATIVE;
        let texts: Vec<String> = match (&parsed, path.as_str()) {
            (Some(v), NATIVE) => strings(&v["input"]["texts"]),
            (Some(v), COMPAT) => match &v["input"] {
                Value::String(s) => vec![s.clone()],
                other => strings(other),
            },
            _ => Vec::new(),
        };
        let n = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(Call {
                path: path.clone(),
                headers: parts.headers.clone(),
                body: body.clone(),
                texts: texts.clone(),
            });
            calls.len()
        };
        if let Some(gate) = &self.gate {
            gate.acquire().await?.forget();
        }
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if path != NATIVE && path != COMPAT {
            // Echo anything else, as an event stream.
            let mut res = Response::new(Full::new(body));
            res.headers_mut()
                .insert("content-type", "text/event-stream".parse().unwrap());
            return Ok(res);
        }
        let mode = self.mode.lock().unwrap().clone();
        match mode {
            Mode::Reset => {
                return Err(Box::new(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                )));
            }
            Mode::Status(status, body) => {
                return Ok(json_response(status, Bytes::from_static(body.as_bytes())));
            }
            Mode::Ok => {}
        }
        let cap = *self.cap.lock().unwrap();
        if let Some((cap, state)) = cap
            && texts.len() > cap
        {
            let msg = if state {
                format!("batch size is invalid, it should not be larger than {cap}.")
            } else {
                "Batch size too large.".to_owned()
            };
            let body = json!({"code": "InvalidParameter", "message": msg, "request_id": format!("req-{n}")});
            return Ok(json_response(400, Bytes::from(body.to_string())));
        }
        let total: u64 = texts.iter().map(|t| tokens(t)).sum();
        let body = if native {
            json!({
                "output": {"embeddings": texts.iter().enumerate().map(|(i, t)| json!({"text_index": i, "embedding": vector(t)})).collect::<Vec<_>>()},
                "usage": {"total_tokens": total},
                "request_id": format!("req-{n}"),
            })
        } else {
            json!({
                "data": texts.iter().enumerate().map(|(i, t)| json!({"object": "embedding", "embedding": vector(t), "index": i})).collect::<Vec<_>>(),
                "model": parsed.as_ref().map(|v| v["model"].clone()).unwrap_or(Value::Null),
                "object": "list",
                "usage": {"prompt_tokens": total, "total_tokens": total},
                "id": format!("req-{n}"),
            })
        };
        Ok(json_response(200, Bytes::from(body.to_string())))
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn json_response(status: u16, body: Bytes) -> Response<Full<Bytes>> {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = StatusCode::from_u16(status).unwrap();
    res.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    res.headers_mut()
        .insert("x-request-id", "fake".parse().unwrap());
    res
}

/// The fake as a tower service (cheap to clone).
#[derive(Clone)]
pub struct FakeSvc(pub Arc<Fake>);

impl Service<Request<Body>> for FakeSvc {
    type Response = Response<Full<Bytes>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        Box::pin(self.0.clone().handle(req))
    }
}
