//! Slots and batches: a delivery task holds its slot while it waits for its peer (and, while retried, for
//! its next attempt, unless the spool takes retries back: the cluster's does, and hands them out when due); one whose peer answered for good gives the slot on while its outcome is recorded,
//! under the second bound (`recording`). A sink that takes batches gets several deliveries (distinct
//! ordering keys) in one call, their outcomes recorded in one operation; a delivery of a batch to be
//! retried goes on alone.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Dispatcher;
use super::ordering::Slotted;
use super::record::event_of;
use crate::event::now_ms;
use crate::sinks::SinkError;
use crate::store::{Attempt, PendingDelivery, Record};

/// A delivery task's end, reported to the dispatcher loop.
pub(super) struct Done {
    pub key: Option<String>,
    pub id: i64,
    pub replay: bool,
}

/// Sends [`Done`] when dropped (also when the task panics), then releases what it holds.
pub(super) struct DoneGuard {
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

impl Dispatcher {
    /// Starts several deliveries (distinct ordering keys) as one batch of the sink.
    pub(super) fn start_batch(
        self: &Arc<Self>,
        tracker: &TaskTracker,
        ready: Vec<Slotted>,
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

    /// Starts one delivery.
    pub(super) fn start(
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
            let verdict = self.judge(&row, attempts, result);
            let delay = verdict.delay;
            if delay.is_none() && !Self::hand_over(recording, vec![&mut guard], cancel).await {
                return;
            }
            let record = Record {
                delivery_id: row.id,
                attempts,
                outcome: verdict.outcome,
                attempt,
                event: Some(event_of(&row)),
            };
            if !self.record(&row.event.id, vec![record], cancel).await {
                return;
            }
            // Counted once recorded, so that the metrics never run ahead of the spool.
            self.count(&row, verdict.label, seconds);
            let Some(delay) = delay else { return };
            if self.store.takes_retries_back() {
                // The spool hands it out again when due; its slot goes to other deliveries meanwhile.
                return;
            }
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
        let events: Vec<&crate::event::Event> = batch.iter().map(|(row, _)| &*row.event).collect();
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
            let verdict = self.judge(&row, attempts, result);
            let (delay, label) = (verdict.delay, verdict.label);
            records.push(Record {
                delivery_id: row.id,
                attempts,
                outcome: verdict.outcome,
                attempt,
                event: Some(event_of(&row)),
            });
            next.push((row, guard, attempts, delay, label));
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
        for (mut row, guard, attempts, delay, label) in next {
            self.count(&row, label, seconds);
            match delay {
                None => drop(guard),
                Some(_) if self.store.takes_retries_back() => drop(guard),
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
}
