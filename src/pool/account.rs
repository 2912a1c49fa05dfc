//! One upstream account of a pool: its credentials, where its headroom is
//! read, its circuit, and the service that reaches it.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderValue, Request};

use crate::body::Body;
use crate::circuit_breaker::BreakerHandle;
use crate::key::KeyOf;
use crate::rate_limit::{Backend, Snapshot};

use super::error::InvalidConfig;
use super::picker::{Headroom, Health, Score};

/// The header that names a DashScope workspace.
pub(crate) const WORKSPACE: http::HeaderName =
    http::HeaderName::from_static("x-dashscope-workspace");

/// Reads an account's rate-limit state for a request (its head, with the
/// request's parsed [`RequestInfo`](crate::request::RequestInfo) and the
/// account's [`AccountId`](crate::key::AccountId) in the extensions).
trait Source: Send + Sync + 'static {
    fn snapshot(&self, head: &mut Request<Body>) -> Option<Snapshot>;
}

struct LimiterSource<B, P> {
    backend: B,
    keys: P,
}

impl<B, P> Source for LimiterSource<B, P>
where
    P: KeyOf<Request<Body>>,
    B: Backend<P::Key>,
{
    #[inline]
    fn snapshot(&self, head: &mut Request<Body>) -> Option<Snapshot> {
        self.backend.snapshot(&self.keys.key_of(head))
    }
}

/// One upstream account of a [`Pool`](super::Pool): a root account with its
/// own quota, reached with its own API key through its own `service`.
///
/// The pool reads the account's headroom from its rate limiter
/// ([`Account::limiter`]) and its health from its circuit breaker
/// ([`Account::breaker`]): give it the same limiter and breaker that sit in
/// `service`, so what the pool reads is what the account's stack enforces.
/// An account without a limiter always looks full; without a breaker,
/// always healthy.
///
/// See the [module docs](super) for an example.
pub struct Account<S> {
    pub(crate) meta: Meta,
    pub(crate) service: S,
}

/// What the pool keeps of an account, shared by every clone.
pub(crate) struct Meta {
    pub(crate) name: Arc<str>,
    /// The account's API keys (as `Authorization` values), used in turn.
    auth: Box<[HeaderValue]>,
    next_key: AtomicUsize,
    pub(crate) workspace: Option<HeaderValue>,
    source: Option<Arc<dyn Source>>,
    breaker: Option<BreakerHandle>,
}

impl Meta {
    /// The `Authorization` value for the next call: the account's keys in
    /// turn.
    pub(crate) fn next_auth(&self) -> &HeaderValue {
        if self.auth.len() == 1 {
            &self.auth[0]
        } else {
            &self.auth[self.next_key.fetch_add(1, Ordering::Relaxed) % self.auth.len()]
        }
    }

    /// Whether the pool must tell the limiter which account it asks about.
    pub(crate) fn has_source(&self) -> bool {
        self.source.is_some()
    }

    /// How good this account is for a call of `tokens` tokens.
    #[inline]
    pub(crate) fn score(&self, head: &mut Request<Body>, tokens: u32) -> Score {
        let health = match &self.breaker {
            None => Health::Healthy,
            Some(h) => Health::of(h.state(), || h.open_remaining()),
        };
        Score::of(health, || match &self.source {
            None => Headroom::FULL,
            Some(src) => match src.snapshot(head) {
                None => Headroom::FULL,
                Some(s) => Headroom::of(&s, tokens),
            },
        })
    }
}

impl<S> Account<S> {
    /// The account `name` (for logs, stats and [`Picked`](super::Picked);
    /// unique within a pool), called with `api_key` through `service`.
    ///
    /// The key is kept only as a sensitive `Authorization: Bearer` header
    /// value; it never appears in `Debug`, logs or errors.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when the name or the key is empty, or the key has
    /// characters an HTTP header cannot carry. The error does not contain
    /// the key.
    pub fn new(
        name: impl AsRef<str>,
        api_key: impl AsRef<str>,
        service: S,
    ) -> Result<Self, InvalidConfig> {
        Self::with_header(name.as_ref(), bearer(api_key.as_ref())?, service)
    }

    /// Adds another API key of the same account: the pool uses the
    /// account's keys in turn (they share the account's quota; several
    /// keys spread the calls over keys, e.g. per-key audit or revocation).
    ///
    /// # Errors
    ///
    /// As [`Account::new`].
    pub fn key(mut self, api_key: impl AsRef<str>) -> Result<Self, InvalidConfig> {
        let auth = bearer(api_key.as_ref())?;
        let mut keys = std::mem::take(&mut self.meta.auth).into_vec();
        keys.push(auth);
        self.meta.auth = keys.into_boxed_slice();
        Ok(self)
    }

    /// Like [`Account::new`], with a key from the client preset.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when the name is empty.
    #[cfg(feature = "client")]
    #[cfg_attr(docsrs, doc(cfg(feature = "client")))]
    pub fn with_api_key(
        name: impl AsRef<str>,
        api_key: &crate::client::ApiKey,
        service: S,
    ) -> Result<Self, InvalidConfig> {
        Self::with_header(name.as_ref(), api_key.header_value().clone(), service)
    }

    fn with_header(name: &str, auth: HeaderValue, service: S) -> Result<Self, InvalidConfig> {
        let name = name.trim();
        if name.is_empty() {
            return Err(InvalidConfig::new("an account name is empty"));
        }
        Ok(Self {
            meta: Meta {
                name: Arc::from(name),
                auth: Box::new([auth]),
                next_key: AtomicUsize::new(0),
                workspace: None,
                source: None,
                breaker: None,
            },
            service,
        })
    }

    /// Also sends `X-DashScope-WorkSpace: <id>` for this account. Default
    /// is none (a request's own workspace header, if any, is then
    /// removed: it belongs to whichever account the caller meant).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when `id` cannot be a header value.
    pub fn workspace(mut self, id: impl AsRef<str>) -> Result<Self, InvalidConfig> {
        let v = HeaderValue::from_str(id.as_ref().trim())
            .map_err(|_| InvalidConfig::new("a workspace id cannot be a header value"))?;
        self.meta.workspace = Some(v);
        Ok(self)
    }

    /// Reads this account's headroom from `backend` (any rate-limit
    /// [`Backend`]: the in-memory limiter, or the Redis one shared with
    /// other replicas), under the key `keys` gives the request: typically
    /// the limiter in `service` and the same extractor, e.g.
    /// [`ByModel`](crate::key::ByModel) (headroom for the request's model)
    /// or [`ByAccountModel`](crate::key::ByAccountModel).
    ///
    /// The pool shows the extractor the request's head with its parsed
    /// [`RequestInfo`](crate::request::RequestInfo) and, as the account, an
    /// [`AccountId::Named`](crate::key::AccountId) with this account's
    /// name; it sets the same extension on the request it sends. So one
    /// limiter keyed by [`ByAccountModel`](crate::key::ByAccountModel) can
    /// serve every account of the pool, whichever of an account's API keys
    /// a call uses.
    ///
    /// Default is none: the account always looks full.
    pub fn limiter<B, P>(mut self, backend: B, keys: P) -> Self
    where
        P: KeyOf<Request<Body>>,
        B: Backend<P::Key>,
    {
        self.meta.source = Some(Arc::new(LimiterSource { backend, keys }));
        self
    }

    /// Reads this account's health from `breaker` (the handle of the
    /// unkeyed circuit breaker in `service`): an open circuit is skipped
    /// until its open time is up; a degraded one, or an open one whose time
    /// is up (its next call is a probe), is used only when no healthy
    /// account can take the call without waiting; a half-open or forced
    /// open one is skipped.
    ///
    /// Default is none: the account always looks healthy.
    pub fn breaker(mut self, breaker: BreakerHandle) -> Self {
        self.meta.breaker = Some(breaker);
        self
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// The service that reaches this account.
    pub fn service(&self) -> &S {
        &self.service
    }
}

impl fmt::Debug for Meta {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.name)
            .field("keys", &self.auth.len())
            .field("workspace", &self.workspace.is_some())
            .field("limiter", &self.source.is_some())
            .field("breaker", &self.breaker.is_some())
            .finish_non_exhaustive()
    }
}

impl<S: fmt::Debug> fmt::Debug for Account<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Account")
            .field("name", &self.meta.name)
            .field("keys", &self.meta.auth.len())
            .field("workspace", &self.meta.workspace.is_some())
            .field("limiter", &self.meta.source.is_some())
            .field("breaker", &self.meta.breaker.is_some())
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

/// An API key as a sensitive `Authorization: Bearer` value.
fn bearer(key: &str) -> Result<HeaderValue, InvalidConfig> {
    let key = key.trim();
    if key.is_empty() {
        return Err(InvalidConfig::new("an API key is empty"));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(InvalidConfig::new(
            "an API key has characters an HTTP header cannot carry",
        ));
    }
    let mut auth = HeaderValue::try_from(format!("Bearer {key}"))
        .map_err(|_| InvalidConfig::new("an API key has characters an HTTP header cannot carry"))?;
    auth.set_sensitive(true);
    Ok(auth)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_and_never_shown() {
        let a = Account::new("acme", " sk-secret-123 ", ())
            .unwrap()
            .key("sk-secret-456")
            .unwrap();
        assert_eq!(a.meta.next_auth(), "Bearer sk-secret-123");
        assert_eq!(a.meta.next_auth(), "Bearer sk-secret-456");
        assert_eq!(a.meta.next_auth(), "Bearer sk-secret-123");
        assert!(a.meta.auth.iter().all(HeaderValue::is_sensitive));
        assert!(format!("{:?}", a.meta).contains("keys: 2"));
        let shown = format!("{a:?} {:?}", a.meta);
        assert!(!shown.contains("secret"), "{shown}");
        assert!(Account::new("acme", "", ()).is_err());
        let e = Account::new("acme", "sk bad", ()).unwrap_err();
        assert!(!e.to_string().contains("bad"));
        assert!(Account::new(" ", "sk-1", ()).is_err());
        assert!(
            Account::new("a", "sk-1", ())
                .unwrap()
                .workspace("ws\n1")
                .is_err()
        );
    }
}
