//! The request path: the handler (path allow-list, authentication, the
//! client key's stack, the answer), hop-by-hop header stripping, and the
//! answer's body on its way to the client. What happens between (buckets,
//! body, degradation, accounts) is the stack of [`super::stack`].

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Uri};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;
use tower::ServiceExt;

use crate::BoxError;
use crate::circuit_breaker::error::CircuitOpen;
use crate::circuit_breaker::{BreakerHandle, State as BreakerState};
use crate::pool::Pinned;
use crate::pool::error::Exhausted;
use crate::rate_limit::error::{BudgetExceeded, RateLimited};
use crate::request::{Endpoint, Protocol, RequestInfo};
use crate::time;
use crate::timeout::error::{DeadlineExceeded, HeaderTimeout, IdleTimeout};

use super::Live;
use super::auth::{AuthFailures, KeyDigest, bearer, digest_of};
use super::error::{Failed, LimitsUnavailable, Refused, UpstreamBusy};
use super::metrics::{KeyGauges, KeyIdx, Metrics, route_label};
use super::respond::{Refusal, ceil_secs, refuse_saying, sse_error_event};
use super::stack::{ClientName, KeySvc, Limiter};

/// A configured client key.
pub(crate) struct ClientKey {
    /// Its metrics series id ([`Metrics::key_series`]).
    pub(crate) idx: u32,
    /// Whether it has its own `/metrics` series (then its bucket level and
    /// degraded gauges are shown).
    pub(crate) own_series: bool,
    pub(crate) name: Arc<str>,
    pub(crate) id: String,
    /// Its bucket's capacity (what a bucket never used has).
    pub(crate) capacity: u32,
    /// The first account of its pool: where task polls and async
    /// submissions go.
    pub(crate) pin_to: Arc<str>,
    pub(crate) svc: KeySvc,
    /// Its stack for the Files and Batch APIs.
    pub(crate) files: KeySvc,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("name", &self.name)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Everything the handlers share.
pub(crate) struct Inner {
    pub(crate) max_header_bytes: usize,
    pub(crate) degrade_rate: u32,
    pub(crate) keys: HashMap<KeyDigest, Arc<ClientKey>>,
    pub(crate) clients: Vec<Arc<ClientKey>>,
    /// The client keys' buckets (for `x-ratelimit-*` and `/metrics`).
    pub(crate) buckets: Limiter<Arc<str>>,
    /// The client keys' token budgets (for `x-ratelimit-*-tokens`).
    pub(crate) budgets: super::stack::Budgets,
    /// The degrade breaker's circuits, by client key.
    pub(crate) breaker: BreakerHandle<Arc<str>>,
    pub(crate) metrics: Arc<Metrics>,
    /// Failed authentications per client address (`None`: no limit).
    pub(crate) auth_failures: Option<AuthFailures>,
    /// Every Redis limiter (to probe Redis).
    #[cfg(feature = "redis")]
    pub(crate) redis: Vec<super::stack::RedisProbe>,
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inner")
            .field("clients", &self.clients)
            .field("buckets", &self.buckets)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn refuse(
        &self,
        key: KeyIdx,
        route: &'static str,
        protocol: Protocol,
        refusal: Refusal,
        retry_after: Option<Duration>,
        extra: Option<HeaderMap>,
    ) -> Response {
        self.refuse_saying(key, route, protocol, refusal, None, retry_after, extra)
    }

    /// Answers a refusal itself, in `protocol`'s shape, and counts it.
    #[allow(clippy::too_many_arguments)]
    fn refuse_saying(
        &self,
        key: KeyIdx,
        route: &'static str,
        protocol: Protocol,
        refusal: Refusal,
        message: Option<&str>,
        retry_after: Option<Duration>,
        extra: Option<HeaderMap>,
    ) -> Response {
        self.metrics.refusal(key, refusal);
        self.metrics.request(key, route, refusal.status().as_u16());
        refuse_saying(protocol, refusal, message, retry_after, extra)
    }

    /// `x-ratelimit-limit/remaining/reset` of a client key's bucket (reset:
    /// whole seconds until the bucket is full, rounded up).
    fn write_bucket_headers(&self, client: &ClientKey, headers: &mut HeaderMap) {
        let (limit, remaining, reset) = match self.buckets.snapshot(&client.name) {
            Some(s) => match s.requests {
                Some(d) => (
                    d.limit,
                    d.remaining,
                    d.reset.as_secs() + u64::from(d.reset.subsec_nanos() > 0),
                ),
                None => return,
            },
            // No state: a full bucket.
            None => (client.capacity, u64::from(client.capacity), 0),
        };
        headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(remaining));
        headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
    }

    /// `x-ratelimit-{limit,remaining,reset}-tokens` of a client key's
    /// tokens: its budget's window with the least room left, or its tokens
    /// per minute, whichever has less (none when it has neither). The
    /// call being answered has its estimate reserved until its body ends.
    fn write_token_headers(&self, client: &ClientKey, headers: &mut HeaderMap) {
        let tpm = self
            .buckets
            .snapshot(&client.name)
            .and_then(|s| s.tokens)
            .map(|d| (u64::from(d.limit), d.remaining, d.reset));
        let budget = self
            .budgets
            .tightest(&client.name)
            .map(|t| (t.limit, t.remaining, t.reset));
        let shown = match (tpm, budget) {
            (Some(t), Some(b)) => Some(if b.1 < t.1 { b } else { t }),
            (t, b) => t.or(b),
        };
        let Some((limit, remaining, reset)) = shown else {
            return;
        };
        let reset = reset.as_secs() + u64::from(reset.subsec_nanos() > 0);
        headers.insert("x-ratelimit-limit-tokens", HeaderValue::from(limit));
        headers.insert("x-ratelimit-remaining-tokens", HeaderValue::from(remaining));
        headers.insert("x-ratelimit-reset-tokens", HeaderValue::from(reset));
    }

    pub(crate) fn is_degraded(&self, client: &ClientKey) -> bool {
        self.breaker.state_of(&client.name) == Some(BreakerState::Degraded)
    }
}

/// The endpoint of a path the gateway forwards, or `None`: only these
/// paths ever leave, byte for byte as received, so that no upstream can
/// read them as another path (the router matches raw paths; an upstream
/// behind a proxy normalises `..`, `%2e%2e`, `%2f` and `\`):
///
/// - `/api/v1/services/<seg>/<seg>[/<seg>[/<seg>]]`, DashScope's
///   `services/{task_group}/{task}/{function}` shape, for native endpoints;
/// - `/compatible-mode/v1/chat/completions`, `/compatible-mode/v1/embeddings`;
/// - `/api/v1/tasks`, `/api/v1/tasks/<seg>`, `/api/v1/tasks/<seg>/cancel`;
/// - `/compatible-mode/v1/files`, `/compatible-mode/v1/files/<seg>`,
///   `/compatible-mode/v1/files/<seg>/content`;
/// - `/compatible-mode/v1/batches`, `/compatible-mode/v1/batches/<seg>`,
///   `/compatible-mode/v1/batches/<seg>/cancel`;
///
/// where a segment is one or more ASCII letters, digits, `-` or `_`: no
/// dot segments, no percent-encoding, no empty segments, no backslashes.
pub(crate) fn forwarded_endpoint(path: &str) -> Option<Endpoint> {
    fn segment(s: &str) -> bool {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }
    if let Some(rest) = path.strip_prefix("/api/v1/services/") {
        let n = rest.split('/').count();
        if !(2..=4).contains(&n) || !rest.split('/').all(segment) {
            return None;
        }
        let endpoint = Endpoint::from_path(path);
        // `.../chat/completions` under the native prefix is no DashScope
        // endpoint; reading it as compatible would mislabel it.
        return (endpoint.protocol() == Protocol::Native).then_some(endpoint);
    }
    match path {
        "/compatible-mode/v1/chat/completions" => return Some(Endpoint::CompatibleChat),
        "/compatible-mode/v1/embeddings" => return Some(Endpoint::CompatibleEmbedding),
        "/api/v1/tasks" => return Some(Endpoint::Task),
        "/compatible-mode/v1/files" => return Some(Endpoint::Files),
        "/compatible-mode/v1/batches" => return Some(Endpoint::Batches),
        _ => {}
    }
    // An id, with the one action each collection has on it.
    let (endpoint, rest, action) = [
        (Endpoint::Task, "/api/v1/tasks/", "/cancel"),
        (Endpoint::Files, "/compatible-mode/v1/files/", "/content"),
        (Endpoint::Batches, "/compatible-mode/v1/batches/", "/cancel"),
    ]
    .into_iter()
    .find_map(|(e, prefix, action)| Some((e, path.strip_prefix(prefix)?, action)))?;
    let id = rest.strip_suffix(action).unwrap_or(rest);
    segment(id).then_some(endpoint)
}

/// The dialect a path suggests, for refusals of paths not served.
fn protocol_of_path(path: &str) -> Protocol {
    if path.starts_with("/compatible-mode/") {
        Protocol::Compatible
    } else {
        Protocol::Native
    }
}

/// The headers never forwarded in either direction (RFC 9110 7.6.1), plus
/// `proxy-connection`.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Request headers the gateway replaces or drops on top of the hop-by-hop
/// ones: the client's key and host, the length (recomputed), compression
/// (the gateway reads error frames and usage in the answer), `expect`
/// (answered here), and the workspace (the account's).
const REQUEST_DROPPED: [&str; 6] = [
    "host",
    "authorization",
    "content-length",
    "accept-encoding",
    "expect",
    "x-dashscope-workspace",
];

fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// The client's headers as sent upstream.
pub(crate) fn forward_request_headers(from: &HeaderMap) -> HeaderMap {
    let listed = if from.contains_key(header::CONNECTION) {
        connection_listed(from)
    } else {
        Vec::new()
    };
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        let n = name.as_str();
        if HOP_BY_HOP.contains(&n) || REQUEST_DROPPED.contains(&n) || listed.contains(name) {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// Removes the hop-by-hop headers of an upstream answer.
pub(crate) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        for n in connection_listed(headers) {
            headers.remove(n);
        }
    }
    for n in HOP_BY_HOP {
        headers.remove(n);
    }
}

/// The most header fields a request may carry. Most HTTP servers refuse a
/// head of more than about 100 fields (hyper's default, the gateway's own
/// listener included); the gateway sets up to four on the way out
/// (`authorization`, `host`, `content-length`, `x-dashscope-workspace`), so
/// a request it forwards stays within 100 and is never refused upstream
/// for its head with an answer out of DashScope's shape.
pub(crate) const MAX_HEADERS: usize = 96;

fn header_bytes(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
}

fn is_async(headers: &HeaderMap) -> bool {
    headers
        .get("x-dashscope-async")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"enable"))
}

/// The handler of every proxied route.
pub(crate) async fn proxy(State(live): State<Arc<Live>>, req: Request) -> Response {
    let Some(endpoint) = forwarded_endpoint(req.uri().path()) else {
        tracing::debug!("refused: path not on the allow-list");
        return not_found(State(live), req).await;
    };
    // The configuration this request is served under, to its end (a
    // reload meanwhile serves the next requests).
    let gw = live.load();
    let protocol = endpoint.protocol();
    let route = route_label(Some(endpoint));

    // The client's address, when the server provides it (`Gateway::serve`
    // does; so does axum's `into_make_service_with_connect_info`).
    let peer = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip());
    let failures = gw.auth_failures.as_ref().zip(peer);
    if let Some((failures, ip)) = failures
        && let Some(wait) = failures.blocked(ip)
    {
        tracing::debug!(
            route,
            "refused: too many failed authentications from this address"
        );
        return gw.refuse(
            None,
            route,
            protocol,
            Refusal::AuthThrottled,
            Some(wait),
            None,
        );
    }
    if header_bytes(req.headers()) > gw.max_header_bytes || req.headers().len() > MAX_HEADERS {
        return gw.refuse(None, route, protocol, Refusal::HeadersTooLarge, None, None);
    }
    let Some(client) = bearer(req.headers()).and_then(|t| gw.keys.get(&digest_of(t))) else {
        tracing::debug!(route, "refused: missing or unknown client key");
        if let Some((failures, ip)) = failures {
            let tracked = failures.failed(ip);
            gw.metrics.auth_peers.set(tracked as f64);
        }
        return gw.refuse(None, route, protocol, Refusal::Unauthorized, None, None);
    };
    let client = client.clone();

    // The request as it goes on: the path exactly as received (the
    // account's service resolves it against the configured base URL, and
    // only against it: never an absolute URI from the client), the
    // forwarded headers, and the client key.
    let (parts, body) = req.into_parts();
    let pq = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let mut up = http::Request::new(body);
    *up.method_mut() = parts.method;
    *up.uri_mut() = Uri::from(pq);
    *up.headers_mut() = forward_request_headers(&parts.headers);
    let ext = up.extensions_mut();
    ext.insert(ClientName(client.name.clone()));
    let files = matches!(endpoint, Endpoint::Files | Endpoint::Batches);
    if files || endpoint == Endpoint::Task || is_async(&parts.headers) {
        // A task, a file or a batch lives in the account that created it.
        ext.insert(Pinned::to(&*client.pin_to));
    }
    let svc = if files { &client.files } else { &client.svc };

    let t0 = time::now();
    gw.metrics.in_flight.increment(1.0);
    let guard = InFlight(gw.clone());
    match svc.clone().oneshot(up).await {
        Ok(res) => {
            let key = Some(client.idx);
            gw.metrics.upstream_latency(route, t0.elapsed());
            let (mut parts, body) = res.into_parts();
            let info = parts.extensions.remove::<Arc<RequestInfo>>();
            let model = info.as_ref().and_then(|i| i.model.clone());
            strip_hop_by_hop(&mut parts.headers);
            gw.write_bucket_headers(&client, &mut parts.headers);
            gw.write_token_headers(&client, &mut parts.headers);
            let status = parts.status.as_u16();
            gw.metrics.request(key, route, status);
            if parts.status.is_server_error() {
                tracing::warn!(
                    key = %client.id,
                    key_name = %client.name,
                    route,
                    model = model.as_deref().unwrap_or(""),
                    status,
                    request_id = parts.headers.get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or(""),
                    "upstream call failed: the upstream answered a server error"
                );
            }
            tracing::debug!(
                key = %client.id,
                key_name = %client.name,
                route,
                model = model.as_deref().unwrap_or(""),
                stream = info.as_ref().is_some_and(|i| i.stream),
                status,
                latency_us = t0.elapsed().as_micros() as u64,
                "proxied"
            );
            let sse = crate::classify::is_event_stream(&parts.headers).then_some(protocol);
            let body = GatewayBody {
                inner: body,
                guard: Some(guard),
                done: false,
                sse,
                newlines: 2,
                who: Some(Box::new(Who {
                    client: client.clone(),
                    route,
                    model,
                })),
            };
            Response::from_parts(parts, axum::body::Body::new(body))
        }
        Err(e) => {
            drop(guard);
            refused(&gw, &client, route, protocol, e)
        }
    }
}

/// The answer to an error of a client key's stack.
fn refused(
    gw: &Inner,
    client: &ClientKey,
    route: &'static str,
    protocol: Protocol,
    e: BoxError,
) -> Response {
    let key = Some(client.idx);
    // Errors after the body was read carry what it said.
    let (model, e): (_, Arc<dyn std::error::Error + Send + Sync>) = match e.downcast::<Failed>() {
        Ok(f) => (f.info.model.clone(), f.source),
        Err(e) => (None, Arc::from(e)),
    };
    let model = model.as_deref().unwrap_or("");
    if let Some(r) = e.downcast_ref::<Refused>() {
        tracing::debug!(key = %client.id, key_name = %client.name, route, reason = r.refusal.label(), "refused: the request");
        let message = r.message.as_deref();
        return gw.refuse_saying(key, route, protocol, r.refusal, message, None, None);
    }
    if let Some(over) = e.downcast_ref::<BudgetExceeded>() {
        let reset = over.retry_after().unwrap_or_default();
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit-tokens", HeaderValue::from(over.limit()));
        h.insert(
            "x-ratelimit-remaining-tokens",
            HeaderValue::from(over.remaining()),
        );
        h.insert(
            "x-ratelimit-reset-tokens",
            HeaderValue::from(ceil_secs(reset)),
        );
        let (which, when) = if over.is_monthly() {
            ("Monthly", "on the 1st of next month at 00:00 UTC")
        } else {
            ("Daily", "at 00:00 UTC")
        };
        let message = format!(
            "{which} token budget exhausted for this gateway key: {} of {} tokens left, fewer than this request may use; it resets {when}.",
            over.remaining(),
            over.limit()
        );
        tracing::debug!(key = %client.id, key_name = %client.name, route, period = over.period().as_str(), "refused: client key token budget exhausted");
        return gw.refuse_saying(
            key,
            route,
            protocol,
            Refusal::KeyBudget,
            Some(&message),
            Some(reset),
            Some(h),
        );
    }
    if let Some(limited) = e.downcast_ref::<RateLimited>() {
        let mut h = HeaderMap::new();
        if limited.is_tokens() {
            if let Some(s) = gw.buckets.snapshot(&client.name) {
                s.write_headers(&mut h);
            }
            tracing::debug!(key = %client.id, key_name = %client.name, route, "refused: client key tokens per minute spent");
            return gw.refuse(
                key,
                route,
                protocol,
                Refusal::KeyTokens,
                limited.retry_after(),
                Some(h),
            );
        }
        gw.write_bucket_headers(client, &mut h);
        tracing::debug!(key = %client.id, key_name = %client.name, route, "refused: client key bucket empty");
        return gw.refuse(
            key,
            route,
            protocol,
            Refusal::KeyRateLimited,
            limited.retry_after(),
            Some(h),
        );
    }
    if let Some(open) = e.downcast_ref::<CircuitOpen>() {
        let wait = open
            .retry_after()
            .unwrap_or(Duration::from_secs(1) / gw.degrade_rate.max(1));
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-limit", HeaderValue::from(gw.degrade_rate));
        h.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
        h.insert("x-ratelimit-reset", HeaderValue::from(ceil_secs(wait)));
        tracing::debug!(key = %client.id, key_name = %client.name, route, "refused: client key degraded");
        return gw.refuse(key, route, protocol, Refusal::Degraded, Some(wait), Some(h));
    }
    if let Some(busy) = e.downcast_ref::<UpstreamBusy>() {
        let refusal = if busy.tokens {
            Refusal::UpstreamTokens
        } else {
            Refusal::UpstreamRequests
        };
        tracing::debug!(
            key = %client.id,
            key_name = %client.name,
            route,
            model,
            retry_after_ms = busy.retry_after.as_millis() as u64,
            "refused: upstream budget exhausted"
        );
        return gw.refuse(
            key,
            route,
            protocol,
            refusal,
            Some(busy.retry_after),
            Some(busy.headers.clone()),
        );
    }
    if let Some(x) = e.downcast_ref::<Exhausted>() {
        return gw.refuse(
            key,
            route,
            protocol,
            Refusal::UpstreamRequests,
            Some(x.retry_after().unwrap_or(Duration::from_secs(1))),
            None,
        );
    }
    let store = e
        .downcast_ref::<LimitsUnavailable>()
        .map(|u| u.retry_after)
        .or_else(|| store_unavailable(&*e));
    if let Some(wait) = store {
        tracing::warn!(key = %client.id, key_name = %client.name, route, "refused: the shared rate limits are unavailable (fail-closed)");
        return gw.refuse(
            key,
            route,
            protocol,
            Refusal::LimitsUnavailable,
            Some(wait),
            None,
        );
    }
    let timed_out = e.is::<HeaderTimeout>() || e.is::<DeadlineExceeded>();
    tracing::warn!(
        key = %client.id,
        key_name = %client.name,
        route,
        model,
        error = %e,
        "upstream call failed"
    );
    let refusal = if timed_out {
        Refusal::UpstreamTimeout
    } else {
        Refusal::UpstreamUnreachable
    };
    gw.refuse(key, route, protocol, refusal, None, None)
}

/// The wait of a Redis limiter that failed closed.
#[cfg(feature = "redis")]
fn store_unavailable(e: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    e.downcast_ref::<crate::redis::error::StoreUnavailable>()
        .map(|u| u.retry_after().unwrap_or(Duration::from_secs(1)))
}

#[cfg(not(feature = "redis"))]
fn store_unavailable(_: &(dyn std::error::Error + 'static)) -> Option<Duration> {
    None
}

/// Keeps the in-flight gauge up until the response (body) is over.
struct InFlight(Arc<Inner>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.in_flight.decrement(1.0);
    }
}

/// Whose answer a body is, for its failure's log line.
struct Who {
    client: Arc<ClientKey>,
    route: &'static str,
    model: Option<Arc<str>>,
}

pin_project! {
    /// The answer's body on its way to the client: passes frames through as
    /// they come; notes a client that went away before the end (dropping
    /// this body drops the upstream body, which cancels the upstream
    /// request). When the upstream stream fails mid-way (reset, idle or
    /// total timeout), an SSE answer gets a final error event in its
    /// dialect before it ends, and the failure is logged.
    struct GatewayBody<B> {
        #[pin]
        inner: B,
        guard: Option<InFlight>,
        done: bool,
        // The dialect of an SSE answer.
        sse: Option<Protocol>,
        // How many newlines end what has passed (2: an event boundary).
        newlines: u8,
        who: Option<Box<Who>>,
    }

    impl<B> PinnedDrop for GatewayBody<B> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if !*this.done
                && let Some(g) = this.guard.as_ref()
            {
                g.0.metrics.cancelled.increment(1);
                tracing::debug!("client went away before the end of the answer; upstream request cancelled");
            }
        }
    }
}

impl<B> GatewayBody<B> {
    /// The final event for a stream the upstream broke off: after a blank
    /// line if the stream stopped inside an event.
    fn error_event(protocol: Protocol, newlines: u8, timed_out: bool) -> Bytes {
        let (refusal, message) = if timed_out {
            (
                Refusal::UpstreamTimeout,
                "The upstream stream stalled past the gateway's timeout; the answer is incomplete.",
            )
        } else {
            (
                Refusal::UpstreamUnreachable,
                "The upstream stream broke off; the answer is incomplete.",
            )
        };
        let mut out = "\n".repeat(usize::from(2u8.saturating_sub(newlines)));
        out.push_str(&sse_error_event(protocol, refusal, message));
        Bytes::from(out)
    }
}

/// How many newlines end `data`, given `before` ended what came before
/// (carriage returns are part of line ends; at most 2 count).
fn trailing_newlines(before: u8, data: &[u8]) -> u8 {
    let mut n = 0u8;
    for &b in data.iter().rev() {
        match b {
            b'\n' => n += 1,
            b'\r' => {}
            _ => return n.min(2),
        }
        if n >= 2 {
            return 2;
        }
    }
    (before + n).min(2)
}

/// Whether an error (or one in its chain) is a timeout of the upstream
/// call.
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if e.is::<IdleTimeout>() || e.is::<DeadlineExceeded>() || e.is::<HeaderTimeout>() {
            return true;
        }
        cur = e.source();
    }
    false
}

impl<B> http_body::Body for GatewayBody<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        if *this.done && this.sse.is_some() {
            // Ended by the gateway's error event.
            return Poll::Ready(None);
        }
        let r = this.inner.as_mut().poll_frame(cx);
        // The server may stop polling once a sized body has all its bytes:
        // the end is then known from the body, not from a final `None`.
        let ended = match &r {
            Poll::Ready(None | Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            *this.done = true;
            this.guard.take();
        }
        match r {
            Poll::Ready(Some(Ok(frame))) => {
                if this.sse.is_some()
                    && let Some(data) = frame.data_ref()
                {
                    *this.newlines = trailing_newlines(*this.newlines, data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let timed_out = is_timeout(&*e);
                if let Some(who) = this.who.as_deref() {
                    tracing::warn!(
                        key = %who.client.id,
                        key_name = %who.client.name,
                        route = who.route,
                        model = who.model.as_deref().unwrap_or(""),
                        error = %e,
                        timed_out,
                        "upstream call failed mid-answer; the answer is cut"
                    );
                }
                match *this.sse {
                    Some(protocol) => {
                        let event = Self::error_event(protocol, *this.newlines, timed_out);
                        Poll::Ready(Some(Ok(Frame::data(event))))
                    }
                    None => Poll::Ready(Some(Err(e))),
                }
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        (self.done && self.sse.is_some()) || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `GET /healthz`.
pub(crate) async fn healthz() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        r#"{"status":"ok"}"#,
    )
        .into_response()
}

/// `GET /metrics`.
pub(crate) async fn metrics(State(live): State<Arc<Live>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        live.load().render_metrics(),
    )
        .into_response()
}

impl Inner {
    /// The Prometheus text of `/metrics`: the degraded-keys count and the
    /// per-key gauges read now, from this configuration's keys (a key a
    /// reload removed has none).
    pub(crate) fn render_metrics(&self) -> String {
        let mut degraded = 0u32;
        let mut gauges = Vec::new();
        for c in &self.clients {
            let d = self.is_degraded(c);
            degraded += u32::from(d);
            // Levels only for the keys with their own series.
            if !c.own_series {
                continue;
            }
            let bucket = match self.buckets.snapshot(&c.name) {
                Some(s) => s
                    .requests
                    .map_or(f64::from(u32::MAX), |r| r.remaining as f64),
                None => f64::from(c.capacity),
            };
            gauges.push(KeyGauges {
                name: &c.name,
                bucket,
                degraded: d,
            });
        }
        self.metrics.degraded_keys.set(f64::from(degraded));
        self.metrics.render(&gauges)
    }
}

/// Any other path: 404 in the dialect the path suggests.
pub(crate) async fn not_found(State(live): State<Arc<Live>>, req: Request) -> Response {
    let gw = live.load();
    let protocol = protocol_of_path(req.uri().path());
    gw.refuse(
        None,
        route_label(None),
        protocol,
        Refusal::NotFound,
        None,
        None,
    )
}

/// A served path with a method it does not take: 405 in the dialect of
/// the path, with `Allow`.
pub(crate) async fn method_not_allowed(State(live): State<Arc<Live>>, req: Request) -> Response {
    let gw = live.load();
    let path = req.uri().path();
    let endpoint = forwarded_endpoint(path);
    let allow = match endpoint {
        Some(Endpoint::Files | Endpoint::Batches)
            if matches!(
                path,
                "/compatible-mode/v1/files" | "/compatible-mode/v1/batches"
            ) =>
        {
            "GET, HEAD, POST"
        }
        Some(Endpoint::Batches) if path.ends_with("/cancel") => "POST",
        Some(Endpoint::Files) if !path.ends_with("/content") => "GET, HEAD, DELETE",
        Some(Endpoint::Files | Endpoint::Batches) => "GET, HEAD",
        _ if matches!(path, "/healthz" | "/metrics" | "/api/v1/tasks")
            || (path.starts_with("/api/v1/tasks/") && !path.ends_with("/cancel")) =>
        {
            "GET, HEAD"
        }
        _ => "POST",
    };
    let route = route_label(endpoint);
    let mut h = HeaderMap::new();
    h.insert(header::ALLOW, HeaderValue::from_static(allow));
    gw.refuse(
        None,
        route,
        protocol_of_path(path),
        Refusal::MethodNotAllowed,
        None,
        Some(h),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_forwarded_and_stripped() {
        let mut h = HeaderMap::new();
        for (n, v) in [
            ("authorization", "Bearer gw-secret"),
            ("host", "gateway.local"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("content-length", "12"),
            ("accept-encoding", "gzip"),
            ("content-type", "application/json"),
            ("x-dashscope-sse", "enable"),
            ("x-dashscope-workspace", "ws-client"),
            ("user-agent", "openai-python"),
        ] {
            h.append(n, v.parse().unwrap());
        }
        h.append("x-multi", "a".parse().unwrap());
        h.append("x-multi", "b".parse().unwrap());
        let out = forward_request_headers(&h);
        let names: Vec<&str> = out.keys().map(|n| n.as_str()).collect();
        assert_eq!(
            names,
            ["content-type", "x-dashscope-sse", "user-agent", "x-multi"]
        );
        assert_eq!(out.get_all("x-multi").iter().count(), 2);

        let mut res = HeaderMap::new();
        for (n, v) in [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("content-type", "text/event-stream"),
            ("x-request-id", "abc"),
            ("upgrade", "h2c"),
        ] {
            res.append(n, v.parse().unwrap());
        }
        strip_hop_by_hop(&mut res);
        let names: Vec<&str> = res.keys().map(|n| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-request-id"]);
    }
}
