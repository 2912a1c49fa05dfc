//! Errors of the [`Timeout`](super::Timeout) layer. Each is transient to the
//! [classifier](crate::classify), so a retry layer further out may retry it.

use std::fmt;
use std::time::Duration;

use crate::classify::Outcome;

/// No response headers arrived within the header timeout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderTimeout {
    after: Duration,
}

/// The response body sent no frame for the idle timeout (a stalled stream).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdleTimeout {
    after: Duration,
}

/// The request's total deadline passed (before the headers, or while the
/// body was still coming).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadlineExceeded {
    during_body: bool,
}

impl HeaderTimeout {
    pub(crate) fn new(after: Duration) -> Self {
        Self { after }
    }

    /// The configured header timeout.
    pub fn timeout(&self) -> Duration {
        self.after
    }
}

impl IdleTimeout {
    pub(crate) fn new(after: Duration) -> Self {
        Self { after }
    }

    /// The configured idle timeout.
    pub fn timeout(&self) -> Duration {
        self.after
    }
}

impl DeadlineExceeded {
    pub(crate) fn new(during_body: bool) -> Self {
        Self { during_body }
    }

    /// Whether the deadline passed while the response body was being read
    /// (rather than before the headers arrived).
    pub fn is_during_body(&self) -> bool {
        self.during_body
    }
}

impl fmt::Display for HeaderTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "no response headers within {:?}", self.after)
    }
}

impl fmt::Display for IdleTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "response body idle for {:?}", self.after)
    }
}

impl fmt::Display for DeadlineExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.during_body {
            f.write_str("request deadline exceeded while reading the response body")
        } else {
            f.write_str("request deadline exceeded before the response headers")
        }
    }
}

impl std::error::Error for HeaderTimeout {}
impl std::error::Error for IdleTimeout {}
impl std::error::Error for DeadlineExceeded {}

impl crate::classify::KnownError for HeaderTimeout {
    fn outcome(&self) -> Outcome {
        Outcome::TRANSIENT
    }
}

impl crate::classify::KnownError for IdleTimeout {
    fn outcome(&self) -> Outcome {
        Outcome::TRANSIENT
    }
}

impl crate::classify::KnownError for DeadlineExceeded {
    fn outcome(&self) -> Outcome {
        Outcome::TRANSIENT
    }
}
