//! The SQLite spool: events, their deliveries and the attempt log in `spool.db` (WAL), written by one
//! writer thread (`writer.rs`) that folds every operation waiting into one transaction (group commit), and
//! read on connections of its own that never block the writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot};

use super::cold::ColdWrite;
use super::writer::{self, Op};
use super::{
    DB_FILE, Dedup, EventDetail, Feed, FeedSender, Feeds, Inserted, PendingDelivery, READERS_IDLE, READERS_MAX, Record,
    SinkStats, SpoolGauges, StoreError, acker, ops, restrict_file, restrict_permissions, schema,
};
use crate::event::Event;
use crate::limits::WRITER_QUEUE;

/// The SQLite spool's handle. Cheap to clone.
#[derive(Clone)]
pub(super) struct Sqlite {
    tx: mpsc::Sender<Op>,
    feeds: Feeds,
    /// Held (locked) while any handle is alive.
    lock: Arc<std::fs::File>,
    path: PathBuf,
    readers: Arc<Mutex<Vec<Connection>>>,
    /// Reads in progress at most (each holds a blocking thread and a connection).
    read_slots: Arc<tokio::sync::Semaphore>,
    gauges: Arc<SpoolGauges>,
    writer: Arc<Mutex<Option<std::thread::JoinHandle<()>>>>,
    /// Answers reported and not yet taken by the writer: (seq, dedup hash, certain).
    answers: writer::AnswerMarks,
    /// Set by the writer when a sync failed.
    failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl std::fmt::Debug for Sqlite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sqlite").field("path", &self.path).finish_non_exhaustive()
    }
}

impl Sqlite {
    /// Opens (creating if needed) the spool in `data_dir` and starts its writer thread.
    pub(super) fn open(data_dir: &Path) -> Result<Sqlite, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::Dir { path: data_dir.to_owned(), source })?;
        restrict_permissions(data_dir);
        // One daemon per spool: two would both dispatch every pending delivery.
        let lock_path = data_dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| StoreError::Dir { path: lock_path.clone(), source })?;
        lock.try_lock().map_err(|_| {
            StoreError::Schema(format!(
                "{} is in use by another hookbridge daemon (one daemon per data_dir)",
                data_dir.display()
            ))
        })?;
        let path = data_dir.join(DB_FILE);
        let conn = Connection::open(&path)?;
        schema::prepare_writer(&conn)?;
        restrict_file(&path);
        let gauges = Arc::new(schema::load_gauges(&conn)?);
        let (tx, rx) = mpsc::channel(WRITER_QUEUE);
        let g = Arc::clone(&gauges);
        let feeds: Feeds = Arc::default();
        let f = Arc::clone(&feeds);
        let answers = writer::AnswerMarks::default();
        let failure = Arc::new(tokio::sync::watch::Sender::new(None));
        // Answers are completed by a task on the runtime that opens the spool, when there is one (`acker`).
        let answers_out = acker::Answers::new();
        let shared = writer::Shared { answers: answers.clone(), failure: Arc::clone(&failure), answers_out };
        let handle = std::thread::Builder::new()
            .name("hookbridge-spool".into())
            .spawn(move || writer::run(conn, rx, g, f, shared))
            .map_err(|source| StoreError::Dir { path: data_dir.to_owned(), source })?;
        Ok(Sqlite {
            tx,
            feeds,
            lock: Arc::new(lock),
            path,
            readers: Arc::new(Mutex::new(Vec::new())),
            read_slots: Arc::new(tokio::sync::Semaphore::new(READERS_MAX)),
            gauges,
            writer: Arc::new(Mutex::new(Some(handle))),
            answers,
            failure,
        })
    }

    /// The database file.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Subscribes to the deliveries for `sink` committed from now on (replacing an earlier subscription).
    /// The feed starts lagged: read the spool first for what was pending before.
    pub(super) fn subscribe(&self, sink: &str, capacity: usize) -> Feed {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let lagged = Arc::new(AtomicBool::new(true));
        if let Ok(mut feeds) = self.feeds.lock() {
            feeds.insert(sink.to_owned(), FeedSender { tx, lagged: Arc::clone(&lagged) });
        }
        Feed { rx, lagged, wake: Arc::default() }
    }

    /// True once the writer has stopped.
    pub(super) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Live counters.
    pub(super) fn gauges(&self) -> &SpoolGauges {
        &self.gauges
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T, StoreError>>) -> Op) -> Result<T, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Commits an event and one pending delivery per sink, durably, unless `dedup` makes it a duplicate of
    /// an event already stored.
    pub(super) async fn insert(&self, event: Event, sinks: Vec<String>, dedup: Dedup) -> Result<Inserted, StoreError> {
        self.call(|reply| Op::Insert { event, sinks, dedup, reply }).await
    }

    /// Reports the answer to the webhook of event `seq` (whose dedup key hashes to `hash`, see
    /// [`dedup_hash`]): `certain` when it was written whole within the provider's timeout, else the provider
    /// may retry, and a copy of the event is then a duplicate (see [`Dedup::Content`]); an uncertain answer
    /// is recorded in the spool. An event nobody reports on counts as answered: the ingress reports only
    /// uncertain answers, and certain ones for duplicates (the provider has then seen an answer for the
    /// original's bytes), so the common case costs the writer nothing.
    pub(super) fn answered(&self, seq: i64, hash: i64, certain: bool) {
        if let Ok(mut marks) = self.answers.lock() {
            marks.push((seq, hash, certain));
        }
        if !certain {
            // Wake the writer so that it is recorded now, not at the next insert.
            let _ = self.tx.try_send(Op::Answers);
        }
    }

    /// Completes when the spool has stopped for good after a failed sync, with the error: nothing written
    /// since can be promised, so the process should exit and be restarted (SQLite recovers from the WAL).
    pub(super) async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        let failed = rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone());
        match failed {
            Some(e) => e,
            // The writer is gone without failing (shutdown): never completes.
            None => std::future::pending().await,
        }
    }

    /// Writes to the log engine's cold tables, durably.
    pub(super) async fn cold(&self, writes: Vec<ColdWrite>) -> Result<(), StoreError> {
        self.call(|reply| Op::Cold { writes, reply }).await
    }

    /// Records several attempts and outcomes in one operation (a batch delivered together).
    pub(super) async fn record_all(&self, records: Vec<Record>) -> Result<(), StoreError> {
        self.call(|reply| Op::Record { records, reply }).await
    }

    /// Stores a Clockodo handshake secret (the newest few per source are kept).
    pub(super) async fn record_handshake(
        &self,
        source: &str,
        secret: &str,
        received_at_ms: i64,
    ) -> Result<(), StoreError> {
        let (source, secret) = (source.to_owned(), secret.to_owned());
        self.call(|reply| Op::Handshake { source, secret, received_at_ms, reply }).await
    }

    /// Stores (replaces) an add-on installation record, durably.
    pub(super) async fn save_installation(
        &self,
        source: &str,
        workspace: &str,
        addon_id: &str,
        record: String,
    ) -> Result<(), StoreError> {
        let (source, workspace, addon_id) = (source.to_owned(), workspace.to_owned(), addon_id.to_owned());
        self.call(|reply| Op::Installation { source, workspace, addon_id, record, reply }).await
    }

    /// Every add-on installation record: (source, workspace, add-on id, record).
    pub(super) async fn installations(&self) -> Result<Vec<(String, String, String, String)>, StoreError> {
        self.read(|conn| Ok(ops::installations(conn)?)).await
    }

    /// A small durable write: proves the store is writable (readiness).
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.call(|reply| Op::Ping { reply }).await
    }

    /// Deletes finished events older than `before_ms` with their deliveries and attempts, at most `limit` of
    /// them; recounts the gauges. Returns the number of events deleted (call again while it equals `limit`).
    pub(super) async fn prune(&self, before_ms: i64, limit: usize) -> Result<u64, StoreError> {
        self.call(|reply| Op::Prune { before_ms, limit, reply }).await
    }

    /// Recounts the gauges from the database if another connection (an operator) changed it since the last
    /// look (SQLite's `data_version`); cheap otherwise.
    pub(super) async fn resync(&self) -> Result<(), StoreError> {
        self.call(|reply| Op::Resync { reply }).await
    }

    /// Pending deliveries for `sink` with id greater than `after`, in id order, at most `limit`.
    pub(super) async fn pending(
        &self,
        sink: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| Ok(ops::pending(conn, &sink, after, limit, None)?)).await
    }

    /// Pending replays and dead-letter retries for `sink` with ids in `(after, up_to]`, in id order: an
    /// operator's connection may commit them with ids below a dispatcher's cursor.
    pub(super) async fn pending_replays(
        &self,
        sink: &str,
        after: i64,
        up_to: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let sink = sink.to_owned();
        self.read(move |conn| Ok(ops::pending(conn, &sink, after, limit, Some(up_to))?)).await
    }

    /// Dead letters and oldest pending delivery per sink.
    pub(super) async fn sink_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        self.read(|conn| {
            Ok(ops::sink_stats(conn)?
                .into_iter()
                .map(|(sink, dead, oldest_pending_ms)| SinkStats { sink, dead, oldest_pending_ms })
                .collect())
        })
        .await
    }

    /// Everything about one event.
    pub(super) async fn event(&self, id: &str) -> Result<Option<EventDetail>, StoreError> {
        let id = id.to_owned();
        self.read(move |conn| Ok(ops::show_event(conn, &id)?)).await
    }

    pub(super) async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let readers = Arc::clone(&self.readers);
        let path = self.path.clone();
        let slot = Arc::clone(&self.read_slots).acquire_owned().await.map_err(|e| StoreError::Join(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let conn = readers.lock().map_err(|e| StoreError::Join(e.to_string()))?.pop();
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&path)?,
            };
            let result = f(&conn);
            // Trimmed: connections beyond the few kept idle are closed.
            if let Ok(mut pool) = readers.lock()
                && pool.len() < READERS_IDLE
            {
                pool.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Join(e.to_string()))?
    }

    /// Stops the writer after it has committed everything queued before this call, and waits for it.
    pub(super) async fn close(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Op::Shutdown { reply }).await.is_ok() {
            let _ = rx.await;
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle {
            let _ = tokio::task::spawn_blocking(move || handle.join()).await;
        }
        // The writer is gone: another daemon may take the spool now.
        let _ = self.lock.unlock();
    }
}

pub(super) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    Ok(conn)
}
