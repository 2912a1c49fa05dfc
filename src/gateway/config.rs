//! The gateway's configuration: TOML read by serde into the structs of
//! [`file`] (unknown fields denied), the environment laid over it, then
//! one validation pass. Every bad or unknown field is named, with its path
//! (and the environment variable it came from, when it did).

mod file;
mod show;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::path::Path;
use std::time::Duration;

use http::HeaderValue;
use serde_path_to_error::Segment;

use crate::client::{ApiKey, BaseUrl, Region};
use crate::rate_limit::{BudgetLimits, Limits, Period, Quota, QuotaTable, WallClock, qwen_limits};

use super::auth::{KeyDigest, digest_of, parse_digest};
use super::error::ConfigError;
use file::{AccountFile, FailureMode, File, KeyFile, QuotaMode};

/// The prefix of environment variables that override scalar settings:
/// `QWEN_GATEWAY_<SECTION>_<FIELD>`, e.g. `QWEN_GATEWAY_SERVER_LISTEN`,
/// `QWEN_GATEWAY_UPSTREAM_BASE_URL` or `QWEN_GATEWAY_REDIS_URL`.
pub const ENV_PREFIX: &str = "QWEN_GATEWAY";

/// A validated gateway configuration. See the [module docs](super) for the
/// file format and an example.
///
/// Built only by parsing ([`GatewayConfig::from_toml`],
/// [`GatewayConfig::load`]), so a value of this type is always valid. Its
/// `Debug` output shows no key material: client keys appear by their
/// redacted id, upstream keys by [`ApiKey`]'s, the Redis URL not at all.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub(crate) server: ServerConfig,
    pub(crate) upstream: UpstreamConfig,
    pub(crate) degrade: DegradeConfig,
    pub(crate) redis: Option<RedisConfig>,
    /// `[metrics] key_series`: how many keys get their own series unless
    /// they say otherwise.
    pub(crate) key_series: usize,
    pub(crate) accounts: Vec<AccountConfig>,
    pub(crate) keys: Vec<ClientKeyConfig>,
    /// The clock of the token budgets' calendar windows (`None`: the
    /// system's, read when the gateway is built).
    pub(crate) wall_clock: Option<WallClock>,
    /// `[telemetry] genai_spans`: a GenAI span per proxied call.
    pub(crate) genai_spans: bool,
    /// `[telemetry] otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`): the
    /// OTLP collector's base URL, `http://` only.
    pub(crate) otlp_endpoint: Option<String>,
    /// `[telemetry] service_name` (or `OTEL_SERVICE_NAME`).
    pub(crate) service_name: String,
    /// Where the GenAI metrics and OpenTelemetry spans go, if anywhere.
    #[cfg(feature = "otel")]
    pub(crate) otel: Option<crate::telemetry::otel::GenAiOtel>,
}

#[derive(Clone, Debug)]
pub(crate) struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) max_body_bytes: usize,
    /// A Files API upload at most (streamed through).
    pub(crate) max_file_bytes: u64,
    pub(crate) max_header_bytes: usize,
    pub(crate) body_read_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    /// Open client connections at most (`Gateway::serve`).
    pub(crate) max_connections: usize,
    /// Failed authentications a client address may make per minute (a
    /// burst of as many), then 429; 0: no limit.
    pub(crate) max_auth_failures_per_minute: u32,
    /// Threads of the `qwen-gateway` program's runtime (0: one per CPU).
    pub(crate) worker_threads: usize,
}

#[derive(Clone, Debug)]
pub(crate) struct UpstreamConfig {
    pub(crate) base_url: BaseUrl,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) header_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) total_timeout: Option<Duration>,
    pub(crate) pool_max_idle_per_host: usize,
    pub(crate) pool_idle_timeout: Option<Duration>,
    /// How long a call may wait for its account's (account, model) budget.
    pub(crate) admission_wait: Option<Duration>,
}

/// A client key's token bucket: `capacity` requests at once, refilled at
/// `refill_per_second`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct BucketConfig {
    pub(crate) capacity: NonZeroU32,
    pub(crate) refill_per_second: f64,
}

impl BucketConfig {
    pub(crate) fn limits(&self) -> Limits {
        let interval = Duration::from_secs_f64(1.0 / self.refill_per_second);
        let quota = Quota::with_period(interval.max(Duration::from_nanos(1)))
            .unwrap_or(Quota::per_second(NonZeroU32::MAX))
            .allow_burst(self.capacity);
        Limits::requests(quota)
    }
}

/// A client key's token limits: tokens per minute (a bucket of `tpm`
/// refilled at `tpm` a minute) and budgets per UTC day and month.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct TokenConfig {
    pub(crate) tpm: Option<NonZeroU32>,
    pub(crate) budget: BudgetLimits,
}

impl TokenConfig {
    /// The token quota of the key's bucket (`None`: no TPM).
    pub(crate) fn quota(&self) -> Option<Quota> {
        self.tpm.map(|n| Quota::tokens_per_minute(n).allow_burst(n))
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct DegradeConfig {
    pub(crate) enabled: bool,
    pub(crate) consecutive_failures: NonZeroU32,
    pub(crate) rate_per_second: NonZeroU32,
    pub(crate) probe_after: Duration,
    pub(crate) probe_after_max: Duration,
    pub(crate) jitter: f64,
}

/// Where the replicas share their limits.
#[derive(Clone)]
pub(crate) struct RedisConfig {
    /// May hold a password: never shown.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) url: String,
    pub(crate) prefix: String,
    /// `Some(n)`: fail open at 1/n of each quota; `None`: fail closed.
    pub(crate) fail_open: Option<NonZeroU32>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) probe_every: Duration,
    #[cfg(feature = "redis")]
    pub(crate) clock: crate::redis::Clock,
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("prefix", &self.prefix)
            .field("fail_open", &self.fail_open)
            .field("timeout", &self.timeout)
            .field("probe_every", &self.probe_every)
            .finish_non_exhaustive()
    }
}

/// An upstream API key, checked; never shown.
#[derive(Clone)]
pub(crate) struct UpstreamKey(pub(crate) String);

impl fmt::Debug for UpstreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamKey(..)")
    }
}

#[derive(Clone, Debug)]
pub(crate) struct AccountConfig {
    pub(crate) name: String,
    pub(crate) keys: Vec<UpstreamKey>,
    pub(crate) workspace: Option<String>,
    /// `None`: no local limit toward the upstream.
    pub(crate) quotas: Option<QuotaTable>,
    /// Ramp up from a fraction of the quota after idle.
    pub(crate) slow_start: Option<Duration>,
    /// As written, for the effective configuration: whether the table
    /// starts from Qwen's published quotas, and the per-model overrides
    /// (RPM, TPM).
    pub(crate) qwen_quotas: bool,
    pub(crate) models: Vec<(String, Option<u64>, Option<u64>)>,
}

#[derive(Clone)]
pub(crate) struct ClientKeyConfig {
    pub(crate) name: String,
    pub(crate) digest: KeyDigest,
    pub(crate) accounts: Vec<usize>,
    pub(crate) bucket: BucketConfig,
    pub(crate) tokens: TokenConfig,
    /// The key's weight in its accounts' fair queues (default 1).
    pub(crate) weight: NonZeroU32,
    /// Whether the key has its own `/metrics` series (else it is counted
    /// under `key="_other"`).
    pub(crate) own_series: bool,
}

impl fmt::Debug for ClientKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKeyConfig")
            .field("name", &self.name)
            .field("id", &self.digest.redacted_id())
            .field("accounts", &self.accounts)
            .field("bucket", &self.bucket)
            .field("tokens", &self.tokens)
            .field("weight", &self.weight)
            .field("own_series", &self.own_series)
            .finish()
    }
}

impl GatewayConfig {
    /// Parses a TOML document, with overrides from the process environment
    /// (`QWEN_GATEWAY_<SECTION>_<FIELD>`, and the variables named by
    /// `*_env` fields).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] listing every bad or unknown field.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_with_env(text, |name| std::env::var(name).ok())
    }

    /// Like [`GatewayConfig::from_toml`], reading environment variables
    /// through `env` instead of the process environment (for tests and
    /// embedding).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] listing every bad or unknown field.
    pub fn from_toml_with_env(
        text: &str,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let mut root: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::one("toml", syntax_error(text, &e)))?;
        let mut problems = Problems::default();
        let sources = overlay_env(&mut root, &env);
        let cfg = deserialize(root, &sources, &mut problems)
            .and_then(|file| validate(file, &env, &mut problems));
        match cfg {
            Some(cfg) if problems.0.is_empty() => Ok(cfg),
            _ => Err(ConfigError::many(problems.in_file_order())),
        }
    }

    /// Reads and parses a TOML file (see [`GatewayConfig::from_toml`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the file cannot be read or is invalid.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        Self::load_with_env(path, |name| std::env::var(name).ok())
    }

    /// Like [`GatewayConfig::load`], reading environment variables through
    /// `env` (see [`GatewayConfig::from_toml_with_env`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the file cannot be read or is invalid.
    pub fn load_with_env(
        path: impl AsRef<Path>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one("file", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml_with_env(&text, env)
    }

    /// The address [`Gateway::serve_on`](super::Gateway::serve_on) binds.
    /// Default is `127.0.0.1:8080`.
    pub fn listen(&self) -> SocketAddr {
        self.server.listen
    }

    /// How long a graceful shutdown lets in-flight requests (streams
    /// included) finish. Default is 30 s.
    pub fn shutdown_grace(&self) -> Duration {
        self.server.shutdown_grace
    }

    /// `server.worker_threads`: how many threads the `qwen-gateway`
    /// program runs the gateway on. 1 is tokio's current-thread runtime:
    /// every connection, upstream call and timer on one thread, with no
    /// hand-off between threads, which costs the least CPU per request
    /// (BENCHMARKS.md, "The gateway hop"); `n` ≥ 2 a multi-thread runtime
    /// of `n` workers, for more than one core's worth of requests; 0 a
    /// multi-thread runtime with one worker per CPU the process may run on.
    /// Default is 1. [`Gateway::serve`] runs on the caller's runtime and
    /// does not read it.
    ///
    /// [`Gateway::serve`]: super::Gateway::serve
    pub fn worker_threads(&self) -> usize {
        self.server.worker_threads
    }

    /// Whether a `[redis]` section makes the replicas share their limits.
    pub fn has_redis(&self) -> bool {
        self.redis.is_some()
    }

    /// Where the GenAI spans and metrics are to be exported over OTLP
    /// (HTTP + protobuf): `[telemetry] otlp_endpoint` (or
    /// `QWEN_GATEWAY_TELEMETRY_OTLP_ENDPOINT`), else the standard
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` when neither is set or the
    /// file says `"off"`. Always an `http://` base URL without a trailing
    /// slash (`/v1/traces` and `/v1/metrics` go after it). A configuration
    /// that asks for it only validates in a build with the `otel` feature.
    ///
    /// The gateway does not export by itself: `qwen-gateway` builds
    /// `telemetry::otel::Otlp::http(endpoint, service_name)`, passes its
    /// providers with `GatewayConfig::otel` and shuts it down on exit; a
    /// program of your own does the same (feature `otel`).
    pub fn otlp_endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref()
    }

    /// The `service.name` of exported telemetry: `[telemetry]
    /// service_name`, else `OTEL_SERVICE_NAME`, else `qwen-gateway`.
    pub fn service_name(&self) -> &str {
        &self.service_name
    }

    /// The clock the client keys' token budgets read their UTC days and
    /// months from. Default is the system's, read when the gateway is
    /// built; tests pass [`WallClock::starting_at`] a chosen time, and move
    /// it across midnight with `tokio::time::advance` on a paused clock.
    pub fn wall_clock(mut self, clock: WallClock) -> Self {
        self.wall_clock = Some(clock);
        self
    }

    /// Records the GenAI metrics of every proxied call with `otel`, and,
    /// if it has a tracer, an OpenTelemetry span per call, a child of the
    /// client's `traceparent` when it sent one (see
    /// [`telemetry::otel`](crate::telemetry::otel)). Needs
    /// `[telemetry] genai_spans` (on by default). Default is none: the
    /// GenAI spans are `tracing` spans only.
    #[cfg(feature = "otel")]
    #[cfg_attr(docsrs, doc(cfg(feature = "otel")))]
    pub fn otel(mut self, otel: crate::telemetry::otel::GenAiOtel) -> Self {
        self.otel = Some(otel);
        self
    }

    /// Whose clock the Redis limits decide on. Default is
    /// [`Clock::Server`](crate::redis::Clock::Server), what replicas in
    /// separate processes need; [`Clock::Local`](crate::redis::Clock::Local)
    /// with one origin suits replicas in one process under a paused test
    /// clock (keys then stay an hour in Redis after they are full, as Redis
    /// expires them on its own clock). No effect without `[redis]`.
    #[cfg(feature = "redis")]
    #[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
    pub fn redis_clock(mut self, clock: crate::redis::Clock) -> Self {
        if let Some(r) = &mut self.redis {
            r.clock = clock;
        }
        self
    }
}

/// A TOML syntax error as its position and message, without the line
/// `toml` quotes with it: that line may hold a key (`api_key = "sk-.."
/// oops`), and an error message never shows one.
fn syntax_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(at) = e.span().map(|s| s.start.min(text.len())) else {
        return format!("TOML parse error: {message}");
    };
    let before = text.get(..at).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    format!("TOML parse error at line {line}, column {column}: {message}")
}

// ---------------------------------------------------------------------------
// Problems.

#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn bad(&mut self, field: impl Into<String>, why: impl Into<String>) {
        self.0.push((field.into(), why.into()));
    }

    /// The problems in the order of the sections and fields of the file
    /// format (as [`file::File`] declares them), whatever order they were
    /// found in; problems of one field keep their order.
    fn in_file_order(mut self) -> Vec<(String, String)> {
        fn segments(label: &str) -> (&str, &str) {
            let mut parts = label.split(['.', '[', ' ']);
            (parts.next().unwrap_or(""), parts.next().unwrap_or(""))
        }
        let sections = file::section_names();
        let fields = file::env_sections();
        self.0.sort_by_key(|(label, _)| {
            let (section, field) = segments(label);
            let s = sections
                .iter()
                .position(|&n| n == section)
                .unwrap_or(usize::MAX);
            let f = fields
                .iter()
                .find(|(n, _)| *n == section)
                .and_then(|(_, names)| names.iter().position(|&n| n == field))
                .unwrap_or(usize::MAX);
            (s, f)
        });
        self.0
    }

    fn has_under(&self, path: &str) -> bool {
        self.0.iter().any(|(f, _)| {
            f.strip_prefix(path)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[', ' ']))
        })
    }
}

// ---------------------------------------------------------------------------
// The environment, laid over the file.

/// A value taken from the environment: where it went, from which variable,
/// and its text.
struct EnvSource {
    path: [String; 2],
    var: String,
    text: String,
}

/// Sets `[section].field` from `QWEN_GATEWAY_<SECTION>_<FIELD>` for every
/// field of the overridable sections: a number or boolean when the text
/// reads as one, else a string.
fn overlay_env(root: &mut toml::Table, env: &dyn Fn(&str) -> Option<String>) -> Vec<EnvSource> {
    let mut sources = Vec::new();
    for (section, fields) in file::env_sections() {
        for &field in fields {
            let var = format!(
                "{ENV_PREFIX}_{}_{}",
                section.to_ascii_uppercase(),
                field.to_ascii_uppercase()
            );
            let Some(text) = env(&var) else { continue };
            let entry = root
                .entry(section)
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let toml::Value::Table(t) = entry {
                t.insert(field.to_owned(), env_literal(&text));
            }
            sources.push(EnvSource {
                path: [section.to_owned(), field.to_owned()],
                var,
                text,
            });
        }
    }
    sources
}

/// An environment value as TOML would read it bare: an integer, a float,
/// a boolean, or else the string itself.
fn env_literal(text: &str) -> toml::Value {
    let t = text.trim();
    let digits = t.replace('_', "");
    if let Ok(i) = digits.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    let numeric = !t.is_empty()
        && t.bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'));
    if numeric && let Ok(f) = t.parse::<f64>() {
        return toml::Value::Float(f);
    }
    match t {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => toml::Value::String(text.to_owned()),
    }
}

// ---------------------------------------------------------------------------
// Deserializing, every problem found.

/// A path into the document.
#[derive(Clone, Debug, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn show(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                s.push_str(k);
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// The field an "unknown field `x`, expected one of `a`, `b`" message is
/// about, and the expected names.
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (name, rest) = rest.split_once('`')?;
    let expected = rest
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect();
    Some((name.to_owned(), expected))
}

/// Removes (or, in an array, empties) the value at `path`; false when
/// there is nothing there.
fn remove(root: &mut toml::Table, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur: &mut toml::Value = match parents.first() {
        None => {
            return match last {
                Seg::Key(k) => root.remove(k).is_some(),
                Seg::Index(_) => false,
            };
        }
        Some(Seg::Key(k)) => match root.get_mut(k) {
            Some(v) => v,
            None => return false,
        },
        Some(Seg::Index(_)) => return false,
    };
    for seg in &parents[1..] {
        let next = match (seg, cur) {
            (Seg::Key(k), toml::Value::Table(t)) => t.get_mut(k),
            (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(v) => cur = v,
            None => return false,
        }
    }
    match (last, cur) {
        (Seg::Key(k), toml::Value::Table(t)) => t.remove(k).is_some(),
        (Seg::Index(i), toml::Value::Array(a)) if *i < a.len() => {
            // Keep the indices of the entries after it.
            a[*i] = toml::Value::Table(toml::Table::new());
            true
        }
        _ => false,
    }
}

/// Sets the value at `path` (a section field).
fn set(root: &mut toml::Table, path: &[String; 2], v: toml::Value) {
    if let Some(toml::Value::Table(t)) = root.get_mut(&path[0]) {
        t.insert(path[1].clone(), v);
    }
}

/// Reads the file with serde, as many times as it takes to find every bad
/// or unknown field: each pass reports the first problem serde meets, with
/// its path, and takes that field out (its default applies) for the next.
fn deserialize(
    mut root: toml::Table,
    sources: &[EnvSource],
    problems: &mut Problems,
) -> Option<File> {
    // Environment values retried as text, with what was wrong with them
    // as read first.
    let mut retyped: HashMap<usize, String> = HashMap::new();
    // Each pass removes a value, so the passes are bounded by the values.
    for _ in 0..10_000 {
        let doc = toml::Value::Table(root.clone());
        let err = match serde_path_to_error::deserialize::<_, File>(doc) {
            Ok(file) => return Some(file),
            Err(e) => e,
        };
        let mut path: Vec<Seg> = err
            .path()
            .iter()
            .filter_map(|s| match s {
                Segment::Seq { index } => Some(Seg::Index(*index)),
                Segment::Map { key } => Some(Seg::Key(key.clone())),
                Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
                Segment::Unknown => None,
            })
            .collect();
        let message = err.into_inner().message().trim_end().to_owned();
        let source = sources.iter().position(|s| {
            path.len() == 2
                && path[0] == Seg::Key(s.path[0].clone())
                && path[1] == Seg::Key(s.path[1].clone())
        });
        // An environment value read as a number or boolean may have been
        // meant as text: try it as a string once before reporting it (with
        // what was wrong with it as first read).
        let mut message = message;
        if let Some(i) = source {
            if let Some(first) = retyped.get(&i) {
                message = first.clone();
            } else if !matches!(env_literal(&sources[i].text), toml::Value::String(_)) {
                retyped.insert(i, message);
                set(
                    &mut root,
                    &sources[i].path,
                    toml::Value::String(sources[i].text.clone()),
                );
                continue;
            }
        }
        let why = match unknown_field(&message) {
            Some((name, expected)) => {
                // serde_path_to_error may or may not have the unknown key
                // as the path's last segment already.
                if path.last() != Some(&Seg::Key(name.clone())) {
                    path.push(Seg::Key(name));
                }
                if path.len() == 1 {
                    format!("unknown section (expected one of: {})", expected.join(", "))
                } else {
                    format!("unknown field (expected one of: {})", expected.join(", "))
                }
            }
            None => message,
        };
        let label = match source {
            Some(i) => format!("{} (from {})", show(&path), sources[i].var),
            None => show(&path),
        };
        problems.bad(label, why);
        if !remove(&mut root, &path) {
            return None;
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Validation: what depends on more than one field, in one pass.

fn validate(
    f: File,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Option<GatewayConfig> {
    let server = ServerConfig {
        listen: f.server.listen,
        max_body_bytes: f.server.max_body_bytes.get() as usize,
        max_file_bytes: f.server.max_file_bytes.get(),
        max_header_bytes: f.server.max_header_bytes.get() as usize,
        body_read_timeout: f.server.body_read_timeout.0,
        shutdown_grace: f.server.shutdown_grace.0.unwrap_or(Duration::ZERO),
        max_connections: f
            .server
            .max_connections
            .map_or_else(super::serve::default_max_connections, |n| n.get() as usize),
        max_auth_failures_per_minute: f.server.max_auth_failures_per_minute.get() as u32,
        worker_threads: f.server.worker_threads.get() as usize,
    };

    let up = &f.upstream;
    let base_url = match (&up.base_url, &up.region) {
        (Some(_), Some(_)) => {
            p.bad(
                "upstream.base_url",
                "set either base_url or region, not both",
            );
            None
        }
        (Some(b), None) => match b.parse::<BaseUrl>() {
            Ok(u) => Some(u),
            Err(e) => {
                // A URL may carry credentials (`https://user:secret@host`):
                // such a value is never echoed.
                if b.contains('@') {
                    p.bad(
                        "upstream.base_url",
                        format!("(a URL with credentials, not shown): {e}"),
                    );
                } else {
                    p.bad("upstream.base_url", format!("{b:?}: {e}"));
                }
                None
            }
        },
        (None, Some(r)) => match r.parse::<Region>() {
            Ok(r) => Some(BaseUrl::region(r)),
            Err(e) => {
                p.bad("upstream.region", e.to_string());
                None
            }
        },
        (None, None) => Some(BaseUrl::region(Region::Singapore)),
    };

    let d = &f.degrade;
    if d.probe_after_max.0 < d.probe_after.0 {
        p.bad("degrade.probe_after_max", "must be at least probe_after");
    }
    let degrade = DegradeConfig {
        enabled: d.enabled.0,
        consecutive_failures: nz(d.consecutive_failures.get()),
        rate_per_second: nz(d.rate_per_second.get()),
        probe_after: d.probe_after.0,
        probe_after_max: d.probe_after_max.0,
        jitter: d.jitter.0,
    };

    let redis = f.redis.as_ref().and_then(|r| validate_redis(r, p));
    let accounts = validate_accounts(&f.accounts, env, p);
    if f.redis.is_some() {
        for (i, a) in accounts.iter().enumerate() {
            if a.slow_start.is_some() {
                p.bad(
                    format!("accounts[{i}].slow_start"),
                    "not available with [redis]: the Redis backend has no slow start (see the rate limiter's docs)",
                );
            }
        }
    }
    let default_bucket = BucketConfig {
        capacity: nz(f.limits.capacity.get()),
        refill_per_second: f.limits.refill_per_second.0,
    };
    let default_tokens = token_config(
        "limits",
        (
            f.limits.tpm.get(),
            f.limits.tokens_per_day.get(),
            f.limits.tokens_per_month.get(),
        ),
        true,
        p,
    );
    let mut keys = validate_keys(&f.keys, &accounts, default_bucket, default_tokens, env, p);
    let key_series = f.metrics.key_series.0 as usize;
    assign_series(&mut keys, &f.keys, key_series);
    let (otlp_endpoint, service_name) =
        validate_telemetry(&f.telemetry, env, cfg!(feature = "otel"), p);

    Some(GatewayConfig {
        server,
        upstream: UpstreamConfig {
            base_url: base_url?,
            connect_timeout: up.connect_timeout.0,
            header_timeout: up.header_timeout.0,
            idle_timeout: up.idle_timeout.0,
            total_timeout: up.total_timeout.0,
            pool_max_idle_per_host: up.pool_max_idle_per_host.get() as usize,
            pool_idle_timeout: up.pool_idle_timeout.0,
            admission_wait: up.admission_wait.0,
        },
        degrade,
        redis,
        key_series,
        accounts,
        keys,
        wall_clock: None,
        genai_spans: f.telemetry.genai_spans.0,
        otlp_endpoint,
        service_name,
        #[cfg(feature = "otel")]
        otel: None,
    })
}

/// The service name of exported telemetry when nothing sets one.
pub(crate) const DEFAULT_SERVICE_NAME: &str = "qwen-gateway";

/// `[telemetry]`'s OTLP export: the collector's base URL (the file's or
/// the environment's `QWEN_GATEWAY_TELEMETRY_OTLP_ENDPOINT`, else the
/// standard `OTEL_EXPORTER_OTLP_ENDPOINT`; `"off"`: none) and the service
/// name (likewise, else `OTEL_SERVICE_NAME`, else `qwen-gateway`). Asking
/// for an export in a build without it (`otel_built` false), or with
/// `genai_spans` off, is an error; the standard variable is then not read
/// (an ambient setting, not this configuration's request).
fn validate_telemetry(
    t: &file::TelemetryFile,
    env: &dyn Fn(&str) -> Option<String>,
    otel_built: bool,
    p: &mut Problems,
) -> (Option<String>, String) {
    const FIELD: &str = "telemetry.otlp_endpoint";
    const STANDARD: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";
    let standard = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    let (endpoint, label) = match t.otlp_endpoint.as_deref().map(str::trim) {
        Some(e) if e.is_empty() || e.eq_ignore_ascii_case("off") => (None, FIELD.to_owned()),
        Some(e) => (Some(e.to_owned()), FIELD.to_owned()),
        // The spans turned off, the ambient variable has nothing to export.
        None if otel_built && t.genai_spans.0 => (
            standard(STANDARD).map(|e| e.trim().to_owned()),
            format!("{FIELD} (from {STANDARD})"),
        ),
        None => (None, FIELD.to_owned()),
    };
    let service_name = match &t.service_name {
        Some(n) => n.trim().to_owned(),
        None => standard("OTEL_SERVICE_NAME")
            .map_or_else(|| DEFAULT_SERVICE_NAME.to_owned(), |n| n.trim().to_owned()),
    };
    if service_name.is_empty() {
        p.bad("telemetry.service_name", "must not be empty");
    }
    let endpoint = endpoint.and_then(|e| {
        let why = if !otel_built {
            Some("this build has no OpenTelemetry export (build with the `otel` feature: cargo install tower-qwen --features gateway,otel)".to_owned())
        } else if !t.genai_spans.0 {
            Some("exports the GenAI spans and metrics: needs telemetry.genai_spans = true".to_owned())
        } else {
            otlp_endpoint_problem(&e)
        };
        match why {
            Some(why) => {
                p.bad(label, why);
                None
            }
            None => Some(e.trim_end_matches('/').to_owned()),
        }
    });
    (endpoint, service_name)
}

/// What is wrong with an OTLP endpoint, if anything: it must be an
/// `http://` URL with a host, no credentials, no query or fragment, and
/// not a signal's own URL (the exporter of this crate has no TLS;
/// `/v1/traces` and `/v1/metrics` are appended to it). A URL with
/// credentials is not echoed.
fn otlp_endpoint_problem(e: &str) -> Option<String> {
    let shown = if e.contains('@') {
        "(a URL with credentials, not shown)".to_owned()
    } else {
        format!("{e:?}")
    };
    let uri = match e.parse::<http::Uri>() {
        Ok(u) => u,
        Err(_) => {
            return Some(format!(
                "{shown} is not a URL (expected e.g. \"http://127.0.0.1:4318\")"
            ));
        }
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Some(format!(
                "{shown}: https is not supported (the OTLP exporter is built without TLS): send to a collector or agent over http://, e.g. one on the same host"
            ));
        }
        _ => {
            return Some(format!(
                "{shown} is not an http:// URL (expected e.g. \"http://127.0.0.1:4318\")"
            ));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Some(format!("{shown} has no host"));
    }
    // The endpoint is logged at start-up and shown by --check-config:
    // credentials go in the exporter's headers, which are never shown.
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some(format!(
            "{shown}: credentials in the URL are refused (the endpoint is logged); send them as a header with OTEL_EXPORTER_OTLP_HEADERS, e.g. \"authorization=Basic ...\""
        ));
    }
    // `http::Uri` drops a fragment without a word: the exports would go
    // to the path before it.
    if uri.query().is_some() || e.contains('#') {
        return Some(format!(
            "{shown}: a base URL takes no query or fragment (/v1/traces and /v1/metrics are appended)"
        ));
    }
    let path = uri.path().trim_end_matches('/');
    if let Some(signal) = ["/v1/traces", "/v1/metrics", "/v1/logs"]
        .into_iter()
        .find(|s| path.ends_with(s))
    {
        return Some(format!(
            "{shown} is a signal's URL: give the collector's base URL, without {signal} (/v1/traces and /v1/metrics are appended to it)"
        ));
    }
    None
}

/// Token limits from their fields (0: none), checked together: a month's
/// budget below a day's is a mistake.
fn token_config(
    at: &str,
    (tpm, day, month): (u64, u64, u64),
    check: bool,
    p: &mut Problems,
) -> TokenConfig {
    let mut budget = BudgetLimits::NONE;
    if let Some(d) = NonZeroU64::new(day) {
        budget = budget.and_per_day(d);
    }
    if let Some(m) = NonZeroU64::new(month) {
        budget = budget.and_per_month(m);
    }
    if check && day > 0 && month > 0 && month < day {
        p.bad(
            format!("{at}.tokens_per_month"),
            format!(
                "{month} is below tokens_per_day ({day}): a month's budget holds at least a day's"
            ),
        );
    }
    TokenConfig {
        tpm: NonZeroU32::new(u32::try_from(tpm).unwrap_or(u32::MAX)),
        budget,
    }
}

/// Which keys get their own `/metrics` series: those with `metrics =
/// true`, then those without a setting, in file order, while fewer than
/// `limit` keys have one; `metrics = false` never. Label cardinality stays
/// bounded however many keys there are.
fn assign_series(keys: &mut [ClientKeyConfig], files: &[KeyFile], limit: usize) {
    // In a valid file, `keys` holds one entry per `files` entry, in order
    // (when they differ the file is refused anyway).
    let choice: Vec<Option<bool>> = files.iter().map(|k| k.metrics.map(|f| f.0)).collect();
    let mut used = 0;
    for (k, c) in keys.iter_mut().zip(&choice) {
        k.own_series = *c == Some(true);
        used += usize::from(k.own_series);
    }
    for (k, c) in keys.iter_mut().zip(&choice) {
        if used < limit && c.is_none() {
            k.own_series = true;
            used += 1;
        }
    }
}

fn nz(v: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(v).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

fn validate_redis(r: &file::RedisFile, p: &mut Problems) -> Option<RedisConfig> {
    if !cfg!(feature = "redis") {
        p.bad(
            "redis",
            "this build has no Redis support (build with the `redis` feature)",
        );
        return None;
    }
    let Some(url) = &r.url else {
        p.bad(
            "redis.url",
            "required in a [redis] section (e.g. \"redis://127.0.0.1:6379\")",
        );
        return None;
    };
    let url = url.0.trim().to_owned();
    #[cfg(feature = "redis")]
    if ::redis::Client::open(url.as_str()).is_err() {
        // The URL may hold a password: not echoed.
        p.bad(
            "redis.url",
            "not a Redis URL (expected e.g. \"redis://127.0.0.1:6379\")",
        );
        return None;
    }
    if r.key_prefix.is_empty() {
        p.bad("redis.key_prefix", "must not be empty");
    }
    Some(RedisConfig {
        url,
        prefix: r.key_prefix.clone(),
        fail_open: match r.failure {
            FailureMode::Open => Some(nz(r.replicas.get())),
            FailureMode::Closed => None,
        },
        timeout: r.timeout.0,
        probe_every: r.probe_every.0,
        #[cfg(feature = "redis")]
        clock: crate::redis::Clock::Server,
    })
}

fn validate_accounts(
    items: &[AccountFile],
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Vec<AccountConfig> {
    if items.is_empty() && !p.has_under("accounts") {
        p.bad(
            "accounts",
            "at least one [[accounts]] entry (an upstream account and its API key) is required",
        );
    }
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, a) in items.iter().enumerate() {
        let at = format!("accounts[{i}]");
        let name = a.name.clone().unwrap_or_else(|| format!("account-{i}"));
        if name.trim().is_empty() {
            p.bad(format!("{at}.name"), "must not be empty");
        } else if !names.insert(name.clone()) {
            p.bad(
                format!("{at}.name"),
                format!("{name:?} is used by another account"),
            );
        }
        let keys = upstream_keys(a, &at, env, p);
        let workspace = a.workspace.as_ref().and_then(|w| {
            let w = w.trim();
            if w.is_empty() || HeaderValue::from_str(w).is_err() {
                p.bad(format!("{at}.workspace"), "not a valid workspace id");
                None
            } else {
                Some(w.to_owned())
            }
        });
        let mut table = match a.quotas {
            QuotaMode::Qwen => Some(QuotaTable::qwen()),
            QuotaMode::Unlimited => None,
        };
        for (model, m) in &a.models {
            let limits = match (m.rpm, m.tpm) {
                (Some(r), Some(t)) => qwen_limits(nz(r.get()).get(), nz(t.get()).get()),
                (Some(r), None) => {
                    Limits::requests(Quota::per_minute(nz(r.get())).allow_burst(NonZeroU32::MIN))
                }
                (None, Some(t)) => Limits::tokens(
                    Quota::tokens_per_minute(nz(t.get())).allow_burst(NonZeroU32::MIN),
                ),
                (None, None) => {
                    let path = format!("{at}.models.{model}");
                    if !p.has_under(&path) {
                        p.bad(path, "set rpm, tpm or both");
                    }
                    continue;
                }
            };
            table = Some(
                table
                    .unwrap_or_else(|| QuotaTable::new(Limits::UNLIMITED))
                    .set(model, limits),
            );
        }
        out.push(AccountConfig {
            name,
            keys,
            workspace,
            quotas: table,
            slow_start: a.slow_start.0,
            qwen_quotas: a.quotas == QuotaMode::Qwen,
            models: a
                .models
                .iter()
                .map(|(m, q)| (m.clone(), q.rpm.map(|r| r.get()), q.tpm.map(|t| t.get())))
                .collect(),
        });
    }
    out
}

/// `api_key`, `api_keys`, `api_key_env`, `api_keys_env`: at least one key in
/// all. Keys are never echoed.
fn upstream_keys(
    a: &AccountFile,
    at: &str,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Vec<UpstreamKey> {
    let mut keys = Vec::new();
    let mut add = |p: &mut Problems, field: String, text: &str| {
        // The pool's own check too: the key goes into a header.
        match ApiKey::new(text) {
            Ok(_) if crate::pool::Account::new("check", text, ()).is_ok() => {
                keys.push(UpstreamKey(text.trim().to_owned()));
            }
            Ok(_) => p.bad(field, "has characters an HTTP header cannot carry"),
            Err(e) => p.bad(field, e.to_string()),
        }
    };
    if let Some(k) = &a.api_key {
        add(p, format!("{at}.api_key"), &k.0);
    }
    if let Some(list) = &a.api_keys {
        for (i, k) in list.0.iter().enumerate() {
            add(p, format!("{at}.api_keys[{i}]"), &k.0);
        }
    }
    let mut vars = Vec::new();
    if let Some(v) = &a.api_key_env {
        vars.push((format!("{at}.api_key_env"), v.clone()));
    }
    if let Some(list) = &a.api_keys_env {
        for (i, v) in list.0.iter().enumerate() {
            vars.push((format!("{at}.api_keys_env[{i}]"), v.clone()));
        }
    }
    for (field, var) in vars {
        match env(var.trim()) {
            Some(k) => add(p, field, &k),
            None => p.bad(
                field,
                format!("environment variable {} is not set", var.trim()),
            ),
        }
    }
    if keys.is_empty() && !p.has_under(at) {
        p.bad(
            at,
            "needs an upstream key: api_key, api_keys, api_key_env or api_keys_env",
        );
    }
    keys
}

fn validate_keys(
    items: &[KeyFile],
    accounts: &[AccountConfig],
    default_bucket: BucketConfig,
    default_tokens: TokenConfig,
    env: &dyn Fn(&str) -> Option<String>,
    p: &mut Problems,
) -> Vec<ClientKeyConfig> {
    if items.is_empty() && !p.has_under("keys") {
        p.bad(
            "keys",
            "at least one [[keys]] entry is required (the gateway never serves without a client key)",
        );
    }
    let by_name: HashMap<&str, usize> = accounts
        .iter()
        .enumerate()
        .map(|(i, a)| (a.name.as_str(), i))
        .collect();
    let mut out = Vec::new();
    let mut seen: HashMap<KeyDigest, usize> = HashMap::new();
    let mut items_of: Vec<(usize, bool)> = Vec::new();
    for (i, k) in items.iter().enumerate() {
        let at = format!("keys[{i}]");
        let mut digests = Vec::new();
        if let Some(key) = &k.key {
            if key.0.trim().len() < 8 {
                p.bad(format!("{at}.key"), "must be at least 8 characters");
            } else {
                digests.push(digest_of(key.0.trim().as_bytes()));
            }
        }
        if let Some(var) = &k.key_env {
            match env(var.trim()) {
                Some(key) if key.trim().len() >= 8 => {
                    digests.push(digest_of(key.trim().as_bytes()))
                }
                Some(_) => p.bad(
                    format!("{at}.key_env"),
                    format!("the key in {} must be at least 8 characters", var.trim()),
                ),
                None => p.bad(
                    format!("{at}.key_env"),
                    format!("environment variable {} is not set", var.trim()),
                ),
            }
        }
        if let Some(hex) = &k.sha256 {
            match parse_digest(hex) {
                Some(d) => digests.push(d),
                None => p.bad(
                    format!("{at}.sha256"),
                    "expected 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)",
                ),
            }
        }
        let digest = match digests.len() {
            1 => Some(digests[0]),
            0 => {
                if !p.has_under(&at) {
                    p.bad(&at, "needs one of key, key_env or sha256");
                }
                None
            }
            _ => {
                p.bad(&at, "set only one of key, key_env or sha256");
                None
            }
        };
        if let Some(d) = digest
            && let Some(j) = seen.insert(d, i)
        {
            p.bad(&at, format!("the same key as keys[{j}]"));
        }
        if let Some(n) = &k.name {
            if n.trim().is_empty() {
                p.bad(format!("{at}.name"), "must not be empty");
            } else if super::metrics::RESERVED_KEY_LABELS.contains(&n.as_str()) {
                p.bad(
                    format!("{at}.name"),
                    format!("{n:?} is reserved (the /metrics key label of keys without their own series, or of unauthenticated requests)"),
                );
            }
        }
        let pool = match &k.accounts {
            Some(list) if list.0.is_empty() => {
                p.bad(format!("{at}.accounts"), "must name at least one account");
                Vec::new()
            }
            Some(list) => {
                let mut pool = Vec::new();
                for (j, a) in list.0.iter().enumerate() {
                    match by_name.get(a.trim()) {
                        Some(&idx) if !pool.contains(&idx) => pool.push(idx),
                        Some(_) => p.bad(
                            format!("{at}.accounts[{j}]"),
                            format!("account {a:?} is listed twice"),
                        ),
                        None => p.bad(
                            format!("{at}.accounts[{j}]"),
                            format!("unknown account {a:?}"),
                        ),
                    }
                }
                pool
            }
            None if accounts.len() == 1 => vec![0],
            None => {
                if !accounts.is_empty() {
                    p.bad(
                        format!("{at}.accounts"),
                        "required when more than one account is configured",
                    );
                }
                Vec::new()
            }
        };
        let bucket = BucketConfig {
            capacity: k.capacity.map_or(default_bucket.capacity, |c| nz(c.get())),
            refill_per_second: k
                .refill_per_second
                .map_or(default_bucket.refill_per_second, |r| r.0),
        };
        let budget_of = |p: Period| default_tokens.budget.get(p).map_or(0, NonZeroU64::get);
        let tokens = token_config(
            &at,
            (
                k.tpm
                    .map_or(default_tokens.tpm.map_or(0, |t| u64::from(t.get())), |t| {
                        t.get()
                    }),
                k.tokens_per_day.map_or(budget_of(Period::Day), |t| t.get()),
                k.tokens_per_month
                    .map_or(budget_of(Period::Month), |t| t.get()),
            ),
            k.tokens_per_day.is_some() || k.tokens_per_month.is_some(),
            p,
        );
        if let Some(digest) = digest {
            out.push(ClientKeyConfig {
                name: k.name.clone().unwrap_or_else(|| default_key_name(&digest)),
                digest,
                accounts: pool,
                bucket,
                tokens,
                weight: k.weight.map_or(NonZeroU32::MIN, |w| nz(w.get())),
                own_series: false,
            });
            items_of.push((i, k.name.is_some()));
        }
    }
    // Buckets, circuits and metric series are keyed by the name, so names,
    // given or default, must be unique: two keys sharing one would share a
    // bucket.
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (c, &(i, explicit)) in out.iter().zip(&items_of) {
        if let Some(j) = names.insert(c.name.as_str(), i) {
            if explicit {
                p.bad(
                    format!("keys[{i}].name"),
                    format!("{:?} is used by another key (keys[{j}])", c.name),
                );
            } else {
                p.bad(
                    format!("keys[{i}]"),
                    format!(
                        "its default name {:?} is used by keys[{j}]: give it a `name`",
                        c.name
                    ),
                );
            }
        }
    }
    out
}

/// The name of a key configured without one: `key-` and 16 hex digits of its
/// digest (64 bits, so that 100,000 unnamed keys do not collide in practice;
/// the digest of a high-entropy key reveals nothing of it).
fn default_key_name(digest: &KeyDigest) -> String {
    format!("key-{}", digest.name_id())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |n| {
            vars.iter()
                .find(|(k, _)| *k == n)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    const MIN: &str = r#"
        [[accounts]]
        name = "main"
        api_key = "sk-upstream-secret"
        [[keys]]
        key = "gw-client-secret"
    "#;

    /// What [`validate_telemetry`] gives (endpoint, service name) and the
    /// problems it found.
    type Telemetry = ((Option<String>, String), Vec<(String, String)>);

    fn telemetry(
        endpoint: Option<&str>,
        genai_spans: bool,
        vars: &'static [(&'static str, &'static str)],
        otel_built: bool,
    ) -> Telemetry {
        let t = file::TelemetryFile {
            genai_spans: file::Flag(genai_spans),
            otlp_endpoint: endpoint.map(str::to_owned),
            service_name: None,
        };
        let mut p = Problems::default();
        let got = validate_telemetry(&t, &env(vars), otel_built, &mut p);
        (got, p.0)
    }

    /// Issue 17: the OTLP endpoint comes from the file (or its environment
    /// overlay), else from the standard `OTEL_EXPORTER_OTLP_ENDPOINT`;
    /// `"off"` turns it off; asking for it in a build without `otel` is an
    /// error, while the ambient standard variable is then not read.
    #[test]
    fn the_otlp_endpoint_and_where_it_comes_from() {
        const STANDARD: &[(&str, &str)] = &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            ("OTEL_SERVICE_NAME", "svc-from-env"),
        ];
        let ok = |e: &str, name: &str| ((Some(e.to_owned()), name.to_owned()), vec![]);
        assert_eq!(
            telemetry(Some("http://127.0.0.1:4318/"), true, &[], true),
            ok("http://127.0.0.1:4318", DEFAULT_SERVICE_NAME)
        );
        assert_eq!(
            telemetry(None, true, STANDARD, true),
            ok("http://collector:4318", "svc-from-env")
        );
        assert_eq!(
            telemetry(Some("http://127.0.0.1:4318"), true, STANDARD, true),
            ok("http://127.0.0.1:4318", "svc-from-env")
        );
        assert_eq!(
            telemetry(Some("off"), true, STANDARD, true),
            ((None, "svc-from-env".to_owned()), vec![])
        );
        assert_eq!(
            telemetry(None, true, &[], true),
            ((None, DEFAULT_SERVICE_NAME.to_owned()), vec![])
        );
        // Without `otel`: the file's request is an error, the ambient
        // variable is not read.
        assert_eq!(
            telemetry(None, true, STANDARD, false),
            ((None, "svc-from-env".to_owned()), vec![])
        );
        let (got, problems) = telemetry(Some("http://127.0.0.1:4318"), true, &[], false);
        assert_eq!(got.0, None);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].0, "telemetry.otlp_endpoint");
        assert!(problems[0].1.contains("`otel` feature"), "{problems:?}");
    }

    #[test]
    fn bad_otlp_endpoints_are_named() {
        for (endpoint, says) in [
            ("https://collector:4318", "https is not supported"),
            ("grpc://collector:4317", "not an http:// URL"),
            ("collector:4318", "not an http:// URL"),
            ("http://", "not a URL"),
            ("http://collector:4318/?x=1", "no query"),
            ("http://collector:4318/#top", "no query or fragment"),
            ("http://collector:4318/v1/traces", "without /v1/traces"),
            (
                "http://collector:4318/otlp/v1/metrics/",
                "without /v1/metrics",
            ),
            ("https://user:hunter2@collector", "credentials, not shown"),
            (
                "http://user:hunter2@collector:4318",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                "http://hunter2@collector:4318/",
                "credentials in the URL are refused",
            ),
        ] {
            let (got, problems) = telemetry(Some(endpoint), true, &[], true);
            assert_eq!(got.0, None, "{endpoint}");
            assert_eq!(problems.len(), 1, "{endpoint}: {problems:?}");
            assert_eq!(problems[0].0, "telemetry.otlp_endpoint");
            assert!(problems[0].1.contains(says), "{endpoint}: {problems:?}");
            assert!(!problems[0].1.contains("hunter2"));
        }
        let (_, problems) = telemetry(Some("http://collector:4318"), false, &[], true);
        assert!(problems[0].1.contains("genai_spans"), "{problems:?}");
        // The spans turned off, the ambient variable is not read.
        const AMBIENT: &[(&str, &str)] = &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")];
        assert_eq!(
            telemetry(None, false, AMBIENT, true),
            ((None, DEFAULT_SERVICE_NAME.to_owned()), vec![])
        );
        const BAD: &[(&str, &str)] = &[("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")];
        let (_, problems) = telemetry(None, true, BAD, true);
        assert_eq!(
            problems[0].0,
            "telemetry.otlp_endpoint (from OTEL_EXPORTER_OTLP_ENDPOINT)"
        );
    }

    /// The environment overlay sets the endpoint like any other field;
    /// `--check-config` shows it and the service name.
    #[test]
    fn the_otlp_endpoint_from_the_overlay_is_shown() {
        let vars = env(&[
            (
                "QWEN_GATEWAY_TELEMETRY_OTLP_ENDPOINT",
                "http://127.0.0.1:4318",
            ),
            ("QWEN_GATEWAY_TELEMETRY_SERVICE_NAME", "gw-east"),
        ]);
        let read = GatewayConfig::from_toml_with_env(MIN, vars);
        if cfg!(feature = "otel") {
            let c = read.unwrap();
            assert_eq!(c.otlp_endpoint(), Some("http://127.0.0.1:4318"));
            assert_eq!(c.service_name(), "gw-east");
            let shown: toml::Table = c.effective_toml().parse().unwrap();
            assert_eq!(
                shown["telemetry"]["otlp_endpoint"].as_str(),
                Some("http://127.0.0.1:4318")
            );
            assert_eq!(shown["telemetry"]["service_name"].as_str(), Some("gw-east"));
        } else {
            let e = read.unwrap_err();
            assert!(e.fields().any(|f| f == "telemetry.otlp_endpoint"), "{e}");
            assert!(e.to_string().contains("`otel` feature"), "{e}");
        }
        let c = GatewayConfig::from_toml_with_env(MIN, env(&[])).unwrap();
        assert_eq!(c.otlp_endpoint(), None);
        let shown: toml::Table = c.effective_toml().parse().unwrap();
        assert_eq!(shown["telemetry"]["otlp_endpoint"].as_str(), Some("off"));
        assert_eq!(
            shown["telemetry"]["service_name"].as_str(),
            Some("qwen-gateway")
        );
    }

    #[test]
    fn minimal_config_and_defaults() {
        let c = GatewayConfig::from_toml_with_env(MIN, env(&[])).unwrap();
        assert_eq!(c.listen(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.keys[0].bucket.capacity.get(), 50);
        assert_eq!(c.keys[0].bucket.refill_per_second, 30.0);
        assert_eq!(c.degrade.consecutive_failures.get(), 3);
        assert_eq!(c.degrade.rate_per_second.get(), 5);
        assert_eq!(c.keys[0].accounts, vec![0]);
        assert_eq!(c.upstream.admission_wait, Some(Duration::from_secs(2)));
        assert!(c.redis.is_none());
        assert_eq!(
            c.upstream.base_url.to_string(),
            "https://dashscope-intl.aliyuncs.com"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-upstream-secret") && !shown.contains("gw-client-secret"));
    }

    #[test]
    fn token_limits_per_key_with_limits_defaults_env_and_errors() {
        let text = r#"
            [limits]
            tpm = 60000
            tokens_per_day = 1000000
            [[accounts]]
            name = "main"
            api_key = "sk-upstream-secret"
            [[keys]]
            name = "a"
            key = "gw-client-secret-a"
            [[keys]]
            name = "b"
            key = "gw-client-secret-b"
            tpm = 0
            tokens_per_month = 5000000
        "#;
        let c = GatewayConfig::from_toml_with_env(
            text,
            env(&[("QWEN_GATEWAY_LIMITS_TOKENS_PER_MONTH", "20000000")]),
        )
        .unwrap();
        let day = |k: &ClientKeyConfig| k.tokens.budget.get(Period::Day).map(|n| n.get());
        let month = |k: &ClientKeyConfig| k.tokens.budget.get(Period::Month).map(|n| n.get());
        // `a` takes every default, the month's from the environment.
        assert_eq!(c.keys[0].tokens.tpm.map(|n| n.get()), Some(60_000));
        assert_eq!(
            (day(&c.keys[0]), month(&c.keys[0])),
            (Some(1_000_000), Some(20_000_000))
        );
        // `b` turns the TPM off and sets its own month.
        assert_eq!(c.keys[1].tokens.tpm, None);
        assert_eq!(
            (day(&c.keys[1]), month(&c.keys[1])),
            (Some(1_000_000), Some(5_000_000))
        );
        assert_eq!(
            c.keys[0].tokens.quota().unwrap().burst().get(),
            60_000,
            "a minute's worth at once"
        );
        let shown = c.effective_toml();
        assert!(shown.contains("tpm = 60000"), "{shown}");
        assert!(shown.contains("tokens_per_day = 1000000"), "{shown}");
        assert!(shown.contains("tokens_per_month = 5000000"), "{shown}");

        let e = GatewayConfig::from_toml_with_env(
            r#"
            [limits]
            tokens_per_day = -5
            [[accounts]]
            api_key = "sk-upstream-secret"
            [[keys]]
            key = "gw-client-secret-a"
            tpm = 5000000000
            [[keys]]
            key = "gw-client-secret-b"
            tokens_per_day = 1000
            tokens_per_month = 10
            [[keys]]
            key = "gw-client-secret-c"
            tokens_per_month = "lots"
            "#,
            env(&[("QWEN_GATEWAY_LIMITS_TPM", "fast")]),
        )
        .unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        for f in [
            "limits.tpm (from QWEN_GATEWAY_LIMITS_TPM)",
            "limits.tokens_per_day",
            "keys[0].tpm",
            "keys[1].tokens_per_month",
            "keys[2].tokens_per_month",
        ] {
            assert!(fields.contains(&f), "{f} in {fields:?}");
        }
    }

    #[test]
    fn env_overrides_win() {
        let c = GatewayConfig::from_toml_with_env(
            MIN,
            env(&[
                ("QWEN_GATEWAY_SERVER_LISTEN", "0.0.0.0:9000"),
                ("QWEN_GATEWAY_LIMITS_CAPACITY", "7"),
                ("QWEN_GATEWAY_UPSTREAM_BASE_URL", "http://127.0.0.1:1234"),
                ("QWEN_GATEWAY_UPSTREAM_ADMISSION_WAIT", "off"),
                ("QWEN_GATEWAY_DEGRADE_ENABLED", "no"),
                ("QWEN_GATEWAY_DEGRADE_JITTER", "0.5"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen().port(), 9000);
        assert_eq!(c.keys[0].bucket.capacity.get(), 7);
        assert_eq!(c.upstream.base_url.to_string(), "http://127.0.0.1:1234");
        assert_eq!(c.upstream.admission_wait, None);
        assert!(!c.degrade.enabled);
        assert_eq!(c.degrade.jitter, 0.5);
        let e = GatewayConfig::from_toml_with_env(
            MIN,
            env(&[
                ("QWEN_GATEWAY_LIMITS_CAPACITY", "lots"),
                ("QWEN_GATEWAY_SERVER_MAX_BODY_BYTES", "0"),
            ]),
        )
        .unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        assert_eq!(
            fields,
            [
                "server.max_body_bytes (from QWEN_GATEWAY_SERVER_MAX_BODY_BYTES)",
                "limits.capacity (from QWEN_GATEWAY_LIMITS_CAPACITY)",
            ],
            "{e}"
        );
    }

    /// An environment value that reads as a number but is meant as text is
    /// taken as text.
    #[test]
    fn env_numbers_fall_back_to_text() {
        let c = GatewayConfig::from_toml_with_env(
            &format!("{MIN}\n[redis]\nurl = \"redis://127.0.0.1:1\""),
            env(&[("QWEN_GATEWAY_REDIS_KEY_PREFIX", "42")]),
        );
        if cfg!(feature = "redis") {
            assert_eq!(c.unwrap().redis.unwrap().prefix, "42");
        } else {
            let e = c.unwrap_err();
            assert_eq!(e.fields().collect::<Vec<_>>(), ["redis"], "{e}");
        }
    }

    #[test]
    fn redis_section_from_file_and_env() {
        if !cfg!(feature = "redis") {
            return;
        }
        let text = format!(
            "{MIN}\n[redis]\nurl = \"redis://:hunter2@127.0.0.1:6379\"\nfailure = \"fail-closed\"\ntimeout = \"50ms\""
        );
        let c = GatewayConfig::from_toml_with_env(&text, env(&[])).unwrap();
        let r = c.redis.as_ref().unwrap();
        assert_eq!(r.fail_open, None);
        assert_eq!(r.timeout, Some(Duration::from_millis(50)));
        assert_eq!(r.prefix, "tower-qwen:gw:");
        assert!(!format!("{c:?}").contains("hunter2"));
        // The whole section from the environment.
        let c = GatewayConfig::from_toml_with_env(
            MIN,
            env(&[
                ("QWEN_GATEWAY_REDIS_URL", "redis://127.0.0.1:6380"),
                ("QWEN_GATEWAY_REDIS_REPLICAS", "3"),
            ]),
        )
        .unwrap();
        let r = c.redis.unwrap();
        assert_eq!(r.fail_open, NonZeroU32::new(3));
        assert_eq!(r.url, "redis://127.0.0.1:6380");
        // Bad values are named; the URL is never echoed.
        let e = GatewayConfig::from_toml_with_env(
            &format!(
                "{MIN}\n[redis]\nurl = \"hunter2://x\"\nfailure = \"maybe\"\nreplicas = 0\nttl = 1"
            ),
            env(&[]),
        )
        .unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        for f in ["redis.url", "redis.failure", "redis.replicas", "redis.ttl"] {
            assert!(fields.contains(&f), "{f} not in {e}");
        }
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let e =
            GatewayConfig::from_toml_with_env(&format!("{MIN}\n[redis]\nreplicas = 2"), env(&[]))
                .unwrap_err();
        assert_eq!(e.fields().collect::<Vec<_>>(), ["redis.url"]);
    }

    #[test]
    fn secrets_of_the_wrong_type_are_not_echoed() {
        let e = GatewayConfig::from_toml_with_env(
            r#"
            [[accounts]]
            api_key = 123456789
            [[keys]]
            key = ["gw-secret-in-array"]
            "#,
            env(&[]),
        )
        .unwrap_err();
        let shown = e.to_string();
        assert!(
            !shown.contains("123456789") && !shown.contains("gw-secret-in-array"),
            "{shown}"
        );
        let fields: Vec<&str> = e.fields().collect();
        assert!(
            fields.contains(&"accounts[0].api_key") && fields.contains(&"keys[0].key"),
            "{e}"
        );
    }

    /// Found by the fuzz target `gateway_config` (seed
    /// `toml_syntax_error_with_key`): `toml`'s message quoted the line of
    /// the syntax error, key and all.
    #[test]
    fn a_syntax_error_names_its_place_without_quoting_the_line() {
        let e = GatewayConfig::from_toml_with_env(
            "[[accounts]]\nname = \"main\"\napi_key = \"sk-syntax-secret-1\" oops\n",
            env(&[]),
        )
        .unwrap_err();
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("sk-syntax-secret-1"), "{shown}");
        assert_eq!(e.fields().collect::<Vec<_>>(), ["toml"]);
        let (_, why) = e.problems().next().unwrap();
        assert!(
            why.starts_with("TOML parse error at line 3, column 32: "),
            "{why}"
        );
    }

    /// A bad base URL is named in the error, unless it carries credentials
    /// (from the file or the environment): those are never echoed.
    #[test]
    fn a_bad_base_url_is_echoed_only_without_credentials() {
        let text = "[upstream]\nbase_url = \"ftp//host\"\n";
        let e = GatewayConfig::from_toml_with_env(text, env(&[])).unwrap_err();
        assert!(e.to_string().contains("\"ftp//host\""), "{e}");
        for (text, vars) in [
            (
                "[upstream]\nbase_url = \"htps//user:sk-url-secret-1@host\"\n",
                &[][..],
            ),
            (
                "",
                &[(
                    "QWEN_GATEWAY_UPSTREAM_BASE_URL",
                    "htps//user:sk-url-secret-1@host",
                )][..],
            ),
        ] {
            let e = GatewayConfig::from_toml_with_env(text, env(vars)).unwrap_err();
            let shown = format!("{e} {e:?}");
            assert!(!shown.contains("sk-url-secret-1"), "{shown}");
            let (_, why) = e
                .problems()
                .find(|(f, _)| *f == "upstream.base_url")
                .expect("the base URL is named");
            assert!(
                why.starts_with("(a URL with credentials, not shown)"),
                "{why}"
            );
        }
    }

    /// `_other` and `none` are `/metrics` key labels of their own (keys
    /// without their own series, unauthenticated requests): a key named so
    /// would merge its series with theirs.
    #[test]
    fn key_names_that_are_reserved_metric_labels_are_refused() {
        let text = r#"
            [[accounts]]
            name = "main"
            api_key = "sk-upstream-secret"
            [[keys]]
            name = "alice"
            key = "gw-client-secret-0"
            [[keys]]
            name = "_other"
            key = "gw-client-secret-1"
            [[keys]]
            name = "none"
            key = "gw-client-secret-2"
            [[keys]]
            name = "None"
            key = "gw-client-secret-3"
        "#;
        let e = GatewayConfig::from_toml_with_env(text, env(&[])).unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        assert_eq!(fields, ["keys[1].name", "keys[2].name"], "{e}");
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    /// Buckets and circuits are keyed by name: a key may not take another's
    /// name, given or default, and unnamed keys get 64-bit default names.
    #[test]
    fn key_names_are_unique_given_or_default() {
        let default0 = format!("key-{}", digest_of(b"gw-client-secret-0").name_id());
        assert_eq!(default0.len(), 4 + 16);
        let text = format!(
            r#"
            [[accounts]]
            name = "main"
            api_key = "sk-upstream-secret"
            [[keys]]
            key = "gw-client-secret-0"
            [[keys]]
            name = "{default0}"
            key = "gw-client-secret-1"
            [[keys]]
            name = "bob"
            key = "gw-client-secret-2"
            [[keys]]
            name = "bob"
            key = "gw-client-secret-3"
            [[keys]]
            key = "gw-client-secret-4"
        "#
        );
        let e = GatewayConfig::from_toml_with_env(&text, env(&[])).unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        assert_eq!(fields, ["keys[1].name", "keys[3].name"], "{e}");
        assert!(e.to_string().contains("(keys[0])"), "{e}");

        // A default name taken by a key listed before it is named too.
        let text = format!(
            r#"
            [[accounts]]
            name = "main"
            api_key = "sk-upstream-secret"
            [[keys]]
            name = "{default0}"
            key = "gw-client-secret-1"
            [[keys]]
            key = "gw-client-secret-0"
        "#
        );
        let e = GatewayConfig::from_toml_with_env(&text, env(&[])).unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        assert_eq!(fields, ["keys[1]"], "{e}");
        assert!(e.to_string().contains("give it a `name`"), "{e}");

        // Unnamed keys alone: distinct default names.
        let text = (0..200).fold(
            String::from("[[accounts]]\nname = \"main\"\napi_key = \"sk-upstream-secret\"\n"),
            |t, i| t + &format!("[[keys]]\nkey = \"gw-client-secret-{i}\"\n"),
        );
        let c = GatewayConfig::from_toml_with_env(&text, env(&[])).unwrap();
        let names: HashSet<&str> = c.keys.iter().map(|k| k.name.as_str()).collect();
        assert_eq!(names.len(), 200);
    }

    #[test]
    fn sections_of_the_wrong_shape() {
        let e = GatewayConfig::from_toml_with_env(
            "server = 5\naccounts = \"main\"\n[[keys]]\nkey = \"gw-client-secret\"",
            env(&[]),
        )
        .unwrap_err();
        let fields: Vec<&str> = e.fields().collect();
        assert_eq!(fields, ["server", "accounts"], "{e}");
    }
}
