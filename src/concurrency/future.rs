//! The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit).

use crate::body::future::ObserveFuture;

use super::body::Release;
use super::error::Overloaded;

/// The response future of [`ConcurrencyLimit`](super::ConcurrencyLimit):
/// the shared [`ObserveFuture`], holding the call's permit in a [`Release`]
/// hook. When the inner future resolves, the permit moves into the
/// response (for HTTP, into its body); when this future is dropped first,
/// the permit is given back at once. A call shed from a full queue
/// resolves to [`Overloaded`].
pub type ResponseFuture<F, C> = ObserveFuture<F, C, Release, Overloaded>;
