//! One collection: its current generation (index + log), the write path, and
//! recovery from its file.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::error::{Error, Result};
use crate::index::{self, Index, Slot, Upsert};
use crate::key_list::KeyList;
use crate::log::LogFile;
use crate::record::{
    self, Decoded, FILE_HEADER_LEN, FileHeader, FileKind, Header, Kind, RECORD_HEADER_LEN,
};
use crate::recover;
use crate::verify;
use crate::version::{Clock, Version};
use crate::watermark::{self, Watermark};
use crate::{Options, SyncMode};

/// File name suffix of a collection's log.
pub(crate) const LOG_SUFFIX: &str = ".dhrt";
/// Suffix of a compaction in progress; leftovers are deleted on open.
pub(crate) const COMPACT_SUFFIX: &str = ".dhrt.compact";

/// An index and the log its offsets point into. Readers load the current
/// generation once per operation, so an index is never paired with the
/// wrong file, even while compaction swaps them.
#[derive(Debug)]
pub(crate) struct Generation {
    pub(crate) index: Index,
    /// Shared when a rebuild gives the same log a new index.
    pub(crate) log: Arc<LogFile>,
}

/// Lets go of a generation a rebuild replaced. If this is its last holder
/// (the rebuild's thread, usually), its index is freed a little at a time:
/// millions of frees in one go hold the allocator's locks long enough to
/// stall the writers allocating beside them for hundreds of milliseconds.
pub(crate) fn retire(old: Arc<Generation>) {
    if let Ok(generation) = Arc::try_unwrap(old) {
        generation.index.free_gradually();
    }
}

/// What the writer knows about the current generation, kept exact under the
/// writer lock.
#[derive(Clone, Copy, Debug)]
pub(crate) struct State {
    pub(crate) live_keys: u64,
    pub(crate) tombstones: u64,
    /// Bytes of superseded records in the log.
    pub(crate) garbage: u64,
    /// Physical ms of the oldest tombstone (key or drop) in the log, or
    /// `u64::MAX`; tells when a compaction could purge something.
    pub(crate) oldest_tombstone_ms: u64,
    /// The newest collection drop, if any survives in the log.
    pub(crate) dropped_at: Option<Version>,
    /// Where that drop's record is in the log.
    pub(crate) drop_offset: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            live_keys: 0,
            tombstones: 0,
            garbage: 0,
            oldest_tombstone_ms: u64::MAX,
            dropped_at: None,
            drop_offset: 0,
        }
    }
}

/// How a write is versioned.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Stamp<'a> {
    /// A local write: stamped by the clock under the writer lock, so versions
    /// of one key increase in log order. Always applies.
    Local(&'a Clock),
    /// A replicated write: applies only if newer than what is there.
    Given(Version),
}

/// The outcome of a write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Written {
    /// Written with this version; `replaced_live` says whether a live value
    /// was there before.
    Applied {
        version: Version,
        replaced_live: bool,
    },
    /// Nothing written: an equal or newer version (or drop) is there, or a
    /// local delete found no live key.
    Skipped,
}

struct Writer {
    buf: Vec<u8>,
    state: State,
    /// The seq the next record appended gets.
    next_seq: u64,
}

/// The largest write buffer a collection keeps between writes. A larger one
/// (a large value, a large batch) is freed when its write is done: kept, a
/// single 16 MiB write would pin 16 MiB in every collection it reached.
pub(crate) const KEEP_WRITE_BUF: usize = 64 << 10;

/// The collection's writer lock, held. Dropping it frees a write buffer
/// grown past [`KEEP_WRITE_BUF`], however the write ended.
struct WriterGuard<'a>(MutexGuard<'a, Writer>);

impl std::ops::Deref for WriterGuard<'_> {
    type Target = Writer;
    fn deref(&self) -> &Writer {
        &self.0
    }
}

impl std::ops::DerefMut for WriterGuard<'_> {
    fn deref_mut(&mut self) -> &mut Writer {
        &mut self.0
    }
}

impl Drop for WriterGuard<'_> {
    fn drop(&mut self) {
        if self.0.buf.capacity() > KEEP_WRITE_BUF {
            self.0.buf = Vec::new();
        }
    }
}

/// Bits of a seq below the epoch: each opening of a store starts a new
/// epoch (see `docs/format.md`), so a seq is never handed out twice, even
/// when a crash lost records whose seqs a watcher had already seen.
pub(crate) const EPOCH_SHIFT: u32 = 40;

/// Where a collection's seqs start in `epoch`: at a random point of the
/// epoch's first quarter, not at 1, so that two collections written in
/// step do not hold the same seqs at the same offsets. A record copied from
/// one's file over the other's (a misdirected write) is then out of seq
/// order there, and refused on opening like one copied within a file
/// (`docs/format.md`, "Recovery"). Still 3 * 2^38 seqs (8.2 * 10^11
/// records) before the epoch's bits are reached, and a seq that reached
/// them only makes the next opening's epoch greater.
pub(crate) fn first_seq_of(epoch: u64) -> u64 {
    epoch << EPOCH_SHIFT | (1 + rand::random::<u64>() % (1 << (EPOCH_SHIFT - 2)))
}

/// A new history id: random, never zero (zero means "no history yet").
pub(crate) fn new_history() -> u64 {
    rand::random::<u64>() | 1
}

/// A collection.
pub(crate) struct Collection {
    pub(crate) name: String,
    pub(crate) current: ArcSwap<Generation>,
    writer: Mutex<Writer>,
    /// The greatest seq in the file when it was opened: records of earlier
    /// epochs with a greater seq were lost in a crash (see `feed.rs`).
    pub(crate) recovered_max_seq: AtomicU64,
    /// The seq of the last record appended (or found on opening); written
    /// under the writer lock, read by watchers without it.
    pub(crate) last_seq_hint: AtomicU64,
    /// Held for the whole of a compaction or reshard: one at a time.
    pub(crate) rebuilding: Mutex<()>,
    /// Set (under the writer lock) when the store released this collection:
    /// a writer that waited for the lock must write to its successor.
    pub(crate) released: AtomicBool,
    /// The most records a rebuild replayed with the writer lock held.
    pub(crate) locked_replay_max: AtomicU64,
    /// Set when a damaged record was quarantined: compact soon.
    pub(crate) compact_requested: AtomicBool,
    /// After a background compaction failed (a full disk, an I/O error):
    /// when the next may start, and the wait after the next failure.
    pub(crate) compaction_backoff: Mutex<Option<(std::time::Instant, std::time::Duration)>>,
    /// Records quarantined since the collection was opened.
    pub(crate) quarantined: AtomicU64,
    /// Keys quarantined and not yet taken by `Store::take_quarantined`
    /// (so a node can answer for them "damaged", not "missing").
    pub(crate) quarantined_keys: Mutex<Vec<Vec<u8>>>,
    /// Whether `quarantined_keys` holds any (read without the lock).
    pub(crate) any_quarantined: AtomicBool,
    /// While a reshard builds a new index over the same log: the keys
    /// quarantined meanwhile (pushed under the writer lock), which its
    /// copy of the old index may still hold and must drop before the swap.
    /// `None` when no reshard runs; `Some(None)` once too many came.
    pub(crate) resharding_quarantines: Mutex<Option<Option<Vec<Vec<u8>>>>>,
    /// Makes the next reshard stop before its final step and say so on
    /// the first channel, until the second one answers.
    #[cfg(test)]
    pub(crate) pause_reshard:
        Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    /// Milliseconds a reshard sleeps after its copy, and each round of its
    /// catch-up outside the writer lock before it replays: a rebuild
    /// slower than the writers.
    #[cfg(test)]
    pub(crate) slow_catch_up_ms: AtomicU64,
    /// Makes the next compaction stop in its final step (writer lock held)
    /// and say so on the first channel, until the second one answers.
    #[cfg(test)]
    pub(crate) pause_compaction:
        Mutex<Option<(std::sync::mpsc::Sender<()>, std::sync::mpsc::Receiver<()>)>>,
    /// Makes the first write-back of the next compaction's file fail.
    #[cfg(test)]
    pub(crate) fail_compaction_write_back: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Collection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Collection")
            .field("name", &self.name)
            .finish()
    }
}

/// Counts the record `old`, of a key of `key_len` bytes, as replaced.
fn forget(state: &mut State, key_len: usize, old: &Slot) {
    if old.is_tombstone() {
        state.tombstones -= 1;
    } else {
        state.live_keys -= 1;
    }
    state.garbage += old.record_len(key_len);
}

/// Applies one record, already in the log at `offset`, to an index and its
/// state. `record` is the record's bytes, from its header on (the writer's
/// own buffer on the write path); `log` holds the bytes the index's
/// offsets point into. Returns `None` if it did not take effect, else the
/// slot it replaced, if any; what a drop did is told in `dropped`.
pub(crate) fn apply_record(
    index: &Index,
    state: &mut State,
    log: &[u8],
    record: &[u8],
    offset: u64,
    mut dropped: Option<&mut Dropped>,
) -> Option<Option<Slot>> {
    let header = &record::peek_header(record);
    let key = &record[record::RECORD_HEADER_LEN..][..header.key_len as usize];
    let version = header.version;
    let len = header.record_len() as u64;
    if state.dropped_at.is_some_and(|d| version <= d) {
        state.garbage += len;
        return None;
    }
    match header.kind {
        Kind::Drop => {
            if state.dropped_at.is_some() {
                state.garbage += RECORD_HEADER_LEN as u64; // the older drop record
            }
            state.dropped_at = Some(version);
            state.drop_offset = offset;
            state.oldest_tombstone_ms = state.oldest_tombstone_ms.min(version.physical_ms());
            // A shard at a time: what is held meanwhile is one shard's
            // worth, whatever the collection's size.
            let mut doomed = Vec::new();
            for shard in 0..index.shard_count() {
                let Some(shard) = index.shard_at(shard) else {
                    break;
                };
                {
                    let guard = &crossbeam_epoch::pin();
                    let mut cursor = shard.front(guard);
                    while let Some(e) = cursor {
                        let s = e.value().load();
                        if s.version() < version {
                            doomed.push((e.key().clone(), s));
                        } else if let Some(out) = dropped.as_deref_mut()
                            && !s.is_tombstone()
                        {
                            out.newest_kept = out.newest_kept.max(Some(s.version()));
                        }
                        cursor = e.next();
                    }
                }
                for (k, s) in doomed.drain(..) {
                    index.remove(k.as_bytes());
                    forget(state, k.as_bytes().len(), &s);
                    if let (Some(out), false) = (dropped.as_deref_mut(), s.is_tombstone()) {
                        out.removed.push(k.as_bytes());
                    }
                }
            }
            Some(None)
        }
        Kind::Set | Kind::Tombstone => apply_write(
            state,
            header,
            offset,
            // Read back through the map on purpose: it maps the log's new
            // pages as they are written (a minor fault a page), so that
            // reads find them mapped, and the page cache keeps them as
            // mapped pages (reclaim that takes unmapped page cache first
            // may evict an unmapped log: docs/benchmarks.md, session 15).
            // Unmapping a populated map is the reaper's, off the write
            // path: see `mmap.rs`.
            record::stored_crc(&log[offset as usize..]),
            |slot| index.upsert(key, slot),
        ),
    }
}

/// What a drop did to the index: the live keys it removed, and the newest
/// version of a live key it kept (one written at or after it).
#[derive(Debug, Default)]
pub(crate) struct Dropped {
    pub(crate) removed: KeyList,
    pub(crate) newest_kept: Option<Version>,
}

/// The newest version of a live key in `index`.
fn newest_live(index: &Index) -> Option<Version> {
    let mut newest = None;
    for shard in (0..index.shard_count()).map_while(|i| index.shard_at(i)) {
        let guard = &crossbeam_epoch::pin();
        let mut cursor = shard.front(guard);
        while let Some(e) = cursor {
            let s = e.value().load();
            if !s.is_tombstone() {
                newest = newest.max(Some(s.version()));
            }
            cursor = e.next();
        }
    }
    newest
}

/// [`apply_record`] for a set or a tombstone, with `upsert` putting its
/// slot in the index (a live [`Index`], or a builder's).
pub(crate) fn apply_write(
    state: &mut State,
    header: &Header,
    offset: u64,
    crc: u32,
    upsert: impl FnOnce(Slot) -> Upsert,
) -> Option<Option<Slot>> {
    let version = header.version;
    if state.dropped_at.is_some_and(|d| version <= d) {
        state.garbage += header.record_len() as u64;
        return None;
    }
    let tombstone = header.kind == Kind::Tombstone;
    let slot = Slot::new(offset, tombstone, version, crc, header.value_len);
    let replaced = match upsert(slot) {
        Upsert::Kept(_) => {
            state.garbage += header.record_len() as u64;
            return None;
        }
        Upsert::Replaced(old) => {
            forget(state, header.key_len as usize, &old);
            Some(old)
        }
        Upsert::Inserted => None,
    };
    if tombstone {
        state.tombstones += 1;
        state.oldest_tombstone_ms = state.oldest_tombstone_ms.min(version.physical_ms());
    } else {
        state.live_keys += 1;
    }
    Some(replaced)
}

/// What recovery found.
#[derive(Clone, Debug, Default)]
pub(crate) struct Recovery {
    /// Records replayed.
    pub(crate) records: u64,
    /// Bytes cut from a torn tail, and why the first cut record was bad.
    pub(crate) truncated: Option<(u64, &'static str)>,
    /// Greatest timestamp seen.
    pub(crate) max_ts: u64,
    /// Zeros after the last record (reserved space never written), given
    /// back.
    pub(crate) reserved: u64,
    /// The durable watermark found, if the log has one.
    pub(crate) watermark: Option<u64>,
    /// The greatest record seq found.
    pub(crate) max_seq: u64,
    /// Records carried over from a format 1 file, if it was one.
    pub(crate) converted: Option<u64>,
    /// Damaged records dropped because a later record of their key
    /// supersedes them (garbage nothing had read).
    pub(crate) damaged_skipped: u64,
    /// The file header failed its checks (why) over a sound log, and was
    /// rebuilt.
    pub(crate) header_rebuilt: Option<String>,
}

impl Collection {
    pub(crate) fn log_path(dir: &Path, name: &str) -> PathBuf {
        dir.join(format!("{name}{LOG_SUFFIX}"))
    }

    /// Whether the log at `path` is what an interrupted creation leaves:
    /// shorter than its header, a prefix of a header, and no watermark
    /// beside it (one is written only once the header is durable). Such a
    /// file never held a record.
    pub(crate) fn never_created(path: &Path) -> Result<bool> {
        let len = std::fs::metadata(path)
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        if len >= FILE_HEADER_LEN as u64 || watermark::path_for(path).exists() {
            return Ok(false);
        }
        let head = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        let fixed = record::file_header(FileHeader {
            history: new_history(),
            purged_seq: 0,
        });
        // The magic, the version and two zero bytes are fixed; the rest
        // (history, purge mark, CRC) cannot be checked in a prefix.
        let n = head.len().min(12);
        Ok(head[..n] == fixed[..n])
    }

    fn from_parts(name: &str, generation: Generation, state: State) -> Collection {
        Collection {
            name: name.to_string(),
            current: ArcSwap::from_pointee(generation),
            writer: Mutex::new(Writer {
                buf: Vec::new(),
                state,
                next_seq: 1,
            }),
            recovered_max_seq: AtomicU64::new(0),
            last_seq_hint: AtomicU64::new(0),
            rebuilding: Mutex::new(()),
            released: AtomicBool::new(false),
            locked_replay_max: AtomicU64::new(0),
            compact_requested: AtomicBool::new(false),
            compaction_backoff: Mutex::new(None),
            quarantined: AtomicU64::new(0),
            quarantined_keys: Mutex::new(Vec::new()),
            any_quarantined: AtomicBool::new(false),
            resharding_quarantines: Mutex::new(None),
            #[cfg(test)]
            pause_reshard: Mutex::new(None),
            #[cfg(test)]
            slow_catch_up_ms: AtomicU64::new(0),
            #[cfg(test)]
            pause_compaction: Mutex::new(None),
            #[cfg(test)]
            fail_compaction_write_back: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A new, empty collection: a file in `dir`, or memory when `dir` is None.
    pub(crate) fn create(
        dir: Option<&Path>,
        name: &str,
        options: &Options,
        first_seq: u64,
    ) -> Result<Collection> {
        let path = dir.map(|d| Self::log_path(d, name));
        let header = FileHeader {
            history: new_history(),
            purged_seq: 0,
        };
        let log = LogFile::create(path.as_deref(), name, header).map_err(|e| {
            // No file left behind (a full disk fails the header's write):
            // the next opening would find a collection never created.
            if let Some(path) = &path {
                let _ = std::fs::remove_file(path);
            }
            Error::io(
                "create",
                path.clone().unwrap_or_else(|| "(memory)".into()),
                e,
            )
        })?;
        let mut log = log;
        if let (Some(dir), Some(path)) = (dir, &path) {
            // The header must be durable and the file's name with it, and
            // the watermark file too, so that a crash before the first sync
            // finds "nothing past the header was durable", not "no
            // watermark, everything was".
            let durable = (|| {
                log.sync_all().map_err(|cause| Error::Poisoned {
                    collection: name.to_string(),
                    cause,
                })?;
                let watermark =
                    Watermark::create(path, header.history, log.id(), FILE_HEADER_LEN as u64)
                        .and_then(|w| w.sync().map(|()| w))
                        .map_err(|e| Error::io("create", watermark::path_for(path), e))?;
                log.set_watermark(Arc::new(watermark));
                crate::log::sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))
            })();
            if let Err(e) = durable {
                // A collection that was never created leaves no files
                // (a next opening would otherwise find an empty one).
                let _ = std::fs::remove_file(watermark::path_for(path));
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        }
        let generation = Generation {
            index: Index::new(options.shards_for(0), options.shard_array_max),
            log: Arc::new(log),
        };
        let collection = Self::from_parts(name, generation, State::default());
        collection.set_next_seq(first_seq);
        Ok(collection)
    }

    /// After an append at `offset..end` of records `first_seq..=last_seq`
    /// was applied to the index (writer lock held): watchers may read it.
    fn published(&self, log: &LogFile, first_seq: u64, last_seq: u64, offset: u64, end: u64) {
        log.note_checkpoint(first_seq, offset);
        log.mark_applied(end);
        self.last_seq_hint
            .store(last_seq, std::sync::atomic::Ordering::Relaxed);
    }

    /// Sets the seq the next record gets (the store's epoch, after opening).
    pub(crate) fn set_next_seq(&self, seq: u64) {
        let mut w = self.writer.lock().unwrap();
        w.next_seq = w.next_seq.max(seq);
    }

    /// Opens an existing collection file: replays it into a fresh index,
    /// cuts a torn tail, refuses a corrupt middle.
    ///
    /// Two passes: the first checks every record's CRC and finds the end of
    /// the valid log (cheap, sequential); the second builds the index, on
    /// several threads for large logs, each owning a share of the shards.
    pub(crate) fn open(
        path: &Path,
        name: &str,
        options: &Options,
    ) -> Result<(Collection, Recovery)> {
        let mut converted = None;
        {
            let mut head = [0u8; crate::migrate::V1_FILE_HEADER_LEN];
            let f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
            if std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0).is_ok()
                && crate::migrate::is_v1_header(&head)
            {
                let dir = path.parent().unwrap_or(Path::new("."));
                converted = Some(crate::migrate::convert_v1(path, dir, name)?);
            }
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let found =
            watermark::read(path).map_err(|e| Error::io("read", watermark::path_for(path), e))?;
        let mut recovery = Recovery {
            watermark: found.map(|(offset, _)| offset),
            converted,
            ..Recovery::default()
        };
        let mut file_header = FileHeader {
            history: new_history(),
            purged_seq: 0,
        };
        let mut end = FILE_HEADER_LEN;
        let mut cut_reason = None;
        let mut preallocated = false;
        let mut built = (
            Index::new(options.shards_for(0), options.shard_array_max),
            State::default(),
        );
        let mut checkpoints = Vec::new();
        let mut header_damage = None;
        if len < FILE_HEADER_LEN as u64 {
            // A watermark is written only once the header is durable.
            if watermark::path_for(path).exists() {
                return Err(Error::Corrupt {
                    path: path.into(),
                    offset: len,
                    reason: "the log ends before its durable watermark",
                });
            }
            // Creation was interrupted before the header was durable.
            let head = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
            // The magic, the version and two zero bytes are fixed; the rest
            // (history, purge mark, CRC) cannot be checked in a prefix.
            let fixed = record::file_header(file_header);
            let n = head.len().min(12);
            if head[..n] != fixed[..n] {
                return Err(Error::BadHeader {
                    path: path.into(),
                    reason: format!("{len} bytes, not a header"),
                });
            }
            std::os::unix::fs::FileExt::write_all_at(&file, &fixed, 0)
                .map_err(|e| Error::io("write", path, e))?;
            file.sync_all().map_err(|e| Error::io("fsync", path, e))?;
            tracing::warn!(path = %path.display(), "rewrote an interrupted file header");
        } else {
            let map =
                crate::mmap::map(&file, len as usize).map_err(|e| Error::io("mmap", path, e))?;
            let buf = &map[..];
            match record::check_file_header(buf) {
                Ok(FileKind::Current(h)) => {
                    // A watermark written for another log (another
                    // collection's, swapped or copied in; or an earlier file
                    // of this one) says nothing of this one: trusting it
                    // could cut durable records as a torn tail, or refuse
                    // sound ones.
                    if let Some((_, tag)) = found
                        && tag != 0
                        && tag != watermark::tag_for(path, h.history)
                    {
                        return Err(Error::Corrupt {
                            path: path.into(),
                            offset: 0,
                            reason: "its durable watermark file belongs to another log (another collection's, or an earlier file of this one): the files were moved, copied or swapped; put back the right pair, or move the .dhrt.durable file aside to trust this log whole",
                        });
                    }
                    file_header = h;
                }
                Ok(FileKind::V1) => {
                    return Err(Error::BadHeader {
                        path: path.into(),
                        reason: "still format 1 after its conversion".into(),
                    });
                }
                Err(reason) => match crate::header::rebuild(path, buf, found, new_history) {
                    // The header is damaged, the log after it sound.
                    Some(rebuilt) => {
                        if !rebuilt.watermark_kept {
                            recovery.watermark = None;
                        }
                        file_header = rebuilt.header;
                        header_damage = Some((reason, rebuilt));
                    }
                    None => {
                        return Err(Error::BadHeader {
                            path: path.into(),
                            reason,
                        });
                    }
                },
            }
            let found_watermark = recovery.watermark;
            let below_watermark = |at: usize| found_watermark.is_some_and(|w| (at as u64) < w);
            let t_scan = std::time::Instant::now();
            let mut found = recover::scan(buf);
            // Damaged records stepped over, each with why it would have
            // refused the open: the open goes on only if each was garbage
            // (checked once the index is built).
            let mut stepped_over: Vec<(recover::Stepped, &'static str)> = Vec::new();
            while found.end < buf.len() {
                end = found.end;
                let refused = match record::decode(&buf[end..]) {
                    Decoded::Record { .. } => unreachable!("the scan stops on a bad record"),
                    // These bytes were confirmed durable: damage here is
                    // not a crash's doing.
                    _ if below_watermark(end) => Some("bad record below the durable watermark"),
                    _ if buf[end..].iter().all(|&b| b == 0) => {
                        // Space reserved ahead of the tail and never
                        // written (the process stopped without closing the
                        // log): not a torn record.
                        preallocated = true;
                        None
                    }
                    bad => {
                        let reason = match bad {
                            Decoded::Invalid(why) => why,
                            _ => "record runs past the end of the file",
                        };
                        // Past the watermark, valid records after the bad
                        // one prove nothing: writeback of an unsynced tail
                        // is out of order (a zeroed page between written
                        // ones), so it is cut whatever follows. Without a
                        // watermark, they mean a corrupt middle.
                        if recovery.watermark.is_none() && recover::valid_record_after(buf, end) {
                            Some(reason)
                        } else {
                            cut_reason = Some(reason);
                            None
                        }
                    }
                };
                let Some(reason) = refused else { break };
                // A record whose damage is one byte, located, so that its
                // key and version are known, is stepped over: it may be
                // garbage (a later write replaced it before anything read
                // it).
                match found.step_over_damaged(buf) {
                    Some(stepped) => stepped_over.push((stepped, reason)),
                    // Damage that needs an operator.
                    None => {
                        return Err(Error::Corrupt {
                            path: path.into(),
                            offset: end as u64,
                            reason,
                        });
                    }
                }
            }
            end = found.end;
            if let Some(at) = found.regressed_at {
                // Whole, valid records out of seq order: no crash writes
                // them, wherever they are (a torn tail is cut at its first
                // bad record). One of them was written over another
                // record, which is lost, and the index would be rebuilt
                // from whichever wins: an old value, a deleted key back.
                return Err(Error::Corrupt {
                    path: path.into(),
                    offset: at as u64,
                    reason: "a record here has a seq no greater than one before it: a record copied over another (a misdirected write), here or just before",
                });
            }
            recovery.records = found.count;
            recovery.max_ts = found.max_ts;
            if below_watermark(end) {
                return Err(Error::Corrupt {
                    path: path.into(),
                    offset: end as u64,
                    reason: "the log ends before its durable watermark",
                });
            }
            recovery.max_seq = found.max_seq;
            checkpoints = std::mem::take(&mut found.checkpoints);
            let t_replay = std::time::Instant::now();
            built = recover::replay(&buf[..end], found, options);
            for (stepped, reason) in &stepped_over {
                // Garbage only if what the log holds besides it beats it:
                // the key's winner has a greater version (or the same
                // record, kept intact elsewhere), or a drop removed it.
                // Otherwise it was the key's current value, and an older
                // record would be served in its place: refuse.
                let (index, state) = &built;
                let beaten = index.get(&stepped.key).is_some_and(|e| {
                    (e.version(), e.crc()) == (stepped.version, stepped.crc)
                        || index::wins(e.version(), e.crc(), stepped.version, || stepped.crc)
                });
                if !beaten && state.dropped_at.is_none_or(|d| stepped.version > d) {
                    return Err(Error::Corrupt {
                        path: path.into(),
                        offset: stepped.at as u64,
                        reason,
                    });
                }
                tracing::warn!(
                    path = %path.display(),
                    offset = stepped.at,
                    "skipped a damaged record that a later write of its key replaced; \
                     the collection is compacted to drop it"
                );
            }
            recovery.damaged_skipped = stepped_over.len() as u64;
            if let Some((reason, rebuilt)) = header_damage {
                Self::rewrite_header(path, &file, &mut file_header, rebuilt, &recovery)?;
                tracing::warn!(
                    path = %path.display(),
                    reason,
                    records = recovery.records,
                    "rebuilt the damaged file header of a sound log{}",
                    match (rebuilt.exact, rebuilt.watermark_kept) {
                        (true, _) => "",
                        (false, true) => ": watches resume from positions after this opening",
                        (false, false) => ": watches resume from positions after this opening; its durable watermark could not be tied to it, so the log was trusted whole",
                    }
                );
                recovery.header_rebuilt = Some(reason);
            }
            tracing::debug!(
                collection = name,
                records = recovery.records,
                scan_ms = t_replay.duration_since(t_scan).as_millis() as u64,
                replay_ms = t_replay.elapsed().as_millis() as u64,
                "recovered the index"
            );
        }
        if preallocated && cut_reason.is_none() {
            file.set_len(end as u64)
                .map_err(|e| Error::io("truncate", path, e))?;
            recovery.reserved = len - end as u64;
        }
        if let Some(reason) = cut_reason {
            let cut = len - end as u64;
            match recovery.watermark {
                Some(watermark) => tracing::warn!(
                    path = %path.display(),
                    offset = end,
                    bytes = cut,
                    watermark,
                    reason,
                    "cutting {cut} bytes at offset {end}, past the durable watermark \
                     {watermark}: never confirmed durable, so lost in a crash, \
                     not corrupted"
                ),
                None => tracing::warn!(
                    path = %path.display(),
                    offset = end,
                    bytes = cut,
                    reason,
                    "truncating a torn tail"
                ),
            }
            file.set_len(end as u64)
                .and_then(|()| file.sync_all())
                .map_err(|e| Error::io("truncate", path, e))?;
            recovery.truncated = Some((cut, reason));
        }
        // A log from before watermarks (or whose watermark was unreadable)
        // was trusted whole, and records past the watermark that survived a
        // crash (in the page cache) are served from now on: make the log
        // durable whole so the watermark can say so. Left past it, damage
        // to such a record would be cut as a tail lost in a crash, and
        // writes a client was answered for would vanish without a word.
        let synced_now = recovery.watermark.is_none_or(|w| end as u64 > w);
        if synced_now {
            file.sync_data().map_err(|e| Error::io("fsync", path, e))?;
        }
        let mut log = LogFile::with_file(file, Some(path.to_path_buf()), end as u64, file_header)
            .map_err(|e| Error::io("mmap", path, e))?;
        log.set_checkpoints(checkpoints);
        let watermark_path = watermark::path_for(path);
        let watermark = match recovery.watermark {
            Some(w) => Watermark::open(path, file_header.history, log.id(), w),
            None => Watermark::create(path, file_header.history, log.id(), end as u64),
        }
        .map_err(|e| Error::io("open", &watermark_path, e))?;
        if synced_now {
            watermark.advance(log.id(), end as u64);
            watermark
                .sync()
                .map_err(|e| Error::io("fsync", &watermark_path, e))?;
        }
        log.set_watermark(Arc::new(watermark));
        let (index, state) = built;
        let generation = Generation {
            index,
            log: Arc::new(log),
        };
        let collection = Self::from_parts(name, generation, state);
        if recovery.damaged_skipped > 0 {
            // Out of the file before a restart meets them again.
            collection
                .compact_requested
                .store(true, std::sync::atomic::Ordering::Release);
        }
        collection
            .recovered_max_seq
            .store(recovery.max_seq, std::sync::atomic::Ordering::Relaxed);
        collection
            .last_seq_hint
            .store(recovery.max_seq, std::sync::atomic::Ordering::Relaxed);
        Ok((collection, recovery))
    }

    /// Writes the header rebuilt for a log whose header was damaged
    /// (`header.rs`), durably, before anything else is written to it. A
    /// purge mark that was not recovered becomes the log's last seq. A
    /// watermark that could not be tied to the log is removed first: were
    /// the process to stop between the two writes, the next opening finds
    /// a sound header with no watermark (the log trusted whole), never a
    /// watermark tagged for another history.
    fn rewrite_header(
        path: &Path,
        file: &std::fs::File,
        header: &mut FileHeader,
        rebuilt: crate::header::Rebuilt,
        recovery: &Recovery,
    ) -> Result<()> {
        if !rebuilt.exact {
            header.purged_seq = recovery.max_seq;
        }
        if !rebuilt.watermark_kept {
            let w = watermark::path_for(path);
            match std::fs::remove_file(&w) {
                Ok(()) => {
                    let dir = path.parent().unwrap_or(Path::new("."));
                    crate::log::sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io("remove", &w, e)),
            }
        }
        std::os::unix::fs::FileExt::write_all_at(file, &record::file_header(*header), 0)
            .and_then(|()| file.sync_data())
            .map_err(|e| Error::io("write", path, e))
    }

    /// Marks the collection released if its digest is still `expected`
    /// (writer lock held, so no write lands in between); a writer waiting
    /// for the lock then writes to the collection's successor instead.
    pub(crate) fn release_if(&self, expected: &crate::Digest) -> bool {
        let _rebuild = self.rebuilding.lock().unwrap();
        let w = self.writer.lock().unwrap();
        let digest = crate::Digest {
            buckets: self.current.load().index.digest(),
            dropped_at: w.state.dropped_at,
        };
        if digest != *expected {
            return false;
        }
        self.released
            .store(true, std::sync::atomic::Ordering::Release);
        true
    }

    /// The version the index holds for `key` (a tombstone's too), without
    /// reading the record.
    pub(crate) fn version_of(&self, key: &[u8]) -> Option<Version> {
        self.current
            .load()
            .index
            .get(key)
            .map(|slot| slot.version())
    }

    /// Looks a key up: `None` if there is no entry, else its value (`None`
    /// for a tombstone) and version. A value whose record fails its CRC is
    /// quarantined (see `verify.rs`) and reported as `Error::Checksum`.
    #[inline]
    pub(crate) fn lookup(&self, key: &[u8]) -> Result<Option<(Option<Bytes>, Version)>> {
        let generation = self.current.load();
        let Some(slot) = generation.index.get(key) else {
            return Ok(None);
        };
        if slot.is_tombstone() {
            return Ok(Some((None, slot.version())));
        }
        // The tail before the map: the map covers everything below it.
        let tail = generation.log.tail();
        let map = generation.log.map();
        match verify::read_value(&map, tail, &slot) {
            Some(value) => Ok(Some((Some(value), slot.version()))),
            None => {
                self.quarantine(&generation.log, key, slot);
                Err(Error::Checksum {
                    collection: self.name.clone(),
                    offset: slot.offset(),
                })
            }
        }
    }

    /// The writer lock, for a write of `keys`. The memory their upserts
    /// read first (each key's shard word and the middle of its array) is
    /// read before the lock is taken, so that the cache misses (and, on a
    /// virtual machine whose host reclaims idle guest memory, host faults
    /// of microseconds a page) are taken by this writer alone, not by every
    /// writer of the collection waiting behind it: 3M random SETs over 1M
    /// keys ran 20 % faster so (docs/benchmarks.md, session 17). If another
    /// writer holds the lock, the wait is spent looking the keys up in full
    /// too. (Looking every key up in full before every lock cost a third of
    /// the throughput: session 16.)
    fn lock_for<'k>(&self, keys: impl Iterator<Item = &'k [u8]> + Clone) -> WriterGuard<'_> {
        self.current.load().index.touch(keys.clone());
        WriterGuard(match self.writer.try_lock() {
            Ok(w) => w,
            Err(TryLockError::WouldBlock) => {
                let generation = self.current.load();
                for key in keys {
                    std::hint::black_box(generation.index.get(key));
                }
                drop(generation);
                self.writer.lock().unwrap()
            }
            Err(TryLockError::Poisoned(e)) => panic!("the writer lock is poisoned: {e}"),
        })
    }

    /// The capacity of the write buffer kept between writes.
    #[cfg(test)]
    pub(crate) fn write_buf_capacity(&self) -> usize {
        self.writer.lock().unwrap().buf.capacity()
    }

    /// Writes a set (`value` is `Some`) or a delete of `key`.
    pub(crate) fn write(
        &self,
        key: &[u8],
        value: Option<&[u8]>,
        stamp: Stamp<'_>,
        sync: SyncMode,
    ) -> Result<Written> {
        let mut w = self.lock_for(std::iter::once(key));
        let generation = self.current.load();
        self.check_poison(&generation.log)?;
        let version = match stamp {
            // A local set always applies: no need to look first.
            Stamp::Local(clock) if value.is_some() => clock.now(),
            Stamp::Local(clock) => {
                if generation.index.get(key).is_none_or(|o| o.is_tombstone()) {
                    return Ok(Written::Skipped);
                }
                clock.now()
            }
            Stamp::Given(v) => {
                let newer = generation.index.get(key).is_some_and(|o| o.version() > v);
                if newer || w.state.dropped_at.is_some_and(|d| v <= d) {
                    return Ok(Written::Skipped);
                }
                v
            }
        };
        let kind = if value.is_some() {
            Kind::Set
        } else {
            Kind::Tombstone
        };
        let Writer {
            buf,
            state,
            next_seq,
        } = &mut *w;
        buf.clear();
        let seq = *next_seq;
        record::encode(buf, kind, key, value.unwrap_or_default(), version, seq);
        if let Stamp::Given(_) = stamp
            && !self.wins_over_current(&generation, key, version, buf)
        {
            return Ok(Written::Skipped);
        }
        *next_seq += 1;
        let offset = self.append(&generation.log, buf)?;
        let end = offset + buf.len() as u64;
        let map = generation.log.map();
        let replaced = apply_record(&generation.index, state, &map, buf, offset, None)
            .expect("checked above that the write is newer");
        self.published(&generation.log, seq, *next_seq - 1, offset, end);
        drop(w);
        self.durable(&generation.log, end, sync)?;
        Ok(Written::Applied {
            version,
            replaced_live: replaced.is_some_and(|o| !o.is_tombstone()),
        })
    }

    /// Applies records stamped elsewhere (replication, anti-entropy,
    /// handoff) under one lock and one append: each takes effect only if
    /// it is newer than what the index holds and than the last drop; the
    /// others are skipped before they reach the log. Returns how many took
    /// effect.
    /// Also returns the entries that lost to a newer version here (or to
    /// the collection's drop), by index, with that version.
    pub(crate) fn apply_many(
        &self,
        entries: &[crate::Replicated<'_>],
        sync: SyncMode,
    ) -> Result<(usize, Vec<(usize, Version)>)> {
        let mut newer = Vec::new();
        let mut w = self.lock_for(entries.iter().map(|(key, ..)| *key));
        let generation = self.current.load();
        self.check_poison(&generation.log)?;
        let Writer {
            buf,
            state,
            next_seq,
        } = &mut *w;
        buf.clear();
        let first_seq = *next_seq;
        let mut starts = Vec::with_capacity(entries.len());
        // Each key's last record in this batch: a record that loses to one
        // before it in the batch is not appended, so a later record of a
        // key always beats the earlier ones (recovery relies on it to tell
        // a damaged record superseded).
        let mut batch: std::collections::HashMap<&[u8], (Version, u32)> =
            std::collections::HashMap::new();
        for (i, (key, value, version)) in entries.iter().enumerate() {
            let held = generation
                .index
                .get(key)
                .map(|o| o.version())
                .filter(|v| v > version);
            let dropped = state.dropped_at.filter(|d| version <= d);
            if let Some(v) = held.max(dropped) {
                newer.push((i, v));
                continue;
            }
            let kind = if value.is_some() {
                Kind::Set
            } else {
                Kind::Tombstone
            };
            let start = buf.len();
            record::encode(
                buf,
                kind,
                key,
                value.unwrap_or_default(),
                *version,
                *next_seq,
            );
            let crc = record::stored_crc(&buf[start..]);
            let beaten_in_batch = entries.len() > 1
                && batch
                    .get(key)
                    .is_some_and(|&(v, c)| !index::wins(*version, crc, v, || c));
            if beaten_in_batch || !self.wins_over_current(&generation, key, *version, &buf[start..])
            {
                buf.truncate(start);
                continue;
            }
            if entries.len() > 1 {
                batch.insert(key, (*version, crc));
            }
            *next_seq += 1;
            starts.push(start);
        }
        if starts.is_empty() {
            return Ok((0, newer));
        }
        let offset = self.append(&generation.log, buf)?;
        let end = offset + buf.len() as u64;
        let map = generation.log.map();
        let mut applied = 0;
        for start in starts {
            // Two records of one key in a batch (the later one beats the
            // earlier, or it was not appended): the later one replaces the
            // earlier in the index, which is counted as garbage.
            let took = apply_record(
                &generation.index,
                state,
                &map,
                &buf[start..],
                offset + start as u64,
                None,
            );
            applied += usize::from(took.is_some());
        }
        self.published(&generation.log, first_seq, *next_seq - 1, offset, end);
        drop(w);
        self.durable(&generation.log, end, sync)?;
        Ok((applied, newer))
    }

    /// Sets many keys with local versions under one lock and one append
    /// (and, with `SyncMode::Always`, one fsync). Callers validated every
    /// entry, so either all are written or, on an I/O error, none.
    pub(crate) fn write_many(
        &self,
        entries: &[(&[u8], &[u8])],
        clock: &Clock,
        sync: SyncMode,
    ) -> Result<Vec<Version>> {
        let mut w = self.lock_for(entries.iter().map(|(key, _)| *key));
        let generation = self.current.load();
        self.check_poison(&generation.log)?;
        let Writer {
            buf,
            state,
            next_seq,
        } = &mut *w;
        buf.clear();
        let first_seq = *next_seq;
        let mut starts = Vec::with_capacity(entries.len());
        let mut versions = Vec::with_capacity(entries.len());
        for (key, value) in entries {
            starts.push(buf.len());
            let version = clock.now();
            versions.push(version);
            record::encode(buf, Kind::Set, key, value, version, *next_seq);
            *next_seq += 1;
        }
        let offset = self.append(&generation.log, buf)?;
        let end = offset + buf.len() as u64;
        let map = generation.log.map();
        for start in starts {
            apply_record(
                &generation.index,
                state,
                &map,
                &buf[start..],
                offset + start as u64,
                None,
            )
            .expect("local versions are newer than everything");
        }
        self.published(&generation.log, first_seq, *next_seq - 1, offset, end);
        drop(w);
        self.durable(&generation.log, end, sync)?;
        Ok(versions)
    }

    /// Drops every key older than the drop's version; returns the live keys
    /// removed, or `None` if a newer drop was already there, and the newest
    /// version of a live key kept (written at or after the drop).
    /// (With `report` only, when a newer drop was there: that takes a walk
    /// of the index, without the writer lock.)
    pub(crate) fn drop_keys(
        &self,
        stamp: Stamp<'_>,
        sync: SyncMode,
        report: bool,
    ) -> Result<(Option<KeyList>, Option<Version>)> {
        let mut w = WriterGuard(self.writer.lock().unwrap());
        let generation = self.current.load();
        self.check_poison(&generation.log)?;
        let version = match stamp {
            Stamp::Local(clock) => clock.now(),
            Stamp::Given(v) => v,
        };
        if w.state.dropped_at.is_some_and(|d| d >= version) {
            // Read without the writer lock: the index is read lock-free.
            drop(w);
            return Ok((
                None,
                report.then(|| newest_live(&generation.index)).flatten(),
            ));
        }
        let Writer {
            buf,
            state,
            next_seq,
        } = &mut *w;
        buf.clear();
        let seq = *next_seq;
        *next_seq += 1;
        record::encode(buf, Kind::Drop, &[], &[], version, seq);
        let offset = self.append(&generation.log, buf)?;
        let end = offset + buf.len() as u64;
        let mut dropped = Dropped::default();
        let map = generation.log.map();
        apply_record(
            &generation.index,
            state,
            &map,
            buf,
            offset,
            Some(&mut dropped),
        );
        self.published(&generation.log, seq, *next_seq - 1, offset, end);
        drop(w);
        self.durable(&generation.log, end, sync)?;
        dropped.removed.sort();
        Ok((Some(dropped.removed), dropped.newest_kept))
    }

    /// Whether the encoded record `encoded` of `key` at `version` wins over
    /// the key's current entry ([`index::wins`]): at an equal version, the
    /// greater CRC wins, so two replicas that hold different bytes under
    /// one version converge on the same record. Called under the writer
    /// lock, after the cheaper check that no newer version is there.
    fn wins_over_current(
        &self,
        generation: &Generation,
        key: &[u8],
        version: Version,
        encoded: &[u8],
    ) -> bool {
        let Some(current) = generation.index.get(key) else {
            return true;
        };
        index::wins(
            version,
            record::stored_crc(encoded),
            current.version(),
            || current.crc(),
        )
    }

    fn append(&self, log: &LogFile, buf: &[u8]) -> Result<u64> {
        log.append(buf).map_err(|e| {
            Error::io(
                "write",
                log.path()
                    .map_or_else(|| PathBuf::from("(memory)"), Path::to_path_buf),
                e,
            )
        })
    }

    /// Whether the collection takes writes (called with the writer lock
    /// held): not released, not poisoned.
    fn check_poison(&self, log: &LogFile) -> Result<()> {
        if self.released.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::Released {
                collection: self.name.clone(),
            });
        }
        match log.poisoned() {
            Some(cause) => Err(Error::Poisoned {
                collection: self.name.clone(),
                cause,
            }),
            None => Ok(()),
        }
    }

    /// Waits for the record just applied (ending at `end`) to be durable,
    /// if `sync` asks for it. It is in the index already: a failed fsync
    /// says so ([`Error::NotDurable`]), it does not take it back.
    fn durable(&self, log: &LogFile, end: u64, sync: SyncMode) -> Result<()> {
        if sync == SyncMode::Always {
            log.sync_to(end).map_err(|cause| Error::NotDurable {
                collection: self.name.clone(),
                cause,
            })?;
        }
        Ok(())
    }

    /// Fsyncs the current log.
    pub(crate) fn sync(&self) -> Result<()> {
        let generation = self.current.load();
        generation.log.sync_all().map_err(|cause| Error::Poisoned {
            collection: self.name.clone(),
            cause,
        })
    }

    /// Makes the durable watermark's last value durable, if it is not yet:
    /// the lazy half of recording it (see `watermark.rs`).
    pub(crate) fn sync_watermark(&self) -> Result<()> {
        let generation = self.current.load();
        match generation.log.watermark() {
            Some(w) if w.is_dirty() => w.sync().map_err(|e| {
                Error::io(
                    "fsync",
                    generation
                        .log
                        .path()
                        .map_or_else(PathBuf::new, watermark::path_for),
                    e,
                )
            }),
            _ => Ok(()),
        }
    }

    /// A copy of the writer's state.
    pub(crate) fn state(&self) -> State {
        self.writer.lock().unwrap().state
    }

    /// Where the history stands now: the current generation, the end of the
    /// records its index reflects, the seq of the last record in the log
    /// (0: none), and where this opening's seqs start.
    pub(crate) fn head(&self) -> (Arc<Generation>, u64, u64, u64) {
        let w = self.writer.lock().unwrap();
        let generation = self.current.load_full();
        let applied = generation.log.applied();
        let epoch_start = (w.next_seq - 1) >> EPOCH_SHIFT << EPOCH_SHIFT;
        let last_seq = self
            .last_seq_hint
            .load(std::sync::atomic::Ordering::Relaxed);
        (generation, applied, last_seq, epoch_start)
    }

    /// The tail of `log` (the current log), the greatest seq handed out, and
    /// the writer's state, read together under the writer lock.
    pub(crate) fn tail_and_state(&self, log: &LogFile) -> (u64, u64, State) {
        let w = self.writer.lock().unwrap();
        (log.tail(), w.next_seq - 1, w.state)
    }

    /// Runs `f` with the writer lock held (compaction's final phase).
    pub(crate) fn with_writer<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.writer.lock().unwrap().state)
    }
}
