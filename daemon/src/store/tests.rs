use super::*;
use crate::event::now_ms;
use bytes::Bytes;

pub(in crate::store) fn event(id: &str, body: &str) -> Event {
    Event {
        id: id.into(),
        source: "clockify".into(),
        event_type: "NEW_TIME_ENTRY".into(),
        received_at_ms: now_ms(),
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(body.to_owned()),
        dedup_key: format!("k-{id}"),
        ordering_key: None,
        body_is_json: false,
    }
}

/// The SQLite engine's own tests run on it by name (the log engine's are in `logged/tests.rs`).
fn sqlite(dir: &std::path::Path) -> Result<Store, StoreError> {
    Store::open_engine(dir, Engine::Sqlite)
}

fn attempt() -> Attempt {
    Attempt { started_at_ms: now_ms(), duration_ms: 3, status: None }
}

pub(in crate::store) async fn new(store: &Store, id: &str, body: &str, sinks: &[&str]) -> i64 {
    match store.insert(event(id, body), sinks.iter().map(|s| s.to_string()).collect(), Dedup::Off).await.unwrap() {
        Inserted::New { seq } => seq,
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn events_survive_reopen_and_gauges_follow_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    let a = new(&store, "a", "{\"n\":1}", &["s1", "s2"]).await;
    let b = new(&store, "b", "{\"n\":2}", &["s1"]).await;
    new(&store, "c", "{}", &[]).await;
    assert!(a < b);
    assert_eq!(store.gauges().snapshot(), (2, 14, 3));
    store.close().await;

    let store = sqlite(dir.path()).unwrap();
    assert_eq!(store.gauges().snapshot(), (2, 14, 3));
    let pending = store.pending("s1", 0, 10).await.unwrap();
    assert_eq!(pending.iter().map(|p| p.event.id.as_str()).collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(pending[0].event.body, Bytes::from_static(b"{\"n\":1}"));
    let (a1, b1) = (pending[0].id, pending[1].id);
    assert_eq!(store.pending("s1", a1, 10).await.unwrap().len(), 1);
    let a2 = store.pending("s2", 0, 10).await.unwrap()[0].id;

    let retry = Outcome::Retry { next_attempt_ms: now_ms(), error: "HTTP 503".into() };
    store.record("s1", a1, 1, retry, Attempt { status: Some(503), ..attempt() }).await.unwrap();
    assert_eq!(store.pending("s1", 0, 10).await.unwrap()[0].attempts, 1);
    store.record("s1", a1, 2, Outcome::Delivered, attempt()).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (2, 14, 2));
    store
        .record("s2", a2, 1, Outcome::Dead("HTTP 410".into()), Attempt { status: Some(410), ..attempt() })
        .await
        .unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 1));
    // Recording twice changes nothing.
    store.record("s2", a2, 1, Outcome::Delivered, attempt()).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 1));
    let detail = store.event("a").await.unwrap().unwrap();
    assert_eq!(detail.summary.status, "dead");
    type Row<'a> = (&'a str, &'a str, u32, Option<&'a str>, Option<u16>);
    let d: Vec<Row<'_>> = detail
        .deliveries
        .iter()
        .map(|d| (d.sink.as_str(), d.status.as_str(), d.attempts, d.last_error.as_deref(), d.last_status))
        .collect();
    assert_eq!(
        d,
        [("s1", "delivered", 2, Some("HTTP 503"), Some(503)), ("s2", "dead", 1, Some("HTTP 410"), Some(410))]
    );
    let outcomes: Vec<&str> = detail.attempts.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["retry", "delivered", "dead"]);

    // A fully delivered event, with its attempt.
    new(&store, "d", "{}", &["s1"]).await;
    let d1 = store.pending("s1", a1, 10).await.unwrap().into_iter().find(|p| p.event.id == "d").unwrap().id;
    store.record("s1", d1, 1, Outcome::Delivered, attempt()).await.unwrap();
    assert_eq!(store.event("d").await.unwrap().unwrap().attempts.len(), 1);

    // Pruning keeps the dead letter's event and the pending one; it removes the unrouted and the delivered one.
    assert_eq!(store.prune(now_ms() + 1, 1).await.unwrap(), 1, "one at a time");
    assert_eq!(store.prune(now_ms() + 1, 100).await.unwrap(), 1);
    assert!(store.event("d").await.unwrap().is_none());
    assert!(store.event("a").await.unwrap().is_some(), "an event with a dead letter is kept");
    assert!(store.event("b").await.unwrap().is_some(), "a pending event is kept");
    assert!(store.event("c").await.unwrap().is_none());
    // A dead letter keeps its history; attempts go with their event when it is pruned.
    assert_eq!(store.event("a").await.unwrap().unwrap().attempts.len(), 3);
    let _ = b1;
    store.close().await;
}

#[tokio::test]
async fn duplicates_within_the_window_are_not_stored() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    let since = Dedup::DeliveryId { since_ms: now_ms() - 60_000 };
    let first = store.insert(event("x1", "{}"), vec!["s".into()], since).await.unwrap();
    assert!(matches!(first, Inserted::New { .. }));
    let mut again = event("x2", "{}");
    again.dedup_key = "k-x1".into();
    // Concurrently and one after the other: the single writer sees the first in both cases.
    let (r1, r2) = tokio::join!(
        store.insert(again.clone(), vec!["s".into()], since),
        store.insert(again.clone(), vec!["s".into()], since)
    );
    assert!(matches!(r1.unwrap(), Inserted::Duplicate { ref original, .. } if original == "x1"));
    assert!(matches!(r2.unwrap(), Inserted::Duplicate { ref original, .. } if original == "x1"));
    // Outside the window it is a new event.
    let r = store.insert(again, vec!["s".into()], Dedup::DeliveryId { since_ms: now_ms() + 1 }).await.unwrap();
    assert!(matches!(r, Inserted::New { .. }));
    assert_eq!(store.gauges().snapshot().2, 2);
    store.close().await;
}

#[tokio::test]
async fn operators_replay_retry_and_purge_beside_a_running_writer() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    new(&store, "a", "{}", &["s"]).await;
    new(&store, "b", "{}", &["s"]).await;
    let rows = store.pending("s", 0, 10).await.unwrap();
    store.record("s", rows[0].id, 1, Outcome::Dead("HTTP 400".into()), attempt()).await.unwrap();
    store.record("s", rows[1].id, 1, Outcome::Delivered, attempt()).await.unwrap();

    let mut op = Operator::open(dir.path()).unwrap();
    let dead = op.dead_letters(None).unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].event_id.as_str(), dead[0].last_error.as_deref()), ("a", Some("HTTP 400")));
    assert_eq!(op.retry_dead(&[dead[0].delivery_id, 999]).unwrap(), 1);
    assert!(op.dead_letters(None).unwrap().is_empty());
    let seqs = op.replay_targets(Some("b"), 0, 0).unwrap();
    assert_eq!(op.replay(&seqs, None).unwrap(), 1);

    // The daemon's side sees both as new pending deliveries after the old cursor, marked replay.
    let again = store.pending("s", rows[1].id, 10).await.unwrap();
    assert_eq!(again.iter().map(|p| (p.event.id.as_str(), p.replay)).collect::<Vec<_>>(), [("a", true), ("b", true)]);
    store.resync().await.unwrap();
    assert_eq!(store.gauges().snapshot().2, 2);
    let listed = op.events(&EventFilter { status: Some("pending".into()), limit: 10, ..Default::default() }).unwrap();
    assert_eq!(listed.len(), 2);

    // Purge gives a dead letter up.
    store.record("s", again[0].id, 1, Outcome::Dead("HTTP 400".into()), attempt()).await.unwrap();
    let id = op.dead_letters(Some("s")).unwrap()[0].delivery_id;
    assert_eq!(op.purge_dead(&[id]).unwrap(), 1);
    assert!(op.dead_letters(None).unwrap().is_empty());
    assert_eq!(op.event("a").unwrap().unwrap().summary.status, "purged");
    store.close().await;
}

#[tokio::test]
async fn one_daemon_per_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    let second = sqlite(dir.path());
    assert!(matches!(&second, Err(StoreError::Schema(m)) if m.contains("in use")), "{second:?}");
    store.close().await;
}

#[tokio::test]
async fn handshakes_are_kept_bounded_and_listed() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    for i in 0..(crate::limits::HANDSHAKES_KEPT + 5) {
        store.record_handshake("clockodo", &format!("secret-{i}"), i).await.unwrap();
    }
    store.ping().await.unwrap();
    let list = Operator::open(dir.path()).unwrap().handshakes().unwrap();
    assert_eq!(list.len() as i64, crate::limits::HANDSHAKES_KEPT);
    assert_eq!(list[0].secret, format!("secret-{}", crate::limits::HANDSHAKES_KEPT + 4));
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Closed)));
}

/// Operations committed together: one that fails (an id already stored) gets its error, and every other
/// operation of the batch is committed and answered as if it had been alone.
#[tokio::test]
async fn a_failing_operation_leaves_the_rest_of_its_batch_committed() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    new(&store, "taken", "{}", &["s"]).await;
    let inserts = (0..40).map(|i| {
        let id = if i == 20 { "taken".to_owned() } else { format!("e{i}") };
        store.insert(event(&id, "{\"n\":1}"), vec!["s".into()], Dedup::Off)
    });
    let results = futures_util::future::join_all(inserts).await;
    for (i, r) in results.iter().enumerate() {
        assert_eq!(r.is_err(), i == 20, "{i}: {r:?}");
    }
    // 39 new events and the first one, each with its delivery; the failed one left nothing behind.
    assert_eq!(store.gauges().snapshot().0, 40);
    assert_eq!(store.pending("s", 0, 100).await.unwrap().len(), 40);
    store.close().await;
    let store = sqlite(dir.path()).unwrap();
    assert_eq!(store.gauges().snapshot().0, 40);
    store.close().await;
}

/// The dedup index lives in the writer's memory: after a restart it is filled from the spool for the window,
/// and a window lengthened later (a reload) reaches back to events the map had not loaded.
#[tokio::test]
async fn duplicates_are_found_across_a_restart_and_a_longer_window() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    let mut old = event("old", "{}");
    old.received_at_ms = now_ms() - 3_600_000;
    store.insert(old, vec!["s".into()], Dedup::DeliveryId { since_ms: now_ms() - 60_000 }).await.unwrap();
    new(&store, "recent", "{}", &["s"]).await;
    store.close().await;

    let store = sqlite(dir.path()).unwrap();
    let copy = |id: &str, of: &str| {
        let mut e = event(id, "{}");
        e.dedup_key = format!("k-{of}");
        e
    };
    let minute = Dedup::DeliveryId { since_ms: now_ms() - 60_000 };
    let r = store.insert(copy("c1", "recent"), vec!["s".into()], minute).await.unwrap();
    assert!(matches!(r, Inserted::Duplicate { ref original, .. } if original == "recent"));
    // An hour ago is outside a one-minute window...
    let r = store.insert(copy("c2", "old"), vec!["s".into()], minute).await.unwrap();
    assert!(matches!(r, Inserted::New { .. }), "{r:?}");
    // ...and inside a two-hour one: the original (not the copy just stored) is found.
    let r = store
        .insert(copy("c3", "old"), vec!["s".into()], Dedup::DeliveryId { since_ms: now_ms() - 7_200_000 })
        .await
        .unwrap();
    assert!(matches!(r, Inserted::Duplicate { ref original, .. } if original == "old"));
    // Same key from another source: not a duplicate.
    let mut other = copy("c4", "recent");
    other.source = "clockodo".into();
    assert!(matches!(store.insert(other, vec![], minute).await.unwrap(), Inserted::New { .. }));
    store.close().await;
}

/// A spool made by schema version 3 (with its on-disk dedup index) opens, loses that index, and dedups.
#[tokio::test]
async fn a_version_3_spool_is_migrated() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    new(&store, "a", "{}", &["s"]).await;
    store.close().await;
    {
        let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
        conn.execute_batch("CREATE INDEX events_dedup_hash ON events (dedup_hash); PRAGMA user_version = 3;").unwrap();
    }
    let store = sqlite(dir.path()).unwrap();
    let mut copy = event("b", "{}");
    copy.dedup_key = "k-a".into();
    let r = store.insert(copy, vec!["s".into()], Dedup::DeliveryId { since_ms: now_ms() - 60_000 }).await.unwrap();
    assert!(matches!(r, Inserted::Duplicate { ref original, .. } if original == "a"));
    store.close().await;
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let indexes: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_master WHERE name = 'events_dedup_hash'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(indexes, 0);
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, 6);
}

/// When the WAL cannot be synced (here: someone deleted it under the running daemon), the webhook waiting
/// for that sync gets an error, not an acknowledgement, and the spool refuses everything after it.
#[tokio::test]
async fn a_failed_sync_is_never_acknowledged_and_stops_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    new(&store, "a", "{}", &["s"]).await;
    std::fs::remove_file(dir.path().join(format!("{DB_FILE}-wal"))).unwrap();
    let r = store.insert(event("b", "{}"), vec!["s".into()], Dedup::Off).await;
    assert!(matches!(r, Err(StoreError::Commit(ref m)) if m.contains("cannot sync")), "{r:?}");
    let r = store.insert(event("c", "{}"), vec!["s".into()], Dedup::Off).await;
    assert!(r.is_err(), "{r:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !store.is_closed() {
        assert!(std::time::Instant::now() < deadline, "the writer kept running");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(store.ping().await.is_err());
}

/// Outcomes recorded with the event's seq and body length given by the caller (as the dispatcher does) move
/// the gauges as those read back from the spool do; a second record of a finished delivery changes nothing
/// and adds no attempt.
#[tokio::test]
async fn records_with_the_event_given_by_the_caller_match_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let store = sqlite(dir.path()).unwrap();
    new(&store, "a", "{\"n\":1}", &["s1", "s2"]).await;
    new(&store, "b", "{\"n\":22}", &["s1"]).await;
    assert_eq!(store.gauges().snapshot(), (2, 15, 3));
    let rows = store.pending("s1", 0, 10).await.unwrap();
    let known = |p: &PendingDelivery| Some((p.seq, p.event.body.len() as i64));
    let rec = |p: &PendingDelivery, outcome: Outcome| Record {
        delivery_id: p.id,
        attempts: 1,
        outcome,
        attempt: attempt(),
        event: known(p),
    };
    let retry = Outcome::Retry { next_attempt_ms: now_ms(), error: "HTTP 503".into() };
    store.record_all("s1", vec![rec(&rows[0], retry), rec(&rows[1], Outcome::Delivered)]).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 2), "b's only delivery finished; a still has two pending");
    store.record_all("s1", vec![rec(&rows[1], Outcome::Dead("late".into()))]).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 2), "recording twice changes nothing");
    let b = store.event("b").await.unwrap().unwrap();
    assert_eq!(b.summary.status, "delivered");
    assert_eq!(b.attempts.len(), 1, "the ignored record left no attempt");
    store.record_all("s1", vec![rec(&rows[0], Outcome::Delivered)]).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 1), "a's other sink is still pending");
    let s2 = store.pending("s2", 0, 10).await.unwrap();
    store.record_all("s2", vec![rec(&s2[0], Outcome::Delivered)]).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));
    store.close().await;
}
