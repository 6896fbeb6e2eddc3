//! The spool's single writer: group commit. It takes the first waiting operation, then everything else
//! already queued (up to [`GROUP_COMMIT_MAX`]), applies them in one transaction, commits once (one fsync),
//! and only then answers each caller and updates the gauges.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::{Feeds, Outcome, PendingDelivery, SpoolGauges, StoreError};
use crate::event::{Event, now_ms};
use crate::limits::{GROUP_COMMIT_MAX, GROUP_COMMIT_WINDOW, HANDSHAKES_KEPT};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

pub(super) enum Op {
    Insert { event: Event, sinks: Vec<String>, reply: Reply<i64> },
    Record { seq: i64, sink: String, attempts: u32, outcome: Outcome, reply: Reply<()> },
    Handshake { source: String, secret: String, received_at_ms: i64, reply: Reply<()> },
    Ping { reply: Reply<()> },
    Prune { before_ms: i64, reply: Reply<u64> },
    Shutdown { reply: oneshot::Sender<()> },
}

/// What an applied operation changes in the gauges once committed, and how to answer it.
enum Done {
    Seq(Reply<i64>, Result<i64, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
}

#[derive(Default)]
struct Delta {
    events: i64,
    bytes: i64,
    deliveries: i64,
}

pub(super) fn run(mut conn: Connection, mut rx: mpsc::Receiver<Op>, gauges: Arc<SpoolGauges>, feeds: Feeds) {
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    let mut synchronous_full = true;
    let mut last_batch = 0usize;
    while shutdown.is_none() {
        let Some(first) = rx.blocking_recv() else {
            break;
        };
        // Under load (the last batch was not alone), give concurrent requests a moment to join this commit:
        // fewer, larger commits cost less CPU per event. An idle daemon commits at once.
        if last_batch > 1 && rx.len() < GROUP_COMMIT_MAX / 16 {
            std::thread::sleep(GROUP_COMMIT_WINDOW);
        }
        let mut batch = vec![first];
        while batch.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        last_batch = batch.len();
        let mut done = Vec::with_capacity(batch.len());
        let mut committed: Vec<(i64, Event, Vec<String>)> = Vec::new();
        let mut delta = Delta::default();
        // Only new events (and handshakes, pings, pruning) must be on disk before anyone is answered. A batch
        // of delivery outcomes alone commits without its own fsync (synchronous=NORMAL): it reaches the disk
        // with the next synced commit, and if the process dies first, those deliveries are made again
        // (at-least-once). Outcomes arriving while inserts are queued share their fsync anyway.
        let must_sync = batch.iter().any(|op| !matches!(op, Op::Record { .. }));
        if must_sync != synchronous_full {
            let mode = if must_sync { "FULL" } else { "NORMAL" };
            match conn.pragma_update(None, "synchronous", mode) {
                Ok(()) => synchronous_full = must_sync,
                Err(e) => tracing::warn!(error = %e, "cannot switch synchronous mode"),
            }
        }
        let commit = (|| -> Result<(), rusqlite::Error> {
            let tx = conn.transaction()?;
            for op in batch {
                match op {
                    Op::Shutdown { reply } => shutdown = Some(reply),
                    Op::Insert { event, sinks, reply } => {
                        let r = insert(&tx, &event, &sinks);
                        if let Ok(seq) = r
                            && !sinks.is_empty()
                        {
                            delta.events += 1;
                            delta.bytes += event.body.len() as i64;
                            delta.deliveries += sinks.len() as i64;
                            committed.push((seq, event, sinks));
                        }
                        done.push(Done::Seq(reply, r.map_err(StoreError::from)));
                    }
                    Op::Record { seq, sink, attempts, outcome, reply } => {
                        let r = record(&tx, seq, &sink, attempts, &outcome, &mut delta);
                        done.push(Done::Unit(reply, r.map_err(StoreError::from)));
                    }
                    Op::Handshake { source, secret, received_at_ms, reply } => {
                        let r = handshake(&tx, &source, &secret, received_at_ms);
                        done.push(Done::Unit(reply, r.map_err(StoreError::from)));
                    }
                    Op::Ping { reply } => {
                        let r = tx
                            .execute(
                                "INSERT INTO meta (k, v) VALUES ('heartbeat', ?1) ON CONFLICT (k) DO UPDATE SET v = excluded.v",
                                [now_ms().to_string()],
                            )
                            .map(|_| ());
                        done.push(Done::Unit(reply, r.map_err(StoreError::from)));
                    }
                    Op::Prune { before_ms, reply } => {
                        let r = prune(&tx, before_ms);
                        done.push(Done::Count(reply, r.map_err(StoreError::from)));
                    }
                }
            }
            tx.commit()
        })();
        match commit {
            Ok(()) => {
                apply(&gauges, &delta);
                feed(&feeds, committed);
                for d in done {
                    match d {
                        Done::Seq(reply, r) => drop(reply.send(r)),
                        Done::Unit(reply, r) => drop(reply.send(r)),
                        Done::Count(reply, r) => drop(reply.send(r)),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed; the batch's webhooks get 503");
                let msg = e.to_string();
                for d in done {
                    let err = || StoreError::Sqlite(rusqlite::Error::InvalidParameterName(msg.clone()));
                    match d {
                        Done::Seq(reply, _) => drop(reply.send(Err(err()))),
                        Done::Unit(reply, _) => drop(reply.send(Err(err()))),
                        Done::Count(reply, _) => drop(reply.send(Err(err()))),
                    }
                }
            }
        }
    }
    // Answer whoever asked us to stop; operations still queued are dropped unanswered (their callers see
    // `Closed`, and a webhook among them gets 503, so nothing acknowledged is lost).
    if let Some(reply) = shutdown {
        let _ = reply.send(());
    }
    let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
}

/// Hands committed deliveries to their dispatchers, in commit (= seq) order. A full feed is not waited for:
/// it is marked lagged, and its dispatcher reads the spool instead until it has caught up.
fn feed(feeds: &Feeds, committed: Vec<(i64, Event, Vec<String>)>) {
    if committed.is_empty() {
        return;
    }
    let Ok(feeds) = feeds.lock() else { return };
    for (seq, event, sinks) in committed {
        for sink in sinks {
            if let Some(f) = feeds.get(&sink) {
                let item = PendingDelivery { seq, attempts: 0, event: event.clone() };
                if f.tx.try_send(item).is_err() {
                    f.lagged.store(true, Ordering::Release);
                }
            }
        }
    }
}

fn apply(g: &SpoolGauges, d: &Delta) {
    fn add(a: &std::sync::atomic::AtomicU64, v: i64) {
        if v >= 0 {
            a.fetch_add(v as u64, Ordering::Relaxed);
        } else {
            let _ = a.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(x.saturating_sub(v.unsigned_abs())));
        }
    }
    add(&g.pending_events, d.events);
    add(&g.pending_bytes, d.bytes);
    add(&g.pending_deliveries, d.deliveries);
}

fn insert(tx: &rusqlite::Transaction<'_>, e: &Event, sinks: &[String]) -> Result<i64, rusqlite::Error> {
    let headers = serde_json::to_string(&e.headers).unwrap_or_else(|_| "[]".into());
    tx.prepare_cached(
        "INSERT INTO events (id, source, event_type, received_at, headers, body, dedup_key, remaining)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        e.id,
        e.source,
        e.event_type,
        e.received_at_ms,
        headers,
        &e.body[..],
        e.dedup_key,
        sinks.len() as i64
    ])?;
    let seq = tx.last_insert_rowid();
    let mut stmt = tx.prepare_cached(
        "INSERT INTO deliveries (sink, event_seq, status, attempts, updated_at) VALUES (?1, ?2, 'pending', 0, ?3)",
    )?;
    for sink in sinks {
        stmt.execute(params![sink, seq, e.received_at_ms])?;
    }
    Ok(seq)
}

fn record(
    tx: &rusqlite::Transaction<'_>,
    seq: i64,
    sink: &str,
    attempts: u32,
    outcome: &Outcome,
    delta: &mut Delta,
) -> Result<(), rusqlite::Error> {
    let now = now_ms();
    let (status, next, error) = match outcome {
        Outcome::Delivered => ("delivered", None, None),
        Outcome::Dead(e) => ("dead", None, Some(e.as_str())),
        Outcome::Retry { next_attempt_ms, error } => ("pending", Some(*next_attempt_ms), Some(error.as_str())),
    };
    let changed = tx.prepare_cached(
        "UPDATE deliveries SET status = ?1, attempts = ?2, next_attempt_at = ?3, last_error = coalesce(?4, last_error), updated_at = ?5
         WHERE sink = ?6 AND event_seq = ?7 AND status = 'pending'",
    )?
    .execute(params![status, attempts, next, error, now, sink, seq])?;
    if changed == 1 && status != "pending" {
        delta.deliveries -= 1;
        let left: Option<(i64, i64)> = tx
            .prepare_cached(
                "UPDATE events SET remaining = remaining - 1 WHERE seq = ?1 RETURNING remaining, length(body)",
            )?
            .query_row([seq], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((0, len)) = left {
            delta.events -= 1;
            delta.bytes -= len;
        }
    }
    Ok(())
}

fn handshake(tx: &rusqlite::Transaction<'_>, source: &str, secret: &str, at: i64) -> Result<(), rusqlite::Error> {
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

fn prune(tx: &rusqlite::Transaction<'_>, before_ms: i64) -> Result<u64, rusqlite::Error> {
    tx.execute(
        "DELETE FROM deliveries WHERE event_seq IN (SELECT seq FROM events WHERE received_at < ?1 AND remaining = 0)",
        [before_ms],
    )?;
    let n = tx.execute("DELETE FROM events WHERE received_at < ?1 AND remaining = 0", [before_ms])?;
    tx.execute("DELETE FROM handshakes WHERE received_at < ?1", [before_ms])?;
    Ok(n as u64)
}
