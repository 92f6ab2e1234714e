//! One of the three modules allowed `unsafe` (with `key.rs` and `shard.rs`): the shared maps of collection files, the
//! copies of appended records into them, space reserved ahead of the tail
//! (`fallocate`), and the anonymous in-memory files (memfd) that back memory
//! mode.
//!
//! # Safety
//!
//! A log is mapped shared, with a length (its *capacity*) that may exceed the
//! file's current length, so that appends become visible to readers without
//! remapping. The file's length itself runs ahead of the log's tail: space
//! is reserved with `fallocate`, and an append copies the record into the
//! map, into reserved space (no system call). Touching a page wholly beyond
//! end-of-file would raise SIGBUS, so the engine keeps these rules, which
//! together make every read through a map land on bytes that exist and never
//! change, and every write land on reserved space nobody reads:
//!
//! 1. Readers only read ranges the index points at, and an index entry is
//!    published only after its record was written (copied into the map, or
//!    `pwrite` returned), so the range lies below the log's tail.
//! 2. Bytes below the tail are never rewritten: the log is append-only.
//!    Appends write only at and after the tail, under the collection's
//!    writer lock, and only below the reserved length (blocks allocated by
//!    `fallocate`, so a full disk fails the reservation, never the copy).
//!    The file is only ever shortened while no map of it exists (recovery,
//!    before mapping) or past the tail (cutting back a failed `pwrite`,
//!    giving back reserved space on close).
//! 3. Compaction writes a *new* file and swaps it in; the old map stays alive
//!    (reference counted through `Bytes`) until its last reader drops it. The
//!    old file is unlinked but not truncated.
//!
//! What the engine cannot rule out is another process truncating a file in
//! the data directory; the directory is locked against other dhrt processes,
//! and operators must not edit files of a running node.

use std::fs::File;
use std::io;

use bytes::Bytes;
use memmap2::MmapOptions;

/// Maps `capacity` bytes of `file` read-only, shared, as `Bytes`.
pub(crate) fn map(file: &File, capacity: usize) -> io::Result<Bytes> {
    // SAFETY: see the module documentation; the map is read-only and only
    // ranges below the file's length are ever read.
    let map = unsafe { MmapOptions::new().len(capacity).map(file)? };
    Ok(Bytes::from_owner(map))
}

/// A shared read-write map; readers see it as `Bytes`.
struct RawMap(memmap2::MmapRaw);

impl AsRef<[u8]> for RawMap {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the map is valid for its length while `self` lives. Only
        // ranges below a log's tail are ever read through it (rule 1), and
        // those are never written again (rule 2).
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.len()) }
    }
}

/// Where appends are copied: the start of a writable map, kept alive by the
/// `Bytes` readers share.
pub(crate) struct WriteMap {
    map: Bytes,
    ptr: std::ptr::NonNull<u8>,
}

// SAFETY: the pointer is into a shared file map owned by `map`; writes
// through it follow the rules of the module documentation.
unsafe impl Send for WriteMap {}
// SAFETY: as above; writers are serialized by the collection's writer lock.
unsafe impl Sync for WriteMap {}

impl WriteMap {
    /// The map's length.
    pub(crate) fn capacity(&self) -> usize {
        self.map.len()
    }

    /// Copies `bytes` into the map at `offset`.
    ///
    /// The caller holds the collection's writer lock, `offset` is the log's
    /// tail, and `offset + bytes.len()` is within the file's reserved length
    /// and the map's capacity (asserted).
    pub(crate) fn write_at(&self, offset: usize, bytes: &[u8]) {
        assert!(
            offset + bytes.len() <= self.capacity(),
            "write past the map"
        );
        // SAFETY: in bounds (asserted); the range is at or after the tail,
        // which no reader reads (rule 1), and within reserved blocks of the
        // file, so the copy cannot fault for want of space (rule 2).
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.ptr.as_ptr().add(offset),
                bytes.len(),
            );
        }
    }
}

/// Maps `capacity` bytes of `file` shared and writable: the map readers read
/// (as `Bytes`) and the handle appends are copied through.
pub(crate) fn map_writable(file: &File, capacity: usize) -> io::Result<(Bytes, WriteMap)> {
    // SAFETY: see the module documentation.
    let raw = MmapOptions::new().len(capacity).map_raw(file)?;
    let ptr =
        std::ptr::NonNull::new(raw.as_mut_ptr()).ok_or_else(|| io::Error::other("null map"))?;
    let map = Bytes::from_owner(RawMap(raw));
    Ok((map.clone(), WriteMap { map, ptr }))
}

/// Reserves blocks for bytes `[from, to)` of `file`, extending its length to
/// `to` if shorter. Fails (with `ENOSPC`, or `EOPNOTSUPP` where the file
/// system cannot) without reserving anything partly usable.
pub(crate) fn reserve(file: &File, from: u64, to: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off_t::try_from(to - from).map_err(io::Error::other)?;
    let start = libc::off_t::try_from(from).map_err(io::Error::other)?;
    // SAFETY: the descriptor is open for the lifetime of `file`.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), 0, start, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An anonymous file in memory (memfd), the backing of memory mode: the same
/// code path as a real file, with no name in any directory.
pub(crate) fn memfd(name: &str) -> io::Result<File> {
    use std::ffi::CString;
    use std::os::fd::FromRawFd;

    let name = CString::new(format!("dhrt-{name}")).map_err(io::Error::other)?;
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, open descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Takes an exclusive advisory lock on `file` without blocking; `Ok(false)`
/// if another process holds it.
pub(crate) fn try_lock(file: &File) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: the descriptor is open for the lifetime of `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}
