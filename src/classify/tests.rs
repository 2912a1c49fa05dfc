//! Table-driven tests with the literal wire bodies of QWEN-API.md A2.

use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};
use proptest::prelude::*;

use super::*;
use crate::sse::EventMeta;

use PermanentReason as P;
use ThrottleCause as T;

fn thr(cause: ThrottleCause) -> Outcome {
    Outcome::throttled(cause)
}

fn perm(reason: PermanentReason) -> Outcome {
    Outcome::Permanent { reason }
}

fn native(code: &str, message: &str) -> String {
    format!(r#"{{"request_id":"5b2a","code":"{code}","message":"{message}"}}"#)
}

fn compat(code: &str, message: &str) -> String {
    format!(
        r#"{{"error":{{"message":"{message}","type":"{code}","param":null,"code":"{code}"}},"id":"chatcmpl-1","request_id":"5b2a"}}"#
    )
}

/// Every row of the A2 code catalogue, in the shape(s) it arrives in.
#[test]
fn catalogue() {
    let c = Classifier::new();
    let h = HeaderMap::new();
    let rows: Vec<(u16, String, Outcome)> = vec![
        (400, native("InvalidParameter", "Range of input length should be [1, 6000]"), perm(P::InvalidRequest)),
        (400, compat("invalid_parameter_error", "Range of input length should be [1, 6000]"), perm(P::InvalidRequest)),
        (400, compat("invalid_request_error", "you must provide a model parameter"), perm(P::InvalidRequest)),
        (400, native("InvalidParameter", "This model only support stream mode, please enable the stream parameter to access the model."), perm(P::StreamOnly)),
        (400, compat("invalid_parameter_error", "current user api does not support http call."), perm(P::StreamOnly)),
        (400, native("DataInspectionFailed", "Input data may contain inappropriate content."), perm(P::ContentFilter)),
        (400, r#"{"error":{"code":"data_inspection_failed","param":null,"message":"Input data may contain inappropriate content.","type":"data_inspection_failed"},"id":"chatcmpl-1"}"#.into(), perm(P::ContentFilter)),
        (400, native("BadRequest.EmptyInput", "Required input parameter missing from request."), perm(P::InvalidRequest)),
        (400, native("BadRequest.EmptyParameters", "Required parameter \\\"parameters\\\" missing from request."), perm(P::InvalidRequest)),
        (400, native("BadRequest.EmptyModel", "Required parameter \\\"model\\\" missing from request."), perm(P::InvalidRequest)),
        (400, native("InvalidURL", "Invalid URL provided in your request."), perm(P::InvalidRequest)),
        (400, native("Arrearage", "Access denied, please make sure your account is in good standing."), perm(P::Billing)),
        (400, compat("Arrearage", "Access denied, please make sure your account is in good standing."), perm(P::Billing)),
        (400, native("InternalError.Algo.InvalidParameter", "The image length and width do not meet the model restrictions."), perm(P::InvalidRequest)),
        (401, native("InvalidApiKey", "Invalid API-key provided."), perm(P::Auth)),
        (401, compat("invalid_api_key", "Incorrect API key provided."), perm(P::Auth)),
        (403, native("AccessDenied", "Access denied."), perm(P::AccessDenied)),
        (403, native("AccessDenied.Unpurchased", "Access to model denied. Please make sure you are eligible for using the model."), perm(P::AccessDenied)),
        (403, native("Model.AccessDenied", "Model access denied."), perm(P::AccessDenied)),
        (403, r#"{"error":{"message":"The free tier of the model has been exhausted. If you wish to continue access the model on a paid basis, please disable the \"use free tier only\" mode in the management console.","type":"AllocationQuota.FreeTierOnly","param":null,"code":"AllocationQuota.FreeTierOnly"},"id":"chatcmpl-1","request_id":"2"}"#.into(), perm(P::FreeQuotaExhausted)),
        (404, native("Model.NotExist", "Model not exist."), perm(P::ModelNotFound)),
        (404, compat("model_not_found", "The model `qwen-foo` does not exist or you do not have access to it."), perm(P::ModelNotFound)),
        // Native unknown model, as captured (A8): 400 InvalidParameter.
        (400, native("InvalidParameter", "Model not exist."), perm(P::ModelNotFound)),
        // The mock's compatible stand-ins where A2 has no compatible code
        // (#15): read like their native codes, at any status.
        (500, compat("internal_error", "An internal error has occured, please try again later or contact service support."), Outcome::TRANSIENT),
        (503, compat("service_unavailable", "Service temporarily unavailable, possibly overloaded or not ready."), Outcome::TRANSIENT),
        (504, compat("gateway_timeout", "Request timed out, please try again later."), Outcome::TRANSIENT),
        (200, compat("gateway_timeout", "Request timed out, please try again later."), Outcome::TRANSIENT),
        (200, native("GatewayTimeout", "Request timed out, please try again later."), Outcome::TRANSIENT),
        (429, compat("limit_burst_rate", "Burst."), thr(T::Burst)),
        (429, native("Throttling", "Requests throttling triggered."), thr(T::Unknown)),
        (429, native("Throttling.RateQuota", "Requests rate limit exceeded, please try again later."), thr(T::Requests)),
        (429, compat("limit_requests", "You exceeded your current requests list."), thr(T::Requests)),
        (429, compat("limit_requests", "You have exceeded your current request limit. For details, see: https://www.alibabacloud.com/help/en/model-studio/error-code#rate-limit"), thr(T::Requests)),
        (429, native("Throttling.AllocationQuota", "Allocated quota exceeded, please increase your quota limit."), thr(T::Tokens)),
        (429, compat("insufficient_quota", "You exceeded your current quota, please check your plan and billing details."), thr(T::Tokens)),
        (429, native("Throttling.AllocationQuota", "Free allocated quota exceeded."), perm(P::FreeQuotaExhausted)),
        (429, compat("insufficient_quota", "Free allocated quota exceeded"), perm(P::FreeQuotaExhausted)),
        (429, native("Throttling.BurstRate", "Request rate increased too quickly."), thr(T::Burst)),
        (429, native("Throttling", "Request rate increased too quickly. To ensure system stability, please adjust your client logic to scale requests more smoothly over time."), thr(T::Burst)),
        (429, native("PrepaidBillOverdue", "The prepaid bill is overdue."), perm(P::Billing)),
        (429, native("PostpaidBillOverdue", "The postpaid bill is overdue."), perm(P::Billing)),
        (500, native("InternalError", "An internal error has occured, please try again later or contact service support."), Outcome::TRANSIENT),
        (500, native("InternalError.Algo", "An internal error has occured during execution, please try again later or contact service support."), Outcome::TRANSIENT),
        (503, native("ServiceUnavailable", "Service temporarily unavailable, possibly overloaded or not ready."), Outcome::TRANSIENT),
        (504, native("GatewayTimeout", "Request timed out, please try again later."), Outcome::TRANSIENT),
        (504, native("RequestTimeOut", "Response timeout"), Outcome::TRANSIENT),
        (400, compat("mismatched_model", "The model of all requests in the file must be the same."), perm(P::InvalidRequest)),
        (400, compat("duplicate_custom_id", "The custom_id must be unique."), perm(P::InvalidRequest)),
        (413, compat("request_too_large", "Request too large."), perm(P::TooLarge)),
        // Nested JSON inside message (3P `upstream_error_bailian_nested_message`).
        (429, r#"{"code":"Throttling.RateQuota","message":"{\"error\":{\"message\":\"The engine is currently overloaded, please try again later\",\"type\":\"EngineOverloadedError\",\"param\":null,\"code\":null}}","request_id":"9"}"#.into(), thr(T::Overloaded)),
    ];
    for (status, body, want) in rows {
        let got = c.classify(StatusCode::from_u16(status).unwrap(), &h, body.as_bytes());
        assert_eq!(got, want, "{status} {body}");
    }
}

#[test]
fn business_error_in_http_200() {
    let c = Classifier::new();
    let mut h = HeaderMap::new();
    h.insert("content-type", HeaderValue::from_static("application/json"));
    assert!(c.needs_body(StatusCode::OK, &h));
    let body = native(
        "Throttling.AllocationQuota",
        "Allocated quota exceeded, please increase your quota limit.",
    );
    assert_eq!(
        c.classify(StatusCode::OK, &h, body.as_bytes()),
        thr(T::Tokens)
    );
    // A success body with an empty code stays a success.
    let ok = br#"{"output":{"text":"hi"},"code":"","usage":{"total_tokens":3},"request_id":"1"}"#;
    assert_eq!(c.classify(StatusCode::OK, &h, ok), Outcome::Success);
    // An unknown business code inside a 200 is not retried blindly.
    let odd = native("SomethingNew", "?");
    assert_eq!(
        c.classify(StatusCode::OK, &h, odd.as_bytes()),
        perm(P::Other)
    );
}

#[test]
fn sse_error_bodies_and_frames() {
    let c = Classifier::new();
    let mut h = HeaderMap::new();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream;charset=UTF-8"),
    );
    // A2 item 3: the stream opened with 200, the real status is a comment.
    let wire = b"id:1\nevent:error\n:HTTP_STATUS/429\ndata:{\"request_id\":\"7\",\"code\":\"Throttling.AllocationQuota\",\"message\":\"Allocated quota exceeded\"}\n\n";
    assert_eq!(c.classify(StatusCode::OK, &h, wire), thr(T::Tokens));
    // A2 item 2: a non-2xx error delivered as SSE.
    let wire = b"id:1\nevent:error\n:HTTP_STATUS/400\ndata:{\"code\":\"InvalidParameter\",\"message\":\"bad\"}\n\n";
    assert_eq!(
        c.classify(StatusCode::BAD_REQUEST, &h, wire),
        perm(P::InvalidRequest)
    );
    // SSE body detected without a content type.
    assert_eq!(
        c.classify(StatusCode::BAD_REQUEST, &HeaderMap::new(), wire),
        perm(P::InvalidRequest)
    );
    // A2 item 4: compatible error after partial content.
    let meta = EventMeta::default();
    let frame = br#"{"error":{"message":"Output data may contain inappropriate content.","type":"data_inspection_failed","param":null,"code":"data_inspection_failed"}}"#;
    assert_eq!(c.classify_event(&meta, frame), Some(perm(P::ContentFilter)));
    // Ordinary content frames are not errors, even when they talk about errors.
    let content = br#"{"choices":[{"delta":{"content":"the \"error\" and \"code\" words"}}]}"#;
    assert_eq!(c.classify_event(&meta, content), None);
    let native_ok = br#"{"output":{"choices":[{"message":{"content":"Hello","role":"assistant"},"finish_reason":"null"}]},"usage":{"input_tokens":92,"output_tokens":1},"request_id":"x"}"#;
    let meta200 = EventMeta {
        http_status: Some(200),
        ..Default::default()
    };
    assert_eq!(c.classify_event(&meta200, native_ok), None);
    // Issue 12, item 9: frames that only mention `code`/`error` keys
    // leave the verdict open.
    for frame in [
        &br#"{"output":{"text":"x"},"code":"","request_id":"1"}"#[..],
        br#"{"choices":[{"delta":{"content":"hi"}}],"error":null}"#,
        br#"{"choices":[{"delta":{"content":"code"}}]}"#,
        br#"{"choices":[{"delta":{"content":"error"}}],"code":null}"#,
    ] {
        assert_eq!(c.classify_event(&meta200, frame), None);
        assert_eq!(c.classify_event(&meta, frame), None);
    }
    // An error event whose payload names no error is still an error.
    let error_event = EventMeta {
        error_event: true,
        ..Default::default()
    };
    assert_eq!(
        c.classify_event(&error_event, br#"{"code":""}"#),
        Some(Outcome::TRANSIENT)
    );
    // An error event with an unparseable payload is classified by its status.
    let meta503 = EventMeta {
        error_event: true,
        http_status: Some(503),
        data_lines: 0,
    };
    assert_eq!(
        c.classify_event(&meta503, b"oops"),
        Some(Outcome::TRANSIENT)
    );
    // A mid-stream error of unknown code and status is transient.
    assert_eq!(
        c.classify_event(&meta, br#"{"error":{"message":"boom"}}"#),
        Some(Outcome::TRANSIENT)
    );
}

#[test]
fn status_only_and_non_json_bodies() {
    let c = Classifier::new();
    let h = HeaderMap::new();
    let cases = [
        (200, Outcome::Success),
        (204, Outcome::Success),
        (301, perm(P::Other)),
        (400, perm(P::InvalidRequest)),
        (401, perm(P::Auth)),
        (403, perm(P::AccessDenied)),
        (404, perm(P::NotFound)),
        (408, Outcome::TRANSIENT),
        (409, Outcome::TRANSIENT),
        (413, perm(P::TooLarge)),
        (429, thr(T::Unknown)),
        (500, Outcome::TRANSIENT),
        (502, Outcome::TRANSIENT),
        (503, Outcome::TRANSIENT),
        (504, Outcome::TRANSIENT),
        (529, thr(T::Overloaded)),
    ];
    for (s, want) in cases {
        let s = StatusCode::from_u16(s).unwrap();
        assert_eq!(c.classify_head(s, &h), want, "{s}");
        assert_eq!(c.classify(s, &h, b"<html>Bad Gateway</html>"), want, "{s}");
        assert_eq!(c.classify(s, &h, b"{\"truncated"), want, "{s}");
    }
    // An over-long body is classified by status alone.
    let small = Classifier::new().body_limit(16);
    let body = native("InvalidApiKey", "Invalid API-key provided.");
    assert_eq!(
        small.classify(StatusCode::TOO_MANY_REQUESTS, &h, body.as_bytes()),
        thr(T::Unknown)
    );
}

#[test]
fn allocation_quota_policy_knob() {
    let h = HeaderMap::new();
    let tpm = native(
        "Throttling.AllocationQuota",
        "Allocated quota exceeded, please increase your quota limit.",
    );
    let free = native(
        "Throttling.AllocationQuota",
        "Free allocated quota exceeded.",
    );
    let s = StatusCode::TOO_MANY_REQUESTS;
    let by_msg = Classifier::new();
    let always = Classifier::new().allocation_quota(AllocationQuotaPolicy::Throttled);
    let never = Classifier::new().allocation_quota(AllocationQuotaPolicy::Permanent);
    assert_eq!(by_msg.classify(s, &h, tpm.as_bytes()), thr(T::Tokens));
    assert_eq!(
        by_msg.classify(s, &h, free.as_bytes()),
        perm(P::FreeQuotaExhausted)
    );
    assert_eq!(always.classify(s, &h, free.as_bytes()), thr(T::Tokens));
    assert_eq!(
        never.classify(s, &h, tpm.as_bytes()),
        perm(P::QuotaExhausted)
    );
    assert_eq!(
        never.classify(s, &h, free.as_bytes()),
        perm(P::FreeQuotaExhausted)
    );
}

#[test]
fn retry_after_headers() {
    let c = Classifier::new().max_retry_after(Duration::from_secs(30));
    let s = StatusCode::TOO_MANY_REQUESTS;
    let with = |pairs: &[(&str, &str)]| {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        c.classify_head(s, &h).retry_after()
    };
    assert_eq!(with(&[("retry-after", "2")]), Some(Duration::from_secs(2)));
    assert_eq!(
        with(&[("retry-after", " 1.5 ")]),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        with(&[("retry-after-ms", "250")]),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        with(&[("retry-after-ms", "250"), ("retry-after", "9")]),
        Some(Duration::from_millis(250))
    );
    assert_eq!(
        with(&[("retry-after", "99999999")]),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        with(&[("retry-after", "1e300")]),
        Some(Duration::from_secs(30))
    );
    assert_eq!(with(&[("retry-after", "-5")]), None);
    assert_eq!(with(&[("retry-after", "NaN")]), None);
    assert_eq!(with(&[("retry-after", "inf")]), None);
    assert_eq!(with(&[("retry-after", "soon")]), None);
    assert_eq!(
        with(&[("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT")]),
        Some(Duration::ZERO)
    );
    assert_eq!(
        with(&[("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT")]),
        Some(Duration::from_secs(30))
    );
    let soon = httpdate::fmt_http_date(crate::time::system_now() + Duration::from_secs(20));
    let got = with(&[("retry-after", &soon)]).unwrap();
    assert!(
        got <= Duration::from_secs(20) && got >= Duration::from_secs(18),
        "{got:?}"
    );
    // Success never carries a wait.
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_static("3"));
    assert_eq!(c.classify_head(StatusCode::OK, &h), Outcome::Success);
    // Non-UTF-8 header values are ignored.
    let mut h = HeaderMap::new();
    h.insert("retry-after", HeaderValue::from_bytes(b"\xff\xfe").unwrap());
    assert_eq!(c.classify_head(s, &h).retry_after(), None);
}

#[test]
fn x_should_retry_overrides() {
    let c = Classifier::new();
    let mut h = HeaderMap::new();
    h.insert("x-should-retry", HeaderValue::from_static("false"));
    assert_eq!(
        c.classify_head(StatusCode::SERVICE_UNAVAILABLE, &h),
        perm(P::Declined)
    );
    h.insert("x-should-retry", HeaderValue::from_static("true"));
    assert_eq!(
        c.classify_head(StatusCode::BAD_REQUEST, &h),
        Outcome::TRANSIENT
    );
    assert_eq!(c.classify_head(StatusCode::OK, &h), Outcome::Success);
    h.insert("x-should-retry", HeaderValue::from_static("maybe"));
    assert_eq!(
        c.classify_head(StatusCode::BAD_REQUEST, &h),
        perm(P::InvalidRequest)
    );
}

#[test]
fn errors_are_classified() {
    let c = Classifier::new();
    let io = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    assert!(c.classify_error(&io).is_transient());
    let boxed: crate::BoxError = Box::new(std::io::Error::other("x"));
    assert!(c.classify_error(&boxed).is_transient());
    assert!(c.classify_error(&"some string error").is_transient());
}

#[test]
fn outcome_helpers() {
    let o = Outcome::Throttled {
        cause: T::Tokens,
        retry_after: Some(Duration::from_secs(1)),
    };
    assert!(o.is_throttled() && o.is_retryable() && !o.is_permanent());
    assert_eq!(o.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(o.throttle_cause(), Some(T::Tokens));
    assert_eq!(o.to_string(), "throttled (Tokens)");
    assert!(!perm(P::Auth).is_retryable());
    assert!(Outcome::TRANSIENT.is_retryable());
}

proptest! {
    #[test]
    fn arbitrary_input_never_panics(
        status in 100u16..1000,
        body in proptest::collection::vec(any::<u8>(), 0..512),
        hv in proptest::collection::vec(any::<u8>(), 0..40),
        name in prop_oneof![Just("retry-after"), Just("retry-after-ms"), Just("x-should-retry"), Just("content-type")],
    ) {
        let c = Classifier::new();
        let mut h = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&hv) {
            h.insert(name, v);
        }
        let s = StatusCode::from_u16(status).unwrap();
        let o = c.classify(s, &h, &body);
        if let Some(w) = o.retry_after() {
            prop_assert!(w <= c.get_max_retry_after());
        }
        let _ = c.classify_head(s, &h);
        let _ = c.classify_event(&EventMeta { error_event: true, http_status: Some(status), data_lines: 0 }, &body);
        let _ = crate::sse::parse_events(&body);
        let _ = crate::usage::Usage::find(&body);
        let _ = ErrorInfo::parse(&body);
    }

    #[test]
    fn json_shaped_input_never_panics(code in "[A-Za-z._]{0,30}", msg in ".{0,60}", status in 200u16..600) {
        let c = Classifier::new();
        let body = serde_json::json!({"code": code, "message": msg, "error": {"code": code, "message": msg}}).to_string();
        let _ = c.classify(StatusCode::from_u16(status).unwrap(), &HeaderMap::new(), body.as_bytes());
    }
}

/// #19: every alternative of `by_code` decides on its own. At status 200
/// the status fallback is `Permanent(Other)`, and with no status it is
/// transient, so a code that is not recognised shows.
#[test]
fn every_code_decides_on_its_own() {
    let c = Classifier::new();
    let rows: &[(&str, &str, Outcome, bool)] = &[
        (
            "AllocationQuota.FreeTierOnly",
            "x",
            perm(P::FreeQuotaExhausted),
            true,
        ),
        ("Throttling.AllocationQuota", "x", thr(T::Tokens), true),
        ("insufficient_quota", "x", thr(T::Tokens), true),
        (
            "Throttling.AllocationQuota",
            "Free allocated quota exceeded.",
            perm(P::FreeQuotaExhausted),
            true,
        ),
        (
            "Throttling.AllocationQuota",
            "The free tier of the model has been exhausted.",
            perm(P::FreeQuotaExhausted),
            true,
        ),
        (
            "insufficient_quota",
            "Your free quota is used up.",
            perm(P::FreeQuotaExhausted),
            true,
        ),
        ("Throttling.BurstRate", "x", thr(T::Burst), true),
        ("limit_burst_rate", "x", thr(T::Burst), true),
        (
            "Throttling.User",
            "Request rate increased too quickly.",
            thr(T::Burst),
            false,
        ),
        ("Throttling.RateQuota", "x", thr(T::Requests), true),
        ("limit_requests", "x", thr(T::Requests), true),
        ("rate_limit_exceeded", "x", thr(T::Requests), true),
        ("Throttling", "x", thr(T::Unknown), true),
        ("concurrency_limit_exceeded", "x", thr(T::Unknown), true),
        ("Throttling.User", "x", thr(T::Unknown), false),
        ("Arrearage", "x", perm(P::Billing), true),
        ("PrepaidBillOverdue", "x", perm(P::Billing), false),
        ("billing_hard_limit_reached", "x", perm(P::Billing), true),
        ("InvalidApiKey", "x", perm(P::Auth), true),
        ("invalid_api_key", "x", perm(P::Auth), true),
        ("authentication_error", "x", perm(P::Auth), true),
        ("AccessDenied", "x", perm(P::AccessDenied), false),
        (
            "AccessDenied.Unpurchased",
            "x",
            perm(P::AccessDenied),
            false,
        ),
        ("Model.AccessDenied", "x", perm(P::AccessDenied), true),
        ("model_access_denied", "x", perm(P::AccessDenied), true),
        ("permission_denied", "x", perm(P::AccessDenied), true),
        ("Model.NotExist", "x", perm(P::ModelNotFound), true),
        ("model_not_found", "x", perm(P::ModelNotFound), true),
        ("ModelNotFound", "x", perm(P::ModelNotFound), true),
        (
            "InvalidParameter",
            "Model not exist.",
            perm(P::ModelNotFound),
            false,
        ),
        (
            "invalid_parameter_error",
            "Model not exist.",
            perm(P::ModelNotFound),
            true,
        ),
        (
            "invalid_request_error",
            "Model not exist.",
            perm(P::InvalidRequest),
            true,
        ),
        ("DataInspectionFailed", "x", perm(P::ContentFilter), true),
        ("data_inspection_failed", "x", perm(P::ContentFilter), true),
        ("content_filter", "x", perm(P::ContentFilter), true),
        ("request_too_large", "x", perm(P::TooLarge), true),
        ("RequestTooLarge", "x", perm(P::TooLarge), true),
        ("InvalidParameter", "x", perm(P::InvalidRequest), false),
        (
            "InternalError.Algo.InvalidParameter",
            "x",
            perm(P::InvalidRequest),
            false,
        ),
        (
            "invalid_parameter_error",
            "x",
            perm(P::InvalidRequest),
            true,
        ),
        ("invalid_parameter", "x", perm(P::InvalidRequest), true),
        ("invalid_request_error", "x", perm(P::InvalidRequest), true),
        (
            "context_length_exceeded",
            "x",
            perm(P::InvalidRequest),
            true,
        ),
        ("InvalidURL", "x", perm(P::InvalidRequest), true),
        ("BadRequest.EmptyInput", "x", perm(P::InvalidRequest), false),
        (
            "InvalidParameter",
            "This model only support stream mode.",
            perm(P::StreamOnly),
            false,
        ),
        (
            "invalid_parameter_error",
            "The API does not support http call.",
            perm(P::StreamOnly),
            true,
        ),
        (
            "BadRequest",
            "This model only supports stream output.",
            perm(P::StreamOnly),
            false,
        ),
        (
            "InternalError",
            "The engine is currently overloaded.",
            thr(T::Overloaded),
            false,
        ),
        ("InternalError", "x", Outcome::TRANSIENT, false),
        ("InternalError.Algo", "x", Outcome::TRANSIENT, false),
        ("ServiceUnavailable", "x", Outcome::TRANSIENT, true),
        ("GatewayTimeout", "x", Outcome::TRANSIENT, true),
        ("gateway_timeout", "x", Outcome::TRANSIENT, true),
        ("RequestTimeOut", "x", Outcome::TRANSIENT, true),
        ("Timeout", "x", Outcome::TRANSIENT, true),
        ("internal_error", "x", Outcome::TRANSIENT, true),
        ("server_error", "x", Outcome::TRANSIENT, true),
        ("service_unavailable", "x", Outcome::TRANSIENT, true),
    ];
    let h = HeaderMap::new();
    // The last column: a compatible `type` of that name decides as its
    // `code` would (codes matched by prefix or part are native only).
    for (code, message, want, by_type) in rows {
        let body = native(code, message);
        let got = c.classify(StatusCode::OK, &h, body.as_bytes());
        assert_eq!(got, *want, "native {code} {message:?}");
        if !by_type {
            continue;
        }
        let body = format!(
            r#"{{"error":{{"message":"{message}","type":"{code}","code":"unrecognised"}}}}"#
        );
        let info = ErrorInfo::parse(body.as_bytes()).unwrap();
        assert_eq!(
            c.classify_info(None, &info),
            *want,
            "compatible type {code} {message:?}"
        );
    }
    let unknown = native("SomethingNew", "x");
    let info = ErrorInfo::parse(unknown.as_bytes()).unwrap();
    assert_eq!(c.classify_info(Some(200), &info), perm(P::Other));
    assert_eq!(c.classify_info(Some(299), &info), perm(P::Other));
    assert_eq!(c.classify_info(Some(300), &info), perm(P::Other));
    assert_eq!(c.classify_info(Some(429), &info), thr(T::Unknown));
    assert_eq!(c.classify_info(None, &info), Outcome::TRANSIENT);
    // A body that is not an error answers by its status, or success.
    let ok = ErrorInfo::parse(br#"{"output":{}}"#).unwrap();
    assert_eq!(c.classify_info(None, &ok), Outcome::Success);
    assert_eq!(c.classify_info(Some(503), &ok), Outcome::TRANSIENT);
}

/// #19: an overloaded engine, by a nested kind or by message; before any
/// throttling code, and after the others.
#[test]
fn overloaded_engine() {
    let c = Classifier::new();
    let nested = |code: &str, kind: &str, message: &str| {
        let inner = format!(r#"{{\"error\":{{\"message\":\"{message}\",\"type\":\"{kind}\"}}}}"#);
        format!(r#"{{"code":"{code}","message":"{inner}"}}"#)
    };
    let h = HeaderMap::new();
    let ok = StatusCode::OK;
    let o = |body: String| c.classify(ok, &h, body.as_bytes());
    assert_eq!(
        o(nested(
            "Throttling.RateQuota",
            "EngineOverloadedError",
            "busy"
        )),
        thr(T::Overloaded)
    );
    assert_eq!(
        o(nested("Throttling", "engine_overloaded", "busy")),
        thr(T::Overloaded)
    );
    assert_eq!(
        o(nested("Throttling.RateQuota", "Other", "busy")),
        thr(T::Requests)
    );
    assert_eq!(
        o(nested("InternalError", "EngineOverloadedError", "busy")),
        thr(T::Overloaded)
    );
    assert_eq!(
        o(nested("InvalidParameter", "EngineOverloadedError", "busy")),
        perm(P::InvalidRequest)
    );
    assert_eq!(
        o(native(
            "Throttling.RateQuota",
            "The engine is currently overloaded, please try again later"
        )),
        thr(T::Overloaded)
    );
    assert_eq!(
        o(r#"{"error":{"message":"The engine is currently overloaded"}}"#.into()),
        thr(T::Overloaded)
    );
    // No code, a kind that names a limit, and an overloaded engine: the
    // engine decides first.
    let mut info = ErrorInfo::parse(b"{}").unwrap();
    info.kind = Some("limit_requests".into());
    info.nested_kind = Some("EngineOverloadedError".into());
    assert_eq!(c.classify_info(Some(200), &info), thr(T::Overloaded));
    info.nested_kind = None;
    assert_eq!(c.classify_info(Some(200), &info), thr(T::Requests));
}

/// #19: what the content type and the first bytes of a body decide.
#[test]
fn whole_bodies_by_content_type_and_sniffing() {
    let c = Classifier::new();
    let typed = |ct: &'static str| {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static(ct));
        h
    };
    let none = HeaderMap::new();
    let sse = typed("text/event-stream");
    // Only the content type says SSE: a body starting with a field the
    // sniffer does not know (`retry:`).
    let body = b"retry:100\nevent:error\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n";
    assert_eq!(c.classify(StatusCode::OK, &sse, body), thr(T::Requests));
    assert_eq!(c.classify(StatusCode::OK, &none, body), Outcome::Success);
    // Sniffed by each prefix, after leading whitespace.
    for body in [
        &b"id:1\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n"[..],
        b"event:result\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n",
        b"data:{\"code\":\"Throttling.RateQuota\"}\n\n",
        b":HTTP_STATUS/429\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n",
        b"\n\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n",
    ] {
        assert_eq!(
            c.classify(StatusCode::OK, &none, body),
            thr(T::Requests),
            "{body:?}"
        );
    }
    // An error event without a usable payload takes the event's status,
    // else the response's; a named `ERROR` event counts.
    assert_eq!(
        c.classify(
            StatusCode::OK,
            &sse,
            b"event:ERROR\ndata:{\"code\":\"\"}\n\n"
        ),
        Outcome::TRANSIENT
    );
    assert_eq!(
        c.classify(
            StatusCode::TOO_MANY_REQUESTS,
            &sse,
            b"event:error\ndata:oops\n\n"
        ),
        thr(T::Unknown)
    );
    assert_eq!(
        c.classify(
            StatusCode::OK,
            &sse,
            b"event:error\n:HTTP_STATUS/403\ndata:oops\n\n"
        ),
        perm(P::AccessDenied)
    );
    // A stream of ordinary frames is its status.
    let frames = b"data:{\"choices\":[{\"delta\":{\"content\":\"code\"}}]}\n\ndata: [DONE]\n\n";
    assert_eq!(c.classify(StatusCode::OK, &sse, frames), Outcome::Success);
    assert_eq!(
        c.classify(StatusCode::BAD_GATEWAY, &sse, frames),
        Outcome::TRANSIENT
    );
    // A frame that mentions `"code"` without being an error is skipped;
    // a later error frame decides.
    let later = b"data:{\"code\":\"\",\"output\":{}}\n\ndata:{\"code\":\"Arrearage\"}\n\n";
    assert_eq!(c.classify(StatusCode::OK, &sse, later), perm(P::Billing));
}

/// #19: error events by their status: the event's status decides at 400
/// and above, otherwise the event is transient.
#[test]
fn error_events_without_a_payload() {
    let c = Classifier::new();
    let event = |http_status| EventMeta {
        error_event: true,
        http_status,
        data_lines: 0,
    };
    assert_eq!(
        c.classify_event(&event(Some(400)), b"oops"),
        Some(perm(P::InvalidRequest))
    );
    assert_eq!(
        c.classify_event(&event(Some(429)), b"oops"),
        Some(thr(T::Unknown))
    );
    assert_eq!(
        c.classify_event(&event(Some(399)), b"oops"),
        Some(Outcome::TRANSIENT)
    );
    assert_eq!(
        c.classify_event(&event(Some(200)), b"oops"),
        Some(Outcome::TRANSIENT)
    );
    assert_eq!(
        c.classify_event(&event(None), b"oops"),
        Some(Outcome::TRANSIENT)
    );
    // A status comment of 400 or more flags the frame without `event:error`.
    let status = |s| EventMeta {
        error_event: false,
        http_status: Some(s),
        data_lines: 0,
    };
    assert_eq!(
        c.classify_event(&status(404), b"oops"),
        Some(perm(P::NotFound))
    );
    assert_eq!(c.classify_event(&status(200), b"oops"), None);
    // A payload that is an error decides with the event's status.
    assert_eq!(
        c.classify_event(&status(200), br#"{"code":"SomethingNew"}"#),
        Some(perm(P::Other))
    );
}

/// #19: where the body limit, the content type and the header facts apply.
#[test]
fn limits_content_types_and_header_facts() {
    let body = native("InvalidApiKey", "Invalid API-key provided.");
    let h = HeaderMap::new();
    let s = StatusCode::TOO_MANY_REQUESTS;
    // A body exactly at the limit is read; one byte more is not.
    let at = Classifier::new().body_limit(body.len());
    assert_eq!(at.get_body_limit(), body.len());
    assert_eq!(at.classify(s, &h, body.as_bytes()), perm(P::Auth));
    let below = Classifier::new().body_limit(body.len() - 1);
    assert_eq!(below.classify(s, &h, body.as_bytes()), thr(T::Unknown));
    // Content types.
    let c = Classifier::new();
    let typed = |ct: &'static str| {
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static(ct));
        h
    };
    for (ct, json) in [
        ("application/json", true),
        ("Application/JSON; charset=utf-8", true),
        ("application/problem+json", true),
        ("application/vnd.api+JSON ;x=y", true),
        ("+json", true),
        ("json", false),
        ("a/b", false),
        ("text/plain", false),
        ("application/jsonl", false),
        ("text/event-stream", false),
    ] {
        assert_eq!(c.needs_body(StatusCode::OK, &typed(ct)), json, "{ct}");
        assert!(c.needs_body(StatusCode::BAD_GATEWAY, &typed(ct)), "{ct}");
    }
    // An untyped 2xx body is read as JSON (as the observer and retry's
    // peek read it), so it may matter.
    assert!(c.needs_body(StatusCode::OK, &h));
    assert!(c.needs_body(StatusCode::INTERNAL_SERVER_ERROR, &h));
    assert!(is_event_stream(&typed(" text/event-stream ;charset=utf-8")));
    assert!(is_event_stream(&typed("TEXT/EVENT-STREAM")));
    assert!(!is_event_stream(&typed("application/json")));
    assert!(!is_event_stream(&h));
    assert_eq!(ContentKind::of(&h), ContentKind::Untyped);
    assert_eq!(ContentKind::of(&typed("text/plain")), ContentKind::Other);
    // `x-should-retry` never turns a success into anything else, and never
    // turns a permanent failure permanent in another way.
    let mut yes = HeaderMap::new();
    yes.insert("x-should-retry", HeaderValue::from_static(" TRUE "));
    let mut no = HeaderMap::new();
    no.insert("x-should-retry", HeaderValue::from_static("False"));
    assert_eq!(c.classify(StatusCode::OK, &yes, b"fine"), Outcome::Success);
    assert_eq!(c.classify(StatusCode::OK, &no, b"fine"), Outcome::Success);
    assert_eq!(
        c.classify(StatusCode::OK, &no, br#"{"x":1}"#),
        Outcome::Success
    );
    assert_eq!(
        c.classify(StatusCode::UNAUTHORIZED, &no, b""),
        perm(P::Auth)
    );
    assert_eq!(
        c.classify(StatusCode::UNAUTHORIZED, &yes, b""),
        Outcome::TRANSIENT
    );
    assert_eq!(c.classify(s, &no, b""), perm(P::Declined));
    assert_eq!(
        c.classify(StatusCode::BAD_GATEWAY, &no, b""),
        perm(P::Declined)
    );
    // A JSON body that mentions neither key still gets the header facts.
    let mut wait = HeaderMap::new();
    wait.insert("retry-after", HeaderValue::from_static("7"));
    assert_eq!(
        c.classify(StatusCode::SERVICE_UNAVAILABLE, &wait, br#"{"x":1}"#),
        Outcome::Transient {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    assert_eq!(
        c.classify(StatusCode::OK, &wait, br#"{"x":1}"#),
        Outcome::Success
    );
    // An over-long body too.
    assert_eq!(
        below.classify(StatusCode::SERVICE_UNAVAILABLE, &wait, body.as_bytes()),
        Outcome::Transient {
            retry_after: Some(Duration::from_secs(7))
        }
    );
    // A wait the body already carries is not replaced by the header's.
    let o = Outcome::Throttled {
        cause: T::Requests,
        retry_after: Some(Duration::from_secs(1)),
    };
    assert_eq!(o.with_retry_after(Some(Duration::from_secs(9))), o);
    let o = Outcome::Transient {
        retry_after: Some(Duration::from_secs(1)),
    };
    assert_eq!(o.with_retry_after(Some(Duration::from_secs(9))), o);
    assert_eq!(
        perm(P::Auth).with_retry_after(Some(Duration::from_secs(9))),
        perm(P::Auth)
    );
}

/// #19: zero is a valid wait; the cap applies to both headers.
#[test]
fn zero_and_capped_waits() {
    let c = Classifier::new().max_retry_after(Duration::from_secs(5));
    assert_eq!(c.get_max_retry_after(), Duration::from_secs(5));
    let with = |name: &'static str, v: &'static str| {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        c.retry_after(&h)
    };
    assert_eq!(with("retry-after", "0"), Some(Duration::ZERO));
    assert_eq!(with("retry-after-ms", "0"), Some(Duration::ZERO));
    assert_eq!(
        with("retry-after-ms", "1500"),
        Some(Duration::from_millis(1500))
    );
    assert_eq!(
        with("retry-after-ms", "60000"),
        Some(Duration::from_secs(5))
    );
    assert_eq!(with("retry-after-ms", "-1"), None);
    assert_eq!(
        with("retry-after", "4.5"),
        Some(Duration::from_millis(4500))
    );
    assert_eq!(c.retry_after(&HeaderMap::new()), None);
}

#[test]
fn outcome_predicates_and_display() {
    let all = [
        Outcome::Success,
        thr(T::Burst),
        Outcome::Transient {
            retry_after: Some(Duration::from_secs(2)),
        },
        perm(P::Auth),
    ];
    let flags: Vec<_> = all
        .iter()
        .map(|o| {
            (
                o.is_success(),
                o.is_throttled(),
                o.is_transient(),
                o.is_permanent(),
                o.is_retryable(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        [
            (true, false, false, false, false),
            (false, true, false, false, true),
            (false, false, true, false, true),
            (false, false, false, true, false),
        ]
    );
    let waits: Vec<_> = all.iter().map(Outcome::retry_after).collect();
    assert_eq!(waits, [None, None, Some(Duration::from_secs(2)), None]);
    let causes: Vec<_> = all.iter().map(Outcome::throttle_cause).collect();
    assert_eq!(causes, [None, Some(T::Burst), None, None]);
    let text: Vec<_> = all.iter().map(ToString::to_string).collect();
    assert_eq!(
        text,
        [
            "success",
            "throttled (Burst)",
            "transient failure",
            "permanent failure (Auth)"
        ]
    );
    assert_eq!(Classifier::default(), Classifier::new());
}

#[test]
fn status_table_edges() {
    let cases = [
        (100, perm(P::Other)),
        (199, perm(P::Other)),
        (200, Outcome::Success),
        (299, Outcome::Success),
        (300, perm(P::Other)),
        (402, perm(P::InvalidRequest)),
        (422, perm(P::InvalidRequest)),
        (425, Outcome::TRANSIENT),
        (499, perm(P::InvalidRequest)),
        (599, Outcome::TRANSIENT),
        (600, perm(P::Other)),
    ];
    for (s, want) in cases {
        assert_eq!(by_status(s), want, "{s}");
    }
}

#[test]
fn error_body_fields() {
    // Numeric codes, `msg`, and an `error` string.
    let info = ErrorInfo::parse(br#"{"code":401,"msg":"bad key","request_id":"r1"}"#).unwrap();
    assert_eq!(info.code.as_deref(), Some("401"));
    assert_eq!(info.message.as_deref(), Some("bad key"));
    assert_eq!(info.request_id.as_deref(), Some("r1"));
    assert!(info.is_error());
    let info = ErrorInfo::parse(br#"{"error":"boom"}"#).unwrap();
    assert!(info.is_error());
    assert_eq!(info.message.as_deref(), Some("boom"));
    let info = ErrorInfo::parse(br#"{"message":"outer","error":"boom"}"#).unwrap();
    assert_eq!(info.message.as_deref(), Some("outer"));
    assert!(!ErrorInfo::parse(br#"{"error":""}"#).unwrap().is_error());
    assert!(
        !ErrorInfo::parse(br#"{"code":"","error":null}"#)
            .unwrap()
            .is_error()
    );
    assert!(!ErrorInfo::parse(br#"{"code":true}"#).unwrap().is_error());
    // Only an object is an error body: serde would read an array as the
    // struct's fields in order (#19).
    assert_eq!(ErrorInfo::parse(b"[1]"), None);
    assert_eq!(ErrorInfo::parse(br#" ["Throttling.RateQuota","x"]"#), None);
    assert_eq!(
        Classifier::new().classify_event(&EventMeta::default(), br#"["code","error"]"#),
        None
    );
    assert!(ErrorInfo::parse(b" \n{\"code\":\"X\"}").unwrap().is_error());
    // Compatible: `code` first, then the outer code, then `type`.
    let info =
        ErrorInfo::parse(br#"{"code":"outer","error":{"type":"t","code":"c","message":"m"}}"#)
            .unwrap();
    assert_eq!(
        (
            info.code.as_deref(),
            info.kind.as_deref(),
            info.message.as_deref()
        ),
        (Some("c"), Some("t"), Some("m"))
    );
    let info = ErrorInfo::parse(br#"{"code":"outer","error":{"type":"t"}}"#).unwrap();
    assert_eq!(info.code.as_deref(), Some("outer"));
    let info = ErrorInfo::parse(br#"{"error":{"type":"t","code":null}}"#).unwrap();
    assert_eq!(info.code.as_deref(), Some("t"));
    let info = ErrorInfo::parse(br#"{"error":{}}"#).unwrap();
    assert!(info.is_error());
    // A kind alone is an error.
    assert!(!ErrorInfo::default().is_error());
    let kind = |k: &str| {
        let mut info = ErrorInfo::parse(b"{}").unwrap();
        info.kind = Some(k.into());
        info
    };
    assert!(kind("t").is_error());
    assert!(!kind("").is_error());
    // Nested JSON in the message: its `type`, else its `code`; its message.
    let info = ErrorInfo::parse(
        br#"{"code":"X","message":" {\"type\":\"Inner\",\"code\":\"c\",\"message\":\"deep\"}"}"#,
    )
    .unwrap();
    assert_eq!(info.nested_kind.as_deref(), Some("Inner"));
    assert_eq!(info.message.as_deref(), Some("deep"));
    let info = ErrorInfo::parse(br#"{"code":"X","message":"{\"error\":{\"code\":7}}"}"#).unwrap();
    assert_eq!(info.nested_kind.as_deref(), Some("7"));
    assert_eq!(info.message.as_deref(), Some("{\"error\":{\"code\":7}}"));
    let info = ErrorInfo::parse(br#"{"code":"X","message":"{not json"}"#).unwrap();
    assert_eq!(info.nested_kind, None);
    let info = ErrorInfo::parse(br#"{"code":"X","message":"[1]"}"#).unwrap();
    assert_eq!(info.nested_kind, None);
}

/// #19: the adapters for foreign errors and non-HTTP services.
#[test]
fn foreign_errors_and_closures() {
    #[derive(Debug)]
    struct Status(u8);
    impl std::fmt::Display for Status {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "status {}", self.0)
        }
    }
    impl std::error::Error for Status {}
    let c = Classifier::new()
        .max_retry_after(Duration::from_secs(3))
        .on_error(|s: &Status| {
            if s.0 == 0 {
                perm(P::NotFound)
            } else {
                Outcome::TRANSIENT
            }
        });
    fn of<E: std::fmt::Display + 'static>(
        c: &impl Classify<http::Response<String>>,
        err: &E,
    ) -> Outcome {
        c.classify_error(err)
    }
    assert_eq!(of(&c, &Status(0)), perm(P::NotFound));
    let boxed: crate::BoxError = Box::new(Status(0));
    assert_eq!(of(&c, &boxed), perm(P::NotFound));
    assert_eq!(of(&c, &Status(1)), Outcome::TRANSIENT);
    assert_eq!(c.get_ref().get_max_retry_after(), Duration::from_secs(3));
    let copy = c;
    assert_eq!(of(&copy, &Status(0)), perm(P::NotFound));
    let text = format!("{c:?}");
    assert!(text.starts_with("OnError { inner: Classifier {"), "{text}");
    assert!(text.contains("Status"), "{text}");
    let f = FnClassifier::new(|n: &u8| {
        if *n == 0 {
            Outcome::Success
        } else {
            Outcome::TRANSIENT
        }
    });
    assert_eq!(format!("{f:?}"), "FnClassifier { .. }");
    let g = f.on_error(|_: &Status| perm(P::Other));
    assert_eq!(g.classify_error(&Status(9)), perm(P::Other));
    let io = std::io::Error::from(std::io::ErrorKind::TimedOut);
    assert_eq!(g.classify_error(&io), Outcome::TRANSIENT);
    let (tx, rx) = std::sync::mpsc::channel();
    let out = g.observe(
        1u8,
        crate::body::Inspect::NOTHING,
        move |end: crate::body::BodyEnd| {
            tx.send(end.outcome).unwrap();
        },
    );
    assert_eq!((out, rx.try_recv()), (1, Ok(Outcome::TRANSIENT)));
}

#[test]
fn empty_strings_are_no_codes() {
    let info = ErrorInfo::parse(br#"{"code":"outer","error":{"code":"","type":"t"}}"#).unwrap();
    assert_eq!(info.code.as_deref(), Some("outer"));
    let info = ErrorInfo::parse(br#"{"error":{"code":"","type":"t"}}"#).unwrap();
    assert_eq!(info.code.as_deref(), Some("t"));
    let info =
        ErrorInfo::parse(br#"{"code":"X","message":"{\"type\":\"\",\"code\":\"c\"}"}"#).unwrap();
    assert_eq!(info.nested_kind.as_deref(), Some("c"));
}

/// What the body observer concludes from a body read to its end in
/// `chunks`, and what `classify` concludes from the whole body: they must
/// agree (issue 14; the fuzz target `classify` asserts it on any input).
fn both(status: u16, ct: Option<&'static str>, chunks: &[&'static str]) -> Outcome {
    use crate::body::{BodyEnd, EndKind, Inspect, Observed};
    use bytes::Bytes;
    use futures_util::FutureExt;
    use http_body_util::{BodyExt, StreamBody};
    use std::sync::{Arc, Mutex};

    let c = Classifier::new();
    let mut res = http::Response::builder().status(status);
    if let Some(ct) = ct {
        res = res.header("content-type", ct);
    }
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = chunks
        .iter()
        .map(|s| Ok(http_body::Frame::data(Bytes::from_static(s.as_bytes()))))
        .collect();
    let res = res
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap();
    let whole: String = chunks.concat();
    let classified = c.classify(res.status(), res.headers(), whole.as_bytes());
    let seen: Arc<Mutex<Option<BodyEnd>>> = Arc::default();
    let slot = seen.clone();
    let res = Observed::wrap(res, &c, Inspect::OUTCOME, move |end: BodyEnd| {
        *slot.lock().unwrap() = Some(end);
    });
    let read = res
        .into_body()
        .collect()
        .now_or_never()
        .expect("every frame is ready")
        .unwrap()
        .to_bytes();
    assert_eq!(read, whole.as_bytes());
    let end = seen.lock().unwrap().take().expect("the hook ran");
    assert_eq!(end.kind, EndKind::Complete);
    assert_eq!(
        end.outcome, classified,
        "observer and classify differ on {whole:?}"
    );
    classified
}

/// Issue 14, difference 1: a 2xx body typed neither JSON nor SSE (text,
/// audio) is not read for an error by either reader (DashScope's errors
/// are JSON or SSE, QWEN-API.md A2; a text answer may quote one); a JSON
/// or untyped one is, by both.
#[test]
fn a_2xx_body_of_another_type_is_no_error_for_either_reader() {
    let arrears = r#"{"code":"Arrearage","message":"Access denied."}"#;
    assert_eq!(both(200, Some("text/plain"), &[arrears]), Outcome::Success);
    assert_eq!(
        both(200, Some("text/plain"), &["data: ", arrears, "\n\n"]),
        Outcome::Success
    );
    assert!(!Classifier::new().needs_body(StatusCode::OK, &{
        let mut h = HeaderMap::new();
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h
    }));
    assert_eq!(
        both(
            200,
            Some("application/json"),
            &[&arrears[..9], &arrears[9..]]
        ),
        perm(P::Billing)
    );
    assert_eq!(both(200, None, &[arrears]), perm(P::Billing));
    // Not a 2xx: the body is read whatever its type.
    assert_eq!(both(400, Some("text/plain"), &[arrears]), perm(P::Billing));
}

/// Issue 14, difference 2: an `:HTTP_STATUS/` that comes after its
/// event's data still marks the event, for both readers (the event is
/// judged again when it ends, with all its metadata).
#[test]
fn a_status_after_the_data_marks_the_event_for_both_readers() {
    let ok = r#"{"output":{"choices":[{"message":{"content":"Hi"}}]}}"#;
    assert_eq!(
        both(
            200,
            Some("text/event-stream"),
            &["id:1\ndata:", ok, "\n:HTTP_STA", "TUS/503\n\n"]
        ),
        Outcome::TRANSIENT
    );
    // Also at the end of a stream without a last blank line.
    assert_eq!(
        both(
            200,
            Some("text/event-stream"),
            &["data:", ok, "\n:HTTP_STATUS/401"]
        ),
        perm(P::Auth)
    );
    // Before the data, as DashScope sends it: the frame is judged with it.
    let native = native("Throttling.RateQuota", "Requests rate limit exceeded");
    let wire: &'static str = Box::leak(
        format!("id:1\nevent:error\n:HTTP_STATUS/429\ndata:{native}\n\n").into_boxed_str(),
    );
    assert_eq!(
        both(200, Some("text/event-stream"), &[wire]),
        thr(T::Requests)
    );
}

/// Issue 14, difference 3: an error only in an event's metadata (no
/// `data:` line, or data that is not JSON), and the response's status as
/// the status of an event without `:HTTP_STATUS/`, for both readers;
/// multi-line data is read line by line by both.
#[test]
fn error_metadata_and_the_default_status_agree_for_both_readers() {
    let sse = Some("text/event-stream");
    assert_eq!(
        both(200, sse, &["id:1\nevent:error\n:HTTP_STATUS/401\n\n"]),
        perm(P::Auth)
    );
    assert_eq!(both(200, sse, &["event: Error\n\n"]), Outcome::TRANSIENT);
    assert_eq!(
        both(200, sse, &["event:error\n:HTTP_STATUS/500\ndata: oops\n\n"]),
        Outcome::TRANSIENT
    );
    // An unknown code in a frame: the response's status decides, as for
    // a JSON body.
    let unknown = r#"data: {"code":"Something.New","message":"?"}"#;
    assert_eq!(both(200, sse, &[unknown, "\n\n"]), perm(P::Other));
    assert_eq!(both(400, sse, &[unknown, "\n\n"]), perm(P::InvalidRequest));
    assert_eq!(both(503, sse, &[unknown, "\n\n"]), Outcome::TRANSIENT);
    // Events with nothing in them are no events; the error after them
    // decides.
    let arrears = r#"data: {"code":"Arrearage","message":"Access denied."}"#;
    assert_eq!(both(400, sse, &["\n\n", arrears, "\n\n"]), perm(P::Billing));
    // One JSON frame per `data:` line (QWEN-API.md A4): a JSON object cut
    // over two lines is two lines that are not JSON, for both readers.
    assert_eq!(
        both(200, sse, &["data: {\"code\":\ndata: \"Arrearage\"}\n\n"]),
        Outcome::Success
    );
}

/// The head read in one pass over the headers says what the lookups by
/// name say: the first value of each name counts, names match in any case.
#[test]
fn head_in_one_pass_is_the_first_value_of_each_name() {
    let c = Classifier::new();
    let mut h = HeaderMap::new();
    h.append(
        "Content-Type",
        HeaderValue::from_static("text/event-stream"),
    );
    h.append("content-type", HeaderValue::from_static("application/json"));
    h.append("retry-after", HeaderValue::from_static("5"));
    h.append("Retry-After", HeaderValue::from_static("7"));
    h.append("x-should-retry", HeaderValue::from_static(" FALSE "));
    h.append("x-should-retry", HeaderValue::from_static("true"));
    h.append("x-other", HeaderValue::from_static("1"));
    let (kind, facts) = c.head(&h);
    assert_eq!(kind, ContentKind::EventStream);
    assert_eq!(kind, ContentKind::of(&h));
    assert_eq!(facts.retry_after, Some(Duration::from_secs(5)));
    assert_eq!(facts.retry_after, c.retry_after(&h));
    assert_eq!(facts.should_retry, Some(false));

    // `retry-after-ms` wins over `retry-after`, wherever it comes.
    h.append("retry-after-ms", HeaderValue::from_static("250"));
    let (_, facts) = c.head(&h);
    assert_eq!(facts.retry_after, Some(Duration::from_millis(250)));
    assert_eq!(facts.retry_after, c.retry_after(&h));

    // Nothing there: untyped, no facts.
    let (kind, facts) = c.head(&HeaderMap::new());
    assert_eq!(kind, ContentKind::Untyped);
    assert_eq!(facts, HeadFacts::default());
}
