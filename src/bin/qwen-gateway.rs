//! `qwen-gateway`: the tower-qwen gateway as a program.
//!
//! ```text
//! cargo install tower-qwen --features gateway        # add ,otel for OTLP export
//! DASHSCOPE_API_KEY=sk-... qwen-gateway --config gateway.toml
//! qwen-gateway --config gateway.toml --check-config   # validate, print the effective config (no secrets)
//! qwen-gateway --config gateway.toml --mock           # a mock DashScope behind it: no key, no network
//! kill -HUP <pid>                                     # reload keys and limits, connections stay open
//! ```
//!
//! Logs go to stdout: plain text (colour only on a terminal), or one JSON
//! object per line with `--log-format json`; `RUST_LOG` filters them
//! (default `info`). Ctrl-C or SIGTERM shuts down gracefully. It serves
//! HTTP/1.1 and HTTP/2 cleartext (prior knowledge). `--mock` needs the
//! `mock` feature, which is on by default. It runs on one thread unless
//! `[server] worker_threads` says otherwise (the least CPU per request;
//! see `GatewayConfig::worker_threads`).
//!
//! Built with the `otel` feature, it exports the GenAI spans and metrics
//! of proxied calls over OTLP (HTTP + protobuf) to `[telemetry]
//! otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`), and on Ctrl-C or
//! SIGTERM, once the last answers are over, exports what is pending before
//! it exits (bounded by the exporter's timeout, `OTEL_EXPORTER_OTLP_TIMEOUT`,
//! 10 s by default). Without the feature, a configuration asking for OTLP
//! is refused.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, ValueEnum};
use tower_qwen::gateway::error::ConfigError;
use tower_qwen::gateway::{Gateway, GatewayConfig};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "qwen-gateway",
    version,
    about = "A DashScope (Qwen) gateway: per-key buckets, account quotas, 429s with Retry-After, degradation, SSE pass-through, metrics"
)]
struct Args {
    /// The TOML configuration file (fields: see examples/gateway.toml).
    #[arg(long, short, default_value = "gateway.toml")]
    config: PathBuf,
    /// Validate the configuration, print it as the gateway reads it
    /// (defaults filled in, secrets redacted) and exit: 0 when valid.
    #[arg(long)]
    check_config: bool,
    /// Start a mock DashScope on loopback and send everything there (any
    /// upstream key works).
    #[arg(long)]
    mock: bool,
    /// How log lines are written to stdout.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    /// Human-readable; coloured only when stdout is a terminal.
    Text,
    /// One JSON object per line.
    Json,
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stdout().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }
}

/// Reads the configuration; with a mock upstream at `mock_url`, the
/// upstream is the mock and any upstream key works.
fn load(args: &Args, mock_url: Option<&str>) -> Result<GatewayConfig, ConfigError> {
    GatewayConfig::load_with_env(&args.config, |name| match (mock_url, name) {
        (Some(url), "QWEN_GATEWAY_UPSTREAM_BASE_URL") => Some(url.to_owned()),
        (Some(_), "QWEN_GATEWAY_UPSTREAM_REGION") => None,
        (Some(_), n) if n.contains("API_KEY") => {
            Some(std::env::var(n).unwrap_or_else(|_| "sk-mock-upstream".into()))
        }
        _ => std::env::var(name).ok(),
    })
}

/// The OTLP export `[telemetry]` asks for, built once for the life of the
/// process and given to every configuration read (the first and each
/// reload).
#[derive(Clone)]
struct Export {
    #[cfg(feature = "otel")]
    genai: Option<tower_qwen::telemetry::otel::GenAiOtel>,
    /// What it was built from: a reload cannot change it.
    endpoint: Option<String>,
    service_name: String,
}

impl Export {
    /// The pipeline for `config` (none when it asks for none).
    #[cfg(feature = "otel")]
    fn start(
        config: &GatewayConfig,
    ) -> Result<(Self, Option<tower_qwen::telemetry::otel::Otlp>), String> {
        use tower_qwen::telemetry::otel::{GenAiOtel, Otlp};
        let otlp = match config.otlp_endpoint() {
            Some(endpoint) => Some(
                Otlp::http(endpoint, config.service_name())
                    .map_err(|e| format!("telemetry.otlp_endpoint: cannot export to it: {e}"))?,
            ),
            None => None,
        };
        let genai = otlp
            .as_ref()
            .map(|o| GenAiOtel::new(o.meter_provider()).tracer(o.tracer_provider()));
        let export = Self {
            genai,
            endpoint: config.otlp_endpoint().map(str::to_owned),
            service_name: config.service_name().to_owned(),
        };
        Ok((export, otlp))
    }

    /// Nothing to export in this build (a configuration asking for it is
    /// refused when it is read).
    #[cfg(not(feature = "otel"))]
    fn start(config: &GatewayConfig) -> Result<(Self, Option<std::convert::Infallible>), String> {
        let export = Self {
            endpoint: config.otlp_endpoint().map(str::to_owned),
            service_name: config.service_name().to_owned(),
        };
        Ok((export, None))
    }

    /// `config` recording into the running pipeline.
    fn apply(&self, config: GatewayConfig) -> GatewayConfig {
        if config.otlp_endpoint() != self.endpoint.as_deref()
            || config.service_name() != self.service_name
        {
            tracing::warn!(
                "telemetry.otlp_endpoint or telemetry.service_name changed: they take effect on restart only"
            );
        }
        #[cfg(feature = "otel")]
        if let Some(genai) = &self.genai {
            return config.otel(genai.clone());
        }
        config
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // With --mock the upstream is the mock, whose address is not known
    // before it starts: the file is read as a mock run would read it.
    let placeholder = args.mock.then_some("http://127.0.0.1:1");
    if args.check_config {
        return match load(&args, placeholder) {
            Ok(config) => {
                print!("{}", config.effective_toml());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{}: {e}", args.config.display());
                ExitCode::FAILURE
            }
        };
    }
    // The runtime's shape (`server.worker_threads`) comes from the file,
    // read before the runtime exists; without a mock that reading is the
    // one the gateway starts from.
    let config = match load(&args, placeholder) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    let threads = config.worker_threads();
    // The exporters run on threads of their own, started before the
    // runtime and stopped after it.
    let (export, otlp) = match Export::start(&config) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    let config = (!args.mock).then_some(config);
    let runtime = match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    };
    let code = match runtime {
        Ok(rt) => rt.block_on(run(args, threads, config, export)),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    };
    // Every answer is over (or was cut) and the runtime is gone with its
    // tasks, so every span has ended: export what is pending, then exit.
    if let Some(otlp) = otlp {
        #[cfg(feature = "otel")]
        match otlp.shutdown() {
            Ok(()) => tracing::info!("OTLP: pending spans and metrics exported"),
            Err(e) => tracing::error!(error = %e, "OTLP: the last export failed"),
        }
        #[cfg(not(feature = "otel"))]
        match otlp {}
    }
    code
}

/// Serves until Ctrl-C or SIGTERM; `config` is the file as read at start
/// (`None` with `--mock`: it is read again with the mock's address).
async fn run(
    args: Args,
    threads: usize,
    config: Option<GatewayConfig>,
    export: Export,
) -> ExitCode {
    init_logs(args.log_format);
    match &export.endpoint {
        Some(endpoint) => tracing::info!(
            endpoint,
            service_name = export.service_name,
            "exporting the GenAI spans and metrics over OTLP"
        ),
        None if !cfg!(feature = "otel")
            && std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").is_ok_and(|v| !v.trim().is_empty()) =>
        {
            tracing::warn!(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set, but this qwen-gateway is built without the `otel` feature: nothing is exported (cargo install tower-qwen --features gateway,otel)"
            )
        }
        None => {}
    }
    match threads {
        1 => tracing::info!("runtime: current-thread (server.worker_threads = 1)"),
        0 => {
            tracing::info!("runtime: multi-thread, one worker per CPU (server.worker_threads = 0)")
        }
        n => tracing::info!(worker_threads = n, "runtime: multi-thread"),
    }
    let mock = if args.mock {
        start_mock().await
    } else {
        Ok(None)
    };
    let mock = match mock {
        Ok(m) => m,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mock_url = mock.as_ref().map(|m| m.base_url());
    let config = match config.map_or_else(|| load(&args, mock_url.as_deref()), Ok) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{}: {e}", args.config.display());
            return ExitCode::FAILURE;
        }
    };
    let gateway = Gateway::new(export.apply(config));
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot listen for SIGHUP: {e}");
                return ExitCode::FAILURE;
            }
        };
        let gw = gateway.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                tracing::info!(config = %args.config.display(), "SIGHUP: reloading the configuration");
                // Reading a file and building its stacks is CPU work (seconds
                // with 100,000 keys): done off the runtime's thread, so that
                // a current-thread runtime goes on serving meanwhile.
                let (args, url, gw) = (args.clone(), mock_url.clone(), gw.clone());
                let export = export.clone();
                let rt = tokio::runtime::Handle::current();
                let reload = tokio::task::spawn_blocking(move || {
                    let _rt = rt.enter();
                    match load(&args, url.as_deref()) {
                        Ok(c) => gw.reload(export.apply(c)),
                        Err(e) => tracing::error!(
                            config = %args.config.display(),
                            error = %e,
                            "reload refused: the configuration is invalid; keeping the running one"
                        ),
                    }
                });
                if let Err(e) = reload.await {
                    tracing::error!(error = %e, "reload failed; keeping the running configuration");
                }
            }
        });
    }
    let result = gateway.serve_on().await;
    drop(mock);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "mock")]
async fn start_mock() -> Result<Option<tower_qwen::mock::MockHandle>, String> {
    let m = tower_qwen::mock::MockDashScope::builder()
        .accept_any_key(true)
        .start()
        .await
        .map_err(|e| format!("cannot start the mock: {e}"))?;
    tracing::info!(url = %m.base_url(), "mock DashScope started");
    Ok(Some(m))
}

/// No mock in this build.
#[cfg(not(feature = "mock"))]
enum NoMock {}

#[cfg(not(feature = "mock"))]
impl NoMock {
    fn base_url(&self) -> String {
        match *self {}
    }
}

#[cfg(not(feature = "mock"))]
async fn start_mock() -> Result<Option<NoMock>, String> {
    Err("--mock needs the `mock` feature (on by default): cargo install tower-qwen --features gateway".into())
}
