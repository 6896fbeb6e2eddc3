//! `amqp` sink: publish each event to a RabbitMQ (AMQP 0-9-1) exchange, persistent, with publisher
//! confirms. A delivery counts only once the broker has confirmed it; a `mandatory` message that no queue
//! receives comes back (an ack carrying a returned message) and fails the delivery.
//!
//! One connection and one confirm-mode channel per sink, shared by every delivery in flight, so confirms
//! are pipelined (up to `max_in_flight` messages await theirs at once). After an error the link is dropped
//! and opened again on the next delivery, no sooner than a backoff (1 s doubling to 30 s) after the last
//! failed attempt; deliveries in between fail at once as retryable.

use std::time::{Duration, Instant};

use lapin::Confirmation;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use super::{BoxFuture, CE_SPECVERSION, Connection, ConnectionState, Sink, SinkError, render};
use crate::config::AmqpSinkSpec;
use crate::event::Event;
use crate::limits::BROKER_BATCH_MAX;

/// Longest wait between reconnection attempts.
const MAX_RECONNECT_BACKOFF: Duration = Duration::from_secs(30);

/// Publishes to an AMQP exchange.
#[derive(Debug)]
pub struct AmqpSink {
    id: String,
    spec: AmqpSinkSpec,
    link: Mutex<Link>,
    state: ConnectionState,
}

#[derive(Default)]
struct Link {
    open: Option<(lapin::Connection, Channel)>,
    /// Failed connection attempts in a row.
    failures: u32,
    /// No new attempt before this.
    not_before: Option<Instant>,
    /// The last attempt's error, repeated to deliveries until the next attempt.
    last_error: String,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link").field("open", &self.open.is_some()).field("failures", &self.failures).finish()
    }
}

impl AmqpSink {
    /// Creates the sink; the connection is opened by [`Sink::start`] or the first delivery.
    pub fn new(id: &str, spec: &AmqpSinkSpec) -> Self {
        AmqpSink {
            id: id.to_owned(),
            spec: spec.clone(),
            link: Mutex::new(Link::default()),
            state: ConnectionState::new(),
        }
    }

    /// The open channel, connecting first when there is none (and the backoff allows).
    async fn channel(&self) -> Result<Channel, SinkError> {
        let mut link = self.link.lock().await;
        if let Some((conn, channel)) = &link.open {
            if conn.status().connected() && channel.status().connected() {
                return Ok(channel.clone());
            }
            link.open = None;
            self.state.set(false, "connection lost");
            tracing::warn!(sink = %self.id, "AMQP connection lost; reconnecting");
        }
        if let Some(at) = link.not_before
            && Instant::now() < at
        {
            return Err(SinkError::retryable(format!(
                "broker unreachable ({}); next connection attempt in {:.1}s",
                link.last_error,
                at.saturating_duration_since(Instant::now()).as_secs_f64()
            )));
        }
        match tokio::time::timeout(self.spec.timeout, self.connect()).await {
            Ok(Ok((conn, channel))) => {
                if link.failures > 0 {
                    tracing::info!(sink = %self.id, after_failures = link.failures, "AMQP connection restored");
                } else {
                    tracing::info!(sink = %self.id, "AMQP connected");
                }
                *link = Link { open: Some((conn, channel.clone())), ..Link::default() };
                self.state.set(true, "connected");
                Ok(channel)
            }
            failed => {
                let error = match failed {
                    Ok(Err(e)) => describe(&e),
                    _ => format!("no connection within {:?}", self.spec.timeout),
                };
                link.failures = link.failures.saturating_add(1);
                let backoff =
                    Duration::from_secs(1u64 << link.failures.min(5).saturating_sub(1)).min(MAX_RECONNECT_BACKOFF);
                link.not_before = Some(Instant::now() + backoff);
                link.last_error = error.clone();
                self.state.set(false, error.clone());
                tracing::warn!(sink = %self.id, error = %error, retry_in = ?backoff, "cannot connect to the AMQP broker");
                Err(SinkError::retryable(format!("cannot connect to the broker: {error}")))
            }
        }
    }

    async fn connect(&self) -> Result<(lapin::Connection, Channel), lapin::Error> {
        let props = ConnectionProperties::default().with_connection_name(format!("hookbridge sink {}", self.id).into());
        let conn = lapin::Connection::connect(self.spec.url.expose(), props).await?;
        let channel = conn.create_channel().await?;
        channel.confirm_select(ConfirmSelectOptions::default()).await?;
        if self.spec.declare {
            let kind = match self.spec.exchange_type.as_str() {
                "direct" => ExchangeKind::Direct,
                "fanout" => ExchangeKind::Fanout,
                "headers" => ExchangeKind::Headers,
                _ => ExchangeKind::Topic,
            };
            let options = ExchangeDeclareOptions { durable: self.spec.durable, ..ExchangeDeclareOptions::default() };
            channel.exchange_declare(self.spec.exchange.as_str().into(), kind, options, FieldTable::default()).await?;
        }
        Ok((conn, channel))
    }

    /// Forgets the link `channel` belongs to, if it is still the current one, so the next delivery reconnects.
    async fn drop_link(&self, channel: &Channel, why: &str) {
        let mut link = self.link.lock().await;
        if link.open.as_ref().is_some_and(|(_, c)| c.id() == channel.id()) {
            if let Some((conn, _)) = link.open.take() {
                // Best effort: the broker may already be gone.
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(320, "hookbridge reconnecting".into()))
                    .await;
            }
            self.state.set(false, why);
        }
    }

    async fn publish(&self, event: &Event) -> Result<(), SinkError> {
        let routing_key = render(&self.spec.routing_key, event)?;
        if routing_key.len() > 255 {
            return Err(SinkError::permanent(format!(
                "routing key from {:?} is {} bytes; AMQP allows 255",
                self.spec.routing_key.as_str(),
                routing_key.len()
            )));
        }
        // Checked before the channel is touched: a value that cannot be encoded is this delivery's
        // permanent failure, never a panic or a malformed frame on the shared connection.
        let properties = amqp_properties(event).map_err(SinkError::permanent)?;
        let channel = self.channel().await?;
        let options = BasicPublishOptions { mandatory: self.spec.mandatory, ..BasicPublishOptions::default() };
        let sent = tokio::time::timeout(self.spec.timeout, async {
            channel
                .basic_publish(
                    self.spec.exchange.as_str().into(),
                    routing_key.as_str().into(),
                    options,
                    &event.body,
                    properties,
                )
                .await?
                .await
        })
        .await;
        match sent {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(SinkError::retryable(format!(
                "unroutable: the broker returned the message ({} {}): no queue is bound to exchange {:?} for routing key {:?}",
                returned.reply_code,
                returned.reply_text.as_str(),
                self.spec.exchange,
                routing_key
            ))),
            Ok(Ok(Confirmation::Nack(_))) => Err(SinkError::retryable("the broker refused the message (nack)")),
            Ok(Ok(Confirmation::NotRequested)) => {
                self.drop_link(&channel, "channel not in confirm mode").await;
                Err(SinkError::retryable("the channel was not in confirm mode; reconnecting"))
            }
            Ok(Err(e)) => {
                let error = describe(&e);
                self.drop_link(&channel, &error).await;
                Err(SinkError::retryable(format!("publish failed: {error}")))
            }
            Err(_) => {
                self.drop_link(&channel, "confirm timed out").await;
                Err(SinkError::retryable(format!("no confirm from the broker within {:?}", self.spec.timeout)))
            }
        }
    }
}

/// Longest AMQP 0-9-1 short string (property values such as `content-type`, field-table keys): its length
/// is one byte on the wire.
pub const AMQP_SHORT_STRING_MAX: usize = 255;

/// A short string, or why it cannot be one (`what` names it).
fn short(what: &str, value: &str) -> Result<ShortString, String> {
    if value.len() > AMQP_SHORT_STRING_MAX {
        return Err(format!(
            "{what} is {} bytes; AMQP short strings hold at most {AMQP_SHORT_STRING_MAX}: the message cannot be sent",
            value.len()
        ));
    }
    Ok(ShortString::from(value))
}

/// Persistent delivery, `content-type`, `message-id`, timestamp, `type`, and CloudEvents headers in the
/// AMQP binding's form (`cloudEvents:id`, ...). `Err` names the value that does not fit AMQP's wire limits
/// (a short string over 255 bytes), checked here so that lapin never sees it.
pub fn amqp_properties(event: &Event) -> Result<BasicProperties, String> {
    let mut headers = FieldTable::default();
    let mut put = |k: &'static str, v: &str| {
        // Keys are ours and short; values are long strings (a 32-bit length).
        headers.insert(ShortString::from(k), AMQPValue::LongString(LongString::from(v)));
    };
    put("cloudEvents:id", &event.id);
    put("cloudEvents:type", &event.event_type);
    put("cloudEvents:source", &event.source);
    put("cloudEvents:time", &event.time_rfc3339());
    put("cloudEvents:specversion", CE_SPECVERSION);
    Ok(BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(short("the content-type header", event.content_type())?)
        .with_message_id(short("the event id", &event.id)?)
        .with_type(short("the event type", &event.event_type)?)
        .with_timestamp(u64::try_from(event.received_at_ms / 1000).unwrap_or(0))
        .with_app_id("hookbridge".into())
        .with_headers(headers))
}

/// A lapin error in one line; never contains the URL (and so never the password).
fn describe(e: &lapin::Error) -> String {
    e.to_string()
}

impl Sink for AmqpSink {
    fn deliver<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(self.publish(event))
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
            // An unreachable broker is reported (log, /readyz) now; deliveries try again by themselves.
            let _ = self.channel().await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(content_type: &str) -> Event {
        Event {
            id: "01234567-89ab-7def-8123-456789abcdef".into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 1,
            headers: vec![("content-type".into(), content_type.into())],
            body: bytes::Bytes::from_static(b"{}"),
            dedup_key: "k".into(),
            ordering_key: None,
            body_is_json: false,
        }
    }

    #[test]
    fn values_over_a_short_string_are_refused_before_lapin_sees_them() {
        assert!(amqp_properties(&event(&"a".repeat(255))).is_ok());
        let e = amqp_properties(&event(&"a".repeat(256))).unwrap_err();
        assert_eq!(
            e,
            "the content-type header is 256 bytes; AMQP short strings hold at most 255: the message cannot be sent"
        );
    }
}
