//! Broker sinks against real brokers: RabbitMQ (127.0.0.1:5672, guest/guest) and the Kafka-compatible
//! broker tansu that `scripts/test` starts (`HOOKBRIDGE_TEST_KAFKA`, default 127.0.0.1:19092). Every test
//! uses its own exchange, queue and topics. Read-backs are bounded: nothing here can wait forever.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{
    BasicGetOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio::net::{TcpListener, TcpStream};

use crate::common::*;

const SECRET: &str = "broker-secret";

pub fn amqp_url() -> String {
    std::env::var("HOOKBRIDGE_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn kafka_brokers() -> String {
    std::env::var("HOOKBRIDGE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::now_v7().simple())
}

/// Creates a one-partition topic (the sink never creates topics).
pub async fn create_topic(brokers: &str, topic: &str) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .unwrap_or_else(|e| panic!("Kafka admin client for {brokers}: {e} (scripts/test starts the broker)"));
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let created = tokio::time::timeout(
        Duration::from_secs(20),
        admin.create_topics(&[NewTopic::new(topic, 1, TopicReplication::Fixed(1))], &options),
    )
    .await
    .unwrap_or_else(|_| panic!("no Kafka broker answered at {brokers}; `scripts/kafka-broker start` starts one"))
    .unwrap();
    for r in created {
        if let Err((t, code)) = r {
            assert_eq!(code, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists, "creating {t}");
        }
    }
}

/// Reads up to `n` messages of partition 0 of `topic` from the beginning, waiting at most `timeout`.
pub async fn consume(brokers: &str, topic: &str, n: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let (brokers, topic) = (brokers.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("group.id", unique("hookbridge-test"))
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Beginning).unwrap();
        consumer.assign(&tpl).unwrap();
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => got.push(m.detach()),
                Some(Err(e)) => eprintln!("consumer: {e}"),
                None => {}
            }
        }
        got
    })
    .await
    .unwrap()
}

pub fn kafka_header(m: &OwnedMessage, name: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter().find(|h| h.key == name).and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned())
}

/// A queue bound to an exchange (declared as the sink declares it: durable topic), for reading back.
pub struct AmqpQueue {
    _conn: lapin::Connection,
    channel: lapin::Channel,
    exchange: String,
    queue: String,
}

impl AmqpQueue {
    pub async fn bind(exchange: &str, pattern: &str) -> AmqpQueue {
        let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("RabbitMQ at 127.0.0.1:5672: {e} (scripts/test starts it)"));
        let channel = conn.create_channel().await.unwrap();
        let durable = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
        channel
            .exchange_declare(exchange.into(), lapin::ExchangeKind::Topic, durable, FieldTable::default())
            .await
            .unwrap();
        let options = QueueDeclareOptions { exclusive: true, auto_delete: true, ..QueueDeclareOptions::default() };
        let q = channel.queue_declare("".into(), options, FieldTable::default()).await.unwrap();
        let queue = q.name().as_str().to_owned();
        channel
            .queue_bind(
                queue.as_str().into(),
                exchange.into(),
                pattern.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        AmqpQueue { _conn: conn, channel, exchange: exchange.to_owned(), queue }
    }

    /// Takes up to `n` messages, waiting at most `timeout`.
    pub async fn take(&self, n: usize, timeout: Duration) -> Vec<lapin::message::BasicGetMessage> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n && Instant::now() < deadline {
            let options = BasicGetOptions { no_ack: true };
            match self.channel.basic_get(self.queue.as_str().into(), options).await.unwrap() {
                Some(m) => got.push(m),
                None => tokio::time::sleep(Duration::from_millis(30)).await,
            }
        }
        got
    }

    pub async fn delete(self) {
        let _ = self.channel.exchange_delete(self.exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
}

fn amqp_header(m: &lapin::message::BasicGetMessage, name: &str) -> Option<String> {
    let headers = m.delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        other => Some(format!("{other:?}")),
    }
}

/// A TCP proxy in front of a broker that can be taken down (every connection cut, new ones closed at once)
/// and brought back: a broker outage as the daemon sees it, without stopping the broker other tests use.
pub struct Outage {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
    target: Arc<std::sync::Mutex<SocketAddr>>,
}

impl Outage {
    pub async fn start(target: SocketAddr) -> Outage {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let cut = Arc::new(tokio::sync::Notify::new());
        let target = Arc::new(std::sync::Mutex::new(target));
        let (d, c, t) = (Arc::clone(&down), Arc::clone(&cut), Arc::clone(&target));
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: closed at once
                }
                let c = Arc::clone(&c);
                let target = *t.lock().unwrap();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = c.notified() => {}
                    }
                });
            }
        });
        Outage { addr, down, cut, target }
    }

    /// Sends new connections to `target` (a broker that replaced the old one).
    pub fn retarget(&self, target: SocketAddr) {
        *self.target.lock().unwrap() = target;
    }

    pub fn down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.cut.notify_waiters();
    }

    pub fn up(&self) {
        self.down.store(false, Ordering::SeqCst);
    }
}

/// Posts a signed NEW_TIME_ENTRY for time entry `entry-<n>`; returns the status.
async fn post_entry(bridge: &TestBridge, n: usize) -> u16 {
    let body = format!(r#"{{"id":"entry-{n}","workspaceId":"w"}}"#);
    bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body).await.0
}

/// Waits until the spool has no pending delivery (a broker's acknowledgement is recorded just after it).
async fn wait_drained(bridge: &TestBridge) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = bridge.metrics().await;
        if metric(&m, "hookbridge_spool_pending_deliveries") == 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "deliveries still pending:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn readyz(bridge: &TestBridge) -> serde_json::Value {
    let text = client().get(bridge.internal_url("/readyz")).send().await.unwrap().text().await.unwrap();
    serde_json::from_str(&text).unwrap()
}

fn fixture_body() -> Vec<u8> {
    read_fixture("clockify/NEW_TIME_ENTRY.json")
}

/// A config with the sinks given as TOML (`@KAFKA@`, `@AMQP@` filled in) and one route to `to`.
fn config(sinks: &str, to: &[&str]) -> String {
    let to: Vec<String> = to.iter().map(|t| format!("{t:?}")).collect();
    let sinks = sinks.replace("@KAFKA@", &kafka_brokers()).replace("@AMQP@", &amqp_url());
    format!(
        r#"
[server]
shutdown_timeout = "5s"
[storage]
data_dir = "{{dir}}/data"
[sources.clockify]
kind = "clockify"
secrets = ["{SECRET}"]
{sinks}
[[routes]]
name = "all"
to = [{}]
"#,
        to.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_gets_the_templated_topic_and_key_the_identical_body_and_ce_headers() {
    let prefix = unique("hb-k");
    let topic = format!("{prefix}.NEW_TIME_ENTRY");
    create_topic(&kafka_brokers(), &topic).await;
    let sinks = r#"
[sinks.bus]
kind = "kafka"
brokers = ["@KAFKA@"]
topic = "@P@.{event}"
key = "{body.workspaceId}"
compression = "lz4"
message_timeout = "10s"
"#
    .replace("@P@", &prefix);
    let bridge = TestBridge::start(&config(&sinks, &["bus"])).await;
    let body = fixture_body();
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body.clone()).await;
    assert_eq!(s, 200);

    let got = consume(&kafka_brokers(), &topic, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1, "one message on {topic}");
    let m = &got[0];
    assert_eq!(m.payload().unwrap(), body.as_slice(), "byte-identical body");
    assert_eq!(m.key().unwrap(), b"684446430300f917a02c198b", "key from {{body.workspaceId}}");
    assert_eq!(kafka_header(m, "ce_type").as_deref(), Some("NEW_TIME_ENTRY"));
    assert_eq!(kafka_header(m, "ce_source").as_deref(), Some("clockify"));
    assert_eq!(kafka_header(m, "ce_specversion").as_deref(), Some("1.0"));
    assert_eq!(kafka_header(m, "content-type").as_deref(), Some("application/json"));
    let id = kafka_header(m, "ce_id").unwrap();
    assert_eq!(id.len(), 36, "{id}");
    assert!(kafka_header(m, "ce_time").unwrap().ends_with('Z'));

    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="bus"}"#, 1.0).await;
    assert_eq!(metric(&m, r#"hookbridge_sink_connected{sink="bus"}"#), 1.0);
    let ready = readyz(&bridge).await;
    assert_eq!(ready["sinks"]["bus"]["connected"], true, "{ready}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_gets_the_templated_routing_key_headers_and_persistent_delivery() {
    let exchange = unique("hb-x");
    let queue = AmqpQueue::bind(&exchange, "clockify.#").await;
    let sinks = r#"
[sinks.rabbit]
kind = "amqp"
url = "@AMQP@"
exchange = { name = "@X@" }
routing_key = "{source}.{event}"
"#
    .replace("@X@", &exchange);
    let bridge = TestBridge::start(&config(&sinks, &["rabbit"])).await;
    let body = fixture_body();
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body.clone()).await;
    assert_eq!(s, 200);

    let got = queue.take(1, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 1);
    let m = &got[0];
    assert_eq!(m.delivery.data, body, "byte-identical body");
    assert_eq!(m.delivery.routing_key.as_str(), "clockify.NEW_TIME_ENTRY");
    let p = &m.delivery.properties;
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(p.content_type().as_ref().map(|c| c.as_str()), Some("application/json"));
    let id = amqp_header(m, "cloudEvents:id").unwrap();
    assert_eq!(p.message_id().as_ref().map(|c| c.as_str()), Some(id.as_str()));
    assert_eq!(amqp_header(m, "cloudEvents:type").as_deref(), Some("NEW_TIME_ENTRY"));
    assert_eq!(amqp_header(m, "cloudEvents:source").as_deref(), Some("clockify"));
    assert_eq!(amqp_header(m, "cloudEvents:specversion").as_deref(), Some("1.0"));
    assert!(amqp_header(m, "cloudEvents:time").unwrap().ends_with('Z'));

    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="rabbit"}"#, 1.0).await;
    assert_eq!(metric(&m, r#"hookbridge_sink_connected{sink="rabbit"}"#), 1.0);
    bridge.stop().await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_event_fans_out_to_kafka_amqp_and_http_once_each() {
    let prefix = unique("hb-f");
    let topic = format!("{prefix}.NEW_TIME_ENTRY");
    create_topic(&kafka_brokers(), &topic).await;
    let exchange = unique("hb-x");
    let queue = AmqpQueue::bind(&exchange, "#").await;
    let receiver = Receiver::start().await;
    let sinks = r#"
[sinks.bus]
kind = "kafka"
brokers = ["@KAFKA@"]
topic = "@P@.{event}"
[sinks.rabbit]
kind = "amqp"
url = "@AMQP@"
exchange = { name = "@X@" }
routing_key = "{event}"
[sinks.web]
kind = "http"
url = "@URL@"
"#
    .replace("@P@", &prefix)
    .replace("@X@", &exchange)
    .replace("@URL@", &receiver.url());
    let bridge = TestBridge::start(&config(&sinks, &["bus", "rabbit", "web"])).await;
    let body = fixture_body();
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), body.clone()).await;
    assert_eq!(s, 200);

    let web = receiver.wait_for(1, Duration::from_secs(20)).await;
    let amqp = queue.take(1, Duration::from_secs(20)).await;
    let kafka = consume(&kafka_brokers(), &topic, 1, Duration::from_secs(30)).await;
    assert_eq!((web.len(), amqp.len(), kafka.len()), (1, 1, 1));
    assert_eq!(web[0].body, body);
    assert_eq!(amqp[0].delivery.data, body);
    assert_eq!(kafka[0].payload().unwrap(), body.as_slice());
    // And only once: nothing more arrives.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.received().len(), 1);
    assert!(queue.take(1, Duration::from_millis(300)).await.is_empty());
    assert_eq!(consume(&kafka_brokers(), &topic, 2, Duration::from_secs(3)).await.len(), 1);
    bridge.stop().await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unroutable_amqp_message_fails_and_is_dead_lettered_never_delivered() {
    // The exchange exists but no queue is bound: with `mandatory`, RabbitMQ returns the message.
    let exchange = unique("hb-x");
    let sinks = r#"
[sinks.rabbit]
kind = "amqp"
url = "@AMQP@"
exchange = { name = "@X@" }
routing_key = "{event}"
retry = { initial_backoff = "50ms", max_backoff = "100ms", max_attempts = 3 }
"#
    .replace("@X@", &exchange);
    let bridge = TestBridge::start(&config(&sinks, &["rabbit"])).await;
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), fixture_body()).await;
    assert_eq!(s, 200);
    let m = bridge.wait_metric(r#"hookbridge_dead_letters{sink="rabbit"}"#, 1.0).await;
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="delivered",sink="rabbit"}"#), 0.0);
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="retry",sink="rabbit"}"#), 2.0);
    let dlq = bridge.cli(&["dlq", "list", "--sink", "rabbit"]);
    assert!(dlq.contains("unroutable") && dlq.contains("no queue is bound"), "{dlq}");
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_template_that_names_a_missing_body_field_fails_permanently_with_a_clear_message() {
    let exchange = unique("hb-x");
    let queue = AmqpQueue::bind(&exchange, "#").await;
    let prefix = unique("hb-m");
    let sinks = r#"
[sinks.rabbit]
kind = "amqp"
url = "@AMQP@"
exchange = { name = "@X@" }
routing_key = "{body.tenant.region}"
[sinks.bus]
kind = "kafka"
brokers = ["@KAFKA@"]
topic = "@P@.{event}"
key = "{body.noSuchField}"
"#
    .replace("@X@", &exchange)
    .replace("@P@", &prefix);
    let bridge = TestBridge::start(&config(&sinks, &["rabbit", "bus"])).await;
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), fixture_body()).await;
    assert_eq!(s, 200);
    // The counter moves once the outcome is recorded (the dead-letter gauge, read from the spool, can be ahead
    // of it by a moment): wait for the counters of both sinks.
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="dead",sink="rabbit"}"#, 1.0).await;
    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="dead",sink="bus"}"#, 1.0).await;
    // Permanent: dead at the first attempt, no retry.
    for sink in ["rabbit", "bus"] {
        bridge.wait_metric_eq(&format!(r#"hookbridge_dead_letters{{sink="{sink}"}}"#), 1.0).await;
        assert_eq!(metric(&m, &format!(r#"hookbridge_deliveries_total{{outcome="retry",sink="{sink}"}}"#)), 0.0);
        assert_eq!(metric(&m, &format!(r#"hookbridge_deliveries_total{{outcome="dead",sink="{sink}"}}"#)), 1.0);
    }
    let dlq = bridge.cli(&["dlq", "list"]);
    assert!(
        dlq.contains(r#"template "{body.tenant.region}": the body has no field "tenant.region" (missing "tenant")"#),
        "{dlq}"
    );
    assert!(dlq.contains(r#"template "{body.noSuchField}": the body has no field "noSuchField""#), "{dlq}");
    assert!(queue.take(1, Duration::from_millis(300)).await.is_empty());
    bridge.stop().await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_outage_every_acknowledged_event_arrives_after_the_broker_is_back() {
    let exchange = unique("hb-x");
    let queue = AmqpQueue::bind(&exchange, "#").await;
    let proxy = Outage::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = amqp_url().replace("127.0.0.1:5672", &proxy.addr.to_string());
    let sinks = r#"
[sinks.rabbit]
kind = "amqp"
url = "@URL@"
exchange = { name = "@X@" }
routing_key = "{event}"
timeout = "2s"
retry = { initial_backoff = "50ms", max_backoff = "300ms" }
"#
    .replace("@URL@", &url)
    .replace("@X@", &exchange);
    let bridge = TestBridge::start(&config(&sinks, &["rabbit"])).await;
    let post = |n: usize| post_entry(&bridge, n);
    for n in 0..5 {
        assert_eq!(post(n).await, 200);
    }
    assert_eq!(queue.take(5, Duration::from_secs(20)).await.len(), 5, "before the outage");

    proxy.down();
    for n in 5..25 {
        assert_eq!(post(n).await, 200, "webhooks keep being acknowledged while the broker is away");
    }
    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="retry",sink="rabbit"}"#, 3.0).await;
    assert_eq!(
        metric(&m, r#"hookbridge_deliveries_total{outcome="delivered",sink="rabbit"}"#),
        5.0,
        "nothing counted delivered while down"
    );
    let ready = readyz(&bridge).await;
    assert_eq!(ready["status"], "ready", "webhooks are still accepted: {ready}");
    assert_eq!(ready["sinks"]["rabbit"]["connected"], false, "{ready}");
    assert!(queue.take(1, Duration::from_millis(300)).await.is_empty());

    proxy.up();
    let got = queue.take(20, Duration::from_secs(30)).await;
    let mut ids: Vec<String> = got
        .iter()
        .map(|m| {
            serde_json::from_slice::<serde_json::Value>(&m.delivery.data).unwrap()["id"].as_str().unwrap().to_owned()
        })
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 20, "every event acknowledged during the outage arrives: {ids:?}");
    bridge.wait_metric(r#"hookbridge_sink_connected{sink="rabbit"}"#, 1.0).await;
    wait_drained(&bridge).await;
    bridge.stop().await;
    queue.delete().await;
}

/// A tansu broker of this test's own (in-memory), listening on `port` and advertising `advertised` (the
/// outage proxy, so that clients never bypass it), so that stopping it does not disturb other tests.
struct OwnKafka {
    child: Option<std::process::Child>,
}

impl OwnKafka {
    fn start(port: u16, advertised: SocketAddr) -> OwnKafka {
        // scripts/test sets it; the default is where scripts/kafka-broker installs tansu.
        let bin = std::env::var("HOOKBRIDGE_TANSU_BIN").unwrap_or_else(|_| {
            format!("{}/.cache/hookbridge/tansu-0.6.0/bin/tansu", std::env::var("HOME").unwrap_or_default())
        });
        assert!(
            std::path::Path::new(&bin).is_file(),
            "{bin} is missing: run the suite with scripts/test, which installs tansu (scripts/kafka-broker install)"
        );
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://{advertised}");
        let child = std::process::Command::new(bin)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &advertised])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        OwnKafka { child: Some(child) }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for OwnKafka {
    fn drop(&mut self) {
        self.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kafka_outage_every_acknowledged_event_arrives_after_the_broker_is_back() {
    // The daemon reaches the broker through a proxy that the broker also advertises; the broker itself is
    // stopped (killed: its in-memory log goes with it) and a new one takes its place behind the proxy. A
    // killed broker's port stays in TIME_WAIT for a minute, so the new one listens on another port.
    let proxy = Outage::start("127.0.0.1:9".parse().unwrap()).await;
    let port = free_port();
    let mut broker = OwnKafka::start(port, proxy.addr);
    proxy.retarget(SocketAddr::from(([127, 0, 0, 1], port)));
    let brokers = proxy.addr.to_string();
    let topic = unique("hb-o");
    create_topic(&brokers, &topic).await;
    let sinks = r#"
[sinks.bus]
kind = "kafka"
brokers = ["@B@"]
topic = "@T@"
key = "{body.id}"
message_timeout = "2s"
retry = { initial_backoff = "100ms", max_backoff = "500ms" }
"#
    .replace("@B@", &brokers)
    .replace("@T@", &topic);
    let bridge = TestBridge::start(&config(&sinks, &["bus"])).await;
    let post = |n: usize| post_entry(&bridge, n);
    assert_eq!(post(0).await, 200);
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="bus"}"#, 1.0).await;

    // The broker goes away.
    proxy.down();
    broker.stop();
    for n in 1..16 {
        assert_eq!(post(n).await, 200, "webhooks keep being acknowledged while the broker is away");
    }
    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="retry",sink="bus"}"#, 2.0).await;
    assert_eq!(
        metric(&m, r#"hookbridge_deliveries_total{outcome="delivered",sink="bus"}"#),
        1.0,
        "nothing counted delivered while down"
    );
    // Readiness reports the broker away (librdkafka's statistics come every second) but stays ready.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ready = readyz(&bridge).await;
        assert_eq!(ready["status"], "ready", "{ready}");
        if ready["sinks"]["bus"]["connected"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "the broker never showed as disconnected: {ready}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A new broker, empty, behind the same address.
    let port = free_port();
    let _broker = OwnKafka::start(port, proxy.addr);
    proxy.retarget(SocketAddr::from(([127, 0, 0, 1], port)));
    proxy.up();
    create_topic(&brokers, &topic).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="bus"}"#, 16.0).await;
    let got = consume(&brokers, &topic, 15, Duration::from_secs(30)).await;
    let mut keys: Vec<String> = got.iter().map(|m| String::from_utf8_lossy(m.key().unwrap()).into_owned()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 15, "every event acknowledged during the outage is on the new broker: {keys:?}");
    wait_drained(&bridge).await;
    bridge.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn values_over_the_wire_limits_are_dead_lettered_at_once_and_the_connection_keeps_delivering() {
    let exchange = unique("hb-x");
    let queue = AmqpQueue::bind(&exchange, "#").await;
    let prefix = unique("hb-w");
    let (receiver, file) = (Receiver::start().await, "{dir}/out.jsonl");
    let sinks = r#"
[sinks.rabbit]
kind = "amqp"
url = "@AMQP@"
exchange = { name = "@X@" }
routing_key = "{event}"
[sinks.bus]
kind = "kafka"
brokers = ["@KAFKA@"]
topic = "@P@.{event}"
[sinks.hook]
kind = "http"
url = "@URL@"
[sinks.file]
kind = "file"
path = "@FILE@"
"#
    .replace("@X@", &exchange)
    .replace("@P@", &prefix)
    .replace("@URL@", &receiver.url())
    .replace("@FILE@", file);
    let text = config(&sinks, &["rabbit", "bus", "hook", "file"])
        .replace("[server]\n", "[server]\nmax_body_size = \"2MiB\"\n");
    let bridge = TestBridge::start(&text).await;
    create_topic(&kafka_brokers(), &format!("{prefix}.NEW_TIME_ENTRY")).await;
    // A 320-byte Content-Type (an AMQP short string holds 255), and a body over Kafka's 1 MB record limit.
    let long_type = format!("application/json; profile={}", "x".repeat(294));
    let mut headers = clockify_headers(SECRET, "NEW_TIME_ENTRY");
    headers.retain(|(k, _)| *k != "content-type");
    headers.push(("content-type", &long_type));
    let (s, _) = bridge.post("/hooks/clockify", &headers, fixture_body()).await;
    assert_eq!(s, 200);
    let huge = format!(r#"{{"id":"huge","description":"{}"}}"#, "y".repeat(1_100_000));
    let (s, _) = bridge.post("/hooks/clockify", &clockify_headers(SECRET, "NEW_TIME_ENTRY"), huge).await;
    assert_eq!(s, 200);
    // Each is a permanent failure of its one delivery: dead at the first attempt, with a clear reason.
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="dead",sink="rabbit"}"#, 1.0).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="dead",sink="bus"}"#, 1.0).await;
    let dlq = bridge.cli(&["dlq", "list"]);
    assert!(dlq.contains("content-type header is 320 bytes; AMQP short strings hold at most 255"), "{dlq}");
    assert!(dlq.contains("message.max.bytes"), "{dlq}");
    // 50 normal events after them are delivered over the same connections, within seconds.
    for n in 0..50 {
        assert_eq!(post_entry(&bridge, n).await, 200);
    }
    let got = queue.take(51, Duration::from_secs(20)).await;
    assert_eq!(got.len(), 51, "the huge one and the 50 normal ones; the long content type never sent");
    let m = bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="bus"}"#, 51.0).await;
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="retry",sink="rabbit"}"#), 0.0, "{m}");
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="dead",sink="rabbit"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_deliveries_total{outcome="dead",sink="bus"}"#), 1.0);
    assert_eq!(metric(&m, r#"hookbridge_sink_connected{sink="rabbit"}"#), 1.0);
    // The HTTP and file sinks take both oversize cases.
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="hook"}"#, 52.0).await;
    bridge.wait_metric(r#"hookbridge_deliveries_total{outcome="delivered",sink="file"}"#, 52.0).await;
    bridge.stop().await;
    receiver.stop().await;
    queue.delete().await;
}
