//! The one bounded keyed store behind the rate limiter's buckets, the
//! breaker's circuits and the Redis backend's local state.
//!
//! A sharded map (`dashmap`, the map governor uses too): a read is one
//! shard read lock and a probe. Keys are hashed with `foldhash` (randomly
//! seeded per process, hashbrown's own default) rather than std's SipHash:
//! a few nanoseconds per decision instead of tens for string keys. At most `max_keys` keys. Idle entries (the
//! owner says which: a full bucket, a closed circuit with nothing counted,
//! an expired lease, each with nobody holding it) are swept out when a new
//! key arrives and a sweep is due: every `sweep_every`, or at most once a
//! second while the store is full. No background task. When the store is
//! full of busy keys, [`Store::get_or_insert_with`] answers `None` and the
//! owner falls back to one shared overflow state of its own: memory stays
//! bounded and overflowing keys are still limited, together.

use std::hash::Hash;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use dashmap::DashMap;
use dashmap::mapref::one::Ref;

const SECOND: u64 = 1_000_000_000;

pub(crate) struct Store<K, V> {
    map: DashMap<K, V, foldhash::fast::RandomState>,
    count: AtomicUsize,
    max_keys: usize,
    sweep_every: u64,
    /// `now + 1` of the last sweep; 0 = never.
    last_sweep: AtomicU64,
    evicted: AtomicU64,
    overflowed: AtomicU64,
    what: &'static str,
}

impl<K: Hash + Eq, V> Store<K, V> {
    /// A store of at most `max_keys` keys (at least 1), swept every
    /// `sweep_every` ns when new keys arrive; `what` names it in logs.
    pub(crate) fn new(max_keys: usize, sweep_every: u64, what: &'static str) -> Self {
        Self {
            map: DashMap::with_hasher(foldhash::fast::RandomState::default()),
            count: AtomicUsize::new(0),
            max_keys: max_keys.max(1),
            sweep_every,
            last_sweep: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            what,
        }
    }

    /// The entry of `key`, if it exists. The shard is read-locked while the
    /// guard lives: do not touch the store meanwhile.
    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<Ref<'_, K, V>> {
        self.map.get(key)
    }
}

impl<K: Hash + Eq + Clone, V> Store<K, V> {
    /// The entry of `key`, created with `make` if new. `None` when the store
    /// is full of busy keys (after sweeping the idle ones, if due): the
    /// caller then uses its overflow state. `now` is in nanoseconds on the
    /// caller's clock; `idle` says which entries can be dropped.
    pub(crate) fn get_or_insert_with(
        &self,
        key: &K,
        now: u64,
        make: impl FnOnce() -> V,
        idle: impl FnMut(&V) -> bool,
    ) -> Option<Ref<'_, K, V>> {
        if let Some(r) = self.map.get(key) {
            return Some(r);
        }
        // A new key (the cold path).
        let last = self.last_sweep.load(Ordering::Relaxed);
        // Never swept: the periodic sweep counts from the clock's start, and
        // a full store sweeps at once.
        let since = (last > 0).then(|| now.saturating_sub(last - 1));
        let full = self.count.load(Ordering::Relaxed) >= self.max_keys;
        let due =
            since.unwrap_or(now) >= self.sweep_every || (full && since.is_none_or(|s| s >= SECOND));
        if due
            && self
                .last_sweep
                .compare_exchange(last, now + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.sweep(now, idle);
        }
        if self.count.load(Ordering::Relaxed) >= self.max_keys {
            if let Some(r) = self.map.get(key) {
                return Some(r);
            }
            let n = self.overflowed.fetch_add(1, Ordering::Relaxed);
            if n.is_power_of_two() {
                tracing::warn!(
                    store = self.what,
                    max_keys = self.max_keys,
                    overflowed = n + 1,
                    "keyed state is full of busy keys; new keys share one overflow state"
                );
            }
            return None;
        }
        let mut created = false;
        let entry = self.map.entry(key.clone()).or_insert_with(|| {
            created = true;
            make()
        });
        if created {
            self.count.fetch_add(1, Ordering::Relaxed);
        }
        Some(entry.downgrade())
    }
}

impl<K: Hash + Eq, V> Store<K, V> {
    /// Removes `key`'s entry.
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) fn remove(&self, key: &K) -> Option<V> {
        let (_, v) = self.map.remove(key)?;
        self.count.fetch_sub(1, Ordering::Relaxed);
        Some(v)
    }

    /// Removes every entry `idle` accepts; returns how many.
    pub(crate) fn sweep(&self, now: u64, mut idle: impl FnMut(&V) -> bool) -> usize {
        self.last_sweep.fetch_max(now + 1, Ordering::AcqRel);
        let mut removed = 0;
        self.map.retain(|_, v| {
            let drop = idle(v);
            removed += usize::from(drop);
            !drop
        });
        if removed > 0 {
            self.count.fetch_sub(removed, Ordering::Relaxed);
            self.evicted.fetch_add(removed as u64, Ordering::Relaxed);
            tracing::debug!(
                store = self.what,
                removed,
                keys = self.count.load(Ordering::Relaxed),
                "evicted idle keys"
            );
        }
        removed
    }

    /// How many keys are stored.
    pub(crate) fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Whether the store holds `max_keys` keys (a new key would overflow
    /// unless a sweep frees room).
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) fn is_full(&self) -> bool {
        self.len() >= self.max_keys
    }

    /// How many keys were evicted so far.
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }

    /// The bytes one entry takes in the map: its slot (key and value) and
    /// control byte, at hashbrown's 7/8 load factor (heap data owned by the
    /// key or the value comes on top).
    #[cfg_attr(not(feature = "rate-limit"), allow(dead_code))]
    pub(crate) const fn bytes_per_key() -> usize {
        (std::mem::size_of::<(K, V)>() + 1) * 8 / 7
    }
}

impl<K, V> std::fmt::Debug for Store<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("what", &self.what)
            .field("keys", &self.count.load(Ordering::Relaxed))
            .field("max_keys", &self.max_keys)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_stores_sweep_idle_keys_then_overflow() {
        let s: Store<u32, bool> = Store::new(2, 60 * SECOND, "test");
        // Values say whether they are idle.
        assert!(s.get_or_insert_with(&1, 0, || false, |v| *v).is_some());
        assert!(s.get_or_insert_with(&2, 0, || true, |v| *v).is_some());
        // Full: the first sweep is due at once and drops key 2.
        assert!(s.get_or_insert_with(&3, 0, || false, |v| *v).is_some());
        assert_eq!((s.len(), s.evicted()), (2, 1));
        assert!(s.get(&2).is_none());
        assert_eq!(s.remove(&3), Some(false));
        assert_eq!(s.len(), 1);
        assert!(s.get_or_insert_with(&3, 0, || false, |v| *v).is_some());
        // Full of busy keys: overflow, and no second sweep within a second.
        assert!(
            s.get_or_insert_with(&4, SECOND / 2, || true, |_| true)
                .is_none()
        );
        assert_eq!(s.len(), 2);
        // Existing keys are still found.
        assert!(
            s.get_or_insert_with(&1, SECOND / 2, || true, |v| *v)
                .is_some()
        );
        // A second later a sweep is due again.
        s.remove(&1);
        s.get_or_insert_with(&1, SECOND / 2, || true, |_| false);
        assert!(
            s.get_or_insert_with(&4, 2 * SECOND, || false, |v| *v)
                .is_some()
        );
        assert_eq!((s.len(), s.evicted()), (2, 2));
    }

    #[test]
    fn periodic_sweeps_when_not_full() {
        let s: Store<u32, bool> = Store::new(100, 10 * SECOND, "test");
        s.get_or_insert_with(&1, 0, || true, |v| *v);
        s.get_or_insert_with(&2, SECOND, || true, |v| *v);
        s.get_or_insert_with(&3, 5 * SECOND, || true, |v| *v);
        assert_eq!(s.len(), 3, "not due yet");
        s.get_or_insert_with(&4, 12 * SECOND, || true, |v| *v);
        assert_eq!(s.len(), 1);
        assert_eq!(s.sweep(12 * SECOND, |v| *v), 1);
        assert!(Store::<u64, u64>::bytes_per_key() >= 16);
    }
}
