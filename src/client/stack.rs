use std::fmt;
use std::future::Future;
use std::num::{NonZeroU32, NonZeroUsize};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use tower::ServiceBuilder;
use tower::util::BoxCloneSyncService;
use tower_service::Service;

use super::auth::{ApiKey, SetUpstreamLayer};
use super::endpoint::{BaseUrl, Region};
use super::transport::TransportConfig;
use crate::BoxError;
use crate::body::Body;
use crate::circuit_breaker::{BreakerHandle, CircuitBreakerLayer};
use crate::concurrency::{ConcurrencyLimitLayer, LimitHandle};
use crate::key::{AccountModel, ByAccountModel, ByModel};
use crate::rate_limit::{Limits, QuotaTable, RateLimitLayer, RateLimiter};
use crate::retry::{RetryLayer, RetryStats};
use crate::telemetry::GenAiTraceLayer;
use crate::timeout::TimeoutLayer;

/// The body of a [`QwenClient`] response: the upstream's bytes, streamed as
/// they arrive; errors are the layers' typed errors (an idle timeout, a
/// reset...) or the transport's.
pub type ResponseBody = UnsyncBoxBody<Bytes, BoxError>;

/// The whole tower-qwen stack around the tuned HTTP client, with Qwen
/// defaults, as one cloneable `Service<http::Request<Body>>`.
///
/// From the outside in:
///
/// 1. model [fallback](crate::fallback) (only when
///    [`QwenClientBuilder::fallback`] is set and the `fallback` feature is
///    on);
/// 2. [retry](crate::retry): 2 retries (like the official SDK), cause-aware
///    backoff with full jitter, a shared 20 % budget;
/// 3. a [circuit breaker](crate::circuit_breaker) per model: opens after 3
///    consecutive transient failures;
/// 4. a [rate limiter](crate::rate_limit) per (account, model) with the
///    published default quotas ([`QuotaTable::qwen`]), per-second
///    smoothing, slow start and feedback, waiting up to 30 s;
/// 5. a [concurrency limit](crate::concurrency) of 64 calls in flight,
///    held until a streamed body ends (the rate limiter is what paces the
///    calls; this bounds connections and memory when the upstream slows
///    down; [`Aimd`](crate::concurrency::Aimd) makes it adaptive);
/// 6. [timeouts](crate::timeout): 60 s idle between body frames, 300 s in
///    all (the official SDK's request timeout), none on the headers alone
///    (a non-streamed generation sends its headers only when it is done);
/// 7. the base URL and `Authorization` header ([`SetUpstreamLayer`]);
/// 8. the HTTP client ([`TransportConfig`]).
///
/// Every piece is reachable for a stack of your own: each layer's module,
/// and [`ServiceBuilderExt`](crate::builder::ServiceBuilderExt).
///
/// # Clone
///
/// Clones share every limit, budget and circuit.
///
/// # Example
///
/// ```
/// # #[cfg(not(feature = "mock"))] fn main() {}
/// # #[cfg(feature = "mock")]
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_qwen::BoxError> {
/// use http_body_util::BodyExt;
/// use tower::ServiceExt;
/// use tower_qwen::client::{ChatRequest, QwenClient};
/// use tower_qwen::mock::MockDashScope;
///
/// let mock = MockDashScope::builder().key("sk-test", "acct").start().await?;
/// let client = QwenClient::builder()
///     .base_url(mock.base_url().parse()?)
///     .api_key("sk-test")?
///     .build()?;
/// let res = client.clone().oneshot(ChatRequest::new("qwen-plus").user("Hello").into_request()).await?;
/// assert_eq!(res.status(), 200);
/// let body = res.into_body().collect().await?.to_bytes();
/// assert!(body.starts_with(b"{"));
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct QwenClient {
    inner: BoxCloneSyncService<Request<Body>, Response<ResponseBody>, BoxError>,
    handles: Arc<Handles>,
}

struct Handles {
    limiter: RateLimiter<AccountModel>,
    breaker: BreakerHandle<Option<Arc<str>>>,
    concurrency: LimitHandle,
    retry: RetryStats,
}

impl fmt::Debug for QwenClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QwenClient").finish_non_exhaustive()
    }
}

impl QwenClient {
    /// A builder with the defaults described on the type; the key comes
    /// from `DASHSCOPE_API_KEY` unless set, the host is Singapore's
    /// (international) unless set.
    pub fn builder() -> QwenClientBuilder {
        QwenClientBuilder::default()
    }

    /// The shared rate limiter (snapshots per (account, model), manual
    /// feedback).
    pub fn rate_limiter(&self) -> &RateLimiter<AccountModel> {
        &self.handles.limiter
    }

    /// The circuit breaker's handle (state per model, force open/closed).
    pub fn breaker(&self) -> &BreakerHandle<Option<Arc<str>>> {
        &self.handles.breaker
    }

    /// The concurrency limit's handle (current limit, calls in flight).
    pub fn concurrency(&self) -> &LimitHandle {
        &self.handles.concurrency
    }

    /// The retry layer's counters (retries, budget denials...).
    pub fn retry_stats(&self) -> &RetryStats {
        &self.handles.retry
    }
}

impl Service<Request<Body>> for QwenClient {
    type Response = Response<ResponseBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ResponseBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        self.inner.call(req)
    }
}

/// Configures a [`QwenClient`]. Every setter documents its default.
#[must_use = "a builder does nothing until `build` is called"]
pub struct QwenClientBuilder {
    base: BaseUrl,
    key: Option<ApiKey>,
    keyless: bool,
    workspace: Option<String>,
    transport: TransportConfig,
    quotas: QuotaTable,
    accounts: ByAccountModel,
    max_wait: Duration,
    default_output_tokens: u32,
    retry: RetryLayer,
    breaker_failures: NonZeroU32,
    concurrency: ConcurrencyLimitLayer,
    timeout: TimeoutLayer,
    fallback: Option<Vec<String>>,
    telemetry: Option<GenAiTraceLayer>,
}

impl fmt::Debug for QwenClientBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QwenClientBuilder")
            .field("base", &self.base)
            .field("key", &self.key)
            .field("transport", &self.transport)
            .field("max_wait", &self.max_wait)
            .field("fallback", &self.fallback)
            .field("telemetry", &self.telemetry)
            .finish_non_exhaustive()
    }
}

impl Default for QwenClientBuilder {
    fn default() -> Self {
        Self {
            base: BaseUrl::region(Region::Singapore),
            key: None,
            keyless: false,
            workspace: None,
            transport: TransportConfig::new(),
            quotas: QuotaTable::qwen(),
            accounts: ByAccountModel::new(),
            max_wait: Duration::from_secs(30),
            default_output_tokens: crate::rate_limit::DEFAULT_OUTPUT_TOKENS,
            retry: RetryLayer::new(),
            breaker_failures: NonZeroU32::new(3).unwrap_or(NonZeroU32::MIN),
            concurrency: ConcurrencyLimitLayer::new(
                NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
            ),
            timeout: TimeoutLayer::new(),
            fallback: None,
            telemetry: None,
        }
    }
}

impl QwenClientBuilder {
    /// The region's host. Default is [`Region::Singapore`].
    pub fn region(mut self, region: Region) -> Self {
        self.base = BaseUrl::region(region);
        self
    }

    /// Any base URL (a gateway, the mock server). Default is the
    /// Singapore host.
    pub fn base_url(mut self, base: BaseUrl) -> Self {
        self.base = base;
        self
    }

    /// The API key. Default is `DASHSCOPE_API_KEY`, read by
    /// [`build`](Self::build) (which fails when it is unset).
    ///
    /// # Errors
    ///
    /// When the key cannot be an HTTP header (the error does not contain
    /// it).
    pub fn api_key(mut self, key: impl AsRef<str>) -> Result<Self, super::InvalidApiKey> {
        self.key = Some(ApiKey::new(key)?);
        Ok(self)
    }

    /// The API key, already validated. Default is `DASHSCOPE_API_KEY`.
    pub fn key(mut self, key: ApiKey) -> Self {
        self.key = Some(key);
        self.keyless = false;
        self
    }

    /// Sends no `Authorization` header and reads no `DASHSCOPE_API_KEY`:
    /// for a gateway in front that adds its own key, or requests that carry
    /// theirs. Default is off: a client without a key fails to build.
    pub fn without_key(mut self) -> Self {
        self.key = None;
        self.keyless = true;
        self
    }

    /// Sends `X-DashScope-WorkSpace`. Default is none.
    pub fn workspace(mut self, id: impl Into<String>) -> Self {
        self.workspace = Some(id.into());
        self
    }

    /// Pool and connection settings. Default is [`TransportConfig::new`].
    pub fn transport(mut self, transport: TransportConfig) -> Self {
        self.transport = transport;
        self
    }

    /// Quotas per model. Default is [`QuotaTable::qwen`], the published
    /// international defaults; set your account's real quotas here.
    pub fn quotas(mut self, table: QuotaTable) -> Self {
        self.quotas = table;
        self
    }

    /// The quota of one model (overrides the table's).
    pub fn quota(mut self, model: impl Into<String>, limits: Limits) -> Self {
        self.quotas = self.quotas.set(model.into(), limits);
        self
    }

    /// Which API keys belong to which account (quotas are per account).
    /// Default is every key its own account.
    pub fn accounts(mut self, accounts: ByAccountModel) -> Self {
        self.accounts = accounts;
        self
    }

    /// The longest a request waits for its rate-limit slot before failing
    /// with `RateLimited`. Default is 30 s.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Output tokens reserved for a request without `max_tokens`. Default
    /// is 1024.
    pub fn default_output_tokens(mut self, tokens: u32) -> Self {
        self.default_output_tokens = tokens;
        self
    }

    /// The retry layer. Default is [`RetryLayer::new`].
    pub fn retry(mut self, retry: RetryLayer) -> Self {
        self.retry = retry;
        self
    }

    /// Consecutive transient failures that open a model's circuit. Default
    /// is 3.
    pub fn breaker_failures(mut self, n: NonZeroU32) -> Self {
        self.breaker_failures = n;
        self
    }

    /// The concurrency limit. Default is a fixed 64;
    /// `ConcurrencyLimitLayer::adaptive(Aimd::new())` adapts it to 429s and
    /// failures.
    pub fn concurrency(mut self, layer: ConcurrencyLimitLayer) -> Self {
        self.concurrency = layer;
        self
    }

    /// The timeouts. Default is 60 s idle, 300 s total.
    pub fn timeout(mut self, layer: TimeoutLayer) -> Self {
        self.timeout = layer;
        self
    }

    /// Falls back along these models when one is throttled or its circuit
    /// is open (needs the `fallback` feature). Default is no fallback.
    #[cfg(feature = "fallback")]
    #[cfg_attr(docsrs, doc(cfg(feature = "fallback")))]
    pub fn fallback<I, M>(mut self, chain: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: Into<String>,
    {
        self.fallback = Some(chain.into_iter().map(Into::into).collect());
        self
    }

    /// Builds the client. Without a key set, `DASHSCOPE_API_KEY` is read.
    ///
    /// # Errors
    ///
    /// [`InvalidApiKey`](super::InvalidApiKey) when no key was set and
    /// `DASHSCOPE_API_KEY` is unset ([`is_not_set`](super::InvalidApiKey::is_not_set))
    /// or cannot be a header value, unless
    /// [`without_key`](Self::without_key) was called. The error never
    /// contains the key.
    pub fn build(self) -> Result<QwenClient, super::InvalidApiKey> {
        let http = self.transport.build();
        self.build_with(http)
    }

    /// Traces every call outermost (one span per logical call, retries and
    /// fallbacks inside it) with GenAI attributes, and with the `otel`
    /// feature records the GenAI metrics: see [`telemetry`](crate::telemetry).
    /// Default is none.
    pub fn telemetry(mut self, layer: GenAiTraceLayer) -> Self {
        self.telemetry = Some(layer);
        self
    }

    /// Builds the client around your own HTTP service instead of the
    /// [`TransportConfig`] one (a custom connector, a proxy, a counting or
    /// recording wrapper in tests). It receives absolute URIs with the
    /// `Authorization` header set; the transport settings of this builder
    /// are not used.
    ///
    /// # Errors
    ///
    /// As [`build`](Self::build): no key and no `DASHSCOPE_API_KEY`.
    pub fn build_with<T, RB>(self, http: T) -> Result<QwenClient, super::InvalidApiKey>
    where
        T: Service<Request<Body>, Response = Response<RB>> + Clone + Send + Sync + 'static,
        T::Error: Into<BoxError>,
        T::Future: Send + 'static,
        RB: http_body::Body<Data = Bytes> + Send + 'static,
        RB::Error: Into<BoxError>,
    {
        let http: Transport = BoxCloneSyncService::new(
            ServiceBuilder::new()
                .map_err(Into::into)
                .map_response(|res: Response<RB>| {
                    res.map(|b| BodyExt::map_err(b, Into::into).boxed_unsync())
                })
                .service(http),
        );
        let key = match self.key {
            Some(key) => Some(key),
            None if self.keyless => None,
            None => Some(ApiKey::from_env()?),
        };
        let mut upstream = SetUpstreamLayer::new(self.base, key);
        if let Some(ws) = &self.workspace {
            if let Ok(u) = upstream.clone().workspace(ws) {
                upstream = u;
            } else {
                tracing::warn!(target: "tower_qwen::client", "workspace id is not a valid header value; not sent");
            }
        }
        let rate = RateLimitLayer::qwen(self.quotas, self.accounts)
            .wait(self.max_wait)
            .default_output_tokens(self.default_output_tokens);
        let breaker = CircuitBreakerLayer::new()
            .consecutive_failures(self.breaker_failures)
            .keyed(ByModel, NonZeroUsize::new(256).unwrap_or(NonZeroUsize::MIN));
        let handles = Arc::new(Handles {
            limiter: rate.backend().clone(),
            breaker: breaker.handle(),
            concurrency: self.concurrency.handle(),
            retry: self.retry.stats(),
        });
        let stack = ServiceBuilder::new()
            .layer(self.retry)
            .layer(breaker)
            .layer(rate)
            .layer(self.concurrency)
            .layer(self.timeout)
            .layer(upstream)
            .service(http);
        let stack = ServiceBuilder::new()
            .map_response(|res: Response<_>| {
                res.map(|b| BodyExt::map_err(b, Into::into).boxed_unsync())
            })
            .service(stack);
        let mut inner = wrap_fallback(stack, self.fallback);
        if let Some(telemetry) = self.telemetry {
            inner = BoxCloneSyncService::new(
                ServiceBuilder::new()
                    .map_response(|res: Response<_>| res.map(BodyExt::boxed_unsync))
                    .layer(telemetry)
                    .service(inner),
            );
        }
        Ok(QwenClient { inner, handles })
    }
}

type Stack = BoxCloneSyncService<Request<Body>, Response<ResponseBody>, BoxError>;
type Transport = BoxCloneSyncService<Request<Body>, Response<ResponseBody>, BoxError>;

#[cfg(feature = "fallback")]
fn wrap_fallback<S>(stack: S, chain: Option<Vec<String>>) -> Stack
where
    S: Service<Request<Body>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    match chain {
        Some(chain) => {
            let svc = ServiceBuilder::new()
                .map_response(|res: Response<_>| res.map(BodyExt::boxed_unsync))
                .layer(crate::fallback::FallbackLayer::new(chain))
                .service(stack);
            BoxCloneSyncService::new(svc)
        }
        None => BoxCloneSyncService::new(stack),
    }
}

#[cfg(not(feature = "fallback"))]
fn wrap_fallback<S>(stack: S, _chain: Option<Vec<String>>) -> Stack
where
    S: Service<Request<Body>, Response = Response<ResponseBody>, Error = BoxError>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    BoxCloneSyncService::new(stack)
}
