//! Prometheus metrics through the `metrics` facade, recorded into a
//! recorder owned by the gateway (never the process-global one), so several
//! gateways (and tests) in one process do not mix their numbers.
//!
//! Metric handles are registered once per label set and cached: the request
//! path does a hash-map lookup and an atomic add, no allocation. Bucket
//! levels and degraded states are read when `/metrics` is scraped.
//!
//! The `key` label is bounded: only the keys with their own series
//! (`[metrics] key_series`, per key `metrics`) are named; every other key
//! is counted under `key="_other"`, so the size of `/metrics`, the time to
//! render it and the recorder's memory do not grow with the number of
//! keys. Series are interned by label and the recorder outlives reloads,
//! so a key keeps its counts across a reload.
//!
//! The per-key gauges (bucket level, degraded) are not in the recorder:
//! they are written at each scrape from the configuration in force
//! ([`Metrics::render`]), so a key a reload removes (or moves under
//! `_other`) leaves no gauge behind (the recorder cannot unregister a
//! series). Counters of a removed key keep their counts, as counters do.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dashmap::DashMap;
use metrics::{Counter, Gauge, Histogram, Recorder};
use metrics_exporter_prometheus::formatting::{
    sanitize_label_value, write_help_line, write_type_line,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::request::Endpoint;

use super::respond::Refusal;

pub(crate) const REQUESTS: &str = "gateway_requests_total";
pub(crate) const REFUSALS: &str = "gateway_refusals_total";
pub(crate) const RATE_LIMITED: &str = "gateway_rate_limited_total";
pub(crate) const UPSTREAM_LATENCY: &str = "gateway_upstream_latency_seconds";
pub(crate) const BUCKET_REMAINING: &str = "gateway_key_bucket_remaining";
pub(crate) const KEY_DEGRADED: &str = "gateway_key_degraded";
pub(crate) const DEGRADED_KEYS: &str = "gateway_degraded_keys";
pub(crate) const DEGRADATIONS: &str = "gateway_degradations_total";
pub(crate) const CANCELLED: &str = "gateway_streams_cancelled_total";
pub(crate) const IN_FLIGHT: &str = "gateway_requests_in_flight";
pub(crate) const CONNECTIONS: &str = "gateway_connections_open";
pub(crate) const IDLE_CLOSED: &str = "gateway_idle_connections_closed_total";
pub(crate) const AUTH_PEERS: &str = "gateway_auth_failure_peers";
pub(crate) const DEGRADE_SYNC_ERRORS: &str = "gateway_degrade_sync_errors_total";

/// The route label of an endpoint.
pub(crate) fn route_label(e: Option<Endpoint>) -> &'static str {
    match e {
        Some(Endpoint::NativeGeneration) => "native_generation",
        Some(Endpoint::NativeMultimodal) => "native_multimodal",
        Some(Endpoint::CompatibleChat) => "compatible_chat",
        Some(Endpoint::NativeEmbedding) => "native_embedding",
        Some(Endpoint::CompatibleEmbedding) => "compatible_embedding",
        Some(Endpoint::Task) => "task",
        Some(Endpoint::Files) => "files",
        Some(Endpoint::Batches) => "batches",
        Some(_) => "native_other",
        None => "unknown",
    }
}

/// Which `key` label a metric carries: a series id ([`Metrics::key_series`]),
/// or none (unauthenticated).
pub(crate) type KeyIdx = Option<u32>;

/// The `key` label of the keys without their own series.
pub(crate) const OTHER_KEYS: &str = "_other";

/// The `key` label of requests no client key authenticated.
pub(crate) const NO_KEY: &str = "none";

/// The `key` labels no client key may be named (configuration refuses
/// them), so that a key's series never merges with these.
pub(crate) const RESERVED_KEY_LABELS: [&str; 2] = [OTHER_KEYS, NO_KEY];

/// A client key's metrics.
#[derive(Clone)]
pub(crate) struct KeySeries {
    /// Its series id (shared by every key counted under `_other`).
    pub(crate) id: u32,
    /// Whether it has its own series (its gauges are written at each
    /// scrape); `false` for a key counted under `_other`.
    pub(crate) own: bool,
    pub(crate) degradations: Counter,
}

/// One client key's gauges at a scrape.
#[derive(Clone, Copy, Debug)]
pub(crate) struct KeyGauges<'a> {
    pub(crate) name: &'a str,
    /// Its bucket level.
    pub(crate) bucket: f64,
    pub(crate) degraded: bool,
}

const BUCKET_REMAINING_HELP: &str =
    "Requests a client key may send at once now (its token bucket level).";
const KEY_DEGRADED_HELP: &str = "1 while a client key is degraded, else 0.";

/// What one configuration's stacks record into, by key (configuration
/// order).
pub(crate) struct KeyMetrics {
    pub(crate) degradations: Vec<Counter>,
    /// Failed reads and writes of the degrade state shared through Redis.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    pub(crate) degrade_sync_errors: Counter,
}

/// Series labels, interned: a label keeps its id for the life of the
/// recorder.
#[derive(Default)]
struct Labels {
    ids: HashMap<Arc<str>, u32>,
    names: Vec<Arc<str>>,
}

pub(crate) struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    labels: Mutex<Labels>,
    requests: DashMap<(KeyIdx, &'static str, u16), Counter>,
    refusals: DashMap<(KeyIdx, Refusal), (Counter, Option<Counter>)>,
    latency: DashMap<&'static str, Histogram>,
    pub(crate) degraded_keys: Gauge,
    pub(crate) cancelled: Counter,
    pub(crate) in_flight: Gauge,
    pub(crate) connections: Gauge,
    pub(crate) idle_closed: Counter,
    pub(crate) auth_peers: Gauge,
    pub(crate) degrade_sync_errors: Counter,
    samples: AtomicU64,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        const BUCKETS: [f64; 16] = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 120.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(UPSTREAM_LATENCY.to_owned()), &BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        let describe = |name: &'static str, unit: Option<metrics::Unit>, what: &'static str| {
            recorder.describe_counter(name.into(), unit, what.into());
        };
        describe(
            REQUESTS,
            None,
            "Requests answered, by route, status and client key.",
        );
        describe(
            REFUSALS,
            None,
            "Requests the gateway answered itself, by client key and reason.",
        );
        describe(
            RATE_LIMITED,
            None,
            "429s issued by the gateway, by client key and reason.",
        );
        describe(
            DEGRADATIONS,
            None,
            "Times a client key was degraded after upstream failures.",
        );
        describe(
            DEGRADE_SYNC_ERRORS,
            None,
            "Failed reads and writes of the degrade state shared through Redis ([redis]).",
        );
        describe(
            CANCELLED,
            None,
            "Responses whose client went away before their end.",
        );
        recorder.describe_histogram(
            UPSTREAM_LATENCY.into(),
            Some(metrics::Unit::Seconds),
            "Time from sending a request upstream to its response headers, by route.".into(),
        );
        recorder.describe_gauge(
            DEGRADED_KEYS.into(),
            None,
            "Client keys degraded now.".into(),
        );
        recorder.describe_gauge(IN_FLIGHT.into(), None, "Requests being served now.".into());
        recorder.describe_gauge(
            CONNECTIONS.into(),
            None,
            "Client connections open now (Gateway::serve only).".into(),
        );
        describe(
            IDLE_CLOSED,
            None,
            "Idle client connections closed to make room under the connection cap or when out of file descriptors.",
        );
        recorder.describe_gauge(
            AUTH_PEERS.into(),
            None,
            "Client addresses with recent failed authentications being tracked.".into(),
        );
        let (degraded_keys, cancelled, in_flight) = metrics::with_local_recorder(&recorder, || {
            (
                metrics::gauge!(DEGRADED_KEYS),
                metrics::counter!(CANCELLED),
                metrics::gauge!(IN_FLIGHT),
            )
        });
        let (connections, idle_closed, auth_peers) =
            metrics::with_local_recorder(&recorder, || {
                (
                    metrics::gauge!(CONNECTIONS),
                    metrics::counter!(IDLE_CLOSED),
                    metrics::gauge!(AUTH_PEERS),
                )
            });
        let degrade_sync_errors =
            metrics::with_local_recorder(&recorder, || metrics::counter!(DEGRADE_SYNC_ERRORS));
        Self {
            recorder,
            handle,
            labels: Mutex::new(Labels::default()),
            requests: DashMap::new(),
            refusals: DashMap::new(),
            latency: DashMap::new(),
            degraded_keys,
            cancelled,
            in_flight,
            connections,
            idle_closed,
            auth_peers,
            degrade_sync_errors,
            samples: AtomicU64::new(0),
        }
    }

    /// The series of a client key: its own under `name`, or with `None`
    /// the shared `_other` one.
    pub(crate) fn key_series(&self, name: Option<&str>) -> KeySeries {
        let label = name.unwrap_or(OTHER_KEYS);
        let id = {
            let mut l = self.labels.lock().expect("labels lock");
            match l.ids.get(label) {
                Some(&id) => id,
                None => {
                    let id = u32::try_from(l.names.len()).expect("fewer than 2^32 labels");
                    let label: Arc<str> = Arc::from(label);
                    l.ids.insert(label.clone(), id);
                    l.names.push(label);
                    id
                }
            }
        };
        let label = label.to_owned();
        metrics::with_local_recorder(&self.recorder, || KeySeries {
            id,
            own: name.is_some(),
            degradations: metrics::counter!(DEGRADATIONS, "key" => label),
        })
    }

    fn key_label(&self, key: KeyIdx) -> String {
        key.and_then(|i| {
            let l = self.labels.lock().expect("labels lock");
            l.names.get(i as usize).map(|n| n.to_string())
        })
        .unwrap_or_else(|| NO_KEY.to_owned())
    }

    /// Counts one answered request.
    pub(crate) fn request(&self, key: KeyIdx, route: &'static str, status: u16) {
        if let Some(c) = self.requests.get(&(key, route, status)) {
            c.increment(1);
            return;
        }
        let label = self.key_label(key);
        let c = metrics::with_local_recorder(
            &self.recorder,
            || metrics::counter!(REQUESTS, "route" => route, "status" => status.to_string(), "key" => label),
        );
        c.increment(1);
        self.requests.insert((key, route, status), c);
    }

    /// Counts one refusal (and, for 429s, one rate-limited answer).
    pub(crate) fn refusal(&self, key: KeyIdx, refusal: Refusal) {
        let bump = |c: &(Counter, Option<Counter>)| {
            c.0.increment(1);
            if let Some(r) = &c.1 {
                r.increment(1);
            }
        };
        if let Some(c) = self.refusals.get(&(key, refusal)) {
            bump(&c);
            return;
        }
        let label = self.key_label(key);
        let c = metrics::with_local_recorder(&self.recorder, || {
            let limited = (refusal.status() == http::StatusCode::TOO_MANY_REQUESTS).then(|| {
                metrics::counter!(RATE_LIMITED, "key" => label.clone(), "reason" => refusal.label())
            });
            (
                metrics::counter!(REFUSALS, "key" => label, "reason" => refusal.label()),
                limited,
            )
        });
        bump(&c);
        self.refusals.insert((key, refusal), c);
    }

    /// Records the time to upstream response headers.
    pub(crate) fn upstream_latency(&self, route: &'static str, d: Duration) {
        // Histogram samples wait in a buffer until drained; drain it now and
        // then from the request path, so that memory stays bounded without a
        // background task even when nobody scrapes.
        if self.samples.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            self.upkeep();
        }
        if let Some(h) = self.latency.get(route) {
            h.record(d.as_secs_f64());
            return;
        }
        let h = metrics::with_local_recorder(
            &self.recorder,
            || metrics::histogram!(UPSTREAM_LATENCY, "route" => route),
        );
        h.record(d.as_secs_f64());
        self.latency.insert(route, h);
    }

    /// The Prometheus text exposition: the recorder's series, then the
    /// gauges of `keys` (the keys with their own series in the
    /// configuration in force, and only those).
    pub(crate) fn render(&self, keys: &[KeyGauges<'_>]) -> String {
        self.handle.run_upkeep();
        let mut out = self.handle.render();
        if keys.is_empty() {
            return out;
        }
        gauge_family(
            &mut out,
            BUCKET_REMAINING,
            BUCKET_REMAINING_HELP,
            keys,
            |k| k.bucket,
        );
        gauge_family(&mut out, KEY_DEGRADED, KEY_DEGRADED_HELP, keys, |k| {
            f64::from(u8::from(k.degraded))
        });
        out
    }

    /// Drains histogram buffers; call now and then.
    pub(crate) fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

/// Writes one gauge family of the client keys in Prometheus text.
fn gauge_family(
    out: &mut String,
    name: &str,
    help: &str,
    keys: &[KeyGauges<'_>],
    value: impl Fn(&KeyGauges<'_>) -> f64,
) {
    write_help_line(out, name, None, None, help);
    write_type_line(out, name, None, None, "gauge");
    for k in keys {
        let _ = writeln!(
            out,
            "{name}{{key=\"{}\"}} {}",
            sanitize_label_value(k.name),
            value(k)
        );
    }
    out.push('\n');
}
