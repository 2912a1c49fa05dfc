//! The state every clone of a concurrency-limited service shares: the
//! semaphore, the adaptive limit, and the handle that reads them.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::body::{BodyEnd, EndKind, Inspect};
use crate::time::Instant;

use super::aimd::{Aimd, AimdState, Latency, Sample, Signal};
use super::semaphore::Semaphore;

pub(crate) struct Shared {
    pub(crate) sem: Semaphore,
    /// The whole-number limit now in force.
    cap: AtomicUsize,
    pub(crate) adaptive: Option<Adaptive>,
}

pub(crate) struct Adaptive {
    cfg: Aimd,
    state: Mutex<AimdState>,
    round: AtomicU64,
}

/// When and how an adaptive call started.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Start {
    at: Instant,
    round: u64,
    in_flight: usize,
}

impl Shared {
    pub(crate) fn fixed(limit: usize) -> Self {
        let limit = limit.min(i32::MAX as usize);
        Self {
            sem: Semaphore::new(limit as u32),
            cap: AtomicUsize::new(limit),
            adaptive: None,
        }
    }

    pub(crate) fn adaptive(cfg: Aimd) -> Self {
        let state = AimdState::new(cfg);
        let cap = state.cap();
        Self {
            sem: Semaphore::new(cap as u32),
            cap: AtomicUsize::new(cap),
            adaptive: Some(Adaptive {
                cfg,
                state: Mutex::new(state),
                round: AtomicU64::new(0),
            }),
        }
    }

    /// What the response body must be watched for.
    pub(crate) fn inspect(&self) -> Inspect {
        match &self.adaptive {
            None => Inspect::NOTHING,
            Some(a) => match a.cfg.slow {
                None => Inspect::OUTCOME,
                Some(Latency::FirstByte(_)) => Inspect {
                    outcome: true,
                    usage: false,
                    timing: true,
                    answer: false,
                },
                Some(Latency::PerOutputToken(_)) => Inspect::ALL,
            },
        }
    }

    pub(crate) fn cap(&self) -> usize {
        self.cap.load(Ordering::Relaxed)
    }

    pub(crate) fn in_flight(&self) -> usize {
        let avail = i64::from(self.sem.available());
        (self.cap() as i64 - avail).max(0) as usize
    }

    /// For an adaptive limit: what to remember about a call that starts now.
    #[inline]
    pub(crate) fn start(&self) -> Option<Start> {
        let a = self.adaptive.as_ref()?;
        Some(Start {
            at: crate::time::now(),
            round: a.round.load(Ordering::Relaxed),
            in_flight: self.in_flight(),
        })
    }

    /// Feeds a finished adaptive call to the AIMD state and resizes the
    /// semaphore.
    pub(crate) fn record(&self, start: Start, end: &BodyEnd) {
        let Some(a) = &self.adaptive else { return };
        let slow = match a.cfg.slow {
            None => false,
            Some(latency) if end.outcome.is_success() => is_slow(latency, start.at, end),
            Some(_) => false,
        };
        let signal = Signal::of(&end.outcome, slow, end.kind == EndKind::Complete);
        if signal == Signal::Nothing
            || (signal == Signal::Shrink && start.round != a.round.load(Ordering::Relaxed))
        {
            return;
        }
        let mut st = a
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let old = st.cap();
        let new = st.on_sample(Sample {
            signal,
            round: start.round,
            in_flight: start.in_flight,
        });
        a.round.store(st.round(), Ordering::Relaxed);
        if new != old {
            if new > old {
                self.sem.add_permits((new - old) as u32);
            } else {
                self.sem.remove_permits((old - new) as u32);
            }
            self.cap.store(new, Ordering::Relaxed);
            let limit = st.limit();
            drop(st);
            if new < old {
                tracing::debug!(
                    old,
                    new,
                    limit,
                    outcome = %end.outcome,
                    "adaptive concurrency limit decreased"
                );
            } else {
                tracing::trace!(old, new, limit, "adaptive concurrency limit increased");
            }
        }
    }
}

fn is_slow(latency: Latency, start: Instant, end: &BodyEnd) -> bool {
    let first = end.first_frame_at.unwrap_or_else(crate::time::now);
    let ttfb = first.saturating_duration_since(start);
    match latency {
        Latency::FirstByte(max) => ttfb > max,
        Latency::PerOutputToken(max) => match end.usage {
            Some(u) if u.output_tokens > 0 => {
                let total = crate::time::now().saturating_duration_since(start);
                total / u.output_tokens > max
            }
            _ => ttfb > max,
        },
    }
}

/// One permit of the limit; given back when dropped.
pub(crate) struct Permit {
    shared: Arc<Shared>,
}

impl Permit {
    /// Wraps a permit already taken from `shared.sem`.
    pub(crate) fn taken(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    pub(crate) fn shared(&self) -> &Shared {
        &self.shared
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.shared.sem.release();
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").finish_non_exhaustive()
    }
}

/// Reads the state of a concurrency limit: the limit now in force (for an
/// adaptive limit, where AIMD has taken it), the calls in flight and the
/// callers waiting. Cheap to clone; shared with every service the layer
/// made.
///
/// See the [module docs](super) for an example.
#[derive(Clone)]
pub struct LimitHandle {
    pub(crate) shared: Arc<Shared>,
}

impl LimitHandle {
    /// The whole-number limit now in force.
    pub fn limit(&self) -> usize {
        self.shared.cap()
    }

    /// The adaptive limit with its fractional part (AIMD grows it by about
    /// `1 / limit` per success); for a fixed limit, the limit.
    pub fn exact_limit(&self) -> f64 {
        match &self.shared.adaptive {
            None => self.shared.cap() as f64,
            Some(a) => a
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .limit(),
        }
    }

    /// Calls holding a permit right now (from `poll_ready` until their
    /// response body ended or was dropped).
    pub fn in_flight(&self) -> usize {
        self.shared.in_flight()
    }

    /// Callers waiting for a permit right now.
    pub fn waiting(&self) -> usize {
        self.shared.sem.waiting() as usize
    }

    /// Whether the limit adapts (AIMD).
    pub fn is_adaptive(&self) -> bool {
        self.shared.adaptive.is_some()
    }
}

impl fmt::Debug for LimitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LimitHandle")
            .field("limit", &self.limit())
            .field("in_flight", &self.in_flight())
            .field("waiting", &self.waiting())
            .field("adaptive", &self.is_adaptive())
            .finish()
    }
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("sem", &self.sem)
            .field("cap", &self.cap())
            .field("adaptive", &self.adaptive.is_some())
            .finish()
    }
}
