//! The disk reserve: room kept in the data directory so that a full disk
//! never wedges the store.
//!
//! An append-only store frees space only by writing: a delete appends a
//! tombstone, and a compaction writes the live records to a new file before
//! the old one goes. On a disk with no byte left, neither can run, so the
//! data nobody wants any more can never be given back. The store therefore
//! holds a file of [`Disk::reserve`] bytes (`RESERVE`, allocated, never
//! read) while the disk has room, and watches the room left:
//!
//! - When free space falls below the reserve, or a write fails for want of
//!   space, the store is **full**: it shrinks `RESERVE` to its *last
//!   stand* (an eighth, 256 KiB at least), so that deletes, drops and
//!   compactions have room, and refuses writes of new values with
//!   [`Error::DiskFull`] (deletes and drops are still taken). Every
//!   collection is compacted as soon as it has garbage.
//! - A compaction that fails for want of room while full gives up the last
//!   stand ([`Disk::give_up_last_stand`]): when something else took the
//!   room given back (another process, or values already on their way), a
//!   drop's compaction, which writes little, can still run and free the
//!   dropped collection's file. The last stand is kept across a restart on
//!   a full disk, for the same reason.
//! - Once free space is three reserves again, it allocates `RESERVE` anew
//!   and takes values again.
//!
//! Invariants: while not full, `RESERVE` holds `reserve` allocated bytes;
//! while full, at most the last stand; a refused write changed nothing; the
//! state changes only here, checked from the background thread every tick
//! and from a failed write.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::error::Error;

/// The reserve's file in the data directory.
pub(crate) const RESERVE_FILE: &str = "RESERVE";

/// The reserve when the options do not set one: 1% of the file system,
/// at least 1 MiB, at most 64 MiB (room for about a million tombstones).
fn auto_reserve(total: u64) -> u64 {
    (total / 100).clamp(1 << 20, 64 << 20)
}

/// Free space must reach this many reserves before values are taken again
/// (one goes back into `RESERVE`).
const LEAVE_AT: u64 = 3;

/// What is kept of a reserve of `reserve` bytes once the disk is full, for
/// compactions that find no room otherwise: an eighth, 256 KiB at least.
fn last_stand(reserve: u64) -> u64 {
    (reserve / 8).max(256 << 10).min(reserve)
}

/// The disk of a data directory, as the store sees it.
#[derive(Debug)]
pub(crate) struct Disk {
    dir: PathBuf,
    reserve: u64,
    full: AtomicBool,
    /// Free bytes at the last check.
    free: AtomicU64,
    /// Serializes the changes of state (a write's failure and the
    /// background check may race).
    change: Mutex<()>,
    /// Tests: the free space the checks see, if not `u64::MAX`.
    #[cfg(test)]
    pub(crate) fake_free: AtomicU64,
}

impl Disk {
    /// The disk of `dir`, with a reserve of `reserve` bytes (`None`: 1% of
    /// the file system, 1 to 64 MiB; `Some(0)`: none). Allocates the
    /// reserve if it is missing and there is room for it.
    pub(crate) fn open(dir: &Path, reserve: Option<u64>) -> Disk {
        let (total, free) = crate::mmap::space(dir).unwrap_or((0, u64::MAX));
        let disk = Disk {
            dir: dir.to_path_buf(),
            reserve: reserve.unwrap_or_else(|| auto_reserve(total)),
            full: AtomicBool::new(false),
            free: AtomicU64::new(free),
            change: Mutex::new(()),
            #[cfg(test)]
            fake_free: AtomicU64::new(u64::MAX),
        };
        if disk.reserve == 0 {
            let _ = std::fs::remove_file(disk.path());
            return disk;
        }
        let held = std::fs::metadata(disk.path()).is_ok_and(|m| m.len() >= disk.reserve);
        if !held {
            if free >= disk.reserve.saturating_mul(2) {
                match disk.allocate() {
                    Ok(()) => return disk,
                    // Not for want of room (a directory in its place, no
                    // permission): the disk is not full, and saying so
                    // would refuse every value for good.
                    Err(e) if !no_room(&e) => {
                        tracing::warn!(
                            path = %disk.path().display(),
                            "cannot set the disk reserve aside ({e}): running without one, so a disk that fills has no room kept for deletes, drops and compaction"
                        );
                        return Disk { reserve: 0, ..disk };
                    }
                    Err(_) => {}
                }
            }
            // No room to set the reserve aside: full from the start. What
            // is left of a reserve (the last stand, kept from before a
            // restart) stays for compactions that find no room.
            let _ = std::fs::remove_file(disk.dir.join(format!("{RESERVE_FILE}.tmp")));
            disk.full.store(true, Ordering::Release);
            tracing::warn!(
                dir = %dir.display(),
                free_mib = free >> 20,
                reserve_mib = disk.reserve >> 20,
                "the disk is nearly full: new values are refused until {} MiB are free; deletes and drops are taken",
                (disk.reserve * LEAVE_AT) >> 20
            );
        }
        disk
    }

    fn path(&self) -> PathBuf {
        self.dir.join(RESERVE_FILE)
    }

    /// Whether new values are refused.
    #[inline]
    pub(crate) fn is_full(&self) -> bool {
        self.full.load(Ordering::Acquire)
    }

    /// Free bytes at the last check.
    pub(crate) fn free(&self) -> u64 {
        self.free.load(Ordering::Relaxed)
    }

    /// The error a write of a value gets while the disk is full.
    pub(crate) fn refusal(&self) -> Error {
        Error::DiskFull {
            dir: self.dir.clone(),
            free: self.free(),
            needed: self.reserve.saturating_mul(LEAVE_AT),
        }
    }

    /// A write failed for want of space: full now, if it was not. Returns
    /// whether the state changed. A write larger than the room left while
    /// the disk still has the room values are taken back at (three
    /// reserves) fails alone: refusing every value for it would only last
    /// until the next check, and start again with the next large write.
    pub(crate) fn out_of_space(&self) -> bool {
        if self.reserve == 0 || self.is_full() {
            return false;
        }
        if self
            .look()
            .is_some_and(|free| free >= self.reserve.saturating_mul(LEAVE_AT))
        {
            return false;
        }
        let _change = self.change.lock().unwrap();
        self.enter()
    }

    /// The free space now (remembered for [`free`](Self::free)).
    fn look(&self) -> Option<u64> {
        let (_, free) = crate::mmap::space(&self.dir).ok()?;
        #[cfg(test)]
        let free = match self.fake_free.load(Ordering::Relaxed) {
            u64::MAX => free,
            fake => fake,
        };
        self.free.store(free, Ordering::Relaxed);
        Some(free)
    }

    /// Looks at the free space: full below one reserve, not full from
    /// three. Returns whether the state changed.
    pub(crate) fn check(&self) -> bool {
        let Some(free) = self.look() else {
            return false;
        };
        // Without a reserve the node is never full (values are not
        // refused ahead of the disk), but its free space is still told.
        if self.reserve == 0 {
            return false;
        }
        let _change = self.change.lock().unwrap();
        if !self.is_full() {
            return free < self.reserve && self.enter();
        }
        if free < self.reserve.saturating_mul(LEAVE_AT) {
            return false;
        }
        match self.allocate() {
            Ok(()) => {
                self.full.store(false, Ordering::Release);
                tracing::warn!(
                    dir = %self.dir.display(),
                    free_mib = free >> 20,
                    "the disk has room again: the reserve is set aside and new values are taken"
                );
                true
            }
            // The last stand stays (`allocate` leaves no temporary file).
            Err(e) => {
                tracing::debug!("allocating the disk reserve: {e}");
                false
            }
        }
    }

    /// Gives up the reserve but its last stand, and refuses values
    /// (`change` held).
    fn enter(&self) -> bool {
        if self.is_full() {
            return false;
        }
        self.full.store(true, Ordering::Release);
        // Shortening a file frees its blocks past the new end.
        let released = std::fs::OpenOptions::new()
            .write(true)
            .open(self.path())
            .and_then(|f| f.set_len(last_stand(self.reserve)))
            .is_ok();
        tracing::error!(
            dir = %self.dir.display(),
            reserve_mib = self.reserve >> 20,
            released,
            "the disk is full: gave up the reserve so that deletes, drops and compaction have room; new values are refused until {} MiB are free",
            (self.reserve * LEAVE_AT) >> 20
        );
        true
    }

    /// A compaction failed for want of room while the disk is full: gives
    /// up the last stand of the reserve, so that the next attempt has it.
    /// Returns whether there was one.
    pub(crate) fn give_up_last_stand(&self) -> bool {
        let _change = self.change.lock().unwrap();
        if !self.is_full() || std::fs::remove_file(self.path()).is_err() {
            return false;
        }
        tracing::error!(
            dir = %self.dir.display(),
            "the disk is still full and a compaction found no room: gave up the last of the reserve"
        );
        true
    }

    /// Allocates `RESERVE` (written through a temporary file, so a reserve
    /// is either whole or absent).
    fn allocate(&self) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{RESERVE_FILE}.tmp"));
        let made = (|| {
            let f = File::create(&tmp)?;
            crate::mmap::reserve(&f, 0, self.reserve)?;
            f.sync_all()?;
            std::fs::rename(&tmp, self.path())
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        made
    }
}

/// Whether `e` says the file system has no room (or quota) left.
fn no_room(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `RESERVE` that cannot be made (here a directory in its place) is
    /// not a full disk: the node runs without a reserve, and takes values.
    #[test]
    fn a_reserve_that_cannot_be_made_is_not_a_full_disk() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join(RESERVE_FILE)).unwrap();
        let disk = Disk::open(dir.path(), Some(1 << 20));
        assert!(!disk.is_full());
        assert_eq!(disk.reserve, 0);
        assert!(dir.path().join(RESERVE_FILE).is_dir(), "left as it was");
    }

    #[test]
    fn the_reserve_is_one_percent_within_bounds() {
        assert_eq!(auto_reserve(64 << 20), 1 << 20);
        assert_eq!(auto_reserve(1 << 30), (1 << 30) / 100);
        assert_eq!(auto_reserve(1 << 40), 64 << 20);
    }

    #[test]
    fn the_reserve_is_set_aside_given_up_when_full_and_taken_back() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path(), Some(1 << 20));
        assert!(!disk.is_full());
        let held = std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap();
        assert_eq!(held.len(), 1 << 20);
        // A write too large for the room left, with three reserves free:
        // it fails alone.
        disk.fake_free.store(3 << 20, Ordering::Relaxed);
        assert!(!disk.out_of_space(), "room enough for other values");
        assert!(!disk.is_full());
        disk.fake_free.store((2 << 20) + 5, Ordering::Relaxed);
        assert!(disk.out_of_space(), "a write found no room: full");
        assert_eq!(
            disk.free(),
            (2 << 20) + 5,
            "the refusal says what is free now"
        );
        assert!(disk.is_full());
        let kept = std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap();
        assert_eq!(kept.len(), 256 << 10, "given up but its last stand");
        assert!(matches!(disk.refusal(), Error::DiskFull { .. }));
        assert!(!disk.out_of_space(), "once");
        // Room again, but the reserve cannot be allocated (here a
        // directory where its temporary file goes; on a disk another
        // process fills, the room gone again): still full, and the last
        // stand stays.
        let tmp = dir.path().join(format!("{RESERVE_FILE}.tmp"));
        std::fs::create_dir(&tmp).unwrap();
        disk.fake_free.store(u64::MAX, Ordering::Relaxed);
        assert!(!disk.check());
        assert!(disk.is_full());
        assert!(
            dir.path().join(RESERVE_FILE).exists(),
            "the last stand stays"
        );
        std::fs::remove_dir(&tmp).unwrap();
        disk.fake_free.store((2 << 20) + 5, Ordering::Relaxed);
        // A compaction found no room: the last stand goes, once.
        assert!(disk.give_up_last_stand());
        assert!(!dir.path().join(RESERVE_FILE).exists());
        assert!(!disk.give_up_last_stand());
        // This disk has room: the next check takes values again.
        disk.fake_free.store(u64::MAX, Ordering::Relaxed);
        assert!(disk.check());
        assert!(!disk.is_full());
        let held = std::fs::metadata(dir.path().join(RESERVE_FILE)).unwrap();
        assert_eq!(held.len(), 1 << 20);
        // Not full: the reserve is not given up for a compaction.
        assert!(!disk.give_up_last_stand());
        assert!(dir.path().join(RESERVE_FILE).exists());
    }

    /// A node restarted on a full disk keeps what is left of its reserve
    /// (the last stand): a drop's compaction may need it.
    #[test]
    fn a_full_disk_at_the_start_keeps_the_last_stand() {
        let dir = tempfile::tempdir().unwrap();
        let reserve = dir.path().join(RESERVE_FILE);
        std::fs::write(&reserve, vec![0u8; 256 << 10]).unwrap();
        // A reserve larger than this disk could ever set aside.
        let disk = Disk::open(dir.path(), Some(u64::MAX / 4));
        assert!(disk.is_full());
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 256 << 10);
        assert!(disk.give_up_last_stand());
        assert!(!reserve.exists());
    }

    #[test]
    fn without_a_reserve_nothing_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(dir.path(), Some(0));
        assert!(!disk.out_of_space());
        // The free space is still looked at, and told.
        disk.fake_free.store(12345, Ordering::Relaxed);
        assert!(!disk.check());
        assert_eq!(disk.free(), 12345);
        assert!(!disk.is_full());
        assert!(!dir.path().join(RESERVE_FILE).exists());
    }
}
