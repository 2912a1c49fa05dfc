//! Token budgets per calendar window: a [`Backend`] that counts the tokens
//! a key spends per UTC day and per UTC month, and refuses a call whose
//! estimate would cross a budget.
//!
//! A budget is a *fixed-window counter*, not a rate: "100,000 tokens today"
//! refills all at once at 00:00 UTC, where a [`Quota`](super::Quota)
//! refills continuously. It plugs into the one [`RateLimit`](super::RateLimit)
//! layer as a backend, so that the layer's machinery does the rest: the
//! call's estimate ([`Estimate`](super::Estimate): input plus `max_tokens`)
//! is charged at admission, and when the response body ends (streams
//! included) [`Reconcile`](super::future::Reconcile) gives back what the
//! call did not use, or charges its overrun; a call the upstream refused
//! (or that never left: a local refusal inside) is refunded. A refusal is
//! a [`BudgetExceeded`] naming the window, with the time to its reset as
//! `retry_after`; use the layer in reject mode (a wait until midnight is
//! no wait).
//!
//! The windows are calendar windows in UTC, read from a [`WallClock`]: a
//! wall-clock time captured once plus the tokio clock's progress since, so
//! that `#[tokio::test(start_paused = true)]` and `tokio::time::advance`
//! move a test across midnight or into the next month.
//!
//! This backend keeps its counters in memory (lost on restart, per
//! process); [`RedisBudget`](crate::redis::RedisBudget) keeps them in
//! Redis, shared by replicas and kept across restarts.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::num::NonZeroU64;
//! use std::time::{Duration, SystemTime};
//! use http_body_util::Full;
//! use bytes::Bytes;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::rate_limit::{Budget, BudgetLimits, RateLimitLayer, WallClock};
//! use tower_qwen::rate_limit::error::BudgetExceeded;
//!
//! // 2,000 tokens a day; it is 22:00 UTC.
//! let ten_pm = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 22 * 3600);
//! let budget = Budget::builder()
//!     .clock(WallClock::starting_at(ten_pm))
//!     .build(BudgetLimits::per_day(NonZeroU64::new(2_000).unwrap()));
//! let svc = ServiceBuilder::new()
//!     .layer(RateLimitLayer::new(budget).reject())
//!     .service_fn(|_req: http::Request<Full<Bytes>>| async {
//!         Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from_static(b"{}"))))
//!     });
//! // Each call reserves its input estimate plus max_tokens (1,000).
//! let req = || {
//!     http::Request::post("/compatible-mode/v1/chat/completions")
//!         .body(Full::new(Bytes::from_static(
//!             br#"{"model":"qwen-plus","max_tokens":1000,"messages":[{"role":"user","content":"hi"}]}"#,
//!         )))
//!         .unwrap()
//! };
//! assert!(svc.clone().oneshot(req()).await.is_ok());
//! let err = svc.clone().oneshot(req()).await.unwrap_err();
//! let over = err.downcast_ref::<BudgetExceeded>().unwrap();
//! assert!(over.is_daily());
//! assert_eq!(over.retry_after(), Some(Duration::from_secs(2 * 3600)));
//! // Past midnight, a new day's budget.
//! tokio::time::advance(Duration::from_secs(2 * 3600)).await;
//! assert!(svc.oneshot(req()).await.is_ok());
//! # }
//! ```

use std::fmt;
use std::hash::Hash;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use crate::BoxError;
use crate::classify::ThrottleCause;
use crate::key::store::Store;
use crate::time::{self, Instant};

use super::backend::{Backend, Decision, Immediate, Permit, Ticket};
use super::error::BudgetExceeded;
use super::limiter::sealed;
use super::limiter::{Cost, DimState, InMemory, Snapshot};

const DAY: u64 = 86_400;

/// A calendar window of a budget, in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Period {
    /// From 00:00 UTC to the next 00:00 UTC.
    Day,
    /// From the first of the month, 00:00 UTC, to the first of the next.
    Month,
}

impl Period {
    /// `"day"` or `"month"`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
        }
    }

    const fn index(self) -> usize {
        match self {
            Period::Day => 0,
            Period::Month => 1,
        }
    }

    const ALL: [Period; 2] = [Period::Day, Period::Month];
}

/// How many tokens a key may spend per UTC day and per UTC month. See the
/// [module docs](self) for an example.
///
/// # Default
///
/// No budget ([`BudgetLimits::NONE`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BudgetLimits {
    limits: [Option<NonZeroU64>; 2],
}

impl BudgetLimits {
    /// No budget: every call is admitted and nothing is counted.
    pub const NONE: BudgetLimits = BudgetLimits {
        limits: [None, None],
    };

    /// `tokens` per UTC day.
    pub const fn per_day(tokens: NonZeroU64) -> Self {
        Self::NONE.and_per_day(tokens)
    }

    /// `tokens` per UTC month.
    pub const fn per_month(tokens: NonZeroU64) -> Self {
        Self::NONE.and_per_month(tokens)
    }

    /// These limits and `tokens` per UTC day.
    pub const fn and_per_day(mut self, tokens: NonZeroU64) -> Self {
        self.limits[0] = Some(tokens);
        self
    }

    /// These limits and `tokens` per UTC month.
    pub const fn and_per_month(mut self, tokens: NonZeroU64) -> Self {
        self.limits[1] = Some(tokens);
        self
    }

    /// The budget of `period`, if any.
    pub const fn get(&self, period: Period) -> Option<NonZeroU64> {
        self.limits[period.index()]
    }

    /// Whether there is no budget at all.
    pub const fn is_none(&self) -> bool {
        self.limits[0].is_none() && self.limits[1].is_none()
    }
}

/// Wall-clock time in UTC, for calendar windows: a wall-clock time
/// captured once, plus the progress of the tokio clock since then. Under
/// a paused test clock, `tokio::time::advance` moves it.
///
/// # Default
///
/// [`WallClock::system`], captured when the budget is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    base: Duration,
    anchor: Instant,
}

impl WallClock {
    /// The system's time now (read once).
    pub fn system() -> Self {
        Self::starting_at(time::system_now())
    }

    /// `at` now: the clock reads `at` plus the tokio time that passes
    /// from this call on. A time before 1970 reads as 1970.
    pub fn starting_at(at: SystemTime) -> Self {
        Self {
            base: at
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default(),
            anchor: time::now(),
        }
    }

    /// The time since the Unix epoch at the tokio instant `now`.
    pub fn since_epoch(&self, now: Instant) -> Duration {
        self.base
            .saturating_add(now.saturating_duration_since(self.anchor))
    }
}

/// One window of a period: its id (days or months since the epoch), and
/// its bounds in seconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) period: Period,
    pub(crate) id: u64,
    pub(crate) end: u64,
}

impl Window {
    /// The window of `period` holding second `secs` since the epoch.
    pub(crate) fn at(period: Period, secs: u64) -> Self {
        let day = secs / DAY;
        match period {
            Period::Day => Self {
                period,
                id: day,
                end: (day + 1) * DAY,
            },
            Period::Month => {
                let (y, m, _) = civil_from_days(day);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                Self {
                    period,
                    id: y * 12 + (m - 1),
                    end: days_from_civil(ny, nm, 1) * DAY,
                }
            }
        }
    }

    /// `2026-03-31` for a day, `2026-03` for a month.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn label(&self) -> String {
        match self.period {
            Period::Day => {
                let (y, m, d) = civil_from_days(self.id);
                format!("{y:04}-{m:02}-{d:02}")
            }
            Period::Month => format!("{:04}-{:02}", self.id / 12, self.id % 12 + 1),
        }
    }

    /// The time from `now` (since the epoch) to the window's end.
    pub(crate) fn reset_after(&self, now: Duration) -> Duration {
        Duration::from_secs(self.end).saturating_sub(now)
    }
}

/// The civil date (year, month 1-12, day 1-31) of `days` since 1970-01-01
/// in the proleptic Gregorian calendar (days counted in 400-year eras of
/// 146,097 days, years starting in March so the leap day comes last).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    // Shift the epoch to 0000-03-01.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

/// The days since 1970-01-01 of a civil date from 1970 on (the inverse of
/// [`civil_from_days`]).
fn days_from_civil(y: u64, m: u64, d: u64) -> u64 {
    let y = y - u64::from(m <= 2);
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// What a key spent in one period's current window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Count {
    /// The window's id + 1 (0: nothing counted yet).
    window: u64,
    used: u64,
}

impl Count {
    /// What was spent in `w` (0 when the count is of an older window).
    pub(crate) fn used_in(&self, w: &Window) -> u64 {
        if self.window == w.id + 1 {
            self.used
        } else {
            0
        }
    }

    pub(crate) fn set(&mut self, w: &Window, used: u64) {
        self.window = w.id + 1;
        self.used = used;
    }
}

/// The windows a budget counts in at `secs`: one per period with a limit.
pub(crate) fn windows(limits: &BudgetLimits, secs: u64) -> [Option<Window>; 2] {
    Period::ALL.map(|p| limits.get(p).map(|_| Window::at(p, secs)))
}

/// The refusal of `tokens` when `used` (per period, in `ws`) leaves no room
/// for them: of the windows that refuse, the one that resets last (a
/// month's budget is not back at midnight).
pub(crate) fn refusal(
    limits: &BudgetLimits,
    ws: &[Option<Window>; 2],
    used: [u64; 2],
    tokens: u64,
    now: Duration,
) -> Option<BudgetExceeded> {
    let mut out: Option<(Window, u64, u64)> = None;
    for p in Period::ALL {
        let (Some(w), Some(limit)) = (ws[p.index()], limits.get(p)) else {
            continue;
        };
        let used = used[p.index()];
        if used.saturating_add(tokens) > limit.get() && out.is_none_or(|(o, ..)| w.end > o.end) {
            out = Some((w, limit.get(), used));
        }
    }
    out.map(|(w, limit, used)| BudgetExceeded::new(w.period, limit, used, w.reset_after(now)))
}

/// Charges `tokens` to `counts` in the windows `ws`, or refuses them
/// (nothing charged).
fn charge(
    counts: &mut [Count; 2],
    limits: &BudgetLimits,
    ws: &[Option<Window>; 2],
    tokens: u64,
    now: Duration,
) -> Result<(), BudgetExceeded> {
    let used = Period::ALL.map(|p| ws[p.index()].map_or(0, |w| counts[p.index()].used_in(&w)));
    if let Some(refused) = refusal(limits, ws, used, tokens, now) {
        return Err(refused);
    }
    for p in Period::ALL {
        if let Some(w) = ws[p.index()] {
            counts[p.index()].set(&w, used[p.index()] + tokens);
        }
    }
    Ok(())
}

/// The window of a key's budget with the least room left: what
/// `x-ratelimit-*-tokens` show.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tightest {
    pub(crate) limit: u64,
    pub(crate) remaining: u64,
    pub(crate) reset: Duration,
}

impl Tightest {
    /// As a [`Snapshot`] (tokens only; the limit capped at `u32::MAX`).
    fn snapshot(self) -> Snapshot {
        Snapshot {
            requests: None,
            tokens: Some(DimState {
                limit: u32::try_from(self.limit).unwrap_or(u32::MAX),
                remaining: self.remaining,
                reset: self.reset,
                retry_after: if self.remaining == 0 {
                    self.reset
                } else {
                    Duration::ZERO
                },
                rate: 1.0,
            }),
            throttles: 0,
            last_throttle: None,
        }
    }
}

/// The window with the least room left (ties: the one that resets last).
fn tightest(
    limits: &BudgetLimits,
    ws: &[Option<Window>; 2],
    used: [u64; 2],
    now: Duration,
) -> Option<Tightest> {
    let mut best: Option<(u64, Window, u64)> = None;
    for p in Period::ALL {
        let (Some(w), Some(limit)) = (ws[p.index()], limits.get(p)) else {
            continue;
        };
        let left = limit.get().saturating_sub(used[p.index()]);
        if best.is_none_or(|(l, b, _)| left < l || (left == l && w.end > b.end)) {
            best = Some((left, w, limit.get()));
        }
    }
    best.map(|(remaining, w, limit)| Tightest {
        limit,
        remaining,
        reset: w.reset_after(now),
    })
}

/// One key's counters.
#[derive(Debug, Default)]
pub(crate) struct Counters(Mutex<[Count; 2]>);

impl Counters {
    fn lock(&self) -> MutexGuard<'_, [Count; 2]> {
        // A panic while holding it cannot leave a half-written count: the
        // counts are plain words.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether every count is of a window that is over (the key can go).
    fn is_idle(&self, secs: u64) -> bool {
        self.lock()
            .iter()
            .enumerate()
            .all(|(i, c)| c.window == 0 || Window::at(Period::ALL[i], secs).id + 1 != c.window)
    }
}

struct Shared<K> {
    limits_for: sealed::BudgetLimitsFor<K>,
    clock: WallClock,
    counts: Arc<Counts<K>>,
}

/// The counters of every key (shared by [`Budget::with_limits`]).
struct Counts<K> {
    store: Store<K, Counters>,
    overflow: OnceLock<Counters>,
}

/// Builds a token budget, whatever its backend: the settings both
/// backends share are set here once, the backend is chosen by the type
/// parameter `S` (the [`BudgetStore`]): [`InMemory`] from
/// [`Budget::builder`] (a [`Budget`]), or Redis after
/// [`redis`](BudgetBuilder::redis) (a
/// [`RedisBudget`](crate::redis::RedisBudget), with the Redis-only
/// settings of [`RedisStore`](crate::redis::RedisStore)); `build` and
/// `build_with` then make that backend. See the [module docs](self) for a
/// budget in a stack.
///
/// # Example
///
/// ```
/// use std::num::NonZeroU64;
/// use std::time::{Duration, SystemTime};
/// use tower_qwen::rate_limit::{Budget, BudgetLimits, WallClock};
///
/// let noon = SystemTime::UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + 12 * 3600);
/// let shared = Budget::builder().clock(WallClock::starting_at(noon)).max_keys(10_000);
/// // Per-key limits, in memory (on Redis: `shared.redis(conn).build_with(..)`).
/// let budget = shared.build_with(|key: &String| match key.as_str() {
///     "free" => BudgetLimits::per_day(NonZeroU64::new(10_000).unwrap()),
///     _ => BudgetLimits::NONE,
/// });
/// let today = budget.snapshot(&"free".to_owned()).unwrap().tokens.unwrap();
/// assert_eq!(today.remaining, 10_000);
/// // The day ends at midnight UTC, 12 h after the clock's noon.
/// assert!(today.reset <= Duration::from_secs(12 * 3600) && today.reset > Duration::from_secs(11 * 3600));
/// assert!(budget.snapshot(&"paid".to_owned()).is_none());
/// ```
#[derive(Clone, Copy, Debug)]
pub struct BudgetBuilder<S = InMemory> {
    pub(crate) clock: Option<WallClock>,
    pub(crate) max_keys: usize,
    /// Read by the Redis store (the in-memory one is a unit).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) store: S,
}

/// Where a [`BudgetBuilder`] keeps the counters of the budget it builds
/// for keys of type `K`, and so which backend it builds: [`InMemory`]
/// builds a [`Budget<K>`](Budget), Redis a
/// [`RedisBudget<K>`](crate::redis::RedisBudget). Sealed.
///
/// # Example
///
/// ```
/// use std::num::NonZeroU64;
/// use tower_qwen::rate_limit::{Budget, BudgetBuilder, BudgetLimits, BudgetStore};
///
/// // Generic over the store: the same settings, any backend.
/// fn daily<S: BudgetStore<String>>(b: BudgetBuilder<S>) -> S::Budget {
///     b.max_keys(1_000).build(BudgetLimits::per_day(NonZeroU64::new(10_000).unwrap()))
/// }
/// let budget = daily(Budget::builder());
/// assert_eq!(budget.snapshot(&"ann".to_owned()).unwrap().tokens.unwrap().remaining, 10_000);
/// ```
pub trait BudgetStore<K>: sealed::Sealed + Sized {
    /// The backend built.
    type Budget: Backend<K>;

    #[doc(hidden)]
    fn build_budget(b: BudgetBuilder<Self>, limits_for: sealed::BudgetLimitsFor<K>)
    -> Self::Budget;
}

impl<K> BudgetStore<K> for InMemory
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Budget = Budget<K>;

    fn build_budget(b: BudgetBuilder<Self>, limits_for: sealed::BudgetLimitsFor<K>) -> Budget<K> {
        Budget {
            shared: Arc::new(Shared {
                limits_for,
                clock: b.clock.unwrap_or_else(WallClock::system),
                counts: Arc::new(Counts {
                    store: Store::new(b.max_keys, 60 * 1_000_000_000, "token budget"),
                    overflow: OnceLock::new(),
                }),
            }),
        }
    }
}

impl<S> BudgetBuilder<S> {
    /// The clock the windows are read from. Default is
    /// [`WallClock::system`] when the budget is built. Replicas sharing a
    /// Redis budget agree on a window as far as their clocks agree.
    pub fn clock(mut self, clock: WallClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// The most keys counted at once (on Redis: whose counts this process
    /// remembers, for snapshots and the fail-open fallback). Default is
    /// 100,000. A key whose windows are all over is forgotten when room is
    /// needed; if every key is busy, new keys share one overflow count
    /// (still limited, together).
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(1);
        self
    }

    /// A budget with the same limits for every key.
    pub fn build<K>(self, limits: BudgetLimits) -> <S as BudgetStore<K>>::Budget
    where
        S: BudgetStore<K>,
    {
        self.build_with(move |_: &K| limits)
    }

    /// A budget whose limits depend on the key (asked at every call, so
    /// keep it cheap).
    pub fn build_with<K, F>(self, limits_for: F) -> <S as BudgetStore<K>>::Budget
    where
        S: BudgetStore<K>,
        F: Fn(&K) -> BudgetLimits + Send + Sync + 'static,
    {
        S::build_budget(self, Arc::new(limits_for))
    }

    /// The same shared settings over another store (the Redis backend's
    /// `redis` uses it).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn with_store<T>(self, store: T) -> BudgetBuilder<T> {
        BudgetBuilder {
            clock: self.clock,
            max_keys: self.max_keys,
            store,
        }
    }
}

/// Token budgets per UTC day and month, in memory: a [`Backend`] for
/// [`RateLimit`](super::RateLimit). See the [module docs](self).
///
/// # Clone
///
/// Clones share the counters.
pub struct Budget<K = ()> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for Budget<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K> fmt::Debug for Budget<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Budget")
            .field("clock", &self.shared.clock)
            .finish_non_exhaustive()
    }
}

impl Budget {
    /// A builder, in memory until another store is chosen (see
    /// [`BudgetBuilder`]).
    pub fn builder() -> BudgetBuilder {
        BudgetBuilder {
            clock: None,
            max_keys: 100_000,
            store: InMemory,
        }
    }
}

impl<K> Budget<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A budget with new limits over the same counters and clock: what
    /// the keys spent so far still counts (a gateway reloading its
    /// configuration keeps its budgets this way).
    pub fn with_limits<F>(&self, limits_for: F) -> Budget<K>
    where
        F: Fn(&K) -> BudgetLimits + Send + Sync + 'static,
    {
        Budget {
            shared: Arc::new(Shared {
                limits_for: Arc::new(limits_for),
                clock: self.shared.clock,
                counts: self.shared.counts.clone(),
            }),
        }
    }

    /// The limits of `key`.
    pub fn limits(&self, key: &K) -> BudgetLimits {
        (self.shared.limits_for)(key)
    }

    /// The clock the windows are read from.
    pub fn clock(&self) -> WallClock {
        self.shared.clock
    }

    /// Runs `f` on `key`'s counters (created if new; the overflow counters
    /// when the store is full of busy keys: then `f` is told so).
    fn with_counters<R>(&self, key: &K, secs: u64, f: impl FnOnce(&Counters, bool) -> R) -> R {
        let sh = &*self.shared.counts;
        let now_ns = secs.saturating_mul(1_000_000_000);
        match sh
            .store
            .get_or_insert_with(key, now_ns, Counters::default, |c| c.is_idle(secs))
        {
            Some(c) => f(&c, false),
            None => f(sh.overflow.get_or_init(Counters::default), true),
        }
    }

    /// Sets what `key` spent in `w` (a Redis budget's local view).
    #[cfg(feature = "redis")]
    pub(crate) fn record(&self, key: &K, w: &Window, used: u64, secs: u64) {
        self.with_counters(key, secs, |c, _| {
            c.lock()[w.period.index()].set(w, used);
        });
    }

    /// Charges `tokens` to `key` at `now`, or refuses them.
    fn charge(
        &self,
        key: &K,
        limits: &BudgetLimits,
        tokens: u64,
        now: Instant,
    ) -> Result<([Option<Window>; 2], bool), BudgetExceeded> {
        let at = self.shared.clock.since_epoch(now);
        let ws = windows(limits, at.as_secs());
        let overflow = self.with_counters(key, at.as_secs(), |c, overflow| {
            charge(&mut c.lock(), limits, &ws, tokens, at).map(|()| overflow)
        })?;
        Ok((ws, overflow))
    }

    /// Admits a call of `tokens` for `key` at `now`, or refuses it.
    pub(crate) fn admit(
        &self,
        key: &K,
        tokens: u32,
        now: Instant,
    ) -> Result<BudgetPermit<K>, BudgetExceeded> {
        let limits = self.limits(key);
        if limits.is_none() {
            return Ok(BudgetPermit { inner: None });
        }
        match self.charge(key, &limits, u64::from(tokens), now) {
            Ok((windows, overflow)) => Ok(BudgetPermit {
                inner: (tokens > 0).then(|| Charged {
                    budget: self.clone(),
                    key: key.clone(),
                    windows,
                    overflow,
                    tokens,
                }),
            }),
            Err(e) => {
                tracing::debug!(
                    period = e.period().as_str(),
                    retry_after_s = e.retry_after().unwrap_or_default().as_secs(),
                    "token budget refused a call"
                );
                Err(e)
            }
        }
    }

    /// Gives back the estimate less `actual` (or charges the overrun) in
    /// the windows a call was charged to (its key's or the overflow
    /// counters), where they are still current.
    fn reconcile(&self, c: &Charged<K>, actual: u64) {
        let counts = &self.shared.counts;
        let estimated = u64::from(c.tokens);
        if c.overflow {
            if let Some(o) = counts.overflow.get() {
                adjust(&mut o.lock(), &c.windows, estimated, actual);
            }
        } else if let Some(counters) = counts.store.get(&c.key) {
            adjust(&mut counters.lock(), &c.windows, estimated, actual);
        }
    }

    /// `key`'s budget now, as far as this process counted: the window with
    /// the least room left (its limit capped at `u32::MAX` in the
    /// snapshot's `limit`). `None` for a key without a budget.
    pub fn snapshot(&self, key: &K) -> Option<Snapshot> {
        self.tightest(key).map(Tightest::snapshot)
    }

    /// `key`'s window with the least room left, exact.
    pub(crate) fn tightest(&self, key: &K) -> Option<Tightest> {
        let limits = self.limits(key);
        if limits.is_none() {
            return None;
        }
        let at = self.shared.clock.since_epoch(time::now());
        let ws = windows(&limits, at.as_secs());
        let counts = self
            .shared
            .counts
            .store
            .get(key)
            .map(|c| *c.lock())
            .unwrap_or_default();
        let used = Period::ALL.map(|p| ws[p.index()].map_or(0, |w| counts[p.index()].used_in(&w)));
        tightest(&limits, &ws, used, at)
    }
}

fn adjust(counts: &mut [Count; 2], ws: &[Option<Window>; 2], estimated: u64, actual: u64) {
    for (c, w) in counts.iter_mut().zip(ws) {
        if let Some(w) = w
            && c.window == w.id + 1
        {
            c.used = c.used.saturating_sub(estimated).saturating_add(actual);
        }
    }
}

impl<K> Backend<K> for Budget<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Ticket = BudgetTicket<BudgetPermit<K>>;
    type Pending = Immediate<Result<Self::Ticket, BoxError>>;

    fn decide<W: FnOnce(bool) -> Cost>(
        &self,
        key: &K,
        weigh: W,
        _max_wait: Duration,
        now: Instant,
    ) -> Decision<Self::Ticket, Self::Pending> {
        if self.limits(key).is_none() {
            return Decision::Admitted(BudgetPermit { inner: None });
        }
        match self.admit(key, weigh(true).tokens, now) {
            Ok(p) => Decision::Admitted(p),
            Err(e) => Decision::Refused(e.into()),
        }
    }

    fn snapshot(&self, key: &K) -> Option<Snapshot> {
        Budget::snapshot(self, key)
    }
}

/// A budget's decision is made at once: a ticket is ready when made. (The
/// [`Backend`] contract asks for one; budgets never book a later slot.)
#[derive(Debug)]
pub struct BudgetTicket<P> {
    permit: P,
    at: Instant,
}

impl<P> BudgetTicket<P> {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn ready(permit: P) -> Self {
        Self {
            permit,
            at: time::now(),
        }
    }
}

impl<P: Permit> Ticket for BudgetTicket<P> {
    type Permit = P;

    fn ready_at(&self) -> Instant {
        self.at
    }

    fn admit(self) -> P {
        self.permit
    }
}

struct Charged<K> {
    budget: Budget<K>,
    key: K,
    windows: [Option<Window>; 2],
    /// Charged to the overflow counters (the store was full).
    overflow: bool,
    tokens: u32,
}

/// A call admitted by [`Budget`]: its estimate is charged; [`Permit::finish`]
/// with the real usage gives back the difference (or charges the overrun)
/// in the windows it was charged to, if they are still current.
pub struct BudgetPermit<K> {
    inner: Option<Charged<K>>,
}

impl<K> BudgetPermit<K> {
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) fn inner_tokens(&self) -> u32 {
        self.inner.as_ref().map_or(0, |c| c.tokens)
    }
}

impl<K> fmt::Debug for BudgetPermit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BudgetPermit")
            .field("tokens", &self.inner.as_ref().map(|c| c.tokens))
            .finish()
    }
}

impl<K> Permit for BudgetPermit<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn tokens(&self) -> u32 {
        self.inner.as_ref().map_or(0, |c| c.tokens)
    }

    fn wants_feedback(&self) -> bool {
        false
    }

    fn finish(self, _throttled: Option<ThrottleCause>, tokens: Option<u32>) {
        if let (Some(c), Some(actual)) = (self.inner, tokens) {
            c.budget.reconcile(&c, u64::from(actual));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nz(n: u64) -> NonZeroU64 {
        NonZeroU64::new(n).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_token_reservation_outside_is_given_back_when_a_budget_inside_refuses() {
        use super::super::{Limits, Quota, RateLimitLayer, RateLimiter};
        use bytes::Bytes;
        use http_body_util::Full;
        use std::num::NonZeroU32;
        use tower::{ServiceBuilder, ServiceExt};

        let n = NonZeroU32::new(10_000).unwrap();
        let tpm = RateLimiter::new(Limits::tokens(Quota::tokens_per_minute(n).allow_burst(n)));
        let budget = Budget::builder()
            .clock(WallClock::starting_at(SystemTime::UNIX_EPOCH))
            .build(BudgetLimits::per_day(nz(10)));
        let svc = ServiceBuilder::new()
            .layer(RateLimitLayer::new(tpm.clone()).reject())
            .layer(RateLimitLayer::new(budget).reject())
            .service_fn(|_req: http::Request<Full<Bytes>>| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
            });
        let req = http::Request::post("/compatible-mode/v1/chat/completions")
            .body(Full::new(Bytes::from_static(
                br#"{"model":"qwen-plus","max_tokens":100,"messages":[{"role":"user","content":"hi"}]}"#,
            )))
            .unwrap();
        let err = svc.oneshot(req).await.unwrap_err();
        let over = err
            .downcast_ref::<BudgetExceeded>()
            .expect("the budget refused");
        assert_eq!((over.limit(), over.remaining()), (10, 10));
        // Nothing left: the outer reservation was refunded.
        let left = tpm.snapshot(&()).unwrap().tokens.unwrap().remaining;
        assert_eq!(left, 10_000);
    }

    #[test]
    fn a_full_store_counts_new_keys_together_and_reconciles_each_where_it_was_charged() {
        let budget = Budget::builder()
            .clock(WallClock::starting_at(SystemTime::UNIX_EPOCH))
            .max_keys(1)
            .build(BudgetLimits::per_day(nz(100)));
        let now = time::now();
        let admit = |k: &'static str, n: u32| match budget.decide(
            &k,
            |_| Cost::call(n),
            Duration::ZERO,
            now,
        ) {
            Decision::Admitted(p) => p,
            other => panic!("{other:?}"),
        };
        let a = admit("a", 60);
        // `b` and `c` overflow (the store holds one busy key): together.
        let b = admit("b", 30);
        assert!(matches!(
            budget.decide(&"c", |_| Cost::call(80), Duration::ZERO, now),
            Decision::Refused(_)
        ));
        // Each reconciles where it was charged.
        b.finish(None, Some(10));
        a.finish(None, Some(20));
        assert_eq!(budget.snapshot(&"a").unwrap().tokens.unwrap().remaining, 80);
        let c = admit("c", 90);
        assert_eq!(c.tokens(), 90);
    }

    #[test]
    fn the_calendar_round_trips() {
        // 1970-01-01, 2000-02-29 (a leap day of a century year), 2026-12-31.
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(days_from_civil(2026, 12, 31), 20_818);
        for d in (0..200_000).step_by(7) {
            let (y, m, dd) = civil_from_days(d);
            assert_eq!(days_from_civil(y, m, dd), d);
        }
    }

    #[test]
    fn windows_and_their_ends() {
        // 2026-01-31 23:59:59 UTC.
        let secs = days_from_civil(2026, 1, 31) * DAY + DAY - 1;
        let d = Window::at(Period::Day, secs);
        assert_eq!(d.label(), "2026-01-31");
        assert_eq!(d.end, secs + 1);
        let m = Window::at(Period::Month, secs);
        assert_eq!(m.label(), "2026-01");
        assert_eq!(m.end, days_from_civil(2026, 2, 1) * DAY);
        // December rolls into January; February 2028 has 29 days.
        let dec = Window::at(Period::Month, days_from_civil(2026, 12, 15) * DAY);
        assert_eq!(dec.end, days_from_civil(2027, 1, 1) * DAY);
        let feb = Window::at(Period::Month, days_from_civil(2028, 2, 10) * DAY);
        assert_eq!(feb.end - days_from_civil(2028, 2, 1) * DAY, 29 * DAY);
        assert_eq!(Window::at(Period::Month, dec.end).label(), "2027-01");
    }

    #[test]
    fn a_charge_fits_or_is_refused_by_the_window_that_resets_last() {
        let limits = BudgetLimits::per_day(nz(100)).and_per_month(nz(150));
        let secs = days_from_civil(2026, 3, 10) * DAY + 3600;
        let now = Duration::from_secs(secs);
        let ws = windows(&limits, secs);
        let mut c = [Count::default(); 2];
        assert!(charge(&mut c, &limits, &ws, 100, now).is_ok());
        let e = charge(&mut c, &limits, &ws, 1, now).unwrap_err();
        assert!(e.is_daily());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(DAY - 3600)));
        // The next day: the month refuses what the day would take.
        let next = secs + DAY;
        let ws = windows(&limits, next);
        assert!(charge(&mut c, &limits, &ws, 50, Duration::from_secs(next)).is_ok());
        let e = charge(&mut c, &limits, &ws, 1, Duration::from_secs(next)).unwrap_err();
        assert!(e.is_monthly());
        assert_eq!((e.limit(), e.remaining()), (150, 0));
        // Reconciling gives back in the current windows only.
        adjust(&mut c, &ws, 50, 10);
        assert_eq!(c[0].used_in(&ws[0].unwrap()), 10);
        assert_eq!(c[1].used_in(&ws[1].unwrap()), 110);
    }
}
