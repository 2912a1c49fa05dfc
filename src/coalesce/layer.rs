use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::Coalesce;

/// Applies [`Coalesce`] to a service. See the [module docs](super) for an
/// example.
///
/// # Default
///
/// Max wait 5 ms; batch caps 25 texts for `text-embedding-v1`/`v2`, 10 for
/// `text-embedding-v3`/`v4` and for any other model; at most 1024 texts
/// waiting.
///
/// # Clone
///
/// Cheap (the configuration is behind an `Arc`). Each service the layer
/// makes has its own batcher, shared by that service's clones.
#[derive(Clone)]
pub struct CoalesceLayer {
    config: Arc<Config>,
}

#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) max_wait: Duration,
    default_max_batch: NonZeroUsize,
    max_batch: HashMap<Box<str>, NonZeroUsize>,
    pub(crate) queue_capacity: NonZeroUsize,
}

impl Config {
    /// The configured cap for `model`.
    pub(crate) fn max_batch_for(&self, model: &str) -> usize {
        self.max_batch
            .get(model)
            .copied()
            .unwrap_or(self.default_max_batch)
            .get()
    }
}

impl Default for Config {
    fn default() -> Self {
        let caps = [
            ("text-embedding-v1", 25),
            ("text-embedding-v2", 25),
            ("text-embedding-v3", 10),
            ("text-embedding-v4", 10),
        ];
        Self {
            max_wait: Duration::from_millis(5),
            default_max_batch: NonZeroUsize::new(10).unwrap_or(NonZeroUsize::MIN),
            max_batch: caps
                .into_iter()
                .filter_map(|(m, n)| Some((Box::from(m), NonZeroUsize::new(n)?)))
                .collect(),
            queue_capacity: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

impl CoalesceLayer {
    /// A layer with the defaults (see [`# Default`](Self#default)).
    pub fn new() -> Self {
        Self {
            config: Arc::new(Config::default()),
        }
    }

    fn config_mut(&mut self) -> &mut Config {
        Arc::make_mut(&mut self.config)
    }

    /// How long the first text of a batch waits for others before the
    /// batch is sent anyway. `Duration::ZERO` merges only what arrives
    /// together.
    ///
    /// Default is 5 ms.
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.config_mut().max_wait = wait;
        self
    }

    /// The most texts one request for `model` may carry (DashScope's
    /// "rows per request"): a batch is sent as soon as it holds that many,
    /// and a request carrying more is split into requests of at most that
    /// many.
    ///
    /// Default is 25 for `text-embedding-v1` and `text-embedding-v2`, 10 for
    /// `text-embedding-v3` and `text-embedding-v4` (QWEN-API.md A6); other
    /// models use [`default_max_batch`](Self::default_max_batch). Treat
    /// these as configuration: they change by region and date. If the
    /// upstream refuses a batch as too large and states its limit, the
    /// layer splits the batch and uses the lower limit from then on.
    pub fn max_batch(mut self, model: impl Into<String>, texts: NonZeroUsize) -> Self {
        self.config_mut()
            .max_batch
            .insert(model.into().into_boxed_str(), texts);
        self
    }

    /// The cap of models without their own [`max_batch`](Self::max_batch).
    ///
    /// Default is 10.
    pub fn default_max_batch(mut self, texts: NonZeroUsize) -> Self {
        self.config_mut().default_max_batch = texts;
        self
    }

    /// The most single-text requests inside the layer at once (waiting to
    /// be merged, or waiting for their merged call to answer). Further
    /// callers wait, in their response future, for a slot.
    ///
    /// Default is 1024.
    pub fn queue_capacity(mut self, texts: NonZeroUsize) -> Self {
        self.config_mut().queue_capacity = texts;
        self
    }
}

impl Default for CoalesceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for CoalesceLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CoalesceLayer")
            .field("max_wait", &self.config.max_wait)
            .field("default_max_batch", &self.config.default_max_batch)
            .field("max_batch", &self.config.max_batch)
            .field("queue_capacity", &self.config.queue_capacity)
            .finish()
    }
}

impl<S> Layer<S> for CoalesceLayer {
    type Service = Coalesce<S>;

    fn layer(&self, inner: S) -> Coalesce<S> {
        Coalesce::with_config(inner, self.config.clone())
    }
}
