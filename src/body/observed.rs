use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};
use pin_project_lite::pin_project;

use super::answer::Answer;
use crate::classify::{Classifier, ContentKind, HeadFacts, Outcome};
use crate::sse::SseScanner;
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
/// each layer asks only for what it needs.
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
}

pin_project! {
    /// A response body that calls an [`OnEnd`] hook when it ends, fails or is
    /// dropped. See the [module docs](super) for an example.
    ///
    /// Frames pass through unchanged and unbuffered; SSE bodies are scanned
    /// line by line as they pass; JSON bodies are copied (up to the
    /// classifier's body limit) only when an outcome or usage was asked for.
    pub struct Observed<B, H: OnEnd> {
        #[pin]
        inner: B,
        watch: Option<Watch<H>>,
    }

    impl<B, H: OnEnd> PinnedDrop for Observed<B, H> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(watch) = this.watch.take() {
                watch.fire(EndKind::Dropped);
            }
        }
    }
}

/// What every observed body keeps: small, and allocation-free when the
/// body is not inspected.
struct Watch<H> {
    hook: H,
    outcome: Outcome,
    data_frames: u32,
    /// Present only when the body is inspected (an SSE stream, or a JSON /
    /// error body with an outcome or usage asked for), or timing is asked
    /// for.
    deep: Option<Box<Deep>>,
}

struct Deep {
    want_timing: bool,
    first_frame_at: Option<Instant>,
    classifier: Classifier,
    status: StatusCode,
    facts: HeadFacts,
    usage: Option<Usage>,
    mode: Mode,
    want_usage: bool,
    /// Present when [`Inspect::answer`] was asked for.
    answer: Option<Answer>,
}

enum Mode {
    Sse { scanner: SseScanner, error: bool },
    Json { buf: Vec<u8>, overflow: bool },
    Done,
}

impl<B, H: OnEnd> Observed<B, H> {
    /// Wraps a response's body, classifying its head now and its body as it
    /// passes.
    pub fn wrap(
        res: Response<B>,
        classifier: &Classifier,
        inspect: Inspect,
        hook: H,
    ) -> Response<Observed<B, H>>
    where
        B: http_body::Body,
    {
        let (parts, body) = res.into_parts();
        let status = parts.status;
        let ended = body.is_end_stream();
        let mode = if !(inspect.outcome || inspect.usage || inspect.answer) || ended {
            None
        } else {
            match (status.is_success(), ContentKind::of(&parts.headers)) {
                (_, ContentKind::EventStream) => Some(Mode::Sse {
                    scanner: SseScanner::new(),
                    error: false,
                }),
                (false, _) | (true, ContentKind::Json | ContentKind::Untyped) => Some(Mode::Json {
                    buf: Vec::new(),
                    overflow: false,
                }),
                (true, ContentKind::Other) => None,
            }
        };
        // The headers adjust an error, also one found in a 2xx body (as
        // `Classifier::classify` does); a success without a watched body
        // needs none of them.
        let facts = if status.is_success() && mode.is_none() {
            HeadFacts::default()
        } else {
            classifier.facts(&parts.headers)
        };
        let outcome = facts.apply(crate::classify::by_status(status.as_u16()));
        let deep = if mode.is_some() || (inspect.timing && !ended) {
            Some(Box::new(Deep {
                want_timing: inspect.timing,
                first_frame_at: None,
                classifier: *classifier,
                status,
                facts,
                usage: None,
                mode: mode.unwrap_or(Mode::Done),
                want_usage: inspect.usage,
                answer: inspect.answer.then(Answer::default),
            }))
        } else {
            None
        };
        let watch = Watch {
            hook,
            outcome,
            data_frames: 0,
            deep,
        };
        let mut observed = Observed {
            inner: body,
            watch: Some(watch),
        };
        if ended && let Some(w) = observed.watch.take() {
            w.fire(EndKind::Complete);
        }
        Response::from_parts(parts, observed)
    }

    /// Wraps a body with a hook and no inspection: the hook learns only how
    /// the body ended, with `outcome` as given.
    pub fn plain(body: B, outcome: Outcome, hook: H) -> Self {
        Observed {
            inner: body,
            watch: Some(Watch {
                hook,
                outcome,
                data_frames: 0,
                deep: None,
            }),
        }
    }

    /// The wrapped body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }

    /// Whether the hook has not been called yet.
    pub fn is_watching(&self) -> bool {
        self.watch.is_some()
    }
}

impl<H: OnEnd> Watch<H> {
    /// `last`: this is the body's last data, and all of it (a one-frame
    /// JSON body is then classified in place, without a copy).
    fn on_data(&mut self, data: &[u8], last: bool) {
        if let Some(deep) = self.deep.as_deref_mut() {
            if self.data_frames == 0 && deep.want_timing {
                deep.first_frame_at = Some(time::now());
            }
            deep.on_data(&mut self.outcome, data, last);
        }
        self.data_frames = self.data_frames.saturating_add(1);
    }

    fn fire(mut self, kind: EndKind) {
        let (mut usage, mut first_frame_at, mut answer) = (None, None, None);
        if let Some(deep) = self.deep.take() {
            first_frame_at = deep.first_frame_at;
            (usage, answer) = deep.finish(&mut self.outcome, kind);
        }
        if kind == EndKind::Failed && self.outcome.is_success() {
            self.outcome = Outcome::TRANSIENT;
        }
        let end = BodyEnd {
            outcome: self.outcome,
            usage,
            kind,
            first_frame_at,
            data_frames: self.data_frames,
            answer: answer.unwrap_or_default(),
        };
        self.hook.on_end(end);
    }
}

impl Deep {
    fn on_data(&mut self, outcome: &mut Outcome, data: &[u8], last: bool) {
        match &mut self.mode {
            Mode::Done => {}
            Mode::Sse { scanner, error } => {
                let (classifier, facts, usage, want_usage, answer) = (
                    &self.classifier,
                    self.facts,
                    &mut self.usage,
                    self.want_usage,
                    &mut self.answer,
                );
                scanner.feed(data, |line, meta| {
                    let usage = want_usage.then_some(&mut *usage);
                    scan_line(classifier, facts, outcome, usage, error, line, meta);
                    if let Some(a) = answer.as_mut() {
                        a.scan(line);
                    }
                });
            }
            Mode::Json { buf, overflow } => {
                if last && buf.is_empty() && !*overflow {
                    if data.len() <= self.classifier.get_body_limit() {
                        *outcome =
                            self.classifier
                                .classify_with(self.status, false, self.facts, data);
                        if outcome.is_success() {
                            self.read_success(data);
                        }
                    }
                    // Classified (or too long to be): nothing left to do.
                    self.mode = Mode::Done;
                } else if !*overflow {
                    if buf.len() + data.len() > self.classifier.get_body_limit() {
                        *overflow = true;
                        *buf = Vec::new();
                    } else {
                        buf.extend_from_slice(data);
                    }
                }
            }
        }
    }

    /// A whole successful JSON body: its usage and answer, as asked.
    fn read_success(&mut self, body: &[u8]) {
        if self.want_usage {
            self.usage = Usage::find(body);
        }
        if let Some(a) = self.answer.as_mut() {
            a.scan(body);
        }
    }

    /// The body is over: finish the parse, settle the outcome, return the
    /// usage and answer seen.
    fn finish(mut self, outcome: &mut Outcome, kind: EndKind) -> (Option<Usage>, Option<Answer>) {
        match std::mem::replace(&mut self.mode, Mode::Done) {
            Mode::Done => {}
            Mode::Sse {
                mut scanner,
                mut error,
            } => {
                if kind == EndKind::Complete {
                    let (classifier, facts, usage, want_usage, answer) = (
                        &self.classifier,
                        self.facts,
                        &mut self.usage,
                        self.want_usage,
                        &mut self.answer,
                    );
                    scanner.finish(|line, meta| {
                        let usage = want_usage.then_some(&mut *usage);
                        scan_line(classifier, facts, outcome, usage, &mut error, line, meta);
                        if let Some(a) = answer.as_mut() {
                            a.scan(line);
                        }
                    });
                }
            }
            Mode::Json { buf, overflow } => {
                if kind == EndKind::Complete && !overflow {
                    *outcome = self
                        .classifier
                        .classify_with(self.status, false, self.facts, &buf);
                    if outcome.is_success() {
                        self.read_success(&buf);
                    }
                }
            }
        }
        (self.usage, self.answer)
    }
}

fn scan_line(
    classifier: &Classifier,
    facts: HeadFacts,
    outcome: &mut Outcome,
    usage: Option<&mut Option<Usage>>,
    error: &mut bool,
    line: &[u8],
    meta: &crate::sse::EventMeta,
) {
    if !*error && let Some(o) = classifier.classify_event(meta, line) {
        *outcome = facts.apply(o);
        *error = true;
    }
    if let Some(usage) = usage
        && let Some(u) = Usage::find(line)
    {
        *usage = Some(u);
    }
}

impl<B, H> http_body::Body for Observed<B, H>
where
    B: http_body::Body,
    H: OnEnd,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let res = ready!(this.inner.as_mut().poll_frame(cx));
        let Some(watch) = this.watch.as_mut() else {
            return Poll::Ready(res);
        };
        match &res {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    use bytes::Buf;
                    if data.chunk().len() == data.remaining() {
                        watch.on_data(data.chunk(), this.inner.is_end_stream());
                    } else {
                        let mut slices = [std::io::IoSlice::new(&[]); 64];
                        let n = data.chunks_vectored(&mut slices);
                        for s in &slices[..n] {
                            watch.on_data(s, false);
                        }
                    }
                }
                // Fire as soon as the last frame passes: a permit or a
                // reservation should not wait for one more poll.
                if this.inner.is_end_stream()
                    && let Some(w) = this.watch.take()
                {
                    w.fire(EndKind::Complete);
                }
            }
            Some(Err(_)) => {
                if let Some(w) = this.watch.take() {
                    w.fire(EndKind::Failed);
                }
            }
            None => {
                if let Some(w) = this.watch.take() {
                    w.fire(EndKind::Complete);
                }
            }
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: fmt::Debug, H: OnEnd> fmt::Debug for Observed<B, H> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Observed")
            .field("inner", &self.inner)
            .field("watching", &self.watch.is_some())
            .finish()
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
}
