//! Sinks: where deliveries go. One trait, one file per kind, each built from its validated spec
//! ([`crate::config::SinkSpec`]). A sink reports each failure as retryable or permanent; the dispatcher
//! decides what happens next.
//!
//! Adding a sink kind: a config struct in `config/types.rs` (closed, documented), its validation in
//! `config/mod.rs` producing a `SinkKind` variant, a file here implementing [`Sink`], a line in [`build`],
//! integration tests against a real peer, and its section in the README's config reference.

mod amqp;
mod file;
mod http;
mod kafka;
mod plugin;

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use amqp::{AmqpSink, amqp_properties};
pub use file::FileSink;
pub use http::HttpSink;
pub use kafka::{KafkaSink, kafka_headers};
pub use plugin::PluginSink;

use crate::config::{SinkKind, SinkSpec};
use crate::event::Event;

/// A boxed future, so that [`Sink`] can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// CloudEvents version sent in `ce-specversion`.
pub const CE_SPECVERSION: &str = "1.0";

/// Why a delivery failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// Worth trying again later (timeouts, connection errors, 408, 429, 5xx, a full disk).
    #[error("{message}")]
    Retryable {
        /// What happened.
        message: String,
        /// The peer's `Retry-After`, if it gave one.
        retry_after: Option<Duration>,
        /// HTTP status, if there was one.
        status: Option<u16>,
    },
    /// Trying again will not help (other 4xx, a message the peer rejects).
    #[error("{message}")]
    Permanent {
        /// What happened.
        message: String,
        /// HTTP status, if there was one.
        status: Option<u16>,
    },
}

impl SinkError {
    /// A retryable error without a hint or status.
    pub fn retryable(message: impl Into<String>) -> Self {
        SinkError::Retryable { message: message.into(), retry_after: None, status: None }
    }
    /// A permanent error without a status.
    pub fn permanent(message: impl Into<String>) -> Self {
        SinkError::Permanent { message: message.into(), status: None }
    }
    /// Metric label value.
    pub fn class(&self) -> &'static str {
        match self {
            SinkError::Retryable { .. } => "retryable",
            SinkError::Permanent { .. } => "permanent",
        }
    }
    /// The HTTP status, if there was one.
    pub fn status(&self) -> Option<u16> {
        match self {
            SinkError::Retryable { status, .. } | SinkError::Permanent { status, .. } => *status,
        }
    }
}

/// A destination for events. Implementations are cheap to share (`Arc`) and safe to call concurrently.
pub trait Sink: Send + Sync + Debug {
    /// Delivers one event. `Ok` only once the peer has it (for `http`: a 2xx; for `file`: fsync'd; for
    /// brokers: the broker's acknowledgement).
    fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>>;

    /// How many deliveries one [`Sink::deliver_batch`] call may take; 1 (the default): one at a time.
    fn batch_max(&self) -> usize {
        1
    }

    /// Delivers several events at once (at most [`Sink::batch_max`], never two with the same ordering key),
    /// answering for each, in order, as [`Sink::deliver`] would. A sink that overrides it does so because one
    /// call is cheaper than many (one write and one fsync for the `file` sink). The default delivers them one
    /// after the other.
    fn deliver_batch<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        Box::pin(async move {
            let mut results = Vec::with_capacity(events.len());
            for event in events {
                results.push(self.deliver(event).await);
            }
            results
        })
    }

    /// The state of the connection a sink keeps (brokers); `None` for sinks without one.
    fn connection(&self) -> Option<Connection> {
        None
    }

    /// Called once when the sink's dispatcher starts: a sink with a connection opens it now, so that
    /// `/readyz` tells an unreachable broker before the first event does.
    fn start(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// [`Sink::deliver_batch`] for sinks whose deliveries pipeline (brokers: publish now, wait for the ack):
/// every event's delivery runs at once, and each answers when its own acknowledgement arrives.
pub(crate) fn deliver_concurrently<'a, S: Sink + ?Sized>(
    sink: &'a S,
    events: &'a [&'a Event],
) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
    Box::pin(futures_util::future::join_all(events.iter().map(|e| sink.deliver(e))))
}

/// A broker sink's connection state, as `/readyz` and `hookbridge_sink_connected` report it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Connection {
    /// Connected and usable.
    pub connected: bool,
    /// What is known: `connected`, `connecting`, or the last error.
    pub state: String,
}

/// A connection state shared between a sink and its callbacks.
#[derive(Debug)]
pub(crate) struct ConnectionState(std::sync::Mutex<Connection>);

impl ConnectionState {
    pub(crate) fn new() -> Self {
        ConnectionState(std::sync::Mutex::new(Connection { connected: false, state: "connecting".into() }))
    }
    pub(crate) fn set(&self, connected: bool, state: impl Into<String>) {
        if let Ok(mut c) = self.0.lock() {
            *c = Connection { connected, state: state.into() };
        }
    }
    pub(crate) fn get(&self) -> Connection {
        self.0.lock().map(|c| c.clone()).unwrap_or(Connection { connected: false, state: "unknown".into() })
    }
}

/// Renders a template for a delivery; a missing value is a permanent failure (retrying cannot add it).
pub(crate) fn render(template: &crate::template::Template, event: &Event) -> Result<String, SinkError> {
    template.render(event).map_err(SinkError::permanent)
}

/// Failure to build a sink (reported at start-up).
#[derive(Debug, thiserror::Error)]
#[error("sink {id}: {message}")]
pub struct BuildError {
    /// Sink id.
    pub id: String,
    /// What went wrong.
    pub message: String,
}

/// What building a sink may need besides its spec.
#[derive(Debug)]
pub struct BuildContext<'a> {
    /// The spool (plugins store their emits there).
    pub store: &'a crate::store::Store,
    /// Live channels (plugins publish there).
    pub live: &'a crate::live::Live,
    /// Telemetry.
    pub metrics: &'a crate::metrics::Metrics,
    /// Loaded plugins by id.
    pub plugins: &'a std::collections::HashMap<String, crate::plugin::Plugin>,
    /// Every configured sink id (what a plugin may emit to).
    pub sink_ids: Vec<String>,
    /// Add-on installations (plugins may use the ones of the event's source).
    pub addons: &'a crate::addon::Installations,
    /// How much the spool may hold (plugin emits count against it like webhooks).
    pub spool_limits: crate::store::SpoolLimits,
}

/// Builds the running sink for a spec (opens files, creates clients; plugins must be loaded already).
pub fn build(spec: &SinkSpec, cx: &BuildContext<'_>) -> Result<Arc<dyn Sink>, BuildError> {
    let err = |message: String| BuildError { id: spec.id.clone(), message };
    Ok(match &spec.kind {
        SinkKind::Http(h) => Arc::new(HttpSink::new(h).map_err(err)?),
        SinkKind::File(f) => Arc::new(FileSink::open(f).map_err(err)?),
        SinkKind::Kafka(k) => Arc::new(KafkaSink::new(&spec.id, k).map_err(err)?),
        SinkKind::Amqp(a) => Arc::new(AmqpSink::new(&spec.id, a)),
        SinkKind::Plugin(_) => {
            let plugin = cx.plugins.get(&spec.id).ok_or_else(|| err("the plugin was not loaded".into()))?;
            Arc::new(PluginSink::new(
                plugin.clone(),
                cx.store.clone(),
                cx.live.clone(),
                cx.metrics.clone(),
                cx.sink_ids.clone(),
                cx.addons.clone(),
                cx.spool_limits,
            ))
        }
    })
}
