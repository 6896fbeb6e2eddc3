//! The log engine (`storage.engine = "log"`): healthy events go through the append-only segment log
//! (`log/`, its spool thread in `log/spool.rs`: one write and one `fdatasync` per group commit), and only
//! what did not go well reaches SQLite (`cold.rs`, written by the SQLite writer of `sqlite.rs`, which also
//! keeps handshakes and add-on installations).
//!
//! A delivery lives in the log until its first attempt that does not deliver. Then it moves: its event is
//! copied and its state written to `deferred` (to retry) or `dead_letters`, synced, and only then is the
//! log told that the sink finished it. A crash between the two leaves the log thinking it undone and
//! SQLite holding it; SQLite wins: [`Logged::pending`] drops such a delivery from what the log hands out
//! and finishes it there (`settle`, filled at open from the dead letters the log may not know of; the
//! deferred ones are known anyway). So a delivery is always in exactly one place once the pending read
//! after a start has run, and nothing is lost in between: at worst it is attempted once more.
//!
//! Deliveries ids are the event's seq (the log's seq plus one) in both places, so that a sink's deferred
//! and logged deliveries merge into one order: a deferred delivery keeps its ordering key busy ahead of the
//! newer events of the same key, across restarts.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::cold::{self, ColdWrite};
use super::dedup::Known;
use super::log::file::OsDisk;
use super::log::spool::{Earlier, Spool, SpoolError};
use super::log::{self, Log, Options};
use super::sqlite::Sqlite;
use super::{Dedup, Feed, Inserted, Outcome, PendingDelivery, Record, SinkStats, SpoolGauges, StoreError, ops, schema};
use crate::event::Event;
use crate::limits::{GROUP_COMMIT_MAX, WRITER_QUEUE};

/// The log's folder inside `data_dir`.
pub const LOG_DIR: &str = "log";

/// The error of a delivery dead-lettered because its sink left the config.
const RETIRED: &str = "sink removed from the config";

/// Deliveries of a removed sink dead-lettered per operation.
const RETIRE_BATCH: usize = 512;

/// Replays taken from SQLite into the log at a time.
const REPLAYS_PER_TAKE: usize = 256;

/// What the log engine keeps in memory of the cold path.
#[derive(Debug, Default)]
struct Cold {
    /// Deferred deliveries: (sink, seq).
    deferred: BTreeSet<(String, i64)>,
    /// Deferred events: seq -> (deliveries deferred, body bytes).
    events: BTreeMap<i64, (u32, u32)>,
    /// The sum of those body bytes.
    bytes: u64,
    /// Dead letters the log may still hold as undone (their move committed, the log's checkpoint did not).
    settle: BTreeSet<(String, i64)>,
    /// Deferred events whose move out of the log has not been checkpointed yet: the log still counts them,
    /// so the gauges leave them out here (seq -> body bytes).
    transit: BTreeMap<i64, u32>,
}

impl Cold {
    /// Defers `(sink, seq)`; whether the event was not deferred before (for another sink).
    fn defer(&mut self, sink: &str, seq: i64, bytes: u32) -> bool {
        let mut new = false;
        if self.deferred.insert((sink.to_owned(), seq)) {
            let e = self.events.entry(seq).or_insert_with(|| {
                self.bytes += u64::from(bytes);
                new = true;
                (0, bytes)
            });
            e.0 += 1;
        }
        new
    }

    fn undefer(&mut self, sink: &str, seq: i64) {
        if self.deferred.remove(&(sink.to_owned(), seq))
            && let std::collections::btree_map::Entry::Occupied(mut e) = self.events.entry(seq)
        {
            e.get_mut().0 -= 1;
            if e.get().0 == 0 {
                self.bytes -= u64::from(e.remove().1);
                self.transit.remove(&seq);
            }
        }
    }

    /// Events and body bytes to add to the log's counts: the deferred events, less those the log still
    /// counts because their move has not been checkpointed (counted twice, a second webhook would find a
    /// spool of `max_pending_events = 2` full with one event in it).
    fn counted(&self) -> (u64, u64) {
        let moving: u64 = self.transit.values().map(|b| u64::from(*b)).sum();
        ((self.events.len() - self.transit.len()) as u64, self.bytes.saturating_sub(moving))
    }

    /// Whether `sink` has deferred deliveries with seq above `after`.
    fn deferred_after(&self, sink: &str, after: i64) -> bool {
        self.deferred.range((sink.to_owned(), after.saturating_add(1))..(sink.to_owned(), i64::MAX)).next().is_some()
    }

    /// Whether the log's delivery `(sink, seq)` lives in SQLite now.
    fn moved(&self, sink: &str, seq: i64) -> bool {
        let key = (sink.to_owned(), seq);
        self.deferred.contains(&key) || self.settle.contains(&key)
    }
}

/// The log engine's handle. Cheap to clone.
#[derive(Clone)]
pub(super) struct Logged {
    spool: Spool,
    sqlite: Sqlite,
    cold: Arc<Mutex<Cold>>,
    thread: Arc<Mutex<Option<JoinHandle<Log<OsDisk>>>>>,
    dir: PathBuf,
}

impl std::fmt::Debug for Logged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logged").field("dir", &self.dir).finish_non_exhaustive()
    }
}

/// The events of the SQLite engine's spool the log took over, as dedup reads them (read-only, on the spool
/// thread; a store's seq `s` is log seq `s - 1`, below the log's first).
struct SqliteEvents(rusqlite::Connection);

impl Earlier for SqliteEvents {
    fn received_between(&mut self, since_ms: i64, until_ms: i64) -> Result<Vec<Known>, String> {
        let known = ops::recent_keys(&self.0, since_ms, until_ms).map_err(|e| e.to_string())?;
        Ok(known.into_iter().map(|k| Known { seq: k.seq - 1, ..k }).collect())
    }

    fn find(&mut self, seq: u64, key: &str, source: &str) -> Result<Option<String>, String> {
        let seq = log::spool::public_seq(seq);
        let found = ops::find_duplicate(&self.0, &[seq], key, source).map_err(|e| e.to_string())?;
        Ok(found.map(|(_, id)| id))
    }
}

fn spool_error(e: SpoolError) -> StoreError {
    match e {
        SpoolError::Closed => StoreError::Closed,
        other => StoreError::Commit(other.to_string()),
    }
}

impl Logged {
    /// Opens the log engine's spool in `data_dir` over the SQLite spool `sqlite` (already open: it holds
    /// the data directory's lock), recovering the log.
    pub(super) fn open(data_dir: &Path, sqlite: Sqlite) -> Result<Logged, StoreError> {
        let mut conn = rusqlite::Connection::open(sqlite.path())?;
        schema::configure(&conn)?;
        if schema::meta(&conn, "engine")?.as_deref() != Some("log") {
            // A SQLite-engine spool: taken over in one transaction (a crash before its commit changed
            // nothing; after it, the spool is the log engine's and its log starts empty at `log_first_seq`).
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let (deferred, replays, dead, first) = cold::migrate_from_sqlite(&tx)?;
            schema::set_meta(&tx, "log_first_seq", &first.to_string())?;
            schema::set_meta(&tx, "engine", "log")?;
            tx.commit()?;
            if deferred + replays + dead > 0 {
                tracing::warn!(
                    deferred,
                    replays,
                    dead,
                    "spool taken over from the sqlite engine: its pending deliveries go first, then the log"
                );
            }
        }
        let first_seq = schema::meta(&conn, "log_first_seq")?.and_then(|v| v.parse().ok()).unwrap_or(0);
        let uuid = match schema::meta(&conn, "log_uuid")?.and_then(|u| uuid::Uuid::parse_str(&u).ok()) {
            Some(u) => *u.as_bytes(),
            None => {
                let u = uuid::Uuid::now_v7();
                schema::set_meta(&conn, "log_uuid", &u.to_string())?;
                *u.as_bytes()
            }
        };
        let dir = data_dir.join(LOG_DIR);
        let (log, recovery) = Log::open(OsDisk, &dir, uuid, Options { first_seq, ..Options::default() })
            .map_err(|e| StoreError::Schema(format!("cannot open the spool log: {e}")))?;
        if recovery.lost_events() > 0 {
            tracing::error!(
                lost = recovery.lost_events(),
                holes = ?recovery.holes,
                "the spool log has corrupt stretches: the events in them are lost (disk corruption?)"
            );
        }
        tracing::info!(
            segments = recovery.segments,
            events = recovery.events,
            torn_tail = recovery.torn_tail,
            "spool log recovered"
        );
        // Dead letters from the oldest seq any sink is not done with: those the log may not know were moved.
        let floor = log.sinks().values().map(|s| s.floor()).min().unwrap_or(u64::MAX).min(log.first_seq());
        let mut state = Cold::default();
        for (sink, seq, bytes) in cold::all_deferred(&conn)? {
            state.defer(&sink, seq, bytes);
        }
        state.settle = cold::dead_since(&conn, log::spool::public_seq(floor))?.into_iter().collect();
        drop(conn);
        // The SQLite engine's events stay in `events` until retention prunes them: dedup still finds them.
        let earlier: Option<Box<dyn Earlier>> = match first_seq {
            0 => None,
            _ => Some(Box::new(SqliteEvents(super::sqlite::open_reader(sqlite.path())?))),
        };
        let (spool, thread) = Spool::spawn_after(log, earlier, WRITER_QUEUE, GROUP_COMMIT_MAX)
            .map_err(|source| StoreError::Dir { path: dir.clone(), source })?;
        Ok(Logged { spool, sqlite, cold: Arc::new(Mutex::new(state)), thread: Arc::new(Mutex::new(Some(thread))), dir })
    }

    /// The SQLite spool (cold path, handshakes, installations).
    pub(super) fn sqlite(&self) -> &Sqlite {
        &self.sqlite
    }

    pub(super) fn subscribe(&self, sink: &str, capacity: usize) -> Feed {
        self.spool.subscribe(sink, capacity)
    }

    pub(super) fn is_closed(&self) -> bool {
        self.spool.is_closed() || self.sqlite.is_closed()
    }

    /// The log's pending counts plus the deferred deliveries'. An event with a delivery pending in the log
    /// and another deferred counts twice in events and bytes (an upper bound: the spool-full check errs on
    /// the safe side); one moving to the cold path for its only delivery counts once, in the log until the
    /// move is checkpointed, then in the cold path.
    pub(super) fn gauges(&self, into: &SpoolGauges) {
        into.set_from(self.spool.gauges());
        if let Ok(c) = self.cold.lock() {
            let (events, bytes) = c.counted();
            into.pending_events.fetch_add(events, Ordering::Relaxed);
            into.pending_bytes.fetch_add(bytes, Ordering::Relaxed);
            into.pending_deliveries.fetch_add(c.deferred.len() as u64, Ordering::Relaxed);
        }
    }

    pub(super) async fn insert(&self, event: Event, sinks: Vec<String>, dedup: Dedup) -> Result<Inserted, StoreError> {
        self.spool.insert(event, sinks, dedup).await.map_err(spool_error)
    }

    pub(super) fn answered(&self, seq: i64, hash: i64, certain: bool) {
        self.spool.answered(seq, hash, certain);
    }

    pub(super) async fn failed(&self) -> String {
        tokio::select! {
            e = self.spool.failed() => e,
            e = self.sqlite.failed() => e,
        }
    }

    /// Records outcomes of `sink`'s deliveries: a deferred one's in SQLite; a logged one that was delivered
    /// is finished in the log; one that was not moves to SQLite first, then is finished in the log. A
    /// delivery that is neither deferred nor outstanding (recorded twice) is left alone.
    pub(super) async fn record_all(&self, sink: &str, records: Vec<Record>) -> Result<(), StoreError> {
        let mut writes = Vec::new();
        let mut finished = Vec::new();
        let mut moving = Vec::new();
        {
            let cold = self.cold.lock().map_err(|e| StoreError::Join(e.to_string()))?;
            for r in records {
                if cold.deferred.contains(&(sink.to_owned(), r.delivery_id)) {
                    writes.push(ColdWrite::Update { sink: sink.to_owned(), record: r });
                } else if r.outcome == Outcome::Delivered {
                    finished.push(r.delivery_id);
                } else {
                    moving.push(r);
                }
            }
        }
        if !moving.is_empty() {
            let ids: Vec<i64> = moving.iter().map(|r| r.delivery_id).collect();
            let events = self.spool.outstanding(sink, &ids).await.map_err(spool_error)?;
            for r in moving {
                if let Some((_, event, replay)) = events.iter().find(|(id, ..)| *id == r.delivery_id) {
                    finished.push(r.delivery_id);
                    let (sink, event, replay) = (sink.to_owned(), Arc::clone(event), *replay);
                    writes.push(ColdWrite::Move { sink, event, replay, record: r });
                }
            }
        }
        let mut transit = Vec::new();
        if !writes.is_empty() {
            self.sqlite.cold(writes.clone()).await?;
            let mut cold = self.cold.lock().map_err(|e| StoreError::Join(e.to_string()))?;
            for w in &writes {
                match w {
                    ColdWrite::Move { event, record, .. } if matches!(record.outcome, Outcome::Retry { .. }) => {
                        let bytes = event.body.len() as u32;
                        if cold.defer(sink, record.delivery_id, bytes) {
                            cold.transit.insert(record.delivery_id, bytes);
                            transit.push(record.delivery_id);
                        }
                    }
                    ColdWrite::Update { record, .. } if !matches!(record.outcome, Outcome::Retry { .. }) => {
                        cold.undefer(sink, record.delivery_id);
                    }
                    _ => {}
                }
            }
        }
        if !finished.is_empty() {
            self.spool.finished(sink, &finished).await.map_err(spool_error)?;
        }
        // The log no longer counts the moved events: the cold path's count is theirs alone now.
        if !transit.is_empty()
            && let Ok(mut cold) = self.cold.lock()
        {
            for seq in transit {
                cold.transit.remove(&seq);
            }
        }
        Ok(())
    }

    /// `sink`'s deliveries with id above `after`, in id order, at most `limit`: the deferred ones and those
    /// the log holds for it, merged.
    pub(super) async fn pending(
        &self,
        sink: &str,
        after: i64,
        limit: usize,
    ) -> Result<Vec<PendingDelivery>, StoreError> {
        let logged = self.spool.pending(sink, after, limit).await.map_err(spool_error)?;
        let (read_cold, moved): (bool, Vec<i64>) = {
            let cold = self.cold.lock().map_err(|e| StoreError::Join(e.to_string()))?;
            let moved = logged.iter().filter(|p| cold.moved(sink, p.id)).map(|p| p.id).collect();
            (cold.deferred_after(sink, after), moved)
        };
        let mut rows: Vec<PendingDelivery> = logged.into_iter().filter(|p| !moved.contains(&p.id)).collect();
        if !moved.is_empty() {
            // Moved before a crash, and the log was not told: it is told now.
            self.spool.finished(sink, &moved).await.map_err(spool_error)?;
            if let Ok(mut cold) = self.cold.lock() {
                for id in &moved {
                    cold.settle.remove(&(sink.to_owned(), *id));
                }
            }
        }
        if read_cold {
            let s = sink.to_owned();
            let deferred = self.sqlite.read(move |c| Ok(cold::deferred(c, &s, after, limit)?)).await?;
            rows.extend(deferred);
            rows.sort_by_key(|p| p.id);
            rows.dedup_by_key(|p| p.id);
            // What is cut off here was handed by the log and stays outstanding: the next read returns it.
            rows.truncate(limit);
        }
        Ok(rows)
    }

    /// Dead letters per sink (SQLite) and the oldest pending delivery (log and deferred).
    pub(super) async fn sink_stats(&self) -> Result<Vec<SinkStats>, StoreError> {
        let (dead, deferred) = self.sqlite.read(|c| Ok((cold::dead_counts(c)?, cold::oldest_deferred(c)?))).await?;
        let logged = self.spool.oldest().await.map_err(spool_error)?;
        let mut out: BTreeMap<String, SinkStats> = BTreeMap::new();
        for (sink, n) in dead {
            out.entry(sink.clone()).or_insert_with(|| SinkStats { sink, dead: 0, oldest_pending_ms: None }).dead = n;
        }
        for (sink, at) in deferred.into_iter().chain(logged) {
            let s = out.entry(sink.clone()).or_insert_with(|| SinkStats { sink, dead: 0, oldest_pending_ms: None });
            s.oldest_pending_ms = Some(s.oldest_pending_ms.map_or(at, |o| o.min(at)));
        }
        Ok(out.into_values().collect())
    }

    /// Deletes the log's segments that retention and every sink let go, and the cold rows retention lets
    /// go; the events deleted.
    pub(super) async fn prune(&self, before_ms: i64, limit: usize) -> Result<u64, StoreError> {
        let logged = self.spool.prune(before_ms).await.map_err(spool_error)?;
        let sqlite = self.sqlite.prune(before_ms, limit).await?;
        Ok(logged + sqlite)
    }

    /// Takes in what operators changed: SQLite's side (recounted if another connection wrote), then the
    /// replays and dead-letter retries they asked for, appended to the log as new events marked replay (for
    /// the one sink each names), after which their rows are marked done. A crash between the two appends
    /// them again at the next start: twice at worst, never lost.
    pub(super) async fn resync(&self) -> Result<(), StoreError> {
        self.sqlite.resync().await?;
        loop {
            let waiting = self.sqlite.read(|c| Ok(cold::pending_replays(c, REPLAYS_PER_TAKE)?)).await?;
            if waiting.is_empty() {
                return Ok(());
            }
            let from_log: Vec<i64> = waiting.iter().filter(|r| !r.3).map(|r| r.1).collect();
            let mut logged = self.spool.read(&from_log).await.map_err(spool_error)?.into_iter();
            let mut writes = Vec::with_capacity(waiting.len());
            for (id, seq, sink, dead_letter) in &waiting {
                // A dead letter's event is its copy; a replay's is in the log, or its copy if it moved.
                let event = match if *dead_letter { None } else { logged.next().flatten() } {
                    Some(e) => Some(e),
                    None => {
                        let seq = *seq;
                        self.sqlite.read(move |c| Ok(cold::copy(c, seq)?)).await?
                    }
                };
                let queued = match event {
                    Some(e) => match self.spool.replay(e, vec![sink.clone()]).await.map_err(spool_error)? {
                        Inserted::New { seq } | Inserted::Duplicate { seq, .. } => Some(seq),
                    },
                    None => {
                        tracing::warn!(replay = id, seq, sink = %sink, "a replayed event is no longer stored (pruned)");
                        None
                    }
                };
                writes.push(ColdWrite::Replayed { id: *id, queued });
            }
            self.sqlite.cold(writes).await?;
            if waiting.len() < REPLAYS_PER_TAKE {
                return Ok(());
            }
        }
    }

    /// Dead-letters every unfinished delivery of a sink not in `keep` (removed from the config: no dispatcher
    /// will take them, and in a log they would pin every segment from the first of them on), with the error
    /// `sink removed from the config`; an operator can retry them once the sink is back. Returns the count
    /// per sink.
    pub(super) async fn retire_sinks(&self, keep: &[String]) -> Result<Vec<(String, u64)>, StoreError> {
        let mut names: Vec<String> =
            self.spool.oldest().await.map_err(spool_error)?.into_iter().map(|(s, _)| s).collect();
        if let Ok(cold) = self.cold.lock() {
            names.extend(cold.deferred.iter().map(|(s, _)| s.clone()));
        }
        names.sort();
        names.dedup();
        let mut retired = Vec::new();
        for sink in names.into_iter().filter(|s| !keep.contains(s)) {
            let mut n = 0u64;
            loop {
                let rows = self.pending(&sink, 0, RETIRE_BATCH).await?;
                if rows.is_empty() {
                    break;
                }
                n += rows.len() as u64;
                let now = crate::event::now_ms();
                let records = rows
                    .iter()
                    .map(|r| Record {
                        delivery_id: r.id,
                        attempts: r.attempts,
                        outcome: Outcome::Dead(RETIRED.into()),
                        attempt: super::Attempt { started_at_ms: now, duration_ms: 0, status: None },
                        event: None,
                    })
                    .collect();
                self.record_all(&sink, records).await?;
            }
            tracing::warn!(%sink, deliveries = n, "sink removed from the config: its unfinished deliveries are dead letters now (hookbridge dlq retry, once it is back)");
            retired.push((sink, n));
        }
        Ok(retired)
    }

    /// Everything about one event (the segments read as `Operator` reads them).
    pub(super) async fn event(&self, id: &str) -> Result<Option<super::EventDetail>, StoreError> {
        let (dir, id) = (self.dir.clone(), id.to_owned());
        self.sqlite.read(move |c| operator::show(c, &dir, &id)).await
    }

    /// Readiness: a durable write to the log and one to SQLite.
    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        self.spool.ping().await.map_err(spool_error)?;
        self.sqlite.ping().await
    }

    /// Stops the log's thread and then the SQLite writer, after what is queued, and waits for both.
    pub(super) async fn close(&self) {
        self.spool.shutdown().await;
        let thread = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(thread) = thread {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        self.sqlite.close().await;
    }
}

pub(super) mod operator;
#[cfg(test)]
mod tests;
