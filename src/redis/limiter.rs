//! The distributed limiter: decisions in Redis, the failure policy, leases,
//! reservations and admissions.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use ::redis::RedisError;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use dashmap::DashMap;
use tokio::sync::Notify;

use crate::BoxError;
use crate::classify::ThrottleCause;
use crate::rate_limit::bucket::{FULL_RATE, Gcra};
use crate::rate_limit::error::{Dimension, RateLimited};
use crate::rate_limit::{self, Cost, Limits, RateLimiter};
use crate::time::{self, Instant, duration_nanos};

use super::error::StoreUnavailable;
use super::fallback::{FailurePolicy, Health, scale};
use super::key::StoreKey;
use super::lease::{Lease, LeaseCell, Renewal};
use super::script::{Booked, Call, DimArgs, Grant, Now, Refund};

/// Whose clock the script decides on.
///
/// # Default
///
/// [`Clock::Server`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Clock {
    /// Redis's own clock (`TIME`, read inside the script): every replica
    /// decides on the same clock, whatever theirs say. A wait computed in
    /// Redis is counted locally from the moment the answer arrives, so a
    /// call goes at most one network latency late, never early. Use this
    /// with several processes.
    #[default]
    Server,
    /// This process's tokio clock, as nanoseconds since `origin`: the
    /// script takes `now` from the caller. Limiters sharing keys must share
    /// the origin, so this is for one process (tests with a controlled
    /// clock, several limiters in one binary). Redis still expires idle keys
    /// on its own clock: under paused test time, set a large
    /// [`expiry_slack`](RedisLimiterBuilder::expiry_slack).
    Local(Instant),
}

/// Builds a [`RedisLimiter`]. See the [module docs](super) for an example.
#[derive(Clone, Debug)]
pub struct RedisLimiterBuilder {
    limits: Limits,
    prefix: String,
    timeout: Option<Duration>,
    policy: FailurePolicy,
    probe_every: Duration,
    clock: Clock,
    lease: Option<Lease>,
    feedback: Option<Duration>,
    expiry_slack: Duration,
    max_keys: usize,
}

/// The default Redis timeout: 100 ms.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

impl RedisLimiterBuilder {
    /// The prefix of every Redis key this limiter writes. Default is
    /// `"tower-qwen:rl:"`. Limiters that must share budgets use the same
    /// prefix (and the same limits).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long one Redis call may take before the failure policy decides
    /// instead (and Redis counts as down). Default is 100 ms; `None`
    /// disables it (the connection's own timeouts still apply).
    pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
        self.timeout = timeout.into();
        self
    }

    /// What to do when Redis cannot decide. Default is
    /// [`FailurePolicy::default`] (fail open, one replica).
    pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
        self.policy = policy;
        self
    }

    /// While Redis is down, how often a call tries it again. Default is
    /// 500 ms.
    pub fn probe_every(mut self, every: Duration) -> Self {
        self.probe_every = every;
        self
    }

    /// Whose clock decides. Default is [`Clock::Server`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Local pre-reservation. Default is none (`None` disables).
    pub fn lease(mut self, lease: impl Into<Option<Lease>>) -> Self {
        self.lease = lease.into();
        self
    }

    /// When the upstream throttles a call the limiter admitted, pause the
    /// key in Redis for this long (for every replica; a pause applied
    /// while calls already hold later slots does not move those). Default
    /// is 1 s, like the in-memory [`Feedback`](crate::rate_limit::Feedback)
    /// (whose reduced-rate recovery is not replicated here); `None`
    /// disables.
    pub fn feedback(mut self, pause: impl Into<Option<Duration>>) -> Self {
        self.feedback = pause.into();
        self
    }

    /// How long a key stays in Redis after its buckets are full again.
    /// Default is 1 s.
    pub fn expiry_slack(mut self, slack: Duration) -> Self {
        self.expiry_slack = slack;
        self
    }

    /// The most keys the local state (leases, the fallback limiter)
    /// remembers. Default is 100,000.
    pub fn max_keys(mut self, max: usize) -> Self {
        self.max_keys = max.max(1);
        self
    }

    /// One limit for everything (key `()`), on `conn`.
    pub fn build(self, conn: ConnectionManager) -> RedisLimiter<()> {
        self.build_keyed(conn)
    }

    /// A keyed limiter: each key gets these limits.
    pub fn build_keyed<K>(self, conn: ConnectionManager) -> RedisLimiter<K>
    where
        K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
    {
        let limits = self.limits;
        self.build_keyed_with(conn, move |_: &K| limits)
    }

    /// A keyed limiter whose limits depend on the key. Every replica must
    /// give a key the same limits. `limits_for` runs on every decision (the
    /// limits travel with each script call): keep it cheap.
    pub fn build_keyed_with<K, F>(self, conn: ConnectionManager, limits_for: F) -> RedisLimiter<K>
    where
        K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
        F: Fn(&K) -> Limits + Send + Sync + 'static,
    {
        let limits_for: LimitsFor<K> = Arc::new(limits_for);
        let fallback = self.policy.replicas().map(|n| {
            let f = limits_for.clone();
            RateLimiter::builder(Limits::UNLIMITED)
                .max_keys(self.max_keys)
                .build_keyed_with(move |k: &K| scale(f(k), n.get()))
        });
        let origin = time::now();
        RedisLimiter {
            shared: Arc::new(Shared {
                core: Arc::new(Core {
                    conn,
                    timeout: self.timeout,
                    clock: self.clock,
                    origin,
                    slack_ms: u64::try_from(self.expiry_slack.as_millis()).unwrap_or(u64::MAX),
                    health: Health::new(duration_nanos(self.probe_every)),
                    policy: self.policy,
                    feedback: self.feedback.map(duration_nanos),
                    counters: Counters::default(),
                    background: Background::default(),
                }),
                prefix: self.prefix,
                limits_for,
                fallback,
                lease: self.lease,
                leases: DashMap::new(),
                max_keys: self.max_keys,
                last_sweep: AtomicU64::new(0),
            }),
        }
    }
}

/// How many renewals in flight a call waits for before it books alone.
const LEASE_WAITS: usize = 4;

type LimitsFor<K> = Arc<dyn Fn(&K) -> Limits + Send + Sync>;

#[derive(Debug, Default)]
struct Counters {
    redis: AtomicU64,
    leased: AtomicU64,
    fallback: AtomicU64,
    closed: AtomicU64,
    errors: AtomicU64,
}

/// Background Redis calls (give-backs, reconciliations, pauses) in flight.
#[derive(Debug, Default)]
struct Background {
    inflight: AtomicUsize,
    idle: Notify,
}

/// What every Redis call needs; not generic, shared by admissions.
struct Core {
    conn: ConnectionManager,
    timeout: Option<Duration>,
    clock: Clock,
    origin: Instant,
    slack_ms: u64,
    health: Health,
    policy: FailurePolicy,
    feedback: Option<u64>,
    counters: Counters,
    background: Background,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Core")
            .field("timeout", &self.timeout)
            .field("clock", &self.clock)
            .field("policy", &self.policy)
            .field("down", &self.health.is_down())
            .finish_non_exhaustive()
    }
}

/// Why a Redis call gave no answer.
enum Failure {
    Timeout,
    Redis(RedisError),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Timeout => f.write_str("timed out"),
            Failure::Redis(e) => write!(f, "{e}"),
        }
    }
}

impl Core {
    fn nanos(&self, t: Instant) -> u64 {
        duration_nanos(t.saturating_duration_since(self.origin))
    }

    /// The script's "now" for a decision at local instant `t`.
    fn script_now(&self, t: Instant) -> Now {
        match self.clock {
            Clock::Server => Now::Server,
            Clock::Local(origin) => Now::Local(duration_nanos(t.saturating_duration_since(origin))),
        }
    }

    /// Runs a script call with the timeout, and keeps the health state.
    async fn run(&self, call: Call) -> Result<Vec<i64>, Failure> {
        let mut conn = self.conn.clone();
        let res = match self.timeout {
            Some(d) => match tokio::time::timeout(d, call.run(&mut conn)).await {
                Ok(r) => r.map_err(Failure::Redis),
                Err(_) => Err(Failure::Timeout),
            },
            None => call.run(&mut conn).await.map_err(Failure::Redis),
        };
        let now = self.nanos(time::now());
        match &res {
            Ok(_) => {
                self.health.up(now);
            }
            Err(e) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                if is_store_failure(e) {
                    self.health.down(now, e, self.policy);
                } else {
                    tracing::warn!(error = %e, "redis rate limit script failed");
                }
            }
        }
        res
    }

    /// Runs `fut` in the background (a give-back or reconciliation from a
    /// synchronous context), counted for [`RedisLimiter::settle`]. Skipped
    /// while Redis is known to be down: a give-back or refund is then lost
    /// (capacity, never a burst), and so is an overrun (the fallback
    /// decides meanwhile anyway).
    fn spawn(self: &Arc<Self>, fut: impl Future<Output = ()> + Send + 'static) {
        if self.health.is_down() {
            tracing::debug!("redis is down; a rate limit give-back or reconciliation is dropped");
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(
                "no tokio runtime; a rate limit give-back or reconciliation is dropped"
            );
            return;
        };
        self.background.inflight.fetch_add(1, Ordering::AcqRel);
        let core = self.clone();
        rt.spawn(async move {
            fut.await;
            if core.background.inflight.fetch_sub(1, Ordering::AcqRel) == 1 {
                core.background.idle.notify_waiters();
            }
        });
    }

    fn unavailable(&self, now: u64, failure: Option<&Failure>) -> StoreUnavailable {
        self.counters.closed.fetch_add(1, Ordering::Relaxed);
        let after = self.health.retry_after(now);
        match failure {
            None => StoreUnavailable::down(after),
            Some(Failure::Timeout) => StoreUnavailable::timeout(after),
            Some(Failure::Redis(_)) => StoreUnavailable::error(after),
        }
    }
}

/// Whether a failure says Redis cannot decide (as opposed to, say, a script
/// error on a healthy server).
fn is_store_failure(f: &Failure) -> bool {
    match f {
        Failure::Timeout => true,
        Failure::Redis(e) => {
            e.is_io_error()
                || e.is_connection_dropped()
                || e.is_connection_refusal()
                || e.is_timeout()
                || e.is_unrecoverable_error()
                || !matches!(e.kind(), ::redis::ErrorKind::Server(_))
        }
    }
}

struct Shared<K> {
    core: Arc<Core>,
    prefix: String,
    limits_for: LimitsFor<K>,
    fallback: Option<RateLimiter<K>>,
    lease: Option<Lease>,
    leases: DashMap<K, Arc<LeaseCell>>,
    max_keys: usize,
    last_sweep: AtomicU64,
}

/// A GCRA rate limiter for requests and tokens whose state lives in Redis,
/// so that every replica sharing the Redis (and the key prefix) shares one
/// budget per key. Shared by every clone (an `Arc` inside).
///
/// The decision is the in-memory [`RateLimiter`]'s, made by one atomic
/// server-side script: a weighted cost in two dimensions booked at one
/// common slot, reservations up to a maximum wait (given back when
/// cancelled), refunds and overruns when tokens are reconciled. Idle keys
/// expire on their own. When Redis is slow or down, a [`FailurePolicy`]
/// decides; with a [`Lease`], most calls are decided locally.
///
/// [`RedisRateLimitLayer`](super::RedisRateLimitLayer) drives it from a
/// tower stack. See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share all state (and the connection).
pub struct RedisLimiter<K = ()> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for RedisLimiter<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K> fmt::Debug for RedisLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimiter")
            .field("prefix", &self.shared.prefix)
            .field("core", &self.shared.core)
            .field("lease", &self.shared.lease)
            .finish_non_exhaustive()
    }
}

/// Counters of a [`RedisLimiter`]. See [`RedisLimiter::stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Decisions made by Redis.
    pub redis: u64,
    /// Calls admitted from a local lease, without a round trip.
    pub leased: u64,
    /// Decisions made by the local fallback limiter (fail open).
    pub fallback: u64,
    /// Calls refused because Redis could not decide (fail closed).
    pub failed_closed: u64,
    /// Redis calls that failed or timed out.
    pub errors: u64,
    /// Outages so far (up -> down transitions).
    pub outages: u64,
    /// Whether Redis is currently considered up.
    pub available: bool,
}

impl RedisLimiter<()> {
    /// A builder with these limits for every key.
    pub fn builder(limits: Limits) -> RedisLimiterBuilder {
        RedisLimiterBuilder {
            limits,
            prefix: "tower-qwen:rl:".to_owned(),
            timeout: Some(DEFAULT_TIMEOUT),
            policy: FailurePolicy::default(),
            probe_every: Duration::from_millis(500),
            clock: Clock::Server,
            lease: None,
            feedback: Some(Duration::from_secs(1)),
            expiry_slack: Duration::from_secs(1),
            max_keys: 100_000,
        }
    }

    /// One unkeyed limiter with the default settings.
    pub fn new(limits: Limits, conn: ConnectionManager) -> Self {
        Self::builder(limits).build(conn)
    }
}

/// A [`ConnectionManagerConfig`] suited to the limiter: connection and
/// response timeouts of `timeout` (`None`: none, e.g. under paused test
/// time), and quick, short reconnection attempts (2 retries from 20 ms, at
/// most 500 ms apart) so that the limiter's own probes drive recovery.
pub fn manager_config(timeout: impl Into<Option<Duration>>) -> ConnectionManagerConfig {
    let timeout = timeout.into();
    ConnectionManagerConfig::new()
        .set_connection_timeout(timeout)
        .set_response_timeout(timeout)
        .set_number_of_retries(2)
        .set_min_delay(Duration::from_millis(20))
        .set_max_delay(Duration::from_millis(500))
}

/// Connects to Redis at `url` with [`manager_config`] and `timeout`, lazily
/// (the first call connects), so it works while Redis is still down.
///
/// # Errors
///
/// An invalid URL.
///
/// # Panics
///
/// Outside a tokio runtime (the manager spawns a task).
pub fn connect_lazy(
    url: &str,
    timeout: impl Into<Option<Duration>>,
) -> Result<ConnectionManager, RedisError> {
    let client = ::redis::Client::open(url)?;
    ConnectionManager::new_lazy_with_config(client, manager_config(timeout))
}

/// The GCRA parameters and charges of `cost` under `limits`.
fn dims(limits: &Limits, cost: Cost) -> (DimArgs, DimArgs) {
    let one = |q: Option<rate_limit::Quota>, units: u32| match q {
        None => DimArgs::default(),
        Some(q) => {
            let g = Gcra::new(q.interval_nanos(), q.burst().get());
            DimArgs {
                charge: if units > 0 {
                    g.charge(units, FULL_RATE)
                } else {
                    0
                },
                interval: g.interval(),
                tolerance: g.tolerance(),
            }
        }
    };
    (
        one(limits.get_requests(), cost.requests),
        one(limits.get_tokens(), cost.tokens),
    )
}

impl<K> RedisLimiter<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    /// Decides a call of `cost` for `key` now, without waiting.
    ///
    /// # Errors
    ///
    /// [`RateLimited`] when some quota has no room now;
    /// [`StoreUnavailable`] when Redis cannot decide and the policy fails
    /// closed. Downcast the [`BoxError`].
    pub async fn check(&self, key: &K, cost: Cost) -> Result<Admission<K>, BoxError> {
        self.check_at(key, cost, time::now()).await
    }

    /// [`RedisLimiter::check`] as of the local instant `now` (with
    /// [`Clock::Local`], the script decides at `now`).
    ///
    /// # Errors
    ///
    /// As [`RedisLimiter::check`].
    pub async fn check_at(
        &self,
        key: &K,
        cost: Cost,
        now: Instant,
    ) -> Result<Admission<K>, BoxError> {
        let r = self.reserve_at(key, cost, Duration::ZERO, now).await?;
        Ok(r.into_admission().await)
    }

    /// Reserves a slot for a call of `cost`, at most `max_wait` from now.
    /// Await [`Reservation::ready`] to wait for it; drop the reservation to
    /// cancel (its slot is given back in Redis when nothing was booked
    /// after it).
    ///
    /// # Errors
    ///
    /// [`RateLimited`] when the slot would be further than `max_wait`
    /// (nothing is reserved then); [`StoreUnavailable`] when Redis cannot
    /// decide and the policy fails closed.
    pub async fn reserve(
        &self,
        key: &K,
        cost: Cost,
        max_wait: Duration,
    ) -> Result<Reservation<K>, BoxError> {
        self.reserve_at(key, cost, max_wait, time::now()).await
    }

    /// [`RedisLimiter::reserve`] as of the local instant `now`.
    ///
    /// # Errors
    ///
    /// As [`RedisLimiter::reserve`].
    pub async fn reserve_at(
        &self,
        key: &K,
        cost: Cost,
        max_wait: Duration,
        now: Instant,
    ) -> Result<Reservation<K>, BoxError> {
        let limits = (self.shared.limits_for)(key);
        self.decide(key, limits, cost, duration_nanos(max_wait), now)
            .await
    }

    /// The limits of `key`.
    pub fn limits(&self, key: &K) -> Limits {
        (self.shared.limits_for)(key)
    }

    /// Whether Redis is currently considered up.
    pub fn is_available(&self) -> bool {
        !self.shared.core.health.is_down()
    }

    /// The limiter's counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.core.counters;
        Stats {
            redis: c.redis.load(Ordering::Relaxed),
            leased: c.leased.load(Ordering::Relaxed),
            fallback: c.fallback.load(Ordering::Relaxed),
            failed_closed: c.closed.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            outages: self.shared.core.health.outages(),
            available: self.is_available(),
        }
    }

    /// Pings Redis now (with the timeout) and updates the up/down state;
    /// returns whether Redis answered. Calls do this on their own every
    /// [`probe_every`](RedisLimiterBuilder::probe_every) while Redis is
    /// down; this is for health checks and tests.
    pub async fn probe(&self) -> bool {
        let core = &self.shared.core;
        let mut conn = core.conn.clone();
        let ping = ::redis::cmd("PING");
        let res = match core.timeout {
            Some(d) => tokio::time::timeout(d, ping.query_async::<String>(&mut conn))
                .await
                .map_err(|_| Failure::Timeout)
                .and_then(|r| r.map_err(Failure::Redis)),
            None => ping
                .query_async::<String>(&mut conn)
                .await
                .map_err(Failure::Redis),
        };
        let now = core.nanos(time::now());
        match res {
            Ok(_) => {
                core.health.up(now);
                true
            }
            Err(e) => {
                core.health.down(now, &e, core.policy);
                false
            }
        }
    }

    /// Waits until the background Redis calls started so far (give-backs of
    /// cancelled reservations, reconciliations and pauses sent from
    /// response bodies) have completed or timed out. For tests and
    /// graceful shutdown.
    pub async fn settle(&self) {
        let bg = &self.shared.core.background;
        loop {
            let idle = bg.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if bg.inflight.load(Ordering::Acquire) == 0 {
                return;
            }
            idle.await;
        }
    }

    fn redis_key(&self, key: &K) -> String {
        let mut s = String::with_capacity(self.shared.prefix.len() + 24);
        s.push_str(&self.shared.prefix);
        key.write_key(&mut s);
        s
    }

    /// The charges of `cost` in the dimensions `limits` has (a dimension
    /// without a quota is free).
    fn effective(limits: &Limits, cost: Cost) -> Cost {
        Cost {
            requests: if limits.get_requests().is_some() {
                cost.requests
            } else {
                0
            },
            tokens: if limits.get_tokens().is_some() {
                cost.tokens
            } else {
                0
            },
        }
    }

    /// Admits `cost` from `key`'s local lease, if it covers it (no round
    /// trip). `None` when leases are off or the slice does not cover it.
    pub(crate) fn try_lease(
        &self,
        key: &K,
        limits: &Limits,
        cost: Cost,
        now: Instant,
    ) -> Option<Admission<K>> {
        self.shared.lease?;
        let cost = Self::effective(limits, cost);
        let state = self.shared.leases.get(key)?.clone();
        let ln = self.shared.core.nanos(now);
        let generation = state.lock().take(cost, ln)?;
        self.shared
            .core
            .counters
            .leased
            .fetch_add(1, Ordering::Relaxed);
        let (r, t) = dims(limits, cost);
        Some(Admission {
            inner: AdmissionInner::Leased {
                lease: state,
                generation,
                tokens: cost.tokens,
                redis: RedisCall {
                    core: self.shared.core.clone(),
                    key: self.redis_key(key),
                    r,
                    t,
                },
            },
        })
    }

    /// `key`'s lease, created if new. `None` when the map is full of live
    /// leases (swept at most once a second): that key goes without a lease.
    fn lease_cell(&self, key: &K, now: u64) -> Option<Arc<LeaseCell>> {
        let sh = &*self.shared;
        if let Some(s) = sh.leases.get(key) {
            return Some(s.clone());
        }
        if sh.leases.len() >= sh.max_keys {
            let last = sh.last_sweep.load(Ordering::Relaxed);
            if now.saturating_sub(last) >= 1_000_000_000
                && sh
                    .last_sweep
                    .compare_exchange(last, now.max(1), Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
            {
                sh.leases
                    .retain(|_, s| Arc::strong_count(s) > 1 || !s.lock().is_idle(now));
            }
            if sh.leases.len() >= sh.max_keys {
                return None;
            }
        }
        Some(sh.leases.entry(key.clone()).or_default().clone())
    }

    pub(crate) async fn decide(
        &self,
        key: &K,
        limits: Limits,
        cost: Cost,
        max_wait: u64,
        at: Instant,
    ) -> Result<Reservation<K>, BoxError> {
        let cost = Self::effective(&limits, cost);
        if cost.requests == 0 && cost.tokens == 0 {
            return Ok(Reservation::now(Admission::free()));
        }
        if let Some(a) = self.try_lease(key, &limits, cost, at) {
            return Ok(Reservation::now(a));
        }
        let core = &self.shared.core;
        let ln = core.nanos(at);
        if !core.health.should_try(ln) {
            return self.fail(key, cost, max_wait, at, None);
        }
        let (r, t) = dims(&limits, cost);
        let redis_key = self.redis_key(key);
        let now = core.script_now(at);
        // With leases on, ask for a slice too. One renewal per key at a
        // time: a call that finds one in flight waits for it and tries its
        // slice (a few times: many callers may be waiting), then books
        // alone.
        let mut lease = None;
        if let Some(l) = self.shared.lease
            && let Some(cell) = self.lease_cell(key, ln)
        {
            for attempt in 0..=LEASE_WAITS {
                let renewed = cell.renewed().notified();
                tokio::pin!(renewed);
                renewed.as_mut().enable();
                let begun = cell.lock().begin_renewal();
                match begun {
                    Some(refund) => {
                        lease = Some((l, Renewal::new(cell.clone()), refund));
                        break;
                    }
                    None if attempt < LEASE_WAITS => {
                        renewed.await;
                        if let Some(a) = self.try_lease(key, &limits, cost, at) {
                            return Ok(Reservation::now(a));
                        }
                    }
                    None => {}
                }
            }
        }
        let (call, slice) = match &lease {
            Some((l, _, refund)) => {
                let slice = Self::effective(&limits, l.slice());
                let (sr, st) = dims(&limits, slice);
                let call = Call::lease(
                    redis_key.clone(),
                    now,
                    core.slack_ms,
                    r,
                    t,
                    max_wait,
                    (sr.charge, st.charge),
                    *refund,
                );
                (call, Some((slice, sr.charge, st.charge)))
            }
            None => (
                Call::book(redis_key.clone(), now, core.slack_ms, r, t, max_wait),
                None,
            ),
        };
        let reply = core.run(call).await;
        let booked = reply.and_then(|v| {
            let lc = slice.map_or((0, 0), |(_, a, b)| (a, b));
            super::script::parse_booked(&v, r, t, lc).map_err(Failure::Redis)
        });
        let booked = match booked {
            Ok(b) => b,
            Err(e) => {
                drop(lease);
                return self.fail(key, cost, max_wait, at, Some(&e));
            }
        };
        core.counters.redis.fetch_add(1, Ordering::Relaxed);
        // A wait from Redis's clock counts from when the answer arrived.
        let base = match core.clock {
            Clock::Server => time::now(),
            Clock::Local(_) => at,
        };
        match booked {
            Booked::Refused { wait, tokens } => {
                drop(lease);
                let dim = if tokens {
                    Dimension::Tokens
                } else {
                    Dimension::Requests
                };
                Err(RateLimited::new(Duration::from_nanos(wait), dim).into())
            }
            Booked::Granted {
                wait,
                grant,
                leased,
            } => {
                if let (Some((l, renewal, _)), Some((slice, _, _))) = (&mut lease, slice)
                    && leased
                {
                    let (ir, it) = (r.interval.max(1), t.interval.max(1));
                    let expires = core.nanos(base).saturating_add(duration_nanos(l.ttl()));
                    renewal.granted((slice, expires, grant, ir, it));
                }
                drop(lease);
                let admission = Admission {
                    inner: AdmissionInner::Redis {
                        redis: RedisCall {
                            core: core.clone(),
                            key: redis_key,
                            r,
                            t,
                        },
                        grant,
                        tokens: cost.tokens,
                    },
                };
                Ok(Reservation {
                    inner: ReservationInner::Redis {
                        at: base + Duration::from_nanos(wait),
                        pending: Pending(Some(admission)),
                    },
                })
            }
        }
    }

    /// The failure policy's decision.
    fn fail(
        &self,
        key: &K,
        cost: Cost,
        max_wait: u64,
        at: Instant,
        failure: Option<&Failure>,
    ) -> Result<Reservation<K>, BoxError> {
        let core = &self.shared.core;
        match &self.shared.fallback {
            Some(local) => {
                core.counters.fallback.fetch_add(1, Ordering::Relaxed);
                let r = local.reserve(key, cost, Duration::from_nanos(max_wait))?;
                Ok(Reservation {
                    inner: ReservationInner::Local(r),
                })
            }
            None => Err(core.unavailable(core.nanos(at), failure).into()),
        }
    }
}

/// The parts of a booking needed to talk to Redis about it later.
#[derive(Debug)]
struct RedisCall {
    core: Arc<Core>,
    key: String,
    r: DimArgs,
    t: DimArgs,
}

/// A reserved slot. See [`RedisLimiter::reserve`].
///
/// Dropping it before [`Reservation::ready`] completes cancels it: the slot
/// is given back in Redis (in the background) when nothing was booked after
/// it.
#[derive(Debug)]
pub struct Reservation<K = ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    inner: ReservationInner<K>,
}

#[derive(Debug)]
enum ReservationInner<K: Hash + Eq + Clone + Send + Sync + 'static> {
    Now(Option<Admission<K>>),
    Redis { at: Instant, pending: Pending<K> },
    Local(rate_limit::Reservation<K>),
}

/// A Redis booking not yet admitted: cancelled on drop.
#[derive(Debug)]
struct Pending<K: Hash + Eq + Clone + Send + Sync + 'static>(Option<Admission<K>>);

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Drop for Pending<K> {
    fn drop(&mut self) {
        if let Some(Admission {
            inner: AdmissionInner::Redis { redis, grant, .. },
        }) = self.0.take()
        {
            let core = redis.core.clone();
            core.spawn(async move {
                let now = redis.core.script_now(time::now());
                let call = Call::cancel(redis.key, redis.core.slack_ms, now, &grant);
                let _ = redis.core.run(call).await;
            });
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Reservation<K> {
    fn now(a: Admission<K>) -> Self {
        Self {
            inner: ReservationInner::Now(Some(a)),
        }
    }

    /// When the call may go.
    pub fn ready_at(&self) -> Instant {
        match &self.inner {
            ReservationInner::Now(_) => time::now(),
            ReservationInner::Redis { at, .. } => *at,
            ReservationInner::Local(r) => r.ready_at(),
        }
    }

    /// Whether the call may go at once.
    pub fn is_ready(&self) -> bool {
        self.ready_at() <= time::now()
    }

    /// Waits for the slot. Dropping the future cancels the reservation.
    pub async fn ready(self) -> Admission<K> {
        match self.inner {
            ReservationInner::Now(mut a) => a.take().unwrap_or_else(Admission::free),
            ReservationInner::Redis { at, mut pending } => {
                tokio::time::sleep_until(at).await;
                pending.0.take().unwrap_or_else(Admission::free)
            }
            ReservationInner::Local(r) => Admission {
                inner: AdmissionInner::Local(r.ready().await),
            },
        }
    }

    /// Gives the slot back now and waits for Redis to confirm; returns
    /// whether it was given back (false when a later call was booked after
    /// it: the slot then stays consumed, capacity lost, never a burst). A
    /// reservation of the local fallback is given back as when dropped (and
    /// this returns true).
    pub async fn cancel(self) -> bool {
        match self.inner {
            ReservationInner::Now(_) => false,
            ReservationInner::Local(r) => {
                drop(r);
                true
            }
            ReservationInner::Redis { mut pending, .. } => {
                let Some(Admission {
                    inner: AdmissionInner::Redis { redis, grant, .. },
                }) = pending.0.take()
                else {
                    return false;
                };
                let now = redis.core.script_now(time::now());
                let call = Call::cancel(redis.key, redis.core.slack_ms, now, &grant);
                matches!(redis.core.run(call).await.as_deref(), Ok([1, _] | [_, 1]))
            }
        }
    }

    /// The admission of a reservation made with no wait (its slot is now).
    async fn into_admission(self) -> Admission<K> {
        match self.inner {
            ReservationInner::Now(mut a) => a.take().unwrap_or_else(Admission::free),
            ReservationInner::Redis { mut pending, .. } => {
                pending.0.take().unwrap_or_else(Admission::free)
            }
            ReservationInner::Local(r) => Admission {
                inner: AdmissionInner::Local(r.ready().await),
            },
        }
    }
}

/// An admitted call: tell the limiter what it really used, or that the
/// upstream throttled it. Dropping it keeps the estimate.
#[derive(Debug)]
pub struct Admission<K = ()>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    inner: AdmissionInner<K>,
}

#[derive(Debug)]
enum AdmissionInner<K: Hash + Eq + Clone + Send + Sync + 'static> {
    Free,
    Redis {
        redis: RedisCall,
        grant: Grant,
        tokens: u32,
    },
    Leased {
        lease: Arc<LeaseCell>,
        generation: u64,
        tokens: u32,
        redis: RedisCall,
    },
    Local(rate_limit::Admission<K>),
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Admission<K> {
    fn free() -> Self {
        Self {
            inner: AdmissionInner::Free,
        }
    }

    /// Whether Redis decided this call (not a lease, not the fallback).
    pub fn is_from_redis(&self) -> bool {
        matches!(self.inner, AdmissionInner::Redis { .. })
    }

    /// Whether the call was admitted from a local lease.
    pub fn is_leased(&self) -> bool {
        matches!(self.inner, AdmissionInner::Leased { .. })
    }

    /// Whether the local fallback admitted the call (Redis was down).
    pub fn is_fallback(&self) -> bool {
        matches!(self.inner, AdmissionInner::Local(_))
    }

    /// Reconciles the token estimate with the `tokens` the call really
    /// used: refunds the difference or charges the overrun, in Redis (or
    /// in the lease or local limiter the call came from).
    pub async fn reconcile(self, tokens: u32) {
        self.reconcile_at(tokens, time::now()).await;
    }

    /// [`Admission::reconcile`] as of `now` (with [`Clock::Local`]).
    pub async fn reconcile_at(self, tokens: u32, now: Instant) {
        match self.inner {
            AdmissionInner::Free => {}
            AdmissionInner::Local(a) => a.reconcile(tokens),
            AdmissionInner::Leased {
                lease,
                generation,
                tokens: est,
                redis,
            } => {
                let ln = redis.core.nanos(now);
                let over = {
                    let mut l = lease.lock();
                    if tokens < est {
                        l.give_back_tokens(generation, est - tokens, ln);
                        0
                    } else {
                        let over = tokens - est;
                        over - l.take_tokens(generation, over, ln)
                    }
                };
                if over > 0 && redis.t.interval > 0 {
                    let more = redis.t.interval.saturating_mul(u64::from(over));
                    let n = redis.core.script_now(now);
                    let call = Call::reconcile(redis.key, n, redis.core.slack_ms, None, (0, more));
                    let _ = redis.core.run(call).await;
                }
            }
            AdmissionInner::Redis {
                redis,
                grant,
                tokens: est,
            } => {
                let Some(tok) = grant.tok else { return };
                if tokens == est {
                    return;
                }
                let (refund, more) = if tokens < est {
                    let amount = redis.t.interval.saturating_mul(u64::from(est - tokens));
                    let r = Refund {
                        after: tok.after,
                        charge: tok.charge,
                        amount,
                    };
                    (Some((grant.epoch, Refund::default(), r)), 0)
                } else {
                    (
                        None,
                        redis.t.interval.saturating_mul(u64::from(tokens - est)),
                    )
                };
                let n = redis.core.script_now(now);
                let call = Call::reconcile(redis.key, n, redis.core.slack_ms, refund, (0, more));
                let res = redis.core.run(call).await;
                tracing::trace!(
                    estimated = est,
                    actual = tokens,
                    ok = res.is_ok(),
                    "token reservation reconciled in redis"
                );
            }
        }
    }

    /// Reports an upstream throttle of this call: the key is paused in
    /// Redis for every replica (see
    /// [`feedback`](RedisLimiterBuilder::feedback)), or in the local
    /// fallback limiter if that admitted the call. Returns whether the key
    /// was paused (false for [`ThrottleCause::Local`], and when the key was
    /// paused after this call was admitted).
    pub async fn throttled(self, cause: ThrottleCause) -> bool {
        if cause == ThrottleCause::Local {
            return false;
        }
        let (redis, epoch, slot) = match self.inner {
            AdmissionInner::Free => return false,
            AdmissionInner::Local(a) => return a.throttled(cause),
            AdmissionInner::Redis { redis, grant, .. } => (redis, grant.epoch, grant.slot),
            AdmissionInner::Leased { redis, lease, .. } => {
                let l = lease.lock();
                match l.granted_at() {
                    Some((e, s)) => {
                        drop(l);
                        (redis, e, s)
                    }
                    None => return false,
                }
            }
        };
        let Some(pause) = redis.core.feedback else {
            return false;
        };
        let n = redis.core.script_now(time::now());
        let call = Call::pause(
            redis.key,
            n,
            redis.core.slack_ms,
            epoch,
            slot,
            pause,
            redis.r,
            redis.t,
        );
        let paused = matches!(redis.core.run(call).await.as_deref(), Ok([1, ..]));
        if paused {
            tracing::warn!(
                ?cause,
                pause_ms = Duration::from_nanos(pause).as_millis() as u64,
                "upstream throttled a call the distributed limit admitted; pausing the key"
            );
        }
        paused
    }

    /// Runs [`Admission::reconcile`] and/or [`Admission::throttled`] in the
    /// background (from a response body's end).
    pub(crate) fn finish(self, throttled: Option<ThrottleCause>, tokens: Option<u32>) {
        let core = match &self.inner {
            AdmissionInner::Free => return,
            AdmissionInner::Redis { redis, .. } | AdmissionInner::Leased { redis, .. } => {
                Some(redis.core.clone())
            }
            AdmissionInner::Local(_) => None,
        };
        let throttled = throttled.filter(|c| *c != ThrottleCause::Local);
        match core {
            // Local admissions act synchronously: feedback first (it
            // consumes the admission), else reconciliation.
            None => match (self.inner, throttled, tokens) {
                (AdmissionInner::Local(a), Some(c), _) => {
                    a.throttled(c);
                }
                (AdmissionInner::Local(a), None, Some(t)) => a.reconcile(t),
                _ => {}
            },
            Some(core) => {
                let twin = throttled.and_then(|_| self.twin());
                core.spawn(async move {
                    if let (Some(c), Some(t)) = (throttled, twin) {
                        t.throttled(c).await;
                    }
                    if let Some(t) = tokens {
                        self.reconcile(t).await;
                    }
                });
            }
        }
    }

    /// A copy able to report feedback (Redis and lease admissions).
    fn twin(&self) -> Option<Admission<K>> {
        let copy = |r: &RedisCall| RedisCall {
            core: r.core.clone(),
            key: r.key.clone(),
            r: r.r,
            t: r.t,
        };
        let inner = match &self.inner {
            AdmissionInner::Redis { redis, grant, .. } => AdmissionInner::Redis {
                redis: copy(redis),
                grant: *grant,
                tokens: 0,
            },
            AdmissionInner::Leased {
                lease,
                generation,
                redis,
                ..
            } => AdmissionInner::Leased {
                lease: lease.clone(),
                generation: *generation,
                tokens: 0,
                redis: copy(redis),
            },
            _ => return None,
        };
        Some(Admission { inner })
    }
}
