//! Storage errors as the operation errors clients and peers see: the kind
//! decides the HTTP status, the binary protocol's error kind and the
//! client's error type.

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
        StorageError::Poisoned { .. }
        | StorageError::Locked { .. }
        | StorageError::TooManyCollections { .. } => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    if kind == ErrorKind::Internal {
        tracing::error!("storage error: {e}");
    }
    OpError::new(kind, e.to_string())
}
