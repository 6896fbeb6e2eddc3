//! The durable spool: events and their pending deliveries in an embedded SQLite database (WAL,
//! `synchronous=FULL`). One writer thread owns the write connection and folds every operation waiting in its
//! queue into one transaction: concurrent webhooks share one fsync (group commit). Readers use their own
//! connections and never block the writer.

mod schema;
mod writer;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use crate::event::Event;
use crate::limits::WRITER_QUEUE;
use writer::Op;

/// File name of the database inside `storage.data_dir`.
pub const DB_FILE: &str = "spool.db";

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
    /// The writer thread has stopped (shutdown or a fatal error).
    #[error("spool writer is not running")]
    Closed,
    /// A blocking read task failed.
    #[error("spool read task failed: {0}")]
    Join(String),
}

/// Live spool counters, kept by the writer after each commit.
#[derive(Debug, Default)]
pub struct SpoolGauges {
    /// Events with at least one unfinished delivery.
    pub pending_events: AtomicU64,
    /// Body bytes of those events.
    pub pending_bytes: AtomicU64,
    /// Unfinished deliveries.
    pub pending_deliveries: AtomicU64,
}

/// A delivery waiting to be attempted, with its event.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    /// The event's position in receive order.
    pub seq: i64,
    /// Attempts made so far (survives restarts).
    pub attempts: u32,
    /// The event.
    pub event: Event,
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

/// How a delivery ended (or not).
#[derive(Debug, Clone)]
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

/// A dispatcher's feed: deliveries committed from now on, in commit order, pushed by the writer.
#[derive(Debug)]
pub struct Feed {
    /// Deliveries as they are committed.
    pub rx: mpsc::Receiver<PendingDelivery>,
    /// Set by the writer when it could not push one because the feed was full: the dispatcher must read
    /// the spool from its cursor before it trusts the feed again.
    pub lagged: Arc<AtomicBool>,
}

struct FeedSender {
    tx: mpsc::Sender<PendingDelivery>,
    lagged: Arc<AtomicBool>,
}

type Feeds = Arc<Mutex<HashMap<String, FeedSender>>>;

/// Handle to the spool. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<Op>,
    feeds: Feeds,
    path: PathBuf,
    readers: Arc<Mutex<Vec<Connection>>>,
    gauges: Arc<SpoolGauges>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Store {
    /// Opens (creating if needed) the spool in `data_dir` and starts its writer thread.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir { path: data_dir.to_owned(), source })?;
        restrict_permissions(data_dir);
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path)?;
        schema::prepare_writer(&conn)?;
        let gauges = Arc::new(schema::load_gauges(&conn)?);
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let g = Arc::clone(&gauges);
        let feeds: Feeds = Arc::default();
        let f = Arc::clone(&feeds);
        let handle = std::thread::Builder::new()
            .name("hookbridge-spool".into())
            .spawn(move || writer::run(conn, rx, g, f))
            .map_err(|source| StoreError::Dir { path: data_dir.to_owned(), source })?;
        Ok(Store {
            tx,
            feeds,
            path,
            readers: Arc::new(Mutex::new(Vec::new())),
            gauges,
            writer: Arc::new(Mutex::new(Some(handle))),
        })
    }

    /// Subscribes to the deliveries for `sink` committed from now on (replacing an earlier subscription).
    /// The feed starts lagged: read the spool first for what was pending before.
    pub fn subscribe(&self, sink: &str, capacity: usize) -> Feed {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let lagged = Arc::new(AtomicBool::new(true));
        if let Ok(mut feeds) = self.feeds.lock() {
            feeds.insert(sink.to_owned(), FeedSender { tx, lagged: Arc::clone(&lagged) });
        }
        Feed { rx, lagged }
    }

    /// Live counters.
    pub fn gauges(&self) -> &SpoolGauges {
        &self.gauges
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits an event and one pending delivery per sink, durably. Returns the event's receive-order seq.
    pub async fn insert(&self, event: Event, sinks: Vec<String>) -> Result<i64, StoreError> {
        self.call(|reply| Op::Insert { event, sinks, reply }).await
    }

    /// Records the outcome of an attempt (`attempts` counts it).
    pub async fn record(&self, seq: i64, sink: &str, attempts: u32, outcome: Outcome) -> Result<(), StoreError> {
        let sink = sink.to_owned();
        self.call(|reply| Op::Record { seq, sink, attempts, outcome, reply }).await
    }

    /// Stores a Clockodo handshake secret (the newest few per source are kept).
    pub async fn record_handshake(&self, source: &str, secret: &str, received_at_ms: i64) -> Result<(), StoreError> {
        let (source, secret) = (source.to_owned(), secret.to_owned());
        self.call(|reply| Op::Handshake { source, secret, received_at_ms, reply }).await
    }

    /// A small durable write: proves the store is writable (readiness).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.call(|reply| Op::Ping { reply }).await
    }

    /// Deletes finished events received before `before_ms`. Returns how many.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, StoreError> {
        self.call(|reply| Op::Prune { before_ms, reply }).await
    }

    /// Pending deliveries for `sink` with seq greater than `after`, in receive order, at most `limit`.
    pub async fn pending(&self, sink: &str, after: i64, limit: usize) -> Result<Vec<PendingDelivery>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT e.seq, d.attempts, e.id, e.source, e.event_type, e.received_at, e.headers, e.body, e.dedup_key
                 FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE d.sink = ?1 AND d.status = 'pending' AND d.event_seq > ?2
                 ORDER BY d.event_seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(params![sink, after, limit as i64], |r| {
                let headers: String = r.get(6)?;
                Ok(PendingDelivery {
                    seq: r.get(0)?,
                    attempts: r.get(1)?,
                    event: Event {
                        id: r.get(2)?,
                        source: r.get(3)?,
                        event_type: r.get(4)?,
                        received_at_ms: r.get(5)?,
                        headers: serde_json::from_str(&headers).unwrap_or_default(),
                        body: Bytes::from(r.get::<_, Vec<u8>>(7)?),
                        dedup_key: r.get(8)?,
                    },
                })
            })?;
            rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from)
        })
        .await
    }

    /// The status of every delivery of the event with this id: `(sink, status, attempts, last_error)`.
    pub async fn deliveries_of(
        &self,
        event_id: &str,
    ) -> Result<Vec<(String, String, u32, Option<String>)>, StoreError> {
        let id = event_id.to_owned();
        self.read(move |conn| {
            let mut stmt = conn.prepare_cached(
                "SELECT d.sink, d.status, d.attempts, d.last_error FROM deliveries d JOIN events e ON e.seq = d.event_seq
                 WHERE e.id = ?1 ORDER BY d.sink",
            )?;
            let rows = stmt.query_map([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
            rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from)
        })
        .await
    }

    /// Whether an event with this id is stored.
    pub async fn has_event(&self, event_id: &str) -> Result<bool, StoreError> {
        let id = event_id.to_owned();
        self.read(move |conn| {
            Ok(conn.query_row("SELECT 1 FROM events WHERE id = ?1", [id], |_| Ok(())).optional()?.is_some())
        })
        .await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = readers.lock().map_err(|e| StoreError::Join(e.to_string()))?.pop();
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = f(&conn);
            if let Ok(mut pool) = readers.lock() {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Stops the writer after it has committed everything queued before this call, and waits for it.
    pub async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
    }
}

fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}

/// Handshakes stored in the spool at `data_dir`, newest first. Opens the database read-only, so it is
/// safe while a daemon runs.
pub fn list_handshakes(data_dir: &Path) -> Result<Vec<Handshake>, StoreError> {
    let conn = open_reader(&data_dir.join(DB_FILE))?;
    let mut stmt =
        conn.prepare("SELECT source, secret, received_at FROM handshakes ORDER BY received_at DESC, id DESC")?;
    let rows =
        stmt.query_map([], |r| Ok(Handshake { source: r.get(0)?, secret: r.get(1)?, received_at_ms: r.get(2)? }))?;
    rows.collect::<Result<Vec<_>, _>>().map_err(StoreError::from)
}

#[cfg(unix)]
fn restrict_permissions(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    // The spool holds webhook bodies (personal data): owner only.
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
}

#[cfg(not(unix))]
fn restrict_permissions(_dir: &Path) {}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish_non_exhaustive()
    }
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
}

#[cfg(test)]
mod tests;
