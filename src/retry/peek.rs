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
//! * a 2xx `text/event-stream`: up to its first frame that carries output.
//!   An error frame before it means the call failed. Frames that carry no
//!   output (the compatible role-only first chunk
//!   `{"delta":{"role":"assistant","content":""}}`, empty content or
//!   reasoning, empty tool-call deltas, a `finish_reason`-only chunk, the
//!   usage tail, `[DONE]`) are held back, within a [`Hold`] bound in bytes
//!   and time, so that a stream stays retryable until the caller would see
//!   its first real token. Past the bound, or with [`Hold::NONE`], the first
//!   `data:` line decides;
//! * any other 2xx body is not read at all.
//!
//! The result, [`Peeked`], carries the outcome and the response, whose
//! [`PeekBody`] replays the frames already read, in order, before the rest of
//! the body (and a read error, if one happened while peeking, after them).
//! A body longer than the limit is classified by its head and handed on with
//! what was read replayed.
//!
//! A frame "carries output" when a caller would show something: non-empty
//! `content` (text or parts), `reasoning_content` or `audio`, or a
//! tool-call delta with a non-empty `id`, `name` or `arguments`, in either
//! dialect's chunk
//! (`choices[].delta` / `choices[].message`, native `output.choices[].message`
//! or `output.text`). A `data:` payload of any other shape counts as output,
//! so unknown streams are handed on as soon as they flow.
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

use std::any::Any;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Buf;
use http::Response;
use http::response::Parts;
use http_body::{Body, Frame, SizeHint};
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use tokio::time::Sleep;

use crate::body::{Inspect, Observed};
use crate::classify::{Classifier, ContentKind, Outcome, mentions_code_or_error};
use crate::sse::SseScanner;
use crate::time;

/// How long [`Peek`] holds back the leading frames of an event stream that
/// carry no output (see the [module docs](self)).
///
/// Holding them keeps the call retryable until its first real token: an
/// error that arrives right after the compatible role-only first chunk is
/// then retried like one in the first frame. The frames are held until one
/// carries output (then they all go on, in order), an error frame arrives
/// (then the attempt failed), the stream ends, more than
/// [`bytes`](Hold::bytes) were held, or [`time`](Hold::time) passed since
/// the first held frame; in the last two cases the response is handed on as
/// flowing. The caller's headers are late by at most that time, and no
/// byte is lost or reordered.
///
/// # Default
///
/// 16 KiB and 10 s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    bytes: usize,
    time: Duration,
}

impl Hold {
    /// Hold nothing: the first `data:` line decides, whatever it carries.
    pub const NONE: Hold = Hold {
        bytes: 0,
        time: Duration::ZERO,
    };

    /// The defaults: 16 KiB, 10 s.
    pub const fn new() -> Self {
        Self {
            bytes: 16 * 1024,
            time: Duration::from_secs(10),
        }
    }

    /// The most bytes held (counted from the start of the body). Default is
    /// 16 KiB; the classifier's [body limit](Classifier::body_limit) also
    /// applies.
    pub const fn bytes(mut self, bytes: usize) -> Self {
        self.bytes = bytes;
        self
    }

    /// The longest time frames are held, from the first held frame. Default
    /// is 10 s.
    pub const fn time(mut self, time: Duration) -> Self {
        self.time = time;
        self
    }

    /// The configured byte bound.
    pub const fn get_bytes(&self) -> usize {
        self.bytes
    }

    /// The configured time bound.
    pub const fn get_time(&self) -> Duration {
        self.time
    }

    const fn holds(&self) -> bool {
        self.bytes > 0 && !self.time.is_zero()
    }
}

impl Default for Hold {
    fn default() -> Self {
        Self::new()
    }
}

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
    hold: Hold,
    /// Set when the first output-less frame is held: the time bound.
    holding: Option<Pin<Box<Sleep>>>,
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

impl<B> Peek<B>
where
    B: Body + Unpin + 'static,
    B::Data: 'static,
    B::Error: 'static,
{
    /// Starts peeking at `res`, holding output-less stream frames within
    /// the default [`Hold`].
    pub fn new(res: Response<B>, classifier: &Classifier) -> Self {
        Self::with_hold(res, classifier, Hold::new())
    }

    /// Starts peeking at `res`, holding output-less stream frames within
    /// `hold`.
    pub fn with_hold(mut res: Response<B>, classifier: &Classifier, hold: Hold) -> Self {
        // A body a layer below watches has had its head read already.
        let kind = Observed::<B::Data, B::Error>::kind_of(&res)
            .unwrap_or_else(|| ContentKind::of(res.headers()));
        let mode = match (res.status().is_success(), kind) {
            (true, ContentKind::EventStream) => Mode::Sse(SseScanner::new()),
            // A business error may hide in a 2xx JSON (or untyped) body.
            (true, ContentKind::Json | ContentKind::Untyped) => Mode::Whole,
            (true, ContentKind::Other) => Mode::Skip,
            // Any other status: the (small) error body decides.
            (false, _) => Mode::Whole,
        };
        if matches!(mode, Mode::Whole) {
            // A body that a layer below already watches is classified there,
            // once, for all of them.
            Observed::<B::Data, B::Error>::want(&mut res, classifier, Inspect::OUTCOME);
        }
        let (parts, body) = res.into_parts();
        Self {
            state: Some(State {
                parts,
                body,
                frames: Frames::new(),
                error: None,
                read: 0,
                mode,
                classifier: *classifier,
                hold,
                holding: None,
            }),
        }
    }
}

impl<B> State<B>
where
    B: Body + 'static,
    B::Data: 'static,
    B::Error: 'static,
{
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
        // A body a layer below watches was classified as it passed: its
        // verdict is this one (asked for in `with_hold`), read once.
        if let Some(o) = (&self.body as &dyn Any).downcast_ref::<Observed<B::Data, B::Error>>()
            && o.end().is_some()
            && o.inspects_outcome()
        {
            return o.outcome();
        }
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

/// Frames read ahead: the first inline when it is data (most peeks read one
/// data frame; kept as its data, not as a `Frame`, whose trailers variant
/// would triple the size of every response), more in a queue that
/// allocates only when needed.
struct Frames<D> {
    first: Option<D>,
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
            match frame.into_data() {
                Ok(data) => self.first = Some(data),
                Err(frame) => self.rest.push_back(frame),
            }
        } else {
            self.rest.push_back(frame);
        }
    }

    fn pop_front(&mut self) -> Option<Frame<D>> {
        match self.first.take() {
            Some(data) => Some(Frame::data(data)),
            None => self.rest.pop_front(),
        }
    }

    fn is_empty(&self) -> bool {
        self.first.is_none() && self.rest.is_empty()
    }

    fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.rest.len()
    }

    /// The data read ahead, in order.
    fn datas(&self) -> impl Iterator<Item = &D> {
        self.first
            .iter()
            .chain(self.rest.iter().filter_map(Frame::data_ref))
    }
}

/// The frames' data as one slice, copying only when there is more than one
/// chunk.
fn contiguous<D: Buf>(frames: &Frames<D>, len: usize) -> Cow<'_, [u8]> {
    let mut datas = frames.datas();
    match (datas.next(), datas.next()) {
        (None, _) => Cow::Borrowed(&[]),
        (Some(d), None) if d.chunk().len() == d.remaining() => Cow::Borrowed(d.chunk()),
        _ => {
            let mut v = Vec::with_capacity(len);
            for d in frames.datas() {
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

impl<B> Future for Peek<B>
where
    B: Body + Unpin + 'static,
    B::Data: 'static,
    B::Error: 'static,
{
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
                Poll::Pending => {
                    if let Some(sleep) = st.holding.as_mut()
                        && sleep.as_mut().poll(cx).is_ready()
                    {
                        // Held long enough: the stream is flowing.
                        return Poll::Ready(
                            this.state.take().expect("state").finish(Outcome::Success),
                        );
                    }
                    return Poll::Pending;
                }
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
                        let status = st.parts.status.as_u16();
                        let hold = st.hold.holds();
                        let mut held = false;
                        for_each_chunk(data, |chunk| {
                            scanner.feed(chunk, |line, meta| {
                                if decided.is_some() {
                                    return;
                                }
                                match c.classify_frame(status, meta, line) {
                                    Some(o) if !o.is_success() => decided = Some(Some(o)),
                                    _ if !hold || carries_output(line) => decided = Some(None),
                                    _ => held = true,
                                }
                            })
                        });
                        if held && decided.is_none() && st.holding.is_none() {
                            st.holding = Some(Box::pin(tokio::time::sleep_until(
                                time::now() + st.hold.time,
                            )));
                        }
                    }
                    Mode::Whole | Mode::Skip => {}
                }
            }
            st.frames.push_back(frame);
            if decided.is_none()
                && let Some(sleep) = &st.holding
                && sleep.deadline() <= time::now()
            {
                return Poll::Ready(this.state.take().expect("state").finish(Outcome::Success));
            }
            if let Some(found) = decided {
                let outcome = match found {
                    Some(o) => st.classifier.facts(&st.parts.headers).apply(o),
                    None => Outcome::Success,
                };
                return Poll::Ready(this.state.take().expect("state").finish(outcome));
            }
            if st.holding.is_some() && st.read > st.hold.bytes {
                // Held as much as allowed: the stream is flowing.
                return Poll::Ready(this.state.take().expect("state").finish(Outcome::Success));
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
    let status = st.parts.status.as_u16();
    scanner.finish(|line, meta| {
        if found.is_none() {
            found = Some(c.classify_frame(status, meta, line));
        }
    });
    match found.flatten() {
        Some(o) => c.facts(&st.parts.headers).apply(o),
        None => Outcome::Success,
    }
}

/// Whether one SSE `data:` payload carries output a caller would see (see
/// the [module docs](self)). Reads the JSON without allocating.
pub(crate) fn carries_output(data: &[u8]) -> bool {
    let data = data.trim_ascii();
    if data == b"[DONE]" {
        return false;
    }
    quick_output(data).unwrap_or_else(|| parsed_output(data))
}

/// [`carries_output`] by a parse of the chunk.
fn parsed_output(data: &[u8]) -> bool {
    match serde_json::from_slice::<ChunkShape>(data) {
        Ok(ChunkShape {
            known: true,
            output,
        }) => output,
        // Not a chat chunk of either dialect: treat it as flowing.
        _ => true,
    }
}

/// The common cases without a parse: `Some(true)` when a `content` (or
/// `reasoning_content`) key holds a non-empty string; `Some(false)` for a
/// chat chunk (`"choices":` or `"output":`) whose content keys all hold
/// `""` or `null` and that has no `tool_calls`, `text` or `audio` key;
/// `None` when only a parse can tell. Keys inside strings have escaped
/// quotes, so every match is a real key.
fn quick_output(json: &[u8]) -> Option<bool> {
    use memchr::memmem::Finder;
    use std::sync::LazyLock;
    static CONTENT: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"content\":"));
    static OTHERS: LazyLock<[Finder<'static>; 3]> = LazyLock::new(|| {
        [
            Finder::new(b"\"tool_calls\""),
            Finder::new(b"\"text\""),
            Finder::new(b"\"audio\""),
        ]
    });
    static CHAT: LazyLock<[Finder<'static>; 2]> =
        LazyLock::new(|| [Finder::new(b"\"choices\":"), Finder::new(b"\"output\":")]);
    const KEY: usize = b"content\":".len();
    let mut rest = json;
    let mut plain = true;
    while let Some(i) = CONTENT.find(rest) {
        let before = i.checked_sub(1).map(|q| rest[q]);
        let after = rest[i + KEY..].trim_ascii_start();
        // `"content":` or `_content":` (`"reasoning_content":`).
        if matches!(before, Some(b'"' | b'_')) {
            match after.first() {
                Some(b'"') if after.get(1) != Some(&b'"') => return Some(true),
                Some(b'"') => {}
                Some(b'n') if after.starts_with(b"null") => {}
                _ => plain = false,
            }
        }
        rest = &rest[i + KEY..];
    }
    if !plain || OTHERS.iter().any(|f| f.find(json).is_some()) {
        return None;
    }
    CHAT.iter().any(|f| f.find(json).is_some()).then_some(false)
}

/// The keys looked at; any other is skipped.
#[derive(Deserialize)]
#[serde(field_identifier, rename_all = "snake_case")]
enum Key {
    Choices,
    Output,
    Delta,
    Message,
    Content,
    ReasoningContent,
    ToolCalls,
    Text,
    Audio,
    Type,
    #[serde(other)]
    Other,
}

/// A stream chunk: `known` when it has the shape of a chat chunk
/// (compatible `choices`, native `output`), `output` when it carries any.
struct ChunkShape {
    known: bool,
    output: bool,
}

impl<'de> Deserialize<'de> for ChunkShape {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = ChunkShape;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chat chunk")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChunkShape, A::Error> {
                let mut shape = ChunkShape {
                    known: false,
                    output: false,
                };
                while let Some(key) = map.next_key::<Key>()? {
                    match key {
                        Key::Choices => {
                            shape.known = true;
                            shape.output |= map.next_value::<Choices>()?.0;
                        }
                        Key::Output => {
                            shape.known = true;
                            shape.output |= map.next_value::<NativeOutput>()?.0;
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                        }
                    }
                }
                Ok(shape)
            }
        }
        d.deserialize_map(V)
    }
}

/// Native `output`: `choices` (message format) or `text` (text format).
struct NativeOutput(bool);

impl<'de> Deserialize<'de> for NativeOutput {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = NativeOutput;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a native output")
            }
            fn visit_unit<E: de::Error>(self) -> Result<NativeOutput, E> {
                Ok(NativeOutput(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<NativeOutput, A::Error> {
                let mut out = false;
                while let Some(key) = map.next_key::<Key>()? {
                    out |= match key {
                        Key::Choices => map.next_value::<Choices>()?.0,
                        Key::Text => map.next_value::<AnyText>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            false
                        }
                    };
                }
                Ok(NativeOutput(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `choices`: whether any choice's `delta` or `message` carries output.
struct Choices(bool);

impl<'de> Deserialize<'de> for Choices {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choices;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("choices")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Choices, E> {
                Ok(Choices(false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Choices, A::Error> {
                let mut out = false;
                while let Some(c) = seq.next_element::<Choice>()? {
                    out |= c.0;
                }
                Ok(Choices(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// One choice: its `delta` (stream) or `message` (native stream).
struct Choice(bool);

impl<'de> Deserialize<'de> for Choice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Choice;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a choice")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Choice, E> {
                Ok(Choice(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Choice, A::Error> {
                let mut out = false;
                while let Some(key) = map.next_key::<Key>()? {
                    out |= match key {
                        Key::Delta | Key::Message => map.next_value::<Message>()?.0,
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            false
                        }
                    };
                }
                Ok(Choice(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// A delta or message: `content`, `reasoning_content`, `tool_calls`,
/// `audio` (Omni models).
struct Message(bool);

impl<'de> Deserialize<'de> for Message {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Message;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Message, E> {
                Ok(Message(false))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Message, A::Error> {
                let mut out = false;
                while let Some(key) = map.next_key::<Key>()? {
                    out |= match key {
                        Key::Content | Key::ReasoningContent | Key::ToolCalls | Key::Audio => {
                            map.next_value::<AnyText>()?.0
                        }
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            false
                        }
                    };
                }
                Ok(Message(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// Whether a value holds a non-empty string anywhere, other than under a
/// `type` key (`"type":"function"` / `"type":"text"` is not output; numbers
/// such as `index` are not either).
struct AnyText(bool);

impl<'de> Deserialize<'de> for AnyText {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AnyText, E> {
                Ok(AnyText(!v.is_empty()))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<AnyText, E> {
                Ok(AnyText(false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<AnyText, E> {
                Ok(AnyText(false))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<AnyText, E> {
                Ok(AnyText(false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<AnyText, E> {
                Ok(AnyText(false))
            }
            fn visit_unit<E: de::Error>(self) -> Result<AnyText, E> {
                Ok(AnyText(false))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<AnyText, A::Error> {
                let mut out = false;
                while let Some(v) = seq.next_element::<AnyText>()? {
                    out |= v.0;
                }
                Ok(AnyText(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyText, A::Error> {
                let mut out = false;
                while let Some(key) = map.next_key::<Key>()? {
                    if matches!(key, Key::Type) {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        out |= map.next_value::<AnyText>()?.0;
                    }
                }
                Ok(AnyText(out))
            }
        }
        d.deserialize_any(V)
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
        let buffered: u64 = self.frames.datas().map(|d| d.remaining() as u64).sum();
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

#[cfg(test)]
mod tests {
    use super::{carries_output, parsed_output, quick_output};

    #[test]
    fn output_is_content_reasoning_or_a_tool_call() {
        let none = [
            r#"{"choices":[{"delta":{"content":"","role":"assistant"},"index":0,"logprobs":null,"finish_reason":null}],"object":"chat.completion.chunk","usage":null}"#,
            r#"{"choices":[{"delta":{"content":null,"role":"assistant","reasoning_content":""},"index":0}]}"#,
            r#"{"choices":[{"finish_reason":"stop","delta":{},"index":0,"logprobs":null}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{},"index":0,"id":"","type":"function"}]},"index":0}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"index":0,"id":"","type":"function","function":{"arguments":""}}]},"index":0}]}"#,
            r#"{"output":{"choices":[{"message":{"content":"","reasoning_content":"","role":"assistant"},"finish_reason":"null"}]},"usage":{"output_tokens":0}}"#,
            r#"{"output":{"choices":[{"message":{"content":[{"text":""}],"role":"assistant"}}]}}"#,
            r#"{"output":{"text":"","finish_reason":"null"}}"#,
            r#"{"choices":[{"delta":{"content":"","role":"assistant"},"index":0}],"x":"{\"content\":\"quoted\"}"}"#,
            r#"{"choices":[{"delta":{"audio":{"transcript":""}},"index":0}],"usage":{"text_tokens":1}}"#,
            "[DONE]",
            " [DONE] ",
        ];
        for d in none {
            assert!(!carries_output(d.as_bytes()), "{d}");
        }
        let some = [
            r#"{"choices":[{"delta":{"content":"Hi"},"index":0}]}"#,
            r#"{"choices":[{"delta":{"content":null,"reasoning_content":"\u7528"},"index":0}]}"#,
            r#"{"choices":[{"delta":{"content":null,"tool_calls":[{"index":0,"id":"call_0b","type":"function","function":{"name":"get_weather","arguments":""}}],"role":"assistant"},"index":0}]}"#,
            r#"{"choices":[{"delta":{"tool_calls":[{"function":{"arguments":" \"x\"}"},"index":0,"id":"","type":"function"}]},"index":0}]}"#,
            r#"{"output":{"choices":[{"message":{"content":"Hel","role":"assistant"},"finish_reason":"null"}]}}"#,
            r#"{"output":{"choices":[{"message":{"content":[{"text":"x"}],"role":"assistant"}}]}}"#,
            r#"{"output":{"text":"Hello","finish_reason":"null"}}"#,
            r#"{"choices":[{"delta":{"audio":{"data":"UklGR","transcript":""}},"index":0}]}"#,
            r#"{"choices":[{"delta":{"content": "spaced"},"index":0}]}"#,
            // Shapes of other APIs: flowing.
            r#"{"type":"ping"}"#,
            "not json",
        ];
        for d in some {
            assert!(carries_output(d.as_bytes()), "{d}");
        }
        // The shortcut never disagrees with the parse.
        for d in none.iter().chain(&some) {
            let d = d.trim().as_bytes();
            if let Some(q) = quick_output(d) {
                assert_eq!(q, parsed_output(d), "{}", String::from_utf8_lossy(d));
            }
        }
    }

    /// Frames read ahead are replayed in order, trailers included, whether
    /// the first one is data (kept inline) or trailers (queued).
    #[tokio::test]
    async fn replays_data_and_trailers_in_order() {
        use bytes::Bytes;
        use http::HeaderMap;
        use http_body::Frame;
        use http_body_util::{BodyExt, StreamBody};

        use super::Peek;
        use crate::classify::{Classifier, Outcome};

        let mut trailers = HeaderMap::new();
        trailers.insert("x-t", "1".parse().unwrap());
        let data = |s: &'static str| Frame::data(Bytes::from_static(s.as_bytes()));
        for frames in [
            vec![
                data("{\"a\""),
                data(":1}"),
                Frame::trailers(trailers.clone()),
            ],
            vec![Frame::trailers(trailers.clone()), data("{\"a\":1}")],
        ] {
            let expected: Vec<_> = frames
                .iter()
                .map(|f| (f.data_ref().cloned(), f.trailers_ref().cloned()))
                .collect();
            let body = StreamBody::new(futures_util::stream::iter(
                frames.into_iter().map(Ok::<_, std::convert::Infallible>),
            ));
            let res = http::Response::builder()
                .header("content-type", "application/json")
                .body(body)
                .unwrap();
            let peeked = Peek::new(res, &Classifier::new()).await;
            assert_eq!(peeked.outcome, Outcome::Success);
            let mut body = peeked.response.into_body();
            let mut got = Vec::new();
            while let Some(f) = body.frame().await {
                let f = f.unwrap();
                got.push((f.data_ref().cloned(), f.trailers_ref().cloned()));
            }
            assert_eq!(got, expected);
        }
    }
}
