//! The storage error type.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in `dhrt-storage`.
///
/// Each variant says whether state was changed. Unless stated otherwise, a
/// failed call changed nothing: no record was written and the index is as it
/// was.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The collection name is not `[A-Za-z0-9_-]{1,64}`. Nothing was changed.
    #[error("invalid collection name {name:?}: {reason}")]
    InvalidCollection {
        /// The name as given (lossily printed).
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },

    /// The key is empty or longer than [`crate::MAX_KEY_LEN`]. Nothing was changed.
    #[error("invalid key: {len} bytes (keys are 1 to {max} bytes)")]
    InvalidKey {
        /// Length of the refused key.
        len: usize,
        /// The limit.
        max: usize,
    },

    /// A digest bucket number out of range. Nothing was changed.
    #[error("invalid digest bucket {0} (there are {n})", n = crate::DIGEST_BUCKETS)]
    InvalidBucket(usize),

    /// The value is larger than the configured maximum. Nothing was changed.
    #[error("value too large: {len} bytes (the limit is {max})")]
    ValueTooLarge {
        /// Length of the refused value.
        len: usize,
        /// The configured limit.
        max: usize,
    },

    /// Creating another collection would pass `Options::max_collections`.
    /// Nothing was changed.
    #[error(
        "this node already holds {count} collections (dropped ones too: a drop keeps its file), as many as it can keep open ({max}, two open files each): raise the node's open-files limit, or --max-collections"
    )]
    TooManyCollections {
        /// Collections held (not counting the node's own).
        count: usize,
        /// The limit.
        max: usize,
    },

    /// An I/O error while reading or writing a collection's file. A failed
    /// write was cut back, so the file holds no partial record; nothing was
    /// changed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done ("write", "open", ...).
        op: &'static str,
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Bytes of a log that were confirmed durable (below its durable
    /// watermark; for a log without one, a bad record that valid records
    /// follow) are damaged or missing. The collection was not opened and
    /// the file was not touched: this needs an operator, not an automatic
    /// repair.
    #[error(
        "corrupt record in {path} at offset {offset}: {reason}; the file was left untouched (docs/operations.md says what to do)"
    )]
    Corrupt {
        /// The collection file.
        path: PathBuf,
        /// Byte offset of the bad record.
        offset: u64,
        /// What was wrong with it.
        reason: &'static str,
    },

    /// The file does not start with a dhrt log header of a known version.
    /// Nothing was changed.
    #[error("{path} is not a dhrt log file: {reason}")]
    BadHeader {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },

    /// The collection was released ([`crate::Store::release`]) while the
    /// call waited for it; the store retries such calls on the collection's
    /// new incarnation, so callers never see this. Nothing was changed.
    #[error("collection {collection:?} was released")]
    Released {
        /// The collection.
        collection: String,
    },

    /// The disk holding the data directory is full (or was: free space has
    /// not yet come back to three reserves): writes of values are refused,
    /// deletes and drops are taken, and compaction gives space back.
    /// Nothing was changed.
    #[error(
        "the disk holding {dir} is full ({free_mib} MiB free): new values are refused until {needed_mib} MiB are free; deletes and drops are still taken, and free space once compacted",
        free_mib = free >> 20,
        needed_mib = needed.div_ceil(1 << 20)
    )]
    DiskFull {
        /// The data directory.
        dir: PathBuf,
        /// Bytes free at the last check.
        free: u64,
        /// Bytes free from which values are taken again.
        needed: u64,
    },

    /// An earlier fsync of this collection failed, so its durable state is
    /// unknown; it refuses writes until the process is restarted and the log
    /// recovered. Reads keep working. Nothing was changed.
    #[error("collection {collection:?} refuses writes after a failed fsync: {cause}")]
    Poisoned {
        /// The collection.
        collection: String,
        /// The original fsync error.
        cause: String,
    },

    /// The write was applied (its record is in the log and the index, so
    /// reads see it) but the fsync that was to make it durable failed: it
    /// may survive a crash or not, and may reach replicas (anti-entropy
    /// finds it here). The collection refuses writes from now on, as after
    /// any failed fsync ([`Error::Poisoned`]).
    #[error(
        "the write is applied in collection {collection:?} but not confirmed durable, as its fsync failed ({cause}): it may be read here, and reach other replicas, or be lost if this node crashes; the collection now refuses writes until the node is restarted"
    )]
    NotDurable {
        /// The collection.
        collection: String,
        /// The fsync error.
        cause: String,
    },

    /// A record failed its checksum when read: the bytes in the file are not
    /// what was written. The key's entry was **quarantined**: removed from
    /// the index (so the key now reads as missing here) and from the
    /// anti-entropy digest (so the bucket differs from replicas, which hold
    /// the good copy), and the collection was marked for compaction, which
    /// drops the damaged bytes from the file. Nothing else was changed. A
    /// caller should answer from a replica and re-apply its record.
    #[error(
        "record of collection {collection:?} at offset {offset} failed its checksum; \
         quarantined (the key reads as missing here until a replica's copy is applied)"
    )]
    Checksum {
        /// The collection.
        collection: String,
        /// Byte offset of the damaged record in the collection's file.
        offset: u64,
    },

    /// A watch cannot start (or go on) from the position it was given
    /// without missing changes: the position is from another node or
    /// another history of the collection, compaction purged deletes after
    /// it, or it is ahead of this node's log. The caller should take a
    /// snapshot (watch with [`crate::WatchFrom::Snapshot`]) instead.
    #[error("cannot resume watching {collection:?} from {position}: {reason}; take a snapshot")]
    ResumeGone {
        /// The collection.
        collection: String,
        /// The position asked for.
        position: String,
        /// Why.
        reason: &'static str,
    },

    /// Another process holds the data directory's lock. Nothing was opened.
    #[error("data directory {path} is in use by another process")]
    Locked {
        /// The directory.
        path: PathBuf,
    },
}

/// `Result` with the storage [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
