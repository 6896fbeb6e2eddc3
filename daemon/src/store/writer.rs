//! The spool's single writer: group commit. It takes the first waiting operation, then everything else
//! already queued (up to [`GROUP_COMMIT_MAX`]), applies them in one transaction, commits once (one fsync),
//! and only then answers each caller, updates the gauges and feeds the dispatchers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::ops;
use super::{Attempt, Feeds, Inserted, Outcome, PendingDelivery, SpoolGauges, StoreError, schema};
use crate::event::{Event, now_ms};
use crate::limits::{GROUP_COMMIT_MAX, GROUP_COMMIT_WINDOW};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// A committed event (seq, event) with its new deliveries (id, sink), to hand to the dispatchers.
type Committed = (i64, Event, Vec<(i64, String)>);

pub(super) enum Op {
    Insert { event: Event, sinks: Vec<String>, dedup_since_ms: Option<i64>, reply: Reply<Inserted> },
    Record { delivery_id: i64, attempts: u32, outcome: Outcome, attempt: Attempt, reply: Reply<()> },
    Handshake { source: String, secret: String, received_at_ms: i64, reply: Reply<()> },
    Ping { reply: Reply<()> },
    Installation { source: String, workspace: String, addon_id: String, record: String, reply: Reply<()> },
    Prune { before_ms: i64, limit: usize, reply: Reply<u64> },
    Resync { reply: Reply<()> },
    Shutdown { reply: oneshot::Sender<()> },
}

/// An applied operation's answer, sent once the commit is known.
enum Done {
    Inserted(Reply<Inserted>, Result<Inserted, StoreError>),
    Unit(Reply<()>, Result<(), StoreError>),
    Count(Reply<u64>, Result<u64, StoreError>),
}

impl Done {
    fn send(self, commit_error: Option<&str>) {
        let err = |m: &str| StoreError::Commit(m.to_owned());
        match (self, commit_error) {
            (Done::Inserted(reply, r), None) => drop(reply.send(r)),
            (Done::Unit(reply, r), None) => drop(reply.send(r)),
            (Done::Count(reply, r), None) => drop(reply.send(r)),
            (Done::Inserted(reply, _), Some(m)) => drop(reply.send(Err(err(m)))),
            (Done::Unit(reply, _), Some(m)) => drop(reply.send(Err(err(m)))),
            (Done::Count(reply, _), Some(m)) => drop(reply.send(Err(err(m)))),
        }
    }
}

#[derive(Default)]
struct Delta {
    events: i64,
    bytes: i64,
    deliveries: i64,
    resync: bool,
}

pub(super) fn run(mut conn: Connection, mut rx: mpsc::Receiver<Op>, gauges: Arc<SpoolGauges>, feeds: Feeds) {
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    let mut synchronous_full = true;
    let mut last_batch = 0usize;
    // Bumped by SQLite whenever another connection (an operator's CLI or the admin API) commits.
    let mut data_version = data_version_of(&conn);
    while shutdown.is_none() {
        let Some(first) = rx.blocking_recv() else { break };
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
        let mut done = Vec::with_capacity(batch.len());
        let mut fed: Vec<Committed> = Vec::new();
        let mut delta = Delta::default();
        let commit = (|| -> Result<(), rusqlite::Error> {
            // IMMEDIATE: take the write lock up front, so that a batch waits (busy timeout) for an operator's
            // transaction instead of failing when its first read would need upgrading to a write.
            let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for op in batch {
                match op {
                    Op::Shutdown { reply } => shutdown = Some(reply),
                    Op::Insert { event, sinks, dedup_since_ms, reply } => {
                        // A savepoint per event: a failure midway leaves nothing of it in the commit.
                        let r = in_savepoint(&mut tx, |c| ops::insert(c, &event, &sinks, dedup_since_ms));
                        if let Ok((Inserted::New { seq }, ids)) = &r
                            && !ids.is_empty()
                        {
                            delta.events += 1;
                            delta.bytes += event.body.len() as i64;
                            delta.deliveries += ids.len() as i64;
                            fed.push((*seq, event, ids.clone()));
                        }
                        done.push(Done::Inserted(reply, r.map(|(i, _)| i).map_err(StoreError::from)));
                    }
                    Op::Record { delivery_id, attempts, outcome, attempt, reply } => {
                        let r = in_savepoint(&mut tx, |c| ops::record(c, delivery_id, attempts, &outcome, &attempt));
                        if let Ok((deliveries, events, bytes)) = r {
                            delta.deliveries -= deliveries;
                            delta.events -= events;
                            delta.bytes -= bytes;
                        }
                        done.push(Done::Unit(reply, r.map(|_| ()).map_err(StoreError::from)));
                    }
                    Op::Handshake { source, secret, received_at_ms, reply } => {
                        let r = ops::handshake(&tx, &source, &secret, received_at_ms);
                        done.push(Done::Unit(reply, r.map_err(StoreError::from)));
                    }
                    Op::Installation { source, workspace, addon_id, record, reply } => {
                        let r = tx
                            .execute(
                                "INSERT INTO installations (source, workspace_id, addon_id, record, updated_at)
                                 VALUES (?1, ?2, ?3, ?4, ?5)
                                 ON CONFLICT (source, workspace_id, addon_id) DO UPDATE
                                 SET record = excluded.record, updated_at = excluded.updated_at",
                                rusqlite::params![source, workspace, addon_id, record, now_ms()],
                            )
                            .map(|_| ());
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
                    Op::Prune { before_ms, limit, reply } => {
                        let r = in_savepoint(&mut tx, |c| ops::prune(c, before_ms, limit));
                        delta.resync = true;
                        done.push(Done::Count(reply, r.map_err(StoreError::from)));
                    }
                    Op::Resync { reply } => done.push(Done::Unit(reply, Ok(()))),
                }
            }
            tx.commit()
        })();
        match commit {
            Ok(()) => {
                let seen = data_version_of(&conn);
                if delta.resync || seen != data_version {
                    data_version = seen;
                    if let Err(e) = schema::store_gauges(&conn, &gauges) {
                        tracing::warn!(error = %e, "cannot recount the spool");
                    }
                } else {
                    apply(&gauges, &delta);
                }
                feed(&feeds, fed);
                for d in done {
                    d.send(None);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed; the batch's webhooks get 503");
                let msg = e.to_string();
                for d in done {
                    d.send(Some(&msg));
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

/// Runs `f` inside a savepoint of `tx`: committed into the transaction if it succeeds, rolled back if not.
fn in_savepoint<T>(
    tx: &mut rusqlite::Transaction<'_>,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    let sp = tx.savepoint()?;
    let r = f(&sp)?;
    sp.commit()?;
    Ok(r)
}

fn data_version_of(conn: &Connection) -> i64 {
    conn.pragma_query_value(None, "data_version", |r| r.get(0)).unwrap_or(0)
}

/// Hands committed deliveries to their dispatchers, in commit (= delivery id) order. A full feed is not
/// waited for: it is marked lagged, and its dispatcher reads the spool instead until it has caught up.
fn feed(feeds: &Feeds, committed: Vec<Committed>) {
    if committed.is_empty() {
        return;
    }
    let Ok(feeds) = feeds.lock() else { return };
    for (seq, event, deliveries) in committed {
        for (id, sink) in deliveries {
            if let Some(f) = feeds.get(&sink) {
                let created_at_ms = event.received_at_ms;
                let item = PendingDelivery { id, seq, attempts: 0, replay: false, event: event.clone(), created_at_ms };
                if f.tx.try_send(item).is_err() {
                    f.lagged.store(true, Ordering::Release);
                }
            }
        }
    }
}

fn apply(g: &SpoolGauges, d: &Delta) {
    fn add(a: &AtomicU64, v: i64) {
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
