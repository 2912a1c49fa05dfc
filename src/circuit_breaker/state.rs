//! The breaker's state machine. It never reads a clock: every method that
//! needs the time takes `now` (or a closure that yields it, called only off
//! the closed-state fast path).
//!
//! The closed state is lock-free: one atomic word holds the state and its
//! generation, a counter holds the consecutive failures, and the sliding
//! window is a ring of outcome bits. Everything else (tripping, half-open
//! probes, forcing) takes a short mutex; those paths are rare.

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::classify::Outcome;
use crate::time::Instant;

use super::config::{Config, FailureRate, TripAction};

/// The state of a circuit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Calls pass; failures are counted.
    Closed,
    /// Calls fail fast with [`CircuitOpen`](super::error::CircuitOpen) until
    /// the open duration has passed.
    Open,
    /// A bounded number of probe calls pass; the first success closes the
    /// circuit, a failure opens it again for longer.
    HalfOpen,
    /// The trip action is [`TripAction::Degrade`]: calls pass at a low rate
    /// (the rest fail fast); once the open duration has passed, admitted
    /// calls are probes, as in half-open.
    Degraded,
    /// Forced open through a [`BreakerHandle`](super::BreakerHandle): every
    /// call fails fast until released.
    ForcedOpen,
    /// Forced closed through a [`BreakerHandle`](super::BreakerHandle):
    /// every call passes and nothing is counted until released.
    ForcedClosed,
}

const CLOSED: u64 = 0;
const OPEN: u64 = 1;
const HALF_OPEN: u64 = 2;
const DEGRADED: u64 = 3;
const FORCED_OPEN: u64 = 4;
const FORCED_CLOSED: u64 = 5;
const MODE_BITS: u64 = 3;
const MODE_MASK: u64 = (1 << MODE_BITS) - 1;

#[inline]
fn pack(mode: u64, generation: u64) -> u64 {
    // Equivalent mutant `^` for `|`: the two ranges share no bit.
    (generation << MODE_BITS) | mode
}

#[inline]
fn mode(word: u64) -> u64 {
    word & MODE_MASK
}

#[inline]
fn generation(word: u64) -> u64 {
    word >> MODE_BITS
}

fn state_of(mode: u64) -> State {
    match mode {
        CLOSED => State::Closed,
        OPEN => State::Open,
        HALF_OPEN => State::HalfOpen,
        DEGRADED => State::Degraded,
        FORCED_OPEN => State::ForcedOpen,
        _ => State::ForcedClosed,
    }
}

/// How one call ended, as the breaker counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    Success,
    Failure,
    /// Neither: throttled (by default), or abandoned by the caller.
    Ignore,
}

impl Verdict {
    /// Reads an outcome with the configured failure predicate. A throttled
    /// call that is not a failure is ignored (the upstream answered, but
    /// says nothing about its health); `slow` turns a success into a
    /// failure.
    pub(crate) fn of(outcome: &Outcome, is_failure: fn(&Outcome) -> bool, slow: bool) -> Verdict {
        if is_failure(outcome) {
            Verdict::Failure
        } else if outcome.is_throttled() {
            Verdict::Ignore
        } else if slow && outcome.is_success() {
            Verdict::Failure
        } else {
            Verdict::Success
        }
    }
}

/// What admission decided about one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Let the call through; report its verdict with this ticket.
    Pass(Ticket),
    /// Fail fast.
    Reject {
        /// When trying again makes sense, if known.
        retry_after: Option<Duration>,
        /// The state that refused.
        state: State,
    },
}

/// How an admitted call is counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ticket {
    /// Counted in the closed state of this generation.
    Closed(u64),
    /// A probe (half-open, or degraded past its open duration) of this
    /// generation.
    Probe(u64),
    /// Not counted (forced closed, or degraded before its probes start).
    Quiet,
}

/// A change of state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transition {
    /// The state before.
    pub from: State,
    /// The state after.
    pub to: State,
    /// For [`State::Open`] and [`State::Degraded`]: how long until probes
    /// start.
    pub open_for: Option<Duration>,
    /// How many times in a row the circuit has tripped without closing.
    pub trips: u32,
}

/// The sliding window: the verdicts of the last `size` counted calls, one
/// bit each (1 = failure).
struct Window {
    size: u64,
    total: AtomicU64,
    bits: Box<[AtomicU64]>,
}

impl Window {
    fn new(size: u32) -> Self {
        let size = u64::from(size.max(1));
        let words = size.div_ceil(64) as usize;
        Self {
            size,
            total: AtomicU64::new(0),
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Records one verdict. For a failure, returns `(calls, failures)` in
    /// the window.
    #[inline]
    fn push(&self, failure: bool) -> Option<(u64, u64)> {
        let i = self.total.fetch_add(1, Ordering::Relaxed);
        let slot = i % self.size;
        let word = &self.bits[(slot / 64) as usize];
        let mask = 1u64 << (slot % 64);
        if failure {
            word.fetch_or(mask, Ordering::Relaxed);
            let failures = self
                .bits
                .iter()
                .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
                .sum();
            Some(((i + 1).min(self.size), failures))
        } else {
            // Equivalent mutant `|` for `&`: it only clears a bit already clear.
            if word.load(Ordering::Relaxed) & mask != 0 {
                word.fetch_and(!mask, Ordering::Relaxed);
            }
            None
        }
    }

    fn clear(&self) {
        self.total.store(0, Ordering::Relaxed);
        for w in self.bits.iter() {
            w.store(0, Ordering::Relaxed);
        }
    }

    fn counts(&self) -> (u64, u64) {
        let calls = self.total.load(Ordering::Relaxed).min(self.size);
        let failures = self
            .bits
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum();
        (calls, failures)
    }
}

/// The rarely touched part, behind a mutex.
struct Slow {
    /// Trips in a row without closing.
    trips: u32,
    /// Probes in flight in half-open.
    probes: u32,
}

/// One circuit. See the [module docs](self).
pub(crate) struct Circuit {
    word: AtomicU64,
    consecutive: AtomicU32,
    /// Made by the first call counted with a failure-rate rule, as long as
    /// that rule's window says (services made with other settings share
    /// it).
    window: OnceLock<Window>,
    /// Nanoseconds since `base` at which probes start (open and degraded).
    open_until: AtomicU64,
    /// Nanoseconds since `base` of the next degraded admission.
    next_slot: AtomicU64,
    base: Instant,
    slow: Mutex<Slow>,
}

#[inline]
fn nanos(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

impl Circuit {
    /// A closed circuit; `base` is any instant not after the `now`s that
    /// will be passed in.
    pub(crate) fn new(base: Instant) -> Self {
        Self {
            word: AtomicU64::new(pack(CLOSED, 0)),
            consecutive: AtomicU32::new(0),
            window: OnceLock::new(),
            open_until: AtomicU64::new(0),
            next_slot: AtomicU64::new(0),
            base,
            slow: Mutex::new(Slow {
                trips: 0,
                probes: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slow> {
        self.slow
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The state now (an open circuit whose time is up still reads
    /// [`State::Open`] until a call arrives).
    pub(crate) fn state(&self) -> State {
        state_of(mode(self.word.load(Ordering::Acquire)))
    }

    /// Whether the circuit is closed, without a clock read.
    #[inline]
    pub(crate) fn closed_ticket(&self) -> Option<Ticket> {
        let w = self.word.load(Ordering::Acquire);
        (mode(w) == CLOSED).then(|| Ticket::Closed(generation(w)))
    }

    /// Decides whether a call may pass. `now` is called only when the
    /// circuit is not closed.
    #[inline]
    pub(crate) fn admit(
        &self,
        cfg: &Config,
        now: impl FnOnce() -> Instant,
    ) -> (Admit, Option<Transition>) {
        if let Some(t) = self.closed_ticket() {
            return (Admit::Pass(t), None);
        }
        self.admit_slow(cfg, now())
    }

    #[cold]
    fn admit_slow(&self, cfg: &Config, now: Instant) -> (Admit, Option<Transition>) {
        let now_n = nanos(self.base, now);
        let w = self.word.load(Ordering::Acquire);
        match mode(w) {
            CLOSED => (Admit::Pass(Ticket::Closed(generation(w))), None),
            FORCED_CLOSED => (Admit::Pass(Ticket::Quiet), None),
            FORCED_OPEN => (
                Admit::Reject {
                    retry_after: None,
                    state: State::ForcedOpen,
                },
                None,
            ),
            OPEN => {
                let until = self.open_until.load(Ordering::Acquire);
                if now_n < until {
                    return (
                        Admit::Reject {
                            retry_after: Some(Duration::from_nanos(until - now_n)),
                            state: State::Open,
                        },
                        None,
                    );
                }
                let mut slow = self.lock();
                let mut transition = None;
                let w2 = self.word.load(Ordering::Acquire);
                if w2 == w {
                    // Time is up: half-open.
                    self.word
                        .store(pack(HALF_OPEN, generation(w) + 1), Ordering::Release);
                    slow.probes = 0;
                    transition = Some(Transition {
                        from: State::Open,
                        to: State::HalfOpen,
                        open_for: None,
                        trips: slow.trips,
                    });
                }
                let admit = self.admit_half_open(cfg, &mut slow);
                (admit, transition)
            }
            HALF_OPEN => {
                let mut slow = self.lock();
                (self.admit_half_open(cfg, &mut slow), None)
            }
            _ => self.admit_degraded(cfg, now_n),
        }
    }

    /// Under the lock.
    fn admit_half_open(&self, cfg: &Config, slow: &mut Slow) -> Admit {
        let w = self.word.load(Ordering::Acquire);
        match mode(w) {
            HALF_OPEN if slow.probes < cfg.half_open_probes => {
                slow.probes += 1;
                Admit::Pass(Ticket::Probe(generation(w)))
            }
            HALF_OPEN => Admit::Reject {
                retry_after: None,
                state: State::HalfOpen,
            },
            CLOSED => Admit::Pass(Ticket::Closed(generation(w))),
            FORCED_CLOSED => Admit::Pass(Ticket::Quiet),
            m => Admit::Reject {
                retry_after: None,
                state: state_of(m),
            },
        }
    }

    fn admit_degraded(&self, cfg: &Config, now_n: u64) -> (Admit, Option<Transition>) {
        let TripAction::Degrade(rate) = cfg.action else {
            // Unreachable: only a degrade action enters this state.
            return (
                Admit::Reject {
                    retry_after: None,
                    state: State::Degraded,
                },
                None,
            );
        };
        let interval = 1_000_000_000 / u64::from(rate.get());
        let mut next = self.next_slot.load(Ordering::Acquire);
        loop {
            if now_n < next {
                return (
                    Admit::Reject {
                        retry_after: Some(Duration::from_nanos(next - now_n)),
                        state: State::Degraded,
                    },
                    None,
                );
            }
            match self.next_slot.compare_exchange_weak(
                next,
                now_n + interval,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(actual) => next = actual,
            }
        }
        let w = self.word.load(Ordering::Acquire);
        if mode(w) != DEGRADED {
            return (Admit::Pass(Ticket::Quiet), None);
        }
        let ticket = if now_n >= self.open_until.load(Ordering::Acquire) {
            Ticket::Probe(generation(w))
        } else {
            Ticket::Quiet
        };
        (Admit::Pass(ticket), None)
    }

    /// Records how an admitted call ended. `now` is called only when the
    /// circuit trips.
    #[inline]
    pub(crate) fn record(
        &self,
        cfg: &Config,
        ticket: Ticket,
        verdict: Verdict,
        now: impl FnOnce() -> Instant,
    ) -> Option<Transition> {
        match ticket {
            Ticket::Quiet => None,
            Ticket::Closed(gen_) => {
                if verdict == Verdict::Ignore
                    || self.word.load(Ordering::Acquire) != pack(CLOSED, gen_)
                {
                    return None;
                }
                if verdict == Verdict::Success {
                    if let Some(rate) = &cfg.failure_rate {
                        self.window(rate).push(false);
                    }
                    if self.consecutive.load(Ordering::Relaxed) != 0 {
                        self.consecutive.store(0, Ordering::Relaxed);
                    }
                    return None;
                }
                let streak = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
                let mut trip = cfg.consecutive_failures.is_some_and(|n| streak >= n.get());
                if let Some(rate) = &cfg.failure_rate
                    && let Some((calls, failures)) = self.window(rate).push(true)
                {
                    trip |= calls >= u64::from(rate.min_calls)
                        && failures as f64 >= rate.ratio * calls as f64;
                }
                if trip {
                    self.trip(cfg, gen_, CLOSED, now())
                } else {
                    None
                }
            }
            Ticket::Probe(gen_) => self.record_probe(cfg, gen_, verdict, now),
        }
    }

    #[cold]
    fn record_probe(
        &self,
        cfg: &Config,
        gen_: u64,
        verdict: Verdict,
        now: impl FnOnce() -> Instant,
    ) -> Option<Transition> {
        let w = self.word.load(Ordering::Acquire);
        if generation(w) != gen_ || !matches!(mode(w), HALF_OPEN | DEGRADED) {
            return None;
        }
        match verdict {
            Verdict::Ignore => {
                if mode(w) == HALF_OPEN {
                    let mut slow = self.lock();
                    if self.word.load(Ordering::Acquire) == w {
                        slow.probes = slow.probes.saturating_sub(1);
                    }
                }
                None
            }
            Verdict::Success => {
                let mut slow = self.lock();
                if self.word.load(Ordering::Acquire) != w {
                    return None;
                }
                self.reset_counters();
                self.word.store(pack(CLOSED, gen_ + 1), Ordering::Release);
                let trips = std::mem::take(&mut slow.trips);
                slow.probes = 0;
                Some(Transition {
                    from: state_of(mode(w)),
                    to: State::Closed,
                    open_for: None,
                    trips,
                })
            }
            Verdict::Failure => self.trip(cfg, gen_, mode(w), now()),
        }
    }

    /// The sliding window, made for `rate` if this is the first call
    /// counted with a failure-rate rule.
    #[inline]
    fn window(&self, rate: &FailureRate) -> &Window {
        self.window.get_or_init(|| Window::new(rate.window))
    }

    fn reset_counters(&self) {
        self.consecutive.store(0, Ordering::Relaxed);
        if let Some(w) = self.window.get() {
            w.clear();
        }
    }

    /// Opens (or degrades) the circuit if it is still in `from` of
    /// generation `gen_`.
    fn trip(&self, cfg: &Config, gen_: u64, from: u64, now: Instant) -> Option<Transition> {
        let mut slow = self.lock();
        if self.word.load(Ordering::Acquire) != pack(from, gen_) {
            return None;
        }
        slow.trips = slow.trips.saturating_add(1);
        slow.probes = 0;
        let open_for = cfg.open_duration(slow.trips);
        let now_n = nanos(self.base, now);
        self.open_until.store(
            now_n.saturating_add(crate::time::duration_nanos(open_for)),
            Ordering::Release,
        );
        let to = match cfg.action {
            TripAction::Open => OPEN,
            TripAction::Degrade(_) => {
                if from != DEGRADED {
                    self.next_slot.store(now_n, Ordering::Release);
                }
                DEGRADED
            }
        };
        self.reset_counters();
        self.word.store(pack(to, gen_ + 1), Ordering::Release);
        Some(Transition {
            from: state_of(from),
            to: state_of(to),
            open_for: Some(open_for),
            trips: slow.trips,
        })
    }

    /// Trips the circuit as its trip action says, with probes starting at
    /// `until` rather than after the open duration (from a handle: a state
    /// shared by another breaker). A closed or half-open circuit trips (at
    /// least one trip in a row is counted, so a failed probe later opens it
    /// for longer); an open or degraded one whose probes start earlier
    /// waits until `until` instead (a degraded one keeps its pace); calls in
    /// flight are no longer counted. Nothing changes when `until` is not
    /// after `now`, when the circuit already waits as long, or when it is
    /// forced.
    pub(crate) fn trip_until(
        &self,
        cfg: &Config,
        until: Instant,
        now: Instant,
    ) -> Option<Transition> {
        let (until_n, now_n) = (nanos(self.base, until), nanos(self.base, now));
        if until_n <= now_n {
            return None;
        }
        let mut slow = self.lock();
        let w = self.word.load(Ordering::Acquire);
        let from = mode(w);
        match from {
            FORCED_OPEN | FORCED_CLOSED => return None,
            OPEN | DEGRADED if self.open_until.load(Ordering::Acquire) >= until_n => return None,
            _ => {}
        }
        let to = match cfg.action {
            TripAction::Open => OPEN,
            TripAction::Degrade(_) => DEGRADED,
        };
        if to == DEGRADED && from != DEGRADED {
            self.next_slot.store(now_n, Ordering::Release);
        }
        slow.trips = slow.trips.max(1);
        slow.probes = 0;
        self.open_until.store(until_n, Ordering::Release);
        self.reset_counters();
        self.word
            .store(pack(to, generation(w) + 1), Ordering::Release);
        Some(Transition {
            from: state_of(from),
            to: state_of(to),
            open_for: Some(Duration::from_nanos(until_n - now_n)),
            trips: slow.trips,
        })
    }

    /// Forces a state (from a handle): `ForcedOpen`, `ForcedClosed`, or
    /// `Closed` (release: back to normal, counters cleared).
    pub(crate) fn force(&self, to: State) -> Option<Transition> {
        let to_mode = match to {
            State::ForcedOpen => FORCED_OPEN,
            State::ForcedClosed => FORCED_CLOSED,
            _ => CLOSED,
        };
        let mut slow = self.lock();
        let w = self.word.load(Ordering::Acquire);
        if mode(w) == to_mode && to_mode != CLOSED {
            return None;
        }
        self.reset_counters();
        slow.probes = 0;
        if to_mode == CLOSED {
            slow.trips = 0;
        }
        self.word
            .store(pack(to_mode, generation(w) + 1), Ordering::Release);
        (mode(w) != to_mode).then(|| Transition {
            from: state_of(mode(w)),
            to: state_of(to_mode),
            open_for: None,
            trips: slow.trips,
        })
    }

    /// Calls and failures in the sliding window, and the consecutive
    /// failures.
    pub(crate) fn counts(&self) -> (u64, u64, u32) {
        let (calls, failures) = self.window.get().map_or((0, 0), Window::counts);
        (calls, failures, self.consecutive.load(Ordering::Relaxed))
    }

    /// When an open or degraded circuit starts probing, as a wait from
    /// `now`.
    pub(crate) fn open_remaining(&self, now: Instant) -> Option<Duration> {
        let w = self.word.load(Ordering::Acquire);
        if !matches!(mode(w), OPEN | DEGRADED) {
            return None;
        }
        let until = self.open_until.load(Ordering::Acquire);
        Some(Duration::from_nanos(
            until.saturating_sub(nanos(self.base, now)),
        ))
    }

    /// Whether the circuit holds nothing worth keeping (closed, no failure
    /// counted): a keyed map may evict it.
    pub(crate) fn is_idle(&self) -> bool {
        let w = self.word.load(Ordering::Acquire);
        mode(w) == CLOSED && self.consecutive.load(Ordering::Relaxed) == 0 && {
            let (_, failures) = self.window.get().map_or((0, 0), Window::counts);
            failures == 0
        }
    }
}

impl fmt::Debug for Circuit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (calls, failures, consecutive) = self.counts();
        f.debug_struct("Circuit")
            .field("state", &self.state())
            .field("calls", &calls)
            .field("failures", &failures)
            .field("consecutive", &consecutive)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use proptest::prelude::*;

    use super::*;
    use crate::circuit_breaker::config::FailureRate;

    const S: Duration = Duration::from_secs(1);

    fn cfg() -> Config {
        let mut c = Config::default();
        c.set_jitter(0.0);
        c
    }

    fn pass(c: &Circuit, cfg: &Config, now: Instant) -> Ticket {
        match c.admit(cfg, || now).0 {
            Admit::Pass(t) => t,
            other => panic!("expected pass, got {other:?}"),
        }
    }

    fn rejected(c: &Circuit, cfg: &Config, now: Instant) -> Option<Duration> {
        match c.admit(cfg, || now).0 {
            Admit::Reject { retry_after, .. } => retry_after,
            other => panic!("expected reject, got {other:?}"),
        }
    }

    #[test]
    fn three_consecutive_failures_open_then_a_probe_closes() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        for i in 0..3 {
            let t = pass(&c, &cfg, t0);
            let tr = c.record(&cfg, t, Verdict::Failure, || t0);
            assert_eq!(tr.is_some(), i == 2);
        }
        assert_eq!(c.state(), State::Open);
        assert_eq!(rejected(&c, &cfg, t0 + S), Some(4 * S));
        // Time up: one probe passes, a second one waits.
        let (admit, tr) = c.admit(&cfg, || t0 + 5 * S);
        assert_eq!(tr.unwrap().to, State::HalfOpen);
        let Admit::Pass(probe) = admit else { panic!() };
        assert!(matches!(probe, Ticket::Probe(_)));
        assert_eq!(rejected(&c, &cfg, t0 + 5 * S), None);
        let tr = c
            .record(&cfg, probe, Verdict::Success, || t0 + 6 * S)
            .unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.trips),
            (State::HalfOpen, State::Closed, 1)
        );
        assert_eq!(c.counts(), (0, 0, 0));
    }

    #[test]
    fn failed_probe_reopens_for_longer_capped() {
        let mut cfg = cfg();
        cfg.open_max = Duration::from_secs(12);
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        for _ in 0..3 {
            let t = pass(&c, &cfg, t0);
            c.record(&cfg, t, Verdict::Failure, || t0);
        }
        let mut now = t0;
        for expected in [5, 10, 12, 12] {
            assert_eq!(c.open_remaining(now), Some(Duration::from_secs(expected)));
            now += Duration::from_secs(expected);
            let probe = pass(&c, &cfg, now);
            let tr = c.record(&cfg, probe, Verdict::Failure, || now).unwrap();
            assert_eq!(tr.from, State::HalfOpen);
            assert_eq!(tr.to, State::Open);
        }
    }

    #[test]
    fn throttled_is_ignored_and_success_resets_the_streak() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let seq = [
            Verdict::Failure,
            Verdict::Failure,
            Verdict::Success,
            Verdict::Failure,
            Verdict::Ignore,
            Verdict::Ignore,
            Verdict::Failure,
        ];
        for v in seq {
            let t = pass(&c, &cfg, t0);
            assert!(c.record(&cfg, t, v, || t0).is_none());
        }
        assert_eq!(c.state(), State::Closed);
        let t = pass(&c, &cfg, t0);
        assert!(c.record(&cfg, t, Verdict::Failure, || t0).is_some());
    }

    #[test]
    fn verdicts() {
        use crate::classify::{PermanentReason, ThrottleCause};
        let f = Outcome::is_transient as fn(&Outcome) -> bool;
        assert_eq!(Verdict::of(&Outcome::TRANSIENT, f, false), Verdict::Failure);
        assert_eq!(
            Verdict::of(&Outcome::throttled(ThrottleCause::Requests), f, false),
            Verdict::Ignore
        );
        let perm = Outcome::Permanent {
            reason: PermanentReason::InvalidRequest,
        };
        assert_eq!(Verdict::of(&perm, f, false), Verdict::Success);
        assert_eq!(Verdict::of(&Outcome::Success, f, true), Verdict::Failure);
        let g = |o: &Outcome| o.is_transient() || o.is_throttled();
        assert_eq!(
            Verdict::of(&Outcome::throttled(ThrottleCause::Burst), g, false),
            Verdict::Failure
        );
    }

    #[test]
    fn failure_rate_over_the_window() {
        let mut cfg = cfg();
        cfg.consecutive_failures = None;
        cfg.failure_rate = Some(
            FailureRate::new(0.5)
                .unwrap()
                .window(NonZeroU32::new(10).unwrap())
                .min_calls(6),
        );
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        // 20 successes fill the window; then S,F alternating.
        for _ in 0..20 {
            let t = pass(&c, &cfg, t0);
            c.record(&cfg, t, Verdict::Success, || t0);
        }
        let mut tripped_at = None;
        for i in 0..10 {
            let v = if i % 2 == 0 {
                Verdict::Success
            } else {
                Verdict::Failure
            };
            let t = pass(&c, &cfg, t0);
            if c.record(&cfg, t, v, || t0).is_some() {
                tripped_at = Some(i);
                break;
            }
        }
        // Failures in the last 10: 1,2,3,4,5 at i = 1,3,5,7,9.
        assert_eq!(tripped_at, Some(9));
        assert_eq!(c.state(), State::Open);
    }

    #[test]
    fn min_calls_holds_the_rate_back() {
        let mut cfg = cfg();
        cfg.consecutive_failures = None;
        cfg.failure_rate = Some(FailureRate::new(0.5).unwrap().min_calls(5));
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        for i in 0..5 {
            let t = pass(&c, &cfg, t0);
            let tr = c.record(&cfg, t, Verdict::Failure, || t0);
            assert_eq!(tr.is_some(), i == 4);
        }
    }

    #[test]
    fn stale_outcomes_are_ignored() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let old: Vec<_> = (0..5).map(|_| pass(&c, &cfg, t0)).collect();
        for t in &old[..3] {
            c.record(&cfg, *t, Verdict::Failure, || t0);
        }
        assert_eq!(c.state(), State::Open);
        // Late failures from before the trip change nothing.
        for t in &old[3..] {
            assert!(c.record(&cfg, *t, Verdict::Failure, || t0).is_none());
        }
        assert_eq!(c.open_remaining(t0), Some(5 * S));
        // A probe closes; a late success from the old generation is ignored.
        let probe = pass(&c, &cfg, t0 + 5 * S);
        c.record(&cfg, probe, Verdict::Success, || t0 + 5 * S);
        assert_eq!(c.state(), State::Closed);
        assert!(
            c.record(&cfg, probe, Verdict::Failure, || t0 + 5 * S)
                .is_none()
        );
        assert_eq!(c.counts(), (0, 0, 0));
    }

    #[test]
    fn abandoned_probe_frees_its_slot() {
        let mut cfg = cfg();
        cfg.half_open_probes = 2;
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        for _ in 0..3 {
            let t = pass(&c, &cfg, t0);
            c.record(&cfg, t, Verdict::Failure, || t0);
        }
        let now = t0 + 5 * S;
        let a = pass(&c, &cfg, now);
        let _b = pass(&c, &cfg, now);
        assert_eq!(rejected(&c, &cfg, now), None);
        assert!(c.record(&cfg, a, Verdict::Ignore, || now).is_none());
        let _c = pass(&c, &cfg, now);
        assert_eq!(c.state(), State::HalfOpen);
    }

    #[test]
    fn degrade_admits_at_the_rate_then_probes() {
        let mut cfg = cfg();
        cfg.action = TripAction::degrade();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        for _ in 0..3 {
            let t = pass(&c, &cfg, t0);
            c.record(&cfg, t, Verdict::Failure, || t0);
        }
        assert_eq!(c.state(), State::Degraded);
        // 5 per second: one now, the next 200 ms later.
        assert_eq!(pass(&c, &cfg, t0), Ticket::Quiet);
        assert_eq!(rejected(&c, &cfg, t0), Some(Duration::from_millis(200)));
        let mut admitted = 0;
        let mut now = t0;
        while now < t0 + 5 * S {
            if let (Admit::Pass(t), _) = c.admit(&cfg, || now) {
                assert_eq!(t, Ticket::Quiet);
                // Failures of non-probe calls change nothing.
                assert!(c.record(&cfg, t, Verdict::Failure, || now).is_none());
                admitted += 1;
            }
            now += Duration::from_millis(50);
        }
        assert_eq!(admitted, 24);
        // Past the open duration calls are probes; a failure degrades again
        // for twice as long, a success closes.
        let p = pass(&c, &cfg, now);
        assert!(matches!(p, Ticket::Probe(_)));
        let tr = c.record(&cfg, p, Verdict::Failure, || now).unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.open_for),
            (State::Degraded, State::Degraded, Some(10 * S))
        );
        now += 10 * S;
        let p = pass(&c, &cfg, now);
        let tr = c.record(&cfg, p, Verdict::Success, || now).unwrap();
        assert_eq!((tr.from, tr.to), (State::Degraded, State::Closed));
    }

    #[test]
    fn forcing() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        assert_eq!(c.force(State::ForcedOpen).unwrap().to, State::ForcedOpen);
        assert!(c.force(State::ForcedOpen).is_none());
        assert_eq!(rejected(&c, &cfg, t0 + 1000 * S), None);
        c.force(State::ForcedClosed);
        for _ in 0..10 {
            let t = pass(&c, &cfg, t0);
            assert!(c.record(&cfg, t, Verdict::Failure, || t0).is_none());
        }
        assert_eq!(c.state(), State::ForcedClosed);
        assert_eq!(c.force(State::Closed).unwrap().to, State::Closed);
        assert_eq!(c.state(), State::Closed);
    }

    #[test]
    fn jitter_only_shortens() {
        let mut cfg = Config::default();
        cfg.set_rng(crate::util::rng::SeededRng::new(3));
        for trips in 1..10 {
            let d = cfg.open_duration(trips);
            let full = Duration::from_secs(5)
                .saturating_mul(1 << (trips - 1))
                .min(Duration::from_secs(60));
            assert!(d <= full && d >= full.mul_f64(0.8), "{d:?} {full:?}");
        }
    }

    /// Failures until the circuit trips: a bounded number, so a breaker
    /// that never trips fails the test instead of hanging it.
    fn trip_now(c: &Circuit, cfg: &Config, now: Instant) -> Transition {
        for _ in 0..1_000 {
            let t = pass(c, cfg, now);
            if let Some(tr) = c.record(cfg, t, Verdict::Failure, || now) {
                return tr;
            }
        }
        panic!("1000 failures in a row did not trip the circuit");
    }

    fn gen_of(c: &Circuit) -> u64 {
        generation(c.word.load(Ordering::Acquire))
    }

    /// #19: the clock is read only off the closed fast path and when a
    /// call trips the circuit.
    #[test]
    fn the_clock_is_read_only_when_needed() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let no_clock = || -> Instant { panic!("the clock was read") };
        for v in [
            Verdict::Success,
            Verdict::Failure,
            Verdict::Ignore,
            Verdict::Failure,
        ] {
            let (Admit::Pass(t), None) = c.admit(&cfg, no_clock) else {
                panic!("closed circuits admit");
            };
            assert!(c.record(&cfg, t, v, no_clock).is_none());
        }
        let t = pass(&c, &cfg, t0);
        let mut read = 0;
        let tr = c.record(&cfg, t, Verdict::Failure, || {
            read += 1;
            t0
        });
        assert_eq!((tr.map(|t| t.to), read), (Some(State::Open), 1));
    }

    /// #19: every change of state moves to a new generation, so no ticket
    /// of an earlier state is ever taken for one of the current state.
    #[test]
    fn generations_only_grow() {
        let mut cfg = cfg();
        cfg.half_open_probes = 2;
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let mut seen = vec![gen_of(&c)];
        let mut step = |c: &Circuit| {
            let g = gen_of(c);
            assert!(g > *seen.last().unwrap(), "{seen:?} then {g}");
            seen.push(g);
        };
        trip_now(&c, &cfg, t0);
        step(&c);
        let probe = pass(&c, &cfg, t0 + 5 * S);
        step(&c);
        let late_probe = pass(&c, &cfg, t0 + 5 * S);
        c.record(&cfg, probe, Verdict::Success, || t0 + 5 * S)
            .unwrap();
        step(&c);
        c.force(State::ForcedOpen).unwrap();
        step(&c);
        c.force(State::ForcedClosed).unwrap();
        step(&c);
        c.force(State::Closed).unwrap();
        step(&c);
        // A probe of an earlier half-open does not close a later one.
        trip_now(&c, &cfg, t0 + 6 * S);
        step(&c);
        let _current = pass(&c, &cfg, t0 + 20 * S);
        step(&c);
        assert_eq!(c.state(), State::HalfOpen);
        assert!(
            c.record(&cfg, late_probe, Verdict::Success, || t0 + 20 * S)
                .is_none()
        );
        assert!(
            c.record(&cfg, late_probe, Verdict::Failure, || t0 + 20 * S)
                .is_none()
        );
        assert_eq!(c.state(), State::HalfOpen);
    }

    /// #19: both triggers at once still trip; the window counts past 64
    /// calls; idle means closed with nothing counted.
    #[test]
    fn triggers_windows_and_idleness() {
        let mut cfg = cfg();
        cfg.failure_rate = Some(FailureRate::new(1.0).unwrap().min_calls(3));
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        assert!(c.is_idle());
        for _ in 0..2 {
            let t = pass(&c, &cfg, t0);
            assert!(c.record(&cfg, t, Verdict::Failure, || t0).is_none());
            assert!(!c.is_idle());
        }
        // The third failure meets both the streak and the rate.
        let t = pass(&c, &cfg, t0);
        assert!(c.record(&cfg, t, Verdict::Failure, || t0).is_some());
        assert!(!c.is_idle());

        // A window of 130 calls: bits beyond the first word count.
        let mut cfg = cfg.clone();
        cfg.consecutive_failures = None;
        cfg.failure_rate = Some(
            FailureRate::new(0.5)
                .unwrap()
                .window(NonZeroU32::new(130).unwrap())
                .min_calls(130),
        );
        let c = Circuit::new(t0);
        for i in 0..129 {
            let v = if i % 2 == 0 {
                Verdict::Failure
            } else {
                Verdict::Success
            };
            let t = pass(&c, &cfg, t0);
            assert!(c.record(&cfg, t, v, || t0).is_none(), "call {i}");
        }
        assert_eq!(c.counts(), (129, 65, 1));
        // A success resets the streak but the window still holds failures.
        let t = pass(&c, &cfg, t0);
        assert!(c.record(&cfg, t, Verdict::Success, || t0).is_none());
        assert_eq!(c.counts(), (130, 65, 0));
        assert!(!c.is_idle());
        // The 131st call replaces the first (a failure) with a success.
        let t = pass(&c, &cfg, t0);
        assert!(c.record(&cfg, t, Verdict::Success, || t0).is_none());
        assert_eq!(c.counts(), (130, 64, 0));
        // One more failure brings the rate to one half: the circuit trips.
        let t = pass(&c, &cfg, t0);
        assert!(c.record(&cfg, t, Verdict::Failure, || t0).is_some());
        // Without a window, idleness is the streak alone.
        let mut cfg = cfg.clone();
        cfg.failure_rate = None;
        cfg.consecutive_failures = NonZeroU32::new(5);
        let c = Circuit::new(t0);
        let t = pass(&c, &cfg, t0);
        c.record(&cfg, t, Verdict::Failure, || t0);
        assert!(!c.is_idle());
        assert_eq!(c.counts(), (0, 0, 1));
        let t = pass(&c, &cfg, t0);
        c.record(&cfg, t, Verdict::Success, || t0);
        assert!(c.is_idle());
    }

    /// #19: what forcing resets, and the trips it reports.
    #[test]
    fn forcing_resets_and_reports() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        // Releasing a closed circuit clears its counts.
        for _ in 0..2 {
            let t = pass(&c, &cfg, t0);
            c.record(&cfg, t, Verdict::Failure, || t0);
        }
        assert!(c.force(State::Closed).is_none());
        assert!(c.is_idle());
        let t = pass(&c, &cfg, t0);
        assert!(c.record(&cfg, t, Verdict::Failure, || t0).is_none());
        // Forcing open keeps the trips; releasing clears them.
        let c = Circuit::new(t0);
        assert_eq!(trip_now(&c, &cfg, t0).trips, 1);
        let tr = c.force(State::ForcedOpen).unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.trips, tr.open_for),
            (State::Open, State::ForcedOpen, 1, None)
        );
        assert_eq!(c.open_remaining(t0), None);
        let tr = c.force(State::Closed).unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.trips),
            (State::ForcedOpen, State::Closed, 0)
        );
        let tr = trip_now(&c, &cfg, t0);
        assert_eq!((tr.trips, tr.open_for), (1, Some(5 * S)));
        // Forced open rejects without a wait; forced closed passes quietly.
        c.force(State::ForcedOpen);
        assert_eq!(
            c.admit(&cfg, || t0).0,
            Admit::Reject {
                retry_after: None,
                state: State::ForcedOpen
            }
        );
        c.force(State::ForcedClosed);
        assert_eq!(pass(&c, &cfg, t0), Ticket::Quiet);
        assert!(c.force(State::ForcedClosed).is_none());
        assert_eq!(c.state(), State::ForcedClosed);
    }

    /// #19: the half-open admission under the lock, whatever state it
    /// finds (another thread may have moved the circuit meanwhile).
    #[test]
    fn half_open_admission_in_every_state() {
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let admit = |c: &Circuit| c.admit_half_open(&cfg, &mut c.lock());
        assert_eq!(admit(&c), Admit::Pass(Ticket::Closed(0)));
        c.force(State::ForcedClosed);
        assert_eq!(admit(&c), Admit::Pass(Ticket::Quiet));
        c.force(State::ForcedOpen);
        assert_eq!(
            admit(&c),
            Admit::Reject {
                retry_after: None,
                state: State::ForcedOpen
            }
        );
        c.force(State::Closed);
        // The slow path admits a circuit found closed as the fast path does.
        assert_eq!(
            c.admit_slow(&cfg, t0),
            (Admit::Pass(c.closed_ticket().unwrap()), None)
        );
        trip_now(&c, &cfg, t0);
        assert_eq!(
            admit(&c),
            Admit::Reject {
                retry_after: None,
                state: State::Open
            }
        );
    }

    /// #19: a success clears the failure it replaces in the window, also
    /// when that failure is the only one left in its word.
    #[test]
    fn successes_clear_the_failures_they_replace() {
        let mut cfg = cfg();
        cfg.consecutive_failures = None;
        cfg.failure_rate = Some(
            FailureRate::new(1.0)
                .unwrap()
                .window(NonZeroU32::new(4).unwrap())
                .min_calls(100),
        );
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let verdicts = [
            Verdict::Failure,
            Verdict::Success,
            Verdict::Success,
            Verdict::Success,
            Verdict::Success,
        ];
        let mut counts = Vec::new();
        for v in verdicts {
            let t = pass(&c, &cfg, t0);
            c.record(&cfg, t, v, || t0);
            counts.push(c.counts());
        }
        assert_eq!(
            counts,
            [(1, 1, 1), (2, 1, 0), (3, 1, 0), (4, 1, 0), (4, 0, 0)]
        );
        assert!(c.is_idle());
    }

    /// #19: a failed probe in the degraded state keeps the pace: the next
    /// admission waits for the rate interval.
    #[test]
    fn degraded_again_keeps_the_pace() {
        let mut cfg = cfg();
        cfg.action = TripAction::degrade();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let tr = trip_now(&c, &cfg, t0);
        assert_eq!(
            (tr.from, tr.to, tr.open_for),
            (State::Closed, State::Degraded, Some(5 * S))
        );
        assert_eq!(c.open_remaining(t0 + S), Some(4 * S));
        let at = t0 + 5 * S;
        let probe = pass(&c, &cfg, at);
        assert!(matches!(probe, Ticket::Probe(_)));
        let ms = Duration::from_millis;
        c.record(&cfg, probe, Verdict::Failure, || at + ms(10))
            .unwrap();
        assert_eq!(rejected(&c, &cfg, at + ms(20)), Some(ms(180)));
        assert_eq!(pass(&c, &cfg, at + ms(200)), Ticket::Quiet);
        assert_eq!(c.open_remaining(at + ms(10)), Some(10 * S));
        // An abandoned probe of a degraded circuit changes nothing.
        let at = at + ms(10) + 10 * S;
        let probe = pass(&c, &cfg, at);
        assert!(c.record(&cfg, probe, Verdict::Ignore, || at).is_none());
        assert_eq!(c.state(), State::Degraded);
        // Degrading after a close starts a fresh pace.
        let probe = pass(&c, &cfg, at + S);
        c.record(&cfg, probe, Verdict::Success, || at + S).unwrap();
        trip_now(&c, &cfg, at + S);
        assert_eq!(pass(&c, &cfg, at + S), Ticket::Quiet);
    }

    #[test]
    fn verdicts_of_slow_calls_and_debug() {
        use crate::classify::PermanentReason;
        let f = Outcome::is_transient as fn(&Outcome) -> bool;
        let perm = Outcome::Permanent {
            reason: PermanentReason::Auth,
        };
        assert_eq!(Verdict::of(&perm, f, true), Verdict::Success);
        assert_eq!(Verdict::of(&Outcome::TRANSIENT, f, true), Verdict::Failure);
        assert_eq!(Verdict::of(&Outcome::Success, f, false), Verdict::Success);
        let cfg = cfg();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        let t = pass(&c, &cfg, t0);
        c.record(&cfg, t, Verdict::Failure, || t0);
        assert_eq!(
            format!("{c:?}"),
            "Circuit { state: Closed, calls: 1, failures: 1, consecutive: 1 }"
        );
        assert_eq!(
            (
                pack(DEGRADED, 5),
                mode(pack(DEGRADED, 5)),
                generation(pack(DEGRADED, 5))
            ),
            (43, DEGRADED, 5)
        );
        assert_eq!(nanos(t0 + S, t0), 0);
        assert_eq!(nanos(t0, t0 + S), 1_000_000_000);
    }

    /// #13: a deadline shared by another breaker degrades a closed circuit
    /// until then, at the configured pace; then probes decide as usual.
    #[test]
    fn trip_until_degrades_a_closed_circuit_then_probes_as_usual() {
        let mut cfg = cfg();
        cfg.action = TripAction::degrade();
        let t0 = Instant::now();
        let c = Circuit::new(t0);
        // A failure counted before is forgotten; a ticket of the closed
        // state no longer counts.
        let t = pass(&c, &cfg, t0);
        c.record(&cfg, t, Verdict::Failure, || t0);
        let stale = pass(&c, &cfg, t0);
        let tr = c.trip_until(&cfg, t0 + 7 * S, t0 + S).unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.open_for, tr.trips),
            (State::Closed, State::Degraded, Some(6 * S), 1)
        );
        assert_eq!(c.counts(), (0, 0, 0));
        assert!(c.record(&cfg, stale, Verdict::Failure, || t0 + S).is_none());
        assert_eq!(c.open_remaining(t0 + S), Some(6 * S));
        // Degraded: 5 a second, quiet (not probes) before the deadline.
        let ms = Duration::from_millis;
        assert_eq!(pass(&c, &cfg, t0 + S), Ticket::Quiet);
        assert_eq!(rejected(&c, &cfg, t0 + S + ms(50)), Some(ms(150)));
        assert_eq!(pass(&c, &cfg, t0 + S + ms(200)), Ticket::Quiet);
        // From the deadline on, admitted calls are probes: a failure
        // degrades it for longer (the shared trip counts as the first).
        let probe = pass(&c, &cfg, t0 + 7 * S);
        assert!(matches!(probe, Ticket::Probe(_)));
        let tr = c
            .record(&cfg, probe, Verdict::Failure, || t0 + 7 * S)
            .unwrap();
        assert_eq!(
            (tr.from, tr.to, tr.open_for, tr.trips),
            (State::Degraded, State::Degraded, Some(10 * S), 2)
        );
        // And a success closes it.
        let at = t0 + 17 * S;
        let probe = pass(&c, &cfg, at);
        let tr = c.record(&cfg, probe, Verdict::Success, || at).unwrap();
        assert_eq!((tr.from, tr.to), (State::Degraded, State::Closed));
        assert!(c.is_idle());
    }

    /// #13: on an open or degraded circuit a later deadline extends the
    /// wait (probes in flight stop counting), an earlier or equal one
    /// changes nothing; a past deadline or a forced circuit is left alone.
    #[test]
    fn trip_until_extends_but_never_shortens() {
        let ms = Duration::from_millis;
        for degrade in [false, true] {
            let mut cfg = cfg();
            if degrade {
                cfg.action = TripAction::degrade();
            }
            let tripped = if degrade {
                State::Degraded
            } else {
                State::Open
            };
            let t0 = Instant::now();
            let c = Circuit::new(t0);
            assert!(c.trip_until(&cfg, t0, t0).is_none(), "a past deadline");
            assert!(c.trip_until(&cfg, t0, t0 + S).is_none());
            assert_eq!(c.state(), State::Closed);
            let tr = trip_now(&c, &cfg, t0);
            assert_eq!((tr.to, tr.open_for, tr.trips), (tripped, Some(5 * S), 1));
            // Earlier or equal: nothing.
            assert!(c.trip_until(&cfg, t0 + 3 * S, t0 + S).is_none());
            assert!(c.trip_until(&cfg, t0 + 5 * S, t0 + S).is_none());
            assert_eq!(c.open_remaining(t0 + S), Some(4 * S));
            // Later: the wait is extended, the trips kept.
            let tr = c.trip_until(&cfg, t0 + 8 * S, t0 + S).unwrap();
            assert_eq!(
                (tr.from, tr.to, tr.open_for, tr.trips),
                (tripped, tripped, Some(7 * S), 1)
            );
            assert_eq!(c.open_remaining(t0 + S), Some(7 * S));
            if !degrade {
                assert_eq!(rejected(&c, &cfg, t0 + 6 * S), Some(2 * S));
            }
            // A probe in flight when a later deadline arrives no longer
            // counts: its success does not close the circuit.
            let probe = pass(&c, &cfg, t0 + 8 * S);
            assert!(matches!(probe, Ticket::Probe(_)));
            let from = c.state();
            let tr = c.trip_until(&cfg, t0 + 9 * S, t0 + 8 * S + ms(1)).unwrap();
            assert_eq!((tr.from, tr.to), (from, tripped));
            assert!(
                c.record(&cfg, probe, Verdict::Success, || t0 + 8 * S)
                    .is_none()
            );
            assert_eq!(c.state(), tripped);
            // Then probing and recovery as usual.
            let probe = pass(&c, &cfg, t0 + 9 * S);
            let tr = c
                .record(&cfg, probe, Verdict::Success, || t0 + 9 * S)
                .unwrap();
            assert_eq!((tr.to, tr.trips), (State::Closed, 1));
            // Forced circuits keep what the operator forced.
            for forced in [State::ForcedOpen, State::ForcedClosed] {
                c.force(forced);
                assert!(c.trip_until(&cfg, t0 + 20 * S, t0 + 10 * S).is_none());
                assert_eq!(c.state(), forced);
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Admit,
        Finish(usize, u8),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => Just(Op::Admit),
            4 => (0usize..16, 0u8..3).prop_map(|(i, v)| Op::Finish(i, v)),
            1 => (0u64..20_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn invariants(ops in proptest::collection::vec(op(), 1..200), degrade in any::<bool>(), probes in 1u32..4) {
            let mut cfg = cfg();
            cfg.half_open_probes = probes;
            if degrade {
                cfg.action = TripAction::degrade();
            }
            let t0 = Instant::now();
            let c = Circuit::new(t0);
            let mut now = t0;
            let mut in_flight: Vec<Ticket> = Vec::new();
            let mut consecutive_closed_failures = 0;
            for op in ops {
                match op {
                    Op::Admit => {
                        let before = c.state();
                        match c.admit(&cfg, || now).0 {
                            Admit::Pass(t) => {
                                prop_assert!(!matches!(before, State::ForcedOpen));
                                in_flight.push(t);
                            }
                            Admit::Reject { retry_after, state } => {
                                prop_assert!(state != State::Closed);
                                if state == State::Open {
                                    let r = retry_after.unwrap();
                                    prop_assert!(r > Duration::ZERO && r <= cfg.open_max);
                                }
                            }
                        }
                    }
                    Op::Finish(i, v) => {
                        if in_flight.is_empty() { continue; }
                        let t = in_flight.swap_remove(i % in_flight.len());
                        let v = [Verdict::Success, Verdict::Failure, Verdict::Ignore][v as usize];
                        let was_current_closed = matches!(t, Ticket::Closed(g) if c.closed_ticket() == Some(Ticket::Closed(g)));
                        let tr = c.record(&cfg, t, v, || now);
                        if was_current_closed {
                            match v {
                                Verdict::Failure => consecutive_closed_failures += 1,
                                Verdict::Success => consecutive_closed_failures = 0,
                                Verdict::Ignore => {}
                            }
                            if consecutive_closed_failures >= 3 {
                                prop_assert!(tr.is_some());
                            }
                        }
                        if let Some(tr) = tr {
                            prop_assert!(tr.from != tr.to || tr.to == State::Degraded);
                            consecutive_closed_failures = 0;
                        }
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                let current = generation(c.word.load(Ordering::Acquire));
                let probing = in_flight.iter().filter(|t| **t == Ticket::Probe(current)).count();
                if c.state() == State::HalfOpen {
                    prop_assert!(probing <= probes as usize);
                }
                let (calls, failures, consecutive) = c.counts();
                prop_assert!(failures <= calls && calls <= 100);
                prop_assert!(consecutive < 3 || c.state() != State::Closed);
            }
        }
    }
}
