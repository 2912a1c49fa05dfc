//! The effective configuration as TOML, secrets redacted: what
//! `qwen-gateway --check-config` prints. Defaults are filled in, the
//! environment's overrides applied, `[limits]` folded into each key, and
//! no key material shown: client keys appear by their 8-hex-digit
//! redacted id, upstream keys by [`ApiKey`]'s, a Redis URL without its
//! credentials.

use std::time::Duration;

use toml::{Table, Value};

use crate::client::ApiKey;
use crate::rate_limit::Period;

use super::GatewayConfig;

impl GatewayConfig {
    /// The effective configuration as TOML, with every default filled in
    /// and the environment's overrides applied, and no secret: client keys
    /// are shown as `"<redacted:ID>"` (ID: the 8-hex-digit id logs and
    /// metrics use), upstream keys likewise, a Redis URL without its user
    /// and password. `[limits]` appears folded into each `[[keys]]` entry.
    /// The sections come in the order of the file format (that of
    /// `examples/gateway.toml`): `[server]`, `[upstream]`, `[degrade]`,
    /// `[redis]`, `[metrics]`, `[telemetry]`, `[[accounts]]`, `[[keys]]`.
    ///
    /// # Example
    ///
    /// ```
    /// use tower_qwen::gateway::GatewayConfig;
    ///
    /// let config = GatewayConfig::from_toml(r#"
    ///     [[accounts]]
    ///     name = "main"
    ///     api_key = "sk-upstream-secret"
    ///     [[keys]]
    ///     name = "alice"
    ///     key = "gw-alice-secret"
    /// "#).unwrap();
    /// let shown = config.effective_toml();
    /// assert!(shown.contains("name = \"alice\""));
    /// assert!(shown.contains("capacity = 50"));
    /// assert!(!shown.contains("secret"));
    /// ```
    pub fn effective_toml(&self) -> String {
        let mut root = Table::new();

        let s = &self.server;
        let mut server = Table::new();
        server.insert("listen".into(), s.listen.to_string().into());
        server.insert("max_body_bytes".into(), int(s.max_body_bytes as u64));
        server.insert("max_header_bytes".into(), int(s.max_header_bytes as u64));
        server.insert("body_read_timeout".into(), dur(s.body_read_timeout));
        server.insert("shutdown_grace".into(), opt_dur(Some(s.shutdown_grace)));
        server.insert("max_connections".into(), int(s.max_connections as u64));
        server.insert(
            "max_auth_failures_per_minute".into(),
            int(u64::from(s.max_auth_failures_per_minute)),
        );
        server.insert("worker_threads".into(), int(s.worker_threads as u64));
        root.insert("server".into(), server.into());

        let u = &self.upstream;
        let mut upstream = Table::new();
        upstream.insert(
            "base_url".into(),
            without_credentials(&u.base_url.to_string()).into(),
        );
        upstream.insert("connect_timeout".into(), opt_dur(u.connect_timeout));
        upstream.insert("header_timeout".into(), opt_dur(u.header_timeout));
        upstream.insert("idle_timeout".into(), opt_dur(u.idle_timeout));
        upstream.insert("total_timeout".into(), opt_dur(u.total_timeout));
        upstream.insert(
            "pool_max_idle_per_host".into(),
            int(u.pool_max_idle_per_host as u64),
        );
        upstream.insert("pool_idle_timeout".into(), opt_dur(u.pool_idle_timeout));
        upstream.insert("admission_wait".into(), opt_dur(u.admission_wait));
        root.insert("upstream".into(), upstream.into());

        let d = &self.degrade;
        let mut degrade = Table::new();
        degrade.insert("enabled".into(), d.enabled.into());
        degrade.insert(
            "consecutive_failures".into(),
            int(u64::from(d.consecutive_failures.get())),
        );
        degrade.insert(
            "rate_per_second".into(),
            int(u64::from(d.rate_per_second.get())),
        );
        degrade.insert("probe_after".into(), dur(d.probe_after));
        degrade.insert("probe_after_max".into(), dur(d.probe_after_max));
        degrade.insert("jitter".into(), d.jitter.into());
        root.insert("degrade".into(), degrade.into());

        if let Some(r) = &self.redis {
            let mut redis = Table::new();
            redis.insert("url".into(), without_credentials(&r.url).into());
            redis.insert("key_prefix".into(), r.prefix.clone().into());
            let failure = if r.fail_open.is_some() {
                "fail-open"
            } else {
                "fail-closed"
            };
            redis.insert("failure".into(), failure.into());
            if let Some(n) = r.fail_open {
                redis.insert("replicas".into(), int(u64::from(n.get())));
            }
            redis.insert("timeout".into(), opt_dur(r.timeout));
            redis.insert("probe_every".into(), dur(r.probe_every));
            root.insert("redis".into(), redis.into());
        }

        let mut metrics = Table::new();
        metrics.insert("key_series".into(), int(self.key_series as u64));
        root.insert("metrics".into(), metrics.into());

        let mut telemetry = Table::new();
        telemetry.insert("genai_spans".into(), self.genai_spans.into());
        telemetry.insert(
            "otlp_endpoint".into(),
            self.otlp_endpoint
                .as_deref()
                .map_or_else(|| "off".to_owned(), without_credentials)
                .into(),
        );
        telemetry.insert("service_name".into(), self.service_name.clone().into());
        root.insert("telemetry".into(), telemetry.into());

        let accounts: Vec<Value> = self
            .accounts
            .iter()
            .map(|a| {
                let mut t = Table::new();
                t.insert("name".into(), a.name.clone().into());
                let keys: Vec<Value> = a
                    .keys
                    .iter()
                    .map(|k| {
                        let id = ApiKey::new(&k.0).map_or_else(|_| "?".into(), |k| k.redacted_id());
                        Value::from(format!("<redacted:{id}>"))
                    })
                    .collect();
                t.insert("api_keys".into(), keys.into());
                if let Some(w) = &a.workspace {
                    t.insert("workspace".into(), w.clone().into());
                }
                let mode = if a.qwen_quotas { "qwen" } else { "unlimited" };
                t.insert("quotas".into(), mode.into());
                t.insert("slow_start".into(), opt_dur(a.slow_start));
                if !a.models.is_empty() {
                    let mut models = Table::new();
                    for (name, rpm, tpm) in &a.models {
                        let mut m = Table::new();
                        if let Some(r) = rpm {
                            m.insert("rpm".into(), int(*r));
                        }
                        if let Some(t) = tpm {
                            m.insert("tpm".into(), int(*t));
                        }
                        models.insert(name.clone(), m.into());
                    }
                    t.insert("models".into(), models.into());
                }
                t.into()
            })
            .collect();
        root.insert("accounts".into(), accounts.into());

        let keys: Vec<Value> = self
            .keys
            .iter()
            .map(|k| {
                let mut t = Table::new();
                t.insert("name".into(), k.name.clone().into());
                t.insert(
                    "key".into(),
                    format!("<redacted:{}>", k.digest.redacted_id()).into(),
                );
                let accounts: Vec<Value> = k
                    .accounts
                    .iter()
                    .map(|&i| Value::from(self.accounts[i].name.clone()))
                    .collect();
                t.insert("accounts".into(), accounts.into());
                t.insert("capacity".into(), int(u64::from(k.bucket.capacity.get())));
                t.insert(
                    "refill_per_second".into(),
                    k.bucket.refill_per_second.into(),
                );
                if let Some(tpm) = k.tokens.tpm {
                    t.insert("tpm".into(), int(u64::from(tpm.get())));
                }
                for (field, period) in [
                    ("tokens_per_day", Period::Day),
                    ("tokens_per_month", Period::Month),
                ] {
                    if let Some(n) = k.tokens.budget.get(period) {
                        t.insert(field.into(), int(n.get()));
                    }
                }
                t.insert("weight".into(), int(u64::from(k.weight.get())));
                t.insert("metrics".into(), k.own_series.into());
                t.into()
            })
            .collect();
        root.insert("keys".into(), keys.into());

        // The sections in the order of the file format (that of
        // examples/gateway.toml), not the table's alphabetical one.
        let mut out = String::new();
        for &name in super::file::section_names() {
            let Some(section) = root.remove(name) else {
                continue;
            };
            let mut one = Table::new();
            one.insert(name.to_owned(), section);
            match toml::to_string(&one) {
                Ok(text) => {
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    out.push_str(&text);
                }
                Err(e) => return format!("# cannot render: {e}\n"),
            }
        }
        debug_assert!(root.is_empty(), "a section the file format does not name");
        out
    }
}

fn int(v: u64) -> Value {
    Value::Integer(i64::try_from(v).unwrap_or(i64::MAX))
}

/// A duration as the file writes it (`"30s"`, `"250ms"`).
fn dur(d: Duration) -> Value {
    let text = if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.as_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    };
    text.into()
}

fn opt_dur(d: Option<Duration>) -> Value {
    d.filter(|d| !d.is_zero()).map_or_else(|| "off".into(), dur)
}

/// `url` without the `user:password@` of its authority.
fn without_credentials(url: &str) -> String {
    let Some(start) = url.find("://").map(|i| i + 3) else {
        return "<redacted>".to_owned();
    };
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    match url[start..end].rfind('@') {
        Some(at) => format!("{}{}", &url[..start], &url[start + at + 1..]),
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::GatewayConfig;

    /// The top-level section names of a TOML text, in order of first
    /// appearance; with `commented`, also those of `# [section]` lines.
    fn section_order(text: &str, commented: bool) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for line in text.lines() {
            let mut l = line.trim_start();
            if commented && let Some(rest) = l.strip_prefix('#') {
                l = rest.trim_start();
            }
            let Some(head) = l.strip_prefix('[') else {
                continue;
            };
            let head = head.trim_start_matches('[');
            let Some(end) = head.find([']', '.']) else {
                continue;
            };
            let name = head[..end].trim();
            if !name.is_empty() && !names.iter().any(|n| n == name) {
                names.push(name.to_owned());
            }
        }
        names
    }

    /// Issue 17: `--check-config` printed the sections alphabetically
    /// (`[[accounts]]`, `[degrade]`, `[[keys]]`, ...); they come in the
    /// order the example configuration documents them.
    #[test]
    fn sections_come_in_the_order_of_the_example_config() {
        let example = include_str!("../../../examples/gateway.toml");
        let env = |name: &str| (name == "DASHSCOPE_API_KEY").then(|| "sk-example-0001".to_owned());
        let with_redis = format!("{example}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n");
        let mut documented = section_order(example, true);
        // [limits] is shown folded into each key.
        documented.retain(|n| n != "limits");
        assert_eq!(
            documented,
            [
                "server",
                "upstream",
                "degrade",
                "redis",
                "metrics",
                "telemetry",
                "accounts",
                "keys"
            ]
        );
        let mut texts = vec![example.to_owned()];
        if cfg!(feature = "redis") {
            texts.push(with_redis);
        }
        for text in &texts {
            let config = GatewayConfig::from_toml_with_env(text, env).unwrap();
            let shown = config.effective_toml();
            let mut expected = documented.clone();
            if config.redis.is_none() {
                expected.retain(|n| n != "redis");
            }
            assert_eq!(section_order(&shown, false), expected, "{shown}");
            let parsed: Table = shown.parse().expect("still TOML");
            assert_eq!(parsed.len(), expected.len());
        }
    }

    #[test]
    fn credentials_are_removed_from_urls() {
        assert_eq!(
            without_credentials("redis://user:pw@host:6379/0"),
            "redis://host:6379/0"
        );
        assert_eq!(without_credentials("redis://:p@ss@host"), "redis://host");
        assert_eq!(
            without_credentials("redis://host:1/x@y"),
            "redis://host:1/x@y"
        );
        assert_eq!(without_credentials("host:6379"), "<redacted>");
    }

    #[test]
    fn durations_read_back() {
        for d in [
            Duration::from_secs(30),
            Duration::from_millis(250),
            Duration::from_micros(500),
        ] {
            let Value::String(s) = dur(d) else {
                panic!("a string")
            };
            assert_eq!(super::super::file::parse_duration(&s), Some(d), "{s}");
        }
    }
}
