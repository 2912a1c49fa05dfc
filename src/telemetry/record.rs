//! One call's telemetry: what is known at the call, and what the body's
//! end adds. The tracing span is always kept; the OpenTelemetry span and
//! metrics only with the `otel` feature and [`GenAiOtel`](super::otel::GenAiOtel).

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tracing::field::Empty;

use super::GenAiTraceLayer;
use crate::body::{Answer, BodyEnd, EndKind, OnEnd};
use crate::classify::{Outcome, PermanentReason, ThrottleCause};
use crate::request::{Endpoint, RequestInfo};
use crate::time::{self, Instant};
use crate::usage::Usage;

/// `gen_ai.provider.name` for DashScope. The GenAI conventions list no
/// value for it; `dashscope` is what Alibaba's own Spring AI integration
/// reports.
pub const PROVIDER: &str = "dashscope";

/// The GenAI operation of an endpoint (`gen_ai.operation.name`), or `None`
/// when the endpoint is not a GenAI operation (task polls, model lists...).
pub fn operation(endpoint: Endpoint) -> Option<&'static str> {
    if endpoint.is_generation() {
        Some("chat")
    } else if endpoint.is_embedding() {
        Some("embeddings")
    } else {
        None
    }
}

/// `error.type` of a call that did not succeed: a short, stable name of
/// its [`Outcome`] (`throttled.requests`, `transient`, `content_filter`,
/// ...), `cancelled` for a body the caller dropped before its end, `None`
/// for a success.
pub fn error_type(outcome: &Outcome, kind: EndKind) -> Option<&'static str> {
    Some(match *outcome {
        Outcome::Success if kind == EndKind::Dropped => "cancelled",
        Outcome::Success => return None,
        Outcome::Throttled { cause, .. } => match cause {
            ThrottleCause::Requests => "throttled.requests",
            ThrottleCause::Tokens => "throttled.tokens",
            ThrottleCause::Burst => "throttled.burst",
            ThrottleCause::Overloaded => "throttled.overloaded",
            ThrottleCause::Local => "throttled.local",
            ThrottleCause::Unknown => "throttled",
        },
        Outcome::Transient { .. } => "transient",
        Outcome::Permanent { reason } => match reason {
            PermanentReason::Auth => "auth",
            PermanentReason::AccessDenied => "access_denied",
            PermanentReason::Billing => "billing",
            PermanentReason::FreeQuotaExhausted => "free_quota_exhausted",
            PermanentReason::QuotaExhausted => "quota_exhausted",
            PermanentReason::ContentFilter => "content_filter",
            PermanentReason::InvalidRequest => "invalid_request",
            PermanentReason::StreamOnly => "stream_only",
            PermanentReason::ModelNotFound => "model_not_found",
            PermanentReason::NotFound => "not_found",
            PermanentReason::TooLarge => "too_large",
            PermanentReason::Declined => "declined",
            PermanentReason::InvalidConfig => "invalid_config",
            PermanentReason::Other => "other",
        },
    })
}

/// What the call says about itself, fixed when it starts.
#[derive(Debug)]
pub(crate) struct Call {
    // Read by the OpenTelemetry side only.
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) operation: &'static str,
    pub(crate) model: Option<Arc<str>>,
    pub(crate) max_tokens: Option<u32>,
    pub(crate) stream: bool,
    pub(crate) embedding: bool,
    pub(crate) server: Option<(Arc<str>, u16)>,
    /// Who made the call ([`GenAiTraceLayer::caller`]).
    pub(crate) caller: Option<Arc<str>>,
    pub(crate) start: Instant,
}

/// What the end of the call adds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct End {
    pub(crate) error_type: Option<&'static str>,
    pub(crate) input_tokens: Option<u32>,
    pub(crate) output_tokens: Option<u32>,
    pub(crate) answer: Answer,
    // Read by the OpenTelemetry side only (a `tracing` subscriber times
    // the span itself).
    #[cfg_attr(not(feature = "otel"), allow(dead_code))]
    pub(crate) duration: Duration,
    /// Streamed calls only: from the call to the first body frame.
    pub(crate) first_chunk: Option<Duration>,
}

impl End {
    fn of(call: &Call, end: &BodyEnd, now: Instant) -> Self {
        let (input_tokens, output_tokens) = tokens(call, end.usage);
        Self {
            error_type: error_type(&end.outcome, end.kind),
            input_tokens,
            output_tokens,
            answer: end.answer,
            duration: now.saturating_duration_since(call.start),
            first_chunk: end
                .first_frame_at
                .filter(|_| call.stream)
                .map(|t| t.saturating_duration_since(call.start)),
        }
    }
}

/// Input and output tokens as the conventions count them: embeddings have
/// no output, and native embeddings report only a total, which is input.
fn tokens(call: &Call, usage: Option<Usage>) -> (Option<u32>, Option<u32>) {
    let Some(u) = usage else {
        return (None, None);
    };
    if call.embedding {
        let input = if u.input_tokens > 0 {
            u.input_tokens
        } else {
            u.total()
        };
        (Some(input), None)
    } else {
        (Some(u.input_tokens), Some(u.output_tokens))
    }
}

/// The end-of-body hook of [`GenAiTrace`](super::GenAiTrace): records the
/// call's span fields and metrics when its response body ends, fails or is
/// dropped (or at once when the call failed without a response).
pub struct Record {
    live: Option<Box<Live>>,
}

struct Live {
    call: Call,
    span: tracing::Span,
    #[cfg(feature = "otel")]
    otel: Option<super::otel::Live>,
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("call", &self.live.as_ref().map(|l| &l.call))
            .finish()
    }
}

impl Record {
    /// Nothing to record.
    pub(crate) fn none() -> Self {
        Self { live: None }
    }

    /// Starts the call's span(s); nothing for a request that is not a GenAI
    /// operation.
    pub(crate) fn start<B>(layer: &GenAiTraceLayer, info: &RequestInfo, req: &Request<B>) -> Self {
        let Some(operation) = operation(info.endpoint) else {
            return Self::none();
        };
        let uri = req.uri();
        let server = match uri.host() {
            Some(h) => {
                let port = uri.port_u16().unwrap_or_else(|| match uri.scheme_str() {
                    Some("http") => 80,
                    _ => 443,
                });
                Some((Arc::from(h), port))
            }
            None => layer.server.clone(),
        };
        let call = Call {
            operation,
            model: info.model.clone(),
            max_tokens: info.max_output_tokens,
            stream: info.stream,
            embedding: info.endpoint.is_embedding(),
            server,
            caller: layer.caller.and_then(|f| f(req.extensions())),
            start: time::now(),
        };
        let model = call.model.as_deref().unwrap_or("");
        let span = tracing::info_span!(
            "gen_ai",
            otel.name = Empty,
            otel.kind = "client",
            otel.status_code = Empty,
            gen_ai.operation.name = operation,
            gen_ai.provider.name = PROVIDER,
            gen_ai.request.model = model,
            gen_ai.request.max_tokens = call.max_tokens,
            server.address = call.server.as_ref().map(|s| &*s.0),
            server.port = call.server.as_ref().map(|s| s.1),
            gen_ai.response.model = Empty,
            gen_ai.response.finish_reasons = Empty,
            gen_ai.response.time_to_first_chunk = Empty,
            gen_ai.usage.input_tokens = Empty,
            gen_ai.usage.output_tokens = Empty,
            error.type = Empty,
            tower_qwen.client_key.name = call.caller.as_deref(),
        );
        if !span.is_disabled() {
            span.record("otel.name", format_args!("{operation} {model}"));
        }
        #[cfg(feature = "otel")]
        let otel = layer.otel.as_ref().map(|o| o.start(&call, req.headers()));
        #[cfg(not(feature = "otel"))]
        let _ = layer;
        Self {
            live: Some(Box::new(Live {
                call,
                span,
                #[cfg(feature = "otel")]
                otel,
            })),
        }
    }

    /// Whether this call is traced (a GenAI operation).
    pub(crate) fn is_live(&self) -> bool {
        self.live.is_some()
    }

    /// Whether the call streams (time to first chunk is recorded then).
    pub(crate) fn streams(&self) -> bool {
        self.live.as_ref().is_some_and(|l| l.call.stream)
    }

    /// The call's tracing span (disabled for a call that is not traced).
    pub(crate) fn span(&self) -> tracing::Span {
        self.live
            .as_ref()
            .map_or_else(tracing::Span::none, |l| l.span.clone())
    }
}

impl OnEnd for Record {
    fn on_end(self, end: BodyEnd) {
        let Some(live) = self.live else {
            return;
        };
        let Live {
            call,
            span,
            #[cfg(feature = "otel")]
            otel,
        } = *live;
        let end = End::of(&call, &end, time::now());
        if !span.is_disabled() {
            if let Some(model) = end.answer.model() {
                span.record("gen_ai.response.model", model);
            }
            let mut reasons = end.answer.finish_reasons();
            if let Some(first) = reasons.next() {
                let mut joined = String::from(first.as_str());
                for r in reasons {
                    joined.push(',');
                    joined.push_str(r.as_str());
                }
                span.record("gen_ai.response.finish_reasons", joined);
            }
            if let Some(t) = end.first_chunk {
                span.record("gen_ai.response.time_to_first_chunk", t.as_secs_f64());
            }
            if let Some(n) = end.input_tokens {
                span.record("gen_ai.usage.input_tokens", n);
            }
            if let Some(n) = end.output_tokens {
                span.record("gen_ai.usage.output_tokens", n);
            }
            if let Some(e) = end.error_type {
                span.record("error.type", e);
                span.record("otel.status_code", "ERROR");
            }
        }
        #[cfg(feature = "otel")]
        if let Some(otel) = otel {
            otel.end(&call, &end);
        }
        // The span closes here, at the body's end.
        drop(span);
    }
}
