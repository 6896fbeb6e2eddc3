//! The bridge: builds the running pieces from a validated [`Config`] (spool, sinks, dispatchers, router),
//! serves, and shuts down in order. This is the embedding API; `main` is a thin layer over it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::event::now_ms;
use crate::ingress::{Shared, router};
use crate::limits::{DISPATCH_POLL, FEED_CAPACITY, PRUNE_BATCH, PRUNE_INTERVAL};
use crate::metrics::Metrics;
use crate::route::RouteTable;
use crate::sinks::{self, BuildError};
use crate::store::{Store, StoreError};

/// Why the bridge could not start.
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
    /// Metrics registration failed.
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// Serving failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

/// A running bridge: spool open, dispatchers running. Mount [`Bridge::router`] in any axum app, or call
/// [`Bridge::serve`]. Call [`Bridge::shutdown`] at the end so deliveries stop cleanly and the spool closes.
#[derive(Debug)]
pub struct Bridge {
    shared: Arc<Shared>,
    config: Config,
    store: Store,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
    shutdown_timeout: Duration,
}

impl Bridge {
    /// Opens the spool, builds sinks and starts one dispatcher per sink. Pending deliveries left by an
    /// earlier run are picked up at once.
    pub async fn start(config: Config) -> Result<Bridge, BridgeError> {
        let routes = RouteTable::compile(&config.routes).map_err(|errors| {
            BridgeError::Routes(
                errors
                    .iter()
                    .map(|e| format!("routes[{}].{}: {}", e.index, e.field, e.message))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        let metrics = Metrics::new()?;
        let mut built = Vec::new();
        for spec in config.sinks.values() {
            built.push((spec.clone(), sinks::build(spec)?));
        }
        let store = Store::open(&config.storage.data_dir)?;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for (spec, sink) in built {
            let feed = store.subscribe(&spec.id, FEED_CAPACITY);
            let d = Dispatcher {
                sink_id: spec.id.clone(),
                sink,
                store: store.clone(),
                max_in_flight: spec.max_in_flight,
                retry: spec.retry,
                metrics: metrics.clone(),
            };
            tasks.spawn(d.run(feed, cancel.child_token()));
        }
        tasks.spawn(housekeeping(store.clone(), config.storage.retention.0, cancel.child_token()));
        for source in config.sources.values() {
            tracing::info!(source = %source.id, kind = source.scheme.kind(), path = %source.path, "source ready");
        }
        let shared = Arc::new(Shared {
            sources: config.sources.values().map(|s| (s.path.clone(), s.clone())).collect(),
            routes,
            store: store.clone(),
            metrics,
            max_body: config.server.max_body_size.0,
            request_timeout: config.server.request_timeout.0,
            sink_ids: config.sinks.keys().cloned().collect(),
            dedup_window: Some(config.storage.dedup_window.0).filter(|w| !w.is_zero()),
            max_pending_events: config.storage.max_pending_events,
            max_pending_bytes: config.storage.max_pending_bytes.0,
            concurrency: Semaphore::new(config.server.max_concurrency),
            shutting_down: AtomicBool::new(false),
            last_ready: std::sync::Mutex::new(None),
        });
        let shutdown_timeout = config.server.shutdown_timeout.0;
        Ok(Bridge { shared, config, store, cancel, tasks, shutdown_timeout })
    }

    /// The HTTP routes (webhooks, `/healthz`, `/readyz`, `/metrics`), to serve or to mount.
    pub fn router(&self) -> axum::Router {
        router(Arc::clone(&self.shared))
    }

    /// The admin API's router, when `[admin]` is configured (serve it on its own, private listener).
    pub fn admin_router(&self) -> Option<axum::Router> {
        self.config.admin.as_ref().map(|a| crate::admin::router(self.config.clone(), a.token.clone()))
    }

    /// The spool (for inspection in tests and tools).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Serves on `listener` until `signal` completes, then shuts down: stop accepting, let in-flight
    /// requests finish, stop dispatchers within the shutdown deadline, close the spool.
    pub async fn serve(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), BridgeError> {
        let app = self.router();
        let shared = Arc::clone(&self.shared);
        let graceful = async move {
            signal.await;
            shared.shutting_down.store(true, Ordering::Relaxed);
            tracing::info!("shutting down: no new connections; finishing requests in flight");
        };
        // Answers are small and written once: send them at once rather than wait for Nagle.
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
        });
        let served = axum::serve(listener, app).with_graceful_shutdown(graceful).await;
        self.shutdown().await;
        served.map_err(BridgeError::from)
    }

    /// Stops dispatchers (waiting at most the shutdown deadline for deliveries in progress) and closes the
    /// spool. Pending deliveries stay in the spool for the next start.
    pub async fn shutdown(mut self) {
        self.shared.shutting_down.store(true, Ordering::Relaxed);
        self.cancel.cancel();
        let drained =
            tokio::time::timeout(self.shutdown_timeout, async { while self.tasks.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            tracing::warn!("shutdown deadline passed with deliveries in progress; they resume at the next start");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        self.store.close().await;
        tracing::info!("spool closed");
    }
}

/// Prunes past retention every [`PRUNE_INTERVAL`], and recounts the spool gauges every [`DISPATCH_POLL`]
/// (an operator may have changed the spool from another process).
async fn housekeeping(store: Store, retention: Duration, cancel: CancellationToken) {
    let mut last_prune: Option<std::time::Instant> = None;
    loop {
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL) {
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
        } else if let Err(e) = store.resync().await {
            tracing::warn!(error = %e, "cannot recount the spool");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(DISPATCH_POLL) => {}
        }
    }
}

/// Starts a bridge for `config` and serves it on `listener` until `signal`, with the admin API on its own
/// address when `[admin]` is configured, and the systemd notify protocol (readiness, watchdog, stopping) when
/// run by systemd.
pub async fn run(
    config: Config,
    listener: TcpListener,
    signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BridgeError> {
    let bridge = Bridge::start(config).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "listening");
    let stop = CancellationToken::new();
    let mut admin_task = None;
    if let (Some(router), Some(spec)) = (bridge.admin_router(), bridge.config.admin.as_ref()) {
        let admin_listener = TcpListener::bind(spec.listen).await?;
        tracing::info!(addr = %admin_listener.local_addr()?, "admin API listening");
        let stop = stop.clone();
        admin_task = Some(tokio::spawn(async move {
            let graceful = async move { stop.cancelled().await };
            if let Err(e) = axum::serve(admin_listener, router).with_graceful_shutdown(graceful).await {
                tracing::error!(error = %e, "admin API failed");
            }
        }));
    }
    let watchdog = tokio::spawn(crate::service::watchdog(bridge.store().clone(), stop.clone()));
    let signal = {
        let stop = stop.clone();
        async move {
            signal.await;
            crate::service::stopping();
            stop.cancel();
        }
    };
    crate::service::ready(&addr.to_string());
    let result = bridge.serve(listener, signal).await;
    stop.cancel();
    let _ = watchdog.await;
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    result
}
