//! Client keys: stored as SHA-256 digests, looked up by the digest of the
//! presented bearer token; shown only by a short redacted id.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::time::{self, Instant};

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

/// Client addresses tracked for failed authentications at most; past that
/// the ones closest to being forgiven are forgotten first.
pub(crate) const MAX_TRACKED_PEERS: usize = 4096;

/// Failed authentications per client address: a burst of `per_minute`,
/// then one more each `60 s / per_minute` (a GCRA per address). A peer
/// over its allowance is refused before its key is even looked at, so a
/// key cannot be guessed faster than that from one address. IPv6 addresses
/// count per /64 (what one host is usually given); IPv4-mapped ones as
/// IPv4. The map is bounded ([`MAX_TRACKED_PEERS`]).
#[derive(Debug)]
pub(crate) struct AuthFailures {
    interval: Duration,
    burst: u32,
    /// Per peer, the theoretical arrival time of its next failure.
    peers: Mutex<HashMap<IpAddr, Instant>>,
}

impl AuthFailures {
    /// `None` for 0 (no limit).
    pub(crate) fn new(per_minute: u32) -> Option<Self> {
        (per_minute > 0).then(|| Self {
            interval: Duration::from_secs(60) / per_minute,
            burst: per_minute,
            peers: Mutex::new(HashMap::new()),
        })
    }

    fn peer(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let s = v6.segments();
                    IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
                }
            },
        }
    }

    /// How long `ip` must wait before it may try again, if it is over its
    /// allowance now.
    pub(crate) fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let now = time::now();
        let tat = *self.peers.lock().expect("lock").get(&Self::peer(ip))?;
        let ahead = tat.saturating_duration_since(now);
        let allowed = self.interval * (self.burst - 1);
        (ahead > allowed).then(|| ahead - allowed)
    }

    /// Counts a failed authentication from `ip`; returns how many peers are
    /// tracked.
    pub(crate) fn failed(&self, ip: IpAddr) -> usize {
        let now = time::now();
        let key = Self::peer(ip);
        let mut peers = self.peers.lock().expect("lock");
        if !peers.contains_key(&key) && peers.len() >= MAX_TRACKED_PEERS {
            // Forget the peers already forgiven; if that frees nothing, the
            // eighth closest to being forgiven (in one go, so that a flood
            // of new addresses costs a sort per 512 of them, not a scan
            // each).
            peers.retain(|_, tat| *tat > now);
            if peers.len() >= MAX_TRACKED_PEERS {
                let mut by_tat: Vec<(Instant, IpAddr)> =
                    peers.iter().map(|(k, tat)| (*tat, *k)).collect();
                let n = MAX_TRACKED_PEERS / 8;
                by_tat.select_nth_unstable(n);
                for (_, k) in &by_tat[..n] {
                    peers.remove(k);
                }
            }
        }
        let tat = peers.entry(key).or_insert(now);
        *tat = (*tat).max(now) + self.interval;
        peers.len()
    }
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
