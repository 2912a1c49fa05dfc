//! The distributed limiter: decisions in Redis (batched), the failure
//! policy, leases, and the backend's tickets and permits.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ::redis::RedisError;
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::BoxError;
use crate::classify::ThrottleCause;
use crate::key::StoreKey;
use crate::key::store::Store;
use crate::rate_limit::bucket::{FULL_RATE, Gcra};
use crate::rate_limit::error::{Dimension, RateLimited};
use crate::rate_limit::sealed::Keys;
use crate::rate_limit::{
    Admission, Backend, Cost, Decision, LimiterStore, Limits, MemoryPermit, MemoryTicket, Permit,
    Quota, RateLimiter, RateLimiterBuilder, Reservation, Snapshot, Ticket,
};
use crate::rate_limit::{dim_state, judge_throttle};
use crate::time::{self, Instant, duration_nanos};

use super::batch::{Background, Batcher, Counters, Exec, Failure};
use super::error::StoreUnavailable;
use super::fallback::{Health, scale};
use super::lease::{Lease, LeaseCell, Renewal};
use super::script::{Booked, DimArgs, Grant, Now, Op, Refund};
use super::store::RedisStore;

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
    /// [`expiry_slack`](crate::rate_limit::RateLimiterBuilder::expiry_slack).
    Local(Instant),
}

impl<K> LimiterStore<K> for RedisStore
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Limiter = RedisLimiter<K>;

    fn build_limiter(b: RateLimiterBuilder<Self>, keys: Keys<K>) -> RedisLimiter<K> {
        let limits_for: LimitsFor<K> = match keys {
            Keys::One | Keys::Same => {
                let limits = b.limits;
                Arc::new(move |_: &K| limits)
            }
            Keys::Each(f) => f,
        };
        let store = b.store;
        // The fail-open fallback: in memory, the builder's shared settings.
        let fallback = store.policy.replicas().map(|n| {
            let f = limits_for.clone();
            RateLimiter::builder(Limits::UNLIMITED)
                .feedback(b.feedback)
                .max_keys(b.max_keys)
                .sweep_every(b.sweep_every)
                .build_keyed_with(move |k: &K| scale(f(k), n.get()))
        });
        let exec = Arc::new(Exec {
            conn: store.conn,
            timeout: store.timeout,
            origin: time::now(),
            slack_ms: u64::try_from(store.expiry_slack.as_millis()).unwrap_or(u64::MAX),
            health: Health::new(duration_nanos(store.probe_every)),
            policy: store.policy,
            counters: Counters::default(),
            background: Background::default(),
        });
        RedisLimiter {
            shared: Arc::new(Shared {
                core: Arc::new(Core {
                    batcher: Batcher::new(exec),
                    clock: store.clock,
                    feedback: b.feedback.map(|f| duration_nanos(f.pause)),
                    repeat_within: b.feedback.map_or(0, |f| duration_nanos(f.repeat_within)),
                    leases: store.lease.is_some(),
                }),
                prefix: store
                    .prefix
                    .unwrap_or_else(|| super::store::LIMITER_PREFIX.to_owned()),
                limits_for,
                fallback,
                lease: store.lease,
                local: Store::new(b.max_keys, duration_nanos(b.sweep_every), "redis limiter"),
            }),
        }
    }
}

/// How many renewals in flight a call waits for before it books alone.
const LEASE_WAITS: usize = 4;

type LimitsFor<K> = Arc<dyn Fn(&K) -> Limits + Send + Sync>;

/// What every Redis operation needs; not generic, shared by permits.
#[derive(Debug)]
struct Core {
    batcher: Batcher,
    clock: Clock,
    feedback: Option<u64>,
    /// [`Feedback::repeat_within`](crate::rate_limit::Feedback::repeat_within)
    /// in nanoseconds: a quota throttle with none other acted on by this
    /// replica within it before is lone, and pauses nothing.
    repeat_within: u64,
    /// Whether request buckets are refunded (leases are on): a give-back
    /// of a request grant then keeps what may lie beyond it.
    leases: bool,
}

impl Core {
    fn exec(&self) -> &Exec {
        self.batcher.exec()
    }

    fn nanos(&self, t: Instant) -> u64 {
        self.exec().nanos(t)
    }

    /// The script's "now" for a decision at local instant `t`.
    fn script_now(&self, t: Instant) -> Now {
        match self.clock {
            Clock::Server => Now::Server,
            Clock::Local(origin) => Now::Local(duration_nanos(t.saturating_duration_since(origin))),
        }
    }

    fn unavailable(&self, now: u64, failure: Option<&Failure>) -> StoreUnavailable {
        let exec = self.exec();
        exec.counters.closed.fetch_add(1, Ordering::Relaxed);
        let after = exec.health.retry_after(now);
        match failure {
            None => StoreUnavailable::down(after),
            Some(Failure::Timeout) => StoreUnavailable::timeout(after),
            Some(Failure::Redis(_)) => StoreUnavailable::error(after),
        }
    }
}

/// This replica's state of one key: its Redis name, its buckets as of the
/// last round trip (for snapshots), and its lease.
struct Local {
    name: Arc<str>,
    /// Request and token TATs, in nanoseconds since the limiter's origin,
    /// as the last answer for the key said.
    view: [AtomicU64; 2],
    lease: Option<Arc<LeaseCell>>,
    /// When this replica last acted on an upstream throttle of the key
    /// (local ns + 1; 0: never). Shared with the key's permits.
    throttled: Arc<AtomicU64>,
}

impl Local {
    fn is_idle(self: &Arc<Self>, now: u64) -> bool {
        Arc::strong_count(self) == 1
            && self.view.iter().all(|t| t.load(Ordering::Relaxed) <= now)
            && self
                .lease
                .as_ref()
                .is_none_or(|l| Arc::strong_count(l) == 1 && l.lock().is_idle(now))
    }

    /// Notes the debts an answer reported, `at` (local ns) being when it
    /// arrived.
    fn saw(&self, at: u64, (dr, dt): (u64, u64)) {
        self.view[0].store(at.saturating_add(dr), Ordering::Relaxed);
        self.view[1].store(at.saturating_add(dt), Ordering::Relaxed);
    }
}

struct Shared<K> {
    core: Arc<Core>,
    prefix: String,
    limits_for: LimitsFor<K>,
    fallback: Option<RateLimiter<K>>,
    lease: Option<Lease>,
    local: Store<K, Arc<Local>>,
}

/// The Redis backend: a GCRA rate limiter for requests and tokens whose
/// state lives in Redis, so that every replica sharing the Redis (and the
/// key prefix) shares one budget per key. Shared by every clone (an `Arc`
/// inside).
///
/// The decision is the in-memory [`RateLimiter`]'s, made by an atomic
/// server-side script: a weighted cost in two dimensions booked at one
/// common slot, reservations up to a maximum wait (given back when
/// cancelled), refunds and overruns when tokens are reconciled. Decisions
/// waiting at the same moment share one script call (see the
/// [module docs](super)). Idle keys expire on their own. When Redis is slow
/// or down, a [`FailurePolicy`](super::FailurePolicy) decides; with a [`Lease`], most calls are
/// decided locally.
///
/// [`RateLimitLayer`](crate::rate_limit::RateLimitLayer) drives it from a
/// tower stack, like any [`Backend`]. See the [module docs](super) for an
/// example.
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
    /// Script calls sent (a call carries a batch of decisions and other
    /// operations).
    pub round_trips: u64,
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
    let one = |q: Option<Quota>, units: u32| match q {
        None => DimArgs::default(),
        Some(q) => {
            let g = gcra(q);
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

fn gcra(q: Quota) -> Gcra {
    Gcra::new(q.interval_nanos(), q.burst().get())
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

/// A decision in flight: the round trip to Redis (or the failure policy).
pub type Pending<K> =
    std::pin::Pin<Box<dyn Future<Output = Result<RedisTicket<K>, BoxError>> + Send>>;

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
    pub async fn check(&self, key: &K, cost: Cost) -> Result<Admission<RedisPermit<K>>, BoxError> {
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
    ) -> Result<Admission<RedisPermit<K>>, BoxError> {
        let t = self.reserve_ticket(key, cost, Duration::ZERO, now).await?;
        Ok(Admission::new(t.admit()))
    }

    /// Reserves a slot for a call of `cost`, at most `max_wait` from now.
    /// Await [`Reservation::ready`] to wait for it; drop the reservation to
    /// cancel (its slot is given back in Redis, in the background, when
    /// nothing was booked after it; [`RedisLimiter::settle`] waits for
    /// that).
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
    ) -> Result<Reservation<RedisTicket<K>>, BoxError> {
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
    ) -> Result<Reservation<RedisTicket<K>>, BoxError> {
        Ok(Reservation::new(
            self.reserve_ticket(key, cost, max_wait, now).await?,
        ))
    }

    async fn reserve_ticket(
        &self,
        key: &K,
        cost: Cost,
        max_wait: Duration,
        now: Instant,
    ) -> Result<RedisTicket<K>, BoxError> {
        match self.decide(key, |_| cost, max_wait, now) {
            Decision::Admitted(p) => Ok(RedisTicket::now(p, now)),
            Decision::Booked(t) => Ok(t),
            Decision::Refused(e) => Err(e),
            Decision::Pending(p) => p.await,
        }
    }

    /// The limits of `key`.
    pub fn limits(&self, key: &K) -> Limits {
        (self.shared.limits_for)(key)
    }

    /// Whether Redis is currently considered up.
    pub fn is_available(&self) -> bool {
        !self.shared.core.exec().health.is_down()
    }

    /// The limiter's counters.
    pub fn stats(&self) -> Stats {
        let exec = self.shared.core.exec();
        let c = &exec.counters;
        Stats {
            redis: c.redis.load(Ordering::Relaxed),
            round_trips: c.calls.load(Ordering::Relaxed),
            leased: c.leased.load(Ordering::Relaxed),
            fallback: c.fallback.load(Ordering::Relaxed),
            failed_closed: c.closed.load(Ordering::Relaxed),
            errors: c.errors.load(Ordering::Relaxed),
            outages: exec.health.outages(),
            available: self.is_available(),
        }
    }

    /// Pings Redis now (with the timeout) and updates the up/down state;
    /// returns whether Redis answered. Calls do this on their own every
    /// [`probe_every`](RateLimiterBuilder::probe_every) while Redis is
    /// down; this is for health checks and tests.
    pub async fn probe(&self) -> bool {
        let exec = self.shared.core.exec();
        let mut conn = exec.conn.clone();
        let ping = ::redis::cmd("PING");
        let res = match exec.timeout {
            Some(d) => tokio::time::timeout(d, ping.query_async::<String>(&mut conn))
                .await
                .map_err(|_| Failure::Timeout)
                .and_then(|r| r.map_err(Failure::Redis)),
            None => ping
                .query_async::<String>(&mut conn)
                .await
                .map_err(Failure::Redis),
        };
        let now = exec.nanos(time::now());
        match res {
            Ok(_) => {
                exec.health.up(now);
                true
            }
            Err(e) => {
                exec.health.down(now, &e, exec.policy);
                false
            }
        }
    }

    /// Waits until the background Redis operations queued so far
    /// (give-backs of cancelled reservations, reconciliations and pauses
    /// sent from response bodies) have completed or timed out. For tests
    /// and graceful shutdown.
    pub async fn settle(&self) {
        self.shared.core.exec().background.settle().await;
    }

    fn redis_key(&self, key: &K) -> Arc<str> {
        let mut s = String::with_capacity(self.shared.prefix.len() + 24);
        s.push_str(&self.shared.prefix);
        key.write_key(&mut s);
        Arc::from(s)
    }

    /// `key`'s local state, created if new; `None` when the store is full
    /// of busy keys (that key then goes without a view or a lease).
    fn local(&self, key: &K, now: u64) -> Option<Arc<Local>> {
        let sh = &*self.shared;
        sh.local
            .get_or_insert_with(
                key,
                now,
                || {
                    Arc::new(Local {
                        name: self.redis_key(key),
                        view: [AtomicU64::new(0), AtomicU64::new(0)],
                        lease: sh.lease.map(|_| Arc::new(LeaseCell::default())),
                        throttled: Arc::default(),
                    })
                },
                |l| l.is_idle(now),
            )
            .map(|l| l.clone())
    }

    /// Admits `cost` from `key`'s local lease, if it covers it (no round
    /// trip). `None` when leases are off or the slice does not cover it.
    fn try_lease(
        &self,
        local: &Arc<Local>,
        limits: &Limits,
        cost: Cost,
        now: u64,
    ) -> Option<RedisPermit<K>> {
        let cell = local.lease.as_ref()?;
        let generation = cell.lock().take(cost, now)?;
        let core = &self.shared.core;
        core.exec().counters.leased.fetch_add(1, Ordering::Relaxed);
        let (r, t) = dims(limits, cost);
        Some(RedisPermit {
            inner: PermitInner::Leased {
                lease: cell.clone(),
                generation,
                tokens: cost.tokens,
                redis: RedisCall {
                    core: core.clone(),
                    key: local.name.clone(),
                    r,
                    t,
                    throttled: Some(local.throttled.clone()),
                    admitted: now,
                },
            },
        })
    }

    /// The round trip: books the call in Redis (with a lease slice when
    /// leases are on), or lets the failure policy decide.
    async fn book(
        &self,
        key: K,
        local: Option<Arc<Local>>,
        limits: Limits,
        cost: Cost,
        max_wait: u64,
        at: Instant,
    ) -> Result<RedisTicket<K>, BoxError> {
        let core = &self.shared.core;
        let exec = core.exec();
        let ln = exec.nanos(at);
        if !exec.health.should_try(ln) {
            return self.fail(&key, cost, max_wait, at, None);
        }
        let (r, t) = dims(&limits, cost);
        let name = match &local {
            Some(l) => l.name.clone(),
            None => self.redis_key(&key),
        };
        let now = core.script_now(at);
        // With leases on, ask for a slice too. One renewal per key at a
        // time: a call that finds one in flight waits for it and tries its
        // slice (a few times: many callers may be waiting), then books
        // alone.
        let mut lease = None;
        if let (Some(l), Some(cell)) = (
            self.shared.lease,
            local.as_ref().and_then(|x| x.lease.clone()),
        ) {
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
                        if let Some(p) = local
                            .as_ref()
                            .and_then(|x| self.try_lease(x, &limits, cost, ln))
                        {
                            return Ok(RedisTicket::now(p, at));
                        }
                    }
                    None => {}
                }
            }
        }
        let (op, slice) = match &lease {
            Some((l, _, refund)) => {
                let slice = effective(&limits, l.slice());
                let (sr, st) = dims(&limits, slice);
                let op = Op::lease(
                    name.clone(),
                    now,
                    r,
                    t,
                    max_wait,
                    (sr.charge, st.charge),
                    *refund,
                );
                (op, Some((slice, sr.charge, st.charge)))
            }
            None => (Op::book(name.clone(), now, r, t, max_wait), None),
        };
        let reply = core.batcher.call(op).await;
        let booked = reply.and_then(|v| {
            let lc = slice.map_or((0, 0), |(_, a, b)| (a, b));
            super::script::parse_booked(&v, r, t, lc).map_err(Failure::Redis)
        });
        let booked = match booked {
            Ok(b) => b,
            Err(e) => {
                drop(lease);
                return self.fail(&key, cost, max_wait, at, Some(&e));
            }
        };
        exec.counters.redis.fetch_add(1, Ordering::Relaxed);
        // A wait from Redis's clock counts from when the answer arrived.
        let base = match core.clock {
            Clock::Server => time::now(),
            Clock::Local(_) => at,
        };
        match booked {
            Booked::Refused {
                wait,
                tokens,
                debts,
            } => {
                drop(lease);
                if let Some(l) = &local {
                    l.saw(exec.nanos(base), debts);
                }
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
                debts,
            } => {
                if let Some(l) = &local {
                    l.saw(exec.nanos(base), debts);
                }
                if let (Some((l, renewal, _)), Some((slice, _, _))) = (&mut lease, slice)
                    && leased
                {
                    let (ir, it) = (r.interval.max(1), t.interval.max(1));
                    let expires = exec.nanos(base).saturating_add(duration_nanos(l.ttl()));
                    renewal.granted((slice, expires, grant, ir, it));
                }
                drop(lease);
                let permit = RedisPermit {
                    inner: PermitInner::Redis {
                        redis: RedisCall {
                            core: core.clone(),
                            key: name,
                            r,
                            t,
                            throttled: local.as_ref().map(|l| l.throttled.clone()),
                            admitted: exec.nanos(base).saturating_add(wait),
                        },
                        grant,
                        tokens: cost.tokens,
                    },
                };
                Ok(RedisTicket {
                    inner: TicketInner::Redis {
                        at: base + Duration::from_nanos(wait),
                        pending: Some(permit),
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
    ) -> Result<RedisTicket<K>, BoxError> {
        let core = &self.shared.core;
        match &self.shared.fallback {
            Some(local) => {
                core.exec()
                    .counters
                    .fallback
                    .fetch_add(1, Ordering::Relaxed);
                match local.decide(key, |_| cost, Duration::from_nanos(max_wait), at) {
                    Decision::Admitted(p) => Ok(RedisTicket::now(
                        RedisPermit {
                            inner: PermitInner::Local(p),
                        },
                        at,
                    )),
                    Decision::Booked(t) => Ok(RedisTicket {
                        inner: TicketInner::Local(t),
                    }),
                    Decision::Refused(e) => Err(e),
                }
            }
            None => Err(core.unavailable(core.nanos(at), failure).into()),
        }
    }

    /// What `key`'s quotas look like, as this replica last saw them in
    /// Redis (exact as of its last round trip for the key; other replicas'
    /// calls since then are not seen), or in the local fallback while Redis
    /// is down. `None` for a key this replica has no state for.
    pub fn snapshot(&self, key: &K) -> Option<Snapshot> {
        let sh = &*self.shared;
        if !self.is_available()
            && let Some(f) = &sh.fallback
        {
            return f.snapshot(key);
        }
        let local = sh.local.get(key)?;
        let limits = (sh.limits_for)(key);
        let now = sh.core.nanos(time::now());
        let dim = |q: Option<Quota>, i: usize| {
            q.map(|q| {
                dim_state(
                    gcra(q),
                    local.view[i].load(Ordering::Relaxed),
                    now,
                    FULL_RATE,
                )
            })
        };
        Some(Snapshot {
            requests: dim(limits.get_requests(), 0),
            tokens: dim(limits.get_tokens(), 1),
            throttles: 0,
            last_throttle: None,
        })
    }
}

impl<K> Backend<K> for RedisLimiter<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Ticket = RedisTicket<K>;
    type Pending = Pending<K>;

    fn decide<W: FnOnce(bool) -> Cost>(
        &self,
        key: &K,
        weigh: W,
        max_wait: Duration,
        now: Instant,
    ) -> Decision<RedisTicket<K>, Pending<K>> {
        let limits = (self.shared.limits_for)(key);
        let cost = effective(&limits, weigh(limits.get_tokens().is_some()));
        if cost.requests == 0 && cost.tokens == 0 {
            return Decision::Admitted(RedisPermit::free());
        }
        let ln = self.shared.core.nanos(now);
        let local = self.local(key, ln);
        if let Some(p) = local
            .as_ref()
            .and_then(|l| self.try_lease(l, &limits, cost, ln))
        {
            return Decision::Admitted(p);
        }
        let this = self.clone();
        let key = key.clone();
        let max_wait = duration_nanos(max_wait);
        Decision::Pending(Box::pin(async move {
            this.book(key, local, limits, cost, max_wait, now).await
        }))
    }

    fn snapshot(&self, key: &K) -> Option<Snapshot> {
        RedisLimiter::snapshot(self, key)
    }
}

/// The parts of a booking needed to talk to Redis about it later.
struct RedisCall {
    core: Arc<Core>,
    key: Arc<str>,
    r: DimArgs,
    t: DimArgs,
    /// The key's [`Local::throttled`]; `None` when the local state was
    /// full (then every throttle pauses).
    throttled: Option<Arc<AtomicU64>>,
    /// When the call was admitted (local ns, its slot).
    admitted: u64,
}

impl RedisCall {
    /// Whether the feedback acts on a throttle seen at local `now`, the
    /// in-memory [`Feedback`](crate::rate_limit::Feedback) rules as this
    /// replica sees them: `None` when the call was admitted before the
    /// last throttle acted on (that one covers it), `Some(false)` for a
    /// lone quota throttle (no pause), `Some(true)` to pause.
    fn acts(&self, cause: ThrottleCause, now: u64) -> Option<bool> {
        let Some(cell) = &self.throttled else {
            return Some(true);
        };
        judge_throttle(cell, cause, self.admitted, now, self.core.repeat_within).map(|lone| !lone)
    }
}

impl fmt::Debug for RedisCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisCall")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

/// A call booked by [`RedisLimiter`]. Dropping it before its slot gives the
/// slot back in Redis (in the background) when nothing was booked after
/// it. See [`Ticket`].
#[derive(Debug)]
pub struct RedisTicket<K: Hash + Eq> {
    inner: TicketInner<K>,
}

#[derive(Debug)]
enum TicketInner<K: Hash + Eq> {
    /// Admitted when decided (a lease, the fallback, a free call).
    Now {
        at: Instant,
        permit: Option<RedisPermit<K>>,
    },
    /// Booked in Redis for `at`.
    Redis {
        at: Instant,
        pending: Option<RedisPermit<K>>,
    },
    /// Booked in the local fallback limiter.
    Local(MemoryTicket<K>),
}

impl<K: Hash + Eq> RedisTicket<K> {
    fn now(permit: RedisPermit<K>, at: Instant) -> Self {
        Self {
            inner: TicketInner::Now {
                at,
                permit: Some(permit),
            },
        }
    }
}

impl<K: Hash + Eq> Drop for RedisTicket<K> {
    fn drop(&mut self) {
        if let TicketInner::Redis { pending, .. } = &mut self.inner
            && let Some(RedisPermit {
                inner: PermitInner::Redis { redis, grant, .. },
            }) = pending.take()
        {
            let now = redis.core.script_now(time::now());
            let op = Op::cancel(redis.key, now, &grant, redis.core.leases);
            redis.core.batcher.background(op);
        }
    }
}

impl<K> Ticket for RedisTicket<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Permit = RedisPermit<K>;

    fn ready_at(&self) -> Instant {
        match &self.inner {
            TicketInner::Now { at, .. } | TicketInner::Redis { at, .. } => *at,
            TicketInner::Local(t) => t.ready_at(),
        }
    }

    fn admit(mut self) -> RedisPermit<K> {
        let inner = std::mem::replace(
            &mut self.inner,
            TicketInner::Now {
                at: time::now(),
                permit: None,
            },
        );
        match inner {
            TicketInner::Now { permit, .. }
            | TicketInner::Redis {
                pending: permit, ..
            } => permit.unwrap_or_else(RedisPermit::free),
            TicketInner::Local(t) => RedisPermit {
                inner: PermitInner::Local(t.admit()),
            },
        }
    }
}

/// A call admitted by [`RedisLimiter`]: by Redis, from a local lease, or by
/// the local fallback while Redis was down. See [`Permit`].
#[derive(Debug)]
pub struct RedisPermit<K: Hash + Eq> {
    inner: PermitInner<K>,
}

#[derive(Debug)]
enum PermitInner<K: Hash + Eq> {
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
    Local(MemoryPermit<K>),
}

impl<K: Hash + Eq> RedisPermit<K> {
    fn free() -> Self {
        Self {
            inner: PermitInner::Free,
        }
    }

    /// Whether Redis decided this call (not a lease, not the fallback).
    pub fn is_from_redis(&self) -> bool {
        matches!(self.inner, PermitInner::Redis { .. })
    }

    /// Whether the call was admitted from a local lease.
    pub fn is_leased(&self) -> bool {
        matches!(self.inner, PermitInner::Leased { .. })
    }

    /// Whether the local fallback admitted the call (Redis was down).
    pub fn is_fallback(&self) -> bool {
        matches!(self.inner, PermitInner::Local(_))
    }
}

impl<K> Permit for RedisPermit<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    fn tokens(&self) -> u32 {
        match &self.inner {
            PermitInner::Free => 0,
            PermitInner::Redis { tokens, .. } | PermitInner::Leased { tokens, .. } => *tokens,
            PermitInner::Local(p) => p.tokens(),
        }
    }

    fn wants_feedback(&self) -> bool {
        match &self.inner {
            PermitInner::Free => false,
            PermitInner::Redis { redis, .. } | PermitInner::Leased { redis, .. } => {
                redis.core.feedback.is_some()
            }
            PermitInner::Local(p) => p.wants_feedback(),
        }
    }

    /// Feedback pauses the key in Redis for every replica, except on a lone
    /// quota throttle (see
    /// [`Feedback`](crate::rate_limit::Feedback)); the reconciliation
    /// refunds or charges in Redis, or in the lease the call came from. Both
    /// run in the background, in this order.
    fn finish(self, throttled: Option<ThrottleCause>, tokens: Option<u32>) {
        let now = time::now();
        let (redis, slot, est) = match self.inner {
            PermitInner::Free => return,
            PermitInner::Local(p) => return p.finish(throttled, tokens),
            PermitInner::Redis {
                redis,
                grant,
                tokens: est,
            } => {
                let n = redis.core.script_now(now);
                if let Some(actual) = tokens
                    && actual != est
                    && let Some(tok) = grant.tok
                {
                    let (refund, more) = if actual < est {
                        let amount = redis.t.interval.saturating_mul(u64::from(est - actual));
                        let r = Refund::of(grant.slot, &tok, amount);
                        (Some((grant.epoch, Refund::default(), r)), 0)
                    } else {
                        (
                            None,
                            redis.t.interval.saturating_mul(u64::from(actual - est)),
                        )
                    };
                    tracing::trace!(
                        estimated = est,
                        actual,
                        "token reservation reconciled in redis"
                    );
                    // Feedback first: a pause is judged against the slot.
                    if let Some(cause) = throttled {
                        pause(&redis, (grant.epoch, grant.slot), cause, n, now);
                    }
                    let op = Op::reconcile(redis.key.clone(), n, refund, (0, more));
                    redis.core.batcher.background(op);
                    return;
                }
                (redis, Some((grant.epoch, grant.slot)), None)
            }
            PermitInner::Leased {
                lease,
                generation,
                tokens: est,
                redis,
            } => {
                let ln = redis.core.nanos(now);
                let over = match tokens {
                    Some(actual) => {
                        let mut l = lease.lock();
                        if actual < est {
                            l.give_back_tokens(generation, est - actual, ln);
                            0
                        } else {
                            let over = actual - est;
                            over - l.take_tokens(generation, over, ln)
                        }
                    }
                    None => 0,
                };
                let slot = lease.lock().granted_at();
                let more = (over > 0 && redis.t.interval > 0)
                    .then(|| redis.t.interval.saturating_mul(u64::from(over)));
                (redis, slot, more)
            }
        };
        let n = redis.core.script_now(now);
        if let (Some(cause), Some(slot)) = (throttled, slot) {
            pause(&redis, slot, cause, n, now);
        }
        if let Some(more) = est {
            let op = Op::reconcile(redis.key.clone(), n, None, (0, more));
            redis.core.batcher.background(op);
        }
    }
}

/// Queues the pause of a key after an upstream throttle of a call admitted
/// at `slot`, unless the throttle is lone (see [`RedisCall::acts`]).
fn pause(redis: &RedisCall, slot: (i64, i64), cause: ThrottleCause, now: Now, at: Instant) {
    let Some(pause) = redis.core.feedback else {
        return;
    };
    match redis.acts(cause, redis.core.nanos(at)) {
        None => return,
        Some(false) => {
            tracing::info!(
                ?cause,
                "upstream throttled a call the distributed limit admitted, the first within the \
                 repeat window: no pause"
            );
            return;
        }
        Some(true) => {}
    }
    tracing::warn!(
        ?cause,
        pause_ms = Duration::from_nanos(pause).as_millis() as u64,
        "upstream throttled a call the distributed limit admitted; pausing the key"
    );
    let op = Op::pause(redis.key.clone(), now, slot, pause, redis.r, redis.t);
    redis.core.batcher.background(op);
}
