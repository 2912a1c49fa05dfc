//! Errors of the concurrency limit.

use std::fmt;
use std::time::Duration;

use crate::classify::{Outcome, ThrottleCause};

/// The concurrency limit shed the call: its wait queue was full, or the call
/// waited longer than the configured maximum. Nothing was sent upstream.
///
/// Classified as [`Outcome::Throttled`] with [`ThrottleCause::Local`], so a
/// retry layer further out may try again later and the circuit breaker does
/// not count it as an upstream failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overloaded {
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    QueueFull,
    Waited(Duration),
}

impl Overloaded {
    pub(crate) const fn queue_full() -> Self {
        Self {
            kind: Kind::QueueFull,
        }
    }

    pub(crate) const fn waited(d: Duration) -> Self {
        Self {
            kind: Kind::Waited(d),
        }
    }

    /// Whether the wait queue was full.
    pub fn is_queue_full(&self) -> bool {
        self.kind == Kind::QueueFull
    }

    /// Whether the call waited the maximum wait without getting a permit.
    pub fn is_timeout(&self) -> bool {
        matches!(self.kind, Kind::Waited(_))
    }

    /// A suggested wait before trying again: none is known (permits free up
    /// when calls end), so this is always `None`; it exists so every
    /// tower-qwen error that implies waiting can be asked.
    pub fn retry_after(&self) -> Option<Duration> {
        None
    }
}

impl fmt::Display for Overloaded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            Kind::QueueFull => f.write_str("concurrency limit reached and its wait queue is full"),
            Kind::Waited(d) => write!(f, "no concurrency permit within the maximum wait of {d:?}"),
        }
    }
}

impl std::error::Error for Overloaded {}

impl crate::classify::KnownError for Overloaded {
    fn outcome(&self) -> Outcome {
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            retry_after: None,
        }
    }
}

/// An invalid adaptive-limit configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidLimit {
    what: &'static str,
}

impl InvalidLimit {
    pub(crate) const fn new(what: &'static str) -> Self {
        Self { what }
    }
}

impl fmt::Display for InvalidLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid concurrency limit: {}", self.what)
    }
}

impl std::error::Error for InvalidLimit {}

impl crate::classify::KnownError for InvalidLimit {
    fn outcome(&self) -> Outcome {
        Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}
