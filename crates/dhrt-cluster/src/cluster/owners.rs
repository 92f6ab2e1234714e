//! Which members own a collection, as this node knows the members: the
//! placement rules (`placement.rs`) applied to the membership table and the
//! collection's replication factor. Every question of "who stores this"
//! (replication targets, fan-out reads, watch hosts, handoff, anti-entropy)
//! is answered here.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dhrt_proto::{
    CollectionInfo, ErrorKind, Liveness, Mutation, OpError, PeerOp, PeerReply, ReplicasInfo,
};
use dhrt_storage::Store;

use super::Cluster;
use crate::membership::Membership;
use crate::placement::{self, Replicas, hosts};

/// The system collection of replication factors set through the API: a
/// collection's name, or `*` for the cluster's default, to `all` or a
/// number. Replicated to every member like any write (the newest version
/// wins when two members set one at once), kept across restarts.
pub(crate) const SETTINGS: &str = "_replicas";
/// The system collection that names every collection ever written in the
/// cluster (replicated to every member): how a member that holds no copy
/// of a collection knows it exists (`GET /name` is the collection, not the
/// key `name` of `default`).
pub(crate) const REGISTRY: &str = "_collections";

/// The key of the cluster's default in [`SETTINGS`].
pub(crate) const DEFAULT_KEY: &str = "*";

/// How long settings read from [`SETTINGS`] are used before they are read
/// again (a change that reaches this node is seen at once).
const SETTINGS_TTL: Duration = Duration::from_secs(2);

/// What [`SETTINGS`] held when last read.
#[derive(Debug)]
pub(crate) struct Settings {
    default: Option<Replicas>,
    per: HashMap<String, Replicas>,
    read_at: Instant,
}

impl Settings {
    /// An empty reading, due for a refresh.
    pub(crate) fn unread() -> Settings {
        Settings {
            default: None,
            per: HashMap::new(),
            read_at: Instant::now() - SETTINGS_TTL * 2,
        }
    }

    fn read(store: &Store) -> Settings {
        let mut s = Settings {
            read_at: Instant::now(),
            ..Settings::unread()
        };
        if let Ok(listing) = store.list(SETTINGS, None, true) {
            for r in listing {
                let (Ok(key), Some(Ok(r))) = (
                    std::str::from_utf8(&r.key),
                    r.value
                        .as_deref()
                        .map(|v| std::str::from_utf8(v).unwrap_or("").parse::<Replicas>()),
                ) else {
                    continue;
                };
                if key == DEFAULT_KEY {
                    s.default = Some(r);
                } else {
                    s.per.insert(key.to_string(), r);
                }
            }
        }
        s
    }
}

impl Cluster {
    /// The replication factors set through the API, as last read.
    fn settings(&self) -> arc_swap::Guard<std::sync::Arc<Settings>> {
        let s = self.settings.load();
        if self.settings_stale.load(Ordering::Acquire) || s.read_at.elapsed() > SETTINGS_TTL {
            self.settings_stale.store(false, Ordering::Release);
            self.settings
                .store(std::sync::Arc::new(Settings::read(&self.store)));
            return self.settings.load();
        }
        s
    }

    /// Called when [`SETTINGS`] changed here: read it again before the next
    /// placement.
    pub(crate) fn settings_changed(&self) {
        self.settings_stale.store(true, Ordering::Release);
    }

    /// The cluster's default replication factor: set through the API, else
    /// `--replicas`.
    pub(crate) fn default_replicas(&self) -> Replicas {
        self.settings().default.unwrap_or(self.options.replicas)
    }

    /// The replication factor of `collection`: its own, else the cluster's
    /// default. System collections (names starting with `_`) live on every
    /// member.
    pub(crate) fn replicas_of(&self, collection: &str) -> Replicas {
        if collection.starts_with('_') {
            return Replicas::All;
        }
        let s = self.settings();
        s.per
            .get(collection)
            .copied()
            .or(s.default)
            .unwrap_or(self.options.replicas)
    }

    /// Whether this node syncs now (a newcomer receiving its handoff, a
    /// node back from a long absence): what it holds may lack what its
    /// peers were acknowledged.
    pub(crate) fn syncs(&self) -> bool {
        self.membership.lock().unwrap().me().syncing || self.sync.running.load(Ordering::Acquire)
    }

    /// Whether member `id` said it syncs (unknown members do not).
    pub(crate) fn member_syncs(&self, id: u64) -> bool {
        self.membership
            .lock()
            .unwrap()
            .members()
            .any(|u| u.id == id && u.syncing)
    }

    /// Whether every member owns every collection (no pins, this node's or
    /// another member's, no replication factor below `all`): the common
    /// case, answered without a lock. Where it does not hold, writers name
    /// each collection in [`REGISTRY`], so that a member holding no copy
    /// of it still knows it exists.
    pub(crate) fn everyone_owns_everything(&self) -> bool {
        if self.options.collections.is_some() || self.members_pinned.load(Ordering::Acquire) {
            return false;
        }
        let s = self.settings();
        s.default.unwrap_or(self.options.replicas) == Replicas::All
            && s.per.values().all(|r| *r == Replicas::All)
    }

    /// The owners of `collection` among the members `m` knows (this node
    /// included): the members that have not left and whose pins allow it
    /// (system collections: every member), ranked by placement score, as
    /// many as its replication factor asks.
    pub(crate) fn owners_in(&self, m: &Membership, collection: &str) -> Vec<u64> {
        let system = collection.starts_with('_');
        let eligible = std::iter::once(m.me())
            .chain(m.members())
            .filter(|u| u.liveness != Liveness::Left && (system || hosts(u, collection)))
            .map(|u| u.id);
        placement::owners(collection, eligible, self.replicas_of(collection))
    }

    /// The replication factor of `collection`, its owners now (best
    /// placement score first), and whether it is under-replicated: fewer
    /// owners than it asks, or an owner dead (its copy counts again once
    /// it returns; a member removed from the cluster is no owner).
    pub(crate) fn placement(&self, collection: &str) -> (Replicas, Vec<u64>, bool) {
        let replicas = self.replicas_of(collection);
        let m = self.membership.lock().unwrap();
        let owners = self.owners_in(&m, collection);
        let short = matches!(replicas, Replicas::N(n) if owners.len() < usize::from(n));
        let dead = owners
            .iter()
            .any(|id| m.get(*id).is_some_and(|u| u.liveness == Liveness::Dead));
        (replicas, owners, short || dead)
    }

    /// The owners of `collection` now, as this node knows the members: ids,
    /// best placement score first.
    pub fn owners(&self, collection: &str) -> Vec<u64> {
        self.owners_in(&self.membership.lock().unwrap(), collection)
    }
}

impl Cluster {
    /// What `GET /` says of a collection this node holds: its size and
    /// digest here, its replication factor and owners.
    pub(crate) fn collection_info(&self, c: dhrt_storage::CollectionStats) -> CollectionInfo {
        let (replicas, owners, under_replicated) = self.placement(&c.name);
        CollectionInfo {
            digest: self
                .store
                .digest(&c.name)
                .map(|d| format!("{:016x}", d.summary()))
                .unwrap_or_default(),
            under_replicated,
            replicas: replicas.to_string(),
            owners: owners.iter().map(|id| format!("{id:016x}")).collect(),
            moving: self.moves.info(&c.name),
            name: c.name,
            keys: c.keys,
            bytes: c.bytes,
        }
    }
}

impl Cluster {
    /// [`dhrt_proto::Operations::replicas`]: sets the replication factor of
    /// `collection` (the cluster's default with `None`) if `set` says so, a
    /// write of [`SETTINGS`] replicated to every member, then says what it
    /// is and who owns the collection.
    pub(crate) async fn replicas_op(
        self: &std::sync::Arc<Self>,
        collection: Option<&str>,
        set: Option<&str>,
    ) -> Result<ReplicasInfo, OpError> {
        if let Some(c) = collection {
            dhrt_storage::validate_collection_name(c).map_err(crate::error::op_error)?;
            if c.starts_with('_') {
                return Err(OpError::new(
                    ErrorKind::InvalidInput,
                    format!("collection names starting with '_' are reserved: {c:?}"),
                ));
            }
        }
        if let Some(value) = set {
            let replicas: Replicas = value
                .parse()
                .map_err(|e: String| OpError::new(ErrorKind::InvalidInput, e))?;
            let key = collection.unwrap_or(DEFAULT_KEY);
            let value = replicas.to_string();
            let version = self
                .store
                .set_versioned(SETTINGS, key.as_bytes(), value.as_bytes())
                .map_err(crate::error::op_error)?;
            self.settings_changed();
            tracing::info!(collection = key, replicas = %value, "replication factor set");
            let m = Mutation::Put {
                collection: SETTINGS.to_string(),
                key: Bytes::copy_from_slice(key.as_bytes()),
                value: Some(Bytes::from(value)),
                version: super::stamp(version),
            };
            self.replicate(vec![m], true).await?;
        }
        Ok(match collection {
            None => ReplicasInfo {
                collection: None,
                replicas: self.default_replicas().to_string(),
                owners: Vec::new(),
                under_replicated: false,
            },
            Some(c) => {
                let (replicas, owners, under_replicated) = self.placement(c);
                ReplicasInfo {
                    collection: Some(c.to_string()),
                    under_replicated,
                    replicas: replicas.to_string(),
                    owners: owners.iter().map(|id| format!("{id:016x}")).collect(),
                }
            }
        })
    }
}

impl Cluster {
    /// Notes that `collection` exists, in [`REGISTRY`], the first time this
    /// node writes it (a lookup in memory afterwards), where members may
    /// hold no copy of it (pins, a replication factor below `all`; the
    /// collections held when that starts are registered by the moves
    /// loop). The registry entry is replicated in the background.
    pub(crate) fn register(self: &std::sync::Arc<Self>, collection: &str) {
        if self.everyone_owns_everything() || self.registered.load().contains(collection) {
            return;
        }
        let known = matches!(self.store.get(REGISTRY, collection.as_bytes()), Ok(Some(_)));
        if !known
            && let Ok(version) = self
                .store
                .set_versioned(REGISTRY, collection.as_bytes(), b"1")
        {
            let m = Mutation::Put {
                collection: REGISTRY.to_string(),
                key: Bytes::copy_from_slice(collection.as_bytes()),
                value: Some(Bytes::from_static(b"1")),
                version: super::stamp(version),
            };
            let me = self.clone();
            tokio::spawn(async move {
                if let Err(e) = me.replicate(vec![m], true).await {
                    tracing::debug!("registering a collection: {e}");
                }
            });
        }
        self.registered.rcu(|set| {
            let mut set = std::collections::HashSet::clone(set);
            set.insert(collection.to_string());
            set
        });
    }

    /// [`Self::register`] for a collection this node already holds: false,
    /// registering nothing, when it still needs an entry and `may_stamp`
    /// is false (this node's clock may not stamp writes now).
    pub(crate) fn register_held(
        self: &std::sync::Arc<Self>,
        collection: &str,
        may_stamp: bool,
    ) -> bool {
        if !may_stamp
            && !self.everyone_owns_everything()
            && !self.registered.load().contains(collection)
            && !self.is_registered(collection)
        {
            return false;
        }
        self.register(collection);
        true
    }

    /// Whether `collection` was ever written anywhere in the cluster, as
    /// far as this node has heard.
    pub(crate) fn is_registered(&self, collection: &str) -> bool {
        matches!(self.store.get(REGISTRY, collection.as_bytes()), Ok(Some(_)))
    }

    /// Whether this node stores `collection` itself: it owns it, or no
    /// owner is alive (a write is never dropped for lack of a host).
    pub(crate) fn stores_locally(&self, collection: &str) -> bool {
        if self.everyone_owns_everything() {
            return true;
        }
        let m = self.membership.lock().unwrap();
        let owners = self.owners_in(&m, collection);
        owners.contains(&m.me().id)
            || !m
                .members()
                .any(|u| u.liveness == Liveness::Alive && owners.contains(&u.id))
    }

    /// Whether this node was started to join a cluster (`--node`, or
    /// members remembered in `cluster.state` that had not left) and has
    /// not heard from any member since: its replicas are out of reach, not
    /// absent.
    pub(crate) fn unreached(&self) -> bool {
        self.awaited > 0 && !self.heard_peers.load(Ordering::Acquire)
    }

    /// The write concern of a write this node holds alone while
    /// [`unreached`](Self::unreached): its replicas are counted as the
    /// members it was given (at most the collection's replication factor),
    /// so under `quorum` or `all` the write is saved on 1 of them, and the
    /// client is told so. Anti-entropy takes it to the others once they
    /// are reached.
    pub(crate) fn unreached_concern(&self, collection: &str) -> Result<(), OpError> {
        if !self.unreached() {
            return Ok(());
        }
        // Its owners are members it remembers: a copy on a node that does
        // not own the collection is no replica, whatever the concern.
        let owns = {
            let m = self.membership.lock().unwrap();
            self.owners_in(&m, collection).contains(&self.dialer.me)
        };
        if !owns {
            return Err(OpError::new(
                ErrorKind::WriteConcern,
                format!(
                    "no owner of collection {collection:?} has answered since this node started: the write is saved on this node, which does not own it, and reaches its owners once they answer"
                ),
            ));
        }
        let members = 1 + self.awaited;
        let replicas = match self.replicas_of(collection) {
            Replicas::All => members,
            Replicas::N(n) => members.min(usize::from(n).max(1)),
        };
        let need = placement::need(self.options.write_ack, replicas - 1, true);
        if need.copies <= 1 {
            return Ok(());
        }
        Err(OpError::new(
            ErrorKind::WriteConcern,
            format!(
                "write concern {} not met: no member has answered since this node started, so the write is saved on 1 of {} replicas ({} needed) and will reach the others once they answer",
                self.options.write_ack.as_str(),
                need.replicas,
                need.copies
            ),
        ))
    }

    /// Whether a live peer holds a live key of `collection`: a page of one
    /// entry is asked of each (one that does not answer is not counted).
    /// A write the concern acknowledged is on `copies` of the `replicas`
    /// owners: once this node (an owner that holds none of it) and
    /// `replicas - copies` other owners said no, it is nowhere, and no
    /// one else is waited for (under `all`, no one is asked). Not while
    /// this node syncs (a newcomer receiving its handoff, a node back from
    /// a long absence): what it holds says nothing yet, so every live
    /// peer is asked.
    pub(crate) async fn held_elsewhere(self: &Arc<Self>, collection: &str) -> bool {
        let complete = !self.syncs();
        let (owners, enough) = {
            let m = self.membership.lock().unwrap();
            let owners = self.owners_in(&m, collection);
            let me = m.me().id;
            let others = m
                .members()
                .filter(|u| u.liveness != Liveness::Left && u.id != me && owners.contains(&u.id))
                .count();
            let need = placement::need(self.options.write_ack, others, true);
            let enough = (complete && owners.contains(&me)).then_some(need.replicas - need.copies);
            (owners, enough)
        };
        if enough == Some(0) {
            return false;
        }
        let mut asks = self.ask_live_peers(|| PeerOp::List {
            collection: collection.to_string(),
            after: None,
            limit: 1,
        });
        let mut noes = 0;
        while let Some(joined) = asks.join_next().await {
            let Ok((id, r)) = joined else { continue };
            match r {
                Ok(PeerReply::Page(page)) if !page.entries.is_empty() => return true,
                Ok(PeerReply::Page(_)) if owners.contains(&id) => {
                    noes += 1;
                    if enough.is_some_and(|enough| noes >= enough) {
                        return false;
                    }
                }
                _ => {}
            }
        }
        false
    }
}
