//! The dedup index, in memory: the dedup-key hashes of the events received within the dedup window, with
//! what is known of each one's answer, owned by the spool writer (so dedup is still decided by the single
//! writer, inside the insert's transaction).
//!
//! Why not an SQLite index: dedup hashes are random, so each new event dirtied a different leaf page of an
//! on-disk index, and every commit wrote (and every checkpoint rewrote) one 4 KiB page per event for 16 bytes
//! of news: about a third of the spool's disk writes. The hashes are still stored with each event; the map
//! is filled from the spool (whichever holds the events: the caller passes the loader) for whatever part of
//! the window it does not hold yet (at the first insert after a start, or when a reload lengthens the
//! window), and a hash found here is confirmed against the stored event (key and source), so a collision of
//! the 8-byte hash never makes two events one.
//!
//! Answers: a content key (see [`super::Dedup`]) dedups only against an earlier copy whose answer the
//! provider may not have seen. The ingress reports an answer that was cut, failed or late
//! ([`super::Store::answered`]): it is uncertain, and that is also written to `uncertain_answers`, so a
//! restart keeps it. An answer written whole and in time is not reported at all (the common case costs the
//! writer nothing), except a duplicate's, which makes its original certain for good: the provider has seen
//! an answer for those bytes. An event loaded from the spool is answered unless that table names it: after a
//! crash, a provider's retry of a request that was in flight at the crash is delivered again (at least once,
//! never lost). An answer not yet reported is taken as seen: a retry that arrives while the first copy is
//! still being stored (the provider timed out first) is delivered twice.
//!
//! Memory: about 48 bytes per event received within the window (`storage.dedup_window`, default 73 h).

use std::collections::{HashMap, VecDeque};

use super::Dedup;

/// What is known of the answer to an event's webhook.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Answer {
    /// Nothing reported: written whole and in time, or not written yet.
    Pending,
    /// A duplicate of it was answered whole and in time: the provider has an answer for its bytes.
    Certain,
    /// Cut, failed or late: the provider may retry (recorded in `uncertain_answers`).
    Uncertain,
}

/// A stored event as the index is filled with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Known {
    pub seq: i64,
    pub hash: i64,
    pub received_at_ms: i64,
    /// Its answer was recorded as uncertain (else it is taken as seen).
    pub uncertain: bool,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    seq: i64,
    received_at: i64,
    answer: Answer,
}

impl Entry {
    /// Whether a copy received now, under `rule`, is a duplicate of this entry.
    fn is_target(&self, rule: &Dedup) -> bool {
        match *rule {
            Dedup::Off => false,
            Dedup::DeliveryId { since_ms } => self.received_at >= since_ms,
            Dedup::Content { since_ms, retry_since_ms } => {
                self.received_at >= since_ms && (self.received_at >= retry_since_ms || self.answer == Answer::Uncertain)
            }
        }
    }
}

/// Recently received events by dedup hash.
pub(super) struct RecentKeys {
    /// hash -> entries, usually one.
    by_hash: HashMap<i64, Vec<Entry>>,
    /// (received at, hash, seq) in insert order, for expiry.
    order: VecDeque<(i64, i64, i64)>,
    /// Every committed event received at or after this time is in the map.
    complete_from: i64,
    /// Added by the current transaction, not committed yet: (hash, entry).
    staged: Vec<(i64, Entry)>,
}

impl RecentKeys {
    /// An empty map that knows nothing yet: the first lookup loads every stored event from its window's start
    /// on, however recent (one stored in the very millisecond this map was made, or with a receive time ahead
    /// of a clock stepped back since, must be found too); later lookups load only what they reach back to.
    pub(super) fn new() -> Self {
        RecentKeys { by_hash: HashMap::new(), order: VecDeque::new(), complete_from: i64::MAX, staged: Vec::new() }
    }

    /// The events (seq) with `hash` that a copy received now is a duplicate of under `rule`, committed or
    /// staged, the first received first. `load(since, until)` gives the stored events received in
    /// `[since, until)`, newest first, when the index must reach back further than it holds.
    pub(super) fn candidates<E>(
        &mut self,
        load: impl FnOnce(i64, i64) -> Result<Vec<Known>, E>,
        hash: i64,
        rule: &Dedup,
    ) -> Result<Vec<i64>, E> {
        let Some(since_ms) = rule.since_ms() else { return Ok(Vec::new()) };
        if since_ms < self.complete_from {
            let known = load(since_ms, self.complete_from)?;
            self.fill(known, since_ms);
        }
        let mut found: Vec<i64> =
            self.by_hash.get(&hash).into_iter().flatten().filter(|e| e.is_target(rule)).map(|e| e.seq).collect();
        found.extend(self.staged.iter().filter(|(h, e)| *h == hash && e.is_target(rule)).map(|(_, e)| e.seq));
        found.sort_unstable();
        Ok(found)
    }

    /// Remembers an event inserted by the current transaction (its answer not written yet).
    pub(super) fn stage(&mut self, hash: i64, seq: i64, received_at_ms: i64) {
        self.staged.push((hash, Entry { seq, received_at: received_at_ms, answer: Answer::Pending }));
    }

    /// Sets what is known of the answer to event `seq` (dedup hash `hash`); returns what it was, `None` for
    /// an event the map does not hold (outside the window, or never loaded: nothing to change). Certain
    /// stays certain: once the provider has seen an answer for these bytes, a later cut answer (its retry's
    /// answers and the original's may be reported in any order) must not make the next distinct copy a
    /// duplicate; at worst a retry is delivered twice.
    pub(super) fn set_answer(&mut self, hash: i64, seq: i64, answer: Answer) -> Option<Answer> {
        let entry = self.by_hash.get_mut(&hash)?.iter_mut().find(|e| e.seq == seq)?;
        let before = entry.answer;
        if before != Answer::Certain {
            entry.answer = answer;
        }
        Some(before)
    }

    /// The current transaction committed: its events are known from now on. Entries received before
    /// `keep_since_ms` are forgotten (the dedup window has passed them).
    pub(super) fn commit(&mut self, keep_since_ms: i64) {
        for (hash, e) in self.staged.drain(..) {
            self.by_hash.entry(hash).or_default().push(e);
            self.order.push_back((e.received_at, hash, e.seq));
        }
        while let Some(&(at, hash, seq)) = self.order.front() {
            if at >= keep_since_ms {
                break;
            }
            self.order.pop_front();
            if let Some(v) = self.by_hash.get_mut(&hash) {
                v.retain(|e| e.seq != seq);
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

    /// Adds the stored events received in `[since_ms, complete_from)` (`known`, newest first).
    fn fill(&mut self, known: Vec<Known>, since_ms: i64) {
        let first = self.complete_from == i64::MAX;
        // Newest first, each put in front of what is known: `order` stays in receive order.
        for k in known {
            // The first fill reaches to the present: it may meet events already held (committed by this
            // writer) or staged (a store's own transaction sees them), which keep their entry.
            if first
                && (self.by_hash.get(&k.hash).is_some_and(|v| v.iter().any(|e| e.seq == k.seq))
                    || self.staged.iter().any(|(_, e)| e.seq == k.seq))
            {
                continue;
            }
            let answer = if k.uncertain { Answer::Uncertain } else { Answer::Certain };
            self.by_hash.entry(k.hash).or_default().push(Entry { seq: k.seq, received_at: k.received_at_ms, answer });
            self.order.push_front((k.received_at_ms, k.hash, k.seq));
        }
        if first {
            // What was held is not older than what was loaded: put `order` back in receive order.
            self.order.make_contiguous().sort_unstable();
        }
        self.complete_from = since_ms;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::now_ms;

    fn entry(received_at: i64, answer: Answer) -> Entry {
        Entry { seq: 1, received_at, answer }
    }

    /// The index asks the spool only for the part of the window it does not hold, once, and takes what it
    /// is given as answered unless marked uncertain.
    #[test]
    fn the_index_is_filled_from_the_spool_once_per_stretch_of_the_window() {
        let mut keys = RecentKeys::new();
        let now = now_ms();
        let mut asked = Vec::new();
        let stored = [
            Known { seq: 3, hash: 7, received_at_ms: now - 1_000, uncertain: true },
            Known { seq: 2, hash: 7, received_at_ms: now - 2_000, uncertain: false },
            Known { seq: 1, hash: 9, received_at_ms: now - 9_000, uncertain: false },
        ];
        let mut load = |since: i64, until: i64| {
            asked.push((since, until));
            Ok::<_, ()>(
                stored.iter().copied().filter(|k| k.received_at_ms >= since && k.received_at_ms < until).collect(),
            )
        };
        let ids = Dedup::DeliveryId { since_ms: now - 5_000 };
        assert_eq!(keys.candidates(&mut load, 7, &ids), Ok(vec![2, 3]));
        assert_eq!(keys.candidates(&mut load, 7, &ids), Ok(vec![2, 3]), "not asked again");
        let content = Dedup::Content { since_ms: now - 5_000, retry_since_ms: now };
        assert_eq!(keys.candidates(&mut load, 7, &content), Ok(vec![3]), "only the uncertain answer");
        let longer = Dedup::DeliveryId { since_ms: now - 10_000 };
        assert_eq!(keys.candidates(&mut load, 9, &longer), Ok(vec![1]));
        assert_eq!(asked, [(now - 5_000, i64::MAX), (now - 10_000, now - 5_000)], "the first load reaches the present");
    }

    /// An event stored in the very millisecond the index was made, or with a receive time ahead of a clock
    /// stepped back since, is found; one this writer already holds is not taken twice.
    #[test]
    fn the_first_load_reaches_past_the_present_and_keeps_what_is_held() {
        let mut keys = RecentKeys::new();
        keys.stage(7, 5, now_ms());
        keys.commit(0);
        let ahead = Known { seq: 4, hash: 7, received_at_ms: now_ms() + 60_000, uncertain: false };
        let held = Known { seq: 5, hash: 7, received_at_ms: now_ms(), uncertain: false };
        let load = |_: i64, _: i64| Ok::<_, ()>(vec![ahead, held]);
        let ids = Dedup::DeliveryId { since_ms: now_ms() - 1_000 };
        assert_eq!(keys.candidates(load, 7, &ids), Ok(vec![4, 5]));
        assert_eq!(keys.set_answer(7, 5, Answer::Uncertain), Some(Answer::Pending), "the held entry kept its answer");
    }

    #[test]
    fn content_copies_are_retries_only_while_the_answer_is_uncertain() {
        let rule = Dedup::Content { since_ms: 100, retry_since_ms: 900 };
        // Answered in time: a copy is a new event, unless it comes within the retry window.
        assert!(!entry(600, Answer::Certain).is_target(&rule));
        assert!(entry(900, Answer::Certain).is_target(&rule));
        // Cut or late: a retry.
        assert!(entry(600, Answer::Uncertain).is_target(&rule));
        // Answered (nothing reported), or not yet: a new event.
        assert!(!entry(600, Answer::Pending).is_target(&rule));
        // Outside the dedup window: never.
        assert!(!entry(99, Answer::Uncertain).is_target(&rule));
        // Certain stays certain, whatever is reported after.
        let mut keys = RecentKeys::new();
        keys.stage(7, 1, 600);
        keys.commit(0);
        assert_eq!(keys.set_answer(7, 1, Answer::Certain), Some(Answer::Pending));
        assert_eq!(keys.set_answer(7, 1, Answer::Uncertain), Some(Answer::Certain));
        assert_eq!(keys.set_answer(7, 1, Answer::Uncertain), Some(Answer::Certain));
        assert_eq!(keys.set_answer(8, 1, Answer::Uncertain), None, "not in the index");
        // Delivery ids: any copy within the window.
        let ids = Dedup::DeliveryId { since_ms: 100 };
        assert!(entry(600, Answer::Certain).is_target(&ids));
        assert!(!entry(99, Answer::Certain).is_target(&ids));
        assert!(!entry(600, Answer::Uncertain).is_target(&Dedup::Off));
    }
}
