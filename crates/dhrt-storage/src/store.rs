//! The `Store`: a data directory (or memory) of collections, the public API,
//! the background thread that reshards and compacts, and the sync thread.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;

use crate::collection::{COMPACT_SUFFIX, Collection, EPOCH_SHIFT, LOG_SUFFIX, Stamp, Written};
use crate::compact::{self, CompactionReport};
use crate::error::{Error, Result};
use crate::index::DIGEST_BUCKETS;
use crate::key_list::KeyList;
use crate::name::validate_collection_name;
use crate::record::MAX_KEY_LEN;
use crate::scan::{Listing, Record, Records, Scan};
use crate::version::{Clock, Version};
use crate::watermark::WATERMARK_SUFFIX;
use crate::{Options, SyncMode};

/// Collections by name. Looked up on every operation: foldhash (seeded per
/// process) instead of SipHash.
type Collections = HashMap<String, Arc<Collection>, foldhash::fast::RandomState>;

/// An embedded key/value store: named collections of byte keys and values,
/// each collection one append-only log file in the data directory (or an
/// anonymous in-memory file in memory mode), indexed in memory.
///
/// Cheap to clone; all clones share the same store. `Send + Sync`; reads take
/// no lock, writes lock only their collection.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let store = dhrt_storage::Store::open(dir.path(), Default::default()).unwrap();
/// store.set("users", b"ada", b"lovelace").unwrap();
/// assert_eq!(store.get("users", b"ada").unwrap().as_deref(), Some(&b"lovelace"[..]));
/// assert!(store.delete("users", b"ada").unwrap());
/// assert_eq!(store.get("users", b"ada").unwrap(), None);
/// ```
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Shutdown {
    stop: Mutex<bool>,
    wake: Condvar,
    /// Rebuilds (compactions, reshards) give up and none starts while set:
    /// [`Store::compact_damaged`] is compacting damaged records out.
    paused: std::sync::atomic::AtomicBool,
    /// The background thread is choosing or running a rebuild.
    busy: std::sync::atomic::AtomicBool,
}

/// Told the name of a collection after each write that changed it.
struct Listener(Box<dyn Fn(&str) + Send + Sync>);

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Listener")
    }
}

/// The file in the data directory holding the last epoch (see
/// `docs/format.md`).
const EPOCH_FILE: &str = "EPOCH";

/// What the store and its background thread share.
#[derive(Debug)]
pub(crate) struct Core {
    dir: Option<PathBuf>,
    options: Options,
    clock: Clock,
    collections: ArcSwap<Collections>,
    create: Mutex<()>,
    recovered: Vec<RecoveryReport>,
    /// This opening's epoch: the top bits of every seq it hands out.
    epoch: u64,
    listener: arc_swap::ArcSwapOption<Listener>,
    /// The data directory's disk and its reserve (persisted mode).
    disk: Option<crate::disk::Disk>,
    /// See [`Store::hold_tombstones_from`].
    hold_from_ms: std::sync::atomic::AtomicU64,
}

/// Dropped when the last `Store` clone is: stops and joins the background
/// threads, syncs, and only then releases the directory lock.
#[derive(Debug)]
struct Inner {
    core: Arc<Core>,
    shutdown: Arc<Shutdown>,
    /// The background thread (compaction, resharding) and, in persisted
    /// mode, the sync thread.
    threads: Vec<JoinHandle<()>>,
    _dir_lock: Vec<File>,
}

impl std::ops::Deref for Inner {
    type Target = Core;

    fn deref(&self) -> &Core {
        &self.core
    }
}

/// What opening a collection file found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The collection.
    pub collection: String,
    /// Records replayed.
    pub records: u64,
    /// Bytes cut off a torn tail, if any.
    pub truncated_bytes: u64,
    /// Zeros after the last record given back: space reserved ahead of the
    /// tail by a process that stopped without closing the log. Not a torn
    /// record.
    pub reserved_bytes: u64,
    /// How far the log was confirmed durable (its watermark file), if it
    /// had one. A cut at or past it (`truncated_bytes`) lost only writes
    /// that were never synced; damage below it refuses the open instead.
    pub durable_watermark: Option<u64>,
    /// Records carried over from a format 1 file converted on this open.
    pub converted_records: Option<u64>,
    /// Damaged records stepped over because a later record of the same key
    /// supersedes them (garbage that nothing had read); the collection is
    /// compacted soon after, which drops them from the file. A damaged
    /// record that may still be a key's value refuses the open instead.
    pub damaged_records_skipped: u64,
    /// The file header failed its checks (why) over a sound log, and was
    /// rebuilt from what could be trusted (`header.rs`).
    pub header_rebuilt: Option<String>,
}

/// Statistics of one collection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CollectionStats {
    /// The collection's name.
    pub name: String,
    /// Live keys.
    pub keys: u64,
    /// Tombstones not yet purged.
    pub tombstones: u64,
    /// Length of the log, in bytes.
    pub bytes: u64,
    /// Bytes of the log held by superseded records (reclaimed by compaction).
    pub garbage_bytes: u64,
    /// Whether writes are refused after a failed fsync.
    pub poisoned: bool,
    /// Shards the index is split into (grows with the collection).
    pub index_shards: usize,
    /// The most records a compaction or reshard of it replayed while
    /// holding its writer lock since it was opened: the longest a writer
    /// waited for a rebuild, in records (bounded by
    /// [`crate::LOCKED_CATCH_UP_BYTES`], unless writers outran a
    /// compaction's steps: up to `Options::rebuild_step_max` then).
    pub rebuild_locked_records_max: u64,
    /// Records of it that failed their checksum since it was opened (on a
    /// read, a compaction or a watch's scan): each one's key was
    /// quarantined until a replica's copy is applied.
    pub damaged_records: u64,
}

/// The anti-entropy digest of one collection; see [`Store::digest`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Digest {
    /// [`DIGEST_BUCKETS`] bucket hashes.
    pub buckets: Vec<u64>,
    /// The newest drop of the collection, if one is still on record.
    pub dropped_at: Option<Version>,
}

impl Digest {
    /// The digest of a collection without entries or drops.
    pub fn empty() -> Self {
        Digest {
            buckets: vec![0; DIGEST_BUCKETS],
            dropped_at: None,
        }
    }

    /// The buckets in which `self` and `other` differ.
    pub fn differing(&self, other: &Digest) -> Vec<usize> {
        (0..DIGEST_BUCKETS)
            .filter(|&b| self.buckets.get(b) != other.buckets.get(b))
            .collect()
    }

    /// One number for the whole digest (xxh3 of the buckets and the drop):
    /// equal on replicas holding the same entries, tombstones included.
    pub fn summary(&self) -> u64 {
        let mut bytes = Vec::with_capacity(self.buckets.len() * 8 + 16);
        for b in &self.buckets {
            bytes.extend_from_slice(&b.to_le_bytes());
        }
        if let Some(d) = self.dropped_at {
            bytes.extend_from_slice(&d.ts.to_le_bytes());
            bytes.extend_from_slice(&d.node.to_le_bytes());
        }
        xxhash_rust::xxh3::xxh3_64(&bytes)
    }
}

/// Statistics of a store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stats {
    /// `"persisted"` or `"memory"`.
    pub mode: &'static str,
    /// The data directory, in persisted mode.
    pub data_dir: Option<PathBuf>,
    /// Every open collection, by name, including empty ones.
    pub collections: Vec<CollectionStats>,
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() || key.len() > MAX_KEY_LEN {
        return Err(Error::InvalidKey {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the data directory `dir` and recovers every
    /// collection in it. Fails if another process has it open, or if a
    /// collection file is corrupt in the middle (a torn tail is cut and
    /// reported instead).
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Store> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        let lock_path = dir.join("LOCK");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        if !crate::mmap::try_lock(&lock).map_err(|e| Error::io("lock", &lock_path, e))? {
            return Err(Error::Locked { path: dir });
        }
        // The directory too: `LOCK` is an empty file that a cleaner of old
        // files may delete, and a second process would then lock a new one.
        let dir_handle = File::open(&dir).map_err(|e| Error::io("open", &dir, e))?;
        if !crate::mmap::try_lock(&dir_handle).map_err(|e| Error::io("lock", &dir, e))? {
            return Err(Error::Locked { path: dir });
        }
        let clock = Clock::with_offset(options.node_id, options.clock_offset_ms);
        let mut collections = Collections::default();
        let mut recovered = Vec::new();
        let entries = std::fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))?;
        let mut names = Vec::new();
        let mut watermarked = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let file_name = entry.file_name();
            let Some(file_name) = file_name.to_str() else {
                continue;
            };
            if file_name.ends_with(COMPACT_SUFFIX) {
                tracing::info!(file = file_name, "removing an unfinished compaction");
                std::fs::remove_file(entry.path())
                    .map_err(|e| Error::io("remove", entry.path(), e))?;
            } else if let Some(name) = file_name.strip_suffix(LOG_SUFFIX)
                && validate_collection_name(name).is_ok()
            {
                names.push(name.to_string());
            } else if let Some(name) = file_name.strip_suffix(WATERMARK_SUFFIX)
                && validate_collection_name(name).is_ok()
            {
                watermarked.push(name.to_string());
            } else if file_name.ends_with(LOG_SUFFIX) {
                // Not a name this node would give a collection (a file
                // restored or copied under a wrong one): left alone, and
                // said, so that its collection does not just look empty.
                tracing::warn!(
                    file = file_name,
                    "ignoring a file named like a collection's log: what precedes {LOG_SUFFIX} is no valid collection name"
                );
            }
        }
        names.sort();
        // A watermark says records of its log were made durable: a log
        // missing beside it was lost, not never written.
        if let Some(name) = watermarked.iter().find(|w| !names.contains(w)) {
            return Err(Error::Corrupt {
                path: Collection::log_path(&dir, name),
                offset: 0,
                reason: "the log is missing, but its durable watermark file says records of it were durable",
            });
        }
        // A log shorter than its header, without a watermark: its creation
        // was interrupted, so it never held a record. Removed (on a full
        // disk, rewriting its header could fail and stop the node).
        let mut kept = Vec::with_capacity(names.len());
        for name in names {
            let path = Collection::log_path(&dir, &name);
            if Collection::never_created(&path)? {
                tracing::warn!(path = %path.display(), "removing the file of a collection whose creation was interrupted (it holds no record)");
                std::fs::remove_file(&path).map_err(|e| Error::io("remove", &path, e))?;
                crate::log::sync_dir(&dir).map_err(|e| Error::io("fsync", &dir, e))?;
            } else {
                kept.push(name);
            }
        }
        let names = kept;
        let recorded = read_epoch(&dir)?;
        let mut last_epoch = recorded.unwrap_or(0);
        for name in names {
            let path = Collection::log_path(&dir, &name);
            let (collection, recovery) = Collection::open(&path, &name, &options)?;
            clock.observe(recovery.max_ts);
            last_epoch = last_epoch.max(recovery.max_seq >> EPOCH_SHIFT);
            recovered.push(RecoveryReport {
                collection: name.clone(),
                records: recovery.records,
                truncated_bytes: recovery.truncated.map_or(0, |(bytes, _)| bytes),
                reserved_bytes: recovery.reserved,
                durable_watermark: recovery.watermark,
                converted_records: recovery.converted,
                damaged_records_skipped: recovery.damaged_skipped,
                header_rebuilt: recovery.header_rebuilt,
            });
            collections.insert(name, Arc::new(collection));
        }
        if recorded.is_none() {
            // `EPOCH` was damaged: the logs' last epoch may be older than
            // openings that wrote nothing, whose seqs a watcher may hold.
            last_epoch += DAMAGED_EPOCH_MARGIN;
        }
        // A new epoch, durable before any seq of it is handed out.
        if last_epoch >= MAX_EPOCH {
            return Err(Error::io(
                "open",
                dir.join(EPOCH_FILE),
                std::io::Error::other(format!(
                    "epoch {last_epoch} is the last a seq can carry ({MAX_EPOCH}): a new one would reuse seqs, so this directory cannot be opened again (copy its data into a new node)"
                )),
            ));
        }
        let epoch = last_epoch + 1;
        write_epoch(&dir, epoch)?;
        let disk = crate::disk::Disk::open(&dir, options.disk_reserve);
        for c in collections.values() {
            c.set_next_seq(crate::collection::first_seq_of(epoch));
        }
        Ok(Self::start(
            Some((dir, disk)),
            options,
            clock,
            collections,
            recovered,
            vec![lock, dir_handle],
            epoch,
        ))
    }

    /// A store in memory: the same API and semantics, no files. Nothing
    /// survives the process.
    pub fn memory(options: Options) -> Store {
        let clock = Clock::with_offset(options.node_id, options.clock_offset_ms);
        Self::start(
            None,
            options,
            clock,
            Collections::default(),
            Vec::new(),
            Vec::new(),
            1,
        )
    }

    fn start(
        dir: Option<(PathBuf, crate::disk::Disk)>,
        options: Options,
        clock: Clock,
        collections: Collections,
        recovered: Vec<RecoveryReport>,
        dir_lock: Vec<File>,
        epoch: u64,
    ) -> Store {
        let (dir, disk) = dir.unzip();
        let core = Arc::new(Core {
            dir,
            options,
            clock,
            collections: ArcSwap::from_pointee(collections),
            create: Mutex::new(()),
            recovered,
            epoch,
            listener: arc_swap::ArcSwapOption::empty(),
            disk,
            hold_from_ms: std::sync::atomic::AtomicU64::new(u64::MAX),
        });
        let shutdown = Arc::new(Shutdown::default());
        crate::mmap::start_reaper();
        let mut threads = Vec::new();
        {
            let (core, shutdown) = (core.clone(), shutdown.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("dhrt-storage-bg".into())
                    .spawn(move || background(&core, &shutdown))
                    .expect("spawn the storage background thread"),
            );
        }
        if core.dir.is_some() {
            let (core, shutdown) = (core.clone(), shutdown.clone());
            threads.push(
                std::thread::Builder::new()
                    .name("dhrt-storage-sync".into())
                    .spawn(move || sync_loop(&core, &shutdown))
                    .expect("spawn the storage sync thread"),
            );
        }
        Store {
            inner: Arc::new(Inner {
                core,
                shutdown,
                threads,
                _dir_lock: dir_lock,
            }),
        }
    }

    /// The settings this store was opened with.
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// The clock that stamps local writes. A replication layer observes
    /// remote versions through [`apply`](Self::apply), which merges them
    /// into this clock.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The data directory, or `None` in memory mode.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    /// The keys of `collection` quarantined (their record failed its
    /// checksum on a read, a listing, a scan) since the last call: they now
    /// read as missing here, though they exist. Cheap when there are none.
    pub fn take_quarantined(&self, collection: &str) -> Vec<Vec<u8>> {
        match self.inner.collections.load().get(collection) {
            Some(c) if c.any_quarantined.load(std::sync::atomic::Ordering::Acquire) => {
                c.any_quarantined
                    .store(false, std::sync::atomic::Ordering::Release);
                std::mem::take(&mut *c.quarantined_keys.lock().unwrap())
            }
            _ => Vec::new(),
        }
    }

    /// What recovery found in each collection when the store was opened.
    pub fn recovery(&self) -> &[RecoveryReport] {
        &self.inner.recovered
    }

    fn existing(&self, name: &str) -> Result<Option<Arc<Collection>>> {
        validate_collection_name(name)?;
        Ok(self.inner.collections.load().get(name).cloned())
    }

    /// Runs `f` on the collection `name`, created on first use. The common
    /// case, a collection that exists, borrows it from the collections map:
    /// no name check (only valid names are in the map) and no reference
    /// count taken on the write path.
    ///
    /// A collection released while `f` waited for its writer lock is
    /// retried on its successor.
    fn with_collection<T>(&self, name: &str, f: impl Fn(&Collection) -> Result<T>) -> Result<T> {
        loop {
            let result = match self.inner.collections.load().get(name) {
                Some(c) => f(c),
                None => self.existing_or_create(name).and_then(|c| f(&c)),
            };
            match result {
                Err(Error::Released { .. }) => std::thread::yield_now(),
                other => return self.inner.noted(other),
            }
        }
    }

    /// Forgets this store's copy of `name` if its digest is still
    /// `expected`: the collection leaves the store and its files are
    /// deleted, with no record of it left behind (unlike a drop, which is
    /// a versioned write every replica applies). For a node that no longer
    /// owns a collection, once every owner holds what this copy holds.
    /// Returns whether it was released; a write that raced the check keeps
    /// the copy. A write after it creates the collection anew.
    pub fn release(&self, name: &str, expected: &Digest) -> Result<bool> {
        let _creating = self.inner.create.lock().unwrap();
        let Some(c) = self.existing(name)? else {
            return Ok(false);
        };
        if !c.release_if(expected) {
            return Ok(false);
        }
        let mut map = Collections::clone(&self.inner.collections.load());
        map.remove(name);
        self.inner.collections.store(Arc::new(map));
        if let Some(dir) = self.dir() {
            let log = Collection::log_path(dir, name);
            for path in [crate::watermark::path_for(&log), log] {
                match std::fs::remove_file(&path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(Error::io("remove", path, e)),
                }
            }
            crate::log::sync_dir(dir).map_err(|e| Error::io("fsync", dir, e))?;
        }
        Ok(true)
    }

    fn existing_or_create(&self, name: &str) -> Result<Arc<Collection>> {
        if let Some(c) = self.existing(name)? {
            return Ok(c);
        }
        let _creating = self.inner.create.lock().unwrap();
        let collections = self.inner.collections.load();
        if let Some(c) = collections.get(name) {
            return Ok(c.clone());
        }
        let max = self.inner.options.max_collections;
        if !name.starts_with('_') {
            let count = counted(&collections);
            if count >= max {
                return Err(Error::TooManyCollections { count, max });
            }
        }
        drop(collections);
        let collection = Arc::new(Collection::create(
            self.dir(),
            name,
            &self.inner.options,
            crate::collection::first_seq_of(self.inner.epoch),
        )?);
        let mut map = Collections::clone(&self.inner.collections.load());
        map.insert(name.to_string(), collection.clone());
        self.inner.collections.store(Arc::new(map));
        Ok(collection)
    }

    /// Refuses a write of new values while the disk is full (see
    /// `disk.rs`); deletes and drops are taken.
    #[inline]
    fn room_for_values(&self) -> Result<()> {
        match &self.inner.disk {
            Some(d) if d.is_full() => Err(d.refusal()),
            _ => Ok(()),
        }
    }

    /// Whether new values are refused for want of disk space (see
    /// [`Error::DiskFull`]), and the bytes free at the last look.
    pub fn disk_full(&self) -> Option<(bool, u64)> {
        self.inner.disk.as_ref().map(|d| (d.is_full(), d.free()))
    }

    fn check_value(&self, value: &[u8]) -> Result<()> {
        // The format stores a value length in 32 bits, whatever the setting.
        let max = self.inner.options.max_value_len.min(u32::MAX as usize);
        if value.len() > max {
            return Err(Error::ValueTooLarge {
                len: value.len(),
                max,
            });
        }
        Ok(())
    }

    /// Tells the listener, if any, that `collection` changed.
    #[inline]
    fn changed(&self, collection: &str) {
        if let Some(l) = &*self.inner.listener.load() {
            (l.0)(collection);
        }
    }

    /// Calls `f` with a collection's name after every write that changed
    /// it (a set, a delete, a drop, local or replicated), once the change
    /// is visible to [`watch`](Self::watch): the place to wake watchers.
    /// `f` runs on the writer's thread, after its lock is released; keep it
    /// short. Replaces any earlier listener.
    pub fn on_change(&self, f: impl Fn(&str) + Send + Sync + 'static) {
        self.inner
            .listener
            .store(Some(Arc::new(Listener(Box::new(f)))));
    }

    /// Watches `collection` (which need not exist yet): see
    /// [`Watch`](crate::Watch). Only keys starting with `prefix` are
    /// emitted (a drop always is). Fails with [`Error::ResumeGone`] if
    /// `from` is a position this node cannot resume from exactly.
    pub fn watch(
        &self,
        collection: &str,
        from: crate::WatchFrom,
        prefix: Option<&[u8]>,
    ) -> Result<crate::Watch> {
        let existing = self.existing(collection)?;
        crate::Watch::new(
            self.inner.core.clone(),
            collection,
            existing,
            from,
            prefix.map(<[u8]>::to_vec),
            self.inner.options.sync == SyncMode::Always,
        )
    }

    fn write(
        &self,
        collection: &str,
        key: &[u8],
        value: Option<&[u8]>,
        stamp: Stamp<'_>,
    ) -> Result<Written> {
        let written = self.write_inner(collection, key, value, stamp)?;
        if let Written::Applied { .. } = written {
            self.changed(collection);
        }
        Ok(written)
    }

    fn write_inner(
        &self,
        collection: &str,
        key: &[u8],
        value: Option<&[u8]>,
        stamp: Stamp<'_>,
    ) -> Result<Written> {
        check_key(key)?;
        if let Some(v) = value {
            self.check_value(v)?;
            self.room_for_values()?;
        }
        let sync = self.inner.options.sync;
        if value.is_none() && matches!(stamp, Stamp::Local(_)) {
            // A local delete never creates its collection.
            loop {
                return match self.existing(collection)? {
                    Some(c) => match c.write(key, value, stamp, sync) {
                        Err(Error::Released { .. }) => continue,
                        other => self.inner.noted(other),
                    },
                    None => Ok(Written::Skipped),
                };
            }
        }
        self.with_collection(collection, |c| c.write(key, value, stamp, sync))
    }

    /// Sets `key` in `collection` (created on first write) to `value`, with a
    /// fresh local version.
    pub fn set(&self, collection: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.write(
            collection,
            key,
            Some(value),
            Stamp::Local(&self.inner.clock),
        )
        .map(|_| ())
    }

    /// Sets many keys of `collection` at once: one lock, one write to the
    /// log and (with `SyncMode::Always`) one fsync for all of them. Every
    /// entry is checked first; if one is invalid, nothing is written.
    /// Returns the version of each entry, in order.
    pub fn set_many(&self, collection: &str, entries: &[(&[u8], &[u8])]) -> Result<Vec<Version>> {
        for (key, value) in entries {
            check_key(key)?;
            self.check_value(value)?;
        }
        if entries.is_empty() {
            return validate_collection_name(collection).map(|()| Vec::new());
        }
        self.room_for_values()?;
        let versions = self.with_collection(collection, |c| {
            c.write_many(entries, &self.inner.clock, self.inner.options.sync)
        })?;
        self.changed(collection);
        Ok(versions)
    }

    /// Like [`set`](Self::set), returning the version written.
    pub fn set_versioned(&self, collection: &str, key: &[u8], value: &[u8]) -> Result<Version> {
        match self.write(
            collection,
            key,
            Some(value),
            Stamp::Local(&self.inner.clock),
        )? {
            Written::Applied { version, .. } => Ok(version),
            Written::Skipped => unreachable!("a local set always applies"),
        }
    }

    /// Deletes `key`, leaving a tombstone. Returns whether a live value was
    /// there; if not, nothing is written.
    pub fn delete(&self, collection: &str, key: &[u8]) -> Result<bool> {
        Ok(matches!(
            self.write(collection, key, None, Stamp::Local(&self.inner.clock))?,
            Written::Applied {
                replaced_live: true,
                ..
            }
        ))
    }

    /// Deletes `key` with a fresh local version, writing a tombstone even if
    /// this store holds no live value for it, so that the delete still
    /// reaches replicas that do. Returns the tombstone's version and whether
    /// a live value was there.
    pub fn delete_versioned(&self, collection: &str, key: &[u8]) -> Result<(Version, bool)> {
        check_key(key)?;
        validate_collection_name(collection)?;
        let version = self.inner.clock.now();
        Ok(
            match self.write(collection, key, None, Stamp::Given(version))? {
                Written::Applied { replaced_live, .. } => (version, replaced_live),
                // A concurrent local write stamped after us: it wins here
                // and everywhere else.
                Written::Skipped => (version, false),
            },
        )
    }

    /// Applies a replicated write: sets `key` to `value` (or deletes it, for
    /// `None`) with the given version, if that version is greater than the
    /// key's current one and than the collection's last drop. At an
    /// **equal** version with different bytes, the record with the greater
    /// `crc32c` wins (an equal CRC is the same record: skipped), so
    /// replicas that hold different values under one version converge.
    /// Returns whether it applied. Idempotent and order-independent:
    /// replicas that apply the same writes in any order end in the same
    /// state.
    pub fn apply(
        &self,
        collection: &str,
        key: &[u8],
        value: Option<&[u8]>,
        version: Version,
    ) -> Result<bool> {
        self.inner.clock.observe(version.ts);
        Ok(matches!(
            self.write(collection, key, value, Stamp::Given(version))?,
            Written::Applied { .. }
        ))
    }

    /// Applies many writes stamped elsewhere to `collection` at once, as
    /// [`apply`](Self::apply) does one by one (last writer wins on the
    /// version, the greater CRC on an equal version), under one lock and one
    /// write to the log. Every entry is
    /// checked first; if one is invalid, nothing is written. Returns how
    /// many took effect.
    pub fn apply_many(&self, collection: &str, entries: &[crate::Replicated<'_>]) -> Result<usize> {
        self.apply_many_newer(collection, entries)
            .map(|(applied, _)| applied)
    }

    /// [`apply_many`](Self::apply_many), also saying which entries lost to
    /// a newer version held here (or to the collection's drop): their
    /// indexes, each with that version. A coordinator told so about a
    /// client's write stamps it again, later (a clock behind must not
    /// make an acknowledged write lose to one that came before it).
    pub fn apply_many_newer(
        &self,
        collection: &str,
        entries: &[crate::Replicated<'_>],
    ) -> Result<(usize, Vec<(usize, Version)>)> {
        let mut newest = 0;
        for (key, value, version) in entries {
            check_key(key)?;
            if let Some(v) = value {
                self.check_value(v)?;
            }
            newest = newest.max(version.ts);
        }
        if entries.is_empty() {
            return validate_collection_name(collection).map(|()| (0, Vec::new()));
        }
        if entries.iter().any(|(_, value, _)| value.is_some()) {
            self.room_for_values()?;
        }
        self.inner.clock.observe(newest);
        let (applied, newer) = self.with_collection(collection, |c| {
            c.apply_many(entries, self.inner.options.sync)
        })?;
        if applied > 0 {
            self.changed(collection);
        }
        Ok((applied, newer))
    }

    /// The value of `key`, or `None`. The value is not copied: it points into
    /// the collection's map. Its record's CRC is checked first: a damaged
    /// record fails with [`Error::Checksum`] and is quarantined, after which
    /// the key reads as missing here until a replica's copy is applied
    /// (the same holds for [`lookup`](Self::lookup) and
    /// [`get_versioned`](Self::get_versioned); listings skip such records).
    #[inline]
    pub fn get(&self, collection: &str, key: &[u8]) -> Result<Option<Bytes>> {
        Ok(self
            .lookup_raw(collection, key)?
            .and_then(|(value, _)| value))
    }

    /// The entry for `key` with its version: `Some` with `value: None` for a
    /// tombstone, `None` if the key was never written (or was dropped or
    /// purged).
    pub fn lookup(&self, collection: &str, key: &[u8]) -> Result<Option<Record>> {
        Ok(self
            .lookup_raw(collection, key)?
            .map(|(value, version)| Record {
                key: key.to_vec(),
                value,
                version,
            }))
    }

    /// Like [`lookup`](Self::lookup) without copying the key: the value
    /// (`None` for a tombstone) and its version.
    #[inline]
    pub fn get_versioned(
        &self,
        collection: &str,
        key: &[u8],
    ) -> Result<Option<(Option<Bytes>, Version)>> {
        self.lookup_raw(collection, key)
    }

    /// The version of `key`'s record in `collection` (a tombstone's too),
    /// without reading the record: `None` if it has none.
    pub fn version_of(&self, collection: &str, key: &[u8]) -> Result<Option<Version>> {
        check_key(key)?;
        match self.inner.collections.load().get(collection) {
            Some(c) => Ok(c.version_of(key)),
            None => validate_collection_name(collection).map(|()| None),
        }
    }

    #[inline]
    fn lookup_raw(&self, collection: &str, key: &[u8]) -> Result<Option<(Option<Bytes>, Version)>> {
        check_key(key)?;
        match self.inner.collections.load().get(collection) {
            // Only valid names are ever in the map.
            Some(c) => c.lookup(key),
            None => validate_collection_name(collection).map(|()| None),
        }
    }

    /// Every record of `collection`, tombstones included, most recently
    /// written first, holding 8 bytes per record (see [`NewestFirst`](crate::NewestFirst)).
    pub fn newest_first(&self, collection: &str) -> Result<crate::NewestFirst> {
        Ok(crate::NewestFirst::new(self.existing(collection)?))
    }

    /// The live keys and values of `collection` in key order.
    pub fn scan(&self, collection: &str) -> Result<Scan> {
        self.scan_after(collection, None)
    }

    /// The live keys and values of `collection` after `after` (exclusive), in
    /// key order: the resumable form for pagination.
    pub fn scan_after(&self, collection: &str, after: Option<&[u8]>) -> Result<Scan> {
        Ok(Scan(Records::new(self.existing(collection)?, after, true)))
    }

    /// Every record of `collection`, tombstones included, with versions, in
    /// key order after `after`.
    pub fn records(&self, collection: &str, after: Option<&[u8]>) -> Result<Records> {
        Ok(Records::new(self.existing(collection)?, after, false))
    }

    /// The records of `collection` in hash order after the key `after`:
    /// cheap to start and to resume anywhere, so it suits paginated
    /// listings, replication and anti-entropy. With `live_only`, tombstones
    /// are skipped. The order is stable (it depends on the keys alone), so a
    /// listing resumed after a key sees every key that existed throughout.
    pub fn list(&self, collection: &str, after: Option<&[u8]>, live_only: bool) -> Result<Listing> {
        Ok(Listing::new(self.existing(collection)?, after, live_only))
    }

    /// Whether `collection` holds at least one live key (an invalid name
    /// holds none).
    pub fn has_keys(&self, collection: &str) -> bool {
        self.inner
            .collections
            .load()
            .get(collection)
            .is_some_and(|c| c.state().live_keys > 0)
    }

    /// Names of the collections holding at least one live key, sorted.
    pub fn collections(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .inner
            .collections
            .load()
            .values()
            .filter(|c| c.state().live_keys > 0)
            .map(|c| c.name.clone())
            .collect();
        names.sort();
        names
    }

    /// Drops every key of `name` with a local version; returns the live keys
    /// it held, sorted. A key written afterwards survives: the drop is a
    /// versioned write like any other.
    pub fn drop_collection(&self, name: &str) -> Result<KeyList> {
        loop {
            let Some(c) = self.existing(name)? else {
                return Ok(KeyList::new());
            };
            let (dropped, _) = match c.drop_keys(
                Stamp::Local(&self.inner.clock),
                self.inner.options.sync,
                false,
            ) {
                Err(Error::Released { .. }) => continue,
                other => self.inner.noted(other)?,
            };
            if dropped.is_some() {
                self.changed(name);
            }
            return Ok(dropped.unwrap_or_default());
        }
    }

    /// Applies a replicated drop: removes every key of `name` older than
    /// `version`, and refuses older writes from then on. Returns the live
    /// keys removed, or `None` if an equal or newer drop was already there.
    pub fn apply_drop(&self, name: &str, version: Version) -> Result<Option<KeyList>> {
        self.apply_drop_newer(name, version, false)
            .map(|(dropped, _)| dropped)
    }

    /// [`apply_drop`](Self::apply_drop), also saying the newest version of
    /// a live key it kept, one written at or after it (or, with
    /// `behind_too`, after a newer drop already there: that takes a walk of
    /// the index). A coordinator told so about a client's drop stamps it
    /// again, later: a drop acknowledged to a client does not leave a key
    /// acknowledged before it was sent (written through a node whose clock
    /// is ahead of this drop's).
    pub fn apply_drop_newer(
        &self,
        name: &str,
        version: Version,
        behind_too: bool,
    ) -> Result<(Option<KeyList>, Option<Version>)> {
        self.inner.clock.observe(version.ts);
        let (dropped, kept) = self.with_collection(name, |c| {
            c.drop_keys(Stamp::Given(version), self.inner.options.sync, behind_too)
        })?;
        if dropped.is_some() {
            self.changed(name);
        }
        Ok((dropped, kept))
    }

    /// The anti-entropy digest of `collection`: per bucket of key hashes
    /// ([`crate::digest_bucket`]), the XOR of a hash of every entry's key,
    /// version, kind and record CRC (which covers the value), tombstones
    /// included; kept current by every write. Two
    /// stores holding the same entries have equal digests whatever order
    /// the writes came in. A collection that does not exist has an empty
    /// digest.
    pub fn digest(&self, collection: &str) -> Result<Digest> {
        Ok(match self.existing(collection)? {
            Some(c) => Digest {
                buckets: c.current.load().index.digest(),
                dropped_at: c.state().dropped_at,
            },
            None => Digest::empty(),
        })
    }

    /// The version of `collection`'s newest drop, if one survives in its
    /// log: every key stamped before it is gone, whether this store ever
    /// held it or not.
    pub fn dropped_at(&self, collection: &str) -> Result<Option<Version>> {
        Ok(self
            .existing(collection)?
            .and_then(|c| c.state().dropped_at))
    }

    /// Every record of `collection` in digest bucket `bucket` (tombstones
    /// included, with versions), in hash order.
    pub fn bucket(&self, collection: &str, bucket: usize) -> Result<Listing> {
        if bucket >= DIGEST_BUCKETS {
            return Err(Error::InvalidBucket(bucket));
        }
        Ok(Listing::bucket(self.existing(collection)?, bucket))
    }

    /// Collections counted against `Options::max_collections`: every one
    /// held, dropped ones too (a drop keeps its file), but the node's own
    /// (names starting with `_`).
    pub fn counted_collections(&self) -> usize {
        counted(&self.inner.collections.load())
    }

    /// Names of every collection this store has a file for, including those
    /// holding only tombstones or a drop, sorted.
    pub fn all_collections(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inner.collections.load().keys().cloned().collect();
        names.sort();
        names
    }

    /// Compacts, now, every collection in which a read found a damaged
    /// record that the background thread has not compacted out yet (a
    /// process about to exit calls it: the store is also closed this way
    /// when its last handle drops, which may not happen before an exit).
    pub fn compact_damaged(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        // A background compaction that took the request first would make
        // this one find none, and might not finish before the process
        // exits: it is told to give up (it asks again for what it was
        // asked), and this waits until it has.
        let shutdown = &self.inner.shutdown;
        shutdown.paused.store(true, SeqCst);
        while shutdown.busy.load(SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.inner.compact_damaged();
        shutdown.paused.store(false, SeqCst);
    }

    /// Fsyncs every collection now.
    pub fn sync(&self) -> Result<()> {
        for c in self.inner.collections.load().values() {
            c.sync()?;
        }
        Ok(())
    }

    /// Keeps every tombstone (and drop record) stamped at or after `ms`
    /// (physical ms), even past its grace period, until called again with
    /// a later time: a cluster holds its deletes until every member is
    /// known to have them, so that a member that never heard of one
    /// cannot bring the deleted value back. `u64::MAX` (the default): the
    /// grace period alone decides.
    pub fn hold_tombstones_from(&self, ms: u64) {
        self.inner
            .hold_from_ms
            .store(ms, std::sync::atomic::Ordering::Release);
    }

    /// Compacts `collection` now, whatever its garbage ratio.
    pub fn compact(&self, collection: &str) -> Result<CompactionReport> {
        match self.existing(collection)? {
            Some(c) => compact::compact(
                &c,
                self.dir(),
                &self.inner.options,
                self.inner.hold_from(),
                &|| false,
            )
            .map(|r| {
                let r = r.expect("a compaction told never to stop finishes");
                c.locked_replay_max
                    .fetch_max(r.locked_records, std::sync::atomic::Ordering::Relaxed);
                r
            }),
            None => Ok(CompactionReport::default()),
        }
    }

    /// Statistics of the store and each collection.
    pub fn stats(&self) -> Stats {
        let mut collections: Vec<CollectionStats> = self
            .inner
            .collections
            .load()
            .values()
            .map(|c| {
                let generation = c.current.load();
                let state = c.state();
                CollectionStats {
                    name: c.name.clone(),
                    keys: state.live_keys,
                    tombstones: state.tombstones,
                    bytes: generation.log.tail(),
                    garbage_bytes: state.garbage,
                    poisoned: generation.log.poisoned().is_some(),
                    index_shards: generation.index.shard_count(),
                    rebuild_locked_records_max: c
                        .locked_replay_max
                        .load(std::sync::atomic::Ordering::Relaxed),
                    damaged_records: c.quarantined.load(std::sync::atomic::Ordering::Relaxed),
                }
            })
            .collect();
        collections.sort_by(|a, b| a.name.cmp(&b.name));
        Stats {
            mode: if self.inner.dir.is_some() {
                "persisted"
            } else {
                "memory"
            },
            data_dir: self.inner.dir.clone(),
            collections,
        }
    }
}

/// The last epoch recorded in `dir`: 0 if there is no `EPOCH` file (a new
/// directory), `None` if the file is damaged. A damaged file does not stop
/// the opening: the epoch is then taken from the logs' seqs, plus
/// [`DAMAGED_EPOCH_MARGIN`].
fn read_epoch(dir: &Path) -> Result<Option<u64>> {
    let path = dir.join(EPOCH_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let epoch = text.trim().parse().ok();
            if epoch.is_none() {
                let shown: String = text.trim().chars().take(40).collect();
                tracing::warn!(
                    path = %path.display(),
                    "EPOCH is damaged (not an epoch number: {shown:?}); taking the epoch from the logs, {DAMAGED_EPOCH_MARGIN} past their last"
                );
            }
            Ok(epoch)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Some(0)),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

/// How far past the logs' last epoch an opening starts when `EPOCH` is
/// damaged: openings that wrote nothing left no seq in the logs, and seqs
/// of theirs handed to watchers must not be handed out again. 65,536
/// such openings in a row, of the 16,777,215 a directory has.
const DAMAGED_EPOCH_MARGIN: u64 = 1 << 16;

/// How many of `collections` count against `Options::max_collections`.
fn counted(collections: &Collections) -> usize {
    collections.keys().filter(|n| !n.starts_with('_')).count()
}

/// The greatest epoch: the top bits of a seq above [`EPOCH_SHIFT`].
const MAX_EPOCH: u64 = (1 << (64 - EPOCH_SHIFT)) - 1;

#[cfg(test)]
thread_local! {
    /// Makes the next new `EPOCH` file on this thread fail with ENOSPC.
    static FAIL_NEW_EPOCH_FILE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Records `epoch` in `dir` durably: a new file renamed over the old, or,
/// when the disk has no room for a new file, the old one overwritten in
/// place (so that a node on a full disk still starts and serves reads).
fn write_epoch(dir: &Path, epoch: u64) -> Result<()> {
    use std::io::Write;
    let path = dir.join(EPOCH_FILE);
    let tmp = dir.join(format!("{EPOCH_FILE}.tmp"));
    let write = || -> std::io::Result<()> {
        #[cfg(test)]
        if FAIL_NEW_EPOCH_FILE.with(|f| f.replace(false)) {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let mut f = File::create(&tmp)?;
        writeln!(f, "{epoch}")?;
        f.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        crate::log::sync_dir(dir)
    };
    match write() {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            ) && path.exists() =>
        {
            let _ = std::fs::remove_file(&tmp);
            tracing::warn!(path = %path.display(), "no room for a new EPOCH file (the disk is full): overwriting the old one in place");
            overwrite_epoch(&path, epoch).map_err(|e| Error::io("write", &path, e))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(Error::io("write", &path, e))
        }
    }
}

/// Writes `epoch` over the `EPOCH` file in place: one write of at most 21
/// bytes at offset 0, in the block the file already has (an epoch has no
/// fewer digits than the one before, so the text is never shorter), which
/// a crash leaves whole or not at all, then an fsync.
fn overwrite_epoch(path: &Path, epoch: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let text = format!("{epoch}\n");
    f.write_all_at(text.as_bytes(), 0)?;
    f.set_len(text.len() as u64)?;
    f.sync_all()
}

impl Drop for Inner {
    fn drop(&mut self) {
        *self.shutdown.stop.lock().unwrap() = true;
        self.shutdown.wake.notify_all();
        for handle in self.threads.drain(..) {
            if handle.join().is_err() {
                tracing::error!("a storage thread panicked");
            }
        }
        if self.dir.is_some() {
            self.compact_damaged();
            for c in self.collections.load().values() {
                if let Err(e) = c.sync().and_then(|()| c.sync_watermark()) {
                    tracing::error!(collection = %c.name, "final sync failed: {e}");
                }
            }
        }
    }
}

impl Core {
    /// See [`Store::hold_tombstones_from`].
    fn hold_from(&self) -> u64 {
        self.hold_from_ms.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Notes a write that failed for want of space: the store is full
    /// from now on (see `disk.rs`), and every collection with garbage is
    /// compacted at once.
    fn noted<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(Error::Io { source, .. }) = &r
            && crate::log::is_full(source)
            && let Some(disk) = &self.disk
            && disk.out_of_space()
        {
            self.compact_for_room();
        }
        r
    }

    /// Asks for a compaction of every collection holding garbage, now,
    /// whatever failed before; and gives back the room every log holds
    /// reserved past its tail (up to 32 MiB each) but a little, which those
    /// compactions need more than appends do now.
    fn compact_for_room(&self) {
        self.lean_logs(true);
        for c in self.collections.load().values() {
            if c.state().garbage > 0 {
                *c.compaction_backoff.lock().unwrap() = None;
                c.compact_requested
                    .store(true, std::sync::atomic::Ordering::Release);
            }
        }
    }
    /// Sets every log lean while the disk is full (see
    /// [`LogFile::set_lean`](crate::log::LogFile::set_lean)): what each
    /// holds reserved ahead past a little is given back, and appends
    /// reserve only that little ahead, so that the room the reserve and
    /// the deletes give back goes to compactions; called every tick (a
    /// compaction's new log is set at the next).
    fn lean_logs(&self, full: bool) {
        let mut given = 0;
        for c in self.collections.load().values() {
            match c.current.load().log.set_lean(full) {
                Ok(bytes) => given += bytes,
                Err(e) => {
                    tracing::warn!(collection = %c.name, "cannot give back reserved space: {e}")
                }
            }
        }
        if given > 0 {
            tracing::warn!(
                bytes = given,
                "the disk is full: gave back the space the logs held reserved ahead of their tails"
            );
        }
    }

    /// Compacts every collection in which a damaged record was quarantined
    /// and not yet compacted out, now, on this thread: left in the file, it
    /// would stop the next open (damage below the durable watermark).
    fn compact_damaged(&self) {
        if self.dir.is_none() {
            return;
        }
        for c in self.collections.load().values() {
            if !c.take_compaction_request() {
                continue;
            }
            match compact::compact(
                c,
                self.dir.as_deref(),
                &self.options,
                self.hold_from(),
                &|| false,
            ) {
                Ok(None) => unreachable!("a compaction told never to stop finishes"),
                Ok(Some(r)) => tracing::info!(
                    collection = %c.name,
                    damaged = r.damaged,
                    "compacted the damaged records out before closing"
                ),
                Err(e) => tracing::error!(
                    collection = %c.name,
                    "cannot compact the damaged records out before closing: {e}"
                ),
            }
        }
    }

    /// The collection `name`, if it exists.
    pub(crate) fn existing_collection(&self, name: &str) -> Option<Arc<Collection>> {
        self.collections.load().get(name).cloned()
    }
}

impl Shutdown {
    /// Waits up to `timeout`; whether the store is shutting down.
    fn wait(&self, timeout: Duration) -> bool {
        let stop = self.stop.lock().unwrap();
        let (stop, _) = self
            .wake
            .wait_timeout_while(stop, timeout, |stop| !*stop)
            .unwrap();
        *stop
    }
}

/// The sync thread: in `Interval` mode, fsyncs dirty collections every
/// interval; in every mode, makes durable the watermarks written since its
/// last round (every interval, or every second outside `Interval` mode).
///
/// It has a thread of its own so that a long compaction or reshard never
/// delays it. It takes no collection's writer lock: a sync holds only the
/// log's sync state (never held across an `fdatasync`) and the watermark's
/// lock (held by a compaction only to rewrite the watermark), so a
/// compaction's final step, which holds the writer lock, does not block it.
fn sync_loop(core: &Core, shutdown: &Shutdown) {
    let every = match core.options.sync {
        SyncMode::Interval(every) => every.max(Duration::from_millis(1)),
        SyncMode::Always | SyncMode::Never => Duration::from_secs(1),
    };
    while !shutdown.wait(every) {
        let collections = core.collections.load();
        if let SyncMode::Interval(_) = core.options.sync {
            for c in collections.values() {
                if c.current.load().log.is_dirty()
                    && let Err(e) = c.sync()
                {
                    tracing::error!(collection = %c.name, "interval sync failed: {e}");
                }
            }
        }
        for c in collections.values() {
            if let Err(e) = c.sync_watermark() {
                tracing::warn!(collection = %c.name, "cannot sync the durable watermark: {e}");
            }
        }
    }
}

/// The background thread: gives collections that outgrew their index more
/// shards, and compacts collections whose garbage or expired tombstones
/// call for it (with `background_compaction`) or in which a damaged record
/// was quarantined (always: the damaged bytes must leave the file).
fn background(inner: &Core, shutdown: &Shutdown) {
    use std::sync::atomic::Ordering::SeqCst;
    const TICK: Duration = Duration::from_millis(100);
    const COMPACTION_CHECK: Duration = Duration::from_secs(1);
    /// Garbage worth a compaction while the disk is full.
    const FULL_DISK_GARBAGE: u64 = 64 << 10;
    /// The wait before a compaction that failed is tried again, doubled
    /// at each failure up to the longest.
    const COMPACTION_RETRY_FIRST: Duration = Duration::from_secs(5);
    const COMPACTION_RETRY_MAX: Duration = Duration::from_secs(300);
    let mut last_check = Instant::now();
    let closing = || *shutdown.stop.lock().unwrap();
    // Rebuilds give up when the store closes or `compact_damaged` runs.
    let stopping = || closing() || shutdown.paused.load(SeqCst);
    // Marks a rebuild as running, unless `compact_damaged` has the floor.
    let start = || {
        shutdown.busy.store(true, SeqCst);
        if shutdown.paused.load(SeqCst) {
            shutdown.busy.store(false, SeqCst);
            return false;
        }
        true
    };
    let done = || shutdown.busy.store(false, SeqCst);
    while !shutdown.wait(TICK) {
        if let Some(disk) = &inner.disk
            && disk.check()
            && disk.is_full()
        {
            inner.compact_for_room();
        }
        let full = inner.disk.as_ref().is_some_and(crate::disk::Disk::is_full);
        if inner.disk.is_some() {
            inner.lean_logs(full);
        }
        for c in inner.collections.load().values() {
            if closing() {
                return;
            }
            let shards = c.current.load().index.shard_count();
            if let Some(more) = compact::reshard_due(&c.state(), shards, &inner.options) {
                if !start() {
                    break;
                }
                let started = Instant::now();
                let locked = compact::reshard(c, more, inner.options.shard_array_max, &stopping);
                done();
                c.locked_replay_max
                    .fetch_max(locked, std::sync::atomic::Ordering::Relaxed);
                if c.current.load().index.shard_count() >= more {
                    tracing::debug!(collection = %c.name, shards = more, locked, ms = started.elapsed().as_millis() as u64, "resharded the index");
                }
            }
        }
        let check = inner.options.background_compaction && last_check.elapsed() >= COMPACTION_CHECK;
        if check {
            last_check = Instant::now();
        }
        for c in inner.collections.load().values() {
            if closing() {
                return;
            }
            if !start() {
                break;
            }
            let requested = c.take_compaction_request();
            let backing_off = c
                .compaction_backoff
                .lock()
                .unwrap()
                .is_some_and(|(retry_at, _)| Instant::now() < retry_at);
            // On a full disk any garbage is worth giving back.
            let due = check
                && !backing_off
                && (compact::is_due(
                    &c.state(),
                    c.current.load().log.tail(),
                    &inner.options,
                    inner.hold_from(),
                ) || full && c.state().garbage >= FULL_DISK_GARBAGE);
            if requested || due {
                match compact::compact(
                    c,
                    inner.dir.as_deref(),
                    &inner.options,
                    inner.hold_from(),
                    &stopping,
                ) {
                    Ok(None) => {
                        // Told to stop: what was asked for is asked again,
                        // for `compact_damaged` or the store's close.
                        if requested {
                            c.compact_requested
                                .store(true, std::sync::atomic::Ordering::Release);
                        }
                        tracing::info!(collection = %c.name, "gave up a compaction: the store is closing or compacting damaged records out");
                    }
                    Ok(Some(r)) => {
                        *c.compaction_backoff.lock().unwrap() = None;
                        c.locked_replay_max
                            .fetch_max(r.locked_records, std::sync::atomic::Ordering::Relaxed);
                        tracing::info!(
                        collection = %c.name,
                        before = r.bytes_before,
                        after = r.bytes_after,
                        purged = r.purged_tombstones,
                        damaged = r.damaged,
                        requested,
                        locked = r.locked_records,
                        "compacted"
                        );
                    }
                    Err(e) => {
                        // Not again at every check: a full disk would log
                        // (and write and delete a file) every second.
                        let mut backoff = c.compaction_backoff.lock().unwrap();
                        // On a full disk, sooner: deletes free space as
                        // they come.
                        let wait = backoff
                            .map_or(COMPACTION_RETRY_FIRST, |(_, wait)| wait)
                            .min(if full {
                                COMPACTION_RETRY_FIRST
                            } else {
                                COMPACTION_RETRY_MAX
                            });
                        *backoff =
                            Some((Instant::now() + wait, (wait * 2).min(COMPACTION_RETRY_MAX)));
                        tracing::error!(collection = %c.name, retry_in_s = wait.as_secs(), "compaction failed: {e}");
                        // The room the reserve gave back is gone (taken by
                        // another process, or by values already on their
                        // way): its last stand lets the next attempt run,
                        // at the next check.
                        if matches!(&e, Error::Io { source, .. } if crate::log::is_full(source))
                            && inner
                                .disk
                                .as_ref()
                                .is_some_and(crate::disk::Disk::give_up_last_stand)
                        {
                            *backoff = None;
                        }
                    }
                }
            }
            done();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn assert_send_sync<T: Send + Sync>() {}
    const _: () = assert_send_sync::<Store>();

    /// A large write leaves no large buffer behind in its collection: one
    /// 16 MiB value into each of many collections pinned 16 MiB in each.
    #[test]
    fn a_large_write_leaves_no_large_buffer_behind() {
        let store = Store::memory(Options::default());
        let kept = |name: &str| {
            let c = store.existing(name).unwrap().unwrap();
            c.write_buf_capacity()
        };
        store.set("c", b"small", b"v").unwrap();
        let small = kept("c");
        assert!(small > 0 && small <= crate::collection::KEEP_WRITE_BUF);
        store.set("c", b"big", &vec![1u8; 4 << 20]).unwrap();
        assert!(kept("c") <= crate::collection::KEEP_WRITE_BUF);
        // A write that is skipped after its record was built, too (the
        // same record again: equal version and CRC).
        let v = store.get_versioned("c", b"big").unwrap().unwrap().1;
        let applied = store
            .apply("c", b"big", Some(&vec![1u8; 4 << 20]), v)
            .unwrap();
        assert!(!applied);
        assert!(kept("c") <= crate::collection::KEEP_WRITE_BUF);
        assert_eq!(store.get("c", b"big").unwrap().unwrap().len(), 4 << 20);
        // Small writes keep theirs.
        store.set("c", b"small2", b"v").unwrap();
        assert!(kept("c") >= small && kept("c") <= crate::collection::KEEP_WRITE_BUF);
    }

    /// A compaction stopped in its final step, holding its collection's
    /// writer lock, delays neither the interval sync of another collection
    /// nor a sync of its own.
    #[test]
    fn the_interval_sync_goes_on_while_a_compaction_is_stuck() {
        use std::sync::atomic::Ordering;
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            sync: SyncMode::Interval(Duration::from_millis(5)),
            // Only the requested compaction below runs.
            compaction_min_bytes: u64::MAX,
            tombstone_grace: Duration::from_secs(3600),
            ..Options::default()
        };
        let store = Store::open(dir.path(), options).unwrap();
        store.set("busy", b"k", b"v").unwrap();
        let busy = store.existing("busy").unwrap().unwrap();
        let (paused_tx, paused) = channel();
        let (resume, resume_rx) = channel();
        *busy.pause_compaction.lock().unwrap() = Some((paused_tx, resume_rx));
        busy.compact_requested.store(true, Ordering::Release);
        // The background thread is now inside the compaction's last step.
        store.set("other", b"k", b"v").unwrap();
        paused.recv().unwrap();
        let log = store
            .existing("other")
            .unwrap()
            .unwrap()
            .current
            .load_full()
            .log
            .clone();
        let before = log.fdatasyncs();
        store.set("other", b"k2", b"v").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while log.fdatasyncs() == before {
            assert!(
                Instant::now() < deadline,
                "the interval sync waited behind the compaction"
            );
            std::thread::yield_now();
        }
        // Syncing the compacting collection takes no writer lock either.
        store.sync().unwrap();
        resume.send(()).unwrap();
        // Waits for the background compaction to finish, then runs its own.
        store.compact("busy").unwrap();
        assert_eq!(store.get("busy", b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    /// A reshard whose catch-up outside the writer lock is slower than the
    /// writers (the copy and each round sleep 100 ms) still finishes while they
    /// write: once a round ends further behind than the one before, it
    /// gains on them in bounded steps under the lock, and no step replays
    /// more than the bound (counted in records, so it cannot flake). Before
    /// that rule, it went on falling behind for as long as they wrote.
    #[test]
    fn a_reshard_outrun_by_its_writers_finishes_in_bounded_steps() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let options = Options {
            min_index_shards: 1,
            // No reshard but the one below.
            keys_per_shard: 1 << 30,
            background_compaction: false,
            sync: SyncMode::Never,
            ..Options::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), options).unwrap();
        let value = [7u8; 100];
        store.set("c", b"first", &value).unwrap();
        let coll = store.existing("c").unwrap().unwrap();
        coll.slow_catch_up_ms.store(100, Ordering::Relaxed);
        let done = AtomicBool::new(false);
        let after = AtomicU64::new(0);
        let locked = std::thread::scope(|s| {
            let writer = s.spawn(|| {
                let started = std::time::Instant::now();
                let mut i = 0u64;
                while !done.load(Ordering::Acquire) {
                    assert!(
                        started.elapsed() < Duration::from_secs(60),
                        "the reshard never finished while the writer wrote"
                    );
                    store
                        .set("c", format!("k{i:012}").as_bytes(), &value)
                        .unwrap();
                    i += 1;
                }
                // Writes go on after the swap, into the new index.
                for _ in 0..100 {
                    store
                        .set("c", format!("k{i:012}").as_bytes(), &value)
                        .unwrap();
                    i += 1;
                    after.fetch_add(1, Ordering::Relaxed);
                }
                i
            });
            let locked = compact::reshard(&coll, 1024, 4096, &|| false);
            done.store(true, Ordering::Release);
            let written = writer.join().unwrap();
            assert_eq!(store.stats().collections[0].keys, written + 1);
            locked
        });
        assert_eq!(coll.current.load().index.shard_count(), 1024, "resharded");
        let record = crate::record::RECORD_HEADER_LEN as u64 + 13 + 100;
        assert!(
            locked <= compact::LOCKED_CATCH_UP_BYTES / record + 1,
            "{locked} records replayed in one hold of the lock"
        );
        assert_eq!(after.load(Ordering::Relaxed), 100);
        for i in [0u64, 1, 500] {
            assert!(
                store
                    .get("c", format!("k{i:012}").as_bytes())
                    .unwrap()
                    .is_some()
            );
        }
    }

    /// A drop written while a reshard copies the index is caught up like
    /// any other write: the keys it dropped stay dropped after the swap,
    /// and the digest is the one recovery computes. (With the counters
    /// taken after the copy, the catch-up saw the drop as already applied
    /// and skipped it: the dropped keys came back.)
    #[test]
    fn a_drop_during_a_reshards_copy_stays_dropped() {
        use std::sync::atomic::Ordering;
        let options = Options {
            min_index_shards: 1,
            // No reshard but the one below.
            keys_per_shard: 1 << 30,
            background_compaction: false,
            ..Options::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), options.clone()).unwrap();
        for i in 0..200u32 {
            store.set("c", format!("k{i}").as_bytes(), b"v").unwrap();
        }
        let coll = store.existing("c").unwrap().unwrap();
        // The reshard sleeps 300 ms once its copy is taken.
        coll.slow_catch_up_ms.store(300, Ordering::Relaxed);
        std::thread::scope(|s| {
            let resharding = s.spawn(|| compact::reshard(&coll, 64, 256, &|| false));
            std::thread::sleep(Duration::from_millis(100));
            assert_eq!(store.drop_collection("c").unwrap().len(), 200);
            store.set("c", b"after", b"v").unwrap();
            resharding.join().unwrap();
        });
        assert_eq!(coll.current.load().index.shard_count(), 64, "resharded");
        for i in 0..200u32 {
            assert_eq!(store.get("c", format!("k{i}").as_bytes()).unwrap(), None);
        }
        assert_eq!(
            store.get("c", b"after").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert_eq!(store.scan("c").unwrap().count(), 1);
        let digest = store.digest("c").unwrap();
        drop(store);
        let store = Store::open(dir.path(), options).unwrap();
        assert_eq!(store.digest("c").unwrap(), digest);
    }

    /// A record damaged and quarantined while a reshard copies the index
    /// does not come back with the copy: after the swap the key reads as
    /// missing (its damage was reported once), and a rewrite of it is
    /// served.
    #[test]
    fn a_key_quarantined_during_a_reshard_stays_out_of_the_new_index() {
        use std::os::unix::fs::FileExt;
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            min_index_shards: 1,
            // No reshard but the one below.
            keys_per_shard: 1 << 20,
            background_compaction: false,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options).unwrap();
        for i in 0..200u32 {
            store
                .set("c", format!("k{i}").as_bytes(), b"some value")
                .unwrap();
        }
        let coll = store.existing("c").unwrap().unwrap();
        let (paused_tx, paused) = channel();
        let (resume, resume_rx) = channel();
        *coll.pause_reshard.lock().unwrap() = Some((paused_tx, resume_rx));
        std::thread::scope(|s| {
            let resharding = s.spawn(|| compact::reshard(&coll, 64, 256, &|| false));
            paused.recv().unwrap();
            // The copy holds every key; now two values go bad on disk.
            let log = coll.current.load().log.clone();
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(log.path().unwrap())
                .unwrap();
            for key in [&b"k7"[..], b"k8"] {
                let slot = coll.current.load().index.get(key).unwrap();
                let value_at =
                    slot.offset() + (crate::record::RECORD_HEADER_LEN + key.len()) as u64;
                file.write_all_at(b"XYZ", value_at).unwrap();
            }
            for key in [&b"k7"[..], b"k8"] {
                assert!(matches!(store.get("c", key), Err(Error::Checksum { .. })));
            }
            // k8 is written again before the swap: the copy catches it up.
            store.set("c", b"k8", b"repaired").unwrap();
            resume.send(()).unwrap();
            resharding.join().unwrap();
        });
        assert_eq!(coll.current.load().index.shard_count(), 64, "resharded");
        assert_eq!(store.get("c", b"k7").unwrap(), None);
        assert_eq!(
            store.get("c", b"k8").unwrap().as_deref(),
            Some(&b"repaired"[..])
        );
        assert_eq!(
            store.get("c", b"k9").unwrap().as_deref(),
            Some(&b"some value"[..])
        );
        assert_eq!(store.scan("c").unwrap().count(), 199);
    }

    /// A background compaction that fails is tried again later, after a
    /// wait that doubles with each failure, not at every check; once one
    /// succeeds the wait is forgotten.
    /// A write that finds the disk full makes the store full: the reserve
    /// is given up, values are refused (and nothing written), deletes are
    /// taken, the collection is compacted at once, and values are taken
    /// again once the disk has room.
    #[test]
    fn a_full_disk_gives_up_its_reserve_takes_deletes_and_compacts_at_once() {
        use std::sync::atomic::Ordering::Release;
        let dir = tempfile::tempdir().unwrap();
        let reserve = dir.path().join(crate::disk::RESERVE_FILE);
        let options = Options {
            disk_reserve: Some(1 << 20),
            ..Options::default()
        };
        let store = Store::open(dir.path(), options).unwrap();
        let disk = store.inner.disk.as_ref().unwrap();
        // Between one and three reserves free: no check changes anything.
        disk.fake_free.store(2 << 20, Release);
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 1 << 20);
        let value = vec![5u8; 10_000];
        for i in 0..400 {
            store.set("c", format!("k{i}").as_bytes(), &value).unwrap();
        }
        let coll = store.existing("c").unwrap().unwrap();
        let log = coll.current.load().log.clone();
        let before = log.tail();
        let file = Collection::log_path(dir.path(), "c");
        let lean = (before + (64 << 10)).div_ceil(4096) * 4096;
        assert!(
            std::fs::metadata(&file).unwrap().len() > lean,
            "reserved ahead"
        );
        log.disk_end.store(before + 4096, Release);
        let err = store.set("c", b"big", &vec![1u8; 8 << 20]).unwrap_err();
        assert!(
            matches!(&err, Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{err}"
        );
        assert_eq!(store.disk_full().map(|(full, _)| full), Some(true));
        // The room reserved ahead of the tail is given back but 64 KiB, for
        // the compactions to come.
        assert!(std::fs::metadata(&file).unwrap().len() <= lean);
        assert_eq!(
            std::fs::metadata(&reserve).unwrap().len(),
            256 << 10,
            "the reserve is given up, but its last stand"
        );
        let err = store.set("c", b"k1", b"small").unwrap_err();
        assert!(matches!(err, Error::DiskFull { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("deletes and drops are still taken")
        );
        assert!(matches!(
            store.set_many("c", &[(b"k2", b"small")]),
            Err(Error::DiskFull { .. })
        ));
        let replicated = [(&b"k3"[..], Some(&b"v"[..]), Version { ts: 1, node: 9 })];
        assert!(matches!(
            store.apply_many("c", &replicated),
            Err(Error::DiskFull { .. })
        ));
        assert_eq!(store.get("c", b"k1").unwrap().as_deref(), Some(&value[..]));
        // Deletes are taken, within the room the reserve gave back.
        log.disk_end.store(0, Release);
        for i in 0..400 {
            assert!(store.delete("c", format!("k{i}").as_bytes()).unwrap());
        }
        // Compacted without waiting for the garbage check or a backoff.
        let deadline = Instant::now() + Duration::from_secs(20);
        while coll.current.load().log.tail() >= before {
            assert!(Instant::now() < deadline, "not compacted");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(coll.compaction_backoff.lock().unwrap().is_none());
        // Room again: the reserve is set aside and values are taken.
        disk.fake_free.store(100 << 20, Release);
        let deadline = Instant::now() + Duration::from_secs(10);
        while store.set("c", b"after", b"v").is_err() {
            assert!(Instant::now() < deadline, "still refused");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(std::fs::metadata(&reserve).unwrap().len(), 1 << 20);
        assert!(!disk.is_full());
    }

    #[test]
    fn a_failed_background_compaction_is_retried_after_a_wait() {
        use std::sync::atomic::Ordering;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        let c = store.existing_or_create("c").unwrap();
        // Its first write-back fails: about 9 MiB live, two thirds garbage.
        c.fail_compaction_write_back.store(true, Ordering::Release);
        let value = vec![b'v'; 6 << 10];
        for _ in 0..3 {
            for i in 0..1500u32 {
                store.set("c", format!("k{i}").as_bytes(), &value).unwrap();
            }
        }
        let before = c.current.load().log.tail();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some((_, next)) = *c.compaction_backoff.lock().unwrap() {
                assert_eq!(next, Duration::from_secs(10));
                break;
            }
            assert!(Instant::now() < deadline, "the compaction never failed");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!c.fail_compaction_write_back.load(Ordering::Acquire));
        // Not at the next checks (one a second)...
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(c.current.load().log.tail(), before);
        // ...but after the wait, and then it succeeds.
        while c.current.load().log.tail() >= before
            || c.compaction_backoff.lock().unwrap().is_some()
        {
            assert!(Instant::now() < deadline, "never compacted");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            store.get("c", b"k1499").unwrap().as_deref(),
            Some(&value[..])
        );
    }

    /// Past `max_collections`, a write to a new collection is refused and
    /// nothing is created; the collections there go on, the node's own
    /// (`_`) are not counted, and the store opens again with all of them.
    #[test]
    fn a_store_creates_no_more_collections_than_it_may_keep_open() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            max_collections: 2,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options.clone()).unwrap();
        store.set("a", b"k", b"v").unwrap();
        store.set("b", b"k", b"v").unwrap();
        store.set("_members", b"k", b"v").unwrap();
        let err = store.set("c", b"k", b"v").unwrap_err();
        assert!(
            matches!(err, Error::TooManyCollections { count: 2, max: 2 }),
            "{err}"
        );
        assert!(!Collection::log_path(dir.path(), "c").exists());
        store.set("a", b"k2", b"v2").unwrap();
        drop(store);
        let store = Store::open(dir.path(), options).unwrap();
        assert_eq!(store.get("b", b"k").unwrap().as_deref(), Some(&b"v"[..]));
        assert_eq!(
            store.get("_members", b"k").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        assert!(store.set("d", b"k", b"v").is_err());
    }

    /// A node on a full disk still opens: with no room for a new `EPOCH`
    /// file it overwrites the old one in place, and the epoch still grows.
    /// The last epoch a seq can carry is refused, never wrapped.
    #[test]
    fn a_collection_whose_creation_fails_leaves_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        crate::log::FAIL_HEADER_WRITE.with(|f| f.set(true));
        assert!(store.set("full", b"k", b"v").is_err());
        assert!(
            !crate::log::FAIL_HEADER_WRITE.with(|f| f.get()),
            "the hook was not met"
        );
        assert!(!dir.path().join("full.dhrt").exists());
        assert!(!dir.path().join("full.dhrt.durable").exists());
        assert!(store.all_collections().is_empty());
        // The disk has room again: once the store has looked (it took the
        // failure for a full disk), created as if nothing happened.
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = store.set("full", b"k", b"v") {
            assert!(matches!(e, Error::DiskFull { .. }), "{e}");
            assert!(Instant::now() < deadline, "{e}");
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(store);
        let store = Store::open(dir.path(), Options::default()).unwrap();
        assert_eq!(store.get("full", b"k").unwrap().as_deref(), Some(&b"v"[..]));
    }

    #[test]
    fn the_epoch_is_written_in_place_on_a_full_disk_and_never_wraps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.set("c", b"k", b"v").unwrap();
        drop(store);
        let epoch = || read_epoch(dir.path()).unwrap().unwrap();
        let before = epoch();
        FAIL_NEW_EPOCH_FILE.with(|f| f.set(true));
        let store = Store::open(dir.path(), Options::default()).unwrap();
        assert!(
            !FAIL_NEW_EPOCH_FILE.with(|f| f.get()),
            "the hook was not met"
        );
        assert_eq!(epoch(), before + 1);
        assert!(!dir.path().join("EPOCH.tmp").exists());
        assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"v"[..]));
        drop(store);
        // From 9 to 10: one more digit, still in place.
        std::fs::write(dir.path().join(EPOCH_FILE), "9\n").unwrap();
        FAIL_NEW_EPOCH_FILE.with(|f| f.set(true));
        drop(Store::open(dir.path(), Options::default()).unwrap());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(EPOCH_FILE)).unwrap(),
            "10\n"
        );

        std::fs::write(dir.path().join(EPOCH_FILE), format!("{}\n", MAX_EPOCH - 1)).unwrap();
        drop(Store::open(dir.path(), Options::default()).unwrap());
        assert_eq!(epoch(), MAX_EPOCH);
        let err = Store::open(dir.path(), Options::default()).unwrap_err();
        assert!(
            err.to_string().contains("the last a seq can carry"),
            "{err}"
        );
        assert_eq!(epoch(), MAX_EPOCH);
        std::fs::write(dir.path().join(EPOCH_FILE), format!("{}\n", u64::MAX)).unwrap();
        assert!(Store::open(dir.path(), Options::default()).is_err());
    }

    /// A damaged `EPOCH` (garbage, or empty) does not stop the opening:
    /// the epoch is taken from the logs' seqs, well past them, and the
    /// data is all there.
    #[test]
    fn a_damaged_epoch_file_is_replaced_from_the_logs() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), Options::default()).unwrap();
        store.set("c", b"k", b"v").unwrap();
        drop(store);
        let epoch = || read_epoch(dir.path()).unwrap();
        let written = epoch().unwrap();
        for damage in ["garbage\n", "", "\u{0}\u{0}\u{0}"] {
            std::fs::write(dir.path().join(EPOCH_FILE), damage).unwrap();
            assert_eq!(epoch(), None, "{damage:?}");
            let store = Store::open(dir.path(), Options::default()).unwrap();
            // The log's last seq is of the first opening's epoch.
            assert_eq!(epoch(), Some(written + DAMAGED_EPOCH_MARGIN + 1));
            assert_eq!(store.get("c", b"k").unwrap().as_deref(), Some(&b"v"[..]));
            drop(store);
        }
    }

    #[test]
    fn a_failed_fsync_poisons_the_collection_until_restart() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            sync: SyncMode::Always,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options.clone()).unwrap();
        store.set("sick", b"k", b"before").unwrap();
        store.set("well", b"k", b"v").unwrap();
        let sick = store.existing("sick").unwrap().unwrap();
        sick.current
            .load()
            .log
            .fail_next_sync
            .store(true, std::sync::atomic::Ordering::Release);
        // The write that meets the failed fsync is not acknowledged, and
        // says it is applied all the same (its record is in the log and
        // the index, durable or not)...
        let err = store.set("sick", b"k2", b"v").unwrap_err();
        assert!(matches!(err, Error::NotDurable { .. }), "{err}");
        assert!(err.to_string().contains("is applied"), "{err}");
        assert_eq!(
            store.get("sick", b"k2").unwrap().as_deref(),
            Some(&b"v"[..])
        );
        // ...and every later write is refused, though reads go on.
        let err = store.set("sick", b"k3", b"v").unwrap_err();
        assert!(err.to_string().contains("injected fsync failure"), "{err}");
        assert!(matches!(
            store.delete("sick", b"k"),
            Err(Error::Poisoned { .. })
        ));
        assert!(matches!(store.compact("sick"), Err(Error::Poisoned { .. })));
        assert_eq!(
            store.get("sick", b"k").unwrap().as_deref(),
            Some(&b"before"[..])
        );
        let stats = store.stats();
        assert!(
            stats
                .collections
                .iter()
                .any(|c| c.name == "sick" && c.poisoned)
        );
        // Other collections are unaffected.
        store.set("well", b"k", b"still fine").unwrap();
        drop(store);
        // A restart recovers the log and writes work again.
        let store = Store::open(dir.path(), options).unwrap();
        store.set("sick", b"k4", b"v").unwrap();
        assert_eq!(
            store.get("sick", b"k").unwrap().as_deref(),
            Some(&b"before"[..])
        );
    }

    /// A compaction told to stop (the store is closing) gives up: its new
    /// file is deleted and the collection goes on from the old one, whole.
    #[test]
    fn a_compaction_gives_up_when_the_store_is_closing() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            compaction_min_bytes: u64::MAX,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options.clone()).unwrap();
        let value = [b'v'; 100];
        for round in 0..2u8 {
            for i in 0..20_000u32 {
                store
                    .set(
                        "c",
                        format!("k{i}").as_bytes(),
                        &[&value[..], &[round]].concat(),
                    )
                    .unwrap();
            }
        }
        let c = store.existing("c").unwrap().unwrap();
        let before = std::fs::metadata(dir.path().join("c.dhrt")).unwrap().len();
        let asked = std::sync::atomic::AtomicUsize::new(0);
        let stopping = || asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed) >= 1;
        let report =
            crate::compact::compact(&c, Some(dir.path()), &options, u64::MAX, &stopping).unwrap();
        assert!(report.is_none(), "{report:?}");
        assert!(asked.load(std::sync::atomic::Ordering::Relaxed) >= 2);
        assert!(!dir.path().join(format!("c{COMPACT_SUFFIX}")).exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("c.dhrt")).unwrap().len(),
            before
        );
        assert_eq!(
            store.get("c", b"k19999").unwrap(),
            Some([&value[..], &[1]].concat().into())
        );
        assert!(
            !c.compact_requested
                .load(std::sync::atomic::Ordering::Acquire)
        );

        // One that met a damaged record before giving up asks to be run
        // again (the store's close runs it whole) and counts it once.
        let at = c.current.load().index.get(b"k0").unwrap().offset();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("c.dhrt"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"XYZ", at + 45).unwrap();
        asked.store(0, std::sync::atomic::Ordering::Relaxed);
        let report =
            crate::compact::compact(&c, Some(dir.path()), &options, u64::MAX, &stopping).unwrap();
        assert!(report.is_none());
        assert!(
            c.compact_requested
                .load(std::sync::atomic::Ordering::Acquire)
        );
        assert_eq!(c.quarantined.load(std::sync::atomic::Ordering::Relaxed), 0);
        // Told never to stop, the same compaction finishes.
        let report = crate::compact::compact(&c, Some(dir.path()), &options, u64::MAX, &|| false)
            .unwrap()
            .unwrap();
        assert_eq!((report.records, report.damaged), (19_999, 1));
    }

    /// A compaction hands its new file to the disk as it writes it, a few
    /// MiB at a time, and a write-back that fails fails the compaction: the
    /// collection goes on from its old file, whole, and the next one works.
    #[test]
    fn a_compaction_writes_its_file_behind_and_a_failed_write_back_fails_it() {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            compaction_min_bytes: u64::MAX,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options.clone()).unwrap();
        let value = |i: u32| vec![(i % 251) as u8; 10_000];
        // About 30 MiB live: several stretches of write-behind.
        for i in 0..3_000u32 {
            store
                .set("c", format!("k{i}").as_bytes(), &value(i))
                .unwrap();
        }
        let c = store.existing("c").unwrap().unwrap();
        let before = std::fs::metadata(dir.path().join("c.dhrt")).unwrap().len();
        c.fail_compaction_write_back
            .store(true, std::sync::atomic::Ordering::Release);
        let err = store.compact("c").unwrap_err();
        assert!(
            matches!(
                &err,
                Error::Io {
                    op: "write back",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!dir.path().join(format!("c{COMPACT_SUFFIX}")).exists());
        assert_eq!(
            std::fs::metadata(dir.path().join("c.dhrt")).unwrap().len(),
            before
        );
        assert_eq!(c.current.load().log.write_backs(), 0);
        store.set("c", b"after", b"failed compaction").unwrap();

        let report = store.compact("c").unwrap();
        assert_eq!(report.records, 3_001);
        // 8 MiB stretches of about 30 MiB: three handed over, two waited for.
        let write_backs = c.current.load().log.write_backs();
        assert!(write_backs >= 5, "{write_backs} write-backs");
        drop((c, store));
        let store = Store::open(dir.path(), options).unwrap();
        for i in (0..3_000u32).step_by(7) {
            assert_eq!(
                store
                    .get("c", format!("k{i}").as_bytes())
                    .unwrap()
                    .as_deref(),
                Some(&value(i)[..])
            );
        }
        assert_eq!(
            store.get("c", b"after").unwrap().as_deref(),
            Some(&b"failed compaction"[..])
        );
    }

    /// `compact_damaged` (what a stopping node calls) returns only once no
    /// damaged record is left in the file, even when the background thread
    /// had taken the compaction request and was in the middle of it.
    #[test]
    fn compact_damaged_waits_for_a_background_compaction_in_flight() {
        use std::sync::atomic::Ordering;
        use std::sync::mpsc::channel;
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            compaction_min_bytes: u64::MAX,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options.clone()).unwrap();
        for i in 0..100u32 {
            store
                .set("c", format!("k{i:03}").as_bytes(), &[b'v'; 50])
                .unwrap();
        }
        store.sync().unwrap();
        let c = store.existing("c").unwrap().unwrap();
        let at = c.current.load().index.get(b"k010").unwrap().offset();
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.path().join("c.dhrt"))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&file, b"X", at + 50).unwrap();
        let (paused_tx, paused) = channel();
        let (resume, resume_rx) = channel();
        *c.pause_compaction.lock().unwrap() = Some((paused_tx, resume_rx));
        // The read finds the damage and asks for a compaction, which the
        // background thread takes and holds in its last step.
        assert!(matches!(
            store.get("c", b"k010"),
            Err(Error::Checksum { .. })
        ));
        paused.recv().unwrap();
        let returned = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = {
            let (store, returned) = (store.clone(), returned.clone());
            std::thread::spawn(move || {
                store.compact_damaged();
                returned.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !returned.load(Ordering::SeqCst),
            "compact_damaged returned while the damage was still in the file"
        );
        resume.send(()).unwrap();
        stopping.join().unwrap();
        // A copy of the files as they are now opens: no damage is left.
        let copy = tempfile::tempdir().unwrap();
        for name in ["c.dhrt", "c.dhrt.durable", "EPOCH"] {
            std::fs::copy(dir.path().join(name), copy.path().join(name)).unwrap();
        }
        let reopened = Store::open(copy.path(), options).expect("no damage left");
        assert_eq!(reopened.get("c", b"k010").unwrap(), None);
        assert_eq!(
            reopened.get("c", b"k099").unwrap(),
            Some(vec![b'v'; 50].into())
        );
    }
}
