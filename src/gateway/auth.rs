//! Client keys: stored as SHA-256 digests, looked up by the digest of the
//! presented bearer token; shown only by a short redacted id.

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;

/// The SHA-256 of a client key. The key itself is never stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// 8 hex digits of the digest: enough to tell keys apart in logs and
    /// metrics, useless for recovering the key.
    pub(crate) fn redacted_id(&self) -> String {
        let mut s = String::with_capacity(8);
        for b in &self.0[..4] {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({})", self.redacted_id())
    }
}

/// The digest of a key.
pub(crate) fn digest_of(key: &[u8]) -> KeyDigest {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    KeyDigest(out)
}

/// Parses 64 hex digits.
pub(crate) fn parse_digest(hex: &str) -> Option<KeyDigest> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(KeyDigest(out))
}

/// The SHA-256 of `key` as 64 lowercase hex digits, the form the `sha256`
/// field of a `[[keys]]` entry takes, so that the configuration file need
/// not hold the key itself.
///
/// ```
/// // printf %s abc | sha256sum
/// assert_eq!(
///     tower_qwen::gateway::key_sha256("abc"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
/// );
/// ```
pub fn key_sha256(key: &str) -> String {
    let d = digest_of(key.trim().as_bytes());
    let mut s = String::with_capacity(64);
    for b in d.0 {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The bearer token of a request: `Authorization: Bearer <token>`.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(AUTHORIZATION)?.as_bytes();
    v.get(..7).filter(|p| p.eq_ignore_ascii_case(b"bearer "))?;
    let token = v[7..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_bearer() {
        // printf %s abc | sha256sum
        let hex = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(key_sha256("abc"), hex);
        assert_eq!(parse_digest(hex), Some(digest_of(b"abc")));
        assert_eq!(digest_of(b"abc").redacted_id(), "ba7816bf");
        assert!(parse_digest("xyz").is_none());
        assert!(parse_digest(&"g".repeat(64)).is_none());
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, "Bearer  sk-1 ".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"sk-1"[..]));
        h.insert(AUTHORIZATION, "bearer sk-2".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"sk-2"[..]));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }
}
