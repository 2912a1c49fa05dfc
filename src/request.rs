//! What a request to DashScope asks for: endpoint, model, streaming, and an
//! estimate of the tokens it will cost.
//!
//! Several layers need the same facts about a request (the rate limiter keys
//! by model and reserves tokens; retry must know whether it streams; the
//! gateway shapes its errors by protocol). [`RequestInfo::of`] reads them once
//! from the path, headers and a buffered JSON body and caches the answer in the
//! request's extensions, so a stack parses each body at most once.
//!
//! Parsing never fails: an unknown path, a non-JSON or oversized body yields
//! [`Endpoint::Other`] / no model / a zero estimate, and the layers fall back
//! to their generic behaviour.
//!
//! # Example
//!
//! ```
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower_qwen::request::{Endpoint, RequestInfo};
//!
//! let mut req = http::Request::post("https://dashscope-intl.aliyuncs.com/compatible-mode/v1/chat/completions")
//!     .body(Full::new(Bytes::from_static(
//!         br#"{"model":"qwen-plus","stream":true,"max_tokens":100,
//!             "messages":[{"role":"user","content":"Hello, world"}]}"#,
//!     )))
//!     .unwrap();
//! let info = RequestInfo::of(&mut req);
//! assert_eq!(info.endpoint, Endpoint::CompatibleChat);
//! assert_eq!(info.model.as_deref(), Some("qwen-plus"));
//! assert!(info.stream);
//! assert_eq!(info.input_tokens, 3 + tower_qwen::tokens::MESSAGE_OVERHEAD);
//! assert_eq!(info.max_output_tokens, Some(100));
//! ```

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;

use http::{HeaderMap, Request};
use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, SeqAccess, Visitor};

use crate::body::BufferedBody;
use crate::tokens::{MESSAGE_OVERHEAD, estimate_text_tokens};

/// Which DashScope API a request is aimed at, from its path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Endpoint {
    /// `POST /api/v1/services/aigc/text-generation/generation`
    NativeGeneration,
    /// `POST /api/v1/services/aigc/multimodal-generation/generation`
    NativeMultimodal,
    /// `POST /compatible-mode/v1/chat/completions`
    CompatibleChat,
    /// `POST /api/v1/services/embeddings/text-embedding/text-embedding`
    NativeEmbedding,
    /// `POST /compatible-mode/v1/embeddings`
    CompatibleEmbedding,
    /// `/api/v1/tasks/...`: async task poll, cancel or list.
    Task,
    /// Anything else.
    #[default]
    Other,
}

/// The two wire dialects DashScope speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// `/api/v1/...`: `{"code","message","request_id"}` errors, `event:` SSE.
    Native,
    /// `/compatible-mode/v1/...`: OpenAI-shaped errors and SSE with `[DONE]`.
    Compatible,
}

impl Endpoint {
    /// Classifies a request path.
    pub fn from_path(path: &str) -> Self {
        let path = path.trim_end_matches('/');
        if path.ends_with("/services/aigc/text-generation/generation") {
            Self::NativeGeneration
        } else if path.ends_with("/services/aigc/multimodal-generation/generation") {
            Self::NativeMultimodal
        } else if path.ends_with("/chat/completions") {
            Self::CompatibleChat
        } else if path.ends_with("/services/embeddings/text-embedding/text-embedding") {
            Self::NativeEmbedding
        } else if path.ends_with("/embeddings") {
            Self::CompatibleEmbedding
        } else if path.contains("/api/v1/tasks") {
            Self::Task
        } else {
            Self::Other
        }
    }

    /// The wire dialect of this endpoint. Paths under `/compatible-mode/` are
    /// compatible; everything else is native.
    pub fn protocol(self) -> Protocol {
        match self {
            Self::CompatibleChat | Self::CompatibleEmbedding => Protocol::Compatible,
            _ => Protocol::Native,
        }
    }

    /// Whether this endpoint generates text (chat or multimodal).
    pub fn is_generation(self) -> bool {
        matches!(
            self,
            Self::NativeGeneration | Self::NativeMultimodal | Self::CompatibleChat
        )
    }

    /// Whether this endpoint computes embeddings.
    pub fn is_embedding(self) -> bool {
        matches!(self, Self::NativeEmbedding | Self::CompatibleEmbedding)
    }
}

/// Facts about one request. See the [module docs](self) for an example.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RequestInfo {
    /// The endpoint, from the path.
    pub endpoint: Endpoint,
    /// The `model` field of the JSON body, if any.
    pub model: Option<Arc<str>>,
    /// Whether the response will be an SSE stream (`"stream": true`, or the
    /// native `X-DashScope-SSE: enable` / `Accept: text/event-stream`).
    pub stream: bool,
    /// Compatible mode: `stream_options.include_usage` was set.
    pub include_usage: bool,
    /// Estimated input tokens ([`crate::tokens`]).
    pub input_tokens: u32,
    /// `max_tokens` / `max_completion_tokens` / `parameters.max_tokens`.
    pub max_output_tokens: Option<u32>,
    /// Number of texts (embeddings) or messages (chat) in the input.
    pub inputs: u32,
}

impl RequestInfo {
    /// Reads the facts from a request's path, headers and body bytes.
    ///
    /// `body` is `None` when the body is not buffered; the model and the
    /// estimate are then unknown.
    pub fn parse(path: &str, headers: &HeaderMap, body: Option<&[u8]>) -> Self {
        let endpoint = Endpoint::from_path(path);
        let mut info = RequestInfo {
            endpoint,
            ..Default::default()
        };
        if header_is(headers, "x-dashscope-sse", "enable")
            || header_is(headers, http::header::ACCEPT.as_str(), "text/event-stream")
        {
            info.stream = true;
        }
        if let Some(body) = body
            && let Ok(raw) = serde_json::from_slice::<RawRequest<'_>>(body)
        {
            raw.fill(&mut info);
        }
        info
    }

    /// The facts for `req`, parsed once and cached in its extensions.
    pub fn of<B: BufferedBody>(req: &mut Request<B>) -> Arc<RequestInfo> {
        if let Some(info) = req.extensions().get::<Arc<RequestInfo>>() {
            return info.clone();
        }
        let body = req.body().buffered();
        let info = Arc::new(RequestInfo::parse(
            req.uri().path(),
            req.headers(),
            body.as_deref(),
        ));
        req.extensions_mut().insert(info.clone());
        info
    }

    /// Tokens to reserve for this request: the input estimate plus the output
    /// budget (`max_tokens` when given, else `default_output`). Embeddings
    /// have no output.
    pub fn estimated_tokens(&self, default_output: u32) -> u32 {
        let output = if self.endpoint.is_embedding() {
            0
        } else {
            self.max_output_tokens.unwrap_or(default_output)
        };
        self.input_tokens.saturating_add(output).max(1)
    }
}

fn header_is(headers: &HeaderMap, name: &str, value: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(value)))
}

// ---------------------------------------------------------------------------
// Body shapes. Only the fields the estimate needs are read; everything else is
// skipped without allocating.

#[derive(Deserialize, Default)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    /// Compatible chat.
    #[serde(default)]
    messages: Option<Messages>,
    /// Native: an object with `messages`/`prompt`/`texts`; compatible
    /// embeddings: a string or an array of strings.
    #[serde(default)]
    input: Option<Input>,
    #[serde(default)]
    parameters: Option<Parameters>,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize, Default)]
struct Parameters {
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    stream: Option<bool>,
}

impl RawRequest<'_> {
    fn fill(self, info: &mut RequestInfo) {
        info.model = self.model.map(|m| Arc::from(m.as_ref()));
        if self.stream == Some(true)
            || self.parameters.as_ref().and_then(|p| p.stream) == Some(true)
        {
            info.stream = true;
        }
        info.include_usage = self
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let max = self
            .max_completion_tokens
            .or(self.max_tokens)
            .or(self.parameters.and_then(|p| p.max_tokens));
        info.max_output_tokens = max.map(|m| u32::try_from(m).unwrap_or(u32::MAX));
        let mut count = Count::default();
        if let Some(m) = self.messages {
            count.add(m.0);
        }
        if let Some(i) = self.input {
            count.add(i.0);
        }
        info.input_tokens = u32::try_from(count.tokens).unwrap_or(u32::MAX);
        info.inputs = u32::try_from(count.items).unwrap_or(u32::MAX);
    }
}

#[derive(Default, Clone, Copy)]
struct Count {
    tokens: u64,
    items: u64,
}

impl Count {
    fn add(&mut self, other: Count) {
        self.tokens += other.tokens;
        self.items += other.items;
    }
}

/// `messages: [{role, content: string | [{text}|{image}...]}]`
struct Messages(Count);

impl<'de> Deserialize<'de> for Messages {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Messages;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an array of messages")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Messages, A::Error> {
                let mut c = Count::default();
                while let Some(m) = seq.next_element::<Message>()? {
                    c.tokens += u64::from(m.0) + u64::from(MESSAGE_OVERHEAD);
                    c.items += 1;
                }
                Ok(Messages(c))
            }
        }
        d.deserialize_seq(V)
    }
}

/// One message: counts the text of its `content` (and `reasoning_content`).
struct Message(u32);

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut tokens = 0u32;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "content" || key == "reasoning_content" {
                        tokens = tokens.saturating_add(map.next_value::<Text>()?.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Message(tokens))
            }
        }
        d.deserialize_map(V)
    }
}

/// Text in any of the shapes DashScope accepts: a string, `null`, an array of
/// strings or of parts (`{"text": ...}`, `{"image": ...}`).
struct Text(u32);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text content")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(estimate_text_tokens(v)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(0))
            }
            fn visit_none<E: de::Error>(self) -> Result<Text, E> {
                Ok(Text(0))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Text, A::Error> {
                let mut t = 0u32;
                while let Some(part) = seq.next_element::<Text>()? {
                    t = t.saturating_add(part.0);
                }
                Ok(Text(t))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Text, A::Error> {
                let mut t = 0u32;
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if key == "text" {
                        t = t.saturating_add(map.next_value::<Text>()?.0);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Text(t))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Text, E> {
                Ok(Text(0))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Text, E> {
                Ok(Text(0))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Text, E> {
                Ok(Text(0))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Text, E> {
                Ok(Text(0))
            }
        }
        d.deserialize_any(V)
    }
}

/// `input`: native `{messages|prompt|texts}`, or compatible embeddings'
/// string / array of strings.
struct Input(Count);

impl<'de> Deserialize<'de> for Input {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Input;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an input object, string or array")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Input, E> {
                Ok(Input(Count {
                    tokens: u64::from(estimate_text_tokens(v)),
                    items: 1,
                }))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Input, A::Error> {
                let mut c = Count::default();
                while let Some(t) = seq.next_element::<Text>()? {
                    c.tokens += u64::from(t.0);
                    c.items += 1;
                }
                Ok(Input(c))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Input, A::Error> {
                let mut c = Count::default();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    match key.as_ref() {
                        "messages" => c.add(map.next_value::<Messages>()?.0),
                        "prompt" => {
                            c.tokens += u64::from(map.next_value::<Text>()?.0);
                            c.items += 1;
                        }
                        "texts" => c.add(map.next_value::<Input>()?.0),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(Input(c))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(path: &str, body: &str) -> RequestInfo {
        RequestInfo::parse(path, &HeaderMap::new(), Some(body.as_bytes()))
    }

    #[test]
    fn native_generation() {
        let i = parse(
            "/api/v1/services/aigc/text-generation/generation",
            r#"{"model":"qwen-max","input":{"messages":[{"role":"system","content":"abcd"},{"role":"user","content":"你好世界"}]},"parameters":{"result_format":"message","max_tokens":50}}"#,
        );
        assert_eq!(i.endpoint, Endpoint::NativeGeneration);
        assert_eq!(i.model.as_deref(), Some("qwen-max"));
        assert!(!i.stream);
        assert_eq!(i.input_tokens, 1 + 3 + 2 * MESSAGE_OVERHEAD);
        assert_eq!(i.max_output_tokens, Some(50));
        assert_eq!(i.inputs, 2);
        assert_eq!(i.estimated_tokens(1000), i.input_tokens + 50);
    }

    #[test]
    fn native_stream_from_header() {
        let mut h = HeaderMap::new();
        h.insert("x-dashscope-sse", "enable".parse().unwrap());
        let i = RequestInfo::parse(
            "/api/v1/services/aigc/multimodal-generation/generation",
            &h,
            Some(br#"{"model":"qwen-vl-max","input":{"messages":[{"role":"user","content":[{"image":"http://x/y.png"},{"text":"abcdabcd"}]}]}}"#),
        );
        assert_eq!(i.endpoint, Endpoint::NativeMultimodal);
        assert!(i.stream);
        assert_eq!(i.input_tokens, 2 + MESSAGE_OVERHEAD);
    }

    #[test]
    fn embeddings_both_shapes() {
        let n = parse(
            "/api/v1/services/embeddings/text-embedding/text-embedding",
            r#"{"model":"text-embedding-v4","input":{"texts":["abcd","abcdabcd"]},"parameters":{"dimension":1024}}"#,
        );
        assert_eq!(n.endpoint, Endpoint::NativeEmbedding);
        assert_eq!((n.input_tokens, n.inputs), (3, 2));
        assert_eq!(n.estimated_tokens(1000), 3);
        let c = parse(
            "/compatible-mode/v1/embeddings",
            r#"{"model":"text-embedding-v3","input":"abcdabcd","encoding_format":"float"}"#,
        );
        assert_eq!(c.endpoint, Endpoint::CompatibleEmbedding);
        assert_eq!((c.input_tokens, c.inputs), (2, 1));
        assert_eq!(c.endpoint.protocol(), Protocol::Compatible);
    }

    #[test]
    fn compatible_chat_options() {
        let i = parse(
            "/compatible-mode/v1/chat/completions",
            r#"{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"max_completion_tokens":7,"max_tokens":9}"#,
        );
        assert!(i.stream && i.include_usage);
        assert_eq!(i.max_output_tokens, Some(7));
    }

    #[test]
    fn hostile_bodies_do_not_fail() {
        for body in [
            "",
            "null",
            "[]",
            "{",
            r#"{"model":5}"#,
            r#"{"messages":"x"}"#,
            r#"{"input":{"messages":[1,2]}}"#,
        ] {
            let i = parse("/compatible-mode/v1/chat/completions", body);
            assert_eq!(i.endpoint, Endpoint::CompatibleChat);
            assert_eq!(i.input_tokens, 0, "{body}");
        }
        assert_eq!(Endpoint::from_path("/foo"), Endpoint::Other);
        assert_eq!(Endpoint::from_path("/api/v1/tasks/abc"), Endpoint::Task);
    }
}
