//! The messages of the binary protocol: a client's [`Request`] and the node's
//! [`Response`]. Each request carries an id, echoed in its response, so a
//! client may pipeline many requests on one connection.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::auth::Role;
use crate::stats::NodeStats;

/// A request: an id chosen by the client and an operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// Echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// An operation on the node. `collection` is a collection name
/// (`[A-Za-z0-9_-]{1,64}`; `default` when the user named none).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Answered with [`Reply::Pong`].
    Ping,
    /// The value of a key: [`Reply::Value`].
    Get {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
    },
    /// Set a key: [`Reply::Stored`].
    Set {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
        /// Value.
        value: Bytes,
    },
    /// Delete a key: [`Reply::Deleted`].
    Delete {
        /// Collection.
        collection: String,
        /// Key.
        key: Bytes,
    },
    /// A page of a collection's keys and values: [`Reply::Page`].
    List {
        /// Collection.
        collection: String,
        /// Resume after this key (the `next` of the previous page).
        after: Option<Bytes>,
        /// At most this many entries.
        limit: u32,
    },
    /// Delete a whole collection: [`Reply::Dropped`].
    DropCollection {
        /// Collection.
        collection: String,
    },
    /// Node and cluster statistics: [`Reply::Stats`].
    Stats,
    /// Join the cluster that the member at `addr` belongs to:
    /// [`Reply::Joined`]. The node learns the members, they learn it, and
    /// its data and theirs are exchanged.
    Join {
        /// Any member's address (`host:port`).
        addr: String,
    },
    /// Present a token: [`Reply::Authenticated`] with its role, or an
    /// [`ErrorKind::Unauthenticated`] error. On a node with an auth file a
    /// connection must send this before anything else; a later `Auth`
    /// replaces the token. A node without one answers with the role the
    /// connection already has.
    Auth {
        /// The token (`dhrt_...`).
        token: String,
    },
    /// Watch a collection: the connection becomes a stream of
    /// [`Reply::Events`] answers carrying this request's id, until an error
    /// answer ends it (or the client closes the connection). Nothing else
    /// may be sent on the connection after it. See `docs/protocol.md`.
    Watch(crate::WatchRequest),
    /// A collection's replication factor and owners, or the cluster's
    /// default with `collection` `None`; with `set`, first sets it (`all`
    /// or a number): [`Reply::Replicas`].
    Replicas {
        /// The collection, or `None` for the cluster's default.
        collection: Option<String>,
        /// The new replication factor, if one is set.
        set: Option<String>,
    },
    /// Remove a dead member that will not come back (its id, 16 hex
    /// digits, or its address): it owns nothing from then on, and its
    /// collections are copied to new owners. Refused for a member that is
    /// not dead: [`Reply::Removed`].
    RemoveMember {
        /// The member's id or address.
        member: String,
    },
}

/// A [`Request`] decoded without copying: its names, keys and values borrow
/// from the frame. Same bytes on the wire; the server decodes this.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RequestRef<'a> {
    /// Echoed in the response.
    pub id: u64,
    /// What to do.
    #[serde(borrow)]
    pub op: OpRef<'a>,
}

/// An [`Op`] borrowing from its frame (variants and fields in the same
/// order, so the encodings are the same).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[allow(missing_docs)]
pub enum OpRef<'a> {
    Ping,
    Get {
        collection: &'a str,
        key: &'a [u8],
    },
    Set {
        collection: &'a str,
        key: &'a [u8],
        value: &'a [u8],
    },
    Delete {
        collection: &'a str,
        key: &'a [u8],
    },
    List {
        collection: &'a str,
        after: Option<&'a [u8]>,
        limit: u32,
    },
    DropCollection {
        collection: &'a str,
    },
    Stats,
    Join {
        addr: &'a str,
    },
    Auth {
        token: &'a str,
    },
    Watch(crate::WatchRequest),
    Replicas {
        collection: Option<&'a str>,
        set: Option<&'a str>,
    },
    RemoveMember {
        member: &'a str,
    },
}

impl Op {
    /// This operation as the borrowed form.
    pub fn as_ref(&self) -> OpRef<'_> {
        match self {
            Op::Ping => OpRef::Ping,
            Op::Get { collection, key } => OpRef::Get { collection, key },
            Op::Set {
                collection,
                key,
                value,
            } => OpRef::Set {
                collection,
                key,
                value,
            },
            Op::Delete { collection, key } => OpRef::Delete { collection, key },
            Op::List {
                collection,
                after,
                limit,
            } => OpRef::List {
                collection,
                after: after.as_deref(),
                limit: *limit,
            },
            Op::DropCollection { collection } => OpRef::DropCollection { collection },
            Op::Stats => OpRef::Stats,
            Op::Join { addr } => OpRef::Join { addr },
            Op::Auth { token } => OpRef::Auth { token },
            Op::Watch(w) => OpRef::Watch(w.clone()),
            Op::Replicas { collection, set } => OpRef::Replicas {
                collection: collection.as_deref(),
                set: set.as_deref(),
            },
            Op::RemoveMember { member } => OpRef::RemoveMember { member },
        }
    }
}

/// A response: the request's id and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The id of the request answered.
    pub id: u64,
    /// What happened.
    pub result: Result<Reply, OpError>,
}

/// A successful outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// To [`Op::Ping`].
    Pong,
    /// To [`Op::Get`]: the value, or `None` if the key does not exist.
    Value(Option<Bytes>),
    /// To [`Op::Set`].
    Stored,
    /// To [`Op::Delete`]: whether the key existed.
    Deleted(bool),
    /// To [`Op::List`].
    Page(Page),
    /// To [`Op::DropCollection`]: the keys the collection held.
    Dropped(Vec<Bytes>),
    /// To [`Op::Stats`]. Boxed: it is large and rare, and every reply is
    /// as large as its largest variant (boxing changes nothing on the wire).
    Stats(Box<NodeStats>),
    /// To [`Op::Join`]: how many members the node now knows, itself
    /// included.
    Joined(u32),
    /// To [`Op::Auth`]: the role the connection now has.
    Authenticated(Role),
    /// To [`Op::Watch`], any number of times: the next events.
    Events(Vec<crate::WatchEvent>),
    /// To [`Op::Replicas`].
    Replicas(ReplicasInfo),
    /// To [`Op::RemoveMember`]: the removed member's id (16 hex digits).
    Removed(String),
}

impl Reply {
    /// The values this reply carries that are worth sharing rather than
    /// copying into a frame (see [`crate::encode_frame_shared`]).
    pub fn large_values(&self) -> Vec<&Bytes> {
        let large = |v: &&Bytes| v.len() >= crate::SHARE_AT_LEAST;
        match self {
            Reply::Value(Some(v)) => [v].into_iter().filter(large).collect(),
            Reply::Page(p) => p.entries.iter().map(|e| &e.value).filter(large).collect(),
            Reply::Events(events) => events
                .iter()
                .filter_map(|e| e.value.as_ref())
                .filter(large)
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// A collection's placement, or the cluster's default replication factor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicasInfo {
    /// The collection, or `None` for the cluster's default.
    pub collection: Option<String>,
    /// Its replication factor: `all`, or how many members own it.
    pub replicas: String,
    /// The members that own it (node ids, 16 hex digits), best placement
    /// score first; empty for the default.
    pub owners: Vec<String>,
    /// Fewer members can own it than its replication factor asks.
    pub under_replicated: bool,
}

/// One key and its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The key.
    pub key: Bytes,
    /// The value.
    pub value: Bytes,
}

/// A page of a listing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Entries, in the collection's listing order.
    pub entries: Vec<Entry>,
    /// Pass as `after` to get the next page; `None` on the last page.
    pub next: Option<Bytes>,
}

/// Why an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request was wrong: a bad name, an empty key, ... (HTTP 400).
    InvalidInput,
    /// Something named does not exist (HTTP 404).
    NotFound,
    /// A key, value or frame over its limit (HTTP 413).
    TooLarge,
    /// The node cannot serve this now: shutting down, a collection refusing
    /// writes after a failed fsync, no host reachable (HTTP 503).
    Unavailable,
    /// A peer did not answer in time (HTTP 504).
    Timeout,
    /// A bug or an unexpected I/O error (HTTP 500).
    Internal,
    /// The write is saved, but on fewer replicas than the write concern
    /// asks within the timeout; it will reach the others (HTTP 504).
    WriteConcern,
    /// No valid token: none sent, an unknown or revoked one, or a client
    /// off loopback on a node without an auth file (HTTP 401).
    Unauthenticated,
    /// The token's role may not do this (HTTP 403).
    Forbidden,
    /// A watch cannot resume from the token it was given without missing
    /// changes: take a snapshot (HTTP 410).
    Gone,
}

/// A failed operation: a kind for programs and a sentence for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// What kind of failure.
    pub kind: ErrorKind,
    /// A readable sentence.
    pub message: String,
}

impl OpError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        OpError {
            kind,
            message: message.into(),
        }
    }
}
