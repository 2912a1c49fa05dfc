//! The gateway's configuration: TOML, environment overrides, validation that
//! names every bad field.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::time::Duration;

use http::HeaderValue;

use crate::client::{ApiKey, BaseUrl, Region};
use crate::rate_limit::{Limits, Quota, QuotaTable, qwen_limits};

use super::auth::{KeyDigest, digest_of, parse_digest};
use super::error::ConfigError;

/// The prefix of environment variables that override scalar settings:
/// `QWEN_GATEWAY_<SECTION>_<FIELD>`, e.g. `QWEN_GATEWAY_SERVER_LISTEN` or
/// `QWEN_GATEWAY_UPSTREAM_BASE_URL`.
pub const ENV_PREFIX: &str = "QWEN_GATEWAY";

/// A validated gateway configuration. See the [module docs](super) for the
/// file format and an example.
///
/// Built only by parsing ([`GatewayConfig::from_toml`],
/// [`GatewayConfig::load`]), so a value of this type is always valid. Its
/// `Debug` output shows no key material: client keys appear by their
/// redacted id, upstream keys by [`ApiKey`]'s.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    pub(crate) server: ServerConfig,
    pub(crate) upstream: UpstreamConfig,
    pub(crate) degrade: DegradeConfig,
    pub(crate) accounts: Vec<AccountConfig>,
    pub(crate) keys: Vec<ClientKeyConfig>,
}

#[derive(Clone, Debug)]
pub(crate) struct ServerConfig {
    pub(crate) listen: SocketAddr,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_header_bytes: usize,
    pub(crate) body_read_timeout: Duration,
    pub(crate) shutdown_grace: Duration,
    /// Open client connections at most (`Gateway::serve`).
    pub(crate) max_connections: usize,
    /// Failed authentications a client address may make per minute (a
    /// burst of as many), then 429; 0: no limit.
    pub(crate) max_auth_failures_per_minute: u32,
}

#[derive(Clone, Debug)]
pub(crate) struct UpstreamConfig {
    pub(crate) base_url: BaseUrl,
    pub(crate) connect_timeout: Option<Duration>,
    pub(crate) header_timeout: Option<Duration>,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) total_timeout: Option<Duration>,
    pub(crate) pool_max_idle_per_host: usize,
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

#[derive(Clone, Copy, Debug)]
pub(crate) struct DegradeConfig {
    pub(crate) enabled: bool,
    pub(crate) consecutive_failures: NonZeroU32,
    pub(crate) rate_per_second: NonZeroU32,
    pub(crate) probe_after: Duration,
    pub(crate) probe_after_max: Duration,
    pub(crate) jitter: f64,
}

#[derive(Clone, Debug)]
pub(crate) struct AccountConfig {
    pub(crate) name: String,
    pub(crate) keys: Vec<ApiKey>,
    pub(crate) workspace: Option<HeaderValue>,
    /// `None`: no local limit toward the upstream.
    pub(crate) quotas: Option<QuotaTable>,
    /// Ramp up from a fraction of the quota after idle.
    pub(crate) slow_start: Option<Duration>,
}

#[derive(Clone)]
pub(crate) struct ClientKeyConfig {
    pub(crate) name: String,
    pub(crate) digest: KeyDigest,
    pub(crate) accounts: Vec<usize>,
    pub(crate) bucket: BucketConfig,
}

impl fmt::Debug for ClientKeyConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKeyConfig")
            .field("name", &self.name)
            .field("id", &self.digest.redacted_id())
            .field("accounts", &self.accounts)
            .field("bucket", &self.bucket)
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
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::one("toml", e.to_string().trim_end()))?;
        let ctx = Ctx {
            problems: RefCell::new(Vec::new()),
            env: &env,
        };
        let cfg = parse(&ctx, &table);
        let problems = ctx.problems.into_inner();
        match cfg {
            Some(cfg) if problems.is_empty() => Ok(cfg),
            _ => Err(ConfigError::many(problems)),
        }
    }

    /// Reads and parses a TOML file (see [`GatewayConfig::from_toml`]).
    ///
    /// # Errors
    ///
    /// [`ConfigError`] when the file cannot be read or is invalid.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::one("file", format!("cannot read {}: {e}", path.display()))
        })?;
        Self::from_toml(&text)
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
}

// ---------------------------------------------------------------------------
// Parsing.

struct Ctx<'e> {
    problems: RefCell<Vec<(String, String)>>,
    env: &'e dyn Fn(&str) -> Option<String>,
}

impl Ctx<'_> {
    fn bad(&self, field: impl Into<String>, why: impl Into<String>) {
        self.problems.borrow_mut().push((field.into(), why.into()));
    }
}

/// A value read for a field: from the file, or from an environment
/// variable (a string, parsed by the field's type).
enum Raw {
    Toml(toml::Value),
    Env(String),
}

/// One table of the file, read field by field; remembers which fields were
/// read so that the rest are reported as unknown.
struct Section<'c, 'e> {
    ctx: &'c Ctx<'e>,
    path: String,
    table: toml::Table,
    env_prefix: Option<String>,
    known: Vec<&'static str>,
}

impl<'c, 'e> Section<'c, 'e> {
    fn new(ctx: &'c Ctx<'e>, path: impl Into<String>, value: Option<&toml::Value>) -> Self {
        let path = path.into();
        let table = match value {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t.clone(),
            Some(other) => {
                ctx.bad(
                    &path,
                    format!("expected a table, found {}", other.type_str()),
                );
                toml::Table::new()
            }
        };
        Self {
            ctx,
            path,
            table,
            env_prefix: None,
            known: Vec::new(),
        }
    }

    fn with_env(mut self, section: &str) -> Self {
        self.env_prefix = Some(format!("{ENV_PREFIX}_{}", section.to_ascii_uppercase()));
        self
    }

    fn field(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    fn env_name(&self, name: &str) -> Option<String> {
        self.env_prefix
            .as_ref()
            .map(|p| format!("{p}_{}", name.to_ascii_uppercase()))
    }

    /// The field's display name, with the environment variable it came
    /// from when it did.
    fn label(&self, name: &str, raw: &Raw) -> String {
        match (raw, self.env_name(name)) {
            (Raw::Env(_), Some(var)) => format!("{} (from {var})", self.field(name)),
            _ => self.field(name),
        }
    }

    fn raw(&mut self, name: &'static str) -> Option<Raw> {
        self.known.push(name);
        if let Some(var) = self.env_name(name)
            && let Some(v) = (self.ctx.env)(&var)
        {
            return Some(Raw::Env(v));
        }
        self.table.get(name).cloned().map(Raw::Toml)
    }

    fn bad(&self, name: &str, raw: &Raw, why: impl Into<String>) {
        self.ctx.bad(self.label(name, raw), why);
    }

    fn string(&mut self, name: &'static str) -> Option<String> {
        let raw = self.raw(name)?;
        match &raw {
            Raw::Env(s) => Some(s.clone()),
            Raw::Toml(toml::Value::String(s)) => Some(s.clone()),
            Raw::Toml(v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected a string, found {}", v.type_str()),
                );
                None
            }
        }
    }

    /// A secret string: never echoed in an error.
    fn secret(&mut self, name: &'static str) -> Option<String> {
        let raw = self.raw(name)?;
        match raw {
            Raw::Env(s) | Raw::Toml(toml::Value::String(s)) => Some(s),
            Raw::Toml(ref v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected a string, found {}", v.type_str()),
                );
                None
            }
        }
    }

    fn strings(&mut self, name: &'static str) -> Option<Vec<String>> {
        let raw = self.raw(name)?;
        match &raw {
            Raw::Env(s) => Some(
                s.split(',')
                    .map(|p| p.trim().to_owned())
                    .filter(|p| !p.is_empty())
                    .collect(),
            ),
            Raw::Toml(toml::Value::String(s)) => Some(vec![s.clone()]),
            Raw::Toml(toml::Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        toml::Value::String(s) => out.push(s.clone()),
                        v => self.ctx.bad(
                            format!("{}[{i}]", self.label(name, &raw)),
                            format!("expected a string, found {}", v.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            Raw::Toml(v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected an array of strings, found {}", v.type_str()),
                );
                None
            }
        }
    }

    fn boolean(&mut self, name: &'static str, default: bool) -> bool {
        let Some(raw) = self.raw(name) else {
            return default;
        };
        match &raw {
            Raw::Toml(toml::Value::Boolean(b)) => *b,
            Raw::Env(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => true,
                "false" | "0" | "no" | "off" => false,
                _ => {
                    self.bad(
                        name,
                        &raw,
                        format!("{s:?} is not a boolean (true or false)"),
                    );
                    default
                }
            },
            Raw::Toml(v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected a boolean, found {}", v.type_str()),
                );
                default
            }
        }
    }

    /// An integer in `[min, max]`.
    fn int(&mut self, name: &'static str, default: u64, min: u64, max: u64) -> u64 {
        let Some(raw) = self.raw(name) else {
            return default;
        };
        let v = match &raw {
            Raw::Toml(toml::Value::Integer(i)) => u64::try_from(*i).ok(),
            Raw::Env(s) => s.trim().replace('_', "").parse::<u64>().ok(),
            Raw::Toml(v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected an integer, found {}", v.type_str()),
                );
                return default;
            }
        };
        match v {
            Some(v) if (min..=max).contains(&v) => v,
            _ => {
                self.bad(
                    name,
                    &raw,
                    format!("must be an integer from {min} to {max}"),
                );
                default
            }
        }
    }

    /// A number in `(0, max]` (integers are accepted).
    fn positive(&mut self, name: &'static str, default: f64, max: f64) -> f64 {
        self.number_in(
            name,
            default,
            |v| v > 0.0 && v <= max,
            || format!("must be a number above 0 and at most {max}"),
        )
    }

    /// A fraction in `[0, 1]`.
    fn fraction(&mut self, name: &'static str, default: f64) -> f64 {
        self.number_in(
            name,
            default,
            |v| (0.0..=1.0).contains(&v),
            || "must be a number from 0 to 1".to_owned(),
        )
    }

    /// A number (integer or float in the file, any number in the
    /// environment) that `ok` accepts; otherwise the field is reported with
    /// `why` and `default` is used.
    fn number_in(
        &mut self,
        name: &'static str,
        default: f64,
        ok: impl Fn(f64) -> bool,
        why: impl Fn() -> String,
    ) -> f64 {
        let Some(raw) = self.raw(name) else {
            return default;
        };
        let v = match &raw {
            Raw::Toml(toml::Value::Integer(i)) => Some(*i as f64),
            Raw::Toml(toml::Value::Float(f)) => Some(*f),
            Raw::Env(s) => s.trim().parse::<f64>().ok(),
            Raw::Toml(v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected a number, found {}", v.type_str()),
                );
                return default;
            }
        };
        match v {
            Some(v) if ok(v) => v,
            _ => {
                self.bad(name, &raw, why());
                default
            }
        }
    }

    /// A duration: an integer or float number of seconds, or a string
    /// `"250ms"`, `"30s"`, `"5m"`, `"1h"`. With `allow_off`, `"off"` and 0
    /// mean none.
    fn duration(
        &mut self,
        name: &'static str,
        default: Option<Duration>,
        allow_off: bool,
    ) -> Option<Duration> {
        let Some(raw) = self.raw(name) else {
            return default;
        };
        let parsed = match &raw {
            Raw::Toml(toml::Value::Integer(i)) if *i >= 0 => {
                Some(Duration::from_secs(u64::try_from(*i).unwrap_or(0)))
            }
            Raw::Toml(toml::Value::Float(f)) => Duration::try_from_secs_f64(*f).ok(),
            Raw::Toml(toml::Value::String(s)) | Raw::Env(s) => parse_duration(s),
            _ => None,
        };
        let off = parsed.is_some_and(|d| d.is_zero())
            || matches!(&raw, Raw::Toml(toml::Value::String(s)) | Raw::Env(s) if s.trim().eq_ignore_ascii_case("off"));
        if off {
            if allow_off {
                return None;
            }
            self.bad(name, &raw, "must be a positive duration");
            return default;
        }
        match parsed {
            Some(d) if d <= Duration::from_secs(86_400 * 365) => Some(d),
            _ => {
                let hint = if allow_off {
                    "expected a duration such as 30, \"30s\", \"500ms\", \"5m\" or \"off\""
                } else {
                    "expected a duration such as 30, \"30s\", \"500ms\" or \"5m\""
                };
                self.bad(name, &raw, hint);
                default
            }
        }
    }

    /// Reports the fields of the table that no reader asked for.
    fn finish(self) {
        for key in self.table.keys() {
            if !self.known.contains(&key.as_str()) {
                let mut known: Vec<&str> = self.known.clone();
                known.sort_unstable();
                known.dedup();
                self.ctx.bad(
                    self.field(key),
                    format!("unknown field (expected one of: {})", known.join(", ")),
                );
            }
        }
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a bare number of seconds.
fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let secs = match unit.trim() {
        "" | "s" | "sec" | "secs" => n,
        "ms" => n / 1000.0,
        "m" | "min" | "mins" => n * 60.0,
        "h" => n * 3600.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(secs).ok()
}

fn parse(ctx: &Ctx<'_>, root: &toml::Table) -> Option<GatewayConfig> {
    const SECTIONS: [&str; 6] = [
        "server", "upstream", "limits", "degrade", "accounts", "keys",
    ];
    for key in root.keys() {
        if !SECTIONS.contains(&key.as_str()) {
            ctx.bad(
                key.clone(),
                format!("unknown section (expected one of: {})", SECTIONS.join(", ")),
            );
        }
    }
    let server = parse_server(ctx, root.get("server"));
    let upstream = parse_upstream(ctx, root.get("upstream"));
    let limits = {
        let mut s = Section::new(ctx, "limits", root.get("limits")).with_env("limits");
        let b = parse_bucket(&mut s, None);
        s.finish();
        b
    };
    let degrade = parse_degrade(ctx, root.get("degrade"));
    let accounts = parse_accounts(ctx, root.get("accounts"));
    let keys = parse_keys(ctx, root.get("keys"), &accounts, limits);
    Some(GatewayConfig {
        server: server?,
        upstream: upstream?,
        degrade,
        accounts,
        keys,
    })
}

fn parse_server(ctx: &Ctx<'_>, v: Option<&toml::Value>) -> Option<ServerConfig> {
    let mut s = Section::new(ctx, "server", v).with_env("server");
    let listen = match s.string("listen") {
        None => Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        Some(text) => match text.trim().parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                ctx.bad(
                    s.field("listen"),
                    format!("{text:?} is not a socket address (expected e.g. \"127.0.0.1:8080\")"),
                );
                None
            }
        },
    };
    let max_body_bytes = s.int("max_body_bytes", 8 << 20, 1, 1 << 30) as usize;
    let max_header_bytes = s.int("max_header_bytes", 16 << 10, 1024, 1 << 20) as usize;
    let body_read_timeout = s
        .duration("body_read_timeout", Some(Duration::from_secs(30)), false)
        .unwrap_or(Duration::from_secs(30));
    let shutdown_grace = s
        .duration("shutdown_grace", Some(Duration::from_secs(30)), true)
        .unwrap_or(Duration::ZERO);
    let max_connections = s.int(
        "max_connections",
        super::serve::default_max_connections() as u64,
        1,
        1 << 20,
    ) as usize;
    let max_auth_failures_per_minute =
        s.int("max_auth_failures_per_minute", 10, 0, 1_000_000) as u32;
    s.finish();
    Some(ServerConfig {
        listen: listen?,
        max_body_bytes,
        max_header_bytes,
        body_read_timeout,
        shutdown_grace,
        max_connections,
        max_auth_failures_per_minute,
    })
}

fn parse_upstream(ctx: &Ctx<'_>, v: Option<&toml::Value>) -> Option<UpstreamConfig> {
    let mut s = Section::new(ctx, "upstream", v).with_env("upstream");
    let base = s.string("base_url");
    let region = s.string("region");
    let base_url = match (base, region) {
        (Some(_), Some(_)) => {
            ctx.bad(
                s.field("base_url"),
                "set either base_url or region, not both",
            );
            None
        }
        (Some(b), None) => match b.parse::<BaseUrl>() {
            Ok(u) => Some(u),
            Err(e) => {
                ctx.bad(s.field("base_url"), format!("{b:?}: {e}"));
                None
            }
        },
        (None, Some(r)) => match r.parse::<Region>() {
            Ok(r) => Some(BaseUrl::region(r)),
            Err(e) => {
                ctx.bad(s.field("region"), e.to_string());
                None
            }
        },
        (None, None) => Some(BaseUrl::region(Region::Singapore)),
    };
    let connect_timeout = s.duration("connect_timeout", Some(Duration::from_secs(5)), true);
    let header_timeout = s.duration("header_timeout", None, true);
    let idle_timeout = s.duration("idle_timeout", Some(Duration::from_secs(60)), true);
    let total_timeout = s.duration("total_timeout", Some(Duration::from_secs(300)), true);
    let pool_max_idle_per_host = s.int("pool_max_idle_per_host", 64, 0, 100_000) as usize;
    let admission_wait = s.duration("admission_wait", Some(Duration::from_secs(2)), true);
    s.finish();
    Some(UpstreamConfig {
        base_url: base_url?,
        connect_timeout,
        header_timeout,
        idle_timeout,
        total_timeout,
        pool_max_idle_per_host,
        admission_wait,
    })
}

/// Reads `capacity` and `refill_per_second`, defaulting to `base` (or the
/// source advice's 50 and 30 per second).
fn parse_bucket(s: &mut Section<'_, '_>, base: Option<BucketConfig>) -> BucketConfig {
    let base = base.unwrap_or(BucketConfig {
        capacity: NonZeroU32::new(50).expect("50 > 0"),
        refill_per_second: 30.0,
    });
    let capacity = s.int(
        "capacity",
        u64::from(base.capacity.get()),
        1,
        u64::from(u32::MAX),
    );
    let refill = s.positive("refill_per_second", base.refill_per_second, 1e9);
    BucketConfig {
        capacity: NonZeroU32::new(u32::try_from(capacity).unwrap_or(u32::MAX))
            .unwrap_or(NonZeroU32::MIN),
        refill_per_second: refill,
    }
}

fn nz(v: u64) -> NonZeroU32 {
    NonZeroU32::new(u32::try_from(v).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN)
}

fn parse_degrade(ctx: &Ctx<'_>, v: Option<&toml::Value>) -> DegradeConfig {
    let mut s = Section::new(ctx, "degrade", v).with_env("degrade");
    let enabled = s.boolean("enabled", true);
    let consecutive_failures = nz(s.int("consecutive_failures", 3, 1, 1_000_000));
    let rate_per_second = nz(s.int("rate_per_second", 5, 1, 1_000_000));
    let probe_after = s
        .duration("probe_after", Some(Duration::from_secs(5)), false)
        .unwrap_or(Duration::from_secs(5));
    let probe_after_max = s
        .duration("probe_after_max", Some(Duration::from_secs(60)), false)
        .unwrap_or(Duration::from_secs(60));
    if probe_after_max < probe_after {
        ctx.bad(s.field("probe_after_max"), "must be at least probe_after");
    }
    let jitter = s.fraction("jitter", 0.2);
    s.finish();
    DegradeConfig {
        enabled,
        consecutive_failures,
        rate_per_second,
        probe_after,
        probe_after_max,
        jitter,
    }
}

/// The entries of an array of tables (`[[accounts]]`).
fn entries<'v>(ctx: &Ctx<'_>, name: &str, v: Option<&'v toml::Value>) -> Vec<&'v toml::Value> {
    match v {
        None => Vec::new(),
        Some(toml::Value::Array(items)) => items.iter().collect(),
        Some(other) => {
            ctx.bad(
                name,
                format!(
                    "expected an array of tables ([[{name}]]), found {}",
                    other.type_str()
                ),
            );
            Vec::new()
        }
    }
}

fn parse_accounts(ctx: &Ctx<'_>, v: Option<&toml::Value>) -> Vec<AccountConfig> {
    let items = entries(ctx, "accounts", v);
    if items.is_empty() && v.is_none_or(|v| v.is_array()) {
        ctx.bad(
            "accounts",
            "at least one [[accounts]] entry (an upstream account and its API key) is required",
        );
    }
    let mut out = Vec::new();
    let mut names = HashSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let mut s = Section::new(ctx, format!("accounts[{i}]"), Some(item));
        let name = s.string("name").unwrap_or_else(|| format!("account-{i}"));
        if name.trim().is_empty() {
            ctx.bad(s.field("name"), "must not be empty");
        } else if !names.insert(name.clone()) {
            ctx.bad(
                s.field("name"),
                format!("{name:?} is used by another account"),
            );
        }
        let keys = parse_upstream_keys(ctx, &mut s);
        let workspace = s
            .string("workspace")
            .and_then(|w| match HeaderValue::from_str(w.trim()) {
                Ok(h) if !w.trim().is_empty() => Some(h),
                _ => {
                    ctx.bad(s.field("workspace"), "not a valid workspace id");
                    None
                }
            });
        let mode = s.string("quotas").unwrap_or_else(|| "qwen".to_owned());
        let mut table = match mode.trim() {
            "qwen" => Some(QuotaTable::qwen()),
            "unlimited" | "none" => None,
            other => {
                ctx.bad(
                    s.field("quotas"),
                    format!("{other:?} is not a quota mode (expected \"qwen\" or \"unlimited\")"),
                );
                None
            }
        };
        let slow_start = s.duration("slow_start", None, true);
        s.known.push("models");
        if let Some(models) = s.table.get("models").cloned() {
            let path = s.field("models");
            match models {
                toml::Value::Table(t) => {
                    for (model, v) in &t {
                        let mut m = Section::new(ctx, format!("{path}.{model}"), Some(v));
                        let rpm = m.int("rpm", 0, 1, u64::from(u32::MAX));
                        let tpm = m.int("tpm", 0, 1, u64::from(u32::MAX));
                        let present = (m.table.contains_key("rpm"), m.table.contains_key("tpm"));
                        m.finish();
                        let limits = match present {
                            (true, true) => qwen_limits(nz(rpm).get(), nz(tpm).get()),
                            (true, false) => Limits::requests(
                                Quota::per_minute(nz(rpm)).allow_burst(NonZeroU32::MIN),
                            ),
                            (false, true) => Limits::tokens(
                                Quota::tokens_per_minute(nz(tpm)).allow_burst(NonZeroU32::MIN),
                            ),
                            (false, false) => {
                                ctx.bad(format!("{path}.{model}"), "set rpm, tpm or both");
                                continue;
                            }
                        };
                        table = Some(
                            table
                                .unwrap_or_else(|| QuotaTable::new(Limits::UNLIMITED))
                                .set(model, limits),
                        );
                    }
                }
                other => ctx.bad(
                    path,
                    format!("expected a table of models, found {}", other.type_str()),
                ),
            }
        }
        s.finish();
        out.push(AccountConfig {
            name,
            keys,
            workspace,
            quotas: table,
            slow_start,
        });
    }
    out
}

/// `api_key`, `api_keys`, `api_key_env`, `api_keys_env`: at least one key in
/// all.
fn parse_upstream_keys(ctx: &Ctx<'_>, s: &mut Section<'_, '_>) -> Vec<ApiKey> {
    let mut keys = Vec::new();
    let mut add = |field: String, text: &str| match ApiKey::new(text) {
        Ok(k) => keys.push(k),
        Err(e) => ctx.bad(field, e.to_string()),
    };
    if let Some(k) = s.secret("api_key") {
        add(s.field("api_key"), &k);
    }
    if let Some(list) = s.strings_secret("api_keys") {
        for (i, k) in list.iter().enumerate() {
            add(format!("{}[{i}]", s.field("api_keys")), k);
        }
    }
    let mut vars = Vec::new();
    if let Some(v) = s.string("api_key_env") {
        vars.push((s.field("api_key_env"), v));
    }
    if let Some(list) = s.strings("api_keys_env") {
        for (i, v) in list.into_iter().enumerate() {
            vars.push((format!("{}[{i}]", s.field("api_keys_env")), v));
        }
    }
    for (field, var) in vars {
        match (ctx.env)(var.trim()) {
            Some(k) => add(field, &k),
            None => ctx.bad(
                field,
                format!("environment variable {} is not set", var.trim()),
            ),
        }
    }
    if keys.is_empty() && !ctx_has_problem_under(ctx, &s.path) {
        ctx.bad(
            s.path.clone(),
            "needs an upstream key: api_key, api_keys, api_key_env or api_keys_env",
        );
    }
    keys
}

fn ctx_has_problem_under(ctx: &Ctx<'_>, path: &str) -> bool {
    ctx.problems
        .borrow()
        .iter()
        .any(|(f, _)| f.starts_with(path))
}

impl Section<'_, '_> {
    /// Like [`Section::strings`], for secrets: values never echoed.
    fn strings_secret(&mut self, name: &'static str) -> Option<Vec<String>> {
        let raw = self.raw(name)?;
        match raw {
            Raw::Toml(toml::Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        v => self.ctx.bad(
                            format!("{}[{i}]", self.field(name)),
                            format!("expected a string, found {}", v.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            Raw::Env(s) | Raw::Toml(toml::Value::String(s)) => {
                Some(s.split(',').map(|p| p.trim().to_owned()).collect())
            }
            Raw::Toml(ref v) => {
                self.bad(
                    name,
                    &raw,
                    format!("expected an array of strings, found {}", v.type_str()),
                );
                None
            }
        }
    }
}

fn parse_keys(
    ctx: &Ctx<'_>,
    v: Option<&toml::Value>,
    accounts: &[AccountConfig],
    default_bucket: BucketConfig,
) -> Vec<ClientKeyConfig> {
    let items = entries(ctx, "keys", v);
    if items.is_empty() && v.is_none_or(|v| v.is_array()) {
        ctx.bad(
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
    let mut names = HashSet::new();
    for (i, item) in items.into_iter().enumerate() {
        let mut s = Section::new(ctx, format!("keys[{i}]"), Some(item));
        let mut digests = Vec::new();
        if let Some(k) = s.secret("key") {
            if k.trim().len() < 8 {
                ctx.bad(s.field("key"), "must be at least 8 characters");
            } else {
                digests.push(digest_of(k.trim().as_bytes()));
            }
        }
        if let Some(var) = s.string("key_env") {
            match (ctx.env)(var.trim()) {
                Some(k) if k.trim().len() >= 8 => digests.push(digest_of(k.trim().as_bytes())),
                Some(_) => ctx.bad(
                    s.field("key_env"),
                    format!("the key in {} must be at least 8 characters", var.trim()),
                ),
                None => ctx.bad(
                    s.field("key_env"),
                    format!("environment variable {} is not set", var.trim()),
                ),
            }
        }
        if let Some(hex) = s.string("sha256") {
            match parse_digest(&hex) {
                Some(d) => digests.push(d),
                None => ctx.bad(
                    s.field("sha256"),
                    "expected 64 hex digits (the SHA-256 of the key, e.g. `printf %s KEY | sha256sum`)",
                ),
            }
        }
        let digest = match digests.len() {
            1 => Some(digests[0]),
            0 => {
                if !ctx_has_problem_under(ctx, &s.path) {
                    ctx.bad(s.path.clone(), "needs one of key, key_env or sha256");
                }
                None
            }
            _ => {
                ctx.bad(s.path.clone(), "set only one of key, key_env or sha256");
                None
            }
        };
        if let Some(d) = digest
            && let Some(j) = seen.insert(d, i)
        {
            ctx.bad(s.path.clone(), format!("the same key as keys[{j}]"));
        }
        let name = s.string("name");
        if let Some(n) = &name {
            if n.trim().is_empty() {
                ctx.bad(s.field("name"), "must not be empty");
            } else if !names.insert(n.clone()) {
                ctx.bad(s.field("name"), format!("{n:?} is used by another key"));
            }
        }
        let pool = match s.strings("accounts") {
            Some(list) if list.is_empty() => {
                ctx.bad(s.field("accounts"), "must name at least one account");
                Vec::new()
            }
            Some(list) => {
                let mut pool = Vec::new();
                for (j, a) in list.iter().enumerate() {
                    match by_name.get(a.trim()) {
                        Some(&idx) if !pool.contains(&idx) => pool.push(idx),
                        Some(_) => ctx.bad(
                            format!("{}[{j}]", s.field("accounts")),
                            format!("account {a:?} is listed twice"),
                        ),
                        None => ctx.bad(
                            format!("{}[{j}]", s.field("accounts")),
                            format!("unknown account {a:?}"),
                        ),
                    }
                }
                pool
            }
            None if accounts.len() == 1 => vec![0],
            None => {
                if !accounts.is_empty() {
                    ctx.bad(
                        s.field("accounts"),
                        "required when more than one account is configured",
                    );
                }
                Vec::new()
            }
        };
        let bucket = parse_bucket(&mut s, Some(default_bucket));
        s.finish();
        if let Some(digest) = digest {
            out.push(ClientKeyConfig {
                name: name.unwrap_or_else(|| format!("key-{}", digest.redacted_id())),
                digest,
                accounts: pool,
                bucket,
            });
        }
    }
    out
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

    #[test]
    fn minimal_config_and_defaults() {
        let c = GatewayConfig::from_toml_with_env(MIN, env(&[])).unwrap();
        assert_eq!(c.listen(), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(c.keys[0].bucket.capacity.get(), 50);
        assert_eq!(c.keys[0].bucket.refill_per_second, 30.0);
        assert_eq!(c.degrade.consecutive_failures.get(), 3);
        assert_eq!(c.degrade.rate_per_second.get(), 5);
        assert_eq!(c.keys[0].accounts, vec![0]);
        assert_eq!(
            c.upstream.base_url.to_string(),
            "https://dashscope-intl.aliyuncs.com"
        );
        let shown = format!("{c:?}");
        assert!(!shown.contains("sk-upstream-secret") && !shown.contains("gw-client-secret"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("1.5m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("12"), Some(Duration::from_secs(12)));
        assert_eq!(parse_duration("fast"), None);
        assert_eq!(parse_duration("5 parsecs"), None);
    }

    #[test]
    fn env_overrides_win() {
        let c = GatewayConfig::from_toml_with_env(
            MIN,
            env(&[
                ("QWEN_GATEWAY_SERVER_LISTEN", "0.0.0.0:9000"),
                ("QWEN_GATEWAY_LIMITS_CAPACITY", "7"),
                ("QWEN_GATEWAY_UPSTREAM_BASE_URL", "http://127.0.0.1:1234"),
                ("QWEN_GATEWAY_DEGRADE_ENABLED", "false"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen().port(), 9000);
        assert_eq!(c.keys[0].bucket.capacity.get(), 7);
        assert_eq!(c.upstream.base_url.to_string(), "http://127.0.0.1:1234");
        assert!(!c.degrade.enabled);
        let e = GatewayConfig::from_toml_with_env(
            MIN,
            env(&[("QWEN_GATEWAY_LIMITS_CAPACITY", "lots")]),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("limits.capacity (from QWEN_GATEWAY_LIMITS_CAPACITY)"),
            "{e}"
        );
    }
}
