//! What a request to DashScope asks for: endpoint, model, streaming, and an
//! estimate of the tokens it will cost.
//!
//! Several layers need the same facts about a request (the rate limiter keys
//! by model and reserves tokens; retry must know whether it streams; the
//! gateway shapes its errors by protocol). [`RequestInfo::of`] reads them once
//! from the path, headers and a buffered JSON body and caches the answer in the
//! request's extensions, so a stack parses each body at most once.
//!
//! Parsing never fails: an unknown path yields [`Endpoint::Other`], a body
//! that is not buffered yields no model and a zero estimate, and a body
//! that cannot be read unambiguously (a repeated `"model"`, invalid JSON,
//! ...) yields its strictest reading plus a [`BodyError`] (see
//! [Ambiguous bodies](RequestInfo#ambiguous-bodies)), so no layer ever
//! admits it as a cheaper call than the upstream may make of it.
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
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

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
    /// `/compatible-mode/v1/files...`: the Files API (batch input and
    /// output files).
    Files,
    /// `/compatible-mode/v1/batches...`: the Batch API.
    Batches,
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
        use memchr::memmem::Finder;
        use std::sync::LazyLock;
        // Searchers built once (`str::contains` builds one per call).
        static FILES: LazyLock<Finder<'static>> =
            LazyLock::new(|| Finder::new("/compatible-mode/v1/files/"));
        static BATCHES: LazyLock<Finder<'static>> =
            LazyLock::new(|| Finder::new("/compatible-mode/v1/batches/"));
        let path = path.trim_end_matches('/');
        if path.ends_with("/compatible-mode/v1/files") || FILES.find(path.as_bytes()).is_some() {
            Self::Files
        } else if path.ends_with("/compatible-mode/v1/batches")
            || BATCHES.find(path.as_bytes()).is_some()
        {
            Self::Batches
        } else if path.ends_with("/services/aigc/text-generation/generation") {
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
            Self::CompatibleChat | Self::CompatibleEmbedding | Self::Files | Self::Batches => {
                Protocol::Compatible
            }
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
///
/// # Ambiguous bodies
///
/// What decides admission (the model, the token estimate, streaming) must
/// be read as the upstream reads it. A body is read strictly: valid UTF-8,
/// one JSON object (what serde_json accepts: no lone surrogate escapes)
/// and nothing after it, at most 128 levels deep anywhere, each
/// field that admission reads (`model`, `stream`, `stream_options`,
/// `max_tokens`, `max_completion_tokens`, `messages`, `input`,
/// `parameters`, and inside them `include_usage`, `max_tokens`, `stream`,
/// `content`, `reasoning_content`, `prompt`, `texts`, `text`) present at
/// most once, spelled exactly (not `Model`, `max-tokens`, `ſtream`: Go's
/// encoding/json and fastjson would read those as the field), and of its
/// type (`"max_tokens": "100"` is refused, Jackson would coerce it). How
/// DashScope's own reader treats a repeated key is not documented, so any
/// such body is ambiguous.
///
/// An ambiguous body gets [`RequestInfo::body_error`], and the other fields
/// hold its **strictest reading**: the last `model` (what serde_json, Go's
/// encoding/json, Jackson and fastjson keep for a repeated key), `stream`
/// when any reading streams, the largest output budget of all readings, and
/// an input estimate of the whole body as text (at least the estimate of
/// any part of it). The client stack's layers charge that reading, so an
/// ambiguous body is never admitted cheaper than the upstream may serve it;
/// the [gateway](crate::gateway) refuses it with a 400 before anything
/// leaves.
///
/// ```
/// use http::HeaderMap;
/// use tower_qwen::request::RequestInfo;
///
/// let body = br#"{"model":"qwen-turbo","model":"qwen-max","max_tokens":5,
///                 "messages":[{"role":"user","content":"hi"}]}"#;
/// let info = RequestInfo::parse("/compatible-mode/v1/chat/completions", &HeaderMap::new(), Some(body));
/// let err = info.body_error.as_ref().unwrap();
/// assert!(err.to_string().contains("`model` twice"), "{err}");
/// assert_eq!(info.model.as_deref(), Some("qwen-max"));
/// assert!(info.input_tokens >= 20); // the whole body, not the one short message
/// ```
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
    /// The largest of `max_tokens`, `max_completion_tokens` and
    /// `parameters.max_tokens` (which one the upstream honours differs by
    /// dialect, so admission reserves the largest).
    pub max_output_tokens: Option<u32>,
    /// Number of texts (embeddings) or messages (chat) in the input.
    pub inputs: u32,
    /// Why the body cannot be read unambiguously, if it cannot (see
    /// [Ambiguous bodies](RequestInfo#ambiguous-bodies)); the other fields
    /// then hold the body's strictest reading.
    pub body_error: Option<BodyError>,
}

/// A request body that cannot be read the way the upstream will read it:
/// not UTF-8, not JSON (a lone UTF-16 surrogate escape included), not a
/// JSON object, data after the object, nested deeper than 128 levels, a
/// field that admission reads given twice or spelled two ways, or of the
/// wrong type. See
/// [Ambiguous bodies](RequestInfo#ambiguous-bodies).
///
/// Its message names the field and the position, never the body's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyError {
    what: Box<str>,
}

impl BodyError {
    fn new(what: String) -> Self {
        Self { what: what.into() }
    }

    /// From a serde_json error of the strict reading: the walker's own
    /// messages (data errors) as they are, syntax errors as invalid JSON.
    fn from_json(e: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        let shown = e.to_string();
        Self::new(match e.classify() {
            Category::Data => shown,
            _ if shown.starts_with("recursion limit exceeded") => format!(
                "is nested more than {MAX_DEPTH} levels deep (line {}, column {})",
                e.line(),
                e.column()
            ),
            Category::Syntax => format!("is not valid JSON ({shown})"),
            _ => format!("is not a whole JSON object ({shown})"),
        })
    }
}

impl fmt::Display for BodyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "the request body {}", self.what)
    }
}

impl std::error::Error for BodyError {}

impl crate::classify::KnownError for BodyError {
    fn outcome(&self) -> crate::classify::Outcome {
        crate::classify::Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidRequest,
        }
    }
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
        if header_is(headers, &X_DASHSCOPE_SSE, "enable")
            || header_is(headers, &http::header::ACCEPT, "text/event-stream")
        {
            info.stream = true;
        }
        if let Some(body) = body {
            read_body(body, &mut info);
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

// Named once: a name given as `&str` is parsed again at each lookup.
static X_DASHSCOPE_SSE: http::HeaderName = http::HeaderName::from_static("x-dashscope-sse");

fn header_is(headers: &HeaderMap, name: &http::HeaderName, value: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(value)))
}

// ---------------------------------------------------------------------------
// Reading the body. One visitor walks the JSON with the place it is at; only
// the fields admission needs are read, everything else is skipped. Strict
// mode (the first reading) refuses every ambiguity; lenient mode (only for
// bodies the strict reading refused) takes the strictest value of each
// field and keeps what it found when the body breaks off.

/// Largest nesting serde_json accepts (its recursion limit); deeper bodies
/// are refused.
const MAX_DEPTH: u32 = 128;

fn read_body(body: &[u8], info: &mut RequestInfo) {
    let text = match std::str::from_utf8(body) {
        Ok(t) => t,
        Err(e) => {
            let err = BodyError::new(format!("is not valid UTF-8 (byte {})", e.valid_up_to()));
            return strictest(body, info, err);
        }
    };
    let start = text.trim_start_matches([' ', '\t', '\n', '\r']);
    if start.is_empty() {
        return;
    }
    if !start.starts_with('{') {
        return strictest(body, info, BodyError::new("is not a JSON object".into()));
    }
    let mut acc = Acc::new(true);
    let mut de = serde_json::Deserializer::from_str(text);
    let read = Walk::top(&mut acc)
        .deserialize(&mut de)
        .and_then(|()| de.end());
    match read {
        Ok(()) => acc.fill(info),
        Err(e) => strictest(body, info, BodyError::from_json(&e)),
    }
}

/// The strictest reading of a body the strict reading refused: the input
/// estimate of the whole body as text (at least that of any part of it),
/// the largest output budget and any `stream: true` among all readings, the
/// last `model` (as serde_json, Go's encoding/json, Jackson and fastjson
/// read a repeated key).
fn strictest(body: &[u8], info: &mut RequestInfo, err: BodyError) {
    let text = String::from_utf8_lossy(body);
    let mut acc = Acc::new(false);
    let mut de = serde_json::Deserializer::from_str(&text);
    // What was found before the body broke off is kept.
    let _ = Walk::top(&mut acc).deserialize(&mut de);
    acc.tokens = acc.tokens.max(u64::from(estimate_text_tokens(&text)));
    acc.fill(info);
    info.body_error = Some(err);
}

/// What a walk found.
struct Acc {
    strict: bool,
    model: Option<Arc<str>>,
    stream: bool,
    include_usage: bool,
    max_tokens: Option<u64>,
    tokens: u64,
    items: u64,
}

impl Acc {
    fn new(strict: bool) -> Self {
        Acc {
            strict,
            model: None,
            stream: false,
            include_usage: false,
            max_tokens: None,
            tokens: 0,
            items: 0,
        }
    }

    fn fill(self, info: &mut RequestInfo) {
        info.model = self.model;
        info.stream |= self.stream;
        info.include_usage = self.include_usage;
        info.max_output_tokens = self
            .max_tokens
            .map(|m| u32::try_from(m).unwrap_or(u32::MAX));
        info.input_tokens = u32::try_from(self.tokens).unwrap_or(u32::MAX);
        info.inputs = u32::try_from(self.items).unwrap_or(u32::MAX);
    }

    fn max_tokens(&mut self, n: u64) {
        self.max_tokens = Some(self.max_tokens.map_or(n, |m| m.max(n)));
    }
}

/// Where in the body a value sits, which decides what it may be and what
/// it counts for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Place {
    /// The body: an object.
    Top,
    /// `model`: a string.
    Model,
    /// `stream`, `parameters.stream`: a boolean.
    Stream,
    /// `stream_options.include_usage`: a boolean.
    IncludeUsage,
    /// `max_tokens`, `max_completion_tokens`, `parameters.max_tokens`.
    MaxTokens,
    /// `stream_options`: an object.
    StreamOptions,
    /// `parameters`: an object.
    Parameters,
    /// `messages`, `input.messages`: an array of messages.
    Messages,
    /// One message: an object whose `content` counts.
    Message,
    /// `input`: native `{messages|prompt|texts}`, or compatible embeddings'
    /// string / array; `texts`.
    Input,
    /// `input.prompt`: text counted as one input.
    Prompt,
    /// Text in any shape DashScope accepts: a string, `null`, an array of
    /// strings or parts (`{"text": ...}`, `{"image": ...}`).
    Text,
    /// Anything else: skipped (its depth and strings still checked).
    Ignore,
}

type Fields = &'static [(&'static str, Place)];

impl Place {
    /// The fields read in an object at this place.
    fn fields(self) -> Fields {
        match self {
            Place::Top => &[
                ("model", Place::Model),
                ("stream", Place::Stream),
                ("stream_options", Place::StreamOptions),
                ("max_tokens", Place::MaxTokens),
                ("max_completion_tokens", Place::MaxTokens),
                ("messages", Place::Messages),
                ("input", Place::Input),
                ("parameters", Place::Parameters),
            ],
            Place::StreamOptions => &[("include_usage", Place::IncludeUsage)],
            Place::Parameters => &[("max_tokens", Place::MaxTokens), ("stream", Place::Stream)],
            Place::Message => &[("content", Place::Text), ("reasoning_content", Place::Text)],
            Place::Input => &[
                ("messages", Place::Messages),
                ("prompt", Place::Prompt),
                ("texts", Place::Input),
            ],
            Place::Text | Place::Prompt => &[("text", Place::Text)],
            _ => &[],
        }
    }

    /// What a value at this place must be (for errors).
    fn expected(self) -> &'static str {
        match self {
            Place::Model => "a string",
            Place::Stream | Place::IncludeUsage => "true or false",
            Place::MaxTokens => "a non-negative integer",
            Place::Messages => "an array of messages",
            Place::Message => "an object",
            Place::Input => "a string, an array or an object",
            _ => "an object",
        }
    }
}

/// The field of `fields` that `key` names: exactly (`true`), or loosely
/// (`false`: another spelling some JSON readers map onto the same field).
fn lookup(fields: Fields, key: &str) -> Option<(usize, bool)> {
    if let Some(i) = fields.iter().position(|(f, _)| *f == key) {
        return Some((i, true));
    }
    fields
        .iter()
        .position(|(f, _)| loosely_eq(key, f))
        .map(|i| (i, false))
}

/// Whether `key` names `field` once ASCII case, `_` and `-` are ignored and
/// the two non-ASCII letters that Unicode case folding maps onto ASCII
/// letters are folded (`ſ` to `s`, the Kelvin sign to `k`): Go's
/// encoding/json matches keys case-insensitively with that folding, and
/// fastjson also ignores `_` and `-`.
fn loosely_eq(key: &str, field: &str) -> bool {
    let mut k = key
        .chars()
        .filter(|c| !matches!(c, '_' | '-'))
        .map(|c| match c {
            '\u{17F}' => 's',
            '\u{212A}' => 'k',
            c => c.to_ascii_lowercase(),
        });
    let mut f = field.chars().filter(|c| *c != '_');
    loop {
        match (k.next(), f.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The walker: a seed for the value at `place`, writing into `acc`.
struct Walk<'a> {
    place: Place,
    field: &'static str,
    acc: &'a mut Acc,
}

impl<'a> Walk<'a> {
    fn top(acc: &'a mut Acc) -> Self {
        Walk {
            place: Place::Top,
            field: "body",
            acc,
        }
    }

    fn at(&mut self, place: Place, field: &'static str) -> Walk<'_> {
        Walk {
            place,
            field,
            acc: &mut *self.acc,
        }
    }

    /// A value of the wrong type: an error when strict, skipped when not.
    fn wrong<E: de::Error>(&self) -> Result<(), E> {
        if self.acc.strict {
            Err(E::custom(format_args!(
                "has `{}` of the wrong type (expected {})",
                self.field,
                self.place.expected()
            )))
        } else {
            Ok(())
        }
    }

    fn text(&mut self, s: &str) {
        self.acc.tokens += u64::from(estimate_text_tokens(s));
    }
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` as {}", self.field, self.place.expected())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.place {
            Place::Stream => self.acc.stream |= v,
            Place::IncludeUsage => self.acc.include_usage |= v,
            Place::Text | Place::Prompt | Place::Ignore => {}
            _ => return self.wrong(),
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match self.place {
            Place::MaxTokens => self.acc.max_tokens(v),
            Place::Text | Place::Prompt | Place::Ignore => {}
            // Lenient: a number is true where a boolean is expected unless
            // it is 0 (the readers that coerce do so).
            Place::Stream | Place::IncludeUsage if !self.acc.strict => {
                return self.visit_bool(v != 0);
            }
            _ => return self.wrong(),
        }
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match u64::try_from(v) {
            Ok(v) => self.visit_u64(v),
            Err(_) => match self.place {
                Place::Text | Place::Prompt | Place::Ignore => Ok(()),
                Place::Stream | Place::IncludeUsage if !self.acc.strict => self.visit_bool(true),
                _ => self.wrong(),
            },
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        match self.place {
            Place::Text | Place::Prompt | Place::Ignore => Ok(()),
            Place::MaxTokens if !self.acc.strict => {
                if v.is_finite() && v > 0.0 {
                    // `as` saturates: a huge budget stays huge.
                    self.acc.max_tokens(v.ceil() as u64);
                }
                Ok(())
            }
            Place::Stream | Place::IncludeUsage if !self.acc.strict => self.visit_bool(v != 0.0),
            _ => self.wrong(),
        }
    }

    fn visit_str<E: de::Error>(mut self, v: &str) -> Result<(), E> {
        match self.place {
            Place::Model => self.acc.model = Some(Arc::from(v)),
            Place::Text => self.text(v),
            Place::Prompt => {
                self.acc.items += 1;
                self.text(v);
            }
            Place::Input => {
                self.acc.items += 1;
                self.text(v);
            }
            Place::Ignore => {}
            Place::MaxTokens if !self.acc.strict => {
                if let Ok(n) = v.trim().parse::<f64>() {
                    return self.visit_f64(n);
                }
            }
            Place::Stream | Place::IncludeUsage if !self.acc.strict => {
                let v = v.trim();
                let off = v.is_empty() || v.eq_ignore_ascii_case("false") || v == "0";
                return self.visit_bool(!off);
            }
            _ => return self.wrong(),
        }
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        match self.place {
            // `null` where a message or the body should be is malformed;
            // everywhere else it is the field's absence.
            Place::Message | Place::Top => self.wrong(),
            _ => Ok(()),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        let element = match self.place {
            Place::Messages => Place::Message,
            Place::Text | Place::Prompt => Place::Text,
            Place::Input => Place::Input,
            Place::Ignore => Place::Ignore,
            _ => {
                self.wrong::<A::Error>()?;
                Place::Ignore
            }
        };
        if self.place == Place::Prompt {
            self.acc.items += 1;
        }
        let field = match element {
            Place::Message => "messages[]",
            _ => self.field,
        };
        loop {
            // The elements of an `input` array are texts, one input each.
            let (place, count) = match element {
                Place::Input => (Place::Text, true),
                p => (p, false),
            };
            if seq.next_element_seed(self.at(place, field))?.is_none() {
                break;
            }
            self.acc.items += u64::from(count);
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        let fields = match self.place {
            Place::Top
            | Place::StreamOptions
            | Place::Parameters
            | Place::Message
            | Place::Input
            | Place::Text
            | Place::Prompt
            | Place::Ignore => self.place.fields(),
            _ => {
                self.wrong::<A::Error>()?;
                &[]
            }
        };
        match self.place {
            Place::Message => {
                self.acc.items += 1;
                self.acc.tokens += u64::from(MESSAGE_OVERHEAD);
            }
            Place::Prompt => self.acc.items += 1,
            _ => {}
        }
        let strict = self.acc.strict;
        let mut seen = 0u32;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let Some((i, exact)) = lookup(fields, &key) else {
                // Read only to be skipped, but read as a JSON parser
                // would (depth, string escapes): what serde_json refuses
                // anywhere in the body is refused.
                map.next_value_seed(self.at(Place::Ignore, "value"))?;
                continue;
            };
            let (name, place) = fields[i];
            if strict && !exact {
                return Err(de::Error::custom(format_args!(
                    "has a field spelled like `{name}` but not exactly `{name}`"
                )));
            }
            if strict && seen & (1 << i) != 0 {
                return Err(de::Error::custom(format_args!(
                    "has the field `{name}` twice"
                )));
            }
            seen |= 1 << i;
            map.next_value_seed(self.at(place, name))?;
        }
        Ok(())
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
        // Which of the two the upstream honours is not known: the larger.
        assert_eq!(i.max_output_tokens, Some(9));
        assert_eq!(i.body_error, None);
    }

    const CHAT: &str = "/compatible-mode/v1/chat/completions";

    fn refused(body: &[u8]) -> RequestInfo {
        let i = RequestInfo::parse(CHAT, &HeaderMap::new(), Some(body));
        assert!(
            i.body_error.is_some(),
            "{:?} was read without complaint",
            String::from_utf8_lossy(body)
        );
        i
    }

    /// Issue 12, item 1: a repeated `model` was read as no model at all, so
    /// the call was never limited. Every ambiguity of a field admission
    /// reads is now reported, with the strictest reading.
    #[test]
    fn ambiguous_bodies_are_reported_and_read_strictly() {
        let msgs = r#""messages":[{"role":"user","content":"Hello, world"}]"#;
        let plain = parse(CHAT, &format!(r#"{{"model":"qwen-plus",{msgs}}}"#));
        assert_eq!(plain.body_error, None);
        assert_eq!(plain.model.as_deref(), Some("qwen-plus"));
        for (body, says) in [
            (
                format!(r#"{{"model":"qwen-plus","model":"qwen-plus",{msgs}}}"#),
                "`model` twice",
            ),
            (
                format!(r#"{{"model":"qwen-turbo",{msgs},"model":"qwen-plus"}}"#),
                "`model` twice",
            ),
            (
                format!(r#"{{"mod\u0065l":"qwen-turbo","model":"qwen-plus",{msgs}}}"#),
                "`model` twice",
            ),
            (
                format!(r#"{{"Model":"qwen-turbo","model":"qwen-plus",{msgs}}}"#),
                "spelled like `model`",
            ),
            (
                format!(r#"{{"model":"qwen-plus","ſtream":true,{msgs}}}"#),
                "spelled like `stream`",
            ),
            (
                format!(r#"{{"model":"qwen-plus","max-tokens":9,{msgs}}}"#),
                "spelled like `max_tokens`",
            ),
            (
                format!(r#"{{"model":"qwen-plus","stream":false,"stream":true,{msgs}}}"#),
                "`stream` twice",
            ),
            (
                format!(r#"{{"model":"qwen-plus","max_tokens":1,"max_tokens":9000,{msgs}}}"#),
                "`max_tokens` twice",
            ),
            (
                format!(r#"{{"model":"qwen-plus",{msgs},{msgs}}}"#),
                "`messages` twice",
            ),
            (
                r#"{"model":"qwen-plus","input":{"messages":[],"messages":[{"role":"user","content":"x"}]}}"#.into(),
                "`messages` twice",
            ),
            (
                r#"{"model":"qwen-plus","messages":[{"role":"user","content":"a","content":"bbbb"}]}"#.into(),
                "`content` twice",
            ),
            (
                r#"{"model":"qwen-plus","parameters":{"stream":true,"stream":false}}"#.into(),
                "`stream` twice",
            ),
            (format!(r#"{{"model":5,{msgs}}}"#), "`model` of the wrong type"),
            (
                format!(r#"{{"model":"qwen-plus","max_tokens":"9000",{msgs}}}"#),
                "`max_tokens` of the wrong type",
            ),
            (
                format!(r#"{{"model":"qwen-plus","max_tokens":-1,{msgs}}}"#),
                "`max_tokens` of the wrong type",
            ),
            (
                format!(r#"{{"model":"qwen-plus","max_tokens":1e4,{msgs}}}"#),
                "`max_tokens` of the wrong type",
            ),
            (
                format!(r#"{{"model":"qwen-plus","stream":"true",{msgs}}}"#),
                "`stream` of the wrong type",
            ),
            (r#"{"model":"qwen-plus","messages":"hi"}"#.into(), "wrong type"),
            (r#"{"model":"qwen-plus","messages":[1]}"#.into(), "wrong type"),
            (r#"{"model":"qwen-plus","messages":[null]}"#.into(), "wrong type"),
            (format!(r#"{{"model":"qwen-plus",{msgs}}} {{"model":"qwen-turbo"}}"#), "trailing"),
            (format!(r#"{{"model":"qwen-plus",{msgs}}}x"#), "trailing"),
            (format!(r#"{{"model":"qwen-plus",{msgs}"#), "EOF"),
            (format!("\u{feff}{{\"model\":\"qwen-plus\",{msgs}}}"), "not a JSON object"),
            (format!(r#"[{{"model":"qwen-plus",{msgs}}}]"#), "not a JSON object"),
            ("null".into(), "not a JSON object"),
            ("\"qwen-plus\"".into(), "not a JSON object"),
            (
                r#"{"model":"qwen-plus","messages":[{"role":"user","content":"\ud800"}]}"#.into(),
                "not valid JSON",
            ),
            (
                format!(
                    r#"{{"model":"qwen-plus","messages":[{{"role":"user","content":{}"x"{}}}]}}"#,
                    "[".repeat(200),
                    "]".repeat(200)
                ),
                "nested more than 128 levels",
            ),
            (
                format!(r#"{{"model":"qwen-plus","user":"\udc00",{msgs}}}"#),
                "not valid JSON",
            ),
            (
                format!(
                    r#"{{"model":"qwen-plus","x":{}1{},{msgs}}}"#,
                    "[".repeat(200),
                    "]".repeat(200)
                ),
                "nested more than 128 levels",
            ),
        ] {
            let i = refused(body.as_bytes());
            let err = i.body_error.as_ref().unwrap().to_string();
            assert!(err.contains(says), "{body}: {err}");
            assert!(!err.contains("qwen"), "the message shows no content: {err}");
            // The strictest reading charges at least the plain request.
            if body.contains(msgs) {
                assert!(i.input_tokens >= plain.input_tokens, "{body}");
            }
        }
        // Invalid UTF-8, anywhere (even in a field nobody reads).
        let mut bad = format!(r#"{{"model":"qwen-plus","user":"xx",{msgs}}}"#).into_bytes();
        let at = bad.iter().position(|b| *b == b'x').unwrap();
        bad[at] = 0xff;
        let i = refused(&bad);
        assert!(i.body_error.unwrap().to_string().contains("UTF-8"));
        assert_eq!(i.model.as_deref(), Some("qwen-plus"));
    }

    #[test]
    fn the_strictest_reading() {
        // The last model, the largest budget, streaming if any reading
        // streams, the whole body's estimate.
        let body = r#"{"model":"qwen-turbo","stream":false,"max_tokens":10,"messages":[{"role":"user","content":"hi"}],"stream":true,"max_tokens":5000,"model":"qwen-max"}"#;
        let i = refused(body.as_bytes());
        assert_eq!(i.model.as_deref(), Some("qwen-max"));
        assert!(i.stream);
        assert_eq!(i.max_output_tokens, Some(5000));
        assert_eq!(i.input_tokens, estimate_text_tokens(body));
        // Coercions a lenient reader makes count too.
        let i = refused(br#"{"model":"qwen-plus","max_tokens":"7000","stream":"true","stream_options":{"include_usage":1}}"#);
        assert_eq!(i.max_output_tokens, Some(7000));
        assert!(i.stream && i.include_usage);
        // What came before the body broke off is kept.
        let i = refused(br#"{"model":"qwen-plus","max_tokens":300,"messages":[{"role":"user","content":"hi"}]} trailing"#);
        assert_eq!(
            (i.model.as_deref(), i.max_output_tokens),
            (Some("qwen-plus"), Some(300))
        );
        let i = refused(br#"{"model":"qwen-plus","messages":[{"role":"user","content":"#);
        assert_eq!(i.model.as_deref(), Some("qwen-plus"));
        // A header that asks for a stream still counts.
        let mut h = HeaderMap::new();
        h.insert("x-dashscope-sse", "enable".parse().unwrap());
        let i = RequestInfo::parse(NATIVE, &h, Some(b"{oops"));
        assert!(i.stream && i.body_error.is_some());
    }

    const NATIVE: &str = "/api/v1/services/aigc/text-generation/generation";

    #[test]
    fn unambiguous_bodies_stay_unremarkable() {
        for body in [
            // Whitespace around, unknown fields of any shape, repeated keys
            // in fields admission does not read, nulls for absent fields.
            " \n{\"model\":\"qwen-plus\"}\r\n ",
            r#"{"model":"qwen-plus","tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object","type":"object"}}}]}"#,
            r#"{"model":"qwen-plus","max_tokens":null,"stream":null,"stream_options":null,"parameters":null,"input":null,"messages":null}"#,
            r#"{"model":"qwen-plus","messages":[{"role":"user","role":"user","content":[{"text":"a"},{"image":"http://x/y.png"}]}]}"#,
            r#"{"model":"qwen-plus","temperature":0.7,"top_p":1e-1,"seed":-3,"n":1,"user":"\ud83d\ude00"}"#,
            // Deep nesting within the limit, where admission does not read.
            &format!(
                r#"{{"model":"qwen-plus","x":{}1{}}}"#,
                "[".repeat(100),
                "]".repeat(100)
            ),
        ] {
            let i = parse(CHAT, body);
            assert_eq!(i.body_error, None, "{body}");
            assert_eq!(i.model.as_deref(), Some("qwen-plus"), "{body}");
        }
        // No body, or an empty one: nothing to read, nothing wrong.
        for body in ["", "  \n"] {
            let i = parse(CHAT, body);
            assert_eq!((i.body_error, i.model, i.input_tokens), (None, None, 0));
        }
        assert_eq!(Endpoint::from_path("/foo"), Endpoint::Other);
        assert_eq!(Endpoint::from_path("/api/v1/tasks/abc"), Endpoint::Task);
        assert_eq!(
            Endpoint::from_path("/compatible-mode/v1/files"),
            Endpoint::Files
        );
        assert_eq!(
            Endpoint::from_path("/compatible-mode/v1/files/embeddings/content"),
            Endpoint::Files
        );
        assert_eq!(
            Endpoint::from_path("/compatible-mode/v1/batches/batch_1/cancel"),
            Endpoint::Batches
        );
        assert_eq!(Endpoint::Batches.protocol(), Protocol::Compatible);
    }
}
