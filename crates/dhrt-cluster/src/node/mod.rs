//! The node facade: the [`Operations`] a client sees, over the local store
//! and the cluster: writes are saved locally and replicated, local misses
//! are asked of the other nodes.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use dhrt_proto::{
    ErrorKind, EventSource, Keys, Mutation, NodeStats, OpError, Operations, Page, ReplicasInfo,
    WatchRequest,
};
use dhrt_storage::{Error as StorageError, Store, SyncMode, Version};

use crate::cluster::{Cluster, Identity, stamp};
use crate::combine::Combiner;
use crate::damaged::Damaged;
use crate::error::{check_entry, op_error, user_collection};
use crate::metrics::{Metrics, OpKind, Outcome};
use crate::relay::Relay;
use crate::sessions::Sessions;
use crate::watch::{WatchHub, WatchOptions};

mod read;
mod stats;

use read::LocalRead;

/// A dhrt node.
#[derive(Debug)]
pub struct Node {
    store: Store,
    identity: Identity,
    started: Instant,
    metrics: Metrics,
    cluster: Arc<Cluster>,
    /// Combines concurrent local sets that do not wait for an fsync.
    combiner: Arc<Combiner>,
    /// Keys whose record failed its checksum here and that no replica has
    /// given back yet: they read as "damaged", not "not found".
    damaged: Arc<Damaged>,
    /// The watches open on this node.
    watches: Arc<WatchHub>,
    /// Watches of collections this node does not store, followed on hosts.
    relay: Arc<Relay>,
    /// Watches peers follow here.
    sessions: Arc<Sessions>,
    /// The largest value a client may write through this node.
    max_value: usize,
    /// The node-wide budget of large values in flight, which holds values
    /// relayed from peers until their client has read them.
    inflight: Arc<dhrt_proto::Inflight>,
}

/// The largest value a node stores, and the default a client may write.
pub const MAX_VALUE: usize = 16 << 20;

impl Node {
    /// The node facade over `cluster` (and the store it was built over).
    /// A node alone is `Node::new(Cluster::single(store, identity))`.
    pub fn new(cluster: Arc<Cluster>) -> Self {
        Self::with_watch_options(cluster, WatchOptions::default())
    }

    /// A node with these watch settings.
    pub fn with_watch_options(cluster: Arc<Cluster>, watch: WatchOptions) -> Self {
        let watches = WatchHub::new(cluster.store().clone(), watch);
        Node {
            relay: Relay::new(
                cluster.clone(),
                watches.clone(),
                dhrt_proto::Inflight::unlimited(),
            ),
            sessions: Sessions::new(watches.clone()),
            watches,
            store: cluster.store().clone(),
            identity: cluster.identity().clone(),
            damaged: cluster.damaged().clone(),
            started: Instant::now(),
            metrics: Metrics::default(),
            cluster,
            combiner: Arc::default(),
            max_value: MAX_VALUE,
            inflight: dhrt_proto::Inflight::unlimited(),
        }
    }

    /// The same node, holding values it relays from peers to clients
    /// against `inflight` (shared with the servers' requests still
    /// arriving) until the client has read them. Unlimited by default.
    pub fn with_inflight(mut self, inflight: Arc<dhrt_proto::Inflight>) -> Self {
        self.relay = Relay::new(self.cluster.clone(), self.watches.clone(), inflight.clone());
        self.inflight = inflight;
        self
    }

    /// The same node, taking values of at most `max` bytes from clients
    /// (at most [`MAX_VALUE`]). Values replicated from peers are taken up
    /// to [`MAX_VALUE`] whatever this says, so that a member set lower
    /// than the others still stores every write.
    pub fn with_max_value(mut self, max: usize) -> Self {
        self.max_value = max.min(MAX_VALUE);
        self
    }

    /// Refuses a client's value over this node's maximum.
    fn check_value(&self, value: &[u8]) -> Result<(), OpError> {
        if value.len() > self.max_value {
            return Err(OpError::new(
                ErrorKind::TooLarge,
                format!(
                    "a value of {} bytes is over this node's maximum of {} bytes (--max-value-bytes)",
                    value.len(),
                    self.max_value
                ),
            ));
        }
        Ok(())
    }

    /// The cluster side of this node.
    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    /// The watch sessions peers follow on this node.
    pub(crate) fn watch_sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    /// Where watchers do their work (see `WatchOptions::runtime`).
    pub fn watch_runtime(&self) -> Option<tokio::runtime::Handle> {
        self.watches.runtime()
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
    /// Sets `key` as [`Operations::set`] does and returns the version the
    /// write was stamped with.
    pub async fn set_stamped(
        &self,
        collection: &str,
        key: &[u8],
        value: Bytes,
    ) -> Result<Version, OpError> {
        let t = Instant::now();
        let r = self.op_set(collection, key, value).await;
        self.metrics
            .record(OpKind::Set, outcome(&r, |_| true), t.elapsed(), 1);
        r
    }

    /// Deletes `key` as [`Operations::delete`] does; also returns the
    /// tombstone's version (`None` when a node without peers had nothing to
    /// delete).
    pub async fn delete_stamped(
        &self,
        collection: &str,
        key: &[u8],
    ) -> Result<(bool, Option<Version>), OpError> {
        let t = Instant::now();
        let r = self.op_delete(collection, key).await;
        self.metrics.record(
            OpKind::Delete,
            outcome(&r, |(existed, _)| *existed),
            t.elapsed(),
            1,
        );
        r
    }

    /// Why this node refuses client writes now, if it does.
    async fn refuse_writes(&self) -> Result<(), OpError> {
        self.cluster.clear_to_write().await
    }

    async fn op_set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<Version, OpError> {
        user_collection(collection)?;
        self.check_value(&value)?;
        check_entry(key, &value)?;
        self.refuse_writes().await?;
        let local = self.cluster.stores_locally(collection);
        let version = if local && self.store.options().sync != SyncMode::Always {
            // Handed to the kernel only: inline, nothing copied.
            self.store
                .set_versioned(collection, key, &value)
                .map_err(op_error)?
        } else if local {
            let (c, k, v) = (collection.to_string(), key.to_vec(), value.clone());
            self.write(move |s| s.set_versioned(&c, &k, &v)).await?
        } else {
            self.cluster.stamp_now()
        };
        if local {
            self.cluster.register(collection);
        }
        if self.cluster.has_peers() {
            let m = Mutation::Put {
                collection: collection.to_string(),
                key: Bytes::copy_from_slice(key),
                value: Some(value),
                version: stamp(version),
            };
            let replicated = self.cluster.replicate_one(m, local).await;
            if !local {
                self.register_forwarded(collection, &replicated);
            }
            return replicated;
        }
        self.cluster.unreached_concern(collection)?;
        Ok(version)
    }

    /// Registers the collection of a write this node forwarded once the
    /// write is saved somewhere (acknowledged, or saved on some node and
    /// due to reach the rest: a 504): not a write every owner refused.
    fn register_forwarded<T>(&self, collection: &str, outcome: &Result<T, OpError>) {
        match outcome {
            Ok(_) => self.cluster.register(collection),
            Err(e) if e.kind == ErrorKind::WriteConcern => self.cluster.register(collection),
            Err(_) => {}
        }
    }

    async fn op_set_many(
        &self,
        collection: &str,
        entries: Vec<(Bytes, Bytes)>,
    ) -> Result<(), OpError> {
        user_collection(collection)?;
        for (key, value) in &entries {
            self.check_value(value)?;
            check_entry(key, value)?;
        }
        self.refuse_writes().await?;
        let local = self.cluster.stores_locally(collection);
        let peers = self.cluster.has_peers();
        let (versions, entries) = if local && self.store.options().sync != SyncMode::Always {
            // Combined with the sets of other connections running now; the
            // entries are kept (reference counts, not bytes) to replicate.
            let kept = if peers { entries.clone() } else { Vec::new() };
            let versions = self
                .combiner
                .set_many(&self.store, collection, entries)
                .await
                .map_err(op_error)?;
            (versions, kept)
        } else if local {
            let (c, shared) = (collection.to_string(), Arc::new(entries));
            let batch = shared.clone();
            let versions = self
                .write(move |s| {
                    let refs: Vec<(&[u8], &[u8])> =
                        batch.iter().map(|(k, v)| (&k[..], &v[..])).collect();
                    s.set_many(&c, &refs)
                })
                .await?;
            (versions, Arc::unwrap_or_clone(shared))
        } else {
            (
                entries.iter().map(|_| self.cluster.stamp_now()).collect(),
                entries,
            )
        };
        if local {
            self.cluster.register(collection);
        }
        if !peers {
            return self.cluster.unreached_concern(collection);
        }
        let mutations = entries
            .into_iter()
            .zip(versions)
            .map(|((key, value), version)| Mutation::Put {
                collection: collection.to_string(),
                key,
                value: Some(value),
                version: stamp(version),
            })
            .collect();
        let replicated = self.cluster.replicate(mutations, local).await;
        if !local {
            self.register_forwarded(collection, &replicated);
        }
        replicated
    }

    async fn op_delete(
        &self,
        collection: &str,
        key: &[u8],
    ) -> Result<(bool, Option<Version>), OpError> {
        user_collection(collection)?;
        self.refuse_writes().await?;
        let (c, k) = (collection.to_string(), key.to_vec());
        // A key quarantined here as damaged exists: deleting it writes a
        // tombstone (which ends its "damaged" answers) and is no 404.
        let mut damaged = self.is_damaged(collection, key);
        // A node not yet in touch with the members it was given writes a
        // tombstone too: the key may exist on them.
        let peers = self.cluster.has_peers() || self.cluster.unreached();
        if !peers && !damaged {
            return Ok((self.write(move |s| s.delete(&c, &k)).await?, None));
        }
        // Whether a key this node has no entry for existed is a question for
        // the whole cluster.
        let known_here = match self.store.get_versioned(collection, key) {
            Err(StorageError::Checksum { .. }) => {
                damaged = true;
                None
            }
            other => other.map_err(op_error)?,
        };
        let (remote, unknown) = match known_here {
            // On an owner, its own word counts: "not found" is known.
            None if peers => {
                let (remote, unknown) = self.cluster.remote_version(collection, key).await;
                (remote, unknown && !self.cluster.hosts_here(collection))
            }
            _ => (None, false),
        };
        // As for a set: a node that does not store the collection stamps
        // the delete and leaves the tombstone to the replicas, and does not
        // count itself as one of them for the write concern.
        let local = !peers || self.cluster.stores_locally(collection);
        let (mut version, was_live) = if local {
            self.write(move |s| s.delete_versioned(&c, &k)).await?
        } else {
            check_entry(key, &[])?;
            let live_here = matches!(known_here, Some((Some(_), _)));
            (self.cluster.stamp_after(remote.map(|(v, _)| v)), live_here)
        };
        if peers {
            let m = Mutation::Put {
                collection: collection.to_string(),
                key: Bytes::copy_from_slice(key),
                value: None,
                version: stamp(version),
            };
            version = self.cluster.replicate_one(m, local).await?;
        }
        if local {
            self.damaged.remove(collection, key);
        }
        // A key damaged here existed if no replica could say; so may one no
        // owner could say anything of (all down): the delete is written,
        // and "not found" would be a guess.
        let existed = was_live || remote.map_or(damaged || unknown, |(_, live)| live);
        Ok((existed, peers.then_some(version)))
    }

    async fn op_list(
        &self,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        user_collection(collection)?;
        // A node that syncs holds part of what its peers were acknowledged:
        // an owner that does not sync lists in its place, if one answers.
        if self.cluster.has_peers()
            && self.cluster.hosts_here(collection)
            && self.cluster.syncs()
            && let Some(page) = self
                .cluster
                .list_remote(collection, after, limit, true)
                .await
        {
            return self.relayed(page);
        }
        if !self.cluster.everyone_owns_everything() && !self.cluster.hosts_here(collection) {
            // An owner's listing: a copy here is partial, or gone.
            if let Some(page) = self
                .cluster
                .list_remote(collection, after, limit, false)
                .await
            {
                return self.relayed(page);
            }
            // Without its owners, a listing would look complete.
            if !self.cluster.owners(collection).is_empty() {
                return Err(crate::error::owner_silent(collection));
            }
            // No member owns it: its writes were kept by the members they
            // went through (see `stores_locally`).
            if self.cluster.has_peers() {
                return self
                    .cluster
                    .list_everywhere(&self.store, collection, after, limit)
                    .await;
            }
        }
        crate::cluster::list_local(&self.store, collection, after, limit)
    }

    /// A page another node listed, held in this node's memory until the
    /// client has read it.
    fn relayed(&self, mut page: Page) -> Result<Page, OpError> {
        let parts = page
            .entries
            .iter_mut()
            .flat_map(|e| [&mut e.key, &mut e.value])
            .collect();
        self.inflight
            .hold_all(parts)
            .map_err(|e| OpError::new(ErrorKind::Unavailable, e))?;
        Ok(page)
    }

    fn op_has_collection(&self, name: &str) -> bool {
        !name.starts_with('_')
            && (self.store.has_keys(name)
                || (!self.cluster.everyone_owns_everything() && self.cluster.is_registered(name))
                || self.cluster.expects(name))
    }

    async fn op_drop_collection(&self, collection: &str) -> Result<Keys, OpError> {
        user_collection(collection)?;
        self.refuse_writes().await?;
        self.damaged.remove_collection(collection);
        let c = collection.to_string();
        let version = self.store.clock().now();
        let keys = self
            .write(move |s| s.apply_drop(&c, version))
            .await?
            .unwrap_or_default();
        let m = Mutation::Drop {
            collection: collection.to_string(),
            version: stamp(version),
        };
        self.cluster.replicate(vec![m], true).await?;
        let (bytes, ends) = keys.into_parts();
        Ok(Keys::from_parts(bytes, ends))
    }

    /// Opens a watch of a collection this node stores.
    async fn op_watch(&self, request: WatchRequest) -> Result<Box<dyn EventSource>, OpError> {
        user_collection(&request.collection)?;
        dhrt_storage::validate_collection_name(&request.collection).map_err(op_error)?;
        self.relay.watch(request).await
    }
}

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

    fn get_now(&self, collection: &str, key: &[u8]) -> Option<Result<Option<Bytes>, OpError>> {
        let t = Instant::now();
        let LocalRead::Answer(r) = self.local_read(collection, key) else {
            return None;
        };
        self.metrics
            .record(OpKind::Get, outcome(&r, Option::is_some), t.elapsed(), 1);
        Some(r)
    }

    async fn set(&self, collection: &str, key: &[u8], value: Bytes) -> Result<(), OpError> {
        self.set_stamped(collection, key, value).await.map(|_| ())
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
        self.delete_stamped(collection, key)
            .await
            .map(|(existed, _)| existed)
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

    async fn has_collection_elsewhere(&self, name: &str) -> bool {
        user_collection(name).is_ok()
            && self.cluster.has_peers()
            && self.cluster.held_elsewhere(name).await
    }

    async fn replicas(&self, c: Option<&str>, set: Option<&str>) -> Result<ReplicasInfo, OpError> {
        if set.is_some() {
            self.refuse_writes().await?;
        }
        self.cluster.replicas_op(c, set).await
    }

    async fn drop_collection(&self, collection: &str) -> Result<Keys, OpError> {
        let t = Instant::now();
        let r = self.op_drop_collection(collection).await;
        self.metrics
            .record(OpKind::Drop, outcome(&r, |_| true), t.elapsed(), 1);
        r
    }

    async fn stats(&self) -> NodeStats {
        self.op_stats().await
    }

    async fn watch(&self, request: WatchRequest) -> Result<Box<dyn EventSource>, OpError> {
        self.op_watch(request).await
    }

    async fn join(&self, addr: &str) -> Result<u32, OpError> {
        self.cluster.join_running(addr).await
    }

    async fn remove_member(&self, member: &str) -> Result<String, OpError> {
        self.cluster.remove_member(member)
    }

    async fn metrics(&self) -> String {
        let mut out = String::new();
        self.metrics.render(&mut out);
        self.cluster.render_metrics(&mut out);
        self.watches.render_metrics(&mut out);
        crate::metrics::render_store(&mut out, &self.store.stats(), self.started.elapsed());
        out.push_str(
            "# HELP dhrt_damaged_keys Keys whose record failed its checksum here and that no replica has given back yet (they answer 503 damaged).\n# TYPE dhrt_damaged_keys gauge\n",
        );
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!("dhrt_damaged_keys {}\n", self.damaged.len()),
        );
        out
    }
}
