//! Dispatch: one task per sink pulls pending deliveries from the spool in receive order and runs at most
//! `max_in_flight` of them at once. A delivery keeps its slot while it is retried (exponential backoff with
//! full jitter), so a sink that is down holds back new work instead of filling memory: the spool is the
//! queue. A delivery leaves the spool only as `delivered` or, after a permanent failure, `dead`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::RetryPolicy;
use crate::event::now_ms;
use crate::limits::DISPATCH_POLL;
use crate::metrics::Metrics;
use crate::sinks::{Sink, SinkError};
use crate::store::{Outcome, PendingDelivery, Store};

/// Deliveries fetched from the store per query at most.
const FETCH_MAX: usize = 256;

/// Everything one sink's dispatcher needs.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    /// Sink id.
    pub sink_id: String,
    /// The sink.
    pub sink: Arc<dyn Sink>,
    /// The spool.
    pub store: Store,
    /// Woken by the ingress after each commit that gives this sink work.
    pub wake: Arc<Notify>,
    /// Deliveries in flight at once.
    pub max_in_flight: usize,
    /// Backoff.
    pub retry: RetryPolicy,
    /// Telemetry.
    pub metrics: Metrics,
}

impl Dispatcher {
    /// Runs until `cancel`, then waits for the deliveries in flight (their backoff sleeps end at once; a sink
    /// call in progress is awaited, bounded by the sink's own timeout and the caller's shutdown deadline).
    pub async fn run(self, cancel: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.max_in_flight));
        let mut tasks = JoinSet::new();
        let mut cursor = 0i64;
        loop {
            let free = slots.available_permits();
            if free > 0 && !cancel.is_cancelled() {
                match this
                    .store
                    .pending(&this.sink_id, cursor, free.min(FETCH_MAX))
                    .await
                {
                    Ok(rows) if !rows.is_empty() => {
                        for row in rows {
                            let Ok(permit) = Arc::clone(&slots).acquire_owned().await else {
                                break;
                            };
                            cursor = row.seq;
                            let (this, cancel) = (Arc::clone(&this), cancel.clone());
                            tasks.spawn(async move {
                                this.deliver(row, &cancel).await;
                                drop(permit);
                            });
                        }
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(sink = %this.sink_id, error = %e, "cannot read pending deliveries")
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = this.wake.notified() => {}
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                _ = tokio::time::sleep(DISPATCH_POLL) => {}
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn deliver(&self, row: PendingDelivery, cancel: &CancellationToken) {
        let mut attempts = row.attempts;
        loop {
            attempts = attempts.saturating_add(1);
            let started = Instant::now();
            let result = self.sink.deliver(&row.event).await;
            let seconds = started.elapsed().as_secs_f64();
            let (outcome, delay) = match result {
                Ok(()) => {
                    self.metrics.delivery(&self.sink_id, "delivered", seconds);
                    (Outcome::Delivered, None)
                }
                Err(SinkError::Permanent(error)) => {
                    self.metrics.delivery(&self.sink_id, "dead", seconds);
                    tracing::warn!(sink = %self.sink_id, event = %row.event.id, attempts, %error, "delivery failed permanently; kept as dead");
                    (Outcome::Dead(error), None)
                }
                Err(SinkError::Retryable {
                    message,
                    retry_after,
                }) => {
                    self.metrics.delivery(&self.sink_id, "retry", seconds);
                    let delay = backoff(&self.retry, attempts)
                        .max(retry_after.unwrap_or_default().min(self.retry.max_backoff));
                    tracing::info!(sink = %self.sink_id, event = %row.event.id, attempts, error = %message, retry_in = ?delay, "delivery failed; will retry");
                    let next_attempt_ms = now_ms() + delay.as_millis() as i64;
                    (
                        Outcome::Retry {
                            next_attempt_ms,
                            error: message,
                        },
                        Some(delay),
                    )
                }
            };
            if !self.record(&row, attempts, outcome, cancel).await {
                return;
            }
            let Some(delay) = delay else { return };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

impl Dispatcher {
    /// Records an outcome, retrying while the store refuses (a full disk, a lock). Returns false when
    /// cancelled first: the delivery is then still pending in the spool and is attempted again at the next
    /// start (a duplicate at worst, never a loss).
    async fn record(
        &self,
        row: &PendingDelivery,
        attempts: u32,
        outcome: Outcome,
        cancel: &CancellationToken,
    ) -> bool {
        let mut wait = self.retry.initial_backoff;
        loop {
            match self
                .store
                .record(row.seq, &self.sink_id, attempts, outcome.clone())
                .await
            {
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

/// Exponential backoff with full jitter: uniform in `[initial/2, min(max, initial * 2^(attempt-1))]`
/// (half the initial backoff as a floor, so a retry never lands at once).
pub fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let ceiling = policy
        .initial_backoff
        .saturating_mul(1u32 << exp.min(31))
        .min(policy.max_backoff);
    let floor = (policy.initial_backoff / 2).min(ceiling);
    if ceiling <= floor {
        return ceiling;
    }
    let ms = rand::rng().random_range(floor.as_millis() as u64..=ceiling.as_millis() as u64);
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
        };
        for attempt in 1..40 {
            let d = backoff(&p, attempt);
            assert!(d >= Duration::from_millis(500), "{attempt}: {d:?}");
            let cap =
                Duration::from_secs(1u64 << (attempt - 1).min(20)).min(Duration::from_secs(60));
            assert!(d <= cap, "{attempt}: {d:?} > {cap:?}");
        }
    }
}
