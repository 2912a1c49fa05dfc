//! Field readers shared by the endpoints: each answers DashScope's
//! `400 InvalidParameter` (compatible `invalid_parameter_error`) for a
//! wrongly-typed field.

use http::StatusCode;
use serde_json::{Map, Value};

use super::error::ApiError;
use crate::request::Protocol;

pub(super) fn invalid(msg: String) -> ApiError {
    ApiError::invalid_parameter(msg)
}

pub(super) fn opt_bool(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<bool>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(invalid(format!("{at}{key} must be a boolean."))),
    }
}

pub(super) fn opt_positive(
    obj: &Map<String, Value>,
    key: &str,
    at: &str,
) -> Result<Option<u32>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n >= 1 => Ok(Some(u32::try_from(n).unwrap_or(u32::MAX))),
            _ => Err(invalid(format!("{at}{key} must be a positive integer."))),
        },
    }
}

pub(super) fn opt_object<'a>(
    obj: &'a Map<String, Value>,
    key: &str,
) -> Result<Option<&'a Map<String, Value>>, ApiError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(invalid(format!("{key} must be an object."))),
    }
}

pub(super) fn model_of(obj: &Map<String, Value>, protocol: Protocol) -> Result<String, ApiError> {
    match obj.get("model") {
        Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
        None | Some(Value::Null) => Err(match protocol {
            Protocol::Native => ApiError::new(
                StatusCode::BAD_REQUEST,
                "BadRequest.EmptyModel",
                "Required parameter \"model\" missing from request.",
            ),
            Protocol::Compatible => ApiError::invalid_parameter("model must be provided."),
        }),
        Some(_) => Err(invalid("model must be a non-empty string.".into())),
    }
}

/// Checks a `messages` array; `Ok(false)` when absent.
pub(super) fn check_messages(v: Option<&Value>, at: &str) -> Result<bool, ApiError> {
    let Some(v) = v else { return Ok(false) };
    let Some(list) = v.as_array().filter(|l| !l.is_empty()) else {
        return Err(invalid(format!("{at}messages must be a non-empty array.")));
    };
    for m in list {
        let ok = m.as_object().is_some_and(|m| {
            m.get("role").is_some_and(Value::is_string)
                && matches!(
                    m.get("content"),
                    None | Some(Value::Null | Value::String(_) | Value::Array(_))
                )
                && matches!(
                    m.get("tool_calls"),
                    None | Some(Value::Null | Value::Array(_))
                )
        });
        if !ok {
            return Err(invalid(format!(
                "{at}messages must be objects with a string role and a string or array content."
            )));
        }
    }
    Ok(true)
}
