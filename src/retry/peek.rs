//! Classify a response before anyone sees it, without losing a byte.
//!
//! A layer that may still change its mind about a response (retry it, fall
//! back to another model, answer a gateway client differently) must know the
//! response's real outcome before it hands the response on, and DashScope
//! hides errors in bodies: a JSON error after a `4xx`/`5xx`, a business error
//! inside an HTTP `200`, an SSE stream whose first frame is `event:error`
//! with `:HTTP_STATUS/429`. [`Peek`] reads just enough of the body to decide:
//!
//! * a non-2xx response: the whole (small) body, up to the classifier's
//!   [body limit](crate::classify::Classifier::body_limit), classified with
//!   [`Classifier::classify`];
//! * a 2xx JSON (or untyped) body: the same, since a business error may hide
//!   in it;
//! * a 2xx `text/event-stream`: up to the first complete `data:` line. An
//!   error frame there means the call failed; anything else means the stream
//!   is flowing and the response is handed on;
//! * any other 2xx body is not read at all.
//!
//! The result, [`Peeked`], carries the outcome and the response, whose
//! [`PeekBody`] replays the frames already read, in order, before the rest of
//! the body (and a read error, if one happened while peeking, after them).
//! A body longer than the limit is classified by its head and handed on with
//! what was read replayed.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! use http_body_util::BodyExt;
//! use tower_qwen::classify::{Classifier, Outcome, ThrottleCause};
//! use tower_qwen::retry::peek::Peek;
//!
//! let wire = "id:1\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.RateQuota\",\"message\":\"Requests rate limit exceeded\"}\n\n";
//! let res = http::Response::builder()
//!     .header("content-type", "text/event-stream")
//!     .body(String::from(wire))
//!     .unwrap();
//! let peeked = Peek::new(res, &Classifier::new()).await;
//! assert_eq!(peeked.outcome, Outcome::throttled(ThrottleCause::Requests));
//! // Nothing was lost: the body still yields every byte.
//! let bytes = peeked.response.into_body().collect().await.unwrap().to_bytes();
//! assert_eq!(bytes, wire);
//! # }
//! ```

use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Buf;
use http::Response;
use http::response::Parts;
use http_body::{Body, Frame, SizeHint};

use crate::classify::{Classifier, ContentKind, Outcome, mentions_code_or_error};
use crate::sse::SseScanner;

/// A future that reads the start of a response body until the response can
/// be classified. See the [module docs](self).
///
/// The body must be `Unpin` (it is moved into the [`PeekBody`] afterwards);
/// wrap a `!Unpin` body in `Pin<Box<_>>`.
pub struct Peek<B: Body> {
    state: Option<State<B>>,
}

// Frames and errors are never pinned: only the body is polled in place, and
// it is `Unpin`.
impl<B: Body + Unpin> Unpin for Peek<B> {}

struct State<B: Body> {
    parts: Parts,
    body: B,
    frames: Frames<B::Data>,
    error: Option<B::Error>,
    read: usize,
    mode: Mode,
    classifier: Classifier,
}

enum Mode {
    /// Read the whole body (up to the limit) and classify it.
    Whole,
    /// Read up to the first data line of an event stream.
    Sse(SseScanner),
    /// Do not read.
    Skip,
}

/// What [`Peek`] found: the outcome, and the response with nothing lost.
#[derive(Debug)]
#[non_exhaustive]
pub struct Peeked<B: Body> {
    /// The response's outcome.
    pub outcome: Outcome,
    /// The response; its body replays what was read, then the rest.
    pub response: Response<PeekBody<B>>,
}

impl<B: Body + Unpin> Peek<B> {
    /// Starts peeking at `res`.
    pub fn new(res: Response<B>, classifier: &Classifier) -> Self {
        let (parts, body) = res.into_parts();
        let mode = match (parts.status.is_success(), ContentKind::of(&parts.headers)) {
            (true, ContentKind::EventStream) => Mode::Sse(SseScanner::new()),
            // A business error may hide in a 2xx JSON (or untyped) body.
            (true, ContentKind::Json | ContentKind::Untyped) => Mode::Whole,
            (true, ContentKind::Other) => Mode::Skip,
            // Any other status: the (small) error body decides.
            (false, _) => Mode::Whole,
        };
        Self {
            state: Some(State {
                parts,
                body,
                frames: Frames::new(),
                error: None,
                read: 0,
                mode,
                classifier: *classifier,
            }),
        }
    }
}

impl<B: Body> State<B> {
    fn finish(self, outcome: Outcome) -> Peeked<B> {
        Peeked {
            outcome,
            response: Response::from_parts(
                self.parts,
                PeekBody {
                    frames: self.frames,
                    error: self.error,
                    inner: self.body,
                    failed: false,
                },
            ),
        }
    }

    fn head_outcome(&self) -> Outcome {
        self.classifier
            .classify_head(self.parts.status, &self.parts.headers)
    }

    /// The outcome once the whole body (within the limit) has been read.
    fn whole_outcome(&self) -> Outcome {
        let bytes = contiguous(&self.frames, self.read);
        let status = self.parts.status;
        if status.is_success() && !mentions_code_or_error(&bytes) {
            // Most 2xx bodies are plain successes: no JSON parse.
            return Outcome::Success;
        }
        self.classifier
            .classify(status, &self.parts.headers, &bytes)
    }
}

/// Frames read ahead: the first inline (most peeks read one frame), more in
/// a queue that allocates only when needed.
struct Frames<D> {
    first: Option<Frame<D>>,
    rest: VecDeque<Frame<D>>,
}

impl<D> Frames<D> {
    const fn new() -> Self {
        Self {
            first: None,
            rest: VecDeque::new(),
        }
    }

    fn push_back(&mut self, frame: Frame<D>) {
        if self.first.is_none() && self.rest.is_empty() {
            self.first = Some(frame);
        } else {
            self.rest.push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<Frame<D>> {
        self.first.take().or_else(|| self.rest.pop_front())
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    fn iter(&self) -> impl Iterator<Item = &Frame<D>> {
        self.first.iter().chain(self.rest.iter())
    }
}

/// The frames' data as one slice, copying only when there is more than one
/// chunk.
fn contiguous<D: Buf>(frames: &Frames<D>, len: usize) -> Cow<'_, [u8]> {
    let mut datas = frames.iter().filter_map(Frame::data_ref);
    match (datas.next(), datas.next()) {
        (None, _) => Cow::Borrowed(&[]),
        (Some(d), None) if d.chunk().len() == d.remaining() => Cow::Borrowed(d.chunk()),
        _ => {
            let mut v = Vec::with_capacity(len);
            for d in frames.iter().filter_map(Frame::data_ref) {
                for_each_chunk(d, |c| v.extend_from_slice(c));
            }
            Cow::Owned(v)
        }
    }
}

/// Calls `f` with each contiguous chunk of `data`, without consuming it.
/// (At most 64 chunks are inspected, as in
/// [`Observed`](crate::body::Observed); `Bytes` always has one.)
pub(crate) fn for_each_chunk<D: Buf>(data: &D, mut f: impl FnMut(&[u8])) {
    if data.chunk().len() == data.remaining() {
        f(data.chunk());
    } else {
        let mut slices = [std::io::IoSlice::new(&[]); 64];
        let n = data.chunks_vectored(&mut slices);
        for s in &slices[..n] {
            f(s);
        }
    }
}

impl<B: Body + Unpin> Future for Peek<B> {
    type Output = Peeked<B>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Peeked<B>> {
        let this = self.get_mut();
        let st = this.state.as_mut().expect("Peek polled after completion");
        if matches!(st.mode, Mode::Skip) {
            let outcome = st.head_outcome();
            return Poll::Ready(this.state.take().expect("state").finish(outcome));
        }
        let limit = st.classifier.get_body_limit();
        loop {
            if st.body.is_end_stream() {
                let outcome = match st.mode {
                    Mode::Sse(_) => sse_end(st),
                    _ => st.whole_outcome(),
                };
                return Poll::Ready(this.state.take().expect("state").finish(outcome));
            }
            let frame = match Pin::new(&mut st.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    // Ended: the `is_end_stream` branch classifies on the
                    // next turn, but bodies that never report it need this.
                    let outcome = match st.mode {
                        Mode::Sse(_) => sse_end(st),
                        _ => st.whole_outcome(),
                    };
                    return Poll::Ready(this.state.take().expect("state").finish(outcome));
                }
                Poll::Ready(Some(Err(e))) => {
                    st.error = Some(e);
                    let head = st.head_outcome();
                    let outcome = if head.is_success() {
                        Outcome::TRANSIENT
                    } else {
                        head
                    };
                    return Poll::Ready(this.state.take().expect("state").finish(outcome));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            let mut decided = None;
            if let Some(data) = frame.data_ref() {
                st.read = st.read.saturating_add(data.remaining());
                match &mut st.mode {
                    Mode::Sse(scanner) => {
                        let c = st.classifier;
                        for_each_chunk(data, |chunk| {
                            scanner.feed(chunk, |line, meta| {
                                if decided.is_none() {
                                    decided = Some(c.classify_event(meta, line));
                                }
                            })
                        });
                    }
                    Mode::Whole | Mode::Skip => {}
                }
            }
            st.frames.push_back(frame);
            if let Some(found) = decided {
                let outcome = match found {
                    Some(o) => st.classifier.facts(&st.parts.headers).apply(o),
                    None => Outcome::Success,
                };
                return Poll::Ready(this.state.take().expect("state").finish(outcome));
            }
            if st.read > limit {
                // Too long to classify by its content: the head decides, and
                // an event stream with no data line yet is flowing.
                let outcome = st.head_outcome();
                return Poll::Ready(this.state.take().expect("state").finish(outcome));
            }
        }
    }
}

fn sse_end<B: Body>(st: &mut State<B>) -> Outcome {
    let Mode::Sse(scanner) = &mut st.mode else {
        return Outcome::Success;
    };
    let mut found = None;
    let c = st.classifier;
    scanner.finish(|line, meta| {
        if found.is_none() {
            found = Some(c.classify_event(meta, line));
        }
    });
    match found.flatten() {
        Some(o) => c.facts(&st.parts.headers).apply(o),
        None => Outcome::Success,
    }
}

impl<B: Body> fmt::Debug for Peek<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peek")
            .field("done", &self.state.is_none())
            .finish()
    }
}

/// A response body that first replays the frames a [`Peek`] read, then
/// yields the rest of the original body.
pub struct PeekBody<B: Body> {
    frames: Frames<B::Data>,
    error: Option<B::Error>,
    inner: B,
    failed: bool,
}

impl<B: Body + Unpin> Unpin for PeekBody<B> {}

impl<B: Body> PeekBody<B> {
    /// A body with nothing read ahead: passes `inner` through.
    pub fn new(inner: B) -> Self {
        Self {
            frames: Frames::new(),
            error: None,
            inner,
            failed: false,
        }
    }

    /// How many frames are waiting to be replayed.
    pub fn replayed_frames(&self) -> usize {
        self.frames.len()
    }

    /// The original body.
    pub fn get_ref(&self) -> &B {
        &self.inner
    }
}

impl<B: Body + Unpin> Body for PeekBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        if let Some(frame) = this.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(err) = this.error.take() {
            this.failed = true;
            return Poll::Ready(Some(Err(err)));
        }
        if this.failed {
            return Poll::Ready(None);
        }
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty()
            && self.error.is_none()
            && (self.failed || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.error.is_some() || self.failed {
            return SizeHint::default();
        }
        let buffered: u64 = self
            .frames
            .iter()
            .filter_map(Frame::data_ref)
            .map(|d| d.remaining() as u64)
            .sum();
        let inner = self.inner.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(buffered));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(buffered));
        }
        hint
    }
}

impl<B: Body> fmt::Debug for PeekBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeekBody")
            .field("replay_frames", &self.frames.len())
            .field("error", &self.error.is_some())
            .finish()
    }
}
