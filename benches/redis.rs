//! Distributed limiter decisions through a private loopback redis-server:
//! decisions per second, decision latency (p50, p99) and Redis's own CPU
//! time per decision (from `INFO commandstats`) for
//!
//! * the tower-qwen Redis backend: exact GCRA decisions by the script, the
//!   decisions waiting at the same moment batched in one script call;
//! * the same with local pre-reservation (leases: 20 requests / 10,000
//!   tokens per slice, 50 ms; overshoot bound in `Lease`'s docs);
//! * a naive fixed-window limiter (`INCR` + `PEXPIRE` in one pipelined
//!   round trip per decision), the usual Redis rate limiter;
//! * the in-memory limiter, for reference (no network),
//!
//! each with one key shared by every task and with a key per task.
//!
//! With 1 task (sequential decisions: pure latency) and 32 concurrent tasks
//! (requests pipelined on one multiplexed connection). Every decision admits
//! (quotas far above the load), so what is measured is the decision path.
//! Bounded: a few thousand decisions per run, three rounds, medians
//! reported. Run: `cargo bench --bench redis --features redis`.

#[path = "../tests/redis/server.rs"]
mod server;

use std::future::Future;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;
use tower_qwen::rate_limit::{Cost, Limits, Quota, RateLimiter};
use tower_qwen::redis::{Lease, RedisLimiter, connect_lazy};

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap()
}

/// A million requests and a billion tokens a second: nothing is refused.
fn limits() -> Limits {
    Limits::requests(Quota::per_second(nz(1_000_000)))
        .and_tokens(Quota::per_second(nz(1_000_000_000)))
}

const COST: Cost = Cost::call(500);

struct Run {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// Runs `per_task` decisions in each of `tasks` tasks; `decide(task)`
/// returns whether the decision admitted.
async fn measure<F, Fut>(tasks: usize, per_task: usize, decide: F) -> Run
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let start = Instant::now();
    let mut set = JoinSet::new();
    for task in 0..tasks {
        let decide = decide.clone();
        set.spawn(async move {
            let mut lat = Vec::with_capacity(per_task);
            for _ in 0..per_task {
                let t = Instant::now();
                assert!(
                    decide(task as u64).await,
                    "the bench quota must admit everything"
                );
                lat.push(t.elapsed());
            }
            lat
        });
    }
    let mut all = Vec::with_capacity(tasks * per_task);
    while let Some(lat) = set.join_next().await {
        all.extend(lat.unwrap());
    }
    let elapsed = start.elapsed();
    all.sort_unstable();
    let q = |p: f64| all[((all.len() - 1) as f64 * p) as usize];
    Run {
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: q(0.50),
        p99: q(0.99),
    }
}

/// Redis's own CPU time (µs) spent in commands since the last reset.
async fn server_usec(url: &str, reset: bool) -> f64 {
    let mut c = connect_lazy(url, Duration::from_secs(5)).unwrap();
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    let mut total = 0.0;
    for line in info.lines() {
        if line.starts_with("cmdstat_info") || line.starts_with("cmdstat_config") {
            continue;
        }
        if let Some(us) = line
            .split([':', ','])
            .find_map(|kv| kv.strip_prefix("usec="))
        {
            total += us.parse::<f64>().unwrap();
        }
    }
    if reset {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    total
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Row {
    name: String,
    tasks: usize,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    trips: String,
    /// Redis CPU per decision (µs).
    cpu: f64,
}

async fn scenario<F, Fut>(
    url: &str,
    name: String,
    tasks: usize,
    per_task: usize,
    decide: F,
    trips: impl Fn() -> Option<u64>,
) -> Row
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    // Warm-up (connections, script cache), then three measured rounds.
    measure(tasks, per_task / 4 + 1, decide.clone()).await;
    let before = trips();
    server_usec(url, true).await;
    let mut runs = Vec::new();
    for _ in 0..3 {
        runs.push(measure(tasks, per_task, decide.clone()).await);
    }
    let total = (3 * tasks * per_task) as f64;
    let cpu = server_usec(url, false).await / total;
    let trips = match (before, trips()) {
        (Some(0), Some(0)) => "1 (by design)".to_owned(),
        (Some(a), Some(b)) => format!("{:.3}", (b - a) as f64 / total),
        _ => "-".to_owned(),
    };
    let nanos = |f: fn(&Run) -> Duration| {
        Duration::from_nanos(median(runs.iter().map(|r| f(r).as_nanos() as f64).collect()) as u64)
    };
    Row {
        name,
        tasks,
        per_sec: median(runs.iter().map(|r| r.per_sec).collect()),
        p50: nanos(|r| r.p50),
        p99: nanos(|r| r.p99),
        trips,
        cpu,
    }
}

/// Which key each task decides on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keys {
    /// One key shared by every task.
    One,
    /// A key of its own per task.
    PerTask,
}

impl Keys {
    fn of(self, task: u64) -> u64 {
        match self {
            Keys::One => 0,
            Keys::PerTask => 1 + task,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Keys::One => "one key",
            Keys::PerTask => "a key per task",
        }
    }
}

async fn run(url: String) {
    let mut rows = Vec::new();
    for (tasks, per_task) in [(1usize, 2_000usize), (32, 250)] {
        for keys in [Keys::One, Keys::PerTask] {
            if tasks == 1 && keys == Keys::PerTask {
                continue;
            }
            let tag = |what: &str| format!("bench:{what}{tasks}{}:", keys.name().len());
            // The Redis backend: exact decisions, batched.
            let lim: RedisLimiter<u64> = RateLimiter::builder(limits())
                .redis(connect_lazy(&url, Duration::from_secs(5)).unwrap())
                .prefix(tag("gcra"))
                .timeout(Duration::from_secs(5))
                .build_keyed();
            let l = lim.clone();
            let decide = move |task| {
                let l = l.clone();
                async move { l.check(&keys.of(task), COST).await.is_ok() }
            };
            let name = format!("tower-qwen Redis backend, exact, {}", keys.name());
            let trips = move || Some(lim.stats().round_trips);
            rows.push(scenario(&url, name, tasks, per_task, decide, trips).await);

            // The same with leases: 20 requests / 10,000 tokens per slice,
            // 50 ms.
            let lim: RedisLimiter<u64> = RateLimiter::builder(limits())
                .redis(connect_lazy(&url, Duration::from_secs(5)).unwrap())
                .prefix(tag("lease"))
                .timeout(Duration::from_secs(5))
                .lease(Lease::new(Cost::new(20, 10_000), Duration::from_millis(50)))
                .build_keyed();
            let l = lim.clone();
            let decide = move |task| {
                let l = l.clone();
                async move { l.check(&keys.of(task), COST).await.is_ok() }
            };
            let name = format!("tower-qwen Redis backend + lease, {}", keys.name());
            let trips = move || Some(lim.stats().round_trips);
            rows.push(scenario(&url, name, tasks, per_task, decide, trips).await);

            // Naive fixed window: INCR + PEXPIRE (one pipelined round trip).
            let conn = connect_lazy(&url, Duration::from_secs(5)).unwrap();
            let prefix: Arc<str> = Arc::from(tag("naive"));
            let decide = move |task| {
                let mut c = conn.clone();
                let key = format!("{prefix}{}", keys.of(task));
                async move {
                    let (n,): (u64,) = redis::pipe()
                        .incr(&key, 1)
                        .cmd("PEXPIRE")
                        .arg(&key)
                        .arg(1000)
                        .arg("NX")
                        .ignore()
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    n <= 1_000_000
                }
            };
            let name = format!("naive INCR+PEXPIRE fixed window, {}", keys.name());
            rows.push(scenario(&url, name, tasks, per_task, decide, || Some(0)).await);
        }

        // The in-memory limiter, for reference.
        let mem = RateLimiter::new(limits());
        let decide = move |_task| {
            let m = mem.clone();
            async move { m.check(&(), COST).is_ok() }
        };
        let name = "in-memory RateLimiter (reference)".to_owned();
        rows.push(scenario(&url, name, tasks, per_task * 10, decide, || None).await);
    }
    // "vs naive": against the naive limiter with the same tasks and keys.
    let naive = |r: &Row| {
        let keys = r.name.rsplit(", ").next().unwrap_or("");
        rows.iter()
            .find(|n| n.tasks == r.tasks && n.name.starts_with("naive") && n.name.ends_with(keys))
            .or_else(|| {
                rows.iter()
                    .find(|n| n.tasks == r.tasks && n.name.starts_with("naive"))
            })
            .map(|n| n.per_sec)
            .unwrap()
    };
    println!();
    println!(
        "| scenario | tasks | decisions/s | vs naive | p50 | p99 | script calls/decision | Redis CPU/decision |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.0} | {:.2}x | {:.1} µs | {:.1} µs | {} | {:.2} µs |",
            r.name,
            r.tasks,
            r.per_sec,
            r.per_sec / naive(r),
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.trips,
            r.cpu
        );
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a filter would be ignored.
    let server = server::RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(server.url()));
    drop(server);
}
