//! The degrade state the replicas share through Redis (`[redis]`).
//!
//! Each replica's degrade breaker trips on the failures it sees. When one
//! degrades a client key, it publishes the instant its probes start as the
//! score of the key's name in one sorted set, `{key_prefix}degraded`
//! (`ZADD GT`: a later deadline wins, an earlier one never shortens it; the
//! set expires `probe_after_max` after its last write; `GT` needs Redis
//! 6.2 or later, and on an older one the writes fail). Every replica
//! reads the set back at most once per `probe_every` and applies the
//! deadlines it has not seen with
//! [`BreakerHandle::trip_key_until`]: a key degraded on one replica is
//! degraded on all of them until the same instant, then each probes on its
//! own (the first success closes that replica's circuit; a failed probe
//! degrades the key for longer and is published in turn). Recovery is not
//! published: a deadline is never withdrawn, it passes.
//!
//! Nothing here is on the request path: a request only notes that the set
//! is due for a read, and the reads and writes run in their own tasks, so
//! no timer is armed either (a paused test clock is not advanced by it) and
//! a replica without traffic does not read. When Redis fails, errors are
//! counted (`gateway_degrade_sync_errors_total`) and logged once per
//! outage, and each replica keeps its own degrade state; when Redis
//! answers again, sharing resumes with the next trip or read.
//!
//! The deadlines are milliseconds on the clock the Redis limits decide on:
//! Redis's own (`TIME`, so replicas agree whatever their clocks say), or
//! with [`Clock::Local`] the tokio clock since its origin (tests). A
//! deadline read is capped at `probe_after_max` from now, so a stray entry
//! cannot degrade a key for longer than a replica could.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ::redis::RedisError;
use ::redis::aio::ConnectionManager;

use crate::circuit_breaker::BreakerHandle;
use crate::redis::Clock;
use crate::time::{self, Instant, duration_nanos};

/// One configuration's share of the degrade state. See the
/// [module docs](self).
pub(crate) struct SharedDegrade {
    conn: ConnectionManager,
    /// `{key_prefix}degraded`.
    set: String,
    clock: Clock,
    every: u64,
    /// The longest degradation: the cap of a deadline read, and the set's
    /// expiry after a write.
    max: Duration,
    /// The configured client key names, by name.
    names: HashMap<Box<str>, Arc<str>>,
    /// Per key, the latest deadline (score) this replica wrote or applied:
    /// only a later one is applied.
    seen: Mutex<HashMap<Arc<str>, i64>>,
    /// Nanoseconds since `base` from which the set may be read again.
    next_read: AtomicU64,
    reading: AtomicBool,
    base: Instant,
    failing: AtomicBool,
    errors: metrics::Counter,
}

impl SharedDegrade {
    pub(crate) fn new(
        conn: ConnectionManager,
        prefix: &str,
        clock: Clock,
        every: Duration,
        max: Duration,
        names: impl IntoIterator<Item = Arc<str>>,
        errors: metrics::Counter,
    ) -> Self {
        Self {
            conn,
            set: format!("{prefix}degraded"),
            clock,
            every: duration_nanos(every),
            max,
            names: names.into_iter().map(|n| (Box::from(&*n), n)).collect(),
            seen: Mutex::new(HashMap::new()),
            next_read: AtomicU64::new(0),
            reading: AtomicBool::new(false),
            base: time::now(),
            failing: AtomicBool::new(false),
            errors,
        }
    }

    /// Publishes that `name` degrades for `open_for` from now (from the
    /// breaker's state-change hook: spawns the write, never waits).
    pub(crate) fn degraded(self: &Arc<Self>, name: &Arc<str>, open_for: Duration) {
        let Some(until) = time::now().checked_add(open_for) else {
            return;
        };
        let (this, name) = (self.clone(), name.clone());
        spawn(async move {
            let res = this.publish(&name, until).await;
            this.outcome(res);
        });
    }

    /// Notes a request: reads the set in a task of its own when it is due
    /// (once per `probe_every`, one read at a time).
    pub(crate) fn touch(self: &Arc<Self>, breaker: &BreakerHandle<Arc<str>>) {
        let now = self.nanos(time::now());
        if now < self.next_read.load(Ordering::Acquire) || self.reading.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.next_read
            .store(now.saturating_add(self.every), Ordering::Release);
        let (this, breaker) = (self.clone(), breaker.clone());
        let spawned = spawn(async move {
            let res = this.read(&breaker).await;
            this.reading.store(false, Ordering::Release);
            this.outcome(res);
        });
        if !spawned {
            self.reading.store(false, Ordering::Release);
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        duration_nanos(at.saturating_duration_since(self.base))
    }

    /// The local clock in milliseconds since the origin of [`Clock::Local`].
    fn local_ms(origin: Instant, at: Instant) -> i64 {
        i64::try_from(at.saturating_duration_since(origin).as_millis()).unwrap_or(i64::MAX)
    }

    /// Now on the deadlines' clock, in milliseconds, and the local instant
    /// it was read at.
    async fn now_ms(&self, conn: &mut ConnectionManager) -> Result<(i64, Instant), RedisError> {
        match self.clock {
            Clock::Local(origin) => {
                let at = time::now();
                Ok((Self::local_ms(origin, at), at))
            }
            Clock::Server => {
                let t: (i64, i64) = ::redis::cmd("TIME").query_async(conn).await?;
                Ok((server_ms(t), time::now()))
            }
        }
    }

    async fn publish(&self, name: &Arc<str>, until: Instant) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let (now_ms, at) = self.now_ms(&mut conn).await?;
        let left = until.saturating_duration_since(at);
        let score = now_ms.saturating_add(ceil_ms(left));
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            let s = seen.entry(name.clone()).or_insert(score);
            *s = (*s).max(score);
        }
        ::redis::pipe()
            .cmd("ZADD")
            .arg(&self.set)
            .arg("GT")
            .arg(score)
            .arg(&**name)
            .ignore()
            .cmd("PEXPIRE")
            .arg(&self.set)
            .arg(ceil_ms(self.max).max(1))
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    }

    /// Every deadline in the set, with its key's name.
    fn zrange(&self) -> ::redis::Cmd {
        let mut cmd = ::redis::cmd("ZRANGE");
        cmd.arg(&self.set).arg(0).arg(-1).arg("WITHSCORES");
        cmd
    }

    async fn read(&self, breaker: &BreakerHandle<Arc<str>>) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let (now_ms, at, entries): (i64, Instant, Vec<(String, f64)>) = match self.clock {
            Clock::Local(origin) => {
                let entries = self.zrange().query_async(&mut conn).await?;
                let at = time::now();
                (Self::local_ms(origin, at), at, entries)
            }
            Clock::Server => {
                let (t, entries): ((i64, i64), _) = ::redis::pipe()
                    .cmd("TIME")
                    .add_command(self.zrange())
                    .query_async(&mut conn)
                    .await?;
                (server_ms(t), time::now(), entries)
            }
        };
        let mut stale = None;
        for (member, score) in entries {
            let score = score as i64;
            if score <= now_ms {
                stale = stale.max(Some(score));
                continue;
            }
            let Some(name) = self.names.get(member.as_str()) else {
                continue;
            };
            {
                let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                let s = seen.entry(name.clone()).or_insert(i64::MIN);
                if *s >= score {
                    continue;
                }
                *s = score;
            }
            let left = Duration::from_millis(score.abs_diff(now_ms)).min(self.max);
            if let Some(until) = at.checked_add(left)
                && breaker.trip_key_until(name, until).is_some()
            {
                tracing::debug!(
                    key_name = %name,
                    probe_in_ms = left.as_millis() as u64,
                    "gateway key degraded by another replica"
                );
            }
        }
        if let Some(stale) = stale {
            // Only deadlines already past: a later write is never removed.
            ::redis::cmd("ZREMRANGEBYSCORE")
                .arg(&self.set)
                .arg("-inf")
                .arg(stale)
                .query_async::<()>(&mut conn)
                .await?;
        }
        Ok(())
    }

    /// Counts a failure (logged once per outage) or notes a recovery.
    fn outcome(&self, res: Result<(), RedisError>) {
        match res {
            Ok(()) => {
                if self.failing.swap(false, Ordering::AcqRel) {
                    tracing::info!("shared degrade state: Redis answers again; sharing resumed");
                }
            }
            Err(e) => {
                self.errors.increment(1);
                if !self.failing.swap(true, Ordering::AcqRel) {
                    tracing::warn!(
                        error = %e,
                        "shared degrade state: Redis failed; each replica keeps its own degrade state until it answers"
                    );
                }
            }
        }
    }
}

impl std::fmt::Debug for SharedDegrade {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedDegrade")
            .field("set", &self.set)
            .finish_non_exhaustive()
    }
}

/// Redis's `TIME` in milliseconds.
fn server_ms((secs, micros): (i64, i64)) -> i64 {
    secs.saturating_mul(1000).saturating_add(micros / 1000)
}

/// `d` in whole milliseconds, rounded up.
fn ceil_ms(d: Duration) -> i64 {
    i64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(i64::MAX)
}

/// Runs `f` on the current tokio runtime (the gateway with `[redis]` is
/// built in one); outside of one there is nothing to share with.
fn spawn(f: impl Future<Output = ()> + Send + 'static) -> bool {
    let rt = tokio::runtime::Handle::try_current();
    if let Ok(rt) = &rt {
        rt.spawn(f);
    }
    rt.is_ok()
}
