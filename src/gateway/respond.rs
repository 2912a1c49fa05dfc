//! Answers the gateway writes itself, in the error shape of the endpoint's
//! dialect (QWEN-API.md A2): native `{"request_id","code","message"}`,
//! compatible `{"error":{"message","type","param","code"},"request_id"}`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode};

use crate::request::Protocol;

/// One kind of answer the gateway gives on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Refusal {
    /// No or unknown client key (401).
    Unauthorized,
    /// The client key's bucket is empty (429).
    KeyRateLimited,
    /// The client key's tokens per minute are spent (429).
    KeyTokens,
    /// The client key's token budget for the day or month is spent (429).
    KeyBudget,
    /// The client key is degraded and over its low rate (429).
    Degraded,
    /// The upstream account's request budget has no room (429).
    UpstreamRequests,
    /// The upstream account's token budget has no room (429).
    UpstreamTokens,
    /// The body is over the cap (413).
    BodyTooLarge,
    /// The headers are over the cap (431).
    HeadersTooLarge,
    /// The body did not arrive in time (408).
    BodyTimeout,
    /// The body could not be read (400).
    BadBody,
    /// The body cannot be read unambiguously (400): see
    /// [`RequestInfo`](crate::request::RequestInfo#ambiguous-bodies).
    InvalidBody,
    /// A generation or embedding request without a model (400).
    MissingModel,
    /// Not a path the gateway serves (404).
    NotFound,
    /// A path the gateway serves, with another method (405).
    MethodNotAllowed,
    /// The upstream did not answer in time (504).
    UpstreamTimeout,
    /// The upstream could not be reached (502).
    UpstreamUnreachable,
    /// The request head could not be parsed as HTTP/1.1 (400, answered
    /// for hyper).
    MalformedRequest,
    /// The request target is longer than the head buffer (414, answered
    /// for hyper).
    UriTooLong,
    /// Too many failed authentications from the client's address (429).
    AuthThrottled,
    /// The shared rate limits (Redis) cannot decide and the policy fails
    /// closed (503).
    LimitsUnavailable,
}

impl Refusal {
    pub(crate) fn status(self) -> StatusCode {
        match self {
            Refusal::Unauthorized => StatusCode::UNAUTHORIZED,
            Refusal::KeyRateLimited
            | Refusal::KeyTokens
            | Refusal::KeyBudget
            | Refusal::Degraded
            | Refusal::UpstreamRequests
            | Refusal::UpstreamTokens => StatusCode::TOO_MANY_REQUESTS,
            Refusal::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Refusal::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::BadBody | Refusal::InvalidBody | Refusal::MissingModel => {
                StatusCode::BAD_REQUEST
            }
            Refusal::NotFound => StatusCode::NOT_FOUND,
            Refusal::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Refusal::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Refusal::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            Refusal::MalformedRequest => StatusCode::BAD_REQUEST,
            Refusal::UriTooLong => StatusCode::URI_TOO_LONG,
            Refusal::AuthThrottled => StatusCode::TOO_MANY_REQUESTS,
            Refusal::LimitsUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The metric label of a refusal.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::Unauthorized => "unauthorized",
            Refusal::KeyRateLimited => "key_bucket",
            Refusal::KeyTokens => "key_tokens",
            Refusal::KeyBudget => "key_budget",
            Refusal::Degraded => "degraded",
            Refusal::UpstreamRequests => "upstream_requests",
            Refusal::UpstreamTokens => "upstream_tokens",
            Refusal::BodyTooLarge => "body_too_large",
            Refusal::HeadersTooLarge => "headers_too_large",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::BadBody => "bad_body",
            Refusal::InvalidBody => "invalid_body",
            Refusal::MissingModel => "missing_model",
            Refusal::NotFound => "not_found",
            Refusal::MethodNotAllowed => "method_not_allowed",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::UpstreamUnreachable => "upstream_unreachable",
            Refusal::MalformedRequest => "malformed_request",
            Refusal::UriTooLong => "uri_too_long",
            Refusal::AuthThrottled => "auth_failures",
            Refusal::LimitsUnavailable => "limits_unavailable",
        }
    }

    /// (native code, compatible code, compatible type, message). The codes
    /// are DashScope's own where one fits, so SDKs and this crate's
    /// classifier read a gateway 429 exactly like an upstream one.
    fn wording(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Refusal::Unauthorized => (
                "InvalidApiKey",
                "invalid_api_key",
                "invalid_request_error",
                "Invalid API-key provided.",
            ),
            Refusal::KeyRateLimited => (
                "Throttling.RateQuota",
                "limit_requests",
                "limit_requests",
                "Requests rate limit exceeded for this gateway key, please try again later.",
            ),
            Refusal::KeyTokens => (
                "Throttling.AllocationQuota",
                "insufficient_quota",
                "insufficient_quota",
                "Tokens per minute limit exceeded for this gateway key, please try again later.",
            ),
            // The answer names the budget (day or month) in its message.
            Refusal::KeyBudget => (
                "Throttling.AllocationQuota",
                "insufficient_quota",
                "insufficient_quota",
                "Token budget exhausted for this gateway key, please try again after it resets.",
            ),
            Refusal::Degraded => (
                "Throttling.RateQuota",
                "limit_requests",
                "limit_requests",
                "Requests rate limit exceeded: this gateway key is degraded after upstream failures, please try again later.",
            ),
            Refusal::UpstreamRequests => (
                "Throttling.RateQuota",
                "limit_requests",
                "limit_requests",
                "Requests rate limit exceeded for the upstream account and model, please try again later.",
            ),
            Refusal::UpstreamTokens => (
                "Throttling.AllocationQuota",
                "insufficient_quota",
                "insufficient_quota",
                "Allocated quota exceeded for the upstream account and model, please try again later.",
            ),
            Refusal::BodyTooLarge => (
                "InvalidParameter",
                "request_too_large",
                "invalid_request_error",
                "The request body is larger than the gateway accepts.",
            ),
            Refusal::HeadersTooLarge => (
                "InvalidParameter",
                "request_headers_too_large",
                "invalid_request_error",
                "The request headers are larger than the gateway accepts.",
            ),
            Refusal::BodyTimeout => (
                "RequestTimeOut",
                "request_timeout",
                "invalid_request_error",
                "The request body did not arrive in time.",
            ),
            Refusal::BadBody => (
                "InvalidParameter",
                "invalid_request_error",
                "invalid_request_error",
                "The request body could not be read.",
            ),
            Refusal::InvalidBody => (
                "InvalidParameter",
                "invalid_parameter_error",
                "invalid_request_error",
                "The request body cannot be read unambiguously.",
            ),
            Refusal::MissingModel => (
                "BadRequest.EmptyModel",
                "invalid_parameter_error",
                "invalid_request_error",
                "Model is required: the request body names no model.",
            ),
            Refusal::MethodNotAllowed => (
                "InvalidURL",
                "method_not_allowed",
                "invalid_request_error",
                "The gateway does not serve this method on this path.",
            ),
            Refusal::NotFound => (
                "InvalidURL",
                "not_found",
                "invalid_request_error",
                "The gateway does not serve this path.",
            ),
            Refusal::UpstreamTimeout => (
                "RequestTimeOut",
                "timeout",
                "server_error",
                "Request timed out, please try again later.",
            ),
            Refusal::UpstreamUnreachable => (
                "InternalError",
                "upstream_error",
                "server_error",
                "The upstream service could not be reached, please try again later.",
            ),
            Refusal::MalformedRequest => (
                "InvalidParameter",
                "invalid_request_error",
                "invalid_request_error",
                "The request could not be read as HTTP/1.1.",
            ),
            Refusal::UriTooLong => (
                "InvalidURL",
                "request_uri_too_long",
                "invalid_request_error",
                "The request URI is longer than the gateway accepts.",
            ),
            Refusal::AuthThrottled => (
                "Throttling",
                "limit_requests",
                "limit_requests",
                "Too many failed authentications from this address, please try again later.",
            ),
            Refusal::LimitsUnavailable => (
                "ServiceUnavailable",
                "service_unavailable",
                "server_error",
                "The gateway's shared rate limits are unavailable, please try again later.",
            ),
        }
    }
}

/// Gateway request ids: `gw-` and 16 hex digits, unique per process.
pub(crate) fn request_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // A fixed odd multiplier spreads consecutive ids; uniqueness comes from
    // the counter, the multiplier is a bijection on u64.
    format!("gw-{:016x}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Seconds, rounded up, at least one.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// The error answer for `refusal` in `protocol`'s shape, saying `message`
/// instead of the refusal's own when given (e.g. what is wrong with a
/// body); 429s carry `Retry-After` (whole seconds, rounded up) when
/// `retry_after` is given, plus `extra` headers.
pub(crate) fn refuse_saying(
    protocol: Protocol,
    refusal: Refusal,
    message: Option<&str>,
    retry_after: Option<Duration>,
    extra: Option<HeaderMap>,
) -> Response {
    let id = request_id();
    let body = error_json(protocol, refusal, message, &id);
    let mut res = Response::new(Body::from(body));
    *res.status_mut() = refusal.status();
    let h = res.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        h.insert("x-request-id", v);
    }
    if let Some(d) = retry_after {
        h.insert(RETRY_AFTER, HeaderValue::from(ceil_secs(d)));
    }
    if let Some(extra) = extra {
        h.extend(extra);
    }
    res
}

/// The error body for `refusal` in `protocol`'s shape, with request id
/// `id`, saying `message` instead of the refusal's own when given.
fn error_json(protocol: Protocol, refusal: Refusal, message: Option<&str>, id: &str) -> String {
    let (native, code, kind, own) = refusal.wording();
    let message = message.unwrap_or(own);
    let body = match protocol {
        Protocol::Native => serde_json::json!({
            "request_id": id,
            "code": native,
            "message": message,
        }),
        Protocol::Compatible => serde_json::json!({
            "error": {
                "message": message,
                "type": kind,
                "param": null,
                "code": code,
            },
            "request_id": id,
        }),
    };
    body.to_string()
}

/// A whole HTTP/1.1 answer for `refusal` that closes the connection:
/// written on the wire where hyper would answer a head it cannot parse.
pub(crate) fn raw_answer(protocol: Protocol, refusal: Refusal) -> Vec<u8> {
    let id = request_id();
    let body = error_json(protocol, refusal, None, &id);
    let status = refusal.status();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: {id}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len(),
    )
    .into_bytes()
}

/// A final SSE event reporting `refusal` in `protocol`'s stream dialect
/// (QWEN-API.md A2 items 3 and 4): native `event:error` with
/// `:HTTP_STATUS/NNN` and the error object, compatible `data:` with an
/// `{"error":...}` object. `message` replaces the refusal's own.
pub(crate) fn sse_error_event(protocol: Protocol, refusal: Refusal, message: &str) -> String {
    let id = request_id();
    let body = error_json(protocol, refusal, Some(message), &id);
    match protocol {
        Protocol::Native => format!(
            "event:error\n:HTTP_STATUS/{}\ndata:{body}\n\n",
            refusal.status().as_u16()
        ),
        Protocol::Compatible => format!("data: {body}\n\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{Classifier, PermanentReason, ThrottleCause};

    async fn body(res: Response) -> Vec<u8> {
        use http_body_util::BodyExt;
        res.into_body().collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn shapes_are_read_back_by_the_classifier() {
        let c = Classifier::new();
        for p in [Protocol::Native, Protocol::Compatible] {
            let res = refuse_saying(
                p,
                Refusal::KeyRateLimited,
                None,
                Some(Duration::from_millis(1200)),
                None,
            );
            assert_eq!(res.status(), 429);
            assert_eq!(res.headers()["retry-after"], "2");
            let (status, headers) = (res.status(), res.headers().clone());
            let b = body(res).await;
            assert_eq!(
                c.classify(status, &headers, &b).throttle_cause(),
                Some(ThrottleCause::Requests),
                "{}",
                String::from_utf8_lossy(&b)
            );
            for refusal in [
                Refusal::UpstreamTokens,
                Refusal::KeyTokens,
                Refusal::KeyBudget,
            ] {
                let res = refuse_saying(p, refusal, None, Some(Duration::from_secs(3)), None);
                let (status, headers) = (res.status(), res.headers().clone());
                let b = body(res).await;
                assert_eq!(
                    c.classify(status, &headers, &b).throttle_cause(),
                    Some(ThrottleCause::Tokens),
                    "{refusal:?}"
                );
            }
            let res = refuse_saying(p, Refusal::Unauthorized, None, None, None);
            let (status, headers) = (res.status(), res.headers().clone());
            assert!(headers.get("retry-after").is_none());
            let b = body(res).await;
            assert_eq!(
                c.classify(status, &headers, &b),
                Outcome::Permanent {
                    reason: PermanentReason::Auth
                }
            );
        }
    }

    use crate::classify::Outcome;

    #[test]
    fn ids_and_rounding() {
        assert_ne!(request_id(), request_id());
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
        assert_eq!(ceil_secs(Duration::from_millis(2001)), 3);
        assert_eq!(ceil_secs(Duration::ZERO), 1);
    }
}
