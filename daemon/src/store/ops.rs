//! Every SQL statement of the spool, as functions over a connection or transaction. The daemon's writer
//! thread calls the write ones inside its group-commit transactions; the operator commands (CLI and admin
//! API) call the inspection and repair ones on their own connection. SQLite's locking makes the two safe
//! together; the daemon notices an operator's changes at its next poll.

use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::dedup::Known;
use super::{Handshake, Outcome, PendingDelivery, Record};
use crate::event::{Event, now_ms};
use crate::limits::HANDSHAKES_KEPT;

const EVENT_COLUMNS: &str =
    "e.seq, e.id, e.source, e.event_type, e.received_at, e.headers, e.body, e.dedup_key, e.ordering_key";

pub(super) fn event_from_row(r: &rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Event> {
    let headers: String = r.get(at + 5)?;
    Ok(Event {
        id: r.get(at + 1)?,
        source: r.get(at + 2)?,
        event_type: r.get(at + 3)?,
        received_at_ms: r.get(at + 4)?,
        headers: serde_json::from_str(&headers).unwrap_or_default(),
        body: Bytes::from(r.get::<_, Vec<u8>>(at + 6)?),
        dedup_key: r.get(at + 7)?,
        ordering_key: r.get(at + 8)?,
        body_is_json: false,
    })
}

/// The events received in `[since_ms, until_ms)`, newest first, for the dedup index.
pub(super) fn recent_keys(c: &Connection, since_ms: i64, until_ms: i64) -> rusqlite::Result<Vec<Known>> {
    let mut stmt = c.prepare_cached(
        "SELECT e.seq, e.dedup_hash, e.received_at, u.seq IS NOT NULL FROM events e
         LEFT JOIN uncertain_answers u ON u.seq = e.seq
         WHERE e.received_at >= ?1 AND e.received_at < ?2 ORDER BY e.seq DESC",
    )?;
    let rows = stmt.query_map(params![since_ms, until_ms], |r| {
        Ok(Known { seq: r.get(0)?, hash: r.get(1)?, received_at_ms: r.get(2)?, uncertain: r.get(3)? })
    })?;
    rows.collect()
}

/// The id of the first of the events `seqs` (dedup candidates) that really has this dedup key and source.
pub(super) fn find_duplicate(
    tx: &Connection,
    seqs: &[i64],
    dedup_key: &str,
    source: &str,
) -> rusqlite::Result<Option<(i64, String)>> {
    let mut stmt = tx.prepare_cached("SELECT id FROM events WHERE seq = ?1 AND dedup_key = ?2 AND source = ?3")?;
    for seq in seqs {
        if let Some(id) = stmt.query_row(params![seq, dedup_key, source], |r| r.get(0)).optional()? {
            return Ok(Some((*seq, id)));
        }
    }
    Ok(None)
}

/// Remembers (`uncertain`) or forgets that the provider may not have seen the answer to event `seq`.
pub(super) fn set_uncertain(c: &Connection, seq: i64, uncertain: bool) -> rusqlite::Result<()> {
    if uncertain {
        c.prepare_cached("INSERT OR IGNORE INTO uncertain_answers (seq) VALUES (?1)")?.execute([seq])?;
    } else {
        c.prepare_cached("DELETE FROM uncertain_answers WHERE seq = ?1")?.execute([seq])?;
    }
    Ok(())
}

/// Inserts an event (with `hash`, its dedup key's [`dedup_hash`]) and one pending delivery per sink. Returns
/// the event's seq and the new deliveries' ids with their sinks.
pub(super) fn insert(
    tx: &Connection,
    e: &Event,
    hash: i64,
    sinks: &[String],
) -> rusqlite::Result<(i64, Vec<(i64, String)>)> {
    let headers = serde_json::to_string(&e.headers).unwrap_or_else(|_| "[]".into());
    tx.prepare_cached(
        "INSERT INTO events (id, source, event_type, received_at, headers, body, dedup_key, dedup_hash, ordering_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        e.id,
        e.source,
        e.event_type,
        e.received_at_ms,
        headers,
        &e.body[..],
        e.dedup_key,
        hash,
        e.ordering_key
    ])?;
    let seq = tx.last_insert_rowid();
    let mut ids = Vec::with_capacity(sinks.len());
    let mut stmt = tx.prepare_cached(
        "INSERT INTO deliveries (event_seq, sink, status, created_at, updated_at) VALUES (?1, ?2, 'pending', ?3, ?3)",
    )?;
    for sink in sinks {
        stmt.execute(params![seq, sink, e.received_at_ms])?;
        ids.push((tx.last_insert_rowid(), sink.clone()));
    }
    Ok((seq, ids))
}

/// The first 8 bytes of SHA-256(key), as the integer the dedup index holds.
pub(super) fn dedup_hash(key: &str) -> i64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    i64::from_be_bytes(b)
}

/// What finishing a delivery did to the pending counts: (deliveries, events, bytes) no longer pending.
pub(super) type Finished = (i64, i64, i64);

/// Records one attempt and the delivery's new state. A delivery that is no longer pending (recorded twice,
/// or purged meanwhile) is left alone.
pub(super) fn record(tx: &Connection, r: &Record) -> rusqlite::Result<Finished> {
    let Record { delivery_id, attempts, outcome, attempt, event } = r;
    let now = now_ms();
    let (status, next, error, label) = match outcome {
        Outcome::Delivered => ("delivered", None, None, "delivered"),
        Outcome::Dead(e) => ("dead", None, Some(e.as_str()), "dead"),
        Outcome::Retry { next_attempt_ms, error } => ("pending", Some(*next_attempt_ms), Some(error.as_str()), "retry"),
    };
    // The event's seq comes from the caller when it knows it, else from a read by rowid (cheaper than
    // `UPDATE ... RETURNING`, which builds a temporary table).
    let event_seq = match event {
        Some((seq, _)) => *seq,
        None => {
            let seq: Option<i64> = tx
                .prepare_cached("SELECT event_seq FROM deliveries WHERE id = ?1 AND status = 'pending'")?
                .query_row([delivery_id], |r| r.get(0))
                .optional()?;
            let Some(seq) = seq else { return Ok((0, 0, 0)) };
            seq
        }
    };
    let changed = tx
        .prepare_cached(
            "UPDATE deliveries SET status = ?1, attempts = ?2, next_attempt_at = ?3,
               last_error = coalesce(?4, last_error), last_status = coalesce(?5, last_status), updated_at = ?6
             WHERE id = ?7 AND status = 'pending'",
        )?
        .execute(params![status, attempts, next, error, attempt.status, now, delivery_id])?;
    if changed == 0 {
        return Ok((0, 0, 0));
    }
    tx.prepare_cached(
        "INSERT INTO attempts (delivery_id, attempt, started_at, duration_ms, outcome, status, error)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )?
    .execute(params![
        delivery_id,
        attempts,
        attempt.started_at_ms,
        attempt.duration_ms,
        label,
        attempt.status,
        error
    ])?;
    if status != "pending" {
        return finish(tx, event_seq, event.map(|(_, len)| len));
    }
    Ok((0, 0, 0))
}

/// One delivery of event `seq` (whose body is `len` bytes, when known) left the pending state: was it the
/// event's last pending one?
fn finish(tx: &Connection, seq: i64, len: Option<i64>) -> rusqlite::Result<Finished> {
    let still: i64 = tx
        .prepare_cached("SELECT count(*) FROM deliveries WHERE event_seq = ?1 AND status = 'pending'")?
        .query_row([seq], |r| r.get(0))?;
    if still > 0 {
        return Ok((1, 0, 0));
    }
    let len = match len {
        Some(len) => len,
        None => tx
            .prepare_cached("SELECT length(body) FROM events WHERE seq = ?1")?
            .query_row([seq], |r| r.get::<_, Option<i64>>(0))
            .optional()?
            .flatten()
            .unwrap_or(0),
    };
    Ok((1, 1, len))
}

/// Stores (replaces) an add-on installation record.
pub(super) fn save_installation(
    tx: &Connection,
    source: &str,
    workspace: &str,
    addon_id: &str,
    record: &str,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO installations (source, workspace_id, addon_id, record, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (source, workspace_id, addon_id) DO UPDATE
         SET record = excluded.record, updated_at = excluded.updated_at",
        params![source, workspace, addon_id, record, now_ms()],
    )?;
    Ok(())
}

/// A small write that proves the spool writable (readiness).
pub(super) fn heartbeat(tx: &Connection) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (k, v) VALUES ('heartbeat', ?1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        [now_ms().to_string()],
    )?;
    Ok(())
}

pub(super) fn handshake(tx: &Connection, source: &str, secret: &str, at: i64) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO handshakes (source, secret, received_at) VALUES (?1, ?2, ?3)",
        params![source, secret, at],
    )?;
    tx.execute(
        "DELETE FROM handshakes WHERE source = ?1 AND id NOT IN
           (SELECT id FROM handshakes WHERE source = ?1 ORDER BY id DESC LIMIT ?2)",
        params![source, HANDSHAKES_KEPT],
    )?;
    Ok(())
}

/// Deletes events received before `before_ms` none of whose deliveries is pending or dead (dead letters are
/// kept until an operator retries or purges them), with their deliveries and attempt log. Returns the number
/// of events deleted.
pub(super) fn prune(tx: &Connection, before_ms: i64, limit: usize) -> rusqlite::Result<u64> {
    // The oldest prunable events, at most `limit`, so that one prune never holds the writer for long.
    tx.execute("DROP TABLE IF EXISTS temp.prunable", [])?;
    tx.execute(
        "CREATE TEMP TABLE prunable AS SELECT seq FROM events
         WHERE received_at < ?1
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = events.seq AND d.status IN ('pending', 'dead'))
         ORDER BY seq LIMIT ?2",
        params![before_ms, limit as i64],
    )?;
    tx.execute(
        "DELETE FROM attempts WHERE delivery_id IN
           (SELECT d.id FROM deliveries d WHERE d.event_seq IN (SELECT seq FROM temp.prunable))",
        [],
    )?;
    tx.execute("DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM temp.prunable)", [])?;
    tx.execute("DELETE FROM uncertain_answers WHERE seq IN (SELECT seq FROM temp.prunable)", [])?;
    let n = tx.execute("DELETE FROM events WHERE seq IN (SELECT seq FROM temp.prunable)", [])?;
    tx.execute("DROP TABLE temp.prunable", [])?;
    tx.execute("DELETE FROM handshakes WHERE received_at < ?1", [before_ms])?;
    Ok(n as u64)
}

/// Pending deliveries for `sink` with id greater than `after`, in id order, at most `limit`; with
/// `replays_up_to`, only replays (and dead-letter retries) with ids up to it.
pub(super) fn pending(
    conn: &Connection,
    sink: &str,
    after: i64,
    limit: usize,
    replays_up_to: Option<i64>,
) -> rusqlite::Result<Vec<PendingDelivery>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT d.id, d.attempts, d.replay, {EVENT_COLUMNS}, d.created_at, d.next_attempt_at
         FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.sink = ?1 AND d.status = 'pending' AND d.id > ?2 AND (?4 IS NULL OR (d.replay = 1 AND d.id <= ?4))
         ORDER BY d.id LIMIT ?3"
    ))?;
    let rows = stmt.query_map(params![sink, after, limit as i64, replays_up_to], |r| {
        Ok(PendingDelivery {
            id: r.get(0)?,
            attempts: r.get(1)?,
            replay: r.get::<_, i64>(2)? != 0,
            seq: r.get(3)?,
            event: std::sync::Arc::new(event_from_row(r, 3)?),
            created_at_ms: r.get(12)?,
            next_attempt_ms: r.get(13)?,
        })
    })?;
    rows.collect()
}

/// Per sink: dead letters, and the receive time of the oldest pending delivery.
pub(super) fn sink_stats(conn: &Connection) -> rusqlite::Result<Vec<(String, i64, Option<i64>)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT sink,
                sum(status = 'dead'),
                min(CASE WHEN status = 'pending' THEN (SELECT received_at FROM events WHERE seq = event_seq) END)
         FROM deliveries WHERE status IN ('pending', 'dead') GROUP BY sink",
    )?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// Add-on installation records: (source, workspace, add-on id, JSON record).
pub(super) fn installations(conn: &Connection) -> rusqlite::Result<Vec<(String, String, String, String)>> {
    let mut stmt =
        conn.prepare("SELECT source, workspace_id, addon_id, record FROM installations ORDER BY source, workspace_id")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?;
    rows.collect()
}

pub(super) fn list_handshakes(conn: &Connection) -> rusqlite::Result<Vec<Handshake>> {
    let mut stmt =
        conn.prepare("SELECT source, secret, received_at FROM handshakes ORDER BY received_at DESC, id DESC")?;
    let rows =
        stmt.query_map([], |r| Ok(Handshake { source: r.get(0)?, secret: r.get(1)?, received_at_ms: r.get(2)? }))?;
    rows.collect()
}

// ---- Operator inspection and repair -------------------------------------------------------------------

/// An event in a listing.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EventSummary {
    /// Event id.
    pub id: String,
    /// Source id.
    pub source: String,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Receive time, ms since the epoch.
    pub received_at_ms: i64,
    /// `pending`, `dead`, `delivered`, `purged` or `unrouted`.
    pub status: String,
}

/// One delivery of an event.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// Delivery id (what `dlq retry` takes).
    pub id: i64,
    /// Sink id.
    pub sink: String,
    /// `pending`, `delivered`, `dead`, `retried` or `purged`.
    pub status: String,
    /// Attempts made.
    pub attempts: u32,
    /// Last error.
    pub last_error: Option<String>,
    /// Last HTTP status, if the sink speaks HTTP.
    pub last_status: Option<u16>,
    /// Made by a replay or a dead-letter retry.
    pub replay: bool,
    /// Created, ms since the epoch.
    pub created_at_ms: i64,
    /// Last changed, ms since the epoch.
    pub updated_at_ms: i64,
}

/// One attempt.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct AttemptInfo {
    /// Delivery id.
    pub delivery_id: i64,
    /// Sink id.
    pub sink: String,
    /// 1 for the first attempt of that delivery.
    pub attempt: u32,
    /// Start, ms since the epoch.
    pub started_at_ms: i64,
    /// Duration.
    pub duration_ms: i64,
    /// `delivered`, `retry` or `dead`.
    pub outcome: String,
    /// HTTP status, if any.
    pub status: Option<u16>,
    /// Error, if any.
    pub error: Option<String>,
}

/// Everything about one event.
#[derive(Debug, Clone, Serialize)]
pub struct EventDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: EventSummary,
    /// Headers kept.
    pub headers: Vec<(String, String)>,
    /// The body (UTF-8; bodies are JSON).
    pub body: String,
    /// Deliveries, oldest first.
    pub deliveries: Vec<DeliveryInfo>,
    /// Attempts, oldest first.
    pub attempts: Vec<AttemptInfo>,
}

/// A dead letter.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeadLetter {
    /// Delivery id (what `dlq retry` and `dlq purge` take).
    pub delivery_id: i64,
    /// Event id.
    pub event_id: String,
    /// Source id.
    pub source: String,
    /// Event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Sink id.
    pub sink: String,
    /// Attempts made.
    pub attempts: u32,
    /// The error that made it dead.
    pub last_error: Option<String>,
    /// Last HTTP status, if any.
    pub last_status: Option<u16>,
    /// Event receive time.
    pub received_at_ms: i64,
    /// When it died.
    pub dead_at_ms: i64,
}

/// Filters for [`list_events`].
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    /// Only this source.
    pub source: Option<String>,
    /// Only this event type.
    pub event_type: Option<String>,
    /// Only this status (`pending`, `dead`, `delivered`, `unrouted`).
    pub status: Option<String>,
    /// Received at or after (ms).
    pub since_ms: Option<i64>,
    /// Received before (ms).
    pub until_ms: Option<i64>,
    /// At most this many (newest first).
    pub limit: usize,
}

const STATUS_SQL: &str = "CASE
    WHEN NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq) THEN 'unrouted'
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.status = 'pending') THEN 'pending'
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.status = 'dead') THEN 'dead'
    WHEN EXISTS (SELECT 1 FROM deliveries d WHERE d.event_seq = e.seq AND d.status = 'purged') THEN 'purged'
    ELSE 'delivered' END";

/// Events matching `f`, newest first.
pub fn list_events(conn: &Connection, f: &EventFilter) -> rusqlite::Result<Vec<EventSummary>> {
    let sql = format!(
        "SELECT * FROM (SELECT e.id, e.source, e.event_type, e.received_at, {STATUS_SQL} AS status, e.seq FROM events e
           WHERE (?1 IS NULL OR e.source = ?1) AND (?2 IS NULL OR e.event_type = ?2)
             AND (?3 IS NULL OR e.received_at >= ?3) AND (?4 IS NULL OR e.received_at < ?4))
         WHERE (?5 IS NULL OR status = ?5) ORDER BY seq DESC LIMIT ?6"
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map(
        params![f.source, f.event_type, f.since_ms, f.until_ms, f.status, f.limit.max(1) as i64],
        |r| {
            Ok(EventSummary {
                id: r.get(0)?,
                source: r.get(1)?,
                event_type: r.get(2)?,
                received_at_ms: r.get(3)?,
                status: r.get(4)?,
            })
        },
    )?;
    rows.collect()
}

/// One event with its deliveries and attempts.
pub fn show_event(conn: &Connection, id: &str) -> rusqlite::Result<Option<EventDetail>> {
    let found = conn
        .query_row(&format!("SELECT {EVENT_COLUMNS}, {STATUS_SQL} FROM events e WHERE e.id = ?1"), [id], |r| {
            Ok((r.get::<_, i64>(0)?, event_from_row(r, 0)?, r.get::<_, String>(9)?))
        })
        .optional()?;
    let Some((seq, event, status)) = found else { return Ok(None) };
    let mut stmt = conn.prepare(
        "SELECT id, sink, status, attempts, last_error, last_status, replay, created_at, updated_at
         FROM deliveries WHERE event_seq = ?1 ORDER BY id",
    )?;
    let deliveries = stmt
        .query_map([seq], |r| {
            Ok(DeliveryInfo {
                id: r.get(0)?,
                sink: r.get(1)?,
                status: r.get(2)?,
                attempts: r.get(3)?,
                last_error: r.get(4)?,
                last_status: r.get(5)?,
                replay: r.get::<_, i64>(6)? != 0,
                created_at_ms: r.get(7)?,
                updated_at_ms: r.get(8)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let mut stmt = conn.prepare(
        "SELECT a.delivery_id, d.sink, a.attempt, a.started_at, a.duration_ms, a.outcome, a.status, a.error
         FROM attempts a JOIN deliveries d ON d.id = a.delivery_id WHERE d.event_seq = ?1 ORDER BY a.id",
    )?;
    let attempts = stmt.query_map([seq], attempt_from_row)?.collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(Some(EventDetail {
        summary: EventSummary {
            id: event.id.clone(),
            source: event.source.clone(),
            event_type: event.event_type.clone(),
            received_at_ms: event.received_at_ms,
            status,
        },
        headers: event.headers.clone(),
        body: String::from_utf8_lossy(&event.body).into_owned(),
        deliveries,
        attempts,
    }))
}

/// Event seqs to replay: one event by id, or every event received in `[since, until)`.
pub fn replay_targets(conn: &Connection, id: Option<&str>, since_ms: i64, until_ms: i64) -> rusqlite::Result<Vec<i64>> {
    if let Some(id) = id {
        return conn
            .query_row("SELECT seq FROM events WHERE id = ?1", [id], |r| r.get(0))
            .optional()
            .map(|s| s.into_iter().collect());
    }
    let mut stmt = conn.prepare("SELECT seq FROM events WHERE received_at >= ?1 AND received_at < ?2 ORDER BY seq")?;
    let rows = stmt.query_map(params![since_ms, until_ms], |r| r.get(0))?;
    rows.collect()
}

/// Adds a new pending delivery (marked `replay`) of event `seq` to `sink`, or to every sink it was routed
/// to when `sink` is `None`. Returns how many deliveries were added.
pub fn replay(tx: &Connection, seq: i64, sink: Option<&str>) -> rusqlite::Result<usize> {
    let sinks: Vec<String> = match sink {
        Some(s) => vec![s.to_owned()],
        None => {
            let mut stmt =
                tx.prepare_cached("SELECT DISTINCT sink FROM deliveries WHERE event_seq = ?1 ORDER BY sink")?;
            let rows = stmt.query_map([seq], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<Vec<_>>>()?
        }
    };
    let now = now_ms();
    for s in &sinks {
        tx.prepare_cached(
            "INSERT INTO deliveries (event_seq, sink, status, replay, created_at, updated_at)
             SELECT ?1, ?2, 'pending', 1, ?3, ?3 WHERE EXISTS (SELECT 1 FROM events WHERE seq = ?1)",
        )?
        .execute(params![seq, s, now])?;
    }
    Ok(sinks.len())
}

/// Dead letters, oldest first, optionally for one sink.
pub fn dead_letters(conn: &Connection, sink: Option<&str>) -> rusqlite::Result<Vec<DeadLetter>> {
    let mut stmt = conn.prepare(
        "SELECT d.id, e.id, e.source, e.event_type, d.sink, d.attempts, d.last_error, d.last_status, e.received_at, d.updated_at
         FROM deliveries d JOIN events e ON e.seq = d.event_seq
         WHERE d.status = 'dead' AND (?1 IS NULL OR d.sink = ?1) ORDER BY d.id",
    )?;
    let rows = stmt.query_map([sink], dead_letter_from_row)?;
    rows.collect()
}

/// A [`DeadLetter`] from a row of (id, event id, source, type, sink, attempts, last error, last status,
/// received, dead at).
pub(super) fn dead_letter_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeadLetter> {
    Ok(DeadLetter {
        delivery_id: r.get(0)?,
        event_id: r.get(1)?,
        source: r.get(2)?,
        event_type: r.get(3)?,
        sink: r.get(4)?,
        attempts: r.get(5)?,
        last_error: r.get(6)?,
        last_status: r.get(7)?,
        received_at_ms: r.get(8)?,
        dead_at_ms: r.get(9)?,
    })
}

/// An [`AttemptInfo`] from a row of (delivery id, sink, attempt, started, duration, outcome, status, error).
pub(super) fn attempt_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AttemptInfo> {
    Ok(AttemptInfo {
        delivery_id: r.get(0)?,
        sink: r.get(1)?,
        attempt: r.get(2)?,
        started_at_ms: r.get(3)?,
        duration_ms: r.get(4)?,
        outcome: r.get(5)?,
        status: r.get(6)?,
        error: r.get(7)?,
    })
}

/// Retries a dead letter: it becomes `retried` and a new pending delivery (marked `replay`) takes its place.
/// Returns false when `delivery_id` is not a dead letter.
pub fn retry_dead(tx: &Connection, delivery_id: i64) -> rusqlite::Result<bool> {
    let row: Option<(i64, String)> = tx
        .query_row("SELECT event_seq, sink FROM deliveries WHERE id = ?1 AND status = 'dead'", [delivery_id], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    let Some((seq, sink)) = row else { return Ok(false) };
    tx.execute(
        "UPDATE deliveries SET status = 'retried', updated_at = ?1 WHERE id = ?2",
        params![now_ms(), delivery_id],
    )?;
    replay(tx, seq, Some(&sink))?;
    Ok(true)
}

/// Gives up a dead letter for good: it becomes `purged`, and the event is pruned with the rest once past
/// retention. Returns false when `delivery_id` is not a dead letter.
pub fn purge_dead(tx: &Connection, delivery_id: i64) -> rusqlite::Result<bool> {
    let n = tx.execute(
        "UPDATE deliveries SET status = 'purged', updated_at = ?1 WHERE id = ?2 AND status = 'dead'",
        params![now_ms(), delivery_id],
    )?;
    Ok(n == 1)
}
