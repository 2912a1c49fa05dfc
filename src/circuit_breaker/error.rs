//! Errors of the circuit breaker.

use std::fmt;
use std::time::Duration;

use crate::classify::Outcome;

use super::state::State;

/// The circuit is open (or degraded and over its rate, or half-open with
/// every probe slot taken): the call failed fast and was not sent.
///
/// Classified as [`Outcome::Transient`] with [`CircuitOpen::retry_after`]
/// as its wait: a retry layer outside waits until the circuit probes again
/// (if its deadline allows) instead of hammering a broken upstream, and a
/// fallback layer may switch to another model at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CircuitOpen {
    retry_after: Option<Duration>,
    state: State,
}

impl CircuitOpen {
    pub(crate) const fn new(retry_after: Option<Duration>, state: State) -> Self {
        Self { retry_after, state }
    }

    /// How long until the circuit lets a call through again, when known:
    /// the rest of the open duration, or (degraded) the wait for the next
    /// admitted call. `None` when half-open with every probe slot taken, or
    /// forced open.
    pub fn retry_after(&self) -> Option<Duration> {
        self.retry_after
    }

    /// The state that refused the call.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the circuit is degraded (admitting calls at a low rate) rather
    /// than open.
    pub fn is_degraded(&self) -> bool {
        self.state == State::Degraded
    }
}

impl fmt::Display for CircuitOpen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.state {
            State::Degraded => f.write_str("circuit degraded: call over the degraded rate")?,
            State::HalfOpen => f.write_str("circuit half-open: every probe slot is taken")?,
            State::ForcedOpen => f.write_str("circuit forced open")?,
            _ => f.write_str("circuit open")?,
        }
        if let Some(d) = self.retry_after {
            write!(f, "; retry after {d:?}")?;
        }
        Ok(())
    }
}

impl std::error::Error for CircuitOpen {}

impl crate::classify::KnownError for CircuitOpen {
    fn outcome(&self) -> Outcome {
        Outcome::Transient {
            retry_after: self.retry_after,
        }
    }
}

/// An invalid breaker configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
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
        write!(f, "invalid circuit breaker configuration: {}", self.what)
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
