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
//! attempt; on a spool that takes retries back, the cluster's, a retry leaves instead and is claimed again
//! when due, so failing deliveries hold slots only while their attempts run). A delivery whose peer has answered for good (delivered, or dead) gives its slot to the next one
//! while its outcome is being recorded; recording has a bound of its own of the same size, so at most twice
//! `max_in_flight` deliveries are held in memory. Its ordering key stays busy until the outcome is recorded.
//!
//! The parts: this file is the loop; `intake.rs` where the next delivery comes from (feed, spool scans,
//! replays below the cursor); `ordering.rs` the busy ordering keys and the deliveries parked behind them;
//! `batch.rs` slots, single deliveries and batches; `verdict.rs` the pure retry verdict; `record.rs`
//! recording outcomes and counting them.
//!
//! [`DISPATCH_POLL`]: crate::limits::DISPATCH_POLL

mod batch;
mod intake;
mod ordering;
mod record;
mod verdict;

#[cfg(test)]
mod tests;

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RetryPolicy;
use crate::event::now_ms;
use crate::metrics::Metrics;
use crate::sinks::Sink;
use crate::store::{Feed, Store};

use batch::Done;
use intake::Source;
use ordering::Busy;
pub use verdict::backoff;

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
    /// The sink's metric children, resolved at first use (`Default::default()`).
    pub sink_metrics: crate::metrics::SinkMetrics,
}

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
        let mut src = Source::new(feed);
        let mut busy = Busy::default();
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(done) = done_rx.recv() => {
                    src.finished(&done);
                    // The delivery in flight for this key finished: start the next one waiting for it.
                    if let Some((row, p)) = done.key.and_then(|key| busy.release(&key)) {
                        this.start(&tracker, row, p, &done_tx, &recording, &cancel);
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
                    src.took(&row);
                    ready.extend(busy.admit(row, p));
                    // A sink that takes batches gets every delivery that is ready now and has a free slot.
                    let batch_max = this.sink.batch_max();
                    while batch_max > 1 && ready.len() < batch_max {
                        let Ok(p) = Arc::clone(&slots).try_acquire_owned() else { break };
                        let Some(row) = src.next_ready() else { break };
                        src.took(&row);
                        ready.extend(busy.admit(row, p));
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
}
