//! Errors of the account pool.

use std::fmt;
use std::time::Duration;

use crate::classify::{Outcome, PermanentReason, ThrottleCause};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    RateLimited,
    CircuitOpen,
    UnknownAccount,
}

/// No account of the pool could take the call; nothing was sent and
/// nothing was reserved.
///
/// Either every account's circuit refuses calls ([`Exhausted::is_circuit_open`]),
/// or every account's rate limit would make the call wait longer than the
/// pool allows ([`PoolBuilder::max_wait`](super::PoolBuilder::max_wait), or the
/// request's [`Deadline`](crate::time::Deadline)) ([`Exhausted::is_rate_limited`]).
///
/// The classifier reads the first as `Transient { retry_after }` (like the
/// breaker's `CircuitOpen`) and the second as
/// `Throttled { cause: Local, retry_after }` (like the limiter's
/// `RateLimited`), so a retry layer outside waits `retry_after` and a
/// fallback layer may move the request to another model at once.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Exhausted {
    kind: Kind,
    retry_after: Option<Duration>,
}

impl Exhausted {
    pub(crate) const fn rate_limited(retry_after: Duration) -> Self {
        Self {
            kind: Kind::RateLimited,
            retry_after: Some(retry_after),
        }
    }

    pub(crate) const fn circuit_open(retry_after: Option<Duration>) -> Self {
        Self {
            kind: Kind::CircuitOpen,
            retry_after,
        }
    }

    pub(crate) const fn unknown_account() -> Self {
        Self {
            kind: Kind::UnknownAccount,
            retry_after: None,
        }
    }

    /// How long until some account could take the call: the shortest
    /// estimated rate-limit wait, or the time until the first open circuit
    /// probes (`None` when no open circuit knows, e.g. all forced open or
    /// half-open).
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// Whether every account's rate limit would make the call wait too
    /// long.
    pub fn is_rate_limited(&self) -> bool {
        self.kind == Kind::RateLimited
    }

    /// Whether every account's circuit refuses calls (or, for a request
    /// [`Pinned`](super::Pinned) to one account, its circuit does).
    pub fn is_circuit_open(&self) -> bool {
        self.kind == Kind::CircuitOpen
    }

    /// Whether the request was [`Pinned`](super::Pinned) to an account the
    /// pool does not have.
    pub fn is_unknown_account(&self) -> bool {
        self.kind == Kind::UnknownAccount
    }
}

impl fmt::Debug for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Exhausted")
            .field("kind", &self.kind)
            .field("retry_after", &self.retry_after)
            .finish()
    }
}

impl fmt::Display for Exhausted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.kind {
            Kind::RateLimited => "every pool account is rate limited",
            Kind::CircuitOpen => "every pool account's circuit is open",
            Kind::UnknownAccount => "the request is pinned to an account the pool does not have",
        })?;
        if let Some(d) = self.retry_after {
            write!(f, "; retry after {:.3}s", d.as_secs_f64())?;
        }
        Ok(())
    }
}

impl std::error::Error for Exhausted {}

impl crate::classify::KnownError for Exhausted {
    fn outcome(&self) -> Outcome {
        match self.kind {
            Kind::RateLimited => Outcome::Throttled {
                cause: ThrottleCause::Local,
                retry_after: self.retry_after,
            },
            Kind::CircuitOpen => Outcome::Transient {
                retry_after: self.retry_after,
            },
            Kind::UnknownAccount => Outcome::Permanent {
                reason: PermanentReason::InvalidRequest,
            },
        }
    }
}

/// A pool or account that cannot be built. It never contains an API key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InvalidConfig {
    what: &'static str,
}

impl InvalidConfig {
    pub(crate) const fn new(what: &'static str) -> Self {
        Self { what }
    }
}

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid account pool configuration: {}", self.what)
    }
}

impl std::error::Error for InvalidConfig {}

impl crate::classify::KnownError for InvalidConfig {
    fn outcome(&self) -> Outcome {
        Outcome::Permanent {
            reason: crate::classify::PermanentReason::InvalidConfig,
        }
    }
}
