//! What many client keys cost the gateway: `/metrics` size, scrape time
//! and memory with 1k / 10k / 100k keys, with the `key` label bounded
//! (`[metrics] key_series`, default 100) beside every key named
//! (`key_series = N`, the behaviour before the bound), in one run.
//!
//! ```text
//! cargo bench --no-default-features --features gateway,mock --bench gateway_keys
//! ```
//!
//! Each configuration runs in its own child process (this binary with
//! `--role run N SERIES`), so that its memory is its own: a mock DashScope
//! and the gateway in front of it, on loopback, in one tokio runtime. The
//! child reads its VmRSS before parsing the configuration, after building
//! the gateway, and after the requests and scrapes; it sends a bounded
//! number of requests spread evenly over the keys (so at 100k keys most
//! keys are never used, as in a real fleet), then scrapes `/metrics`
//! several times and reports the median. Environment knobs:
//! `GATEWAY_KEYS_BENCH_KEYS` (comma-separated, default `1000,10000,100000`),
//! `GATEWAY_KEYS_BENCH_REQUESTS` (default 2000), `GATEWAY_KEYS_BENCH_SCRAPES`
//! (default 7).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

const CHAT: &str = "/compatible-mode/v1/chat/completions";
const BODY: &str = r#"{"model":"qwen-plus","max_tokens":20,"messages":[{"role":"user","content":"Hello, world"}]}"#;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// This process's resident set, in bytes.
fn rss() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn key_of(i: usize) -> String {
    format!("gw-keys-bench-{i:07}")
}

fn config(upstream: &str, keys: usize, series: Option<usize>) -> String {
    let mut text = format!(
        r#"
        [upstream]
        base_url = "{upstream}"
        [[accounts]]
        name = "main"
        api_key = "sk-bench"
        quotas = "unlimited"
        "#
    );
    if let Some(n) = series {
        text.push_str(&format!("[metrics]\nkey_series = {n}\n"));
    }
    for i in 0..keys {
        text.push_str(&format!(
            "[[keys]]\nname = \"k{i}\"\nkey = \"{}\"\ncapacity = 1000000\nrefill_per_second = 1000000\n",
            key_of(i)
        ));
    }
    text
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn get(client: &HttpClient, port: u16, path: &str) -> (u16, Bytes) {
    let req = Request::get(format!("http://127.0.0.1:{port}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = client.request(req).await.expect("GET");
    let status = res.status().as_u16();
    (status, res.into_body().collect().await.unwrap().to_bytes())
}

async fn chat(client: &HttpClient, port: u16, key: &str) -> u16 {
    let req = Request::post(format!("http://127.0.0.1:{port}{CHAT}"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
        .unwrap();
    let res = client.request(req).await.expect("POST");
    let status = res.status().as_u16();
    res.into_body().collect().await.unwrap();
    status
}

/// The child: one gateway with `keys` keys and `key_series = series`
/// (`None`: the default). Prints one `RESULT` line.
fn role_run(keys: usize, series: Option<usize>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let mock = tower_qwen::mock::MockDashScope::builder()
            .accept_any_key(true)
            .start()
            .await
            .expect("mock starts");
        let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
        let text = config(&mock.base_url(), keys, series);
        let rss_base = rss();
        let t = Instant::now();
        let cfg = tower_qwen::gateway::GatewayConfig::from_toml_with_env(&text, |_| None)
            .expect("bench config");
        drop(text);
        let gateway = tower_qwen::gateway::Gateway::new(cfg);
        let build_secs = t.elapsed().as_secs_f64();
        let rss_built = rss();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(gateway.serve(listener, async {
            let _ = stopped.await;
        }));

        // Requests spread evenly over the keys, 16 at a time.
        let requests: usize = env_or("GATEWAY_KEYS_BENCH_REQUESTS", 2000);
        let mut tasks = tokio::task::JoinSet::new();
        for lane in 0..16 {
            let client = client.clone();
            tasks.spawn(async move {
                let mut bad = 0u32;
                for j in (lane..requests).step_by(16) {
                    if chat(&client, port, &key_of(j * keys / requests.max(1))).await != 200 {
                        bad += 1;
                    }
                }
                bad
            });
        }
        let mut bad = 0;
        while let Some(b) = tasks.join_next().await {
            bad += b.expect("request task");
        }
        assert_eq!(bad, 0, "every request answers 200");

        // Scrapes: one to warm up, then the median of several.
        let scrapes: usize = env_or("GATEWAY_KEYS_BENCH_SCRAPES", 7);
        let (status, body) = get(&client, port, "/metrics").await;
        assert_eq!(status, 200);
        let mut times = Vec::with_capacity(scrapes);
        let mut size = body.len();
        for _ in 0..scrapes.max(1) {
            let t = Instant::now();
            let (_, body) = get(&client, port, "/metrics").await;
            times.push(t.elapsed());
            size = body.len();
        }
        times.sort_unstable();
        let text = String::from_utf8_lossy(&body);
        let samples = text.lines().filter(|l| !l.starts_with('#')).count();
        let labels = text
            .lines()
            .filter(|l| l.starts_with("gateway_key_degraded{"))
            .count();
        let rss_end = rss();
        let _ = stop.send(());
        server.await.unwrap().unwrap();
        mock.shutdown().await;
        println!(
            "RESULT {keys} {} {size} {samples} {labels} {:.3} {build_secs:.2} {} {} {}",
            series.map_or("default".to_owned(), |n| n.to_string()),
            times[times.len() / 2].as_secs_f64() * 1e3,
            rss_base,
            rss_built,
            rss_end,
        );
    });
}

fn mb(b: f64) -> String {
    format!("{:.1}", b / 1_048_576.0)
}

fn driver() {
    let counts: Vec<usize> = std::env::var("GATEWAY_KEYS_BENCH_KEYS")
        .unwrap_or_else(|_| "1000,10000,100000".to_owned())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    println!(
        "| keys | key_series | /metrics | samples | keys named | scrape (median) | build | RSS after build | RSS growth at end |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &counts {
        for series in ["default".to_owned(), n.to_string()] {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--role", "run", &n.to_string(), &series])
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("spawn child");
            let out = BufReader::new(child.stdout.take().unwrap());
            let line = out
                .lines()
                .map_while(Result::ok)
                .find(|l| l.starts_with("RESULT "))
                .expect("child reports");
            assert!(child.wait().unwrap().success());
            let f: Vec<&str> = line.split_whitespace().skip(1).collect();
            let num = |i: usize| f[i].parse::<f64>().unwrap();
            let size = num(2);
            println!(
                "| {} | {} | {} | {} | {} | {:.2} ms | {:.2} s | +{} MB | +{} MB |",
                f[0],
                if series == "default" {
                    "default (100)".to_owned()
                } else {
                    format!("{series} (all)")
                },
                if size >= 1_048_576.0 {
                    format!("{} MB", mb(size))
                } else {
                    format!("{:.1} kB", size / 1024.0)
                },
                f[3],
                f[4],
                num(5),
                num(6),
                mb(num(8) - num(7)),
                mb(num(9) - num(7)),
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        let n = args.get(i + 2).and_then(|v| v.parse().ok()).expect("N");
        let series = args.get(i + 3).and_then(|v| v.parse().ok());
        role_run(n, series);
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --benches` and the like: nothing to measure.
        println!("gateway_keys bench: run with `cargo bench` to measure");
        return;
    }
    driver();
}
