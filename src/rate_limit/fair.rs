//! The order in which waiting calls get their slot: arrival order
//! ([`Fifo`], the default) or a weighted fair share between flows
//! ([`FairShare`]), so that no flow takes a saturated quota by sending
//! faster.
//!
//! [`RateLimit`](super::RateLimit) in [`Mode::Wait`](super::Mode::Wait)
//! has one waiting queue per limiter key. With [`Fifo`] a call that must
//! wait books its slot at once, so waiters go in arrival order. With
//! [`FairShare`] the waiting calls of one limiter key are ordered by flow
//! (a client key, a tenant: whatever [`Flows`] returns) and weight, by
//! *self-clocked weighted fair queuing*: a call of a flow of weight `w` is
//! tagged `max(V, last tag of its flow) + 1/w`, where `V` is the tag of
//! the call last given its turn, and the smallest tag goes next. So:
//!
//! * while the quota is saturated, flows that keep calls waiting are
//!   admitted in proportion to their weights (3:1 gives 75% / 25%);
//! * a flow alone gets all of the quota (no idle reservation: the queue
//!   is work-conserving), and a call that finds nobody waiting decides at
//!   once, exactly as with [`Fifo`];
//! * a flow that floods (many concurrent waiters) only pushes its own tags
//!   further out: a call of another flow is tagged ahead of the flood's
//!   backlog and waits about as long as without the flood;
//! * no flow starves: every tag is finite and tags are served in order, so
//!   a weight-1 flow gets its `1/Σw` share of the turns however heavy the
//!   others are.
//!
//! Only the call whose turn it is books a slot with the backend, so at
//! most one call per limiter key holds a future slot; the others wait
//! unbooked (and invisible to snapshots). Dropping a waiting call gives
//! its place back (and, if its turn had come, its booked slot, then the
//! turn passes on). A call is refused at once, with
//! [`RateLimited`], when it finds its flow's
//! queue (or the key's) full, or when the queue expects its wait to exceed
//! `max_wait` (the booked slot of the turn, then the recent time between
//! turns for each call tagged ahead of it); one still queued when its
//! `max_wait` runs out (later calls of heavier flows went ahead) fails
//! then, also with [`RateLimited`]. A gateway answers all three with its
//! usual 429.
//!
//! Each call counts as one unit of its flow (the request dimension); the
//! token dimension still limits as usual but does not weigh the order.
//! The queues live in the process: with a shared backend (Redis), each
//! process orders its own waiting calls, and the split by weight holds
//! among the calls of each process.
//! Limiter keys and flows are told apart by a 64-bit keyed hash (a random
//! key per [`FairShare`]).
//!
//! # Example
//!
//! Two tenants, weights 3 and 1, each with eight calls waiting on a quota
//! of one call per second: the heavier one is served three times as often.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! use std::num::NonZeroU32;
//! use std::sync::{Arc, Mutex};
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use tower_qwen::classify::{FnClassifier, Outcome};
//! use tower_qwen::rate_limit::fair::FairShare;
//! use tower_qwen::rate_limit::{Limits, PerCall, Quota, RateLimitLayer, RateLimiter};
//!
//! let limiter = RateLimiter::new(Limits::requests(
//!     Quota::per_second(NonZeroU32::MIN).allow_burst(NonZeroU32::MIN),
//! ));
//! // A request is (tenant, weight).
//! let fair = FairShare::new(|req: &mut (&'static str, u32)| (req.0, NonZeroU32::new(req.1).unwrap()));
//! let order = Arc::new(Mutex::new(Vec::new()));
//! let seen = order.clone();
//! let mut svc = ServiceBuilder::new()
//!     .layer(
//!         RateLimitLayer::new(limiter)
//!             .cost(PerCall)
//!             .classifier(FnClassifier::new(|_: &()| Outcome::Success))
//!             .wait(Duration::from_secs(60))
//!             .fair(fair.clone()),
//!     )
//!     .service(service_fn(move |req: (&'static str, u32)| {
//!         seen.lock().unwrap().push(req.0);
//!         async { Ok::<_, std::convert::Infallible>(()) }
//!     }));
//!
//! let mut calls = Vec::new();
//! for _ in 0..8 {
//!     for req in [("light", 1), ("heavy", 3)] {
//!         calls.push(tokio::spawn(svc.ready().await.unwrap().call(req)));
//!     }
//! }
//! tokio::time::sleep(Duration::from_millis(7_500)).await;
//! // The first call went at once, then one a second: of those seven,
//! // six were heavy's.
//! let order = order.lock().unwrap().clone();
//! assert_eq!(order.len(), 8);
//! assert_eq!(order[1..].iter().filter(|t| **t == "heavy").count(), 6);
//! // One call holds the turn (booked for t = 8 s); seven still queue.
//! assert_eq!(fair.waiting(), 7);
//! # for c in calls { c.abort(); }
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::hash::{BuildHasher, Hash, RandomState};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::BoxError;
use crate::time::{self, Instant};

use super::error::{Dimension, RateLimited};

/// The virtual time one call of weight 1 takes.
const UNIT: u128 = 1 << 40;

/// Which flow a request belongs to, and the flow's weight. See the
/// [module docs](self).
///
/// Implemented by closures `Fn(&mut Req) -> (flow, NonZeroU32)`.
pub trait Flows<Req>: Clone + Send + Sync + 'static {
    /// The flow's identity (a client key, a tenant).
    type Flow: Hash;

    /// The flow of `req` and its weight.
    fn flow_of(&self, req: &mut Req) -> (Self::Flow, NonZeroU32);
}

impl<Req, F, Fl> Flows<Req> for F
where
    F: Fn(&mut Req) -> (Fl, NonZeroU32) + Clone + Send + Sync + 'static,
    Fl: Hash,
{
    type Flow = Fl;

    #[inline]
    fn flow_of(&self, req: &mut Req) -> (Fl, NonZeroU32) {
        self(req)
    }
}

mod sealed {
    pub trait Sealed {}
}

/// The order of a [`RateLimit`](super::RateLimit)'s waiting calls:
/// [`Fifo`] or [`FairShare`]. Sealed.
pub trait WaitOrder<Req, Key>: sealed::Sealed + Clone + Send + Sync + 'static {
    /// Where a call for `key` that may wait up to `max_wait` goes.
    #[doc(hidden)]
    fn place(&self, key: &Key, req: &mut Req, max_wait: Duration) -> Place;
}

/// Where a call goes (see [`WaitOrder`]).
#[doc(hidden)]
pub struct Place(pub(crate) PlaceKind);

impl fmt::Debug for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            PlaceKind::Free => "Free",
            PlaceKind::First(_) => "First",
            PlaceKind::Queued(_) => "Queued",
            PlaceKind::Full(_) => "Full",
        })
    }
}

pub(crate) enum PlaceKind {
    /// No queue: decide now (a booked call waits for its slot).
    Free,
    /// Nobody waits for this key: decide now; a call that must wait takes
    /// the turn.
    First(Hold),
    /// Wait for the turn, then decide.
    Queued(WaitTurn),
    /// The queue is full: refused.
    Full(BoxError),
}

/// Arrival order: a call that must wait books its slot at once. The
/// default. See the [module docs](self).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fifo;

impl sealed::Sealed for Fifo {}

impl<Req, Key> WaitOrder<Req, Key> for Fifo {
    #[inline]
    fn place(&self, _: &Key, _: &mut Req, _: Duration) -> Place {
        Place(PlaceKind::Free)
    }
}

/// Weighted fair waiting between the flows [`Flows`] finds. See the
/// [module docs](self) for an example.
///
/// # Clone
///
/// Clones share the queues (a layer's services and their clones wait in
/// one queue per limiter key).
///
/// # Default
///
/// At most 1,024 waiting calls per flow and 10,000 per limiter key.
pub struct FairShare<F> {
    flows: F,
    max_per_flow: usize,
    max_waiters: usize,
    shared: Arc<Shared>,
}

impl<F: Clone> Clone for FairShare<F> {
    fn clone(&self) -> Self {
        Self {
            flows: self.flows.clone(),
            max_per_flow: self.max_per_flow,
            max_waiters: self.max_waiters,
            shared: self.shared.clone(),
        }
    }
}

impl<F> fmt::Debug for FairShare<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FairShare")
            .field("max_per_flow", &self.max_per_flow)
            .field("max_waiters", &self.max_waiters)
            .field("waiting", &self.waiting())
            .finish_non_exhaustive()
    }
}

impl<F> FairShare<F> {
    /// Fair waiting between the flows `flows` finds, by their weights.
    pub fn new(flows: F) -> Self {
        Self {
            flows,
            max_per_flow: 1024,
            max_waiters: 10_000,
            shared: Arc::new(Shared {
                hasher: RandomState::new(),
                lanes: Mutex::new(HashMap::new()),
                active: AtomicUsize::new(0),
            }),
        }
    }

    /// The most calls of one flow that wait for one limiter key; the next
    /// is refused at once. Default is 1,024.
    pub fn max_waiters_per_flow(mut self, max: usize) -> Self {
        self.max_per_flow = max.max(1);
        self
    }

    /// The most calls that wait for one limiter key, all flows together;
    /// the next is refused at once. Default is 10,000.
    pub fn max_waiters(mut self, max: usize) -> Self {
        self.max_waiters = max.max(1);
        self
    }

    /// How many calls wait in the queues now (not counting those whose
    /// turn has come).
    pub fn waiting(&self) -> usize {
        self.shared
            .lock()
            .values()
            .map(|l| l.queue.len())
            .sum::<usize>()
    }
}

impl<F> sealed::Sealed for FairShare<F> {}

impl<Req, Key, F> WaitOrder<Req, Key> for FairShare<F>
where
    F: Flows<Req>,
    Key: Hash,
{
    fn place(&self, key: &Key, req: &mut Req, max_wait: Duration) -> Place {
        if max_wait.is_zero() {
            return Place(PlaceKind::Free);
        }
        let sh = &self.shared;
        let lane = sh.hasher.hash_one(key);
        // Nothing waits anywhere (the common case): no lock.
        if sh.active.load(Ordering::Acquire) == 0 {
            return Place(PlaceKind::First(Hold {
                shared: sh.clone(),
                lane,
            }));
        }
        let (flow, weight) = self.flows.flow_of(req);
        let flow = sh.hasher.hash_one(flow);
        let mut lanes = sh.lock();
        let Some(l) = lanes.get_mut(&lane) else {
            return Place(PlaceKind::First(Hold {
                shared: sh.clone(),
                lane,
            }));
        };
        let queued = l.flows.get(&flow).map_or(0, |f| f.queued);
        if queued >= self.max_per_flow || l.queue.len() >= self.max_waiters {
            let retry = l.estimate(l.queue.len(), max_wait);
            tracing::debug!(
                queued,
                waiting = l.queue.len(),
                "fair queue full; call refused"
            );
            return Place(PlaceKind::Full(Box::new(RateLimited::new(
                retry,
                Dimension::Requests,
            ))));
        }
        let finish = l.flows.get(&flow).map_or(0, |f| f.finish);
        let tag = l.virtual_time.max(finish) + UNIT / u128::from(weight.get());
        let seq = l.seq;
        // A call that would wait past its max_wait, as far as the queue can
        // tell (the turn's booked slot, then one turn per call ahead), is
        // refused now rather than at the end of its wait.
        if let Some(wait) = l.expected_wait(tag, seq, time::now(), max_wait)
            && wait > max_wait
        {
            tracing::debug!(
                wait_ms = wait.as_millis() as u64,
                "fair queue: the wait would exceed max_wait; call refused"
            );
            return Place(PlaceKind::Full(Box::new(RateLimited::new(
                wait,
                Dimension::Requests,
            ))));
        }
        let f = l.flows.entry(flow).or_insert(FlowState {
            finish: 0,
            queued: 0,
        });
        f.finish = tag;
        f.queued += 1;
        l.seq += 1;
        l.queue.insert((tag, seq), Waiter { flow, waker: None });
        Place(PlaceKind::Queued(WaitTurn {
            shared: sh.clone(),
            lane,
            tag,
            seq,
            done: false,
        }))
    }
}

/// The queues of one [`FairShare`], by limiter key.
struct Shared {
    hasher: RandomState,
    lanes: Mutex<HashMap<u64, Lane>>,
    /// How many lanes exist (0: the lock need not be taken).
    active: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Lane>> {
        // A panic under the lock leaves consistent data: every update is
        // a few assignments with no call out.
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// After a lane changed: pass the turn on and drop the lane if empty.
    fn settle(&self, lanes: &mut HashMap<u64, Lane>, lane: u64) {
        let Some(l) = lanes.get_mut(&lane) else {
            return;
        };
        l.dispatch();
        if l.holders == 0 && l.queue.is_empty() {
            lanes.remove(&lane);
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The waiting calls of one limiter key.
#[derive(Default)]
struct Lane {
    /// The tag of the call last given its turn.
    virtual_time: u128,
    seq: u64,
    /// Calls whose turn it is (usually 0 or 1; more when calls that found
    /// no queue booked at the same time).
    holders: usize,
    /// Waiting calls by (tag, arrival).
    queue: BTreeMap<(u128, u64), Waiter>,
    /// Flows with waiting calls.
    flows: HashMap<u64, FlowState>,
    /// Calls given their turn that have not seen it yet.
    granted: Vec<u64>,
    last_turn: Option<Instant>,
    /// A moving average of the time between turns (ns).
    spacing: u64,
    /// The slot the call holding the turn booked, if it did.
    slot: Option<Instant>,
    /// Before turns were measured: how far ahead the first slot was
    /// booked (ns).
    first_wait: u64,
}

struct Waiter {
    flow: u64,
    waker: Option<Waker>,
}

struct FlowState {
    /// The tag of the flow's last queued call.
    finish: u128,
    queued: usize,
}

impl Lane {
    /// Gives the turn to the smallest tag when nobody holds it.
    fn dispatch(&mut self) {
        if self.holders > 0 {
            return;
        }
        let Some(((tag, seq), w)) = self.queue.pop_first() else {
            return;
        };
        self.virtual_time = tag;
        self.holders = 1;
        self.slot = None;
        if let Some(f) = self.flows.get_mut(&w.flow) {
            f.queued -= 1;
            if f.queued == 0 {
                self.flows.remove(&w.flow);
            }
        }
        self.granted.push(seq);
        let now = time::now();
        if let Some(last) = self.last_turn {
            let dt = u64::try_from((now - last).as_nanos()).unwrap_or(u64::MAX);
            self.spacing = if self.spacing == 0 {
                dt
            } else {
                self.spacing - self.spacing / 8 + dt / 8
            };
        }
        self.last_turn = Some(now);
        if let Some(waker) = w.waker {
            waker.wake();
        }
    }

    /// A guess at the wait behind `ahead` calls (the refusal's
    /// `retry_after`): the recent time between turns, or `fallback`
    /// before any.
    fn booked(&mut self, slot: Option<Instant>) {
        let Some(slot) = slot else { return };
        self.slot = Some(slot);
        if self.first_wait == 0 {
            let ahead = slot.saturating_duration_since(time::now());
            self.first_wait = u64::try_from(ahead.as_nanos()).unwrap_or(u64::MAX);
        }
    }

    fn estimate(&self, ahead: usize, fallback: Duration) -> Duration {
        if self.spacing == 0 {
            return fallback;
        }
        let n = u64::try_from(ahead + self.holders).unwrap_or(u64::MAX);
        Duration::from_nanos(self.spacing.saturating_mul(n.max(1)))
    }

    /// The wait of a call tagged `(tag, seq)` arriving at `now`: the time
    /// to the booked slot of the turn, then one turn for each call ahead
    /// and one for itself. `None` when the queue cannot tell. Counts the
    /// calls ahead only as far as `max_wait` needs.
    fn expected_wait(
        &self,
        tag: u128,
        seq: u64,
        now: Instant,
        max_wait: Duration,
    ) -> Option<Duration> {
        let per_turn = if self.spacing > 0 {
            self.spacing
        } else {
            self.first_wait
        };
        let slot = self.slot?;
        if per_turn == 0 {
            return None;
        }
        let enough = u64::try_from(max_wait.as_nanos()).unwrap_or(u64::MAX) / per_turn + 1;
        let enough = usize::try_from(enough).unwrap_or(usize::MAX);
        let ahead = self.queue.range(..(tag, seq)).take(enough).count();
        let turns = u64::try_from(ahead + 1).unwrap_or(u64::MAX);
        let first = slot.saturating_duration_since(now);
        Some(first.saturating_add(Duration::from_nanos(per_turn.saturating_mul(turns))))
    }

    fn forget(&mut self, flow: u64) {
        if let Some(f) = self.flows.get_mut(&flow) {
            f.queued -= 1;
            if f.queued == 0 {
                self.flows.remove(&flow);
            }
        }
    }
}

/// A call that found no queue: if it must wait, [`Hold::take`] gives it
/// the turn, so later calls queue behind it.
pub(crate) struct Hold {
    shared: Arc<Shared>,
    lane: u64,
}

impl Hold {
    /// Takes the turn for a call booked for `slot` (`None`: not known yet).
    pub(crate) fn take(self, slot: Option<Instant>) -> Turn {
        let mut lanes = self.shared.lock();
        let l = lanes.entry(self.lane).or_insert_with(|| {
            self.shared.active.fetch_add(1, Ordering::AcqRel);
            Lane::default()
        });
        l.holders += 1;
        l.booked(slot);
        drop(lanes);
        Turn {
            shared: self.shared,
            lane: self.lane,
        }
    }
}

/// The turn of a limiter key's queue: dropped when the call is admitted
/// (or gone), which passes it to the next call.
pub(crate) struct Turn {
    shared: Arc<Shared>,
    lane: u64,
}

impl Turn {
    /// The call holding the turn booked `slot`.
    pub(crate) fn booked(&self, slot: Instant) {
        let mut lanes = self.shared.lock();
        if let Some(l) = lanes.get_mut(&self.lane) {
            l.booked(Some(slot));
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut lanes = self.shared.lock();
        if let Some(l) = lanes.get_mut(&self.lane) {
            l.holders -= 1;
        }
        self.shared.settle(&mut lanes, self.lane);
    }
}

/// A queued call, waiting for its turn. Dropping it gives its place back
/// (or, if its turn has come, passes the turn on).
pub(crate) struct WaitTurn {
    shared: Arc<Shared>,
    lane: u64,
    tag: u128,
    seq: u64,
    done: bool,
}

impl WaitTurn {
    pub(crate) fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<Turn> {
        let mut lanes = self.shared.lock();
        let Some(l) = lanes.get_mut(&self.lane) else {
            // Unreachable: a lane lives while it has a call queued.
            return Poll::Pending;
        };
        if let Some(i) = l.granted.iter().position(|&s| s == self.seq) {
            l.granted.swap_remove(i);
            self.done = true;
            return Poll::Ready(Turn {
                shared: self.shared.clone(),
                lane: self.lane,
            });
        }
        if let Some(w) = l.queue.get_mut(&(self.tag, self.seq)) {
            match &mut w.waker {
                Some(old) if old.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
        }
        Poll::Pending
    }

    /// The refusal of a call whose `max_wait` ran out in the queue.
    pub(crate) fn expired(&self, max_wait: Duration) -> BoxError {
        let lanes = self.shared.lock();
        let retry = lanes.get(&self.lane).map_or(max_wait, |l| {
            let ahead = l.queue.range(..(self.tag, self.seq)).take(100_000).count();
            l.estimate(ahead + 1, max_wait)
        });
        tracing::debug!(
            retry_after_ms = retry.as_millis() as u64,
            "call waited its max_wait in the fair queue; refused"
        );
        Box::new(RateLimited::new(retry, Dimension::Requests))
    }
}

impl Drop for WaitTurn {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut lanes = self.shared.lock();
        let Some(l) = lanes.get_mut(&self.lane) else {
            return;
        };
        if let Some(w) = l.queue.remove(&(self.tag, self.seq)) {
            l.forget(w.flow);
        } else if let Some(i) = l.granted.iter().position(|&s| s == self.seq) {
            // The turn came but was never taken: pass it on.
            l.granted.swap_remove(i);
            l.holders -= 1;
        }
        self.shared.settle(&mut lanes, self.lane);
    }
}

impl fmt::Debug for WaitTurn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WaitTurn")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for Turn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Turn")
    }
}
