//! The log on the simulated disk: round trips, rolls, failed syncs, corruption, and the crash property
//! (every acknowledged event survives byte for byte; nothing that was not appended is ever read).

use std::path::PathBuf;

use bytes::Bytes;
use proptest::prelude::*;

use super::file::{Disk, SimDisk};
use super::frame::EventEq;
use super::*;

const UUID: [u8; 16] = *b"0123456789abcdef";

fn dir() -> PathBuf {
    PathBuf::from("/data/log")
}

fn event(n: u64, body_len: usize) -> Event {
    Event {
        id: format!("ev-{n}"),
        source: "clockify".into(),
        event_type: "NEW_TIME_ENTRY".into(),
        received_at_ms: 1_764_633_600_000 + n as i64,
        headers: vec![("content-type".into(), "application/json".into())],
        body: Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(body_len))),
        dedup_key: format!("clockify:{n}"),
        ordering_key: Some(format!("e{}", n % 3)),
        body_is_json: false,
    }
}

fn open(disk: &SimDisk, segment_size: u64) -> (Log<SimDisk>, Recovery) {
    Log::open(disk.clone(), &dir(), UUID, Options::with_segment_size(segment_size)).unwrap()
}

fn read(log: &Log<SimDisk>, seq: u64) -> Option<Event> {
    log.read(seq).unwrap().map(|e| e.event.0)
}

fn same(a: &Event, b: &Event) -> bool {
    EventEq(a.clone()) == EventEq(b.clone())
}

fn segment_files(disk: &SimDisk) -> Vec<String> {
    let mut names: Vec<String> = disk.list(&dir()).unwrap().into_iter().filter(|n| n.ends_with(".seg")).collect();
    names.sort();
    names
}

/// Waits (a few seconds at most) until `cond` holds; whether it did.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < until {
        if cond() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    cond()
}

#[test]
fn events_round_trip_across_commits_rolls_and_reopens() {
    let disk = SimDisk::default();
    let (mut log, rec) = open(&disk, 16 << 10);
    assert_eq!(rec, Recovery::default());
    let sinks = vec!["file".to_owned(), "kafka".to_owned()];
    for n in 0..200 {
        assert_eq!(log.append(&event(n, (n as usize * 97) % 900), &sinks, n, 0).unwrap(), n);
        if n % 7 == 6 {
            assert_eq!(log.commit().unwrap(), n + 1);
        }
    }
    assert!(read(&log, 199).is_none(), "staged, not durable");
    log.commit().unwrap();
    assert!(segment_files(&disk).len() > 5, "rolled: {:?}", segment_files(&disk));
    for n in 0..200 {
        let got = log.read(n).unwrap().unwrap();
        assert!(same(&got.event.0, &event(n, (n as usize * 97) % 900)), "{n}");
        assert_eq!((got.sinks.as_slice(), got.dedup_hash), (sinks.as_slice(), n));
    }
    drop(log);
    disk.crash_clean();
    let (mut log, rec) = open(&disk, 16 << 10);
    assert_eq!((rec.events, rec.holes.len(), rec.torn_tail), (200, 0, false));
    assert_eq!(log.next_seq(), 200);
    assert!(same(&read(&log, 123).unwrap(), &event(123, (123 * 97) % 900)));
    assert_eq!(log.append(&event(200, 10), &sinks, 0, 0).unwrap(), 200);
    log.commit().unwrap();
    assert!(same(&read(&log, 200).unwrap(), &event(200, 10)));
}

/// One write and one sync per commit, whatever the batch size; a roll adds the old segment's and the
/// directory's.
#[test]
fn a_commit_is_one_sync() {
    let disk = SimDisk::default();
    // Growing: no spare segment being prepared meanwhile, whose syncs would be counted too.
    let options = Options { prealloc: super::file::Prealloc::Grow, ..Options::default() };
    let (mut log, _) = Log::open(disk.clone(), &dir(), UUID, options).unwrap();
    let before = disk.syncs();
    for n in 0..100 {
        log.append(&event(n, 100), &[], 0, 0).unwrap();
    }
    log.commit().unwrap();
    assert_eq!(disk.syncs() - before, 1);
    log.commit().unwrap();
    assert_eq!(disk.syncs() - before, 1, "nothing staged: no sync");
}

/// The next segment is preallocated ahead, on a helper thread, as a spare under a name of its own; the
/// roll renames it. A spare left by a crash is removed at open, and one that cannot be made only means
/// that the roll makes the segment itself.
#[test]
fn a_roll_takes_the_spare_prepared_for_it() {
    let disk = SimDisk::default();
    let (mut log, _) = open(&disk, 16 << 10);
    let names = || disk.list(&dir()).unwrap();
    let spare = |segno: u64| format!("spare.{segno:016x}");
    for segno in 1..4u64 {
        assert!(eventually(|| names().contains(&spare(segno))), "spare {segno} prepared: {:?}", names());
        while segment_files(&disk).len() as u64 <= segno {
            let n = log.next_seq();
            log.append(&event(n, 900), &[], 0, 0).unwrap();
            log.commit().unwrap();
        }
        assert!(!names().contains(&spare(segno)), "renamed: {:?}", names());
        let seg = dir().join(segment::file_name(segno));
        assert_eq!(disk.contents(&seg).unwrap().len() as u64, 16 << 10, "preallocated");
    }
    let last = log.next_seq();
    // The spare of the next roll is made before the crash (a helper still at work would make it after).
    assert!(eventually(|| names().contains(&spare(4))));
    drop(log);
    disk.crash_clean();
    let (log, rec) = open(&disk, 16 << 10);
    assert_eq!(rec.events, last);
    assert!((0..last).all(|n| same(&read(&log, n).unwrap(), &event(n, 900))));
    assert!(eventually(|| names().iter().filter(|n| n.starts_with("spare.")).count() == 1), "{:?}", names());
}

#[test]
fn a_leftover_spare_is_removed_and_a_spare_that_cannot_be_made_is_made_on_the_roll() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("spare.00000000000000ff"), b"left by a crash").unwrap();
    // A directory where the first spare would go: neither removed nor replaced.
    std::fs::create_dir(dir.join("spare.0000000000000001")).unwrap();
    let options = Options { segment_size: 16 << 10, ..Options::default() };
    let (mut log, _) = Log::open(super::file::OsDisk, &dir, UUID, options).unwrap();
    assert!(!dir.join("spare.00000000000000ff").exists());
    let mut n = 0;
    while !dir.join(segment::file_name(2)).exists() {
        log.append(&event(n, 900), &[], 0, 0).unwrap();
        log.commit().unwrap();
        n += 1;
    }
    assert_eq!(std::fs::metadata(dir.join(segment::file_name(1))).unwrap().len(), 16 << 10);
    assert!((0..n).all(|i| same(&read_os(&log, i), &event(i, 900))));
}

fn read_os(log: &Log<super::file::OsDisk>, seq: u64) -> Event {
    log.read(seq).unwrap().unwrap().event.0
}

/// An event larger than a segment gets a segment of its own.
#[test]
fn an_event_larger_than_a_segment_still_fits() {
    let disk = SimDisk::default();
    let (mut log, _) = open(&disk, 16 << 10);
    log.append(&event(0, 10), &[], 0, 0).unwrap();
    log.append(&event(1, 100 << 10), &[], 0, 0).unwrap();
    log.append(&event(2, 10), &[], 0, 0).unwrap();
    log.commit().unwrap();
    for n in 0..3 {
        assert!(read(&log, n).is_some(), "{n}");
    }
    drop(log);
    disk.crash_clean();
    let (log, rec) = open(&disk, 16 << 10);
    assert_eq!(rec.events, 3);
    assert_eq!(read(&log, 1).unwrap().body.len(), event(1, 100 << 10).body.len());
}

/// A failed fdatasync is never acknowledged, fails the log for good, and after the restart everything
/// acknowledged before it is there.
#[test]
fn a_failed_sync_is_never_acknowledged_and_fails_the_log() {
    let disk = SimDisk::default();
    // Growing: no spare being prepared, whose sync could be the one that fails.
    let grow = Options { prealloc: super::file::Prealloc::Grow, ..Options::default() };
    let (mut log, _) = Log::open(disk.clone(), &dir(), UUID, grow).unwrap();
    log.append(&event(0, 10), &[], 0, 0).unwrap();
    assert_eq!(log.commit().unwrap(), 1);
    log.append(&event(1, 10), &[], 0, 0).unwrap();
    disk.fail_syncs(1);
    assert!(matches!(log.commit(), Err(LogError::Io { .. })));
    assert_eq!(log.durable_seq(), 1);
    assert!(read(&log, 1).is_none());
    assert!(matches!(log.append(&event(2, 10), &[], 0, 0), Err(LogError::Failed)));
    assert!(matches!(log.commit(), Err(LogError::Failed)));
    drop(log);
    disk.crash(|n| (n, 0), |n| n);
    let (log, rec) = open(&disk, SEGMENT_SIZE);
    assert_eq!(rec.events, 1);
    assert!(same(&read(&log, 0).unwrap(), &event(0, 10)));
    assert_eq!(log.next_seq(), 1);
}

/// A disk without room: a log opens on it (its segment waits), a commit that finds no room is refused
/// without failing the log (its seqs are given again, its answers kept for the next commit), a growing
/// segment takes what fits, and once there is room again everything goes on; a crash then keeps exactly
/// what was acknowledged; a roll that finds no room waits for the next commit too. (Growing segments: a
/// preallocated one has its room already, and so has the spare the next roll takes.)
#[test]
fn no_room_on_the_disk_refuses_commits_without_failing_the_log() {
    let disk = SimDisk::default();
    disk.create_dir_all(&dir()).unwrap();
    disk.set_full(true);
    let opts = Options { segment_size: 4096, prealloc: super::file::Prealloc::Grow, ..Options::default() };
    let (mut log, _) = Log::open(disk.clone(), &dir(), UUID, opts).unwrap();
    log.append(&event(0, 10), &[], 0, 0).unwrap();
    assert!(matches!(log.commit(), Err(LogError::Full { .. })), "no segment fits yet");
    assert_eq!((log.next_seq(), log.durable_seq()), (0, 0), "its seq is given again");
    disk.set_full(false);
    // Room for the segment's start (not preallocated: it grows), then none.
    log.append(&event(0, 10), &[], 0, 0).unwrap();
    assert_eq!(log.commit().unwrap(), 1);
    disk.set_full(true);
    log.append(&event(1, 10), &[], 0, 0).unwrap();
    log.answer(0, true);
    assert!(matches!(log.commit(), Err(LogError::Full { .. })));
    assert_eq!(log.durable_seq(), 1);
    assert!(!log.is_uncertain(0), "the answer waits for a commit that succeeds");
    disk.set_full(false);
    log.append(&event(1, 20), &[], 0, 0).unwrap();
    assert_eq!(log.commit().unwrap(), 2);
    assert!(log.is_uncertain(0));
    // Fill the 4 KiB segment up to the event that rolls; that commit finds no room.
    let mut n = 2;
    loop {
        log.append(&event(n, 200), &[], 0, 0).unwrap();
        if log.roll_at.is_some() {
            break;
        }
        assert_eq!(log.commit().unwrap(), n + 1);
        n += 1;
    }
    disk.set_full(true);
    assert!(matches!(log.commit(), Err(LogError::Full { .. })));
    assert!(!log.failed);
    assert_eq!(log.segments.len(), 1);
    disk.set_full(false);
    log.append(&event(n, 200), &[], 0, 0).unwrap();
    assert_eq!(log.commit().unwrap(), n + 1);
    assert_eq!(log.segments.len(), 2, "rolled");
    drop(log);
    disk.crash(|n| (n, 0), |n| n);
    let (log, rec) = Log::open(disk.clone(), &dir(), UUID, opts).unwrap();
    assert_eq!(rec.events, n + 1);
    assert!(same(&read(&log, 1).unwrap(), &event(1, 20)), "the refused event left nothing behind");
    assert!(same(&read(&log, n).unwrap(), &event(n, 200)));
    assert!(log.is_uncertain(0));
}

/// A bit flipped in a synced event with events after it: detected and counted, the others still read.
#[test]
fn corruption_in_the_middle_is_counted_and_the_rest_is_kept() {
    let disk = SimDisk::default();
    let (mut log, _) = open(&disk, SEGMENT_SIZE);
    for n in 0..10 {
        log.append(&event(n, 50), &[], 0, 0).unwrap();
    }
    log.commit().unwrap();
    drop(log);
    let seg = dir().join(segment_files(&disk)[0].clone());
    let data = disk.contents(&seg).unwrap();
    // Event 4's body: find its id in the file.
    let at = data.windows(6).position(|w| w == b"\"n\":4,").unwrap();
    disk.flip_bit(&seg, at, 3);
    disk.crash_clean();
    let (log, rec) = open(&disk, SEGMENT_SIZE);
    assert_eq!(rec.lost_events(), 1, "{rec:?}");
    assert!(read(&log, 4).is_none());
    for n in (0..10).filter(|n| *n != 4) {
        assert!(same(&read(&log, n).unwrap(), &event(n, 50)), "{n}");
    }
    assert_eq!(log.next_seq(), 10);
}

/// Synced frames at the end of a sealed segment that became unreadable (its last event and its seal):
/// the next segment's start says how many events are gone, and they are counted, not taken for a torn
/// tail.
#[test]
fn unreadable_frames_at_a_segments_end_are_counted() {
    let disk = SimDisk::default();
    let (mut log, _) = open(&disk, 16 << 10);
    for n in 0..40 {
        log.append(&event(n, 400), &[], 0, 0).unwrap();
        log.commit().unwrap();
    }
    drop(log);
    let first = dir().join(segment_files(&disk)[0].clone());
    let data = disk.contents(&first).unwrap();
    let header = segment::Header::decode(&data).unwrap();
    let scan = segment::scan(&data, &header);
    assert!(scan.sealed);
    let last_event = scan.frames.iter().rev().find(|f| f.kind == Kind::Event).unwrap();
    let seal = scan.frames.last().unwrap();
    disk.flip_bit(&first, last_event.offset + frame::HEADER + 2, 1);
    disk.flip_bit(&first, seal.offset + 2, 1);
    disk.crash_clean();
    let (log, rec) = open(&disk, 16 << 10);
    assert_eq!(rec.lost_events(), 1, "{rec:?}");
    assert!(log.read(last_event.seq).unwrap().is_none());
    assert!(log.read(last_event.seq + 1).unwrap().is_some(), "the next segment's events are all there");
    assert_eq!(log.next_seq(), 40);
}

/// A roll that crashed before the new segment's first sync leaves a torn header: that segment held
/// nothing acknowledged and is removed; a segment of another spool is refused.
#[test]
fn a_torn_new_segment_is_removed_and_a_foreign_one_refused() {
    let disk = SimDisk::default();
    let (mut log, _) = open(&disk, SEGMENT_SIZE);
    log.append(&event(0, 10), &[], 0, 0).unwrap();
    log.commit().unwrap();
    drop(log);
    let torn = dir().join(segment::file_name(9));
    let mut f = disk.create_new(&torn).unwrap();
    super::file::LogFile::write_at(&mut f, b"HB", 0).unwrap();
    super::file::LogFile::sync_data(&mut f).unwrap();
    disk.sync_dir(&dir()).unwrap();
    let (log, rec) = open(&disk, SEGMENT_SIZE);
    assert_eq!(rec.removed_torn_segment, Some(9));
    assert!(same(&read(&log, 0).unwrap(), &event(0, 10)));
    drop(log);
    let other = Log::open(disk.clone(), &dir(), *b"another-spool-id", Options::default());
    assert!(matches!(other, Err(LogError::Corrupt { .. })), "{other:?}");
}

/// What a script does.
#[derive(Debug, Clone)]
enum Step {
    /// Stage an event with a body of this many bytes.
    Append(u16),
    Commit,
    /// Crash: how many unsynced writes of each file survive, how many bytes of the next, how many unsynced
    /// directory changes.
    Crash(u8, u16, u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u16..3000).prop_map(Step::Append),
        3 => Just(Step::Commit),
        1 => (any::<u8>(), any::<u16>(), any::<u8>()).prop_map(|(a, b, c)| Step::Crash(a, b, c)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Invariants 1 and 2 of the design: after any crash (unsynced writes torn at any byte, unsynced
    /// renames lost), every acknowledged event is there byte for byte, once, at its seq; every event read
    /// is one appended at that seq (nothing invented, no stale frame of a recycled or torn write).
    #[test]
    fn no_acknowledged_event_is_lost_and_none_is_invented(script in proptest::collection::vec(step(), 1..120)) {
        let disk = SimDisk::default();
        let (mut log, _) = open(&disk, 8 << 10);
        // What the log may hold at each seq, and how many seqs are acknowledged.
        let mut model: Vec<Event> = Vec::new();
        let mut acked = 0u64;
        let mut n = 0u64;
        for step in script {
            match step {
                Step::Append(len) => {
                    n += 1;
                    let e = event(n, usize::from(len));
                    let seq = log.append(&e, &["s".to_owned()], n, 0).unwrap();
                    prop_assert_eq!(seq, model.len() as u64);
                    model.push(e);
                }
                Step::Commit => {
                    acked = log.commit().unwrap();
                    prop_assert_eq!(acked, model.len() as u64);
                }
                Step::Crash(whole, torn, dirs) => {
                    drop(log);
                    disk.crash(
                        |pending| (usize::from(whole) % (pending + 1), usize::from(torn)),
                        |pending| usize::from(dirs) % (pending + 1),
                    );
                    let (reopened, rec) = open(&disk, 8 << 10);
                    log = reopened;
                    // A crash tears only unsynced bytes, in write order: never a hole.
                    prop_assert!(rec.holes.is_empty(), "{:?}", rec);
                    let next = log.next_seq();
                    prop_assert!(next >= acked, "acknowledged up to {} but recovered only {}", acked, next);
                    prop_assert!(next <= model.len() as u64, "invented: {} > {}", next, model.len());
                    model.truncate(next as usize);
                    acked = next;
                }
            }
            for (seq, want) in model.iter().enumerate().take(acked as usize) {
                let got = read(&log, seq as u64);
                prop_assert!(got.as_ref().is_some_and(|g| same(g, want)), "seq {}: {:?}", seq, got.map(|g| g.id));
            }
        }
    }
}

/// What a script with sinks does.
#[derive(Debug, Clone)]
enum SinkStep {
    /// An event routed to the sinks in this mask (bit 0: "a", bit 1: "b").
    Append(u16, u8),
    Commit,
    /// Sink (0 or 1) takes up to this many of the next durable events routed to it.
    Take(u8, u8),
    /// Sink finishes its outstanding event at this position (mod their number).
    Finish(u8, u8),
    Crash(u8, u16, u8),
}

fn sink_step() -> impl Strategy<Value = SinkStep> {
    prop_oneof![
        5 => (0u16..2000, 0u8..4).prop_map(|(l, m)| SinkStep::Append(l, m)),
        3 => Just(SinkStep::Commit),
        3 => (0u8..2, 1u8..6).prop_map(|(s, k)| SinkStep::Take(s, k)),
        4 => (0u8..2, any::<u8>()).prop_map(|(s, i)| SinkStep::Finish(s, i)),
        1 => (any::<u8>(), any::<u16>(), any::<u8>()).prop_map(|(a, b, c)| SinkStep::Crash(a, b, c)),
    ]
}

/// The dispatcher's side of one sink, as the test drives it.
#[derive(Debug, Default, Clone)]
struct Dispatch {
    cursor: u64,
    outstanding: std::collections::BTreeSet<u64>,
    /// Finished at some point, and finished before a commit that succeeded.
    finished: std::collections::BTreeSet<u64>,
    finished_durably: std::collections::BTreeSet<u64>,
    since_commit: Vec<u64>,
}

const SINKS: [&str; 2] = ["a", "b"];

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Invariant 5 of the design, at the log's level: after any crash, every durable event routed to a
    /// sink is either still to do for it (taken again) or was finished by it; and everything it finished
    /// before a commit that succeeded stays finished (no redelivery past the checkpoint).
    #[test]
    fn sinks_progress_survives_crashes_at_least_once(script in proptest::collection::vec(sink_step(), 1..150)) {
        let disk = SimDisk::default();
        let (mut log, _) = open(&disk, 8 << 10);
        let mut routes: Vec<u8> = Vec::new();
        let mut d = [Dispatch::default(), Dispatch::default()];
        for step in script {
            match step {
                SinkStep::Append(len, mask) => {
                    let sinks: Vec<String> =
                        SINKS.iter().enumerate().filter(|(i, _)| mask & (1 << i) != 0).map(|(_, s)| s.to_string()).collect();
                    let seq = log.append(&event(routes.len() as u64, usize::from(len)), &sinks, 0, 0).unwrap();
                    prop_assert_eq!(seq, routes.len() as u64);
                    routes.push(mask);
                }
                SinkStep::Commit => {
                    log.commit().unwrap();
                    for x in &mut d {
                        x.finished_durably.extend(x.since_commit.drain(..));
                    }
                }
                SinkStep::Take(s, k) => {
                    let x = &mut d[usize::from(s)];
                    let mut took = Vec::new();
                    while x.cursor < log.durable_seq() && took.len() < usize::from(k) {
                        if routes[x.cursor as usize] & (1 << s) != 0 {
                            took.push(x.cursor);
                        }
                        x.cursor += 1;
                    }
                    x.outstanding.extend(&took);
                    log.taken(SINKS[usize::from(s)], x.cursor, took);
                }
                SinkStep::Finish(s, i) => {
                    let x = &mut d[usize::from(s)];
                    if x.outstanding.is_empty() {
                        continue;
                    }
                    let seq = *x.outstanding.iter().nth(usize::from(i) % x.outstanding.len()).unwrap();
                    x.outstanding.remove(&seq);
                    x.finished.insert(seq);
                    x.since_commit.push(seq);
                    log.finished(SINKS[usize::from(s)], &[seq]);
                }
                SinkStep::Crash(whole, torn, dirs) => {
                    drop(log);
                    disk.crash(
                        |pending| (usize::from(whole) % (pending + 1), usize::from(torn)),
                        |pending| usize::from(dirs) % (pending + 1),
                    );
                    let (reopened, _) = open(&disk, 8 << 10);
                    log = reopened;
                    let next = log.next_seq();
                    routes.truncate(next as usize);
                    for (i, x) in d.iter_mut().enumerate() {
                        let state = log.sinks().get(SINKS[i]).cloned().unwrap_or_default();
                        for seq in 0..next {
                            let routed = routes[seq as usize] & (1 << i) != 0;
                            if routed && state.is_done(seq) {
                                prop_assert!(x.finished.contains(&seq), "sink {}: {} done but never finished", SINKS[i], seq);
                            }
                            if x.finished_durably.contains(&seq) {
                                prop_assert!(state.is_done(seq), "sink {}: {} finished before a commit, not done", SINKS[i], seq);
                            }
                        }
                        // The dispatcher starts again from the log's word.
                        x.cursor = state.taken;
                        x.outstanding = state.outstanding.clone();
                        x.finished.retain(|s| *s < next);
                        x.finished_durably.retain(|s| *s < next);
                        x.since_commit.clear();
                    }
                }
            }
        }
    }
}

/// The real file system, in every preallocation and sync mode: rolls, reopen, every event read back; a
/// preallocated segment has its full size from the start, and a recovered one is cut to its valid frames.
#[test]
fn the_real_disk_in_every_mode() {
    use super::file::{OsDisk, Prealloc, SyncMode};
    for prealloc in [Prealloc::Grow, Prealloc::ZeroFill, Prealloc::Fallocate] {
        for sync in [SyncMode::Fdatasync, SyncMode::Dsync] {
            let tmp = tempfile::tempdir().unwrap();
            let dir = tmp.path().join("log");
            let options = Options { segment_size: 64 << 10, prealloc, sync, first_seq: 0 };
            let (mut log, _) = Log::open(OsDisk, &dir, UUID, options).unwrap();
            for n in 0..100 {
                log.append(&event(n, 500), &[], 0, 0).unwrap();
                if n % 10 == 9 {
                    log.commit().unwrap();
                }
            }
            drop(log);
            let (log, rec) = Log::open(OsDisk, &dir, UUID, options).unwrap();
            assert_eq!((rec.events, rec.holes.len(), rec.torn_tail), (100, 0, false), "{prealloc:?} {sync:?}");
            assert!(rec.segments > 1, "rolled");
            for n in 0..100 {
                let got = log.read(n).unwrap().unwrap().event.0;
                assert!(same(&got, &event(n, 500)), "{prealloc:?} {sync:?}: {n}");
            }
            let mut segs: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "seg"))
                .collect();
            segs.sort();
            let len = |p: &std::path::Path| std::fs::metadata(p).unwrap().len();
            let (active, before) = (&segs[segs.len() - 1], &segs[segs.len() - 2]);
            if prealloc != Prealloc::Grow {
                assert!(len(active) >= 64 << 10, "{prealloc:?}: the new segment has its full size: {}", len(active));
            }
            // The segment the first run ended in was cut to its valid frames at the reopen.
            assert!(len(before) < 64 << 10, "{prealloc:?}: {}", len(before));
        }
    }
}

/// What the spool thread needs without reading frames back (receive times, dedup hashes, routing, answers)
/// is the same after a reopen as it was when written, across rolls; a sink past the 63rd is told by its
/// frame.
#[test]
fn the_index_routing_and_answers_survive_a_reopen() {
    let disk = SimDisk::default();
    let (mut log, _) = open(&disk, 8 << 10);
    let many: Vec<String> = (0..70).map(|i| format!("s{i}")).collect();
    for n in 0..60 {
        let sinks: Vec<String> = match n % 3 {
            0 => vec!["a".into()],
            1 => vec!["a".into(), "b".into()],
            _ => many.clone(),
        };
        log.append(&event(n, 200), &sinks, 1000 + n, 0).unwrap();
        if n % 5 == 4 {
            log.commit().unwrap();
        }
    }
    log.answer(7, true);
    log.answer(8, true);
    log.answer(8, false);
    log.commit().unwrap();
    let check = |log: &Log<SimDisk>| {
        assert!(log.is_uncertain(7) && !log.is_uncertain(8) && !log.is_uncertain(9));
        let (a, reached) = log.routed_to("a", 0, 1000).unwrap();
        assert_eq!(a, (0..60).filter(|n| n % 3 != 2).collect::<Vec<_>>());
        assert_eq!(reached, 60);
        let (b, _) = log.routed_to("b", 10, 1000).unwrap();
        assert_eq!(b, (10..60).filter(|n| n % 3 == 1).collect::<Vec<_>>());
        let (last, _) = log.routed_to("s69", 0, 1000).unwrap();
        assert_eq!(last, (0..60).filter(|n| n % 3 == 2).collect::<Vec<_>>(), "past the 63rd sink");
        let (first, reached) = log.routed_to("a", 0, 3).unwrap();
        assert_eq!((first, reached), (vec![0, 1, 3], 4));
        assert_eq!(log.routed_to("nobody", 0, 10).unwrap(), (vec![], 60));
        let held = log.held_event(4).unwrap();
        assert_eq!((held.dedup_hash, held.routed, held.received_at_ms), (1004, true, event(4, 0).received_at_ms));
        let recent = log.received_between(event(10, 0).received_at_ms, event(13, 0).received_at_ms);
        assert_eq!(recent.iter().map(|h| h.seq).collect::<Vec<_>>(), vec![12, 11, 10], "newest first");
        assert_eq!(log.held_events().count(), 60);
    };
    check(&log);
    drop(log);
    let (log, rec) = open(&disk, 8 << 10);
    assert!(rec.segments > 2, "{rec:?}");
    check(&log);
}

/// A recovered segment is cut to its valid frames at open; a cut whose sync fails, then a crash, loses
/// nothing, and the next open cuts it again.
#[test]
fn a_recovered_segment_is_cut_to_its_valid_frames_and_a_failed_cut_loses_nothing() {
    let disk = SimDisk::default();
    let options = Options { prealloc: super::file::Prealloc::Fallocate, ..Options::with_segment_size(64 << 10) };
    let (mut log, _) = Log::open(disk.clone(), &dir(), UUID, options).unwrap();
    for n in 0..10 {
        log.append(&event(n, 100), &[], 0, 0).unwrap();
    }
    log.commit().unwrap();
    drop(log);
    let first = dir().join(segment::file_name(0));
    assert_eq!(disk.contents(&first).unwrap().len(), 64 << 10, "preallocated");
    // The cut's sync fails, and the machine goes down before anything else is synced.
    disk.fail_syncs(1);
    let syncs = disk.syncs();
    let reopened = Log::open(disk.clone(), &dir(), UUID, options);
    assert!(reopened.is_ok(), "a failed cut does not fail the open: {reopened:?}");
    assert!(disk.syncs() > syncs);
    drop(reopened);
    disk.crash_clean();
    let (log, rec) = Log::open(disk.clone(), &dir(), UUID, options).unwrap();
    assert_eq!((rec.events, rec.holes.len()), (10, 0));
    for n in 0..10 {
        assert!(same(&log.read(n).unwrap().unwrap().event.0, &event(n, 100)), "{n}");
    }
    let cut = disk.contents(&first).unwrap().len();
    assert!(cut < 64 << 10, "cut to its frames: {cut}");
}
