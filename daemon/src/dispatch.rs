//! Dispatch: one task per sink starts its deliveries in delivery-id order (= receive order, then replays)
//! and runs at most `max_in_flight` at once. Deliveries come from the spool writer's feed as they are
//! committed (no read back); at start-up, when the feed overflowed, and every [`DISPATCH_POLL`] (for
//! replays and dead-letter retries made by an operator), the dispatcher reads the spool from its cursor.
//!
//! Ordering: deliveries with the same ordering key (the entity an event is about) run one at a time, in
//! order, across retries; a delivery whose key is busy waits (holding its slot) while other keys go on.
//! A delivery is retried with exponential backoff and full jitter until it succeeds, fails permanently, or
//! exhausts the sink's policy (`max_age`, `max_attempts`); the last two make it a dead letter.
//!
//! Slots: `max_in_flight` bounds deliveries waiting for their peer (and, while retried, for their next
//! attempt). A delivery whose peer has answered for good (delivered, or dead) gives its slot to the next one
//! while its outcome is being recorded; recording has a bound of its own of the same size, so at most twice
//! `max_in_flight` deliveries are held in memory. Its ordering key stays busy until the outcome is recorded.

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
use crate::store::{Attempt, Feed, Outcome, PendingDelivery, Record, Store};

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

/// Sends [`Done`] when dropped (also when the task panics), then releases what it holds.
struct DoneGuard {
    tx: mpsc::UnboundedSender<Done>,
    done: Option<Done>,
    /// The delivery's slot, while it waits for its peer or its next attempt.
    slot: Option<OwnedSemaphorePermit>,
    /// Its place among the outcomes being recorded, once the slot is given back.
    recording: Option<OwnedSemaphorePermit>,
}

impl DoneGuard {
    fn new(tx: &mpsc::UnboundedSender<Done>, row: &PendingDelivery, slot: OwnedSemaphorePermit) -> Self {
        DoneGuard {
            tx: tx.clone(),
            done: Some(Done { key: row.event.ordering_key.clone(), id: row.id, replay: row.replay }),
            slot: Some(slot),
            recording: None,
        }
    }
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
        let recording = Arc::new(Semaphore::new(this.max_in_flight));
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
                            Some((row, p)) => this.start(&tracker, row, p, &done_tx, &recording, &cancel),
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
                    let Some(p) = permit.take() else { continue };
                    let mut ready = Vec::new();
                    ready.extend(admit(&mut src, &mut busy, row, p));
                    // A sink that takes batches gets every delivery that is ready now and has a free slot.
                    let batch_max = this.sink.batch_max();
                    while batch_max > 1 && ready.len() < batch_max {
                        let Ok(p) = Arc::clone(&slots).try_acquire_owned() else { break };
                        let Some(row) = next_ready(&mut src) else { break };
                        ready.extend(admit(&mut src, &mut busy, row, p));
                    }
                    // Deliveries whose next attempt is not due yet (a retry read back after a restart) wait
                        // for it on their own, holding their slot as a retry does.
                    let now = now_ms();
                    let (later, mut ready): (Vec<_>, Vec<_>) =
                        ready.into_iter().partition(|(row, _)| row.next_attempt_ms.is_some_and(|at| at > now));
                    for (row, p) in later {
                        this.start(&tracker, row, p, &done_tx, &recording, &cancel);
                    }
                    match ready.len() {
                        0 => {}
                        1 => {
                            let Some((row, p)) = ready.pop() else { continue };
                            this.start(&tracker, row, p, &done_tx, &recording, &cancel);
                        }
                        _ => this.start_batch(&tracker, ready, &done_tx, &recording, &cancel),
                    }
                }
            }
        }
        starting.abort();
        tracker.close();
        tracker.wait().await;
    }

    /// Starts several deliveries (distinct ordering keys) as one batch of the sink.
    fn start_batch(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        ready: Vec<(PendingDelivery, OwnedSemaphorePermit)>,
        done: &mpsc::UnboundedSender<Done>,
        recording: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) {
        let (this, cancel, recording) = (Arc::clone(self), cancel.clone(), Arc::clone(recording));
        let batch: Vec<(PendingDelivery, DoneGuard)> = ready
            .into_iter()
            .map(|(row, slot)| {
                let guard = DoneGuard::new(done, &row, slot);
                (row, guard)
            })
            .collect();
        tracker.spawn(async move { this.deliver_batch(batch, &recording, &cancel).await });
    }

    fn start(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        row: PendingDelivery,
        slot: OwnedSemaphorePermit,
        done: &mpsc::UnboundedSender<Done>,
        recording: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) {
        let (this, cancel, recording) = (Arc::clone(self), cancel.clone(), Arc::clone(recording));
        // Reports the end to the dispatcher even if the delivery panics, so its ordering key is released.
        let guard = DoneGuard::new(done, &row, slot);
        tracker.spawn(async move { this.deliver(row, guard, &recording, &cancel).await });
    }

    /// Gives the slots of deliveries whose peer has answered for good (`guards`) to the next deliveries, once
    /// there is room to record their outcomes; `false` when cancelled first.
    async fn hand_over(recording: &Arc<Semaphore>, guards: Vec<&mut DoneGuard>, cancel: &CancellationToken) -> bool {
        if guards.is_empty() {
            return true;
        }
        let n = u32::try_from(guards.len()).unwrap_or(u32::MAX);
        let mut permits = tokio::select! {
            _ = cancel.cancelled() => return false,
            p = Arc::clone(recording).acquire_many_owned(n) => match p {
                Ok(p) => p,
                // Never closed; if it were, the slots are simply kept until the outcomes are recorded.
                Err(_) => return true,
            },
        };
        for guard in guards {
            if let Some(one) = permits.split(1) {
                guard.recording = Some(one);
                guard.slot = None;
            }
        }
        true
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
            if let Some(row) = queued(src) {
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

    async fn deliver(
        &self,
        row: PendingDelivery,
        mut guard: DoneGuard,
        recording: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) {
        let mut attempts = row.attempts;
        // A retry read back from the spool waits for its due time, as it would have without the restart.
        if let Some(wait) = row.next_attempt_ms.map(|at| at - now_ms()).filter(|w| *w > 0) {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(wait.unsigned_abs())) => {}
            }
        }
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
            let (outcome, delay, counted) = self.judge(&row, attempts, result);
            if delay.is_none() && !Self::hand_over(recording, vec![&mut guard], cancel).await {
                return;
            }
            let record = Record { delivery_id: row.id, attempts, outcome, attempt, event: Some(event_of(&row)) };
            if !self.record(&row.event.id, vec![record], cancel).await {
                return;
            }
            // Counted once recorded, so that the metrics never run ahead of the spool.
            self.count(&row, counted, seconds);
            let Some(delay) = delay else { return };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// Delivers a batch with one call of the sink and records every outcome in one operation. Each delivery
    /// that finished (delivered or dead) hands its slot on before the record and releases its ordering key
    /// after it; each one to be retried keeps its slot and goes on alone, as [`Dispatcher::deliver`] would,
    /// after its backoff.
    async fn deliver_batch(
        &self,
        batch: Vec<(PendingDelivery, DoneGuard)>,
        recording: &Arc<Semaphore>,
        cancel: &CancellationToken,
    ) {
        let started_at_ms = now_ms();
        let started = Instant::now();
        let events: Vec<&crate::event::Event> = batch.iter().map(|(row, _)| &row.event).collect();
        let mut results = self.sink.deliver_batch(&events).await;
        drop(events);
        // A sink must answer for each event; one that did not is treated as a failure of the rest.
        results.resize_with(batch.len(), || Err(SinkError::retryable("the sink did not answer for this event")));
        let seconds = started.elapsed().as_secs_f64();
        let duration_ms = started.elapsed().as_millis() as i64;
        let mut records = Vec::with_capacity(batch.len());
        let mut next = Vec::with_capacity(batch.len());
        for ((row, guard), result) in batch.into_iter().zip(results) {
            let attempts = row.attempts.saturating_add(1);
            let attempt =
                Attempt { started_at_ms, duration_ms, status: result.as_ref().err().and_then(SinkError::status) };
            let (outcome, delay, counted) = self.judge(&row, attempts, result);
            records.push(Record { delivery_id: row.id, attempts, outcome, attempt, event: Some(event_of(&row)) });
            next.push((row, guard, attempts, delay, counted));
        }
        let finished = next.iter_mut().filter(|(_, _, _, delay, _)| delay.is_none()).map(|(_, guard, ..)| guard);
        if !Self::hand_over(recording, finished.collect(), cancel).await {
            return;
        }
        let first = next.first().map(|(row, ..)| row.event.id.clone()).unwrap_or_default();
        if !self.record(&first, records, cancel).await {
            return;
        }
        let mut retries = Vec::new();
        for (mut row, guard, attempts, delay, counted) in next {
            self.count(&row, counted, seconds);
            match delay {
                None => drop(guard),
                Some(delay) => {
                    row.attempts = attempts;
                    retries.push(async move {
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        self.deliver(row, guard, recording, cancel).await;
                    });
                }
            }
        }
        futures_util::future::join_all(retries).await;
    }

    /// What an attempt's result means for its delivery: the outcome to record, the delay before the next
    /// attempt (if there is one), and the metric label.
    fn judge(
        &self,
        row: &PendingDelivery,
        attempts: u32,
        result: Result<(), SinkError>,
    ) -> (Outcome, Option<Duration>, &'static str) {
        match result {
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
        }
    }

    /// Metrics for a recorded attempt.
    fn count(&self, row: &PendingDelivery, counted: &str, seconds: f64) {
        self.metrics.delivery(&self.sink_id, counted, seconds);
        if counted == "delivered" && !row.replay {
            let since = (now_ms() - row.event.received_at_ms).max(0) as f64 / 1000.0;
            self.metrics.event_latency(&self.sink_id, since);
        }
    }

    /// Records outcomes, retrying while the store refuses (a full disk, a lock). Returns false when
    /// cancelled first: the deliveries are then still pending in the spool and are attempted again at the next
    /// start (a duplicate at worst, never a loss).
    async fn record(&self, event: &str, records: Vec<Record>, cancel: &CancellationToken) -> bool {
        let mut wait = self.retry.initial_backoff;
        loop {
            match self.store.record_all(records.clone()).await {
                Ok(()) => return true,
                Err(e) => {
                    tracing::error!(sink = %self.sink_id, event = %event, deliveries = records.len(), error = %e, "cannot record delivery outcome; will try again");
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

/// A delivery's event as [`Record::event`] wants it: its seq and body length.
fn event_of(row: &PendingDelivery) -> (i64, i64) {
    (row.seq, i64::try_from(row.event.body.len()).unwrap_or(i64::MAX))
}

/// Takes a delivery for starting: moves the cursor, and parks it (returning `None`) if its ordering key has
/// a delivery in flight; otherwise marks the key busy.
fn admit(
    src: &mut Source,
    busy: &mut HashMap<String, Parked>,
    row: PendingDelivery,
    permit: OwnedSemaphorePermit,
) -> Option<(PendingDelivery, OwnedSemaphorePermit)> {
    src.cursor = src.cursor.max(row.id);
    if row.replay {
        src.taken_replays.insert(row.id, None);
    }
    if let Some(key) = row.event.ordering_key.clone() {
        match busy.get_mut(&key) {
            Some(waiting) => {
                waiting.push_back((row, permit));
                return None;
            }
            None => {
                busy.insert(key, VecDeque::new());
            }
        }
    }
    Some((row, permit))
}

/// The next delivery already queued: a replay found below the cursor, else the backlog's next one above it.
fn queued(src: &mut Source) -> Option<PendingDelivery> {
    if let Some(row) = src.replays.pop_front() {
        return Some(row);
    }
    while let Some(row) = src.backlog.pop_front() {
        if row.id > src.cursor {
            return Some(row);
        }
    }
    None
}

/// The next delivery if one is ready without waiting (queued replays, the backlog, the feed), in the same
/// order as [`Dispatcher::next`]; `None` when it would have to wait or read the spool.
fn next_ready(src: &mut Source) -> Option<PendingDelivery> {
    loop {
        if src.feed.lagged.load(Ordering::Acquire) {
            return None;
        }
        if let Some(row) = queued(src) {
            return Some(row);
        }
        if src.scanning {
            return None;
        }
        match src.feed.rx.try_recv() {
            Ok(row) if row.id > src.cursor => return Some(row),
            Ok(_) => continue,
            Err(_) => return None,
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
    use crate::store::{Dedup, Operator};
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
            store.insert(ev(i), vec!["r".into()], Dedup::Off).await.unwrap();
        }
        let feed = store.subscribe("r", 2);
        let sink = Arc::new(Recorder::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(dispatcher(&store, &sink, 1).run(feed, cancel.clone()));
        for i in 30..300 {
            store.insert(ev(i), vec!["r".into()], Dedup::Off).await.unwrap();
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

    /// Takes batches; fails each event listed in `fail_once` (retryable) the first time it sees it.
    #[derive(Debug, Default)]
    struct BatchRecorder {
        delivered: Mutex<Vec<String>>,
        batches: Mutex<Vec<usize>>,
        fail_once: Mutex<std::collections::HashSet<String>>,
    }

    impl Sink for BatchRecorder {
        fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
            Box::pin(async move { self.deliver_batch(&[event]).await.remove(0) })
        }
        fn batch_max(&self) -> usize {
            8
        }
        fn deliver_batch<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
            Box::pin(async move {
                self.batches.lock().unwrap().push(events.len());
                events
                    .iter()
                    .map(|e| {
                        if self.fail_once.lock().unwrap().remove(&e.id) {
                            return Err(SinkError::retryable("not this time"));
                        }
                        self.delivered.lock().unwrap().push(e.id.clone());
                        Ok(())
                    })
                    .collect()
            })
        }
    }

    /// A sink that takes batches gets deliveries of distinct entities together; a delivery of a batch that
    /// fails is retried alone and still holds back the next delivery for its entity; each is delivered once,
    /// in order per entity, and the spool ends with nothing pending.
    #[tokio::test]
    async fn batches_keep_order_per_entity_and_retry_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ev = |i: usize| event(format!("{i:04}"), Some(format!("entity-{}", i % 5)));
        for i in 0..40 {
            store.insert(ev(i), vec!["r".into()], Dedup::Off).await.unwrap();
        }
        let sink = Arc::new(BatchRecorder::default());
        sink.fail_once.lock().unwrap().extend(["0002", "0013", "0030"].map(String::from));
        let mut d = dispatcher(&store, &Arc::new(Recorder::default()), 16);
        d.sink = sink.clone();
        let feed = store.subscribe("r", 1000);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(d.run(feed, cancel.clone()));
        for i in 40..100 {
            store.insert(ev(i), vec!["r".into()], Dedup::Off).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while sink.delivered.lock().unwrap().len() < 100 || store.gauges().snapshot().2 > 0 {
            assert!(Instant::now() < deadline, "delivered {:?}", sink.delivered.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let delivered = sink.delivered.lock().unwrap().clone();
        let mut sorted = delivered.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).map(|i| format!("{i:04}")).collect::<Vec<_>>(), "each exactly once");
        for entity in 0..5 {
            let of: Vec<&String> = delivered.iter().filter(|id| id.parse::<usize>().unwrap() % 5 == entity).collect();
            assert!(of.windows(2).all(|w| w[0] < w[1]), "entity {entity}: {of:?}");
        }
        assert!(sink.batches.lock().unwrap().iter().any(|n| *n > 1), "{:?}", sink.batches.lock().unwrap());
        assert!(sink.batches.lock().unwrap().iter().all(|n| *n <= 5), "at most one per entity");
        cancel.cancel();
        task.await.unwrap();
        store.close().await;
    }

    /// A delivery that its sink has taken gives its slot to the next one while its outcome waits to be
    /// recorded, and no more than `max_in_flight` outcomes wait at once: with one slot and the spool's write
    /// lock held by another connection (so no outcome can be recorded), the sink gets exactly two deliveries;
    /// once the lock goes, everything is delivered and recorded.
    #[tokio::test]
    async fn a_delivered_event_frees_its_slot_while_its_outcome_is_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        for i in 0..5 {
            store.insert(event(format!("{i:04}"), None), vec!["r".into()], Dedup::Off).await.unwrap();
        }
        let blocker = rusqlite::Connection::open(dir.path().join(crate::store::DB_FILE)).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let feed = store.subscribe("r", 16);
        let sink = Arc::new(Recorder::default());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(dispatcher(&store, &sink, 1).run(feed, cancel.clone()));
        wait_for(&sink, 2).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(sink.0.lock().unwrap().len(), 2, "one waits to be recorded, one holds the slot");
        assert_eq!(store.gauges().snapshot().2, 5, "nothing recorded while the lock is held");
        blocker.execute_batch("ROLLBACK").unwrap();
        wait_for(&sink, 5).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while store.gauges().snapshot().2 > 0 {
            assert!(Instant::now() < deadline, "outcomes not recorded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*sink.0.lock().unwrap(), (0..5).map(|i| format!("{i:04}")).collect::<Vec<_>>());
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
        store.insert(event("a".into(), None), vec!["r".into()], Dedup::Off).await.unwrap();
        wait_for(&sink, 1).await;
        let mut op = Operator::open(dir.path()).unwrap();
        let seqs = op.replay_targets(Some("a"), 0, 0).unwrap();
        assert_eq!(op.replay(&seqs, None).unwrap(), 1);
        store.insert(event("b".into(), None), vec!["r".into()], Dedup::Off).await.unwrap();
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
