//! The `hookbridge` command: argument parsing, logging set-up and signals. Everything else is the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

// glibc's allocator spent a quarter of the CPU in malloc/free/consolidate under load (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "hookbridge", version, about = "Verify, route and durably deliver time-tracking webhooks")]
struct Cli {
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "HOOKBRIDGE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        /// Config file.
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Validate a config file and report every problem (exit code 1 if any).
    Check {
        /// Config file.
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Sign a body as the source's provider would and POST it to the daemon ("test webhook").
    Send {
        /// Config file (for the source's secret and the daemon's address).
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
        /// Source id.
        #[arg(long)]
        source: String,
        /// Event type (e.g. NEW_TIME_ENTRY, entry.created).
        #[arg(long)]
        event: Option<String>,
        /// Target URL (default: the daemon's listen address and the source's path).
        #[arg(long)]
        url: Option<String>,
        /// JSON body file.
        body: PathBuf,
    },
    /// Show Clockodo validation handshake secrets received (newest first), to enter in Clockodo.
    Handshakes {
        /// Config file (for the data directory).
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
    },
}

#[allow(clippy::print_stderr)] // the CLI reports a fatal error on stderr, after logging may have failed
fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hookbridge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(config: &std::path::Path) -> anyhow::Result<hookbridge::Config> {
    hookbridge::Config::load(config).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))
}

#[allow(clippy::print_stdout)]
async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => {
            let config = load(&config)?;
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?;
            hookbridge::run(config, listener, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config: path } => match hookbridge::Config::load(&path) {
            Ok(c) => {
                println!(
                    "{}: ok ({} sources, {} sinks, {} routes)",
                    path.display(),
                    c.sources.len(),
                    c.sinks.len(),
                    c.routes.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Send { config, source, event, url, body } => {
            let config = load(&config)?;
            let bytes = std::fs::read(&body).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", body.display()))?;
            let r = hookbridge::send::send(&config, &source, event.as_deref(), &bytes, url.as_deref()).await?;
            println!("{} -> {}\n{}", r.url, r.status, r.body);
            Ok(if (200..300).contains(&r.status) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Handshakes { config } => {
            let config = load(&config)?;
            let list = hookbridge::store::list_handshakes(&config.storage.data_dir)?;
            if list.is_empty() {
                println!("no Clockodo handshake received yet");
            }
            for h in list {
                let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(h.received_at_ms.max(0) as u64);
                println!("{}\t{}\t{}", humantime::format_rfc3339_seconds(t), h.source, h.secret);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
