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
