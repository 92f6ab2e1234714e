//! Inbound peer data: replicated mutations applied through the clock guard
//! record by record, digests, and paged bucket listings for anti-entropy.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use dhrt_proto::{BucketCursor, ErrorKind, Mutation, OpError, PeerReply, Stamp};
use dhrt_storage::{Replicated, SyncMode};

use super::{Cluster, stamp, version};
use crate::batch::mutation_bytes;
use crate::link::LinkError;
use crate::skew::Guard;

/// What applying replicated mutations did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Applied {
    /// How many took effect.
    pub(crate) applied: u64,
    /// Indexes of those refused, ascending: by the clock guard, of a
    /// collection this node may not create (at its collection cap), or
    /// invalid.
    pub(crate) refused: Vec<u32>,
    /// Indexes of puts that lost to a newer version held here (or to the
    /// collection's drop), with that version, and of drops that left a
    /// live key written at or after them, with its version; ascending.
    pub(crate) newer: Vec<(u32, Stamp)>,
}

impl Applied {
    /// The answer to [`dhrt_proto::PeerOp::ApplyReporting`].
    pub(crate) fn reporting(self) -> PeerReply {
        if self.newer.is_empty() {
            return self.into();
        }
        PeerReply::Superseded {
            applied: self.applied,
            refused: self.refused,
            newer: self.newer,
        }
    }
}

impl From<Applied> for PeerReply {
    fn from(a: Applied) -> Self {
        PeerReply::Applied {
            applied: a.applied,
            refused: a.refused,
        }
    }
}

/// A local storage error met during a sync with a peer.
pub(super) fn local_error(e: dhrt_storage::Error) -> LinkError {
    LinkError::Local(crate::error::op_error(e))
}

impl Cluster {
    /// Applies replicated mutations. Each passes the clock guard on its
    /// own: one stamped too far ahead of this node's clock is refused (not
    /// stored, not observed by the clock) and listed in the outcome; the
    /// others apply. Runs of puts to one collection go to the store as one
    /// batch (one lock, one write). An error is this node's own (storage).
    /// With `report`, a drop behind a newer one there tells the newest key
    /// kept too (a walk of the index: for `ApplyReporting` only).
    pub(crate) fn apply(&self, mutations: &[Mutation], report: bool) -> Result<Applied, OpError> {
        if mutations
            .iter()
            .any(|m| super::collection_of(m) == super::owners::SETTINGS)
        {
            // Read after this apply, whatever it takes.
            let applied = self.apply_records(mutations, report);
            self.settings_changed();
            return applied;
        }
        self.apply_records(mutations, report)
    }

    fn apply_records(&self, mutations: &[Mutation], report: bool) -> Result<Applied, OpError> {
        let guard = self.guard();
        let wall = self.admission_wall();
        let mut refused = Vec::new();
        for (i, m) in mutations.iter().enumerate() {
            let (Mutation::Put { version: v, .. } | Mutation::Drop { version: v, .. }) = m;
            if !guard.admits(v.ts, wall) {
                refused.push(i as u32);
            }
        }
        let stamp_of = |i: u32| {
            let (Mutation::Put { version: v, .. } | Mutation::Drop { version: v, .. }) =
                &mutations[i as usize];
            v
        };
        // The one furthest ahead, for the message (a batch can mix them).
        if let Some(v) = refused.iter().map(|&i| stamp_of(i)).max_by_key(|v| v.ts) {
            self.refused_future
                .fetch_add(refused.len() as u64, Ordering::Relaxed);
            // A peer far ahead sends batch after batch: one line in five
            // seconds says it (dhrt_refused_future_total counts them all).
            static REFUSED: crate::throttle::LogThrottle =
                crate::throttle::LogThrottle::new(std::time::Duration::from_secs(5));
            if let Some(left_out) = REFUSED.allow() {
                tracing::error!(
                    left_out,
                    "refused {} records from node {:016x}, stamped up to {} s ahead of this node's clock (more than the {} s allowed): check the clocks",
                    refused.len(),
                    v.node,
                    Guard::ahead_s(v.ts, wall),
                    guard.max_offset_ms / 1000
                );
            }
        }
        // Records no node sends: of a system collection other than the two
        // replicated ones, a registry entry that is no client's collection
        // name, the drop of a system collection.
        let forbidden: Vec<u32> = (0..mutations.len() as u32)
            .filter(|&i| !peer_may_write(&mutations[i as usize]))
            .collect();
        // A tombstone past its grace period for a key this node holds no
        // record of is not written: this node purged it (or never had the
        // key), and the members that may still hold an older value get it
        // from the nodes holding it (`tombstones.rs`). Written, it would
        // be purged again, pushed back by a node still holding it, and so
        // on, each pass a watch event and a compaction. (A key quarantined
        // here as damaged reads as missing, but it is no purged delete.)
        let purged_before = self
            .wall_ms()
            .saturating_sub(self.store.options().tombstone_grace.as_millis() as u64);
        let spent: Vec<u32> = (0..mutations.len() as u32)
            .filter(|&i| match &mutations[i as usize] {
                Mutation::Put {
                    collection,
                    key,
                    value: None,
                    version: v,
                } => {
                    version(*v).physical_ms() < purged_before
                        && matches!(self.store.lookup(collection, key), Ok(None))
                        // A key quarantined here is repaired by it.
                        && !self.damaged.holds(&self.store, collection, key)
                }
                _ => false,
            })
            .collect();
        let admitted = |i: usize| {
            refused.binary_search(&(i as u32)).is_err()
                && forbidden.binary_search(&(i as u32)).is_err()
                && spent.binary_search(&(i as u32)).is_err()
        };
        // Records this node may not store (a collection it may not create:
        // it holds as many as it can keep open; a name, key or value no
        // client could have written): refused one by one, like records
        // stamped too far ahead, and the rest of the batch applies.
        // Tombstones and drops reach this node later than they were
        // stamped: held from their stamps until every member has had a
        // round since (`tombstones.rs`), before any can be purged. One it
        // holds already (or something newer) is no arrival: anti-entropy
        // brings the whole of a bucket that differs, and a bucket that
        // stays different (a tombstone past its grace that a member back
        // from a long absence does not take) would otherwise hold every
        // old tombstone in it, round after round, and nothing would ever
        // be purged.
        let oldest_tombstone = mutations
            .iter()
            .enumerate()
            .filter(|&(i, _)| admitted(i))
            .filter_map(|(_, m)| match m {
                Mutation::Put {
                    collection,
                    key,
                    value: None,
                    version: v,
                } => {
                    let v = version(*v);
                    let held = self.store.version_of(collection, key);
                    (!matches!(held, Ok(Some(have)) if have >= v)).then(|| v.physical_ms())
                }
                Mutation::Drop { version: v, .. } => Some(version(*v).physical_ms()),
                Mutation::Put { .. } => None,
            })
            .min();
        if let Some(stamp_ms) = oldest_tombstone {
            self.note_arrived_tombstones(stamp_ms);
        }
        let mut unstorable: Vec<u32> = forbidden.clone();
        let mut newer = Vec::new();
        let mut applied = 0;
        let mut i = 0;
        while i < mutations.len() {
            if !admitted(i) {
                i += 1;
                continue;
            }
            match &mutations[i] {
                Mutation::Drop {
                    collection,
                    version: v,
                } => {
                    match self.store.apply_drop_newer(collection, version(*v), report) {
                        Ok((took, kept)) => {
                            applied += u64::from(took.is_some());
                            // A key written at or after it stays: the
                            // writer stamps the drop again, later.
                            newer.extend(kept.map(|kept| (i as u32, stamp(kept))));
                        }
                        Err(e) if refused_alone(&e) => unstorable.push(i as u32),
                        Err(e) => return Err(crate::error::op_error(e)),
                    }
                    i += 1;
                }
                Mutation::Put { collection, .. } => {
                    let run = mutations[i..]
                        .iter()
                        .take_while(
                            |m| matches!(m, Mutation::Put { collection: c, .. } if c == collection),
                        )
                        .count();
                    // Each entry's index among the mutations.
                    let mut at = Vec::with_capacity(run);
                    let entries: Vec<Replicated<'_>> = mutations[i..i + run]
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| admitted(i + j))
                        .filter_map(|(j, m)| match m {
                            Mutation::Put {
                                key,
                                value,
                                version: v,
                                ..
                            } => {
                                at.push((i + j) as u32);
                                Some((&key[..], value.as_deref(), version(*v)))
                            }
                            Mutation::Drop { .. } => None,
                        })
                        .collect();
                    match self.store.apply_many_newer(collection, &entries) {
                        Ok((n, lost)) => {
                            applied += n as u64;
                            newer.extend(lost.into_iter().map(|(e, v)| (at[e], stamp(v))));
                        }
                        Err(e) if refused_alone(&e) => {
                            unstorable
                                .extend((i..i + run).filter(|&j| admitted(j)).map(|j| j as u32));
                        }
                        Err(e) => return Err(crate::error::op_error(e)),
                    }
                    i += run;
                }
            }
        }
        if !unstorable.is_empty() {
            // Once a second at most: a client writing to new collections
            // through another node would log a line a write.
            static UNSTORABLE: crate::throttle::LogThrottle =
                crate::throttle::LogThrottle::new(std::time::Duration::from_secs(1));
            if let Some(left_out) = UNSTORABLE.allow() {
                tracing::error!(
                    left_out,
                    "refused {} replicated records: of collections this node cannot create (it holds as many as it can keep open, --max-collections), invalid, or of system collections no peer writes",
                    unstorable.len()
                );
            }
            refused.extend(unstorable);
            refused.sort_unstable();
            refused.dedup();
        }
        if self.sync.running.load(Ordering::Relaxed) {
            self.sync
                .received
                .fetch_add(mutations.len() as u64, Ordering::Relaxed);
        }
        Ok(Applied {
            applied,
            refused,
            newer,
        })
    }

    /// Applies on the blocking pool when the store fsyncs every write.
    pub(crate) async fn apply_async(
        self: &Arc<Self>,
        mutations: Vec<Mutation>,
        report: bool,
    ) -> Result<Applied, OpError> {
        if self.store.options().sync == SyncMode::Always {
            let me = self.clone();
            tokio::task::spawn_blocking(move || me.apply(&mutations, report))
                .await
                .map_err(|e| OpError::new(ErrorKind::Internal, e.to_string()))?
        } else {
            self.apply(&mutations, report)
        }
    }

    /// A page of the records of some buckets of a collection, as
    /// mutations, from `from` on: cut before it would pass `max_bytes`
    /// (a larger record goes alone). Also the cursor of the next page.
    pub(crate) fn bucket_records(
        &self,
        collection: &str,
        buckets: &[u32],
        from: Option<BucketCursor>,
        max_bytes: usize,
    ) -> Result<(Vec<Mutation>, Option<BucketCursor>), OpError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = match from {
            Some(c) => buckets.iter().position(|&b| b == c.bucket).ok_or_else(|| {
                OpError::new(
                    ErrorKind::InvalidInput,
                    "cursor outside the requested buckets",
                )
            })?,
            None => 0,
        };
        for (i, &b) in buckets.iter().enumerate().skip(start) {
            let skip = match from {
                Some(c) if i == start => c.skip,
                _ => 0,
            };
            let records = self
                .store
                .bucket(collection, b as usize)
                .map_err(crate::error::op_error)?;
            for (n, r) in records.enumerate().skip(skip as usize) {
                let m = Mutation::Put {
                    collection: collection.to_string(),
                    key: r.key.into(),
                    value: r.value,
                    version: stamp(r.version),
                };
                let size = mutation_bytes(&m);
                if !out.is_empty() && bytes + size > max_bytes {
                    let next = BucketCursor {
                        bucket: b,
                        skip: n as u64,
                    };
                    return Ok((out, Some(next)));
                }
                bytes += size;
                out.push(m);
            }
        }
        Ok((out, None))
    }

    /// Keeps in this node's store writes it only forwarded and that no
    /// replica acknowledged: whether they were kept.
    pub(super) async fn keep_unacknowledged(self: &Arc<Self>, mutations: &[Mutation]) -> bool {
        match self.apply_async(mutations.to_vec(), false).await {
            // Records it refused (a collection past its cap, a stamp ahead
            // of its clock) are not kept.
            Ok(applied) if !applied.refused.is_empty() => {
                static NOT_KEPT: crate::throttle::LogThrottle =
                    crate::throttle::LogThrottle::new(std::time::Duration::from_secs(1));
                let Some(left_out) = NOT_KEPT.allow() else {
                    return false;
                };
                tracing::warn!(
                    left_out,
                    "could not keep {} of {} writes no replica acknowledged (a collection past --max-collections, or stamped ahead of this node's clock)",
                    applied.refused.len(),
                    mutations.len()
                );
                false
            }
            Ok(_) => true,
            Err(e) => {
                tracing::warn!("keeping writes no replica acknowledged: {e}");
                false
            }
        }
    }
}

/// Whether a peer may send `m` (the node's own applies pass too). Of the system collections (names starting
/// with `_`), only the replication settings and the registry of collection
/// names are replicated, and a registry key is a collection a client may
/// write. Anything else would be a node's own state written by another:
/// uncounted files, or a registry entry that turns a `default` key's short
/// route into a collection's.
fn peer_may_write(m: &Mutation) -> bool {
    match m {
        Mutation::Drop { collection, .. } => !collection.starts_with('_'),
        Mutation::Put {
            collection, key, ..
        } => match collection.as_str() {
            super::owners::SETTINGS => true,
            super::owners::REGISTRY => std::str::from_utf8(key).is_ok_and(|name| {
                !name.starts_with('_') && dhrt_storage::validate_collection_name(name).is_ok()
            }),
            c => !c.starts_with('_'),
        },
    }
}

/// A storage error that refuses the records it concerns, not the batch:
/// the node's own trouble (I/O) fails the whole `Apply`.
fn refused_alone(e: &dhrt_storage::Error) -> bool {
    matches!(
        e,
        dhrt_storage::Error::TooManyCollections { .. }
            | dhrt_storage::Error::InvalidCollection { .. }
            | dhrt_storage::Error::InvalidKey { .. }
            | dhrt_storage::Error::ValueTooLarge { .. }
    )
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use dhrt_proto::{Mutation, Stamp};
    use dhrt_storage::{Options, Store};

    use crate::cluster::{Cluster, Identity};

    /// A one-node cluster over `store`.
    fn single(store: &Store) -> std::sync::Arc<Cluster> {
        Cluster::single(
            store.clone(),
            Identity {
                id: 0xabc,
                name: "n1".into(),
                addr: "127.0.0.1:7453".into(),
            },
        )
    }

    /// A node at its collection cap refuses the replicated records of a
    /// collection it would have to create, one by one: the rest of the
    /// batch, before and after them, applies. Invalid records too.
    #[test]
    fn records_of_a_collection_a_node_cannot_create_are_refused_alone() {
        let store = Store::memory(Options {
            max_collections: 1,
            ..Options::default()
        });
        store.set("held", b"k0", b"v").unwrap();
        let cluster = single(&store);
        let ts = (dhrt_storage::wall_ms() << 16) | 1;
        let put = |c: &str, k: &'static str| Mutation::Put {
            collection: c.into(),
            key: Bytes::from_static(k.as_bytes()),
            value: Some(Bytes::from_static(b"replicated")),
            version: Stamp { ts, node: 0xdef },
        };
        let applied = cluster
            .apply(
                &[
                    put("held", "k1"),
                    put("new", "a"),
                    put("new", "b"),
                    Mutation::Drop {
                        collection: "other".into(),
                        version: Stamp { ts, node: 0xdef },
                    },
                    put("held", "k2"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(applied.refused, [1, 2, 3]);
        assert_eq!(applied.applied, 2);
        // The same for records no client could have written (a peer with
        // the cluster secret sending them): an empty key, a bad name. A
        // bad record refuses the run of its collection it came in; other
        // runs apply.
        let applied = cluster
            .apply(
                &[put("held", ""), put("../x", "a"), put("held", "k3")],
                true,
            )
            .unwrap();
        assert_eq!(applied.refused, [0, 1]);
        assert_eq!(
            store.get("held", b"k3").unwrap().as_deref(),
            Some(&b"replicated"[..])
        );
        for k in [&b"k1"[..], b"k2"] {
            assert_eq!(
                store.get("held", k).unwrap().as_deref(),
                Some(&b"replicated"[..])
            );
        }
        assert!(store.get("new", b"a").unwrap().is_none());
    }

    /// Of the system collections, a peer may write only the replication
    /// settings and the registry's client collection names; the rest of
    /// its batch applies.
    #[test]
    fn a_peer_writes_no_system_collection_but_the_replicated_ones() {
        let store = Store::memory(Options::default());
        let cluster = single(&store);
        let ts = (dhrt_storage::wall_ms() << 16) | 1;
        let stamp = Stamp { ts, node: 0xdef };
        let put = |c: &str, k: &'static str| Mutation::Put {
            collection: c.into(),
            key: Bytes::from_static(k.as_bytes()),
            value: Some(Bytes::from_static(b"1")),
            version: stamp,
        };
        let applied = cluster
            .apply(
                &[
                    put("_j0", "a"),
                    put("_collections", "_j1"),
                    put("_collections", "../x"),
                    put("_collections", "ghost"),
                    put("_replicas", "users"),
                    Mutation::Drop {
                        collection: "_replicas".into(),
                        version: stamp,
                    },
                    put("users", "k"),
                ],
                true,
            )
            .unwrap();
        assert_eq!(applied.refused, [0, 1, 2, 5]);
        assert_eq!(applied.applied, 3);
        assert!(store.get("_j0", b"a").unwrap().is_none());
        assert!(store.get("_collections", b"_j1").unwrap().is_none());
        assert!(store.get("_collections", b"ghost").unwrap().is_some());
        assert!(store.get("_replicas", b"users").unwrap().is_some());
        assert!(store.get("users", b"k").unwrap().is_some());
    }

    /// A delete past its grace period is not written for a key this node
    /// holds no record of (it purged it), but it is for a key whose record
    /// here was quarantined as damaged: it repairs it, where skipped the
    /// key would answer "damaged" once the other members purged it too.
    #[test]
    fn a_late_delete_repairs_a_damaged_key_but_is_not_written_where_purged() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            tombstone_grace: std::time::Duration::from_secs(1),
            ..Options::default()
        };
        let store = Store::open(dir.path(), options).unwrap();
        store.set("c", b"k", b"value-to-damage-0123456789").unwrap();
        // The page rots under the open store.
        let path = dir.path().join("c.dhrt");
        let at = std::fs::read(&path)
            .unwrap()
            .windows(15)
            .position(|w| w == b"value-to-damage")
            .unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"X", at as u64).unwrap();
        assert!(matches!(
            store.get("c", b"k"),
            Err(dhrt_storage::Error::Checksum { .. })
        ));
        let cluster = single(&store);
        let old = ((dhrt_storage::wall_ms() - 10_000) << 16) | 1;
        let delete = |k: &'static str| Mutation::Put {
            collection: "c".into(),
            key: Bytes::from_static(k.as_bytes()),
            value: None,
            version: Stamp {
                ts: old,
                node: 0xdef,
            },
        };
        let applied = cluster.apply(&[delete("k"), delete("gone")], true).unwrap();
        assert_eq!(applied.applied, 1);
        let repaired = store.lookup("c", b"k").unwrap().expect("a tombstone");
        assert!(repaired.value.is_none());
        assert!(store.lookup("c", b"gone").unwrap().is_none());
    }

    /// A node's digests are read in pages of at most about a MiB, in name
    /// order, every collection once, however many it holds.
    #[test]
    fn digests_are_paged_in_name_order_each_within_its_budget() {
        let store = Store::memory(Options::default());
        let names: Vec<String> = (0..2500).map(|i| format!("c{i:05}")).collect();
        for c in &names {
            store.set(c, b"k", b"v").unwrap();
        }
        let cluster = single(&store);
        let (mut seen, mut after, mut pages) = (Vec::new(), None, 0);
        loop {
            let page = cluster.digests_after(after.clone()).unwrap();
            let Some(last) = page.last() else { break };
            after = Some(last.collection.clone());
            let mut bytes = Vec::new();
            dhrt_proto::encode(&dhrt_proto::PeerReply::Digests(page.clone()), &mut bytes).unwrap();
            assert!(
                bytes.len() <= crate::cluster::digests::DIGEST_PAGE_BYTES,
                "{} bytes",
                bytes.len()
            );
            assert!(
                page.iter()
                    .all(|d| d.entries == 1 && d.buckets.len() == 1024)
            );
            seen.extend(page.into_iter().map(|d| d.collection));
            pages += 1;
        }
        assert_eq!(seen, names);
        assert!(pages >= 3, "{pages} pages");
        // After a name it does not hold, from the next one on.
        let page = cluster.digests_after(Some("c02499a".into())).unwrap();
        assert!(page.is_empty());
        let page = cluster.digests_after(Some("c00099x".into())).unwrap();
        assert_eq!(page[0].collection, "c00100");
    }
}
