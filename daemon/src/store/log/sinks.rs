//! Each sink's progress through the log: `taken`, the seq its dispatcher will take next (it takes in
//! order; events not routed to it are passed over), and `outstanding`, the seqs taken but not finished (in
//! flight, or parked behind a busy ordering key). Everything below `taken` that is not outstanding is done:
//! delivered, or moved to the cold path (a retry or a dead letter, in SQLite). The log keeps this in
//! SINK_CHECKPOINT frames (one per changed sink per commit) and in the STATE frame that opens every
//! segment, so recovery reads it from the newest segment alone.
//!
//! Payloads: a checkpoint is `name (u16 length, bytes) · taken u64 · count u32 · outstanding`, the
//! outstanding seqs ascending as LEB128 varints (the first itself, each next as its distance from the one
//! before; at most twice `max_in_flight` of them); STATE is `count u16 · (u32 length, checkpoint)*`.

use std::collections::{BTreeMap, BTreeSet};

/// One sink's progress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SinkState {
    /// The seq its dispatcher takes next.
    pub taken: u64,
    /// Taken, not finished.
    pub outstanding: BTreeSet<u64>,
}

impl SinkState {
    /// Every seq below this is done for this sink.
    pub fn floor(&self) -> u64 {
        self.outstanding.first().copied().unwrap_or(self.taken).min(self.taken)
    }

    /// Whether `seq` is done for this sink (delivered, moved to the cold path, or not routed to it).
    pub fn is_done(&self, seq: u64) -> bool {
        seq < self.taken && !self.outstanding.contains(&seq)
    }
}

/// Appends a SINK_CHECKPOINT payload.
pub fn put_checkpoint(buf: &mut Vec<u8>, name: &str, state: &SinkState) {
    let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
    buf.extend_from_slice(&(name.len() as u16).to_le_bytes());
    buf.extend_from_slice(name);
    buf.extend_from_slice(&state.taken.to_le_bytes());
    buf.extend_from_slice(&(state.outstanding.len() as u32).to_le_bytes());
    let mut prev = 0u64;
    for (i, seq) in state.outstanding.iter().enumerate() {
        put_varint(buf, if i == 0 { *seq } else { seq - prev });
        prev = *seq;
    }
}

/// Reads a SINK_CHECKPOINT payload; `None` if it is not one.
pub fn get_checkpoint(payload: &[u8]) -> Option<(String, SinkState)> {
    let (name, state, rest) = checkpoint(payload)?;
    rest.is_empty().then_some((name, state))
}

fn checkpoint(p: &[u8]) -> Option<(String, SinkState, &[u8])> {
    let len = usize::from(u16::from_le_bytes(p.get(..2)?.try_into().ok()?));
    let name = std::str::from_utf8(p.get(2..2 + len)?).ok()?.to_owned();
    let mut p = &p[2 + len..];
    let taken = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let n = u32::from_le_bytes(p.get(8..12)?.try_into().ok()?);
    p = &p[12..];
    let mut outstanding = BTreeSet::new();
    let mut prev = 0u64;
    for i in 0..n {
        let (v, rest) = get_varint(p)?;
        p = rest;
        let seq = if i == 0 { v } else { prev.checked_add(v).filter(|_| v > 0)? };
        if seq >= taken {
            return None;
        }
        outstanding.insert(seq);
        prev = seq;
    }
    Some((name, SinkState { taken, outstanding }, p))
}

/// Appends a STATE payload: every sink's progress.
pub fn put_state(buf: &mut Vec<u8>, sinks: &BTreeMap<String, SinkState>) {
    let sinks: Vec<_> = sinks.iter().take(usize::from(u16::MAX)).collect();
    buf.extend_from_slice(&(sinks.len() as u16).to_le_bytes());
    for (name, state) in sinks {
        let mut one = Vec::new();
        put_checkpoint(&mut one, name, state);
        buf.extend_from_slice(&(one.len() as u32).to_le_bytes());
        buf.extend_from_slice(&one);
    }
}

/// Reads a STATE payload; `None` if it is not one.
pub fn get_state(payload: &[u8]) -> Option<BTreeMap<String, SinkState>> {
    let n = u16::from_le_bytes(payload.get(..2)?.try_into().ok()?);
    let mut p = &payload[2..];
    let mut sinks = BTreeMap::new();
    for _ in 0..n {
        let len = u32::from_le_bytes(p.get(..4)?.try_into().ok()?) as usize;
        let (name, state) = get_checkpoint(p.get(4..4 + len)?)?;
        sinks.insert(name, state);
        p = &p[4 + len..];
    }
    p.is_empty().then_some(sinks)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn get_varint(p: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, b) in p.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((v, &p[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn done_means_below_taken_and_not_outstanding() {
        let s = SinkState { taken: 10, outstanding: [3, 7].into() };
        assert!(s.is_done(2) && s.is_done(9) && !s.is_done(3) && !s.is_done(7) && !s.is_done(10));
        assert_eq!(s.floor(), 3);
        assert_eq!(SinkState { taken: 4, outstanding: BTreeSet::new() }.floor(), 4);
    }

    proptest! {
        #[test]
        fn checkpoints_and_states_round_trip(
            sinks in proptest::collection::btree_map("[a-z]{1,6}", (0u64..1 << 40, proptest::collection::btree_set(0u64..1 << 40, 0..20)), 0..5),
        ) {
            let sinks: BTreeMap<String, SinkState> = sinks
                .into_iter()
                .map(|(name, (taken, outstanding))| {
                    let taken = taken.max(outstanding.last().map_or(0, |l| l + 1));
                    (name, SinkState { taken, outstanding })
                })
                .collect();
            let mut buf = Vec::new();
            put_state(&mut buf, &sinks);
            prop_assert_eq!(get_state(&buf), Some(sinks.clone()));
            for (name, state) in &sinks {
                let mut one = Vec::new();
                put_checkpoint(&mut one, name, state);
                prop_assert_eq!(get_checkpoint(&one), Some((name.clone(), state.clone())));
            }
        }

        #[test]
        fn any_bytes_are_read_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = get_state(&bytes);
            if let Some((_, s)) = get_checkpoint(&bytes) {
                prop_assert!(s.outstanding.iter().all(|o| *o < s.taken));
            }
        }
    }
}
