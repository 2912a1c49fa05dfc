use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tower_layer::Layer;

use super::service::Batch;
use super::store::{BatchStore, DEFAULT_STORE_PATH, FileStore};

/// The settings shared by a [`Batch`] service and its clones.
#[derive(Clone)]
pub(crate) struct Config {
    pub(crate) max_lines: usize,
    pub(crate) max_bytes: usize,
    pub(crate) max_line_bytes: usize,
    pub(crate) max_wait: Duration,
    pub(crate) max_groups: usize,
    pub(crate) window: Duration,
    pub(crate) poll_initial: Duration,
    pub(crate) poll_max: Duration,
    pub(crate) attempts: u32,
    pub(crate) base_path: Arc<str>,
    pub(crate) delete_files: bool,
    pub(crate) store: Arc<dyn BatchStore>,
}

impl Config {
    /// `completion_window` as the API takes it: whole hours.
    pub(crate) fn window(&self) -> String {
        format!("{}h", self.window.as_secs().div_ceil(3600).max(1))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            max_lines: 50_000,
            max_bytes: 500_000_000,
            max_line_bytes: 6_000_000,
            max_wait: Duration::from_secs(30),
            max_groups: 64,
            window: Duration::from_secs(24 * 3600),
            poll_initial: Duration::from_secs(5),
            poll_max: Duration::from_secs(300),
            attempts: 5,
            base_path: Arc::from("/compatible-mode/v1"),
            delete_files: true,
            store: Arc::new(FileStore::new(PathBuf::from(DEFAULT_STORE_PATH))),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("max_lines", &self.max_lines)
            .field("max_bytes", &self.max_bytes)
            .field("max_line_bytes", &self.max_line_bytes)
            .field("max_wait", &self.max_wait)
            .field("max_groups", &self.max_groups)
            .field("window", &self.window)
            .field("poll_initial", &self.poll_initial)
            .field("poll_max", &self.poll_max)
            .field("attempts", &self.attempts)
            .field("base_path", &self.base_path)
            .field("delete_files", &self.delete_files)
            .finish_non_exhaustive()
    }
}

/// Builds [`Batch`] services: requests that can wait, sent through
/// DashScope's Batch API. See the [module docs](super) for an example.
///
/// # Default
///
/// Files of at most 50,000 lines and 500 MB, lines of at most 6 MB
/// (DashScope's caps), flushed after 30 s; at most 64 files filling at
/// once; a 24 h completion window; polls every 5 s at first, backing off to
/// every 5 min; 5 attempts per Files/Batch API call; the API under
/// `/compatible-mode/v1`; files deleted once collected; batches remembered
/// in [`FileStore`] at `tower-qwen-batches.json` in the working directory.
///
/// # Clone
///
/// A clone makes services with separate workers and counters (but the same
/// store: give each service its own).
#[derive(Clone, Debug, Default)]
pub struct BatchLayer {
    config: Arc<Config>,
}

impl BatchLayer {
    /// A layer with the [defaults](Self#default).
    pub fn new() -> Self {
        Self::default()
    }

    fn edit(mut self, f: impl FnOnce(&mut Config)) -> Self {
        f(Arc::make_mut(&mut self.config));
        self
    }

    /// The most lines in one file.
    ///
    /// Default is 50,000 (DashScope's cap).
    pub fn max_lines(self, n: NonZeroUsize) -> Self {
        self.edit(|c| c.max_lines = n.get())
    }

    /// The most bytes in one file (the JSONL content).
    ///
    /// Default is 500 MB (DashScope's cap).
    pub fn max_bytes(self, n: NonZeroUsize) -> Self {
        self.edit(|c| c.max_bytes = n.get())
    }

    /// The largest line (a request with its `custom_id`, method and url);
    /// larger requests are refused with
    /// [`BatchError::is_unsupported`](super::error::BatchError::is_unsupported).
    ///
    /// Default is 6 MB (DashScope's cap).
    pub fn max_line_bytes(self, n: NonZeroUsize) -> Self {
        self.edit(|c| c.max_line_bytes = n.get())
    }

    /// How long the first line of a file waits for others before the file
    /// is sent anyway.
    ///
    /// Default is 30 s.
    pub fn max_wait(self, d: Duration) -> Self {
        self.edit(|c| c.max_wait = d)
    }

    /// The most files filling at once (one per endpoint and model); a new
    /// one sends the oldest first.
    ///
    /// Default is 64.
    pub fn max_open_files(self, n: NonZeroUsize) -> Self {
        self.edit(|c| c.max_groups = n.get())
    }

    /// The batches' completion window, sent in whole hours (DashScope
    /// accepts 24 h and more; see its docs).
    ///
    /// Default is 24 h.
    pub fn completion_window(self, d: Duration) -> Self {
        self.edit(|c| c.window = d)
    }

    /// The first wait before polling a batch, and the longest; each poll of
    /// an unfinished batch doubles the wait up to `max`.
    ///
    /// Default is 5 s, then up to 5 min.
    pub fn poll_interval(self, initial: Duration, max: Duration) -> Self {
        self.edit(|c| {
            c.poll_initial = initial.max(Duration::from_millis(1));
            c.poll_max = max.max(c.poll_initial);
        })
    }

    /// Attempts per Files/Batch API call (upload, create, download,
    /// cancel) when it fails transiently; the wait doubles from the first
    /// poll interval.
    ///
    /// Default is 5.
    pub fn attempts(self, n: NonZeroU32) -> Self {
        self.edit(|c| c.attempts = n.get())
    }

    /// The path the Files and Batch API live under, on the inner service.
    ///
    /// Default is `/compatible-mode/v1`.
    pub fn base_path(self, path: &str) -> Self {
        let path: Arc<str> = Arc::from(path.trim_end_matches('/'));
        self.edit(|c| c.base_path = path)
    }

    /// Whether the input, output and error files are deleted upstream once
    /// every line was handed out.
    ///
    /// Default is `true`.
    pub fn delete_files(self, yes: bool) -> Self {
        self.edit(|c| c.delete_files = yes)
    }

    /// Where submitted batches are remembered for
    /// [`Batch::resume`].
    ///
    /// Default is a [`FileStore`] at `tower-qwen-batches.json` in the
    /// working directory.
    pub fn store(self, store: impl BatchStore) -> Self {
        let store: Arc<dyn BatchStore> = Arc::new(store);
        self.edit(|c| c.store = store)
    }
}

impl<S> Layer<S> for BatchLayer {
    type Service = Batch<S>;

    fn layer(&self, inner: S) -> Batch<S> {
        Batch::with_config(inner, self.config.clone())
    }
}
