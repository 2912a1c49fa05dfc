//! The hook that holds a concurrency permit until the response ends.
//!
//! For an `http::Response<B>`, the [`Classifier`](crate::classify::Classifier)
//! wraps the body in an [`Observed`](crate::body::Observed) body carrying a
//! [`Release`]: the permit is given back when the body's last frame passes,
//! when reading it fails, or when it is dropped, so a long SSE generation
//! counts against the limit until it finishes. tower's `ConcurrencyLimit`
//! gives its permit back when the response head arrives.

use std::fmt;

use crate::body::{BodyEnd, OnEnd};

use super::shared::{Permit, Start};

/// Holds one concurrency permit until the response it belongs to ends; an
/// adaptive limit also learns from how it ended. Carried inside the response
/// body (see the [module docs](self)).
pub struct Release {
    permit: Permit,
    start: Option<Start>,
}

impl Release {
    pub(crate) fn new(permit: Permit, start: Option<Start>) -> Self {
        Self { permit, start }
    }
}

impl OnEnd for Release {
    fn on_end(self, end: BodyEnd) {
        if let Some(start) = self.start {
            self.permit.shared().record(start, &end);
        }
        drop(self.permit);
    }
}

impl fmt::Debug for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Release")
            .field("adaptive", &self.start.is_some())
            .finish()
    }
}
