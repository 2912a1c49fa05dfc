//! A request turned into one JSONL line of a batch input file.

use std::sync::Arc;

use http::{Method, Request};
use serde_json::{Map, Value, json};

use super::error::BatchError;
use super::layer::Config;
use crate::body::BufferedBody;
use crate::request::Endpoint;

/// The batch endpoints (the lines' `url`).
pub(crate) const CHAT_URL: &str = "/v1/chat/completions";
pub(crate) const EMBEDDINGS_URL: &str = "/v1/embeddings";
pub(crate) const TEST_URL: &str = "/v1/chat/ds-test";
/// The dry-run model, which DashScope answers without inference.
pub(crate) const TEST_MODEL: &str = "batch-test-model";

/// The header a caller may set to choose its line's `custom_id` (the
/// [`CustomId`] extension wins over it). It is how a restarted process
/// tells [`Recovered`](super::Recovered) lines apart.
pub const CUSTOM_ID_HEADER: &str = "x-tower-qwen-custom-id";

/// A request extension choosing the line's `custom_id` (1 to 64 ASCII
/// letters, digits, `-`, `_`, `.`, `:`). Without it (or the
/// [`CUSTOM_ID_HEADER`]), the service makes one up, unique per process.
///
/// A file never holds one `custom_id` twice: a request whose id is already
/// in the file filling for its model sends that file first.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CustomId(pub String);

/// Which file a line belongs to: one endpoint, one model.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct GroupKey {
    pub(crate) url: &'static str,
    pub(crate) model: Arc<str>,
}

/// A request ready to go into a file.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) key: GroupKey,
    pub(crate) custom_id: Arc<str>,
    /// The line, with its trailing newline.
    pub(crate) bytes: Vec<u8>,
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
}

/// The caller's `custom_id`, if it chose one.
pub(crate) fn custom_id_of<B>(req: &Request<B>) -> Result<Option<Arc<str>>, BatchError> {
    let id = match req.extensions().get::<CustomId>() {
        Some(c) => Some(c.0.as_str()),
        None => match req.headers().get(CUSTOM_ID_HEADER) {
            Some(v) => Some(
                v.to_str()
                    .map_err(|_| BatchError::unsupported("the custom id is not ASCII"))?,
            ),
            None => None,
        },
    };
    match id {
        None => Ok(None),
        Some(id) if valid_id(id) => Ok(Some(Arc::from(id))),
        Some(_) => Err(BatchError::unsupported(
            "a custom id is 1 to 64 ASCII letters, digits, '-', '_', '.' or ':'",
        )),
    }
}

/// Reads `req` as the upstream would and writes its line.
pub(crate) fn prepare<B: BufferedBody>(
    req: &Request<B>,
    custom_id: Arc<str>,
    config: &Config,
) -> Result<Prepared, BatchError> {
    if req.method() != Method::POST {
        return Err(BatchError::unsupported("only POST requests can be batched"));
    }
    let path = req.uri().path();
    let endpoint = Endpoint::from_path(path);
    let url = match endpoint {
        Endpoint::CompatibleChat if path.contains("/compatible-mode/") => CHAT_URL,
        Endpoint::CompatibleEmbedding if path.contains("/compatible-mode/") => EMBEDDINGS_URL,
        _ => {
            return Err(BatchError::unsupported(
                "only OpenAI-compatible chat completions and embeddings can be batched",
            ));
        }
    };
    let Some(bytes) = req.body().buffered() else {
        return Err(BatchError::unsupported(
            "the body is a stream, not buffered",
        ));
    };
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(&bytes) else {
        return Err(BatchError::unsupported("the body is not a JSON object"));
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        _ => return Err(BatchError::unsupported("the body names no model")),
    };
    if body.get("stream").and_then(Value::as_bool) == Some(true) {
        return Err(BatchError::unsupported(
            "streaming requests cannot be batched (the Batch API answers whole responses)",
        ));
    }
    let url = if model == TEST_MODEL && url == CHAT_URL {
        TEST_URL
    } else {
        url
    };
    let mut bytes = line(&custom_id, url, body);
    if bytes.len() > config.max_line_bytes {
        return Err(BatchError::unsupported(
            "the request is larger than a batch line may be",
        ));
    }
    bytes.push(b'\n');
    Ok(Prepared {
        key: GroupKey {
            url,
            model: Arc::from(model),
        },
        custom_id,
        bytes,
    })
}

fn line(custom_id: &str, url: &str, body: Map<String, Value>) -> Vec<u8> {
    // Compact JSON: newlines inside strings are escaped, so one line each.
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": url,
        "body": Value::Object(body),
    })
    .to_string()
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::body::Body;

    fn req(path: &str, body: &'static str) -> Request<Body> {
        Request::post(path).body(Body::from(body)).unwrap()
    }

    fn prep(r: &Request<Body>) -> Result<Prepared, BatchError> {
        prepare(r, Arc::from("id-1"), &Config::default())
    }

    #[test]
    fn chat_and_embeddings_become_lines() {
        let r = req(
            "/compatible-mode/v1/chat/completions",
            "{\"model\":\"qwen-plus\",\n \"messages\":[{\"role\":\"user\",\"content\":\"a\\nb\"}]}",
        );
        let p = prep(&r).unwrap();
        assert_eq!(p.key.url, CHAT_URL);
        assert_eq!(&*p.key.model, "qwen-plus");
        assert_eq!(p.bytes.iter().filter(|&&b| b == b'\n').count(), 1);
        let v: Value = serde_json::from_slice(&p.bytes).unwrap();
        assert_eq!(v["custom_id"], "id-1");
        assert_eq!(v["method"], "POST");
        assert_eq!(v["body"]["messages"][0]["content"], "a\nb");
        let e = req(
            "https://h/compatible-mode/v1/embeddings",
            r#"{"model":"text-embedding-v4","input":"x"}"#,
        );
        assert_eq!(prep(&e).unwrap().key.url, EMBEDDINGS_URL);
        let t = req(
            "/compatible-mode/v1/chat/completions",
            r#"{"model":"batch-test-model","messages":[]}"#,
        );
        assert_eq!(prep(&t).unwrap().key.url, TEST_URL);
    }

    #[test]
    fn what_cannot_be_batched_is_refused() {
        let refused = |r: Request<Body>| prep(&r).unwrap_err().is_unsupported();
        assert!(refused(req(
            "/api/v1/services/aigc/text-generation/generation",
            r#"{"model":"qwen-plus"}"#
        )));
        assert!(refused(req(
            "/compatible-mode/v1/chat/completions",
            r#"{"model":"qwen-plus","stream":true}"#
        )));
        assert!(refused(req("/compatible-mode/v1/chat/completions", "[1]")));
        assert!(refused(req(
            "/compatible-mode/v1/chat/completions",
            r#"{"model":""}"#
        )));
        assert!(refused(
            Request::get("/compatible-mode/v1/chat/completions")
                .body(Body::empty())
                .unwrap()
        ));
        let big = Request::post("/compatible-mode/v1/chat/completions")
            .body(Body::from(format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#,
                "x".repeat(7_000_000)
            )))
            .unwrap();
        assert!(prep(&big).unwrap_err().is_unsupported());
    }

    #[test]
    fn custom_ids() {
        let mut r = req("/compatible-mode/v1/chat/completions", "{}");
        assert_eq!(custom_id_of(&r).unwrap(), None);
        r.headers_mut()
            .insert(CUSTOM_ID_HEADER, "row-7".parse().unwrap());
        assert_eq!(custom_id_of(&r).unwrap().as_deref(), Some("row-7"));
        r.extensions_mut().insert(CustomId("ext:1".into()));
        assert_eq!(custom_id_of(&r).unwrap().as_deref(), Some("ext:1"));
        r.extensions_mut().insert(CustomId("bad id".into()));
        assert!(custom_id_of(&r).unwrap_err().is_unsupported());
        r.extensions_mut().insert(CustomId("x".repeat(65)));
        assert!(custom_id_of(&r).is_err());
    }
}
