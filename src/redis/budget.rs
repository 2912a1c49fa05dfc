//! Token budgets per UTC day and month in Redis: the counters of
//! [`Budget`](crate::rate_limit::Budget), shared by replicas and kept
//! across restarts.
//!
//! Each window of each key is one Redis counter,
//! `{prefix}{key}:{day|month}:{window}` (e.g.
//! `tower-qwen:budget:alice:day:2026-03-31`), expiring a day after its
//! window ends. A call's estimate is checked against every window and
//! charged with `INCRBY` in one script (atomic: two replicas cannot both
//! take the last tokens); at the body's end the difference to the real
//! usage is applied with `INCRBY` in the background.
//!
//! When Redis cannot answer, the [`FailurePolicy`] decides: fail open
//! counts locally at `1/replicas` of each budget (in memory, from zero:
//! what was spent in Redis is not known), fail closed refuses with
//! [`StoreUnavailable`]. Reconciliations are skipped while Redis is down
//! (the estimates stand).

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::num::NonZeroU64;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::ConnectionManager;

use crate::BoxError;
use crate::classify::ThrottleCause;
use crate::key::StoreKey;
use crate::rate_limit::error::BudgetExceeded;
use crate::rate_limit::sealed::BudgetLimitsFor;
use crate::rate_limit::{
    Backend, Budget, BudgetBuilder, BudgetLimits, BudgetPermit, BudgetStore, BudgetTicket, Cost,
    Decision, Period, Permit, Snapshot, WallClock, Window, windows,
};
use crate::time::{self, Instant, duration_nanos};

use super::batch::{Background, Failure};
use super::error::StoreUnavailable;
use super::fallback::{FailurePolicy, Health};
use super::store::RedisStore;

/// How long a window's counter outlives the window (late reconciliations
/// still find it).
const KEEP_AFTER: u64 = 86_400;

/// Checks every window (KEYS) for room for ARGV[1] tokens (ARGV[1 + i]: the
/// budget of KEYS[i]), then charges them all, each counter expiring after
/// ARGV[1 + #KEYS + i] seconds. Returns {1, used...} when charged, or
/// {0, used...} (nothing charged) when some window has no room.
const CHARGE: &str = r"
local cost = tonumber(ARGV[1])
local n = #KEYS
local used = {}
local room = 1
for i = 1, n do
  used[i] = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used[i] + cost > tonumber(ARGV[1 + i]) then room = 0 end
end
if room == 1 then
  for i = 1, n do
    used[i] = redis.call('INCRBY', KEYS[i], cost)
    redis.call('EXPIRE', KEYS[i], ARGV[1 + n + i])
  end
end
local out = {room}
for i = 1, n do out[i + 1] = used[i] end
return out
";

static SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(CHARGE));

/// Adds ARGV[1] (a reconciliation: negative gives back) to every counter
/// (KEYS), never below 0 (a counter Redis lost is not turned into extra
/// budget), each then expiring after ARGV[1 + i] seconds.
const ADJUST: &str = r"
for i = 1, #KEYS do
  if redis.call('INCRBY', KEYS[i], ARGV[1]) < 0 then
    redis.call('SET', KEYS[i], 0)
  end
  redis.call('EXPIRE', KEYS[i], ARGV[1 + i])
end
return 0
";

static ADJUST_SCRIPT: LazyLock<::redis::Script> = LazyLock::new(|| ::redis::Script::new(ADJUST));

impl<K> BudgetStore<K> for RedisStore
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Budget = RedisBudget<K>;

    fn build_budget(b: BudgetBuilder<Self>, limits_for: BudgetLimitsFor<K>) -> RedisBudget<K> {
        let clock = b.clock.unwrap_or_else(WallClock::system);
        let store = b.store;
        // The local view and the fail-open counts: in memory, the
        // builder's shared settings.
        let local = Budget::builder().clock(clock).max_keys(b.max_keys);
        let view = local.build_with({
            let l = limits_for.clone();
            move |k: &K| l(k)
        });
        let n = store.policy.replicas().map_or(1, |n| n.get());
        let fallback = local.build_with({
            let l = limits_for.clone();
            move |k: &K| shared_by(l(k), n)
        });
        RedisBudget {
            shared: Arc::new(Shared {
                conn: store.conn,
                prefix: store
                    .prefix
                    .unwrap_or_else(|| super::store::BUDGET_PREFIX.to_owned()),
                timeout: store.timeout,
                policy: store.policy,
                health: Health::new(duration_nanos(store.probe_every)),
                origin: time::now(),
                clock,
                limits_for,
                view,
                fallback,
                background: Background::default(),
            }),
        }
    }
}

/// `limits` shared by `n` replicas (each budget divided by `n`, at least 1).
fn shared_by(limits: BudgetLimits, n: u32) -> BudgetLimits {
    let mut out = BudgetLimits::NONE;
    let part =
        |l: NonZeroU64| NonZeroU64::new(l.get() / u64::from(n.max(1))).unwrap_or(NonZeroU64::MIN);
    if let Some(d) = limits.get(Period::Day) {
        out = out.and_per_day(part(d));
    }
    if let Some(m) = limits.get(Period::Month) {
        out = out.and_per_month(part(m));
    }
    out
}

struct Shared<K> {
    conn: ConnectionManager,
    prefix: String,
    timeout: Option<Duration>,
    policy: FailurePolicy,
    health: Health,
    origin: Instant,
    clock: WallClock,
    limits_for: BudgetLimitsFor<K>,
    /// What Redis said each key spent, as of its last round trip here.
    view: Budget<K>,
    /// The fail-open counts.
    fallback: Budget<K>,
    background: Background,
}

/// Token budgets per UTC day and month in Redis: a
/// [`Backend`] for [`RateLimit`](crate::rate_limit::RateLimit), the
/// counters of [`Budget`] shared by every replica on the Redis and kept
/// across restarts (see the [budget docs](crate::rate_limit::budget) for
/// an example: this backend is used the same way).
///
/// Each window of each key is one Redis counter,
/// `{prefix}{key}:{day|month}:{window}` (e.g.
/// `tower-qwen:budget:alice:day:2026-03-31`), expiring a day after its
/// window ends. A call's estimate is checked against every window and
/// charged with `INCRBY` in one script (atomic: two replicas cannot both
/// take the last tokens); when the body ends, the difference to the real
/// usage is applied with `INCRBY` in the background ([`RedisBudget::settle`]
/// waits for it).
///
/// The counters must not be evicted: run Redis with `maxmemory-policy
/// noeviction` (or enough memory; they carry an expiry, so `volatile-*`
/// policies may evict them as well as `allkeys-*`), or an evicted counter
/// restarts its window's budget. A reconciliation never takes a counter
/// below 0.
///
/// When Redis cannot answer, the [`FailurePolicy`] decides: fail open
/// counts locally at `1/replicas` of each budget (in memory, from zero:
/// what was spent in Redis is not known here), fail closed refuses with
/// [`StoreUnavailable`]. Reconciliations are skipped while Redis is down
/// (the estimates stand).
///
/// # Clone
///
/// Clones share the connection and the local state.
pub struct RedisBudget<K = ()> {
    shared: Arc<Shared<K>>,
}

impl<K> Clone for RedisBudget<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K> fmt::Debug for RedisBudget<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBudget")
            .field("prefix", &self.shared.prefix)
            .field("policy", &self.shared.policy)
            .field("down", &self.shared.health.is_down())
            .finish_non_exhaustive()
    }
}

impl<K> RedisBudget<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    /// The Redis key of `key`'s counter in window `w`.
    fn counter(&self, key: &K, w: &Window) -> String {
        let mut s = self.shared.prefix.clone();
        key.write_key(&mut s);
        s.push(':');
        s.push_str(w.period.as_str());
        s.push(':');
        s.push_str(&w.label());
        s
    }

    fn nanos(&self, t: Instant) -> u64 {
        duration_nanos(t.saturating_duration_since(self.shared.origin))
    }

    /// Runs `f` within the timeout, keeping the health state.
    async fn call<T, F>(&self, f: F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, ::redis::RedisError>>,
    {
        let res = match self.shared.timeout {
            Some(d) => match tokio::time::timeout(d, f).await {
                Ok(r) => r.map_err(Failure::Redis),
                Err(_) => Err(Failure::Timeout),
            },
            None => f.await.map_err(Failure::Redis),
        };
        let now = self.nanos(time::now());
        match &res {
            Ok(_) => {
                self.shared.health.up(now);
            }
            Err(e) if e.is_store_failure() => {
                self.shared.health.down(now, e, self.shared.policy);
            }
            Err(_) => {}
        }
        res
    }

    /// Pings Redis; true when it answered.
    pub async fn probe(&self) -> bool {
        let mut conn = self.shared.conn.clone();
        self.call(async move { ::redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .is_ok()
    }

    /// Waits until the reconciliations sent so far have completed or
    /// timed out. For tests and graceful shutdown.
    pub async fn settle(&self) {
        self.shared.background.settle().await;
    }

    /// Whether Redis answered the last call.
    pub fn is_available(&self) -> bool {
        !self.shared.health.is_down()
    }

    /// `key`'s budget as of this process's last round trip for it (or its
    /// fail-open counts while Redis is down).
    pub fn snapshot(&self, key: &K) -> Option<Snapshot> {
        self.local_view().snapshot(key)
    }

    /// `key`'s window with the least room left, as [`RedisBudget::snapshot`]
    /// sees it, exact.
    #[cfg(feature = "gateway")]
    pub(crate) fn tightest(&self, key: &K) -> Option<crate::rate_limit::Tightest> {
        self.local_view().tightest(key)
    }

    fn local_view(&self) -> &Budget<K> {
        if self.shared.health.is_down() {
            &self.shared.fallback
        } else {
            &self.shared.view
        }
    }

    /// The answer when Redis cannot decide: the failure policy's.
    fn unavailable(
        &self,
        key: &K,
        tokens: u32,
        now: Instant,
        timed_out: Option<bool>,
    ) -> Result<RedisBudgetPermit<K>, BoxError> {
        if self.shared.policy.is_fail_open() {
            return match self.shared.fallback.admit(key, tokens, now) {
                Ok(p) => Ok(RedisBudgetPermit::of(Kind::Local(p))),
                Err(e) => Err(Box::new(e)),
            };
        }
        let retry = self
            .shared
            .health
            .retry_after(self.nanos(now))
            .max(Duration::from_millis(1));
        Err(Box::new(match timed_out {
            Some(true) => StoreUnavailable::timeout(retry),
            Some(false) => StoreUnavailable::error(retry),
            None => StoreUnavailable::down(retry),
        }))
    }

    /// Charges `tokens` in Redis, or refuses them.
    async fn charge(
        self,
        key: K,
        limits: BudgetLimits,
        tokens: u32,
        now: Instant,
    ) -> Result<RedisBudgetPermit<K>, BoxError> {
        let at = self.shared.clock.since_epoch(now);
        let ws = windows(&limits, at.as_secs());
        let mut counters = Vec::with_capacity(2);
        let mut invocation = SCRIPT.prepare_invoke();
        invocation.arg(tokens);
        let mut ttls = Vec::with_capacity(2);
        for w in ws.iter().flatten() {
            let name = self.counter(&key, w);
            invocation.key(&name);
            counters.push((*w, name));
            invocation.arg(limits.get(w.period).map_or(u64::MAX, NonZeroU64::get));
            ttls.push(w.end.saturating_sub(at.as_secs()) + KEEP_AFTER);
        }
        for t in ttls {
            invocation.arg(t);
        }
        let mut conn = self.shared.conn.clone();
        let reply = self
            .call(async move { invocation.invoke_async::<Vec<u64>>(&mut conn).await })
            .await;
        let reply = match reply {
            Ok(r) if r.len() == counters.len() + 1 => r,
            Ok(_) => {
                return self.unavailable(&key, tokens, now, Some(false));
            }
            Err(f) => {
                tracing::debug!(error = %f, "token budget: redis did not answer");
                return self.unavailable(&key, tokens, now, Some(matches!(f, Failure::Timeout)));
            }
        };
        let mut used = [0u64; 2];
        for ((w, _), u) in counters.iter().zip(&reply[1..]) {
            used[match w.period {
                Period::Day => 0,
                Period::Month => 1,
            }] = *u;
            self.shared.view.record(&key, w, *u, at.as_secs());
        }
        if reply[0] == 1 {
            return Ok(RedisBudgetPermit::of(Kind::Redis(Charged {
                budget: self.clone(),
                counters: counters.into_iter().map(|(w, n)| (w.end, n)).collect(),
                tokens,
            })));
        }
        let refused = crate::rate_limit::refusal(&limits, &ws, used, u64::from(tokens), at)
            .unwrap_or_else(|| {
                // Redis saw no room where the local arithmetic finds some
                // (a budget changed meanwhile): refuse on the day.
                let w = ws
                    .iter()
                    .flatten()
                    .next()
                    .copied()
                    .unwrap_or(Window::at(Period::Day, at.as_secs()));
                BudgetExceeded::new(
                    w.period,
                    limits.get(w.period).map_or(0, NonZeroU64::get),
                    u64::MAX,
                    w.reset_after(at),
                )
            });
        Err(Box::new(refused))
    }

    /// Applies `delta` tokens to the counters, in the background.
    fn adjust(&self, counters: Vec<(u64, String)>, delta: i64) {
        if delta == 0 || self.shared.health.is_down() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::debug!("no tokio runtime; a token budget reconciliation is dropped");
            return;
        };
        let now = self.shared.clock.since_epoch(time::now()).as_secs();
        let mut invocation = ADJUST_SCRIPT.prepare_invoke();
        invocation.arg(delta);
        let mut any = false;
        for (end, name) in &counters {
            // A counter past its expiry is gone: nothing to correct.
            let Some(ttl) = (end + KEEP_AFTER).checked_sub(now).filter(|t| *t > 0) else {
                continue;
            };
            invocation.key(name).arg(ttl);
            any = true;
        }
        if !any {
            return;
        }
        let this = self.clone();
        this.shared.background.begin();
        rt.spawn(async move {
            let mut conn = this.shared.conn.clone();
            let res = this
                .call(async move { invocation.invoke_async::<i64>(&mut conn).await })
                .await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "token budget reconciliation failed; the estimate stands");
            }
            this.shared.background.end();
        });
    }
}

impl<K> Backend<K> for RedisBudget<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    type Ticket = BudgetTicket<RedisBudgetPermit<K>>;
    type Pending = std::pin::Pin<
        Box<dyn Future<Output = Result<BudgetTicket<RedisBudgetPermit<K>>, BoxError>> + Send>,
    >;

    fn decide<W: FnOnce(bool) -> Cost>(
        &self,
        key: &K,
        weigh: W,
        _max_wait: Duration,
        now: Instant,
    ) -> Decision<Self::Ticket, Self::Pending> {
        let limits = (self.shared.limits_for)(key);
        if limits.is_none() {
            return Decision::Admitted(RedisBudgetPermit::of(Kind::Free));
        }
        let tokens = weigh(true).tokens;
        if !self.shared.health.should_try(self.nanos(now)) {
            return match self.unavailable(key, tokens, now, None) {
                Ok(p) => Decision::Admitted(p),
                Err(e) => Decision::Refused(e),
            };
        }
        let (this, key) = (self.clone(), key.clone());
        Decision::Pending(Box::pin(async move {
            this.charge(key, limits, tokens, now)
                .await
                .map(BudgetTicket::ready)
        }))
    }

    fn snapshot(&self, key: &K) -> Option<Snapshot> {
        RedisBudget::snapshot(self, key)
    }
}

/// A call charged in Redis.
struct Charged<K> {
    budget: RedisBudget<K>,
    /// Each window's end (seconds since the epoch) and counter.
    counters: Vec<(u64, String)>,
    tokens: u32,
}

/// A call admitted by [`RedisBudget`]: [`Permit::finish`] with the real
/// usage corrects the counters it was charged to.
pub struct RedisBudgetPermit<K> {
    kind: Kind<K>,
}

enum Kind<K> {
    /// No budget for the key.
    Free,
    /// Counted locally (Redis down, failing open).
    Local(BudgetPermit<K>),
    Redis(Charged<K>),
}

impl<K> RedisBudgetPermit<K> {
    fn of(kind: Kind<K>) -> Self {
        Self { kind }
    }
}

impl<K> fmt::Debug for RedisBudgetPermit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (at, tokens) = match &self.kind {
            Kind::Free => ("free", 0),
            Kind::Local(p) => ("local", p.inner_tokens()),
            Kind::Redis(c) => ("redis", c.tokens),
        };
        f.debug_struct("RedisBudgetPermit")
            .field("at", &at)
            .field("tokens", &tokens)
            .finish()
    }
}

impl<K> Permit for RedisBudgetPermit<K>
where
    K: StoreKey + Hash + Eq + Clone + Send + Sync + 'static,
{
    fn tokens(&self) -> u32 {
        match &self.kind {
            Kind::Free => 0,
            Kind::Local(p) => p.tokens(),
            Kind::Redis(c) => c.tokens,
        }
    }

    fn wants_feedback(&self) -> bool {
        false
    }

    fn finish(self, throttled: Option<ThrottleCause>, tokens: Option<u32>) {
        match self.kind {
            Kind::Free => {}
            Kind::Local(p) => p.finish(throttled, tokens),
            Kind::Redis(c) => {
                if let Some(actual) = tokens {
                    let delta = i64::from(actual) - i64::from(c.tokens);
                    c.budget.adjust(c.counters, delta);
                }
            }
        }
    }
}
