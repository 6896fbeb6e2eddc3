//! A plugin as a destination: the dispatcher delivers an event by running the plugin on it (on a blocking
//! thread), then carrying out its actions. `emit` actions become new events in the spool, each with a
//! delivery to its sink, *before* the plugin's delivery counts as done: so they are at least once like any
//! webhook, and a re-run after a crash stores them once (their dedup key is the handled event, the plugin
//! and the action's position). `publish` actions go to the live channels after that.
//!
//! Failures: the plugin's own `retryable`/`permanent` errors map to the sink errors of the same name; a
//! trap, a timeout, running out of fuel or memory, or a full instance pool are retryable: the sink's retry
//! policy (set `retry.max_attempts` for plugins) decides when it becomes a dead letter.

use bytes::Bytes;

use super::{BoxFuture, Sink, SinkError};
use crate::event::{Event, now_ms};
use crate::live::{Live, valid_channel};
use crate::metrics::Metrics;
use crate::plugin::{Action, Failure, Plugin};
use crate::store::{Dedup, Inserted, Store};

/// How long a re-run of the same invocation dedups its emits.
const EMIT_DEDUP_WINDOW_MS: i64 = 73 * 3600 * 1000;

/// Runs a plugin for each delivery.
#[derive(Debug)]
pub struct PluginSink {
    plugin: Plugin,
    store: Store,
    live: Live,
    metrics: Metrics,
    /// Sinks an `emit` may name.
    sinks: Vec<String>,
    /// Add-on installations (for events from `clockify-addon` sources).
    addons: crate::addon::Installations,
    /// Emits count against the spool's limits like webhooks.
    limits: crate::store::SpoolLimits,
}

impl PluginSink {
    /// `sinks`: the configured sink ids (emits to anything else fail permanently).
    pub fn new(
        plugin: Plugin,
        store: Store,
        live: Live,
        metrics: Metrics,
        sinks: Vec<String>,
        addons: crate::addon::Installations,
        limits: crate::store::SpoolLimits,
    ) -> Self {
        PluginSink { plugin, store, live, metrics, sinks, addons, limits }
    }

    async fn run(&self, event: &Event) -> Result<(), SinkError> {
        let plugin = self.plugin.clone();
        let owned = event.clone();
        let addons = self.addons.clone();
        let inv = tokio::task::spawn_blocking(move || plugin.invoke(&owned, Some(&addons)))
            .await
            .map_err(|e| SinkError::retryable(format!("plugin task failed: {e}")))?;
        let id = self.plugin.id();
        self.metrics.plugin_invocation(id, inv.duration.as_secs_f64(), inv.fuel_used, inv.outcome.as_ref().err());
        let actions = match inv.outcome {
            Ok(actions) => actions,
            Err(f) => {
                tracing::warn!(plugin = id, event = %event.id, kind = f.kind(), error = %f, "plugin invocation failed");
                return Err(match f {
                    Failure::Permanent(m) | Failure::InvalidConfig(m) => SinkError::permanent(format!("plugin: {m}")),
                    other => SinkError::retryable(format!("plugin: {other}")),
                });
            }
        };
        let mut publishes = Vec::new();
        for (i, action) in actions.into_iter().enumerate() {
            match action {
                Action::Emit { sink, event_type, payload, headers } => {
                    if !self.sinks.contains(&sink) {
                        return Err(SinkError::permanent(format!(
                            "plugin emitted to {sink:?}, which is not a configured sink"
                        )));
                    }
                    let emitted = emitted_event(id, event, i, event_type, payload, headers);
                    if let Err(reason) = self.limits.room_for_emit(&self.store.gauges(), emitted.body.len() as u64) {
                        // Retried later, when the spool has room again.
                        return Err(SinkError::retryable(format!("cannot store the plugin's emit: {reason}")));
                    }
                    let since = now_ms() - EMIT_DEDUP_WINDOW_MS;
                    match self.store.insert(emitted, vec![sink.clone()], Dedup::DeliveryId { since_ms: since }).await {
                        Ok(Inserted::New { .. }) => {
                            tracing::debug!(plugin = id, sink = %sink, "plugin emitted an event")
                        }
                        Ok(Inserted::Duplicate { .. }) => {
                            tracing::debug!(plugin = id, sink = %sink, "emit already stored by an earlier run")
                        }
                        Err(e) => return Err(SinkError::retryable(format!("cannot store the plugin's emit: {e}"))),
                    }
                }
                Action::Publish { channel, payload } => {
                    if !valid_channel(&channel) {
                        return Err(SinkError::permanent(format!(
                            "plugin published to {channel:?}: channel names use letters, digits, '-', '_' and '.'"
                        )));
                    }
                    publishes.push((channel, payload));
                }
            }
        }
        for (channel, payload) in publishes {
            self.live.publish(&channel, &payload);
        }
        Ok(())
    }
}

/// The event an `emit` makes: source = the plugin id, same ordering key as the handled event, a dedup key
/// that is the same for every re-run of this invocation.
fn emitted_event(
    plugin: &str,
    parent: &Event,
    index: usize,
    event_type: Option<String>,
    payload: Vec<u8>,
    mut headers: Vec<(String, String)>,
) -> Event {
    let content_type = headers_content_type(&headers).unwrap_or_else(|| "application/json".to_owned());
    headers.retain(|(k, _)| !k.eq_ignore_ascii_case("content-type"));
    headers.push(("content-type".into(), content_type));
    headers.push(("hookbridge-parent-id".into(), parent.id.clone()));
    Event {
        id: uuid::Uuid::now_v7().to_string(),
        source: plugin.to_owned(),
        event_type: event_type.unwrap_or_else(|| parent.event_type.clone()),
        received_at_ms: now_ms(),
        headers,
        body: Bytes::from(payload),
        dedup_key: format!("emit:{}:{index}", parent.id),
        ordering_key: parent.ordering_key.clone(),
        body_is_json: false,
    }
}

fn headers_content_type(headers: &[(String, String)]) -> Option<String> {
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("content-type")).map(|(_, v)| v.clone())
}

impl Sink for PluginSink {
    fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.run(event))
    }
}
