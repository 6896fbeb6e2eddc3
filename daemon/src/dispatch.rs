//! Dispatch: one task per sink starts its deliveries in delivery-id order (= receive order, then replays)
//! and runs at most `max_in_flight` at once. Deliveries come from the spool writer's feed as they are
//! committed (no read back); at start-up, when the feed overflowed, and every [`DISPATCH_POLL`] (for
//! replays and dead-letter retries made by an operator), the dispatcher reads the spool from its cursor.
//!
//! Ordering: deliveries with the same ordering key (the entity an event is about) run one at a time, in
//! order, across retries; a delivery whose key is busy waits (holding its slot) while other keys go on.
//! A delivery is retried with exponential backoff and full jitter until it succeeds, fails permanently, or
//! exhausts the sink's policy (`max_age`, `max_attempts`); the last two make it a dead letter.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RetryPolicy;
use crate::event::now_ms;
use crate::limits::DISPATCH_POLL;
use crate::metrics::Metrics;
use crate::sinks::{Sink, SinkError};
use crate::store::{Attempt, Feed, Outcome, PendingDelivery, Store};

/// Deliveries read from the spool per query at most.
const FETCH_MAX: usize = 256;
/// How long a finished replay is remembered (longer than any spool scan takes).
const REPLAY_MEMORY: Duration = Duration::from_secs(30);

/// A delivery task's end, reported to the dispatcher loop.
struct Done {
    key: Option<String>,
    id: i64,
    replay: bool,
}

/// Sends [`Done`] when dropped (also when the task panics), then releases the slot.
struct DoneGuard {
    tx: mpsc::UnboundedSender<Done>,
    done: Option<Done>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for DoneGuard {
    fn drop(&mut self) {
        if let Some(d) = self.done.take() {
            let _ = self.tx.send(d);
        }
    }
}

/// Everything one sink's dispatcher needs.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// Sink id.
    pub sink_id: String,
    /// The sink.
    pub sink: Arc<dyn Sink>,
    /// The spool.
    pub store: Store,
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Backoff and give-up policy.
    pub retry: RetryPolicy,
    /// Telemetry.
    pub metrics: Metrics,
}

/// Where the next delivery comes from.
struct Source {
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

type Parked = VecDeque<(PendingDelivery, OwnedSemaphorePermit)>;

impl Dispatcher {
    /// Runs until `cancel`, then waits for the deliveries in flight (their backoff sleeps end at once; a sink
    /// call in progress is awaited, bounded by the sink's own timeout and the caller's shutdown deadline).
    pub async fn run(self, feed: Feed, cancel: CancellationToken) {
        let this = Arc::new(self);
        // A sink with a connection opens it now, beside the first deliveries.
        let sink = Arc::clone(&this.sink);
        let starting = tokio::spawn(async move { sink.start().await });
        let slots = Arc::new(Semaphore::new(this.max_in_flight));
        let tracker = TaskTracker::new();
        let mut poll = tokio::time::interval(DISPATCH_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut src = Source {
            feed,
            backlog: VecDeque::new(),
            replays: VecDeque::new(),
            taken_replays: HashMap::new(),
            scanning: true,
            cursor: 0,
            poll,
        };
        // Ordering keys with a delivery in flight, and the deliveries waiting behind it.
        let mut busy: HashMap<String, Parked> = HashMap::new();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(done) = done_rx.recv() => {
                    if done.replay {
                        src.taken_replays.insert(done.id, Some(Instant::now()));
                    }
                    // The delivery in flight for this key finished: start the next one waiting for it.
                    if let Some(key) = done.key {
                        let next = busy.get_mut(&key).and_then(VecDeque::pop_front);
                        match next {
                            Some((row, p)) => this.start(&tracker, row, p, &done_tx, &cancel),
                            None => {
                                busy.remove(&key);
                            }
                        }
                    }
                }
                p = Arc::clone(&slots).acquire_owned(), if permit.is_none() => match p {
                    Ok(p) => permit = Some(p),
                    Err(_) => break,
                },
                row = this.next(&mut src, &cancel), if permit.is_some() => {
                    let Some(row) = row else { break };
                    src.cursor = src.cursor.max(row.id);
                    if row.replay {
                        src.taken_replays.insert(row.id, None);
                    }
                    let Some(p) = permit.take() else { continue };
                    match row.event.ordering_key.clone() {
                        Some(key) => match busy.get_mut(&key) {
                            Some(waiting) => waiting.push_back((row, p)),
                            None => {
                                busy.insert(key, VecDeque::new());
                                this.start(&tracker, row, p, &done_tx, &cancel);
                            }
                        },
                        None => this.start(&tracker, row, p, &done_tx, &cancel),
                    }
                }
            }
        }
        starting.abort();
        tracker.close();
        tracker.wait().await;
    }

    fn start(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        row: PendingDelivery,
        permit: OwnedSemaphorePermit,
        done: &mpsc::UnboundedSender<Done>,
        cancel: &CancellationToken,
    ) {
        let (this, cancel) = (Arc::clone(self), cancel.clone());
        // Reports the end to the dispatcher even if the delivery panics, so its ordering key is released.
        let guard = DoneGuard {
            tx: done.clone(),
            done: Some(Done { key: row.event.ordering_key.clone(), id: row.id, replay: row.replay }),
            _permit: permit,
        };
        tracker.spawn(async move {
            this.deliver(row, &cancel).await;
            drop(guard);
        });
    }

    /// The next delivery to take, in id order; `None` when cancelled. Cancel-safe: state changes only
    /// right before it returns or right after an await that completed.
    async fn next(&self, src: &mut Source, cancel: &CancellationToken) -> Option<PendingDelivery> {
        loop {
            if src.feed.lagged.swap(false, Ordering::AcqRel) {
                // The feed dropped something: the spool is the truth from the cursor on.
                src.scanning = true;
                src.backlog.clear();
            }
            if let Some(row) = src.replays.pop_front() {
                return Some(row);
            }
            if let Some(row) = src.backlog.pop_front() {
                if row.id > src.cursor {
                    return Some(row);
                }
                continue;
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

    async fn deliver(&self, row: PendingDelivery, cancel: &CancellationToken) {
        let mut attempts = row.attempts;
        loop {
            attempts = attempts.saturating_add(1);
            let started_at_ms = now_ms();
            let started = Instant::now();
            let result = self.sink.deliver(&row.event).await;
            let seconds = started.elapsed().as_secs_f64();
            let attempt = Attempt {
                started_at_ms,
                duration_ms: started.elapsed().as_millis() as i64,
                status: result.as_ref().err().and_then(SinkError::status),
            };
            // Counted once recorded, so that the metrics never run ahead of the spool.
            let (outcome, delay, counted) = match result {
                Ok(()) => (Outcome::Delivered, None, "delivered"),
                Err(SinkError::Permanent { message, .. }) => {
                    tracing::warn!(sink = %self.sink_id, event = %row.event.id, attempts, error = %message, "delivery failed permanently; dead-lettered");
                    (Outcome::Dead(message), None, "dead")
                }
                Err(SinkError::Retryable { message, retry_after, .. }) => {
                    // A peer's Retry-After is honoured, but never beyond the policy's horizon.
                    let hint = retry_after.unwrap_or_default().min(self.retry.max_age);
                    let delay = backoff(&self.retry, attempts).max(hint);
                    // Age counts from the delivery's creation: a replay of an old event gets its own horizon.
                    let age = Duration::from_millis(u64::try_from(now_ms() - row.created_at_ms).unwrap_or(0));
                    let too_old = age.saturating_add(delay) > self.retry.max_age;
                    let too_many = self.retry.max_attempts.is_some_and(|max| attempts >= max);
                    if too_old || too_many {
                        let why = if too_many { format!("{attempts} attempts") } else { "max_age".to_owned() };
                        tracing::warn!(sink = %self.sink_id, event = %row.event.id, attempts, error = %message, "retries exhausted; dead-lettered");
                        (Outcome::Dead(format!("{message} (gave up: {why})")), None, "dead")
                    } else {
                        tracing::info!(sink = %self.sink_id, event = %row.event.id, attempts, error = %message, retry_in = ?delay, "delivery failed; will retry");
                        let next_attempt_ms = now_ms() + delay.as_millis() as i64;
                        (Outcome::Retry { next_attempt_ms, error: message }, Some(delay), "retry")
                    }
                }
            };
            if !self.record(&row, attempts, outcome, attempt, cancel).await {
                return;
            }
            self.metrics.delivery(&self.sink_id, counted, seconds);
            if counted == "delivered" && !row.replay {
                let since = (now_ms() - row.event.received_at_ms).max(0) as f64 / 1000.0;
                self.metrics.event_latency(&self.sink_id, since);
            }
            let Some(delay) = delay else { return };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Records an outcome, retrying while the store refuses (a full disk, a lock). Returns false when
    /// cancelled first: the delivery is then still pending in the spool and is attempted again at the next
    /// start (a duplicate at worst, never a loss).
    async fn record(
        &self,
        row: &PendingDelivery,
        attempts: u32,
        outcome: Outcome,
        attempt: Attempt,
        cancel: &CancellationToken,
    ) -> bool {
        let mut wait = self.retry.initial_backoff;
        loop {
            match self.store.record(row.id, attempts, outcome.clone(), attempt.clone()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(sink = %self.sink_id, event = %row.event.id, error = %e, "cannot record delivery outcome; will try again");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(self.retry.max_backoff);
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max_backoff, initial * 2^(attempt-1))]`, but
/// at least 10 ms so that a failing peer is never hammered.
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(31);
    let ceiling = policy.initial_backoff.saturating_mul(1u32 << exp).min(policy.max_backoff);
    let floor = Duration::from_millis(10).min(ceiling);
    let ms = rand::rng().random_range(floor.as_millis() as u64..=ceiling.as_millis().max(floor.as_millis()) as u64);
    Duration::from_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            max_age: Duration::from_secs(3600),
            max_attempts: None,
        };
        for attempt in 1..40 {
            let d = backoff(&p, attempt);
            assert!(d >= Duration::from_millis(10), "{attempt}: {d:?}");
            let cap = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(Duration::from_secs(60));
            assert!(d <= cap, "{attempt}: {d:?} > {cap:?}");
        }
    }
}

#[cfg(test)]
mod store_tests {
    use super::*;
    use crate::event::Event;
    use crate::sinks::BoxFuture;
    use crate::store::Operator;
    use std::sync::Mutex;

    /// Records what it is given; the unit under test is the dispatcher, not a sink.
    #[derive(Debug, Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl Sink for Recorder {
        fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move {
                self.0.lock().unwrap().push(event.id.clone());
                Ok(())
            })
        }
    }

    fn event(id: String, ordering_key: Option<String>) -> Event {
        Event {
            dedup_key: id.clone(),
            id,
            source: "s".into(),
            event_type: "E".into(),
            received_at_ms: now_ms(),
            headers: vec![],
            body: bytes::Bytes::from_static(b"{}"),
            ordering_key,
        }
    }

    fn dispatcher(store: &Store, sink: &Arc<Recorder>, max_in_flight: usize) -> Dispatcher {
        Dispatcher {
            sink_id: "r".into(),
            sink: sink.clone(),
            store: store.clone(),
            max_in_flight,
            retry: RetryPolicy {
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(10),
                max_age: Duration::from_secs(60),
                max_attempts: None,
            },
            metrics: Metrics::new().unwrap(),
        }
    }

    async fn wait_for(sink: &Recorder, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while sink.0.lock().unwrap().len() < n {
            assert!(Instant::now() < deadline, "only {:?}", sink.0.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Events spooled before the dispatcher starts, and more than its feed holds while it runs, all arrive
    /// once and in order: the dispatcher falls back to reading the spool when the feed overflows.
    #[tokio::test]
    async fn backlog_and_overflowing_feed_deliver_everything_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ev = |i: usize| event(format!("{i:04}"), Some(format!("entity-{}", i % 7)));
        for i in 0..30 {
            store.insert(ev(i), vec!["r".into()], None).await.unwrap();
        }
        let feed = store.subscribe("r", 2);
        let sink = Arc::new(Recorder::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(dispatcher(&store, &sink, 1).run(feed, cancel.clone()));
        for i in 30..300 {
            store.insert(ev(i), vec!["r".into()], None).await.unwrap();
        }
        wait_for(&sink, 300).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = sink.0.lock().unwrap().clone();
        assert_eq!(got, (0..300).map(|i| format!("{i:04}")).collect::<Vec<_>>());
        assert_eq!(store.gauges().snapshot().2, 0);
        cancel.cancel();
        task.await.unwrap();
        store.close().await;
    }

    /// An operator's replay gets a delivery id below one the daemon commits right after; the dispatcher,
    /// whose cursor has moved past it, still delivers it (and only once).
    #[tokio::test]
    async fn a_replay_committed_behind_the_cursor_is_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let feed = store.subscribe("r", 16);
        let sink = Arc::new(Recorder::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(dispatcher(&store, &sink, 4).run(feed, cancel.clone()));
        store.insert(event("a".into(), None), vec!["r".into()], None).await.unwrap();
        wait_for(&sink, 1).await;
        let mut op = Operator::open(dir.path()).unwrap();
        let seqs = op.replay_targets(Some("a"), 0, 0).unwrap();
        assert_eq!(op.replay(&seqs, None).unwrap(), 1);
        store.insert(event("b".into(), None), vec!["r".into()], None).await.unwrap();
        wait_for(&sink, 3).await;
        tokio::time::sleep(Duration::from_millis(2500)).await; // two more polls: nothing is taken twice
        let mut got = sink.0.lock().unwrap().clone();
        got.sort();
        assert_eq!(got, ["a", "a", "b"]);
        cancel.cancel();
        task.await.unwrap();
        store.close().await;
    }
}
