//! A deterministic token estimate for Qwen text, used before a call to
//! reserve token budget (TPM) and by the mock server to charge `usage`.
//!
//! DashScope counts tokens with the Qwen tokenizer; the Model Studio billing
//! page puts one token at about 1.5 to 1.8 Chinese characters, and English
//! averages about four characters a token. This estimate is deliberately
//! simple and a little pessimistic, so that a reservation rarely falls short:
//!
//! * ASCII: one token per 4 bytes (rounded up per text);
//! * CJK ideographs, kana and hangul: two tokens per 3 characters;
//! * any other character: one token per 2 characters;
//! * a chat message adds [`MESSAGE_OVERHEAD`] tokens (role and separators).
//!
//! The rate limiter reconciles the estimate with the real `usage` when the
//! response ends, so the estimate only has to be in the right range.
//!
//! # Example
//!
//! ```
//! use tower_qwen::tokens::estimate_text_tokens;
//! assert_eq!(estimate_text_tokens(""), 0);
//! assert_eq!(estimate_text_tokens("Hello, world"), 3);   // 12 ASCII bytes / 4
//! assert_eq!(estimate_text_tokens("你好世界"), 3);          // 4 CJK chars * 2/3, rounded up
//! ```

/// Tokens added per chat message for its role and separators.
pub const MESSAGE_OVERHEAD: u32 = 4;

/// Estimates the number of tokens in `text`. Deterministic; see the
/// [module docs](self) for the rule.
pub fn estimate_text_tokens(text: &str) -> u32 {
    let bytes = text.as_bytes();
    let ascii = bytes.iter().filter(|b| b.is_ascii()).count() as u64;
    let (mut cjk, mut other) = (0u64, 0u64);
    if ascii as usize != bytes.len() {
        for ch in text.chars().filter(|c| !c.is_ascii()) {
            if is_cjk(ch) {
                cjk += 1;
            } else {
                other += 1;
            }
        }
    }
    let total = ascii.div_ceil(4) + (cjk * 2).div_ceil(3) + other.div_ceil(2);
    u32::try_from(total).unwrap_or(u32::MAX)
}

fn is_cjk(ch: char) -> bool {
    matches!(ch as u32,
        0x3040..=0x30FF      // hiragana, katakana
        | 0x3400..=0x4DBF    // CJK extension A
        | 0x4E00..=0x9FFF    // CJK unified ideographs
        | 0xAC00..=0xD7AF    // hangul syllables
        | 0xF900..=0xFAFF    // CJK compatibility ideographs
        | 0xFF00..=0xFFEF    // full-width forms
        | 0x20000..=0x2FFFF  // CJK extensions B..F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mixed_text() {
        assert_eq!(estimate_text_tokens("abcd"), 1);
        assert_eq!(estimate_text_tokens("abcde"), 2);
        assert_eq!(estimate_text_tokens("中"), 1);
        assert_eq!(estimate_text_tokens("中文字"), 2);
        assert_eq!(estimate_text_tokens("é"), 1);
        assert_eq!(estimate_text_tokens("abcd中文字"), 3);
    }

    #[test]
    fn grows_with_length() {
        let short = estimate_text_tokens(&"word ".repeat(10));
        let long = estimate_text_tokens(&"word ".repeat(1000));
        assert_eq!(short, 13);
        assert_eq!(long, 1250);
    }

    /// Each class is counted with its own rate, and the classes add up
    /// (#19: mutants of the arithmetic survived the examples above).
    #[test]
    fn each_class_at_its_rate() {
        // CJK: two tokens per three characters, rounded up per text.
        assert_eq!(estimate_text_tokens("中文"), 2);
        assert_eq!(estimate_text_tokens("你好世界"), 3);
        assert_eq!(estimate_text_tokens("你好世界你好"), 4);
        assert_eq!(estimate_text_tokens("こんにちは안녕"), 5);
        // Other non-ASCII: one token per two characters.
        assert_eq!(estimate_text_tokens("éé"), 1);
        assert_eq!(estimate_text_tokens("ééé"), 2);
        assert_eq!(estimate_text_tokens("éééé"), 2);
        // The three classes add up.
        assert_eq!(estimate_text_tokens("abcdefgh你好世界éé"), 2 + 3 + 1);
        assert_eq!(estimate_text_tokens("abcdefghéé"), 2 + 1);
    }

    #[test]
    fn every_cjk_block_counts_as_cjk() {
        // Four characters of one block: 3 tokens as CJK, 2 as "other".
        for first in [
            '\u{3041}',
            '\u{30FF}',
            '\u{3400}',
            '\u{4DBF}',
            '\u{4E00}',
            '\u{9FFF}',
            '\u{AC00}',
            '\u{D7AF}',
            '\u{F900}',
            '\u{FAFF}',
            '\u{FF01}',
            '\u{FFEF}',
            '\u{20000}',
            '\u{2FFFF}',
        ] {
            let text: String = std::iter::repeat_n(first, 4).collect();
            assert_eq!(estimate_text_tokens(&text), 3, "U+{:X}", first as u32);
        }
        for outside in [
            '\u{303F}',
            '\u{3100}',
            '\u{D7B0}',
            '\u{FFF0}',
            '\u{30000}',
            'é',
        ] {
            let text: String = std::iter::repeat_n(outside, 4).collect();
            assert_eq!(estimate_text_tokens(&text), 2, "U+{:X}", outside as u32);
        }
    }
}
