//! The log's frames: CRC-framed, 8-byte aligned, little-endian records. A frame is
//!
//! ```text
//!  0  u32  crc     CRC-32 (crc32fast) over bytes 4 .. 24+len, seeded with the spool's own value
//!  4  u32  len     payload bytes; a header of zeros (crc 0, len 0) is no frame: never written
//!  8  u64  seq     EVENT: its seq; other kinds: the seq the next EVENT gets (the log's next_seq then)
//! 16  u32  segno   low 32 bits of the segment number (rejects stale frames in recycled files)
//! 20  u8   kind    1 EVENT · 2 SINK_CHECKPOINT · 3 STATE · 4 HEARTBEAT · 5 SEAL · 6 ANSWER
//! 21  u8   flags   bit 0: the body is JSON the ingress validated
//! 22  u16  reserved, 0
//! 24  payload[len], zero padding to a multiple of 8
//! ```
//!
//! The seed (from the spool's random uuid) makes a frame that a webhook body carries inside it useless: a
//! sender cannot make its CRC match without knowing the seed, so a scan that resumes after a torn or
//! corrupt frame (`segment::scan`) never takes bytes of a body for a frame.
//!
//! Decoding checks every bound before it reads (a frame comes from a disk that may be torn or corrupt);
//! nothing here panics on any input, which `frame_bytes_never_panic` checks over random bytes.

use bytes::Bytes;

use crate::event::Event;

/// Bytes before the payload.
pub const HEADER: usize = 24;
/// The largest payload a frame may have: an EVENT payload is the body plus its metadata (bounded below). An
/// event past it is refused ([`TooBig`]), never cut.
pub const MAX_PAYLOAD: usize = 80 << 20;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One event with the sinks it was routed to.
    Event = 1,
    /// A sink's progress (`taken` and the seqs still outstanding).
    SinkCheckpoint = 2,
    /// The first frame of every segment: everything recovery needs from earlier segments.
    State = 3,
    /// Nothing but proof that the log is writable (readiness).
    Heartbeat = 4,
    /// The last frame of a segment that is full: nothing follows it.
    Seal = 5,
    /// What became known of the answers to some events' webhooks (see `store::dedup`): `count u32 ·
    /// (seq u64 · uncertain u8)*`.
    Answer = 6,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Event,
            2 => Kind::SinkCheckpoint,
            3 => Kind::State,
            4 => Kind::Heartbeat,
            5 => Kind::Seal,
            6 => Kind::Answer,
            _ => return None,
        })
    }
}

/// Flag bit: the EVENT's body is JSON the ingress validated (sinks need not check it again).
pub const FLAG_VALIDATED_JSON: u8 = 1;
/// Flag bit: the EVENT is a replay or a dead-letter retry an operator asked for (a copy of an earlier
/// event, for the sinks it names).
pub const FLAG_REPLAY: u8 = 2;

/// A frame read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame<'a> {
    /// Its kind.
    pub kind: Kind,
    /// Its flags.
    pub flags: u8,
    /// EVENT: the event's seq; otherwise the seq the next EVENT gets.
    pub seq: u64,
    /// The payload.
    pub payload: &'a [u8],
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reject {
    /// A header of zeros: nothing was ever written here (the end of a clean log).
    Empty,
    /// Fewer bytes than the header or the payload claims.
    Short,
    /// A length over [`MAX_PAYLOAD`].
    TooLong,
    /// Another segment's frame (a recycled file's stale bytes).
    WrongSegment,
    /// An unknown kind or reserved bits set.
    Malformed,
    /// The checksum does not match.
    Crc,
}

/// The size of a frame with `payload_len` bytes of payload, padding included.
pub fn size(payload_len: usize) -> usize {
    (HEADER + payload_len).next_multiple_of(8)
}

/// Appends a frame to `buf` (whose length must be a multiple of 8, as every frame keeps it). The payload is
/// written by `payload`; its length is checked against [`MAX_PAYLOAD`] by the caller ([`event_payload_len`]).
pub fn encode(buf: &mut Vec<u8>, kind: Kind, flags: u8, seq: u64, at: Place, payload: impl FnOnce(&mut Vec<u8>)) {
    debug_assert_eq!(buf.len() % 8, 0);
    let start = buf.len();
    buf.extend_from_slice(&[0u8; HEADER]);
    payload(buf);
    let len = buf.len() - start - HEADER;
    debug_assert!(len <= MAX_PAYLOAD);
    buf.resize(start + size(len), 0);
    let h = &mut buf[start..start + HEADER];
    h[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    h[8..16].copy_from_slice(&seq.to_le_bytes());
    h[16..20].copy_from_slice(&(at.segno as u32).to_le_bytes());
    h[20] = kind as u8;
    h[21] = flags;
    let crc = checksum(at.seed, &buf[start + 4..start + HEADER + len]);
    buf[start..start + 4].copy_from_slice(&crc.to_le_bytes());
}

/// Where a frame is written: the segment and the spool's CRC seed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The segment number.
    pub segno: u64,
    /// The spool's CRC seed.
    pub seed: u32,
}

fn checksum(seed: u32, bytes: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new_with_initial(seed);
    h.update(bytes);
    h.finalize()
}

/// Reads the frame at the start of `bytes`, written at `at`: the frame and its size with padding.
pub fn decode(bytes: &[u8], at: Place) -> Result<(Frame<'_>, usize), Reject> {
    let h = bytes.get(..HEADER).ok_or(Reject::Short)?;
    let crc = u32_at(h, 0);
    let len = u32_at(h, 4) as usize;
    if crc == 0 && len == 0 && h.iter().all(|b| *b == 0) {
        return Err(Reject::Empty);
    }
    if len > MAX_PAYLOAD {
        return Err(Reject::TooLong);
    }
    if u32_at(h, 16) != at.segno as u32 {
        return Err(Reject::WrongSegment);
    }
    let (Some(kind), 0) = (Kind::from_u8(h[20]), u16::from_le_bytes([h[22], h[23]])) else {
        return Err(Reject::Malformed);
    };
    if h[21] & !(FLAG_VALIDATED_JSON | FLAG_REPLAY) != 0 {
        return Err(Reject::Malformed);
    }
    let body = bytes.get(4..HEADER + len).ok_or(Reject::Short)?;
    if checksum(at.seed, body) != crc {
        return Err(Reject::Crc);
    }
    let seq = u64::from_le_bytes(h[8..16].try_into().map_err(|_| Reject::Short)?);
    let total = size(len).min(bytes.len());
    Ok((Frame { kind, flags: h[21], seq, payload: &bytes[HEADER..HEADER + len] }, total))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// An event as the log holds it: the event, the sinks it was routed to, its dedup hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggedEvent {
    /// The event.
    pub event: EventEq,
    /// The sinks it was routed to, by id (ids, not indices: a reload needs no mapping).
    pub sinks: Vec<String>,
    /// The hash the dedup index keeps (0: not a dedup candidate).
    pub dedup_hash: u64,
    /// A replay ([`FLAG_REPLAY`]).
    pub replay: bool,
}

/// [`Event`] with equality (for tests and for comparing a duplicate candidate).
#[derive(Debug, Clone)]
pub struct EventEq(pub Event);

impl PartialEq for EventEq {
    fn eq(&self, other: &Self) -> bool {
        let (a, b) = (&self.0, &other.0);
        a.id == b.id
            && a.source == b.source
            && a.event_type == b.event_type
            && a.received_at_ms == b.received_at_ms
            && a.headers == b.headers
            && a.body == b.body
            && a.dedup_key == b.dedup_key
            && a.ordering_key == b.ordering_key
            && a.body_is_json == b.body_is_json
    }
}
impl Eq for EventEq {}

/// Why an event cannot be logged: a field past the format's bounds. The ingress and the config keep every
/// field far inside them; this is the last check, never a truncation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("event cannot be logged: {0}")]
pub struct TooBig(pub &'static str);

/// The EVENT payload's size, or which field is past its bound. Strings and headers have u16 lengths, the
/// lists u16 counts, the body a u32 length; the whole is at most [`MAX_PAYLOAD`].
pub fn event_payload_len(event: &Event, sinks: &[String]) -> Result<usize, TooBig> {
    let short = |s: &str, what| if s.len() < usize::from(u16::MAX) { Ok(2 + s.len()) } else { Err(TooBig(what)) };
    let mut n = 8 + 8; // received_at_ms, dedup_hash
    n += short(&event.id, "id")?;
    if sinks.len() >= usize::from(u16::MAX) || event.headers.len() >= usize::from(u16::MAX) {
        return Err(TooBig("sinks or headers"));
    }
    n += 2;
    for s in sinks {
        n += short(s, "sink id")?;
    }
    n += short(&event.source, "source")?;
    n += short(&event.event_type, "event type")?;
    n += short(&event.dedup_key, "dedup key")?;
    n += event.ordering_key.as_deref().map_or(Ok(2), |k| short(k, "ordering key"))?;
    n += 2;
    for (k, v) in &event.headers {
        n += short(k, "header name")? + short(v, "header value")?;
    }
    n += 4 + event.body.len();
    if n > MAX_PAYLOAD { Err(TooBig("body")) } else { Ok(n) }
}

/// Writes an EVENT payload; [`event_payload_len`] must have accepted the event.
pub fn put_event(buf: &mut Vec<u8>, event: &Event, sinks: &[String], dedup_hash: u64) {
    buf.extend_from_slice(&event.received_at_ms.to_le_bytes());
    buf.extend_from_slice(&dedup_hash.to_le_bytes());
    put_str(buf, &event.id);
    buf.extend_from_slice(&(sinks.len() as u16).to_le_bytes());
    for s in sinks {
        put_str(buf, s);
    }
    put_str(buf, &event.source);
    put_str(buf, &event.event_type);
    put_str(buf, &event.dedup_key);
    match &event.ordering_key {
        Some(k) => put_str(buf, k),
        None => buf.extend_from_slice(&u16::MAX.to_le_bytes()),
    }
    buf.extend_from_slice(&(event.headers.len() as u16).to_le_bytes());
    for (k, v) in &event.headers {
        put_str(buf, k);
        put_str(buf, v);
    }
    buf.extend_from_slice(&(event.body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&event.body);
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u16).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// Reads an EVENT payload; `None` if it is not one (a frame whose CRC matched but whose payload does not
/// parse was written by another format, never by this one).
pub fn get_event(frame: &Frame<'_>) -> Option<LoggedEvent> {
    let mut r = Reader(frame.payload);
    let received_at_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let dedup_hash = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let id = r.str()?;
    let n = r.u16()?;
    let sinks = (0..n).map(|_| r.str()).collect::<Option<Vec<_>>>()?;
    let source = r.str()?;
    let event_type = r.str()?;
    let dedup_key = r.str()?;
    let ordering_key = match r.u16()? {
        u16::MAX => None,
        len => Some(r.utf8(usize::from(len))?),
    };
    let n = r.u16()?;
    let headers = (0..n).map(|_| Some((r.str()?, r.str()?))).collect::<Option<Vec<_>>>()?;
    let len = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
    let body = Bytes::copy_from_slice(r.take(len)?);
    if !r.0.is_empty() {
        return None;
    }
    let body_is_json = frame.flags & FLAG_VALIDATED_JSON != 0;
    let event = Event { id, source, event_type, received_at_ms, headers, body, dedup_key, ordering_key, body_is_json };
    Some(LoggedEvent { event: EventEq(event), sinks, dedup_hash, replay: frame.flags & FLAG_REPLAY != 0 })
}

/// What recovery and the spool thread's index need of an EVENT payload, read without copying the body:
/// receive time, dedup hash and the sinks it was routed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventHead<'a> {
    /// Receive time, ms since the epoch.
    pub received_at_ms: i64,
    /// The dedup hash.
    pub dedup_hash: u64,
    /// The sinks it was routed to.
    pub sinks: Vec<&'a str>,
    /// Body bytes.
    pub body_len: u32,
}

/// Reads the head of an EVENT payload (checking that the rest parses too); `None` if it is not one.
pub fn event_head(payload: &[u8]) -> Option<EventHead<'_>> {
    let mut r = Reader(payload);
    let received_at_ms = i64::from_le_bytes(r.take(8)?.try_into().ok()?);
    let dedup_hash = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
    r.str_ref()?;
    let n = r.u16()?;
    let sinks = (0..n).map(|_| r.str_ref()).collect::<Option<Vec<_>>>()?;
    for _ in 0..3 {
        r.str_ref()?;
    }
    match r.u16()? {
        u16::MAX => {}
        len => {
            std::str::from_utf8(r.take(usize::from(len))?).ok()?;
        }
    }
    for _ in 0..r.u16()? {
        r.str_ref()?;
        r.str_ref()?;
    }
    let body_len = u32::from_le_bytes(r.take(4)?.try_into().ok()?);
    r.take(body_len as usize)?;
    r.0.is_empty().then_some(EventHead { received_at_ms, dedup_hash, sinks, body_len })
}

/// Appends an ANSWER payload.
pub fn put_answers(buf: &mut Vec<u8>, answers: &[(u64, bool)]) {
    buf.extend_from_slice(&(answers.len() as u32).to_le_bytes());
    for (seq, uncertain) in answers {
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.push(u8::from(*uncertain));
    }
}

/// Reads an ANSWER payload: (seq, uncertain) in the order written; `None` if it is not one.
pub fn get_answers(payload: &[u8]) -> Option<Vec<(u64, bool)>> {
    let mut r = Reader(payload);
    let n = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
    if n > payload.len() / 9 {
        return None;
    }
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let seq = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let uncertain = match r.take(1)?[0] {
            0 => false,
            1 => true,
            _ => return None,
        };
        out.push((seq, uncertain));
    }
    r.0.is_empty().then_some(out)
}

/// A cursor over a payload; every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn utf8(&mut self, n: usize) -> Option<String> {
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
    fn str(&mut self) -> Option<String> {
        self.str_ref().map(str::to_owned)
    }
    fn str_ref(&mut self) -> Option<&'a str> {
        let n = self.u16()?;
        if n == u16::MAX {
            return None;
        }
        std::str::from_utf8(self.take(usize::from(n))?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(body: &[u8], ordering_key: Option<&str>) -> Event {
        Event {
            id: "0192f0c4-7d1e-7cc0-9b6a-3f5d2c1b0a99".into(),
            source: "clockify".into(),
            event_type: "NEW_TIME_ENTRY".into(),
            received_at_ms: 1_764_633_600_123,
            headers: vec![("content-type".into(), "application/json".into()), ("x-a".into(), "é".into())],
            body: Bytes::copy_from_slice(body),
            dedup_key: "clockify:ab12".into(),
            ordering_key: ordering_key.map(str::to_owned),
            body_is_json: false,
        }
    }

    fn at(segno: u64) -> Place {
        Place { segno, seed: 0x5eed }
    }

    fn event_frame(e: &Event, sinks: &[String], seq: u64, segno: u64) -> Vec<u8> {
        let mut buf = Vec::new();
        let flags = if e.body_is_json { FLAG_VALIDATED_JSON } else { 0 };
        encode(&mut buf, Kind::Event, flags, seq, at(segno), |b| put_event(b, e, sinks, 77));
        buf
    }

    #[test]
    fn an_event_frame_round_trips_and_is_aligned() {
        let sinks = vec!["kafka".to_owned(), "file".to_owned()];
        for (body, key) in [(&b"{\"id\":1}"[..], Some("clockify:te-1")), (&b""[..], None)] {
            let mut e = event(body, key);
            e.body_is_json = !body.is_empty();
            let buf = event_frame(&e, &sinks, 42, 7);
            assert_eq!(buf.len() % 8, 0);
            assert_eq!(buf.len(), size(event_payload_len(&e, &sinks).unwrap()));
            let (frame, n) = decode(&buf, at(7)).unwrap();
            assert_eq!(n, buf.len());
            let flags = if e.body_is_json { FLAG_VALIDATED_JSON } else { 0 };
            assert_eq!((frame.kind, frame.flags, frame.seq), (Kind::Event, flags, 42));
            let got = get_event(&frame).unwrap();
            assert_eq!(got, LoggedEvent { event: EventEq(e), sinks: sinks.clone(), dedup_hash: 77, replay: false });
        }
    }

    #[test]
    fn zeros_stale_segments_and_every_flipped_bit_are_rejected() {
        let e = event(b"{\"a\":[1,2,3]}", Some("k"));
        let buf = event_frame(&e, &["s".to_owned()], 9, 3);
        assert_eq!(decode(&[0u8; 64], at(3)), Err(Reject::Empty));
        assert_eq!(decode(&buf, at(4)), Err(Reject::WrongSegment));
        assert_eq!(decode(&buf[..buf.len() - 8], at(3)).unwrap_err(), Reject::Short);
        let len = HEADER + event_payload_len(&e, &["s".to_owned()]).unwrap();
        for bit in 0..len * 8 {
            let mut bad = buf.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&bad, at(3)).is_err(), "bit {bit} flipped was accepted");
        }
        assert_eq!(decode(&buf, Place { segno: 3, seed: 0x5eee }), Err(Reject::Crc), "another spool's seed");
    }

    #[test]
    fn fields_past_the_formats_bounds_are_refused_not_truncated() {
        let mut e = event(b"{}", None);
        e.dedup_key = "k".repeat(usize::from(u16::MAX));
        assert_eq!(event_payload_len(&e, &[]), Err(TooBig("dedup key")));
        let e = event(b"{}", Some(&"o".repeat(usize::from(u16::MAX))));
        assert_eq!(event_payload_len(&e, &[]), Err(TooBig("ordering key")));
    }

    proptest! {
        #[test]
        fn frame_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), segno in 0u64..4) {
            if let Ok((frame, n)) = decode(&bytes, at(segno)) {
                prop_assert!(n <= bytes.len());
                let _ = get_event(&frame);
            }
            let _ = get_event(&Frame { kind: Kind::Event, flags: 0, seq: 0, payload: &bytes });
            let _ = event_head(&bytes);
            if let Some(answers) = get_answers(&bytes) {
                let mut again = Vec::new();
                put_answers(&mut again, &answers);
                prop_assert_eq!(again, bytes);
            }
        }

        #[test]
        fn answers_round_trip(answers in proptest::collection::vec((any::<u64>(), any::<bool>()), 0..20)) {
            let mut buf = Vec::new();
            put_answers(&mut buf, &answers);
            prop_assert_eq!(get_answers(&buf), Some(answers));
        }

        #[test]
        fn any_event_round_trips(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            key in proptest::option::of("[a-z:0-9]{0,20}"),
            headers in proptest::collection::vec(("[a-z-]{1,10}", "\\PC{0,10}"), 0..4),
            sinks in proptest::collection::vec("[a-z]{1,8}", 0..4),
            seq in any::<u64>(),
        ) {
            let mut e = event(&body, key.as_deref());
            e.headers = headers;
            let buf = event_frame(&e, &sinks, seq, 1);
            let (frame, _) = decode(&buf, at(1)).unwrap();
            prop_assert_eq!(frame.seq, seq);
            let head = event_head(frame.payload).unwrap();
            let names: Vec<&str> = sinks.iter().map(String::as_str).collect();
            prop_assert_eq!(head, EventHead { received_at_ms: e.received_at_ms, dedup_hash: 77, sinks: names, body_len: body.len() as u32 });
            prop_assert_eq!(get_event(&frame).unwrap(), LoggedEvent { event: EventEq(e), sinks, dedup_hash: 77, replay: false });
        }
    }
}
