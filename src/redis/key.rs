//! How a limiter key becomes a Redis key: the same string in every process.

use std::fmt::Write as _;
use std::sync::Arc;

use crate::rate_limit::{Account, AccountModel};

/// A limiter key that can be written as (part of) a Redis key.
///
/// Every replica must write the same string for the same logical key, so
/// implementations must not depend on anything process-local (a pointer, a
/// randomly seeded hash). Strings are escaped so that different keys never
/// produce the same Redis key (`|` separates tuple parts and `%` escapes).
///
/// Implemented for `()`, integers, `bool`, strings (`String`, `&str`,
/// `Arc<str>`, `Box<str>`), `Option<T>`, pairs and triples, and the
/// rate limiter's [`AccountModel`] and [`Account`].
///
/// # Hashed accounts
///
/// [`ByAccountModel`](crate::rate_limit::ByAccountModel) and
/// [`ByHeader`](crate::rate_limit::ByHeader) identify keys they do not know
/// by a SipHash of the secret with fixed keys: every replica running the
/// same build gives the same unknown API key the same Redis key, so they
/// share its budget. (Across different builds the standard library's hash
/// may change; name your accounts with
/// `ByAccountModel::new().account(api_key, name)` when replicas of
/// different versions must share a limit.)
pub trait StoreKey {
    /// Appends this key's encoding to `out`.
    fn write_key(&self, out: &mut String);
}

/// Appends `s`, escaping `%` and `|`.
fn escaped(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '%' => out.push_str("%25"),
            '|' => out.push_str("%7C"),
            c => out.push(c),
        }
    }
}

impl StoreKey for () {
    fn write_key(&self, out: &mut String) {
        out.push('*');
    }
}

impl StoreKey for bool {
    fn write_key(&self, out: &mut String) {
        out.push(if *self { '1' } else { '0' });
    }
}

macro_rules! int_keys {
    ($($t:ty),*) => {$(
        impl StoreKey for $t {
            fn write_key(&self, out: &mut String) {
                let _ = write!(out, "{self}");
            }
        }
    )*};
}

int_keys!(
    u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize
);

impl StoreKey for str {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl StoreKey for String {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl StoreKey for Arc<str> {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl StoreKey for Box<str> {
    fn write_key(&self, out: &mut String) {
        escaped(out, self);
    }
}

impl<T: StoreKey + ?Sized> StoreKey for &T {
    fn write_key(&self, out: &mut String) {
        (**self).write_key(out);
    }
}

impl<T: StoreKey> StoreKey for Option<T> {
    fn write_key(&self, out: &mut String) {
        match self {
            None => out.push('-'),
            Some(v) => {
                out.push('+');
                v.write_key(out);
            }
        }
    }
}

impl<A: StoreKey, B: StoreKey> StoreKey for (A, B) {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out);
        out.push('|');
        self.1.write_key(out);
    }
}

impl<A: StoreKey, B: StoreKey, C: StoreKey> StoreKey for (A, B, C) {
    fn write_key(&self, out: &mut String) {
        self.0.write_key(out);
        out.push('|');
        self.1.write_key(out);
        out.push('|');
        self.2.write_key(out);
    }
}

impl StoreKey for Account {
    /// `a:<name>` for a named account, `h:<hash>` for a hashed one (see the
    /// trait docs), `anon` without a key.
    fn write_key(&self, out: &mut String) {
        match self {
            Account::Named(n) => {
                out.push_str("a:");
                escaped(out, n);
            }
            Account::Hashed(h) => {
                let _ = write!(out, "h:{h:016x}");
            }
            Account::Anonymous => out.push_str("anon"),
        }
    }
}

impl StoreKey for AccountModel {
    fn write_key(&self, out: &mut String) {
        self.account.write_key(out);
        out.push('|');
        self.model.write_key(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: StoreKey>(k: K) -> String {
        let mut s = String::new();
        k.write_key(&mut s);
        s
    }

    #[test]
    fn encodings_are_stable_and_unambiguous() {
        assert_eq!(enc(()), "*");
        assert_eq!(enc(42u64), "42");
        assert_eq!(enc(Some("a|b")), "+a%7Cb");
        assert_eq!(enc(None::<String>), "-");
        assert_ne!(enc(("a|b", "c")), enc(("a", "b|c")));
        assert_ne!(enc(("a%7Cb", "c")), enc(("a|b", "c")));
        let k = AccountModel {
            account: Account::Named(Arc::from("acme")),
            model: Some(Arc::from("qwen-plus")),
        };
        assert_eq!(enc(&k), "a:acme|+qwen-plus");
        let k = AccountModel {
            account: Account::Anonymous,
            model: None,
        };
        assert_eq!(enc(k), "anon|-");
        assert_eq!(enc(Account::Hashed(255)), "h:00000000000000ff");
    }
}
