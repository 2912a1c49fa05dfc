use http::Request;
use serde_json::{Map, Value, json};

use crate::body::Body;
use crate::request::Protocol;

/// Path of native text generation.
pub const NATIVE_GENERATION: &str = "/api/v1/services/aigc/text-generation/generation";
/// Path of native multimodal generation (Qwen-VL, Qwen-Omni).
pub const NATIVE_MULTIMODAL: &str = "/api/v1/services/aigc/multimodal-generation/generation";
/// Path of OpenAI-compatible chat completions.
pub const COMPATIBLE_CHAT: &str = "/compatible-mode/v1/chat/completions";
/// Path of native embeddings.
pub const NATIVE_EMBEDDING: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
/// Path of OpenAI-compatible embeddings.
pub const COMPATIBLE_EMBEDDING: &str = "/compatible-mode/v1/embeddings";
/// Path prefix of async task polling (`GET {TASKS}/{task_id}`).
pub const TASKS: &str = "/api/v1/tasks";

/// A chat completion request in either dialect.
///
/// It only builds an `http::Request<Body>` with DashScope's path, JSON body
/// and headers; any raw request works through the stack just as well.
///
/// Streaming sets what each dialect needs: compatible mode sends
/// `"stream": true` and `stream_options.include_usage` (so the rate limiter
/// can reconcile tokens; the last chunk then has `"choices": []`); native
/// mode sends `X-DashScope-SSE: enable`, `Accept: text/event-stream`,
/// `parameters.incremental_output: true` and `result_format: "message"`.
///
/// # Example
///
/// ```
/// use tower_qwen::client::ChatRequest;
/// use tower_qwen::body::BufferedBody;
///
/// let req = ChatRequest::new("qwen-plus")
///     .system("You are terse.")
///     .user("Hello")
///     .max_tokens(64)
///     .stream(true)
///     .into_request();
/// assert_eq!(req.uri(), "/compatible-mode/v1/chat/completions");
/// let body: serde_json::Value = serde_json::from_slice(&req.body().buffered().unwrap()).unwrap();
/// assert_eq!(body["stream_options"]["include_usage"], true);
/// assert_eq!(body["messages"][1]["content"], "Hello");
/// ```
#[derive(Clone, Debug)]
pub struct ChatRequest {
    model: String,
    messages: Vec<Value>,
    stream: bool,
    max_tokens: Option<u32>,
    protocol: Protocol,
    multimodal: bool,
    params: Map<String, Value>,
}

impl ChatRequest {
    /// A compatible-mode request to `model` with no messages yet.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            messages: Vec::new(),
            stream: false,
            max_tokens: None,
            protocol: Protocol::Compatible,
            multimodal: false,
            params: Map::new(),
        }
    }

    /// Adds a message with any role and content (a string or parts).
    pub fn message(mut self, role: &str, content: impl Into<Value>) -> Self {
        self.messages
            .push(json!({"role": role, "content": content.into()}));
        self
    }

    /// Adds a system message.
    pub fn system(self, text: impl Into<String>) -> Self {
        self.message("system", text.into())
    }

    /// Adds a user message.
    pub fn user(self, text: impl Into<String>) -> Self {
        self.message("user", text.into())
    }

    /// Adds an assistant message.
    pub fn assistant(self, text: impl Into<String>) -> Self {
        self.message("assistant", text.into())
    }

    /// Streams the answer as SSE. Default is false.
    pub fn stream(mut self, yes: bool) -> Self {
        self.stream = yes;
        self
    }

    /// Caps the output tokens. Default is the model's own cap. Setting it
    /// also makes the rate limiter's token reservation exact.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.max_tokens = Some(n);
        self
    }

    /// Uses the native protocol (`/api/v1/services/aigc/...`). Default is
    /// compatible mode.
    pub fn native(mut self) -> Self {
        self.protocol = Protocol::Native;
        self
    }

    /// Uses the native multimodal path (Qwen-VL / Qwen-Omni); implies native.
    pub fn multimodal(mut self) -> Self {
        self.protocol = Protocol::Native;
        self.multimodal = true;
        self
    }

    /// Sets any other parameter (`temperature`, `top_p`, `tools`,
    /// `enable_thinking`...). In native mode it goes into `parameters`.
    pub fn param(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.params.insert(name.into(), value.into());
        self
    }

    /// The model.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Builds the HTTP request (path-only URI; the client resolves it).
    pub fn into_request(self) -> Request<Body> {
        let builder = Request::post(match (self.protocol, self.multimodal) {
            (Protocol::Compatible, _) => COMPATIBLE_CHAT,
            (Protocol::Native, false) => NATIVE_GENERATION,
            (Protocol::Native, true) => NATIVE_MULTIMODAL,
        })
        .header(http::header::CONTENT_TYPE, "application/json");
        let (builder, body) = match self.protocol {
            Protocol::Compatible => {
                let mut body = self.params;
                body.insert("model".into(), self.model.into());
                body.insert("messages".into(), self.messages.into());
                if let Some(n) = self.max_tokens {
                    body.insert("max_tokens".into(), n.into());
                }
                let builder = if self.stream {
                    body.insert("stream".into(), true.into());
                    body.entry("stream_options")
                        .or_insert_with(|| json!({"include_usage": true}));
                    builder.header(http::header::ACCEPT, "text/event-stream")
                } else {
                    builder
                };
                (builder, Value::Object(body))
            }
            Protocol::Native => {
                let mut params = self.params;
                params
                    .entry("result_format")
                    .or_insert_with(|| "message".into());
                if let Some(n) = self.max_tokens {
                    params.insert("max_tokens".into(), n.into());
                }
                let builder = if self.stream {
                    params.insert("incremental_output".into(), true.into());
                    builder
                        .header(http::header::ACCEPT, "text/event-stream")
                        .header("x-dashscope-sse", "enable")
                } else {
                    builder
                };
                let body = json!({
                    "model": self.model,
                    "input": {"messages": self.messages},
                    "parameters": params,
                });
                (builder, body)
            }
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        builder
            .body(Body::from(bytes))
            .unwrap_or_else(|_| Request::new(Body::empty()))
    }
}

/// An embeddings request in either dialect.
///
/// # Example
///
/// ```
/// use tower_qwen::client::EmbeddingRequest;
/// let req = EmbeddingRequest::new("text-embedding-v4").input("hello").dimension(512).native().into_request();
/// assert_eq!(req.uri(), "/api/v1/services/embeddings/text-embedding/text-embedding");
/// ```
#[derive(Clone, Debug)]
pub struct EmbeddingRequest {
    model: String,
    texts: Vec<String>,
    dimension: Option<u32>,
    protocol: Protocol,
}

impl EmbeddingRequest {
    /// A compatible-mode request to `model` with no input yet.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            texts: Vec::new(),
            dimension: None,
            protocol: Protocol::Compatible,
        }
    }

    /// Adds one text.
    pub fn input(mut self, text: impl Into<String>) -> Self {
        self.texts.push(text.into());
        self
    }

    /// Adds several texts.
    pub fn inputs<I: IntoIterator<Item = T>, T: Into<String>>(mut self, texts: I) -> Self {
        self.texts.extend(texts.into_iter().map(Into::into));
        self
    }

    /// The vector size (v3/v4). Default is the model's (1024).
    pub fn dimension(mut self, d: u32) -> Self {
        self.dimension = Some(d);
        self
    }

    /// Uses the native protocol. Default is compatible mode.
    pub fn native(mut self) -> Self {
        self.protocol = Protocol::Native;
        self
    }

    /// Builds the HTTP request (path-only URI).
    pub fn into_request(self) -> Request<Body> {
        let (path, body) = match self.protocol {
            Protocol::Compatible => {
                let mut b =
                    json!({"model": self.model, "input": self.texts, "encoding_format": "float"});
                if let Some(d) = self.dimension {
                    b["dimensions"] = d.into();
                }
                (COMPATIBLE_EMBEDDING, b)
            }
            Protocol::Native => {
                let mut b =
                    json!({"model": self.model, "input": {"texts": self.texts}, "parameters": {}});
                if let Some(d) = self.dimension {
                    b["parameters"]["dimension"] = d.into();
                }
                (NATIVE_EMBEDDING, b)
            }
        };
        Request::post(path)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Body::from(serde_json::to_vec(&body).unwrap_or_default()))
            .unwrap_or_else(|_| Request::new(Body::empty()))
    }
}

/// Marks a task-API request (image synthesis, transcription, batch
/// embedding...) as asynchronous: `X-DashScope-Async: enable`. The answer is
/// a task id to poll at `GET /api/v1/tasks/{id}`. Text generation does not
/// support it (QWEN-API.md A5).
pub fn set_async<B>(req: &mut Request<B>) {
    req.headers_mut().insert(
        "x-dashscope-async",
        http::HeaderValue::from_static("enable"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::BufferedBody;
    use crate::request::{Endpoint, RequestInfo};

    fn info(mut req: Request<Body>) -> RequestInfo {
        (*RequestInfo::of(&mut req)).clone()
    }

    #[test]
    fn requests_parse_back() {
        let i = info(
            ChatRequest::new("qwen-max")
                .user("abcd")
                .max_tokens(9)
                .native()
                .stream(true)
                .into_request(),
        );
        assert_eq!(i.endpoint, Endpoint::NativeGeneration);
        assert!(i.stream);
        assert_eq!(i.max_output_tokens, Some(9));
        assert_eq!(i.model.as_deref(), Some("qwen-max"));
        let i = info(
            ChatRequest::new("qwen-vl-max")
                .user("x")
                .multimodal()
                .into_request(),
        );
        assert_eq!(i.endpoint, Endpoint::NativeMultimodal);
        assert!(!i.stream);
        let i = info(
            EmbeddingRequest::new("text-embedding-v3")
                .inputs(["a", "b", "c"])
                .into_request(),
        );
        assert_eq!((i.endpoint, i.inputs), (Endpoint::CompatibleEmbedding, 3));
        let r = ChatRequest::new("m")
            .param("temperature", 0.2)
            .native()
            .into_request();
        let v: Value = serde_json::from_slice(&r.body().buffered().unwrap()).unwrap();
        assert_eq!(v["parameters"]["temperature"], 0.2);
        assert_eq!(v["parameters"]["result_format"], "message");
        let mut r = EmbeddingRequest::new("m").input("x").into_request();
        set_async(&mut r);
        assert_eq!(r.headers()["x-dashscope-async"], "enable");
    }
}
