//! The errors the mock answers with, in both wire shapes.

use std::borrow::Cow;
use std::fmt;

use bytes::Bytes;
use http::StatusCode;
use serde_json::json;

use crate::request::Protocol;

/// One DashScope error: an HTTP status, the native `code`/`message`, and the
/// compatible-mode `error.code`/`error.type`/`error.message`.
///
/// The constructors cover the catalogue of QWEN-API.md A2 with the literal
/// wire strings. Use them in a [`Fault`](super::Fault), or build your own
/// with [`ApiError::new`].
///
/// Where A2 has no compatible-mode code (5xx, `BurstRate`, 413), the mock's
/// choice is a stand-in, named after the native code: `internal_error`,
/// `service_unavailable`, `gateway_timeout`, `limit_burst_rate`,
/// `request_too_large`. The crate's [classifier](crate::classify) reads each
/// of them exactly as it reads the native code, at any status and in either
/// place (an error answer, a `200` body, a stream frame).
///
/// Natively the body is `{"request_id","code","message"}`; compatibly it is
/// `{"error":{"message","type","param":null,"code"},"id":"chatcmpl-<request
/// id>","request_id"}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError(Box<Inner>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct Inner {
    status: StatusCode,
    code: Cow<'static, str>,
    message: Cow<'static, str>,
    compat_code: Cow<'static, str>,
    compat_type: Cow<'static, str>,
    compat_message: Cow<'static, str>,
}

type S = Cow<'static, str>;

impl ApiError {
    /// An error answered with `status`, whose code and message are the same
    /// in both shapes (the compatible `type` is the code too).
    pub fn new(status: StatusCode, code: impl Into<S>, message: impl Into<S>) -> Self {
        let code = code.into();
        let message = message.into();
        Self(Box::new(Inner {
            status,
            compat_code: code.clone(),
            compat_type: code.clone(),
            compat_message: message.clone(),
            code,
            message,
        }))
    }

    /// Replaces the compatible-mode `error.code`, `error.type` and
    /// `error.message`.
    pub fn with_compat(
        mut self,
        code: impl Into<S>,
        kind: impl Into<S>,
        message: impl Into<S>,
    ) -> Self {
        self.0.compat_code = code.into();
        self.0.compat_type = kind.into();
        self.0.compat_message = message.into();
        self
    }

    /// `429 Throttling.RateQuota` "Requests rate limit exceeded, please try
    /// again later." (compatible: `limit_requests`): the RPM/RPS limit.
    pub fn rate_quota() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttling.RateQuota",
            "Requests rate limit exceeded, please try again later.",
        )
        .with_compat(
            "limit_requests",
            "limit_requests",
            "You exceeded your current requests list.",
        )
    }

    /// `429 Throttling.AllocationQuota` "Allocated quota exceeded, please
    /// increase your quota limit." (compatible: `insufficient_quota` "You
    /// exceeded your current quota, please check your plan and billing
    /// details."): the TPM/TPS limit.
    pub fn allocation_quota() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttling.AllocationQuota",
            "Allocated quota exceeded, please increase your quota limit.",
        )
        .with_compat(
            "insufficient_quota",
            "insufficient_quota",
            "You exceeded your current quota, please check your plan and billing details.",
        )
    }

    /// `429 Throttling.BurstRate` "Request rate increased too quickly. …"
    /// (compatible: `limit_burst_rate`).
    pub fn burst_rate() -> Self {
        const MSG: &str = "Request rate increased too quickly. To ensure system stability, \
                           please adjust your client logic to scale requests more smoothly over time.";
        Self::new(StatusCode::TOO_MANY_REQUESTS, "Throttling.BurstRate", MSG).with_compat(
            "limit_burst_rate",
            "limit_burst_rate",
            MSG,
        )
    }

    /// `429 Throttling.AllocationQuota` "Free allocated quota exceeded."
    /// (compatible: `insufficient_quota`): the free quota is gone, which
    /// never heals by waiting.
    pub fn free_allocated_quota() -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttling.AllocationQuota",
            "Free allocated quota exceeded.",
        )
        .with_compat(
            "insufficient_quota",
            "insufficient_quota",
            "Free allocated quota exceeded.",
        )
    }

    /// `403 AllocationQuota.FreeTierOnly` (same code compatibly).
    pub fn free_tier_only() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "AllocationQuota.FreeTierOnly",
            "The free tier of the model has been exhausted. If you wish to continue access the \
             model on a paid basis, please disable the \"use free tier only\" mode in the \
             management console.",
        )
    }

    /// `400 Arrearage` "Access denied, please make sure your account is in
    /// good standing." (same code compatibly).
    pub fn arrearage() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "Arrearage",
            "Access denied, please make sure your account is in good standing.",
        )
    }

    /// `401 InvalidApiKey` "Invalid API-key provided." (compatible:
    /// `invalid_api_key` "Incorrect API key provided.").
    pub fn invalid_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "InvalidApiKey",
            "Invalid API-key provided.",
        )
        .with_compat(
            "invalid_api_key",
            "invalid_request_error",
            "Incorrect API key provided.",
        )
    }

    /// `500 InternalError` (compatible: `internal_error`).
    pub fn internal_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "An internal error has occured, please try again later or contact service support.",
        )
        .with_compat(
            "internal_error",
            "internal_error",
            "An internal error has occured, please try again later or contact service support.",
        )
    }

    /// `503 ServiceUnavailable` "Service temporarily unavailable, possibly
    /// overloaded or not ready." (compatible: `service_unavailable`).
    pub fn service_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "Service temporarily unavailable, possibly overloaded or not ready.",
        )
        .with_compat(
            "service_unavailable",
            "service_unavailable",
            "Service temporarily unavailable, possibly overloaded or not ready.",
        )
    }

    /// `504 GatewayTimeout` "Request timed out, please try again later."
    /// (compatible: `gateway_timeout`).
    pub fn gateway_timeout() -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "GatewayTimeout",
            "Request timed out, please try again later.",
        )
        .with_compat(
            "gateway_timeout",
            "gateway_timeout",
            "Request timed out, please try again later.",
        )
    }

    /// `400 DataInspectionFailed` "Output data may contain inappropriate
    /// content." (compatible: `data_inspection_failed`): content moderation
    /// of the output, which typically arrives mid-stream.
    pub fn data_inspection_failed() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "DataInspectionFailed",
            "Output data may contain inappropriate content.",
        )
        .with_compat(
            "data_inspection_failed",
            "data_inspection_failed",
            "Output data may contain inappropriate content.",
        )
    }

    /// `400 InvalidParameter` with `message` (compatible:
    /// `invalid_parameter_error`, type `invalid_request_error`).
    pub fn invalid_parameter(message: impl Into<S>) -> Self {
        let message = message.into();
        Self::new(StatusCode::BAD_REQUEST, "InvalidParameter", message.clone()).with_compat(
            "invalid_parameter_error",
            "invalid_request_error",
            message,
        )
    }

    /// The `400 InvalidParameter` a stream-only model (QwQ, QVQ, Omni...)
    /// answers to a non-stream call.
    pub fn stream_only() -> Self {
        Self::invalid_parameter(
            "This model only support stream mode, please enable the stream parameter to access \
             the model.",
        )
    }

    /// `404 Model.NotExist` "Model not exist." (compatible:
    /// `model_not_found` "The model `<model>` does not exist or you do not
    /// have access to it.", type `invalid_request_error`): what the mock
    /// answers an unknown model in compatible mode, and natively with
    /// [`NativeModelError::NotExist`](super::NativeModelError::NotExist).
    pub fn model_not_found(model: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, "Model.NotExist", "Model not exist.").with_compat(
            "model_not_found",
            "invalid_request_error",
            format!("The model `{model}` does not exist or you do not have access to it."),
        )
    }

    /// `400 InvalidParameter` "Model not exist.": how the native dialect
    /// answers an unknown model in most captures (QWEN-API.md A8), the
    /// mock's native default. (Compatible: `invalid_parameter_error`, same
    /// message; the mock's compatible endpoints answer
    /// [`model_not_found`](Self::model_not_found) instead.)
    pub fn model_not_exist() -> Self {
        Self::invalid_parameter("Model not exist.")
    }

    /// `429 Throttling.RateQuota` whose `message` holds the engine's own
    /// error as nested JSON, as captured (QWEN-API.md A2 quirk 5):
    /// `{"error":{"message":"The engine is currently overloaded, please try
    /// again later","type":"EngineOverloadedError",...}}`. The compatible
    /// shape carries the same code and nested message (no capture shows it
    /// there: a stand-in).
    pub fn engine_overloaded() -> Self {
        const NESTED: &str = "{\"error\":{\"message\":\"The engine is currently overloaded, please \
                              try again later\",\"type\":\"EngineOverloadedError\",\"param\":null,\
                              \"code\":null}}";
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Throttling.RateQuota",
            NESTED,
        )
    }

    /// `403 AccessDenied` "current user api does not support asynchronous
    /// calls": what DashScope answers when `X-DashScope-Async: enable` is
    /// sent to a synchronous API such as text generation.
    pub fn async_not_supported() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "current user api does not support asynchronous calls",
        )
    }

    /// `403 AccessDenied` "current user api does not support synchronous
    /// calls": a task API called without `X-DashScope-Async: enable`.
    pub fn sync_not_supported() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "AccessDenied",
            "current user api does not support synchronous calls",
        )
    }

    /// `413 RequestTooLarge` (compatible: `request_too_large`): the body is
    /// over the mock's size cap.
    pub fn request_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "RequestTooLarge",
            "Request body is too large.",
        )
        .with_compat(
            "request_too_large",
            "invalid_request_error",
            "Request body is too large.",
        )
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The native `code`.
    pub fn code(&self) -> &str {
        &self.0.code
    }

    /// The native `message`.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The compatible-mode `error.code`.
    pub fn compat_code(&self) -> &str {
        &self.0.compat_code
    }

    /// The compatible-mode `error.type`.
    pub fn compat_type(&self) -> &str {
        &self.0.compat_type
    }

    /// The compatible-mode `error.message`.
    pub fn compat_message(&self) -> &str {
        &self.0.compat_message
    }

    /// The code under which the mock's counters record this error: the
    /// native code, or the compatible one on compatible endpoints.
    pub(crate) fn counted_code(&self, protocol: Protocol) -> &str {
        match protocol {
            Protocol::Native => &self.0.code,
            Protocol::Compatible => &self.0.compat_code,
        }
    }

    /// The JSON body in the shape of `protocol`.
    pub(crate) fn body(&self, protocol: Protocol, request_id: &str) -> Bytes {
        let v = match protocol {
            Protocol::Native => json!({
                "request_id": request_id,
                "code": self.0.code,
                "message": self.0.message,
            }),
            Protocol::Compatible => json!({
                "error": {
                    "message": self.0.compat_message,
                    "type": self.0.compat_type,
                    "param": null,
                    "code": self.0.compat_code,
                },
                "id": format!("chatcmpl-{request_id}"),
                "request_id": request_id,
            }),
        };
        Bytes::from(v.to_string())
    }

    /// The in-stream error frame: native `event:error` with
    /// `:HTTP_STATUS/<status>`, compatible `data: {"error":{..}}`.
    pub(crate) fn sse_frame(&self, protocol: Protocol, request_id: &str, id: u32) -> Bytes {
        match protocol {
            Protocol::Native => {
                let data = json!({
                    "request_id": request_id,
                    "code": self.0.code,
                    "message": self.0.message,
                });
                Bytes::from(format!(
                    "id:{id}\nevent:error\n:HTTP_STATUS/{}\ndata:{data}\n\n",
                    self.0.status.as_u16()
                ))
            }
            Protocol::Compatible => {
                let data = json!({
                    "error": {
                        "message": self.0.compat_message,
                        "type": self.0.compat_type,
                        "param": null,
                        "code": self.0.compat_code,
                    },
                    "id": format!("chatcmpl-{request_id}"),
                });
                Bytes::from(format!("data: {data}\n\n"))
            }
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.0.status.as_u16(),
            self.0.code,
            self.0.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shapes() {
        let e = ApiError::rate_quota();
        let native: serde_json::Value =
            serde_json::from_slice(&e.body(Protocol::Native, "rid")).unwrap();
        assert_eq!(native["code"], "Throttling.RateQuota");
        assert_eq!(native["request_id"], "rid");
        let compat: serde_json::Value =
            serde_json::from_slice(&e.body(Protocol::Compatible, "rid")).unwrap();
        assert_eq!(compat["error"]["code"], "limit_requests");
        assert!(compat["error"]["param"].is_null());
        let frame = e.sse_frame(Protocol::Native, "rid", 1);
        assert!(frame.starts_with(b"id:1\nevent:error\n:HTTP_STATUS/429\ndata:{"));
        assert_eq!(
            e.to_string().split(':').next(),
            Some("429 Throttling.RateQuota")
        );
    }
}
