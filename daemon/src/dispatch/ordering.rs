//! Ordering keys: deliveries about the same entity run one at a time, in the order they were taken. A
//! delivery whose key is busy is parked with its slot; when the one in flight ends, the first parked one
//! starts.

use std::collections::{HashMap, VecDeque};

use tokio::sync::OwnedSemaphorePermit;

use crate::store::PendingDelivery;

/// A delivery with its slot.
pub(super) type Slotted = (PendingDelivery, OwnedSemaphorePermit);

/// Ordering keys with a delivery in flight, and the deliveries waiting behind each.
#[derive(Default)]
pub(super) struct Busy(HashMap<String, VecDeque<Slotted>>);

impl Busy {
    /// A delivery to start: returned if its key is free (or it has none), the key then busy; parked
    /// (`None`) behind the delivery in flight otherwise.
    pub(super) fn admit(&mut self, row: PendingDelivery, permit: OwnedSemaphorePermit) -> Option<Slotted> {
        if let Some(key) = row.event.ordering_key.as_deref() {
            match self.0.get_mut(key) {
                Some(waiting) => {
                    waiting.push_back((row, permit));
                    return None;
                }
                None => {
                    self.0.insert(key.to_owned(), VecDeque::new());
                }
            }
        }
        Some((row, permit))
    }

    /// The delivery in flight for `key` ended: the next one parked behind it, which now holds the key, or
    /// `None` and the key is free.
    pub(super) fn release(&mut self, key: &str) -> Option<Slotted> {
        let next = self.0.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.0.remove(key);
        }
        next
    }
}
