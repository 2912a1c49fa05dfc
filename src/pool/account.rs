//! One upstream account of a pool: its credentials, where its headroom is
//! read, its circuit, and the service that reaches it.

use std::fmt;
use std::sync::Arc;

use http::HeaderValue;
use http::request::Parts;

use crate::circuit_breaker::BreakerHandle;
use crate::rate_limit::{KeyFn, RateLimiter, Snapshot};

use super::error::InvalidConfig;
use super::picker::{Headroom, Health, Score};

/// The header that names a DashScope workspace.
pub(crate) const WORKSPACE: http::HeaderName =
    http::HeaderName::from_static("x-dashscope-workspace");

/// Reads an account's rate-limit state for a request.
trait Source: Send + Sync + 'static {
    fn snapshot(&self, parts: &Parts) -> Option<Snapshot>;
}

struct LimiterSource<KF: KeyFn> {
    limiter: RateLimiter<KF::Key>,
    key_fn: KF,
}

impl<KF: KeyFn> Source for LimiterSource<KF> {
    #[inline]
    fn snapshot(&self, parts: &Parts) -> Option<Snapshot> {
        self.limiter.snapshot(&self.key_fn.key(parts))
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
#[derive(Clone)]
pub(crate) struct Meta {
    pub(crate) name: Arc<str>,
    pub(crate) auth: HeaderValue,
    pub(crate) workspace: Option<HeaderValue>,
    source: Option<Arc<dyn Source>>,
    breaker: Option<BreakerHandle>,
}

impl Meta {
    /// How good this account is for a call of `tokens` tokens.
    #[inline]
    pub(crate) fn score(&self, parts: &Parts, tokens: u32) -> Score {
        let health = match &self.breaker {
            None => Health::Healthy,
            Some(h) => Health::of(h.state(), || h.open_remaining()),
        };
        Score::of(health, || match &self.source {
            None => Headroom::FULL,
            Some(src) => match src.snapshot(parts) {
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
        let key = api_key.as_ref().trim();
        if key.is_empty() {
            return Err(InvalidConfig::new("an API key is empty"));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(InvalidConfig::new(
                "an API key has characters an HTTP header cannot carry",
            ));
        }
        let mut auth = HeaderValue::try_from(format!("Bearer {key}")).map_err(|_| {
            InvalidConfig::new("an API key has characters an HTTP header cannot carry")
        })?;
        auth.set_sensitive(true);
        Self::with_header(name.as_ref(), auth, service)
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
                auth,
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

    /// Reads this account's headroom from `limiter`, under the key
    /// `key_fn` gives the request: typically the per-account limiter in
    /// `service`, keyed [`ByModel`](crate::rate_limit::ByModel) (headroom
    /// for the request's model). The pool parses the request's
    /// [`RequestInfo`](crate::request::RequestInfo) before it asks, so a key
    /// function may read it from the extensions.
    ///
    /// With one limiter shared by several accounts and keyed by (account,
    /// model), pass a closure that names this account, e.g.
    /// `move |p: &Parts| (name.clone(), p.extensions.get::<Arc<RequestInfo>>().and_then(|i| i.model.clone()))`,
    /// and key the limiter layer inside on the [`Picked`](super::Picked)
    /// extension the same way. (The pool sets the account's
    /// `Authorization` header only after the pick, so a key function that
    /// reads it, such as
    /// [`ByAccountModel`](crate::rate_limit::ByAccountModel), would see the
    /// caller's header.)
    ///
    /// Default is none: the account always looks full.
    pub fn limiter<KF: KeyFn>(mut self, limiter: RateLimiter<KF::Key>, key_fn: KF) -> Self {
        self.meta.source = Some(Arc::new(LimiterSource { limiter, key_fn }));
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
            .field("workspace", &self.meta.workspace.is_some())
            .field("limiter", &self.meta.source.is_some())
            .field("breaker", &self.meta.breaker.is_some())
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated_and_never_shown() {
        let a = Account::new("acme", " sk-secret-123 ", ()).unwrap();
        assert_eq!(a.meta.auth, "Bearer sk-secret-123");
        assert!(a.meta.auth.is_sensitive());
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
