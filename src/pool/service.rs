use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{Request, Response};
use tower_service::Service;

use crate::BoxError;
use crate::body::{Body, BufferedBody};
use crate::key::AccountId;
use crate::rate_limit::DEFAULT_OUTPUT_TOKENS;
use crate::request::RequestInfo;
use crate::time::Deadline;
use crate::util::rng::{Rng, SeededRng};

use super::account::{Account, Meta, WORKSPACE};
use super::error::{Exhausted, InvalidConfig};
use super::future::ResponseFuture;
use super::picker::{self, Pick, Score};

/// Which account of a [`Pool`] a request went to: put in the request's
/// extensions before the account's service is called (so layers inside may
/// key on it), and in the response's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Picked {
    index: usize,
    name: Arc<str>,
}

impl Picked {
    /// The account's position in the pool (the order it was added in).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The account's name, shared.
    pub fn name_arc(&self) -> &Arc<str> {
        &self.name
    }
}

/// A request extension that sends the request to one account of the pool,
/// named, whatever the other accounts' headroom: task polls and async
/// submissions live in the account that created them, and a conversation
/// may be kept on one account. The account's circuit and rate limit still
/// apply (an open circuit or a wait beyond the pool's bound fails with
/// [`Exhausted`]); an unknown name fails with [`Exhausted`]
/// (`is_unknown_account`), nothing sent.
///
/// ```
/// use tower_qwen::pool::Pinned;
/// let mut req = http::Request::new(());
/// req.extensions_mut().insert(Pinned::to("acme"));
/// assert_eq!(req.extensions().get::<Pinned>().unwrap().name(), "acme");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Pinned {
    name: Arc<str>,
}

impl Pinned {
    /// Pins to the account named `name`.
    pub fn to(name: impl AsRef<str>) -> Self {
        Self {
            name: Arc::from(name.as_ref().trim()),
        }
    }

    /// The account's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl From<Picked> for Pinned {
    /// Pins a follow-up request to the account that answered.
    fn from(p: Picked) -> Self {
        Self { name: p.name }
    }
}

/// Counters of a [`Pool`], shared by every clone: requests sent to each
/// account, and requests no account could take.
#[derive(Clone)]
pub struct PoolStats {
    inner: Arc<Counters>,
}

struct Counters {
    names: Box<[Arc<str>]>,
    picks: Box<[AtomicU64]>,
    exhausted: AtomicU64,
}

impl PoolStats {
    /// Requests sent to the account `name` (0 for an unknown name).
    pub fn picks(&self, name: &str) -> u64 {
        self.inner
            .names
            .iter()
            .position(|n| &**n == name)
            .map_or(0, |i| self.inner.picks[i].load(Ordering::Relaxed))
    }

    /// Requests sent to each account, in pool order.
    pub fn by_account(&self) -> impl Iterator<Item = (&str, u64)> + '_ {
        self.inner
            .names
            .iter()
            .zip(self.inner.picks.iter())
            .map(|(n, p)| (&**n, p.load(Ordering::Relaxed)))
    }

    /// Requests sent to any account.
    pub fn total(&self) -> u64 {
        self.inner
            .picks
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .sum()
    }

    /// Requests that failed with [`Exhausted`].
    pub fn exhausted(&self) -> u64 {
        self.inner.exhausted.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for PoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolStats")
            .field("picks", &self.by_account().collect::<Vec<_>>())
            .field("exhausted", &self.exhausted())
            .finish()
    }
}

struct Shared {
    accounts: Box<[Meta]>,
    max_wait: Option<Duration>,
    default_output: u32,
    stats: PoolStats,
    clones: AtomicU64,
}

/// Builds a [`Pool`]. See the [module docs](super) for an example.
pub struct PoolBuilder<S, R = SeededRng> {
    accounts: Vec<Account<S>>,
    max_wait: Option<Duration>,
    default_output: u32,
    rng: R,
}

impl<S> Default for PoolBuilder<S> {
    fn default() -> Self {
        Self {
            accounts: Vec::new(),
            max_wait: None,
            default_output: DEFAULT_OUTPUT_TOKENS,
            rng: SeededRng::from_entropy(),
        }
    }
}

impl<S, R> PoolBuilder<S, R> {
    /// Adds an account.
    pub fn account(mut self, account: Account<S>) -> Self {
        self.accounts.push(account);
        self
    }

    /// Adds accounts.
    pub fn accounts(mut self, accounts: impl IntoIterator<Item = Account<S>>) -> Self {
        self.accounts.extend(accounts);
        self
    }

    /// The longest estimated rate-limit wait the pool routes a call into.
    /// When even the account that frees first would make the call wait
    /// longer, the call fails at once with [`Exhausted`] (rate limited,
    /// with the estimated `retry_after`), nothing sent or reserved. A
    /// request's [`Deadline`] bounds the wait too.
    ///
    /// Default is `None`: the pool routes the call to the account that
    /// frees first and leaves the wait to that account's rate limiter
    /// (bounded by its own maximum wait in wait mode; refused at once with
    /// its `RateLimited` in reject mode).
    pub fn max_wait(mut self, max_wait: impl Into<Option<Duration>>) -> Self {
        self.max_wait = max_wait.into();
        self
    }

    /// The output tokens assumed for a request that sets no `max_tokens`,
    /// when estimating its token cost (as the rate limiter does; keep the
    /// two equal). Default is
    /// [`DEFAULT_OUTPUT_TOKENS`] (1024).
    pub fn default_output_tokens(mut self, tokens: u32) -> Self {
        self.default_output = tokens;
        self
    }

    /// The random source of the two choices. Default is
    /// [`SeededRng::from_entropy`]; tests pass a seeded one. Each clone of
    /// the pool draws from its own copy, decorrelated from the others.
    pub fn rng<R2: Rng + Clone>(self, rng: R2) -> PoolBuilder<S, R2> {
        PoolBuilder {
            accounts: self.accounts,
            max_wait: self.max_wait,
            default_output: self.default_output,
            rng,
        }
    }

    /// Builds the pool.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`] when there is no account, or two accounts have the
    /// same name.
    pub fn build(self) -> Result<Pool<S, R>, InvalidConfig> {
        if self.accounts.is_empty() {
            return Err(InvalidConfig::new("a pool needs at least one account"));
        }
        for (i, a) in self.accounts.iter().enumerate() {
            if self.accounts[..i]
                .iter()
                .any(|b| b.meta.name == a.meta.name)
            {
                return Err(InvalidConfig::new("two accounts have the same name"));
            }
        }
        let (metas, services): (Vec<Meta>, Vec<S>) = self
            .accounts
            .into_iter()
            .map(|a| (a.meta, a.service))
            .unzip();
        let stats = PoolStats {
            inner: Arc::new(Counters {
                names: metas.iter().map(|m| m.name.clone()).collect(),
                picks: metas.iter().map(|_| AtomicU64::new(0)).collect(),
                exhausted: AtomicU64::new(0),
            }),
        };
        Ok(Pool {
            services,
            shared: Arc::new(Shared {
                accounts: metas.into_boxed_slice(),
                max_wait: self.max_wait,
                default_output: self.default_output,
                stats,
                clones: AtomicU64::new(0),
            }),
            rng: self.rng,
            salt: 0,
        })
    }
}

impl<S: fmt::Debug, R> fmt::Debug for PoolBuilder<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolBuilder")
            .field("accounts", &self.accounts)
            .field("max_wait", &self.max_wait)
            .field("default_output", &self.default_output)
            .finish_non_exhaustive()
    }
}

/// Sends each request to the account with the most headroom for its model,
/// with that account's key. See the [module docs](super).
///
/// # Clone
///
/// Clones share the accounts, their limiters and breakers, and the
/// counters; each clone holds its own clones of the account services and
/// its own copy of the random source. The pool reserves nothing, so a clone
/// inherits nothing.
pub struct Pool<S, R = SeededRng> {
    services: Vec<S>,
    shared: Arc<Shared>,
    rng: R,
    salt: u64,
}

impl<S> Pool<S> {
    /// A builder.
    pub fn builder() -> PoolBuilder<S> {
        PoolBuilder::default()
    }

    /// A pool of `accounts` with the default settings.
    ///
    /// # Errors
    ///
    /// See [`PoolBuilder::build`].
    pub fn new(accounts: impl IntoIterator<Item = Account<S>>) -> Result<Self, InvalidConfig> {
        Self::builder().accounts(accounts).build()
    }
}

impl<S, R> Pool<S, R> {
    /// The counters, shared by every clone.
    pub fn stats(&self) -> PoolStats {
        self.shared.stats.clone()
    }

    /// The number of accounts.
    pub fn len(&self) -> usize {
        self.services.len()
    }

    /// Whether the pool has no account (never: building one needs an
    /// account).
    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }

    /// The accounts' names, in pool order.
    pub fn names(&self) -> impl Iterator<Item = &str> + '_ {
        self.shared.accounts.iter().map(|m| &*m.name)
    }

    /// The service of account `index`.
    pub fn service(&self, index: usize) -> Option<&S> {
        self.services.get(index)
    }

    /// The services, in pool order.
    pub fn services(&self) -> &[S] {
        &self.services
    }
}

impl<S: Clone, R: Clone> Clone for Pool<S, R> {
    fn clone(&self) -> Self {
        let n = self.shared.clones.fetch_add(1, Ordering::Relaxed) + 1;
        Self {
            services: self.services.clone(),
            shared: self.shared.clone(),
            rng: self.rng.clone(),
            salt: mix(n),
        }
    }
}

impl<S: fmt::Debug, R> fmt::Debug for Pool<S, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("accounts", &self.shared.accounts)
            .field("services", &self.services)
            .field("max_wait", &self.shared.max_wait)
            .finish_non_exhaustive()
    }
}

/// SplitMix64's finalizer: spreads a clone number over 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<S, R, B, ResB> Service<Request<B>> for Pool<S, R>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone,
    S::Error: Into<BoxError>,
    B: BufferedBody,
    R: Rng,
{
    type Response = Response<ResB>;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, S, Request<B>>;

    /// Always ready: the account is chosen in `call`, and its service is
    /// driven to readiness in the response future, so one account that
    /// applies backpressure never holds up the others.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let shared = &*self.shared;
        let tokens = RequestInfo::of(&mut req).estimated_tokens(shared.default_output);
        let bound = match (shared.max_wait, Deadline::of(&req)) {
            (Some(m), Some(d)) => Some(m.min(d.remaining())),
            (m, d) => m.or_else(|| d.map(|d| d.remaining())),
        };
        let (parts, body) = req.into_parts();
        // The head, shown to each account's limiter as a request to that
        // account (its key extractor reads the head, the parsed request
        // info and the account).
        let mut head = Request::from_parts(parts, Body::empty());
        let pinned = head.extensions().get::<Pinned>().cloned();
        let mut score = |i: usize| {
            let meta = &shared.accounts[i];
            if meta.has_source() {
                head.extensions_mut()
                    .insert(AccountId::Named(meta.name.clone()));
            }
            meta.score(&mut head, tokens)
        };
        let pick = match pinned {
            Some(p) => match shared.accounts.iter().position(|m| *m.name == *p.name) {
                Some(i) => picker::pick_one(i, score(i)),
                None => {
                    tracing::debug!(account = &*p.name, "pinned to an unknown pool account");
                    return self.exhausted(Exhausted::unknown_account());
                }
            },
            None => {
                let n = shared.accounts.len();
                let bits = if n > 1 {
                    self.rng.next_u64() ^ self.salt
                } else {
                    0
                };
                picker::pick(n, bits, score)
            }
        };
        let index = match pick {
            Pick::AllUnavailable { retry_after } => {
                return self.exhausted(Exhausted::circuit_open(retry_after));
            }
            Pick::Account {
                score: Score::Waiting { wait, .. },
                ..
            } if bound.is_some_and(|b| wait > b) => {
                return self.exhausted(Exhausted::rate_limited(wait));
            }
            Pick::Account { index, score } => {
                if let Score::Waiting { wait, .. } = score {
                    tracing::debug!(
                        account = &*shared.accounts[index].name,
                        wait_ms = wait.as_millis() as u64,
                        "every pool account would wait; routing to the one that frees first"
                    );
                } else {
                    tracing::trace!(account = &*shared.accounts[index].name, "pool picked");
                }
                index
            }
        };
        let meta = &shared.accounts[index];
        shared.stats.inner.picks[index].fetch_add(1, Ordering::Relaxed);
        let (mut parts, _) = head.into_parts();
        parts
            .headers
            .insert(http::header::AUTHORIZATION, meta.next_auth().clone());
        match &meta.workspace {
            Some(ws) => {
                parts.headers.insert(WORKSPACE, ws.clone());
            }
            None => {
                parts.headers.remove(WORKSPACE);
            }
        }
        let picked = Picked {
            index,
            name: meta.name.clone(),
        };
        parts.extensions.insert(picked.clone());
        parts.extensions.insert(AccountId::Named(meta.name.clone()));
        let svc = self.services[index].clone();
        ResponseFuture::new(svc, Request::from_parts(parts, body), picked)
    }
}

impl<S, R> Pool<S, R> {
    fn exhausted<F, Req>(&self, e: Exhausted) -> ResponseFuture<F, S, Req> {
        self.shared
            .stats
            .inner
            .exhausted
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            retry_after_ms = e.retry_after().map(|d| d.as_millis() as u64),
            circuit_open = e.is_circuit_open(),
            "no pool account can take the call"
        );
        ResponseFuture::exhausted(e)
    }
}
