//! A pool of upstream accounts: each request goes to the account with the
//! most headroom for its model, with that account's API key.
//!
//! DashScope's rate limits belong to the **root account** × model
//! (QWEN-API.md A3): every API key, RAM user and workspace of one account
//! draws on the same RPM and TPM. Several keys of one account add nothing;
//! separate accounts each bring their own quota. [`Pool`] spreads calls
//! over such accounts. Each [`Account`] has its own key (and optional
//! workspace) and its own service: typically a circuit breaker and a rate
//! limiter of its own over the transport all accounts share.
//!
//! Add each root account once. Two keys of one account are one account:
//! give them one [`Account`] ([`Account::key`] adds a key; the account's
//! keys are used in turn), never two accounts with a limiter each. Against the mock, two
//! limiters that each believe in the account's quota send twice what it
//! allows, draw 429s, and (with the limiters' feedback pausing each key)
//! end *below* a single key's goodput (`benches/pool.rs`).
//!
//! # The pick
//!
//! For each request the pool parses its model and token estimate once
//! ([`RequestInfo`](crate::request::RequestInfo)), then scores accounts:
//!
//! * **Health** from the account's breaker ([`Account::breaker`]): a closed
//!   circuit is healthy; an open one is skipped until its open time is up
//!   (then, like a degraded one, it is used only when no healthy account
//!   can take the call without waiting, and its call is the probe); a
//!   half-open or forced-open one is skipped. One atomic load per account;
//!   the clock is read only for an open circuit.
//! * **Headroom** from the account's rate limiter ([`Account::limiter`]:
//!   any [`Backend`](crate::rate_limit::Backend), in memory or on Redis
//!   shared with other replicas), read through its
//!   [`snapshot`](crate::rate_limit::Backend::snapshot) for the request's
//!   key (its model, or its (account, model): one limiter keyed by
//!   [`ByAccountModel`](crate::key::ByAccountModel) can serve every
//!   account): the pool keeps no counters of its own. An account whose quotas admit the call now is *ready*, ranked by
//!   the fraction left of its tighter quota (scaled down during slow start
//!   or recovery from an upstream throttle, so a throttled account gets
//!   less); otherwise it *waits*, ranked by the estimated wait.
//!
//! The pool scores two accounts chosen at random (power of two choices,
//! through an injectable [`Rng`](crate::util::rng::Rng); ties go to the
//! first) and takes the better. If that one is not healthy and ready, it
//! scores every account and takes the best, so a call waits only when all
//! accounts would make it wait, and then goes to the one that frees first.
//! The decision reads two snapshots in the common case, takes no lock of
//! its own and allocates nothing.
//!
//! # When no account can take the call
//!
//! * Every circuit refuses calls: the call fails at once with
//!   [`error::Exhausted`] (`is_circuit_open`, `retry_after` = the time until
//!   the first circuit probes).
//! * Every account would make the call wait: it goes to the account that
//!   frees first, whose rate limiter waits (bounded by its maximum wait) in
//!   wait mode, or refuses with `RateLimited` in reject mode. With
//!   [`PoolBuilder::max_wait`] (or a request [`Deadline`](crate::time::Deadline))
//!   a longer estimated wait fails at once with [`error::Exhausted`]
//!   (`is_rate_limited`, with `retry_after`), nothing sent or reserved.
//!
//! Every request ends in a response or an error.
//!
//! # Credentials
//!
//! The chosen account's `Authorization: Bearer <key>` (its keys in turn)
//! replaces whatever the request carried, and its `X-DashScope-WorkSpace` is set (or the
//! request's own removed, when the account has none). The key is held as a
//! sensitive header value and never appears in `Debug`, logs or errors. The
//! request and the response carry a [`Picked`] extension naming the
//! account, so layers inside can key on it and callers can see who
//! answered, and an [`AccountId::Named`](crate::key::AccountId) with the
//! account's name, so a limiter keyed by
//! [`ByAccountModel`](crate::key::ByAccountModel) charges the account
//! whichever of its keys the call carries; [`PoolStats`] counts calls per
//! account.
//!
//! # Pinning
//!
//! A request carrying a [`Pinned`] extension goes to the named account
//! whatever the others' headroom (an async task is polled where it was
//! created; a follow-up goes where the first call went:
//! `Pinned::from(picked)`). Its circuit and rate limit still apply.
//!
//! # How it differs from tower's `Steer` and `Balance`
//!
//! `Steer` routes by a caller-given index and waits until *every* inner
//! service is ready; `Balance` picks by load (in-flight requests, latency)
//! in `poll_ready`, before it sees the request. Neither can ask "how much of
//! *this model's* quota does each account have left", and neither knows
//! circuits. [`Pool`] picks in `call`, per request, from the accounts'
//! limiters and breakers. It is always ready: the chosen account's service
//! (a clone, so `S: Clone`) is driven to readiness in the response future,
//! so an account that applies backpressure never holds up the others.
//!
//! # With other layers
//!
//! The recommended order: fallback → retry → **pool** → per account:
//! circuit breaker → rate limit → concurrency → timeout → the shared
//! client. Retry goes outside, so that each retry is picked again: a 429
//! from account A tightens A's limiter (its feedback), and the retry lands
//! on B. The breaker and the limiter go inside, one per account, so that
//! their state is the account's and the pool reads exactly what they
//! enforce. [`error::Exhausted`] is classified like the layer errors it
//! summarises (rate limited → `Throttled { cause: Local }`, circuits open →
//! `Transient`), so retry and fallback treat it accordingly.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::convert::Infallible;
//! use std::num::NonZeroU32;
//! use tower::{ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::body::Body;
//! use tower_qwen::circuit_breaker::CircuitBreakerLayer;
//! use tower_qwen::pool::{Account, Picked, Pool};
//! use tower_qwen::key::ByModel;
//! use tower_qwen::rate_limit::{Limits, Quota, RateLimitLayer, RateLimiter};
//!
//! // The transport every account shares (a stub that echoes the key).
//! let transport = service_fn(|req: http::Request<Body>| async move {
//!     let key = req.headers()["authorization"].clone();
//!     Ok::<_, Infallible>(http::Response::builder().header("x-key", key).body(String::new()).unwrap())
//! });
//! // One stack per account: its own circuit and its own quota per model
//! // (here 2 requests a second, no burst).
//! let account = |name: &str, key: &str| {
//!     let quota = Quota::per_second(NonZeroU32::new(2).unwrap()).allow_burst(NonZeroU32::MIN);
//!     let limiter = RateLimiter::builder(Limits::requests(quota)).build_keyed();
//!     let breaker = CircuitBreakerLayer::new();
//!     let handle = breaker.handle();
//!     let svc = ServiceBuilder::new()
//!         .layer(breaker)
//!         .layer(RateLimitLayer::keyed(limiter.clone(), ByModel))
//!         .service(transport.clone());
//!     Account::new(name, key, svc).unwrap().limiter(limiter, ByModel).breaker(handle)
//! };
//! let pool = Pool::new([account("acme", "sk-acme"), account("globex", "sk-globex")]).unwrap();
//! let stats = pool.stats();
//!
//! let req = || {
//!     http::Request::post("/compatible-mode/v1/chat/completions")
//!         .body(Body::from(r#"{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}]}"#))
//!         .unwrap()
//! };
//! // The first call takes one account's slot for this second; the second
//! // call goes to the other account, with its key, without waiting.
//! let a = pool.clone().oneshot(req()).await.unwrap();
//! let b = pool.clone().oneshot(req()).await.unwrap();
//! let (pa, pb) = (a.extensions().get::<Picked>().unwrap(), b.extensions().get::<Picked>().unwrap());
//! assert_ne!(pa.name(), pb.name());
//! assert_eq!(b.headers()["x-key"], format!("Bearer sk-{}", pb.name()));
//! assert_eq!((stats.picks("acme"), stats.picks("globex")), (1, 1));
//! # }
//! ```

mod account;
pub mod error;
pub mod future;
mod picker;
mod service;

pub use account::Account;
pub use service::{Picked, Pinned, Pool, PoolBuilder, PoolStats};
