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
