//! The only module with `unsafe`: read-only maps of collection files and the
//! anonymous in-memory files (memfd) that back memory mode.
//!
//! # Safety
//!
//! A log is mapped read-only and shared, with a length (its *capacity*) that
//! may exceed the file's current length, so that appends become visible to
//! readers without remapping. Touching a page wholly beyond end-of-file would
//! raise SIGBUS, so the engine keeps three rules, which together make every
//! read through a map land on bytes that exist and never change:
//!
//! 1. Readers only read ranges the index points at, and an index entry is
//!    published only after its record was written (`pwrite` returned), so the
//!    range lies below the file's length.
//! 2. Bytes below the length are never rewritten: the log is append-only. The
//!    file is only ever shortened while no map of it exists (recovery, before
//!    mapping) or past the published end (cutting back a failed `pwrite`).
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
