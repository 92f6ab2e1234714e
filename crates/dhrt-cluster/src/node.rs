//! The node facade: the [`Operations`] a client sees, over the local store.
//! (Replication to peers and fan-out reads join here with the cluster.)

use std::fmt::Write;
use std::time::Instant;

use bytes::Bytes;
use dhrt_proto::{
    CollectionInfo, Entry, ErrorKind, MemberInfo, MemberState, NodeInfo, NodeStats, OpError,
    Operations, Page,
};
use dhrt_storage::{CollectionStats, Error as StorageError, Store, SyncMode};

use crate::metrics::{Metrics, OpKind, Outcome};

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
    metrics: Metrics,
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
            metrics: Metrics::default(),
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

/// The operations themselves; the `Operations` impl below measures them.
impl Node {
    async fn op_get(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>, OpError> {
        user_collection(collection)?;
        self.store.get(collection, key).map_err(op_error)
    }

    async fn op_set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<(), OpError> {
        user_collection(collection)?;
        let (c, k) = (collection.to_string(), key.to_vec());
        self.write(move |s| s.set(&c, &k, &value)).await
    }

    async fn op_set_many(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> Result<(), OpError> {
        user_collection(collection)?;
        let c = collection.to_string();
        self.write(move |s| {
            let refs: Vec<(&[u8], &[u8])> = entries.iter().map(|(k, v)| (&k[..], &v[..])).collect();
            s.set_many(&c, &refs).map(|_| ())
        })
        .await
    }

    async fn op_delete(&self, collection: &str, key: &[u8]) -> Result<bool, OpError> {
        user_collection(collection)?;
        let (c, k) = (collection.to_string(), key.to_vec());
        self.write(move |s| s.delete(&c, &k)).await
    }

    async fn op_list(
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

    fn op_has_collection(&self, name: &str) -> bool {
        !name.starts_with('_') && self.store.has_keys(name)
    }

    async fn op_drop_collection(&self, collection: &str) -> Result<Vec<Bytes>, OpError> {
        user_collection(collection)?;
        let c = collection.to_string();
        let keys = self.write(move |s| s.drop_collection(&c)).await?;
        Ok(keys.into_iter().map(Bytes::from).collect())
    }

    async fn op_stats(&self) -> NodeStats {
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

/// A per-collection gauge: name, help, and how to read it.
type Gauge = (&'static str, &'static str, fn(&CollectionStats) -> u64);

/// The outcome label of a result.
fn outcome<T>(r: &Result<T, OpError>, found: impl FnOnce(&T) -> bool) -> Outcome {
    match r {
        Ok(v) if found(v) => Outcome::Ok,
        Ok(_) => Outcome::Miss,
        Err(_) => Outcome::Error,
    }
}

impl Operations for Node {
    async fn get(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>, OpError> {
        let t = Instant::now();
        let r = self.op_get(collection, key).await;
        self.metrics
            .record(OpKind::Get, outcome(&r, Option::is_some), t.elapsed(), 1);
        r
    }

    async fn set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<(), OpError> {
        let t = Instant::now();
        let r = self.op_set(collection, key, value).await;
        self.metrics
            .record(OpKind::Set, outcome(&r, |_| true), t.elapsed(), 1);
        r
    }

    async fn set_many(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> Result<(), OpError> {
        let t = Instant::now();
        let n = entries.len() as u64;
        let r = self.op_set_many(collection, entries).await;
        // A failed batch is retried one by one by the server, and counted there.
        if r.is_ok() {
            self.metrics
                .record(OpKind::Set, Outcome::Ok, t.elapsed(), n);
        }
        r
    }

    async fn delete(&self, collection: &str, key: &[u8]) -> Result<bool, OpError> {
        let t = Instant::now();
        let r = self.op_delete(collection, key).await;
        self.metrics.record(
            OpKind::Delete,
            outcome(&r, |existed| *existed),
            t.elapsed(),
            1,
        );
        r
    }

    async fn list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        let t = Instant::now();
        let r = self.op_list(collection, after, limit).await;
        self.metrics
            .record(OpKind::List, outcome(&r, |_| true), t.elapsed(), 1);
        r
    }

    fn has_collection(&self, name: &str) -> bool {
        self.op_has_collection(name)
    }

    async fn drop_collection(&self, collection: &str) -> Result<Vec<Bytes>, OpError> {
        let t = Instant::now();
        let r = self.op_drop_collection(collection).await;
        self.metrics
            .record(OpKind::Drop, outcome(&r, |_| true), t.elapsed(), 1);
        r
    }

    async fn stats(&self) -> NodeStats {
        self.op_stats().await
    }

    async fn metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(&mut out);
        let stats = self.store.stats();
        let gauges: [Gauge; 2] = [
            ("dhrt_collection_keys", "Live keys per collection.", |c| {
                c.keys
            }),
            ("dhrt_collection_bytes", "Log bytes per collection.", |c| {
                c.bytes
            }),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
            for c in stats
                .collections
                .iter()
                .filter(|c| !c.name.starts_with('_'))
            {
                let _ = writeln!(out, "{name}{{collection=\"{}\"}} {}", c.name, value(c));
            }
        }
        out.push_str("# HELP dhrt_build_info The running build.\n# TYPE dhrt_build_info gauge\n");
        let _ = writeln!(
            out,
            "dhrt_build_info{{version=\"{}\",mode=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION"),
            stats.mode
        );
        out.push_str("# HELP dhrt_uptime_seconds Seconds since the node started.\n# TYPE dhrt_uptime_seconds gauge\n");
        let _ = writeln!(
            out,
            "dhrt_uptime_seconds {}",
            self.started.elapsed().as_secs()
        );
        out
    }
}
