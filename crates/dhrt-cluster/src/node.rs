//! The node facade: the [`Operations`] a client sees, over the local store.
//! (Replication to peers and fan-out reads join here with the cluster.)

use std::time::Instant;

use bytes::Bytes;
use dhrt_proto::{
    CollectionInfo, Entry, ErrorKind, MemberInfo, MemberState, NodeInfo, NodeStats, OpError,
    Operations, Page,
};
use dhrt_storage::{Error as StorageError, Store, SyncMode};

/// Who this node is.
#[derive(Debug, Clone)]
pub struct Identity {
    /// The node id, stamped into versions.
    pub id: u64,
    /// Human name.
    pub name: String,
    /// The address peers and clients use.
    pub addr: String,
}

/// A dhrt node.
#[derive(Debug)]
pub struct Node {
    store: Store,
    identity: Identity,
    started: Instant,
}

/// The storage error as an operation error: the kind decides the HTTP
/// status and the client's error type.
fn op_error(e: StorageError) -> OpError {
    let kind = match &e {
        StorageError::InvalidCollection { .. } | StorageError::InvalidKey { .. } => {
            ErrorKind::InvalidInput
        }
        StorageError::ValueTooLarge { .. } => ErrorKind::TooLarge,
        StorageError::Poisoned { .. } | StorageError::Locked { .. } => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    };
    if kind == ErrorKind::Internal {
        tracing::error!("storage error: {e}");
    }
    OpError::new(kind, e.to_string())
}

/// Collections whose names start with `_` belong to the system.
fn user_collection(name: &str) -> Result<(), OpError> {
    if name.starts_with('_') {
        return Err(OpError::new(
            ErrorKind::InvalidInput,
            format!("collection names starting with '_' are reserved: {name:?}"),
        ));
    }
    Ok(())
}

impl Node {
    /// A node serving `store`.
    pub fn new(store: Store, identity: Identity) -> Self {
        Node {
            store,
            identity,
            started: Instant::now(),
        }
    }

    /// The local store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Runs a store write: inline when it only hands data to the kernel,
    /// on the blocking pool when it waits for an fsync.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, OpError> {
        if self.store.options().sync == SyncMode::Always {
            let store = self.store.clone();
            tokio::task::spawn_blocking(move || f(&store))
                .await
                .map_err(|e| OpError::new(ErrorKind::Internal, format!("write task failed: {e}")))?
                .map_err(op_error)
        } else {
            f(&self.store).map_err(op_error)
        }
    }
}

impl Operations for Node {
    async fn get(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>, OpError> {
        user_collection(collection)?;
        self.store.get(collection, key).map_err(op_error)
    }

    async fn set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<(), OpError> {
        user_collection(collection)?;
        let (c, k) = (collection.to_string(), key.to_vec());
        self.write(move |s| s.set(&c, &k, &value)).await
    }

    async fn set_many(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> Result<(), OpError> {
        user_collection(collection)?;
        let c = collection.to_string();
        self.write(move |s| {
            let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            s.set_many(&c, &refs)
        })
        .await
    }

    async fn delete(&self, collection: &str, key: &[u8]) -> Result<bool, OpError> {
        user_collection(collection)?;
        let (c, k) = (collection.to_string(), key.to_vec());
        self.write(move |s| s.delete(&c, &k)).await
    }

    async fn list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        user_collection(collection)?;
        let mut entries: Vec<Entry> = self
            .store
            .list(collection, after, true)
            .map_err(op_error)?
            .take(limit as usize + 1)
            .map(|r| Entry {
                key: r.key.into(),
                value: r.value.unwrap_or_default(),
            })
            .collect();
        let more = entries.len() > limit as usize;
        entries.truncate(limit as usize);
        let next = if more {
            entries.last().map(|e| e.key.clone())
        } else {
            None
        };
        Ok(Page { entries, next })
    }

    fn has_collection(&self, name: &str) -> bool {
        !name.starts_with('_') && self.store.collections().iter().any(|c| c == name)
    }

    async fn drop_collection(&self, collection: &str) -> Result<Vec<Bytes>, OpError> {
        user_collection(collection)?;
        let c = collection.to_string();
        let keys = self.write(move |s| s.drop_collection(&c)).await?;
        Ok(keys.into_iter().map(Bytes::from).collect())
    }

    async fn stats(&self) -> NodeStats {
        let stats = self.store.stats();
        let id = format!("{:016x}", self.identity.id);
        NodeStats {
            node: NodeInfo {
                id: id.clone(),
                name: self.identity.name.clone(),
                addr: self.identity.addr.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                mode: stats.mode.to_string(),
                data_dir: stats
                    .data_dir
                    .as_deref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                uptime_s: self.started.elapsed().as_secs(),
            },
            collections: stats
                .collections
                .into_iter()
                .filter(|c| c.keys > 0 && !c.name.starts_with('_'))
                .map(|c| CollectionInfo {
                    name: c.name,
                    keys: c.keys,
                    bytes: c.bytes,
                })
                .collect(),
            members: vec![MemberInfo {
                id,
                name: self.identity.name.clone(),
                addr: self.identity.addr.clone(),
                state: MemberState::Healthy,
            }],
        }
    }
}
