//! The log engine behind `Store`: the same promises as the SQLite engine, with the cold path in SQLite.

use bytes::Bytes;

use super::super::cold::ColdWrite;
use super::super::tests::{event, new};
use super::super::*;
use crate::event::now_ms;

fn open(dir: &Path) -> Store {
    Store::open_engine(dir, Engine::Log).unwrap()
}

fn attempt(status: Option<u16>) -> Attempt {
    Attempt { started_at_ms: now_ms(), duration_ms: 3, status }
}

fn retry() -> Outcome {
    Outcome::Retry { next_attempt_ms: now_ms() + 60_000, error: "HTTP 503".into() }
}

fn ids(rows: &[PendingDelivery]) -> Vec<&str> {
    rows.iter().map(|p| p.event.id.as_str()).collect()
}

fn dead_letters(dir: &Path) -> Vec<(String, i64, String, u32)> {
    let conn = rusqlite::Connection::open(dir.join(DB_FILE)).unwrap();
    let mut stmt = conn.prepare("SELECT sink, seq, last_error, attempts FROM dead_letters ORDER BY id").unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))).unwrap().map(Result::unwrap).collect()
}

/// Events through their whole life: pending after a restart, a retry moved to the cold path (counted,
/// served in order with what the log holds, its attempts kept), delivered from there, a dead letter, a
/// second record that changes nothing, and gauges that end at zero and stay there across a restart.
#[tokio::test]
async fn deliveries_move_to_the_cold_path_and_back_out_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = new(&store, "a", "{\"n\":1}", &["s1", "s2"]).await;
    let b = new(&store, "b", "{\"n\":2}", &["s1"]).await;
    new(&store, "c", "{}", &[]).await;
    assert!(a < b);
    assert_eq!(store.gauges().snapshot(), (2, 14, 3));
    assert_eq!(store.gauges().unrouted(), (1, 2));
    store.close().await;
    assert!(matches!(store.ping().await, Err(StoreError::Closed)));

    let store = open(dir.path());
    assert_eq!(store.gauges().snapshot(), (2, 14, 3));
    let s1 = store.pending("s1", 0, 10).await.unwrap();
    assert_eq!(ids(&s1), ["a", "b"]);
    assert_eq!(s1[0].event.body, Bytes::from_static(b"{\"n\":1}"));
    assert_eq!((s1[0].id, s1[1].id), (a, b));

    // a's first attempt to s1 fails: it moves to SQLite, still pending and counted.
    store.record("s1", a, 1, retry(), attempt(Some(503))).await.unwrap();
    assert_eq!(store.gauges().snapshot().2, 3, "a retry is still pending");
    store.close().await;

    let store = open(dir.path());
    assert_eq!(store.gauges().snapshot().2, 3);
    let s1 = store.pending("s1", 0, 10).await.unwrap();
    assert_eq!(ids(&s1), ["a", "b"], "the deferred delivery and the logged one, in seq order");
    assert_eq!((s1[0].attempts, s1[1].attempts), (1, 0));
    assert!(s1[0].next_attempt_ms.is_some_and(|t| t > now_ms()), "its next attempt stays due later");
    assert_eq!(s1[0].event.body, Bytes::from_static(b"{\"n\":1}"), "served from its copy");
    assert_eq!(ids(&store.pending("s1", a, 10).await.unwrap()), ["b"]);

    store.record("s1", a, 2, retry(), attempt(Some(502))).await.unwrap();
    store.record("s1", a, 3, Outcome::Delivered, attempt(Some(200))).await.unwrap();
    store.record("s1", b, 1, Outcome::Delivered, attempt(Some(200))).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (1, 7, 1), "only a's delivery to s2 is left");
    // Recording twice changes nothing: neither a dead letter nor a count.
    store.record("s1", a, 4, Outcome::Dead("late".into()), attempt(None)).await.unwrap();
    store.record("s1", b, 2, Outcome::Dead("late".into()), attempt(None)).await.unwrap();
    assert!(dead_letters(dir.path()).is_empty());
    assert_eq!(store.gauges().snapshot(), (1, 7, 1));

    let s2 = store.pending("s2", 0, 10).await.unwrap();
    assert_eq!(ids(&s2), ["a"]);
    store.record("s2", a, 1, Outcome::Dead("HTTP 410".into()), attempt(Some(410))).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));
    assert_eq!(dead_letters(dir.path()), [("s2".to_owned(), a, "HTTP 410".to_owned(), 1)]);
    let stats = store.sink_stats().await.unwrap();
    let s2_stats = stats.iter().find(|s| s.sink == "s2").unwrap();
    assert_eq!((s2_stats.dead, s2_stats.oldest_pending_ms), (1, None));
    assert!(store.pending("s1", 0, 10).await.unwrap().is_empty());
    store.close().await;

    let store = open(dir.path());
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));
    assert!(store.pending("s1", 0, 10).await.unwrap().is_empty());
    assert!(store.pending("s2", 0, 10).await.unwrap().is_empty());
    // The attempt log holds the failures and the success after them, not a first-attempt success.
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    let outcomes: Vec<(String, i64, String)> = conn
        .prepare("SELECT sink, seq, outcome FROM failed_attempts ORDER BY id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let o = |s: &str, seq, out: &str| (s.to_owned(), seq, out.to_owned());
    assert_eq!(outcomes, [o("s1", a, "retry"), o("s1", a, "retry"), o("s1", a, "delivered"), o("s2", a, "dead")]);
    store.close().await;
}

/// A move whose SQLite commit landed and whose log checkpoint did not (a crash between the two): SQLite
/// wins at the next start, the log's copy of the delivery is not handed out again, and nothing is lost.
#[tokio::test]
async fn a_crash_between_the_move_and_the_log_checkpoint_leaves_one_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = new(&store, "a", "{}", &["s"]).await;
    let b = new(&store, "b", "{}", &["s"]).await;
    let c = new(&store, "c", "{}", &["s"]).await;
    let rows = store.pending("s", 0, 10).await.unwrap();
    assert_eq!(ids(&rows), ["a", "b", "c"]);
    // The moves alone, as the crash leaves them: a deferred, b dead-lettered, the log not told.
    let Backend::Log(l) = &store.backend else { unreachable!() };
    let rec = |id, outcome| Record { delivery_id: id, attempts: 1, outcome, attempt: attempt(None), event: None };
    let writes = vec![
        ColdWrite::Move { sink: "s".into(), event: Arc::clone(&rows[0].event), replay: false, record: rec(a, retry()) },
        ColdWrite::Move {
            sink: "s".into(),
            event: Arc::clone(&rows[1].event),
            replay: false,
            record: rec(b, Outcome::Dead("x".into())),
        },
    ];
    l.sqlite().cold(writes.clone()).await.unwrap();
    // Recorded again (as a dispatcher does when an answer was lost): no second dead letter.
    l.sqlite().cold(writes).await.unwrap();
    assert_eq!(dead_letters(dir.path()).len(), 1);
    store.close().await;

    let store = open(dir.path());
    let rows = store.pending("s", 0, 10).await.unwrap();
    assert_eq!(ids(&rows), ["a", "c"], "a once (deferred), b not at all (dead), c from the log");
    assert_eq!((rows[0].attempts, rows[1].attempts), (1, 0));
    assert_eq!(store.gauges().snapshot().2, 2);
    store.record("s", a, 2, Outcome::Delivered, attempt(None)).await.unwrap();
    store.record("s", c, 1, Outcome::Delivered, attempt(None)).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));
    store.close().await;
    let store = open(dir.path());
    assert!(store.pending("s", 0, 10).await.unwrap().is_empty(), "the log was told, durably");
    store.close().await;
}

/// Dedup on the log engine, across a restart.
#[tokio::test]
async fn duplicates_are_found_in_the_log_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    new(&store, "x1", "{}", &["s"]).await;
    store.close().await;
    let store = open(dir.path());
    let mut copy = event("x2", "{}");
    copy.dedup_key = "k-x1".into();
    let since = Dedup::DeliveryId { since_ms: now_ms() - 60_000 };
    let r = store.insert(copy, vec!["s".into()], since).await.unwrap();
    assert!(matches!(r, Inserted::Duplicate { ref original, .. } if original == "x1"), "{r:?}");
    assert_eq!(store.gauges().snapshot().2, 1);
    store.close().await;
}

/// A SQLite-engine spool is taken over at the first start on the log engine: pending deliveries (their
/// attempts and due times kept) go first, in seq order per sink, ahead of new events; a pending replay is
/// replayed; dead letters stay dead letters with their attempts; finished deliveries are left to retention.
/// After that the SQLite engine refuses the spool, and a second start takes nothing over again.
#[tokio::test]
async fn a_sqlite_spool_is_taken_over_with_its_pending_deliveries_first() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_engine(dir.path(), Engine::Sqlite).unwrap();
    let a = new(&store, "a", "{\"n\":1}", &["s1"]).await;
    new(&store, "b", "{}", &["s1", "s2"]).await;
    new(&store, "c", "{}", &["s2"]).await;
    new(&store, "d", "{}", &["s1"]).await;
    let s1 = store.pending("s1", 0, 10).await.unwrap();
    let s2 = store.pending("s2", 0, 10).await.unwrap();
    let due = now_ms() + 3_600_000;
    let later = Outcome::Retry { next_attempt_ms: due, error: "HTTP 503".into() };
    store.record("s1", s1[0].id, 1, later, attempt(Some(503))).await.unwrap();
    store.record("s2", s2[1].id, 2, Outcome::Dead("HTTP 410".into()), attempt(Some(410))).await.unwrap();
    store.record("s1", s1[2].id, 1, Outcome::Delivered, attempt(None)).await.unwrap();
    store.record("s2", s2[0].id, 1, Outcome::Delivered, attempt(None)).await.unwrap();
    let mut op = Operator::open(dir.path()).unwrap();
    let d = op.replay_targets(Some("d"), 0, 0).unwrap();
    assert_eq!(op.replay(&d, None).unwrap(), 1);
    drop(op);
    store.resync().await.unwrap();
    assert_eq!(store.gauges().snapshot().2, 3, "a and b to s1, d's replay");
    store.close().await;

    let store = open(dir.path());
    assert_eq!(store.gauges().snapshot().2, 2, "a and b; the replay is taken in at the first resync");
    let e = new(&store, "e", "{}", &["s1"]).await;
    store.resync().await.unwrap();
    let rows = store.pending("s1", 0, 10).await.unwrap();
    assert_eq!(ids(&rows), ["a", "b", "e", "d"], "the SQLite engine's first, then the log in order");
    assert!(rows[2].id > rows[1].id && e > rows[1].id, "the log starts above the SQLite engine's seqs");
    assert_eq!(
        (rows[0].id, rows[0].attempts, rows[0].next_attempt_ms),
        (a, 1, Some(due)),
        "a's retry keeps its due time"
    );
    assert_eq!((rows[1].attempts, rows[1].next_attempt_ms), (0, None));
    assert_eq!(rows[0].event.body, Bytes::from_static(b"{\"n\":1}"));
    assert!(rows[3].replay);
    let dead = Operator::open(dir.path()).unwrap().dead_letters(None).unwrap();
    assert_eq!(dead.iter().map(|d| (d.event_id.as_str(), d.attempts)).collect::<Vec<_>>(), [("c", 2)]);
    let shown = Operator::open(dir.path()).unwrap().event("a").unwrap().unwrap();
    assert_eq!((shown.summary.status.as_str(), shown.body.as_str()), ("pending", "{\"n\":1}"), "from its copy");
    assert_eq!(shown.deliveries[0].attempts, 1);
    assert_eq!(
        shown.attempts.iter().map(|a| a.outcome.as_str()).collect::<Vec<_>>(),
        ["retry"],
        "its attempts came along"
    );
    for r in &rows {
        store.record("s1", r.id, r.attempts + 1, Outcome::Delivered, attempt(None)).await.unwrap();
    }
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));
    store.close().await;

    let e = Store::open_engine(dir.path(), Engine::Sqlite).unwrap_err();
    assert!(e.to_string().contains("storage.engine = \"log\""), "{e}");
    let store = open(dir.path());
    assert!(store.pending("s1", 0, 10).await.unwrap().is_empty(), "nothing is taken over twice");
    assert_eq!(Operator::open(dir.path()).unwrap().dead_letters(None).unwrap().len(), 1);
    store.close().await;
}

/// Dedup remembers what the SQLite engine stored: after the takeover (and after a restart on the log), a
/// provider's retry of an event received before it is a duplicate of the original; a content copy is one
/// only if the original's answer was uncertain (as recorded by the SQLite engine), and a duplicate's answer
/// reported on the log makes the original certain from then on.
#[tokio::test]
async fn dedup_finds_the_sqlite_engines_events_after_a_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let id_window = || Dedup::DeliveryId { since_ms: now_ms() - 60_000 };
    let content = || Dedup::Content { since_ms: now_ms() - 60_000, retry_since_ms: i64::MAX };
    let store = Store::open_engine(dir.path(), Engine::Sqlite).unwrap();
    store.insert(event("a", "{}"), vec!["s".into()], id_window()).await.unwrap();
    let Inserted::New { seq: b } = store.insert(event("b", "{}"), vec!["s".into()], content()).await.unwrap() else {
        panic!("b is new")
    };
    store.insert(event("c", "{}"), vec!["s".into()], content()).await.unwrap();
    store.answered(b, dedup_hash("k-b"), false);
    new(&store, "z", "{}", &[]).await; // takes the answer in
    store.close().await;

    let copy = |id: &str, of: &str| {
        let mut e = event(id, "{}");
        e.dedup_key = format!("k-{of}");
        e
    };
    for (round, source) in [("after the takeover", "clockodo"), ("after a restart on the log", "generic")] {
        let store = open(dir.path());
        let r = store.insert(copy("a2", "a"), vec!["s".into()], id_window()).await.unwrap();
        assert!(matches!(r, Inserted::Duplicate { ref original, .. } if original == "a"), "{round}: {r:?}");
        let r = store.insert(copy("b2", "b"), vec!["s".into()], content()).await.unwrap();
        assert!(
            matches!(r, Inserted::Duplicate { ref original, seq } if original == "b" && seq == b),
            "{round}: {r:?}"
        );
        let mut other = copy(&format!("a-{source}"), "a");
        other.source = source.into();
        let r = store.insert(other, vec![], id_window()).await.unwrap();
        assert!(matches!(r, Inserted::New { .. }), "{round}: another source's key: {r:?}");
        store.close().await;
    }
    // c's answer was seen: a copy is a distinct event. b's duplicate answered in time makes b certain.
    let store = open(dir.path());
    let r = store.insert(copy("c2", "c"), vec!["s".into()], content()).await.unwrap();
    assert!(matches!(r, Inserted::New { .. }), "{r:?}");
    store.answered(b, dedup_hash("k-b"), true);
    new(&store, "y", "{}", &[]).await;
    let r = store.insert(copy("b3", "b"), vec!["s".into()], content()).await.unwrap();
    assert!(matches!(r, Inserted::New { .. }), "b is certain now: {r:?}");
    store.close().await;
    let store = open(dir.path());
    let r = store.insert(copy("b4", "b"), vec!["s".into()], content()).await.unwrap();
    assert!(matches!(r, Inserted::New { .. }), "b stays certain across a restart: {r:?}");
    store.close().await;
}

/// Retention deletes whole segments once every sink is done with them, never one with a pending delivery,
/// and never the active one.
#[tokio::test]
async fn pruning_deletes_old_segments_every_sink_is_done_with() {
    let dir = tempfile::tempdir().unwrap();
    let segments = || {
        std::fs::read_dir(dir.path().join(logged::LOG_DIR))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
            .count()
    };
    let store = open(dir.path());
    let a = new(&store, "a", "{}", &["s"]).await;
    new(&store, "u", "{}", &[]).await;
    store.close().await;
    // Each start opens a new segment: a and u are in the first.
    let store = open(dir.path());
    let b = new(&store, "b", "{}", &["s"]).await;
    let before = segments();
    assert!(before >= 2, "{before}");
    assert_eq!(store.prune(now_ms() + 1, 100).await.unwrap(), 0, "a is pending");
    assert_eq!(segments(), before);
    let rows = store.pending("s", 0, 10).await.unwrap();
    assert_eq!(ids(&rows), ["a", "b"]);
    store.record("s", a, 1, Outcome::Delivered, attempt(None)).await.unwrap();
    assert_eq!(store.prune(now_ms() - 3_600_000, 100).await.unwrap(), 0, "a and u are inside retention");
    assert_eq!(store.prune(now_ms() + 1, 100).await.unwrap(), 2, "a and u go with their segment");
    assert_eq!(store.gauges().unrouted(), (0, 0));
    let first = dir.path().join(logged::LOG_DIR).join(crate::store::log::segment::file_name(0));
    assert!(!first.exists(), "the first segment is deleted");
    assert_eq!(ids(&store.pending("s", 0, 10).await.unwrap()), ["b"], "b is still pending, in the active segment");
    store.close().await;
    let store = open(dir.path());
    assert_eq!(ids(&store.pending("s", 0, 10).await.unwrap()), ["b"]);
    assert_eq!(store.gauges().snapshot(), (1, 2, 1));
    let _ = b;
    store.close().await;
}

/// Dead letters on the log engine: listed, retried (appended to the log again as a replay for their sink,
/// delivered once more), purged; a retry whose append is not marked done before a crash is appended again
/// (twice at worst, never lost).
#[tokio::test]
async fn dead_letters_are_listed_retried_through_the_log_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = new(&store, "a", "{\"n\":1}", &["s"]).await;
    let b = new(&store, "b", "{}", &["s"]).await;
    assert_eq!(ids(&store.pending("s", 0, 10).await.unwrap()), ["a", "b"]);
    store.record("s", a, 1, Outcome::Dead("HTTP 400".into()), attempt(Some(400))).await.unwrap();
    store.record("s", b, 3, Outcome::Dead("HTTP 410".into()), attempt(Some(410))).await.unwrap();
    let mut op = Operator::open(dir.path()).unwrap();
    let dead = op.dead_letters(None).unwrap();
    type Row<'a> = (&'a str, &'a str, u32, Option<&'a str>, Option<u16>);
    let got: Vec<Row<'_>> = dead
        .iter()
        .map(|d| (d.event_id.as_str(), d.sink.as_str(), d.attempts, d.last_error.as_deref(), d.last_status))
        .collect();
    assert_eq!(got, [("a", "s", 1, Some("HTTP 400"), Some(400)), ("b", "s", 3, Some("HTTP 410"), Some(410))]);
    assert!(op.dead_letters(Some("other")).unwrap().is_empty());

    assert_eq!(op.retry_dead(&[dead[0].delivery_id, 999]).unwrap(), 1);
    assert_eq!(op.retry_dead(&[dead[0].delivery_id]).unwrap(), 0, "a dead letter is retried once");
    assert_eq!(op.purge_dead(&[dead[1].delivery_id]).unwrap(), 1);
    assert!(op.dead_letters(None).unwrap().is_empty());
    assert!(store.pending("s", b, 10).await.unwrap().is_empty(), "nothing until the daemon takes the retry in");
    store.resync().await.unwrap();
    let again = store.pending("s", b, 10).await.unwrap();
    assert_eq!(ids(&again), ["a"]);
    assert!(again[0].replay && again[0].id > b, "a new delivery, marked replay: {:?}", again[0]);
    assert_eq!(again[0].event.body, Bytes::from_static(b"{\"n\":1}"));
    store.resync().await.unwrap();
    assert_eq!(store.pending("s", b, 10).await.unwrap().len(), 1, "taken in once");
    // A replay that fails stays a replay through the cold path.
    store.record("s", again[0].id, 1, retry(), attempt(Some(503))).await.unwrap();
    let deferred = store.pending("s", b, 10).await.unwrap();
    assert_eq!((deferred[0].id, deferred[0].attempts, deferred[0].replay), (again[0].id, 1, true));
    store.record("s", again[0].id, 2, Outcome::Delivered, attempt(None)).await.unwrap();
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));

    // A retry appended, and the crash before its row says so: appended again at the next start.
    let (seq, sink) = (a, "s".to_owned());
    let conn = rusqlite::Connection::open(dir.path().join(DB_FILE)).unwrap();
    conn.execute(
        "INSERT INTO replays (seq, sink, origin, status, created_at, updated_at) VALUES (?1, ?2, 'dlq', 'pending', 0, 0)",
        rusqlite::params![seq, sink],
    )
    .unwrap();
    let Backend::Log(l) = &store.backend else { unreachable!() };
    let event = (*again[0].event).clone();
    l.spool.replay(event, vec!["s".into()]).await.unwrap();
    store.close().await;
    let store = open(dir.path());
    store.resync().await.unwrap();
    let twice = store.pending("s", again[0].id, 10).await.unwrap();
    assert_eq!(ids(&twice), ["a", "a"], "twice, never zero");
    assert!(twice.iter().all(|p| p.replay));
    store.close().await;
}

/// A sink removed from the config: at start its unfinished deliveries (in the log, outstanding or not yet
/// handed, and deferred) become dead letters, so that they pin nothing; the kept sinks are untouched, and the
/// log can then be pruned.
#[tokio::test]
async fn a_removed_sinks_deliveries_become_dead_letters_and_stop_pinning_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = new(&store, "a", "{}", &["kept", "gone"]).await;
    new(&store, "b", "{}", &["gone"]).await;
    new(&store, "c", "{}", &["gone"]).await;
    // a is deferred for "gone", b outstanding, c never handed.
    assert_eq!(ids(&store.pending("gone", 0, 2).await.unwrap()), ["a", "b"]);
    store.record("gone", a, 1, retry(), attempt(Some(503))).await.unwrap();
    assert_eq!(ids(&store.pending("kept", 0, 10).await.unwrap()), ["a"]);
    store.record("kept", a, 1, Outcome::Delivered, attempt(None)).await.unwrap();
    store.close().await;

    let store = open(dir.path());
    assert_eq!(store.retire_sinks(&["kept".into()]).await.unwrap(), [("gone".to_owned(), 3)]);
    assert_eq!(store.gauges().snapshot(), (0, 0, 0));
    let dead = dead_letters(dir.path());
    assert_eq!(dead.len(), 3, "{dead:?}");
    assert!(dead.iter().all(|(sink, _, error, _)| sink == "gone" && error == "sink removed from the config"));
    assert_eq!(dead.iter().find(|d| d.1 == a).unwrap().3, 1, "a deferred delivery keeps its attempts");
    assert!(store.retire_sinks(&["kept".into()]).await.unwrap().is_empty(), "nothing left to retire");
    assert_eq!(store.prune(now_ms() + 1, 100).await.unwrap(), 3, "nothing pins the first segment now");
    store.close().await;
}

/// `events list`, `show` and `replay` on the log engine: statuses from the sinks' progress and the cold
/// tables, filters, newest first; an event's deliveries (its replays' too), attempts and body; a replay by id
/// or by time range is appended by the daemon as a new event for the routed sinks, and shows as a delivery
/// of the same event.
#[tokio::test]
async fn events_are_listed_shown_and_replayed_from_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let a = new(&store, "a", "{\"n\":1}", &["s1", "s2"]).await;
    let b = new(&store, "b", "{}", &["s1"]).await;
    let c = new(&store, "c", "{}", &["s1"]).await;
    let mut u = event("u", "{}");
    u.source = "clockodo".into();
    store.insert(u, vec![], Dedup::Off).await.unwrap();
    store.pending("s1", 0, 10).await.unwrap();
    store.pending("s2", 0, 10).await.unwrap();
    store.record("s1", a, 1, retry(), attempt(Some(503))).await.unwrap();
    store.record("s1", a, 2, Outcome::Delivered, attempt(Some(200))).await.unwrap();
    store.record("s2", a, 1, Outcome::Delivered, attempt(Some(200))).await.unwrap();
    store.record("s1", b, 1, Outcome::Dead("HTTP 400".into()), attempt(Some(400))).await.unwrap();
    // c stays pending (handed, not finished).

    let mut op = Operator::open(dir.path()).unwrap();
    let all = op.events(&EventFilter { limit: 10, ..Default::default() }).unwrap();
    let got: Vec<(&str, &str)> = all.iter().map(|e| (e.id.as_str(), e.status.as_str())).collect();
    assert_eq!(got, [("u", "unrouted"), ("c", "pending"), ("b", "dead"), ("a", "delivered")], "newest first");
    let only = |f: EventFilter| op.events(&f).unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>();
    assert_eq!(only(EventFilter { status: Some("pending".into()), limit: 10, ..Default::default() }), ["c"]);
    assert_eq!(only(EventFilter { source: Some("clockodo".into()), limit: 10, ..Default::default() }), ["u"]);
    assert_eq!(only(EventFilter { limit: 2, ..Default::default() }), ["u", "c"]);
    assert!(only(EventFilter { since_ms: Some(now_ms() + 60_000), limit: 10, ..Default::default() }).is_empty());

    let shown = op.event("a").unwrap().unwrap();
    assert_eq!((shown.summary.status.as_str(), shown.body.as_str()), ("delivered", "{\"n\":1}"));
    let d: Vec<(&str, &str, u32)> =
        shown.deliveries.iter().map(|d| (d.sink.as_str(), d.status.as_str(), d.attempts)).collect();
    assert_eq!(d, [("s1", "delivered", 2), ("s2", "delivered", 1)], "s1 counts its retry, as on SQLite");
    assert_eq!(shown.deliveries[0].last_status, Some(200));
    let outcomes: Vec<(&str, &str)> = shown.attempts.iter().map(|a| (a.sink.as_str(), a.outcome.as_str())).collect();
    assert_eq!(outcomes, [("s1", "retry"), ("s1", "delivered")], "failed attempts and the success after them");
    let shown_b = op.event("b").unwrap().unwrap();
    assert_eq!((shown_b.deliveries[0].status.as_str(), shown_b.deliveries[0].last_status), ("dead", Some(400)));
    assert!(op.event("nope").unwrap().is_none());
    assert_eq!(store.event("a").await.unwrap().unwrap().summary.id, "a", "the daemon's handle reads it too");

    // Replays: one event by id to one sink, and a time range to the routed sinks.
    let one = op.replay_targets(Some("a"), 0, 0).unwrap();
    assert_eq!(one, [a]);
    assert_eq!(op.replay(&one, Some("s2")).unwrap(), 1);
    let range = op.replay_targets(None, 0, now_ms() + 1).unwrap();
    assert_eq!(range, [a, b, c, c + 1], "every event received in the range, the unrouted one too");
    assert_eq!(op.replay(&range[1..2], None).unwrap(), 1, "b to its one sink");
    store.resync().await.unwrap();
    let s2 = store.pending("s2", a, 10).await.unwrap();
    assert_eq!((ids(&s2), s2[0].replay), (vec!["a"], true));
    let s1 = store.pending("s1", c, 10).await.unwrap();
    assert_eq!(ids(&s1), ["b"]);
    store.record("s2", s2[0].id, 1, Outcome::Delivered, attempt(None)).await.unwrap();
    let shown = op.event("a").unwrap().unwrap();
    let d: Vec<(&str, &str, bool)> =
        shown.deliveries.iter().map(|d| (d.sink.as_str(), d.status.as_str(), d.replay)).collect();
    assert_eq!(d, [("s1", "delivered", false), ("s2", "delivered", false), ("s2", "delivered", true)]);
    assert_eq!(op.event("b").unwrap().unwrap().summary.status, "pending", "its replay is pending");
    let listed = op.events(&EventFilter { limit: 10, ..Default::default() }).unwrap();
    assert_eq!(listed.len(), 4, "a replay is a delivery of its event, not an event of its own");
    let _ = b;
    store.close().await;
}

/// A crash after the takeover's commit and before the log's first segment was made: the next start makes
/// the log, still above the SQLite engine's seqs, and loses nothing (the takeover itself is one SQLite
/// transaction: a crash before its commit leaves the SQLite spool as it was).
#[tokio::test]
async fn a_takeover_interrupted_before_the_log_existed_finishes_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_engine(dir.path(), Engine::Sqlite).unwrap();
    let a = new(&store, "a", "{}", &["s"]).await;
    store.close().await;
    let store = open(dir.path());
    store.close().await;
    std::fs::remove_dir_all(dir.path().join(logged::LOG_DIR)).unwrap();
    let store = open(dir.path());
    let b = new(&store, "b", "{}", &["s"]).await;
    assert!(b > a, "{b} > {a}");
    assert_eq!(ids(&store.pending("s", 0, 10).await.unwrap()), ["a", "b"]);
    store.close().await;
}

/// A quiet daemon's segment never fills: once it holds an event retention let go, the next commit rolls it,
/// and the prune after the newest event is past retention deletes it (an event is kept at most twice the
/// retention).
#[tokio::test]
async fn a_segment_that_never_fills_is_rolled_for_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut old = event("old", "{}");
    old.received_at_ms = now_ms() - 2 * 3_600_000;
    store.insert(old, vec![], Dedup::Off).await.unwrap();
    new(&store, "recent", "{}", &[]).await;
    let hour_ago = now_ms() - 3_600_000;
    assert_eq!(store.prune(hour_ago, 100).await.unwrap(), 0, "the active segment is never deleted");
    store.ping().await.unwrap();
    assert_eq!(store.prune(hour_ago, 100).await.unwrap(), 0, "rolled, but it holds an event inside retention");
    assert_eq!(store.gauges().unrouted(), (2, 4));
    assert_eq!(store.prune(now_ms() + 1, 100).await.unwrap(), 2, "both go once both are past retention");
    assert_eq!(store.gauges().unrouted(), (0, 0));
    store.close().await;
}

/// One step of a random script against the log engine.
#[derive(Debug, Clone)]
enum Step {
    /// An event routed to these of the two sinks.
    Insert(bool, bool),
    /// An outcome for one of a sink's unfinished deliveries (by position, modulo how many there are).
    Outcome(bool, usize, u8),
    /// A clean restart.
    Reopen,
    /// Retention pruning everything it may.
    Prune,
}

fn step() -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        3 => (any::<bool>(), any::<bool>()).prop_map(|(a, b)| Step::Insert(a, b)),
        4 => (any::<bool>(), any::<usize>(), 0u8..3).prop_map(|(s, i, o)| Step::Outcome(s, i, o)),
        1 => Just(Step::Reopen),
        1 => Just(Step::Prune),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 8, ..proptest::prelude::ProptestConfig::default() })]

    /// Random scripts of inserts, outcomes (delivered, retried through the cold path, dead), restarts and
    /// prunes: after every step each sink's unfinished deliveries, read from the store, are exactly the
    /// model's (none lost, none twice, the log's and the deferred ones merged in id order), the gauges
    /// count exactly them, and the dead letters are exactly the model's.
    #[test]
    fn the_log_engine_agrees_with_a_model_after_any_script(steps in proptest::collection::vec(step(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let sinks = ["s1", "s2"];
            // (sink, id) -> attempts so far, for the unfinished; and the dead ones.
            let mut open_: [std::collections::BTreeMap<i64, u32>; 2] = Default::default();
            let mut dead = 0usize;
            let mut store = open(dir.path());
            for (n, step) in steps.into_iter().enumerate() {
                match step {
                    Step::Insert(a, b) => {
                        let to: Vec<String> =
                            [(a, 0), (b, 1)].iter().filter(|(on, _)| *on).map(|(_, i)| sinks[*i].to_owned()).collect();
                        let id = new(&store, &format!("e{n}"), "{}", &to.iter().map(String::as_str).collect::<Vec<_>>()).await;
                        for (on, i) in [(a, 0), (b, 1)] {
                            if on {
                                open_[i].insert(id, 0);
                            }
                        }
                    }
                    Step::Outcome(which, at, outcome) => {
                        let i = usize::from(which);
                        let Some((&id, &tried)) = open_[i].iter().nth(at % open_[i].len().max(1)) else { continue };
                        // A dispatcher records only what it was handed.
                        store.pending(sinks[i], 0, 1000).await.unwrap();
                        let attempts = tried + 1;
                        let outcome = match outcome {
                            0 => Outcome::Delivered,
                            1 => Outcome::Retry { next_attempt_ms: now_ms() + 60_000, error: "503".into() },
                            _ => Outcome::Dead("400".into()),
                        };
                        store.record(sinks[i], id, attempts, outcome.clone(), attempt(None)).await.unwrap();
                        match outcome {
                            Outcome::Retry { .. } => {
                                open_[i].insert(id, attempts);
                            }
                            Outcome::Dead(_) => {
                                open_[i].remove(&id);
                                dead += 1;
                            }
                            Outcome::Delivered => {
                                open_[i].remove(&id);
                            }
                        }
                    }
                    Step::Reopen => {
                        store.close().await;
                        store = open(dir.path());
                    }
                    Step::Prune => {
                        store.prune(now_ms() + 1, 1000).await.unwrap();
                    }
                }
                let mut total = 0;
                for (i, sink) in sinks.iter().enumerate() {
                    let rows = store.pending(sink, 0, 1000).await.unwrap();
                    let got: Vec<(i64, u32)> = rows.iter().map(|r| (r.id, r.attempts)).collect();
                    let want: Vec<(i64, u32)> = open_[i].iter().map(|(id, a)| (*id, *a)).collect();
                    assert_eq!(got, want, "{sink} after step {n}");
                    total += want.len() as u64;
                }
                assert_eq!(store.gauges().snapshot().2, total, "pending deliveries after step {n}");
                let listed = Operator::open(dir.path()).unwrap().dead_letters(None).unwrap().len();
                assert_eq!(listed, dead, "dead letters after step {n}");
            }
            store.close().await;
        });
    }
}

/// A deferred event counts once: while its move out of the log is not checkpointed the log still counts it,
/// and the cold path leaves it out; after, the cold path counts it. Undeferring clears both.
#[test]
fn a_deferred_event_in_transit_is_counted_once() {
    let mut cold = super::Cold::default();
    assert!(cold.defer("a", 7, 100), "new to the cold path");
    cold.transit.insert(7, 100);
    assert!(!cold.defer("b", 7, 100), "the same event for another sink is not new");
    assert!(cold.defer("a", 8, 50));
    assert_eq!(cold.counted(), (1, 50), "7 is still the log's to count");
    cold.transit.remove(&7);
    assert_eq!(cold.counted(), (2, 150));
    cold.transit.insert(8, 50);
    cold.undefer("a", 8);
    assert!(cold.transit.is_empty(), "an event leaving the cold path leaves the transit too");
    assert_eq!(cold.counted(), (1, 100));
}
