//! Quotas: how much, how fast, how bursty; and the Qwen defaults.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use super::error::InvalidQuota;

const NANOS_PER_SEC: u64 = 1_000_000_000;

/// One rate limit: `burst` units at once, refilled one unit per interval.
///
/// Like governor's `Quota`: `Quota::per_minute(n)` refills `n` units a
/// minute **and allows a burst of `n`**; use [`Quota::allow_burst`] to
/// smooth it. Intervals are whole nanoseconds, rounded up (never faster
/// than asked).
///
/// See the [module docs](super) for an example.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Quota {
    interval: u64,
    burst: NonZeroU32,
}

impl Quota {
    const fn per_nanos(n: NonZeroU32, period: u64) -> Self {
        let n64 = n.get() as u64;
        Self {
            interval: period.div_ceil(n64),
            burst: n,
        }
    }

    /// `n` per second, burst `n`.
    pub const fn per_second(n: NonZeroU32) -> Self {
        Self::per_nanos(n, NANOS_PER_SEC)
    }

    /// `n` per minute, burst `n`.
    pub const fn per_minute(n: NonZeroU32) -> Self {
        Self::per_nanos(n, 60 * NANOS_PER_SEC)
    }

    /// `n` per hour, burst `n`.
    pub const fn per_hour(n: NonZeroU32) -> Self {
        Self::per_nanos(n, 3600 * NANOS_PER_SEC)
    }

    /// `n` tokens per minute, burst `n` (the same arithmetic as
    /// [`Quota::per_minute`]; the name says what the unit is). DashScope
    /// enforces TPM per second too; see [`QuotaTable::qwen`] for the burst
    /// that respects that.
    pub const fn tokens_per_minute(n: NonZeroU32) -> Self {
        Self::per_minute(n)
    }

    /// One unit per `period`, burst 1. `None` if `period` is zero.
    pub fn with_period(period: Duration) -> Option<Self> {
        let interval = crate::time::duration_nanos(period);
        (interval > 0).then_some(Self {
            interval,
            burst: NonZeroU32::MIN,
        })
    }

    /// `n` per `period`, burst `n`.
    ///
    /// # Errors
    ///
    /// [`InvalidQuota`] when `period` is zero or shorter than `n`
    /// nanoseconds.
    pub fn new(n: NonZeroU32, period: Duration) -> Result<Self, InvalidQuota> {
        let p = crate::time::duration_nanos(period);
        if p < u64::from(n.get()) {
            return Err(InvalidQuota::new(
                "the period must be at least n nanoseconds",
            ));
        }
        Ok(Self::per_nanos(n, p))
    }

    /// The burst: how many units may go at once when the bucket is full.
    /// Default is the `n` of the constructor (1 for
    /// [`Quota::with_period`]).
    pub const fn allow_burst(mut self, burst: NonZeroU32) -> Self {
        self.burst = burst;
        self
    }

    /// The burst.
    pub const fn burst(&self) -> NonZeroU32 {
        self.burst
    }

    /// The time to refill one unit.
    pub const fn replenish_interval(&self) -> Duration {
        Duration::from_nanos(self.interval)
    }

    /// Units per second.
    pub fn per_second_rate(&self) -> f64 {
        NANOS_PER_SEC as f64 / self.interval as f64
    }

    pub(crate) const fn interval_nanos(&self) -> u64 {
        self.interval
    }
}

/// The limits of one key: a request quota, a token quota, or both. A call
/// passes only when every configured quota admits it.
///
/// See the [module docs](super) for an example.
///
/// # Default
///
/// [`Limits::UNLIMITED`]: nothing is limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Limits {
    requests: Option<Quota>,
    tokens: Option<Quota>,
}

impl Limits {
    /// No limit at all.
    pub const UNLIMITED: Limits = Limits {
        requests: None,
        tokens: None,
    };

    /// Requests only; each call costs one unit.
    pub const fn requests(quota: Quota) -> Self {
        Self {
            requests: Some(quota),
            tokens: None,
        }
    }

    /// Tokens only; each call costs its token estimate.
    pub const fn tokens(quota: Quota) -> Self {
        Self {
            requests: None,
            tokens: Some(quota),
        }
    }

    /// Adds (or replaces) the token quota.
    pub const fn and_tokens(mut self, quota: Quota) -> Self {
        self.tokens = Some(quota);
        self
    }

    /// Adds (or replaces) the request quota.
    pub const fn and_requests(mut self, quota: Quota) -> Self {
        self.requests = Some(quota);
        self
    }

    /// The request quota.
    pub const fn get_requests(&self) -> Option<Quota> {
        self.requests
    }

    /// The token quota.
    pub const fn get_tokens(&self) -> Option<Quota> {
        self.tokens
    }
}

const fn nz(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// DashScope limits for an RPM / TPM pair, smoothed for per-second
/// enforcement: one unit of burst in each dimension (see
/// [`QuotaTable::qwen`] for why).
pub const fn qwen_limits(rpm: u32, tpm: u32) -> Limits {
    Limits {
        requests: Some(Quota::per_minute(nz(rpm)).allow_burst(NonZeroU32::MIN)),
        tokens: Some(Quota::tokens_per_minute(nz(tpm)).allow_burst(NonZeroU32::MIN)),
    }
}

/// The published default limits of a Qwen model; see [`QuotaTable::qwen`].
fn qwen_defaults(model: &str) -> Limits {
    let m = model.trim().to_ascii_lowercase();
    let snapshot = m.ends_with("-latest") || has_date_suffix(&m);
    let (rpm, tpm) = if snapshot || m == "qwq-plus" {
        (60, 100_000)
    } else if m == "qwen-turbo" {
        (600, 5_000_000)
    } else if m == "qwen-vl-max" || m == "qwen-vl-plus" {
        (1_200, 1_000_000)
    } else if m.starts_with("qwen2.5-") && m.ends_with("-instruct-1m") {
        (1_200, 5_000_000)
    } else if m == "qwen-max" || m == "qwen-plus" || m == "qwen3-max" || m.starts_with("qwen3-") {
        (600, 1_000_000)
    } else {
        (60, 100_000)
    };
    qwen_limits(rpm, tpm)
}

/// `-YYYY-MM-DD` or `-MMDD` at the end of a model name.
fn has_date_suffix(m: &str) -> bool {
    let b = m.as_bytes();
    let digits = |s: &[u8]| s.iter().all(u8::is_ascii_digit);
    if b.len() > 11 {
        let t = &b[b.len() - 11..];
        if t[0] == b'-'
            && digits(&t[1..5])
            && t[5] == b'-'
            && digits(&t[6..8])
            && t[8] == b'-'
            && digits(&t[9..11])
        {
            return true;
        }
    }
    if b.len() > 5 {
        let t = &b[b.len() - 5..];
        if t[0] == b'-' && digits(&t[1..5]) {
            return true;
        }
    }
    false
}

/// Limits per model, with a default: the Qwen defaults plus your
/// overrides. Cheap to clone (shared).
///
/// ```
/// use std::num::NonZeroU32;
/// use tower_qwen::rate_limit::{Limits, Quota, QuotaTable, qwen_limits};
///
/// let table = QuotaTable::qwen().set("qwen-plus", qwen_limits(1_200, 2_000_000));
/// assert_eq!(table.get(Some("qwen-plus")), qwen_limits(1_200, 2_000_000));
/// assert_eq!(table.get(Some("qwen-turbo")), qwen_limits(600, 5_000_000));
/// let fixed = QuotaTable::new(Limits::requests(Quota::per_second(NonZeroU32::new(5).unwrap())));
/// assert_eq!(fixed.get(None), fixed.get(Some("anything")));
/// ```
#[derive(Clone, Debug)]
pub struct QuotaTable {
    models: Arc<HashMap<Box<str>, Limits>>,
    default: Option<Limits>,
}

impl QuotaTable {
    /// Every model gets `default`.
    pub fn new(default: Limits) -> Self {
        Self {
            models: Arc::default(),
            default: Some(default),
        }
    }

    /// Models get the published default limits of Qwen models (international /
    /// Singapore table, QWEN-API.md A3), as limits that never trip DashScope's
    /// per-second enforcement, unless overridden ([`QuotaTable::set`]). This is
    /// the crate's one source of the default quotas (the client preset, the
    /// rate limiter's preset and the gateway's `quotas = "qwen"` read it).
    ///
    /// | model | RPM | TPM |
    /// |---|---|---|
    /// | `qwen-max`, `qwen-plus`, `qwen3-max`, `qwen3-*` (open source) | 600 | 1,000,000 |
    /// | `qwen-turbo` | 600 | 5,000,000 |
    /// | `qwen-vl-max`, `qwen-vl-plus` | 1,200 | 1,000,000 |
    /// | `qwen2.5-*-instruct-1m` | 1,200 | 5,000,000 |
    /// | `qwq-plus`, any `-latest` or dated snapshot (`qwen-plus-2025-01-25`) | 60 | 100,000 |
    /// | anything else | 60 | 100,000 (the most conservative published row) |
    ///
    /// (The table gives no TPM for `qwen-turbo` snapshots; 100,000 is assumed,
    /// like the other snapshots.) Numbers change by region, date and account:
    /// override them with [`QuotaTable::set`].
    ///
    /// # Why a burst of one
    ///
    /// DashScope enforces RPM and TPM also per second: RPS = RPM / 60,
    /// TPS = TPM / 60 ("a burst of requests in a short time can still trigger
    /// rate limiting"). A GCRA with rate `r` and burst `b` admits up to
    /// `b + r·T` in a window of length `T`; over one second that is `b + RPS`,
    /// so any burst above one request lets a second see more than RPS requests
    /// once the bucket has filled. With `b = 1` the requests of any one-second
    /// window (aligned however the server likes) are at most RPS.
    ///
    /// Tokens work the same way with the *admit-when-full* rule (see
    /// [`bucket`](super::bucket)): with a burst of one token, every call costs
    /// more than the burst, so a call is admitted only when the token bucket
    /// has no debt left, and its estimate then becomes debt repaid at TPS. In
    /// any one-second window, the tokens of all calls but the last are covered
    /// by elapsed time (`< TPS`), so every call arrives while the window is
    /// still under its limit, which is exactly the test DashScope (and the
    /// mock) apply, charging the arriving call in full. The sustained rate is
    /// the full quota; only the first-second burst is given up.
    pub fn qwen() -> Self {
        Self {
            models: Arc::default(),
            default: None,
        }
    }

    /// Overrides the limits of one model (matched exactly, case-insensitive).
    pub fn set(mut self, model: impl AsRef<str>, limits: Limits) -> Self {
        Arc::make_mut(&mut self.models).insert(
            model.as_ref().trim().to_ascii_lowercase().into_boxed_str(),
            limits,
        );
        self
    }

    /// The limits for models not overridden. Default is the published
    /// default of each model for [`QuotaTable::qwen`].
    pub fn default_limits(mut self, limits: Limits) -> Self {
        self.default = Some(limits);
        self
    }

    /// The limits for `model` (`None`: the request named no model).
    pub fn get(&self, model: Option<&str>) -> Limits {
        if let Some(m) = model {
            if !self.models.is_empty() {
                let key = m.trim().to_ascii_lowercase();
                if let Some(l) = self.models.get(key.as_str()) {
                    return *l;
                }
            }
            if self.default.is_none() {
                return qwen_defaults(m);
            }
        }
        self.default.unwrap_or_else(|| qwen_defaults(""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_round_up() {
        let q = Quota::per_minute(nz(600));
        assert_eq!(q.replenish_interval(), Duration::from_millis(100));
        assert_eq!(Quota::per_second(nz(3)).interval_nanos(), 333_333_334);
        assert!(Quota::new(nz(10), Duration::from_nanos(5)).is_err());
        assert!(Quota::with_period(Duration::ZERO).is_none());
        assert_eq!(
            Quota::tokens_per_minute(nz(100_000)).interval_nanos(),
            600_000
        );
    }

    #[test]
    fn qwen_table() {
        assert_eq!(qwen_defaults("qwen-plus"), qwen_limits(600, 1_000_000));
        assert_eq!(qwen_defaults("qwen-plus-latest"), qwen_limits(60, 100_000));
        assert_eq!(
            qwen_defaults("qwen-max-2025-01-25"),
            qwen_limits(60, 100_000)
        );
        assert_eq!(qwen_defaults("qwen-plus-0919"), qwen_limits(60, 100_000));
        assert_eq!(qwen_defaults("qwen-turbo"), qwen_limits(600, 5_000_000));
        assert_eq!(qwen_defaults("qwen3-32b"), qwen_limits(600, 1_000_000));
        assert_eq!(
            qwen_defaults("qwen2.5-14b-instruct-1m"),
            qwen_limits(1_200, 5_000_000)
        );
        assert_eq!(qwen_defaults("QWEN-VL-MAX"), qwen_limits(1_200, 1_000_000));
        assert_eq!(qwen_defaults("mystery"), qwen_limits(60, 100_000));
        let l = qwen_defaults("qwen-plus");
        assert_eq!(l.get_requests().unwrap().burst().get(), 1);
        assert_eq!(l.get_tokens().unwrap().burst().get(), 1);
    }
}
