//! The bridge: builds the running pieces from a validated [`Config`] (spool, sinks, dispatchers, router),
//! serves, reloads, and shuts down in order. This is the embedding API; `main` is a thin layer over it.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, SinkSpec};
use crate::dispatch::Dispatcher;
use crate::event::now_ms;
use crate::ingress::{Settings, Shared, router};
use crate::limits::{DISPATCH_POLL, FEED_CAPACITY, PRUNE_BATCH, PRUNE_INTERVAL, SINK_STATS_INTERVAL};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::sinks::{self, BuildError};
use crate::store::{Store, StoreError};

/// Why the bridge could not start (or a reload was refused).
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    /// The spool could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A sink could not be built.
    #[error(transparent)]
    Sink(#[from] BuildError),
    /// Routes did not compile (a config that did not go through validation).
    #[error("invalid routes: {0}")]
    Routes(String),
    /// The new config is invalid.
    #[error("invalid config:\n{0}")]
    Config(String),
    /// A plugin could not be loaded.
    #[error("{0}")]
    Plugin(String),
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Serving failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    /// A listener's TLS certificate or key could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// The spool stopped after a failed sync: the bridge shut down, and the process should exit non-zero so
    /// that its supervisor restarts it (SQLite recovers the spool from its WAL at the next start).
    #[error("the spool stopped after a failed sync ({0}); restart the daemon")]
    SpoolFailed(String),
}

/// A sink's dispatcher, running.
struct RunningSink {
    spec: SinkSpec,
    cancel: CancellationToken,
    handle: JoinHandle<()>,
}

/// What a reload swaps or restarts, shared by the bridge and its [`Reloader`]s.
struct Inner {
    shared: Arc<Shared>,
    store: Store,
    metrics: Metrics,
    sinks: Mutex<HashMap<String, RunningSink>>,
    /// The plugin runtime, created with the first plugin.
    plugins: Mutex<Option<crate::plugin::Host>>,
    cancel: CancellationToken,
    shutdown_timeout: Duration,
    /// The config as last applied.
    config: std::sync::Mutex<Config>,
    /// The TLS acceptors of the listeners being served, by listener name (reloaded on SIGHUP).
    tls: std::sync::Mutex<Vec<(&'static str, crate::tls::Acceptor)>>,
}

/// The sockets a bridge serves ([`Bridge::serve`]): the webhook listener (the one that faces the internet),
/// and the internal and admin listeners when the embedder wants them served too.
#[derive(Debug)]
pub struct Sockets {
    /// Webhook paths, `/healthz`, `/readyz`.
    pub webhook: TcpListener,
    /// `/metrics`, `/readyz` with detail, `/dashboard`, `/live/*` ([`Bridge::internal_router`]).
    pub internal: Option<TcpListener>,
    /// The admin API ([`Bridge::admin_router`]); ignored when `[admin]` is not configured.
    pub admin: Option<TcpListener>,
}

impl Sockets {
    /// Only the webhook listener.
    pub fn webhook(webhook: TcpListener) -> Sockets {
        Sockets { webhook, internal: None, admin: None }
    }
}

/// A running bridge: spool open, dispatchers running. Mount [`Bridge::router`] in any axum app, or call
/// [`Bridge::serve`]. Call [`Bridge::shutdown`] at the end so deliveries stop cleanly and the spool closes.
pub struct Bridge {
    inner: Arc<Inner>,
    housekeeping: JoinHandle<()>,
    admin: Option<crate::config::AdminSpec>,
}

impl std::fmt::Debug for Bridge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bridge").finish_non_exhaustive()
    }
}

fn settings(config: &Config) -> Result<Settings, BridgeError> {
    let routes = RouteTable::compile(&config.routes).map_err(|errors| {
        BridgeError::Routes(
            errors
                .iter()
                .map(|e| format!("routes[{}].{}: {}", e.index, e.field, e.message))
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    Ok(Settings {
        sources: config.sources.values().map(|s| (s.path.clone(), s.clone())).collect(),
        routes,
        max_body: config.server.max_body_size.0,
        request_timeout: config.server.request_timeout.0,
        body_timeout: config.server.body_timeout.0,
        min_body_rate: config.server.min_body_rate.0,
        sink_ids: config.sinks.keys().cloned().collect(),
        route_configs: config.routes.clone(),
        dedup_window: Some(config.storage.dedup_window.0).filter(|w| !w.is_zero()),
        spool: spool_limits(config),
    })
}

fn spool_limits(config: &Config) -> crate::store::SpoolLimits {
    crate::store::SpoolLimits {
        max_pending_events: config.storage.max_pending_events,
        max_pending_bytes: config.storage.max_pending_bytes.0,
        max_unrouted_events: config.storage.max_unrouted_events,
        max_unrouted_bytes: config.storage.max_unrouted_bytes.0,
    }
}

/// Loads every plugin of `config` (on a blocking thread: compiling is CPU work), creating the host if needed
/// (with the cluster's key-value store when the spool is a cluster's).
async fn load_plugins(
    host: &mut Option<crate::plugin::Host>,
    config: &Config,
    store: &Store,
) -> Result<HashMap<String, crate::plugin::Plugin>, BridgeError> {
    let specs: Vec<(String, crate::config::PluginSpec)> = config
        .sinks
        .values()
        .filter_map(|s| match &s.kind {
            crate::config::SinkKind::Plugin(p) => Some((s.id.clone(), p.clone())),
            _ => None,
        })
        .collect();
    if specs.is_empty() {
        return Ok(HashMap::new());
    }
    let existing = host.clone();
    let data_dir = config.storage.data_dir.clone();
    let shared = store.plugin_kv().zip(config.postgres.as_ref().map(|p| p.statement_timeout));
    let (new_host, loaded) = tokio::task::spawn_blocking(move || {
        let host = match existing {
            Some(h) => h,
            None => {
                let mut host = crate::plugin::Host::new(&data_dir)?;
                if let Some((kv, timeout)) = shared {
                    host.share_kv(kv, timeout);
                }
                host
            }
        };
        let mut loaded = HashMap::new();
        for (id, spec) in specs {
            loaded.insert(id.clone(), host.load(&id, &spec)?);
        }
        Ok::<_, String>((host, loaded))
    })
    .await
    .map_err(|e| BridgeError::Plugin(format!("plugin loading failed: {e}")))?
    .map_err(BridgeError::Plugin)?;
    *host = Some(new_host);
    Ok(loaded)
}

/// On a cluster, live channels are the cluster's: what a plugin publishes here goes to the other nodes, what
/// they publish comes here (and the last payloads the cluster has are shown from the start).
async fn share_live(store: &Store, live: &crate::live::Live, cancel: CancellationToken) -> Result<(), BridgeError> {
    let Some((last, mut others)) = store.live_from_others().await? else { return Ok(()) };
    for (channel, payload) in last {
        live.publish_here(&channel, &payload);
    }
    let to = store.clone();
    live.forward_to(crate::live::Forward(Arc::new(move |channel, payload| to.share_live(channel, payload))));
    let live = live.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                got = others.recv() => match got {
                    Some((channel, payload)) => {
                        live.publish_here(&channel, &payload);
                    }
                    None => return,
                },
            }
        }
    });
    Ok(())
}

impl Inner {
    fn build_context<'a>(
        &'a self,
        plugins: &'a HashMap<String, crate::plugin::Plugin>,
        config: &Config,
    ) -> sinks::BuildContext<'a> {
        sinks::BuildContext {
            store: &self.store,
            live: &self.shared.live,
            metrics: &self.metrics,
            plugins,
            addons: &self.shared.installations,
            spool_limits: spool_limits(config),
            sink_ids: config
                .sinks
                .iter()
                .filter(|(_, s)| !matches!(s.kind, crate::config::SinkKind::Plugin(_)))
                .map(|(id, _)| id.clone())
                .collect(),
        }
    }

    fn spawn_sink(&self, spec: &SinkSpec, sink: Arc<dyn sinks::Sink>) -> RunningSink {
        if let Ok(mut all) = self.shared.sinks.lock() {
            all.insert(spec.id.clone(), Arc::clone(&sink));
        }
        let feed = self.store.subscribe(&spec.id, FEED_CAPACITY);
        let d = Dispatcher {
            sink_id: spec.id.clone(),
            sink,
            store: self.store.clone(),
            max_in_flight: spec.max_in_flight,
            retry: spec.retry,
            metrics: self.metrics.clone(),
            sink_metrics: Default::default(),
        };
        let cancel = self.cancel.child_token();
        let handle = tokio::spawn(d.run(feed, cancel.clone()));
        RunningSink { spec: spec.clone(), cancel, handle }
    }
}

impl Bridge {
    /// Opens the spool, builds sinks and starts one dispatcher per sink. Pending deliveries left by an
    /// earlier run are picked up at once.
    pub async fn start(config: Config) -> Result<Bridge, BridgeError> {
        let settings = settings(&config)?;
        let metrics = Metrics::new()?;
        let store = Store::open_configured(&config.storage, config.postgres.as_ref()).await?;
        let mut host = None;
        let plugins = load_plugins(&mut host, &config, &store).await?;
        for source in config.sources.values() {
            tracing::info!(source = %source.id, kind = source.scheme.kind(), path = %source.path, "source ready");
        }
        let installations = crate::addon::Installations::load(&store).await?;
        store.retire_sinks(&config.sinks.keys().cloned().collect::<Vec<_>>()).await?;
        let shared = Arc::new(Shared {
            settings: ArcSwap::from_pointee(settings),
            store: store.clone(),
            installations,
            metrics: metrics.clone(),
            concurrency: Arc::new(Semaphore::new(config.server.max_concurrency)),
            unverified: Semaphore::new(config.server.max_unverified),
            internal_token: config.listeners.internal_token.clone(),
            sink_stats: std::sync::Mutex::new(Vec::new()),
            shutting_down: AtomicBool::new(false),
            last_ready: std::sync::Mutex::new(None),
            sinks: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            live: crate::live::Live::default(),
        });
        if let Some(h) = &host {
            shared.live.persist_to(h.kv().clone());
        }
        let cancel = CancellationToken::new();
        shared.installations.follow(&store, cancel.child_token());
        share_live(&store, &shared.live, cancel.child_token()).await?;
        let inner = Arc::new(Inner {
            shared,
            store: store.clone(),
            metrics,
            sinks: Mutex::new(HashMap::new()),
            plugins: Mutex::new(host.clone()),
            cancel: cancel.clone(),
            shutdown_timeout: config.server.shutdown_timeout.0,
            config: std::sync::Mutex::new(config.clone()),
            tls: std::sync::Mutex::new(Vec::new()),
        });
        {
            let cx = inner.build_context(&plugins, &config);
            let mut built = Vec::new();
            for spec in config.sinks.values() {
                built.push((spec.clone(), sinks::build(spec, &cx)?));
            }
            let mut running = inner.sinks.lock().await;
            for (spec, sink) in built {
                running.insert(spec.id.clone(), inner.spawn_sink(&spec, sink));
            }
        }
        let kv = host.as_ref().map(|h| h.kv().clone());
        let housekeeping =
            tokio::spawn(housekeeping(Arc::clone(&inner.shared), kv, config.storage.retention.0, cancel.child_token()));
        Ok(Bridge { inner, housekeeping, admin: config.admin })
    }

    /// The webhook routes (every source's path, `/healthz`, `/readyz`), to serve or to mount: the one router
    /// meant for the internet.
    pub fn router(&self) -> axum::Router {
        router(Arc::clone(&self.inner.shared))
    }

    /// The internal routes (`/metrics`, `/readyz` with detail, `/dashboard`, `/live/<channel>`, `/healthz`),
    /// behind `[server] internal_token` when set: serve them on a private address.
    pub fn internal_router(&self) -> axum::Router {
        crate::ingress::internal_router(Arc::clone(&self.inner.shared))
    }

    /// The admin API's router, when `[admin]` is configured (serve it on its own, private listener).
    pub fn admin_router(&self) -> Option<axum::Router> {
        let config = self.inner.config.lock().ok()?.clone();
        self.admin.as_ref().map(|a| crate::admin::router(config, a.token.clone()))
    }

    /// The spool (for inspection in tests and tools).
    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// A handle that applies new configs to this bridge while it serves.
    pub fn reloader(&self) -> Reloader {
        Reloader { inner: Arc::clone(&self.inner) }
    }

    /// Serves `sockets` with the connection limits and TLS of `[server]` (and `[admin]`) until `signal`
    /// completes, then shuts down: stop accepting, let requests in flight finish, stop dispatchers within
    /// the shutdown deadline, close the spool. If the spool fails a sync meanwhile, it shuts down the same
    /// way and returns [`BridgeError::SpoolFailed`].
    pub async fn serve(
        self,
        sockets: Sockets,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        let config = self.inner.config.lock().map(|c| c.clone()).map_err(|e| BridgeError::Config(e.to_string()))?;
        let limits = crate::server::ConnLimits {
            header_timeout: config.server.header_timeout.0,
            max_header_size: usize::try_from(config.server.max_header_size.0).unwrap_or(usize::MAX),
            max_connections: config.server.max_connections,
        };
        let tls = |spec: &Option<crate::tls::TlsSpec>| {
            spec.as_ref().map(crate::tls::Acceptor::new).transpose().map_err(|e| BridgeError::Tls(e.to_string()))
        };
        let mut listeners = vec![crate::server::Listener {
            name: "webhook",
            socket: sockets.webhook,
            router: self.router(),
            limits,
            tls: tls(&config.listeners.tls)?,
        }];
        if let Some(socket) = sockets.internal {
            listeners.push(crate::server::Listener {
                name: "internal",
                socket,
                router: self.internal_router(),
                limits,
                tls: tls(&config.listeners.internal_tls)?,
            });
        }
        if let (Some(socket), Some(router), Some(admin)) = (sockets.admin, self.admin_router(), &config.admin) {
            listeners.push(crate::server::Listener { name: "admin", socket, router, limits, tls: tls(&admin.tls)? });
        }
        let stop = CancellationToken::new();
        let mut tasks = Vec::new();
        for l in listeners {
            if let Some(acceptor) = &l.tls {
                if let Ok(mut all) = self.inner.tls.lock() {
                    all.push((l.name, acceptor.clone()));
                }
                tasks.push(tokio::spawn(acceptor.clone().watch(l.name, stop.child_token())));
            }
            let metrics = self.inner.metrics.clone();
            let stopped = stop.clone();
            let drain = self.inner.shutdown_timeout;
            tasks.push(tokio::spawn(async move {
                crate::server::serve(l, metrics, async move { stopped.cancelled().await }, drain).await;
            }));
        }
        let shared = Arc::clone(&self.inner.shared);
        let failed = tokio::select! {
            () = signal => None,
            error = self.inner.store.failed() => Some(error),
        };
        if let Some(e) = &failed {
            tracing::error!(error = %e, "the spool stopped after a failed sync: shutting down so that the daemon is restarted");
        }
        shared.shutting_down.store(true, Ordering::Relaxed);
        // Live streams (dashboards) never end by themselves; the server waits for open connections.
        shared.live.close();
        tracing::info!("shutting down: no new connections; finishing requests in flight");
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        self.shutdown().await;
        match failed {
            Some(e) => Err(BridgeError::SpoolFailed(e)),
            None => Ok(()),
        }
    }

    /// Stops dispatchers (waiting at most the shutdown deadline for deliveries in progress) and closes the
    /// spool. Pending deliveries stay in the spool for the next start.
    pub async fn shutdown(self) {
        self.inner.shared.shutting_down.store(true, Ordering::Relaxed);
        self.inner.shared.live.close();
        self.inner.cancel.cancel();
        let running: Vec<RunningSink> = self.inner.sinks.lock().await.drain().map(|(_, r)| r).collect();
        let mut handles: Vec<JoinHandle<()>> = running.into_iter().map(|r| r.handle).collect();
        handles.push(self.housekeeping);
        let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
        let drained = tokio::time::timeout(self.inner.shutdown_timeout, async {
            for h in handles {
                let _ = h.await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown deadline passed with deliveries in progress; they resume at the next start");
            for a in aborts {
                a.abort();
            }
        }
        self.inner.store.close().await;
        tracing::info!("spool closed");
    }
}

/// Applies a new config to a running bridge: see [`Reloader::reload`].
#[derive(Clone)]
pub struct Reloader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").finish_non_exhaustive()
    }
}

impl Reloader {
    /// Applies `config`, all or nothing: new and changed sinks are built first (a failure leaves everything
    /// as it was); then sources and routes are swapped atomically, so every request after this uses the new
    /// ones; then each changed sink's dispatcher is stopped (deliveries in progress finish) and restarted
    /// with the new settings. Sinks no longer in the config keep delivering what was routed to them before.
    /// Settings that need a restart (listen address, data directory, admin API, concurrency, shutdown
    /// deadline) are reported and left as they were.
    pub async fn reload(&self, config: Config) -> Result<(), BridgeError> {
        let new_settings = settings(&config)?;
        let mut running = self.inner.sinks.lock().await;
        // Plugins are loaded again on every reload (their .wasm may have changed), and restarted.
        let plugins = {
            let mut host = self.inner.plugins.lock().await;
            let loaded = load_plugins(&mut host, &config, &self.inner.store).await?;
            if let Some(h) = host.as_ref() {
                self.inner.shared.live.persist_to(h.kv().clone());
            }
            loaded
        };
        let cx = self.inner.build_context(&plugins, &config);
        let mut built = Vec::new();
        for spec in config.sinks.values() {
            let is_plugin = matches!(spec.kind, crate::config::SinkKind::Plugin(_));
            let unchanged = !is_plugin && running.get(&spec.id).is_some_and(|r| r.spec == *spec);
            if !unchanged {
                built.push((spec.clone(), sinks::build(spec, &cx)?));
            }
        }
        if let Ok(old) = self.inner.config.lock() {
            let mut restart = Vec::new();
            let (o, n) = (&old.server, &config.server);
            for (key, changed) in [
                ("server.listen", o.listen != n.listen),
                ("server.internal_listen", o.internal_listen != n.internal_listen),
                ("server.max_concurrency", o.max_concurrency != n.max_concurrency),
                ("server.max_unverified", o.max_unverified != n.max_unverified),
                ("server.max_connections", o.max_connections != n.max_connections),
                ("server.header_timeout", o.header_timeout != n.header_timeout),
                ("server.max_header_size", o.max_header_size != n.max_header_size),
                ("server.shutdown_timeout", o.shutdown_timeout != n.shutdown_timeout),
                ("server.tls", old.listeners.tls != config.listeners.tls),
                ("server.internal_tls", old.listeners.internal_tls != config.listeners.internal_tls),
                (
                    "server.internal_token",
                    old.listeners.internal_token.as_ref().map(|t| t.expose().to_owned())
                        != config.listeners.internal_token.as_ref().map(|t| t.expose().to_owned()),
                ),
            ] {
                if changed {
                    restart.push(key);
                }
            }
            if old.storage.data_dir != config.storage.data_dir || old.storage.retention != config.storage.retention {
                restart.push("storage");
            }
            if old.admin.as_ref().map(|a| (a.listen, a.token.clone(), a.tls.clone()))
                != config.admin.as_ref().map(|a| (a.listen, a.token.clone(), a.tls.clone()))
            {
                restart.push("admin");
            }
            if !restart.is_empty() {
                tracing::warn!(settings = ?restart, "these settings changed but apply only after a restart");
            }
        }
        self.inner.shared.settings.store(Arc::new(new_settings));
        for (spec, sink) in built {
            if let Some(old) = running.remove(&spec.id) {
                old.cancel.cancel();
                let _ = old.handle.await;
                tracing::info!(sink = %spec.id, "sink changed: restarted with the new settings");
            } else {
                tracing::info!(sink = %spec.id, "sink added");
            }
            running.insert(spec.id.clone(), self.inner.spawn_sink(&spec, sink));
        }
        for id in running.keys() {
            if !config.sinks.contains_key(id) {
                tracing::info!(sink = %id, "sink removed from the config: it keeps delivering what was routed to it");
            }
        }
        drop(running);
        if let Ok(mut c) = self.inner.config.lock() {
            *c = config;
        }
        Ok(())
    }

    /// Reads the TLS certificates and keys of the listeners being served again (the files' paths stay as
    /// they were at start); a listener whose files cannot be loaded keeps its current certificate.
    pub fn reload_tls(&self) {
        let acceptors = self.inner.tls.lock().map(|a| a.clone()).unwrap_or_default();
        for (name, acceptor) in acceptors {
            acceptor.reload_logged(name);
        }
    }

    /// Loads `path` and applies it; counts and logs the outcome. An invalid file leaves the running config.
    pub async fn reload_file(&self, path: &std::path::Path) -> Result<(), BridgeError> {
        let result = match Config::load(path) {
            Ok(config) => self.reload(config).await,
            Err(e) => Err(BridgeError::Config(e.to_string())),
        };
        match &result {
            Ok(()) => {
                tracing::info!(config = %path.display(), "configuration reloaded");
                self.inner.metrics.reload("ok");
            }
            Err(e) => {
                tracing::error!(config = %path.display(), error = %e, "configuration reload refused; the running config stays");
                self.inner.metrics.reload("error");
            }
        }
        result
    }
}

/// Prunes past retention every [`PRUNE_INTERVAL`] (or a tenth of the retention, if shorter), recounts the
/// spool gauges every [`DISPATCH_POLL`] (an operator may have changed the spool from another process), and
/// reads the per-sink gauges of `/metrics` (dead letters, oldest pending) at most every
/// [`SINK_STATS_INTERVAL`], and never using more than a twentieth of the time, so that scrapes read a
/// snapshot whatever the spool holds.
async fn housekeeping(
    shared: Arc<Shared>,
    kv: Option<crate::plugin::kv::Kv>,
    retention: Duration,
    cancel: CancellationToken,
) {
    let store = shared.store.clone();
    let prune_every = PRUNE_INTERVAL.min(retention / 10).max(DISPATCH_POLL);
    let mut last_prune: Option<std::time::Instant> = None;
    let mut next_stats = std::time::Instant::now();
    loop {
        if std::time::Instant::now() >= next_stats {
            let started = std::time::Instant::now();
            match store.sink_stats().await {
                Ok(stats) => {
                    if let Ok(mut s) = shared.sink_stats.lock() {
                        *s = stats;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot read sink statistics for /metrics"),
            }
            next_stats = std::time::Instant::now() + SINK_STATS_INTERVAL.max(started.elapsed() * 20);
        }
        if last_prune.is_none_or(|t| t.elapsed() >= prune_every) {
            last_prune = Some(std::time::Instant::now());
            let before = now_ms() - retention.as_millis() as i64;
            let mut total = 0;
            loop {
                match store.prune(before, PRUNE_BATCH).await {
                    Ok(n) => {
                        total += n;
                        if (n as usize) < PRUNE_BATCH || cancel.is_cancelled() {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "pruning failed");
                        break;
                    }
                }
            }
            if total > 0 {
                tracing::info!(events = total, "pruned finished events past retention");
            }
            if let Some(kv) = kv.clone() {
                match tokio::task::spawn_blocking(move || kv.prune()).await {
                    Ok(Ok(n)) if n > 0 => tracing::info!(keys = n, "pruned expired plugin keys"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "pruning plugin keys failed"),
                    _ => {}
                }
            }
        } else if let Err(e) = store.resync().await {
            tracing::warn!(error = %e, "cannot recount the spool");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(DISPATCH_POLL) => {}
        }
    }
}

/// Starts a bridge for `config` and serves it on `listener` (the webhook listener) until `signal`, with the
/// internal listener on `[server] internal_listen`, the admin API on its own address when `[admin]` is
/// configured, and the systemd notify protocol (readiness, watchdog, stopping) when run by systemd. With
/// `reload_from`, SIGHUP reloads the config from that file and the listeners' TLS certificates.
pub async fn run(
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
    reload_from: Option<PathBuf>,
) -> Result<(), BridgeError> {
    let internal = TcpListener::bind(config.server.internal_listen).await.map_err(|e| {
        BridgeError::Io(std::io::Error::new(
            e.kind(),
            format!("cannot listen on server.internal_listen {}: {e}", config.server.internal_listen),
        ))
    })?;
    let admin = match &config.admin {
        Some(spec) => Some(TcpListener::bind(spec.listen).await.map_err(|e| {
            BridgeError::Io(std::io::Error::new(
                e.kind(),
                format!("cannot listen on admin.listen {}: {e}", spec.listen),
            ))
        })?),
        None => None,
    };
    let bridge = Bridge::start(config).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening for webhooks");
    tracing::info!(addr = %internal.local_addr()?, "internal listener (metrics, readiness, dashboard)");
    if let Some(a) = &admin {
        tracing::info!(addr = %a.local_addr()?, "admin API listening");
    }
    let stop = CancellationToken::new();
    let watchdog = tokio::spawn(crate::service::watchdog(bridge.store().clone(), stop.clone()));
    let reloads = reload_from.map(|path| tokio::spawn(reload_on_sighup(bridge.reloader(), path, stop.clone())));
    let signal = {
        let stop = stop.clone();
        async move {
            signal.await;
            crate::service::stopping();
            stop.cancel();
        }
    };
    crate::service::ready(&addr.to_string());
    let result = bridge.serve(Sockets { webhook: listener, internal: Some(internal), admin }, signal).await;
    stop.cancel();
    let _ = watchdog.await;
    if let Some(t) = reloads {
        let _ = t.await;
    }
    result
}

#[cfg(unix)]
async fn reload_on_sighup(reloader: Reloader, path: PathBuf, stop: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut hup) = signal(SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: configuration reload unavailable");
        return;
    };
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                crate::service::reloading();
                let _ = reloader.reload_file(&path).await;
                reloader.reload_tls();
                crate::service::reloaded();
            }
        }
    }
}

#[cfg(not(unix))]
async fn reload_on_sighup(_reloader: Reloader, _path: PathBuf, stop: CancellationToken) {
    stop.cancelled().await;
}
