//! The in-memory backend: per-key state (one word for a request-only key),
//! the two-dimension decision, slow start, feedback, eviction and
//! snapshots.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue};

use crate::BoxError;
use crate::classify::ThrottleCause;
use crate::key::store::Store;
use crate::time::{self, Instant, duration_nanos};

use super::backend::{Backend, Decision, Immediate, Permit, Reservation, Ticket};
use super::bucket::{Bucket, FULL_RATE, Gcra, Grant, Ramp, RampKind, rate_from_f64, rate_to_f64};
use super::error::{Dimension, RateLimited};
use super::quota::{Limits, Quota};

/// What one call costs: requests (usually 1) and tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Cost {
    /// Units of the request quota.
    pub requests: u32,
    /// Units of the token quota.
    pub tokens: u32,
}

impl Cost {
    /// One request, no tokens.
    pub const ONE: Cost = Cost {
        requests: 1,
        tokens: 0,
    };

    /// One request of `tokens` tokens.
    pub const fn call(tokens: u32) -> Self {
        Cost {
            requests: 1,
            tokens,
        }
    }

    /// Any cost.
    pub const fn new(requests: u32, tokens: u32) -> Self {
        Cost { requests, tokens }
    }
}

/// Slow start: after a key has been idle, admit at a lower rate, hold it,
/// then grow it to the full quota, so that DashScope's growth guard
/// ("Request rate increased too quickly", `Throttling.BurstRate`) is not
/// tripped by a cold start. A new key is an idle key.
///
/// The rate grows **geometrically**: by the same ratio every second,
/// `(1 / initial)^(1 / (ramp - hold))`, which is what a guard that compares
/// a second's rate with the seconds before it sees; a linear ramp grows
/// fastest (as a ratio) at its start, where the guard is tightest, and
/// slowest at its end, where it is loosest. Holding the starting rate for a
/// second means that whichever second boundaries the service counts in,
/// its first full second holds the starting share.
///
/// # Default
///
/// Starts at 25% of the quota, no hold, full rate after the given time,
/// and counts a key as idle once its buckets have been full for 10 s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    initial: u32,
    hold: Duration,
    ramp: Duration,
    idle: Duration,
}

impl SlowStart {
    /// Ramp from 25% to 100% of the quota, reaching it `ramp` after the
    /// start.
    pub const fn new(ramp: Duration) -> Self {
        Self {
            initial: FULL_RATE / 4,
            hold: Duration::ZERO,
            ramp,
            idle: Duration::from_secs(10),
        }
    }

    /// The starting rate, as a fraction of the quota in `(0, 1]`. Default
    /// is 0.25.
    pub fn initial_rate(mut self, fraction: f64) -> Self {
        self.initial = rate_from_f64(fraction);
        self
    }

    /// How long the starting rate holds before it grows (at most the
    /// ramp). Default is zero.
    pub const fn hold(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    /// How long a key's buckets must have been full before the next call
    /// starts a new ramp. Default is 10 s.
    pub const fn idle_after(mut self, idle: Duration) -> Self {
        self.idle = idle;
        self
    }
}

/// Feedback: when the upstream throttles a call this limiter admitted
/// (classifier outcome `Throttled` with cause requests, tokens, burst,
/// overloaded or unknown, never `Local`), the key is paused (no call
/// admitted for `pause`, which moves past DashScope's one-second window),
/// then resumes at a lower rate that recovers linearly to the full quota.
/// Throttles of calls admitted before the last tightening are ignored, so
/// one burst of 429s tightens once; a throttle during recovery lowers the
/// rate again (multiplicatively).
///
/// Requests, burst: the request rate is lowered; tokens: the token rate;
/// overloaded and unknown: both. The pause applies to the whole key.
///
/// # Calls already waiting
///
/// Calls booked before such a tightening and still waiting for their slot
/// are *re-paced*: the quota work queued ahead of each one (the debt of
/// the calls already admitted and of the waiters before it, as it was
/// charged) is laid out again from the pause's end at the lowered,
/// recovering rate, so a deep queue booked at the full rate resumes at the
/// lowered rate rather than at its old spacing (which the upstream, idle
/// for the pause, would refuse again); in booking order, never earlier
/// than the pause alone would move it, and later calls book behind the
/// re-paced queue. A lone quota throttle's step down re-paces nothing.
///
/// # A lone quota throttle
///
/// The limiter never paces a key above its configured quota (a token
/// estimate that falls short is charged as soon as the usage is known), so
/// a *lone* throttle of the key's own quota (cause requests or tokens, no
/// other throttle acted on within [`repeat_within`](Self::repeat_within)
/// before it) is taken as timing, not as a wrong quota: calls paced at the
/// quota reach the upstream with varying delays, and a call meant for the
/// end of one of its counting windows (DashScope counts whole seconds)
/// lands in the next one, which then holds one call too many. Pausing the
/// key for a second and halving its rate would cost a second's quota and
/// more for that one refused call; instead, the throttled quota's rate
/// steps down by [`lone_rate_factor`](Self::lone_rate_factor) (a margin for
/// that jitter) without a pause, and recovers over the same `recover_over`
/// (a slow start in progress is left alone). A second throttle within
/// `repeat_within`, or any burst, overload or unknown throttle, tightens
/// as above: a quota set higher than the account's, or shared with another
/// client, draws them in a row.
///
/// The Redis backend replicates only the pause, with the same meaning: a
/// lone quota throttle, judged from the throttles this replica has seen,
/// pauses nothing (and steps no rate down: Redis keeps no rate ramps, and
/// the shared pacing already holds the key at its quota for the whole
/// fleet); a second one within `repeat_within`, or any burst, overload or
/// unknown throttle, pauses the key for every replica. Throttles of calls
/// admitted before the last one acted on are ignored, as in memory.
///
/// # Default
///
/// Pause 1 s, rate × 0.5 (never below 1/16 of the quota), recover over
/// 30 s; a lone quota throttle (none other within 2 s): rate × 0.98, no
/// pause.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Feedback {
    /// Read by the Redis backend, which replicates only the pause.
    pub(crate) pause: Duration,
    factor: u32,
    floor: u32,
    recover: Duration,
    lone_factor: u32,
    /// Read by the Redis backend, which judges lone throttles by it.
    pub(crate) repeat_within: Duration,
}

impl Default for Feedback {
    fn default() -> Self {
        Self::new()
    }
}

impl Feedback {
    /// The defaults: pause 1 s, halve the rate, recover over 30 s; a lone
    /// quota throttle lowers the rate by 2% without a pause.
    pub const fn new() -> Self {
        Self {
            pause: Duration::from_secs(1),
            factor: FULL_RATE / 2,
            floor: FULL_RATE / 16,
            recover: Duration::from_secs(30),
            lone_factor: FULL_RATE * 49 / 50,
            repeat_within: Duration::from_secs(2),
        }
    }

    /// How long a throttled key admits nothing. Default is 1 s.
    pub const fn pause(mut self, pause: Duration) -> Self {
        self.pause = pause;
        self
    }

    /// What the rate is multiplied by, in `(0, 1]`. Default is 0.5.
    pub fn rate_factor(mut self, factor: f64) -> Self {
        self.factor = rate_from_f64(factor);
        self
    }

    /// The lowest rate repeated throttles can bring a key to, as a fraction
    /// of the quota. Default is 1/16.
    pub fn min_rate(mut self, fraction: f64) -> Self {
        self.floor = rate_from_f64(fraction);
        self
    }

    /// How long the rate takes to climb back to the full quota. Default is
    /// 30 s.
    pub const fn recover_over(mut self, recover: Duration) -> Self {
        self.recover = recover;
        self
    }

    /// What a lone quota throttle multiplies the throttled quota's rate by,
    /// in `(0, 1]`, without a pause (see [the type's docs](Self)); 1 keeps
    /// the rate. Default is 0.98.
    pub fn lone_rate_factor(mut self, factor: f64) -> Self {
        self.lone_factor = rate_from_f64(factor);
        self
    }

    /// A quota throttle is lone when no other throttle was acted on within
    /// this time before it (see [the type's docs](Self)); zero makes every
    /// throttle tighten fully. Default is 2 s.
    pub const fn repeat_within(mut self, within: Duration) -> Self {
        self.repeat_within = within;
        self
    }
}

/// Builds a rate limiter, whatever its backend: the settings every
/// backend shares are set here once, the backend is chosen by the type
/// parameter `S` (the [`LimiterStore`]): [`InMemory`] from
/// [`RateLimiter::builder`] (a [`RateLimiter`]; [`InMemorySlowStart`] once
/// given a [`slow_start`](RateLimiterBuilder::slow_start)), or Redis after
/// [`redis`](RateLimiterBuilder::redis) (a
/// [`RedisLimiter`](crate::redis::RedisLimiter), with the Redis-only
/// settings of [`RedisStore`](crate::redis::RedisStore)); `build`,
/// `build_keyed` and `build_keyed_with` then make that backend.
///
/// # Example
///
/// ```
/// use std::num::NonZeroU32;
/// use std::time::Duration;
/// use tower_qwen::rate_limit::{Feedback, Limits, Quota, RateLimiter};
///
/// let limits = Limits::requests(Quota::per_minute(NonZeroU32::new(60).unwrap()));
/// let shared = RateLimiter::builder(limits)
///     .feedback(Feedback::new().pause(Duration::from_secs(2)))
///     .max_keys(10_000);
/// // In memory:
/// let limiter: RateLimiter<String> = shared.clone().build_keyed();
/// assert!(limiter.is_keyed());
/// ```
///
/// See the [module docs](super) for a limiter in a stack, and the
/// [Redis module's](crate::redis) for the same builder on Redis.
#[derive(Clone, Debug)]
pub struct RateLimiterBuilder<S = InMemory> {
    pub(crate) limits: Limits,
    pub(crate) feedback: Option<Feedback>,
    pub(crate) max_keys: usize,
    pub(crate) sweep_every: Duration,
    /// Read by the Redis store (the in-memory one is a unit).
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) store: S,
}

/// The in-memory store of a [`RateLimiterBuilder`] or a
/// [`BudgetBuilder`](super::BudgetBuilder), their default: state in this
/// process, shared by the clones of what they build.
///
/// # Example
///
/// ```
/// use tower_qwen::rate_limit::{InMemory, Limits, RateLimiter, RateLimiterBuilder};
///
/// let builder: RateLimiterBuilder<InMemory> = RateLimiter::builder(Limits::UNLIMITED);
/// let limiter: RateLimiter = builder.build();
/// assert!(!limiter.is_keyed());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct InMemory;

/// The in-memory store of a [`RateLimiterBuilder`] given a slow start:
/// what [`slow_start`](RateLimiterBuilder::slow_start) makes of the
/// builder. It builds a [`RateLimiter`], as [`InMemory`] does, and has no
/// `redis`: the Redis backend has no slow start (see
/// [the backends](super#the-backends)), so a builder given one cannot be
/// turned into a Redis one, and `.slow_start(..).redis(conn)` does not
/// compile rather than losing the slow start.
///
/// # Example
///
/// ```
/// use std::time::Duration;
/// use tower_qwen::rate_limit::{InMemorySlowStart, Limits, RateLimiter, RateLimiterBuilder, SlowStart};
///
/// let builder: RateLimiterBuilder<InMemorySlowStart> = RateLimiter::builder(Limits::UNLIMITED)
///     .slow_start(SlowStart::new(Duration::from_secs(3)));
/// let limiter: RateLimiter<String> = builder.build_keyed();
/// assert!(limiter.is_keyed());
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct InMemorySlowStart {
    slow_start: SlowStart,
}

/// Where a [`RateLimiterBuilder`] keeps the state of the limiter it builds
/// for keys of type `K`, and so which backend it builds: [`InMemory`] and
/// [`InMemorySlowStart`] build a [`RateLimiter<K>`](RateLimiter), Redis a
/// [`RedisLimiter<K>`](crate::redis::RedisLimiter) (whose keys must be a
/// [`StoreKey`](crate::key::StoreKey)). Sealed: implemented by the crate's
/// stores only (a backend of your own implements [`Backend`] and is built
/// your way).
///
/// # Example
///
/// ```
/// use tower_qwen::rate_limit::{Backend, LimiterStore, Limits, RateLimiter, RateLimiterBuilder};
///
/// // Generic over the store: the same settings, any backend.
/// fn per_user<S: LimiterStore<String>>(b: RateLimiterBuilder<S>) -> S::Limiter {
///     b.max_keys(1_000).build_keyed()
/// }
/// let limiter = per_user(RateLimiter::builder(Limits::UNLIMITED));
/// assert!(limiter.snapshot(&"ann".to_owned()).is_none());
/// ```
pub trait LimiterStore<K>: sealed::Sealed + Sized {
    /// The backend built.
    type Limiter: Backend<K>;

    #[doc(hidden)]
    fn build_limiter(b: RateLimiterBuilder<Self>, keys: sealed::Keys<K>) -> Self::Limiter;
}

pub(crate) mod sealed {
    use std::sync::Arc;

    use super::super::budget::BudgetLimits;
    use super::super::quota::Limits;

    /// Implemented by the crate's stores only.
    #[allow(unreachable_pub)]
    pub trait Sealed {}

    /// Which limits a built limiter gives its keys.
    #[allow(unreachable_pub)]
    pub enum Keys<K> {
        /// One limiter for everything (`build`).
        One,
        /// The builder's limits for every key (`build_keyed`).
        Same,
        /// Limits by key (`build_keyed_with`).
        Each(Arc<dyn Fn(&K) -> Limits + Send + Sync>),
    }

    impl<K> std::fmt::Debug for Keys<K> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(match self {
                Keys::One => "One",
                Keys::Same => "Same",
                Keys::Each(_) => "Each",
            })
        }
    }

    /// A budget's limits by key.
    #[allow(unreachable_pub)]
    pub type BudgetLimitsFor<K> = Arc<dyn Fn(&K) -> BudgetLimits + Send + Sync>;
}

impl sealed::Sealed for InMemory {}
impl sealed::Sealed for InMemorySlowStart {}

impl<K> LimiterStore<K> for InMemory
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Limiter = RateLimiter<K>;

    fn build_limiter(b: RateLimiterBuilder<Self>, keys: sealed::Keys<K>) -> RateLimiter<K> {
        RateLimiter::from_parts(b.with_store(()), None, keys)
    }
}

impl<K> LimiterStore<K> for InMemorySlowStart
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Limiter = RateLimiter<K>;

    fn build_limiter(b: RateLimiterBuilder<Self>, keys: sealed::Keys<K>) -> RateLimiter<K> {
        let slow_start = b.store.slow_start;
        RateLimiter::from_parts(b.with_store(()), Some(slow_start), keys)
    }
}

impl RateLimiterBuilder<InMemory> {
    /// Slow start after idle. Default is none.
    ///
    /// The in-memory backend's alone (see [the backends](super#the-backends)):
    /// the builder becomes a [`RateLimiterBuilder<InMemorySlowStart>`], which
    /// builds a [`RateLimiter`] and has no `redis`.
    pub fn slow_start(self, slow_start: SlowStart) -> RateLimiterBuilder<InMemorySlowStart> {
        self.with_store(InMemorySlowStart { slow_start })
    }
}

impl RateLimiterBuilder<InMemorySlowStart> {
    /// Replaces the slow start set before (see
    /// [`RateLimiterBuilder::<InMemory>::slow_start`](RateLimiterBuilder#method.slow_start)).
    pub fn slow_start(mut self, slow_start: SlowStart) -> Self {
        self.store.slow_start = slow_start;
        self
    }
}

impl<S> RateLimiterBuilder<S> {
    /// Tightening on upstream throttles. Default is [`Feedback::new`]
    /// (`None` disables).
    ///
    /// In memory the key pauses, then recovers at a reduced rate; on Redis
    /// only the pause is replicated (for every replica; a pause applied
    /// while calls already hold later slots does not move those; a lone
    /// quota throttle pauses nothing, see [`Feedback`]), and the
    /// fail-open fallback limiter tightens as in memory (see
    /// [the backends](super#the-backends)).
    pub fn feedback(mut self, feedback: impl Into<Option<Feedback>>) -> Self {
        self.feedback = feedback.into();
        self
    }

    /// The most keys a keyed limiter remembers (on Redis: the local state
    /// of leases, snapshots and the fail-open fallback). Default is
    /// 100,000.
    ///
    /// When a new key arrives and the map is full, idle keys are evicted
    /// first (at most once a second); if none is idle, the new key shares
    /// one *overflow* state (with the limits of the first key that
    /// overflowed) until room frees up. Memory stays bounded, and overflow
    /// keys are still limited, together.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(1);
        self
    }

    /// How often a keyed limiter sweeps idle keys out of its local state,
    /// checked when a new key arrives (no background task). Default is
    /// 60 s.
    pub fn sweep_every(mut self, every: Duration) -> Self {
        self.sweep_every = every;
        self
    }

    /// One limiter for everything (key `()`).
    pub fn build(self) -> S::Limiter
    where
        S: LimiterStore<()>,
    {
        S::build_limiter(self, sealed::Keys::One)
    }

    /// A keyed limiter: each key gets its own state with the builder's
    /// limits (in memory, a request-only key without slow start takes one
    /// `u64`).
    pub fn build_keyed<K>(self) -> <S as LimiterStore<K>>::Limiter
    where
        S: LimiterStore<K>,
    {
        S::build_limiter(self, sealed::Keys::Same)
    }

    /// A keyed limiter whose limits depend on the key. In memory it is
    /// called once, when a key is first seen; on Redis on every decision
    /// (the limits travel with each script call: keep it cheap), and
    /// every replica must give a key the same limits.
    pub fn build_keyed_with<K, F>(self, limits_for: F) -> <S as LimiterStore<K>>::Limiter
    where
        S: LimiterStore<K>,
        F: Fn(&K) -> Limits + Send + Sync + 'static,
    {
        S::build_limiter(self, sealed::Keys::Each(Arc::new(limits_for)))
    }

    /// The same shared settings over another store.
    pub(crate) fn with_store<T>(self, store: T) -> RateLimiterBuilder<T> {
        RateLimiterBuilder {
            limits: self.limits,
            feedback: self.feedback,
            max_keys: self.max_keys,
            sweep_every: self.sweep_every,
            store,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    slow_start: Option<Slow>,
    feedback: Option<Fb>,
}

/// A [`Feedback`] in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Fb {
    pause: u64,
    factor: u32,
    floor: u32,
    recover: u64,
    lone_factor: u32,
    repeat_within: u64,
}

/// A [`SlowStart`] in nanoseconds.
#[derive(Clone, Copy, Debug)]
struct Slow {
    initial: u32,
    hold: u64,
    ramp: u64,
    idle: u64,
}

impl Settings {
    fn ramp_duration(&self, kind: RampKind) -> Option<u64> {
        match kind {
            RampKind::SlowStart => self.slow_start.map(|s| s.ramp),
            RampKind::Recover => self.feedback.map(|f| f.recover),
        }
    }
}

/// Whether feedback acts on an upstream throttle of `cause`, seen at `now`,
/// of a call admitted at `admitted` (ns on the limiter's clock), given the
/// key's `acted` cell (the instant of the last throttle acted on, plus one;
/// 0 for none), which it updates: `None` when an earlier throttle acted on
/// covers this call (it was admitted before that one) or another thread
/// acted on this one first; `Some(true)` for a lone quota throttle (cause
/// requests or tokens, none acted on within `repeat_within`: timing
/// jitter, not a wrong quota; see [`Feedback`]); `Some(false)` to tighten.
/// The one rule of both backends (in memory and Redis).
pub(crate) fn judge_throttle(
    acted: &AtomicU64,
    cause: ThrottleCause,
    admitted: u64,
    now: u64,
    repeat_within: u64,
) -> Option<bool> {
    let last = acted.load(Ordering::Acquire);
    // Equivalent mutant `last >= 0`: `admitted < 0` is never true.
    if last > 0 && admitted < last {
        return None;
    }
    let lone = matches!(cause, ThrottleCause::Requests | ThrottleCause::Tokens)
        && repeat_within > 0
        && (last == 0 || now.saturating_sub(last - 1) >= repeat_within);
    acted
        .compare_exchange(last, now + 1, Ordering::AcqRel, Ordering::Relaxed)
        .ok()?;
    Some(lone)
}

/// The state of one quota of a [`Snapshot`], from its GCRA, TAT and rate
/// factor at `now` (also the Redis backend's local view).
pub(crate) fn dim_state(g: Gcra, tat: u64, now: u64, rate: u32) -> DimState {
    let one = g.charge(1, rate);
    DimState {
        limit: (g.tolerance() / g.interval()) as u32,
        remaining: g.remaining(tat, now),
        reset: Duration::from_nanos(tat.saturating_sub(now)),
        retry_after: Duration::from_nanos(g.conforms_at(tat, one).saturating_sub(now)),
        rate: rate_to_f64(rate),
    }
}

/// One dimension of a full key state: its GCRA, bucket, the latest slot
/// granted to a waiter (read by refunds) and its rate ramp.
#[derive(Debug)]
struct Dim {
    gcra: Option<Gcra>,
    bucket: Bucket,
    latest: AtomicU64,
    ramp: AtomicU64,
}

impl Dim {
    fn new(q: Option<Quota>, tat: u64) -> Self {
        Self {
            gcra: q.map(|q| Gcra::new(q.interval_nanos(), q.burst().get())),
            bucket: Bucket::with_tat(tat),
            latest: AtomicU64::new(0),
            ramp: AtomicU64::new(0),
        }
    }

    /// The rate factor for a call booked at `now` (evaluated where its slot
    /// can start: at the bucket's latest reservation), starting a
    /// slow-start ramp if the bucket has been idle.
    #[inline]
    fn rate(&self, now: u64, s: &Settings) -> u32 {
        let word = self.ramp.load(Ordering::Relaxed);
        if let Some(slow) = s.slow_start
            && (word == 0 || self.bucket.tat().saturating_add(slow.idle) <= now)
        {
            let r = Ramp {
                start: now,
                from: slow.initial,
                kind: RampKind::SlowStart,
            };
            self.ramp.store(r.pack(), Ordering::Relaxed);
            return slow.initial;
        }
        // A call queued behind others goes out when the bucket's latest
        // reservation has passed, not now: charge it at the rate the ramp
        // has reached by then, or a burst that arrives at idle would be
        // spaced at the initial rate for its whole length.
        Self::rate_of(word, self.bucket.tat().max(now), s)
    }

    #[inline]
    fn rate_of(word: u64, now: u64, s: &Settings) -> u32 {
        match Ramp::unpack(word) {
            None => FULL_RATE,
            Some(r) => match (r.kind, s.slow_start) {
                (RampKind::SlowStart, Some(slow)) => r.grown_at(now, slow.hold, slow.ramp),
                _ => match s.ramp_duration(r.kind) {
                    Some(d) => r.rate_at(now, d),
                    None => FULL_RATE,
                },
            },
        }
    }

    fn is_idle(&self, now: u64, s: &Settings) -> bool {
        if !self.bucket.is_full(now) {
            return false;
        }
        match Ramp::unpack(self.ramp.load(Ordering::Relaxed)) {
            Some(r) if r.kind == RampKind::Recover => {
                s.ramp_duration(r.kind).is_none_or(|d| r.end(d) <= now)
            }
            _ => true,
        }
    }

    fn state(&self, now: u64, s: &Settings) -> Option<DimState> {
        let g = self.gcra?;
        let rate = Self::rate_of(self.ramp.load(Ordering::Relaxed), now, s);
        Some(dim_state(g, self.bucket.tat(), now, rate))
    }
}

/// The full state of a key: two dimensions with their ramps, and the
/// feedback state. Boxed in the map: only keys that need it pay for it.
#[derive(Debug)]
pub(crate) struct Full {
    req: Dim,
    tok: Dim,
    /// When the key was last tightened (ns since epoch + 1; 0 = never).
    tightened: AtomicU64,
    /// How many full tightenings (pause and lower rate) the key has had: a
    /// waiter booked in an earlier one has its slot re-paced by those since
    /// (see [`Repace`]).
    epoch: AtomicU64,
    /// The latest full tightenings (at most [`REPACES_KEPT`]), oldest first.
    repaces: Mutex<Vec<Repace>>,
    throttles: AtomicU32,
}

impl Full {
    fn new(limits: Limits) -> Self {
        Self::with_tat(limits, 0)
    }

    /// A full state whose request bucket starts at `tat` (a compact key
    /// being upgraded).
    fn with_tat(limits: Limits, tat: u64) -> Self {
        Self {
            req: Dim::new(limits.get_requests(), tat),
            tok: Dim::new(limits.get_tokens(), 0),
            tightened: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            repaces: Mutex::new(Vec::new()),
            throttles: AtomicU32::new(0),
        }
    }

    fn has_tokens(&self) -> bool {
        self.tok.gcra.is_some()
    }

    fn is_idle(&self, now: u64, s: &Settings) -> bool {
        self.req.is_idle(now, s) && self.tok.is_idle(now, s)
    }

    /// See [`View::moved`]: one atomic load unless the key was fully
    /// tightened since the booking.
    fn moved(&self, slot: u64, epoch: u64, s: &Settings) -> u64 {
        let now = self.epoch.load(Ordering::Acquire);
        if now == epoch {
            return slot;
        }
        let repaces = self.repaces.lock().unwrap_or_else(|e| e.into_inner());
        repaces
            .iter()
            .filter(|r| r.epoch > epoch && r.epoch <= now)
            .fold(slot, |slot, r| r.apply(slot, s))
    }
}

/// A borrowed key state.
///
/// A request-only key of a limiter whose keys all have the same limits and
/// no slow start is *compact*: one bucket word, its request TAT (the GCRA
/// is the limiter's), in a store of words. Any other key (a token quota,
/// slow start, limits of its own) has [`Full`] state, in a store of full
/// states, and so has a compact key once an upstream throttle tightens it:
/// it moves from the words to the full states, its TAT carried over; once
/// idle it is evicted from there and comes back compact.
#[derive(Clone, Copy)]
enum View<'a> {
    Compact(&'a Bucket),
    Full(&'a Full),
}

impl View<'_> {
    fn has_tokens(self) -> bool {
        matches!(self, View::Full(f) if f.has_tokens())
    }

    /// Where a waiter booked at `slot` in tightening epoch `epoch` goes
    /// now: the same slot unless the key was fully tightened since.
    fn moved(self, slot: u64, epoch: u64, s: &Settings) -> u64 {
        match self {
            View::Compact(_) => slot,
            View::Full(f) => f.moved(slot, epoch, s),
        }
    }
}

/// How many full tightenings a key remembers for its waiters: each comes
/// after a call admitted after the one before it was answered, so a waiter
/// booked before more than these has waited through as many pauses (and
/// more than a minute at the default 1 s). Such a waiter would miss the
/// forgotten ones' moves and go early by them (not handled: unreachable
/// short of a minute of back-to-back full tightenings).
const REPACES_KEPT: usize = 64;

/// The time step over which a ramp's rate is taken as constant when a
/// queue is re-paced (the rate is read at the step's start, so a growing
/// ramp is never outrun).
const REPACE_STEP: u64 = 10_000_000;

/// One full tightening, as its waiters see it: at `at`, the key paused
/// (every slot moved by `delta`), and each lowered dimension's rate went
/// from the ramp `old` to the ramp `new` (packed [`Ramp`] words). A waiter
/// booked before it is *re-paced*: the quota work queued ahead of its slot
/// since `at` (under the old rate) is laid out again from the pause's end
/// under the new rate, so a deep queue booked at the full rate resumes at
/// the lowered one instead of at the old spacing; never earlier than the
/// pause alone would move it. The mapping keeps the order of slots (FIFO).
#[derive(Clone, Copy, Debug)]
struct Repace {
    epoch: u64,
    at: u64,
    delta: u64,
    /// Requests, tokens: the ramps before and after, when lowered.
    dims: [Option<(u64, u64)>; 2],
}

impl Repace {
    /// Where a slot of the schedule before this tightening goes.
    fn apply(&self, slot: u64, s: &Settings) -> u64 {
        let mut to = slot.saturating_add(self.delta);
        for i in 0..2 {
            to = to.max(self.map_dim(i, slot, s));
        }
        to
    }

    /// The slot re-paced in dimension `i` alone (moved by the pause if it
    /// was not lowered, or the slot is not after the tightening).
    fn map_dim(&self, i: usize, slot: u64, s: &Settings) -> u64 {
        let moved = slot.saturating_add(self.delta);
        let Some((old, new)) = self.dims[i] else {
            return moved;
        };
        if slot <= self.at {
            return moved;
        }
        let work = ramp_work(old, self.at, slot, s);
        ramp_until(new, self.at.saturating_add(self.delta), work, s).max(moved)
    }
}

/// The stretch of a ramp word's rate that is constant from `t`, and that
/// rate (a fraction of the quota): up to the ramp's start, after its end
/// (for ever), or one [`REPACE_STEP`] inside it.
fn ramp_piece(word: u64, t: u64, s: &Settings) -> (u64, f64) {
    let rate = rate_to_f64(Dim::rate_of(word, t, s)).max(1.0 / f64::from(FULL_RATE));
    let span = Ramp::unpack(word).and_then(|r| Some((r.start, r.end(s.ramp_duration(r.kind)?))));
    let until = match span {
        None => u64::MAX,
        Some((start, _)) if t < start => start,
        Some((_, end)) if t >= end => u64::MAX,
        Some((_, end)) => t.saturating_add(REPACE_STEP).min(end),
    };
    (until, rate)
}

/// The quota work (nanoseconds at the full rate) a ramp does from `a` to
/// `b`.
fn ramp_work(word: u64, a: u64, b: u64, s: &Settings) -> f64 {
    let (mut t, mut work) = (a, 0.0);
    while t < b {
        let (until, rate) = ramp_piece(word, t, s);
        let next = until.min(b);
        work += (next - t) as f64 * rate;
        t = next;
    }
    work
}

/// When a ramp starting its work at `a` has done `work` (nanoseconds at
/// the full rate).
fn ramp_until(word: u64, a: u64, mut work: f64, s: &Settings) -> u64 {
    let mut t = a;
    loop {
        let (until, rate) = ramp_piece(word, t, s);
        let span = (until - t) as f64 * rate;
        if until == u64::MAX || span >= work {
            return t.saturating_add((work / rate).ceil() as u64);
        }
        work -= span;
        t = until;
    }
}

/// A booked call: the common slot and the grant in each dimension.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Booking {
    slot: u64,
    req: Option<Grant>,
    tok: Option<Grant>,
    /// The key's tightening epoch when booked (see [`Full::moved`]).
    epoch: u64,
    tokens: u32,
    tok_rate: u32,
}

impl Booking {
    const FREE: Booking = Booking {
        slot: 0,
        req: None,
        tok: None,
        epoch: 0,
        tokens: 0,
        tok_rate: FULL_RATE,
    };
}

/// Reserves `cost` in both dimensions of `st` at one common slot, at most
/// `max_wait` ns after `now`.
fn book_full(
    st: &Full,
    s: &Settings,
    now: u64,
    cost: Cost,
    max_wait: u64,
) -> Result<Booking, RateLimited> {
    let epoch = st.epoch.load(Ordering::Acquire);
    let (gr, xr) = match st.req.gcra {
        Some(g) if cost.requests > 0 => (Some(g), g.charge(cost.requests, st.req.rate(now, s))),
        _ => (None, 0),
    };
    let tok_rate;
    let (gt, xt) = match st.tok.gcra {
        Some(g) if cost.tokens > 0 => {
            tok_rate = st.tok.rate(now, s);
            (Some(g), g.charge(cost.tokens, tok_rate))
        }
        _ => {
            tok_rate = FULL_RATE;
            (None, 0)
        }
    };
    // Every retry follows a compare-and-swap another caller won, so the
    // loops end; a debug build checks it, so that a broken bucket fails a
    // test at once instead of hanging it.
    let mut tries = 0u32..;
    'outer: loop {
        debug_assert!(tries.next() < Some(1 << 20), "booking made no progress");
        let tr = st.req.bucket.tat();
        let tt = st.tok.bucket.tat();
        let at_r = gr.map_or(now, |g| g.conforms_at(tr, xr).max(now));
        let at_t = gt.map_or(now, |g| g.conforms_at(tt, xt).max(now));
        let slot = at_r.max(at_t);
        if slot - now > max_wait {
            let dim = if at_t > at_r {
                Dimension::Tokens
            } else {
                Dimension::Requests
            };
            return Err(RateLimited::new(Duration::from_nanos(slot - now), dim));
        }
        let req = match gr {
            Some(g) => match st.req.bucket.reserve_at(&g, slot, xr, tr) {
                Ok(grant) => Some(grant),
                Err(_) => continue,
            },
            None => None,
        };
        let tok = match gt {
            Some(g) => {
                // Recorded before the booking, so that a concurrent refund
                // never returns capacity ahead of this slot.
                // Equivalent mutant `>=`: a refund's horizon is never before now.
                if slot > now {
                    st.tok.latest.fetch_max(slot, Ordering::AcqRel);
                }
                let mut expected = tt;
                loop {
                    debug_assert!(tries.next() < Some(1 << 20), "booking made no progress");
                    match st.tok.bucket.reserve_at(&g, slot, xt, expected) {
                        Ok(grant) => break Some(grant),
                        // Only a lost race gets here; this arm retries at the
                        // slot, the next starts over: both book correctly.
                        Err(actual) if actual != expected && g.conforms_at(actual, xt) <= slot => {
                            expected = actual;
                        }
                        Err(_) => {
                            if let Some(r) = req {
                                // Not the tail any more: the slot stays
                                // consumed (capacity lost, never a burst).
                                st.req.bucket.give_back(&r, now, 0);
                            }
                            continue 'outer;
                        }
                    }
                }
            }
            None => None,
        };
        return Ok(Booking {
            slot,
            req,
            tok,
            epoch,
            tokens: if gt.is_some() { cost.tokens } else { 0 },
            tok_rate,
        });
    }
}

type LimitsFor<K> = Arc<dyn Fn(&K) -> Limits + Send + Sync>;

/// Where a key's state lives, so that later operations (cancel, reconcile,
/// feedback) find the state the booking used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Single,
    Map,
    Overflow,
}

pub(crate) struct Shared<K> {
    epoch: Instant,
    settings: Settings,
    /// The limits of every key (`build`, `build_keyed`) ...
    limits: Limits,
    /// ... or of each key (`build_keyed_with`).
    limits_for: Option<LimitsFor<K>>,
    /// The request GCRA of compact keys, for a compact limiter.
    compact: Option<Option<Gcra>>,
    single: Option<Full>,
    /// The compact keys (of a compact limiter).
    words: Store<K, Bucket>,
    /// The keys with full state.
    fulls: Store<K, Full>,
    overflow: OnceLock<Full>,
    tokens_seen: AtomicBool,
}

/// The in-memory backend: a GCRA rate limiter for requests and tokens,
/// shared by every clone (an `Arc` inside), with or without keys.
///
/// [`RateLimitLayer`](super::RateLimitLayer) drives it from a tower stack;
/// it can also be used directly ([`RateLimiter::check`],
/// [`RateLimiter::reserve`]) and read ([`RateLimiter::snapshot`]), e.g. by
/// a gateway writing `x-ratelimit-*` headers. Decisions need no future:
/// the layer admits a call in `call`, without a round trip.
///
/// Keyed state lives in the crate's bounded keyed store (a sharded
/// `DashMap`, as in governor): a decision takes one shard read lock and one
/// compare-and-swap. A request-only key of a limiter whose keys share their
/// limits takes one `u64` of state ([`RateLimiter::bytes_per_key`]); a key
/// with a token quota, slow start or its own limits takes a boxed state of
/// about 160 bytes.
///
/// See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share all state.
pub struct RateLimiter<K = ()> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for RateLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K> fmt::Debug for RateLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("keyed", &self.shared.single.is_none())
            .field("words", &self.shared.words)
            .field("fulls", &self.shared.fulls)
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl RateLimiter<()> {
    /// A builder with these limits for every key, in memory until
    /// another store is chosen (see [`RateLimiterBuilder`]).
    pub fn builder(limits: Limits) -> RateLimiterBuilder {
        RateLimiterBuilder {
            limits,
            feedback: Some(Feedback::new()),
            max_keys: 100_000,
            sweep_every: Duration::from_secs(60),
            store: InMemory,
        }
    }

    /// One unkeyed limiter with the default settings.
    pub fn new(limits: Limits) -> Self {
        Self::builder(limits).build()
    }
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    fn from_parts(
        b: RateLimiterBuilder<()>,
        slow_start: Option<SlowStart>,
        keys: sealed::Keys<K>,
    ) -> Self {
        let (limits_for, single) = match keys {
            sealed::Keys::One => (None, Some(Full::new(b.limits))),
            sealed::Keys::Same => (None, None),
            sealed::Keys::Each(f) => (Some(f), None),
        };
        let settings = Settings {
            slow_start: slow_start.map(|s| Slow {
                initial: s.initial,
                hold: duration_nanos(s.hold.min(s.ramp)),
                ramp: duration_nanos(s.ramp),
                idle: duration_nanos(s.idle),
            }),
            feedback: b.feedback.map(|f| Fb {
                pause: duration_nanos(f.pause),
                factor: f.factor,
                floor: f.floor,
                recover: duration_nanos(f.recover),
                lone_factor: f.lone_factor,
                repeat_within: duration_nanos(f.repeat_within),
            }),
        };
        let compact = (limits_for.is_none()
            && b.limits.get_tokens().is_none()
            && settings.slow_start.is_none())
        .then(|| {
            b.limits
                .get_requests()
                .map(|q| Gcra::new(q.interval_nanos(), q.burst().get()))
        });
        let tokens_seen = limits_for.is_none() && b.limits.get_tokens().is_some();
        Self {
            shared: Arc::new(Shared {
                epoch: time::now(),
                settings,
                limits: b.limits,
                limits_for,
                compact,
                single,
                words: Store::new(b.max_keys, duration_nanos(b.sweep_every), "rate limiter"),
                fulls: Store::new(b.max_keys, duration_nanos(b.sweep_every), "rate limiter"),
                overflow: OnceLock::new(),
                tokens_seen: AtomicBool::new(tokens_seen),
            }),
        }
    }
}

impl<K> RateLimiter<K> {
    /// Nanoseconds since this limiter's epoch.
    #[inline]
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        duration_nanos(t.saturating_duration_since(self.shared.epoch))
    }

    /// The instant of a nanosecond count.
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.shared.epoch + Duration::from_nanos(nanos)
    }

    /// Whether this limiter has keys (no single state for everything).
    pub fn is_keyed(&self) -> bool {
        self.shared.single.is_none()
    }
}

impl<K> RateLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn limits_of(&self, key: &K) -> Limits {
        match &self.shared.limits_for {
            Some(f) => f(key),
            None => self.shared.limits,
        }
    }

    fn new_full(&self, key: &K) -> Full {
        let st = Full::new(self.limits_of(key));
        if st.has_tokens() {
            self.shared.tokens_seen.store(true, Ordering::Relaxed);
        }
        st
    }

    /// Runs `f` on the state of `key`, created if new. A store's shard
    /// lock is held (for reading) while `f` runs: `f` must not touch the
    /// stores.
    #[inline]
    fn with_state<R>(&self, key: &K, now: u64, f: impl FnOnce(View<'_>, Slot) -> R) -> R {
        let sh = &*self.shared;
        if let Some(s) = &sh.single {
            return f(View::Full(s), Slot::Single);
        }
        let settings = &sh.settings;
        if sh.compact.is_some() {
            if let Some(w) = sh.words.get(key) {
                return f(View::Compact(&w), Slot::Map);
            }
            return self.with_new_compact(key, now, f);
        }
        match sh.fulls.get_or_insert_with(
            key,
            now,
            || self.new_full(key),
            |st| st.is_idle(now, settings),
        ) {
            Some(r) => f(View::Full(&r), Slot::Map),
            None => f(self.overflow(key), Slot::Overflow),
        }
    }

    /// A compact limiter's key that is not a word: an upgraded key (full
    /// state), or a new one.
    #[cold]
    fn with_new_compact<R>(&self, key: &K, now: u64, f: impl FnOnce(View<'_>, Slot) -> R) -> R {
        let sh = &*self.shared;
        if let Some(st) = sh.fulls.get(key) {
            return f(View::Full(&st), Slot::Map);
        }
        match sh
            .words
            .get_or_insert_with(key, now, Bucket::new, |w| w.is_full(now))
        {
            Some(w) => f(View::Compact(&w), Slot::Map),
            None => f(self.overflow(key), Slot::Overflow),
        }
    }

    fn overflow(&self, key: &K) -> View<'_> {
        View::Full(self.shared.overflow.get_or_init(|| self.new_full(key)))
    }

    /// Books `cost` on a key's state.
    #[inline]
    fn book(
        &self,
        st: View<'_>,
        now: u64,
        cost: Cost,
        max_wait: u64,
    ) -> Result<Booking, RateLimited> {
        match st {
            View::Full(f) => book_full(f, &self.shared.settings, now, cost, max_wait),
            View::Compact(b) => {
                let g = match self.shared.compact {
                    Some(Some(g)) if cost.requests > 0 => g,
                    _ => {
                        return Ok(Booking {
                            slot: now,
                            ..Booking::FREE
                        });
                    }
                };
                match b.reserve(&g, now, g.charge(cost.requests, FULL_RATE), max_wait) {
                    Ok(grant) => Ok(Booking {
                        slot: grant.slot,
                        req: Some(grant),
                        ..Booking::FREE
                    }),
                    Err(slot) => Err(RateLimited::new(
                        Duration::from_nanos(slot - now),
                        Dimension::Requests,
                    )),
                }
            }
        }
    }

    /// Removes every idle key now and returns how many were removed. A key
    /// is idle when its buckets are full (so no call is waiting on it) and
    /// it is not recovering from an upstream throttle: it is then
    /// indistinguishable from a new key. Keyed limiters also do this on
    /// their own; see [`RateLimiterBuilder::sweep_every`].
    pub fn evict_idle(&self) -> usize {
        let now = self.nanos(time::now());
        let sh = &*self.shared;
        sh.words.sweep(now, |w| w.is_full(now))
            + sh.fulls.sweep(now, |st| st.is_idle(now, &sh.settings))
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        if self.shared.single.is_some() {
            1
        } else {
            self.shared.words.len() + self.shared.fulls.len()
        }
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many keys were evicted so far.
    pub fn evicted(&self) -> u64 {
        self.shared.words.evicted() + self.shared.fulls.evicted()
    }

    /// The bytes a request-only key of a limiter with one set of limits
    /// and no slow start takes in its map: the slot (the key and its
    /// request TAT, one `u64`) and its control byte, at hashbrown's 7/8
    /// load factor (a map grows by doubling, so between this and twice
    /// this). Heap data owned by the key itself (a string's bytes) comes on
    /// top. A key with a token quota, slow start or limits of its own takes
    /// about 160 bytes more.
    pub fn bytes_per_key() -> usize {
        Store::<K, Bucket>::bytes_per_key()
    }

    /// Decides a call of `cost` for `key` now, without waiting: admitted
    /// and charged, or refused with the exact wait.
    ///
    /// # Errors
    ///
    /// [`RateLimited`] when some quota has no room now.
    pub fn check(&self, key: &K, cost: Cost) -> Result<(), RateLimited> {
        self.check_at(key, cost, time::now())
    }

    /// [`RateLimiter::check`] at a given instant.
    ///
    /// # Errors
    ///
    /// [`RateLimited`] when some quota has no room at `now`.
    #[inline]
    pub fn check_at(&self, key: &K, cost: Cost, now: Instant) -> Result<(), RateLimited> {
        let now = self.nanos(now);
        self.with_state(key, now, |st, _| self.book(st, now, cost, 0).map(drop))
    }

    /// Reserves a slot for a call of `cost`, at most `max_wait` from now.
    /// Await [`Reservation::ready`] to wait for it; drop the reservation to
    /// cancel (the slot is given back when no later call reserved after
    /// it).
    ///
    /// # Errors
    ///
    /// [`RateLimited`] when the slot would be further than `max_wait`;
    /// nothing is reserved then.
    pub fn reserve(
        &self,
        key: &K,
        cost: Cost,
        max_wait: Duration,
    ) -> Result<Reservation<MemoryTicket<K>>, RateLimited> {
        let now = self.nanos(time::now());
        let (booking, slot) = self.with_state(key, now, |st, slot| {
            self.book(st, now, cost, duration_nanos(max_wait))
                .map(|b| (b, slot))
        })?;
        Ok(Reservation::new(MemoryTicket {
            inner: Some(self.booked(key.clone(), slot, booking)),
        }))
    }

    fn booked(&self, key: K, slot: Slot, booking: Booking) -> Booked<K> {
        Booked {
            limiter: self.clone(),
            key,
            slot,
            booking,
        }
    }

    /// What `key`'s quotas look like now; `None` for a key never seen (or
    /// evicted): its buckets are full. A key without state of its own while
    /// the keys are at [`RateLimiterBuilder::max_keys`] reports the shared
    /// overflow state, which decides its calls.
    pub fn snapshot(&self, key: &K) -> Option<Snapshot> {
        let now = self.nanos(time::now());
        let sh = &*self.shared;
        match &sh.single {
            Some(s) => Some(self.snapshot_of(View::Full(s), now)),
            None => self
                .with_slot(key, Slot::Map, |st| self.snapshot_of(st, now))
                .or_else(|| {
                    let store_full = match sh.compact {
                        Some(_) => sh.words.is_full(),
                        None => sh.fulls.is_full(),
                    };
                    let overflow = sh.overflow.get().filter(|_| store_full)?;
                    Some(self.snapshot_of(View::Full(overflow), now))
                }),
        }
    }

    /// Tells the limiter the upstream throttled a call for `key` that it
    /// admitted now (what the layer does on its own from the classifier).
    /// Returns whether the feedback acted on it (a lone quota throttle's
    /// step down counts; see [`Feedback`]).
    pub fn throttled(&self, key: &K, cause: ThrottleCause) -> bool {
        let now = self.nanos(time::now());
        let slot = self.with_state(key, now, |_, slot| slot);
        self.tighten(key, slot, cause, now, now)
    }

    /// Reconciles a booking's tokens with what the call really used.
    fn reconcile(&self, st: View<'_>, b: &Booking, actual: u32, now: u64) {
        let View::Full(st) = st else { return };
        let (Some(g), Some(grant)) = (st.tok.gcra, b.tok) else {
            return;
        };
        // Equivalent mutants `<=` and `>=` below: they refund or charge 0.
        if actual < b.tokens {
            let back = g.charge(b.tokens - actual, b.tok_rate);
            let latest = st.tok.latest.load(Ordering::Acquire);
            let got = st.tok.bucket.refund(&grant, back, now, latest);
            tracing::trace!(
                estimated = b.tokens,
                actual,
                refunded_ns = got,
                "token reservation reconciled"
            );
        } else if actual > b.tokens {
            st.tok
                .bucket
                .charge_more(g.charge(actual - b.tokens, FULL_RATE));
            tracing::trace!(estimated = b.tokens, actual, "token overrun charged");
        }
    }
}

/// Gives a booking back (the waiter was cancelled before its slot). The
/// request buckets are never refunded: they give back with no `latest`.
fn cancel(st: View<'_>, b: &Booking, now: u64) {
    let (r, t) = match st {
        View::Compact(bucket) => (b.req.is_none_or(|g| bucket.give_back(&g, now, 0)), true),
        View::Full(st) => (
            b.req.is_none_or(|g| st.req.bucket.give_back(&g, now, 0)),
            b.tok.is_none_or(|g| {
                let latest = st.tok.latest.load(Ordering::Acquire);
                st.tok.bucket.give_back(&g, now, latest)
            }),
        ),
    };
    tracing::trace!(given_back = r && t, "rate limit reservation cancelled");
}

impl<K> RateLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Tightens `key` after an upstream throttle of a call admitted at
    /// `admitted`; a compact key is upgraded to a full state first (under
    /// its shard's write lock, its TAT carried over). Returns whether it
    /// did.
    fn tighten(&self, key: &K, slot: Slot, cause: ThrottleCause, admitted: u64, now: u64) -> bool {
        if self.shared.settings.feedback.is_none() || cause == ThrottleCause::Local {
            return false;
        }
        let full = self.with_slot(key, slot, |st| match st {
            View::Full(f) => Some(self.tighten_full(f, cause, admitted, now)),
            View::Compact(_) => None,
        });
        match full {
            Some(Some(done)) => done,
            None => false,
            Some(None) => {
                // Move the key to the full states, its TAT carried over:
                // the word is removed under the full state's entry lock, so
                // no call books on either in between.
                let sh = &*self.shared;
                let upgraded = sh.fulls.get_or_insert_with(
                    key,
                    now,
                    || {
                        let tat = sh.words.remove(key).map_or(0, |w| w.tat());
                        Full::with_tat(sh.limits, tat)
                    },
                    |st| st.is_idle(now, &sh.settings),
                );
                match upgraded {
                    Some(st) => self.tighten_full(&st, cause, admitted, now),
                    None => false,
                }
            }
        }
    }

    fn tighten_full(&self, st: &Full, cause: ThrottleCause, admitted: u64, now: u64) -> bool {
        let settings = &self.shared.settings;
        let Some(fb) = settings.feedback else {
            return false;
        };
        let (req, tok) = match cause {
            // Equivalent mutant (arm deleted): `tighten` never passes Local.
            ThrottleCause::Local => return false,
            ThrottleCause::Requests | ThrottleCause::Burst => (true, false),
            ThrottleCause::Tokens => (false, true),
            _ => (true, true),
        };
        let Some(lone) = judge_throttle(&st.tightened, cause, admitted, now, fb.repeat_within)
        else {
            return false;
        };
        let n = st.throttles.fetch_add(1, Ordering::Relaxed) + 1;
        if lone {
            let mut new_rate = FULL_RATE;
            for (on, d) in [(req, &st.req), (tok, &st.tok)] {
                if !on || d.gcra.is_none() {
                    continue;
                }
                let word = d.ramp.load(Ordering::Relaxed);
                let cur = Dim::rate_of(word, now, settings);
                // A slow start still growing is below the quota already.
                if cur < FULL_RATE
                    && Ramp::unpack(word).is_some_and(|r| r.kind == RampKind::SlowStart)
                {
                    new_rate = new_rate.min(cur);
                    continue;
                }
                let from = ((u64::from(cur) * u64::from(fb.lone_factor)) >> 16) as u32;
                let from = from.max(fb.floor).clamp(1, FULL_RATE);
                new_rate = new_rate.min(from);
                let ramp = Ramp {
                    start: now,
                    from,
                    kind: RampKind::Recover,
                };
                d.ramp.store(ramp.pack(), Ordering::Relaxed);
            }
            tracing::info!(
                ?cause,
                rate = rate_to_f64(new_rate),
                recover_s = Duration::from_nanos(fb.recover).as_secs_f64(),
                throttles = n,
                "upstream throttled a call the local limit admitted, the first within the \
                 repeat window: lowering the rate a step, no pause"
            );
            return true;
        }
        // Pause the whole key: every bucket moves by the same amount, and so
        // does every waiter's slot; the lowered dimensions' queues are
        // re-paced at the new rate from the pause's end (see `Repace`), so
        // calls booked at the old rate do not resume at its spacing.
        // Under the lock: full tightenings of a key are applied one at a
        // time, in epoch order.
        let mut repaces = st.repaces.lock().unwrap_or_else(|e| e.into_inner());
        let mut delta = 0;
        for d in [&st.req, &st.tok] {
            if let Some(g) = d.gcra {
                delta = delta.max(d.bucket.pause_delta(&g, now, fb.pause));
            }
        }
        let mut new_rate = FULL_RATE;
        let mut dims = [None; 2];
        for (i, (on, d)) in [(req, &st.req), (tok, &st.tok)].into_iter().enumerate() {
            if on && d.gcra.is_some() {
                let old = d.ramp.load(Ordering::Relaxed);
                let cur = Dim::rate_of(old, now, settings);
                let from = ((u64::from(cur) * u64::from(fb.factor)) >> 16) as u32;
                let from = from.max(fb.floor).clamp(1, FULL_RATE);
                new_rate = new_rate.min(from);
                let ramp = Ramp {
                    start: now.saturating_add(fb.pause),
                    from,
                    kind: RampKind::Recover,
                };
                dims[i] = Some((old, ramp.pack()));
            }
        }
        let epoch = st.epoch.load(Ordering::Acquire) + 1;
        let repace = Repace {
            epoch,
            at: now,
            delta,
            dims,
        };
        for (i, d) in [&st.req, &st.tok].into_iter().enumerate() {
            let Some(g) = d.gcra else { continue };
            // Where the queue ends (the slot of the next unit): new bookings
            // go after the re-paced queue.
            let tat = d.bucket.tat();
            let room = g.tolerance() - g.interval().min(g.tolerance());
            let next = tat.saturating_sub(room);
            let moved = if next > now {
                repace.map_dim(i, next, settings).saturating_add(room)
            } else {
                tat.saturating_add(delta)
            };
            d.bucket.charge_more(moved.saturating_sub(tat));
            if let Some((_, word)) = dims[i] {
                d.ramp.store(word, Ordering::Relaxed);
            }
        }
        if repaces.len() >= REPACES_KEPT {
            repaces.remove(0);
        }
        repaces.push(repace);
        st.epoch.store(epoch, Ordering::Release);
        drop(repaces);
        tracing::warn!(
            ?cause,
            pause_ms = Duration::from_nanos(delta).as_millis() as u64,
            rate = rate_to_f64(new_rate),
            recover_s = Duration::from_nanos(fb.recover).as_secs_f64(),
            throttles = n,
            "upstream throttled a call the local limit admitted; tightening"
        );
        true
    }

    fn snapshot_of(&self, st: View<'_>, now: u64) -> Snapshot {
        let settings = &self.shared.settings;
        match st {
            View::Compact(b) => Snapshot {
                requests: self
                    .shared
                    .compact
                    .flatten()
                    .map(|g| dim_state(g, b.tat(), now, FULL_RATE)),
                tokens: None,
                throttles: 0,
                last_throttle: None,
            },
            View::Full(st) => {
                let paused = st.tightened.load(Ordering::Acquire);
                Snapshot {
                    requests: st.req.state(now, settings),
                    tokens: st.tok.state(now, settings),
                    throttles: st.throttles.load(Ordering::Relaxed),
                    last_throttle: (paused > 0).then(|| self.instant(paused - 1)),
                }
            }
        }
    }
}

impl<K> Backend<K> for RateLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Ticket = MemoryTicket<K>;
    type Pending = Immediate<Result<MemoryTicket<K>, BoxError>>;

    #[inline]
    fn decide<W: FnOnce(bool) -> Cost>(
        &self,
        key: &K,
        weigh: W,
        max_wait: Duration,
        now: Instant,
    ) -> Decision<MemoryTicket<K>, Self::Pending> {
        let now = self.nanos(now);
        // Once some key has a token quota, the estimate is made before the
        // lookup, not under the store's shard lock.
        let mut weigh = Some(weigh);
        let early = if self.shared.tokens_seen.load(Ordering::Relaxed) {
            weigh.take().map(|w| w(true))
        } else {
            None
        };
        let decided = self.with_state(key, now, |st, slot| {
            let cost = match (early, weigh.take()) {
                (Some(c), _) => c,
                (None, Some(w)) => w(st.has_tokens()),
                (None, None) => Cost::ONE,
            };
            self.book(st, now, cost, duration_nanos(max_wait))
                .map(|b| (b, slot))
        });
        match decided {
            Ok((booking, slot)) => {
                if booking.slot <= now {
                    let wants = booking.tokens > 0 || self.shared.settings.feedback.is_some();
                    Decision::Admitted(MemoryPermit {
                        inner: wants.then(|| self.booked(key.clone(), slot, booking)),
                    })
                } else {
                    Decision::Booked(MemoryTicket {
                        inner: Some(self.booked(key.clone(), slot, booking)),
                    })
                }
            }
            Err(e) => {
                tracing::debug!(
                    retry_after_ms = e.retry_after().unwrap_or_default().as_millis() as u64,
                    "local rate limit refused a call"
                );
                Decision::Refused(e.into())
            }
        }
    }

    fn snapshot(&self, key: &K) -> Option<Snapshot> {
        RateLimiter::snapshot(self, key)
    }
}

/// One quota of a [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct DimState {
    /// The burst: the most units that can go at once.
    pub limit: u32,
    /// Units available now (0 while in debt or waited on).
    pub remaining: u64,
    /// Time until the bucket is full again.
    pub reset: Duration,
    /// Time until one unit conforms.
    pub retry_after: Duration,
    /// The current rate as a fraction of the quota (below 1 during slow
    /// start or recovery from an upstream throttle).
    pub rate: f64,
}

/// A readable picture of one key's limits. See
/// [`RateLimiter::snapshot`].
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct Snapshot {
    /// The request quota, if any.
    pub requests: Option<DimState>,
    /// The token quota, if any.
    pub tokens: Option<DimState>,
    /// How many upstream throttles the feedback acted on for this key (lone
    /// quota throttles' steps down included; see [`Feedback`]).
    pub throttles: u32,
    /// When the feedback last acted on a throttle of this key.
    pub last_throttle: Option<Instant>,
}

impl Snapshot {
    /// Writes `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
    /// (reset in whole seconds, rounded up), the headers OpenAI-style
    /// clients read.
    pub fn write_headers(&self, headers: &mut HeaderMap) {
        for (name, d) in [("requests", self.requests), ("tokens", self.tokens)] {
            let Some(d) = d else { continue };
            let reset = d.reset.as_secs() + u64::from(d.reset.subsec_nanos() > 0);
            for (what, v) in [
                ("limit", u64::from(d.limit)),
                ("remaining", d.remaining),
                ("reset", reset),
            ] {
                if let Ok(n) = HeaderName::try_from(format!("x-ratelimit-{what}-{name}")) {
                    headers.insert(n, HeaderValue::from(v));
                }
            }
        }
    }
}

/// A booked call of the in-memory backend, to find its state again.
struct Booked<K> {
    limiter: RateLimiter<K>,
    key: K,
    slot: Slot,
    booking: Booking,
}

/// A call booked by [`RateLimiter`] for a later slot. Dropping it gives the
/// slot back. See [`Ticket`].
pub struct MemoryTicket<K: Hash + Eq> {
    inner: Option<Booked<K>>,
}

impl<K> Ticket for MemoryTicket<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Permit = MemoryPermit<K>;

    /// The slot, moved by any full tightening since booking (the pause,
    /// and the queue re-paced at the lowered rate; see [`Feedback`]).
    fn ready_at(&self) -> Instant {
        let a = self.inner.as_ref().expect("ticket already admitted");
        let settings = &a.limiter.shared.settings;
        let slot = a
            .limiter
            .with_slot(&a.key, a.slot, |v| {
                v.moved(a.booking.slot, a.booking.epoch, settings)
            })
            .unwrap_or(a.booking.slot);
        a.limiter.instant(slot)
    }

    fn admit(mut self) -> MemoryPermit<K> {
        MemoryPermit {
            inner: self.inner.take(),
        }
    }
}

impl<K: Hash + Eq> Drop for MemoryTicket<K> {
    fn drop(&mut self) {
        if let Some(a) = self.inner.take() {
            a.limiter.cancel_booked(&a);
        }
    }
}

impl<K: Hash + Eq> RateLimiter<K> {
    /// Runs `f` on the existing state a booking used; `None` if it was
    /// evicted meanwhile.
    fn with_slot<R>(&self, key: &K, slot: Slot, f: impl FnOnce(View<'_>) -> R) -> Option<R> {
        let sh = &*self.shared;
        match slot {
            Slot::Single => sh.single.as_ref().map(|s| f(View::Full(s))),
            Slot::Overflow => sh.overflow.get().map(|s| f(View::Full(s))),
            Slot::Map => {
                if sh.compact.is_some()
                    && let Some(w) = sh.words.get(key)
                {
                    return Some(f(View::Compact(&w)));
                }
                sh.fulls.get(key).map(|s| f(View::Full(&s)))
            }
        }
    }

    fn cancel_booked(&self, a: &Booked<K>) {
        let sh = &*self.shared;
        let now = self.nanos(time::now());
        let st = match a.slot {
            Slot::Single => sh.single.as_ref().map(View::Full),
            Slot::Overflow => sh.overflow.get().map(View::Full),
            Slot::Map => {
                self.with_slot(&a.key, Slot::Map, |st| cancel(st, &a.booking, now));
                return;
            }
        };
        if let Some(st) = st {
            cancel(st, &a.booking, now);
        }
    }
}

impl<K: Hash + Eq> fmt::Debug for MemoryTicket<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTicket")
            .field("slot", &self.inner.as_ref().map(|a| a.booking.slot))
            .finish_non_exhaustive()
    }
}

/// A call admitted by [`RateLimiter`]. See [`Permit`].
pub struct MemoryPermit<K> {
    /// `None` when there is nothing to report (no tokens, no feedback).
    inner: Option<Booked<K>>,
}

impl<K> Permit for MemoryPermit<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn tokens(&self) -> u32 {
        self.inner.as_ref().map_or(0, |a| a.booking.tokens)
    }

    fn wants_feedback(&self) -> bool {
        self.inner
            .as_ref()
            .is_some_and(|a| a.limiter.shared.settings.feedback.is_some())
    }

    fn finish(self, throttled: Option<ThrottleCause>, tokens: Option<u32>) {
        let Some(a) = self.inner else { return };
        let now = a.limiter.nanos(time::now());
        if let Some(cause) = throttled {
            a.limiter
                .tighten(&a.key, a.slot, cause, a.booking.slot, now);
        }
        if let Some(actual) = tokens
            // Equivalent mutant `>=`: a booking of no tokens reconciles nothing.
            && a.booking.tokens > 0
        {
            a.limiter.with_slot(&a.key, a.slot, |st| {
                a.limiter.reconcile(st, &a.booking, actual, now)
            });
        }
    }
}

impl<K> fmt::Debug for MemoryPermit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryPermit")
            .field("slot", &self.inner.as_ref().map(|a| a.booking.slot))
            .field("tokens", &self.inner.as_ref().map(|a| a.booking.tokens))
            .finish()
    }
}
