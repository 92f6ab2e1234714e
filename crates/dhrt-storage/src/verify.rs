//! Checksums verified on read, and the quarantine of records that fail.
//!
//! Every read of a record's value checks the record's CRC32C, so bytes that
//! changed on disk (bit rot, a stray write) are never served. A damaged
//! record is *quarantined*: its key's entry leaves the index (the key reads
//! as missing here, so the cluster asks a replica) and the anti-entropy
//! digest (its bucket then differs from the replicas', which pulls the good
//! copy back through the normal replicated apply), and the collection is
//! marked so the background thread compacts it soon: the damaged bytes
//! leave the file before a restart could meet them below the durable
//! watermark and refuse to open.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;

use crate::collection::Collection;
use crate::index::Slot;
use crate::log::LogFile;
use crate::record::{self, Decoded, RECORD_HEADER_LEN};

/// The value of the live record `slot` points at, if its CRC checks out
/// and it is the record the index wrote there: its CRC and value length are
/// the ones the slot kept (a valid record of another key, copied over this
/// one by a misdirected write, is damage too). `tail` is the log's tail,
/// loaded before `map`: the record lies below it, and a damaged length is
/// never followed past it.
#[inline]
pub(crate) fn read_value(map: &Bytes, tail: u64, slot: &Slot) -> Option<Bytes> {
    let offset = slot.offset() as usize;
    match record::decode(&map[offset..tail as usize]) {
        Decoded::Record { header, .. }
            if record::stored_crc(&map[offset..]) == slot.crc()
                && header.value_len == slot.value_len() =>
        {
            let start = offset + RECORD_HEADER_LEN + header.key_len as usize;
            Some(map.slice(start..start + header.value_len as usize))
        }
        _ => None,
    }
}

/// Logs that pages of the maps could not be read and were read as zeros
/// (`mmap.rs`), the likely cause of the damage just met: at the first such
/// page, then at most once a minute while more are met.
pub(crate) fn report_unreadable_pages() {
    static REPORTED: std::sync::Mutex<Option<(u64, std::time::Instant)>> =
        std::sync::Mutex::new(None);
    let now = crate::mmap::unreadable_pages();
    if now == 0 {
        return;
    }
    let mut reported = REPORTED.lock().unwrap_or_else(|e| e.into_inner());
    let due = match *reported {
        None => true,
        Some((count, at)) => now > count && at.elapsed() >= std::time::Duration::from_secs(60),
    };
    if due {
        *reported = Some((now, std::time::Instant::now()));
        tracing::error!(
            pages = now,
            "pages of collection files could not be read (SIGBUS: a failing disk, or a file shortened by another process) and were read as zeros; the records on them fail their checksums and are quarantined"
        );
    }
}

/// Keys quarantined while a reshard runs beyond which the reshard is
/// abandoned rather than checking them all under the writer lock.
pub(crate) const MAX_QUARANTINES_DURING_RESHARD: usize = 4096;

impl Collection {
    /// Quarantines `key`, whose record at `slot` in `log` failed its
    /// checksum: removes the entry if it still points there, takes it out of
    /// the digest, and asks for a compaction.
    pub(crate) fn quarantine(&self, log: &Arc<LogFile>, key: &[u8], slot: Slot) {
        report_unreadable_pages();
        tracing::error!(
            collection = %self.name,
            offset = slot.offset(),
            "a record failed its checksum on read; quarantining its key until a replica's copy is applied"
        );
        self.with_writer(|state| {
            let current = self.current.load();
            // A compaction since then rewrote the file (and checked every
            // record it copied); only the log the damage is in matters.
            if !Arc::ptr_eq(&current.log, log) || current.index.get(key) != Some(slot) {
                return;
            }
            current.index.remove_damaged(key);
            // A reshard's copy of this index may hold the key still.
            if let Some(during) = self.resharding_quarantines.lock().unwrap().as_mut() {
                match during {
                    Some(keys) if keys.len() < MAX_QUARANTINES_DURING_RESHARD => {
                        keys.push(key.to_vec())
                    }
                    _ => *during = None,
                }
            }
            if slot.is_tombstone() {
                state.tombstones -= 1;
            } else {
                state.live_keys -= 1;
            }
            // The length the index kept, not the damaged header's.
            state.garbage += slot.record_len(key.len());
        });
        self.quarantined.fetch_add(1, Ordering::Relaxed);
        self.note_quarantined([key.to_vec()]);
        self.compact_requested.store(true, Ordering::Release);
    }

    /// Hands `keys`, whose records were found damaged and left the index,
    /// to `Store::take_quarantined`: the node reads them as damaged, not
    /// missing, until a replica's copy is applied.
    pub(crate) fn note_quarantined(&self, keys: impl IntoIterator<Item = Vec<u8>>) {
        let mut held = self.quarantined_keys.lock().unwrap();
        for key in keys {
            // Bounded: the node only needs the recent ones.
            if held.len() >= 100_000 {
                break;
            }
            held.push(key);
        }
        if !held.is_empty() {
            self.any_quarantined.store(true, Ordering::Release);
        }
    }

    /// Quarantines the record at `offset` in `log` whose key is not known
    /// (its bytes may be what is damaged): finds the entry pointing there.
    pub(crate) fn quarantine_offset(&self, log: &Arc<LogFile>, offset: u64) {
        let current = self.current.load();
        if !Arc::ptr_eq(&current.log, log) {
            return;
        }
        let mut found = None;
        current.index.for_each(|k, s| {
            if s.offset() == offset {
                found = Some((k.as_bytes().to_vec(), *s));
            }
        });
        drop(current);
        match found {
            Some((key, slot)) => self.quarantine(log, &key, slot),
            None => self.compact_requested.store(true, Ordering::Release),
        }
    }

    /// Whether a quarantine asked for a compaction; clears the request.
    pub(crate) fn take_compaction_request(&self) -> bool {
        self.compact_requested.swap(false, Ordering::AcqRel)
    }
}
