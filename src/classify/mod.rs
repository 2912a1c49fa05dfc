//! One answer to "how did that call go?", read by every other layer.
//!
//! DashScope reports trouble in many places: the status line, a JSON body in
//! two dialects, an HTTP 200 whose body carries a business error `code`, a
//! native SSE frame `event:error` whose real status is only in a
//! `:HTTP_STATUS/NNN` comment, a compatible `data: {"error":...}` after
//! partial content, and JSON nested inside `message`. [`Classifier`] turns all
//! of them into one [`Outcome`]:
//!
//! * [`Outcome::Success`];
//! * [`Outcome::Throttled`] with a [`ThrottleCause`] (requests, tokens, burst,
//!   overloaded, unknown) and an optional server-suggested wait;
//! * [`Outcome::Transient`]: 5xx, timeouts, connection errors;
//! * [`Outcome::Permanent`] with a [`PermanentReason`]: bad key, no access,
//!   arrears, free tier exhausted, content inspection, invalid parameter,
//!   unknown model, stream-only model called without streaming...
//!
//! Retry, the circuit breaker, adaptive concurrency, fallback and the gateway
//! all read this one answer; none of them parses DashScope errors itself.
//!
//! The `Throttling.AllocationQuota` / `insufficient_quota` code means either
//! the transient tokens-per-minute limit (per the official rate-limit FAQ) or
//! an exhausted free quota (permanent). By default the message decides
//! ("Free allocated quota exceeded" is permanent); [`AllocationQuotaPolicy`]
//! changes that.
//!
//! Headers `retry-after-ms`, `retry-after` (seconds or HTTP-date) and
//! `x-should-retry` are honoured when present (DashScope itself sends none),
//! and every wait is capped by [`Classifier::max_retry_after`].
//!
//! Layers are generic over the [`Classify`] trait (retry, fallback, the
//! circuit breaker and the concurrency limit each take one with
//! `.classifier(..)`), so a service with its own answers or errors (a tonic
//! channel, a custom client) can use them with an [`FnClassifier`], and
//! teach them its error type with `on_error` ([`OnError`]).
//!
//! # Example
//!
//! ```
//! use http::{HeaderMap, StatusCode};
//! use tower_qwen::classify::{Classifier, Outcome, PermanentReason, ThrottleCause};
//!
//! let c = Classifier::new();
//! let h = HeaderMap::new();
//!
//! let body = br#"{"request_id":"1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#;
//! assert_eq!(
//!     c.classify(StatusCode::TOO_MANY_REQUESTS, &h, body),
//!     Outcome::Throttled { cause: ThrottleCause::Requests, retry_after: None },
//! );
//!
//! // A business error inside an HTTP 200.
//! let body = br#"{"code":"Arrearage","message":"Access denied, please make sure your account is in good standing.","request_id":"2"}"#;
//! assert_eq!(
//!     c.classify(StatusCode::OK, &h, body),
//!     Outcome::Permanent { reason: PermanentReason::Billing },
//! );
//! ```

mod error_body;
mod known;
mod observe;

use std::fmt;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

pub use error_body::ErrorInfo;
pub use observe::{Classify, Early, FnClassifier, OnError};

#[allow(unused_imports)]
pub(crate) use known::{KnownError, is_circuit_open};

use crate::sse::{EventMeta, Sink, SseScanner};

/// How a call ended, as every layer sees it. See the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The call succeeded.
    Success,
    /// A rate or quota limit refused the call; it heals with time.
    Throttled {
        /// Which limit.
        cause: ThrottleCause,
        /// A wait suggested by the server (capped), if any.
        retry_after: Option<Duration>,
    },
    /// A server or network failure that may heal on its own (5xx, timeouts,
    /// connection resets).
    Transient {
        /// A wait suggested by the server (capped), if any.
        retry_after: Option<Duration>,
    },
    /// A failure that repeating the same request cannot fix.
    Permanent {
        /// Why.
        reason: PermanentReason,
    },
}

/// Which limit throttled a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ThrottleCause {
    /// Requests per minute / per second (`Throttling.RateQuota`,
    /// `limit_requests`).
    Requests,
    /// Tokens per minute / per second (`Throttling.AllocationQuota`,
    /// `insufficient_quota`, when not a free-quota exhaustion).
    Tokens,
    /// DashScope's growth guard: "Request rate increased too quickly"
    /// (`Throttling.BurstRate`).
    Burst,
    /// The engine is overloaded (a nested `EngineOverloadedError`, HTTP 529).
    Overloaded,
    /// A limit this crate enforces locally refused the call (this crate's
    /// rate limiter in reject mode or past its maximum wait, or a
    /// load-shedding concurrency limit). Nothing was sent upstream.
    Local,
    /// A throttle without a recognisable cause (plain 429, `Throttling`).
    Unknown,
}

/// Why a call failed for good.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PermanentReason {
    /// Invalid or missing API key, or a key for another region (401).
    Auth,
    /// No permission to the model or workspace (403, `AccessDenied*`).
    AccessDenied,
    /// Overdue payment (`Arrearage`, `*BillOverdue`).
    Billing,
    /// The free quota is gone (`Free allocated quota exceeded`,
    /// `AllocationQuota.FreeTierOnly`).
    FreeQuotaExhausted,
    /// `Throttling.AllocationQuota` treated as permanent by
    /// [`AllocationQuotaPolicy::Permanent`].
    QuotaExhausted,
    /// Content inspection refused the input or output
    /// (`DataInspectionFailed`).
    ContentFilter,
    /// Bad parameters or a malformed request (400, `InvalidParameter`).
    InvalidRequest,
    /// A stream-only model was called without `stream` (400 "only support
    /// stream mode").
    StreamOnly,
    /// The model does not exist (`Model.NotExist`, `model_not_found`).
    ModelNotFound,
    /// Some other resource was not found (404).
    NotFound,
    /// The request is too large (413, `request_too_large`).
    TooLarge,
    /// The server said not to retry (`x-should-retry: false`).
    Declined,
    /// A setting of this crate that cannot be used (a quota, a backoff, a
    /// base URL...): nothing was sent, and the same call fails again.
    InvalidConfig,
    /// Anything else (unexpected 1xx/3xx, unknown business error in a 200).
    Other,
}

impl Outcome {
    /// `Outcome::Throttled` with the given cause and no wait.
    pub const fn throttled(cause: ThrottleCause) -> Self {
        Outcome::Throttled {
            cause,
            retry_after: None,
        }
    }

    /// `Outcome::Transient` with no wait.
    pub const TRANSIENT: Outcome = Outcome::Transient { retry_after: None };

    /// Whether the call succeeded.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }

    /// Whether a limit throttled the call.
    pub fn is_throttled(&self) -> bool {
        matches!(self, Outcome::Throttled { .. })
    }

    /// Whether the call failed transiently (5xx, timeout, connection).
    pub fn is_transient(&self) -> bool {
        matches!(self, Outcome::Transient { .. })
    }

    /// Whether the call failed for good.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Outcome::Permanent { .. })
    }

    /// Whether repeating the call later could succeed (throttled or
    /// transient).
    pub fn is_retryable(&self) -> bool {
        self.is_throttled() || self.is_transient()
    }

    /// The server-suggested wait, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match *self {
            Outcome::Throttled { retry_after, .. } | Outcome::Transient { retry_after } => {
                retry_after
            }
            _ => None,
        }
    }

    /// The throttle cause, if throttled.
    pub fn throttle_cause(&self) -> Option<ThrottleCause> {
        match *self {
            Outcome::Throttled { cause, .. } => Some(cause),
            _ => None,
        }
    }

    fn with_retry_after(self, wait: Option<Duration>) -> Self {
        match self {
            Outcome::Throttled { cause, retry_after } => Outcome::Throttled {
                cause,
                retry_after: retry_after.or(wait),
            },
            Outcome::Transient { retry_after } => Outcome::Transient {
                retry_after: retry_after.or(wait),
            },
            other => other,
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Success => f.write_str("success"),
            Outcome::Throttled { cause, .. } => write!(f, "throttled ({cause:?})"),
            Outcome::Transient { .. } => f.write_str("transient failure"),
            Outcome::Permanent { reason } => write!(f, "permanent failure ({reason:?})"),
        }
    }
}

/// What to make of `Throttling.AllocationQuota` / `insufficient_quota`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AllocationQuotaPolicy {
    /// Decide by the message: "Free allocated quota exceeded" / free tier
    /// wording is permanent ([`PermanentReason::FreeQuotaExhausted`]); any
    /// other message is the tokens-per-minute limit
    /// ([`ThrottleCause::Tokens`]). This follows the official rate-limit FAQ.
    #[default]
    ByMessage,
    /// Always the transient token limit, whatever the message (the official
    /// Python SDK 2.x behaviour).
    Throttled,
    /// Always permanent (the official Qwen CLI's fail-fast behaviour).
    Permanent,
}

/// The DashScope classifier. Cheap to copy; see the [module docs](self).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Classifier {
    max_retry_after: Duration,
    allocation_quota: AllocationQuotaPolicy,
    body_limit: usize,
}

impl Default for Classifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Classifier {
    /// A classifier with the defaults: waits capped at 60 s, allocation
    /// quota decided by message, error bodies read up to 64 KiB.
    pub const fn new() -> Self {
        Self {
            max_retry_after: Duration::from_secs(60),
            allocation_quota: AllocationQuotaPolicy::ByMessage,
            body_limit: 64 * 1024,
        }
    }

    /// Caps every server-suggested wait. Default is 60 s.
    pub const fn max_retry_after(mut self, cap: Duration) -> Self {
        self.max_retry_after = cap;
        self
    }

    /// How to read `Throttling.AllocationQuota`. Default is
    /// [`AllocationQuotaPolicy::ByMessage`].
    pub const fn allocation_quota(mut self, policy: AllocationQuotaPolicy) -> Self {
        self.allocation_quota = policy;
        self
    }

    /// The most bytes of a body read to classify it; a longer body is
    /// classified by status alone. Default is 64 KiB.
    pub const fn body_limit(mut self, limit: usize) -> Self {
        self.body_limit = limit;
        self
    }

    /// The configured body limit.
    pub const fn get_body_limit(&self) -> usize {
        self.body_limit
    }

    /// The configured cap on waits.
    pub const fn get_max_retry_after(&self) -> Duration {
        self.max_retry_after
    }

    /// Classifies from the status line and headers alone.
    pub fn classify_head(&self, status: StatusCode, headers: &HeaderMap) -> Outcome {
        let outcome = by_status(status.as_u16());
        self.apply_headers(outcome, headers)
    }

    /// Whether reading the body could change [`Classifier::classify_head`]'s
    /// answer: any non-2xx status, and a 2xx JSON or untyped body (which
    /// may carry a business error). SSE bodies are watched frame by frame
    /// instead; a 2xx body of another type (text, audio) is not an error.
    pub fn needs_body(&self, status: StatusCode, headers: &HeaderMap) -> bool {
        !status.is_success()
            || matches!(
                ContentKind::of(headers),
                ContentKind::Json | ContentKind::Untyped
            )
    }

    /// Classifies a whole response: status, headers and (up to
    /// [`Classifier::body_limit`] bytes of) body, which may be JSON in either
    /// dialect or an SSE error stream. A 2xx body whose content type is
    /// neither JSON nor SSE (text, audio) is not read: DashScope's errors
    /// are JSON or SSE, and such a body may quote an error without being
    /// one. An SSE body is read as a stream, exactly as the
    /// [body observer](crate::body::Observed) reads it as it passes (see
    /// [`Classifier::classify_event`]).
    pub fn classify(&self, status: StatusCode, headers: &HeaderMap, body: &[u8]) -> Outcome {
        let (kind, facts) = self.head(headers);
        if status.is_success() && kind == ContentKind::Other {
            return Outcome::Success;
        }
        self.classify_with(status, kind == ContentKind::EventStream, facts, body)
    }

    /// [`Classifier::classify`] with the header facts already read.
    pub(crate) fn classify_with(
        &self,
        status: StatusCode,
        event_stream: bool,
        facts: HeadFacts,
        body: &[u8],
    ) -> Outcome {
        if body.len() > self.body_limit {
            return facts.apply(by_status(status.as_u16()));
        }
        let trimmed = body.trim_ascii_start();
        let outcome = if event_stream || looks_like_sse(trimmed) {
            self.classify_sse_body(status, body)
        } else if trimmed.starts_with(b"{") {
            // Only a top-level `code` or `error` key can make a JSON body an
            // error; a body that mentions neither (inside strings the quotes
            // would be escaped) is read by its status without parsing it.
            if !mentions_code_or_error(body) {
                return facts.apply(by_status(status.as_u16()));
            }
            match ErrorInfo::parse(body) {
                Some(info) => self.classify_info(Some(status.as_u16()), &info),
                None => by_status(status.as_u16()),
            }
        } else {
            by_status(status.as_u16())
        };
        facts.apply(outcome)
    }

    /// Classifies one SSE `data:` payload with its event metadata. Returns
    /// `Some` only when the frame reports an error: `event:error`, a
    /// `:HTTP_STATUS/` of 400 or more, a compatible `{"error":{...}}`, or a
    /// native top-level non-empty `code`. Any other frame, including one
    /// that merely mentions `"code"` or `"error"` (`"code":""`,
    /// `"error":null`, content text), returns `None`: the verdict stays
    /// open for a later frame of the same stream.
    ///
    /// How the crate reads a whole SSE body (in [`Classifier::classify`]
    /// and as it streams past the [body observer](crate::body::Observed)):
    /// each `data:` line on its own (DashScope sends one JSON frame per
    /// line), with the metadata of its event seen before it, and with the
    /// response's HTTP status when the event has no `:HTTP_STATUS/`; when
    /// an event ends whose metadata marks an error (`event:error`, or a
    /// status of 400 or more, also one that came after its data, or an
    /// event with no data) and none of its lines reported one, its status
    /// decides (transient without one). The first error found is the
    /// verdict.
    pub fn classify_event(&self, meta: &EventMeta, data: &[u8]) -> Option<Outcome> {
        let flagged = meta.is_error();
        if !flagged && !mentions_code_or_error(data) {
            return None;
        }
        match ErrorInfo::parse(data) {
            Some(info) if info.is_error() => Some(self.classify_info(meta.http_status, &info)),
            // The event says error but the payload does not say which: its
            // status decides (an error event without one is transient).
            _ if flagged => Some(match meta.http_status {
                Some(s) if s >= 400 => by_status(s),
                _ => Outcome::TRANSIENT,
            }),
            _ => None,
        }
    }

    /// Classifies an error returned instead of a response (connect failure,
    /// reset, timeout, or an error from another tower-qwen layer).
    ///
    /// Errors from this crate's layers carry their own outcome (a local rate
    /// limit is [`ThrottleCause::Local`], a timeout is transient), bare,
    /// boxed (once or twice) or anywhere in a `source()` chain; I/O and
    /// connection errors are transient; an error this crate does not know is
    /// treated as transient (teach it yours with [`Classifier::on_error`]).
    ///
    /// ```
    /// use tower_qwen::classify::Classifier;
    /// let err: tower_qwen::BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
    /// assert!(Classifier::new().classify_error(&err).is_transient());
    /// ```
    pub fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome {
        observe::classify_error_any(err)
    }

    /// The capped wait from `retry-after-ms` or `retry-after` (seconds or an
    /// HTTP-date). Garbage, negative and non-finite values are ignored.
    pub fn retry_after(&self, headers: &HeaderMap) -> Option<Duration> {
        self.retry_after_of(
            headers.get(&RETRY_AFTER_MS),
            headers.get(http::header::RETRY_AFTER),
        )
    }

    /// [`Classifier::retry_after`] from the two headers' (first) values.
    fn retry_after_of(
        &self,
        ms: Option<&http::HeaderValue>,
        secs: Option<&http::HeaderValue>,
    ) -> Option<Duration> {
        let parsed = ms
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_seconds(v, 1e-3))
            .or_else(|| {
                let v = secs?.to_str().ok()?;
                parse_seconds(v, 1.0).or_else(|| {
                    let at = httpdate::parse_http_date(v.trim()).ok()?;
                    Some(
                        at.duration_since(crate::time::system_now())
                            .unwrap_or(Duration::ZERO),
                    )
                })
            })?;
        Some(parsed.min(self.max_retry_after))
    }

    fn apply_headers(&self, outcome: Outcome, headers: &HeaderMap) -> Outcome {
        if outcome.is_success() {
            return outcome;
        }
        self.facts(headers).apply(outcome)
    }

    /// Reads the headers that adjust an outcome.
    pub(crate) fn facts(&self, headers: &HeaderMap) -> HeadFacts {
        self.head(headers).1
    }

    /// The body's kind and the headers that adjust an outcome, read in one
    /// pass over the headers (cheaper than a hashed lookup per name; each
    /// name's first value counts, as with `HeaderMap::get`).
    pub(crate) fn head(&self, headers: &HeaderMap) -> (ContentKind, HeadFacts) {
        use http::header::{CONTENT_TYPE, RETRY_AFTER};
        let (mut ct, mut ms, mut secs, mut should) = (None, None, None, None);
        for (name, value) in headers {
            let slot = if name == CONTENT_TYPE {
                &mut ct
            } else if name == RETRY_AFTER {
                &mut secs
            } else if name == RETRY_AFTER_MS {
                &mut ms
            } else if name == X_SHOULD_RETRY {
                &mut should
            } else {
                continue;
            };
            if slot.is_none() {
                *slot = Some(value);
            }
        }
        let should_retry = should
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .and_then(|v| {
                if v.eq_ignore_ascii_case("true") {
                    Some(true)
                } else if v.eq_ignore_ascii_case("false") {
                    Some(false)
                } else {
                    None
                }
            });
        let facts = HeadFacts {
            retry_after: self.retry_after_of(ms, secs),
            should_retry,
        };
        (ContentKind::of_value(ct), facts)
    }

    /// Reads a whole SSE body with the scanner and the rules the body
    /// observer applies as the stream passes (see
    /// [`Classifier::classify_event`]).
    fn classify_sse_body(&self, status: StatusCode, body: &[u8]) -> Outcome {
        let mut found = None;
        let mut verdict = SseVerdict::new(self, status.as_u16(), &mut found);
        let mut scanner = SseScanner::new();
        scanner.feed_to(body, &mut verdict);
        scanner.finish_to(&mut verdict);
        found.unwrap_or_else(|| by_status(status.as_u16()))
    }

    /// One `data:` line of a stream whose HTTP status is `status` (the
    /// status of an event without `:HTTP_STATUS/`).
    #[inline]
    pub(crate) fn classify_frame(
        &self,
        status: u16,
        meta: &EventMeta,
        data: &[u8],
    ) -> Option<Outcome> {
        let meta = EventMeta {
            http_status: meta.http_status.or(Some(status)),
            ..*meta
        };
        self.classify_event(&meta, data)
    }

    /// Classifies a parsed error body. `status` is the HTTP status (or the
    /// `:HTTP_STATUS/` of an SSE frame) when known.
    pub fn classify_info(&self, status: Option<u16>, info: &ErrorInfo) -> Outcome {
        if !info.is_error() {
            return status.map_or(Outcome::Success, by_status);
        }
        if let Some(o) = self.by_code(info) {
            return o;
        }
        match status {
            Some(s) if (200..300).contains(&s) => Outcome::Permanent {
                reason: PermanentReason::Other,
            },
            Some(s) => by_status(s),
            None => Outcome::TRANSIENT,
        }
    }

    fn by_code(&self, info: &ErrorInfo) -> Option<Outcome> {
        use PermanentReason as P;
        use ThrottleCause as T;
        let code = info.code.as_deref().unwrap_or("");
        let kind = info.kind.as_deref().unwrap_or("");
        let msg = info.message.as_deref().unwrap_or("").to_ascii_lowercase();
        let perm = |reason| Some(Outcome::Permanent { reason });
        let has =
            |needle: &str| code.eq_ignore_ascii_case(needle) || kind.eq_ignore_ascii_case(needle);
        let free = msg.contains("free allocated quota")
            || msg.contains("free tier")
            || msg.contains("free quota");
        let overloaded = info
            .nested_kind
            .as_deref()
            .is_some_and(|k| k.to_ascii_lowercase().contains("overload"))
            || msg.contains("engine is currently overloaded");

        if has("AllocationQuota.FreeTierOnly") {
            return perm(P::FreeQuotaExhausted);
        }
        if has("Throttling.AllocationQuota") || has("insufficient_quota") {
            return match (self.allocation_quota, free) {
                (AllocationQuotaPolicy::Throttled, _) => Some(Outcome::throttled(T::Tokens)),
                (AllocationQuotaPolicy::Permanent, true)
                | (AllocationQuotaPolicy::ByMessage, true) => perm(P::FreeQuotaExhausted),
                (AllocationQuotaPolicy::Permanent, false) => perm(P::QuotaExhausted),
                (AllocationQuotaPolicy::ByMessage, false) => Some(Outcome::throttled(T::Tokens)),
            };
        }
        if overloaded && (code.starts_with("Throttling") || code.is_empty()) {
            return Some(Outcome::throttled(T::Overloaded));
        }
        if has("Throttling.BurstRate")
            || has("limit_burst_rate")
            || msg.contains("rate increased too quickly")
        {
            return Some(Outcome::throttled(T::Burst));
        }
        if has("Throttling.RateQuota") || has("limit_requests") || has("rate_limit_exceeded") {
            return Some(Outcome::throttled(T::Requests));
        }
        if has("Throttling") || has("concurrency_limit_exceeded") || code.starts_with("Throttling.")
        {
            return Some(Outcome::throttled(T::Unknown));
        }
        if has("Arrearage") || code.contains("BillOverdue") || has("billing_hard_limit_reached") {
            return perm(P::Billing);
        }
        if has("InvalidApiKey") || has("invalid_api_key") || has("authentication_error") {
            return perm(P::Auth);
        }
        if code.starts_with("AccessDenied")
            || has("Model.AccessDenied")
            || has("model_access_denied")
            || has("permission_denied")
        {
            return perm(P::AccessDenied);
        }
        if has("Model.NotExist")
            || has("model_not_found")
            || has("ModelNotFound")
            // Native unknown models: `400 InvalidParameter` "Model not exist."
            || ((code.contains("InvalidParameter") || has("invalid_parameter_error"))
                && msg.starts_with("model not exist"))
        {
            return perm(P::ModelNotFound);
        }
        if has("DataInspectionFailed") || has("data_inspection_failed") || has("content_filter") {
            return perm(P::ContentFilter);
        }
        if has("request_too_large") || has("RequestTooLarge") {
            return perm(P::TooLarge);
        }
        if code.contains("InvalidParameter")
            || has("invalid_parameter_error")
            || has("invalid_parameter")
            || has("invalid_request_error")
            || has("context_length_exceeded")
            || has("InvalidURL")
            || code.starts_with("BadRequest")
        {
            if msg.contains("only support stream")
                || msg.contains("does not support http call")
                || msg.contains("only supports stream")
            {
                return perm(P::StreamOnly);
            }
            return perm(P::InvalidRequest);
        }
        if overloaded {
            return Some(Outcome::throttled(T::Overloaded));
        }
        if code.starts_with("InternalError")
            || has("ServiceUnavailable")
            || has("GatewayTimeout")
            || has("gateway_timeout")
            || has("RequestTimeOut")
            || has("Timeout")
            || has("internal_error")
            || has("server_error")
            || has("service_unavailable")
        {
            return Some(Outcome::TRANSIENT);
        }
        None
    }
}

// The headers read on every classified response, named once (a name given
// as `&str` is parsed again at each lookup).
static RETRY_AFTER_MS: http::HeaderName = http::HeaderName::from_static("retry-after-ms");
static X_SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

/// The verdict on an SSE event at its end, in a stream whose HTTP status
/// is `status`, when none of its `data:` lines reported an error: its
/// metadata (complete now: a status may come after the data, an event may
/// have no data) decides.
fn event_end_outcome(status: u16, meta: &EventMeta) -> Option<Outcome> {
    let status = meta.http_status.unwrap_or(status);
    if meta.error_event || status >= 400 {
        Some(if status >= 400 {
            by_status(status)
        } else {
            Outcome::TRANSIENT
        })
    } else {
        None
    }
}

/// The verdict of an SSE stream as its events pass, by the rules of
/// [`Classifier::classify_event`]: each `data:` line with its event's
/// metadata, then each event's end; the first error found is the verdict
/// (`found` stays `None` while the stream looks well). The one place this
/// rule lives: [`Classifier::classify`] reads a whole SSE body through it,
/// and the [body observer](crate::body::Observed) wraps it in its own sink
/// (which also reads the usage and the answer) as the stream passes.
pub(crate) struct SseVerdict<'a> {
    classifier: &'a Classifier,
    /// The status of an event without `:HTTP_STATUS/`.
    status: u16,
    found: &'a mut Option<Outcome>,
}

impl<'a> SseVerdict<'a> {
    /// Reads a stream whose HTTP status is `status` into `found`.
    pub(crate) fn new(
        classifier: &'a Classifier,
        status: u16,
        found: &'a mut Option<Outcome>,
    ) -> Self {
        Self {
            classifier,
            status,
            found,
        }
    }
}

impl Sink for SseVerdict<'_> {
    #[inline]
    fn data(&mut self, line: &[u8], meta: &EventMeta) {
        if self.found.is_none() {
            *self.found = self.classifier.classify_frame(self.status, meta, line);
        }
    }

    fn end(&mut self, meta: &EventMeta) {
        if self.found.is_none() {
            *self.found = event_end_outcome(self.status, meta);
        }
    }
}

/// Outcome from a status code alone.
pub(crate) fn by_status(status: u16) -> Outcome {
    use PermanentReason as P;
    match status {
        200..=299 => Outcome::Success,
        408 | 409 | 425 => Outcome::TRANSIENT,
        429 => Outcome::throttled(ThrottleCause::Unknown),
        401 => Outcome::Permanent { reason: P::Auth },
        403 => Outcome::Permanent {
            reason: P::AccessDenied,
        },
        404 => Outcome::Permanent {
            reason: P::NotFound,
        },
        413 => Outcome::Permanent {
            reason: P::TooLarge,
        },
        400..=499 => Outcome::Permanent {
            reason: P::InvalidRequest,
        },
        529 => Outcome::throttled(ThrottleCause::Overloaded),
        500..=599 => Outcome::TRANSIENT,
        _ => Outcome::Permanent { reason: P::Other },
    }
}

/// The headers that adjust an outcome, read once per response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct HeadFacts {
    pub(crate) retry_after: Option<Duration>,
    pub(crate) should_retry: Option<bool>,
}

impl HeadFacts {
    /// Applies `x-should-retry` and the server's wait to `outcome`.
    pub(crate) fn apply(self, outcome: Outcome) -> Outcome {
        let outcome = match self.should_retry {
            Some(false) if outcome.is_retryable() => Outcome::Permanent {
                reason: PermanentReason::Declined,
            },
            Some(true) if outcome.is_permanent() => Outcome::TRANSIENT,
            _ => outcome,
        };
        outcome.with_retry_after(self.retry_after)
    }
}

/// The kind of a body, from its `content-type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ContentKind {
    Json,
    EventStream,
    /// No `content-type` header.
    Untyped,
    Other,
}

impl ContentKind {
    /// Reads `content-type` once, without allocating.
    pub(crate) fn of(headers: &HeaderMap) -> ContentKind {
        Self::of_value(headers.get(http::header::CONTENT_TYPE))
    }

    /// The kind of a `content-type` value (`None`: no such header).
    pub(crate) fn of_value(ct: Option<&http::HeaderValue>) -> ContentKind {
        let Some(ct) = ct else {
            return ContentKind::Untyped;
        };
        let ct = ct.as_bytes();
        let essence = ct[..memchr::memchr(b';', ct).unwrap_or(ct.len())].trim_ascii();
        if essence.eq_ignore_ascii_case(b"text/event-stream") {
            ContentKind::EventStream
        } else if essence.eq_ignore_ascii_case(b"application/json")
            || (essence.len() >= 5 && essence[essence.len() - 5..].eq_ignore_ascii_case(b"+json"))
        {
            ContentKind::Json
        } else {
            ContentKind::Other
        }
    }
}

/// Whether a response's content type is `text/event-stream`.
pub fn is_event_stream(headers: &HeaderMap) -> bool {
    ContentKind::of(headers) == ContentKind::EventStream
}

/// Whether `json` mentions a `"code"` or `"error"` key (or string): the
/// only bodies worth parsing for an error. The searchers are built once.
// Equivalent mutant `true`: a body without either key parses to no error.
pub(crate) fn mentions_code_or_error(json: &[u8]) -> bool {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static CODE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"code\""));
    static ERROR: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"error\""));
    CODE.find(json).is_some() || ERROR.find(json).is_some()
}

fn looks_like_sse(body: &[u8]) -> bool {
    body.starts_with(b"id:")
        || body.starts_with(b"event:")
        || body.starts_with(b"data:")
        || body.starts_with(b":")
}

fn parse_seconds(v: &str, unit: f64) -> Option<Duration> {
    let x: f64 = v.trim().parse().ok()?;
    if !x.is_finite() || x < 0.0 {
        return None;
    }
    Duration::try_from_secs_f64(x * unit)
        .ok()
        .or(Some(Duration::MAX))
}

#[cfg(test)]
mod tests;
