//! Reading a log without opening it for writing: [`verify`] (every segment read in full and checked, the
//! base of `hookbridge spool verify`) and [`dump`] (every valid frame, the base of `hookbridge spool
//! dump`). Both only read: they are safe beside a running daemon, and like any reader in another process
//! they stop at the first frame that fails its checks (a frame being written reads as a torn tail).

use std::path::Path;

use super::file::{Disk, LogFile};
use super::frame::{self, Kind, LoggedEvent};
use super::segment::{self, Header, HeaderError, Hole};
use super::{LogError, read_whole};

/// How a segment's valid frames end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// With a SEAL frame: the segment was full and the log went on in the next one.
    Sealed,
    /// At zeros or the end of the file: the newest segment, or one a restart left behind.
    Open,
    /// At bytes that fail the checks: a write a crash cut short (never acknowledged).
    Torn,
}

/// What [`verify`] found in one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// Its number (from its file name).
    pub segno: u64,
    /// Its header, if valid.
    pub header: Option<Header>,
    /// Valid frames.
    pub frames: usize,
    /// EVENT frames among them.
    pub events: u64,
    /// The seq the next EVENT after this segment's would have.
    pub next_seq: u64,
    /// Where the valid frames end, and how.
    pub valid_bytes: usize,
    pub end: End,
    /// The file's length (a preallocated segment is longer than its valid frames).
    pub file_bytes: u64,
    /// Corrupt stretches with valid frames after them.
    pub holes: Vec<Hole>,
}

/// What [`verify`] found in the whole log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The spool the first valid header names.
    pub spool_uuid: Option<[u8; 16]>,
    /// Every segment, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Events readable.
    pub events: u64,
    /// Events lost to holes and to gaps between segments.
    pub lost_events: u64,
    /// What is wrong, one line each (empty: the log is sound). A torn tail is not wrong: it was never
    /// acknowledged.
    pub problems: Vec<String>,
}

impl Report {
    /// Nothing is wrong.
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// The segment numbers in `dir`, oldest first.
fn segment_numbers<D: Disk>(disk: &D, dir: &Path) -> Result<Vec<u64>, LogError> {
    let names = disk.list(dir).map_err(|source| LogError::Io { path: dir.to_owned(), source })?;
    let mut numbers: Vec<u64> = names.iter().filter_map(|n| segment::parse_name(n)).collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// Reads every segment of the log in `dir` in full and checks it: headers, every frame's checksum and
/// order, the seqs from one segment to the next, and that all belong to one spool.
pub fn verify<D: Disk>(disk: &D, dir: &Path) -> Result<Report, LogError> {
    let mut report = Report::default();
    let numbers = segment_numbers(disk, dir)?;
    let newest = numbers.last().copied();
    let mut expected: Option<u64> = None;
    for segno in numbers {
        let path = dir.join(segment::file_name(segno));
        let file = disk.open(&path, false).map_err(|source| LogError::Io { path: path.clone(), source })?;
        let file_bytes = file.size().map_err(|source| LogError::Io { path: path.clone(), source })?;
        let data = read_whole(&file, &path)?;
        let name = segment::file_name(segno);
        let header = match Header::decode(&data) {
            Ok(h) => h,
            Err(e) => {
                let torn_roll = Some(segno) == newest && e == HeaderError::Invalid;
                if !torn_roll {
                    report.problems.push(format!("{name}: {e}"));
                }
                report.segments.push(SegmentReport {
                    segno,
                    header: None,
                    frames: 0,
                    events: 0,
                    next_seq: expected.unwrap_or(0),
                    valid_bytes: 0,
                    end: End::Torn,
                    file_bytes,
                    holes: Vec::new(),
                });
                continue;
            }
        };
        if header.segno != segno {
            report.problems.push(format!("{name}: its header says segment {}", header.segno));
        }
        match report.spool_uuid {
            None => report.spool_uuid = Some(header.spool_uuid),
            Some(uuid) if uuid != header.spool_uuid => {
                report.problems.push(format!("{name}: belongs to another spool"));
            }
            Some(_) => {}
        }
        if let Some(expected) = expected {
            if header.base_seq > expected {
                let lost = header.base_seq - expected;
                report.lost_events += lost;
                report.problems.push(format!(
                    "{name}: starts at event {} but the segment before ends at {expected}: {lost} events unreadable",
                    header.base_seq
                ));
            } else if header.base_seq < expected {
                report.problems.push(format!(
                    "{name}: starts at event {}, before the segment before ends ({expected})",
                    header.base_seq
                ));
            }
        }
        let scan = segment::scan(&data, &header);
        for hole in &scan.holes {
            report.lost_events += hole.lost_events;
            report.problems.push(format!(
                "{name}: bytes {}..{} are corrupt ({} events lost); the frames after them are kept",
                hole.from, hole.to, hole.lost_events
            ));
        }
        let events = scan.frames.iter().filter(|f| f.kind == Kind::Event).count() as u64;
        report.events += events;
        let end = match (scan.sealed, scan.end_reason) {
            (true, _) => End::Sealed,
            (false, frame::Reject::Empty) => End::Open,
            (false, _) => End::Torn,
        };
        expected = Some(scan.next_seq);
        report.segments.push(SegmentReport {
            segno,
            header: Some(header),
            frames: scan.frames.len(),
            events,
            next_seq: scan.next_seq,
            valid_bytes: scan.end,
            end,
            file_bytes,
            holes: scan.holes,
        });
    }
    Ok(report)
}

/// One valid frame, as [`dump`] gives it.
#[derive(Debug)]
pub struct Dumped {
    /// Its segment.
    pub segno: u64,
    /// Its offset there.
    pub offset: usize,
    /// Its kind.
    pub kind: Kind,
    /// Its seq (an EVENT's own; any other frame's the next EVENT's).
    pub seq: u64,
    /// An EVENT's event (`None` for other kinds, or a payload that does not parse).
    pub event: Option<LoggedEvent>,
    /// A STATE's or SINK_CHECKPOINT's sink progress.
    pub progress: Option<Progress>,
}

/// Sink progress as a frame holds it.
#[derive(Debug)]
pub enum Progress {
    /// Every sink's (a STATE frame: what was before is replaced).
    State(std::collections::BTreeMap<String, super::sinks::SinkState>),
    /// One sink's (a SINK_CHECKPOINT frame).
    Checkpoint(String, super::sinks::SinkState),
}

impl Dumped {
    /// One JSON object: where, what, and for an event its identity, routing and size; its body too if
    /// `bodies` (as text, lossily: a body may be binary).
    pub fn to_json(&self, bodies: bool) -> serde_json::Value {
        let mut v = serde_json::json!({
            "segment": self.segno,
            "offset": self.offset,
            "kind": format!("{:?}", self.kind),
            "seq": self.seq,
        });
        if let (Some(e), Some(obj)) = (&self.event, v.as_object_mut()) {
            let ev = &e.event.0;
            obj.insert("id".into(), ev.id.clone().into());
            obj.insert("source".into(), ev.source.clone().into());
            obj.insert("type".into(), ev.event_type.clone().into());
            obj.insert("received_at_ms".into(), ev.received_at_ms.into());
            obj.insert("sinks".into(), e.sinks.clone().into());
            obj.insert("ordering_key".into(), ev.ordering_key.clone().into());
            obj.insert("body_bytes".into(), ev.body.len().into());
            if bodies {
                obj.insert("body".into(), String::from_utf8_lossy(&ev.body).into_owned().into());
            }
        }
        v
    }
}

/// Gives `out` every valid frame of the log in `dir`, oldest first (a segment's frames up to where its
/// valid data ends, and after a hole the frames after it). A segment without a valid header is skipped
/// (`verify` says why).
pub fn dump<D: Disk, E>(
    disk: &D,
    dir: &Path,
    mut out: impl FnMut(Dumped) -> Result<(), E>,
) -> Result<Result<(), E>, LogError> {
    for segno in segment_numbers(disk, dir)? {
        let path = dir.join(segment::file_name(segno));
        let file = disk.open(&path, false).map_err(|source| LogError::Io { path: path.clone(), source })?;
        let data = read_whole(&file, &path)?;
        let Ok(header) = Header::decode(&data) else { continue };
        for found in segment::scan(&data, &header).frames {
            let Ok((frame, _)) = frame::decode(&data[found.offset..], header.place()) else { continue };
            let event = (frame.kind == Kind::Event).then(|| frame::get_event(&frame)).flatten();
            let progress = match frame.kind {
                Kind::State => super::sinks::get_state(frame.payload).map(Progress::State),
                Kind::SinkCheckpoint => {
                    super::sinks::get_checkpoint(frame.payload).map(|(name, s)| Progress::Checkpoint(name, s))
                }
                _ => None,
            };
            let dumped = Dumped { segno, offset: found.offset, kind: frame.kind, seq: frame.seq, event, progress };
            if let Err(e) = out(dumped) {
                return Ok(Err(e));
            }
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bytes::Bytes;

    use super::*;
    use crate::event::Event;
    use crate::store::log::file::SimDisk;
    use crate::store::log::{Log, Options};

    fn dir() -> PathBuf {
        PathBuf::from("/data/log")
    }

    fn event(n: u64) -> Event {
        Event {
            id: format!("ev-{n}"),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 1_764_633_600_000,
            headers: vec![],
            body: Bytes::from(format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(600))),
            dedup_key: String::new(),
            ordering_key: Some("k".into()),
            body_is_json: true,
        }
    }

    /// A log of `n` events in segments of 16 KiB, committed one by one, closed cleanly.
    fn log_of(disk: &SimDisk, n: u64) {
        let (mut log, _) = Log::open(disk.clone(), &dir(), [3; 16], Options::with_segment_size(16 << 10)).unwrap();
        for i in 0..n {
            log.append(&event(i), &["file".to_owned()], i, 0).unwrap();
            log.commit().unwrap();
        }
    }

    #[test]
    fn a_sound_log_verifies_and_dumps_every_event_in_order() {
        let disk = SimDisk::default();
        log_of(&disk, 60);
        let report = verify(&disk, &dir()).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!((report.events, report.lost_events, report.spool_uuid), (60, 0, Some([3; 16])));
        assert!(report.segments.len() > 2);
        let (last, older) = report.segments.split_last().unwrap();
        assert!(older.iter().all(|s| s.end == End::Sealed), "{older:?}");
        assert_eq!((last.end, last.next_seq), (End::Open, 60));
        let mut ids = Vec::new();
        let mut kinds = std::collections::BTreeSet::new();
        dump(&disk, &dir(), |d| {
            kinds.insert(format!("{:?}", d.kind));
            if let Some(e) = &d.event {
                ids.push(e.event.0.id.clone());
                let json = d.to_json(true);
                assert_eq!((json["seq"].as_u64(), json["sinks"][0].as_str()), (Some(d.seq), Some("file")));
                assert!(json["body"].as_str().unwrap().starts_with("{\"n\":"));
                assert!(d.to_json(false).get("body").is_none());
            }
            Ok::<(), ()>(())
        })
        .unwrap()
        .unwrap();
        assert_eq!(ids, (0..60).map(|i| format!("ev-{i}")).collect::<Vec<_>>());
        assert!(["Event", "State", "Seal"].iter().all(|k| kinds.contains(*k)), "{kinds:?}");
    }

    /// Corruption in the middle is a problem, counted; a torn tail is not (it was never acknowledged);
    /// a segment of another spool is a problem; `dump` stops where its caller does.
    #[test]
    fn corruption_a_foreign_segment_and_a_torn_tail_are_told_apart() {
        let disk = SimDisk::default();
        log_of(&disk, 60);
        let first = dir().join(segment::file_name(0));
        let data = disk.contents(&first).unwrap();
        let at = data.windows(7).position(|w| w == b"\"n\":2,\"").unwrap();
        disk.flip_bit(&first, at, 0);
        let report = verify(&disk, &dir()).unwrap();
        assert_eq!((report.events, report.lost_events), (59, 1));
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert!(report.problems[0].contains("corrupt (1 events lost)"), "{:?}", report.problems);

        let disk = SimDisk::default();
        log_of(&disk, 60);
        // A write torn at the newest segment's tail.
        let numbers = segment_numbers(&disk, &dir()).unwrap();
        let newest = dir().join(segment::file_name(*numbers.last().unwrap()));
        let end = verify(&disk, &dir()).unwrap().segments.last().unwrap().valid_bytes;
        let mut f = disk.open(&newest, true).unwrap();
        f.write_at(&[0xAB; 40], end as u64).unwrap();
        f.sync_data().unwrap();
        let report = verify(&disk, &dir()).unwrap();
        assert!(report.ok(), "{:?}", report.problems);
        assert_eq!(report.segments.last().unwrap().end, End::Torn);
        // A segment of another spool, after the others.
        let other = SimDisk::default();
        let (_, _) = Log::open(other.clone(), &dir(), [9; 16], Options::with_segment_size(16 << 10)).unwrap();
        let foreign = other.contents(&dir().join(segment::file_name(0))).unwrap();
        let segno = numbers.last().unwrap() + 1;
        let header = Header { segno, base_seq: 60, spool_uuid: [9; 16], created_ms: 0 };
        let mut bytes = header.encode();
        bytes.extend_from_slice(&foreign[segment::HEADER_SIZE..]);
        let mut f = disk.create_new(&dir().join(segment::file_name(segno))).unwrap();
        f.write_at(&bytes, 0).unwrap();
        let report = verify(&disk, &dir()).unwrap();
        assert!(report.problems.iter().any(|p| p.contains("another spool")), "{:?}", report.problems);
        let mut seen = 0;
        let stopped = dump(&disk, &dir(), |_| {
            seen += 1;
            if seen == 5 { Err("enough") } else { Ok(()) }
        })
        .unwrap();
        assert_eq!((stopped, seen), (Err("enough"), 5));
    }
}
