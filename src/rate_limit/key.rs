//! Key extractors: which bucket a request is charged to.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::hash::{BuildHasher, BuildHasherDefault, Hash};
use std::sync::Arc;

use http::HeaderName;
use http::request::Parts;

use crate::request::RequestInfo;

/// Picks the key a request is limited under, from its head (method, URI,
/// headers, extensions; the body is not needed: the parsed
/// [`RequestInfo`] is in the extensions when
/// [`KeyFn::needs_request_info`] says so).
///
/// Implemented for closures `Fn(&http::request::Parts) -> K`.
pub trait KeyFn: Clone + Send + Sync + 'static {
    /// The key.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;

    /// The key of a request.
    fn key(&self, parts: &Parts) -> Self::Key;

    /// Whether the request's [`RequestInfo`] (model, token estimate) must
    /// be parsed and put in its extensions before [`KeyFn::key`] runs.
    /// Default is `false`.
    fn needs_request_info(&self) -> bool {
        false
    }
}

impl<K, F> KeyFn for F
where
    F: Fn(&Parts) -> K + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;

    fn key(&self, parts: &Parts) -> K {
        self(parts)
    }
}

/// One limit for every request (key `()`).
#[derive(Clone, Copy, Debug, Default)]
pub struct Global;

impl KeyFn for Global {
    type Key = ();

    #[inline]
    fn key(&self, _: &Parts) {}
}

fn model_of(parts: &Parts) -> Option<Arc<str>> {
    parts
        .extensions
        .get::<Arc<RequestInfo>>()
        .and_then(|i| i.model.clone())
}

/// Keys by the `model` of the request body (`None` when there is none).
#[derive(Clone, Copy, Debug, Default)]
pub struct ByModel;

impl KeyFn for ByModel {
    type Key = Option<Arc<str>>;

    fn key(&self, parts: &Parts) -> Self::Key {
        model_of(parts)
    }

    fn needs_request_info(&self) -> bool {
        true
    }
}

/// Who pays for a call: DashScope quotas belong to the root account, not
/// to the API key, so several keys of one account share one budget.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum Account {
    /// An account named in the key → account map.
    Named(Arc<str>),
    /// An unknown key, identified by a hash of its `Authorization` header
    /// (the key itself is never kept).
    Hashed(u64),
    /// No `Authorization` header.
    Anonymous,
}

impl fmt::Debug for Account {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Account::Named(n) => write!(f, "Named({n:?})"),
            Account::Hashed(h) => write!(f, "Hashed({h:016x})"),
            Account::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// The key of [`ByAccountModel`]: (account, model).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccountModel {
    /// The account.
    pub account: Account,
    /// The model, if the request named one.
    pub model: Option<Arc<str>>,
}

impl AccountModel {
    /// The model, as a `&str`.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// Keys by (account, model), DashScope's own quota scope.
///
/// The account comes from an API key → account map you provide (keys are
/// matched on the bearer token of the `Authorization` header); a key not in
/// the map is its own account, identified by a hash of the header so the
/// secret is never stored. The hash is the same in every process running
/// the same build, so replicas sharing a [`redis`](crate) limiter agree.
#[derive(Clone)]
pub struct ByAccountModel {
    accounts: Arc<HashMap<Box<str>, Arc<str>>>,
    hasher: StableHasher,
}

/// Hashes client secrets into key ids: SipHash with fixed keys, so every
/// process running the same build derives the same id for the same secret
/// (replicas sharing a Redis limiter then share its keys), and the secret
/// itself is never stored.
type StableHasher = BuildHasherDefault<DefaultHasher>;

impl Default for ByAccountModel {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for ByAccountModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByAccountModel")
            .field("accounts", &self.accounts.len())
            .finish_non_exhaustive()
    }
}

impl ByAccountModel {
    /// Every API key is its own account.
    pub fn new() -> Self {
        Self {
            accounts: Arc::default(),
            hasher: StableHasher::default(),
        }
    }

    /// Declares that `api_key` belongs to `account` (keys of one account
    /// share its quota).
    pub fn account(mut self, api_key: impl AsRef<str>, account: impl AsRef<str>) -> Self {
        Arc::make_mut(&mut self.accounts)
            .insert(api_key.as_ref().trim().into(), Arc::from(account.as_ref()));
        self
    }

    fn account_of(&self, parts: &Parts) -> Account {
        let Some(v) = parts.headers.get(http::header::AUTHORIZATION) else {
            return Account::Anonymous;
        };
        if !self.accounts.is_empty()
            && let Ok(s) = v.to_str()
        {
            let s = s.trim();
            let token = s
                .strip_prefix("Bearer ")
                .or_else(|| s.strip_prefix("bearer "))
                .unwrap_or(s)
                .trim();
            if let Some(a) = self.accounts.get(token) {
                return Account::Named(a.clone());
            }
        }
        Account::Hashed(self.hasher.hash_one(v.as_bytes()))
    }
}

impl KeyFn for ByAccountModel {
    type Key = AccountModel;

    fn key(&self, parts: &Parts) -> AccountModel {
        AccountModel {
            account: self.account_of(parts),
            model: model_of(parts),
        }
    }

    fn needs_request_info(&self) -> bool {
        true
    }
}

/// Keys by a client key header (e.g. a gateway's `authorization` or
/// `x-api-key`), hashed so the secret is never stored; `None` without the
/// header.
#[derive(Clone)]
pub struct ByHeader {
    name: HeaderName,
    hasher: StableHasher,
}

impl fmt::Debug for ByHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ByHeader")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ByHeader {
    /// Keys by the value of header `name`.
    pub fn new(name: HeaderName) -> Self {
        Self {
            name,
            hasher: StableHasher::default(),
        }
    }
}

impl KeyFn for ByHeader {
    type Key = Option<u64>;

    fn key(&self, parts: &Parts) -> Option<u64> {
        parts
            .headers
            .get(&self.name)
            .map(|v| self.hasher.hash_one(v.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(auth: Option<&str>, model: Option<&str>) -> Parts {
        let mut b = http::Request::post("/compatible-mode/v1/chat/completions");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let (mut p, ()) = b.body(()).unwrap().into_parts();
        if let Some(m) = model {
            let body = format!(r#"{{"model":"{m}"}}"#);
            let info = RequestInfo::parse(p.uri.path(), &p.headers, Some(body.as_bytes()));
            p.extensions.insert(Arc::new(info));
        }
        p
    }

    #[test]
    fn accounts_share_and_unknown_keys_are_hashed() {
        let k = ByAccountModel::new()
            .account("sk-a", "acme")
            .account("sk-b", "acme");
        let a = k.key(&parts(Some("Bearer sk-a"), Some("qwen-plus")));
        let b = k.key(&parts(Some("Bearer sk-b"), Some("qwen-plus")));
        assert_eq!(a, b);
        assert_eq!(a.model(), Some("qwen-plus"));
        let c = k.key(&parts(Some("Bearer sk-c"), Some("qwen-plus")));
        assert!(matches!(c.account, Account::Hashed(_)));
        assert!(!format!("{c:?}").contains("sk-c"));
        assert_ne!(c, k.key(&parts(Some("Bearer sk-d"), Some("qwen-plus"))));
        assert_eq!(k.key(&parts(None, None)).account, Account::Anonymous);
        assert_ne!(a, k.key(&parts(Some("Bearer sk-a"), Some("qwen-max"))));
    }

    #[test]
    fn header_and_model_keys() {
        let h = ByHeader::new(HeaderName::from_static("authorization"));
        assert_eq!(h.key(&parts(None, None)), None);
        assert_eq!(
            h.key(&parts(Some("k1"), None)),
            h.key(&parts(Some("k1"), Some("x")))
        );
        assert_eq!(
            ByModel.key(&parts(None, Some("qwen-max"))).as_deref(),
            Some("qwen-max")
        );
        let f = |p: &Parts| p.method.clone();
        assert_eq!(KeyFn::key(&f, &parts(None, None)), http::Method::POST);
    }
}
