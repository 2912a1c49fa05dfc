//! Errors of the gateway.

use std::fmt;
use std::time::Duration;

use http::HeaderMap;

use crate::classify::{Outcome, ThrottleCause};

/// A configuration that cannot be used. It names every bad field (and the
/// environment variable it came from, when it did), never a key.
///
/// ```
/// use tower_qwen::gateway::GatewayConfig;
///
/// let err = GatewayConfig::from_toml(r#"
///     [server]
///     listen = "not an address"
///     [limits]
///     capacity = 0
/// "#).unwrap_err();
/// let fields: Vec<&str> = err.fields().collect();
/// assert!(fields.contains(&"server.listen"));
/// assert!(fields.contains(&"limits.capacity"));
/// assert!(fields.contains(&"accounts") && fields.contains(&"keys"));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    problems: Vec<(String, String)>,
}

impl ConfigError {
    pub(crate) fn one(field: impl Into<String>, why: impl Into<String>) -> Self {
        Self {
            problems: vec![(field.into(), why.into())],
        }
    }

    pub(crate) fn many(problems: Vec<(String, String)>) -> Self {
        Self { problems }
    }

    /// The bad fields, in the order they were found (`server.listen`,
    /// `keys[2].accounts[0]`, ...).
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.problems.iter().map(|(f, _)| f.as_str())
    }

    /// Each bad field with what is wrong with it.
    pub fn problems(&self) -> impl Iterator<Item = (&str, &str)> {
        self.problems.iter().map(|(f, w)| (f.as_str(), w.as_str()))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid gateway configuration")?;
        for (field, why) in &self.problems {
            write!(f, "\n  {field}: {why}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl crate::classify::KnownError for ConfigError {
    fn outcome(&self) -> Outcome {
        Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}

/// Every upstream account of a client key's pool refused a call locally:
/// its (account, model) request or token budget has no room now. Nothing
/// was sent. Carries the wait and the `x-ratelimit-*` headers of the
/// account that frees up first.
#[derive(Clone, Debug)]
pub(crate) struct UpstreamBusy {
    pub(crate) retry_after: Duration,
    pub(crate) tokens: bool,
    pub(crate) headers: HeaderMap,
}

impl fmt::Display for UpstreamBusy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "upstream {} budget exhausted; retry after {:.3}s",
            if self.tokens { "token" } else { "request" },
            self.retry_after.as_secs_f64()
        )
    }
}

impl std::error::Error for UpstreamBusy {}

impl crate::classify::KnownError for UpstreamBusy {
    fn outcome(&self) -> Outcome {
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            retry_after: Some(self.retry_after),
        }
    }
}

/// The shared rate limits could not decide (Redis failed or is down) and
/// the configured policy fails closed. Nothing was sent. Classified as a
/// local throttle, so that the degrade breaker (which this is no upstream
/// failure for) ignores it and a retry waits `retry_after`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LimitsUnavailable {
    pub(crate) retry_after: Duration,
}

impl fmt::Display for LimitsUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "shared rate limits unavailable; retry after {:.3}s",
            self.retry_after.as_secs_f64()
        )
    }
}

impl std::error::Error for LimitsUnavailable {}

impl crate::classify::KnownError for LimitsUnavailable {
    fn outcome(&self) -> Outcome {
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            retry_after: Some(self.retry_after),
        }
    }
}

/// A refusal the stack made before anything left (the body), in the
/// handler's terms.
#[derive(Clone, Debug)]
pub(crate) struct Refused {
    pub(crate) refusal: super::respond::Refusal,
    /// What is wrong, when the refusal's own words are not enough.
    pub(crate) message: Option<String>,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request refused: {}", self.refusal.label())
    }
}

impl std::error::Error for Refused {}

impl crate::classify::KnownError for Refused {
    fn outcome(&self) -> Outcome {
        Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidRequest,
        }
    }
}

/// An error of the call after the body was read: with what was read, for
/// the handler's log lines.
#[derive(Clone, Debug)]
pub(crate) struct Failed {
    pub(crate) info: std::sync::Arc<crate::request::RequestInfo>,
    pub(crate) source: std::sync::Arc<dyn std::error::Error + Send + Sync>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)
    }
}

impl std::error::Error for Failed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

impl crate::classify::KnownError for Failed {
    fn outcome(&self) -> Outcome {
        crate::classify::Classifier::new().classify_error(&self.source)
    }
}
/// A refusal for the registry's sample.
#[cfg(test)]
pub(crate) fn sample_refusal() -> super::respond::Refusal {
    super::respond::Refusal::BadBody
}
