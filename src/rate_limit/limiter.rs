//! The shared limiter: per-key state, the two-dimension decision, slow
//! start, feedback, eviction and snapshots.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue};

use crate::classify::ThrottleCause;
use crate::time::{self, Instant, duration_nanos};

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

/// Slow start: after a key has been idle, admit at a lower rate and ramp
/// up linearly to the full quota, so that DashScope's growth guard
/// ("Request rate increased too quickly", `Throttling.BurstRate`) is not
/// tripped by a cold start. A new key is an idle key.
///
/// # Default
///
/// Starts at 25% of the quota, ramps over the given time, and counts a key
/// as idle once its buckets have been full for 10 s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SlowStart {
    initial: u32,
    ramp: Duration,
    idle: Duration,
}

impl SlowStart {
    /// Ramp from 25% to 100% of the quota over `ramp`.
    pub const fn new(ramp: Duration) -> Self {
        Self {
            initial: FULL_RATE / 4,
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
/// # Default
///
/// Pause 1 s, rate × 0.5 (never below 1/16 of the quota), recover over
/// 30 s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Feedback {
    pause: Duration,
    factor: u32,
    floor: u32,
    recover: Duration,
}

impl Default for Feedback {
    fn default() -> Self {
        Self::new()
    }
}

impl Feedback {
    /// The defaults: pause 1 s, halve the rate, recover over 30 s.
    pub const fn new() -> Self {
        Self {
            pause: Duration::from_secs(1),
            factor: FULL_RATE / 2,
            floor: FULL_RATE / 16,
            recover: Duration::from_secs(30),
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
}

/// Builds a [`RateLimiter`]. See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct RateLimiterBuilder {
    limits: Limits,
    slow_start: Option<SlowStart>,
    feedback: Option<Feedback>,
    max_keys: usize,
    sweep_every: Duration,
}

impl RateLimiterBuilder {
    /// Slow start after idle. Default is none (`None` disables).
    pub fn slow_start(mut self, slow_start: impl Into<Option<SlowStart>>) -> Self {
        self.slow_start = slow_start.into();
        self
    }

    /// Tightening on upstream throttles. Default is [`Feedback::new`]
    /// (`None` disables).
    pub fn feedback(mut self, feedback: impl Into<Option<Feedback>>) -> Self {
        self.feedback = feedback.into();
        self
    }

    /// The most keys a keyed limiter remembers. Default is 100,000.
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

    /// How often a keyed limiter sweeps idle keys out, checked when a new
    /// key arrives (no background task). Default is 60 s.
    pub fn sweep_every(mut self, every: Duration) -> Self {
        self.sweep_every = every;
        self
    }

    /// One limiter for everything (key `()`).
    pub fn build(self) -> RateLimiter<()> {
        let single = Arc::new(KeyState::new(self.limits));
        RateLimiter::from_parts(self, Box::new(|_: &()| Limits::UNLIMITED), Some(single))
    }

    /// A keyed limiter: each key gets its own state with these limits.
    pub fn build_keyed<K>(self) -> RateLimiter<K>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
    {
        let limits = self.limits;
        RateLimiter::from_parts(self, Box::new(move |_: &K| limits), None)
    }

    /// A keyed limiter whose limits depend on the key (called once, when a
    /// key is first seen).
    pub fn build_keyed_with<K, F>(self, limits_for: F) -> RateLimiter<K>
    where
        K: Hash + Eq + Clone + Send + Sync + 'static,
        F: Fn(&K) -> Limits + Send + Sync + 'static,
    {
        RateLimiter::from_parts(self, Box::new(limits_for), None)
    }
}

#[derive(Clone, Copy, Debug)]
struct Settings {
    slow_start: Option<(u32, u64, u64)>,
    feedback: Option<(u64, u32, u32, u64)>,
    max_keys: usize,
    sweep_every: u64,
}

impl Settings {
    fn ramp_duration(&self, kind: RampKind) -> Option<u64> {
        match kind {
            RampKind::SlowStart => self.slow_start.map(|s| s.1),
            RampKind::Recover => self.feedback.map(|f| f.3),
        }
    }
}

/// One dimension of a key: its GCRA, bucket and rate ramp.
#[derive(Debug)]
pub(crate) struct Dim {
    gcra: Option<Gcra>,
    bucket: Bucket,
    ramp: AtomicU64,
}

impl Dim {
    fn new(q: Option<Quota>) -> Self {
        Self {
            gcra: q.map(|q| Gcra::new(q.interval_nanos(), q.burst().get())),
            bucket: Bucket::new(),
            ramp: AtomicU64::new(0),
        }
    }

    /// The rate factor at `now`, starting a slow-start ramp if the bucket
    /// has been idle.
    #[inline]
    fn rate(&self, now: u64, s: &Settings) -> u32 {
        let word = self.ramp.load(Ordering::Relaxed);
        if let Some((initial, _, idle)) = s.slow_start
            && (word == 0 || self.bucket.tat().saturating_add(idle) <= now)
        {
            let r = Ramp {
                start: now,
                from: initial,
                kind: RampKind::SlowStart,
            };
            self.ramp.store(r.pack(), Ordering::Relaxed);
            return initial;
        }
        Self::rate_of(word, now, s)
    }

    #[inline]
    fn rate_of(word: u64, now: u64, s: &Settings) -> u32 {
        match Ramp::unpack(word) {
            None => FULL_RATE,
            Some(r) => match s.ramp_duration(r.kind) {
                Some(d) => r.rate_at(now, d),
                None => FULL_RATE,
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
        let tat = self.bucket.tat();
        let rate = Self::rate_of(self.ramp.load(Ordering::Relaxed), now, s);
        let one = g.charge(1, rate);
        Some(DimState {
            limit: (g.tolerance() / g.interval()) as u32,
            remaining: g.remaining(tat, now),
            reset: Duration::from_nanos(tat.saturating_sub(now)),
            retry_after: Duration::from_nanos(g.conforms_at(tat, one).saturating_sub(now)),
            rate: rate_to_f64(rate),
        })
    }
}

/// The state of one key. Shared (Arc) by the map, waiters and in-flight
/// calls.
#[derive(Debug)]
pub(crate) struct KeyState {
    req: Dim,
    tok: Dim,
    /// When the key was last tightened (ns since epoch + 1; 0 = never).
    tightened: AtomicU64,
    /// Total pause added so far: waiters move their slot by the growth.
    shift: AtomicU64,
    throttles: AtomicU32,
}

impl KeyState {
    fn new(limits: Limits) -> Self {
        Self {
            req: Dim::new(limits.get_requests()),
            tok: Dim::new(limits.get_tokens()),
            tightened: AtomicU64::new(0),
            shift: AtomicU64::new(0),
            throttles: AtomicU32::new(0),
        }
    }

    pub(crate) fn shift(&self) -> u64 {
        self.shift.load(Ordering::Acquire)
    }

    pub(crate) fn has_tokens(&self) -> bool {
        self.tok.gcra.is_some()
    }

    fn is_idle(&self, now: u64, s: &Settings) -> bool {
        self.req.is_idle(now, s) && self.tok.is_idle(now, s)
    }
}

/// A booked call: the common slot and the grant in each dimension.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Booking {
    pub(crate) slot: u64,
    req: Option<Grant>,
    tok: Option<Grant>,
    pub(crate) shift: u64,
    pub(crate) tokens: u32,
    tok_rate: u32,
}

/// Reserves `cost` in both dimensions at one common slot, at most
/// `max_wait` ns after `now`.
fn book(
    st: &KeyState,
    s: &Settings,
    now: u64,
    cost: Cost,
    max_wait: u64,
) -> Result<Booking, RateLimited> {
    let shift = st.shift();
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
    'outer: loop {
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
            Some(g) => match st.req.bucket.reserve_at(&g, now, slot, xr, tr) {
                Ok(grant) => Some(grant),
                Err(_) => continue,
            },
            None => None,
        };
        let tok = match gt {
            Some(g) => {
                let mut expected = tt;
                loop {
                    match st.tok.bucket.reserve_at(&g, now, slot, xt, expected) {
                        Ok(grant) => break Some(grant),
                        Err(actual) if actual != expected && g.conforms_at(actual, xt) <= slot => {
                            expected = actual;
                        }
                        Err(_) => {
                            if let Some(r) = req {
                                // Not the tail any more: the slot stays
                                // consumed (capacity lost, never a burst).
                                st.req.bucket.give_back(&r);
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
            shift,
            tokens: if gt.is_some() { cost.tokens } else { 0 },
            tok_rate,
        });
    }
}

type LimitsFor<K> = Box<dyn Fn(&K) -> Limits + Send + Sync>;

pub(crate) struct Shared<K> {
    epoch: Instant,
    settings: Settings,
    limits_for: LimitsFor<K>,
    single: Option<Arc<KeyState>>,
    map: DashMap<K, Arc<KeyState>>,
    count: AtomicUsize,
    overflow: OnceLock<Arc<KeyState>>,
    last_sweep: AtomicU64,
    evicted: AtomicU64,
    overflowed: AtomicU64,
}

/// A GCRA rate limiter for requests and tokens, shared by every clone
/// (an `Arc` inside), with or without keys.
///
/// [`RateLimitLayer`](super::RateLimitLayer) drives it from a tower stack;
/// it can also be used directly ([`RateLimiter::check`],
/// [`RateLimiter::reserve`]) and read ([`RateLimiter::snapshot`]), e.g. by
/// a gateway writing `x-ratelimit-*` headers.
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
            .field("keys", &self.shared.count.load(Ordering::Relaxed))
            .field("settings", &self.shared.settings)
            .finish_non_exhaustive()
    }
}

impl RateLimiter<()> {
    /// A builder with these limits for every key.
    pub fn builder(limits: Limits) -> RateLimiterBuilder {
        RateLimiterBuilder {
            limits,
            slow_start: None,
            feedback: Some(Feedback::new()),
            max_keys: 100_000,
            sweep_every: Duration::from_secs(60),
        }
    }

    /// One unkeyed limiter with the default settings.
    pub fn new(limits: Limits) -> Self {
        Self::builder(limits).build()
    }
}

impl<K> RateLimiter<K> {
    fn from_parts(
        b: RateLimiterBuilder,
        limits_for: LimitsFor<K>,
        single: Option<Arc<KeyState>>,
    ) -> Self
    where
        K: Hash + Eq,
    {
        let settings = Settings {
            slow_start: b
                .slow_start
                .map(|s| (s.initial, duration_nanos(s.ramp), duration_nanos(s.idle))),
            feedback: b.feedback.map(|f| {
                (
                    duration_nanos(f.pause),
                    f.factor,
                    f.floor,
                    duration_nanos(f.recover),
                )
            }),
            max_keys: b.max_keys,
            sweep_every: duration_nanos(b.sweep_every),
        };
        Self {
            shared: Arc::new(Shared {
                epoch: time::now(),
                settings,
                limits_for,
                single,
                map: DashMap::new(),
                count: AtomicUsize::new(0),
                overflow: OnceLock::new(),
                last_sweep: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                overflowed: AtomicU64::new(0),
            }),
        }
    }

    /// Nanoseconds since this limiter's epoch.
    #[inline]
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        duration_nanos(t.saturating_duration_since(self.shared.epoch))
    }

    /// Whether this limiter has no keys (one state for everything).
    pub fn is_keyed(&self) -> bool {
        self.shared.single.is_none()
    }
}

impl<K> RateLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// A builder for a keyed limiter (the same as [`RateLimiter::builder`];
    /// finish it with [`RateLimiterBuilder::build_keyed`]).
    pub fn keyed_builder(limits: Limits) -> RateLimiterBuilder {
        RateLimiter::builder(limits)
    }

    /// The state of `key`, created if new.
    pub(crate) fn state(&self, key: &K, now: u64) -> Arc<KeyState> {
        if let Some(s) = &self.shared.single {
            return s.clone();
        }
        if let Some(s) = self.shared.map.get(key) {
            return s.clone();
        }
        self.insert(key, now)
    }

    #[cold]
    fn insert(&self, key: &K, now: u64) -> Arc<KeyState> {
        let sh = &*self.shared;
        let last = sh.last_sweep.load(Ordering::Relaxed);
        let full = sh.count.load(Ordering::Relaxed) >= sh.settings.max_keys;
        let due = now.saturating_sub(last) >= sh.settings.sweep_every
            || (full && now.saturating_sub(last) >= 1_000_000_000);
        if due
            && sh
                .last_sweep
                .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep(now);
        }
        if sh.count.load(Ordering::Relaxed) >= sh.settings.max_keys {
            if let Some(s) = sh.map.get(key) {
                return s.clone();
            }
            let n = sh.overflowed.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    max_keys = sh.settings.max_keys,
                    overflowed = n + 1,
                    "rate limiter key map is full; new keys share one overflow state"
                );
            }
            return sh
                .overflow
                .get_or_init(|| Arc::new(KeyState::new((sh.limits_for)(key))))
                .clone();
        }
        let mut created = false;
        let state = sh
            .map
            .entry(key.clone())
            .or_insert_with(|| {
                created = true;
                Arc::new(KeyState::new((sh.limits_for)(key)))
            })
            .clone();
        if created {
            sh.count.fetch_add(1, Ordering::Relaxed);
        }
        state
    }

    fn sweep(&self, now: u64) -> usize {
        let sh = &*self.shared;
        let mut removed = 0;
        sh.map.retain(|_, st| {
            let drop = Arc::strong_count(st) == 1 && st.is_idle(now, &sh.settings);
            removed += usize::from(drop);
            !drop
        });
        if removed > 0 {
            sh.count.fetch_sub(removed, Ordering::Relaxed);
            sh.evicted.fetch_add(removed as u64, Ordering::Relaxed);
            tracing::debug!(
                removed,
                keys = sh.count.load(Ordering::Relaxed),
                "evicted idle rate limit keys"
            );
        }
        removed
    }

    /// Removes every idle key now (a key whose buckets are full and that is
    /// not recovering from a throttle is indistinguishable from a new one)
    /// and returns how many were removed. Keyed limiters also do this on
    /// their own; see [`RateLimiterBuilder::sweep_every`].
    pub fn evict_idle(&self) -> usize {
        let now = self.nanos(time::now());
        self.shared.last_sweep.store(now.max(1), Ordering::Relaxed);
        self.sweep(now)
    }

    /// How many keys are remembered.
    pub fn len(&self) -> usize {
        if self.shared.single.is_some() {
            1
        } else {
            self.shared.count.load(Ordering::Relaxed)
        }
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many keys were evicted so far.
    pub fn evicted(&self) -> u64 {
        self.shared.evicted.load(Ordering::Relaxed)
    }

    /// The bytes one key takes: the map entry (key, pointer, control byte)
    /// and the shared state. Heap data owned by the key itself (a string's
    /// bytes) comes on top.
    pub fn bytes_per_key() -> usize {
        std::mem::size_of::<(K, Arc<KeyState>)>()
            + 1
            + 2 * std::mem::size_of::<usize>()
            + std::mem::size_of::<KeyState>()
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
        let s = &self.shared.settings;
        if let Some(st) = &self.shared.single {
            return book(st, s, now, cost, 0).map(drop);
        }
        if let Some(st) = self.shared.map.get(key) {
            return book(&st, s, now, cost, 0).map(drop);
        }
        let st = self.insert(key, now);
        book(&st, s, now, cost, 0).map(drop)
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
    ) -> Result<Reservation, RateLimited> {
        let now = self.nanos(time::now());
        let st = self.state(key, now);
        let booking = book(
            &st,
            &self.shared.settings,
            now,
            cost,
            duration_nanos(max_wait),
        )?;
        Ok(Reservation {
            ticket: Ticket::new(self.erased(), st, booking),
        })
    }

    pub(crate) fn book(
        &self,
        st: &KeyState,
        now: u64,
        cost: Cost,
        max_wait: u64,
    ) -> Result<Booking, RateLimited> {
        book(st, &self.shared.settings, now, cost, max_wait)
    }

    /// What `key`'s quotas look like now; `None` for a key never seen (or
    /// evicted): its buckets are full.
    pub fn snapshot(&self, key: &K) -> Option<Snapshot> {
        let now = self.nanos(time::now());
        let st = match &self.shared.single {
            Some(s) => s.clone(),
            None => self.shared.map.get(key)?.clone(),
        };
        Some(self.erased().snapshot(&st, now))
    }

    /// Tells the limiter the upstream throttled a call for `key` that it
    /// admitted now (what the layer does on its own from the classifier).
    /// Returns whether the key was tightened.
    pub fn throttled(&self, key: &K, cause: ThrottleCause) -> bool {
        let now = self.nanos(time::now());
        let st = self.state(key, now);
        self.erased().tighten(&st, cause, now, now)
    }

    pub(crate) fn erased(&self) -> Handle {
        Handle {
            epoch: self.shared.epoch,
            settings: self.shared.settings,
        }
    }
}

/// What a key-independent part of the limiter needs after the decision:
/// the epoch and the settings (copied, so hooks hold no generic type).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Handle {
    epoch: Instant,
    settings: Settings,
}

impl Handle {
    pub(crate) fn nanos(&self, t: Instant) -> u64 {
        duration_nanos(t.saturating_duration_since(self.epoch))
    }

    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    /// Reconciles a booking's tokens with what the call really used.
    pub(crate) fn reconcile(&self, st: &KeyState, b: &Booking, actual: u32, now: u64) {
        let (Some(g), Some(grant)) = (st.tok.gcra, b.tok) else {
            return;
        };
        if actual < b.tokens {
            let back = g.charge(b.tokens - actual, b.tok_rate);
            let got = st.tok.bucket.refund(&grant, back, now);
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

    /// Gives a booking back (the waiter was cancelled before its slot).
    pub(crate) fn cancel(&self, st: &KeyState, b: &Booking) {
        let r = b.req.is_none_or(|g| st.req.bucket.give_back(&g));
        let t = b.tok.is_none_or(|g| st.tok.bucket.give_back(&g));
        tracing::trace!(given_back = r && t, "rate limit reservation cancelled");
    }

    /// Tightens `st` after an upstream throttle of a call admitted at
    /// `admitted`. Returns whether it did.
    pub(crate) fn tighten(
        &self,
        st: &KeyState,
        cause: ThrottleCause,
        admitted: u64,
        now: u64,
    ) -> bool {
        let Some((pause, factor, floor, recover)) = self.settings.feedback else {
            return false;
        };
        let (req, tok) = match cause {
            ThrottleCause::Local => return false,
            ThrottleCause::Requests | ThrottleCause::Burst => (true, false),
            ThrottleCause::Tokens => (false, true),
            _ => (true, true),
        };
        let last = st.tightened.load(Ordering::Acquire);
        if last > 0 && admitted < last {
            return false;
        }
        if st
            .tightened
            .compare_exchange(last, now + 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return false;
        }
        // Pause the whole key: every bucket moves by the same amount, and so
        // does every waiter's slot (the schedule is translated, never
        // squeezed).
        let mut delta = 0;
        for d in [&st.req, &st.tok] {
            if let Some(g) = d.gcra {
                delta = delta.max(d.bucket.pause_delta(&g, now, pause));
            }
        }
        for d in [&st.req, &st.tok] {
            if d.gcra.is_some() {
                d.bucket.charge_more(delta);
            }
        }
        st.shift.fetch_add(delta, Ordering::AcqRel);
        let mut new_rate = FULL_RATE;
        for (on, d) in [(req, &st.req), (tok, &st.tok)] {
            if on && d.gcra.is_some() {
                let cur = Dim::rate_of(d.ramp.load(Ordering::Relaxed), now, &self.settings);
                let from = ((u64::from(cur) * u64::from(factor)) >> 16) as u32;
                let from = from.max(floor).clamp(1, FULL_RATE);
                new_rate = new_rate.min(from);
                let ramp = Ramp {
                    start: now.saturating_add(pause),
                    from,
                    kind: RampKind::Recover,
                };
                d.ramp.store(ramp.pack(), Ordering::Relaxed);
            }
        }
        let n = st.throttles.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(
            ?cause,
            pause_ms = Duration::from_nanos(delta).as_millis() as u64,
            rate = rate_to_f64(new_rate),
            recover_s = Duration::from_nanos(recover).as_secs_f64(),
            throttles = n,
            "upstream throttled a call the local limit admitted; tightening"
        );
        true
    }

    pub(crate) fn snapshot(&self, st: &KeyState, now: u64) -> Snapshot {
        let paused = st.tightened.load(Ordering::Acquire);
        Snapshot {
            requests: st.req.state(now, &self.settings),
            tokens: st.tok.state(now, &self.settings),
            throttles: st.throttles.load(Ordering::Relaxed),
            last_throttle: (paused > 0).then(|| self.instant(paused - 1)),
        }
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
    /// How many times upstream throttles tightened this key.
    pub throttles: u32,
    /// When the key was last tightened.
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

/// A reserved slot. See [`RateLimiter::reserve`].
///
/// Dropping it before [`Reservation::ready`] completes cancels it.
#[derive(Debug)]
pub struct Reservation {
    ticket: Ticket,
}

impl Reservation {
    /// When the call may go.
    pub fn ready_at(&self) -> Instant {
        self.ticket.ready_at()
    }

    /// Waits for the slot (moved later if an upstream throttle paused the
    /// key meanwhile). Dropping the future cancels the reservation.
    pub async fn ready(self) -> Admission {
        loop {
            let at = self.ticket.ready_at();
            tokio::time::sleep_until(at).await;
            if self.ticket.ready_at() <= at {
                break;
            }
        }
        Admission {
            ticket: self.ticket.admit(),
        }
    }
}

/// An admitted call: tell the limiter what it really used, or that the
/// upstream throttled it.
#[derive(Debug)]
pub struct Admission {
    ticket: Admitted,
}

impl Admission {
    /// Reconciles the token estimate with the `tokens` the call really
    /// used: refunds the difference or charges the overrun.
    pub fn reconcile(self, tokens: u32) {
        let t = &self.ticket;
        let now = t.handle.nanos(time::now());
        t.handle.reconcile(&t.state, &t.booking, tokens, now);
    }

    /// Reports an upstream throttle of this call; returns whether the key
    /// was tightened.
    pub fn throttled(self, cause: ThrottleCause) -> bool {
        let t = &self.ticket;
        let now = t.handle.nanos(time::now());
        t.handle.tighten(&t.state, cause, t.booking.slot, now)
    }
}

/// A booking not yet admitted; cancels on drop.
pub(crate) struct Ticket {
    handle: Handle,
    state: Arc<KeyState>,
    booking: Booking,
    done: bool,
}

impl Ticket {
    pub(crate) fn new(handle: Handle, state: Arc<KeyState>, booking: Booking) -> Self {
        Self {
            handle,
            state,
            booking,
            done: false,
        }
    }

    /// The slot, moved by any pause added since booking.
    pub(crate) fn ready_at(&self) -> Instant {
        let moved = self.state.shift().saturating_sub(self.booking.shift);
        self.handle.instant(self.booking.slot.saturating_add(moved))
    }

    /// The call goes: no cancellation any more.
    pub(crate) fn admit(mut self) -> Admitted {
        self.done = true;
        Admitted {
            handle: self.handle,
            state: self.state.clone(),
            booking: self.booking,
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            self.handle.cancel(&self.state, &self.booking);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("slot", &self.booking.slot)
            .field("tokens", &self.booking.tokens)
            .finish_non_exhaustive()
    }
}

/// An admitted call's booking, for reconciliation and feedback.
pub(crate) struct Admitted {
    pub(crate) handle: Handle,
    pub(crate) state: Arc<KeyState>,
    pub(crate) booking: Booking,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("slot", &self.booking.slot)
            .field("tokens", &self.booking.tokens)
            .finish_non_exhaustive()
    }
}
