//! The append-only segment log: the spool's hot path (`../shared/design/SPOOL-LOG.md` in the team's notes;
//! `ARCHITECTURE.md` has the decisions). Healthy events are framed ([`frame`]) into segments ([`segment`]);
//! a commit is one positioned write of every frame staged since the last one and one `fdatasync`, shared
//! by all of them (group commit). An event is durable, and may be answered for, once [`Log::commit`]
//! returned a `durable_seq` above its seq. No crate fits (see ARCHITECTURE.md), so the log is ours, and it
//! runs on [`file::Disk`] so that tests can crash it on a simulated disk at every byte.
//!
//! The rules it keeps:
//! - One writer, appending strictly in seq order; a failed sync fails the log for good (a sync is never
//!   retried: the kernel may have dropped the pages it could not write).
//! - A segment recovered at open is never written again: the log goes on in a new segment, so stale bytes
//!   never sit after a new tail.
//! - A segment is rolled when the next frame would pass `segment_size`: the old one gets a SEAL frame and
//!   its sync, the new one its header, a STATE frame and the batch, then its sync and the directory's.
//!   A segment holds at least one frame, so one larger than `segment_size` still fits (in a segment of its
//!   own), and a batch may pass the size by itself: a roll happens at most once per commit.

pub mod file;
pub mod frame;
pub mod inspect;
pub mod segment;
pub mod sinks;
pub mod spool;

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};

use file::{Disk, LogFile, Prealloc, SyncMode};
use frame::{Kind, LoggedEvent, Place, TooBig};
use segment::{HEADER_SIZE, Header, HeaderError, Hole};
use sinks::SinkState;

use crate::event::{Event, now_ms};

/// Default segment size.
pub const SEGMENT_SIZE: u64 = 64 << 20;

/// How the log writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// A segment is rolled when the next frame would pass this size.
    pub segment_size: u64,
    /// How a new segment's space is reserved: by a helper thread, on the spare segment that the next roll
    /// takes (except the first one, at open).
    pub prealloc: Prealloc,
    /// How a commit makes its write durable.
    pub sync: SyncMode,
    /// The seq of a new log's first event (a log that takes over a SQLite spool starts above its seqs, so
    /// that the two never share an id); ignored once the log has a segment.
    pub first_seq: u64,
}

impl Default for Options {
    fn default() -> Self {
        // Measured in BENCHMARKS.md: alone, a commit into zero-filled blocks syncs faster (data only); in the
        // daemon, zero-filling costs a tenth of its CPU (every segment written twice) and `fallocate` gives
        // more webhooks per second at the same p99.
        Options { segment_size: SEGMENT_SIZE, prealloc: Prealloc::Fallocate, sync: SyncMode::Fdatasync, first_seq: 0 }
    }
}

impl Options {
    /// The defaults with another segment size.
    pub fn with_segment_size(segment_size: u64) -> Self {
        Options { segment_size, ..Options::default() }
    }
}

/// Log failures.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file operation failed.
    #[error("spool log {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A segment that is not the newest has no valid header, or belongs to another spool.
    #[error("spool log {path}: {why}")]
    Corrupt {
        /// The segment.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A segment written by a newer hookbridge.
    #[error("spool log {path}: {source}")]
    Newer {
        /// The segment.
        path: PathBuf,
        /// The format.
        source: HeaderError,
    },
    /// The event does not fit the format.
    #[error(transparent)]
    TooBig(#[from] TooBig),
    /// No space left on the disk for a commit that wrote nothing durable: it is not answered, and the
    /// log takes the next one (space may return).
    #[error("spool log {path}: no space left on the disk ({source}); retry when there is room")]
    Full {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A commit failed earlier: nothing is written or answered any more.
    #[error("spool log failed earlier (a write or sync failed); restart to recover")]
    Failed,
}

/// The staging buffer's capacity kept from one commit to the next at most.
const BUF_KEPT: usize = 1 << 20;

/// Whether `e` says the disk (or the quota) has no room.
fn no_room(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded)
}

/// Reserves a new segment's space; on a disk without room for all of it the segment grows as it is
/// written instead (a small or nearly full disk still takes what fits). Returns whether it was reserved.
fn preallocate<F: LogFile>(file: &mut F, len: u64, how: Prealloc, path: &Path) -> io::Result<bool> {
    match file.preallocate(len, how) {
        Ok(()) => Ok(how != Prealloc::Grow),
        Err(e) if no_room(&e) => {
            // Tried again at every commit while the disk stays full.
            static NO_ROOM: crate::limits::Throttle = crate::limits::Throttle::new(crate::limits::REPEATED_ERROR_LOG);
            if let Some(held_back) = NO_ROOM.due(std::time::Instant::now()) {
                tracing::warn!(error = %e, file = %path.display(), held_back, "no room to preallocate a spool segment; it grows as it is written");
            }
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The spare segment's file name for segment `segno`: preallocated ahead by a helper thread, renamed to the
/// segment's name at the roll. Not a segment name, so recovery never reads it; leftovers are removed at open.
fn spare_name(segno: u64) -> String {
    format!("spare.{segno:016x}")
}

/// The spare segment on its way: the helper thread answers once it is preallocated (and synced).
type Spare<F> = std::sync::mpsc::Receiver<std::io::Result<F>>;

/// The mask bit of `sink` in `ids`, interning it (bit 63 for every sink past the 63rd).
fn intern(ids: &mut Vec<String>, sink: &str) -> u64 {
    match ids.iter().position(|s| s == sink) {
        Some(i) => 1 << i,
        None if ids.len() < 63 => {
            ids.push(sink.to_owned());
            1 << (ids.len() - 1)
        }
        None => SINKS_OVERFLOW,
    }
}

/// A whole file's bytes.
fn read_whole<F: LogFile>(file: &F, path: &Path) -> Result<Vec<u8>, LogError> {
    let io_err = |source| LogError::Io { path: path.to_owned(), source };
    let len = file.size().map_err(io_err)?;
    let mut data = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
    let n = file.read_at(&mut data, 0).map_err(io_err)?;
    data.truncate(n);
    Ok(data)
}

/// What recovery found at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Segments read.
    pub segments: usize,
    /// Events found.
    pub events: u64,
    /// Corrupt stretches with valid frames after them, per segment: their events are lost.
    pub holes: Vec<(u64, Hole)>,
    /// The newest segment ended in a torn write (what follows it was never acknowledged).
    pub torn_tail: bool,
    /// The newest segment's header was torn (a roll that crashed before its first sync): removed.
    pub removed_torn_segment: Option<u64>,
}

impl Recovery {
    /// Events lost to holes.
    pub fn lost_events(&self) -> u64 {
        self.holes.iter().map(|(_, h)| h.lost_events).sum()
    }
}

/// Where one event's frame is, and what the spool thread needs of it without reading it back (48 bytes
/// per event held).
#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: u64,
    offset: u64,
    size: u32,
    body_len: u32,
    received_at_ms: i64,
    dedup_hash: u64,
    /// The sinks it was routed to: bit `i` for `Log::sink_ids[i]`, bit 63 for any sink past the 63rd
    /// (whose frame is then read to tell).
    sinks: u64,
}

/// The bit that stands for every sink past the 63rd.
const SINKS_OVERFLOW: u64 = 1 << 63;

/// What the spool thread needs of one event held by the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    /// Its seq.
    pub seq: u64,
    /// Receive time, ms since the epoch.
    pub received_at_ms: i64,
    /// Its dedup hash.
    pub dedup_hash: u64,
    /// Body bytes.
    pub body_len: u32,
    /// It was routed to a sink (an unrouted event is kept only until pruned).
    pub routed: bool,
}

/// A segment: its header, its file, and the events it holds.
struct Seg<F> {
    header: Header,
    file: F,
    events: Vec<Entry>,
}

/// The append-only log.
pub struct Log<D: Disk> {
    disk: D,
    dir: PathBuf,
    uuid: [u8; 16],
    segment_size: u64,
    options: Options,
    /// Every segment, by number; the last is the active one.
    segments: BTreeMap<u64, Seg<D::File>>,
    /// Where the active segment's next frame goes.
    tail: u64,
    /// The last segment is this run's (not a recovered or sealed one): frames may be appended to it.
    writable: bool,
    /// Frames staged for the active segment, then (from `roll_at`) for the next one.
    buf: Vec<u8>,
    roll_at: Option<usize>,
    /// Staged events, their offsets in `buf`.
    staged: Vec<Entry>,
    next_seq: u64,
    durable_seq: u64,
    failed: bool,
    /// Each sink's progress, and the sinks whose progress changed since the last commit.
    sinks: BTreeMap<String, SinkState>,
    dirty: BTreeSet<String>,
    /// The next segment's file (for that segment number), being prepared (`None`: none asked for, or
    /// `Prealloc::Grow`).
    spare: Option<(u64, Spare<D::File>)>,
    /// The active segment was not preallocated (no room): it grows, and no spare is prepared.
    growing: bool,
    /// Sink ids in the order first seen (an event's `sinks` mask indexes this; 63 at most).
    sink_ids: Vec<String>,
    /// What ANSWER frames said of events' webhook answers: uncertain (`true`) or certain again (see
    /// `store::dedup`).
    answered: BTreeMap<u64, bool>,
    /// Answers staged for the next commit: (seq, uncertain).
    answers: Vec<(u64, bool)>,
}

impl<D: Disk> std::fmt::Debug for Log<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.dir)
            .field("segments", &self.segments.keys().collect::<Vec<_>>())
            .field("next_seq", &self.next_seq)
            .field("durable_seq", &self.durable_seq)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl<D: Disk> Log<D> {
    /// Opens (or creates) the log in `dir` for the spool `uuid`, recovers it, and starts a new segment.
    pub fn open(disk: D, dir: &Path, uuid: [u8; 16], options: Options) -> Result<(Self, Recovery), LogError> {
        let io_err = |path: &Path| {
            let path = path.to_owned();
            move |source| LogError::Io { path, source }
        };
        disk.create_dir_all(dir).map_err(io_err(dir))?;
        if let Some(parent) = dir.parent() {
            disk.sync_dir(parent).map_err(io_err(parent))?;
        }
        let names = disk.list(dir).map_err(io_err(dir))?;
        // Spares prepared for a roll that never came: nothing in them was ever written. One that cannot be
        // removed only means that its segment will be made on its roll.
        for name in names.iter().filter(|n| n.starts_with("spare.")) {
            if let Err(e) = disk.remove(&dir.join(name)) {
                tracing::warn!(error = %e, file = %dir.join(name).display(), "cannot remove a leftover spare segment");
            }
        }
        let mut numbers: Vec<u64> = names.iter().filter_map(|n| segment::parse_name(n)).collect();
        numbers.sort_unstable();
        let mut recovery = Recovery::default();
        let mut segments = BTreeMap::new();
        let mut next_seq = 0;
        let mut progress: BTreeMap<String, SinkState> = BTreeMap::new();
        let mut sink_ids: Vec<String> = Vec::new();
        let mut answered: BTreeMap<u64, bool> = BTreeMap::new();
        let mut last_end: Option<(u64, usize)> = None;
        let newest = numbers.last().copied();
        for segno in numbers {
            let path = dir.join(segment::file_name(segno));
            let file = disk.open(&path, false).map_err(io_err(&path))?;
            let data = read_whole(&file, &path)?;
            let header = match Header::decode(&data) {
                Ok(h) => h,
                Err(HeaderError::Invalid) if Some(segno) == newest => {
                    // Header, STATE and first batch go out in one write and one sync: a torn header means
                    // nothing in this segment was ever acknowledged.
                    drop(file);
                    disk.remove(&path).map_err(io_err(&path))?;
                    disk.sync_dir(dir).map_err(io_err(dir))?;
                    recovery.removed_torn_segment = Some(segno);
                    continue;
                }
                Err(e @ HeaderError::Newer(_)) => return Err(LogError::Newer { path, source: e }),
                Err(HeaderError::Invalid) => {
                    return Err(LogError::Corrupt { path, why: "the segment header is not valid".into() });
                }
            };
            if header.segno != segno || header.spool_uuid != uuid {
                return Err(LogError::Corrupt { path, why: "the segment belongs to another spool or file".into() });
            }
            if !segments.is_empty() && header.base_seq < next_seq {
                return Err(LogError::Corrupt { path, why: "the segment starts before its predecessor ends".into() });
            }
            // A segment starts where its predecessor's valid frames ended when it was made: a later start
            // means synced frames at the predecessor's end became unreadable since (its scan took them for
            // a torn tail). They are lost, and counted.
            if let Some((prev, end)) = last_end
                && header.base_seq > next_seq
            {
                recovery.holes.push((prev, Hole { from: end, to: end, lost_events: header.base_seq - next_seq }));
            }
            let scan = segment::scan(&data, &header);
            // Nothing valid lies past the scan's end (a torn tail, or preallocated space never used: a start
            // opens a new segment, so every stop leaves one mostly empty): cut it off, so that its space is
            // given back and later reads stop there. The segment is never written again; a crash during
            // the cut (or a cut that fails) leaves either length, and both scan alike.
            if scan.end < data.len() {
                let cut = disk.open(&path, true).and_then(|mut f| {
                    f.set_len(scan.end as u64)?;
                    f.sync_data()
                });
                if let Err(e) = cut {
                    // Only space and read time are lost: what was read stays what the segment holds.
                    tracing::warn!(error = %e, file = %path.display(), "cannot cut a recovered segment to its valid frames");
                }
            }
            let mut events: Vec<Entry> = Vec::new();
            for f in &scan.frames {
                let Ok((fr, _)) = frame::decode(&data[f.offset..], header.place()) else { continue };
                match fr.kind {
                    Kind::Event => {
                        // A frame whose CRC matched always parses (only this format writes one).
                        let Some(head) = frame::event_head(fr.payload) else { continue };
                        let mask = head.sinks.iter().fold(0, |m, s| m | intern(&mut sink_ids, s));
                        events.push(Entry {
                            seq: f.seq,
                            offset: f.offset as u64,
                            size: f.size as u32,
                            body_len: head.body_len,
                            received_at_ms: head.received_at_ms,
                            dedup_hash: head.dedup_hash,
                            sinks: mask,
                        });
                    }
                    Kind::State => {
                        if let Some(state) = sinks::get_state(fr.payload) {
                            progress = state;
                        }
                    }
                    Kind::SinkCheckpoint => {
                        if let Some((name, state)) = sinks::get_checkpoint(fr.payload) {
                            progress.insert(name, state);
                        }
                    }
                    Kind::Answer => {
                        answered.extend(frame::get_answers(fr.payload).unwrap_or_default());
                    }
                    Kind::Heartbeat | Kind::Seal => {}
                }
            }
            recovery.segments += 1;
            recovery.events += events.len() as u64;
            recovery.holes.extend(scan.holes.iter().map(|h| (segno, *h)));
            recovery.torn_tail = Some(segno) == newest && scan.end_reason != frame::Reject::Empty;
            next_seq = scan.next_seq;
            last_end = Some((segno, scan.end));
            segments.insert(segno, Seg { header, file, events });
        }
        if segments.is_empty() {
            next_seq = next_seq.max(options.first_seq);
        }
        // A checkpoint is never ahead of the events it covers (they were durable when taken); a disk that
        // kept a later page of a torn write and not an earlier one could make it look so.
        for state in progress.values_mut() {
            state.taken = state.taken.min(next_seq);
            state.outstanding.retain(|s| *s < next_seq);
        }
        let mut log = Log {
            disk,
            dir: dir.to_owned(),
            uuid,
            segment_size: options.segment_size.max(HEADER_SIZE as u64 * 2),
            options,
            segments,
            tail: 0,
            writable: false,
            buf: Vec::new(),
            roll_at: None,
            staged: Vec::new(),
            next_seq,
            durable_seq: next_seq,
            failed: false,
            sinks: progress,
            dirty: BTreeSet::new(),
            spare: None,
            growing: false,
            sink_ids,
            answered,
            answers: Vec::new(),
        };
        // Never write into a recovered segment: the log goes on in a new one. On a full disk that waits
        // for the first commit that finds room (until then every commit fails cleanly).
        log.roll_at = Some(0);
        match log.commit() {
            Ok(_) => {}
            Err(e @ LogError::Full { .. }) => tracing::warn!(error = %e, "the spool log cannot start its segment yet"),
            Err(e) => return Err(e),
        }
        Ok((log, recovery))
    }

    /// The seq the next appended event gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Every event with a lower seq is durable.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// The lowest seq the log still holds (pruning will move it).
    pub fn first_seq(&self) -> u64 {
        self.segments.values().find_map(|s| s.events.first().map(|e| e.seq)).unwrap_or(self.durable_seq)
    }

    /// Each sink's progress (as the last commit made it durable, plus what was reported since).
    pub fn sinks(&self) -> &BTreeMap<String, SinkState> {
        &self.sinks
    }

    /// A sink's dispatcher took every durable event below `upto` (passing over those not routed to it);
    /// `outstanding` are those it took and has not finished. Durable with the next commit.
    pub fn taken(&mut self, sink: &str, upto: u64, outstanding: impl IntoIterator<Item = u64>) {
        let state = self.sinks.entry(sink.to_owned()).or_default();
        let upto = upto.min(self.durable_seq).max(state.taken);
        state.outstanding.extend(outstanding.into_iter().filter(|s| *s < upto));
        state.taken = upto;
        self.dirty.insert(sink.to_owned());
    }

    /// A sink finished these seqs (delivered, or moved to the cold path). Durable with the next commit.
    pub fn finished(&mut self, sink: &str, seqs: &[u64]) {
        if let Some(state) = self.sinks.get_mut(sink) {
            for s in seqs {
                state.outstanding.remove(s);
            }
            self.dirty.insert(sink.to_owned());
        }
    }

    /// Stages an event for the next commit; its seq. Nothing is written until [`Log::commit`].
    pub fn append(&mut self, event: &Event, sinks: &[String], dedup_hash: u64, flags: u8) -> Result<u64, LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        let size = frame::size(frame::event_payload_len(event, sinks)?);
        let place = self.staging_place(size as u64);
        let seq = self.next_seq;
        let at = self.buf.len() as u64;
        let flags = if event.body_is_json { flags | frame::FLAG_VALIDATED_JSON } else { flags };
        frame::encode(&mut self.buf, Kind::Event, flags, seq, place, |b| frame::put_event(b, event, sinks, dedup_hash));
        let mask = sinks.iter().fold(0, |m, s| m | intern(&mut self.sink_ids, s));
        self.staged.push(Entry {
            seq,
            offset: at,
            size: size as u32,
            body_len: event.body.len() as u32,
            received_at_ms: event.received_at_ms,
            dedup_hash,
            sinks: mask,
        });
        self.next_seq += 1;
        Ok(seq)
    }

    /// Stages a HEARTBEAT frame: the next commit writes and syncs even with nothing else staged (a readiness
    /// probe's proof that the log is writable).
    pub fn heartbeat(&mut self) {
        let place = self.staging_place(frame::size(0) as u64);
        frame::encode(&mut self.buf, Kind::Heartbeat, 0, self.next_seq, place, |_| {});
    }

    /// Every sink id an event held was routed to (the 63 first seen; past them, read the frames).
    pub fn sink_ids(&self) -> &[String] {
        &self.sink_ids
    }

    /// Stages what became known of the answer to event `seq`'s webhook (durable with the next commit).
    pub fn answer(&mut self, seq: u64, uncertain: bool) {
        if seq < self.next_seq {
            self.answers.push((seq, uncertain));
        }
    }

    /// Whether the answer to event `seq` was recorded as uncertain (and not made certain since).
    pub fn is_uncertain(&self, seq: u64) -> bool {
        self.answered.get(&seq) == Some(&true)
    }

    /// What the log recorded of event `seq`'s answer: `Some(true)` uncertain, `Some(false)` certain again,
    /// `None` nothing (for an event from before the log, what the spool it took over recorded holds).
    pub fn answer_recorded(&self, seq: u64) -> Option<bool> {
        self.answered.get(&seq).copied()
    }

    /// The durable events received in `[since_ms, until_ms)`, newest first (for the dedup index).
    pub fn received_between(&self, since_ms: i64, until_ms: i64) -> Vec<Held> {
        let mut out = Vec::new();
        for seg in self.segments.values().rev() {
            for e in seg.events.iter().rev() {
                if e.received_at_ms >= since_ms && e.received_at_ms < until_ms {
                    out.push(self.held(e));
                }
            }
        }
        out
    }

    fn held(&self, e: &Entry) -> Held {
        Held {
            seq: e.seq,
            received_at_ms: e.received_at_ms,
            dedup_hash: e.dedup_hash,
            body_len: e.body_len,
            routed: e.sinks != 0,
        }
    }

    /// The durable events from `from` on (at most `limit`) routed to `sink`, in seq order, and the seq the
    /// walk reached (every event below it was looked at).
    pub fn routed_to(&self, sink: &str, from: u64, limit: usize) -> Result<(Vec<u64>, u64), LogError> {
        let bit = match self.sink_ids.iter().position(|s| s == sink) {
            Some(i) => 1u64 << i,
            None if self.sink_ids.len() < 63 => return Ok((Vec::new(), self.durable_seq)),
            None => SINKS_OVERFLOW,
        };
        let mut found = Vec::new();
        for seg in self.segments.values() {
            let first = seg.events.partition_point(|e| e.seq < from);
            for e in &seg.events[first..] {
                if found.len() >= limit {
                    return Ok((found, e.seq));
                }
                if e.sinks & bit == 0 {
                    continue;
                }
                if bit == SINKS_OVERFLOW {
                    // Past the 63rd sink: the frame tells.
                    match self.read(e.seq)? {
                        Some(logged) if logged.sinks.iter().any(|s| s == sink) => {}
                        _ => continue,
                    }
                }
                found.push(e.seq);
            }
        }
        Ok((found, self.durable_seq))
    }

    /// What the log holds of durable event `seq`, without reading it.
    pub fn held_event(&self, seq: u64) -> Option<Held> {
        let (_, seg) = self.segments.iter().rev().find(|(_, s)| s.header.base_seq <= seq)?;
        let i = seg.events.binary_search_by_key(&seq, |e| e.seq).ok()?;
        Some(self.held(&seg.events[i]))
    }

    /// Every durable event held, in seq order.
    pub fn held_events(&self) -> impl Iterator<Item = Held> + '_ {
        self.segments.values().flat_map(|s| s.events.iter()).map(|e| self.held(e))
    }

    /// Where a frame of `size` bytes staged now goes: the active segment, or the next one once it would not
    /// fit or the active one is a recovered one (a roll, at most one per commit).
    fn staging_place(&mut self, size: u64) -> Place {
        if self.roll_at.is_none() {
            match self.segments.last_key_value() {
                Some((_, seg)) if self.writable && self.tail + self.buf.len() as u64 + size <= self.segment_size => {
                    return seg.header.place();
                }
                _ => self.roll_at = Some(self.buf.len()),
            }
        }
        let segno = self.segments.last_key_value().map_or(0, |(n, _)| n + 1);
        Header { segno, base_seq: 0, spool_uuid: self.uuid, created_ms: 0 }.place()
    }

    /// Writes every staged frame and syncs: one write and one `fdatasync` (plus, at a roll, the old
    /// segment's seal and sync and the directory's sync). Returns the new `durable_seq`. An error fails the
    /// log for good: nothing staged is durable, and nothing more is accepted.
    pub fn commit(&mut self) -> Result<u64, LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        let answers = std::mem::take(&mut self.answers);
        if !answers.is_empty() {
            let mut payload = Vec::with_capacity(4 + 9 * answers.len());
            frame::put_answers(&mut payload, &answers);
            let place = self.staging_place(frame::size(payload.len()) as u64);
            frame::encode(&mut self.buf, Kind::Answer, 0, self.next_seq, place, |b| b.extend_from_slice(&payload));
        }
        // One checkpoint per sink whose progress changed, after the batch's events.
        let dirty = std::mem::take(&mut self.dirty);
        for name in &dirty {
            let Some(state) = self.sinks.get(name) else { continue };
            let mut payload = Vec::new();
            sinks::put_checkpoint(&mut payload, name, state);
            let place = self.staging_place(frame::size(payload.len()) as u64);
            frame::encode(&mut self.buf, Kind::SinkCheckpoint, 0, self.next_seq, place, |b| {
                b.extend_from_slice(&payload)
            });
        }
        if self.buf.is_empty() && self.roll_at.is_none() {
            return Ok(self.durable_seq);
        }
        let rolling = self.roll_at.is_some();
        match self.write_staged() {
            Ok(()) => {
                self.durable_seq = self.next_seq;
                self.answered.extend(answers);
                Ok(self.durable_seq)
            }
            Err(e @ LogError::Full { .. }) => {
                // Nothing of the batch is durable: its events are forgotten (their seqs given again),
                // its answers and checkpoints wait for the next commit, and so does a roll.
                self.next_seq = self.durable_seq;
                self.answers = answers;
                self.dirty.extend(dirty);
                if rolling || !self.writable {
                    self.roll_at = Some(0);
                }
                Err(e)
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn write_staged(&mut self) -> Result<(), LogError> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut staged = std::mem::take(&mut self.staged);
        let written = self.write_batch(&buf, &staged);
        // Both keep their capacity for the next batch (no reallocation while it is staged), up to a bound
        // (a batch with a large body does not keep its memory).
        buf.clear();
        staged.clear();
        if buf.capacity() > BUF_KEPT {
            buf = Vec::new();
        }
        self.buf = buf;
        self.staged = staged;
        written
    }

    fn write_batch(&mut self, buf: &[u8], staged: &[Entry]) -> Result<(), LogError> {
        let io_err = |path: PathBuf| move |source| LogError::Io { path, source };
        let split = self.roll_at.take();
        let first_new =
            split.map_or(staged.len(), |i| staged.iter().position(|e| e.offset >= i as u64).unwrap_or(staged.len()));
        // The seq the log has reached at the roll: the first event of the new segment's.
        let base_seq = staged.get(first_new).map_or(self.next_seq, |e| e.seq);
        // Whether part of this batch goes into the old segment (then a failure at the roll is fatal).
        let batch_in_old = self.writable && split != Some(0);
        if self.writable
            && let Some(mut last) = self.segments.last_entry()
        {
            let segno = *last.key();
            let seg = last.get_mut();
            // The batch as staged; at a roll, its first part with the old segment's seal after it.
            let part: std::borrow::Cow<'_, [u8]> = match split {
                None => buf.into(),
                Some(at) => {
                    let mut part = buf[..at].to_vec();
                    frame::encode(&mut part, Kind::Seal, 0, base_seq, seg.header.place(), |_| {});
                    part.into()
                }
            };
            let path = self.dir.join(segment::file_name(segno));
            // No room for the write: nothing reached the disk's durable state (what a short write left past
            // the tail is overwritten by the next commit, or cut as a torn tail at recovery).
            let write_err = |path: PathBuf| {
                move |source: io::Error| {
                    if no_room(&source) { LogError::Full { path, source } } else { LogError::Io { path, source } }
                }
            };
            match self.options.sync {
                SyncMode::Fdatasync => {
                    seg.file.write_at(&part, self.tail).map_err(write_err(path.clone()))?;
                    seg.file.sync_data().map_err(io_err(path.clone()))?;
                }
                SyncMode::Dsync => seg.file.write_durable_at(&part, self.tail).map_err(io_err(path.clone()))?,
            }
            for e in &staged[..first_new] {
                seg.events.push(Entry { offset: self.tail + e.offset, ..*e });
            }
            self.tail += part.len() as u64;
            if split.is_some() {
                // Sealed: read-only from now on (for a real file, no write handle stays open).
                seg.file = self.disk.open(&path, false).map_err(io_err(path))?;
                self.writable = false;
            }
        }
        let Some(split) = split else { return Ok(()) };
        // The new segment: header, STATE, the rest of the batch, in one write and one sync.
        let segno = self.segments.last_key_value().map_or(0, |(n, _)| n + 1);
        let header = Header { segno, base_seq, spool_uuid: self.uuid, created_ms: now_ms() };
        let path = self.dir.join(segment::file_name(segno));
        let mut data = header.encode();
        let progress = &self.sinks;
        frame::encode(&mut data, Kind::State, 0, base_seq, header.place(), |b| sinks::put_state(b, progress));
        let start = data.len();
        data.extend_from_slice(&buf[split..]);
        // Before any of this batch was written (the old segment was sealed by an earlier commit), no room
        // for the new segment fails the commit cleanly: the file is taken back, and the roll waits.
        let clean = !batch_in_old;
        let (made, reserved) = match self.take_spare(segno, &path)? {
            Some(file) => (Ok(file), true),
            None => {
                let mut reserved = false;
                let made = self.disk.create_new(&path).and_then(|mut file| {
                    reserved = preallocate(&mut file, self.segment_size, self.options.prealloc, &path)?;
                    Ok(file)
                });
                (made, reserved)
            }
        };
        let written = made.and_then(|mut file| file.write_durable_at(&data, 0).map(|()| file));
        let file = match written {
            Ok(file) => file,
            Err(source) if clean && no_room(&source) => {
                if let Err(e) = self.disk.remove(&path)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(error = %e, file = %path.display(), "cannot remove a segment that found no room");
                }
                return Err(LogError::Full { path, source });
            }
            Err(source) => return Err(LogError::Io { path, source }),
        };
        // The new name (created, or renamed from the spare) is durable before anything in it is answered.
        self.disk.sync_dir(&self.dir).map_err(io_err(self.dir.clone()))?;
        let events = staged[first_new..]
            .iter()
            .map(|e| Entry { offset: (start as u64 + e.offset - split as u64), ..*e })
            .collect();
        self.segments.insert(segno, Seg { header, file, events });
        self.tail = data.len() as u64;
        self.writable = true;
        // A segment that found no room to be reserved: no spare either (it would not fit, and trying
        // would take the room this one grows into for as long as the attempt lasts).
        self.growing = !reserved;
        self.prepare_spare();
        Ok(())
    }

    /// Starts preparing the next segment's file on a helper thread, so that the roll that needs it does
    /// not preallocate (a zero-filled 64 MiB segment is tens of milliseconds of writing and syncing).
    fn prepare_spare(&mut self) {
        if self.options.prealloc == Prealloc::Grow || self.spare.is_some() || self.growing {
            return;
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let Some(segno) = self.segments.last_key_value().map(|(n, _)| n + 1) else { return };
        let path = self.dir.join(spare_name(segno));
        let (disk, size, how) = (self.disk.clone(), self.segment_size, self.options.prealloc);
        let prepare = move || {
            let made = (|| {
                match disk.remove(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                    _ => {}
                }
                let mut file = disk.create_new(&path)?;
                if let Err(e) = file.preallocate(size, how) {
                    // Whatever part of it was reserved goes back.
                    let _ = disk.remove(&path);
                    return Err(e);
                }
                Ok(file)
            })();
            let _ = tx.send(made);
        };
        match std::thread::Builder::new().name("hookbridge-spare".into()).spawn(prepare) {
            Ok(_) => self.spare = Some((segno, rx)),
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the spool's spare-segment thread; segments are preallocated as they are needed")
            }
        }
    }

    /// The prepared spare, renamed to `path` (waiting for it if it is still being prepared); `None` if
    /// there is none or preparing it failed (the roll then makes the segment itself).
    fn take_spare(&mut self, segno: u64, path: &Path) -> Result<Option<D::File>, LogError> {
        let Some((spare_segno, spare)) = self.spare.take() else { return Ok(None) };
        if spare_segno != segno {
            return Ok(None);
        }
        let file = match spare.recv() {
            Ok(Ok(file)) => file,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot prepare the spool's spare segment; making it on the roll");
                return Ok(None);
            }
            Err(_) => return Ok(None),
        };
        let spare_path = self.dir.join(spare_name(segno));
        self.disk.rename(&spare_path, path).map_err(|source| LogError::Io { path: spare_path, source })?;
        Ok(Some(file))
    }

    /// Deletes the oldest segments that nothing needs any more, oldest first, stopping at the first that is
    /// still needed: one is needed while it is the active one, holds an event received at or after
    /// `before_ms` (retention), or holds an event some sink is not done with (every sink an event here was
    /// routed to counts, with or without a dispatcher: a sink that has none yet pins the log, as a pending
    /// delivery does). Only a prefix goes, so recovery never takes a pruned segment for a hole. An active
    /// segment with an event older than `before_ms` is rolled at the next commit. Returns the (segments,
    /// events) deleted.
    pub fn prune(&mut self, before_ms: i64) -> Result<(u64, u64), LogError> {
        if self.failed {
            return Err(LogError::Failed);
        }
        // Every seq below `floor` is done for every sink named in a mask; a sink past the 63rd is looked
        // up by name (its frames tell its name).
        let floor_of = |name: &str| self.sinks.get(name).map_or(0, SinkState::floor);
        let floor = self.sink_ids.iter().map(|s| floor_of(s)).min().unwrap_or(u64::MAX).min(self.durable_seq);
        let mut doomed = Vec::new();
        let last = self.segments.last_key_value().map(|(n, _)| *n);
        for (&segno, seg) in &self.segments {
            if Some(segno) == last {
                break;
            }
            let young = seg.events.iter().any(|e| e.received_at_ms >= before_ms);
            let needed = seg.events.last().is_some_and(|e| e.seq >= floor);
            let overflow =
                seg.events.iter().filter(|e| e.sinks & SINKS_OVERFLOW != 0).try_fold(false, |pinned, e| {
                    if pinned {
                        return Ok::<_, LogError>(true);
                    }
                    Ok(match self.read(e.seq)? {
                        Some(logged) => {
                            logged.sinks.iter().any(|s| !self.sinks.get(s).is_some_and(|st| st.is_done(e.seq)))
                        }
                        None => false,
                    })
                })?;
            if young || needed || overflow {
                break;
            }
            doomed.push(segno);
        }
        let mut events = 0;
        for segno in &doomed {
            let path = self.dir.join(segment::file_name(*segno));
            self.disk.remove(&path).map_err(|source| LogError::Io { path: path.clone(), source })?;
            if let Some(seg) = self.segments.remove(segno) {
                events += seg.events.len() as u64;
            }
        }
        if !doomed.is_empty() {
            self.disk.sync_dir(&self.dir).map_err(|source| LogError::Io { path: self.dir.clone(), source })?;
            let first = self.first_seq();
            self.answered = self.answered.split_off(&first);
        }
        // The active segment holds an event retention let go: roll at the next commit, so that it can go
        // once its newest event is past retention too. A segment that never fills (a quiet daemon) then
        // keeps an event at most twice the retention.
        if self.roll_at.is_none()
            && self.buf.is_empty()
            && self
                .segments
                .last_key_value()
                .is_some_and(|(_, s)| s.events.first().is_some_and(|e| e.received_at_ms < before_ms))
        {
            self.roll_at = Some(0);
        }
        Ok((doomed.len() as u64, events))
    }

    /// Reads a durable event back; `None` if the log does not hold it (pruned, lost in a hole, or not yet
    /// durable).
    pub fn read(&self, seq: u64) -> Result<Option<LoggedEvent>, LogError> {
        if seq >= self.durable_seq {
            return Ok(None);
        }
        // The last segment starting at or before it.
        let Some((&segno, seg)) = self.segments.iter().rev().find(|(_, s)| s.header.base_seq <= seq) else {
            return Ok(None);
        };
        let Ok(i) = seg.events.binary_search_by_key(&seq, |e| e.seq) else { return Ok(None) };
        let entry = seg.events[i];
        let path = || self.dir.join(segment::file_name(segno));
        let mut data = vec![0u8; entry.size as usize];
        let n = seg.file.read_at(&mut data, entry.offset).map_err(|source| LogError::Io { path: path(), source })?;
        data.truncate(n);
        let corrupt = |why: &str| LogError::Corrupt { path: path(), why: format!("event {seq}: {why}") };
        let (frame, _) = frame::decode(&data, seg.header.place()).map_err(|r| corrupt(&format!("{r:?}")))?;
        frame::get_event(&frame).map(Some).ok_or_else(|| corrupt("not an event payload"))
    }
}

#[cfg(test)]
mod tests;
