//! An incremental reader for the two Server-Sent-Events dialects DashScope
//! speaks.
//!
//! Native streams carry the real status as a comment line
//! (`:HTTP_STATUS/429`) and name error frames `event:error`; compatible
//! streams are OpenAI-shaped (`data: {...}` then `data: [DONE]`), and may
//! deliver an error as `data: {"error":{...}}` after partial content.
//! Older gateways omit the blank line between complete JSON frames.
//!
//! [`SseScanner`] is what the layers use on live bodies: it is fed chunks as
//! they arrive (frames may be split anywhere), keeps only the unfinished
//! line, and hands each `data:` line to a callback together with the
//! [`EventMeta`] of its event. [`parse_events`] collects whole events from a
//! buffer, for tests and tools.
//!
//! # Example
//!
//! ```
//! use tower_qwen::sse::{SseScanner, parse_events};
//!
//! let wire = b"id:1\nevent:error\n:HTTP_STATUS/429\ndata:{\"code\":\"Throttling.RateQuota\"}\n\n";
//! let mut scanner = SseScanner::new();
//! let mut seen = Vec::new();
//! // Feed it in two arbitrary pieces.
//! scanner.feed(&wire[..17], |data, meta| seen.push((data.to_vec(), meta.http_status)));
//! scanner.feed(&wire[17..], |data, meta| seen.push((data.to_vec(), meta.http_status)));
//! assert_eq!(seen, vec![(b"{\"code\":\"Throttling.RateQuota\"}".to_vec(), Some(429))]);
//!
//! let events = parse_events(wire);
//! assert_eq!(events[0].event.as_deref(), Some("error"));
//! assert!(events[0].is_error());
//! ```

/// What is known about the event a `data:` line belongs to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventMeta {
    /// The event is named `error` (`event:error`).
    pub error_event: bool,
    /// The status from a native `:HTTP_STATUS/NNN` comment, if one was seen.
    pub http_status: Option<u16>,
    /// `data:` lines already seen in this event before this one.
    pub data_lines: u32,
}

impl EventMeta {
    /// Whether the event's metadata marks it as an error (named `error`, or a
    /// `:HTTP_STATUS/` of 400 or more).
    pub fn is_error(&self) -> bool {
        self.error_event || self.http_status.is_some_and(|s| s >= 400)
    }
}

/// The default longest line (in bytes, before its `\n`): longer lines are
/// skipped (their data is not inspected) however the chunks cut them, so a
/// hostile stream cannot grow memory.
pub const MAX_LINE: usize = 1 << 20;

/// An incremental SSE line reader. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct SseScanner {
    carry: Vec<u8>,
    overlong: bool,
    max_line: usize,
    meta: EventMeta,
    last_data_closed: bool,
    /// The current event has a field or a status (what makes
    /// [`parse_events`] keep an event).
    in_event: bool,
}

/// What a scanner reports to the crate's readers: each `data:` line, and
/// the end of each event (a blank line, a field that starts the next event,
/// or the end of the stream) with its final metadata, which may have come
/// after its data.
pub(crate) trait Sink {
    /// A complete `data:` line, with the metadata seen before it.
    fn data(&mut self, line: &[u8], meta: &EventMeta);
    /// The event is over; `meta` is all of its metadata.
    fn end(&mut self, meta: &EventMeta);
}

/// The public callback: data lines only.
struct DataOnly<F>(F);

impl<F: FnMut(&[u8], &EventMeta)> Sink for DataOnly<F> {
    fn data(&mut self, line: &[u8], meta: &EventMeta) {
        (self.0)(line, meta)
    }

    fn end(&mut self, _: &EventMeta) {}
}

impl Default for SseScanner {
    fn default() -> Self {
        Self::new()
    }
}

impl SseScanner {
    /// A scanner at the start of a stream.
    pub const fn new() -> Self {
        Self {
            carry: Vec::new(),
            overlong: false,
            max_line: MAX_LINE,
            meta: EventMeta {
                error_event: false,
                http_status: None,
                data_lines: 0,
            },
            last_data_closed: false,
            in_event: false,
        }
    }

    /// The longest line kept while waiting for its end; longer lines are
    /// skipped. Default is [`MAX_LINE`].
    pub const fn max_line(mut self, max: usize) -> Self {
        self.max_line = max;
        self
    }

    /// Feeds the next chunk; `on_data` is called for every complete `data:`
    /// line (without the `data:` prefix and one optional space).
    pub fn feed(&mut self, chunk: &[u8], on_data: impl FnMut(&[u8], &EventMeta)) {
        self.feed_to(chunk, &mut DataOnly(on_data));
    }

    /// [`SseScanner::feed`], reporting the ends of events too.
    pub(crate) fn feed_to(&mut self, chunk: &[u8], on_data: &mut impl Sink) {
        // The newlines are found by one forward pass: no input (and no
        // wrong offset) can make this loop spin.
        let mut start = 0;
        for pos in memchr::memchr_iter(b'\n', chunk) {
            let line = &chunk[start..pos];
            start = pos + 1;
            if self.carry.is_empty() && !self.overlong {
                if line.len() <= self.max_line {
                    self.line(line, on_data);
                }
            } else {
                // Too long is too long wherever the chunks cut the line.
                let overlong = std::mem::take(&mut self.overlong)
                    || self.carry.len() + line.len() > self.max_line;
                if !overlong {
                    self.carry.extend_from_slice(line);
                    let carry = std::mem::take(&mut self.carry);
                    self.line(&carry, on_data);
                    self.carry = carry;
                }
                self.carry.clear();
            }
        }
        let chunk = &chunk[start..];
        if !chunk.is_empty() && !self.overlong {
            if self.carry.len() + chunk.len() > self.max_line {
                self.carry.clear();
                self.overlong = true;
            } else {
                self.carry.extend_from_slice(chunk);
            }
        }
    }

    /// Ends the stream: a last line without a newline is processed, and the
    /// scanner is back at the start of a stream.
    pub fn finish(&mut self, on_data: impl FnMut(&[u8], &EventMeta)) {
        self.finish_to(&mut DataOnly(on_data));
    }

    /// [`SseScanner::finish`], reporting the end of the last event too.
    pub(crate) fn finish_to(&mut self, on_data: &mut impl Sink) {
        // An overlong line keeps nothing in `carry`.
        let carry = std::mem::take(&mut self.carry);
        if !carry.is_empty() {
            self.line(&carry, on_data);
        }
        if self.in_event {
            on_data.end(&self.meta);
        }
        *self = Self::new().max_line(self.max_line);
    }

    /// The current event is over: report it, start afresh.
    fn end_event(&mut self, on_data: &mut impl Sink) {
        if self.in_event {
            on_data.end(&self.meta);
        }
        self.meta = EventMeta::default();
        self.last_data_closed = false;
        self.in_event = false;
    }

    fn line(&mut self, line: &[u8], on_data: &mut impl Sink) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            self.end_event(on_data);
            return;
        }
        if let Some(comment) = line.strip_prefix(b":") {
            if let Some(status) = status_comment(comment) {
                self.meta.http_status = status;
                self.in_event = true;
            }
            return;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"data" => {
                if self.last_data_closed {
                    // A new complete frame without a blank line in between
                    // (older gateways): keep the event's metadata, count anew.
                    self.meta.data_lines = 0;
                }
                self.in_event = true;
                on_data.data(value, &self.meta);
                self.meta.data_lines += 1;
                self.last_data_closed = closes_frame(value);
            }
            b"event" | b"id" if self.meta.data_lines > 0 => {
                // A field after data without a blank line: a new event began.
                self.end_event(on_data);
                self.field(field, value);
            }
            _ => self.field(field, value),
        }
    }

    fn field(&mut self, field: &[u8], value: &[u8]) {
        match field {
            b"event" => {
                self.meta.error_event = is_error_name(value);
                self.in_event = true;
            }
            b"id" => self.in_event = true,
            _ => {}
        }
    }
}

// The rules both readers share, so a body read whole and the same body
// watched as a stream see the same events.

/// Whether an `event:` value names an error event (ASCII whitespace around
/// it and the case are ignored).
fn is_error_name(value: &[u8]) -> bool {
    value.trim_ascii().eq_ignore_ascii_case(b"error")
}

/// The status of a native `:HTTP_STATUS/NNN` comment (the text after the
/// `:`): `None` when the comment is something else, `Some(None)` when the
/// status is not a number.
fn status_comment(comment: &[u8]) -> Option<Option<u16>> {
    let code = comment.trim_ascii().strip_prefix(b"HTTP_STATUS/")?;
    Some(std::str::from_utf8(code.trim_ascii()).ok()?.parse().ok())
}

/// Whether a `data:` value ends a complete JSON frame (older gateways send
/// the next one without a blank line).
fn closes_frame(value: &[u8]) -> bool {
    value.trim_ascii().ends_with(b"}")
}

/// One whole SSE event, as collected by [`parse_events`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseEvent {
    /// The `id:` field.
    pub id: Option<String>,
    /// The `event:` field.
    pub event: Option<String>,
    /// The native `:HTTP_STATUS/NNN` comment.
    pub http_status: Option<u16>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseEvent {
    /// Whether the event is named `error` (as [`EventMeta::error_event`]:
    /// surrounding whitespace and case are ignored).
    pub fn is_error_event(&self) -> bool {
        self.event
            .as_deref()
            .is_some_and(|e| is_error_name(e.as_bytes()))
    }

    /// Whether the event is an error by its metadata (`event:error`, or
    /// `:HTTP_STATUS/` >= 400), or carries a compatible-mode `{"error":...}`
    /// payload.
    pub fn is_error(&self) -> bool {
        self.is_error_event()
            || self.http_status.is_some_and(|s| s >= 400)
            || serde_json::from_str::<serde_json::Value>(&self.data)
                .ok()
                .is_some_and(|v| v.get("error").is_some_and(|e| !e.is_null()))
    }
}

/// Splits a whole buffer into events (lenient like [`SseScanner`]: missing
/// blank lines between complete JSON frames start a new event). Events with
/// neither data nor metadata are skipped.
pub fn parse_events(buf: &[u8]) -> Vec<SseEvent> {
    let mut out: Vec<SseEvent> = Vec::new();
    let mut cur = SseEvent::default();
    let mut has_data = false;
    let mut last_closed = false;
    let flush = |cur: &mut SseEvent, out: &mut Vec<SseEvent>, has_data: &mut bool| {
        if *has_data || cur.event.is_some() || cur.id.is_some() || cur.http_status.is_some() {
            out.push(std::mem::take(cur));
        }
        *cur = SseEvent::default();
        *has_data = false;
    };
    for raw in buf.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            flush(&mut cur, &mut out, &mut has_data);
            last_closed = false;
            continue;
        }
        if let Some(comment) = line.strip_prefix(b":") {
            if let Some(status) = status_comment(comment) {
                cur.http_status = status;
            }
            continue;
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &b""[..]),
        };
        let closes = closes_frame(value);
        let value = String::from_utf8_lossy(value);
        if (field == b"event" || field == b"id") && has_data
            || field == b"data" && has_data && last_closed
        {
            let (id, event, status) = if field == b"data" {
                (cur.id.clone(), cur.event.clone(), cur.http_status)
            } else {
                (None, None, None)
            };
            flush(&mut cur, &mut out, &mut has_data);
            cur.id = id;
            cur.event = event;
            cur.http_status = status;
        }
        match field {
            b"data" => {
                if has_data {
                    cur.data.push('\n');
                }
                cur.data.push_str(&value);
                has_data = true;
                last_closed = closes;
            }
            b"event" => cur.event = Some(value.into_owned()),
            b"id" => cur.id = Some(value.into_owned()),
            _ => {}
        }
    }
    flush(&mut cur, &mut out, &mut has_data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_all(chunks: &[&[u8]]) -> Vec<(String, EventMeta)> {
        let mut s = SseScanner::new();
        let mut out = Vec::new();
        for c in chunks {
            s.feed(c, |d, m| {
                out.push((String::from_utf8_lossy(d).into_owned(), *m))
            });
        }
        s.finish(|d, m| out.push((String::from_utf8_lossy(d).into_owned(), *m)));
        out
    }

    const NATIVE: &[u8] = b"id:1\nevent:result\n:HTTP_STATUS/200\ndata:{\"output\":{\"choices\":[]},\"usage\":{\"input_tokens\":92,\"output_tokens\":1}}\n\nid:2\nevent:error\n:HTTP_STATUS/500\ndata:{\"code\":\"InternalError\"}\n\n";

    #[test]
    fn native_frames_any_split() {
        let whole = scan_all(&[NATIVE]);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].1.http_status, Some(200));
        assert!(!whole[0].1.is_error());
        assert!(whole[1].1.is_error());
        assert_eq!(whole[1].0, "{\"code\":\"InternalError\"}");
        for split in 0..NATIVE.len() {
            let parts = scan_all(&[&NATIVE[..split], &NATIVE[split..]]);
            assert_eq!(parts, whole, "split at {split}");
        }
        let bytes: Vec<&[u8]> = NATIVE.chunks(1).collect();
        assert_eq!(scan_all(&bytes), whole);
    }

    #[test]
    fn compatible_crlf_and_done() {
        let wire =
            b"data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\r\n\r\ndata: [DONE]\r\n\r\n";
        let got = scan_all(&[wire]);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, "[DONE]");
        assert_eq!(got[1].1, EventMeta::default());
    }

    #[test]
    fn missing_blank_lines_start_new_events() {
        let wire = b"event:error\n:HTTP_STATUS/429\ndata:{\"code\":\"a\"}\nid:2\nevent:result\ndata:{\"x\":1}\ndata:{\"y\":2}\n";
        let got = scan_all(&[wire]);
        assert_eq!(got.len(), 3);
        assert!(got[0].1.is_error());
        assert!(!got[1].1.is_error());
        assert_eq!(got[2].1.data_lines, 0);
        let ev = parse_events(wire);
        assert_eq!(ev.len(), 3);
        assert_eq!(ev[0].http_status, Some(429));
        assert_eq!(ev[1].id.as_deref(), Some("2"));
        assert_eq!(ev[2].data, "{\"y\":2}");
    }

    #[test]
    fn overlong_lines_are_skipped_not_buffered() {
        let mut s = SseScanner::new();
        let big = vec![b'x'; MAX_LINE + 10];
        let mut n = 0;
        s.feed(b"data:", |_, _| n += 1);
        s.feed(&big, |_, _| n += 1);
        assert!(s.carry.is_empty());
        // More of the same line keeps nothing either (#19).
        s.feed(b"more", |_, _| n += 1);
        assert!(s.carry.is_empty());
        s.feed(b"tail\ndata:ok\n", |d, _| {
            assert_eq!(d, b"ok");
            n += 1
        });
        assert_eq!(n, 1);
    }

    /// Found by fuzzing (#16): a line longer than the limit was read when
    /// it came in one chunk and skipped when it came in several.
    #[test]
    fn overlong_lines_are_skipped_however_they_are_cut() {
        let mut wire = b"data: short\ndata: ".to_vec();
        wire.resize(wire.len() + MAX_LINE, b'x');
        wire.extend_from_slice(b"\nevent:error\ndata: {\"code\":\"x\"}\n\n");
        let whole = scan_all(&[&wire]);
        assert_eq!(whole.len(), 2);
        assert_eq!(whole[0].0, "short");
        assert_eq!(whole[1].0, "{\"code\":\"x\"}");
        for cut in [3, 12, 20, MAX_LINE / 2, MAX_LINE, wire.len() - 30] {
            assert_eq!(
                scan_all(&[&wire[..cut], &wire[cut..]]),
                whole,
                "cut at {cut}"
            );
        }
        // The same with a small limit of the caller's choosing.
        let wire = b"data: short\ndata: a line longer than twenty bytes\ndata: ok\n";
        let mut got = Vec::new();
        let mut s = SseScanner::new().max_line(20);
        for chunk in wire.chunks(7) {
            s.feed(chunk, |d, _| got.push(d.to_vec()));
        }
        s.finish(|d, _| got.push(d.to_vec()));
        assert_eq!(got, [&b"short"[..], b"ok"]);
    }

    /// Found by fuzzing (#16): the scanner (streams) and `parse_events`
    /// (whole bodies, read by the classifier) trimmed the event name, the
    /// `:HTTP_STATUS/` comment and a frame's closing `}` differently, so a
    /// body read whole and the same body streamed saw different events.
    #[test]
    fn both_readers_share_one_set_of_rules() {
        let wire =
            "event: error \n: HTTP_STATUS/\u{a0}503\ndata:{\"a\":1}\u{a0}\ndata:{\"b\":2}\n\n";
        let events = parse_events(wire.as_bytes());
        let streamed = scan_all(&[wire.as_bytes()]);
        assert_eq!(events.len(), 1);
        assert!(events[0].is_error_event());
        assert_eq!(events[0].http_status, None);
        assert_eq!(events[0].data, "{\"a\":1}\u{a0}\n{\"b\":2}");
        assert_eq!(streamed.len(), 2);
        for (_, meta) in &streamed {
            assert!(meta.error_event);
            assert_eq!(meta.http_status, None);
        }
        assert_eq!(
            streamed[1].1.data_lines, 1,
            "one event, as parse_events has it"
        );
    }

    /// #19: a line of exactly [`MAX_LINE`] bytes is still read; one more
    /// byte and it is skipped.
    #[test]
    fn max_line_is_the_last_length_kept() {
        for (len, kept) in [(MAX_LINE, true), (MAX_LINE + 1, false)] {
            let mut s = SseScanner::new();
            let mut got = Vec::new();
            s.feed(b"data:", |d, _| got.push(d.len()));
            s.feed(&vec![b'x'; len - 5], |d, _| got.push(d.len()));
            s.feed(b"\ndata:next\n", |d, _| got.push(d.len()));
            let want = if kept { vec![len - 5, 4] } else { vec![4] };
            assert_eq!(got, want, "line of {len} bytes");
        }
    }

    /// #19: the limit counts the carried part and the rest together.
    #[test]
    fn the_limit_counts_both_parts_of_a_cut_line() {
        for (first, rest, kept) in [
            (&b"d"[..], &b"ata:123\n"[..], true),
            (b"d", b"ata:1234\n", false),
            (b"data:", b"123\n", true),
            (b"data:", b"1234\n", false),
        ] {
            let mut s = SseScanner::new().max_line(8);
            let mut got = 0;
            s.feed(first, |_, _| got += 1);
            s.feed(rest, |_, _| got += 1);
            s.feed(b"data:x\n", |_, _| got += 1);
            assert_eq!(got, if kept { 2 } else { 1 }, "{first:?} {rest:?}");
        }
    }

    /// #19: `finish` reads a last line without a newline, and leaves the
    /// scanner at the start of a new stream.
    #[test]
    fn finish_reads_the_last_line_and_starts_afresh() {
        let mut s = SseScanner::new();
        let mut got = Vec::new();
        s.feed(b"event:error\n:HTTP_STATUS/500\ndata:{\"a\"", |d, m| {
            got.push((d.to_vec(), *m))
        });
        assert!(got.is_empty());
        s.finish(|d, m| got.push((d.to_vec(), *m)));
        let meta = EventMeta {
            error_event: true,
            http_status: Some(500),
            data_lines: 0,
        };
        assert_eq!(got, vec![(b"{\"a\"".to_vec(), meta)]);
        got.clear();
        s.finish(|d, m| got.push((d.to_vec(), *m)));
        assert!(got.is_empty());
        s.feed(b"data:x\n", |d, m| got.push((d.to_vec(), *m)));
        assert_eq!(got, vec![(b"x".to_vec(), EventMeta::default())]);
        // The line limit is a setting: it stays.
        let mut s = SseScanner::new().max_line(8);
        s.finish(|_, _| {});
        let mut got = Vec::new();
        s.feed(b"data:123456\ndata:1\n", |d, _| got.push(d.to_vec()));
        assert_eq!(got, [b"1".to_vec()]);
    }

    /// #19: the metadata a `data:` line is handed.
    #[test]
    fn event_metadata() {
        let meta = |error_event, http_status, data_lines| EventMeta {
            error_event,
            http_status,
            data_lines,
        };
        let wire = concat!(
            // Lines of one event are counted; a blank line starts afresh.
            "data:a\ndata:b\n\ndata:c\n\n",
            // A status comment before `event:` and `id:` is kept.
            ": HTTP_STATUS/429 \nevent: Error \nid:1\ndata:d\n\n",
            // Only the first space after the colon is dropped; a field
            // without a colon has an empty value.
            "data:  e\ndata\n\n",
            // An unfinished JSON frame goes on; a finished one followed by
            // more data (no blank line) is a new frame of the same event.
            "event:error\ndata:{\"a\":\ndata:1}\ndata:{\"b\":2}\n\n",
            // A later `event:` line that is not `error` clears the flag.
            "event:error\nevent:result\ndata:f\n\n",
            // An unparseable status is no status.
            ":HTTP_STATUS/abc\ndata:g\n",
        );
        let got = scan_all(&[wire.as_bytes()]);
        let want = [
            ("a", meta(false, None, 0)),
            ("b", meta(false, None, 1)),
            ("c", meta(false, None, 0)),
            ("d", meta(true, Some(429), 0)),
            (" e", meta(false, None, 0)),
            ("", meta(false, None, 1)),
            ("{\"a\":", meta(true, None, 0)),
            ("1}", meta(true, None, 1)),
            ("{\"b\":2}", meta(true, None, 0)),
            ("f", meta(false, None, 0)),
            ("g", meta(false, None, 0)),
        ];
        let got: Vec<(&str, EventMeta)> = got.iter().map(|(d, m)| (d.as_str(), *m)).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn error_by_metadata() {
        let with = |error_event, http_status| EventMeta {
            error_event,
            http_status,
            data_lines: 0,
        };
        assert!(with(true, None).is_error());
        assert!(with(true, Some(200)).is_error());
        assert!(with(false, Some(400)).is_error());
        assert!(!with(false, Some(399)).is_error());
        assert!(!with(false, None).is_error());
        let ev = |event: Option<&str>, http_status, data: &str| SseEvent {
            id: None,
            event: event.map(str::to_owned),
            http_status,
            data: data.to_owned(),
        };
        assert!(ev(Some("ERROR"), None, "x").is_error());
        assert!(!ev(Some("result"), None, "x").is_error());
        assert!(ev(None, Some(400), "x").is_error());
        assert!(!ev(None, Some(399), "x").is_error());
        assert!(ev(None, Some(200), r#"{"error":"x"}"#).is_error());
        assert!(!ev(None, Some(200), r#"{"error":null}"#).is_error());
        assert!(!ev(None, Some(200), r#"{"ok":1}"#).is_error());
        assert!(!ev(None, None, "not json").is_error());
    }

    /// #19: how [`parse_events`] cuts and fills events.
    #[test]
    fn parse_events_shapes() {
        let ev = |id: Option<&str>, event: Option<&str>, http_status, data: &str| SseEvent {
            id: id.map(str::to_owned),
            event: event.map(str::to_owned),
            http_status,
            data: data.to_owned(),
        };
        // Events of metadata only are kept; empty ones are not.
        let got =
            parse_events(b"\n\nid:1\n\nevent:ping\n\n:HTTP_STATUS/200\n\n: just a comment\n\n");
        assert_eq!(
            got,
            [
                ev(Some("1"), None, None, ""),
                ev(None, Some("ping"), None, ""),
                ev(None, None, Some(200), ""),
            ]
        );
        // Data lines are joined; CRLF, one leading space and a missing
        // colon are read as the scanner reads them.
        assert_eq!(
            parse_events(b"data:a\r\ndata:  b\r\ndata\r\n\r\n"),
            [ev(None, None, None, "a\n b\n")]
        );
        // A finished frame followed by more data: a new event with the
        // same metadata. An unfinished one goes on.
        assert_eq!(
            parse_events(
                b"id:1\nevent:error\n:HTTP_STATUS/500\ndata:{\"a\":\ndata:1}\ndata:{\"b\":2}\n"
            ),
            [
                ev(Some("1"), Some("error"), Some(500), "{\"a\":\n1}"),
                ev(Some("1"), Some("error"), Some(500), "{\"b\":2}"),
            ]
        );
        // `event:` or `id:` after data: a new event, without the old
        // metadata. Before data they belong to the event.
        assert_eq!(
            parse_events(b"event:error\ndata:x\nevent:result\ndata:y\nid:7\ndata:z\n"),
            [
                ev(None, Some("error"), None, "x"),
                ev(None, Some("result"), None, "y"),
                ev(Some("7"), None, None, "z"),
            ]
        );
        assert_eq!(
            parse_events(b"event:a\nid:1\n: HTTP_STATUS/ 404 \nretry:5\ndata:x\n\n"),
            [ev(Some("1"), Some("a"), Some(404), "x")]
        );
    }

    #[test]
    fn compatible_error_payload_is_error() {
        let ev = parse_events(b"data: {\"error\":{\"code\":\"data_inspection_failed\"}}\n\n");
        assert!(ev[0].is_error());
        let ok = parse_events(b"data: {\"error\":null,\"choices\":[]}\n\n");
        assert!(!ok[0].is_error());
    }
}
