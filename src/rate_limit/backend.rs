//! Where decisions are made and state is kept: the [`Backend`] trait, and
//! the reservation and admission a backend hands out.
//!
//! [`RateLimit`](super::RateLimit) owns everything around a decision:
//! finding the key and the cost, the wait and reject modes, FIFO waiting
//! for a booked slot, giving the slot back when the caller goes away,
//! reconciling tokens and reporting upstream throttles when the response
//! ends. A backend only decides and stores:
//!
//! * [`RateLimiter`](super::RateLimiter), in memory: decides at once,
//!   without a future (the layer's fast path);
//! * [`RedisLimiter`](crate::redis::RedisLimiter): decides in Redis, with a
//!   round trip (a [`Decision::Pending`] future), shared by replicas;
//! * your own: implement the three traits.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use crate::BoxError;
use crate::classify::ThrottleCause;
use crate::time::Instant;

use super::limiter::{Cost, Snapshot};

/// A rate-limit backend: decides calls for keys of type `K` and stores
/// their state. See the [module docs](super).
///
/// Clones share the state.
pub trait Backend<K>: Clone + Send + Sync + 'static {
    /// A call booked for a slot (now or later).
    type Ticket: Ticket;
    /// A decision that needs a round trip.
    type Pending: Future<Output = Result<Self::Ticket, BoxError>> + Send + Unpin + 'static;

    /// Decides a call for `key` at `now`: admit it now, book it for a slot
    /// at most `max_wait` away, or refuse it (with
    /// [`RateLimited`](super::error::RateLimited) and the exact wait, or the
    /// backend's own error). `weigh(tokens)` gives the call's cost; `tokens`
    /// says whether the key has a token quota, so an estimate is computed
    /// only when it counts. A backend calls it at most once.
    fn decide<W: FnOnce(bool) -> Cost>(
        &self,
        key: &K,
        weigh: W,
        max_wait: Duration,
        now: Instant,
    ) -> Decision<Self::Ticket, Self::Pending>;

    /// What `key`'s quotas look like now, as far as this backend knows;
    /// `None` for a key it has no state for (its buckets are full).
    fn snapshot(&self, key: &K) -> Option<Snapshot>;
}

/// A backend's answer. See [`Backend::decide`].
pub enum Decision<T: Ticket, F> {
    /// Admitted now: the call goes at once.
    Admitted(T::Permit),
    /// Booked for a later slot: the call waits for
    /// [`Ticket::ready_at`].
    Booked(T),
    /// Refused: nothing was reserved.
    Refused(BoxError),
    /// The backend needs a round trip; the future books the call (or
    /// refuses it).
    Pending(F),
}

impl<T: Ticket, F> fmt::Debug for Decision<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Admitted(_) => f.write_str("Admitted"),
            Decision::Booked(_) => f.write_str("Booked"),
            Decision::Refused(e) => f.debug_tuple("Refused").field(e).finish(),
            Decision::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// The [`Backend::Pending`] of a backend that always decides at once (the
/// in-memory [`RateLimiter`](super::RateLimiter)): it cannot be built, so
/// [`Decision::Pending`] never happens.
pub enum Immediate<T> {
    #[doc(hidden)]
    Never(
        std::convert::Infallible,
        std::marker::PhantomData<fn() -> T>,
    ),
}

impl<T> Future for Immediate<T> {
    type Output = T;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<T> {
        match *self {
            Immediate::Never(n, _) => match n {},
        }
    }
}

impl<T> fmt::Debug for Immediate<T> {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Immediate::Never(n, _) => match n {},
        }
    }
}

/// A booked call. Dropping it before [`Ticket::admit`] gives its slot back
/// (exactly when nothing was booked after it; otherwise the slot stays
/// spent: capacity lost, never a burst).
pub trait Ticket: Send + 'static {
    /// The admitted call.
    type Permit: Permit;

    /// When the call may go. Asked again after waiting: a slot can move
    /// later (an upstream throttle paused the key meanwhile).
    fn ready_at(&self) -> Instant;

    /// The slot has come: the call goes, and is no longer given back.
    fn admit(self) -> Self::Permit;
}

/// An admitted call: what it really used and how the upstream answered go
/// back to the backend when it ends.
pub trait Permit: Send + 'static {
    /// The tokens reserved for the call (0: none; nothing to reconcile).
    fn tokens(&self) -> u32;

    /// Whether the backend wants to hear about upstream throttles.
    fn wants_feedback(&self) -> bool;

    /// The call is over: `throttled` if the upstream throttled it (never
    /// [`ThrottleCause::Local`]), `tokens` what it really used (`None`: the
    /// estimate stands). Runs on the caller's task: a backend that talks
    /// to a server does so in the background.
    fn finish(self, throttled: Option<ThrottleCause>, tokens: Option<u32>);
}

/// A booked slot, from a backend's `reserve`. Await [`Reservation::ready`]
/// to wait for it; drop it to cancel.
#[derive(Debug)]
pub struct Reservation<T> {
    ticket: T,
}

impl<T: Ticket> Reservation<T> {
    pub(crate) fn new(ticket: T) -> Self {
        Self { ticket }
    }

    /// When the call may go.
    pub fn ready_at(&self) -> Instant {
        self.ticket.ready_at()
    }

    /// Waits for the slot (moved later if an upstream throttle paused the
    /// key meanwhile). Dropping the future cancels the reservation.
    pub async fn ready(self) -> Admission<T::Permit> {
        loop {
            let at = self.ticket.ready_at();
            tokio::time::sleep_until(at).await;
            if self.ticket.ready_at() <= at {
                break;
            }
        }
        Admission {
            permit: self.ticket.admit(),
        }
    }
}

/// An admitted call, from [`Reservation::ready`]: tell the backend what it
/// really used, or that the upstream throttled it. Dropping it keeps the
/// estimate.
#[derive(Debug)]
pub struct Admission<P> {
    permit: P,
}

impl<P: Permit> Admission<P> {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn new(permit: P) -> Self {
        Self { permit }
    }

    /// Reconciles the token estimate with the `tokens` the call really
    /// used: refunds the difference or charges the overrun.
    pub fn reconcile(self, tokens: u32) {
        self.permit.finish(None, Some(tokens));
    }

    /// Reports an upstream throttle of this call (the key pauses, and in
    /// memory recovers at a lower rate; see
    /// [`Feedback`](super::Feedback)). [`ThrottleCause::Local`] is ignored.
    pub fn throttled(self, cause: ThrottleCause) {
        if cause != ThrottleCause::Local {
            self.permit.finish(Some(cause), None);
        }
    }

    /// The backend's permit.
    pub fn get_ref(&self) -> &P {
        &self.permit
    }
}
