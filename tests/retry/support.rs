//! Test helpers shared by the retry and timeout tests: a response body fed
//! from a channel (so a test decides when each frame arrives), and response
//! builders.

#![allow(dead_code, unreachable_pub)]

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::Response;
use http_body::Frame;
use tokio::sync::mpsc;
use tower_qwen::BoxError;

/// A response body whose frames come from a channel.
#[derive(Debug)]
pub struct TestBody {
    rx: mpsc::UnboundedReceiver<Result<Frame<Bytes>, BoxError>>,
}

/// The sending side of a [`TestBody`].
#[derive(Clone, Debug)]
pub struct Feed {
    tx: mpsc::UnboundedSender<Result<Frame<Bytes>, BoxError>>,
}

impl Feed {
    /// Sends one data frame.
    pub fn data(&self, s: &str) {
        let _ = self
            .tx
            .send(Ok(Frame::data(Bytes::copy_from_slice(s.as_bytes()))));
    }

    /// Sends a read error.
    pub fn error(&self, msg: &'static str) {
        let _ = self.tx.send(Err(BoxError::from(msg)));
    }

    /// Whether the body was dropped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

/// A body the test feeds frame by frame; it ends when every `Feed` is
/// dropped.
pub fn live() -> (Feed, TestBody) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Feed { tx }, TestBody { rx })
}

/// A finished body made of `chunks`.
pub fn chunks(chunks: &[&str]) -> TestBody {
    let (feed, body) = live();
    for c in chunks {
        feed.data(c);
    }
    body
}

impl http_body::Body for TestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// A response with a content type and a finished body.
pub fn response(status: u16, content_type: &str, body: &str) -> Response<TestBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(chunks(&[body]))
        .unwrap()
}

/// A JSON response.
pub fn json(status: u16, body: &str) -> Response<TestBody> {
    response(status, "application/json", body)
}

/// An event-stream response with the given chunks.
pub fn sse(chunks_: &[&str]) -> Response<TestBody> {
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(chunks(chunks_))
        .unwrap()
}

/// A 200 JSON answer.
pub fn ok() -> Response<TestBody> {
    json(200, OK_BODY)
}

pub const OK_BODY: &str = r#"{"output":{"text":"Hello!","finish_reason":"stop"},"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7},"request_id":"ok-1"}"#;
pub const RATE_QUOTA: &str = r#"{"request_id":"r1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#;
pub const ALLOCATION_QUOTA: &str = r#"{"request_id":"r2","code":"Throttling.AllocationQuota","message":"Allocated quota exceeded, please increase your quota limit."}"#;
pub const BURST_RATE: &str = r#"{"request_id":"r3","code":"Throttling.BurstRate","message":"Request rate increased too quickly. To ensure system stability, please adjust your client logic to scale requests more smoothly over time."}"#;
pub const UNAVAILABLE: &str = r#"{"request_id":"r4","code":"ServiceUnavailable","message":"Service temporarily unavailable, possibly overloaded or not ready."}"#;
pub const INVALID_KEY: &str =
    r#"{"request_id":"r5","code":"InvalidApiKey","message":"Invalid API-key provided."}"#;
pub const INVALID_PARAMETER: &str = r#"{"request_id":"r6","code":"InvalidParameter","message":"Range of input length should be [1, 30720]"}"#;
pub const ARREARAGE: &str = r#"{"request_id":"r7","code":"Arrearage","message":"Access denied, please make sure your account is in good standing."}"#;
pub const SSE_THROTTLED: &str = "id:1\nevent:error\n:HTTP_STATUS/429\ndata:{\"request_id\":\"r8\",\"code\":\"Throttling.RateQuota\",\"message\":\"Requests rate limit exceeded, please try again later.\"}\n\n";
pub const SSE_FRAME_1: &str = "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"Hel\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]},\"usage\":{\"input_tokens\":5,\"output_tokens\":1},\"request_id\":\"s1\"}\n\n";
pub const SSE_FRAME_2: &str = "id:2\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"lo\",\"role\":\"assistant\"},\"finish_reason\":\"stop\"}]},\"usage\":{\"input_tokens\":5,\"output_tokens\":2},\"request_id\":\"s1\"}\n\n";
pub const SSE_ERROR_500: &str = "id:3\nevent:error\n:HTTP_STATUS/500\ndata:{\"request_id\":\"s1\",\"code\":\"InternalError\",\"message\":\"An internal error has occured, please try again later.\"}\n\n";
