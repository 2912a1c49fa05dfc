//! What a generation says about itself besides its usage: why it stopped
//! and which model answered. Read by an [`Observed`](super::Observed) body
//! asked for [`Inspect::answer`](super::Inspect::answer), frame by frame,
//! in either dialect, streamed or not.

use std::fmt;

/// Why a generation stopped, as DashScope reports it (`finish_reason`).
///
/// Native streams send the string `"null"` until the last chunk; that and a
/// JSON `null` are not a finish reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FinishReason {
    /// `stop`: the model finished (or met a stop sequence).
    Stop,
    /// `length`: the output budget (`max_tokens`) ran out.
    Length,
    /// `tool_calls`: the model asks for tool calls.
    ToolCalls,
    /// `content_filter`: content inspection cut the output.
    ContentFilter,
    /// `function_call`: the legacy single function call.
    FunctionCall,
    /// Any other reason.
    Other,
}

impl FinishReason {
    /// The reason as DashScope spells it (`other` for an unknown one).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
            Self::FunctionCall => "function_call",
            Self::Other => "other",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "" | "null" => return None,
            "stop" => Self::Stop,
            "length" => Self::Length,
            "tool_calls" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            "function_call" => Self::FunctionCall,
            _ => Self::Other,
        })
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The model name a response reports (compatible mode's top-level
/// `"model"`), kept inline so a [`BodyEnd`](super::BodyEnd) stays `Copy`.
/// Names longer than [`ModelName::MAX`] bytes are not kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ModelName {
    len: u8,
    bytes: [u8; ModelName::MAX],
}

impl ModelName {
    /// The longest name kept, in bytes.
    pub const MAX: usize = 63;

    fn new(s: &str) -> Option<Self> {
        if s.is_empty() || s.len() > Self::MAX {
            return None;
        }
        let mut bytes = [0; Self::MAX];
        bytes[..s.len()].copy_from_slice(s.as_bytes());
        Some(Self {
            len: s.len() as u8,
            bytes,
        })
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        // Built from a `&str` cut at its own length: always UTF-8.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl fmt::Debug for ModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A response's finish reasons (one per choice, in the order they came, at
/// most [`Answer::MAX_CHOICES`]) and the model it names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    reasons: [Option<FinishReason>; Answer::MAX_CHOICES],
    model: Option<ModelName>,
}

impl Answer {
    /// The most finish reasons kept (DashScope's `n` is at most 4).
    pub const MAX_CHOICES: usize = 4;

    /// The finish reasons seen, in order.
    pub fn finish_reasons(&self) -> impl Iterator<Item = FinishReason> + '_ {
        self.reasons.iter().map_while(|r| *r)
    }

    /// The model the response names, if it names one.
    pub fn model(&self) -> Option<&str> {
        self.model.as_ref().map(ModelName::as_str)
    }

    /// Reads one JSON document (a body, or one SSE `data:` payload): its
    /// non-null `finish_reason`s are added, its first `"model"` is kept
    /// when none was seen yet. Keys are matched with their quotes, so text
    /// content (where quotes are escaped) cannot fake them.
    pub(crate) fn scan(&mut self, json: &[u8]) {
        static FINISH: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"finish_reason\""));
        static MODEL: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"model\""));
        let mut from = 0;
        while let Some(i) = FINISH.find(&json[from..]) {
            let at = from + i + b"\"finish_reason\"".len();
            if let Some(reason) = string_value(&json[at..]).and_then(|s| FinishReason::parse(&s))
                && let Some(slot) = self.reasons.iter_mut().find(|r| r.is_none())
            {
                *slot = Some(reason);
            }
            from = at;
        }
        if self.model.is_none() {
            let mut from = 0;
            while let Some(i) = MODEL.find(&json[from..]) {
                let at = from + i + b"\"model\"".len();
                if let Some(name) = string_value(&json[at..]) {
                    self.model = ModelName::new(&name);
                    break;
                }
                from = at;
            }
        }
    }
}

/// The JSON string after a key (`: "value"`), if that is what follows.
fn string_value(after_key: &[u8]) -> Option<std::borrow::Cow<'_, str>> {
    let value = after_key.trim_ascii_start().strip_prefix(b":")?;
    let mut it = serde_json::Deserializer::from_slice(value)
        .into_iter::<Option<std::borrow::Cow<'_, str>>>();
    match it.next() {
        Some(Ok(Some(s))) => Some(s),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(docs: &[&str]) -> Answer {
        let mut a = Answer::default();
        for d in docs {
            a.scan(d.as_bytes());
        }
        a
    }

    #[test]
    fn both_dialects_and_streams() {
        let compat = scan(&[
            r#"{"choices":[{"message":{"content":"Hi"},"finish_reason":"stop","index":0}],"model":"qwen-plus","usage":{"prompt_tokens":1}}"#,
        ]);
        assert_eq!(
            compat.finish_reasons().collect::<Vec<_>>(),
            [FinishReason::Stop]
        );
        assert_eq!(compat.model(), Some("qwen-plus"));

        // A native stream: "null" until the end, no model.
        let native = scan(&[
            r#"{"output":{"choices":[{"message":{"content":"a"},"finish_reason":"null"}]}}"#,
            r#"{"output":{"choices":[{"message":{"content":"b"},"finish_reason":"length"}]}}"#,
        ]);
        assert_eq!(
            native.finish_reasons().collect::<Vec<_>>(),
            [FinishReason::Length]
        );
        assert_eq!(native.model(), None);

        // Two choices finishing in two chunks, nulls in between.
        let two = scan(&[
            r#"{"choices":[{"delta":{"content":"x"},"finish_reason":null,"index":0}],"model":"qwen-turbo"}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"tool_calls","index":1}],"model":"qwen-turbo"}"#,
            r#"{"choices":[{"delta":{},"finish_reason":"stop","index":0}],"model":"qwen-turbo"}"#,
        ]);
        assert_eq!(
            two.finish_reasons().collect::<Vec<_>>(),
            [FinishReason::ToolCalls, FinishReason::Stop]
        );
        assert_eq!(two.model(), Some("qwen-turbo"));
    }

    #[test]
    fn content_cannot_fake_keys_and_odd_values_are_skipped() {
        let a = scan(&[
            r#"{"choices":[{"delta":{"content":"\"finish_reason\":\"stop\", \"model\":\"evil\""}}]}"#,
        ]);
        assert_eq!(a, Answer::default());
        let a = scan(&[r#"{"model":42,"finish_reason":"weird","x":{"model":"qwen-max"}}"#]);
        assert_eq!(
            a.finish_reasons().collect::<Vec<_>>(),
            [FinishReason::Other]
        );
        assert_eq!(a.model(), Some("qwen-max"));
        let long = format!(r#"{{"model":"{}"}}"#, "q".repeat(ModelName::MAX + 1));
        assert_eq!(scan(&[&long]).model(), None);
        // At most MAX_CHOICES reasons.
        let many = scan(&[r#"{"finish_reason":"stop"}"#; 6]);
        assert_eq!(many.finish_reasons().count(), Answer::MAX_CHOICES);
    }
}
