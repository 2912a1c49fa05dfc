//! The shared limiter: per-key state, the two-dimension decision, slow
//! start, feedback, eviction and snapshots.

use std::fmt;
use std::hash::Hash;
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
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
        let single = KeyState::new(self.limits);
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

    /// The rate factor for a call booked at `now` (evaluated where its slot
    /// can start: at the bucket's latest reservation), starting a
    /// slow-start ramp if the bucket has been idle.
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
    limits_for: LimitsFor<K>,
    single: Option<KeyState>,
    /// Per-key state, inline: one cache miss per decision, no allocation
    /// per key beyond the map's own.
    map: DashMap<K, KeyState>,
    count: AtomicUsize,
    overflow: OnceLock<KeyState>,
    tokens_seen: AtomicBool,
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
/// Keyed state lives inline in a [`dashmap`](https://docs.rs/dashmap)
/// `DashMap` (the sharded, read-locked map governor also uses): a decision
/// takes one shard read lock and one CAS, and a key costs its map slot.
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
    fn from_parts(b: RateLimiterBuilder, limits_for: LimitsFor<K>, single: Option<KeyState>) -> Self
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
        let tokens_seen = single.as_ref().is_some_and(KeyState::has_tokens);
        Self {
            shared: Arc::new(Shared {
                epoch: time::now(),
                settings,
                limits_for,
                single,
                map: DashMap::new(),
                count: AtomicUsize::new(0),
                overflow: OnceLock::new(),
                tokens_seen: AtomicBool::new(tokens_seen),
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

    /// The instant of a nanosecond count.
    pub(crate) fn instant(&self, nanos: u64) -> Instant {
        self.shared.epoch + Duration::from_nanos(nanos)
    }

    /// Whether this limiter has no keys (one state for everything).
    pub fn is_keyed(&self) -> bool {
        self.shared.single.is_none()
    }

    /// Whether some key limits tokens (so the service should estimate them
    /// before booking).
    pub(crate) fn tokens_seen(&self) -> bool {
        self.shared.tokens_seen.load(Ordering::Relaxed)
    }
}

impl<K> RateLimiter<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Runs `f` on the state of `key`, created if new. The map's shard lock
    /// is held (for reading) while `f` runs: `f` must not touch the map.
    #[inline]
    pub(crate) fn with_state<R>(
        &self,
        key: &K,
        now: u64,
        f: impl FnOnce(&KeyState, Slot) -> R,
    ) -> R {
        let sh = &*self.shared;
        if let Some(s) = &sh.single {
            return f(s, Slot::Single);
        }
        if let Some(s) = sh.map.get(key) {
            return f(&s, Slot::Map);
        }
        self.with_new(key, now, f)
    }

    /// Runs `f` on the existing state a booking used; `None` if it was
    /// evicted meanwhile.
    pub(crate) fn with_slot<R>(
        &self,
        key: &K,
        slot: Slot,
        f: impl FnOnce(&KeyState) -> R,
    ) -> Option<R> {
        let sh = &*self.shared;
        match slot {
            Slot::Single => sh.single.as_ref().map(f),
            Slot::Overflow => sh.overflow.get().map(f),
            Slot::Map => sh.map.get(key).map(|s| f(&s)),
        }
    }

    #[cold]
    fn with_new<R>(&self, key: &K, now: u64, f: impl FnOnce(&KeyState, Slot) -> R) -> R {
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
                return f(&s, Slot::Map);
            }
            let n = sh.overflowed.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    max_keys = sh.settings.max_keys,
                    overflowed = n + 1,
                    "rate limiter key map is full; new keys share one overflow state"
                );
            }
            let st = sh.overflow.get_or_init(|| self.new_state(key));
            return f(st, Slot::Overflow);
        }
        let mut created = false;
        let entry = sh.map.entry(key.clone()).or_insert_with(|| {
            created = true;
            self.new_state(key)
        });
        if created {
            sh.count.fetch_add(1, Ordering::Relaxed);
        }
        let r = entry.downgrade();
        f(&r, Slot::Map)
    }

    fn new_state(&self, key: &K) -> KeyState {
        let st = KeyState::new((self.shared.limits_for)(key));
        if st.has_tokens() {
            self.shared.tokens_seen.store(true, Ordering::Relaxed);
        }
        st
    }

    fn sweep(&self, now: u64) -> usize {
        let sh = &*self.shared;
        let mut removed = 0;
        sh.map.retain(|_, st| {
            let drop = st.is_idle(now, &sh.settings);
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

    /// Removes every idle key now and returns how many were removed. A key
    /// is idle when its buckets are full (so no call is waiting on it) and
    /// it is not recovering from an upstream throttle: it is then
    /// indistinguishable from a new key. Keyed limiters also do this on
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

    /// The bytes one key takes in the map: the slot (key and state) and its
    /// control byte, at hashbrown's 7/8 load factor. Heap data owned by
    /// the key itself (a string's bytes) comes on top.
    pub fn bytes_per_key() -> usize {
        (std::mem::size_of::<(K, KeyState)>() + 1) * 8 / 7
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
        self.with_state(key, now, |st, _| book(st, s, now, cost, 0).map(drop))
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
    ) -> Result<Reservation<K>, RateLimited> {
        let now = self.nanos(time::now());
        let (booking, slot) = self.with_state(key, now, |st, slot| {
            book(
                st,
                &self.shared.settings,
                now,
                cost,
                duration_nanos(max_wait),
            )
            .map(|b| (b, slot))
        })?;
        Ok(Reservation {
            ticket: Ticket::new(self.clone(), key.clone(), slot, booking),
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
        let sh = &*self.shared;
        match &sh.single {
            Some(s) => Some(self.snapshot_of(s, now)),
            None => sh.map.get(key).map(|s| self.snapshot_of(&s, now)),
        }
    }

    /// Tells the limiter the upstream throttled a call for `key` that it
    /// admitted now (what the layer does on its own from the classifier).
    /// Returns whether the key was tightened.
    pub fn throttled(&self, key: &K, cause: ThrottleCause) -> bool {
        let now = self.nanos(time::now());
        self.with_state(key, now, |st, _| self.tighten(st, cause, now, now))
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
    fn cancel(&self, st: &KeyState, b: &Booking) {
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
        let settings = &self.shared.settings;
        let Some((pause, factor, floor, recover)) = settings.feedback else {
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
                let cur = Dim::rate_of(d.ramp.load(Ordering::Relaxed), now, settings);
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

    fn snapshot_of(&self, st: &KeyState, now: u64) -> Snapshot {
        let settings = &self.shared.settings;
        let paused = st.tightened.load(Ordering::Acquire);
        Snapshot {
            requests: st.req.state(now, settings),
            tokens: st.tok.state(now, settings),
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
pub struct Reservation<K = ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    ticket: Ticket<K>,
}

impl<K> Reservation<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// When the call may go.
    pub fn ready_at(&self) -> Instant {
        self.ticket.ready_at()
    }

    /// Waits for the slot (moved later if an upstream throttle paused the
    /// key meanwhile). Dropping the future cancels the reservation.
    pub async fn ready(self) -> Admission<K> {
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
pub struct Admission<K = ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    ticket: Admitted<K>,
}

impl<K> Admission<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Reconciles the token estimate with the `tokens` the call really
    /// used: refunds the difference or charges the overrun.
    pub fn reconcile(self, tokens: u32) {
        self.ticket.reconcile(Some(tokens));
    }

    /// Reports an upstream throttle of this call; returns whether the key
    /// was tightened.
    pub fn throttled(self, cause: ThrottleCause) -> bool {
        self.ticket.throttled(cause)
    }
}

/// A booking not yet admitted; cancels on drop.
pub(crate) struct Ticket<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    inner: Option<Admitted<K>>,
}

impl<K> Ticket<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    pub(crate) fn new(limiter: RateLimiter<K>, key: K, slot: Slot, booking: Booking) -> Self {
        Self {
            inner: Some(Admitted {
                limiter,
                key,
                slot,
                booking,
            }),
        }
    }

    /// The slot, moved by any pause added since booking.
    pub(crate) fn ready_at(&self) -> Instant {
        let a = self.inner.as_ref().expect("ticket already admitted");
        let shift = a
            .limiter
            .with_slot(&a.key, a.slot, KeyState::shift)
            .unwrap_or(a.booking.shift);
        let moved = shift.saturating_sub(a.booking.shift);
        a.limiter.instant(a.booking.slot.saturating_add(moved))
    }

    /// The call goes: no cancellation any more.
    pub(crate) fn admit(mut self) -> Admitted<K> {
        self.inner.take().expect("ticket already admitted")
    }
}

impl<K> Drop for Ticket<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn drop(&mut self) {
        if let Some(a) = self.inner.take() {
            a.limiter
                .with_slot(&a.key, a.slot, |st| a.limiter.cancel(st, &a.booking));
        }
    }
}

impl<K> fmt::Debug for Ticket<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("admitted", &self.inner)
            .finish()
    }
}

/// An admitted call's booking, for reconciliation and feedback.
pub(crate) struct Admitted<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    limiter: RateLimiter<K>,
    key: K,
    slot: Slot,
    pub(crate) booking: Booking,
}

impl<K> Admitted<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Reconciles tokens with `actual` (`None`: the estimate stands).
    pub(crate) fn reconcile(&self, actual: Option<u32>) {
        let Some(actual) = actual else { return };
        if self.booking.tokens == 0 {
            return;
        }
        let now = self.limiter.nanos(time::now());
        self.limiter.with_slot(&self.key, self.slot, |st| {
            self.limiter.reconcile(st, &self.booking, actual, now)
        });
    }

    /// Feeds an upstream throttle back.
    pub(crate) fn throttled(&self, cause: ThrottleCause) -> bool {
        if cause == ThrottleCause::Local {
            return false;
        }
        let now = self.limiter.nanos(time::now());
        self.limiter
            .with_slot(&self.key, self.slot, |st| {
                self.limiter.tighten(st, cause, self.booking.slot, now)
            })
            .unwrap_or(false)
    }
}

impl<K> fmt::Debug for Admitted<K>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("slot", &self.booking.slot)
            .field("tokens", &self.booking.tokens)
            .finish_non_exhaustive()
    }
}
