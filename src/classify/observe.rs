use std::fmt;
use std::marker::PhantomData;

use http::Response;

use super::{Classifier, Outcome};
use crate::body::{BodyEnd, EndKind, Inspect, Observed, OnEnd};

/// How a layer classifies what its inner service returned, and learns when a
/// response is really over.
///
/// [`Classifier`] implements it for `http::Response<B>`: the body is wrapped
/// in an [`Observed`] body, so the hook runs when a streamed body ends; a
/// body that a layer below already wrapped is not wrapped again, the hook
/// joins that wrapper (one wrapper, one scan, however many layers watch).
/// [`FnClassifier`] implements it for any response type (tonic messages,
/// custom clients): the hook runs at once with the closure's verdict.
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// The response handed on to the caller.
    type Observed;

    /// Arranges for `hook` to be called exactly once with the final outcome
    /// of `res`, and returns the response to hand on.
    fn observe<H: OnEnd>(&self, res: Res, inspect: Inspect, hook: H) -> Self::Observed;

    /// Classifies an error returned instead of a response.
    fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome;

    /// How the layers that decide before handing a response on
    /// ([retry](crate::retry), [fallback](crate::fallback)) learn its
    /// outcome: at once from the response itself ([`Early::Known`]), or by
    /// reading the start of an HTTP body with a [`Classifier`]
    /// ([`Early::Peek`]).
    ///
    /// Default is [`Early::Peek`] with [`Classifier::new`];
    /// [`FnClassifier`] answers [`Early::Known`] with its closure's verdict,
    /// so a classifier that never looks at bodies works with retry and
    /// fallback too.
    fn early(&self, res: &Res) -> Early {
        let _ = res;
        Early::Peek(Classifier::new())
    }
}

/// How retry and fallback learn a response's outcome before handing it on.
/// See [`Classify::early`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Early {
    /// The outcome, known from the response value alone (no body read).
    Known(Outcome),
    /// Read the start of the HTTP body and classify it with this
    /// [`Classifier`] (its body limit bounds what is read ahead of the
    /// caller).
    Peek(Classifier),
}

impl<B> Classify<Response<B>> for Classifier
where
    B: http_body::Body + Send + 'static,
    B::Data: 'static,
    B::Error: 'static,
{
    type Observed = Response<Observed<B::Data, B::Error>>;

    fn observe<H: OnEnd>(&self, res: Response<B>, inspect: Inspect, hook: H) -> Self::Observed {
        Observed::wrap(res, self, inspect, hook)
    }

    fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome {
        classify_error_any(err)
    }

    fn early(&self, _res: &Response<B>) -> Early {
        Early::Peek(*self)
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
    type Observed = Res;

    fn observe<H: OnEnd>(&self, res: Res, _inspect: Inspect, hook: H) -> Res {
        hook.on_end(BodyEnd::new((self.f)(&res), EndKind::Complete));
        res
    }

    fn classify_error<E: fmt::Display + 'static>(&self, err: &E) -> Outcome {
        classify_error_any(err)
    }

    fn early(&self, res: &Res) -> Early {
        Early::Known((self.f)(res))
    }
}

/// Classifies an error of any type: this crate's own errors (bare, boxed
/// once or twice, or anywhere in a `source()` chain) by the outcome they
/// carry, I/O errors as transient, anything else as transient.
pub(crate) fn classify_error_any<E: 'static>(err: &E) -> Outcome {
    super::known::outcome_of(err, &|_| None).unwrap_or(Outcome::TRANSIENT)
}

/// A classifier that also reads errors of a foreign type `E` (a tonic
/// `Status`, your client's error enum) with a closure, made by
/// [`Classifier::on_error`] or [`FnClassifier::on_error`] (chain more calls
/// for more types).
///
/// An error is matched when it is an `E`, or when `E` is anywhere in the
/// `source()` chain of a boxed error (another layer may have boxed it, or
/// wrapped it as tower's `Buffer` does). Other errors are classified as
/// before: this crate's own by the outcome they carry, I/O errors and
/// unknown errors as transient.
///
/// # Example
///
/// A gRPC-style `NotFound` is permanent: it is not retried and does not
/// count against a circuit, while `Unavailable` stays transient.
///
/// ```
/// use tower_qwen::classify::{Classify, FnClassifier, Outcome, PermanentReason};
///
/// #[derive(Debug)]
/// enum Status { NotFound, Unavailable }
/// impl std::fmt::Display for Status {
///     fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { write!(f, "{self:?}") }
/// }
/// impl std::error::Error for Status {}
///
/// let c = FnClassifier::new(|_: &String| Outcome::Success).on_error(|s: &Status| match s {
///     Status::NotFound => Outcome::Permanent { reason: PermanentReason::NotFound },
///     Status::Unavailable => Outcome::TRANSIENT,
/// });
/// assert!(c.classify_error(&Status::NotFound).is_permanent());
/// let boxed: tower_qwen::BoxError = Box::new(Status::NotFound);
/// assert!(c.classify_error(&boxed).is_permanent());
/// assert!(c.classify_error(&Status::Unavailable).is_transient());
/// ```
pub struct OnError<C, E, F> {
    inner: C,
    f: F,
    _error: PhantomData<fn(&E)>,
}

impl<C, E, F> OnError<C, E, F> {
    const fn new(inner: C, f: F) -> Self {
        Self {
            inner,
            f,
            _error: PhantomData,
        }
    }

    /// Also classifies errors of type `E2` with `f`. Checked before the
    /// types already taught.
    pub fn on_error<E2, F2>(self, f: F2) -> OnError<Self, E2, F2>
    where
        E2: std::error::Error + 'static,
        F2: Fn(&E2) -> Outcome,
    {
        OnError::new(self, f)
    }

    /// The classifier this one falls back to.
    pub fn get_ref(&self) -> &C {
        &self.inner
    }
}

impl Classifier {
    /// Classifies errors of a foreign type `E` with `f` (other errors as
    /// before). See [`OnError`].
    pub fn on_error<E, F>(self, f: F) -> OnError<Self, E, F>
    where
        E: std::error::Error + 'static,
        F: Fn(&E) -> Outcome,
    {
        OnError::new(self, f)
    }
}

impl<G> FnClassifier<G> {
    /// Classifies errors of a foreign type `E` with `f` (other errors as
    /// before). See [`OnError`].
    pub fn on_error<E, F>(self, f: F) -> OnError<Self, E, F>
    where
        E: std::error::Error + 'static,
        F: Fn(&E) -> Outcome,
    {
        OnError::new(self, f)
    }
}

impl<C: Clone, E, F: Clone> Clone for OnError<C, E, F> {
    fn clone(&self) -> Self {
        Self::new(self.inner.clone(), self.f.clone())
    }
}

impl<C: Copy, E, F: Copy> Copy for OnError<C, E, F> {}

impl<C: fmt::Debug, E, F> fmt::Debug for OnError<C, E, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnError")
            .field("inner", &self.inner)
            .field("error", &std::any::type_name::<E>())
            .finish_non_exhaustive()
    }
}

impl<Res, C, E, F> Classify<Res> for OnError<C, E, F>
where
    C: Classify<Res>,
    E: std::error::Error + 'static,
    F: Fn(&E) -> Outcome + Clone + Send + Sync + 'static,
{
    type Observed = C::Observed;

    fn observe<H: OnEnd>(&self, res: Res, inspect: Inspect, hook: H) -> Self::Observed {
        self.inner.observe(res, inspect, hook)
    }

    fn early(&self, res: &Res) -> Early {
        self.inner.early(res)
    }

    fn classify_error<X: fmt::Display + 'static>(&self, err: &X) -> Outcome {
        if let Some(e) = (err as &dyn std::any::Any).downcast_ref::<E>() {
            return (self.f)(e);
        }
        let mine = |link: &(dyn std::error::Error + 'static)| link.downcast_ref::<E>().map(&self.f);
        match super::known::outcome_of(err, &mine) {
            Some(outcome) => outcome,
            None => self.inner.classify_error(err),
        }
    }
}
