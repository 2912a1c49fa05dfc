//! State shared by every clone of a breaker: the settings, the global
//! circuit or the keyed circuits, and the handle.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use crate::time::{self, Instant};

use super::config::{Config, OnChange};
use super::state::{Circuit, State, Transition};

/// Names the key type of a breaker: `()` for one circuit, `K` for one
/// circuit per key.
pub trait Keys: Clone + Send + Sync + 'static {
    /// The key of a circuit.
    type Key: Hash + Eq + Clone + Send + Sync + 'static;
}

/// Finds the key of a request. Implemented by [`Global`] (one circuit) and
/// [`KeyedBy`] (a closure `Fn(&mut Req) -> K`).
pub trait KeyOf<Req>: Keys {
    /// The key of `req`'s circuit. Taking `&mut` lets the closure use
    /// [`RequestInfo::of`](crate::request::RequestInfo::of), which caches
    /// what it parsed in the request's extensions.
    fn key_of(&self, req: &mut Req) -> Self::Key;

    /// Whether every request shares one circuit (then admission happens in
    /// `poll_ready`, before the inner service reserves anything).
    fn is_global(&self) -> bool {
        false
    }
}

/// One circuit for every call. The default.
#[derive(Clone, Copy, Debug, Default)]
pub struct Global;

impl Keys for Global {
    type Key = ();
}

impl<Req> KeyOf<Req> for Global {
    #[inline]
    fn key_of(&self, _: &mut Req) {}

    fn is_global(&self) -> bool {
        true
    }
}

/// One circuit per key, the key found by a closure over the request. Made by
/// [`CircuitBreakerLayer::keyed`](super::CircuitBreakerLayer::keyed).
pub struct KeyedBy<F, K> {
    f: F,
    _key: PhantomData<fn() -> K>,
}

impl<F: Clone, K> Clone for KeyedBy<F, K> {
    fn clone(&self) -> Self {
        Self {
            f: self.f.clone(),
            _key: PhantomData,
        }
    }
}

impl<F, K> KeyedBy<F, K> {
    pub(crate) fn new(f: F) -> Self {
        Self {
            f,
            _key: PhantomData,
        }
    }
}

impl<F, K> fmt::Debug for KeyedBy<F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedBy").finish_non_exhaustive()
    }
}

impl<F, K> Keys for KeyedBy<F, K>
where
    F: Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    type Key = K;
}

impl<F, K, Req> KeyOf<Req> for KeyedBy<F, K>
where
    F: Fn(&mut Req) -> K + Clone + Send + Sync + 'static,
    K: Hash + Eq + Clone + Send + Sync + 'static,
{
    #[inline]
    fn key_of(&self, req: &mut Req) -> K {
        (self.f)(req)
    }
}

pub(crate) struct Shared<K> {
    pub(crate) cfg: Config,
    pub(crate) global: Circuit,
    keyed: Option<KeyMap<K>>,
    on_change: Option<OnChange<K>>,
    /// The key reported for the global circuit: `Some(())` for an unkeyed
    /// breaker, `None` for a keyed one.
    global_key: Option<K>,
    base: Instant,
}

struct KeyMap<K> {
    map: RwLock<HashMap<K, Entry>>,
}

struct Entry {
    circuit: Arc<Circuit>,
    /// Seconds since `base` of the last call.
    used: AtomicU64,
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Shared<K> {
    /// A breaker; `global_key` is `Some` for an unkeyed one.
    pub(crate) fn new(cfg: Config, global_key: Option<K>, on_change: Option<OnChange<K>>) -> Self {
        let base = time::now();
        let keyed = global_key.is_none();
        Self {
            global_key,
            global: Circuit::new(&cfg, base),
            cfg,
            keyed: keyed.then(|| KeyMap {
                map: RwLock::new(HashMap::new()),
            }),
            on_change,
            base,
        }
    }

    pub(crate) fn global_key(&self) -> Option<K> {
        self.global_key.clone()
    }

    pub(crate) fn is_keyed(&self) -> bool {
        self.keyed.is_some()
    }

    /// The circuit of `key` (created if missing, evicting an idle one when
    /// the map is full).
    pub(crate) fn circuit(&self, key: &K) -> Arc<Circuit> {
        let map = self.keyed.as_ref().expect("keyed breaker");
        let now = time::now();
        let secs = now.saturating_duration_since(self.base).as_secs();
        {
            let m = map
                .map
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(e) = m.get(key) {
                if e.used.load(Ordering::Relaxed) != secs {
                    e.used.store(secs, Ordering::Relaxed);
                }
                return e.circuit.clone();
            }
        }
        let mut m = map
            .map
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(e) = m.get(key) {
            return e.circuit.clone();
        }
        if m.len() >= self.cfg.max_keys {
            evict(&mut m);
        }
        let circuit = Arc::new(Circuit::new(&self.cfg, self.base));
        m.insert(
            key.clone(),
            Entry {
                circuit: circuit.clone(),
                used: AtomicU64::new(secs),
            },
        );
        circuit
    }

    fn existing(&self, key: &K) -> Option<Arc<Circuit>> {
        let map = self.keyed.as_ref()?;
        let m = map
            .map
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.get(key).map(|e| e.circuit.clone())
    }

    /// Logs a state change of the global circuit and runs the callback.
    pub(crate) fn emit_global(&self, t: Transition) {
        match &self.global_key {
            Some(k) => self.emit(k, t),
            None => {
                tracing::info!(from = ?t.from, to = ?t.to, "unkeyed circuit of a keyed breaker changed")
            }
        }
    }

    /// Logs a state change and runs the callback.
    pub(crate) fn emit(&self, key: &K, t: Transition) {
        let keyed = self.is_keyed();
        match t.to {
            State::Open => tracing::warn!(
                from = ?t.from, open_for = ?t.open_for, trips = t.trips, keyed,
                "circuit opened: failing calls fast"
            ),
            State::Degraded if t.from != State::Degraded => tracing::warn!(
                from = ?t.from, open_for = ?t.open_for, trips = t.trips, keyed,
                "circuit degraded: admitting calls at a low rate"
            ),
            State::Degraded => tracing::debug!(
                open_for = ?t.open_for, trips = t.trips, keyed,
                "degraded circuit's probe failed: degraded again"
            ),
            State::HalfOpen => tracing::info!(keyed, "circuit half-open: probing"),
            State::Closed => tracing::info!(from = ?t.from, keyed, "circuit closed"),
            _ => tracing::info!(from = ?t.from, to = ?t.to, keyed, "circuit forced"),
        }
        if let Some(cb) = &self.on_change {
            cb(key, &t);
        }
    }
}

/// Evicts one circuit: the least recently used idle one not in use, else the
/// least recently used one.
fn evict<K: Hash + Eq + Clone>(m: &mut HashMap<K, Entry>) {
    let pick = |only_idle: bool| {
        m.iter()
            .filter(|(_, e)| {
                !only_idle || (e.circuit.is_idle() && Arc::strong_count(&e.circuit) == 1)
            })
            .min_by_key(|(_, e)| e.used.load(Ordering::Relaxed))
            .map(|(k, _)| k.clone())
    };
    if let Some(k) = pick(true).or_else(|| pick(false)) {
        m.remove(&k);
    }
}

/// Reads and steers a breaker's circuits: their state, and forcing them
/// open or closed. Cheap to clone; shared with every service the layer
/// made.
///
/// For a keyed breaker the `*_key` methods address one key's circuit (the
/// unkeyed methods address a circuit no call uses).
///
/// See the [module docs](super) for an example.
pub struct BreakerHandle<K = ()> {
    pub(crate) shared: Arc<Shared<K>>,
}

impl<K> Clone for BreakerHandle<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> BreakerHandle<K> {
    /// The state of the (unkeyed) circuit.
    pub fn state(&self) -> State {
        self.shared.global.state()
    }

    /// Calls and failures in the sliding window, and consecutive failures,
    /// of the (unkeyed) circuit.
    pub fn counts(&self) -> (u64, u64, u32) {
        self.shared.global.counts()
    }

    /// How long until the (unkeyed) open or degraded circuit starts probing.
    pub fn open_remaining(&self) -> Option<std::time::Duration> {
        self.shared.global.open_remaining(time::now())
    }

    /// Forces the (unkeyed) circuit open: every call fails fast until
    /// [`BreakerHandle::release`].
    pub fn force_open(&self) {
        self.force(None, State::ForcedOpen);
    }

    /// Forces the (unkeyed) circuit closed: every call passes and nothing is
    /// counted until [`BreakerHandle::release`].
    pub fn force_closed(&self) {
        self.force(None, State::ForcedClosed);
    }

    /// Returns the (unkeyed) circuit to normal operation: closed, counters
    /// cleared, open duration back to its base.
    pub fn release(&self) {
        self.force(None, State::Closed);
    }

    /// The state of `key`'s circuit, if it exists.
    pub fn state_of(&self, key: &K) -> Option<State> {
        self.shared.existing(key).map(|c| c.state())
    }

    /// Forces `key`'s circuit open (creating it if needed).
    pub fn force_open_key(&self, key: &K) {
        self.force(Some(key), State::ForcedOpen);
    }

    /// Forces `key`'s circuit closed (creating it if needed).
    pub fn force_closed_key(&self, key: &K) {
        self.force(Some(key), State::ForcedClosed);
    }

    /// Returns `key`'s circuit to normal operation, if it exists.
    pub fn release_key(&self, key: &K) {
        if self.shared.existing(key).is_some() {
            self.force(Some(key), State::Closed);
        }
    }

    /// How many keyed circuits exist.
    pub fn keys(&self) -> usize {
        self.shared.keyed.as_ref().map_or(0, |m| {
            m.map
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .len()
        })
    }

    fn force(&self, key: Option<&K>, to: State) {
        let t = match key {
            Some(k) if self.shared.is_keyed() => self.shared.circuit(k).force(to),
            _ => self.shared.global.force(to),
        };
        if let Some(t) = t {
            match key {
                Some(k) if self.shared.is_keyed() => self.shared.emit(k, t),
                _ => self.shared.emit_global(t),
            }
        }
    }
}

impl<K> fmt::Debug for BreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BreakerHandle")
            .field("global", &self.shared.global)
            .field("keyed", &self.shared.keyed.is_some())
            .finish()
    }
}

impl<K> fmt::Debug for Shared<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .field("global", &self.global)
            .finish_non_exhaustive()
    }
}
