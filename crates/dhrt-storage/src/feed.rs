//! Watching a collection: the changes this node applies to it, in the order
//! it applied them, resumable from any position it handed out.
//!
//! Every record carries a *seq*, greater for every record appended later
//! (see `docs/format.md`), and compaction keeps seqs and log order. A
//! [`Position`] is (history, seq): the collection file's random history id
//! and the seq of the last record a watcher has passed. Resuming reads the
//! log from the first record after that seq (found through the log's sparse
//! checkpoints), and emits a record only if the index still points at it:
//! a superseded record always has a successor further on (the engine never
//! appends a losing version), so per key the versions emitted strictly
//! increase, and nothing after the position is missed. Compaction removes
//! superseded records (their successors remain) and tombstones past their
//! grace (it records the greatest purged seq in the file header: a position
//! below it cannot be resumed exactly, [`Error::ResumeGone`]).
//!
//! A watcher reads the log's map with its own cursor and never takes the
//! writer lock (except for an instant when it starts), so a slow watcher
//! costs writers nothing; it reads only below the offset up to which the
//! index reflects the log (`LogFile::applied`), and under
//! `SyncMode::Always` only what is durable.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;

use crate::collection::{Collection, Generation};
use crate::error::{Error, Result};
use crate::log::LogFile;
use crate::record::{self, Decoded, FILE_HEADER_LEN, Kind};
use crate::scan::Listing;
use crate::store::Core;
use crate::version::Version;

/// What an event costs beyond its key and value, counted in a batch's
/// budget ([`Watch::poll`]): its own memory (the event, its key's and
/// value's handles, the copy a relay or a client's rendering makes) and,
/// rendered, its JSON or binary frame (field names, collection, version,
/// resume token). Without it a batch of tiny records (short keys, empty
/// values) held some 65,000 events against 256 KiB of keys, about 20 MB
/// in memory for a watcher that stopped reading.
pub const EVENT_OVERHEAD: usize = 256;

/// A place in one node's history of one collection: what a watcher has
/// seen. Printed as 32 hex digits (the resume token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Position {
    /// The collection file's history id; 0 for "before the collection
    /// existed here".
    pub history: u64,
    /// The seq of the last record passed.
    pub seq: u64,
}

impl Position {
    /// Nothing seen yet: resuming from it replays the whole history.
    pub const START: Position = Position { history: 0, seq: 0 };
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}{:016x}", self.history, self.seq)
    }
}

impl FromStr for Position {
    type Err = &'static str;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        const BAD: &str = "a position is 32 hex digits";
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BAD);
        }
        let history = u64::from_str_radix(&s[..16], 16).map_err(|_| BAD)?;
        let seq = u64::from_str_radix(&s[16..], 16).map_err(|_| BAD)?;
        Ok(Position { history, seq })
    }
}

/// What a change did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKind {
    /// The key now has a value.
    Set,
    /// The key was deleted.
    Delete,
    /// Every key with a version older than the drop's was removed.
    Drop,
}

impl ChangeKind {
    /// `"set"`, `"delete"` or `"drop"`.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Set => "set",
            ChangeKind::Delete => "delete",
            ChangeKind::Drop => "drop",
        }
    }
}

/// One change applied to the collection on this node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// What happened.
    pub kind: ChangeKind,
    /// The key (empty for a drop).
    pub key: Bytes,
    /// The new value, for a set.
    pub value: Option<Bytes>,
    /// The change's version.
    pub version: Version,
    /// Resume after this change.
    pub position: Position,
}

/// What a watch yields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key's current value, from the snapshot a watch started with.
    Initial {
        /// The key.
        key: Bytes,
        /// Its value.
        value: Bytes,
        /// Its version.
        version: Version,
    },
    /// The snapshot is complete; changes follow. Resuming from this
    /// position gives every change made since the snapshot began.
    InitialDone(Position),
    /// A change.
    Change(Change),
}

impl WatchEvent {
    /// The bytes of key and value it carries.
    pub fn payload_len(&self) -> usize {
        match self {
            WatchEvent::Initial { key, value, .. } => key.len() + value.len(),
            WatchEvent::InitialDone(_) => 0,
            WatchEvent::Change(c) => c.key.len() + c.value.as_ref().map_or(0, Bytes::len),
        }
    }
}

/// Where a watch starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchFrom {
    /// With the changes applied from now on.
    Now,
    /// With the changes after a position this node handed out.
    After(Position),
    /// With the current value of every live key, then
    /// [`WatchEvent::InitialDone`], then the changes made since the
    /// snapshot began.
    Snapshot,
}

/// A watch of one collection; see the module documentation. Poll it when
/// the store says the collection changed ([`crate::Store::on_change`]).
pub struct Watch {
    /// The store's collections (not the store: a watch does not keep it
    /// open).
    store: Arc<Core>,
    name: String,
    prefix: Option<Vec<u8>>,
    collection: Option<Arc<Collection>>,
    /// The generation `offset` points into.
    generation: Option<Arc<Generation>>,
    offset: u64,
    position: Position,
    /// The snapshot still being listed.
    snapshot: Option<Listing>,
    /// Keys the snapshot emitted from records written after it began, with
    /// those records' seqs: the follow phase skips them up to there.
    raced: HashMap<Vec<u8>, u64>,
    /// The greatest seq in `raced`.
    raced_max: u64,
    /// A snapshot of a collection that did not exist: its end is still to
    /// be said.
    empty_snapshot: bool,
    sync_always: bool,
}

impl fmt::Debug for Watch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Watch")
            .field("collection", &self.name)
            .field("position", &self.position)
            .finish()
    }
}

fn gone(name: &str, position: Position, reason: &'static str) -> Error {
    Error::ResumeGone {
        collection: name.to_string(),
        position: position.to_string(),
        reason,
    }
}

/// The offset of the first record in `log` with a seq greater than `seq`,
/// at or below `limit`.
fn first_after(log: &LogFile, seq: u64, limit: u64) -> u64 {
    let map = log.map();
    let mut at = log.checkpoint_before(seq).max(FILE_HEADER_LEN as u64);
    while at < limit {
        let Ok(header) = record::parse_header(&map[at as usize..limit as usize]) else {
            break;
        };
        if header.seq > seq {
            break;
        }
        at += header.record_len() as u64;
    }
    at.min(limit)
}

impl Watch {
    pub(crate) fn new(
        store: Arc<Core>,
        name: &str,
        collection: Option<Arc<Collection>>,
        from: WatchFrom,
        prefix: Option<Vec<u8>>,
        sync_always: bool,
    ) -> Result<Watch> {
        let mut w = Watch {
            store,
            name: name.to_string(),
            prefix: prefix.filter(|p| !p.is_empty()),
            collection: None,
            generation: None,
            offset: FILE_HEADER_LEN as u64,
            position: Position::START,
            snapshot: None,
            raced: HashMap::new(),
            raced_max: 0,
            empty_snapshot: false,
            sync_always,
        };
        let Some(coll) = collection else {
            // No history here yet: everything it will hold is new.
            return match from {
                WatchFrom::After(p) if p.history != 0 => Err(gone(
                    name,
                    p,
                    "this node holds no history of the collection",
                )),
                WatchFrom::Snapshot => {
                    w.empty_snapshot = true;
                    Ok(w)
                }
                _ => Ok(w),
            };
        };
        let (generation, applied, head_seq, epoch_start) = coll.head();
        let header = generation.log.header();
        let recovered = coll
            .recovered_max_seq
            .load(std::sync::atomic::Ordering::Relaxed);
        match from {
            WatchFrom::Now | WatchFrom::Snapshot => {
                w.offset = applied;
                w.position = Position {
                    history: header.history,
                    seq: head_seq,
                };
                if from == WatchFrom::Snapshot {
                    w.snapshot = Some(Listing::new(Some(coll.clone()), None, true));
                }
            }
            WatchFrom::After(p) => {
                if p.history == 0 && p.seq != 0 {
                    return Err(gone(name, p, "not a position this node handed out"));
                }
                if p.history != 0 && p.history != header.history {
                    return Err(gone(
                        name,
                        p,
                        "the position is from another node or an earlier copy of the collection",
                    ));
                }
                if p.seq < header.purged_seq {
                    return Err(gone(
                        name,
                        p,
                        "compaction purged deletes made after this position",
                    ));
                }
                if p.history != 0 && p.seq < epoch_start && p.seq > recovered {
                    // Before the restart's epoch, and past what the log
                    // held when it reopened: a crash took those records
                    // (they were never synced), or the token was never
                    // handed out. Nothing here tells the two apart.
                    return Err(gone(
                        name,
                        p,
                        "this node's log ends before this position: changes up to it \
                         were lost in a crash of this node, or it was never handed out",
                    ));
                }
                if p.history != 0 && p.seq > head_seq {
                    return Err(gone(name, p, "the position is ahead of this node's log"));
                }
                w.offset = first_after(&generation.log, p.seq, applied);
                w.position = Position {
                    history: header.history,
                    seq: p.seq,
                };
            }
        }
        w.generation = Some(generation);
        w.collection = Some(coll);
        Ok(w)
    }

    /// The collection watched.
    pub fn collection(&self) -> &str {
        &self.name
    }

    /// The position after everything this watch has passed: resuming from
    /// it misses nothing. It moves on over records that were filtered out
    /// or superseded too, so it stays fresh for an idle or filtered watch.
    /// During a snapshot it is the position the snapshot began at.
    pub fn position(&self) -> Position {
        self.position
    }

    /// Whether the snapshot is still being listed.
    pub fn in_snapshot(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Bytes of log this watch has yet to read: 0 while it lists its
    /// snapshot.
    pub fn lag_bytes(&self) -> u64 {
        self.lag_bytes_known().unwrap_or(0)
    }

    /// [`lag_bytes`](Self::lag_bytes), `None` when it cannot be told (in
    /// a snapshot). After a compaction since the last poll, the lag it will
    /// have once it follows the collection to the new file: from the first
    /// record after its position there to the end (the next poll resumes
    /// there; what is left of the old file is not read). A watch that stops
    /// polling is judged by what was written meanwhile, however many
    /// compactions replaced the file it last read.
    pub fn lag_bytes_known(&self) -> Option<u64> {
        match (&self.collection, &self.generation) {
            (Some(c), Some(g)) if self.snapshot.is_none() => {
                let current = c.current.load();
                if Arc::ptr_eq(&current.log, &g.log) {
                    return Some(g.log.applied().saturating_sub(self.offset));
                }
                let applied = current.log.applied();
                Some(applied.saturating_sub(first_after(&current.log, self.position.seq, applied)))
            }
            (None, _) => Some(0),
            _ => None,
        }
    }

    /// Follows the collection to its current file if a compaction
    /// replaced the one this watch reads, without reading: a watch whose
    /// reader stopped no longer holds the replaced file open (nor its disk
    /// space). Whether it moved. (A resume that compaction made impossible
    /// is left for the next poll to report.)
    pub fn follow(&mut self) -> bool {
        let (Some(c), Some(g)) = (&self.collection, &self.generation) else {
            return false;
        };
        if self.snapshot.is_some() {
            return false;
        }
        let current = c.current.load_full();
        if Arc::ptr_eq(&current.log, &g.log) {
            return false;
        }
        self.relocate_to(current).is_ok()
    }

    /// Records appended to the collection after this watch's position (a
    /// measure that compaction does not shrink, unlike bytes).
    pub fn records_behind(&self) -> u64 {
        self.collection.as_ref().map_or(0, |c| {
            c.last_seq_hint
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(self.position.seq)
        })
    }

    /// The events available now, up to about `max_bytes` of keys and
    /// values, each event counted [`EVENT_OVERHEAD`] more (at least one
    /// event if any is available). Empty when the watch has
    /// caught up. [`Error::ResumeGone`] if compaction purged deletes this
    /// watch had not yet read (it fell a tombstone grace behind).
    pub fn poll(&mut self, max_bytes: usize) -> Result<Vec<WatchEvent>> {
        let mut out = Vec::new();
        if self.empty_snapshot {
            self.empty_snapshot = false;
            out.push(WatchEvent::InitialDone(self.position));
            return Ok(out);
        }
        if self.collection.is_none() {
            match self.store.existing_collection(&self.name) {
                Some(c) => {
                    let generation = c.current.load_full();
                    if generation.log.header().purged_seq > 0 {
                        return Err(gone(
                            &self.name,
                            self.position,
                            "compaction purged deletes made after this position",
                        ));
                    }
                    self.position = Position {
                        history: generation.log.header().history,
                        seq: 0,
                    };
                    self.offset = FILE_HEADER_LEN as u64;
                    self.generation = Some(generation);
                    self.collection = Some(c);
                }
                None => return Ok(out),
            }
        }
        let mut budget = 0usize;
        if let Some(listing) = &mut self.snapshot {
            while budget < max_bytes {
                let Some((rec, seq)) = listing.next_with_seq() else {
                    self.snapshot = None;
                    out.push(WatchEvent::InitialDone(self.position));
                    return Ok(out);
                };
                if let Some(p) = &self.prefix
                    && !rec.key.starts_with(p)
                {
                    continue;
                }
                let Some(value) = rec.value else { continue };
                if seq > self.position.seq {
                    self.raced.insert(rec.key.clone(), seq);
                    self.raced_max = self.raced_max.max(seq);
                }
                budget += EVENT_OVERHEAD + rec.key.len() + value.len();
                out.push(WatchEvent::Initial {
                    key: Bytes::from(rec.key),
                    value,
                    version: rec.version,
                });
            }
            return Ok(out);
        }
        let coll = self.collection.clone().expect("set above");
        // The end of what the index reflects, read before the generation it
        // is judged against is chosen (and the same generation after): a
        // rebuild swapped in later holds every record below it, one swapped
        // in earlier is what `applied` already belongs to.
        let (current, mut limit) = loop {
            let g = coll.current.load_full();
            let applied = g.log.applied();
            if Arc::ptr_eq(&coll.current.load(), &g) {
                break (g, applied);
            }
        };
        self.relocate_to(current)?;
        let generation = self.generation.clone().expect("set with the collection");
        let log = &generation.log;
        if self.sync_always {
            limit = limit.min(log.synced());
        }
        let map = log.map();
        let history = self.position.history;
        while self.offset < limit && (budget < max_bytes || out.is_empty()) {
            let at = self.offset as usize;
            let bytes = &map[at..limit as usize];
            let header = match record::parse_header(bytes) {
                Ok(h) if h.record_len() <= bytes.len() => h,
                _ => {
                    coll.compact_requested
                        .store(true, std::sync::atomic::Ordering::Release);
                    return Err(Error::Checksum {
                        collection: self.name.clone(),
                        offset: self.offset,
                    });
                }
            };
            let len = header.record_len();
            let offset = self.offset;
            self.offset += len as u64;
            self.position.seq = header.seq;
            let key_end = record::RECORD_HEADER_LEN + header.key_len as usize;
            let key = &bytes[record::RECORD_HEADER_LEN..key_end];
            if !self.raced.is_empty() {
                if self.raced.get(key).is_some_and(|&s| s >= header.seq) {
                    continue;
                }
                if header.seq >= self.raced_max {
                    self.raced = HashMap::new();
                }
            }
            let kind = match header.kind {
                Kind::Drop => ChangeKind::Drop,
                Kind::Set | Kind::Tombstone => {
                    if let Some(p) = &self.prefix
                        && !key.starts_with(p)
                    {
                        continue;
                    }
                    // Only the winning version: the index points here.
                    if generation
                        .index
                        .get(key)
                        .is_none_or(|s| s.offset() != offset)
                    {
                        continue;
                    }
                    if header.kind == Kind::Set {
                        ChangeKind::Set
                    } else {
                        ChangeKind::Delete
                    }
                }
            };
            let value = match record::decode(bytes) {
                Decoded::Record { .. } if kind != ChangeKind::Set => None,
                Decoded::Record { .. } => Some((**map).slice(at + key_end..at + len)),
                _ => {
                    // Damaged since it was written: quarantined as a read
                    // would; a replica's copy comes back as a new change.
                    if let Some(slot) = generation.index.get(key) {
                        coll.quarantine(log, key, slot);
                    }
                    continue;
                }
            };
            budget += EVENT_OVERHEAD + key.len() + value.as_ref().map_or(0, Bytes::len);
            out.push(WatchEvent::Change(Change {
                kind,
                key: (**map).slice(at + record::RECORD_HEADER_LEN..at + key_end),
                value,
                version: header.version,
                position: Position {
                    history,
                    seq: header.seq,
                },
            }));
        }
        Ok(out)
    }

    /// Follows the collection to `current`, its current generation: the
    /// same offset after a reshard (same log), the first record after this
    /// watch's position after a compaction (new log).
    fn relocate_to(&mut self, current: Arc<Generation>) -> Result<()> {
        let generation = self.generation.as_ref().expect("set with the collection");
        if Arc::ptr_eq(&current, generation) {
            return Ok(());
        }
        if !Arc::ptr_eq(&current.log, &generation.log) {
            if current.log.header().purged_seq > self.position.seq {
                return Err(gone(
                    &self.name,
                    self.position,
                    "this watch fell behind a compaction that purged deletes it had not read",
                ));
            }
            self.offset = first_after(&current.log, self.position.seq, current.log.applied());
        }
        self.generation = Some(current);
        Ok(())
    }
}
