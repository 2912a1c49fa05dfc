use std::fmt;

use http::Response;

use super::{Classifier, Outcome};
use crate::body::{BodyEnd, EndKind, Inspect, Observed, OnEnd};

/// How a layer classifies what its inner service returned, and learns when a
/// response is really over.
///
/// [`Classifier`] implements it for `http::Response<B>`: the body is wrapped
/// in an [`Observed`] body, so the hook runs when a streamed body ends.
/// [`FnClassifier`] implements it for any response type (tonic messages,
/// custom clients): the hook runs at once with the closure's verdict.
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// The response handed on to the caller.
    type Observed<H: OnEnd>;

    /// Arranges for `hook` to be called exactly once with the final outcome
    /// of `res`, and returns the response to hand on.
    fn observe<H: OnEnd>(&self, res: Res, inspect: Inspect, hook: H) -> Self::Observed<H>;

    /// Classifies an error returned instead of a response.
    fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome;
}

impl<B> Classify<Response<B>> for Classifier
where
    B: http_body::Body,
{
    type Observed<H: OnEnd> = Response<Observed<B, H>>;

    fn observe<H: OnEnd>(&self, res: Response<B>, inspect: Inspect, hook: H) -> Self::Observed<H> {
        Observed::wrap(res, self, inspect, hook)
    }

    fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome {
        classify_error_any(err)
    }
}

/// A [`Classify`] for any response type, from a closure `Fn(&Res) ->
/// Outcome`. Errors are classified like [`Classifier::classify_error`].
///
/// # Example
///
/// ```
/// use tower_qwen::classify::{Classify, FnClassifier, Outcome};
/// use tower_qwen::body::Inspect;
///
/// let c = FnClassifier::new(|code: &u16| if *code == 0 { Outcome::Success } else { Outcome::TRANSIENT });
/// let res = c.observe(7u16, Inspect::NOTHING, |end: tower_qwen::body::BodyEnd| {
///     assert!(end.outcome.is_transient());
/// });
/// assert_eq!(res, 7);
/// ```
#[derive(Clone, Copy)]
pub struct FnClassifier<F> {
    f: F,
}

impl<F> FnClassifier<F> {
    /// Classifies responses with `f`.
    pub const fn new(f: F) -> Self {
        Self { f }
    }
}

impl<F> fmt::Debug for FnClassifier<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnClassifier").finish_non_exhaustive()
    }
}

impl<Res, F> Classify<Res> for FnClassifier<F>
where
    F: Fn(&Res) -> Outcome + Clone + Send + Sync + 'static,
{
    type Observed<H: OnEnd> = Res;

    fn observe<H: OnEnd>(&self, res: Res, _inspect: Inspect, hook: H) -> Res {
        hook.on_end(BodyEnd::new((self.f)(&res), EndKind::Complete));
        res
    }

    fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome {
        classify_error_any(err)
    }
}

/// Classifies an error of any type by downcasting to the types this crate
/// knows, walking `source()` chains.
pub(crate) fn classify_error_any<E: fmt::Display + 'static>(err: &E) -> Outcome {
    let any = err as &dyn std::any::Any;
    if let Some(boxed) = any.downcast_ref::<crate::BoxError>() {
        return classify_dyn(&**boxed);
    }
    if let Some(boxed) = any.downcast_ref::<Box<dyn std::error::Error + Send + Sync + 'static>>() {
        return classify_dyn(&**boxed);
    }
    if let Some(e) = any.downcast_ref::<std::io::Error>() {
        return classify_dyn(e);
    }
    crate::error::known_outcome_any(any).unwrap_or(Outcome::TRANSIENT)
}

/// Classifies a `dyn Error` by walking its chain for a known type.
pub(crate) fn classify_dyn(err: &(dyn std::error::Error + 'static)) -> Outcome {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(o) = crate::error::known_outcome(e) {
            return o;
        }
        cur = e.source();
    }
    Outcome::TRANSIENT
}
