//! The log engine's cold path in SQLite (`schema.rs` has the tables): what leaves the log because it did
//! not go well. A delivery's first failure moves it here (`deferred`, with a copy of its event in
//! `event_copies`, so that a delivery retried for days never pins the log's segments), and so does a dead
//! letter. Healthy deliveries never touch SQLite. Every write runs in the SQLite writer's group commit and
//! is answered only once it is synced: the log's checkpoint that drops the delivery is written after it, so
//! SQLite is the authority for what moved, whatever crashes.

use std::sync::Arc;

use rusqlite::{Connection, params};

use super::{Outcome, PendingDelivery, Record};
use crate::event::{Event, now_ms};

/// One write to the cold tables.
#[derive(Debug, Clone)]
pub(super) enum ColdWrite {
    /// A delivery of the log leaves it after an attempt that did not deliver (`record`'s outcome is a
    /// retry or a dead letter): its event is copied.
    Move {
        /// The sink.
        sink: String,
        /// The event (its seq is the delivery's id).
        event: Arc<Event>,
        /// The delivery is a replay's (it stays one).
        replay: bool,
        /// The attempt and its outcome.
        record: Record,
    },
    /// Another attempt of a delivery already here.
    Update {
        /// The sink.
        sink: String,
        /// The attempt and its outcome.
        record: Record,
    },
    /// A replay was appended to the log as event `queued` (`None`: its event is gone).
    Replayed {
        /// The `replays` row.
        id: i64,
        /// The new event's seq.
        queued: Option<i64>,
    },
}

/// A deferred delivery, as the dispatchers' bookkeeping holds it: (sink, seq, body bytes).
pub(super) type DeferredKey = (String, i64, u32);

fn outcome_parts(outcome: &Outcome) -> (&'static str, Option<i64>, Option<&str>) {
    match outcome {
        Outcome::Delivered => ("delivered", None, None),
        Outcome::Dead(e) => ("dead", None, Some(e.as_str())),
        Outcome::Retry { next_attempt_ms, error } => ("retry", Some(*next_attempt_ms), Some(error.as_str())),
    }
}

fn attempt_row(tx: &Connection, sink: &str, r: &Record) -> rusqlite::Result<()> {
    let (label, _, error) = outcome_parts(&r.outcome);
    tx.prepare_cached(
        "INSERT INTO failed_attempts (sink, seq, attempt, started_at, duration_ms, outcome, status, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        sink,
        r.delivery_id,
        r.attempts,
        r.attempt.started_at_ms,
        r.attempt.duration_ms,
        label,
        r.attempt.status,
        error
    ])?;
    Ok(())
}

fn dead_letter(tx: &Connection, sink: &str, r: &Record, error: &str) -> rusqlite::Result<()> {
    let now = now_ms();
    // Once per delivery: a move recorded again (its answer lost to a failure after the commit) adds none.
    tx.prepare_cached(
        "INSERT INTO dead_letters (sink, seq, status, attempts, last_error, last_status, dead_at, updated_at)
         SELECT ?1, ?2, 'dead', ?3, ?4, ?5, ?6, ?6
         WHERE NOT EXISTS (SELECT 1 FROM dead_letters WHERE sink = ?1 AND seq = ?2 AND status = 'dead')",
    )?
    .execute(params![sink, r.delivery_id, r.attempts, error, r.attempt.status, now])?;
    Ok(())
}

/// Applies one write. Returns whether it changed anything (an update of a delivery no longer deferred,
/// recorded twice, does not).
pub(super) fn apply(tx: &Connection, w: &ColdWrite) -> rusqlite::Result<bool> {
    let now = now_ms();
    match w {
        ColdWrite::Move { sink, event, replay, record } => {
            let headers = serde_json::to_string(&event.headers).unwrap_or_else(|_| "[]".into());
            tx.prepare_cached(
                "INSERT OR IGNORE INTO event_copies
                   (seq, id, source, event_type, received_at, headers, body, dedup_key, ordering_key)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            )?
            .execute(params![
                record.delivery_id,
                event.id,
                event.source,
                event.event_type,
                event.received_at_ms,
                headers,
                &event.body[..],
                event.dedup_key,
                event.ordering_key
            ])?;
            match &record.outcome {
                Outcome::Retry { next_attempt_ms, error } => {
                    tx.prepare_cached(
                        "INSERT OR REPLACE INTO deferred
                           (sink, seq, attempts, next_attempt_at, last_error, last_status, replay, created_at,
                            updated_at)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    )?
                    .execute(params![
                        sink,
                        record.delivery_id,
                        record.attempts,
                        next_attempt_ms,
                        error,
                        record.attempt.status,
                        replay,
                        event.received_at_ms,
                        now
                    ])?;
                }
                Outcome::Dead(error) => dead_letter(tx, sink, record, error)?,
                // Nothing to move: a delivered delivery is finished in the log alone.
                Outcome::Delivered => return Ok(false),
            }
            attempt_row(tx, sink, record)?;
            Ok(true)
        }
        ColdWrite::Replayed { id, queued } => {
            let status = if queued.is_some() { "queued" } else { "missing" };
            let n = tx
                .prepare_cached("UPDATE replays SET status = ?2, queued_seq = ?3, updated_at = ?4 WHERE id = ?1")?
                .execute(params![id, status, queued, now])?;
            Ok(n > 0)
        }
        ColdWrite::Update { sink, record } => {
            let changed = match &record.outcome {
                Outcome::Delivered => tx
                    .prepare_cached("DELETE FROM deferred WHERE sink = ?1 AND seq = ?2")?
                    .execute(params![sink, record.delivery_id])?,
                Outcome::Retry { next_attempt_ms, error } => tx
                    .prepare_cached(
                        "UPDATE deferred SET attempts = ?3, next_attempt_at = ?4, last_error = ?5,
                           last_status = coalesce(?6, last_status), updated_at = ?7
                         WHERE sink = ?1 AND seq = ?2",
                    )?
                    .execute(params![
                        sink,
                        record.delivery_id,
                        record.attempts,
                        next_attempt_ms,
                        error,
                        record.attempt.status,
                        now
                    ])?,
                Outcome::Dead(error) => {
                    let n = tx
                        .prepare_cached("DELETE FROM deferred WHERE sink = ?1 AND seq = ?2")?
                        .execute(params![sink, record.delivery_id])?;
                    if n > 0 {
                        dead_letter(tx, sink, record, error)?;
                    }
                    n
                }
            };
            if changed > 0 {
                attempt_row(tx, sink, record)?;
            }
            Ok(changed > 0)
        }
    }
}

/// `sink`'s deferred deliveries with seq above `after`, in seq order, at most `limit`.
pub(super) fn deferred(
    conn: &Connection,
    sink: &str,
    after: i64,
    limit: usize,
) -> rusqlite::Result<Vec<PendingDelivery>> {
    let mut stmt = conn.prepare_cached(
        "SELECT d.seq, d.attempts, e.seq, e.id, e.source, e.event_type, e.received_at, e.headers, e.body,
                e.dedup_key, e.ordering_key, d.created_at, d.next_attempt_at, d.replay
         FROM deferred d JOIN event_copies e ON e.seq = d.seq
         WHERE d.sink = ?1 AND d.seq > ?2 ORDER BY d.seq LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![sink, after, limit as i64], |r| {
        Ok(PendingDelivery {
            id: r.get(0)?,
            seq: r.get(0)?,
            attempts: r.get(1)?,
            replay: r.get(13)?,
            event: Arc::new(super::ops::event_from_row(r, 2)?),
            created_at_ms: r.get(11)?,
            next_attempt_ms: r.get(12)?,
        })
    })?;
    rows.collect()
}

/// Every deferred delivery: (sink, seq, body bytes).
pub(super) fn all_deferred(conn: &Connection) -> rusqlite::Result<Vec<DeferredKey>> {
    let mut stmt = conn.prepare(
        "SELECT d.sink, d.seq, length(e.body) FROM deferred d JOIN event_copies e ON e.seq = d.seq ORDER BY d.seq",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u32)))?;
    rows.collect()
}

/// The (sink, seq) of every dead letter with seq at or above `from` (those the log may not have been told
/// about yet: their move committed, and the crash came before the log's checkpoint).
pub(super) fn dead_since(conn: &Connection, from: i64) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare("SELECT sink, seq FROM dead_letters WHERE seq >= ?1")?;
    let rows = stmt.query_map([from], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Dead letters per sink.
pub(super) fn dead_counts(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt =
        conn.prepare_cached("SELECT sink, count(*) FROM dead_letters WHERE status = 'dead' GROUP BY sink")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// The oldest deferred delivery's event receive time per sink.
pub(super) fn oldest_deferred(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut stmt = conn.prepare_cached("SELECT sink, min(created_at) FROM deferred GROUP BY sink")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Deletes what retention lets go: dead letters given up or retried before `before_ms`, copies of events
/// received before it that no deferred delivery, dead letter or waiting replay needs, the attempts of those
/// events, and replays done before it.
pub(super) fn prune(tx: &Connection, before_ms: i64) -> rusqlite::Result<()> {
    tx.execute("DELETE FROM dead_letters WHERE status <> 'dead' AND updated_at < ?1", [before_ms])?;
    tx.execute(
        "DELETE FROM event_copies WHERE received_at < ?1
           AND NOT EXISTS (SELECT 1 FROM deferred d WHERE d.seq = event_copies.seq)
           AND NOT EXISTS (SELECT 1 FROM dead_letters l WHERE l.seq = event_copies.seq)
           AND NOT EXISTS (SELECT 1 FROM replays r WHERE r.seq = event_copies.seq AND r.status = 'pending')",
        [before_ms],
    )?;
    tx.execute("DELETE FROM replays WHERE status <> 'pending' AND updated_at < ?1", [before_ms])?;
    tx.execute(
        "DELETE FROM failed_attempts WHERE started_at < ?1
           AND NOT EXISTS (SELECT 1 FROM event_copies e WHERE e.seq = failed_attempts.seq)",
        [before_ms],
    )?;
    Ok(())
}

/// A replay waiting to be appended to the log: (row id, the event's seq, sink, from a dead letter).
pub(super) type Replay = (i64, i64, String, bool);

/// The replays waiting, oldest first, at most `limit`.
pub(super) fn pending_replays(conn: &Connection, limit: usize) -> rusqlite::Result<Vec<Replay>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, seq, sink, origin = 'dlq' FROM replays WHERE status = 'pending' ORDER BY id LIMIT ?1",
    )?;
    let rows = stmt.query_map([limit as i64], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    rows.collect()
}

/// The copy of event `seq`, if one is kept.
pub(super) fn copy(conn: &Connection, seq: i64) -> rusqlite::Result<Option<Event>> {
    use rusqlite::OptionalExtension;
    conn.prepare_cached(
        "SELECT e.seq, e.id, e.source, e.event_type, e.received_at, e.headers, e.body, e.dedup_key, e.ordering_key
         FROM event_copies e WHERE e.seq = ?1",
    )?
    .query_row([seq], |r| super::ops::event_from_row(r, 0))
    .optional()
}

/// Dead letters (status `dead`), oldest first, of one sink or all.
pub(super) fn dead_letters(conn: &Connection, sink: Option<&str>) -> rusqlite::Result<Vec<super::DeadLetter>> {
    let mut stmt = conn.prepare(
        "SELECT l.id, e.id, e.source, e.event_type, l.sink, l.attempts, l.last_error, l.last_status, e.received_at,
                l.dead_at
         FROM dead_letters l JOIN event_copies e ON e.seq = l.seq
         WHERE l.status = 'dead' AND (?1 IS NULL OR l.sink = ?1) ORDER BY l.id",
    )?;
    let rows = stmt.query_map([sink], super::ops::dead_letter_from_row)?;
    rows.collect()
}

/// Retries a dead letter: it becomes `retried`, and a `replays` row asks the daemon to append its event to
/// the log again for its sink. False when `id` is not a dead letter.
pub(super) fn retry_dead(tx: &Connection, id: i64) -> rusqlite::Result<bool> {
    let now = now_ms();
    let n = tx.execute(
        "INSERT INTO replays (seq, sink, origin, dead_letter_id, status, created_at, updated_at)
         SELECT seq, sink, 'dlq', id, 'pending', ?2, ?2 FROM dead_letters WHERE id = ?1 AND status = 'dead'",
        params![id, now],
    )?;
    if n == 0 {
        return Ok(false);
    }
    tx.execute("UPDATE dead_letters SET status = 'retried', updated_at = ?2 WHERE id = ?1", params![id, now])?;
    Ok(true)
}

/// Gives a dead letter up: it becomes `purged` (its copy goes with retention). False when `id` is not one.
pub(super) fn purge_dead(tx: &Connection, id: i64) -> rusqlite::Result<bool> {
    let n = tx.execute(
        "UPDATE dead_letters SET status = 'purged', updated_at = ?2 WHERE id = ?1 AND status = 'dead'",
        params![id, now_ms()],
    )?;
    Ok(n == 1)
}

/// What [`migrate_from_sqlite`] moved: (deferred deliveries, replays, dead letters), and the log seq the new
/// log starts at.
pub(super) type Migrated = (u64, u64, u64, u64);

/// Takes a SQLite-engine spool over for the log engine, in the caller's transaction (all of it or nothing):
/// every pending delivery becomes a `deferred` row (attempts and due time kept; a pending replay a `replays`
/// row, as the same (sink, event) may be pending twice), every dead letter a `dead_letters` row, each with a
/// copy of its event and its attempts; those delivery rows are deleted (the rest, finished, go with
/// retention). The log then starts above every seq the SQLite engine gave, so that a sink's deferred
/// deliveries and its logged ones never share an id, and the deferred ones, older, go first.
pub(super) fn migrate_from_sqlite(tx: &Connection) -> rusqlite::Result<Migrated> {
    const MOVING: &str = "SELECT id FROM deliveries WHERE status IN ('pending', 'dead')";
    tx.execute_batch(&format!(
        "INSERT OR IGNORE INTO event_copies (seq, id, source, event_type, received_at, headers, body, dedup_key, ordering_key)
           SELECT seq, id, source, event_type, received_at, headers, body, dedup_key, ordering_key FROM events
           WHERE seq IN (SELECT event_seq FROM deliveries WHERE status IN ('pending', 'dead'));
         INSERT INTO failed_attempts (sink, seq, attempt, started_at, duration_ms, outcome, status, error)
           SELECT d.sink, d.event_seq, a.attempt, a.started_at, a.duration_ms, a.outcome, a.status, a.error
           FROM attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE a.delivery_id IN ({MOVING}) ORDER BY a.id;"
    ))?;
    let deferred = tx.execute(
        "INSERT OR IGNORE INTO deferred (sink, seq, attempts, next_attempt_at, last_error, last_status, created_at, updated_at)
           SELECT sink, event_seq, attempts, next_attempt_at, last_error, last_status, created_at, updated_at
           FROM deliveries WHERE status = 'pending' AND replay = 0 ORDER BY id",
        [],
    )?;
    let replays = tx.execute(
        "INSERT INTO replays (seq, sink, origin, status, created_at, updated_at)
           SELECT event_seq, sink, 'replay', 'pending', created_at, updated_at
           FROM deliveries WHERE status = 'pending' AND replay = 1 ORDER BY id",
        [],
    )?;
    let dead = tx.execute(
        "INSERT INTO dead_letters (sink, seq, status, attempts, last_error, last_status, dead_at, updated_at)
           SELECT sink, event_seq, 'dead', attempts, last_error, last_status, updated_at, updated_at
           FROM deliveries WHERE status = 'dead' ORDER BY id",
        [],
    )?;
    tx.execute_batch(&format!(
        "DELETE FROM attempts WHERE delivery_id IN ({MOVING});
         DELETE FROM deliveries WHERE status IN ('pending', 'dead');"
    ))?;
    // The highest seq given (AUTOINCREMENT never reuses one, even of a pruned event): the log's first
    // public seq is the next.
    let top: i64 = tx.query_row(
        "SELECT max(coalesce((SELECT max(seq) FROM events), 0), coalesce((SELECT max(seq) FROM event_copies), 0),
                    coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0))",
        [],
        |r| r.get(0),
    )?;
    Ok((deferred as u64, replays as u64, dead as u64, top.max(0) as u64))
}
