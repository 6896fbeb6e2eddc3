//! The dedup index, in memory: the dedup-key hashes of the events received within the dedup window, owned by
//! the spool writer (so dedup is still decided by the single writer, inside the insert's transaction).
//!
//! Why not an SQLite index: dedup hashes are random, so each new event dirtied a different leaf page of an
//! on-disk index, and every commit wrote (and every checkpoint rewrote) one 4 KiB page per event for 16 bytes
//! of news: about a third of the spool's disk writes. The hashes are still stored in each event's row; the map
//! is filled from there for whatever part of the window it does not hold yet (at the first insert after a
//! start, or when a reload lengthens the window), and a hash found here is confirmed against the row
//! (key and source), so a collision of the 8-byte hash never makes two events one.
//!
//! Memory: about 40 bytes per event received within the window (`storage.dedup_window`, default 73 h).

use std::collections::{HashMap, VecDeque};

use rusqlite::{Connection, params};

use crate::event::now_ms;

/// Recently received events by dedup hash.
pub(super) struct RecentKeys {
    /// hash -> (seq, received at), usually one entry.
    by_hash: HashMap<i64, Vec<(i64, i64)>>,
    /// (received at, hash, seq) in insert order, for expiry.
    order: VecDeque<(i64, i64, i64)>,
    /// Every committed event received at or after this time is in the map.
    complete_from: i64,
    /// Added by the current transaction, not committed yet.
    staged: Vec<(i64, i64, i64)>,
}

impl RecentKeys {
    /// An empty map, complete from now on: older events are loaded when a lookup first reaches back to them.
    pub(super) fn new() -> Self {
        RecentKeys { by_hash: HashMap::new(), order: VecDeque::new(), complete_from: now_ms(), staged: Vec::new() }
    }

    /// The events (seq) that may have `hash` among those received since `since_ms`, committed or staged.
    pub(super) fn candidates(&mut self, conn: &Connection, hash: i64, since_ms: i64) -> rusqlite::Result<Vec<i64>> {
        if since_ms < self.complete_from {
            self.load(conn, since_ms)?;
        }
        let mut found: Vec<i64> = self
            .by_hash
            .get(&hash)
            .into_iter()
            .flatten()
            .filter(|(_, at)| *at >= since_ms)
            .map(|(seq, _)| *seq)
            .collect();
        found.extend(self.staged.iter().filter(|(at, h, _)| *h == hash && *at >= since_ms).map(|(_, _, seq)| *seq));
        // The first one received is the original.
        found.sort_unstable();
        Ok(found)
    }

    /// Remembers an event inserted by the current transaction.
    pub(super) fn stage(&mut self, hash: i64, seq: i64, received_at_ms: i64) {
        self.staged.push((received_at_ms, hash, seq));
    }

    /// The current transaction committed: its events are known from now on. Entries received before
    /// `keep_since_ms` are forgotten (the dedup window has passed them).
    pub(super) fn commit(&mut self, keep_since_ms: i64) {
        for (at, hash, seq) in self.staged.drain(..) {
            self.by_hash.entry(hash).or_default().push((seq, at));
            self.order.push_back((at, hash, seq));
        }
        while let Some(&(at, hash, seq)) = self.order.front() {
            if at >= keep_since_ms {
                break;
            }
            self.order.pop_front();
            if let Some(v) = self.by_hash.get_mut(&hash) {
                v.retain(|(s, _)| *s != seq);
                if v.is_empty() {
                    self.by_hash.remove(&hash);
                }
            }
        }
        self.complete_from = self.complete_from.max(keep_since_ms);
    }

    /// The current transaction was rolled back.
    pub(super) fn discard(&mut self) {
        self.staged.clear();
    }

    /// Loads the events received in `[since_ms, complete_from)` from the spool.
    fn load(&mut self, conn: &Connection, since_ms: i64) -> rusqlite::Result<()> {
        let mut stmt = conn.prepare_cached(
            "SELECT seq, dedup_hash, received_at FROM events WHERE received_at >= ?1 AND received_at < ?2 ORDER BY seq DESC",
        )?;
        let rows = stmt.query_map(params![since_ms, self.complete_from], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })?;
        // Newest first, each put in front of what is known: `order` stays in receive order.
        for row in rows {
            let (seq, hash, at) = row?;
            self.by_hash.entry(hash).or_default().push((seq, at));
            self.order.push_front((at, hash, seq));
        }
        self.complete_from = since_ms;
        Ok(())
    }
}
