//! Moves: a collection held by a member that no longer owns it (a member
//! joined and took its place, a replication factor shrank, the member is
//! leaving) goes to its owners. The holder pushes what the owners lack or
//! hold older, and once a round finds nothing left to push and nothing
//! written here since it began, releases its copy (`Store::release`): an
//! old copy is deleted only after every owner holds all of it, and a write
//! that raced the check keeps it for another round. A holder never pulls
//! from the owners, so it never brings back what they deleted.
//!
//! Health never moves data: owners are computed over every member that has
//! not left, so a dead owner keeps its place, and a copy whose owners are
//! not all reachable is kept until they are.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dhrt_proto::{Liveness, Mutation, PeerOp, PeerReply};
use dhrt_storage::Digest;

use super::anti_entropy::{BUCKETS_PER_REQUEST, buckets_to_exchange};
use super::apply::local_error;
use super::{BATCH_BYTES, BATCH_ITEMS, Cluster, stamp, version};
use crate::batch::mutation_bytes;
use crate::link::LinkError;
use crate::pace::Pacer;
use crate::placement::{self, Replicas};

/// How often a member looks for copies to hand over.
const MOVE_EVERY: Duration = Duration::from_secs(1);

/// The copies this node holds and does not own, what of them went so far,
/// and the pace of sending.
#[derive(Debug)]
pub(crate) struct Moves {
    pub(crate) pacer: Pacer,
    /// The pace of anti-entropy's repairs, at the same rate, apart: after
    /// a change of replication factor or an interrupted handoff, new
    /// copies come that way, and they must not starve clients either.
    repairs: Pacer,
    /// Set when the node leaves: its last round (against a deadline) goes
    /// at full speed.
    repairs_unpaced: std::sync::atomic::AtomicBool,
    held: Mutex<HashMap<String, Progress>>,
    /// Records and bytes sent by handovers and handoff streams since start.
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    /// Collections a leave pushed to stand-ins already: once each.
    stood_in: Mutex<HashSet<String>>,
    /// What each peer said of its replication factor (`factors.rs`).
    pub(super) factors: super::factors::Factors,
}

/// One copy on its way to its owners.
#[derive(Debug, Clone)]
struct Progress {
    to: Vec<u64>,
    records: u64,
    bytes: u64,
    since: Instant,
    /// Why the last round could not finish, if it could not.
    waiting: Option<String>,
}

impl Moves {
    pub(crate) fn new(rate: u64) -> Moves {
        Moves {
            pacer: Pacer::new(rate),
            repairs: Pacer::new(rate),
            repairs_unpaced: std::sync::atomic::AtomicBool::new(false),
            held: Mutex::new(HashMap::new()),
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            stood_in: Mutex::new(HashSet::new()),
            factors: Default::default(),
        }
    }

    /// Waits for the slot of `bytes` of records anti-entropy sends or
    /// takes.
    pub(crate) async fn pace_repair(&self, bytes: usize) {
        if !self.repairs_unpaced.load(Ordering::Relaxed) {
            self.repairs.take(bytes).await;
        }
    }

    /// Repairs are no longer paced (the node is leaving, and its last
    /// round has a deadline).
    pub(crate) fn unpace_repairs(&self) {
        self.repairs_unpaced.store(true, Ordering::Relaxed);
    }

    /// Counts a batch sent to move data, after waiting for its slot.
    pub(crate) async fn send(&self, records: usize, bytes: usize) {
        self.pacer.take(bytes).await;
        self.records.fetch_add(records as u64, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }

    fn note(
        &self,
        collection: &str,
        to: &[u64],
        records: usize,
        bytes: usize,
        waiting: Option<String>,
    ) {
        let mut held = self.held.lock().unwrap();
        let p = held
            .entry(collection.to_string())
            .or_insert_with(|| Progress {
                to: to.to_vec(),
                records: 0,
                bytes: 0,
                since: Instant::now(),
                waiting: None,
            });
        if !to.is_empty() {
            p.to = to.to_vec();
        }
        p.records += records as u64;
        p.bytes += bytes as u64;
        // A batch's progress keeps the reason its round gave.
        if waiting.is_some() || records == 0 {
            p.waiting = waiting;
        }
    }

    fn done(&self, collection: &str) {
        self.held.lock().unwrap().remove(collection);
    }

    /// What `GET /` says of `collection`'s move, if this node is handing
    /// it over.
    pub(crate) fn info(&self, collection: &str) -> Option<dhrt_proto::MoveInfo> {
        let held = self.held.lock().unwrap();
        held.get(collection).map(|p| dhrt_proto::MoveInfo {
            to: p.to.iter().map(|id| format!("{id:016x}")).collect(),
            records_sent: p.records,
            bytes_sent: p.bytes,
            for_s: p.since.elapsed().as_secs(),
            waiting: p.waiting.clone(),
        })
    }

    /// How many copies this node is handing over.
    pub(crate) fn in_progress(&self) -> usize {
        self.held.lock().unwrap().len()
    }
}

/// What one handover round of a collection did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Handover {
    /// Every owner held everything already: the copy was released.
    Released,
    /// Records were pushed (or the copy changed meanwhile): another round.
    Pushed(usize),
    /// An owner could not be reached, or there is none: the copy stays.
    Kept,
}

/// Which handover round [`Cluster::hand_over_all`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Round {
    /// The background round: hand over what this node no longer owns.
    Settle,
    /// A leaving node, before it says goodbye: copy everything to the
    /// owners it leaves it to, and release nothing. Those owners still
    /// count this node as an owner, and hand the copies back (releasing
    /// their own): were this node to release too, each could release the
    /// copy on the word of the other.
    PreCopy,
    /// A leaving node, after its goodbye: copy, and release what every
    /// owner holds.
    Leave,
}

/// What a round of [`Cluster::hand_over_all`] did.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HandOver {
    /// Collections still held here.
    pub(crate) held: usize,
    /// Of those, the ones kept because no owner can take them now: every
    /// owner down or syncing, or no member may own them. Another round
    /// right away does not change that.
    pub(crate) kept: usize,
}

impl Cluster {
    /// Whether this node said goodbye. It then tells no member what it
    /// holds (digests): a member that missed the goodbye, holding a copy
    /// it stands in for, would take this node for an owner holding it all,
    /// and release its copy to a node about to go.
    pub(crate) fn has_left(&self) -> bool {
        self.membership.lock().unwrap().me().liveness == Liveness::Left
    }

    pub(super) async fn moves_loop(self: Arc<Self>) {
        while self.running.load(Ordering::Acquire) {
            tokio::time::sleep(MOVE_EVERY).await;
            // A leaving node hands over in `leave`, not here; a node
            // re-syncing (after being away) first learns what was deleted.
            if !self.running.load(Ordering::Acquire)
                || self.everyone_owns_everything()
                || !self.options.repair
                || !self.absence_judged.load(Ordering::Acquire)
                || self.full_resync.load(Ordering::Acquire)
                || self.sync.running.load(Ordering::Acquire)
            {
                continue;
            }
            self.hand_over_all(Round::Settle, &mut HashSet::new()).await;
        }
    }

    /// One handover round of every collection this node holds and does not
    /// own (leaving, of every collection: its owners are computed without
    /// this node).
    ///
    /// An owner that times out or cannot be reached is added to `failed`,
    /// and the collections bound for an owner in `failed` are kept without
    /// asking it: with an owner that never answers, each would wait out a
    /// request timeout.
    pub(crate) async fn hand_over_all(
        self: &Arc<Self>,
        round: Round,
        failed: &mut HashSet<u64>,
    ) -> HandOver {
        let leaving = round != Round::Settle;
        // Settling, a copy is released only while every live peer computes
        // owners with this node's replication factor: asked once a round,
        // when a copy is first about to go.
        let mut disagree: Option<Option<String>> = None;
        let (mut held, mut kept) = (0, 0);
        // Copies whose owners are down, with how many: pushed to stand-ins
        // after every owner had its handover, so that they do not use up
        // the leave's time first.
        let mut stand_in_for: Vec<(String, usize)> = Vec::new();
        for c in self.store.all_collections() {
            if c.starts_with('_') {
                continue;
            }
            // Held since before members could lack a copy: named in the
            // registry before it may leave this node. The entry is a write
            // like a client's: stamped by a clock that is off (or not
            // compared yet), peers would refuse it, and this node would
            // hold a future stamp long after its clock is fixed, refusing
            // every write until the wall clock caught up.
            let may_stamp = self.clear_to_write().await.is_ok();
            if !self.register_held(&c, may_stamp) {
                let why = "not yet in the registry, and this node's clock may not stamp it now";
                self.moves.note(&c, &[], 0, 0, Some(why.into()));
                held += 1;
                kept += 1;
                continue;
            }
            let (owners, unreachable, back) = {
                let m = self.membership.lock().unwrap();
                let me = m.me().id;
                // A collection every member hosting it owns, that this
                // node hosts: it owns it again as soon as it is back. A
                // leave pushes what the others lack but keeps the copy, so
                // that a restart keeps its data and its watchers' tokens
                // (as when nobody pins and every collection is on all).
                let back = leaving
                    && self.replicas_of(&c) == Replicas::All
                    && placement::hosts(m.me(), &c);
                let owners = if leaving {
                    let eligible = m
                        .members()
                        .filter(|u| u.liveness != Liveness::Left && placement::hosts(u, &c))
                        .map(|u| u.id);
                    placement::owners(&c, eligible, self.replicas_of(&c))
                } else {
                    self.owners_in(&m, &c)
                };
                if owners.contains(&me) {
                    self.moves.done(&c);
                    continue;
                }
                // An owner receiving its own handoff (a newcomer, or back
                // from the dead) is waited for, unless this node is leaving:
                // the stream may be bringing this very collection, and two
                // copies of it would travel.
                let unreachable: Vec<u64> = owners
                    .iter()
                    .copied()
                    .filter(|id| {
                        !m.get(*id).is_some_and(|u| {
                            matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                                && (leaving || !u.syncing)
                        })
                    })
                    .collect();
                (owners, unreachable, back)
            };
            let outcome = if owners.is_empty() {
                self.moves
                    .note(&c, &owners, 0, 0, Some("no member can own it".into()));
                Ok(Handover::Kept)
            } else if !unreachable.is_empty() {
                let ids: Vec<String> = unreachable.iter().map(|id| format!("{id:016x}")).collect();
                let why = format!("owners down or syncing: {}", ids.join(", "));
                self.moves.note(&c, &owners, 0, 0, Some(why));
                if round == Round::Leave {
                    stand_in_for.push((c.clone(), unreachable.len()));
                }
                Ok(Handover::Kept)
            } else if let Some(id) = owners.iter().find(|id| failed.contains(id)) {
                let why = format!("owner {id:016x} did not answer a handover request");
                self.moves.note(&c, &owners, 0, 0, Some(why));
                if round == Round::Leave {
                    let missing = owners.iter().filter(|id| failed.contains(id)).count();
                    stand_in_for.push((c.clone(), missing));
                }
                Ok(Handover::Kept)
            } else {
                let why = match (round, &disagree) {
                    (Round::Settle, None) => {
                        let why = self.factors_disagree().await;
                        disagree = Some(why.clone());
                        why
                    }
                    (Round::Settle, Some(why)) => why.clone(),
                    _ => None,
                };
                self.moves.note(&c, &owners, 0, 0, why.clone());
                let release = round != Round::PreCopy && !back && why.is_none();
                self.hand_over(&c, &owners, release, failed).await
            };
            match outcome {
                Ok(Handover::Pushed(0)) if back && round == Round::Leave => {
                    self.moves.done(&c);
                    tracing::debug!(collection = %c, "every owner holds it; this copy is kept for this node's return");
                }
                Ok(Handover::Released) => {
                    self.moves.done(&c);
                    tracing::info!(collection = %c, "handed over to its owners; this copy is released");
                }
                Ok(Handover::Pushed(_)) => held += 1,
                Ok(Handover::Kept) => {
                    held += 1;
                    kept += 1;
                }
                Err(e) => {
                    tracing::debug!(collection = %c, "handover: {e}");
                    self.moves.note(&c, &[], 0, 0, Some(e.to_string()));
                    held += 1;
                }
            }
        }
        for (c, missing) in stand_in_for {
            if self.moves.stood_in.lock().unwrap().insert(c.clone()) {
                self.hand_to_stand_ins(&c, missing, failed).await;
            }
        }
        HandOver { held, kept }
    }

    /// A leaving node's copy of `collection` whose owners (`missing` of
    /// them) are down: pushed to as many live members that may host it,
    /// best placed first, which hold it as copies they do not own and hand
    /// it to the owners once those are back (as they do a write no owner
    /// took). This node keeps its own copy too. Without them, the
    /// collection's keys would live only in the data directory of a node
    /// that left, and read as "not found" until it came back.
    async fn hand_to_stand_ins(
        self: &Arc<Self>,
        collection: &str,
        missing: usize,
        failed: &mut HashSet<u64>,
    ) {
        let stand_ins = {
            let m = self.membership.lock().unwrap();
            let live = m
                .members()
                .filter(|u| {
                    u.liveness == Liveness::Alive
                        && !u.syncing
                        && !failed.contains(&u.id)
                        && placement::hosts(u, collection)
                })
                .map(|u| u.id);
            let mut ranked = placement::owners(collection, live, Replicas::All);
            ranked.truncate(missing.max(1));
            ranked
        };
        let Ok(digest) = self.store.digest(collection) else {
            return;
        };
        for id in stand_ins {
            match self.push_collection(id, collection, &digest).await {
                Ok(n) => tracing::info!(
                    collection,
                    records = n,
                    "its owners are down: handed to node {id:016x}, which hands it to them once they are back"
                ),
                Err(e) => {
                    if matches!(e, LinkError::Timeout { .. } | LinkError::Unreachable { .. }) {
                        failed.insert(id);
                    }
                    tracing::debug!(collection, "handing to a stand-in: {e}");
                }
            }
        }
    }

    /// Pushes `collection` to each of its `owners`; with `release`,
    /// releases this copy if none of them lacked anything and nothing was
    /// written here meanwhile. An owner that times out or cannot be
    /// reached is added to `failed`.
    async fn hand_over(
        self: &Arc<Self>,
        collection: &str,
        owners: &[u64],
        release: bool,
        failed: &mut HashSet<u64>,
    ) -> Result<Handover, LinkError> {
        let before = self.store.digest(collection).map_err(local_error)?;
        let mut pushed = 0;
        for &id in owners {
            pushed += match self.push_collection(id, collection, &before).await {
                Ok(n) => n,
                Err(e) => {
                    if matches!(e, LinkError::Timeout { .. } | LinkError::Unreachable { .. }) {
                        failed.insert(id);
                    }
                    return Err(e);
                }
            };
        }
        if pushed > 0 || !release {
            return Ok(Handover::Pushed(pushed));
        }
        if self
            .store
            .release(collection, &before)
            .map_err(local_error)?
        {
            Ok(Handover::Released)
        } else {
            Ok(Handover::Pushed(0))
        }
    }

    /// Sends peer `id` what this node holds of `collection` (as of digest
    /// `local`) and the peer lacks or holds older; pulls nothing. Returns
    /// how many records were sent.
    async fn push_collection(
        self: &Arc<Self>,
        id: u64,
        collection: &str,
        local: &Digest,
    ) -> Result<usize, LinkError> {
        let Some(peer) = self.peer(id) else {
            return Err(LinkError::Refused {
                addr: format!("{id:016x}"),
                reason: "unknown member".into(),
            });
        };
        let long = self.options.timeout.max(Duration::from_secs(10));
        let remote = match peer
            .link
            .request(PeerOp::Digests(vec![collection.to_string()]), long)
            .await?
        {
            PeerReply::Digests(d) => d
                .into_iter()
                .find(|d| d.collection == collection)
                .map(|d| Digest {
                    buckets: d.buckets,
                    dropped_at: d.dropped_at.map(version),
                })
                .unwrap_or_else(Digest::empty),
            _ => Digest::empty(),
        };
        // The owner's drop applies to this copy too (the drop went to the
        // owners only): what it removed is not pushed again and again.
        // This round then releases nothing (the copy changed); the next
        // one pushes what is left.
        // A copy that cannot take it (a failed fsync, a failing disk) is
        // pushed all the same: the owner ignores what its drop removed.
        if let Err(e) = self.apply_remote_drop(collection, local, &remote).await {
            tracing::warn!(
                collection,
                "cannot apply the owners' drop to this copy: {e}"
            );
        }
        let mut push = Vec::new();
        if local.dropped_at > remote.dropped_at
            && let Some(d) = local.dropped_at
        {
            push.push(Mutation::Drop {
                collection: collection.to_string(),
                version: stamp(d),
            });
        }
        let mut sent = 0;
        let batch_bytes = self.moves.pacer.batch_bytes(BATCH_BYTES);
        for chunk in buckets_to_exchange(local, &remote).chunks(BUCKETS_PER_REQUEST) {
            let theirs = self
                .read_buckets(&peer, collection, chunk, long, false)
                .await?;
            self.worth_sending(collection, chunk, &theirs, &mut push)?;
            let pending: usize = push.iter().map(mutation_bytes).sum();
            if push.len() >= BATCH_ITEMS || pending >= batch_bytes {
                sent += push.len();
                self.push_paced(&peer, collection, std::mem::take(&mut push), long)
                    .await?;
            }
        }
        sent += push.len();
        self.push_paced(&peer, collection, push, long).await?;
        Ok(sent)
    }

    /// Pushes `mutations` of a handover at the pace of moves, counted in
    /// its progress.
    async fn push_paced(
        &self,
        peer: &super::Peer,
        collection: &str,
        mutations: Vec<Mutation>,
        timeout: Duration,
    ) -> Result<(), LinkError> {
        let mut batcher =
            crate::batch::Batcher::new(self.moves.pacer.batch_bytes(BATCH_BYTES), BATCH_ITEMS);
        let mut batches: Vec<Vec<Mutation>> = Vec::new();
        for m in mutations {
            batches.extend(batcher.push(m));
        }
        batches.extend(batcher.finish());
        for batch in batches {
            let (n, bytes) = (batch.len(), batch.iter().map(mutation_bytes).sum());
            self.moves.send(n, bytes).await;
            self.push_to(peer, batch, timeout, false).await?;
            self.moves.note(collection, &[], n, bytes, None);
        }
        Ok(())
    }
}
