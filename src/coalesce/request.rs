//! The request side: which requests can be merged, under which key, and how
//! a merged request is written.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Uri, Version};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Value};

use crate::body::BufferedBody;
use crate::request::{Endpoint, Protocol};
use crate::tokens::estimate_text_tokens;

/// Headers that never decide whether two requests may share a call, and
/// are not copied to a merged request: framing (recomputed), compression
/// (the layer re-writes every answer, so it asks for identity) and
/// per-request tracing ids.
const SKIPPED_HEADERS: [HeaderName; 7] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::ACCEPT_ENCODING,
    header::CONNECTION,
    HeaderName::from_static("traceparent"),
    HeaderName::from_static("tracestate"),
    HeaderName::from_static("x-request-id"),
];

/// One text to embed, with its weight for splitting `usage`.
#[derive(Debug)]
pub(crate) struct Text {
    pub(crate) text: String,
    pub(crate) weight: u64,
}

impl Text {
    pub(crate) fn new(text: String) -> Self {
        let weight = u64::from(estimate_text_tokens(&text));
        Self { text, weight }
    }
}

/// What must be equal for two requests to share one upstream call:
/// endpoint, target URI, HTTP version, every header that matters
/// (credentials, workspace, data inspection, ...) and the whole JSON body
/// except the texts (model, parameters, dimensions, encoding format, ...).
///
/// Holds header values (an API key among them): never logged, no `Debug`.
#[derive(PartialEq, Eq, Hash)]
pub(crate) struct Key {
    pub(crate) protocol: Protocol,
    pub(crate) model: Box<str>,
    uri: Uri,
    version: Version,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The canonical JSON of the body without its texts (`serde_json`'s
    /// maps are sorted, so key order in the caller's body does not matter).
    template_json: String,
}

/// A request that can take part in merging.
pub(crate) struct Shape {
    pub(crate) key: Key,
    /// The body's JSON object without its texts: compatible bodies without
    /// `input`, native bodies without `input.texts`.
    pub(crate) template: Map<String, Value>,
}

/// What [`route`] decided for a request.
// Returned once per request and consumed at once.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Route {
    /// Not an embedding request this layer understands: send it untouched.
    Pass,
    /// An embedding request and its texts.
    Embed(Shape, Vec<Text>),
}

/// Decides what to do with `req`, reading its (buffered) body.
pub(crate) fn route<B: BufferedBody>(req: &Request<B>) -> Route {
    if req.method() != Method::POST {
        return Route::Pass;
    }
    let endpoint = Endpoint::from_path(req.uri().path());
    if !endpoint.is_embedding() {
        return Route::Pass;
    }
    // `X-DashScope-Async: enable` on the native path submits a batch
    // embedding task: not ours.
    if header_is(req.headers(), "x-dashscope-async", "enable") {
        return Route::Pass;
    }
    let Some(bytes) = req.body().buffered() else {
        return Route::Pass;
    };
    let protocol = endpoint.protocol();
    let Ok(Value::Object(mut template)) = serde_json::from_slice::<Value>(&bytes) else {
        return Route::Pass;
    };
    let model: Box<str> = match template.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.as_str().into(),
        _ => return Route::Pass,
    };
    let texts = match protocol {
        Protocol::Compatible => match template.remove("input") {
            Some(Value::String(s)) => Some(vec![Text::new(s)]),
            Some(Value::Array(list)) => strings(list),
            _ => None,
        },
        Protocol::Native => match template.get_mut("input") {
            Some(Value::Object(input)) => match input.remove("texts") {
                Some(Value::Array(list)) => strings(list),
                _ => None,
            },
            _ => None,
        },
    };
    let Some(texts) = texts else {
        return Route::Pass;
    };
    let Ok(template_json) = serde_json::to_string(&template) else {
        return Route::Pass;
    };
    let mut headers: Vec<(HeaderName, HeaderValue)> = req
        .headers()
        .iter()
        .filter(|(name, _)| !SKIPPED_HEADERS.contains(name))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    // Stable: values of one header keep their order.
    headers.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    let key = Key {
        protocol,
        model,
        uri: req.uri().clone(),
        version: req.version(),
        headers,
        template_json,
    };
    Route::Embed(Shape { key, template }, texts)
}

/// A non-empty list of strings, or `None`.
fn strings(list: Vec<Value>) -> Option<Vec<Text>> {
    if list.is_empty() {
        return None;
    }
    list.into_iter()
        .map(|v| match v {
            Value::String(s) => Some(Text::new(s)),
            _ => None,
        })
        .collect()
}

fn header_is(headers: &http::HeaderMap, name: &str, value: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case(value)))
}

/// Writes the request for `texts` (in order) with `key`'s target and
/// headers and `template`'s body.
pub(crate) fn build<B: From<Bytes>>(
    key: &Key,
    template: &Map<String, Value>,
    texts: &[Text],
) -> Request<B> {
    let body = MergedBody {
        template,
        texts,
        protocol: key.protocol,
    };
    // Serializing a `Map` of `Value`s and strings cannot fail.
    let bytes = Bytes::from(serde_json::to_vec(&body).unwrap_or_default());
    let mut req = Request::new(B::from(Bytes::new()));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = key.uri.clone();
    *req.version_mut() = key.version;
    let headers = req.headers_mut();
    headers.reserve(key.headers.len() + 1);
    for (name, value) in &key.headers {
        headers.append(name.clone(), value.clone());
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    *req.body_mut() = B::from(bytes);
    req
}

/// The template with the texts put back where the protocol wants them.
struct MergedBody<'a> {
    template: &'a Map<String, Value>,
    texts: &'a [Text],
    protocol: Protocol,
}

impl Serialize for MergedBody<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        let texts = Texts(self.texts);
        match self.protocol {
            Protocol::Compatible => {
                for (k, v) in self.template {
                    map.serialize_entry(k, v)?;
                }
                map.serialize_entry("input", &texts)?;
            }
            Protocol::Native => {
                let empty = Map::new();
                let mut wrote = false;
                for (k, v) in self.template {
                    if k == "input" {
                        let rest = match v {
                            Value::Object(rest) => rest,
                            _ => &empty,
                        };
                        map.serialize_entry(
                            k,
                            &NativeInput {
                                rest,
                                texts: &texts,
                            },
                        )?;
                        wrote = true;
                    } else {
                        map.serialize_entry(k, v)?;
                    }
                }
                if !wrote {
                    let input = NativeInput {
                        rest: &empty,
                        texts: &texts,
                    };
                    map.serialize_entry("input", &input)?;
                }
            }
        }
        map.end()
    }
}

struct NativeInput<'a> {
    rest: &'a Map<String, Value>,
    texts: &'a Texts<'a>,
}

impl Serialize for NativeInput<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        for (k, v) in self.rest {
            map.serialize_entry(k, v)?;
        }
        map.serialize_entry("texts", self.texts)?;
        map.end()
    }
}

struct Texts<'a>(&'a [Text]);

impl Serialize for Texts<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for t in self.0 {
            seq.serialize_element(&t.text)?;
        }
        seq.end()
    }
}

/// Shared, immutable parts of a batch: who it goes to and what it asks.
pub(crate) struct Target {
    pub(crate) key: Key,
    pub(crate) template: Map<String, Value>,
}

impl Target {
    pub(crate) fn new(shape: Shape) -> Arc<Self> {
        Arc::new(Self {
            key: shape.key,
            template: shape.template,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    fn req(path: &str, body: &str) -> Request<Full<Bytes>> {
        Request::post(format!("http://h{path}"))
            .header("authorization", "Bearer k")
            .header("content-length", body.len())
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap()
    }

    const NATIVE: &str = "/api/v1/services/embeddings/text-embedding/text-embedding";
    const COMPAT: &str = "/compatible-mode/v1/embeddings";

    fn embed(r: Route) -> (Shape, Vec<Text>) {
        match r {
            Route::Embed(s, t) => (s, t),
            Route::Pass => panic!("expected an embedding route"),
        }
    }

    #[test]
    fn native_round_trip() {
        let (shape, texts) = embed(route(&req(
            NATIVE,
            r#"{"model":"text-embedding-v4","input":{"texts":["abcd"]},"parameters":{"dimension":64}}"#,
        )));
        assert_eq!(texts.len(), 1);
        assert_eq!(&*shape.key.model, "text-embedding-v4");
        let more = [Text::new("a".into()), Text::new("b".into())];
        let r: Request<Full<Bytes>> = build(&shape.key, &shape.template, &more);
        let body = r.body().buffered().unwrap();
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["input"]["texts"], serde_json::json!(["a", "b"]));
        assert_eq!(v["parameters"]["dimension"], 64);
        assert_eq!(
            r.headers()["content-length"],
            body.len().to_string().as_str()
        );
        assert_eq!(r.headers()["authorization"], "Bearer k");
    }

    #[test]
    fn compatible_shapes_share_a_key() {
        let (a, _) = embed(route(&req(
            COMPAT,
            r#"{"model":"m","input":"x","dimensions":64}"#,
        )));
        let (b, t) = embed(route(&req(
            COMPAT,
            r#"{"dimensions":64,"input":["y"],"model":"m"}"#,
        )));
        assert!(a.key == b.key);
        assert_eq!(t[0].text, "y");
        let (c, _) = embed(route(&req(
            COMPAT,
            r#"{"model":"m","input":"x","dimensions":128}"#,
        )));
        assert!(a.key != c.key);
    }

    #[test]
    fn others_pass() {
        for (path, body) in [
            (
                "/compatible-mode/v1/chat/completions",
                r#"{"model":"m","messages":[]}"#,
            ),
            (COMPAT, r#"{"model":"m","input":[1,2]}"#),
            (COMPAT, r#"{"model":"m","input":[]}"#),
            (COMPAT, r#"{"input":"x"}"#),
            (COMPAT, "not json"),
            (NATIVE, r#"{"model":"m","input":{"texts":"x"}}"#),
        ] {
            assert!(matches!(route(&req(path, body)), Route::Pass), "{body}");
        }
        let mut r = req(NATIVE, r#"{"model":"m","input":{"texts":["x"]}}"#);
        r.headers_mut()
            .insert("x-dashscope-async", HeaderValue::from_static("enable"));
        assert!(matches!(route(&r), Route::Pass));
    }
}
