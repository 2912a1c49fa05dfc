//! State shared by every connection: the configuration (changeable at run
//! time), the quota windows, async tasks and counters.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, UNIX_EPOCH};

use super::config::{AccountState, BurstGuard, FaultPlan, Quota};
use super::error::ApiError;
use super::models::{ModelInfo, ModelKind, NativeModelError};
use super::quota::{Throttle, Window};
use super::script::{Reply, Script, ScriptRequest, ScriptRun};
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
    /// The catalogue, by name.
    pub(crate) models: BTreeMap<String, ModelInfo>,
    /// Serve unknown models as [`ModelInfo::any`].
    pub(crate) any_model: bool,
    pub(crate) native_model_error: NativeModelError,
    pub(crate) default_embedding_limit: u32,
    pub(crate) default_dimension: u32,
    pub(crate) output_tokens: u32,
    pub(crate) reasoning_tokens: u32,
    /// `finish_reason` of a forced `tool_choice` in compatible mode.
    pub(crate) compatible_forced_finish: &'static str,
    pub(crate) json_schema_needs_word: bool,
    pub(crate) seed: u64,
    pub(crate) faults: Arc<FaultPlan>,
    pub(crate) model_faults: HashMap<String, Arc<FaultPlan>>,
    pub(crate) script: Script,
    pub(crate) task_pending: Duration,
    pub(crate) task_running: Duration,
    pub(crate) body_limit: usize,
    pub(crate) stream_errors_as_sse: bool,
    pub(crate) sse_without_blank_lines: bool,
    pub(crate) batch: super::batch::Settings,
}

/// The key every mock accepts unless keys are configured.
pub(crate) const DEFAULT_KEY: &str = "sk-mock";

impl Default for Config {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            accept_any_key: false,
            default_quota: Quota::unlimited(),
            quotas: HashMap::new(),
            burst: None,
            models: ModelInfo::catalogue()
                .into_iter()
                .map(|m| (m.name().to_owned(), m))
                .collect(),
            any_model: false,
            native_model_error: NativeModelError::default(),
            default_embedding_limit: 10,
            default_dimension: 1024,
            output_tokens: 20,
            reasoning_tokens: 12,
            compatible_forced_finish: "stop",
            json_schema_needs_word: false,
            seed: 0,
            faults: Arc::new(FaultPlan::default()),
            model_faults: HashMap::new(),
            script: Script::new(),
            task_pending: Duration::from_secs(1),
            task_running: Duration::from_secs(3),
            body_limit: 8 << 20,
            stream_errors_as_sse: false,
            sse_without_blank_lines: false,
            batch: Default::default(),
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

    /// The model as served at an endpoint of `kind`, or the service's "not
    /// found" error in `protocol`'s shape. A model of another kind does not
    /// exist for that endpoint (an inferred rule).
    pub(crate) fn model_for(
        &self,
        model: &str,
        kind: ModelKind,
        protocol: crate::request::Protocol,
    ) -> Result<ModelInfo, ApiError> {
        match self.models.get(model) {
            Some(m) if m.serves(kind) => return Ok(m.clone()),
            None if self.any_model => {
                let mut m = ModelInfo::any(model);
                if kind == ModelKind::Embedding {
                    m = m.embedding_batch_limit(
                        std::num::NonZeroU32::new(self.default_embedding_limit)
                            .unwrap_or(std::num::NonZeroU32::MIN),
                    );
                }
                return Ok(m);
            }
            _ => {}
        }
        Err(match (protocol, self.native_model_error) {
            (crate::request::Protocol::Native, NativeModelError::InvalidParameter) => {
                ApiError::model_not_exist()
            }
            _ => ApiError::model_not_found(model),
        })
    }
}

/// An async task (`X-DashScope-Async: enable`).
#[derive(Clone, Debug)]
pub(crate) struct Task {
    pub(crate) account: Arc<str>,
    pub(crate) model: String,
    pub(crate) submitted: Instant,
    pub(crate) canceled: bool,
    /// Set when a script made the task fail.
    pub(crate) failure: Option<ApiError>,
}

/// A task's status at some instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TaskStatus {
    Pending,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl TaskStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Succeeded => "SUCCEEDED",
            Self::Failed => "FAILED",
            Self::Canceled => "CANCELED",
        }
    }
}

/// One task as listed or polled.
#[derive(Clone, Debug)]
pub(crate) struct TaskView {
    pub(crate) id: String,
    pub(crate) model: String,
    pub(crate) status: TaskStatus,
    pub(crate) failure: Option<ApiError>,
    /// Seconds since the server started, at submission.
    pub(crate) submitted_secs: u64,
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
    script: Mutex<ScriptRun>,
    pub(crate) counters: Counters,
    pub(crate) batches: super::batch::Store,
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
        let script = Mutex::new(ScriptRun::new(&cfg.script));
        Self {
            cfg: RwLock::new(cfg),
            windows: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            script,
            counters: Counters::default(),
            batches: Default::default(),
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

    /// Replaces the script being played (and restarts its count).
    pub(crate) fn set_script(&self, script: &Script) {
        *lock(&self.script) = ScriptRun::new(script);
    }

    /// Numbers a request among the requests the script sees, and asks the
    /// script about it (`view` builds the request's view from its number).
    pub(crate) fn script<'a>(&self, view: impl FnOnce(u64) -> ScriptRequest<'a>) -> Option<Reply> {
        let mut run = lock(&self.script);
        let seq = run.next_seq();
        if run.is_empty() {
            return None;
        }
        run.decide(&view(seq))
    }

    pub(crate) fn add_task(
        &self,
        id: String,
        account: Arc<str>,
        model: String,
        failure: Option<ApiError>,
    ) {
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
                model,
                submitted: now,
                canceled: false,
                failure,
            },
        );
    }

    fn view(
        &self,
        id: &str,
        t: &Task,
        now: Instant,
        pending: Duration,
        running: Duration,
    ) -> TaskView {
        TaskView {
            id: id.to_owned(),
            model: t.model.clone(),
            status: status_at(t, now, pending, running),
            failure: t.failure.clone(),
            submitted_secs: (t.submitted - self.t0).as_secs(),
        }
    }

    /// Task `id` as seen by `account`.
    pub(crate) fn task(&self, id: &str, account: &str) -> Option<TaskView> {
        let (pending, running) = {
            let cfg = self.cfg();
            (cfg.task_pending, cfg.task_running)
        };
        let tasks = lock(&self.tasks);
        let t = tasks.get(id).filter(|t| &*t.account == account)?;
        Some(self.view(id, t, time::now(), pending, running))
    }

    /// Every task of `account`, oldest first (ties by id).
    pub(crate) fn tasks_of(&self, account: &str) -> Vec<TaskView> {
        let (pending, running) = {
            let cfg = self.cfg();
            (cfg.task_pending, cfg.task_running)
        };
        let now = time::now();
        let tasks = lock(&self.tasks);
        let mut out: Vec<(Instant, TaskView)> = tasks
            .iter()
            .filter(|(_, t)| &*t.account == account)
            .map(|(id, t)| (t.submitted, self.view(id, t, now, pending, running)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.id.cmp(&b.1.id)));
        out.into_iter().map(|(_, v)| v).collect()
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
    } else if t.failure.is_some() {
        TaskStatus::Failed
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
