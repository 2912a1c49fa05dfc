//! Issue 17, items 4 and 6: the installable gateway (`qwen-gateway`:
//! `--check-config`, logs, SIGHUP), reloads that keep connections, HTTP/2
//! cleartext, and the bounded `key` label of `/metrics`.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use super::*;

const CAROL: &str = "gw-carol-key-0003";
const BIN: &str = env!("CARGO_BIN_EXE_qwen-gateway");

/// The value of the sample of `/metrics` whose line starts with `prefix`.
fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn requests_of(metrics: &str, key: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("gateway_requests_total{") && l.contains(&format!("key=\"{key}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A request on a connection of its own.
fn on_conn(env: &Env, path: &str, key: &str, body: &str) -> Request<Full<Bytes>> {
    let req = env.request(path, Some(key), &[], body);
    let (mut parts, body) = req.into_parts();
    parts.uri = path.parse().unwrap();
    parts.headers.insert("host", "gw".parse().unwrap());
    Request::from_parts(parts, body)
}

/// A reload (what SIGHUP does) swaps keys and limits without dropping a
/// connection: a stream in progress finishes under the old configuration,
/// the keep-alive connection it came on serves the next request under the
/// new one, a key added works, a key removed gets 401, and a key kept
/// keeps its metrics series.
#[tokio::test(start_paused = true)]
async fn a_reload_swaps_keys_and_limits_and_keeps_connections() {
    let latency = Latency::none().per_token(Dist::fixed(Duration::from_millis(100)));
    let m = mock()
        .faults(FaultPlan::new().latency(latency))
        .start()
        .await
        .unwrap();
    let base = m.base_url();
    let env = start_with(m, &config_for(&base, "")).await;
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
    assert_eq!(
        env.post(CHAT, Some(BOB), &chat("qwen-plus", false))
            .await
            .status,
        200
    );
    let before = env.gateway.render_metrics();
    assert_eq!(requests_of(&before, "bob"), 1.0, "{before}");

    // Alice opens a stream on a keep-alive connection.
    let mut conn = connection(env.addr).await;
    conn.ready().await.unwrap();
    let res = conn
        .send_request(on_conn(&env, CHAT, ALICE, &chat("qwen-plus", true)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    advance(Duration::from_millis(300)).await;

    // The new configuration: Alice gone, Carol added with a bucket of 1,
    // Bob's bucket down to 1.
    let next = format!(
        r#"
        [upstream]
        base_url = "{base}"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        [[keys]]
        name = "bob"
        sha256 = "{bob}"
        capacity = 1
        refill_per_second = 0.01
        [[keys]]
        name = "carol"
        key = "{CAROL}"
        capacity = 1
        refill_per_second = 0.01
        "#,
        bob = key_sha256(BOB),
    );
    env.gateway
        .reload(GatewayConfig::from_toml_with_env(&next, |_| None).unwrap());

    // The stream in progress ends whole.
    let wire = res
        .into_body()
        .collect()
        .await
        .expect("a clean end")
        .to_bytes();
    let (deltas, finish, done) = compat_deltas(&wire);
    assert_eq!(
        (deltas.len(), finish.as_deref(), done),
        (20, Some("stop"), true)
    );

    // The same connection serves the next requests, under the new keys.
    for (key, status) in [
        (CAROL, 200),
        (CAROL, 429),
        (ALICE, 401),
        (BOB, 200),
        (BOB, 429),
    ] {
        conn.ready().await.expect("the connection stayed open");
        let res = conn
            .send_request(on_conn(&env, CHAT, key, &chat("qwen-plus", false)))
            .await
            .unwrap();
        assert_eq!(res.status(), status, "{key}");
        res.into_body().collect().await.unwrap();
    }
    assert!(!conn.is_closed());
    let after = env.gateway.render_metrics();
    assert_eq!(
        requests_of(&after, "bob"),
        3.0,
        "Bob's series went on counting:\n{after}"
    );
    assert_eq!(requests_of(&after, "carol"), 2.0, "{after}");
}

fn config_for(base: &str, extra: &str) -> String {
    format!(
        r#"
        [upstream]
        base_url = "{base}"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        [[keys]]
        name = "bob"
        sha256 = "{bob}"
        [[keys]]
        name = "alice"
        key = "{ALICE}"
        {extra}
        "#,
        bob = key_sha256(BOB),
    )
}

/// Issue 17: a reload that removes a client key (or takes its own series
/// away) removes its gauges from `/metrics`; they used to stay, frozen at
/// their last value. Its counters keep their counts; the new keys have
/// their gauges.
#[tokio::test]
async fn a_reload_removes_the_gauges_of_the_keys_it_removes() {
    let m = mock().start().await.unwrap();
    let base = m.base_url();
    let env = start_with(m, &config_for(&base, "")).await;
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
    let scrape =
        || async { String::from_utf8(env.get("/metrics", None).await.body.to_vec()).unwrap() };
    let gauges = |m: &str, key: &str| -> Vec<String> {
        m.lines()
            .filter(|l| {
                (l.starts_with("gateway_key_bucket_remaining{")
                    || l.starts_with("gateway_key_degraded{"))
                    && l.contains(&format!("key=\"{key}\""))
            })
            .map(str::to_owned)
            .collect()
    };
    let before = scrape().await;
    assert_eq!(gauges(&before, "alice").len(), 2, "{before}");
    assert_eq!(gauges(&before, "bob").len(), 2, "{before}");

    // Alice removed, Bob counted under `_other`, Carol added.
    let next = format!(
        r#"
        [upstream]
        base_url = "{base}"
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        [[keys]]
        name = "bob"
        sha256 = "{bob}"
        metrics = false
        [[keys]]
        name = "carol"
        key = "{CAROL}"
        capacity = 7
        "#,
        bob = key_sha256(BOB),
    );
    env.gateway
        .reload(GatewayConfig::from_toml_with_env(&next, |_| None).unwrap());
    for m in [scrape().await, env.gateway.render_metrics()] {
        assert_eq!(gauges(&m, "alice"), Vec::<String>::new(), "{m}");
        assert_eq!(gauges(&m, "bob"), Vec::<String>::new(), "{m}");
        assert_eq!(
            gauges(&m, "carol"),
            [
                "gateway_key_bucket_remaining{key=\"carol\"} 7",
                "gateway_key_degraded{key=\"carol\"} 0"
            ],
            "{m}"
        );
        for family in ["gateway_key_bucket_remaining", "gateway_key_degraded"] {
            assert_eq!(m.matches(&format!("# TYPE {family} gauge\n")).count(), 1);
            assert_eq!(m.matches(&format!("# HELP {family} ")).count(), 1);
        }
        assert_eq!(requests_of(&m, "alice"), 1.0, "a counter keeps its count");
    }
}

/// A file that does not validate changes nothing.
#[tokio::test]
async fn an_invalid_file_is_not_reloaded() {
    let env = start(mock(), "").await;
    let dir = std::env::temp_dir().join(format!("tq-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[[keys]]\nname = \"x\"\nkey = \"short\"\n").unwrap();
    let e = env.gateway.reload_from(&path).unwrap_err();
    assert!(e.fields().any(|f| f == "keys[0].key"), "{e}");
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// HTTP/2 with prior knowledge (h2c) from a client is served like
/// HTTP/1.1, streams included.
#[tokio::test]
async fn h2c_clients_are_served() {
    let env = start(mock(), "").await;
    let h2: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let res = h2
        .request(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", false)))
        .await
        .expect("the gateway speaks h2c");
    assert_eq!(res.version(), http::Version::HTTP_2);
    assert_eq!(res.status(), 200);
    assert!(res.headers().contains_key("x-ratelimit-remaining"));
    let body = res.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["object"], "chat.completion");

    let res = h2
        .request(env.request(CHAT, Some(ALICE), &[], &chat("qwen-plus", true)))
        .await
        .unwrap();
    assert_eq!(res.version(), http::Version::HTTP_2);
    let wire = res.into_body().collect().await.unwrap().to_bytes();
    let (_, finish, done) = compat_deltas(&wire);
    assert_eq!((finish.as_deref(), done), (Some("stop"), true));

    // Refusals in shape too; HTTP/1.1 still works beside it.
    let res = h2
        .request(env.request(CHAT, Some("gw-nobody-0000"), &[], "{}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(env.alice_chat("qwen-plus").await, 200);
}

/// Item 6: only `[metrics] key_series` keys (in file order; `metrics =
/// true` always, `false` never) have their own series; the rest are
/// counted under `key="_other"`, so `/metrics` does not grow with keys.
#[tokio::test]
async fn metrics_name_a_bounded_number_of_keys() {
    let mock = mock().start().await.unwrap();
    let mut text = format!(
        r#"
        [upstream]
        base_url = "{}"
        [metrics]
        key_series = 3
        [[accounts]]
        name = "main"
        api_key = "{UPSTREAM}"
        quotas = "unlimited"
        "#,
        mock.base_url()
    );
    for i in 0..50 {
        let choice = match i {
            0 => "metrics = false",
            40 => "metrics = true",
            _ => "",
        };
        text.push_str(&format!(
            "[[keys]]\nname = \"k{i}\"\nkey = \"gw-key-{i:04}-secret\"\n{choice}\n"
        ));
    }
    let env = start_with(mock, &text).await;
    for i in [0, 1, 5, 40, 41] {
        let key = format!("gw-key-{i:04}-secret");
        assert_eq!(
            env.post(CHAT, Some(&key), &chat("qwen-plus", false))
                .await
                .status,
            200
        );
    }
    let m = String::from_utf8(env.get("/metrics", None).await.body.to_vec()).unwrap();
    let mut named: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("gateway_key_bucket_remaining{"))
        .map(|l| l.split('"').nth(1).unwrap())
        .collect();
    named.sort_unstable();
    // k40 opted in; k0 opted out; k1 and k2 fill the 3 series.
    assert_eq!(named, ["k1", "k2", "k40"], "{m}");
    assert_eq!(requests_of(&m, "k1"), 1.0);
    assert_eq!(requests_of(&m, "k40"), 1.0);
    assert_eq!(requests_of(&m, "_other"), 3.0, "k0, k5, k41:\n{m}");
    for i in [0, 5, 41] {
        assert!(!m.contains(&format!("key=\"k{i}\"")), "k{i}:\n{m}");
    }
    assert_eq!(sample(&m, "gateway_degraded_keys"), Some(0.0));
}

// ---------------------------------------------------------------------------
// The program.

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tq-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const SECRETS: [&str; 3] = [
    "sk-upstream-very-secret",
    "sk-from-env-very-secret",
    "gw-alice-very-secret",
];

/// `--check-config` on a valid file prints the effective configuration
/// (defaults filled in, the environment applied) and no secret.
#[test]
fn check_config_prints_the_effective_config_redacted() {
    let path = temp_file(
        "good.toml",
        &format!(
            r#"
            [upstream]
            base_url = "http://127.0.0.1:9"
            [[accounts]]
            name = "main"
            api_keys = ["{}"]
            api_key_env = "TQ_TEST_UPSTREAM_KEY"
            [[keys]]
            name = "alice"
            key = "{}"
            capacity = 5
            "#,
            SECRETS[0], SECRETS[2]
        ),
    );
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(&path)
        .env("TQ_TEST_UPSTREAM_KEY", SECRETS[1])
        .env("QWEN_GATEWAY_SERVER_LISTEN", "127.0.0.1:9099")
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: toml::Table = stdout.parse().expect("the output is TOML");
    assert_eq!(shown["server"]["listen"].as_str(), Some("127.0.0.1:9099"));
    assert_eq!(shown["server"]["body_read_timeout"].as_str(), Some("30s"));
    let key = &shown["keys"].as_array().unwrap()[0];
    assert_eq!(key["capacity"].as_integer(), Some(5));
    assert_eq!(key["refill_per_second"].as_float(), Some(30.0));
    assert_eq!(
        key["key"].as_str().unwrap(),
        format!("<redacted:{}>", &key_sha256(SECRETS[2])[..8])
    );
    let upstream = shown["accounts"].as_array().unwrap()[0]["api_keys"]
        .as_array()
        .unwrap();
    assert_eq!(upstream.len(), 2, "the file's key and the environment's");
    assert!(
        upstream
            .iter()
            .all(|k| k.as_str().unwrap().starts_with("<redacted:"))
    );
    for s in SECRETS.iter().copied().chain([&key_sha256(SECRETS[2])[..]]) {
        assert!(!stdout.contains(s), "{s} shown:\n{stdout}");
    }
}

/// `--check-config` on a bad file fails, names every bad field, and echoes
/// no secret.
#[test]
fn check_config_refuses_a_bad_file_naming_the_fields() {
    let path = temp_file(
        "bad.toml",
        &format!(
            r#"
            [server]
            listen = "nowhere"
            [[accounts]]
            name = "main"
            api_key = ["{}"]
            [[keys]]
            name = "alice"
            key = "{}"
            colour = "blue"
            "#,
            SECRETS[0], SECRETS[2]
        ),
    );
    let out = Command::new(BIN)
        .args(["--check-config", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    for field in ["server.listen", "accounts[0].api_key", "keys[0].colour"] {
        assert!(stderr.contains(field), "{field} not named:\n{stderr}");
    }
    for s in SECRETS {
        assert!(!stderr.contains(s), "{s} shown:\n{stderr}");
    }
}

/// Lines of a child's stdout, read on a thread; waits are bounded.
struct Lines(std::sync::mpsc::Receiver<String>);

impl Lines {
    fn until(&self, what: &str) -> Vec<String> {
        let mut seen = Vec::new();
        loop {
            match self.0.recv_timeout(Duration::from_secs(60)) {
                Ok(l) => {
                    let hit = l.contains(what);
                    seen.push(l);
                    if hit {
                        return seen;
                    }
                }
                Err(e) => panic!("no line with {what:?} ({e}); got:\n{}", seen.join("\n")),
            }
        }
    }
}

fn run(format: &str, config: &std::path::Path) -> (std::process::Child, Lines) {
    run_with(format, config, &[])
}

/// [`run`] with more environment variables.
fn run_with(
    format: &str,
    config: &std::path::Path,
    vars: &[(&str, &str)],
) -> (std::process::Child, Lines) {
    let mut child = Command::new(BIN)
        .args(["--mock", "--log-format", format, "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .envs(vars.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines() {
            let Ok(l) = l else { break };
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    (child, Lines(rx))
}

/// The program logs plain text without colour codes when stdout is not a
/// terminal, JSON lines with `--log-format json`, and reloads on SIGHUP.
#[cfg(unix)]
#[test]
fn the_program_logs_plain_or_json_and_reloads_on_sighup() {
    let path = temp_file(
        "run.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n[[accounts]]\nname = \"main\"\napi_key_env = \"DASHSCOPE_API_KEY\"\n[[keys]]\nname = \"alice\"\nkey = \"gw-alice-0001\"\n",
    );
    let (mut child, lines) = run("text", &path);
    let seen = lines.until("gateway listening");
    child.kill().unwrap();
    child.wait().unwrap();
    let text = seen.join("\n");
    assert!(text.contains("mock DashScope started"), "{text}");
    assert!(
        !text.contains('\x1b'),
        "colour codes off a terminal:\n{text}"
    );

    let (mut child, lines) = run("json", &path);
    let mut seen = lines.until("gateway listening");
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    seen.extend(lines.until("gateway configuration reloaded"));
    child.kill().unwrap();
    child.wait().unwrap();
    for l in &seen {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{l}");
    }
}

/// The README's gateway configuration is valid as written.
#[test]
fn the_readme_gateway_config_is_valid() {
    let readme = include_str!("../../README.md");
    let start = readme
        .find("A minimal `gateway.toml`")
        .expect("the section");
    let block = &readme[start..];
    let block = &block[block.find("```toml\n").unwrap() + 8..];
    let block = &block[..block.find("```").unwrap()];
    let env = |name: &str| {
        matches!(name, "DASHSCOPE_API_KEY" | "GATEWAY_KEY_TEAM_B")
            .then(|| "sk-readme-key-0001".to_owned())
    };
    let c = GatewayConfig::from_toml_with_env(block, env).unwrap();
    assert!(c.effective_toml().contains("name = \"team-b\""));

    // Its OTLP lines, added to it: valid with `otel`, refused without.
    let otlp = &readme[readme.find("```toml\n[telemetry]").expect("the OTLP lines") + 8..];
    let otlp = &otlp[..otlp.find("```").unwrap()];
    let read = GatewayConfig::from_toml_with_env(&format!("{otlp}{block}"), env);
    if cfg!(feature = "otel") {
        let c = read.unwrap();
        assert_eq!(c.otlp_endpoint(), Some("http://127.0.0.1:4318"));
        assert_eq!(c.service_name(), "qwen-gateway");
    } else {
        let e = read.unwrap_err();
        assert!(e.fields().any(|f| f == "telemetry.otlp_endpoint"), "{e}");
    }
}

/// `server.worker_threads` picks the program's runtime: by default 1,
/// tokio's current-thread runtime (the log says which), and the gateway
/// serves on it, the `--mock` upstream included; `--check-config` shows
/// the setting, 0 (one per CPU) is accepted and more than 1024 refused.
#[cfg(unix)]
#[test]
fn worker_threads_picks_the_programs_runtime() {
    let text = |threads: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{threads}\n[[accounts]]\nname = \"main\"\napi_key_env = \"DASHSCOPE_API_KEY\"\n[[keys]]\nname = \"alice\"\nkey = \"gw-alice-0001\"\n"
        )
    };
    let check = |threads: &str| {
        let path = temp_file("threads-check.toml", &text(threads));
        let out = Command::new(BIN)
            .args(["--mock", "--check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let shown = String::from_utf8(out.stdout).unwrap();
        let stderr = String::from_utf8(out.stderr).unwrap();
        match out.status.success() {
            true => {
                let shown: toml::Table = shown.parse().unwrap();
                Ok(shown["server"]["worker_threads"].as_integer().unwrap())
            }
            false => Err(stderr),
        }
    };
    assert_eq!(check(""), Ok(1));
    assert_eq!(check("worker_threads = 0"), Ok(0));
    assert_eq!(check("worker_threads = 4"), Ok(4));
    let refused = check("worker_threads = 1025").unwrap_err();
    assert!(refused.contains("server.worker_threads"), "{refused}");

    let path = temp_file("threads.toml", &text(""));
    let (mut child, lines) = run("text", &path);
    let seen = lines.until("gateway listening");
    let text = seen.join("\n");
    assert!(text.contains("runtime: current-thread"), "{text}");
    let addr = listening_addr(seen.last().unwrap());
    let answer = alice_chat_at(&addr, "");
    child.kill().unwrap();
    child.wait().unwrap();
    let answer = answer.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// Alice's chat call to the program at `addr`, over a plain TCP connection
/// (one request, `connection: close`, a read bounded by 60 s), with
/// `headers` (each line ending in `\r\n`) added: the whole answer.
fn alice_chat_at(addr: &str, headers: &str) -> std::io::Result<String> {
    use std::io::Read;
    let body = r#"{"model":"qwen-plus","messages":[{"role":"user","content":"hi"}]}"#;
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        conn,
        "POST {CHAT} HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer gw-alice-0001\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    conn.read_to_string(&mut answer)?;
    Ok(answer)
}

/// The address in a "gateway listening" log line.
fn listening_addr(line: &str) -> String {
    line[line.find("addr=").expect("the address") + 5..]
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

/// A fake OTLP collector on loopback: records each POST to `/v1/{signal}`
/// (signal, content type, authorization header, body) and answers 200. It runs on a runtime of
/// its own, so the test's thread may block.
/// The collector's credential, given to the program in
/// `OTEL_EXPORTER_OTLP_HEADERS`: sent, never logged.
#[cfg(feature = "otel")]
const OTLP_SECRET: &str = "otlp-secret-0001";

/// One POST a [`Collector`] received: signal, content type, authorization
/// header, body.
#[cfg(feature = "otel")]
type Post = (String, String, String, Bytes);

#[cfg(feature = "otel")]
struct Collector {
    addr: SocketAddr,
    posts: Arc<Mutex<Vec<Post>>>,
    _rt: tokio::runtime::Runtime,
}

#[cfg(feature = "otel")]
impl Collector {
    fn start() -> Self {
        use axum::extract::Path;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let seen = posts.clone();
        let app = axum::Router::new().route(
            "/v1/{signal}",
            axum::routing::post(
                move |Path(signal): Path<String>, headers: HeaderMap, body: Bytes| {
                    let seen = seen.clone();
                    async move {
                        let header = |name: &str| {
                            headers
                                .get(name)
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .to_owned()
                        };
                        let (kind, auth) = (header("content-type"), header("authorization"));
                        seen.lock().unwrap().push((signal, kind, auth, body));
                        ([("content-type", "application/x-protobuf")], Bytes::new())
                    }
                },
            ),
        );
        rt.spawn(async move { axum::serve(listener, app).await });
        Self {
            addr,
            posts,
            _rt: rt,
        }
    }

    /// The bodies POSTed to `/v1/{signal}`, each checked to be protobuf
    /// and to carry the header `OTEL_EXPORTER_OTLP_HEADERS` set.
    fn bodies(&self, signal: &str) -> Vec<Bytes> {
        let posts = self.posts.lock().unwrap();
        posts
            .iter()
            .filter(|(s, _, _, _)| s == signal)
            .map(|(_, kind, auth, body)| {
                assert_eq!(kind, "application/x-protobuf");
                assert_eq!(*auth, format!("Bearer {OTLP_SECRET}"));
                body.clone()
            })
            .collect()
    }
}

/// Issue 17, item 3 in the program: built with `otel`, `qwen-gateway`
/// exports the GenAI span of a proxied call (a child of the client's
/// `traceparent`, with the GenAI attributes and the configured service
/// name) and the GenAI metrics to `[telemetry] otlp_endpoint` over OTLP.
/// The batch and metric intervals are set to ten minutes: what reaches the
/// collector is what the program exports when SIGTERM stops it. A SIGHUP
/// reload keeps the export (a changed service name waits for a restart,
/// with a warning).
#[cfg(all(unix, feature = "otel"))]
#[test]
fn the_program_exports_over_otlp_and_flushes_on_sigterm() {
    use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
    use prost::Message;

    fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
        attrs
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }
    fn text(v: Option<&any_value::Value>) -> Option<&str> {
        match v {
            Some(any_value::Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    let collector = Collector::start();
    let file = |service: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[telemetry]\notlp_endpoint = \"http://{}\"\nservice_name = \"{service}\"\n[[accounts]]\nname = \"main\"\napi_key_env = \"DASHSCOPE_API_KEY\"\n[[keys]]\nname = \"alice\"\nkey = \"gw-alice-0001\"\n",
            collector.addr
        )
    };
    let path = temp_file("otlp.toml", &file("gw-under-test"));
    let (mut child, lines) = run_with(
        "text",
        &path,
        &[
            ("OTEL_BSP_SCHEDULE_DELAY", "600000"),
            ("OTEL_METRIC_EXPORT_INTERVAL", "600000"),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                &format!("authorization=Bearer%20{OTLP_SECRET}"),
            ),
            // Every log line the program writes, debug included.
            ("RUST_LOG", "debug"),
        ],
    );
    let seen = lines.until("gateway listening");
    let text_log = seen.join("\n");
    assert!(
        text_log.contains("exporting the GenAI spans and metrics over OTLP"),
        "{text_log}"
    );
    let addr = listening_addr(seen.last().unwrap());

    // A reload, the service renamed: the running export goes on as it is.
    std::fs::write(&path, file("gw-renamed")).unwrap();
    let status = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let reload = lines.until("gateway configuration reloaded").join("\n");
    assert!(reload.contains("take effect on restart only"), "{reload}");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let answer = alice_chat_at(
        &addr,
        &format!("traceparent: 00-{trace_id}-{parent}-01\r\n"),
    );
    // Nothing is exported before the program stops (ten-minute intervals).
    let early = collector.bodies("traces").len();

    let pid = child.id();
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let exited = rx.recv_timeout(Duration::from_secs(60));
    if exited.is_err() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    let answer = answer.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let exit = exited
        .expect("the program exits within 60 s of SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(early, 0, "spans exported before the shutdown");
    // Secrets never logged: the collector's credential (sent: see
    // `Collector::bodies`) and the client's key, in any line written
    // from the start to the exit.
    let mut log = [seen, reload.lines().map(str::to_owned).collect()].concat();
    while let Ok(line) = lines.0.recv_timeout(Duration::from_secs(60)) {
        log.push(line);
    }
    assert!(log.len() > 3, "{log:?}");
    for line in &log {
        assert!(!line.contains(OTLP_SECRET), "{line}");
        assert!(!line.contains("gw-alice-0001"), "{line}");
    }

    // The span: a child of the client's traceparent, with the GenAI
    // attributes, under the configured service name.
    let mut spans = Vec::new();
    for body in collector.bodies("traces") {
        let req = ExportTraceServiceRequest::decode(body).expect("an OTLP trace export");
        for rs in req.resource_spans {
            let resource = rs.resource.expect("a resource");
            assert_eq!(
                text(attr(&resource.attributes, "service.name")),
                Some("gw-under-test")
            );
            for ss in rs.scope_spans {
                spans.extend(ss.spans);
            }
        }
    }
    assert_eq!(spans.len(), 1, "{spans:?}");
    let span = &spans[0];
    assert_eq!(span.name, "chat qwen-plus");
    assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert_eq!(hex(&span.trace_id), trace_id);
    assert_eq!(hex(&span.parent_span_id), parent);
    assert_eq!(
        text(attr(&span.attributes, "gen_ai.operation.name")),
        Some("chat")
    );
    assert_eq!(
        text(attr(&span.attributes, "gen_ai.provider.name")),
        Some("dashscope")
    );
    assert_eq!(
        text(attr(&span.attributes, "gen_ai.request.model")),
        Some("qwen-plus")
    );
    assert_eq!(
        text(attr(&span.attributes, "tower_qwen.client_key.name")),
        Some("alice")
    );
    match attr(&span.attributes, "gen_ai.usage.input_tokens") {
        Some(any_value::Value::IntValue(n)) => assert!(*n > 0),
        other => panic!("input tokens: {other:?}"),
    }
    assert!(!format!("{span:?}").contains("gw-alice-0001"), "no key");

    // The GenAI metrics.
    let mut names = Vec::new();
    for body in collector.bodies("metrics") {
        let req = ExportMetricsServiceRequest::decode(body).expect("an OTLP metrics export");
        for rm in req.resource_metrics {
            for sm in rm.scope_metrics {
                names.extend(sm.metrics.into_iter().map(|m| m.name));
            }
        }
    }
    for name in [
        "gen_ai.client.operation.duration",
        "gen_ai.client.token.usage",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} not in {names:?}");
    }
}

/// A configuration asking for OTLP in a program built without `otel` is
/// refused, naming the field; the ambient standard variable only warns.
#[cfg(all(unix, not(feature = "otel")))]
#[test]
fn otlp_without_the_otel_feature_is_a_config_error() {
    let path = temp_file(
        "otlp-off.toml",
        "[telemetry]\notlp_endpoint = \"http://127.0.0.1:4318\"\n[[accounts]]\nname = \"main\"\napi_key = \"sk-upstream-0001\"\n[[keys]]\nname = \"alice\"\nkey = \"gw-alice-0001\"\n",
    );
    for check in [true, false] {
        let mut cmd = Command::new(BIN);
        if check {
            cmd.arg("--check-config");
        }
        let out = cmd
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.contains("telemetry.otlp_endpoint"), "{stderr}");
        assert!(stderr.contains("`otel` feature"), "{stderr}");
    }

    let path = temp_file(
        "otlp-ambient.toml",
        "[server]\nlisten = \"127.0.0.1:0\"\n[[accounts]]\nname = \"main\"\napi_key_env = \"DASHSCOPE_API_KEY\"\n[[keys]]\nname = \"alice\"\nkey = \"gw-alice-0001\"\n",
    );
    let (mut child, lines) = run_with(
        "text",
        &path,
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")],
    );
    let seen = lines.until("gateway listening").join("\n");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.contains("built without the `otel` feature: nothing is exported"),
        "{seen}"
    );
}
