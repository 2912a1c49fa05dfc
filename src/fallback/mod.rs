//! Model fallback: when one model's quota or circuit is spent, ask the next.
//!
//! Quotas belong to (account, model) pairs (QWEN-API.md A3), so when
//! `qwen-turbo` is throttled, `qwen-plus` on the same account usually still
//! has room. [`Fallback`] sends a request to its own model first; if the
//! answer is a throttle, an open circuit or an overloaded engine (after the
//! retries for that model are spent, when a retry layer sits inside), it
//! rewrites the request's `model` to the next one in the configured chain and
//! sends it again. It never falls back on a permanent error (a bad key or a
//! content-filter refusal would fail on every model alike).
//!
//! * The answer carries the model that produced it in a response header
//!   ([`MODEL_HEADER`], `x-qwen-model`) and in the `fallback` tracing span's
//!   `model` field.
//! * Only models in the chain fall back, and only to the models after them:
//!   with the chain `qwen-turbo → qwen-plus → qwen-max`, a `qwen-plus`
//!   request may go to `qwen-max`, never to `qwen-turbo`. A request for any
//!   other model passes through.
//! * The decision is made before the caller sees anything, with the same
//!   [peek](crate::retry::peek) the retry layer uses: an SSE stream whose
//!   error comes before its first frame with output (the compatible
//!   role-only chunk is held back) falls back; a stream already flowing
//!   does not.
//! * [`FallbackLayer::classifier`] takes any
//!   [`Classify`], like the circuit breaker: one
//!   taught your error type with `on_error` decides which of your errors
//!   move to the next model.
//! * The request body must be buffered ([`BufferedBody`]) and buildable from
//!   bytes (the crate's [`Body`](crate::body::Body), `Full<Bytes>`); the
//!   rewrite parses the JSON body only when a fallback happens.
//!
//! # With other layers
//!
//! Outermost: fallback → retry → circuit breaker → rate limit → concurrency
//! → timeout → client. While a later model can take the request, the
//! fallback marks it with [`FallbackAvailable`], and a local refusal moves it
//! to the next model at once: the rate limiter (keyed per model) refuses
//! instead of making the call wait, and the retry layer hands a local
//! throttle or an open circuit straight back instead of waiting it out and
//! spending its budget. Upstream throttles (429s) are still retried on the
//! same model first. The last model of the chain waits and retries as
//! usual.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use std::convert::Infallible;
//! use tower::{ServiceBuilder, ServiceExt};
//! use tower_qwen::body::Body;
//! use tower_qwen::fallback::{FallbackLayer, MODEL_HEADER};
//!
//! // qwen-turbo is throttled; qwen-plus answers.
//! let upstream = tower::service_fn(|req: http::Request<Body>| async move {
//!     let info = tower_qwen::request::RequestInfo::parse(req.uri().path(), req.headers(),
//!         tower_qwen::body::BufferedBody::buffered(req.body()).as_deref());
//!     let res = if info.model.as_deref() == Some("qwen-turbo") {
//!         http::Response::builder().status(429).body(String::from(
//!             r#"{"code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#))
//!     } else {
//!         http::Response::builder().header("content-type", "application/json")
//!             .body(String::from(r#"{"output":{"text":"hi"}}"#))
//!     };
//!     Ok::<_, Infallible>(res.unwrap())
//! });
//! let svc = ServiceBuilder::new()
//!     .layer(FallbackLayer::new(["qwen-turbo", "qwen-plus", "qwen-max"]))
//!     .service(upstream);
//! let req = http::Request::post("/api/v1/services/aigc/text-generation/generation")
//!     .body(Body::from(r#"{"model":"qwen-turbo","input":{"prompt":"Hi"}}"#))
//!     .unwrap();
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.status(), 200);
//! assert_eq!(res.headers()[MODEL_HEADER], "qwen-plus");
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Request, Response};
use tower_layer::Layer;
use tower_service::Service;
use tracing::Instrument;

use crate::body::BufferedBody;
use crate::classify::{Classifier, Classify, Early, Outcome, ThrottleCause};
use crate::request::RequestInfo;
use crate::retry::peek::{Peek, PeekBody};

/// The response header naming the model that answered.
pub const MODEL_HEADER: &str = "x-qwen-model";

/// Which outcomes move a request to the next model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FallbackOn {
    /// A throttle from upstream (RPM, TPM, burst guard, overloaded engine).
    pub throttled: bool,
    /// A local throttle: this crate's rate limiter or concurrency limit
    /// refused the request (nothing was sent).
    pub local: bool,
    /// An open circuit (`CircuitOpen`) for the model.
    pub circuit_open: bool,
    /// Any other transient failure (5xx, timeout, reset) that survived the
    /// retries.
    pub transient: bool,
}

impl Default for FallbackOn {
    /// Default is throttles (upstream and local) and open circuits, not
    /// other transient failures.
    fn default() -> Self {
        Self {
            throttled: true,
            local: true,
            circuit_open: true,
            transient: false,
        }
    }
}

/// A request extension [`Fallback`] sets while a later model of the chain
/// can still take the request, so that the layers inside hand a local
/// refusal back at once instead of sitting on it:
///
/// * this crate's rate limiter refuses a call that would have to wait
///   (as in reject mode) when local throttles fall back, so the request
///   moves to the next model now instead of after the limiter's maximum
///   wait;
/// * [`Retry`](crate::retry::Retry) does not retry a local throttle or an
///   open circuit that falls back (no wait, no retry budget spent).
///
/// It is removed for the last model of the chain, which waits and retries
/// as usual. You can set it yourself in front of your own fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FallbackAvailable {
    on: FallbackOn,
}

impl FallbackAvailable {
    /// Another model takes the request when any of `on` happens.
    pub const fn new(on: FallbackOn) -> Self {
        Self { on }
    }

    /// Whether a local throttle (this crate's rate limiter or concurrency
    /// limit refusing) moves the request to the next model.
    pub const fn takes_local_throttles(&self) -> bool {
        self.on.local
    }

    /// Whether an open circuit moves the request to the next model.
    pub const fn takes_open_circuits(&self) -> bool {
        self.on.circuit_open
    }

    /// Whether a local limit should refuse rather than wait: a later model
    /// takes local throttles.
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) fn refuse_rather_than_wait(ext: &http::Extensions) -> bool {
        ext.get::<Self>()
            .is_some_and(FallbackAvailable::takes_local_throttles)
    }

    /// Whether this failure goes to the next model at once: a local
    /// throttle or an open circuit the fallback takes.
    pub(crate) fn takes<E: 'static>(&self, outcome: &Outcome, err: &E) -> bool {
        (self.on.local && outcome.throttle_cause() == Some(ThrottleCause::Local))
            || (self.on.circuit_open && crate::classify::is_circuit_open(err))
    }
}

/// Counters of a [`FallbackLayer`], shared by every service it makes.
#[derive(Clone, Debug, Default)]
pub struct FallbackStats {
    inner: Arc<Counters>,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    fallbacks: AtomicU64,
    exhausted: AtomicU64,
}

impl FallbackStats {
    /// Requests seen.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// Times a request moved to the next model.
    pub fn fallbacks(&self) -> u64 {
        self.inner.fallbacks.load(Ordering::Relaxed)
    }

    /// Requests that failed on the last model of their chain.
    pub fn exhausted(&self) -> u64 {
        self.inner.exhausted.load(Ordering::Relaxed)
    }
}

/// Makes [`Fallback`] services. See the [module docs](self) for an example.
#[derive(Clone, Debug)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct FallbackLayer<C = Classifier> {
    chain: Arc<[Arc<str>]>,
    on: FallbackOn,
    classifier: C,
    stats: FallbackStats,
}

impl FallbackLayer {
    /// Falls back along `chain`, in order.
    pub fn new<I, M>(chain: I) -> Self
    where
        I: IntoIterator<Item = M>,
        M: AsRef<str>,
    {
        Self {
            chain: chain.into_iter().map(|m| Arc::from(m.as_ref())).collect(),
            on: FallbackOn::default(),
            classifier: Classifier::new(),
            stats: FallbackStats::default(),
        }
    }
}

impl<C> FallbackLayer<C> {
    /// Which outcomes fall back. Default is [`FallbackOn::default`].
    pub fn on(mut self, on: FallbackOn) -> Self {
        self.on = on;
        self
    }

    /// The classifier reading the answers and errors: any
    /// [`Classify`], like the circuit breaker's. A [`Classifier`] reads the
    /// start of each body ([peek](crate::retry::peek)); an
    /// [`FnClassifier`](crate::classify::FnClassifier) judges the response
    /// value alone. Teach it your own error type with `on_error` (a
    /// gRPC-style `Unavailable` transient, so it falls back when
    /// [`FallbackOn::transient`] is set; `NotFound` permanent, so it is
    /// handed back at once). Default is [`Classifier::new`].
    pub fn classifier<C2>(self, classifier: C2) -> FallbackLayer<C2> {
        FallbackLayer {
            chain: self.chain,
            on: self.on,
            classifier,
            stats: self.stats,
        }
    }

    /// The counters shared by every service this layer makes.
    pub fn stats(&self) -> FallbackStats {
        self.stats.clone()
    }
}

impl<S, C: Clone> Layer<S> for FallbackLayer<C> {
    type Service = Fallback<S, C>;

    fn layer(&self, inner: S) -> Fallback<S, C> {
        Fallback {
            inner,
            layer: self.clone(),
        }
    }
}

/// Falls back to the next model of a chain. See the [module docs](self).
///
/// # Clone
///
/// Clones share the chain and the counters. Each response future holds a
/// clone of the inner service (like tower's `Retry`), so the inner service
/// must be `Clone`.
#[derive(Clone, Debug)]
pub struct Fallback<S, C = Classifier> {
    inner: S,
    layer: FallbackLayer<C>,
}

impl<S, C> Fallback<S, C> {
    crate::util::macros::define_inner_service_accessors!();
}

impl<S, C, B, ResB> Service<Request<B>> for Fallback<S, C>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    C: Classify<Response<ResB>>,
    S::Future: Send + 'static,
    S::Error: fmt::Display + Send + 'static,
    B: BufferedBody + From<Bytes> + Send + 'static,
    ResB: http_body::Body + Unpin + Send + 'static,
    ResB::Data: Send,
    ResB::Error: Send,
{
    type Response = Response<PeekBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<Self::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        self.layer
            .stats
            .inner
            .requests
            .fetch_add(1, Ordering::Relaxed);
        let info = RequestInfo::of(&mut req);
        // The service polled ready is the one that takes the first attempt.
        let clone = self.inner.clone();
        let first = std::mem::replace(&mut self.inner, clone);
        let start = info
            .model
            .as_deref()
            .and_then(|m| self.layer.chain.iter().position(|c| &**c == m));
        let layer = self.layer.clone();
        let model = info.model.clone();
        let span = tracing::info_span!(
            target: "tower_qwen::fallback",
            "fallback",
            model = model.as_deref().unwrap_or(""),
        );
        let fut = async move {
            let Some(start) = start else {
                // Not in the chain: pass through, with the header set.
                let mut first = first;
                let mut res = first.call(req).await?.map(PeekBody::new);
                set_model(&mut res, model.as_deref());
                return Ok(res);
            };
            let mut svc = first;
            let mut index = start;
            loop {
                let is_last = index + 1 >= layer.chain.len();
                let retry_copy = if is_last {
                    None
                } else {
                    req.body().try_clone()
                };
                let parts_copy = retry_copy.is_some().then(|| {
                    (
                        req.method().clone(),
                        req.uri().clone(),
                        req.headers().clone(),
                    )
                });
                if is_last {
                    req.extensions_mut().remove::<FallbackAvailable>();
                } else {
                    req.extensions_mut()
                        .insert(FallbackAvailable::new(layer.on));
                }
                let model = layer.chain[index].clone();
                tracing::Span::current().record("model", &*model);
                let answer = svc.call(req).await;
                let outcome = match &answer {
                    Ok(_) => None,
                    Err(e) => Some(layer.classifier.classify_error(e)),
                };
                let (answer, outcome) = match answer {
                    Ok(res) => match layer.classifier.early(&res) {
                        Early::Peek(c) => {
                            let peeked = Peek::new(res, &c).await;
                            (Ok(peeked.response), peeked.outcome)
                        }
                        Early::Known(outcome) => (Ok(res.map(PeekBody::new)), outcome),
                    },
                    Err(e) => (Err(e), outcome.unwrap_or(Outcome::TRANSIENT)),
                };
                let falls = layer.falls_back(&outcome, answer.as_ref().err());
                match (falls, retry_copy, parts_copy) {
                    (true, Some(body), Some((method, uri, headers))) => {
                        let next = layer.chain[index + 1].clone();
                        tracing::warn!(
                            target: "tower_qwen::fallback",
                            from = &*model,
                            to = &*next,
                            %outcome,
                            "falling back to the next model"
                        );
                        layer.stats.inner.fallbacks.fetch_add(1, Ordering::Relaxed);
                        req = rebuild(method, uri, headers, body, &next);
                        index += 1;
                        svc = svc.clone();
                        std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
                    }
                    _ => {
                        if falls {
                            layer.stats.inner.exhausted.fetch_add(1, Ordering::Relaxed);
                        }
                        return answer.map(|mut res| {
                            set_model(&mut res, Some(&model));
                            res
                        });
                    }
                }
            }
        };
        ResponseFuture {
            inner: Box::pin(fut.instrument(span)),
        }
    }
}

impl<C> FallbackLayer<C> {
    fn falls_back<E: fmt::Display + 'static>(&self, outcome: &Outcome, err: Option<&E>) -> bool {
        if err.is_some_and(|e| crate::classify::is_circuit_open(e)) {
            return self.on.circuit_open;
        }
        match outcome {
            Outcome::Throttled {
                cause: ThrottleCause::Local,
                ..
            } => self.on.local,
            Outcome::Throttled { .. } => self.on.throttled,
            Outcome::Transient { .. } => self.on.transient,
            _ => false,
        }
    }
}

fn set_model<B>(res: &mut Response<B>, model: Option<&str>) {
    if let Some(v) = model.and_then(|m| HeaderValue::from_str(m).ok()) {
        res.headers_mut().insert(MODEL_HEADER, v);
    }
}

/// The request again, with `model` replaced in its JSON body. A body that
/// is not a JSON object is sent unchanged (the upstream will say what is
/// wrong with it).
fn rebuild<B: BufferedBody + From<Bytes>>(
    method: http::Method,
    uri: http::Uri,
    headers: http::HeaderMap,
    body: B,
    model: &str,
) -> Request<B> {
    let bytes = body.buffered().unwrap_or_default();
    let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(mut map)) => {
            map.insert("model".into(), model.into());
            serde_json::to_vec(&map)
                .map(|v| B::from(Bytes::from(v)))
                .unwrap_or(body)
        }
        _ => body,
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    req.headers_mut().remove(http::header::CONTENT_LENGTH);
    req
}

/// The future of [`Fallback`]. It is boxed: a fallback chain is an `async`
/// sequence of attempts, and one allocation per request is small next to an
/// LLM call.
#[must_use = "futures do nothing unless you `.await` or poll them"]
pub struct ResponseFuture<R, E> {
    inner: Pin<Box<dyn Future<Output = Result<R, E>> + Send>>,
}

impl<R, E> fmt::Debug for ResponseFuture<R, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<R, E> Future for ResponseFuture<R, E> {
    type Output = Result<R, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}
