//! Rebuilding a collection's generation without blocking readers and without
//! losing concurrent writes: compaction (a new file holding only live
//! records) and resharding (a new index with more shards over the same file).
//!
//! 1. Note the log's tail `t0` (under the writer lock) and copy every index
//!    entry that points below `t0` into the new generation — for compaction
//!    its record goes into a new file `<name>.dhrt.compact`, skipping
//!    tombstones older than the grace period, and the file is fsynced.
//!    Readers and writers carry on against the old generation meanwhile.
//! 2. Catch up with the records written since `t0` outside the writer
//!    lock: replay them into the new index (compaction copies them into the
//!    new file first), round after round, until what is left is at most
//!    [`LOCKED_CATCH_UP_BYTES`].
//! 3. Under the writer lock: replay that rest (compaction then fsyncs the
//!    new file, renames it over the old one and fsyncs the directory), and
//!    swap the generation in. If writers outran the last round and more
//!    than the bound is left, the lock is let go and step 2 runs again;
//!    once a round outside the lock ends further behind than the one
//!    before (the writers are faster than the catch-up), only bounded steps
//!    under the lock follow, with a pause between them for the waiting
//!    writers: each step gains on them, so the rebuild finishes under any
//!    load. A writer waits at most for one bounded step, never for work
//!    that grows with the collection. Readers holding the old generation
//!    finish against the old map.

use std::path::Path;
use std::sync::Arc;

use crate::Options;
use crate::collection::{self, COMPACT_SUFFIX, Collection, Generation, State};
use crate::error::{Error, Result};
use crate::index::{Builder, Index, Slot};
use crate::log::{self, LogFile};
use crate::record::{self, Decoded, Kind};

use crate::version::wall_ms;

/// What one compaction did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactionReport {
    /// File length before, in bytes.
    pub bytes_before: u64,
    /// File length after, in bytes.
    pub bytes_after: u64,
    /// Records in the new file.
    pub records: u64,
    /// Tombstones (and drop markers) purged because their grace had passed.
    pub purged_tombstones: u64,
    /// Records written while phase 1 ran and copied in the catch-up.
    pub caught_up: u64,
    /// Of those, the records replayed while the writer lock was held (what
    /// a writer could wait for): at most [`LOCKED_CATCH_UP_BYTES`] of them,
    /// unless writers outran the catch-up for many rounds.
    pub locked_records: u64,
    /// Records that failed their checksum and were left out (their keys
    /// read as missing until a replica's copy is applied).
    pub damaged: u64,
}

const FLUSH_AT: usize = 1 << 20;

/// A compaction hands its new file to the disk every this many bytes and
/// then waits for the stretch before, so that at most about twice this of
/// it is dirty at a time.
const WRITE_BEHIND: u64 = 8 << 20;

/// Write-behind for the bulk copy of a compaction (as RocksDB's
/// `bytes_per_sync`). Left to the kernel, the copy piles up gigabytes of
/// dirty pages, flushed in bursts that fill the disk's queue: the log's
/// own I/O (a block bitmap its reservation reads, its fsync) then waits
/// behind them, some of it under the writer lock, and once the dirty limit
/// is near every writer of the machine is throttled. Paced, the copy runs
/// at the disk's speed and the queue holds at most two stretches of it.
struct WriteBehind {
    /// Where the stretch handed to the disk last starts.
    started: u64,
    /// Everything below this is written back.
    done: u64,
}

impl WriteBehind {
    fn new(at: u64) -> WriteBehind {
        WriteBehind {
            started: at,
            done: at,
        }
    }

    /// After an append to `log`: once a stretch of [`WRITE_BEHIND`] is
    /// written, starts its write-back and waits for the one before.
    fn wrote(&mut self, log: &LogFile) -> std::io::Result<()> {
        let tail = log.tail();
        if tail - self.started < WRITE_BEHIND {
            return Ok(());
        }
        log.write_back(self.started, tail, false)?;
        log.write_back(self.done, self.started, true)?;
        self.done = self.started;
        self.started = tail;
        Ok(())
    }
}

/// Bits of an entry's CRC a compaction checks against the record it copies
/// (all that fit in a word beside an offset of `OFFSET_BITS`).
const CRC_CHECK_BITS: u32 = 64 - crate::index::OFFSET_BITS;
const CRC_CHECK_MASK: u32 = (1 << CRC_CHECK_BITS) - 1;

fn pack(offset: u64, crc: u32) -> u64 {
    offset << CRC_CHECK_BITS | u64::from(crc & CRC_CHECK_MASK)
}

fn unpack(packed: u64) -> (u64, u32) {
    (packed >> CRC_CHECK_BITS, packed as u32 & CRC_CHECK_MASK)
}

/// Bytes of racing writes a rebuild replays in one hold of the writer lock,
/// at most (plus the record that crosses the bound): what a writer can wait
/// for. The rest is caught up outside the lock.
pub const LOCKED_CATCH_UP_BYTES: u64 = 256 << 10;

/// Rounds of catching up outside the lock, chasing the writers, before a
/// rebuild gains on them with one bounded step under the lock.
const OUTSIDE_ROUNDS: u32 = 8;

/// Catches up outside the writer lock, from `from` to what the log has
/// applied, until at most [`LOCKED_CATCH_UP_BYTES`] is left, the rounds
/// run out, or a round would start further behind than the last one did:
/// the writers outrun it, and more rounds would only fall further behind.
/// Once they have (`outrun`, set here and kept by the caller), it only
/// pauses [`BETWEEN_LOCKED_STEPS`] for the waiting writers: the rest is
/// caught up in bounded steps under the lock. `step(from, upto)` does one
/// round and says where it ended (`None`: a record failed its check).
/// Returns where it got to.
fn catch_up_outside(
    old: &LogFile,
    mut from: u64,
    outrun: &mut bool,
    mut step: impl FnMut(u64, u64) -> Result<Option<u64>>,
) -> Result<Option<u64>> {
    if *outrun {
        std::thread::sleep(BETWEEN_LOCKED_STEPS);
        return Ok(Some(from));
    }
    let mut behind = u64::MAX;
    for _ in 0..OUTSIDE_ROUNDS {
        let upto = old.applied();
        let gap = upto.saturating_sub(from);
        if gap <= LOCKED_CATCH_UP_BYTES {
            break;
        }
        if gap >= behind {
            *outrun = true;
            break;
        }
        behind = gap;
        match step(from, upto)? {
            Some(end) => from = end,
            None => return Ok(None),
        }
    }
    Ok(Some(from))
}

/// Bounded steps after which the gap must have shrunk, or the next ones
/// are twice as large.
const STEPS_WITHOUT_GAIN: u32 = 128;

/// How much each of a compaction's bounded steps under the writer lock
/// catches up, once the writers outran its rounds outside it. Steps of
/// [`LOCKED_CATCH_UP_BYTES`] gain on writers that append less than that
/// while the lock is let go; writers that append more each time (a batch
/// combined from many clients' pipelined writes, or all they wrote while
/// the new file was synced between steps) outrun them for good, and the
/// log grows until the disk is full: two clients of 32 connections with
/// 64 SETs in flight each, over 400k keys, grew it to 12.9 GB in 90 s,
/// the compaction finishing only once they stopped. So when the gap has
/// not shrunk over [`STEPS_WITHOUT_GAIN`] steps, the next ones are twice
/// as large, up to `Options::rebuild_step_max`: writers then wait for
/// longer steps, only while they outrun the compaction, and it ends.
#[derive(Debug)]
struct Steps {
    limit: u64,
    max: u64,
    /// The gap when the current run of steps began, and its steps so far.
    window: (u64, u32),
}

impl Steps {
    fn new(max: u64) -> Steps {
        Steps {
            limit: LOCKED_CATCH_UP_BYTES,
            max,
            window: (u64::MAX, 0),
        }
    }

    /// The limit of the next step, `gap` bytes behind the writers.
    fn next(&mut self, gap: u64) -> u64 {
        let (began, steps) = self.window;
        self.window = match steps {
            0 => (gap, 1),
            n if n < STEPS_WITHOUT_GAIN => (began, n + 1),
            _ => {
                if gap >= began {
                    self.limit = (self.limit * 2).min(self.max).max(self.limit);
                }
                (gap, 1)
            }
        };
        self.limit
    }
}

/// In bounded steps, a compaction syncs its new file before taking the
/// lock only once this much is unsynced (or the step may be the last).
const SYNC_BETWEEN_STEPS_EVERY: u64 = 8 << 20;

/// Between two bounded steps under the writer lock, once the writers
/// outran the catch-up outside it: long enough for waiting writers to take
/// the lock, so that they go on (at most one step behind) while the steps
/// gain on them.
const BETWEEN_LOCKED_STEPS: std::time::Duration = std::time::Duration::from_micros(200);

/// The records of `old` from `from` up to `upto`, stopping after the one
/// that crosses `from + limit`: replayed into `index` and `state`; for a
/// compaction (`into`) copied to the end of the new log first. How many,
/// and where they end; `None` if one fails its check.
fn catch_up(
    old: &LogFile,
    (from, upto, limit): (u64, u64, u64),
    into: Option<&LogFile>,
    index: &Index,
    state: &mut State,
) -> Result<Option<(u64, u64)>> {
    if upto <= from {
        return Ok(Some((0, from)));
    }
    let map = old.map();
    let Some((starts, len)) = caught_up_records(&map[from as usize..upto as usize], limit) else {
        return Ok(None);
    };
    let end = from + len as u64;
    let Some(new_log) = into else {
        return Ok(Some((replay_since(index, state, &starts, &map, from), end)));
    };
    let base = new_log.tail();
    new_log
        .append(&map[from as usize..end as usize])
        .map_err(|e| {
            let path = new_log.path().unwrap_or(Path::new("(memory)"));
            Error::io("write", path.to_path_buf(), e)
        })?;
    let new_map = new_log.map();
    for &start in &starts {
        let at = base + start as u64;
        new_log.note_checkpoint(record::peek_header(&new_map[at as usize..]).seq, at);
    }
    Ok(Some((
        replay_since(index, state, &starts, &new_map, base),
        end,
    )))
}

fn poisoned(coll: &Collection, cause: String) -> Error {
    Error::Poisoned {
        collection: coll.name.clone(),
        cause,
    }
}

/// Compacts `coll`. Only one rebuild of a collection runs at a time.
/// Gives up (`Ok(None)`, the new file deleted, the collection as it was)
/// once `stopping()` says so: a node told to stop does not wait for a
/// compaction of its whole log, which can take minutes.
pub(crate) fn compact(
    coll: &Collection,
    dir: Option<&Path>,
    options: &Options,
    hold_from_ms: u64,
    stopping: &dyn Fn() -> bool,
) -> Result<Option<CompactionReport>> {
    let _only_one = coll.rebuilding.lock().unwrap();
    let old = coll.current.load_full();
    if let Some(cause) = old.log.poisoned() {
        return Err(poisoned(coll, cause));
    }
    let (t0, t0_seq, st) = coll.tail_and_state(&old.log);
    let (dropped_at, drop_offset, keys) =
        (st.dropped_at, st.drop_offset, st.live_keys + st.tombstones);
    let purge_before_ms = purge_before_ms(options, hold_from_ms);
    let tmp_path = dir.map(|d| d.join(format!("{}{COMPACT_SUFFIX}", coll.name)));
    let io_err = |op, e| Error::io(op, tmp_path.clone().unwrap_or_else(|| "(memory)".into()), e);
    let mut report = CompactionReport {
        bytes_before: t0,
        ..Default::default()
    };
    // Where the records that failed their checksums were.
    let mut damaged = std::collections::HashSet::new();

    let result = (|| {
        // Phase 1: choose what to copy: what the index points at below t0
        // (and the drop record), less the tombstones past their grace. The
        // new file holds them in log order, which is seq order, so that a
        // watcher can find its place in it (see `feed.rs`).
        let old_map = old.log.map();
        let old_header = old.log.header();
        let mut purged_seq = old_header.purged_seq;
        // The seq of the record at `offset`; if its header is damaged, the
        // greatest seq it can have.
        let seq_at = |offset: u64| {
            record::parse_header(&old_map[offset as usize..t0 as usize]).map_or(t0_seq, |h| h.seq)
        };
        // Each record to copy, as its offset and the low bits of the CRC
        // its entry kept, in one word (sorted, they are in log order): a
        // record whose stored CRC differs is not the one the index wrote
        // there (another record copied over it) and is dropped as damage.
        let mut offsets: Vec<u64> = Vec::with_capacity(keys as usize + 1);
        let mut kept_drop = None;
        if let Some(d) = dropped_at {
            if d.physical_ms() >= purge_before_ms {
                // No entry kept a drop's CRC: its record is checked
                // against itself (its own CRC check still applies).
                let crc = record::stored_crc(&old_map[drop_offset as usize..t0 as usize]);
                offsets.push(pack(drop_offset, crc));
                kept_drop = Some(d);
            } else {
                purged_seq = purged_seq.max(seq_at(drop_offset));
                report.purged_tombstones += 1;
            }
        }
        for shard in old.index.shards() {
            let guard = &crossbeam_epoch::pin();
            let mut cursor = shard.front(guard);
            while let Some(entry) = cursor {
                let slot = entry.value().load();
                cursor = entry.next();
                let offset = slot.offset();
                if offset >= t0 {
                    continue;
                }
                if slot.is_tombstone() && slot.version().physical_ms() < purge_before_ms {
                    purged_seq = purged_seq.max(seq_at(offset));
                    report.purged_tombstones += 1;
                    continue;
                }
                offsets.push(pack(offset, slot.crc()));
            }
        }
        offsets.sort_unstable();

        let header = record::FileHeader {
            history: old_header.history,
            purged_seq,
        };
        let new_log = LogFile::create(tmp_path.as_deref(), &coll.name, header)
            .map_err(|e| io_err("create", e))?;
        #[cfg(test)]
        if coll
            .fail_compaction_write_back
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            new_log
                .fail_next_write_back
                .store(true, std::sync::atomic::Ordering::Release);
        }
        let mut index = Builder::new(
            options.shards_for(keys).max(old.index.shard_count()),
            options.shard_array_max,
        );
        let mut state = State::default();
        let mut out = Vec::with_capacity(FLUSH_AT + 4096);
        let mut base = new_log.tail();
        let mut behind = WriteBehind::new(base);
        for packed in offsets {
            let (offset, crc_bits) = unpack(packed);
            let bytes = &old_map[offset as usize..t0 as usize];
            let decoded = match record::decode(bytes) {
                Decoded::Record { header, key, .. }
                    if record::stored_crc(bytes) & CRC_CHECK_MASK == crc_bits =>
                {
                    Some((header, key))
                }
                _ => None,
            };
            let Some((header, key)) = decoded else {
                // Damaged since it was written: left out of the new
                // file and index (and so of the digest), as a
                // quarantine would; a replica's copy restores it.
                crate::verify::report_unreadable_pages();
                tracing::error!(
                    collection = %coll.name,
                    offset,
                    "a record failed its checksum during compaction; dropping it"
                );
                coll.quarantined
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                report.damaged += 1;
                damaged.insert(offset);
                continue;
            };
            let new_offset = base + out.len() as u64;
            out.extend_from_slice(&bytes[..header.record_len()]);
            new_log.note_checkpoint(header.seq, new_offset);
            report.records += 1;
            let version = header.version;
            if header.kind == Kind::Drop {
                state.dropped_at = kept_drop;
                state.drop_offset = new_offset;
                state.oldest_tombstone_ms = state.oldest_tombstone_ms.min(version.physical_ms());
            } else {
                let tombstone = header.kind == Kind::Tombstone;
                let crc = record::stored_crc(bytes);
                let slot = Slot::new(new_offset, tombstone, version, crc, header.value_len);
                index.insert(key, slot);
                if tombstone {
                    state.tombstones += 1;
                    state.oldest_tombstone_ms =
                        state.oldest_tombstone_ms.min(version.physical_ms());
                } else {
                    state.live_keys += 1;
                }
            }
            if out.len() >= FLUSH_AT {
                if stopping() {
                    return Ok(false);
                }
                new_log.append(&out).map_err(|e| io_err("write", e))?;
                behind
                    .wrote(&new_log)
                    .map_err(|e| io_err("write back", e))?;
                base = new_log.tail();
                out.clear();
            }
        }
        new_log.append(&out).map_err(|e| io_err("write", e))?;
        let index = index.finish();

        // Phases 2 and 3: catch up with the writes since t0, outside the
        // lock, then the last of them under it, and swap.
        let checksum = || Error::Checksum {
            collection: coll.name.clone(),
            offset: t0,
        };
        let mut from = t0;
        let mut synced = 0;
        let mut parts = Some((index, new_log));
        let mut outrun = false;
        let mut steps = Steps::new(options.rebuild_step_max);
        loop {
            if stopping() {
                return Ok(false);
            }
            let (index, new_log) = parts.as_ref().expect("until swapped");
            from = catch_up_outside(&old.log, from, &mut outrun, |from, upto| {
                let n = catch_up(
                    &old.log,
                    (from, upto, u64::MAX),
                    Some(new_log),
                    index,
                    &mut state,
                )?;
                report.caught_up += n.map_or(0, |(n, _)| n);
                Ok(n.map(|(_, end)| end))
            })?
            .ok_or_else(checksum)?;
            // Most of the file is synced before the lock is taken. In
            // bounded steps, only every few MiB or when the step may be the
            // last: a sync per step would give the writers that long to
            // write more, and the steps might never gain on them.
            let unsynced = new_log.tail() - synced;
            let gap = old.log.applied().saturating_sub(from);
            let limit = match outrun {
                true => steps.next(gap),
                false => LOCKED_CATCH_UP_BYTES,
            };
            let last = gap <= limit;
            if !outrun || last || unsynced >= SYNC_BETWEEN_STEPS_EVERY {
                new_log.sync_all().map_err(|cause| poisoned(coll, cause))?;
                synced = new_log.tail();
            }
            let swapped = coll.with_writer(|live_state| {
                let tail = old.log.tail();
                let (index, new_log) = parts.as_ref().expect("until swapped");
                let (n, end) = catch_up(
                    &old.log,
                    (from, tail, limit),
                    Some(new_log),
                    index,
                    &mut state,
                )?
                .ok_or_else(checksum)?;
                report.caught_up += n;
                report.locked_records = report.locked_records.max(n);
                from = end;
                if end < tail {
                    // Writers outran the catch-up: that bounded step
                    // gained on them; the rest is caught up outside again,
                    // or, if the writers outrun that, in more such steps.
                    return Ok(false);
                }
                let (index, mut new_log) = parts.take().expect("until swapped");
                report.records += report.caught_up;
                new_log.sync_all().map_err(|cause| poisoned(coll, cause))?;
                if let (Some(dir), Some(tmp)) = (dir, &tmp_path) {
                    let final_path = Collection::log_path(dir, &coll.name);
                    // Before the rename, the watermark must suit both files a
                    // crash may leave under the name, and the old file's late
                    // syncs must no longer raise it.
                    if let Some(w) = old.log.watermark() {
                        w.begin_swap(new_log.id(), new_log.tail()).map_err(|e| {
                            Error::io("write", crate::watermark::path_for(&final_path), e)
                        })?;
                    }
                    if let Err(e) = std::fs::rename(tmp, &final_path) {
                        if let Some(w) = old.log.watermark() {
                            w.abort_swap(old.log.id());
                        }
                        return Err(io_err("rename", e));
                    }
                    log::sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))?;
                    new_log.set_path(final_path);
                    if let Some(w) = old.log.watermark() {
                        new_log.set_watermark(w.clone());
                        // Every byte of the new file was synced above.
                        w.advance(new_log.id(), new_log.tail());
                    }
                }
                #[cfg(test)]
                if let Some((paused, resume)) = coll.pause_compaction.lock().unwrap().take() {
                    paused.send(()).unwrap();
                    resume.recv().unwrap();
                }
                report.bytes_after = new_log.tail();
                new_log.mark_applied(new_log.tail());
                coll.current.store(Arc::new(Generation {
                    index,
                    log: Arc::new(new_log),
                }));
                *live_state = state;
                Ok(true)
            })?;
            if swapped {
                return Ok(true);
            }
        }
    })();

    if !matches!(result, Ok(true))
        && let Some(tmp) = &tmp_path
    {
        let _ = std::fs::remove_file(tmp);
    }
    match result {
        Ok(true) => {
            if !damaged.is_empty() {
                // Their keys read as damaged, as a read's quarantine
                // makes them: the old index still points at the records
                // (a key written since points past t0, and is not).
                let mut keys = Vec::new();
                old.index.for_each(|k, s| {
                    if damaged.contains(&s.offset()) {
                        keys.push(k.as_bytes().to_vec());
                    }
                });
                coll.note_quarantined(keys);
            }
            collection::retire(old)
        }
        Ok(false) if report.damaged > 0 => {
            // Given up after meeting damaged records still in the file:
            // they are not forgotten (the store's close compacts them
            // out), nor counted twice.
            coll.quarantined
                .fetch_sub(report.damaged, std::sync::atomic::Ordering::Relaxed);
            coll.compact_requested
                .store(true, std::sync::atomic::Ordering::Release);
        }
        _ => {}
    }
    result.map(|swapped| swapped.then_some(report))
}

/// Gives `coll` an index of `shards` shards over the same log. Returns the
/// most records replayed in one hold of the writer lock. Gives up, leaving
/// the index as it was, once `stop()` says so (the store is closing).
pub(crate) fn reshard(
    coll: &Collection,
    shards: usize,
    array_max: usize,
    stop: &dyn Fn() -> bool,
) -> u64 {
    let _only_one = coll.rebuilding.lock().unwrap();
    let old = coll.current.load_full();
    if old.index.shard_count() >= shards || stop() {
        return 0;
    }
    // Quarantines from now on are noted for the swap (see below). The
    // counters are taken with t0: the catch-up replays into a copy of them
    // from where the copy of the index starts (taken later, they could
    // already hold a drop written during the copy, which the catch-up
    // would then skip, bringing the keys it dropped back).
    let (t0, mut scratch) = coll.with_writer(|state| {
        *coll.resharding_quarantines.lock().unwrap() = Some(Some(Vec::new()));
        (old.log.tail(), *state)
    });
    struct Noting<'a>(&'a Collection);
    impl Drop for Noting<'_> {
        fn drop(&mut self) {
            *self.0.resharding_quarantines.lock().unwrap() = None;
        }
    }
    let _noting = Noting(coll);
    // The copy reads only the index, not the log: its digest is the live
    // index's, taken at the swap.
    let mut index = Builder::new(shards, array_max);
    for shard in old.index.shards() {
        let guard = &crossbeam_epoch::pin();
        let mut cursor = shard.front(guard);
        while let Some(entry) = cursor {
            let slot = entry.value().load();
            if slot.offset() < t0 {
                index.insert_undigested(entry.key().as_bytes(), slot);
            }
            cursor = entry.next();
        }
    }
    let index = index.finish();
    #[cfg(test)]
    std::thread::sleep(std::time::Duration::from_millis(
        coll.slow_catch_up_ms
            .load(std::sync::atomic::Ordering::Relaxed),
    ));
    let abandon = || {
        tracing::error!(
            collection = %coll.name,
            "a record written during the index rebuild failed its checksum: rebuild abandoned"
        );
    };
    let (mut from, mut locked_max) = (t0, 0);
    let mut index = Some(index);
    let mut outrun = false;
    loop {
        if stop() {
            return locked_max;
        }
        let new = index.as_ref().expect("until swapped");
        let caught = catch_up_outside(&old.log, from, &mut outrun, |from, upto| {
            #[cfg(test)]
            std::thread::sleep(std::time::Duration::from_millis(
                coll.slow_catch_up_ms
                    .load(std::sync::atomic::Ordering::Relaxed),
            ));
            let n = catch_up(&old.log, (from, upto, u64::MAX), None, new, &mut scratch)?;
            Ok(n.map(|(_, end)| end))
        });
        from = match caught {
            Ok(Some(at)) => at,
            _ => {
                abandon();
                return locked_max;
            }
        };
        #[cfg(test)]
        if let Some((paused, resume)) = coll.pause_reshard.lock().unwrap().take() {
            paused.send(()).unwrap();
            resume.recv().unwrap();
        }
        let swapped = coll.with_writer(|_| {
            let tail = old.log.tail();
            let new = index.as_ref().expect("until swapped");
            let step = catch_up(
                &old.log,
                (from, tail, LOCKED_CATCH_UP_BYTES),
                None,
                new,
                &mut scratch,
            );
            let Ok(Some((n, end))) = step else {
                abandon();
                return true;
            };
            locked_max = locked_max.max(n);
            from = end;
            if end < tail {
                return false;
            }
            // Keys quarantined since the copy was taken (the same damaged
            // bytes would come back with it): dropped from it too, unless
            // a newer record was written since (caught up in both).
            let Some(quarantined) = coll.resharding_quarantines.lock().unwrap().take().flatten()
            else {
                tracing::warn!(
                    collection = %coll.name,
                    "too many records quarantined during the index rebuild: rebuild abandoned"
                );
                return true;
            };
            for key in quarantined {
                if old.index.get(&key).is_none() && new.get(&key).is_some() {
                    new.remove_damaged(&key);
                }
            }
            // Caught up to the tail, the two hold the same entries.
            new.take_digest_of(&old.index);
            coll.current.store(Arc::new(Generation {
                index: index.take().expect("until swapped"),
                log: old.log.clone(),
            }));
            true
        });
        if swapped {
            collection::retire(old);
            return locked_max;
        }
    }
}

/// The offsets (relative to the start of `caught`) of its records, up to
/// the one that crosses `limit`, and the length they cover; `None` if one
/// fails its check (bytes written since the rebuild began were damaged in
/// the file meanwhile): the rebuild is then abandoned.
fn caught_up_records(caught: &[u8], limit: u64) -> Option<(Vec<usize>, usize)> {
    let mut starts = Vec::new();
    let mut pos = 0;
    while pos < caught.len() && (pos as u64) < limit {
        let Decoded::Record { header, .. } = record::decode(&caught[pos..]) else {
            return None;
        };
        starts.push(pos);
        pos += header.record_len();
    }
    Some((starts, pos))
}

/// Applies the records at `starts` (offsets from `base` in `map`) to `index`.
fn replay_since(index: &Index, state: &mut State, starts: &[usize], map: &[u8], base: u64) -> u64 {
    for &start in starts {
        let at = &map[base as usize + start..];
        collection::apply_record(index, state, map, at, base + start as u64, None);
    }
    starts.len() as u64
}

/// Tombstones (and a drop record) stamped before this are purged: those
/// past their grace period, but none stamped at or after `hold_from_ms`
/// (see `Store::hold_tombstones_from`).
pub(crate) fn purge_before_ms(options: &Options, hold_from_ms: u64) -> u64 {
    wall_ms()
        .saturating_sub(options.tombstone_grace.as_millis() as u64)
        .min(hold_from_ms)
}

/// Whether `state` and a file of `len` bytes call for a compaction now.
pub(crate) fn is_due(state: &State, len: u64, options: &Options, hold_from_ms: u64) -> bool {
    let garbage = len >= options.compaction_min_bytes
        && state.garbage as f64 > options.compaction_garbage_ratio * len as f64;
    let purge = state.oldest_tombstone_ms != u64::MAX
        && state.oldest_tombstone_ms < purge_before_ms(options, hold_from_ms);
    garbage || purge
}

/// The shard count `coll` should be rebuilt with, if it has outgrown its
/// index.
pub(crate) fn reshard_due(state: &State, shards: usize, options: &Options) -> Option<usize> {
    let keys = state.live_keys + state.tombstones;
    let limit = (shards * options.keys_per_shard.max(1) * 2) as u64;
    (keys > limit && shards < 1 << 20).then(|| options.shards_for(keys) * 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps stay at the bound while they gain on the writers, however
    /// unevenly (a sync between steps sets them back now and then), and
    /// double while they do not, up to the most.
    #[test]
    fn locked_steps_grow_only_while_the_writers_outrun_them() {
        const MAX: u64 = 16 << 20;
        let mut steps = Steps::new(MAX);
        let mut gap = 1u64 << 30;
        for i in 0..1000 {
            gap = if i % 20 == 19 {
                gap + (1 << 20)
            } else {
                gap - (1 << 17)
            };
            assert_eq!(steps.next(gap), LOCKED_CATCH_UP_BYTES, "step {i}");
        }
        // Outrun: the gap only grows. Twice the step at the end of each
        // run of steps, up to the most.
        let mut limits = Vec::new();
        for _ in 0..STEPS_WITHOUT_GAIN * 12 {
            gap += 1 << 20;
            limits.push(steps.next(gap));
        }
        assert!(limits.contains(&(LOCKED_CATCH_UP_BYTES * 2)), "{limits:?}");
        let first = limits.iter().position(|&l| l > LOCKED_CATCH_UP_BYTES);
        assert!(
            first.unwrap() <= STEPS_WITHOUT_GAIN as usize * 2,
            "{limits:?}"
        );
        assert_eq!(*limits.last().unwrap(), MAX);
        // Gaining again: the step stays as large as it had to be.
        gap -= MAX / 2;
        assert_eq!(steps.next(gap), MAX);
        // A most below the bound never shrinks the steps.
        let mut steps = Steps::new(1 << 10);
        for i in 0..100 {
            assert_eq!(steps.next(i << 20), LOCKED_CATCH_UP_BYTES);
        }
    }
}
