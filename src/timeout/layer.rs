use std::time::Duration;

use tower_layer::Layer;

use super::Timeout;

/// Applies [`Timeout`] to services. See the [module docs](super) for an
/// example.
///
/// # Default
///
/// No timeout at all: each of the three is off until set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimeoutLayer {
    pub(crate) header: Option<Duration>,
    pub(crate) idle: Option<Duration>,
    pub(crate) total: Option<Duration>,
}

impl TimeoutLayer {
    /// A layer with every timeout off.
    pub const fn new() -> Self {
        Self {
            header: None,
            idle: None,
            total: None,
        }
    }

    /// The longest wait for the response headers, from the call; `None`
    /// turns it off. Answered with
    /// [`HeaderTimeout`](super::error::HeaderTimeout). Default is none.
    pub fn header(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.header = timeout.into();
        self
    }

    /// The longest the response body waits for the upstream's next frame
    /// (the first one included), counted while the caller is polling it. A
    /// stream that stalls this long ends with an
    /// [`IdleTimeout`](super::error::IdleTimeout) error; a slow but steady
    /// one is never cut. `None` turns it off. Default is none.
    pub fn idle(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle = timeout.into();
        self
    }

    /// The longest whole exchange, from the call to the end of the response
    /// body; `None` turns it off. Answered with
    /// [`DeadlineExceeded`](super::error::DeadlineExceeded). An earlier
    /// [`Deadline`](crate::time::Deadline) in the request (set by a retry
    /// layer further out, or by the caller) is honoured even when this is
    /// off. Default is none.
    pub fn total(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.total = timeout.into();
        self
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;

    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout::new(inner, *self)
    }
}
