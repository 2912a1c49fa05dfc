//! State shared by every clone of a breaker: the circuits (global or keyed,
//! shared by every service its layer makes and every handle) and, per set
//! of settings, the settings and the state-change callback.

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, OnceLock};

use crate::key::store::Store;
use crate::time::{self, Instant, duration_nanos};

use super::config::{Config, OnChange};
use super::state::{Circuit, State, Transition};

/// What the services of one layer made with one set of settings share:
/// those settings, and the circuits, which every set of settings of the
/// layer shares (a setter makes a new `Shared` around the same circuits).
pub(crate) struct Shared<K> {
    pub(crate) cfg: Config,
    circuits: Arc<Circuits<K>>,
    on_change: Option<OnChange<K>>,
}

/// The circuits of a breaker.
struct Circuits<K> {
    global: Circuit,
    keyed: Option<KeyMap<K>>,
    /// The key reported for the global circuit: `Some(())` for an unkeyed
    /// breaker, `None` for a keyed one.
    global_key: Option<K>,
    base: Instant,
}

/// The circuits of a keyed breaker, in the crate's bounded keyed store: a
/// circuit with nothing to remember (closed, nothing counted, no call in
/// flight) is idle and swept out when new keys arrive; when every circuit is
/// busy, new keys share one overflow circuit until room frees up.
struct KeyMap<K> {
    store: Store<K, Arc<Circuit>>,
    overflow: OnceLock<Arc<Circuit>>,
}

/// How often a keyed breaker sweeps idle circuits when new keys arrive.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

fn is_idle(c: &Arc<Circuit>) -> bool {
    c.is_idle() && Arc::strong_count(c) == 1
}

impl<K> Shared<K> {
    /// The circuit of an unkeyed breaker (for a keyed one, a circuit no
    /// call uses).
    #[inline]
    pub(crate) fn global(&self) -> &Circuit {
        &self.circuits.global
    }

    pub(crate) fn is_keyed(&self) -> bool {
        self.circuits.keyed.is_some()
    }
}

impl<K: Hash + Eq + Clone + Send + Sync + 'static> Shared<K> {
    /// A breaker with new circuits; `global_key` is `Some` for an unkeyed
    /// one.
    pub(crate) fn new(cfg: Config, global_key: Option<K>, on_change: Option<OnChange<K>>) -> Self {
        let base = time::now();
        let keyed = global_key.is_none().then(|| KeyMap {
            store: Store::new(cfg.max_keys, duration_nanos(SWEEP_EVERY), "circuit breaker"),
            overflow: OnceLock::new(),
        });
        Self {
            circuits: Arc::new(Circuits {
                global_key,
                global: Circuit::new(base),
                keyed,
                base,
            }),
            cfg,
            on_change,
        }
    }

    /// The same circuits with other settings.
    pub(crate) fn with(&self, cfg: Config, on_change: Option<OnChange<K>>) -> Self {
        Self {
            cfg,
            circuits: self.circuits.clone(),
            on_change,
        }
    }

    /// The circuit of `key` (created if missing; when the map is full of
    /// busy circuits, the overflow circuit).
    pub(crate) fn circuit(&self, key: &K) -> Arc<Circuit> {
        let c = &*self.circuits;
        let map = c.keyed.as_ref().expect("keyed breaker");
        let now = duration_nanos(time::now().saturating_duration_since(c.base));
        match map
            .store
            .get_or_insert_with(key, now, || Arc::new(Circuit::new(c.base)), is_idle)
        {
            Some(c) => c.clone(),
            None => map
                .overflow
                .get_or_init(|| Arc::new(Circuit::new(c.base)))
                .clone(),
        }
    }

    fn existing(&self, key: &K) -> Option<Arc<Circuit>> {
        let map = self.circuits.keyed.as_ref()?;
        map.store.get(key).map(|c| c.clone())
    }

    /// Logs a state change of the global circuit and runs the callback.
    pub(crate) fn emit_global(&self, t: Transition) {
        match &self.circuits.global_key {
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

/// Reads and steers a breaker's circuits: their state, and forcing them
/// open or closed. Cheap to clone; shared with every service the layer
/// made.
///
/// For a keyed breaker the `*_key` methods address one key's circuit (the
/// unkeyed methods address a circuit no call uses).
///
/// A handle addresses the circuits of every service its layer makes, before
/// or after it was taken, whatever setters were called in between. What it
/// does itself follows the layer's settings when it was taken: the trip
/// action and open duration of [`trip_until`](Self::trip_until), the
/// state-change callback of its forced changes.
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
        self.shared.global().state()
    }

    /// Calls and failures in the sliding window, and consecutive failures,
    /// of the (unkeyed) circuit.
    pub fn counts(&self) -> (u64, u64, u32) {
        self.shared.global().counts()
    }

    /// How long until the (unkeyed) open or degraded circuit starts probing.
    pub fn open_remaining(&self) -> Option<std::time::Duration> {
        self.shared.global().open_remaining(time::now())
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

    /// How long until `key`'s open or degraded circuit starts probing, if
    /// it exists and is open or degraded.
    pub fn open_remaining_of(&self, key: &K) -> Option<std::time::Duration> {
        self.shared.existing(key)?.open_remaining(time::now())
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

    /// Trips the (unkeyed) circuit until `until`: see
    /// [`BreakerHandle::trip_key_until`].
    pub fn trip_until(&self, until: Instant) -> Option<Transition> {
        self.trip(None, until)
    }

    /// Trips `key`'s circuit (creating it if needed) as the trip action
    /// says, open or degraded, with probes starting at `until` instead of
    /// after the open duration; or, when it is already open or degraded
    /// with probes starting earlier, makes it wait until `until`. This is
    /// how breakers that must agree (replicas of a service, each with its
    /// own breaker) share their state: each publishes the deadline of its
    /// trips (from [`CircuitBreakerLayer::on_state_change`]: the time of
    /// the change plus [`Transition::open_for`]) and applies the others'
    /// with this method. The gateway does so through Redis.
    ///
    /// A circuit tripped this way behaves as if it had tripped itself once
    /// (calls in flight stop counting; from `until`, admitted calls are
    /// probes; a failed probe opens it for the next, longer, open
    /// duration). Nothing changes, and `None` is returned, when `until` is
    /// not in the future, when the circuit already waits at least that
    /// long, or when it is forced open or closed. The change is logged but
    /// does not run the state-change callback (a callback that publishes
    /// the state would echo it back); the returned [`Transition`] says what
    /// changed.
    ///
    /// [`CircuitBreakerLayer::on_state_change`]: super::CircuitBreakerLayer::on_state_change
    ///
    /// # Example
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// use std::num::NonZeroUsize;
    /// use std::time::Duration;
    /// use tower_qwen::circuit_breaker::{CircuitBreakerLayer, State, TripAction};
    /// use tower_qwen::key::ByModel;
    /// use tower_qwen::time;
    ///
    /// use std::sync::Arc;
    /// use std::sync::atomic::{AtomicU32, Ordering};
    ///
    /// let changes = Arc::new(AtomicU32::new(0));
    /// let seen = changes.clone();
    /// let layer = CircuitBreakerLayer::new()
    ///     .trip_action(TripAction::degrade())
    ///     .keyed(ByModel, NonZeroUsize::new(64).unwrap())
    ///     .on_state_change(move |_, _| {
    ///         seen.fetch_add(1, Ordering::Relaxed);
    ///     });
    /// let handle = layer.handle();
    /// let key: Option<Arc<str>> = Some("qwen-plus".into());
    /// // Another replica degraded qwen-plus for 5 s from now.
    /// let until = time::now() + Duration::from_secs(5);
    /// let t = handle.trip_key_until(&key, until).unwrap();
    /// assert_eq!((t.from, t.to), (State::Closed, State::Degraded));
    /// assert_eq!(handle.state_of(&key), Some(State::Degraded));
    /// assert_eq!(handle.open_remaining_of(&key), Some(Duration::from_secs(5)));
    /// assert_eq!(changes.load(Ordering::Relaxed), 0, "no callback: no echo");
    /// // An earlier deadline changes nothing.
    /// assert!(handle.trip_key_until(&key, until - Duration::from_secs(1)).is_none());
    /// # }
    /// ```
    pub fn trip_key_until(&self, key: &K, until: Instant) -> Option<Transition> {
        self.trip(Some(key), until)
    }

    fn trip(&self, key: Option<&K>, until: Instant) -> Option<Transition> {
        let keyed = self.shared.is_keyed();
        let now = time::now();
        let t = match key {
            Some(k) if keyed => self
                .shared
                .circuit(k)
                .trip_until(&self.shared.cfg, until, now),
            _ => self
                .shared
                .global()
                .trip_until(&self.shared.cfg, until, now),
        }?;
        tracing::info!(
            from = ?t.from, to = ?t.to, open_for = ?t.open_for, trips = t.trips, keyed,
            "circuit tripped through its handle (a shared state)"
        );
        Some(t)
    }

    /// How many keyed circuits exist.
    pub fn keys(&self) -> usize {
        self.shared
            .circuits
            .keyed
            .as_ref()
            .map_or(0, |m| m.store.len())
    }

    fn force(&self, key: Option<&K>, to: State) {
        let t = match key {
            Some(k) if self.shared.is_keyed() => self.shared.circuit(k).force(to),
            _ => self.shared.global().force(to),
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
            .field("global", self.shared.global())
            .field("keyed", &self.shared.is_keyed())
            .finish()
    }
}

impl<K> fmt::Debug for Shared<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("cfg", &self.cfg)
            .field("global", &self.circuits.global)
            .finish_non_exhaustive()
    }
}
