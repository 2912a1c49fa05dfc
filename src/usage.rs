//! Token `usage` reported by DashScope, in both dialects.
//!
//! Native bodies report `usage.input_tokens` / `output_tokens` /
//! `total_tokens` (embeddings only `total_tokens`); compatible bodies report
//! `prompt_tokens` / `completion_tokens` / `total_tokens`. Native streams
//! repeat a **cumulative** usage on every chunk, so the last one seen is the
//! answer; compatible streams send it once, in a tail chunk with
//! `"choices": []`, when `stream_options.include_usage` is set.
//!
//! # Example
//!
//! ```
//! use tower_qwen::usage::Usage;
//!
//! let native = br#"{"output":{"text":"hi"},"usage":{"input_tokens":92,"output_tokens":10,"total_tokens":102}}"#;
//! assert_eq!(Usage::find(native), Some(Usage { input_tokens: 92, output_tokens: 10, total_tokens: 102 }));
//!
//! let compatible = br#"{"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":20,"total_tokens":30}}"#;
//! assert_eq!(Usage::find(compatible).unwrap().total(), 30);
//! ```

use serde::Deserialize;

/// Tokens one call consumed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Usage {
    /// Input (prompt) tokens.
    pub input_tokens: u32,
    /// Output (completion) tokens.
    pub output_tokens: u32,
    /// Total as reported, or 0 when the response did not say.
    pub total_tokens: u32,
}

impl Usage {
    /// The total: `total_tokens` when reported, else input + output.
    pub fn total(&self) -> u32 {
        if self.total_tokens > 0 {
            self.total_tokens
        } else {
            self.input_tokens.saturating_add(self.output_tokens)
        }
    }

    /// Finds the top-level `"usage"` object in one JSON document (a body or
    /// one SSE `data:` payload) without parsing the rest of it.
    ///
    /// Returns `None` when there is no usage, it is `null`, or it is
    /// malformed. The key is matched as `"usage"` followed by `:`; inside a
    /// JSON string the quotes would be escaped, so text content cannot fake
    /// it.
    pub fn find(json: &[u8]) -> Option<Usage> {
        static FINDER: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
            std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"usage\""));
        // `find_iter` always moves forward, so no input (and no wrong
        // offset) can make this loop spin.
        for i in FINDER.find_iter(json) {
            let after = json[i + b"\"usage\"".len()..].trim_ascii_start();
            if let Some(value) = after.strip_prefix(b":") {
                let mut it =
                    serde_json::Deserializer::from_slice(value).into_iter::<Option<RawUsage>>();
                return match it.next() {
                    Some(Ok(Some(raw))) => raw.into_usage(),
                    _ => None,
                };
            }
        }
        None
    }
}

#[derive(Deserialize)]
struct RawUsage {
    #[serde(default, alias = "prompt_tokens")]
    input_tokens: Option<u64>,
    #[serde(default, alias = "completion_tokens")]
    output_tokens: Option<u64>,
    #[serde(default)]
    total_tokens: Option<u64>,
}

impl RawUsage {
    fn into_usage(self) -> Option<Usage> {
        if self.input_tokens.is_none()
            && self.output_tokens.is_none()
            && self.total_tokens.is_none()
        {
            return None;
        }
        let c = |v: Option<u64>| u32::try_from(v.unwrap_or(0)).unwrap_or(u32::MAX);
        Some(Usage {
            input_tokens: c(self.input_tokens),
            output_tokens: c(self.output_tokens),
            total_tokens: c(self.total_tokens),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(
            Usage::find(br#"{"usage": {"total_tokens": 7}, "output":{"embeddings":[]}}"#),
            Some(Usage {
                input_tokens: 0,
                output_tokens: 0,
                total_tokens: 7
            })
        );
        assert_eq!(
            Usage::find(br#"{"choices":[{"delta":{}}],"usage":null}"#),
            None
        );
        assert_eq!(
            Usage::find(br#"{"x":"\"usage\": {\"total_tokens\":5}"}"#),
            None
        );
        assert_eq!(Usage::find(br#"{"usage":{"input_tokens":"x"}}"#), None);
        assert_eq!(Usage::find(br#"{"usage":{}}"#), None);
        assert_eq!(Usage::find(b"not json \"usage\""), None);
        let u = Usage::find(br#"{"usage":{"input_tokens":3,"output_tokens":4}}"#).unwrap();
        assert_eq!(u.total(), 7);
    }

    /// #19: the reported total wins over input + output; the key is found
    /// after earlier mentions of the word that are not keys; both
    /// dialects' names; huge counts saturate.
    #[test]
    fn total_and_key_search() {
        let u = |i, o, t| Usage {
            input_tokens: i,
            output_tokens: o,
            total_tokens: t,
        };
        assert_eq!(u(3, 4, 10).total(), 10);
        assert_eq!(u(3, 4, 1).total(), 1);
        assert_eq!(u(3, 4, 0).total(), 7);
        assert_eq!(u(u32::MAX, 4, 0).total(), u32::MAX);
        assert_eq!(
            Usage::find(br#"{"tags":["usage", "usage"] ,"usage" : {"prompt_tokens":5,"completion_tokens":6}}"#),
            Some(u(5, 6, 0))
        );
        assert_eq!(
            Usage::find(br#"{"usage":{"input_tokens":1},"x":{"usage":{"input_tokens":2}}}"#),
            Some(u(1, 0, 0))
        );
        assert_eq!(Usage::find(br#""usage""#), None);
        assert_eq!(Usage::find(br#""usage":"#), None);
        assert_eq!(
            Usage::find(br#"{"usage":{"output_tokens":99999999999}}"#),
            Some(u(0, u32::MAX, 0))
        );
        assert_eq!(
            Usage::find(br#"{"usage":{"input_tokens":null,"total_tokens":4}}"#),
            Some(u(0, 0, 4))
        );
    }
}
