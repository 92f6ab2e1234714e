//! The operations a node offers, as a trait: the cluster's node implements
//! it; the HTTP API and the binary-protocol server serve whatever implements
//! it, so both are testable without a cluster.

use std::future::Future;

use bytes::Bytes;

use crate::keys::Keys;
use crate::message::{ErrorKind, Op, OpError, OpRef, Page, Reply};
use crate::stats::NodeStats;
use crate::watch::{EventSource, WatchRequest};

/// The most entries one listing page returns, whatever the request asks.
pub const MAX_PAGE: u32 = 10_000;

/// The most bytes of keys and values one listing page carries, whatever
/// the request asks: a page ends before the entry that would pass it (an
/// entry larger than this comes alone), and its `next` says where to go on.
pub const MAX_PAGE_BYTES: usize = 1 << 20;

/// What a node can do for a client.
pub trait Operations: Send + Sync + 'static {
    /// The value of `key` in `collection`, or `None`.
    fn get(
        &self,
        collection: &str,
        key: &[u8],
    ) -> impl Future<Output = Result<Option<Bytes>, OpError>> + Send;

    /// The answer [`get`](Self::get) would give, when it can be had without
    /// waiting (the key is held locally, say); `None` when only `get` can
    /// tell. Servers try this first on their hot path: it spares them
    /// building and polling a future. The default never knows.
    fn get_now(&self, collection: &str, key: &[u8]) -> Option<Result<Option<Bytes>, OpError>> {
        let _ = (collection, key);
        None
    }

    /// Sets `key` in `collection` to `value`.
    fn set(
        &self,
        collection: &str,
        key: &[u8],
        value: Bytes,
    ) -> impl Future<Output = Result<(), OpError>> + Send;

    /// Sets many keys of one collection. Implementations should check every
    /// entry first and write all or none, in one go where they can (the
    /// binary-protocol server hands a pipeline's consecutive sets here).
    /// The default sets them one by one and stops at the first error.
    fn set_many(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> impl Future<Output = Result<(), OpError>> + Send {
        async move {
            for (key, value) in entries {
                self.set(collection, &key, value).await?;
            }
            Ok(())
        }
    }

    /// Deletes `key`; returns whether it existed.
    fn delete(
        &self,
        collection: &str,
        key: &[u8],
    ) -> impl Future<Output = Result<bool, OpError>> + Send;

    /// Up to `limit` entries of `collection` after the key `after`, and at
    /// most [`MAX_PAGE_BYTES`] of them (but at least one).
    fn list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> impl Future<Output = Result<Page, OpError>> + Send;

    /// Whether a collection of this name holds any key (used to tell
    /// `GET /:collection` from `GET /:key`).
    fn has_collection(&self, name: &str) -> bool;

    /// Whether a collection of this name holds any key on another node,
    /// for one [`has_collection`](Self::has_collection) finds nothing of
    /// here: a write to it through another node may not have reached this
    /// one yet. Used before `DELETE /:x` deletes the key `x` of `default`.
    fn has_collection_elsewhere(&self, name: &str) -> impl Future<Output = bool> + Send {
        let _ = name;
        async { false }
    }

    /// Deletes every key of `collection`; returns the keys it held.
    fn drop_collection(
        &self,
        collection: &str,
    ) -> impl Future<Output = Result<Keys, OpError>> + Send;

    /// Node and cluster statistics.
    fn stats(&self) -> impl Future<Output = NodeStats> + Send;

    /// Metrics in the Prometheus text exposition format (`GET /metrics`).
    fn metrics(&self) -> impl Future<Output = String> + Send;

    /// Opens a watch of a collection (see `docs/protocol.md`, "Watch"). A
    /// node that cannot watch says so.
    fn watch(
        &self,
        request: WatchRequest,
    ) -> impl Future<Output = Result<Box<dyn EventSource>, OpError>> + Send {
        let _ = request;
        async {
            Err(OpError::new(
                crate::ErrorKind::Unavailable,
                "this node cannot watch collections",
            ))
        }
    }

    /// A collection's replication factor and owners (the cluster's default
    /// with `collection` `None`), after setting it to `set` if given. A
    /// node that is not part of a cluster says so.
    fn replicas(
        &self,
        collection: Option<&str>,
        set: Option<&str>,
    ) -> impl Future<Output = Result<crate::ReplicasInfo, OpError>> + Send {
        let _ = (collection, set);
        async {
            Err(OpError::new(
                crate::ErrorKind::Unavailable,
                "this node has no replication factor",
            ))
        }
    }

    /// Removes dead member `member` (id or address) from the cluster for
    /// good; returns its id. A node that is not part of a cluster says so.
    fn remove_member(&self, member: &str) -> impl Future<Output = Result<String, OpError>> + Send {
        let _ = member;
        async {
            Err(OpError::new(
                crate::ErrorKind::Unavailable,
                "this node has no members to remove",
            ))
        }
    }

    /// Joins the cluster of the member at `addr`; returns how many members
    /// this node then knows, itself included. A node that cannot be part of
    /// a cluster says so.
    fn join(&self, addr: &str) -> impl Future<Output = Result<u32, OpError>> + Send {
        let _ = addr;
        async {
            Err(OpError::new(
                crate::ErrorKind::Unavailable,
                "this node cannot join a cluster",
            ))
        }
    }
}

/// Runs one protocol operation against `ops`.
pub async fn dispatch<O: Operations>(ops: &O, op: Op) -> Result<Reply, OpError> {
    dispatch_ref(ops, op.as_ref()).await
}

/// Runs one protocol operation, borrowed from its frame, against `ops`.
/// Only a set's value is copied (the node keeps it).
pub async fn dispatch_ref<O: Operations>(ops: &O, op: OpRef<'_>) -> Result<Reply, OpError> {
    Ok(match op {
        OpRef::Ping => Reply::Pong,
        OpRef::Get { collection, key } => Reply::Value(match ops.get_now(collection, key) {
            Some(found) => found?,
            None => ops.get(collection, key).await?,
        }),
        OpRef::Set {
            collection,
            key,
            value,
        } => {
            ops.set(collection, key, Bytes::copy_from_slice(value))
                .await?;
            Reply::Stored
        }
        OpRef::Delete { collection, key } => Reply::Deleted(ops.delete(collection, key).await?),
        // An empty page says "the end": a page of none would lie.
        OpRef::List { limit: 0, .. } => {
            return Err(OpError::new(
                ErrorKind::InvalidInput,
                "a List asks for at least 1 entry (limit 0 would answer a last page)",
            ));
        }
        OpRef::List {
            after: Some([]), ..
        } => {
            return Err(OpError::new(
                ErrorKind::InvalidInput,
                "a List's after names a key (1 byte or more), or is None to start at the beginning",
            ));
        }
        OpRef::List {
            collection,
            after,
            limit,
        } => Reply::Page(ops.list(collection, after, limit.min(MAX_PAGE)).await?),
        OpRef::DropCollection { collection } => {
            Reply::Dropped(ops.drop_collection(collection).await?.to_bytes())
        }
        OpRef::Stats => Reply::Stats(Box::new(ops.stats().await)),
        OpRef::Join { addr } => Reply::Joined(ops.join(addr).await?),
        OpRef::RemoveMember { member } => Reply::Removed(ops.remove_member(member).await?),
        OpRef::Replicas { collection, set } => {
            Reply::Replicas(ops.replicas(collection, set).await?)
        }
        // The connection answers these: it holds the standing they change.
        OpRef::Auth { .. } | OpRef::Watch(_) => {
            return Err(OpError::new(
                crate::ErrorKind::InvalidInput,
                "Auth and Watch are answered by the connection, not dispatched",
            ));
        }
    })
}
