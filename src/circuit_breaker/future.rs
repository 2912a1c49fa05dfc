//! The response future of [`CircuitBreaker`](super::CircuitBreaker), and the
//! hook that records a call's verdict when its response ends.

use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;

use crate::BoxError;
use crate::body::{BodyEnd, EndKind, Inspect, OnEnd};
use crate::classify::{Classify, Outcome};
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
                    .global
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

    /// The call failed instead of answering.
    pub(crate) fn on_error(mut self, outcome: &Outcome) {
        self.finish(outcome, EndKind::Failed, None);
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
                None => &self.shared.global,
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

pin_project! {
    /// The response future of [`CircuitBreaker`](super::CircuitBreaker).
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F, C, K> {
        #[pin]
        kind: Kind<F>,
        record: Option<Record<K>>,
        classifier: C,
        inspect: Inspect,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F> {
        Called { #[pin] future: F },
        Rejected { error: Option<CircuitOpen> },
    }
}

impl<F, C, K> ResponseFuture<F, C, K> {
    pub(crate) fn called(future: F, record: Record<K>, classifier: C, inspect: Inspect) -> Self {
        Self {
            kind: Kind::Called { future },
            record: Some(record),
            classifier,
            inspect,
        }
    }

    pub(crate) fn rejected(error: CircuitOpen, classifier: C) -> Self {
        Self {
            kind: Kind::Rejected { error: Some(error) },
            record: None,
            classifier,
            inspect: Inspect::NOTHING,
        }
    }
}

impl<F, C, K, Res, E> Future for ResponseFuture<F, C, K>
where
    F: Future<Output = Result<Res, E>>,
    E: Into<BoxError>,
    C: Classify<Res>,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Output = Result<C::Observed<Record<K>>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        match this.kind.project() {
            KindProj::Rejected { error } => {
                Poll::Ready(Err(error.take().expect("polled after completion").into()))
            }
            KindProj::Called { future } => match ready!(future.poll(cx)) {
                Ok(res) => {
                    let record = this.record.take().expect("polled after completion");
                    Poll::Ready(Ok(this.classifier.observe(res, *this.inspect, record)))
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    if let Some(record) = this.record.take() {
                        record.on_error(&this.classifier.classify_error(&e));
                    }
                    Poll::Ready(Err(e))
                }
            },
        }
    }
}

impl<F, C, K> fmt::Debug for ResponseFuture<F, C, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResponseFuture")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}
