//! The spool thread: owns the [`Log`] and turns every append waiting in its queue into one commit (group
//! commit), then answers each (through a task on the runtime that spawned it, one hand-over per commit: see
//! `store::acker`). There is no timer and no sleep: a batch is whatever arrived while the previous commit's
//! `fdatasync` ran, so batches grow with the load by themselves.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};

use super::super::acker::Answers;
use super::file::Disk;
use super::{Log, LogError};
use crate::event::Event;

/// Why an append was not made durable.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// The commit failed, or one before it did: the log takes nothing more.
    #[error("spool log failed: {0}")]
    Failed(String),
    /// The event does not fit the log's format.
    #[error("{0}")]
    TooBig(String),
    /// The spool thread has stopped.
    #[error("spool log is not running")]
    Closed,
}

/// Counters of the spool thread.
#[derive(Debug, Default)]
pub struct Stats {
    /// Commits made (each one write and one sync).
    pub commits: AtomicU64,
    /// Events made durable.
    pub events: AtomicU64,
}

/// Where an append's answer goes.
type Reply = oneshot::Sender<Result<u64, AppendError>>;

struct Append {
    event: Event,
    sinks: Vec<String>,
    dedup_hash: u64,
    reply: Reply,
}

/// The handle the async side appends through; the thread stops when every handle is gone.
#[derive(Debug, Clone)]
pub struct Appender {
    tx: mpsc::Sender<Append>,
    stats: Arc<Stats>,
}

impl Appender {
    /// Starts the spool thread over `log`: at most `queue` appends wait, at most `max_batch` go into one
    /// commit. The thread gives the log back when it ends.
    pub fn spawn<D: Disk>(
        log: Log<D>,
        queue: usize,
        max_batch: usize,
    ) -> std::io::Result<(Appender, JoinHandle<Log<D>>)> {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let stats = Arc::new(Stats::default());
        let counters = Arc::clone(&stats);
        let answers = Answers::new();
        let thread = std::thread::Builder::new()
            .name("hookbridge-log".into())
            .spawn(move || run(log, rx, max_batch.max(1), &counters, answers))?;
        Ok((Appender { tx, stats }, thread))
    }

    /// Appends an event and waits until it is durable: its seq.
    pub async fn append(&self, event: Event, sinks: Vec<String>, dedup_hash: u64) -> Result<u64, AppendError> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(Append { event, sinks, dedup_hash, reply }).await.map_err(|_| AppendError::Closed)?;
        answer.await.map_err(|_| AppendError::Closed)?
    }

    /// The thread's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

fn run<D: Disk>(
    mut log: Log<D>,
    mut rx: mpsc::Receiver<Append>,
    max_batch: usize,
    stats: &Stats,
    mut answers: Answers<(Reply, Result<u64, AppendError>)>,
) -> Log<D> {
    let mut batch: Vec<Append> = Vec::with_capacity(max_batch);
    let mut replies: Vec<(Reply, Result<u64, AppendError>)> = Vec::with_capacity(max_batch);
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        for op in batch.drain(..) {
            let staged = log.append(&op.event, &op.sinks, op.dedup_hash, 0).map_err(|e| match e {
                LogError::TooBig(t) => AppendError::TooBig(t.to_string()),
                other => AppendError::Failed(other.to_string()),
            });
            replies.push((op.reply, staged));
        }
        let committed = log.commit();
        if committed.is_ok() {
            stats.commits.fetch_add(1, Ordering::Relaxed);
        }
        for (reply, staged) in replies.drain(..) {
            let answer = match (&committed, staged) {
                (Ok(_), Ok(seq)) => {
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    Ok(seq)
                }
                (_, Err(e)) => Err(e),
                (Err(e), Ok(_)) => Err(AppendError::Failed(e.to_string())),
            };
            answers.push((reply, answer));
        }
        answers.flush();
    }
    log
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::log::Options;
    use crate::store::log::file::SimDisk;
    use bytes::Bytes;

    fn event(n: u64) -> Event {
        Event {
            id: format!("ev-{n}"),
            source: "s".into(),
            event_type: "E".into(),
            received_at_ms: 0,
            headers: vec![],
            body: Bytes::from(format!("{{\"n\":{n}}}")),
            dedup_key: String::new(),
            ordering_key: None,
            body_is_json: false,
        }
    }

    /// Concurrent appends share commits, each gets its own seq, and all are durable when answered; after
    /// a failed sync every append is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_appends_share_commits_and_a_failed_sync_refuses_the_rest() {
        let disk = SimDisk::default();
        // Growing: no spare segment being prepared, whose sync could be the one that fails.
        let grow = Options { prealloc: crate::store::log::file::Prealloc::Grow, ..Options::default() };
        let (log, _) = Log::open(disk.clone(), "/d/log".as_ref(), [1; 16], grow).unwrap();
        let (appender, thread) = Appender::spawn(log, 256, 64).unwrap();
        let tasks: Vec<_> = (0..200)
            .map(|n| {
                let a = appender.clone();
                tokio::spawn(async move { a.append(event(n), vec!["s".into()], 0).await })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap());
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (0..200).collect::<Vec<_>>());
        let commits = appender.stats().commits.load(Ordering::Relaxed);
        assert!(commits < 200, "{commits} commits for 200 concurrent appends");
        disk.fail_syncs(1);
        assert!(matches!(appender.append(event(200), vec![], 0).await, Err(AppendError::Failed(_))));
        assert!(matches!(appender.append(event(201), vec![], 0).await, Err(AppendError::Failed(_))));
        drop(appender);
        let log = tokio::task::spawn_blocking(move || thread.join().unwrap()).await.unwrap();
        assert_eq!(log.durable_seq(), 200);
    }
}
