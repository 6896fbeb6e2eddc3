//! The spool's single writer: group commit, with the fsync pipelined.
//!
//! The writer thread takes the first waiting operation, then everything else already queued (up to
//! [`GROUP_COMMIT_MAX`]), applies them in one transaction and commits it with `synchronous=NORMAL`: the
//! WAL frames are written, not yet synced. It hands the batch's answers to the syncer thread and goes on with
//! the next batch at once. The syncer `fdatasync`s the WAL once for everything handed to it meanwhile, and only
//! then answers the callers (a webhook's `2xx` waits for this), feeds the dispatchers and lets gauges move.
//! So SQL work and the disk's sync latency overlap instead of adding up, and one sync covers several commits.
//!
//! Why this is as durable as `synchronous=FULL`: in WAL mode a transaction is durable once the WAL file holds
//! its commit frame on disk. SQLite with `NORMAL` keeps the database consistent across a crash (it syncs the WAL
//! before each checkpoint and the database after it); what it leaves out is the sync after each commit, which
//! the syncer does instead, on the same file (fsync is per file, not per descriptor), before anyone is told.
//! A sync that fails stops the writer: the spool then refuses everything (`503`) until the daemon restarts
//! and SQLite recovers from the WAL; nothing is answered as durable that may not be.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{mpsc, oneshot};

use super::acker::{Answers, Complete};
use super::cold::{self, ColdWrite};
use super::dedup::{Answer, RecentKeys};
use super::ops;
use super::{Dedup, Feeds, Inserted, PendingDelivery, Record, SpoolGauges, StoreError, schema};
use crate::event::Event;
use crate::limits::{GROUP_COMMIT_MAX, GROUP_COMMIT_WINDOW, SYNC_QUEUE};

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

/// Answers reported by the ingress ([`super::Store::answered`]) for the writer to take: (seq, dedup hash,
/// certain).
pub(super) type AnswerMarks = Arc<std::sync::Mutex<Vec<(i64, i64, bool)>>>;

/// What the writer shares with the [`super::Store`] handles besides its queue.
pub(super) struct Shared {
    pub(super) answers: AnswerMarks,
    /// Set once a sync failed (with the error).
    pub(super) failure: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// Completes the answers, on the runtime the spool was opened in if there was one.
    pub(super) answers_out: Answers<Settle>,
}

/// One answer for the acker: a waiter with its result.
pub(super) struct Settle(Waiter, Result<Applied, StoreError>);

impl Complete for Settle {
    fn complete(self) {
        answer(self.0, self.1);
    }
}

/// A committed event (seq, event) with its new deliveries (id, sink), to hand to the dispatchers.
type Committed = (i64, Event, Vec<(i64, String)>);

pub(super) enum Op {
    Insert {
        event: Event,
        sinks: Vec<String>,
        dedup: Dedup,
        reply: Reply<Inserted>,
    },
    /// Take the reported answers now (an uncertain one is to be recorded).
    Answers,
    Record {
        records: Vec<Record>,
        reply: Reply<()>,
    },
    Handshake {
        source: String,
        secret: String,
        received_at_ms: i64,
        reply: Reply<()>,
    },
    Ping {
        reply: Reply<()>,
    },
    Installation {
        source: String,
        workspace: String,
        addon_id: String,
        record: String,
        reply: Reply<()>,
    },
    Prune {
        before_ms: i64,
        limit: usize,
        reply: Reply<u64>,
    },
    Resync {
        reply: Reply<()>,
    },
    /// The log engine's cold path (`cold.rs`): durable before it is answered.
    Cold {
        writes: Vec<ColdWrite>,
        reply: Reply<()>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// What an operation asks of the database (an [`Op`] without its reply).
enum Work {
    Insert {
        event: Event,
        sinks: Vec<String>,
        dedup: Dedup,
    },
    /// Nothing to apply: the answers are taken at the start of every batch.
    Answers,
    Record {
        records: Vec<Record>,
    },
    Handshake {
        source: String,
        secret: String,
        received_at_ms: i64,
    },
    Ping,
    Installation {
        source: String,
        workspace: String,
        addon_id: String,
        record: String,
    },
    Prune {
        before_ms: i64,
        limit: usize,
    },
    Resync,
    Cold {
        writes: Vec<ColdWrite>,
    },
}

/// Who is waiting for an operation's answer.
enum Waiter {
    Inserted(Reply<Inserted>),
    Unit(Reply<()>),
    Count(Reply<u64>),
    Nobody,
}

/// What applying one operation did.
enum Applied {
    /// With the new deliveries, and the dedup hash of a new event.
    Inserted(Inserted, Vec<(i64, String)>, Option<i64>),
    Finished(ops::Finished),
    Count(u64),
    Unit,
}

fn split(op: Op) -> Result<(Work, Waiter), oneshot::Sender<()>> {
    Ok(match op {
        Op::Insert { event, sinks, dedup, reply } => (Work::Insert { event, sinks, dedup }, Waiter::Inserted(reply)),
        Op::Answers => (Work::Answers, Waiter::Nobody),
        Op::Record { records, reply } => (Work::Record { records }, Waiter::Unit(reply)),
        Op::Handshake { source, secret, received_at_ms, reply } => {
            (Work::Handshake { source, secret, received_at_ms }, Waiter::Unit(reply))
        }
        Op::Ping { reply } => (Work::Ping, Waiter::Unit(reply)),
        Op::Installation { source, workspace, addon_id, record, reply } => {
            (Work::Installation { source, workspace, addon_id, record }, Waiter::Unit(reply))
        }
        Op::Prune { before_ms, limit, reply } => (Work::Prune { before_ms, limit }, Waiter::Count(reply)),
        Op::Resync { reply } => (Work::Resync, Waiter::Unit(reply)),
        Op::Cold { writes, reply } => (Work::Cold { writes }, Waiter::Unit(reply)),
        Op::Shutdown { reply } => return Err(reply),
    })
}

fn apply(c: &Connection, work: &Work, recent: &mut RecentKeys) -> rusqlite::Result<Applied> {
    Ok(match work {
        Work::Insert { event, sinks, dedup } => {
            let hash = ops::dedup_hash(&event.dedup_key);
            let seqs = recent.candidates(|since, until| ops::recent_keys(c, since, until), hash, dedup)?;
            if let Some((seq, original)) = ops::find_duplicate(c, &seqs, &event.dedup_key, &event.source)? {
                return Ok(Applied::Inserted(Inserted::Duplicate { original, seq }, Vec::new(), None));
            }
            let (seq, ids) = ops::insert(c, event, hash, sinks)?;
            Applied::Inserted(Inserted::New { seq }, ids, Some(hash))
        }
        Work::Record { records } => {
            let mut finished = (0, 0, 0);
            for r in records {
                let (deliveries, events, bytes) = ops::record(c, r)?;
                finished = (finished.0 + deliveries, finished.1 + events, finished.2 + bytes);
            }
            Applied::Finished(finished)
        }
        Work::Handshake { source, secret, received_at_ms } => {
            ops::handshake(c, source, secret, *received_at_ms)?;
            Applied::Unit
        }
        Work::Installation { source, workspace, addon_id, record } => {
            ops::save_installation(c, source, workspace, addon_id, record)?;
            Applied::Unit
        }
        Work::Ping => {
            ops::heartbeat(c)?;
            Applied::Unit
        }
        Work::Prune { before_ms, limit } => {
            let n = ops::prune(c, *before_ms, *limit)?;
            cold::prune(c, *before_ms)?;
            Applied::Count(n)
        }
        Work::Cold { writes } => {
            for w in writes {
                cold::apply(c, w)?;
            }
            Applied::Unit
        }
        Work::Resync | Work::Answers => Applied::Unit,
    })
}

/// Applies a batch in one transaction and commits it. The fast way runs the operations one after the other;
/// if one fails, the whole transaction is rolled back and the batch runs again the careful way, each operation
/// in a savepoint of its own, so that the failing one leaves nothing behind and the others commit (a savepoint
/// per operation costs SQLite a statement journal, which is why it is not the usual way).
fn execute(
    conn: &mut Connection,
    batch: &[Work],
    recent: &mut RecentKeys,
) -> rusqlite::Result<Vec<rusqlite::Result<Applied>>> {
    // A new event is remembered for dedup as soon as it is inserted (a later copy in the same batch must find
    // it), and forgotten again if its transaction does not commit.
    let stage = |recent: &mut RecentKeys, w: &Work, r: &rusqlite::Result<Applied>| {
        if let (Work::Insert { event, .. }, Ok(Applied::Inserted(Inserted::New { seq }, _, Some(hash)))) = (w, r) {
            recent.stage(*hash, *seq, event.received_at_ms);
        }
    };
    let fast = (|| {
        // IMMEDIATE: take the write lock up front, so that a batch waits (busy timeout) for an operator's
        // transaction instead of failing when its first read would need upgrading to a write.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        for w in batch {
            let r = Ok(apply(&tx, w, recent)?);
            stage(recent, w, &r);
            results.push(r);
        }
        tx.commit()?;
        Ok(results)
    })();
    let first_error = match fast {
        Ok(results) => return Ok(results),
        Err(e) => e,
    };
    recent.discard();
    if batch.len() == 1 {
        return Ok(vec![Err(first_error)]);
    }
    let careful = (|| {
        let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut results = Vec::with_capacity(batch.len());
        for w in batch {
            let r = in_savepoint(&mut tx, |c| apply(c, w, recent));
            stage(recent, w, &r);
            results.push(r);
        }
        tx.commit()?;
        Ok(results)
    })();
    if careful.is_err() {
        recent.discard();
    }
    careful
}

/// A committed batch on its way to the syncer.
struct Settled {
    answers: Vec<(Waiter, Result<Applied, StoreError>)>,
    fed: Vec<Committed>,
    /// Something in it must be on disk before it is answered (anything but delivery outcomes).
    durable: bool,
    gauges: GaugeUpdate,
}

enum GaugeUpdate {
    Delta(Delta),
    /// Recounted from the database after this commit (another connection wrote, or a prune ran).
    Recount(SpoolGauges),
}

#[derive(Default)]
struct Delta {
    events: i64,
    bytes: i64,
    deliveries: i64,
    unrouted_events: i64,
    unrouted_bytes: i64,
}

/// Applies the answers reported since the last batch to the dedup index; an answer that turned uncertain
/// (or certain again: a retry was answered) is recorded in the spool, in autocommit (rare; losing it in a
/// crash only makes a later retry a second delivery).
fn take_answers(conn: &Connection, recent: &mut RecentKeys, marks: &AnswerMarks) {
    let marks = match marks.lock() {
        Ok(mut m) if !m.is_empty() => std::mem::take(&mut *m),
        _ => return,
    };
    for (seq, hash, certain) in marks {
        let now = if certain { Answer::Certain } else { Answer::Uncertain };
        let Some(before) = recent.set_answer(hash, seq, now) else { continue };
        if before != Answer::Certain
            && (before == Answer::Uncertain) != (now == Answer::Uncertain)
            && let Err(e) = ops::set_uncertain(conn, seq, now == Answer::Uncertain)
        {
            tracing::warn!(error = %e, seq, "cannot record a webhook answer in the spool");
        }
    }
}

pub(super) fn run(
    mut conn: Connection,
    mut rx: mpsc::Receiver<Op>,
    gauges: Arc<SpoolGauges>,
    feeds: Feeds,
    shared: Shared,
) {
    let mut shutdown: Option<oneshot::Sender<()>> = None;
    // Every commit leaves the WAL sync to the syncer.
    if let Err(e) = conn.pragma_update(None, "synchronous", "NORMAL") {
        tracing::error!(error = %e, "cannot set up the spool writer; the spool refuses writes");
        return;
    }
    let wal = wal_path(&conn);
    let failed = Arc::new(AtomicBool::new(false));
    let (to_syncer, from_writer) = std::sync::mpsc::sync_channel::<Settled>(SYNC_QUEUE);
    let syncer = {
        let failed = Arc::clone(&failed);
        let gauges = Arc::clone(&gauges);
        let failure = Arc::clone(&shared.failure);
        let answers = shared.answers_out;
        std::thread::Builder::new()
            .name("hookbridge-sync".into())
            .spawn(move || sync_loop(wal, from_writer, &gauges, &feeds, (&failed, &failure), answers))
    };
    let syncer = match syncer {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the spool's sync thread; the spool refuses writes");
            return;
        }
    };
    let mut last_batch = 0usize;
    let mut recent = RecentKeys::new();
    // The dedup window as the last insert gave it (`None`: no insert yet, so nothing to forget).
    let mut window_ms: Option<i64> = None;
    // Bumped by SQLite whenever another connection (an operator's CLI or the admin API) commits.
    let mut data_version = data_version_of(&conn);
    while shutdown.is_none() && !failed.load(Ordering::Acquire) {
        let Some(first) = rx.blocking_recv() else { break };
        // Under load (the last batch was not alone), give concurrent requests a moment to join this commit:
        // fewer, larger commits cost less CPU per event. An idle daemon commits at once.
        if last_batch > 1 && rx.len() < GROUP_COMMIT_MAX / 16 {
            std::thread::sleep(GROUP_COMMIT_WINDOW);
        }
        let mut ops = vec![first];
        while ops.len() < GROUP_COMMIT_MAX {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        last_batch = ops.len();
        let mut work = Vec::with_capacity(ops.len());
        let mut waiters = Vec::with_capacity(ops.len());
        for op in ops {
            match split(op) {
                Ok((w, r)) => {
                    work.push(w);
                    waiters.push(r);
                }
                Err(reply) => shutdown = Some(reply),
            }
        }
        let durable = work.iter().any(|w| !matches!(w, Work::Record { .. } | Work::Answers));
        let resync = work.iter().any(|w| matches!(w, Work::Prune { .. }));
        let now = crate::event::now_ms();
        for w in &work {
            if let Work::Insert { dedup, .. } = w {
                window_ms = Some(dedup.since_ms().map_or(0, |since| (now - since).max(0)));
            }
        }
        // Before the inserts: an answer reported before a copy arrived decides whether the copy is a retry.
        take_answers(&conn, &mut recent, &shared.answers);
        let settled = match execute(&mut conn, &work, &mut recent) {
            Ok(results) => {
                recent.commit(window_ms.map_or(i64::MIN, |w| now - w));
                let mut delta = Delta::default();
                let mut fed = Vec::new();
                let mut answers = Vec::with_capacity(results.len());
                for ((w, waiter), r) in work.into_iter().zip(waiters).zip(results) {
                    match (&r, w) {
                        (Ok(Applied::Inserted(Inserted::New { seq }, ids, _)), Work::Insert { event, .. })
                            if !ids.is_empty() =>
                        {
                            delta.events += 1;
                            delta.bytes += event.body.len() as i64;
                            delta.deliveries += ids.len() as i64;
                            fed.push((*seq, event, ids.clone()));
                        }
                        (Ok(Applied::Inserted(Inserted::New { .. }, _, _)), Work::Insert { event, .. }) => {
                            delta.unrouted_events += 1;
                            delta.unrouted_bytes += event.body.len() as i64;
                        }
                        (Ok(Applied::Finished((deliveries, events, bytes))), _) => {
                            delta.deliveries -= deliveries;
                            delta.events -= events;
                            delta.bytes -= bytes;
                        }
                        _ => {}
                    }
                    answers.push((waiter, r.map_err(StoreError::from)));
                }
                let seen = data_version_of(&conn);
                let gauges = if resync || seen != data_version {
                    data_version = seen;
                    match schema::load_gauges(&conn) {
                        Ok(g) => GaugeUpdate::Recount(g),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot recount the spool");
                            GaugeUpdate::Delta(delta)
                        }
                    }
                } else {
                    GaugeUpdate::Delta(delta)
                };
                Settled { answers, fed, durable, gauges }
            }
            Err(e) => {
                tracing::error!(error = %e, "spool commit failed; the batch's webhooks get 503");
                let msg = e.to_string();
                let answers = waiters.into_iter().map(|w| (w, Err(StoreError::Commit(msg.clone())))).collect();
                Settled { answers, fed: Vec::new(), durable: false, gauges: GaugeUpdate::Delta(Delta::default()) }
            }
        };
        if to_syncer.send(settled).is_err() {
            break;
        }
    }
    // Everything committed is synced and answered before the writer says it has stopped.
    drop(to_syncer);
    let _ = syncer.join();
    // After a failed sync nothing more is written: the next start recovers from the WAL as it is.
    if !failed.load(Ordering::Acquire) {
        let _ = conn.pragma_update(None, "wal_checkpoint", "TRUNCATE");
    }
    // Answer whoever asked us to stop; operations still queued are dropped unanswered (their callers see
    // `Closed`, and a webhook among them gets 503, so nothing acknowledged is lost).
    if let Some(reply) = shutdown {
        let _ = reply.send(());
    }
}

fn wal_path(conn: &Connection) -> PathBuf {
    let db = conn.path().map(PathBuf::from).unwrap_or_default();
    let mut name = db.into_os_string();
    name.push("-wal");
    PathBuf::from(name)
}

/// The syncer: takes every settled batch waiting, syncs the WAL once if any of them needs it, then answers
/// them in commit order, updates the gauges and feeds the dispatchers.
fn sync_loop(
    wal: PathBuf,
    rx: std::sync::mpsc::Receiver<Settled>,
    gauges: &SpoolGauges,
    feeds: &Feeds,
    (failed, failure): (&AtomicBool, &tokio::sync::watch::Sender<Option<String>>),
    mut answers: Answers<Settle>,
) {
    let mut file: Option<(std::fs::File, (u64, u64))> = None;
    while let Ok(first) = rx.recv() {
        let mut batches = vec![first];
        batches.extend(rx.try_iter());
        let sync_error = if batches.iter().any(|b| b.durable) && !failed.load(Ordering::Acquire) {
            sync_wal(&wal, &mut file).err()
        } else {
            None
        };
        if let Some(e) = &sync_error {
            // The kernel may have dropped the pages it could not write: nothing after this can be promised.
            tracing::error!(error = %e, wal = %wal.display(), "cannot sync the spool's WAL; the spool stops accepting");
            failed.store(true, Ordering::Release);
            failure.send_replace(Some(e.to_string()));
        }
        for b in batches {
            if sync_error.is_some() || failed.load(Ordering::Acquire) {
                let msg = match &sync_error {
                    Some(e) => format!("cannot sync the spool: {e}"),
                    None => "the spool stopped after a failed sync".to_owned(),
                };
                for (waiter, _) in b.answers {
                    answers.push(Settle(waiter, Err(StoreError::Commit(msg.clone()))));
                }
                continue;
            }
            match b.gauges {
                GaugeUpdate::Delta(d) => apply_delta(gauges, &d),
                GaugeUpdate::Recount(g) => gauges.set_from(&g),
            }
            feed(feeds, b.fed);
            for (waiter, r) in b.answers {
                answers.push(Settle(waiter, r));
            }
        }
        // One hand-over per sync.
        answers.flush();
    }
}

/// `fdatasync` of the WAL, through a descriptor of our own (reopened if the file was replaced).
fn sync_wal(path: &Path, file: &mut Option<(std::fs::File, (u64, u64))>) -> std::io::Result<()> {
    let meta = std::fs::metadata(path)?;
    let id = (meta.dev(), meta.ino());
    if file.as_ref().is_none_or(|(_, known)| *known != id) {
        *file = Some((std::fs::File::open(path)?, id));
    }
    match file {
        Some((f, _)) => f.sync_data(),
        None => Ok(()),
    }
}

fn answer(waiter: Waiter, r: Result<Applied, StoreError>) {
    // `apply` answers each kind of work with its own kind of result; a mismatch would be a bug here.
    let mismatch = || StoreError::Commit("internal error: an operation got another kind of answer".into());
    match waiter {
        Waiter::Inserted(reply) => {
            let _ = reply.send(r.and_then(|a| match a {
                Applied::Inserted(i, _, _) => Ok(i),
                _ => Err(mismatch()),
            }));
        }
        Waiter::Unit(reply) => {
            let _ = reply.send(r.map(|_| ()));
        }
        Waiter::Count(reply) => {
            let _ = reply.send(r.and_then(|a| match a {
                Applied::Count(n) => Ok(n),
                _ => Err(mismatch()),
            }));
        }
        Waiter::Nobody => {}
    }
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
        let event = Arc::new(event);
        for (id, sink) in deliveries {
            if let Some(f) = feeds.get(&sink) {
                let created_at_ms = event.received_at_ms;
                let item = PendingDelivery {
                    id,
                    seq,
                    attempts: 0,
                    replay: false,
                    event: Arc::clone(&event),
                    created_at_ms,
                    next_attempt_ms: None,
                };
                if f.tx.try_send(item).is_err() {
                    f.lagged.store(true, Ordering::Release);
                }
            }
        }
    }
}

fn apply_delta(g: &SpoolGauges, d: &Delta) {
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
    add(&g.unrouted_events, d.unrouted_events);
    add(&g.unrouted_bytes, d.unrouted_bytes);
}
