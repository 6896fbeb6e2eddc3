//! The durable spool, behind one API ([`Store`]) whatever engine holds it (`storage.engine`):
//! - the SQLite engine (`sqlite.rs`, `writer.rs`, `ops.rs`): events, their deliveries and the attempt log in
//!   an embedded SQLite database (WAL), one writer thread folding every operation waiting into one
//!   transaction (group commit), readers on connections of their own;
//! - the log engine (`logged.rs`): healthy events in the append-only segment log (`log/`), what did not go
//!   well (retries, dead letters, their attempts, replays) in the same SQLite database (`cold.rs`).
//!
//! Operator commands ([`Operator`]) use a connection of their own, in the daemon (admin API) or in another
//! process (CLI); SQLite's locking keeps them consistent, and on the log engine they read the segments
//! without writing.

mod acker;
mod cold;
mod dedup;
pub mod log;
mod logged;
mod ops;
mod postgres;
mod schema;
mod sqlite;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::mpsc;

pub use logged::LOG_DIR;
pub use ops::{AttemptInfo, DeadLetter, DeliveryInfo, EventDetail, EventFilter, EventSummary};
pub use postgres::{PgTls, PostgresSpec, SharedKv};

use crate::event::Event;

/// File name of the database inside `storage.data_dir`.
pub const DB_FILE: &str = "spool.db";
/// Reads of the daemon's spool handle in progress at once, at most (more wait their turn).
const READERS_MAX: usize = 4;
/// Read connections kept open between reads.
const READERS_IDLE: usize = 2;

/// Store failures. Callers answer 503 (ingress) or retry later (dispatch).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("spool database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The data directory could not be prepared.
    #[error("cannot prepare data directory {path}: {source}")]
    Dir {
        /// The folder.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The database was made by another version.
    #[error("{0}")]
    Schema(String),
    /// A commit failed; every operation in its batch failed with it.
    #[error("spool commit failed: {0}")]
    Commit(String),
    /// The writer thread has stopped (shutdown or a fatal error).
    #[error("spool writer is not running")]
    Closed,
    /// A blocking task failed.
    #[error("spool task failed: {0}")]
    Join(String),
    /// PostgreSQL (the cluster backend) said no, or could not be reached.
    #[error("cluster database error: {0}")]
    Postgres(String),
}

/// Live spool counters, kept by the writer after each commit and recounted periodically.
#[derive(Debug, Default)]
pub struct SpoolGauges {
    /// Events with at least one pending delivery.
    pub pending_events: AtomicU64,
    /// Body bytes of those events.
    pub pending_bytes: AtomicU64,
    /// Pending deliveries.
    pub pending_deliveries: AtomicU64,
    /// Events stored without any delivery (unrouted), kept until retention prunes them.
    pub unrouted_events: AtomicU64,
    /// Body bytes of those events.
    pub unrouted_bytes: AtomicU64,
}

impl SpoolGauges {
    /// (events, bytes, deliveries) pending.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.pending_events.load(Ordering::Relaxed),
            self.pending_bytes.load(Ordering::Relaxed),
            self.pending_deliveries.load(Ordering::Relaxed),
        )
    }

    /// (events, bytes) stored unrouted.
    pub fn unrouted(&self) -> (u64, u64) {
        (self.unrouted_events.load(Ordering::Relaxed), self.unrouted_bytes.load(Ordering::Relaxed))
    }

    /// Sets every gauge to `other`'s values.
    pub(crate) fn set_from(&self, other: &SpoolGauges) {
        let (e, b, d) = other.snapshot();
        self.pending_events.store(e, Ordering::Relaxed);
        self.pending_bytes.store(b, Ordering::Relaxed);
        self.pending_deliveries.store(d, Ordering::Relaxed);
        let (ue, ub) = other.unrouted();
        self.unrouted_events.store(ue, Ordering::Relaxed);
        self.unrouted_bytes.store(ub, Ordering::Relaxed);
    }
}

/// How much the spool may hold: routed events count against `max_pending_*` until their deliveries finish,
/// unrouted ones (kept for inspection until retention) against `max_unrouted_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolLimits {
    /// Events with pending deliveries.
    pub max_pending_events: u64,
    /// Their body bytes.
    pub max_pending_bytes: u64,
    /// Unrouted events.
    pub max_unrouted_events: u64,
    /// Their body bytes.
    pub max_unrouted_bytes: u64,
}

impl SpoolLimits {
    /// Whether one more event of `len` body bytes fits; `Err` is the rejection reason (a metric label).
    pub fn room_for(&self, gauges: &SpoolGauges, unrouted: bool, len: u64) -> Result<(), &'static str> {
        if unrouted {
            let (events, bytes) = gauges.unrouted();
            if events >= self.max_unrouted_events || bytes.saturating_add(len) > self.max_unrouted_bytes {
                return Err("unrouted_full");
            }
        } else {
            let (events, bytes, _) = gauges.snapshot();
            if events >= self.max_pending_events || bytes.saturating_add(len) > self.max_pending_bytes {
                return Err("spool_full");
            }
        }
        Ok(())
    }

    /// Whether a plugin's emit of `len` body bytes fits. Emits may take the spool up to twice
    /// `max_pending_*`: webhooks are refused at the limit, so a spool full of events routed to plugins can
    /// still drain (each such event finishes only once its emits are stored). `Err` is the reason.
    pub fn room_for_emit(&self, gauges: &SpoolGauges, len: u64) -> Result<(), &'static str> {
        let (events, bytes, _) = gauges.snapshot();
        if events >= self.max_pending_events.saturating_mul(2)
            || bytes.saturating_add(len) > self.max_pending_bytes.saturating_mul(2)
        {
            return Err("spool_full");
        }
        Ok(())
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn routed_unrouted_and_emitted_events_have_their_own_bounds() {
        let limits = SpoolLimits {
            max_pending_events: 2,
            max_pending_bytes: 100,
            max_unrouted_events: 1,
            max_unrouted_bytes: 10,
        };
        let g = SpoolGauges::default();
        assert_eq!(limits.room_for(&g, false, 100), Ok(()));
        assert_eq!(limits.room_for(&g, false, 101), Err("spool_full"));
        assert_eq!(limits.room_for(&g, true, 10), Ok(()));
        assert_eq!(limits.room_for(&g, true, 11), Err("unrouted_full"));
        g.pending_events.store(2, Ordering::Relaxed);
        assert_eq!(limits.room_for(&g, false, 1), Err("spool_full"), "routed events stop at the limit");
        assert_eq!(limits.room_for(&g, true, 1), Ok(()), "unrouted events do not count against it");
        assert_eq!(limits.room_for_emit(&g, 1), Ok(()), "emits may go past it, so that plugins drain a full spool");
        g.pending_events.store(4, Ordering::Relaxed);
        assert_eq!(limits.room_for_emit(&g, 1), Err("spool_full"));
        g.unrouted_events.store(1, Ordering::Relaxed);
        assert_eq!(limits.room_for(&g, true, 1), Err("unrouted_full"));
    }
}

/// A delivery waiting to be attempted, with its event.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    /// Delivery id: a sink's deliveries are started in this order.
    pub id: i64,
    /// The event's position in receive order.
    pub seq: i64,
    /// Attempts made so far (survives restarts).
    pub attempts: u32,
    /// Made by a replay or a dead-letter retry.
    pub replay: bool,
    /// The event (shared by its deliveries to every sink).
    pub event: Arc<Event>,
    /// When this delivery was created (the event's receive time, or the replay's time), ms since the epoch.
    pub created_at_ms: i64,
    /// When its next attempt is due (set by a failed attempt; kept across restarts), ms since the epoch.
    pub next_attempt_ms: Option<i64>,
}

/// The result of inserting an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inserted {
    /// Stored as a new event.
    New {
        /// Its receive-order position.
        seq: i64,
    },
    /// An event with the same dedup key is already stored within the dedup window: nothing was stored.
    Duplicate {
        /// The id of the event received first.
        original: String,
        /// Its receive-order position.
        seq: i64,
    },
}

/// How an insert dedups against the events received before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dedup {
    /// Not at all.
    Off,
    /// The key is a delivery id: an event with the same key received since `since_ms` (ms since the epoch)
    /// makes this one a duplicate.
    DeliveryId {
        /// Start of the dedup window.
        since_ms: i64,
    },
    /// The key is the content: an event with the same key received since `since_ms` makes this one a
    /// duplicate only if the provider may not have seen its answer (the answer was reported cut, failed or
    /// late: [`Store::answered`]), or if it was received at or after `retry_since_ms` (the window of the
    /// provider's immediate retries).
    Content {
        /// Start of the dedup window.
        since_ms: i64,
        /// Now less the retry window.
        retry_since_ms: i64,
    },
}

impl Dedup {
    /// Start of the dedup window, `None` when off.
    pub fn since_ms(&self) -> Option<i64> {
        match *self {
            Dedup::Off => None,
            Dedup::DeliveryId { since_ms } | Dedup::Content { since_ms, .. } => Some(since_ms),
        }
    }
}

/// The dedup hash of a dedup key (what [`Store::answered`] takes).
pub fn dedup_hash(key: &str) -> i64 {
    ops::dedup_hash(key)
}

/// One delivery attempt, for the attempt log.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    /// Start, ms since the epoch.
    pub started_at_ms: i64,
    /// Duration in ms.
    pub duration_ms: i64,
    /// HTTP status, when the sink got one.
    pub status: Option<u16>,
}

/// One attempt of a delivery and its outcome, to record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The delivery.
    pub delivery_id: i64,
    /// Attempts so far, this one included.
    pub attempts: u32,
    /// What happened.
    pub outcome: Outcome,
    /// The attempt, for the attempt log.
    pub attempt: Attempt,
    /// The delivery's event as the caller knows it (its seq and body length in bytes), so that recording
    /// need not read them back; `None`: read from the spool.
    pub event: Option<(i64, i64)>,
}

/// How a delivery ended (or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The sink acknowledged it.
    Delivered,
    /// It failed for good (kept in the store with the error, status `dead`).
    Dead(String),
    /// It failed and will be retried at `next_attempt_ms`.
    Retry {
        /// When the next attempt is due.
        next_attempt_ms: i64,
        /// The failure.
        error: String,
    },
}

/// A Clockodo validation handshake as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handshake {
    /// Source id.
    pub source: String,
    /// The secret to type into Clockodo.
    pub secret: String,
    /// Receive time, ms since the epoch.
    pub received_at_ms: i64,
}

/// Per-sink health read from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkStats {
    /// Sink id.
    pub sink: String,
    /// Dead letters.
    pub dead: i64,
    /// Receive time of the oldest event with a pending delivery to this sink.
    pub oldest_pending_ms: Option<i64>,
}

/// A dispatcher's feed: deliveries committed from now on, in commit order, pushed by the writer.
#[derive(Debug)]
pub struct Feed {
    /// Deliveries as they are committed.
    pub rx: mpsc::Receiver<PendingDelivery>,
    /// Set by the writer when it could not push one because the feed was full: the dispatcher must read
    /// the spool from its cursor before it trusts the feed again.
    pub lagged: Arc<AtomicBool>,
    /// Notified when the spool has deliveries to read that the feed does not carry (the cluster backend:
    /// its deliveries are claimed by reads, and other nodes' webhooks arrive by notification).
    pub wake: Arc<tokio::sync::Notify>,
}

struct FeedSender {
    tx: mpsc::Sender<PendingDelivery>,
    lagged: Arc<AtomicBool>,
}

type Feeds = Arc<Mutex<HashMap<String, FeedSender>>>;

/// What [`Store::live_from_others`] gives: the last payload of each channel (channel, payload), and a
/// receiver of the other nodes' next ones.
pub type LiveFromOthers = (Vec<(String, String)>, mpsc::Receiver<(String, String)>);

/// Handle to the daemon's spool. Cheap to clone. Which backend holds the events is `store/`'s business
/// alone: everything outside works through this API.
#[derive(Clone, Debug)]
pub struct Store {
    backend: Backend,
}

#[derive(Clone, Debug)]
enum Backend {
    Sqlite(sqlite::Sqlite),
    Log(logged::Logged),
    Postgres(postgres::Postgres),
}

/// Where the spool keeps healthy events (`storage.engine`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Everything in SQLite (`spool.db`): the default before the log; still served, the
    /// takeover's source and the benchmarks' baseline.
    Sqlite,
    /// Healthy events in the append-only segment log (`log/`), the cold path in SQLite. Takes a
    /// SQLite-engine spool over at open.
    #[default]
    Log,
}

impl Store {
    /// Opens (creating if needed) the spool in `data_dir` on the default engine (the log), taking a
    /// SQLite-engine spool over, and starts its threads.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        Store::open_engine(data_dir, Engine::default())
    }

    /// Opens (creating if needed) the spool in `data_dir` with `engine`, recovering it, and starts its
    /// threads. A spool made by the other engine is refused with the reason.
    pub fn open_engine(data_dir: &Path, engine: Engine) -> Result<Store, StoreError> {
        let sqlite = sqlite::Sqlite::open(data_dir)?;
        let backend = match engine {
            Engine::Sqlite => {
                let conn = sqlite::open_reader(sqlite.path())?;
                if schema::meta(&conn, "engine")?.as_deref() == Some("log") {
                    return Err(StoreError::Schema(format!(
                        "{} was made by storage.engine = \"log\": set it back (its events are in {}/)",
                        data_dir.display(),
                        logged::LOG_DIR
                    )));
                }
                Backend::Sqlite(sqlite)
            }
            Engine::Log => Backend::Log(logged::Logged::open(data_dir, sqlite)?),
        };
        Ok(Store { backend })
    }

    /// Opens the spool `storage` configures: the embedded one in `data_dir` with its engine, or the
    /// cluster's database (`postgres`, for `backend = "postgres"`).
    pub async fn open_configured(
        storage: &crate::config::types::StorageConfig,
        postgres: Option<&PostgresSpec>,
    ) -> Result<Store, StoreError> {
        match cluster_spec(storage, postgres)? {
            Some(spec) => Store::connect(spec).await,
            None => Store::open_engine(&storage.data_dir, storage.engine),
        }
    }

    /// Connects to the cluster's PostgreSQL database (migrating its schema) and joins the cluster as
    /// `spec.node_id`.
    pub async fn connect(spec: &PostgresSpec) -> Result<Store, StoreError> {
        Ok(Store { backend: Backend::Postgres(postgres::Postgres::open(spec).await?) })
    }

    /// The database file of the embedded spool (`None` on the cluster backend).
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::Sqlite(s) => Some(s.path()),
            Backend::Log(l) => Some(l.sqlite().path()),
            Backend::Postgres(_) => None,
        }
    }

    /// Changes whenever an add-on installation may have changed outside this process (the cluster
    /// backend: another node took a lifecycle call); `None` where nothing else writes them.
    pub fn installation_changes(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match &self.backend {
            Backend::Postgres(p) => Some(p.installation_changes()),
            _ => None,
        }
    }

    /// Shares a live channel's payload this node published with the other nodes of a cluster (best effort;
    /// nothing to do on the embedded spool).
    pub fn share_live(&self, channel: &str, payload: Arc<str>) {
        if let Backend::Postgres(p) = &self.backend {
            p.share_live(channel, payload);
        }
    }

    /// On a cluster: the live channels' last payloads as the cluster has them, and a receiver of what other
    /// nodes publish from now on. `None` on the embedded spool.
    pub async fn live_from_others(&self) -> Result<Option<LiveFromOthers>, StoreError> {
        match &self.backend {
            Backend::Postgres(p) => Ok(Some(p.live_from_others().await?)),
            _ => Ok(None),
        }
    }

    /// On a cluster: the plugins' key-value store, which the nodes share. `None` on the embedded spool (the
    /// plugin host keeps its own, `plugins.db`).
    pub fn plugin_kv(&self) -> Option<SharedKv> {
        match &self.backend {
            Backend::Postgres(p) => Some(p.plugin_kv()),
            _ => None,
        }
    }

    /// Whether the backend takes a delivery back when its retry is recorded and hands it out again once the
    /// retry is due (the cluster's: to any node). The dispatcher then ends the delivery's task there instead
    /// of waiting out the backoff in it, holding a slot.
    pub fn takes_retries_back(&self) -> bool {
        matches!(self.backend, Backend::Postgres(_))
    }

    /// This node's id in the cluster (`None` on the embedded spool).
    pub fn node_id(&self) -> Option<&str> {
        match &self.backend {
            Backend::Postgres(p) => Some(p.node()),
            _ => None,
        }
    }

    /// Subscribes to the deliveries for `sink` committed from now on (replacing an earlier subscription).
    /// The feed starts lagged: read the spool first for what was pending before.
    pub fn subscribe(&self, sink: &str, capacity: usize) -> Feed {
        match &self.backend {
            Backend::Sqlite(s) => s.subscribe(sink, capacity),
            Backend::Log(l) => l.subscribe(sink, capacity),
            Backend::Postgres(p) => p.subscribe(sink, capacity),
        }
    }

    /// True once the writer has stopped.
    pub fn is_closed(&self) -> bool {
        match &self.backend {
            Backend::Sqlite(s) => s.is_closed(),
            Backend::Log(l) => l.is_closed(),
            Backend::Postgres(p) => p.is_closed(),
        }
    }

    /// Live counters (a snapshot).
    pub fn gauges(&self) -> SpoolGauges {
        let g = SpoolGauges::default();
        match &self.backend {
            Backend::Sqlite(s) => g.set_from(s.gauges()),
            Backend::Log(l) => l.gauges(&g),
            Backend::Postgres(p) => p.gauges(&g),
        }
        g
    }

    /// Commits an event and one pending delivery per sink, durably, unless `dedup` makes it a duplicate of
    /// an event already stored.
    pub async fn insert(&self, event: Event, sinks: Vec<String>, dedup: Dedup) -> Result<Inserted, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.insert(event, sinks, dedup).await,
            Backend::Log(l) => l.insert(event, sinks, dedup).await,
            Backend::Postgres(p) => p.insert(event, sinks, dedup).await,
        }
    }

    /// Reports the answer to the webhook of event `seq` (whose dedup key hashes to `hash`, see
    /// [`dedup_hash`]): `certain` when it was written whole within the provider's timeout, else the provider
    /// may retry, and a copy of the event is then a duplicate (see [`Dedup::Content`]); an uncertain answer
    /// is recorded in the spool. An event nobody reports on counts as answered: the ingress reports only
    /// uncertain answers, and certain ones for duplicates (the provider has then seen an answer for the
    /// original's bytes), so the common case costs the writer nothing.
    pub fn answered(&self, seq: i64, hash: i64, certain: bool) {
        match &self.backend {
            Backend::Sqlite(s) => s.answered(seq, hash, certain),
            Backend::Log(l) => l.answered(seq, hash, certain),
            Backend::Postgres(p) => p.answered(seq, hash, certain),
        }
    }

    /// Completes when the spool has stopped for good after a failed sync, with the error: nothing written
    /// since can be promised, so the process should exit and be restarted (the spool recovers at open).
    pub async fn failed(&self) -> String {
        match &self.backend {
            Backend::Sqlite(s) => s.failed().await,
            Backend::Log(l) => l.failed().await,
            // PostgreSQL refuses a commit per transaction: nothing stops the backend for good.
            Backend::Postgres(_) => std::future::pending().await,
        }
    }

    /// Records one attempt of `sink`'s delivery and its outcome (`attempts` counts this one).
    pub async fn record(
        &self,
        sink: &str,
        delivery_id: i64,
        attempts: u32,
        outcome: Outcome,
        attempt: Attempt,
    ) -> Result<(), StoreError> {
        self.record_all(sink, vec![Record { delivery_id, attempts, outcome, attempt, event: None }]).await
    }

    /// Records several attempts of `sink`'s deliveries and their outcomes in one operation (a batch
    /// delivered together).
    pub async fn record_all(&self, sink: &str, records: Vec<Record>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.record_all(records).await,
            Backend::Log(l) => l.record_all(sink, records).await,
            Backend::Postgres(p) => p.record_all(sink, records).await,
        }
    }

    /// Stores a Clockodo handshake secret (the newest few per source are kept).
    pub async fn record_handshake(&self, source: &str, secret: &str, received_at_ms: i64) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.record_handshake(source, secret, received_at_ms).await,
            Backend::Log(l) => l.sqlite().record_handshake(source, secret, received_at_ms).await,
            Backend::Postgres(p) => p.record_handshake(source, secret, received_at_ms).await,
        }
    }

    /// Stores (replaces) an add-on installation record, durably.
    pub async fn save_installation(
        &self,
        source: &str,
        workspace: &str,
        addon_id: &str,
        record: String,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.save_installation(source, workspace, addon_id, record).await,
            Backend::Log(l) => l.sqlite().save_installation(source, workspace, addon_id, record).await,
            Backend::Postgres(p) => p.save_installation(source, workspace, addon_id, record).await,
        }
    }

    /// Every add-on installation record: (source, workspace, add-on id, record).
    pub async fn installations(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.installations().await,
            Backend::Log(l) => l.sqlite().installations().await,
            Backend::Postgres(p) => p.installations().await,
        }
    }

    /// A small durable write: proves the store is writable (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.ping().await,
            Backend::Log(l) => l.ping().await,
            Backend::Postgres(p) => p.ping().await,
        }
    }

    /// Deletes finished events older than `before_ms` with their deliveries and attempts, at most `limit` of
    /// them; recounts the gauges. Returns the number of events deleted (call again while it equals `limit`).
    pub async fn prune(&self, before_ms: i64, limit: usize) -> Result<u64, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.prune(before_ms, limit).await,
            Backend::Log(l) => l.prune(before_ms, limit).await,
            Backend::Postgres(p) => p.prune(before_ms, limit).await,
        }
    }

    /// Takes in what operators changed since the last look (recounting the gauges); cheap otherwise.
    pub async fn resync(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.resync().await,
            Backend::Log(l) => l.resync().await,
            Backend::Postgres(p) => p.resync().await,
        }
    }

    /// Pending deliveries for `sink` with id greater than `after`, in id order, at most `limit`.
    pub async fn pending(&self, sink: &str, after: i64, limit: usize) -> Result<Vec<PendingDelivery>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.pending(sink, after, limit).await,
            Backend::Log(l) => l.pending(sink, after, limit).await,
            Backend::Postgres(p) => p.pending(sink, after, limit).await,
        }
    }

    /// Pending replays and dead-letter retries for `sink` with ids in `(after, up_to]`, in id order: an
    /// operator's connection may commit them with ids below a dispatcher's cursor.
    pub async fn pending_replays(
        &self,
        sink: &str,
        after: i64,
        up_to: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.pending_replays(sink, after, up_to, limit).await,
            // The log engine's replays are new events in the log, above every cursor: the feed or the walk
            // hands them; the cluster's are claimed like every delivery.
            Backend::Log(_) | Backend::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// At start, with the sinks of the config: what was routed to a sink no longer there. The log engine
    /// dead-letters its unfinished deliveries (they would pin the log; `dlq retry` once the sink is back); the
    /// SQLite engine and the cluster backend leave them pending (they pin only their own rows, and are delivered if it comes back).
    /// Returns (sink, deliveries dead-lettered).
    pub async fn retire_sinks(&self, keep: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        match &self.backend {
            // The cluster's nodes may run different configs for a while (a rolling change): none retires
            // another's sinks.
            Backend::Sqlite(_) | Backend::Postgres(_) => Ok(Vec::new()),
            Backend::Log(l) => l.retire_sinks(keep).await,
        }
    }

    /// Dead letters and oldest pending delivery per sink.
    pub async fn sink_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.sink_stats().await,
            Backend::Log(l) => l.sink_stats().await,
            Backend::Postgres(p) => p.sink_stats().await,
        }
    }

    /// Everything about one event.
    pub async fn event(&self, id: &str) -> Result<Option<EventDetail>, StoreError> {
        match &self.backend {
            Backend::Sqlite(s) => s.event(id).await,
            Backend::Log(l) => l.event(id).await,
            Backend::Postgres(p) => p.event(id).await,
        }
    }

    /// Stops the writer after it has committed everything queued before this call, and waits for it.
    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite(s) => s.close().await,
            Backend::Log(l) => l.close().await,
            Backend::Postgres(p) => p.close().await,
        }
    }
}

/// Operator access to a spool (the CLI's `events` and `dlq` commands, and the admin API): inspection and
/// repair on a connection of its own. Safe while a daemon runs on the same spool: the daemon's dispatchers
/// pick up new pending deliveries at their next poll (on the cluster backend, at once: they are told).
#[derive(Debug)]
pub struct Operator {
    kind: OperatorKind,
}

#[derive(Debug)]
enum OperatorKind {
    Embedded {
        conn: Connection,
        /// The spool is the log engine's, with its log here: dead letters live in its cold tables, events in
        /// the log.
        log: Option<PathBuf>,
    },
    Postgres(postgres::operator::PgOperator),
}

impl Operator {
    /// Opens the embedded spool in `data_dir` (which must exist: a daemon created it).
    pub fn open(data_dir: &Path) -> Result<Operator, StoreError> {
        let path = data_dir.join(DB_FILE);
        if !path.exists() {
            return Err(StoreError::Schema(format!(
                "no spool at {} (has the daemon run with this config?)",
                path.display()
            )));
        }
        let conn =
            Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
        schema::configure(&conn)?;
        let log = (schema::meta(&conn, "engine")?.as_deref() == Some("log")).then(|| data_dir.join(LOG_DIR));
        Ok(Operator { kind: OperatorKind::Embedded { conn, log } })
    }

    /// Connects to the cluster's database (which a daemon of this version prepared).
    pub fn connect(spec: &PostgresSpec) -> Result<Operator, StoreError> {
        Ok(Operator { kind: OperatorKind::Postgres(postgres::operator::PgOperator::connect(spec)?) })
    }

    /// Opens the spool `storage` configures (see [`Store::open_configured`]).
    pub fn open_configured(
        storage: &crate::config::types::StorageConfig,
        postgres: Option<&PostgresSpec>,
    ) -> Result<Operator, StoreError> {
        match cluster_spec(storage, postgres)? {
            Some(spec) => Operator::connect(spec),
            None => Operator::open(&storage.data_dir),
        }
    }

    /// Events matching `filter`, newest first.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<EventSummary>, StoreError> {
        match &self.kind {
            OperatorKind::Embedded { conn, log: Some(dir) } => logged::operator::list(conn, dir, filter),
            OperatorKind::Embedded { conn, log: None } => Ok(ops::list_events(conn, filter)?),
            OperatorKind::Postgres(pg) => pg.events(filter),
        }
    }

    /// One event, with deliveries and attempts.
    pub fn event(&self, id: &str) -> Result<Option<EventDetail>, StoreError> {
        match &self.kind {
            OperatorKind::Embedded { conn, log: Some(dir) } => logged::operator::show(conn, dir, id),
            OperatorKind::Embedded { conn, log: None } => Ok(ops::show_event(conn, id)?),
            OperatorKind::Postgres(pg) => pg.event(id),
        }
    }

    /// The events a replay would touch: one by id, or those received in `[since_ms, until_ms)`.
    pub fn replay_targets(&self, id: Option<&str>, since_ms: i64, until_ms: i64) -> Result<Vec<i64>, StoreError> {
        match &self.kind {
            OperatorKind::Embedded { conn, log: Some(dir) } => {
                logged::operator::replay_targets(conn, dir, id, since_ms, until_ms)
            }
            OperatorKind::Embedded { conn, log: None } => Ok(ops::replay_targets(conn, id, since_ms, until_ms)?),
            OperatorKind::Postgres(pg) => pg.replay_targets(id, since_ms, until_ms),
        }
    }

    /// Queues new deliveries (marked replay) for these events, to `sink` or to the sinks they were routed to,
    /// in one transaction. Returns how many deliveries were queued.
    pub fn replay(&mut self, seqs: &[i64], sink: Option<&str>) -> Result<usize, StoreError> {
        let (conn, log) = match &mut self.kind {
            OperatorKind::Embedded { conn, log } => (conn, log),
            OperatorKind::Postgres(pg) => return pg.replay(seqs, sink),
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        if let Some(dir) = log {
            let n = logged::operator::replay(&tx, dir, seqs, sink)?;
            tx.commit()?;
            return Ok(n);
        }
        let mut n = 0;
        for seq in seqs {
            n += ops::replay(&tx, *seq, sink)?;
        }
        tx.commit()?;
        Ok(n)
    }

    /// Dead letters, oldest first (on the log engine, `delivery_id` is the dead letter's own id).
    pub fn dead_letters(&self, sink: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        match &self.kind {
            OperatorKind::Embedded { conn, log: Some(_) } => Ok(cold::dead_letters(conn, sink)?),
            OperatorKind::Embedded { conn, log: None } => Ok(ops::dead_letters(conn, sink)?),
            OperatorKind::Postgres(pg) => pg.dead_letters(sink),
        }
    }

    /// Retries dead letters by delivery id. Returns how many were dead letters (and are now pending again).
    pub fn retry_dead(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        let (conn, log) = match &mut self.kind {
            OperatorKind::Embedded { conn, log } => (conn, log.is_some()),
            OperatorKind::Postgres(pg) => return pg.retry_dead(ids),
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0;
        for id in ids {
            n += usize::from(if log { cold::retry_dead(&tx, *id)? } else { ops::retry_dead(&tx, *id)? });
        }
        tx.commit()?;
        Ok(n)
    }

    /// Gives up dead letters by delivery id. Returns how many were dead letters.
    pub fn purge_dead(&mut self, ids: &[i64]) -> Result<usize, StoreError> {
        let (conn, log) = match &mut self.kind {
            OperatorKind::Embedded { conn, log } => (conn, log.is_some()),
            OperatorKind::Postgres(pg) => return pg.purge_dead(ids),
        };
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut n = 0;
        for id in ids {
            n += usize::from(if log { cold::purge_dead(&tx, *id)? } else { ops::purge_dead(&tx, *id)? });
        }
        tx.commit()?;
        Ok(n)
    }

    /// Add-on installation records: (source, workspace, add-on id, JSON record holding credentials: show
    /// only what is safe).
    pub fn installations(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        match &self.kind {
            OperatorKind::Embedded { conn, .. } => Ok(ops::installations(conn)?),
            OperatorKind::Postgres(pg) => pg.installations(),
        }
    }

    /// Clockodo handshakes, newest first.
    pub fn handshakes(&self) -> Result<Vec<Handshake>, StoreError> {
        match &self.kind {
            OperatorKind::Embedded { conn, .. } => Ok(ops::list_handshakes(conn)?),
            OperatorKind::Postgres(pg) => pg.handshakes(),
        }
    }
}

/// The cluster's database when `storage` says `backend = "postgres"` (with its resolved section), `None` for
/// the embedded spool.
fn cluster_spec<'a>(
    storage: &crate::config::types::StorageConfig,
    postgres: Option<&'a PostgresSpec>,
) -> Result<Option<&'a PostgresSpec>, StoreError> {
    match (storage.backend, postgres) {
        (crate::config::types::StorageBackend::Postgres, Some(spec)) => Ok(Some(spec)),
        (crate::config::types::StorageBackend::Postgres, None) => {
            Err(StoreError::Schema("storage.backend = \"postgres\" needs [storage.postgres]".into()))
        }
        (crate::config::types::StorageBackend::Embedded, _) => Ok(None),
    }
}

#[cfg(unix)]
fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The spool holds webhook bodies (personal data): owner only.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict_permissions(_dir: &Path) {}

/// The database holds credentials (add-on installation tokens): owner read/write only.
#[cfg(unix)]
fn restrict_file(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
}

#[cfg(not(unix))]
fn restrict_file(_path: &Path) {}

#[cfg(test)]
mod tests;
