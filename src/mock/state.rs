//! State shared by every connection: the configuration (changeable at run
//! time), the quota windows, async tasks and counters.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, UNIX_EPOCH};

use super::config::{AccountState, BurstGuard, FaultPlan, Quota};
use super::quota::{Throttle, Window};
use super::stats::Counters;
use crate::time::{self, Instant};
use crate::util::rng::{Rng, SeededRng};

/// An API key's account and standing.
#[derive(Clone, Debug)]
pub(crate) struct KeyEntry {
    pub(crate) account: Arc<str>,
    pub(crate) state: AccountState,
}

/// Everything the builder sets; the handle may change it later.
#[derive(Clone, Debug)]
pub(crate) struct Config {
    pub(crate) keys: HashMap<String, KeyEntry>,
    pub(crate) accept_any_key: bool,
    pub(crate) default_quota: Quota,
    pub(crate) quotas: HashMap<String, Quota>,
    pub(crate) burst: Option<BurstGuard>,
    pub(crate) models: Option<HashSet<String>>,
    pub(crate) stream_only: HashSet<String>,
    pub(crate) embedding_limits: HashMap<String, u32>,
    pub(crate) default_embedding_limit: u32,
    pub(crate) default_dimension: u32,
    pub(crate) output_tokens: u32,
    pub(crate) seed: u64,
    pub(crate) faults: Arc<FaultPlan>,
    pub(crate) model_faults: HashMap<String, Arc<FaultPlan>>,
    pub(crate) task_pending: Duration,
    pub(crate) task_running: Duration,
    pub(crate) body_limit: usize,
    pub(crate) stream_errors_as_sse: bool,
}

/// The key every mock accepts unless keys are configured.
pub(crate) const DEFAULT_KEY: &str = "sk-mock";

impl Default for Config {
    fn default() -> Self {
        let mut embedding_limits = HashMap::new();
        for (m, n) in [
            ("text-embedding-v1", 25),
            ("text-embedding-v2", 25),
            ("text-embedding-v3", 10),
            ("text-embedding-v4", 10),
        ] {
            embedding_limits.insert(m.to_owned(), n);
        }
        let stream_only = [
            "qwq-plus",
            "qwq-plus-latest",
            "qwq-32b",
            "qvq-max",
            "qvq-max-latest",
            "qvq-plus",
            "qwen-omni-turbo",
            "qwen-omni-turbo-latest",
            "qwen3-omni-flash",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        Self {
            keys: HashMap::new(),
            accept_any_key: false,
            default_quota: Quota::unlimited(),
            quotas: HashMap::new(),
            burst: None,
            models: None,
            stream_only,
            embedding_limits,
            default_embedding_limit: 10,
            default_dimension: 1024,
            output_tokens: 20,
            seed: 0,
            faults: Arc::new(FaultPlan::default()),
            model_faults: HashMap::new(),
            task_pending: Duration::from_secs(1),
            task_running: Duration::from_secs(3),
            body_limit: 8 << 20,
            stream_errors_as_sse: false,
        }
    }
}

impl Config {
    /// The account behind `key`, if the key is valid.
    pub(crate) fn key(&self, key: &str) -> Option<KeyEntry> {
        if let Some(e) = self.keys.get(key) {
            return Some(e.clone());
        }
        if self.accept_any_key && !key.is_empty() {
            return Some(KeyEntry {
                account: Arc::from(key),
                state: AccountState::Active,
            });
        }
        if self.keys.is_empty() && key == DEFAULT_KEY {
            return Some(KeyEntry {
                account: Arc::from("default"),
                state: AccountState::Active,
            });
        }
        None
    }

    pub(crate) fn quota(&self, model: &str) -> Quota {
        self.quotas
            .get(model)
            .copied()
            .unwrap_or(self.default_quota)
    }

    pub(crate) fn plan(&self, model: &str) -> Arc<FaultPlan> {
        self.model_faults.get(model).unwrap_or(&self.faults).clone()
    }

    pub(crate) fn model_exists(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.contains(model))
    }

    pub(crate) fn embedding_limit(&self, model: &str) -> u32 {
        self.embedding_limits
            .get(model)
            .copied()
            .unwrap_or(self.default_embedding_limit)
    }
}

/// An async task (`X-DashScope-Async: enable`).
#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub(crate) account: Arc<str>,
    pub(crate) submitted: Instant,
    pub(crate) canceled: bool,
}

/// A task's status at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskStatus {
    Pending,
    Running,
    Succeeded,
    Canceled,
}

impl TaskStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Canceled => "CANCELED",
        }
    }
}

const MAX_TASKS: usize = 10_000;
const MAX_WINDOWS: usize = 4_096;

/// Quota windows by account, then model.
type Windows = HashMap<Arc<str>, HashMap<Box<str>, Window>>;

/// State shared by all connections.
#[derive(Debug)]
pub(crate) struct Shared {
    cfg: RwLock<Config>,
    windows: Mutex<Windows>,
    tasks: Mutex<HashMap<String, Task>>,
    pub(crate) counters: Counters,
    seq: AtomicU64,
    t0: Instant,
    created0: u64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(crate) fn new(cfg: Config) -> Self {
        let created0 = time::system_now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Self {
            cfg: RwLock::new(cfg),
            windows: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            seq: AtomicU64::new(0),
            t0: time::now(),
            created0,
        }
    }

    pub(crate) fn cfg(&self) -> RwLockReadGuard<'_, Config> {
        self.cfg.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn cfg_mut(&self) -> RwLockWriteGuard<'_, Config> {
        self.cfg.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The next request's sequence number.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// Whole seconds since the server started: the quota clock.
    pub(crate) fn second(&self) -> u64 {
        (time::now() - self.t0).as_secs()
    }

    /// The `created` timestamp of compatible responses.
    pub(crate) fn created(&self) -> u64 {
        self.created0 + self.second()
    }

    /// Admits a request of `tokens` for (account, model), charging it.
    pub(crate) fn admit(
        &self,
        account: &Arc<str>,
        model: &str,
        tokens: u64,
        quota: &Quota,
        burst: Option<&BurstGuard>,
    ) -> Result<(), Throttle> {
        if quota.rpm().is_none() && quota.tpm().is_none() && burst.is_none() {
            return Ok(());
        }
        let now = self.second();
        let mut all = lock(&self.windows);
        let models = match all.get_mut(account) {
            Some(m) => m,
            None => all.entry(account.clone()).or_default(),
        };
        if models.len() >= MAX_WINDOWS && !models.contains_key(model) {
            models.retain(|_, w| w.last_second() + 60 > now);
        }
        let window = match models.get_mut(model) {
            Some(w) => w,
            None => models.entry(Box::from(model)).or_default(),
        };
        window.try_admit(now, tokens, quota, burst)
    }

    /// Forgets all quota usage.
    pub(crate) fn clear_windows(&self) {
        lock(&self.windows).clear();
    }

    pub(crate) fn add_task(&self, id: String, account: Arc<str>) {
        let now = time::now();
        let keep = {
            let cfg = self.cfg();
            cfg.task_pending + cfg.task_running + Duration::from_secs(3600)
        };
        let mut tasks = lock(&self.tasks);
        if tasks.len() >= MAX_TASKS {
            tasks.retain(|_, t| now - t.submitted < keep);
        }
        tasks.insert(
            id,
            Task {
                account,
                submitted: now,
                canceled: false,
            },
        );
    }

    /// The status of task `id` as seen by `account`.
    pub(crate) fn task_status(&self, id: &str, account: &str) -> Option<TaskStatus> {
        let (pending, running) = {
            let cfg = self.cfg();
            (cfg.task_pending, cfg.task_running)
        };
        let tasks = lock(&self.tasks);
        let t = tasks.get(id).filter(|t| &*t.account == account)?;
        Some(status_at(t, time::now(), pending, running))
    }

    /// Cancels a PENDING task; returns its status before the call.
    pub(crate) fn cancel_task(&self, id: &str, account: &str) -> Option<TaskStatus> {
        let (pending, running) = {
            let cfg = self.cfg();
            (cfg.task_pending, cfg.task_running)
        };
        let mut tasks = lock(&self.tasks);
        let t = tasks.get_mut(id).filter(|t| &*t.account == account)?;
        let status = status_at(t, time::now(), pending, running);
        if status == TaskStatus::Pending {
            t.canceled = true;
        }
        Some(status)
    }
}

fn status_at(t: &Task, now: Instant, pending: Duration, running: Duration) -> TaskStatus {
    let age = now - t.submitted;
    if t.canceled {
        TaskStatus::Canceled
    } else if age < pending {
        TaskStatus::Pending
    } else if age < pending + running {
        TaskStatus::Running
    } else {
        TaskStatus::Succeeded
    }
}

/// A generator for one request, determined by the seed and the request's
/// sequence number (and a stream tag, so ids and faults are independent).
pub(crate) fn request_rng(seed: u64, seq: u64, stream: u64) -> SeededRng {
    let mut r = SeededRng::new(
        seed ^ seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ stream.wrapping_mul(0xD6E8_FEB8_6659_FD93),
    );
    r.next_u64();
    r
}

/// A UUID-shaped id from a generator.
pub(crate) fn uuid(rng: &mut impl Rng) -> String {
    let a = rng.next_u64();
    let b = rng.next_u64();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}
