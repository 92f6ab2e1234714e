//! One of the three modules allowed `unsafe` (with `key.rs` and `shard.rs`):
//! the shared read-only maps of collection files (unmapped on a thread of
//! their own), space reserved ahead of the tail (`fallocate`), the anonymous
//! in-memory files (memfd) that back memory mode, and the priority of the
//! thread that unmaps.
//!
//! # Safety
//!
//! A log is mapped shared, with a length (its *capacity*) that may exceed the
//! file's current length, so that appends become visible to readers without
//! remapping. The file's length itself runs ahead of the log's tail: space
//! is reserved with `fallocate`, and an append is a `pwrite` into reserved
//! space. Touching a page wholly beyond end-of-file would raise SIGBUS, so
//! the engine keeps these rules, which together make every read through a
//! map land on bytes that exist and never change, and every write land on
//! reserved space nobody reads:
//!
//! 1. Readers only read ranges the index points at, and an index entry is
//!    published only after its record was written (`pwrite` returned), so
//!    the range lies below the log's tail.
//! 2. Bytes below the tail are never rewritten: the log is append-only.
//!    Appends write only at and after the tail, under the collection's
//!    writer lock, and only below the reserved length (blocks allocated by
//!    `fallocate`, so a full disk fails the reservation, not the write, on
//!    file systems that overwrite in place; a write that fails anyway is cut
//!    back to the tail).
//!    The file is only ever shortened while no map of it exists (recovery,
//!    before mapping) or past the tail (cutting back a failed `pwrite`,
//!    giving back reserved space on close, or while the disk is full:
//!    `LogFile::set_lean`).
//! 3. Compaction writes a *new* file and swaps it in; the old map stays alive
//!    (reference counted through `Bytes`) until its last reader drops it. The
//!    old file is unlinked but not truncated.
//!
//! What the engine cannot rule out is a page it cannot read: a disk sector
//! that fails (EIO on page-in), or another process truncating a file in the
//! data directory (the directory is locked against other dhrt processes, and
//! operators must not edit files of a running node). Either raises SIGBUS on
//! the reading thread, which would kill the process. [`guard`] catches it for
//! addresses inside these maps: the page is replaced by a page of zeros, the
//! read goes on, and the record on it fails its checksum, so its key is
//! quarantined (`verify.rs`) like any other damage and the node keeps
//! serving.

use std::fs::File;
use std::io;

use bytes::Bytes;
use memmap2::MmapOptions;

/// Maps `capacity` bytes of `file` read-only, shared, as `Bytes`. The map
/// is unmapped on the reaper thread once its last `Bytes` is dropped,
/// wherever that happens.
pub(crate) fn map(file: &File, capacity: usize) -> io::Result<Bytes> {
    guard::install();
    // SAFETY: see the module documentation; the map is read-only and only
    // ranges below the file's length are ever read.
    let map = unsafe { MmapOptions::new().len(capacity).map(file)? };
    let slot = guard::cover(map.as_ptr() as usize, map.len());
    Ok(Bytes::from_owner(Reaped(Some(map), slot)))
}

/// How many pages of maps could not be read (SIGBUS) and were replaced by
/// zeros since the process started.
pub(crate) fn unreadable_pages() -> u64 {
    guard::REPLACED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A map that is unmapped off the thread that drops it. `munmap` of a map
/// whose pages are mapped costs time in proportion to them (tearing down
/// page tables, a TLB shootdown): 17-28 ms for a 1 GiB map of a log
/// after a 10M-key load. The last reference to a replaced map is often
/// dropped by the writer that grew the log, under the collection's writer
/// lock, or by a request thread done with a value; either way every
/// request behind it would wait that long.
struct Reaped(Option<memmap2::Mmap>, Option<&'static guard::Slot>);

impl AsRef<[u8]> for Reaped {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        // Nothing reads the map any more, so no fault can come from it.
        if let Some(slot) = self.1.take() {
            slot.uncover();
        }
        if let Some(map) = self.0.take() {
            reaper::unmap(map);
        }
    }
}

/// The SIGBUS handler that keeps an unreadable page of a map from killing
/// the process (see the module documentation).
///
/// The ranges of the live maps are kept in slots that the handler reads
/// without locks or allocation: chunks of slots linked in a list that only
/// grows, never freed, so a slot the handler reads is always valid memory.
/// A fault at an address inside a covered range has its page replaced by
/// an anonymous page of zeros (`mmap` with `MAP_FIXED`, a system call the
/// handler may make); the faulting read then runs again and reads zeros. A
/// fault anywhere else goes to the handler installed before (Rust's own,
/// which reports a stack overflow), or kills the process as it would have.
mod guard {
    use std::ptr;
    use std::sync::Once;
    use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};

    /// Slots per chunk.
    const SLOTS: usize = 128;
    /// A slot's start while it is being filled or emptied (never a map's
    /// address: maps are page aligned).
    const BUSY: usize = 1;

    /// The range `[start, start + len)` of one live map; `start` 0: free.
    pub(crate) struct Slot {
        start: AtomicUsize,
        len: AtomicUsize,
    }

    impl Slot {
        /// Stops covering the slot's map and frees the slot.
        pub(crate) fn uncover(&self) {
            self.start.store(BUSY, Ordering::Release);
            self.len.store(0, Ordering::Release);
            self.start.store(0, Ordering::Release);
        }
    }

    struct Chunk {
        slots: [Slot; SLOTS],
        next: AtomicPtr<Chunk>,
    }

    static HEAD: AtomicPtr<Chunk> = AtomicPtr::new(ptr::null_mut());
    /// The handler installed before this one (leaked, read by the handler).
    static PREVIOUS: AtomicPtr<libc::sigaction> = AtomicPtr::new(ptr::null_mut());
    static PAGE: AtomicUsize = AtomicUsize::new(0);
    /// Pages replaced by zeros.
    pub(super) static REPLACED: AtomicU64 = AtomicU64::new(0);

    fn new_chunk() -> *mut Chunk {
        Box::into_raw(Box::new(Chunk {
            slots: std::array::from_fn(|_| Slot {
                start: AtomicUsize::new(0),
                len: AtomicUsize::new(0),
            }),
            next: AtomicPtr::new(ptr::null_mut()),
        }))
    }

    /// Covers `[start, start + len)`; `None` if the handler is not
    /// installed (the map is then as unguarded as any).
    pub(super) fn cover(start: usize, len: usize) -> Option<&'static Slot> {
        if PREVIOUS.load(Ordering::Acquire).is_null() {
            return None;
        }
        let mut link = &HEAD;
        loop {
            let mut chunk = link.load(Ordering::Acquire);
            if chunk.is_null() {
                let fresh = new_chunk();
                match link.compare_exchange(
                    ptr::null_mut(),
                    fresh,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => chunk = fresh,
                    Err(other) => {
                        // SAFETY: `fresh` was never shared.
                        drop(unsafe { Box::from_raw(fresh) });
                        chunk = other;
                    }
                }
            }
            // SAFETY: chunks are leaked once linked: valid for ever.
            let chunk: &'static Chunk = unsafe { &*chunk };
            for slot in &chunk.slots {
                if slot
                    .start
                    .compare_exchange(0, BUSY, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    slot.len.store(len, Ordering::Release);
                    slot.start.store(start, Ordering::Release);
                    return Some(slot);
                }
            }
            link = &chunk.next;
        }
    }

    /// Whether `addr` lies in a covered map. Async-signal-safe: atomic
    /// loads only.
    fn covered(addr: usize) -> bool {
        let mut chunk = HEAD.load(Ordering::Acquire);
        while !chunk.is_null() {
            // SAFETY: chunks are never freed.
            let c = unsafe { &*chunk };
            for slot in &c.slots {
                let start = slot.start.load(Ordering::Acquire);
                if start > BUSY {
                    let len = slot.len.load(Ordering::Acquire);
                    if addr >= start && addr - start < len {
                        return true;
                    }
                }
            }
            chunk = c.next.load(Ordering::Acquire);
        }
        false
    }

    /// Installs the handler, once per process. Best effort: if it cannot
    /// be installed, maps are left unguarded.
    pub(super) fn install() {
        static ONCE: Once = Once::new();
        ONCE.call_once(|| {
            // SAFETY: sysconf with a valid name has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let Ok(page) = usize::try_from(page) else {
                return;
            };
            if !page.is_power_of_two() {
                return;
            }
            PAGE.store(page, Ordering::Release);
            // SAFETY: zeroed `sigaction`s are valid values; the handler has
            // the signature SA_SIGINFO asks for; `previous` is written by
            // the call before it is read.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
                action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
                libc::sigemptyset(&mut action.sa_mask);
                let previous = Box::into_raw(Box::new(std::mem::zeroed::<libc::sigaction>()));
                // Published before the handler can run.
                PREVIOUS.store(previous, Ordering::Release);
                if libc::sigaction(libc::SIGBUS, &action, previous) != 0 {
                    PREVIOUS.store(ptr::null_mut(), Ordering::Release);
                    drop(Box::from_raw(previous));
                }
            }
        });
    }

    extern "C" fn on_sigbus(
        signal: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO
        // handler; for SIGBUS, `si_addr` is the faulting address.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Acquire);
        if page != 0 && covered(addr) {
            // SAFETY: the page lies inside a live map of ours (covered), so
            // replacing it touches no other mapping; it becomes a private
            // page of zeros, readable as the map was.
            let at = unsafe {
                libc::mmap(
                    (addr & !(page - 1)) as *mut libc::c_void,
                    page,
                    libc::PROT_READ,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                    -1,
                    0,
                )
            };
            if at != libc::MAP_FAILED {
                REPLACED.fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        let previous = PREVIOUS.load(Ordering::Acquire);
        // SAFETY: `previous` was filled by `sigaction` before this handler
        // was installed, and is never freed.
        let previous = unsafe { &*previous };
        let handler = previous.sa_sigaction;
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            // Back to the default: the faulting instruction runs again and
            // the signal kills the process, as if no handler had been here.
            // SAFETY: a zeroed `sigaction` is SIG_DFL with no flags.
            unsafe {
                let mut default: libc::sigaction = std::mem::zeroed();
                default.sa_sigaction = libc::SIG_DFL;
                libc::sigaction(libc::SIGBUS, &default, ptr::null_mut());
            }
        } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
            // SAFETY: an SA_SIGINFO handler has this signature.
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(handler) };
            handler(signal, info, context);
        } else {
            // SAFETY: a plain handler has this signature.
            let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
            handler(signal);
        }
    }
}

/// One thread per process, `dhrt-unmap`, at a lower priority (nice 10)
/// than request threads, that unmaps what it is handed, in order.
mod reaper {
    use std::sync::mpsc::{self, Sender};
    use std::sync::{Mutex, OnceLock};

    use memmap2::Mmap;

    static QUEUE: OnceLock<Option<Mutex<Sender<Mmap>>>> = OnceLock::new();

    /// Starts the reaper if it is not running yet. A thread inherits its
    /// creator's scheduling: the store starts it when it opens, so that it
    /// is not first started (and left idle-class) by a watcher's thread.
    pub(super) fn start() -> &'static Option<Mutex<Sender<Mmap>>> {
        QUEUE.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Mmap>();
            std::thread::Builder::new()
                .name("dhrt-unmap".into())
                .spawn(move || {
                    super::lower_priority();
                    for map in rx {
                        super::unmap_in_pieces(map);
                    }
                })
                .ok()
                .map(|_| Mutex::new(tx))
        })
    }

    /// Hands `map` to the reaper; unmaps it here if there is none (it
    /// could not be started).
    pub(super) fn unmap(map: Mmap) {
        let map = match start() {
            Some(tx) => match tx.lock().unwrap_or_else(|e| e.into_inner()).send(map) {
                Ok(()) => return,
                Err(mpsc::SendError(map)) => map,
            },
            None => map,
        };
        drop(map);
    }
}

/// How much of a map one `munmap` call takes down (see [`unmap_in_pieces`]).
const UNMAP_PIECE: usize = 64 << 20;

/// Unmaps `map` a piece at a time. `munmap` holds the process's mmap lock
/// while it tears down the pages it unmaps, and every `mmap` in the
/// meantime waits: one call on the 3 GB map a 10M-key log's recovery
/// read took 20.5 ms, and a thread being started (its stack is an `mmap`)
/// waited 18.6 ms behind it (strace, docs/benchmarks.md session 18). A
/// log's map is replaced as it grows and after each compaction, while
/// writers may be mapping memory. A piece of 64 MiB holds the lock for
/// well under a millisecond.
fn unmap_in_pieces(map: memmap2::Mmap) {
    let (start, len) = (map.as_ptr() as usize, map.len());
    // SAFETY: sysconf with a valid name has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
    if len <= UNMAP_PIECE || page == 0 || start % page != 0 {
        drop(map);
        return;
    }
    let mut at = 0;
    while at < len {
        let piece = UNMAP_PIECE.min(len - at);
        // SAFETY: `[start + at, start + at + piece)` lies inside the map,
        // which nothing else references any more (its last `Bytes` was
        // dropped: this is the reaper), and each byte of it is unmapped
        // once; the `Mmap` is forgotten below, so it does not unmap again.
        // `start + at` is page aligned (`start` is, `UNMAP_PIECE` is a
        // multiple of the page size).
        if unsafe { libc::munmap((start + at) as *mut libc::c_void, piece) } != 0 {
            // (Taking pieces off the front never splits the mapping, so
            // this is not expected.) The rest in one call, as before.
            // SAFETY: as above, for the rest of the map.
            unsafe { libc::munmap((start + at) as *mut libc::c_void, len - at) };
            break;
        }
        at += piece;
        std::thread::yield_now();
    }
    std::mem::forget(map);
}

/// Starts the thread that unmaps maps (see [`Reaped`]).
pub(crate) fn start_reaper() {
    reaper::start();
}

/// Puts the calling thread (the reaper) in the normal scheduling class at
/// nice 10, so that it takes the cores second to request threads but is
/// not starved by them. Best effort: a failure leaves it as it was.
fn lower_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain values and a pointer to a local that outlives the
    // call; pid 0 and a thread id name the calling thread only.
    unsafe {
        libc::sched_setscheduler(0, libc::SCHED_OTHER, &param);
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
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

/// Starts the write-back of bytes `[from, to)` of `file` to the disk
/// (`sync_file_range`), and with `wait` waits until they are written. No
/// metadata and no cache flush: this paces a bulk writer, it does not make
/// anything durable (an `fsync` still does). Its error must be taken as the
/// write's: it is reported once per descriptor, so the next `fsync` of this
/// descriptor may no longer see it.
pub(crate) fn write_back(file: &File, from: u64, to: u64, wait: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let len = libc::off64_t::try_from(to.saturating_sub(from)).map_err(io::Error::other)?;
    let start = libc::off64_t::try_from(from).map_err(io::Error::other)?;
    let flags = if wait {
        libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER
    } else {
        libc::SYNC_FILE_RANGE_WRITE
    };
    // SAFETY: the descriptor is open for the lifetime of `file`.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), start, len, flags) };
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

/// The size of the file system holding `dir` and the bytes free on it (for
/// an unprivileged writer).
// The field types differ between targets (u32 on some, u64 here).
#[allow(clippy::unnecessary_cast)]
pub(crate) fn space(dir: &std::path::Path) -> std::io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    let mut s = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `s` points to a
    // `statvfs` the call fills in when it returns 0.
    let r = unsafe { libc::statvfs(path.as_ptr(), s.as_mut_ptr()) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the call succeeded, so it initialized `s`.
    let s = unsafe { s.assume_init() };
    let unit = s.f_frsize as u64;
    Ok((
        (s.f_blocks as u64).saturating_mul(unit),
        (s.f_bavail as u64).saturating_mul(unit),
    ))
}

#[cfg(test)]
mod tests {
    /// Whether any part of the file with inode `inode` is mapped in this
    /// process (other tests may map other things at the same addresses).
    fn mapped(inode: u64) -> bool {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().nth(4) == Some(&inode.to_string()))
    }

    #[test]
    fn a_large_map_is_unmapped_whole_a_piece_at_a_time() {
        let file = tempfile::tempfile().unwrap();
        let len = 3 * super::UNMAP_PIECE + 12_345;
        file.set_len(len as u64).unwrap();
        let map = super::map(&file, len).unwrap();
        assert!(map.iter().step_by(1 << 20).all(|&b| b == 0));
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().unwrap());
        assert!(mapped(inode));
        drop(map);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while mapped(inode) {
            assert!(std::time::Instant::now() < deadline, "still mapped");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}
