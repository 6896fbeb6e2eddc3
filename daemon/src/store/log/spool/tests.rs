//! The spool thread on the simulated disk: dedup (across batches, within one, across a restart), feeds
//! and the pending walk handing every event once, finished deliveries durable before they are answered,
//! exact gauges, a failed sync, and crashes at every point of a random script (nothing acknowledged lost,
//! nothing finished handed again).

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::store::log::Options;
use crate::store::log::file::{Prealloc, SimDisk};

const UUID: [u8; 16] = *b"spool-thread-uid";

fn options() -> Options {
    // Growing: no spare segment being prepared, whose sync could be the one a test fails.
    Options { prealloc: Prealloc::Grow, ..Options::with_segment_size(16 << 10) }
}

fn start(disk: &SimDisk) -> (Spool, JoinHandle<Log<SimDisk>>) {
    let (log, _) = Log::open(disk.clone(), Path::new("/d/log"), UUID, options()).unwrap();
    Spool::spawn(log, 256, 64).unwrap()
}

async fn stop(spool: Spool, thread: JoinHandle<Log<SimDisk>>) {
    drop(spool);
    tokio::task::spawn_blocking(move || drop(thread.join().unwrap())).await.unwrap();
}

fn event(n: u64, key: &str) -> Event {
    Event {
        id: format!("ev-{n}"),
        source: "clockify".into(),
        event_type: "E".into(),
        received_at_ms: now_ms(),
        headers: vec![],
        body: Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(300))),
        dedup_key: key.to_owned(),
        ordering_key: None,
        body_is_json: true,
    }
}

fn window() -> Dedup {
    Dedup::DeliveryId { since_ms: now_ms() - 60_000 }
}

fn new_seq(i: Inserted) -> i64 {
    match i {
        Inserted::New { seq } => seq,
        other => panic!("not new: {other:?}"),
    }
}

/// Every pending delivery of `sink`, by walking from 0 in small pages (as a dispatcher's scan does).
async fn all_pending(spool: &Spool, sink: &str) -> Vec<i64> {
    let mut ids = Vec::new();
    let mut after = 0;
    loop {
        let page = spool.pending(sink, after, 3).await.unwrap();
        let Some(last) = page.last() else { return ids };
        after = last.id;
        ids.extend(page.iter().map(|d| d.id));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_are_found_in_the_log_in_the_same_batch_and_after_a_restart() {
    let disk = SimDisk::default();
    let (spool, thread) = start(&disk);
    let first = new_seq(spool.insert(event(1, "k1"), vec!["a".into()], window()).await.unwrap());
    assert_eq!(first, 1, "the store's seqs start at 1");
    let again = spool.insert(event(2, "k1"), vec!["a".into()], window()).await.unwrap();
    assert_eq!(again, Inserted::Duplicate { original: "ev-1".into(), seq: first });
    // Concurrent copies: one batch (or several); exactly one is stored.
    let copies: Vec<_> = (10..30)
        .map(|n| {
            let s = spool.clone();
            tokio::spawn(async move { s.insert(event(n, "k2"), vec!["a".into()], window()).await.unwrap() })
        })
        .collect();
    let mut news = 0;
    for c in copies {
        news += usize::from(matches!(c.await.unwrap(), Inserted::New { .. }));
    }
    assert_eq!(news, 1);
    // Off: never a duplicate.
    assert!(matches!(spool.insert(event(3, "k1"), vec![], Dedup::Off).await.unwrap(), Inserted::New { .. }));
    stop(spool, thread).await;
    let (spool, thread) = start(&disk);
    assert_eq!(spool.gauges().unrouted().0, 1, "the one event routed nowhere, counted from the log");
    assert_eq!(spool.gauges().snapshot().2, 2);
    assert_eq!(
        spool.insert(event(4, "k1"), vec!["a".into()], window()).await.unwrap(),
        Inserted::Duplicate { original: "ev-1".into(), seq: 1 },
        "found after a restart"
    );
    // A copy received outside the window is new.
    assert!(matches!(
        spool.insert(event(5, "k1"), vec![], Dedup::DeliveryId { since_ms: now_ms() + 1 }).await.unwrap(),
        Inserted::New { .. }
    ));
    stop(spool, thread).await;
}

/// A content key dedups against an earlier copy only while its answer is uncertain, and an uncertain
/// answer is kept across a restart (ANSWER frames).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncertain_answer_survives_a_restart() {
    let disk = SimDisk::default();
    let (spool, thread) = start(&disk);
    let content = || Dedup::Content { since_ms: now_ms() - 60_000, retry_since_ms: now_ms() + 1 };
    let a = new_seq(spool.insert(event(1, "body-a"), vec![], content()).await.unwrap());
    let b = new_seq(spool.insert(event(2, "body-b"), vec![], content()).await.unwrap());
    spool.answered(a, dedup_hash("body-a"), false);
    // The answer is taken with the next batch.
    spool.ping().await.unwrap();
    stop(spool, thread).await;
    let (spool, thread) = start(&disk);
    assert_eq!(
        spool.insert(event(3, "body-a"), vec![], content()).await.unwrap(),
        Inserted::Duplicate { original: "ev-1".into(), seq: a }
    );
    assert!(
        matches!(spool.insert(event(4, "body-b"), vec![], content()).await.unwrap(), Inserted::New { .. }),
        "a copy of an event answered in time is a new event (seq {b})"
    );
    stop(spool, thread).await;
}

/// Feeds carry what is committed while they keep up; a full one is marked lagged and the pending walk
/// hands the rest, each event once; finished deliveries are gone for good, outstanding ones come back
/// after a restart; the gauges follow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_and_the_pending_walk_hand_every_event_and_finished_ones_stay_finished() {
    let disk = SimDisk::default();
    let (spool, thread) = start(&disk);
    let mut feed = spool.subscribe("a", 4);
    assert!(feed.lagged.load(Ordering::Acquire), "a feed starts lagged");
    let mut ids = Vec::new();
    for n in 0..10 {
        let sinks: Vec<String> = if n % 2 == 0 { vec!["a".into(), "b".into()] } else { vec!["b".into()] };
        ids.push(new_seq(spool.insert(event(n, ""), sinks, Dedup::Off).await.unwrap()));
    }
    assert_eq!(spool.gauges().snapshot().2, 15, "5 to a, 10 to b");
    assert!(feed.rx.try_recv().is_err(), "nothing pushed onto a lagged feed");
    feed.lagged.store(false, Ordering::Release);
    let a: Vec<i64> = ids.iter().copied().step_by(2).collect();
    assert_eq!(all_pending(&spool, "a").await, a);
    // Caught up: new events come on the feed, until it is full.
    let mut pushed = Vec::new();
    for n in 10..16 {
        pushed.push(new_seq(spool.insert(event(n, ""), vec!["a".into()], Dedup::Off).await.unwrap()));
    }
    let mut got = Vec::new();
    while let Ok(d) = feed.rx.try_recv() {
        got.push(d.id);
    }
    assert_eq!(got, pushed[..4], "the feed holds 4");
    assert!(feed.lagged.load(Ordering::Acquire));
    // Everything not finished is still pending, handed or not.
    let mut expect = a.clone();
    expect.extend(&pushed);
    assert_eq!(all_pending(&spool, "a").await, expect);
    spool.finished("a", &expect[..7]).await.unwrap();
    assert_eq!(all_pending(&spool, "a").await, expect[7..]);
    assert_eq!(spool.gauges().snapshot().2, 10 + 11 - 7);
    stop(spool, thread).await;
    // A restart (even a crash right after the answer) keeps what was finished, and nothing else.
    disk.crash_clean();
    let (spool, thread) = start(&disk);
    assert_eq!(all_pending(&spool, "a").await, expect[7..]);
    assert_eq!(all_pending(&spool, "b").await, ids);
    assert_eq!(spool.gauges().snapshot(), (10 + 4, spool.gauges().snapshot().1, 10 + 4));
    stop(spool, thread).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_is_never_acknowledged_and_stops_the_spool() {
    let disk = SimDisk::default();
    let (spool, thread) = start(&disk);
    spool.insert(event(1, ""), vec!["a".into()], Dedup::Off).await.unwrap();
    disk.fail_syncs(1);
    assert!(matches!(spool.insert(event(2, ""), vec!["a".into()], Dedup::Off).await, Err(SpoolError::Failed(_))));
    assert!(matches!(spool.insert(event(3, ""), vec!["a".into()], Dedup::Off).await, Err(SpoolError::Failed(_))));
    assert!(matches!(spool.finished("a", &[1]).await, Err(SpoolError::Failed(_))));
    let failed = tokio::time::timeout(Duration::from_secs(5), spool.failed()).await.unwrap();
    assert!(failed.contains("sync") || !failed.is_empty(), "{failed}");
    stop(spool, thread).await;
    disk.crash_clean();
    let (spool, thread) = start(&disk);
    assert_eq!(all_pending(&spool, "a").await, vec![1], "only the acknowledged event");
    stop(spool, thread).await;
}

#[derive(Debug, Clone)]
enum Step {
    Insert(Vec<bool>),
    /// Walk a sink's pending deliveries (handing them).
    Walk(usize),
    /// Finish the first `n` of a sink's outstanding deliveries.
    Finish(usize, usize),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => proptest::collection::vec(any::<bool>(), 2).prop_map(Step::Insert),
        1 => (0usize..2).prop_map(Step::Walk),
        2 => (0usize..2, 1usize..4).prop_map(|(s, n)| Step::Finish(s, n)),
    ]
}

const SINKS: [&str; 2] = ["a", "b"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Crash anywhere in a random script, while the spool thread is writing (an insert and a finish in
    /// flight; the last write torn at a random byte, unsynced directory changes lost): every acknowledged
    /// event is pending again for each sink it was routed to unless that sink's `finished` was answered,
    /// nothing finished is pending again, and only the events in flight may appear besides.
    #[test]
    fn a_crash_loses_nothing_acknowledged_and_redelivers_nothing_finished(
        steps in proptest::collection::vec(step(), 1..40),
        crash_after in 0usize..40,
        (whole, tear) in (any::<usize>(), any::<usize>()),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let disk = SimDisk::default();
            let (spool, thread) = start(&disk);
            // Per sink: acknowledged and not finished; finished; handed by the last walk.
            let mut open: [BTreeSet<i64>; 2] = Default::default();
            let mut done: [BTreeSet<i64>; 2] = Default::default();
            let mut handed: [Vec<i64>; 2] = Default::default();
            let mut last_acked = 0;
            for (i, step) in steps.iter().enumerate().take(crash_after) {
                match step {
                    Step::Insert(to) => {
                        let sinks: Vec<String> =
                            SINKS.iter().zip(to).filter(|(_, on)| **on).map(|(s, _)| (*s).to_owned()).collect();
                        let seq = new_seq(spool.insert(event(i as u64, ""), sinks, Dedup::Off).await.unwrap());
                        last_acked = seq;
                        for (k, on) in to.iter().enumerate() {
                            if *on {
                                open[k].insert(seq);
                            }
                        }
                    }
                    Step::Walk(k) => {
                        handed[*k] = all_pending(&spool, SINKS[*k]).await;
                        let want: Vec<i64> = open[*k].iter().copied().collect();
                        prop_assert_eq!(&handed[*k], &want);
                    }
                    Step::Finish(k, n) => {
                        let ids: Vec<i64> = handed[*k].drain(..(*n).min(handed[*k].len())).collect();
                        spool.finished(SINKS[*k], &ids).await.unwrap();
                        for id in ids {
                            open[*k].remove(&id);
                            done[*k].insert(id);
                        }
                    }
                }
            }
            // In flight at the crash: an insert to both sinks, and a finish of what "a" was handed last.
            let in_flight: Vec<i64> = handed[0].clone();
            let (s1, s2) = (spool.clone(), spool.clone());
            let insert = tokio::spawn(async move { s1.insert(event(999, ""), vec!["a".into(), "b".into()], Dedup::Off).await });
            let finish = tokio::spawn(async move { s2.finished("a", &in_flight).await });
            tokio::task::yield_now().await;
            disk.crash(|n| (whole % (n + 1), tear), |n| whole % (n + 1));
            let _ = (insert.await, finish.await);
            stop(spool, thread).await;
            for id in &handed[0] {
                open[0].remove(id);
            }
            let (spool, thread) = start(&disk);
            for k in 0..2 {
                let after: BTreeSet<i64> = all_pending(&spool, SINKS[k]).await.into_iter().collect();
                let maybe: BTreeSet<i64> = if k == 0 { handed[0].iter().copied().collect() } else { BTreeSet::new() };
                let lost: Vec<_> = open[k].difference(&after).collect();
                prop_assert!(lost.is_empty(), "sink {}: lost {:?}", SINKS[k], lost);
                let again: Vec<_> = after.intersection(&done[k]).collect();
                prop_assert!(again.is_empty(), "sink {}: finished, pending again: {:?}", SINKS[k], again);
                let invented: Vec<_> = after.iter().filter(|id| !open[k].contains(id) && !maybe.contains(id) && **id <= last_acked).collect();
                prop_assert!(invented.is_empty(), "sink {}: {:?} pending, neither open nor in flight", SINKS[k], invented);
            }
            let (_, _, deliveries) = spool.gauges().snapshot();
            let recount = all_pending(&spool, "a").await.len() + all_pending(&spool, "b").await.len();
            prop_assert_eq!(deliveries as usize, recount, "gauges equal a recount");
            stop(spool, thread).await;
            Ok(())
        })?;
    }
}
