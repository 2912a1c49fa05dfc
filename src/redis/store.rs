//! The Redis store of the one rate limiter builder and the one budget
//! builder: [`RateLimiterBuilder::redis`] and [`BudgetBuilder::redis`]
//! choose it, and the setters here are the Redis-only settings.

use std::fmt;
use std::time::Duration;

use ::redis::aio::ConnectionManager;

use crate::rate_limit::{BudgetBuilder, InMemory, RateLimiterBuilder, sealed};

use super::fallback::FailurePolicy;
use super::lease::Lease;
use super::limiter::Clock;

/// The default Redis timeout: 100 ms.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(100);

/// The Redis store of a [`RateLimiterBuilder`] or a [`BudgetBuilder`]:
/// the connection and the Redis-only settings, set on the builder once
/// [`RateLimiterBuilder::redis`] or [`BudgetBuilder::redis`] has chosen
/// Redis. The settings every backend shares (feedback, key count, sweep,
/// wall clock) are set on the builder before or after.
///
/// # Example
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// use std::num::{NonZeroU32, NonZeroU64};
/// use std::time::Duration;
/// use tower_qwen::rate_limit::{Budget, BudgetLimits, Limits, Quota, RateLimiter};
/// use tower_qwen::redis::{FailurePolicy, RedisBudget, RedisLimiter, connect_lazy};
///
/// // Lazy: nothing connects until the first call.
/// let conn = connect_lazy("redis://127.0.0.1:6379", None).unwrap();
/// let limiter: RedisLimiter<String> = RateLimiter::builder(Limits::requests(Quota::per_minute(NonZeroU32::new(60).unwrap())))
///     .max_keys(10_000)
///     .redis(conn.clone())
///     .prefix("app:rl:")
///     .timeout(Duration::from_millis(50))
///     .on_failure(FailurePolicy::fail_open(NonZeroU32::new(3).unwrap()))
///     .build_keyed();
/// let budget: RedisBudget<String> = Budget::builder()
///     .max_keys(10_000)
///     .redis(conn)
///     .prefix("app:budget:")
///     .build(BudgetLimits::per_day(NonZeroU64::new(100_000).unwrap()));
/// # drop((limiter, budget));
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    pub(crate) conn: ConnectionManager,
    /// `None`: the builder's default prefix.
    pub(crate) prefix: Option<String>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) policy: FailurePolicy,
    pub(crate) probe_every: Duration,
    // The rate limiter's alone:
    pub(crate) clock: Clock,
    pub(crate) lease: Option<Lease>,
    pub(crate) expiry_slack: Duration,
}

impl RedisStore {
    fn new(conn: ConnectionManager) -> Self {
        Self {
            conn,
            prefix: None,
            timeout: Some(DEFAULT_TIMEOUT),
            policy: FailurePolicy::default(),
            probe_every: Duration::from_millis(500),
            clock: Clock::Server,
            lease: None,
            expiry_slack: Duration::from_secs(1),
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .field("policy", &self.policy)
            .field("probe_every", &self.probe_every)
            .field("clock", &self.clock)
            .field("lease", &self.lease)
            .field("expiry_slack", &self.expiry_slack)
            .finish_non_exhaustive()
    }
}

impl sealed::Sealed for RedisStore {}

impl RateLimiterBuilder<InMemory> {
    /// Keeps the limiter's state in Redis, on `conn`, shared by every
    /// replica on it: the builder now builds a
    /// [`RedisLimiter`](super::RedisLimiter), with the shared settings set
    /// so far and the Redis-only ones below.
    ///
    /// A builder given a [`slow_start`](RateLimiterBuilder::slow_start) has
    /// no `redis` (the Redis backend has no slow start, see
    /// [the backends](crate::rate_limit#the-backends)): this does not
    /// compile, rather than dropping the slow start:
    ///
    /// ```compile_fail,E0599
    /// use std::time::Duration;
    /// use tower_qwen::rate_limit::{Limits, RateLimiter, SlowStart};
    /// use tower_qwen::redis::{RedisLimiter, connect_lazy};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let conn = connect_lazy("redis://127.0.0.1:6379", None).unwrap();
    /// let limiter: RedisLimiter<String> = RateLimiter::builder(Limits::UNLIMITED)
    ///     .slow_start(SlowStart::new(Duration::from_secs(3)))
    ///     .redis(conn)
    ///     .build_keyed();
    /// # }
    /// ```
    ///
    /// while the same without the slow start does:
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_qwen::rate_limit::{Limits, RateLimiter, SlowStart};
    /// use tower_qwen::redis::{RedisLimiter, connect_lazy};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let conn = connect_lazy("redis://127.0.0.1:6379", None).unwrap();
    /// let limiter: RedisLimiter<String> = RateLimiter::builder(Limits::UNLIMITED)
    ///     .redis(conn)
    ///     .build_keyed();
    /// # drop(limiter);
    /// # }
    /// ```
    pub fn redis(self, conn: ConnectionManager) -> RateLimiterBuilder<RedisStore> {
        self.with_store(RedisStore::new(conn))
    }
}

impl BudgetBuilder<InMemory> {
    /// Keeps the budget's counters in Redis, on `conn`, shared by every
    /// replica on it and kept across restarts: the builder now builds a
    /// [`RedisBudget`](super::RedisBudget), with the shared settings set so
    /// far and the Redis-only ones below.
    pub fn redis(self, conn: ConnectionManager) -> BudgetBuilder<RedisStore> {
        self.with_store(RedisStore::new(conn))
    }
}

/// The Redis settings both builders have, with the same meaning, and
/// `$default`, the default prefix (one literal for the code and the docs).
macro_rules! redis_settings {
    ($builder:ident, $default:ident = $prefix:literal) => {
        #[doc = concat!("The default key prefix of what a `", stringify!($builder), "<RedisStore>` builds.")]
        pub(super) const $default: &str = $prefix;

        impl $builder<RedisStore> {
            #[doc = concat!(
                "The prefix of every Redis key this backend writes. Default is `\"",
                $prefix,
                "\"`. Replicas that must share state use the same prefix (and the same limits)."
            )]
            pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
                self.store.prefix = Some(prefix.into());
                self
            }

            /// How long one Redis call may take (queueing included) before
            /// the failure policy decides instead (and Redis counts as
            /// down). Default is 100 ms ([`DEFAULT_TIMEOUT`]); `None`
            /// disables it (the connection's own timeouts still apply).
            pub fn timeout(mut self, timeout: impl Into<Option<Duration>>) -> Self {
                self.store.timeout = timeout.into();
                self
            }

            /// What to do when Redis cannot decide. Default is
            /// [`FailurePolicy::default`] (fail open, one replica).
            pub fn on_failure(mut self, policy: FailurePolicy) -> Self {
                self.store.policy = policy;
                self
            }

            /// While Redis is down, how often a call tries it again.
            /// Default is 500 ms.
            pub fn probe_every(mut self, every: Duration) -> Self {
                self.store.probe_every = every;
                self
            }
        }
    };
}

redis_settings!(RateLimiterBuilder, LIMITER_PREFIX = "tower-qwen:rl:");
redis_settings!(BudgetBuilder, BUDGET_PREFIX = "tower-qwen:budget:");

impl RateLimiterBuilder<RedisStore> {
    /// Whose clock decides. Default is [`Clock::Server`].
    pub fn clock(mut self, clock: Clock) -> Self {
        self.store.clock = clock;
        self
    }

    /// Local pre-reservation. Default is none (`None` disables).
    pub fn lease(mut self, lease: impl Into<Option<Lease>>) -> Self {
        self.store.lease = lease.into();
        self
    }

    /// How long a key stays in Redis after its buckets are full again: at
    /// least this, and with [`Clock::Server`] at most twice this (the
    /// expiry is set with room to spare, so a busy key does not reset it on
    /// every call). Default is 1 s.
    pub fn expiry_slack(mut self, slack: Duration) -> Self {
        self.store.expiry_slack = slack;
        self
    }
}
