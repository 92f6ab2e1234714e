//! One collection's append-only log file: appends, the read map, group commit
//! and the poison flag.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::mmap;
use crate::record::{self, FILE_HEADER_LEN, FileHeader};
use crate::watermark::{self, Watermark};

/// The index packs offsets into 46 bits.
const MAX_LOG_LEN: u64 = 1 << crate::index::OFFSET_BITS;

/// A checkpoint (seq, offset) is kept about every this many bytes of log
/// (recovery adds one where each of its stretches starts), so finding where
/// a seq starts reads at most this much past one.
pub(crate) const CHECKPOINT_EVERY: u64 = 64 << 10;

/// Smallest map; the address space is reserved, not memory.
const MIN_CAPACITY: u64 = 64 << 20;

fn capacity_for(len: u64) -> u64 {
    (len * 2).next_power_of_two().max(MIN_CAPACITY)
}

#[derive(Debug, Default)]
struct SyncState {
    /// Everything below this offset is on stable storage.
    synced: u64,
    /// A thread is running `fdatasync` right now.
    in_progress: bool,
    /// Set by a failed fsync; never cleared.
    poisoned: Option<String>,
}

/// How appends reach the file: always `pwrite`, into space reserved ahead
/// with `fallocate` where the file system can. (Copying records into a
/// shared writable map instead saved the system call but cost a page fault
/// per new page of the log, each marking ext4's unwritten blocks written:
/// a 10M-key sequential load ran at 383-395k SET/s with a p99 of 7.9-8.0 ms
/// that way, and at 459-602k SET/s with a p99 of 3.3-4.4 ms with `pwrite`.)
#[derive(Debug)]
enum Appender {
    /// Within reserved space.
    Reserved {
        /// The file's length: blocks up to here are allocated.
        reserved: u64,
    },
    /// Extending the file (memory mode, and file systems without
    /// `fallocate`).
    Extending,
}

const PAGE: u64 = 4096;

/// Whether `e` says the disk (or the quota) is full.
pub(crate) fn is_full(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Space reserved ahead of the tail at a time: an eighth of the log, from
/// 64 KiB to 32 MiB, so that reservations are rare and unused space small
/// (also for many small collections). While the disk is full (`lean`), 64
/// KiB: the room is for compactions, and deletes need little.
fn reservation_after(end: u64, lean: bool) -> u64 {
    let chunk = match lean {
        true => LEAN_AHEAD,
        false => (end / 8).clamp(64 << 10, 32 << 20),
    };
    (end + chunk).div_ceil(PAGE) * PAGE
}

/// What a log keeps reserved past its tail while the disk is full: room for
/// a few thousand tombstones.
const LEAN_AHEAD: u64 = 64 << 10;

/// An append-only log, read through a shared map by anyone. Appends, under
/// the collection's writer lock, are written with `pwrite`, into space
/// reserved ahead with `fallocate` where that is possible (not in memory
/// mode, nor on a file system without `fallocate`).
#[derive(Debug)]
pub(crate) struct LogFile {
    file: File,
    /// `None` for a memfd (memory mode).
    path: Option<PathBuf>,
    map: ArcSwap<Bytes>,
    appender: Mutex<Appender>,
    /// End of the last complete record written.
    tail: AtomicU64,
    /// End of the records the index already reflects: watchers read below
    /// it (a record between it and the tail may not be in the index yet).
    applied: AtomicU64,
    /// Lock-free copy of `SyncState::synced`.
    synced: AtomicU64,
    /// What the file header says.
    header: FileHeader,
    /// Sparse (seq, offset) pairs, both increasing: where to start looking
    /// for the first record after a seq.
    checkpoints: Mutex<Vec<(u64, u64)>>,
    sync: Mutex<SyncState>,
    synced_cv: Condvar,
    /// Identifies this file to the collection's watermark.
    id: u64,
    /// The disk is full: reserve little ahead (see [`reservation_after`]).
    lean: std::sync::atomic::AtomicBool,
    /// Where successful fsyncs are recorded; `None` in memory mode and for
    /// a compaction's file until it is published.
    watermark: Option<Arc<Watermark>>,
    /// Successful `fdatasync`s of this file.
    fdatasyncs: AtomicU64,
    /// Calls of [`LogFile::write_back`] that reached the file.
    #[cfg(test)]
    write_backs: AtomicU64,
    /// Makes the next write-back fail with EIO.
    #[cfg(test)]
    pub(crate) fail_next_write_back: std::sync::atomic::AtomicBool,
    /// Makes the next fsync fail, to test poisoning.
    #[cfg(test)]
    pub(crate) fail_next_sync: std::sync::atomic::AtomicBool,
    /// Makes the next reservation fail with this OS error, to test the
    /// fallbacks.
    #[cfg(test)]
    pub(crate) fail_next_reserve: std::sync::atomic::AtomicI32,
    /// Where the disk ends for this file (0: nowhere): a reservation past
    /// it fails with ENOSPC, as on a nearly full disk.
    #[cfg(test)]
    pub(crate) disk_end: AtomicU64,
    /// Makes the next write fail with EIO after writing this many bytes.
    #[cfg(test)]
    pub(crate) fail_next_write: Mutex<Option<usize>>,
}

impl LogFile {
    /// Creates a new log holding only the file header: at `path` (replacing
    /// any file there) or, with `None`, in memory.
    pub(crate) fn create(
        path: Option<&Path>,
        name: &str,
        header: FileHeader,
    ) -> io::Result<LogFile> {
        let file = match path {
            Some(p) => OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)?,
            None => mmap::memfd(name)?,
        };
        #[cfg(test)]
        if FAIL_HEADER_WRITE.with(|f| f.replace(false)) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.write_all_at(&record::file_header(header), 0)?;
        let mut log = LogFile::with_file(
            file,
            path.map(Path::to_path_buf),
            FILE_HEADER_LEN as u64,
            header,
        )?;
        // Not even the header is durable yet: the first sync makes it so
        // (a collection's watermark is written only after that).
        if path.is_some() {
            *log.synced.get_mut() = 0;
            log.sync.get_mut().unwrap().synced = 0;
        }
        Ok(log)
    }

    /// Wraps an existing file whose first `len` bytes are valid records
    /// (and nothing follows them).
    pub(crate) fn with_file(
        file: File,
        path: Option<PathBuf>,
        len: u64,
        header: FileHeader,
    ) -> io::Result<LogFile> {
        let capacity = capacity_for(len) as usize;
        let map = mmap::map(&file, capacity)?;
        let appender = match path {
            Some(_) => Appender::Reserved { reserved: len },
            None => Appender::Extending,
        };
        Ok(LogFile {
            file,
            path,
            map: ArcSwap::from_pointee(map),
            appender: Mutex::new(appender),
            tail: AtomicU64::new(len),
            applied: AtomicU64::new(len),
            synced: AtomicU64::new(len),
            header,
            checkpoints: Mutex::new(Vec::new()),
            sync: Mutex::new(SyncState {
                synced: len,
                ..SyncState::default()
            }),
            synced_cv: Condvar::new(),
            id: watermark::next_log_id(),
            lean: std::sync::atomic::AtomicBool::new(false),
            watermark: None,
            fdatasyncs: AtomicU64::new(0),
            #[cfg(test)]
            write_backs: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_write_back: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_sync: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            fail_next_reserve: std::sync::atomic::AtomicI32::new(0),
            #[cfg(test)]
            disk_end: AtomicU64::new(0),
            #[cfg(test)]
            fail_next_write: Mutex::new(None),
        })
    }

    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    pub(crate) fn is_memory(&self) -> bool {
        self.path.is_none()
    }

    /// End of the last complete record.
    pub(crate) fn tail(&self) -> u64 {
        self.tail.load(Ordering::Acquire)
    }

    /// What the file header says.
    pub(crate) fn header(&self) -> FileHeader {
        self.header
    }

    /// End of the records the index reflects (see [`Self::mark_applied`]).
    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Says that the index reflects every record below `end`. Called under
    /// the writer lock after the index was updated.
    pub(crate) fn mark_applied(&self, end: u64) {
        self.applied.store(end, Ordering::Release);
    }

    /// Everything below this offset is known to be on stable storage.
    pub(crate) fn synced(&self) -> u64 {
        self.synced.load(Ordering::Acquire)
    }

    /// Notes that the record with `seq` starts at `offset` (records are
    /// appended in seq order); kept if it is far enough past the last one.
    pub(crate) fn note_checkpoint(&self, seq: u64, offset: u64) {
        let mut cps = self.checkpoints.lock().unwrap();
        if cps
            .last()
            .is_none_or(|&(_, last)| offset >= last + CHECKPOINT_EVERY)
        {
            cps.push((seq, offset));
        }
    }

    /// Replaces the checkpoints (recovery found them).
    pub(crate) fn set_checkpoints(&mut self, checkpoints: Vec<(u64, u64)>) {
        *self.checkpoints.get_mut().unwrap() = checkpoints;
    }

    /// Where to start reading to find the first record with a seq greater
    /// than `seq`: the last checkpoint at or below it (or the first record).
    pub(crate) fn checkpoint_before(&self, seq: u64) -> u64 {
        let cps = self.checkpoints.lock().unwrap();
        let i = cps.partition_point(|&(s, _)| s <= seq);
        if i == 0 {
            FILE_HEADER_LEN as u64
        } else {
            cps[i - 1].1
        }
    }

    /// The current map. Only ranges below [`tail`](Self::tail) as read
    /// *before* the map was loaded may be read.
    #[inline]
    pub(crate) fn map(&self) -> arc_swap::Guard<std::sync::Arc<Bytes>> {
        self.map.load()
    }

    /// Appends `buf` at the tail; returns the offset it was written at.
    /// Callers serialize appends (the collection's writer lock). On error
    /// nothing of `buf` is in the log, nor in the file: a failed
    /// reservation or map writes nothing, and the file is cut back to the
    /// old tail after a failed `pwrite` (which may have written part of
    /// `buf`: whole records of a batch reported failed must not come back
    /// after a crash).
    pub(crate) fn append(&self, buf: &[u8]) -> io::Result<u64> {
        let offset = self.tail.load(Ordering::Relaxed);
        let end = offset + buf.len() as u64;
        if end > MAX_LOG_LEN {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "log would exceed 64 TiB; compact or split the collection",
            ));
        }
        let mut appender = self.appender.lock().unwrap();
        if let Appender::Reserved { reserved } = &mut *appender {
            if end > *reserved {
                let mut want = reservation_after(end, self.lean.load(Ordering::Relaxed));
                let mut result = self.reserve(*reserved, want);
                // A nearly full disk: no room for the headroom, maybe for
                // what this append needs.
                if let Err(e) = &result
                    && is_full(e)
                {
                    want = end.div_ceil(PAGE) * PAGE;
                    result = self.reserve(*reserved, want);
                }
                match result {
                    Ok(()) => *reserved = want,
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP | libc::ENOSYS)) => {
                        tracing::info!(path = %self.describe(), "no fallocate here; extending the file with each append");
                        // Give back what earlier reservations left past the
                        // tail (readers only read below it).
                        self.file.set_len(offset)?;
                        *appender = Appender::Extending;
                        drop(appender);
                        return self.pwrite(buf, offset, end);
                    }
                    Err(e) => return Err(e),
                }
            }
            self.remap_for(end)?;
            if let Err(e) = self.write_at(buf, offset) {
                // Even reserved blocks can fail a write (an I/O error, a
                // copy-on-write file system). Give the reservation back
                // with what was written; the next append reserves again.
                let _ = self.file.set_len(offset);
                *reserved = offset;
                return Err(e);
            }
            self.tail.store(end, Ordering::Release);
            return Ok(offset);
        }
        drop(appender);
        self.pwrite(buf, offset, end)
    }

    /// While the disk is full (`lean`), gives back the space reserved past
    /// the tail but [`LEAN_AHEAD`] (compactions need the room more; deletes
    /// keep a little), and reserves only that much ahead from then on.
    /// Returns the bytes given back.
    pub(crate) fn set_lean(&self, lean: bool) -> io::Result<u64> {
        self.lean.store(lean, Ordering::Relaxed);
        if !lean {
            return Ok(0);
        }
        let mut appender = self.appender.lock().unwrap();
        let Appender::Reserved { reserved } = &mut *appender else {
            return Ok(0);
        };
        // Appends store the tail under this lock: it cannot move now.
        let keep = reservation_after(self.tail.load(Ordering::Acquire), true);
        if *reserved <= keep {
            return Ok(0);
        }
        // Readers only read below the tail (see `mmap.rs`).
        self.file.set_len(keep)?;
        let given = *reserved - keep;
        *reserved = keep;
        Ok(given)
    }

    /// Reserves bytes `[from, to)` of the file (`fallocate`).
    fn reserve(&self, from: u64, to: u64) -> io::Result<()> {
        #[cfg(test)]
        {
            let errno = self.fail_next_reserve.swap(0, Ordering::AcqRel);
            if errno != 0 {
                return Err(io::Error::from_raw_os_error(errno));
            }
            let disk_end = self.disk_end.load(Ordering::Acquire);
            if disk_end != 0 && to > disk_end {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        mmap::reserve(&self.file, from, to)
    }

    /// Maps the log anew, larger, if `end` lies past the current map
    /// (readers of the old one keep it until they drop it).
    fn remap_for(&self, end: u64) -> io::Result<()> {
        if end > self.map.load().len() as u64 {
            self.map.store(std::sync::Arc::new(mmap::map(
                &self.file,
                capacity_for(end) as usize,
            )?));
        }
        Ok(())
    }

    fn pwrite(&self, buf: &[u8], offset: u64, end: u64) -> io::Result<u64> {
        self.remap_for(end)?;
        if let Err(e) = self.write_at(buf, offset) {
            if !self.is_memory() {
                let _ = self.file.set_len(offset);
            }
            return Err(e);
        }
        self.tail.store(end, Ordering::Release);
        Ok(offset)
    }

    /// `pwrite` of all of `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        if let Some(written) = self.fail_next_write.lock().unwrap().take() {
            // Part of `buf` reaches the file, then the write fails.
            self.file
                .write_all_at(&buf[..written.min(buf.len())], offset)?;
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        self.file.write_all_at(buf, offset)
    }

    /// Starts the write-back of bytes `[from, to)` and, with `wait`, waits
    /// for it ([`mmap::write_back`]); nothing in memory mode. For a file
    /// written in bulk (a compaction's), so that its dirty pages never pile
    /// up into a flush that fills the disk's queue, ahead of the log's own
    /// I/O. An error is the write's (the next fsync may not see it again).
    pub(crate) fn write_back(&self, from: u64, to: u64, wait: bool) -> io::Result<()> {
        #[cfg(test)]
        if self.fail_next_write_back.swap(false, Ordering::AcqRel) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        if self.is_memory() || to <= from {
            return Ok(());
        }
        #[cfg(test)]
        self.write_backs.fetch_add(1, Ordering::Relaxed);
        mmap::write_back(&self.file, from, to, wait)
    }

    /// Calls of [`Self::write_back`] that reached the file.
    #[cfg(test)]
    pub(crate) fn write_backs(&self) -> u64 {
        self.write_backs.load(Ordering::Relaxed)
    }

    /// The poison message, if an fsync of this log ever failed.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.sync.lock().unwrap().poisoned.clone()
    }

    /// Whether bytes were written since the last fsync.
    pub(crate) fn is_dirty(&self) -> bool {
        !self.is_memory() && self.sync.lock().unwrap().synced < self.tail()
    }

    /// Makes everything below `end` durable. Concurrent callers share one
    /// `fdatasync` (group commit): whoever finds none running starts one
    /// covering every byte written so far; the rest wait for it. A failed
    /// fsync poisons the log for good.
    pub(crate) fn sync_to(&self, end: u64) -> Result<(), String> {
        if self.is_memory() {
            return Ok(());
        }
        let mut st = self.sync.lock().unwrap();
        loop {
            if let Some(e) = &st.poisoned {
                return Err(e.clone());
            }
            if st.synced >= end {
                return Ok(());
            }
            if st.in_progress {
                st = self.synced_cv.wait(st).unwrap();
                continue;
            }
            st.in_progress = true;
            let target = self.tail();
            drop(st);
            let result = self.file.sync_data();
            #[cfg(test)]
            let result = match self.fail_next_sync.swap(false, Ordering::AcqRel) {
                true => Err(io::Error::other("injected fsync failure")),
                false => result,
            };
            st = self.sync.lock().unwrap();
            st.in_progress = false;
            match result {
                Ok(()) => {
                    st.synced = st.synced.max(target);
                    self.synced.store(st.synced, Ordering::Release);
                    self.fdatasyncs.fetch_add(1, Ordering::Relaxed);
                    if let Some(w) = &self.watermark {
                        // Under the sync lock, so values reach the file in
                        // order; a pwrite into the page cache, no fsync.
                        w.advance(self.id, target);
                    }
                }
                Err(e) => {
                    let msg = format!("fdatasync {}: {e}", self.describe());
                    tracing::error!("{msg}; the collection now refuses writes");
                    st.poisoned = Some(msg);
                }
            }
            self.synced_cv.notify_all();
        }
    }

    /// Makes everything written so far durable.
    pub(crate) fn sync_all(&self) -> Result<(), String> {
        self.sync_to(self.tail())
    }

    /// Records that the file was renamed (a compacted file published).
    pub(crate) fn set_path(&mut self, path: PathBuf) {
        self.path = Some(path);
    }

    /// Successful `fdatasync`s of this file so far.
    #[cfg(test)]
    pub(crate) fn fdatasyncs(&self) -> u64 {
        self.fdatasyncs.load(Ordering::Relaxed)
    }

    /// This file's id, as the watermark knows it.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// The collection's watermark, which this file's fsyncs advance.
    pub(crate) fn watermark(&self) -> Option<&Arc<Watermark>> {
        self.watermark.as_ref()
    }

    /// Makes this file's fsyncs advance `watermark` (which must already
    /// name this file as its owner to take effect).
    pub(crate) fn set_watermark(&mut self, watermark: Arc<Watermark>) {
        self.watermark = Some(watermark);
    }

    fn describe(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "(memory)".into(),
        }
    }
}

impl Drop for LogFile {
    /// Gives back the space reserved past the tail, so a closed log ends
    /// with its last record (readers still holding the map only ever read
    /// below the tail).
    fn drop(&mut self) {
        let reserved = match self.appender.get_mut() {
            Ok(Appender::Reserved { reserved }) => *reserved,
            _ => return,
        };
        let tail = *self.tail.get_mut();
        if reserved > tail
            && let Err(e) = self.file.set_len(tail)
        {
            tracing::warn!(path = %self.describe(), "cannot give back reserved space: {e}");
        }
    }
}

/// Fsyncs a directory, so that a file created or renamed in it survives a
/// power loss.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
thread_local! {
    /// Makes the header write of the next new log on this thread fail
    /// with ENOSPC, after the file was created.
    pub(crate) static FAIL_HEADER_WRITE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: FileHeader = FileHeader {
        history: 7,
        purged_seq: 0,
    };

    /// A log file, and what was appended to it.
    fn fill(log: &LogFile, chunks: usize, len: usize) -> Vec<u8> {
        let mut expected = record::file_header(HEADER).to_vec();
        for i in 0..chunks {
            let chunk = vec![(i % 251) as u8 + 1; len];
            let offset = log.append(&chunk).unwrap();
            assert_eq!(offset as usize, expected.len());
            expected.extend_from_slice(&chunk);
            assert_eq!(log.tail() as usize, expected.len());
        }
        expected
    }

    /// A new log's header is not taken for durable before an fsync: the
    /// first sync makes it so, before anything (a collection's watermark)
    /// says it is. Before, a collection created just before a power cut
    /// left a watermark beside an empty log, and the node refused to start.
    #[test]
    fn the_first_sync_of_a_new_log_makes_its_header_durable() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::create(Some(&dir.path().join("log")), "t", HEADER).unwrap();
        assert!(log.is_dirty());
        log.sync_all().unwrap();
        assert_eq!(log.fdatasyncs(), 1);
        assert_eq!(log.synced(), FILE_HEADER_LEN as u64);
        assert!(!log.is_dirty());
        log.sync_all().unwrap();
        assert_eq!(log.fdatasyncs(), 1, "nothing new to sync");
    }

    /// While the disk is full, a log keeps 64 KiB reserved ahead of its
    /// tail, not up to 32 MiB: what it held beyond is given back, and its
    /// appends reserve no more; once the disk has room, as before.
    #[test]
    fn a_lean_log_gives_back_and_reserves_64_kib_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = LogFile::create(Some(&path), "t", HEADER).unwrap();
        let len = || std::fs::metadata(&path).unwrap().len();
        let ahead = |log: &LogFile| (log.tail() + LEAN_AHEAD).div_ceil(PAGE) * PAGE;
        let mut expected = fill(&log, 40, 100_000);
        assert!(len() > ahead(&log), "an eighth of 4 MB is reserved ahead");
        let before = len();
        assert_eq!(log.set_lean(true).unwrap(), before - ahead(&log));
        assert_eq!(len(), ahead(&log));
        assert_eq!(log.set_lean(true).unwrap(), 0, "nothing more to give back");
        expected.extend(fill_more(&log, 30, 10_000));
        assert!(len() <= ahead(&log), "{} past {}", len(), ahead(&log));
        assert_eq!(&log.map()[..expected.len()], &expected[..]);
        log.set_lean(false).unwrap();
        expected.extend(fill_more(&log, 10, 10_000));
        assert!(len() > ahead(&log), "an eighth again");
        assert_eq!(&log.map()[..expected.len()], &expected[..]);
    }

    #[test]
    fn appends_cross_reservations_and_remaps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = LogFile::create(Some(&path), "t", HEADER).unwrap();
        // 70 MiB: many reservations, and past the first 64 MiB map.
        let expected = fill(&log, 70, 1 << 20);
        let map = log.map();
        assert!(map.len() > 64 << 20, "remapped");
        assert_eq!(&map[..expected.len()], &expected[..]);
        let reserved = std::fs::metadata(&path).unwrap().len();
        assert!(
            reserved >= expected.len() as u64,
            "the file covers the tail"
        );
        // Closing gives the reserved space back; the file is the log.
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
        // The old map outlives the log and still reads what was written.
        assert_eq!(&map[..expected.len()], &expected[..]);
    }

    #[test]
    fn a_failed_reservation_writes_nothing_and_a_missing_fallocate_extends_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = LogFile::create(Some(&path), "t", HEADER).unwrap();
        let mut expected = fill(&log, 3, 100);
        // A nearly full disk, with room for 3 MiB past the tail but not
        // for the headroom a reservation takes: appends go on until the
        // disk is full.
        let room = log.tail() + (3 << 20);
        log.disk_end.store(room, Ordering::Release);
        expected.extend(fill_more(&log, 2, 1 << 20));
        expected.extend(fill_more(&log, 10, 100));
        // A full disk: the append fails, nothing of it is in the log.
        let tail = log.tail();
        let err = log.append(&vec![7u8; 1 << 20]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(log.tail(), tail);
        assert!(std::fs::metadata(&path).unwrap().len() <= room);
        // Space again: appends go on into reserved space.
        log.disk_end.store(0, Ordering::Release);
        expected.extend(fill_more(&log, 2, 100));
        assert!(matches!(
            *log.appender.lock().unwrap(),
            Appender::Reserved { .. }
        ));
        // No fallocate here: the log goes on extending the file, for good.
        log.fail_next_reserve
            .store(libc::EOPNOTSUPP, Ordering::Release);
        expected.extend(fill_more(&log, 1, 1 << 20));
        assert!(matches!(*log.appender.lock().unwrap(), Appender::Extending));
        expected.extend(fill_more(&log, 3, 100));
        assert_eq!(&log.map()[..expected.len()], &expected[..]);
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    fn fill_more(log: &LogFile, chunks: usize, len: usize) -> Vec<u8> {
        let mut appended = Vec::new();
        for i in 0..chunks {
            let chunk = vec![(i % 251) as u8 + 1; len];
            let offset = log.append(&chunk).unwrap();
            assert_eq!(offset + chunk.len() as u64, log.tail());
            appended.extend_from_slice(&chunk);
        }
        appended
    }

    #[test]
    fn a_write_that_fails_part_way_leaves_nothing_of_it_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = LogFile::create(Some(&path), "t", HEADER).unwrap();
        let mut expected = fill(&log, 3, 100);
        for extending in [false, true] {
            if extending {
                log.fail_next_reserve
                    .store(libc::EOPNOTSUPP, Ordering::Release);
                expected.extend(fill_more(&log, 1, 1 << 20));
                assert!(matches!(*log.appender.lock().unwrap(), Appender::Extending));
            }
            // Two records of a batch reach the file, then the write fails:
            // a crash now must not find them (the file ends at the tail).
            let tail = log.tail();
            *log.fail_next_write.lock().unwrap() = Some(200);
            let err = log.append(&[9u8; 300]).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EIO));
            assert_eq!(log.tail(), tail);
            assert_eq!(
                std::fs::metadata(&path).unwrap().len(),
                tail,
                "extending: {extending}"
            );
            assert_eq!(std::fs::read(&path).unwrap(), expected);
            // The log goes on, reserving again.
            expected.extend(fill_more(&log, 2, 100));
            assert_eq!(&log.map()[..expected.len()], &expected[..]);
        }
        drop(log);
        assert_eq!(std::fs::read(&path).unwrap(), expected);
    }

    #[test]
    fn memory_logs_append_with_pwrite() {
        let log = LogFile::create(None, "t", HEADER).unwrap();
        assert!(matches!(*log.appender.lock().unwrap(), Appender::Extending));
        let expected = fill(&log, 3, 1000);
        assert_eq!(&log.map()[..expected.len()], &expected[..]);
    }
}
