//! The spool's schema and connection settings.

use rusqlite::Connection;

use super::{SpoolGauges, StoreError};

/// Bumped when the schema changes; a newer database is refused rather than misread.
const SCHEMA_VERSION: i64 = 6;

/// - `events`: one row per accepted webhook (unrouted ones too), body byte for byte; written once, never
///   updated (so delivery bookkeeping never rewrites pages that hold bodies). `dedup_hash` is the first 8 bytes
///   of SHA-256(`dedup_key`), from which the writer fills its in-memory dedup index (`dedup.rs`); it has no
///   index of its own (version 3 had one: random inserts into it were a third of the spool's disk writes).
/// - `deliveries`: one row per (event, sink) to deliver, plus one per replay or dead-letter retry. Its `id`
///   gives each sink its dispatch order. Status: `pending`, `delivered`, `dead`, `retried` (a dead letter
///   that was retried as a new delivery row) or `purged` (a dead letter given up by an operator).
/// - `attempts`: the attempt log, one row per delivery attempt; pruned with its event.
/// - `uncertain_answers`: the events (seq) whose webhook answer the provider may not have seen (cut, failed or
///   late; see `dedup.rs`): a copy of one of them is a retry. Rare, so written only when it happens; pruned
///   with its event.
/// - `handshakes`: Clockodo validation secrets (bounded per source).
/// - `installations`: Clockify add-on installations (JSON records holding credentials: the spool folder and
///   files are owner-only).
/// - The log engine's cold path (`cold.rs`; empty under the SQLite engine): `event_copies` (a copy of each
///   event with a delivery being retried or dead-lettered, so that neither pins the log), `deferred` (a
///   delivery being retried: its attempts and when the next is due), `dead_letters` and `failed_attempts`
///   (the attempt log: failed attempts and the success after them; a first-attempt success is implied), and
///   `replays` (dead-letter retries and replays asked for by an operator, until the daemon has appended
///   them to the log as new events: `queued`, or found their event gone: `missing`).
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    source       TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    headers      TEXT NOT NULL,
    body         BLOB NOT NULL,
    dedup_key    TEXT NOT NULL,
    dedup_hash   INTEGER NOT NULL,
    ordering_key TEXT
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE TABLE IF NOT EXISTS deliveries (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    event_seq       INTEGER NOT NULL,
    sink            TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead', 'retried', 'purged')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    last_status     INTEGER,
    replay          INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS deliveries_event ON deliveries (event_seq);
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (sink, id) WHERE status = 'pending';
CREATE INDEX IF NOT EXISTS deliveries_dead ON deliveries (sink, id) WHERE status = 'dead';
CREATE TABLE IF NOT EXISTS attempts (
    id          INTEGER PRIMARY KEY,
    delivery_id INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    status      INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
CREATE TABLE IF NOT EXISTS uncertain_answers (seq INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS handshakes (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    secret      TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS installations (
    source       TEXT NOT NULL,
    workspace_id TEXT NOT NULL,
    addon_id     TEXT NOT NULL,
    record       TEXT NOT NULL,
    updated_at   INTEGER NOT NULL,
    PRIMARY KEY (source, workspace_id, addon_id)
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS event_copies (
    seq          INTEGER PRIMARY KEY,
    id           TEXT NOT NULL,
    source       TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    received_at  INTEGER NOT NULL,
    headers      TEXT NOT NULL,
    body         BLOB NOT NULL,
    dedup_key    TEXT NOT NULL,
    ordering_key TEXT
);
CREATE TABLE IF NOT EXISTS deferred (
    sink            TEXT NOT NULL,
    seq             INTEGER NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at INTEGER,
    last_error      TEXT,
    last_status     INTEGER,
    replay          INTEGER NOT NULL DEFAULT 0,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (sink, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dead_letters (
    id          INTEGER PRIMARY KEY,
    sink        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('dead', 'retried', 'purged')),
    attempts    INTEGER NOT NULL,
    last_error  TEXT,
    last_status INTEGER,
    dead_at     INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_status ON dead_letters (status, sink);
CREATE INDEX IF NOT EXISTS dead_letters_seq ON dead_letters (seq);
CREATE TABLE IF NOT EXISTS failed_attempts (
    id          INTEGER PRIMARY KEY,
    sink        TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    attempt     INTEGER NOT NULL,
    started_at  INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    outcome     TEXT NOT NULL,
    status      INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS failed_attempts_seq ON failed_attempts (seq);
CREATE TABLE IF NOT EXISTS replays (
    id             INTEGER PRIMARY KEY,
    seq            INTEGER NOT NULL,
    sink           TEXT NOT NULL,
    origin         TEXT NOT NULL CHECK (origin IN ('replay', 'dlq')),
    dead_letter_id INTEGER,
    status         TEXT NOT NULL CHECK (status IN ('pending', 'queued', 'missing')),
    queued_seq     INTEGER,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS replays_pending ON replays (id) WHERE status = 'pending';
";

/// Common settings for every connection that writes (the daemon's writer, the CLI, the admin API).
pub(super) fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    // WAL: readers do not block the writer; FULL: the WAL is fsync'd at every commit, so a commit that
    // returned survives a power cut. This is what makes a 2xx a promise.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(())
}

/// Settings and schema for the write connection.
pub(super) fn prepare_writer(conn: &Connection) -> Result<(), StoreError> {
    configure(conn)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version == 3 {
        // 3 -> 4: the dedup index moved into memory.
        conn.execute_batch("DROP INDEX IF EXISTS events_dedup_hash")?;
    }
    // 4 -> 5: `uncertain_answers` (created by the schema below). Events stored before it count as answered.
    // 5 -> 6: the log engine's cold tables (created by the schema below, empty).
    if ![0, 3, 4, 5, SCHEMA_VERSION].contains(&version) {
        return Err(StoreError::Schema(format!(
            "spool schema version {version}, this hookbridge uses {SCHEMA_VERSION}: start with an empty data_dir \
             (or drain the spool with the matching version first)"
        )));
    }
    if version != SCHEMA_VERSION {
        // Only a new or migrated spool is written to: a start on a full disk must not fail here.
        conn.execute_batch(SCHEMA)?;
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

/// Counts what is pending, and what is stored unrouted.
pub(super) fn load_gauges(conn: &Connection) -> Result<SpoolGauges, StoreError> {
    let g = SpoolGauges::default();
    store_gauges(conn, &g)?;
    Ok(g)
}

/// Recounts what is pending into `g` (after changes made by another process, e.g. `hookbridge dlq retry`).
pub(super) fn store_gauges(conn: &Connection, g: &SpoolGauges) -> Result<(), StoreError> {
    use std::sync::atomic::Ordering::Relaxed;
    let (events, bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM events
             WHERE seq IN (SELECT event_seq FROM deliveries WHERE status = 'pending')",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let deliveries: i64 =
        conn.query_row("SELECT count(*) FROM deliveries WHERE status = 'pending'", [], |r| r.get(0))?;
    let (unrouted, unrouted_bytes): (i64, i64) = conn.query_row(
        "SELECT count(*), coalesce(sum(length(body)), 0) FROM events
             WHERE NOT EXISTS (SELECT 1 FROM deliveries WHERE event_seq = seq)",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    g.pending_events.store(events as u64, Relaxed);
    g.pending_bytes.store(bytes as u64, Relaxed);
    g.pending_deliveries.store(deliveries as u64, Relaxed);
    g.unrouted_events.store(unrouted as u64, Relaxed);
    g.unrouted_bytes.store(unrouted_bytes as u64, Relaxed);
    Ok(())
}

/// A value of the `meta` table.
pub(super) fn meta(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn.query_row("SELECT v FROM meta WHERE k = ?1", [key], |r| r.get(0)).optional()?)
}

/// Sets a value of the `meta` table.
pub(super) fn set_meta(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.execute("INSERT INTO meta (k, v) VALUES (?1, ?2) ON CONFLICT (k) DO UPDATE SET v = excluded.v", [key, value])?;
    Ok(())
}
