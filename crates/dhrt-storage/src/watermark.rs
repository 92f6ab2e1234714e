//! The durable watermark of a collection's log: a sidecar file
//! `<name>.dhrt.durable` saying how far the log was confirmed durable, so
//! recovery can tell damage in a never-synced tail (cut it) from damage in
//! bytes an `fdatasync` had confirmed (refuse to open).
//!
//! The value is rewritten in place after each successful `fdatasync` of the
//! log (a `pwrite`, no fsync: nothing is added to the `SyncMode::Always`
//! write path) and made durable by the sync thread's next round. Since it is
//! only ever written after the bytes below it were synced, the value on disk
//! is never above what is truly durable; a lost update only makes recovery
//! more lenient, never wrong.
//!
//! One sidecar serves every generation of a collection. Compaction moves it
//! to the new file (see [`Watermark::begin_swap`]): from then on only the
//! new log's syncs may raise it, so a late sync of the replaced file cannot
//! claim bytes the new one does not have.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Suffix of a collection's watermark file.
pub(crate) const WATERMARK_SUFFIX: &str = ".dhrt.durable";

const MAGIC: [u8; 8] = *b"DHRTDUR\0";
/// Length of the sidecar file.
pub(crate) const WATERMARK_LEN: usize = 24;

/// The tag that ties a watermark file to its log: a hash of the log's
/// file name (its collection) and its history (the id its header carries
/// from its creation on, kept by compaction). Never 0, which marks a file
/// written before tags: such a file is taken as it is, and tagged at its
/// next write.
pub(crate) fn tag_for(log_path: &Path, history: u64) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let name = log_path.file_name().map_or(&[][..], |n| n.as_bytes());
    let tag = crc32c::crc32c_append(crc32c::crc32c(name), &history.to_le_bytes());
    tag.max(1)
}

/// The checksum of a watermark's bytes: of the first 16, and of the tag
/// unless it is 0 (the layout before tags, whose last 4 bytes were zeros).
fn checksum(b: &[u8; WATERMARK_LEN]) -> u32 {
    let crc = crc32c::crc32c(&b[..16]);
    if b[20..24] == [0; 4] {
        crc
    } else {
        crc32c::crc32c_append(crc, &b[20..24])
    }
}

/// Encodes a watermark: magic, offset, checksum, tag (see [`tag_for`]).
pub(crate) fn encode(offset: u64, tag: u32) -> [u8; WATERMARK_LEN] {
    let mut b = [0u8; WATERMARK_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&offset.to_le_bytes());
    b[20..24].copy_from_slice(&tag.to_le_bytes());
    let crc = checksum(&b);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a watermark file's bytes into its offset and tag (0 for a file
/// written before tags); the error says what is wrong.
pub(crate) fn decode(b: &[u8]) -> Result<(u64, u32), &'static str> {
    let Some(b) = b.first_chunk::<WATERMARK_LEN>() else {
        return Err("shorter than a watermark");
    };
    if b[..8] != MAGIC {
        return Err("bad magic");
    }
    if u32::from_le_bytes(b[16..20].try_into().unwrap()) != checksum(b) {
        return Err("checksum mismatch");
    }
    Ok((
        u64::from_le_bytes(b[8..16].try_into().unwrap()),
        u32::from_le_bytes(b[20..24].try_into().unwrap()),
    ))
}

/// Ids of log files, so the sidecar knows which file may raise it.
static NEXT_LOG_ID: AtomicU64 = AtomicU64::new(1);

/// A fresh log id.
pub(crate) fn next_log_id() -> u64 {
    NEXT_LOG_ID.fetch_add(1, Ordering::Relaxed)
}

/// The path of the watermark of the log at `log_path`.
pub(crate) fn path_for(log_path: &Path) -> PathBuf {
    let mut p = log_path.as_os_str().to_owned();
    p.push(
        WATERMARK_SUFFIX
            .strip_prefix(crate::collection::LOG_SUFFIX)
            .unwrap(),
    );
    PathBuf::from(p)
}

/// Reads the watermark of the log at `log_path`, with its tag: `Ok(None)`
/// if there is no sidecar (a file from before watermarks) or it is
/// unreadable, which recovery treats as "everything is durable".
pub(crate) fn read(log_path: &Path) -> io::Result<Option<(u64, u32)>> {
    let path = path_for(log_path);
    match std::fs::read(&path) {
        Ok(bytes) => match decode(&bytes) {
            Ok(found) => Ok(Some(found)),
            Err(why) => {
                tracing::warn!(path = %path.display(), why, "ignoring an unreadable durable watermark; treating the log as fully durable");
                Ok(None)
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

#[derive(Debug)]
struct State {
    /// The value last written to the file.
    value: u64,
    /// The log whose syncs may raise the value.
    owner: u64,
    /// Written since the file was last fsynced.
    dirty: bool,
}

/// A collection's sidecar file, shared by its log generations.
#[derive(Debug)]
pub(crate) struct Watermark {
    file: File,
    path: PathBuf,
    /// Written with every value (see [`tag_for`]).
    tag: u32,
    state: Mutex<State>,
}

impl Watermark {
    /// Opens (creating or rewriting) the sidecar of the log at `log_path`,
    /// whose history is `history`, writing `value` into it for `owner`.
    /// The write is not fsynced.
    pub(crate) fn create(
        log_path: &Path,
        history: u64,
        owner: u64,
        value: u64,
    ) -> io::Result<Watermark> {
        let tag = tag_for(log_path, history);
        let path = path_for(log_path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        file.write_all_at(&encode(value, tag), 0)?;
        file.set_len(WATERMARK_LEN as u64)?;
        Ok(Watermark {
            file,
            path,
            tag,
            state: Mutex::new(State {
                value,
                owner,
                dirty: true,
            }),
        })
    }

    /// Opens the existing sidecar holding `value` without rewriting it
    /// (its tag is written with the next value).
    pub(crate) fn open(
        log_path: &Path,
        history: u64,
        owner: u64,
        value: u64,
    ) -> io::Result<Watermark> {
        let path = path_for(log_path);
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(Watermark {
            file,
            path,
            tag: tag_for(log_path, history),
            state: Mutex::new(State {
                value,
                owner,
                dirty: false,
            }),
        })
    }

    /// Records that log `owner` is durable up to `offset` (called after its
    /// `fdatasync` succeeded). Ignored from a log that no longer owns the
    /// sidecar, and for values that do not raise it.
    pub(crate) fn advance(&self, owner: u64, offset: u64) {
        let mut st = self.state.lock().unwrap();
        if st.owner != owner || offset <= st.value {
            return;
        }
        match self.file.write_all_at(&encode(offset, self.tag), 0) {
            Ok(()) => {
                st.value = offset;
                st.dirty = true;
            }
            // A stale watermark only makes recovery more lenient.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot record the durable watermark: {e}")
            }
        }
    }

    /// Makes the last written value durable, if it is not yet.
    pub(crate) fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        if st.dirty {
            self.file.sync_data()?;
            st.dirty = false;
        }
        Ok(())
    }

    /// Whether a written value awaits its fsync.
    pub(crate) fn is_dirty(&self) -> bool {
        self.state.lock().unwrap().dirty
    }

    /// First step of publishing a compacted file of `new_len` bytes (all
    /// synced) as log `new_owner`: from now on only that log may raise the
    /// watermark, and the value becomes, durably, one that is right for
    /// whichever file a crash leaves under the collection's name:
    /// `min(old value, new_len)`.
    pub(crate) fn begin_swap(&self, new_owner: u64, new_len: u64) -> io::Result<()> {
        let mut st = self.state.lock().unwrap();
        st.owner = new_owner;
        let value = st.value.min(new_len);
        self.file.write_all_at(&encode(value, self.tag), 0)?;
        self.file.sync_data()?;
        st.value = value;
        st.dirty = false;
        Ok(())
    }

    /// Gives the sidecar back to log `owner` after a swap that did not
    /// happen.
    pub(crate) fn abort_swap(&self, owner: u64) {
        self.state.lock().unwrap().owner = owner;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        for tag in [0, 0x1234_5678] {
            let b = encode(12345, tag);
            assert_eq!(decode(&b), Ok((12345, tag)));
            for i in 0..24 {
                let mut bad = b;
                bad[i] ^= 0x10;
                assert!(decode(&bad).is_err(), "byte {i}, tag {tag}");
            }
            assert!(decode(&b[..20]).is_err());
        }
    }

    /// The layout before tags (zeros where the tag is, the checksum of the
    /// first 16 bytes) still reads.
    #[test]
    fn a_watermark_written_before_tags_reads_with_tag_0() {
        let mut b = [0u8; WATERMARK_LEN];
        b[..8].copy_from_slice(b"DHRTDUR\0");
        b[8..16].copy_from_slice(&777u64.to_le_bytes());
        let crc = crc32c::crc32c(&b[..16]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(decode(&b), Ok((777, 0)));
    }

    #[test]
    fn the_tag_names_the_collection_and_its_history() {
        let a = Path::new("/d/a.dhrt");
        let t = tag_for(a, 42);
        assert_ne!(t, 0);
        assert_eq!(t, tag_for(Path::new("/elsewhere/a.dhrt"), 42));
        assert_ne!(t, tag_for(Path::new("/d/b.dhrt"), 42));
        assert_ne!(t, tag_for(a, 43));
    }

    #[test]
    fn only_the_owner_raises_it_and_a_swap_lowers_it_durably() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("c.dhrt");
        let w = Watermark::create(&log, 9, 1, 16).unwrap();
        let tag = tag_for(&log, 9);
        assert_eq!(path_for(&log), dir.path().join("c.dhrt.durable"));
        w.advance(1, 1000);
        w.advance(1, 500); // never lowered by a sync
        assert_eq!(read(&log).unwrap(), Some((1000, tag)));
        w.begin_swap(2, 300).unwrap();
        w.advance(1, 5000); // the replaced file's late sync
        assert_eq!(read(&log).unwrap(), Some((300, tag)));
        w.advance(2, 400);
        assert_eq!(read(&log).unwrap(), Some((400, tag)));
        assert!(w.is_dirty());
        w.sync().unwrap();
        assert!(!w.is_dirty());
    }
}
