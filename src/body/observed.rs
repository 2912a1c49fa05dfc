use std::any::Any;
use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use http::{HeaderMap, Response, StatusCode};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

use super::answer::Answer;
use crate::BoxError;
use crate::classify::{Classifier, ContentKind, HeadFacts, Outcome, SseVerdict};
use crate::sse::{EventMeta, Sink, SseScanner};
use crate::time::{self, Instant};
use crate::usage::Usage;

/// Called exactly once when an [`Observed`] body ends, fails or is dropped.
///
/// Implemented for closures `FnOnce(BodyEnd)`.
pub trait OnEnd: Send + 'static {
    /// The body is over; `end` says how.
    fn on_end(self, end: BodyEnd);
}

impl<F: FnOnce(BodyEnd) + Send + 'static> OnEnd for F {
    fn on_end(self, end: BodyEnd) {
        self(end)
    }
}

/// Hooks compose: a pair is called first then second.
impl<A: OnEnd, B: OnEnd> OnEnd for (A, B) {
    fn on_end(self, end: BodyEnd) {
        self.0.on_end(end);
        self.1.on_end(end);
    }
}

/// How a response body ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndKind {
    /// The body was read to its end.
    Complete,
    /// Reading the body failed (a reset, an idle timeout, a cut stream).
    Failed,
    /// The body was dropped before its end (the caller went away).
    Dropped,
}

/// What an [`OnEnd`] hook learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BodyEnd {
    /// The final outcome: the status/headers outcome, refined by an error
    /// found in the body (SSE error frame, business error in a 200), or
    /// transient when reading the body failed. A dropped body keeps what was
    /// known when it was dropped.
    pub outcome: Outcome,
    /// The last `usage` seen (cumulative for native streams), when
    /// [`Inspect::usage`] was asked for and the body reported one.
    pub usage: Option<Usage>,
    /// How the body ended.
    pub kind: EndKind,
    /// When the first data frame passed, if [`Inspect::timing`] was asked for.
    pub first_frame_at: Option<Instant>,
    /// How many data frames reached the caller.
    pub data_frames: u32,
    /// The finish reasons and the model the body reported, when
    /// [`Inspect::answer`] was asked for (empty otherwise).
    pub answer: Answer,
}

impl BodyEnd {
    /// A body end with only an outcome (for responses that have no body to
    /// watch, such as non-HTTP responses classified at once).
    pub fn new(outcome: Outcome, kind: EndKind) -> Self {
        Self {
            outcome,
            usage: None,
            kind,
            first_frame_at: None,
            data_frames: 0,
            answer: Answer::default(),
        }
    }
}

/// What an [`Observed`] body looks at. Looking costs a little per frame, so
/// each layer asks only for what it needs; the body is looked at once for
/// all of them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Inspect {
    /// Classify errors inside the body (SSE error frames, business errors in
    /// JSON bodies).
    pub outcome: bool,
    /// Find the token usage.
    pub usage: bool,
    /// Record when the first data frame passed.
    pub timing: bool,
    /// Find the finish reasons and the model the answer names (what
    /// [telemetry](crate::telemetry) reports).
    pub answer: bool,
}

impl Inspect {
    /// Only notice the end: no parsing at all.
    pub const NOTHING: Inspect = Inspect {
        outcome: false,
        usage: false,
        timing: false,
        answer: false,
    };
    /// Classify errors in the body.
    pub const OUTCOME: Inspect = Inspect {
        outcome: true,
        usage: false,
        timing: false,
        answer: false,
    };
    /// Everything: errors, usage, timing and the answer's facts.
    pub const ALL: Inspect = Inspect {
        outcome: true,
        usage: true,
        timing: true,
        answer: true,
    };

    /// Both sets of wishes.
    pub const fn union(self, other: Inspect) -> Inspect {
        Inspect {
            outcome: self.outcome || other.outcome,
            usage: self.usage || other.usage,
            timing: self.timing || other.timing,
            answer: self.answer || other.answer,
        }
    }

    const fn reads_body(self) -> bool {
        self.outcome || self.usage || self.answer
    }
}

/// A response body watched once for every layer that needs to know how it
/// ends. See the [module docs](super) for an example.
///
/// The first layer that watches a response wraps its body; every layer
/// above it finds the body already wrapped (it is an `Observed`) and only
/// adds its hook and its wishes ([`Inspect`]) to the same wrapper, so a
/// response is wrapped, scanned and classified once however many layers
/// watch it. The hooks run in the order they were added (the innermost
/// layer's first), exactly once, when the body ends, fails or is dropped;
/// a hook added after the end runs at once with how the body ended.
///
/// Wishes added after data frames have passed cannot look back: the body
/// is inspected for outcome and usage only if some layer asked before its
/// first data frame (the layers all add theirs as the response passes
/// them, before anyone reads the body). The body is classified by the
/// [`Classifier`] of the first layer that asked for an outcome or usage.
///
/// Frames pass through unchanged and unbuffered; SSE bodies are scanned
/// line by line as they pass; JSON bodies are copied (up to the
/// classifier's body limit) only when an outcome or usage was asked for and
/// they come in more than one frame. The wrapped body and the watch live
/// in one allocation; the body's type is erased (only its `Data` and
/// `Error` types remain), which is what lets the layers find it.
pub struct Observed<D = Bytes, E = BoxError> {
    cell: Pin<Box<dyn Cell<D, E>>>,
}

/// The wrapped body and its watch, behind one pointer.
trait Cell<D, E>: Send {
    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, E>>>;
    fn watch(self: Pin<&mut Self>) -> &mut Watch;
    fn watch_ref(&self) -> &Watch;
    /// The body is over: settle the verdict and run the hooks (once).
    fn fire(self: Pin<&mut Self>, kind: EndKind);
    /// Hooks waiting for the end.
    fn hooks(&self) -> usize;
    fn is_end_stream(&self) -> bool;
    fn size_hint(&self) -> SizeHint;
}

pin_project! {
    /// The body, its watch and the hook of the layer that wrapped it
    /// (inline: the first hook costs no allocation of its own).
    struct Celled<B, H> {
        watch: Watch,
        first: Option<H>,
        #[pin]
        body: B,
    }
}

/// A hook, boxed (a hook without data costs no allocation).
trait DynHook: Send {
    fn call(self: Box<Self>, end: BodyEnd);
}

impl<H: OnEnd> DynHook for H {
    fn call(self: Box<Self>, end: BodyEnd) {
        (*self).on_end(end)
    }
}

/// A hook added to a wrapper after the first. The crate's small hooks are
/// kept inline, without an allocation each: they are recognised by their
/// type (as the wrapper itself is found, see [`Observed::wrap`]), which
/// this list names for the stacks the crate builds (the breaker's record,
/// global or per model; the concurrency permit). Any other hook is boxed,
/// also the rate limiter's reconciliation: it holds the whole booking
/// (120 bytes and more), and moving it inline (into the wrapper, and out to
/// run it) cost more than its allocation saved (measured: +87
/// instructions per call with it inline).
enum Hook {
    #[cfg(feature = "concurrency")]
    Release(crate::concurrency::body::Release),
    #[cfg(feature = "circuit-breaker")]
    Breaker(crate::circuit_breaker::future::Record<()>),
    #[cfg(feature = "circuit-breaker")]
    BreakerByModel(crate::circuit_breaker::future::Record<Option<std::sync::Arc<str>>>),
    Boxed(Box<dyn DynHook>),
}

/// `slot`'s hook, when it is a `T`.
#[cfg(any(feature = "circuit-breaker", feature = "concurrency"))]
fn take_as<T: 'static>(slot: &mut dyn Any) -> Option<T> {
    slot.downcast_mut::<Option<T>>().and_then(Option::take)
}

impl Hook {
    #[inline]
    fn new<H: OnEnd>(hook: H) -> Hook {
        let mut slot = Some(hook);
        #[cfg(feature = "concurrency")]
        if let Some(h) = take_as(&mut slot) {
            return Hook::Release(h);
        }
        #[cfg(feature = "circuit-breaker")]
        if let Some(h) = take_as(&mut slot) {
            return Hook::Breaker(h);
        }
        #[cfg(feature = "circuit-breaker")]
        if let Some(h) = take_as(&mut slot) {
            return Hook::BreakerByModel(h);
        }
        Hook::Boxed(Box::new(slot.take().expect("the hook was just put there")))
    }

    #[inline]
    fn call(self, end: BodyEnd) {
        match self {
            #[cfg(feature = "concurrency")]
            Hook::Release(h) => h.on_end(end),
            #[cfg(feature = "circuit-breaker")]
            Hook::Breaker(h) => h.on_end(end),
            #[cfg(feature = "circuit-breaker")]
            Hook::BreakerByModel(h) => h.on_end(end),
            Hook::Boxed(h) => h.call(end),
        }
    }
}

/// The hooks, in the order they were added: three inline (as many as the
/// crate's layers add), more in a list.
#[derive(Default)]
struct Hooks {
    inline: [Option<Hook>; 3],
    more: Vec<Hook>,
}

impl Hooks {
    fn push(&mut self, hook: Hook) {
        match self.inline.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some(hook),
            None => self.more.push(hook),
        }
    }

    fn len(&self) -> usize {
        self.inline.iter().filter(|s| s.is_some()).count() + self.more.len()
    }

    fn fire(&mut self, end: BodyEnd) {
        for slot in &mut self.inline {
            if let Some(h) = slot.take() {
                h.call(end);
            }
        }
        // Nearly always empty: draining an empty list still costs its drop.
        if !self.more.is_empty() {
            for h in self.more.drain(..) {
                h.call(end);
            }
        }
    }
}

/// Everything the wrapper knows about the response.
struct Watch {
    hooks: Hooks,
    /// How the body ended, once it did (the hooks have run).
    ended: Option<BodyEnd>,
    outcome: Outcome,
    data_frames: u32,
    first_frame_at: Option<Instant>,
    usage: Option<Usage>,
    /// Present when [`Inspect::answer`] was asked for in time.
    answer: Option<Answer>,
    want: Inspect,
    classifier: Classifier,
    status: StatusCode,
    /// The headers that adjust an error; read only when an error is
    /// possible (a non-2xx head, or a body being inspected), in the same
    /// pass over the headers as the body's kind.
    facts: Option<HeadFacts>,
    /// The body's kind, read with `facts`.
    kind: Option<ContentKind>,
    scan: Scan,
}

enum Scan {
    /// The body is not inspected.
    Off,
    Sse {
        scanner: SseScanner,
        /// The first error found in the stream (the verdict is settled).
        found: Option<Outcome>,
    },
    Json {
        buf: Vec<u8>,
        overflow: bool,
    },
    /// Inspected to its end.
    Done,
}

impl Watch {
    fn new(status: StatusCode, headers: &HeaderMap, classifier: &Classifier) -> Watch {
        let head = (!status.is_success()).then(|| classifier.head(headers));
        let outcome = crate::classify::by_status(status.as_u16());
        let facts = head.map(|(_, facts)| facts);
        Watch {
            hooks: Hooks::default(),
            ended: None,
            outcome: facts.map_or(outcome, |f| f.apply(outcome)),
            data_frames: 0,
            first_frame_at: None,
            usage: None,
            answer: None,
            want: Inspect::NOTHING,
            classifier: *classifier,
            status,
            facts,
            kind: head.map(|(kind, _)| kind),
            scan: Scan::Off,
        }
    }

    fn plain(outcome: Outcome) -> Watch {
        Watch {
            hooks: Hooks::default(),
            ended: None,
            outcome,
            data_frames: 0,
            first_frame_at: None,
            usage: None,
            answer: None,
            want: Inspect::NOTHING,
            classifier: Classifier::new(),
            status: StatusCode::OK,
            facts: None,
            kind: None,
            scan: Scan::Off,
        }
    }

    /// Adds wishes; honoured while no data frame has passed.
    fn want(
        &mut self,
        status: StatusCode,
        headers: &HeaderMap,
        classifier: &Classifier,
        inspect: Inspect,
    ) {
        let want = self.want.union(inspect);
        if want == self.want {
            return;
        }
        self.want = want;
        if self.data_frames > 0 || self.ended.is_some() {
            return;
        }
        if want.answer && self.answer.is_none() {
            self.answer = Some(Answer::default());
        }
        if want.reads_body() && matches!(self.scan, Scan::Off) {
            let kind = match self.kind {
                Some(kind) => kind,
                None => {
                    let (kind, facts) = classifier.head(headers);
                    self.facts.get_or_insert(facts);
                    self.kind = Some(kind);
                    kind
                }
            };
            let mode = match (status.is_success(), kind) {
                (_, ContentKind::EventStream) => Some(Scan::Sse {
                    scanner: SseScanner::new(),
                    found: None,
                }),
                (false, _) | (true, ContentKind::Json | ContentKind::Untyped) => Some(Scan::Json {
                    buf: Vec::new(),
                    overflow: false,
                }),
                (true, ContentKind::Other) => None,
            };
            if let Some(mode) = mode {
                // The headers adjust an error, also one found in a 2xx body
                // (as `Classifier::classify` does); they were read with the
                // kind.
                self.classifier = *classifier;
                self.scan = mode;
            }
        }
    }

    /// `last`: this is the body's last data, and all of it (a one-frame
    /// JSON body is then classified in place, without a copy).
    fn on_data(&mut self, data: &[u8], last: bool) {
        let facts = self.facts.unwrap_or_default();
        match &mut self.scan {
            Scan::Off | Scan::Done => {}
            Scan::Sse { scanner, found } => {
                let open = found.is_none();
                scanner.feed_to(
                    data,
                    &mut SseSink {
                        verdict: SseVerdict::new(&self.classifier, self.status.as_u16(), found),
                        usage: self.want.usage.then_some(&mut self.usage),
                        answer: &mut self.answer,
                    },
                );
                if open && let Some(o) = *found {
                    self.outcome = facts.apply(o);
                }
            }
            Scan::Json { buf, overflow } => {
                let limit = self.classifier.get_body_limit();
                if last && buf.is_empty() && !*overflow {
                    if data.len() <= limit {
                        self.outcome =
                            self.classifier
                                .classify_with(self.status, false, facts, data);
                        if self.outcome.is_success() {
                            self.read_success(data);
                        }
                    }
                    // Classified (or too long to be): nothing left to do.
                    self.scan = Scan::Done;
                } else if !*overflow {
                    if buf.len() + data.len() > limit {
                        *overflow = true;
                        *buf = Vec::new();
                    } else {
                        buf.extend_from_slice(data);
                    }
                }
            }
        }
    }

    /// A data frame passed.
    fn on_frame<T: Buf>(&mut self, data: &T, last: bool) {
        if self.data_frames == 0 && self.want.timing {
            self.first_frame_at = Some(time::now());
        }
        self.data_frames = self.data_frames.saturating_add(1);
        if matches!(self.scan, Scan::Off | Scan::Done) {
            return;
        }
        if data.chunk().len() == data.remaining() {
            self.on_data(data.chunk(), last);
        } else {
            let mut slices = [std::io::IoSlice::new(&[]); 64];
            let n = data.chunks_vectored(&mut slices);
            for s in &slices[..n] {
                self.on_data(s, false);
            }
        }
    }

    /// The body is over: finish the scan and settle the outcome; the end
    /// for the hooks (`None` when it was settled before).
    fn settle(&mut self, kind: EndKind) -> Option<BodyEnd> {
        if self.ended.is_some() {
            return None;
        }
        let facts = self.facts.unwrap_or_default();
        match std::mem::replace(&mut self.scan, Scan::Done) {
            Scan::Off | Scan::Done => {}
            Scan::Sse {
                mut scanner,
                mut found,
            } => {
                if kind == EndKind::Complete {
                    let open = found.is_none();
                    scanner.finish_to(&mut SseSink {
                        verdict: SseVerdict::new(
                            &self.classifier,
                            self.status.as_u16(),
                            &mut found,
                        ),
                        usage: self.want.usage.then_some(&mut self.usage),
                        answer: &mut self.answer,
                    });
                    if open && let Some(o) = found {
                        self.outcome = facts.apply(o);
                    }
                }
            }
            Scan::Json { buf, overflow } => {
                if kind == EndKind::Complete && !overflow {
                    self.outcome = self
                        .classifier
                        .classify_with(self.status, false, facts, &buf);
                    if self.outcome.is_success() {
                        self.read_success(&buf);
                    }
                }
            }
        }
        if kind == EndKind::Failed && self.outcome.is_success() {
            self.outcome = Outcome::TRANSIENT;
        }
        let end = BodyEnd {
            outcome: self.outcome,
            usage: if self.want.usage { self.usage } else { None },
            kind,
            first_frame_at: if self.want.timing {
                self.first_frame_at
            } else {
                None
            },
            data_frames: self.data_frames,
            answer: self.answer.unwrap_or_default(),
        };
        self.ended = Some(end);
        Some(end)
    }

    /// A whole successful JSON body: its usage and answer, as asked.
    fn read_success(&mut self, body: &[u8]) {
        if self.want.usage {
            self.usage = Usage::find(body);
        }
        if let Some(a) = self.answer.as_mut() {
            a.scan(body);
        }
    }

    fn attach<H: OnEnd>(&mut self, hook: H) {
        match self.ended {
            Some(end) => hook.on_end(end),
            None => self.hooks.push(Hook::new(hook)),
        }
    }
}

/// What the SSE scanner reports to the watch: the stream's verdict, kept
/// by [`SseVerdict`] (the rule [`Classifier::classify`] reads a whole body
/// by), and the usage and the answer, as asked.
struct SseSink<'a> {
    verdict: SseVerdict<'a>,
    usage: Option<&'a mut Option<Usage>>,
    answer: &'a mut Option<Answer>,
}

impl Sink for SseSink<'_> {
    #[inline]
    fn data(&mut self, line: &[u8], meta: &EventMeta) {
        self.verdict.data(line, meta);
        if let Some(usage) = self.usage.as_deref_mut()
            && let Some(u) = Usage::find(line)
        {
            *usage = Some(u);
        }
        if let Some(a) = self.answer.as_mut() {
            a.scan(line);
        }
    }

    fn end(&mut self, meta: &EventMeta) {
        self.verdict.end(meta);
    }
}

impl<B, H> Cell<B::Data, B::Error> for Celled<B, H>
where
    B: http_body::Body + Send,
    H: OnEnd,
{
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.as_mut().project();
        let res = ready!(this.body.as_mut().poll_frame(cx));
        if this.watch.ended.is_some() {
            return Poll::Ready(res);
        }
        let end = match &res {
            Some(Ok(frame)) => {
                let last = this.body.is_end_stream();
                if let Some(data) = frame.data_ref() {
                    this.watch.on_frame(data, last);
                }
                // Fire as soon as the last frame passes: a permit or a
                // reservation should not wait for one more poll.
                last.then_some(EndKind::Complete)
            }
            Some(Err(_)) => Some(EndKind::Failed),
            None => Some(EndKind::Complete),
        };
        if let Some(kind) = end {
            self.fire(kind);
        }
        Poll::Ready(res)
    }

    fn fire(self: Pin<&mut Self>, kind: EndKind) {
        let this = self.project();
        if let Some(end) = this.watch.settle(kind) {
            if let Some(h) = this.first.take() {
                h.on_end(end);
            }
            this.watch.hooks.fire(end);
        }
    }

    fn hooks(&self) -> usize {
        usize::from(self.first.is_some()) + self.watch.hooks.len()
    }

    fn watch(self: Pin<&mut Self>) -> &mut Watch {
        self.project().watch
    }

    fn watch_ref(&self) -> &Watch {
        &self.watch
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<D: 'static, E: 'static> Observed<D, E> {
    /// Watches `res`'s body for `hook`: wraps it, or, when it is already an
    /// `Observed` (a layer below watches it), adds `hook` and `inspect` to
    /// that wrapper. The head is classified now, the body as it passes.
    pub fn wrap<B, H>(
        res: Response<B>,
        classifier: &Classifier,
        inspect: Inspect,
        hook: H,
    ) -> Response<Observed<D, E>>
    where
        B: http_body::Body<Data = D, Error = E> + Send + 'static,
        H: OnEnd,
    {
        let (parts, body) = res.into_parts();
        let mut slot = Some(body);
        let observed = match (&mut slot as &mut dyn Any).downcast_mut::<Option<Self>>() {
            Some(found) => {
                let mut observed = found.take().expect("the body was just put there");
                let watch = observed.cell.as_mut().watch();
                watch.want(parts.status, &parts.headers, classifier, inspect);
                watch.attach(hook);
                observed
            }
            None => {
                let body = slot.take().expect("the body was just put there");
                let ended = body.is_end_stream();
                let mut watch = Watch::new(parts.status, &parts.headers, classifier);
                watch.want(parts.status, &parts.headers, classifier, inspect);
                let mut observed = Self::cell(body, watch, hook);
                if ended {
                    observed.cell.as_mut().fire(EndKind::Complete);
                }
                observed
            }
        };
        Response::from_parts(parts, observed)
    }

    fn cell<B, H>(body: B, watch: Watch, hook: H) -> Self
    where
        B: http_body::Body<Data = D, Error = E> + Send + 'static,
        H: OnEnd,
    {
        Observed {
            cell: Box::pin(Celled {
                watch,
                first: Some(hook),
                body,
            }),
        }
    }

    /// Wraps a body with a hook and no inspection: the hook learns only how
    /// the body ended, with `outcome` as given.
    pub fn plain<B, H>(body: B, outcome: Outcome, hook: H) -> Self
    where
        B: http_body::Body<Data = D, Error = E> + Send + 'static,
        H: OnEnd,
    {
        Self::cell(body, Watch::plain(outcome), hook)
    }

    /// Asks `res`'s body, when it is an `Observed`, to be inspected for
    /// `inspect` too (see [`Observed::wrap`]); any other body is left as it
    /// is. Returns whether the body is an `Observed`.
    #[cfg(feature = "retry")]
    pub(crate) fn want<B: 'static>(
        res: &mut Response<B>,
        classifier: &Classifier,
        inspect: Inspect,
    ) -> bool {
        if !(res.body() as &dyn Any).is::<Self>() {
            return false;
        }
        let status = res.status();
        let headers = std::mem::take(res.headers_mut());
        let found = match (res.body_mut() as &mut dyn Any).downcast_mut::<Self>() {
            Some(o) => {
                o.cell
                    .as_mut()
                    .watch()
                    .want(status, &headers, classifier, inspect);
                true
            }
            None => false,
        };
        *res.headers_mut() = headers;
        found
    }

    /// The kind of the body, when the head was read (a non-2xx status, or
    /// a layer asked for the body to be inspected).
    #[cfg(feature = "retry")]
    pub(crate) fn kind_of<B: 'static>(res: &Response<B>) -> Option<ContentKind> {
        (res.body() as &dyn Any)
            .downcast_ref::<Self>()
            .and_then(|o| o.cell.watch_ref().kind)
    }
}

impl<D, E> Observed<D, E> {
    /// Whether the hooks have not run yet.
    pub fn is_watching(&self) -> bool {
        self.cell.watch_ref().ended.is_none()
    }

    /// The verdict so far: the head's, refined by what the body showed
    /// (when its outcome is inspected); final once the body ended.
    pub fn outcome(&self) -> Outcome {
        self.cell.watch_ref().outcome
    }

    /// How the body ended, once it did.
    pub fn end(&self) -> Option<BodyEnd> {
        self.cell.watch_ref().ended
    }

    /// Whether the body's own content is being classified (some layer asked
    /// for [`Inspect::outcome`] before its first data frame, and its kind
    /// can carry an error), so [`Observed::outcome`] at its end is the
    /// whole-body verdict.
    pub fn inspects_outcome(&self) -> bool {
        let w = self.cell.watch_ref();
        w.want.outcome && !(matches!(w.scan, Scan::Off) && w.ended.is_none())
    }

    /// How many hooks wait for the end.
    pub fn hooks(&self) -> usize {
        self.cell.hooks()
    }

    /// How many of the hooks added after the first are boxed.
    // Only `stacked_layers_share_one_wrapper` asks.
    #[cfg(all(
        test,
        feature = "circuit-breaker",
        feature = "concurrency",
        feature = "rate-limit"
    ))]
    fn boxed_hooks(&self) -> usize {
        let hooks = &self.cell.watch_ref().hooks;
        hooks
            .inline
            .iter()
            .flatten()
            .chain(&hooks.more)
            .filter(|h| matches!(h, Hook::Boxed(_)))
            .count()
    }
}

impl<D, E> Drop for Observed<D, E> {
    fn drop(&mut self) {
        self.cell.as_mut().fire(EndKind::Dropped);
    }
}

impl<D: Buf, E> http_body::Body for Observed<D, E> {
    type Data = D;
    type Error = E;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, E>>> {
        self.get_mut().cell.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.cell.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.cell.size_hint()
    }
}

impl<D, E> fmt::Debug for Observed<D, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = self.cell.watch_ref();
        f.debug_struct("Observed")
            .field("outcome", &w.outcome)
            .field("watching", &w.ended.is_none())
            .field("hooks", &self.cell.hooks())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;
    use crate::classify::{PermanentReason, ThrottleCause};

    type Slot = Arc<Mutex<Vec<BodyEnd>>>;

    fn hook(slot: &Slot) -> impl OnEnd + use<> {
        let slot = slot.clone();
        move |end: BodyEnd| slot.lock().unwrap().push(end)
    }

    fn response<B>(status: u16, ct: Option<&str>, body: B) -> Response<B> {
        let mut b = Response::builder().status(status);
        if let Some(ct) = ct {
            b = b.header("content-type", ct);
        }
        b.body(body).unwrap()
    }

    #[tokio::test]
    async fn full_body_fires_complete_on_last_frame() {
        let slot = Slot::default();
        let res = response(200, Some("application/json"), Full::new(Bytes::from_static(
            br#"{"output":{"text":"hi"},"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}"#,
        )));
        let mut body =
            Observed::wrap(res, &Classifier::new(), Inspect::ALL, hook(&slot)).into_body();
        let frame = body.frame().await.unwrap().unwrap();
        assert!(frame.is_data());
        // Fired as the last frame passed, before the caller polled for the end.
        let end = slot.lock().unwrap()[0];
        assert_eq!(end.kind, EndKind::Complete);
        assert_eq!(end.outcome, Outcome::Success);
        assert_eq!(end.usage.unwrap().total(), 7);
        assert_eq!(end.data_frames, 1);
        assert!(body.frame().await.is_none());
        assert_eq!(slot.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn business_error_in_200_is_seen() {
        let slot = Slot::default();
        let res = response(
            200,
            Some("application/json"),
            String::from(
                r#"{"request_id":"1","code":"Throttling.RateQuota","message":"Requests rate limit exceeded, please try again later."}"#,
            ),
        );
        let body =
            Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&slot)).into_body();
        body.collect().await.unwrap();
        let end = slot.lock().unwrap()[0];
        assert_eq!(end.outcome, Outcome::throttled(ThrottleCause::Requests));
        assert_eq!(end.usage, None);
    }

    fn stream(
        chunks: Vec<Result<&'static str, std::io::Error>>,
    ) -> impl http_body::Body<Data = Bytes, Error = std::io::Error> {
        StreamBody::new(futures_stream(chunks))
    }

    fn futures_stream(
        chunks: Vec<Result<&'static str, std::io::Error>>,
    ) -> impl futures_core::Stream<Item = Result<Frame<Bytes>, std::io::Error>> {
        struct S(std::collections::VecDeque<Result<&'static str, std::io::Error>>);
        impl futures_core::Stream for S {
            type Item = Result<Frame<Bytes>, std::io::Error>;
            fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Self::Item>> {
                Poll::Ready(
                    self.get_mut()
                        .0
                        .pop_front()
                        .map(|r| r.map(|s| Frame::data(Bytes::from_static(s.as_bytes())))),
                )
            }
        }
        S(chunks.into())
    }

    #[tokio::test]
    async fn native_stream_takes_last_cumulative_usage() {
        let slot = Slot::default();
        let body = stream(vec![
            Ok(
                "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{},\"usage\":{\"input_tokens\":92,\"output_tokens\":1}}\n",
            ),
            Ok(
                "\nid:2\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{},\"usage\":{\"input_tokens\":92,\"out",
            ),
            Ok("put_tokens\":10}}\n\n"),
        ]);
        let res = response(200, Some("text/event-stream"), body);
        let body = Observed::wrap(res, &Classifier::new(), Inspect::ALL, hook(&slot)).into_body();
        body.collect().await.unwrap();
        let end = slot.lock().unwrap()[0];
        assert_eq!(end.kind, EndKind::Complete);
        assert_eq!(end.outcome, Outcome::Success);
        assert_eq!(end.usage.unwrap().total(), 102);
        assert_eq!(end.data_frames, 3);
    }

    #[tokio::test]
    async fn stream_error_frame_and_failure_and_drop() {
        // An error event mid-stream.
        let slot = Slot::default();
        let body = stream(vec![
            Ok("id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{}}\n\n"),
            Ok(
                "id:2\nevent:error\n:HTTP_STATUS/500\ndata:{\"code\":\"InternalError\",\"message\":\"x\"}\n\n",
            ),
        ]);
        let res = response(200, Some("text/event-stream"), body);
        Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&slot))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(slot.lock().unwrap()[0].outcome, Outcome::TRANSIENT);

        // A read failure.
        let slot = Slot::default();
        let body = stream(vec![
            Ok("data: {}\n\n"),
            Err(std::io::Error::other("reset")),
        ]);
        let res = response(200, Some("text/event-stream"), body);
        let r = Observed::wrap(res, &Classifier::new(), Inspect::NOTHING, hook(&slot))
            .into_body()
            .collect()
            .await;
        assert!(r.is_err());
        let end = slot.lock().unwrap()[0];
        assert_eq!(
            (end.kind, end.outcome),
            (EndKind::Failed, Outcome::TRANSIENT)
        );

        // Dropped half-way.
        let slot = Slot::default();
        let body = stream(vec![Ok("data: {}\n\n"), Ok("data: {}\n\n")]);
        let res = response(200, Some("text/event-stream"), body);
        let mut b =
            Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&slot)).into_body();
        b.frame().await.unwrap().unwrap();
        assert!(slot.lock().unwrap().is_empty());
        drop(b);
        let end = slot.lock().unwrap()[0];
        assert_eq!(
            (end.kind, end.outcome, end.data_frames),
            (EndKind::Dropped, Outcome::Success, 1)
        );
    }

    /// Issue 12, item 9: a frame that merely mentions `"code"` or
    /// `"error"` (`"code":""`, `"error":null`, content that says "code")
    /// was taken as the stream's verdict (success), and the real error
    /// frame after it was ignored.
    #[tokio::test]
    async fn a_later_error_frame_counts_after_frames_that_only_mention_errors() {
        let native = vec![
            Ok(
                "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"code\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]},\"code\":\"\",\"request_id\":\"1\"}\n\n",
            ),
            Ok(
                "id:2\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[{\"message\":{\"content\":\"error\",\"role\":\"assistant\"},\"finish_reason\":\"null\"}]},\"error\":null,\"request_id\":\"1\"}\n\n",
            ),
            Ok(
                "id:3\nevent:error\n:HTTP_STATUS/429\ndata:{\"request_id\":\"1\",\"code\":\"Throttling.AllocationQuota\",\"message\":\"Allocated quota exceeded\"}\n\n",
            ),
        ];
        let compatible = vec![
            Ok(
                "data: {\"choices\":[{\"delta\":{\"content\":\"code\"},\"index\":0}],\"code\":\"\"}\n\n",
            ),
            Ok(
                "data: {\"choices\":[{\"delta\":{\"content\":\"error\"},\"index\":0}],\"error\":null}\n\n",
            ),
            Ok(
                "data: {\"error\":{\"message\":\"Output data may contain inappropriate content.\",\"type\":\"data_inspection_failed\",\"param\":null,\"code\":\"data_inspection_failed\"}}\n\n",
            ),
        ];
        for (chunks, expected) in [
            (native, Outcome::throttled(ThrottleCause::Tokens)),
            (
                compatible,
                Outcome::Permanent {
                    reason: PermanentReason::ContentFilter,
                },
            ),
        ] {
            let slot = Slot::default();
            let res = response(200, Some("text/event-stream"), stream(chunks));
            Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&slot))
                .into_body()
                .collect()
                .await
                .unwrap();
            let end = slot.lock().unwrap()[0];
            assert_eq!((end.kind, end.outcome), (EndKind::Complete, expected));
        }
    }

    /// Issue 14 (review): the "first error found wins" rule lives once, in
    /// `classify::SseVerdict`; the observer reads a stream through it
    /// however the stream is cut, and agrees with `Classifier::classify`
    /// on the whole body: the first of two errors is the verdict, also
    /// when it is only known at its event's end, or in a last line without
    /// a newline.
    #[tokio::test]
    async fn the_first_error_of_a_stream_wins_however_it_is_cut() {
        let c = Classifier::new();
        let bodies: [&'static str; 3] = [
            "data:{\"choices\":[]}\n\ndata:{\"error\":{\"code\":\"data_inspection_failed\"}}\n\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n",
            "event:error\ndata:{}\n:HTTP_STATUS/503\n\ndata:{\"error\":{\"code\":\"data_inspection_failed\"}}\n\n",
            "data:{}\n\ndata:{\"error\":{\"code\":\"rate_limit_exceeded\"}}",
        ];
        let expected = [
            Outcome::Permanent {
                reason: PermanentReason::ContentFilter,
            },
            Outcome::TRANSIENT,
            Outcome::throttled(ThrottleCause::Requests),
        ];
        for (body, expected) in bodies.into_iter().zip(expected) {
            let head = response(200, Some("text/event-stream"), ());
            let whole = c.classify(head.status(), head.headers(), body.as_bytes());
            assert_eq!(whole, expected, "{body}");
            for cut in 0..=body.len() {
                let slot = Slot::default();
                let chunks = vec![Ok(&body[..cut]), Ok(&body[cut..])];
                let res = response(200, Some("text/event-stream"), stream(chunks));
                Observed::wrap(res, &c, Inspect::ALL, hook(&slot))
                    .into_body()
                    .collect()
                    .await
                    .unwrap();
                assert_eq!(
                    slot.lock().unwrap()[0].outcome,
                    whole,
                    "{body} cut at {cut}"
                );
            }
        }
    }

    /// Found by fuzzing (#16): the watcher read `x-should-retry` and
    /// `retry-after` only on non-2xx heads, and never applied them to an
    /// SSE error frame, so an error in a watched body disagreed with
    /// `Classifier::classify` on the same response.
    #[tokio::test]
    async fn headers_adjust_errors_found_in_the_body() {
        let c = Classifier::new();
        let cases: [(u16, Option<&str>, &str, &str, &str); 3] = [
            (
                200,
                None,
                "x-should-retry",
                "false",
                r#"{"error":{"code":"rate_limit_exceeded"}}"#,
            ),
            (
                200,
                Some("application/json"),
                "retry-after-ms",
                "1500",
                r#"{"code":"Throttling.RateQuota"}"#,
            ),
            (
                200,
                Some("text/event-stream"),
                "retry-after",
                "2",
                "event:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n",
            ),
        ];
        for (status, ct, name, value, body) in cases {
            let mut res = response(status, ct, String::from(body));
            res.headers_mut().insert(name, value.parse().unwrap());
            let whole = c.classify(res.status(), res.headers(), body.as_bytes());
            assert!(!whole.is_success());
            let slot = Slot::default();
            Observed::wrap(res, &c, Inspect::OUTCOME, hook(&slot))
                .into_body()
                .collect()
                .await
                .unwrap();
            assert_eq!(slot.lock().unwrap()[0].outcome, whole, "{name}: {value}");
        }
    }

    #[tokio::test]
    async fn error_status_and_empty_body() {
        let slot = Slot::default();
        let res = response(
            401,
            None,
            String::from(r#"{"code":"InvalidApiKey","message":"Invalid API-key provided."}"#),
        );
        Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&slot))
            .into_body()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            slot.lock().unwrap()[0].outcome,
            Outcome::Permanent {
                reason: PermanentReason::Auth
            }
        );
        // An empty body ends at once.
        let slot = Slot::default();
        let res = response(503, None, http_body_util::Empty::<Bytes>::new());
        let _res = Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&slot));
        assert_eq!(slot.lock().unwrap()[0].outcome, Outcome::TRANSIENT);
    }

    /// Issue 14: a body is wrapped once; a layer above adds its hook and
    /// its wishes to the same wrapper, and every hook learns the same end
    /// from one scan.
    #[tokio::test]
    async fn a_second_watcher_joins_the_first_wrapper() {
        let first = Slot::default();
        let second = Slot::default();
        let res = response(200, Some("application/json"), Full::new(Bytes::from_static(
            br#"{"output":{"text":"hi"},"usage":{"input_tokens":5,"output_tokens":2,"total_tokens":7}}"#,
        )));
        // The inner layer wants nothing read; the outer one wants usage.
        let res = Observed::wrap(res, &Classifier::new(), Inspect::NOTHING, hook(&first));
        let res: Response<Observed<Bytes, std::convert::Infallible>> =
            Observed::wrap(res, &Classifier::new(), Inspect::ALL, hook(&second));
        assert_eq!(res.body().hooks(), 2, "one wrapper holds both hooks");
        res.into_body().collect().await.unwrap();
        let (a, b) = (first.lock().unwrap()[0], second.lock().unwrap()[0]);
        assert_eq!(a, b);
        assert_eq!(a.usage.unwrap().total(), 7);
        assert_eq!(a.data_frames, 1);
    }

    /// Wishes that come after data frames passed cannot look back: the
    /// body keeps the verdict of what it was watched for.
    #[tokio::test]
    async fn wishes_after_the_first_frame_do_not_look_back() {
        let slot = Slot::default();
        let body = stream(vec![
            Ok("data: {\"choices\":[{\"delta\":{\"content\":\"a\"}}]}\n\n"),
            Ok("data: {\"error\":{\"code\":\"data_inspection_failed\"}}\n\n"),
        ]);
        let res = response(200, Some("text/event-stream"), body);
        let res = Observed::wrap(res, &Classifier::new(), Inspect::NOTHING, hook(&slot));
        let (parts, mut body) = res.into_parts();
        body.frame().await.unwrap().unwrap();
        let late = Slot::default();
        let res = Observed::wrap(
            Response::from_parts(parts, body),
            &Classifier::new(),
            Inspect::OUTCOME,
            hook(&late),
        );
        res.into_body().collect().await.unwrap();
        assert_eq!(late.lock().unwrap()[0].outcome, Outcome::Success);
        assert_eq!(slot.lock().unwrap()[0], late.lock().unwrap()[0]);
    }

    /// A hook added after the body ended runs at once, with that end.
    #[tokio::test]
    async fn a_hook_added_after_the_end_runs_at_once() {
        let (first, second) = (Slot::default(), Slot::default());
        let res = response(503, None, http_body_util::Empty::<Bytes>::new());
        let res = Observed::wrap(res, &Classifier::new(), Inspect::OUTCOME, hook(&first));
        assert!(!res.body().is_watching());
        let _res = Observed::wrap(res, &Classifier::new(), Inspect::ALL, hook(&second));
        assert_eq!(first.lock().unwrap()[0], second.lock().unwrap()[0]);
        assert_eq!(second.lock().unwrap()[0].outcome, Outcome::TRANSIENT);
    }

    /// Issue 14: the breaker, the rate limit and the concurrency limit
    /// stacked watch one wrapper (the breaker's and the limiter's hooks join
    /// the one the limit made), and the breaker's record that joins it is
    /// kept inline, not boxed (#14 cost).
    #[cfg(all(
        feature = "circuit-breaker",
        feature = "concurrency",
        feature = "rate-limit"
    ))]
    #[tokio::test]
    async fn stacked_layers_share_one_wrapper() {
        use std::num::NonZeroUsize;
        use tower_layer::Layer;
        use tower_service::Service;

        #[derive(Clone)]
        struct Answer;
        impl<R> Service<R> for Answer {
            type Response = Response<Full<Bytes>>;
            type Error = std::convert::Infallible;
            type Future = std::future::Ready<Result<Self::Response, Self::Error>>;
            fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
                Poll::Ready(Ok(()))
            }
            fn call(&mut self, _: R) -> Self::Future {
                std::future::ready(Ok(response(
                    200,
                    Some("application/json"),
                    Full::new(Bytes::from_static(b"{}")),
                )))
            }
        }
        let limit = crate::concurrency::ConcurrencyLimitLayer::new(NonZeroUsize::new(1).unwrap());
        let mut svc = crate::circuit_breaker::CircuitBreakerLayer::new().layer(limit.layer(Answer));
        std::future::poll_fn(|cx| Service::<()>::poll_ready(&mut svc, cx))
            .await
            .unwrap();
        let res: Response<Observed<Bytes, std::convert::Infallible>> = svc.call(()).await.unwrap();
        assert_eq!(res.body().hooks(), 2);
        assert_eq!(res.body().boxed_hooks(), 0);
        res.into_body().collect().await.unwrap();

        // With a rate limit between them that reconciles tokens.
        use crate::rate_limit::{Limits, Quota, RateLimitLayer};
        let big = std::num::NonZeroU32::new(1_000_000).unwrap();
        let rate = RateLimitLayer::from_limits(
            Limits::requests(Quota::per_second(big)).and_tokens(Quota::per_second(big)),
        );
        let limit = crate::concurrency::ConcurrencyLimitLayer::new(NonZeroUsize::new(1).unwrap());
        let mut svc = crate::circuit_breaker::CircuitBreakerLayer::new()
            .layer(rate.layer(limit.layer(Answer)));
        std::future::poll_fn(|cx| Service::<http::Request<Full<Bytes>>>::poll_ready(&mut svc, cx))
            .await
            .unwrap();
        let req = http::Request::post("/compatible-mode/v1/chat/completions").body(Full::new(
            Bytes::from_static(br#"{"model":"qwen-plus","messages":[]}"#),
        ));
        let res: Response<Observed<Bytes, std::convert::Infallible>> =
            svc.call(req.unwrap()).await.unwrap();
        assert_eq!(res.body().hooks(), 3);
        // The limiter's reconciliation is boxed (see `Hook`), the breaker's
        // record is not.
        assert_eq!(res.body().boxed_hooks(), 1);
        res.into_body().collect().await.unwrap();
    }
}
