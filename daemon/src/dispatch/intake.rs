//! Intake: where a dispatcher's next delivery comes from, in id order. The writer's feed while it keeps
//! up; the spool from the cursor at start-up, after the feed overflowed and at every poll; replays and
//! dead-letter retries that an operator's connection committed below the cursor. Nothing at or below the
//! cursor is taken twice, except those replays, which are remembered by id instead.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use super::batch::Done;
use crate::limits::DISPATCH_POLL;
use crate::store::{Feed, PendingDelivery};

/// Deliveries read from the spool per query at most.
const FETCH_MAX: usize = 256;
/// How long a finished replay is remembered (longer than any spool scan takes).
const REPLAY_MEMORY: Duration = Duration::from_secs(30);

/// Where the next delivery comes from.
pub(super) struct Source {
    feed: Feed,
    /// Rows read from the spool, not yet started.
    backlog: VecDeque<PendingDelivery>,
    /// Replays and dead-letter retries found below the cursor (an operator's connection committed them),
    /// not yet started.
    replays: VecDeque<PendingDelivery>,
    /// Replay deliveries taken: `None` while in flight, the finish time after. A finished one is remembered
    /// for a while so that a scan that raced with its outcome does not take it again.
    taken_replays: HashMap<i64, Option<Instant>>,
    /// Reading the spool (start-up, after the feed overflowed, at each poll) rather than the feed.
    scanning: bool,
    /// Highest delivery id taken so far: nothing at or below it is taken again.
    cursor: i64,
    poll: tokio::time::Interval,
}

impl Source {
    /// Starts by reading the spool from the beginning.
    pub(super) fn new(feed: Feed) -> Self {
        let mut poll = tokio::time::interval(DISPATCH_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Source {
            feed,
            backlog: VecDeque::new(),
            replays: VecDeque::new(),
            taken_replays: HashMap::new(),
            scanning: true,
            cursor: 0,
            poll,
        }
    }

    /// A delivery is taken for starting: the cursor moves past it (a replay is remembered instead).
    pub(super) fn took(&mut self, row: &PendingDelivery) {
        self.cursor = self.cursor.max(row.id);
        if row.replay {
            self.taken_replays.insert(row.id, None);
        }
    }

    /// A delivery task ended.
    pub(super) fn finished(&mut self, done: &Done) {
        if done.replay {
            self.taken_replays.insert(done.id, Some(Instant::now()));
        }
    }

    /// The next delivery already queued: a replay found below the cursor, else the backlog's next one
    /// above it.
    fn queued(&mut self) -> Option<PendingDelivery> {
        if let Some(row) = self.replays.pop_front() {
            return Some(row);
        }
        while let Some(row) = self.backlog.pop_front() {
            if row.id > self.cursor {
                return Some(row);
            }
        }
        None
    }

    /// The next delivery if one is ready without waiting (queued replays, the backlog, the feed), in the
    /// same order as [`Dispatcher::next`]; `None` when it would have to wait or read the spool.
    pub(super) fn next_ready(&mut self) -> Option<PendingDelivery> {
        loop {
            if self.feed.lagged.load(Ordering::Acquire) {
                return None;
            }
            if let Some(row) = self.queued() {
                return Some(row);
            }
            if self.scanning {
                return None;
            }
            match self.feed.rx.try_recv() {
                Ok(row) if row.id > self.cursor => return Some(row),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }
}

impl Dispatcher {
    /// The next delivery to take, in id order; `None` when cancelled. Cancel-safe: state changes only
    /// right before it returns or right after an await that completed.
    pub(super) async fn next(&self, src: &mut Source, cancel: &CancellationToken) -> Option<PendingDelivery> {
        loop {
            if src.feed.lagged.swap(false, Ordering::AcqRel) {
                // The feed dropped something: the spool is the truth from the cursor on.
                src.scanning = true;
                src.backlog.clear();
            }
            if let Some(row) = src.queued() {
                return Some(row);
            }
            if src.scanning {
                match self.store.pending(&self.sink_id, src.cursor, FETCH_MAX).await {
                    Ok(rows) if rows.is_empty() => src.scanning = false,
                    Ok(rows) => src.backlog.extend(rows),
                    Err(e) => {
                        tracing::error!(sink = %self.sink_id, error = %e, "cannot read pending deliveries; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return None,
                            _ = tokio::time::sleep(self.retry.initial_backoff) => {}
                        }
                    }
                }
                continue;
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = src.poll.tick() => {
                    src.scanning = true;
                    self.find_replays(src).await;
                }
                // The spool has deliveries the feed does not carry (the cluster backend's claims).
                _ = src.feed.wake.notified() => src.scanning = true,
                item = src.feed.rx.recv() => match item {
                    // Items at or below the cursor were already read from the spool.
                    Some(row) if row.id > src.cursor => src.backlog.push_back(row),
                    Some(_) => {}
                    None => {
                        // The spool writer has stopped: nothing new will come.
                        cancel.cancelled().await;
                        return None;
                    }
                },
            }
        }
    }

    /// Takes replays and dead-letter retries that an operator's connection committed with ids at or below
    /// the cursor (ids are shared with the daemon's writer, so they can land behind deliveries already taken).
    async fn find_replays(&self, src: &mut Source) {
        src.taken_replays.retain(|_, finished| finished.is_none_or(|t| t.elapsed() < REPLAY_MEMORY));
        if src.cursor == 0 {
            return;
        }
        match self.store.pending_replays(&self.sink_id, 0, src.cursor, FETCH_MAX).await {
            Ok(rows) => {
                let queued: Vec<i64> = src.replays.iter().map(|r| r.id).collect();
                src.replays.extend(
                    rows.into_iter().filter(|r| !src.taken_replays.contains_key(&r.id) && !queued.contains(&r.id)),
                );
            }
            Err(e) => tracing::error!(sink = %self.sink_id, error = %e, "cannot read replays"),
        }
    }
}
