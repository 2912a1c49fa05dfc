//! What happens when Redis is slow or down: the failure policy, the local
//! fallback limits, and the up/down state machine with its probes.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use crate::rate_limit::{Limits, Quota};

/// What the limiter does when Redis cannot decide (a timeout, a connection
/// error, or Redis already known to be down).
///
/// * **Fail open** ([`FailurePolicy::fail_open`]): decide locally, with an
///   in-memory limiter at `1/N` of the quota, `N` being the number of
///   replicas expected to share it (rate divided by `N`, burst divided by
///   `N` rounded up). With `N` right, the replicas together stay within the
///   quota while Redis is away, plus at most one burst at each switch
///   (the local buckets start full).
/// * **Fail closed** ([`FailurePolicy::fail_closed`]): refuse the call with
///   [`StoreUnavailable`](super::error::StoreUnavailable), classified as
///   transient with the time until Redis is tried again.
///
/// Either way Redis is probed again every
/// [`probe_every`](crate::rate_limit::RateLimiterBuilder::probe_every) (the first call
/// after that goes to Redis; the others keep the policy meanwhile, so no
/// call waits for a dead Redis longer than one timeout), and the limiter
/// goes back to Redis as soon as a call succeeds. Each transition is
/// logged with `tracing::warn!`.
///
/// A call whose Redis request timed out may still have been booked there
/// once Redis got to it: that capacity is lost (never a burst). Give-backs
/// and reconciliations are skipped while Redis is down (the estimates
/// stand).
///
/// # Default
///
/// Fail open with `N = 1`: each replica may then use the whole quota while
/// Redis is down. Set `N` to your replica count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FailurePolicy {
    open: Option<NonZeroU32>,
}

impl Default for FailurePolicy {
    fn default() -> Self {
        Self::fail_open(NonZeroU32::MIN)
    }
}

impl FailurePolicy {
    /// Decide locally at `1/replicas` of the quota.
    pub const fn fail_open(replicas: NonZeroU32) -> Self {
        Self {
            open: Some(replicas),
        }
    }

    /// Refuse calls with
    /// [`StoreUnavailable`](super::error::StoreUnavailable).
    pub const fn fail_closed() -> Self {
        Self { open: None }
    }

    /// The replica count of a fail-open policy.
    pub const fn replicas(&self) -> Option<NonZeroU32> {
        self.open
    }

    /// Whether the policy fails open.
    pub const fn is_fail_open(&self) -> bool {
        self.open.is_some()
    }
}

/// `quota` shared by `n`: the rate divided by `n`, the burst divided by `n`
/// rounded up (at least 1).
pub(crate) fn scale_quota(q: Quota, n: u32) -> Quota {
    if n <= 1 {
        return q;
    }
    let interval = q.interval_nanos().saturating_mul(u64::from(n));
    let burst = q.burst().get().div_ceil(n);
    match Quota::with_period(Duration::from_nanos(interval)) {
        Some(s) => s.allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN)),
        None => q,
    }
}

/// Limits shared by `n` replicas (see [`scale_quota`]).
pub(crate) fn scale(limits: Limits, n: u32) -> Limits {
    let mut out = Limits::UNLIMITED;
    if let Some(q) = limits.get_requests() {
        out = out.and_requests(scale_quota(q, n));
    }
    if let Some(q) = limits.get_tokens() {
        out = out.and_tokens(scale_quota(q, n));
    }
    out
}

/// Up or down, and when to probe next. Times are nanoseconds since the
/// limiter's origin.
#[derive(Debug)]
pub(crate) struct Health {
    down: AtomicBool,
    next_probe: AtomicU64,
    down_since: AtomicU64,
    outages: AtomicU64,
    probe_every: u64,
}

impl Health {
    pub(crate) fn new(probe_every: u64) -> Self {
        Self {
            down: AtomicBool::new(false),
            next_probe: AtomicU64::new(0),
            down_since: AtomicU64::new(0),
            outages: AtomicU64::new(0),
            probe_every,
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    pub(crate) fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// Whether a call at `now` should ask Redis: always when up; when down,
    /// only the first call once a probe is due (it moves the next probe).
    pub(crate) fn should_try(&self, now: u64) -> bool {
        if !self.is_down() {
            return true;
        }
        let next = self.next_probe.load(Ordering::Acquire);
        now >= next
            && self
                .next_probe
                .compare_exchange(
                    next,
                    now.saturating_add(self.probe_every),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                )
                .is_ok()
    }

    /// Time until the next probe.
    pub(crate) fn retry_after(&self, now: u64) -> Duration {
        if !self.is_down() {
            return Duration::ZERO;
        }
        Duration::from_nanos(self.next_probe.load(Ordering::Acquire).saturating_sub(now))
    }

    /// Redis answered. Returns whether this ended an outage.
    pub(crate) fn up(&self, now: u64) -> bool {
        if self.down.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel) {
            let since = self.down_since.load(Ordering::Acquire);
            tracing::warn!(
                down_ms = Duration::from_nanos(now.saturating_sub(since)).as_millis() as u64,
                "redis rate limit store is back; distributed limits resume"
            );
            return true;
        }
        false
    }

    /// Redis failed or timed out. Returns whether this started an outage.
    pub(crate) fn down(&self, now: u64, why: &dyn fmt::Display, policy: FailurePolicy) -> bool {
        if self.down.swap(true, Ordering::AcqRel) {
            return false;
        }
        self.down_since.store(now, Ordering::Release);
        self.next_probe
            .store(now.saturating_add(self.probe_every), Ordering::Release);
        self.outages.fetch_add(1, Ordering::Relaxed);
        match policy.replicas() {
            Some(n) => tracing::warn!(
                error = %why,
                replicas = n.get(),
                probe_ms = Duration::from_nanos(self.probe_every).as_millis() as u64,
                "redis rate limit store unavailable; failing open to local limits at 1/replicas of the quota"
            ),
            None => tracing::warn!(
                error = %why,
                probe_ms = Duration::from_nanos(self.probe_every).as_millis() as u64,
                "redis rate limit store unavailable; failing closed"
            ),
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u32) -> NonZeroU32 {
        NonZeroU32::new(n).unwrap()
    }

    #[test]
    fn quotas_are_shared_by_n() {
        let q = Quota::per_second(nz(30)).allow_burst(nz(10));
        let s = scale_quota(q, 3);
        assert_eq!(s.replenish_interval(), q.replenish_interval() * 3);
        assert_eq!(s.burst().get(), 4);
        assert_eq!(scale_quota(q, 1), q);
        let one = Quota::per_minute(nz(600)).allow_burst(NonZeroU32::MIN);
        assert_eq!(scale_quota(one, 4).burst().get(), 1);
        let l = scale(Limits::tokens(q), 2);
        assert!(l.get_requests().is_none());
        assert_eq!(l.get_tokens().unwrap().burst().get(), 5);
    }

    #[test]
    fn one_probe_per_interval_and_transitions_once() {
        let h = Health::new(100);
        assert!(h.should_try(0));
        assert!(h.down(10, &"boom", FailurePolicy::default()));
        assert!(!h.down(11, &"boom", FailurePolicy::default()));
        assert_eq!(h.outages(), 1);
        assert!(!h.should_try(50));
        assert_eq!(h.retry_after(50), Duration::from_nanos(60));
        assert!(h.should_try(110));
        assert!(!h.should_try(110), "one probe per interval");
        assert!(h.up(120));
        assert!(!h.up(121));
        assert!(h.should_try(122));
        assert_eq!(h.retry_after(122), Duration::ZERO);
    }
}
