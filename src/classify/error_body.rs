use std::borrow::Cow;

use serde::Deserialize;
use serde_json::Value;

/// The fields of a DashScope error body, in either dialect.
///
/// Native: `{"request_id","code","message"}` (sometimes `msg`); compatible:
/// `{"error":{"message","type","param","code"},"request_id"}`. When `message`
/// itself holds JSON (an upstream engine's error), its inner `type`/`code` is
/// kept in [`ErrorInfo::nested_kind`] and its inner message replaces the
/// outer one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ErrorInfo {
    /// Native `code`, or compatible `error.code`.
    pub code: Option<String>,
    /// Compatible `error.type`.
    pub kind: Option<String>,
    /// The human-readable message (the inner one when nested).
    pub message: Option<String>,
    /// `request_id`, when present.
    pub request_id: Option<String>,
    /// `type` (or `code`) of a JSON error nested inside `message`.
    pub nested_kind: Option<String>,
    /// A compatible `error` object (or non-empty `error` string) was present.
    error_object: bool,
}

#[derive(Deserialize)]
struct Raw<'a> {
    #[serde(default)]
    code: Option<Value>,
    #[serde(default, borrow)]
    message: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    msg: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    request_id: Option<Cow<'a, str>>,
    #[serde(default)]
    error: Option<Value>,
}

impl ErrorInfo {
    /// Parses an error body; `None` when `json` is not a JSON object.
    ///
    /// A success body parses to an `ErrorInfo` for which
    /// [`ErrorInfo::is_error`] is false.
    pub fn parse(json: &[u8]) -> Option<ErrorInfo> {
        // serde reads a struct from a JSON array too (`["x"]` would be a
        // `code`): only an object is an error body.
        if !json.trim_ascii_start().starts_with(b"{") {
            return None;
        }
        let raw: Raw<'_> = serde_json::from_slice(json).ok()?;
        let mut info = ErrorInfo {
            code: raw.code.as_ref().and_then(value_str),
            message: raw.message.or(raw.msg).map(Cow::into_owned),
            request_id: raw.request_id.map(Cow::into_owned),
            ..Default::default()
        };
        match raw.error {
            Some(Value::Object(err)) => {
                info.error_object = true;
                let code = err.get("code").and_then(value_str);
                let kind = err.get("type").and_then(value_str);
                info.code = code.or(info.code).or_else(|| kind.clone());
                info.kind = kind;
                if let Some(m) = err.get("message").and_then(value_str) {
                    info.message = Some(m);
                }
            }
            Some(Value::String(s)) if !s.is_empty() => {
                info.error_object = true;
                info.message.get_or_insert(s);
            }
            _ => {}
        }
        info.unnest();
        Some(info)
    }

    /// Whether the body reports an error: a non-empty `code`, or an
    /// `error` object.
    pub fn is_error(&self) -> bool {
        self.error_object
            || self.code.as_deref().is_some_and(|c| !c.is_empty())
            || self.kind.as_deref().is_some_and(|c| !c.is_empty())
    }

    fn unnest(&mut self) {
        let Some(msg) = self.message.as_deref() else {
            return;
        };
        let trimmed = msg.trim_start();
        if !trimmed.starts_with('{') {
            return;
        }
        let Ok(Value::Object(outer)) = serde_json::from_str::<Value>(trimmed) else {
            return;
        };
        let inner = match outer.get("error") {
            Some(Value::Object(e)) => e.clone(),
            _ => outer,
        };
        self.nested_kind = inner
            .get("type")
            .and_then(value_str)
            .or_else(|| inner.get("code").and_then(value_str));
        if let Some(m) = inner.get("message").and_then(value_str) {
            self.message = Some(m);
        }
    }
}

fn value_str(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
