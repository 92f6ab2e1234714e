//! Fan-out reads: a key missing here (or distrusted) is asked of every live
//! peer, not only its collection's owners: a copy may still be on a member
//! that no longer owns it (a move in progress), or on the member a write
//! went through while no owner was up, or no member may host the
//! collection at all (each stores what it was sent). The newest answer the
//! clock guard admits wins. Peers answer with their version and only small
//! values inline (`PeerOp::Peek`); a large newest value is then fetched
//! from one of its holders, after room for it is taken from the node's
//! budget of values in flight: a value crosses the network once, and not
//! at all for a read refused for want of room.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use dhrt_proto::{
    Entry, ErrorKind, Inflight, Liveness, MAX_PAGE_BYTES, OpError, Page, PeerOp, PeerReply, Stamp,
    UNCOUNTED, Versioned,
};
use dhrt_storage::Store;

use super::Cluster;
use crate::link::{Dialer, LinkError};

impl Cluster {
    /// Sends `op()` to every live peer at once; their answers, by peer id,
    /// as they come.
    pub(super) fn ask_live_peers(
        self: &Arc<Self>,
        op: impl Fn() -> PeerOp,
    ) -> tokio::task::JoinSet<(u64, Result<PeerReply, LinkError>)> {
        let targets: Vec<u64> = {
            let m = self.membership.lock().unwrap();
            m.members()
                .filter(|u| matches!(u.liveness, Liveness::Alive | Liveness::Suspect))
                .map(|u| u.id)
                .collect()
        };
        let mut asks = tokio::task::JoinSet::new();
        for id in targets {
            let Some(peer) = self.peer(id) else { continue };
            let (op, timeout) = (op(), self.options.timeout);
            asks.spawn(async move { (id, peer.link.request(op, timeout).await) });
        }
        asks
    }

    /// Asks every live peer for `key` in parallel and returns the newest
    /// entry found (a tombstone included), `budget` as in
    /// [`read_remote_told`](Self::read_remote_told).
    pub(crate) async fn read_remote(
        self: &Arc<Self>,
        collection: &str,
        key: &[u8],
        budget: Option<&Arc<Inflight>>,
    ) -> Result<Option<Versioned>, OpError> {
        Ok(self.read_remote_told(collection, key, budget).await?.0)
    }

    /// The newest entry the live peers hold for `key` (a tombstone
    /// included), and whether "not found" is not known, to a node that does
    /// not own the collection: an owner that was up did not answer (it
    /// timed out, or could not be reached), or no owner answered at all
    /// (every one down: their copies hold what was written before). A
    /// collection nobody owns (no member hosts it) is known from the
    /// members its writes went through.
    ///
    /// Every live peer is asked for its version, with small values inline
    /// ([`PeerOp::Peek`]); a larger newest value is then fetched from one
    /// of the peers that hold it, once there is room for it in `budget`
    /// (the node's budget of values in flight, which holds it until the
    /// caller's client has read it; `None` for a value not held for a
    /// client). `Unavailable` if there is no room, or if none of them
    /// sends it.
    pub(crate) async fn read_remote_told(
        self: &Arc<Self>,
        collection: &str,
        key: &[u8],
        budget: Option<&Arc<Inflight>>,
    ) -> Result<(Option<Versioned>, bool), OpError> {
        let peeked = self.peek_remote(collection, key).await;
        let unknown = peeked.unknown;
        let entry = match peeked.withheld {
            Some(w) if peeked.entry.as_ref().is_none_or(|e| w.version > e.version) => {
                Some(self.fetch(collection, key, w, budget).await?)
            }
            _ => match (peeked.entry, budget) {
                // Small, or sent whole all the same (by a peer that ignored
                // `inline_max`): held as it is.
                (Some(mut e), Some(budget)) => {
                    if let Some(value) = e.value.take() {
                        e.value = Some(budget.hold(value).map_err(unavailable)?);
                    }
                    Some(e)
                }
                (entry, _) => entry,
            },
        };
        Ok((entry, unknown))
    }

    /// The newest version the live peers hold of `key`, and whether it is
    /// a value (not a tombstone): what a delete needs to know, without
    /// any value crossing the network. And whether "none" is not known
    /// (an owner did not answer, or every owner is down).
    pub(crate) async fn remote_version(
        self: &Arc<Self>,
        collection: &str,
        key: &[u8],
    ) -> (Option<(Stamp, bool)>, bool) {
        let peeked = self.peek_remote(collection, key).await;
        let entry = peeked.entry.map(|e| (e.version, e.value.is_some()));
        let withheld = peeked.withheld.map(|w| (w.version, true));
        (entry.max(withheld), peeked.unknown)
    }

    /// This node's entry for `key`, for a peer: [`PeerReply::Entry`], or
    /// [`PeerReply::Withheld`] for a value larger than `inline_max`.
    pub(crate) fn entry(
        &self,
        collection: &str,
        key: &[u8],
        inline_max: u32,
    ) -> Result<PeerReply, OpError> {
        let r = self
            .store()
            .lookup(collection, key)
            .map_err(crate::error::op_error)?;
        Ok(match r {
            Some(r) => match r.value {
                Some(value) if value.len() > inline_max as usize => PeerReply::Withheld {
                    version: super::stamp(r.version),
                    len: value.len() as u64,
                },
                value => PeerReply::Entry(Some(Versioned {
                    value,
                    version: super::stamp(r.version),
                })),
            },
            // A key a drop removed (or that this node never had before
            // one), on an owner: deleted at the drop's version, so that a
            // copy of it stamped before, on a member the drop did not reach
            // (a write kept by a node that does not own the collection),
            // loses. (A member that does not own it says only what it holds:
            // its drop does not speak for the owners.)
            None if self.hosts_here(collection) => PeerReply::Entry(
                self.store()
                    .dropped_at(collection)
                    .map_err(crate::error::op_error)?
                    .map(|d| Versioned {
                        value: None,
                        version: super::stamp(d),
                    }),
            ),
            None => PeerReply::Entry(None),
        })
    }

    /// Every live peer's version of `key` ([`PeerOp::Peek`]).
    async fn peek_remote(self: &Arc<Self>, collection: &str, key: &[u8]) -> Peeked {
        if self.unreached() {
            // Started to join a cluster and not in touch yet: "not found"
            // would only say what this node missed while it was down.
            // Asked once a member answers (at most 10 s after the start).
            self.clock_compared().await;
        }
        let mut asks = self.ask_live_peers(|| PeerOp::Peek {
            collection: collection.to_string(),
            key: Bytes::copy_from_slice(key),
            inline_max: INLINE_MAX,
        });
        let mut peeked = Peeked::default();
        let mut owner_silent = false;
        let mut owner_answered = false;
        let owners = self.owners(collection);
        let guard = self.guard();
        while let Some(Ok((id, r))) = asks.join_next().await {
            let version = match &r {
                Ok(PeerReply::Entry(e)) => e.as_ref().map(|e| e.version),
                Ok(PeerReply::Withheld { version, .. }) => Some(*version),
                Ok(_) | Err(LinkError::Remote { .. }) => continue,
                Err(_) => {
                    owner_silent |= owners.contains(&id);
                    self.suspect(id);
                    continue;
                }
            };
            owner_answered |= owners.contains(&id);
            let Some(version) = version else { continue };
            if !guard.admits(version.ts, self.admission_wall()) {
                // Before this node has compared its clock with its
                // peers', its own may be the one behind: judged again
                // once compared, not taken for "not found".
                self.clock_compared().await;
            }
            if !guard.admits(version.ts, self.admission_wall()) {
                // A skewed peer's entry is no answer here.
                self.refused_future.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            match r {
                Ok(PeerReply::Entry(Some(v)))
                    if peeked.entry.as_ref().is_none_or(|b| v.version > b.version) =>
                {
                    peeked.entry = Some(v);
                }
                Ok(PeerReply::Withheld { version, len }) => match &mut peeked.withheld {
                    Some(w) if w.version == version => w.holders.push(id),
                    Some(w) if w.version > version => {}
                    w => {
                        *w = Some(Withheld {
                            version,
                            len,
                            holders: vec![id],
                        })
                    }
                },
                _ => {}
            }
        }
        peeked.unknown = owner_silent || (!owners.is_empty() && !owner_answered);
        peeked
    }

    /// The value a `Peek` withheld, from the first of its holders (in the
    /// order they answered: the least busy first) that sends it, in room
    /// taken from `budget` before it is asked for. A newer version written
    /// since the peek is as good; an older one (the holder lost its copy
    /// meanwhile) is not.
    async fn fetch(
        self: &Arc<Self>,
        collection: &str,
        key: &[u8],
        w: Withheld,
        budget: Option<&Arc<Inflight>>,
    ) -> Result<Versioned, OpError> {
        let mut room = budget
            .map(|b| b.reserve(usize::try_from(w.len).unwrap_or(usize::MAX)))
            .transpose()
            .map_err(unavailable)?;
        let guard = self.guard();
        let mut why = String::from("none is a member now");
        for id in w.holders {
            let Some(peer) = self.peer(id) else { continue };
            let op = PeerOp::Read {
                collection: collection.to_string(),
                key: Bytes::copy_from_slice(key),
            };
            match peer.link.request(op, self.options.timeout).await {
                Ok(PeerReply::Entry(Some(v)))
                    if v.version >= w.version
                        && guard.admits(v.version.ts, self.admission_wall()) =>
                {
                    let value = match (v.value, room.take()) {
                        (Some(value), Some(room)) => Some(room.hold(value).map_err(unavailable)?),
                        (value, _) => value,
                    };
                    return Ok(Versioned {
                        value,
                        version: v.version,
                    });
                }
                Ok(_) => why = format!("{} no longer holds it", peer.link.addr()),
                Err(e) => {
                    if !matches!(e, LinkError::Remote { .. }) {
                        self.suspect(id);
                    }
                    why = e.to_string();
                }
            }
        }
        Err(OpError::new(
            ErrorKind::Unavailable,
            format!(
                "the newest value of key {:?} in collection {collection:?} ({} bytes) is on members that did not send it ({why}): try again",
                String::from_utf8_lossy(key),
                w.len
            ),
        ))
    }

    /// The other members that host `collection` and answer, with their
    /// addresses, best first: healthy before unhealthy, synced before
    /// re-syncing, then in id order (so every node prefers the same one).
    /// Where a watch of a collection this node does not store is followed.
    pub(crate) fn watch_hosts(&self, collection: &str) -> Vec<(u64, String)> {
        let m = self.membership.lock().unwrap();
        let me = self.dialer.me;
        let owners = self.owners_in(&m, collection);
        let mut hosts: Vec<(bool, Liveness, u64, String)> = m
            .members()
            .filter(|u| {
                u.id != me
                    && matches!(u.liveness, Liveness::Alive | Liveness::Suspect)
                    && owners.contains(&u.id)
            })
            .map(|u| (u.syncing, u.liveness, u.id, u.addr.clone()))
            .collect();
        hosts.sort();
        hosts
            .into_iter()
            .map(|(_, _, id, addr)| (id, addr))
            .collect()
    }

    /// Whether this node owns `collection`.
    pub(crate) fn hosts_here(&self, collection: &str) -> bool {
        self.everyone_owns_everything() || self.owners(collection).contains(&self.dialer.me)
    }

    /// A page of an owner's listing of `collection`: the owners are asked
    /// in `watch_hosts` order until one answers (with `synced_only`, only
    /// those not syncing themselves). `None` if none does.
    pub(crate) async fn list_remote(
        self: &Arc<Self>,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
        synced_only: bool,
    ) -> Option<Page> {
        for (id, _) in self.watch_hosts(collection) {
            if synced_only && self.member_syncs(id) {
                continue;
            }
            let Some(peer) = self.peer(id) else { continue };
            let op = PeerOp::List {
                collection: collection.to_string(),
                after: after.map(Bytes::copy_from_slice),
                limit,
            };
            match peer.link.request(op, self.options.timeout).await {
                Ok(PeerReply::Page(page)) => return Some(page),
                Ok(_) | Err(LinkError::Remote { .. }) => {}
                Err(_) => self.suspect(id),
            }
        }
        None
    }

    /// A page merged from this node's listing of `collection` and every
    /// live peer's, for a collection no live member owns: its writes were
    /// kept by whichever members they went through. Pages carry no versions
    /// and leave tombstones out, so each key of the merged page is then
    /// read everywhere, as a get is: its newest version is listed, and a
    /// key deleted through another member is left out.
    pub(crate) async fn list_everywhere(
        self: &Arc<Self>,
        store: &Store,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        let mut after = after.map(Bytes::copy_from_slice);
        loop {
            let page = self
                .list_everywhere_once(store, collection, after.as_deref(), limit)
                .await?;
            // Every key of a merged page may have been deleted; an empty
            // page ends a listing, so the next one is taken instead.
            match page.next {
                Some(next) if page.entries.is_empty() => after = Some(next),
                _ => return Ok(page),
            }
        }
    }

    /// One merged page, which may come out empty of live keys.
    async fn list_everywhere_once(
        self: &Arc<Self>,
        store: &Store,
        collection: &str,
        after: Option<&[u8]>,
        limit: u32,
    ) -> Result<Page, OpError> {
        let mut asks = self.ask_live_peers(|| PeerOp::List {
            collection: collection.to_string(),
            after: after.map(Bytes::copy_from_slice),
            limit,
        });
        let mut pages = vec![list_local(store, collection, after, limit)?];
        let mut silent = None;
        while let Some(Ok((id, r))) = asks.join_next().await {
            match r {
                Ok(PeerReply::Page(page)) => pages.push(page),
                Ok(_) | Err(LinkError::Remote { .. }) => {}
                Err(e) => {
                    self.suspect(id);
                    silent = Some(e);
                }
            }
        }
        // A member that holds some of the collection's keys may not have
        // answered: a page without them would end the listing early, as if
        // they did not exist.
        if let Some(e) = silent {
            return Err(OpError::new(
                dhrt_proto::ErrorKind::Unavailable,
                format!(
                    "no owner of collection {collection:?} answered, and a member that may hold some of its keys did not either ({e}): the listing would be incomplete (try again)"
                ),
            ));
        }
        let merged = merge_pages(pages, limit);
        let mut entries = Vec::with_capacity(merged.entries.len());
        for chunk in merged.entries.chunks(RESOLVE_AT_ONCE) {
            let mut reads = tokio::task::JoinSet::new();
            for (i, e) in chunk.iter().enumerate() {
                let (this, store) = (self.clone(), store.clone());
                let (collection, key) = (collection.to_string(), e.key.clone());
                reads.spawn(async move {
                    let local = match store.get_versioned(&collection, &key) {
                        Ok(Some((value, version))) => Some(Versioned {
                            value,
                            version: super::stamp(version),
                        }),
                        _ => None,
                    };
                    // The page is held for the client as a whole.
                    let remote = this.read_remote(&collection, &key, None).await?;
                    let newest = match (local, remote) {
                        (Some(l), Some(r)) if r.version > l.version => Some(r),
                        (Some(l), _) => Some(l),
                        (None, r) => r,
                    };
                    Ok::<_, OpError>((i, key, newest.and_then(|v| v.value)))
                });
            }
            let mut found: Vec<(usize, Bytes, Option<Bytes>)> = reads
                .join_all()
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            found.sort_by_key(|(i, ..)| *i);
            entries.extend(
                found
                    .into_iter()
                    .filter_map(|(_, key, value)| Some(Entry { key, value: value? })),
            );
        }
        // `next` is the merged page's: the keys left out were passed.
        Ok(Page {
            entries,
            next: merged.next,
        })
    }

    /// Who this node dials as, for links of its own (watch relays).
    pub(crate) fn dialer(&self) -> Dialer {
        self.dialer.clone()
    }

    /// How long a peer has to answer a request.
    pub(crate) fn peer_timeout(&self) -> std::time::Duration {
        self.options.timeout
    }
}

/// A page of this node's own listing of `collection`: live keys after
/// `after`, at most `limit` of them and about `MAX_PAGE_BYTES`.
pub(crate) fn list_local(
    store: &Store,
    collection: &str,
    after: Option<&[u8]>,
    limit: u32,
) -> Result<Page, OpError> {
    let mut entries: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    let mut more = false;
    for r in store
        .list(collection, after, true)
        .map_err(crate::error::op_error)?
    {
        let value = r.value.unwrap_or_default();
        let size = r.key.len() + value.len();
        if entries.len() >= limit as usize || (!entries.is_empty() && bytes + size > MAX_PAGE_BYTES)
        {
            more = true;
            break;
        }
        bytes += size;
        entries.push(Entry {
            key: r.key.into(),
            value,
        });
    }
    let next = if more {
        entries.last().map(|e| e.key.clone())
    } else {
        None
    };
    Ok(Page { entries, next })
}

/// The largest value a fan-out read takes inline in the peers' answers:
/// below what the budget of values in flight counts. Larger ones are
/// fetched from one peer.
const INLINE_MAX: u32 = UNCOUNTED as u32 - 1;

/// What the live peers answered to a `Peek` of a key.
#[derive(Default)]
struct Peeked {
    /// The newest entry sent whole (a tombstone, a small value).
    entry: Option<Versioned>,
    /// The newest value withheld for its size.
    withheld: Option<Withheld>,
    /// "Not found" is not known (see `read_remote_told`).
    unknown: bool,
}

/// A value withheld for its size: its version and length, and the peers
/// that hold that version, in the order they answered.
struct Withheld {
    version: Stamp,
    len: u64,
    holders: Vec<u64>,
}

fn unavailable(why: String) -> OpError {
    OpError::new(ErrorKind::Unavailable, why)
}

/// Keys of a merged page read everywhere at once.
const RESOLVE_AT_ONCE: usize = 32;

/// Where `key` comes in a listing.
fn listing_place(key: &[u8]) -> (u64, &[u8]) {
    (dhrt_storage::order_hash(key), key)
}

/// One page from pages of the same listing (the same `after` and `limit`)
/// taken from several stores: their union, in listing order, each key once,
/// at most `limit` entries and about [`MAX_PAGE_BYTES`]. A store's page cut
/// short says nothing of its keys past the cut, so the merged page stops at
/// the earliest cut, and its `next` resumes from its last key.
pub(crate) fn merge_pages(pages: Vec<Page>, limit: u32) -> Page {
    let cut: Option<Bytes> = pages
        .iter()
        .filter_map(|p| p.next.clone())
        .min_by(|a, b| listing_place(a).cmp(&listing_place(b)));
    let mut merged: std::collections::BTreeMap<(u64, Bytes), Bytes> =
        std::collections::BTreeMap::new();
    for page in pages {
        for e in page.entries {
            if cut
                .as_ref()
                .is_some_and(|c| listing_place(&e.key) > listing_place(c))
            {
                continue;
            }
            merged
                .entry((dhrt_storage::order_hash(&e.key), e.key))
                .or_insert(e.value);
        }
    }
    let total = merged.len();
    let mut entries: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    for ((_, key), value) in merged {
        let size = key.len() + value.len();
        if entries.len() >= limit as usize || (!entries.is_empty() && bytes + size > MAX_PAGE_BYTES)
        {
            break;
        }
        bytes += size;
        entries.push(Entry { key, value });
    }
    let next = if entries.len() < total || cut.is_some() {
        entries.last().map(|e| e.key.clone())
    } else {
        None
    };
    Page { entries, next }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(keys: &[&str], next: Option<&str>) -> Page {
        Page {
            entries: keys
                .iter()
                .map(|k| Entry {
                    key: Bytes::copy_from_slice(k.as_bytes()),
                    value: Bytes::from_static(b"v"),
                })
                .collect(),
            next: next.map(|n| Bytes::copy_from_slice(n.as_bytes())),
        }
    }

    /// Keys spread over three stores, some on two of them, paged through
    /// with a small limit: every key once, in listing order.
    #[test]
    fn pages_from_several_stores_merge_into_one_listing() {
        let all: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
        let mut sorted = all.clone();
        sorted.sort_by(|a, b| listing_place(a.as_bytes()).cmp(&listing_place(b.as_bytes())));
        // Store s holds keys i with i % 3 == s, and every key divisible by 5.
        let holds = |s: usize, k: &str| {
            let i: usize = k[1..].parse().unwrap();
            i % 3 == s || i.is_multiple_of(5)
        };
        let list = |s: usize, after: Option<&str>, limit: usize| {
            let start = after.map_or(0, |a| sorted.iter().position(|k| k == a).unwrap() + 1);
            let mine: Vec<&str> = sorted[start..]
                .iter()
                .filter(|k| holds(s, k))
                .map(String::as_str)
                .collect();
            let taken = &mine[..mine.len().min(limit)];
            page(taken, (mine.len() > limit).then(|| *taken.last().unwrap()))
        };
        for limit in [1, 3, 7, 100] {
            let mut seen = Vec::new();
            let mut after: Option<String> = None;
            for _ in 0..200 {
                let pages = (0..3).map(|s| list(s, after.as_deref(), limit)).collect();
                let merged = merge_pages(pages, limit as u32);
                assert!(merged.entries.len() <= limit);
                seen.extend(
                    merged
                        .entries
                        .iter()
                        .map(|e| String::from_utf8(e.key.to_vec()).unwrap()),
                );
                match merged.next {
                    Some(n) => after = Some(String::from_utf8(n.to_vec()).unwrap()),
                    None => break,
                }
            }
            assert_eq!(seen, sorted, "limit {limit}");
        }
    }
}
