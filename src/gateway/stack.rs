//! The gateway assembled from the crate's public pieces: for each client
//! key, one tower stack
//!
//! ```text
//! RateLimit (the key's bucket: reject mode, keyed by client key)
//!   -> ClientBody (cap, read timeout, strict RequestInfo, model required)
//!   -> GenAiTrace (the call's GenAI span until its body ends: `[telemetry]`)
//!   -> RateLimit (the same bucket's tokens per minute: the estimate)
//!   -> RateLimit (the key's token budgets per UTC day and month)
//!   -> CircuitBreaker (degrade mode, keyed by client key)
//!   -> Pool (the key's accounts: headroom, key rotation, pinning)
//!        -> per account: Quotas -> RateLimit (account, model; wait up to
//!           admission_wait, the waiting keys sharing it by weight, then
//!           refuse) -> SetUpstream -> Timeout -> client
//! ```
//!
//! and one for the Files and Batch APIs (outside the real-time quota)
//!
//! ```text
//! RateLimit (the same bucket) -> ClientBody (streamed, capped)
//!   -> Pool (pinned to the key's first account) -> SetUpstream -> Timeout -> client
//! ```
//!
//! over one backend for the buckets, one for the token budgets and one
//! per account: in memory, or on Redis (`[redis]`) so that every replica
//! shares them; with `[redis]` the breaker's degrade state is shared too
//! (`shared.rs`: its state-change hook publishes, a request may start a
//! read). The only pieces of
//! its own are [`ClientBody`] (what the gateway accepts as a request body) and
//! [`Quotas`] (an account's refusal as a 429 with the account's quotas per
//! minute).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use pin_project_lite::pin_project;
use tower::ServiceBuilder;
use tower::ServiceExt;
use tower::util::BoxCloneSyncService;
use tower_layer::Layer;
use tower_service::Service;

use crate::BoxError;
use crate::body::Body;
use crate::circuit_breaker::{
    BreakerHandle, CircuitBreakerLayer, State as BreakerState, TripAction,
};
use crate::client::{SetUpstreamLayer, TransportConfig};
use crate::key::{AccountId, AccountModel, ByAccountModel, key_fn};
use crate::pool::{Account, Pool};
use crate::rate_limit::error::RateLimited;
use crate::rate_limit::fair::FairShare;
use crate::rate_limit::{
    Backend, Budget, BudgetLimits, Cost, DEFAULT_OUTPUT_TOKENS, Limits, Mode, PerCall, QuotaTable,
    RateLimitLayer, RateLimiter, SlowStart, Snapshot, Tightest, WallClock,
};
use crate::request::RequestInfo;
use crate::telemetry::GenAiTraceLayer;
use crate::timeout::TimeoutLayer;

use super::config::{AccountConfig, GatewayConfig};
use super::error::{Failed, Refused, UpstreamBusy};
use super::metrics::KeyMetrics;
use super::respond::Refusal;
#[cfg(feature = "redis")]
use super::shared::SharedDegrade;

/// A client key's stack, as the handler calls it.
pub(crate) type KeySvc =
    BoxCloneSyncService<Request<axum::body::Body>, Response<ResBody>, BoxError>;

/// The body of an answer from the stack.
pub(crate) type ResBody = UnsyncBoxBody<Bytes, BoxError>;

/// The client key a request came with (its configured name): the key of
/// its bucket and of its circuit. The handler puts it in the request's
/// extensions.
#[derive(Clone, Debug)]
pub(crate) struct ClientName(pub(crate) Arc<str>);

/// The client key's name, for the GenAI spans.
fn caller_name(ext: &http::Extensions) -> Option<Arc<str>> {
    ext.get::<ClientName>().map(|c| c.0.clone())
}

/// The key extractor of the buckets and circuits.
fn client_of<B>(req: &mut Request<B>) -> Arc<str> {
    req.extensions()
        .get::<ClientName>()
        .map_or_else(|| Arc::from(""), |c| c.0.clone())
}

/// A rate-limit backend of the gateway, for snapshots (`x-ratelimit-*`,
/// `/metrics`).
#[derive(Clone)]
pub(crate) enum Limiter<K> {
    Memory(RateLimiter<K>),
    #[cfg(feature = "redis")]
    Redis(crate::redis::RedisLimiter<K>),
}

impl<K> Limiter<K>
where
    K: crate::key::StoreKey + std::hash::Hash + Eq + Clone + Send + Sync + 'static,
{
    pub(crate) fn snapshot(&self, key: &K) -> Option<Snapshot> {
        match self {
            Limiter::Memory(l) => l.snapshot(key),
            #[cfg(feature = "redis")]
            Limiter::Redis(l) => l.snapshot(key),
        }
    }
}

impl<K> fmt::Debug for Limiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limiter::Memory(_) => f.write_str("Limiter::Memory"),
            #[cfg(feature = "redis")]
            Limiter::Redis(_) => f.write_str("Limiter::Redis"),
        }
    }
}

/// The client keys' token budgets, for `x-ratelimit-*-tokens`.
#[derive(Clone, Debug)]
pub(crate) enum Budgets {
    /// In memory: kept across reloads.
    Memory(Budget<Arc<str>>),
    #[cfg(feature = "redis")]
    Redis(crate::redis::RedisBudget<Arc<str>>),
}

impl Budgets {
    /// `key`'s window with the least room left.
    pub(crate) fn tightest(&self, key: &Arc<str>) -> Option<Tightest> {
        match self {
            Budgets::Memory(b) => b.tightest(key),
            #[cfg(feature = "redis")]
            Budgets::Redis(b) => b.tightest(key),
        }
    }

    fn memory(&self) -> Option<&Budget<Arc<str>>> {
        match self {
            Budgets::Memory(b) => Some(b),
            #[cfg(feature = "redis")]
            Budgets::Redis(_) => None,
        }
    }
}

/// What [`build`] makes.
pub(crate) struct Built {
    /// The client keys' buckets.
    pub(crate) buckets: Limiter<Arc<str>>,
    /// The degrade breaker's circuits, by client key.
    pub(crate) breaker: BreakerHandle<Arc<str>>,
    /// One stack per client key, in configuration order.
    pub(crate) services: Vec<KeySvc>,
    /// One Files and Batch API stack per client key, in configuration
    /// order.
    pub(crate) files: Vec<KeySvc>,
    /// The token budgets (in memory, kept across reloads; or in Redis).
    pub(crate) budgets: Budgets,
    /// Every Redis limiter (to probe Redis).
    #[cfg(feature = "redis")]
    pub(crate) redis: Vec<RedisProbe>,
}

/// Pings one Redis limiter.
#[cfg(feature = "redis")]
pub(crate) type RedisProbe =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// Builds every client key's stack from the configuration; in-memory
/// token budgets keep counting from `previous` (a reload).
pub(crate) fn build(
    cfg: &GatewayConfig,
    metrics: &KeyMetrics,
    previous: Option<&Budgets>,
) -> Built {
    let previous = previous.and_then(Budgets::memory);
    let up = &cfg.upstream;
    let client = TransportConfig::new()
        .connect_timeout(up.connect_timeout)
        .pool_max_idle_per_host(up.pool_max_idle_per_host)
        .pool_idle_timeout(up.pool_idle_timeout)
        .build();
    let upstream = ServiceBuilder::new()
        .layer(SetUpstreamLayer::new(up.base_url.clone(), None))
        .layer(
            TimeoutLayer::new()
                .header(up.header_timeout)
                .idle(up.idle_timeout)
                .total(up.total_timeout),
        )
        .service(client);
    let bucket_limits: Arc<HashMap<Arc<str>, Limits>> = Arc::new(
        cfg.keys
            .iter()
            .map(|k| {
                let requests = k.bucket.limits();
                let limits = match k.tokens.quota() {
                    Some(tpm) => requests.and_tokens(tpm),
                    None => requests,
                };
                (Arc::from(k.name.as_str()), limits)
            })
            .collect(),
    );
    let limits_of = move |k: &Arc<str>| bucket_limits.get(k).copied().unwrap_or(Limits::UNLIMITED);
    let budget_limits: Arc<HashMap<Arc<str>, BudgetLimits>> = Arc::new(
        cfg.keys
            .iter()
            .map(|k| (Arc::from(k.name.as_str()), k.tokens.budget))
            .collect(),
    );
    let budgets_of =
        move |k: &Arc<str>| budget_limits.get(k).copied().unwrap_or(BudgetLimits::NONE);
    let wall_clock = cfg.wall_clock.unwrap_or_else(WallClock::system);
    let quotas_of = |a: &AccountConfig| {
        let table = a.quotas.clone();
        move |k: &AccountModel| {
            table
                .as_ref()
                .map_or(Limits::UNLIMITED, |t| t.get(k.model()))
        }
    };
    // The client-key buckets and budgets, whatever the backend.
    let bucket_builder = || {
        RateLimiter::builder(Limits::UNLIMITED)
            .feedback(None)
            .max_keys(cfg.keys.len().max(1))
    };
    let budget_builder = || {
        Budget::builder()
            .clock(wall_clock)
            .max_keys(cfg.keys.len().max(1))
    };
    #[cfg(feature = "redis")]
    if let Some(r) = &cfg.redis {
        use crate::redis::{FailurePolicy, connect_lazy};
        // Validated in the configuration: only a missing runtime fails here.
        let conn = connect_lazy(&r.url, r.timeout)
            .expect("Gateway::new with [redis] runs inside a tokio runtime");
        let policy = r
            .fail_open
            .map_or(FailurePolicy::fail_closed(), FailurePolicy::fail_open);
        let on_redis = |b: crate::rate_limit::RateLimiterBuilder, prefix: String| {
            let b = b
                .redis(conn.clone())
                .prefix(prefix)
                .timeout(r.timeout)
                .on_failure(policy)
                .probe_every(r.probe_every)
                .clock(r.clock);
            match r.clock {
                // Redis expires keys on its own clock, which a paused test
                // clock does not follow.
                crate::redis::Clock::Local(_) => b.expiry_slack(Duration::from_secs(3600)),
                crate::redis::Clock::Server => b,
            }
        };
        let buckets =
            on_redis(bucket_builder(), format!("{}key:", r.prefix)).build_keyed_with(limits_of);
        let accounts: Vec<_> = cfg
            .accounts
            .iter()
            .map(|a| {
                on_redis(
                    RateLimiter::builder(Limits::UNLIMITED),
                    format!("{}acct:", r.prefix),
                )
                .build_keyed_with(quotas_of(a))
            })
            .collect();
        let budgets = budget_builder()
            .redis(conn.clone())
            .prefix(format!("{}budget:", r.prefix))
            .timeout(r.timeout)
            .on_failure(policy)
            .probe_every(r.probe_every)
            .build_with(budgets_of);
        let mut redis: Vec<RedisProbe> = Vec::new();
        if cfg.keys.iter().any(|k| !k.tokens.budget.is_none()) {
            let b = budgets.clone();
            redis.push(Arc::new(move || {
                let b = b.clone();
                Box::pin(async move { b.probe().await })
            }));
        }
        let b = buckets.clone();
        redis.push(Arc::new(move || {
            let b = b.clone();
            Box::pin(async move { b.probe().await })
        }));
        for a in &accounts {
            let a = a.clone();
            redis.push(Arc::new(move || {
                let a = a.clone();
                Box::pin(async move { a.probe().await })
            }));
        }
        let share = Arc::new(super::shared::SharedDegrade::new(
            conn.clone(),
            &r.prefix,
            r.clock,
            r.probe_every,
            cfg.degrade.probe_after_max,
            cfg.keys.iter().map(|k| Arc::from(k.name.as_str())),
            metrics.degrade_sync_errors.clone(),
        ));
        let (breaker, services, files) = assemble(
            cfg,
            metrics,
            upstream,
            buckets.clone(),
            budgets.clone(),
            accounts,
            Some(share),
        );
        return Built {
            buckets: Limiter::Redis(buckets),
            breaker,
            services,
            files,
            budgets: Budgets::Redis(budgets),
            redis,
        };
    }
    let buckets = bucket_builder().build_keyed_with(limits_of);
    let accounts: Vec<_> = cfg
        .accounts
        .iter()
        .map(|a| {
            let b = RateLimiter::builder(Limits::UNLIMITED);
            match a.slow_start {
                Some(ramp) => b
                    .slow_start(SlowStart::new(ramp))
                    .build_keyed_with(quotas_of(a)),
                None => b.build_keyed_with(quotas_of(a)),
            }
        })
        .collect();
    let budgets = match previous {
        Some(b) => b.with_limits(budgets_of),
        None => budget_builder().build_with(budgets_of),
    };
    let (breaker, services, files) = assemble(
        cfg,
        metrics,
        upstream,
        buckets.clone(),
        budgets.clone(),
        accounts,
        None,
    );
    Built {
        buckets: Limiter::Memory(buckets),
        breaker,
        services,
        files,
        budgets: Budgets::Memory(budgets),
        #[cfg(feature = "redis")]
        redis: Vec::new(),
    }
}

/// The stacks over the buckets' backend `buckets` (requests, and tokens
/// per minute), the token budgets' `budgets` and one backend per account.
fn assemble<U, UB, BK, BB, BA>(
    cfg: &GatewayConfig,
    metrics: &KeyMetrics,
    upstream: U,
    buckets: BK,
    budgets: BB,
    accounts: Vec<BA>,
    share: Option<Arc<SharedDegrade>>,
) -> (BreakerHandle<Arc<str>>, Vec<KeySvc>, Vec<KeySvc>)
where
    U: Service<Request<Body>, Response = Response<UB>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    U::Future: Send + 'static,
    UB: http_body::Body<Data = Bytes> + Send + 'static,
    UB::Error: Into<BoxError>,
    BK: Backend<Arc<str>>,
    BB: Backend<Arc<str>>,
    BA: Backend<AccountModel>,
{
    let admission = match cfg.upstream.admission_wait {
        Some(max_wait) => Mode::Wait { max_wait },
        None => Mode::Reject,
    };
    // The client keys' weights in the accounts' fair queues.
    let weights: Arc<HashMap<Arc<str>, std::num::NonZeroU32>> = Arc::new(
        cfg.keys
            .iter()
            .map(|k| (Arc::from(k.name.as_str()), k.weight))
            .collect(),
    );
    let flows = move |req: &mut Request<Body>| {
        let name = client_of(req);
        let weight = weights
            .get(&name)
            .copied()
            .unwrap_or(std::num::NonZeroU32::MIN);
        (name, weight)
    };
    // One service per upstream account, shared by every pool that lists
    // it: its (account, model) budget, then the upstream.
    let account_svcs: Vec<_> = cfg
        .accounts
        .iter()
        .zip(&accounts)
        .map(|(a, backend)| {
            let limit = RateLimitLayer::keyed(backend.clone(), ByAccountModel::new())
                .mode(admission)
                .fair(FairShare::new(flows.clone()));
            Quotas {
                inner: limit.layer(upstream.clone()),
                info: Arc::new(QuotaInfo {
                    account: AccountId::Named(Arc::from(a.name.as_str())),
                    table: a.quotas.clone(),
                    backend: backend.clone(),
                }),
            }
        })
        .collect();

    // One degrade breaker, keyed by client key.
    let d = cfg.degrade;
    let who: HashMap<Arc<str>, (String, metrics::Counter)> = cfg
        .keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            (
                Arc::from(k.name.as_str()),
                (k.digest.redacted_id(), metrics.degradations[i].clone()),
            )
        })
        .collect();
    let (rate, failures) = (d.rate_per_second, d.consecutive_failures);
    let publish = share.clone();
    let breaker = CircuitBreakerLayer::new()
        .failure_rate(None)
        .consecutive_failures(d.enabled.then_some(failures))
        .trip_action(TripAction::Degrade(rate))
        .open_duration(d.probe_after, d.probe_after_max)
        .jitter(d.jitter)
        .keyed(
            key_fn(client_of::<Body> as fn(&mut Request<Body>) -> Arc<str>),
            NonZeroUsize::new(cfg.keys.len()).unwrap_or(NonZeroUsize::MIN),
        )
        .on_state_change(move |name: &Arc<str>, t| {
            let Some((id, degradations)) = who.get(name) else {
                return;
            };
            if let (Some(share), BreakerState::Degraded, Some(open_for)) =
                (&publish, t.to, t.open_for)
            {
                share.degraded(name, open_for);
            }
            let probe_in_ms = t.open_for.map_or(0, |d| d.as_millis() as u64);
            match (t.from, t.to) {
                (from, BreakerState::Degraded) if from != BreakerState::Degraded => {
                    degradations.increment(1);
                    tracing::warn!(
                        key = %id,
                        key_name = %name,
                        consecutive_failures = failures.get(),
                        rate_per_second = rate.get(),
                        probe_in_ms,
                        "gateway key degraded after consecutive upstream failures"
                    );
                }
                (BreakerState::Degraded, BreakerState::Degraded) => tracing::info!(
                    key = %id,
                    key_name = %name,
                    probe_in_ms,
                    "gateway key probe failed; still degraded"
                ),
                (_, BreakerState::Closed) => {
                    tracing::info!(key = %id, key_name = %name, "gateway key recovered");
                }
                _ => {}
            }
        });
    let handle = breaker.handle();
    // With [redis]: each request may start a read of the shared state.
    let touch = share.map(|share| {
        let handle = handle.clone();
        tower::util::MapRequestLayer::new(move |req: Request<Body>| {
            share.touch(&handle);
            req
        })
    });

    let by_client = key_fn(client_of::<Body> as fn(&mut Request<Body>) -> Arc<str>);
    // The key's tokens per minute: the token quota of the same bucket,
    // charged once the body is read (the request went through the bucket
    // before it), reconciled when the answer ends.
    let tpm = RateLimitLayer::keyed(buckets.clone(), by_client.clone())
        .reject()
        .cost(token_estimate as fn(&mut Request<Body>) -> Cost);
    // The key's budgets per UTC day and month.
    let budget = RateLimitLayer::keyed(budgets, by_client).reject();
    let bucket = RateLimitLayer::keyed(
        buckets,
        key_fn(client_of::<axum::body::Body> as fn(&mut Request<axum::body::Body>) -> Arc<str>),
    )
    .reject()
    .cost(PerCall);
    // The GenAI span of each call, around its limits, the breaker and
    // every attempt in the pool: a refusal is an operation that failed.
    let base = &cfg.upstream.base_url;
    let genai = GenAiTraceLayer::new().caller(caller_name).server(
        base.authority().host(),
        base.authority()
            .port_u16()
            .unwrap_or(if base.scheme() == &http::uri::Scheme::HTTP {
                80
            } else {
                443
            }),
    );
    #[cfg(feature = "otel")]
    let genai = match &cfg.otel {
        Some(otel) => genai.otel(otel.clone()),
        None => genai,
    };
    let genai = if cfg.genai_spans { genai } else { genai.off() };
    let (max_body, read_timeout) = (cfg.server.max_body_bytes, cfg.server.body_read_timeout);
    let max_file = cfg.server.max_file_bytes;
    // An account of the configuration as a pool member over `svc`.
    fn member<S>(a: &AccountConfig, svc: S) -> Account<S> {
        let mut account = Account::new(&a.name, &a.keys[0].0, svc)
            .expect("account validated in the configuration");
        for key in &a.keys[1..] {
            account = account
                .key(&key.0)
                .expect("key validated in the configuration");
        }
        match &a.workspace {
            Some(ws) => account
                .workspace(ws)
                .expect("workspace validated in the configuration"),
            None => account,
        }
    }
    let mut services = Vec::with_capacity(cfg.keys.len());
    let mut files = Vec::with_capacity(cfg.keys.len());
    for k in &cfg.keys {
        let members = k.accounts.iter().map(|&i| {
            member(&cfg.accounts[i], account_svcs[i].clone())
                .limiter(accounts[i].clone(), ByAccountModel::new())
        });
        let pool = Pool::builder()
            .accounts(members)
            .build()
            .expect("pool validated in the configuration");
        let svc = ServiceBuilder::new()
            .map_response(|res: Response<_>| res.map(IntoResponseBody::boxed))
            .layer(bucket.clone())
            .layer(ClientBody::layer(How::Read {
                max: max_body,
                timeout: read_timeout,
            }))
            .layer(genai.clone())
            .layer(tpm.clone())
            // Refused inside as a local throttle, so that the TPM
            // reservation is given back when the budgets' Redis fails closed.
            .map_err(local_store_failure)
            .layer(budget.clone())
            .option_layer(touch.clone())
            .layer(breaker.clone())
            .service(pool);
        services.push(BoxCloneSyncService::new(svc));

        // Files and batches: the key's bucket and the account's key, no
        // real-time quota (the Batch API is outside it), the body streamed.
        let pool = Pool::builder()
            .accounts(
                k.accounts
                    .iter()
                    .map(|&i| member(&cfg.accounts[i], upstream.clone())),
            )
            .build()
            .expect("pool validated in the configuration");
        let svc = ServiceBuilder::new()
            .map_response(|res: Response<_>| res.map(IntoResponseBody::boxed))
            .layer(bucket.clone())
            .layer(ClientBody::layer(How::Stream { max: max_file }))
            .service(pool);
        files.push(BoxCloneSyncService::new(svc));
    }
    (handle, services, files)
}

/// Without the `redis` feature there is no shared degrade state.
#[cfg(not(feature = "redis"))]
enum SharedDegrade {}

#[cfg(not(feature = "redis"))]
impl SharedDegrade {
    fn degraded(&self, _: &Arc<str>, _: Duration) {
        match *self {}
    }

    fn touch(&self, _: &BreakerHandle<Arc<str>>) {
        match *self {}
    }
}

/// The token cost of a request to the key's tokens per minute: its
/// estimate (input plus `max_tokens`, or the default output budget), no
/// request (the bucket counted it).
fn token_estimate(req: &mut Request<Body>) -> Cost {
    Cost::new(
        0,
        RequestInfo::of(req).estimated_tokens(DEFAULT_OUTPUT_TOKENS),
    )
}

/// A Redis limit that failed closed, as [`LimitsUnavailable`] (a local
/// refusal: nothing was sent).
fn local_store_failure(e: BoxError) -> BoxError {
    #[cfg(feature = "redis")]
    if let Some(u) = e.downcast_ref::<crate::redis::error::StoreUnavailable>() {
        let retry_after = u.retry_after().unwrap_or(Duration::from_secs(1));
        return Box::new(super::error::LimitsUnavailable { retry_after });
    }
    e
}

/// A response body the stack can box.
pub(crate) trait IntoResponseBody {
    fn boxed(self) -> ResBody;
}

impl<B> IntoResponseBody for B
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn boxed(self) -> ResBody {
        self.map_err(Into::into).boxed_unsync()
    }
}

// ---------------------------------------------------------------------------
// ClientBody: what the gateway accepts as a request body.

/// How [`ClientBody`] takes the body.
#[derive(Clone, Copy, Debug)]
pub(crate) enum How {
    /// Read it whole (up to `max` bytes, within `timeout`), once and
    /// strictly ([`RequestInfo`]: a body the upstream might read otherwise
    /// is refused), key the model as the quota table reads it, and refuse
    /// a generation or embedding without a model; the response carries the
    /// [`RequestInfo`] in its extensions.
    Read { max: usize, timeout: Duration },
    /// Pass it through as a stream of at most `max` bytes (cut, and
    /// answered 413, when it sends more): for Files API uploads, which are
    /// neither read nor buffered.
    Stream { max: u64 },
}

/// Takes the client's body as [`How`] says (a `content-length` over the
/// cap is refused at once), then calls the inner service.
#[derive(Clone, Debug)]
pub(crate) struct ClientBody<S> {
    inner: S,
    how: How,
}

impl<S> ClientBody<S> {
    pub(crate) fn layer(how: How) -> impl Layer<S, Service = Self> + Clone {
        tower::layer::layer_fn(move |inner| ClientBody { inner, how })
    }
}

fn refuse(refusal: Refusal, message: Option<String>) -> BoxError {
    Box::new(Refused { refusal, message })
}

impl<S, B> Service<Request<axum::body::Body>> for ClientBody<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<B>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<B>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<axum::body::Body>) -> Self::Future {
        let inner = self.inner.clone();
        let max = match self.how {
            How::Read { max, .. } => max as u64,
            How::Stream { max } => max,
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max) {
            return Box::pin(std::future::ready(Err(refuse(Refusal::BodyTooLarge, None))));
        }
        match self.how {
            How::Read { max, timeout } => Box::pin(read(inner, req, max, timeout)),
            How::Stream { max } => Box::pin(stream(inner, req, max)),
        }
    }
}

/// [`How::Read`].
async fn read<S, B>(
    inner: S,
    req: Request<axum::body::Body>,
    max: usize,
    timeout: Duration,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError>,
{
    let (parts, body) = req.into_parts();
    let limited = http_body_util::Limited::new(body, max);
    let bytes: Bytes = match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(c)) => c.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(refuse(Refusal::BodyTooLarge, None));
        }
        Ok(Err(_)) => return Err(refuse(Refusal::BadBody, None)),
        Err(_) => return Err(refuse(Refusal::BodyTimeout, None)),
    };
    let mut info = RequestInfo::parse(parts.uri.path(), &parts.headers, Some(&bytes));
    if let Some(err) = &info.body_error {
        return Err(refuse(
            Refusal::InvalidBody,
            Some(sentence(&err.to_string())),
        ));
    }
    if let Some(m) = &info.model {
        // The (account, model) budget is keyed by the model as the quota
        // table reads it, so `Qwen-Plus ` and `qwen-plus` share one budget.
        let canonical = m.trim().to_ascii_lowercase();
        info.model = (!canonical.is_empty()).then(|| {
            if canonical == **m {
                m.clone()
            } else {
                Arc::from(canonical)
            }
        });
    }
    if info.model.is_none() && (info.endpoint.is_generation() || info.endpoint.is_embedding()) {
        return Err(refuse(Refusal::MissingModel, None));
    }
    let info = Arc::new(info);
    let mut req = Request::from_parts(parts, Body::from(bytes));
    req.extensions_mut().insert(info.clone());
    match inner.oneshot(req).await {
        Ok(mut res) => {
            res.extensions_mut().insert(info);
            Ok(res)
        }
        Err(source) => Err(Box::new(Failed {
            info,
            source: Arc::from(source),
        })),
    }
}

/// [`How::Stream`].
async fn stream<S, B>(
    inner: S,
    req: Request<axum::body::Body>,
    max: u64,
) -> Result<Response<B>, BoxError>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError>,
{
    let limit = usize::try_from(max).unwrap_or(usize::MAX);
    let req = req.map(|b| Body::stream(http_body_util::Limited::new(b, limit)));
    inner.oneshot(req).await.map_err(|e| {
        if error_chain(&*e).any(|e| e.is::<http_body_util::LengthLimitError>()) {
            refuse(Refusal::BodyTooLarge, None)
        } else {
            e
        }
    })
}

/// An error and its sources.
fn error_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// A message as a sentence: capitalised, with a final period.
fn sentence(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => format!("{}{}.", first.to_uppercase(), c.as_str()),
        None => String::new(),
    }
}

// ---------------------------------------------------------------------------
// Quotas: an account's refusal as the gateway answers it.

/// What an account's refusal shows.
struct QuotaInfo<B> {
    account: AccountId,
    /// The account's quotas per model (`None`: unlimited).
    table: Option<QuotaTable>,
    backend: B,
}

impl<B: Backend<AccountModel>> QuotaInfo<B> {
    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` of the
    /// (account, `model`) budget, per minute as DashScope states its quotas
    /// (RPM, TPM) and as OpenAI-style clients read them: the limit is the
    /// quota per minute (not the burst the limiter smooths it to), the
    /// remaining is that minus what the budget has booked ahead, and the
    /// reset is the time until nothing is booked ahead (whole seconds,
    /// rounded up).
    fn headers(&self, model: &Option<Arc<str>>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let Some(table) = &self.table else {
            return headers;
        };
        let limits = table.get(model.as_deref());
        let key = AccountModel {
            account: self.account.clone(),
            model: model.clone(),
        };
        let snapshot = self.backend.snapshot(&key);
        for (name, quota, state) in [
            (
                "requests",
                limits.get_requests(),
                snapshot.and_then(|s| s.requests),
            ),
            (
                "tokens",
                limits.get_tokens(),
                snapshot.and_then(|s| s.tokens),
            ),
        ] {
            let Some(quota) = quota else { continue };
            let per_minute = (quota.per_second_rate() * 60.0).round() as u64;
            let booked_for = state.map_or(Duration::ZERO, |s| s.reset);
            let interval = quota.replenish_interval().as_nanos().max(1);
            let booked =
                u64::try_from(booked_for.as_nanos().div_ceil(interval)).unwrap_or(u64::MAX);
            let reset = booked_for.as_secs() + u64::from(booked_for.subsec_nanos() > 0);
            for (what, v) in [
                ("limit", per_minute),
                ("remaining", per_minute.saturating_sub(booked)),
                ("reset", reset),
            ] {
                if let Ok(n) = HeaderName::try_from(format!("x-ratelimit-{what}-{name}")) {
                    headers.insert(n, HeaderValue::from(v));
                }
            }
        }
        headers
    }
}

/// An account's service as the gateway calls it: a refusal of its
/// (account, model) budget becomes [`UpstreamBusy`], with the account's
/// quotas per minute.
pub(crate) struct Quotas<S, B> {
    inner: S,
    info: Arc<QuotaInfo<B>>,
}

impl<S: Clone, B> Clone for Quotas<S, B> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            info: self.info.clone(),
        }
    }
}

impl<S, B> fmt::Debug for Quotas<S, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Quotas")
            .field("account", &self.info.account)
            .finish_non_exhaustive()
    }
}

impl<S, B> Service<Request<Body>> for Quotas<S, B>
where
    S: Service<Request<Body>, Error = BoxError>,
    B: Backend<AccountModel>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = QuotasFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Body>) -> Self::Future {
        let model = RequestInfo::of(&mut req).model.clone();
        QuotasFuture {
            inner: self.inner.call(req),
            info: self.info.clone(),
            model,
        }
    }
}

pin_project! {
    /// The future of [`Quotas`].
    pub(crate) struct QuotasFuture<F, B> {
        #[pin]
        inner: F,
        info: Arc<QuotaInfo<B>>,
        model: Option<Arc<str>>,
    }
}

impl<F, B, R> Future for QuotasFuture<F, B>
where
    F: Future<Output = Result<R, BoxError>>,
    B: Backend<AccountModel>,
{
    type Output = Result<R, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let e = match ready!(this.inner.poll(cx)) {
            Ok(r) => return Poll::Ready(Ok(r)),
            Err(e) => e,
        };
        #[cfg(feature = "redis")]
        if let Some(u) = e.downcast_ref::<crate::redis::error::StoreUnavailable>() {
            // Not an upstream failure: the degrade breaker must not count it.
            let retry_after = u.retry_after().unwrap_or(Duration::from_secs(1));
            return Poll::Ready(Err(Box::new(super::error::LimitsUnavailable {
                retry_after,
            })));
        }
        let Some(limited) = e.downcast_ref::<RateLimited>() else {
            return Poll::Ready(Err(e));
        };
        let retry_after = limited.retry_after().unwrap_or(Duration::from_secs(1));
        tracing::debug!(
            account = ?this.info.account,
            model = this.model.as_deref().unwrap_or(""),
            retry_after_ms = retry_after.as_millis() as u64,
            "upstream account budget refused the call"
        );
        Poll::Ready(Err(Box::new(UpstreamBusy {
            retry_after,
            tokens: limited.is_tokens(),
            headers: this.info.headers(this.model),
        })))
    }
}
