//! Client keys: stored as SHA-256 digests, looked up by the digest of the
//! presented bearer token; shown only by a short redacted id.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::time::Duration;

use http::HeaderMap;
use http::header::AUTHORIZATION;

use crate::rate_limit::{Backend, Cost, Decision, Limits, Quota, RateLimiter, Ticket};
use crate::time;

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

    /// 16 hex digits of the digest: the default name of a key configured
    /// without one (unique in practice even among 100,000 keys).
    pub(crate) fn name_id(&self) -> String {
        let mut s = String::with_capacity(16);
        for b in &self.0[..8] {
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

/// Client addresses tracked for failed authentications at most.
pub(crate) const MAX_TRACKED_PEERS: usize = 4096;

/// Failed authentications per client address: a burst of `per_minute`,
/// then one more each `60 s / per_minute`: the crate's keyed
/// [`RateLimiter`], keyed by address. A peer over its allowance is refused
/// before its key is even looked at, so a key cannot be guessed faster
/// than that from one address. IPv6 addresses count per /64 (what one host
/// is usually given); IPv4-mapped ones as IPv4.
///
/// At most [`MAX_TRACKED_PEERS`] addresses are tracked; a tracked address
/// is forgotten once it is forgiven (its bucket full again). When the table
/// is full of addresses still being counted, new addresses share one
/// allowance of `per_minute` (the limiter's overflow state) until room
/// frees up: a flood from many fresh addresses neither grows memory nor
/// gets a fresh allowance per address, and it cannot push a tracked
/// address out. The price is that during such a flood an address not yet
/// tracked is refused (429, `Retry-After`) while that shared allowance is
/// spent, even with a good key: the limit fails closed.
#[derive(Debug)]
pub(crate) struct AuthFailures {
    limiter: RateLimiter<IpAddr>,
}

impl AuthFailures {
    /// `None` for 0 (no limit).
    pub(crate) fn new(per_minute: u32) -> Option<Self> {
        Self::with_max_peers(per_minute, MAX_TRACKED_PEERS)
    }

    fn with_max_peers(per_minute: u32, max_peers: usize) -> Option<Self> {
        let per_minute = NonZeroU32::new(per_minute)?;
        let limiter = RateLimiter::builder(Limits::requests(Quota::per_minute(per_minute)))
            .feedback(None)
            .max_keys(max_peers)
            .build_keyed();
        Some(Self { limiter })
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
    /// allowance now (an untracked address while the table is full: the
    /// shared overflow allowance's wait).
    pub(crate) fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let wait = self
            .limiter
            .snapshot(&Self::peer(ip))?
            .requests?
            .retry_after;
        (!wait.is_zero()).then_some(wait)
    }

    /// Counts a failed authentication from `ip`; returns how many peers are
    /// tracked. Always counted, even past the allowance (requests that
    /// passed [`AuthFailures::blocked`] together and then failed all
    /// count), so concurrency does not multiply the guesses allowed.
    pub(crate) fn failed(&self, ip: IpAddr) -> usize {
        let peer = Self::peer(ip);
        let charged = self
            .limiter
            .decide(&peer, |_| Cost::ONE, Duration::MAX, time::now());
        match charged {
            // Booked past the allowance: admitting it keeps the charge.
            Decision::Booked(ticket) => drop(ticket.admit()),
            Decision::Admitted(_) | Decision::Refused(_) | Decision::Pending(_) => {}
        }
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

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

    const V4: fn(u32) -> IpAddr = |n| IpAddr::V4(n.into());

    #[tokio::test(start_paused = true)]
    async fn failures_are_limited_per_address_and_forgiven() {
        let f = AuthFailures::new(3).unwrap();
        assert!(AuthFailures::new(0).is_none());
        let a = V4(1);
        for _ in 0..3 {
            assert_eq!(f.blocked(a), None);
            f.failed(a);
        }
        assert_eq!(f.blocked(a), Some(Duration::from_secs(20)));
        assert_eq!(f.blocked(V4(2)), None, "per address");
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(f.blocked(a), None, "one forgiven each 20 s");
        // Failures that passed the check together all count: five at once
        // keep the address out for 60 s, not 20.
        let b = V4(3);
        for _ in 0..5 {
            f.failed(b);
        }
        assert_eq!(f.blocked(b), Some(Duration::from_secs(60)));
        // IPv4-mapped IPv6 counts as IPv4; IPv6 per /64.
        assert_eq!(
            f.blocked(IpAddr::V6(Ipv4Addr::from(3u32).to_ipv6_mapped())),
            Some(Duration::from_secs(60))
        );
        let v6 = |last| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, last));
        for i in 0..3 {
            f.failed(v6(i));
        }
        assert!(f.blocked(v6(99)).is_some());
    }

    /// A full table: fresh addresses share one allowance (no bypass by
    /// address flood, no growth), tracked ones keep theirs, and room comes
    /// back once tracked addresses are forgiven.
    #[tokio::test(start_paused = true)]
    async fn a_full_table_makes_new_addresses_share_one_allowance() {
        let f = AuthFailures::with_max_peers(3, 4).unwrap();
        for n in 0..4 {
            f.failed(V4(n));
        }
        for _ in 0..2 {
            f.failed(V4(0));
        }
        assert!(f.blocked(V4(0)).is_some());
        // A flood of fresh addresses: the first three fail on the shared
        // allowance, then every untracked address is refused.
        for n in 100..103 {
            assert_eq!(f.blocked(V4(n)), None);
            assert_eq!(f.failed(V4(n)), 4, "memory stays bounded");
        }
        for n in 103..1_000 {
            assert_eq!(f.blocked(V4(n)), Some(Duration::from_secs(20)), "{n}");
        }
        // Tracked addresses were not pushed out: still blocked, or still
        // with their own allowance.
        assert!(f.blocked(V4(0)).is_some());
        assert_eq!(f.blocked(V4(1)), None);
        // Once tracked addresses are forgiven, a new one gets its own entry.
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(f.blocked(V4(2_000)), None);
        f.failed(V4(2_000));
        f.failed(V4(2_000));
        assert_eq!(f.blocked(V4(2_001)), None, "its own, not the shared one");
        assert!(f.limiter.len() <= 4);
    }
}
