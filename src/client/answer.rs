//! Reading a chat answer: its text and token usage, in either dialect,
//! streamed or not, with errors surfaced wherever DashScope put them.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::Value;

use crate::BoxError;
use crate::classify::{Classifier, ErrorInfo, Outcome, is_event_stream};
use crate::sse::{EventMeta, parse_events};
use crate::usage::Usage;

/// The text and token usage of a chat answer: the common case, without
/// parsing JSON by hand.
///
/// [`ChatAnswer::read`] collects a chat response and reads either dialect
/// (OpenAI-compatible `choices[0].message` / `delta`, native `output.text`
/// or `output.choices[0].message`), streamed (SSE, the deltas joined) or
/// not. An error anywhere (a non-2xx status, a business error inside an
/// HTTP 200 body, an SSE error frame, an error after partial content)
/// becomes a [`ChatError`] carrying the classifier's [`Outcome`] and
/// DashScope's code and message.
///
/// Native streams are read as incremental (`incremental_output: true`,
/// what [`ChatRequest`](super::ChatRequest) sets); a native stream whose
/// every chunk repeats the text before it (`incremental_output: false`) is
/// recognised and its last text kept.
///
/// # Example
///
/// ```
/// # #[cfg(not(feature = "mock"))] fn main() {}
/// # #[cfg(feature = "mock")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_qwen::BoxError> {
/// use tower::ServiceExt;
/// use tower_qwen::client::{ChatAnswer, ChatRequest, QwenClient};
///
/// let mock = tower_qwen::mock::MockDashScope::builder().key("sk-a", "acct").start().await?;
/// let client = QwenClient::builder().base_url(mock.base_url().parse()?).api_key("sk-a")?.build()?;
/// let req = ChatRequest::new("qwen-plus").user("Hello").max_tokens(3).stream(true).into_request();
/// let answer = ChatAnswer::read(client.oneshot(req).await?).await?;
/// assert!(!answer.text().is_empty());
/// assert_eq!(answer.usage().unwrap().output_tokens, 3);
/// # Ok(()) }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatAnswer {
    text: String,
    usage: Option<Usage>,
    finish_reason: Option<String>,
}

impl ChatAnswer {
    /// Reads the whole response body and parses it.
    ///
    /// # Errors
    ///
    /// The body's own error (a timeout, a reset: boxed as it came), or a
    /// [`ChatError`] when the answer is an error or not a chat answer.
    pub async fn read<B>(res: Response<B>) -> Result<ChatAnswer, BoxError>
    where
        B: http_body::Body,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = res.into_parts();
        let bytes: Bytes = body.collect().await.map_err(Into::into)?.to_bytes();
        Ok(Self::parse(parts.status, &parts.headers, &bytes)?)
    }

    /// Parses a complete response: status, headers and body.
    ///
    /// # Errors
    ///
    /// A [`ChatError`] when the answer is an error (in the status, a 200
    /// body or an SSE frame) or not a chat answer.
    pub fn parse(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Result<Self, ChatError> {
        let classifier = Classifier::new();
        let trimmed = body.trim_ascii_start();
        let sse = is_event_stream(headers)
            || trimmed.starts_with(b"data:")
            || trimmed.starts_with(b"id:")
            || trimmed.starts_with(b"event:");
        if !sse {
            let outcome = classifier.classify(status, headers, body);
            if !outcome.is_success() {
                return Err(ChatError::new(status, outcome, ErrorInfo::parse(body)));
            }
            let v: Value = serde_json::from_slice(body)
                .map_err(|_| ChatError::malformed(status, "the body is not JSON"))?;
            let (text, finish_reason) = text_of(&v)
                .ok_or_else(|| ChatError::malformed(status, "no message in the body"))?;
            return Ok(Self {
                text,
                usage: Usage::find(body),
                finish_reason,
            });
        }
        if !status.is_success() {
            let outcome = classifier.classify(status, headers, body);
            return Err(ChatError::new(status, outcome, None));
        }
        let mut chunks: Vec<String> = Vec::new();
        let mut native = false;
        let mut usage = None;
        let mut finish_reason = None;
        for ev in parse_events(body) {
            let meta = EventMeta {
                error_event: ev.is_error(),
                http_status: ev.http_status.or(Some(status.as_u16())),
                data_lines: 0,
            };
            if let Some(outcome) = classifier.classify_event(&meta, ev.data.as_bytes()) {
                let status = ev
                    .http_status
                    .and_then(|s| StatusCode::from_u16(s).ok())
                    .unwrap_or(status);
                return Err(ChatError::new(
                    status,
                    outcome,
                    ErrorInfo::parse(ev.data.as_bytes()),
                ));
            }
            if ev.data.trim() == "[DONE]" || ev.data.trim().is_empty() {
                continue;
            }
            let Ok(v) = serde_json::from_str::<Value>(&ev.data) else {
                return Err(ChatError::malformed(status, "a stream chunk is not JSON"));
            };
            native |= v.get("output").is_some();
            if let Some(u) = Usage::find(ev.data.as_bytes()) {
                usage = Some(u);
            }
            if let Some((text, finish)) = text_of(&v) {
                chunks.push(text);
                if finish.is_some() {
                    finish_reason = finish;
                }
            }
        }
        // A native stream without incremental output repeats the text so
        // far in every chunk.
        let cumulative = native
            && chunks.len() > 1
            && chunks.windows(2).all(|w| w[1].starts_with(w[0].as_str()));
        let text = if cumulative {
            chunks.pop().unwrap_or_default()
        } else {
            chunks.concat()
        };
        Ok(Self {
            text,
            usage,
            finish_reason,
        })
    }

    /// The answer's text (the deltas of a stream joined).
    pub fn text(&self) -> &str {
        &self.text
    }

    /// The answer's text, owned.
    pub fn into_text(self) -> String {
        self.text
    }

    /// The token usage, when the answer reported it (a compatible stream
    /// reports it only with `stream_options.include_usage`, which
    /// [`ChatRequest`](super::ChatRequest) sets).
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Why generation stopped (`stop`, `length`...), when reported.
    pub fn finish_reason(&self) -> Option<&str> {
        self.finish_reason.as_deref()
    }
}

/// The text and finish reason of one JSON chat body or chunk, either
/// dialect.
fn text_of(v: &Value) -> Option<(String, Option<String>)> {
    let finish = |f: Option<&Value>| {
        f.and_then(Value::as_str)
            .filter(|s| !s.is_empty() && *s != "null")
            .map(str::to_owned)
    };
    if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
        let message = choice.get("delta").or_else(|| choice.get("message"));
        let text = message.and_then(|m| content_text(m.get("content")?));
        return Some((
            text.unwrap_or_default(),
            finish(choice.get("finish_reason")),
        ));
    }
    if v.get("choices").is_some() {
        // A compatible stream's usage tail: `"choices": []`.
        return None;
    }
    let output = v.get("output")?;
    if let Some(choice) = output.get("choices").and_then(|c| c.get(0)) {
        let text = choice
            .get("message")
            .and_then(|m| content_text(m.get("content")?));
        return Some((
            text.unwrap_or_default(),
            finish(choice.get("finish_reason")),
        ));
    }
    let text = output.get("text").and_then(Value::as_str)?;
    Some((text.to_owned(), finish(output.get("finish_reason"))))
}

/// A message's `content`: a string, or (multimodal) a list of parts whose
/// `text`s are joined.
fn content_text(content: &Value) -> Option<String> {
    match content {
        Value::String(s) => Some(s.clone()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect(),
        ),
        _ => None,
    }
}

/// A chat call answered with an error, wherever DashScope put it: the
/// status line, a business error inside an HTTP 200 body, or an SSE error
/// frame (before or after partial content); or an answer that is not a chat
/// answer at all. It never contains the API key.
///
/// The classifier reads it as its [`outcome`](ChatError::outcome).
#[derive(Clone, PartialEq, Eq)]
pub struct ChatError {
    status: StatusCode,
    outcome: Outcome,
    code: Option<String>,
    message: Option<String>,
}

impl ChatError {
    fn new(status: StatusCode, outcome: Outcome, info: Option<ErrorInfo>) -> Self {
        let (code, message) = match info {
            Some(i) => (i.code.or(i.kind), i.message),
            None => (None, None),
        };
        Self {
            status,
            outcome,
            code,
            message,
        }
    }

    fn malformed(status: StatusCode, what: &str) -> Self {
        Self {
            status,
            outcome: Outcome::Permanent {
                reason: crate::classify::PermanentReason::Other,
            },
            code: None,
            message: Some(what.to_owned()),
        }
    }

    #[cfg(test)]
    pub(crate) fn sample() -> Self {
        Self::malformed(StatusCode::OK, "sample")
    }

    /// How the classifier reads this error (throttled, transient,
    /// permanent).
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// The HTTP status (for an SSE error frame, its `:HTTP_STATUS/` when
    /// given).
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// DashScope's error code (`Throttling.RateQuota`,
    /// `data_inspection_failed`...), when the error body had one.
    pub fn code(&self) -> Option<&str> {
        self.code.as_deref()
    }

    /// DashScope's message, when the error body had one.
    pub fn message(&self) -> Option<&str> {
        self.message.as_deref()
    }
}

impl fmt::Debug for ChatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatError")
            .field("status", &self.status)
            .field("outcome", &self.outcome)
            .field("code", &self.code)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for ChatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "chat call failed ({}, {})", self.status, self.outcome)?;
        if let Some(code) = &self.code {
            write!(f, ": {code}")?;
        }
        if let Some(message) = &self.message {
            write!(f, ": {message}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ChatError {}

impl crate::classify::KnownError for ChatError {
    fn outcome(&self) -> Outcome {
        self.outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::ThrottleCause;

    fn json() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/json".parse().unwrap());
        h
    }

    fn sse() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/event-stream".parse().unwrap());
        h
    }

    const OK: StatusCode = StatusCode::OK;

    #[test]
    fn both_dialects_not_streamed() {
        let compat = br#"{"choices":[{"message":{"role":"assistant","content":"Hi there"},"finish_reason":"stop","index":0}],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5},"id":"c"}"#;
        let a = ChatAnswer::parse(OK, &json(), compat).unwrap();
        assert_eq!(
            (a.text(), a.finish_reason(), a.usage().unwrap().total()),
            ("Hi there", Some("stop"), 5)
        );
        let native = br#"{"output":{"choices":[{"message":{"role":"assistant","content":"Hello"},"finish_reason":"stop"}]},"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4},"request_id":"r"}"#;
        let a = ChatAnswer::parse(OK, &json(), native).unwrap();
        assert_eq!((a.text(), a.usage().unwrap().output_tokens), ("Hello", 1));
        let text = br#"{"output":{"text":"plain","finish_reason":"stop"},"usage":{"input_tokens":1,"output_tokens":1,"total_tokens":2}}"#;
        assert_eq!(
            ChatAnswer::parse(OK, &json(), text).unwrap().text(),
            "plain"
        );
        let multimodal = br#"{"output":{"choices":[{"message":{"content":[{"text":"a "},{"text":"cat"}]},"finish_reason":"stop"}]}}"#;
        assert_eq!(
            ChatAnswer::parse(OK, &json(), multimodal).unwrap().text(),
            "a cat"
        );
    }

    #[test]
    fn both_dialects_streamed() {
        let compat = b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"},\"index\":0}]}\n\ndata: {\"choices\":[{\"delta\":{\"content\":\"lo\"},\"finish_reason\":\"stop\",\"index\":0}]}\n\ndata: {\"choices\":[],\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}\n\ndata: [DONE]\n\n";
        let a = ChatAnswer::parse(OK, &sse(), compat).unwrap();
        assert_eq!((a.text(), a.finish_reason()), ("Hello", Some("stop")));
        assert_eq!(a.usage().unwrap().total(), 3);
        let incremental = b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"ha\"},\"finish_reason\":\"null\"}]},\"usage\":{\"input_tokens\":1,\"output_tokens\":1,\"total_tokens\":2}}\n\nid:2\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"!\"},\"finish_reason\":\"stop\"}]},\"usage\":{\"input_tokens\":1,\"output_tokens\":2,\"total_tokens\":3}}\n\n";
        let a = ChatAnswer::parse(OK, &sse(), incremental).unwrap();
        assert_eq!((a.text(), a.finish_reason()), ("ha!", Some("stop")));
        assert_eq!(a.usage().unwrap().output_tokens, 2);
        let cumulative = b"id:1\ndata:{\"output\":{\"text\":\"Hel\",\"finish_reason\":\"null\"}}\n\nid:2\ndata:{\"output\":{\"text\":\"Hello\",\"finish_reason\":\"stop\"}}\n\n";
        assert_eq!(
            ChatAnswer::parse(OK, &sse(), cumulative).unwrap().text(),
            "Hello"
        );
    }

    #[test]
    fn errors_are_surfaced_wherever_they_are() {
        // A business error inside an HTTP 200.
        let body = br#"{"code":"Arrearage","message":"Access denied, please make sure your account is in good standing.","request_id":"2"}"#;
        let e = ChatAnswer::parse(OK, &json(), body).unwrap_err();
        assert!(e.outcome().is_permanent());
        assert_eq!(e.code(), Some("Arrearage"));
        // A 429 in the compatible dialect.
        let body = br#"{"error":{"message":"Requests rate limit exceeded","type":"limit_requests","code":"limit_requests"}}"#;
        let e = ChatAnswer::parse(StatusCode::TOO_MANY_REQUESTS, &json(), body).unwrap_err();
        assert_eq!(e.outcome().throttle_cause(), Some(ThrottleCause::Requests));
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        // A native SSE error frame with its real status in a comment.
        let body = b"id:1\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.RateQuota\",\"message\":\"Requests rate limit exceeded\"}\n\n";
        let e = ChatAnswer::parse(OK, &sse(), body).unwrap_err();
        assert_eq!(e.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(e.outcome().is_throttled());
        // A compatible error after partial content.
        let body = b"data: {\"choices\":[{\"delta\":{\"content\":\"par\"}}]}\n\ndata: {\"error\":{\"message\":\"Output data may contain inappropriate content.\",\"type\":\"data_inspection_failed\",\"code\":\"data_inspection_failed\"}}\n\n";
        let e = ChatAnswer::parse(OK, &sse(), body).unwrap_err();
        assert_eq!(e.code(), Some("data_inspection_failed"));
        assert!(e.to_string().contains("inappropriate"));
        // Not a chat answer.
        let e = ChatAnswer::parse(OK, &json(), b"{\"data\":[]}").unwrap_err();
        assert!(e.outcome().is_permanent());
        // The classifier reads the error as its outcome, boxed or not.
        let boxed: BoxError = Box::new(e.clone());
        assert_eq!(Classifier::new().classify_error(&boxed), e.outcome());
    }
}
