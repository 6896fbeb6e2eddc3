//! The spool's schema and connection settings.

use std::sync::atomic::AtomicU64;

use rusqlite::Connection;

use super::{SpoolGauges, StoreError};

/// Bumped when the schema changes; a newer database is refused rather than misread.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    source      TEXT NOT NULL,
    event_type  TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    headers     TEXT NOT NULL,
    body        BLOB NOT NULL,
    dedup_key   TEXT NOT NULL,
    remaining   INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE INDEX IF NOT EXISTS events_dedup_key ON events (dedup_key);
CREATE TABLE IF NOT EXISTS deliveries (
    sink            TEXT NOT NULL,
    event_seq       INTEGER NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER,
    last_error      TEXT,
    updated_at      INTEGER NOT NULL,
    PRIMARY KEY (sink, event_seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (sink, event_seq) WHERE status = 'pending';
CREATE TABLE IF NOT EXISTS handshakes (
    id          INTEGER PRIMARY KEY,
    source      TEXT NOT NULL,
    secret      TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
";

/// Settings and schema for the write connection.
pub(super) fn prepare_writer(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // WAL: readers do not block the writer; FULL: the WAL is fsync'd at every commit, so a commit that
    // returned survives a power cut. This is what makes a 2xx a promise.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Sqlite(rusqlite::Error::InvalidParameterName(format!(
            "spool schema version {version} is newer than this hookbridge understands ({SCHEMA_VERSION})"
        ))));
    }
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

/// Counts what is pending, at start-up.
pub(super) fn load_gauges(conn: &Connection) -> Result<SpoolGauges, StoreError> {
    let (events, bytes): (i64, i64) =
        conn.query_row("SELECT count(*), coalesce(sum(length(body)), 0) FROM events WHERE remaining > 0", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let deliveries: i64 =
        conn.query_row("SELECT count(*) FROM deliveries WHERE status = 'pending'", [], |r| r.get(0))?;
    Ok(SpoolGauges {
        pending_events: AtomicU64::new(events as u64),
        pending_bytes: AtomicU64::new(bytes as u64),
        pending_deliveries: AtomicU64::new(deliveries as u64),
    })
}
