//! The allocator and its housekeeping: mimalloc, with the returning of
//! freed memory to the system (purging) done on a thread of its own.

use std::time::Duration;

/// mimalloc, not the system allocator: a reshard or compaction frees the
/// millions of entries of the index it replaced from its own thread, and
/// glibc's per-arena locks then stalled writers allocating beside it for
/// 100-500 ms (`benches/scale.sh`, docs/benchmarks.md); mimalloc frees
/// across threads without a lock.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc's `mi_option_t` (v3, the version
/// libmimalloc-sys builds): how long freed memory waits before it is
/// returned to the system, in ms (1,000 by default).
const MI_OPTION_PURGE_DELAY: i32 = 15;

unsafe extern "C" {
    /// Collects the calling thread's heap; with `force`, also returns to
    /// the system every free range waiting to be purged, however recent.
    fn mi_collect(force: bool);
    fn mi_option_set(option: i32, value: std::ffi::c_long);
    #[cfg(test)]
    fn mi_option_get(option: i32) -> std::ffi::c_long;
}

/// How often the purger returns freed memory to the system.
const PURGE_EVERY: Duration = Duration::from_secs(1);

/// Delay after which any thread that allocates purges what is still
/// waiting: only reached if the purger falls that far behind.
const PURGE_DELAY_MS: std::ffi::c_long = 30_000;

/// Moves mimalloc's purging off request threads. Left to itself, mimalloc
/// purges from whichever thread allocates next once the delay is up. After
/// a reshard freed the index it replaced, that was a writer, under its
/// collection's writer lock, in `madvise` for 18-33 ms while every other
/// writer of the collection waited (perf, 10M sequential SETs). Here the
/// delay is pushed out to 30 s and a `dhrt-purge` thread purges every
/// second instead, so memory goes back as promptly as before and writers
/// never do it.
pub(crate) fn purge_off_request_threads() {
    let spawned = std::thread::Builder::new()
        .name("dhrt-purge".into())
        .spawn(|| {
            loop {
                std::thread::sleep(PURGE_EVERY);
                give_back_freed_memory();
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the purge thread ({e}); writers will purge");
        return;
    }
    // SAFETY: mimalloc is this process's allocator (GLOBAL above); options
    // may be set at any time and take plain integers.
    #[allow(unsafe_code)]
    unsafe {
        mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS)
    };
}

/// Has mimalloc return the pages freed so far to the system now. Also
/// called once the store is open: recovery stages 56 bytes per log record
/// on threads that have exited by the time the replay frees them; their
/// pages stay with the exited threads' heaps until some thread reclaims
/// them (after reopening 10M keys, 973 MB of heap stayed resident instead
/// of about 580 MB).
pub(crate) fn give_back_freed_memory() {
    // SAFETY: mimalloc is this process's allocator (GLOBAL above), so the
    // symbol is linked in; it takes a plain bool and may run at any time.
    #[allow(unsafe_code)]
    unsafe {
        mi_collect(true)
    };
}

/// Opts this process out of transparent huge pages (as Redis does with
/// `disable-thp`). mimalloc asks for them on its arenas, and then every
/// first touch of 2 MiB zeroes it in one go: reopening 10M keys replayed
/// in 2.0-3.4 s with them and 1.4-1.8 s without (docs/benchmarks.md).
pub(crate) fn no_huge_pages() {
    // SAFETY: plain integer arguments; PR_SET_THP_DISABLE affects only this
    // process (and its children).
    #[allow(unsafe_code)]
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The option number is mimalloc's purge delay: its documented default
    /// (1,000 ms, unless the environment sets it) before anything set it,
    /// and what was set after.
    #[test]
    #[allow(unsafe_code)]
    fn the_option_set_is_the_purge_delay() {
        let default = ["MIMALLOC_PURGE_DELAY", "MIMALLOC_RESET_DELAY"]
            .iter()
            .find_map(|v| std::env::var(v).ok()?.parse().ok())
            .unwrap_or(1000);
        // SAFETY: as in `purge_off_request_threads`.
        unsafe {
            assert_eq!(mi_option_get(MI_OPTION_PURGE_DELAY), default);
            mi_option_set(MI_OPTION_PURGE_DELAY, 1234);
            assert_eq!(mi_option_get(MI_OPTION_PURGE_DELAY), 1234);
            mi_option_set(MI_OPTION_PURGE_DELAY, 1000);
        }
    }
}
