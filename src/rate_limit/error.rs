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

/// A token budget ([`Budget`](super::Budget), or
/// [`RedisBudget`](crate::redis::RedisBudget)) has no room for the call's
/// estimate in its current window (a UTC day or month). Nothing was sent
/// and nothing was charged; `retry_after` is the time to the window's
/// reset.
///
/// The classifier reads it as
/// `Outcome::Throttled { cause: ThrottleCause::Local, retry_after }`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct BudgetExceeded {
    period: super::Period,
    limit: u64,
    used: u64,
    retry_after: Duration,
}

impl BudgetExceeded {
    pub(crate) fn new(period: super::Period, limit: u64, used: u64, retry_after: Duration) -> Self {
        Self {
            period,
            limit,
            used,
            retry_after,
        }
    }

    /// The time until the window resets.
    pub fn retry_after(&self) -> Option<Duration> {
        Some(self.retry_after)
    }

    /// Which window refused: a day or a month.
    pub fn period(&self) -> super::Period {
        self.period
    }

    /// Whether the daily budget refused it.
    pub fn is_daily(&self) -> bool {
        self.period == super::Period::Day
    }

    /// Whether the monthly budget refused it.
    pub fn is_monthly(&self) -> bool {
        self.period == super::Period::Month
    }

    /// The budget of the window, in tokens.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The tokens left in the window (fewer than the call's estimate).
    pub fn remaining(&self) -> u64 {
        self.limit.saturating_sub(self.used)
    }
}

impl fmt::Debug for BudgetExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetExceeded")
            .field("period", &self.period)
            .field("limit", &self.limit)
            .field("used", &self.used)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for BudgetExceeded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.period {
            super::Period::Day => "daily",
            super::Period::Month => "monthly",
        };
        write!(
            f,
            "{what} token budget of {} tokens exhausted ({} left); resets in {}s",
            self.limit,
            self.remaining(),
            self.retry_after.as_secs() + u64::from(self.retry_after.subsec_nanos() > 0)
        )
    }
}

impl std::error::Error for BudgetExceeded {}

impl crate::classify::KnownError for BudgetExceeded {
    fn outcome(&self) -> Outcome {
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            retry_after: Some(self.retry_after),
        }
    }
}
