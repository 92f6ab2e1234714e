//! Recovery's two passes over a collection's log: the scan, which checks
//! every record and finds where the valid log ends, and the replay, which
//! builds the index from the records the scan found. Both use every core
//! for large logs; neither depends on the order records are visited in for
//! its result.

use crate::collection::{State, apply_write};
use crate::index::{self, InOrder, Index, Part};
use crate::record::{self, Decoded, FILE_HEADER_LEN, Kind, RECORD_HEADER_LEN};
use crate::version::Version;
use crate::{Options, log::CHECKPOINT_EVERY};

/// What the scan collects for the replay and for the log.
#[derive(Debug, Default)]
pub(crate) struct Scanned {
    /// (order hash of the key, offset) of every set and tombstone, in log
    /// order, in stretches.
    pub(crate) records: Vec<Vec<(u32, u64)>>,
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
}

impl Scanned {
    /// Sets and tombstones found.
    fn keyed(&self) -> usize {
        self.records.iter().map(Vec::len).sum()
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
        self.max_seq = self.max_seq.max(next.max_seq);
        self.max_ts = self.max_ts.max(next.max_ts);
        self.count += next.count;
        self.end = next.end;
        self.deferred = next.deferred;
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
    let mut records = Vec::new();
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
        s.max_seq = s.max_seq.max(header.seq);
        s.max_ts = s.max_ts.max(header.version.ts);
        if header.kind == Kind::Drop {
            if Some(header.version) > s.dropped_at {
                s.dropped_at = Some(header.version);
                s.drop_offset = at;
            }
            s.drops += 1;
        } else {
            records.push((index::order_hash(key) as u32, at));
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

/// Builds the index of a log whose records were all checked already.
///
/// The final state does not depend on the order records are applied in
/// (per key the greatest version wins; a drop removes what is older than
/// it), so records are grouped by shard first (a stable counting sort) and
/// each shard is built in one go while it is in cache, in one scratch array
/// per thread, the shards split among threads. (Applying them in log order
/// instead, to read the log front to back, took twice as long: every
/// record then lands in a shard out of cache.)
pub(crate) fn replay(log: &[u8], scanned: Scanned, options: &Options) -> (Index, State) {
    let keyed = scanned.keyed();
    let bits = index::shard_bits(options.shards_for(keyed as u64));
    let shard_count = 1usize << bits;
    let shard = |hash: u32| index::shard_of(u64::from(hash), bits);
    let mut starts = vec![0usize; shard_count + 1];
    for &(hash, _) in scanned.records.iter().flatten() {
        starts[shard(hash) + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    let mut next = starts.clone();
    let mut sorted = vec![0u64; keyed];
    for &(hash, offset) in scanned.records.iter().flatten() {
        let s = shard(hash);
        sorted[next[s]] = offset;
        next[s] += 1;
    }
    drop(scanned.records);

    let base = State {
        dropped_at: scanned.dropped_at,
        drop_offset: scanned.drop_offset,
        ..State::default()
    };
    // Builds shards `shards` from their records, `sorted[starts[shards.start]..
    // starts[shards.end]]`.
    let apply_range = |shards: std::ops::Range<usize>| {
        let mut state = base;
        let mut builder = InOrder::new(bits, shards.clone(), options.shard_array_max);
        let range = &sorted[starts[shards.start]..starts[shards.end]];
        for (i, &offset) in range.iter().enumerate() {
            // The records are visited in shard order, all over the log:
            // ask for one a few ahead, so its cache miss overlaps this
            // one's work instead of following it.
            if let Some(&ahead) = range.get(i + PREFETCH_AHEAD) {
                crate::mmap::prefetch(&log[ahead as usize]);
            }
            let at = &log[offset as usize..];
            let header = record::peek_header(at);
            let key = &at[RECORD_HEADER_LEN..RECORD_HEADER_LEN + header.key_len as usize];
            apply_write(&mut state, log, &header, offset, |slot, crc| {
                builder.upsert(key, slot, crc, log)
            });
        }
        (builder.seal(), state)
    };
    let threads = if sorted.len() < 50_000 {
        1
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
    };
    // Cut the shards into `threads` ranges of about as many records.
    let mut cuts = vec![0];
    for t in 1..threads {
        let target = sorted.len() * t / threads;
        let boundary = starts.partition_point(|&s| s < target).min(shard_count);
        cuts.push(boundary.max(*cuts.last().expect("not empty")));
    }
    cuts.push(shard_count);
    // One shard may hold more than a thread's share (a key rewritten many
    // times, keys crafted to share a hash prefix): no empty ranges.
    cuts.dedup();
    let built: Vec<(Part, State)> = std::thread::scope(|s| {
        // A range whose thread cannot be had is applied on this one.
        let mut built = Vec::new();
        let handles: Vec<_> = cuts
            .windows(2)
            .skip(1)
            .filter_map(|w| {
                let (shards, apply_range) = (w[0]..w[1], &apply_range);
                match std::thread::Builder::new()
                    .name("dhrt-recover".into())
                    .spawn_scoped(s, move || apply_range(shards))
                {
                    Ok(h) => Some(h),
                    Err(_) => {
                        built.push(apply_range(w[0]..w[1]));
                        None
                    }
                }
            })
            .collect();
        built.push(apply_range(cuts[0]..cuts[1]));
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

/// How many records ahead recovery's replay prefetches.
const PREFETCH_AHEAD: usize = 16;

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
        let mut buf = record::file_header(record::FileHeader {
            history: 7,
            purged_seq: 0,
        })
        .to_vec();
        for (seq, (kind, key, value, nested)) in items.iter().enumerate() {
            let seq = seq as u64 + 1;
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
        let flat = |s: &Scanned| s.records.iter().flatten().copied().collect::<Vec<_>>();
        assert_eq!(flat(parallel), flat(single));
        assert_eq!(parallel.end, single.end);
        assert_eq!(parallel.count, single.count);
        assert_eq!(parallel.max_seq, single.max_seq);
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
            assert!(w[0].0 < w[1].0 && w[0].1 < w[1].1, "{w:?}");
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
        ) {
            let mut buf = log_of(&items);
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
        }
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
