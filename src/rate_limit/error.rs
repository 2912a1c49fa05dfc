//! Errors of the rate limiter.

use std::fmt;
use std::time::Duration;

use crate::classify::{Outcome, ThrottleCause};

/// Which quota refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dimension {
    Requests,
    Tokens,
}

/// The local rate limit refused a call: in reject mode because the quota
/// had no room now, in wait mode because the wait would exceed the maximum.
/// Nothing was sent upstream and nothing was reserved.
///
/// The classifier reads it as
/// `Outcome::Throttled { cause: ThrottleCause::Local, retry_after }`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    retry_after: Duration,
    dimension: Dimension,
}

impl RateLimited {
    pub(crate) fn new(retry_after: Duration, dimension: Dimension) -> Self {
        Self {
            retry_after,
            dimension,
        }
    }

    /// How long until the call would be admitted (exact, if nothing else
    /// is admitted meanwhile).
    pub fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }

    /// Whether the request quota refused it.
    pub fn is_requests(&self) -> bool {
        self.dimension == Dimension::Requests
    }

    /// Whether the token quota refused it.
    pub fn is_tokens(&self) -> bool {
        self.dimension == Dimension::Tokens
    }
}

impl fmt::Debug for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimited")
            .field("retry_after", &self.retry_after)
            .field("dimension", &self.dimension)
            .finish()
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.dimension {
            Dimension::Requests => "request",
            Dimension::Tokens => "token",
        };
        write!(
            f,
            "local {what} rate limit reached; retry after {:.3}s",
            self.retry_after.as_secs_f64()
        )
    }
}

impl std::error::Error for RateLimited {}

impl crate::classify::KnownError for RateLimited {
    fn outcome(&self) -> Outcome {
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            retry_after: Some(self.retry_after),
        }
    }
}

/// A quota that cannot be built (see [`Quota::new`](super::Quota::new)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidQuota {
    reason: &'static str,
}

impl InvalidQuota {
    pub(crate) const fn new(reason: &'static str) -> Self {
        Self { reason }
    }
}

impl fmt::Display for InvalidQuota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid quota: {}", self.reason)
    }
}

impl std::error::Error for InvalidQuota {}

impl crate::classify::KnownError for InvalidQuota {
    fn outcome(&self) -> Outcome {
        Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}
