//! The configuration file as serde reads it: every section and field, its
//! type and its default, in one place. Field types check their own values
//! (ranges, duration syntax), so a bad value is a serde error at the
//! field's path; what needs several fields is checked afterwards
//! ([`super::validate`]).

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Error as _};

// ---------------------------------------------------------------------------
// The sections.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct File {
    pub(super) server: ServerFile,
    pub(super) upstream: UpstreamFile,
    pub(super) limits: LimitsFile,
    pub(super) degrade: DegradeFile,
    pub(super) redis: Option<RedisFile>,
    pub(super) metrics: MetricsFile,
    pub(super) telemetry: TelemetryFile,
    pub(super) accounts: Vec<AccountFile>,
    pub(super) keys: Vec<KeyFile>,
}

/// The sections of the file, in their order.
pub(super) fn section_names() -> &'static [&'static str] {
    field_names::<File>()
}

/// The sections whose scalars the environment overrides, with their field
/// names as serde knows them (so the list cannot drift from the structs).
pub(super) fn env_sections() -> [(&'static str, &'static [&'static str]); 7] {
    [
        ("server", field_names::<ServerFile>()),
        ("upstream", field_names::<UpstreamFile>()),
        ("limits", field_names::<LimitsFile>()),
        ("degrade", field_names::<DegradeFile>()),
        ("redis", field_names::<RedisFile>()),
        ("metrics", field_names::<MetricsFile>()),
        ("telemetry", field_names::<TelemetryFile>()),
    ]
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ServerFile {
    #[serde(deserialize_with = "socket_addr")]
    pub(super) listen: SocketAddr,
    pub(super) max_body_bytes: Int<1, { 1 << 30 }>,
    /// A Files API upload (streamed, never buffered).
    pub(super) max_file_bytes: Int<1, { 1 << 40 }>,
    pub(super) max_header_bytes: Int<1024, { 1 << 20 }>,
    pub(super) body_read_timeout: Dur,
    pub(super) shutdown_grace: OptDur,
    /// Default: from the file-descriptor limit.
    pub(super) max_connections: Option<Int<1, { 1 << 20 }>>,
    pub(super) max_auth_failures_per_minute: Int<0, 1_000_000>,
    /// 0: one per CPU.
    pub(super) worker_threads: Int<0, 1024>,
}

impl Default for ServerFile {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            max_body_bytes: Int(8 << 20),
            max_file_bytes: Int(500_000_000),
            max_header_bytes: Int(16 << 10),
            body_read_timeout: Dur(Duration::from_secs(30)),
            shutdown_grace: OptDur(Some(Duration::from_secs(30))),
            max_connections: None,
            max_auth_failures_per_minute: Int(10),
            worker_threads: Int(1),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct UpstreamFile {
    pub(super) base_url: Option<String>,
    pub(super) region: Option<String>,
    pub(super) connect_timeout: OptDur,
    pub(super) header_timeout: OptDur,
    pub(super) idle_timeout: OptDur,
    pub(super) total_timeout: OptDur,
    pub(super) pool_max_idle_per_host: Int<0, 100_000>,
    pub(super) pool_idle_timeout: OptDur,
    pub(super) admission_wait: OptDur,
}

impl Default for UpstreamFile {
    fn default() -> Self {
        Self {
            base_url: None,
            region: None,
            connect_timeout: OptDur(Some(Duration::from_secs(5))),
            header_timeout: OptDur(None),
            idle_timeout: OptDur(Some(Duration::from_secs(60))),
            total_timeout: OptDur(Some(Duration::from_secs(300))),
            pool_max_idle_per_host: Int(64),
            pool_idle_timeout: OptDur(Some(Duration::from_secs(90))),
            admission_wait: OptDur(Some(Duration::from_secs(2))),
        }
    }
}

/// The largest token budget: counts stay exact in Redis's Lua numbers
/// (doubles), 2^53 - 1.
pub(super) const MAX_BUDGET: u64 = (1 << 53) - 1;

/// Each client key's bucket (the source advice's 50 and 30 per second),
/// and its token limits (0: none).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct LimitsFile {
    pub(super) capacity: Int<1, { u32::MAX as u64 }>,
    pub(super) refill_per_second: Positive,
    pub(super) tpm: Int<0, { u32::MAX as u64 }>,
    pub(super) tokens_per_day: Int<0, MAX_BUDGET>,
    pub(super) tokens_per_month: Int<0, MAX_BUDGET>,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            capacity: Int(50),
            refill_per_second: Positive(30.0),
            tpm: Int(0),
            tokens_per_day: Int(0),
            tokens_per_month: Int(0),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct DegradeFile {
    pub(super) enabled: Flag,
    pub(super) consecutive_failures: Int<1, 1_000_000>,
    pub(super) rate_per_second: Int<1, 1_000_000>,
    pub(super) probe_after: Dur,
    pub(super) probe_after_max: Dur,
    pub(super) jitter: Fraction,
}

impl Default for DegradeFile {
    fn default() -> Self {
        Self {
            enabled: Flag(true),
            consecutive_failures: Int(3),
            rate_per_second: Int(5),
            probe_after: Dur(Duration::from_secs(5)),
            probe_after_max: Dur(Duration::from_secs(60)),
            jitter: Fraction(0.2),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RedisFile {
    /// May carry a password: never echoed.
    pub(super) url: Option<Secret>,
    pub(super) key_prefix: String,
    pub(super) failure: FailureMode,
    pub(super) replicas: Int<1, 10_000>,
    pub(super) timeout: OptDur,
    pub(super) probe_every: Dur,
}

impl Default for RedisFile {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: "tower-qwen:gw:".to_owned(),
            failure: FailureMode::Open,
            replicas: Int(1),
            timeout: OptDur(Some(Duration::from_millis(100))),
            probe_every: Dur(Duration::from_millis(500)),
        }
    }
}

/// How many client keys get their own `/metrics` series.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct MetricsFile {
    pub(super) key_series: Int<0, 1_000_000>,
}

impl Default for MetricsFile {
    fn default() -> Self {
        Self {
            key_series: Int(100),
        }
    }
}

/// The GenAI spans of proxied calls, and their export over OTLP.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct TelemetryFile {
    pub(super) genai_spans: Flag,
    /// The OTLP collector's base URL (HTTP + protobuf); `"off"`: none.
    /// Unset: `OTEL_EXPORTER_OTLP_ENDPOINT`, if set.
    pub(super) otlp_endpoint: Option<String>,
    /// Unset: `OTEL_SERVICE_NAME`, else `qwen-gateway`.
    pub(super) service_name: Option<String>,
}

impl Default for TelemetryFile {
    fn default() -> Self {
        Self {
            genai_spans: Flag(true),
            otlp_endpoint: None,
            service_name: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct AccountFile {
    pub(super) name: Option<String>,
    pub(super) api_key: Option<Secret>,
    pub(super) api_keys: Option<OneOrMany<Secret>>,
    pub(super) api_key_env: Option<String>,
    pub(super) api_keys_env: Option<OneOrMany<String>>,
    pub(super) workspace: Option<String>,
    pub(super) quotas: QuotaMode,
    pub(super) slow_start: OptDur,
    pub(super) models: BTreeMap<String, ModelFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct ModelFile {
    pub(super) rpm: Option<Int<1, { u32::MAX as u64 }>>,
    pub(super) tpm: Option<Int<1, { u32::MAX as u64 }>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct KeyFile {
    pub(super) name: Option<String>,
    pub(super) key: Option<Secret>,
    pub(super) key_env: Option<String>,
    pub(super) sha256: Option<String>,
    pub(super) accounts: Option<OneOrMany<String>>,
    pub(super) capacity: Option<Int<1, { u32::MAX as u64 }>>,
    pub(super) refill_per_second: Option<Positive>,
    /// Token limits; unset: `[limits]`'s, 0: none.
    pub(super) tpm: Option<Int<0, { u32::MAX as u64 }>>,
    pub(super) tokens_per_day: Option<Int<0, MAX_BUDGET>>,
    pub(super) tokens_per_month: Option<Int<0, MAX_BUDGET>>,
    /// The key's share of an account's quota while it is saturated.
    pub(super) weight: Option<Int<1, 1_000_000>>,
    /// Own `/metrics` series: `true` always, `false` never, unset while
    /// fewer than `[metrics] key_series` keys have one.
    pub(super) metrics: Option<Flag>,
}

// ---------------------------------------------------------------------------
// Field types. The file is always read from a `toml::Value`, so each reads
// one and says what is wrong in words (never echoing a secret).

fn value<'de, D: Deserializer<'de>>(d: D) -> Result<toml::Value, D::Error> {
    toml::Value::deserialize(d)
}

fn found<E: de::Error>(what: &str, v: &toml::Value) -> E {
    E::custom(format!("expected {what}, found {}", v.type_str()))
}

/// An integer in `[MIN, MAX]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Int<const MIN: u64, const MAX: u64>(pub(super) u64);

impl<'de, const MIN: u64, const MAX: u64> Deserialize<'de> for Int<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            toml::Value::Integer(i) => match u64::try_from(i) {
                Ok(v) if (MIN..=MAX).contains(&v) => Ok(Int(v)),
                _ => Err(D::Error::custom(format!(
                    "must be an integer from {MIN} to {MAX}"
                ))),
            },
            v => Err(found("an integer", &v)),
        }
    }
}

impl<const MIN: u64, const MAX: u64> Int<MIN, MAX> {
    pub(super) fn get(self) -> u64 {
        self.0
    }
}

fn number<E: de::Error>(v: toml::Value) -> Result<f64, E> {
    match v {
        toml::Value::Integer(i) => Ok(i as f64),
        toml::Value::Float(f) => Ok(f),
        v => Err(found("a number", &v)),
    }
}

/// A number in `(0, 1e9]` (integers are accepted).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Positive(pub(super) f64);

impl<'de> Deserialize<'de> for Positive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = number(value(d)?)?;
        if v > 0.0 && v <= 1e9 {
            Ok(Positive(v))
        } else {
            Err(D::Error::custom(
                "must be a number above 0 and at most 1000000000",
            ))
        }
    }
}

/// A number in `[0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Fraction(pub(super) f64);

impl<'de> Deserialize<'de> for Fraction {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = number(value(d)?)?;
        if (0.0..=1.0).contains(&v) {
            Ok(Fraction(v))
        } else {
            Err(D::Error::custom("must be a number from 0 to 1"))
        }
    }
}

/// A boolean; from the environment also `1`/`0`, `yes`/`no`, `on`/`off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Flag(pub(super) bool);

impl<'de> Deserialize<'de> for Flag {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            toml::Value::Boolean(b) => Ok(Flag(b)),
            toml::Value::Integer(1) => Ok(Flag(true)),
            toml::Value::Integer(0) => Ok(Flag(false)),
            toml::Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "yes" | "on" => Ok(Flag(true)),
                "false" | "no" | "off" => Ok(Flag(false)),
                _ => Err(D::Error::custom(format!(
                    "{s:?} is not a boolean (true or false)"
                ))),
            },
            v => Err(found("a boolean", &v)),
        }
    }
}

const DURATION_HINT: &str = "expected a duration such as 30, \"30s\", \"500ms\" or \"5m\"";
const OPT_DURATION_HINT: &str =
    "expected a duration such as 30, \"30s\", \"500ms\", \"5m\" or \"off\"";

/// A duration: an integer or float number of seconds, or `"250ms"`,
/// `"30s"`, `"5m"`, `"1h"`; at most a year. `Ok(None)`: zero or `"off"`.
fn duration<E: de::Error>(v: toml::Value, hint: &str) -> Result<Option<Duration>, E> {
    let parsed = match &v {
        toml::Value::Integer(i) => u64::try_from(*i).ok().map(Duration::from_secs),
        toml::Value::Float(f) => Duration::try_from_secs_f64(*f).ok(),
        toml::Value::String(s) if s.trim().eq_ignore_ascii_case("off") => {
            return Ok(None);
        }
        toml::Value::String(s) => parse_duration(s),
        _ => None,
    };
    match parsed {
        Some(d) if d.is_zero() => Ok(None),
        Some(d) if d <= Duration::from_secs(86_400 * 365) => Ok(Some(d)),
        _ => Err(E::custom(hint)),
    }
}

/// A positive duration (see [`duration`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Dur(pub(super) Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match duration(value(d)?, DURATION_HINT)? {
            Some(d) => Ok(Dur(d)),
            None => Err(D::Error::custom("must be a positive duration")),
        }
    }
}

/// A duration, or none (`"off"` or 0).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct OptDur(pub(super) Option<Duration>);

impl<'de> Deserialize<'de> for OptDur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        duration(value(d)?, OPT_DURATION_HINT).map(OptDur)
    }
}

/// Parses `"250ms"`, `"30s"`, `"5m"`, `"1h"`, or a bare number of seconds.
pub(super) fn parse_duration(s: &str) -> Option<Duration> {
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

fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    match value(d)? {
        toml::Value::String(s) => s.trim().parse().map_err(|_| {
            D::Error::custom(format!(
                "{s:?} is not a socket address (expected e.g. \"127.0.0.1:8080\")"
            ))
        }),
        v => Err(found("a string", &v)),
    }
}

/// A secret string: a wrong value is never echoed in an error.
#[derive(Clone, Default)]
pub(super) struct Secret(pub(super) String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            toml::Value::String(s) => Ok(Secret(s)),
            v => Err(found("a string", &v)),
        }
    }
}

/// One value or an array of them (`accounts = "main"` or `["a", "b"]`).
#[derive(Clone, Debug, Default)]
pub(super) struct OneOrMany<T>(pub(super) Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> de::Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Self::Value, E> {
                let one = T::deserialize(de::value::StrDeserializer::<E>::new(s))?;
                Ok(OneOrMany(vec![one]))
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = seq.next_element()? {
                    out.push(x);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// `quotas = "qwen"` (the published defaults per model) or `"unlimited"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum QuotaMode {
    #[default]
    Qwen,
    Unlimited,
}

impl<'de> Deserialize<'de> for QuotaMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            toml::Value::String(s) => match s.trim() {
                "qwen" => Ok(QuotaMode::Qwen),
                "unlimited" | "none" => Ok(QuotaMode::Unlimited),
                other => Err(D::Error::custom(format!(
                    "{other:?} is not a quota mode (expected \"qwen\" or \"unlimited\")"
                ))),
            },
            v => Err(found("a string", &v)),
        }
    }
}

/// `failure = "fail-open"` (decide locally at 1/replicas of each quota) or
/// `"fail-closed"` (refuse with 503).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum FailureMode {
    #[default]
    Open,
    Closed,
}

impl<'de> Deserialize<'de> for FailureMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match value(d)? {
            toml::Value::String(s) => match s.trim() {
                "fail-open" | "open" => Ok(FailureMode::Open),
                "fail-closed" | "closed" => Ok(FailureMode::Closed),
                other => Err(D::Error::custom(format!(
                    "{other:?} is not a failure policy (expected \"fail-open\" or \"fail-closed\")"
                ))),
            },
            v => Err(found("a string", &v)),
        }
    }
}

// ---------------------------------------------------------------------------
// Field names, from the derive itself.

/// The fields serde's derive declares for `T` (what `deserialize_struct`
/// is told), read without any input.
fn field_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Names(&'static [&'static str]);
    impl<'de> Deserializer<'de> for &mut Names {
        type Error = de::value::Error;
        fn deserialize_any<V: de::Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Self::Error> {
            self.0 = fields;
            Err(Self::Error::custom("names read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }
    let mut names = Names(&[]);
    let _ = T::deserialize(&mut names);
    names.0
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn field_names_come_from_the_derive() {
        assert_eq!(
            field_names::<LimitsFile>(),
            [
                "capacity",
                "refill_per_second",
                "tpm",
                "tokens_per_day",
                "tokens_per_month"
            ]
        );
        let sections = env_sections();
        assert!(sections[0].1.contains(&"max_auth_failures_per_minute"));
        assert!(sections[4].1.contains(&"url"));
    }
}
