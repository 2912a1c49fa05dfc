//! What the gateway costs: load generator -> gateway -> mock DashScope,
//! against load generator -> mock directly, in one run, on loopback.
//!
//! ```text
//! cargo bench --no-default-features --features gateway,mock --bench gateway
//! ```
//!
//! Three processes: this one (the load generator), the mock DashScope and
//! the gateway, each a child of this binary (`--role mock`,
//! `--role gateway`), so that the gateway's memory (VmRSS / VmHWM) and CPU
//! time are its own. On a 2-core machine the three share the cores: the
//! numbers include that contention, for the direct path too.
//!
//! Open loop: requests start on a fixed schedule (1 ms ticks), whatever
//! the answers do; a request's latency is from its send to the end of its
//! body. "Added" is the gateway quantile minus the direct quantile at the
//! same rate. The max rate comes from a closed loop of 64 concurrent
//! requests. Environment knobs: `GATEWAY_BENCH_SECS` (seconds per run,
//! default 2), `GATEWAY_BENCH_REPEAT` (alternating direct/gateway runs per
//! rate, medians shown, default 3), `GATEWAY_BENCH_RATES` (comma-separated, default
//! `500,1000,2000,3000,4000`), `GATEWAY_BENCH_WORKERS` (tokio worker threads
//! of the mock and gateway processes, default 2).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::time::Instant;

const KEY: &str = "gw-bench-key-0001";
const CHAT: &str = "/compatible-mode/v1/chat/completions";
const BODY: &str = r#"{"model":"qwen-plus","max_tokens":20,"messages":[{"role":"user","content":"Hello, world"}]}"#;
const STREAM_BODY: &str = r#"{"model":"qwen-plus","stream":true,"max_tokens":20,"messages":[{"role":"user","content":"Hello, world"}]}"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Waits until stdin closes (the parent is done or gone).
async fn parent_gone() {
    let _ = tokio::task::spawn_blocking(|| {
        let mut sink = Vec::new();
        let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut sink);
    })
    .await;
}

fn role_mock() {
    runtime(env_or("GATEWAY_BENCH_WORKERS", 2)).block_on(async {
        let mock = tower_qwen::mock::MockDashScope::builder()
            .accept_any_key(true)
            .start()
            .await
            .expect("mock starts");
        println!("PORT {}", mock.addr().port());
        std::io::stdout().flush().unwrap();
        parent_gone().await;
        mock.shutdown().await;
    });
}

fn role_gateway(upstream: &str) {
    runtime(env_or("GATEWAY_BENCH_WORKERS", 2)).block_on(async {
        let text = format!(
            r#"
            [upstream]
            base_url = "{upstream}"
            pool_max_idle_per_host = 512
            [[accounts]]
            name = "main"
            api_key = "sk-bench"
            quotas = "unlimited"
            [[keys]]
            name = "bench"
            key = "{KEY}"
            capacity = 1000000000
            refill_per_second = 1000000000
            "#
        );
        let cfg = tower_qwen::gateway::GatewayConfig::from_toml_with_env(&text, |_| None)
            .expect("bench config");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("PORT {}", listener.local_addr().unwrap().port());
        std::io::stdout().flush().unwrap();
        tower_qwen::gateway::Gateway::new(cfg)
            .serve(listener, parent_gone())
            .await
            .unwrap();
    });
}

struct Proc {
    child: Child,
    port: u16,
}

impl Proc {
    fn spawn(args: &[&str]) -> Proc {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("child said {line:?}"));
        Proc { child, port }
    }

    fn status_kb(&self, field: &str) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }

    /// User + system CPU seconds so far.
    fn cpu_secs(&self) -> f64 {
        let s =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start at ")".
        let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        // utime and stime are fields 14 and 15, i.e. 11 and 12 after ")".
        (ticks(11) + ticks(12)) / 100.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(512)
        .build_http()
}

fn request(port: u16, body: &'static str) -> Request<Full<Bytes>> {
    Request::post(format!("http://127.0.0.1:{port}{CHAT}"))
        .header("authorization", format!("Bearer {KEY}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))
        .unwrap()
}

/// One request to its body's end: latency in microseconds, or `None` on
/// an error or a non-200.
async fn one(client: HttpClient, port: u16) -> Option<u64> {
    let t = Instant::now();
    let res = client.request(request(port, BODY)).await.ok()?;
    let ok = res.status() == 200;
    res.into_body().collect().await.ok()?;
    ok.then(|| t.elapsed().as_micros() as u64)
}

struct Run {
    sent: u64,
    latencies: Vec<u64>,
    errors: u64,
    secs: f64,
}

impl Run {
    fn q(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies.len() as f64 - 1.0) * q).round() as usize;
        self.latencies[i] as f64 / 1000.0
    }

    fn rps(&self) -> f64 {
        self.latencies.len() as f64 / self.secs
    }
}

/// Open loop at `rate` per second for `secs`.
async fn open_loop(client: &HttpClient, port: u16, rate: u64, secs: f64) -> Run {
    let start = Instant::now();
    let total = (rate as f64 * secs) as u64;
    let mut handles = Vec::with_capacity(total as usize);
    let mut sent = 0u64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate as f64) as u64).min(total);
        while sent < due {
            handles.push(tokio::spawn(one(client.clone(), port)));
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut latencies = Vec::with_capacity(handles.len());
    let mut errors = 0;
    for h in handles {
        match h.await.ok().flatten() {
            Some(l) => latencies.push(l),
            None => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Run {
        sent,
        latencies,
        errors,
        secs,
    }
}

/// Closed loop: `conc` requests always in flight, for `secs`; answers/s.
async fn closed_loop(client: &HttpClient, port: u16, conc: usize, secs: f64) -> (f64, u64) {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let workers: Vec<_> = (0..conc)
        .map(|_| {
            let (client, done, errors) = (client.clone(), done.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    match one(client.clone(), port).await {
                        Some(_) => done.fetch_add(1, Ordering::Relaxed),
                        None => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    (
        done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(),
        errors.load(Ordering::Relaxed),
    )
}

/// Time to the first body frame of a streamed completion, sequentially,
/// `n` times; (p50, p99) in ms.
async fn ttfb(client: &HttpClient, port: u16, n: usize) -> (f64, f64) {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let res = client.request(request(port, STREAM_BODY)).await.unwrap();
        let mut body = res.into_body();
        let _ = body.frame().await;
        v.push(t.elapsed().as_micros() as u64);
        while body.frame().await.is_some() {}
    }
    v.sort_unstable();
    let q = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize] as f64 / 1000.0;
    (q(0.5), q(0.99))
}

fn driver() {
    let secs: f64 = env_or("GATEWAY_BENCH_SECS", 2.0);
    let repeat: usize = env_or("GATEWAY_BENCH_REPEAT", 3usize).max(1);
    let rates: Vec<u64> = std::env::var("GATEWAY_BENCH_RATES")
        .unwrap_or_else(|_| "500,1000,2000,3000,4000".into())
        .split(',')
        .filter_map(|r| r.trim().parse().ok())
        .collect();
    let mock = Proc::spawn(&["--role", "mock"]);
    let upstream = format!("http://127.0.0.1:{}", mock.port);
    let gateway = Proc::spawn(&["--role", "gateway", &upstream]);
    let rss_idle = gateway.status_kb("VmRSS:");
    // The load generator: one thread, so that the mock and the gateway
    // keep most of the two cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = client();
        // Warm both paths (connections, allocator).
        open_loop(&client, mock.port, 500, 0.5).await;
        open_loop(&client, gateway.port, 500, 0.5).await;

        println!(
            "\ngateway overhead, open loop, {secs} s per run, median of {repeat} alternating runs, non-stream compatible chat"
        );
        println!(
            "| target RPS | direct p50 / p99 ms | gateway p50 / p99 ms | added p50 / p99 ms | gateway achieved RPS | errors (direct/gw) | gateway CPU % of one core |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|");
        for &rate in &rates {
            // Direct and gateway runs alternate, `repeat` times each; the
            // table shows the median of each number over the repeats.
            let mut rows: Vec<[f64; 8]> = Vec::new();
            let (mut sent, mut errs) = (0, (0, 0));
            for _ in 0..repeat {
                let d = open_loop(&client, mock.port, rate, secs).await;
                let cpu0 = gateway.cpu_secs();
                let g = open_loop(&client, gateway.port, rate, secs).await;
                let cpu = (gateway.cpu_secs() - cpu0) / g.secs * 100.0;
                sent += g.sent;
                errs = (errs.0 + d.errors, errs.1 + g.errors);
                rows.push([
                    d.q(0.5),
                    d.q(0.99),
                    g.q(0.5),
                    g.q(0.99),
                    g.q(0.5) - d.q(0.5),
                    g.q(0.99) - d.q(0.99),
                    g.rps(),
                    cpu,
                ]);
            }
            let m = |i: usize| {
                let mut v: Vec<f64> = rows.iter().map(|r| r[i]).collect();
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            println!(
                "| {rate} | {:.3} / {:.3} | {:.3} / {:.3} | {:+.3} / {:+.3} | {:.0} ({} sent) | {}/{} | {:.0} |",
                m(0),
                m(1),
                m(2),
                m(3),
                m(4),
                m(5),
                m(6),
                sent,
                errs.0,
                errs.1,
                m(7),
            );
        }

        println!("\nmax throughput, closed loop (64 in flight), {secs} s");
        println!("| path | answers/s | errors |");
        println!("|---|---:|---:|");
        let (d, de) = closed_loop(&client, mock.port, 64, secs).await;
        println!("| direct | {d:.0} | {de} |");
        let (g, ge) = closed_loop(&client, gateway.port, 64, secs).await;
        println!("| gateway | {g:.0} | {ge} |");

        println!("\ntime to first byte of a stream, 200 sequential streamed completions");
        println!("| path | p50 ms | p99 ms |");
        println!("|---|---:|---:|");
        let (a, b) = ttfb(&client, mock.port, 200).await;
        println!("| direct | {a:.3} | {b:.3} |");
        let (c, e) = ttfb(&client, gateway.port, 200).await;
        println!("| gateway | {c:.3} | {e:.3} |");
    });
    println!("\ngateway memory");
    println!("| idle VmRSS | VmRSS after the runs | peak VmHWM |");
    println!("|---:|---:|---:|");
    println!(
        "| {:.1} MB | {:.1} MB | {:.1} MB |",
        rss_idle as f64 / 1024.0,
        gateway.status_kb("VmRSS:") as f64 / 1024.0,
        gateway.status_kb("VmHWM:") as f64 / 1024.0,
    );
    println!(
        "(mock VmHWM {:.1} MB; {} cores)",
        mock.status_kb("VmHWM:") as f64 / 1024.0,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        match args.get(i + 1).map(String::as_str) {
            Some("mock") => role_mock(),
            Some("gateway") => role_gateway(args.get(i + 2).expect("upstream URL")),
            other => panic!("unknown role {other:?}"),
        }
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` and the like: nothing to measure.
        println!("gateway bench: run with `cargo bench` to measure");
        return;
    }
    driver();
}
