//! Errors a caller of [`Batch`](super::Batch) can see.
//!
//! A line the Batch API answered with an HTTP status (a success, or an
//! error such as `400 invalid_parameter_error`) reaches its caller as an
//! ordinary `http::Response`, like the real-time call would. Everything
//! else ends in a [`BatchError`]: the request cannot be batched, the batch
//! failed, expired or was cancelled before the line ran, the line failed
//! without an HTTP answer, the Files or Batch API kept failing, or the
//! worker stopped.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

use crate::BoxError;
use crate::classify::{Classifier, Outcome, PermanentReason};

/// Why a batched request ended without a response. Callers downcast
/// (`err.downcast_ref::<BatchError>()`) and ask with the `is_*` predicates.
#[derive(Clone)]
pub struct BatchError {
    kind: Kind,
    batch_id: Option<Arc<str>>,
    custom_id: Option<Arc<str>>,
}

#[derive(Clone)]
enum Kind {
    Unsupported(&'static str),
    Failed { code: String, message: String },
    Expired,
    Cancelled,
    Line { code: String, message: String },
    Missing,
    Upstream(ApiFailure),
    Store(Arc<BoxError>),
    Closed,
}

/// A Files or Batch API call that failed.
#[derive(Clone)]
pub(crate) struct ApiFailure {
    pub(crate) what: &'static str,
    pub(crate) status: Option<u16>,
    pub(crate) code: Option<String>,
    pub(crate) message: String,
    pub(crate) source: Option<Arc<BoxError>>,
}

impl BatchError {
    fn new(kind: Kind) -> Self {
        Self {
            kind,
            batch_id: None,
            custom_id: None,
        }
    }

    pub(crate) fn unsupported(why: &'static str) -> Self {
        Self::new(Kind::Unsupported(why))
    }

    pub(crate) fn failed(code: String, message: String) -> Self {
        Self::new(Kind::Failed { code, message })
    }

    pub(crate) fn expired() -> Self {
        Self::new(Kind::Expired)
    }

    pub(crate) fn cancelled() -> Self {
        Self::new(Kind::Cancelled)
    }

    pub(crate) fn line(code: String, message: String) -> Self {
        Self::new(Kind::Line { code, message })
    }

    pub(crate) fn missing() -> Self {
        Self::new(Kind::Missing)
    }

    pub(crate) fn upstream(u: ApiFailure) -> Self {
        Self::new(Kind::Upstream(u))
    }

    pub(crate) fn store(e: Arc<BoxError>) -> Self {
        Self::new(Kind::Store(e))
    }

    pub(crate) fn closed() -> Self {
        Self::new(Kind::Closed)
    }

    pub(crate) fn with_ids(mut self, batch_id: Option<&Arc<str>>, custom_id: &Arc<str>) -> Self {
        self.batch_id = batch_id.cloned();
        self.custom_id = Some(custom_id.clone());
        self
    }

    /// Whether the request cannot go through the Batch API (not a `POST` to
    /// the compatible chat or embeddings endpoint, a stream, a body that is
    /// not buffered JSON with a `model`, a line over the size cap, a bad
    /// custom id).
    pub fn is_unsupported(&self) -> bool {
        matches!(self.kind, Kind::Unsupported(_))
    }

    /// Whether the batch failed as a whole (validation such as
    /// `mismatched_model` or `model_not_found`, or a failure upstream); see
    /// [`code`](Self::code).
    pub fn is_failed(&self) -> bool {
        matches!(self.kind, Kind::Failed { .. })
    }

    /// Whether the batch expired (its completion window ended) before this
    /// line ran.
    pub fn is_expired(&self) -> bool {
        matches!(self.kind, Kind::Expired)
    }

    /// Whether the batch was cancelled before this line ran.
    pub fn is_cancelled(&self) -> bool {
        matches!(self.kind, Kind::Cancelled)
    }

    /// Whether the line failed without an HTTP answer (its error file line
    /// has only an `error`); see [`code`](Self::code).
    pub fn is_line(&self) -> bool {
        matches!(self.kind, Kind::Line { .. })
    }

    /// Whether the batch completed but neither its output nor its error file
    /// mentions this line.
    pub fn is_missing(&self) -> bool {
        matches!(self.kind, Kind::Missing)
    }

    /// Whether a Files or Batch API call (upload, create, poll, download)
    /// kept failing; see [`status`](Self::status) and
    /// [`source`](std::error::Error::source).
    pub fn is_upstream(&self) -> bool {
        matches!(self.kind, Kind::Upstream(_))
    }

    /// Whether the [store](super::BatchStore) of submitted batches failed
    /// (see [`source`](std::error::Error::source)).
    pub fn is_store(&self) -> bool {
        matches!(self.kind, Kind::Store(_))
    }

    /// Whether the batch worker stopped before answering (its runtime shut
    /// down).
    pub fn is_closed(&self) -> bool {
        matches!(self.kind, Kind::Closed)
    }

    /// The error code: the batch's (`mismatched_model`...), the line's
    /// (`batch_expired`...), or the failed API call's.
    pub fn code(&self) -> Option<&str> {
        match &self.kind {
            Kind::Failed { code, .. } | Kind::Line { code, .. } => Some(code),
            Kind::Upstream(u) => u.code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status of a failed Files or Batch API call.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            Kind::Upstream(u) => u.status,
            _ => None,
        }
    }

    /// The batch this line belonged to, once it was created.
    pub fn batch_id(&self) -> Option<&str> {
        self.batch_id.as_deref()
    }

    /// The line's `custom_id`, once it was given one.
    pub fn custom_id(&self) -> Option<&str> {
        self.custom_id.as_deref()
    }
}

impl fmt::Debug for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BatchError")
            .field("error", &format_args!("{self}"))
            .field("batch_id", &self.batch_id)
            .field("custom_id", &self.custom_id)
            .finish()
    }
}

impl fmt::Display for BatchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            Kind::Unsupported(why) => write!(f, "request cannot be batched: {why}"),
            Kind::Failed { code, message } => write!(f, "batch failed: {code}: {message}"),
            Kind::Expired => f.write_str("batch expired before the request ran"),
            Kind::Cancelled => f.write_str("batch was cancelled before the request ran"),
            Kind::Line { code, message } => write!(f, "batched request failed: {code}: {message}"),
            Kind::Missing => f.write_str("batch completed without an answer for the request"),
            Kind::Upstream(u) => {
                write!(f, "batch {} failed", u.what)?;
                if let Some(s) = u.status {
                    write!(f, " with status {s}")?;
                }
                if let Some(c) = &u.code {
                    write!(f, ": {c}")?;
                }
                if !u.message.is_empty() {
                    write!(f, ": {}", u.message)?;
                }
                Ok(())
            }
            Kind::Store(e) => write!(f, "batch store failed: {e}"),
            Kind::Closed => f.write_str("the batch worker has stopped"),
        }
    }
}

impl Error for BatchError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        match &self.kind {
            Kind::Upstream(u) => u.source.as_deref().map(|e| &**e as &(dyn Error + 'static)),
            Kind::Store(e) => Some(&***e as &(dyn Error + 'static)),
            _ => None,
        }
    }
}

impl crate::classify::KnownError for BatchError {
    fn outcome(&self) -> Outcome {
        let permanent = Outcome::Permanent {
            reason: PermanentReason::Other,
        };
        match &self.kind {
            Kind::Expired | Kind::Closed | Kind::Missing | Kind::Store(_) => Outcome::TRANSIENT,
            Kind::Upstream(u) => match (&u.source, u.status) {
                (Some(e), _) => Classifier::new().classify_error(&**e),
                (None, Some(s)) if s == 429 || s >= 500 => Outcome::TRANSIENT,
                _ => permanent,
            },
            _ => permanent,
        }
    }
}
