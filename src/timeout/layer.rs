use std::time::Duration;

use tower_layer::Layer;

use super::Timeout;

/// Applies [`Timeout`] to services. See the [module docs](super) for an
/// example.
///
/// Unlike tower's `TimeoutLayer::new(Duration)`, which bounds only the time
/// to the response headers, this one bounds three things separately (the
/// headers, the silence between body frames, the whole exchange), and
/// [`TimeoutLayer::new`] starts from LLM-ready values rather than from a
/// single duration.
///
/// # Default
///
/// 60 s idle between body frames, 300 s for the whole exchange (the
/// official SDK's request timeout), no separate header timeout (a
/// non-streamed generation sends its headers only when it is done, so the
/// total bounds it). [`TimeoutLayer::none`] starts with every timeout off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct TimeoutLayer {
    pub(crate) header: Option<Duration>,
    pub(crate) idle: Option<Duration>,
    pub(crate) total: Option<Duration>,
}

/// The default idle timeout: 60 s.
pub const DEFAULT_IDLE: Duration = Duration::from_secs(60);

/// The default total timeout: 300 s.
pub const DEFAULT_TOTAL: Duration = Duration::from_secs(300);

impl Default for TimeoutLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl TimeoutLayer {
    /// The [defaults](TimeoutLayer#default): 60 s idle, 300 s total, no
    /// header timeout.
    pub const fn new() -> Self {
        Self {
            header: None,
            idle: Some(DEFAULT_IDLE),
            total: Some(DEFAULT_TOTAL),
        }
    }

    /// Every timeout off, to set only those you want.
    pub const fn none() -> Self {
        Self {
            header: None,
            idle: None,
            total: None,
        }
    }

    /// The longest wait for the response headers, from the call; `None`
    /// turns it off. Answered with
    /// [`HeaderTimeout`](super::error::HeaderTimeout). Default is none (the
    /// total bounds it).
    pub fn header(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.header = timeout.into();
        self
    }

    /// The longest the response body waits for the upstream's next frame
    /// (the first one included), counted while the caller is polling it. A
    /// stream that stalls this long ends with an
    /// [`IdleTimeout`](super::error::IdleTimeout) error; a slow but steady
    /// one is never cut. `None` turns it off. Default is 60 s.
    pub fn idle(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.idle = timeout.into();
        self
    }

    /// The longest whole exchange, from the call to the end of the response
    /// body; `None` turns it off. Answered with
    /// [`DeadlineExceeded`](super::error::DeadlineExceeded). An earlier
    /// [`Deadline`](crate::time::Deadline) in the request (set by a retry
    /// layer further out, or by the caller) is honoured even when this is
    /// off. Default is 300 s.
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
