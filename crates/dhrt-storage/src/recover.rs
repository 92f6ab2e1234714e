//! Recovery's two passes over a collection's log: the scan, which checks
//! every record, finds where the valid log ends and stages what the index
//! needs of each set and tombstone, and the replay, which builds the index
//! from what the scan staged, without reading the log again. Both use every
//! core for large logs; neither depends on the order records are visited in
//! for its result.

use crate::collection::State;
use crate::index::{self, InOrder, Index, ORDER_BITS, Part, Slot};
use crate::key::{self, INLINE, Key, compare};
use crate::record::{self, Decoded, FILE_HEADER_LEN, Kind, RECORD_HEADER_LEN};
use crate::version::Version;
use crate::{Options, log::CHECKPOINT_EVERY};

/// A set or tombstone as the scan found it: what the replay needs of it,
/// so the replay reads the log again only for keys longer than 22 bytes (it
/// would read it in shard order, all over the file: a cache and TLB miss
/// per record, which made the replay of a 3 GB log four times as slow as
/// its scan). 56 bytes, whatever the key's length; the version is kept as
/// it is, not interned as the index's slots intern node ids (a walk from a
/// false start may decode made-up records, which must leave no trace).
pub(crate) struct Found {
    key: StagedKey,
    version: Version,
    /// The record's offset, with [`TOMBSTONE`] set for a tombstone.
    at: u64,
    crc: u32,
    value_len: u32,
}

const _: () = assert!(std::mem::size_of::<Found>() == 56);

const TOMBSTONE: u64 = 1 << 63;

/// A staged key: inline up to 22 bytes, else where it lies in the log.
enum StagedKey {
    Inline { len: u8, bytes: [u8; INLINE] },
    InLog { len: u32, at: u64 },
}

impl StagedKey {
    /// `key`, which the log holds at offset `at`.
    fn new(key: &[u8], at: usize) -> Self {
        match key::inline(key) {
            Some((len, bytes)) => StagedKey::Inline { len, bytes },
            None => StagedKey::InLog {
                len: key.len() as u32,
                at: at as u64,
            },
        }
    }

    fn len(&self) -> usize {
        match self {
            StagedKey::Inline { len, .. } => usize::from(*len),
            StagedKey::InLog { len, .. } => *len as usize,
        }
    }

    fn bytes<'a>(&'a self, log: &'a [u8]) -> &'a [u8] {
        match self {
            StagedKey::Inline { len, bytes } => &bytes[..usize::from(*len)],
            StagedKey::InLog { len, at } => &log[*at as usize..*at as usize + *len as usize],
        }
    }
}

impl Found {
    fn offset(&self) -> u64 {
        self.at & !TOMBSTONE
    }

    fn is_tombstone(&self) -> bool {
        self.at & TOMBSTONE != 0
    }

    fn record_len(&self) -> u64 {
        (RECORD_HEADER_LEN + self.key.len()) as u64 + u64::from(self.value_len)
    }

    /// Whether this record wins over `other`, a record of the same key: by
    /// the live index's rule ([`index::wins`]), and of the same record
    /// written twice, the earlier in the log.
    fn beats(&self, other: &Found) -> bool {
        index::wins(self.version, self.crc, other.version, || other.crc)
            || ((self.version, self.crc) == (other.version, other.crc)
                && self.offset() < other.offset())
    }
}

/// log2 of the number of buckets the scan sorts records into, by the top
/// bits of their key's order hash: the replay builds a bucket's shards
/// together. Few, so the scan writes to few places at once (see
/// [`replay`]).
const BUCKET_BITS: u32 = 6;
const BUCKETS: usize = 1 << BUCKET_BITS;

/// log2 of how many parts the replay splits a bucket into before it sorts
/// each part's records by shard. Few: the split writes to that many places
/// at once, a cache line a record, and once a bucket no longer fits in the
/// core's cache (a log of millions of records) every write stream the
/// prefetcher cannot follow is a miss to memory. At 64 parts the split of
/// a 10M-key log cost 170 ns a record against 67 at 1M keys; at 16, 39
/// and 36 ns, and the reopen of 10M keys took 2.7 s instead of 4.1
/// (docs/benchmarks.md, session 18).
const SPLIT_BITS: u32 = 4;

/// A bucket grows in chunks of this many records, not by reallocating one
/// vector (which would copy it and leave up to half of it unused).
const CHUNK: usize = 1024;

/// The records one walk found, by bucket, each bucket in chunks.
#[derive(Default)]
pub(crate) struct Stretch {
    buckets: Vec<Vec<Vec<Found>>>,
}

impl Stretch {
    fn push(&mut self, hash: u64, found: Found) {
        if self.buckets.is_empty() {
            self.buckets.resize_with(BUCKETS, Vec::new);
        }
        let bucket = &mut self.buckets[(hash >> (ORDER_BITS - BUCKET_BITS)) as usize];
        match bucket.last_mut() {
            Some(chunk) if chunk.len() < CHUNK => chunk.push(found),
            _ => {
                let mut chunk = Vec::with_capacity(if bucket.is_empty() { 4 } else { CHUNK });
                chunk.push(found);
                bucket.push(chunk);
            }
        }
    }

    fn len(&self) -> usize {
        self.buckets.iter().flatten().map(Vec::len).sum()
    }
}

impl std::fmt::Debug for Stretch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stretch({} records)", self.len())
    }
}

/// What the scan collects for the replay and for the log.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// Every set and tombstone, in stretches.
    pub(crate) records: Vec<Stretch>,
    /// The greatest drop version, its offset, and how many drop records
    /// there are.
    pub(crate) dropped_at: Option<Version>,
    pub(crate) drop_offset: u64,
    pub(crate) drops: u64,
    /// Checkpoints for the log (see `LogFile::note_checkpoint`).
    pub(crate) checkpoints: Vec<(u64, u64)>,
    /// The greatest seq seen.
    pub(crate) max_seq: u64,
    /// The greatest timestamp seen.
    pub(crate) max_ts: u64,
    /// Records of every kind.
    pub(crate) count: u64,
    /// Where the valid log ends: the end of the buffer, or the first offset
    /// that does not hold a whole, valid record.
    pub(crate) end: usize,
    /// The walk stopped at `end` before a record reaching past its bound,
    /// without checking it: whoever goes on from `end` does.
    deferred: bool,
    /// The seq of the walk's first record (0 before one is found).
    first_seq: u64,
    /// Where the first record whose seq was not greater than every seq
    /// before it in this walk starts. A valid log's seqs increase record by
    /// record: only bytes that are not the log's own records break that,
    /// such as records embedded in a value (for a walk from a false start),
    /// or a record written over another (a misdirected write).
    pub(crate) regressed_at: Option<usize>,
}

impl Scanned {
    /// Sets and tombstones found.
    fn keyed(&self) -> usize {
        self.records.iter().map(Stretch::len).sum()
    }

    /// Appends what a scan of the stretch right after this one found.
    fn extend(&mut self, next: Scanned) {
        self.records.extend(next.records);
        if next.dropped_at > self.dropped_at {
            self.dropped_at = next.dropped_at;
            self.drop_offset = next.drop_offset;
        }
        self.drops += next.drops;
        self.checkpoints.extend(next.checkpoints);
        if self.regressed_at.is_none() {
            // `next` starts where this walk ended.
            let at_seam = self.count > 0 && next.count > 0 && next.first_seq <= self.max_seq;
            self.regressed_at = if at_seam {
                Some(self.end)
            } else {
                next.regressed_at
            };
        }
        if self.count == 0 {
            self.first_seq = next.first_seq;
        }
        self.max_seq = self.max_seq.max(next.max_seq);
        self.max_ts = self.max_ts.max(next.max_ts);
        self.count += next.count;
        self.end = next.end;
        self.deferred = next.deferred;
    }
}

/// A damaged record the scan stepped over: its key and version as they
/// were written (its one damaged byte undone), for the caller to check,
/// once the index is built, that a record of that key beats it.
#[derive(Debug)]
pub(crate) struct Stepped {
    pub(crate) at: usize,
    pub(crate) key: Vec<u8>,
    pub(crate) version: Version,
    pub(crate) crc: u32,
}

/// The longest record a damaged byte is located in. Damage of several
/// bytes is taken for one byte, somewhere in a record's content of `n`
/// bytes, with a chance of about `n / 2^24` (a random syndrome matches one
/// of the 255 byte patterns at one of `n` places): at most 1 in 4,096
/// here. Longer records that fail their CRC are not stepped over.
pub(crate) const MAX_LOCATED_LEN: usize = 4096;

impl Scanned {
    /// Steps over the record at `end` when it fails its CRC because of one
    /// damaged byte, located (see `locate.rs`) outside its lengths, so that
    /// its key and version are known as written; the scan goes on from
    /// after it (on one thread: a damaged log is rare). Its frame is
    /// checked apart from its CRC: the record after it must carry the next
    /// seq (a seq has a check of its own, and a damaged length that spans
    /// other records, or ends inside one, meets a different seq or none).
    /// The end of the file after it is no proof: a superseded record is
    /// never the last one anyway (what supersedes it was written after
    /// it). The seqs of every record after it must increase, so records a
    /// client wrote inside a value cannot pass for the next ones. `None`,
    /// the scan left as it was, for anything else: damage of
    /// several bytes, a record longer than [`MAX_LOCATED_LEN`], a drop
    /// record, a record followed by a gap in seqs (a compacted stretch, a
    /// restart) or by the end of the file.
    pub(crate) fn step_over_damaged(&mut self, buf: &[u8]) -> Option<Stepped> {
        let at = self.end;
        let rest = &buf[at..];
        let header = record::parse_header(rest).ok()?;
        let len = header.record_len();
        if header.kind == Kind::Drop || len > rest.len() || len > MAX_LOCATED_LEN {
            return None;
        }
        let framed = record::parse_header(&rest[len..])
            .is_ok_and(|next| Some(next.seq) == header.seq.checked_add(1));
        if !framed {
            return None;
        }
        let key_len = header.key_len as usize;
        let (head, damage) = crate::locate::repaired_head(&rest[..len], key_len)?;
        // The kind may have been the damaged byte: the repaired header
        // must still parse (a tombstone has no value).
        let header = record::parse_header(&head).ok()?;
        if header.kind == Kind::Drop {
            return None;
        }
        let crc = match damage {
            crate::locate::Damage::InCrc => record::content_crc(&rest[..len]),
            crate::locate::Damage::At { .. } => record::stored_crc(rest),
        };
        // The rest of the log must read as the log's own records: a
        // record a client embedded in a value (it controls those bytes)
        // can carry the next seq, but the true next record then repeats
        // it.
        let after = scan_from(buf, at + len, buf.len(), false);
        if after.regressed_at.is_some() {
            return None;
        }
        self.extend(after);
        Some(Stepped {
            at,
            key: head[RECORD_HEADER_LEN..].to_vec(),
            version: header.version,
            crc,
        })
    }
}

/// Logs below this are scanned on one thread.
const PARALLEL_SCAN_BYTES: usize = 64 << 20;

/// How far into its stretch the search for a first record goes: past it
/// (a stretch starting inside a large value), the stretch is left to the
/// walk through the ones before it.
const MAX_SEARCH: usize = 1 << 20;

/// Walks the records from `from` while they decode, until the first one
/// that starts at or past `until` (or the end of `buf`). `end` is where it
/// stopped: a record start at or past `until` if every record before it was
/// valid, else the start of the first one that is not. With `defer`, it
/// also stops (`deferred`) before a record whose header says it reaches
/// past `until`, unchecked: a walk that may be thrown away does not
/// checksum a length a crafted header claims.
fn scan_from(buf: &[u8], from: usize, until: usize, defer: bool) -> Scanned {
    let mut s = Scanned {
        end: from,
        ..Scanned::default()
    };
    let mut records = Stretch::default();
    while s.end < until {
        if defer
            && let Ok(header) = record::parse_header(&buf[s.end..])
            && s.end + header.record_len() > until
        {
            s.deferred = true;
            break;
        }
        let Decoded::Record { header, key, .. } = record::decode(&buf[s.end..]) else {
            break;
        };
        let at = s.end as u64;
        if s.checkpoints
            .last()
            .is_none_or(|&(_, c)| at >= c + CHECKPOINT_EVERY)
        {
            s.checkpoints.push((header.seq, at));
        }
        if s.count == 0 {
            s.first_seq = header.seq;
        } else if header.seq <= s.max_seq && s.regressed_at.is_none() {
            s.regressed_at = Some(s.end);
        }
        s.max_seq = s.max_seq.max(header.seq);
        s.max_ts = s.max_ts.max(header.version.ts);
        if header.kind == Kind::Drop {
            if Some(header.version) > s.dropped_at {
                s.dropped_at = Some(header.version);
                s.drop_offset = at;
            }
            s.drops += 1;
        } else {
            let found = Found {
                key: StagedKey::new(key, s.end + RECORD_HEADER_LEN),
                version: header.version,
                at: at
                    | if header.kind == Kind::Tombstone {
                        TOMBSTONE
                    } else {
                        0
                    },
                crc: record::stored_crc(&buf[s.end..]),
                value_len: header.value_len,
            };
            records.push(index::order_hash(key), found);
        }
        s.count += 1;
        s.end += header.record_len();
    }
    s.records.push(records);
    s
}

/// The first offset in `from..until` where a whole, valid record starts, if
/// one is found before `budget` bytes were checksummed (bytes crafted to
/// look like many overlapping records cannot make this quadratic).
fn first_record_in(buf: &[u8], from: usize, until: usize, mut budget: usize) -> Option<usize> {
    let last = until.min(buf.len().saturating_sub(RECORD_HEADER_LEN - 1));
    for at in from..last {
        // Cheap filters before the CRC: a known kind, then the header (its
        // seq check is a CRC of its own).
        if !matches!(buf[at + 4], 1..=3) {
            continue;
        }
        let Ok(header) = record::parse_header(&buf[at..]) else {
            continue;
        };
        let len = header.record_len();
        if len > buf.len() - at {
            continue;
        }
        if len > budget {
            return None;
        }
        budget -= len;
        if matches!(record::decode(&buf[at..]), Decoded::Record { .. }) {
            return Some(at);
        }
    }
    None
}

/// Checks every record of a log from its header on, and collects what the
/// replay needs: the same result as one walk from the start, on every core
/// for a large log.
///
/// The log is cut into stretches. Each stretch after the first is scanned
/// from the first valid record found in it, which may be a false start (a
/// value can hold bytes that look like a record); a stretch is kept only if
/// the walk through the stretches before it lands exactly on its start, and
/// is walked again from where that walk landed otherwise. Walks from the
/// same record are the same walk, so the result is the single walk's.
pub(crate) fn scan(buf: &[u8]) -> Scanned {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get().min(8));
    if buf.len() < PARALLEL_SCAN_BYTES || threads == 1 {
        return scan_from(buf, FILE_HEADER_LEN, buf.len(), false);
    }
    scan_in_stretches(buf, threads, threads * 4)
}

/// [`scan`] on `threads` threads, the log cut into `stretches`.
fn scan_in_stretches(buf: &[u8], threads: usize, stretches: usize) -> Scanned {
    let bounds: Vec<usize> = (0..=stretches)
        .map(|i| match i {
            0 => FILE_HEADER_LEN,
            i => buf.len() * i / stretches,
        })
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if i >= stretches {
                return done;
            }
            let (from, until) = (bounds[i], bounds[i + 1]);
            let scanned = match i {
                // Always kept: nothing to defer.
                0 => Some((from, scan_from(buf, from, until, false))),
                _ => first_record_in(buf, from, until.min(from + MAX_SEARCH), 2 * (until - from))
                    .map(|at| (at, scan_from(buf, at, until, true))),
            };
            done.push((i, scanned));
        }
    };
    let mut found: Vec<Option<(usize, Scanned)>> = (0..stretches).map(|_| None).collect();
    std::thread::scope(|s| {
        // Helpers where threads can be had; this thread works too, so the
        // scan completes without them.
        let helpers: Vec<_> = (1..threads)
            .filter_map(|_| {
                std::thread::Builder::new()
                    .name("dhrt-recover".into())
                    .spawn_scoped(s, work)
                    .ok()
            })
            .collect();
        let mine = work();
        let theirs = helpers
            .into_iter()
            .map(|h| h.join().expect("scan thread panicked"));
        for done in std::iter::once(mine).chain(theirs) {
            for (i, result) in done {
                found[i] = result;
            }
        }
    });
    let (_, mut total) = found[0]
        .take()
        .expect("the first stretch starts at the header");
    for i in 1..stretches {
        if total.deferred {
            total.extend(scan_from(buf, total.end, bounds[i], false));
        }
        if total.end < bounds[i] {
            // The walk stopped on a bad record (or the end): the valid log
            // ends there, whatever follows.
            break;
        }
        let next = match found[i].take() {
            Some((start, scanned)) if start == total.end => scanned,
            _ => scan_from(buf, total.end, bounds[i + 1], true),
        };
        total.extend(next);
    }
    if total.deferred {
        total.extend(scan_from(buf, total.end, buf.len(), false));
    }
    total
}

/// Builds the index from what the scan staged, without reading the log.
///
/// The final state does not depend on the order records are applied in
/// (per key the greatest version wins; a drop removes what is older than
/// it). The scan sorted the records into buckets by the top bits of their
/// key's order hash; the replay takes a bucket's shards at a time (the
/// bucket's records, about a megabyte per million records in the log, stay
/// in cache), sorts each shard's records by key, keeps the winner of each
/// key, and fills the index in shard order, the buckets split among
/// threads.
pub(crate) fn replay(log: &[u8], scanned: Scanned, options: &Options) -> (Index, State) {
    let keyed = scanned.keyed();
    let bits = index::shard_bits(options.shards_for(keyed as u64));
    // A group is the buckets of one shard (few shards) or the shards of
    // one bucket (many).
    let buckets_per_group = 1usize << BUCKET_BITS.saturating_sub(bits);
    let shards_per_group = 1usize << bits.saturating_sub(BUCKET_BITS);
    let groups = BUCKETS / buckets_per_group;

    let mut by_group: Vec<Vec<Vec<Found>>> = (0..groups).map(|_| Vec::new()).collect();
    for stretch in scanned.records {
        for (bucket, chunks) in stretch.buckets.into_iter().enumerate() {
            by_group[bucket / buckets_per_group].extend(chunks);
        }
    }
    let sizes: Vec<usize> = by_group
        .iter()
        .map(|chunks| chunks.iter().map(Vec::len).sum())
        .collect();

    let base = State {
        dropped_at: scanned.dropped_at,
        drop_offset: scanned.drop_offset,
        ..State::default()
    };
    // Builds the shards of groups `first..first + chunks.len()`.
    // A group's records are split 16 ways by the next bits of their hash,
    // then each split by shard (up to about a thousand shards, whose
    // buffers, a split's records, stay in the core's cache), in buffers
    // reused from group to group. (Scattering records over thousands of
    // places in memory costs a TLB miss per record, in a virtual machine a
    // two-level page walk: that made a scan into 1,024 buckets twice as
    // slow as one into 16; see `SPLIT_BITS` for the split.)
    let split_bits = bits.saturating_sub(BUCKET_BITS).min(SPLIT_BITS);
    let shards_per_split = shards_per_group >> split_bits;
    let apply_groups = |first: usize, chunks: Vec<Vec<Vec<Found>>>| {
        let mut state = base;
        let shards = first * shards_per_group..(first + chunks.len()) * shards_per_group;
        let mut builder = InOrder::new(bits, shards, options.shard_array_max);
        let mut splits: Vec<Vec<(u64, Found)>> = (0..1 << split_bits).map(|_| Vec::new()).collect();
        let mut per_shard: Vec<Vec<(u64, Found)>> =
            (0..shards_per_split).map(|_| Vec::new()).collect();
        for (g, group) in chunks.into_iter().enumerate() {
            let first_shard = (first + g) * shards_per_group;
            // Each chunk is freed once split.
            for chunk in group {
                for found in chunk {
                    if state.dropped_at.is_some_and(|d| found.version <= d) {
                        state.garbage += found.record_len();
                        continue;
                    }
                    let hash = index::order_hash(found.key.bytes(log));
                    let shard = index::shard_of(hash, bits) - first_shard;
                    splits[shard / shards_per_split].push((hash, found));
                }
            }
            for (i, split) in splits.iter_mut().enumerate() {
                let first_shard = first_shard + i * shards_per_split;
                for (hash, found) in split.drain(..) {
                    per_shard[index::shard_of(hash, bits) - first_shard].push((hash, found));
                }
                for records in &mut per_shard {
                    settle(records, log, &mut state, &mut builder);
                    forget_capacity(records);
                }
            }
            splits.iter_mut().for_each(forget_capacity);
        }
        (builder.seal(), state)
    };
    let threads = if keyed < 50_000 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    // Cut the groups into `threads` ranges of about as many records; one
    // group may hold more than a thread's share (a key rewritten many
    // times, keys crafted to share a hash prefix): no empty ranges.
    let mut cuts = vec![0];
    let mut sum = 0;
    for (g, size) in sizes.iter().enumerate() {
        sum += size;
        if cuts.len() < threads && sum * threads >= keyed * cuts.len() && g + 1 < groups {
            cuts.push(g + 1);
        }
    }
    cuts.push(groups);
    cuts.dedup();
    let mut ranges = Vec::new();
    for w in cuts.windows(2).rev() {
        ranges.push((w[0], std::sync::Mutex::new(Some(by_group.split_off(w[0])))));
    }
    ranges.reverse();
    // Range `i`, built by whichever thread takes it.
    let take = |i: usize| {
        let (first, chunks) = &ranges[i];
        let chunks = chunks
            .lock()
            .unwrap()
            .take()
            .expect("each range is taken once");
        apply_groups(*first, chunks)
    };
    let built: Vec<(Part, State)> = std::thread::scope(|s| {
        // A range whose thread cannot be had is applied on this one.
        let mut built = Vec::new();
        let handles: Vec<_> = (1..ranges.len())
            .filter_map(|i| {
                let take = &take;
                match std::thread::Builder::new()
                    .name("dhrt-recover".into())
                    .spawn_scoped(s, move || take(i))
                {
                    Ok(h) => Some(h),
                    Err(_) => {
                        built.push(take(i));
                        None
                    }
                }
            })
            .collect();
        built.push(take(0));
        built.extend(
            handles
                .into_iter()
                .map(|h| h.join().expect("replay thread panicked")),
        );
        built
    });
    let (parts, states): (Vec<Part>, Vec<State>) = built.into_iter().unzip();
    let index = Index::from_parts(parts);
    let mut total = base;
    for st in states {
        total.live_keys += st.live_keys;
        total.tombstones += st.tombstones;
        total.garbage += st.garbage;
        total.oldest_tombstone_ms = total.oldest_tombstone_ms.min(st.oldest_tombstone_ms);
    }
    if let Some(d) = scanned.dropped_at {
        total.garbage += (scanned.drops - 1) * RECORD_HEADER_LEN as u64;
        total.oldest_tombstone_ms = total.oldest_tombstone_ms.min(d.physical_ms());
    }
    (index, total)
}

/// Settles one shard's records (taken, leaving `records` empty with its
/// capacity): per key the record that wins goes into the index, the others
/// count as garbage.
fn settle(records: &mut Vec<(u64, Found)>, log: &[u8], state: &mut State, builder: &mut InOrder) {
    // By key only: the records of a key are few, and the sort does not
    // slow down on many equal keys.
    records.sort_unstable_by(|(_, a), (_, b)| compare(a.key.bytes(log), b.key.bytes(log)));
    let mut records = records.drain(..).peekable();
    while let Some((hash, mut best)) = records.next() {
        while let Some((_, next)) =
            records.next_if(|(_, r)| r.key.bytes(log) == best.key.bytes(log))
        {
            let loser = if next.beats(&best) {
                std::mem::replace(&mut best, next)
            } else {
                next
            };
            state.garbage += loser.record_len();
        }
        if best.is_tombstone() {
            state.tombstones += 1;
            state.oldest_tombstone_ms = state.oldest_tombstone_ms.min(best.version.physical_ms());
        } else {
            state.live_keys += 1;
        }
        let slot = Slot::new(
            best.offset(),
            best.is_tombstone(),
            best.version,
            best.crc,
            best.value_len,
        );
        builder.push(hash, Key::new(best.key.bytes(log)), slot);
    }
}

/// Frees a buffer the replay reuses if a skewed group (one key rewritten
/// millions of times, keys crafted to share a hash prefix) grew it far
/// past what an even spread needs, so it does not stay that large.
fn forget_capacity<T>(buffer: &mut Vec<T>) {
    if buffer.capacity() > 1 << 16 {
        *buffer = Vec::new();
    }
}

/// Whether any valid record starts after `from` in `buf`.
pub(crate) fn valid_record_after(buf: &[u8], from: usize) -> bool {
    (from + 1..buf.len().saturating_sub(RECORD_HEADER_LEN - 1)).any(|at| {
        // Cheap filter before the CRC: a known kind.
        matches!(buf[at + 4], 1..=3) && matches!(record::decode(&buf[at..]), Decoded::Record { .. })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One record to write: kind (1 set, 2 tombstone, 3 drop), key, value,
    /// and whether the value should hold a whole encoded record (a false
    /// start for a stretch that begins inside it).
    type Item = (u8, Vec<u8>, Vec<u8>, bool);

    fn log_of(items: &[Item]) -> Vec<u8> {
        log_with_seq_back(items, None)
    }

    /// [`log_of`], the record at `back` numbered as the one before it (a
    /// record out of seq order, as a misdirected write leaves).
    fn log_with_seq_back(items: &[Item], back: Option<usize>) -> Vec<u8> {
        let mut buf = record::file_header(record::FileHeader {
            history: 7,
            purged_seq: 0,
        })
        .to_vec();
        for (i, (kind, key, value, nested)) in items.iter().enumerate() {
            let seq = i as u64 + 1 - u64::from(back == Some(i) && i > 0);
            let version = Version::new(1000 + seq * 3, 1 + seq % 3);
            let mut value = value.clone();
            if *nested {
                // A value that is itself a valid record, twice over.
                let mut inner = Vec::new();
                record::encode(&mut inner, Kind::Set, b"fake", &value, version, seq + 1000);
                record::encode(&mut inner, Kind::Set, b"fake2", b"x", version, seq + 2000);
                value = inner;
            }
            match kind {
                1 => record::encode(&mut buf, Kind::Set, key, &value, version, seq),
                2 => record::encode(&mut buf, Kind::Tombstone, key, b"", version, seq),
                _ => record::encode(&mut buf, Kind::Drop, b"", b"", version, seq),
            }
        }
        buf
    }

    fn item() -> impl Strategy<Value = Item> {
        (
            prop_oneof![8 => Just(1u8), 2 => Just(2u8), 1 => Just(3u8)],
            proptest::collection::vec(any::<u8>(), 1..12),
            prop_oneof![
                4 => proptest::collection::vec(any::<u8>(), 0..200),
                1 => proptest::collection::vec(any::<u8>(), 2000..9000),
            ],
            proptest::bool::weighted(0.2),
        )
    }

    fn same_result(buf: &[u8], parallel: &Scanned, single: &Scanned) {
        // Every set and tombstone once, whichever stretch found it.
        let flat = |s: &Scanned| {
            let mut all: Vec<_> = s
                .records
                .iter()
                .flat_map(|stretch| stretch.buckets.iter().flatten().flatten())
                .map(|f| {
                    (
                        f.at,
                        f.version,
                        f.key.bytes(buf).to_vec(),
                        f.crc,
                        f.value_len,
                    )
                })
                .collect();
            all.sort_by_key(|f| f.0);
            all
        };
        assert_eq!(flat(parallel), flat(single));
        // And each in the bucket of its key.
        for stretch in &parallel.records {
            for (b, chunks) in stretch.buckets.iter().enumerate() {
                for f in chunks.iter().flatten() {
                    let hash = index::order_hash(f.key.bytes(buf));
                    assert_eq!((hash >> (ORDER_BITS - BUCKET_BITS)) as usize, b);
                }
            }
        }
        assert_eq!(parallel.end, single.end);
        assert_eq!(parallel.count, single.count);
        assert_eq!(parallel.max_seq, single.max_seq);
        assert_eq!(parallel.regressed_at, single.regressed_at);
        assert_eq!(parallel.max_ts, single.max_ts);
        assert_eq!(
            (parallel.dropped_at, parallel.drop_offset, parallel.drops),
            (single.dropped_at, single.drop_offset, single.drops)
        );
        // Checkpoints: (seq, start) of records, in order, the first
        // record's first, and no stretch of more than CHECKPOINT_EVERY
        // bytes of record starts without one (the stretches add a few).
        let mut starts = Vec::new();
        let mut at = FILE_HEADER_LEN;
        while at < single.end {
            let header = record::peek_header(&buf[at..]);
            starts.push((header.seq, at as u64));
            at += header.record_len();
        }
        assert_eq!(parallel.checkpoints.first(), starts.first());
        for w in parallel.checkpoints.windows(2) {
            // (A log out of seq order is refused: its seqs prove nothing.)
            let seqs_ordered = w[0].0 < w[1].0 || single.regressed_at.is_some();
            assert!(seqs_ordered && w[0].1 < w[1].1, "{w:?}");
        }
        for c in &parallel.checkpoints {
            assert!(starts.contains(c), "{c:?} is not a record start");
        }
        for w in starts.windows(2) {
            let covered = parallel
                .checkpoints
                .iter()
                .rev()
                .find(|c| c.1 <= w[0].1)
                .unwrap();
            assert!(w[1].1 < covered.1 + CHECKPOINT_EVERY || parallel.checkpoints.contains(&w[1]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// The stretched scan finds what one walk from the start finds,
        /// whatever the records, false starts, damage and trailing zeros.
        #[test]
        fn stretches_find_what_one_walk_finds(
            items in proptest::collection::vec(item(), 0..120),
            damage in proptest::option::of((any::<prop::sample::Index>(), any::<u8>())),
            zeros in 0usize..5000,
            threads in 1usize..4,
            stretches in 2usize..24,
            back in proptest::option::weighted(0.3, any::<prop::sample::Index>()),
        ) {
            let back = back.map(|b| b.index(items.len().max(1)));
            let mut buf = log_with_seq_back(&items, back);
            if let Some((at, flip)) = damage
                && buf.len() > FILE_HEADER_LEN
            {
                let at = FILE_HEADER_LEN + at.index(buf.len() - FILE_HEADER_LEN);
                buf[at] ^= flip.max(1);
            }
            buf.resize(buf.len() + zeros, 0);
            let single = scan_from(&buf, FILE_HEADER_LEN, buf.len(), false);
            let parallel = scan_in_stretches(&buf, threads, stretches);
            same_result(&buf, &parallel, &single);
            // The walk names the record numbered back, if it reached it.
            let starts = record_starts(&buf, single.end);
            let expected = back.filter(|&b| b > 0 && b < starts.len()).map(|b| starts[b]);
            prop_assert_eq!(single.regressed_at, expected);
        }
    }

    /// Where each record a walk to `end` passes starts.
    fn record_starts(buf: &[u8], end: usize) -> Vec<usize> {
        let mut starts = Vec::new();
        let mut at = FILE_HEADER_LEN;
        while at < end {
            starts.push(at);
            at += record::peek_header(&buf[at..]).record_len();
        }
        starts
    }

    /// A record to write: kind (1 set, 2 tombstone, 3 drop), key, value,
    /// and its version's ts and node.
    type Versioned = (u8, Vec<u8>, Vec<u8>, u64, u64);

    /// A log of `records`, in any version order, with ties.
    fn log_of_versions(records: &[Versioned]) -> Vec<u8> {
        let mut buf = record::file_header(record::FileHeader {
            history: 7,
            purged_seq: 0,
        })
        .to_vec();
        for (seq, (kind, key, value, ts, node)) in records.iter().enumerate() {
            let (kind, key, value) = match kind {
                1 => (Kind::Set, &key[..], &value[..]),
                2 => (Kind::Tombstone, &key[..], &b""[..]),
                _ => (Kind::Drop, &b""[..], &b""[..]),
            };
            let version = Version::new(*ts << 16, *node);
            record::encode(&mut buf, kind, key, value, version, seq as u64 + 1);
        }
        buf
    }

    /// Checks the replay of `buf` against a fold over its records in log
    /// order, written without the replay's sorting: per key the record of
    /// the greatest version wins, then of the greatest CRC, then the
    /// earliest; records at or below the newest drop are garbage.
    fn replay_matches_the_model(buf: &[u8], options: &Options) {
        let mut records = Vec::new();
        let mut at = FILE_HEADER_LEN;
        while at < buf.len() {
            let Decoded::Record { header, key, .. } = record::decode(&buf[at..]) else {
                panic!("a bad record at {at}");
            };
            records.push((
                header,
                key.to_vec(),
                record::stored_crc(&buf[at..]),
                at as u64,
            ));
            at += header.record_len();
        }
        let drops: Vec<_> = records.iter().filter(|r| r.0.kind == Kind::Drop).collect();
        let dropped_at = drops.iter().map(|r| r.0.version).max();
        let mut winners: std::collections::BTreeMap<Vec<u8>, (Version, u32, u64, bool)> =
            Default::default();
        let mut garbage = 0u64;
        for (header, key, crc, at) in records.iter().filter(|r| r.0.kind != Kind::Drop) {
            let len = header.record_len() as u64;
            if dropped_at.is_some_and(|d| header.version <= d) {
                garbage += len;
                continue;
            }
            let new = (header.version, *crc, *at, header.kind == Kind::Tombstone);
            match winners.get_mut(key) {
                None => {
                    winners.insert(key.clone(), new);
                }
                Some(old) => {
                    // Log order: a later record wins only if it is greater.
                    if (new.0, new.1) > (old.0, old.1) {
                        garbage += (RECORD_HEADER_LEN + key.len()) as u64
                            + u64::from(record::peek_header(&buf[old.2 as usize..]).value_len);
                        *old = new;
                    } else {
                        garbage += len;
                    }
                }
            }
        }
        if !drops.is_empty() {
            garbage += (drops.len() as u64 - 1) * RECORD_HEADER_LEN as u64;
        }
        let tombstones = winners.values().filter(|w| w.3).count() as u64;
        let oldest = winners
            .values()
            .filter(|w| w.3)
            .map(|w| w.0.physical_ms())
            .chain(dropped_at.map(|d| d.physical_ms()))
            .min()
            .unwrap_or(u64::MAX);

        let (index, state) = replay(buf, scan(buf), options);
        assert_eq!(state.live_keys, winners.len() as u64 - tombstones);
        assert_eq!(state.tombstones, tombstones);
        assert_eq!(state.garbage, garbage);
        assert_eq!(state.oldest_tombstone_ms, oldest);
        assert_eq!(state.dropped_at, dropped_at);
        let live = Index::new(16, options.shard_array_max);
        for (key, (version, crc, at, tombstone)) in &winners {
            let value_len = record::peek_header(&buf[*at as usize..]).value_len;
            let slot = Slot::new(*at, *tombstone, *version, *crc, value_len);
            assert_eq!(index.get(key), Some(slot), "key {key:?}");
            live.upsert(key, slot);
        }
        for (_, key, _, _) in &records {
            if !winners.contains_key(key) {
                assert_eq!(index.get(key), None, "key {key:?}");
            }
        }
        assert_eq!(index.digest(), live.digest());
    }

    fn versioned() -> impl Strategy<Value = Versioned> {
        (
            prop_oneof![8 => Just(1u8), 3 => Just(2u8), 1 => Just(3u8)],
            prop_oneof![
                4 => (0u8..12).prop_map(|k| vec![b'k', k]),
                1 => (0u8..4).prop_map(|k| [&[k][..], &[b'L'; 40]].concat()),
            ],
            proptest::collection::vec(0u8..3, 0..4),
            1u64..6,
            1u64..3,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Records of any versions in any order, ties of equal versions and
        /// even equal bytes, drops, tombstones, keys long enough to be read
        /// from the log: the replay builds what a fold in log order does.
        #[test]
        fn the_replay_keeps_what_a_fold_in_log_order_keeps(
            records in proptest::collection::vec(versioned(), 0..150),
            array_max in prop_oneof![Just(2usize), Just(256)],
            keys_per_shard in prop_oneof![Just(1usize), Just(64)],
        ) {
            let options = Options {
                shard_array_max: array_max,
                keys_per_shard,
                min_index_shards: 1,
                ..Options::default()
            };
            replay_matches_the_model(&log_of_versions(&records), &options);
        }
    }

    #[test]
    fn a_large_log_replays_on_every_core_as_the_fold_does() {
        // Past PARALLEL_SCAN_BYTES (a stretched scan) and the replay's
        // threshold for threads; versions in no order, a drop a third in.
        let mut x = 0x2545_F491_4F6C_DD1D_u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let records: Vec<_> = (0..260_000u64)
            .map(|i| {
                let r = next();
                let key = match r % 7 {
                    0 => format!("a long key, read back from the log {}", r % 5000).into_bytes(),
                    _ => format!("k{}", r % 60_000).into_bytes(),
                };
                let kind = if i == 86_000 {
                    3
                } else if r % 11 == 0 {
                    2
                } else {
                    1
                };
                (
                    kind,
                    key,
                    vec![r as u8; 250],
                    1 + (r >> 20) % 5000,
                    1 + (r >> 40) % 3,
                )
            })
            .collect();
        let buf = log_of_versions(&records);
        assert!(buf.len() > PARALLEL_SCAN_BYTES);
        replay_matches_the_model(&buf, &Options::default());
    }

    #[test]
    fn made_up_records_in_a_value_leave_no_node_ids_behind() {
        // A 16 MiB value made of 400,000 valid-looking records, each from
        // a different node, in a log scanned in stretches: walks from false
        // starts inside it decode them all, but only the records the
        // replay keeps may add their node to the process's node table
        // (65,536 at most; filling it would stop every restart).
        let mut fake = Vec::new();
        for node in 0..400_000u64 {
            record::encode(
                &mut fake,
                Kind::Set,
                b"f",
                b"",
                Version::new(7 << 16, 1_000_000 + node),
                node + 1,
            );
        }
        let mut records: Vec<Versioned> = (0..240_000u64)
            .map(|i| {
                (
                    1,
                    format!("k{i}").into_bytes(),
                    vec![i as u8; 250],
                    1 + i % 7,
                    1 + i % 2,
                )
            })
            .collect();
        records.insert(120_000, (1, b"big".to_vec(), fake, 9, 1));
        let buf = log_of_versions(&records);
        assert!(buf.len() > PARALLEL_SCAN_BYTES);
        let before = index::interned_nodes();
        let scanned = scan_in_stretches(&buf, 2, 16);
        assert_eq!(scanned.count, 240_001);
        let (index, state) = replay(&buf, scanned, &Options::default());
        assert_eq!(state.live_keys, 240_001);
        assert!(index.get(b"big").is_some() && index.get(b"f").is_none());
        // Other tests of this process may intern a few nodes meanwhile.
        let grown = index::interned_nodes() - before;
        assert!(grown < 1_000, "{grown} node ids interned");
    }

    #[test]
    fn a_stretch_starting_inside_a_value_that_looks_like_records_is_walked_again() {
        // Big values made of valid records, so most stretches start on a
        // false record.
        let items: Vec<Item> = (0..64)
            .map(|i| (1, format!("k{i}").into_bytes(), vec![b'v'; 3000], true))
            .collect();
        let buf = log_of(&items);
        let single = scan_from(&buf, FILE_HEADER_LEN, buf.len(), false);
        assert_eq!(single.count, 64);
        assert_eq!(single.end, buf.len());
        for stretches in [2, 7, 50, 300] {
            same_result(&buf, &scan_in_stretches(&buf, 2, stretches), &single);
        }
    }

    #[test]
    fn a_large_log_is_scanned_in_stretches_with_the_same_result() {
        // Past PARALLEL_SCAN_BYTES, with a big value now and then, a damaged
        // record three quarters in, and reserved zeros after the tail.
        let items: Vec<Item> = (0..300_000)
            .map(|i| {
                let value = if i % 1000 == 0 { 20_000 } else { 200 };
                (
                    1,
                    format!("key{i}").into_bytes(),
                    vec![i as u8; value],
                    i % 997 == 0,
                )
            })
            .collect();
        let mut buf = log_of(&items);
        assert!(buf.len() > PARALLEL_SCAN_BYTES);
        let whole = scan_from(&buf, FILE_HEADER_LEN, buf.len(), false);
        assert_eq!(whole.count, 300_000);
        same_result(&buf, &scan(&buf), &whole);

        let damaged = buf.len() * 3 / 4;
        buf[damaged] ^= 0x40;
        buf.resize(buf.len() + (4 << 20), 0);
        let cut = scan_from(&buf, FILE_HEADER_LEN, buf.len(), false);
        assert!(cut.end <= damaged && cut.count < 300_000);
        same_result(&buf, &scan(&buf), &cut);
    }

    #[test]
    fn the_search_for_a_first_record_gives_up_past_its_budget() {
        let items: Vec<Item> = (0..8)
            .map(|i| (1, format!("k{i}").into_bytes(), vec![b'v'; 3000], true))
            .collect();
        let buf = log_of(&items);
        // Just past the first record's start: the record nested in its
        // value (which starts after the header and the 2-byte key) is
        // found with budget for it, and not without.
        let from = FILE_HEADER_LEN + 1;
        let at = first_record_in(&buf, from, buf.len(), 1 << 20).unwrap();
        assert_eq!(at, FILE_HEADER_LEN + RECORD_HEADER_LEN + 2);
        assert_eq!(first_record_in(&buf, from, buf.len(), 10), None);

        // Records whose headers parse but whose CRC fails each cost their
        // length: three of them and a good one.
        let mut buf = Vec::new();
        let mut len = 0;
        for i in 0..4u64 {
            let start = buf.len();
            record::encode(
                &mut buf,
                Kind::Set,
                b"k",
                &[7; 500],
                Version::new(9, 1),
                i + 1,
            );
            len = buf.len() - start;
            if i < 3 {
                *buf.last_mut().unwrap() ^= 1;
            }
        }
        assert_eq!(first_record_in(&buf, 0, buf.len(), 4 * len), Some(3 * len));
        assert_eq!(first_record_in(&buf, 0, buf.len(), 4 * len - 1), None);
        assert_eq!(first_record_in(&buf, 0, buf.len(), 2 * len), None);
    }
}
