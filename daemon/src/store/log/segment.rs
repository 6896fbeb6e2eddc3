//! Segments: the log's files, `<segno as 16 hex digits>.seg`. The first [`HEADER_SIZE`] bytes are the
//! header (magic, format, segment number, first seq, the spool's uuid, creation time, CRC); frames follow,
//! back to back. A segment is written only at its tail, by one writer, and a byte is answered for only after
//! the `fdatasync` that followed its write.
//!
//! [`scan`] is recovery's reading of a segment: it accepts frames while each is whole, of this segment,
//! checksummed and (for EVENT frames) has the next seq. The first frame that fails is the end of the log,
//! unless a valid frame of this segment with a higher seq lies after it: then the bytes between are a hole
//! (corruption of synced data: counted and reported, never silently cut off) and the scan goes on after
//! it. Why a torn tail never holds an acknowledged event: every byte before an acknowledged frame was
//! written before the sync that acknowledged it, so a frame that fails lies after the last completed sync.

use super::frame::{self, Frame, Kind, Place, Reject};

/// Bytes of the segment header (one page: frames start aligned).
pub const HEADER_SIZE: usize = 4096;
/// The header's magic.
pub const MAGIC: &[u8; 8] = b"HBSPOOL1";
/// The frame format this code writes and reads.
pub const FORMAT: u16 = 1;

/// A segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Segment number (also the file name).
    pub segno: u64,
    /// The seq of its first EVENT frame (the log's next seq when it was started).
    pub base_seq: u64,
    /// The spool this segment belongs to (a segment copied from another spool is refused).
    pub spool_uuid: [u8; 16],
    /// When it was started, in milliseconds since the Unix epoch.
    pub created_ms: i64,
}

/// Why a header is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not a segment, or its header is torn or corrupt.
    #[error("not a hookbridge spool segment (bad magic or checksum)")]
    Invalid,
    /// Written by a newer hookbridge.
    #[error("segment format {0} is newer than this hookbridge understands ({FORMAT})")]
    Newer(u16),
}

impl Header {
    /// Where this segment's frames are: its number and the spool's CRC seed (from its uuid).
    pub fn place(&self) -> Place {
        Place { segno: self.segno, seed: crc32fast::hash(&self.spool_uuid) }
    }

    /// The header page.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HEADER_SIZE);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&FORMAT.to_le_bytes());
        b.extend_from_slice(&self.segno.to_le_bytes());
        b.extend_from_slice(&self.base_seq.to_le_bytes());
        b.extend_from_slice(&self.spool_uuid);
        b.extend_from_slice(&self.created_ms.to_le_bytes());
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b.resize(HEADER_SIZE, 0);
        b
    }

    /// Reads a header page.
    pub fn decode(b: &[u8]) -> Result<Header, HeaderError> {
        const LEN: usize = 8 + 2 + 8 + 8 + 16 + 8;
        let (Some(fields), Some(crc)) = (b.get(..LEN), b.get(LEN..LEN + 4)) else {
            return Err(HeaderError::Invalid);
        };
        if &fields[..8] != MAGIC || crc32fast::hash(fields).to_le_bytes() != crc {
            return Err(HeaderError::Invalid);
        }
        let u64_at = |at: usize| u64::from_le_bytes(fields[at..at + 8].try_into().unwrap_or([0; 8]));
        let format = u16::from_le_bytes([fields[8], fields[9]]);
        if format > FORMAT {
            return Err(HeaderError::Newer(format));
        }
        let mut spool_uuid = [0u8; 16];
        spool_uuid.copy_from_slice(&fields[26..42]);
        Ok(Header { segno: u64_at(10), base_seq: u64_at(18), spool_uuid, created_ms: u64_at(42) as i64 })
    }
}

/// The file name of segment `segno`.
pub fn file_name(segno: u64) -> String {
    format!("{segno:016x}.seg")
}

/// The segment number a file name stands for, if it is a segment's.
pub fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// A frame found by [`scan`]: where it is, and what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    /// Byte offset in the segment.
    pub offset: usize,
    /// Size with padding.
    pub size: usize,
    /// Its kind.
    pub kind: Kind,
    /// Its seq.
    pub seq: u64,
}

/// Unreadable bytes between valid frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    /// Where the first frame that failed starts.
    pub from: usize,
    /// Where the next valid frame starts.
    pub to: usize,
    /// The EVENT seqs that cannot be read (frames other than EVENT may be lost too: a hole of 0 events).
    pub lost_events: u64,
}

/// What [`scan`] found in a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    /// Every valid frame, in file order.
    pub frames: Vec<Found>,
    /// Holes of corrupt bytes with valid frames after them.
    pub holes: Vec<Hole>,
    /// Where the valid data ends: nothing at or after it was acknowledged.
    pub end: usize,
    /// Why the scan ended at `end` (`Empty`: cleanly, at zeros or the end of the file).
    pub end_reason: Reject,
    /// The seq the next EVENT frame would have.
    pub next_seq: u64,
    /// A SEAL frame ends the segment.
    pub sealed: bool,
}

/// Scans a whole segment (`data` from byte 0, header included; the header already checked).
pub fn scan(data: &[u8], header: &Header) -> Scan {
    let mut at = HEADER_SIZE;
    let mut next_seq = header.base_seq;
    let mut frames = Vec::new();
    let mut holes = Vec::new();
    let mut sealed = false;
    let end_reason = loop {
        if at >= data.len() {
            break Reject::Empty;
        }
        match accept(&data[at..], header.place(), next_seq) {
            Ok((frame, size)) => {
                frames.push(Found { offset: at, size, kind: frame.kind, seq: frame.seq });
                if frame.kind == Kind::Event {
                    next_seq = frame.seq + 1;
                }
                at += size;
                if frame.kind == Kind::Seal {
                    sealed = true;
                    break Reject::Empty;
                }
            }
            Err(reject) => match resume(data, at, header.place(), next_seq) {
                Some((to, frame)) => {
                    // Every frame carries the seq the log had reached: those between are gone.
                    let lost = frame.seq - next_seq;
                    holes.push(Hole { from: at, to, lost_events: lost });
                    next_seq = frame.seq;
                    at = to;
                }
                None => break reject,
            },
        }
    };
    Scan { frames, holes, end: at.min(data.len()), end_reason, next_seq, sealed }
}

/// The frame at the start of `bytes` if it is valid here: whole, of this segment, checksummed, and in
/// order: its seq is the log's `next_seq` (an EVENT's own seq, any other frame's the next EVENT's).
fn accept(bytes: &[u8], place: Place, next_seq: u64) -> Result<(Frame<'_>, usize), Reject> {
    let (frame, size) = frame::decode(bytes, place)?;
    if frame.seq == next_seq { Ok((frame, size)) } else { Err(Reject::Malformed) }
}

/// After a frame that failed at `from`: the next valid frame of this segment that is not behind in the seq
/// order, 8 bytes at a time. `None`: nothing valid follows, so the failure is a torn tail. (A write torn by
/// a crash can also leave a later page of it on disk and an earlier one not; that reads as a hole too, and
/// is reported as one: the scan cannot tell which bytes were synced, so it keeps and counts, never drops.)
fn resume(data: &[u8], from: usize, place: Place, next_seq: u64) -> Option<(usize, Frame<'_>)> {
    let mut at = from + 8;
    while at + frame::HEADER <= data.len() {
        if let Ok((frame, _)) = frame::decode(&data[at..], place)
            && frame.seq >= next_seq
        {
            return Some((at, frame));
        }
        at += 8;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::log::frame::encode;

    const H: Header = Header { segno: 5, base_seq: 100, spool_uuid: [7; 16], created_ms: 1_764_633_600_000 };

    /// A segment with `n` EVENT frames (seq 100..), a HEARTBEAT after every third; zeros after.
    fn segment(n: u64, tail_zeros: usize) -> (Vec<u8>, Vec<usize>) {
        let mut data = H.encode();
        let mut starts = Vec::new();
        for i in 0..n {
            starts.push(data.len());
            let payload = vec![i as u8; 10 + (i as usize * 37) % 300];
            encode(&mut data, Kind::Event, 0, 100 + i, H.place(), |b| b.extend_from_slice(&payload));
            if i % 3 == 2 {
                encode(&mut data, Kind::Heartbeat, 0, 100 + i + 1, H.place(), |_| {});
            }
        }
        data.resize(data.len() + tail_zeros, 0);
        (data, starts)
    }

    fn events(scan: &Scan) -> Vec<u64> {
        scan.frames.iter().filter(|f| f.kind == Kind::Event).map(|f| f.seq).collect()
    }

    #[test]
    fn headers_round_trip_and_newer_formats_are_refused() {
        let page = H.encode();
        assert_eq!(page.len(), HEADER_SIZE);
        assert_eq!(Header::decode(&page), Ok(H));
        let mut newer = page.clone();
        newer[8] = 2;
        let crc = crc32fast::hash(&newer[..50]);
        newer[50..54].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(Header::decode(&newer), Err(HeaderError::Newer(2)));
        let mut bad = page;
        bad[20] ^= 1;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Invalid));
        assert_eq!(Header::decode(&[0; 10]), Err(HeaderError::Invalid));
        assert_eq!(parse_name(&file_name(0xabc)), Some(0xabc));
        assert_eq!(parse_name("00000000000000ab.idx"), None);
    }

    #[test]
    fn a_clean_segment_scans_to_its_end() {
        let (data, _) = segment(20, 4096);
        let scan = scan(&data, &H);
        assert_eq!(events(&scan), (100..120).collect::<Vec<_>>());
        assert_eq!((scan.next_seq, scan.end_reason, scan.holes.len()), (120, Reject::Empty, 0));
        assert_eq!(scan.end, data.len() - 4096);
    }

    /// A write torn at any byte of the last frames (event 105, then a heartbeat): the scan ends before the
    /// torn frame, keeps everything before it, and reports no hole.
    #[test]
    fn a_tail_torn_at_every_byte_ends_the_log_before_it() {
        let (full, starts) = segment(6, 0);
        let last = starts[5];
        // Event 5's payload: 10 + (5 * 37) % 300 bytes.
        let last_len = 10 + 5 * 37;
        let last_end = last + frame::HEADER + last_len;
        for cut in last..full.len() {
            // Torn: the rest never reached the disk (zeros), or stale bytes of an older file are there.
            for stale in [0u8, 0xA5] {
                let mut data = full[..cut].to_vec();
                data.resize(full.len() + 64, stale);
                let scan = scan(&data, &H);
                let want: Vec<u64> = if cut >= last_end { (100..106).collect() } else { (100..105).collect() };
                assert_eq!(events(&scan), want, "cut at {cut}, stale {stale:#x}");
                assert!(scan.holes.is_empty(), "cut at {cut}: {:?}", scan.holes);
                let ends = [last, last + frame::size(last_len), full.len()];
                assert!(ends.contains(&scan.end), "cut at {cut}: end {}", scan.end);
            }
        }
    }

    /// A bit flipped in a synced frame with valid frames after it: the frames after the hole are kept,
    /// and the lost events are counted exactly.
    #[test]
    fn corruption_in_the_middle_is_a_counted_hole_not_the_end() {
        let (data, starts) = segment(12, 1024);
        for victim in [0usize, 4, 5, 11] {
            let mut bad = data.clone();
            bad[starts[victim] + frame::HEADER + 3] ^= 0x10;
            let scan = scan(&bad, &H);
            let want: Vec<u64> = (100..112).filter(|s| *s != 100 + victim as u64).collect();
            assert_eq!(events(&scan), want, "victim {victim}");
            assert_eq!(scan.holes.len(), 1, "victim {victim}");
            assert_eq!(scan.holes[0].from, starts[victim]);
            assert_eq!(scan.holes[0].lost_events, 1, "victim {victim}");
            assert_eq!(scan.next_seq, 112);
        }
    }

    /// A recycled file: frames of another segment number after the new tail are never read.
    #[test]
    fn stale_frames_of_a_recycled_file_are_never_read() {
        let (old, _) = segment(30, 0);
        let mut old_hdr = H;
        old_hdr.segno = 2;
        // The old file's frames re-encoded as segment 2's (what a recycled file holds), then a new header and
        // three frames of segment 5 over its start.
        let mut data = old_hdr.encode();
        for i in 0..30u64 {
            encode(&mut data, Kind::Event, 0, 100 + i, old_hdr.place(), |b| b.extend_from_slice(&[1; 40]));
        }
        assert!(data.len() >= old.len() / 2);
        let (new, _) = segment(3, 0);
        data[..new.len()].copy_from_slice(&new);
        let scan = scan(&data, &H);
        assert_eq!(events(&scan), vec![100, 101, 102]);
        assert!(scan.holes.is_empty());
        assert_eq!(scan.end, new.len());
    }

    /// A body that carries a frame (right segment, right seq) inside a torn event is not taken for a frame:
    /// the sender cannot know the spool's CRC seed. With the seed, it would have been.
    #[test]
    fn a_frame_inside_a_torn_body_is_not_taken_for_one() {
        for seed in [0, H.place().seed] {
            let (mut data, _) = segment(2, 0);
            let mut forged = Vec::new();
            encode(&mut forged, Kind::Event, 0, 103, Place { segno: H.segno, seed }, |b| b.extend_from_slice(b"x"));
            let start = data.len();
            encode(&mut data, Kind::Event, 0, 102, H.place(), |b| {
                b.extend_from_slice(&[0; 16]);
                b.extend_from_slice(&forged);
                b.extend_from_slice(&[1; 16]);
            });
            // Torn: the event's last bytes did not reach the disk.
            let torn = data.len() - 12;
            data[torn] = 0;
            data.resize(data.len() + 64, 0);
            let scan = scan(&data, &H);
            if seed == H.place().seed {
                assert_eq!(scan.holes.len(), 1, "the control: a frame with the seed is found");
                continue;
            }
            assert_eq!(events(&scan), vec![100, 101]);
            assert!(scan.holes.is_empty(), "{:?}", scan.holes);
            assert_eq!(scan.end, start);
        }
    }

    #[test]
    fn a_seal_ends_the_segment() {
        let (mut data, _) = segment(3, 0);
        encode(&mut data, Kind::Seal, 0, 103, H.place(), |_| {});
        let sealed_at = data.len();
        encode(&mut data, Kind::Event, 0, 103, H.place(), |_| {});
        let scan = scan(&data, &H);
        assert!(scan.sealed);
        assert_eq!((scan.end, scan.next_seq), (sealed_at, 103));
    }
}
