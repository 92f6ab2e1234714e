//! Keys whose record failed its checksum on this node and that no replica
//! has given back yet: the node answers for them "damaged", never "not
//! found" (the storage engine has quarantined them, so they read as
//! missing there).

use std::collections::HashSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

/// Keys quarantined for a failed checksum and not repaired yet (a bounded
/// set; an atomic flag keeps the miss path free of the lock while empty).
#[derive(Debug, Default)]
pub(crate) struct Damaged {
    any: AtomicBool,
    keys: Mutex<HashSet<(String, Bytes)>>,
}

/// Damaged keys remembered at most.
const DAMAGED_KEPT: usize = 100_000;

impl Damaged {
    pub(crate) fn insert(&self, collection: &str, key: &[u8]) {
        let mut keys = self.keys.lock().unwrap();
        if keys.len() < DAMAGED_KEPT {
            keys.insert((collection.to_string(), Bytes::copy_from_slice(key)));
        }
        self.any.store(true, Ordering::Release);
    }

    /// How many keys answer "damaged" now.
    pub(crate) fn len(&self) -> usize {
        if self.any.load(Ordering::Acquire) {
            self.keys.lock().unwrap().len()
        } else {
            0
        }
    }

    pub(crate) fn contains(&self, collection: &str, key: &[u8]) -> bool {
        self.any.load(Ordering::Acquire)
            && self
                .keys
                .lock()
                .unwrap()
                .contains(&(collection.to_string(), Bytes::copy_from_slice(key)))
    }

    pub(crate) fn remove_collection(&self, collection: &str) {
        if self.any.load(Ordering::Acquire) {
            let mut keys = self.keys.lock().unwrap();
            keys.retain(|(c, _)| c != collection);
            self.any.store(!keys.is_empty(), Ordering::Release);
        }
    }

    pub(crate) fn remove(&self, collection: &str, key: &[u8]) {
        if self.any.load(Ordering::Acquire) {
            let mut keys = self.keys.lock().unwrap();
            keys.remove(&(collection.to_string(), Bytes::copy_from_slice(key)));
            self.any.store(!keys.is_empty(), Ordering::Release);
        }
    }

    /// Whether `key` is damaged, with what the store quarantined since
    /// the last look (reads, listings, anti-entropy and compaction meet
    /// damaged records too) counted first.
    pub(crate) fn holds(&self, store: &dhrt_storage::Store, collection: &str, key: &[u8]) -> bool {
        for k in store.take_quarantined(collection) {
            self.insert(collection, &k);
        }
        self.contains(collection, key)
    }
}
