//! tower-qwen's fuzz targets, as plain functions of one input.
//!
//! Each target is a `fn(&[u8])` that panics when a property breaks. The
//! libFuzzer binaries in `fuzz_targets/` call them, and so does the crate's
//! own test `tests/fuzz_corpus/main.rs`, which replays the committed corpus
//! without a fuzzer (this file is compiled into it with `#[path]`), so the
//! targets build, and the corpus passes, in every `cargo test`.
//!
//! Inputs are text-shaped so seeds stay readable and libFuzzer's mutations
//! stay meaningful: a first line of options (`key=value` pairs and bare
//! numbers, e.g. split offsets), then, for HTTP-shaped targets, header lines
//! `name: value` up to a blank line, then the body. Every target is
//! tokio-free: bodies are polled with a no-op waker.
//!
//! The gateway's targets (`gateway_config`, `gateway_router`) need the
//! crate's feature `gateway` (this package's feature of the same name, on
//! by default); they use a tokio runtime, which they build themselves.
//!
//! To add a target: a `pub fn` here, an entry in [`targets`], a
//! `fuzz_targets/<name>.rs` calling it, a `[[bin]]` in `fuzz/Cargo.toml`, a
//! `#[test]` in `tests/fuzz_corpus/main.rs`, and seeds in `fuzz/seeds/<name>/`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use http_body::{Body as HttpBody, Frame, SizeHint};
use tower_qwen::body::{BodyEnd, EndKind, Inspect, Observed};
use tower_qwen::classify::{AllocationQuotaPolicy, Classifier, Outcome};
use tower_qwen::request::{Endpoint, RequestInfo};
use tower_qwen::sse::{EventMeta, MAX_LINE, SseScanner, parse_events};
use tower_qwen::tokens::estimate_text_tokens;

/// A fuzz target: panics when a property breaks.
pub type Target = fn(&[u8]);

/// Every target by name, as the corpus replay and the script know them
/// (the gateway's only with feature `gateway`).
pub fn targets() -> Vec<(&'static str, Target)> {
    #[allow(unused_mut)]
    let mut all: Vec<(&'static str, Target)> = vec![
        ("sse", sse),
        ("classify", classify),
        ("retry_after", retry_after),
        ("request_info", request_info),
    ];
    #[cfg(feature = "gateway")]
    all.extend([
        ("gateway_config", gateway::gateway_config as Target),
        ("gateway_router", gateway::gateway_router as Target),
    ]);
    all
}

/// The targets that need feature `gateway`.
pub const GATEWAY_TARGETS: &[&str] = &["gateway_config", "gateway_router"];

#[cfg(feature = "gateway")]
#[allow(unused_imports)] // used by the libFuzzer binaries
pub use gateway::{gateway_config, gateway_router};

// ---------------------------------------------------------------------------
// The input format.

/// The first line's options: `key=value` pairs and bare numbers.
#[derive(Debug, Default)]
struct Options<'a> {
    pairs: Vec<(&'a [u8], &'a [u8])>,
    numbers: Vec<u64>,
}

impl<'a> Options<'a> {
    fn parse(line: &'a [u8]) -> Self {
        let mut o = Options::default();
        for token in line.split(|b| b.is_ascii_whitespace()) {
            if token.is_empty() {
                continue;
            }
            match token.iter().position(|&b| b == b'=') {
                Some(i) => o.pairs.push((&token[..i], &token[i + 1..])),
                None => {
                    if let Some(n) = number(token) {
                        o.numbers.push(n);
                    }
                }
            }
        }
        o
    }

    fn get(&self, key: &str) -> Option<u64> {
        self.pairs
            .iter()
            .rev()
            .find(|(k, _)| *k == key.as_bytes())
            .and_then(|(_, v)| number(v))
    }

    fn flag(&self, key: &str) -> bool {
        self.get(key).is_some_and(|v| v != 0)
    }
}

fn number(b: &[u8]) -> Option<u64> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

/// `(first line, rest)`.
fn first_line(data: &[u8]) -> (&[u8], &[u8]) {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[]),
    }
}

/// Header lines up to a blank line (or the end), then the rest. Lines that
/// are no valid header are skipped, as a real HTTP stack would refuse them.
fn headers(mut data: &[u8]) -> (HeaderMap, &[u8]) {
    let mut map = HeaderMap::new();
    while !data.is_empty() {
        let (line, rest) = first_line(data);
        data = rest;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    (map, data)
}

/// `body` cut at `offsets` (taken modulo its length + 1, sorted), empty
/// pieces kept: a body may well send an empty frame.
fn split<'b>(body: &'b [u8], offsets: &[u64]) -> Vec<&'b [u8]> {
    let mut cuts: Vec<usize> = offsets
        .iter()
        .map(|&o| (o % (body.len() as u64 + 1)) as usize)
        .collect();
    cuts.sort_unstable();
    let mut out = Vec::with_capacity(cuts.len() + 1);
    let mut at = 0;
    for c in cuts {
        out.push(&body[at..c]);
        at = c;
    }
    out.push(&body[at..]);
    out
}

// ---------------------------------------------------------------------------
// sse: the incremental scanner and the whole-buffer reader.

/// One `data:` line as the scanner reports it.
type Line = (Bytes, EventMeta);

fn scan(max_line: usize, chunks: &[&[u8]]) -> Vec<Line> {
    let mut s = SseScanner::new().max_line(max_line);
    let mut out = Vec::new();
    for c in chunks {
        s.feed(c, |d, m| out.push((Bytes::copy_from_slice(d), *m)));
    }
    s.finish(|d, m| out.push((Bytes::copy_from_slice(d), *m)));
    out
}

/// The SSE scanner and `parse_events`.
///
/// Input: `max=N` (the scanner's longest line; default [`MAX_LINE`]) and
/// split offsets on the first line, then the stream.
///
/// Properties: the scanner reports the same lines whatever the chunking
/// (whole, at the given offsets, byte by byte); and on valid UTF-8 without
/// overlong lines, the events it reports are those `parse_events` collects
/// (same data, same error flag and `:HTTP_STATUS/`), so a body classified
/// whole and the same body watched as a stream see the same events.
pub fn sse(data: &[u8]) {
    let (head, stream) = first_line(data);
    let opts = Options::parse(head);
    let max_line = opts.get("max").map_or(MAX_LINE, |m| m as usize);

    let whole = scan(max_line, &[stream]);
    let parts = scan(max_line, &split(stream, &opts.numbers));
    assert_eq!(whole, parts, "split at {:?}", opts.numbers);
    let bytes: Vec<&[u8]> = stream.chunks(1).collect();
    assert_eq!(whole, scan(max_line, &bytes), "byte by byte");

    let events = parse_events(stream);
    for ev in &events {
        let _ = ev.is_error();
    }

    let longest = stream.split(|&b| b == b'\n').map(<[u8]>::len).max();
    if std::str::from_utf8(stream).is_err() || longest.unwrap_or(0) > max_line {
        return;
    }
    // Group the scanner's lines into events: a line with `data_lines == 0`
    // opens one; an event's metadata is what its last data line saw.
    let mut grouped: Vec<(String, bool, Option<u16>)> = Vec::new();
    for (line, meta) in &whole {
        let line = std::str::from_utf8(line).expect("a line of valid UTF-8");
        match grouped.last_mut() {
            Some(last) if meta.data_lines > 0 => {
                last.0.push('\n');
                last.0.push_str(line);
                (last.1, last.2) = (meta.error_event, meta.http_status);
            }
            _ => grouped.push((line.to_owned(), meta.error_event, meta.http_status)),
        }
    }
    // A status comment after an event's data reaches the whole event in
    // `parse_events`, but no line the scanner already reported: compare
    // only the data then.
    let late_status = status_after_data(stream);
    // `parse_events` also keeps events without data; the scanner never
    // reports those. An event whose only data is empty is invisible to the
    // comparison on both sides.
    let mine: Vec<_> = grouped.into_iter().filter(|g| !g.0.is_empty()).collect();
    let theirs: Vec<_> = events
        .iter()
        .filter(|e| !e.data.is_empty())
        .map(|e| (e.data.clone(), e.is_error_event(), e.http_status))
        .collect();
    if late_status {
        let data =
            |v: &[(String, bool, Option<u16>)]| v.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
        assert_eq!(
            data(&mine),
            data(&theirs),
            "scanner and parse_events disagree"
        );
    } else {
        assert_eq!(mine, theirs, "scanner and parse_events disagree");
    }
}

/// Whether a `:HTTP_STATUS/` comment follows a `data:` line in the same
/// event.
fn status_after_data(stream: &[u8]) -> bool {
    let mut has_data = false;
    for line in stream.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            has_data = false;
        } else if let Some(comment) = line.strip_prefix(b":") {
            if has_data && comment.trim_ascii().starts_with(b"HTTP_STATUS/") {
                return true;
            }
        } else {
            let field = line.split(|&b| b == b':').next().unwrap_or(line);
            match field {
                b"data" => has_data = true,
                b"event" | b"id" => has_data = false,
                _ => {}
            }
        }
    }
    false
}

// ---------------------------------------------------------------------------
// classify: status, headers, body; and the same response through `Observed`.

/// A response body from a list of frames, polled without a runtime.
struct Frames {
    frames: VecDeque<Frame<Chunk>>,
    /// Whether `is_end_stream` reports the end (like `Full`) or the end is
    /// only seen by polling once more (like a stream).
    reports_end: bool,
    /// The body fails after its frames instead of ending.
    fail: bool,
}

/// A frame's data: contiguous, or in two pieces (a `Buf` whose `chunk()` is
/// not all of it, as hyper's may be).
enum Chunk {
    One(Bytes),
    Two(bytes::buf::Chain<Bytes, Bytes>),
}

impl Buf for Chunk {
    fn remaining(&self) -> usize {
        match self {
            Chunk::One(b) => b.remaining(),
            Chunk::Two(c) => c.remaining(),
        }
    }
    fn chunk(&self) -> &[u8] {
        match self {
            Chunk::One(b) => b.chunk(),
            Chunk::Two(c) => c.chunk(),
        }
    }
    fn advance(&mut self, n: usize) {
        match self {
            Chunk::One(b) => b.advance(n),
            Chunk::Two(c) => c.advance(n),
        }
    }
    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        match self {
            Chunk::One(b) => b.chunks_vectored(dst),
            Chunk::Two(c) => c.chunks_vectored(dst),
        }
    }
}

impl HttpBody for Frames {
    type Data = Chunk;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Chunk>, std::io::Error>>> {
        let this = self.get_mut();
        match this.frames.pop_front() {
            Some(f) => Poll::Ready(Some(Ok(f))),
            None if this.fail => {
                this.fail = false;
                Poll::Ready(Some(Err(std::io::Error::other("reset"))))
            }
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.reports_end && self.frames.is_empty() && !self.fail
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// How the caller treats the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ending {
    /// Reads it to the end.
    Read,
    /// Drops it after the last data frame, before polling for the end.
    Drop,
}

/// Runs `chunks` through an [`Observed`] body; returns what the hook saw
/// and the bytes the caller read.
#[allow(clippy::too_many_arguments)]
fn observe(
    classifier: &Classifier,
    status: StatusCode,
    headers: &HeaderMap,
    chunks: &[&[u8]],
    vectored: bool,
    trailers: bool,
    body: (bool, bool, Ending),
    inspect: Inspect,
) -> (Vec<BodyEnd>, Vec<u8>) {
    let (reports_end, fail, ending) = body;
    let mut frames: VecDeque<Frame<Chunk>> = chunks
        .iter()
        .map(|c| {
            let b = Bytes::copy_from_slice(c);
            Frame::data(if vectored && c.len() > 1 {
                let (a, z) = (b.slice(..c.len() / 2), b.slice(c.len() / 2..));
                Chunk::Two(a.chain(z))
            } else {
                Chunk::One(b)
            })
        })
        .collect();
    if trailers {
        frames.push_back(Frame::trailers(HeaderMap::new()));
    }
    let mut res = http::Response::new(Frames {
        frames,
        reports_end,
        fail,
    });
    *res.status_mut() = status;
    *res.headers_mut() = headers.clone();
    let ends: Arc<Mutex<Vec<BodyEnd>>> = Arc::default();
    let hook = {
        let ends = ends.clone();
        move |end: BodyEnd| ends.lock().unwrap().push(end)
    };
    let mut body = Box::pin(Observed::wrap(res, classifier, inspect, hook).into_body());
    let mut cx = Context::from_waker(Waker::noop());
    let mut read = Vec::new();
    let mut data_left = chunks.len();
    loop {
        if ending == Ending::Drop && data_left == 0 {
            break;
        }
        match body.as_mut().poll_frame(&mut cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Ok(mut data) = frame.into_data() {
                    data_left -= 1;
                    while data.has_remaining() {
                        let n = data.chunk().len();
                        read.extend_from_slice(data.chunk());
                        data.advance(n);
                    }
                }
            }
            Poll::Ready(Some(Err(_)) | None) => break,
            Poll::Pending => unreachable!("the frames are all there"),
        }
    }
    drop(body);
    let ends = ends.lock().unwrap().clone();
    (ends, read)
}

/// Whether two outcomes are the same verdict: equal, but for waits (read
/// from an HTTP-date at two instants) that may differ by a second.
fn same_verdict(a: Outcome, b: Outcome) -> bool {
    let bare = |o: Outcome| match o {
        Outcome::Throttled { cause, .. } => Outcome::throttled(cause),
        Outcome::Transient { .. } => Outcome::TRANSIENT,
        o => o,
    };
    bare(a) == bare(b)
        && match (a.retry_after(), b.retry_after()) {
            (None, None) => true,
            (Some(x), Some(y)) => x.abs_diff(y) <= Duration::from_secs(1),
            _ => false,
        }
}

/// The classifier: `classify_head`, `classify` on the whole body, and the
/// same response through an [`Observed`] body cut into frames.
///
/// Input: first line `STATUS` (taken as 100 + n % 900) then options, and
/// split offsets: `cap=MS` (most wait), `limit=N` (body limit), `quota=0|1|2`
/// ([`AllocationQuotaPolicy`]), `inspect=0..7` (outcome, usage, timing
/// bits), `vectored=1` (frames in two pieces), `trailers=1`, `end=0|1`
/// (whether the body reports its end), `fail=1` (the body fails after its
/// frames), `drop=1` (the caller drops it after its data); then headers,
/// a blank line, and the body.
///
/// Properties: no panic; every wait is at most the cap; `x-should-retry`
/// is obeyed (by `Observed` when the body was read to its end); the hook runs exactly once, the caller reads every byte
/// unchanged, and the hook's verdict (outcome, usage, how it ended) is the
/// same whether the body comes in one frame, cut at the given offsets, or
/// in two-piece frames; and a body read to its end (within the body limit,
/// as far as `classify` reads) gets the same verdict from `Observed` as
/// from `classify` on the whole body (issue 14; a wait from an HTTP-date
/// may move by the time between the two reads).
pub fn classify(data: &[u8]) {
    let (head, rest) = first_line(data);
    let opts = Options::parse(head);
    let (headers, body) = headers(rest);
    let mut numbers = opts.numbers.iter().copied();
    let status = numbers.next().map_or(200, |n| 100 + (n % 900) as u16);
    let status = StatusCode::from_u16(status).expect("100..=999 is a valid status");
    let offsets: Vec<u64> = numbers.collect();
    let cap = Duration::from_millis(opts.get("cap").unwrap_or(60_000));
    let mut classifier = Classifier::new().max_retry_after(cap).allocation_quota(
        match opts.get("quota").unwrap_or(0) % 3 {
            0 => AllocationQuotaPolicy::ByMessage,
            1 => AllocationQuotaPolicy::Throttled,
            _ => AllocationQuotaPolicy::Permanent,
        },
    );
    if let Some(limit) = opts.get("limit") {
        classifier = classifier.body_limit(limit as usize);
    }
    let bits = opts.get("inspect").unwrap_or(15);
    let inspect = Inspect {
        outcome: bits & 1 != 0,
        usage: bits & 2 != 0,
        timing: bits & 4 != 0,
        answer: bits & 8 != 0,
    };
    let should_retry = headers
        .get("x-should-retry")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_ascii_lowercase());

    let check = |o: Outcome, what: &str| {
        if let Some(wait) = o.retry_after() {
            assert!(wait <= cap, "{what}: wait {wait:?} over the cap {cap:?}");
        }
        match should_retry.as_deref() {
            Some("false") => assert!(
                !o.is_retryable(),
                "{what}: {o:?} despite x-should-retry: false"
            ),
            Some("true") => assert!(
                !o.is_permanent(),
                "{what}: {o:?} despite x-should-retry: true"
            ),
            _ => {}
        }
    };
    let head_outcome = classifier.classify_head(status, &headers);
    if !head_outcome.is_success() {
        check(head_outcome, "classify_head");
    }
    let _ = classifier.needs_body(status, &headers);
    let whole = classifier.classify(status, &headers, body);
    check(whole, "classify");
    assert_eq!(
        classifier.classify(status, &headers, body).is_success(),
        whole.is_success(),
        "classify is not deterministic"
    );

    let ending = if opts.flag("drop") {
        Ending::Drop
    } else {
        Ending::Read
    };
    let shape = (
        opts.flag("end") || !opts.pairs.iter().any(|p| p.0 == b"end"),
        opts.flag("fail"),
        ending,
    );
    let trailers = opts.flag("trailers");
    let run = |chunks: &[&[u8]], vectored: bool| {
        let (ends, read) = observe(
            &classifier,
            status,
            &headers,
            chunks,
            vectored,
            trailers,
            shape,
            inspect,
        );
        assert_eq!(ends.len(), 1, "the hook must run exactly once: {ends:?}");
        assert_eq!(read, body, "the caller must read the body unchanged");
        let end = ends[0];
        if end.kind == EndKind::Complete {
            check(end.outcome, "Observed");
        } else if let Some(wait) = end.outcome.retry_after() {
            // A body that failed or was dropped ended for a reason the
            // headers did not speak about; only the cap still holds.
            assert!(wait <= cap, "Observed: wait {wait:?} over the cap {cap:?}");
        }
        if !inspect.usage {
            assert_eq!(end.usage, None, "usage found without being asked for");
        }
        (end.outcome, end.usage, end.kind)
    };
    let one: &[&[u8]] = if body.is_empty() { &[] } else { &[body] };
    let reference = run(one, false);
    let reads_body = inspect.outcome || inspect.usage || inspect.answer;
    if reference.2 == EndKind::Complete && reads_body && body.len() <= classifier.get_body_limit() {
        assert!(
            same_verdict(reference.0, whole),
            "Observed {:?} but classify {whole:?}",
            reference.0
        );
    }
    let pieces = split(body, &offsets);
    assert_eq!(reference, run(&pieces, false), "split at {offsets:?}");
    assert_eq!(
        reference,
        run(&pieces, true),
        "two-piece frames at {offsets:?}"
    );
}

// ---------------------------------------------------------------------------
// retry_after: `retry-after-ms`, `retry-after` (seconds or HTTP-date).

/// `retry-after-ms` and `retry-after` parsing, with the cap.
///
/// Input: first line `cap=MS`, then header lines (`retry-after: ...`,
/// `retry-after-ms: ...`).
///
/// Properties: no panic; the wait is at most the cap; a plain integer
/// `retry-after-ms` (the first of its kind) is honoured exactly (capped);
/// a plain integer `retry-after` without a valid `retry-after-ms` too; the
/// wait is what a throttled or failed response carries.
pub fn retry_after(data: &[u8]) {
    let (head, rest) = first_line(data);
    let opts = Options::parse(head);
    let (headers, _) = headers(rest);
    let cap = Duration::from_millis(opts.get("cap").unwrap_or(60_000));
    let c = Classifier::new().max_retry_after(cap);
    let wait = c.retry_after(&headers);
    if let Some(w) = wait {
        assert!(w <= cap, "wait {w:?} over the cap {cap:?}");
    }
    let int = |name: &str| {
        let v = headers.get(name)?.to_str().ok()?.trim();
        (!v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
            .then(|| v.parse::<u64>().ok())
            .flatten()
    };
    let ms_valid = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .is_some_and(|x| x.is_finite() && x >= 0.0);
    if let Some(ms) = int("retry-after-ms") {
        assert_eq!(
            wait,
            Some(Duration::from_millis(ms).min(cap)),
            "retry-after-ms: {ms}"
        );
    } else if !ms_valid && let Some(s) = int("retry-after") {
        assert_eq!(
            wait,
            Some(Duration::from_secs(s).min(cap)),
            "retry-after: {s}"
        );
    }
    // A throttled or failed head carries the same wait (only a date can
    // move between the two reads, and only by the time that passed).
    for status in [
        StatusCode::TOO_MANY_REQUESTS,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        let o = c.classify_head(status, &headers);
        if let Some(w) = o.retry_after() {
            assert!(w <= cap);
        }
        if headers.get("x-should-retry").is_none() {
            assert_eq!(o.retry_after().is_some(), wait.is_some(), "{status}");
        }
    }
}

// ---------------------------------------------------------------------------
// request_info: both dialects, native and compatible paths, chat and
// embeddings.

/// `RequestInfo::parse` and `RequestInfo::of`.
///
/// Input: first line the path, then header lines, a blank line, and the
/// body.
///
/// Properties: no panic; the endpoint is the path's; a streaming header
/// means a stream; a body read without error is one JSON object, a body
/// that is not JSON is refused (`body_error`), and a refused body is
/// charged at least the estimate of its whole text; tokens come with
/// inputs; the estimate is at least 1 and
/// the output budget of an embedding is 0; parsing is deterministic; and
/// `RequestInfo::of` on a request with that URI, headers and body (as the
/// crate's `Body` and as `Full<Bytes>`) says the same as `parse`, and
/// caches it.
pub fn request_info(data: &[u8]) {
    let (path, rest) = first_line(data);
    let path = String::from_utf8_lossy(path);
    let (headers, body) = headers(rest);
    let info = RequestInfo::parse(&path, &headers, Some(body));
    assert_eq!(info.endpoint, Endpoint::from_path(&path));
    assert_eq!(info, RequestInfo::parse(&path, &headers, Some(body)));
    // What decides admission reads the body as the upstream will, or
    // refuses it: a body read without error is one JSON object (or
    // blank), a body that is not JSON is refused, and a refused body is
    // charged at least as its whole text.
    let blank = body.iter().all(|b| b" \t\n\r".contains(b));
    let json = serde_json::from_slice::<serde_json::Value>(body);
    match &info.body_error {
        None => {
            assert!(
                blank || json.as_ref().is_ok_and(serde_json::Value::is_object),
                "read without error, but not one JSON object: {info:?}"
            );
            if info.input_tokens > 0 {
                assert!(info.inputs > 0, "tokens without inputs: {info:?}");
            }
        }
        Some(_) => {
            let whole = estimate_text_tokens(&String::from_utf8_lossy(body));
            assert!(
                info.input_tokens >= whole,
                "refused, yet charged less than its text: {info:?}"
            );
        }
    }
    if json.is_err() && !blank {
        assert!(
            info.body_error.is_some(),
            "not JSON, yet read without error: {info:?}"
        );
    }
    assert!(info.estimated_tokens(0) >= 1);
    assert!(info.estimated_tokens(u32::MAX) >= info.input_tokens);
    if info.endpoint.is_embedding() {
        assert_eq!(info.estimated_tokens(1000), info.input_tokens.max(1));
    }
    let sse_header = headers
        .get_all("x-dashscope-sse")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("enable"))
        });
    if sse_header {
        assert!(info.stream);
    }
    let unbuffered = RequestInfo::parse(&path, &headers, None);
    assert_eq!(unbuffered.model, None);
    assert_eq!((unbuffered.input_tokens, unbuffered.inputs), (0, 0));
    assert_eq!(unbuffered.endpoint, info.endpoint);

    let Ok(uri) = http::Uri::try_from(path.as_ref()) else {
        return;
    };
    let expected = RequestInfo::parse(uri.path(), &headers, Some(body));
    let bytes = Bytes::copy_from_slice(body);
    let mut a = http::Request::post(uri.clone())
        .body(tower_qwen::body::Body::from(bytes.clone()))
        .expect("a valid URI");
    *a.headers_mut() = headers.clone();
    let got = RequestInfo::of(&mut a);
    assert_eq!(*got, expected);
    assert!(Arc::ptr_eq(&got, &RequestInfo::of(&mut a)), "not cached");
    let mut b = http::Request::post(uri)
        .body(http_body_util::Full::new(bytes))
        .expect("a valid URI");
    *b.headers_mut() = headers;
    assert_eq!(*RequestInfo::of(&mut b), expected);
}

// ---------------------------------------------------------------------------
// The gateway: its configuration, and its router in front of a stub
// upstream.

#[cfg(feature = "gateway")]
mod gateway {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::sync::{Arc, Mutex, OnceLock};
    use std::time::Duration;

    use bytes::Bytes;
    use http::{HeaderMap, Method, Request, StatusCode, Uri, header};
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    use tower_qwen::gateway::{Gateway, GatewayConfig};
    use tower_qwen::request::{Endpoint, RequestInfo};

    use super::{Options, first_line, headers};

    /// A current-thread runtime.
    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime")
    }

    /// The quoted strings assigned to a field that holds key material
    /// (`api_key`, `api_keys`, `key`, `url`, whatever the section) on the
    /// same line, read from the text whether or not it is valid TOML.
    fn secrets_in(text: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in text.lines() {
            for field in ["api_key", "api_keys", "key", "url"] {
                let mut from = 0;
                while let Some(i) = line[from..].find(field) {
                    let at = from + i;
                    from = at + field.len();
                    // A whole field name: `url`, not `base_url`.
                    let before = line[..at].bytes().next_back();
                    if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
                        continue;
                    }
                    let rest = line[from..].trim_start();
                    let Some(rest) = rest.strip_prefix('=') else {
                        continue;
                    };
                    let mut quoted = rest;
                    while let Some(q) = quoted.find(['"', '\'']) {
                        let close = quoted.as_bytes()[q] as char;
                        let body = &quoted[q + 1..];
                        let Some(end) = body.find(close) else { break };
                        out.push(body[..end].to_owned());
                        quoted = &body[end + 1..];
                    }
                }
            }
        }
        out
    }

    /// Whether `s` looks like a key and appears once in the input, so that
    /// finding it in an output means the output shows key material (and not
    /// a field name, a number or a word of the message).
    fn key_like(s: &str, input: &str) -> bool {
        s.len() >= 10
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && s.bytes().any(|b| b.is_ascii_digit())
            && s.bytes().any(|b| b.is_ascii_alphabetic())
            && input.matches(s).count() == 1
    }

    /// The gateway's configuration through its public entry point.
    ///
    /// Input: environment variables, one `NAME=value` per line, up to a
    /// blank line; then the TOML text (an input starting with a blank line
    /// has no environment).
    ///
    /// Properties: no panic; loading is deterministic (the same verdict,
    /// the same problems); neither a `ConfigError` nor a loaded
    /// configuration's `Debug` shows key material (a key-like value of
    /// `api_key`, `api_keys`, `key`, `url`, or of a variable named by a
    /// `*_env` field or overlaid on `[redis].url`); and a configuration
    /// that loads is valid: the gateway builds from it (`Gateway::new`,
    /// whose `Debug` and metrics show no key material either), and its
    /// router answers `/healthz` 200 and `/metrics` 200.
    pub fn gateway_config(data: &[u8]) {
        let input = String::from_utf8_lossy(data);
        let (env_part, text) = match input.strip_prefix('\n') {
            Some(text) => ("", text),
            None => match input.find("\n\n") {
                Some(i) => (&input[..i], &input[i + 2..]),
                None => (&input[..], ""),
            },
        };
        let env: HashMap<String, String> = env_part
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
            .collect();
        let load = || GatewayConfig::from_toml_with_env(text, |n| env.get(n).cloned());
        let first = load();
        let again = load();
        match (&first, &again) {
            (Ok(_), Ok(_)) => {}
            (Err(a), Err(b)) => assert_eq!(a, b, "loading twice gives other problems"),
            _ => panic!("loading twice gives another verdict"),
        }

        // Key material: the key fields' values, and the values of the
        // variables `*_env` fields name or the overlay reads as a URL.
        let mut secrets = secrets_in(text);
        for (name, value) in &env {
            // The upstream's base URL is no key material (as `base_url` in
            // the file), unless it carries credentials (never echoed).
            let url =
                name.ends_with("_URL") && (!name.ends_with("BASE_URL") || value.contains('@'));
            if text.contains(name.as_str()) || url || name.contains("KEY") {
                secrets.push(value.clone());
            }
        }
        secrets.retain(|s| key_like(s, &input));
        let shows = |what: &str, out: &str| {
            for s in &secrets {
                assert!(
                    !out.contains(s.as_str()),
                    "{what} shows the key {s:?}: {out}"
                );
            }
        };

        let cfg = match first {
            Ok(cfg) => cfg,
            Err(e) => {
                shows("the error", &e.to_string());
                shows("the error's Debug", &format!("{e:?}"));
                return;
            }
        };
        shows("the configuration's Debug", &format!("{cfg:?}"));
        // With `[redis]` the gateway spawns its connection task: a runtime
        // of its own, dropped (with the task) afterwards.
        let rt = runtime();
        let gateway = {
            let _in = rt.enter();
            Gateway::new(cfg)
        };
        shows("the gateway's Debug", &format!("{gateway:?}"));
        shows("the metrics", &gateway.render_metrics());
        let router = gateway.router();
        rt.block_on(async {
            for path in ["/healthz", "/metrics"] {
                let req = Request::get(path)
                    .body(axum::body::Body::empty())
                    .expect("a valid request");
                let res = router.clone().oneshot(req).await.expect("infallible");
                assert_eq!(res.status(), StatusCode::OK, "GET {path}");
                let body = res.into_body().collect().await.expect("a body").to_bytes();
                shows(path, &String::from_utf8_lossy(&body));
            }
        });
        // Without waiting for what the Redis connection task started (a
        // name lookup may take long).
        rt.shutdown_background();
    }

    // -----------------------------------------------------------------------
    // The router.

    /// The client key the router target's gateway knows, and the upstream
    /// key it sends instead.
    const CLIENT_KEY: &str = "gw-fuzz-client-key-0001";
    const UPSTREAM_KEY: &str = "sk-fuzz-upstream-key-0001";

    /// What the stub upstream received.
    struct Seen {
        method: Method,
        uri: String,
        headers: HeaderMap,
        body: Bytes,
    }

    /// The stub's answers, by mode: status, content type, body.
    const ANSWERS: [(u16, &str, &str); 6] = [
        (
            200,
            "application/json",
            r#"{"output":{"text":"ok","finish_reason":"stop"},"usage":{"input_tokens":3,"output_tokens":1,"total_tokens":4},"request_id":"stub"}"#,
        ),
        (
            200,
            "text/event-stream",
            "id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"text\":\"ok\",\"finish_reason\":\"stop\"},\"usage\":{\"input_tokens\":3,\"output_tokens\":1,\"total_tokens\":4},\"request_id\":\"stub\"}\n\n",
        ),
        (
            500,
            "application/json",
            r#"{"code":"InternalError","message":"stub","request_id":"stub"}"#,
        ),
        (
            429,
            "application/json",
            r#"{"code":"Throttling.RateQuota","message":"stub","request_id":"stub"}"#,
        ),
        (
            200,
            "text/event-stream",
            "id:1\nevent:error\n:HTTP_STATUS/500\ndata:{\"code\":\"InternalError\",\"message\":\"stub\",\"request_id\":\"stub\"}\n\n",
        ),
        (
            200,
            "text/event-stream",
            "data: {\"id\":\"stub\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"ok\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n",
        ),
    ];

    /// The gateway in front of the stub, built once per process.
    struct Rig {
        rt: tokio::runtime::Runtime,
        router: axum::Router,
        host: String,
        seen: Arc<Mutex<Vec<Seen>>>,
        mode: Arc<AtomicU8>,
    }

    fn rig() -> &'static Rig {
        static RIG: OnceLock<Rig> = OnceLock::new();
        RIG.get_or_init(|| {
            let rt = runtime();
            let seen = Arc::new(Mutex::new(Vec::new()));
            let mode = Arc::new(AtomicU8::new(0));
            let listener = rt
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("a loopback port");
            let addr = listener.local_addr().expect("its address");
            let stub = {
                let (seen, mode) = (seen.clone(), mode.clone());
                axum::Router::new().fallback(move |req: axum::extract::Request| {
                    let (seen, mode) = (seen.clone(), mode.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        seen.lock().unwrap().push(Seen {
                            method: parts.method,
                            uri: parts.uri.to_string(),
                            headers: parts.headers,
                            body,
                        });
                        let (status, ctype, body) =
                            ANSWERS[usize::from(mode.load(Ordering::Relaxed))];
                        http::Response::builder()
                            .status(status)
                            .header(header::CONTENT_TYPE, ctype)
                            .body(axum::body::Body::from(body))
                            .expect("a valid answer")
                    }
                })
            };
            rt.spawn(async move {
                let _ = axum::serve(listener, stub).await;
            });
            let text = format!(
                r#"
                [server]
                max_body_bytes = 2048
                max_file_bytes = 1048576
                max_header_bytes = 1024
                [upstream]
                base_url = "http://{addr}"
                header_timeout = "5s"
                total_timeout = "5s"
                [limits]
                capacity = 4000000000
                refill_per_second = 1000000000
                [degrade]
                enabled = false
                [[accounts]]
                name = "main"
                api_key = "{UPSTREAM_KEY}"
                quotas = "unlimited"
                [[keys]]
                name = "fuzz"
                key = "{CLIENT_KEY}"
                "#
            );
            let cfg = GatewayConfig::from_toml_with_env(&text, |_| None).expect("a valid config");
            let router = Gateway::new(cfg).router();
            Rig {
                rt,
                router,
                host: addr.to_string(),
                seen,
                mode,
            }
        })
    }

    /// The methods by which the gateway may forward `path`, or `None` for
    /// a path it must never forward: DashScope's shapes, each segment
    /// ASCII letters, digits, `-` and `_` (written here independently of
    /// the gateway's own allow-list). HEAD goes with every GET (axum's).
    fn forwardable(path: &str) -> Option<&'static [Method]> {
        const POST: &[Method] = &[Method::POST];
        const GET: &[Method] = &[Method::GET, Method::HEAD];
        const POST_GET: &[Method] = &[Method::POST, Method::GET, Method::HEAD];
        const GET_DELETE: &[Method] = &[Method::GET, Method::HEAD, Method::DELETE];
        let seg = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if let Some(rest) = path.strip_prefix("/api/v1/services/") {
            let parts: Vec<&str> = rest.split('/').collect();
            let ok = (2..=4).contains(&parts.len()) && parts.iter().all(|s| seg(s));
            return ok.then_some(POST);
        }
        match path {
            "/compatible-mode/v1/chat/completions" | "/compatible-mode/v1/embeddings" => {
                return Some(POST);
            }
            "/api/v1/tasks" => return Some(GET),
            "/compatible-mode/v1/files" | "/compatible-mode/v1/batches" => return Some(POST_GET),
            _ => {}
        }
        // An id, then the one action each collection has on it.
        for (prefix, action, on_id, on_action) in [
            ("/api/v1/tasks/", "/cancel", GET, POST),
            ("/compatible-mode/v1/files/", "/content", GET_DELETE, GET),
            ("/compatible-mode/v1/batches/", "/cancel", GET, POST),
        ] {
            if let Some(rest) = path.strip_prefix(prefix) {
                return match rest.strip_suffix(action) {
                    Some(id) if seg(id) => Some(on_action),
                    _ => seg(rest).then_some(on_id),
                };
            }
        }
        None
    }

    /// Whether `body` is a DashScope error in the dialect of `path`:
    /// compatible `{"error":{"message","type","code"}}` under
    /// `/compatible-mode/`, native `{"code","message","request_id"}`
    /// elsewhere.
    fn in_shape(path: &str, body: &[u8]) -> bool {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
            return false;
        };
        let text = |v: &serde_json::Value| v.as_str().is_some_and(|s| !s.is_empty());
        if path.starts_with("/compatible-mode/") {
            let e = &v["error"];
            text(&e["message"]) && text(&e["type"]) && text(&e["code"])
        } else {
            text(&v["code"]) && text(&v["message"]) && text(&v["request_id"])
        }
    }

    /// The gateway's router, in process, in front of a stub upstream on
    /// loopback.
    ///
    /// Input: a request line `METHOD TARGET`; an options line: `up=0..5`
    /// (the stub's answer: JSON, native stream, 500, 429, an error frame,
    /// compatible stream) and `auth=0` (no key of ours; by default the
    /// request carries `Authorization: Bearer <the client key>` before its
    /// own headers); header lines, a blank line, the body.
    ///
    /// Properties: no panic and an answer within 5 s, its body read to its
    /// end. A request the stub received was sent with our client key, by
    /// the method its route takes, to a path of DashScope's shapes, the
    /// path and query byte for byte as the client sent them (never another
    /// host: the stub's `Host`), with the body unchanged and, but for the
    /// Files and Batch APIs (streamed through, outside the real-time
    /// quota), readable as the upstream reads it (no body error, a model
    /// for generation and embeddings), the upstream key instead of the
    /// client's and no
    /// hop-by-hop header; and its answer reached the client unchanged
    /// (status, and body unless HEAD). Any other answer is the gateway's
    /// own: `/healthz` and `/metrics` 200, else an error status with a
    /// DashScope error body in the path's dialect.
    pub fn gateway_router(data: &[u8]) {
        let (line, rest) = first_line(data);
        let (method, target) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], &line[i + 1..]),
            None => (line, &b"/"[..]),
        };
        let (Ok(method), Ok(uri)) = (Method::from_bytes(method), Uri::try_from(target)) else {
            return; // hyper refuses such a head before the router sees it
        };
        let (opts, rest) = first_line(rest);
        let opts = Options::parse(opts);
        let mode = (opts.get("up").unwrap_or(0) % ANSWERS.len() as u64) as u8;
        let authed = opts.get("auth") != Some(0);
        let (hdrs, body) = headers(rest);
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri.clone())
            .body(axum::body::Body::from(body.to_vec()))
            .expect("a valid request");
        if authed {
            req.headers_mut().insert(
                header::AUTHORIZATION,
                http::HeaderValue::from_str(&format!("Bearer {CLIENT_KEY}")).expect("ascii"),
            );
        }
        for (n, v) in &hdrs {
            req.headers_mut().append(n, v.clone());
        }
        let sent_headers = req.headers().clone();

        let rig = rig();
        rig.mode.store(mode, Ordering::Relaxed);
        rig.seen.lock().unwrap().clear();
        let (parts, answer) = rig.rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(5), async {
                let res = rig.router.clone().oneshot(req).await.expect("infallible");
                let (parts, body) = res.into_parts();
                let answer = body.collect().await.map(|c| c.to_bytes());
                (parts, answer)
            })
            .await
            .expect("an answer within 5 s")
        });
        let answer = answer.expect("the answer's body reads to its end");
        let seen: Vec<Seen> = rig.seen.lock().unwrap().drain(..).collect();
        assert!(
            seen.len() <= 1,
            "one request forwarded {} times",
            seen.len()
        );
        let path = uri.path();

        if let Some(up) = seen.first() {
            let bearer = format!("Bearer {CLIENT_KEY}");
            assert!(
                sent_headers
                    .get_all(header::AUTHORIZATION)
                    .iter()
                    .any(|v| v.as_bytes() == bearer.as_bytes()),
                "forwarded without our client key"
            );
            let pq = uri.path_and_query().map_or("/", |p| p.as_str());
            assert_eq!(up.uri, pq, "the path or query changed on the way");
            let Some(methods) = forwardable(path) else {
                panic!("forwarded a path off DashScope's shapes: {path:?}");
            };
            assert!(
                methods.contains(&up.method),
                "forwarded {} {path}",
                up.method
            );
            assert_eq!(up.method, method, "the method changed");
            assert_eq!(up.body.as_ref(), body, "the body changed on the way");
            // Files and batches are outside the real-time quota: their
            // bodies are streamed through, not read (a `max_file_bytes` cap
            // aside). Everything else is read as the upstream reads it.
            let info = RequestInfo::parse(path, &up.headers, Some(&up.body));
            let streamed = matches!(info.endpoint, Endpoint::Files | Endpoint::Batches);
            assert!(
                streamed || info.body_error.is_none(),
                "forwarded a body the upstream reads otherwise: {info:?}"
            );
            if info.endpoint.is_generation() || info.endpoint.is_embedding() {
                assert!(
                    info.model.as_deref().is_some_and(|m| !m.trim().is_empty()),
                    "forwarded a generation without a model: {info:?}"
                );
            }
            let auth: Vec<_> = up.headers.get_all(header::AUTHORIZATION).iter().collect();
            assert_eq!(
                auth,
                [format!("Bearer {UPSTREAM_KEY}").as_str()],
                "the upstream got another authorization"
            );
            assert_eq!(
                up.headers.get(header::HOST).map(|h| h.as_bytes()),
                Some(rig.host.as_bytes()),
                "sent to another host"
            );
            for hop in [
                "te",
                "trailer",
                "upgrade",
                "keep-alive",
                "proxy-authorization",
                "proxy-connection",
            ] {
                assert!(
                    !up.headers.contains_key(hop),
                    "forwarded the hop-by-hop {hop}"
                );
            }
            let (status, _, stub_body) = ANSWERS[usize::from(mode)];
            assert_eq!(
                parts.status.as_u16(),
                status,
                "the upstream's status changed"
            );
            if method != Method::HEAD {
                assert_eq!(
                    answer.as_ref(),
                    stub_body.as_bytes(),
                    "the upstream's answer changed"
                );
            }
            return;
        }

        // The gateway's own answer.
        if matches!(path, "/healthz" | "/metrics")
            && (method == Method::GET || method == Method::HEAD)
        {
            assert_eq!(parts.status, StatusCode::OK, "{method} {path}");
            return;
        }
        assert!(
            parts.status.is_client_error() || parts.status.is_server_error(),
            "{method} {path}: {} without reaching the upstream",
            parts.status
        );
        if method != Method::HEAD {
            assert!(
                in_shape(path, &answer),
                "{method} {path}: {} not in DashScope's shape: {}",
                parts.status,
                String::from_utf8_lossy(&answer)
            );
        }
    }
}
