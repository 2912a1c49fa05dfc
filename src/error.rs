//! The crate's error plumbing: how errors from tower-qwen's own layers are
//! recognised wherever they surface, so that a layer further out (retry, the
//! breaker, fallback, the gateway) classifies them correctly.
//!
//! Each layer's error types live in its own `error` module (e.g.
//! `rate_limit::error::RateLimited`); this module only maps them to an
//! [`crate::classify::Outcome`]. Callers downcast:
//! `err.is::<tower_qwen::timeout::error::HeaderTimeout>()`.
//!
//! # Example
//!
//! ```
//! use tower_qwen::classify::Classifier;
//! let err: tower_qwen::BoxError = Box::new(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
//! assert!(Classifier::new().classify_error(&err).is_transient());
//! ```

use std::any::Any;
use std::error::Error;

use crate::classify::Outcome;

/// An error type of this crate that knows its own outcome.
#[allow(dead_code)]
pub(crate) trait KnownError {
    /// How a caller further out should read this error.
    fn outcome(&self) -> Outcome;
}

/// Runs `$check!(Type)` for every error type of this crate. Each feature's
/// errors are registered here, in one place, so the classifier does not
/// depend on the order layers are stacked.
macro_rules! for_known_errors {
    ($check:ident) => {
        // One line per error type, gated by its feature, e.g.
        // #[cfg(feature = "timeout")]
        // $check!(crate::timeout::error::HeaderTimeout);
        #[cfg(feature = "coalesce")]
        $check!(crate::coalesce::error::BatchFailed);
        #[cfg(feature = "rate-limit")]
        $check!(crate::rate_limit::error::RateLimited);
        #[cfg(feature = "redis")]
        $check!(crate::redis::error::StoreUnavailable);
        #[cfg(feature = "concurrency")]
        $check!(crate::concurrency::error::Overloaded);
        #[cfg(feature = "circuit-breaker")]
        $check!(crate::circuit_breaker::error::CircuitOpen);
        #[cfg(feature = "pool")]
        $check!(crate::pool::error::Exhausted);
        #[cfg(feature = "timeout")]
        $check!(crate::timeout::error::HeaderTimeout);
        #[cfg(feature = "timeout")]
        $check!(crate::timeout::error::IdleTimeout);
        #[cfg(feature = "timeout")]
        $check!(crate::timeout::error::DeadlineExceeded);
        #[cfg(feature = "gateway")]
        $check!(crate::gateway::error::UpstreamBusy);
    };
}

/// The outcome carried by an error of a type this crate knows.
pub(crate) fn known_outcome(err: &(dyn Error + 'static)) -> Option<Outcome> {
    if err.is::<std::io::Error>() {
        return Some(Outcome::TRANSIENT);
    }
    #[allow(unused_macros)]
    macro_rules! check {
        ($t:ty) => {
            if let Some(e) = err.downcast_ref::<$t>() {
                return Some(KnownError::outcome(e));
            }
        };
    }
    for_known_errors!(check);
    None
}

/// Like [`known_outcome`], from a value of any type (not necessarily
/// `dyn Error`).
#[allow(unused_variables)]
pub(crate) fn known_outcome_any(any: &dyn Any) -> Option<Outcome> {
    #[allow(unused_macros)]
    macro_rules! check {
        ($t:ty) => {
            if let Some(e) = any.downcast_ref::<$t>() {
                return Some(KnownError::outcome(e));
            }
        };
    }
    for_known_errors!(check);
    None
}

/// Whether `err` (of any type, boxed or not) is the circuit breaker's
/// `CircuitOpen`.
#[cfg(feature = "fallback")]
#[allow(unused_variables)]
pub(crate) fn is_circuit_open<E: 'static>(err: &E) -> bool {
    #[cfg(feature = "circuit-breaker")]
    {
        use crate::circuit_breaker::error::CircuitOpen;
        let any = err as &dyn Any;
        if any.is::<CircuitOpen>() {
            return true;
        }
        if let Some(boxed) = any.downcast_ref::<crate::BoxError>() {
            let mut cur: Option<&(dyn Error + 'static)> = Some(&**boxed);
            while let Some(e) = cur {
                if e.is::<CircuitOpen>() {
                    return true;
                }
                cur = e.source();
            }
        }
    }
    false
}
