//! The spool thread: owns the [`Log`] and everything decided on it, so that dedup, seq order and each
//! sink's progress have one writer. Every operation waiting in its queue goes into one commit (group
//! commit): inserts (deduped against the in-memory index, a hit confirmed against the stored event, or
//! against an event staged earlier in the same batch), sinks' finished deliveries, answers and heartbeats.
//! Then it answers each caller (through a task on the runtime that spawned it, one hand-over per commit:
//! `store::acker`) and feeds the dispatchers. There is no timer and no sleep: a batch is whatever arrived
//! while the previous commit's `fdatasync` ran, so batches grow with the load by themselves.
//!
//! A sink's progress (`sinks.rs`): an event is *handed* to its dispatcher when it is pushed onto the sink's
//! feed or returned by [`Spool::pending`]; `taken` moves past it, and it stays *outstanding* until the
//! dispatcher reports it finished ([`Spool::finished`]: delivered, or moved to the cold path). A feed is
//! pushed to only while everything before the commit was already handed (`taken` at the commit's first
//! seq), so `taken` never passes an event nobody was handed; a full feed is marked lagged, and its
//! dispatcher then reads [`Spool::pending`] until it has caught up, as with the SQLite spool.
//! [`Spool::finished`] answers after the commit that holds the sink's checkpoint: a dispatcher that
//! releases an ordering key on that answer never has a delivery redelivered after a later one of the same
//! key, whatever crashes.
//!
//! Ids: the store's API numbers events from 1 (a dispatcher's cursor starts at 0 and takes what is above
//! it), the log from 0: [`public_seq`] and [`log_seq`] convert. A delivery's id is its event's public seq.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot, watch};

use super::super::acker::{Answers, Complete};
use super::super::dedup::{Answer, Known, RecentKeys};
use super::super::{Dedup, Feed, FeedSender, Feeds, Inserted, PendingDelivery, SpoolGauges, dedup_hash};
use super::file::Disk;
use super::{Log, LogError};
use crate::event::{Event, now_ms};

/// The store's seq (and delivery id) of log seq `seq`.
pub fn public_seq(seq: u64) -> i64 {
    i64::try_from(seq).map_or(i64::MAX, |s| s.saturating_add(1))
}

/// The log seq of the store's seq (or delivery id) `id`; `None` for an id no event has.
pub fn log_seq(id: i64) -> Option<u64> {
    u64::try_from(id).ok()?.checked_sub(1)
}

/// Why the spool thread did not do what it was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpoolError {
    /// A commit failed, or one before it did: the log takes nothing more (restart to recover).
    #[error("spool log failed: {0}")]
    Failed(String),
    /// The event does not fit the log's format.
    #[error("{0}")]
    TooBig(String),
    /// No room on the disk for this commit; the spool goes on (the next commit may find room).
    #[error("{0}")]
    Full(String),
    /// The spool thread has stopped.
    #[error("spool log is not running")]
    Closed,
    /// The events from before the log (see [`Earlier`]) could not be read for dedup.
    #[error("cannot read the spool's events from before the log: {0}")]
    Earlier(String),
}

/// The events a spool held before the log took it over (the SQLite engine's), which dedup must still find
/// for the rest of their window. Seqs are log seqs (all below the log's first one).
pub(in crate::store) trait Earlier: Send + 'static {
    /// Those received in `[since_ms, until_ms)`, newest first.
    fn received_between(&mut self, since_ms: i64, until_ms: i64) -> Result<Vec<Known>, String>;
    /// The id of event `seq` if it has this dedup key and source.
    fn find(&mut self, seq: u64, key: &str, source: &str) -> Result<Option<String>, String>;
}

impl From<LogError> for SpoolError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::TooBig(t) => SpoolError::TooBig(t.to_string()),
            e @ LogError::Full { .. } => SpoolError::Full(e.to_string()),
            other => SpoolError::Failed(other.to_string()),
        }
    }
}

/// An outstanding delivery's id, its event, and whether it is a replay.
pub type Outstanding = (i64, Arc<Event>, bool);

/// Counters of the spool thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commits made (each one write and one sync).
    pub commits: AtomicU64,
    /// Events made durable.
    pub events: AtomicU64,
}

type Reply<T> = oneshot::Sender<Result<T, SpoolError>>;

/// Answers reported by the ingress for the thread to take: (log seq, dedup hash, certain).
type Marks = Arc<Mutex<Vec<(u64, i64, bool)>>>;

enum Op {
    Insert {
        event: Event,
        sinks: Vec<String>,
        dedup: Dedup,
        /// A replay (not deduped, marked).
        replay: bool,
        reply: Reply<Inserted>,
    },
    /// Events by seq, for a replay.
    Read {
        seqs: Vec<u64>,
        reply: Reply<Vec<Option<Event>>>,
    },
    Finished {
        sink: String,
        seqs: Vec<u64>,
        reply: Reply<()>,
    },
    Pending {
        sink: String,
        from: u64,
        limit: usize,
        reply: Reply<Vec<PendingDelivery>>,
    },
    /// Take the reported answers now (an uncertain one is to be written).
    Answers,
    Ping {
        reply: Reply<()>,
    },
    /// The events of those of `seqs` that `sink` has outstanding (to move them to the cold path).
    Outstanding {
        sink: String,
        seqs: Vec<u64>,
        reply: Reply<Vec<Outstanding>>,
    },
    /// Per sink, the receive time of the oldest event it is not done with.
    Oldest {
        reply: Reply<Vec<(String, i64)>>,
    },
    /// Deletes the segments retention and every sink let go.
    Prune {
        before_ms: i64,
        reply: Reply<u64>,
    },
    /// Commit what is queued, then stop.
    Shutdown {
        reply: Reply<()>,
    },
}

/// One answer for the acker.
enum Settle {
    Inserted(Reply<Inserted>, Result<Inserted, SpoolError>),
    Unit(Reply<()>, Result<(), SpoolError>),
}

impl Complete for Settle {
    fn complete(self) {
        match self {
            Settle::Inserted(reply, r) => {
                let _ = reply.send(r);
            }
            Settle::Unit(reply, r) => {
                let _ = reply.send(r);
            }
        }
    }
}

/// The handle the async side works through; the thread stops when every handle is gone.
#[derive(Clone)]
pub struct Spool {
    tx: mpsc::Sender<Op>,
    stats: Arc<Stats>,
    feeds: Feeds,
    marks: Marks,
    gauges: Arc<SpoolGauges>,
    failure: Arc<watch::Sender<Option<String>>>,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("stats", &self.stats).finish_non_exhaustive()
    }
}

impl Spool {
    /// Starts the spool thread over `log`: at most `queue` operations wait, at most `max_batch` go into one
    /// commit. The thread gives the log back when it ends.
    pub fn spawn<D: Disk>(log: Log<D>, queue: usize, max_batch: usize) -> std::io::Result<(Spool, JoinHandle<Log<D>>)> {
        Spool::spawn_after(log, None, queue, max_batch)
    }

    /// [`Spool::spawn`] for a log that took over a spool: dedup also looks among `earlier`'s events.
    pub(in crate::store) fn spawn_after<D: Disk>(
        log: Log<D>,
        earlier: Option<Box<dyn Earlier>>,
        queue: usize,
        max_batch: usize,
    ) -> std::io::Result<(Spool, JoinHandle<Log<D>>)> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let spool = Spool {
            tx,
            stats: Arc::default(),
            feeds: Arc::default(),
            marks: Arc::default(),
            gauges: Arc::default(),
            failure: Arc::new(watch::Sender::new(None)),
        };
        let thread = Thread::new(log, earlier, &spool);
        let answers = Answers::new();
        let handle = std::thread::Builder::new()
            .name("hookbridge-log".into())
            .spawn(move || thread.run(rx, max_batch.max(1), answers))?;
        Ok((spool, handle))
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Op) -> Result<T, SpoolError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| SpoolError::Closed)?;
        answer.await.map_err(|_| SpoolError::Closed)?
    }

    /// Stores an event routed to `sinks`, durably, unless `dedup` makes it a duplicate of one stored.
    pub async fn insert(&self, event: Event, sinks: Vec<String>, dedup: Dedup) -> Result<Inserted, SpoolError> {
        self.call(|reply| Op::Insert { event, sinks, dedup, replay: false, reply }).await
    }

    /// Stores a copy of an earlier event for `sinks`, marked replay (its deliveries say so), durably.
    pub async fn replay(&self, event: Event, sinks: Vec<String>) -> Result<Inserted, SpoolError> {
        self.call(|reply| Op::Insert { event, sinks, dedup: Dedup::Off, replay: true, reply }).await
    }

    /// The events with these ids the log holds (`None`: pruned, or never durable).
    pub async fn read(&self, ids: &[i64]) -> Result<Vec<Option<Event>>, SpoolError> {
        let seqs = ids.iter().map(|id| log_seq(*id).unwrap_or(u64::MAX)).collect();
        self.call(|reply| Op::Read { seqs, reply }).await
    }

    /// `sink`'s deliveries with these ids are finished (delivered, or moved to the cold path); answers once
    /// that is durable.
    pub async fn finished(&self, sink: &str, ids: &[i64]) -> Result<(), SpoolError> {
        let seqs = ids.iter().filter_map(|id| log_seq(*id)).collect();
        self.call(|reply| Op::Finished { sink: sink.to_owned(), seqs, reply }).await
    }

    /// `sink`'s unfinished deliveries with ids above `after`, in id order, at most `limit`: those handed
    /// before and not finished, then those never handed (which are handed now).
    pub async fn pending(&self, sink: &str, after: i64, limit: usize) -> Result<Vec<PendingDelivery>, SpoolError> {
        let from = u64::try_from(after).unwrap_or(0);
        self.call(|reply| Op::Pending { sink: sink.to_owned(), from, limit, reply }).await
    }

    /// Subscribes to `sink`'s deliveries from now on (replacing an earlier subscription). The feed starts
    /// lagged: read [`Spool::pending`] first.
    pub fn subscribe(&self, sink: &str, capacity: usize) -> Feed {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let lagged = Arc::new(std::sync::atomic::AtomicBool::new(true));
        if let Ok(mut feeds) = self.feeds.lock() {
            feeds.insert(sink.to_owned(), FeedSender { tx, lagged: Arc::clone(&lagged) });
        }
        Feed { rx, lagged, wake: Arc::default() }
    }

    /// Reports the answer to the webhook of event `seq` (as [`super::super::Store::answered`]).
    pub fn answered(&self, seq: i64, hash: i64, certain: bool) {
        let Some(seq) = log_seq(seq) else { return };
        if let Ok(mut marks) = self.marks.lock() {
            marks.push((seq, hash, certain));
        }
        if !certain {
            // Written now, not at the next insert.
            let _ = self.tx.try_send(Op::Answers);
        }
    }

    /// A durable write of its own (readiness).
    pub async fn ping(&self) -> Result<(), SpoolError> {
        self.call(|reply| Op::Ping { reply }).await
    }

    /// The events of those of `ids` that `sink` has outstanding (handed and not finished), to move to the
    /// cold path; a delivery already finished is left out.
    pub async fn outstanding(&self, sink: &str, ids: &[i64]) -> Result<Vec<Outstanding>, SpoolError> {
        let seqs = ids.iter().filter_map(|id| log_seq(*id)).collect();
        self.call(|reply| Op::Outstanding { sink: sink.to_owned(), seqs, reply }).await
    }

    /// Per sink, the receive time of the oldest event it is not done with.
    pub async fn oldest(&self) -> Result<Vec<(String, i64)>, SpoolError> {
        self.call(|reply| Op::Oldest { reply }).await
    }

    /// Deletes the oldest segments that hold only events received before `before_ms` that every sink is
    /// done with; the number of events deleted.
    pub async fn prune(&self, before_ms: i64) -> Result<u64, SpoolError> {
        self.call(|reply| Op::Prune { before_ms, reply }).await
    }

    /// Commits everything queued before this call, then stops the thread (later calls get
    /// [`SpoolError::Closed`]).
    pub async fn shutdown(&self) {
        let _ = self.call(|reply| Op::Shutdown { reply }).await;
    }

    /// True once the thread has stopped.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// The thread's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Exact counts of what is pending in the log (and stored unrouted).
    pub fn gauges(&self) -> &SpoolGauges {
        &self.gauges
    }

    /// Completes when a commit failed, with the error (nothing more is written).
    pub async fn failed(&self) -> String {
        let mut rx = self.failure.subscribe();
        match rx.wait_for(Option::is_some).await.ok().and_then(|v| v.clone()) {
            Some(e) => e,
            None => std::future::pending().await,
        }
    }
}

/// An event staged by the current batch.
struct Staged {
    seq: u64,
    event: Arc<Event>,
    sinks: Vec<String>,
    replay: bool,
}

/// Who waits for what an operation of the batch did.
enum Waiter {
    Inserted(Reply<Inserted>, Result<Inserted, SpoolError>),
    Unit(Reply<()>, Result<(), SpoolError>),
}

/// A read served after the batch's commit (it must see the batch).
enum Read {
    Pending(String, u64, usize, Reply<Vec<PendingDelivery>>),
    Outstanding(String, Vec<u64>, Reply<Vec<Outstanding>>),
    Oldest(Reply<Vec<(String, i64)>>),
    Prune(i64, Reply<u64>),
    Events(Vec<u64>, Reply<Vec<Option<Event>>>),
}

struct Thread<D: Disk> {
    log: Log<D>,
    /// The events from before the log, for dedup.
    earlier: Option<Box<dyn Earlier>>,
    recent: RecentKeys,
    /// The dedup window as the last insert gave it (`None`: no insert yet, nothing to forget).
    window_ms: Option<i64>,
    /// Events with a sink not done: seq -> (sinks not done, body bytes).
    remaining: BTreeMap<u64, (u32, u32)>,
    /// The sums over `remaining`: (sinks not done, body bytes).
    totals: (u64, u64),
    stats: Arc<Stats>,
    feeds: Feeds,
    marks: Marks,
    gauges: Arc<SpoolGauges>,
    failure: Arc<watch::Sender<Option<String>>>,
    /// Asked to stop after this batch.
    closing: bool,
}

impl<D: Disk> Thread<D> {
    fn new(log: Log<D>, earlier: Option<Box<dyn Earlier>>, spool: &Spool) -> Self {
        let mut t = Thread {
            log,
            earlier,
            recent: RecentKeys::new(),
            window_ms: None,
            remaining: BTreeMap::new(),
            totals: (0, 0),
            stats: Arc::clone(&spool.stats),
            feeds: Arc::clone(&spool.feeds),
            marks: Arc::clone(&spool.marks),
            gauges: Arc::clone(&spool.gauges),
            failure: Arc::clone(&spool.failure),
            closing: false,
        };
        t.count();
        t
    }

    /// Counts what is pending from the log (at open): every event routed to a sink that is not done with it.
    fn count(&mut self) {
        let mut names: Vec<String> = self.log.sink_ids().to_vec();
        for name in self.log.sinks().keys() {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        for name in names {
            let (taken, outstanding) = self
                .log
                .sinks()
                .get(&name)
                .map_or((0, Vec::new()), |s| (s.taken, s.outstanding.iter().copied().collect()));
            let fresh = match self.log.routed_to(&name, taken, usize::MAX) {
                Ok((seqs, _)) => seqs,
                Err(e) => {
                    tracing::error!(sink = %name, error = %e, "cannot count the spool log's pending deliveries");
                    Vec::new()
                }
            };
            for seq in outstanding.into_iter().chain(fresh) {
                if let Some(held) = self.log.held_event(seq) {
                    let entry = self.remaining.entry(seq).or_insert_with(|| {
                        self.totals.1 += u64::from(held.body_len);
                        (0, held.body_len)
                    });
                    entry.0 += 1;
                    self.totals.0 += 1;
                }
            }
        }
        self.recount_unrouted();
        self.publish();
    }

    /// Counts what the log holds unrouted (at open, and after a prune).
    fn recount_unrouted(&self) {
        let (mut unrouted, mut unrouted_bytes) = (0u64, 0u64);
        for h in self.log.held_events().filter(|h| !h.routed) {
            unrouted += 1;
            unrouted_bytes += u64::from(h.body_len);
        }
        self.gauges.unrouted_events.store(unrouted, Ordering::Relaxed);
        self.gauges.unrouted_bytes.store(unrouted_bytes, Ordering::Relaxed);
    }

    /// Publishes the pending counts (kept as running totals: a commit costs nothing per event pending).
    fn publish(&self) {
        self.gauges.pending_events.store(self.remaining.len() as u64, Ordering::Relaxed);
        self.gauges.pending_bytes.store(self.totals.1, Ordering::Relaxed);
        self.gauges.pending_deliveries.store(self.totals.0, Ordering::Relaxed);
    }

    fn run(mut self, mut rx: mpsc::Receiver<Op>, max_batch: usize, mut answers: Answers<Settle>) -> Log<D> {
        let mut batch: Vec<Op> = Vec::with_capacity(max_batch);
        while let Some(first) = rx.blocking_recv() {
            batch.push(first);
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            let reads = self.commit_batch(&mut batch, &mut answers);
            answers.flush();
            for read in reads {
                match read {
                    Read::Pending(sink, from, limit, reply) => {
                        let _ = reply.send(self.pending(&sink, from, limit));
                    }
                    Read::Outstanding(sink, seqs, reply) => {
                        let _ = reply.send(self.outstanding(&sink, &seqs));
                    }
                    Read::Oldest(reply) => {
                        let _ = reply.send(Ok(self.oldest()));
                    }
                    Read::Prune(before_ms, reply) => {
                        let _ = reply.send(self.prune(before_ms));
                    }
                    Read::Events(seqs, reply) => {
                        let read = seqs.iter().map(|s| Ok(self.log.read(*s)?.map(|l| l.event.0))).collect();
                        let _ = reply.send(read);
                    }
                }
            }
            if self.closing {
                break;
            }
        }
        // Every handle is gone, or a shutdown was asked for: give the log back.
        self.log
    }

    /// Applies a batch, commits it, answers and feeds; returns the reads to serve after it.
    fn commit_batch(&mut self, batch: &mut Vec<Op>, answers: &mut Answers<Settle>) -> Vec<Read> {
        // Before the inserts: an answer reported before a copy arrived decides whether the copy is a retry.
        self.take_answers();
        let first_seq = self.log.next_seq();
        let now = now_ms();
        let mut staged: Vec<Staged> = Vec::new();
        let mut waiters: Vec<Waiter> = Vec::with_capacity(batch.len());
        let mut reads = Vec::new();
        let mut finished_any = false;
        for op in batch.drain(..) {
            match op {
                Op::Insert { event, sinks, dedup, replay, reply } => {
                    if let Some(since) = dedup.since_ms() {
                        self.window_ms = Some((now - since).max(0));
                    }
                    let r = if replay {
                        self.append_replay(event, sinks, &mut staged)
                    } else {
                        self.insert(event, sinks, &dedup, first_seq, &mut staged)
                    };
                    waiters.push(Waiter::Inserted(reply, r));
                }
                Op::Finished { sink, seqs, reply } => {
                    self.finish(&sink, &seqs);
                    finished_any = true;
                    waiters.push(Waiter::Unit(reply, Ok(())));
                }
                Op::Pending { sink, from, limit, reply } => reads.push(Read::Pending(sink, from, limit, reply)),
                Op::Outstanding { sink, seqs, reply } => reads.push(Read::Outstanding(sink, seqs, reply)),
                Op::Oldest { reply } => reads.push(Read::Oldest(reply)),
                Op::Prune { before_ms, reply } => reads.push(Read::Prune(before_ms, reply)),
                Op::Read { seqs, reply } => reads.push(Read::Events(seqs, reply)),
                Op::Shutdown { reply } => {
                    self.closing = true;
                    waiters.push(Waiter::Unit(reply, Ok(())));
                }
                Op::Answers => {}
                Op::Ping { reply } => {
                    self.log.heartbeat();
                    waiters.push(Waiter::Unit(reply, Ok(())));
                }
            }
        }
        let committed = self.log.commit();
        match &committed {
            Ok(_) => {
                self.stats.commits.fetch_add(1, Ordering::Relaxed);
                self.stats.events.fetch_add(staged.len() as u64, Ordering::Relaxed);
                self.recent.commit(self.window_ms.map_or(i64::MIN, |w| now - w));
                for s in &staged {
                    if s.sinks.is_empty() {
                        self.gauges.unrouted_events.fetch_add(1, Ordering::Relaxed);
                        self.gauges.unrouted_bytes.fetch_add(s.event.body.len() as u64, Ordering::Relaxed);
                    } else {
                        self.remaining.insert(s.seq, (s.sinks.len() as u32, s.event.body.len() as u32));
                        self.totals.0 += s.sinks.len() as u64;
                        self.totals.1 += s.event.body.len() as u64;
                    }
                }
                if !staged.is_empty() || finished_any {
                    self.publish();
                }
            }
            Err(e @ LogError::Full { .. }) => {
                self.recent.discard();
                static FULL: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::REPEATED_ERROR_LOG);
                if let Some(held_back) = FULL.due(std::time::Instant::now()) {
                    tracing::error!(error = %e, held_back, "spool log commit refused: no room on the disk");
                }
            }
            Err(e) => {
                self.recent.discard();
                tracing::error!(error = %e, "spool log commit failed; nothing more is accepted until a restart");
                self.failure.send_replace(Some(e.to_string()));
            }
        }
        let failed = committed.as_ref().err().map(|e| match e {
            LogError::Full { .. } => SpoolError::Full(e.to_string()),
            _ => SpoolError::Failed(e.to_string()),
        });
        for w in waiters {
            answers.push(match (w, &failed) {
                (Waiter::Inserted(reply, r), None) => Settle::Inserted(reply, r),
                (Waiter::Inserted(reply, Err(e)), Some(_)) => Settle::Inserted(reply, Err(e)),
                (Waiter::Inserted(reply, Ok(_)), Some(e)) => Settle::Inserted(reply, Err(e.clone())),
                (Waiter::Unit(reply, r), None) => Settle::Unit(reply, r),
                (Waiter::Unit(reply, _), Some(e)) => Settle::Unit(reply, Err(e.clone())),
            });
        }
        if failed.is_none() {
            self.feed(first_seq, &staged);
        }
        reads
    }

    /// Dedups and stages one insert.
    fn insert(
        &mut self,
        event: Event,
        sinks: Vec<String>,
        dedup: &Dedup,
        first_seq: u64,
        staged: &mut Vec<Staged>,
    ) -> Result<Inserted, SpoolError> {
        let hash = dedup_hash(&event.dedup_key);
        let (log, earlier) = (&self.log, &mut self.earlier);
        let load = |since, until| -> Result<Vec<Known>, SpoolError> {
            let mut known: Vec<Known> = log
                .received_between(since, until)
                .into_iter()
                .map(|h| Known {
                    seq: h.seq as i64,
                    hash: h.dedup_hash as i64,
                    received_at_ms: h.received_at_ms,
                    uncertain: log.is_uncertain(h.seq),
                })
                .collect();
            // Older than everything in the log: still newest first. An answer to one of them reported since
            // the takeover is in the log's ANSWER frames, until the first prune.
            if let Some(earlier) = earlier {
                let before = earlier.received_between(since, until).map_err(SpoolError::Earlier)?;
                known.extend(
                    before
                        .into_iter()
                        .map(|k| Known { uncertain: log.answer_recorded(k.seq as u64).unwrap_or(k.uncertain), ..k }),
                );
            }
            Ok(known)
        };
        for candidate in self.recent.candidates(load, hash, dedup)? {
            let seq = candidate as u64;
            // A hash is confirmed against the event itself: staged by this batch, or read back.
            let original = if seq >= first_seq {
                staged
                    .iter()
                    .find(|s| s.seq == seq)
                    .map(|s| (s.event.dedup_key.clone(), s.event.source.clone(), s.event.id.clone()))
            } else if let Some(l) = self.log.read(seq)? {
                Some((l.event.0.dedup_key, l.event.0.source, l.event.0.id))
            } else if let Some(earlier) = &mut self.earlier {
                // Not in the log: from before it.
                let found = earlier.find(seq, &event.dedup_key, &event.source).map_err(SpoolError::Earlier)?;
                found.map(|id| (event.dedup_key.clone(), event.source.clone(), id))
            } else {
                None
            };
            if let Some((key, source, id)) = original
                && key == event.dedup_key
                && source == event.source
            {
                return Ok(Inserted::Duplicate { original: id, seq: public_seq(seq) });
            }
        }
        let seq = self.log.append(&event, &sinks, hash as u64, 0)?;
        self.recent.stage(hash, seq as i64, event.received_at_ms);
        staged.push(Staged { seq, event: Arc::new(event), sinks, replay: false });
        Ok(Inserted::New { seq: public_seq(seq) })
    }

    /// Stages a replay: not deduped, not a dedup candidate (hash 0), marked.
    fn append_replay(
        &mut self,
        event: Event,
        sinks: Vec<String>,
        staged: &mut Vec<Staged>,
    ) -> Result<Inserted, SpoolError> {
        let seq = self.log.append(&event, &sinks, 0, super::frame::FLAG_REPLAY)?;
        staged.push(Staged { seq, event: Arc::new(event), sinks, replay: true });
        Ok(Inserted::New { seq: public_seq(seq) })
    }

    /// A sink finished these seqs: those it had outstanding are done.
    fn finish(&mut self, sink: &str, seqs: &[u64]) {
        let Some(state) = self.log.sinks().get(sink) else { return };
        let done: Vec<u64> = seqs.iter().copied().filter(|s| state.outstanding.contains(s)).collect();
        for seq in &done {
            if let std::collections::btree_map::Entry::Occupied(mut e) = self.remaining.entry(*seq) {
                e.get_mut().0 = e.get().0.saturating_sub(1);
                self.totals.0 = self.totals.0.saturating_sub(1);
                if e.get().0 == 0 {
                    self.totals.1 = self.totals.1.saturating_sub(u64::from(e.remove().1));
                }
            }
        }
        self.log.finished(sink, &done);
    }

    /// Applies the answers reported since the last batch to the dedup index; one that turned uncertain (or
    /// certain again) is written with this batch's commit.
    fn take_answers(&mut self) {
        let marks = match self.marks.lock() {
            Ok(mut m) if !m.is_empty() => std::mem::take(&mut *m),
            _ => return,
        };
        for (seq, hash, certain) in marks {
            let now = if certain { Answer::Certain } else { Answer::Uncertain };
            let Some(before) = self.recent.set_answer(hash, seq as i64, now) else { continue };
            if before != Answer::Certain && (before == Answer::Uncertain) != (now == Answer::Uncertain) {
                self.log.answer(seq, now == Answer::Uncertain);
            }
        }
    }

    /// Pushes the commit's events onto the feeds of the sinks that had everything before it handed; a full
    /// feed is marked lagged, and its sink is handed nothing more until [`Spool::pending`] catches up.
    fn feed(&mut self, first_seq: u64, staged: &[Staged]) {
        let durable = self.log.durable_seq();
        let Ok(feeds) = self.feeds.lock() else { return };
        for (name, f) in feeds.iter() {
            let taken = self.log.sinks().get(name).map_or(0, |s| s.taken);
            if taken < first_seq || f.lagged.load(Ordering::Acquire) || taken >= durable {
                continue;
            }
            let mut upto = durable;
            let mut pushed = Vec::new();
            for s in staged.iter().filter(|s| s.seq >= taken && s.sinks.iter().any(|k| k == name)) {
                let item = delivery(s.seq, Arc::clone(&s.event), s.replay);
                if f.tx.try_send(item).is_err() {
                    f.lagged.store(true, Ordering::Release);
                    upto = s.seq;
                    break;
                }
                pushed.push(s.seq);
            }
            self.log.taken(name, upto, pushed);
        }
    }

    /// `sink`'s unfinished events with log seq at or above `from`: outstanding ones, then fresh ones (handed
    /// now), at most `limit` in all.
    fn pending(&mut self, sink: &str, from: u64, limit: usize) -> Result<Vec<PendingDelivery>, SpoolError> {
        let (taken, outstanding): (u64, Vec<u64>) = self
            .log
            .sinks()
            .get(sink)
            .map_or((0, Vec::new()), |s| (s.taken, s.outstanding.range(from..).copied().take(limit).collect()));
        // The walk starts where the sink's handing stopped, so that `taken` passes over nothing unhanded (a
        // dispatcher's cursor is never above it: it only holds what it was handed).
        let room = limit - outstanding.len();
        let (fresh, reached) = if room > 0 { self.log.routed_to(sink, taken, room)? } else { (Vec::new(), taken) };
        if reached > taken {
            self.log.taken(sink, reached, fresh.iter().copied());
        }
        let mut out = Vec::with_capacity(outstanding.len() + fresh.len());
        for seq in outstanding.into_iter().chain(fresh) {
            match self.log.read(seq)? {
                Some(logged) => out.push(delivery(seq, Arc::new(logged.event.0), logged.replay)),
                None => tracing::error!(sink, seq, "a pending event is missing from the spool log"),
            }
        }
        Ok(out)
    }
}

impl<D: Disk> Thread<D> {
    /// The events of those of `seqs` that `sink` has outstanding.
    fn outstanding(&self, sink: &str, seqs: &[u64]) -> Result<Vec<Outstanding>, SpoolError> {
        let Some(state) = self.log.sinks().get(sink) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for seq in seqs.iter().filter(|s| state.outstanding.contains(s)) {
            if let Some(logged) = self.log.read(*seq)? {
                out.push((public_seq(*seq), Arc::new(logged.event.0), logged.replay));
            }
        }
        Ok(out)
    }

    /// Per sink, the receive time of the oldest event it is not done with.
    fn oldest(&self) -> Vec<(String, i64)> {
        let mut out = Vec::new();
        for name in self.log.sink_ids().iter().chain(self.log.sinks().keys()) {
            if out.iter().any(|(n, _)| n == name) {
                continue;
            }
            let state = self.log.sinks().get(name);
            let first_out = state.and_then(|s| s.outstanding.first().copied());
            let taken = state.map_or(0, |s| s.taken);
            let first_fresh = self.log.routed_to(name, taken, 1).ok().and_then(|(seqs, _)| seqs.first().copied());
            let oldest = [first_out, first_fresh].into_iter().flatten().min();
            if let Some(at) = oldest.and_then(|seq| self.log.held_event(seq)).map(|h| h.received_at_ms) {
                out.push((name.clone(), at));
            }
        }
        out
    }

    /// Deletes what retention and every sink let go; recounts what is stored unrouted.
    fn prune(&mut self, before_ms: i64) -> Result<u64, SpoolError> {
        let (segments, events) = self.log.prune(before_ms)?;
        if segments > 0 {
            self.recount_unrouted();
            tracing::debug!(segments, events, "pruned the spool log");
        }
        Ok(events)
    }
}

/// A delivery of log seq `seq`.
fn delivery(seq: u64, event: Arc<Event>, replay: bool) -> PendingDelivery {
    let created_at_ms = event.received_at_ms;
    PendingDelivery {
        id: public_seq(seq),
        seq: public_seq(seq),
        attempts: 0,
        replay,
        event,
        created_at_ms,
        next_attempt_ms: None,
    }
}

#[cfg(test)]
mod tests;
