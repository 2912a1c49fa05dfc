#![cfg(feature = "pool")]
//! Tests for the account pool (issue 9): the pick (headroom, circuits,
//! ties), credentials, exhaustion (bounded wait or a typed error), clones,
//! readiness and wakeups, cancellation, streams, upstream throttles, and,
//! with the `mock` feature, two accounts' quotas against the mock
//! DashScope. Paused time, scripted or seeded randomness, no real sleeps.

use std::future::Ready;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use tokio::time::Instant;
use tokio_test::{assert_pending, assert_ready_ok, task};
use tower::{BoxError, Layer, Service, ServiceExt};
use tower_qwen::circuit_breaker::{BreakerHandle, CircuitBreaker, CircuitBreakerLayer, State};
use tower_qwen::classify::{Classifier, Outcome, ThrottleCause};
use tower_qwen::key::ByModel;
use tower_qwen::pool::error::Exhausted;
use tower_qwen::pool::{Account, Picked, Pool, PoolBuilder};
use tower_qwen::rate_limit::error::RateLimited;
use tower_qwen::rate_limit::{Cost, Limits, Quota, RateLimit, RateLimitLayer, RateLimiter};
use tower_qwen::time::Deadline;
use tower_qwen::util::rng::{Rng, SeededRng};

const MS: Duration = Duration::from_millis(1);
const CHAT: &str = "/compatible-mode/v1/chat/completions";

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

type Req = Request<Full<Bytes>>;
type ResBody = UnsyncBoxBody<Bytes, BoxError>;
type Res = Response<ResBody>;

/// A compatible chat request for `model` with `max_tokens` (its estimate
/// is 5 input tokens + `max`), sent with the caller's own key.
fn chat(model: &str, max: u32) -> Req {
    Request::post(CHAT)
        .header("authorization", "Bearer client-key")
        .header("x-dashscope-workspace", "ws-of-the-caller")
        .body(Full::new(Bytes::from(format!(
            r#"{{"model":"{model}","max_tokens":{max},"messages":[{{"role":"user","content":"hi"}}]}}"#
        ))))
        .unwrap()
}

fn body(s: impl Into<Bytes>) -> ResBody {
    Full::new(s.into()).map_err(|e| match e {}).boxed_unsync()
}

fn ok() -> Res {
    Response::builder()
        .header("content-type", "application/json")
        .body(body(r#"{"choices":[]}"#))
        .unwrap()
}

fn status(code: u16, json: &'static str) -> Res {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body(json))
        .unwrap()
}

const BURST_RATE: &str = r#"{"request_id":"1","code":"Throttling.BurstRate","message":"Request rate increased too quickly."}"#;

/// What reached the upstream.
#[derive(Clone, Debug)]
struct Seen {
    auth: String,
    workspace: Option<String>,
    picked: Option<String>,
    at: Instant,
}

type Answer = Arc<dyn Fn(&Req) -> Res + Send + Sync>;

/// The shared transport: logs each call and answers with `answer`.
#[derive(Clone)]
struct Upstream {
    log: Arc<Mutex<Vec<Seen>>>,
    answer: Answer,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").finish_non_exhaustive()
    }
}

impl Upstream {
    fn new() -> Self {
        Self::answering(|_| ok())
    }

    fn answering(f: impl Fn(&Req) -> Res + Send + Sync + 'static) -> Self {
        Self {
            log: Arc::default(),
            answer: Arc::new(f),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    /// The keys that reached the upstream, in order.
    fn keys(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.auth).collect()
    }

    fn count(&self, key: &str) -> usize {
        self.keys().iter().filter(|k| *k == key).count()
    }
}

impl Service<Req> for Upstream {
    type Response = Res;
    type Error = BoxError;
    type Future = Ready<Result<Res, BoxError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
        self.log.lock().unwrap().push(Seen {
            auth: h("authorization").unwrap_or_default(),
            workspace: h("x-dashscope-workspace"),
            picked: req
                .extensions()
                .get::<Picked>()
                .map(|p| p.name().to_owned()),
            at: Instant::now(),
        });
        std::future::ready(Ok((self.answer)(&req)))
    }
}

type Stack = CircuitBreaker<RateLimit<Upstream, RateLimiter<Option<Arc<str>>>, ByModel>>;
type Limiter = RateLimiter<Option<Arc<str>>>;

/// One account's stack: breaker → rate limit (keyed by model) → the shared
/// upstream; the pool reads the same limiter and breaker.
struct Acct {
    account: Account<Stack>,
    limiter: Limiter,
    breaker: BreakerHandle,
}

fn acct(name: &str, limits: Limits, wait: Option<Duration>, upstream: &Upstream) -> Acct {
    let limiter = RateLimiter::builder(limits).build_keyed();
    let breaker = CircuitBreakerLayer::new().jitter(0.0);
    let handle = breaker.handle();
    let rl = RateLimitLayer::keyed(limiter.clone(), ByModel);
    let rl = match wait {
        Some(w) => rl.wait(w),
        None => rl.reject(),
    };
    let svc = breaker.layer(rl.layer(upstream.clone()));
    let account = Account::new(name, format!("sk-{name}"), svc)
        .unwrap()
        .limiter(limiter.clone(), ByModel)
        .breaker(handle.clone());
    Acct {
        account,
        limiter,
        breaker: handle,
    }
}

/// `n` requests a second, burst `burst`.
fn requests(n: u32, burst: u32) -> Limits {
    Limits::requests(Quota::per_second(nz(n)).allow_burst(nz(burst)))
}

fn model(m: &str) -> Option<Arc<str>> {
    Some(Arc::from(m))
}

/// Random bits from a script: 0, 1, 2, ... (with two accounts, even
/// values sample (0, 1) and odd ones (1, 0); ties go to the first).
#[derive(Clone, Debug, Default)]
struct Counting(u64);

impl Rng for Counting {
    fn next_u64(&mut self) -> u64 {
        let v = self.0;
        self.0 += 1;
        v
    }
}

/// The same bits every time: ties always go to account 0.
#[derive(Clone, Debug)]
struct Fixed(u64);

impl Rng for Fixed {
    fn next_u64(&mut self) -> u64 {
        self.0
    }
}

fn pool<R: Rng + Clone>(
    accts: Vec<Acct>,
    rng: R,
) -> (Pool<Stack, R>, Vec<Limiter>, Vec<BreakerHandle>) {
    pool_with(accts, rng, |b| b)
}

fn pool_with<R: Rng + Clone>(
    accts: Vec<Acct>,
    rng: R,
    f: impl FnOnce(PoolBuilder<Stack>) -> PoolBuilder<Stack>,
) -> (Pool<Stack, R>, Vec<Limiter>, Vec<BreakerHandle>) {
    let limiters = accts.iter().map(|a| a.limiter.clone()).collect();
    let breakers = accts.iter().map(|a| a.breaker.clone()).collect();
    let pool = f(Pool::builder().accounts(accts.into_iter().map(|a| a.account)))
        .rng(rng)
        .build()
        .unwrap();
    (pool, limiters, breakers)
}

async fn drain<B: http_body::Body>(res: Response<B>) -> Response<()>
where
    B::Error: std::fmt::Debug,
{
    let (parts, body) = res.into_parts();
    body.collect().await.unwrap();
    Response::from_parts(parts, ())
}

/// Calls the pool (always ready) from its original instance, whose random
/// choices are the injected ones verbatim (clones decorrelate theirs).
fn start<S: Service<Req>>(p: &mut S, req: Req) -> S::Future {
    let ready = task::spawn(()).enter(|cx, _| p.poll_ready(cx));
    assert!(matches!(ready, Poll::Ready(Ok(()))));
    p.call(req)
}

async fn send<S: Service<Req>>(p: &mut S, req: Req) -> Result<S::Response, S::Error> {
    start(p, req).await
}

fn picked<B>(res: &Response<B>) -> String {
    res.extensions().get::<Picked>().unwrap().name().to_owned()
}

fn exhausted(e: &BoxError) -> &Exhausted {
    e.downcast_ref::<Exhausted>()
        .unwrap_or_else(|| panic!("not Exhausted: {e}"))
}

// ---------------------------------------------------------------------------
// The pick

#[tokio::test(start_paused = true)]
async fn picks_the_account_with_more_headroom() {
    let up = Upstream::new();
    let (mut p, limiters, _) = pool(
        vec![
            acct("a", requests(1, 10), None, &up),
            acct("b", requests(1, 10), None, &up),
        ],
        Fixed(0),
    );
    // Account a has 3 of 10 left for qwen-plus; b has 10.
    limiters[0]
        .check(&model("qwen-plus"), Cost::new(7, 0))
        .unwrap();
    // Ties would go to a (Fixed(0)); headroom sends the next 7 to b (10
    // down to 4 left, each more than a's 3).
    for _ in 0..7 {
        let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
        assert_eq!(picked(&res), "b");
    }
    // Now a tie (3 and 3): the first choice, a.
    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!(picked(&res), "a");
    assert_eq!(up.count("Bearer sk-b"), 7);
    // Headroom is per model: for qwen-max both are full, ties go to a.
    let res = send(&mut p, chat("qwen-max", 10)).await.unwrap();
    assert_eq!(picked(&res), "a");
    assert_eq!(p.stats().picks("a"), 2);
    assert_eq!(p.stats().picks("b"), 7);
}

#[tokio::test(start_paused = true)]
async fn the_tighter_quota_and_the_token_estimate_decide() {
    let up = Upstream::new();
    let limits = requests(1, 10).and_tokens(Quota::per_second(nz(1000)));
    let (mut p, limiters, _) = pool(
        vec![acct("a", limits, None, &up), acct("b", limits, None, &up)],
        Fixed(0),
    );
    let m = model("qwen-plus");
    // a: 10/10 requests, 300/1000 tokens; b: 5/10 requests, 900/1000 tokens.
    limiters[0].check(&m, Cost::new(0, 700)).unwrap();
    limiters[1].check(&m, Cost::new(5, 100)).unwrap();
    // 505 tokens: a would wait (300 left), b can go now.
    let res = send(&mut p, chat("qwen-plus", 500)).await.unwrap();
    assert_eq!(picked(&res), "b");
    // b now: 4/10 requests, 395/1000 tokens; a: 1.0 and 0.3. A small call:
    // a's tighter quota (0.3) is below b's (0.395), so b again.
    let res = send(&mut p, chat("qwen-plus", 5)).await.unwrap();
    assert_eq!(picked(&res), "b");
    // b: 3/10 requests, 385 tokens → 0.3 vs a's 0.3: tie, the first choice.
    let res = send(&mut p, chat("qwen-plus", 5)).await.unwrap();
    assert_eq!(picked(&res), "a");
}

#[tokio::test(start_paused = true)]
async fn when_both_choices_would_wait_every_account_is_considered() {
    let up = Upstream::new();
    let wait = Some(Duration::from_secs(30));
    let (mut p, limiters, _) = pool(
        vec![
            acct("a", requests(1, 1), wait, &up),
            acct("b", requests(1, 1), wait, &up),
            acct("c", requests(1, 1), wait, &up),
        ],
        Fixed(0), // samples (a, b)
    );
    let m = model("qwen-plus");
    limiters[0].check(&m, Cost::ONE).unwrap();
    limiters[1].check(&m, Cost::ONE).unwrap();
    // a and b would wait 1 s; c, outside the sample, has room now.
    let t0 = Instant::now();
    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!((picked(&res), Instant::now()), ("c".to_owned(), t0));
    // All three would wait: the call waits on the one that frees first,
    // c, although the sample is (a, b).
    tokio::time::advance(Duration::from_secs(1)).await;
    limiters[2].check(&m, Cost::ONE).unwrap();
    tokio::time::advance(200 * MS).await;
    limiters[0].check(&m, Cost::ONE).unwrap();
    limiters[1].check(&m, Cost::ONE).unwrap();
    let t1 = Instant::now();
    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!(picked(&res), "c");
    assert_eq!(Instant::now() - t1, 800 * MS);
}

#[tokio::test(start_paused = true)]
async fn load_spreads_to_use_every_accounts_quota() {
    let up = Upstream::new();
    let accts = (0..4)
        .map(|i| acct(&format!("a{i}"), requests(1, 100), None, &up))
        .collect();
    let (mut p, _, _) = pool(accts, SeededRng::new(7));
    // 4 × 100 at once, in reject mode: every call finds room somewhere.
    for _ in 0..400 {
        let res = drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await;
        assert_eq!(res.status(), 200);
    }
    for (name, n) in p.stats().by_account() {
        assert_eq!(n, 100, "{name}");
    }
    let err = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    assert!(err.is::<RateLimited>(), "{err}");
}

#[tokio::test(start_paused = true)]
async fn ties_are_spread_by_the_random_choices() {
    let up = Upstream::new();
    let mut p = Pool::builder()
        .accounts((0..4).map(|i| Account::new(format!("a{i}"), "sk-x", up.clone()).unwrap()))
        .rng(SeededRng::new(7))
        .build()
        .unwrap();
    for _ in 0..400 {
        send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    }
    // No limiter: every pick is a tie, decided by the first random choice.
    for (name, n) in p.stats().by_account() {
        assert!((60..=140).contains(&n), "{name}: {n}");
    }
}

// ---------------------------------------------------------------------------
// Circuits

#[tokio::test(start_paused = true)]
async fn skips_open_circuits() {
    let up = Upstream::new();
    let (mut p, _, breakers) = pool(
        vec![
            acct("a", requests(100, 100), None, &up),
            acct("b", requests(100, 100), None, &up),
        ],
        SeededRng::new(1),
    );
    breakers[0].force_open();
    for _ in 0..20 {
        let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
        assert_eq!(picked(&res), "b");
    }
    assert_eq!(up.count("Bearer sk-a"), 0);
    breakers[0].release();
    let mut seen_a = false;
    for _ in 0..20 {
        seen_a |= picked(&send(&mut p, chat("qwen-plus", 10)).await.unwrap()) == "a";
    }
    assert!(seen_a, "a released circuit takes calls again");
}

#[tokio::test(start_paused = true)]
async fn a_tripped_account_is_avoided_then_probed_when_it_saves_a_wait() {
    // a answers 503 until told otherwise; b always succeeds.
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = broken.clone();
    let up = Upstream::answering(move |req| {
        let to_a = req.headers()["authorization"] == "Bearer sk-a";
        if to_a && flag.load(std::sync::atomic::Ordering::SeqCst) {
            status(503, r#"{"code":"ServiceUnavailable","message":"down"}"#)
        } else {
            ok()
        }
    });
    let (mut p, limiters, breakers) = pool(
        vec![
            acct("a", requests(1, 1), Some(Duration::from_secs(30)), &up),
            acct("b", requests(1, 1), Some(Duration::from_secs(30)), &up),
        ],
        Fixed(0),
    );
    // Three 503s on a open its circuit (for 5 s, no jitter).
    for _ in 0..3 {
        let mut svc = p.services()[0].clone();
        let mut req = chat("qwen-plus", 10);
        req.headers_mut()
            .insert("authorization", "Bearer sk-a".parse().unwrap());
        let res = svc.ready().await.unwrap().call(req).await.unwrap();
        assert_eq!(drain(res).await.status(), 503);
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(breakers[0].state(), State::Open);
    // While open: every call goes to b, even when b makes it wait.
    let t0 = Instant::now();
    for i in 0..2 {
        let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
        assert_eq!(picked(&res), "b");
        assert_eq!(Instant::now() - t0, Duration::from_secs(i));
    }
    // Open time up (5 s after the trip): a is suspect. b is still ready
    // now (its slot came), so b takes the call...
    tokio::time::advance(Duration::from_secs(4)).await;
    assert!(breakers[0].open_remaining().unwrap().is_zero());
    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!(picked(&res), "b");
    // ...but the next would wait for b: it probes a instead.
    assert!(
        !limiters[1]
            .snapshot(&model("qwen-plus"))
            .unwrap()
            .requests
            .unwrap()
            .retry_after
            .is_zero()
    );
    broken.store(false, std::sync::atomic::Ordering::SeqCst);
    let t1 = Instant::now();
    let res = drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await;
    assert_eq!(picked(&res), "a");
    assert_eq!(res.status(), 200);
    assert_eq!(Instant::now(), t1, "no wait");
    assert_eq!(breakers[0].state(), State::Closed);
}

// ---------------------------------------------------------------------------
// Credentials

#[tokio::test(start_paused = true)]
async fn sets_the_accounts_key_and_workspace() {
    let up = Upstream::new();
    let a = acct("a", requests(100, 100), None, &up);
    let a = Acct {
        account: a.account.workspace("ws-a").unwrap(),
        ..a
    };
    let b = acct("b", requests(100, 100), None, &up);
    let (mut p, _, breakers) = pool(vec![a, b], Counting(0));
    let shown = format!("{p:?}");
    assert!(
        !shown.contains("sk-a") && !shown.contains("sk-b"),
        "{shown}"
    );

    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!(picked(&res), "a");
    assert_eq!(res.extensions().get::<Picked>().unwrap().index(), 0);
    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!(picked(&res), "b");
    breakers[1].force_open();
    send(&mut p, chat("qwen-plus", 10)).await.unwrap();

    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    // The caller's key and workspace never reach the upstream.
    assert_eq!(seen[0].auth, "Bearer sk-a");
    assert_eq!(seen[0].workspace.as_deref(), Some("ws-a"));
    assert_eq!(seen[0].picked.as_deref(), Some("a"));
    assert_eq!(seen[1].auth, "Bearer sk-b");
    assert_eq!(seen[1].workspace, None);
    assert_eq!(seen[1].picked.as_deref(), Some("b"));
    assert_eq!(seen[2].auth, "Bearer sk-a");
}

#[test]
fn invalid_pools_are_refused() {
    let up = Upstream::new();
    let empty: Vec<Account<Upstream>> = Vec::new();
    assert!(Pool::new(empty).is_err());
    let twice = Pool::new([
        Account::new("a", "sk-1", up.clone()).unwrap(),
        Account::new("a", "sk-2", up.clone()).unwrap(),
    ]);
    assert!(twice.unwrap_err().to_string().contains("same name"));
    let e = Account::new("a", "sk bad key", up).unwrap_err();
    assert!(!e.to_string().contains("bad key"));
}

// ---------------------------------------------------------------------------
// Every account exhausted

/// Two accounts of 1 request a second, burst 1: a used at t0, b at t0 +
/// 300 ms. At t0 + 300 ms a frees in 700 ms, b in 1 s.
async fn two_used_accounts<R: Rng + Clone>(
    wait: Option<Duration>,
    rng: R,
    f: impl FnOnce(PoolBuilder<Stack>) -> PoolBuilder<Stack>,
) -> (Pool<Stack, R>, Upstream) {
    let up = Upstream::new();
    let (p, limiters, _) = pool_with(
        vec![
            acct("a", requests(1, 1), wait, &up),
            acct("b", requests(1, 1), wait, &up),
        ],
        rng,
        f,
    );
    limiters[0].check(&model("qwen-plus"), Cost::ONE).unwrap();
    tokio::time::advance(300 * MS).await;
    limiters[1].check(&model("qwen-plus"), Cost::ONE).unwrap();
    (p, up)
}

#[tokio::test(start_paused = true)]
async fn exhausted_accounts_wait_on_the_one_that_frees_first() {
    // Fixed(1) samples (1, 0): without the scan, b (1 s) would be tried
    // first; the call waits 700 ms on a.
    let (mut p, up) = two_used_accounts(Some(Duration::from_secs(30)), Fixed(1), |b| b).await;
    let t0 = Instant::now();
    let mut call = task::spawn(start(&mut p, chat("qwen-plus", 10)));
    assert_pending!(call.poll());
    tokio::time::advance(699 * MS).await;
    assert_pending!(call.poll());
    tokio::time::advance(MS).await;
    assert!(call.is_woken());
    let res = assert_ready_ok!(call.poll());
    assert_eq!(picked(&res), "a");
    assert_eq!(up.seen()[0].auth, "Bearer sk-a");
    assert_eq!(up.seen()[0].at - t0, 700 * MS);
}

#[tokio::test(start_paused = true)]
async fn exhausted_accounts_fail_at_once_past_the_pools_max_wait() {
    let (mut p, up) = two_used_accounts(Some(Duration::from_secs(30)), Fixed(0), |b| {
        b.max_wait(500 * MS)
    })
    .await;
    let err = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    let e = exhausted(&err);
    assert!(e.is_rate_limited() && !e.is_circuit_open());
    assert_eq!(e.retry_after(), Some(700 * MS));
    assert_eq!(
        Classifier::new().classify_error(&err),
        Outcome::Throttled {
            cause: ThrottleCause::Local,
            retry_after: Some(700 * MS)
        }
    );
    assert_eq!(p.stats().exhausted(), 1);
    assert!(up.seen().is_empty());
    // Nothing was reserved: at the promised time a call goes at once, to a.
    tokio::time::advance(700 * MS).await;
    let t = Instant::now();
    let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
    assert_eq!((picked(&res), Instant::now()), ("a".to_owned(), t));
}

#[tokio::test(start_paused = true)]
async fn a_request_deadline_bounds_the_wait() {
    let (mut p, _) = two_used_accounts(Some(Duration::from_secs(30)), Fixed(0), |b| b).await;
    let mut req = chat("qwen-plus", 10);
    Deadline::after(200 * MS).tighten(&mut req);
    let err = send(&mut p, req).await.unwrap_err();
    assert_eq!(exhausted(&err).retry_after(), Some(700 * MS));
    // Within the deadline it waits.
    let mut req = chat("qwen-plus", 10);
    Deadline::after(Duration::from_secs(1)).tighten(&mut req);
    let res = send(&mut p, req).await.unwrap();
    assert_eq!(picked(&res), "a");
}

#[tokio::test(start_paused = true)]
async fn reject_mode_accounts_refuse_with_their_own_retry_after() {
    // No pool bound; the accounts' limiters reject: the call goes to the
    // account that frees first and is refused there, typed.
    let (mut p, up) = two_used_accounts(None, Fixed(1), |b| b).await;
    let err = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    let limited = err.downcast_ref::<RateLimited>().expect("RateLimited");
    assert_eq!(limited.retry_after(), Some(700 * MS));
    assert_eq!(p.stats().picks("a"), 1);
    assert!(up.seen().is_empty());
}

#[tokio::test(start_paused = true)]
async fn every_circuit_open_fails_fast_with_the_soonest_probe() {
    let up = Upstream::answering(|_| status(503, r#"{"code":"ServiceUnavailable","message":"x"}"#));
    let (mut p, _, breakers) = pool(
        vec![
            acct("a", requests(100, 100), None, &up),
            acct("b", requests(100, 100), None, &up),
        ],
        Counting(0),
    );
    // Trip both, through their own stacks: a at t0, b at t0 + 2 s.
    let trip = |i: usize| {
        let svc = p.services()[i].clone();
        async move {
            for _ in 0..3 {
                drain(svc.clone().oneshot(chat("qwen-plus", 10)).await.unwrap()).await;
            }
        }
    };
    trip(0).await;
    tokio::time::advance(Duration::from_secs(2)).await;
    trip(1).await;
    assert_eq!(breakers[0].state(), State::Open);
    assert_eq!(breakers[1].state(), State::Open);
    let before = up.seen().len();
    let err = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    let e = exhausted(&err);
    assert!(e.is_circuit_open());
    assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    assert_eq!(
        Classifier::new().classify_error(&err),
        Outcome::Transient {
            retry_after: Some(Duration::from_secs(3))
        }
    );
    assert_eq!(up.seen().len(), before, "nothing sent");
    // Forced open knows no time.
    breakers[0].force_open();
    breakers[1].force_open();
    let err = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    assert_eq!(exhausted(&err).retry_after(), None);
    assert_eq!(err.to_string(), "every pool account's circuit is open");
}

// ---------------------------------------------------------------------------
// Clones, readiness, cancellation

#[tokio::test(start_paused = true)]
async fn clones_share_state() {
    let (p, up) = two_used_accounts(Some(Duration::from_secs(30)), SeededRng::new(3), |b| b).await;
    let (c1, c2) = (p.clone(), p.clone());
    tokio::time::advance(Duration::from_secs(1)).await;
    // Both accounts are free again; a call through one clone takes one
    // account's slot, and the other clone sees it.
    let r1 = c1.oneshot(chat("qwen-plus", 10)).await.unwrap();
    let r2 = c2.oneshot(chat("qwen-plus", 10)).await.unwrap();
    assert_ne!(picked(&r1), picked(&r2));
    assert_eq!(up.seen().len(), 2);
    assert!(up.seen().iter().all(|s| s.at == up.seen()[0].at), "no wait");
    let stats = p.stats();
    assert_eq!((stats.picks("a"), stats.picks("b")), (1, 1));
}

#[tokio::test(start_paused = true)]
async fn clones_draw_different_random_choices() {
    let up = Upstream::new();
    let p = Pool::builder()
        .accounts((0..8).map(|i| Account::new(format!("a{i}"), "sk-x", up.clone()).unwrap()))
        .rng(SeededRng::new(5))
        .build()
        .unwrap();
    // Every clone starts from the same seeded state; without
    // decorrelation they would all pick the same account first.
    let mut firsts = std::collections::HashSet::new();
    for _ in 0..16 {
        firsts.insert(picked(&p.clone().oneshot(chat("m", 1)).await.unwrap()));
    }
    assert!(firsts.len() > 2, "{firsts:?}");
}

#[tokio::test(start_paused = true)]
async fn one_account_not_ready_does_not_hold_up_the_others() {
    let (a_svc, mut a_handle) = tower_test::mock::pair::<Req, Res>();
    let (b_svc, mut b_handle) = tower_test::mock::pair::<Req, Res>();
    a_handle.allow(0);
    let mut p = Pool::builder()
        .account(Account::new("a", "sk-a", a_svc).unwrap())
        .account(Account::new("b", "sk-b", b_svc).unwrap())
        .rng(Counting(0))
        .build()
        .unwrap();
    // The pool is ready although a is not.
    assert_ready_ok!(task::spawn(()).enter(|cx, _| p.poll_ready(cx)));
    let mut to_a = task::spawn(p.call(chat("m", 1)));
    assert_pending!(to_a.poll());
    // The next call (to b) goes through meanwhile.
    assert_ready_ok!(task::spawn(()).enter(|cx, _| p.poll_ready(cx)));
    let mut to_b = task::spawn(p.call(chat("m", 1)));
    assert_pending!(to_b.poll());
    let (req, send) = b_handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer sk-b");
    send.send_response(ok());
    assert_eq!(picked(&assert_ready_ok!(to_b.poll())), "b");
    // a becomes ready: the waiting call is woken and sent.
    a_handle.allow(1);
    assert!(to_a.is_woken());
    assert_pending!(to_a.poll());
    let (req, send) = a_handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer sk-a");
    send.send_response(ok());
    assert_eq!(picked(&assert_ready_ok!(to_a.poll())), "a");
}

#[tokio::test(start_paused = true)]
async fn dropping_a_waiting_call_gives_its_slot_back() {
    let up = Upstream::new();
    let (mut p, _, _) = pool(
        vec![acct(
            "a",
            requests(1, 1),
            Some(Duration::from_secs(30)),
            &up,
        )],
        Fixed(0),
    );
    send(&mut p, chat("m", 1)).await.unwrap();
    let mut second = task::spawn(start(&mut p, chat("m", 1)));
    assert_pending!(second.poll()); // waits for t0 + 1 s
    drop(second);
    let mut third = task::spawn(start(&mut p, chat("m", 1)));
    assert_pending!(third.poll());
    tokio::time::advance(Duration::from_secs(1)).await;
    // The third takes the slot the second gave back (not t0 + 2 s).
    assert_ready_ok!(third.poll());
    assert_eq!(up.seen().len(), 2);
    // A future dropped before its first poll sends nothing either.
    drop(send(&mut p, chat("m", 1)));
    assert_eq!(up.seen().len(), 2);
}

// ---------------------------------------------------------------------------
// Streams and upstream throttles

type Frames = std::pin::Pin<
    Box<dyn futures_core::Stream<Item = Result<http_body::Frame<Bytes>, BoxError>> + Send>,
>;

/// A native SSE response whose frames are sent through a channel.
fn sse_channel() -> (tokio::sync::mpsc::UnboundedSender<&'static str>, Res) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let stream: Frames = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|s| {
            (
                Ok::<_, BoxError>(http_body::Frame::data(Bytes::from_static(s.as_bytes()))),
                rx,
            )
        })
    }));
    let res = Response::builder()
        .header("content-type", "text/event-stream")
        .body(http_body_util::StreamBody::new(stream).boxed_unsync())
        .unwrap();
    (tx, res)
}

const FRAME: &str = "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{},\"usage\":{\"input_tokens\":5,\"output_tokens\":15}}\n\n";

#[tokio::test(start_paused = true)]
async fn a_stream_holds_its_tokens_until_its_body_ends_and_the_pool_sees_it() {
    let (tx, stream) = sse_channel();
    let stream = Arc::new(Mutex::new(Some(stream)));
    let up = Upstream::answering(move |_| stream.lock().unwrap().take().unwrap_or_else(ok));
    let limits = Limits::tokens(Quota::per_second(nz(1000)));
    let (mut p, limiters, _) = pool(
        vec![acct("a", limits, None, &up), acct("b", limits, None, &up)],
        Fixed(0),
    );
    let m = model("qwen-plus");
    limiters[1].check(&m, Cost::new(0, 400)).unwrap(); // b: 600 left
    // 505 tokens reserved on a (1000 left, the most): 495 left.
    let res = send(&mut p, chat("qwen-plus", 500)).await.unwrap();
    assert_eq!(picked(&res), "a");
    let mut body = res.into_body();
    // While the stream runs, a has less room than b.
    assert_eq!(
        picked(&send(&mut p, chat("qwen-plus", 5)).await.unwrap()),
        "b"
    );
    tx.send(FRAME).unwrap();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(frame, FRAME.as_bytes(), "the body passes unchanged");
    drop(tx);
    assert!(body.frame().await.is_none());
    // The stream used 20 tokens, not 505: a is refunded (980 left) and is
    // the roomiest again.
    let left = limiters[0].snapshot(&m).unwrap().tokens.unwrap().remaining;
    assert_eq!(left, 980);
    assert_eq!(
        picked(&send(&mut p, chat("qwen-plus", 5)).await.unwrap()),
        "a"
    );
}

#[tokio::test(start_paused = true)]
async fn an_account_throttled_upstream_gets_no_calls_while_paused() {
    // a's first call gets a 429 (its rate grew too quickly: a burst 429
    // always pauses the key, where a lone `RateQuota` one only lowers its
    // rate a step); then all is well.
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let up = Upstream::answering(move |req| {
        let to_a = req.headers()["authorization"] == "Bearer sk-a";
        if to_a && first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            status(429, BURST_RATE)
        } else {
            ok()
        }
    });
    let (mut p, limiters, breakers) = pool(
        vec![
            acct("a", requests(100, 100), None, &up),
            acct("b", requests(100, 100), None, &up),
        ],
        Counting(0),
    );
    let res = drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await;
    assert_eq!((picked(&res), res.status().as_u16()), ("a".to_owned(), 429));
    // The 429 tightened a's limiter (paused 1 s, then half rate); a 429 is
    // not a failure for the breaker.
    assert_eq!(
        limiters[0].snapshot(&model("qwen-plus")).unwrap().throttles,
        1
    );
    assert_eq!(breakers[0].state(), State::Closed);
    for _ in 0..20 {
        let res = send(&mut p, chat("qwen-plus", 10)).await.unwrap();
        assert_eq!(picked(&res), "b");
    }
    // After the pause, a takes calls again (at a lower rate at first, so
    // once b has used some of its room).
    tokio::time::advance(Duration::from_secs(2)).await;
    let mut seen_a = false;
    for _ in 0..100 {
        seen_a |= picked(&send(&mut p, chat("qwen-plus", 10)).await.unwrap()) == "a";
    }
    assert!(seen_a);
}

#[tokio::test(start_paused = true)]
async fn works_for_services_without_limiter_or_breaker() {
    // An account without a limiter looks full; without a breaker, healthy.
    let up = Upstream::new();
    let mut p = Pool::builder()
        .account(Account::new("a", "sk-a", up.clone()).unwrap())
        .rng(Fixed(0))
        .build()
        .unwrap();
    for _ in 0..3 {
        let res = p.ready().await.unwrap().call(chat("m", 1)).await.unwrap();
        assert_eq!(picked(&res), "a");
    }
    assert_eq!(up.count("Bearer sk-a"), 3);
}

// ---------------------------------------------------------------------------
// Against the mock DashScope (loopback, paused clock)

// ---------------------------------------------------------------------------
// Several keys of one account, pinned requests, any backend (issue 13)

#[tokio::test(start_paused = true)]
async fn an_accounts_keys_are_used_in_turn_and_share_its_limit() {
    let up = Upstream::new();
    // One account, three keys, 3 requests a second: the keys take turns,
    // and all three draw on the one account's budget.
    let limiter: Limiter = RateLimiter::builder(requests(3, 3)).build_keyed();
    let svc = RateLimitLayer::keyed(limiter.clone(), ByModel)
        .reject()
        .layer(up.clone());
    let account = Account::new("acme", "sk-1", svc)
        .unwrap()
        .key("sk-2")
        .unwrap()
        .key("sk-3")
        .unwrap()
        .limiter(limiter, ByModel);
    let mut p = Pool::builder().account(account).build().unwrap();
    for _ in 0..3 {
        drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await;
    }
    // The fourth call (with sk-1) finds the account's budget spent.
    let e = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    assert!(e.is::<RateLimited>(), "{e}");
    tokio::time::advance(Duration::from_secs(1)).await;
    for _ in 0..2 {
        drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await;
    }
    assert_eq!(
        up.keys(),
        [
            "Bearer sk-1",
            "Bearer sk-2",
            "Bearer sk-3",
            "Bearer sk-2",
            "Bearer sk-3"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn a_pinned_request_goes_to_its_account_whatever_the_headroom() {
    use tower_qwen::pool::Pinned;
    let up = Upstream::new();
    let (mut p, limiters, breakers) = pool(
        vec![
            acct("a", requests(1, 10), None, &up),
            acct("b", requests(1, 10), None, &up),
        ],
        Fixed(0),
    );
    // b has less headroom, but the request is pinned to it.
    limiters[1]
        .check(&model("qwen-plus"), Cost::new(8, 0))
        .unwrap();
    let mut req = chat("qwen-plus", 10);
    req.extensions_mut().insert(Pinned::to("b"));
    let res = drain(send(&mut p, req).await.unwrap()).await;
    assert_eq!(picked(&res), "b");
    // A follow-up pinned from the answer's account.
    let mut req = chat("qwen-plus", 10);
    req.extensions_mut().insert(Pinned::from(
        res.extensions().get::<Picked>().unwrap().clone(),
    ));
    assert_eq!(picked(&drain(send(&mut p, req).await.unwrap()).await), "b");
    // An unknown account: a typed error, nothing sent.
    let mut req = chat("qwen-plus", 10);
    req.extensions_mut().insert(Pinned::to("nobody"));
    let e = send(&mut p, req).await.unwrap_err();
    assert!(exhausted(&e).is_unknown_account());
    assert!(Classifier::new().classify_error(&e).is_permanent());
    // A pinned account whose circuit is open: the pinned request fails fast
    // (it does not move to another account).
    breakers[1].force_open();
    let mut req = chat("qwen-plus", 10);
    req.extensions_mut().insert(Pinned::to("b"));
    let e = send(&mut p, req).await.unwrap_err();
    assert!(exhausted(&e).is_circuit_open());
    assert_eq!(up.count("Bearer sk-a"), 0);
    assert_eq!(up.count("Bearer sk-b"), 2);
}

#[tokio::test(start_paused = true)]
async fn one_limiter_by_account_and_model_serves_every_account() {
    use tower_qwen::key::{AccountModel, ByAccountModel};
    let up = Upstream::new();
    // One limiter for the whole pool, keyed (account, model): the pool
    // shows it each account by name, and sets the name on the request it
    // sends, whichever key of the account the call uses.
    let limiter: RateLimiter<AccountModel> = RateLimiter::builder(requests(1, 1)).build_keyed();
    let layer = RateLimitLayer::keyed(limiter.clone(), ByAccountModel::new()).reject();
    let account = |name: &str| {
        Account::new(name, format!("sk-{name}-1"), layer.layer(up.clone()))
            .unwrap()
            .key(format!("sk-{name}-2"))
            .unwrap()
            .limiter(limiter.clone(), ByAccountModel::new())
    };
    let mut p = Pool::builder()
        .accounts([account("a"), account("b")])
        .rng(Fixed(0))
        .build()
        .unwrap();
    let first = picked(&drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await);
    let second = picked(&drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await);
    assert_ne!(
        first, second,
        "the pool saw the first account's budget spent"
    );
    // Both accounts' budgets are spent for this second: the limiter keys by
    // account name, not by the API key the call carried.
    let e = send(&mut p, chat("qwen-plus", 10)).await.unwrap_err();
    assert!(e.is::<RateLimited>(), "{e}");
    assert_eq!(limiter.len(), 2);
    for name in ["a", "b"] {
        let key = AccountModel {
            account: tower_qwen::key::AccountId::Named(Arc::from(name)),
            model: model("qwen-plus"),
        };
        assert_eq!(
            limiter.snapshot(&key).unwrap().requests.unwrap().remaining,
            0
        );
    }
}

/// A backend of the test's own: every account has a fixed picture of its
/// quota (what a user's backend reports through `snapshot`), and admits
/// everything.
#[derive(Clone)]
struct Pictured(tower_qwen::rate_limit::Snapshot);

struct Go;

impl tower_qwen::rate_limit::Ticket for Go {
    type Permit = Go;
    fn ready_at(&self) -> Instant {
        Instant::now()
    }
    fn admit(self) -> Go {
        self
    }
}

impl tower_qwen::rate_limit::Permit for Go {
    fn tokens(&self) -> u32 {
        0
    }
    fn wants_feedback(&self) -> bool {
        false
    }
    fn finish(self, _: Option<ThrottleCause>, _: Option<u32>) {}
}

impl<K> tower_qwen::rate_limit::Backend<K> for Pictured {
    type Ticket = Go;
    type Pending = tower_qwen::rate_limit::Immediate<Result<Go, BoxError>>;
    fn decide<W: FnOnce(bool) -> Cost>(
        &self,
        _: &K,
        _: W,
        _: Duration,
        _: Instant,
    ) -> tower_qwen::rate_limit::Decision<Go, Self::Pending> {
        tower_qwen::rate_limit::Decision::Admitted(Go)
    }
    fn snapshot(&self, _: &K) -> Option<tower_qwen::rate_limit::Snapshot> {
        Some(self.0)
    }
}

#[tokio::test(start_paused = true)]
async fn the_pool_reads_any_backend() {
    let up = Upstream::new();
    let full = RateLimiter::new(requests(1, 10));
    let spent = RateLimiter::new(requests(1, 10));
    spent.check(&(), Cost::new(9, 0)).unwrap();
    let picture = |l: &RateLimiter| Pictured(l.snapshot(&()).unwrap());
    let account = |name: &str, b: Pictured| {
        Account::new(name, format!("sk-{name}"), up.clone())
            .unwrap()
            .limiter(b, tower_qwen::key::Global)
    };
    let mut p = Pool::builder()
        .accounts([account("a", picture(&spent)), account("b", picture(&full))])
        .rng(Fixed(0))
        .build()
        .unwrap();
    for _ in 0..3 {
        assert_eq!(
            picked(&drain(send(&mut p, chat("qwen-plus", 10)).await.unwrap()).await),
            "b"
        );
    }
    // The same backend drives the rate-limit layer.
    let svc = RateLimitLayer::new(picture(&full)).layer(up.clone());
    drain(svc.oneshot(chat("qwen-plus", 10)).await.unwrap()).await;
    assert_eq!(up.count("Bearer sk-b"), 3);
}

#[cfg(feature = "mock")]
mod against_the_mock {
    use std::num::NonZeroU64;
    use std::sync::atomic::{AtomicU64, Ordering};

    use futures_util::future::join_all;
    use hyper_util::client::legacy::Client;
    use hyper_util::client::legacy::connect::HttpConnector;
    use hyper_util::rt::TokioExecutor;
    use tower_qwen::mock::{MockDashScope, Quota as MockQuota};
    use tower_qwen::rate_limit::qwen_limits;

    use super::*;

    type Http = Client<HttpConnector, Full<Bytes>>;
    type Stack = CircuitBreaker<RateLimit<Http, RateLimiter<Option<Arc<str>>>, ByModel>>;

    struct Run {
        ok: u64,
        limited: u64,
        stats: tower_qwen::mock::Stats,
    }

    /// 40 callers loop for `secs` through a pool of `keys`, each with its
    /// own breaker and a local 300 RPM limiter (its own, or with `shared`
    /// one for all keys); the mock gives 300 RPM to each account and maps
    /// the keys onto them.
    async fn run(keys: &[(&str, &str)], shared: bool, secs: u64) -> Run {
        let mut b = MockDashScope::builder()
            .default_quota(MockQuota::new(
                nz(300),
                NonZeroU64::new(10_000_000).unwrap(),
            ))
            .output_tokens(nz(20))
            .seed(9);
        for (key, account) in keys {
            b = b.key(*key, *account);
        }
        let m = b.start().await.expect("mock starts");
        let client: Http = Client::builder(TokioExecutor::new()).build_http();
        let one: Limiter = RateLimiter::builder(qwen_limits(300, 10_000_000)).build_keyed();
        let accounts = keys.iter().enumerate().map(|(i, (key, _))| {
            let limiter = if shared {
                one.clone()
            } else {
                RateLimiter::builder(qwen_limits(300, 10_000_000)).build_keyed()
            };
            let breaker = CircuitBreakerLayer::new();
            let handle = breaker.handle();
            let svc: Stack = breaker.layer(
                RateLimitLayer::keyed(limiter.clone(), ByModel)
                    .wait(Duration::from_secs(60))
                    .layer(client.clone()),
            );
            Account::new(format!("account-{i}"), *key, svc)
                .unwrap()
                .limiter(limiter, ByModel)
                .breaker(handle)
        });
        let pool = Pool::builder()
            .accounts(accounts)
            .rng(SeededRng::new(11))
            .build()
            .unwrap();
        let url = format!("{}{CHAT}", m.base_url());
        let deadline = Instant::now() + Duration::from_secs(secs);
        let ok = Arc::new(AtomicU64::new(0));
        let limited = Arc::new(AtomicU64::new(0));
        let callers = (0..40).map(|_| {
            let (pool, url, ok, limited) = (pool.clone(), url.clone(), ok.clone(), limited.clone());
            async move {
                while Instant::now() < deadline {
                    let req = Request::post(&url)
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(
                            br#"{"model":"qwen-plus","max_tokens":20,"messages":[{"role":"user","content":"hello there"}]}"#,
                        )))
                        .unwrap();
                    match pool.clone().oneshot(req).await {
                        Ok(res) => {
                            let res = drain(res).await;
                            if res.status().is_success() && Instant::now() <= deadline {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => {
                            let wait = Classifier::new()
                                .classify_error(&e)
                                .retry_after()
                                .unwrap_or(Duration::from_millis(100));
                            limited.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(wait).await;
                        }
                    }
                }
            }
        });
        join_all(callers).await;
        let stats = m.stats();
        m.shutdown().await;
        Run {
            ok: ok.load(Ordering::Relaxed),
            limited: limited.load(Ordering::Relaxed),
            stats,
        }
    }

    const SECS: u64 = 30;

    #[tokio::test(start_paused = true)]
    async fn two_accounts_give_twice_the_goodput_of_two_keys_of_one_account() {
        let two = run(&[("sk-1", "acme"), ("sk-2", "globex")], false, SECS).await;
        let one = run(&[("sk-1", "acme"), ("sk-2", "acme")], false, SECS).await;
        let one_shared = run(&[("sk-1", "acme"), ("sk-2", "acme")], true, SECS).await;
        let single = run(&[("sk-1", "acme")], false, SECS).await;
        for (what, r) in [
            ("two accounts", &two),
            ("two keys of one account", &one),
            ("two keys of one account, one limiter", &one_shared),
            ("single key", &single),
        ] {
            eprintln!(
                "{what}: {} ok in {SECS} s, {} 429s, {} upstream calls, {} local refusals",
                r.ok,
                r.stats.status(429),
                r.stats.requests,
                r.limited
            );
        }
        // Two accounts of 5 RPS: close to 10 RPS, no 429.
        assert!(two.ok >= 95 * SECS / 10, "{} in {SECS} s", two.ok);
        assert_eq!(two.stats.status(429), 0, "{:?}", two.stats);
        assert_eq!(two.limited, 0);
        // Two keys of one account: its one quota, 5 RPS at most, with 429s
        // (the local limiters believed in two quotas).
        assert!(one.ok <= 5 * SECS + 5, "{}", one.ok);
        assert!(one.stats.status(429) > 0);
        // The same keys, known to share one account (one limiter): 5 RPS,
        // no 429.
        assert!(one_shared.ok >= 45 * SECS / 10, "{}", one_shared.ok);
        assert_eq!(one_shared.stats.status(429), 0);
        // A single key: 5 RPS, no 429.
        assert!(
            single.ok >= 45 * SECS / 10 && single.ok <= 5 * SECS + 5,
            "{}",
            single.ok
        );
        assert_eq!(single.stats.status(429), 0);
        assert!(two.ok * 10 >= one.ok * 18, "{} vs {}", two.ok, one.ok);
    }
}
