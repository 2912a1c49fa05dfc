use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};

use tower_service::Service;

use crate::BoxError;
use crate::body::Inspect;
use crate::classify::{Classifier, Classify};
use crate::time;
use crate::util::macros::define_inner_service_accessors;

use super::error::CircuitOpen;
use super::future::{Record, ResponseFuture};
use super::layer::CircuitBreakerLayer;
use super::shared::{BreakerHandle, Shared};
use super::state::Admit;
use crate::key::{Global, KeyOf, Keys};

/// Fails calls fast while the upstream is broken, and probes it back.
///
/// See the [module docs](super) for an example.
///
/// # Clone
///
/// Clones share the circuit(s); a clone never inherits an admission made in
/// `poll_ready`.
pub struct CircuitBreaker<S, C = Classifier, P: Keys = Global> {
    inner: S,
    shared: Arc<Shared<P::Key>>,
    keys: P,
    classifier: C,
    inspect: Inspect,
    pending: Option<Result<Record<P::Key>, CircuitOpen>>,
}

impl<S> CircuitBreaker<S> {
    /// A breaker with the defaults around `inner`.
    pub fn new(inner: S) -> Self {
        use tower_layer::Layer;
        CircuitBreakerLayer::new().layer(inner)
    }

    /// A layer with the defaults; see [`CircuitBreakerLayer::new`].
    pub fn layer() -> CircuitBreakerLayer {
        CircuitBreakerLayer::new()
    }
}

impl<S, C, P: Keys> CircuitBreaker<S, C, P> {
    pub(crate) fn from_parts(
        inner: S,
        shared: Arc<Shared<P::Key>>,
        keys: P,
        classifier: C,
    ) -> Self {
        let inspect = if shared.cfg.slow_call.is_some() {
            Inspect {
                outcome: true,
                usage: false,
                timing: true,
                answer: false,
            }
        } else {
            Inspect::OUTCOME
        };
        Self {
            inner,
            shared,
            keys,
            classifier,
            inspect,
            pending: None,
        }
    }

    /// A handle that reads and steers the circuit(s).
    pub fn handle(&self) -> BreakerHandle<P::Key> {
        BreakerHandle {
            shared: self.shared.clone(),
        }
    }

    define_inner_service_accessors!();

    fn admit_global(&self) -> Result<Record<P::Key>, CircuitOpen> {
        let (admit, transition) = self.shared.global().admit(&self.shared.cfg, time::now);
        if let Some(t) = transition {
            self.shared.emit_global(t);
        }
        match admit {
            Admit::Pass(ticket) => Ok(Record::new(self.shared.clone(), None, ticket)),
            Admit::Reject { retry_after, state } => Err(CircuitOpen::new(retry_after, state)),
        }
    }
}

impl<S, C, P, Req> Service<Req> for CircuitBreaker<S, C, P>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    C: Classify<S::Response>,
    P: KeyOf<Req>,
{
    type Response = C::Observed;
    type Error = BoxError;
    type Future = ResponseFuture<S::Future, C, P::Key>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // An unkeyed breaker decides in poll_ready, so that a rejected call
        // does not first wait for (and waste) the inner service's readiness,
        // such as a rate limiter's token.
        if self.pending.is_none() && !self.shared.is_keyed() {
            self.pending = Some(self.admit_global());
        }
        if let Some(Err(_)) = &self.pending {
            return Poll::Ready(Ok(()));
        }
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let admission = match self.pending.take() {
            Some(a) => a,
            None if !self.shared.is_keyed() => self.admit_global(),
            None => {
                let key = self.keys.key_of(&mut req);
                let circuit = self.shared.circuit(&key);
                let (admit, transition) = circuit.admit(&self.shared.cfg, time::now);
                if let Some(t) = transition {
                    self.shared.emit(&key, t);
                }
                match admit {
                    Admit::Pass(ticket) => Ok(Record::new(
                        self.shared.clone(),
                        Some((circuit, key)),
                        ticket,
                    )),
                    Admit::Reject { retry_after, state } => {
                        Err(CircuitOpen::new(retry_after, state))
                    }
                }
            }
        };
        match admission {
            Ok(record) => ResponseFuture::called(
                self.inner.call(req),
                Some(record),
                self.classifier.clone(),
                self.inspect,
            ),
            Err(e) => ResponseFuture::refused(e, self.classifier.clone()),
        }
    }
}

impl<S: Clone, C: Clone, P: Keys> Clone for CircuitBreaker<S, C, P> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            shared: self.shared.clone(),
            keys: self.keys.clone(),
            classifier: self.classifier.clone(),
            inspect: self.inspect,
            pending: None,
        }
    }
}

impl<S: fmt::Debug, C, P: Keys> fmt::Debug for CircuitBreaker<S, C, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("inner", &self.inner)
            .field("shared", &self.shared)
            .finish_non_exhaustive()
    }
}
