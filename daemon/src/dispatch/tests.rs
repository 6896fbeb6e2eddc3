//! The dispatcher against a real spool (a temporary directory) and recording sinks.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::Dispatcher;
use crate::config::RetryPolicy;
use crate::event::{Event, now_ms};
use crate::metrics::Metrics;
use crate::sinks::{BoxFuture, Sink, SinkError};
use crate::store::{Dedup, Engine, Operator, Store};

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
        body_is_json: false,
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
        sink_metrics: Default::default(),
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
    backlog_and_overflowing_feed_deliver_everything_in_order_on(Engine::Sqlite).await;
}

/// The same on the log engine (a retry goes through its cold path).
#[tokio::test]
async fn backlog_and_overflowing_feed_deliver_everything_in_order_on_the_log() {
    backlog_and_overflowing_feed_deliver_everything_in_order_on(Engine::Log).await;
}

async fn backlog_and_overflowing_feed_deliver_everything_in_order_on(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_engine(dir.path(), engine).unwrap();
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
    batches_keep_order_per_entity_and_retry_alone_on(Engine::Sqlite).await;
}

/// The same on the log engine (a retry goes through its cold path).
#[tokio::test]
async fn batches_keep_order_per_entity_and_retry_alone_on_the_log() {
    batches_keep_order_per_entity_and_retry_alone_on(Engine::Log).await;
}

async fn batches_keep_order_per_entity_and_retry_alone_on(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_engine(dir.path(), engine).unwrap();
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
/// once the lock goes, everything is delivered and recorded. (The SQLite engine: on the log engine a
/// delivered outcome does not touch SQLite.)
#[tokio::test]
async fn a_delivered_event_frees_its_slot_while_its_outcome_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_engine(dir.path(), Engine::Sqlite).unwrap();
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
    a_replay_is_delivered_once_on(Engine::Sqlite).await;
}

/// On the log engine an operator's replay is appended to the log at the daemon's next resync, as a new
/// event behind the cursor's: delivered once too.
#[tokio::test]
async fn a_replay_is_delivered_once_on_the_log() {
    a_replay_is_delivered_once_on(Engine::Log).await;
}

async fn a_replay_is_delivered_once_on(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_engine(dir.path(), engine).unwrap();
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
    store.resync().await.unwrap(); // what the daemon does every second
    wait_for(&sink, 3).await;
    tokio::time::sleep(Duration::from_millis(2500)).await; // two more polls: nothing is taken twice
    let mut got = sink.0.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, ["a", "a", "b"]);
    cancel.cancel();
    task.await.unwrap();
    store.close().await;
}
