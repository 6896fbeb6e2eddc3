//! Recording: an attempt judged (and logged) into the outcome to record, the record written with retries
//! while the store refuses, and the metrics counted once it is written.

use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use super::verdict::{Verdict, judge};
use crate::event::now_ms;
use crate::sinks::SinkError;
use crate::store::{Outcome, PendingDelivery, Record};

impl Dispatcher {
    /// What an attempt's result means for its delivery ([`judge`]), logged.
    pub(super) fn judge(&self, row: &PendingDelivery, attempts: u32, result: Result<(), SinkError>) -> Verdict {
        let verdict = judge(&self.retry, row.created_at_ms, now_ms(), attempts, result, &mut rand::rng());
        let (sink, event) = (&self.sink_id, &row.event.id);
        match (&verdict.outcome, &verdict.gave_up) {
            (Outcome::Delivered, _) => {}
            (Outcome::Dead(error), None) => {
                tracing::warn!(%sink, %event, attempts, %error, "delivery failed permanently; dead-lettered");
            }
            (Outcome::Dead(error), Some(_)) => {
                tracing::warn!(%sink, %event, attempts, %error, "retries exhausted; dead-lettered");
            }
            (Outcome::Retry { error, .. }, _) => {
                tracing::info!(%sink, %event, attempts, %error, retry_in = ?verdict.delay, "delivery failed; will retry");
            }
        }
        verdict
    }

    /// Metrics for a recorded attempt.
    pub(super) fn count(&self, row: &PendingDelivery, counted: &str, seconds: f64) {
        self.metrics.delivery(&self.sink_metrics, &self.sink_id, counted, seconds);
        if counted == "delivered" && !row.replay {
            let since = (now_ms() - row.event.received_at_ms).max(0) as f64 / 1000.0;
            self.metrics.event_latency(&self.sink_metrics, &self.sink_id, since);
        }
    }

    /// Records outcomes, retrying while the store refuses (a full disk, a lock). Returns false when
    /// cancelled first: the deliveries are then still pending in the spool and are attempted again at the next
    /// start (a duplicate at worst, never a loss).
    pub(super) async fn record(&self, event: &str, records: Vec<Record>, cancel: &CancellationToken) -> bool {
        let mut wait = self.retry.initial_backoff;
        loop {
            match self.store.record_all(&self.sink_id, records.clone()).await {
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
pub(super) fn event_of(row: &PendingDelivery) -> (i64, i64) {
    (row.seq, i64::try_from(row.event.body.len()).unwrap_or(i64::MAX))
}
