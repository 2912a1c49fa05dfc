//! The response future of [`CircuitBreaker`](super::CircuitBreaker), and the
//! hook that records a call's verdict when its response ends.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use crate::body::future::ObserveFuture;
use crate::body::{BodyEnd, EndKind, OnEnd};
use crate::classify::Outcome;
use crate::time::{self, Instant};

use super::error::CircuitOpen;
use super::shared::Shared;
use super::state::{Circuit, Ticket, Verdict};

/// Records how an admitted call ended, once: when its response (body) ends,
/// fails or is dropped, or when the call fails. Dropped before that (the
/// caller gave up), it frees the half-open probe slot it held without a
/// verdict.
///
/// A body dropped before its end counts only when what was seen so far is a
/// failure (a 503 whose body nobody read); a success cut short by the caller
/// says nothing about the upstream.
pub struct Record<K> {
    shared: Arc<Shared<K>>,
    keyed: Option<(Arc<Circuit>, K)>,
    ticket: Ticket,
    start: Option<Instant>,
    done: bool,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Record<K> {
    pub(crate) fn new(
        shared: Arc<Shared<K>>,
        keyed: Option<(Arc<Circuit>, K)>,
        ticket: Ticket,
    ) -> Self {
        let start = shared.cfg.slow_call.map(|_| time::now());
        Self {
            shared,
            keyed,
            ticket,
            start,
            done: false,
        }
    }

    fn finish(&mut self, outcome: &Outcome, kind: EndKind, first_frame_at: Option<Instant>) {
        self.done = true;
        if self.ticket == Ticket::Quiet {
            return;
        }
        let verdict = if kind == EndKind::Dropped && outcome.is_success() {
            Verdict::Ignore
        } else {
            let slow = match (self.start, self.shared.cfg.slow_call) {
                (Some(start), Some(max)) if outcome.is_success() => {
                    first_frame_at
                        .unwrap_or_else(time::now)
                        .saturating_duration_since(start)
                        > max
                }
                _ => false,
            };
            Verdict::of(outcome, self.shared.cfg.is_failure, slow)
        };
        self.apply(verdict);
    }

    fn apply(&self, verdict: Verdict) {
        let cfg = &self.shared.cfg;
        match &self.keyed {
            None => {
                if let Some(t) = self
                    .shared
                    .global()
                    .record(cfg, self.ticket, verdict, time::now)
                {
                    self.shared.emit_global(t);
                }
            }
            Some((circuit, key)) => {
                if let Some(t) = circuit.record(cfg, self.ticket, verdict, time::now) {
                    self.shared.emit(key, t);
                }
            }
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> OnEnd for Record<K> {
    fn on_end(mut self, end: BodyEnd) {
        self.finish(&end.outcome, end.kind, end.first_frame_at);
    }
}

impl<K> Drop for Record<K> {
    fn drop(&mut self) {
        if !self.done
            && let Ticket::Probe(_) = self.ticket
        {
            let circuit = match &self.keyed {
                None => self.shared.global(),
                Some((c, _)) => &**c,
            };
            // A probe slot freed without a verdict never changes state.
            let _ = circuit.record(&self.shared.cfg, self.ticket, Verdict::Ignore, time::now);
        }
    }
}

impl<K> fmt::Debug for Record<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("ticket", &self.ticket)
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

/// The response future of [`CircuitBreaker`](super::CircuitBreaker): the
/// shared [`ObserveFuture`] with a [`Record`] hook, refused with
/// [`CircuitOpen`] while the circuit is open.
pub type ResponseFuture<F, C, K> = ObserveFuture<F, C, Record<K>, CircuitOpen>;
