//! Errors of the distributed limiter.
//!
//! A call refused for lack of quota fails with the rate limiter's own
//! [`RateLimited`](crate::rate_limit::error::RateLimited) (the decision was
//! made in Redis, or by the local fallback); [`StoreUnavailable`] is the
//! fail-closed answer when Redis cannot decide.

use std::fmt;
use std::time::Duration;

use crate::classify::Outcome;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Timeout,
    Error,
    Down,
}

/// The limiter is configured to fail closed
/// ([`FailurePolicy::fail_closed`](super::FailurePolicy::fail_closed)) and
/// Redis could not decide: it timed out, failed, or is known to be down
/// and not due for a probe yet. Nothing was sent upstream.
///
/// The classifier reads it as `Outcome::Transient { retry_after }` with the
/// time until the next probe of Redis.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StoreUnavailable {
    kind: Kind,
    retry_after: Duration,
}

impl StoreUnavailable {
    pub(crate) fn timeout(retry_after: Duration) -> Self {
        Self {
            kind: Kind::Timeout,
            retry_after,
        }
    }

    pub(crate) fn error(retry_after: Duration) -> Self {
        Self {
            kind: Kind::Error,
            retry_after,
        }
    }

    pub(crate) fn down(retry_after: Duration) -> Self {
        Self {
            kind: Kind::Down,
            retry_after,
        }
    }

    /// When Redis will be tried again.
    pub fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }

    /// Whether this call's Redis request timed out.
    pub fn is_timeout(&self) -> bool {
        self.kind == Kind::Timeout
    }

    /// Whether Redis was already known to be down (no request was made).
    pub fn is_down(&self) -> bool {
        self.kind == Kind::Down
    }
}

impl fmt::Debug for StoreUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreUnavailable")
            .field("kind", &self.kind)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for StoreUnavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.kind {
            Kind::Timeout => "redis timed out",
            Kind::Error => "redis failed",
            Kind::Down => "redis is down",
        };
        write!(
            f,
            "distributed rate limit unavailable ({why}); failing closed"
        )
    }
}

impl std::error::Error for StoreUnavailable {}

impl crate::classify::KnownError for StoreUnavailable {
    fn outcome(&self) -> Outcome {
        Outcome::Transient {
            retry_after: Some(self.retry_after),
        }
    }
}
