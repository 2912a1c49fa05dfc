//! Errors a caller of [`Coalesce`](super::Coalesce) can see.
//!
//! A request that passes through keeps the inner service's error (boxed). A
//! single-text request that was merged with others shares the fate of the
//! merged call: when that call fails with an error (not with an HTTP
//! response, which every caller receives as its own), each caller gets a
//! [`BatchFailed`] whose [`source`](std::error::Error::source) is the
//! original error, so an outer layer that walks the chain (the crate's
//! [`Classifier`]) classifies it as it would
//! the original.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::BoxError;
use crate::classify::{Classifier, Outcome, PermanentReason};

/// A merged embedding request failed without an HTTP response for the
/// caller: the inner service returned an error, reading the answer failed,
/// the answer could not be split, or the batching task is gone.
///
/// Callers downcast: `err.is::<BatchFailed>()`, then ask with the `is_*`
/// predicates.
#[derive(Clone)]
pub struct BatchFailed {
    kind: Kind,
    source: Option<Arc<BoxError>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The inner service returned an error (a transport error, a timeout,
    /// another layer's error).
    Upstream,
    /// Reading the merged response body failed.
    Body,
    /// A success answer that cannot be split back (missing or extra
    /// embeddings, not JSON, too large).
    Malformed(&'static str),
    /// The batching task ended before answering (its runtime shut down).
    Closed,
}

impl BatchFailed {
    pub(crate) fn upstream(source: Arc<BoxError>) -> Self {
        Self {
            kind: Kind::Upstream,
            source: Some(source),
        }
    }

    pub(crate) fn body(source: Arc<BoxError>) -> Self {
        Self {
            kind: Kind::Body,
            source: Some(source),
        }
    }

    pub(crate) fn malformed(what: &'static str) -> Self {
        Self {
            kind: Kind::Malformed(what),
            source: None,
        }
    }

    pub(crate) fn closed() -> Self {
        Self {
            kind: Kind::Closed,
            source: None,
        }
    }

    /// Whether the inner service returned an error for the merged call (see
    /// [`source`](std::error::Error::source) for it).
    pub fn is_upstream(&self) -> bool {
        self.kind == Kind::Upstream
    }

    /// Whether reading the merged response body failed.
    pub fn is_body(&self) -> bool {
        self.kind == Kind::Body
    }

    /// Whether the upstream answered with a success this layer could not
    /// split into one answer per caller.
    pub fn is_malformed(&self) -> bool {
        matches!(self.kind, Kind::Malformed(_))
    }

    /// Whether the batching task ended before answering (its runtime shut
    /// down).
    pub fn is_closed(&self) -> bool {
        self.kind == Kind::Closed
    }
}

impl fmt::Debug for BatchFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchFailed")
            .field("kind", &self.kind)
            .field("source", &self.source.as_deref())
            .finish()
    }
}

impl fmt::Display for BatchFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.kind, &self.source) {
            (Kind::Upstream, Some(e)) => write!(f, "merged embedding request failed: {e}"),
            (Kind::Body, Some(e)) => {
                write!(f, "reading the merged embedding response failed: {e}")
            }
            (Kind::Malformed(what), _) => {
                write!(f, "merged embedding response cannot be split: {what}")
            }
            (Kind::Closed, _) => f.write_str("the embedding batching task has stopped"),
            _ => f.write_str("merged embedding request failed"),
        }
    }
}

impl Error for BatchFailed {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| &**e as &(dyn Error + 'static))
    }
}

impl crate::classify::KnownError for BatchFailed {
    fn outcome(&self) -> Outcome {
        match (&self.kind, &self.source) {
            (Kind::Upstream | Kind::Body, Some(e)) => Classifier::new().classify_error(&**e),
            (Kind::Malformed(_), _) => Outcome::Permanent {
                reason: PermanentReason::Other,
            },
            _ => Outcome::TRANSIENT,
        }
    }
}
