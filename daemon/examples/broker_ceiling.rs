//! The broker benchmark's baseline: a minimal producer with the same client crate and the same settings as
//! hookbridge's sink, sending one body over and over with the same number of messages in flight, for a
//! fixed time. It prints acknowledged messages per second and the send-to-ack latency.
//!
//! ```text
//! cargo run --release -p hookbridge --example broker_ceiling -- kafka 127.0.0.1:19092 TOPIC BODY SECONDS IN_FLIGHT [bare|sink]
//! cargo run --release -p hookbridge --example broker_ceiling -- amqp AMQP_URL EXCHANGE BODY SECONDS IN_FLIGHT [bare|sink]
//! ```
//!
//! Messages: `sink` (the default) sends the records the sinks send, made by the sinks' own functions for a
//! fresh event per message: for Kafka the key (the body's `workspaceId`), the timestamp and the CloudEvents
//! headers ([`hookbridge::sinks::kafka_headers`]); for AMQP the properties
//! ([`hookbridge::sinks::amqp_properties`]: persistent, content type, message id, type, timestamp, app id,
//! `cloudEvents:*` headers). `bare` sends the body alone (persistent for AMQP), the cheapest message the
//! broker can take.
//!
//! Set-up for a run: `setup-kafka BROKERS TOPIC` creates the topic; `setup-amqp URL EXCHANGE` declares the
//! exchange (durable topic, as the sink does) and a queue `EXCHANGE` bound to it that keeps at most 100000
//! messages (so a long run does not fill the broker's memory). `teardown-kafka BROKERS TOPIC` and
//! `teardown-amqp URL EXCHANGE` delete them again.
//!
//! The Kafka producer is built from the properties hookbridge's config validation produces for a `kafka`
//! sink (so `acks=all`, idempotence, linger and timeouts are the sink's); the AMQP publisher uses a
//! confirm-mode channel, persistent `mandatory` messages, as the `amqp` sink does.

#![allow(clippy::print_stdout, clippy::print_stderr, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use hookbridge::config::{Config, ProcessEnv, SinkKind};
use hookbridge::event::{Event, now_ms};
use hookbridge::sinks::{amqp_properties, kafka_headers};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Confirmation};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::Mutex;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["setup-kafka", brokers, topic] => return setup_kafka(brokers, topic).await,
        ["setup-amqp", url, exchange] => return setup_amqp(url, exchange).await,
        ["teardown-kafka", brokers, topic] => return teardown_kafka(brokers, topic).await,
        ["teardown-amqp", url, exchange] => return teardown_amqp(url, exchange).await,
        _ => {}
    }
    let (args, shape) = match args.as_slice() {
        [rest @ .., last] if last == "bare" || last == "sink" => (rest.to_vec(), last.clone()),
        _ => (args.clone(), "sink".to_owned()),
    };
    let [kind, target, name, body, seconds, in_flight] = args.as_slice() else {
        eprintln!("usage: broker_ceiling kafka|amqp BROKERS|URL TOPIC|EXCHANGE BODY SECONDS IN_FLIGHT [bare|sink]");
        std::process::exit(2);
    };
    let sink_shaped = shape == "sink";
    let body = bytes::Bytes::from(std::fs::read(body).expect("body file"));
    let key: Arc<str> = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("workspaceId")?.as_str().map(Arc::from))
        .unwrap_or_else(|| Arc::from("key"));
    let duration = Duration::from_secs(seconds.parse().expect("seconds"));
    let in_flight: usize = in_flight.parse().expect("in flight");
    let latencies = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let started = Instant::now();
    let mut tasks = Vec::new();
    match kind.as_str() {
        "kafka" => {
            let producer = Arc::new(kafka_producer(target, name));
            for _ in 0..in_flight {
                let (producer, body, latencies, topic, key) =
                    (Arc::clone(&producer), body.clone(), Arc::clone(&latencies), name.clone(), Arc::clone(&key));
                tasks.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while started.elapsed() < duration {
                        let t = Instant::now();
                        let mut record = FutureRecord::<str, [u8]>::to(&topic).payload(&body[..]);
                        if sink_shaped {
                            let event = event("kafka", &body);
                            record = record.key(&*key).headers(kafka_headers(&event)).timestamp(event.received_at_ms);
                        }
                        producer.send(record, Timeout::After(Duration::from_secs(30))).await.expect("kafka ack");
                        mine.push(t.elapsed());
                    }
                    latencies.lock().await.extend(mine);
                }));
            }
        }
        "amqp" => {
            let conn =
                lapin::Connection::connect(target, lapin::ConnectionProperties::default()).await.expect("connect");
            let channel = conn.create_channel().await.expect("channel");
            channel.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm mode");
            for _ in 0..in_flight {
                let (channel, body, latencies, exchange) =
                    (channel.clone(), body.clone(), Arc::clone(&latencies), name.clone());
                tasks.push(tokio::spawn(async move {
                    let mut mine = Vec::new();
                    while started.elapsed() < duration {
                        let t = Instant::now();
                        let properties = if sink_shaped {
                            amqp_properties(&event("amqp", &body)).expect("the benchmark event fits AMQP")
                        } else {
                            BasicProperties::default().with_delivery_mode(2)
                        };
                        let confirm = channel
                            .basic_publish(
                                exchange.as_str().into(),
                                "amqp.NEW_TIME_ENTRY".into(),
                                BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() },
                                &body,
                                properties,
                            )
                            .await
                            .expect("publish")
                            .await
                            .expect("confirm");
                        assert_eq!(confirm, Confirmation::Ack(None), "bind a queue to {exchange}");
                        mine.push(t.elapsed());
                    }
                    latencies.lock().await.extend(mine);
                }));
            }
        }
        other => panic!("unknown kind {other}"),
    }
    for t in tasks {
        t.await.expect("task");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut l = latencies.lock().await.clone();
    l.sort();
    let pct =
        |p: f64| l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1))).copied().unwrap_or_default();
    println!(
        "RESULT kind={kind} shape={shape} messages={} rate={:.0} p50_ms={:.2} p99_ms={:.2}",
        l.len(),
        l.len() as f64 / elapsed,
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0
    );
}

/// A fresh event as the daemon would make it from a webhook with this body.
fn event(source: &str, body: &bytes::Bytes) -> Event {
    let id = uuid::Uuid::now_v7().to_string();
    Event {
        dedup_key: id.clone(),
        id,
        source: source.to_owned(),
        event_type: "NEW_TIME_ENTRY".to_owned(),
        received_at_ms: now_ms(),
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: body.clone(),
        ordering_key: None,
        body_is_json: false,
    }
}

/// A producer with exactly the properties hookbridge sets for a `kafka` sink with default settings.
fn kafka_producer(brokers: &str, topic: &str) -> FutureProducer {
    let toml = format!(
        "[sources.s]\nkind = \"none\"\nevent_header = \"x\"\n[sinks.k]\nkind = \"kafka\"\nbrokers = [\"{brokers}\"]\ntopic = \"{topic}\"\n[[routes]]\nname = \"r\"\nto = [\"k\"]\n"
    );
    let config = Config::parse(&toml, None, ".".as_ref(), &ProcessEnv).expect("config");
    let SinkKind::Kafka(spec) = &config.sinks["k"].kind else { unreachable!() };
    let mut c = ClientConfig::new();
    for (k, v) in &spec.properties {
        c.set(k, v.expose());
    }
    c.create().expect("producer")
}

async fn setup_kafka(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let r = admin.create_topics(&[NewTopic::new(topic, 1, TopicReplication::Fixed(1))], &options).await;
    for r in r.expect("create topics") {
        if let Err((t, code)) = r {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating {t}");
        }
    }
}

async fn setup_amqp(url: &str, exchange: &str) {
    use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    channel
        .exchange_declare(exchange.into(), lapin::ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .expect("exchange");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(100_000));
    channel.queue_declare(exchange.into(), QueueDeclareOptions::default(), args).await.expect("queue");
    channel
        .queue_bind(exchange.into(), exchange.into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .expect("bind");
}

async fn teardown_kafka(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for r in admin.delete_topics(&[topic], &options).await.expect("delete topics") {
        if let Err((t, code)) = r {
            eprintln!("cannot delete topic {t}: {code}");
        }
    }
}

async fn teardown_amqp(url: &str, exchange: &str) {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default()).await.expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    channel.queue_delete(exchange.into(), QueueDeleteOptions::default()).await.expect("queue");
    channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default()).await.expect("exchange");
}
