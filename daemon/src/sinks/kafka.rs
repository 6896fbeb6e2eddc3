//! `kafka` sink: produce each event to a templated topic with a templated key, through librdkafka
//! (rdkafka) as an idempotent producer with `acks=all`. A delivery counts only once the broker has
//! acknowledged the message (the delivery report); librdkafka retries by itself until `message_timeout`,
//! after which the delivery fails as retryable and the sink's policy takes over.
//!
//! The body goes unchanged as the value; metadata goes as headers in CloudEvents' Kafka binary-mode form
//! (`ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_specversion`, `content-type`). Connection state comes
//! from librdkafka's statistics (every second): connected while at least one broker is `UP`. A fatal
//! producer error makes the sink build a new producer; so does a producer that has had no acknowledgement
//! for a while (three message timeouts, at least 10 s) while deliveries keep failing: an idempotent
//! producer whose broker was replaced can wait forever for producer state the new broker never had. The
//! deliveries that failed are retried through the new producer (at least once; a duplicate at worst).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::statistics::Statistics;
use rdkafka::util::Timeout;

use super::{BoxFuture, CE_SPECVERSION, Connection, ConnectionState, Sink, SinkError, render};
use crate::config::{KafkaSinkSpec, kafka_topic_name};
use crate::event::Event;
use crate::limits::BROKER_BATCH_MAX;

/// librdkafka callbacks: connection state from statistics, errors and logs to tracing with the sink id.
#[derive(Debug)]
struct Context {
    sink: String,
    state: Arc<ConnectionState>,
}

impl ClientContext for Context {
    fn stats(&self, statistics: Statistics) {
        let up = statistics.brokers.values().filter(|b| b.nodeid >= 0 && b.state == "UP").count();
        if up > 0 {
            self.state.set(true, "connected");
        } else {
            let states: Vec<String> =
                statistics.brokers.values().map(|b| format!("{} {}", b.nodename, b.state)).collect();
            self.state.set(false, format!("no broker up ({})", states.join(", ")));
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            self.state.set(false, format!("all brokers down: {reason}"));
        }
        tracing::warn!(sink = %self.sink, error = %error, reason, "kafka client error");
    }

    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical | RDKafkaLogLevel::Error => {
                tracing::error!(sink = %self.sink, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(sink = %self.sink, facility, "librdkafka: {message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(sink = %self.sink, facility, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(sink = %self.sink, facility, "librdkafka: {message}"),
        }
    }
}

type Client = FutureProducer<Context>;

/// Produces to Kafka.
pub struct KafkaSink {
    id: String,
    spec: KafkaSinkSpec,
    state: Arc<ConnectionState>,
    producer: Mutex<Arc<Client>>,
    /// Last acknowledgement, and last time a producer was made.
    progress: Mutex<(Instant, Instant)>,
    /// The producer's `message.max.bytes`: larger records are refused before they are produced.
    max_message_bytes: usize,
}

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;
/// What a record carries besides its key, value and headers, at most (record batch and record framing:
/// lengths, offsets, timestamps, attributes), so that the size check errs on the safe side.
const RECORD_OVERHEAD: usize = 128;

/// The encoded size of a record, about (from above): key, value, and each header's key and value with
/// their varint lengths.
pub fn record_size(key: Option<&str>, payload: &[u8], headers: &[(&str, &str)]) -> usize {
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len() + 10).sum();
    key.map_or(0, str::len) + payload.len() + headers + RECORD_OVERHEAD
}

impl std::fmt::Debug for KafkaSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSink").field("id", &self.id).field("topic", &self.spec.topic).finish_non_exhaustive()
    }
}

impl KafkaSink {
    /// Creates the producer (it connects in the background).
    pub fn new(id: &str, spec: &KafkaSinkSpec) -> Result<Self, String> {
        let state = Arc::new(ConnectionState::new());
        let producer = create(id, spec, &state)?;
        let now = Instant::now();
        let max_message_bytes = spec
            .properties
            .iter()
            .find(|(k, _)| k == "message.max.bytes")
            .and_then(|(_, v)| v.expose().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        Ok(KafkaSink {
            id: id.to_owned(),
            spec: spec.clone(),
            state,
            producer: Mutex::new(Arc::new(producer)),
            progress: Mutex::new((now, now)),
            max_message_bytes,
        })
    }

    fn current(&self) -> Result<Arc<Client>, SinkError> {
        self.producer.lock().map(|p| Arc::clone(&p)).map_err(|_| SinkError::retryable("producer lock poisoned"))
    }

    /// Replaces `failed` with a new producer, unless another delivery already did.
    fn renew(&self, failed: &Arc<Client>, why: &str) {
        let Ok(mut current) = self.producer.lock() else { return };
        if !Arc::ptr_eq(&current, failed) {
            return;
        }
        match create(&self.id, &self.spec, &self.state) {
            Ok(p) => {
                tracing::warn!(sink = %self.id, reason = why, "created a new Kafka producer");
                let old = std::mem::replace(&mut *current, Arc::new(p));
                if let Ok(mut progress) = self.progress.lock() {
                    progress.1 = Instant::now();
                }
                // Dropping a producer flushes (bounded) and joins its threads: not on an async worker.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => tracing::error!(sink = %self.id, error = %e, "cannot create a new producer"),
        }
    }

    async fn produce(&self, event: &Event) -> Result<(), SinkError> {
        let topic = render(&self.spec.topic, event)?;
        kafka_topic_name(&topic).map_err(|m| SinkError::permanent(format!("topic from {}: {m}", self.spec.topic)))?;
        let key = self.spec.key.as_ref().map(|k| render(k, event)).transpose()?;
        let time = event.time_rfc3339();
        let size = record_size(key.as_deref(), &event.body, &header_pairs(event, &time));
        if size > self.max_message_bytes {
            return Err(SinkError::permanent(format!(
                "the record would be about {size} bytes (key, body and headers); the producer's message.max.bytes \
                 is {}: the event cannot be sent",
                self.max_message_bytes
            )));
        }
        let mut record = FutureRecord::to(&topic)
            .payload(event.body.as_ref())
            .headers(kafka_headers(event))
            .timestamp(event.received_at_ms);
        if let Some(k) = &key {
            record = record.key(k.as_str());
        }
        let producer = self.current()?;
        // The local queue may be full: wait for room at most `message_timeout`; then librdkafka's own
        // `message.timeout.ms` bounds the wait for the acknowledgement. The outer timeout is a backstop.
        let bound = self.spec.message_timeout * 2 + Duration::from_secs(5);
        let sent = tokio::time::timeout(bound, producer.send(record, Timeout::After(self.spec.message_timeout))).await;
        match sent {
            Ok(Ok(_)) => {
                if let Ok(mut progress) = self.progress.lock() {
                    progress.0 = Instant::now();
                }
                Ok(())
            }
            Ok(Err((error, _message))) => {
                if let Some((code, reason)) = producer.client().fatal_error() {
                    self.renew(&producer, &format!("fatal producer error {code:?}: {reason}"));
                } else if self.stalled() {
                    self.renew(&producer, "no acknowledgement for a while although deliveries keep coming");
                }
                Err(classify(&error))
            }
            Err(_) => Err(SinkError::retryable(format!("no acknowledgement from Kafka within {bound:?}"))),
        }
    }
}

impl KafkaSink {
    /// No acknowledgement and no new producer for three message timeouts (at least 10 s).
    fn stalled(&self) -> bool {
        let window = (self.spec.message_timeout * 3).max(Duration::from_secs(10));
        self.progress.lock().is_ok_and(|p| p.0.elapsed() > window && p.1.elapsed() > window)
    }
}

/// The headers of an event's Kafka record as (key, value): CloudEvents' Kafka binary mode (`ce_*`) and
/// `content-type`; `time` is the event's RFC 3339 time.
fn header_pairs<'a>(event: &'a Event, time: &'a str) -> [(&'static str, &'a str); 6] {
    [
        ("ce_id", &event.id),
        ("ce_type", &event.event_type),
        ("ce_source", &event.source),
        ("ce_time", time),
        ("ce_specversion", CE_SPECVERSION),
        ("content-type", event.content_type()),
    ]
}

/// The headers of an event's Kafka record: CloudEvents' Kafka binary mode (`ce_*`) and `content-type`.
pub fn kafka_headers(event: &Event) -> OwnedHeaders {
    let time = event.time_rfc3339();
    header_pairs(event, &time)
        .into_iter()
        .fold(OwnedHeaders::new_with_capacity(6), |h, (key, value)| h.insert(Header { key, value: Some(value) }))
}

fn create(id: &str, spec: &KafkaSinkSpec, state: &Arc<ConnectionState>) -> Result<Client, String> {
    let mut config = ClientConfig::new();
    for (k, v) in &spec.properties {
        config.set(k, v.expose());
    }
    config.set("client.id", format!("hookbridge-{id}"));
    config
        .create_with_context(Context { sink: id.to_owned(), state: Arc::clone(state) })
        .map_err(|e| format!("cannot create the Kafka producer: {e}"))
}

/// Errors about the message itself are permanent; everything else (brokers away, timeouts, leadership
/// changes, authorisation that an operator may fix) is retried.
fn classify(error: &KafkaError) -> SinkError {
    use RDKafkaErrorCode as C;
    match error.rdkafka_error_code() {
        Some(
            code @ (C::MessageSizeTooLarge
            | C::InvalidMessageSize
            | C::InvalidMessage
            | C::InvalidRecord
            | C::InvalidTopic),
        ) => SinkError::permanent(format!("Kafka refused the message: {code}")),
        _ => SinkError::retryable(format!("Kafka: {error}")),
    }
}

impl Sink for KafkaSink {
    fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.produce(event))
    }

    fn batch_max(&self) -> usize {
        BROKER_BATCH_MAX
    }

    fn deliver_batch<'a>(&'a self, events: &'a [&'a Event]) -> BoxFuture<'a, Vec<Result<(), SinkError>>> {
        super::deliver_concurrently(self, events)
    }

    fn connection(&self) -> Option<Connection> {
        Some(self.state.get())
    }

    fn start(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {
            // Ask for metadata once so that the connection state is known without waiting for an event.
            let Ok(producer) = self.current() else { return };
            let timeout = self.spec.message_timeout.min(Duration::from_secs(10));
            let id = self.id.clone();
            let state = Arc::clone(&self.state);
            let probe = tokio::task::spawn_blocking(move || producer.client().fetch_metadata(None, timeout)).await;
            match probe {
                Ok(Ok(_)) => {
                    state.set(true, "connected");
                    tracing::info!(sink = %id, "Kafka connected");
                }
                Ok(Err(e)) => {
                    state.set(false, format!("cannot reach the brokers: {e}"));
                    tracing::warn!(sink = %id, error = %e, "cannot reach the Kafka brokers; will keep trying");
                }
                Err(_) => {}
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_size_counts_key_body_and_headers_from_above() {
        let base = record_size(None, b"", &[]);
        assert_eq!(record_size(Some("abc"), b"12345", &[]), base + 8);
        assert!(record_size(None, b"", &[("ce_id", "x")]) > base + 6);
    }

    #[test]
    fn message_errors_are_permanent_and_the_rest_retryable() {
        let too_big = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        assert_eq!(classify(&too_big).class(), "permanent");
        for code in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::UnknownTopicOrPartition,
            RDKafkaErrorCode::NotEnoughReplicas,
        ] {
            assert_eq!(classify(&KafkaError::MessageProduction(code)).class(), "retryable", "{code:?}");
        }
    }
}
