//! Which bucket, circuit or account a request belongs to: one trait and one
//! set of extractors for the rate limiter, the circuit breaker, the account
//! pool and the Redis backend.
//!
//! * [`Keys`] names a key type; [`KeyOf<Req>`](KeyOf) finds the key of a
//!   request of type `Req`. Both are implemented by
//!   - [`Global`]: one key, `()`, for every request;
//!   - [`ByModel`]: the `model` of an HTTP request's body;
//!   - [`ByAccountModel`]: (account, model), DashScope's own quota scope,
//!     the account named from the API key (keys of one account share it) or
//!     a stable hash of the key;
//!   - [`ByHeader`]: a stable hash of a header (a gateway's client key);
//!   - [`KeyFn`]: any closure over `&mut Req` (made with [`key_fn`]), so
//!     non-HTTP services (a tonic channel, a custom client) are keyed too.
//! * [`StoreKey`] writes a key into a Redis key name, for the
//!   [`redis`](crate::redis) backend.
//!
//! Secrets never become keys: API keys and client keys are hashed (SipHash
//! with fixed keys, the same in every process running the same build, so
//! replicas sharing Redis agree), and [`AccountId`]'s `Debug` shows the hash,
//! never the key.
//!
//! Keyed state (rate-limit buckets, circuits, Redis leases) lives in one
//! bounded store with idle eviction: at most `max_keys` keys, idle ones
//! swept out when new keys arrive (no background task), and, when every key
//! is busy, new keys share one overflow state until room frees up.
//!
//! # Example
//!
//! One extractor, three users: the same key for a limiter and a breaker,
//! over a plain `service_fn` whose requests are not HTTP.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::num::{NonZeroU32, NonZeroUsize};
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::circuit_breaker::CircuitBreakerLayer;
//! use tower_qwen::classify::{FnClassifier, Outcome};
//! use tower_qwen::key::{KeyOf, key_fn};
//! use tower_qwen::rate_limit::{Cost, Limits, Quota, RateLimitLayer, RateLimiter};
//!
//! // Requests are (tenant, text); the key is the tenant.
//! let tenant = key_fn(|req: &mut (u32, String)| req.0);
//! assert_eq!(tenant.key_of(&mut (7, "hi".to_owned())), 7);
//!
//! let limiter = RateLimiter::builder(Limits::requests(Quota::per_hour(NonZeroU32::MIN))).build_keyed();
//! let classify = FnClassifier::new(|_: &usize| Outcome::Success);
//! let svc = ServiceBuilder::new()
//!     .layer(CircuitBreakerLayer::new().classifier(classify.clone()).keyed(tenant.clone(), NonZeroUsize::new(100).unwrap()))
//!     .layer(RateLimitLayer::keyed(limiter, tenant).reject().classifier(classify).cost(|_: &mut (u32, String)| Cost::ONE))
//!     .service(service_fn(|req: (u32, String)| async move { Ok::<_, std::convert::Infallible>(req.1.len()) }));
//!
//! assert_eq!(svc.clone().oneshot((1, "hello".to_owned())).await.unwrap(), 5);
//! assert!(svc.clone().oneshot((1, "again".to_owned())).await.is_err()); // tenant 1: one an hour
//! assert_eq!(svc.oneshot((2, "hi".to_owned())).await.unwrap(), 2); // tenant 2 has its own
//! # }
//! ```

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::fmt;
use std::fmt::Write as _;
use std::hash::{BuildHasher, BuildHasherDefault, Hash};
use std::marker::PhantomData;
use std::sync::Arc;

use http::HeaderName;

use crate::body::BufferedBody;
use crate::request::RequestInfo;

#[cfg(any(feature = "rate-limit", feature = "circuit-breaker"))]
pub(crate) mod store;

/// Names the key type of a keyed layer: `()` for [`Global`], `K` for one
/// state per key. See the [module docs](self).
pub trait Keys: Clone + Send + Sync + 'static {
    /// The key.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;
}

/// Finds the key of a request of type `Req`. See the [module docs](self).
pub trait KeyOf<Req>: Keys {
    /// The key of `req`. Taking `&mut` lets an extractor use
    /// [`RequestInfo::of`], which caches what it parsed in the request's
    /// extensions (the next extractor or layer reads it for free).
    fn key_of(&self, req: &mut Req) -> Self::Key;

    /// Whether every request has the same key (a breaker then admits in
    /// `poll_ready`). Default is `false`.
    fn is_global(&self) -> bool {
        false
    }
}

/// One key, `()`, for every request. The default of every keyed layer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Global;

impl Keys for Global {
    type Key = ();
}

impl<Req> KeyOf<Req> for Global {
    #[inline]
    fn key_of(&self, _: &mut Req) {}

    fn is_global(&self) -> bool {
        true
    }
}

/// A closure over the request as a key extractor. Made by [`key_fn`].
pub struct KeyFn<F, K> {
    f: F,
    _key: PhantomData<fn() -> K>,
}

/// A key extractor from a closure `Fn(&mut Req) -> K`.
///
/// ```
/// use tower_qwen::key::{KeyOf, key_fn};
/// let by_method = key_fn(|req: &mut http::Request<()>| req.method().clone());
/// assert_eq!(by_method.key_of(&mut http::Request::new(())), http::Method::GET);
/// ```
pub fn key_fn<F, Req, K>(f: F) -> KeyFn<F, K>
where
    F: Fn(&mut Req) -> K + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    KeyFn {
        f,
        _key: PhantomData,
    }
}

impl<F: Clone, K> Clone for KeyFn<F, K> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _key: PhantomData,
        }
    }
}

impl<F, K> fmt::Debug for KeyFn<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFn").finish_non_exhaustive()
    }
}

impl<F, K> Keys for KeyFn<F, K>
where
    F: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
}

impl<F, K, Req> KeyOf<Req> for KeyFn<F, K>
where
    F: Fn(&mut Req) -> K + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    #[inline]
    fn key_of(&self, req: &mut Req) -> K {
        (self.f)(req)
    }
}

/// Keys an HTTP request by the `model` of its body (`None` when there is
/// none), parsed once with [`RequestInfo::of`].
#[derive(Clone, Copy, Debug, Default)]
pub struct ByModel;

impl Keys for ByModel {
    type Key = Option<Arc<str>>;
}

impl<B: BufferedBody> KeyOf<http::Request<B>> for ByModel {
    fn key_of(&self, req: &mut http::Request<B>) -> Option<Arc<str>> {
        RequestInfo::of(req).model.clone()
    }
}

/// Who pays for a call: DashScope quotas belong to the root account, not
/// to the API key, so several keys of one account share one budget.
///
/// A request that carries an `AccountId` in its extensions is charged to
/// it (the [account pool](crate) sets one for the account it picked, so a
/// limiter inside the pool keys by account whichever of the account's API
/// keys the call uses).
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum AccountId {
    /// An account named in the key → account map (or by the pool).
    Named(Arc<str>),
    /// An unknown key, identified by a hash of its `Authorization` header
    /// (the key itself is never kept).
    Hashed(u64),
    /// No `Authorization` header.
    Anonymous,
}

impl fmt::Debug for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AccountId::Named(n) => write!(f, "Named({n:?})"),
            AccountId::Hashed(h) => write!(f, "Hashed({h:016x})"),
            AccountId::Anonymous => f.write_str("Anonymous"),
        }
    }
}

/// The key of [`ByAccountModel`]: (account, model).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AccountModel {
    /// The account.
    pub account: AccountId,
    /// The model, if the request named one.
    pub model: Option<Arc<str>>,
}

impl AccountModel {
    /// The model, as a `&str`.
    pub fn model(&self) -> Option<&str> {
        self.model.as_deref()
    }
}

/// Hashes client secrets into key ids: SipHash with fixed keys, so every
/// process running the same build derives the same id for the same secret
/// (replicas sharing a Redis limiter then share its keys), and the secret
/// itself is never stored.
type StableHasher = BuildHasherDefault<DefaultHasher>;

/// Keys an HTTP request by (account, model), DashScope's own quota scope.
///
/// The account is, in order: an [`AccountId`] in the request's extensions
/// (set by the account pool); the account an API key → account map you
/// provide names for the bearer token of the `Authorization` header; else
/// the key is its own account, identified by a hash of the header so the
/// secret is never stored (the same in every process running the same
/// build, so replicas sharing a [`redis`](crate::redis) limiter agree).
#[derive(Clone)]
pub struct ByAccountModel {
    accounts: Arc<HashMap<Box<str>, Arc<str>>>,
    hasher: StableHasher,
}

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

    /// The account of a request head.
    pub fn account_of(&self, headers: &http::HeaderMap, ext: &http::Extensions) -> AccountId {
        if let Some(a) = ext.get::<AccountId>() {
            return a.clone();
        }
        let Some(v) = headers.get(http::header::AUTHORIZATION) else {
            return AccountId::Anonymous;
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
                return AccountId::Named(a.clone());
            }
        }
        AccountId::Hashed(self.hasher.hash_one(v.as_bytes()))
    }
}

impl Keys for ByAccountModel {
    type Key = AccountModel;
}

impl<B: BufferedBody> KeyOf<http::Request<B>> for ByAccountModel {
    fn key_of(&self, req: &mut http::Request<B>) -> AccountModel {
        let model = RequestInfo::of(req).model.clone();
        AccountModel {
            account: self.account_of(req.headers(), req.extensions()),
            model,
        }
    }
}

/// Keys an HTTP request by a header (e.g. a gateway's `authorization` or
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

impl Keys for ByHeader {
    type Key = Option<u64>;
}

impl<B> KeyOf<http::Request<B>> for ByHeader {
    fn key_of(&self, req: &mut http::Request<B>) -> Option<u64> {
        req.headers()
            .get(&self.name)
            .map(|v| self.hasher.hash_one(v.as_bytes()))
    }
}

/// Writes a key into a Redis key name (after the limiter's prefix), so
/// that replicas name the same key the same way.
///
/// Encodings are unambiguous: strings escape `%` and `|`, options are
/// `-` / `+value`, tuples join their parts with `|`.
///
/// Implemented for `()`, integers, `bool`, strings, options, pairs and
/// triples of keys, [`AccountId`] and [`AccountModel`]. An unknown API key
/// is an [`AccountId::Hashed`] (see [`ByAccountModel`]): every replica
/// running the same build gives it the same Redis key. (Across different
/// builds the standard library's hash may change; name your accounts with
/// `ByAccountModel::new().account(api_key, name)` when replicas of
/// different versions must share a limit.)
pub trait StoreKey {
    /// Appends this key's encoding to `out`.
    fn write_key(&self, out: &mut String);
}

/// Appends `s`, escaping `%` and `|`.
fn escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7C"),
            c => out.push(c),
        }
    }
}

impl StoreKey for () {
    fn write_key(&self, out: &mut String) {
        out.push('*');
    }
}

impl StoreKey for bool {
    fn write_key(&self, out: &mut String) {
        out.push(if *self { '1' } else { '0' });
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl StoreKey for $t {
            fn write_key(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}

int_keys!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

impl StoreKey for str {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl StoreKey for String {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl StoreKey for Arc<str> {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl StoreKey for Box<str> {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl<T: StoreKey + ?Sized> StoreKey for &T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}

impl<T: StoreKey> StoreKey for Option<T> {
    fn write_key(&self, out: &mut String) {
        match self {
            None => out.push('-'),
            Some(v) => {
                out.push('+');
                v.write_key(out);
            }
        }
    }
}

impl<A: StoreKey, B: StoreKey> StoreKey for (A, B) {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out);
        out.push('|');
        self.1.write_key(out);
    }
}

impl<A: StoreKey, B: StoreKey, C: StoreKey> StoreKey for (A, B, C) {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out);
        out.push('|');
        self.1.write_key(out);
        out.push('|');
        self.2.write_key(out);
    }
}

impl StoreKey for AccountId {
    /// `a:<name>` for a named account, `h:<hash>` for a hashed one (see the
    /// trait docs), `anon` without a key.
    fn write_key(&self, out: &mut String) {
        match self {
            AccountId::Named(n) => {
                out.push_str("a:");
                escaped(out, n);
            }
            AccountId::Hashed(h) => {
                let _ = write!(out, "h:{h:016x}");
            }
            AccountId::Anonymous => out.push_str("anon"),
        }
    }
}

impl StoreKey for AccountModel {
    fn write_key(&self, out: &mut String) {
        self.account.write_key(out);
        out.push('|');
        self.model.write_key(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>, model: Option<&str>) -> http::Request<crate::body::Body> {
        let mut b = http::Request::post("/compatible-mode/v1/chat/completions");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        let body = model.map_or_else(String::new, |m| format!(r#"{{"model":"{m}"}}"#));
        b.body(crate::body::Body::from(body)).unwrap()
    }

    #[test]
    fn accounts_share_and_unknown_keys_are_hashed() {
        let k = ByAccountModel::new()
            .account("sk-a", "acme")
            .account("sk-b", "acme");
        let a = k.key_of(&mut req(Some("Bearer sk-a"), Some("qwen-plus")));
        let b = k.key_of(&mut req(Some("Bearer sk-b"), Some("qwen-plus")));
        assert_eq!(a, b);
        assert_eq!(a.model(), Some("qwen-plus"));
        let c = k.key_of(&mut req(Some("Bearer sk-c"), Some("qwen-plus")));
        assert!(matches!(c.account, AccountId::Hashed(_)));
        assert!(!format!("{c:?}").contains("sk-c"));
        assert_ne!(
            c,
            k.key_of(&mut req(Some("Bearer sk-d"), Some("qwen-plus")))
        );
        assert_eq!(k.key_of(&mut req(None, None)).account, AccountId::Anonymous);
        assert_ne!(a, k.key_of(&mut req(Some("Bearer sk-a"), Some("qwen-max"))));
        // An account set by the pool wins over the header.
        let mut r = req(Some("Bearer sk-c"), Some("qwen-plus"));
        r.extensions_mut()
            .insert(AccountId::Named(Arc::from("acme")));
        assert_eq!(k.key_of(&mut r), a);
    }

    #[test]
    fn header_model_and_closure_keys() {
        let h = ByHeader::new(HeaderName::from_static("authorization"));
        assert_eq!(h.key_of(&mut req(None, None)), None);
        assert_eq!(
            h.key_of(&mut req(Some("k1"), None)),
            h.key_of(&mut req(Some("k1"), Some("x")))
        );
        assert_ne!(
            h.key_of(&mut req(Some("k1"), None)),
            h.key_of(&mut req(Some("k2"), None))
        );
        assert_eq!(
            ByModel.key_of(&mut req(None, Some("qwen-max"))).as_deref(),
            Some("qwen-max")
        );
        let f = key_fn(|r: &mut http::Request<crate::body::Body>| r.method().clone());
        assert_eq!(f.key_of(&mut req(None, None)), http::Method::POST);
        assert!(KeyOf::<u8>::is_global(&Global));
        assert!(!KeyOf::<http::Request<crate::body::Body>>::is_global(
            &ByModel
        ));
    }

    fn enc<K: StoreKey>(k: K) -> String {
        let mut s = String::new();
        k.write_key(&mut s);
        s
    }

    #[test]
    fn store_encodings_are_stable_and_unambiguous() {
        assert_eq!(enc(()), "*");
        assert_eq!(enc(42u64), "42");
        assert_eq!(enc(Some("a|b")), "+a%7Cb");
        assert_eq!(enc(None::<String>), "-");
        assert_ne!(enc(("a|b", "c")), enc(("a", "b|c")));
        assert_ne!(enc(("a%7Cb", "c")), enc(("a|b", "c")));
        let k = AccountModel {
            account: AccountId::Named(Arc::from("acme")),
            model: Some(Arc::from("qwen-plus")),
        };
        assert_eq!(enc(&k), "a:acme|+qwen-plus");
        let k = AccountModel {
            account: AccountId::Anonymous,
            model: None,
        };
        assert_eq!(enc(k), "anon|-");
        assert_eq!(enc(AccountId::Hashed(255)), "h:00000000000000ff");
    }
}
