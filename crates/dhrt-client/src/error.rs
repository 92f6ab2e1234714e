//! The client's error type.

use std::io;

use dhrt_proto::{ErrorKind, OpError, ProtoError};

/// What can go wrong talking to a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Could not connect.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The address tried.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The connection broke (or the node closed it) before the answer came;
    /// the request may or may not have been applied.
    #[error("connection to the node lost: {0}")]
    Disconnected(String),
    /// The node sent something that is not the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtoError),
    /// The request was refused as invalid (bad name, empty key, ...).
    #[error("invalid request: {0}")]
    InvalidInput(String),
    /// Something named does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A key, value or frame over its limit.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The node cannot serve the request now.
    #[error("node unavailable: {0}")]
    Unavailable(String),
    /// The node (or a peer it asked) timed out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The node failed unexpectedly.
    #[error("node error: {0}")]
    Internal(String),
    /// The write is saved, but on fewer replicas than the node's write
    /// concern asks (within its timeout); it will reach the others. The
    /// message says on how many of how many.
    #[error("{0}")]
    WriteConcern(String),
    /// No valid token: none given to a node that needs one, an unknown or
    /// revoked one, or a client off loopback on a node without an auth
    /// file. The message says which.
    #[error("not authenticated: {0}")]
    Unauthenticated(String),
    /// The token's role may not do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A watch cannot resume from its token without missing changes (the
    /// token is from another node, or compaction purged deletes after it):
    /// take a snapshot.
    #[error("cannot resume: {0}")]
    Gone(String),
    /// The node answered with a reply of the wrong kind.
    #[error("unexpected reply from the node: {0}")]
    UnexpectedReply(String),
}

impl From<OpError> for Error {
    fn from(e: OpError) -> Self {
        match e.kind {
            ErrorKind::InvalidInput => Error::InvalidInput(e.message),
            ErrorKind::NotFound => Error::NotFound(e.message),
            ErrorKind::TooLarge => Error::TooLarge(e.message),
            ErrorKind::Unavailable => Error::Unavailable(e.message),
            ErrorKind::Timeout => Error::Timeout(e.message),
            ErrorKind::WriteConcern => Error::WriteConcern(e.message),
            ErrorKind::Unauthenticated => Error::Unauthenticated(e.message),
            ErrorKind::Forbidden => Error::Forbidden(e.message),
            ErrorKind::Gone => Error::Gone(e.message),
            _ => Error::Internal(e.message),
        }
    }
}
