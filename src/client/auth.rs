use std::fmt;
use std::hash::{Hash, Hasher};
use std::task::{Context, Poll};

use http::{HeaderValue, Request};
use tower_layer::Layer;
use tower_service::Service;

use super::endpoint::BaseUrl;

/// A DashScope API key. It never appears in `Debug`, `Display`, logs or
/// errors: only a short, non-reversible [`ApiKey::redacted_id`] does.
///
/// # Example
///
/// ```
/// use tower_qwen::client::ApiKey;
/// let key = ApiKey::new("sk-0123456789abcdef").unwrap();
/// let shown = format!("{key:?} {key}");
/// assert!(!shown.contains("0123456789abcdef"));
/// assert!(ApiKey::new("bad\nkey").is_err());
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey {
    header: HeaderValue,
    id: u64,
}

impl ApiKey {
    /// Wraps a key.
    ///
    /// # Errors
    ///
    /// [`InvalidApiKey`] when the key is empty or has characters an HTTP
    /// header cannot carry. The error does not contain the key.
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidApiKey> {
        let key = key.as_ref().trim();
        if key.is_empty() {
            return Err(InvalidApiKey(Why::Empty));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidApiKey(Why::Characters));
        }
        let mut header = HeaderValue::try_from(format!("Bearer {key}"))
            .map_err(|_| InvalidApiKey(Why::Characters))?;
        header.set_sensitive(true);
        Ok(Self {
            header,
            id: stable_hash(key.as_bytes()),
        })
    }

    /// Reads `DASHSCOPE_API_KEY`.
    ///
    /// # Errors
    ///
    /// [`InvalidApiKey`] when the variable is unset, empty or invalid.
    pub fn from_env() -> Result<Self, InvalidApiKey> {
        match std::env::var("DASHSCOPE_API_KEY") {
            Ok(v) => Self::new(v),
            Err(_) => Err(InvalidApiKey(Why::NotSet)),
        }
    }

    /// A short id for logs and metrics: 8 hex digits of a hash of the key,
    /// stable for the life of the process.
    pub fn redacted_id(&self) -> String {
        format!("{:08x}", self.id as u32)
    }

    /// The `Authorization: Bearer ...` header value (marked sensitive).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }
}

/// A stable (per build) 64-bit hash, for redacted ids.
pub(crate) fn stable_hash(bytes: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKey(id={})", self.redacted_id())
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key#{}", self.redacted_id())
    }
}

/// An API key that could not be used. It never contains the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidApiKey(Why);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Why {
    Empty,
    Characters,
    NotSet,
}

impl InvalidApiKey {
    #[cfg(test)]
    pub(crate) const fn not_set() -> Self {
        InvalidApiKey(Why::NotSet)
    }

    /// Whether the key was missing (`DASHSCOPE_API_KEY` unset).
    pub fn is_not_set(&self) -> bool {
        self.0 == Why::NotSet
    }
}

impl fmt::Display for InvalidApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Why::Empty => "the API key is empty",
            Why::Characters => "the API key has characters an HTTP header cannot carry",
            Why::NotSet => "DASHSCOPE_API_KEY is not set",
        })
    }
}

impl std::error::Error for InvalidApiKey {}

impl crate::classify::KnownError for InvalidApiKey {
    fn outcome(&self) -> crate::classify::Outcome {
        crate::classify::Outcome::Permanent {
            reason: crate::classify::PermanentReason::Auth,
        }
    }
}

/// Points requests at DashScope: resolves path-only URIs against a
/// [`BaseUrl`], and adds `Authorization: Bearer` (unless the request has its
/// own) and `X-DashScope-WorkSpace` when configured.
///
/// Requests may also carry an absolute URI; it is then left as it is (the
/// key is still added when missing). See the [module docs](super).
#[derive(Clone, Debug)]
pub struct SetUpstreamLayer {
    base: BaseUrl,
    key: Option<ApiKey>,
    workspace: Option<HeaderValue>,
}

impl SetUpstreamLayer {
    /// Requests go to `base`, authenticated with `key` (if any).
    pub fn new(base: BaseUrl, key: impl Into<Option<ApiKey>>) -> Self {
        Self {
            base,
            key: key.into(),
            workspace: None,
        }
    }

    /// Sends `X-DashScope-WorkSpace: <id>`. Default is none.
    ///
    /// # Errors
    ///
    /// When `id` cannot be a header value.
    pub fn workspace(mut self, id: &str) -> Result<Self, http::header::InvalidHeaderValue> {
        self.workspace = Some(HeaderValue::from_str(id)?);
        Ok(self)
    }
}

impl<S> Layer<S> for SetUpstreamLayer {
    type Service = SetUpstream<S>;

    fn layer(&self, inner: S) -> SetUpstream<S> {
        SetUpstream {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`SetUpstreamLayer`].
#[derive(Clone, Debug)]
pub struct SetUpstream<S> {
    inner: S,
    layer: SetUpstreamLayer,
}

impl<S> SetUpstream<S> {
    crate::util::macros::define_inner_service_accessors!();
}

impl<S, B> Service<Request<B>> for SetUpstream<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        if req.uri().authority().is_none() {
            let pq = req
                .uri()
                .path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/");
            // A path the base cannot take stays as it is; the client then
            // fails it with a typed error instead of sending it elsewhere.
            if let Ok(uri) = self.layer.base.resolve(pq) {
                *req.uri_mut() = uri;
            }
        }
        let headers = req.headers_mut();
        if let Some(key) = &self.layer.key {
            headers
                .entry(http::header::AUTHORIZATION)
                .or_insert_with(|| key.header_value().clone());
        }
        if let Some(ws) = &self.layer.workspace {
            headers
                .entry("x-dashscope-workspace")
                .or_insert_with(|| ws.clone());
        }
        self.inner.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction_and_validation() {
        let k = ApiKey::new(" sk-abcdef123456 ").unwrap();
        assert!(k.header_value().is_sensitive());
        assert_eq!(k.header_value(), "Bearer sk-abcdef123456");
        let shown = format!("{k} {k:?} {}", k.redacted_id());
        assert!(!shown.contains("abcdef123456"), "{shown}");
        assert_eq!(
            k.redacted_id(),
            ApiKey::new("sk-abcdef123456").unwrap().redacted_id()
        );
        assert_ne!(
            k.redacted_id(),
            ApiKey::new("sk-other").unwrap().redacted_id()
        );
        for bad in ["", "   ", "sk-é", "a b"] {
            let e = ApiKey::new(bad).unwrap_err();
            assert!(!e.to_string().contains(bad.trim()) || bad.trim().is_empty());
        }
    }

    #[tokio::test]
    async fn sets_uri_and_headers() {
        use tower::ServiceExt;
        let layer = SetUpstreamLayer::new(
            "http://127.0.0.1:1234".parse().unwrap(),
            ApiKey::new("sk-x").unwrap(),
        )
        .workspace("ws-1")
        .unwrap();
        let svc = layer.layer(tower::service_fn(|req: Request<()>| async move {
            Ok::<_, std::convert::Infallible>(req)
        }));
        let req = Request::post("/compatible-mode/v1/chat/completions?a=b")
            .body(())
            .unwrap();
        let seen = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(
            seen.uri().to_string(),
            "http://127.0.0.1:1234/compatible-mode/v1/chat/completions?a=b"
        );
        assert_eq!(seen.headers()["authorization"], "Bearer sk-x");
        assert_eq!(seen.headers()["x-dashscope-workspace"], "ws-1");
        // A request's own key and absolute URI win.
        let req = Request::get("https://elsewhere.example/x")
            .header("authorization", "Bearer sk-mine")
            .body(())
            .unwrap();
        let seen = svc.oneshot(req).await.unwrap();
        assert_eq!(seen.uri().host(), Some("elsewhere.example"));
        assert_eq!(seen.headers()["authorization"], "Bearer sk-mine");
    }
}
