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
        /// For a clockify-addon source: the RSA private key (PEM) matching the source's public key; `send`
        /// installs a test installation, then sends the webhook with its token.
        #[arg(long)]
        private_key: Option<PathBuf>,
        /// JSON body file.
        body: PathBuf,
    },
    /// List Clockify add-on installations (never their tokens).
    Installations {
        /// Config file (for the data directory).
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Inspect and replay stored events (works beside a running daemon).
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Dead letters: deliveries that failed for good (works beside a running daemon).
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Plugin authors' tools.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
    /// The log engine's segment log (`storage.engine = "log"`): check it, or print what it holds (read-only;
    /// works beside a running daemon).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
    /// Show Clockodo validation handshake secrets received (newest first), to enter in Clockodo.
    Handshakes {
        /// Config file (for the data directory).
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SpoolCommand {
    /// Read every segment in full and check headers, checksums and seqs; exit code 1 if anything is wrong
    /// (a torn tail is not: nothing in it was acknowledged).
    Verify {
        /// Config file (for the data directory).
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
    },
    /// Print every valid frame, oldest first, one JSON object per line.
    Dump {
        /// Config file (for the data directory).
        #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
        config: PathBuf,
        /// Include event bodies (personal data: mind where the output goes).
        #[arg(long)]
        bodies: bool,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Run a plugin on one event without a daemon; print its actions, logs, time and memory.
    Test {
        /// The plugin component (.wasm).
        #[arg(long)]
        plugin: PathBuf,
        /// The plugin's config, as JSON (what `[plugins.<id>.config]` holds).
        #[arg(long, default_value = "{}")]
        config: String,
        /// Event type.
        #[arg(long)]
        event: String,
        /// Source id the event seems to come from.
        #[arg(long, default_value = "clockify")]
        source: String,
        /// A host the plugin may call (repeat for several), as in `allowed_hosts`.
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
        /// Wall time limit.
        #[arg(long, default_value = "100ms")]
        time_limit: humantime::Duration,
        /// Memory limit in MiB.
        #[arg(long, default_value_t = 64)]
        memory_mib: u64,
        /// Fuel limit.
        #[arg(long)]
        fuel: Option<u64>,
        /// Keep the plugin's key-value store in this folder (default: a fresh temporary one).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Answer the plugin's outbound requests (`http` and `wasi:http`) from the exchange files (`*.json`:
        /// `{"request": {"method", "url", "headers"?, "body"?}, "response": {"status", "headers"?, "body"? |
        /// "json"?}}`) in this folder, first match wins; no network at all.
        #[arg(long, value_name = "DIR", conflicts_with = "record")]
        mock_http: Option<PathBuf>,
        /// Make the outbound requests and write each exchange to this folder, for `--mock-http` later.
        #[arg(long, value_name = "DIR")]
        record: Option<PathBuf>,
        /// Seed the plugin's key-value store from this JSON object of keys and (string) values.
        #[arg(long, value_name = "FILE")]
        kv: Option<PathBuf>,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// JSON body file.
        body: PathBuf,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Config file (for the data directory and sinks).
    #[arg(long, short, env = "HOOKBRIDGE_CONFIG")]
    config: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum EventsCommand {
    /// List events, newest first.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this source.
        #[arg(long)]
        source: Option<String>,
        /// Only this event type.
        #[arg(long)]
        event: Option<String>,
        /// Only this status: pending, delivered, dead, purged, unrouted.
        #[arg(long)]
        status: Option<String>,
        /// Received since (RFC 3339 time, or an age such as 2h).
        #[arg(long)]
        since: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one event: headers, body, deliveries, attempts.
    Show {
        #[command(flatten)]
        common: Common,
        /// Event id.
        id: String,
    },
    /// Deliver events again (the "Resend" button): one by id, or a time range.
    Replay {
        #[command(flatten)]
        common: Common,
        /// Event id.
        #[arg(required_unless_present = "since", conflicts_with = "since")]
        id: Option<String>,
        /// Replay events received since (RFC 3339 time, or an age such as 2h).
        #[arg(long)]
        since: Option<String>,
        /// ... and before this time (default: now).
        #[arg(long, requires = "since")]
        until: Option<String>,
        /// Only to this sink (default: the sinks each event was routed to).
        #[arg(long)]
        sink: Option<String>,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters, oldest first.
    List {
        #[command(flatten)]
        common: Common,
        /// Only this sink.
        #[arg(long)]
        sink: Option<String>,
    },
    /// Deliver dead letters again: one by delivery id, or --all (of a --sink).
    Retry(DeadTarget),
    /// Give dead letters up for good: one by delivery id, or --all (of a --sink).
    Purge(DeadTarget),
}

/// Which dead letters `dlq retry` / `dlq purge` act on.
#[derive(clap::Args)]
struct DeadTarget {
    #[command(flatten)]
    common: Common,
    /// Delivery id (from `dlq list`).
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<i64>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
    /// With --all: only this sink.
    #[arg(long, requires = "all")]
    sink: Option<String>,
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
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn load(config: &std::path::Path) -> anyhow::Result<hookbridge::Config> {
    hookbridge::Config::load(config).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))
}

/// The config, for a command that reads the embedded spool's files (refused on the cluster backend).
fn load_embedded(config: &std::path::Path) -> anyhow::Result<hookbridge::Config> {
    let config = load(config)?;
    if config.storage.backend == hookbridge::config::types::StorageBackend::Postgres {
        anyhow::bail!("`spool` reads the embedded spool's log; storage.backend = \"postgres\" has none");
    }
    Ok(config)
}

#[allow(clippy::print_stdout)]
async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config: path } => {
            let config = load(&path)?;
            let listener = match hookbridge::service::inherited_listener()? {
                // Socket activation: systemd holds the port across restarts, so no connection is refused.
                Some(l) => tokio::net::TcpListener::from_std(l)?,
                None => tokio::net::TcpListener::bind(config.server.listen)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.server.listen))?,
            };
            hookbridge::run(config, listener, shutdown_signal(), Some(path)).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { config: path } => match hookbridge::Config::load(&path) {
            Ok(c) => {
                let plugin_errors = tokio::task::spawn_blocking({
                    let c = c.clone();
                    move || hookbridge::plugin::check_all(&c)
                })
                .await?;
                if !plugin_errors.is_empty() {
                    for e in plugin_errors {
                        println!("{}: {e}", path.display());
                    }
                    return Ok(ExitCode::FAILURE);
                }
                let plugins =
                    c.sinks.values().filter(|s| matches!(s.kind, hookbridge::config::SinkKind::Plugin(_))).count();
                println!(
                    "{}: ok ({} sources, {} sinks, {} plugins, {} routes)",
                    path.display(),
                    c.sources.len(),
                    c.sinks.len() - plugins,
                    plugins,
                    c.routes.len()
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                println!("{e}");
                Ok(ExitCode::FAILURE)
            }
        },
        Command::Send { config, source, event, url, private_key, body } => {
            let config = load(&config)?;
            let bytes = std::fs::read(&body).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", body.display()))?;
            let key = private_key
                .map(|p| std::fs::read(&p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display())))
                .transpose()?;
            let r = hookbridge::send::send(&config, &source, event.as_deref(), &bytes, url.as_deref(), key.as_deref())
                .await?;
            println!("{} -> {}\n{}", r.url, r.status, r.body);
            Ok(if (200..300).contains(&r.status) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Plugin {
            command:
                PluginCommand::Test {
                    plugin,
                    config,
                    event,
                    source,
                    allow_hosts,
                    time_limit,
                    memory_mib,
                    fuel,
                    data_dir,
                    mock_http,
                    record,
                    kv,
                    json,
                    body,
                },
        } => {
            let args = hookbridge::plugin::cli::TestArgs {
                plugin,
                config,
                event,
                source,
                allow_hosts,
                time_limit: time_limit.into(),
                memory_limit: memory_mib * 1024 * 1024,
                fuel,
                data_dir,
                mock_http,
                record,
                kv,
                json,
                body,
            };
            let (text, ok) = tokio::task::spawn_blocking(move || hookbridge::plugin::cli::test(&args))
                .await?
                .map_err(anyhow::Error::msg)?;
            print!("{text}");
            Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Events { command } => events(command),
        Command::Spool { command } => spool(command),
        Command::Dlq { command } => dlq(command),
        Command::Installations { config } => {
            let config = load(&config)?;
            let list = hookbridge::operator::installations(&config)?;
            if list.is_empty() {
                println!("no add-on installation");
            }
            for (source, workspace, addon, record) in list {
                let state = serde_json::from_str::<hookbridge::addon::Installation>(&record)
                    .map(|i| {
                        let state = if i.deleted { "DELETED".to_owned() } else { i.status };
                        let api = i.api_url.unwrap_or_default();
                        format!("{state}\t{} webhook(s)\t{api}", i.webhooks.len())
                    })
                    .unwrap_or_else(|e| format!("unreadable record: {e}"));
                println!("{source}\tworkspace {workspace}\tinstallation {addon}\t{state}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Handshakes { config } => {
            let config = load(&config)?;
            let list = hookbridge::operator::handshakes(&config)?;
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

#[allow(clippy::print_stdout)]
fn spool(command: SpoolCommand) -> anyhow::Result<ExitCode> {
    use hookbridge::store::log::{file::OsDisk, inspect};
    let dir = |config: &std::path::Path| -> anyhow::Result<PathBuf> {
        let dir = load_embedded(config)?.storage.data_dir.join(hookbridge::store::LOG_DIR);
        if !dir.is_dir() {
            anyhow::bail!("no spool log at {} (is storage.engine \"log\"?)", dir.display());
        }
        Ok(dir)
    };
    match command {
        SpoolCommand::Verify { config } => {
            let report = inspect::verify(&OsDisk, &dir(&config)?)?;
            for s in &report.segments {
                let base = s.header.as_ref().map_or("-".to_owned(), |h| h.base_seq.to_string());
                println!(
                    "segment {:016x}  seqs {base}..{}  {} event(s)  {} frame(s)  {} of {} bytes valid, {:?}  {} hole(s)",
                    s.segno,
                    s.next_seq,
                    s.events,
                    s.frames,
                    s.valid_bytes,
                    s.file_bytes,
                    s.end,
                    s.holes.len()
                );
            }
            println!("{} segment(s), {} event(s), {} lost", report.segments.len(), report.events, report.lost_events);
            for p in &report.problems {
                println!("PROBLEM: {p}");
            }
            Ok(if report.ok() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        SpoolCommand::Dump { config, bodies } => {
            use std::io::Write;
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            let written = inspect::dump(&OsDisk, &dir(&config)?, |d| writeln!(out, "{}", d.to_json(bodies)))?;
            match written.and_then(|()| out.flush()) {
                // The reader stopped reading (`| head`): not a failure.
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
                _ => Ok(ExitCode::SUCCESS),
            }
        }
    }
}

#[allow(clippy::print_stdout)]
fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

#[allow(clippy::print_stdout)]
fn events(command: EventsCommand) -> anyhow::Result<ExitCode> {
    use hookbridge::operator::{self, format_time, parse_time};
    match command {
        EventsCommand::List { common, source, event, status, since, limit } => {
            let config = load(&common.config)?;
            let since_ms = since.as_deref().map(parse_time).transpose()?;
            let filter =
                hookbridge::store::EventFilter { source, event_type: event, status, since_ms, until_ms: None, limit };
            let list = operator::list_events(&config, filter)?;
            if common.json {
                return print_json(&list).map(|()| ExitCode::SUCCESS);
            }
            for e in &list {
                println!(
                    "{}  {}  {:<10} {:<12} {}",
                    e.id,
                    format_time(e.received_at_ms),
                    e.status,
                    e.source,
                    e.event_type
                );
            }
            if list.is_empty() {
                println!("no events");
            }
        }
        EventsCommand::Show { common, id } => {
            let config = load(&common.config)?;
            let e = operator::show_event(&config, &id)?;
            if common.json {
                return print_json(&e).map(|()| ExitCode::SUCCESS);
            }
            let s = &e.summary;
            println!(
                "event    {}\nsource   {}\ntype     {}\nreceived {}\nstatus   {}",
                s.id,
                s.source,
                s.event_type,
                format_time(s.received_at_ms),
                s.status
            );
            println!("headers");
            for (k, v) in &e.headers {
                println!("  {k}: {v}");
            }
            println!("deliveries");
            for d in &e.deliveries {
                let replay = if d.replay { " (replay)" } else { "" };
                let err = d.last_error.as_deref().map(|e| format!(", last error: {e}")).unwrap_or_default();
                println!("  #{} {} {}{} after {} attempt(s){}", d.id, d.sink, d.status, replay, d.attempts, err);
            }
            println!("attempts");
            for a in &e.attempts {
                let detail = a.error.as_deref().unwrap_or("");
                println!(
                    "  #{} {} attempt {} at {} ({} ms): {} {}",
                    a.delivery_id,
                    a.sink,
                    a.attempt,
                    format_time(a.started_at_ms),
                    a.duration_ms,
                    a.outcome,
                    detail
                );
            }
            println!("body\n{}", e.body);
        }
        EventsCommand::Replay { common, id, since, until, sink } => {
            let config = load(&common.config)?;
            let selection = match (id, since) {
                (Some(id), _) => operator::ReplaySelection::One(id),
                (None, Some(since)) => operator::ReplaySelection::Range {
                    since_ms: parse_time(&since)?,
                    until_ms: until.as_deref().map(parse_time).transpose()?.unwrap_or(i64::MAX),
                },
                (None, None) => anyhow::bail!("give an event id or --since"),
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template("replaying {bar:40} {pos}/{len} events")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let report = operator::replay(&config, &selection, sink.as_deref(), |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            if common.json {
                return print_json(&report).map(|()| ExitCode::SUCCESS);
            }
            println!("replayed {} event(s): {} delivery(ies) queued", report.events, report.deliveries);
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::print_stdout)]
fn report(json: bool, key: &str, n: usize, text: &str) -> anyhow::Result<()> {
    if json {
        return print_json(&serde_json::json!({ key: n }));
    }
    println!("{n} {text}");
    Ok(())
}

#[allow(clippy::print_stdout)]
fn dlq(command: DlqCommand) -> anyhow::Result<ExitCode> {
    use hookbridge::operator::{self, DeadSelection, format_time};
    let selection = |id: Option<i64>, sink: Option<String>| match id {
        Some(id) => DeadSelection::One(id),
        None => DeadSelection::All(sink),
    };
    match command {
        DlqCommand::List { common, sink } => {
            let config = load(&common.config)?;
            let list = operator::dead_letters(&config, sink.as_deref())?;
            if common.json {
                return print_json(&list).map(|()| ExitCode::SUCCESS);
            }
            for d in &list {
                println!(
                    "#{}  {}  {}  {} {}  {} attempt(s)  {}",
                    d.delivery_id,
                    d.sink,
                    format_time(d.dead_at_ms),
                    d.source,
                    d.event_type,
                    d.attempts,
                    d.last_error.as_deref().unwrap_or("")
                );
                println!("      event {}", d.event_id);
            }
            if list.is_empty() {
                println!("no dead letters");
            }
        }
        DlqCommand::Retry(t) => {
            let config = load(&t.common.config)?;
            let n = operator::retry_dead(&config, &selection(t.id, t.sink))?;
            report(t.common.json, "retried", n, "dead letter(s) queued for delivery again")?;
        }
        DlqCommand::Purge(t) => {
            let config = load(&t.common.config)?;
            let n = operator::purge_dead(&config, &selection(t.id, t.sink))?;
            report(t.common.json, "purged", n, "dead letter(s) purged")?;
        }
    }
    Ok(ExitCode::SUCCESS)
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
