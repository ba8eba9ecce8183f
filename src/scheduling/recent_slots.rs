//! The prefix index as one worker sees it under load: slots it read a moment ago
//! are served again from its own copy instead of the shared store.
//!
//! In Envoy a slot read is a shared-data read and a buffer the host allocates in
//! the VM: about 12,000 of Envoy's instructions (`bench instructions`), a tenth
//! of what the filter adds to a request. The index is a hint, not a count, so a
//! worker busy with other requests may route on a copy up to `window_ms` old: an
//! entry another worker wrote meanwhile is seen that much later, as a new
//! snapshot is. A worker without other requests open (`busy: false`) reads the
//! store every time and keeps no copy.
//!
//! Writes are never based on more than a copy's compare-and-swap token: a write
//! after another worker's fails its CAS and is skipped, as a lost race always
//! was. An absent slot is not kept (a write to it carries no token and would
//! overwrite whatever another worker stored in the window).

use crate::inflight::{SharedStore, StoreError};
use std::cell::RefCell;

/// One slot as read from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Copy {
    key: String,
    value: Vec<u8>,
    cas: u32,
    read_ms: u64,
}

/// At most this many copies are kept per worker (the oldest read goes first):
/// the first groups of its recent prompts.
pub const MAX_COPIES: usize = 32;

/// A [`SharedStore`] for the prefix index over `store`, keeping copies in
/// `copies` (the worker's, across requests).
pub struct RecentSlots<'a> {
    pub store: &'a dyn SharedStore,
    pub copies: &'a RefCell<Vec<Copy>>,
    pub now_ms: u64,
    /// Other requests are open on this worker.
    pub busy: bool,
    /// How long a copy is served.
    pub window_ms: u64,
}

impl RecentSlots<'_> {
    /// Read within the window (a clock set back ends it, as for the snapshot).
    fn fresh(&self, c: &Copy) -> bool {
        !crate::observe::pending::elapsed(c.read_ms, self.now_ms, self.window_ms)
    }
}

impl SharedStore for RecentSlots<'_> {
    fn get(&self, key: &str) -> (Option<Vec<u8>>, Option<u32>) {
        if self.busy {
            let copies = self.copies.borrow();
            if let Some(c) = copies.iter().find(|c| c.key == key && self.fresh(c)) {
                return (Some(c.value.clone()), Some(c.cas));
            }
        }
        let (value, cas) = self.store.get(key);
        let mut copies = self.copies.borrow_mut();
        copies.retain(|c| c.key != key);
        if let (true, Some(v), Some(cas)) = (self.busy, &value, cas) {
            if copies.len() >= MAX_COPIES {
                copies.remove(0);
            }
            copies.push(Copy {
                key: key.to_string(),
                value: v.clone(),
                cas,
                read_ms: self.now_ms,
            });
        }
        (value, cas)
    }

    /// Written through; the copy is dropped (the store's new token is unknown).
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), StoreError> {
        self.copies.borrow_mut().retain(|c| c.key != key);
        self.store.set(key, value, cas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inflight::memory::MemoryStore;

    fn slots<'a>(
        store: &'a MemoryStore,
        copies: &'a RefCell<Vec<Copy>>,
        now_ms: u64,
        busy: bool,
    ) -> RecentSlots<'a> {
        RecentSlots {
            store,
            copies,
            now_ms,
            busy,
            window_ms: 10,
        }
    }

    #[test]
    fn a_busy_worker_reads_a_slot_once_per_window() {
        let (store, copies) = (MemoryStore::default(), RefCell::default());
        store.set("k", b"v1", None).unwrap();
        let reads = store.reads();
        assert_eq!(slots(&store, &copies, 0, true).get("k").0.unwrap(), b"v1");
        // Another worker writes: this one routes on its copy for the window.
        store.set("k", b"v2", None).unwrap();
        assert_eq!(slots(&store, &copies, 9, true).get("k").0.unwrap(), b"v1");
        assert_eq!(store.reads() - reads, 1);
        assert_eq!(slots(&store, &copies, 10, true).get("k").0.unwrap(), b"v2");
        assert_eq!(store.reads() - reads, 2);
    }

    #[test]
    fn an_idle_worker_always_reads_and_keeps_nothing() {
        let (store, copies) = (MemoryStore::default(), RefCell::default());
        store.set("k", b"v1", None).unwrap();
        slots(&store, &copies, 0, true).get("k");
        store.set("k", b"v2", None).unwrap();
        assert_eq!(slots(&store, &copies, 1, false).get("k").0.unwrap(), b"v2");
        assert!(copies.borrow().is_empty(), "the stale copy is gone too");
    }

    #[test]
    fn a_write_from_a_stale_copy_fails_and_drops_it() {
        let (store, copies) = (MemoryStore::default(), RefCell::default());
        store.set("k", b"v1", None).unwrap();
        let (_, cas) = slots(&store, &copies, 0, true).get("k");
        store.set("k", b"other worker", None).unwrap();
        let s = slots(&store, &copies, 1, true);
        assert_eq!(s.set("k", b"mine", cas), Err(StoreError::CasMismatch));
        assert_eq!(s.get("k").0.unwrap(), b"other worker", "read again");
    }

    #[test]
    fn an_absent_slot_is_not_kept() {
        let (store, copies) = (MemoryStore::default(), RefCell::default());
        assert_eq!(slots(&store, &copies, 0, true).get("k"), (None, None));
        store.set("k", b"other worker", None).unwrap();
        assert_eq!(
            slots(&store, &copies, 1, true).get("k").0.unwrap(),
            b"other worker"
        );
    }

    #[test]
    fn copies_stay_bounded_oldest_first() {
        let (store, copies) = (MemoryStore::default(), RefCell::default());
        for i in 0..=MAX_COPIES {
            store.set(&format!("k{i}"), b"v", None).unwrap();
            slots(&store, &copies, 0, true).get(&format!("k{i}"));
        }
        let kept: Vec<String> = copies.borrow().iter().map(|c| c.key.clone()).collect();
        assert_eq!(kept.len(), MAX_COPIES);
        assert_eq!(kept[0], "k1", "k0, read first, went first");
    }
}
