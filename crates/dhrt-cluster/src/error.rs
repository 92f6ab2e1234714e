//! Storage errors as the operation errors clients and peers see: the kind
//! decides the HTTP status, the binary protocol's error kind and the
//! client's error type; and the checks of a request the node makes
//! before the store would.

use dhrt_proto::{ErrorKind, OpError};
use dhrt_storage::Error as StorageError;

/// The storage error as an operation error: the kind decides the HTTP
/// status and the client's error type.
pub(crate) fn op_error(e: StorageError) -> OpError {
    let kind = match &e {
        StorageError::InvalidCollection { .. } | StorageError::InvalidKey { .. } => {
            ErrorKind::InvalidInput
        }
        StorageError::ValueTooLarge { .. } => ErrorKind::TooLarge,
        // Applied here, its durability unknown: like a write saved on
        // fewer replicas than asked, not one refused (the sentence says
        // what became of it).
        StorageError::NotDurable { .. } => {
            tracing::error!("storage error: {e}");
            ErrorKind::WriteConcern
        }
        StorageError::Poisoned { .. }
        | StorageError::DiskFull { .. }
        | StorageError::Locked { .. }
        | StorageError::TooManyCollections { .. } => ErrorKind::Unavailable,
        // A full, read-only or failing disk is not a bug, nor is a data
        // directory the node may not write (permissions, an immutable
        // flag): reads go on, and writes work again once there is room,
        // the disk is back or the permissions are (a collection whose fsync
        // failed stays refused: `Poisoned`).
        StorageError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull
                    | std::io::ErrorKind::QuotaExceeded
                    | std::io::ErrorKind::ReadOnlyFilesystem
                    | std::io::ErrorKind::PermissionDenied
            ) || source.raw_os_error() == Some(EIO) =>
        {
            // Once a second at most: a full disk fails every write.
            static FAILING: crate::throttle::LogThrottle =
                crate::throttle::LogThrottle::new(std::time::Duration::from_secs(1));
            if let Some(left_out) = FAILING.allow() {
                tracing::error!(left_out, "storage error: {e}");
            }
            ErrorKind::Unavailable
        }
        _ => ErrorKind::Internal,
    };
    if kind == ErrorKind::Internal {
        tracing::error!("storage error: {e}");
    }
    OpError::new(kind, e.to_string())
}

/// EIO (Linux), the errno of a disk that failed a read or write.
const EIO: i32 = 5;

/// The checks the store makes, for a write this node forwards without
/// storing.
pub(crate) fn check_entry(key: &[u8], value: &[u8]) -> Result<(), OpError> {
    if key.is_empty() || key.len() > dhrt_storage::MAX_KEY_LEN {
        return Err(op_error(StorageError::InvalidKey {
            len: key.len(),
            max: dhrt_storage::MAX_KEY_LEN,
        }));
    }
    if value.len() > u32::MAX as usize {
        return Err(op_error(StorageError::ValueTooLarge {
            len: value.len(),
            max: u32::MAX as usize,
        }));
    }
    Ok(())
}

/// The answer for a key whose record here failed its checksum and that no
/// replica has given back.
pub(crate) fn unrepaired(collection: &str) -> OpError {
    OpError::new(
        ErrorKind::Unavailable,
        format!(
            "this key's record in collection {collection:?} failed its checksum on this node and no replica answered for it: it is damaged, not missing (see docs/operations.md, \"Damaged records\")"
        ),
    )
}

/// The answer for a key or listing of a collection this node does not
/// own when its owners did not answer (in time, or at all: down).
pub(crate) fn owner_silent(collection: &str) -> OpError {
    OpError::new(
        ErrorKind::Unavailable,
        format!(
            "this node does not own collection {collection:?}, and its owners did not answer (in time, or they are down): what it holds is not known here (try again, or ask an owner)"
        ),
    )
}

/// Collections whose names start with `_` belong to the system.
pub(crate) fn user_collection(name: &str) -> Result<(), OpError> {
    if name.starts_with('_') {
        return Err(OpError::new(
            ErrorKind::InvalidInput,
            format!("collection names starting with '_' are reserved: {name:?}"),
        ));
    }
    // Checked here, not only by the store: a node that does not store the
    // collection forwards the write, and registers a collection it writes
    // (a name that is no collection must not reach the registry).
    dhrt_storage::validate_collection_name(name).map_err(op_error)
}

/// The answer to writes (`keys`, of `total`) a replica holds a version
/// of (or a drop of their collection) stamped `past_ms` beyond the latest
/// time this node admits: that version wins everywhere once the clocks
/// come within the allowed offset of it (a replica refusing it now takes
/// it then), so they are not acknowledged. (A cluster that took such
/// stamps while its clocks allowed, then a node joined and moved their
/// middle back; a member that wrote alone with its clock ahead.)
pub(crate) fn undone_later(
    keys: &[bytes::Bytes],
    total: usize,
    past_ms: u64,
    max_offset_ms: u64,
) -> OpError {
    // Keys as text, each cut to 64 characters, three at most.
    let shown: Vec<String> = keys
        .iter()
        .take(3)
        .map(|k| {
            let text: String = String::from_utf8_lossy(k).chars().take(64).collect();
            format!("{text:?}")
        })
        .collect();
    let more = if keys.len() > 3 { ", …" } else { "" };
    let what = match total {
        1 => "the write is not acknowledged: a replica holds a version of its key (or a drop of its collection)".to_string(),
        n => format!(
            "{} of the {n} writes (keys {}{more}) are not acknowledged: replicas hold versions of their keys (or a drop of their collection)",
            keys.len(),
            shown.join(", ")
        ),
    };
    let past_ms = past_ms.max(1);
    OpError::new(
        ErrorKind::Unavailable,
        format!(
            "{what} stamped {} s ahead of the cluster's time as this node takes it, more than the {} s allowed (check the clocks: `clock` in GET / of each node). That version wins everywhere once the clocks come within the allowed offset of it, in about {} s, and would undo the write, which until then may be read where it was stored, if anywhere. Writes to such a key are answered so until then",
            crate::skew::seconds(past_ms + max_offset_ms),
            crate::skew::seconds(max_offset_ms),
            crate::skew::seconds(past_ms)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A full, read-only or failing disk, or a data directory the node
    /// may not write, answers 503 with the system's sentence (not 500,
    /// which says a bug); other I/O errors stay internal.
    #[test]
    fn a_full_or_failing_disk_is_unavailable_not_internal() {
        let io = |errno| StorageError::Io {
            op: "write",
            path: "/data/c.dhrt".into(),
            source: std::io::Error::from_raw_os_error(errno),
        };
        for errno in [
            28,  /* ENOSPC */
            122, /* EDQUOT */
            30,  /* EROFS */
            5,   /* EIO */
            1,   /* EPERM: chattr +i on the data directory */
            13,  /* EACCES */
        ] {
            let e = op_error(io(errno));
            assert_eq!(e.kind, ErrorKind::Unavailable, "{e}");
            assert!(e.message.contains("/data/c.dhrt"), "{e}");
        }
        assert_eq!(op_error(io(9 /* EBADF */)).kind, ErrorKind::Internal);
    }
}
