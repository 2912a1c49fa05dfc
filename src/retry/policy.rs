//! Which outcomes are retried, and how often.

use std::fmt;

use crate::classify::Outcome;

/// Which outcomes the [`Retry`](super::Retry) layer retries, and how many
/// times.
///
/// `Permanent` outcomes (bad key, arrears, content filter, invalid request,
/// free quota gone...) and successes are never retried, whatever the
/// settings. See the [module docs](super) for an example.
///
/// # Default
///
/// Up to 2 retries (3 attempts, like the official DashScope SDK 2.x), of
/// throttled and transient outcomes.
#[derive(Clone, Copy)]
pub struct Policy {
    max_retries: u32,
    throttled: bool,
    transient: bool,
    predicate: Option<fn(&Outcome) -> bool>,
}

impl Policy {
    /// The default policy.
    pub const fn new() -> Self {
        Self {
            max_retries: 2,
            throttled: true,
            transient: true,
            predicate: None,
        }
    }

    /// At most `n` retries after the first attempt; `0` turns retrying off.
    /// Default is 2.
    pub const fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// Whether throttled outcomes (429s, throttling SSE error frames, this
    /// crate's local rate limit) are retried. Default is `true`.
    pub const fn retry_throttled(mut self, yes: bool) -> Self {
        self.throttled = yes;
        self
    }

    /// Whether transient outcomes (5xx, timeouts, connection errors) are
    /// retried. Default is `true`.
    pub const fn retry_transient(mut self, yes: bool) -> Self {
        self.transient = yes;
        self
    }

    /// Decides with `f` which non-permanent failures are retried (replacing
    /// [`retry_throttled`](Self::retry_throttled) and
    /// [`retry_transient`](Self::retry_transient)). Permanent failures are
    /// still never retried. Default is none.
    pub const fn retry_if(mut self, f: fn(&Outcome) -> bool) -> Self {
        self.predicate = Some(f);
        self
    }

    /// The configured maximum number of retries.
    pub const fn get_max_retries(&self) -> u32 {
        self.max_retries
    }

    /// Whether `outcome` is worth another attempt (ignoring the attempt
    /// count).
    pub fn retries(&self, outcome: &Outcome) -> bool {
        if !outcome.is_retryable() {
            return false;
        }
        match self.predicate {
            Some(f) => f(outcome),
            None => {
                (self.throttled && outcome.is_throttled())
                    || (self.transient && outcome.is_transient())
            }
        }
    }
}

impl Default for Policy {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("max_retries", &self.max_retries)
            .field("throttled", &self.throttled)
            .field("transient", &self.transient)
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{PermanentReason, ThrottleCause};

    #[test]
    fn defaults_and_switches() {
        let p = Policy::default();
        assert_eq!(p.get_max_retries(), 2);
        let throttled = Outcome::throttled(ThrottleCause::Requests);
        let permanent = Outcome::Permanent {
            reason: PermanentReason::Auth,
        };
        assert!(p.retries(&throttled));
        assert!(p.retries(&Outcome::TRANSIENT));
        assert!(!p.retries(&permanent));
        assert!(!p.retries(&Outcome::Success));
        let p = p.retry_throttled(false);
        assert!(!p.retries(&throttled) && p.retries(&Outcome::TRANSIENT));
        let p = Policy::new().retry_transient(false);
        assert!(p.retries(&throttled) && !p.retries(&Outcome::TRANSIENT));
        // A predicate can never make a permanent failure retryable.
        let p = Policy::new().retry_if(|_| true);
        assert!(!p.retries(&permanent));
        let p = Policy::new().retry_if(|o| o.throttle_cause() == Some(ThrottleCause::Burst));
        assert!(p.retries(&Outcome::throttled(ThrottleCause::Burst)));
        assert!(!p.retries(&throttled));
    }
}
